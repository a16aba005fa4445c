"""Read a ``qrun`` workflow YAML exactly as ``qrun`` does (Jinja from the environment, then BASE_CONFIG_PATH)."""
from __future__ import annotations

import os
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator, Mapping

from qlib.cli.run import render_template
from qlib.utils.data import update_config
from ruamel.yaml import YAML


@contextmanager
def _environment(overrides: Mapping[str, str]) -> Iterator[None]:
    saved = {key: os.environ.get(key) for key in overrides}
    os.environ.update({key: str(value) for key, value in overrides.items()})
    try:
        yield
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def load_workflow(path: str | Path, env: Mapping[str, str] | None = None) -> dict:
    """The fully resolved config of the workflow at ``path``; ``env`` sets its Jinja variables for this read."""
    path = Path(path).resolve()
    with _environment(env or {}):
        config = YAML(typ="safe", pure=True).load(render_template(str(path)))
    base = config.get("BASE_CONFIG_PATH")
    if base:
        base_path = (path.parent / base) if not Path(base).is_absolute() else Path(base)
        if not base_path.is_file():
            raise FileNotFoundError(f"{path}: BASE_CONFIG_PATH {base} not found next to it")
        config = update_config(YAML(typ="safe", pure=True).load(base_path.read_text()), config)
    return config
