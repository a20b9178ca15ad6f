"""The structure of launch/qvla_managed.launch.py, without `launch` or `launch_ros` (neither is on
PyPI, so `ros2 launch` never runs here; see README, ROS 2).

What is checked, and what is not: the file is imported and evaluated against RECORDERS of the
launch / launch_ros classes it uses. A recorder takes the keyword arguments its class takes
(read from ros2/launch and ros2/launch_ros; an unknown keyword is a TypeError, as with the real
class) and keeps them; ChangeState refuses an unknown transition id as the real one does. From
the recorded description the test reads what launch would do: the node it starts (package,
executable, name, parameters, remappings, DDS transport) and the transition requests (configure
at start, activate when the node goes configuring -> inactive; none with autostart:=false).
The state labels the handler waits for are then matched against the TransitionEvents the real
qvla_managed_policy_node publishes over DDS while it is configured and activated through its
services. Nothing here is launch's event loop: that the file runs under `ros2 launch` was last
checked by hand (ENVIRONMENT.md, 2026-12: launch 3.7.1, launch_ros 0.28.0 from source).
"""
import importlib.util
import sys
import threading
import time
import types
from pathlib import Path

import pytest

rclpy = pytest.importorskip("rclpy")
lifecycle_msgs = pytest.importorskip("lifecycle_msgs")

from lifecycle_msgs.msg import Transition  # noqa: E402

from qvla_ros.ros.harness import NodeProcess  # noqa: E402
from qvla_ros.ros.paths import config_file  # noqa: E402

LAUNCH_FILE = Path(__file__).resolve().parent.parent / "launch" / "qvla_managed.launch.py"
TRANSITIONS = {v: k for k, v in vars(Transition).items()
               if k.startswith("TRANSITION_") and isinstance(v, int)}


class Recorded:
    """What a recorder was constructed with."""

    kind = "?"

    def __repr__(self):
        return f"{self.kind}({vars(self)})"


def recorder(kind: str, init):
    """A class named `kind` whose __init__ is `init` (its signature is the real class's)."""
    return type(kind, (Recorded,), {"kind": kind, "__init__": init})


class Context:
    """The part of launch's LaunchContext that substitutions read."""

    def __init__(self, **configurations):
        self.launch_configurations = configurations


def _launch_configuration_init(self, variable_name, *, default=None):
    self.variable_name, self.default = variable_name, default


def _perform(self, context):
    return context.launch_configurations.get(self.variable_name, self.default)


def _change_state_init(self, *, lifecycle_node_matcher, transition_id):
    if transition_id not in TRANSITIONS:
        raise ValueError(f"given transition_id of {transition_id!r}")
    self.lifecycle_node_matcher, self.transition_id = lifecycle_node_matcher, transition_id


def _node_init(self, *, name, namespace, executable, package=None, exec_name=None,
               parameters=None, remappings=None, ros_arguments=None, arguments=None,
               additional_env=None, output="log", **process_kwargs):
    """LifecycleNode(*, name, namespace, **kwargs) -> Node(*, executable, package, ...) ->
    ExecuteProcess(additional_env, output, ...)."""
    self.__dict__.update(name=name, namespace=namespace, executable=executable,
                         package=package, parameters=parameters, remappings=remappings,
                         additional_env=additional_env, output=output)


def _on_state_transition_init(self, *, entities, target_lifecycle_node=None, transition=None,
                              start_state=None, goal_state=None, matcher=None, **kwargs):
    self.__dict__.update(entities=entities, target=target_lifecycle_node, transition=transition,
                         start_state=start_state, goal_state=goal_state, matcher=matcher)


