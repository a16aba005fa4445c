"""The model store: ``{root}/symbols/{symbol}/{model}/{version}/`` (per-symbol fits) and
``{root}/pooled/{model}/{version}/`` (one cross-sectional fit), each version holding

- ``model/``: the fitted model in files that hold numbers and names, never code: a LightGBM booster as its text
  model (``model.txt``), an `LSTM` or `TFT` as its ``state_dict`` (``weights.pt``, read with
  ``torch.load(weights_only=True)``) and its plain fitted state (``fitted.json``), a `SeedEnsemble` as one such
  folder per member (``seed{s}/``). Loading rebuilds the model from ``config.yaml`` and sets these back; any
  other model class is refused when saving;
- ``config.yaml``: the fully resolved workflow task that produced it;
- ``predictions.parquet``: its test-segment predictions (``score``) and the raw label (``label``);
- ``metadata.json``: data span, provider fingerprint, config hash, seed, package versions, metrics, timings,
  the mlflow run id, the creation time and the sha256 of every file above.

Nothing read from a store is unpickled, and a stored config may only build Qlib's, this package's and its
handlers' models, datasets, handlers, processors and loaders: a store can be wrong, never run code.

A version is written into a hidden ``.partial-*`` folder and renamed into place only when complete, and
``latest`` (a file naming one of the entry's own versions) is replaced atomically afterwards, so a process
killed at any moment leaves no half-written version. Versions are numbered ``v0001, v0002, ...`` and never
overwritten.
"""
from __future__ import annotations

import hashlib
import importlib
import json
import logging
import os
import re
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import filelock
import pandas as pd
import yaml

FORMAT = 2  # format 1 (no "format" key) pickled the model (model.pkl) and predictions (pred.pkl): refused
VERSION_NAME = re.compile(r"v\d{4}")
POINTER_MAX_BYTES = 64
TRUSTED_PACKAGES = ("qlib", "vn30_qlib", "handlers")
# where Qlib looks up a config's class when it names no module_path (processors, loaders)
QLIB_DEFAULT_MODULES = ("qlib.data.dataset.processor", "qlib.data.dataset.loader")
PARTIAL_PREFIX = ".partial-"
PARTIAL_MARKER = ".written-by-vn30-qlib"  # first file of a version being written: proves a leftover is ours
POINTER_PREFIX = ".latest-"
_held_locks: set[Path] = set()  # entries whose lock this process holds (`entry_lock` is not re-entrant)


class StoreError(RuntimeError):
    """A stored version that is incomplete, damaged, tampered with, in the old pickle format, or does not
    reproduce its predictions; or a store that cannot be written."""


def entry_dir(root: str | Path, model: str, symbol: str | None) -> Path:
    """Where the versions of one (symbol, model) live; ``symbol=None`` is the pooled model."""
    root = Path(root)
    return root / "pooled" / model if symbol is None else root / "symbols" / symbol / model


