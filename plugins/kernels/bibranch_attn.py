"""Bi-branch decode attention (docs/ops.md BiBranchAttention, one query token per sequence), split
over the sequence (flash-decoding): each program takes one (batch, query head) and one split of the
feature branch, or the window, and writes its partial max, sum and weighted sums; a reduce kernel
merges the splits and applies the value up-projection once.

Cache state as the op leaves it after appending the new token at position p: the window ring holds
positions max(0, p-W+1)..p (slot = position mod W); features rows 0..p exist, rows j <= p - W are
attended. Features: fp16, int8, or int4 (two's-complement nibbles, low = even feature) with fp16
scales per 32 features. Keys: pre-RoPE K_j = RoPE(c_j @ k_up[:, g] + b_k, j) rebuilt per key;
post-RoPE scores (q @ k_up_g^T) . c_j with the folded query computed once per program.
"""
from __future__ import annotations

import math

import torch
import triton
import triton.language as tl


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
    s = tl.load(scale_ptr + scale_off[:, None] + rs[None, :] // 32, mask=m, other=0.0).to(tl.float32)
    return q * s


@triton.jit
def bibranch_split_kernel(q_ptr, win_k_ptr, win_v_ptr, fk_ptr, fks_ptr, fv_ptr, fvs_ptr, k_up_ptr, k_bias_ptr,
                          cos_ptr, sin_ptr, part_ml_ptr, part_w_ptr, part_c_ptr,
                          p, S, n_splits, split_len, RK, RV, CK, CV,
                          H: tl.constexpr, G: tl.constexpr, D: tl.constexpr, W: tl.constexpr,
                          RK_PAD: tl.constexpr, RV_PAD: tl.constexpr, BITS: tl.constexpr, POST_ROPE: tl.constexpr,
                          W_PAD: tl.constexpr, BLOCK_J: tl.constexpr):
    bh = tl.program_id(0)
    sp = tl.program_id(1)  # splits 0..n_splits-1: feature branch; n_splits: the window
    b = bh // H
    h = bh % H
    g = h // (H // G)
    ds = tl.arange(0, D)
    q = tl.load(q_ptr + bh * D + ds).to(tl.float32) / tl.sqrt(D * 1.0)  # (D,)
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
        if POST_ROPE:  # fold the query through this head's up-projection once: qf[r] = q . k_up[r, g]
            up = tl.load(k_up_ptr + rk[:, None] * (G * D) + g * D + ds[None, :], mask=(rk < RK)[:, None],
                         other=0.0).to(tl.float32)
            qf = tl.sum(up * q[None, :], axis=1)  # (RK_PAD,)
        for jb in range(j0, tl.minimum(j0 + split_len, n_c), BLOCK_J):
            js = jb + tl.arange(0, BLOCK_J)
            jmask = (js < n_c) & (js < j0 + split_len)
            row = b * S + js
            ck = _load_features(fk_ptr, fks_ptr, row * CK, row * ((RK + 31) // 32), rk, jmask, RK, BITS)
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
            cv = _load_features(fv_ptr, fvs_ptr, row * CV, row * ((RV + 31) // 32), rv, jmask, RV, BITS)
            acc_c = acc_c * alpha + tl.sum(e[:, None] * cv, axis=0)
            l_i = l_i * alpha + tl.sum(e, axis=0)
            m_i = m_new
    tl.store(part_ml_ptr + base * 2, m_i)
    tl.store(part_ml_ptr + base * 2 + 1, l_i)
    tl.store(part_w_ptr + base * D + ds, acc_w)
    tl.store(part_c_ptr + base * RV_PAD + tl.arange(0, RV_PAD), acc_c)


@triton.jit
def bibranch_reduce_kernel(part_ml_ptr, part_w_ptr, part_c_ptr, v_up_ptr, v_bias_ptr, y_ptr, n_splits, RV,
                           H: tl.constexpr, G: tl.constexpr, D: tl.constexpr,
                           RV_PAD: tl.constexpr, NS_PAD: tl.constexpr):
    bh = tl.program_id(0)
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
    tl.store(y_ptr + bh * D + ds, (y / denom).to(y_ptr.dtype.element_ty))


NS_PAD = 64  # splits the AOT reduce kernel merges at most (64 x split_len tokens)
R_PAD = 256  # feature ranks the AOT kernels take at most (>= n_kv * head_dim of the default model)


def bibranch_decode(q, win_k, win_v, feat_k, feat_k_scales, feat_v, feat_v_scales, k_up, v_up, k_bias, v_bias,
                    rope_cos, rope_sin, p: int, bits: int, post_rope: bool, split_len: int = 256,
                    block_j: int = 16) -> torch.Tensor:
    """q (B, H, D) rotated; caches as described above -> y (B, H, D) (before o_proj), q's dtype."""
    B, H, D = q.shape
    G, W = win_k.shape[1], win_k.shape[2]
    S = feat_k.shape[1]
    RK, RV = k_up.shape[0], v_up.shape[0]
    n_c = max(0, p - W + 1)
    n_splits = max(1, math.ceil(n_c / split_len))
    rk_pad, rv_pad = triton.next_power_of_2(RK), triton.next_power_of_2(RV)
    dev = q.device
    part_ml = torch.empty(B * H * (n_splits + 1) * 2, dtype=torch.float32, device=dev)
    part_w = torch.empty(B * H * (n_splits + 1) * D, dtype=torch.float32, device=dev)
    part_c = torch.empty(B * H * (n_splits + 1) * rv_pad, dtype=torch.float32, device=dev)
    dummy = torch.zeros(1, dtype=torch.float16, device=dev)
    fks = feat_k_scales if feat_k_scales is not None else dummy
    fvs = feat_v_scales if feat_v_scales is not None else dummy
    bibranch_split_kernel[(B * H, n_splits + 1)](
        q.contiguous(), win_k, win_v, feat_k, fks, feat_v, fvs, k_up, k_bias, rope_cos, rope_sin,
        part_ml, part_w, part_c, p, S, n_splits, split_len, RK, RV, feat_k.shape[2], feat_v.shape[2],
        H=H, G=G, D=D, W=W, RK_PAD=rk_pad, RV_PAD=rv_pad, BITS=bits, POST_ROPE=post_rope, W_PAD=triton.next_power_of_2(W), BLOCK_J=block_j)
    y = torch.empty(B, H, D, dtype=q.dtype, device=dev)
    bibranch_reduce_kernel[(B * H,)](part_ml, part_w, part_c, v_up, v_bias, y, n_splits, RV, H=H, G=G, D=D,
                                     RV_PAD=rv_pad, NS_PAD=max(NS_PAD, triton.next_power_of_2(n_splits + 1)))
    return y
