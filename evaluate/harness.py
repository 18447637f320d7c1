"""`shrinkrt eval`: perplexity, long-context perplexity, passkey retrieval and memory on one loaded model
-> a table and a JSON file."""
from __future__ import annotations

import json
import platform
import time
from pathlib import Path

import torch

from shrinkrt.atomic import MD_MARKER, results_file_is_ours, write_file
from shrinkrt.errors import ShrinkError
from shrinkrt.runtime.kernels import kernels_on

from . import corpus
from .memory import memory_report
from .passkey import retrieval, retrieval_trials
from .perplexity import long_perplexity, perplexity


RESULTS_FORMAT = "shrinkrt-eval"


def check_text_length(n_tokens: int, context: int, score_from: int, what: str) -> None:
    """Enough tokens for one perplexity segment and for one long segment with a scored token."""
    need = max(context, score_from + 1)
    if n_tokens < need:
        raise ShrinkError(f"{what} encodes to {n_tokens} tokens with this model's tokenizer: too short for one "
                          f"segment (needs >= {need}: --context {context}, and more than --score-from {score_from})")


def evaluate(lm, context: int = 1024, max_segments: int = 0, long_context: int = 4096, score_from: int = 1024,
             passkey_lengths=(1024, 2048, 3072, 4096), passkey_trials: int = 20, seed: int = 0,
             memory_context: int = 8192, text: str | None = None, text_path: str | None = None,
             progress: bool = True) -> dict:
    """text: evaluation text (default: the license texts of evaluate/corpus.py), text_path its file."""
    t0 = time.perf_counter()
    if text is None:
        text = corpus.eval_text()
        source = {"source": str(corpus.LICENSE_DIR), "files": list(corpus.EVAL_FILES)}
    else:
        source = {"source": str(text_path or "(given)"), "files": [Path(text_path).name if text_path else "(given)"]}
    tokens = lm.tokenizer.encode(text, add_special_tokens=False)
    check_text_length(len(tokens), context, score_from, f"the evaluation text {source['source']}")
    ppl = perplexity(lm.model, tokens, context=context, max_segments=max_segments, progress=progress)
    lp = long_perplexity(lm.model, tokens, context=long_context, score_from=score_from, max_segments=max_segments,
                         progress=progress)
    pk = retrieval(lm.model, lm.tokenizer, retrieval_trials(passkey_lengths, passkey_trials, seed), progress=progress)
    # The cache bytes the runtime reported after each passkey pass and long segment: real figures.
    measured = {r["stored_tokens"]: r["cache_bytes"] for r in pk["trials"]}
    measured.update({int(k): v for k, v in lp["kv_bytes_at"].items()})
    mem = memory_report(lm.model, measured, memory_context)
    return {
        "format": RESULTS_FORMAT,
        "model": lm.name,
        "model_dir": str(lm.model_dir),
        "dtype": str(lm.model.embed_tokens.weight.dtype).removeprefix("torch."),
        "device": str(lm.model.embed_tokens.weight.device),
        "eval_text": {**source, "sha256": corpus.digest(text), "tokens": len(tokens)},
        # the results schema's figures (issue 19), detailed in the blocks below
        "long_perplexity": lp["perplexity"],
        "kv_bytes_fraction": lp["kv_bytes_fraction"],
        "passkey_accuracy": pk["accuracy"],
        "passkey_ci95": pk["ci95"],
        "key_nll": pk["key_nll"],
        "perplexity": ppl,
        "long_context": lp,
        "passkey": {**pk, "seed": seed, "trials_per_length": passkey_trials},
        "memory": mem,
        "environment": {"torch": torch.__version__, "threads": torch.get_num_threads(), "kernels": kernels_on(),
                        "python": platform.python_version(), "machine": platform.machine()},
        "elapsed_s": round(time.perf_counter() - t0, 1),
    }


def table(r: dict) -> str:
    mib = 1 / 2**20
    ppl, lp, pk, mem = r["perplexity"], r["long_context"], r["passkey"], r["memory"]
    ci = lambda c: f"[{c[0]:.2f}, {c[1]:.2f}]"  # noqa: E731
    rows = [
        ("model", f"{r['model']} ({r['dtype']}, {r['device']})"),
        ("perplexity", f"{ppl['perplexity']:.3f}  ({ppl['segments']} x {ppl['context']} tok, "
                       f"{', '.join(r['eval_text']['files'])})"),
        ("long perplexity", f"{lp['perplexity']:.3f}  ({lp['segments']} x {lp['context']} tok, tokens at "
                            f">= {lp['score_from']} scored: {lp['scored_tokens']})"),
        ("KV bytes fraction", f"{lp['kv_bytes_fraction']:.3f} of FP16 at {lp['context']} tok "
                              f"({lp['kv_bytes_fraction_at_score_from']:.3f} at {lp['score_from']})"),
        ("passkey accuracy", f"{pk['accuracy']:.2f} {ci(pk['ci95'])}  (" + ", ".join(
            f"{k}: {v['accuracy']:.2f}" for k, v in pk["by_length"].items())
            + f"; {pk['trials_per_length']} per length, seed {pk['seed']})"),
        ("key NLL / token", f"{pk['key_nll']:.3f}  (" + ", ".join(
            f"{k}: {v['key_nll']:.3f}" for k, v in pk["by_length"].items()) + ")"),
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
          f"each segment scored. Long perplexity: segments of {r['long_context']['context']} tokens, only "
          f"tokens at positions >= {r['long_context']['score_from']} scored; the KV bytes fraction is the "
          f"cache's bytes after a whole segment over an FP16 full cache of as many tokens. Passkey: a 5-digit "
          f"key at evenly spaced depths of filler text, {r['passkey']['trials_per_length']} trials per length "
          f"(seed {r['passkey']['seed']}), teacher-forced: correct when the argmax is the true token at every "
          f"position of ' ' + key (what greedy decoding would emit), 95% Wilson interval; key NLL = mean NLL "
          f"per key token given the prompt. Trials in the JSON.\n")
    write_file(path, json.dumps(r, indent=2) + "\n", results_file_is_ours, "--out")
    write_file(markdown_path(path), md, results_file_is_ours, "--out")
