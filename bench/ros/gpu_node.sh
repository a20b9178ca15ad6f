#!/usr/bin/env bash
# The ROS node on the GPU machine, which has Python 3.12 + torch + CUDA but no ROS: unpack the
# ROS runtime that scripts/make_ros_bundle.sh built (carried as .rosbundle/), point the
# interpreter at it and at this checkout, check that everything imports, then run the tests.
#
#   bash bench/ros/gpu_node.sh                      # test/test_ros_node_gpu.py -> $OUT
#   PYTHON=/path/to/python3.12 bash bench/ros/gpu_node.sh test/test_ros_policy_node.py::test_x
#
# What comes back ($OUT, or runs/gpu_node without one): pytest.log, junit.xml, env.txt and the
# test's figures (ros_node_gpu.json, through QVLA_BENCH_OUT). Exit status: pytest's, or 3 when
# the GPU test ran but wrote no figures (a skip there is a failure: the point is the GPU run).
set -uo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
PY="${PYTHON:-python3}"
ARCHIVE="${QVLA_ROS_BUNDLE:-$ROOT/.rosbundle/ros312.tar.xz}"
RUNTIME="${QVLA_ROS_RUNTIME:-/tmp/qvla_ros312}"  # unpacked here: /tmp, not the carried tree
OUT="${OUT:-$ROOT/runs/gpu_node}"
mkdir -p "$OUT"
log() { printf '[gpu_node] %s\n' "$*" | tee -a "$OUT/env.txt" >&2; }
: > "$OUT/env.txt"

[[ -f "$ARCHIVE" ]] || { log "no ROS bundle at $ARCHIVE (scripts/make_ros_bundle.sh, then carry .rosbundle)"; exit 2; }
t0=$(date +%s.%N)
rm -rf "$RUNTIME" && mkdir -p "$RUNTIME"
# tar + xz where they exist, else python's tarfile (its lzma reads the same archive).
if command -v xz >/dev/null; then
  tar -C "$RUNTIME" -xJf "$ARCHIVE" || exit 2
else
  "$PY" -c "import sys, tarfile; tarfile.open(sys.argv[1]).extractall(sys.argv[2])" "$ARCHIVE" "$RUNTIME" || exit 2
fi
PREFIX="$RUNTIME/ros312"
t1=$(date +%s.%N)

# What the ros-* wheels' bootstrapper (a .pth that re-executes python) would set, set here once:
# its .pth is not read from PYTHONPATH, and it is left out of the bundle.
libs="$PREFIX/lib"
for d in "$PREFIX"/site-packages/ros_*.libs; do libs="$libs:$d"; done
export LD_LIBRARY_PATH="$libs${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
export _ROS_WHEELS_BOOTSTRAP_COMPLETE=1
# The checkout first (qvla_ros itself; extend_path adds the bundle's qvla_ros.msg/.srv to it),
# then the ROS packages. torch, numpy, yaml... come from the interpreter's own site-packages.
export PYTHONPATH="$ROOT:$PREFIX/site-packages${PYTHONPATH:+:$PYTHONPATH}"
export AMENT_PREFIX_PATH="$PREFIX" RMW_IMPLEMENTATION=rmw_fastrtps_cpp
export PYTHONUNBUFFERED=1 PYTHONDONTWRITEBYTECODE=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
export QVLA_BENCH_OUT="$OUT"
# The shipped Fast DDS profile uses shared memory (/dev/shm) besides UDP. A VM without a writable
# /dev/shm would lose that transport; the test's 128x128 frames (48 KiB) travel over UDP alone,
# and FASTDDS_BUILTIN_TRANSPORTS set here makes the harness leave the profile out.
if ! (tmp=$(mktemp /dev/shm/qvla.XXXXXX) && rm -f "$tmp") 2>/dev/null; then
  export FASTDDS_BUILTIN_TRANSPORTS=UDPv4
  log "no writable /dev/shm: Fast DDS over UDPv4 only"
fi

"$PY" - <<'EOF' 2>&1 | tee -a "$OUT/env.txt" || { log "the ROS runtime does not import"; exit 2; }
import sys, time
t = time.perf_counter()
import rclpy, rclpy.lifecycle
from qvla_ros.msg import ActionChunk
from qvla_ros.srv import ReloadPlan
from diagnostic_msgs.msg import DiagnosticArray
rclpy.init(); node = rclpy.create_node("qvla_import_check"); node.destroy_node(); rclpy.shutdown()
ros_s = time.perf_counter() - t
import torch
print(f"python {sys.version.split()[0]}; rclpy + interfaces + one node in {ros_s:.2f} s; "
      f"torch {torch.__version__}, cuda available: {torch.cuda.is_available()}"
      + (f" ({torch.cuda.get_device_name(0)})" if torch.cuda.is_available() else ""))
EOF
t2=$(date +%s.%N)
log "unpack $(awk "BEGIN{printf \"%.2f\", $t1-$t0}") s, import check $(awk "BEGIN{printf \"%.2f\", $t2-$t1}") s ($("$PY" --version 2>&1))"

# pytest from the interpreter's environment; -p no:cacheprovider: nothing written into the tree.
tests=("$@")
[[ ${#tests[@]} -gt 0 ]] || tests=(test/test_ros_node_gpu.py)
cd "$ROOT"
"$PY" -m pytest -p no:cacheprovider -rA -v --junitxml="$OUT/junit.xml" "${tests[@]}" 2>&1 | tee "$OUT/pytest.log"
status=${PIPESTATUS[0]}
if [[ $# -eq 0 && $status -eq 0 && ! -s "$OUT/ros_node_gpu.json" ]]; then
  log "the GPU test wrote no figures (skipped?): see pytest.log"
  exit 3
fi
exit "$status"
