"""What the faster ort-cpu settings cost in quality, judged by quality rather than a logit threshold
(issue: MatMulNBits accuracy_level 4 = int8 activations; a quantized LM head) -> docs/results/ort_accuracy.{json,md}.

Each export (the first is the reference setting) runs the evaluation text teacher-forced, one token
per call as in decode: perplexity over the first --tokens tokens; and greedy continuations of the
validation prompts, compared token by token with the first export's.

    python benchmarks/ort_accuracy.py EXPORT_DIR [EXPORT_DIR ...] [--tokens 512] [--new 48]
"""
from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

import torch


def perplexity(m, ids: list[int], ref_logp: list | None = None) -> tuple[float, list, float | None]:
    """Perplexity over ids, each position's log-probabilities (fp16, to compare later exports with),
    and, given the first export's, the mean KL(first || this) per position in nats."""
    m.setup_caches(1, len(ids) + 1)
    nll, logps, kl = 0.0, [], 0.0
    for i in range(len(ids) - 1):
        logp = torch.log_softmax(m.forward(torch.tensor([[ids[i]]]), i)[0, -1].double(), -1)
        nll -= float(logp[ids[i + 1]])
        if ref_logp is None:
            logps.append(logp.half())
        else:
            ref = ref_logp[i].double()
            kl += float((ref.exp() * (ref - logp)).sum())
    m.clear_caches()
    n = len(ids) - 1
    return math.exp(nll / n), logps, (kl / n if ref_logp is not None else None)


def greedy(m, ids: list[int], new: int) -> list[int]:
    m.setup_caches(1, len(ids) + new + 1)
    out, tok, pos = [], None, 0
    logits = m.forward(torch.tensor([ids]), 0)
    pos = len(ids)
    for _ in range(new):
        tok = int(logits[0, -1].argmax())
        out.append(tok)
        logits = m.forward(torch.tensor([[tok]]), pos)
        pos += 1
    m.clear_caches()
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("exports", nargs="+")
    ap.add_argument("--tokens", type=int, default=512)
    ap.add_argument("--new", type=int, default=48)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default="docs/results/ort_accuracy")
    a = ap.parse_args(argv)
    from shrinkrt.atomic import MD_MARKER, check_target, results_file_is_ours, write_atomic
    from shrinkrt.export.validate import PROMPTS
    from shrinkrt.runtime.generate import chat_prompt
    from shrinkrt.runtime.loader import load_tokenizer
    from shrinkrt.runtime.ort_model import OrtModel
    from shrinkrt.runtime.profile import prompt_tokens

    out = Path(a.out)
    for suffix in (".json", ".md"):  # never over a file this tool did not write
        check_target(out.with_suffix(suffix), "--out", results_file_is_ours, kind="file")
    for e in a.exports:
        if not (Path(e) / "export.json").is_file():
            ap.error(f"{e}: not an export directory (no export.json)")
    rows, ref = [], None
    for e in a.exports:
        meta = json.loads((Path(e) / "export.json").read_text())
        tok = load_tokenizer(Path(e))
        m = OrtModel(Path(e), threads=a.threads)
        ppl, logps, kl = perplexity(m, prompt_tokens(tok, a.tokens), None if ref is None else ref_logp)
        if ref is None:
            ref_logp = logps
        gens = [greedy(m, chat_prompt(tok, p), a.new) for p in PROMPTS]
        ort_cpu = meta.get("ort_cpu") or {}
        row = {"export": e, "accuracy_level": ort_cpu.get("accuracy_level"),
               "lm_head_bits": (ort_cpu.get("lm_head") or {}).get("bits", 0), "ops_library": m.ops_library is not None,
               "perplexity": ppl, "mean_kl_vs_first": kl or 0.0, "greedy": gens}
        if ref is None:
            ref = row
        same = [sum(1 for x, y in zip(g, r) if x == y) / len(r) for g, r in zip(gens, ref["greedy"])]
        first_diff = [next((i for i, (x, y) in enumerate(zip(g, r)) if x != y), None) for g, r in zip(gens, ref["greedy"])]
        row.update(perplexity_change=ppl / ref["perplexity"] - 1, greedy_agreement=sum(same) / len(same),
                   first_divergence=first_diff)
        rows.append(row)
        print(json.dumps({k: v for k, v in row.items() if k != "greedy"}), flush=True)
    write_atomic(json.dumps({"format": "shrinkrt-ort-accuracy", "tokens": a.tokens, "new_tokens": a.new,
                             "runs": rows}, indent=2) + "\n", out.with_suffix(".json"))
    md = ["# ort-cpu settings: speed levers vs quality", MD_MARKER, "",
          f"Perplexity over the first {a.tokens} tokens of the evaluation text (teacher-forced, one token per call); "
          f"greedy agreement: share of {a.new} greedy tokens per validation prompt equal to the first row's, "
          "position of the first difference; mean KL: KL(first row || this row) of the next-token distribution, "
          "per position, nats.", "",
          "| export | accuracy level | LM head bits | perplexity | change | mean KL | greedy agreement | first divergence |",
          "|---|---|---|---|---|---|---|---|"]
    md += [f"| {r['export']} | {r['accuracy_level']} | {r['lm_head_bits'] or 'float'} | {r['perplexity']:.3f} | "
           f"{r['perplexity_change']:+.2%} | {r['mean_kl_vs_first']:.4f} | {r['greedy_agreement']:.0%} | "
           f"{r['first_divergence']} |" for r in rows]
    write_atomic("\n".join(md) + "\n", out.with_suffix(".md"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
