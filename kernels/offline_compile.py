"""Compile the small-M kernel (and the decode-for-cuBLAS kernel) for a GPU architecture on a machine
without a GPU, and read back what the assembler made of it: registers per thread, spills, shared
memory, instruction count, store widths.

Triton's CPU interpreter checks the kernels' arithmetic but not that they compile: the compiler
refuses things the interpreter runs (e.g. early returns of differing types), and register counts
decide occupancy, the figure run 2 missed on (161 registers, 18.75% theoretical occupancy:
bench/kernels/results/run2_h200/ncu.txt). Triton ships ptxas and
cuobjdump, so both checks run here.

    from qvla_ros.kernels.offline_compile import compile_gemv
    compile_gemv(GemvConfig(bm=1, bn=32))  # {'registers': 77, 'spill_bytes': 0, ...}
"""
from __future__ import annotations

import os
import re
import subprocess
import tempfile
from pathlib import Path

from .ops import GemvConfig

_POINTERS = ("x_ptr", "w_ptr", "wh_ptr", "w16_ptr", "scale_ptr", "zero_ptr", "out_index_ptr", "bias_ptr", "y_ptr",
             "ws_ptr", "count_ptr")
_POINTER_TYPES = ("*{x}", "*i32", "*i16", "*bf16", "*fp32", "*fp32", "*i32", "*fp32", "*{x}", "*fp32", "*i32")
_INTS = ("M", "K", "stride_xm", "stride_ym", "has_bias", "r16", "r8", "r4", "r3", "r2", "r0", "o8", "o4", "o3",
         "o2", "h3", "n8", "n4", "n3", "n2")
#: the integers the launcher passes that Triton sees as multiples of 16 for the OFT-7B shapes
_DIVISIBLE = ("K", "stride_xm", "stride_ym")


def _cuobjdump() -> str:
    import triton.backends.nvidia as nvidia

    tool = Path(nvidia.__file__).parent / "bin" / "cuobjdump"
    if not tool.is_file():
        raise FileNotFoundError(f"Triton's cuobjdump is missing ({tool})")
    return str(tool)


def resources_and_sass(kernel) -> tuple[int, int, int, str]:
    """(registers per thread, static shared bytes, local (spill) bytes, SASS listing) of a compiled
    Triton kernel, read from its cubin with cuobjdump."""
    with tempfile.TemporaryDirectory() as tmp:
        cubin = os.path.join(tmp, "kernel.cubin")
        with open(cubin, "wb") as f:
            f.write(kernel.asm["cubin"])
        usage = subprocess.run([_cuobjdump(), "--dump-resource-usage", cubin], capture_output=True, text=True,
                               check=True).stdout
        sass = subprocess.run([_cuobjdump(), "-sass", cubin], capture_output=True, text=True, check=True).stdout
    found = re.search(r"REG:(\d+).*?SHARED:(\d+).*?LOCAL:(\d+)", usage)
    if not found:
        raise RuntimeError(f"no resource usage in cuobjdump's output: {usage[:500]}")
    registers, shared, local = (int(v) for v in found.groups())
    return registers, shared, local, sass


def sass_loops(sass: str) -> list[dict]:
    """Every loop of a SASS listing (a backward branch and the code it jumps over): instructions,
    float32 FMAs, tensor-core ops, global loads into registers, asynchronous global-to-shared copies
    (the software pipeline's), shared-memory loads/stores and barriers."""
    code = []
    for line in sass.splitlines():
        m = re.match(r"\s+/\*([0-9a-f]{4,})\*/\s+(?:@!?U?P\w+\s+)?([A-Z][A-Z0-9_.]*)\s*([^;]*);", line)
        if m:
            code.append((int(m.group(1), 16), m.group(2), m.group(3)))
    loops = []
    for addr, op, args in code:
        if op != "BRA":
            continue
        target = int(args.split()[0].rstrip(","), 16)
        if target >= addr:
            continue
        body = [o for a, o, _ in code if target <= a <= addr]
        loops.append({"instructions": len(body), "ffma": sum(o == "FFMA" for o in body),
                      "mma": sum(o.startswith(("HMMA", "HGMMA")) for o in body),
                      "ldg": sum(o.startswith("LDG") and not o.startswith("LDGSTS") for o in body),
                      "ldgsts": sum(o.startswith("LDGSTS") for o in body),
                      "lds": sum(o.startswith(("LDS", "LDSM")) for o in body),
                      "sts": sum(o.startswith("STS") for o in body),
                      "bar": sum(o.startswith("BAR") for o in body)})
    return loops


