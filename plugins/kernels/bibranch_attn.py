"""Bi-branch cache attention kernels (docs/ops.md BiBranchAttention) and the op built from them.

Per query token t of a call (positions p = past_length + t), in stream order:
  1. `bibranch_append_kernel` writes token t's key/value into the window ring (slot p mod W);
  2. `bibranch_split_kernel`: each program takes one (batch, query head) and one split of the
     feature branch, or the window, and writes its partial max, sum and weighted sums
     (flash-decoding); the feature rows are the stored ones (j < past_length) or this call's own
     (quantized by `feature_quant_kernel` first, as a later call would read them);
  3. `bibranch_reduce_kernel` merges the splits and applies the value up-projection once.
past_length is read on the device and the grid is sized by the feature store's capacity (splits
past the last attended row exit at once), so a decode step launches the same grid every time
(CUDA-graph friendly) and the host never reads a device value.

Features: fp16, int8, or int4 (two's-complement nibbles, low = even feature) with fp16 scales per
op_contract.FEATURE_GROUP features. Keys: pre-RoPE K_j = RoPE(c_j @ k_up[:, g] + b_k, j) rebuilt per key; post-RoPE scores
(q @ k_up_g^T) . c_j with the folded query computed once per program. Decode is one token per
call; a prompt runs token by token through the same kernels (the plugin's prefill path is correct,
not fast: a blocked prefill kernel is future work).
"""
from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from shrinkrt.runtime import op_contract
from shrinkrt.runtime.op_contract import MIN_SPLIT, split_plan  # noqa: F401 (the plan the plugin uses)

