"""`qvla calibrate`, `qvla allocate`, `qvla quantize` end to end on a micro policy."""
import json

import pytest
import torch

from qvla_ros.cli import main
from qvla_ros.quant.api import load_quantized_policy
from qvla_ros.quant.plan import BitPlan
from qvla_ros.quant.sensitivity import SensitivityTable

try:
    from qvla_ros.policy import make_policy
except ImportError:
    pytest.skip("qvla_ros.policy.make_policy is not available", allow_module_level=True)


def test_calibrate_allocate_quantize(tmp_path, capsys):
    make_policy("micro", seed=0).save_pretrained(tmp_path / "policy")
    sens = tmp_path / "S.safetensors"
    assert main(["calibrate", "--policy", str(tmp_path / "policy"), "--synthetic", "--frames", "2",
                 "--estimator", "jacobian", "--out", str(sens)]) == 0
    table = SensitivityTable.load(sens)
    assert table.meta["estimator"] == "jacobian" and len(table.costs) > 0
    assert not any(name.startswith(("action_head", "projector")) for name in table.costs)
    plan_path = tmp_path / "plan.json"
    assert main(["allocate", "--sensitivity", str(sens), "--budget", "3.5", "--out", str(plan_path)]) == 0
    assert (tmp_path / "plan.png").stat().st_size > 1000
    plan = BitPlan.load(plan_path)
    assert plan.bits_per_param() <= 3.5
    assert main(["quantize", "--policy", str(tmp_path / "policy"), "--plan", str(plan_path),
                 "--out", str(tmp_path / "q")]) == 0
    report = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert report["memory_weight_bytes"] == report["disk_weight_bytes"] == report["predicted_weight_bytes"]
    q = load_quantized_policy(tmp_path / "q")
    assert q.qvla_plan_id == plan.plan_id
    # bad input: one line naming the problem, exit code 2
    assert main(["allocate", "--sensitivity", str(sens), "--budget", "0.3", "--out", str(tmp_path / "x.json")]) == 2
    assert "below the" in capsys.readouterr().err
    assert main(["quantize", "--policy", str(tmp_path / "policy"), "--plan", str(tmp_path / "none.json"),
                 "--out", str(tmp_path / "q2")]) == 2
    assert "no bit plan file" in capsys.readouterr().err


def _demos(root, config):
    """A small demonstration folder in the benchmark's format (train seeds only)."""
    import numpy as np

    from qvla_ros.sim.dataset import MANIFEST, episode_path, write_episode, write_json_atomic
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
    assert main(["allocate", "--sensitivity", str(sens), "--budget", "3.5", "--out", str(tmp_path / "p.json")]) == 0
    plan = BitPlan.load(tmp_path / "p.json")
    capsys.readouterr()
    common = ["quantize", "--policy", str(tmp_path / "policy"), "--plan", str(tmp_path / "p.json")]
    assert main(common + ["--out", str(tmp_path / "rtn")]) == 0
    rtn = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert main(common + ["--rounding", "gptq", "--data", str(demos), "--frames", "8",
                          "--out", str(tmp_path / "gptq")]) == 0
    gptq = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert gptq["rounding"] == "gptq" and rtn["rounding"] == "rtn"
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
