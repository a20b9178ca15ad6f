"""`qvla compare`'s cached quantized policies, in the one quantized-checkpoint format
(quant/checkpoint.py): safetensors + JSON, never pickle. Every baseline's modules (MixedBitLinear, GroupWiseLinear, InputScaled around a
packed layer) round-trip to bit-identical actions; damaged or edited folders are refused with an
error naming the file; a cache in the old pickle format is never read but re-quantized."""
import copy
import json
import pickle
import re
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from qvla_ros.policy import CheckpointError, make_policy
from qvla_ros.quant.baselines import GroupWiseLinear, InputScaled, quantize_baseline
from qvla_ros.sim.compare import Comparison, CompareSettings, SavedPolicyFactory
from qvla_ros.quant.checkpoint import MODULES_FILE, is_quantized_checkpoint, load_quantized, save_quantized
from qvla_ros.quant.mixed_linear import MixedBitLinear


def _batch(config, seed):
    g = torch.Generator().manual_seed(seed)
    return {"images": torch.randint(0, 256, (2, config.n_cams, config.image_size, config.image_size, 3),
                                    dtype=torch.uint8, generator=g),
            "instruction": ["open the drawer", "press the button"],
            "proprio": torch.randn(2, config.proprio_dim, generator=g)}


@pytest.fixture(scope="module")
def micro():
    policy = make_policy("micro", seed=0).eval()
    return policy, [_batch(policy.config, s) for s in range(2)]


def _actions(policy, batch):
    with torch.no_grad():
        return policy(batch["images"], batch["instruction"], batch["proprio"])


# One method per module kind the cache must describe: none, MixedBitLinear (with its plan id),
# GroupWiseLinear, MixedBitLinear with 8-bit activations behind SmoothQuant's InputScaled, and AWQ
# (its scales folded into the preceding norms and Linears: packed layers and changed float weights).
@pytest.mark.parametrize("method, kinds", [("fp", set()), ("rtn-w4", {MixedBitLinear}),
                                           ("rtn-g32-w3", {GroupWiseLinear}),
                                           ("sq-w4a8", {MixedBitLinear, InputScaled}),
                                           ("awq-w4", {MixedBitLinear}), ("awq-g32-w4", {GroupWiseLinear})])
def test_every_baseline_round_trips_to_identical_actions(micro, tmp_path, method, kinds):
    policy, batches = micro
    quantized = copy.deepcopy(policy)
    result = quantize_baseline(quantized, method, batches, alphas=(0.5,), awq_grid=4, progress=False)
    quantized.qvla_plan_id = None if result.plan is None else result.plan.plan_id
    directory = save_quantized(quantized, None, tmp_path / "policy")
    assert is_quantized_checkpoint(directory)
    assert sorted(p.name for p in directory.iterdir()) == sorted(["config.json", MODULES_FILE, "model.safetensors",
                                                                 "tokenizer.json"])
    loaded = load_quantized(directory)
    assert {type(m) for m in loaded.modules()} >= kinds
    assert {n: type(m) for n, m in loaded.named_modules()} == {n: type(m) for n, m in quantized.named_modules()}
    assert loaded.qvla_plan_id == quantized.qvla_plan_id
    for name, module in quantized.named_modules():
        if isinstance(module, MixedBitLinear):
            other = loaded.get_submodule(name)
            assert (other.act_bits, other.row_tile, other.group_layout) == \
                (module.act_bits, module.row_tile, module.group_layout)
    for batch in batches:
        assert torch.equal(_actions(loaded, batch), _actions(quantized, batch))
    # ... and through the rollout workers' factory, with the dequantized-weight cache on
    served = SavedPolicyFactory(directory)()
    assert torch.allclose(_actions(served, batches[0]), _actions(quantized, batches[0]), atol=1e-5)


@pytest.fixture(scope="module")
def saved(micro, tmp_path_factory):
    policy, batches = micro
    quantized = copy.deepcopy(policy)
    quantize_baseline(quantized, "sq-w4a8", batches, alphas=(0.5,), progress=False)
    return save_quantized(quantized, None, tmp_path_factory.mktemp("cache") / "policy")


def _copy(directory: Path, to: Path) -> Path:
    to.mkdir(parents=True)
    for f in directory.iterdir():
        (to / f.name).write_bytes(f.read_bytes())
    return to


