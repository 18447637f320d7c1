"""Per-token, per-group symmetric integer quantization of cache features (int8 / int4).

Scales are FP16, one per token per group of `group` consecutive features; int4 codes are packed two
per byte (low nibble = even feature). The same layout is what the cache stores and what its byte
count reports (docs/formats.md, CSKV).
"""
from __future__ import annotations

import math

import torch

from .op_contract import FEATURE_GROUP, SCALE_FLOOR


def n_groups(r: int, group: int = FEATURE_GROUP) -> int:
    return math.ceil(r / group)


def row_bytes(r: int, bits: int, group: int = FEATURE_GROUP) -> int:
    """Bytes one token's r features occupy: codes plus FP16 scales (none at 16 bits)."""
    if bits == 16:
        return 2 * r
    code = r if bits == 8 else (r + 1) // 2
    return code + 2 * n_groups(r, group)


def quantize(x: torch.Tensor, bits: int, group: int = FEATURE_GROUP) -> tuple[torch.Tensor, torch.Tensor]:
    """x: (..., r) float -> (codes, scales). int8: int8 codes; int4: uint8 with two codes per byte."""
    r = x.shape[-1]
    qmax = 2 ** (bits - 1) - 1
    g = n_groups(r, group)
    pad = g * group - r
    xp = torch.nn.functional.pad(x.float(), (0, pad)).unflatten(-1, (g, group))
    scale = (xp.abs().amax(-1) / qmax).clamp_min(SCALE_FLOOR).half()
    q = torch.round(xp / scale.float().unsqueeze(-1)).clamp(-qmax - 1, qmax).flatten(-2)[..., :r].to(torch.int8)
    if bits == 4:
        if r % 2:
            q = torch.nn.functional.pad(q, (0, 1))
        lo, hi = q[..., 0::2], q[..., 1::2]
        q = ((lo.to(torch.int16) & 0xF) | ((hi.to(torch.int16) & 0xF) << 4)).to(torch.uint8)
    return q, scale


def dequantize(codes: torch.Tensor, scales: torch.Tensor, bits: int, r: int, group: int = FEATURE_GROUP) -> torch.Tensor:
    if bits == 4:
        c = codes.to(torch.int16)
        lo, hi = c & 0xF, (c >> 4) & 0xF
        q = torch.stack([lo, hi], dim=-1).flatten(-2)[..., :r]
        q = torch.where(q >= 8, q - 16, q)  # sign-extend the nibbles
    else:
        q = codes
    g = scales.shape[-1]
    q = torch.nn.functional.pad(q.float(), (0, g * group - r)).unflatten(-1, (g, group))
    return (q * scales.float().unsqueeze(-1)).flatten(-2)[..., :r]


def fake_quantize(x: torch.Tensor, bits: int, group: int = FEATURE_GROUP) -> torch.Tensor:
    """Quantize-dequantize with a straight-through gradient (quantization-aware fitting)."""
    if bits == 16:
        return x + (x.half().float() - x).detach()
    codes, scales = quantize(x.detach(), bits, group)
    return x + (dequantize(codes, scales, bits, x.shape[-1], group) - x).detach()
