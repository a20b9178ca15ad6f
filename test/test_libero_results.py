"""bench/libero/results.py: issue #20's results.json assembled from the recorded expert, eval and
compare files (here the MetaWorld oft-small ones stand in for LIBERO's; the format is the same)."""
import importlib.util
import json
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _script():
    spec = importlib.util.spec_from_file_location("libero_results", ROOT / "bench" / "libero" / "results.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_results_hold_what_each_input_measured(tmp_path):
    runs = ROOT / "bench" / "compare" / "oft_small_h100"
    out = tmp_path / "results.json"
    _script().main(["--expert", str(ROOT / "bench" / "libero" / "expert.json"), "--eval", str(runs / "eval_float.json"),
                    "--compare", str(runs / "compare.json"), "--out", str(out)])
    doc = json.loads(out.read_text())
    assert doc["expert_success"]["libero_object"]["episodes"] == 200
    assert doc["float_success"]["rate"] == pytest.approx(0.835)
    qvla = doc["methods"]["rows"]["qvla-gptq@gptq-g128-w4"]
    assert qvla["whole_policy_bits"] > qvla["bits_per_param"] > 4.25      # the run's measured memory
    assert qvla["of_float"] == pytest.approx(0.835 / 0.83)
    assert qvla["vs_fp"]["episodes"] == 200 and "vs_best_baseline" in qvla
    assert "success" in doc["methods"]["rows"]["fp"] and "vs_fp" not in doc["methods"]["rows"]["fp"]
    # a part without its input is absent, not filled in
    _script().main(["--expert", str(ROOT / "bench" / "libero" / "expert.json"), "--out", str(out)])
    assert set(json.loads(out.read_text())) == {"format", "version", "sources", "expert_success"}
    with pytest.raises(ValueError, match="qvla eval"):
        _script().main(["--eval", str(runs / "compare.json"), "--out", str(out)])
