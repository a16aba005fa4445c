"""Silent nonsense in a `qrun` workflow becomes a message: a misspelt model kwarg, predictions that are constant
on most test days, a segment without a labelled day (issue 20, item 7). Each case runs `qrun` as a user does, or
builds what qrun's ``task_train`` builds first (the model, the dataset) from the workflow as qrun reads it."""
from __future__ import annotations

import hashlib
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import FEW_FEATURES, REPO, write_workflow

FIVE_NAMES = 5


def make_provider(out: Path, start: str, end: str) -> Path:
    """A simulated provider of the first `FIVE_NAMES` symbols from ``start`` to ``end``."""
    from vn30_qlib.data.provider import write_provider
    from vn30_qlib.data.simulate import simulate_market

    bars, calendar, _ = simulate_market(seed=0, signal=0.1, start=start, end=end)
    symbols = sorted(bars)[:FIVE_NAMES]
    return write_provider(out, {s: bars[s] for s in symbols}, calendar, markets={"vn30": symbols, "all": symbols})


@pytest.fixture(scope="module")
def five_names(tmp_path_factory) -> Path:
    """Five symbols, 2021 to the shipped workflows' last day: every segment has data."""
    return make_provider(tmp_path_factory.mktemp("five") / "provider", "2021-01-01", "2024-09-30")


