"""What the TFT relies on: each past input's permutation importance (`TFT.permutation_importance`: the drop of the
mean daily Rank IC when that input is shuffled) on the valid and test segments, for stored pooled TFT fits, beside
the mean past selection weights that the TFT's diagnostics used to call its importance.

    python bench/tft_importance.py --store /work/loop5/models --seeds 0,1,2 [--repeats 1]

Prints, per input: the selection weight (valid, mean over the fits), the Rank IC drop and its t on valid and on
test (mean over the fits; the t of the drop averaged over the fits' daily series is not computed: each fit's t is
averaged), largest test drop first.
"""
from __future__ import annotations

import argparse
from pathlib import Path

import pandas as pd
from qlib.utils import init_instance_by_config

from vn30_qlib import store
from vn30_qlib.loop import init_qlib_for


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--store", required=True, help="a model store with pooled tft.seed{s} entries")
    parser.add_argument("--model", default="tft", help="the stored TFT entry (default: %(default)s)")
    parser.add_argument("--seeds", default="0,1,2", help="seeds of the fits, comma-separated (default: %(default)s)")
    parser.add_argument("--repeats", type=int, default=1, help="shuffles per input (default: %(default)s)")
    args = parser.parse_args()
    tables = []
    for seed in (int(s) for s in args.seeds.split(",")):
        version = store.latest(Path(args.store) / "pooled" / f"{args.model}.seed{seed}")
        if version is None:
            raise SystemExit(f"error: {args.store}: no pooled {args.model}.seed{seed} stored")
        model, task, _, metadata = store.load(version)
        store.require_trusted_classes(task["dataset"], version / "config.yaml")
        init_qlib_for(metadata["provider"]["path"])
        dataset = init_instance_by_config(task["dataset"])
        columns = {"selection_valid": model.importance["past"]}
        for segment in ("valid", "test"):
            table = model.permutation_importance(dataset, segment, repeats=args.repeats)
            columns[f"drop_{segment}"], columns[f"t_{segment}"] = table["rank_ic_drop"], table["t"]
        tables.append(pd.DataFrame(columns))
        print(f"seed {seed}: done", flush=True)
    mean = sum(tables) / len(tables)
    print(f"{args.model} seeds {args.seeds}, {args.repeats} shuffle(s) per input; mean over the fits:")
    print(mean.sort_values("drop_test", ascending=False).round(4).to_string())


if __name__ == "__main__":
    main()
