"""The model store: ``{root}/symbols/{symbol}/{model}/{version}/`` (per-symbol fits) and
``{root}/pooled/{model}/{version}/`` (one cross-sectional fit), each version holding

- ``model.pkl``: the fitted Qlib model (pickled as the recorder pickles it);
- ``config.yaml``: the fully resolved workflow task that produced it;
- ``pred.pkl``: its test-segment predictions;
- ``metadata.json``: data span, provider fingerprint, config hash, seed, package versions, metrics, timings,
  the mlflow run id, the creation time and the sha256 of every file above.

A version is written into a hidden ``.partial-*`` folder and renamed into place only when complete, and
``latest`` is replaced atomically afterwards, so a process killed at any moment leaves no half-written
version. Versions are numbered ``v0001, v0002, ...`` and never overwritten.
"""
from __future__ import annotations

import fcntl
import hashlib
import json
import os
import pickle
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import pandas as pd
import yaml

FILES = ("model.pkl", "config.yaml", "pred.pkl")


class StoreError(RuntimeError):
    """A stored version that is incomplete, tampered with or does not reproduce its predictions."""


def entry_dir(root: str | Path, model: str, symbol: str | None) -> Path:
    """Where the versions of one (symbol, model) live; ``symbol=None`` is the pooled model."""
    root = Path(root)
    return root / "pooled" / model if symbol is None else root / "symbols" / symbol / model


def sha256_file(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def save_version(entry: Path, model: object, task: dict, pred: pd.Series, metadata: dict) -> Path:
    """Write a new version of ``entry`` atomically and point ``latest`` at it; returns the version folder."""
    entry.mkdir(parents=True, exist_ok=True)
    partial = Path(tempfile.mkdtemp(prefix=".partial-", dir=entry))
    try:
        with open(partial / "model.pkl", "wb") as handle:
            pickle.dump(model, handle)
        (partial / "config.yaml").write_text(yaml.safe_dump(json.loads(json.dumps(task, default=str)), sort_keys=True))
        pred.to_pickle(partial / "pred.pkl")
        metadata = {**metadata, "sha256": {name: sha256_file(partial / name) for name in FILES}}
        (partial / "metadata.json").write_text(json.dumps(metadata, indent=2, sort_keys=True, default=str))
        for path in partial.iterdir():
            with open(path, "rb") as handle:
                os.fsync(handle.fileno())
        version = _rename_to_next_version(partial, entry)
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        raise
    pointer = entry / f".latest-{version.name}"
    pointer.write_text(version.name + "\n")
    os.replace(pointer, entry / "latest")
    return version


@contextmanager
def entry_lock(entry: Path) -> Iterator[None]:
    """Hold an exclusive lock on one entry (``{entry}/.lock``, flock: released when the holder dies), so a
    check of ``latest`` and the write that depends on it happen as one step across processes and hosts."""
    entry.mkdir(parents=True, exist_ok=True)
    with open(entry / ".lock", "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _rename_to_next_version(partial: Path, entry: Path) -> Path:
    while True:
        existing = [int(p.name[1:]) for p in entry.glob("v[0-9][0-9][0-9][0-9]")]
        target = entry / f"v{max(existing, default=0) + 1:04d}"
        try:
            os.rename(partial, target)  # fails if another process took this number first
            return target
        except OSError:
            if not target.exists():
                raise


def versions(entry: Path) -> list[Path]:
    """The complete versions of an entry, oldest first."""
    return sorted(p for p in entry.glob("v[0-9][0-9][0-9][0-9]") if (p / "metadata.json").is_file())


def latest(entry: Path) -> Path | None:
    """The version ``latest`` points at (None when the entry has none)."""
    pointer = entry / "latest"
    return entry / pointer.read_text().strip() if pointer.is_file() else None


def read_metadata(version: Path) -> dict:
    return json.loads((version / "metadata.json").read_text())


def load(version: Path) -> tuple[object, dict, pd.Series, dict]:
    """(model, task config, stored predictions, metadata) of a version, after checking its files' checksums."""
    metadata = read_metadata(version)
    for name in FILES:
        if not (version / name).is_file():
            raise StoreError(f"{version}: {name} is missing")
        if sha256_file(version / name) != metadata["sha256"][name]:
            raise StoreError(f"{version}: {name} does not match the checksum recorded when it was saved")
    with open(version / "model.pkl", "rb") as handle:
        model = pickle.load(handle)
    task = yaml.safe_load((version / "config.yaml").read_text())
    return model, task, pd.read_pickle(version / "pred.pkl"), metadata


def validate(version: Path, provider: str | Path | None = None) -> float:
    """Reload a version and re-predict its test segment; returns the largest absolute difference.

    Raises `StoreError` when a file was changed after saving or the re-prediction differs from the stored one.
    """
    from qlib.utils import init_instance_by_config

    from vn30_qlib.loop import init_qlib_for

    model, task, stored, metadata = load(version)
    init_qlib_for(provider or metadata["provider"]["path"])
    dataset = init_instance_by_config(task["dataset"])
    again = model.predict(dataset, segment="test").reindex(stored.index)
    difference = float((again - stored).abs().max())
    if not difference <= 1e-6:
        raise StoreError(f"{version}: re-prediction differs from the stored predictions by {difference}")
    return difference
