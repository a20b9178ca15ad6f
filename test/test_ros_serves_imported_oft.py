"""qvla_policy_node serves an imported OpenVLA-OFT checkpoint (issue #18's last Done-when item).

A random checkpoint in the published layout (test_import_oft.py's `published` fixture: the real
key names, sharded safetensors, the .pt heads, a Llama-2-structured tokenizer.json,
dataset_statistics.json) goes through `import_oft`, then calibrate -> allocate -> quantize (a real
mixed-bit plan), and the quantized checkpoint is served by the real node in its own process over
DDS, started with the shipped parameter file as the other ROS tests start it. Two cameras (the
wrist one at another size, fitted by the node), an instruction in mixed case and 8 proprio
values go in; the 8 x 7 chunk that comes back is compared with the same quantized checkpoint run
in this process on the same inputs, and with BOUNDS_Q99 applied by hand from the published
dataset_statistics.json[unnorm_key] to the normalized actions.
"""
import json
import time

import numpy as np
import pytest

pytestmark = pytest.mark.ros

rclpy = pytest.importorskip("rclpy")

from qvla_ros.ros.harness import NodeProcess  # noqa: E402
from qvla_ros.ros.paths import config_file  # noqa: E402

from test_import_oft import UNNORM, published  # noqa: E402,F401  (published: the fixture)

# LIBERO's proprio as OpenVLA-OFT's eval builds it: end-effector position, its orientation as an
# axis-angle, the two gripper finger positions (8 values).
OFT_PROPRIO_NAMES = ["eef_x", "eef_y", "eef_z", "eef_ax", "eef_ay", "eef_az", "finger_l", "finger_r"]
# Mixed case on purpose: OFT lower-cases the task inside its prompt.
INSTRUCTION = "Put the Bowl on the plate"
OTHER = "open the top drawer of the cabinet"
# The primary camera at the policy's side (28 px: passed through untouched); the wrist camera at a
# camera's own size and encoding, fitted by the node (image_resize fit, cv2 INTER_AREA).
WRIST_SIZE = (42, 56)
# Same float CPU path on both sides (same torch, same packed weights dequantized the same way, same
# uint8 pixels and float32 proprio): the chunks came out bit-identical here. Only the thread count
# (the node runs 1, this process torch's default), hence the BLAS reduction order, may differ:
# float32 rounding, ~1e-6 on actions of order 1. 1e-5 stays far below what a wrong input or
# statistic moves (a proprio order or the unnormalization broken on purpose: 0.05 to 1.5).
ATOL = 1e-5


@pytest.fixture(scope="module")
def served(published, tmp_path_factory):  # noqa: F811
    """The imported, quantized checkpoint, its policy loaded here, and the inputs the node gets."""
    from qvla_ros.cli import main
    from qvla_ros.policy.import_oft import import_oft
    from qvla_ros.quant.api import load_quantized_policy, mixed_bit_layers

    folder, _ = published
    root = tmp_path_factory.mktemp("served_oft")
    ckpt = import_oft(folder, root / "imported", unnorm_key="libero_spatial")   # the _no_noops fallback
    table, plan, q = (str(root / n) for n in ("s.safetensors", "plan.json", "q"))
    assert main(["calibrate", "--policy", str(ckpt), "--synthetic", "--frames", "2", "--out", table]) == 0
    assert main(["allocate", "--sensitivity", table, "--budget", "4", "--budget-scope", "planned",
                 "--policy", str(ckpt), "--out", plan]) == 0
    assert main(["quantize", "--policy", str(ckpt), "--plan", plan, "--out", q]) == 0
    policy = load_quantized_policy(q).eval()
    assert mixed_bit_layers(policy) and policy.qvla_plan_id
    cfg = policy.config
    rng = np.random.default_rng(7)
    primary = rng.integers(0, 256, (cfg.image_size, cfg.image_size, 3), np.uint8)
    wrist_bgr = rng.integers(0, 256, (*WRIST_SIZE, 3), np.uint8)
    # Within the proprio statistics' [q01, q99] (test_import_oft.stats_json), so the normalization
    # does not clip every value to the same bound.
    proprio = np.round(rng.uniform(-0.9, 0.9, cfg.proprio_dim), 3).astype(np.float32)
    return {"folder": folder, "checkpoint": q, "plan_id": policy.qvla_plan_id, "policy": policy,
            "primary": primary, "wrist_bgr": wrist_bgr, "proprio": proprio}


def chunk_here(served, wrist_rgb, instruction):
    """(actions, normalized actions) [horizon, action_dim] of the quantized policy in this process."""
    import torch

    policy = served["policy"]
    images = torch.from_numpy(np.stack([served["primary"], wrist_rgb]))[None]
    proprio = torch.from_numpy(served["proprio"])[None]
    with torch.inference_mode():
        actions = policy(images, [instruction], proprio)
        normalized = policy.predict_normalized(*policy.prepare_inputs(images, [instruction], proprio))
    return actions[0].numpy(), normalized[0].numpy()


