# Sourced by the launch scripts (from the repository root): PY is the Python to run with.
# $PYTHON if set; else the project's .venv (make quickstart creates it); else the active interpreter,
# python3 or python on PATH (an activated virtualenv, conda, a container's Python).
if [ -n "${PYTHON:-}" ]; then
    PY=$PYTHON
elif [ -x .venv/bin/python ]; then
    PY=.venv/bin/python
elif command -v python3 >/dev/null 2>&1; then
    PY=$(command -v python3)
elif command -v python >/dev/null 2>&1; then
    PY=$(command -v python)
else
    echo "$(basename "$0"): no Python: create .venv (make quickstart), activate an environment with the" \
         "project installed, or set PYTHON=/path/to/python" >&2
    exit 1
fi
