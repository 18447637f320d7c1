"""A compressed model's long-context quality as a ratio to its FP model, text by text.

What the main job prints beside its speed (issues 19 and 20): the long-context perplexity
(evaluate/perplexity.long_perplexity: every scored token sees a compressed past) of the FP model
and of each compressed variant on the same token ids, on the held-out license texts and on a text
of another domain than the calibration's. Variants come from the caller as (name, model) pairs,
loaded one at a time, so only one compressed copy is held at once.
"""
from __future__ import annotations

import time
from typing import Iterable

from . import corpus
from .perplexity import long_perplexity


def default_texts() -> dict[str, tuple[str, str]]:
    """name -> (text, where it comes from): the held-out licenses and the other-domain text."""
    return {"licenses (held out)": (corpus.eval_text(), f"{corpus.LICENSE_DIR}: {', '.join(corpus.EVAL_FILES)}"),
            "python docs (other domain)": (corpus.other_domain_text(), corpus.OTHER_DOMAIN)}


def compare(tokenizer, fp_model, variants: Iterable[tuple[str, object]], texts: dict[str, tuple[str, str]],
            long_context: int = 4096, score_from: int = 1024, max_segments: int = 1, progress: bool = True) -> dict:
    """-> {"settings", "texts": {name: {source, tokens, fp: {...}}}, "variants": [{name, per text:
    long_perplexity, ratio, kv_bytes_fraction}]}; the FP model is scored first, then each variant."""
    ids = {name: tokenizer.encode(text, add_special_tokens=False) for name, (text, _) in texts.items()}

    def score(model) -> dict:
        out = {}
        for name, tokens in ids.items():
            t0 = time.perf_counter()
            lp = long_perplexity(model, tokens, context=long_context, score_from=score_from,
                                 max_segments=max_segments, progress=progress)
            out[name] = {"long_perplexity": lp["perplexity"], "kv_bytes_fraction": lp["kv_bytes_fraction"],
                         "segments": lp["segments"], "scored_tokens": lp["scored_tokens"],
                         "seconds": round(time.perf_counter() - t0, 1)}
        return out

    fp = score(fp_model)
    rows = []
    for vname, model in variants:
        got = score(model)
        for name in got:
            got[name]["ratio_to_fp"] = got[name]["long_perplexity"] / fp[name]["long_perplexity"]
        rows.append({"name": vname, "texts": got})
    return {"format": "shrinkrt-quality-1",
            "settings": {"long_context": long_context, "score_from": score_from, "max_segments": max_segments},
            "texts": {name: {"source": src, "tokens": len(ids[name]), "digest": corpus.digest(text),
                             "fp": fp[name]} for name, (text, src) in texts.items()},
            "variants": rows}


def table(r: dict) -> str:
    names = list(r["texts"])
    head = "| model | " + " | ".join(f"{n}: long ppl (x FP)" for n in names) + " | KV bytes kept |"
    lines = [head, "|" + "---|" * (len(names) + 2)]
    texts = r["texts"]
    lines.append("| fp32 | " + " | ".join(f"{texts[n]['fp']['long_perplexity']:.3f}" for n in names) + " | 1.00 (fp32: 2.00) |")
    for v in r["variants"]:
        t = v["texts"]
        lines.append(f"| {v['name']} | " + " | ".join(
            f"{t[n]['long_perplexity']:.3f} (x{t[n]['ratio_to_fp']:.3f})" for n in names)
            + f" | {t[names[0]]['kv_bytes_fraction']:.3f} |")
    s = r["settings"]
    first = texts[names[0]]["fp"]
    lines.append(f"\nLong perplexity: {s['max_segments'] or 'all'} segment(s) of {s['long_context']} tokens per text, "
                 f"tokens at positions >= {s['score_from']} scored ({first['scored_tokens']} per text); KV bytes "
                 f"kept: the cache after a segment over an FP16 full cache.")
    return "\n".join(lines)
