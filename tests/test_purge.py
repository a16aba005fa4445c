"""Purged segments (issue 21, item 2): the label of day t reads the closes of t+1 and t+2, so no label that fit,
early stopping or tuning reads may have a price day in a later segment. The dataset's handler is instrumented
(its ``fetch`` records every label it returns) and each stage is run as the workflows run it."""
from __future__ import annotations

import re
from pathlib import Path

import pandas as pd
import pytest

from conftest import REPO
from vn30_qlib.dataset import SegmentError, check_purged, label_reach

REACH = 2  # Ref($close, -2) / Ref($close, -1) - 1


@pytest.fixture(scope="module")
def five_names(tmp_path_factory) -> Path:
    """Five simulated symbols from 2021 to the workflows' last day: every segment of the workflows has data."""
    from vn30_qlib.data.provider import write_provider
    from vn30_qlib.data.simulate import simulate_market

    bars, calendar, _ = simulate_market(seed=0, signal=0.1, start="2021-01-01", end="2024-09-30")
    symbols = sorted(bars)[:5]
    return write_provider(tmp_path_factory.mktemp("purge") / "provider", {s: bars[s] for s in symbols}, calendar,
                          markets={"vn30": symbols, "all": symbols})


class LabelReads:
    """Wraps a handler's ``fetch``: the days of every label value it hands out from then on."""

    def __init__(self, handler):
        self.days: set[pd.Timestamp] = set()
        fetch = handler.fetch

        def recorded_fetch(*args, **kwargs):
            frame = fetch(*args, **kwargs)
            col_set = kwargs.get("col_set", args[1] if len(args) > 1 else "__all")
            reads_label = col_set in ("label", "__all") or (isinstance(col_set, list) and "label" in col_set)
            if reads_label and isinstance(frame, pd.DataFrame) and len(frame):
                labels = frame["label"] if isinstance(frame.columns, pd.MultiIndex) else frame
                read = labels.notna().any(axis=1).to_numpy()
                self.days.update(frame.index.get_level_values("datetime")[read])
            return frame

        handler.fetch = recorded_fetch


def assert_purged(days: set[pd.Timestamp], segments: list[tuple[str, tuple]], calendar: pd.DatetimeIndex) -> None:
    """Every label day read lies in one of ``segments`` (name, (start, end)), in time order, and none of the
    closes it reads (the next `REACH` trading days) lies in a later segment."""
    assert days, "the stage read no label at all"
    bounds = [(name, pd.Timestamp(start), pd.Timestamp(end)) for name, (start, end) in segments]
    for day in sorted(days):
        position = next((i for i, (_, start, end) in enumerate(bounds) if start <= day <= end), None)
        assert position is not None, f"a label of {day:%Y-%m-%d} was read: outside {segments}"
        index = calendar.get_loc(day)
        last_close = calendar[min(index + REACH, len(calendar) - 1)]
        for name, start, _ in bounds[position + 1:]:
            assert last_close < start, (f"the label of {day:%Y-%m-%d} ({bounds[position][0]}) reads the close of "
                                        f"{last_close:%Y-%m-%d}, in segment {name} starting {start:%Y-%m-%d}")


def workflow_dataset(workflow: str, provider: Path, model_kwargs: dict, tracking: Path):
    """(model, dataset, task) of a shipped workflow, as qrun's task_train builds them; the recorder writes to
    ``tracking``."""
    from qlib.utils import init_instance_by_config

    from vn30_qlib.loop import init_qlib_for, sqlite_tracking_uri
    from vn30_qlib.workflow_config import load_workflow

    init_qlib_for(provider, sqlite_tracking_uri(tracking))
    task = load_workflow(REPO / "workflows" / workflow, {"VN30_PROVIDER": str(provider)})["task"]
    task["model"]["kwargs"].update(model_kwargs)
    dataset = init_instance_by_config(task["dataset"])
    return init_instance_by_config(task["model"]), dataset, task


@pytest.mark.parametrize("workflow, model_kwargs", [
    ("lgb_vn30.yaml", {"num_boost_round": 20, "num_threads": 1}),
    ("lstm_vn30.yaml", {"n_epochs": 2, "hidden_size": 8, "n_threads": 1}),
])
def test_fit_and_early_stopping_read_no_label_of_a_later_segment(five_names, workflow, model_kwargs, tmp_path):
    """LightGBM early-stops on valid inside ``fit``, the LSTM scores valid every epoch: both read valid labels,
    none of which may read a test close, and no train label may read a valid close."""
    from qlib.data import D
    from qlib.workflow import R

    model, dataset, task = workflow_dataset(workflow, five_names, model_kwargs, tmp_path)
    reads = LabelReads(dataset.handler)
    with R.start(experiment_name="purge"):  # as under qrun: the models log their epochs to the recorder
        model.fit(dataset)
    segments = task["dataset"]["kwargs"]["segments"]
    calendar = pd.DatetimeIndex(D.calendar(freq="day"))
    assert_purged(reads.days, [(name, segments[name]) for name in ("train", "valid", "test")], calendar)
    assert max(reads.days) > pd.Timestamp(segments["valid"][0]), "early stopping read the valid labels"
    assert not any(day >= pd.Timestamp(segments["test"][0]) for day in reads.days), "fit never reads test labels"


