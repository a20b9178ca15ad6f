"""bench/robustness/robustness.py --from-results: saved `qvla eval` results paired episode by episode,
plans and conditions read from the files' own settings."""
import importlib.util
import json
from pathlib import Path

from qvla_ros.sim.evaluate import EvalResults

SCRIPT = Path(__file__).resolve().parents[1] / "bench" / "robustness" / "robustness.py"


def _robustness():
    spec = importlib.util.spec_from_file_location("robustness_script", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _save(folder: Path, successes: list[bool], plan=None, perturbation=None) -> Path:
    episodes = [{"task": "drawer-open", "seed": 1_000_000 + i, "success": ok, "steps": 50}
                for i, ok in enumerate(successes)]
    settings = {"policy": {"kind": "checkpoint", "path": "/p", "plan": plan}, "suite": "metaworld",
                "episodes_per_task": len(successes), "perturbation": perturbation, "wall_time_s": 1.0}
    return EvalResults.from_episodes(["drawer-open"], episodes, settings).save(folder, plot=False)


def test_saved_runs_pair_with_their_plain_run_and_with_float(tmp_path):
    plain = _save(tmp_path / "plain", [True] * 8 + [False] * 2)
    bright = _save(tmp_path / "bright", [True] * 5 + [False] * 5,
                   perturbation={"brightness": 1.2, "shift_pixels": 0, "rephrase": False})
    plan_plain = _save(tmp_path / "plan", [True] * 7 + [False] * 3, plan="plan.json")
    out = tmp_path / "robust.json"
    # the plan's run first: its float pair is made once float's plain run arrives
    _robustness().main(["--from-results", str(plan_plain), str(bright), str(plain), "--out", str(out)])
    doc = json.loads(out.read_text())
    assert set(doc["runs"]) == {"float | plain", "float | brightness=1.2", "plan.json | plain"}
    assert doc["runs"]["float | brightness=1.2"]["success"] == 0.5
    vs_plain = doc["vs_plain"]["float | brightness=1.2"]
    assert (vs_plain["difference"], vs_plain["a_only"], vs_plain["b_only"]) == (-0.3, 0, 3)
    vs_float = doc["vs_float"]["plan.json | plain"]
    assert (vs_float["a_only"], vs_float["b_only"]) == (0, 1)