def compile_gemv(config: GemvConfig, x_dtype: str = "bf16", arch: int = 90, in_features: int = 4096) -> dict:
    """Compile gemv_kernel with `config` for sm_{arch} and layers of `in_features` inputs (which
    widths see whole K-blocks: 4096 all, 11008 the 8- and 4-bit ones); resource usage from the cubin.

    Returns registers (per thread), spill_bytes (local memory), shared_bytes, sass_instructions,
    blocks_per_sm (by registers alone, 64K registers per SM), loops (sass_loops) and ttgir (the
    layouts Triton chose)."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from .layout import k_block
    from .triton_gemv import gemv_kernel

    if x_dtype not in ("bf16", "fp16"):
        raise ValueError(f"x_dtype must be bf16 or fp16, got {x_dtype!r}")
    names = gemv_kernel.arg_names
    signature = {name: kind.format(x=x_dtype) for name, kind in zip(_POINTERS, _POINTER_TYPES)}
    signature.update({name: "i32" for name in _INTS})
    constants = dict(BM=config.bm, BN=config.bn, WB=config.wb, BK16=config.bk16, SPLIT_K=config.split_k,
                     USE_DOT=config.use_dot, X_FP16=x_dtype == "fp16", PREFETCH=config.prefetch, ASM=config.asm,
                     STAGES=config.stages, EVEN=sum(1 << slot for slot, bits in ((1, 8), (2, 4), (3, 3), (4, 2))
                              if in_features % k_block(bits) == 0))
    signature.update({name: "constexpr" for name in constants})
    attrs = {(names.index(name),): [["tt.divisibility", 16]] for name in _POINTERS + _DIVISIBLE}
    kernel = triton.compile(ASTSource(gemv_kernel, signature, constants, attrs),
                            target=GPUTarget("cuda", arch, 32),
                            options=dict(num_warps=config.num_warps, num_stages=config.num_stages))
    registers, shared, local, sass = resources_and_sass(kernel)
    threads = 32 * config.num_warps
    per_block = -(-registers // 8) * 8 * threads  # registers are allocated 8 per thread at a time
    return {"registers": registers, "spill_bytes": local, "shared_bytes": shared,
            "sass_instructions": sum(1 for line in sass.splitlines() if re.match(r"\s+/\*[0-9a-f]{4,}\*/", line)),
            "blocks_per_sm": min(32, 65536 // per_block), "loops": sass_loops(sass), "ttgir": kernel.asm["ttgir"]}


def compile_dequant(block_rows: int = 32, block_features: int = 512, w_dtype: str = "bf16", arch: int = 90,
                    num_warps: int = 4) -> dict:
    """Compile triton_dequant.dequant_kernel for sm_{arch} (K and the row stride multiples of 16, as
    for the OFT-7B shapes): registers, spills and the widths of its global stores (SASS opcode ->
    count, e.g. {"STG.E.128": 24})."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from .triton_dequant import dequant_kernel

    if w_dtype not in ("bf16", "fp16", "i8"):
        raise ValueError(f"w_dtype must be bf16, fp16 or i8 (codes), got {w_dtype!r}")
    pointers = dict(w_ptr="*i32", wh_ptr="*i16", w16_ptr="*bf16", scale_ptr="*fp32", zero_ptr="*fp32",
                    out_index_ptr="*i32", W_ptr="*" + w_dtype)
    signature = dict(pointers)
    signature.update({name: "i32" for name in ("K", "stride_w", "r16", "r8", "r4", "r3", "r2", "r0", "o8", "o4",
                                               "o3", "o2", "h3", "n8", "n4", "n3", "n2")})
    constants = dict(BN=block_rows, KC=block_features, CODES=w_dtype == "i8")
    signature.update({name: "constexpr" for name in constants})
    names = dequant_kernel.arg_names
    attrs = {(names.index(name),): [["tt.divisibility", 16]] for name in list(pointers) + ["K", "stride_w"]}
    kernel = triton.compile(ASTSource(dequant_kernel, signature, constants, attrs),
                            target=GPUTarget("cuda", arch, 32), options=dict(num_warps=num_warps))
    registers, _, local, sass = resources_and_sass(kernel)
    stores: dict[str, int] = {}
    for op in re.findall(r"\s(STG\.[A-Z0-9.]+)", sass):
        stores[op] = stores.get(op, 0) + 1
    return {"registers": registers, "spill_bytes": local, "stores": stores}


def compile_a8_gemm(tile: tuple[int, ...], arch: int = 90, dense: bool = True, bias: bool = True) -> dict:
    """Compile triton_a8.a8_gemm_kernel with tile (BM, BN, BK, GROUP_M, warps, stages) for sm_{arch}
    (K a multiple of 16, as for the OFT-7B shapes): registers, spills, shared memory and the
    tensor-core instructions of its SASS (opcode -> count; Hopper's int8 wgmma is IGMMA)."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from .triton_a8 import a8_gemm_kernel

    bm, bn, bk, group_m, warps, stages = tile
    pointers = dict(x_ptr="*i8", w_ptr="*i8", xscale_ptr="*fp32", xsum_ptr="*i32", wscale_ptr="*fp32",
                    wcorr_ptr="*fp32", dense_ptr="*i32", y16_ptr="*bf16", bias_ptr="*fp32", y_ptr="*bf16")
    signature = dict(pointers)
    signature.update({name: "i32" for name in ("M", "N", "K", "stride_y16")})
    constants = dict(HAS_DENSE=dense, HAS_BIAS=bias, BM=bm, BN=bn, BK=bk, GROUP_M=group_m)
    signature.update({name: "constexpr" for name in constants})
    names = a8_gemm_kernel.arg_names
    attrs = {(names.index(name),): [["tt.divisibility", 16]] for name in list(pointers) + ["K"]}
    kernel = triton.compile(ASTSource(a8_gemm_kernel, signature, constants, attrs),
                            target=GPUTarget("cuda", arch, 32), options=dict(num_warps=warps, num_stages=stages))
    registers, shared, local, sass = resources_and_sass(kernel)
    mma: dict[str, int] = {}
    for op in re.findall(r"\s((?:IGMMA|HGMMA|QGMMA|IMMA|HMMA)[A-Z0-9._]*)", sass):
        mma[op] = mma.get(op, 0) + 1
    return {"registers": registers, "spill_bytes": local, "shared_bytes": max(shared, kernel.metadata.shared),
            "tensor_core_ops": mma}
