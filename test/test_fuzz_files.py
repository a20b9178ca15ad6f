"""Property-based tests of the file boundaries: bit plans and policy checkpoints, as a disk, a
network copy or a person with an editor can damage them.

- BitPlan: a real plan for the shipped policy, truncated anywhere, with random bytes (also
  non-UTF-8) written into it, or with any JSON value replaced or deleted. BitPlan.load raises
  PlanError or returns the same plan. Edits whose plan_id is then recomputed (so that the hash
  check cannot catch them) are loaded, checked against the model and quantized: PlanError or a
  working quantized policy, nothing else.
- Checkpoints: model.safetensors truncated, its header bytes changed, a tensor stored with another
  dtype or shape, tensors removed or added, config.json fields given other values (huge ones
  too). load_policy raises CheckpointError or returns exactly the stored weights.

Bounded and derandomized, so CI sees the same examples every run.
"""
import copy
import hashlib
import json
import struct

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from qvla_ros.policy import CheckpointError, load_policy, make_policy
from qvla_ros.quant import quantizable_linears, quantize_
from qvla_ros.quant.plan import BitPlan, PlanError, plan_from_bits

FUZZ = settings(max_examples=40, derandomize=True, deadline=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture,
                                       HealthCheck.data_too_large])
SLOW = settings(FUZZ, max_examples=20)


def mixed_plan(policy, seed=0):
    """Random tile-respecting widths over every quantizable layer (all six widths occur)."""
    rng = np.random.default_rng(seed)
    bits = {}
    for name, linear in quantizable_linears(policy).items():
        per_tile = rng.choice([0, 2, 3, 4, 8, 16], size=max(linear.out_features // 16, 1))
        bits[name] = rng.permutation(np.repeat(per_tile, 16)[: linear.out_features])
    return plan_from_bits(policy, bits, budget_bits_per_param=4.0, action_cost=0.5)


@pytest.fixture(scope="module")
def shipped_plan(tmp_path_factory):
    """A plan for the shipped policy (no plan files are shipped in config/plans yet)."""
    policy = load_policy()
    path = mixed_plan(policy).save(tmp_path_factory.mktemp("plans") / "shipped_mixed.json")
    return path, path.read_bytes(), BitPlan.load(path).plan_id


@pytest.fixture(scope="module")
def micro():
    policy = make_policy("micro", seed=0)
    return policy, mixed_plan(policy).to_json()


def content(doc) -> dict:
    return {k: v for k, v in doc.items() if k != "created"}


def rehash(doc: dict) -> dict:
    """The plan_id the file format defines (sha256 of the canonical JSON of everything but
    plan_id and created, 16 hex digits), written into doc: an edit the hash cannot reveal."""
    body = {k: v for k, v in doc.items() if k not in ("plan_id", "created")}
    canonical = json.dumps(body, sort_keys=True, separators=(",", ":"), allow_nan=False)
    doc["plan_id"] = hashlib.sha256(canonical.encode()).hexdigest()[:16]
    return doc


def json_paths(value, prefix=()):
    """Every location in a JSON document (dict keys and list indices), outermost first."""
    yield prefix
    if isinstance(value, dict):
        for key, item in value.items():
            yield from json_paths(item, prefix + (key,))
    elif isinstance(value, list):
        for i, item in enumerate(value[:3]):  # enough of each list; layers alike
            yield from json_paths(item, prefix + (i,))


JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers(-2 ** 40, 2 ** 40) | st.sampled_from(
        [0, -1, 1, 2, 3, 16, 17, 2 ** 26, 2 ** 31, 2 ** 63, 1e308, 0.5, -0.0]) |
    st.floats(allow_nan=False, allow_infinity=False) | st.text(max_size=12),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=6), inner,
                                                                max_size=4),
    max_leaves=8)


@st.composite
def json_edits(draw, doc):
    """doc with one location replaced by a random JSON value or deleted."""
    doc = copy.deepcopy(doc)
    paths = [p for p in json_paths(doc) if p]
    path = draw(st.sampled_from(paths))
    parent = doc
    for key in path[:-1]:
        parent = parent[key]
    if draw(st.booleans()):
        parent[path[-1]] = draw(JSON_VALUES)
    elif isinstance(parent, dict):
        del parent[path[-1]]
    else:
        parent.pop(path[-1])
    return doc


def check_loaded_plan(plan: BitPlan) -> None:
    """What a plan that loaded promises: every layer has one width in ALL_BITS per channel."""
    for layer in plan.layers.values():
        assert layer.bits.shape == (layer.out_features,)
        assert set(np.unique(layer.bits).tolist()) <= {0, 2, 3, 4, 8, 16}


