"""The next trading day's signal: ``vn30-qlib predict --date D [--models ...] [--store models] [--provider P]``.

For trading day D the signal is computed with the data up to the last close before it (day t, the provider's
last trading day before D; the label of day t is the return from close t+1 = D to close t+2, so it is traded at
D's close, as in the workflows' backtests). Each chosen model is the latest version of a pooled store entry
(`vn30_qlib.store`), refused unless

- its metadata records the provider fingerprint it was fitted on, and the provider, cut at the last day the model
  saw, is byte for byte that provider (`fingerprint_until`): a provider that was appended to passes, one that was
  rebuilt or re-adjusted does not;
- day t lies after the segments it was fitted and early-stopped on (a prediction there would be in-sample).

The stored dataset config is rebuilt with the handler ending at t and one segment ``[t, t]``. Its processors get
the state they were fitted to (kept as numbers in the version's metadata, `vn30_qlib.processor_state`), so the
features are computed for the model's window before t only; a version without that state (a model ensemble,
whose members fit their own) refits them on the same train window as in the fit. Either way a stored model
re-predicts its test days exactly.

The table has, for every name of market ``vn30``, the combined score (the mean of the models' per-day z-scores),
its rank, each model's score, the 10/50/90 % quantiles of quantile models (the TFT; mean over an ensemble's
seeds), the last close, the ±limit flag and the target portfolio of the workflows' strategy (`Strategy`): the
previous target (the newest earlier signal file beside the output) changed as Qlib's ``TopkDropoutStrategy``
would change it (top ``topk``, at most ``n_drop`` swaps), with new names bought for an equal share
``account / topk`` in whole lots. A name that closed at its price limit on day t is flagged: its order is
unlikely to fill at D's open. Every run is an mlflow run (experiment ``vn30_predict`` in the store's tracking
database) holding the inputs' fingerprints, the model versions used and the table, so a published signal can be
traced and re-produced.
"""
from __future__ import annotations

import copy
import csv
import hashlib
import json
import math
import os
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import pandas as pd

from vn30_qlib import store
from vn30_qlib.data.holidays import hose_trading_days
from vn30_qlib.data.provider import read_calendar, read_features, read_instruments
from vn30_qlib.data.simulate import round_to_tick

EXPERIMENT = "vn30_predict"
SIGNALS = "signals"  # default output folder inside the store: {store}/signals/{D}.csv
QUANTILES = (0.1, 0.5, 0.9)
LEADING_COLUMNS = ("symbol", "rank", "score")
PRICE_DECIMALS = 4
PRICE_TOLERANCE = 1e-4  # thousand VND: float32 storage moves a price by far less than the smallest tick (0.01)
LOOKBACK_MARGIN = 20  # trading days the handler holds before a model's window (`lookback_start`)
LOOKAHEAD_DAYS = 20  # calendar days searched for the next trading day (Tet closes HOSE for 9 at most)


class PredictError(ValueError):
    """A date, model or provider predict refuses, or an input file it cannot read; the message says which and
    what to do. Nothing has been written when it is raised."""


@dataclass(frozen=True)
class Strategy:
    """The workflows' strategy and exchange (``port_analysis_config``): hold the ``topk`` best names, replace at
    most ``n_drop`` a day, ``account`` in thousands of VND, lots of ``trade_unit`` shares, ±``limit`` a day."""

    topk: int
    n_drop: int
    account: float
    trade_unit: int
    limit: float


@dataclass(frozen=True)
class LoadedModel:
    name: str
    version: Path
    model: object
    task: dict
    metadata: dict


def signal_days(provider: str | Path, date: str | None = None) -> tuple[pd.Timestamp, pd.Timestamp]:
    """(D, t): the trading day ``date`` (default: the HOSE trading day after the provider's last day) and the
    provider's last trading day before it, whose close the signal reads. `PredictError` for a day HOSE does not
    trade or one whose last close the provider lacks."""
    calendar = read_calendar(provider)
    last = calendar[-1]
    if date is None:
        day = _next_trading_day(last)
    else:
        try:
            day = pd.Timestamp(date).normalize()
        except ValueError:
            raise PredictError(f"--date {date!r} is not a date (use YYYY-MM-DD)") from None
        if day not in calendar and not _trades(day):
            raise PredictError(f"{day:%Y-%m-%d} is not a HOSE trading day (weekend or holiday); the next one is "
                               f"{_next_trading_day(day):%Y-%m-%d}")
    earlier = calendar[calendar < day]
    if earlier.empty:
        raise PredictError(f"{day:%Y-%m-%d}: the provider {provider} starts {calendar[0]:%Y-%m-%d}, no close before it")
    gap = [d for d in _trading_days_between(earlier[-1], day) if d > last]
    if gap:
        raise PredictError(f"{day:%Y-%m-%d}: the provider {provider} ends {last:%Y-%m-%d} and lacks the close of "
                           f"{gap[-1]:%Y-%m-%d}, the last trading day before it; run vn30-qlib data update first")
    return day, earlier[-1]


