"""The one writer of Qlib providers: ingest and simulate both go through `write_provider`.

Qlib's day-frequency file format:
- ``calendars/day.txt``: one trading day per line (YYYY-MM-DD);
- ``instruments/{market}.txt``: ``SYMBOL<TAB>first_day<TAB>last_day`` per line;
- ``features/{symbol lower-case}/{field}.day.bin``: little-endian float32, the first value is the calendar
  index of the instrument's first day, then one value per calendar day up to its last day (NaN where the
  instrument has no bar).

Safety of ``out_dir`` (nothing this package did not write is ever deleted):
- every provider written here holds the marker `MARKER` listing its top-level entries; ``out_dir`` may be a
  missing path, an empty folder or a marked provider holding only those entries. A Qlib provider written by
  something else (calendars/, instruments/, features/ and nothing more) is replaced only with ``force``;
  any other folder, a file, the home folder, and a folder that contains or lies inside an input is refused.
- the new provider is written into a sibling ``.NAME.writing-*`` folder (holding `WRITING_MARKER` until it
  is complete) and exchanged with the old one atomically (Linux ``renameat2(RENAME_EXCHANGE)``), so a
  complete provider is at ``out_dir`` at every instant. Elsewhere two renames are used and the next write
  restores a marked ``.NAME.old-*`` folder when ``out_dir`` is missing. Each write removes the marked
  ``.NAME.writing-*`` / ``.NAME.old-*`` leftovers of killed runs.
"""
from __future__ import annotations

import ctypes
import errno
import json
import os
import shutil
import socket
import sys
import tempfile
from pathlib import Path
from typing import Iterable, Mapping, Sequence

import numpy as np
import pandas as pd

BAR_FIELDS = ("open", "high", "low", "close", "volume")
DERIVED_FIELDS = ("vwap", "factor", "change")
FIELDS = BAR_FIELDS + DERIVED_FIELDS
MARKER = "vn30_provider.json"
WRITING_MARKER = ".vn30_provider_writing.json"
FORMAT_VERSION = 1
QLIB_ENTRIES = frozenset({"calendars", "instruments", "features"})
UNMARKED_REPORTS = frozenset({"ingest_report.json", "simulate_params.json"})  # of providers older than MARKER
FLOAT32_MAX = float(np.finfo("<f4").max)
RENAME_EXCHANGE = 2  # renameat2 flag, linux/fs.h
AT_FDCWD = -100  # renameat2: paths relative to the working directory


class IngestError(ValueError):
    """Input or an output folder the data commands refuse; the message names the file and, where there is
    one, the line. Nothing on disk has been changed when it is raised."""


def derive_fields(bars: pd.DataFrame) -> pd.DataFrame:
    """Add the fields Qlib's exchange and Alpha158 read but a daily OHLCV export lacks.

    - ``vwap``: typical price ``(high + low + close) / 3``; the exports carry no traded value, so the true
      volume-weighted price is unknown and the typical price is its usual proxy.
    - ``factor``: 1.0; the prices are already back-adjusted, so adjusted price == stored price.
    - ``change``: ``close / previous close - 1`` over the instrument's previous bar (NaN on its first bar);
      Qlib's exchange compares it with the price limit.

    Where ``bars`` already holds a derived field (an update keeps the stored values of the days a provider
    held, `read_features`), its values are kept and only the missing ones computed.
    """
    out = bars.loc[:, list(BAR_FIELDS)].astype("float64")
    out["vwap"] = (out["high"] + out["low"] + out["close"]) / 3.0
    out["factor"] = 1.0
    out["change"] = out["close"] / out["close"].shift(1) - 1.0
    for field in DERIVED_FIELDS:
        if field in bars:
            out[field] = bars[field].astype("float64").where(bars[field].notna(), out[field])
    return out


