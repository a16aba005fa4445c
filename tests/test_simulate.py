"""The offline simulated market: calendar, determinism, HOSE price rules, the planted signal, the provider."""
from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest

from vn30_qlib.data.holidays import hose_trading_days, tet_dates
from vn30_qlib.data.simulate import simulate_market, write_simulated_provider

VN30 = sorted(
    "ACB BCM BID CTG DGC FPT GAS GVR HDB HPG LPB MBB MSN MWG PLX SAB SHB SSB SSI STB TCB TPB VCB VHM VIB VIC "
    "VJC VNM VPB VRE".split()
)


@pytest.fixture(scope="module")
def market():
    return simulate_market(seed=0, signal=0.05)


def _wide(bars: dict[str, pd.DataFrame], field: str) -> pd.DataFrame:
    return pd.DataFrame({s: f[field] for s, f in bars.items()})


def _daily_spearman(bars: dict[str, pd.DataFrame]) -> pd.Series:
    """Per day, Spearman between CLV of day t and the label close t+1 -> close t+2, over the symbols."""
    high, low, close = _wide(bars, "high"), _wide(bars, "low"), _wide(bars, "close")
    clv = (close - low) / (high - low).replace(0.0, np.nan)
    label = close.shift(-2) / close.shift(-1) - 1.0
    both = clv.notna() & label.notna()
    daily = clv.where(both).rank(axis=1).corrwith(label.where(both).rank(axis=1), axis=1)
    return daily[both.sum(axis=1) >= 10]


def test_same_seed_same_market_other_seed_other_market(market):
    bars, calendar, params = market
    again, calendar2, params2 = simulate_market(seed=0, signal=0.05)
    assert calendar.equals(calendar2)
    assert sorted(bars) == sorted(again)
    for symbol in bars:
        pd.testing.assert_frame_equal(bars[symbol], again[symbol])
    assert params == params2
    other, _, _ = simulate_market(seed=1, signal=0.05)
    assert not any(bars[s]["close"].equals(other[s]["close"]) for s in bars)


def test_calendar_skips_weekends_and_vietnamese_holidays():
    days = hose_trading_days("2016-01-01", "2024-12-31")
    assert (days.dayofweek < 5).all()
    closed = pd.to_datetime(
        ["2024-02-08", "2024-02-09", "2024-02-12", "2024-02-13", "2024-02-14",  # Tet 2024 (Sat 10 Feb)
         "2023-01-20", "2023-01-26",  # Tet 2023 break edges
         "2023-04-30", "2023-05-01", "2023-05-02", "2023-05-03",  # Hung Kings (Sat 29 Apr), Apr 30 compensated
         "2023-09-01", "2023-09-04",  # National day 2023: Fri 1 and Sat 2 -> Mon 4
         "2024-04-18", "2019-04-15",  # Hung Kings 2024, and 2019's (Sun 14 Apr) compensated on Monday
         "2024-01-01", "2023-01-02", "2024-09-02", "2024-09-03"]
    )
    assert not closed.isin(days).any(), closed[closed.isin(days)]
    open_ = pd.to_datetime(["2024-02-07", "2024-02-15", "2023-04-28", "2023-05-04", "2023-09-05", "2020-09-03"])
    assert open_.isin(days).all(), open_[~open_.isin(days)]
    assert pd.Timestamp("2023-09-02") not in days and pd.Timestamp("2023-04-29") not in days
    # about 250 trading days a year
    assert 245 <= len(hose_trading_days("2023-01-01", "2023-12-31")) <= 252
    tet = tet_dates()
    assert {"2016-02-08", "2020-01-25", "2023-01-22", "2024-02-10"} <= set(tet.strftime("%Y-%m-%d"))
    with pytest.raises(ValueError):
        hose_trading_days("2040-01-01", "2040-12-31")


def test_market_shape_and_listing(market):
    bars, calendar, params = market
    assert sorted(bars) == VN30
    assert calendar.equals(hose_trading_days("2015-10-05", "2024-09-30"))
    for symbol, frame in bars.items():
        assert list(frame.columns) == ["open", "high", "low", "close", "volume"]
        assert frame.index.isin(calendar).all() and frame.index[-1] == calendar[-1]
        assert frame.notna().all().all()
    assert bars["SSB"].index[0] == pd.Timestamp("2021-03-24")
    assert bars["TCB"].index[0] == pd.Timestamp("2018-06-04")
    assert bars["VHM"].index[0] == pd.Timestamp("2018-05-17")
    assert bars["VCB"].index[0] == calendar[0]
    assert params["symbols"]["VCB"]["sector"] == "banking" and params["symbols"]["FPT"]["sector"] == "tech"
    json.dumps(params)  # goes into the provider as JSON


