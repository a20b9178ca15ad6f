"""The tensor-core small-M kernel (mixed_gemv_mma.cu): built on first use, launched through ctypes.

Why ctypes and not a torch extension: the kernel needs no torch headers (pointers, sizes and the
stream are all it takes), so nvcc builds it alone in about half a minute, where a torch extension
would compile torch's headers too and need ninja. The launch is a plain C call on torch's current
stream, so it is recorded by CUDA-graph capture like any other launch.

The library is built once per source, GPU architecture and nvcc into a cache folder
($QVLA_KERNEL_CACHE, default ~/.cache/qvla_ros/kernels) and reused by every process after. Without
nvcc or a GPU of compute capability 8.0 or more, `mma_available()` is False and the Triton kernels
run the layer.
"""
from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import re
import shutil
import subprocess
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch

from qvla_ros.io import atomic_write

from .layout import QUANT_WIDTHS, SLOT_BITS, KernelWeights, num_k_blocks, slot_table
from .launch_common import check_small_m_input, output_tensor, split_scratch

SOURCE = Path(__file__).with_name("mixed_gemv_mma.cu")
#: the most tokens one launch takes (two 8-token tensor-core tiles)
MMA_MAX_TOKENS = 16
#: dynamic shared memory one block may use (H100/H200: 227 KiB; the static part is a few KiB)
MAX_SMEM = 200 * 1024
#: x pairs per word column for each width (dense rows: one pair of neighbouring features)
_PAIRS = {16: 1, 8: 2, 4: 4, 3: 8, 2: 8}


@dataclass(frozen=True)
class MmaConfig:
    """Tile of the tensor-core small-M kernel.

    Args:
        row_tiles: 16-row tiles per block (one warp group of k_warps each).
        k_warps: warps splitting each 16 rows' words along K (their sums meet in shared memory).
        unroll: steps (16 words of each row per warp) loaded ahead of the ones being multiplied.
        smem_budget: bytes of shared memory for staged x; more tokens or features than fit are
            staged in chunks along K (one barrier pair per chunk).
        block_steps: about how many steps (64 bytes of each row) one block streams: rows with more
            are split along K over several blocks, whose parts the last to finish adds up.
    """
    row_tiles: int = 1
    k_warps: int = 8
    unroll: int = 2
    smem_budget: int = 64 * 1024
    block_steps: int = 32

    def __post_init__(self) -> None:
        if (self.row_tiles, self.k_warps, self.unroll) not in compiled_tiles():
            raise ValueError(f"no compiled tile ({self.row_tiles}, {self.k_warps}, {self.unroll}); "
                             f"compiled: {sorted(compiled_tiles())}")
        if not 4096 <= self.smem_budget <= MAX_SMEM:
            raise ValueError(f"smem_budget must be 4 KiB..{MAX_SMEM // 1024} KiB, got {self.smem_budget}")
        if self.block_steps < 1:
            raise ValueError(f"block_steps must be positive, got {self.block_steps}")


@functools.lru_cache(maxsize=None)
def compiled_tiles() -> frozenset[tuple[int, int, int]]:
    """The (row_tiles, k_warps, unroll) tiles the source compiles in, read from its QVLA_MMA_TILES
    list (so configs can be checked on machines that cannot build it)."""
    text = SOURCE.read_text()
    block = text[text.index("#define QVLA_MMA_TILES"):]
    block = block[:block.index("\n\n")]
    return frozenset(tuple(int(v) for v in m) for m in re.findall(r"QVLA_TILE\((\d+), (\d+), (\d+)\)", block))


#: per token bucket (H200, bench_mma.py over tiles and run lengths): one token the tile of the fastest
#: decoder in bench/kernels/results/run10_mma/sweep2/mma_nvidia_h200.json (4.56 ms); 9-16 tokens the
#: least time summed over the OFT-7B shapes in bench/kernels/results/run11/c1/mma_nvidia_h200.json
#: (gate/up 31.99 us); the decoder with these tiles: bench/kernels/results/run11/c3/bench.log, 4.59 ms
#: at 1 token, 7.47 at 8, 9.31 at 16. 2-8 tokens were not swept and take the one-token tile
_MMA_CONFIGS: dict[str, MmaConfig] = {}


def _default_configs() -> dict[str, MmaConfig]:
    if not _MMA_CONFIGS:
        _MMA_CONFIGS.update({"m1": MmaConfig(1, 8, 1, block_steps=32), "m8": MmaConfig(1, 8, 1, block_steps=32),
                             "m16": MmaConfig(4, 2, 1, block_steps=32)})
    return _MMA_CONFIGS


