"""KV-cache compression sweep on the long-context instrument: CSKV (pre/post-RoPE x fp16/int8/int4
features) vs KIVI-2/4 and sinks+window at equal KV bytes, on the embedded model
-> docs/results/kv_compression.{json,md,png}

Every run (the FP row included, measured in the same process with the same settings) uses the
functions `shrinkrt eval` reports (evaluate/harness.py), with its defaults:
- long perplexity (evaluate/perplexity.py `long_perplexity`): non-overlapping 4096-token segments of
  the evaluation text, only tokens at positions >= 1024 scored (every scored token has >= 1024 tokens
  of past, so it measures the compression, not the window); --max-segments of them (0: all, 3 here);
- kv_bytes_fraction: the bytes the cache really holds after a whole 4096-token segment over an FP16
  full cache of 4096 tokens -- measured at the scored length, where the byte budgets are set: CSKV
  ranks are allocated for the target fraction at 4096 tokens (`calibrate_kv(budget_context=4096)`),
  sinks+window keeps round(target x 4096) tokens, KIVI's fraction is what its format gives;
- passkey (evaluate/passkey.py `retrieval_trials` + `retrieval`): 20 trials per length at
  1k/2k/3k/4k tokens, needle at evenly spaced depths, teacher-forced: accuracy with its Wilson 95%
  interval (evaluate/stats.py) and the key digits' mean NLL per token (`key_nll`);
- decode_ms_per_token: median of 16 greedy decode steps after the 4096-token passkey prompt
  (depth 0.5), on the same cache (2 threads, beside other jobs: read it as rough).

CSKV rows share one calibration: the same 8192 calibration tokens (evaluate/corpus.py CALIB_FILES),
seed, window (64), fit steps, objective (attention-output weighted), rank allocation (measured
error + knapsack) and init; only the rank budget (target fraction), key mode and feature bits
differ. key_bits == value_bits in every row for now (both fields are recorded).

Results are written (atomically, shrinkrt.atomic) after every run; --resume keeps the runs already in
the JSON when its settings match and skips them, so a sweep can be spread over several invocations.
--runs picks runs (and their order) as METHOD[:BITS[:TARGET]], e.g.
`--runs cskv-post-rope:8:0.2,sink-window:16:0.2,kivi-2` (default: the whole grid). --wait-lock PATH
waits (polling every 60 s) while PATH exists before each run.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

from shrinkrt.atomic import save_figure, write_atomic
from shrinkrt.calib.cskv import apply_kv, calibrate_kv, collect_inputs
from shrinkrt.evaluate import corpus
from shrinkrt.evaluate.passkey import Trial, build_prompt, retrieval, retrieval_trials
from shrinkrt.evaluate.perplexity import long_perplexity
from shrinkrt.runtime.generate import generate
from shrinkrt.runtime.kv_baselines import apply_kivi, apply_sink_window
from shrinkrt.runtime.loader import load

SINKS = 4
FRACTION_TOKENS = 4096  # kv_bytes_fraction = stored KV bytes / FP16 full-cache bytes at the scored length
SCORE_FROM = 1024
DECODE_STEPS = 16
GOALS = {0.20: (1.02, 1.2), 0.10: (1.08, None)}  # fraction: (long ppl ratio cap, key NLL ratio cap)


def measure(lm, tokens, args) -> dict:
    lp = long_perplexity(lm.model, tokens, context=FRACTION_TOKENS, score_from=SCORE_FROM,
                         max_segments=args.max_segments, progress=False)
    if lp["context"] != FRACTION_TOKENS:
        raise RuntimeError(f"the evaluation text is shorter than one {FRACTION_TOKENS}-token segment")
    pk = retrieval(lm.model, lm.tokenizer, retrieval_trials(args.passkey_lengths, args.passkey_trials, args.seed),
                   progress=False)
    ids = build_prompt(lm.tokenizer, Trial(max(args.passkey_lengths), 0.5, "12345"))
    g = generate(lm.model, lm.tokenizer, ids, max_new_tokens=DECODE_STEPS + 1, eos_ids=[])
    lm.model.clear_caches()
    return {"kv_bytes_fraction": lp["kv_bytes_fraction"],
            "kv_bytes_fraction_at_score_from": lp["kv_bytes_fraction_at_score_from"],
            "kv_bytes_at": lp["kv_bytes_at"],
            "long_perplexity": lp["perplexity"], "long_nll_per_token": lp["nll_per_token"],
            "long_segments": lp["segments"], "long_scored_tokens": lp["scored_tokens"],
            "passkey_accuracy": pk["accuracy"], "passkey_ci95": pk["ci95"], "passkey_n": pk["n"],
            "key_nll": pk["key_nll"],
            "passkey_by_length": pk["by_length"],
            # per trial, in retrieval_trials order: paired comparisons between rows need no rerun
            "passkey_correct": "".join("1" if t["correct"] else "0" for t in pk["trials"]),
            "passkey_key_nll": [round(t["key_nll"], 5) for t in pk["trials"]],
            "decode_ms_per_token": 1000 * statistics.median(g.step_s),
            "decode_context": len(ids)}


def restore(lm, originals):
    for layer, attn in zip(lm.model.layers, originals):
        layer.self_attn = attn
    lm.model.clear_caches()


def run_spec(method: str, bits: int, target) -> dict:
    return {"method": method, "key_bits": bits, "value_bits": bits, "target_fraction": target}


def plan(args) -> list[dict]:
    """The whole grid, in the order of the issue's priorities (20%, the baselines, 10%, the rest)."""
    first = [r for r in (0.2, 0.1) if r in args.ratios]
    order = first + sorted((r for r in args.ratios if r not in first), reverse=True)
    runs = []
    for ratio in order:
        for bits in sorted(args.bits, key=lambda b: b != 8):  # int8 first, then the others
            for mode in args.key_modes:
                runs.append(run_spec(f"cskv-{mode}", bits, ratio))
        runs.append(run_spec("sink-window", 16, ratio))
        if ratio == order[0]:
            runs += [run_spec(f"kivi-{b}", b, None) for b in args.kivi]
    if not order:
        runs += [run_spec(f"kivi-{b}", b, None) for b in args.kivi]
    return runs


