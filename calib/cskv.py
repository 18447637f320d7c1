"""CSKV calibration: low-rank K/V factors fitted layer by layer on calibration text.

1. Collect each layer's attention input X on calibration tokens (FP model, one pass).
2. Targets per layer: Y_k = X W_k^T (pre-RoPE) or RoPE(X W_k^T) (post-RoPE), Y_v = X W_v^T.
3. Ranks under the byte budget, across layers and K/V. allocation "error" (default): for each layer,
   K and V, and a grid of ranks, the measured relative error of the layer's attention output (o_proj
   included) on a calibration sample when the tokens older than the window use the rank-r features
   (quantized as the branch will be); an exact multiple-choice knapsack picks the ranks with the
   least summed error. allocation "energy": greedy marginal relative energy of the spectra. Energy
   gave keys a mean rank of 21 of 192 at 50% on the embedded model (values 163) and lost the passkey:
   softmax makes key errors cost far more than their energy share.
4. Initialise: activation-aware (top eigenvectors U of Y^T Y: down = W^T U, up = U^T, the optimum
   of the plain reconstruction loss) or plain SVD of W. Features are whitened (unit variance on the
   calibration data, folded into down/up; post-RoPE keys: one scale for all, prepare()) so per-token quantization treats them alike, and for an
   int8/int4 branch turned by a seeded random orthogonal matrix (folded in too): the eigen-features
   are decorrelated but a token's energy sits in a few of them, which per-token group scales
   quantize badly; the rotation spreads it over all (incoherence, as QuIP/QuaRot do for weights).
5. Fit: Adam on down/up minimising ||Y - Q(inputs @ down) @ up||^2 / ||Y||^2 with Q the branch's
   quantizer (straight-through), seeded minibatches: quantization-aware for int8/int4.
"""
from __future__ import annotations

import math
import time

import torch
from tqdm import tqdm

from shrinkrt.calib.mq import knapsack
from shrinkrt.errors import ShrinkError
from shrinkrt.runtime import kv_quant
from shrinkrt.runtime.cskv import KEY_MODES, CSKVAttention, CSKVConfig
from shrinkrt.runtime.model import apply_rope

REFERENCE_CONTEXT = 3072  # kv_bytes_fraction is measured against the FP16 full cache at 3k tokens


@torch.no_grad()  # not inference_mode: the fitting step differentiates through these tensors
def collect_inputs(model, tokens: list[int], segment: int = 1024, progress: bool = True):
    """Per layer: attention inputs X (N, dim) and the position of each row within its segment."""
    segment = min(segment, model.args.max_seq_len)
    xs = [[] for _ in model.layers]
    hooks = [layer.self_attn.register_forward_pre_hook(
        lambda mod, args, i=i: xs[i].append(args[0].reshape(-1, args[0].shape[-1]).float()))
        for i, layer in enumerate(model.layers)]
    model.clear_caches()
    pos = []
    try:
        segs = [tokens[i:i + segment] for i in range(0, len(tokens), segment)]
        for seg in tqdm(segs, desc="collect", disable=not progress, leave=False):
            model(torch.tensor([seg], device=model.embed_tokens.weight.device), 0, last_only=True)
            pos.append(torch.arange(len(seg)))
    finally:
        for h in hooks:
            h.remove()
    return [torch.cat(x) for x in xs], torch.cat(pos)


@torch.no_grad()
def targets(attn, x: torch.Tensor, pos: torch.Tensor, key_mode: str, cos, sin):
    """Bias-free K (pre- or post-RoPE) and V outputs of one layer, (N, kv_dim) each."""
    wk, wv = attn.k_proj.weight.float(), attn.v_proj.weight.float()
    yk, yv = x @ wk.T, x @ wv.T
    if key_mode == "post-rope":
        if attn.k_proj.bias is not None:
            yk = yk + attn.k_proj.bias.float()
        G, hd = attn.n_kv_heads, attn.head_dim
        yk = apply_rope(yk.view(-1, G, hd).transpose(0, 1), cos[pos].float(), sin[pos].float())
        yk = yk.transpose(0, 1).reshape(-1, G * hd)
    return yk, yv


