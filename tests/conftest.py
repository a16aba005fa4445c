"""Shared fixtures: the real VN30 exports in ../shared (skipped when absent) and providers built from them."""
from __future__ import annotations

from pathlib import Path

import pytest

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
