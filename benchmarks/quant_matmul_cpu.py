"""The main job's weights on the CPU at model scale -> docs/results/quant_matmul_cpu.{json,md,png}.

All linears of SmolLM2-135M's 30 layers (packed q/k/v 960x576, o 576x576, packed gate/up 3072x576,
down 576x1536: 106M weights, distinct tensors, so a call streams them from memory as a decode step
does), chained in one graph, three ways:
- `MatMulNBits 8-bit container`: how export/ort_cpu.py lowered the 4-bit fp16-min layers before the
  library had QuantMatMul (9.25 bits per weight read: 8-bit codes, fp32 scale, uint8 zero point);
- `QuantMatMulW4A8 (library)`: the CPU ops library's kernel on the layers' own 4-bit codes with fp16
  scales and mins, int8 activations (5.0 bits per weight: what export/ort_cpu.py now writes at
  accuracy level 4);
- `MatMulNBits 4-bit`: 4-bit codes with uint4 zero points (onnxruntime-genai's int4 format; 5.1 bits
  per weight; the speed a min layer would have if its min were rounded to a zero point).
At 1 row (a decode step's linears) and 512 rows (a prompt). Mean +- std of repetitions, 2 threads.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

from shrinkrt.atomic import MD_MARKER, save_figure, write_atomic
from shrinkrt.runtime import ort_ops
from shrinkrt.runtime.op_contract import DOMAIN

OUT = Path(__file__).resolve().parents[1] / "docs" / "results" / "quant_matmul_cpu"
HIDDEN, FFN, LAYERS, BLOCK = 576, 1536, 30, 32
# (N, K) of one layer's linears in the order they are chained (each output feeds the next one's input
# through a Slice where the widths differ)
LINEARS = ((960, HIDDEN), (HIDDEN, HIDDEN), (2 * FFN, HIDDEN), (HIDDEN, FFN))
VARIANTS = ("MatMulNBits 8-bit container", "QuantMatMulW4A8 (library)", "MatMulNBits 4-bit")


def _scale(rng, shape, bits: int, K: int) -> np.ndarray:
    """Scales that keep the chain's activations O(1) (a gain of ~1 per linear: no denormals, no overflow)
    for uniform codes around a middle zero point (std of the codes: (2^bits) / sqrt(12))."""
    return rng.uniform(0.8, 1.2, shape) / (2 ** bits / 12 ** 0.5 * K ** 0.5)


def _nbits(rng, name: str, N: int, K: int, bits: int, inits: list) -> list[str]:
    blocks = K // BLOCK
    middle = 0x88 if bits == 4 else 0x80  # zero point 8 (two per byte) or 128
    inits += [numpy_helper.from_array(rng.integers(0, 256, (N, blocks, BLOCK * bits // 8), dtype=np.uint8), f"{name}.B"),
              numpy_helper.from_array(_scale(rng, N * blocks, bits, K).astype(np.float32), f"{name}.S"),
              numpy_helper.from_array(np.full(N * -(-blocks * bits // 8), middle, np.uint8), f"{name}.Z")]
    return [f"{name}.B", f"{name}.S", f"{name}.Z"]


def _w4a8(rng, name: str, N: int, K: int, inits: list) -> list[str]:
    G = K // BLOCK
    scales = _scale(rng, (N, G), 4, K)
    arrays = {"codes": rng.integers(-2**31, 2**31, (N, G * 4), dtype=np.int64).astype(np.int32),
              "scales": scales.astype(np.float16), "mins": (-8 * scales).astype(np.float16)}
    inits += [numpy_helper.from_array(a, f"{name}.{k}") for k, a in arrays.items()]
    return [f"{name}.{k}" for k in arrays]


def model(variant: str) -> bytes:
    rng = np.random.default_rng(0)
    nodes, inits, x = [], [], "X"
    for layer in range(LAYERS):
        for j, (N, K) in enumerate(LINEARS):
            name, y = f"l{layer}.{j}", f"l{layer}.{j}.y"
            if variant == "QuantMatMulW4A8 (library)":
                nodes.append(helper.make_node("QuantMatMulW4A8", [x, *_w4a8(rng, name, N, K, inits)], [y],
                                              domain=DOMAIN, in_features=K, out_features=N, quantized_sums=1))
            else:
                bits = 8 if "8-bit" in variant else 4
                nodes.append(helper.make_node("MatMulNBits", [x, *_nbits(rng, name, N, K, bits, inits)], [y],
                                              domain="com.microsoft", K=K, N=N, bits=bits, block_size=BLOCK,
                                              accuracy_level=4))
            nxt = LINEARS[(j + 1) % len(LINEARS)][1]
            if nxt != N:  # the next linear's width: the first columns (values stay O(1): scales are small)
                nodes.append(helper.make_node("Slice", [y, "zero", f"w{nxt}", "last"], [f"{y}.s"]))
                y = f"{y}.s"
            x = y
    for n, v in (("zero", 0), ("last", -1), *((f"w{w}", w) for w in {k for _, k in LINEARS})):
        inits.append(numpy_helper.from_array(np.array([v], np.int64), n))
    graph = helper.make_graph(nodes, "linears", [helper.make_tensor_value_info("X", TensorProto.FLOAT, ["M", HIDDEN])],
                              [helper.make_tensor_value_info(x, TensorProto.FLOAT, ["M", HIDDEN])], inits)
    return helper.make_model(graph, ir_version=10, opset_imports=[
        helper.make_opsetid("", 21), helper.make_opsetid("com.microsoft", 1),
        helper.make_opsetid(DOMAIN, 1)]).SerializeToString()


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--reps", type=int, default=5, help="repetitions (each a timed loop of calls)")
    ap.add_argument("--out", type=Path, default=OUT)
    a = ap.parse_args(argv)
    from shrinkrt.atomic import check_target, results_file_is_ours
    from shrinkrt.errors import ShrinkError

    try:
        for suffix in (".json", ".md", ".png"):  # never over a file this tool did not write
            check_target(a.out.with_suffix(suffix), "--out", results_file_is_ours, kind="file")
    except ShrinkError as e:
        ap.error(str(e))
    if a.threads < 1 or a.reps < 2:
        ap.error("--threads must be >= 1 and --reps >= 2 (the figures are mean +- std)")
    lib = ort_ops.resolve("auto")
    if lib is None:
        print(f"error: the CPU ops library is not built ({ort_ops.why_missing()})", file=sys.stderr)
        return 2
    runs = []
    weights = LAYERS * sum(n * k for n, k in LINEARS)
    for rows, calls in ((1, 30), (512, 2)):
        x = np.random.default_rng(1).standard_normal((rows, HIDDEN)).astype(np.float32)
        for variant in VARIANTS:
            so = ort.SessionOptions()
            so.intra_op_num_threads = a.threads
            ort_ops.register(so, lib)
            sess = ort.InferenceSession(model(variant), so, providers=["CPUExecutionProvider"])
            for _ in range(3):
                sess.run(None, {"X": x})
            samples = []
            for _ in range(a.reps):
                t0 = time.perf_counter()
                for _ in range(calls):
                    sess.run(None, {"X": x})
                samples.append((time.perf_counter() - t0) / calls * 1e3)
            runs.append({"variant": variant, "rows": rows, "ms": statistics.mean(samples),
                         "ms_std": statistics.stdev(samples), "samples_ms": samples})
            print(f"{rows} row(s), {variant}: {runs[-1]['ms']:.2f} +- {runs[-1]['ms_std']:.2f} ms", flush=True)
            del sess
    cpu = next((ln.split(":", 1)[1].strip() for ln in open("/proc/cpuinfo") if ln.startswith("model name")), "?")
    result = {"shape": {"layers": LAYERS, "linears": [list(x) for x in LINEARS], "weights": weights, "block": BLOCK},
              "threads": a.threads, "onnxruntime": ort.__version__, "cpu": cpu, "ops_library": str(lib.name),
              "runs": runs}
    write_atomic(json.dumps(result, indent=2) + "\n", a.out.with_suffix(".json"))
    lines = ["# The main job's linears at model scale on the CPU", MD_MARKER, "",
             f"{weights / 1e6:.0f}M weights in {LAYERS} layers x {len(LINEARS)} linears (SmolLM2-135M, q/k/v and "
             f"gate/up packed), chained in one graph; {a.threads} threads, ONNX Runtime {ort.__version__}, {cpu}; "
             f"mean +- std of {a.reps} repetitions (`python benchmarks/quant_matmul_cpu.py`).", "",
             "| rows | variant | ms per call | x 8-bit container |", "| --- | --- | --- | --- |"]
    for r in runs:
        base = next(b for b in runs if b["rows"] == r["rows"] and b["variant"] == VARIANTS[0])
        lines.append(f"| {r['rows']} | {r['variant']} | {r['ms']:.2f} +- {r['ms_std']:.2f} | {r['ms'] / base['ms']:.2f} |")
    write_atomic("\n".join(lines) + "\n", a.out.with_suffix(".md"))
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 3.5))
    for ax, rows in zip(axes, (1, 512)):
        rs = [r for r in runs if r["rows"] == rows]
        ax.bar(range(len(rs)), [r["ms"] for r in rs], yerr=[r["ms_std"] for r in rs])
        ax.set_xticks(range(len(rs)), [r["variant"].replace(" (", "\n(").replace(" 8-bit", "\n8-bit") for r in rs],
                      fontsize=7)
        ax.set_ylabel("ms per call")
        ax.set_title(f"all linears, {rows} row(s)")
    fig.tight_layout()
    save_figure(fig, a.out.with_suffix(".png"))
    plt.close(fig)
    print(f"wrote {a.out}.{{json,md,png}}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
