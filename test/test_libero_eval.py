"""A learned policy rolls out LIBERO through the same machinery as MetaWorld (evaluate ->
workers -> run_lockstep): a random OFT policy of oft-micro size (LIBERO's shapes: two cameras,
8 proprio values, chunks of 8 x 7 actions) for two short episodes. Checks the plumbing (what the
policy is given and returns, the seeds = evaluation initial states, the results), not success.
Skipped only where the simulator is not installed (scripts/bootstrap.sh installs it)."""

import pytest

from qvla_ros.sim.benchmarks import get_benchmark
from qvla_ros.sim.libero import simulator_missing
from qvla_ros.sim.libero.env import DEMO_INIT_STATES, EVAL_INIT_STATES

if simulator_missing():
    pytest.skip(simulator_missing(), allow_module_level=True)

MAX_STEPS = 12           # two chunks of 8: the second cut short by the step limit
CALLS: list = []         # what the recording policy saw, in this process (workers=0)


class RecordingFactory:
    """The checkpoint's policy, recording every call's inputs and output shapes."""

    def __init__(self, path):
        self.path = str(path)

    def __call__(self):
        from qvla_ros.sim.factories import CheckpointPolicyFactory

        policy = CheckpointPolicyFactory(self.path)()

        class Recording:
            config = policy.config

            def __call__(self, images, instruction, proprio):
                out = policy(images, instruction, proprio)
                CALLS.append({"images": tuple(images.shape), "dtype": str(images.dtype),
                              "proprio": tuple(proprio.shape), "instruction": list(instruction),
                              "out": tuple(out.shape)})
                return out

        return Recording()

    def describe(self):
        return {"kind": "recording", "path": self.path}


@pytest.fixture(scope="module")
def micro(tmp_path_factory):
    from qvla_ros.policy import make_policy

    policy = make_policy("oft-micro", seed=0)
    cfg = policy.config
    assert (cfg.n_cams, cfg.proprio_dim, cfg.horizon, cfg.action_dim) == (2, 8, 8, 7)
    return policy.save_pretrained(tmp_path_factory.mktemp("libero_micro") / "ckpt")


def test_the_split_of_initial_states_is_named_and_disjoint():
    assert list(DEMO_INIT_STATES) == list(range(30)) and list(EVAL_INIT_STATES) == list(range(30, 50))
    bench = get_benchmark("libero-object")
    assert [bench.eval_seed(i) for i in range(3)] == [30, 31, 32]
    assert bench.eval_seed(0, offset=19) == 49 and bench.demo_seed(29) == 29
    assert all(bench.is_eval_seed(s) for s in EVAL_INIT_STATES)
    assert not any(bench.is_eval_seed(s) for s in DEMO_INIT_STATES)
    with pytest.raises(ValueError, match="30-49"):
        bench.eval_seed(20)
    with pytest.raises(ValueError, match="0-29"):
        bench.demo_seed(30)
    assert (bench.action_dim, bench.proprio_dim, len(bench.cameras), bench.max_steps) == (7, 8, 2, 280)
    assert get_benchmark("libero_spatial").max_steps == 220
    with pytest.raises(ValueError, match="unknown libero-object task"):
        bench.resolve_tasks("10")
    assert [t.name for t in bench.resolve_tasks("3,libero_object/4")] == ["libero_object/3", "libero_object/4"]


def test_metaworld_description_matches_its_modules():
    from qvla_ros.sim import env, suite
    from qvla_ros.sim.expert import ExpertFactory

    mw = get_benchmark(None)
    assert (mw.action_dim, mw.proprio_dim, mw.cameras, mw.image_size, mw.max_steps) == (
        env.ACTION_DIM, env.PROPRIO_DIM, env.DEFAULT_CAMERAS, env.DEFAULT_IMAGE_SIZE, suite.DEFAULT_MAX_STEPS)
    assert isinstance(mw.expert_factory(), ExpertFactory) and mw.eval_seed(0) == suite.EVAL_SEED_BASE
    try:
        from qvla_ros.ros.topics import PROPRIO_NAMES
    except ImportError:    # no ROS here: the names are checked where it is
        return
    assert mw.proprio_names == PROPRIO_NAMES


def test_a_metaworld_shaped_policy_is_refused_before_any_episode():
    from qvla_ros.policy import default_checkpoint_dir
    from qvla_ros.sim.evaluate import evaluate
    from qvla_ros.sim.factories import CheckpointPolicyFactory
    from qvla_ros.sim.workers import WorkerError

    with pytest.raises(WorkerError, match="action_dim is 4; libero-object has 7"):
        evaluate(CheckpointPolicyFactory(default_checkpoint_dir()), tasks="0", episodes_per_task=1,
                 suite="libero-object", progress=False)
    with pytest.raises(ValueError, match="demonstration range"):
        evaluate(CheckpointPolicyFactory(default_checkpoint_dir()), tasks="0", seeds=[3],
                 suite="libero-object", progress=False)


@pytest.mark.slow
def test_oft_policy_rolls_out_libero_through_evaluate(micro, tmp_path):
    from qvla_ros.sim.evaluate import EvalResults, evaluate

    CALLS.clear()
    results = evaluate(RecordingFactory(micro), tasks="0", episodes_per_task=2, batch_size=1,
                       max_steps=MAX_STEPS, suite="libero-object", progress=False)
    results.save(tmp_path, plot=False)
    saved = EvalResults.load(tmp_path / "results.json")
    episodes = saved.episodes
    assert [(e["task"], e["seed"]) for e in episodes] == [("libero_object/0", 30), ("libero_object/0", 31)]
    for e in episodes:
        assert isinstance(e["success"], bool) and e["steps"] == MAX_STEPS   # random: no success
    s = saved.settings
    assert s["suite"] == "libero-object" and s["seeds"] == [30, 31] and s["max_steps"] == MAX_STEPS
    assert s["cameras"] == ["agentview", "robot0_eye_in_hand"] and s["image_size"] == 28
    assert "alphabet soup" in s["tasks"]["libero_object/0"]
    assert saved.per_task["libero_object/0"]["episodes"] == 2

    # One call per chunk: steps 0 and 8 of each episode; the policy's own image size, 8 proprio
    # values, one instruction, an 8 x 7 chunk back.
    assert len(CALLS) == 4
    for call in CALLS:
        assert call["images"] == (1, 2, 28, 28, 3) and call["dtype"] == "torch.uint8"
        assert call["proprio"] == (1, 8) and call["out"] == (1, 8, 7)
        assert call["instruction"] == ["pick up the alphabet soup and place it in the basket"]


def test_cli_eval_names_the_suite_and_refuses_unknown_tasks(capsys):
    from qvla_ros.cli import main

    assert main(["eval", "--suite", "libero-object", "--policy", "expert", "--tasks", "12",
                 "--out", "/nonexistent/never"]) == 2
    assert "unknown libero-object task '12'" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["eval", "--suite", "libero-goalish", "--policy", "expert", "--out", "/nonexistent/never"])
