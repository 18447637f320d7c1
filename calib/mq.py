"""LLM-MQ: sensitivity-allocated mixed-precision weights with sparse FP16 outliers under a byte budget.

Fit (offline), in four steps:
  1. statistics: one forward + backward pass over the calibration tokens gives, per linear, the
     input second moment H = E[x x^T] (GPTQ's Hessian; its diagonal is the input energy) and the
     gradient G of the mean next-token loss with respect to the weight;
  2. candidates: every linear quantized at every candidate bit width, with and without outliers;
  3. sensitivity of a candidate = sum |G * (W' - W)| (first-order loss change, taken per weight so
     that signs cannot cancel, as LLM-MQ does), W' the weight the model will compute with;
  4. allocation: one candidate per linear minimising the summed sensitivity with total bytes
     <= budget, solved exactly (multiple-choice knapsack, dynamic programming over bytes).

Policy for the embeddings and the LM head (tied in SmolLM2): kept as they are, never quantized and
not counted in the budget. The budget covers the linears of the decoder layers only, which is what
a decode step streams per layer; the embedding is a gather of one row per token.

Outliers: in a layer with outliers, the k = round(fraction * rows * cols) weights with the largest
|W_ij| * rms(x_j) are kept in FP16 (CSR: int32 row pointers, int16 columns, fp16 values). Why this
rule: a weight's contribution to the output error scales with its input's rms, and the largest
weights of a group set its range, so removing them shrinks the step for every other weight of the
group; it needs only H's diagonal (no second pass). Outlier bytes count against the budget, so
the knapsack decides per layer whether they are worth it (they are only offered below 8 bits).

Bytes: each stored tensor is counted as allocated on the GPU, rounded up to ALIGN = 256 bytes
(cudaMalloc's alignment). This makes every candidate's size a multiple of 256, so the knapsack is
exact over 256-byte units with a small table, and the reported bytes are never below the real ones.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import nn
from tqdm import tqdm

from shrinkrt.errors import ShrinkError

from . import quantize as qz

ALIGN = 256
FORMAT = "llm-mq"
FORMAT_VERSION = 1
# gptq: columns in input order, each group's range from the updated weights; gptq-act-order: most
# active inputs first with ranges fixed up front (calib/quantize.py). Measured on SmolLM2's real
# inputs (2048 tokens): act-order cuts the layer output error 5-80% at 2-4 bits, never raised it.
QUANTIZERS = ("rtn", "gptq", "gptq-act-order")
MAX_OUTLIER_FRACTION = 0.1
CALIB_SEQ = 1024  # calibration segment length (the evaluation context)
OUTLIER_RULE = "top |W_ij| * rms(x_j) per layer"
TENSOR_SUFFIXES = ("codes", "scales", "zeros")
OUTLIER_SUFFIXES = ("outlier_rowptr", "outlier_cols", "outlier_vals")
DEFAULT_GROUP_SIZES = (128,)


def alloc(nbytes: int) -> int:
    return -(-nbytes // ALIGN) * ALIGN


def outlier_count(rows: int, cols: int, fraction: float) -> int:
    return int(round(fraction * rows * cols))


def col_dtype(cols: int) -> torch.dtype:
    # int16 columns halve the index bytes; the bit pattern is read as unsigned, so up to 65535.
    return torch.int16 if cols <= 65535 else torch.int32


def layer_bytes(rows: int, cols: int, bits: int, group_size: int, n_outliers: int, mins: bool = False,
                param_bits: int = 16) -> int:
    """Allocated bytes of one quantized linear: codes + scales + zeros or mins (+ the rows' param steps
    where scales and mins are 8-bit codes) (+ outlier CSR arrays)."""
    G = qz.n_groups(cols, group_size)
    param_bytes = param_bits // 8
    zero_bytes = rows * G * param_bytes if mins else rows * qz.zero_words(cols, bits, group_size) * 4
    total = alloc(rows * qz.code_words(cols, bits) * 4) + alloc(rows * G * param_bytes) + alloc(zero_bytes)
    if mins and param_bits == 8:
        total += alloc(rows * 2 * 2)
    if n_outliers:
        total += (alloc((rows + 1) * 4) + alloc(n_outliers * torch.empty(0, dtype=col_dtype(cols)).element_size())
                  + alloc(n_outliers * 2))
    return total


# ---------------------------------------------------------------- inputs
def target_linears(model) -> list[tuple[str, nn.Linear]]:
    """The linears of the decoder layers (embeddings and LM head excluded: see the module doc)."""
    return [(f"layers.{name}", m) for name, m in model.layers.named_modules() if isinstance(m, nn.Linear)]


def parse_budget(budget: str, n_weights: int) -> int:
    """'3.0bpw' (bits per quantized weight, all bytes counted) or '40MiB' / '512KiB' / '1GiB' -> bytes."""
    m = re.fullmatch(r"\s*(\d+(?:\.\d*)?|\.\d+)\s*(bpw|KiB|MiB|GiB)\s*", str(budget))
    if not m:
        raise ShrinkError(f"weight budget '{budget}' is not understood: give bits per weight ('3.0bpw') "
                          f"or a size ('40MiB', '512KiB', '1GiB')")
    value, unit = float(m.group(1)), m.group(2)
    if value <= 0:
        raise ShrinkError(f"weight budget '{budget}' must be positive")
    if unit == "bpw":
        return int(value * n_weights // 8)
    return int(value * {"KiB": 2**10, "MiB": 2**20, "GiB": 2**30}[unit])


def check_options(bits, group_sizes, quantizer: str, outlier_fraction: float) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """(bits, group sizes) sorted and checked; group_sizes: one size or several (the allocation then
    chooses one per layer, as it chooses the bits)."""
    bits = tuple(sorted(set(int(b) for b in bits)))
    bad = [b for b in bits if b not in qz.SUPPORTED_BITS]
    if not bits or bad:
        raise ShrinkError(f"unknown bit width{'s' if len(bad) > 1 else ''} {', '.join(map(str, bad)) or '(none)'} "
                          f"(supported: {', '.join(map(str, qz.SUPPORTED_BITS))})")
    groups = tuple(sorted(set(int(g) for g in ((group_sizes,) if isinstance(group_sizes, int) else group_sizes))))
    bad = [g for g in groups if g not in qz.GROUP_SIZES]
    if not groups or bad:
        raise ShrinkError(f"group size {', '.join(map(str, bad)) or '(none)'} is not supported (supported: "
                          f"{', '.join(map(str, qz.GROUP_SIZES))})")
    if quantizer not in QUANTIZERS:
        raise ShrinkError(f"unknown quantizer '{quantizer}' (supported: {', '.join(QUANTIZERS)})")
    if not 0.0 <= outlier_fraction <= MAX_OUTLIER_FRACTION:
        raise ShrinkError(f"outlier fraction must be in [0, {MAX_OUTLIER_FRACTION}] (got {outlier_fraction})")
    return bits, groups


# ---------------------------------------------------------------- statistics
@dataclass
class LayerStats:
    H: torch.Tensor          # E[x x^T] of the input: one object shared by the linears fed the same input
    grad: torch.Tensor       # dL/dW, L the mean next-token loss over the calibration tokens
    input_of: str            # the first linear fed this input (the key linears are batched by)


def calib_segments(model, tokens: list[int]) -> list[list[int]]:
    """The calibration tokens as the segments every pass runs on (CALIB_SEQ long, at least 2 tokens)."""
    seq = min(CALIB_SEQ, model.args.max_seq_len)
    return [s for s in (tokens[i:i + seq] for i in range(0, len(tokens), seq)) if len(s) >= 2]


def collect_stats(model, tokens: list[int], progress: bool = True) -> dict[str, LayerStats]:
    """One forward + backward pass per calibration segment; hooks accumulate X^T X per input."""
    targets = target_linears(model)
    segments = calib_segments(model, tokens)
    n_pred = sum(len(s) - 1 for s in segments)
    sums: dict[str, torch.Tensor] = {}
    owner: dict[str, str] = {}  # linear -> the linear whose input (and H) it shares
    count = {"n": 0}
    last = {"x": None, "name": None}

    def hook_for(name):
        def hook(_mod, args):
            x = args[0]
            if x is last["x"]:
                owner[name] = last["name"]
                return
            last["x"], last["name"] = x, name
            owner[name] = name
            x2 = x.detach().reshape(-1, x.shape[-1]).float()
            sums[name] = sums.get(name, 0) + x2.T @ x2
        return hook

    flags = {p: p.requires_grad for p in model.parameters()}
    handles = [m.register_forward_pre_hook(hook_for(n)) for n, m in targets]
    try:
        for p in model.parameters():
            p.requires_grad_(False)
        for _, m in targets:
            m.weight.requires_grad_(True)
            m.weight.grad = None
        model.clear_caches()
        with torch.enable_grad():
            for s in tqdm(segments, desc="LLM-MQ statistics", disable=not progress, leave=False):
                ids = torch.tensor([s], device=model.embed_tokens.weight.device)
                logits = model(ids)
                # Sum over tokens / all predicted tokens: the gradient of the mean loss of the whole set.
                loss = torch.nn.functional.cross_entropy(logits[0, :-1].float(), ids[0, 1:], reduction="sum") / n_pred
                loss.backward()
                count["n"] += ids.shape[1]
                last["x"] = None
    finally:
        for h in handles:
            h.remove()
        last["x"] = None
    H = {n: s / count["n"] for n, s in sums.items()}
    stats = {}
    for n, m in targets:
        stats[n] = LayerStats(H=H[owner[n]], grad=m.weight.grad.detach().float().clone(), input_of=owner[n])
        m.weight.grad = None
    for p, f in flags.items():
        p.requires_grad_(f)
    return stats


# ---------------------------------------------------------------- candidates
@dataclass
class Candidate:
    bits: int
    group_size: int
    n_outliers: int
    nbytes: int              # allocated bytes (ALIGN-rounded), what the budget counts
    sensitivity: float
    tensors: dict[str, torch.Tensor] = field(repr=False)  # suffix -> stored tensor
    mins: bool = False       # min per group instead of a zero point (packing.MIN_FORMATS)
    param_bits: int = 16     # with mins: 16 = fp16 scales and mins, 8 = 8-bit codes on per-row steps


def select_outliers(w: torch.Tensor, act_rms: torch.Tensor, k: int) -> torch.Tensor:
    """Boolean mask of the k largest |W_ij| * rms(x_j) (ties broken by position: deterministic)."""
    score = (w.abs() * act_rms[None, :]).flatten()
    idx = torch.topk(score, k, sorted=False).indices
    keep = torch.zeros(w.numel(), dtype=torch.bool)
    keep[idx] = True
    return keep.view_as(w)


def to_csr(keep: torch.Tensor, values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    rows, cols = keep.shape
    rowptr = torch.zeros(rows + 1, dtype=torch.int32)
    rowptr[1:] = torch.cumsum(keep.sum(dim=1), 0).to(torch.int32)
    nz = keep.nonzero()  # row-major order: the CSR order
    c = nz[:, 1]
    c = torch.where(c >= 32768, c - 65536, c) if col_dtype(cols) == torch.int16 else c
    return rowptr, c.to(col_dtype(cols)), values[keep].to(torch.float16)


def layer_options(rows: int, cols: int, bits: tuple[int, ...], outlier_fraction: float) -> list[tuple[int, int]]:
    """(bits, outliers) candidates of one linear: every width; below 8 bits also with outliers."""
    k = outlier_count(rows, cols, outlier_fraction)
    return [(b, 0) for b in bits] + [(b, k) for b in bits if k and b < 8]


def min_formats(bits: tuple[int, ...], group_sizes: tuple[int, ...]) -> list[tuple[int, int]]:
    """The (bits, group) options that are also offered with mins: packing.MIN_FORMATS among those asked for."""
    return [(b, g) for b, g in qz.MIN_FORMATS if b in bits and g in group_sizes]


# The param widths each min format is offered at: fp16 (exact on the source's Q4_1 weights) and 8-bit
# codes (0.5 bits per weight less at group 32; x1.003 perplexity on SmolLM2, weight_format_probe.md).
MIN_PARAM_BITS = (16, 8)


def build_candidates(model, stats: dict[str, LayerStats], bits: tuple[int, ...], group_sizes: tuple[int, ...],
                     quantizer: str, outlier_fraction: float, progress: bool = True,
                     mins: bool = True) -> dict[str, list[Candidate]]:
    """Quantize every target linear at every option (bits x outliers x group size, and with `mins` the
    min_formats() once more with fp16 mins, without outliers). The linears fed the same input (q/k/v,
    gate/up) and all their options of one group size are stacked row-wise into one quantizer call (the
    min options into a second one)."""
    targets = target_linears(model)
    by_input: dict[str, list[tuple[str, nn.Linear]]] = {}
    for name, m in targets:
        by_input.setdefault(stats[name].input_of, []).append((name, m))
    out: dict[str, list[Candidate]] = {}
    work = [(key, members, g) for key, members in by_input.items() for g in group_sizes]
    hinv = {}  # one inverse Hessian per input, shared by its group sizes
    for key, members, group_size in tqdm(work, desc=f"LLM-MQ candidates ({quantizer})", disable=not progress,
                                         leave=False):
        H = stats[key].H
        if quantizer != "rtn" and key not in hinv:
            order = qz.activation_order(H) if quantizer == "gptq-act-order" else torch.arange(H.shape[0])
            hinv = {key: qz.inverse_hessian(H[order][:, order])}
        act_rms = torch.diag(H).clamp(min=0).sqrt()
        Ws, Bs, Ks, spans = [], [], [], []
        for name, m in members:
            w = m.weight.detach().float()
            rows, cols = w.shape
            for b, k in layer_options(rows, cols, bits, outlier_fraction):
                Ws.append(w)
                Bs.append(torch.full((rows,), b, dtype=torch.int64))
                Ks.append(select_outliers(w, act_rms, k) if k else torch.zeros_like(w, dtype=torch.bool))
                spans.append((name, b, k, rows))
        W, B, K = torch.cat(Ws), torch.cat(Bs), torch.cat(Ks)
        keep = K if bool(K.any()) else None
        q, s, z, deq = quantize(quantizer, W, H, B, group_size, keep, hinv.get(key))
        r0 = 0
        for name, b, k, rows in spans:
            sl = slice(r0, r0 + rows)
            r0 += rows
            out.setdefault(name, []).append(
                _candidate(W[sl], stats[name].grad, b, k, group_size, q[sl], s[sl], z[sl], deq[sl], K[sl]))
        for b in [b for b, g in min_formats(bits, group_sizes) if g == group_size and mins]:
            W = torch.cat([m.weight.detach().float() for _, m in members])
            for pb in MIN_PARAM_BITS:
                steps = qz.row_param_steps(W, b, group_size, torch.diag(H)) if pb == 8 else None
                q, s, z, deq = quantize(quantizer, W, H, b, group_size, None, hinv.get(key), mins=True, steps=steps)
                r0 = 0
                for name, m in members:
                    sl = slice(r0, r0 + m.out_features)
                    r0 += m.out_features
                    out[name].append(_candidate(W[sl], stats[name].grad, b, 0, group_size, q[sl], s[sl], z[sl],
                                                deq[sl], None, mins=True, steps=None if steps is None else steps[sl]))
    return {name: out[name] for name, _ in targets}


def quantize(quantizer: str, w, H, bits, group_size: int, keep, hinv=None, mins: bool = False, steps=None):
    """One QUANTIZERS entry on w with input energy H (hinv: its inverse_hessian in that quantizer's order)."""
    if quantizer == "rtn":
        return qz.quantize_rtn(w, bits, group_size, keep, torch.diag(H), mins=mins, steps=steps)
    return qz.quantize_gptq(w, H, bits, group_size, keep, hinv=hinv, act_order=quantizer == "gptq-act-order",
                            mins=mins, steps=steps)


def _candidate(w, grad, bits, k, group_size, q, s, z, deq, keep, mins: bool = False, steps=None) -> Candidate:
    rows, cols = w.shape
    p = qz.pack(q, s, z, bits, group_size, mins=mins, steps=steps)
    tensors = {"codes": p.codes, "scales": p.scales}
    tensors.update({"mins": p.mins} if mins else {"zeros": p.zeros})
    if steps is not None:
        tensors["param_steps"] = p.param_steps
    if k:
        tensors.update(zip(OUTLIER_SUFFIXES, to_csr(keep, deq)))
        deq = torch.where(keep, deq.half().float(), deq)  # the model computes with the fp16 value
    sens = float((grad * (deq - w)).abs().sum())
    param_bits = 8 if steps is not None else 16
    return Candidate(bits, group_size, k, layer_bytes(rows, cols, bits, group_size, k, mins, param_bits), sens, tensors,
                     mins, param_bits)


class _Captured(Exception):
    """Raised by a capture hook: the rest of the layer's forward is not needed."""


def requantize_sequential(model, tokens: list[int], plan: dict[str, Candidate], stats: dict[str, LayerStats],
                          quantizer: str, outlier_fraction: float, progress: bool = True) -> dict[str, Candidate]:
    """Sequential GPTQ: the chosen option of every linear quantized again, decoder layer by decoder
    layer, on the inputs the already-quantized layers before it produce (the candidates all saw the
    FP model's inputs, so their errors were never corrected for what the earlier layers changed).
    Same (bits, group, outliers) per linear, so the same bytes; the model's weights are restored."""
    by_input: dict[str, list[str]] = {}
    for name, _ in target_linears(model):
        by_input.setdefault(stats[name].input_of, []).append(name)
    modules = dict(model.named_modules())
    segments = calib_segments(model, tokens)
    saved = {name: modules[name].weight.detach().clone() for name in plan}
    out = {}
    model.clear_caches()
    try:
        with torch.no_grad():
            dev = model.embed_tokens.weight.device
            xs = [model.embed_tokens(torch.tensor([s], device=dev)) for s in segments]
            for li, layer in enumerate(tqdm(model.layers, desc="LLM-MQ sequential", disable=not progress, leave=False)):
                prefix = f"layers.{li}."
                # the inputs in forward order: q/k/v, o, gate/up, down (each group shares one input)
                for key in [k for k in by_input if k.startswith(prefix)]:
                    H = _layer_input_energy(layer, modules[key], xs, model)
                    for n in by_input[key]:
                        c = plan[n]
                        w = saved[n].float()
                        k = c.n_outliers
                        keep = select_outliers(w, torch.diag(H).clamp(min=0).sqrt(), k) if k else None
                        steps = qz.row_param_steps(w, c.bits, c.group_size, torch.diag(H)) if c.param_bits == 8 \
                            else None
                        q, sc, z, deq = quantize(quantizer, w, H, c.bits, c.group_size, keep, mins=c.mins, steps=steps)
                        keep = keep if keep is not None else torch.zeros_like(w, dtype=torch.bool)
                        out[n] = _candidate(w, stats[n].grad, c.bits, k, c.group_size, q, sc, z, deq, keep, c.mins,
                                            steps)
                        used = torch.where(keep, deq.half().float(), deq) if k else deq
                        modules[n].weight.copy_(used.to(modules[n].weight.dtype))
                xs = [_run_layer(layer, x, model) for x in xs]
    finally:
        with torch.no_grad():
            for name, w in saved.items():
                modules[name].weight.copy_(w)
    return {name: out[name] for name in plan}


def _run_layer(layer, x, model):
    T = x.shape[1]
    return layer(x, model.rope_cos[:T], model.rope_sin[:T], 0)


def _layer_input_energy(layer, linear, xs, model) -> torch.Tensor:
    """E[x x^T] of `linear`'s input over the segments, running `layer` only as far as that linear."""
    total, count = 0, 0

    def hook(_m, args):
        nonlocal total, count
        x = args[0].reshape(-1, args[0].shape[-1]).float()
        total = total + x.T @ x
        count += x.shape[0]
        raise _Captured

    h = linear.register_forward_pre_hook(hook)
    try:
        for x in xs:
            try:
                _run_layer(layer, x, model)
            except _Captured:
                pass
    finally:
        h.remove()
    return total / count


# ---------------------------------------------------------------- allocation
def knapsack(weights: list[list[int]], costs: list[list[float]], capacity: int) -> list[int] | None:
    """Exact multiple-choice knapsack: pick one option per item, sum of weights <= capacity, least
    total cost. Integer weights; DP over capacity after shifting each item by its lightest option.
    Returns the chosen option index per item, or None if even the lightest choice does not fit.
    Ties go to the earlier option (deterministic)."""
    base = [min(w) for w in weights]
    cap = capacity - sum(base)
    if cap < 0:
        return None
    cap = min(cap, sum(max(w) - b for w, b in zip(weights, base)))
    best = np.zeros(cap + 1)  # best[c]: least cost of the items so far with extra weight <= c
    picks = np.zeros((len(weights), cap + 1), dtype=np.int16)
    for i, (ws, cs) in enumerate(zip(weights, costs)):
        new = np.full(cap + 1, np.inf)
        for j, (w, c) in enumerate(zip(ws, cs)):
            d = w - base[i]
            if d > cap:
                continue
            cand = np.full(cap + 1, np.inf)
            cand[d:] = best[:cap + 1 - d] + c
            better = cand < new
            new[better], picks[i, better] = cand[better], j
        best = new
    choice, c = [], cap
    for i in range(len(weights) - 1, -1, -1):
        j = int(picks[i, c])
        choice.append(j)
        c -= weights[i][j] - base[i]
    return choice[::-1]


def allocate(cands: dict[str, list[Candidate]], budget_bytes: int) -> dict[str, Candidate] | None:
    names = list(cands)
    choice = knapsack([[c.nbytes // ALIGN for c in cands[n]] for n in names],
                      [[c.sensitivity for c in cands[n]] for n in names], budget_bytes // ALIGN)
    return None if choice is None else {n: cands[n][j] for n, j in zip(names, choice)}


def calib_nll(model, tokens: list[int]) -> float:
    """Mean next-token NLL of `model` over the calibration segments (the set the statistics saw)."""
    segments = calib_segments(model, tokens)
    nll, n = 0.0, 0
    model.clear_caches()
    with torch.no_grad():
        for s in segments:
            ids = torch.tensor([s], device=model.embed_tokens.weight.device)
            logits = model(ids)
            nll += float(torch.nn.functional.cross_entropy(logits[0, :-1].float(), ids[0, 1:], reduction="sum"))
            n += len(s) - 1
    return nll / n


def put_back(model, originals: dict[str, nn.Module]) -> None:
    """Return the linears `originals` (name -> module, as target_linears gave them) to their places."""
    for name, m in originals.items():
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent), child, m)


def plan_nll(model, tokens: list[int], plan: dict[str, Candidate]) -> float:
    """calib_nll with the plan's quantized linears swapped in (as the checkpoint runs them), then put back."""
    section, tensors = assemble(model, plan, group_sizes=tuple(sorted({c.group_size for c in plan.values()})),
                                quantizer="", outlier_fraction=0.0, budget=None, budget_bytes=None, seed=0)
    originals = dict(target_linears(model))
    apply_weights(model, section, tensors)
    try:
        return calib_nll(model, tokens)
    finally:
        put_back(model, originals)


# The option sets choose_plan allocates over. The knapsack's proxy (first-order |g * dW|, summed) scores
# a lossless layer at 0 whatever it costs, and is additive where the loss is not: measured on SmolLM2 at
# 4.0 bpw, offering fp16 mins (5.0 bpw, exact on its Q4_1 weights) put 120 linears at 5.0 bpw and the rest
# lower (perplexity x1.145) where the plan without them gave x1.127 and one group size only x1.120.
# 8-bit-param mins (4.5 bpw, near exact) change the picture again: the variant without the fp16 ones lets
# the knapsack trade them instead.
PLAN_VARIANTS = ("all options", "no fp16-param mins", "no min layers", "largest group only")
# Another variant replaces the first one's plan only when its calibration NLL is lower by more than this
# (nats per token, ~0.2% of perplexity): below it the comparison is noise (a random tiny model's plans
# differ by ~0.001), and the first plan is the one the proxy prefers.
PLAN_MARGIN = 0.002
# Tokens drawn after the calibration tokens (the same sources, disjoint from them) that choose_plan scores
# the plans on: on the tokens the GPTQ candidates were fitted to, their NLL is optimistic against exact
# (fp16-min) layers; measured at 4.5 bpw the in-sample choice took a plan 2.5% worse on the evaluation text.
SELECT_TOKENS = 2048


def _variant(cands: dict[str, list[Candidate]], variant: str) -> dict[str, list[Candidate]]:
    if variant == "no fp16-param mins":
        return {n: [c for c in cs if not (c.mins and c.param_bits == 16)] for n, cs in cands.items()}
    if variant == "no min layers":
        return {n: [c for c in cs if not c.mins] for n, cs in cands.items()}
    if variant == "largest group only":
        g = max(c.group_size for cs in cands.values() for c in cs)
        return {n: [c for c in cs if c.group_size == g and not c.mins] for n, cs in cands.items()}
    return cands


def choose_plan(model, tokens: list[int], cands: dict[str, list[Candidate]],
                budget_bytes: int, held_out: bool = True) -> tuple[dict[str, Candidate] | None, dict | None]:
    """The knapsack's plan over each of PLAN_VARIANTS' option sets, judged by what it does: the
    NLL on `tokens` (SELECT_TOKENS held out from the fit; `held_out` says whether they were) with the
    plan applied; the lowest wins if it beats the first (all options) by
    PLAN_MARGIN, else the first stays. Distinct plans
    only (one variant's plan equal to an earlier one's is not run again). -> (plan, the choice as the
    manifest records it: every variant's NLL and the one taken; None when only one plan exists)."""
    plans: list[tuple[str, dict[str, Candidate]]] = []
    for v in PLAN_VARIANTS:
        p = allocate(_variant(cands, v), budget_bytes)
        if p is not None and not any(all(p[n] is q[n] for n in p) for _, q in plans):
            plans.append((v, p))
    if len(plans) <= 1:
        return (plans[0][1] if plans else None), None
    nll = {v: plan_nll(model, tokens, p) for v, p in plans}
    best = min(plans, key=lambda vp: nll[vp[0]])
    if nll[best[0]] > nll[plans[0][0]] - PLAN_MARGIN:
        best = plans[0]
    return best[1], {"by": "NLL of each variant's plan", "on": "held-out calibration text" if held_out else
                     "the calibration tokens (no held-out text left)", "tokens": len(tokens),
                     "calib_nll": {v: round(x, 6) for v, x in nll.items()}, "chosen": best[0]}


def floor_bytes(model, bits: tuple[int, ...], group_sizes: tuple[int, ...]) -> int:
    """Least bytes any plan can take: every linear at its cheapest option (no outliers)."""
    return sum(min(layer_bytes(*m.weight.shape, b, g, 0) for b in bits for g in group_sizes)
               for _, m in target_linears(model))


# ---------------------------------------------------------------- section + tensors
def assemble(model, plan: dict[str, Candidate], *, group_sizes: tuple[int, ...], quantizer: str, outlier_fraction: float,
             budget: str | None, budget_bytes: int | None, seed: int,
             sequential: bool = False, mins_offered: list | None = None,
             plan_choice: dict | None = None) -> tuple[dict, dict[str, torch.Tensor]]:
    shapes = {n: tuple(m.weight.shape) for n, m in target_linears(model)}
    n_weights = sum(r * c for r, c in shapes.values())
    total = sum(c.nbytes for c in plan.values())
    layers, tensors = [], {}
    for name, c in plan.items():
        rows, cols = shapes[name]
        layers.append({"name": name, "bits": c.bits, "group_size": c.group_size, "in_features": cols,
                       "out_features": rows, "outliers": c.n_outliers, "bytes": c.nbytes,
                       "sensitivity": c.sensitivity, **({"mins": True, "param_bits": c.param_bits} if c.mins else {})})
        for suffix, t in c.tensors.items():
            tensors[f"weights.{name}.{suffix}"] = t
    raw = sum(t.numel() * t.element_size() for t in tensors.values())
    section = {
        "method": FORMAT, "format_version": FORMAT_VERSION, "quantizer": quantizer, "sequential": sequential,
        "group_sizes": list(group_sizes), "min_formats": [list(f) for f in (mins_offered or [])],
        "outlier_fraction": outlier_fraction, "outlier_rule": OUTLIER_RULE,
        "sensitivity": "sum |dL/dW * (W_quantized - W)| over the calibration tokens",
        "embeddings_policy": "embeddings and LM head kept unquantized in the model dtype; not in the budget",
        "budget": None if budget is None else {"spec": str(budget), "bytes": budget_bytes,
                                               "bits_per_weight": 8 * budget_bytes / n_weights},
        "bytes": total, "bytes_unaligned": raw, "n_weights": n_weights, "alignment": ALIGN,
        "bits_per_weight": 8 * total / n_weights, "seed": seed, "layers": layers,
    }
    if plan_choice:
        section["plan_choice"] = plan_choice
    return section, tensors


def check_budget(model, budget: str, bits: tuple[int, ...], group_sizes: tuple[int, ...]) -> int:
    """The budget in bytes, or one line when no plan can meet it (checked before any calibration work)."""
    n_weights = sum(m.weight.numel() for _, m in target_linears(model))
    budget_bytes = parse_budget(budget, n_weights)
    floor = floor_bytes(model, bits, group_sizes)
    if budget_bytes < floor:
        raise ShrinkError(f"weight budget '{budget}' ({budget_bytes} bytes, {8 * budget_bytes / n_weights:.3f} bpw) is "
                          f"below the floor of {floor} bytes ({8 * floor / n_weights:.3f} bpw: every linear at "
                          f"{min(bits)} bits in groups of {max(group_sizes)}, scales and zeros included)")
    return budget_bytes


def calibrate_weights(lm, calib_tokens: list[int], budget: str, *, bits=(2, 3, 4, 8), group_sizes=DEFAULT_GROUP_SIZES,
                      quantizer: str = "gptq-act-order", outlier_fraction: float = 0.005, seed: int = 0,
                      sequential: bool = False, progress: bool = True,
                      mins: bool = True, select_tokens: list[int] | None = None) -> tuple[dict, dict[str, torch.Tensor]]:
    """Calibrate mixed-precision weights for `lm` under `budget`; returns (manifest section, tensors).
    Nothing is random here (the seed is recorded and seeds torch for any future random choice);
    the same inputs give the same plan and tensors. `mins`: also offer min_formats() with fp16 mins.
    `select_tokens`: text of the calibration sources disjoint from `calib_tokens` that choose_plan
    scores the plans on (without it, or under 2 tokens, the calibration tokens themselves)."""
    bits, group_sizes = check_options(bits, group_sizes, quantizer, outlier_fraction)
    model = lm.model
    budget_bytes = check_budget(model, budget, bits, group_sizes)
    if len(calib_tokens) < 2:
        raise ShrinkError("LLM-MQ calibration needs at least 2 calibration tokens")
    torch.manual_seed(seed)
    stats = collect_stats(model, calib_tokens, progress)
    cands = build_candidates(model, stats, bits, group_sizes, quantizer, outlier_fraction, progress, mins)
    held_out = select_tokens is not None and len(select_tokens) >= 2
    plan, choice = choose_plan(model, select_tokens if held_out else calib_tokens, cands, budget_bytes, held_out)
    if sequential:
        plan = requantize_sequential(model, calib_tokens, plan, stats, quantizer, outlier_fraction, progress)
    return assemble(model, plan, group_sizes=group_sizes, quantizer=quantizer, outlier_fraction=outlier_fraction,
                    budget=budget, budget_bytes=budget_bytes, seed=seed, sequential=sequential,
                    mins_offered=min_formats(bits, group_sizes) if mins else [], plan_choice=choice)


# ---------------------------------------------------------------- runtime
def _expect(section: dict, tensors: dict[str, torch.Tensor], model) -> list[tuple[str, dict, nn.Module]]:
    """Check the whole plan against the tensors and the model; any disagreement raises ShrinkError."""
    if section.get("method") != FORMAT or section.get("format_version") != FORMAT_VERSION:
        raise ShrinkError(f"weights section is not {FORMAT} version {FORMAT_VERSION} "
                          f"(got {section.get('method')} version {section.get('format_version')})")
    layers = section.get("layers")
    if not isinstance(layers, list) or not layers:
        raise ShrinkError("weights section has no per-layer plan")
    modules = dict(model.named_modules())
    expected, todo = set(), []
    for L in layers:
        try:
            name, bits, g, cols, rows, k = (L["name"], int(L["bits"]), int(L["group_size"]), int(L["in_features"]),
                                            int(L["out_features"]), int(L["outliers"]))
        except (KeyError, TypeError, ValueError) as e:
            raise ShrinkError(f"weights plan entry {L!r} is malformed ({e})") from None
        m = modules.get(name)
        if not isinstance(m, nn.Linear):
            raise ShrinkError(f"weights plan names '{name}', which is not a linear layer of this model")
        if tuple(m.weight.shape) != (rows, cols):
            raise ShrinkError(f"weights plan: '{name}' is {rows}x{cols}, the model's is "
                              f"{m.weight.shape[0]}x{m.weight.shape[1]}")
        if bits not in qz.SUPPORTED_BITS or g not in qz.GROUP_SIZES:
            raise ShrinkError(f"weights plan: '{name}' has unsupported bits {bits} / group size {g}")
        mins = L.get("mins", False)
        if mins is not False and mins is not True:
            raise ShrinkError(f"weights plan: '{name}' has mins {mins!r} (true or false)")
        if mins and ((bits, g) not in qz.MIN_FORMATS or k):
            raise ShrinkError(f"weights plan: '{name}' stores mins at {bits} bits, group {g}"
                              f"{', with outliers' if k else ''}; mins are for "
                              f"{', '.join(f'{b}-bit group-{gg}' for b, gg in qz.MIN_FORMATS)} layers without outliers")
        pb = L.get("param_bits", 16)
        if pb not in qz.PARAM_BITS or (pb != 16 and not mins):
            raise ShrinkError(f"weights plan: '{name}' has param_bits {pb!r} (16, or 8 in a layer with mins)")
        G = qz.n_groups(cols, g)
        specs = {"codes": (torch.int32, (rows, qz.code_words(cols, bits))),
                 "scales": (torch.uint8 if pb == 8 else torch.float16, (rows, G))}
        specs.update({"mins": (torch.int8 if pb == 8 else torch.float16, (rows, G))} if mins else
                     {"zeros": (torch.int32, (rows, qz.zero_words(cols, bits, g)))})
        if pb == 8:
            specs["param_steps"] = (torch.float16, (rows, 2))
        if k:
            specs.update({"outlier_rowptr": (torch.int32, (rows + 1,)), "outlier_cols": (col_dtype(cols), (k,)),
                          "outlier_vals": (torch.float16, (k,))})
        for suffix, (dtype, shape) in specs.items():
            key = f"weights.{name}.{suffix}"
            t = tensors.get(key)
            if t is None:
                raise ShrinkError(f"checkpoint plan and tensors disagree: '{key}' is missing")
            if t.dtype != dtype or tuple(t.shape) != shape:
                raise ShrinkError(f"checkpoint plan and tensors disagree: '{key}' is "
                                  f"{str(t.dtype).removeprefix('torch.')}{list(t.shape)}, the plan implies "
                                  f"{str(dtype).removeprefix('torch.')}{list(shape)}")
            expected.add(key)
        if k:
            rp = tensors[f"weights.{name}.outlier_rowptr"].long()
            c = tensors[f"weights.{name}.outlier_cols"].long()
            c = c & 0xFFFF if col_dtype(cols) == torch.int16 else c
            if (rp[0] != 0 or rp[-1] != k or bool((rp[1:] < rp[:-1]).any())
                    or bool((c >= cols).any()) or bool((c < 0).any())):
                raise ShrinkError(f"checkpoint plan and tensors disagree: the outliers of '{name}' are not a "
                                  f"valid CSR of {k} entries in {rows}x{cols}")
        todo.append((name, {"bits": bits, "group_size": g, "outliers": k, "mins": mins, "param_bits": pb}, m))
    extra = sorted(set(tensors) - expected)
    if extra:
        raise ShrinkError(f"checkpoint plan and tensors disagree: '{extra[0]}' is not in the plan")
    if len({n for n, _, _ in todo}) != len(todo):
        raise ShrinkError("weights plan names a layer twice")
    return todo


def apply_weights(model, section: dict, tensors: dict[str, torch.Tensor]) -> None:
    """Swap each planned nn.Linear for a QuantLinear holding the stored tensors (validated first:
    on any disagreement nothing is modified)."""
    from shrinkrt.runtime.quant_linear import QuantLinear

    todo = _expect(section, tensors, model)
    for name, spec, m in todo:
        dev = m.weight.device
        t = lambda s: tensors[f"weights.{name}.{s}"].to(dev)  # noqa: E731
        outliers = tuple(t(s) for s in OUTLIER_SUFFIXES) if spec["outliers"] else None
        bias = m.bias.detach().clone() if m.bias is not None else None
        q = QuantLinear(m.in_features, m.out_features, spec["bits"], spec["group_size"],
                        t("codes"), t("scales"), None if spec["mins"] else t("zeros"), outliers, bias,
                        mins=t("mins") if spec["mins"] else None,
                        param_steps=t("param_steps") if spec["param_bits"] == 8 else None)
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name), child, q)
