"""CSKV attention (arXiv 2409.10593) with the bi-branch cache, in the reference runtime.

Per layer, K and V get low-rank factors: features c = (input) @ down (r dims) are what the cache
keeps for old tokens; up (r -> n_kv*head_dim) rebuilds them. The newest `window` tokens are also
kept at full precision (FP16). For a query at position p, keys/values at positions j > p - window
come from the full-precision branch and those at j <= p - window from the feature branch, whatever
the chunking of the calls, so a long prefill, a chunked prefill and token-by-token decode compute
the same thing.

key_mode "pre-rope":  c_k = x @ k_down;  K_j = RoPE(c_k,j @ k_up + b_k, j) rebuilt at attention time.
key_mode "post-rope": c_k = RoPE(x W_k^T + b_k) @ k_down (features of the rotated keys); the
                      up-projection folds into the query: q.K_j = (q @ k_up_g^T) . c_k,j.
Values (both modes): c_v = x @ v_down; the up-projection is applied once after the weighted sum.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from . import kernels, kv_quant
from .model import apply_rope, attend

KEY_MODES = ("pre-rope", "post-rope")
QUERY_BLOCK = 256


@dataclass
class CSKVConfig:
    key_mode: str
    window: int
    bits: int  # 16 (FP16 features), 8 or 4
    sinks: int = 0  # the first tokens, kept at full precision for good (attention sinks)


class FeatureStore(nn.Module):
    """Features of every stored token: FP16, or int8/int4 codes + FP16 per-group scales."""

    def __init__(self, batch: int, max_len: int, r: int, bits: int, device=None):
        super().__init__()
        self.r, self.bits = r, bits
        if bits == 16:
            self.register_buffer("codes", torch.zeros(batch, max_len, r, dtype=torch.float16, device=device))
            self.register_buffer("scales", torch.zeros(batch, max_len, 0, dtype=torch.float16, device=device))
        else:
            width = r if bits == 8 else (r + 1) // 2
            dtype = torch.int8 if bits == 8 else torch.uint8
            self.register_buffer("codes", torch.zeros(batch, max_len, width, dtype=dtype, device=device))
            self.register_buffer("scales", torch.zeros(batch, max_len, kv_quant.n_groups(r), dtype=torch.float16,
                                                       device=device))

    def write(self, start: int, c: torch.Tensor) -> None:
        end = start + c.shape[1]
        if self.bits == 16:
            self.codes[:, start:end] = c.half()
        else:
            codes, scales = kv_quant.quantize(c, self.bits)
            self.codes[:, start:end], self.scales[:, start:end] = codes, scales

    def read(self, end: int) -> torch.Tensor:
        if self.bits == 16:
            return self.codes[:, :end].float()
        return kv_quant.dequantize(self.codes[:, :end], self.scales[:, :end], self.bits, self.r)

    def nbytes(self, length: int) -> int:
        return self.codes.shape[0] * length * kv_quant.row_bytes(self.r, self.bits)


class BiBranchCache(nn.Module):
    """Window ring of full-precision K/V (slot = position % window) + feature stores for all tokens."""

    def __init__(self, batch, n_kv, head_dim, max_len, window, r_k, r_v, bits, device=None, sinks: int = 0):
        super().__init__()
        self.window, self.sinks = window, sinks
        w = max(window, 1)
        self.register_buffer("sink_k", torch.zeros(batch, n_kv, max(sinks, 1), head_dim, dtype=torch.float16, device=device))
        self.register_buffer("sink_v", torch.zeros(batch, n_kv, max(sinks, 1), head_dim, dtype=torch.float16, device=device))
        self.register_buffer("win_k", torch.zeros(batch, n_kv, w, head_dim, dtype=torch.float16, device=device))
        self.register_buffer("win_v", torch.zeros(batch, n_kv, w, head_dim, dtype=torch.float16, device=device))
        self.register_buffer("win_pos", torch.full((w,), -1, dtype=torch.long, device=device))
        self.feat_k = FeatureStore(batch, max_len, r_k, bits, device)
        self.feat_v = FeatureStore(batch, max_len, r_v, bits, device)
        self.max_len = max_len
        self.length = 0

    def append(self, start: int, k, v, c_k, c_v):
        """Store the new tokens; returns the window as it stood before them (k, v, positions)."""
        T = k.shape[2]
        if start != self.length:
            raise ValueError(f"bi-branch cache appends at {self.length}, got a write at {start}")
        if start + T > self.max_len:
            raise ValueError(f"cache of {self.max_len} tokens cannot hold position {start + T - 1}")
        old = (self.win_k.clone(), self.win_v.clone(), self.win_pos.clone())
        self.feat_k.write(start, c_k)
        self.feat_v.write(start, c_v)
        if start < self.sinks:
            n = min(self.sinks, start + T) - start
            self.sink_k[:, :, start:start + n] = k[:, :, :n].half()
            self.sink_v[:, :, start:start + n] = v[:, :, :n].half()
        if self.window:
            keep = min(T, self.window)
            pos = torch.arange(start + T - keep, start + T, device=k.device)
            slots = pos % self.window
            self.win_k[:, :, slots] = k[:, :, T - keep:].half()
            self.win_v[:, :, slots] = v[:, :, T - keep:].half()
            self.win_pos[slots] = pos
        self.length = start + T
        return old

    def nbytes(self) -> int:
        held = min(self.length, self.window) + min(self.length, self.sinks)
        full = 2 * self.win_k[:, :, 0].numel() * self.win_k.element_size() * held
        return full + self.feat_k.nbytes(self.length) + self.feat_v.nbytes(self.length)


class CSKVAttention(nn.Module):
    """Drop-in for runtime.model.Attention: same projections, plus the layer's low-rank factors."""

    def __init__(self, attn, cfg: CSKVConfig, k_down, k_up, v_down, v_up, rope_cos, rope_sin):
        super().__init__()
        if cfg.key_mode not in KEY_MODES:
            raise ValueError(f"unknown key mode '{cfg.key_mode}'")
        if attn.sliding_window is not None:
            raise ValueError("CSKV is not combined with sliding-window attention")
        self.cfg = cfg
        self.n_heads, self.n_kv_heads, self.head_dim = attn.n_heads, attn.n_kv_heads, attn.head_dim
        self.q_proj, self.k_proj, self.v_proj, self.o_proj = attn.q_proj, attn.k_proj, attn.v_proj, attn.o_proj
        self.sliding_window = None
        for name, t in (("k_down", k_down), ("k_up", k_up), ("v_down", v_down), ("v_up", v_up)):
            self.register_buffer(name, t.float(), persistent=False)
        # The rebuilt pre-RoPE keys need each old position's rotation.
        self.rope_cos, self.rope_sin = rope_cos, rope_sin
        self.cache: BiBranchCache | None = None

    def setup_cache(self, batch: int, max_seq_len: int, dtype, device) -> None:
        self.cache = BiBranchCache(batch, self.n_kv_heads, self.head_dim, max_seq_len, self.cfg.window,
                                   self.k_down.shape[1], self.v_down.shape[1], self.cfg.bits, device, self.cfg.sinks)

    def features(self, x, k_rot):
        """(c_k, c_v) of new tokens: x (B, T, dim), k_rot (B, n_kv, T, hd) rotated keys."""
        if self.cfg.key_mode == "pre-rope":
            c_k = x.float() @ self.k_down
        else:
            c_k = k_rot.transpose(1, 2).flatten(2).float() @ self.k_down
        return c_k, x.float() @ self.v_down

    def forward(self, x, cos, sin, start: int):
        B, T, _ = x.shape
        H, G, hd = self.n_heads, self.n_kv_heads, self.head_dim
        q = apply_rope(self.q_proj(x).view(B, T, H, hd).transpose(1, 2), cos, sin).float()
        # The full-precision branch is FP16: round this call's own keys/values as the window stores them,
        # so one-shot, chunked and token-by-token calls see identical numbers.
        k = apply_rope(self.k_proj(x).view(B, T, G, hd).transpose(1, 2), cos, sin).half().float()
        v = self.v_proj(x).view(B, T, G, hd).transpose(1, 2).half().float()
        if self.cache is None:  # no cache: plain causal attention over this call's tokens
            y = attend(q, k, v, 0)
            return self.o_proj(y.transpose(1, 2).reshape(B, T, -1).to(x.dtype))
        c_k, c_v = self.features(x, k)
        ring_k, ring_v, ring_pos = self.cache.append(start, k, v, c_k, c_v)
        if T == 1 and not self.cfg.sinks and kernels.enabled(x):  # decode on a GPU: the split + reduce kernels
            y = kernels.cskv_decode(self, q, start)
            return self.o_proj(y.transpose(1, 2).reshape(B, T, -1).to(x.dtype))
        end, W = start + T, self.cfg.window
        qpos = torch.arange(start, end, device=x.device)
        q = q / math.sqrt(hd)

        n_c = end - W  # positions 0..n_c-1 are in the feature branch for some query of this call
        comp = None
        if n_c > 0:
            ck, cv = self.cache.feat_k.read(n_c), self.cache.feat_v.read(n_c)
            if self.cfg.key_mode == "pre-rope":
                kc = ck @ self.k_up
                if self.k_proj.bias is not None:
                    kc = kc + self.k_proj.bias.float()
                kc = apply_rope(kc.view(B, n_c, G, hd).transpose(1, 2), self.rope_cos[:n_c].float(),
                                self.rope_sin[:n_c].float())
                comp = (kc, cv)
            else:
                comp = (ck, cv)
        # Query blocks: a block needs the feature keys up to its last query - W and the full keys of
        # its own span plus W before it, so blocking halves the prefill work against one T x T pass.
        ns = min(self.cfg.sinks, end)  # sinks stored so far, this call's included
        sinks = (self.cache.sink_k[:, :, :ns].float(), self.cache.sink_v[:, :, :ns].float())
        ys = [self._block(q[:, :, a:a + QUERY_BLOCK], qpos[a:a + QUERY_BLOCK], a, ring_k, ring_v, ring_pos,
                          k, v, qpos, comp, sinks) for a in range(0, T, QUERY_BLOCK)]
        y = torch.cat(ys, dim=2)
        return self.o_proj(y.transpose(1, 2).reshape(B, T, -1).to(x.dtype))

    def _block(self, q, qpos, a, ring_k, ring_v, ring_pos, k, v, kpos, comp, sinks):
        """Attention of one query block (B, H, Tb, hd; pre-scaled) over both branches -> (B, H, Tb, hd)."""
        B, H, Tb, hd = q.shape
        G, W = self.n_kv_heads, self.cfg.window
        rep = H // G
        lo = max(0, a - W + 1)  # this call's keys that some query of the block sees at full precision
        ns = sinks[0].shape[2]
        kf = torch.cat([sinks[0], ring_k.float(), k[:, :, lo:a + Tb]], dim=2)  # (B, G, nf, hd)
        vf = torch.cat([sinks[1], ring_v.float(), v[:, :, lo:a + Tb]], dim=2)
        spos = torch.arange(ns, device=q.device)
        fpos = torch.cat([spos, ring_pos, kpos[lo:a + Tb]])
        qg = q.reshape(B, G, rep * Tb, hd)  # heads g*rep..(g+1)*rep-1 read KV head g
        s_full = (qg @ kf.transpose(-1, -2)).view(B, G, rep, Tb, -1)
        ok_full = (fpos[None] >= 0) & (fpos[None] <= qpos[:, None]) & (fpos[None] > qpos[:, None] - W)
        ok_full[:, :ns] = spos[None] <= qpos[:, None] - W  # sinks the window does not already hold
        s_full = s_full.masked_fill(~ok_full, float("-inf")).view(B, H, Tb, -1)
        n_blk = int(qpos[-1]) - W + 1  # feature-branch keys the block's last query reads
        if comp is None or n_blk <= 0:
            p_full = torch.softmax(s_full, dim=-1).view(B, G, rep * Tb, -1)
            return (p_full @ vf).view(B, H, Tb, hd)
        ck, cv = comp
        if self.cfg.key_mode == "pre-rope":
            s_comp = (qg @ ck[:, :, :n_blk].transpose(-1, -2)).view(B, H, Tb, n_blk)
        else:
            up = self.k_up.view(-1, G, hd).repeat_interleave(rep, dim=1)  # (r_k, H, hd)
            s_comp = torch.einsum("bhtd,rhd->bhtr", q, up) @ ck[:, None, :n_blk].transpose(-1, -2)
        j = torch.arange(n_blk, device=q.device)[None]
        ok_comp = (j <= qpos[:, None] - W) & (j >= self.cfg.sinks)
        s_comp = s_comp.masked_fill(~ok_comp, float("-inf"))
        p = torch.softmax(torch.cat([s_comp, s_full], dim=-1), dim=-1)
        p_comp, p_full = p[..., :n_blk], p[..., n_blk:]
        up_v = self.v_up.view(-1, G, hd).repeat_interleave(rep, dim=1)  # (r_v, H, hd)
        y = (p_full.reshape(B, G, rep * Tb, -1) @ vf).view(B, H, Tb, hd)
        y = y + torch.einsum("bhtr,rhd->bhtd", p_comp @ cv[:, None, :n_blk], up_v)
        if self.v_proj.bias is not None:
            bias = self.v_proj.bias.float().view(G, hd).repeat_interleave(rep, dim=0)  # (H, hd)
            y = y + p_comp.sum(-1, keepdim=True) * bias[None, :, None, :]
        return y
