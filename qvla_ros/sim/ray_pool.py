"""Rollouts on a Ray cluster: the same batches, the same per-process worker state, the same
results as the local process pool (qvla_ros.sim.workers), for evaluations that outgrow one machine.

    qvla eval --policy ckpt --ray auto --workers 64        # a running cluster (`ray start --head`)
    qvla eval --policy ckpt --ray local --workers 4        # a Ray instance on this machine

Each of `workers` Ray actors (one CPU each) is a rollout worker: it builds the policy once and
keeps its environments between batches, exactly as a pool process does; batches are handed to
whichever actor is free. Every node of the cluster needs this package and the benchmark installed
(the same `make setup`): the actors import qvla_ros there, and the policy factory carries only a
checkpoint path, which must be readable on every node (a shared filesystem). Seeds fix each
episode, so the results do not depend on which actor ran a batch. An address nobody answers on
makes ray.init retry for minutes before it fails (Ray's own behaviour).
"""
from __future__ import annotations

from typing import Callable, Sequence

__all__ = ["run_batches_on_ray"]


class _RolloutActor:
    """A rollout worker inside a Ray actor process: the pool's worker functions, unchanged."""

    def __init__(self, policy_factory, settings, threads: int):
        from .workers import _init_worker

        _init_worker(policy_factory, settings, threads)

    def run(self, task: str, seeds: list[int]):
        from .workers import _run_batch

        return _run_batch(task, seeds)


def _connect(address: str):
    try:
        import ray
    except ImportError as exc:
        raise ValueError(f"--ray needs the ray package ({exc}); without --ray the local process pool runs") from None
    if ray.is_initialized():
        return ray, False
    if address == "local":
        ray.init(include_dashboard=False, log_to_driver=False)
    else:
        try:
            ray.init(address=address, log_to_driver=False)
        except (ConnectionError, RuntimeError, ValueError) as exc:
            raise ValueError(f"cannot reach the Ray cluster at {address!r}: {exc}") from None
    return ray, True


def run_batches_on_ray(policy_factory: Callable, batches: Sequence[tuple[str, Sequence[int]]], settings,
                       address: str, workers: int, threads: int = 1,
                       on_batch: Callable[[list[dict], dict], None] | None = None) -> None:
    """Run every (task, seeds) batch on `workers` Ray actors; `on_batch(results, info)` is called
    here as each batch finishes. The first failing batch stops the run and raises WorkerError."""
    from .workers import WorkerError, check_picklable

    if workers < 1:
        raise ValueError(f"--ray needs --workers >= 1 (actors to start), got {workers}")
    check_picklable(policy_factory)
    ray, started = _connect(address)
    actor_class = ray.remote(num_cpus=1)(_RolloutActor)
    actors = [actor_class.remote(policy_factory, settings, threads) for _ in range(min(workers, len(batches)))]
    # ActorPool hands each batch to whichever actor is free and yields results as they finish.
    from ray.util import ActorPool

    pool = ActorPool(actors)
    try:
        for results, info in pool.map_unordered(lambda actor, b: actor.run.remote(b[0], list(b[1])), batches):
            if on_batch is not None:
                on_batch(results, info)
    except ray.exceptions.RayTaskError as exc:
        cause = getattr(exc, "cause", None)     # the exception raised inside the actor
        if isinstance(cause, WorkerError):
            raise WorkerError(*cause.args) from None
        raise WorkerError(f"a Ray rollout worker failed: {cause!r}") from None
    except ray.exceptions.RayActorError as exc:
        raise WorkerError(f"a Ray rollout worker died: {exc}") from None
    finally:
        for actor in actors:
            ray.kill(actor)
        if started:
            ray.shutdown()