def test_tuning_folds_read_no_label_of_a_later_fold_segment_or_of_test(five_names, tmp_path):
    """The tuner scores a trial by `cv.cross_validate` over `cv.folds_for`'s folds: each fold's fit, early
    stopping and score read no label whose closes fall in the fold's valid block (train) or in test (valid)."""
    from qlib.data import D
    from qlib.utils import init_instance_by_config

    from vn30_qlib.cv import cross_validate, fold_task, folds_for
    from vn30_qlib.loop import init_qlib_for, sqlite_tracking_uri

    tracking_uri = sqlite_tracking_uri(tmp_path)
    init_qlib_for(five_names, tracking_uri)
    task, folds = folds_for(REPO / "workflows" / "lgb_vn30.yaml", five_names, n_folds=2, valid_days=60)
    task["model"]["kwargs"].update(num_boost_round=20, num_threads=1)
    test = task["dataset"]["kwargs"]["segments"]["test"]
    calendar = pd.DatetimeIndex(D.calendar(freq="day"))
    for fold in folds:
        dataset = init_instance_by_config(fold_task(task, fold)["dataset"])
        reads = LabelReads(dataset.handler)
        cross_validate(task, [fold], tracking_uri, run_name="purge", dataset_cache={fold: dataset})
        assert_purged(reads.days, [("train", fold.train), ("valid", fold.valid), ("test", test)], calendar)


def test_the_shipped_segments_are_purged_by_the_label_s_reach(five_names):
    """Every shipped workflow's dataset builds (VN30DatasetH checks the purge) with a label reach of 2 days."""
    from qlib.data import D

    from vn30_qlib.loop import init_qlib_for
    from vn30_qlib.workflow_config import load_workflow

    init_qlib_for(five_names)
    calendar = pd.DatetimeIndex(D.calendar(freq="day"))
    for workflow in sorted((REPO / "workflows").glob("*_vn30.yaml")):
        task = load_workflow(workflow, {"VN30_PROVIDER": str(five_names)})["task"]
        check_purged(task["dataset"]["kwargs"]["segments"], calendar, REACH)
    assert label_reach(["Ref($close, -2) / Ref($close, -1) - 1"]) == 2
    assert label_reach(["Ref($close, -2) / Ref($close, -1) - 1", "Ref($close, -3) / Ref($close, -2) - 1"]) == 3


def test_unpurged_segments_are_refused_naming_the_latest_purged_end():
    calendar = pd.bdate_range("2022-01-03", "2022-02-28")
    purged = {"train": ("2022-01-03", "2022-01-12"), "valid": ("2022-01-17", "2022-01-31"),
              "test": ("2022-02-03", "2022-02-28")}
    check_purged(purged, calendar, REACH)  # train's last label (01-12) reads 01-13 and 01-14; valid opens 01-17
    with pytest.raises(SegmentError, match=re.escape(
            "segment 'train' is not purged from 'valid': the label of its last day 2022-01-13 reads the close of "
            "2022-01-17, and 'valid' starts 2022-01-17 (the label reads 2 trading days ahead); end 'train' on or "
            "before 2022-01-12")):
        check_purged({**purged, "train": ("2022-01-03", "2022-01-13")}, calendar, REACH)
    with pytest.raises(SegmentError, match=re.escape(
            "segment 'valid' is not purged from 'test': the label of its last day 2022-02-01 reads the close of "
            "2022-02-03, and 'test' starts 2022-02-03 (the label reads 2 trading days ahead); end 'valid' on or "
            "before 2022-01-31")):
        check_purged({**purged, "valid": ("2022-01-17", "2022-02-01")}, calendar, REACH)
    with pytest.raises(SegmentError, match="end 'train' on or before 2022-01-11"):
        check_purged(purged, calendar, 3)  # a three-day label needs one more day


def test_a_workflow_with_unpurged_segments_fails_before_fitting(five_names):
    """The dataset as qrun's task_train builds it, from a workflow whose valid runs to the last day of 2022."""
    from qlib.utils import init_instance_by_config

    from vn30_qlib.loop import init_qlib_for
    from vn30_qlib.workflow_config import load_workflow

    init_qlib_for(five_names)
    dataset = load_workflow(REPO / "workflows" / "lgb_vn30.yaml", {"VN30_PROVIDER": str(five_names)})["task"]["dataset"]
    dataset["kwargs"]["segments"]["valid"] = ["2022-01-01", "2022-12-31"]
    with pytest.raises(SegmentError, match=re.escape(
            "segment 'valid' is not purged from 'test': the label of its last day 2022-12-30 reads the close of "
            "2023-01-04, and 'test' starts 2023-01-03 (the label reads 2 trading days ahead); end 'valid' on or "
            "before 2022-12-28")):
        init_instance_by_config(dataset)