def launch_modules() -> dict[str, types.ModuleType]:
    """Stand-in modules that hold the recorders, under the names the launch file imports."""
    def module(name, **members):
        mod = types.ModuleType(name)
        mod.__dict__.update(members)
        return mod

    LaunchConfiguration = recorder("LaunchConfiguration", _launch_configuration_init)
    LaunchConfiguration.perform = _perform
    return {
        "launch": module("launch", LaunchDescription=recorder(
            "LaunchDescription", lambda self, initial_entities=None, *, deprecated_reason=None:
            self.__dict__.update(entities=list(initial_entities or [])))),
        "launch.actions": module(
            "launch.actions",
            DeclareLaunchArgument=recorder(
                "DeclareLaunchArgument",
                lambda self, name, *, default_value=None, description=None, choices=None,
                **kwargs: self.__dict__.update(name=name, default_value=default_value,
                                               description=description)),
            EmitEvent=recorder("EmitEvent", lambda self, *, event, **kwargs:
                               self.__dict__.update(event=event)),
            OpaqueFunction=recorder("OpaqueFunction",
                                    lambda self, *, function, args=None, kwargs=None, **kw:
                                    self.__dict__.update(function=function)),
            RegisterEventHandler=recorder("RegisterEventHandler",
                                          lambda self, event_handler, **kwargs:
                                          self.__dict__.update(handler=event_handler)),
        ),
        "launch.events": module("launch.events", matches_action=lambda target_action: (
            lambda action: action is target_action)),
        "launch.substitutions": module(
            "launch.substitutions", LaunchConfiguration=LaunchConfiguration,
            PathJoinSubstitution=recorder("PathJoinSubstitution", lambda self, substitutions:
                                          self.__dict__.update(parts=list(substitutions)))),
        "launch_ros": module("launch_ros"),
        "launch_ros.actions": module("launch_ros.actions",
                                     LifecycleNode=recorder("LifecycleNode", _node_init)),
        "launch_ros.event_handlers": module(
            "launch_ros.event_handlers",
            OnStateTransition=recorder("OnStateTransition", _on_state_transition_init)),
        "launch_ros.events": module("launch_ros.events"),
        "launch_ros.events.lifecycle": module(
            "launch_ros.events.lifecycle",
            ChangeState=recorder("ChangeState", _change_state_init)),
        "launch_ros.substitutions": module(
            "launch_ros.substitutions",
            FindPackageShare=recorder("FindPackageShare", lambda self, package:
                                      self.__dict__.update(package=package))),
    }


