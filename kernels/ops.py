"""The mixed-bit Linear as a torch operator: Triton on CUDA tensors, the plain-torch model on CPU.

`torch.ops.qvla.mixed_bit_linear` is registered with torch.library.custom_op and a fake (meta)
implementation, so it works under torch.compile and CUDA-graph capture. `mixed_bit_linear(x,
weights, bias, act_bits)` is the call MixedBitLinear makes; `weights` is a KernelWeights built once
with `prepare_packed` (layout.py).
"""
from __future__ import annotations

import functools
import os
from dataclasses import dataclass
from typing import List, Optional

import torch

from .launch_common import BoundLaunch, check_small_m_input, output_tensor, split_scratch
from .layout import KernelWeights
from .reference import check_act_bits, mixed_bit_linear_reference, quantize_activations_reference


@functools.lru_cache(maxsize=None)
def triton_available() -> bool:
    """Triton imports (it ships with torch's CUDA wheels; CPU-only installs usually lack it)."""
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


@dataclass(frozen=True)
class GemmConfig:
    """Tile shape and launch options of the grouped GEMM.

    Args:
        bm: tokens per program (1 selects the FMA path for a single token).
        bn: packed rows per program (rows of one width).
        wb: 32-bit weight words per row per loop step (a multiple of 32); a step covers
            wb * 32 / bits input features (so more for narrow widths).
        kstep: 0 = one tensor-core product per field of the loaded words (keeps decoded weights in
            registers: small tiles); > 0 = decode kstep features of each row into one tile and make
            one product per step (large wgmma tiles). A power of two, 64..512.
        bk16: input features per step for the dense 16-bit rows.
        split_k: programs sharing one output tile along K (> 1 shortens each program's chain of
            dependent loads when there are few tiles; the last one to finish adds up the parts).
        num_warps, num_stages: Triton launch options.
        use_dot: tensor-core products (needs bm >= 16); False: FMA, bm must be 1.
        decode_f32: decode bfloat16 weights through float32 (one conversion per element) instead of
            bfloat16 arithmetic; also what the Triton interpreter needs (it has no bf16 arithmetic).
    """
    bm: int
    bn: int
    wb: int = 32
    kstep: int = 0
    bk16: int = 64
    num_warps: int = 4
    num_stages: int = 2
    use_dot: bool = True
    decode_f32: bool = False
    split_k: int = 1

    def __post_init__(self) -> None:
        if self.wb % 32 or self.wb <= 0:
            raise ValueError(f"wb must be a positive multiple of 32, got {self.wb}")
        if self.kstep and (self.kstep not in (64, 128, 256, 512) or not self.use_dot):
            raise ValueError(f"kstep must be 0 or one of 64..512 (a power of two) with use_dot, got {self.kstep}")
        if self.split_k < 1 or self.split_k > 16:
            raise ValueError(f"split_k must be in 1..16, got {self.split_k}")
        if self.bk16 < 16 or self.bk16 & (self.bk16 - 1):
            raise ValueError(f"bk16 must be a power of two >= 16, got {self.bk16}")
        if self.use_dot and self.bm < 16:
            raise ValueError(f"tensor-core tiles need bm >= 16, got {self.bm}")
        if not self.use_dot and self.bm != 1:
            raise ValueError(f"the FMA path computes one token per program (bm=1), got bm={self.bm}")


#: chosen per number of tokens M and activation width: the fastest correct tiles of bench_kernels.py on
#: an H200, run 2: bench/kernels/results/run2_h200/results_nvidia_h200.json, key "chosen_configs" (the
#: "config" column of results_nvidia_h200.md beside it; e.g. q/k/v/o avg4 at 1 token 11.54 us). The
#: 8-bit-activation tiles at 1 and 16 tokens ("m1"/"m16", 8) have no recorded file: run 2 timed A8 at
#: 64 and 590 tokens only. `override_configs` replaces entries
_CONFIGS: dict[tuple[str, int], GemmConfig] = {
    ("m1", 16): GemmConfig(bm=1, bn=16, wb=32, num_warps=2, num_stages=3, use_dot=False, split_k=8, bk16=128),
    ("m16", 16): GemmConfig(bm=16, bn=32, wb=32, num_warps=4, num_stages=3, split_k=4, bk16=128),
    ("m64", 16): GemmConfig(bm=32, bn=32, wb=32, num_warps=4, num_stages=3),
    ("large", 16): GemmConfig(bm=64, bn=64, wb=32, num_warps=4, num_stages=2),
    ("m1", 8): GemmConfig(bm=16, bn=16, wb=32, num_warps=2, num_stages=3, split_k=4, bk16=128),
    ("m16", 8): GemmConfig(bm=16, bn=16, wb=32, num_warps=2, num_stages=3, split_k=4, bk16=128),
    ("m64", 8): GemmConfig(bm=32, bn=32, wb=32, num_warps=4, num_stages=3),
    ("large", 8): GemmConfig(bm=64, bn=64, wb=32, num_warps=4, num_stages=2),
}


def bucket(m: int) -> str:
    if m <= 1:
        return "m1"
    if m <= 16:
        return "m16"
    if m <= 64:
        return "m64"
    return "large"


def pick_config(m: int, act_bits: int) -> GemmConfig:
    return _CONFIGS[(bucket(m), act_bits)]


def override_configs(configs: dict[tuple[str, int], GemmConfig]) -> None:
    """Replace tile choices (keys: (bucket name, act_bits)), e.g. with the benchmark's best."""
    for key, cfg in configs.items():
        if key not in _CONFIGS:
            raise ValueError(f"unknown config key {key!r}; known: {sorted(_CONFIGS)}")
        _CONFIGS[key] = cfg


