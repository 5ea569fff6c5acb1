"""The README and docs/*.md say what to type: every command they show must still be accepted, every file,
module and name they point at must still exist (litgpt's tests/test_readme.py is the pattern; here the
commands are checked without training, which takes minutes each).

The convention: every line of a fenced ```bash block is a command (a `\\` continues it on the next line;
`VAR=value` prefixes are the environment), and each must be one of the kinds below; anything else fails,
so that a new kind of command gets a check here rather than none. Other fences (```python, ``` for
output) are not commands; python blocks must still parse.

    python -m train ...             the overrides: checked as `python -m train` checks them before it
    launch/*.sh ..., sbatch ...     trains (train.cli.check_overrides on every argument, every value of a
    python -m train.plan ...        sweep included), then composed by Hydra and validated
                                    (train.config.validate: value domains, cross-group rules); a sweep's
                                    first point, as Hydra's sweeper enumerates them
    python -m <module> ...          the module exists and `--help` exits 0 (one subprocess per module)
    make <target>                   a target of the Makefile
    pip install -e ".[extra]"       an extra of pyproject.toml
    hf download ...                 the hub: not reachable here (tests/train/test_data_door.py runs the
                                    documented offline command against local copies)

Composing and validating needs no GPU, no hub and no checkpoint (devices, the world's size, data and
resume paths are checked when a run starts), so commands for 8 GPUs or the hub are checked the same way.
In the text as well: `python -m <module>` and `make <target>` anywhere, paths under the repository's
top-level directories (`train/engines/base.py`, `docs/data.md`, `configs/model`), dotted names in
backticks (`train.plot.plot_run`, `models.loss.CHUNK_BUDGET`), and relative links with their anchors."""

from __future__ import annotations

import importlib
import importlib.util
import os
import re
import shlex
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PAGES = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
TOP_LEVEL = ("train", "models", "data", "tests", "configs", "docs", "launch", "hydra_plugins")
TRAINING_LAUNCHERS = ("launch/torchrun.sh", "launch/deepspeed.sh", "launch/slurm.sbatch")


@dataclass(frozen=True)
class Command:
    page: str
    line: int
    words: tuple[str, ...]  # without the leading VAR=value environment

    def __str__(self) -> str:
        return f"{self.page}:{self.line}: {' '.join(self.words)}"


def _fenced_blocks(path: Path, language: str) -> list[tuple[int, str]]:
    """(line of the block's first line, text) of every ```<language> block, indented ones (in a list item)
    included."""
    blocks, inside, wanted, first, indent, body = [], False, False, 0, 0, []
    for number, line in enumerate(path.read_text().splitlines(), 1):
        stripped = line.strip()
        if not stripped.startswith("```"):
            if inside and wanted:
                body.append(line[indent:])
        elif not inside:
            inside, wanted, first, indent, body = True, stripped[3:].strip() == language, number + 1, line.index("`"), []
        else:
            if wanted:
                blocks.append((first, "\n".join(body)))
            inside = False
    return blocks


def bash_commands(path: Path) -> list[Command]:
    commands = []
    for first, text in _fenced_blocks(path, "bash"):
        lines = text.split("\n")
        number = 0
        while number < len(lines):
            start, line = number, lines[number]
            while line.endswith("\\") and number + 1 < len(lines):
                number += 1
                line = line[:-1] + " " + lines[number]
            number += 1
            words = shlex.split(line, comments=True)
            while words and re.fullmatch(r"[A-Z_][A-Z0-9_]*=\S*", words[0]):
                words = words[1:]
            if words:
                commands.append(Command(str(path.relative_to(REPO)), first + start, tuple(words)))
    return commands


ALL_COMMANDS = [c for page in PAGES for c in bash_commands(page)]


def is_training(command: Command) -> bool:
    """A command that trains, or (the planner) composes a run as `python -m train` does."""
    words = command.words
    return (words[:3] in (("python", "-m", "train"), ("python", "-m", "train.plan")) and "--help" not in words) \
        or words[0] in (*TRAINING_LAUNCHERS, "launch/sweep.sh", "sbatch")


