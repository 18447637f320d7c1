"""A buffer-only quantized linear that dequantizes its packed weight on every call (LLM-MQ).

The reference for the fused dequantize + GEMV kernels: it reads exactly the stored tensors
(docs/formats.md, "Packed weights (LLM-MQ)"), so whatever it computes is what a kernel must match.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from shrinkrt.runtime.packing import dequantize, param_values
from shrinkrt.runtime import kernels


class QuantLinear(nn.Module):
    def __init__(self, in_features: int, out_features: int, bits: int, group_size: int,
                 codes: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor | None,
                 outliers: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None,
                 bias: torch.Tensor | None = None, mins: torch.Tensor | None = None,
                 param_steps: torch.Tensor | None = None):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.bits, self.group_size = bits, group_size
        self.has_mins = mins is not None  # min per group instead of integer zero points
        # 8-bit param codes: `scales` uint8 and `mins` int8 count the rows' fp16 steps (packing.PARAM_BITS)
        self.param_bits = 8 if param_steps is not None else 16
        self.register_buffer("codes", codes)
        self.register_buffer("scales", scales)
        self.register_buffer("zeros", zeros)
        self.register_buffer("mins", mins)
        self.register_buffer("param_steps", param_steps)
        self.register_buffer("bias", bias)
        self.n_outliers = 0
        if outliers is not None:
            rowptr, cols, vals = outliers
            self.n_outliers = int(vals.numel())
            self.register_buffer("outlier_rowptr", rowptr)
            self.register_buffer("outlier_cols", cols)
            self.register_buffer("outlier_vals", vals)
            # Row of each outlier, derived once from the row pointers (not stored: kernels walk rows).
            rows = torch.repeat_interleave(torch.arange(out_features, device=rowptr.device),
                                           (rowptr[1:] - rowptr[:-1]).long())
            self.register_buffer("_outlier_rows", rows, persistent=False)

    def group_scales(self) -> torch.Tensor:
        """The fp16 scale per (row, group): what QuantMatMul and the kernels read (8-bit codes expanded:
        they take fp16 scales and mins; the codes are the stored form)."""
        if self.param_bits == 8:
            return param_values(self.scales, self.mins, self.param_steps)[0].half()
        return self.scales

    def group_mins(self) -> torch.Tensor:
        """The fp16 min per (row, group) of a layer with mins."""
        if self.param_bits == 8:
            return param_values(self.scales, self.mins, self.param_steps)[1].half()
        return self.mins

    def zero_points(self) -> torch.Tensor:
        """What a kernel reads in the zero-point slot: the int32 zero-point stream, or the fp16 mins."""
        return self.group_mins() if self.has_mins else self.zeros

    def weight(self) -> torch.Tensor:
        """The dequantized weight (out_features, in_features) in float32, outliers included."""
        w = dequantize(self.codes, self.scales, self.zeros, self.bits, self.group_size, self.in_features, self.mins,
                       self.param_steps)
        if self.n_outliers:
            # The dense codes under an outlier dequantize to exactly 0, so adding is setting.
            cols = self.outlier_cols.long() & 0xFFFF if self.outlier_cols.dtype == torch.int16 \
                else self.outlier_cols.long()
            w[self._outlier_rows, cols] += self.outlier_vals.float()
        return w

    def nbytes(self) -> int:
        """Bytes the packed weight holds (codes, scales, zeros, outliers; bias excluded)."""
        return sum(b.numel() * b.element_size() for n, b in self.named_buffers(recurse=False)
                   if n != "bias" and not n.startswith("_") and b is not None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if kernels.enabled(x):
            return kernels.quant_linear(self, x)
        bias = self.bias.to(x.dtype) if self.bias is not None else None
        return F.linear(x, self.weight().to(x.dtype), bias)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, bits={self.bits}, "
                f"group_size={self.group_size}, outliers={self.n_outliers}"
                f"{(', mins' + (', 8-bit params' if self.param_bits == 8 else '')) if self.has_mins else ''}")
