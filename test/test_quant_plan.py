"""BitPlan files and quantize_ on a real (micro, random-weight) policy: round trips, bytes, errors."""
import base64
import json
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch

from qvla_ros.policy import make_policy
from qvla_ros.quant.api import load_quantized_policy, quantize_, quantized_weight_nbytes
from qvla_ros.quant.checkpoint import disk_weight_nbytes, load_quantized, save_quantized
from qvla_ros.quant.mixed_linear import MixedBitLinear
from qvla_ros.quant.plan import BitPlan, PlanError, plan_from_bits
from qvla_ros.quant.targets import quantizable_linears


def _inputs(policy, b=2, seed=0):
    gen = torch.Generator().manual_seed(seed)
    cfg = policy.config
    images = torch.randint(0, 256, (b, cfg.n_cams, cfg.image_size, cfg.image_size, 3), generator=gen,
                           dtype=torch.uint8)
    return images, ["open the drawer"] * b, torch.randn(b, cfg.proprio_dim, generator=gen)


def _mixed_plan(policy, seed=0, **kw):
    """Random tile-respecting widths over every quantizable layer."""
    rng = np.random.default_rng(seed)
    bits = {}
    for name, linear in quantizable_linears(policy).items():
        n = linear.out_features
        per_tile = rng.choice([0, 2, 3, 4, 8, 16], size=n // 16, p=[.1, .2, .2, .3, .1, .1])
        bits[name] = rng.permutation(np.repeat(per_tile, 16))
    return plan_from_bits(policy, bits, **kw)


@pytest.fixture(scope="module")
def policy():
    return make_policy("micro", seed=0)


def test_plan_roundtrip_and_stable_id(policy, tmp_path):
    plan = _mixed_plan(policy, budget_bits_per_param=4.0, action_cost=0.125,
                       provenance={"calibration": {"frames": 8}})
    path = plan.save(tmp_path / "p.json")
    loaded = BitPlan.load(path, model=policy)
    assert loaded.plan_id == plan.plan_id and len(plan.plan_id) == 16
    for name, layer in plan.layers.items():
        assert np.array_equal(loaded.layers[name].bits, layer.bits)
    assert loaded.provenance == {"calibration": {"frames": 8}}
    assert loaded.weight_nbytes() == plan.weight_nbytes()
    # the id is a hash of content: saving again (another time stamp) keeps it, any change moves it
    assert BitPlan.from_json(plan.to_json()).plan_id == plan.plan_id
    other = _mixed_plan(policy, seed=1)
    assert other.plan_id != plan.plan_id
    text = path.read_text()
    assert '"plan_id"' in text and "bits/param" in plan.summary()


def test_corrupt_plans_are_named(policy, tmp_path):
    plan = _mixed_plan(policy)
    text = plan.to_json()
    doc = json.loads(text)

    def load_doc(d):
        p = tmp_path / "bad.json"
        p.write_text(json.dumps(d) if not isinstance(d, str) else d)
        return BitPlan.load(p)

    with pytest.raises(PlanError, match="truncated"):
        load_doc(text[: len(text) // 2])
    with pytest.raises(PlanError, match="no bit plan file"):
        BitPlan.load(tmp_path / "missing.json")
    with pytest.raises(PlanError, match="not a qvla-bitplan"):
        load_doc({"hello": 1})
    # a figure edited by hand
    edited = json.loads(text)
    edited["predicted"]["weight_bytes"] += 1
    with pytest.raises(PlanError, match="edited or damaged"):
        load_doc(edited)
    # an unknown width written into a layer's bits
    bad = json.loads(text)
    layer = bad["layers"][0]
    bits = np.full(layer["out_features"], 5, dtype=np.uint8)
    layer["bits"] = base64.b64encode(zlib.compress(bits.tobytes())).decode()
    with pytest.raises(PlanError, match=r"unknown bit-widths \[5\]"):
        load_doc(bad)
    # wrong channel count
    short = json.loads(text)
    layer = short["layers"][1]
    layer["bits"] = base64.b64encode(zlib.compress(np.full(3, 4, np.uint8).tobytes())).decode()
    with pytest.raises(PlanError, match=f"3 channel widths for {layer['out_features']} output channels"):
        load_doc(short)
    # counts disagreeing with the bits
    counts = json.loads(text)
    counts["layers"][0]["counts"]["16"] += 1
    with pytest.raises(PlanError, match="disagree"):
        load_doc(counts)
    # garbage in the bits field
    garbage = json.loads(text)
    garbage["layers"][0]["bits"] = "@@@"
    with pytest.raises(PlanError, match="not valid zlib"):
        load_doc(garbage)
    # a plan for a newer format
    newer = dict(doc, version=99)
    with pytest.raises(PlanError, match="version 99"):
        load_doc(newer)


def test_plan_for_another_model_is_refused(policy, tmp_path):
    plan = _mixed_plan(policy)
    other_weights = make_policy("micro", seed=1)
    with pytest.raises(PlanError, match="other weights"):
        plan.check_model(other_weights)
    other_arch = make_policy(policy.config.replace(num_layers=1), seed=0)
    with pytest.raises(PlanError, match="another model"):
        plan.check_model(other_arch)
    with pytest.raises(PlanError, match="other weights"):
        quantize_(other_weights, plan)
    assert not any(isinstance(m, MixedBitLinear) for m in other_weights.modules())


def test_quantize_measure_save_load(policy, tmp_path):
    torch.manual_seed(0)
    qpolicy = make_policy("micro", seed=0)
    plan = _mixed_plan(qpolicy, seed=3)
    inputs = _inputs(qpolicy)
    with torch.no_grad():
        reference = qpolicy(*inputs)
    quantize_(qpolicy, plan)
    layers = {n: m for n, m in qpolicy.named_modules() if isinstance(m, MixedBitLinear)}
    assert set(layers) == set(plan.layers)
    for name, m in layers.items():
        assert np.array_equal(m.bits_per_row().numpy(), plan.layers[name].bits)
    with torch.no_grad():
        out = qpolicy(*inputs)
    assert out.shape == reference.shape and torch.isfinite(out).all()
    assert not torch.equal(out, reference)
    # memory: measured on the tensors, and on disk, equals the plan's prediction
    measured = quantized_weight_nbytes(qpolicy)
    assert measured == plan.weight_nbytes()
    directory = save_quantized(qpolicy, plan, tmp_path / "q")
    assert disk_weight_nbytes(directory, plan) == plan.weight_nbytes()
    reloaded = load_quantized(directory)
    with torch.no_grad():
        assert torch.equal(reloaded(*inputs), out)
    assert reloaded.qvla_plan_id == plan.plan_id
    # quantizing twice is refused
    with pytest.raises(PlanError, match="already quantized"):
        quantize_(qpolicy, plan)


def test_load_quantized_policy_from_float_checkpoint(policy, tmp_path):
    policy.save_pretrained(tmp_path / "float")
    plan = _mixed_plan(policy, act_bits=8)
    plan_path = plan.save(tmp_path / "plan.json")
    q = load_quantized_policy(tmp_path / "float", plan_path, cache_dequantized=True)
    assert q.qvla_plan_id == plan.plan_id
    assert all(m.act_bits == 8 for m in q.modules() if isinstance(m, MixedBitLinear))
    with torch.no_grad():
        assert torch.isfinite(q(*_inputs(q))).all()
    f = load_quantized_policy(tmp_path / "float", None)
    assert f.qvla_plan_id is None
    wrong = _mixed_plan(make_policy("micro", seed=7)).save(tmp_path / "wrong.json")
    with pytest.raises(PlanError, match="other weights"):
        load_quantized_policy(tmp_path / "float", wrong)


def test_random_edits_and_truncations_raise_plan_error_only(policy, tmp_path):
    """Every damaged variant of a real plan file is refused with PlanError (never another error)."""
    text = _mixed_plan(policy).to_json()
    rng = np.random.default_rng(0)
    path = tmp_path / "fuzz.json"
    for trial in range(150):
        chars = list(text)
        kind = trial % 3
        if kind == 0:
            chars = chars[: int(rng.integers(0, len(chars)))]
        elif kind == 1:
            for _ in range(int(rng.integers(1, 4))):
                chars[int(rng.integers(0, len(chars)))] = chr(int(rng.integers(32, 127)))
        else:
            at = int(rng.integers(0, len(chars)))
            chars[at:at] = list(rng.choice(["NaN", "1e999", "[[[[", "\"\"", "-1", "null"]))
        edited = "".join(chars)
        try:  # an edit that leaves the content as it was (e.g. one digit of the time stamp) is no damage
            same = {k: v for k, v in json.loads(edited).items() if k != "created"} == \
                {k: v for k, v in json.loads(text).items() if k != "created"}
        except (ValueError, AttributeError, RecursionError):
            same = False
        if same:
            continue
        path.write_text(edited)
        with pytest.raises(PlanError):
            BitPlan.load(path)


def test_compressed_bits_cannot_inflate_past_the_layer(policy):
    doc = json.loads(_mixed_plan(policy).to_json())
    layer = doc["layers"][0]
    layer["bits"] = base64.b64encode(zlib.compress(bytes(10 ** 7))).decode()
    with pytest.raises(PlanError, match="more than"):
        BitPlan.from_document(doc)


def test_a_plan_cannot_declare_unbounded_channels_in_all(policy, monkeypatch):
    """Every layer within its own cap, but together more than any model: refused before the later
    layers are decoded (so a file of many huge layers cannot make decoding allocate without end)."""
    import qvla_ros.quant.plan as plan_module

    decoded = []
    real_decode = plan_module._decode_bits
    monkeypatch.setattr(plan_module, "_decode_bits", lambda *a: decoded.append(a[1]) or real_decode(*a))
    doc = json.loads(_mixed_plan(policy).to_json())
    template = doc["layers"][0]
    size = plan_module.MAX_TOTAL_CHANNELS // 2
    zeros = base64.b64encode(zlib.compress(bytes(size), 9)).decode()
    doc["layers"] = [{**template, "name": f"huge.{i}", "out_features": size,
                      "counts": {"0": size, "2": 0, "3": 0, "4": 0, "8": 0, "16": 0},
                      "bits": zeros} for i in range(3)]
    with pytest.raises(PlanError, match="output channels in all"):
        BitPlan.from_document(doc)
    assert len(decoded) == 2  # the third layer was refused before its bits were inflated


def _whole_by_state_dict(model, plan):
    """(every weight, stored bits of all but the planned weights) of a float model, from its
    state_dict: what the whole-policy record must say."""
    state = model.state_dict()
    params = sum(t.numel() for t in state.values())
    bits = sum(t.numel() * t.element_size() * 8 for t in state.values())
    planned = sum(state[f"{name}.weight"].numel() * state[f"{name}.weight"].element_size() * 8 for name in plan.layers)
    return params, bits - planned


def test_whole_policy_record(policy, tmp_path):
    plan = _mixed_plan(policy, budget_bits_per_param=4.0)
    params, rest = _whole_by_state_dict(policy, plan)
    assert plan.version == 2 and plan.whole == {"params": params, "rest_bits": rest}
    assert plan.whole_bits_per_param() == pytest.approx((plan.weight_bits() + rest) / params)
    assert plan.whole_bits_per_param() > plan.bits_per_param()  # micro keeps ~30% of its weights fp32
    doc = json.loads(plan.to_json())
    assert doc["version"] == 2 and doc["whole"]["rest_bits"] == rest and doc["budget"]["scope"] == "planned"
    assert doc["predicted"]["whole_bytes"] == (plan.weight_bits() + rest + 7) // 8
    loaded = BitPlan.load(plan.save(tmp_path / "p.json"), model=policy)
    assert loaded.whole == plan.whole and loaded.plan_id == plan.plan_id
    assert "over the whole policy" in loaded.summary()
    # the record is part of the content: an edit is caught
    doc["whole"]["rest_bits"] += 8
    with pytest.raises(PlanError, match="plan_id"):
        BitPlan.from_document(doc)
    doc["whole"] = {"params": 10, "rest_bits": 0}
    with pytest.raises(PlanError, match="whole"):
        BitPlan.from_document(doc)
    del doc["whole"]
    with pytest.raises(PlanError, match="lacks 'whole'"):
        BitPlan.from_document(doc)


@pytest.mark.parametrize("budget", ["2.5", "3.0", "4.0", "6.0"])
def test_shipped_version1_plans_load_unchanged(budget):
    """config/plans/ holds version 1 plans (no whole-policy record): they load, keep their id, are
    written back byte for byte the same content, and get their whole figure from the model."""
    from qvla_ros.policy import load_policy

    path = Path(__file__).resolve().parents[1] / "config" / "plans" / f"tiny_qvla_{budget}.json"
    doc = json.loads(path.read_text())
    policy = load_policy(None)
    plan = BitPlan.load(path, model=policy)
    assert plan.version == 1 and plan.whole is None and plan.plan_id == doc["plan_id"]
    assert json.loads(plan.to_json()) == doc
    assert plan.whole_bits_per_param() is None and "unknown" in plan.summary()
    params, rest = _whole_by_state_dict(policy, plan)
    assert plan.whole_record(policy) == {"params": params, "rest_bits": rest}
    assert plan.whole_bits_per_param(policy) == pytest.approx((plan.weight_bits() + rest) / params)
    assert plan.bits_per_param() == pytest.approx(float(budget))