def spectrum(y: torch.Tensor):
    """Eigenvalues (descending) and eigenvectors of Y^T Y in float64 (stable for small kv_dim)."""
    evals, evecs = torch.linalg.eigh(y.double().T @ y.double())
    return evals.flip(0).clamp_min(0), evecs.flip(1)


def feature_budget(args, kv_ratio: float, window: int, context: int = REFERENCE_CONTEXT, sinks: int = 0) -> float:
    """Bytes per token (all layers, K+V features) left after the FP16 window and sinks at `context` tokens."""
    full_per_token = 2 * args.n_layers * args.kv_dim * 2
    window_bytes = min(window + sinks, context) * full_per_token
    return (kv_ratio * full_per_token * context - window_bytes) / context


RANK_GRID = (1, 2, 4, 8, 12, 16, 24, 32, 48, 64, 80, 96, 112, 128, 144, 160, 176, 192, 256, 320, 384, 512)
ERROR_SAMPLE = 512  # calibration tokens (the first segment's start) for the measured-error curves


def spread_positions(pos: torch.Tensor, max_len: int, seed: int) -> torch.Tensor:
    """The calibration rows' positions with each segment moved to a seeded random start in [0, max_len).

    Post-RoPE key statistics depend on the absolute position: calibration segments are <= 1024 tokens,
    so the slow rotary pairs never turn there as they do at 4k-8k. Attention depends on relative
    positions only, so a segment moved as a whole keeps its outputs while its rotated keys sample the
    angles of every position the model can reach (measured with the old whitened post-RoPE basis: long
    perplexity x1.53 -> x1.44 at 30% int4)."""
    starts = torch.nonzero(pos == 0).flatten().tolist() + [len(pos)]
    g = torch.Generator().manual_seed(seed)
    out = pos.clone()
    for a, b in zip(starts[:-1], starts[1:]):
        out[a:b] += int(torch.randint(0, max(1, max_len - (b - a) + 1), (1,), generator=g))
    return out


def _mixed_attention(q, k_old, k_new, v_old, v_new, window: int, sinks: int = 0):
    """Causal attention (q: H, L, hd; k/v: G, L, hd) where keys/values of positions j <= p - window
    come from the *_old tensors (the feature branch) and the rest from *_new (the window)."""
    H, L, hd = q.shape
    rep = H // k_old.shape[0]
    k_old, k_new = k_old.repeat_interleave(rep, 0), k_new.repeat_interleave(rep, 0)
    v_old, v_new = v_old.repeat_interleave(rep, 0), v_new.repeat_interleave(rep, 0)
    p = torch.arange(L)
    old = (p[None, :] <= p[:, None] - window) & (p[None, :] >= sinks)
    causal = p[None, :] <= p[:, None]
    s = torch.where(old, q @ k_old.transpose(-1, -2), q @ k_new.transpose(-1, -2)) / math.sqrt(hd)
    a = torch.softmax(s.masked_fill(~causal, float("-inf")), dim=-1)
    return (a * old) @ v_old + (a * ~old) @ v_new


