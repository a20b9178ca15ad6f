"""The kernels' own arrangement of a packed mixed-bit layer, built once from the contract layout.

The contract layout (qvla_ros/quant/packing.py) stores element k of a row at byte k // (8//b),
bit (k % (8//b)) * b. A kernel that unpacks it must either gather single bytes or reshuffle the
codes in registers before the matrix product. This module moves that reshuffle to load time: the
same codes, the same number of bits, re-ordered inside 32-bit words so that unpacking field i of
a tile of words gives a contiguous slice of K.

Kernel layout of one quantized group of R rows at b bits (E = 32 // b fields per word):

* K is cut into K-blocks of KB = 32 * E input features (b=8: 128, b=4: 256, b=2 and b=3: 512);
  the group's K is padded with zero codes up to a whole number of K-blocks (nkb of them).
* Row r, K-block kb, word j in [0, 32): field i (bits [i*b, (i+1)*b)) holds the code of input
  feature k = kb*KB + i*32 + j. So a tile of 32 consecutive words of a row, shifted right by i*b,
  holds the codes of 32 consecutive features.
* b = 3: the low two bits use the b=2 arrangement (int32 words); the high bit sits in int16
  half-words with the same (kb, j) indexing, bit i <-> k = kb*512 + i*32 + j.
* Row r's words are contiguous: nkb * 32 words per row for every width.

All quantized groups share one int32 buffer (`qwords`; the 3-bit high plane is addressed through
an int16 view of it), dense 16-bit rows stay a bfloat16 [R16, K] matrix, scales and zero-points
become float32 vectors over the kept rows in packed order. `out_index` lists the output channel of
every packed row followed by the pruned channels, so one launch writes every output element.

The only extra bytes over the contract layout are the K padding to whole K-blocks (none for
K = 4096; 2.3% of the 2- and 3-bit rows for K = 11008).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch

#: the group slots of the kernel, in packed order; slot 5 holds the pruned channels
SLOT_BITS = (16, 8, 4, 3, 2, 0)
#: words per K-block of every quantized row (one K-block = 32 * fields-per-word features)
WORDS_PER_BLOCK = 32
#: int32 entries per slot in the `meta` table: the SlotMeta fields at their META_OFFSETS, then padding
#: (the Triton grouped GEMM reads field f of slot s at meta[s * META_FIELDS + META_<F>])
META_FIELDS = 8
QUANT_WIDTHS = (2, 3, 4, 8)


@dataclass(frozen=True)
class SlotMeta:
    """One slot's row of the `meta` table, by name (the device table keeps these in field order).

    rows: rows in the slot (slot 0 bits: the pruned channels); start: its first packed row (the
    pruned slot: the kept-row count, where its channels start in out_index); word_offset: first
    word of its codes in qwords (int32 units); high_offset: the 3-bit high plane's first half-word
    (int16 units); k_blocks: K-blocks per row. Dense and pruned slots leave the last three 0.
    """
    rows: int
    start: int
    word_offset: int = 0
    high_offset: int = 0
    k_blocks: int = 0

    def as_row(self) -> torch.Tensor:
        """The slot's int32 [META_FIELDS] row of the device table (each field at its META_OFFSETS)."""
        row = torch.zeros(META_FIELDS, dtype=torch.int32)
        row[list(META_OFFSETS.values())] = torch.tensor([getattr(self, name) for name in META_OFFSETS]).to(torch.int32)
        return row

    @classmethod
    def from_row(cls, row: torch.Tensor) -> "SlotMeta":
        values = row.tolist()
        return cls(**{name: int(values[at]) for name, at in META_OFFSETS.items()})


#: where each SlotMeta field sits in a slot's row of `meta`: its position in the dataclass (kept
#: equal by test_kernels_layout.py). The Triton grouped GEMM (triton_gemm.py) reads these names
#: as compile-time constants, so no kernel reads a field by a bare number.
META_ROWS = 0
META_START = 1
META_WORD_OFFSET = 2
META_HIGH_OFFSET = 3
META_K_BLOCKS = 4
META_OFFSETS = {"rows": META_ROWS, "start": META_START, "word_offset": META_WORD_OFFSET,
                "high_offset": META_HIGH_OFFSET, "k_blocks": META_K_BLOCKS}


def fields_per_word(bits: int) -> int:
    """Codes per 32-bit word of a `bits`-wide group (3-bit rows follow their 2-bit low plane)."""
    if bits not in QUANT_WIDTHS:
        raise ValueError(f"no kernel word layout for {bits}-bit rows; quantized widths are {QUANT_WIDTHS}")
    return 16 if bits == 3 else 32 // bits


