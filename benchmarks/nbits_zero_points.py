"""Why min layers go to the 8-bit container -> docs/results/nbits_zero_points.{json,md,png}.

One com.microsoft::MatMulNBits (SmolLM2's gate/up shape, N=1536, K=576, block 32, accuracy level 4) on
the CPU at 1 and 64 rows, three ways a layer could be lowered: 4-bit codes with uint8 zero points,
8-bit codes with uint8 zero points (what export/ort_cpu.py does for fp16-min layers), and 4-bit codes
with float zero points (exact for mins, but ONNX Runtime's fallback path). Mean +- std of repetitions.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

from shrinkrt.atomic import MD_MARKER, save_figure, write_atomic

OUT = Path(__file__).resolve().parents[1] / "docs" / "results" / "nbits_zero_points"
N, K, BLOCK = 1536, 576, 32
VARIANTS = (("4-bit, uint8 zero points", 4, False), ("8-bit, uint8 zero points", 8, False),
            ("4-bit, float zero points", 4, True))


def model(bits: int, float_zp: bool) -> bytes:
    rng = np.random.default_rng(0)
    blocks, per = K // BLOCK, 8 // bits
    b = rng.integers(0, 256, (N, blocks, BLOCK * bits // 8), dtype=np.uint8)
    scales = rng.uniform(0.001, 0.01, N * blocks).astype(np.float32)
    zp = (rng.uniform(0, 2 ** bits - 1, N * blocks).astype(np.float32) if float_zp
          else rng.integers(0, 256, (N, -(-blocks // per)), dtype=np.uint8).reshape(-1))
    node = helper.make_node("MatMulNBits", ["X", "B", "S", "Z"], ["Y"], domain="com.microsoft", K=K, N=N, bits=bits,
                            block_size=BLOCK, accuracy_level=4)
    graph = helper.make_graph([node], "nbits", [helper.make_tensor_value_info("X", TensorProto.FLOAT, ["M", K])],
                              [helper.make_tensor_value_info("Y", TensorProto.FLOAT, ["M", N])],
                              [numpy_helper.from_array(b, "B"), numpy_helper.from_array(scales, "S"),
                               numpy_helper.from_array(zp, "Z")])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21),
                                                   helper.make_opsetid("com.microsoft", 1)]).SerializeToString()


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--reps", type=int, default=5, help="repetitions (each a timed loop of calls)")
    ap.add_argument("--out", type=Path, default=OUT)
    a = ap.parse_args(argv)
    so = ort.SessionOptions()
    so.intra_op_num_threads = a.threads
    runs = []
    for rows, calls in ((1, 200), (64, 20)):
        x = np.random.default_rng(1).standard_normal((rows, K)).astype(np.float32)
        for name, bits, float_zp in VARIANTS:
            sess = ort.InferenceSession(model(bits, float_zp), so, providers=["CPUExecutionProvider"])
            for _ in range(10):
                sess.run(None, {"X": x})
            samples = []
            for _ in range(a.reps):
                t0 = time.perf_counter()
                for _ in range(calls):
                    sess.run(None, {"X": x})
                samples.append((time.perf_counter() - t0) / calls * 1e6)
            runs.append({"variant": name, "bits": bits, "float_zero_points": float_zp, "rows": rows,
                         "us": statistics.mean(samples), "us_std": statistics.stdev(samples), "samples_us": samples})
            print(f"{rows} row(s), {name}: {runs[-1]['us']:.0f} +- {runs[-1]['us_std']:.0f} us", flush=True)
    result = {"shape": {"N": N, "K": K, "block": BLOCK, "accuracy_level": 4}, "threads": a.threads,
              "onnxruntime": ort.__version__, "runs": runs}
    write_atomic(json.dumps(result, indent=2) + "\n", a.out.with_suffix(".json"))
    lines = ["# MatMulNBits: zero-point kind and container bits (CPU)", MD_MARKER, "",
             f"N={N}, K={K}, block {BLOCK}, accuracy level 4, {a.threads} threads, ONNX Runtime {ort.__version__}; "
             f"mean +- std of {a.reps} repetitions. Why export/ort_cpu.py lowers fp16-min layers to 8-bit codes "
             "with uint8 zero points (docs/ops.md).", "", "| rows | variant | us per call | x 4-bit uint8 |",
             "| --- | --- | --- | --- |"]
    for r in runs:
        base = next(b for b in runs if b["rows"] == r["rows"] and b["bits"] == 4 and not b["float_zero_points"])
        lines.append(f"| {r['rows']} | {r['variant']} | {r['us']:.0f} +- {r['us_std']:.0f} | {r['us'] / base['us']:.2f} |")
    write_atomic("\n".join(lines) + "\n", a.out.with_suffix(".md"))
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 3.5))
    for ax, rows in zip(axes, (1, 64)):
        rs = [r for r in runs if r["rows"] == rows]
        ax.bar(range(len(rs)), [r["us"] for r in rs], yerr=[r["us_std"] for r in rs])
        ax.set_xticks(range(len(rs)), [r["variant"].replace(", ", "\n") for r in rs], fontsize=7)
        ax.set_ylabel("us per call")
        ax.set_title(f"MatMulNBits {N}x{K}, {rows} row(s)")
    fig.tight_layout()
    save_figure(fig, a.out.with_suffix(".png"))
    plt.close(fig)
    print(f"wrote {a.out}.{{json,md,png}}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
