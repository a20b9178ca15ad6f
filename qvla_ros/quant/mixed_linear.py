"""`MixedBitLinear`: an nn.Linear replacement holding really packed mixed-bit rows.

On CUDA inputs the forward runs the grouped GEMM of `qvla_ros.kernels` (its layout is built from
these buffers once). The buffers follow the layout of `qvla_ros.quant.packing` (read its docstring first):

    row_index            int32    [N_kept]
    g{b}_qweight         uint8    [R_b, Kp*b/8]   b in {8, 4, 2};  b = 3: [R_3, Kp/4] (low 2 bits)
    g3_qweight_hi        uint8    [R_3, Kp/8]     (high bit plane)
    g{b}_scale, g{b}_zero float16 [R_b]           b in {8, 4, 3, 2}
    g16_weight           bfloat16 [R_16, K]
    bias                 float32  [N]             (when the Linear had one)

Only the widths present in the layer have buffers. The forward below is the CPU path and the
correctness oracle for the GPU kernels: dequantize the groups, one matmul over the kept rows,
scatter the results to their original channels; pruned channels output the bias (or 0).

One copy of the weights: once the kernels' layout of a layer lives on a CUDA device (the module was
moved there, or a CUDA input arrived), it is the only copy. The packed buffers above become
meta-device placeholders (same names, shapes and dtypes, so state_dict keys and repr do not
change; packed_nbytes then reports the kernel layout's bytes, what is resident) and are rebuilt
bit for bit from the kernel layout whenever something needs them: state_dict, load_state_dict,
groups()/dequantize(), or moving the module elsewhere.
`to_kernel_layout()` does the same on any device (CPU included).
"""
from __future__ import annotations

from typing import Mapping

import torch
from torch import nn

from .packing import (DEFAULT_ROW_TILE, GROUP_ORDER, PackedGroup, PackedWeight, bit_counts,
                      padded_in_features)
from .quantizer import ACT_BITS, check_bits, fake_quantize_activations

_PARTS = ("qweight", "qweight_hi", "scale", "zero", "weight")


