"""`qvla compare` end to end on a micro policy: quantize, offline metrics, a (very short) closed
loop in MuJoCo, table + plot; a second run reuses every result; QVLA matches measured memory."""
import json
import sys
from pathlib import Path

import numpy as np
import pytest

from qvla_ros.cli import main
from qvla_ros.policy import make_policy
from qvla_ros.sim.suite import TASKS

sys.path.insert(0, str(Path(__file__).resolve().parent / "helpers"))
from demo_folders import demo_folder, metaworld_demo_folder  # noqa: E402


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("compare")
    policy = make_policy("micro", seed=0)
    policy.save_pretrained(root / "policy")
    metaworld_demo_folder(root / "demos", policy.config.n_cams, policy.config.image_size)
    return root


def _run(root, out, methods, episodes=1, extra=()):
    return main(["compare", "--methods", methods, "--policy", str(root / "policy"), *extra,
                 "--data", str(root / "demos"), "--frames", "8", "--offline-frames", "16",
                 "--episodes-per-task", str(episodes), "--tasks", TASKS[0].name, "--max-steps", "3",
                 "--workers", "0", "--alphas", "0.5", "--out", str(out), "--quiet"])


def test_compare_writes_table_plot_and_resumes(setup, capsys):
    out = setup / "out"
    assert _run(setup, out, "fp,rtn-w4,qvla@rtn-w4,rtn-g32-w3") == 0
    doc = json.loads((out / "compare.json").read_text())
    rows = {r["method"]["name"]: r for r in doc["rows"]}
    assert list(rows) == ["fp", "rtn-w4", "qvla@rtn-w4", "rtn-g32-w3"]
    assert rows["fp"]["memory"]["percent_of_bf16"] == pytest.approx(100.0)
    for name, row in rows.items():
        cl = row["closed_loop"]
        assert cl["overall"]["episodes"] == 1 and cl["settings"]["max_steps"] == 3
        assert np.isfinite(row["offline"]["l1"]) and row["offline"]["frames"] > 0
        if name != "fp":
            assert row["memory"]["bits_per_param"] < 16
            assert row["offline"]["action_error_vs_fp"] > 0
    # QVLA got the baseline's measured memory as its budget and stays within it.
    assert rows["qvla@rtn-w4"]["budget"] == pytest.approx(rows["rtn-w4"]["memory"]["bits_per_param"])
    assert rows["qvla@rtn-w4"]["memory"]["nbytes"] <= rows["rtn-w4"]["memory"]["nbytes"]
    assert rows["qvla@rtn-w4"]["plan_id"] and rows["rtn-w4"]["plan_id"]
    table = (out / "compare.md").read_text()
    assert "| qvla@rtn-w4 |" in table and TASKS[0].name in table and "Ran on:" in table
    # every quantized row is paired with fp on the same episode; QVLA also with a baseline
    for row in rows.values():
        outcomes = row["closed_loop"]["outcomes"]
        assert list(outcomes) == [TASKS[0].name] and len(outcomes[TASKS[0].name]) == 1
        assert set(outcomes[TASKS[0].name].values()) <= {True, False}
    for name in ("rtn-w4", "qvla@rtn-w4", "rtn-g32-w3"):
        assert rows[name]["paired"]["vs_fp"]["episodes"] == 1
    assert rows["qvla@rtn-w4"]["paired"]["vs_best_baseline"]["method"] in ("rtn-w4", "rtn-g32-w3")
    assert "vs best baseline" in table
    assert (out / "compare.png").stat().st_size > 10_000

    # Second run: everything comes from the cache (files untouched), same table.
    stamps = {p: p.stat().st_mtime_ns for p in (out / "runs").rglob("*") if p.is_file()}
    assert _run(setup, out, "fp,rtn-w4,qvla@rtn-w4,rtn-g32-w3") == 0
    assert {p: p.stat().st_mtime_ns for p in stamps} == stamps
    again = json.loads((out / "compare.json").read_text())["rows"]
    strip = lambda rows: [{k: v for k, v in r.items() if k != "seconds"} for r in rows]  # noqa: E731
    assert strip(again) == strip(doc["rows"])


