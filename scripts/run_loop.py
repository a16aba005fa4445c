"""Example: the symbol loop from a script, then the report (same as `vn30-qlib loop ... && vn30-qlib report`).

    python scripts/run_loop.py ~/.qlib/qlib_data/vn30_real
"""
import sys

from vn30_qlib.loop import run_loop
from vn30_qlib.report import build_report

provider = sys.argv[1] if len(sys.argv) > 1 else "~/.qlib/qlib_data/vn30_sim"
results = run_loop(["workflows/lgb_vn30.yaml"], provider, store_root="models", jobs=2)
print(sum(r["status"] == "failed" for r in results), "failed entries")
build_report("models")
