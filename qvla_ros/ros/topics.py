"""What the nodes agree on: QoS of each stream, and the layout of the proprio JointState.

QoS is chosen per stream, on purpose:
- instruction: reliable + transient local, depth 1: a latched state. A node that starts (or
  restarts) late still receives the instruction in force.
- action_chunk: reliable, depth 10: every chunk is a command; none may be lost silently.
- proprio (subscriber side): best effort, depth 1: only the newest state matters, and a best-
  effort subscriber matches reliable and best-effort publishers alike.
- cameras: a parameter of the policy node (see policy_node.yaml); the sim bridge publishes
  reliable so that either choice matches it.
- episode results: reliable + transient local, deep enough to hold a whole run, so a monitor that
  joins late still reads every episode.
"""
from rclpy.qos import DurabilityPolicy, HistoryPolicy, QoSProfile, ReliabilityPolicy

INSTRUCTION_QOS = QoSProfile(depth=1, history=HistoryPolicy.KEEP_LAST,
                             reliability=ReliabilityPolicy.RELIABLE,
                             durability=DurabilityPolicy.TRANSIENT_LOCAL)
CHUNK_QOS = QoSProfile(depth=10, history=HistoryPolicy.KEEP_LAST,
                       reliability=ReliabilityPolicy.RELIABLE)
STATE_SUBSCRIBER_QOS = QoSProfile(depth=1, history=HistoryPolicy.KEEP_LAST,
                                  reliability=ReliabilityPolicy.BEST_EFFORT,
                                  durability=DurabilityPolicy.VOLATILE)
SENSOR_PUBLISHER_QOS = QoSProfile(depth=1, history=HistoryPolicy.KEEP_LAST,
                                  reliability=ReliabilityPolicy.RELIABLE,
                                  durability=DurabilityPolicy.VOLATILE)
RESULTS_QOS = QoSProfile(depth=1000, history=HistoryPolicy.KEEP_LAST,
                         reliability=ReliabilityPolicy.RELIABLE,
                         durability=DurabilityPolicy.TRANSIENT_LOCAL)


def image_qos(kind: str, depth: int) -> QoSProfile:
    """Camera subscription QoS: "sensor_data" (best effort) or "reliable"."""
    if kind not in ("sensor_data", "reliable"):
        raise ValueError(f"image QoS must be 'sensor_data' or 'reliable', got {kind!r}")
    reliability = (ReliabilityPolicy.BEST_EFFORT if kind == "sensor_data"
                   else ReliabilityPolicy.RELIABLE)
    return QoSProfile(depth=depth, history=HistoryPolicy.KEEP_LAST, reliability=reliability,
                      durability=DurabilityPolicy.VOLATILE)


# JointState entries that make the shipped policy's proprio vector: end-effector position and
# gripper opening (MetaWorld's first four state values).
PROPRIO_NAMES = ("ee_x", "ee_y", "ee_z", "gripper")
