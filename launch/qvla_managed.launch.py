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
from launch.substitutions import LaunchConfiguration
from launch_ros.actions import LifecycleNode
from launch_ros.event_handlers import OnStateTransition
from launch_ros.events.lifecycle import ChangeState
from lifecycle_msgs.msg import Transition

from qvla_ros.ros.launch_parts import policy_node_arguments, policy_node_launch_arguments


def managed_policy_node(context):
    node = LifecycleNode(executable="qvla_managed_policy_node", **policy_node_arguments(context))
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
    arguments = policy_node_launch_arguments(extra=[
        DeclareLaunchArgument("autostart", default_value="true",
                              description="configure and activate at launch (false: stay "
                                          "unconfigured for a lifecycle manager)"),
    ])
    return LaunchDescription(arguments + [OpaqueFunction(function=managed_policy_node)])
