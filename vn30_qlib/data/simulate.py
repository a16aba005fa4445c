"""The offline default market: simulated daily bars of the 30 VN30 stocks, with a planted, known signal.

Every workflow can run without network access on this market, and its one predictable component is known,
so a model's information coefficient can be compared with the strength planted (``signal``), and
``signal=0`` is a leakage canary: nothing in the bars predicts future returns, so any skill a model shows
there comes from look-ahead. `PROCESS` describes the generating process; it also goes into the params.
"""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pandas as pd

from vn30_qlib.data.holidays import hose_trading_days
from vn30_qlib.data.provider import check_out_dir, write_provider
from vn30_qlib.data.sectors import SECTOR, SECTORS, SYMBOLS

DEFAULT_START = "2015-10-05"
DEFAULT_END = "2024-09-30"

# symbol: (first HOSE trading day or None when listed before 2015, start price in thousand VND); sectors are
# `vn30_qlib.data.sectors.SECTOR`. Symbols that moved to HOSE from HNX or UPCoM (ACB, BCM, DGC, LPB, SHB, VIB) trade
# from the start here.
LISTING: dict[str, tuple[str | None, float]] = {
    "ACB": (None, 22.0),
    "BCM": (None, 30.0),
    "BID": (None, 20.0),
    "CTG": (None, 18.0),
    "DGC": (None, 25.0),
    "FPT": (None, 43.0),
    "GAS": (None, 40.0),
    "GVR": ("2021-03-17", 24.0),
    "HDB": ("2018-01-05", 33.0),
    "HPG": (None, 25.0),
    "LPB": (None, 10.0),
    "MBB": (None, 14.0),
    "MSN": (None, 70.0),
    "MWG": (None, 90.0),
    "PLX": ("2017-04-21", 60.0),
    "SAB": ("2016-12-06", 140.0),
    "SHB": (None, 10.0),
    "SSB": ("2021-03-24", 26.0),
    "SSI": (None, 22.0),
    "STB": (None, 12.0),
    "TCB": ("2018-06-04", 128.0),
    "TPB": ("2018-04-19", 32.0),
    "VCB": (None, 46.0),
    "VHM": ("2018-05-17", 115.0),
    "VIB": (None, 18.0),
    "VIC": (None, 45.0),
    "VJC": ("2017-02-28", 110.0),
    "VNM": (None, 120.0),
    "VPB": ("2017-08-17", 40.0),
    "VRE": ("2017-11-06", 45.0),
}
SECTOR_BETA = {
    "banking": 1.15, "consumer": 0.75, "energy": 0.9, "industrials": 0.8,
    "materials": 1.1, "real estate": 1.1, "securities": 1.5, "tech": 0.85,
}

MARKET_VOL = 0.012  # daily sd of the market factor
SECTOR_VOL = 0.008  # daily sd of each sector factor
IDIO_VOL = 0.015  # daily sd of the idiosyncratic noise
MARKET_DRIFT = 0.0003  # daily log drift of the market factor (about +8% a year, like the VN-Index 2015-2024)
BETA_JITTER = 0.1  # beta_i = sector beta * exp(N(0, BETA_JITTER))
PHI = 0.9  # AR(1) coefficient of the signal state
CLV_LOADING = 0.6  # lam: weight of z in the normal score behind the close-location value
# Tick rounding of high, low and close and the price limits blur CLV: over seeds 0-9 the measured Spearman
# correlation came out at 0.95 of what the Gaussian formula of `signal_loading` gives, so k is set for that.
CLV_ATTENUATION = 0.95
LIMIT = 0.07  # HOSE daily price limit relative to the previous close
GAP_SHARE = 0.3  # the overnight gap is GAP_SHARE of the day's return plus noise
GAP_VOL = 0.003
RANGE_MEDIAN = 0.02  # median of the high-low range beyond what the return explains, as a share of close
RANGE_DISPERSION = 0.4  # sd of its log
RANGE_RETURN_LOADING = 0.6  # the range grows by this times |return|
RANGE_FLOOR = 0.003
VOLUME_MEDIAN = 3_000_000  # median of the symbols' typical daily volume, shares
VOLUME_SYMBOL_DISPERSION = 0.8
VOLUME_PHI = 0.97  # AR(1) of the log-volume regime
VOLUME_REGIME_VOL = 0.3  # stationary sd of the log-volume regime
VOLUME_NOISE = 0.35
VOLUME_RETURN_LOADING = 0.25  # log volume rises by this per standard deviation of |return|
LOT = 100

