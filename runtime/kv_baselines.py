"""KV-compression baselines at equal bytes, as drop-in attention modules with honest caches.

KIVI (Liu et al., 2024): keys quantized per channel over blocks of 32 tokens, values per token over
groups of 32 channels, asymmetric (FP16 scale + zero), the newest `window` tokens kept in FP16.
StreamingLLM (Xiao et al., 2023): attention sinks (the first `sinks` tokens) + the newest `window`.
Both follow the per-query rule of runtime/cskv.py: a key at j is exact when j > p - window.
"""
from __future__ import annotations

import math

import torch
from torch import nn

from .model import apply_rope

BLOCK = 32


def quant_asym(x: torch.Tensor, bits: int, dim: int):
    """Asymmetric quantization with min/max over `dim` -> (codes uint8, scale fp16, zero fp16)."""
    lo, hi = x.amin(dim, keepdim=True), x.amax(dim, keepdim=True)
    scale = ((hi - lo) / (2 ** bits - 1)).clamp_min(1e-8).half()
    zero = lo.half()
    codes = torch.round((x - zero.float()) / scale.float()).clamp(0, 2 ** bits - 1).to(torch.uint8)
    return codes, scale, zero


class _Ring(nn.Module):
    """FP16 ring of the newest `size` tokens' K and V (slot = position % size)."""

    def __init__(self, batch, n_kv, size, head_dim, device):
        super().__init__()
        s = max(size, 1)
        self.size = size
        self.register_buffer("k", torch.zeros(batch, n_kv, s, head_dim, dtype=torch.float16, device=device))
        self.register_buffer("v", torch.zeros(batch, n_kv, s, head_dim, dtype=torch.float16, device=device))
        self.register_buffer("pos", torch.full((s,), -1, dtype=torch.long, device=device))

    def push(self, start, k, v):
        if not self.size:
            return
        T = k.shape[2]
        keep = min(T, self.size)
        pos = torch.arange(start + T - keep, start + T, device=k.device)
        self.k[:, :, pos % self.size] = k[:, :, T - keep:].half()
        self.v[:, :, pos % self.size] = v[:, :, T - keep:].half()
        self.pos[pos % self.size] = pos

    def held(self) -> int:
        return int((self.pos >= 0).sum())

    def token_bytes(self) -> int:
        return 2 * self.k[:, :, 0].numel() * 2


class _BaselineAttention(nn.Module):
    def __init__(self, attn):
        super().__init__()
        if attn.sliding_window is not None:
            raise ValueError("KV baselines are not combined with sliding-window attention")
        self.n_heads, self.n_kv_heads, self.head_dim = attn.n_heads, attn.n_kv_heads, attn.head_dim
        self.q_proj, self.k_proj, self.v_proj, self.o_proj = attn.q_proj, attn.k_proj, attn.v_proj, attn.o_proj
        self.sliding_window = None
        self.cache = None

    def qkv(self, x, cos, sin):
        B, T, _ = x.shape
        H, G, hd = self.n_heads, self.n_kv_heads, self.head_dim
        q = apply_rope(self.q_proj(x).view(B, T, H, hd).transpose(1, 2), cos, sin).float()
        k = apply_rope(self.k_proj(x).view(B, T, G, hd).transpose(1, 2), cos, sin).half().float()
        v = self.v_proj(x).view(B, T, G, hd).transpose(1, 2).half().float()
        return q, k, v

    def attend(self, q, keys, values, allowed, x):
        """keys/values (B, G, S, hd), allowed (T, S) -> o_proj(output)."""
        rep = self.n_heads // self.n_kv_heads
        s = q @ keys.repeat_interleave(rep, dim=1).transpose(-1, -2) / math.sqrt(self.head_dim)
        p = torch.softmax(s.masked_fill(~allowed, float("-inf")), dim=-1)
        y = p @ values.repeat_interleave(rep, dim=1)
        B, T = x.shape[:2]
        return self.o_proj(y.transpose(1, 2).reshape(B, T, -1).to(x.dtype))