def _trades(day: pd.Timestamp) -> bool:
    return len(_hose_days(day, day)) == 1


def _next_trading_day(day: pd.Timestamp) -> pd.Timestamp:
    return _hose_days(day + pd.Timedelta(days=1), day + pd.Timedelta(days=LOOKAHEAD_DAYS))[0]


def _trading_days_between(first: pd.Timestamp, last: pd.Timestamp) -> pd.DatetimeIndex:
    """HOSE trading days strictly between two days."""
    return _hose_days(first + pd.Timedelta(days=1), last - pd.Timedelta(days=1))


def _hose_days(start: pd.Timestamp, end: pd.Timestamp) -> pd.DatetimeIndex:
    try:
        return hose_trading_days(start, end)
    except ValueError as error:  # outside the lunar tables
        raise PredictError(f"{start:%Y-%m-%d}: {error}") from None


def fingerprint_until(provider: str | Path, last_day: str) -> str | None:
    """The sha256 `vn30_qlib.loop.provider_fingerprint` gives the provider cut at ``last_day`` (its calendar,
    instrument lists and feature files as a provider ending that day holds them), i.e. that of the provider a
    model fitted then saw, if nothing before that day has changed since; None when the provider lacks the day."""
    root = Path(provider).expanduser().resolve()
    calendar = read_calendar(root)
    kept = calendar[calendar <= pd.Timestamp(last_day)]
    if kept.empty or kept[-1] != pd.Timestamp(last_day):
        return None
    files = {root / "calendars" / "day.txt": "".join(f"{d:%Y-%m-%d}\n" for d in kept).encode()}
    cut: dict[str, tuple[pd.Timestamp, pd.Timestamp, int]] = {}  # symbol: first day, last day, values kept
    for path in (root / "instruments").glob("*.txt"):
        lines = []
        for symbol, start, _ in read_instruments(root, path.stem).itertuples(index=False):
            if start > kept[-1]:
                continue
            if symbol not in cut:
                days = read_features(root, symbol, calendar).index
                days = days[days <= kept[-1]]
                cut[symbol] = (days[0], days[-1], calendar.get_loc(days[-1]) - calendar.get_loc(days[0]) + 1)
            lines.append(f"{symbol}\t{cut[symbol][0]:%Y-%m-%d}\t{cut[symbol][1]:%Y-%m-%d}\n")
        files[path] = "".join(lines).encode()
    for symbol, (_, _, values) in cut.items():
        for path in (root / "features" / symbol.lower()).glob("*.bin"):
            files[path] = path.read_bytes()[: 4 * (1 + values)]
    digest = hashlib.sha256()
    for path in sorted(files):
        digest.update(str(path.relative_to(root)).encode())
        digest.update(files[path])
    return digest.hexdigest()


def load_models(store_root: str | Path, names: Sequence[str] | None, provider: str | Path,
                signal_day: pd.Timestamp) -> list[LoadedModel]:
    """The latest version of each pooled store entry named (default: every one), checked against the provider
    and the signal day (see the module docstring)."""
    root = Path(store_root).expanduser()
    names = store.named_pooled_entries(root, names)
    fingerprints: dict[str, str | None] = {}
    loaded = []
    for name in names:
        version = store.latest(root / "pooled" / name)
        metadata = store.read_metadata(version)
        recorded = metadata["provider"] if isinstance(metadata["provider"], dict) else {}
        retrain = (f"retrain it on this provider: vn30-qlib loop {metadata.get('entry', {}).get('workflow', 'WORKFLOW')}"
                   f" --modes pooled --provider {provider} --store {root} --force")
        if not isinstance(recorded.get("sha256"), str) or not isinstance(recorded.get("last_day"), str):
            raise PredictError(f"{version}: its metadata records no provider fingerprint, so nothing shows which data "
                               f"it was fitted on; {retrain}")
        last_day = recorded["last_day"]
        if last_day not in fingerprints:
            fingerprints[last_day] = fingerprint_until(provider, last_day)
        if fingerprints[last_day] != recorded["sha256"]:
            raise PredictError(
                f"{version}: fitted on a provider whose data up to {last_day} is not {provider}'s "
                + ("(this provider does not reach that day)" if fingerprints[last_day] is None else
                   f"(sha256 {recorded['sha256'][:12]} then, {fingerprints[last_day][:12]} now: rebuilt or "
                   "re-adjusted since)") + f"; {retrain}")
        fitted_until = max(pd.Timestamp(span[1]) for segment, span in metadata["data_span"].items()
                           if segment != "test")
        if signal_day <= fitted_until:
            raise PredictError(f"{version}: fitted on data up to {fitted_until:%Y-%m-%d} (its train and valid "
                               f"segments); a signal from the close of {signal_day:%Y-%m-%d} would be in-sample")
        model, task, _, metadata = store.load(version)
        store.require_trusted_classes(task["dataset"], version / "config.yaml")
        loaded.append(LoadedModel(name, version, model, task, metadata))
    return loaded


