"""The ``vn30-qlib`` command line."""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Callable

DEFAULT_PROVIDER = "~/.qlib/qlib_data/vn30_sim"


def _data_ingest(args: argparse.Namespace) -> int:
    from vn30_qlib.data.ingest import IngestOptions, format_report, ingest

    options = IngestOptions(date_column=args.date_column, index_date_column=args.index_date_column,
                            price_unit=args.price_unit)
    report = ingest(args.source, args.out, index_file=args.index, options=options, universe_file=args.universe,
                    force=args.force)
    print(format_report(report))
    print(f"provider written to {Path(args.out).expanduser()} (report: ingest_report.json)")
    return 0


def _data_update(args: argparse.Namespace) -> int:
    from vn30_qlib.data.ingest import IngestOptions
    from vn30_qlib.data.update import format_update, update

    options = IngestOptions(date_column=args.date_column, index_date_column=args.index_date_column,
                            price_unit=args.price_unit)
    report = update(args.source, args.out, index_file=args.index, options=options, universe_file=args.universe)
    print(format_update(report))
    return 0


def _data_simulate(args: argparse.Namespace) -> int:
    from vn30_qlib.data.simulate import write_simulated_provider

    if args.drift_signal is not None and args.drift is None:
        print("error: --drift-signal needs --drift DATE", file=sys.stderr)
        return 2
    out = write_simulated_provider(args.out, seed=args.seed, signal=args.signal, force=args.force, drift=args.drift,
                                   drift_signal=args.drift_signal)
    drift = f", drift from {args.drift}" if args.drift else ""
    print(f"simulated VN30 market (seed {args.seed}, signal {args.signal}{drift}) written to {out}")
    return 0


def _data_check(args: argparse.Namespace) -> int:
    from vn30_qlib.data.check import check_provider, format_check

    summary = check_provider(args.provider)
    print(json.dumps(summary, indent=2) if args.json else format_check(summary))
    return 1 if summary["problems"] else 0


def _loop(args: argparse.Namespace) -> int:
    from vn30_qlib.loop import run_loop

    results = run_loop(args.workflows, args.provider, args.store, symbols=args.symbols, modes=args.modes,
                       jobs=args.jobs, force=args.force, executor=args.executor, ray_address=args.ray_address,
                       seeds=args.seeds, backtest=args.backtest, tracking_uri=args.tracking_uri)
    counts = {status: sum(r["status"] == status for r in results) for status in ("done", "skipped", "failed")}
    print(f"loop finished: {counts['done']} fitted, {counts['skipped']} already done, {counts['failed']} failed")
    for failure in (r for r in results if r["status"] == "failed"):
        print(f"  FAILED {failure['mode']} {failure['symbol'] or 'pooled'} {failure['workflow']}: {failure['error']}")
    return 1 if counts["failed"] else 0


def _report(args: argparse.Namespace) -> int:
    from vn30_qlib.report import build_report

    for name, path in build_report(args.store, args.out).items():
        print(f"wrote {path}")
    return 0


def _predict(args: argparse.Namespace) -> int:
    from vn30_qlib.predict import format_signal, predict

    models = [name.strip() for name in args.models.split(",") if name.strip()] if args.models else None
    print(format_signal(predict(args.provider, args.date, args.store, models, args.out)))
    return 0


def _validate(args: argparse.Namespace) -> int:
    from vn30_qlib.store import validate

    for version in args.versions:
        print(f"{version}: OK, re-predicts the stored predictions (max abs difference {validate(Path(version)):.2e})")
    return 0


