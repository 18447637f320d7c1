"""Group-wise asymmetric integer quantization (RTN and GPTQ) into the packed layout of
runtime/packing.py (the one place of that format: packing, unpacking, the reference dequantization).

A weight W (out_features x in_features, as nn.Linear holds it) is split along the input dimension
into groups of `group_size` columns (the last group of a row may be shorter). Each (row, group) has
an fp16 scale and an integer zero point z in [0, 2^b - 1]; a code q in [0, 2^b - 1] dequantizes to
(q - z) * scale. Codes and zero points are stored as little-endian bit streams in int32 words
(layout: docs/formats.md, "Packed weights (LLM-MQ)"). Outliers (sparse fp16, calib/mq.py) are
excluded from the range of their group and stored with code = z, so the dense part is exactly 0
there and the kernel adds the sparse part on top.

With `mins` (the formats of packing.MIN_FORMATS) a group keeps its fp16 min m instead of z, and a code
dequantizes to q * scale + m: the grid starts at the group's own minimum rather than at the nearest
integer multiple of the step, so a weight already on a Q4_1 grid (the source GGUF's) is kept exactly.
Such layers take no outliers (the dense part under an outlier would not be 0). With `steps`
(packing.param_steps: one fp16 step per row for the scales, one for the mins, fixed up front by
row_param_steps from an RTN fit) the scales and mins are snapped to 8-bit codes of those steps inside
the range search, so each group's range is chosen for the grid it will really have.
"""
from __future__ import annotations

import torch

from shrinkrt.runtime.packing import (GROUP_SIZES, MIN_CODE_MAX, MIN_FORMATS, PARAM_BITS,  # noqa: F401
                                      SCALE_CODE_MAX, SUPPORTED_BITS, TILE, Packed, check_bits, code_words,
                                      param_steps, param_values,
                                      dequantize, expand_groups, n_groups, pack, pack_bits, unpack, unpack_bits,
                                      zero_words)

# Shrinking the group range trades clipping error on the extremes for a finer step; searched per
# group because the best factor differs a lot between 2 and 8 bits.
RANGE_SHRINK = (1.0, 0.95, 0.9, 0.85, 0.8, 0.75, 0.7)
LAZY = 32  # GPTQ columns updated one by one before the rest of the matrix gets one matmul update


# ---------------------------------------------------------------- quantizers
# Both quantizers take the bit width per row (an int, or a tensor of one width per row): calib/mq.py
# stacks every candidate width of every linear sharing an input into one call, so GPTQ's column
# loop and its inverse Hessian are paid once per input, not once per candidate.
def _maxq(bits, rows: int) -> torch.Tensor:
    b = torch.as_tensor(bits, dtype=torch.int64).expand(rows) if not torch.is_tensor(bits) or bits.dim() == 0 \
        else bits.to(torch.int64)
    for v in torch.unique(b).tolist():
        check_bits(int(v))
    return (2**b - 1).to(torch.float32)


