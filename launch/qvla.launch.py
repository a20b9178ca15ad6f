"""The QVLA policy node with its parameter file.

    ros2 launch qvla_ros qvla.launch.py
    ros2 launch qvla_ros qvla.launch.py plan:=/path/to/plan.json image:=/camera/color/image_raw \
        proprio:=/joint_states

Arguments left empty keep the value of the parameter file (config/policy_node.yaml by default);
topics are remapped from the node's relative names. Swap plans at run time with
    ros2 service call /qvla_policy_node/reload_plan qvla_ros/srv/ReloadPlan "{plan_path: ...}"
"""
from launch import LaunchDescription
from launch.actions import OpaqueFunction
from launch_ros.actions import Node

from qvla_ros.ros.launch_parts import policy_node_arguments, policy_node_launch_arguments


def policy_node(context):
    # Only the arguments given on the command line override the parameter file.
    return [Node(executable="qvla_policy_node", **policy_node_arguments(context))]


def generate_launch_description():
    return LaunchDescription(policy_node_launch_arguments() + [OpaqueFunction(function=policy_node)])