def _harness(args: argparse.Namespace) -> int:
    from vn30_qlib.harness import compare, harness_score, write_results

    try:
        seeds = [int(seed) for seed in args.seeds.split(",")]
    except ValueError:
        seeds = []
    if not seeds or len(set(seeds)) != len(seeds):
        print(f"error: --seeds must be distinct integers separated by commas, got {args.seeds!r}", file=sys.stderr)
        return 2
    if not 0 <= args.skip_last < args.folds:
        print(f"error: --skip-last must be at least 0 and leave some of the {args.folds} folds to score, got "
              f"{args.skip_last}", file=sys.stderr)
        return 2
    scores = [harness_score(workflow, args.provider, args.out, seeds, args.folds, args.valid_days, args.skip_last)
              for workflow in args.workflows]
    for score in scores:
        se = "n/a" if score["rank_ic_se"] is None else f"{score['rank_ic_se']:.4f}"
        print(f"{score['workflow']}: Rank IC {score['rank_ic_mean']:.4f} ± {se} (se, {score['days']} validation days, "
              f"{len(score['folds'])} folds, seeds {','.join(map(str, score['seeds']))})")
    for row in compare(scores):
        t = "n/a" if row["t"] is None else f"{row['t']:.2f}"
        print(f"{row['verdict']}: paired difference {row['mean']:+.4f}, t {t}")
    print(f"wrote {write_results(scores, args.out)}")
    return 0


def _tune(args: argparse.Namespace) -> int:
    from vn30_qlib.tune import SearchSpaceError, tune

    try:
        result = tune(args.workflow, args.provider, args.out, n_trials=args.trials, executor=args.executor,
                      jobs=args.jobs, ray_address=args.ray_address)
    except SearchSpaceError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    print(f"{result['trials']} trials; best harness score (mean daily Rank IC over folds and seeds) "
          f"{result['best_value']:.4f} with {result['best_params']}")
    bias = result["selection_bias"]
    unseen = bias["unseen_folds"]
    print(f"selection bias: the best trial re-scored on fresh seeds {bias['fresh_seeds']['rank_ic']:.4f}, on the "
          + (f"{len(unseen['folds'])} earlier folds the search never saw {unseen['rank_ic']:.4f}"
             if "rank_ic" in unseen else f"earlier folds: not scored ({unseen['skipped']})"))
    print(f"ready-to-run workflow: {result['tuned_workflow']}")
    return 0


def positive_int(unit: str = "") -> Callable[[str], int]:
    """An argparse type: a whole number, 1 or more, of ``unit`` (named in the error: "trading days")."""
    of_unit = f" of {unit}" if unit else ""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"must be a whole number{of_unit}, got {text!r}") from None
        if value < 1:
            raise argparse.ArgumentTypeError(f"must be 1 or more{' ' + unit if unit else ''}, got {value}")
        return value

    return parse


def _executor_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--executor", default="local", choices=["local", "ray"],
                        help="local worker processes, or one Ray task per fit (needs pip install -e '.[ray]') "
                             "(default: %(default)s)")
    parser.add_argument("--ray-address", help="Ray cluster to use, e.g. auto or HEAD:6379 (default: start a local "
                                              "Ray with --jobs CPUs)")


def _add_export_layout_options(p: argparse.ArgumentParser) -> None:
    """How a vendor's export is laid out: the options data ingest and data update share."""
    p.add_argument("--date-column", help="date column of the price files (default: 'time' or 'date')")
    p.add_argument("--index-date-column", help="date column of the index file (default: 'time' or 'date')")
    p.add_argument("--price-unit", default="thousand_vnd", choices=["thousand_vnd", "vnd"],
                   help="unit of the input prices; the provider always stores thousands of VND (default: %(default)s)")


