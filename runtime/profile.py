"""Latency and memory of one backend at one context: TTFT, prefill tokens/s, decode latency (median,
p90) and tokens/s, peak RSS, cache bytes. Each measurement runs in a fresh process (the caller's
job), so the peak RSS is that backend's alone.

A "backend" is anything with the runtime model interface (setup_caches / __call__(tokens, start) /
cache_nbytes): the reference Transformer, OrtModel, and the peers' adapters in
benchmarks/latency.py. The prompt is real text (the evaluation corpus, repeated as needed) of
exactly `context` tokens; prefill goes in chunks (`prefill_chunk`) as a long prompt does on a device.
"""
from __future__ import annotations

import resource
import statistics
import sys
import time


def peak_rss_mb() -> float:
    """This process's peak resident memory, MB. Linux: VmHWM, the high-water mark of this process's own
    address space; getrusage's ru_maxrss is not, since Linux carries it across fork + exec, so a worker
    would report at least its parent's peak."""
    try:
        for line in open("/proc/self/status"):
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return kb / 1024 if sys.platform != "darwin" else kb / 2**20


def prompt_tokens(tokenizer, context: int) -> list[int]:
    from shrinkrt.evaluate import corpus

    ids = tokenizer.encode(corpus.eval_text(), add_special_tokens=False)
    while len(ids) < context:
        ids = ids + ids
    return ids[:context]


def measure(model, tokens: list[int], decode_steps: int = 32, prefill_chunk: int = 512, warmup: int = 2) -> dict:
    """Greedy decode after a prefill of `tokens`; times are wall-clock seconds on this process."""
    import torch  # here, not at import: peak_rss_mb's callers may not load torch

    with torch.inference_mode():
        return _measure(model, tokens, decode_steps, prefill_chunk, warmup)


def _measure(model, tokens, decode_steps, prefill_chunk, warmup) -> dict:
    import torch

    n = len(tokens)
    model.setup_caches(1, n + decode_steps + warmup)
    t0 = time.perf_counter()
    for s in range(0, n, prefill_chunk):
        logits = model(torch.tensor([tokens[s:s + prefill_chunk]]), s)
    token = int(logits[0, -1].argmax())
    ttft = time.perf_counter() - t0
    steps, pos = [], n
    for i in range(decode_steps + warmup):
        t = time.perf_counter()
        logits = model(torch.tensor([[token]]), pos)
        token = int(logits[0, -1].argmax())
        if i >= warmup:  # first steps pay one-time allocations
            steps.append(time.perf_counter() - t)
        pos += 1
    cache = model.cache_nbytes()
    model.clear_caches()
    steps.sort()
    med = statistics.median(steps)
    return {"context": n, "ttft_s": ttft, "prefill_tokens_per_s": n / ttft, "decode_median_ms": 1000 * med,
            "decode_p90_ms": 1000 * steps[min(len(steps) - 1, int(0.9 * len(steps)))],
            "decode_tokens_per_s": 1 / med, "decode_steps": decode_steps, "prefill_chunk": prefill_chunk,
            "kv_bytes": cache, "peak_rss_mb": peak_rss_mb()}


def isolated(argv: list[str], timeout: float = 1800) -> dict:
    """Run `shrinkrt _profile-one ARGV` in a fresh interpreter; its last stdout line is the JSON row."""
    import json
    import subprocess

    p = subprocess.run([sys.executable, "-c", "import sys; from shrinkrt.cli import main; sys.exit(main(sys.argv[1:]))",
                        "_profile-one", *argv], capture_output=True, text=True, timeout=timeout)
    if p.returncode != 0:
        raise RuntimeError(f"profile run {argv} failed: {(p.stderr.strip().splitlines() or ['?'])[-1]}")
    return json.loads(p.stdout.strip().splitlines()[-1])


def write_report(result: dict, out, title: str = "Latency") -> None:
    """result = {"threads": .., "runs": [...]} -> out.json, out.md, out.png (atomic writes)."""
    import json
    from pathlib import Path

    from shrinkrt.atomic import MD_MARKER, save_figure, write_atomic

    out = Path(out)
    write_atomic(json.dumps(result, indent=2) + "\n", out.with_suffix(".json"))
    rows = ["| backend | context | TTFT s | prefill tok/s | decode tok/s | decode p90 ms | peak RSS MB | KV MiB |",
            "|---|---|---|---|---|---|---|---|"]
    for r in result["runs"]:
        rows.append(f"| {r['backend']} | {r['context']} | {r['ttft_s']:.2f} | {r['prefill_tokens_per_s']:.0f} | "
                    f"{r['decode_tokens_per_s']:.1f} | {r['decode_p90_ms']:.1f} | {r['peak_rss_mb']:.0f} | "
                    f"{r['kv_bytes'] / 2**20:.1f} |")
    head = [f"# {title}", MD_MARKER, "", f"Threads: {result['threads']}. " + result.get("note", ""), ""]
    write_atomic("\n".join(head + rows + result.get("md_extra", [])) + "\n", out.with_suffix(".md"))
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(14, 4))
    for name in sorted({r["backend"] for r in result["runs"]}):
        rs = sorted((r for r in result["runs"] if r["backend"] == name), key=lambda r: r["context"])
        x = [r["context"] for r in rs]
        axes[0].plot(x, [r["decode_tokens_per_s"] for r in rs], "o-", label=name)
        axes[1].plot(x, [r["prefill_tokens_per_s"] for r in rs], "o-", label=name)
        axes[2].plot(x, [r["peak_rss_mb"] for r in rs], "o-", label=name)
    for ax, yl in zip(axes, ["decode tokens/s", "prefill tokens/s", "peak RSS MB"]):
        ax.set_xscale("log", base=2)
        ax.set_xlabel("context (tokens)")
        ax.set_ylabel(yl)
    axes[0].legend(fontsize=7)
    fig.tight_layout()
    save_figure(fig, out.with_suffix(".png"))