def parse_runs(text: str) -> list[dict]:
    runs = []
    for item in (x for x in text.split(",") if x):
        parts = item.split(":")
        method = parts[0]
        if method.startswith("kivi-"):
            runs.append(run_spec(method, int(method.removeprefix("kivi-")), None))
            continue
        if method not in ("cskv-pre-rope", "cskv-post-rope", "sink-window") or len(parts) != 3:
            raise SystemExit(f"--runs: {item!r} is not METHOD:BITS:TARGET (cskv-pre-rope, cskv-post-rope, "
                             f"sink-window) or kivi-BITS")
        runs.append(run_spec(method, int(parts[1]), float(parts[2])))
    return runs


def key(r):
    return (r["method"], r["key_bits"], r["value_bits"], r.get("target_fraction"))


def wait_lock(path):
    if not path:
        return
    waited = 0
    while Path(path).exists():
        if waited == 0:
            print(f"{path} exists: waiting", flush=True)
        time.sleep(60)
        waited += 60
    if waited:
        print(f"{path} gone after {waited} s", flush=True)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--ratios", default="0.5,0.3,0.2,0.1,0.05")
    ap.add_argument("--key-modes", default="post-rope,pre-rope")
    ap.add_argument("--bits", default="16,8,4")
    ap.add_argument("--kivi", default="2,4")
    ap.add_argument("--runs", default="", help="METHOD[:BITS:TARGET],... in this order (default: the grid)")
    ap.add_argument("--window", type=int, default=64)
    ap.add_argument("--fit-steps", type=int, default=100)
    ap.add_argument("--calib-tokens", type=int, default=8192)
    ap.add_argument("--max-segments", type=int, default=0, help="long-perplexity segments (0: all)")
    ap.add_argument("--passkey-lengths", default="1024,2048,3072,4096")
    ap.add_argument("--passkey-trials", type=int, default=20, help="passkey trials per length")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--resume", action="store_true", help="keep runs already in the JSON and skip them")
    ap.add_argument("--wait-lock", default="", metavar="PATH", help="before each run, wait while PATH exists")
    ap.add_argument("--out", default="docs/results/kv_compression")
    a = ap.parse_args(argv)
    a.ratios = [float(x) for x in a.ratios.split(",") if x]
    a.key_modes = [x for x in a.key_modes.split(",") if x]
    a.bits = [int(x) for x in a.bits.split(",") if x]
    a.kivi = [int(x) for x in a.kivi.split(",") if x]
    a.passkey_lengths = tuple(int(x) for x in a.passkey_lengths.split(","))
    torch.set_num_threads(a.threads)
    out = Path(a.out)
    jpath = out.with_suffix(".json")
    settings = {"instrument": "long-context (issue 19)", "window": a.window, "fit_steps": a.fit_steps,
                "calib_tokens": a.calib_tokens, "objective": "attention", "allocation": "error",
                "init": "activation", "long_context": FRACTION_TOKENS, "score_from": SCORE_FROM,
                "max_segments": a.max_segments, "passkey_lengths": list(a.passkey_lengths),
                "passkey_trials_per_length": a.passkey_trials, "seed": a.seed, "sinks": SINKS,
                "fraction_tokens": FRACTION_TOKENS, "decode_steps": DECODE_STEPS, "threads": a.threads}
    grid = plan(a)
    todo = parse_runs(a.runs) if a.runs else grid
    result = {"fp": None, "runs": [], "settings": settings}
    if a.resume and jpath.is_file():
        old = json.loads(jpath.read_text())
        if old.get("settings") == settings:
            result = old
        else:
            print(f"--resume: {jpath} has other settings: starting afresh", flush=True)
    lm = load(progress=False)
    eval_tokens = lm.tokenizer.encode(corpus.eval_text(), add_special_tokens=False)
    calib_tokens = lm.tokenizer.encode(corpus.calib_text(), add_special_tokens=False)[:a.calib_tokens]
    originals = [layer.self_attn for layer in lm.model.layers]

    def save():
        done, planned = {key(x) for x in result["runs"]}, []
        for r in todo + grid:  # this invocation's runs first, then the rest of the grid
            if key(r) not in done and key(r) not in {key(x) for x in planned}:
                planned.append(r)
        result["planned"] = planned
        write_atomic(json.dumps(result, indent=2) + "\n", jpath)
        write_report(result, out)

    if result["fp"] is None:
        wait_lock(a.wait_lock)
        t = time.perf_counter()
        result["fp"] = {**measure(lm, eval_tokens, a), "eval_s": round(time.perf_counter() - t, 1)}
        save()
        print(f"fp: {json.dumps({k: v for k, v in result['fp'].items() if k != 'passkey_key_nll'})}", flush=True)
    collected, curves = None, {}
    for run in todo:
        if key(run) in {key(r) for r in result["runs"]}:
            continue
        wait_lock(a.wait_lock)
        t0 = time.perf_counter()
        info = {}
        if run["method"].startswith("cskv"):
            mode = run["method"].removeprefix("cskv-")
            if collected is None:  # the FP model's attention inputs: the same for every CSKV row
                collected = collect_inputs(lm.model, calib_tokens, progress=False)
            section, tensors = calibrate_kv(lm, calib_tokens, run["target_fraction"], a.window, run["key_bits"],
                                            mode, fit_steps=a.fit_steps, seed=a.seed, progress=False,
                                            collected=collected, curve_cache=curves,
                                            budget_context=FRACTION_TOKENS)
            apply_kv(lm.model, section, tensors)
            info = {"calibration_s": section["calibration_s"], "objective": section["objective"],
                    "feature_basis": section["feature_basis"], "allocation": section["allocation"],
                    "init": section["init"], "budget_context": section["budget_context"],
                    "mean_rank_k": statistics.mean(r["rank_k"] for r in section["layers"]),
                    "mean_rank_v": statistics.mean(r["rank_v"] for r in section["layers"])}
        elif run["method"] == "sink-window":
            window = max(1, round(run["target_fraction"] * FRACTION_TOKENS) - SINKS)
            apply_sink_window(lm.model, SINKS, window)
            info = {"sinks": SINKS, "sink_window": window}
        else:
            apply_kivi(lm.model, run["key_bits"], a.window)
            info = {"residual_window": a.window}
        try:
            res = {**run, **measure(lm, eval_tokens, a), **info, "run_s": round(time.perf_counter() - t0, 1)}
        finally:
            restore(lm, originals)
        result["runs"].append(res)
        save()
        print(json.dumps({k: v for k, v in res.items() if k not in ("passkey_key_nll", "passkey_by_length")}),
              flush=True)


