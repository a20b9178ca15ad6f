"""qvla_policy_node: serves a (quantized) VLA policy. Camera images + instruction + proprio in,
action chunks out; the bit plan is swapped at run time through `~/reload_plan` or the `plan`
parameter.

Topics (all relative, so they remap):
    image, image2      sensor_msgs/Image   cameras, in the policy's camera order (image2 only when
                                           the policy takes two; with one camera, remap both to
                                           it); QoS from `image_qos`. Any size: fitted to the
                                           policy's input as `image_resize` says
    image/compressed, image2/compressed
                       sensor_msgs/CompressedImage  instead, when `image_transport` is
                                           'compressed' (JPEG/PNG; the names image_transport
                                           uses: the remapped camera topic + /compressed)
    instruction        std_msgs/String     reliable + transient local: a node started late still
                                           gets the instruction that is in force
    proprio            sensor_msgs/JointState
                       `position` is the policy's proprio vector. JointState rather than
                       Float32MultiArray: it has a header (the state's time) and names, so the node
                       can check the layout against `proprio_names` instead of trusting the order,
                       and a robot's joint_states publisher can be remapped onto it as is.
    action_chunk       qvla_ros/ActionChunk header = the image's header; plan_id = the plan that
                                           produced it
    action             qvla_ros/ActionChunk with horizon 1: one action per control period, only
                                           when control_rate_hz > 0; from the chunk queue as
                                           `action_aggregation` says (latest | temporal_ensemble),
                                           held or zeroed (`on_stale`) when chunks stop. header =
                                           the header of the image of the newest chunk that
                                           contributed; latency = its age (image arrival ->
                                           this action), growing while stale
    diagnostics        diagnostic_msgs/DiagnosticArray, every `diagnostics_period` seconds
Service:
    ~/reload_plan      qvla_ros/srv/ReloadPlan

Threads: executor callbacks only check messages and keep the newest of each; one worker thread
runs the policy on the newest frame, so a slow policy drops stale frames and never blocks the
callbacks; reloads run in the control callback group beside the serving weights.
"""
from __future__ import annotations

import array
import collections
import faulthandler
import gc
import math
import os
import sys
import threading
import time

import numpy as np
import rclpy
from rcl_interfaces.msg import (
    FloatingPointRange,
    IntegerRange,
    ParameterDescriptor,
    SetParametersResult,
)
from rclpy.callback_groups import MutuallyExclusiveCallbackGroup, ReentrantCallbackGroup
from rclpy.executors import ExternalShutdownException, MultiThreadedExecutor
from rclpy.node import Node
from rclpy.parameter import Parameter
from rclpy.qos import QoSProfile
from rclpy.signals import uninstall_signal_handlers
from sensor_msgs.msg import CompressedImage, Image, JointState
from std_msgs.msg import String

from qvla_ros.msg import ActionChunk
from qvla_ros.ros import paths
from qvla_ros.ros.action_queue import AGGREGATIONS, ON_STALE, ActionQueue
from qvla_ros.ros.camera_watch import SILENT_PERIODS, CameraWatch
from qvla_ros.ros.image_conversion import (
    ENCODINGS,
    RESIZE_MODES,
    ImageConversionError,
    compressed_to_rgb8,
    image_to_rgb8,
)
from qvla_ros.ros.observation_sync import Dropped, ObservationSync, Stamped
from qvla_ros.ros.policy_server import PlanRejected, PolicyServer
from qvla_ros.ros.topics import CHUNK_QOS, INSTRUCTION_QOS, STATE_SUBSCRIBER_QOS, image_qos
from qvla_ros.ros.transport import describe_transport
from qvla_ros.srv import ReloadPlan

try:  # ros-diagnostic-msgs: the standard diagnostics channel (rqt_robot_monitor, aggregators)
    from diagnostic_msgs.msg import DiagnosticArray, DiagnosticStatus, KeyValue
except ImportError:  # pragma: no cover - depends on the install
    DiagnosticArray = None

NODE_NAME = "qvla_policy_node"
TRIGGERS = ("image", "rate")
IMAGE_QOS = ("sensor_data", "reliable")
IMAGE_TRANSPORTS = ("raw", "compressed")
# Seconds between checks of the graph (silent cameras, another node with this node's name).
WATCH_PERIOD = 0.5
# Far beyond any task sentence; bounds the tokenizer's work on a malformed message.
MAX_INSTRUCTION_CHARS = 4096


def _descriptor(description: str, read_only: bool = False, **ranges) -> ParameterDescriptor:
    return ParameterDescriptor(description=description, read_only=read_only, **ranges)