def test_qvla_with_gptq_rows(setup):
    """qvla-gptq@M: QVLA's allocation measured for GPTQ-rounded rows, rows rounded by GPTQ, within
    M's measured memory, recorded under its own plan id."""
    out = setup / "gptq_rows"
    assert _run(setup, out, "rtn-w3,qvla@rtn-w3,qvla-gptq@rtn-w3", episodes=0, extra=("--projections", "4")) == 0
    rows = {r["method"]["name"]: r for r in json.loads((out / "compare.json").read_text())["rows"]}
    plain, gptq = rows["qvla@rtn-w3"], rows["qvla-gptq@rtn-w3"]
    assert gptq["info"]["rounding"] == "gptq" and plain["info"]["rounding"] == "rtn"
    assert gptq["memory"]["nbytes"] <= rows["rtn-w3"]["memory"]["nbytes"]
    assert gptq["plan_id"] != plain["plan_id"]  # the plan records how its rows were rounded
    assert gptq["offline"]["action_error_vs_fp"] != plain["offline"]["action_error_vs_fp"]
    assert 0 < gptq["info"]["mean_relative_layer_error"] < 1
    tables = sorted((out / "sensitivity").glob("sensitivity-*.safetensors"))
    assert len(tables) == 2  # one per rounding, each measured with 4 random projections
    from qvla_ros.quant.sensitivity import SensitivityTable
    assert {SensitivityTable.load(t).meta["projections"] for t in tables} == {"4 gaussian"}


def test_gptq_sensitivity_measures_gptq_rows():
    """The table QVLA allocates GPTQ rows with is the jacobian estimate for GPTQ's weight changes:
    identical to jacobian_sensitivity given gptq_weight_deltas, and different from the RTN table."""
    from qvla_ros.quant.baselines.gptq import gptq_weight_deltas
    from qvla_ros.quant.baselines.qvla_match import QvlaRunner
    from qvla_ros.quant.calibration import synthetic_frames
    from qvla_ros.quant.quantizer import ALL_BITS
    from qvla_ros.quant.sensitivity import jacobian_sensitivity
    from qvla_ros.quant.targets import quantizable_linears

    policy = make_policy("micro", seed=0).eval()
    frames = synthetic_frames(policy.config, 4, seed=0)
    runner = QvlaRunner(frames, progress=False)
    table = runner.sensitivity(policy, "gptq", frames)
    assert table.meta["rounding"] == "gptq"
    modules = quantizable_linears(policy)
    deltas = gptq_weight_deltas(policy, modules, frames, ALL_BITS, progress=False)
    direct = jacobian_sensitivity(policy, frames, bits=ALL_BITS, layers=list(modules), deltas=deltas,
                                  progress=False)
    rtn = runner.sensitivity(policy)
    for name in modules:
        np.testing.assert_allclose(table.costs[name], direct.costs[name], rtol=1e-6)
    quantized = [i for i, b in enumerate(table.bits) if b in (2, 3, 4, 8)]
    assert any(not np.allclose(table.costs[n][:, quantized], rtn.costs[n][:, quantized]) for n in modules)
    # pruning and 16 bits are the same change whatever the rounding
    same = [i for i, b in enumerate(table.bits) if b in (0, 16)]
    for name in modules:
        np.testing.assert_allclose(table.costs[name][:, same], rtn.costs[name][:, same], rtol=1e-6)
    with pytest.raises(ValueError, match="jacobian"):
        QvlaRunner(frames, estimator="exact", progress=False).sensitivity(policy, "gptq", frames)


def test_compare_rejects_bad_input(setup, capsys):
    assert main(["compare", "--methods", "rtn-w5", "--data", str(setup / "demos"),
                 "--out", str(setup / "bad")]) == 2
    assert "weight bits must be one of" in capsys.readouterr().err
    assert main(["compare", "--methods", "rtn-w4", "--out", str(setup / "bad")]) == 2
    assert "--data" in capsys.readouterr().err
    assert main(["compare", "--methods", "rtn-w4", "--policy", str(setup / "nowhere"),
                 "--data", str(setup / "demos"), "--out", str(setup / "bad")]) == 2
    assert "nowhere" in capsys.readouterr().err