def read_features(provider_dir: str | Path, symbol: str, calendar: pd.DatetimeIndex) -> pd.DataFrame:
    """The stored `FIELDS` of one instrument as written (float32 values widened to float64), indexed by the
    days of ``calendar`` (the provider's) on which it has a bar; `IngestError` naming the file when one is
    missing or does not fit the calendar."""
    folder = Path(provider_dir).expanduser() / "features" / symbol.lower()
    columns = {}
    for field in FIELDS:
        path = folder / f"{field}.day.bin"
        stored = np.fromfile(path, dtype="<f4") if path.is_file() else np.empty(0, dtype="<f4")
        first = float(stored[0]) if len(stored) else float("nan")
        if len(stored) < 2 or not first.is_integer() or not 0 <= first <= len(calendar) - (len(stored) - 1):
            raise IngestError(f"{path}: missing, or does not fit the provider's {len(calendar)}-day calendar")
        columns[field] = pd.Series(stored[1:].astype("float64"), index=calendar[int(first):int(first) + len(stored) - 1])
    frame = pd.DataFrame(columns)
    return frame.loc[frame["close"].notna()]


def read_calendar(provider_dir: str | Path) -> pd.DatetimeIndex:
    """The provider's trading calendar."""
    path = Path(provider_dir).expanduser() / "calendars" / "day.txt"
    return pd.DatetimeIndex(pd.to_datetime(path.read_text().split()), name="datetime")


def read_instruments(provider_dir: str | Path, market: str) -> pd.DataFrame:
    """The ``instruments/{market}.txt`` file as a frame with columns symbol, start, end."""
    path = Path(provider_dir).expanduser() / "instruments" / f"{market}.txt"
    return pd.read_csv(path, sep="\t", names=["symbol", "start", "end"], parse_dates=["start", "end"])


def check_out_dir(out_dir: str | Path, inputs: Iterable[str | Path] = (), force: bool = False) -> Path:
    """Resolve ``out_dir`` and raise `IngestError` unless writing a provider there destroys only what this
    package wrote (see the module docstring); ``inputs`` are the files and folders the provider is made from.

    A provider left at ``.NAME.old-*`` by a run killed between the two renames of a swap is moved back first.
    """
    out = Path(out_dir).expanduser().resolve()
    if out == Path.home().resolve() or out.parent == out:
        raise IngestError(f"{out}: refusing to write a provider over the {'home' if out.parent != out else 'root'} "
                          "folder; choose a new or empty folder")
    for given in inputs:
        source = Path(given).expanduser().resolve()
        if source == out or source.is_relative_to(out):
            raise IngestError(f"{out}: refusing to write the provider here, it holds the input {source}")
        if out.is_relative_to(source):
            raise IngestError(f"{out}: refusing to write the provider inside the input folder {source}")
    if out.exists() and not out.is_dir():
        raise IngestError(f"{out}: is a file, not a folder; choose a new or empty folder for the provider")
    recover_interrupted_swap(out)
    if not out.is_dir():
        return out
    entries = sorted(path.name for path in out.iterdir())
    marker = _read_marker(out / MARKER)
    if marker is not None:
        foreign = sorted(set(entries) - set(marker["entries"]))
        if foreign:
            raise IngestError(f"{out}: a vn30-qlib provider that also holds {foreign}, which vn30-qlib did not "
                              "write; move them out first")
    elif entries and not _is_qlib_provider(out):
        shown = ", ".join(entries[:5]) + (", ..." if len(entries) > 5 else "")
        raise IngestError(f"{out}: holds files vn30-qlib did not write ({shown}); choose a new or empty folder")
    elif entries and not force:
        raise IngestError(f"{out}: a Qlib provider without vn30-qlib's {MARKER} (written by another tool or an "
                          "earlier vn30-qlib); pass --force to replace it")
    return out


def recover_interrupted_swap(out_dir: str | Path) -> None:
    """Where ``out_dir`` is missing and a marked ``.NAME.old-*`` sibling exists (a run killed between the two
    renames of a swap without an atomic exchange), move the newest one back."""
    out = Path(out_dir).expanduser().resolve()
    if os.path.lexists(out) or not out.parent.is_dir():
        return
    olds = [p for p in _siblings(out, "old") if _read_marker(p / MARKER) is not None]
    if olds:
        os.rename(max(olds, key=lambda p: p.stat().st_mtime_ns), out)