class PolicyNodeCore:
    """The policy node's work, shared by PolicyNode (a plain rclpy Node: serves from start to
    stop) and qvla_ros.ros.managed_policy_node.ManagedPolicyNode (a lifecycle node). A mixin:
    the class it is combined with must be an rclpy Node.

    _setup_parameters() declares the parameters; _configure() checks them, loads and checks the
    policy and plan and creates every topic, service, timer and the worker; _release() undoes
    _configure(). Frames are used only while `_serving`."""

    _serving = True
    server = None
    action_queue = None

    def _publisher(self, msg_type, topic: str, qos):
        """A publisher of the node's outputs (the managed node makes lifecycle publishers)."""
        return self.create_publisher(msg_type, topic, qos)

    def _setup_parameters(self) -> None:
        self._declare_parameters()
        self.add_on_set_parameters_callback(self._on_set_parameters)

    def _check_parameters(self) -> None:
        """ValueError naming the first parameter whose value cannot be used."""
        for name in self._declared:
            param = self.get_parameter_or(name, Parameter(name))
            error = self._invalid(param)
            if error:
                raise ValueError(f"parameter {param.name}: {error}")

    def _configure(self) -> None:
        """Load and check the policy and plan; create the node's entities; start the worker.
        Raises ValueError, PlanRejected or FileNotFoundError (nothing is left created then)."""
        self._check_parameters()
        self._entities = []
        p = self.get_parameter
        plan = paths.resolve(p("plan").value)
        self.max_plan_bytes = p("max_plan_bytes").value
        problem = self._plan_file_problem(plan)
        if problem:
            raise ValueError(f"parameter plan: {problem}")
        self.get_logger().info(
            f"loading {p('checkpoint').value or 'the shipped policy'} with "
            f"{plan or 'no plan (full precision)'} on {p('device').value}")
        if p("torch_threads").value:
            import torch
            torch.set_num_threads(p("torch_threads").value)
        self.server = PolicyServer(checkpoint=paths.resolve(p("checkpoint").value),
                                   device=p("device").value, plan_path=plan)
        # From here on, each entity is recorded for _release().
        cfg = self.server.config
        self.n_cams = cfg.n_cams
        self.image_size = (p("image_height").value or cfg.image_size,
                           p("image_width").value or cfg.image_size)
        self.encodings = tuple(p("expected_encodings").value)
        self.image_resize = p("image_resize").value
        self.crop_scale = p("center_crop_scale").value
        self.image_transport = p("image_transport").value
        self.image_timeout = p("image_timeout").value
        self.max_plan_bytes = p("max_plan_bytes").value
        # Unset (a typed parameter nobody set): positions in the order they come.
        self.proprio_names = tuple(self.get_parameter_or("proprio_names").value or ())
        self.proprio_dim = cfg.proprio_dim
        if self.proprio_names and len(self.proprio_names) != self.proprio_dim:
            raise ValueError(f"parameter proprio_names: {len(self.proprio_names)} names, the "
                             f"policy takes {self.proprio_dim} proprio values")
        self.trigger = p("trigger").value
        self.rate_hz = p("rate_hz").value

        self.sync = ObservationSync(self.n_cams, tolerance=p("sync_tolerance").value,
                                    timeout=p("sync_timeout").value)

        self._stats = _Stats()
        self._reject_log: dict[str, tuple[float, int]] = {}

        inputs = MutuallyExclusiveCallbackGroup()
        control = ReentrantCallbackGroup()
        camera_qos = self._image_qos()
        # Each camera's arrivals and rate, for the silent-camera check (sparse cameras included).
        self._camera_watch = [CameraWatch(self.image_timeout) for _ in range(self.n_cams)]
        self._camera_subs = []
        for cam, topic in enumerate(["image", "image2"][: self.n_cams]):
            if self.image_transport == "compressed":
                # image_transport's naming: the (remapped) camera topic + "/compressed".
                name = self.resolve_topic_name(topic).rstrip("/") + "/compressed"
                sub = self.create_subscription(
                    CompressedImage, name, lambda msg, cam=cam: self._on_compressed(msg, cam),
                    camera_qos, callback_group=inputs)
            else:
                sub = self.create_subscription(
                    Image, topic, lambda msg, cam=cam: self._on_image(msg, cam), camera_qos,
                    callback_group=inputs)
            self._camera_subs.append(sub)
            self._entities.append(sub)
        self._name_clash = False
        self._last_clash_check = -math.inf
        instruction_sub = self.create_subscription(
            String, "instruction", self._on_instruction, INSTRUCTION_QOS, callback_group=inputs)
        proprio_sub = self.create_subscription(
            JointState, "proprio", self._on_proprio, STATE_SUBSCRIBER_QOS, callback_group=inputs)
        self.chunk_pub = self._publisher(ActionChunk, "action_chunk", CHUNK_QOS)
        self._entities += [instruction_sub, proprio_sub, self.chunk_pub]
        self.action_queue = self.action_pub = None
        self.control_rate_hz = p("control_rate_hz").value
        if self.control_rate_hz > 0:
            self.action_queue = ActionQueue(
                self.control_rate_hz, p("action_aggregation").value, p("ensemble_m").value,
                p("stale_after_s").value, p("on_stale").value)
            self.action_pub = self._publisher(ActionChunk, "action", CHUNK_QOS)
            self._action_stale_logged = False
            # A group of its own: the control tick never waits behind inputs or a reload.
            self._entities += [self.action_pub, self.create_timer(
                1.0 / self.control_rate_hz, self._control_tick,
                callback_group=MutuallyExclusiveCallbackGroup())]
        self._entities.append(self.create_service(
            ReloadPlan, "~/reload_plan", self._on_reload_plan, callback_group=control))
        self.diagnostics_pub = None
        if DiagnosticArray is not None:
            # A plain publisher, also in the managed node: diagnostics say when it is inactive.
            self.diagnostics_pub = self.create_publisher(DiagnosticArray, "diagnostics", 10)
            self._entities += [self.diagnostics_pub, self.create_timer(
                p("diagnostics_period").value, self._publish_diagnostics, callback_group=control)]
        else:
            self.get_logger().warning("diagnostic_msgs is not installed (pip install "
                                      "ros-diagnostic-msgs): no diagnostics published")
        self.transport = describe_transport()
        self._entities.append(self.create_timer(WATCH_PERIOD, self._watch_graph,
                                                callback_group=control))

        self._worker = threading.Thread(target=self._work, name="qvla-inference", daemon=True)
        self._worker.start()
        # Names as resolved (namespace and remapping applied): what `ros2 topic` shows.
        cameras = ", ".join(s.topic_name for s in self._camera_subs)
        fitted = ("only frames of that size" if self.image_resize == "refuse" else
                  f"other sizes {self.image_resize}"
                  + (f" after a centre crop of {self.crop_scale:g} of the area"
                     if self.crop_scale < 1 else ""))
        formats = ("JPEG/PNG" if self.image_transport == "compressed"
                   else "/".join(self.encodings))
        self.get_logger().info(
            f"{self._ready_word()} {self.server.active.label} (loaded in "
            f"{self.server.active.load_seconds:.1f} s); cameras {cameras} ({formats}, "
            f"{self._qos_phrase()}) into {self.image_size[1]}x{self.image_size[0]}, {fitted}; "
            f"instruction {instruction_sub.topic_name}, proprio {proprio_sub.topic_name}, "
            f"chunks on {self.chunk_pub.topic_name}; {self._actions_phrase()}; trigger "
            f"{self.trigger}{f' at {self.rate_hz} Hz' if self.trigger == 'rate' else ''}; "
            f"transport: {self.transport}")

    def _ready_word(self) -> str:
        return "ready: serving"

    def _release(self) -> None:
        """Undo _configure(): stop the worker, destroy the entities, drop the policy."""
        if getattr(self, "sync", None) is not None:
            self.sync.stop()
        worker = getattr(self, "_worker", None)
        if worker is not None and worker.is_alive():
            worker.join(timeout=10.0)
        for entity in reversed(getattr(self, "_entities", [])):
            kind = type(entity).__name__
            if kind == "LifecyclePublisher":
                self.destroy_lifecycle_publisher(entity)
            elif kind == "Publisher":
                self.destroy_publisher(entity)
            elif kind == "Subscription":
                self.destroy_subscription(entity)
            elif kind == "Service":
                self.destroy_service(entity)
            elif kind == "Timer":
                self.destroy_timer(entity)
        self._entities = []
        self.server = self.action_queue = self.action_pub = self.diagnostics_pub = None
        self._worker = None

    # Parameters ---------------------------------------------------------------------------------
    def _declare_parameters(self) -> None:
        d = _descriptor
        self.declare_parameter("checkpoint", "", d(
            "policy checkpoint directory; empty = the shipped policy", read_only=True))
        self.declare_parameter("plan", "", d(
            "BitPlan file to serve; empty = full precision. Setting it reloads the plan."))
        self.declare_parameter("device", "cpu", d("torch device: cpu, cuda, cuda:N",
                                                  read_only=True))
        self.declare_parameter("torch_threads", 0, d(
            "CPU threads of the policy forward; 0 = torch's default (one per core). On a robot "
            "computer shared with other busy processes, fewer threads avoid stalls",
            read_only=True, integer_range=[IntegerRange(from_value=0, to_value=256, step=1)]))
        self.declare_parameter("trigger", "image", d(
            "'image': a forward for each new image; 'rate': at most rate_hz forwards a second on "
            "the newest image"))
        self.declare_parameter("rate_hz", 10.0, d(
            "forwards per second when trigger is 'rate'",
            floating_point_range=[FloatingPointRange(from_value=0.1, to_value=1000.0)]))
        self.declare_parameter("image_qos", "sensor_data", d(
            "'sensor_data' (best effort: matches any camera) or 'reliable'", read_only=True))
        self.declare_parameter("image_qos_depth", 1, d(
            "image subscription queue depth", read_only=True,
            integer_range=[IntegerRange(from_value=1, to_value=100, step=1)]))
        self.declare_parameter("expected_encodings", ["rgb8", "bgr8"], d(
            f"image encodings accepted, among {', '.join(ENCODINGS)}", read_only=True))
        self.declare_parameter("image_height", 0, d(
            "height in pixels frames are brought to; 0 = the policy's image size", read_only=True,
            integer_range=[IntegerRange(from_value=0, to_value=8192, step=1)]))
        self.declare_parameter("image_width", 0, d(
            "width in pixels frames are brought to; 0 = the policy's image size", read_only=True,
            integer_range=[IntegerRange(from_value=0, to_value=8192, step=1)]))
        self.declare_parameter("image_resize", "fit", d(
            "frames of another size: 'fit' (scaled whole, aspect ratio not kept), 'crop' (the "
            "largest centred region of the policy's aspect ratio, scaled) or 'refuse' (dropped "
            "and counted); cv2 INTER_AREA", read_only=True))
        self.declare_parameter("center_crop_scale", 1.0, d(
            "fraction of the frame's area kept by a centred crop before scaling (OpenVLA-OFT: "
            "0.9 for policies trained with random crops); 1.0 = none", read_only=True,
            floating_point_range=[FloatingPointRange(from_value=0.1, to_value=1.0)]))
        self.declare_parameter("image_transport", "raw", d(
            "'raw': sensor_msgs/Image on image, image2; 'compressed': "
            "sensor_msgs/CompressedImage (JPEG/PNG) on image/compressed, image2/compressed",
            read_only=True))
        self.declare_parameter("image_timeout", 3.0, d(
            "seconds a camera topic may have publishers but deliver nothing before the node "
            "warns (naming QoS and transport) and diagnostics turn ERROR; once a camera has "
            "delivered two frames, five of its own frame periods if longer (a sparse camera "
            "is not silent between frames)", read_only=True,
            floating_point_range=[FloatingPointRange(from_value=0.5, to_value=3600.0)]))
        self.declare_parameter("max_plan_bytes", 16 * 2 ** 20, d(
            "plan files larger than this are refused before they are read (a plan for a "
            "7B policy is a few MiB)", read_only=True,
            integer_range=[IntegerRange(from_value=1024, to_value=256 * 2 ** 20, step=1)]))
        # A string array with no default: an empty list literal would be typed as a byte array.
        self.declare_parameter("proprio_names", Parameter.Type.STRING_ARRAY, d(
            "names of the JointState entries that form the policy's proprio vector, in order; "
            "unset = JointState.position in the order it comes", read_only=True))
        self.declare_parameter("sync_tolerance", 0.05, d(
            "seconds between the stamp of an image and those of image2 and proprio used with it "
            "(the closest stamp wins; an older partner waits until a closer one could have "
            "arrived); negative = take the newest of each, whatever its stamp", read_only=True))
        self.declare_parameter("sync_timeout", 0.5, d(
            "seconds the worker waits for image2/proprio/instruction before dropping a frame",
            read_only=True,
            floating_point_range=[FloatingPointRange(from_value=0.0, to_value=60.0)]))
        self.declare_parameter("control_rate_hz", 0.0, d(
            "single actions published on `action` this many times a second from the chunk "
            "queue; 0 = off (chunks only)", read_only=True,
            floating_point_range=[FloatingPointRange(from_value=0.0, to_value=1000.0)]))
        self.declare_parameter("action_aggregation", "latest", d(
            "how chunks make the action of a control tick: 'latest' (the newest chunk, step by "
            "step) or 'temporal_ensemble' (every live chunk's step for this tick, weights "
            "exp(-ensemble_m * i), i = 0 the oldest: ACT / LeRobot)", read_only=True))
        self.declare_parameter("ensemble_m", 0.01, d(
            "temporal ensembling's m: > 0 favours older predictions (ACT), 0 = mean, < 0 newer",
            read_only=True,
            floating_point_range=[FloatingPointRange(from_value=-10.0, to_value=10.0)]))
        self.declare_parameter("stale_after_s", 0.5, d(
            "a chunk older than this (or with no step left) is not used; with none left the "
            "action is as on_stale says", read_only=True,
            floating_point_range=[FloatingPointRange(from_value=0.001, to_value=3600.0)]))
        self.declare_parameter("on_stale", "hold", d(
            "action when no chunk is fresh: 'hold' (repeat the last) or 'zero'", read_only=True))
        self.declare_parameter("diagnostics_period", 1.0, d(
            "seconds between diagnostics messages", read_only=True,
            floating_point_range=[FloatingPointRange(from_value=0.05, to_value=3600.0)]))
        self._declared = {name: self.get_parameter_or(name, Parameter(name)) for name in (
            "checkpoint", "plan", "device", "torch_threads", "trigger", "rate_hz", "image_qos", "image_qos_depth",
            "expected_encodings", "image_height", "image_width", "image_resize",
            "center_crop_scale", "image_transport", "image_timeout", "max_plan_bytes",
            "proprio_names",
            "sync_tolerance", "sync_timeout", "control_rate_hz", "action_aggregation",
            "ensemble_m", "stale_after_s", "on_stale", "diagnostics_period")}

    def _invalid(self, param: Parameter) -> str | None:
        """Why `param` cannot be used, or None. Ranges are checked by rclpy from descriptors."""
        value = param.value
        if param.name == "trigger" and value not in TRIGGERS:
            return f"must be one of {', '.join(TRIGGERS)}, got {value!r}"
        if param.name == "image_qos" and value not in IMAGE_QOS:
            return f"must be one of {', '.join(IMAGE_QOS)}, got {value!r}"
        if param.name == "image_resize" and value not in RESIZE_MODES:
            return f"must be one of {', '.join(RESIZE_MODES)}, got {value!r}"
        if param.name == "action_aggregation" and value not in AGGREGATIONS:
            return f"must be one of {', '.join(AGGREGATIONS)}, got {value!r}"
        if param.name == "on_stale" and value not in ON_STALE:
            return f"must be one of {', '.join(ON_STALE)}, got {value!r}"
        if param.name == "image_transport" and value not in IMAGE_TRANSPORTS:
            return f"must be one of {', '.join(IMAGE_TRANSPORTS)}, got {value!r}"
        if param.name == "device":
            if not (value == "cpu" or value == "cuda" or
                    (value.startswith("cuda:") and value[5:].isdigit())):
                return f"must be cpu, cuda or cuda:N, got {value!r}"
        if param.name == "expected_encodings":
            unknown = [e for e in value if e not in ENCODINGS]
            if not value or unknown:
                return (f"must list encodings among {', '.join(ENCODINGS)}, got {list(value)!r}")
        if param.name == "plan" and value and not os.path.isfile(paths.resolve(value)):
            return f"no plan file at {value!r}"
        if param.name == "plan" and hasattr(self, "max_plan_bytes"):
            return self._plan_file_problem(paths.resolve(value))
        return None

    def _plan_file_problem(self, path: str) -> str | None:
        """Why the plan file at `path` is refused before it is read (its size), or None."""
        if not path:
            return None
        try:
            size = os.stat(path).st_size
        except OSError:
            return None  # the loader names a missing or unreadable file
        if size > self.max_plan_bytes:
            return (f"plan file {path!r} is {size} bytes, over max_plan_bytes "
                    f"({self.max_plan_bytes}): no bit plan is that large; refused unread")
        return None

    def _on_set_parameters(self, params: list[Parameter]) -> SetParametersResult:
        for param in params:
            error = self._invalid(param)
            if error:
                self.get_logger().error(f"parameter {param.name} refused: {error}")
                return SetParametersResult(successful=False, reason=error)
        # The plan first: if it is refused, nothing of this request is applied.
        for param in params:
            if param.name == "plan" and self.server is not None:
                path = paths.resolve(param.value)
                if path != self.server.active.plan_path:
                    ok, message = self._reload(path, via="parameter")
                    if not ok:
                        return SetParametersResult(successful=False, reason=message)
        for param in params:
            if param.name == "trigger":
                self.trigger = param.value
            elif param.name == "rate_hz":
                self.rate_hz = param.value
        if getattr(self, "sync", None) is not None:
            self.sync.wake()
        return SetParametersResult(successful=True)

    def _image_qos(self) -> QoSProfile:
        return image_qos(self.get_parameter("image_qos").value,
                         self.get_parameter("image_qos_depth").value)

    def _qos_phrase(self) -> str:
        kind = self.get_parameter("image_qos").value
        return (f"QoS {'best effort' if kind == 'sensor_data' else 'reliable'} "
                f"(image_qos {kind}), depth {self.get_parameter('image_qos_depth').value}")

    # Input callbacks: check, convert, keep the newest ------------------------------------------
    def _on_image(self, msg: Image, cam: int) -> None:
        self._on_frame(msg, cam, "", lambda: image_to_rgb8(msg, self.encodings, self.image_size,
                                                           self.image_resize, self.crop_scale))

    def _on_compressed(self, msg: CompressedImage, cam: int) -> None:
        self._on_frame(msg, cam, "compressed_", lambda: compressed_to_rgb8(msg, self.image_size, self.image_resize,
                                                                           self.crop_scale))

    def _on_frame(self, msg, cam: int, kind_prefix: str, convert) -> None:
        """A frame of camera `cam`, raw or compressed: noted as arrived, `convert()`ed to the
        policy's rgb8 (ImageConversionError: rejected as `<topic>_<kind_prefix><kind>`), kept."""
        if not self._serving:
            return
        arrival = time.monotonic()
        self._camera_watch[cam].arrived(arrival)
        topic = "image2" if cam else "image"
        try:
            rgb = convert()
        except ImageConversionError as exc:
            self._reject(f"{topic}_{kind_prefix}{exc.kind}", f"{topic} dropped: {exc}")
            return
        self._keep_image(msg, rgb, cam, arrival)

    def _keep_image(self, msg, rgb: np.ndarray, cam: int, arrival: float) -> None:
        if cam == 0:
            self._stats.frames += 1
        self.sync.put_image(cam, Stamped(stamp=_seconds(msg.header.stamp), value=rgb,
                                         arrival=arrival, header=msg.header))

    def _on_instruction(self, msg: String) -> None:
        # Passed on as sent (the policy's tokenizer sees what `qvla eval` would give it); only
        # a blank, over-long or undecodable instruction is refused.
        text = msg.data
        current = self.sync.instruction
        if not text.strip():
            kept = f"still following {current!r}" if current else "no instruction yet"
            self._reject("instruction_empty", f"empty instruction ignored; {kept}")
            return
        if len(text) > MAX_INSTRUCTION_CHARS:
            self._reject("instruction_long", f"instruction of {len(text)} characters ignored "
                                             f"(at most {MAX_INSTRUCTION_CHARS})")
            return
        if "\ufffd" in text:
            # rclpy decodes bytes that are not UTF-8 as U+FFFD: the message was damaged on the
            # way, and a garbled sentence must not replace the task in force.
            kept = f"still following {current!r}" if current else "no instruction yet"
            self._reject("instruction_encoding", f"instruction with bytes that are not UTF-8 "
                                                 f"(decoded as U+FFFD) ignored; {kept}")
            return
        self.sync.put_instruction(text)
        if text != current:
            self.get_logger().info(f"instruction: {text!r}")

    def _on_proprio(self, msg: JointState) -> None:
        position = np.asarray(msg.position, dtype=np.float64)
        if len(set(msg.name)) != len(msg.name):
            # Which value is meant is unknowable (a dict would silently keep the last one).
            twice = sorted({n for n in msg.name if list(msg.name).count(n) > 1})
            self._reject("proprio_duplicate_names", f"proprio dropped: joint name(s) {twice} "
                                                    f"appear more than once in {list(msg.name)}")
            return
        if self.proprio_names:
            index = {name: i for i, name in enumerate(msg.name)}
            missing = [n for n in self.proprio_names if n not in index]
            if missing or len(msg.name) != len(position):
                self._reject("proprio_names", f"proprio dropped: names {list(msg.name)} with "
                                        f"{len(position)} positions do not give "
                                        f"{list(self.proprio_names)}")
                return
            position = position[[index[n] for n in self.proprio_names]]
        if position.shape != (self.proprio_dim,):
            self._reject("proprio_size", f"proprio dropped: {position.size} positions, the policy "
                                    f"takes {self.proprio_dim}")
            return
        if not np.isfinite(position).all():
            # A stale state is worse than none: wait for the next valid one.
            self.sync.clear_proprio()
            self._reject("proprio_nan", f"proprio dropped: non-finite values {position.tolist()}; "
                                    f"no chunk until a valid state arrives")
            return
        self.sync.put_proprio(Stamped(stamp=_seconds(msg.header.stamp),
                                      value=position.astype(np.float32), arrival=time.monotonic()))

    def _reject(self, kind: str, message: str) -> None:
        """Count a refused input and log it: the first of a kind at once, then at most one line
        a second per kind so a bad stream cannot flood the log."""
        self._stats.rejected[kind] += 1
        now = time.monotonic()
        last, suppressed = self._reject_log.get(kind, (-math.inf, 0))
        if now - last >= 1.0:
            more = f" ({suppressed} more since the last report)" if suppressed else ""
            self.get_logger().warning(message + more)
            self._reject_log[kind] = (now, 0)
        else:
            self._reject_log[kind] = (last, suppressed + 1)

    # Inference worker ---------------------------------------------------------------------------
    def _work(self) -> None:
        next_tick = 0.0
        while True:
            rate = self.trigger == "rate"
            observation = self.sync.next(not_before=next_tick if rate else 0.0)
            if observation is None:
                return
            if rate:
                next_tick = max(next_tick + 1.0 / self.rate_hz, time.monotonic())
            if isinstance(observation, Dropped):
                where = {"no_instruction": "instruction", "no_proprio": "proprio"}.get(
                    observation.kind, observation.kind.removeprefix("no_"))
                self._reject(observation.kind, f"frame dropped: {observation.message} on "
                                               f"{self.resolve_topic_name(where)}")
                continue
            self._run(observation)

    def _run(self, obs) -> None:
        try:
            result = self.server.infer(obs.images, obs.instruction, obs.proprio)
        except Exception as exc:  # the node keeps serving; the log says what failed
            self._reject("forward", f"policy forward failed: {type(exc).__name__}: {exc}")
            return
        msg = ActionChunk()
        msg.header = obs.primary.header
        msg.horizon, msg.action_dim = (int(n) for n in result.actions.shape)
        msg.actions = array.array("f", result.actions.astype(np.float32).tobytes())
        msg.instruction = obs.instruction
        msg.plan_id = result.plan_id
        msg.inference_time = float(result.seconds)
        latency = time.monotonic() - obs.primary.arrival
        msg.latency = float(latency)
        try:
            self.chunk_pub.publish(msg)
        except Exception:  # the context went away under a forward: the node is stopping
            if self.context.ok():
                raise
            return
        if self.action_queue is not None:
            self.action_queue.add(result.actions, start=obs.primary.arrival,
                                  now=time.monotonic(), header=obs.primary.header,
                                  plan_id=result.plan_id, instruction=obs.instruction,
                                  inference_time=result.seconds)
        self._stats.record(result.seconds, latency)

    # Actions at the control rate ----------------------------------------------------------------
    def _actions_phrase(self) -> str:
        if self.action_queue is None:
            return "no single actions (control_rate_hz 0)"
        q = self.action_queue
        how = (f"temporal_ensemble m={q.m:g}" if q.aggregation == "temporal_ensemble"
               else "latest")
        return (f"actions on {self.action_pub.topic_name} at {self.control_rate_hz:g} Hz "
                f"({how}; {q.on_stale} after {q.stale_after:g} s without a fresh chunk)")

    def _control_tick(self) -> None:
        queue = self.action_queue
        if queue is None or not self._serving:
            return  # inactive, or being released
        action = queue.next(time.monotonic())
        if action is None:
            return  # no chunk yet: nothing to command
        if action.stale != self._action_stale_logged:
            self._action_stale_logged = action.stale
            if action.stale:
                self.get_logger().warning(
                    f"actions stale: no chunk fresher than stale_after_s "
                    f"({queue.stale_after:g} s) with a step left; "
                    f"{'holding the last action' if queue.on_stale == 'hold' else 'publishing zeros'}")
            else:
                self.get_logger().info("actions fresh again")
        msg = ActionChunk()
        if action.header is not None:
            msg.header = action.header
        msg.horizon, msg.action_dim = 1, int(action.values.shape[0])
        msg.actions = array.array("f", action.values.astype(np.float32).tobytes())
        msg.instruction = action.instruction
        msg.plan_id = action.plan_id
        msg.inference_time = float(action.inference_time)
        msg.latency = float(action.age)
        try:
            self.action_pub.publish(msg)
        except Exception:
            if self.context.ok():
                raise
            return
        self._stats.actions += 1

    # Reload -------------------------------------------------------------------------------------
    def _on_reload_plan(self, request: ReloadPlan.Request,
                        response: ReloadPlan.Response) -> ReloadPlan.Response:
        path = paths.resolve(request.plan_path)
        ok, message = self._reload(path, via="service")
        response.success = ok
        response.message = message
        response.active_plan_id = self.server.active.plan_id
        if ok and self.get_parameter("plan").value != request.plan_path:
            # Keep the parameter in step with what serves (the callback sees no change to load).
            self.set_parameters([Parameter("plan", value=path)])
        return response

    def _reload(self, path: str, via: str) -> tuple[bool, str]:
        old = self.server.active
        problem = self._plan_file_problem(path)
        if problem:
            self._stats.reloads_refused += 1
            message = f"{problem}; still serving {old.label}"
            self.get_logger().error(f"reload ({via}) refused: {message}")
            return False, message
        self.get_logger().info(f"reload ({via}): loading {path or 'full precision'} beside "
                               f"{old.label}")
        try:
            new = self.server.reload(path)
        except PlanRejected as exc:
            self._stats.reloads_refused += 1
            message = f"{exc}; still serving {self.server.active.label}"
            self.get_logger().error(f"reload ({via}) refused: {message}")
            return False, message
        self._stats.reloads += 1
        waited, turns, delay = self.server.last_reload_waits
        message = (f"now serving {new.label} (was {old.label}); loaded and checked in "
                   f"{new.load_seconds:.2f} s")
        if turns:  # forwards ran meanwhile, each followed by a turn of the build
            message += (f" ({waited:.2f} s of it letting {turns} forwards run first, which "
                        f"waited up to {1e3 * delay:.0f} ms for its turns)")
        self.get_logger().info(f"reload ({via}): {message}")
        return True, message

    # Graph watch: silent cameras, a name clash --------------------------------------------------
    def _watch_graph(self) -> None:
        now = time.monotonic()
        for sub, watch in zip(self._camera_subs, self._camera_watch):
            change = watch.update(self.count_publishers(sub.topic_name), now)
            if change == "gone":
                self.get_logger().info(f"{sub.topic_name}: no publisher any more")
            elif change == "again":
                self.get_logger().info(f"{sub.topic_name}: messages arrive again")
            elif change == "silent":
                rhythm = (f"it had delivered at {watch.rate_hz:.2g} Hz, silent after "
                          f"{watch.limit:.1f} s: image_timeout {self.image_timeout:g} s or "
                          f"{SILENT_PERIODS} of its frame periods" if watch.period else
                          f"image_timeout {self.image_timeout:g} s")
                self.get_logger().warning(
                    f"{sub.topic_name} has {watch.publishers} publisher(s) but no message arrived "
                    f"for {watch.quiet:.1f} s ({rhythm}); subscribed with {self._qos_phrase()}; "
                    f"transport: {self.transport}. Over Fast DDS's builtin transports a "
                    f"best-effort subscription gets no message larger than ~512 KiB (640x480 "
                    f"rgb8 is 900 KiB): run the camera and this node with "
                    f"FASTDDS_DEFAULT_PROFILES_FILE=config/fastdds_large_frames.xml (the launch "
                    f"files set it), or image_qos 'reliable', or compressed frames. A reliable "
                    f"subscription to a best-effort camera shows the same silence (QoS mismatch).")
        if now - self._last_clash_check >= 2.0:
            self._last_clash_check = now
            me = (self.get_name(), self.get_namespace())
            same = sum(1 for entry in self.get_node_names_and_namespaces() if tuple(entry) == me)
            if same > 1 and not self._name_clash:
                self.get_logger().warning(
                    f"{same} nodes named {self.get_fully_qualified_name()} in ROS_DOMAIN_ID "
                    f"{os.environ.get('ROS_DOMAIN_ID', '0')}: their services (reload_plan), "
                    f"parameters and diagnostics are mixed up; give each its own name "
                    f"(--ros-args -r __node:=<name>) or namespace")
            self._name_clash = same > 1

    # Diagnostics --------------------------------------------------------------------------------
    def _publish_diagnostics(self) -> None:
        snapshot = self._stats.snapshot(dropped=self.sync.dropped)
        active = self.server.active
        status = DiagnosticStatus()
        status.name = f"{self.get_name()}: policy"
        status.hardware_id = self.get_parameter("device").value
        silent = [(s.topic_name, w) for s, w in zip(self._camera_subs, self._camera_watch)
                  if w.silent]
        if not self._serving:
            status.level = DiagnosticStatus.WARN
            status.message = f"inactive (lifecycle): {active.label} loaded, not serving"
        elif silent:
            status.level = DiagnosticStatus.ERROR
            status.message = "; ".join(
                f"{name}: {w.publishers} publisher(s), no message for {w.quiet:.0f} s"
                for name, w in silent) + f" ({self._qos_phrase()}; transport: {self.transport})"
        elif snapshot["chunks"] == 0 and snapshot["frames"] > 0:
            status.level = DiagnosticStatus.WARN
            status.message = f"frames arrive but no chunk was published ({active.label})"
        elif snapshot["chunks"] == 0:
            status.level = DiagnosticStatus.WARN
            waiting = ", ".join(f"{s.topic_name} ({w.publishers} publisher(s))"
                                for s, w in zip(self._camera_subs, self._camera_watch))
            status.message = f"0 Hz: no frame accepted from {waiting} ({active.label})"
        else:
            status.level = DiagnosticStatus.OK
            status.message = f"serving {active.label} at {snapshot['chunk_rate_hz']:.1f} Hz"
        values = {"plan_id": active.plan_id, "plan_path": active.plan_path,
                  "forward_mode": active.forward_mode, "instruction": self.sync.instruction or ""}
        for role, watch in zip(("image", "image2"), self._camera_watch):
            snapshot[f"{role}_rate_hz"] = watch.rate_hz
            snapshot[f"{role}_silent_after_s"] = watch.limit
        values.update({k: f"{v:.4g}" if isinstance(v, float) else str(v)
                       for k, v in snapshot.items()})
        if self.action_queue is not None:
            values["actions_stale"] = str(self.action_queue.stale)
            values["actions_stale_ticks"] = str(self.action_queue.stale_ticks)
        status.values = [KeyValue(key=k, value=v) for k, v in values.items()]
        msg = DiagnosticArray()
        msg.header.stamp = self.get_clock().now().to_msg()
        msg.status = [status]
        self.diagnostics_pub.publish(msg)