def test_a_folder_without_held_out_episodes_fails_before_quantizing_unless_offline_is_off(setup, tmp_path, capsys):
    from qvla_ros.sim.suite import TASKS as tasks

    cfg = make_policy("micro", seed=0).config
    no_val = demo_folder(tmp_path / "demos", [(tasks[0].name, tasks[0].instruction)], cfg.n_cams,
                         cfg.image_size, seeds=(0, 1))
    args = ["compare", "--methods", "fp,rtn-w4", "--policy", str(setup / "policy"), "--data", str(no_val),
            "--frames", "4", "--episodes-per-task", "0", "--workers", "0", "--quiet"]
    assert main([*args, "--out", str(tmp_path / "a")]) == 2
    assert "no held-out ('val') episodes" in capsys.readouterr().err
    assert not (tmp_path / "a" / "runs").exists()
    assert main([*args, "--offline-frames", "0", "--out", str(tmp_path / "b")]) == 0
    rows = json.loads((tmp_path / "b" / "compare.json").read_text())["rows"]
    assert [r["offline"] for r in rows] == [None, None] and rows[1]["memory"]["bits_per_param"] < 16


def _row(name, family, bits, successes):
    outcomes = {"t": {str(seed): ok for seed, ok in enumerate(successes)}}
    return {"method": {"name": name, "family": family}, "memory": {"bits_per_param": bits},
            "closed_loop": {"overall": {"rate": sum(successes) / len(successes)}, "outcomes": outcomes}}


def test_paired_tests_pick_the_best_baseline_at_no_more_memory():
    from qvla_ros.sim.compare_report import add_paired_tests

    n = 20
    fp = _row("fp", "fp", 16.0, [True] * n)
    weak = _row("rtn-g128-w3", "rtn-group", 3.25, [True] * 10 + [False] * 10)
    strong = _row("gptq-g128-w3", "gptq", 3.25, [True] * 18 + [False] * 2)
    bigger = _row("rtn-w4", "rtn", 4.26, [True] * n)  # more memory than QVLA: never its peer
    qvla = _row("qvla@gptq-g128-w3", "qvla", 3.25, [True] * 19 + [False])
    rows = [fp, weak, strong, bigger, qvla]
    add_paired_tests(rows)
    assert "paired" not in fp
    assert weak["paired"]["vs_fp"]["b_only"] == 10 and weak["paired"]["vs_fp"]["a_only"] == 0
    assert weak["paired"]["vs_fp"]["p_value"] == pytest.approx(2 * 0.5 ** 10)
    assert "vs_best_baseline" not in weak["paired"]
    best = qvla["paired"]["vs_best_baseline"]
    assert best["method"] == "gptq-g128-w3"
    assert (best["a_only"], best["b_only"]) == (1, 0) and best["difference"] == pytest.approx(0.05)
    assert qvla["paired"]["vs_fp"]["difference"] == pytest.approx(-0.05)


def test_interrupted_closed_loop_log_is_read_back(tmp_path):
    from qvla_ros.sim.compare import Comparison

    log = tmp_path / "episodes.jsonl"
    lines = [{"task": "a", "seed": 1, "success": False}, {"task": "a", "seed": 2, "success": True},
             {"task": "a", "seed": 1, "success": True}, {"task": "b", "seed": 1, "success": True},
             {"task": "zzz", "seed": 1, "success": True}, {"task": "a", "seed": 99, "success": True}]
    log.write_text("".join(json.dumps(e) + "\n" for e in lines) + '{"task": "b", "se')
    episodes = Comparison._logged_episodes(log, ["a", "b"], [1, 2])
    got = sorted((e["task"], e["seed"], e["success"]) for e in episodes)
    # One episode per (task, seed), the last one logged; other tasks, other seeds and the line the
    # interruption cut short are dropped.
    assert got == [("a", 1, True), ("a", 2, True), ("b", 1, True)]
    assert Comparison._logged_episodes(tmp_path / "missing.jsonl", ["a"], [1]) == []


