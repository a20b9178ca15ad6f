"""Property-based tests of the instruction boundary, through the policy node's own handling: a
real PolicyNode (in this process, micro checkpoint) is handed std_msgs/String messages as its
subscription would hand them: any text, empty or blank, huge, control characters, and byte
strings that are not UTF-8 (rclpy delivers those decoded with U+FFFD replacements; checked over
DDS in test_reliability_node.py).

Each message is either taken as the instruction in force or refused and counted under its kind
(instruction_empty, instruction_long, instruction_encoding: U+FFFD, what a wire's bad bytes
decode to), leaving the instruction in force as it was. A taken
instruction always gives a finite chunk of the right shape from the node's policy server.
"""
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

rclpy = pytest.importorskip("rclpy")

from std_msgs.msg import String  # noqa: E402

FUZZ = settings(max_examples=60, derandomize=True, deadline=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])

CONTROL = "".join(map(chr, range(0, 32))) + "\x7f\x85\u2028\u2029\ufeff\u200b"
TEXTS = st.one_of(
    st.text(max_size=60),
    st.text(alphabet=st.sampled_from(CONTROL + " \t\n"), max_size=20),  # blank or control only
    st.text(alphabet=st.characters(codec="utf-8"), min_size=4090, max_size=4100),  # at the limit
    st.integers(4097, 200_000).map(lambda n: "pick up the cube " * (n // 17 + 1)),  # huge
    st.binary(max_size=60).map(lambda b: b.decode("utf-8", errors="replace")),  # non-UTF-8 bytes
    st.sampled_from(["", " ", "\x00", "open\x00drawer", "\u202eright-to-left", "🤖" * 50]),
)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    from qvla_ros.policy import make_policy

    return str(make_policy("micro", seed=0).save_pretrained(tmp_path_factory.mktemp("ckpt") / "c"))


@pytest.fixture
def node(ros_env, checkpoint):
    from rclpy.parameter import Parameter

    from qvla_ros.ros.policy_node import PolicyNode

    rclpy.init()
    policy_node = PolicyNode(parameter_overrides=[Parameter("checkpoint", value=checkpoint),
                                                  Parameter("torch_threads", value=1)])
    yield policy_node
    policy_node.destroy_node()
    rclpy.try_shutdown()


def test_any_instruction_is_taken_or_refused_and_counted(node):
    from qvla_ros.ros.policy_node import MAX_INSTRUCTION_CHARS

    cfg = node.server.config
    images = np.zeros((cfg.n_cams, cfg.image_size, cfg.image_size, 3), np.uint8)
    proprio = np.zeros(cfg.proprio_dim, np.float32)
    counts = node._stats.rejected

    @FUZZ
    @given(text=TEXTS)
    def check(text):
        before = node.sync.instruction
        empty, long = counts["instruction_empty"], counts["instruction_long"]
        garbled = counts["instruction_encoding"]
        node._on_instruction(String(data=text))
        if not text.strip():
            assert node.sync.instruction == before
            assert counts["instruction_empty"] == empty + 1
        elif len(text) > MAX_INSTRUCTION_CHARS:
            assert node.sync.instruction == before
            assert counts["instruction_long"] == long + 1
        elif "\ufffd" in text:
            assert node.sync.instruction == before
            assert counts["instruction_encoding"] == garbled + 1
        else:
            assert node.sync.instruction == text
            assert (counts["instruction_empty"], counts["instruction_long"],
                    counts["instruction_encoding"]) == (empty, long, garbled)
            result = node.server.infer(images, text, proprio)
            assert result.actions.shape == (cfg.horizon, cfg.action_dim)
            assert np.isfinite(result.actions).all()

    check()
    # The node is still whole: a plain instruction is taken and served after all of the above.
    node._on_instruction(String(data="close the drawer"))
    assert node.sync.instruction == "close the drawer"
    assert node.server.infer(images, "close the drawer", proprio).actions.shape == (
        cfg.horizon, cfg.action_dim)