def train_arguments(command: Command) -> list[str]:
    """What `python -m train` receives from this command: a launcher passes its arguments on, the sweep
    script adds --multirun, the planner passes on all but its plan.* keys."""
    words = list(command.words)
    if words[:3] == ["python", "-m", "train"]:
        return words[3:]
    if words[:3] == ["python", "-m", "train.plan"]:
        from train.plan import split_plan_arguments

        return split_plan_arguments(words[3:])[1]
    if words[0] == "launch/sweep.sh":
        return ["--multirun", *words[1:]]
    if words[0] == "sbatch":  # sbatch's own options, then the script
        words = words[next(i for i, w in enumerate(words) if w.startswith("launch/")):]
    assert words[0] in TRAINING_LAUNCHERS, command
    return words[1:]


def _first_point(overrides: list[str]) -> list[str]:
    """The first point of a sweep, as Hydra's basic sweeper enumerates them."""
    from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
    from hydra.core.override_parser.overrides_parser import OverridesParser

    parsed = OverridesParser.create().parse_overrides(overrides)
    return BasicSweeper.split_arguments(parsed, None)[0][0]


def check_train_arguments(arguments: list[str]) -> None:
    """What `python -m train` checks before it trains (train/cli.py's main), then Hydra's composition and
    the schema's validation; raises with the trainer's own message."""
    from train.cli import check_overrides, with_list_indices_as_keys
    from train.config import validate
    from train.plan import compose  # the trainer's composition, as the planner reuses it

    flags = [a for a in arguments if a.startswith("-")]
    assert set(flags) <= {"--multirun", "-m"}, f"a flag this test does not check: {flags}"
    overrides = with_list_indices_as_keys([a for a in arguments if a not in flags])
    if flags:  # a sweep: every value checked, then its first point composed (compose checks that again)
        problem = check_overrides(overrides)
        assert problem is None, problem
        overrides = _first_point(overrides)
    validate(compose(overrides))


def _distinct_training_commands() -> list[tuple[Command, ...]]:
    """The training commands, those with the same words together (the README repeats what docs/ shows)."""
    together: dict[tuple[str, ...], list[Command]] = {}
    for command in ALL_COMMANDS:
        if is_training(command):
            together.setdefault(command.words, []).append(command)
    return [tuple(commands) for commands in together.values()]


@pytest.mark.parametrize("commands", _distinct_training_commands(), ids=lambda commands: str(commands[0]))
def test_every_training_command_is_accepted(commands):
    check_train_arguments(train_arguments(commands[0]))


def _makefile_targets() -> set[str]:
    return set(re.findall(r"^([A-Za-z][\w-]*)\s*:(?!=)", (REPO / "Makefile").read_text(), re.MULTILINE))


def _extras() -> set[str]:
    import tomllib

    return set(tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["optional-dependencies"])


def test_every_other_command_is_one_this_test_knows():
    """make targets and pip extras exist; commands of the hub are left to the data door test; a command of
    any other kind fails here until it gets a check."""
    targets, extras, unknown = _makefile_targets(), _extras(), []
    for command in ALL_COMMANDS:
        words = list(command.words)
        if is_training(command) or words[:2] == ["python", "-m"] or words[:2] == ["hf", "download"]:
            continue
        if words[0] == "make":
            assert set(words[1:]) <= targets, f"{command}: the Makefile's targets are {sorted(targets)}"
        elif words[:3] == ["pip", "install", "-e"]:
            extra = re.fullmatch(r"\.\[(\w+)\]", words[3])
            assert extra and extra[1] in extras, f"{command}: pyproject.toml's extras are {sorted(extras)}"
        else:
            unknown.append(str(command))
    assert unknown == []


def test_make_targets_named_in_the_text_exist():
    targets = _makefile_targets()
    named = {(page.name, t) for page in PAGES for t in re.findall(r"`make ([\w-]+)`", page.read_text())}
    assert {(page, t) for page, t in named if t not in targets} == set()


def test_modules_named_in_the_text_exist():
    named = {(page.name, m) for page in PAGES for m in re.findall(r"python -m ([A-Za-z_][\w.]*\w)", page.read_text())}
    assert {(page, m) for page, m in named if importlib.util.find_spec(m) is None} == set()


