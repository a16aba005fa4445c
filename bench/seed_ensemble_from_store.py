"""What a seed ensemble of a model gives, from the single-seed fits a `vn30-qlib loop --seeds` already stored.

    python bench/seed_ensemble_from_store.py --store /work/loop5/models --model tft --members 0,1,2 [--against lgb]

A `SeedEnsemble` predicts the mean of its members' predictions, and its member of seed s is the model fitted with
seed s (``workflows/tft_ensemble_vn30.yaml``: the TFT of ``tft_vn30.yaml``): so the mean of the stored pooled
predictions of ``{model}.seed{s}`` for the member seeds is that ensemble's test prediction, without refitting.
Prints its daily cross-sectional metrics (no backtest) and the paired difference of its daily Rank IC against the
seed-averaged daily Rank IC of ``--against`` (the report's convention).
"""
from __future__ import annotations

import argparse
from pathlib import Path

import pandas as pd

from vn30_qlib import store
from vn30_qlib.metrics import cross_sectional_metrics, daily_rank_ic, paired_difference


def stored_predictions(root: Path, model: str, seed: int | None) -> pd.DataFrame:
    """The pooled test predictions of ``model`` fitted with ``seed`` (None: the entry fitted without --seeds)."""
    entry = model if seed is None else f"{model}.seed{seed}"
    version = store.latest(root / "pooled" / entry)
    if version is None:
        raise SystemExit(f"error: {root}: no pooled {entry} stored")
    return store.read_predictions(version, store.read_metadata(version))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--store", required=True, help="a model store filled by vn30-qlib loop --seeds")
    parser.add_argument("--model", default="tft", help="the stored model (default: %(default)s)")
    parser.add_argument("--members", default="0,1,2", help="member seeds, comma-separated (default: %(default)s)")
    parser.add_argument("--against", default="alpha158_lgb", help="model to pair with (default: %(default)s)")
    parser.add_argument("--seeds", default="0,1,2,3,4",
                        help="seeds of --against; '' for an entry fitted without seeds (default: %(default)s)")
    args = parser.parse_args()
    root = Path(args.store)
    members = [stored_predictions(root, args.model, int(seed)) for seed in args.members.split(",")]
    label = members[0]["label"]
    ensemble = pd.concat([member["score"] for member in members], axis=1).mean(axis=1)
    metrics = cross_sectional_metrics(ensemble, label)
    reference = pd.concat([daily_rank_ic(p["score"], p["label"]) for p in
                           (stored_predictions(root, args.against, s) for s in
                            [int(s) for s in args.seeds.split(",") if s] or [None])],
                          axis=1).mean(axis=1)
    difference = paired_difference(daily_rank_ic(ensemble, label), reference)
    print(f"{args.model} seeds {args.members} averaged: " + ", ".join(f"{k} {v:.4f}" for k, v in metrics.items()
                                                                      if isinstance(v, float)))
    print(f"minus {args.against} (seeds {args.seeds}, daily Rank IC averaged): mean {difference['mean']:.4f}, "
          f"t {difference['t']:.2f} over {difference['days']} days")


if __name__ == "__main__":
    main()
