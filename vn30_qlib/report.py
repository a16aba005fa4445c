"""The loop's benchmark report: Markdown + self-contained HTML, PNG plots, and CSV/JSON exports of every metric.

Built from the model store alone: each latest version's metadata, config and stored predictions (with their raw
test labels), never a model, and the failure records. The CSV/JSON export is the baseline the next study
(concept-drift adaptation, DDG-DA) compares against.

The report folder (default ``{store}/report``) holds the marker `MARKER` naming the files the report wrote; a
folder that holds anything else is refused, so a report never overwrites what it did not write. Each file is
replaced atomically, and files of an earlier report that this one does not write are removed.
"""
from __future__ import annotations

import base64
import html
import json
import os
from itertools import combinations
from pathlib import Path

import pandas as pd
from matplotlib.figure import Figure

from vn30_qlib import store
from vn30_qlib.loop import simulation_summary
from vn30_qlib.metrics import cross_sectional_metrics, daily_rank_ic, paired_difference, standard_error

METRIC_COLUMNS = ["ic", "rank_ic", "mse_learnt", "mae_learnt", "days", "degenerate"]
UNITS_NOTE = ("IC and Rank IC are against the raw return. MSE and MAE (mse_learnt, mae_learnt) are in the units of "
              "the label each model learnt (after its workflow's learn processors, e.g. a z-score): compare them "
              "within a model, not across models. Hit rate: the share of (day, name) rows on which the prediction "
              "minus the day's median prediction has the sign of the return minus the day's median return (free of "
              "the market's move). All metrics: vn30_qlib.metrics.")
MARKER = "vn30_report.json"
REPORT_FILES = frozenset({"report.md", "report.html", "metrics.csv", "metrics.json", "rank_ic_distribution.png",
                          "cumulative_ic.png"})
DEFAULT_FOLDER = "report"  # inside the store


def collect(store_root: str | Path) -> tuple[pd.DataFrame, pd.DataFrame, list[dict]]:
    """(per-symbol metric rows, pooled cross-sectional rows, failures) from the latest stored versions."""
    root = Path(store_root)
    rows, pooled = [], []
    entries = sorted(p for p in root.glob("symbols/*/*") if p.is_dir()) + sorted(p for p in root.glob("pooled/*") if p.is_dir())
    for entry in entries:
        version = store.latest(entry)
        if version is None:
            continue
        meta = store.read_metadata(version)
        for symbol, values in meta["metrics"]["per_symbol"].items():
            rows.append({"symbol": symbol, "model": meta["model"], "mode": meta["mode"], "seed": str(meta.get("seed")),
                         **{k: values[k] for k in METRIC_COLUMNS}, "version": str(version.relative_to(root)),
                         "fit_s": meta["timings"]["fit_s"], "mlflow_run_id": meta["mlflow_run_id"]})
        if meta["mode"] == "pooled":
            pooled.append({"model": meta["model"], **meta["metrics"]["cross_sectional"],
                           "version": str(version.relative_to(root)), "mlflow_run_id": meta["mlflow_run_id"],
                           "provider": {**meta["provider"], "path": provider_name(meta["provider"])},
                           "data_span": meta["data_span"]})
    failures = [json.loads(p.read_text()) for p in sorted(root.glob("failures/*.json"))]
    return pd.DataFrame(rows), pd.DataFrame(pooled), failures


# |t| of a paired difference below this: the two models are "level", never "A beats B".
BEATS_T = 2.0
SEED_METRICS = ("cs_ic", "cs_icir", "cs_rank_ic", "cs_rank_icir", "hit_rate")
# pooled fits of `vn30-qlib loop --backtest`: the workflow's top-k backtest, annualised excess return over the index
BACKTEST_SEED_METRICS = ("excess_return_with_cost", "excess_ir_with_cost")
SEEDS_NOTE = ("Daily cross-sectional metrics on the test segment, mean ± sd over the seeds' fits (per_symbol: the "
              "symbols' separate models ranked against each other each day). rank_ic_se: the standard error of the "
              "mean daily Rank IC of the seed-averaged daily series. Pairs: the paired difference of two models' "
              f"seed-averaged daily Rank IC series (mean, t-stat); |t| < {BEATS_T:g} is reported as level. "
              "excess_return_with_cost / excess_ir_with_cost (pooled fits of `loop --backtest`): the workflow's "
              "backtest (top 5 of 30, one swap a day, buy 0.15 %, sell 0.25 %, lot 100, ±7 % limit), annualised "
              "excess return over the benchmark and its information ratio.")