def sha256_file(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def save_version(entry: Path, model: object, task: dict, predictions: pd.DataFrame, metadata: dict) -> Path:
    """Write a new version of ``entry`` atomically and point ``latest`` at it; returns the version folder.

    ``predictions``: the test segment's ``score`` and ``label`` columns. The caller holds `entry_lock(entry)`;
    leftovers of writers killed earlier in this entry are removed first.
    """
    from vn30_qlib.model_files import write_model  # torch, LightGBM: only where a model is written

    entry.mkdir(parents=True, exist_ok=True)
    _remove_leftovers(entry)
    partial = Path(tempfile.mkdtemp(prefix=PARTIAL_PREFIX, dir=entry))
    try:
        (partial / PARTIAL_MARKER).write_text("a model-store version written by vn30_qlib.store\n")
        write_model(model, partial / "model")
        (partial / "config.yaml").write_text(yaml.safe_dump(json.loads(json.dumps(task, default=str)), sort_keys=True))
        predictions.to_parquet(partial / "predictions.parquet")
        files = _version_files(partial)
        metadata = {**metadata, "format": FORMAT, "sha256": {name: sha256_file(partial / name) for name in files}}
        (partial / "metadata.json").write_text(json.dumps(metadata, indent=2, sort_keys=True, default=str))
        for name in [*files, "metadata.json"]:
            with open(partial / name, "rb") as handle:
                os.fsync(handle.fileno())
        version = _rename_to_next_version(partial, entry)
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        raise
    _point_latest(entry, version)
    return version


@contextmanager
def entry_lock(entry: Path) -> Iterator[None]:
    """Hold an exclusive lock on one entry (``{entry}/.lock``, released when the holder dies), so a check of
    ``latest`` and the write that depends on it happen as one step across processes and hosts."""
    entry.mkdir(parents=True, exist_ok=True)
    with filelock.FileLock(str(entry / ".lock")):
        _held_locks.add(entry)
        try:
            yield
        finally:
            _held_locks.discard(entry)


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


def _point_latest(entry: Path, version: Path) -> None:
    pointer = entry / f"{POINTER_PREFIX}{version.name}"
    pointer.write_text(version.name + "\n")
    os.replace(pointer, entry / "latest")


def _remove_leftovers(entry: Path) -> None:
    """Remove the ``.partial-*`` folders (those holding our marker, or empty: killed before writing it) and
    ``.latest-*`` files of writers killed mid-write; called with the entry's lock held, so no live writer of
    this entry owns one."""
    for path in entry.iterdir():
        if path.name.startswith(PARTIAL_PREFIX) and path.is_dir() and not path.is_symlink():
            if (path / PARTIAL_MARKER).is_file():
                shutil.rmtree(path)
            elif not any(path.iterdir()):
                path.rmdir()
        elif path.name.startswith(POINTER_PREFIX) and path.is_file() and not path.is_symlink():
            path.unlink()


def versions(entry: Path) -> list[Path]:
    """The complete versions of an entry, oldest first."""
    return sorted(p for p in entry.glob("v[0-9][0-9][0-9][0-9]") if (p / "metadata.json").is_file())


def named_pooled_entries(store_root: str | Path, names: Sequence[str] | None = None) -> list[str]:
    """``names`` (default: every pooled entry with a version), each checked to be a pooled entry with a version
    in the store: what ``predict`` and ``retrain`` work on."""
    root = Path(store_root).expanduser()
    available = sorted(p.name for p in (root / "pooled").glob("*") if p.is_dir() and latest(p) is not None)
    if not available:
        raise StoreError(f"{root}: no pooled model in this store; train one with vn30-qlib loop WORKFLOW "
                         f"--modes pooled --store {root}")
    names = list(names) if names else available
    unknown = [name for name in names if name not in available]
    if unknown:
        raise StoreError(f"{root}: no pooled model {unknown} in this store; it has {available}")
    return names


def latest(entry: Path) -> Path | None:
    """The version ``latest`` points at (None when the entry has none).

    ``latest`` must name one of the entry's own version folders (``v0001`` ...): anything else is refused. When
    it is missing or names a version that is not there, the newest complete version is the latest, and the
    pointer is repaired (when the store is writable and no other process holds the entry).
    """
    named = _read_pointer(entry)
    if named is not None and (entry / named / "metadata.json").is_file():
        return entry / named
    complete = versions(entry)
    if not complete:
        return None
    _repair_pointer(entry, complete[-1])
    return complete[-1]


def _read_pointer(entry: Path) -> str | None:
    pointer = entry / "latest"
    if not os.path.lexists(pointer):
        return None
    if pointer.is_symlink() or not pointer.is_file():
        raise StoreError(f"{pointer}: not a file written by vn30-qlib (a link or a folder); refusing to follow it")
    with open(pointer, "rb") as handle:
        raw = handle.read(POINTER_MAX_BYTES + 1)
    name = raw.decode("ascii", errors="replace").strip()
    if len(raw) > POINTER_MAX_BYTES or not VERSION_NAME.fullmatch(name):
        raise StoreError(f"{pointer}: names {name[:POINTER_MAX_BYTES]!r}, not a version folder of this entry "
                         "(v0001, v0002, ...); refusing to follow it")
    return name


def _repair_pointer(entry: Path, version: Path) -> None:
    """Point ``latest`` at ``version`` under the entry's lock; skipped when another process holds the lock (it
    is writing the pointer), and with a warning when the store cannot be written (a read-only copy)."""
    logger = logging.getLogger(__name__)
    try:
        if entry in _held_locks:
            _point_latest(entry, version)
            return
        with filelock.FileLock(str(entry / ".lock"), timeout=0):
            if _read_pointer(entry) != version.name:
                _remove_leftovers(entry)
                _point_latest(entry, version)
    except filelock.Timeout:
        return
    except OSError as error:
        logger.warning(f"{entry / 'latest'}: using {version.name}, the newest complete version; could not repair "
                       f"the pointer ({error})")


def read_metadata(version: Path) -> dict:
    """The metadata of a version in this package's format; `StoreError` naming the file when it is missing or
    damaged, or when the version was written in the old pickle format."""
    path = version / "metadata.json"
    metadata = read_file(path, lambda p: json.loads(p.read_bytes().decode("utf-8")), "JSON")
    if not isinstance(metadata, dict):
        raise StoreError(f"{path}: not a JSON object; the version is damaged")
    if metadata.get("format") != FORMAT:
        if (version / "model.pkl").exists() or "format" not in metadata:
            raise StoreError(f"{version}: written by an older vn30-qlib that pickled the model (model.pkl), which is "
                             "never loaded (unpickling can run code); retrain it: vn30-qlib loop ... --force")
        raise StoreError(f"{path}: format {metadata['format']!r}, this vn30-qlib reads format {FORMAT}")
    for key in ("sha256", "model", "mode", "metrics", "timings", "provider", "data_span", "config_hash"):
        if key not in metadata:
            raise StoreError(f"{path}: has no {key!r}; the version is damaged")
    if not isinstance(metadata["sha256"], dict):
        raise StoreError(f"{path}: 'sha256' is not a mapping of file names to checksums; the version is damaged")
    return metadata


def read_task(version: Path) -> dict:
    """The workflow task stored with a version (data only: YAML without tags)."""
    task = read_file(version / "config.yaml", lambda p: yaml.safe_load(p.read_text(encoding="utf-8")), "YAML")
    if not (isinstance(task, dict) and isinstance(task.get("model"), dict) and isinstance(task.get("dataset"), dict)):
        raise StoreError(f"{version / 'config.yaml'}: not a workflow task (needs a 'model' and a 'dataset' mapping)")
    return task


def read_predictions(version: Path, metadata: dict) -> pd.DataFrame:
    """The stored test predictions (``score``) and labels (``label``), after checking their checksum."""
    _verify(version, metadata, ["predictions.parquet"])
    return read_file(version / "predictions.parquet", pd.read_parquet, "parquet")


def load(version: Path) -> tuple[object, dict, pd.DataFrame, dict]:
    """(model, task config, stored predictions, metadata) of a version, after checking its files' checksums."""
    from vn30_qlib.model_files import read_model  # torch, LightGBM: only where a model is read

    metadata = read_metadata(version)
    _verify(version, metadata)
    task = read_task(version)
    require_trusted_classes(task["model"], version / "config.yaml")
    model = read_model(task["model"], version / "model")
    return model, task, read_predictions(version, metadata), metadata


def validate(version: Path, provider: str | Path | None = None) -> float:
    """Reload a version and re-predict its test segment; returns the largest absolute difference.

    Raises `StoreError` when a file was changed after saving or the re-prediction differs from the stored one.
    """
    from qlib.utils import init_instance_by_config

    from vn30_qlib.loop import init_qlib_for

    model, task, stored, metadata = load(version)
    require_trusted_classes(task["dataset"], version / "config.yaml")
    init_qlib_for(provider or metadata["provider"]["path"])
    dataset = init_instance_by_config(task["dataset"])
    again = model.predict(dataset, segment="test").reindex(stored.index)
    difference = float((again - stored["score"]).abs().max())
    if not difference <= 1e-6:
        raise StoreError(f"{version}: re-prediction differs from the stored predictions by {difference}")
    return difference


def require_trusted_classes(config: Any, source: Path) -> None:
    """Refuse a config (from ``source``) that names any class but a Qlib, vn30_qlib or handlers model, dataset,
    handler, processor or loader: Qlib's ``init_instance_by_config`` imports and calls whatever a config names."""
    from qlib.data.dataset.loader import DataLoader
    from qlib.utils.serial import Serializable  # models, datasets, handlers and processors derive from it

    if isinstance(config, list):
        for item in config:
            require_trusted_classes(item, source)
        return
    if not isinstance(config, dict):
        return
    if "class" in config:
        name, module_path = config["class"], config.get("module_path")
        modules = QLIB_DEFAULT_MODULES if module_path is None else (module_path,)
        for module in modules:
            if not (isinstance(module, str) and isinstance(name, str) and not module.endswith(".py")
                    and re.fullmatch(r"[A-Za-z_]\w*(\.[A-Za-z_]\w*)*", module)
                    and module.split(".")[0] in TRUSTED_PACKAGES):
                continue
            cls = getattr(importlib.import_module(module), name, None)
            if isinstance(cls, type) and issubclass(cls, (Serializable, DataLoader)):
                break
        else:
            raise StoreError(f"{source}: class {name!r} (module_path {module_path!r}) is not a model, dataset, "
                             f"handler, processor or loader of {', '.join(TRUSTED_PACKAGES)}; a store builds "
                             "nothing else")
    for value in config.values():
        require_trusted_classes(value, source)


def read_file(path: Path, parse: Callable[[Path], Any], kind: str) -> Any:
    """``parse(path)``, with a missing or unreadable file as a `StoreError` that names it."""
    if not path.is_file():
        raise StoreError(f"{path}: missing; the version is incomplete")
    try:
        return parse(path)
    except Exception as error:  # whatever the parser raises on a damaged file
        raise StoreError(f"{path}: damaged, cannot be read as {kind} ({type(error).__name__}: {error})") from error


def _version_files(version: Path) -> list[str]:
    """Every file of a version but its metadata and our marker, as paths relative to it."""
    return sorted(p.relative_to(version).as_posix() for p in version.rglob("*")
                  if p.is_file() and p.name not in ("metadata.json", PARTIAL_MARKER))


def _verify(version: Path, metadata: dict, names: list[str] | None = None) -> None:
    """Check the files ``names`` against the checksums recorded when saving; by default every file of the
    version, which must be exactly the recorded ones."""
    recorded = metadata["sha256"]
    if names is None:
        names = _version_files(version)
        for name in sorted(set(recorded) - set(names)):
            raise StoreError(f"{version}: {name} is missing")
    for name in names:
        if name not in recorded:
            raise StoreError(f"{version}: {name} has no checksum in metadata.json (added after saving?)")
        path = version / name
        if not path.is_file():
            raise StoreError(f"{version}: {name} is missing")
        if sha256_file(path) != recorded[name]:
            raise StoreError(f"{version}: {name} does not match the checksum recorded when it was saved")