def file_hashes(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def qrun(workflow: Path, provider: Path, workdir: Path) -> subprocess.CompletedProcess:
    """``qrun workflow`` in ``workdir``, as a user runs it; the provider must come out byte for byte the same."""
    before = file_hashes(provider)
    env = {**os.environ, "VN30_PROVIDER": str(provider), "VN30_EXPERIMENT": "faults", "OMP_NUM_THREADS": "1"}
    workdir.mkdir(parents=True, exist_ok=True)
    result = subprocess.run([str(Path(sys.executable).parent / "qrun"), str(workflow)], cwd=workdir, env=env,
                            capture_output=True, text=True, timeout=600)
    assert file_hashes(provider) == before
    return result


MISSPELT = {  # workflow: (its line, the line misspelt, the message)
    "lgb_vn30.yaml": ("            num_leaves: 210\n", "            num_leavs: 210\n",
                      "LGBModel: unknown kwarg 'num_leavs' (did you mean 'num_leaves'?)"),
    "lstm_vn30.yaml": ("            hidden_size: 64\n", "            hiden_size: 64\n",
                       "LSTM: unknown kwarg 'hiden_size' (did you mean 'hidden_size'?)"),
    "tft_vn30.yaml": ("            early_stop: 10\n", "            early_stopping: 10\n",
                      "TFT: unknown kwarg 'early_stopping' (did you mean 'early_stop'?)"),
    "tft_ensemble_vn30.yaml": ("                    average_best: 5\n", "                    avg_best: 5\n",
                               "TFT: unknown kwarg 'avg_best' (did you mean 'average_best'?)"),
}


def test_qrun_stops_at_a_misspelt_lightgbm_kwarg_naming_the_nearest_key(five_names, tmp_path):
    line, misspelt, message = MISSPELT["lgb_vn30.yaml"]
    result = qrun(write_workflow(tmp_path / "wf", "lgb_vn30.yaml", {line: misspelt}), five_names, tmp_path / "run")
    assert result.returncode == 1, result.stdout[-2000:] + result.stderr[-2000:]
    assert message in result.stderr
    assert "Loading data" not in result.stderr  # refused before any data is read


@pytest.mark.parametrize("workflow", sorted(MISSPELT))
def test_every_workflow_model_names_the_nearest_key_of_a_misspelt_kwarg(tmp_path, workflow):
    """The model as qrun's task_train builds it first, from the workflow as qrun reads it."""
    from qlib.utils import init_instance_by_config

    from vn30_qlib.workflow_config import load_workflow

    line, misspelt, message = MISSPELT[workflow]
    model = load_workflow(write_workflow(tmp_path, workflow, {line: misspelt}))["task"]["model"]
    with pytest.raises(TypeError, match=re.escape(message)):
        init_instance_by_config(model)
    init_instance_by_config(load_workflow(REPO / "workflows" / workflow)["task"]["model"])  # the shipped one builds


def test_lightgbm_aliases_and_qlib_kwargs_are_accepted():
    from vn30_qlib.models.lgb import LGBModel

    model = LGBModel(loss="mse", num_boost_round=10, early_stopping_rounds=5, max_leaves=7, reg_alpha=1.0,
                     min_child_samples=3, num_threads=1)
    assert model.params["max_leaves"] == 7 and model.num_boost_round == 10


def test_constant_predictions_on_most_test_days_are_reported(five_names, tmp_path):
    """lgb_vn30.yaml's regularisation (lambda_l1 205, lambda_l2 581) on five names: no split is worth it, so
    every test day gets one score; Qlib alone prints IC nan and runs the backtest."""
    from qlib.workflow import R

    from vn30_qlib.loop import init_qlib_for, sqlite_tracking_uri

    workflow = write_workflow(tmp_path / "wf", "lgb_vn30.yaml", append=FEW_FEATURES)  # the regularisation is the point
    result = qrun(workflow, five_names, tmp_path)
    assert result.returncode == 0, result.stderr[-4000:]
    assert ("predictions are constant on 100% of test days: the model learnt nothing (check its regularisation "
            "and the number of instruments: at most 5 a day)") in result.stderr
    assert "ConstantInputWarning" not in result.stderr  # said once, not once per test day
    init_qlib_for(five_names, sqlite_tracking_uri(tmp_path))
    recorder = next(iter(R.list_recorders(experiment_name="faults").values()))
    assert recorder.list_metrics()["degenerate"] == 1.0


def test_constant_day_share_counts_days_with_one_score_for_every_name():
    import pandas as pd

    from vn30_qlib.records import constant_day_share

    index = pd.MultiIndex.from_product([pd.bdate_range("2024-01-01", periods=4), ["A", "B", "C"]],
                                       names=["datetime", "instrument"])
    pred = pd.Series([0.1, 0.1, 0.1, 0.2, 0.2, 0.2, 0.0, 0.5, 1.0, 0.3, 0.3, 0.3], index=index)
    label = pd.Series(range(12), index=index, dtype=float)
    assert constant_day_share(pred, label) == 0.75
    one_name = pred.xs("C", level="instrument", drop_level=False)
    assert constant_day_share(one_name, label) == 1.0  # a day with a single name is constant


def test_a_test_segment_after_the_provider_s_last_day_is_an_error_before_fitting(tmp_path):
    provider = make_provider(tmp_path / "provider", "2021-01-01", "2022-06-30")
    result = qrun(write_workflow(tmp_path / "wf", "lgb_vn30.yaml", append=FEW_FEATURES), provider, tmp_path / "run")
    assert result.returncode == 1
    assert ("segment 'test' [2023-01-01, 2024-09-26] starts after the provider's last day 2022-06-30: nothing to "
            "fit or predict there (labelled days run 2021-01-04 .. 2022-06-28)") in result.stderr
    assert "Training until validation scores" not in result.stdout + result.stderr  # LightGBM never started


def test_a_valid_segment_without_a_labelled_day_is_an_error(tmp_path):
    """The provider ends two trading days into the valid year: those days have no label (it needs two more
    closes), so valid holds data but nothing to score. The dataset as qrun's task_train builds it."""
    from qlib.utils import init_instance_by_config

    from vn30_qlib.data.check import init_qlib
    from vn30_qlib.dataset import SegmentError
    from vn30_qlib.workflow_config import load_workflow

    provider = make_provider(tmp_path / "provider", "2021-01-01", "2022-01-05")
    before = file_hashes(provider)
    init_qlib(provider)
    dataset = load_workflow(REPO / "workflows" / "lgb_vn30.yaml")["task"]["dataset"]
    with pytest.raises(SegmentError, match=re.escape(
            "segment 'valid' [2022-01-01, 2022-12-28] has no day with a label (labelled days run 2021-01-04 .. "
            "2021-12-31; the provider's last day is 2022-01-05")):
        init_instance_by_config(dataset)
    assert file_hashes(provider) == before


def test_segment_messages_name_the_segment_its_dates_and_the_data_s_days():
    import pandas as pd

    from vn30_qlib.dataset import SegmentError, check_segments

    calendar = pd.bdate_range("2022-01-03", "2022-01-14")
    index = pd.MultiIndex.from_product([calendar, ["A", "B"]], names=["datetime", "instrument"])
    label = pd.DataFrame({"LABEL0": [1.0] * 16 + [float("nan")] * 4}, index=index)  # the last 2 days unlabelled
    check_segments({"train": ("2022-01-03", "2022-01-07"), "test": slice("2022-01-10", None), "all": (None, None)},
                   label, calendar)
    with pytest.raises(SegmentError, match=re.escape("segment 'all' [open, open] has no day with a label (no day has")):
        check_segments({"all": (None, None)}, label.iloc[:0], calendar)
    cases = {
        ("2022-02-01", "2022-03-01"): "segment 'test' [2022-02-01, 2022-03-01] starts after the provider's last day "
                                      "2022-01-14: nothing to fit or predict there (labelled days run 2022-01-03 .. "
                                      "2022-01-12)",
        ("2021-01-01", "2021-12-31"): "segment 'test' [2021-01-01, 2021-12-31] ends before the provider's first day "
                                      "2022-01-03",
        ("2022-01-13", None): "segment 'test' [2022-01-13, open] has no day with a label (labelled days run "
                              "2022-01-03 .. 2022-01-12; the provider's last day is 2022-01-14",
    }
    for (start, end), message in cases.items():
        with pytest.raises(SegmentError, match=re.escape(message)):
            check_segments({"train": ("2022-01-03", "2022-01-07"), "test": (start, end)}, label, calendar)