def seed_summary(metrics: pd.DataFrame, root: Path) -> tuple[pd.DataFrame, dict[str, pd.Series]]:
    """Per (model, mode): mean and sd over seeds of the daily cross-sectional metrics of each seed's fit (the
    pooled version's test predictions, or the per-symbol versions' of every symbol together) and the standard
    error of the mean daily Rank IC; with the seed-averaged daily Rank IC series by ``"{model} {mode}"``."""
    rows, daily = [], {}
    for (model, mode), group in metrics.groupby(["model", "mode"], sort=True):
        per_seed, rank_ic = [], {}
        for seed, fits in group.groupby("seed"):
            metas = {v: store.read_metadata(root / v) for v in fits["version"].unique()}
            stored = pd.concat([store.read_predictions(root / v, meta) for v, meta in metas.items()])
            backtest = next(iter(metas.values()))["metrics"].get("backtest", {}) if len(metas) == 1 else {}
            per_seed.append(cross_sectional_metrics(stored["score"], stored["label"]) | backtest)
            rank_ic[seed] = daily_rank_ic(stored["score"], stored["label"])
        mean_daily = pd.concat(rank_ic, axis=1).mean(axis=1)
        daily[f"{model} {mode}"] = mean_daily
        row = {"model": model, "mode": mode, "seeds": len(per_seed)}
        for key in SEED_METRICS + BACKTEST_SEED_METRICS:
            values = pd.Series([fit.get(key) for fit in per_seed], dtype="float64")
            row[f"{key}_mean"], row[f"{key}_sd"] = values.mean(), values.std()
        rows.append({**row, "rank_ic_se": standard_error(mean_daily)})
    return pd.DataFrame(rows), daily


def verdict(first: str, second: str, t: float | None) -> str:
    """"A beats B" only when the paired t-stat of their daily Rank IC difference is at least `BEATS_T` in size."""
    if t is None or pd.isna(t) or abs(t) < BEATS_T:
        return f"{first} and {second} are level"
    return f"{first} beats {second}" if t > 0 else f"{second} beats {first}"


def paired_comparisons(daily: dict[str, pd.Series]) -> pd.DataFrame:
    """Every pair of models: the paired difference of their daily Rank IC series and the verdict."""
    rows = []
    for first, second in combinations(sorted(daily), 2):
        difference = paired_difference(daily[first], daily[second])
        rows.append({"first": first, "second": second, "mean_difference": difference["mean"], "t": difference["t"],
                     "days": difference["days"], "verdict": verdict(first, second, difference["t"])})
    return pd.DataFrame(rows, columns=["first", "second", "mean_difference", "t", "days", "verdict"])


def _plus_minus(seeds: pd.DataFrame) -> pd.DataFrame:
    """The seed table with each metric as "mean ± sd" (sd blank for one seed)."""
    shown = seeds[["model", "mode", "seeds"]].copy()
    shown_keys = SEED_METRICS + tuple(k for k in BACKTEST_SEED_METRICS if seeds[f"{k}_mean"].notna().any())
    for key in shown_keys:
        shown[key] = [("" if pd.isna(m) else f"{m:.4f}") + ("" if pd.isna(sd) else f" ± {sd:.4f}")
                      for m, sd in zip(seeds[f"{key}_mean"], seeds[f"{key}_sd"])]
    shown["rank_ic_se"] = seeds["rank_ic_se"]
    return shown


def tuned_vs_default(comparison: pd.DataFrame, pooled: pd.DataFrame) -> pd.DataFrame:
    """One row per (model, mode) that has a ``{model}_tuned`` twin (written by ``vn30-qlib tune``): the seed
    default's and the tuned workflow's mean per-symbol Rank IC and, pooled, daily cross-sectional Rank IC."""
    rows = []
    cs = pooled.set_index("model")["cs_rank_ic"] if not pooled.empty else pd.Series(dtype=float)
    for (model, mode), values in comparison.iterrows():
        tuned = f"{model}_tuned"
        if (tuned, mode) not in comparison.index:
            continue
        row = {"model": model, "mode": mode, "default mean Rank IC": values["mean_rank_ic"],
               "tuned mean Rank IC": comparison.loc[(tuned, mode), "mean_rank_ic"]}
        if mode == "pooled":
            row |= {"default cs Rank IC": cs.get(model), "tuned cs Rank IC": cs.get(tuned)}
        rows.append(row)
    return pd.DataFrame(rows)


