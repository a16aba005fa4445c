"""SeedEnsemble: the mean of its members fitted alone, one checkpoint folder and one metric name per member, a pickle
that predicts the same, and clear errors for bad configs (``workflows/tft_ensemble_vn30.yaml`` itself is fitted by
tests/test_loop.py and stored and reloaded by tests/test_faults_store.py)."""
from __future__ import annotations

import pickle
from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest

from test_tft import SHORT_SEGMENTS, SMALL, dataset, rank_ic
from vn30_qlib.models import training
from vn30_qlib.models.seed_ensemble import SeedEnsemble
from vn30_qlib.models.tft import TFT

TFT_CONFIG = {"class": "TFT", "module_path": "vn30_qlib.models.tft", "kwargs": SMALL}


def test_the_ensemble_is_the_mean_of_its_members_fitted_alone(sim_provider, tmp_path, monkeypatch):
    data = dataset(sim_provider(0.1), segments=SHORT_SEGMENTS)
    config = {**TFT_CONFIG, "kwargs": {**SMALL, "checkpoint_dir": str(tmp_path / "checkpoints")}}
    ensemble = SeedEnsemble(config, seeds=[0, 1])
    logged: dict[str, float] = {}  # what the members log to a running recorder (as under qrun), without one
    monkeypatch.setattr(training, "_recording", lambda: True)
    monkeypatch.setattr(training, "R", SimpleNamespace(log_params=lambda **params: None,
                                                       log_metrics=lambda step, **metrics: logged.update(metrics)))
    ensemble.fit(data)
    monkeypatch.undo()
    assert {"seed0/valid_ic", "seed1/valid_ic", "seed1/train_loss"} <= set(logged)
    assert "valid_ic" not in logged  # every member's epochs under its own name
    members = [member.predict(data) for member in ensemble.members]
    assert not np.allclose(members[0], members[1])  # each member got its own seed
    alone = TFT(**SMALL, seed=1)  # the second member, fitted on its own: the ensemble passed it nothing else
    alone.fit(data)
    np.testing.assert_array_equal(members[1].to_numpy(), alone.predict(data).to_numpy())
    predicted = ensemble.predict(data)
    pd.testing.assert_index_equal(predicted.index, members[0].index)
    np.testing.assert_allclose(predicted.to_numpy(), (members[0] + members[1]).to_numpy() / 2, rtol=1e-6, atol=1e-7)
    assert rank_ic(ensemble, data) > 0.05  # the planted signal, as each member finds it
    # one checkpoint folder per member, and the pickle predicts the same
    assert sorted(path.name for path in (tmp_path / "checkpoints").iterdir()) == ["seed0", "seed1"]
    assert (tmp_path / "checkpoints" / "seed1" / "tft.pt").is_file()
    reloaded = pickle.loads(pickle.dumps(ensemble))
    np.testing.assert_array_equal(reloaded.predict(data).to_numpy(), predicted.to_numpy())


def test_bad_configs_are_refused():
    with pytest.raises(ValueError, match="must be a Qlib model config"):
        SeedEnsemble({"module_path": "vn30_qlib.models.tft"})
    for seeds in ([], [0, 0], [0.5]):
        with pytest.raises(ValueError, match="seeds must be distinct integers"):
            SeedEnsemble(TFT_CONFIG, seeds=seeds)
    with pytest.raises(ValueError, match="fit the ensemble before predict"):
        SeedEnsemble(TFT_CONFIG).predict(None)
    with pytest.raises(TypeError, match="LinearModel must take a 'seed' argument"):  # when built, before any data
        SeedEnsemble({"class": "LinearModel", "module_path": "qlib.contrib.model.linear", "kwargs": {}})
