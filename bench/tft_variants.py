"""Which TFT variant earns the default? Each variant of `workflows/tft_vn30.yaml` (and, for scale, LightGBM's and
the LSTM's workflows) is scored by the walk-forward harness (`vn30_qlib.harness`) on the same folds and seeds, and
compared with the shipped TFT and with LightGBM by the paired difference of their daily Rank IC series.

    python bench/tft_variants.py --provider /tmp/vn30_real --out /work/tft_variants --jobs 2 \
        --variants default,stop_on_loss,best_epoch,raw_label

Each variant runs in its own process with one thread (``--jobs`` at once) and leaves ``{out}/{variant}/score.json``,
``daily.csv`` and ``predictions.parquet``; a variant already scored there is not refitted, so an interrupted run
resumes. The table (``{out}/variants.md``) gives each variant's mean ± se, the seeds' sd, the folds' means, the
paired differences from ``default`` and from ``lgb`` with their t (a variant scored on fewer seeds, a screen such as
``--seeds 0`` for a costly variant, is paired with them on its own seeds), and the cost: harness wall seconds per trained
epoch (data loading, validation and prediction included) and epochs per fit; then the ensembles (`ENSEMBLES`)
scored from the variants' kept validation predictions, without refitting. Adoption rule (issue 22): a variant replaces the default only when its
paired difference is above one standard error (t > 1).
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
from ruamel.yaml import YAML

from vn30_qlib.harness import harness_score, write_json
from vn30_qlib.metrics import daily_rank_ic, paired_difference, standard_error
from vn30_qlib.models.model_ensemble import daily_zscores
from vn30_qlib.workflow_config import load_workflow

ROOT = Path(__file__).resolve().parents[1]
TFT = "workflows/tft_vn30.yaml"
# segments purged for labels reading 6 trading days ahead (5 horizons): train and valid end 4 trading days earlier
PURGED_FOR_6_DAYS = {"train": ["2015-10-05", "2021-12-23"], "valid": ["2022-01-01", "2022-12-22"],
                     "test": ["2023-01-01", "2024-09-26"]}

# name -> (workflow, model kwargs, handler kwargs, dataset segments)
VARIANTS: dict[str, tuple[str, dict, dict, dict | None]] = {
    "default": (TFT, {}, {}, None),
    "stop_on_loss": (TFT, {"metric": "loss"}, {}, None),
    "best_epoch": (TFT, {"average_best": 1}, {}, None),
    "raw_label": (TFT, {}, {"learn_processors": [{"class": "DropnaLabel"}]}, None),
    "horizons_5": (TFT, {"horizons": 5}, {"horizons": 5, "fit_end_time": "2021-12-23"}, PURGED_FOR_6_DAYS),
    "window_60": (TFT, {"step_len": 60}, {}, None),
    "window_10": (TFT, {"step_len": 10}, {}, None),
    "dropout_0.3": (TFT, {"dropout": 0.3}, {}, None),
    "hidden_32": (TFT, {"hidden_size": 32}, {}, None),
    "all_158": (TFT, {}, {"features": None}, None),
    "ic_loss_0.5": (TFT, {"ic_loss_weight": 0.5}, {}, None),
    "weekday_calendar": (TFT, {"known_future": ["day_of_week"]}, {}, None),
    "no_calendar": (TFT, {"known_future": []}, {}, None),
    "ema_0.99": (TFT, {"ema_decay": 0.99, "average_best": 1}, {}, None),
    "lr_plateau": (TFT, {"lr_schedule": "plateau"}, {}, None),
    # cosine annealing over a fixed budget of 20 epochs (the default's fits ran 11-22), not cut by early stopping
    "lr_cosine_20": (TFT, {"lr_schedule": "cosine", "n_epochs": 20, "early_stop": 20}, {}, None),
    "market_context": (TFT, {"market_context": True}, {}, None),
    "sector_relative": (TFT, {"sector_relative": True}, {}, None),
    "weight_decay_0.01": (TFT, {"weight_decay": 0.01}, {}, None),
    "rank_label": (TFT, {}, {"learn_processors": [{"class": "DropnaLabel"},
                                                  {"class": "CSRankNorm", "kwargs": {"fields_group": "label"}}]}, None),
    "lgb": ("workflows/lgb_vn30.yaml", {}, {}, None),
    "lstm": ("workflows/lstm_vn30.yaml", {}, {}, None),
}
# name -> scored variants whose kept predictions it averages (`ensemble_daily`)
ENSEMBLES: dict[str, list[str]] = {
    "tft_seed_ensemble": ["default"],
    "ic_loss_seed_ensemble": ["ic_loss_0.5"],
    "market_context_seed_ensemble": ["market_context"],
    "no_calendar_seed_ensemble": ["no_calendar"],
    "rank_label_seed_ensemble": ["rank_label"],
    "lstm_tft": ["lstm", "default"],
    "lgb_lstm_tft": ["lgb", "lstm", "default"],
}


def variant_workflow(name: str, provider: str, out: Path) -> Path:
    """The variant's fully resolved workflow (no BASE_CONFIG_PATH, no Jinja) at ``{out}/{name}/workflow.yaml``."""
    workflow, model_kwargs, handler_kwargs, segments = VARIANTS[name]
    config = copy.deepcopy(load_workflow(ROOT / workflow, {"VN30_PROVIDER": provider, "TFT_THREADS": "1"}))
    config.pop("BASE_CONFIG_PATH", None)
    task = config["task"]
    task["model"]["kwargs"].update(model_kwargs)
    task["dataset"]["kwargs"]["handler"]["kwargs"].update(handler_kwargs)
    if segments is not None:
        task["dataset"]["kwargs"]["segments"] = segments
    path = out / name / "workflow.yaml"
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w") as stream:
        YAML(typ="safe", pure=True).dump(config, stream)
    return path


