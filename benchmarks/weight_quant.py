#!/usr/bin/env python3
"""Perplexity vs bits per weight: uniform RTN, uniform GPTQ, LLM-MQ mixed precision (with and
without sparse outliers) on the embedded SmolLM2-135M -> docs/results/weight_quant.{json,md,png}.

Every quantized model runs through the real path: packed tensors -> apply_weights -> QuantLinear,
dequantizing on the fly. The calibration statistics and the per-layer candidates are computed once
and shared by every run (the allocation is the only thing that changes with the budget), which is
exactly what calibrate_weights does for one budget.

    python benchmarks/weight_quant.py [--max-segments 6] [--budgets 2.5,3,3.5,4,5]
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

from shrinkrt.calib import mq
from shrinkrt.evaluate import corpus
from shrinkrt.evaluate.perplexity import perplexity
from shrinkrt.runtime.loader import load

OUT = Path(__file__).resolve().parents[1] / "docs" / "results" / "weight_quant"
UNIFORM_BITS = (2, 3, 4, 8)


def args_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--max-segments", type=int, default=6, help="perplexity segments of 1024 tokens (default 6)")
    ap.add_argument("--calib-tokens", type=int, default=8192, help="calibration tokens (default 8192, as the CLI)")
    ap.add_argument("--budgets", default="2.5,3,3.5,4,5", help="mixed-precision budgets in bits per weight")
    ap.add_argument("--group-size", type=int, default=128)
    ap.add_argument("--outlier-fraction", type=float, default=0.005)
    ap.add_argument("--threads", type=int, default=1, help="torch threads (default 1: the machine is shared)")
    ap.add_argument("--out", type=Path, default=OUT, help="output path without suffix")
    ap.add_argument("--render-only", action="store_true", help="redraw the .md and .png from the existing .json")
    return ap


def evaluate_plan(lm, plan, eval_tokens, a, quantizer, budget=None, budget_bytes=None):
    """Apply one plan through the checkpoint path, measure perplexity, put the FP linears back."""
    section, tensors = mq.assemble(lm.model, plan, group_size=a.group_size, quantizer=quantizer,
                                   outlier_fraction=a.outlier_fraction, budget=budget, budget_bytes=budget_bytes,
                                   seed=0)
    originals = {n: m for n, m in mq.target_linears(lm.model)}
    mq.apply_weights(lm.model, section, tensors)
    try:
        ppl = perplexity(lm.model, eval_tokens, 1024, max_segments=a.max_segments, progress=False)["perplexity"]
    finally:
        for name, m in originals.items():
            parent, _, child = name.rpartition(".")
            setattr(lm.model.get_submodule(parent), child, m)
    return section, ppl


def uniform(cands, bits):
    return {n: next(c for c in cs if c.bits == bits and c.n_outliers == 0) for n, cs in cands.items()}


def main(argv=None) -> int:
    a = args_parser().parse_args(argv)
    if a.render_only:
        result = json.loads(a.out.with_suffix(".json").read_text())
        a.out.with_suffix(".md").write_text(markdown(result))
        plot(result, 1 + max(int(n.split(".")[1]) for p in result["plans"].values() for n, _, _ in p),
             a.out.with_suffix(".png"))
        return 0
    torch.set_num_threads(a.threads)
    budgets = [float(b) for b in a.budgets.split(",")]
    lm = load(None, progress=False)
    eval_tokens = lm.tokenizer.encode(corpus.eval_text(), add_special_tokens=False)
    calib_tokens = lm.tokenizer.encode(corpus.calib_text(), add_special_tokens=False)[:a.calib_tokens]
    t0 = time.time()
    fp = perplexity(lm.model, eval_tokens, 1024, max_segments=a.max_segments, progress=False)
    print(f"fp: perplexity {fp['perplexity']:.3f} ({time.time() - t0:.0f} s)", flush=True)
    t0 = time.time()
    stats = mq.collect_stats(lm.model, calib_tokens, progress=False)
    t_stats = time.time() - t0
    t0 = time.time()
    gptq = mq.build_candidates(lm.model, stats, UNIFORM_BITS, a.group_size, "gptq", a.outlier_fraction, False)
    t_gptq = time.time() - t0
    rtn = mq.build_candidates(lm.model, stats, UNIFORM_BITS, a.group_size, "rtn", 0.0, False)
    print(f"statistics {t_stats:.0f} s, GPTQ candidates {t_gptq:.0f} s", flush=True)
    no_outliers = {n: [c for c in cs if c.n_outliers == 0] for n, cs in gptq.items()}
    n_weights = sum(m.weight.numel() for _, m in mq.target_linears(lm.model))

    runs, plans = [], {}
    for method, cands in (("rtn", rtn), ("gptq", gptq)):
        for b in UNIFORM_BITS:
            section, ppl = evaluate_plan(lm, uniform(cands, b), eval_tokens, a, method)
            runs.append({"method": method, "bits": b, "bits_per_weight": section["bits_per_weight"],
                         "bytes": section["bytes"], "perplexity": ppl})
            print(f"{method} {b}-bit: {section['bits_per_weight']:.3f} bpw, perplexity {ppl:.3f}", flush=True)
    for budget in budgets:
        spec = f"{budget}bpw"
        budget_bytes = mq.parse_budget(spec, n_weights)
        for method, cands in (("mixed", no_outliers), ("mixed+outliers", gptq)):
            plan = mq.allocate(cands, budget_bytes)
            if plan is None:
                print(f"{method} at {spec}: below the floor, skipped", flush=True)
                continue
            section, ppl = evaluate_plan(lm, plan, eval_tokens, a, "gptq", spec, budget_bytes)
            assert section["bytes"] <= budget_bytes  # the allocation never exceeds the budget
            layers = section["layers"]
            runs.append({"method": method, "budget_bits_per_weight": budget,
                         "bits_per_weight": section["bits_per_weight"], "bytes": section["bytes"],
                         "budget_bytes": budget_bytes, "perplexity": ppl,
                         "layers_with_outliers": sum(1 for L in layers if L["outliers"])})
            plans[f"{method}@{budget}"] = [[L["name"], L["bits"], L["outliers"]] for L in layers]
            print(f"{method} at {spec}: {section['bits_per_weight']:.3f} bpw, perplexity {ppl:.3f}", flush=True)

    result = {"fp": {"perplexity": fp["perplexity"]}, "runs": runs,
              "settings": {"model": lm.name, "context": 1024, "max_segments": a.max_segments,
                           "scored_tokens": fp["scored_tokens"], "calib_tokens": len(calib_tokens),
                           "group_size": a.group_size, "outlier_fraction": a.outlier_fraction,
                           "threads": a.threads, "statistics_s": round(t_stats, 1),
                           "gptq_candidates_s": round(t_gptq, 1),
                           "note": "the embedded weights already went through Q4_1 (4-bit, group 32, with min)"},
              "plans": plans}
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.with_suffix(".json").write_text(json.dumps(result, indent=2) + "\n")
    a.out.with_suffix(".md").write_text(markdown(result))
    plot(result, lm.model.args.n_layers, a.out.with_suffix(".png"))
    print(f"wrote {a.out}.{{json,md,png}}")
    return 0


def markdown(r: dict) -> str:
    s, fp = r["settings"], r["fp"]["perplexity"]
    lines = [
        "# Weight quantization: perplexity vs bits per weight (LLM-MQ)",
        "",
        f"Model: {s['model']}. **Its weights already went through Q4_1 (4-bit, group 32, with min) before "
        "we see them** (FACTS.md): results at 4 bits and above are flattered, results at 2-3 bits are meaningful.",
        "",
        f"Perplexity on the evaluation text (GPL-3, GFDL-1.3, Apache-2.0), context 1024, first "
        f"{s['max_segments']} segments only ({s['scored_tokens']} scored tokens; the FP figure uses the same cap). "
        f"Calibration: {s['calib_tokens']} tokens of the disjoint calibration text. Group size {s['group_size']}, "
        f"fp16 scales, packed zero points. Bits per weight count every stored byte of the quantized linears "
        f"(codes, scales, zeros, outliers; each tensor rounded up to 256 bytes); embeddings and the tied LM head "
        f"stay unquantized and are outside the budget. Mixed precision uses GPTQ candidates at 2/3/4/8 bits; "
        f"`mixed+outliers` may also keep {s['outlier_fraction']:.1%} of a layer's weights in FP16 where the "
        f"knapsack finds it worth its bytes.",
        "",
        "| method | budget bpw | measured bpw | perplexity | x FP |",
        "| --- | --- | --- | --- | --- |",
        f"| fp32 | - | 32 | {fp:.3f} | 1.000 |",
    ]
    for run in r["runs"]:
        budget = f"{run['budget_bits_per_weight']:.2f}" if "budget_bits_per_weight" in run else "-"
        name = run["method"] + (f" {run['bits']}-bit" if "bits" in run else "")
        lines.append(f"| {name} | {budget} | {run['bits_per_weight']:.3f} | {run['perplexity']:.3f} | "
                     f"{run['perplexity'] / fp:.3f} |")
    lines += ["", "Against the goals (mixed = the better of `mixed` / `mixed+outliers` at that budget):", ""]
    for budget, cap in ((3.0, 1.10), (4.0, 1.02)):
        m = [x for x in r["runs"] if x.get("budget_bits_per_weight") == budget]
        u = [x for x in r["runs"] if x.get("bits") == int(budget) and x["method"] in ("rtn", "gptq")]
        if m:
            best = min(m, key=lambda x: x["perplexity"])
            vs = ", ".join(f"uniform {x['method']} {x['bits']}-bit x{x['perplexity'] / fp:.3f} at "
                           f"{x['bits_per_weight']:.2f} bpw" for x in u)
            ok = best["perplexity"] <= cap * fp and all(best["perplexity"] < x["perplexity"] for x in u)
            lines.append(f"- {budget} bpw: {best['method']} x{best['perplexity'] / fp:.3f} of FP (goal <= x{cap} "
                         f"and below uniform {int(budget)}-bit); {vs}. **{'met' if ok else 'missed'}**")
    lines += ["", f"Statistics pass {s['statistics_s']} s, GPTQ candidates {s['gptq_candidates_s']} s "
              f"({s['threads']} thread(s), shared 2-core machine).", "",
              "Regenerate: `python benchmarks/weight_quant.py`. Per-layer plans are in weight_quant.json (`plans`); "
              "the bit map is weight_quant.png.", ""]
    return "\n".join(lines)


def plot(r: dict, n_layers: int, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    fp = r["fp"]["perplexity"]
    fig, (ax, *maps) = plt.subplots(1, 3, figsize=(16, 5), gridspec_kw={"width_ratios": [1.3, 1, 1]})
    for method, style in (("rtn", "o--"), ("gptq", "s--"), ("mixed", "^-"), ("mixed+outliers", "v-")):
        pts = sorted((x["bits_per_weight"], x["perplexity"]) for x in r["runs"] if x["method"] == method)
        if pts:
            ax.plot(*zip(*pts), style, label=method)
    ax.axhline(fp, color="k", lw=0.8, label=f"fp32 ({fp:.2f})")
    ax.axhline(fp * 1.10, color="gray", lw=0.6, ls=":", label="fp +10%")
    ax.set_yscale("log")
    ax.set_xlabel("bits per weight (all bytes counted)")
    ax.set_ylabel("perplexity (log)")
    ax.set_title("SmolLM2-135M (weights already Q4_1)")
    ax.legend(fontsize=8)
    kinds = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    for axm, key in zip(maps, [k for k in ("mixed+outliers@3.0", "mixed+outliers@4.0") if k in r["plans"]]):
        grid = np.zeros((len(kinds), n_layers))
        for name, bits, k in r["plans"][key]:
            layer, kind = int(name.split(".")[1]), name.split(".")[-1]
            grid[kinds.index(kind), layer] = bits
            if k:
                axm.plot(layer, kinds.index(kind), "k.", ms=3)
        im = axm.imshow(grid, aspect="auto", cmap="viridis", vmin=2, vmax=8)
        axm.set_yticks(range(len(kinds)), kinds)
        axm.set_xlabel("decoder layer")
        axm.set_title(f"bits per linear, {key} (dot = FP16 outliers)")
        fig.colorbar(im, ax=axm, ticks=[2, 3, 4, 8])
    fig.tight_layout()
    fig.savefig(path, dpi=110)


if __name__ == "__main__":
    sys.exit(main())