class PolicyNode(PolicyNodeCore, Node):
    """The policy node; see the module docstring for its interface. Serves from construction to
    destruction (the managed variant: qvla_ros.ros.managed_policy_node)."""

    def __init__(self, **kwargs):
        Node.__init__(self, NODE_NAME, **kwargs)
        self._setup_parameters()
        self._configure()

    def destroy_node(self) -> None:
        self.sync.stop()
        if self._worker.is_alive():
            self._worker.join(timeout=10.0)
        super().destroy_node()


class _Stats:
    """Counters since start, and inference/latency times since the last snapshot."""

    def __init__(self):
        self._lock = threading.Lock()
        self.frames = 0
        self.chunks = 0
        self.actions = 0
        self.reloads = 0
        self.reloads_refused = 0
        self.rejected: collections.Counter[str] = collections.Counter()
        self._window: list[tuple[float, float]] = []
        self._window_start = time.monotonic()
        self._window_frames = 0

    def record(self, inference: float, latency: float) -> None:
        with self._lock:
            self.chunks += 1
            self._window.append((inference, latency))

    def snapshot(self, dropped: int) -> dict:
        with self._lock:
            now = time.monotonic()
            window, self._window = self._window, []
            elapsed, self._window_start = now - self._window_start, now
            frames, self._window_frames = self.frames - self._window_frames, self.frames
        inference = np.array([w[0] for w in window]) * 1e3
        latency = np.array([w[1] for w in window]) * 1e3
        out = {
            "chunks": len(window),
            "frames": frames,
            "chunk_rate_hz": len(window) / elapsed if elapsed > 0 else 0.0,
            "inference_ms_p50": float(np.median(inference)) if len(window) else 0.0,
            "inference_ms_max": float(inference.max()) if len(window) else 0.0,
            "latency_ms_p50": float(np.median(latency)) if len(window) else 0.0,
            "latency_ms_max": float(latency.max()) if len(window) else 0.0,
            "chunks_total": self.chunks,
            "actions_total": self.actions,
            "frames_total": self.frames,
            "frames_dropped_total": dropped,
            "reloads": self.reloads,
            "reloads_refused": self.reloads_refused,
        }
        out.update({f"rejected_{k}": v for k, v in sorted(self.rejected.items())})
        return out