def _png(fig) -> bytes:
    from io import BytesIO

    buffer = BytesIO()
    fig.tight_layout()
    fig.savefig(buffer, format="png", dpi=100)
    return buffer.getvalue()


def _distribution_plot(metrics: pd.DataFrame) -> bytes:
    fig = Figure(figsize=(7, 3.5))  # no pyplot: no process-wide backend chosen
    ax = fig.subplots()
    groups = [(f"{m}\n{mode}", g["rank_ic"].dropna().astype(float)) for (m, mode), g in metrics.groupby(["model", "mode"])]
    ax.boxplot([g for _, g in groups], tick_labels=[name for name, _ in groups])
    ax.axhline(0, color="grey", lw=0.8)
    ax.set_ylabel("time-series Rank IC per symbol (test)")
    return _png(fig)


def _cumulative_ic_plot(pooled: pd.DataFrame, root: Path) -> bytes | None:
    if pooled.empty:
        return None
    fig = Figure(figsize=(7, 3.5))  # no pyplot: no process-wide backend chosen
    ax = fig.subplots()
    for _, row in pooled.iterrows():
        version = root / row["version"]
        stored = store.read_predictions(version, store.read_metadata(version))
        daily_rank_ic(stored["score"], stored["label"]).cumsum().plot(ax=ax, label=row["model"])
    ax.axhline(0, color="grey", lw=0.8)
    ax.set_ylabel("cumulative daily Rank IC (pooled)")
    ax.legend()
    return _png(fig)


def describe_setup(version: Path) -> dict:
    """Universe, period, label and costs of a stored version, stated next to every metric of the report."""
    task, meta = store.read_task(version), store.read_metadata(version)
    handler = task["dataset"]["kwargs"]["handler"]["kwargs"]
    backtest = next((r["kwargs"]["config"] for r in task.get("record", []) if r["class"] == "VN30PortAnaRecord"), None)
    costs = "none: prediction metrics only"
    if backtest:
        ex = backtest["backtest"]["exchange_kwargs"]
        costs = (f"prediction metrics carry no costs; the workflows' backtests use buy {ex['open_cost']:.2%}, "
                 f"sell {ex['close_cost']:.2%} (incl. 0.1 % tax), lot {ex['trade_unit']}, "
                 f"limit +-{ex['limit_threshold']:.0%}, deal at {ex['deal_price']}")
    span = meta["data_span"]
    provider = meta["provider"]
    # stores written before the fingerprint recorded the market: the provider folder, where it still is
    simulated = provider["simulated"] if "simulated" in provider else simulation_summary(provider["path"])
    return {
        "market": "real daily bars (vn30-qlib data ingest)" if simulated is None else
                  f"simulated (vn30-qlib data simulate, seed {simulated['seed']}, planted signal {simulated['signal']}): "
                  "generated bars, not real prices; its one predictable component is planted, so an IC measures how "
                  "much of it a model recovers, not how a model would do on the market",
        "universe": "VN30 as listed in October 2025, applied to all history (survivorship bias: today's "
                    "constituents were chosen with hindsight)" if simulated is None else
                    f"{simulated['symbols']} simulated stocks with the VN30 list's names, sectors and listing days, "
                    f"{simulated['start']} .. {simulated['end']}; their prices are generated, so no survivorship "
                    "bias",
        "period": ", ".join(f"{name} {start[:10]} .. {end[:10]}" for name, (start, end) in span.items()),
        "label": "Ref($close, -2) / Ref($close, -1) - 1 (signal at day t, traded at the close of t+1)"
                 + ("" if "label" not in handler else f" ({handler['label']})"),
        "costs": costs,
        "provider": f"{provider_name(provider)} (sha256 {provider['sha256'][:12]}, "
                    f"{provider['first_day']} .. {provider['last_day']})",
    }


def provider_name(provider: dict) -> str:
    """A provider as a report names it: its folder's name; the sha256 beside it says which data it is, and a
    report read on another machine shows no path of the machine that wrote it."""
    return Path(provider["path"]).name


