"""Closed-loop evaluation: counting, chunk execution, worker processes, bad policies."""
import json
from dataclasses import dataclass

import numpy as np
import pytest
import torch

from qvla_ros.sim.evaluate import EvalResults, evaluate
from qvla_ros.sim.expert import ExpertFactory, ScriptedExpert
from qvla_ros.sim.suite import EVAL_SEED_BASE
from qvla_ros.sim.workers import WorkerError


@dataclass
class _Config:
    n_cams: int = 2
    image_size: int = 64
    proprio_dim: int = 4
    horizon: int = 4
    action_dim: int = 4


class StillPolicy:
    """Never moves: fails every task. Counts its calls and checks the inputs it gets."""

    def __init__(self, horizon=4):
        self.config = _Config(horizon=horizon)
        self.calls = []

    def __call__(self, images, instruction, proprio):
        b = images.shape[0]
        assert images.dtype == torch.uint8 and images.shape[1:] == (2, 64, 64, 3)
        assert proprio.dtype == torch.float32 and proprio.shape == (b, 4) and len(instruction) == b
        self.calls.append(b)
        return torch.zeros(b, self.config.horizon, 4)


class ExpertOnlyOn(ScriptedExpert):
    """The expert on one task, motionless on the others."""

    def __init__(self, task):
        super().__init__()
        self.task = task

    def __call__(self, images, instruction, proprio):
        envs = self._envs
        out = super().__call__(images, instruction, proprio)
        for row, env in enumerate(envs):
            if env.task.name != self.task:
                out[row] = 0.0
        return out


class BadShapePolicy:
    config = _Config()

    def __call__(self, images, instruction, proprio):
        return torch.zeros(images.shape[0], 4, 7)


class NaNPolicy:
    config = _Config()

    def __call__(self, images, instruction, proprio):
        out = torch.zeros(images.shape[0], 4, 4)
        out[-1, 2, 1] = float("nan")
        return out


def test_expert_succeeds_and_still_policy_fails_counted_per_task(tmp_path):
    tasks = ["faucet-open", "faucet-close"]
    results = evaluate(lambda: ExpertOnlyOn("faucet-open"), tasks, episodes_per_task=2,
                       batch_size=2, max_steps=90, image_size=32, cameras=("corner",),
                       progress=False, episode_log=tmp_path / "episodes.jsonl")
    assert results.per_task["faucet-open"]["successes"] == 2
    assert results.per_task["faucet-close"]["successes"] == 0
    assert results.overall["successes"] == 2 and results.overall["episodes"] == 4
    assert results.overall["rate"] == pytest.approx(0.5)
    lo, hi = results.overall["ci95"]
    assert lo < 0.5 < hi
    # Failed episodes ran to the step limit; successful ones stopped at success.
    for ep in results.episodes:
        assert (ep["steps"] == 90) != ep["success"]
        assert ep["seed"] >= EVAL_SEED_BASE
    assert len((tmp_path / "episodes.jsonl").read_text().splitlines()) == 4
    results.save(tmp_path)
    loaded = EvalResults.load(tmp_path / "results.json")
    assert loaded.per_task == json.loads(json.dumps(results.per_task))
    assert (tmp_path / "success.png").stat().st_size > 1000


@pytest.mark.parametrize("replan,expected_calls", [(None, 3), (2, 5), (1, 10)])
def test_chunks_run_open_loop_for_replan_steps(replan, expected_calls):
    policy = StillPolicy(horizon=4)
    results = evaluate(lambda: policy, "drawer-close", episodes_per_task=2, batch_size=2,
                       replan_steps=replan, max_steps=10, progress=False)
    assert results.overall["successes"] == 0
    # Both environments ask together (one batched call) every min(replan, horizon) steps.
    assert policy.calls == [2] * expected_calls


def test_worker_processes_match_in_process_run():
    kwargs = dict(tasks="handle-press", episodes_per_task=2, batch_size=1, image_size=32,
                  cameras=("corner",), progress=False)
    here = evaluate(ExpertFactory(), workers=0, **kwargs)
    there = evaluate(ExpertFactory(), workers=1, **kwargs)
    assert here.episodes == there.episodes
    assert there.overall["successes"] == 2


@pytest.mark.parametrize("policy,message", [(BadShapePolicy, r"shape \(1, 4, 7\)"),
                                            (NaNPolicy, "NaN")])
def test_bad_policy_output_is_named(policy, message):
    with pytest.raises(WorkerError, match=message):
        evaluate(policy, "door-close", episodes_per_task=1, max_steps=5, progress=False)


def test_bad_evaluation_requests():
    with pytest.raises(ValueError, match="unknown task"):
        evaluate(ExpertFactory(), "door-opn", episodes_per_task=1, progress=False)
    with pytest.raises(ValueError, match="demonstration range"):
        evaluate(ExpertFactory(), "door-open", seeds=[0, 1], progress=False)
    with pytest.raises(ValueError, match="picklable"):
        evaluate(lambda: StillPolicy(), "door-open", episodes_per_task=1, workers=1, progress=False)


