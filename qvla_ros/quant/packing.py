"""The packed layout of a mixed-bit Linear: the contract between QVLA, the CPU path and the kernels.

A Linear with N output channels (rows) and K input features is stored as:

* Rows grouped by bit-width, groups in the order 16, 8, 4, 3, 2; pruned rows (0 bits) are absent.
  ``row_index`` int32 [N_kept] maps packed row r -> original output channel; inside a group rows
  keep their original (ascending) order. Pruned output channels produce the bias only.
* A group of R rows at b bits has R a multiple of the row tile (16 by default); the exceptions:
  a layer with fewer rows than the tile, and, when N is not a multiple of the tile, one group per
  layer may hold a ragged count. K is padded to Kp, a multiple of 8, with zero weights (codes equal
  to the row's zero-point, which decode to exactly 0).
* b in {2, 4, 8}: ``qweight`` uint8 [R, Kp*b/8]; element k of a row sits in byte k // (8//b) at bit
  offset (k % (8//b)) * b, low bits first. Codes are unsigned.
* b = 3: ``qweight`` holds the low 2 bits in the b=2 layout [R, Kp/4]; ``qweight_hi`` the high bit
  as a 1-bit plane [R, Kp/8] (element k in byte k // 8 at bit k % 8).
* b in {2, 3, 4, 8}: ``scale`` and ``zero`` float16 [R]; weight = (q - zero) * scale.
* b = 16: ``weight`` bfloat16 [R, K], dense (no padding, no scale/zero).

Memory per kept row, in bits (the allocator's cost model, equal to the real buffers):
b*Kp + 16 (scale) + 16 (zero) + 32 (row_index) for b in {2,3,4,8}; 16*K + 32 for b = 16.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping, Sequence

import torch

from .quantizer import ALL_BITS, QUANT_BITS, check_bits, dequantize_rows, quantize_rows

#: groups appear in the packed tensor in this order (widest first)
GROUP_ORDER = (16, 8, 4, 3, 2)
#: in_features is padded to a multiple of this
K_ALIGN = 8
#: default number of rows a group's size is a multiple of (the kernels' row tile)
DEFAULT_ROW_TILE = 16

__all__ = [
    "ALL_BITS", "QUANT_BITS", "GROUP_ORDER", "K_ALIGN", "DEFAULT_ROW_TILE",
    "quantize_rows", "dequantize_rows", "padded_in_features", "pack_codes", "unpack_codes",
    "PackedGroup", "PackedWeight", "check_row_tile", "row_bits", "predicted_nbytes", "bit_counts",
]


def padded_in_features(in_features: int) -> int:
    """K rounded up to a multiple of K_ALIGN."""
    return -(-int(in_features) // K_ALIGN) * K_ALIGN


def _pack_fields(values: torch.Tensor, width: int) -> torch.Tensor:
    """Pack unsigned `width`-bit fields [R, Kp] into bytes [R, Kp*width/8], low bits first."""
    per = 8 // width
    rows, kp = values.shape
    shifts = torch.arange(per, dtype=torch.int32, device=values.device) * width
    fields = values.to(torch.int32).reshape(rows, kp // per, per) << shifts
    return fields.sum(dim=-1).to(torch.uint8)


def _unpack_fields(packed: torch.Tensor, width: int) -> torch.Tensor:
    """Inverse of _pack_fields: bytes [R, Kp*width/8] -> uint8 fields [R, Kp]."""
    per = 8 // width
    shifts = torch.arange(per, dtype=torch.uint8, device=packed.device) * width
    mask = (1 << width) - 1
    fields = (packed.unsqueeze(-1) >> shifts) & mask
    return fields.reshape(packed.shape[0], -1)


def pack_codes(codes: torch.Tensor, bits: int) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Pack uint8 codes [R, Kp] (Kp a multiple of 8) into (qweight, qweight_hi or None)."""
    bits = check_bits(bits, QUANT_BITS)
    if codes.dim() != 2 or codes.shape[1] % K_ALIGN:
        raise ValueError(f"codes must be [rows, Kp] with Kp a multiple of {K_ALIGN}, got {tuple(codes.shape)}")
    if codes.numel() and int(codes.max()) >= 2 ** bits:
        raise ValueError(f"a code exceeds {2 ** bits - 1}, the largest {bits}-bit value")
    if bits == 3:
        return _pack_fields(codes & 3, 2), _pack_fields(codes >> 2, 1)
    return _pack_fields(codes, bits), None