def build_report(store_root: str | Path, out_dir: str | Path | None = None) -> dict[str, Path]:
    """Write report.md, report.html, the PNGs, metrics.csv and metrics.json into ``out_dir`` (default
    ``{store_root}/report``); raises `FileExistsError` for a folder holding files the report did not write."""
    root = Path(store_root).expanduser()
    out = Path(out_dir).expanduser() if out_dir is not None else root / DEFAULT_FOLDER
    if not root.is_dir():
        raise FileNotFoundError(f"{root}: no model store here; fill one with vn30-qlib loop, or pass --store")
    previous = _report_entries(out)
    metrics, pooled, failures = collect(root)
    if metrics.empty:
        raise store.StoreError(f"{root}: no stored versions to report on")
    header = describe_setup(root / metrics["version"].iloc[0])
    images = {"rank_ic_distribution.png": _distribution_plot(metrics)}
    cumulative = _cumulative_ic_plot(pooled, root)
    if cumulative:
        images["cumulative_ic.png"] = cumulative
    seeds, daily = seed_summary(metrics, root)
    pairs = paired_comparisons(daily)
    export = {"header": header, "per_symbol": metrics.to_dict(orient="records"),
              "pooled_cross_sectional": pooled.to_dict(orient="records"), "seeds": seeds.to_dict(orient="records"),
              "paired_rank_ic": pairs.to_dict(orient="records"), "failures": failures}
    files = {**images, "metrics.csv": metrics.to_csv(index=False).encode(),
             "metrics.json": json.dumps(export, indent=2, default=str).encode()}

    table = metrics.pivot_table(index="symbol", columns=["model", "mode"], values="rank_ic", aggfunc="first", dropna=False)
    comparison = metrics.groupby(["model", "mode"]).agg(
        mean_rank_ic=("rank_ic", lambda s: s.dropna().astype(float).mean()),
        mean_ic=("ic", lambda s: s.dropna().astype(float).mean()),
        mean_mse_learnt=("mse_learnt", "mean"),
        degenerate=("degenerate", "sum"), symbols=("symbol", "nunique"))
    degenerate = metrics[metrics["degenerate"].astype(bool)][["symbol", "model", "mode", "version"]]
    tuned = tuned_vs_default(comparison, pooled)
    sections = [
        ("Setup", "\n".join(f"- **{k}**: {v}" for k, v in header.items())),
        ("Seeds: daily cross-sectional metrics, mean ± sd over seeds (test segment)",
         _plus_minus(seeds).to_html(index=False, float_format="%.4f") + f"<p>{SEEDS_NOTE}</p>"),
        ("Paired differences of daily Rank IC", pairs.to_html(index=False, float_format="%.4f") if len(pairs) else "one model"),
        ("Per-symbol vs pooled (mean over symbols, test segment)",
         comparison.to_html(float_format="%.4f") + f"<p>{UNITS_NOTE}</p>"),
        ("Tuned vs seed defaults", tuned.to_html(index=False, float_format="%.4f") if len(tuned) else "no tuned workflow in the store"),
        ("Pooled models: daily cross-sectional IC", pooled.drop(columns=["provider", "data_span"], errors="ignore")
         .to_html(index=False, float_format="%.4f") if not pooled.empty else "none"),
        ("Time-series Rank IC by symbol and model (blank: degenerate)", table.to_html(float_format="%.4f", na_rep="")),
        ("Degenerate entries (near-constant predictions)", degenerate.to_html(index=False) if len(degenerate) else "none"),
        ("Failed entries", "<br>".join(html.escape(f"{f['workflow']} {f['mode']} {f['symbol']}: {f['error']}")
                                      for f in failures) or "none"),
    ]
    body = "".join(f"<h2>{title}</h2>\n{content if content.startswith('<') else '<p>' + content.replace(chr(10), '<br>') + '</p>'}\n"
                   for title, content in sections)
    body += "".join(f"<h2>{name}</h2><img src='data:image/png;base64,{base64.b64encode(data).decode()}'>"
                    for name, data in images.items())
    files["report.html"] = (f"<!doctype html><html><head><meta charset='utf-8'><title>VN30 baselines</title></head>"
                            f"<body><h1>VN30 baseline report</h1>{body}</body></html>\n").encode()
    markdown = ["# VN30 baseline report", "", *[f"- **{k}**: {v}" for k, v in header.items()], "",
                "## Seeds: daily cross-sectional metrics, mean ± sd over seeds (test segment)", "",
                _markdown(_plus_minus(seeds)), "", SEEDS_NOTE, "",
                "## Paired differences of daily Rank IC", "", _markdown(pairs) if len(pairs) else "one model", "",
                "## Per-symbol vs pooled (mean over symbols, test segment)", "", _markdown(comparison.reset_index()), "",
                UNITS_NOTE, "",
                "## Tuned vs seed defaults", "", _markdown(tuned) if len(tuned) else "no tuned workflow in the store", "",
                "## Pooled models: daily cross-sectional IC", "",
                _markdown(pooled.drop(columns=["provider", "data_span"], errors="ignore")) if not pooled.empty else "none", "",
                "## Time-series Rank IC by symbol and model (blank: degenerate)", "",
                _markdown(table.set_axis([f"{m} {mode}" for m, mode in table.columns], axis=1).reset_index()), "",
                "## Degenerate entries", "", _markdown(degenerate) if len(degenerate) else "none", "",
                "## Failed entries", "", *([f"- {f['model'] if 'model' in f else Path(f['workflow']).stem} "
                                             f"{f['mode']} {f['symbol']}: {f['error']}" for f in failures] or ["none"]), "",
                *[f"![{name}]({name})" for name in images], ""]
    files["report.md"] = "\n".join(markdown).encode()
    _write_report(out, files, previous)
    return {name: out / name for name in ["report.md", "report.html", "metrics.csv", "metrics.json", *images]}