# the contract's numbers as the kernels see them (a @triton.jit body reads only constexpr globals)
SCALE_FLOOR = tl.constexpr(op_contract.SCALE_FLOOR)
GROUP = tl.constexpr(op_contract.FEATURE_GROUP)
HALF_GROUP = tl.constexpr(op_contract.FEATURE_GROUP // 2)  # int4 bytes per group
NS_PAD = op_contract.SPLITS_PAD
R_PAD = op_contract.RANK_PAD


@triton.jit
def _load_features(ptr, scale_ptr, row_off, scale_off, rs, jmask, R, BITS: tl.constexpr):
    """Dequantized features (BLOCK_J, R_PAD) of the rows at row_off (element offsets per row)."""
    rmask = rs < R
    m = jmask[:, None] & rmask[None, :]
    if BITS == 16:
        return tl.load(ptr + row_off[:, None] + rs[None, :], mask=m, other=0.0).to(tl.float32)
    if BITS == 8:
        q = tl.load(ptr + row_off[:, None] + rs[None, :], mask=m, other=0).to(tl.float32)
    else:
        byte = tl.load(ptr + row_off[:, None] + rs[None, :] // 2, mask=m, other=0).to(tl.int32)
        nib = tl.where(rs[None, :] % 2 == 0, byte & 15, (byte >> 4) & 15)
        q = tl.where(nib >= 8, nib - 16, nib).to(tl.float32)
    s = tl.load(scale_ptr + scale_off[:, None] + rs[None, :] // GROUP, mask=m, other=0.0).to(tl.float32)
    return q * s


@triton.jit
def bibranch_append_kernel(k_ptr, v_ptr, win_k_ptr, win_v_ptr, past_ptr, t, T,
                           G: tl.constexpr, D: tl.constexpr, W: tl.constexpr):
    """Token t's key/value (B, T, G*D) -> ring slot (past + t) mod W of (B, G, W, D), as float16."""
    bg = tl.program_id(0)
    b = bg // G
    g = bg % G
    p = tl.load(past_ptr).to(tl.int32) + t
    ds = tl.arange(0, D)
    src = (b * T + t) * (G * D) + g * D + ds
    dst = ((b * G + g) * W + p % W) * D + ds
    tl.store(win_k_ptr + dst, tl.load(k_ptr + src).to(tl.float16))
    tl.store(win_v_ptr + dst, tl.load(v_ptr + src).to(tl.float16))


@triton.jit
def feature_quant_kernel(c_ptr, out_ptr, scales_ptr, R, C, BITS: tl.constexpr, R_PAD: tl.constexpr):
    """One feature row (R values) -> its stored form: fp16 (C = R), or per GROUP features a symmetric
    scale max|c| / qmax (fp16) and codes round-half-even(c / scale) (int8, C = R; int4 packed two
    per byte, C = ceil(R/2)); bit-identical to runtime/kv_quant.py."""
    row = tl.program_id(0)
    if BITS == 16:
        rs = tl.arange(0, R_PAD)
        x = tl.load(c_ptr + row * R + rs, mask=rs < R, other=0.0)
        tl.store(out_ptr + row * C + rs, x.to(tl.float16), mask=rs < R)
    else:
        QMAX: tl.constexpr = 2 ** (BITS - 1) - 1
        i = tl.arange(0, HALF_GROUP)
        for gi in tl.static_range(R_PAD // GROUP):
            ev = gi * GROUP + 2 * i
            od = ev + 1
            xe = tl.load(c_ptr + row * R + ev, mask=ev < R, other=0.0).to(tl.float32)
            xo = tl.load(c_ptr + row * R + od, mask=od < R, other=0.0).to(tl.float32)
            amax = tl.maximum(tl.max(tl.abs(xe), axis=0), tl.max(tl.abs(xo), axis=0))
            scale = tl.maximum(tl.math.div_rn(amax, QMAX * 1.0), SCALE_FLOOR).to(tl.float16)
            sf = scale.to(tl.float32)
            if gi * GROUP < R:
                tl.store(scales_ptr + row * ((R + GROUP - 1) // GROUP) + gi, scale)
            # (y + 1.5 * 2^23) - 1.5 * 2^23 rounds half to even, like torch.round
            qe = tl.minimum(tl.maximum((tl.math.div_rn(xe, sf) + 12582912.0) - 12582912.0, -QMAX - 1.0), QMAX * 1.0)
            qo = tl.minimum(tl.maximum((tl.math.div_rn(xo, sf) + 12582912.0) - 12582912.0, -QMAX - 1.0), QMAX * 1.0)
            qe = qe.to(tl.int32)
            qo = qo.to(tl.int32)
            if BITS == 8:
                tl.store(out_ptr + row * C + ev, qe.to(tl.int8), mask=ev < R)
                tl.store(out_ptr + row * C + od, qo.to(tl.int8), mask=od < R)
            else:
                byte = (qe & 15) | ((qo & 15) << 4)
                byte = tl.where(byte >= 128, byte - 256, byte)
                tl.store(out_ptr + row * C + gi * HALF_GROUP + i, byte.to(tl.int8), mask=gi * HALF_GROUP + i < C)


@triton.jit
def bibranch_split_kernel(q_ptr, win_k_ptr, win_v_ptr, fk_ptr, fks_ptr, fv_ptr, fvs_ptr,
                          fkn_ptr, fksn_ptr, fvn_ptr, fvsn_ptr, k_up_ptr, k_bias_ptr,
                          cos_ptr, sin_ptr, part_ml_ptr, part_w_ptr, part_c_ptr, past_ptr,
                          t, T, S, n_splits, split_len, RK, RV, CK, CV,
                          H: tl.constexpr, G: tl.constexpr, D: tl.constexpr, W: tl.constexpr,
                          RK_PAD: tl.constexpr, RV_PAD: tl.constexpr, BITS: tl.constexpr, POST_ROPE: tl.constexpr,
                          W_PAD: tl.constexpr, BLOCK_J: tl.constexpr):
    bh = tl.program_id(0)
    sp = tl.program_id(1)  # splits 0..n_splits-1: feature branch; n_splits: the window
    b = bh // H
    h = bh % H
    g = h // (H // G)
    past = tl.load(past_ptr).to(tl.int32)
    p = past + t
    ds = tl.arange(0, D)
    q = tl.load(q_ptr + ((b * T + t) * H + h) * D + ds).to(tl.float32) / tl.sqrt(D * 1.0)  # (D,)
    base = (bh * (n_splits + 1) + sp)
    m_i = -float("inf")
    l_i = 0.0
    acc_w = tl.zeros((D,), dtype=tl.float32)
    acc_c = tl.zeros((RV_PAD,), dtype=tl.float32)
    if sp == n_splits:  # the window: positions p-W+1..p that exist
        slots = tl.arange(0, W_PAD)
        smask = slots < W
        pos = p - (((p - slots) % W + W) % W)  # the newest position <= p in each slot (C-style % made >= 0)
        ok = smask & (pos >= 0) & (pos <= p) & (pos > p - W)
        off = ((b * G + g) * W + slots) * D
        k = tl.load(win_k_ptr + off[:, None] + ds[None, :], mask=ok[:, None], other=0.0).to(tl.float32)
        s = tl.sum(k * q[None, :], axis=1)
        s = tl.where(ok, s, -float("inf"))
        m_i = tl.max(s, axis=0)
        e = tl.where(ok, tl.exp(s - m_i), 0.0)
        l_i = tl.sum(e, axis=0)
        v = tl.load(win_v_ptr + off[:, None] + ds[None, :], mask=ok[:, None], other=0.0).to(tl.float32)
        acc_w = tl.sum(e[:, None] * v, axis=0)
    else:
        n_c = p - W + 1  # feature rows attended: 0..p-W
        j0 = sp * split_len
        rk = tl.arange(0, RK_PAD)
        rv = tl.arange(0, RV_PAD)
        gk = (RK + GROUP - 1) // GROUP
        gv = (RV + GROUP - 1) // GROUP
        if POST_ROPE:  # fold the query through this head's up-projection once: qf[r] = q . k_up[r, g]
            up = tl.load(k_up_ptr + rk[:, None] * (G * D) + g * D + ds[None, :], mask=(rk < RK)[:, None],
                         other=0.0).to(tl.float32)
            qf = tl.sum(up * q[None, :], axis=1)  # (RK_PAD,)
        for jb in range(j0, tl.minimum(j0 + split_len, n_c), BLOCK_J):
            js = jb + tl.arange(0, BLOCK_J)
            jmask = (js < n_c) & (js < j0 + split_len)
            stored = jmask & (js < past)  # rows of the store, else this call's new rows
            fresh = jmask & (js >= past)
            row = b * S + js
            nrow = b * T + (js - past)
            ck = (_load_features(fk_ptr, fks_ptr, row * CK, row * gk, rk, stored, RK, BITS)
                  + _load_features(fkn_ptr, fksn_ptr, nrow * CK, nrow * gk, rk, fresh, RK, BITS))
            if POST_ROPE:
                s = tl.sum(ck * qf[None, :], axis=1)
            else:  # rebuild the keys of this block, then rotate them at their positions
                half = D // 2
                d1 = tl.arange(0, D)
                kk = tl.zeros((BLOCK_J, D), dtype=tl.float32)
                kr = tl.zeros((BLOCK_J, D), dtype=tl.float32)
                dpart = (d1 + half) % D  # rotate_half partner
                for r in range(0, RK):
                    c_r = tl.sum(tl.where(rk[None, :] == r, ck, 0.0), axis=1)  # (BLOCK_J,)
                    u = tl.load(k_up_ptr + r * (G * D) + g * D + d1).to(tl.float32)
                    up_p = tl.load(k_up_ptr + r * (G * D) + g * D + dpart).to(tl.float32)
                    kk += c_r[:, None] * u[None, :]
                    kr += c_r[:, None] * up_p[None, :]
                bias = tl.load(k_bias_ptr + g * D + d1).to(tl.float32)
                bias_p = tl.load(k_bias_ptr + g * D + dpart).to(tl.float32)
                kk += bias[None, :]
                kr += bias_p[None, :]
                sign = tl.where(d1 < half, -1.0, 1.0)
                cs = tl.load(cos_ptr + js[:, None] * D + d1[None, :], mask=jmask[:, None], other=0.0).to(tl.float32)
                sn = tl.load(sin_ptr + js[:, None] * D + d1[None, :], mask=jmask[:, None], other=0.0).to(tl.float32)
                key = kk * cs + sign[None, :] * kr * sn
                s = tl.sum(key * q[None, :], axis=1)
            s = tl.where(jmask, s, -float("inf"))
            m_new = tl.maximum(m_i, tl.max(s, axis=0))
            alpha = tl.where(m_new == -float("inf"), 1.0, tl.exp(m_i - m_new))
            e = tl.where(jmask, tl.exp(s - m_new), 0.0)
            cv = (_load_features(fv_ptr, fvs_ptr, row * CV, row * gv, rv, stored, RV, BITS)
                  + _load_features(fvn_ptr, fvsn_ptr, nrow * CV, nrow * gv, rv, fresh, RV, BITS))
            acc_c = acc_c * alpha + tl.sum(e[:, None] * cv, axis=0)
            l_i = l_i * alpha + tl.sum(e, axis=0)
            m_i = m_new
    tl.store(part_ml_ptr + base * 2, m_i)
    tl.store(part_ml_ptr + base * 2 + 1, l_i)
    tl.store(part_w_ptr + base * D + ds, acc_w)
    tl.store(part_c_ptr + base * RV_PAD + tl.arange(0, RV_PAD), acc_c)


@triton.jit
def bibranch_reduce_kernel(part_ml_ptr, part_w_ptr, part_c_ptr, v_up_ptr, v_bias_ptr, y_ptr, t, T, n_splits, RV,
                           H: tl.constexpr, G: tl.constexpr, D: tl.constexpr,
                           RV_PAD: tl.constexpr, NS_PAD: tl.constexpr):
    bh = tl.program_id(0)
    b = bh // H
    h = bh % H
    g = h // (H // G)
    sps = tl.arange(0, NS_PAD)
    smask = sps <= n_splits
    base = bh * (n_splits + 1) + sps
    m = tl.load(part_ml_ptr + base * 2, mask=smask, other=-float("inf"))
    l = tl.load(part_ml_ptr + base * 2 + 1, mask=smask, other=0.0)
    m_all = tl.max(m, axis=0)
    wgt = tl.where(smask & (m > -float("inf")), tl.exp(m - m_all), 0.0)
    denom = tl.sum(l * wgt, axis=0)
    ds = tl.arange(0, D)
    rv = tl.arange(0, RV_PAD)
    acc_w = tl.sum(tl.load(part_w_ptr + base[:, None] * D + ds[None, :], mask=smask[:, None], other=0.0)
                   * wgt[:, None], axis=0)
    acc_c = tl.sum(tl.load(part_c_ptr + base[:, None] * RV_PAD + rv[None, :], mask=smask[:, None], other=0.0)
                   * wgt[:, None], axis=0)
    l_c = tl.sum(tl.where(sps < n_splits, l * wgt, 0.0), axis=0)  # probability mass of the features
    up = tl.load(v_up_ptr + rv[:, None] * (G * D) + g * D + ds[None, :], mask=(rv < RV)[:, None],
                 other=0.0).to(tl.float32)
    y = acc_w + tl.sum(acc_c[:, None] * up, axis=0) + l_c * tl.load(v_bias_ptr + g * D + ds).to(tl.float32)
    tl.store(y_ptr + ((b * T + t) * H + h) * D + ds, (y / denom).to(y_ptr.dtype.element_ty))


def _launch_token(q, win_k, win_v, feats, k_up, v_up, k_bias, v_bias, rope_cos, rope_sin, past, t, T, y,
                  bits, post_rope, n_splits, split_len, block_j):
    (fk, fks, fv, fvs), (fkn, fksn, fvn, fvsn) = feats
    B, G, W, D = win_k.shape
    H = q.shape[-1] // D
    RK, RV = k_up.shape[0], v_up.shape[0]
    rv_pad = max(16, triton.next_power_of_2(RV))
    dev = q.device
    part_ml = torch.empty(B * H * (n_splits + 1) * 2, dtype=torch.float32, device=dev)
    part_w = torch.empty(B * H * (n_splits + 1) * D, dtype=torch.float32, device=dev)
    part_c = torch.empty(B * H * (n_splits + 1) * rv_pad, dtype=torch.float32, device=dev)
    bibranch_split_kernel[(B * H, n_splits + 1)](
        q, win_k, win_v, fk, fks, fv, fvs, fkn, fksn, fvn, fvsn, k_up, k_bias, rope_cos, rope_sin,
        part_ml, part_w, part_c, past, t, T, fk.shape[1], n_splits, split_len, RK, RV, fk.shape[2], fv.shape[2],
        H=H, G=G, D=D, W=W, RK_PAD=max(16, triton.next_power_of_2(RK)), RV_PAD=rv_pad, BITS=bits,
        POST_ROPE=post_rope, W_PAD=triton.next_power_of_2(W), BLOCK_J=block_j)
    bibranch_reduce_kernel[(B * H,)](part_ml, part_w, part_c, v_up, v_bias, y, t, T, n_splits, RV, H=H, G=G, D=D,
                                     RV_PAD=rv_pad, NS_PAD=max(NS_PAD, triton.next_power_of_2(n_splits + 1)))


def quantize_features(c: torch.Tensor, bits: int) -> tuple[torch.Tensor, torch.Tensor | None]:
    """c (B, T, r) -> stored rows (B, T, C) and fp16 scales (B, T, ceil(r / FEATURE_GROUP)) (None at 16 bits)."""
    B, T, r = c.shape
    C = r if bits != 4 else (r + 1) // 2
    out = torch.empty(B, T, C, dtype=torch.float16 if bits == 16 else torch.int8, device=c.device)
    scales = torch.empty(B, T, -(-r // op_contract.FEATURE_GROUP), dtype=torch.float16, device=c.device)
    if B * T:
        feature_quant_kernel[(B * T,)](c.contiguous(), out, scales, r, C, BITS=bits,
                                       R_PAD=max(op_contract.FEATURE_GROUP, triton.next_power_of_2(r)))
    return out, (scales if bits < 16 else None)


def bibranch_attention(q, k, v, c_k, c_v, win_k, win_v, feat_k, feat_v, k_up, v_up, k_bias, v_bias,
                       rope_cos, rope_sin, past_length, bits: int, key_mode: int, feat_k_scales=None,
                       feat_v_scales=None, split_len: int | None = None, block_j: int = 16) -> dict:
    """The whole BiBranchAttention op (docs/ops.md) from the kernels, in the order the TensorRT
    plugin launches them. past_length: int64 tensor (1,) on the device. Returns the op's outputs by name."""
    B, T, _ = q.shape
    W = win_k.shape[2]
    S = feat_k.shape[1]
    dummy = torch.zeros(1, dtype=torch.float16, device=q.device)
    fk_new, fks_new = quantize_features(c_k, bits)
    fv_new, fvs_new = quantize_features(c_v, bits)
    win_k_out, win_v_out = win_k.clone(), win_v.clone()
    if split_len is None:
        n_splits, split_len = split_plan(S, W)
    else:
        n_splits = max(1, math.ceil(max(1, S - W + 1) / split_len))
    feats = ((feat_k, feat_k_scales if feat_k_scales is not None else dummy, feat_v,
              feat_v_scales if feat_v_scales is not None else dummy),
             (fk_new, fks_new if fks_new is not None else dummy, fv_new, fvs_new if fvs_new is not None else dummy))
    y = torch.empty_like(q)
    q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
    G, D = win_k.shape[1], win_k.shape[3]
    for t in range(T):
        bibranch_append_kernel[(B * G,)](k, v, win_k_out, win_v_out, past_length, t, T, G=G, D=D, W=W)
        _launch_token(q, win_k_out, win_v_out, feats, k_up, v_up, k_bias, v_bias, rope_cos, rope_sin, past_length,
                      t, T, y, bits, key_mode == 1, n_splits, split_len, block_j)
    out = {"y": y, "win_k_out": win_k_out, "win_v_out": win_v_out, "feat_k_new": fk_new, "feat_v_new": fv_new}
    if bits < 16:
        out.update(feat_k_scales_new=fks_new, feat_v_scales_new=fvs_new)
    return out


def bibranch_decode(q, win_k, win_v, feat_k, feat_k_scales, feat_v, feat_v_scales, k_up, v_up, k_bias, v_bias,
                    rope_cos, rope_sin, p: int, bits: int, post_rope: bool, split_len: int = 256,
                    block_j: int = 16) -> torch.Tensor:
    """One decode step over a cache that already holds position p (ring slot written, features of
    rows < p stored): q (B, H, D) rotated -> y (B, H, D) (before o_proj), q's dtype."""
    B, H, D = q.shape
    W = win_k.shape[2]
    S = feat_k.shape[1]
    n_splits = max(1, math.ceil(max(1, S - W + 1) / split_len))
    dummy = torch.zeros(1, dtype=torch.float16, device=q.device)
    past = torch.tensor([p], dtype=torch.int64, device=q.device)
    fks = feat_k_scales if feat_k_scales is not None else dummy
    fvs = feat_v_scales if feat_v_scales is not None else dummy
    feats = ((feat_k, fks, feat_v, fvs), (feat_k, fks, feat_v, fvs))  # no rows of this call are attended
    y = torch.empty(B, 1, H * D, dtype=q.dtype, device=q.device)
    _launch_token(q.reshape(B, 1, H * D).contiguous(), win_k, win_v, feats, k_up, v_up, k_bias, v_bias,
                  rope_cos, rope_sin, past, 0, 1, y, bits, post_rope, n_splits, split_len, block_j)
    return y.view(B, H, D)
