"""PolicyServer, the ROS-free core of the policy node: serves one plan at a time, swaps plans
only after loading and checking them, refuses bad ones (keeping the old), one reload at a time."""
import threading

import numpy as np
import pytest
import torch

from qvla_ros.policy import make_policy
from qvla_ros.quant import load_quantized_policy, quantizable_linears
from qvla_ros.quant.plan import plan_from_bits
from qvla_ros.ros.policy_server import FULL_PRECISION_ID, PlanRejected, PolicyServer


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("server")
    policy = make_policy("micro", seed=0)
    policy.save_pretrained(root / "ckpt")
    names = quantizable_linears(policy)
    out = {"checkpoint": str(root / "ckpt")}
    for bits in (8, 4):
        plan = plan_from_bits(policy, {n: bits for n in names})
        out[f"w{bits}"] = str(plan.save(root / f"w{bits}.json"))
        out[f"w{bits}_id"] = plan.plan_id
    other_weights = make_policy("micro", seed=1)
    out["other_weights"] = str(plan_from_bits(
        other_weights, {n: 4 for n in quantizable_linears(other_weights)}).save(root / "ow.json"))
    other_model = make_policy("tiny", seed=0)
    out["other_model"] = str(plan_from_bits(
        other_model, {n: 4 for n in quantizable_linears(other_model)}).save(root / "om.json"))
    (root / "edited.json").write_text((root / "w4.json").read_text().replace('"act_bits": 16',
                                                                            '"act_bits": 8', 1))
    out["edited"] = str(root / "edited.json")
    return out


def observation(cfg):
    rng = np.random.default_rng(1)
    return (rng.integers(0, 256, (cfg.n_cams, cfg.image_size, cfg.image_size, 3), np.uint8),
            "close the window", np.array([0.0, 0.5, 0.1, 1.0], np.float32))


def reference(checkpoint, plan, obs):
    policy = load_quantized_policy(checkpoint, plan)
    with torch.inference_mode():
        return policy(torch.from_numpy(obs[0])[None], [obs[1]],
                      torch.from_numpy(obs[2])[None])[0].numpy()


def test_serves_full_precision_then_a_plan(files):
    server = PolicyServer(checkpoint=files["checkpoint"])
    assert server.active.plan_id == FULL_PRECISION_ID and server.active.label == "full precision"
    obs = observation(server.config)
    result = server.infer(*obs)
    assert result.plan_id == "" and result.actions.shape == (4, 4) and result.seconds > 0
    np.testing.assert_allclose(result.actions, reference(files["checkpoint"], None, obs),
                               atol=1e-6)

    served = server.reload(files["w4"])
    assert served.plan_id == files["w4_id"] == server.active.plan_id
    result = server.infer(*obs)
    assert result.plan_id == files["w4_id"]
    np.testing.assert_allclose(result.actions, reference(files["checkpoint"], files["w4"], obs),
                               atol=1e-6)
    assert server.reload("").plan_id == FULL_PRECISION_ID


@pytest.mark.parametrize("plan,reason", [
    ("/no/such/plan.json", "no plan file at '/no/such/plan.json'"),
    ("other_weights", "made for other weights of this architecture"),
    ("other_model", "made for another model"),
    ("edited", "the file was edited or damaged"),
])
def test_a_refused_plan_leaves_the_serving_one(files, plan, reason):
    server = PolicyServer(checkpoint=files["checkpoint"], plan_path=files["w8"])
    before = server.active
    with pytest.raises(PlanRejected, match=reason):
        server.reload(files.get(plan, plan))
    assert server.active is before
    assert server.infer(*observation(server.config)).plan_id == files["w8_id"]


def test_a_bad_starting_plan_is_refused(files):
    with pytest.raises(PlanRejected, match="made for another model"):
        PolicyServer(checkpoint=files["checkpoint"], plan_path=files["other_model"])


