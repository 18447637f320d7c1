"""The CPU ops library's BiBranchAttention kernel alone -> docs/results/ort_ops.{json,md,png}.

One BiBranchAttention node (SmolLM2's attention: 9 query heads, 3 KV heads, head_dim 64, window 64,
int4 features) in ONNX Runtime with the library registered, next to the same node run as its
reference body (the path without the library) in the same run: decode (T = 1) at several depths and
prefill calls of 512 tokens starting at several depths; mean ± std of --reps repetitions of a timed
loop, as per-call milliseconds and the ratio body / library.

    python benchmarks/ort_ops.py [--depths 512,2048,8000] [--ranks 16,16] [--key-mode post-rope]
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import numpy as np


def inputs_for(H, G, D, W, rk, rv, bits, past, T, seed=0) -> dict:
    """Random but well-scaled inputs of one call: a store of `past` rows (capacity past + T)."""
    rng = np.random.default_rng(seed)
    S = past + T
    f = lambda *s: rng.standard_normal(s).astype(np.float32)
    width = lambda r: (r + 1) // 2 if bits == 4 else r
    groups = lambda r: -(-r // 32)
    pos = np.arange(S)[:, None] / (10000 ** (np.arange(D // 2) * 2 / D))[None]
    ang = np.concatenate([pos, pos], 1).astype(np.float32)
    x = {"q": f(1, T, H * D), "k": f(1, T, G * D), "v": f(1, T, G * D), "c_k": f(1, T, rk), "c_v": f(1, T, rv),
         "win_k": f(1, G, W, D).astype(np.float16), "win_v": f(1, G, W, D).astype(np.float16),
         "k_up": f(rk, G * D) * 0.3, "v_up": f(rv, G * D) * 0.3, "k_bias": f(G * D) * 0.1, "v_bias": f(G * D) * 0.1,
         "rope_cos": np.cos(ang), "rope_sin": np.sin(ang), "past_length": np.array([past], np.int64)}
    if bits == 16:
        x["feat_k"], x["feat_v"] = f(1, S, rk).astype(np.float16), f(1, S, rv).astype(np.float16)
    else:
        # any byte is a valid int8 code, or two valid int4 nibbles
        x["feat_k"] = rng.integers(-128, 128, (1, S, width(rk)), dtype=np.int8)
        x["feat_v"] = rng.integers(-128, 128, (1, S, width(rv)), dtype=np.int8)
        x["feat_k_scales"] = np.full((1, S, groups(rk)), 0.1, np.float16)
        x["feat_v_scales"] = np.full((1, S, groups(rv)), 0.1, np.float16)
    return x


def time_calls(sess, feeds: dict, calls: int, reps: int) -> list[float]:
    sess.run(None, feeds)  # warm: the kernel's scratch is grown once
    out = []
    for _ in range(reps):
        t0 = time.perf_counter()
        for _ in range(calls):
            sess.run(None, feeds)
        out.append((time.perf_counter() - t0) / calls * 1e3)
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--depths", default="512,2048,8000")
    ap.add_argument("--prefill", type=int, default=512, help="tokens of a prefill call")
    ap.add_argument("--ranks", default="16,16", help="rank_k,rank_v (the main job's layers: 8-24)")
    ap.add_argument("--key-mode", default="post-rope", choices=["pre-rope", "post-rope"])
    ap.add_argument("--bits", type=int, default=4, choices=[4, 8, 16])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--no-body", action="store_true", help="the library only (the body is slow at depth)")
    ap.add_argument("--ort-ops", dest="library", default="auto", help="the library to time: auto (the built one) or a path")
    ap.add_argument("--out", default="docs/results/ort_ops")
    a = ap.parse_args(argv)
    import onnxruntime as ort

    from shrinkrt.atomic import MD_MARKER, check_target, results_file_is_ours, save_figure, write_atomic
    from shrinkrt.export import ops
    from shrinkrt.runtime import ort_ops

    from shrinkrt.errors import ShrinkError

    out = Path(a.out)
    try:
        for suffix in (".json", ".md", ".png"):  # never over a file this tool did not write
            check_target(out.with_suffix(suffix), "--out", results_file_is_ours, kind="file")
        lib = ort_ops.resolve(a.library)
        rk, rv = (int(r) for r in a.ranks.split(","))
        depths = [int(d) for d in a.depths.split(",")]
    except ShrinkError as e:
        ap.error(str(e))
    except ValueError:
        ap.error(f"--ranks takes RANK_K,RANK_V and --depths a comma-separated list of integers "
                 f"(got {a.ranks!r}, {a.depths!r})")
    if rk < 1 or rv < 1 or a.prefill < 1 or a.reps < 1 or any(d < 1 for d in depths):
        ap.error("--ranks, --depths, --prefill and --reps must be positive")
    if lib is None:
        ap.error(f"the CPU ops library is not built: {ort_ops.why_missing()}")
    H, G, D, W = 9, 3, 64, 64
    mode = ops.KEY_MODE[a.key_mode]
    proto = ops.bi_branch_model(H, G, D, W, rk, rv, a.bits, mode).SerializeToString()

    def session(with_lib: bool):
        o = ort.SessionOptions()
        o.intra_op_num_threads = a.threads
        o.inter_op_num_threads = 1
        if with_lib:
            ort_ops.register(o, lib)
        return ort.InferenceSession(proto, o, providers=["CPUExecutionProvider"])

    paths = {"library": session(True)} | ({} if a.no_body else {"body": session(False)})
    rows = []
    for depth in depths:
        for phase, T, past in (("decode", 1, depth), ("prefill", a.prefill, max(0, depth - a.prefill))):
            feeds = inputs_for(H, G, D, W, rk, rv, a.bits, past, T)
            row = {"phase": phase, "depth": depth, "tokens": T, "past": past}
            for name, sess in paths.items():
                calls = max(1, int((20 if phase == "decode" else 2) * (1 if name == "library" else 0.25)))
                ms = time_calls(sess, feeds, calls, a.reps)
                row[f"{name}_ms"], row[f"{name}_ms_std"] = statistics.mean(ms), statistics.pstdev(ms)
                row[f"{name}_samples_ms"] = ms
            if "body_ms" in row:
                row["speedup_vs_body"] = row["body_ms"] / row["library_ms"]
            rows.append(row)
            print(json.dumps({k: v for k, v in row.items() if not k.endswith("samples_ms")}), flush=True)
    shape = {"heads": H, "kv_heads": G, "head_dim": D, "window": W, "rank_k": rk, "rank_v": rv, "bits": a.bits,
             "key_mode": a.key_mode}
    write_atomic(json.dumps({"format": "shrinkrt-ort-ops", "threads": a.threads, "reps": a.reps, "shape": shape,
                             "runs": rows},
                            indent=2) + "\n", out.with_suffix(".json"))
    md = ["# BiBranchAttention on the CPU: the ops library vs the reference body", MD_MARKER, "",
          f"One node, {json.dumps(shape)}, {a.threads} threads, {a.reps} repetitions (mean ± std of per-call ms). "
          "Decode: one token over a store of `depth` rows; prefill: a call of `tokens` tokens after `past`.", "",
          "| phase | depth | tokens | library ms | body ms | body / library |", "|---|---|---|---|---|---|"]
    for r in rows:
        body = f"{r['body_ms']:.2f} ± {r['body_ms_std']:.2f}" if "body_ms" in r else "-"
        ratio = f"x{r['speedup_vs_body']:.1f}" if "speedup_vs_body" in r else "-"
        md.append(f"| {r['phase']} | {r['depth']} | {r['tokens']} | {r['library_ms']:.3f} ± {r['library_ms_std']:.3f} "
                  f"| {body} | {ratio} |")
    write_atomic("\n".join(md) + "\n", out.with_suffix(".md"))
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(9, 3.5))
    for ax, phase in zip(axes, ("decode", "prefill")):
        rs = [r for r in rows if r["phase"] == phase]
        xs = np.arange(len(rs))
        for i, name in enumerate(paths):
            ax.bar(xs + 0.4 * i, [r[f"{name}_ms"] for r in rs], 0.4, yerr=[r[f"{name}_ms_std"] for r in rs], label=name)
        ax.set_xticks(xs + 0.2, [str(r["depth"]) for r in rs])
        ax.set_yscale("log")
        ax.set_xlabel("depth (tokens)")
        ax.set_ylabel("ms per call")
        ax.set_title(f"{phase} ({rs[0]['tokens']} token{'s' if rs[0]['tokens'] > 1 else ''})")
        ax.legend()
    fig.tight_layout()
    save_figure(fig, out.with_suffix(".png"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