def test_the_node_serves_a_quantized_imported_oft_checkpoint(ros_env, served):
    from tokenizers import Tokenizer

    from qvla_ros.policy.configuration_oft import OFT_PROMPT
    from qvla_ros.ros.feeder import Feeder
    from qvla_ros.ros.image_conversion import array_to_image, image_to_rgb8

    policy, cfg, folder = served["policy"], served["policy"].config, served["folder"]
    assert (cfg.n_cams, cfg.proprio_dim, cfg.horizon, cfg.action_dim) == (2, 8, 8, 7)
    # The quantized checkpoint carries the published tokenizer: the prompt in the checkpoint's
    # format (lower-cased task, BOS from the template, `▁` appended) tokenized as tokenizer.json does.
    tok = Tokenizer.from_str((folder / "tokenizer.json").read_text())
    ids = tok.encode(OFT_PROMPT.format(INSTRUCTION.lower())).ids
    assert policy.tokenizer.prompt_ids(INSTRUCTION) == ids + [cfg.empty_id] * (ids[-1] != cfg.empty_id)
    assert any(t.startswith("<0x") for t in tok.encode(OFT_PROMPT.format("zqx")).tokens)  # byte fallback

    wrist_msg = array_to_image(served["wrist_bgr"], "bgr8")
    # What the node makes of the wrist frame: the product's own conversion (tested against cv2 in
    # test_ros_image_conversion.py / test_ros_camera_inputs.py), with the node's settings.
    wrist_rgb = image_to_rgb8(wrist_msg, ("rgb8", "bgr8"), (cfg.image_size, cfg.image_size), "fit", 1.0)
    expected, normalized = chunk_here(served, wrist_rgb, INSTRUCTION)
    other, _ = chunk_here(served, wrist_rgb, OTHER)
    assert np.abs(expected - other).max() > 1e-3          # the instruction is told apart

    # BOUNDS_Q99 by hand, from the published statistics of the unnorm_key (not the stored buffers).
    stats = json.loads((folder / "dataset_statistics.json").read_text())[UNNORM]["action"]
    q01, q99 = (np.asarray(stats[k], np.float32) for k in ("q01", "q99"))
    mask = np.asarray(stats["mask"], bool)
    by_hand = np.where(mask, 0.5 * (normalized + 1) * (q99 - q01 + 1e-8) + q01, normalized)
    assert np.abs(by_hand - normalized)[:, mask].min() > 1e-3   # the statistics do move the actions

    rclpy.init()
    feeder = Feeder().spin_in_background()
    # The shipped parameter file, with the robot's proprio layout (its proprio_names are the
    # shipped policy's 4 sim-bridge values; test_shipped_proprio_names_are_refused_by_name).
    node = NodeProcess.start("qvla_policy_node", [config_file("policy_node.yaml")], env=ros_env,
                             overrides={"checkpoint": served["checkpoint"], "torch_threads": 1,
                                        "proprio_names": OFT_PROPRIO_NAMES})
    try:
        ready = node.wait_for(r"ready: serving", timeout=90)
        assert served["plan_id"] in ready and f"into {cfg.image_size}x{cfg.image_size}" in ready
        feeder.wait_for_policy_node()

        def observe(instruction, mark):
            feeder.send_instruction(instruction)
            node.wait_for(f"instruction: {instruction!r}", start=mark)
            stamp = feeder.get_clock().now().to_msg()
            # The JointState in another order than the policy's: the node orders it by name.
            order = [7, 0, 6, 1, 5, 2, 4, 3]
            feeder.send_proprio(served["proprio"][order], stamp, names=[OFT_PROPRIO_NAMES[i] for i in order])
            feeder.send_image(wrist_msg, stamp, cam=1)
            feeder.send_image(served["primary"], stamp, cam=0)
            return stamp

        stamp = observe(INSTRUCTION, 0)
        [got] = feeder.wait_chunks(1, timeout=60)
        chunk = got.chunk
        assert got.stamp == (stamp.sec, stamp.nanosec)
        assert (chunk.horizon, chunk.action_dim) == (8, 7) and got.actions.shape == (8, 7)
        assert chunk.plan_id == served["plan_id"] and chunk.instruction == INSTRUCTION
        np.testing.assert_allclose(got.actions, expected, rtol=0, atol=ATOL)
        # Unnormalized as the published statistics say (the gripper dimension, mask False, as is).
        np.testing.assert_allclose(got.actions, by_hand, rtol=0, atol=ATOL)
        np.testing.assert_allclose(got.actions[:, ~mask], normalized[:, ~mask], rtol=0, atol=ATOL)

        # Another instruction: re-tokenized, another chunk, again the one computed here.
        observe(OTHER, len(node.lines))
        got = feeder.wait_chunks(2, timeout=60)[-1]
        assert got.chunk.instruction == OTHER
        np.testing.assert_allclose(got.actions, other, rtol=0, atol=ATOL)

        # A task longer than the checkpoint's max_text_tokens is refused, not cut, and the node
        # keeps serving.
        mark = len(node.lines)
        observe(" ".join(["pick up the bowl"] * 20), mark)
        node.wait_for(r"policy forward failed: ValueError: instruction .* prompt tokens; this policy "
                      rf"takes at most {cfg.max_text_tokens}", start=mark)
        time.sleep(0.3)
        assert len(feeder.received) == 2
        observe(INSTRUCTION, len(node.lines))
        got = feeder.wait_chunks(3, timeout=60)[-1]
        np.testing.assert_allclose(got.actions, expected, rtol=0, atol=ATOL)
        assert "Traceback" not in node.output
    finally:
        code = node.stop()
        feeder.close()
        rclpy.try_shutdown()
    assert code == 0, node.output


def test_shipped_proprio_names_are_refused_by_name(ros_env, served):
    """config/policy_node.yaml names the shipped policy's 4 proprio values (the sim bridge's); an
    OFT checkpoint takes 8, so the node started with the file alone stops at once, naming the
    parameter to set, instead of serving chunks from a proprio vector of the wrong layout."""
    node = NodeProcess.start("qvla_policy_node", [config_file("policy_node.yaml")], env=ros_env,
                             overrides={"checkpoint": served["checkpoint"]})
    try:
        node.wait_for(r"cannot start: parameter proprio_names: 4 names, the policy takes 8 proprio "
                      r"values", timeout=90)
        assert node.popen.wait(30) == 1, node.output
    finally:
        node.stop()