@torch.no_grad()
def error_curves(attn, x, pos, key_mode: str, cos, sin, window: int, bits: int, vecs, metrics, ranks, sinks=0):
    """Relative error of the layer's attention output (after o_proj) with K (then V) rebuilt from
    rank-r features, the other exact, for each r in `ranks`: ([err_k], [err_v])."""
    n = min(ERROR_SAMPLE, x.shape[0])
    x, pos = x[:n], pos[:n]
    H, G, hd = attn.n_heads, attn.n_kv_heads, attn.head_dim
    c, s_ = cos[pos].float(), sin[pos].float()

    def heads(y, g):  # (n, g*hd) -> (g, n, hd)
        return y.view(n, g, hd).transpose(0, 1)

    def lin(proj, inp):
        y = inp @ proj.weight.float().T
        return y if proj.bias is None else y + proj.bias.float()

    q = apply_rope(heads(lin(attn.q_proj, x), H), c, s_)
    k = apply_rope(heads(lin(attn.k_proj, x), G), c, s_)
    v = heads(lin(attn.v_proj, x), G)
    wo = attn.o_proj.weight.float()

    def out(o):
        return o.transpose(0, 1).reshape(n, H * hd) @ wo.T

    ref = out(_mixed_attention(q, k, k, v, v, window))
    norm = ref.pow(2).sum().clamp_min(1e-12)
    yk, yv = targets(attn, x, pos, key_mode, cos, sin)
    curves = []
    for j, (kind, w, y) in enumerate((("k", attn.k_proj.weight, yk), ("v", attn.v_proj.weight, yv))):
        sq, sq_inv = metrics[j]
        key_post = key_mode == "post-rope" and kind == "k"
        inputs = y if key_post else x
        errs = []
        for r in ranks:
            down, up = prepare(*init_factors(w.float().T, vecs[j], r, "activation", key_post, sq, sq_inv), inputs,
                               bits, per_feature=not key_post)
            y_hat = kv_quant.fake_quantize(inputs @ down, bits) @ up
            if kind == "k":
                if key_post:
                    k_hat = heads(y_hat, G)
                else:
                    b = attn.k_proj.bias
                    k_hat = apply_rope(heads(y_hat if b is None else y_hat + b.float(), G), c, s_)
                o = _mixed_attention(q, k_hat, k, v, v, window, sinks)
            else:
                b = attn.v_proj.bias
                o = _mixed_attention(q, k, k, heads(y_hat if b is None else y_hat + b.float(), G), v, window, sinks)
            errs.append(float((out(o) - ref).pow(2).sum() / norm))
        curves.append(errs)
    return curves


def allocate_by_error(curves: list[list[float]], ranks: list[int], budget_per_token: float, bits: int) -> list[int]:
    """One rank per matrix from `ranks`, least summed measured error, feature bytes/token <= budget
    (exact multiple-choice knapsack)."""
    weights = [[kv_quant.row_bytes(r, bits) for r in ranks] for _ in curves]
    choice = knapsack(weights, curves, int(budget_per_token))
    if choice is None:
        raise ShrinkError(f"the KV budget leaves {budget_per_token:.1f} bytes/token for features; rank "
                          f"{ranks[0]} everywhere needs {sum(w[0] for w in weights)}: raise --kv-ratio or shrink --window")
    return [ranks[j] for j in choice]


def allocate_ranks(spectra: list, budget_per_token: float, bits: int, max_rank: int) -> list[int]:
    """Greedy on marginal relative energy under the per-token byte budget; every matrix keeps >= 1."""
    ranks = [1] * len(spectra)
    cost = lambda r: kv_quant.row_bytes(r, bits) if r else 0
    used = sum(cost(1) for _ in spectra)
    if used > budget_per_token:
        raise ShrinkError(f"the KV budget leaves {budget_per_token:.1f} bytes/token for features; rank 1 "
                          f"everywhere needs {used}: raise --kv-ratio or shrink --window")
    total = [float(s.sum()) or 1.0 for s in spectra]
    while True:
        best, best_gain = None, 0.0
        for i, s in enumerate(spectra):
            r = ranks[i]
            if r >= max_rank:
                continue
            step = cost(r + 1) - cost(r)
            if used + step > budget_per_token:
                continue
            gain = float(s[r]) / total[i] / max(step, 1e-6)  # int4: every other rank is free (nibble)
            if gain > best_gain:
                best, best_gain = i, gain
        if best is None:
            return ranks
        used += cost(ranks[best] + 1) - cost(ranks[best])
        ranks[best] += 1


@torch.no_grad()
def init_factors(w_t: torch.Tensor, evecs: torch.Tensor, r: int, init: str, key_post_rope: bool,
                 sq: torch.Tensor, sq_inv: torch.Tensor):
    """(down, up) minimising ||(Y - Y_hat) M^1/2|| at rank r. w_t: W^T (dim, kv_dim); sq = M^1/2.
    For post-RoPE keys the inputs are the rotated keys themselves, so down starts from M^1/2."""
    if init == "activation":  # top eigenvectors of the weighted outputs' covariance
        u = evecs[:, :r].float()
    else:  # plain SVD of the (weighted) weight: ignores how the inputs are distributed
        u = torch.linalg.svd((w_t @ sq).double(), full_matrices=False)[2][:r].T.float()
    down = sq @ u if key_post_rope else w_t @ sq @ u
    return down, (u.T @ sq_inv).contiguous()


