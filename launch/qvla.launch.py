"""The QVLA policy node with its parameter file.

    ros2 launch qvla_ros qvla.launch.py
    ros2 launch qvla_ros qvla.launch.py plan:=/path/to/plan.json image:=/camera/color/image_raw \
        proprio:=/joint_states

Arguments left empty keep the value of the parameter file (config/policy_node.yaml by default);
topics are remapped from the node's relative names. Swap plans at run time with
    ros2 service call /qvla_policy_node/reload_plan qvla_ros/srv/ReloadPlan "{plan_path: ...}"
"""
from launch import LaunchDescription
from launch.actions import DeclareLaunchArgument, OpaqueFunction
from launch.substitutions import LaunchConfiguration, PathJoinSubstitution
from launch_ros.actions import Node
from launch_ros.substitutions import FindPackageShare

from qvla_ros.ros.transport import transport_environment

OVERRIDES = ("checkpoint", "plan", "device")
TOPICS = ("image", "image2", "instruction", "proprio", "action_chunk", "action", "diagnostics")


def policy_node(context):
    # Only the arguments given on the command line override the parameter file.
    overrides = {name: LaunchConfiguration(name).perform(context) for name in OVERRIDES}
    overrides = {name: value for name, value in overrides.items() if value}
    return [Node(
        package="qvla_ros",
        executable="qvla_policy_node",
        name="qvla_policy_node",
        namespace=LaunchConfiguration("namespace"),
        parameters=[LaunchConfiguration("params_file")] + ([overrides] if overrides else []),
        remappings=[(topic, LaunchConfiguration(topic)) for topic in TOPICS],
        # config/fastdds_large_frames.xml (camera frames over ~512 KiB), unless the environment
        # names a Fast DDS profile or transport; the camera driver needs the same file.
        additional_env=transport_environment(),
        output="screen",
    )]


def generate_launch_description():
    arguments = [
        DeclareLaunchArgument(
            "params_file",
            default_value=PathJoinSubstitution(
                [FindPackageShare("qvla_ros"), "config", "policy_node.yaml"]),
            description="parameter file of the policy node"),
        DeclareLaunchArgument("namespace", default_value="", description="node namespace"),
        DeclareLaunchArgument("checkpoint", default_value="",
                              description="policy checkpoint directory (empty: the file's)"),
        DeclareLaunchArgument("plan", default_value="",
                              description="BitPlan file to serve (empty: the file's)"),
        DeclareLaunchArgument("device", default_value="",
                              description="torch device, cpu or cuda (empty: the file's)"),
    ] + [DeclareLaunchArgument(topic, default_value=topic, description=f"topic for {topic}")
         for topic in TOPICS]
    return LaunchDescription(arguments + [OpaqueFunction(function=policy_node)])
