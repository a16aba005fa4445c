"""The one judge of a modelling choice: a workflow's daily Rank IC over walk-forward folds and several seeds.

The test segment has been looked at too often to choose anything on (a TFT whose defaults were compared there fell
to a one-factor baseline's level on a later period), so a choice is scored on the workflow's train + valid span
only: `vn30_qlib.cv` cuts it into walk-forward folds purged by the label's reach, and the workflow is fitted on
every fold once per seed. Each validation day's Rank IC is averaged over the seeds; the days of all folds make one
daily series, whose mean and standard error are the score. Two workflows on the same folds and seeds are compared
by the paired difference of their daily series, and called level unless its t-stat is at least
`vn30_qlib.report.BEATS_T` in size.

    vn30-qlib harness workflows/lgb_vn30.yaml workflows/tft_vn30.yaml --provider P --seeds 0,1,2

A choice made on the harness's folds has looked at them; ``--folds 8 --skip-last 4`` scores the 4 folds before
them (the same fold length), a period the choice never saw.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Sequence

import numpy as np
import pandas as pd

from vn30_qlib.metrics import paired_difference, standard_error


def harness_score(workflow: str | Path, provider: str | Path, out_dir: str | Path, seeds: Sequence[int] = (0, 1, 2),
                  n_folds: int = 4, valid_days: int = 120, skip_last: int = 0) -> dict:
    """The workflow's score: ``rank_ic_mean`` ± ``rank_ic_se`` of the seed-averaged daily Rank IC over every
    fold's validation days, ``seed_sd`` (the spread of the seeds' own means), the folds' means, ``daily`` (the
    series itself) and ``predictions`` (every seed's validation scores and raw labels, indexed by seed and fold
    besides day and name: ensembles of fitted workflows are scored from them without refitting). Every fold fit
    is a recorder run in ``{out_dir}/mlruns.db`` (experiment ``vn30_cv``). ``skip_last``: of the ``n_folds``
    walk-forward folds, the last ``skip_last`` are neither fitted nor scored."""
    from vn30_qlib.cv import folds_for
    from vn30_qlib.loop import create_tracking_store, init_qlib_for, require_inputs, sqlite_tracking_uri

    if not 0 <= skip_last < n_folds:
        raise ValueError(f"skip_last must be at least 0 and below the {n_folds} folds, got {skip_last}")
    require_inputs([workflow], provider)
    out_dir = Path(out_dir).expanduser()
    out_dir.mkdir(parents=True, exist_ok=True)
    tracking_uri = sqlite_tracking_uri(out_dir)
    create_tracking_store(tracking_uri)
    init_qlib_for(provider, tracking_uri)
    task, folds = folds_for(workflow, provider, n_folds, valid_days)
    folds = folds[:n_folds - skip_last]
    by_seed = seeded_folds(task, folds, seeds, tracking_uri, Path(workflow).stem, dataset_cache={})
    daily = seed_averaged(by_seed)
    seed_means = [float(pd.concat(result["daily_rank_ic"]).mean()) for result in by_seed.values()]
    return {
        "workflow": str(workflow), "seeds": list(seeds), "days": int(daily.notna().sum()),
        "folds": [{"train": f"{f.train[0]:%Y-%m-%d}..{f.train[1]:%Y-%m-%d}",
                   "valid": f"{f.valid[0]:%Y-%m-%d}..{f.valid[1]:%Y-%m-%d}",
                   "rank_ic": float(daily.loc[f.valid[0]:f.valid[1]].mean())} for f in folds],
        "rank_ic_mean": float(daily.mean()), "rank_ic_se": standard_error(daily),
        "seed_sd": float(np.std(seed_means, ddof=1)) if len(seed_means) > 1 else None,
        "daily": daily,
        "predictions": pd.concat({seed: pd.concat(result["predictions"], keys=range(len(folds)), names=["fold"])
                                  for seed, result in by_seed.items()}, names=["seed"]),
    }


def seeded_folds(task: dict, folds: list, seeds: Sequence[int], tracking_uri: str, run_name: str,
                 **cv_options) -> dict[int, dict]:
    """`vn30_qlib.cv.cross_validate` of ``task`` (pooled) once per seed, as the loop sets a seed (`adapt_task`):
    the results by seed, each fold set a parent run ``{run_name}/seed{s}``. ``cv_options``: ``on_fold``,
    ``model_hook``, ``dataset_cache`` (shared by the seeds: the folds' data do not depend on the model)."""
    from vn30_qlib.cv import cross_validate
    from vn30_qlib.loop import adapt_task

    seeds = list(seeds)
    if not seeds or len(set(seeds)) != len(seeds) or not all(isinstance(s, int) for s in seeds):
        raise ValueError(f"seeds must be distinct integers, at least one, got {seeds!r}")
    return {seed: cross_validate(adapt_task(task, "pooled", None, seed=seed), folds, tracking_uri,
                                 f"{run_name}/seed{seed}", **cv_options) for seed in seeds}


def seed_averaged(by_seed: dict[int, dict]) -> pd.Series:
    """The harness's daily series: each validation day's Rank IC averaged over the seeds (`seeded_folds`)."""
    return pd.concat({seed: pd.concat(result["daily_rank_ic"]) for seed, result in by_seed.items()},
                     axis=1).mean(axis=1).rename("rank_ic")


def compare(scores: list[dict]) -> list[dict]:
    """Each workflow after the first against the first: the paired difference of their daily series."""
    from vn30_qlib.report import verdict

    first = scores[0]
    rows = []
    for other in scores[1:]:
        pair = paired_difference(other["daily"], first["daily"])
        rows.append({"workflow": other["workflow"], "against": first["workflow"], **pair,
                     "verdict": verdict(Path(other["workflow"]).stem, Path(first["workflow"]).stem, pair["t"])})
    return rows


def write_results(scores: list[dict], out_dir: str | Path) -> Path:
    """``{out_dir}/harness.json``: the scores without their daily series and predictions, and the comparisons."""
    path = Path(out_dir).expanduser() / "harness.json"
    body = {"scores": [{k: v for k, v in score.items() if k not in ("daily", "predictions")} for score in scores],
            "comparisons": compare(scores)}
    write_json(path, body)
    return path


def write_json(path: Path, body: dict) -> None:
    """``body`` as JSON at ``path``, replaced atomically (the old file or the new one is there at every instant)."""
    partial = path.with_name(path.name + ".partial")
    partial.write_text(json.dumps(body, indent=2, default=str))
    partial.replace(path)