def unpack_codes(qweight: torch.Tensor, qweight_hi: torch.Tensor | None, bits: int,
                 in_features: int | None = None) -> torch.Tensor:
    """Codes uint8 [R, K] (K = in_features, or Kp when None) from the packed planes."""
    bits = check_bits(bits, QUANT_BITS)
    if bits == 3:
        if qweight_hi is None:
            raise ValueError("3-bit rows need their high-bit plane (qweight_hi)")
        codes = _unpack_fields(qweight, 2) | (_unpack_fields(qweight_hi, 1) << 2)
    else:
        codes = _unpack_fields(qweight, bits)
    return codes if in_features is None else codes[:, :in_features]


@dataclass
class PackedGroup:
    """The rows of one layer stored at one bit-width (see the module docstring for shapes).

    `start` is the group's first row in packed order, so rows start..start+rows-1 of the layer's
    packed output belong to it and row_index[start:start+rows] names their original channels.
    """
    bits: int
    start: int
    rows: int
    in_features: int
    qweight: torch.Tensor | None = None      # uint8 [R, Kp*b/8] (b=3: low 2 bits [R, Kp/4])
    qweight_hi: torch.Tensor | None = None   # uint8 [R, Kp/8], b=3 only
    scale: torch.Tensor | None = None        # float16 [R]
    zero: torch.Tensor | None = None         # float16 [R]
    weight: torch.Tensor | None = None       # bfloat16 [R, K], b=16 only

    def tensors(self) -> dict[str, torch.Tensor]:
        """The group's stored tensors by their part name (qweight, qweight_hi, scale, zero, weight)."""
        names = ("qweight", "qweight_hi", "scale", "zero", "weight")
        return {n: getattr(self, n) for n in names if getattr(self, n) is not None}

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.tensors().values())

    def codes(self) -> torch.Tensor:
        """Unsigned codes uint8 [R, K] (quantized groups only)."""
        if self.bits == 16:
            raise ValueError("16-bit rows are dense bfloat16; they have no codes")
        return unpack_codes(self.qweight, self.qweight_hi, self.bits, self.in_features)

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The group's weights [R, K] as `dtype` (what the CPU path and the kernels compute with)."""
        if self.bits == 16:
            return self.weight.to(dtype)
        return dequantize_rows(self.codes(), self.scale, self.zero, dtype)


def check_row_tile(counts: Mapping[int, int], out_features: int, row_tile: int = DEFAULT_ROW_TILE) -> None:
    """Raise ValueError unless the per-width row counts obey the row-tile rule of the layout."""
    if row_tile < 1:
        raise ValueError(f"row_tile must be >= 1, got {row_tile}")
    if sum(counts.values()) != out_features:
        raise ValueError(f"row counts {dict(counts)} add up to {sum(counts.values())}, not {out_features} rows")
    if out_features < row_tile:
        return
    ragged = {b: n for b, n in counts.items() if b != 0 and n % row_tile}
    allowed = 1 if out_features % row_tile else 0
    if len(ragged) > allowed:
        raise ValueError(
            f"row groups {ragged} are not multiples of the row tile {row_tile} "
            f"(layer of {out_features} rows; {allowed} ragged group allowed)")


def row_bits(bits: int, in_features: int) -> int:
    """Memory of one row at `bits`, in bits, counting every stored byte (see module docstring)."""
    bits = check_bits(bits)
    if bits == 0:
        return 0
    if bits == 16:
        return 16 * int(in_features) + 32
    return bits * padded_in_features(in_features) + 16 + 16 + 32