def test_two_reloads_at_once_one_is_refused(files):
    server = PolicyServer(checkpoint=files["checkpoint"])
    start = threading.Barrier(2)
    outcomes = []

    def reload(path):
        start.wait()
        try:
            outcomes.append(server.reload(path).plan_id)
        except PlanRejected as exc:
            outcomes.append(str(exc))

    threads = [threading.Thread(target=reload, args=(files[k],)) for k in ("w8", "w4")]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    won = [o for o in outcomes if o in (files["w8_id"], files["w4_id"])]
    refused = [o for o in outcomes if o not in won]
    assert len(won) == 1 and len(refused) == 1, outcomes
    assert "is in progress; ask again when it has finished" in refused[0]
    assert server.active.plan_id == won[0]


class EmulatedGraphs:
    """Stands in for the CUDA backend of GraphedForward on CPU: a "graph" re-runs the captured
    function on its static buffers. Counts captures; `corrupt` is added to replays."""

    captures = 0
    corrupt = 0.0
    frozen = False  # replays give the capture's result whatever the inputs

    def unavailable(self, inputs):
        return None

    def capture(self, fn, warmup):
        type(self).captures += 1
        eager = fn().clone()
        out = fn()
        return {"fn": fn, "out": out, "first": out.clone()}, out, eager

    def replay(self, graph):
        result = graph["first"] if type(self).frozen else graph["fn"]()
        graph["out"].copy_(result + type(self).corrupt)

    def after_failure(self):
        pass


@pytest.fixture
def emulated(monkeypatch):
    import qvla_ros.policy.graphed as graphed

    class Backend(EmulatedGraphs):
        captures = 0
        corrupt = 0.0
        frozen = False

    monkeypatch.setattr(graphed, "CudaGraphBackend", Backend)
    return Backend


def test_on_cpu_the_server_says_it_runs_eagerly(files):
    server = PolicyServer(checkpoint=files["checkpoint"])
    assert server.forward_mode == "eager: the policy runs on cpu; CUDA graphs need a CUDA device"
    assert PolicyServer(checkpoint=files["checkpoint"], cuda_graph=False).forward_mode == \
        "eager: CUDA graphs turned off by the caller"


def test_the_build_captures_and_a_reload_captures_before_it_swaps(files, emulated):
    server = PolicyServer(checkpoint=files["checkpoint"])
    assert server.forward_mode == "cuda-graph" and emulated.captures == 1
    obs = observation(server.config)
    for _ in range(2):
        np.testing.assert_allclose(server.infer(*obs).actions,
                                   reference(files["checkpoint"], None, obs), atol=1e-6)
    assert emulated.captures == 1  # frames replay, they never capture

    old = server.active
    captured_before_swap = []
    real_check = server._check

    def check(served, reference_policy):
        real_check(served, reference_policy)
        captured_before_swap.append((emulated.captures, server.active is old))

    server._check = check
    served = server.reload(files["w4"])
    assert captured_before_swap == [(2, True)] and server.active is served
    assert served.forward_mode == "cuda-graph" and old.forward_mode == "cuda-graph"
    np.testing.assert_allclose(server.infer(*obs).actions,
                               reference(files["checkpoint"], files["w4"], obs), atol=1e-6)
    assert emulated.captures == 2


def test_a_graph_that_fails_its_check_serves_eagerly(files, emulated):
    emulated.corrupt = 0.25
    server = PolicyServer(checkpoint=files["checkpoint"], plan_path=files["w8"])
    assert server.active.plan_id == files["w8_id"]
    assert server.forward_mode.startswith("eager: replay does not match eager: graph output differs")
    obs = observation(server.config)
    np.testing.assert_allclose(server.infer(*obs).actions,
                               reference(files["checkpoint"], files["w8"], obs), atol=1e-6)


def test_a_graph_blind_to_its_inputs_is_caught_on_fresh_inputs(files, emulated):
    # its replay of the probe matches eager; only another observation shows it
    emulated.frozen = True
    server = PolicyServer(checkpoint=files["checkpoint"])
    assert server.forward_mode.startswith("eager: check on fresh inputs failed: graph output "
                                          "differs from eager")
    obs = observation(server.config)
    np.testing.assert_allclose(server.infer(*obs).actions,
                               reference(files["checkpoint"], None, obs), atol=1e-6)
