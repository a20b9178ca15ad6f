"""`qvla calibrate`, `qvla allocate`, `qvla quantize` end to end on a micro policy."""
import json

import pytest
import torch

from qvla_ros.cli import main
from qvla_ros.policy import make_policy
from qvla_ros.quant.api import load_quantized_policy, mixed_bit_layers
from qvla_ros.quant.plan import BitPlan
from qvla_ros.quant.sensitivity import SensitivityTable


def _file_bytes(path, prefixes=None):
    """Bytes a safetensors file holds for its tensors (all, or those under `prefixes`, biases
    excluded), read from the file: the header's spans, checked to tile the file's data exactly."""
    raw = path.read_bytes()
    size = int.from_bytes(raw[:8], "little")
    header = {k: v for k, v in json.loads(raw[8:8 + size]).items() if k != "__metadata__"}
    spans = sorted(v["data_offsets"] for v in header.values())
    assert spans[0][0] == 0 and spans[-1][1] == len(raw) - 8 - size
    assert all(a[1] == b[0] for a, b in zip(spans, spans[1:]))  # no gaps, no overlaps
    return sum(v["data_offsets"][1] - v["data_offsets"][0] for k, v in header.items()
               if prefixes is None or (k.startswith(prefixes) and not k.endswith(".bias")))


def _held_bytes(tensors):
    """Bytes of the distinct storages behind `tensors` (what the process really holds)."""
    return sum({t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in tensors}.values())


def _float_storage(policy):
    """(every weight, their stored bits) of a float policy, from its state_dict."""
    state = policy.state_dict()
    return (sum(t.numel() for t in state.values()),
            sum(t.numel() * t.element_size() * 8 for t in state.values()))


def test_calibrate_allocate_quantize(tmp_path, capsys):
    make_policy("micro", seed=0).save_pretrained(tmp_path / "policy")
    sens = tmp_path / "S.safetensors"
    assert main(["calibrate", "--policy", str(tmp_path / "policy"), "--synthetic", "--frames", "2",
                 "--estimator", "jacobian", "--out", str(sens)]) == 0
    table = SensitivityTable.load(sens)
    assert table.meta["estimator"] == "jacobian" and len(table.costs) > 0
    assert not any(name.startswith(("action_head", "projector")) for name in table.costs)
    float_policy = make_policy("micro", seed=0)
    params, stored_bits = _float_storage(float_policy)
    # --budget is over the whole policy: micro keeps ~30% of its weights (head, projectors,
    # embeddings, norms, biases) in float32, ~9.6 bits/param before any layer is quantized
    plan_path = tmp_path / "plan.json"
    assert main(["allocate", "--sensitivity", str(sens), "--budget", "12", "--out", str(plan_path)]) == 0
    assert (tmp_path / "plan.png").stat().st_size > 1000
    plan = BitPlan.load(plan_path)
    assert plan.budget_scope == "whole" and plan.budget_bits_per_param == 12
    rest = stored_bits - 32 * plan.params  # the planned weights were float32 too
    assert plan.whole == {"params": params, "rest_bits": rest}
    whole = (plan.weight_bits() + rest) / params
    assert plan.whole_bits_per_param() == pytest.approx(whole) and 11.5 < whole <= 12
    assert plan.bits_per_param() < 4  # the planned layers get what the remainder leaves
    assert "over the whole policy" in capsys.readouterr().out
    # --layout kernel prices rows as the GPU kernels hold them: micro's K < 512 pads every low-bit
    # row to a whole K-block, so 12 bits/param cannot be met there at all, and 20 buys fewer packed bits
    assert main(["allocate", "--sensitivity", str(sens), "--budget", "12", "--layout", "kernel",
                 "--out", str(tmp_path / "kernel.json")]) == 2
    assert "below the" in capsys.readouterr().err
    assert main(["allocate", "--sensitivity", str(sens), "--budget", "20", "--layout", "kernel",
                 "--out", str(tmp_path / "kernel.json")]) == 0
    kernel = BitPlan.load(tmp_path / "kernel.json")
    assert kernel.version == 3 and kernel.layout == "kernel" and plan.layout == "packed"
    assert 19 < kernel.whole_bits_per_param() <= 20
    packed_bits = sum(layer.weight_nbytes() * 8 for layer in kernel.layers.values())
    assert packed_bits < kernel.weight_bits()
    # --budget-scope planned: the old units (bits per weight of the quantized layers)
    assert main(["allocate", "--sensitivity", str(sens), "--budget", "3.5", "--budget-scope", "planned",
                 "--out", str(tmp_path / "planned.json")]) == 0
    planned = BitPlan.load(tmp_path / "planned.json")
    assert planned.budget_scope == "planned" and 3.3 < planned.bits_per_param() <= 3.5
    assert planned.whole_bits_per_param() == pytest.approx((planned.weight_bits() + rest) / params)
    assert main(["quantize", "--policy", str(tmp_path / "policy"), "--plan", str(plan_path),
                 "--out", str(tmp_path / "q")]) == 0
    report = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    # real bytes, against the plan's prediction: the saved file's, and what a loaded policy holds
    q = load_quantized_policy(tmp_path / "q")
    assert q.qvla_plan_id == plan.plan_id
    weights = tmp_path / "q" / "model.safetensors"
    on_disk = _file_bytes(weights, tuple(f"{name}." for name in plan.layers))
    held = _held_bytes(b for m in mixed_bit_layers(q).values() for n, b in m.named_buffers() if n != "bias")
    assert report["disk_weight_bytes"] == on_disk == held == report["memory_weight_bytes"]
    assert on_disk == report["predicted_weight_bytes"] == plan.weight_nbytes()
    # the whole policy: every tensor of the file, every weight the loaded policy holds
    held_all = _held_bytes([*q.parameters(), *(t for n, t in q.state_dict().items())])
    assert report["disk_policy_bytes"] == _file_bytes(weights) == held_all == report["memory_policy_bytes"]
    assert report["memory_policy_bytes"] == report["predicted_policy_bytes"] == plan.whole_nbytes()
    assert report["whole_params"] == params
    assert report["whole_bits_per_param"] == pytest.approx(8 * held_all / params)
    # bad input: one line naming the problem, exit code 2
    assert main(["allocate", "--sensitivity", str(sens), "--budget", "9", "--out", str(tmp_path / "x.json")]) == 2
    assert "unquantized remainder alone costs" in capsys.readouterr().err
    assert main(["allocate", "--sensitivity", str(sens), "--budget", "9.7", "--out", str(tmp_path / "x.json")]) == 2
    assert "below the" in capsys.readouterr().err
    assert main(["allocate", "--sensitivity", str(sens), "--budget", "0.3", "--budget-scope", "planned",
                 "--out", str(tmp_path / "x.json")]) == 2
    assert "below the" in capsys.readouterr().err
    assert main(["quantize", "--policy", str(tmp_path / "policy"), "--plan", str(tmp_path / "none.json"),
                 "--out", str(tmp_path / "q2")]) == 2
    assert "no bit plan file" in capsys.readouterr().err