# Runs each module as `python -m <module> --help` does (runpy, as __main__, with that argv), all in one
# interpreter: one start and one import of torch instead of one per module.
_HELP_OF_EACH = """
import contextlib, io, json, runpy, sys
results = {}
for module in sys.argv[1:]:
    out, status = io.StringIO(), 0
    sys.argv = [module, "--help"]
    try:
        with contextlib.redirect_stdout(out):
            runpy.run_module(module, run_name="__main__", alter_sys=True)
    except SystemExit as exc:
        status = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
    results[module] = [status, out.getvalue()]
print(json.dumps(results))
"""


@pytest.mark.door
def test_every_module_a_command_runs_answers_help():
    """`python -m <module> --help` exits 0 and prints its usage, for every module a command runs."""
    import json

    modules = sorted({c.words[2] for c in ALL_COMMANDS if c.words[:2] == ("python", "-m")})
    assert {"train", "train.plot", "train.plan", "data.pretokenize"} <= set(modules)  # the parsing found them
    env = {**os.environ, "PYTHONPATH": str(REPO), "DS_ACCELERATOR": "cpu", "PYTHONWARNINGS": "ignore"}
    proc = subprocess.run([sys.executable, "-c", _HELP_OF_EACH, *modules], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads(proc.stdout.splitlines()[-1])
    assert {m: status for m, (status, usage) in results.items() if status != 0 or not usage.strip()} == {}


def test_paths_named_in_the_text_exist():
    """Paths under the repository's top-level directories (a moved module is the usual stale name)."""
    path = re.compile(r"(?<![\w/.\-])((?:" + "|".join(TOP_LEVEL) + r")/[\w.\-/]*[\w/])")
    missing = {(page.name, p) for page in PAGES for p in path.findall(page.read_text())
               if not (REPO / p).exists()}
    assert missing == set()


def _resolves(dotted: str) -> bool:
    parts = dotted.split(".")
    for cut in range(len(parts), 0, -1):
        try:
            obj = importlib.import_module(".".join(parts[:cut]))
        except ModuleNotFoundError:
            continue
        for name in parts[cut:]:
            if not hasattr(obj, name):
                return False
            obj = getattr(obj, name)
        return True
    return False


def test_dotted_names_in_backticks_exist():
    """`train.x.y`, `models.x.y` (a function, a constant, a module). `data.` is left out: data.seq_len is a
    config key, not a name of the data package."""
    names = {(page.name, n) for page in PAGES
             for n in re.findall(r"`((?:models|train)(?:\.[A-Za-z_]\w*)+)(?:\([^`]*\))?`", page.read_text())}
    assert {(page, n) for page, n in names if not _resolves(n)} == set()


def _anchors(path: Path) -> set[str]:
    """GitHub's heading anchors: lower case, punctuation dropped, spaces as hyphens."""
    text = re.sub(r"```.*?```", "", path.read_text(), flags=re.DOTALL)
    return {re.sub(r"[^\w\- ]", "", h.strip().lower()).replace(" ", "-")
            for h in re.findall(r"^#+ (.*)$", text, re.MULTILINE)}


def test_links_between_the_pages_resolve():
    broken = []
    for page in PAGES:
        for target in re.findall(r"\]\(([^)\s]+)\)", page.read_text()):
            if re.match(r"[a-z]+://", target):
                continue
            file, _, anchor = target.partition("#")
            linked = (page.parent / file).resolve() if file else page
            if not linked.exists() or (anchor and linked.suffix == ".md" and anchor not in _anchors(linked)):
                broken.append((page.name, target))
    assert broken == []


def test_python_examples_parse():
    import ast

    for page in PAGES:
        for line, text in _fenced_blocks(page, "python"):
            try:
                ast.parse(text)
            except SyntaxError as exc:
                pytest.fail(f"{page.name}:{line + (exc.lineno or 1) - 1}: {exc.msg}")


def test_the_readme_is_the_front_door():
    """The two commands, word for word (.ci/run runs `make test`), and a link to every page of docs/."""
    readme = (REPO / "README.md").read_text()
    assert "make quickstart   # the main job: a real, short pretraining" in readme
    assert "make test         # the test suite (what CI runs: .ci/run)" in readme
    unlinked = [p.name for p in PAGES[1:] if f"(docs/{p.name})" not in readme]
    assert unlinked == []
