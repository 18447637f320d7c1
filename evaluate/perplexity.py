"""Perplexity over fixed, non-overlapping segments (the GPTQ/wikitext convention).

Each segment of `context` tokens is scored on its own from an empty cache, every token but the
first predicted. With chunk < context the segment is fed through the cache `chunk` tokens at a time,
so a compressed cache is exercised exactly as in decoding (chunk=1 is token-by-token decode).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from tqdm import tqdm


@torch.inference_mode()
def perplexity(model, tokens: list[int], context: int = 1024, chunk: int = 0,
               max_segments: int = 0, progress: bool = True) -> dict:
    n_seg = len(tokens) // context
    if max_segments:
        n_seg = min(n_seg, max_segments)
    if n_seg == 0:
        raise ValueError(f"{len(tokens)} tokens are fewer than one segment of {context}")
    device = model.embed_tokens.weight.device
    chunk = chunk or context
    nll, count = 0.0, 0
    for s in tqdm(range(n_seg), desc=f"perplexity ({n_seg}x{context} tok)", disable=not progress, leave=False):
        seg = torch.tensor([tokens[s * context:(s + 1) * context]], device=device)
        model.setup_caches(1, context)
        logits = torch.cat([model(seg[:, i:i + chunk], i) for i in range(0, context, chunk)], dim=1)
        nll += F.cross_entropy(logits[0, :-1], seg[0, 1:], reduction="sum").item()
        count += context - 1
    model.clear_caches()
    return {"perplexity": math.exp(nll / count), "nll_per_token": nll / count, "context": context,
            "segments": n_seg, "scored_tokens": count, "chunk": chunk}