def strategy_of(model: LoadedModel) -> Strategy:
    """The strategy and exchange settings of the model's workflow (its portfolio-analysis record)."""
    for record in model.task.get("record") or []:
        config = (record.get("kwargs") or {}).get("config") if isinstance(record, dict) else None
        if isinstance(config, dict) and "strategy" in config and "backtest" in config:
            strategy, backtest = config["strategy"].get("kwargs", {}), config["backtest"]
            exchange = backtest.get("exchange_kwargs", {})
            try:
                return Strategy(topk=int(strategy["topk"]), n_drop=int(strategy["n_drop"]),
                                account=float(backtest["account"]), trade_unit=int(exchange["trade_unit"]),
                                limit=float(exchange["limit_threshold"]))
            except (KeyError, TypeError, ValueError) as error:
                raise PredictError(f"{model.version / 'config.yaml'}: the portfolio-analysis record lacks a usable "
                                   f"{error} (topk, n_drop, account, trade_unit, limit_threshold)") from None
    raise PredictError(f"{model.version / 'config.yaml'}: no portfolio-analysis record (strategy and backtest), "
                       "so there is no strategy to build the target portfolio from")


def lookback_start(model: object, signal_day: pd.Timestamp) -> pd.Timestamp:
    """The first day the handler must hold for ``model`` to score ``signal_day``: the window of a sequence model
    (``step_len`` days, the largest of an ensemble's members) plus a margin of `LOOKBACK_MARGIN` trading days."""
    from qlib.data import D

    members = getattr(model, "members", None)
    windows = [getattr(member, "step_len", 1) for member in (members if isinstance(members, list) else [model])]
    calendar = D.calendar(end_time=signal_day)
    return pd.Timestamp(calendar[max(0, len(calendar) - max(windows) - LOOKBACK_MARGIN)])


def score_day(models: Sequence[LoadedModel], signal_day: pd.Timestamp) -> pd.DataFrame:
    """Each model's score (``score_{name}``) and, for quantile models, ``{name}_q10/50/90`` of every name the
    models score on ``signal_day`` (Qlib initialised on the provider)."""
    from qlib.data.dataset import DatasetH

    from vn30_qlib.models.model_ensemble import ModelEnsemble
    from vn30_qlib.processor_state import handler_with_state

    datasets: dict[str, DatasetH] = {}
    columns = {}
    for loaded in models:
        handler = copy.deepcopy(loaded.task["dataset"]["kwargs"]["handler"])
        handler.setdefault("kwargs", {})["end_time"] = f"{signal_day:%Y-%m-%d}"
        # a model ensemble's members fit their own handlers' processors: only the slow way for it
        states = None if isinstance(loaded.model, ModelEnsemble) else loaded.metadata.get("processors")
        if states is not None:
            # the processors as fitted: features from a few weeks before the signal day only, not from the train
            # start (Qlib reads the history each feature's window needs before start_time)
            handler["kwargs"]["start_time"] = f"{lookback_start(loaded.model, signal_day):%Y-%m-%d}"
        key = json.dumps([handler, states], sort_keys=True, default=str)
        if key not in datasets:  # models on one handler config share its (slow) feature computation
            built = handler if states is None else handler_with_state(handler, states)
            datasets[key] = DatasetH(handler=built, segments={"test": (signal_day, signal_day)})
        dataset = datasets[key]
        columns[f"score_{loaded.name}"] = loaded.model.predict(dataset, segment="test")
        members = getattr(loaded.model, "members", None) or [loaded.model]
        if all(hasattr(member, "predict_quantiles") for member in members):
            frames = [member.predict_quantiles(dataset, segment="test") for member in members]
            mean = pd.concat(frames).groupby(level=[0, 1]).mean()
            for q in QUANTILES:
                columns[f"{loaded.name}_q{round(q * 100)}"] = mean[f"h1_q{q:g}"]
    table = pd.DataFrame(columns)
    if signal_day not in table.index.get_level_values("datetime"):
        raise PredictError(f"no model scored a name on {signal_day:%Y-%m-%d}: the provider's vn30 market holds no "
                           "name trading that day")
    return table.xs(signal_day, level="datetime")