def write_provider(
    out_dir: str | Path,
    bars: Mapping[str, pd.DataFrame],
    calendar: Sequence[pd.Timestamp],
    markets: Mapping[str, Sequence[str]],
    extra_files: Mapping[str, object] | None = None,
    inputs: Iterable[str | Path] = (),
    force: bool = False,
) -> Path:
    """Write a complete provider to ``out_dir``, replacing any provider there only once all is written.

    ``bars`` maps a symbol to a frame indexed by date with the `BAR_FIELDS` columns; every date must be in
    ``calendar``. ``markets`` maps a market name to its symbols. ``extra_files`` maps a file name inside the
    provider to a JSON-serialisable object. ``out_dir`` must pass `check_out_dir` (with ``inputs`` and
    ``force``). The same input always gives byte-identical files.
    """
    inputs = list(inputs)
    out_dir = check_out_dir(out_dir, inputs, force)
    cal = pd.DatetimeIndex(sorted(pd.to_datetime(list(calendar)))).normalize()
    if cal.has_duplicates:
        raise ValueError("calendar has duplicate days")
    for market, symbols in markets.items():
        unknown = sorted(set(symbols) - set(bars))
        if unknown:
            raise ValueError(f"market {market!r} names symbols without bars: {unknown}")
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    _remove_leftovers(out_dir)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.writing-", dir=out_dir.parent))
    try:
        tmp.chmod(0o777 & ~_current_umask())  # mkdtemp's 0700 would hide the provider from the user's other accounts
        _write_json(tmp / WRITING_MARKER, {"written_by": "vn30_qlib", "pid": os.getpid(), "host": socket.gethostname()})
        spans = _write_features(tmp, bars, cal)
        (tmp / "calendars").mkdir()
        (tmp / "calendars" / "day.txt").write_text("".join(f"{d:%Y-%m-%d}\n" for d in cal))
        (tmp / "instruments").mkdir()
        for market, symbols in markets.items():
            lines = [f"{s}\t{spans[s][0]:%Y-%m-%d}\t{spans[s][1]:%Y-%m-%d}\n" for s in sorted(symbols)]
            (tmp / "instruments" / f"{market}.txt").write_text("".join(lines))
        for name, payload in (extra_files or {}).items():
            _write_json(tmp / name, payload)
        _write_marker(tmp, sorted(QLIB_ENTRIES | {MARKER, *(extra_files or {})}))
        (tmp / WRITING_MARKER).unlink()
        check_out_dir(out_dir, inputs, force)  # nothing foreign may have appeared there while writing
        _swap_into_place(tmp, out_dir)
    except BaseException:
        _remove_ours(tmp)
        raise
    return out_dir


def _write_features(root: Path, bars: Mapping[str, pd.DataFrame], cal: pd.DatetimeIndex) -> dict:
    spans = {}
    for symbol in sorted(bars):
        frame = derive_fields(bars[symbol].sort_index())
        dates = pd.DatetimeIndex(frame.index).normalize()
        if len(dates) == 0:
            raise ValueError(f"{symbol}: no bars to write")
        outside = dates[~dates.isin(cal)]
        if len(outside):
            raise ValueError(f"{symbol}: {len(outside)} bar dates are not in the calendar, first {outside[0]:%Y-%m-%d}")
        first, last = cal.get_loc(dates[0]), cal.get_loc(dates[-1])
        frame.index = dates
        frame = frame.reindex(cal[first : last + 1])
        folder = root / "features" / symbol.lower()
        folder.mkdir(parents=True)
        for field in FIELDS:
            values = np.concatenate([[first], frame[field].to_numpy(dtype="float64")]).astype("<f4")
            if np.isinf(values).any():
                day = frame.index[int(np.flatnonzero(np.isinf(values))[0]) - 1]
                raise ValueError(f"{symbol}.{field}: value {frame.at[day, field]} on {day:%Y-%m-%d} is not a finite float32")
            values.tofile(folder / f"{field}.day.bin")
        spans[symbol] = (dates[0], dates[-1])
    return spans


def _write_json(path: Path, payload: object) -> None:
    with open(path, "w") as handle:
        json.dump(payload, handle, indent=2, sort_keys=True, default=str)
        handle.write("\n")


def _write_marker(folder: Path, entries: Sequence[str]) -> None:
    _write_json(folder / MARKER, {"written_by": "vn30_qlib", "format": FORMAT_VERSION, "entries": list(entries)})


