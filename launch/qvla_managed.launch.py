"""The managed (lifecycle) QVLA policy node, configured and then activated by launch.

    ros2 launch qvla_ros qvla_managed.launch.py plan:=/path/to/plan.json image:=/camera/image_raw
    ros2 launch qvla_ros qvla_managed.launch.py autostart:=false   # a lifecycle manager drives it

With autostart (the default) launch asks for `configure` at once (load and check the policy and
plan) and, when the node reaches `inactive`, for `activate`; a failed configure (a refused plan)
leaves it unconfigured and the reason in its log. Later transitions:
    ros2 lifecycle set /qvla_policy_node deactivate | activate | cleanup | shutdown
or the lifecycle_msgs/srv/ChangeState service /qvla_policy_node/change_state.

Same arguments as qvla.launch.py. Written against the documented launch / launch_ros API
(LifecycleNode, EmitEvent(ChangeState), OnStateTransition); `launch` and `launch_ros` are not on
PyPI, so this file is not run by the test suite. test/test_ros_launch_files.py checks its
structure against recorders of those classes (the node, its parameters and remappings, configure
at start, activate on configuring -> inactive, nothing with autostart:=false) and the handler's
state labels against the real node's transition events; test/test_ros_lifecycle.py drives the
same transitions through the services.
"""
from launch import LaunchDescription
from launch.actions import DeclareLaunchArgument, EmitEvent, OpaqueFunction, RegisterEventHandler
from launch.events import matches_action
from launch.substitutions import LaunchConfiguration, PathJoinSubstitution
from launch_ros.actions import LifecycleNode
from launch_ros.event_handlers import OnStateTransition
from launch_ros.events.lifecycle import ChangeState
from launch_ros.substitutions import FindPackageShare
from lifecycle_msgs.msg import Transition

from qvla_ros.ros.transport import transport_environment

OVERRIDES = ("checkpoint", "plan", "device")
TOPICS = ("image", "image2", "instruction", "proprio", "action_chunk", "action", "diagnostics")


def managed_policy_node(context):
    overrides = {name: LaunchConfiguration(name).perform(context) for name in OVERRIDES}
    overrides = {name: value for name, value in overrides.items() if value}
    node = LifecycleNode(
        package="qvla_ros",
        executable="qvla_managed_policy_node",
        name="qvla_policy_node",
        namespace=LaunchConfiguration("namespace"),
        parameters=[LaunchConfiguration("params_file")] + ([overrides] if overrides else []),
        remappings=[(topic, LaunchConfiguration(topic)) for topic in TOPICS],
        additional_env=transport_environment(),
        output="screen",
    )
    if LaunchConfiguration("autostart").perform(context).lower() not in ("true", "1", "yes"):
        return [node]

    def change(transition_id):
        return EmitEvent(event=ChangeState(lifecycle_node_matcher=matches_action(node),
                                           transition_id=transition_id))

    return [
        # Registered before the node starts, so the `inactive` after configure is not missed.
        RegisterEventHandler(OnStateTransition(
            target_lifecycle_node=node, start_state="configuring", goal_state="inactive",
            entities=[change(Transition.TRANSITION_ACTIVATE)])),
        node,
        change(Transition.TRANSITION_CONFIGURE),
    ]


def generate_launch_description():
    arguments = [
        DeclareLaunchArgument(
            "params_file",
            default_value=PathJoinSubstitution(
                [FindPackageShare("qvla_ros"), "config", "policy_node.yaml"]),
            description="parameter file of the policy node"),
        DeclareLaunchArgument("namespace", default_value="", description="node namespace"),
        DeclareLaunchArgument("autostart", default_value="true",
                              description="configure and activate at launch (false: stay "
                                          "unconfigured for a lifecycle manager)"),
        DeclareLaunchArgument("checkpoint", default_value="",
                              description="policy checkpoint directory (empty: the file's)"),
        DeclareLaunchArgument("plan", default_value="",
                              description="BitPlan file to serve (empty: the file's)"),
        DeclareLaunchArgument("device", default_value="",
                              description="torch device, cpu or cuda (empty: the file's)"),
    ] + [DeclareLaunchArgument(topic, default_value=topic, description=f"topic for {topic}")
         for topic in TOPICS]
    return LaunchDescription(arguments + [OpaqueFunction(function=managed_policy_node)])
