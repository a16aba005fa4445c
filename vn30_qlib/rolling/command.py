"""``vn30-qlib rolling`` (RR or DDG-DA of a workflow, results in Qlib's recorder like ``qrun``) and the
``--drift`` options of ``vn30-qlib data simulate`` (the drifting market that shows what rolling adapts to).

Nothing heavy is imported here at module level: ``vn30-qlib --help`` stays fast.
"""
from __future__ import annotations

import argparse
import re
import sys
import time
from pathlib import Path

from vn30_qlib.cli import positive_int

METHODS = ("rr", "ddgda")
SUMMARY_METRICS = ("IC", "ICIR", "Rank IC", "Rank ICIR", "1day.excess_return_with_cost.annualized_return",
                   "1day.excess_return_with_cost.information_ratio")


def train_window(text: str) -> int | None:
    """``expanding`` (None: every day from the workflow's train start) or ``Nd``: the last N trading days."""
    if text == "expanding":
        return None
    match = re.fullmatch(r"([0-9]+)d", text)
    if not match or int(match.group(1)) < 1:
        raise argparse.ArgumentTypeError(f"use 'expanding' or a number of trading days such as '500d', got {text!r}")
    return int(match.group(1))


def add_rolling_command(commands) -> None:
    """Register ``rolling`` on the CLI's subcommands."""
    p = commands.add_parser("rolling", help="rolling retraining (rr) or DDG-DA of a workflow through Qlib's "
                                            "qlib.contrib.rolling; results in Qlib's recorder like qrun")
    p.add_argument("--workflow", required=True, help="workflow YAML, e.g. workflows/lgb_vn30.yaml")
    p.add_argument("--step", required=True, type=positive_int("trading days"),
                   help="trading days per rolling task: the model is refitted every STEP days of the test segment")
    p.add_argument("--method", default="rr", choices=METHODS,
                   help="rr: refit on the data before each window; ddgda: Qlib's DDG-DA reweights each refit's "
                        "training days (LightGBM) (default: %(default)s)")
    p.add_argument("--train-window", default="expanding", type=train_window,
                   help="'expanding' (from the workflow's train start) or 'Nd', the last N trading days before "
                        "each window (default: %(default)s)")
    p.add_argument("--provider", help="Qlib provider folder (default: the workflow's provider_uri, "
                                      "VN30_PROVIDER or ~/.qlib/qlib_data/vn30_sim)")
    p.add_argument("--experiment", help="experiment of the joined results (default: the workflow's "
                                        "experiment_name + _rr or _ddgda)")
    p.add_argument("--hist-steps", type=positive_int("steps"), default=30,
                   help="ddgda: steps of proxy-model history the meta-model reads per task (default: %(default)s)")
    p.set_defaults(handler=rolling_command)


def rolling_command(args: argparse.Namespace) -> int:
    from vn30_qlib.rolling.bridge import RollingError

    workflow = Path(args.workflow).expanduser()
    if not workflow.is_file():
        print(f"error: {args.workflow}: workflow file not found", file=sys.stderr)
        return 2
    started = time.perf_counter()
    try:
        recorder = run_rolling(workflow, args.provider, args.step, method=args.method, train_window=args.train_window,
                               experiment=args.experiment, ddgda_options={"hist_step_n": args.hist_steps})
    except RollingError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    metrics = recorder.list_metrics()
    print(f"{args.method} of {workflow.name}, step {args.step}: experiment {recorder.experiment_id}, recorder "
          f"{recorder.id}, {time.perf_counter() - started:.0f} s")
    for name in SUMMARY_METRICS:
        if name in metrics:
            print(f"  {name}: {metrics[name]:.4f}")
    return 0


def run_rolling(workflow: str | Path, provider: str | Path | None, step: int, method: str = "rr",
                train_window: int | None = None, experiment: str | None = None, tracking_uri: str | None = None,
                ddgda_options: dict | None = None):
    """Initialise Qlib as ``qrun`` does for ``workflow`` (``provider`` replaces its provider_uri; ``tracking_uri``
    its mlflow store, by default the workflow's), run RR or DDG-DA (``ddgda_options``: keyword arguments of
    `VN30DDGDA`) and return the joined results' recorder."""
    import qlib

    from vn30_qlib.loop import folder_exp_manager, require_inputs
    from vn30_qlib.rolling.bridge import RollingError, VN30Rolling
    from vn30_qlib.workflow_config import load_workflow

    if method not in METHODS:
        raise RollingError(f"unknown method {method!r}: use one of {', '.join(METHODS)}")
    env = {} if provider is None else {"VN30_PROVIDER": str(provider)}
    config = load_workflow(workflow, env)
    qlib_init = dict(config.get("qlib_init", {}))
    provider = Path(provider if provider is not None else qlib_init.get("provider_uri", "")).expanduser()
    require_inputs([workflow], provider)
    if method == "ddgda":
        from vn30_qlib.rolling.ddgda import check_ddgda_input

        check_ddgda_input(config["task"]["model"], step)
    qlib_init["provider_uri"] = str(provider)
    if tracking_uri is not None:
        qlib_init["exp_manager"] = folder_exp_manager(tracking_uri, "vn30")
    qlib.init(**qlib_init)
    if method == "ddgda":
        from vn30_qlib.rolling.ddgda import VN30DDGDA

        rolling = VN30DDGDA(workflow, provider, step, train_window=train_window, exp_name=experiment,
                            **(ddgda_options or {}))
    else:
        rolling = VN30Rolling(workflow, provider, step, train_window=train_window, exp_name=experiment)
    return rolling.run()


def drift_date(text: str) -> str:
    """A drift date inside the simulated days (two trading days on each side), as YYYY-MM-DD."""
    from vn30_qlib.data.holidays import hose_trading_days
    from vn30_qlib.data.simulate import DEFAULT_END, DEFAULT_START, drift_day

    if not re.fullmatch(r"[0-9]{4}-[0-9]{2}-[0-9]{2}", text):
        raise argparse.ArgumentTypeError(f"not a date: {text!r} (use YYYY-MM-DD)")
    try:
        drift_day(hose_trading_days(DEFAULT_START, DEFAULT_END), text)
    except ValueError as error:
        raise argparse.ArgumentTypeError(str(error)) from None
    return text


def drift_signal(text: str) -> float:
    """A planted signal strength the simulator can reach."""
    from vn30_qlib.data.simulate import signal_loading

    try:
        value = float(text)
        signal_loading(value, 1.0)
    except ValueError as error:
        raise argparse.ArgumentTypeError(str(error)) from None
    return value


def add_drift_arguments(parser: argparse.ArgumentParser) -> None:
    """``--drift`` and ``--drift-signal`` on ``data simulate``."""
    parser.add_argument("--drift", type=drift_date, metavar="DATE",
                        help="regime change: from DATE (YYYY-MM-DD) on, the planted signal is --drift-signal; "
                             "recorded under 'drift' in simulate_params.json (default: none, a stationary market)")
    parser.add_argument("--drift-signal", type=drift_signal,
                        help="the planted signal from --drift on (default: minus --signal: the sign flips)")