@pytest.fixture
def managed_launch(monkeypatch):
    """The launch file's module, imported against the recorders."""
    for name, mod in launch_modules().items():
        monkeypatch.setitem(sys.modules, name, mod)
    spec = importlib.util.spec_from_file_location("qvla_managed_launch", LAUNCH_FILE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def evaluate(module, **arguments):
    """generate_launch_description(), then its OpaqueFunction with the arguments' defaults
    overridden by `arguments`: (declared arguments by name, the entities it returns)."""
    description = module.generate_launch_description()
    declared = {e.name: e for e in description.entities if e.kind == "DeclareLaunchArgument"}
    functions = [e for e in description.entities if e.kind == "OpaqueFunction"]
    assert len(functions) == 1, description.entities
    values = {name: arg.default_value for name, arg in declared.items()}
    values.update(arguments)
    return declared, functions[0].function(Context(**values))


def test_the_launch_file_starts_the_managed_node_with_the_shipped_parameters(managed_launch,
                                                                            monkeypatch):
    from qvla_ros.ros.transport import TRANSPORT_VARIABLES, profile_path

    for variable in TRANSPORT_VARIABLES:  # a user's own Fast DDS choice would be kept instead
        monkeypatch.delenv(variable, raising=False)
    monkeypatch.setenv("RMW_IMPLEMENTATION", "rmw_fastrtps_cpp")
    declared, entities = evaluate(managed_launch, plan="config/plans/tiny_qvla_4.0.json",
                                  image="/camera/image_raw")
    nodes = [e for e in entities if e.kind == "LifecycleNode"]
    assert len(nodes) == 1
    node = nodes[0]
    assert (node.package, node.executable, node.name) == (
        "qvla_ros", "qvla_managed_policy_node", "qvla_policy_node")
    # The executable exists under that name (setup.py's console scripts).
    setup = (LAUNCH_FILE.parent.parent / "setup.py").read_text()
    assert "qvla_managed_policy_node = " in setup
    params_file, overrides = node.parameters
    assert params_file.variable_name == "params_file"
    default = declared["params_file"].default_value
    assert default.kind == "PathJoinSubstitution"
    assert default.parts[0].package == "qvla_ros" and default.parts[1:] == [
        "config", "policy_node.yaml"]
    assert Path(config_file("policy_node.yaml")).is_file()
    assert overrides == {"plan": "config/plans/tiny_qvla_4.0.json"}  # empty ones left out
    remaps = {source: target.variable_name for source, target in node.remappings}
    assert set(remaps) == {"image", "image2", "instruction", "proprio", "action_chunk", "action",
                           "diagnostics"} and all(remaps[k] == k for k in remaps)
    # The shipped large-frame transport profile, as qvla.launch.py and the harness set it.
    assert node.additional_env == {"FASTDDS_DEFAULT_PROFILES_FILE": profile_path()}
    assert Path(profile_path()).is_file()


def test_autostart_configures_then_activates_on_inactive(managed_launch):
    _, entities = evaluate(managed_launch)
    kinds = [e.kind for e in entities]
    # The handler is registered before the node starts, the configure request comes after it.
    assert kinds == ["RegisterEventHandler", "LifecycleNode", "EmitEvent"], kinds
    register, node, configure = entities
    assert configure.event.transition_id == Transition.TRANSITION_CONFIGURE
    assert configure.event.lifecycle_node_matcher(node)
    assert not configure.event.lifecycle_node_matcher(object())
    handler = register.handler
    assert handler.target is node and handler.matcher is None and handler.transition is None
    assert (handler.start_state, handler.goal_state) == ("configuring", "inactive")
    (activate,) = handler.entities
    assert activate.kind == "EmitEvent"
    assert activate.event.transition_id == Transition.TRANSITION_ACTIVATE
    assert activate.event.lifecycle_node_matcher(node)


def test_autostart_false_leaves_transitions_to_a_manager(managed_launch):
    _, entities = evaluate(managed_launch, autostart="false")
    assert [e.kind for e in entities] == ["LifecycleNode"]


@pytest.mark.ros
def test_the_handler_waits_for_a_transition_the_real_node_makes(managed_launch, ros_env,
                                                                tmp_path):
    """The labels (configuring -> inactive) against the TransitionEvents of the real managed
    node, configured and activated over DDS through its change_state service as the launch
    file's two requests would: the handler's pair occurs exactly once, at the end of configure."""
    from lifecycle_msgs.msg import TransitionEvent
    from lifecycle_msgs.srv import ChangeState

    from qvla_ros.policy import make_policy

    make_policy("micro", seed=0).save_pretrained(tmp_path / "ckpt")
    _, entities = evaluate(managed_launch)
    handler = entities[0].handler
    node = NodeProcess.start("qvla_managed_policy_node", [config_file("policy_node.yaml")],
                             overrides={"checkpoint": str(tmp_path / "ckpt")}, env=ros_env)
    rclpy.init()
    peer = rclpy.create_node("launch_file_check")
    events = []
    peer.create_subscription(TransitionEvent, "/qvla_policy_node/transition_event",
                             events.append, 10)
    client = peer.create_client(ChangeState, "/qvla_policy_node/change_state")
    executor = rclpy.executors.SingleThreadedExecutor()
    executor.add_node(peer)
    spinner = threading.Thread(target=executor.spin, daemon=True)
    spinner.start()
    try:
        assert client.wait_for_service(timeout_sec=60)
        deadline = time.monotonic() + 30
        while peer.count_publishers("/qvla_policy_node/transition_event") == 0:
            assert time.monotonic() < deadline, "no transition_event publisher"
            time.sleep(0.05)
        for transition_id in (Transition.TRANSITION_CONFIGURE, Transition.TRANSITION_ACTIVATE):
            future = client.call_async(ChangeState.Request(
                transition=Transition(id=transition_id)))
            done = threading.Event()
            future.add_done_callback(lambda _: done.set())
            assert done.wait(60) and future.result().success, node.output
        deadline = time.monotonic() + 10
        while len(events) < 4 and time.monotonic() < deadline:
            time.sleep(0.05)
    finally:
        executor.shutdown()
        peer.destroy_node()
        rclpy.try_shutdown()
        assert node.stop() == 0, node.output
    pairs = [(e.start_state.label, e.goal_state.label) for e in events]
    assert pairs == [("unconfigured", "configuring"), ("configuring", "inactive"),
                     ("inactive", "activating"), ("activating", "active")], pairs
    assert pairs.count((handler.start_state, handler.goal_state)) == 1
    assert pairs.index((handler.start_state, handler.goal_state)) == 1  # configure's end
