"""How each model class the store keeps becomes files that hold numbers and names, never code, and back.

- LightGBM (Qlib's ``LGBModel``): the booster's text model, ``model.txt``.
- `LSTM`, `TFT`: the network's ``state_dict`` as ``weights.pt`` (with the TFT's fitted arrays), read with
  ``torch.load(weights_only=True)``, and the plain fitted state (names, flags, history) as ``fitted.json``.
- `SeedEnsemble`: one such folder per member, ``seed{s}/``.
- `ModelEnsemble`: one such folder per member it kept, ``{name}/``, and ``ensemble.json`` naming them with every
  member's valid Rank IC.
- `OneDayReversal`: an empty folder (it fits nothing).
- `RollingRetrain`: one such folder per window, ``window{k}/``, and ``windows.json`` with each window's test dates;
  a `DDGDARetrain` also ``time_weights.csv``: each window's DDG-DA weight per training period (``window, start, end,
  weight``; versions stored before 2026-12-05 hold none, and their ``time_weights`` read back empty).

Reading builds the model from its stored config (Qlib's ``init_instance_by_config``) and sets the fitted state
back. Any other model class is refused when writing: there is no pickle fallback.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import lightgbm
import pandas as pd
import torch
from qlib.contrib.model.gbdt import LGBModel
from qlib.utils import init_instance_by_config

from vn30_qlib.models.ddgda_retrain import DDGDARetrain
from vn30_qlib.models.lstm import LSTM
from vn30_qlib.models.model_ensemble import ModelEnsemble
from vn30_qlib.models.reversal import OneDayReversal
from vn30_qlib.models.rolling_retrain import RollingRetrain
from vn30_qlib.models.seed_ensemble import SeedEnsemble
from vn30_qlib.models.tft import TFT
from vn30_qlib.store import StoreError, read_file

SUPPORTED = ("LightGBM's LGBModel, vn30_qlib's LSTM, TFT and OneDayReversal, and SeedEnsembles, ModelEnsembles and "
             "RollingRetrains of these")
WINDOWS_FILE = "windows.json"
ENSEMBLE_FILE = "ensemble.json"
TIME_WEIGHTS_FILE = "time_weights.csv"
TIME_WEIGHTS_COLUMNS = ["window", "start", "end", "weight"]


def write_model(model: Any, folder: Path) -> None:
    """Write a fitted ``model`` into the new folder ``folder``; `StoreError` for a class the store cannot keep."""
    if not isinstance(model, (SeedEnsemble, ModelEnsemble, RollingRetrain, LGBModel, LSTM, TFT, OneDayReversal)):
        raise StoreError(f"cannot store a {type(model).__module__}.{type(model).__name__}: the store keeps only "
                         f"models it can rebuild without unpickling ({SUPPORTED})")
    folder.mkdir()
    if isinstance(model, SeedEnsemble):
        for seed, member in zip(model.seeds, model.members):
            write_model(member, folder / f"seed{seed}")
    elif isinstance(model, ModelEnsemble):
        for name, member in model.fitted_members.items():
            write_model(member, folder / name)
        (folder / ENSEMBLE_FILE).write_text(json.dumps({"kept": list(model.fitted_members),
                                                        "valid_rank_ic": model.valid_rank_ic}))
    elif isinstance(model, RollingRetrain):
        for number, member in enumerate(model.members):
            write_model(member, folder / f"window{number}")
        (folder / WINDOWS_FILE).write_text(json.dumps([[f"{start:%Y-%m-%d}", f"{end:%Y-%m-%d}"]
                                                       for start, end in model.windows]))
        if isinstance(model, DDGDARetrain):
            _time_weights_table(model.time_weights).to_csv(folder / TIME_WEIGHTS_FILE, index=False)
    elif isinstance(model, LGBModel):
        (folder / "model.txt").write_text(model.model.model_to_string())
    elif isinstance(model, (LSTM, TFT)):
        tensors, fitted = _lstm_state(model) if isinstance(model, LSTM) else _tft_state(model)
        torch.save(tensors, folder / "weights.pt")
        (folder / "fitted.json").write_text(json.dumps(fitted))


def read_model(config: dict, folder: Path) -> Any:
    """The model ``config`` builds, with the fitted state stored in ``folder`` set back (``config`` must have
    passed `vn30_qlib.store.require_trusted_classes`)."""
    return _restore(init_instance_by_config(config), folder)


def _read_booster(path: Path) -> lightgbm.Booster:
    """LightGBM's parser aborts the whole process on some truncated texts: check its closing sections first."""
    text = path.read_text()
    if "\nend of trees\n" not in text or "\nend of parameters\n" not in text:
        raise ValueError("incomplete: no 'end of trees' / 'end of parameters' section")
    return lightgbm.Booster(model_str=text)