def combined_score(scores: pd.DataFrame) -> pd.Series:
    """The mean over models of each model's scores z-scored across the day's names, as `ModelEnsemble` combines
    its members (`daily_zscores`: models learn in different units); NaN for a name no model scores."""
    from vn30_qlib.models.model_ensemble import daily_zscores

    one_day = pd.concat({pd.Timestamp(0): scores}, names=["datetime"])
    return daily_zscores(one_day).droplevel("datetime").mean(axis=1).where(scores.notna().any(axis=1))


def price_limit_flags(close: pd.Series, previous_close: pd.Series, limit: float) -> pd.Series:
    """``up`` / ``down`` for names that closed at the HOSE ceiling / floor of their previous close (the limit
    rounded inward to the tick), else an empty string."""
    ceiling = pd.Series(round_to_tick(previous_close * (1 + limit), "down"), index=close.index)
    floor = pd.Series(round_to_tick(previous_close * (1 - limit), "up"), index=close.index)
    flags = pd.Series("", index=close.index, dtype=object)
    flags[close >= ceiling - PRICE_TOLERANCE] = "up"
    flags[close <= floor + PRICE_TOLERANCE] = "down"
    return flags.where(close.notna() & previous_close.notna(), "")


def target_names(scores: pd.Series, held: Sequence[str], topk: int, n_drop: int) -> list[str]:
    """The names held after Qlib's ``TopkDropoutStrategy`` (buy the top, sell the bottom) acts on ``scores``
    with ``held`` names: the held names ranked among the best new ones; at most ``n_drop`` of them that fall to
    the bottom of that list are sold and replaced by the best new names, filling up to ``topk``. A held name
    without a score counts as the worst."""
    scores = scores.dropna()
    last = scores.reindex(list(held)).sort_values(ascending=False, kind="stable").index
    fresh = scores[~scores.index.isin(last)].sort_values(ascending=False, kind="stable").index
    today = fresh[: max(n_drop + topk - len(last), 0)]
    combined = scores.reindex(last.union(today)).sort_values(ascending=False, kind="stable").index
    sell = last[last.isin(combined[len(combined) - n_drop:])] if n_drop > 0 else last[:0]
    buy = today[: max(len(sell) + topk - len(last), 0)]
    return [name for name in last if name not in sell] + list(buy)


def lot_shares(value: float, price: float, lot: int) -> int:
    """The shares ``value`` buys at ``price`` in whole lots (rounded down)."""
    return int(math.floor(value / price / lot + 1e-9)) * lot if price > 0 else 0


def portfolio(table: pd.DataFrame, previous: dict[str, int], strategy: Strategy) -> pd.DataFrame:
    """``previous_shares``, ``target_shares``, ``order`` (buy / sell / hold) and ``order_shares`` for every
    name of ``table`` (columns ``score`` and ``close``)."""
    held = [name for name, shares in previous.items() if shares > 0]
    target = target_names(table["score"], held, strategy.topk, strategy.n_drop)
    out = pd.DataFrame(index=table.index)
    out["previous_shares"] = [previous.get(name, 0) for name in table.index]
    out["target_shares"] = [
        0 if name not in target else previous[name] if name in held else
        lot_shares(strategy.account / strategy.topk, table.at[name, "close"], strategy.trade_unit)
        for name in table.index]
    out["order"] = [("hold" if name in target else "sell") if name in held else ("buy" if name in target else "")
                    for name in table.index]
    out["order_shares"] = (out["target_shares"] - out["previous_shares"]).abs()
    return out


