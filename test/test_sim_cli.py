"""`qvla eval` / `qvla demos` from the command line: results on disk, refusals that lose nothing."""
import json

from qvla_ros.cli import main


def test_eval_expert_writes_results_and_refuses_to_overwrite(tmp_path, capsys):
    out = tmp_path / "eval"
    args = ["eval", "--policy", "expert", "--tasks", "handle-press", "--episodes-per-task", "1",
            "--workers", "0", "--image-size", "32", "--cameras", "corner", "--quiet",
            "--out", str(out)]
    assert main(args) == 0
    results = json.loads((out / "results.json").read_text())
    assert results["overall"]["successes"] == 1 and results["per_task"]["handle-press"]["episodes"] == 1
    assert (out / "success.png").is_file()
    assert len((out / "episodes.jsonl").read_text().splitlines()) == 1
    before = (out / "results.json").read_bytes()
    assert main(args) == 2
    assert "--force" in capsys.readouterr().err
    assert (out / "results.json").read_bytes() == before


def test_eval_bad_inputs_fail_before_running(tmp_path, capsys):
    out = tmp_path / "eval"
    assert main(["eval", "--policy", "expert", "--tasks", "drawer-opne", "--out", str(out)]) == 2
    assert "unknown task 'drawer-opne'" in capsys.readouterr().err
    assert main(["eval", "--policy", str(tmp_path / "nope"), "--out", str(out)]) == 2
    assert "neither 'expert' nor a checkpoint directory" in capsys.readouterr().err
    assert main(["eval", "--policy", "expert", "--plan", "p.json", "--out", str(out)]) == 2
    assert "--plan" in capsys.readouterr().err
    assert main(["eval", "--policy", "expert", "--perturb", "blur=2", "--out", str(out)]) == 2
    assert "bad perturbation 'blur=2'" in capsys.readouterr().err
    assert not out.exists()


def test_demos_unknown_task(tmp_path, capsys):
    assert main(["demos", "--tasks", "nope", "--out", str(tmp_path / "d")]) == 2
    assert "unknown task 'nope'" in capsys.readouterr().err
