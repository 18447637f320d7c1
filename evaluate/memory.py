"""Memory accounting from the runtime's own numbers: what the caches and weights really hold."""
from __future__ import annotations


def fp16_full_kv_bytes(args, tokens: int) -> int:
    """The reference every KV compression is compared to: an uncompressed FP16 K+V cache."""
    return 2 * args.n_layers * args.kv_dim * 2 * tokens


def memory_report(model, measured: dict[int, int], context: int) -> dict:
    """measured: stored tokens -> cache bytes the runtime reported after holding them."""
    args = model.args
    tokens = max(measured)
    per_token = measured[tokens] / tokens
    # Caches grow linearly past their window (full: bytes = b*L; bi-branch: a + b*L): extrapolate
    # through the two longest measurements.
    lens = sorted(measured)[-2:]
    slope = (measured[lens[1]] - measured[lens[0]]) / (lens[1] - lens[0]) if len(lens) == 2 else per_token
    at_context = measured[tokens] + slope * (context - tokens)
    params = sum(p.numel() for p in {p.data_ptr(): p for p in model.parameters()}.values())
    return {
        "weight_bytes": model.weight_nbytes(),
        "weight_params": params,
        "kv_bytes_per_token": per_token,
        "kv_bytes_measured": {str(k): v for k, v in sorted(measured.items())},
        "context": context,
        "kv_bytes_at_context": int(at_context),
        "kv_bytes_fp16_per_token": fp16_full_kv_bytes(args, 1),
        "kv_bytes_fp16_at_context": fp16_full_kv_bytes(args, context),
    }