PROCESS = """\
Prices in thousands of VND, one step per HOSE trading day (vn30_qlib.data.holidays.hose_trading_days).
- Log return r[i,t] = beta_i * m[t] + s[g(i),t] + e[i,t] + k * z[i,t-1]: market factor m = MARKET_DRIFT +
  N(0, MARKET_VOL) draws centred over the days, sector factors s = centred N(0, SECTOR_VOL) draws,
  idiosyncratic e ~ N(0, IDIO_VOL); beta_i = sector beta * exp(N(0, BETA_JITTER)).
- Signal state z[i,t] = PHI * z[i,t-1] + sqrt(1 - PHI^2) * eta[i,t], standard normal, one per symbol.
- z is observable through the bar of the same day: its close-location value
  CLV[i,t] = (close - low) / (high - low) is set to q = Phi(lam * z[i,t] + sqrt(1 - lam^2) * u[i,t])
  (lam = CLV_LOADING, Phi the standard normal CDF, u ~ N(0,1)) by placing high = close + (1 - q) * range
  and low = close - q * range; tick rounding and the price limits blur it a little.
- k * z[i,t] enters the return of day t+1; the label Ref($close,-2)/Ref($close,-1)-1 of day t (close t+1
  -> close t+2) holds k * z[i,t+1], whose correlation with z[i,t] is PHI. k is set so that the mean daily
  cross-sectional Spearman correlation between CLV[t] and the label is about `signal`. With signal = 0,
  k = 0 and z shapes the bars only: nothing predicts future returns.
- Closes: previous close * exp(r) rounded to the HOSE tick (0.01 below 10, 0.05 below 50, 0.1 from 50),
  clipped into the +/-7% limits of the previous close rounded inward to the tick. Range = close *
  max(RANGE_RETURN_LOADING * |realised return| + RANGE_MEDIAN * exp(N(0, RANGE_DISPERSION)), RANGE_FLOOR).
  Open = previous close * exp(GAP_SHARE * realised return + N(0, GAP_VOL)) clipped into [low, high].
  Open, high and low are rounded to the tick and kept within the limits and around open and close.
- Volume: exp(symbol level + AR(1) regime (VOLUME_PHI) + VOLUME_RETURN_LOADING * |return| / sd + noise)
  shares, rounded to lots of LOT (at least one lot).
- Symbols trade from their listing day (the first trading day on or after it) on; all draws come from
  numpy's default_rng(seed), so the same arguments give the same bars.
"""
# The regime change of `simulate_market(drift=...)`; it goes into params["drift"] only when a drift is set (the
# stationary market's parameters, and so its provider, stay as they were).
DRIFT_PROCESS = """\
From the drift date on (its first trading day d), the loading of z[i,t-1] in the return of day t is k_after,
calibrated like k for the signal `signal_after` (default -signal: the sign flips). The label of day t holds the
loading of day t+2, so the labels from two trading days before d (first_changed_label) on carry k_after. The
random draws are those of the stationary market with the same seed.
"""


def tick_size(price: np.ndarray) -> np.ndarray:
    """HOSE tick in thousand VND: 10 VND below 10,000 VND, 50 below 50,000, 100 from 50,000 on."""
    price = np.asarray(price, dtype="float64")
    return np.where(price < 10.0, 0.01, np.where(price < 50.0, 0.05, 0.1))


def round_to_tick(price: np.ndarray, how: str = "nearest") -> np.ndarray:
    """Round prices onto the tick grid of their band: ``how`` is nearest, down or up."""
    price = np.asarray(price, dtype="float64")
    tick = tick_size(price)
    steps = {"nearest": np.round(price / tick), "down": np.floor(price / tick + 1e-9),
             "up": np.ceil(price / tick - 1e-9)}[how]
    return np.round(steps * tick, 2)


