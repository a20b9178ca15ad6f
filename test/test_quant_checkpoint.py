"""Quantized checkpoints (quant/checkpoint.py: save_quantized / load_quantized) read as untrusted
files: every tensor the safetensors header names is checked against the skeleton that config.json,
modules.json and plan.json imply
(built on the meta device) before anything is allocated, and the float Linears the plan replaces
are never built, so loading takes the memory the file holds.

The memory claims are checked in a child process whose address space is capped (RLIMIT_AS) a
little above what it already uses: an edit that made the loader allocate the model it describes
fails there instead of taking the machine's memory.
"""
import json
import os
import struct
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from qvla_ros.policy import CheckpointError, make_policy
from qvla_ros.policy.modeling_vla import VLAPolicy
from qvla_ros.quant import quantizable_linears
from qvla_ros.quant.api import load_quantized_policy, quantize_
from qvla_ros.quant.checkpoint import architecture_fingerprint, load_quantized, save_quantized
from qvla_ros.quant.mixed_linear import MixedBitLinear
from qvla_ros.quant.plan import BitPlan, LayerPlan, PlanError, model_fingerprint, plan_from_bits

REPO = Path(__file__).resolve().parent.parent
# Headroom above the child's address space while it loads an edited checkpoint: the edits below
# describe models of gigabytes to terabytes, the real checkpoints take well under a megabyte.
HEADROOM = 256 * 2 ** 20


def _inputs(config, b=2, seed=0):
    gen = torch.Generator().manual_seed(seed)
    images = torch.randint(0, 256, (b, config.n_cams, config.image_size, config.image_size, 3),
                           generator=gen, dtype=torch.uint8)
    return images, ["open the drawer"] * b, torch.randn(b, config.proprio_dim, generator=gen)