def sqrt_psd(m: torch.Tensor, eps: float = 1e-6) -> tuple[torch.Tensor, torch.Tensor]:
    """M^1/2 and M^-1/2 of a PSD matrix normalised to mean eigenvalue 1 (only the shape matters)."""
    m = m.double()
    m = m / (m.trace() / m.shape[0])
    ev, vec = torch.linalg.eigh(m)
    ev = ev.clamp_min(eps)
    return (vec * ev.sqrt()) @ vec.T, (vec * ev.rsqrt()) @ vec.T


@torch.no_grad()
def output_metrics(attn, x, pos, key_mode: str, cos, sin, objective: str):
    """(M_k^1/2, M_k^-1/2, M_v^1/2, M_v^-1/2) of the error metric on K and V outputs.

    objective "kv": identity (plain K/V reconstruction). "attention": the error that reaches the
    layer output: pre-RoPE keys weighted by each rotary pair's query energy of the heads reading them
    (RoPE turns the pair by a position-dependent angle), values by W_o^T W_o of those heads.
    Post-RoPE keys keep the plain metric: weighting them by the rotated-query covariance (a full
    matrix) gave an int4 basis with ~4x the score error of pre-RoPE's and long perplexity x1.53 at 30%
    int4 (x1.02 with the plain metric and unwhitened features, see prepare()).
    """
    G, hd, H = attn.n_kv_heads, attn.head_dim, attn.n_heads
    kv = G * hd
    if objective == "kv":
        eye = torch.eye(kv, dtype=torch.float64)
        return eye, eye, eye, eye
    rep = H // G
    if key_mode == "post-rope":  # the plain metric: see the docstring (no query statistics needed)
        mk = torch.eye(kv, dtype=torch.float64)
    else:
        q = x @ attn.q_proj.weight.float().T
        if attn.q_proj.bias is not None:
            q = q + attn.q_proj.bias.float()
        e = q.view(-1, H, hd).double().pow(2).mean(0)  # (H, hd)
        half = hd // 2
        pair = (e[:, :half] + e[:, half:]) / 2
        e = torch.cat([pair, pair], dim=1).view(G, rep, hd).sum(1).flatten()
        mk = torch.diag(e)
    wo = attn.o_proj.weight.double().view(-1, H, hd)  # (dim, H, hd)
    mv = torch.zeros(kv, kv, dtype=torch.float64)
    for g in range(G):
        wg = wo[:, g * rep:(g + 1) * rep]  # (dim, rep, hd)
        mv[g * hd:(g + 1) * hd, g * hd:(g + 1) * hd] = torch.einsum("dri,drj->ij", wg, wg)
    return (*sqrt_psd(mk), *sqrt_psd(mv))


@torch.no_grad()
def whiten(down, up, inputs):
    std = (inputs @ down).std(0).clamp_min(1e-6)
    return down / std, up * std[:, None]


@torch.no_grad()
def rotate(down, up, seed: int | None = None):
    """Fold a seeded Haar-random orthogonal r x r matrix into the factors: same product, turned features.
    The seed defaults to the rank r, so error curves and fit turn a rank-r basis alike."""
    r = down.shape[1]
    g = torch.Generator().manual_seed(r if seed is None else seed)
    q, rr = torch.linalg.qr(torch.randn(r, r, generator=g, dtype=torch.float64))
    q = (q * torch.sign(torch.diagonal(rr))).float()
    return down @ q, q.T @ up


def prepare(down, up, inputs, bits: int, per_feature: bool = True):
    """Whiten, then (quantized branch) rotate the features. per_feature=False (post-RoPE keys) scales
    all features by one factor instead: the quantization error stays isotropic in key space, as the
    score q.k weighs it; whitening the rotated keys put it where the queries look (measured on the
    embedded model at 30% int4: long perplexity x1.20 whitened, x1.02 with one scale)."""
    if per_feature:
        down, up = whiten(down, up, inputs)
    else:
        s = (inputs @ down).pow(2).mean().sqrt().clamp_min(1e-6)
        down, up = down / s, up * s
    return rotate(down, up) if bits < 16 else (down, up)