class KIVICache(nn.Module):
    def __init__(self, batch, n_kv, head_dim, max_len, window, bits, device):
        super().__init__()
        if window < BLOCK:
            raise ValueError(f"KIVI needs a window of at least {BLOCK} tokens (got {window})")
        self.bits, self.window, self.length, self.blocks = bits, window, 0, 0
        self.ring = _Ring(batch, n_kv, window, head_dim, device)
        self.pending_k, self.pending_v = [], []  # tokens of the incomplete block (also in the ring)
        nb = math.ceil(max_len / BLOCK)
        shape = (batch, n_kv, nb * BLOCK, head_dim)
        self.register_buffer("k_codes", torch.zeros(shape, dtype=torch.uint8, device=device))
        self.register_buffer("v_codes", torch.zeros(shape, dtype=torch.uint8, device=device))
        # keys: per channel per block; values: per token per group of 32 channels
        self.register_buffer("k_scale", torch.zeros(batch, n_kv, nb, head_dim, dtype=torch.float16, device=device))
        self.register_buffer("k_zero", torch.zeros_like(self.k_scale))
        vg = math.ceil(head_dim / BLOCK)
        self.register_buffer("v_scale", torch.zeros(batch, n_kv, nb * BLOCK, vg, dtype=torch.float16, device=device))
        self.register_buffer("v_zero", torch.zeros_like(self.v_scale))

    def append(self, start, k, v):
        old = (self.ring.k.clone(), self.ring.v.clone(), self.ring.pos.clone())
        self.pending_k.append(k)
        self.pending_v.append(v)
        pk, pv = torch.cat(self.pending_k, 2), torch.cat(self.pending_v, 2)
        n_full = pk.shape[2] // BLOCK
        for b in range(n_full):  # quantize each block once all its tokens have arrived
            kb, vb = pk[:, :, b * BLOCK:(b + 1) * BLOCK], pv[:, :, b * BLOCK:(b + 1) * BLOCK]
            i, sl = self.blocks, slice(self.blocks * BLOCK, (self.blocks + 1) * BLOCK)
            c, s, z = quant_asym(kb, self.bits, dim=2)
            self.k_codes[:, :, sl], self.k_scale[:, :, i], self.k_zero[:, :, i] = c, s[:, :, 0], z[:, :, 0]
            B, G, _, hd = vb.shape
            vg = vb.unflatten(-1, (-1, BLOCK)) if hd % BLOCK == 0 else vb.unsqueeze(-2)
            c, s, z = quant_asym(vg, self.bits, dim=-1)
            self.v_codes[:, :, sl] = c.flatten(-2)
            self.v_scale[:, :, sl], self.v_zero[:, :, sl] = s[..., 0], z[..., 0]
            self.blocks += 1
        rest = pk.shape[2] - n_full * BLOCK
        self.pending_k, self.pending_v = [pk[:, :, pk.shape[2] - rest:]], [pv[:, :, pv.shape[2] - rest:]]
        self.ring.push(start, k, v)
        self.length = start + k.shape[2]
        return old

    def dequant(self, n):
        """Dequantized K, V of positions 0..n-1 (all inside complete blocks)."""
        nb = math.ceil(n / BLOCK)
        kc = self.k_codes[:, :, :nb * BLOCK].float().unflatten(2, (nb, BLOCK))
        k = (kc * self.k_scale[:, :, :nb, None].float() + self.k_zero[:, :, :nb, None].float()).flatten(2, 3)
        vc = self.v_codes[:, :, :nb * BLOCK].float()
        hd = vc.shape[-1]
        vg = vc.unflatten(-1, (-1, BLOCK)) if hd % BLOCK == 0 else vc.unsqueeze(-2)
        v = (vg * self.v_scale[:, :, :nb * BLOCK, :, None].float()
             + self.v_zero[:, :, :nb * BLOCK, :, None].float()).flatten(-2)
        return k[:, :, :n], v[:, :, :n]

    def nbytes(self) -> int:
        n = self.blocks * BLOCK
        B, G, _, hd = self.k_codes.shape
        codes = 2 * B * G * n * math.ceil(hd * self.bits / 8)
        scales = (self.k_scale[:, :, :self.blocks].numel() * 2 + self.v_scale[:, :, :n].numel() * 2) * 2
        return codes + scales + self.ring.held() * self.ring.token_bytes()