def _read_marker(path: Path) -> dict | None:
    """The marker's content when ``path`` is a marker this package wrote, else None."""
    try:
        marker = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(marker, dict) or marker.get("written_by") != "vn30_qlib":
        return None
    return marker if isinstance(marker.get("entries", []), list) else None


def is_vn30_provider(folder: str | Path) -> bool:
    """Whether ``folder`` holds a provider this package wrote (its `MARKER`)."""
    return _read_marker(Path(folder).expanduser() / MARKER) is not None


def _is_qlib_provider(folder: Path) -> bool:
    """calendars/, instruments/ and features/ folders and nothing else (but the report an earlier vn30-qlib
    wrote): a provider another tool, or a vn30-qlib without the marker, wrote."""
    entries = {p.name for p in folder.iterdir()}
    return (QLIB_ENTRIES <= entries <= QLIB_ENTRIES | UNMARKED_REPORTS
            and all((folder / e).is_dir() for e in QLIB_ENTRIES) and len(entries & UNMARKED_REPORTS) <= 1)


def _siblings(out_dir: Path, kind: str) -> list[Path]:
    """The ``.NAME.{kind}-*`` temp folders of ``out_dir`` (not links)."""
    prefix = f".{out_dir.name}.{kind}-"
    return [p for p in out_dir.parent.iterdir() if p.name.startswith(prefix) and p.is_dir() and not p.is_symlink()]


def _remove_leftovers(out_dir: Path) -> None:
    """Remove the temp folders killed runs left beside ``out_dir``: only those this package provably wrote,
    and not the one a live process on this machine is still writing."""
    for folder in _siblings(out_dir, "writing") + _siblings(out_dir, "old"):
        writer = _read_marker(folder / WRITING_MARKER)
        if writer is not None and writer.get("host") == socket.gethostname() and _alive(writer.get("pid")):
            continue
        _remove_ours(folder)


def _alive(pid: object) -> bool:
    if not isinstance(pid, int) or pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _remove_ours(folder: Path) -> None:
    """Delete ``folder`` if it holds a marker this package wrote; an empty folder is removed too, anything
    else is left where it is."""
    if _read_marker(folder / MARKER) is not None or _read_marker(folder / WRITING_MARKER) is not None:
        shutil.rmtree(folder, ignore_errors=True)
    elif folder.is_dir() and not any(folder.iterdir()):
        folder.rmdir()


def _swap_into_place(tmp: Path, out_dir: Path) -> None:
    """Put the complete provider ``tmp`` at ``out_dir``, then remove the old one.

    A foreign Qlib provider being replaced (``force``) gets the marker first, so that whatever is left of it
    after a kill is provably ours to remove.
    """
    if not os.path.lexists(out_dir):
        os.rename(tmp, out_dir)
        return
    entries = sorted(p.name for p in out_dir.iterdir())
    if entries and _read_marker(out_dir / MARKER) is None:
        _write_marker(out_dir, sorted({*entries, MARKER}))
    if _exchange(tmp, out_dir):
        _remove_ours(tmp)
        return
    old = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.old-", dir=out_dir.parent))
    os.rmdir(old)
    os.rename(out_dir, old)
    try:
        os.rename(tmp, out_dir)
    except BaseException:
        os.rename(old, out_dir)
        raise
    _remove_ours(old)



def _exchange(first: Path, second: Path) -> bool:
    """Swap two existing paths in one atomic step (Linux ``renameat2`` with ``RENAME_EXCHANGE``); False where
    the C library, kernel or file system does not offer it."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        renameat2 = ctypes.CDLL(None, use_errno=True).renameat2
    except AttributeError:  # a C library without renameat2 (glibc < 2.28, some musl builds)
        return False
    renameat2.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    renameat2.restype = ctypes.c_int
    if renameat2(AT_FDCWD, os.fsencode(first), AT_FDCWD, os.fsencode(second), RENAME_EXCHANGE) == 0:
        return True
    code = ctypes.get_errno()
    if code in (errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP):
        return False
    raise OSError(code, os.strerror(code), str(first), None, str(second))


def _current_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask
