"""`vn30-qlib retrain`: the pooled models whose next rolling window is due on an updated provider are refitted and
stored as new versions; the rest, and a second run, write nothing. A tiny LightGBM (6 features, 20 rounds) fitted
on the first part of the simulated market's export, then the provider updated with `STEP` more days."""
from __future__ import annotations

from pathlib import Path

import pandas as pd
import pytest

from test_predict import WORKFLOW
from test_update import hashes, write_export
from vn30_qlib import store
from vn30_qlib.cli import main
from vn30_qlib.data.ingest import ingest
from vn30_qlib.data.provider import read_calendar, read_features
from vn30_qlib.data.update import update
from vn30_qlib.loop import LoopEntry, fit_entry, provider_fingerprint

STEP = 20
REACH = 2  # the label Ref($close, -2) / Ref($close, -1) - 1
# WORKFLOW's train (2021) with a half-year valid and the test from July 2022: the first export ends a few days in
SEGMENTS = "            segments:\n                train: [2021-01-04, 2021-12-29]\n"
SHORT = SEGMENTS + ("                valid: [2022-01-04, 2022-06-28]\n                test: [2022-07-01, 2022-12-28]\n")


@pytest.fixture(scope="module")
def market(sim_provider) -> dict[str, pd.DataFrame]:
    provider = sim_provider(0.1)
    calendar = read_calendar(provider)
    columns = ["open", "high", "low", "close", "volume"]
    return {p.name.upper(): read_features(provider, p.name.upper(), calendar)[columns].astype("float64").round(2)
            .loc["2020-10-01":"2022-12-30"] for p in (provider / "features").iterdir()}


@pytest.fixture(scope="module")
def days(market) -> pd.DatetimeIndex:
    return market["ACB"].index


@pytest.fixture(scope="module")
def trained(market, days, tmp_path_factory) -> tuple[Path, Path, Path]:
    """(provider, store, longer export): the provider ends 4 trading days into the test (2 labelled), the store
    holds two pooled LightGBMs (``lgb``, ``lgb.seed1``) fitted on it; the export holds `STEP` more days."""
    test_start = days.searchsorted(pd.Timestamp("2022-07-01"))
    tmp_path = tmp_path_factory.mktemp("retrain")
    provider = tmp_path / "provider"
    ingest(write_export(market, tmp_path / "first", until=f"{days[test_start + 3]:%Y-%m-%d}"), provider)
    workflow = tmp_path / "lgb_vn30.yaml"
    assert SEGMENTS in WORKFLOW
    workflow.write_text(WORKFLOW.replace(SEGMENTS, SHORT))
    for seed in (None, 1):
        result = fit_entry(LoopEntry(str(workflow), "pooled", None, seed), str(provider), str(tmp_path / "models"))
        assert result["status"] == "done", result.get("traceback")
    longer = write_export(market, tmp_path / "longer", until=f"{days[test_start + 3 + STEP]:%Y-%m-%d}")
    return provider, tmp_path / "models", longer


def retrain(provider: Path, store_root: Path, *extra: str) -> int:
    return main(["retrain", "--store", str(store_root), "--provider", str(provider), "--step", str(STEP), *extra])


def test_bad_input_exits_2_and_changes_nothing(trained, tmp_path, capsys):
    provider, store_root, _ = trained
    before, provider_before = hashes(store_root), hashes(provider)
    assert retrain(provider, store_root, "--models", "lgb,tft") == 2
    assert "no pooled model ['tft'] in this store; it has ['lgb', 'lgb.seed1']" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_:
        main(["retrain", "--store", str(store_root), "--provider", str(provider), "--step", "0"])
    assert exit_.value.code == 2 and "must be 1 or more trading days, got 0" in capsys.readouterr().err
    empty = tmp_path / "empty_store"
    empty.mkdir()
    assert retrain(provider, empty) == 2
    assert "no pooled model in this store" in capsys.readouterr().err
    assert retrain(provider, store_root, "--date", "2022-12-30") == 2  # a day whose last close it lacks
    assert "lacks the close of 2022-12-29" in capsys.readouterr().err
    assert hashes(store_root) == before and not any(empty.iterdir()) and hashes(provider) == provider_before


def test_an_ensemble_entry_is_refused_not_refitted_with_its_members_old_fit_window(trained, monkeypatch, capsys):
    provider, store_root, _ = trained
    before = hashes(store_root)
    read_task = store.read_task
    monkeypatch.setattr(store, "read_task", lambda version: {**read_task(version), "model": {
        "class": "ModelEnsemble", "module_path": "vn30_qlib.models.model_ensemble", "kwargs": {}}})
    assert retrain(provider, store_root, "--models", "lgb") == 2
    assert "retrain does not move a ModelEnsemble's member handlers yet" in capsys.readouterr().err
    assert hashes(store_root) == before


def test_retrain_refits_only_due_named_entries_once_and_predict_uses_the_new_version(trained, days, capsys):
    provider, store_root, longer = trained
    before = hashes(store_root)
    assert retrain(provider, store_root) == 0
    printed = capsys.readouterr().out
    assert "lgb v0001: valid ends 2022-06-28, test starts 2022-07-01" in printed
    assert f"2022-07-04, 1 of the {STEP} trading days after the test start: not due" in printed
    assert "0 retrained, 0 already current, 2 not due" in printed
    assert hashes(store_root) == before

    update(longer, provider)
    assert retrain(provider, store_root, "--models", "lgb") == 0
    assert "1 retrained, 0 already current, 0 not due" in capsys.readouterr().out
    assert store.latest(store_root / "pooled" / "lgb.seed1").name == "v0001"
    assert {k: v for k, v in hashes(store_root).items() if k.startswith("pooled/lgb.seed1/")} == \
        {k: v for k, v in before.items() if k.startswith("pooled/lgb.seed1/")}
    old, new = store.versions(store_root / "pooled" / "lgb")
    assert store.latest(store_root / "pooled" / "lgb") == new
    old_span, span = (store.read_metadata(v)["data_span"] for v in (old, new))
    calendar = read_calendar(provider)

    def shifted(day: str, steps: int = 1) -> str:
        return f"{calendar[calendar.get_loc(pd.Timestamp(day)) + steps * STEP]:%Y-%m-%d}"

    assert span["train"] == [old_span["train"][0][:10], shifted(old_span["train"][1][:10])]  # expanding
    assert span["valid"] == [shifted("2022-01-04"), shifted("2022-06-28")]
    last_labelled = calendar[-1 - REACH]
    assert span["test"] == [shifted("2022-07-01"), f"{last_labelled:%Y-%m-%d}"]
    purge = [calendar.get_loc(pd.Timestamp(span[later][0])) - calendar.get_loc(pd.Timestamp(span[earlier][1]))
             for earlier, later in (("train", "valid"), ("valid", "test"))]
    assert purge == [REACH + 1, REACH + 1]
    handler = store.read_task(new)["dataset"]["kwargs"]["handler"]["kwargs"]
    assert [handler["fit_start_time"], handler["fit_end_time"], handler["end_time"]] == \
        [*span["train"], f"{calendar[-1]:%Y-%m-%d}"]
    metadata = store.read_metadata(new)
    assert metadata["provider"]["sha256"] == provider_fingerprint(provider)["sha256"]
    assert metadata["entry"]["seed"] is None and metadata["model"] == "lgb"

    after = hashes(store_root)
    assert retrain(provider, store_root, "--models", "lgb") == 0  # the same run again: lgb's window is current
    assert "0 retrained, 0 already current, 1 not due" in capsys.readouterr().out
    assert hashes(store_root) == after

    assert main(["predict", "--store", str(store_root), "--provider", str(provider), "--models", "lgb"]) == 0
    printed = capsys.readouterr().out
    assert f"from the close of {calendar[-1]:%Y-%m-%d}; models: lgb v0002" in printed