def _report_entries(out: Path) -> set[str]:
    """The files an earlier report's marker in ``out`` names (empty for a missing or empty folder);
    `FileExistsError` when ``out`` is a file or holds anything else."""
    if not out.exists():
        return set()
    if not out.is_dir():
        raise FileExistsError(f"{out}: is a file, not a folder; choose a new or empty folder for the report")
    found = {path.name for path in out.iterdir()}
    try:
        marker = json.loads((out / MARKER).read_text())
        written = set(marker["entries"]) & REPORT_FILES if marker.get("written_by") == "vn30_qlib" else set()
    except (OSError, ValueError, TypeError, KeyError, AttributeError):
        written = set()
    ours = written | {MARKER} | {_partial_name(name) for name in written | {MARKER}}
    foreign = sorted(found - ours)
    if foreign:
        shown = ", ".join(foreign[:5]) + (", ..." if len(foreign) > 5 else "")
        raise FileExistsError(f"{out}: holds files the report did not write ({shown}); choose a new or empty "
                              "folder for --out")
    return written


def _write_report(out: Path, files: dict[str, bytes], previous: set[str]) -> None:
    """Write ``files`` into ``out``, each atomically; the marker names every file of the old and the new report
    while they are written, then the new one's only, once the old report's other files are removed."""
    out.mkdir(parents=True, exist_ok=True)
    _replace(out / MARKER, _marker(previous | set(files)))
    for name, data in files.items():
        _replace(out / name, data)
    for name in previous - set(files):
        (out / name).unlink(missing_ok=True)
        (out / _partial_name(name)).unlink(missing_ok=True)
    _replace(out / MARKER, _marker(set(files)))


def _marker(entries: set[str]) -> bytes:
    return (json.dumps({"written_by": "vn30_qlib", "entries": sorted(entries)}, indent=2) + "\n").encode()


def _partial_name(name: str) -> str:
    return f".{name}.partial"


def _replace(path: Path, data: bytes) -> None:
    partial = path.with_name(_partial_name(path.name))
    partial.unlink(missing_ok=True)  # a killed run's; "xb" then never writes through a link
    with open(partial, "xb") as handle:
        handle.write(data)
    os.replace(partial, path)


def _markdown(frame: pd.DataFrame) -> str:
    def cell(value) -> str:
        if isinstance(value, float):
            return "" if pd.isna(value) else f"{value:.4f}"
        return str(value)

    lines = ["| " + " | ".join(map(str, frame.columns)) + " |", "|" + "---|" * len(frame.columns)]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in frame.itertuples(index=False)]
    return "\n".join(lines)