def _restore(model: Any, folder: Path) -> Any:
    if isinstance(model, SeedEnsemble):
        # the members are built as the ensemble's fit builds them (its seed, its checkpoint folder)
        model.members = [_restore(model._member(seed), folder / f"seed{seed}") for seed in model.seeds]
    elif isinstance(model, ModelEnsemble):
        fitted = read_file(folder / ENSEMBLE_FILE, lambda p: json.loads(p.read_text()), "JSON")
        kept = fitted.get("kept") if isinstance(fitted, dict) else None
        if not (isinstance(kept, list) and kept and all(isinstance(name, str) and name in model.members
                                                            for name in kept) and len(set(kept)) == len(kept)):
            raise StoreError(f"{folder / ENSEMBLE_FILE}: 'kept' must list distinct members of the ensemble its "
                             f"config.yaml builds ({list(model.members)}), got {kept!r}")
        model.fitted_members = {name: _restore(model._member(name), folder / name) for name in kept}
        model.valid_rank_ic = fitted.get("valid_rank_ic", {})
    elif isinstance(model, LGBModel):
        model.model = read_file(folder / "model.txt", _read_booster, "a LightGBM text model")
    elif isinstance(model, RollingRetrain):
        windows = read_file(folder / WINDOWS_FILE, lambda p: json.loads(p.read_text()), "JSON")
        if not (isinstance(windows, list) and windows and all(isinstance(w, list) and len(w) == 2 for w in windows)):
            raise StoreError(f"{folder / WINDOWS_FILE}: must list each window's [start, end] test dates, got "
                             f"{str(windows)[:200]}")
        try:
            model.windows = [(pd.Timestamp(start), pd.Timestamp(end)) for start, end in windows]
        except (TypeError, ValueError) as error:
            raise StoreError(f"{folder / WINDOWS_FILE}: a window's dates do not parse ({error})") from None
        model.members = [_restore(init_instance_by_config(model.model), folder / f"window{number}")
                         for number in range(len(windows))]
        if isinstance(model, DDGDARetrain) and (folder / TIME_WEIGHTS_FILE).is_file():
            model.time_weights = _read_time_weights(folder / TIME_WEIGHTS_FILE, len(windows))
    elif isinstance(model, OneDayReversal):
        pass  # nothing fitted
    elif isinstance(model, (LSTM, TFT)):
        tensors = read_file(folder / "weights.pt", lambda p: torch.load(p, map_location="cpu", weights_only=True),
                            "torch tensors")
        fitted = read_file(folder / "fitted.json", lambda p: json.loads(p.read_text()), "JSON")
        try:
            (_set_lstm_state if isinstance(model, LSTM) else _set_tft_state)(model, tensors, fitted)
        except (KeyError, TypeError, ValueError, RuntimeError) as error:  # names or shapes the config does not fit
            raise StoreError(f"{folder}: the stored state does not fit the model its config.yaml builds "
                             f"({type(error).__name__}: {error})") from error
    else:
        raise StoreError(f"{folder.parent / 'config.yaml'}: builds a {type(model).__name__}, not one of the models "
                         f"the store keeps ({SUPPORTED})")
    return model