def _seconds(stamp) -> float:
    return stamp.sec + stamp.nanosec * 1e-9


def _shut_down(executor: MultiThreadedExecutor | None, node: PolicyNode | None) -> None:
    """Stop serving and release everything ROS holds, in an order that is safe while rclpy's
    signal thread may still be running."""
    # rclpy handles SIGINT/SIGTERM on a thread of its own that triggers every executor's signal
    # guard condition through a list of raw pointers. The executor it wakes at SIGINT starts this
    # shutdown; when that thread loses the CPU in the middle of its loop (a loaded machine),
    # executor.shutdown() below frees the guard condition and the list while the thread still
    # holds them, and the thread, resuming, crashes the process (signal 11 at the end of a soak).
    # Uninstalling the handlers first joins that thread: nothing touches them afterwards.
    uninstall_signal_handlers()
    if executor is not None:
        executor.shutdown()
    if node is not None:
        node.destroy_node()
    rclpy.try_shutdown()


def main(args: list[str] | None = None) -> int:
    # A crash in native code (rclpy, DDS, torch) leaves no Python traceback; this prints every
    # thread's Python stack to stderr (the node's log) before the process dies.
    faulthandler.enable()
    # A plan reload builds the new policy (Python-heavy) beside the inference thread, whose forward
    # gives the GIL up at every torch op; at the default 5 ms switch interval it waits that long to
    # get it back each time, and a forward of a few hundred ops stalls for a second or more.
    sys.setswitchinterval(0.0005)
    # A compressed frame claiming billions of pixels must not be decoded (OpenCV's own limit is
    # 2^30 pixels, 3 GiB); 2^26 is 8192 x 8192, the largest size the image parameters allow.
    os.environ.setdefault("OPENCV_IO_MAX_IMAGE_PIXELS", str(2 ** 26))
    rclpy.init(args=args if args is not None else sys.argv)
    node = executor = None
    code = 0
    try:
        # Threads: the input group, the control group (reloads, diagnostics), parameter services.
        executor = MultiThreadedExecutor(num_threads=4)
        node = PolicyNode()
        # Everything imported and built so far (torch, transformers, the policy: ~380,000 objects
        # with the tiny policy) lives as long as the node. Without this, each full garbage
        # collection walks it all, holding the GIL for 0.2-0.26 s on the 2-core Xeon, and every
        # thread stops: 6-9 frames of a 30 Hz stream lost (the first one after start-up tends to
        # land on the first reload). Frozen, a full collection takes microseconds.
        gc.freeze()
        executor.add_node(node)
        executor.spin()
    except (PlanRejected, ValueError, FileNotFoundError) as exc:
        rclpy.logging.get_logger(NODE_NAME).fatal(f"cannot start: {exc}")
        code = 1
    except (KeyboardInterrupt, ExternalShutdownException):
        pass
    finally:
        _shut_down(executor, node)
    return code


if __name__ == "__main__":
    sys.exit(main())