def epochs_per_fit(out_dir: Path) -> list[int]:
    """Epochs trained by each fold fit recorded in the harness's store (LightGBM: none are logged)."""
    from mlflow.tracking import MlflowClient

    from vn30_qlib.cv import CV_EXPERIMENT
    from vn30_qlib.loop import sqlite_tracking_uri

    client = MlflowClient(tracking_uri=sqlite_tracking_uri(out_dir))
    experiment = client.get_experiment_by_name(CV_EXPERIMENT)
    counts = []
    for run in client.search_runs([experiment.experiment_id], filter_string="tags.fold != ''"):
        keys = [key for key in run.data.metrics if key.endswith("train_loss")]
        if keys:
            counts.append(len(client.get_metric_history(run.info.run_id, keys[0])))
    return counts


def score_one(name: str, provider: str, out: Path, seeds: list[int], folds: int, valid_days: int,
              skip_last: int = 0) -> None:
    workflow = variant_workflow(name, provider, out)
    started = time.perf_counter()
    score = harness_score(workflow, provider, out / name, seeds, folds, valid_days, skip_last)
    seconds = time.perf_counter() - started
    epochs = epochs_per_fit(out / name)
    daily, predictions = score.pop("daily"), score.pop("predictions")
    for write, file in ((daily.to_csv, "daily.csv"), (predictions.to_parquet, "predictions.parquet")):
        partial = out / name / f"{file}.partial"
        write(partial)
        partial.replace(out / name / file)
    write_json(out / name / "score.json", {**score, "variant": name, "seconds": seconds, "epochs": epochs,
                                           "seconds_per_epoch": seconds / sum(epochs) if epochs else None})


def ensemble_daily(out: Path, members: list[str]) -> pd.Series | None:
    """The daily Rank IC of an ensemble of scored variants, from their kept validation predictions (None unless
    every member has them). One member: its seeds' mean score (a seed ensemble of the seeds), one series. Several:
    per seed, the mean of the members' per-day z-scores (`ModelEnsemble`), then seed-averaged as the harness does."""
    if not all((out / m / "predictions.parquet").is_file() for m in members):
        return None
    frames = {m: pd.read_parquet(out / m / "predictions.parquet").droplevel("fold") for m in members}
    label = frames[members[0]]["label"]
    if len(members) == 1:
        by_day = frames[members[0]]["score"].groupby(level=["datetime", "instrument"]).mean()
        return daily_rank_ic(by_day, label.groupby(level=["datetime", "instrument"]).first())
    scores = pd.concat({m: f["score"] for m, f in frames.items()}, axis=1, join="inner")
    per_seed = {seed: daily_rank_ic(daily_zscores(group.droplevel("seed")).mean(axis=1), label.loc[seed])
                for seed, group in scores.groupby(level="seed")}
    return pd.concat(per_seed, axis=1).mean(axis=1)


def daily_on_seeds(out: Path, name: str, seeds: list[int]) -> pd.Series:
    """A scored variant's harness series as if it had been scored on ``seeds`` only (a subset of its own), from
    its kept predictions: each seed's daily Rank IC, averaged over the seeds by day (`seed_averaged`)."""
    frame = pd.read_parquet(out / name / "predictions.parquet").droplevel("fold")
    return pd.concat({seed: daily_rank_ic(frame.loc[seed, "score"], frame.loc[seed, "label"]) for seed in seeds},
                     axis=1).mean(axis=1)


