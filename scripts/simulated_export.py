"""Example: the simulated market as a vendor's export, one {SYMBOL}.csv per symbol, as it stood on the evening of
a day (the "Every evening" walk-through in README.md feeds these to `vn30-qlib data ingest` / `data update`).

    python scripts/simulated_export.py export_2024-09-20 2024-09-20
"""
import sys
from pathlib import Path

from vn30_qlib.data.simulate import simulate_market

out, until = Path(sys.argv[1]), sys.argv[2]
out.mkdir(parents=True, exist_ok=False)  # a new folder: never writes into one that exists
bars, _, _ = simulate_market(seed=0, signal=0.1)
for symbol, frame in bars.items():
    frame.loc[:until].rename_axis("time").to_csv(out / f"{symbol}.csv")
print(f"wrote {len(bars)} exports up to {until} into {out}")