def test_expert_needs_bound_environments():
    with pytest.raises(RuntimeError, match="bind_envs"):
        ScriptedExpert()(torch.zeros(1, 2, 8, 8, 3, dtype=torch.uint8), ["x"], torch.zeros(1, 4))
    assert np.isfinite(ExpertFactory()().config.horizon)


def _alive(pid):
    from pathlib import Path

    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


@pytest.mark.skipif(not __import__("sys").platform.startswith("linux"), reason="Linux parent-death signal")
def test_workers_die_with_a_killed_evaluation(tmp_path):
    """SIGKILL the process running an evaluation: its rollout workers go too (no orphans)."""
    import os
    import signal
    import subprocess
    import sys
    import textwrap
    import time
    from pathlib import Path

    script = tmp_path / "run.py"
    # A policy that never moves and takes a second per chunk: an episode (500 steps, 4-step
    # chunks) lasts minutes, so each worker stays inside its first batch.
    script.write_text(textwrap.dedent("""
        import os
        import time
        from dataclasses import dataclass
        from pathlib import Path
        import torch
        from qvla_ros.sim.evaluate import evaluate

        @dataclass
        class Config:
            n_cams: int = 1
            image_size: int = 32
            proprio_dim: int = 4
            horizon: int = 4
            action_dim: int = 4

        class Still:
            config = Config()
            def __call__(self, images, instruction, proprio):
                # the worker is rolling out: say so once, by its pid
                (Path(os.environ["ROLLING_DIR"]) / str(os.getpid())).touch()
                time.sleep(1.0)
                return torch.zeros(images.shape[0], 4, 4)

        class StillFactory:
            def __call__(self):
                return Still()

        if __name__ == "__main__":
            print("start", flush=True)
            evaluate(StillFactory(), tasks="handle-press", episodes_per_task=4, batch_size=1,
                     max_steps=500, image_size=32, cameras=("corner",), workers=2, progress=False)
    """))
    repo = Path(__file__).resolve().parents[1]
    rolling = tmp_path / "rolling"
    rolling.mkdir()
    proc = subprocess.Popen([sys.executable, str(script)],
                            env=dict(os.environ, PYTHONPATH=str(repo), ROLLING_DIR=str(rolling)),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        assert proc.stdout.readline().strip() == "start"
        # Wait until both workers are inside a rollout (a loaded machine takes a while to spawn
        # them and import torch), so the kill lands mid-episode, not during start-up.
        deadline = time.monotonic() + 300
        while len(list(rolling.iterdir())) < 2 and time.monotonic() < deadline and proc.poll() is None:
            time.sleep(0.5)
        workers = [int(p.name) for p in rolling.iterdir()]
        assert len(workers) == 2, "the evaluation's two workers did not start rolling out"
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
        deadline = time.monotonic() + 20
        while any(_alive(p) for p in workers) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert not any(_alive(p) for p in workers), "rollout workers outlived the killed evaluation"
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_a_graphed_policy_evaluates_as_the_eager_one(tmp_path, monkeypatch):
    # `qvla eval --device cuda` wraps the policy in GraphedForward (the factory below); here a
    # stand-in backend replays the captured forward on CPU: one graph per batch size (2, then 1),
    # the mode in the results' settings. (That replays equal the eager forward is
    # test_policy_graphed.py's; the episodes here only show the plumbing changes nothing.)
    from qvla_ros.policy import make_policy
    import qvla_ros.policy.graphed as graphed
    import qvla_ros.sim.factories as factories

    class Replay:
        captures = []

        def unavailable(self, inputs):
            return None

        def capture(self, fn, warmup):
            Replay.captures.append(fn().shape[0])
            out = fn()
            return {"fn": fn, "out": out}, out, out.clone()

        def replay(self, graph):
            graph["out"].copy_(graph["fn"]())

        def after_failure(self):
            pass

    policy = make_policy("micro", seed=0)
    policy.save_pretrained(tmp_path / "ckpt")
    kwargs = dict(tasks="drawer-close", episodes_per_task=3, batch_size=2, max_steps=6, progress=False)
    plain = evaluate(factories.CheckpointPolicyFactory(tmp_path / "ckpt"), **kwargs)
    assert "forward_modes" not in plain.settings

    monkeypatch.setattr(graphed, "CudaGraphBackend", Replay)
    monkeypatch.setattr(factories, "_is_cuda", lambda device: True)  # as if --device cuda
    factory = factories.CheckpointPolicyFactory(tmp_path / "ckpt")
    assert isinstance(factory(), graphed.GraphedForward) and factory.describe()["cuda_graph"] is True
    assert not isinstance(factories.CheckpointPolicyFactory(tmp_path / "ckpt", cuda_graph=False)(),
                          graphed.GraphedForward)
    Replay.captures.clear()
    run = evaluate(factory, **kwargs)
    assert run.episodes == plain.episodes
    assert Replay.captures == [2, 1] and run.settings["forward_modes"] == ["cuda-graph"]