def mma_bucket(m: int) -> str:
    if not 1 <= m <= MMA_MAX_TOKENS:
        raise ValueError(f"the tensor-core small-M kernel runs 1..{MMA_MAX_TOKENS} tokens, got {m}")
    return "m1" if m == 1 else "m8" if m <= 8 else "m16"


def pick_mma_config(m: int) -> MmaConfig:
    return _default_configs()[mma_bucket(m)]


def override_mma_configs(configs: dict[str, MmaConfig]) -> None:
    """Replace the tiles of token buckets ("m1", "m8", "m16")."""
    for key, cfg in configs.items():
        if key not in _default_configs():
            raise ValueError(f"unknown bucket {key!r}; known: {sorted(_MMA_CONFIGS)}")
        if not isinstance(cfg, MmaConfig):
            raise TypeError(f"{key}: expected an MmaConfig, got {type(cfg).__name__}")
    _MMA_CONFIGS.update(configs)


# ---- building ------------------------------------------------------------------------------------

def nvcc_path() -> str | None:
    for candidate in (os.environ.get("NVCC"), shutil.which("nvcc"),
                      os.path.join(os.environ.get("CUDA_HOME", "/usr/local/cuda"), "bin", "nvcc")):
        if candidate and os.path.isfile(candidate) and os.access(candidate, os.X_OK):
            return candidate
    return None


def nvcc_command(nvcc: str, arch: str, output: str, kind: str = "-shared") -> list[str]:
    """The build command: `kind` -shared (the library) or -cubin (for offline inspection)."""
    cmd = [nvcc, "-O3", "-std=c++17", f"-gencode=arch=compute_{arch},code=sm_{arch}", kind, "-o", output, str(SOURCE)]
    if kind == "-shared":
        cmd[4:4] = ["-Xcompiler", "-fPIC"]
    return cmd


def _cache_dir() -> Path:
    return Path(os.environ.get("QVLA_KERNEL_CACHE", Path.home() / ".cache" / "qvla_ros" / "kernels"))


def build_library(arch: str, nvcc: str | None = None) -> Path:
    """The kernel library for compute capability `arch` (e.g. "90"), built unless cached. Raises
    RuntimeError with nvcc's messages if the build fails."""
    nvcc = nvcc or nvcc_path()
    if nvcc is None:
        raise RuntimeError("nvcc not found (set NVCC or CUDA_HOME): the tensor-core kernel cannot be built")
    version = subprocess.run([nvcc, "--version"], capture_output=True, text=True).stdout
    key = hashlib.sha256(SOURCE.read_bytes() + arch.encode() + version.encode()).hexdigest()[:16]
    target = _cache_dir() / f"qvla_mma_sm{arch}_{key}.so"
    if target.is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    # build beside the target and rename: processes building at once each finish with a whole file

    def build(tmp: Path) -> None:
        done = subprocess.run(nvcc_command(nvcc, arch, str(tmp)), capture_output=True, text=True)
        if done.returncode:
            raise RuntimeError(f"nvcc failed to build {SOURCE.name} for sm_{arch}:\n{done.stderr[-4000:]}")

    return atomic_write(target, build, keep_mode=True)


class _Params(ctypes.Structure):
    # field for field the `Params` struct of mixed_gemv_mma.cu
    _fields_ = [
        ("qwords", ctypes.c_void_p), ("w16", ctypes.c_void_p), ("scale", ctypes.c_void_p),
        ("zero", ctypes.c_void_p), ("out_index", ctypes.c_void_p), ("bias", ctypes.c_void_p),
        ("x", ctypes.c_void_p), ("y", ctypes.c_void_p),
        ("word_offset", ctypes.c_longlong * 5), ("high_offset", ctypes.c_longlong),
        ("rows", ctypes.c_int * 6), ("start", ctypes.c_int * 6), ("first_tile", ctypes.c_int * 7),
        ("first_block", ctypes.c_int * 7), ("nkb", ctypes.c_int * 5), ("chunk_steps", ctypes.c_int * 5),
        ("split_steps", ctypes.c_int * 5), ("splits", ctypes.c_int * 5), ("ws", ctypes.c_void_p),
        ("counters", ctypes.c_void_p),
        ("M", ctypes.c_int), ("K", ctypes.c_int), ("stride_x", ctypes.c_int), ("stride_y", ctypes.c_int),
        ("out_fp32", ctypes.c_int),
    ]


@functools.lru_cache(maxsize=None)
def _library(device_index: int):
    major, minor = torch.cuda.get_device_capability(device_index)
    return load_library(build_library(f"{major}{minor}"))


