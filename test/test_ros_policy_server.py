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