@torch.no_grad()
def rel_error(inputs, y, down, up, bits):
    c = kv_quant.fake_quantize(inputs @ down, bits)
    return float(((c @ up - y).pow(2).sum() / y.pow(2).sum().clamp_min(1e-12)))


def fit(inputs, y, down, up, bits, steps, seed, lr=1e-3, batch=512):
    # At 16 bits the activation-aware initialisation is already the exact optimum of this loss
    # (Eckart-Young), so there is nothing to fit; the quantized branches gain from it.
    if steps <= 0 or bits == 16:
        return down, up
    gen = torch.Generator().manual_seed(seed)
    down, up = down.clone().requires_grad_(True), up.clone().requires_grad_(True)
    opt = torch.optim.Adam([down, up], lr=lr)
    norm = y.pow(2).mean().clamp_min(1e-12)
    with torch.enable_grad():
        for _ in range(steps):
            idx = torch.randint(0, inputs.shape[0], (min(batch, inputs.shape[0]),), generator=gen)
            c = kv_quant.fake_quantize(inputs[idx] @ down, bits)
            loss = (c @ up - y[idx]).pow(2).mean() / norm
            opt.zero_grad()
            loss.backward()
            opt.step()
    return down.detach(), up.detach()


FP16_MAX = 65504.0  # the cache stores 16-bit features, and the scales of int8/int4 ones, in FP16


def check_factors(layer: int, kind: str, inputs, down, up, err: float, bits: int, distinct_tokens: int) -> None:
    """Never write factors the cache cannot hold: non-finite, or features whose FP16 value (16 bits)
    or FP16 group scale (amax / qmax at 8 and 4 bits) overflows on the calibration activations
    themselves (seen on degenerate activations, where whitening explodes)."""
    limit = FP16_MAX * (1 if bits == 16 else 2 ** (bits - 1) - 1)
    peak = float((inputs @ down).abs().max()) if torch.isfinite(down).all() else float("inf")
    if not (math.isfinite(err) and torch.isfinite(up).all() and peak < limit):
        raise ShrinkError(f"CSKV calibration of layer {layer} {kind}: unusable factors (features up to {peak:.3g}, "
                          f"{bits}-bit features in FP16 hold {limit:.3g}; relative error {err}): the calibration "
                          f"activations are degenerate ({distinct_tokens} distinct calibration tokens with this "
                          f"tokenizer)")