def test_edited_or_damaged_folders_are_refused(saved, tmp_path):
    doc = json.loads((saved / MODULES_FILE).read_text())
    scaled = next(n for n, s in doc["modules"].items() if s["class"] == "InputScaled")
    packed = next(n for n, s in doc["modules"].items() if s["class"] == "MixedBitLinear")

    def edited(label, change):
        broken = _copy(saved, tmp_path / label)
        new = json.loads(json.dumps(doc))
        change(new)
        (broken / MODULES_FILE).write_text(json.dumps(new))
        return broken

    cases = [
        # only the listed classes can be built, whatever the file names
        ("class", lambda d: d["modules"][packed].update({"class": "builtins.eval"}), CheckpointError,
         r"unknown module class 'builtins.eval'"),
        ("nowhere", lambda d: d["modules"].update({"decoder.nowhere": d["modules"][packed]}), CheckpointError,
         r"the policy has no module 'decoder.nowhere'"),
        ("counts", lambda d: d["modules"][packed]["counts"].update({"4": 0, "8": d["modules"][packed]["out_features"]}),
         CheckpointError, rf"does not match config.json and modules.json: missing \['{re.escape(packed)}.g8_qweight'"),
        ("scale", lambda d: d["modules"][scaled].update({"in_features": 1}), CheckpointError,
         rf"tensor {scaled}.scale is F16 \(\d+,\), config.json and modules.json imply F16 \(1,\)"),
        ("flag", lambda d: d["modules"][packed].update({"bias": "yes"}), CheckpointError, "'bias' must be true or false"),
        ("format", lambda d: d.update({"format": "other"}), CheckpointError, "is not a qvla-quantized-modules"),
    ]
    for label, change, error, message in cases:
        with pytest.raises(error, match=message):
            load_quantized(edited(label, change))
    broken = _copy(saved, tmp_path / "missing")
    state = load_file(saved / "model.safetensors")
    save_file({k: v for k, v in state.items() if k != f"{scaled}.scale"}, broken / "model.safetensors")
    with pytest.raises(CheckpointError, match=rf"missing \['{scaled}.scale'\]"):
        load_quantized(broken)
    raw = (saved / "model.safetensors").read_bytes()
    (broken / "model.safetensors").write_bytes(raw[: len(raw) // 2])
    with pytest.raises(CheckpointError, match="corrupt"):
        load_quantized(broken)
    (broken / MODULES_FILE).unlink()
    with pytest.raises(CheckpointError, match="not a quantized checkpoint"):
        load_quantized(broken)


def test_a_module_the_format_cannot_describe_fails_at_save_time(micro, tmp_path):
    policy, _ = micro
    odd = copy.deepcopy(policy)
    odd.decoder.layers[0].mlp.up_proj = torch.nn.Sequential(odd.decoder.layers[0].mlp.up_proj)
    with pytest.raises(CheckpointError, match=r"decoder.layers.0.mlp.up_proj: cannot save a Sequential"):
        save_quantized(odd, None, tmp_path / "odd")
    assert not (tmp_path / "odd" / MODULES_FILE).exists()


class _Tripwire:
    """Unpickling this touches a file: proof that a pickle was (or was not) loaded."""

    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return (Path.touch, (Path(self.path),))


def test_an_old_pickle_cache_is_never_read_but_requantized(micro, tmp_path):
    policy, _ = micro
    policy.save_pretrained(tmp_path / "float")
    comparison = Comparison(CompareSettings(methods=["rtn-w4"], policy=str(tmp_path / "float"), synthetic=True,
                                            frames=4, calib_batch=4, episodes_per_task=0),
                            tmp_path / "out", progress=False)
    spec = comparison.specs[0]
    run = comparison.run_dir(spec, None)
    run.mkdir(parents=True)
    marker = tmp_path / "unpickled"
    (run / "policy.pt").write_bytes(pickle.dumps(_Tripwire(marker)))
    (run / "quant.json").write_text(json.dumps({"stale": True}))
    record = comparison.quantize(spec, None)
    assert record["method"]["name"] == "rtn-w4" and "stale" not in record
    assert not marker.exists() and not (run / "policy.pt").exists()
    assert json.loads((run / "quant.json").read_text()) == record
    reloaded = SavedPolicyFactory(run / "policy")()
    assert sum(isinstance(m, MixedBitLinear) for m in reloaded.modules()) > 0
    assert comparison.quantize(spec, None) == record  # now served from the new cache
