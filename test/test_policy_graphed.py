"""GraphedForward on CPU: the eager path (with its reason, output identical to the policy's), and
the graph logic (one graph per input shape, static buffers, clones, checks, fallbacks) through a
stand-in backend whose "graph" re-runs the captured function on the static buffers. The CUDA
graphs themselves are tested in test_policy_graphed_gpu.py."""
import logging

import numpy as np
import pytest
import torch

from qvla_ros.policy import make_policy
from qvla_ros.policy.graphed import CUDA_GRAPH, CudaGraphBackend, GraphedForward
from qvla_ros.policy.wrappers import InstructionSwap


class Emulated:
    """Backend stand-in: capture runs fn (as the warm-up and the capture would), replay runs it
    again on the static input buffers and writes the result into the static output, as a replayed
    graph does. `corrupt` is added to every replay's output (a graph that computes something
    else)."""

    def __init__(self, corrupt: float = 0.0):
        self.captures = 0
        self.replays = 0
        self.corrupt = corrupt

    def unavailable(self, inputs):
        return None

    def capture(self, fn, warmup):
        self.captures += 1
        eager = fn().clone()
        static_out = fn()
        return {"fn": fn, "out": static_out}, static_out, eager

    def replay(self, graph):
        self.replays += 1
        graph["out"].copy_(graph["fn"]() + self.corrupt)

    def after_failure(self):
        pass


@pytest.fixture(scope="module")
def policy():
    return make_policy("micro", seed=0)


def observation(cfg, batch, seed=0):
    rng = np.random.default_rng(seed)
    images = torch.from_numpy(rng.integers(0, 256, (batch, cfg.n_cams, cfg.image_size, cfg.image_size, 3),
                                           dtype=np.uint8))
    proprio = torch.from_numpy(rng.standard_normal((batch, cfg.proprio_dim)).astype(np.float32))
    texts = ["open the drawer", "close the window", "push the button", "turn the faucet"]
    return images, [texts[(seed + i) % len(texts)] for i in range(batch)], proprio


def eager(policy, obs):
    with torch.inference_mode():
        return policy(*obs)


def test_on_cpu_the_eager_path_runs_with_its_reason_and_identical_output(policy, caplog):
    runner = GraphedForward(policy)
    assert runner.graphed and runner.forward_mode == "eager: no graph captured yet"
    obs = observation(policy.config, 2)
    with caplog.at_level(logging.INFO, logger="qvla_ros.policy.graphed"):
        out = runner(*obs)
    assert torch.equal(out, eager(policy, obs))
    assert not runner.graphed and runner.shapes == []
    assert runner.forward_mode == "eager: the policy runs on cpu; CUDA graphs need a CUDA device"
    assert "the policy runs on cpu" in caplog.text
    # capture() on CPU is the eager forward too, and leaves the runner eager
    assert torch.equal(runner.capture(*obs), eager(policy, obs))
    assert runner.config is policy.config


def test_one_graph_per_batch_size_replayed_with_fresh_inputs(policy):
    backend = Emulated()
    runner = GraphedForward(policy, backend=backend)
    for batch, seed in [(1, 0), (3, 1), (1, 2), (3, 3), (1, 4)]:
        obs = observation(policy.config, batch, seed)
        out = runner(*obs)
        torch.testing.assert_close(out, eager(policy, obs), rtol=0, atol=1e-6)
    assert backend.captures == 2 and runner.forward_mode == CUDA_GRAPH
    assert sorted(key[0][0][0] for key in runner.shapes) == [1 * policy.config.n_cams, 3 * policy.config.n_cams]
    # a call returns a clone: the next replay does not change what an earlier call returned
    first = runner(*observation(policy.config, 1, 5))
    kept = first.clone()
    runner(*observation(policy.config, 1, 6))
    assert torch.equal(first, kept)
    assert backend.captures == 2


def test_a_failed_capture_falls_back_to_eager_with_the_reason(policy, monkeypatch, caplog):
    class CudaSaysYes(CudaGraphBackend):
        def unavailable(self, inputs):
            return None

        def after_failure(self):
            self.cleaned = True

    def no_graphs(*args, **kwargs):
        raise RuntimeError("fake capture failure")

    monkeypatch.setattr(torch.cuda, "CUDAGraph", no_graphs)
    backend = CudaSaysYes()
    runner = GraphedForward(policy, backend=backend)
    obs = observation(policy.config, 2, 1)
    with caplog.at_level(logging.WARNING, logger="qvla_ros.policy.graphed"):
        out = runner(*obs)
    assert torch.equal(out, eager(policy, obs))
    assert runner.forward_mode == "eager: capture failed: RuntimeError: fake capture failure"
    assert backend.cleaned and "fake capture failure" in caplog.text
    assert torch.equal(runner(*obs), eager(policy, obs))  # and it stays eager


