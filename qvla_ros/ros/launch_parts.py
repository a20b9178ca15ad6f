"""What the policy node's two launch files share (launch/qvla.launch.py: the plain node,
launch/qvla_managed.launch.py: the lifecycle node): their launch arguments, and how those become
the node's parameters, remappings and environment.

`launch` and `launch_ros` are imported inside the functions, when a launch file calls them: they
exist only where `ros2 launch` runs (not on PyPI), and test/test_ros_launch_files.py puts its
recorders in their place before it imports a launch file. No rclpy import here either.
"""
from __future__ import annotations

from qvla_ros.ros.transport import transport_environment

#: launch arguments that, when given, override the parameter file's value
OVERRIDES = ("checkpoint", "plan", "device")
#: the node's topics, each a launch argument it is remapped to (default: its own name)
TOPICS = ("image", "image2", "instruction", "proprio", "action_chunk", "action", "diagnostics")


def policy_node_arguments(context) -> dict:
    """The keyword arguments of the policy node's Node / LifecycleNode, less `executable`:
    package, name, namespace, the parameter file plus the overrides given on the command line
    (empty ones keep the file's value), the topic remappings, the DDS transport, output."""
    from launch.substitutions import LaunchConfiguration

    overrides = {name: LaunchConfiguration(name).perform(context) for name in OVERRIDES}
    overrides = {name: value for name, value in overrides.items() if value}
    return dict(
        package="qvla_ros",
        name="qvla_policy_node",
        namespace=LaunchConfiguration("namespace"),
        parameters=[LaunchConfiguration("params_file")] + ([overrides] if overrides else []),
        remappings=[(topic, LaunchConfiguration(topic)) for topic in TOPICS],
        # config/fastdds_large_frames.xml (camera frames over ~512 KiB), unless the environment
        # names a Fast DDS profile or transport; the camera driver needs the same file.
        additional_env=transport_environment(),
        output="screen",
    )


def policy_node_launch_arguments(extra=()) -> list:
    """DeclareLaunchArgument for params_file (default: the shipped config/policy_node.yaml),
    namespace, then `extra` (a launch file's own), the OVERRIDES and the TOPICS."""
    from launch.actions import DeclareLaunchArgument
    from launch.substitutions import PathJoinSubstitution
    from launch_ros.substitutions import FindPackageShare

    return [
        DeclareLaunchArgument(
            "params_file",
            default_value=PathJoinSubstitution(
                [FindPackageShare("qvla_ros"), "config", "policy_node.yaml"]),
            description="parameter file of the policy node"),
        DeclareLaunchArgument("namespace", default_value="", description="node namespace"),
        *extra,
        DeclareLaunchArgument("checkpoint", default_value="",
                              description="policy checkpoint directory (empty: the file's)"),
        DeclareLaunchArgument("plan", default_value="",
                              description="BitPlan file to serve (empty: the file's)"),
        DeclareLaunchArgument("device", default_value="",
                              description="torch device, cpu or cuda (empty: the file's)"),
    ] + [DeclareLaunchArgument(topic, default_value=topic, description=f"topic for {topic}")
         for topic in TOPICS]