def _mixed_bits(policy, seed=0):
    """Tile-respecting widths over every quantizable layer, pruned rows and every width included."""
    rng = np.random.default_rng(seed)
    return {name: rng.permutation(np.repeat(rng.choice([0, 2, 3, 4, 8, 16], size=lin.out_features // 16), 16))
            for name, lin in quantizable_linears(policy).items()}


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """A micro policy quantized with a mixed plan (8-bit activations on some layers), saved; its actions."""
    root = tmp_path_factory.mktemp("qckpt")
    policy = make_policy("micro", seed=0)
    names = list(quantizable_linears(policy))
    plan = plan_from_bits(policy, _mixed_bits(policy), act_bits={n: 8 if i % 2 else 16 for i, n in enumerate(names)})
    quantize_(policy, plan)
    directory = save_quantized(policy, plan, root / "q")
    with torch.no_grad():
        actions = policy(*_inputs(policy.config))
    return directory, plan, actions


def _copy(directory: Path, to: Path) -> Path:
    to.mkdir(parents=True)
    for f in directory.iterdir():
        (to / f.name).write_bytes(f.read_bytes())
    return to


def _edit_config(directory: Path, **changes) -> None:
    meta = json.loads((directory / "config.json").read_text())
    meta["config"].update(changes)
    (directory / "config.json").write_text(json.dumps(meta))


def test_a_good_checkpoint_loads_with_identical_actions(saved):
    directory, plan, actions = saved
    for loaded in (load_quantized(directory), load_quantized_policy(directory)):
        assert loaded.qvla_plan_id == plan.plan_id
        layers = {n: m for n, m in loaded.named_modules() if isinstance(m, MixedBitLinear)}
        assert set(layers) == set(plan.layers)
        for name, m in layers.items():
            assert np.array_equal(m.bits_per_row().numpy(), plan.layers[name].bits)
            assert m.act_bits == plan.layers[name].act_bits
        # nothing is left on the meta device, and the unsaved buffers (rotary frequencies,
        # position ids) are rebuilt exactly: the actions are bit-identical
        assert all(t.device.type == "cpu" for t in [*loaded.parameters(), *loaded.buffers()])
        with torch.no_grad():
            assert torch.equal(loaded(*_inputs(loaded.config)), actions)
    fresh = make_policy("micro", seed=0)
    assert architecture_fingerprint(fresh)["architecture"] == model_fingerprint(fresh)["architecture"]


def test_a_missing_truncated_or_reshaped_tensor_is_refused(saved, tmp_path):
    directory, plan, _ = saved
    state = load_file(directory / "model.safetensors")
    layer = next(iter(plan.layers))
    packed = next(k for k in state if k.startswith(f"{layer}.g") and k.endswith("_scale"))
    cases = {
        "missing": ({k: v for k, v in state.items() if k != packed}, rf"missing \['{packed}'\]"),
        "extra": ({**state, "decoder.extra": torch.zeros(3)}, r"unexpected \['decoder.extra'\]"),
        "reshaped": ({**state, packed: state[packed][:-1]}, rf"tensor {packed} is F16 \(\d+,\), config.json, modules.json and plan.json imply F16"),
        "dtype": ({**state, packed: state[packed].float()}, rf"tensor {packed} is F32 .* imply F16"),
        "row index": ({**state, f"{layer}.row_index": state[f"{layer}.row_index"] + 10 ** 6}, "row_index is not a set"),
    }
    for label, (tensors, message) in cases.items():
        broken = _copy(directory, tmp_path / label.replace(" ", "_"))
        save_file(tensors, broken / "model.safetensors")
        with pytest.raises(CheckpointError, match=message):
            load_quantized(broken)
    broken = _copy(directory, tmp_path / "truncated")
    raw = (directory / "model.safetensors").read_bytes()
    for cut in (len(raw) - 1, len(raw) // 2, 7):
        (broken / "model.safetensors").write_bytes(raw[:cut])
        with pytest.raises(CheckpointError, match=r"model\.safetensors is corrupt"):
            load_quantized(broken)
    (broken / "model.safetensors").unlink()
    with pytest.raises(CheckpointError, match="has no model.safetensors"):
        load_quantized(broken)


def test_config_and_plan_edits_are_named(saved, tmp_path):
    directory, plan, _ = saved
    broken = _copy(directory, tmp_path / "c")
    _edit_config(broken, intermediate_size=96)
    with pytest.raises(PlanError, match=r"plan\.json does not match config\.json: bit plan \w+ was made for another model"):
        load_quantized(broken)
    _edit_config(broken, intermediate_size=128, num_layers=3)
    with pytest.raises(PlanError, match=r"plan\.json does not match config\.json"):
        load_quantized(broken)
    meta = json.loads((directory / "config.json").read_text())
    for config, message in ((dict(meta, config="oft-7b"), "must be read from a JSON object"),
                            (dict(meta, format="other"), "is not a qvla-vla-policy config"),
                            (dict(meta, version=99), "has version 99")):
        (broken / "config.json").write_text(json.dumps(config))
        with pytest.raises(CheckpointError, match=message):
            load_quantized(broken)
    # a plan re-made (valid hash) for a larger layer than the checkpoint's architecture has
    broken = _copy(directory, tmp_path / "p")
    layers = dict(plan.layers)
    name, layer = next(iter(layers.items()))
    layers[name] = LayerPlan(name, layer.in_features * 2, layer.out_features, layer.bits, layer.act_bits)
    BitPlan(layers=layers, model=plan.model, row_tile=plan.row_tile).save(broken / "plan.json")
    with pytest.raises(PlanError, match=rf"layer '{name}': the plan has"):
        load_quantized(broken)


def test_modules_and_plan_must_agree_and_an_older_folder_is_named(saved, tmp_path):
    directory, plan, _ = saved
    doc = json.loads((directory / "modules.json").read_text())
    layer = next(iter(plan.layers))
    edits = {
        "plan id": (lambda d: d.update({"qvla_plan_id": "0" * 16}), "it names plan '0000000000000000'"),
        "act bits": (lambda d: d["modules"][layer].update({"act_bits": 16 if d["modules"][layer]["act_bits"] == 8 else 8}),
                     rf"layer '{layer}' is stored as"),
        "unplanned": (lambda d: d["modules"].pop(layer), "the planned layers and the stored modules differ"),
    }
    for label, (change, message) in edits.items():
        broken = _copy(directory, tmp_path / label.replace(" ", "_"))
        edited = json.loads(json.dumps(doc))
        change(edited)
        (broken / "modules.json").write_text(json.dumps(edited))
        with pytest.raises(CheckpointError, match=message):
            load_quantized(broken)
    # the format this one replaced: plan.json beside the weights, no modules.json
    older = _copy(directory, tmp_path / "older")
    (older / "modules.json").unlink()
    for load in (load_quantized, load_quantized_policy):
        with pytest.raises(CheckpointError, match="has plan.json but no modules.json"):
            load(older)


def _pruned_giant(tmp_path: Path) -> Path:
    """A consistent quantized checkpoint of a micro policy whose decoder MLPs are 2**21 wide
    (3 GiB as float Linears) but fully pruned by its plan: the file holds well under 1 MiB."""
    config = make_policy("micro").config.replace(intermediate_size=2 ** 21)
    with torch.device("meta"):
        skeleton = VLAPolicy(config)
    fingerprint = architecture_fingerprint(skeleton)
    bits = {n: 0 if ".mlp." in n and n.startswith("decoder.") else 8 for n in quantizable_linears(skeleton)}
    plan = plan_from_bits(skeleton, bits, fingerprint=fingerprint)
    with torch.device("meta"):
        for name, layer in plan.layers.items():
            linear = skeleton.get_submodule(name)
            parent, _, child = name.rpartition(".")
            setattr(skeleton.get_submodule(parent), child, MixedBitLinear(
                layer.in_features, layer.out_features, layer.counts, bias=linear.bias is not None))
    policy = skeleton.to_empty(device="cpu")
    with torch.no_grad():
        for name, tensor in policy.state_dict().items():
            tensor.copy_(torch.arange(tensor.numel()).reshape(tensor.shape) if name.endswith("row_index")
                         else torch.ones_like(tensor))
    policy.qvla_plan_id = plan.plan_id
    return save_quantized(policy, plan, tmp_path / "giant")


CHILD = textwrap.dedent("""
    import json, resource, sys, time
    import torch
    from qvla_ros.quant.checkpoint import load_quantized
    good, headroom, edited = sys.argv[1], int(sys.argv[2]), sys.argv[3:]
    load_quantized(good)  # imports and first-call allocations happen before the cap

    def address_space():
        for line in open("/proc/self/status"):
            if line.startswith("VmSize"):
                return int(line.split()[1]) * 1024

    soft, hard = resource.getrlimit(resource.RLIMIT_AS)
    resource.setrlimit(resource.RLIMIT_AS, (address_space() + headroom, hard))
    for path in edited:
        start = time.perf_counter()
        try:
            policy = load_quantized(path)
            outcome = "loaded"
            detail = sum(t.numel() * t.element_size() for t in policy.state_dict().values())
        except BaseException as exc:
            outcome, detail = type(exc).__name__, str(exc)[:400]
        print(json.dumps({"path": path, "outcome": outcome, "detail": detail,
                          "seconds": time.perf_counter() - start}), flush=True)
""")


def test_checkpoints_claiming_huge_models_take_no_memory(saved, tmp_path):
    """Edited to describe a huge model, a checkpoint is refused before the model is built, quickly
    and with the address space capped: config.json against plan.json (the plan's architecture
    hash), or, when both were edited consistently, against the tensors the header names. A
    consistent checkpoint whose plan prunes huge layers loads in what it stores."""
    directory, _, _ = saved
    claims = {"huge": dict(hidden_size=8192, intermediate_size=32768, vocab_size=32000),  # ~5 GiB float
              "enormous": dict(hidden_size=2 ** 20, intermediate_size=2 ** 22)}  # terabytes
    paths = {}
    for label, changes in claims.items():
        paths[label] = _copy(directory, tmp_path / label)
        _edit_config(paths[label], **changes)
    paths["preset"] = _copy(directory, tmp_path / "preset")  # the 7B preset by name, not a config
    meta = json.loads((directory / "config.json").read_text())
    (paths["preset"] / "config.json").write_text(json.dumps(dict(meta, config="oft-7b")))
    paths["giant"] = _pruned_giant(tmp_path)
    # config.json, modules.json and plan.json of the giant (consistent with each other), the micro's weights
    paths["mismatch"] = _copy(directory, tmp_path / "mismatch")
    for name in ("config.json", "modules.json", "plan.json"):
        (paths["mismatch"] / name).write_bytes((paths["giant"] / name).read_bytes())
    done = subprocess.run([sys.executable, "-c", CHILD, str(directory), str(HEADROOM),
                           *map(str, paths.values())],
                          cwd=REPO, env=dict(os.environ, PYTHONPATH=str(REPO)), capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    rows = {Path(r["path"]).name: r for r in map(json.loads, done.stdout.splitlines())}
    assert set(rows) == set(paths), done.stdout
    for label, error, message in (("huge", "PlanError", "plan.json does not match config.json"),
                                  ("enormous", "PlanError", "plan.json does not match config.json"),
                                  ("preset", "CheckpointError", "must be read from a JSON object"),
                                  ("mismatch", "CheckpointError", "does not match config.json, modules.json and plan.json")):
        row = rows[label]
        assert row["outcome"] == error and message in row["detail"], row
        assert row["seconds"] < 5, row
    assert "mismatch/model.safetensors" in rows["mismatch"]["detail"], rows["mismatch"]
    # Loaded under the cap: the tensors it holds are what the file stores (under 1 MiB), not
    # the 3 GiB that building its float Linears first would take.
    giant = rows["giant"]
    assert giant["outcome"] == "loaded", giant
    stored = sum(v.numel() * v.element_size() for v in load_file(paths["giant"] / "model.safetensors").values())
    assert giant["detail"] == stored and stored < 2 ** 20, (giant, stored)


def test_a_header_lying_about_its_length_is_refused(saved, tmp_path):
    directory, _, _ = saved
    broken = _copy(directory, tmp_path / "h")
    raw = (directory / "model.safetensors").read_bytes()
    (broken / "model.safetensors").write_bytes(struct.pack("<Q", 2 ** 40) + raw[8:])
    start = time.perf_counter()
    with pytest.raises(CheckpointError, match="corrupt"):
        load_quantized(broken)
    assert time.perf_counter() - start < 5