def test_prices_follow_hose_ticks_limits_and_bar_order(market):
    bars, _, _ = market
    for symbol, frame in bars.items():
        for field in ("open", "high", "low", "close"):
            price = frame[field].to_numpy()
            tick = np.where(price < 10, 0.01, np.where(price < 50, 0.05, 0.1))
            steps = price / tick
            assert np.abs(steps - np.round(steps)).max() < 1e-6, (symbol, field)
            assert (price > 0).all()
        prev = frame["close"].shift(1)
        for field in ("open", "high", "low", "close"):
            move = (frame[field] / prev - 1.0).dropna()
            assert move.abs().max() <= 0.07 + 1e-9, (symbol, field, move.abs().max())
        assert (frame["low"] <= frame[["open", "close"]].min(axis=1)).all(), symbol
        assert (frame[["open", "close"]].max(axis=1) <= frame["high"]).all(), symbol
        volume = frame["volume"]
        assert pd.api.types.is_integer_dtype(volume) and (volume > 0).all() and (volume % 100 == 0).all()
    close = _wide(bars, "close")
    returns = np.log(close).diff()
    assert 0.012 < returns.std().median() < 0.035  # daily vol of a VN30 stock
    assert (returns.abs() > 0.069).mean().mean() < 0.01  # limit moves happen, but rarely
    volume = _wide(bars, "volume")
    # volume rises with the size of the move
    assert np.log(volume).corrwith(returns.abs(), method="spearman").mean() > 0.05


@pytest.mark.parametrize("signal, low, high", [(0.1, 0.085, 0.115), (0.05, 0.035, 0.065)])
def test_planted_signal_is_measurable_from_the_bars(signal, low, high):
    bars, _, params = simulate_market(seed=0, signal=signal)
    daily = _daily_spearman(bars)
    assert len(daily) > 2000
    mean, t_stat = daily.mean(), daily.mean() / daily.std() * np.sqrt(len(daily))
    assert low <= mean <= high and t_stat > 4, (mean, t_stat)
    assert params["measured_signal"]["mean"] == pytest.approx(mean, abs=1e-9)


def test_no_signal_means_no_predictability():
    bars, _, params = simulate_market(seed=0, signal=0.0)
    assert params["k"] == 0.0
    daily = _daily_spearman(bars)
    mean, t_stat = daily.mean(), daily.mean() / daily.std() * np.sqrt(len(daily))
    assert abs(mean) < 0.01 and abs(t_stat) < 3, (mean, t_stat)
    # nor does the observable of day t predict the next day's return
    high, low, close = _wide(bars, "high"), _wide(bars, "low"), _wide(bars, "close")
    clv = (close - low) / (high - low).replace(0.0, np.nan)
    nxt = close.shift(-1) / close - 1.0
    assert abs(clv.rank(axis=1).corrwith(nxt.rank(axis=1), axis=1).mean()) < 0.01


def test_provider_holds_the_simulated_closes(tmp_path, market):
    import qlib
    from qlib.data import D

    bars, calendar, params = market
    out = write_simulated_provider(tmp_path / "sim", seed=0, signal=0.05)
    assert out == (tmp_path / "sim").resolve()
    assert json.loads((out / "simulate_params.json").read_text())["k"] == pytest.approx(params["k"])
    qlib.init(provider_uri=str(out), region="cn", kernels=1, expression_cache=None, dataset_cache=None)
    frame = D.features(D.instruments("vn30"), ["$close"], start_time=calendar[0], end_time=calendar[-1])
    got = frame["$close"].unstack(level="instrument")
    assert sorted(got.columns) == VN30
    for symbol, bar in bars.items():
        values = got[symbol].dropna()
        assert values.index.equals(pd.DatetimeIndex(bar.index, name=values.index.name)), symbol
        np.testing.assert_allclose(values.to_numpy(), bar["close"].to_numpy(), rtol=1e-6)
