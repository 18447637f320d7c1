"""Export at scale: a random-weight model of Llama-3.2-1B's shape exported (generic FP16 and ort-cpu
with 4-bit RTN weights), time and peak RSS per target, each target in a fresh process so its peak is
its own; the ort-cpu export is validated against the reference (ONNX Runtime vs PyTorch, greedy
tokens). Figures -> docs/results/export_scale.{json,md}.

    python benchmarks/export_scale.py [--targets generic,ort-cpu] [--layers 16] [--no-validate]
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

# Llama-3.2-1B (config.json of meta-llama/Llama-3.2-1B): hidden 2048, 16 layers, 32 heads, 8 KV heads,
# head_dim 64, MLP 8192, vocab 128256, tied embeddings. Context kept at 8192 (the RoPE tables).
SHAPE = dict(vocab_size=128256, dim=2048, n_layers=16, n_heads=32, n_kv_heads=8, intermediate_size=8192,
             head_dim=64, rope_theta=500000.0, max_seq_len=8192, tie_embeddings=True, model_type="llama")


def rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def one(target: str, layers: int, validate: bool, out: Path) -> dict:
    """In this process: build the random model, export it, (validate), report."""
    import torch

    from shrinkrt.export import artifact
    from shrinkrt.runtime.config import ModelArgs
    from shrinkrt.runtime.loader import embedded_gguf_path, convert_gguf, load_tokenizer
    from shrinkrt.runtime.loader import LoadedModel
    from shrinkrt.runtime.model import Transformer, rope_tables

    torch.manual_seed(0)
    t0 = time.perf_counter()
    args = ModelArgs(**{**SHAPE, "n_layers": layers})
    with torch.device("meta"):
        model = Transformer(args)
    model = model.to_empty(device="cpu")
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.02)
        for n, p in model.named_parameters():
            if "norm" in n:
                p.fill_(1.0)
    model.lm_head.weight = model.embed_tokens.weight
    model.rope_cos, model.rope_sin = rope_tables(args, args.max_seq_len)
    model.eval()
    params = sum(p.numel() for p in model.parameters())
    quant_s = 0.0
    if target == "ort-cpu":  # 4-bit group-128 RTN through the project's own quantizer and packed format
        from shrinkrt.calib import quantize as qz
        from shrinkrt.calib.mq import target_linears
        from shrinkrt.runtime.quant_linear import QuantLinear

        tq = time.perf_counter()
        for name, m in list(target_linears(model)):
            codes, scales, zeros = qz.quantize_rtn(m.weight.detach().float(), 4, 128)[:3]
            p = qz.pack(codes, scales, zeros, 4, 128)
            q = QuantLinear(m.in_features, m.out_features, 4, 128, p.codes, p.scales, p.zeros, None, None)
            parent, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent), child, q)
        quant_s = time.perf_counter() - tq
    tok_dir = convert_gguf(embedded_gguf_path(), progress=False)  # a real tokenizer (ids < this vocab)
    lm = LoadedModel(model, load_tokenizer(tok_dir), tok_dir, f"random-llama-3.2-1b-shape-{layers}l")
    build_s = time.perf_counter() - t0
    rss_model = rss_mb()
    t1 = time.perf_counter()
    artifact.write(lm, out, "float16" if target == "generic" else "float32", target)
    export_s = time.perf_counter() - t1
    row = {"target": target, "layers": layers, "params": params, "param_bytes_fp32": params * 4,
           "model_build_s": round(build_s, 1), "quantize_s": round(quant_s, 1), "export_s": round(export_s, 1),
           "peak_rss_mb_before_export": round(rss_model), "peak_rss_mb": round(rss_mb()),
           "model_onnx_bytes": (out / "model.onnx").stat().st_size,
           "weights_bytes": (out / "model.onnx.data").stat().st_size}
    if validate:
        from shrinkrt.export.validate import validate as run_validate

        t2 = time.perf_counter()
        report = run_validate(out, lm, threads=os.cpu_count() or 1)
        row["validation"] = {"greedy_tokens_identical": report["greedy_tokens_identical"],
                             "max_abs_logit_diff": max(p["max_abs_logit_diff"] for p in report["prompts"]),
                             "tolerance": report["tolerance"], "validate_s": round(time.perf_counter() - t2, 1)}
        row["peak_rss_mb_with_validation"] = round(rss_mb())
    return row


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--targets", default="generic,ort-cpu")
    ap.add_argument("--layers", type=int, default=SHAPE["n_layers"])
    ap.add_argument("--no-validate", action="store_true")
    ap.add_argument("--out", default="docs/results/export_scale")
    ap.add_argument("--_one", default=None, help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a._one:  # child: one target
        with tempfile.TemporaryDirectory() as d:
            row = one(a._one, a.layers, a._one == "ort-cpu" and not a.no_validate, Path(d))
        print(json.dumps(row))
        return 0
    rows = []
    for target in a.targets.split(","):
        cmd = [sys.executable, __file__, "--_one", target, "--layers", str(a.layers)] + \
            (["--no-validate"] if a.no_validate else [])
        p = subprocess.run(cmd, capture_output=True, text=True)
        if p.returncode:
            print(p.stderr[-3000:], file=sys.stderr)
            return 1
        rows.append(json.loads(p.stdout.strip().splitlines()[-1]))
        print(json.dumps(rows[-1]), flush=True)
    from shrinkrt.atomic import MD_MARKER, write_atomic
    import torch

    result = {"format": "shrinkrt-export-scale", "shape": {**SHAPE, "n_layers": a.layers}, "rows": rows,
              "environment": {"cpus": os.cpu_count(), "torch": torch.__version__, "python": platform.python_version()},
              "reproduce": "python benchmarks/export_scale.py"}
    out = Path(a.out)
    write_atomic(json.dumps(result, indent=2) + "\n", out.with_suffix(".json"))
    md = ["# Export at scale (random weights, Llama-3.2-1B shape)", MD_MARKER, "",
          "| target | params | export s | peak RSS MB (model alone / with export) | model.onnx | weights file |",
          "|---|---|---|---|---|---|"]
    for r in rows:
        md.append(f"| {r['target']} | {r['params'] / 1e9:.2f} B | {r['export_s']} | {r['peak_rss_mb_before_export']} / "
                  f"{r['peak_rss_mb']} | {r['model_onnx_bytes'] / 2**20:.1f} MiB | {r['weights_bytes'] / 2**30:.2f} GiB |")
    write_atomic("\n".join(md) + "\n", out.with_suffix(".md"))
    print(f"wrote {out}.json/.md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