def test_a_graph_that_differs_from_eager_is_refused(policy):
    # at capture: the first replay is compared with the warm-up's eager output
    runner = GraphedForward(policy, backend=Emulated(corrupt=0.5))
    obs = observation(policy.config, 1)
    assert torch.equal(runner(*obs), eager(policy, obs))
    assert runner.forward_mode.startswith("eager: replay does not match eager: graph output differs")
    # later, on fresh inputs (verify)
    backend = Emulated()
    runner = GraphedForward(policy, backend=backend)
    runner.capture(*obs)
    assert runner.verify(*observation(policy.config, 1, 1)) and runner.forward_mode == CUDA_GRAPH
    backend.corrupt = float("nan")
    assert not runner.verify(*observation(policy.config, 1, 2))
    assert runner.forward_mode == ("eager: check on fresh inputs failed: graph output is non-finite "
                                   "where eager is finite (or the other way round)")
    assert runner.shapes == []


def test_without_lazy_capture_only_capture_makes_graphs(policy, caplog):
    backend = Emulated()
    runner = GraphedForward(policy, lazy=False, backend=backend)
    one, two = observation(policy.config, 1), observation(policy.config, 2)
    captured = runner.capture(*one)
    assert torch.equal(captured, eager(policy, one)) and backend.captures == 1
    with caplog.at_level(logging.WARNING, logger="qvla_ros.policy.graphed"):
        assert torch.equal(runner(*two), eager(policy, two))
        runner(*two)
    assert backend.captures == 1 and caplog.text.count("run eagerly: no graph captured") == 1
    assert runner.forward_mode == CUDA_GRAPH  # the captured shape still replays
    replays = backend.replays
    torch.testing.assert_close(runner(*one), eager(policy, one), rtol=0, atol=1e-6)
    assert backend.replays == replays + 1


def test_max_graphs_bounds_the_cache(policy):
    backend = Emulated()
    runner = GraphedForward(policy, max_graphs=1, backend=backend)
    for batch in (1, 2, 2, 1):
        obs = observation(policy.config, batch)
        torch.testing.assert_close(runner(*obs), eager(policy, obs), rtol=0, atol=1e-6)
    assert backend.captures == 1 and len(runner.shapes) == 1


def test_wrapped_policies_and_policies_without_the_split(policy, monkeypatch):
    swap = InstructionSwap(policy, {"open the drawer": "close the window"})
    obs = observation(policy.config, 2)
    backend = Emulated()
    runner = GraphedForward(swap, backend=backend)
    torch.testing.assert_close(runner(*obs), eager(swap, obs), rtol=0, atol=1e-6)
    assert backend.captures == 1 and not torch.equal(eager(swap, obs), eager(policy, obs))
    # the other way round: InstructionSwap around a runner
    outer = InstructionSwap(GraphedForward(policy, backend=Emulated()), swap.mapping)
    torch.testing.assert_close(outer(*obs), eager(swap, obs), rtol=0, atol=1e-6)

    class ContractOnly:  # e.g. the scripted expert: the contract, no preprocessing split
        config = policy.config

        def __call__(self, images, instruction, proprio):
            return torch.zeros(images.shape[0], 4, 4)

    for plain in (ContractOnly(), InstructionSwap(ContractOnly(), {})):
        runner = GraphedForward(plain, backend=Emulated())
        assert runner.forward_mode.startswith("eager: ") and "has no prepare_inputs" in runner.forward_mode
        assert torch.equal(runner(*obs), torch.zeros(2, 4, 4))

    assert GraphedForward(policy, enabled=False).forward_mode == "eager: CUDA graphs turned off by the caller"
    monkeypatch.setenv("QVLA_CUDA_GRAPH", "0")
    assert GraphedForward(policy, backend=Emulated()).forward_mode == \
        "eager: CUDA graphs turned off (QVLA_CUDA_GRAPH=0)"


def test_moving_the_policy_drops_the_graphs():
    policy = make_policy("micro", seed=3)
    backend = Emulated()
    runner = GraphedForward(policy, backend=backend)
    obs = observation(policy.config, 1)
    runner(*obs)
    assert len(runner.shapes) == 1
    assert runner.to("cpu") is runner and runner.shapes == []
    runner(*obs)
    assert backend.captures == 2