def test_qvla_prices_rows_in_the_layout_its_memory_is_measured_in():
    """On a GPU the kernels' layout is what stays resident (and what weight_memory measures), so the
    runner allocates in it there; on the CPU in the packed layout. Either way the plan keeps to the
    matched budget in its own units."""
    from qvla_ros.quant.baselines.methods import parse_method
    from qvla_ros.quant.baselines.qvla_match import QvlaRunner
    from qvla_ros.quant.calibration import synthetic_frames

    frames = synthetic_frames(make_policy("micro", seed=0).config, 4, seed=0)
    spec = parse_method("qvla-b12")
    for layout, version in ((None, 2), ("kernel", 3)):   # None on a CPU policy: packed
        policy = make_policy("micro", seed=0).eval()
        info = QvlaRunner(frames, progress=False, layout=layout)(policy, frames, spec, 12.0)
        plan = info["plan"]
        assert plan.version == version and info["allocation"].get("layout", "packed") == (layout or "packed")
        assert plan.weight_bits() <= 12.0 * plan.params
    with pytest.raises(ValueError, match="layout"):
        QvlaRunner(frames, layout="gpu")


def test_a_whole_policy_budget_counts_every_weight():
    """qvla-b{X}-whole: the allocator's whole-policy scope, so the MEASURED whole-policy bits (the
    weights no method quantizes at their stored width) keep to X, and the quantized Linears get
    what is left of it."""
    from qvla_ros.quant.baselines.api import quantize_baseline
    from qvla_ros.quant.baselines.methods import MethodError, parse_method
    from qvla_ros.quant.baselines.qvla_match import QvlaRunner
    from qvla_ros.quant.calibration import synthetic_frames

    spec = parse_method("qvla-gptq-b9.5-whole")
    assert (spec.scope, spec.budget, spec.rounding) == ("whole", 9.5, "gptq")
    assert parse_method("qvla-b4.0").scope == "planned"
    with pytest.raises(MethodError, match=r"\(0, 32\]"):
        parse_method("qvla-b33-whole")
    frames = synthetic_frames(make_policy("micro", seed=0).config, 4, seed=0)
    runner = QvlaRunner(frames, progress=False)
    for method in ("qvla-b12-whole", "qvla-b12"):
        result = quantize_baseline(make_policy("micro", seed=0).eval(), method, frames, qvla=runner,
                                   progress=False)
        whole, planned = result.memory.policy_bits_per_param, result.memory.bits_per_param
        if method.endswith("-whole"):
            assert 11.5 < whole <= 12.0 and planned < whole   # the float32 rest takes its share
        else:
            assert 11.5 < planned <= 12.0 and whole > 12.0


def test_a_bfloat16_policy_is_compared_as_deployed(setup):
    """--dtype bfloat16: the float row and every weight no method quantizes are bf16 (16 whole bits
    for fp), the quantized checkpoints keep it, and a whole-policy budget then leaves the quantized
    Linears what 16-bit rest leaves; the rollouts run those checkpoints."""
    import torch
    from qvla_ros.quant.checkpoint import load_quantized

    out = setup / "bf16"
    assert _run(setup, out, "fp,rtn-g32-w4,qvla-b12-whole", extra=("--dtype", "bfloat16")) == 0
    doc = json.loads((out / "compare.json").read_text())
    assert doc["settings"]["dtype"] == "bfloat16" and "float policy in bfloat16" in (out / "compare.md").read_text()
    rows = {r["method"]["name"]: r for r in doc["rows"]}
    assert rows["fp"]["memory"]["policy_bits_per_param"] == pytest.approx(16.0, abs=0.01)
    assert rows["rtn-g32-w4"]["memory"]["policy_bits_per_param"] < 16
    assert 11.5 < rows["qvla-b12-whole"]["memory"]["policy_bits_per_param"] <= 12.0
    for row in rows.values():
        assert row["closed_loop"]["overall"]["episodes"] == 1
    policy = load_quantized(next((out / "runs").glob("rtn-g32-w4-*")) / "policy")
    assert {p.dtype for p in policy.parameters() if p.is_floating_point()} == {torch.bfloat16}
    # the float32 run of the same methods is another cache entry, not this one
    assert not set(p.name for p in (out / "runs").iterdir()) & set(
        p.name for p in (setup / "out" / "runs").iterdir() if p.name.startswith("fp-"))