def _group_shapes(bits: int, rows: int, in_features: int) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
    """Shapes and dtypes of one group's buffers (the layout contract, in one place)."""
    kp = padded_in_features(in_features)
    if bits == 16:
        return {"weight": ((rows, in_features), torch.bfloat16)}
    shapes = {"scale": ((rows,), torch.float16), "zero": ((rows,), torch.float16)}
    if bits == 3:
        shapes["qweight"] = ((rows, kp // 4), torch.uint8)
        shapes["qweight_hi"] = ((rows, kp // 8), torch.uint8)
    else:
        shapes["qweight"] = ((rows, kp * bits // 8), torch.uint8)
    return shapes


class MixedBitLinear(nn.Module):
    """y = x W^T + b with each output row of W stored at its own bit-width (0, 2, 3, 4, 8 or 16).

    Build one from a trained Linear with `from_linear`, or an empty one of the right shapes with
    `empty` (to load a saved state_dict into). `act_bits=8` quantizes each input token to int8
    with its own scale before the matmul (the 8-bit-activation path of the kernels).
    """

    def __init__(self, in_features: int, out_features: int, counts: Mapping[int, int], *,
                 bias: bool = True, act_bits: int = 16, row_tile: int = DEFAULT_ROW_TILE):
        super().__init__()
        self.in_features = int(in_features)
        self.out_features = int(out_features)
        self.act_bits = check_bits(act_bits, ACT_BITS)
        self.row_tile = int(row_tile)
        counts = {check_bits(b): int(n) for b, n in counts.items()}
        if sum(counts.values()) != self.out_features:
            raise ValueError(f"row counts {counts} do not add up to out_features={self.out_features}")
        #: (bits, rows) of each stored group, in packed order
        self.group_layout: tuple[tuple[int, int], ...] = tuple(
            (b, counts[b]) for b in GROUP_ORDER if counts.get(b, 0) > 0)
        kept = sum(n for _, n in self.group_layout)
        self.register_buffer("row_index", torch.zeros(kept, dtype=torch.int32))
        for b, rows in self.group_layout:
            for part, (shape, dtype) in _group_shapes(b, rows, self.in_features).items():
                self.register_buffer(f"g{b}_{part}", torch.zeros(shape, dtype=dtype))
        if bias:
            self.register_buffer("bias", torch.zeros(self.out_features, dtype=torch.float32))
        else:
            self.bias = None
        self.cache_dequantized = False
        self._dequant_cache: torch.Tensor | None = None
        self._kernel_weights = None  # qvla_ros.kernels.KernelWeights, built on first CUDA forward
        #: qvla_ros.kernels.PreparedLinear over the kernel layout, the bias and act_bits (the lean
        #: per-call path), built with the kernel layout; _prepared_bias is the bias buffer it was
        #: built from (a replaced buffer or act_bits sends forward back to the slow path, which
        #: rebuilds it)
        self._prepared = None
        self._prepared_bias = None

    # ---- construction -------------------------------------------------------------------------
    @classmethod
    def empty(cls, in_features: int, out_features: int, bits_per_row, *, bias: bool = True,
              act_bits: int = 16, row_tile: int = DEFAULT_ROW_TILE) -> "MixedBitLinear":
        """A module with the buffers of this bit assignment, all zero (for load_state_dict)."""
        bits = torch.as_tensor(bits_per_row)
        if bits.numel() != out_features:
            raise ValueError(f"bits_per_row has {bits.numel()} entries for {out_features} output channels")
        return cls(in_features, out_features, bit_counts(bits), bias=bias, act_bits=act_bits, row_tile=row_tile)

    @classmethod
    def from_linear(cls, linear: nn.Linear, bits_per_row, act_bits: int = 16,
                    row_tile: int = DEFAULT_ROW_TILE) -> "MixedBitLinear":
        """Quantize and pack `linear`'s weight, one width per output channel."""
        if not isinstance(linear, nn.Linear):
            raise TypeError(f"from_linear expects an nn.Linear, got {type(linear).__name__}")
        packed = PackedWeight.from_weight(linear.weight, bits_per_row, row_tile=row_tile)
        module = cls.from_packed(packed, bias=linear.bias, act_bits=act_bits, row_tile=row_tile)
        return module.to(linear.weight.device)

    @classmethod
    def from_packed(cls, packed: PackedWeight, bias: torch.Tensor | None = None, act_bits: int = 16,
                    row_tile: int = DEFAULT_ROW_TILE) -> "MixedBitLinear":
        counts = {g.bits: g.rows for g in packed.groups}
        counts[0] = packed.out_features - packed.kept_rows
        with torch.device(packed.row_index.device):   # built where the packed rows are
            module = cls(packed.in_features, packed.out_features, counts, bias=bias is not None,
                         act_bits=act_bits, row_tile=row_tile)
        module.row_index.copy_(packed.row_index)
        for g in packed.groups:
            for part, tensor in g.tensors().items():
                getattr(module, f"g{g.bits}_{part}").copy_(tensor)
        if bias is not None:
            module.bias.copy_(bias.detach().to(torch.float32))
        return module

    # ---- views of the packed data -------------------------------------------------------------
    def groups(self) -> list[PackedGroup]:
        """The stored groups as PackedGroup views of this module's buffers (no copies; rebuilt from
        the kernel layout while that is the only copy)."""
        return self._groups_from(self._contract_buffers())

    def _groups_from(self, buffers: Mapping[str, torch.Tensor]) -> list[PackedGroup]:
        out, start = [], 0
        for b, rows in self.group_layout:
            parts = {p: buffers[f"g{b}_{p}"] for p in _PARTS if f"g{b}_{p}" in buffers}
            out.append(PackedGroup(bits=b, start=start, rows=rows, in_features=self.in_features, **parts))
            start += rows
        return out

    def packed_weight(self) -> PackedWeight:
        buffers = self._contract_buffers()
        return PackedWeight(self.out_features, self.in_features, buffers["row_index"], self._groups_from(buffers))

    # ---- one copy of the weights --------------------------------------------------------------
    def _packed_buffer_names(self) -> list[str]:
        return [name for name in self._buffers if name != "bias"]

    @property
    def kernel_resident(self) -> bool:
        """True while the kernel layout is the only copy of the weights (the packed buffers are
        meta-device placeholders)."""
        return self._kernel_weights is not None and self.row_index.is_meta

    def _contract_buffers(self) -> dict[str, torch.Tensor]:
        """The packed buffers by name: the module's own, or rebuilt from the kernel layout."""
        if self.kernel_resident:
            from ..kernels.layout import contract_tensors
            return contract_tensors(self._kernel_weights)
        return {name: self._buffers[name] for name in self._packed_buffer_names()}

    def to_kernel_layout(self, device=None) -> "MixedBitLinear":
        """Keep the weights only in the kernels' layout on `device` (default: where the buffers are).

        Happens by itself when the module moves to a CUDA device or meets a CUDA input; call it to
        get the same single copy elsewhere (e.g. on the CPU). Returns self."""
        from ..kernels import prepare_packed

        if self.kernel_resident and (device is None or self._kernel_weights.device == torch.device(device)):
            return self
        buffers = self._contract_buffers()
        device = torch.device(device) if device is not None else buffers["row_index"].device
        weights = prepare_packed(self._packed_weight_of(buffers), device=device)
        self._dequant_cache = None
        self._kernel_weights = weights
        for name, buf in buffers.items():
            self._buffers[name] = torch.empty(buf.shape, dtype=buf.dtype, device="meta")
        self._prepare()
        return self

    def _prepare(self) -> None:
        """Build the lean per-call path over the kernel layout (see forward)."""
        from ..kernels import PreparedLinear

        bias = self._buffers.get("bias")
        self._prepared = PreparedLinear(self._kernel_weights, bias, self.act_bits)
        self._prepared_bias = bias

    def _packed_weight_of(self, buffers: Mapping[str, torch.Tensor]) -> PackedWeight:
        return PackedWeight(self.out_features, self.in_features, buffers["row_index"], self._groups_from(buffers))

    def _restore_buffers(self) -> None:
        """Put the packed buffers back (on the kernel layout's device) and drop the kernel layout."""
        if self.kernel_resident:
            for name, tensor in self._contract_buffers().items():
                self._buffers[name] = tensor
        self._kernel_weights = None
        self._prepared = self._prepared_bias = None
        self._dequant_cache = None

    def dequantize_groups(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """Weights [N_kept, K] in packed order (row r is original channel row_index[r])."""
        return self.packed_weight().dequantize_groups(dtype)

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """Weights [N, K] in original channel order, pruned rows zero."""
        return self.packed_weight().dequantize(dtype)

    def bits_per_row(self) -> torch.Tensor:
        return self.packed_weight().bits_per_row()

    def packed_nbytes(self) -> int:
        """Bytes of the weights as they are resident, measured from the tensors themselves: the
        kernel layout's tensors while that is the only copy (`kernel_resident`: after a move to a
        GPU or `to_kernel_layout()`; its fp32 scales/zeros and [N] output index take more than the
        packed buffers), else the packed buffers (codes, scales, zeros, dense rows, row_index).
        The bias is not counted (it is not quantized)."""
        if self.kernel_resident:
            return self._kernel_weights.nbytes()
        return sum(buf.numel() * buf.element_size() for name, buf in self.named_buffers(recurse=False)
                   if name != "bias")

    # ---- compute ------------------------------------------------------------------------------
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-1] != self.in_features:
            raise ValueError(f"input has {x.shape[-1]} features, layer expects {self.in_features}")
        prepared = self._prepared
        # The lean path: one call with everything that depends only on the layer decided at load
        # time (kernels.PreparedLinear); the checks below it are what the slow path would decide.
        if (prepared is not None and x.device == prepared.device and x.is_floating_point()
                and prepared.act_bits == self.act_bits and self._buffers.get("bias") is self._prepared_bias):
            return prepared(x)
        if x.is_cuda or self.kernel_resident:
            return self._forward_kernel(x)
        dtype = x.dtype if x.is_floating_point() else torch.float32
        x = fake_quantize_activations(x.to(dtype), self.act_bits)
        if self.cache_dequantized:
            # Speed path: the dense weight in original channel order (pruned rows zero), kept.
            cache = self._dequant_cache
            if cache is None or cache.dtype != dtype or cache.device != x.device:
                cache = self._dequant_cache = self.dequantize(dtype).to(x.device)
            bias = None if self.bias is None else self.bias.to(dtype)
            return torch.nn.functional.linear(x, cache, bias)
        # The oracle: kept rows only, in packed order, then scattered to their channels.
        w = self.dequantize_groups(dtype).to(x.device)
        y = torch.nn.functional.linear(x, w)
        index = self.row_index.long()
        if self.bias is not None:
            out = self.bias.to(dtype).expand(*x.shape[:-1], self.out_features).clone()
            out.index_add_(-1, index, y)
        else:
            out = x.new_zeros(*x.shape[:-1], self.out_features)
            out.index_copy_(-1, index, y)
        return out

    def _forward_kernel(self, x: torch.Tensor) -> torch.Tensor:
        """qvla_ros.kernels on the kernel layout (the grouped GEMM on CUDA, its torch model on the
        CPU), built once; on a CUDA device it becomes the weights' only copy."""
        from ..kernels import mixed_bit_linear

        weights = self._kernel_weights
        if weights is None or (weights.device != x.device and x.is_cuda):
            weights = self.to_kernel_layout(x.device)._kernel_weights
        elif weights.device != x.device:
            weights = weights.to(x.device)  # a CPU input to a layer living on the GPU: a transient copy
        elif self._prepared is None or self._prepared.act_bits != self.act_bits or \
                self._buffers.get("bias") is not self._prepared_bias:
            self._prepare()  # act_bits or the bias buffer replaced since: the next call is lean again
        bias = None if self.bias is None else self.bias.to(x.device)
        return mixed_bit_linear(x if x.is_floating_point() else x.float(), weights, bias, self.act_bits)

    # Derived weights describe the buffers: drop them whenever the buffers are replaced or moved (a
    # kernel layout that was the only copy first gives the buffers back).
    def _save_to_state_dict(self, destination, prefix, keep_vars):
        super()._save_to_state_dict(destination, prefix, keep_vars)
        if self.kernel_resident:
            for name, tensor in self._contract_buffers().items():
                destination[prefix + name] = tensor

    def _load_from_state_dict(self, *args, **kwargs):
        resident = self.kernel_resident
        self._restore_buffers()
        result = super()._load_from_state_dict(*args, **kwargs)
        if resident or self.row_index.is_cuda:
            self.to_kernel_layout()
        return result

    def _apply(self, fn, *args, **kwargs):
        self._restore_buffers()
        result = super()._apply(fn, *args, **kwargs)
        if self.row_index.is_cuda:
            self.to_kernel_layout()
        return result

    def extra_repr(self) -> str:
        groups = ", ".join(f"{b}b:{n}" for b, n in self.group_layout)
        pruned = self.out_features - self.row_index.numel()
        return (f"in_features={self.in_features}, out_features={self.out_features}, groups=[{groups}], "
                f"pruned={pruned}, act_bits={self.act_bits}, bias={self.bias is not None}")