def read_previous(path: Path, lot: int) -> dict[str, int]:
    """The target shares of an earlier signal file; `PredictError` naming the line of a bad row."""
    try:
        with open(path, newline="", encoding="utf-8") as handle:
            rows = list(csv.DictReader(handle))
    except (OSError, UnicodeDecodeError, csv.Error) as error:
        raise PredictError(f"{path}: cannot be read as a signal file ({error})") from None
    shares = {}
    for number, row in enumerate(rows, start=2):
        try:
            value = int(row["target_shares"])
            symbol = row["symbol"].strip()
        except (KeyError, TypeError, ValueError, AttributeError):
            raise PredictError(f"{path}, line {number}: no whole 'target_shares' or no 'symbol' (a signal file "
                               "vn30-qlib predict wrote has both)") from None
        if value < 0 or value % lot:
            raise PredictError(f"{path}, line {number}: target_shares {value} is not a whole number of {lot}-share "
                               "lots")
        shares[symbol] = value
    return shares


def previous_signal(folder: Path, day: pd.Timestamp) -> Path | None:
    """The newest signal file ``YYYY-MM-DD.csv`` in ``folder`` dated before ``day``."""
    dated = []
    for path in folder.glob("*.csv"):
        try:
            date = pd.Timestamp(path.stem)
        except ValueError:
            continue
        if path.stem == f"{date:%Y-%m-%d}" and date < day:
            dated.append((date, path))
    return max(dated)[1] if dated else None


def predict(provider: str | Path, date: str | None = None, store_root: str | Path = "models",
            models: Sequence[str] | None = None, out: str | Path | None = None) -> dict:
    """Compute, write (``out``, default ``{store}/signals/{D}.csv``) and record the signal of trading day
    ``date``; returns the table, the day, the signal day, the output path, the models and the mlflow run id."""
    from vn30_qlib.loop import init_qlib_for, provider_fingerprint

    provider = Path(provider).expanduser().resolve()
    if not (provider / "calendars" / "day.txt").is_file():
        raise PredictError(f"{provider}: not a Qlib provider (calendars/day.txt missing); pass --provider")
    store_root = Path(store_root).expanduser().resolve()
    day, signal_day = signal_days(provider, date)
    out = Path(out).expanduser().resolve() if out else store_root / SIGNALS / f"{day:%Y-%m-%d}.csv"
    _require_ours(out)
    loaded = load_models(store_root, models, provider, signal_day)
    strategy = strategy_of(loaded[0])
    previous_path = previous_signal(out.parent, day)
    previous = read_previous(previous_path, strategy.trade_unit) if previous_path else {}

    init_qlib_for(provider)
    scores = score_day(loaded, signal_day)
    members = read_instruments(provider, "vn30")
    members = members[(members["start"] <= signal_day) & (members["end"] >= signal_day)]["symbol"]
    calendar = read_calendar(provider)
    closes = {symbol: read_features(provider, symbol, calendar)["close"].loc[:signal_day] for symbol in members}
    table = signal_table(scores, closes, signal_day, previous, strategy)

    inputs = {
        "date": f"{day:%Y-%m-%d}", "signal_day": f"{signal_day:%Y-%m-%d}",
        "provider": provider_fingerprint(provider), "strategy": asdict(strategy),
        "models": {m.name: {"version": str(m.version), "config_hash": m.metadata["config_hash"],
                            "fitted_on": m.metadata["provider"]["sha256"], "data_span": m.metadata["data_span"],
                            "training_run": m.metadata.get("mlflow_run_id")} for m in loaded},
        "previous": {"file": str(previous_path), "sha256": store.sha256_file(previous_path)} if previous_path else None,
    }
    run_id = _write_and_record(table, out, inputs, store_root)
    return {"table": table, "date": day, "signal_day": signal_day, "out": out, "models": loaded, "run_id": run_id,
            "inputs": inputs}


def signal_table(scores: pd.DataFrame, closes: dict[str, pd.Series], signal_day: pd.Timestamp,
                 previous: dict[str, int], strategy: Strategy) -> pd.DataFrame:
    """One row per name of ``closes`` (the vn30 names' closes up to the signal day) and of the previous target:
    combined score and rank, the models' columns (``scores``), the close, the limit flag and the orders. A name
    without a bar on the signal day gets no score."""
    table = pd.DataFrame(index=pd.Index(sorted(set(closes) | set(previous)), name="symbol"))
    # stored as float32: rounded to 4 decimals (prices have 2) so the file shows the close that was quoted
    table["close"] = [round(closes[s].get(signal_day, np.nan), PRICE_DECIMALS) if s in closes else np.nan
                      for s in table.index]
    previous_close = pd.Series([closes[s].iloc[-2] if s in closes and len(closes[s]) > 1 else np.nan
                                for s in table.index], index=table.index)
    model_columns = scores.reindex(table.index).where(table["close"].notna(), axis=0)
    table["score"] = combined_score(model_columns[[c for c in scores.columns if c.startswith("score_")]])
    table["rank"] = table["score"].rank(ascending=False, method="first").astype("Int64")
    table = table.join(model_columns)
    table["at_limit"] = price_limit_flags(table["close"], previous_close, strategy.limit)
    table = table.join(portfolio(table, previous, strategy))
    table = table.sort_values(["rank", "symbol"], na_position="last").reset_index()
    return table[list(LEADING_COLUMNS) + [c for c in table.columns if c not in LEADING_COLUMNS]]


