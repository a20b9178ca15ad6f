"""The closed-loop demo: the benchmark's simulator bridge and the QVLA policy node, talking over
DDS, with config/policy_node.yaml, config/sim_bridge.yaml and config/demo.yaml (the same files
`qvla demo` uses). Everything stops when the bridge has run its episodes.

    ros2 launch qvla_ros demo.launch.py
    ros2 launch qvla_ros demo.launch.py plan:=/path/to/plan.json tasks:="[drawer-open]"

`qvla demo` runs the same two nodes and also swaps the plan halfway; here, swap it by hand:
    ros2 service call /qvla_policy_node/reload_plan qvla_ros/srv/ReloadPlan "{plan_path: ...}"
"""
from launch import LaunchDescription
from launch.actions import DeclareLaunchArgument, OpaqueFunction, RegisterEventHandler, Shutdown
from launch.event_handlers import OnProcessExit
from launch.substitutions import LaunchConfiguration, PathJoinSubstitution
from launch_ros.actions import Node
from launch_ros.substitutions import FindPackageShare

from qvla_ros.ros.transport import transport_environment


def config(name):
    return PathJoinSubstitution([FindPackageShare("qvla_ros"), "config", name])


def nodes(context):
    # Only the arguments given on the command line override the parameter files.
    policy_overrides = {name: LaunchConfiguration(name).perform(context)
                        for name in ("checkpoint", "plan")}
    policy_overrides = {name: value for name, value in policy_overrides.items() if value}
    bridge_overrides = {"episodes_per_task": int(
        LaunchConfiguration("episodes_per_task").perform(context))}
    tasks = LaunchConfiguration("tasks").perform(context)
    if tasks:
        bridge_overrides["tasks"] = [t.strip() for t in tasks.strip("[]").split(",") if t.strip()]
    policy = Node(package="qvla_ros", executable="qvla_policy_node", name="qvla_policy_node",
                  parameters=[config("policy_node.yaml"), config("demo.yaml")]
                  + ([policy_overrides] if policy_overrides else []),
                  additional_env=transport_environment(), output="screen")
    bridge = Node(package="qvla_ros", executable="qvla_sim_bridge", name="qvla_sim_bridge",
                  parameters=[config("sim_bridge.yaml"), config("demo.yaml"), bridge_overrides],
                  additional_env=transport_environment(), output="screen")
    stop_with_bridge = RegisterEventHandler(OnProcessExit(
        target_action=bridge, on_exit=[Shutdown(reason="the bridge ran its episodes")]))
    return [policy, bridge, stop_with_bridge]


def generate_launch_description():
    return LaunchDescription([
        DeclareLaunchArgument("checkpoint", default_value="",
                              description="policy checkpoint directory (empty: the shipped one)"),
        DeclareLaunchArgument("plan", default_value="",
                              description="BitPlan file to serve (empty: demo.yaml's)"),
        DeclareLaunchArgument("tasks", default_value="",
                              description="suite tasks, e.g. [drawer-open,drawer-close] "
                                          "(empty: all ten)"),
        DeclareLaunchArgument("episodes_per_task", default_value="1",
                              description="episodes of each task"),
        OpaqueFunction(function=nodes),
    ])