def table(out: Path, names: list[str]) -> str:
    """Markdown: one row per scored variant, then the `ENSEMBLES`. A variant scored on fewer seeds (a screen) is
    paired with ``default`` and ``lgb`` on its own seeds (`daily_on_seeds`)."""
    scored = [n for n in names if (out / n / "score.json").is_file()]
    daily = {n: pd.read_csv(out / n / "daily.csv", index_col=0, parse_dates=True).iloc[:, 0] for n in scored}
    scores = {n: json.loads((out / n / "score.json").read_text()) for n in scored}
    lines = ["| variant | seeds | harness Rank IC (mean ± se) | seeds' sd | folds' means | minus default (t) "
             "| minus lgb (t) | s per epoch | epochs per fit |", "|---|---|---|---|---|---|---|---|---|"]

    def versus(name: str, seeds: list[int] | None) -> str:
        cells = []
        for against in ("default", "lgb"):
            pair = None
            if name != against and against in daily:
                reference = (daily[against] if seeds is None or seeds == scores[against]["seeds"]
                             else daily_on_seeds(out, against, seeds))
                pair = paired_difference(daily[name], reference)
            cells.append(f"{pair['mean']:+.4f} ({pair['t']:+.2f})" if pair else "–")
        return " | ".join(cells)

    for name in scored:
        score = scores[name]
        epochs = score["epochs"]
        seed_sd = "–" if score["seed_sd"] is None else f"{score['seed_sd']:.4f}"
        lines.append(
            f"| {name} | {','.join(map(str, score['seeds']))} | {score['rank_ic_mean']:.4f} ± "
            f"{score['rank_ic_se']:.4f} | {seed_sd} | "
            + ", ".join(f"{f['rank_ic']:.3f}" for f in score["folds"]) + f" | {versus(name, score['seeds'])} | "
            + (f"{score['seconds_per_epoch']:.1f} | {sum(epochs) / len(epochs):.1f}" if epochs else
               f"– ({score['seconds']:.0f} s in all) | –") + " |")
    for name, members in ENSEMBLES.items():
        series = ensemble_daily(out, members)
        if series is None:
            continue
        daily[name] = series
        first = json.loads((out / members[0] / "score.json").read_text())
        folds = first["folds"]
        fold_means = [series.loc[slice(*f["valid"].split(".."))].mean() for f in folds]
        lines.append(f"| {name} (from the kept predictions) | {','.join(map(str, first['seeds']))} | "
                     f"{series.mean():.4f} ± {standard_error(series):.4f} | – | "
                     f"{', '.join(f'{m:.3f}' for m in fold_means)} | {versus(name, None)} | – | – |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--provider", required=True, help="Qlib provider folder (e.g. the real VN30 data)")
    parser.add_argument("--out", required=True, help="folder of the variants' scores and fold runs")
    parser.add_argument("--variants", default="default,stop_on_loss,best_epoch,raw_label",
                        help=f"comma-separated, of: {', '.join(VARIANTS)} (default: %(default)s)")
    parser.add_argument("--seeds", default="0,1,2", help="model seeds (default: %(default)s)")
    parser.add_argument("--folds", type=int, default=4, help="walk-forward folds (default: %(default)s)")
    parser.add_argument("--valid-days", type=int, default=120, help="days per validation block (default: %(default)s)")
    parser.add_argument("--skip-last", type=int, default=0,
                        help="score all but the last N folds, into another --out (default: %(default)s)")
    parser.add_argument("--jobs", type=int, default=1, help="variants scored at once (default: %(default)s)")
    parser.add_argument("--one", help=argparse.SUPPRESS)  # a worker process: score this variant only
    args = parser.parse_args()
    out = Path(args.out).expanduser().resolve()
    seeds = [int(s) for s in args.seeds.split(",")]
    if args.one:
        score_one(args.one, args.provider, out, seeds, args.folds, args.valid_days, args.skip_last)
        return
    names = args.variants.split(",")
    unknown = [n for n in names if n not in VARIANTS]
    if unknown:
        raise SystemExit(f"error: unknown variants {unknown}; known: {', '.join(VARIANTS)}")
    todo = [n for n in names if not (out / n / "score.json").is_file()]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    running: list[tuple[str, subprocess.Popen]] = []
    failed = []
    while todo or running:
        while todo and len(running) < args.jobs:
            name = todo.pop(0)
            log = (out / f"{name}.log")
            log.parent.mkdir(parents=True, exist_ok=True)
            command = [sys.executable, __file__, "--one", name, "--provider", args.provider, "--out", str(out),
                       "--seeds", args.seeds, "--folds", str(args.folds), "--valid-days", str(args.valid_days),
                       "--skip-last", str(args.skip_last)]
            running.append((name, subprocess.Popen(command, env=env, stdout=log.open("w"), stderr=subprocess.STDOUT)))
            print(f"{time.strftime('%H:%M:%S')} started {name} (log {log})", flush=True)
        time.sleep(5)
        for name, process in list(running):
            if process.poll() is not None:
                running.remove((name, process))
                print(f"{time.strftime('%H:%M:%S')} {name} exited {process.returncode}", flush=True)
                if process.returncode:
                    failed.append(name)
    text = table(out, names)
    (out / "variants.md").write_text(text + "\n")
    print(text)
    if failed:
        raise SystemExit(f"error: variants failed: {failed} (see their logs in {out})")


if __name__ == "__main__":
    main()