# ---- bit plans ----------------------------------------------------------------------------------
@FUZZ
@given(data=st.data())
def test_truncated_or_byte_edited_plan_files_are_refused(shipped_plan, tmp_path, data):
    path, raw, plan_id = shipped_plan
    if data.draw(st.booleans(), label="truncate"):
        edited = raw[: data.draw(st.integers(0, len(raw) - 1), label="length")]
    else:
        edited = bytearray(raw)
        for _ in range(data.draw(st.integers(1, 4), label="edits")):
            at = data.draw(st.integers(0, len(raw) - 1), label="at")
            edited[at] = data.draw(st.integers(0, 255), label="byte")
        edited = bytes(edited)
    target = tmp_path / "edited.json"
    target.write_bytes(edited)
    try:
        loaded = BitPlan.load(target)
    except PlanError as exc:
        assert str(exc)
        return
    # Loaded: only possible when the edit left the content as it was (e.g. whitespace, the time).
    assert loaded.plan_id == plan_id
    assert content(json.loads(edited)) == content(json.loads(raw))


@FUZZ
@given(data=st.data())
def test_json_edits_of_a_plan_are_refused_by_its_hash(shipped_plan, data):
    _, raw, plan_id = shipped_plan
    doc = json.loads(raw)
    edited = data.draw(json_edits(doc))
    text = json.dumps(edited)
    try:
        loaded = BitPlan.from_json(text)
    except PlanError:
        return
    assert loaded.plan_id == plan_id and content(edited) == content(doc)


@SLOW
@given(data=st.data())
def test_edits_with_a_recomputed_hash_are_refused_or_quantize_cleanly(micro, data):
    """The checks behind the hash: a file whose id was recomputed after the edit either fails
    validation with PlanError or is a consistent plan that quantizes the model and runs."""
    policy, text = micro
    doc = json.loads(text)
    edited = data.draw(json_edits(doc))
    try:
        rehash(edited)
    except (ValueError, TypeError):  # the edit put a value JSON cannot hash (e.g. a huge float)
        assume(False)
    try:
        plan = BitPlan.from_json(json.dumps(edited))
        check_loaded_plan(plan)
        model = copy.deepcopy(policy)
        quantize_(model, plan)
    except PlanError as exc:
        assert str(exc)
        return
    cfg = model.config
    with torch.inference_mode():
        out = model(torch.zeros(1, cfg.n_cams, cfg.image_size, cfg.image_size, 3, dtype=torch.uint8),
                    ["open the drawer"], torch.zeros(1, cfg.proprio_dim))
    assert out.shape == (1, cfg.horizon, cfg.action_dim) and torch.isfinite(out).all()


# ---- checkpoints --------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    policy = make_policy("micro", seed=5)
    directory = policy.save_pretrained(tmp_path_factory.mktemp("ckpt") / "micro")
    files = {f.name: f.read_bytes() for f in directory.iterdir()}
    state = {k: v.clone() for k, v in policy.state_dict().items()}
    return Saved(files, state)


class Saved(tuple):
    """(files, state) of the saved checkpoint, with a short repr for hypothesis reports."""

    def __new__(cls, files, state):
        return super().__new__(cls, (files, state))

    def __repr__(self):
        return f"<micro checkpoint: {sorted(self[0])}>"


def write_checkpoint(directory, files):
    directory.mkdir(exist_ok=True)
    for name, data in files.items():
        (directory / name).write_bytes(data)
    return directory


def load_or_checkpoint_error(directory, state):
    """load_policy's only two outcomes: CheckpointError, or exactly the weights given."""
    try:
        policy = load_policy(directory)
    except CheckpointError as exc:
        assert str(exc)
        return None
    loaded = policy.state_dict()
    assert set(loaded) == set(state)
    for key, tensor in state.items():
        assert torch.equal(loaded[key], tensor.to(loaded[key].dtype)), key
    return policy


