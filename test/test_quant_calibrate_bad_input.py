"""qvla calibrate on bad input (issue #16): frames of the wrong shape, a model with no quantizable
layer left, and a GPU running out of memory inside a layer's forward part-way through the real
calibration. Each is a one-line error (exit 2) and no table file is left behind."""
import json

import numpy as np
import torch

from qvla_ros import cli
from qvla_ros.dataset import episode_path, write_episode
from qvla_ros.policy import make_policy


def _demos(root, n_cams):
    """A one-episode demo folder whose frames carry n_cams cameras."""
    rng = np.random.default_rng(0)
    path = write_episode(episode_path(root, "drawer-open", 0), rng.integers(0, 255, (4, n_cams, 16, 16, 3), dtype=np.uint8),
                         rng.normal(size=(4, 4)).astype(np.float32), rng.uniform(-1, 1, (4, 4)).astype(np.float32),
                         "open the drawer", "drawer-open", 0)
    episode = {"task": "drawer-open", "seed": 0, "file": str(path.relative_to(root))}
    (root / "manifest.json").write_text(json.dumps({"recipe": {"test": True}, "complete": True, "episodes": [episode]}))
    return root


def _micro(tmp_path):
    make_policy("micro", seed=0).save_pretrained(tmp_path / "policy")
    return str(tmp_path / "policy")


def test_frames_of_the_wrong_shape_and_no_quantizable_layer(tmp_path, capsys):
    policy, out = _micro(tmp_path), tmp_path / "s.safetensors"
    demos = _demos(tmp_path / "demos", n_cams=3)          # micro takes 2 cameras
    assert cli.main(["calibrate", "--policy", policy, "--data", str(demos), "--frames", "2", "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert "2 RGB cameras" in err and "Traceback" not in err and not out.exists()

    assert cli.main(["calibrate", "--policy", policy, "--synthetic", "--frames", "1", "--exclude", ".*",
                     "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert "no quantizable" in err and "Traceback" not in err and not out.exists()
    assert cli.main(["calibrate", "--policy", policy, "--synthetic", "--frames", "1", "--exclude", ".*",
                     "--rounding", "gptq", "--out", str(out)]) == 2
    assert "no quantizable" in capsys.readouterr().err and not out.exists()


def test_out_of_memory_inside_a_layer_part_way_leaves_no_table(tmp_path, capsys, monkeypatch):
    """The error is raised by a forward hook on a Linear half-way through the policy, during the
    real jacobian_sensitivity's forward (the estimator itself is not replaced)."""
    from qvla_ros.policy import load_policy

    policy_dir, out = _micro(tmp_path), tmp_path / "s.safetensors"
    calls = {"n": 0}

    def load_with_a_failing_layer(*args, **kwargs):
        policy = load_policy(*args, **kwargs)
        linears = [m for m in policy.modules() if isinstance(m, torch.nn.Linear)]

        def oom(module, inputs, output):
            calls["n"] += 1
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        linears[len(linears) // 2].register_forward_hook(oom)
        return policy

    import qvla_ros.policy as policy_pkg
    monkeypatch.setattr(policy_pkg, "load_policy", load_with_a_failing_layer)
    assert cli.main(["calibrate", "--policy", policy_dir, "--synthetic", "--frames", "1", "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert calls["n"] >= 1, "the failing layer never ran"
    assert "ran out of device memory" in err and "nothing was written" in err and not out.exists()
    assert not list(tmp_path.glob("s.safetensors*")), "a partial or temporary table was left behind"
