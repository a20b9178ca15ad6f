"""Rollouts on Ray actors give the episodes the local pool gives; failures are named."""
import pytest

ray = pytest.importorskip("ray", reason="ray is not installed (requirements.txt installs it)")

from qvla_ros.sim.evaluate import evaluate  # noqa: E402
from qvla_ros.sim.expert import ExpertFactory  # noqa: E402
from qvla_ros.sim.factories import CheckpointPolicyFactory  # noqa: E402
from qvla_ros.sim.workers import WorkerError  # noqa: E402

KW = dict(tasks="drawer-open,door-close", episodes_per_task=2, batch_size=1, max_steps=60, progress=False)


def _episodes(results):
    return sorted((e["task"], e["seed"], e["success"], e["steps"]) for e in results.episodes)


def test_local_ray_instance_matches_the_process_pool():
    here = evaluate(ExpertFactory(), workers=0, **KW)
    on_ray = evaluate(ExpertFactory(), workers=2, ray_address="local", **KW)
    assert _episodes(on_ray) == _episodes(here) and len(on_ray.episodes) == 4
    assert on_ray.settings["ray"] == "local" and not ray.is_initialized()   # it stopped what it started


@pytest.fixture
def running_ray():
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


def test_a_failing_worker_stops_the_run_with_its_reason(running_ray):
    # A factory the actors can import (Ray workers do not see the test modules) that fails there.
    with pytest.raises(WorkerError, match="building the policy failed: .*nowhere"):
        evaluate(CheckpointPolicyFactory("/nowhere/ckpt"), workers=2, ray_address="auto", **KW)
    assert ray.is_initialized()   # a cluster it joined is left running


def test_bad_requests():
    with pytest.raises(ValueError, match="--workers >= 1"):
        evaluate(ExpertFactory(), workers=0, ray_address="local", **KW)
