"""Validation of an export: ONNX checker with full shape inference, ONNX Runtime against the PyTorch
reference on real prompts (prefill logits, then DECODE_STEPS greedy steps: logits within TOLERANCE
and identical greedy tokens), and Polygraphy's ONNX Runtime runner on the artifact.

Tolerance, max |logit difference|: both sides compute in fp32 from the same stored numbers, so what
is left is summation order (~1e-5 over 30 layers); a quantized feature branch adds the rare code that
rounds the other way at a tie (one step of one feature), which moves logits by ~1e-3. 2e-2 is far
below what a real mismatch produces (a wrong mask or rotation moves logits by whole units).
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import torch

from shrinkrt.errors import ShrinkError
from shrinkrt.runtime.ort_model import OrtModel

TOLERANCE = {"float32": 2e-2, "float16": 0.5}
DECODE_STEPS = 32
PROMPTS = ("What is the capital of France?", "Write a haiku about compilers.",
           "Explain in two sentences why the sky is blue.")


def check_onnx(path: Path) -> None:
    try:
        onnx.checker.check_model(str(Path(path) / "model.onnx"), full_check=True)
    except onnx.checker.ValidationError as e:
        raise ShrinkError(f"validate: ONNX checker: {str(e).splitlines()[0]}") from e


@torch.inference_mode()
def compare(ref_model, ort_model: OrtModel, prompt_ids: list[int], steps: int, tol: float) -> float:
    """Teacher-forced on the reference's greedy tokens; returns the largest |logit difference|."""
    total = len(prompt_ids) + steps
    ref_model.setup_caches(1, total)
    ort_model.setup_caches(1, total)
    tokens = torch.tensor([prompt_ids])
    worst, pos = 0.0, 0
    for step in range(steps + 1):
        a = ref_model(tokens, pos, last_only=True)[0, -1].float()
        b = ort_model(tokens, pos)[0, -1].float()
        where = "prefill" if step == 0 else f"decode step {step}"
        diff = float((a - b).abs().max())
        if not np.isfinite(diff) or diff > tol:
            raise ShrinkError(f"validate: logits of {where} differ by {diff:.4g} (threshold {tol:g}) "
                              f"after {len(prompt_ids)} prompt tokens")
        if int(a.argmax()) != int(b.argmax()):
            raise ShrinkError(f"validate: greedy token of {where} differs: ONNX Runtime {int(b.argmax())}, "
                              f"reference {int(a.argmax())}")
        worst = max(worst, diff)
        pos += tokens.shape[1]
        tokens = a.argmax().view(1, 1)
    ref_model.clear_caches()
    ort_model.clear_caches()
    return worst


def polygraphy_run(path: Path, vocab: int) -> dict:
    """Polygraphy's ONNX Runtime runner on a 4-token prefill from empty caches; returns output stats."""
    from polygraphy.backend.onnxrt import OnnxrtRunner, SessionFromOnnx

    graph = onnx.load(str(Path(path) / "model.onnx"), load_external_data=False).graph
    feeds = {}
    for i in graph.input:
        t = i.type.tensor_type
        dims = [d.dim_value or {"batch": 1, "capacity": 8, "seq": 4}[d.dim_param] for d in t.shape.dim]
        feeds[i.name] = np.zeros(dims, onnx.helper.tensor_dtype_to_np_dtype(t.elem_type))
    feeds["input_ids"] = (np.arange(4, dtype=np.int64) * 7 % vocab)[None]
    with OnnxrtRunner(SessionFromOnnx(str(Path(path) / "model.onnx"), providers=["cpu"])) as runner:
        out = runner.infer(feeds)
    logits = out["logits"]
    if not np.isfinite(logits).all():
        raise ShrinkError("validate: polygraphy run --onnxrt produced non-finite logits")
    return {"outputs": len(out), "logits_shape": list(logits.shape)}


def validate(path: Path, lm, steps: int = DECODE_STEPS, threads: int = 0) -> dict:
    from shrinkrt.runtime.generate import chat_prompt

    from .artifact import read_meta

    meta = read_meta(path)
    check_onnx(path)
    ort_model = OrtModel(path, threads)
    tol = TOLERANCE[meta["dtype"]]
    rows = []
    for p in PROMPTS:
        ids = chat_prompt(lm.tokenizer, p)
        rows.append({"prompt": p, "prompt_tokens": len(ids),
                     "max_abs_logit_diff": compare(lm.model, ort_model, ids, steps, tol)})
    return {"checker": "ok (full shape inference)", "tolerance": tol, "decode_steps": steps, "prompts": rows,
            "greedy_tokens_identical": True, "polygraphy": polygraphy_run(path, lm.model.args.vocab_size)}
