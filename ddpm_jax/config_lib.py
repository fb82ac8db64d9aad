"""Loading ml_collections config files by path, outside of absl flags.

`run_train.py` reads configs through ``config_flags``; notebooks, tests, benchmarks and the
config files themselves (which extend one another) use `load_config` instead.
"""

from __future__ import annotations

import importlib.util
import os
import pathlib

import ml_collections

REPO_CONFIGS = pathlib.Path(__file__).resolve().parent.parent / "configs"


def load_config(path: str | os.PathLike) -> ml_collections.ConfigDict:
    """Returns ``get_config()`` of a config file.

    Args:
      path: a config file, or the bare name of one in this repository's configs/ folder
        ("digits" -> configs/digits.py).

    Raises:
      FileNotFoundError: no such file, with the names available in configs/.
    """
    path = pathlib.Path(path)
    if path.suffix != ".py" and len(path.parts) == 1:
        path = REPO_CONFIGS / f"{path}.py"
    if not path.is_file():
        names = sorted(p.stem for p in REPO_CONFIGS.glob("*.py")) if REPO_CONFIGS.is_dir() else []
        raise FileNotFoundError(f"no config file {str(path)!r}; the configs here: {names}.")
    spec = importlib.util.spec_from_file_location(f"ddpm_config_{path.stem}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config()


def base_config(config_file: str, name: str) -> ml_collections.ConfigDict:
    """The config `name` (e.g. "default") from the folder of `config_file` (pass __file__)."""
    return load_config(pathlib.Path(config_file).resolve().with_name(f"{name}.py"))