def calibrate_kv(lm, tokens: list[int], kv_ratio: float, window: int = 64, kv_bits: int = 16,
                 key_mode: str = "pre-rope", init: str = "activation", fit_steps: int = 100, seed: int = 0,
                 progress: bool = True, collected=None, objective: str = "attention", allocation: str = "error",
                 sinks: int = 0, curve_cache: dict | None = None,
                 budget_context: int = REFERENCE_CONTEXT, key_weight: float = 1.0) -> tuple[dict, dict[str, torch.Tensor]]:
    """`collected` = collect_inputs(model, tokens) reused across settings (a sweep collects once);
    `curve_cache`: a dict in which error curves are kept across budgets (they do not depend on it);
    `budget_context`: the cache length at which kv_ratio is the kept byte fraction (the window's
    bytes are amortised over it; the long-context sweep sizes at its 4096-token scored length);
    `key_weight`: the error allocation's weight of the key curves against the value curves (> 1 gives
    keys more of the budget; the curves measure each alone, the model's loss weighs them its own way)."""
    if objective not in ("kv", "attention"):
        raise ShrinkError(f"unknown objective '{objective}' (use kv or attention)")
    if key_mode not in KEY_MODES:
        raise ShrinkError(f"unknown key mode '{key_mode}' (use {', '.join(KEY_MODES)})")
    if kv_bits not in (16, 8, 4):
        raise ShrinkError(f"unsupported KV branch bits {kv_bits} (use 16, 8 or 4)")
    if allocation not in ("error", "energy"):
        raise ShrinkError(f"unknown rank allocation '{allocation}' (use error or energy)")
    if init not in ("activation", "weight"):
        raise ShrinkError(f"unknown initialisation '{init}' (use activation or weight)")
    if not (math.isfinite(key_weight) and key_weight > 0):
        raise ShrinkError(f"--key-weight must be a positive number (got {key_weight})")
    if key_weight != 1.0 and allocation != "error":
        raise ShrinkError("--key-weight weighs the measured error curves: it needs --kv-allocation error")
    t0 = time.perf_counter()
    torch.manual_seed(seed)
    model, args = lm.model, lm.model.args
    if model.args.sliding_window is not None:
        raise ShrinkError("CSKV is not supported on sliding-window models")
    xs, pos = collected or collect_inputs(model, tokens, progress=progress)
    post = key_mode == "post-rope"
    if post:  # rotated keys seen at the positions of a long context, not only those of the segments
        pos = spread_positions(pos, model.rope_cos.shape[0], seed)
    ys, spectra, vecs, metrics = [], [], [], []
    for i, layer in enumerate(model.layers):
        yk, yv = targets(layer.self_attn, xs[i], pos, key_mode, model.rope_cos, model.rope_sin)
        m = output_metrics(layer.self_attn, xs[i], pos, key_mode, model.rope_cos, model.rope_sin, objective)
        m = [t.float() for t in m]
        metrics.append(((m[0], m[1]), (m[2], m[3])))
        ys.append((yk, yv))
        for y, (sq, _) in zip((yk, yv), metrics[-1]):
            ev, U = spectrum(y @ sq)  # spectra in the objective's metric
            spectra.append(ev)
            vecs.append(U)
    if sinks < 0:
        raise ShrinkError(f"--sinks must be >= 0 (got {sinks})")
    if budget_context < 1:
        raise ShrinkError(f"budget context must be >= 1 (got {budget_context})")
    budget = feature_budget(args, kv_ratio, window, context=budget_context, sinks=sinks)
    if allocation == "energy":
        ranks = allocate_ranks(spectra, budget, kv_bits, args.kv_dim)
    else:
        grid = [r for r in RANK_GRID if r < args.kv_dim] + [args.kv_dim]
        ckey = (key_mode, kv_bits, window, sinks, objective)
        curves = (curve_cache or {}).get(ckey, [])
        for i, layer in enumerate(tqdm(model.layers, desc="error curves", disable=not progress or bool(curves),
                                       leave=False)):
            if len(curves) < 2 * args.n_layers:
                curves += error_curves(layer.self_attn, xs[i], pos, key_mode, model.rope_cos, model.rope_sin,
                                       window, kv_bits, vecs[2 * i:2 * i + 2], metrics[i], grid, sinks)
        if curve_cache is not None:
            curve_cache[ckey] = curves
        weighted = [[e * (key_weight if m % 2 == 0 else 1.0) for e in curve] for m, curve in enumerate(curves)]
        ranks = allocate_by_error(weighted, grid, budget, kv_bits)  # curves alternate K, V per layer
    tensors, rows = {}, []
    for i, layer in enumerate(tqdm(model.layers, desc="fit", disable=not progress, leave=False)):
        attn = layer.self_attn
        layer_row = {"layer": i}
        for j, (kind, w) in enumerate((("k", attn.k_proj.weight), ("v", attn.v_proj.weight))):
            r = ranks[2 * i + j]
            sq, sq_inv = metrics[i][j]
            y, y_w = ys[i][j], ys[i][j] @ sq  # errors are measured and fitted in the weighted space
            key_post = post and kind == "k"
            inputs = y if key_post else xs[i]
            down0, up0 = prepare(*init_factors(w.float().T, vecs[2 * i + j], r, init, key_post, sq, sq_inv), inputs,
                                 kv_bits, per_feature=not key_post)
            err_init = rel_error(inputs, y_w, down0, up0 @ sq, kv_bits)
            down, up_w = fit(inputs, y_w, down0, up0 @ sq, kv_bits, fit_steps, seed + 2 * i + j)
            err_fit = rel_error(inputs, y_w, down, up_w, kv_bits)
            up = up_w @ sq_inv
            if not err_fit <= err_init:  # fitting never makes a layer worse (nor NaN) than its initialisation
                down, up, err_fit = down0, up0, err_init
            check_factors(i, kind, inputs, down, up, err_fit, kv_bits, len(set(tokens)))
            tensors[f"kv.layers.{i}.{kind}_down"] = down.contiguous()
            tensors[f"kv.layers.{i}.{kind}_up"] = up.contiguous()
            energy = float(spectra[2 * i + j][:r].sum() / spectra[2 * i + j].sum().clamp_min(1e-12))
            layer_row.update({f"rank_{kind}": r, f"energy_{kind}": round(energy, 6),
                              f"rel_err_{kind}_init": round(err_init, 6), f"rel_err_{kind}": round(err_fit, 6)})
        rows.append(layer_row)
    feat = sum(kv_quant.row_bytes(r, kv_bits) for r in ranks)
    full = 2 * args.n_layers * args.kv_dim * 2
    section = {
        "method": "cskv", "key_mode": key_mode, "window": window, "sinks": sinks, "bits": kv_bits,
        "quant": {"scheme": "symmetric per token", "group": kv_quant.FEATURE_GROUP, "scale_dtype": "float16"}
        if kv_bits < 16 else None,
        "feature_basis": ("whitened (post-RoPE keys: one scale)" if post else "whitened")
        + (", seeded random orthogonal rotation (seed = rank)" if kv_bits < 16 else ""),
        "init": init, "objective": objective, "allocation": allocation, "key_weight": key_weight,
        "fit_steps": fit_steps,
        "fit_loss": ("attention-output-weighted" if objective == "attention" else "plain")
        + " K/V reconstruction, quantization-aware",
        "kv_ratio": kv_ratio,
        "kv_bytes_fraction_at_3k": (feat * REFERENCE_CONTEXT + min(window + sinks, REFERENCE_CONTEXT) * full)
        / (full * REFERENCE_CONTEXT),
        "budget_context": budget_context,
        "kv_bytes_fraction_at_budget_context": (feat * budget_context + min(window + sinks, budget_context) * full)
        / (full * budget_context),
        "feature_bytes_per_token": feat,
        "layers": rows,
        "calibration_s": round(time.perf_counter() - t0, 1),
    }
    return section, tensors


