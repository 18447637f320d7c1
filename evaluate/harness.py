"""`shrinkrt eval`: perplexity + passkey + memory on one loaded model -> a table and a JSON file."""
from __future__ import annotations

import json
import platform
import time
from pathlib import Path

import torch

from shrinkrt.atomic import MD_MARKER, results_file_is_ours, write_file
from shrinkrt.runtime.kernels import kernels_on

from . import corpus
from .memory import memory_report
from .passkey import passkey, trials
from .perplexity import perplexity


RESULTS_FORMAT = "shrinkrt-eval"


def evaluate(lm, context: int = 1024, max_segments: int = 0, passkey_lengths=(1024, 2048, 3072),
             passkey_depths=(0.1, 0.5, 0.9), passkey_per_cell: int = 1, seed: int = 0,
             memory_context: int = 8192, progress: bool = True) -> dict:
    t0 = time.perf_counter()
    text = corpus.eval_text()
    tokens = lm.tokenizer.encode(text, add_special_tokens=False)
    ppl = perplexity(lm.model, tokens, context=context, max_segments=max_segments, progress=progress)
    pk = passkey(lm.model, lm.tokenizer, trials(passkey_lengths, passkey_depths, passkey_per_cell, seed),
                 progress=progress)
    # Cache bytes after each passkey prompt were recorded by generate(); keep the real figures.
    measured = {r["stored_tokens"]: r["cache_bytes"] for r in pk["trials"]}
    mem = memory_report(lm.model, measured, memory_context)
    by_len = {}
    for r in pk["trials"]:
        by_len.setdefault(str(r["length"]), []).append(r["correct"])
    return {
        "format": RESULTS_FORMAT,
        "model": lm.name,
        "model_dir": str(lm.model_dir),
        "dtype": str(lm.model.embed_tokens.weight.dtype).removeprefix("torch."),
        "device": str(lm.model.embed_tokens.weight.device),
        "eval_text": {"source": str(corpus.LICENSE_DIR), "files": list(corpus.EVAL_FILES),
                      "sha256": corpus.digest(text), "tokens": len(tokens)},
        "perplexity": ppl,
        "passkey": {"accuracy": pk["passkey_accuracy"], "seed": seed,
                    "accuracy_by_length": {k: sum(v) / len(v) for k, v in by_len.items()},
                    "trials": pk["trials"]},
        "memory": mem,
        "environment": {"torch": torch.__version__, "threads": torch.get_num_threads(), "kernels": kernels_on(),
                        "python": platform.python_version(), "machine": platform.machine()},
        "elapsed_s": round(time.perf_counter() - t0, 1),
    }


def table(r: dict) -> str:
    mib = 1 / 2**20
    ppl, pk, mem = r["perplexity"], r["passkey"], r["memory"]
    rows = [
        ("model", f"{r['model']} ({r['dtype']}, {r['device']})"),
        ("perplexity", f"{ppl['perplexity']:.3f}  ({ppl['segments']} x {ppl['context']} tok, "
                       f"{', '.join(r['eval_text']['files'])})"),
        ("passkey accuracy", f"{pk['accuracy']:.2f}  (" + ", ".join(
            f"{k}: {v:.2f}" for k, v in pk["accuracy_by_length"].items()) + f"; seed {pk['seed']})"),
        ("weights", f"{mem['weight_bytes'] * mib:.1f} MiB ({mem['weight_params'] / 1e6:.1f} M params)"),
        ("KV cache / token", f"{mem['kv_bytes_per_token'] / 1024:.1f} KiB as stored "
                             f"({mem['kv_bytes_fp16_per_token'] / 1024:.1f} KiB at FP16)"),
        (f"KV cache @ {mem['context']}", f"{mem['kv_bytes_at_context'] * mib:.1f} MiB as stored "
                                         f"({mem['kv_bytes_fp16_at_context'] * mib:.1f} MiB at FP16)"),
        ("eval time", f"{r['elapsed_s']} s"),
    ]
    w = max(len(k) for k, _ in rows)
    lines = [f"| {'metric'.ljust(w)} | value", f"|{'-' * (w + 2)}|------"]
    return "\n".join([*lines, *(f"| {k.ljust(w)} | {v}" for k, v in rows)])


def markdown_path(path: Path) -> Path:
    """The report beside a results JSON: NAME.json -> NAME.md (never the JSON's own path)."""
    return Path(path).with_suffix(".md")


def write_results(r: dict, path: Path, command: str) -> None:
    """JSON with every figure and trial, and a markdown table beside it (same stem). `path` must end
    in .json (the CLI checks it up front); either file is replaced only if shrinkrt wrote it."""
    path = Path(path)
    if path.suffix != ".json":
        raise ValueError(f"results path {path} must end in .json (its markdown goes beside it)")
    md = (f"# Evaluation: {r['model']}\n{MD_MARKER}\n\n{table(r)}\n\nReproduce: `{command}`\n\n"
          f"Perplexity: non-overlapping segments of {r['perplexity']['context']} tokens of "
          f"{', '.join(r['eval_text']['files'])} ({r['eval_text']['source']}), every token but the first of "
          f"each segment scored. Passkey: a 5-digit key at depths 10/50/90% of filler text, greedy, "
          f"{len(r['passkey']['trials'])} trials (seed {r['passkey']['seed']}); trials in the JSON.\n")
    write_file(path, json.dumps(r, indent=2) + "\n", results_file_is_ours, "--out")
    write_file(markdown_path(path), md, results_file_is_ours, "--out")
