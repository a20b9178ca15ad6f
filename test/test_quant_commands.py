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
