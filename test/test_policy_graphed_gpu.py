"""GraphedForward with real CUDA graphs (skipped without a GPU): graph == eager on the shipped
`tiny` policy (fp32 and bf16) and on it quantized by a shipped plan; one graph per batch size,
each replaying fresh inputs after the others were captured (the graphs share one pool);
PolicyServer serving from a graph, and a reload capturing while another thread serves."""
import threading
from pathlib import Path

import numpy as np
import pytest
import torch

from qvla_ros.policy import load_policy
from qvla_ros.policy.graphed import CUDA_GRAPH, GraphedForward
from qvla_ros.quant import load_quantized_policy

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]

PLAN = str(Path(__file__).resolve().parent.parent / "config" / "plans" / "tiny_qvla_4.0.json")
TEXTS = ["open the drawer", "close the window", "push the button", "turn the faucet"]


def observation(cfg, batch, seed=0):
    rng = np.random.default_rng(seed)
    images = torch.from_numpy(rng.integers(0, 256, (batch, cfg.n_cams, cfg.image_size, cfg.image_size, 3),
                                           dtype=np.uint8))
    proprio = torch.from_numpy(rng.standard_normal((batch, cfg.proprio_dim)).astype(np.float32))
    return images, [TEXTS[(seed + i) % len(TEXTS)] for i in range(batch)], proprio


def eager(policy, obs):
    with torch.inference_mode():
        out = policy(*obs)
    torch.cuda.synchronize()
    return out


POLICIES = {
    "tiny-fp32": (lambda: load_policy(None, device="cuda"), 1e-4),
    "tiny-bf16": (lambda: load_policy(None, device="cuda", dtype=torch.bfloat16), 2e-2),
    "tiny-qvla4": (lambda: load_quantized_policy(None, PLAN, device="cuda"), 2e-2),
}


@pytest.fixture(scope="module", params=sorted(POLICIES))
def policy_and_tol(request):
    build, tol = POLICIES[request.param]
    return build(), tol


def test_graph_matches_eager_and_each_shape_gets_its_graph(policy_and_tol):
    policy, tol = policy_and_tol
    runner = GraphedForward(policy)
    cfg = policy.config
    for step, batch in enumerate([1, 1, 3, 1, 3]):
        obs = observation(cfg, batch, seed=step)  # fresh inputs every call
        out = runner(*obs)
        assert runner.forward_mode == CUDA_GRAPH, runner.forward_mode
        torch.testing.assert_close(out, eager(policy, obs), rtol=tol, atol=tol)
    assert len(runner.shapes) == 2  # batch 1 and batch 3
    kept = runner(*observation(cfg, 1, seed=10))
    copy = kept.clone()
    runner(*observation(cfg, 1, seed=11))
    assert torch.equal(kept, copy)  # calls return clones, not the static output


def test_capture_then_verify(policy_and_tol):
    policy, tol = policy_and_tol
    runner = GraphedForward(policy, lazy=False)
    cfg = policy.config
    probe = observation(cfg, 1, seed=0)
    torch.testing.assert_close(runner.capture(*probe), eager(policy, probe), rtol=tol, atol=tol)
    assert runner.verify(*observation(cfg, 1, seed=1)) and runner.forward_mode == CUDA_GRAPH
    two = observation(cfg, 2, seed=2)  # lazy=False: an unseen shape runs eagerly
    torch.testing.assert_close(runner(*two), eager(policy, two), rtol=tol, atol=tol)
    assert len(runner.shapes) == 1


def test_policy_server_serves_the_graph_and_a_reload_captures_beside_serving():
    from qvla_ros.ros.policy_server import PolicyServer

    server = PolicyServer(device="cuda")
    assert server.forward_mode == CUDA_GRAPH, server.forward_mode
    cfg = server.config
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (cfg.n_cams, cfg.image_size, cfg.image_size, 3), np.uint8)
    proprio = rng.standard_normal(cfg.proprio_dim).astype(np.float32)
    obs = (torch.from_numpy(images)[None], ["open the drawer"], torch.from_numpy(proprio)[None])
    quantized = load_quantized_policy(None, PLAN, device="cuda")
    refs = {"": eager(load_policy(None, device="cuda"), obs)[0].float().cpu().numpy(),
            quantized.qvla_plan_id: eager(quantized, obs)[0].float().cpu().numpy()}
    del quantized
    result = server.infer(images, "open the drawer", proprio)
    np.testing.assert_allclose(result.actions, refs[""], atol=1e-4)

    stop, seen, errors = threading.Event(), [], []

    def serve():
        while not stop.is_set():
            try:
                r = server.infer(images, "open the drawer", proprio)
                seen.append((r.plan_id, r.actions))
            except Exception as exc:  # noqa: BLE001 - any failure here fails the test below
                errors.append(exc)
                return

    thread = threading.Thread(target=serve)
    thread.start()
    try:
        served = server.reload(PLAN)
        for _ in range(200):  # a few forwards on the new plan
            if sum(p == served.plan_id for p, _ in seen) >= 3:
                break
            threading.Event().wait(0.01)
    finally:
        stop.set()
        thread.join()
    assert not errors, errors
    assert served.forward_mode == CUDA_GRAPH, served.forward_mode
    assert {p for p, _ in seen} <= {"", served.plan_id} and any(p == served.plan_id for p, _ in seen)
    for plan_id, actions in seen:
        np.testing.assert_allclose(actions, refs[plan_id], atol=2e-2)


def test_eval_factory_on_cuda_runs_graphs():
    pytest.importorskip("metaworld")   # the eval factory imports the simulator (absent on the GPU machine)
    from qvla_ros.policy.wrappers import InstructionSwap
    from qvla_ros.sim.factories import CheckpointPolicyFactory

    policy = CheckpointPolicyFactory(None, plan=PLAN, device="cuda")()
    assert isinstance(policy, GraphedForward)
    reference = load_quantized_policy(None, PLAN, device="cuda")
    swap = InstructionSwap(policy, {"open the drawer": "close the window"})
    for batch in (4, 2):
        obs = observation(policy.config, batch, seed=batch)
        torch.testing.assert_close(swap(*obs), eager(InstructionSwap(reference, swap.mapping), obs),
                                   rtol=2e-2, atol=2e-2)
    assert policy.forward_mode == CUDA_GRAPH and len(policy.shapes) == 2
