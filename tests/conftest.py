"""Shared fixtures: a tiny random Llama-family model built in-process, and the embedded model."""
from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))
# Without a GPU the Triton kernels run under the interpreter (set before anything imports triton);
# with one they are compiled, and tests/gpu checks them on the device.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


def tiny_hf_config(model_type: str = "llama", **over):
    from transformers import AutoConfig

    base = dict(vocab_size=97, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                rms_norm_eps=1e-6, tie_word_embeddings=False, bos_token_id=1, eos_token_id=2)
    if model_type == "llama":
        base["rope_theta"] = 10000.0
    base.update(over)
    return AutoConfig.for_model(model_type, **base)


def tiny_hf_model(model_type: str = "llama", seed: int = 0, **over):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    cfg = tiny_hf_config(model_type, **over)
    model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32).eval()
    with torch.no_grad():  # random init has zero biases / unit norms: perturb so they are tested
        for name, p in model.named_parameters():
            if name.endswith("bias") or "norm" in name:
                p.add_(torch.randn_like(p) * 0.1)
    return model


def word_tokenizer(path: Path):
    """A small word-level tokenizer (97 ids) saved as tokenizer.json, with a chat template."""
    from tokenizers import Tokenizer, models, pre_tokenizers, decoders
    from transformers import PreTrainedTokenizerFast

    words = ["<unk>", "<s>", "</s>"] + [f"w{i}" for i in range(94)]
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.decoder = decoders.WordPiece(prefix="##")  # joins words with spaces
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>")
    fast.chat_template = "{% for m in messages %}{{ m['content'] }} {% endfor %}"
    fast.save_pretrained(path)
    return fast


@pytest.fixture
def tiny_dir(tmp_path):
    """A Hugging Face directory (safetensors + config + tokenizer) of a tiny random Llama."""
    hf = tiny_hf_model("llama")
    d = tmp_path / "tiny-llama"
    hf.save_pretrained(d, safe_serialization=True)
    word_tokenizer(d)
    return d


@pytest.fixture(scope="session")
def embedded():
    """The embedded SmolLM2-135M-Instruct in fp32 (converted into the user cache on first use)."""
    from shrinkrt.runtime.loader import load

    return load(None, progress=False)


def bibranch_call_inputs(model, attn, layer, x, start: int):
    """One call's BiBranchAttention inputs from a CSKV layer: q/k/v (1, T, n*D) with RoPE applied, the
    features c_k/c_v of the new tokens (keys as the window stores them, fp16), and the runtime's
    output for the same call (which advances its cache)."""
    from shrinkrt.runtime.model import apply_rope

    T = x.shape[1]
    H, G, D = layer.n_heads, layer.n_kv_heads, layer.head_dim
    cos, sin = model.rope_cos[start:start + T], model.rope_sin[start:start + T]
    with torch.no_grad():
        q = apply_rope(attn.q_proj(x).view(1, T, H, D).transpose(1, 2), cos, sin)
        k = apply_rope(attn.k_proj(x).view(1, T, G, D).transpose(1, 2), cos, sin)
        v = attn.v_proj(x).view(1, T, G, D).transpose(1, 2)
        c_k, c_v = layer.features(x, k.half().float())
        ref = layer(x, cos, sin, start)
    flat = lambda t: t.transpose(1, 2).reshape(1, T, -1)  # noqa: E731
    return {"q": flat(q), "k": flat(k), "v": flat(v), "c_k": c_k, "c_v": c_v}, ref