def group_params(w: torch.Tensor, maxq: torch.Tensor, keep: torch.Tensor | None = None,
                 col_weight: torch.Tensor | None = None, mins: bool = False,
                 steps: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Scale (fp16-representable, float32) and zero point (float; with `mins`, the fp16-representable
    min) of one group w (rows, g), per row; with `steps` (rows, 2) the scale and min lie on those
    8-bit grids instead (scale code >= 1, min code rounded down or up, whichever errs less).

    Positions in `keep` (outliers) neither set the range nor count in the error. The range is the
    min/max shrunk by the factor in RANGE_SHRINK with the least squared error (weighted per column
    by `col_weight`, the input energy, when given)."""
    big = torch.finfo(torch.float32).max
    lo = torch.where(keep, big, w) if keep is not None else w
    hi = torch.where(keep, -big, w) if keep is not None else w
    xmin, xmax = lo.min(dim=1).values, hi.max(dim=1).values
    empty = xmin > xmax  # every weight of the group is an outlier
    xmin, xmax = torch.where(empty, 0.0, xmin), torch.where(empty, 0.0, xmax)
    cw = col_weight if col_weight is not None else torch.ones(w.shape[1])
    best_err = torch.full((w.shape[0],), float("inf"))
    best_s, best_z = torch.ones(w.shape[0]), torch.zeros(w.shape[0])
    for f in RANGE_SHRINK:
        s, z = _scale_zero(xmin * f, xmax * f, maxq, mins)
        for s, z in ([(s, z)] if steps is None else _on_steps(s, z, steps)):
            d = _deq(_round(w, s[:, None], z[:, None], maxq[:, None], mins), s[:, None], z[:, None], mins) - w
            if keep is not None:
                d = torch.where(keep, 0.0, d)
            err = (d * d * cw).sum(dim=1)
            better = err < best_err
            best_err = torch.where(better, err, best_err)
            best_s, best_z = torch.where(better, s, best_s), torch.where(better, z, best_z)
    return best_s, best_z


def _on_steps(s, m, steps):
    """(scale, min) pairs on the rows' 8-bit grids near (s, m): the scale code rounded (at least 1, so
    the step stays positive), the min code floored and ceiled (the grid then starts below or above
    the group's min; the error decides)."""
    ss, sm = steps[:, :1], steps[:, 1:]
    sc = torch.round(s[:, None] / ss).clamp(1, SCALE_CODE_MAX)
    t = m[:, None] / sm
    return [tuple(v[:, 0] for v in param_values(sc, torch.floor(t).clamp(-MIN_CODE_MAX, MIN_CODE_MAX), steps)),
            tuple(v[:, 0] for v in param_values(sc, torch.ceil(t).clamp(-MIN_CODE_MAX, MIN_CODE_MAX), steps))]


def row_param_steps(w: torch.Tensor, bits, group_size: int, col_weight: torch.Tensor | None = None) -> torch.Tensor:
    """The per-row steps (rows, 2) of 8-bit param codes for weight w (rows, cols) at `bits` (one, or
    one per row): packing.param_steps of the groups' fp16 RTN min fit (input energy `col_weight`)."""
    _, s, m, _ = quantize_rtn(w, bits, group_size, col_weight=col_weight, mins=True)
    return param_steps(s, m)


def _scale_zero(xmin, xmax, maxq, mins: bool = False):
    # Smallest fp16 normal as the floor: a constant group still gets a valid step.
    s = ((xmax - xmin) / maxq).clamp(min=2.0**-14).to(torch.float16).to(torch.float32)
    if mins:
        return s, xmin.to(torch.float16).to(torch.float32)
    z = torch.minimum(torch.round(-xmin / s).clamp(min=0), maxq)
    return s, z


def _round(w, s, z, maxq, mins: bool = False):
    """Codes of w on the grid (q - z) * s, or q * s + z with `mins` (z the group's min)."""
    if mins:
        return torch.minimum(torch.round((w - z) / s).clamp(min=0), maxq)
    return torch.minimum((torch.round(w / s) + z).clamp(min=0), maxq)


def _deq(q, s, z, mins: bool = False):
    """The value the reference dequantization (runtime/packing.py) gives code q."""
    return q * s + z if mins else (q - z) * s


def _check_mins(keep, mins: bool, steps=None) -> None:
    if mins and keep is not None and bool(keep.any()):
        raise ValueError("a layer stored with mins takes no outliers")
    if steps is not None and not mins:
        raise ValueError("param steps are for a layer stored with mins")


def quantize_rtn(w: torch.Tensor, bits, group_size: int, keep: torch.Tensor | None = None,
                 col_weight: torch.Tensor | None = None, mins: bool = False, steps: torch.Tensor | None = None):
    """Round to nearest. Returns (codes (rows, cols) int64, scales (rows, G), zeros (rows, G) int64
    (with `mins`: the mins, float32), W' float32): W' is what the model computes with (outliers keep
    their exact value, their code is the zero point so the dense part is 0 there). `steps`: the
    scales and mins on those rows' 8-bit grids (row_param_steps)."""
    _check_mins(keep, mins, steps)
    rows, cols = w.shape
    maxq = _maxq(bits, rows)
    w = w.float()
    G = n_groups(cols, group_size)
    q = torch.empty(rows, cols, dtype=torch.int64)
    scales, zeros = torch.empty(rows, G), torch.empty(rows, G, dtype=torch.float32 if mins else torch.int64)
    for g in range(G):
        c0, c1 = g * group_size, min(cols, (g + 1) * group_size)
        kg = keep[:, c0:c1] if keep is not None else None
        cw = col_weight[c0:c1] if col_weight is not None else None
        s, z = group_params(w[:, c0:c1], maxq, kg, cw, mins, steps)
        q[:, c0:c1] = _round(w[:, c0:c1], s[:, None], z[:, None], maxq[:, None], mins).long()
        scales[:, g], zeros[:, g] = s, (z if mins else z.long())
    deq = _deq(q.float(), expand_groups(scales, group_size, cols), expand_groups(zeros, group_size, cols).float(), mins)
    if keep is not None:
        q = torch.where(keep, expand_groups(zeros, group_size, cols), q)
        deq = torch.where(keep, w, deq)
    return q, scales, zeros, deq


def inverse_hessian(H: torch.Tensor, damp: float = 0.01) -> tuple[torch.Tensor, torch.Tensor]:
    """(upper Cholesky factor of (H + damp * mean diag * I)^-1, the damped diagonal) in float32.
    Row i of the factor is the direction along which column i's error is spread over columns > i."""
    H = H.double().clone()
    dead = torch.diag(H) == 0  # inputs never active: their weights cannot matter
    H[dead, dead] = 1.0
    H += damp * torch.diag(H).mean() * torch.eye(H.shape[0], dtype=H.dtype)
    L = torch.linalg.cholesky(H)
    return torch.linalg.cholesky(torch.cholesky_inverse(L), upper=True).float(), torch.diag(H).float()


def quantize_gptq(w: torch.Tensor, H: torch.Tensor, bits, group_size: int, keep: torch.Tensor | None = None,
                  damp: float = 0.01, hinv: tuple[torch.Tensor, torch.Tensor] | None = None, act_order: bool = False,
                  mins: bool = False, steps: torch.Tensor | None = None):
    """GPTQ (Frantar et al. 2022): quantize columns left to right, spreading each column's error
    over the columns not yet quantized through the inverse Hessian H = E[x x^T] of the layer input.
    Blocks equal groups, so each group's range is taken from fully updated weights. Outliers in
    `keep` are never rounded (zero error) but still receive compensation; the stored outlier value
    is the compensated weight. `hinv`: inverse_hessian(H) when already computed. Same returns as RTN.

    act_order: columns in order of decreasing input energy (diag H), so the most active inputs are
    rounded first and the error lands on the quiet ones; groups stay contiguous in the stored layout
    (the kernels read no permutation), so each group's range is fixed up front from the weights
    ("static groups"). `hinv` must then be inverse_hessian of H permuted by activation_order(H).
    `mins`, `steps`: groups keep their min instead of a zero point, on 8-bit grids (quantize_rtn)."""
    _check_mins(keep, mins, steps)
    rows, cols = w.shape
    maxq = _maxq(bits, rows)
    G = n_groups(cols, group_size)
    zdtype = torch.float32 if mins else torch.int64
    scales, zeros = torch.empty(rows, G), torch.empty(rows, G, dtype=zdtype)
    bounds = [(g * group_size, min(cols, (g + 1) * group_size)) for g in range(G)]
    if act_order:
        perm = activation_order(H)
        Hinv, energy_p = hinv if hinv is not None else inverse_hessian(H[perm][:, perm], damp)
        energy = torch.empty_like(energy_p)
        energy[perm] = energy_p
    else:
        perm = torch.arange(cols)
        Hinv, energy = hinv if hinv is not None else inverse_hessian(H, damp)
    w = w.float().clone()
    w[:, energy == 0] = 0.0
    # Work on W^T (permuted): a column of W is then a contiguous row, both updates in-place BLAS calls.
    Wt = w[:, perm].t().contiguous()
    keep_t = keep[:, perm].t() if keep is not None else None
    if act_order:
        for g, (c0, c1) in enumerate(bounds):  # static groups: ranges from the weights before any update
            s_g, z_g = group_params(w[:, c0:c1], maxq, keep[:, c0:c1] if keep is not None else None, energy[c0:c1],
                                    mins, steps)
            scales[:, g], zeros[:, g] = s_g, z_g.to(zdtype)
        col_s = expand_groups(scales, group_size, cols)[:, perm].t()
        col_z = expand_groups(zeros, group_size, cols)[:, perm].t().float()
        spans, params = [(0, cols)], lambda c0, c1: (col_s[c0:c1], col_z[c0:c1])
    else:
        def params(c0, c1):  # the group's range from its fully updated weights
            g = c0 // group_size
            s_g, z_g = group_params(Wt[c0:c1].t(), maxq, keep[:, c0:c1] if keep is not None else None,
                                    energy[c0:c1], mins, steps)
            scales[:, g], zeros[:, g] = s_g, z_g.to(zdtype)
            return s_g.expand(c1 - c0, rows), z_g.expand(c1 - c0, rows)
        spans = bounds
    q, out = _sweep(Wt, Hinv, maxq, keep_t, spans, params, mins)
    inv = torch.argsort(perm)
    q, out = q[inv].t(), out[inv].t()
    if keep is not None:
        q = torch.where(keep, expand_groups(zeros, group_size, cols), q)
    return q.contiguous(), scales, zeros, out.contiguous()


def _sweep(Wt, Hinv, maxq, keep_t, spans, params, mins: bool = False):
    """GPTQ's column loop over W^T: round column i with its (scale, zero), spread its error over the
    columns after it (one by one inside a LAZY block, one matmul for the rest). `params(c0, c1)` is
    called as span [c0, c1) starts and gives the per-column scales and zeros of the span."""
    cols, rows = Wt.shape
    q = torch.empty(cols, rows, dtype=torch.int64)
    out = torch.empty(cols, rows)
    err = torch.empty(LAZY, rows)
    for c0, c1 in spans:
        s_cols, z_cols = params(c0, c1)
        for b0 in range(c0, c1, LAZY):
            b1 = min(b0 + LAZY, c1)
            for i in range(b0, b1):
                col, s, z = Wt[i], s_cols[i - c0], z_cols[i - c0]
                qi = _round(col, s, z, maxq, mins)
                di = _deq(qi, s, z, mins)
                if keep_t is not None:
                    di = torch.where(keep_t[i], col, di)
                q[i], out[i] = qi.long(), di
                e = err[i - b0]
                torch.div(col - di, Hinv[i, i], out=e)
                Wt[i + 1:b1].addr_(Hinv[i, i + 1:b1], e, alpha=-1)
            if b1 < cols:
                Wt[b1:].addmm_(Hinv[b0:b1, b1:].t(), err[:b1 - b0], alpha=-1)
    return q, out


def activation_order(H: torch.Tensor) -> torch.Tensor:
    """The column order act-order GPTQ quantizes in: decreasing diag H (ties by index, so deterministic)."""
    return torch.sort(torch.diag(H).double(), descending=True, stable=True).indices

