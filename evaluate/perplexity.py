"""Perplexity over fixed, non-overlapping segments (the GPTQ/wikitext convention), and the long-context
form that scores only tokens with a long past (`long_perplexity`).

Each segment of `context` tokens is scored on its own from an empty cache, every token but the
first predicted. With chunk < context the segment is fed through the cache `chunk` tokens at a time,
so a compressed cache is exercised exactly as in decoding (chunk=1 is token-by-token decode).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from tqdm import tqdm


def segments(tokens: list[int], context: int = 1024, max_segments: int = 0) -> list[list[int]]:
    """The scored segments: consecutive, non-overlapping, `context` tokens each, the tail dropped.
    In each, every token but the first is predicted from the ones before it in the segment; other
    scorers (the llama.cpp peer in benchmarks/weight_quant.py) take the same segments and rule."""
    n_seg = len(tokens) // context
    if max_segments:
        n_seg = min(n_seg, max_segments)
    if n_seg == 0:
        raise ValueError(f"{len(tokens)} tokens are fewer than one segment of {context}")
    return [tokens[s * context:(s + 1) * context] for s in range(n_seg)]


@torch.inference_mode()
def perplexity(model, tokens: list[int], context: int = 1024, chunk: int = 0,
               max_segments: int = 0, progress: bool = True) -> dict:
    segs = segments(tokens, context, max_segments)
    n_seg = len(segs)
    device = model.embed_tokens.weight.device
    chunk = chunk or context
    nll, count = 0.0, 0
    for ids in tqdm(segs, desc=f"perplexity ({n_seg}x{context} tok)", disable=not progress, leave=False):
        seg = torch.tensor([ids], device=device)
        model.setup_caches(1, context)
        logits = torch.cat([model(seg[:, i:i + chunk], i) for i in range(0, context, chunk)], dim=1)
        nll += F.cross_entropy(logits[0, :-1], seg[0, 1:], reduction="sum").item()
        count += context - 1
    model.clear_caches()
    return {"perplexity": math.exp(nll / count), "nll_per_token": nll / count, "context": context,
            "segments": n_seg, "scored_tokens": count, "chunk": chunk}


@torch.inference_mode()
def long_perplexity(model, tokens: list[int], context: int = 4096, score_from: int = 1024, chunk: int = 1024,
                    max_segments: int = 0, progress: bool = True) -> dict:
    """Perplexity of long segments, scoring only the tokens at positions >= score_from.

    A compressed cache differs from the full one only for keys older than its window, so tokens
    predicted from a short past measure the window, not the compression: here every scored token is
    predicted from at least `score_from` earlier tokens. Segments are non-overlapping, `context`
    tokens each, or one segment of the whole text when it is shorter. The first `score_from`
    tokens go in as one prefill (only its last row's logits: it predicts the first scored token),
    the rest `chunk` at a time through the cache (the caches compute the same thing for any
    chunking, runtime/cskv.py), which keeps the logits held at once to chunk x vocab.

    kv_bytes_fraction: the bytes the cache really holds after the whole segment over an FP16 full
    cache of as many tokens (evaluate/memory.py), i.e. at the length where the scoring ends; the
    fraction after the unscored prefix is kept too (`kv_bytes_fraction_at_score_from`)."""
    from .memory import fp16_full_kv_bytes

    context = min(context, len(tokens))
    if not 1 <= score_from < context:
        raise ValueError(f"score_from must be in [1, {context - 1}] for segments of {context} tokens "
                         f"(got {score_from})")
    n_seg = len(tokens) // context
    if max_segments:
        n_seg = min(n_seg, max_segments)
    device = model.embed_tokens.weight.device
    nll, count, at_from, at_end = 0.0, 0, set(), set()
    for s in tqdm(range(n_seg), desc=f"long perplexity ({n_seg}x{context} tok)", disable=not progress,
                  leave=False):
        seg = torch.tensor([tokens[s * context:(s + 1) * context]], device=device)
        model.setup_caches(1, context)
        first = model(seg[:, :score_from], 0, last_only=True)[0]  # predicts seg[score_from]
        nll += F.cross_entropy(first, seg[0, score_from:score_from + 1], reduction="sum").item()
        at_from.add(model.cache_nbytes())
        for a in range(score_from, context, chunk):
            b = min(a + chunk, context)
            logits = model(seg[:, a:b], a)[0]  # row i predicts seg[a + i + 1]
            target = seg[0, a + 1:b + 1]  # one short in the last chunk: its last row predicts nothing
            nll += F.cross_entropy(logits[:len(target)], target, reduction="sum").item()
        at_end.add(model.cache_nbytes())
        count += context - score_from
    model.clear_caches()
    if len(at_from) != 1 or len(at_end) != 1:  # same length, same bytes: anything else is a cache bug
        raise RuntimeError(f"cache bytes differ between segments of equal length: {sorted(at_from)}, {sorted(at_end)}")
    (b_from,), (b_end,) = at_from, at_end
    return {"perplexity": math.exp(nll / count), "nll_per_token": nll / count, "context": context,
            "score_from": score_from, "segments": n_seg, "scored_tokens": count, "chunk": chunk,
            "kv_bytes_at": {str(score_from): b_from, str(context): b_end},
            "kv_bytes_fraction": b_end / fp16_full_kv_bytes(model.args, context),
            "kv_bytes_fraction_at_score_from": b_from / fp16_full_kv_bytes(model.args, score_from)}