@FUZZ
@given(data=st.data())
def test_truncated_or_damaged_weights_are_refused(checkpoint, tmp_path_factory, data):
    files, state = checkpoint
    raw = files["model.safetensors"]
    header_end = 8 + struct.unpack("<Q", raw[:8])[0]
    if data.draw(st.booleans(), label="truncate"):
        damaged = raw[: data.draw(st.integers(0, len(raw) - 1), label="length")]
    else:  # the header (lengths, names, dtypes, offsets) is where a bad byte matters most
        damaged = bytearray(raw)
        for _ in range(data.draw(st.integers(1, 3), label="edits")):
            at = data.draw(st.integers(0, header_end - 1), label="at")
            damaged[at] = data.draw(st.integers(0, 255), label="byte")
        damaged = bytes(damaged)
    assume(damaged != raw)
    directory = write_checkpoint(tmp_path_factory.mktemp("damaged"), {**files,
                                                                      "model.safetensors": damaged})
    policy = load_or_checkpoint_error(directory, state)
    # A header byte edit that still parses (e.g. inside __metadata__) may load: the weights are
    # then bit-exact (checked above). Truncated data never loads.
    assert policy is None or len(damaged) == len(raw)


DTYPES = [torch.float16, torch.bfloat16, torch.float64, torch.int8, torch.int32, torch.uint8,
          torch.bool]


@FUZZ
@given(data=st.data())
def test_wrong_dtypes_shapes_and_tensor_sets_are_refused(checkpoint, tmp_path_factory, data):
    from safetensors.torch import save as save_tensors

    files, state = checkpoint
    stored = {k: v.clone() for k, v in state.items()}
    key = data.draw(st.sampled_from(sorted(stored)), label="tensor")
    change = data.draw(st.sampled_from(["dtype", "shape", "remove", "add"]), label="change")
    if change == "dtype":
        stored[key] = stored[key].to(data.draw(st.sampled_from(DTYPES), label="dtype"))
    elif change == "shape":
        shape = list(stored[key].shape) or [1]
        axis = data.draw(st.integers(0, len(shape) - 1), label="axis")
        shape[axis] = data.draw(st.integers(0, shape[axis] + 3).filter(
            lambda n: n != shape[axis]), label="size")
        stored[key] = torch.zeros(shape)
    elif change == "remove":
        del stored[key]
    else:
        stored[key + "_extra"] = torch.zeros(2)
    directory = write_checkpoint(tmp_path_factory.mktemp("tensors"), {
        **files, "model.safetensors": save_tensors(stored, metadata={"format": "qvla-policy"})})
    policy = load_or_checkpoint_error(directory, stored if change == "dtype" else state)
    if change != "dtype":
        assert policy is None
    elif policy is not None:  # only float data may stand in for float weights
        assert stored[key].is_floating_point()


@FUZZ
@given(data=st.data())
def test_config_edits_are_refused_before_anything_big_is_allocated(checkpoint, tmp_path_factory,
                                                                    data):
    """Any field of config.json set to another value, huge sizes included: CheckpointError (the
    stored tensors do not fit), quickly, without trying to allocate the model it describes."""
    import time

    files, state = checkpoint
    meta = json.loads(files["config.json"])
    config = meta["config"]
    field = data.draw(st.sampled_from(sorted(config) + ["vision.0.num_layers",
                                                        "vision.0.hidden_size", "format",
                                                        "version"]), label="field")
    value = data.draw(st.sampled_from([0, -1, 2, 3, 7, 2 ** 20, 2 ** 31, 10 ** 9, "64", None,
                                       1.5, [], {}]), label="value")
    if field in ("format", "version"):
        meta[field] = value
    elif field.startswith("vision."):
        config["vision"][0][field.split(".")[2]] = value
    else:
        config[field] = value
    directory = write_checkpoint(tmp_path_factory.mktemp("config"), {
        **files, "config.json": json.dumps(meta).encode()})
    start = time.perf_counter()
    policy = load_or_checkpoint_error(directory, state)
    # Refusals come from headers and a meta-device skeleton: well under the time (and memory) a
    # 2**20-wide model would take to build.
    assert policy is not None or time.perf_counter() - start < 30
    if policy is not None:  # a field the weights do not depend on, e.g. rope_theta or the name
        assert not isinstance(value, int) or field not in ("hidden_size", "vocab_size")


def test_huge_config_is_refused_without_allocating(checkpoint, tmp_path):
    """The case the fuzzing above covers at random, pinned: a 2**20-wide model in config.json."""
    files, _ = checkpoint
    meta = json.loads(files["config.json"])
    meta["config"]["hidden_size"] = 2 ** 20
    directory = write_checkpoint(tmp_path / "huge", {**files, "config.json": json.dumps(meta).encode()})
    with pytest.raises(CheckpointError, match="config.json implies"):
        load_policy(directory)
    meta["config"]["hidden_size"], meta["config"]["num_layers"] = 64, 10 ** 6
    (directory / "config.json").write_text(json.dumps(meta))
    with pytest.raises(CheckpointError, match="layers"):
        load_policy(directory)
