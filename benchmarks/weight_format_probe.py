"""A probe for a weight format not built yet -> docs/results/weight_format_probe.{json,md}.

The embedded linears are exactly Q4_1 (4-bit codes, groups of 32, fp16 scale and min: 5.0 bpw). The
question: what does it cost to store each group's scale and min as b-bit codes against one fp16 value
per row (k-quant style double quantization: 4 + 2b/32 bpw plus the per-row values)? Simulated on
dense weights: per linear, RTN with fp16 mins (calib.quantize, exact here), the scales (unsigned) and
mins (signed) rounded to b bits against the row's largest, the codes re-rounded to that grid, then
perplexity on the same segments as weight_quant.py. No kernel reads this format yet.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

from shrinkrt.atomic import MD_MARKER, write_atomic
from shrinkrt.calib import mq
from shrinkrt.calib import quantize as qz
from shrinkrt.evaluate import corpus
from shrinkrt.evaluate.perplexity import perplexity
from shrinkrt.runtime.loader import load

OUT = Path(__file__).resolve().parents[1] / "docs" / "results" / "weight_format_probe"
GROUP = 32


def double_quantized(w: torch.Tensor, code_bits: int) -> tuple[torch.Tensor, float]:
    """(N, K) -> the dense weight of 4-bit g32 codes whose scales and mins are `code_bits`-bit codes of
    the row's largest scale / largest |min| (16: the fp16 values themselves), and its bits per weight."""
    N, K = w.shape
    q, s, m, deq = qz.quantize_rtn(w, 4, GROUP, mins=True)
    if code_bits == 16:
        return deq, 4 + 32 / GROUP
    s, m = s.float(), m.float()
    smax = s.amax(1, keepdim=True).half().float().clamp(min=1e-12)
    mmax = m.abs().amax(1, keepdim=True).half().float().clamp(min=1e-12)
    s = torch.round(s / smax * (2 ** code_bits - 1)) * smax / (2 ** code_bits - 1)
    m = torch.round(m / mmax * (2 ** (code_bits - 1) - 1)) * mmax / (2 ** (code_bits - 1) - 1)
    g = w.reshape(N, K // GROUP, GROUP)
    q = torch.where(s[..., None] > 0, torch.round((g - m[..., None]) / s.clamp(min=1e-12)[..., None]), 0).clamp(0, 15)
    bpw = 4 + 2 * code_bits / GROUP + 2 * 16 / K
    return (q * s[..., None] + m[..., None]).reshape(N, K), bpw


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--code-bits", default="16,8,6", help="scale/min code widths (16 = fp16, Q4_1 itself)")
    ap.add_argument("--max-segments", type=int, default=6)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", type=Path, default=OUT)
    a = ap.parse_args(argv)
    torch.set_num_threads(a.threads)
    lm = load(None, progress=False)
    ids = lm.tokenizer.encode(corpus.eval_text(), add_special_tokens=False)
    linears = mq.target_linears(lm.model)
    if any(m.in_features % GROUP for _, m in linears):
        sys.exit(f"a linear's in_features is not a multiple of {GROUP}")
    original = {n: m.weight.detach().clone() for n, m in linears}
    fp = perplexity(lm.model, ids, 1024, max_segments=a.max_segments, progress=False)["perplexity"]
    n_weights = sum(w.numel() for w in original.values())
    runs = []
    for b in (int(x) for x in a.code_bits.split(",")):
        t0, bits = time.time(), 0.0
        with torch.no_grad():
            for n, m in linears:
                deq, bpw = double_quantized(original[n].float(), b)
                m.weight.copy_(deq.to(m.weight.dtype))
                bits += bpw * original[n].numel()
        ppl = perplexity(lm.model, ids, 1024, max_segments=a.max_segments, progress=False)["perplexity"]
        runs.append({"scale_min_bits": b, "bits_per_weight": bits / n_weights, "perplexity": ppl, "x_fp": ppl / fp})
        print(f"scales/mins {b}-bit: {bits / n_weights:.3f} bpw, perplexity {ppl:.3f} (x{ppl / fp:.4f}, "
              f"{time.time() - t0:.0f} s)", flush=True)
    with torch.no_grad():
        for n, m in linears:
            m.weight.copy_(original[n])
    result = {"fp": {"perplexity": fp}, "runs": runs, "settings": {"model": lm.name, "context": 1024,
              "max_segments": a.max_segments, "group": GROUP, "simulated": True}}
    write_atomic(json.dumps(result, indent=2) + "\n", a.out.with_suffix(".json"))
    lines = ["# Probe: Q4_1 with its scales and mins double-quantized (simulated, no kernel yet)", MD_MARKER, "",
             f"Model {lm.name}; perplexity on weight_quant.py's segments (context 1024, {a.max_segments} segments); "
             f"FP {fp:.3f}. Scales unsigned, mins signed, each against the row's largest (one fp16 each per row).", "",
             "| scale/min codes | bpw | perplexity | x FP |", "| --- | --- | --- | --- |"]
    lines += [f"| {r['scale_min_bits']}-bit | {r['bits_per_weight']:.3f} | {r['perplexity']:.3f} | {r['x_fp']:.4f} |"
              for r in runs]
    write_atomic("\n".join(lines) + "\n", a.out.with_suffix(".md"))
    print(f"wrote {a.out}.{{json,md}}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