def build_parser() -> argparse.ArgumentParser:
    from vn30_qlib.retrain import add_retrain_command
    from vn30_qlib.rolling.command import add_drift_arguments, add_rolling_command

    parser = argparse.ArgumentParser(prog="vn30-qlib", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    data = commands.add_parser("data", help="build and check Qlib providers").add_subparsers(dest="action", required=True)

    p = data.add_parser("ingest", help="CSV exports (one file per symbol) -> Qlib provider")
    p.add_argument("--source", required=True, help="folder of {SYMBOL}.csv files")
    p.add_argument("--out", required=True, help="provider folder to write: a new or empty folder, or a provider "
                                                "vn30-qlib wrote (replaced only when complete)")
    p.add_argument("--force", action="store_true", help="replace a Qlib provider another tool wrote at --out")
    p.add_argument("--index", help="index CSV, ingested as instrument VN30 (market 'index') (default: none; the "
                                   "backtests' benchmark is then an equal-weight VN30)")
    p.add_argument("--universe", help="symbols of market vn30: a CSV with a 'symbol' column or one symbol per line "
                                      "(default: every file; all files go to market 'all')")
    _add_export_layout_options(p)
    p.set_defaults(handler=_data_ingest)

    p = data.add_parser("update", help="append a fresh export's new days to a provider; rebuild re-adjusted symbols")
    p.add_argument("--source", required=True, help="folder of {SYMBOL}.csv files: full histories or recent days")
    p.add_argument("--out", required=True, help="the provider to update (one vn30-qlib wrote; replaced only when "
                                                "complete, untouched when nothing is new)")
    p.add_argument("--index", help="index CSV, the VN30 instrument's new days (default: the stored index is kept)")
    p.add_argument("--universe", help="new symbols of market vn30, as for data ingest (default: kept)")
    _add_export_layout_options(p)
    p.set_defaults(handler=_data_update)

    p = data.add_parser("simulate", help="write the simulated VN30 market (the offline default)")
    p.add_argument("--out", default=DEFAULT_PROVIDER, help="provider folder, with the same rules as data ingest "
                                                           "--out (default: %(default)s)")
    p.add_argument("--force", action="store_true", help="replace a Qlib provider another tool wrote at --out")
    p.add_argument("--seed", type=int, default=0, help="seed of every random draw: the same seed and signal give "
                                                       "the same bars (default: %(default)s)")
    p.add_argument("--signal", type=float, default=0.05,
                   help="strength of the planted predictable component, the mean daily Rank IC it gives "
                        "(0 = pure noise) (default: %(default)s)")
    add_drift_arguments(p)
    p.set_defaults(handler=_data_simulate)

    p = data.add_parser("check", help="load a provider through Qlib and verify every field round-trips")
    p.add_argument("provider", help="provider folder")
    p.add_argument("--json", action="store_true", help="print the full summary as JSON")
    p.set_defaults(handler=_data_check)

    p = commands.add_parser("loop", help="train every VN30 symbol x workflow (per symbol and pooled) into the model store")
    p.add_argument("workflows", nargs="+", help="workflow YAMLs, e.g. workflows/lgb_vn30.yaml")
    p.add_argument("--provider", default=DEFAULT_PROVIDER, help="Qlib provider folder (default: %(default)s)")
    p.add_argument("--store", default="models", help="model store folder (default: %(default)s)")
    p.add_argument("--symbols", nargs="+", help="symbols fitted one by one (default: the provider's vn30 list)")
    p.add_argument("--modes", nargs="+", default=["per_symbol", "pooled"], choices=["per_symbol", "pooled"],
                   help="per_symbol: one fit per symbol; pooled: one fit on all symbols per workflow "
                        "(default: per_symbol pooled)")
    p.add_argument("--jobs", type=positive_int(), default=1, help="fits run at once, each in its own worker process "
                                                                 "(default: %(default)s)")
    p.add_argument("--seeds", type=int, nargs="+", help="fit every entry once per seed, e.g. --seeds 0 1 2 3 4 "
                                                         "(default: the workflow's own seed)")
    p.add_argument("--backtest", action="store_true",
                   help="pooled fits also run their workflow's portfolio analysis (top-k, VN costs): excess return "
                        "with and without cost in the store and the report (default: off)")
    p.add_argument("--force", action="store_true", help="retrain entries already stored with this config and data")
    _executor_arguments(p)
    p.add_argument("--tracking-uri", help="mlflow store of the recorder runs (default: sqlite:///{store}/mlruns.db; "
                                          "on a cluster, a server every worker reaches)")
    p.set_defaults(handler=_loop)

    p = commands.add_parser("report", help="Markdown/HTML report and CSV/JSON metrics from the model store")
    p.add_argument("--store", default="models", help="model store folder written by loop (default: %(default)s)")
    p.add_argument("--out", help="report folder: a new or empty folder, or one an earlier report wrote; nothing "
                                 "else is overwritten (default: {store}/report)")
    p.set_defaults(handler=_report)

    p = commands.add_parser("tune", help="Optuna search of a workflow's model kwargs by walk-forward CV")
    p.add_argument("workflow", help="workflow YAML with a {name}.search.yaml beside it")
    p.add_argument("--provider", default=DEFAULT_PROVIDER, help="Qlib provider folder (default: %(default)s)")
    p.add_argument("--out", default="tuning", help="folder of the study (optuna.db) and its mlflow runs "
                                                   "(default: %(default)s)")
    p.add_argument("--trials", type=positive_int(), help="total trials, counting those a stopped search finished "
                                                        "(default: n_trials of the search space)")
    p.add_argument("--jobs", type=positive_int(), default=1, help="trials run at once; 1 runs them one after "
                                                                 "another in this process (default: %(default)s)")
    _executor_arguments(p)
    p.set_defaults(handler=_tune)

    p = commands.add_parser("harness", help="score workflows by their daily Rank IC over walk-forward folds of "
                                            "train + valid and several seeds; compare them paired")
    p.add_argument("workflows", nargs="+", help="workflow YAMLs; each after the first is compared with the first")
    p.add_argument("--provider", default=DEFAULT_PROVIDER, help="Qlib provider folder (default: %(default)s)")
    p.add_argument("--out", default="harness", help="folder of harness.json and the folds' mlflow runs "
                                                    "(default: %(default)s)")
    p.add_argument("--seeds", default="0,1,2", help="model seeds, comma-separated (default: %(default)s)")
    p.add_argument("--folds", type=positive_int(), default=4, help="walk-forward folds (default: %(default)s)")
    p.add_argument("--valid-days", type=positive_int("trading days"), default=120,
                   help="trading days of each fold's validation block (default: %(default)s)")
    p.add_argument("--skip-last", type=int, default=0,
                   help="fit and score all but the last N folds: with --folds 8 --skip-last 4, the 4 folds before "
                        "those a choice was made on (default: %(default)s)")
    p.set_defaults(handler=_harness)

    p = commands.add_parser("predict", help="the next trading day's ranked signal and target orders from the stored "
                                            "models, recorded in mlflow")
    p.add_argument("--date", help="trading day to trade, YYYY-MM-DD; the signal reads the close before it "
                                  "(default: the HOSE trading day after the provider's last day)")
    p.add_argument("--models", help="pooled store entries, comma-separated, e.g. lgb,lstm,tft,tft_ensemble "
                                    "(default: every pooled entry of the store)")
    p.add_argument("--store", default="models", help="model store folder (default: %(default)s)")
    p.add_argument("--provider", default=DEFAULT_PROVIDER, help="Qlib provider folder (default: %(default)s)")
    p.add_argument("--out", help="signal CSV to write; the newest earlier YYYY-MM-DD.csv beside it is the previous "
                                 "target (default: {store}/signals/{date}.csv)")
    p.set_defaults(handler=_predict)

    p = commands.add_parser("validate", help="reload stored versions and prove they re-predict their predictions")
    p.add_argument("versions", nargs="+", help="version folders, e.g. models/symbols/ACB/lgb/v0001")
    p.set_defaults(handler=_validate)

    add_rolling_command(commands)
    add_retrain_command(commands)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from vn30_qlib.data.ingest import IngestError
    from vn30_qlib.executors import WorkerCannotSee
    from vn30_qlib.predict import PredictError
    from vn30_qlib.store import StoreError

    try:
        return args.handler(args)
    except (IngestError, StoreError, WorkerCannotSee, PredictError, OSError) as error:  # OSError: a missing or unwritable path
        print(f"error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
