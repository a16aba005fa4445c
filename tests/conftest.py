"""Shared fixtures: the real VN30 exports in ../shared (skipped when absent) and providers built from them; helpers
the tests share."""
from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Callable, Sequence

# Under pytest-xdist (`-n 2`, the README's command) the workers share the cores: one thread each, set before torch
# is imported, keeps each fit (and the qrun/loop processes a test starts, which inherit it) from spinning OpenMP
# threads against the other worker's (BENCHMARKS.md: two fits on all cores ran 3.4x slower each).
if "PYTEST_XDIST_WORKER" in os.environ:
    os.environ.setdefault("OMP_NUM_THREADS", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

SHARED_VN30 = Path(__file__).resolve().parents[2] / "shared" / "data" / "vn30"


@pytest.fixture(scope="session")
def shared_vn30() -> Path:
    if not (SHARED_VN30 / "prices").is_dir():
        pytest.skip(f"real VN30 exports not found at {SHARED_VN30} (../shared is only beside the project checkout)")
    return SHARED_VN30


@pytest.fixture(scope="session")
def real_provider(shared_vn30: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A provider ingested from the shared exports plus the VN30 index."""
    from vn30_qlib.data.ingest import ingest

    out = tmp_path_factory.mktemp("real") / "provider"
    ingest(shared_vn30 / "prices", out, index_file=shared_vn30 / "index" / "VN30.csv")
    return out


@pytest.fixture(scope="session")
def sim_provider(tmp_path_factory: pytest.TempPathFactory):
    """Simulated markets by planted signal strength, built once per session: ``sim_provider(0.1)``."""
    from vn30_qlib.data.simulate import write_simulated_provider

    built: dict[float, Path] = {}

    def build(signal: float) -> Path:
        if signal not in built:
            built[signal] = write_simulated_provider(tmp_path_factory.mktemp(f"sim_{signal}") / "provider", seed=0, signal=signal)
        return built[signal]

    return build


@pytest.fixture(scope="session")
def built_kernels():
    """The CPU kernels, for the tests that compare them with torch's ops: on Linux with a C++ compiler a failed
    build fails the test (CI must notice a broken build); without a compiler or on another platform it skips,
    saying why."""
    from vn30_qlib.models import cpu_kernels

    reason = cpu_kernels.unavailable_reason()
    if reason is not None:
        pytest.skip(f"the CPU kernels cannot build here: {reason}")
    kernels = cpu_kernels.build()
    if kernels is None and sys.platform == "linux":
        pytest.fail(f"the CPU kernels failed to build: {cpu_kernels.build_error()}")
    if kernels is None:
        pytest.skip(f"the CPU kernels did not build on {sys.platform}: {cpu_kernels.build_error()}")
    return kernels


# Eight Alpha158 features, the simulator's planted K-bar ones among them: Qlib computes them in a tenth of the time
# of all 158, for the tests of the loop, store and CLI, which are not about the feature set.
FEW_FEATURES = ("    dataset:\n        kwargs:\n            handler:\n                kwargs:\n                    features: "
                "[KMID, KLEN, KUP, KLOW, KSFT, ROC5, STD20, VSTD5]\n")


def small_lgb_workflow(folder: Path, rounds: int = 30) -> Path:
    """lgb_vn30.yaml with ``rounds`` boosting rounds on `FEW_FEATURES`: a user's small variant."""
    return write_workflow(folder, "lgb_vn30.yaml",
                          {"            loss: mse\n": f"            loss: mse\n            num_boost_round: {rounds}\n"}, FEW_FEATURES)


def write_workflow(folder: Path, name: str, replace: dict[str, str] | None = None, append: str = "") -> Path:
    """A copy of ``workflows/{name}`` in ``folder`` (its base config found by absolute path), with text
    replacements and an appended YAML tail: a user's own variant of a shipped workflow."""
    text = (REPO / "workflows" / name).read_text()
    text = text.replace("BASE_CONFIG_PATH: base_vn30.yaml", f"BASE_CONFIG_PATH: {REPO / 'workflows' / 'base_vn30.yaml'}")
    for old, new in (replace or {}).items():
        assert old in text, f"{name} has no {old!r}"
        text = text.replace(old, new)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / name
    path.write_text(text + append)
    return path


def run_qrun(workflow: str | Path, provider: Path, workdir: Path, experiment: str, extra_env: dict | None = None):
    """Run ``qrun workflows/{workflow}`` (or ``qrun {workflow}`` for a path) as a user would, in ``workdir``;
    return the run's recorder."""
    import os
    import subprocess
    import sys

    from qlib.workflow import R

    from vn30_qlib.loop import init_qlib_for, sqlite_tracking_uri

    env = {**os.environ, "VN30_PROVIDER": str(provider), "VN30_EXPERIMENT": experiment, **(extra_env or {})}
    qrun = Path(sys.executable).parent / "qrun"
    path = workflow if isinstance(workflow, Path) else REPO / "workflows" / workflow
    result = subprocess.run([str(qrun), str(path)], cwd=workdir, env=env,
                            capture_output=True, text=True, timeout=1200)
    assert result.returncode == 0, f"qrun failed:\n{result.stdout[-3000:]}\n{result.stderr[-6000:]}"
    init_qlib_for(provider, sqlite_tracking_uri(workdir))
    recorders = R.list_recorders(experiment_name=experiment)
    assert len(recorders) == 1
    return next(iter(recorders.values()))


REPO = Path(__file__).resolve().parents[1]


def same_on_one_and_two_threads(run: Callable[[], Sequence[torch.Tensor]]) -> None:
    """Assert ``run()`` gives the same tensors bit for bit with torch on 1 thread and on 2 (the CPU kernels'
    promise); torch's thread count is restored after."""
    threads = torch.get_num_threads()
    results = []
    try:
        for n in (1, 2):
            torch.set_num_threads(n)
            results.append(run())
    finally:
        torch.set_num_threads(threads)
    for one, two in zip(*results):
        assert torch.equal(one, two)


# The files with the longest tests, first (measured under `-n 2`). With `--dist loadfile` xdist hands out whole
# files in collection order, each worker holding the next one queued, so these start early and the two workers
# finish together instead of one waiting while the other runs a long test that sorted last (a 2-minute file listed
# late ended two runs with one worker alone).
SLOWEST_FILES = ("test_loop.py", "test_executors.py", "test_tft.py", "test_rolling.py", "test_lgb_workflow.py",
                 "test_faults_store.py", "test_lstm.py", "test_workflow_faults.py", "test_cv_tune.py", "test_cli.py",
                 "test_seed_ensemble.py", "test_model_ensemble.py")


def pytest_collection_modifyitems(items: list) -> None:
    def rank(item) -> int:
        name = item.path.name
        return SLOWEST_FILES.index(name) if name in SLOWEST_FILES else len(SLOWEST_FILES)

    items.sort(key=rank)  # stable: the order within a file, and of the other files, is kept