def _time_weights_table(time_weights: list[pd.Series]) -> pd.DataFrame:
    """One row per window and training period: DDG-DA's weights indexed by the periods' (start, end) dates."""
    rows = [(number, pd.Timestamp(start), pd.Timestamp(end), float(weight))
            for number, weights in enumerate(time_weights) for (start, end), weight in weights.items()]
    return pd.DataFrame(rows, columns=TIME_WEIGHTS_COLUMNS)


def _read_time_weights(path: Path, windows: int) -> list[pd.Series]:
    def parse(file: Path) -> pd.DataFrame:
        table = pd.read_csv(file)
        if list(table.columns) == TIME_WEIGHTS_COLUMNS:
            for column in ("start", "end"):
                table[column] = pd.to_datetime(table[column], format="ISO8601")
            table["weight"] = pd.to_numeric(table["weight"])
        return table

    table = read_file(path, parse, "CSV")
    found = sorted(table["window"].unique()) if "window" in table.columns else []
    if list(table.columns) != TIME_WEIGHTS_COLUMNS or found != list(range(windows)):
        raise StoreError(f"{path}: must hold columns {TIME_WEIGHTS_COLUMNS} and rows for windows 0 to {windows - 1}, "
                         f"got columns {list(table.columns)} and windows {found[:20]}")
    return [group.set_index(["start", "end"])["weight"] for _, group in table.groupby("window", sort=True)]


def _lstm_state(model: LSTM) -> tuple[dict[str, torch.Tensor], dict]:
    return model._module_weights(), {"d_feat": model.d_feat, "bf16": model.bf16, "history": model.history}


def _set_lstm_state(model: LSTM, tensors: dict[str, torch.Tensor], fitted: dict) -> None:
    model.d_feat, model.bf16, model.history = fitted["d_feat"], fitted["bf16"], fitted["history"]
    model._restore_module(tensors)


def _tft_state(model: TFT) -> tuple[dict[str, torch.Tensor], dict]:
    """The network's weights (``module.*``), the train-segment scales and the importance tables as tensors; the
    names that index them as JSON."""
    tensors = {f"module.{name}": weight for name, weight in model._module_weights().items()}
    # each array keeps its dtype: the calendar scaling in float64 instead of the fit's float32 moves predictions
    tensors |= {"label_scale": torch.tensor(model.label_scale),
                "calendar_mean": torch.tensor(model.calendar_mean.to_numpy()),
                "calendar_std": torch.tensor(model.calendar_std.to_numpy())}
    importance = {}
    for key, table in model.importance.items():
        tensors[f"importance.{key}"] = torch.tensor(table.to_numpy())
        importance[key] = {"index": table.index.tolist(), "index_name": table.index.name,
                           "columns": table.columns.tolist() if isinstance(table, pd.DataFrame) else None,
                           "name": table.name if isinstance(table, pd.Series) else None}
    fitted = {"past_names": model.past_names, "calendar_names": model.calendar_mean.index.tolist(),
              "importance": importance, "history": model.history}
    return tensors, fitted


def _set_tft_state(model: TFT, tensors: dict[str, torch.Tensor], fitted: dict) -> None:
    model.past_names, model.history = fitted["past_names"], fitted["history"]
    model.label_scale = tensors["label_scale"].numpy()
    model.calendar_mean = pd.Series(tensors["calendar_mean"].numpy(), index=fitted["calendar_names"])
    model.calendar_std = pd.Series(tensors["calendar_std"].numpy(), index=fitted["calendar_names"])
    model.importance = {}
    for key, spec in fitted["importance"].items():
        values = tensors[f"importance.{key}"].numpy()
        index = pd.Index(spec["index"], name=spec["index_name"])
        model.importance[key] = (pd.Series(values, index=index, name=spec["name"]) if spec["columns"] is None
                                 else pd.DataFrame(values, index=index, columns=spec["columns"]))
    model._restore_module({name.removeprefix("module."): weight for name, weight in tensors.items()
                           if name.startswith("module.")})
