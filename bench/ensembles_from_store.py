"""What the seed ensemble and the cross-model ensemble give, from the single-seed fits `vn30-qlib loop --seeds`
already stored, without refitting.

    python bench/ensembles_from_store.py --store /work/loop5/models seed --model tft --ensembles 0,1,2,3,4
    python bench/ensembles_from_store.py --store /work/loop5/models model --members lgb,lstm,tft --seeds 0,1,2,3,4

``seed``: a `SeedEnsemble` predicts the mean of its members' predictions, and its member of seed s is the model
fitted with seed s (``workflows/tft_ensemble_vn30.yaml``: the TFT of ``tft_vn30.yaml``); the loop's ensemble of
seed e has members 3e, 3e+1, 3e+2 (`vn30_qlib.loop`), so ``--ensembles 0,1,2,3,4`` needs the single fits of seeds
0-14. ``model``: a `ModelEnsemble` (``workflows/ensemble_vn30.yaml``) of seed s fits each member, the model of its
single workflow, with seed s, and averages their per-day z-scores (`daily_zscores`) with equal weights; a member
whose valid Rank IC is not above 0 would be dropped (``select_on_valid``): this script keeps every member, so
check their valid scores (the loop's fit of ensemble_vn30.yaml logs them) before reading it as that workflow.

Prints each ensemble's daily cross-sectional test metrics and the excess returns of its workflow's own backtest
(`vn30_qlib.loop.run_backtest` on the ensemble's predictions, as `vn30-qlib loop --backtest` runs it; the
recorder runs go to a temporary folder), their mean ± sd, and the paired difference of the ensembles'
seed-averaged daily Rank IC against the seed-averaged daily Rank IC of ``--against`` (the report's convention).
"""
from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import pandas as pd
from qlib.workflow import R

from vn30_qlib import store
from vn30_qlib.loop import adapt_task, init_qlib_for, run_backtest, sqlite_tracking_uri
from vn30_qlib.workflow_config import load_workflow

REPO = Path(__file__).resolve().parents[1]
WORKFLOWS = {"seed": "tft_ensemble_vn30.yaml", "model": "ensemble_vn30.yaml"}  # whose backtest each kind runs
from vn30_qlib.metrics import cross_sectional_metrics, daily_rank_ic, paired_difference
from vn30_qlib.models.model_ensemble import daily_zscores


def stored_provider(root: Path, model: str, seed: int | None) -> str:
    entry = model if seed is None else f"{model}.seed{seed}"
    return store.read_metadata(store.latest(root / "pooled" / entry))["provider"]["path"]


def stored_predictions(root: Path, model: str, seed: int | None) -> pd.DataFrame:
    """The pooled test predictions of ``model`` fitted with ``seed`` (None: the entry fitted without --seeds)."""
    entry = model if seed is None else f"{model}.seed{seed}"
    version = store.latest(root / "pooled" / entry)
    if version is None:
        raise SystemExit(f"error: {root}: no pooled {entry} stored")
    return store.read_predictions(version, store.read_metadata(version))


def member_seeds(ensemble_seed: int, size: int = 3) -> list[int]:
    """The member seeds of the loop's seed ensemble of ``ensemble_seed`` (`vn30_qlib.loop.adapt_task`)."""
    task = {"model": {"class": "SeedEnsemble", "kwargs": {"seeds": list(range(size))}}}
    return adapt_task(task, "pooled", None, seed=ensemble_seed)["model"]["kwargs"]["seeds"]


def seed_ensemble(root: Path, model: str, ensemble_seed: int) -> tuple[str, pd.Series, pd.Series]:
    members = member_seeds(ensemble_seed)
    predictions = [stored_predictions(root, model, seed) for seed in members]
    score = pd.concat([p["score"] for p in predictions], axis=1).mean(axis=1)
    return f"{model} seeds {members}", score, predictions[0]["label"]


def model_ensemble(root: Path, members: list[str], seed: int) -> tuple[str, pd.Series, pd.Series]:
    predictions = {name: stored_predictions(root, name, seed) for name in members}
    scores = pd.concat({name: p["score"] for name, p in predictions.items()}, axis=1, join="inner")
    return f"{'+'.join(members)} seed {seed}", daily_zscores(scores).mean(axis=1), predictions[members[0]]["label"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--store", required=True, help="a model store filled by vn30-qlib loop --seeds")
    parser.add_argument("--against", default="alpha158_lgb", help="model to pair with (default: %(default)s)")
    parser.add_argument("--against-seeds", default="0,1,2,3,4",
                        help="seeds of --against; '' for an entry fitted without seeds (default: %(default)s)")
    kinds = parser.add_subparsers(dest="kind", required=True)
    seed = kinds.add_parser("seed", help="seed ensembles of one model")
    seed.add_argument("--model", default="tft", help="the stored model (default: %(default)s)")
    seed.add_argument("--ensembles", default="0", help="the loop's ensemble seeds, comma-separated; ensemble e "
                      "averages the single fits of seeds 3e..3e+2 (default: %(default)s)")
    model = kinds.add_parser("model", help="the cross-model ensemble")
    model.add_argument("--members", default="lgb,lstm,tft", help="stored models (default: %(default)s)")
    model.add_argument("--seeds", default="0,1,2,3,4", help="ensemble seeds (default: %(default)s)")
    args = parser.parse_args()
    root = Path(args.store)
    if args.kind == "seed":
        ensembles = [seed_ensemble(root, args.model, int(e)) for e in args.ensembles.split(",")]
    else:
        ensembles = [model_ensemble(root, args.members.split(","), int(s)) for s in args.seeds.split(",")]
    reference = pd.concat([daily_rank_ic(p["score"], p["label"]) for p in
                           (stored_predictions(root, args.against, s) for s in
                            [int(s) for s in args.against_seeds.split(",") if s] or [None])],
                          axis=1).mean(axis=1)
    provider = stored_provider(root, args.against, int(args.against_seeds.split(",")[0]) if args.against_seeds else None)
    task = load_workflow(REPO / "workflows" / WORKFLOWS[args.kind], {"VN30_PROVIDER": provider})["task"]
    rows = []
    with tempfile.TemporaryDirectory(prefix="ensembles_from_store-") as folder:
        init_qlib_for(provider, sqlite_tracking_uri(Path(folder)))
        for name, score, label in ensembles:
            with R.start(experiment_name="ensembles_from_store", recorder_name=name):
                R.save_objects(**{"pred.pkl": score.rename("score"), "label.pkl": label})  # as the loop saves
                backtest = run_backtest(task, R.get_recorder())
            rows.append(pd.Series({**{k: v for k, v in cross_sectional_metrics(score, label).items()
                                      if isinstance(v, float)}, **backtest}, name=name))
    table = pd.DataFrame(rows)
    print(table.round(4).to_string())
    print("mean ± sd: " + ", ".join(f"{k} {table[k].mean():.4f} ± {table[k].std():.4f}" for k in table.columns))
    daily = pd.concat([daily_rank_ic(score, label) for _, score, label in ensembles], axis=1).mean(axis=1)
    difference = paired_difference(daily, reference)
    print(f"minus {args.against} (seeds {args.against_seeds}, daily Rank IC averaged): mean "
          f"{difference['mean']:.4f}, t {difference['t']:.2f} over {difference['days']} days")


if __name__ == "__main__":
    main()