def signal_loading(
    signal: float, sigma: float, phi: float = PHI, lam: float = CLV_LOADING * CLV_ATTENUATION
) -> float:
    """The loading k of ``z[t-1]`` in the return of day t that makes Spearman(CLV[t], r[t+2]) ~= ``signal``.

    With everything Gaussian, the normal score behind CLV[t] and the label return have Pearson correlation
    ``rho = lam * phi * k / sqrt(k^2 + sigma^2)``, ``sigma`` the cross-sectional sd of the rest of the
    return; Spearman's correlation of a Gaussian pair is ``6/pi * asin(rho/2)``. Solving for k:
    ``rho = 2 sin(pi * signal / 6)``, ``k = rho * sigma / sqrt((lam * phi)^2 - rho^2)``; ``lam`` is the
    CLV loading times `CLV_ATTENUATION`.
    """
    rho = 2.0 * math.sin(math.pi * abs(signal) / 6.0)
    if rho >= lam * phi:
        raise ValueError(f"signal {signal} is out of reach: |signal| must give rho < lam * phi = {lam * phi:.3f}")
    return math.copysign(rho * sigma / math.sqrt((lam * phi) ** 2 - rho**2), signal)


def cross_sectional_sigma(betas: np.ndarray, sectors: list[str]) -> float:
    """Expected within-day cross-sectional sd of ``beta_i * m + s[g(i)] + e_i`` over ``sectors``' symbols."""
    shares = pd.Series(sectors).value_counts(normalize=True).to_numpy()
    var = MARKET_VOL**2 * np.var(betas) + SECTOR_VOL**2 * (1.0 - np.sum(shares**2)) + IDIO_VOL**2
    return float(np.sqrt(var))


def close_location_value(bars: pd.DataFrame) -> pd.Series:
    """The observable of the planted signal: ``(close - low) / (high - low)``, NaN where high == low."""
    span = (bars["high"] - bars["low"]).where(lambda s: s > 0)
    return (bars["close"] - bars["low"]) / span


def measure_signal(bars: dict[str, pd.DataFrame], min_symbols: int = 10) -> dict:
    """Mean daily Spearman correlation between CLV of day t and the label return close t+1 -> close t+2.

    Returns the mean, its t-statistic over days and the number of days with at least ``min_symbols``
    symbols that have both values.
    """
    clv = pd.DataFrame({s: close_location_value(f) for s, f in bars.items()})
    close = pd.DataFrame({s: f["close"] for s, f in bars.items()})
    label = close.shift(-2) / close.shift(-1) - 1.0
    both = clv.notna() & label.notna()
    rx, ry = clv.where(both).rank(axis=1), label.where(both).rank(axis=1)
    rx, ry = rx.sub(rx.mean(axis=1), axis=0), ry.sub(ry.mean(axis=1), axis=0)
    daily = (rx * ry).sum(axis=1) / np.sqrt((rx**2).sum(axis=1) * (ry**2).sum(axis=1))
    daily = daily[both.sum(axis=1) >= min_symbols].dropna()
    mean = float(daily.mean())
    return {"mean": mean, "t_stat": float(mean / daily.std() * np.sqrt(len(daily))), "days": int(len(daily))}