def _require_ours(out: Path) -> None:
    """An existing ``out`` may only be a signal file predict wrote (it is replaced); anything else is refused."""
    if out.is_dir() or (out.exists() and not out.is_file()):
        raise PredictError(f"{out}: not a file; --out names the signal's CSV file")
    if out.is_file():
        with open(out, "rb") as handle:
            head = handle.read(64)
        if not head.startswith(",".join(LEADING_COLUMNS).encode() + b","):
            raise PredictError(f"{out}: exists and is not a signal file vn30-qlib predict wrote; choose another --out")


def _write_and_record(table: pd.DataFrame, out: Path, inputs: dict, store_root: Path) -> str:
    """Write the table to ``out`` atomically once the mlflow run holding it and its inputs is recorded."""
    from mlflow.entities import Param
    from mlflow.tracking import MlflowClient

    from vn30_qlib.loop import create_tracking_store, sqlite_tracking_uri

    out.parent.mkdir(parents=True, exist_ok=True)
    tracking_uri = sqlite_tracking_uri(store_root)
    client = MlflowClient(tracking_uri=tracking_uri)
    with tempfile.TemporaryDirectory(prefix=".predict-", dir=out.parent) as folder:
        written = Path(folder) / out.name
        table.to_csv(written, index=False)  # full precision: the file re-produces the scores exactly
        params = {"date": inputs["date"], "signal_day": inputs["signal_day"],
                  "provider": inputs["provider"]["path"], "provider_sha256": inputs["provider"]["sha256"],
                  **{f"model.{name}": entry["version"] for name, entry in inputs["models"].items()}}
        run = client.create_run(create_tracking_store(tracking_uri, EXPERIMENT), run_name=f"signal {inputs['date']}",
                                tags={"signal_sha256": store.sha256_file(written), "output": str(out)})
        try:
            client.log_batch(run.info.run_id, params=[Param(k, str(v)) for k, v in params.items()])
            client.log_dict(run.info.run_id, inputs, "inputs.json")
            client.log_artifact(run.info.run_id, str(written))
        except BaseException:
            client.set_terminated(run.info.run_id, "FAILED")
            raise
        client.set_terminated(run.info.run_id)
        os.replace(written, out)
    return run.info.run_id


def format_signal(result: dict, shown: int = 10) -> str:
    """The printed summary: the day, the models, the best names and the orders."""
    table = result["table"]
    lines = [f"signal for {result['date']:%Y-%m-%d} from the close of {result['signal_day']:%Y-%m-%d}; models: "
             + ", ".join(f"{m.name} {m.version.name}" for m in result["models"])]
    score_columns = [c for c in table.columns if c.startswith("score")]
    top = table.loc[table["rank"].notna()].head(shown)
    lines.append(top[["rank", "symbol", *score_columns, "close", "at_limit"]].to_string(index=False, float_format="%.4f"))
    unscored = table.loc[table["rank"].isna(), "symbol"].tolist()
    if unscored:
        lines.append(f"no bar on {result['signal_day']:%Y-%m-%d}, not scored: {', '.join(unscored)}")
    orders = table.loc[table["order"].isin(["buy", "sell"])]
    for row in orders.itertuples():
        flag = f"  (closed at the limit {row.at_limit}: may not fill at the open)" if row.at_limit else ""
        lines.append(f"{row.order:<4} {row.order_shares:>8,d} {row.symbol} at about {row.close:.2f}{flag}")
    held = table.loc[table["order"] == "hold", "symbol"].tolist()
    lines.append(f"hold: {', '.join(held) or '-'}")
    lines.append(f"written to {result['out']} (mlflow run {result['run_id']}, experiment {EXPERIMENT})")
    return "\n".join(lines)
