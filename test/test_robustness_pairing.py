"""bench/robustness/robustness.py --from-results: saved `qvla eval` results paired episode by episode,
plans and conditions read from the files' own settings."""
import importlib.util
import json
from pathlib import Path

import pytest

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


def test_a_compare_run_is_a_plan_beside_float(tmp_path):
    """A `qvla compare` run's policy/ (a quantized checkpoint) runs as a plan, paired with float."""
    import sys
    from qvla_ros.cli import main
    from qvla_ros.policy import make_policy
    from qvla_ros.sim.suite import TASKS

    sys.path.insert(0, str(Path(__file__).resolve().parent / "helpers"))
    from demo_folders import metaworld_demo_folder

    policy = make_policy("micro", seed=0)
    policy.save_pretrained(tmp_path / "policy")
    metaworld_demo_folder(tmp_path / "demos", policy.config.n_cams, policy.config.image_size)
    assert main(["compare", "--methods", "rtn-w4", "--policy", str(tmp_path / "policy"), "--data",
                 str(tmp_path / "demos"), "--frames", "8", "--offline-frames", "0", "--episodes-per-task", "0",
                 "--out", str(tmp_path / "cmp"), "--quiet"]) == 0
    run = next((tmp_path / "cmp" / "runs").glob("rtn-w4-*")) / "policy"
    out = tmp_path / "robust.json"
    _robustness().main(["--policy", str(tmp_path / "policy"), "--plans", f"float,{run}",
                        "--conditions", "plain,brightness=1.2", "--tasks", TASKS[0].name, "--episodes", "1",
                        "--max-steps", "3", "--workers", "0", "--out", str(out)])
    doc = json.loads(out.read_text())
    assert set(doc["runs"]) == {f"{p} | {c}" for p in ("float", str(run)) for c in ("plain", "brightness=1.2")}
    assert set(doc["vs_float"]) == {f"{run} | plain", f"{run} | brightness=1.2"}
    assert doc["vs_plain"][f"{run} | brightness=1.2"]["episodes"] == 1
    # an interrupted invocation resumed with one more condition runs only that one, here paired
    # with the compare run as the reference
    out2 = tmp_path / "robust2.json"
    args = ["--policy", str(tmp_path / "policy"), "--plans", f"float,{run}", "--reference", str(run),
            "--tasks", TASKS[0].name, "--episodes", "1", "--max-steps", "3", "--workers", "0", "--out", str(out2)]
    _robustness().main(args + ["--conditions", "plain"])
    first = json.loads(out2.read_text())
    _robustness().main(args + ["--conditions", "plain,shift=2", "--resume"])
    doc = json.loads(out2.read_text())
    assert set(doc["runs"]) == {f"{p} | {c}" for p in ("float", str(run)) for c in ("plain", "shift=2")}
    assert doc["runs"]["float | plain"] == first["runs"]["float | plain"]   # kept, not re-run
    assert set(doc["vs_float"]) == {"float | plain", "float | shift=2"}      # the reference is the run
    with pytest.raises(SystemExit):
        _robustness().main(args + ["--conditions", "plain", "--resume", "--episodes", "2"])
