"""Worker processes that each build a policy once and roll out batches of episodes.

The unit of work is a batch: one task, a list of seeds, run in lockstep by `run_lockstep` on a
batch of environments the worker keeps between batches (building one costs ~1 s). Workers are
started with the "spawn" method: a clean interpreter per worker, so no GL context, MuJoCo state
or torch thread pool is inherited from the parent. `workers=0` runs the same code in-process.
"""
from __future__ import annotations

import multiprocessing as mp
import os
import pickle
from collections import OrderedDict
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

from ..dataset import episode_path, write_episode, write_json_atomic
from .benchmarks import DEFAULT_SUITE, get_benchmark
from .perturb import Perturbation, PerturbedPolicy
from .rollout import EpisodeResult, run_lockstep

__all__ = ["RolloutSettings", "WorkerError", "run_batches", "failed_marker"]

# Environments kept per worker: those of this many most recently used tasks (~140 MB each env
# with its renderer; batches arrive grouped by task, so one task is enough).
_TASKS_CACHED = 1


@dataclass(frozen=True)
class RolloutSettings:
    """How episodes are run.

    Args:
        image_size: camera image side; None = the policy's `config.image_size` (else the suite's).
        cameras: camera names (the first `config.n_cams` are used when the policy says fewer);
            None = the suite's.
        max_steps: steps before an episode counts as failed (None: the suite's).
        replan_steps: actions executed from each chunk; None = the whole chunk.
        record_dir: if set, each successful episode is written there as a demonstration and
            each failed one leaves a marker, so a resumed run skips both.
        torch_threads: torch intra-op threads per worker (None = cores / workers).
        perturbation: what the policy sees changed (sim.perturb); the episodes stay the same.
        suite: the benchmark (sim.benchmarks): which environments, action and proprio sizes.
        keep_unfinished: with record_dir, write an episode that ran out of steps as an episode
            file too (`qvla demos --smoke`: a few steps of one episode, not a demonstration).
    """

    image_size: int | None = None
    cameras: tuple[str, ...] | None = None
    max_steps: int | None = None
    replan_steps: int | None = None
    record_dir: str | None = None
    torch_threads: int | None = None
    perturbation: Perturbation | None = None
    suite: str = DEFAULT_SUITE
    keep_unfinished: bool = False


class WorkerError(RuntimeError):
    """A batch failed inside a worker; the message names the task and seeds."""


def failed_marker(root, task: str, seed: int) -> Path:
    return Path(root) / task / f"seed_{seed:07d}.failed.json"


# Per-process state of a worker.
_STATE: dict = {}


def _die_with_parent() -> None:
    """Ask Linux to SIGKILL this worker when the process that started it dies: a run stopped with
    SIGTERM/SIGKILL (a job scheduler, `kill`) must not leave workers rolling out episodes with
    nobody to collect them. Elsewhere nothing happens (the pool's own shutdown still applies)."""
    import ctypes
    import signal
    import sys

    if not sys.platform.startswith("linux"):
        return
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        PR_SET_PDEATHSIG = 1
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    except (OSError, AttributeError):
        return


def _init_worker(policy_factory: Callable, settings: RolloutSettings, threads: int,
                 parent_pid: int | None = None) -> None:
    # Only remember what to build: the policy is built by the first batch, so a factory that
    # fails raises a normal, readable exception from that batch instead of breaking the pool.
    _die_with_parent()
    if parent_pid is not None and os.getppid() != parent_pid:
        os._exit(1)  # the parent died before the request above took effect
    import torch
    torch.set_num_threads(threads)
    _STATE.clear()
    _STATE.update(factory=policy_factory, settings=settings, envs=OrderedDict())


def _ensure_policy() -> None:
    if "policy" in _STATE:
        return
    settings: RolloutSettings = _STATE["settings"]
    policy = _STATE["factory"]()
    config = getattr(policy, "config", None)
    bench = get_benchmark(settings.suite)
    image_size = settings.image_size or getattr(config, "image_size", None) or bench.image_size
    cameras = tuple(settings.cameras or bench.cameras)
    n_cams = getattr(config, "n_cams", None) or len(cameras)
    bench.check_policy(config, cameras)
    if settings.perturbation is not None and not settings.perturbation.is_identity:
        policy = PerturbedPolicy(policy, settings.perturbation)
    _STATE.update(policy=policy, image_size=int(image_size), cameras=cameras[:n_cams])


