"""Paired comparisons of two policies evaluated on the same episodes (same task, same seed).

Two success rates measured on the same seeds are not independent samples: most episodes come out
the same for both, and only the discordant ones (one succeeds, the other fails) carry evidence.
Comparing two Wilson intervals throws that pairing away and needs far more episodes to resolve a
difference. Here:

- `pair_outcomes` matches two evaluations episode by episode and refuses anything unmatched;
- `mcnemar_exact`: the exact (binomial) McNemar test on the discordant pairs, two-sided;
- `paired_bootstrap`: the difference in success rate with a 95% interval from resampling the
  pairs (within each task, so every resample keeps the task mix of the evaluation).

Outcomes are mappings {task: {seed: success}}; `outcomes_of` builds one from EvalResults-style
episode records ({"task", "seed", "success"}).
"""
from __future__ import annotations

from typing import Iterable, Mapping

import numpy as np

Outcomes = Mapping[str, Mapping[int, bool]]

__all__ = ["outcomes_of", "pair_outcomes", "mcnemar_exact", "paired_bootstrap", "compare_paired"]


def outcomes_of(episodes: Iterable[Mapping]) -> dict[str, dict[int, bool]]:
    """{task: {seed: success}} from episode records; a (task, seed) seen twice is refused."""
    out: dict[str, dict[int, bool]] = {}
    for ep in episodes:
        task, seed = str(ep["task"]), int(ep["seed"])
        per_task = out.setdefault(task, {})
        if seed in per_task:
            raise ValueError(f"episode ({task}, seed {seed}) appears twice")
        per_task[seed] = bool(ep["success"])
    return out


def pair_outcomes(a: Outcomes, b: Outcomes) -> dict[str, np.ndarray]:
    """Per task, an array [n, 2] of (a's success, b's success) over the seeds both ran.

    Raises ValueError when the two evaluations did not run the same tasks and seeds: a paired
    test on a partial match would silently compare different episodes."""
    if set(a) != set(b):
        raise ValueError(f"the evaluations ran different tasks: only in the first {sorted(set(a) - set(b))}, "
                         f"only in the second {sorted(set(b) - set(a))}")
    pairs = {}
    for task in sorted(a):
        seeds_a, seeds_b = set(a[task]), set(b[task])
        if seeds_a != seeds_b:
            raise ValueError(f"task {task}: the evaluations ran different seeds "
                             f"({len(seeds_a - seeds_b)} only in the first, {len(seeds_b - seeds_a)} only in the second)")
        seeds = sorted(seeds_a)
        pairs[task] = np.array([[a[task][s], b[task][s]] for s in seeds], dtype=bool).reshape(-1, 2)
    if not any(len(p) for p in pairs.values()):
        raise ValueError("no episodes to compare")
    return pairs


def mcnemar_exact(pairs: Mapping[str, np.ndarray]) -> dict:
    """Exact McNemar test: among the discordant pairs, is "a wins" as likely as "b wins"?

    Returns a_only (a succeeded, b failed), b_only, and the two-sided p-value of the binomial
    test of a_only ~ Bin(a_only + b_only, 1/2) (1.0 when there is no discordant pair)."""
    from scipy.stats import binomtest

    both = np.concatenate([p for p in pairs.values()])
    a_only = int(np.sum(both[:, 0] & ~both[:, 1]))
    b_only = int(np.sum(~both[:, 0] & both[:, 1]))
    n = a_only + b_only
    p = 1.0 if n == 0 else float(binomtest(a_only, n, 0.5, alternative="two-sided").pvalue)
    return {"a_only": a_only, "b_only": b_only, "p_value": p}


def paired_bootstrap(pairs: Mapping[str, np.ndarray], resamples: int = 10_000, seed: int = 0,
                     level: float = 0.95) -> dict:
    """Success rate of a minus that of b over all paired episodes, with a percentile interval
    from resampling the pairs within each task."""
    if resamples < 100:
        raise ValueError(f"resamples must be >= 100, got {resamples}")
    rng = np.random.default_rng(seed)
    diffs = {t: (p[:, 0].astype(np.int64) - p[:, 1].astype(np.int64)) for t, p in pairs.items() if len(p)}
    total = sum(len(d) for d in diffs.values())
    sums = np.zeros(resamples)
    for d in diffs.values():
        if (d == d[0]).all():       # a task where every pair differs alike resamples to itself
            sums += d.sum()
            continue
        idx = rng.integers(0, len(d), size=(resamples, len(d)))
        sums += d[idx].sum(axis=1)
    boot = sums / total
    tail = (1 - level) / 2
    lo, hi = np.quantile(boot, [tail, 1 - tail])
    return {"difference": float(sum(d.sum() for d in diffs.values()) / total),
            "ci": [float(lo), float(hi)], "level": level, "resamples": resamples, "episodes": total}


def compare_paired(a: Outcomes, b: Outcomes, *, resamples: int = 10_000, seed: int = 0) -> dict:
    """Both tests at once: {"episodes", "difference", "ci", "a_only", "b_only", "p_value"}."""
    pairs = pair_outcomes(a, b)
    boot = paired_bootstrap(pairs, resamples=resamples, seed=seed)
    return {"episodes": boot["episodes"], "difference": boot["difference"], "ci": boot["ci"],
            **mcnemar_exact(pairs)}
