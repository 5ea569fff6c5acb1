"""smolpretrain's Hydra launcher: `hydra/launcher=torchrun` (the default of `python -m train --multirun`).
`hydra_plugins` itself stays a namespace package (no __init__.py), shared with other Hydra plugins;
Hydra imports every module under it to find launchers."""