def simulate_market(
    seed: int = 0, signal: float = 0.05, start: str = DEFAULT_START, end: str = DEFAULT_END,
    drift: str | None = None, drift_signal: float | None = None,
) -> tuple[dict[str, pd.DataFrame], pd.DatetimeIndex, dict]:
    """Simulate the VN30 market from ``start`` to ``end``; the same arguments give identical output.

    ``drift``: a date from which the planted signal is ``drift_signal`` (default ``-signal``) instead of
    ``signal`` (`DRIFT_PROCESS`), so that a model fitted before it is wrong after it; None: no regime change.

    Returns (bars, calendar, params): ``bars`` maps each symbol listed by ``end`` to a frame indexed by date
    (from its listing day on) with columns open, high, low, close (float, thousand VND) and volume (int,
    shares); ``calendar`` is `hose_trading_days`; ``params`` describes the process, its constants, the
    per-symbol draws, k and the measured signal (`measure_signal`).
    """
    calendar = hose_trading_days(start, end)
    if len(calendar) < 3:
        raise ValueError(f"{start}..{end} holds fewer than 3 trading days")
    rng = np.random.default_rng(seed)
    n_days, n_sym = len(calendar), len(SYMBOLS)
    sectors = [SECTOR[s] for s in SYMBOLS]
    sector_idx = np.array([SECTORS.index(g) for g in sectors])
    betas = np.array([SECTOR_BETA[g] for g in sectors]) * np.exp(rng.normal(0.0, BETA_JITTER, n_sym))
    sigma = cross_sectional_sigma(betas, sectors)
    k = signal_loading(signal, sigma)

    # the signal state and the returns before limits and ticks
    eta = rng.standard_normal((n_days, n_sym))
    z = np.empty((n_days, n_sym))
    z[0] = eta[0]
    for t in range(1, n_days):
        z[t] = PHI * z[t - 1] + math.sqrt(1.0 - PHI**2) * eta[t]
    market = _centred(rng.normal(0.0, MARKET_VOL, n_days)) + MARKET_DRIFT
    sector = _centred(rng.normal(0.0, SECTOR_VOL, (n_days, len(SECTORS))))
    idio = rng.normal(0.0, IDIO_VOL, (n_days, n_sym))
    planted = np.vstack([np.zeros((1, n_sym)), k * z[:-1]])
    if drift is not None:
        day_index = drift_day(calendar, drift)
        signal_after = -signal if drift_signal is None else drift_signal
        k_after = signal_loading(signal_after, sigma)
        planted[day_index:] = k_after * z[day_index - 1:-1]
    elif drift_signal is not None:
        raise ValueError("drift_signal needs a drift date")
    ret = betas * market[:, None] + sector[:, sector_idx] + idio + planted

    # listing: the first calendar day on or after the listing date
    first = np.array([0 if LISTING[s][0] is None else int(calendar.searchsorted(pd.Timestamp(LISTING[s][0])))
                      for s in SYMBOLS])
    listed = np.arange(n_days)[:, None] >= first[None, :]

    # closes: previous close (the start price before listing) times exp(return), limited and on the tick
    ref = round_to_tick(np.array([LISTING[s][1] for s in SYMBOLS]))
    prev = np.empty((n_days, n_sym))
    close = np.empty((n_days, n_sym))
    for t in range(n_days):
        prev[t] = ref
        cand = round_to_tick(ref * np.exp(ret[t]))
        lo, hi = round_to_tick(ref * (1 - LIMIT), "up"), round_to_tick(ref * (1 + LIMIT), "down")
        close[t] = np.clip(cand, lo, hi)
        ref = np.where(listed[t], close[t], ref)
    floor, ceil = round_to_tick(prev * (1 - LIMIT), "up"), round_to_tick(prev * (1 + LIMIT), "down")

    # bar shape: the range, split around the close so that CLV = q carries z; the open inside the range
    q = _normal_cdf(CLV_LOADING * z + math.sqrt(1.0 - CLV_LOADING**2) * rng.standard_normal((n_days, n_sym)))
    realised = np.log(close / prev)
    span = close * np.maximum(
        RANGE_RETURN_LOADING * np.abs(realised)
        + RANGE_MEDIAN * np.exp(rng.normal(0.0, RANGE_DISPERSION, (n_days, n_sym))),
        RANGE_FLOOR,
    )
    high_raw, low_raw = close + (1.0 - q) * span, close - q * span
    gap = GAP_SHARE * realised + rng.normal(0.0, GAP_VOL, (n_days, n_sym))
    open_ = np.clip(round_to_tick(np.clip(prev * np.exp(gap), low_raw, high_raw)), floor, ceil)
    high = np.maximum(np.minimum(round_to_tick(high_raw), ceil), np.maximum(open_, close))
    low = np.minimum(np.maximum(round_to_tick(low_raw), floor), np.minimum(open_, close))

    # volume: symbol level * persistent regime * |return| effect * noise, in lots
    level = np.log(VOLUME_MEDIAN) + rng.normal(0.0, VOLUME_SYMBOL_DISPERSION, n_sym)
    shocks = rng.normal(0.0, VOLUME_REGIME_VOL * math.sqrt(1 - VOLUME_PHI**2), (n_days, n_sym))
    regime = np.empty((n_days, n_sym))
    regime[0] = rng.normal(0.0, VOLUME_REGIME_VOL, n_sym)
    for t in range(1, n_days):
        regime[t] = VOLUME_PHI * regime[t - 1] + shocks[t]
    vol_sd = np.sqrt((betas * MARKET_VOL) ** 2 + SECTOR_VOL**2 + IDIO_VOL**2)
    log_volume = (level + regime + VOLUME_RETURN_LOADING * np.abs(realised) / vol_sd
                  + rng.normal(0.0, VOLUME_NOISE, (n_days, n_sym)))
    volume = np.maximum(np.round(np.exp(log_volume) / LOT), 1).astype("int64") * LOT

    bars: dict[str, pd.DataFrame] = {}
    for j, symbol in enumerate(SYMBOLS):
        rows = slice(first[j], n_days)
        if first[j] >= n_days:
            continue  # listed after end
        bars[symbol] = pd.DataFrame(
            {"open": open_[rows, j], "high": high[rows, j], "low": low[rows, j], "close": close[rows, j],
             "volume": volume[rows, j]},
            index=pd.DatetimeIndex(calendar[rows], name="datetime"),
        )

    params = {
        "process": PROCESS,
        "seed": seed, "signal": signal, "start": str(start), "end": str(end),
        "label": "Ref($close,-2)/Ref($close,-1)-1 (close t+1 -> close t+2)",
        "observable": "CLV[t] = (close[t] - low[t]) / (high[t] - low[t])",
        "signal_timing": "k * z[t] enters the log return of day t+1; the label at t sees k * z[t+1], corr phi with z[t]",
        "k": k,
        "k_calibration": "rho = 2 sin(pi*signal/6); k = rho*sigma_xs/sqrt((lam*phi)^2 - rho^2), "
                         "lam = CLV_LOADING * CLV_ATTENUATION",
        "sigma_xs": sigma,
        "constants": {name: value for name, value in globals().items()
                      if name.isupper() and isinstance(value, (int, float)) and not isinstance(value, bool)},
        "sector_beta": SECTOR_BETA,
        "symbols": {s: {"sector": sectors[j], "beta": float(betas[j]), "start_price": float(LISTING[s][1]),
                        "first_day": f"{calendar[first[j]]:%Y-%m-%d}" if first[j] < n_days else None,
                        "volume_median": float(np.exp(level[j]))}
                    for j, s in enumerate(SYMBOLS)},
        "measured_signal": measure_signal(bars),
    }
    if drift is not None:
        changed = calendar[day_index - 2]  # the first label that holds k_after
        params["drift"] = {
            "process": DRIFT_PROCESS, "date": f"{calendar[day_index]:%Y-%m-%d}", "signal_before": signal,
            "signal_after": signal_after, "k_before": k, "k_after": k_after,
            "first_changed_label": f"{changed:%Y-%m-%d}",
            "measured_signal_before": measure_signal({s: f[f.index < changed] for s, f in bars.items()}),
            "measured_signal_after": measure_signal({s: f[f.index >= changed] for s, f in bars.items()}),
        }
    return bars, calendar, params