def fmt_ci(c) -> str:
    return f"[{c[0]:.2f}, {c[1]:.2f}]"


def write_report(result, out: Path):
    fp, st = result["fp"], result["settings"]
    fp_ci = fp["passkey_ci95"]
    limited = []
    if st["passkey_trials_per_length"] != 20:
        limited.append(f"passkey trials reduced to {st['passkey_trials_per_length']} per length (instrument: 20)")
    if st["max_segments"]:
        limited.append(f"long perplexity limited to {st['max_segments']} segments of {st['long_context']} tokens")
    lines = ["# KV-cache compression on SmolLM2-135M-Instruct (long-context instrument)", "",
             f"Settings: {json.dumps(st)}. Reproduce: `python benchmarks/kv_compression.py` "
             "(`--resume` continues a partial sweep, `--runs` picks rows).", "",
             f"Long perplexity: {fp['long_segments']} non-overlapping segments of {st['long_context']} tokens, only "
             f"positions >= {st['score_from']} scored ({fp['long_scored_tokens']} tokens). KV bytes kept: the cache's "
             f"bytes after a whole {st['fraction_tokens']}-token segment over an FP16 full cache of as many tokens "
             "(the FP row holds fp32: 2.0); CSKV ranks and the sinks+window size are set for the target at "
             f"{st['fraction_tokens']} tokens, KIVI's fraction is its format's. Passkey: "
             f"{st['passkey_trials_per_length']} trials per length at {', '.join(map(str, st['passkey_lengths']))} "
             "tokens, teacher-forced (correct = greedy decoding would emit ' ' + key), Wilson 95% interval; key NLL = "
             "mean NLL per key-digit token. `CI ∩ FP`: the accuracy interval overlaps FP's. Decode: median of "
             f"{st['decode_steps']} steps after the {max(st['passkey_lengths'])}-token prompt, 2 threads beside other "
             "jobs (rough). CSKV rows share one calibration (same data, seed, window, fit, allocation); only the "
             "rank budget, key mode and bits differ; key bits = value bits in every row.", ""]
    if limited:
        lines += ["**Reduced instrument:** " + "; ".join(limited) + ".", ""]
    lines += ["| method | K/V bits | target | KV bytes kept | long ppl | x FP | passkey [95% CI] | CI ∩ FP | "
              "key NLL | x FP | decode ms/tok |",
              "|---|---|---|---|---|---|---|---|---|---|---|",
              f"| fp (full cache) | 16/16 | 1.00 | {fp['kv_bytes_fraction']:.3f} (fp32) | {fp['long_perplexity']:.3f} | "
              f"1.000 | {fp['passkey_accuracy']:.2f} {fmt_ci(fp_ci)} | - | {fp['key_nll']:.3f} | 1.00 | "
              f"{fp['decode_ms_per_token']:.1f} |"]
    for r in sorted(result["runs"], key=lambda r: (-r["kv_bytes_fraction"], r["method"], r["key_bits"])):
        tgt = f"{r['target_fraction']:.2f}" if r.get("target_fraction") else "-"
        ci = r["passkey_ci95"]
        overlap = "yes" if ci[0] <= fp_ci[1] and fp_ci[0] <= ci[1] else "no"
        lines.append(f"| {r['method']} | {r['key_bits']}/{r['value_bits']} | {tgt} | {r['kv_bytes_fraction']:.3f} | "
                     f"{r['long_perplexity']:.3f} | {r['long_perplexity'] / fp['long_perplexity']:.3f} | "
                     f"{r['passkey_accuracy']:.2f} {fmt_ci(ci)} | {overlap} | {r['key_nll']:.3f} | "
                     f"{r['key_nll'] / fp['key_nll']:.2f} | {r['decode_ms_per_token']:.1f} |")
    lengths = list(fp["passkey_by_length"])
    lines += ["", "Passkey accuracy / key NLL by prompt length:", "",
              "| method | K/V bits | KV bytes kept | " + " | ".join(f"{n} acc | {n} NLL" for n in lengths) + " |",
              "|---|---|---|" + "---|---|" * len(lengths)]
    for r in [{"method": "fp", "key_bits": 16, "value_bits": 16, **fp}] + \
            sorted(result["runs"], key=lambda r: (-r["kv_bytes_fraction"], r["method"], r["key_bits"])):
        cells = " | ".join(f"{r['passkey_by_length'][n]['accuracy']:.2f} | {r['passkey_by_length'][n]['key_nll']:.3f}"
                           for n in lengths)
        lines.append(f"| {r['method']} | {r['key_bits']}/{r['value_bits']} | {r['kv_bytes_fraction']:.3f} | {cells} |")
    if result.get("planned"):
        lines += ["", "Not measured yet: " + ", ".join(
            f"{r['method']} {r['key_bits']}b" + (f" @ {r['target_fraction']:.2f}" if r.get("target_fraction") else "")
            for r in result["planned"]) + "."]
    write_atomic("\n".join(lines) + "\n", out.with_suffix(".md"))
    if not result["runs"]:
        return
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    groups = {}
    for r in result["runs"]:
        groups.setdefault(f"{r['method']} ({r['key_bits']}b)", []).append(r)
    for name, rs in sorted(groups.items()):
        rs = sorted(rs, key=lambda r: r["kv_bytes_fraction"])
        x = [r["kv_bytes_fraction"] for r in rs]
        axes[0].plot(x, [r["long_perplexity"] / fp["long_perplexity"] for r in rs], "o-", label=name)
        axes[1].plot(x, [r["key_nll"] / fp["key_nll"] for r in rs], "o-", label=name)
    for ax in axes:
        ax.axhline(1.0, color="k", lw=0.8, label="FP")
    for frac, (ppl_cap, nll_cap) in GOALS.items():
        axes[0].plot([frac], [ppl_cap], "k_", ms=14, mew=2)
        if nll_cap:
            axes[1].plot([frac], [nll_cap], "k_", ms=14, mew=2)
    for ax, yl in zip(axes, ["long perplexity / FP (positions >= 1024 of 4096)", "passkey key-digit NLL / FP"]):
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel(f"KV bytes kept (fraction of FP16 full cache at {st['fraction_tokens']} tokens)")
        ax.set_ylabel(yl)
    axes[1].legend(fontsize=7)
    fig.suptitle("goals: black bars (20%: ppl x1.02, NLL x1.2; 10%: ppl x1.08)", fontsize=8)
    fig.tight_layout()
    save_figure(fig, out.with_suffix(".png"))


if __name__ == "__main__":
    sys.exit(main())
