"""Silent nonsense in a `qrun` workflow becomes a message: a misspelt model kwarg, predictions that are constant
on most test days, a segment without a labelled day (issue 20, item 7). Each case runs `qrun` as a user does."""
from __future__ import annotations

import hashlib
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import REPO, write_workflow

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


def qrun(workflow: Path, provider: Path, workdir: Path, extra_env: dict | None = None) -> subprocess.CompletedProcess:
    """``qrun workflow`` in ``workdir``, as a user runs it; the provider must come out byte for byte the same."""
    before = file_hashes(provider)
    env = {**os.environ, "VN30_PROVIDER": str(provider), "VN30_EXPERIMENT": "faults", "OMP_NUM_THREADS": "1",
           **(extra_env or {})}
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

    result = qrun(REPO / "workflows" / "lgb_vn30.yaml", five_names, tmp_path)
    assert result.returncode == 0, result.stderr[-4000:]
    assert ("predictions are constant on 100% of test days: the model learnt nothing (check its regularisation "
            "and the number of instruments: at most 5 a day)") in result.stderr
    init_qlib_for(five_names, sqlite_tracking_uri(tmp_path))
    recorder = next(iter(R.list_recorders(experiment_name="faults").values()))
    assert recorder.list_metrics()["degenerate"] == 1.0


def test_a_test_segment_after_the_provider_s_last_day_is_an_error_before_fitting(tmp_path):
    provider = make_provider(tmp_path / "provider", "2021-01-01", "2022-06-30")
    result = qrun(REPO / "workflows" / "lgb_vn30.yaml", provider, tmp_path / "run")
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
            "segment 'valid' [2022-01-01, 2022-12-31] has no day with a label (labelled days run 2021-01-04 .. "
            "2021-12-31; the provider's last day is 2022-01-05")):
        init_instance_by_config(dataset)
    assert file_hashes(provider) == before