def k_block(bits: int) -> int:
    """Input features per K-block of a `bits`-wide group."""
    return WORDS_PER_BLOCK * fields_per_word(bits)


def num_k_blocks(bits: int, in_features: int) -> int:
    return -(-int(in_features) // k_block(bits))


# ---- the contract layout, read independently of the quant module (the kernels' own check) --------

def unpack_contract_codes(qweight: torch.Tensor, qweight_hi: torch.Tensor | None, bits: int,
                          in_features: int, keep_padding: bool = False) -> torch.Tensor:
    """Codes uint8 [R, in_features] from a group stored in the contract layout (keep_padding: all
    Kp codes of a row, the padding to a multiple of 8 included)."""
    if bits not in QUANT_WIDTHS:
        raise ValueError(f"unknown quantized width {bits}; expected one of {QUANT_WIDTHS}")
    if qweight is None or qweight.dtype != torch.uint8 or qweight.dim() != 2:
        raise ValueError(f"{bits}-bit group: qweight must be a 2-D uint8 tensor")

    def fields(packed: torch.Tensor, width: int) -> torch.Tensor:
        per = 8 // width
        shifts = torch.arange(per, dtype=torch.int32, device=packed.device) * width
        out = (packed.to(torch.int32).unsqueeze(-1) >> shifts) & ((1 << width) - 1)
        return out.reshape(packed.shape[0], -1)

    if bits == 3:
        if qweight_hi is None or qweight_hi.dtype != torch.uint8:
            raise ValueError("3-bit group: the high-bit plane qweight_hi (uint8) is missing")
        codes = fields(qweight, 2) | (fields(qweight_hi, 1) << 2)
    else:
        codes = fields(qweight, bits)
    if codes.shape[1] < in_features:
        raise ValueError(f"{bits}-bit group holds {codes.shape[1]} features per row, fewer than "
                         f"in_features={in_features}")
    return (codes if keep_padding else codes[:, :in_features]).to(torch.uint8)


# ---- contract codes <-> kernel words -------------------------------------------------------------

def _to_words(codes: torch.Tensor, width: int, per_word: int, dtype: torch.dtype) -> torch.Tensor:
    """Pack codes [R, nkb*32*per_word] into words [R, nkb*32] (field i <-> k = kb*KB + i*32 + j)."""
    rows = codes.shape[0]
    blocks = codes.to(torch.int64).reshape(rows, -1, per_word, WORDS_PER_BLOCK)
    shifts = (torch.arange(per_word, dtype=torch.int64, device=codes.device) * width).view(1, 1, -1, 1)
    words = (blocks << shifts).sum(dim=2)  # fields do not overlap, so the sum is an OR
    bits_total = 8 * torch.tensor([], dtype=dtype).element_size()
    words = torch.where(words >= 2 ** (bits_total - 1), words - 2 ** bits_total, words)  # two's complement
    return words.to(dtype).reshape(rows, -1)


def _from_words(words: torch.Tensor, width: int, per_word: int) -> torch.Tensor:
    rows = words.shape[0]
    w = words.to(torch.int64).reshape(rows, -1, 1, WORDS_PER_BLOCK)
    shifts = (torch.arange(per_word, dtype=torch.int64, device=words.device) * width).view(1, 1, -1, 1)
    return ((w >> shifts) & ((1 << width) - 1)).reshape(rows, -1).to(torch.uint8)


def codes_to_words(codes: torch.Tensor, bits: int) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Kernel words of one group from its codes uint8 [R, K]: (int32 [R, nkb*32], int16 plane or None)."""
    rows, k = codes.shape
    kpad = num_k_blocks(bits, k) * k_block(bits)
    padded = torch.zeros(rows, kpad, dtype=torch.uint8, device=codes.device)
    padded[:, :k] = codes
    if bits == 3:
        low = _to_words(padded & 3, 2, 16, torch.int32)
        high = _to_words(padded >> 2, 1, 16, torch.int16)
        return low, high
    return _to_words(padded, bits, 32 // bits, torch.int32), None


def words_to_codes(words: torch.Tensor, high: torch.Tensor | None, bits: int, in_features: int) -> torch.Tensor:
    """Inverse of codes_to_words: codes uint8 [R, in_features]."""
    if bits == 3:
        codes = _from_words(words, 2, 16) | (_from_words(high, 1, 16) << 2)
    else:
        codes = _from_words(words, bits, 32 // bits)
    return codes[:, :in_features]


# ---- the prepared layer --------------------------------------------------------------------------

@dataclass
class KernelWeights:
    """One mixed-bit layer in the kernel layout (see the module docstring).

    Attributes:
        out_features, in_features: N and K of the Linear.
        qwords: int32 [total words] every quantized group's words (3-bit high planes included).
        w16: bfloat16 [R16, K] the dense rows (a [1, 1] placeholder when there are none).
        scale, zero: float32 [N_kept] per packed row (1 and 0 for dense rows).
        out_index: int32 [N] output channel of each packed row, then the pruned channels.
        meta: int32 [6, META_FIELDS], one SlotMeta row per slot of SLOT_BITS (read it with slot(bits)).
        group_rows: rows per slot, on the host (sizes the launch grid without a device sync).
        integer_zero: every zero-point is an integer inside its row's code range, so q - zero is
            exact in 16-bit floating point and the kernel subtracts it while decoding instead of
            folding zero * sum(x) into the epilogue.
    """
    out_features: int
    in_features: int
    qwords: torch.Tensor
    w16: torch.Tensor
    scale: torch.Tensor
    zero: torch.Tensor
    out_index: torch.Tensor
    meta: torch.Tensor
    group_rows: tuple[int, ...]
    integer_zero: bool

    @property
    def device(self) -> torch.device:
        return self.qwords.device

    @property
    def kept_rows(self) -> int:
        return sum(self.group_rows[:5])

    def to(self, device) -> "KernelWeights":
        moved = {name: getattr(self, name).to(device) for name in
                 ("qwords", "w16", "scale", "zero", "out_index", "meta")}
        return KernelWeights(self.out_features, self.in_features, group_rows=self.group_rows,
                             integer_zero=self.integer_zero, **moved)

    def nbytes(self) -> int:
        """Bytes of the buffers the kernel reads for this layer (what sits in device memory).
        The one-element placeholders of absent groups (no dense rows, no quantized rows, no kept
        rows) hold no weight and are not counted, so this equals resident_layer_bytes()."""
        tensors = [self.out_index, self.meta]
        if self.group_rows[0]:
            tensors.append(self.w16)
        if any(self.group_rows[1:5]):
            tensors.append(self.qwords)
        if self.kept_rows:
            tensors += [self.scale, self.zero]
        return sum(t.numel() * t.element_size() for t in tensors)

    def slot(self, bits: int) -> SlotMeta:
        """The meta entries of the slot holding `bits`-wide rows."""
        return SlotMeta.from_row(self.meta[SLOT_BITS.index(bits)])

    def group_codes(self, bits: int, columns: int | None = None) -> torch.Tensor:
        """Codes uint8 [R, columns] of the `bits`-wide group, read back from the kernel words
        (columns: default K; more reads the padding codes after K too)."""
        s = self.slot(bits)
        per_row = s.k_blocks * WORDS_PER_BLOCK
        words = self.qwords[s.word_offset:s.word_offset + s.rows * per_row].view(s.rows, per_row)
        high = None
        if bits == 3:
            h16 = self.qwords.view(torch.int16)
            high = h16[s.high_offset:s.high_offset + s.rows * per_row].view(s.rows, per_row)
        return words_to_codes(words, high, bits, self.in_features if columns is None else columns)


def resident_row_bits(bits: int, in_features: int) -> int:
    """Bits one output row at `bits` takes in this layout (what a GPU holds; the allocator's price).

    Quantized rows: their codes over whole K-blocks (the padding is real memory: 2.3% of a 2- or
    3-bit row at K = 11008, 33% at K = 1152), a float32 scale and zero-point and their out_index
    entry; dense rows: bfloat16 K, scale 1 and zero 0 (float32) and out_index; a pruned row: its
    out_index entry. Larger than the contract layout's row (quant.packing.row_bits) for every
    width, so a budget met here is met by the packed buffers too.
    """
    per_row_tables = 32 + 32 + 32  # scale, zero (float32), out_index (int32)
    if bits == 0:
        return 32
    if bits == 16:
        return 16 * int(in_features) + per_row_tables
    return bits * num_k_blocks(bits, in_features) * k_block(bits) + per_row_tables


#: bytes of a layer's slot table (`meta`), whatever its rows
LAYER_TABLE_BYTES = len(SLOT_BITS) * META_FIELDS * 4


def resident_layer_bytes(counts, in_features: int) -> int:
    """Bytes of a layer in this layout ({width: rows} counts), equal to KernelWeights.nbytes()."""
    bits = sum(resident_row_bits(int(b), in_features) * int(n) for b, n in counts.items())
    return bits // 8 + LAYER_TABLE_BYTES


def slot_table(group_rows: Sequence[int], in_features: int) -> dict[str, int]:
    """The group table of a layer as host integers, computed from its rows per slot and K alone.

    prepare_groups (and testing.random_kernel_weights) lay the groups out in slot order, each
    quantized group's words right after the previous one's and the 3-bit high plane right after its
    low plane, so nothing needs to be read back from the device. Keys: r{b} rows of width b (r0:
    pruned), o{b} word offset of the b-bit group in units of 16 words, h3 offset of the 3-bit high
    plane in units of 32 half-words, n{b} K-blocks per row (the layout of `meta`, in the small-M
    kernel's units).
    """
    if len(group_rows) != len(SLOT_BITS):
        raise ValueError(f"group_rows must hold {len(SLOT_BITS)} counts (slots {SLOT_BITS}), got {len(group_rows)}")
    table = {f"r{b}": int(r) for b, r in zip(SLOT_BITS, group_rows)}
    used = 0
    table["h3"] = 0
    for bits in QUANT_WIDTHS[::-1]:  # 8, 4, 3, 2: the packed order
        rows = table[f"r{bits}"]
        nkb = num_k_blocks(bits, in_features)
        words = rows * nkb * WORDS_PER_BLOCK
        table[f"o{bits}"], table[f"n{bits}"] = used // 16, nkb
        used += words
        if bits == 3:
            table["h3"] = 2 * used // 32
            used += words // 2
    return table


def prepare_groups(out_features: int, in_features: int, row_index: torch.Tensor,
                   groups: Sequence, device=None) -> KernelWeights:
    """Build the kernel layout from contract-layout groups.

    `groups` holds objects with the attributes of qvla_ros.quant.packing.PackedGroup: bits, start,
    rows, qweight, qweight_hi, scale, zero, weight (the module's buffers work as they are). The
    result lives on `device` (default: where row_index lives).
    """
    n, k = int(out_features), int(in_features)
    if n <= 0 or k <= 0:
        raise ValueError(f"layer shape must be positive, got out_features={n}, in_features={k}")
    device = torch.device(device) if device is not None else row_index.device
    row_index = row_index.detach().to(device=device, dtype=torch.int64).flatten()
    by_bits, order = {}, []
    for g in groups:
        bits = int(g.bits)
        if bits not in SLOT_BITS[:5]:
            raise ValueError(f"group of width {bits}: kept rows must be 16, 8, 4, 3 or 2 bits wide")
        if bits in by_bits:
            raise ValueError(f"two groups of width {bits}; a layer holds one group per width")
        by_bits[bits] = g
        order.append(bits)
    if order != sorted(order, key=SLOT_BITS.index):
        raise ValueError(f"groups come in order {order}; the layout stores them as 16, 8, 4, 3, 2")
    kept = sum(int(g.rows) for g in groups)
    if row_index.numel() != kept:
        raise ValueError(f"row_index has {row_index.numel()} entries for {kept} kept rows")
    if kept and (int(row_index.min()) < 0 or int(row_index.max()) >= n):
        raise ValueError(f"row_index holds a channel outside [0, {n})")
    if row_index.unique().numel() != kept:
        raise ValueError("row_index names an output channel twice")

    meta = torch.zeros(len(SLOT_BITS), META_FIELDS, dtype=torch.int32)
    word_chunks, scales, zeros = [], [], []
    integer_zero = True
    w16 = torch.zeros(1, 1, dtype=torch.bfloat16, device=device)
    words_used, start = 0, 0
    for slot, bits in enumerate(SLOT_BITS[:5]):
        g = by_bits.get(bits)
        if g is None:
            continue
        rows = int(g.rows)
        if int(g.start) != start:
            raise ValueError(f"{bits}-bit group starts at packed row {g.start}, expected {start}")
        if bits == 16:
            w = g.weight
            if w is None or tuple(w.shape) != (rows, k):
                raise ValueError(f"16-bit group: weight must be bfloat16 [{rows}, {k}]")
            w16 = w.detach().to(device=device, dtype=torch.bfloat16).contiguous()
            scales.append(torch.ones(rows, dtype=torch.float32, device=device))
            zeros.append(torch.zeros(rows, dtype=torch.float32, device=device))
            meta[slot] = SlotMeta(rows, start).as_row()
        else:
            for part in ("scale", "zero"):
                t = getattr(g, part)
                if t is None or t.numel() != rows:
                    raise ValueError(f"{bits}-bit group: {part} must hold one value per row ({rows})")
            # the contract's padding codes ride along (the kernels never read features >= K), so
            # contract_tensors() can give back the exact buffers
            codes = unpack_contract_codes(g.qweight.to(device), None if g.qweight_hi is None
                                          else g.qweight_hi.to(device), bits, k, keep_padding=True)
            if codes.shape[0] != rows:
                raise ValueError(f"{bits}-bit group: qweight has {codes.shape[0]} rows, expected {rows}")
            low, high = codes_to_words(codes, bits)
            nkb = num_k_blocks(bits, k)
            high_offset = 0
            word_chunks.append(low.flatten())
            word_offset = words_used
            words_used += low.numel()
            if high is not None:
                # int16 half-words, two per int32 word; rows*nkb*32 half-words is always even
                high_offset = 2 * words_used
                word_chunks.append(high.flatten().view(torch.int32))
                words_used += high.numel() // 2
            meta[slot] = SlotMeta(rows, start, word_offset, high_offset, nkb).as_row()
            scales.append(g.scale.detach().to(device=device, dtype=torch.float32).flatten())
            zeros.append(g.zero.detach().to(device=device, dtype=torch.float32).flatten())
            z = zeros[-1]
            # codes and zero-point both in [0, 2^b - 1]: q - zero is then exact in bf16/fp16
            integer_zero &= bool(torch.equal(z, z.round()) and (z.numel() == 0 or
                                 (float(z.min()) >= 0 and float(z.max()) <= 2 ** bits - 1)))
        start += rows

    pruned_mask = torch.ones(n, dtype=torch.bool, device=device)
    pruned_mask[row_index] = False
    pruned = torch.nonzero(pruned_mask).flatten()
    meta[SLOT_BITS.index(0)] = SlotMeta(pruned.numel(), kept).as_row()
    out_index = torch.cat([row_index, pruned]).to(torch.int32)
    qwords = torch.cat(word_chunks) if word_chunks else torch.zeros(1, dtype=torch.int32, device=device)
    scale = torch.cat(scales) if scales else torch.ones(1, dtype=torch.float32, device=device)
    zero = torch.cat(zeros) if zeros else torch.zeros(1, dtype=torch.float32, device=device)
    group_rows = tuple(SlotMeta.from_row(row).rows for row in meta)
    return KernelWeights(n, k, qwords.contiguous(), w16, scale.contiguous(), zero.contiguous(),
                         out_index.contiguous(), meta.to(device), group_rows, integer_zero)


def _contract_bytes(codes: torch.Tensor, width: int) -> torch.Tensor:
    """Codes [R, Kp] -> contract bytes [R, Kp*width/8]: element k at byte k // (8//width), bit
    (k % (8//width)) * width (on the codes' device)."""
    per = 8 // width
    shifts = torch.arange(per, dtype=torch.int32, device=codes.device) * width
    fields = codes.to(torch.int32).reshape(codes.shape[0], -1, per) << shifts
    return fields.sum(dim=-1).to(torch.uint8)


def contract_tensors(kw: KernelWeights) -> dict[str, torch.Tensor]:
    """The contract-layout buffers of a layer, rebuilt from its kernel layout on the same device.

    Keys as MixedBitLinear names its buffers: row_index, g{b}_qweight, g3_qweight_hi, g{b}_scale,
    g{b}_zero (float16), g16_weight (bfloat16). Exact for layouts built by prepare_groups: codes,
    padding codes, scales and zero-points (float16 -> float32 -> float16) all come back bit for bit.
    """
    kp = -(-kw.in_features // 8) * 8  # the contract pads K to a multiple of 8
    out = {"row_index": kw.out_index[:kw.kept_rows].to(torch.int32).clone()}
    for bits, rows in zip(SLOT_BITS[:5], kw.group_rows[:5]):
        if rows == 0:
            continue
        if bits == 16:
            out["g16_weight"] = kw.w16.clone()
            continue
        lo = kw.slot(bits).start
        hi = lo + rows
        codes = kw.group_codes(bits, kp)
        if bits == 3:
            out["g3_qweight"], out["g3_qweight_hi"] = _contract_bytes(codes & 3, 2), _contract_bytes(codes >> 2, 1)
        else:
            out[f"g{bits}_qweight"] = _contract_bytes(codes, bits)
        out[f"g{bits}_scale"] = kw.scale[lo:hi].to(torch.float16)
        out[f"g{bits}_zero"] = kw.zero[lo:hi].to(torch.float16)
    return out


def prepare_packed(packed, device=None) -> KernelWeights:
    """Kernel layout of a qvla_ros.quant.packing.PackedWeight (or anything with out_features,
    in_features, row_index and groups)."""
    return prepare_groups(packed.out_features, packed.in_features, packed.row_index, packed.groups, device)