def predicted_nbytes(counts: Mapping[int, int], in_features: int) -> int:
    """Bytes the packed layout takes for a layer with these row counts per width (bias excluded)."""
    total_bits = sum(row_bits(b, in_features) * int(n) for b, n in counts.items())
    return total_bits // 8


def bit_counts(bits_per_row: torch.Tensor | Sequence[int]) -> dict[int, int]:
    """{width: number of rows} for every width in ALL_BITS (zeros included)."""
    bits = torch.as_tensor(bits_per_row).flatten().to(torch.int64)
    return {b: int((bits == b).sum()) for b in ALL_BITS}


@dataclass
class PackedWeight:
    """A whole layer in the packed layout: row_index plus one PackedGroup per present width."""
    out_features: int
    in_features: int
    row_index: torch.Tensor          # int32 [N_kept]
    groups: list[PackedGroup]

    @classmethod
    def from_weight(cls, weight: torch.Tensor, bits_per_row, row_tile: int = DEFAULT_ROW_TILE) -> "PackedWeight":
        """Quantize and pack `weight` [N, K] with one width per row (values in ALL_BITS)."""
        if weight.dim() != 2:
            raise ValueError(f"weight must be 2-D [out_features, in_features], got {tuple(weight.shape)}")
        n, k = weight.shape
        bits = torch.as_tensor(bits_per_row).flatten()
        if bits.numel() != n:
            raise ValueError(f"bits_per_row has {bits.numel()} entries for a layer of {n} output channels")
        if bits.is_floating_point() and not torch.equal(bits, bits.round()):
            raise ValueError("bits_per_row holds non-integer widths")
        bits = bits.to(torch.int64)
        unknown = sorted(set(bits.unique().tolist()) - set(ALL_BITS))
        if unknown:
            raise ValueError(f"unknown bit-widths {unknown}; allowed: {list(ALL_BITS)}")
        check_row_tile(bit_counts(bits), n, row_tile)
        kp = padded_in_features(k)
        # Packed where the weight lives: a 7B policy on a GPU is quantized there, not on the CPU.
        w = weight.detach().to(torch.float32)
        bits = bits.to(w.device)
        groups, index, start = [], [], 0
        for b in GROUP_ORDER:
            rows = torch.nonzero(bits == b).flatten()
            if rows.numel() == 0:
                continue
            g = PackedGroup(bits=b, start=start, rows=rows.numel(), in_features=k)
            if b == 16:
                g.weight = w[rows].to(torch.bfloat16).contiguous()
            else:
                codes, g.scale, g.zero = quantize_rows(w[rows], b)
                # Padding columns get the zero-point code, so they decode to exactly 0.
                pad = g.zero.to(torch.uint8)[:, None].expand(-1, kp - k)
                g.qweight, g.qweight_hi = pack_codes(torch.cat([codes, pad], dim=1), b)
            groups.append(g)
            index.append(rows)
            start += rows.numel()
        row_index = torch.cat(index).to(torch.int32) if index else torch.zeros(0, dtype=torch.int32, device=w.device)
        return cls(out_features=n, in_features=k, row_index=row_index, groups=groups)

    @property
    def kept_rows(self) -> int:
        return int(self.row_index.numel())

    def nbytes(self) -> int:
        return self.row_index.numel() * self.row_index.element_size() + sum(g.nbytes() for g in self.groups)

    def dequantize_groups(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """Weights [N_kept, K] in packed row order (row r is original channel row_index[r])."""
        if not self.groups:
            return torch.zeros(0, self.in_features, dtype=dtype)
        return torch.cat([g.dequantize(dtype) for g in self.groups], dim=0)

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """Weights [N, K] in original channel order, pruned rows all zero."""
        dense = torch.zeros(self.out_features, self.in_features, dtype=dtype)
        dense[self.row_index.long()] = self.dequantize_groups(dtype)
        return dense

    def bits_per_row(self) -> torch.Tensor:
        """int64 [N]: the width of every original channel (0 for pruned)."""
        bits = torch.zeros(self.out_features, dtype=torch.int64)
        for g in self.groups:
            bits[self.row_index[g.start:g.start + g.rows].long()] = g.bits
        return bits