def _demos(root, config):
    """A small demonstration folder in the benchmark's format (train seeds only)."""
    import numpy as np

    from qvla_ros.dataset import MANIFEST, episode_path, write_episode, write_json_atomic
    from qvla_ros.sim.suite import TASKS

    rng = np.random.default_rng(0)
    entries = []
    for task in TASKS[:2]:
        for seed in (0, 1):
            path = episode_path(root, task.name, seed)
            size = config.image_size
            write_episode(path, rng.integers(0, 256, (6, config.n_cams, size, size, 3), dtype=np.uint8),
                          rng.normal(size=(6, 4)).astype(np.float32),
                          rng.uniform(-1, 1, (6, 4)).astype(np.float32), task.instruction, task.name, seed)
            entries.append({"task": task.name, "seed": seed, "file": str(path.relative_to(root))})
    write_json_atomic(root / MANIFEST, {"recipe": {"test": True}, "complete": True, "episodes": entries})
    return root


def test_quantize_with_gptq_rows(tmp_path, capsys):
    """--rounding gptq: the plan's widths and bytes, GPTQ's codes, a new plan id that names its base."""
    policy = make_policy("micro", seed=0)
    policy.save_pretrained(tmp_path / "policy")
    demos = _demos(tmp_path / "demos", policy.config)
    sens = tmp_path / "S.safetensors"
    assert main(["calibrate", "--policy", str(tmp_path / "policy"), "--data", str(demos), "--frames", "4",
                 "--rounding", "gptq", "--out", str(sens)]) == 0
    assert SensitivityTable.load(sens).meta["rounding"] == "gptq"
    assert main(["allocate", "--sensitivity", str(sens), "--budget", "12", "--out", str(tmp_path / "p.json")]) == 0
    plan = BitPlan.load(tmp_path / "p.json")
    capsys.readouterr()
    common = ["quantize", "--policy", str(tmp_path / "policy"), "--plan", str(tmp_path / "p.json")]
    assert main(common + ["--out", str(tmp_path / "rtn")]) == 0
    rtn = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert main(common + ["--rounding", "gptq", "--data", str(demos), "--frames", "8",
                          "--out", str(tmp_path / "gptq")]) == 0
    gptq = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert gptq["rounding"] == "gptq" and rtn["rounding"] == "rtn"
    # GPTQ changes the codes, not the bytes: both checkpoints' files hold what the plan predicts
    for name, report in (("rtn", rtn), ("gptq", gptq)):
        weights = tmp_path / name / "model.safetensors"
        assert _file_bytes(weights, tuple(f"{n}." for n in plan.layers)) == report["disk_weight_bytes"]
        assert _file_bytes(weights) == report["disk_policy_bytes"] == plan.whole_nbytes()
    assert gptq["memory_weight_bytes"] == gptq["disk_weight_bytes"] == rtn["predicted_weight_bytes"]
    saved = BitPlan.load(tmp_path / "gptq" / "plan.json")
    assert saved.plan_id == gptq["plan_id"] != plan.plan_id
    assert saved.provenance["rounding"]["base_plan_id"] == plan.plan_id
    assert all((saved.layers[n].bits == plan.layers[n].bits).all() for n in plan.layers)
    # Both load as packed checkpoints; the codes differ, so the actions do too.
    a, b = load_quantized_policy(tmp_path / "rtn"), load_quantized_policy(tmp_path / "gptq")
    images = torch.randint(0, 256, (2, policy.config.n_cams, policy.config.image_size,
                                    policy.config.image_size, 3), dtype=torch.uint8)
    proprio = torch.zeros(2, policy.config.proprio_dim)
    with torch.no_grad():
        out_a = a(images, ["pull the drawer open"] * 2, proprio)
        out_b = b(images, ["pull the drawer open"] * 2, proprio)
    assert torch.isfinite(out_b).all() and not torch.equal(out_a, out_b)
    # GPTQ without frames is refused before anything is written.
    assert main(common + ["--rounding", "gptq", "--out", str(tmp_path / "no")]) == 2
    assert "--data" in capsys.readouterr().err and not (tmp_path / "no").exists()
