"""Each test that issue #16 item 6 named as unable to fail, run against the smallest mutation of
the code it covers, in a scratch copy (never this checkout): the record is test_mutations.md.

    mkdir /tmp/mut && git archive HEAD | tar -x -C /tmp/mut && ln -s $PWD/.venv /tmp/mut/.venv
    python bench/quant/test_mutations.py /tmp/mut [A B ...]

Every mutated file is restored after its run (try/finally), so the scratch copy ends as it began.
"""
import subprocess, sys, pathlib
if len(sys.argv) < 2 or not (pathlib.Path(sys.argv[1]) / "qvla_ros").is_dir():
    sys.exit("usage: test_mutations.py SCRATCH_COPY [MUTATION ...] (a copy of the repository, not this checkout)")
root = pathlib.Path(sys.argv[1]).resolve()
if root == pathlib.Path(__file__).resolve().parents[2]:
    sys.exit("refusing to mutate this checkout: give a scratch copy")
muts = [
 ("A", "qvla_ros/cli.py", '"demo": "qvla_ros.ros.demo",', '"demo": "qvla_ros.ros.demo_missing",', "test/test_foundation.py::test_cli_lists_every_verb"),
 ("B", "qvla_ros/quant/packing.py", "    return total_bits // 8\n", "    return total_bits // 8 + 1\n", "test/test_quant_packing.py"),
 ("C", "qvla_ros/quant/plan.py", 'whole["rest_bits"] + 7) // 8', 'whole["rest_bits"] + 7) // 8 + 1', "test/test_quant_commands.py::test_calibrate_allocate_quantize"),
]
muts += [
 ("D", "qvla_ros/quant/sensitivity.py", "table[:, measured] = (tap.acc * scale).cpu().numpy()", "table[:, measured] = (tap.acc * scale).cpu().numpy()[::-1]", "test/test_quant_sensitivity.py::test_jacobian_ranks_like_exact_and_table_roundtrips"),
 ("E", "qvla_ros/quant/refine.py", "    best = min(measured, key=measured.get)", "    best = max(measured, key=measured.get)", "test/test_quant_refine.py::test_select_allocation_measures_every_variant"),
 ("F", "qvla_ros/policy/__init__.py", '"""The VLA policy', 'raise ImportError("mutation: policy package broken")\n"""The VLA policy', "test/test_quant_refine.py"),
]
muts += [("G", "qvla_ros/quant/plan.py", 'whole["rest_bits"] + 7) // 8', 'whole["rest_bits"] + 7) // 8 + 1', "test/test_quant_commands.py::test_quantize_with_gptq_rows")]
which = sys.argv[2:]
for name, f, old, new, test in muts:
    if which and name not in which: continue
    p = root / f; src = p.read_text(); assert src.count(old) == 1, (name, src.count(old))
    p.write_text(src.replace(old, new, 1))
    try:
        out = subprocess.run([".venv/bin/python", "-m", "pytest", "-q", "-x", test, "-p", "no:cacheprovider"], cwd=root, capture_output=True, text=True)
    finally:
        p.write_text(src)
    lines = [l for l in out.stdout.splitlines() if l.startswith("E ") or l.startswith("ERROR") or "error" in l or "FAILED" in l or "passed" in l or "failed" in l]
    print("==", name, f, "rc", out.returncode); print("\n".join(lines[:12]))
