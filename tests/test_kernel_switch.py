"""The CPU kernels' one switch (a model's ``cpu_kernels``, beaten by ``VN30_CPU_KERNELS``) changes speed, not the
model: a 2-epoch TFT and LSTM fit give the same predictions with the kernels on and off. Without a compiler the
package warns once, in one line, why and how to silence it; "on" there is an error."""
from __future__ import annotations

import logging
import subprocess
import sys
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from test_lstm import SMALL as LSTM_SMALL
from test_lstm import make_dataset
from test_tft import SHORT_SEGMENTS as TFT_SHORT_SEGMENTS
from test_tft import SMALL as TFT_SMALL
from test_tft import dataset as tft_dataset
from vn30_qlib.models import cpu_kernels
from vn30_qlib.models import training
from vn30_qlib.models.lstm import LSTM
from vn30_qlib.models.tft import TFT


@pytest.fixture
def logged_params(monkeypatch) -> list[dict]:
    """What a fit logs to a running recorder's params (as under qrun), without a recorder."""
    logged: list[dict] = []
    monkeypatch.setattr(training, "_recording", lambda: True)
    recorder = SimpleNamespace(log_params=lambda **params: logged.append(params), log_metrics=lambda **metrics: None)
    monkeypatch.setattr(training, "R", recorder)
    return logged


def test_the_environment_beats_the_kwarg_and_bad_values_are_refused(monkeypatch, built_kernels):
    monkeypatch.delenv("VN30_CPU_KERNELS", raising=False)
    assert cpu_kernels.resolve("auto") and cpu_kernels.resolve("on") and not cpu_kernels.resolve("off")
    monkeypatch.setenv("VN30_CPU_KERNELS", "0")
    assert not cpu_kernels.resolve("on") and not cpu_kernels.resolve("auto")
    monkeypatch.setenv("VN30_CPU_KERNELS", "1")
    assert cpu_kernels.resolve("off")
    monkeypatch.setenv("VN30_CPU_KERNELS", "yes")
    with pytest.raises(ValueError, match="VN30_CPU_KERNELS must be 0 .off. or 1 .on., got 'yes'"):
        cpu_kernels.resolve("auto")
    with pytest.raises(ValueError, match="cpu_kernels must be one of"):
        TFT(cpu_kernels="fast")
    with pytest.raises(ValueError, match="cpu_kernels must be one of"):
        LSTM(cpu_kernels=True)


def test_without_a_compiler_one_line_says_why_and_how_to_silence_it(monkeypatch, caplog):
    monkeypatch.setenv("CXX", "no-such-compiler-vn30")
    monkeypatch.delenv("VN30_CPU_KERNELS", raising=False)
    cpu_kernels.build.cache_clear()
    try:
        with caplog.at_level(logging.WARNING):
            assert cpu_kernels.build() is None and not cpu_kernels.enabled() and not cpu_kernels.resolve("auto")
        warnings = [record.getMessage() for record in caplog.records if "CPU kernels" in record.getMessage()]
        assert len(warnings) == 1 and "\n" not in warnings[0]
        assert "no C++ compiler found ('no-such-compiler-vn30' is not on PATH)" in warnings[0]
        assert "VN30_CPU_KERNELS=0 to silence" in warnings[0]
        with pytest.raises(RuntimeError, match="cannot run here: no C\\+\\+ compiler found"):
            cpu_kernels.resolve("on")
        monkeypatch.setenv("VN30_CPU_KERNELS", "0")
        assert not cpu_kernels.resolve("on")  # the environment's 0 beats "on": no error
    finally:
        cpu_kernels.build.cache_clear()


def test_an_unsupported_platform_says_so(monkeypatch):
    monkeypatch.setattr(cpu_kernels.sys, "platform", "win32")
    assert cpu_kernels.unavailable_reason().startswith("unsupported platform 'win32'")


def fit_and_predict(model, data) -> tuple[dict[str, torch.Tensor], np.ndarray]:
    model.fit(data)
    return {k: v.clone() for k, v in model.module.state_dict().items()}, model.predict(data).to_numpy()


@pytest.mark.parametrize("which", ["tft", "lstm"])
def test_the_same_seed_fits_the_same_model_with_the_kernels_on_and_off(which, sim_provider, built_kernels,
                                                                          logged_params):
    """Two epochs on the simulated market: predictions agree to float32 rounding, and so do the weights, as far
    as Adam's step (the gradient over its running scale) lets rounding through where a gradient is tiny: up to 1e-3 in
    the static embeddings (different dropout masks, before, moved weights by 1e-2 to 1e-1). The LSTM's only kernel
    is its dropout: there bit for bit. Each fit logs which way it ran."""
    if which == "tft":  # what is compared is the arithmetic, not the skill
        data = tft_dataset(sim_provider(0.1), segments=TFT_SHORT_SEGMENTS)
        make = lambda setting: TFT(**TFT_SMALL, cpu_kernels=setting)
    else:
        data = make_dataset(sim_provider(0.1))
        make = lambda setting: LSTM(**{**LSTM_SMALL, "num_layers": 2}, n_epochs=2, dropout=0.3, cpu_kernels=setting)
    on_weights, on_pred = fit_and_predict(make("on"), data)
    off_weights, off_pred = fit_and_predict(make("off"), data)
    assert [params["cpu_kernels_used"] for params in logged_params] == ["on", "off"]
    if which == "lstm":
        np.testing.assert_array_equal(on_pred, off_pred)
    else:
        np.testing.assert_allclose(on_pred, off_pred, rtol=1e-3, atol=1e-4)
        assert np.corrcoef(on_pred, off_pred)[0, 1] > 0.9999
    for name, weight in on_weights.items():
        torch.testing.assert_close(off_weights[name], weight, rtol=1e-2, atol=2e-3, msg=name)


def test_the_build_is_kept_per_cpu_torch_and_checkout(monkeypatch, tmp_path):
    """Two checkouts sharing a home folder keep two builds (torch's build file names the sources by path, so one
    would rebuild the other's), and the key still follows the CPU's flags."""
    kind = cpu_kernels._build_kind()
    monkeypatch.setattr(cpu_kernels, "SOURCES", [tmp_path / "csrc" / "bindings.cpp"])
    assert cpu_kernels._build_kind() != kind
    monkeypatch.setattr(cpu_kernels, "Path", lambda path: tmp_path / "cpuinfo")
    (tmp_path / "cpuinfo").write_text("flags\t\t: fpu sse2 avx2\n")
    first = cpu_kernels._build_kind()
    (tmp_path / "cpuinfo").write_text("flags\t\t: fpu sse2 avx2 avx512f\n")
    assert cpu_kernels._build_kind() != first


def test_a_build_killed_halfway_does_not_stall_the_next_load(built_kernels):
    """torch guards a build with a plain `lock` file, which a process killed mid-build leaves behind; the next
    load clears it instead of waiting for it forever (seen: a fit asleep for minutes after a killed first fit)."""
    folder = cpu_kernels.build_folder(f"vn30_cpu_kernels_{cpu_kernels._build_kind()}")
    (folder / "lock").write_text("")
    load = "from vn30_qlib.models import cpu_kernels; assert cpu_kernels.build() is not None"
    result = subprocess.run([sys.executable, "-c", load], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-3000:]
    assert not (folder / "lock").exists()