def _envs_for(task: str, count: int) -> list:
    cache: OrderedDict = _STATE["envs"]
    envs = cache.pop(task, [])
    settings: RolloutSettings = _STATE["settings"]
    bench = get_benchmark(settings.suite)
    while len(envs) < count:
        envs.append(bench.make_env(task, image_size=_STATE["image_size"], cameras=_STATE["cameras"],
                                   max_steps=settings.max_steps))
    cache[task] = envs
    while len(cache) > _TASKS_CACHED:
        for env in cache.popitem(last=False)[1]:
            env.close()
    return envs[:count]


def _close_envs() -> None:
    for envs in _STATE.get("envs", {}).values():
        for env in envs:
            env.close()
    _STATE.clear()


def _run_batch(task: str, seeds: Sequence[int]) -> tuple[list[dict], dict]:
    settings: RolloutSettings = _STATE["settings"]
    try:
        _ensure_policy()
    except Exception as exc:
        raise WorkerError(f"building the policy failed: {type(exc).__name__}: {exc}") from exc
    envs = _envs_for(task, len(seeds))

    def save(i, result: EpisodeResult, traj) -> None:
        if settings.record_dir is None:
            return
        if result.success or settings.keep_unfinished:
            write_episode(episode_path(settings.record_dir, task, result.seed), traj.images,
                          traj.proprio, traj.actions, envs[i].task.instruction, task, result.seed)
        else:
            write_json_atomic(failed_marker(settings.record_dir, task, result.seed), result.to_dict())

    try:
        results = run_lockstep(_STATE["policy"], envs, list(seeds), settings.replan_steps,
                               record=settings.record_dir is not None, on_episode_end=save)
    except Exception as exc:
        raise WorkerError(f"task {task}, seeds {list(seeds)}: {type(exc).__name__}: {exc}") from exc
    info = {"image_size": _STATE["image_size"], "cameras": list(_STATE["cameras"]), "pid": os.getpid()}
    mode = getattr(_STATE["policy"], "forward_mode", None)  # GraphedForward: graph or eager, why
    if mode is not None:
        info["forward_mode"] = mode
    return [r.to_dict() for r in results], info


def check_picklable(policy_factory: Callable) -> None:
    """A factory that must reach other processes (pool workers, Ray actors) has to pickle."""
    try:
        pickle.dumps(policy_factory)
    except Exception as exc:
        raise ValueError(f"policy_factory must be picklable to reach worker processes "
                         f"({type(exc).__name__}: {exc}); use a module-level class or "
                         "functools.partial of a module-level function") from exc


def run_batches(policy_factory: Callable, batches: Sequence[tuple[str, Sequence[int]]],
                settings: RolloutSettings, workers: int = 0,
                on_batch: Callable[[list[dict], dict], None] | None = None) -> None:
    """Run every (task, seeds) batch; `on_batch(results, info)` is called in this process as each
    batch finishes. The first failing batch stops the run and raises WorkerError."""
    if workers < 0:
        raise ValueError(f"workers must be >= 0, got {workers}")
    if workers > 0:
        check_picklable(policy_factory)
    cores = os.cpu_count() or 1
    threads = settings.torch_threads or max(1, cores // max(1, workers))
    if workers == 0:
        _init_worker(policy_factory, settings, threads)
        try:
            for task, seeds in batches:
                results, info = _run_batch(task, seeds)
                if on_batch is not None:
                    on_batch(results, info)
        finally:
            _close_envs()
        return
    ctx = mp.get_context("spawn")
    with ProcessPoolExecutor(max_workers=workers, mp_context=ctx, initializer=_init_worker,
                             initargs=(policy_factory, settings, threads, os.getpid())) as pool:
        futures = [pool.submit(_run_batch, task, list(seeds)) for task, seeds in batches]
        try:
            for fut in as_completed(futures):
                results, info = fut.result()
                if on_batch is not None:
                    on_batch(results, info)
        except BaseException:
            # Stop at the first failure: drop queued batches, do not wait for running ones.
            pool.shutdown(wait=False, cancel_futures=True)
            raise