class KIVIAttention(_BaselineAttention):
    def __init__(self, attn, bits: int, window: int):
        super().__init__(attn)
        self.bits, self.window = bits, window

    def setup_cache(self, batch, max_seq_len, dtype, device):
        self.cache = KIVICache(batch, self.n_kv_heads, self.head_dim, max_seq_len, self.window, self.bits, device)

    def forward(self, x, cos, sin, start: int):
        q, k, v = self.qkv(x, cos, sin)
        T, W = x.shape[1], self.window
        ring_k, ring_v, ring_pos = self.cache.append(start, k, v)
        qpos = torch.arange(start, start + T, device=x.device)
        keys, vals = [ring_k.float(), k], [ring_v.float(), v]
        fpos = torch.cat([ring_pos, qpos])
        allowed = [(fpos[None] >= 0) & (fpos[None] <= qpos[:, None]) & (fpos[None] > qpos[:, None] - W)]
        n_c = start + T - W
        if n_c > 0:
            kq, vq = self.cache.dequant(n_c)
            keys.insert(0, kq)
            vals.insert(0, vq)
            allowed.insert(0, torch.arange(n_c, device=x.device)[None] <= qpos[:, None] - W)
        return self.attend(q, torch.cat(keys, 2), torch.cat(vals, 2), torch.cat(allowed, 1), x)


class SinkWindowCache(nn.Module):
    def __init__(self, batch, n_kv, head_dim, sinks, window, device):
        super().__init__()
        self.sinks, self.length = sinks, 0
        self.register_buffer("sink_k", torch.zeros(batch, n_kv, sinks, head_dim, dtype=torch.float16, device=device))
        self.register_buffer("sink_v", torch.zeros_like(self.sink_k))
        self.ring = _Ring(batch, n_kv, window, head_dim, device)

    def append(self, start, k, v):
        old = (self.ring.k.clone(), self.ring.v.clone(), self.ring.pos.clone())
        n = max(0, min(self.sinks - start, k.shape[2]))
        if n:
            self.sink_k[:, :, start:start + n], self.sink_v[:, :, start:start + n] = k[:, :, :n].half(), v[:, :, :n].half()
        self.ring.push(start, k, v)
        self.length = start + k.shape[2]
        return old

    def nbytes(self) -> int:
        sink_pos = set(range(min(self.sinks, self.length)))
        ring_pos = {p for p in self.ring.pos.tolist() if p >= 0}
        return len(sink_pos | ring_pos) * self.ring.token_bytes()


class SinkWindowAttention(_BaselineAttention):
    def __init__(self, attn, sinks: int, window: int):
        super().__init__(attn)
        self.sinks, self.window = sinks, window

    def setup_cache(self, batch, max_seq_len, dtype, device):
        self.cache = SinkWindowCache(batch, self.n_kv_heads, self.head_dim, self.sinks, self.window, device)

    def forward(self, x, cos, sin, start: int):
        q, k, v = self.qkv(x, cos, sin)
        T, W, S = x.shape[1], self.window, self.sinks
        ring_k, ring_v, ring_pos = self.cache.append(start, k, v)
        qpos = torch.arange(start, start + T, device=x.device)
        fpos = torch.cat([ring_pos, qpos])
        ok_recent = (fpos[None] >= 0) & (fpos[None] <= qpos[:, None]) & (fpos[None] > qpos[:, None] - W)
        spos = torch.arange(S, device=x.device)
        ok_sink = (spos[None] < min(S, start + T)) & (spos[None] <= qpos[:, None] - W)  # else in the window
        keys = torch.cat([self.cache.sink_k.float(), ring_k.float(), k], 2)
        vals = torch.cat([self.cache.sink_v.float(), ring_v.float(), v], 2)
        return self.attend(q, keys, vals, torch.cat([ok_sink, ok_recent], 1), x)


def apply_kivi(model, bits: int, window: int) -> None:
    for layer in model.layers:
        layer.self_attn = KIVIAttention(layer.self_attn, bits, window)


def apply_sink_window(model, sinks: int, window: int) -> None:
    for layer in model.layers:
        layer.self_attn = SinkWindowAttention(layer.self_attn, sinks, window)
