"""Static KV cache: buffers allocated once, written in place, read up to the filled length.

The contract an attention module relies on: `update(start, k, v)` stores the new tokens at
positions start.. and returns everything the attention must see; `length` is the tokens stored;
`nbytes()` is the bytes held for them. The CSKV bi-branch cache keeps the same contract.
"""
from __future__ import annotations

import torch
from torch import nn


class KVCache(nn.Module):
    def __init__(self, batch: int, n_kv_heads: int, max_seq_len: int, head_dim: int, dtype, device=None):
        super().__init__()
        shape = (batch, n_kv_heads, max_seq_len, head_dim)
        self.register_buffer("k", torch.zeros(shape, dtype=dtype, device=device), persistent=False)
        self.register_buffer("v", torch.zeros(shape, dtype=dtype, device=device), persistent=False)
        self.length = 0

    def update(self, start: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        end = start + k.shape[2]
        if start > self.length:
            raise ValueError(f"cache write at {start} leaves a gap after {self.length} stored tokens")
        if end > self.k.shape[2]:
            raise ValueError(f"cache of {self.k.shape[2]} tokens cannot hold position {end - 1}")
        self.k[:, :, start:end] = k
        self.v[:, :, start:end] = v
        self.length = end
        return self.k[:, :, :end], self.v[:, :, :end]

    def nbytes(self) -> int:
        per_token = self.k[:, :, 0].numel() * self.k.element_size() * 2
        return per_token * self.length

    def allocated_nbytes(self) -> int:
        return (self.k.numel() + self.v.numel()) * self.k.element_size()