def apply_kv(model, section: dict, tensors: dict[str, torch.Tensor]) -> None:
    """Swap every layer's attention for CSKVAttention; all shapes are checked before any swap."""
    args = model.args
    if section.get("method") != "cskv" or section.get("key_mode") not in KEY_MODES or \
            section.get("bits") not in (16, 8, 4) or len(section.get("layers", [])) != args.n_layers:
        raise ShrinkError("checkpoint kv section does not describe a CSKV cache for this model")
    window, sinks = section.get("window"), section.get("sinks", 0)
    for name, v in (("window", window), ("sinks", sinks)):  # range checks at load, never inside a forward
        if isinstance(v, bool) or not isinstance(v, int) or not 0 <= v <= args.max_seq_len:
            raise ShrinkError(f"checkpoint kv section: {name} must be an integer in [0, {args.max_seq_len}] (got {v!r})")
    cfg = CSKVConfig(section["key_mode"], window, int(section["bits"]), sinks)
    built = []
    for i, row in enumerate(section["layers"]):
        parts = {}
        for kind in ("k", "v"):
            r = row.get(f"rank_{kind}") if isinstance(row, dict) else None
            if isinstance(r, bool) or not isinstance(r, int) or not 1 <= r <= args.kv_dim:
                raise ShrinkError(f"checkpoint kv section: layer {i} rank_{kind} must be an integer in "
                                  f"[1, {args.kv_dim}] (got {r!r})")
            in_dim = args.kv_dim if (kind == "k" and cfg.key_mode == "post-rope") else args.dim
            want = {f"{kind}_down": (in_dim, r), f"{kind}_up": (r, args.kv_dim)}
            for name, shape in want.items():
                t = tensors.get(f"kv.layers.{i}.{name}")
                if t is None:
                    raise ShrinkError(f"checkpoint: tensor kv.layers.{i}.{name} is missing")
                if tuple(t.shape) != shape:
                    raise ShrinkError(f"checkpoint: kv.layers.{i}.{name} has shape {tuple(t.shape)}, the plan needs {shape}")
                parts[name] = t.to(model.rope_cos.device)  # the factors live where the model does (--device)
        built.append(parts)
    for layer, parts in zip(model.layers, built):
        layer.self_attn = CSKVAttention(layer.self_attn, cfg, rope_cos=model.rope_cos, rope_sin=model.rope_sin,
                                        **parts)