def load_library(path: Path):
    """The built library with its entry points typed (loads on machines without a GPU too)."""
    lib = ctypes.CDLL(str(path))
    lib.qvla_mma_gemv.restype = ctypes.c_int
    lib.qvla_mma_gemv.argtypes = [ctypes.c_void_p, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_int,
                                  ctypes.c_int, ctypes.c_int, ctypes.c_void_p]
    lib.qvla_mma_tiles.restype = ctypes.c_int
    lib.qvla_mma_tiles.argtypes = [ctypes.POINTER(ctypes.c_int), ctypes.c_int]
    lib.qvla_mma_params_layout.restype = ctypes.c_int
    lib.qvla_mma_params_layout.argtypes = [ctypes.POINTER(ctypes.c_longlong), ctypes.c_int]
    check_params_layout(lib)
    return lib


def params_layout() -> list[int]:
    """sizeof and field offsets of the ctypes mirror, in the order the library reports its own."""
    return [ctypes.sizeof(_Params)] + [getattr(_Params, name).offset for name, _ in _Params._fields_]


def check_params_layout(lib) -> None:
    """Refuse a library whose Params struct is laid out differently from _Params (every launch would
    hand the kernel shifted pointers)."""
    out = (ctypes.c_longlong * 64)()
    count = lib.qvla_mma_params_layout(out, 64)
    theirs, ours = list(out[:count]), params_layout()
    if theirs != ours:
        raise RuntimeError(f"Params layout of the built library {theirs} differs from the launcher's {ours}")


@functools.lru_cache(maxsize=None)
def mma_available(device_index: int = 0) -> bool:
    """Whether the tensor-core kernel runs on this CUDA device (compute capability >= 8.0 for
    mma.sync with bfloat16, and a successful build). A failed build warns once, with nvcc's output."""
    if not torch.cuda.is_available() or torch.cuda.get_device_capability(device_index) < (8, 0):
        return False
    try:
        _library(device_index)
    except (RuntimeError, OSError, AttributeError) as err:  # AttributeError: an entry point missing
        warnings.warn(f"tensor-core small-M kernel unavailable, the Triton kernels run instead: {err}")
        return False
    return True


# ---- launching -----------------------------------------------------------------------------------

def _token_stride(bits: int, steps: int) -> int:
    """Bytes of one token's staged x for a chunk of `steps` steps (the kernel's token_stride)."""
    raw = steps * 16 * _PAIRS[bits] * 4
    want = 16 * min(_PAIRS[bits], 4)
    return raw + ((want - raw) % 128)


