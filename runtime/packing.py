"""The packed weight format of LLM-MQ (docs/formats.md, "Packed weights (LLM-MQ)"): bit streams of
codes and zero points in int32 words, fp16 scales per (row, group), and the reference
dequantization. One place for the layout: calibration writes it (calib/quantize.py), the runtime's
QuantLinear and the export's MatMulNBits lowering read it, the kernels' tests check against it.

A code q in [0, 2^b - 1] with zero point z and scale s dequantizes to (q - z) * s; or, in a layer
stored with mins (MIN_FORMATS), to q * s + m with the group's min m. Groups run along the input
dimension (the last group of a row may be shorter). A min layer keeps s and m as fp16 (param bits 16)
or as 8-bit codes against one fp16 step per row each (param bits 8, "double quantization").
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from shrinkrt.errors import ShrinkError
from shrinkrt.runtime.op_contract import (WEIGHT_BITS as SUPPORTED_BITS, WEIGHT_GROUP_SIZES as GROUP_SIZES,
                                          WEIGHT_MIN_FORMATS as MIN_FORMATS)
# How a min layer stores its scales and mins: 16 = fp16 per (row, group); 8 = a scale code in [0, 255]
# (uint8) and a min code in [-127, 127] (int8) per (row, group), and per row the two fp16 steps they count
# (`param_steps` (rows, 2): s = code * step_s, m = code * step_m). At 4-bit group 32 that is 4.5 bits per
# weight plus 4 bytes a row instead of 5.0; measured on SmolLM2's Q4_1 weights: perplexity x1.003 of the
# fp16 form (docs/results/weight_format_probe.md).
PARAM_BITS = (16, 8)
SCALE_CODE_MAX, MIN_CODE_MAX = 255, 127
TILE = 32  # codes per tile: a tile of b-bit codes is exactly b int32 words, for every b


def check_bits(bits: int) -> None:
    if bits not in SUPPORTED_BITS:
        raise ShrinkError(f"unsupported bit width {bits} (supported: {', '.join(map(str, SUPPORTED_BITS))})")


def check_min_format(bits: int, group_size: int) -> None:
    if (bits, group_size) not in MIN_FORMATS:
        raise ShrinkError(f"fp16 mins are stored for {' and '.join(f'{b}-bit group-{g}' for b, g in MIN_FORMATS)} "
                          f"layers only (got {bits}-bit group-{group_size})")


def n_groups(cols: int, group_size: int) -> int:
    return -(-cols // group_size)


def code_words(cols: int, bits: int) -> int:
    """int32 words per row of codes: whole 32-code tiles of `bits` words each."""
    return -(-cols // TILE) * bits


def zero_words(cols: int, bits: int, group_size: int) -> int:
    return -(-n_groups(cols, group_size) * bits // 32)


def param_steps(scales: torch.Tensor, mins: torch.Tensor) -> torch.Tensor:
    """Per-row steps (rows, 2) float32, fp16-representable, of 8-bit param codes for these (rows, G) scales
    and mins: the row's largest scale is code SCALE_CODE_MAX, its largest |min| code MIN_CODE_MAX. Rounded up
    to fp16 (x(1 + 2^-10) before rounding to nearest) so the largest still fits; 2^-24 (fp16's least) at least."""
    top = torch.stack([scales.float().abs().amax(1) / SCALE_CODE_MAX, mins.float().abs().amax(1) / MIN_CODE_MAX], 1)
    return (top * (1 + 2.0**-10)).clamp(min=2.0**-24, max=65504.0).to(torch.float16).to(torch.float32)


def param_codes(scales: torch.Tensor, mins: torch.Tensor, steps: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(scale codes uint8, min codes int8) of values already on the steps' grids (rounded, clamped)."""
    sc = torch.round(scales.float() / steps[:, :1]).clamp(0, SCALE_CODE_MAX)
    mc = torch.round(mins.float() / steps[:, 1:]).clamp(-MIN_CODE_MAX, MIN_CODE_MAX)
    return sc.to(torch.uint8), mc.to(torch.int8)


def param_values(scale_codes: torch.Tensor, min_codes: torch.Tensor,
                 steps: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """8-bit param codes -> (scales, mins) float32: code * the row's step, rounded to fp16 (the values
    every consumer reads: the kernels and QuantMatMul take fp16 scales and mins)."""
    st = steps.float()
    return ((scale_codes.float() * st[:, :1]).half().float(), (min_codes.float() * st[:, 1:]).half().float())


# ---------------------------------------------------------------- bit streams
def pack_bits(values: torch.Tensor, bits: int, words: int) -> torch.Tensor:
    """(rows, n) integers in [0, 2^bits) -> (rows, words) int32; value j sits at bit j*bits of the
    row's little-endian stream (word 0 holds bits 0..31). A value may straddle two words (3 bits)."""
    rows, n = values.shape
    if n * bits > words * 32:
        raise ValueError(f"{n} values of {bits} bits do not fit in {words} words")
    v = values.to(torch.int64)
    pos = torch.arange(n, dtype=torch.int64) * bits
    w, off = pos // 32, pos % 32
    # Scatter each value's low part into its word and the spill-over into the next (one extra
    # scratch word); values never overlap, so a sum is an OR.
    acc = torch.zeros(rows, words + 1, dtype=torch.int64)
    acc.index_add_(1, w, (v << off) & 0xFFFFFFFF)
    acc.index_add_(1, w + 1, v >> (32 - off))  # off == 0 shifts by 32: the value is < 2^8, so 0
    acc = acc[:, :words]
    return torch.where(acc >= 2**31, acc - 2**32, acc).to(torch.int32)


def unpack_bits(words: torch.Tensor, bits: int, n: int) -> torch.Tensor:
    """Inverse of pack_bits: (rows, words) int32 -> (rows, n) int64."""
    rows = words.shape[0]
    u = words.to(torch.int64) & 0xFFFFFFFF
    u = torch.cat([u, torch.zeros(rows, 1, dtype=torch.int64, device=u.device)], dim=1)
    pos = torch.arange(n, dtype=torch.int64, device=u.device) * bits
    w, off = pos // 32, pos % 32
    both = u[:, w] | (u[:, w + 1] << 32)
    return (both >> off) & ((1 << bits) - 1)


# ---------------------------------------------------------------- packed weight
@dataclass
class Packed:
    """One quantized weight in the stored layout (outliers, when any, are held by calib/mq.py)."""
    bits: int
    group_size: int
    rows: int
    cols: int
    codes: torch.Tensor   # int32 (rows, code_words)
    scales: torch.Tensor  # float16 (rows, n_groups); uint8 scale codes with param_steps
    zeros: torch.Tensor | None   # int32 (rows, zero_words); None in a layer with mins
    mins: torch.Tensor | None = None  # float16 (rows, n_groups): w = q * s + m (MIN_FORMATS only); int8 codes
    param_steps: torch.Tensor | None = None  # float16 (rows, 2): steps of 8-bit scale and min codes

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.codes, self.scales, self.zeros, self.mins,
                                                          self.param_steps) if t is not None)


def pack(q: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, bits: int, group_size: int,
         mins: bool = False, steps: torch.Tensor | None = None) -> Packed:
    """Codes (rows, cols) and per-group zero points (rows, n_groups) -> Packed; with `mins`, `zeros`
    holds each group's min instead (stored as fp16, or with `steps` (param_steps) as 8-bit codes on
    those steps: the scales and mins must already lie on their grids). The tail of the last tile is filled with the last
    group's zero point, so padded positions dequantize to exactly 0; with mins the tail codes are 0 and
    dequantize to the min (kernels mask columns >= K, the activation there is zero-padded anyway)."""
    rows, cols = q.shape
    tail = -(-cols // TILE) * TILE - cols
    fill = torch.zeros(rows, tail, dtype=torch.int64) if mins else zeros[:, -1:].to(torch.int64).expand(rows, tail)
    codes = pack_bits(torch.cat([q.to(torch.int64), fill], dim=1), bits, code_words(cols, bits))
    if mins:
        check_min_format(bits, group_size)
        if steps is not None:
            sc, mc = param_codes(scales, zeros, steps)
            return Packed(bits, group_size, rows, cols, codes, sc, None, mc, steps.to(torch.float16).contiguous())
        return Packed(bits, group_size, rows, cols, codes, scales.to(torch.float16).contiguous(), None,
                      zeros.to(torch.float16).contiguous())
    return Packed(bits, group_size, rows, cols, codes, scales.to(torch.float16).contiguous(),
                  pack_bits(zeros, bits, zero_words(cols, bits, group_size)))


def unpack(p: Packed) -> tuple[torch.Tensor, torch.Tensor]:
    """Packed -> (codes (rows, cols) int64, zero points (rows, n_groups) int64, or the mins as float32)."""
    if p.param_steps is not None:
        return unpack_bits(p.codes, p.bits, p.cols), param_values(p.scales, p.mins, p.param_steps)[1]
    if p.mins is not None:
        return unpack_bits(p.codes, p.bits, p.cols), p.mins.float()
    return (unpack_bits(p.codes, p.bits, p.cols),
            unpack_bits(p.zeros, p.bits, n_groups(p.cols, p.group_size)))


def dequantize(codes: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor | None, bits: int, group_size: int,
               cols: int, mins: torch.Tensor | None = None, steps: torch.Tensor | None = None) -> torch.Tensor:
    """The reference dequantization of the stored tensors -> float32 (rows, cols), outliers not added:
    (q - z) * s, or q * s + m where the layer has `mins` (then `zeros` is not read; with `steps`,
    `scales` and `mins` are 8-bit codes on those steps)."""
    q = unpack_bits(codes, bits, cols)
    if steps is not None:
        scales, mins = param_values(scales, mins, steps)
    s = expand_groups(scales.to(torch.float32), group_size, cols)
    if mins is not None:
        return q.to(torch.float32) * s + expand_groups(mins.to(torch.float32), group_size, cols)
    z = unpack_bits(zeros, bits, scales.shape[1])
    return (q - expand_groups(z, group_size, cols)).to(torch.float32) * s


def expand_groups(t: torch.Tensor, group_size: int, cols: int) -> torch.Tensor:
    """(rows, n_groups) per-group values -> (rows, cols), one per column."""
    return t.repeat_interleave(group_size, dim=1)[:, :cols]
