"""Llama-family forward in plain PyTorch (Llama, Mistral, Qwen2, SmolLM).

Written for this project, not wrapped from transformers: calibration swaps `Attention` (and its
cache) and the `nn.Linear`s for compressed versions, and export traces these modules. Weight names
follow Hugging Face checkpoints (minus the leading `model.`) so that checkpoints load unmapped.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from .config import ModelArgs
from .kv_cache import KVCache


def rope_inv_freq(args: ModelArgs) -> torch.Tensor:
    """Inverse frequency of each rotary pair, in float32 exactly as HF computes it (parity at 8k)."""
    d = args.head_dim
    inv = 1.0 / (args.rope_theta ** (torch.arange(0, d, 2, dtype=torch.int64).float() / d))
    s = args.rope_scaling or {}
    kind = s.get("rope_type", "default")
    if kind == "linear":
        inv = inv / s["factor"]
    elif kind == "llama3":
        # Llama 3.1: long wavelengths slowed by `factor`, short ones kept, a linear ramp between.
        factor, lo, hi = s["factor"], s["low_freq_factor"], s["high_freq_factor"]
        old_ctx = s["original_max_position_embeddings"]
        wavelen = 2 * math.pi / inv
        scaled = torch.where(wavelen > old_ctx / lo, inv / factor, inv)
        smooth = (old_ctx / wavelen - lo) / (hi - lo)
        ramp = (1 - smooth) * scaled / factor + smooth * scaled
        mid = (wavelen >= old_ctx / hi) & (wavelen <= old_ctx / lo)
        inv = torch.where(mid, ramp, scaled)
    return inv


def rope_tables(args: ModelArgs, max_len: int) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin tables (max_len, head_dim), halves duplicated (HF's rotate_half layout)."""
    inv = rope_inv_freq(args)
    freqs = torch.outer(torch.arange(max_len, dtype=torch.float32), inv)
    emb = torch.cat([freqs, freqs], dim=-1)
    return emb.cos(), emb.sin()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x: (B, H, T, D); cos/sin: (T, D) for the positions of x."""
    half = x.shape[-1] // 2
    rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
    return x * cos + rotated * sin


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Normalise in fp32 whatever the activation dtype (as the reference checkpoints were trained).
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * xf.to(x.dtype)


class Attention(nn.Module):
    """GQA self-attention over a KV cache. CSKV replaces this module (and its cache) per layer."""

    def __init__(self, args: ModelArgs):
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = args.n_heads, args.n_kv_heads, args.head_dim
        self.sliding_window = args.sliding_window
        self.q_proj = nn.Linear(args.dim, args.n_heads * args.head_dim, bias=args.qkv_bias)
        self.k_proj = nn.Linear(args.dim, args.kv_dim, bias=args.qkv_bias)
        self.v_proj = nn.Linear(args.dim, args.kv_dim, bias=args.qkv_bias)
        self.o_proj = nn.Linear(args.n_heads * args.head_dim, args.dim, bias=args.o_bias)
        self.cache: KVCache | None = None

    def setup_cache(self, batch: int, max_seq_len: int, dtype: torch.dtype, device) -> None:
        self.cache = KVCache(batch, self.n_kv_heads, max_seq_len, self.head_dim, dtype, device)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, start: int) -> torch.Tensor:
        B, T, _ = x.shape
        q = self.q_proj(x).view(B, T, self.n_heads, self.head_dim).transpose(1, 2)
        k = self.k_proj(x).view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)
        v = self.v_proj(x).view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)
        q, k = apply_rope(q, cos, sin).to(x.dtype), apply_rope(k, cos, sin).to(x.dtype)
        if self.cache is not None:
            k, v = self.cache.update(start, k, v)
        y = attend(q, k, v, start, self.sliding_window)
        return self.o_proj(y.transpose(1, 2).reshape(B, T, -1))


def attend(q, k, v, start: int, sliding_window: int | None = None) -> torch.Tensor:
    """Causal GQA attention of queries at positions start..start+T-1 over keys 0..L-1."""
    T, L = q.shape[2], k.shape[2]
    mask = None
    if sliding_window is not None and L > sliding_window:
        qpos = torch.arange(start, start + T, device=q.device)[:, None]
        kpos = torch.arange(L, device=q.device)[None, :]
        mask = (kpos <= qpos) & (kpos > qpos - sliding_window)
    elif T > 1:
        if start == 0 and L == T:
            return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
        qpos = torch.arange(start, start + T, device=q.device)[:, None]
        mask = torch.arange(L, device=q.device)[None, :] <= qpos
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True)


class MLP(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.gate_proj = nn.Linear(args.dim, args.intermediate_size, bias=args.mlp_bias)
        self.up_proj = nn.Linear(args.dim, args.intermediate_size, bias=args.mlp_bias)
        self.down_proj = nn.Linear(args.intermediate_size, args.dim, bias=args.mlp_bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class Block(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.input_layernorm = RMSNorm(args.dim, args.norm_eps)
        self.self_attn = Attention(args)
        self.post_attention_layernorm = RMSNorm(args.dim, args.norm_eps)
        self.mlp = MLP(args)

    def forward(self, x, cos, sin, start: int):
        h = x + self.self_attn(self.input_layernorm(x), cos, sin, start)
        return h + self.mlp(self.post_attention_layernorm(h))


class Transformer(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.args = args
        self.embed_tokens = nn.Embedding(args.vocab_size, args.dim)
        self.layers = nn.ModuleList(Block(args) for _ in range(args.n_layers))
        self.norm = RMSNorm(args.dim, args.norm_eps)
        self.lm_head = nn.Linear(args.dim, args.vocab_size, bias=False)
        if args.tie_embeddings:
            self.lm_head.weight = self.embed_tokens.weight
        cos, sin = rope_tables(args, args.max_seq_len)
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)
        self.max_cache_len = 0

    @property
    def device(self) -> torch.device:
        return self.embed_tokens.weight.device

    def setup_caches(self, batch: int, max_seq_len: int, dtype: torch.dtype | None = None) -> None:
        """Allocate every layer's cache once; generation then only calls forward."""
        if max_seq_len > self.args.max_seq_len:
            raise ValueError(f"cache of {max_seq_len} tokens exceeds the model's context {self.args.max_seq_len}")
        dtype = dtype or self.embed_tokens.weight.dtype
        device = self.embed_tokens.weight.device
        for layer in self.layers:
            layer.self_attn.setup_cache(batch, max_seq_len, dtype, device)
        self.max_cache_len = max_seq_len

    def clear_caches(self) -> None:
        for layer in self.layers:
            layer.self_attn.cache = None
        self.max_cache_len = 0

    def cache_length(self) -> int:
        """Tokens the caches hold (every layer holds the same positions)."""
        cache = self.layers[0].self_attn.cache
        return cache.length if cache is not None else 0

    def cache_nbytes(self) -> int:
        """Bytes the caches hold for the tokens stored so far (what the runtime really keeps)."""
        return sum(layer.self_attn.cache.nbytes() for layer in self.layers if layer.self_attn.cache is not None)

    def forward(self, tokens: torch.Tensor, start: int = 0, last_only: bool = False) -> torch.Tensor:
        """tokens: (B, T) at positions start..start+T-1 -> logits (B, T, vocab) in float32
        (B, 1, vocab) with last_only: a prefill needs only the last row, and the LM head is 20% of it."""
        T = tokens.shape[1]
        if start + T > self.args.max_seq_len:
            raise ValueError(f"positions up to {start + T} exceed the model's context {self.args.max_seq_len}")
        if self.max_cache_len and start + T > self.max_cache_len:
            raise ValueError(f"positions up to {start + T} exceed the cache of {self.max_cache_len} tokens")
        x = self.embed_tokens(tokens)
        cos, sin = self.rope_cos[start:start + T], self.rope_sin[start:start + T]
        for layer in self.layers:
            x = layer(x, cos, sin, start)
        if last_only:
            x = x[:, -1:]
        return self.lm_head(self.norm(x)).float()

    def weight_nbytes(self) -> int:
        """Bytes of the distinct stored weights: parameters plus the persistent buffers that compressed
        modules keep (packed codes, scales, outliers); caches and RoPE tables are not weights."""
        seen, total = set(), 0
        tensors = [t for _, t in self.named_parameters()]
        tensors += [t for name, t in self.named_buffers() if ".cache." not in name and not name.startswith("rope_")
                    and not name.split(".")[-1].startswith("_")]
        for t in tensors:
            if t.data_ptr() not in seen:
                seen.add(t.data_ptr())
                total += t.numel() * t.element_size()
        return total