# ---- launches ------------------------------------------------------------------------------------
# Each launcher is split in two: `_bind_*` does everything that depends only on the layer, the token
# count and the dtypes (tile choice, grid, group table, scratch, constant arguments) and returns a
# function of the per-call tensors; `launch_*` checks its inputs, binds and runs once. PreparedLinear
# (below) keeps the bound functions per token count, so a layer's eager forward pays the binding once.

def quantize_activations(x2d: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-token int8 activations of x2d [M, K]: (codes int8 [M, K], scale float32 [M], sum int32 [M])."""
    if x2d.dim() != 2:
        raise ValueError(f"expected a 2-D activation [tokens, features], got shape {tuple(x2d.shape)}")
    if not ((x2d.is_cuda or _interpreting()) and triton_available()):
        return quantize_activations_reference(x2d)
    x2d = x2d.contiguous()
    return _bind_act_quant(x2d.shape[0], x2d.shape[1])(x2d)


def _bind_act_quant(m: int, k: int):
    if _interpreting():
        from ._interpreter_compat import patch_interpreter
        patch_interpreter()
    from .triton_gemm import act_quant_kernel
    launch = BoundLaunch(act_quant_kernel, (m,), BLOCK=1024, num_warps=4) if m else None

    def run(x2d):
        device = x2d.device
        xq = torch.empty(m, k, dtype=torch.int8, device=device)
        xscale = torch.empty(m, dtype=torch.float32, device=device)
        xsum = torch.empty(m, dtype=torch.int32, device=device)
        if launch is not None:
            launch(x2d, xq, xscale, xsum, k, x2d.stride(0))
        return xq, xscale, xsum
    return run


def _bind_gemm(kw: KernelWeights, m: int, act_bits: int, x_dtype: torch.dtype, bias: torch.Tensor | None,
               device, config: GemmConfig | None = None):
    """run(x_in, y, xscale, xsum): the grouped GEMM over m tokens into y [m, N]."""
    if _interpreting():
        from ._interpreter_compat import patch_interpreter
        patch_interpreter()
    from .triton_gemm import mixed_gemm_kernel
    cfg = config or pick_config(m, act_bits)
    a8 = act_bits == 8
    if a8 and not cfg.use_dot:
        raise ValueError("the 8-bit-activation path needs a tensor-core config (use_dot=True)")
    if m == 0:
        return lambda x_in, y, xscale=None, xsum=None: None
    tiles = sum(-(-rows // cfg.bn) for rows in kw.group_rows) * -(-m // cfg.bm)
    dummy = kw.scale
    if cfg.split_k > 1:
        ws, counts = split_scratch(device, tiles * cfg.split_k * cfg.bm * cfg.bn, tiles)
    else:
        ws, counts = dummy, kw.out_index
    weights = (kw.qwords, kw.qwords.view(torch.int16), kw.w16, kw.scale, kw.zero, kw.out_index, kw.meta,
               bias if bias is not None else dummy)
    has_bias = int(bias is not None)
    consts = dict(A8=a8, ZERO_FOLD=not kw.integer_zero, X_FP16=(not a8) and x_dtype == torch.float16,
                  USE_DOT=cfg.use_dot, DECODE_F32=cfg.decode_f32 or _interpreting(), BM=cfg.bm, BN=cfg.bn,
                  WB=cfg.wb, KSTEP=cfg.kstep, BK16=cfg.bk16, SPLIT_K=cfg.split_k, num_warps=cfg.num_warps,
                  num_stages=cfg.num_stages)
    launch = BoundLaunch(mixed_gemm_kernel, (tiles * cfg.split_k,), **consts)
    k = kw.in_features

    def run(x_in, y, xscale=None, xsum=None):
        launch(x_in, xscale if a8 else dummy, xsum if a8 else dummy, *weights, y, ws, counts,
               m, k, x_in.stride(0), y.stride(0), has_bias)
    return run


def launch_mixed_gemm(x_in: torch.Tensor, kw: KernelWeights, bias: torch.Tensor | None, out_dtype: torch.dtype,
                      act_bits: int, xscale: torch.Tensor | None = None, xsum: torch.Tensor | None = None,
                      config: GemmConfig | None = None, out: torch.Tensor | None = None) -> torch.Tensor:
    """One launch of the grouped GEMM over all groups of the layer; returns y [M, N] in out_dtype.

    x_in: [M, K] bf16/fp16 (act_bits=16), or int8 codes with xscale/xsum (act_bits=8).
    out: optional [M, N] contiguous tensor of out_dtype to write (every element is written).
    """
    m, k = x_in.shape
    run = _bind_gemm(kw, m, act_bits, x_in.dtype, bias, x_in.device, config)
    y = output_tensor(out, m, kw.out_features, out_dtype, x_in.device)
    if m:
        run(x_in, y, xscale, xsum)
    return y


# ---- the small-M kernel (triton_gemv.py) ----------------------------------------------------------

#: which kernel runs layers with M <= SMALL_M tokens and 16-bit activations: "auto", the default (the
#: Triton small-M kernel for one token, the grouped GEMM for 2-16), "gemv" (the Triton small-M kernel,
#: triton_gemv.py, for 1-16) or "mma" (the tensor-core CUDA kernel, cuda_gemv.py, for 1-16 where it
#: builds and runs; else the Triton small-M kernel). H200, bench/kernels/results/run11/c3/bench.log, 32-block
#: decoder: one token mma 4.59 ms, Triton 4.89, bf16 6.24; 8 tokens mma 7.47, grouped GEMM 9.24; 16
#: tokens mma 9.31, grouped GEMM 9.80. "mma" stays opt-in: its 5-19% needs nvcc on the robot and a
#: first call that builds for 40-90 s. The former choice "gemm" (the grouped GEMM at one token too)
#: is gone: it lost to the Triton small-M kernel on every layer shape and mix
#: (bench/kernels/results/run7/results_nvidia_h200_small_m.md, "Per-layer GEMMs", M = 1) and on the
#: decoder at one token ("Whole decoder" of results/run5, run6/d1, run7 and run9/results_nvidia_h200_small_m.md:
#: grouped GEMM 5.62-5.65 ms, small-M kernel 4.87-5.04 with run 5's tuned and later shipped tiles, 7.64 with
#: run 5's default tiles; run11/c3/bench.log: 4.89; NOTES "One routing table"). The environment variable
#: QVLA_SMALL_M_KERNEL sets it per process; set_small_m_kernel() at run time.
SMALL_M = 16
SMALL_M_KERNELS = ("auto", "gemv", "mma")


class KernelSwitch:
    """A kernel choice read from an environment variable at each call, which set() overrides for the
    process (set(None) goes back to the environment). Unknown names are refused either way."""

    def __init__(self, env: str, choices: tuple[str, ...], default: str, what: str):
        self.env, self.choices, self.default, self.what = env, choices, default, what
        self._override: str | None = None

    def get(self) -> str:
        choice = self._override or os.environ.get(self.env, self.default)
        if choice not in self.choices:
            raise ValueError(f"{self.env} must be one of {self.choices}, got {choice!r}")
        return choice

    def set(self, name: str | None) -> None:
        if name is not None and name not in self.choices:
            raise ValueError(f"{self.what} kernel must be one of {self.choices}, got {name!r}")
        self._override = name


_small_m_switch = KernelSwitch("QVLA_SMALL_M_KERNEL", SMALL_M_KERNELS, "auto", "small-M")


def small_m_kernel() -> str:
    return _small_m_switch.get()


def runs_small_m_kernel(m: int) -> bool:
    """Whether a 16-bit-activation layer call with m tokens goes to a small-M kernel (Triton's or
    the tensor-core one)."""
    choice = small_m_kernel()
    return m <= SMALL_M and (choice in ("gemv", "mma") or (choice == "auto" and m == 1))


def small_m_route(m: int, device: torch.device) -> str | None:
    """The kernel for a 16-bit-activation layer call with m tokens on `device`: "mma", "gemv", or
    None for the grouped GEMM."""
    if not runs_small_m_kernel(m):
        return None
    if small_m_kernel() == "mma":
        from .cuda_gemv import mma_available
        if mma_available(device.index if device.index is not None else torch.cuda.current_device()):
            return "mma"
    return "gemv"


def set_small_m_kernel(name: str | None) -> None:
    """Pick the kernel for M <= 16 tokens ("auto", "gemv" or "mma"); None goes back to the
    environment."""
    _small_m_switch.set(name)


@dataclass(frozen=True)
class GemvConfig:
    """Tile shape of the small-M kernel (triton_gemv.py).

    Args:
        bm: tokens per program: 1, 2, 4, 8 or 16 (16 with use_dot).
        bn: packed rows per program (rows of one width), a power of two >= 16.
        wb: 32-bit weight words per row per step (a power of two >= 16, and <= 128).
        bk16: input features per step of the dense 16-bit rows.
        split_k: programs sharing one row block along K (the last to arrive adds the parts).
        use_dot: tensor-core products (bm must be 16); False: float32 FMA.
        prefetch: load the next step's weight words before decoding the current ones.
        asm: decode with one LOP3 per field instead of two (inline PTX; FMA path; the Triton
            interpreter always runs the plain expression).
        num_warps, num_stages: Triton launch options (num_stages reaches only loops that do not
            name their own depth; the weight loops follow `stages`).
        stages: > 1 software-pipelines the weight loops (Triton's tl.range num_stages): stages - 1
            steps of weight words in flight as asynchronous copies to shared memory. Replaces
            prefetch (register double buffering), which must then be off.
    """
    bm: int = 1
    bn: int = 64
    wb: int = 32
    bk16: int = 64
    split_k: int = 1
    use_dot: bool = False
    prefetch: bool = True
    num_warps: int = 4
    num_stages: int = 1
    asm: bool = True
    stages: int = 1

    def __post_init__(self) -> None:
        def pow2(v):
            return v > 0 and v & (v - 1) == 0
        if self.bm not in (1, 2, 4, 8, 16):
            raise ValueError(f"bm must be 1, 2, 4, 8 or 16, got {self.bm}")
        if self.use_dot and self.bm != 16:
            raise ValueError(f"tensor-core tiles need bm=16 (tokens are the product's narrow side), got {self.bm}")
        if not pow2(self.bn) or self.bn < 16:
            raise ValueError(f"bn must be a power of two >= 16, got {self.bn}")
        if not pow2(self.wb) or not 16 <= self.wb <= 128:
            raise ValueError(f"wb must be a power of two in 16..128, got {self.wb}")
        if not pow2(self.bk16) or self.bk16 < 16:
            raise ValueError(f"bk16 must be a power of two >= 16, got {self.bk16}")
        if not 1 <= self.split_k <= 16:
            raise ValueError(f"split_k must be in 1..16, got {self.split_k}")
        if not 1 <= self.stages <= 6:
            raise ValueError(f"stages must be in 1..6, got {self.stages}")
        if self.stages > 1 and self.prefetch:
            raise ValueError("stages > 1 pipelines the weight loads itself; set prefetch=False")


#: one token: the software-pipelined tile with the least time summed over the OFT-7B shapes and the
#: avg8/avg4/avg3 mixes in bench/kernels/results/run7/results_nvidia_h200_small_m.json, key
#: "chosen_configs" -> "m1" (H200; avg4 best per shape in results_nvidia_h200_small_m.md there 9.41 /
#: 16.85 / 18.37 us); the decoder with it: 4.89 ms at one token (bench/kernels/results/run11/c3/bench.log,
#: the "ours-gemv" decoder line). 2-16 tokens: first guesses from an offline sm_90 compile (bench/kernels/
#: NOTES.md "Run 3"); no recorded result file chose them (the 16-token tiles runs 3 and 6 chose,
#: "chosen_configs" -> "m16" in results/run3 and run6/results_nvidia_h200_small_m.json, are other tiles),
#: and "auto" sends those token counts to the grouped GEMM; 2 tokens run the 4-token tiles (bm=2 tiles
#: compiled to 80-243 registers)
_GEMV_CONFIGS: dict[str, GemvConfig] = {
    "m1": GemvConfig(bm=1, bn=32, wb=32, bk16=128, split_k=4, prefetch=False, stages=4, num_warps=4),
    "m2": GemvConfig(bm=4, bn=16, wb=32, bk16=32, split_k=4, num_warps=4),
    "m4": GemvConfig(bm=4, bn=16, wb=32, bk16=32, split_k=4, num_warps=4),
    "m8": GemvConfig(bm=8, bn=16, wb=16, bk16=16, split_k=4, num_warps=4),
    "m16": GemvConfig(bm=16, bn=16, wb=32, bk16=32, split_k=4, use_dot=True, num_warps=4),
}


#: tiles timed fastest for one layer shape: (bucket, out_features, in_features) -> config; a shape
#: not listed runs its bucket's tile from _GEMV_CONFIGS. The OFT-7B (Llama-2-7B) decoder's gate/up
#: layer: 2 splits instead of 4 (least time summed over the avg8/avg4/avg3 mixes in runs 5 and 7:
#: bench/kernels/results/run5/ and run7/results_nvidia_h200_small_m.json, key "chosen_gemv_per_shape"
#: -> "m1 11008x4096")
_GEMV_SHAPE_CONFIGS: dict[tuple[str, int, int], GemvConfig] = {
    ("m1", 11008, 4096): GemvConfig(bm=1, bn=32, wb=32, bk16=128, split_k=2, prefetch=False, stages=4,
                                    num_warps=4),
}


def gemv_bucket(m: int) -> str:
    if m > SMALL_M:
        raise ValueError(f"the small-M kernel runs at most {SMALL_M} tokens, got {m}")
    for cap in (1, 2, 4, 8):
        if m <= cap:
            return f"m{cap}"
    return "m16"


def pick_gemv_config(m: int, out_features: int | None = None, in_features: int | None = None) -> GemvConfig:
    """The small-M tile for m tokens: the one tuned for this layer shape if there is one, else the
    bucket's."""
    bucket = gemv_bucket(m)
    return _GEMV_SHAPE_CONFIGS.get((bucket, out_features, in_features)) or _GEMV_CONFIGS[bucket]


def override_gemv_configs(configs: dict[str | tuple[str, int, int], GemvConfig]) -> None:
    """Replace small-M tile choices. Keys: a bucket ("m1", "m2", "m4", "m8", "m16") for every layer,
    or (bucket, out_features, in_features) for layers of one shape."""
    for key, cfg in configs.items():
        bucket = key[0] if isinstance(key, tuple) else key
        if bucket not in _GEMV_CONFIGS or (isinstance(key, tuple) and len(key) != 3):
            raise ValueError(f"unknown small-M key {key!r}: a bucket of {sorted(_GEMV_CONFIGS)}, or "
                             "(bucket, out_features, in_features)")
        if not isinstance(cfg, GemvConfig):
            raise TypeError(f"{key}: expected a GemvConfig, got {type(cfg).__name__}")
    for key, cfg in configs.items():
        if isinstance(key, tuple):
            _GEMV_SHAPE_CONFIGS[key] = cfg
        else:
            _GEMV_CONFIGS[key] = cfg


def _bind_gemv(kw: KernelWeights, m: int, x_dtype: torch.dtype, bias: torch.Tensor | None, device,
               config: GemvConfig | None = None):
    """run(x, y): the small-M kernel over m tokens (1..SMALL_M) into y [m, N]."""
    k = kw.in_features
    cfg = config or pick_gemv_config(max(m, 1), kw.out_features, k)
    if m == 0:
        return lambda x, y: None
    if _interpreting():
        from ._interpreter_compat import patch_interpreter
        patch_interpreter()
    from .layout import k_block, slot_table
    from .triton_gemv import gemv_kernel
    table = slot_table(kw.group_rows, k)
    even = sum(1 << slot for slot, bits in ((1, 8), (2, 4), (3, 3), (4, 2)) if k % k_block(bits) == 0)
    tiles = sum(-(-rows // cfg.bn) for rows in kw.group_rows) * -(-m // cfg.bm)
    dummy = kw.scale
    if cfg.split_k > 1:
        ws, counts = split_scratch(device, tiles * cfg.split_k * cfg.bm * cfg.bn, tiles)
    else:
        ws, counts = dummy, kw.out_index
    weights = (kw.qwords, kw.qwords.view(torch.int16), kw.w16, kw.scale, kw.zero, kw.out_index,
               bias if bias is not None else dummy)
    has_bias = int(bias is not None)
    groups = tuple(table[key] for key in ("r16", "r8", "r4", "r3", "r2", "r0", "o8", "o4", "o3", "o2", "h3",
                                          "n8", "n4", "n3", "n2"))
    consts = dict(BM=cfg.bm, BN=cfg.bn, WB=cfg.wb, BK16=cfg.bk16, SPLIT_K=cfg.split_k, USE_DOT=cfg.use_dot,
                  X_FP16=x_dtype == torch.float16, PREFETCH=cfg.prefetch, ASM=cfg.asm and not _interpreting(),
                  EVEN=even, STAGES=cfg.stages, num_warps=cfg.num_warps, num_stages=cfg.num_stages)
    launch = BoundLaunch(gemv_kernel, (tiles * cfg.split_k,), **consts)

    def run(x, y):
        launch(x, *weights, y, ws, counts, m, k, x.stride(0), y.stride(0), has_bias, *groups)
    return run


def launch_gemv(x: torch.Tensor, kw: KernelWeights, bias: torch.Tensor | None, out_dtype: torch.dtype,
                config: GemvConfig | None = None, out: torch.Tensor | None = None) -> torch.Tensor:
    """One launch of the small-M kernel over all groups of the layer: y [M, N] in out_dtype.

    x: [M, K] bfloat16/float16, M <= 16 (16-bit activations only). out: optional contiguous [M, N]
    tensor of out_dtype to write (every element is written)."""
    m, k = check_small_m_input(x, kw, SMALL_M, "the small-M kernel")
    run = _bind_gemv(kw, m, x.dtype, bias, x.device, config)
    y = output_tensor(out, m, kw.out_features, out_dtype, x.device)
    if m == 0:
        return y
    if x.stride(1) != 1:
        x = x.contiguous()
    run(x, y)
    return y


# ---- many tokens: decode once, then cuBLAS (triton_dequant.py) -------------------------------------

#: layers with 16-bit activations and at least DEQUANT_MIN_TOKENS tokens decode the layer to a
#: transient dense matrix, then cuBLAS multiplies. H200, bench/kernels/results/dequant2/results_nvidia_h200.md: the 32-block
#: decoder at 590 tokens 21.2 ms against 17.6 ms in bf16 (0.83x) and about 92 ms for the grouped GEMM;
#: decoding gate/up alone 34 us, 68% of its byte floor. The transient matrix adds one layer's dense
#: weight to peak memory (3.15 GiB against 2.95 GiB of packed weights for the decoder).
#: DEQUANT_MIN_TOKENS: each OFT-7B layer shape, the grouped GEMM faster at 16 tokens and slower at every
#: count timed from 24 to 64 and at 590 (bench/kernels/results/dequant2/crossover/crossover.json: the three
#: shapes summed, 109.6 / 146.6 us at 16 tokens, 163.3 / 147.4 at 24; 17-23 tokens were not timed). So the
#: former switch QVLA_LARGE_M_KERNEL=gemm (the grouped GEMM from 24 tokens on) is gone (NOTES "One
#: routing table").
DEQUANT_MIN_TOKENS = 24


def _a8_decode_min_tokens() -> int | None:
    value = os.environ.get("QVLA_A8_DECODE_MIN_TOKENS", "").strip()
    if not value or value.lower() in ("0", "off", "none"):
        return None
    if not value.isdigit():
        raise ValueError(f"QVLA_A8_DECODE_MIN_TOKENS must be a token count (or off), got {value!r}")
    return int(value)


#: layers with 8-bit activations and at least this many tokens decode the layer to int8 codes and run
#: one int8 GEMM (route "a8_decoded", _bind_a8_decoded); fewer run the grouped GEMM's int8 path. None
#: (the default): the grouped GEMM at every token count. Opt-in (QVLA_A8_DECODE_MIN_TOKENS=24) until its
#: GPU tests have passed on a card; it has run only under Triton's interpreter and the sm_90 compiler
#: (bench/kernels/NOTES.md, "8-bit activations at many tokens"). The crossover comes from
#: bench/kernels/a8_probe.py's first card run.
A8_DECODE_MIN_TOKENS: int | None = _a8_decode_min_tokens()


def runs_dequant_path(m: int) -> bool:
    """Whether a 16-bit-activation layer call with m tokens decodes the layer for cuBLAS."""
    return m >= DEQUANT_MIN_TOKENS


def _bind_dequant(kw: KernelWeights, dtype: torch.dtype = torch.bfloat16, block_rows: int = 32,
                  block_features: int = 512, num_warps: int = 4):
    """run(out=None) -> the layer's dense [N, K] weight of `dtype`, decoded by one launch (into
    `out` when given: a caller that double-buffers decodes, bench/serve/overlap_probe.py). dtype
    int8: the rows' integer codes instead (q; q - 128 at 8 bits; dense rows zero), for _bind_a8_decoded."""
    if dtype not in (torch.bfloat16, torch.float16, torch.int8):
        raise ValueError(f"dtype must be bfloat16, float16 or int8, got {dtype}")
    if block_features % 512 or block_rows < 16 or block_rows & (block_rows - 1):
        raise ValueError("block_features must be a multiple of 512 and block_rows a power of two >= 16")
    if _interpreting():
        from ._interpreter_compat import patch_interpreter
        patch_interpreter()
    from .layout import slot_table
    from .triton_dequant import dequant_kernel
    n, k = kw.out_features, kw.in_features
    device = kw.qwords.device
    table = slot_table(kw.group_rows, k)
    tiles = sum(-(-rows // block_rows) for rows in kw.group_rows)
    launch = BoundLaunch(dequant_kernel, (tiles, -(-k // block_features)), BN=block_rows, KC=block_features,
                         CODES=dtype == torch.int8, num_warps=num_warps)
    weights = (kw.qwords, kw.qwords.view(torch.int16), kw.w16, kw.scale, kw.zero, kw.out_index)
    groups = tuple(table[key] for key in ("r16", "r8", "r4", "r3", "r2", "r0", "o8", "o4", "o3", "o2", "h3",
                                          "n8", "n4", "n3", "n2"))

    def run(out: torch.Tensor | None = None):
        if out is None:
            w = torch.empty(n, k, dtype=dtype, device=device)
        elif out.shape != (n, k) or out.dtype != dtype or not out.is_contiguous():
            raise ValueError(f"decode buffer must be a contiguous [{n}, {k}] {dtype} tensor, got "
                             f"{out.dtype} {tuple(out.shape)}")
        else:
            w = out
        launch(*weights, w, k, w.stride(0), *groups)
        return w
    return run


def launch_dequant(kw: KernelWeights, dtype: torch.dtype = torch.bfloat16, block_rows: int = 32,
                   block_features: int = 512, num_warps: int = 4) -> torch.Tensor:
    """The layer's weight as a dense [N, K] matrix of `dtype` (bfloat16/float16) in output-channel
    order, pruned channels zero: one launch over every group."""
    return _bind_dequant(kw, dtype, block_rows, block_features, num_warps)()


def dequant_linear(x: torch.Tensor, kw: KernelWeights, bias: torch.Tensor | None) -> torch.Tensor:
    """y = x W^T + bias with W decoded for this call only (x: [M, K] bfloat16/float16)."""
    w = launch_dequant(kw, x.dtype)
    return torch.nn.functional.linear(x, w, None if bias is None else bias.to(x.dtype))


@dataclass(frozen=True)
class A8Channels:
    """Per output channel, what the decoded-codes A8 GEMM's epilogue needs (_bind_a8_decoded): the weight
    scale (0 for pruned channels), the zero-point term c (-zero; 128 - zero at 8 bits, whose codes
    are stored shifted) and the dense row each 16-bit channel takes from y16 (-1 for the others).
    12 bytes a channel, built once per layer by PreparedLinear's first bind of the route and held
    beside its weights."""
    scale: torch.Tensor
    corr: torch.Tensor
    dense: torch.Tensor

    @classmethod
    def of(cls, kw: KernelWeights) -> "A8Channels":
        from .layout import SLOT_BITS
        n, kept, device = kw.out_features, kw.kept_rows, kw.device
        channel = kw.out_index[:kept].long()
        scale = torch.zeros(n, dtype=torch.float32, device=device)
        corr = torch.zeros(n, dtype=torch.float32, device=device)
        dense = torch.full((n,), -1, dtype=torch.int32, device=device)
        if kept:
            shift = torch.zeros(kept, dtype=torch.float32, device=device)
            r16, r8 = kw.group_rows[SLOT_BITS.index(16)], kw.group_rows[SLOT_BITS.index(8)]
            shift[r16:r16 + r8] = 128.0  # packed rows are in slot order: 16, 8, 4, 3, 2 bits
            quantized = torch.ones(kept, dtype=torch.bool, device=device)
            quantized[:r16] = False
            scale[channel] = torch.where(quantized, kw.scale.float(), torch.zeros_like(shift))
            corr[channel] = torch.where(quantized, shift - kw.zero.float(), torch.zeros_like(shift))
            dense[channel[:r16]] = torch.arange(r16, dtype=torch.int32, device=device)
        return cls(scale, corr, dense)


#: tile of the decoded-codes A8 GEMM: (BM, BN, BK, GROUP_M, num_warps, num_stages). Placeholder until the first
#: card run of bench/kernels/a8_probe.py picks one.
A8_GEMM_TILE = (128, 128, 128, 8, 8, 4)


def _bind_a8_decoded(kw: KernelWeights, m: int, y_dtype: torch.dtype, bias: torch.Tensor | None,
                     channels: A8Channels | None = None, tile: tuple[int, ...] | None = None):
    """call(x2) -> y [m, N] of y_dtype: per-token int8 activations, the layer decoded to int8 codes
    (one launch), then one int8 tensor-core GEMM with everything else in its epilogue (triton_a8.py);
    dense rows by cuBLAS on the activation codes. The same numbers as the grouped GEMM's A8 path."""
    if _interpreting():
        from ._interpreter_compat import patch_interpreter
        patch_interpreter()
    from .layout import SLOT_BITS
    from .triton_a8 import a8_gemm_kernel
    n, k, device = kw.out_features, kw.in_features, kw.device
    ch = channels or A8Channels.of(kw)
    bm, bn, bk, group_m, warps, stages = tile or A8_GEMM_TILE
    quant, decode = _bind_act_quant(m, k), _bind_dequant(kw, torch.int8)
    r16 = kw.group_rows[SLOT_BITS.index(16)]
    w16 = kw.w16 if r16 else None
    launch = BoundLaunch(a8_gemm_kernel, (-(-m // bm) * -(-n // bn),), HAS_DENSE=bool(r16), HAS_BIAS=bias is not None,
                         BM=bm, BN=bn, BK=bk, GROUP_M=group_m, num_warps=warps, num_stages=stages)
    no_bias = ch.scale  # any float32 tensor: the kernel does not read it without HAS_BIAS

    def call(x2, out=None):
        y = output_tensor(out, m, n, y_dtype, device)
        if not m:
            return y
        xq, xscale, xsum = quant(x2)
        codes = decode()
        # int8 codes are exact in bf16; the dense rows' products in bf16, scaled by s_x in the epilogue
        y16 = torch.mm(xq.to(torch.bfloat16), w16.T) if w16 is not None else y
        launch(xq, codes, xscale, xsum, ch.scale, ch.corr, ch.dense, y16, no_bias if bias is None else bias, y,
               m, n, k, y16.stride(0))
        return y
    return call


def launch_a8_decoded(x: torch.Tensor, kw: KernelWeights, bias: torch.Tensor | None = None,
                      tile: tuple[int, ...] | None = None, out_dtype: torch.dtype | None = None,
                      out: torch.Tensor | None = None) -> torch.Tensor:
    """y = x W^T + bias with 8-bit activations through the decoded-codes GEMM (x: [M, K] bf16/fp16;
    y in x's dtype, or out_dtype: float32 shows the kernel's own error, below bf16's rounding;
    written into `out` when given)."""
    if x.dim() != 2 or x.dtype not in (torch.bfloat16, torch.float16) or x.shape[1] != kw.in_features:
        raise ValueError(f"x must be a 2-D bfloat16/float16 [M, {kw.in_features}] tensor, got {x.dtype} "
                         f"{tuple(x.shape)}")
    b = None if bias is None else bias.detach().to(device=kw.device, dtype=torch.float32)
    return _bind_a8_decoded(kw, x.shape[0], out_dtype or x.dtype, b, tile=tile)(x.contiguous(), out)


# ---- the routing table: one function -------------------------------------------------------------

#: the kernels route() names
ROUTES = ("gemm_a8", "a8_decoded", "mma", "gemv", "gemm", "dequant")


def route(m: int, act_bits: int, device: torch.device) -> str:
    """The kernel a CUDA layer call with m tokens runs (the whole routing table; README "Which GPU
    kernel runs a quantized layer", measurements in bench/kernels/NOTES.md):

    * 8-bit activations: "gemm_a8", the grouped GEMM's int8 path after the per-token activation
      quantization; with A8_DECODE_MIN_TOKENS set (opt-in), from that many tokens "a8_decoded", the
      layer decoded to int8 codes and one int8 GEMM (triton_a8.py);
    * 16-bit, m <= SMALL_M: small_m_route() ("gemv" for one token by default; QVLA_SMALL_M_KERNEL);
    * 16-bit, m >= DEQUANT_MIN_TOKENS: "dequant", decode-then-cuBLAS;
    * everything else (2-23 tokens by default): "gemm", the grouped GEMM.
    """
    if act_bits == 8:
        return "a8_decoded" if A8_DECODE_MIN_TOKENS is not None and m >= A8_DECODE_MIN_TOKENS else "gemm_a8"
    if m <= SMALL_M:
        return small_m_route(m, device) or "gemm"
    return "dequant" if runs_dequant_path(m) else "gemm"


def _bind_route(kind: str, kw: KernelWeights, m: int, x_dtype: torch.dtype, bias: torch.Tensor | None,
                bias_x: torch.Tensor | None, device, a8_channels: A8Channels | None = None):
    """call(x2) -> y [m, N] in x2's dtype, for contiguous [m, K] inputs of x_dtype: everything that
    does not change between calls is decided here, once. bias: float32 [N]; bias_x: the same in x_dtype
    (what cuBLAS adds after the decode); a8_channels: the layer's A8Channels where already built."""
    n = kw.out_features
    if kind == "a8_decoded":
        call = _bind_a8_decoded(kw, m, x_dtype, bias, a8_channels)
    elif kind == "gemm_a8":
        quant, gemm = _bind_act_quant(m, kw.in_features), _bind_gemm(kw, m, 8, torch.int8, bias, device)

        def call(x2):
            xq, xscale, xsum = quant(x2)
            y = torch.empty(m, n, dtype=x_dtype, device=device)
            if m:
                gemm(xq, y, xscale, xsum)
            return y
    elif kind == "mma":
        from .cuda_gemv import launch_mma_gemv

        def call(x2):
            return launch_mma_gemv(x2, kw, bias, x_dtype)
    elif kind in ("gemv", "gemm"):
        run = (_bind_gemv(kw, m, x_dtype, bias, device) if kind == "gemv"
               else _bind_gemm(kw, m, 16, x_dtype, bias, device))

        def call(x2):
            y = torch.empty(m, n, dtype=x_dtype, device=device)
            if m:
                run(x2, y)
            return y
    elif kind == "dequant":
        decode = _bind_dequant(kw, x_dtype)

        def call(x2):
            return torch.nn.functional.linear(x2, decode(), bias_x)
    else:
        raise ValueError(f"unknown route {kind!r}; known: {ROUTES}")
    return call


def _run_kernels(x2: torch.Tensor, kw: KernelWeights, bias: torch.Tensor | None, act_bits: int) -> torch.Tensor:
    """y [M, N] for a contiguous CUDA x2 [M, K] of bfloat16/float16, routed and bound for this call."""
    m = x2.shape[0]
    bias_x = None if bias is None else bias.to(x2.dtype)
    return _bind_route(route(m, act_bits, x2.device), kw, m, x2.dtype, bias, bias_x, x2.device)(x2)


def _weights_from(qwords, w16, scale, zero, out_index, meta, group_rows, out_features, in_features,
                  integer_zero) -> KernelWeights:
    return KernelWeights(int(out_features), int(in_features), qwords, w16, scale, zero, out_index, meta,
                         tuple(int(r) for r in group_rows), bool(integer_zero))


@torch.library.custom_op("qvla::mixed_bit_linear", mutates_args=())
def mixed_bit_linear_op(x: torch.Tensor, qwords: torch.Tensor, w16: torch.Tensor, scale: torch.Tensor,
                        zero: torch.Tensor, out_index: torch.Tensor, meta: torch.Tensor,
                        bias: Optional[torch.Tensor], group_rows: List[int], out_features: int,
                        act_bits: int, integer_zero: bool) -> torch.Tensor:
    """y [..., N] = x W^T + bias for a layer in the kernel layout (see kernels/layout.py)."""
    kw = _weights_from(qwords, w16, scale, zero, out_index, meta, group_rows, out_features, x.shape[-1],
                       integer_zero)
    if not (x.is_cuda and triton_available()):
        return mixed_bit_linear_reference(x, kw, bias, act_bits)
    x2 = x.reshape(-1, x.shape[-1])
    if not x2.is_contiguous():
        x2 = x2.contiguous()
    return _run_kernels(x2, kw, bias, act_bits).reshape(*x.shape[:-1], out_features)


@mixed_bit_linear_op.register_fake
def _mixed_bit_linear_fake(x, qwords, w16, scale, zero, out_index, meta, bias, group_rows, out_features,
                           act_bits, integer_zero):
    return x.new_empty((*x.shape[:-1], out_features))


def _check_call(x: torch.Tensor, weights: KernelWeights, bias: torch.Tensor | None, act_bits: int) -> int:
    act_bits = check_act_bits(act_bits)
    if not isinstance(weights, KernelWeights):
        raise TypeError(f"weights must be a KernelWeights (see prepare_packed), got {type(weights).__name__}")
    if x.shape[-1] != weights.in_features:
        raise ValueError(f"input has {x.shape[-1]} features, the layer expects {weights.in_features}")
    if x.device != weights.device:
        raise ValueError(f"input on {x.device} but the layer's weights on {weights.device}")
    if not x.is_floating_point():
        raise ValueError(f"input must be floating point, got {x.dtype}")
    if bias is not None and bias.shape != (weights.out_features,):
        raise ValueError(f"bias must have shape ({weights.out_features},), got {tuple(bias.shape)}")
    return act_bits


def mixed_bit_linear(x: torch.Tensor, weights: KernelWeights, bias: torch.Tensor | None = None,
                     act_bits: int = 16) -> torch.Tensor:
    """y = x W^T + bias for a mixed-bit layer (weights from prepare_packed, on x's device).

    CUDA: the kernel route() names for this many tokens (one or two launches; from DEQUANT_MIN_TOKENS
    tokens on with 16-bit activations, one launch decodes the layer and cuBLAS multiplies). float32
    inputs run in bfloat16 and come back as float32. CPU: the plain-torch model of the same arithmetic
    (kernels/reference.py). A layer called again and again is faster through PreparedLinear, which
    decides all this once (what MixedBitLinear does).
    """
    act_bits = _check_call(x, weights, bias, act_bits)
    run_dtype = x.dtype
    if x.is_cuda and x.dtype not in (torch.bfloat16, torch.float16):
        run_dtype = torch.bfloat16
    y = torch.ops.qvla.mixed_bit_linear(
        x.to(run_dtype), weights.qwords, weights.w16, weights.scale, weights.zero, weights.out_index,
        weights.meta, None if bias is None else bias.to(torch.float32), list(weights.group_rows),
        weights.out_features, act_bits, weights.integer_zero)
    return y.to(x.dtype)


# ---- one layer, prepared once: the lean per-call path ---------------------------------------------

class PreparedLinear:
    """A mixed-bit layer with everything that depends only on the layer decided at load time.

    `PreparedLinear(weights, bias, act_bits)(x)` computes what `mixed_bit_linear(x, weights, bias,
    act_bits)` computes, bit for bit, but the checks on the layer, the float32 bias (and its copy in
    the activations' dtype for cuBLAS), the operator's argument list and, per token count and dtype,
    the route with its tile, grid, group table and split-K scratch are made once; a call then costs a
    dictionary lookup and the launches. Eager calls go straight to the bound launches; under
    torch.compile the call goes through the registered `qvla::mixed_bit_linear` operator. The caller
    guarantees x is floating point, on the weights' device, with in_features features
    (MixedBitLinear.forward checks this before its fast path).
    """

    #: bound routes kept per layer (distinct token counts and dtypes); the table is emptied when full
    MAX_BOUND = 64

    __slots__ = ("kw", "bias", "act_bits", "device", "in_features", "out_features", "_bias_x", "_bound",
                 "_op_args", "_a8_channels")

    def __init__(self, weights: KernelWeights, bias: torch.Tensor | None = None, act_bits: int = 16):
        self.act_bits = check_act_bits(act_bits)
        if not isinstance(weights, KernelWeights):
            raise TypeError(f"weights must be a KernelWeights (see prepare_packed), got {type(weights).__name__}")
        n = weights.out_features
        if bias is not None and bias.shape != (n,):
            raise ValueError(f"bias must have shape ({n},), got {tuple(bias.shape)}")
        self.kw, self.device = weights, weights.device
        self.in_features, self.out_features = weights.in_features, n
        self.bias = None if bias is None else bias.detach().to(device=self.device, dtype=torch.float32)
        self._bias_x: dict[torch.dtype, torch.Tensor | None] = {}
        self._bound: dict[tuple, object] = {}
        self._a8_channels: A8Channels | None = None  # built by the first bind of route "a8_decoded"
        self._op_args = (weights.qwords, weights.w16, weights.scale, weights.zero, weights.out_index, weights.meta,
                         self.bias, list(weights.group_rows), n, self.act_bits, weights.integer_zero)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if not (x.is_cuda and triton_available()):
            return mixed_bit_linear_reference(x, self.kw, self.bias, self.act_bits)
        dtype = x.dtype
        run_dtype = dtype if dtype in (torch.bfloat16, torch.float16) else torch.bfloat16
        if torch.compiler.is_compiling():
            return torch.ops.qvla.mixed_bit_linear(x.to(run_dtype), *self._op_args).to(dtype)
        lead = x.shape[:-1]
        x2 = (x if run_dtype is dtype else x.to(run_dtype)).reshape(-1, self.in_features)
        if not x2.is_contiguous():
            x2 = x2.contiguous()
        m = x2.shape[0]
        key = (m, run_dtype, _small_m_switch.get()) if m <= SMALL_M else (m, run_dtype)
        call = self._bound.get(key)
        if call is None:
            call = self._bind(key, m, run_dtype)
        y = call(x2).reshape(*lead, self.out_features)
        return y if run_dtype is dtype else y.to(dtype)

    def _bind(self, key: tuple, m: int, run_dtype: torch.dtype):
        if run_dtype not in self._bias_x:
            self._bias_x[run_dtype] = None if self.bias is None else self.bias.to(run_dtype)
        kind = route(m, self.act_bits, self.device)
        if kind == "a8_decoded" and self._a8_channels is None:
            # Once per layer, and only where the route runs (it is opt-in): 12 bytes a channel held
            # beside the weights. Not inside a CUDA-graph capture, where its torch ops would only be
            # recorded and an eager call before the first replay would read garbage.
            if torch.cuda.is_current_stream_capturing():
                raise RuntimeError("the decoded-codes A8 route builds its channel table on its first call, "
                                   "which cannot happen during CUDA graph capture; run the layer once at this "
                                   "token count before capturing")
            self._a8_channels = A8Channels.of(self.kw)
        call = _bind_route(kind, self.kw, m, run_dtype, self.bias, self._bias_x[run_dtype], self.device,
                           self._a8_channels)
        if len(self._bound) >= self.MAX_BOUND:
            self._bound.clear()
        self._bound[key] = call
        return call
