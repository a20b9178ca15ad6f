"""The LIBERO adapter (qvla_ros.sim.libero.env): OFT's observations, the 7-d action, input checks.
Skipped only where the simulator is not installed (scripts/bootstrap.sh installs it)."""
import numpy as np
import pytest

from qvla_ros.sim.libero import simulator_missing
from qvla_ros.sim.libero.geometry import quat_xyzw_to_mat, rotation_vector

if simulator_missing():
    pytest.skip(simulator_missing(), allow_module_level=True)

from qvla_ros.sim.libero.env import ACTION_DIM, PROPRIO_DIM, LiberoEnv, quat_to_axis_angle  # noqa: E402


@pytest.fixture(scope="module")
def env():
    e = LiberoEnv("libero_object", 0)
    yield e
    e.close()


def test_observation_shapes_dtypes_and_instruction(env):
    obs = env.reset(0)
    assert obs["images"].shape == (2, 224, 224, 3) and obs["images"].dtype == np.uint8
    for img in obs["images"]:   # third-person and wrist both see a scene, not a blank frame
        assert img.std() > 10
    assert not np.array_equal(obs["images"][0], obs["images"][1])
    assert obs["proprio"].shape == (PROPRIO_DIM,) == (8,) and obs["proprio"].dtype == np.float32
    raw = env.raw_observation
    np.testing.assert_allclose(obs["proprio"][:3], raw["robot0_eef_pos"], atol=1e-6)
    np.testing.assert_allclose(obs["proprio"][6:], raw["robot0_gripper_qpos"], atol=1e-6)
    assert obs["instruction"] == env.task.instruction
    assert "alphabet soup" in obs["instruction"] and "basket" in obs["instruction"]


def test_step_moves_the_end_effector_the_commanded_way(env):
    start = env.reset(1, render=False)["proprio"][:3].copy()
    action = np.zeros(ACTION_DIM)
    action[0] = 1.0                                   # +x
    for _ in range(5):
        obs, success = env.step(action, render=False)
    assert isinstance(success, bool) and not success
    assert env.steps == 5 and obs["images"] is None
    moved = obs["proprio"][:3] - start
    # OSC_POSE lags its goal: ~4.4 cm after five full +x steps (measured), well clear of noise.
    assert moved[0] > 0.03 and abs(moved[1]) < 0.02 and abs(moved[2]) < 0.02


def test_same_initial_state_same_start(env):
    first = env.reset(2, render=False)["proprio"]
    env.step(np.r_[np.ones(3), np.zeros(3), 1.0], render=False)
    other = env.reset(3, render=False)["proprio"]
    again = env.reset(2, render=False)["proprio"]
    np.testing.assert_allclose(first, again, atol=1e-6)
    assert not np.allclose(first, other)


def test_bad_inputs_raise_clear_errors(env):
    env.reset(0, render=False)
    with pytest.raises(ValueError, match="7 values"):
        env.step(np.zeros(4))
    with pytest.raises(ValueError, match="not finite"):
        env.step(np.r_[np.zeros(6), np.nan])
    with pytest.raises(ValueError, match="init_state"):
        env.reset(env.n_init_states)
    with pytest.raises(ValueError, match="unknown LIBERO suite"):
        LiberoEnv("libero_objects", 0)


def test_episode_ends_at_max_steps():
    with LiberoEnv("libero_object", 1, cameras=(), max_steps=3) as short:
        short.reset(0)
        for _ in range(3):
            short.step(np.zeros(ACTION_DIM), render=False)
        assert short.done_by_time
        with pytest.raises(RuntimeError, match="3 steps"):
            short.step(np.zeros(ACTION_DIM), render=False)


@pytest.mark.parametrize("quat", [[0, 0, 0, 1], [1, 0, 0, 0], [0.2, -0.4, 0.1, 0.89],
                                  [-0.6, 0.3, 0.7, -0.2]])
def test_proprio_axis_angle_is_the_quaternions_rotation(quat):
    q = np.asarray(quat, float) / np.linalg.norm(quat)
    aa = quat_to_axis_angle(q)
    np.testing.assert_allclose(aa, rotation_vector(quat_xyzw_to_mat(q)), atol=1e-6)
    assert np.linalg.norm(aa) <= np.pi + 1e-9