def write_simulated_provider(
    out_dir: str | Path, seed: int = 0, signal: float = 0.05, start: str = DEFAULT_START, end: str = DEFAULT_END,
    force: bool = False, drift: str | None = None, drift_signal: float | None = None,
) -> Path:
    """Simulate the market and write it as a Qlib provider (markets vn30 and all) through `write_provider`.

    ``out_dir`` is checked before simulating (`check_out_dir`; ``force`` replaces a foreign Qlib provider).
    The parameters go to ``simulate_params.json`` in the provider (with a ``drift`` entry when ``drift`` is set).
    """
    check_out_dir(out_dir, force=force)
    bars, calendar, params = simulate_market(seed=seed, signal=signal, start=start, end=end, drift=drift,
                                             drift_signal=drift_signal)
    symbols = sorted(bars)
    return write_provider(out_dir, bars, calendar, markets={"vn30": symbols, "all": symbols},
                          extra_files={"simulate_params.json": params}, force=force)


def drift_day(calendar: pd.DatetimeIndex, drift: str) -> int:
    """Index of the first trading day on or after ``drift``; it must leave days on both sides."""
    try:
        day = pd.Timestamp(drift)
    except ValueError as error:
        raise ValueError(f"drift date {drift!r} is not a date (use YYYY-MM-DD)") from error
    index = int(calendar.searchsorted(day))
    if not 2 <= index < len(calendar) - 2:
        raise ValueError(f"drift date {drift} must fall inside the simulated days {calendar[0]:%Y-%m-%d} .. "
                         f"{calendar[-1]:%Y-%m-%d}, with two trading days on each side")
    return index


def _centred(draws: np.ndarray) -> np.ndarray:
    """The draws less their mean over days, so factor paths end where their drift puts them.

    Without it one seed's market can lose 70% over nine years and push prices to a few hundred VND; the cost
    is a correlation of -1/(days-1) between two days' factor returns, which no model can use.
    """
    return draws - draws.mean(axis=0)


def _normal_cdf(x: np.ndarray) -> np.ndarray:
    """Standard normal CDF, vectorised through erf (no scipy needed)."""
    from math import erf

    return 0.5 * (1.0 + np.vectorize(erf, otypes=[float])(x / math.sqrt(2.0)))