def _row_steps(bits: int, in_features: int) -> int:
    """Steps (16 word columns: 64 bytes of each row) of one row of a `bits`-wide group."""
    if bits == 16:
        return -(-in_features // 32)
    return num_k_blocks(bits, in_features) * 2


def chunk_unit(cfg: MmaConfig) -> int:
    """Steps every chunk is a multiple of: k_warps * unroll (each warp's batch of steps inside one
    chunk), made even (a warp then stages whole 32-column runs of one token)."""
    batch = cfg.k_warps * cfg.unroll
    return batch * (1 + batch % 2)


def chunk_plan(kw: KernelWeights, m: int, cfg: MmaConfig) -> tuple[list[tuple[int, int, int]], int]:
    """How each of slots 16, 8, 4, 3, 2 is cut: (splits along K, steps per split, steps staged per
    chunk), (0, 0, 0) where empty; and the dynamic shared memory the launch needs.

    Every step is 64 bytes of each of a row tile's rows whatever the width, so rows are split along K
    into runs of about cfg.block_steps steps: a dense or 8-bit row tile then takes as long as a 4-bit
    one instead of 2-4 times longer (the launch lasts as long as its slowest block). Chunks are even
    multiples of k_warps * unroll steps (every warp's batch inside one chunk), as few per split as fit
    m tokens into smem_budget, and splits are whole chunks (so staging never crosses into the next
    split's features). Raises ValueError when one chunk of m tokens exceeds what a block may hold."""
    unit = chunk_unit(cfg)
    plan, smem = [], 0
    for bits, rows in zip(SLOT_BITS[:5], kw.group_rows[:5]):
        if rows == 0:
            plan.append((0, 0, 0))
            continue
        steps = _row_steps(bits, kw.in_features)
        splits = -(-steps // max(cfg.block_steps, unit))
        split_steps = -(-steps // (splits * unit)) * unit
        pieces = 1
        while True:
            chunk = -(-split_steps // (pieces * unit)) * unit
            if m * _token_stride(bits, chunk) <= cfg.smem_budget or chunk == unit:
                break
            pieces += 1
        split_steps = -(-split_steps // chunk) * chunk
        splits = -(-steps // split_steps)
        plan.append((splits, split_steps, chunk))
        smem = max(smem, m * _token_stride(bits, chunk))
    if smem > MAX_SMEM:
        raise ValueError(f"tile {cfg} stages {smem} bytes of x for {m} tokens, more than a block's {MAX_SMEM}: "
                         "use fewer warps along K or a smaller unroll for this many tokens")
    return plan, smem


def launch_mma_gemv(x: torch.Tensor, kw: KernelWeights, bias: torch.Tensor | None, out_dtype: torch.dtype,
                    config: MmaConfig | None = None, out: torch.Tensor | None = None) -> torch.Tensor:
    """One launch of the tensor-core small-M kernel over all groups of the layer: y [M, N].

    x: [M, K] bfloat16/float16 on a CUDA device, M <= 16. out_dtype: x's dtype or float32. bias:
    float32 [N] or None. out: optional contiguous [M, N] tensor of out_dtype to write (every element
    is written)."""
    m, k = check_small_m_input(x, kw, MMA_MAX_TOKENS, "the tensor-core small-M kernel")
    if not x.is_cuda:
        raise ValueError(f"x must be a CUDA tensor, got one on {x.device}")
    if out_dtype not in (x.dtype, torch.float32):
        raise ValueError(f"out_dtype must be x's dtype ({x.dtype}) or float32, got {out_dtype}")
    if bias is not None and (bias.dtype != torch.float32 or not bias.is_contiguous()):
        bias = bias.to(torch.float32).contiguous()
    y = output_tensor(out, m, kw.out_features, out_dtype, x.device)
    if m == 0:
        return y
    if x.stride(1) != 1:
        x = x.contiguous()
    cfg = config or pick_mma_config(m)
    table = slot_table(kw.group_rows, k)
    rows_per_tile = 16 * cfg.row_tiles
    tiles = [-(-rows // rows_per_tile) for rows in kw.group_rows]
    plan, smem = chunk_plan(kw, m, cfg)
    blocks = [t * (plan[i][0] if i < 5 else 1) for i, t in enumerate(tiles)]
    first_tile = [sum(tiles[:i]) for i in range(7)]
    first_block = [sum(blocks[:i]) for i in range(7)]
    # the split parts and arrival counters are the Triton kernels' split-K scratch (one stream, in turn)
    ws, counters = split_scratch(x.device, first_block[6] * rows_per_tile * 16, first_tile[6])
    p = _Params()
    p.qwords, p.w16, p.scale, p.zero = (kw.qwords.data_ptr(), kw.w16.data_ptr(), kw.scale.data_ptr(),
                                        kw.zero.data_ptr())
    p.out_index, p.bias = kw.out_index.data_ptr(), (bias.data_ptr() if bias is not None else None)
    p.x, p.y = x.data_ptr(), y.data_ptr()
    p.word_offset[:] = [0] + [table[f"o{b}"] * 16 for b in QUANT_WIDTHS[::-1]]
    p.high_offset = table["h3"] * 32
    p.rows[:] = list(kw.group_rows)
    p.start[:] = [sum(kw.group_rows[:i]) for i in range(6)]
    p.first_tile[:] = first_tile
    p.first_block[:] = first_block
    p.nkb[:] = [0] + [table[f"n{b}"] for b in QUANT_WIDTHS[::-1]]
    p.splits[:] = [max(splits, 1) for splits, _, _ in plan]
    p.split_steps[:] = [split_steps for _, split_steps, _ in plan]
    p.chunk_steps[:] = [chunk for _, _, chunk in plan]
    p.ws, p.counters = ws.data_ptr(), counters.data_ptr()
    p.M, p.K, p.stride_x, p.stride_y = m, k, x.stride(0), y.stride(0)
    p.out_fp32 = int(out_dtype == torch.float32)
    device = x.device.index if x.device.index is not None else torch.cuda.current_device()
    stream = torch.cuda.current_stream(x.device).cuda_stream
    rc = _library(device).qvla_mma_gemv(ctypes.addressof(p), int(x.dtype == torch.float16), cfg.row_tiles,
                                        cfg.k_warps, cfg.unroll, first_block[6], smem, stream)
    if rc:
        reason = "tile not compiled in" if rc == -1 else f"CUDA error {rc}"
        raise RuntimeError(f"tensor-core small-M launch failed: {reason} (tile {cfg}, {m} tokens, layer "
                           f"{kw.out_features}x{k}, {smem} bytes of shared memory)")
    return y
