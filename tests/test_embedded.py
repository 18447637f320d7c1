"""End-to-end on the embedded SmolLM2-135M-Instruct (converted once into the user cache)."""
import pytest
import torch

from shrinkrt.evaluate.passkey import Trial, build_prompt, passkey
from shrinkrt.evaluate.perplexity import perplexity
from shrinkrt.runtime.generate import chat_prompt, generate

pytestmark = pytest.mark.model


def test_logits_match_transformers_prefill_and_20_decode_steps(embedded):
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(embedded.model_dir, dtype=torch.float32).eval()
    ids = chat_prompt(embedded.tokenizer, "Name three colours of the rainbow.")
    m = embedded.model
    m.setup_caches(1, len(ids) + 21)
    worst = 0.0
    with torch.no_grad():
        x = torch.tensor([ids])
        ours = m(x, 0)
        out = hf(x, use_cache=True)
        worst = (ours - out.logits).abs().max().item()
        cache, pos = out.past_key_values, len(ids)
        token = int(ours[0, -1].argmax())
        for _ in range(20):
            step = torch.tensor([[token]])
            ours = m(step, pos)
            out = hf(step, past_key_values=cache, use_cache=True)
            cache = out.past_key_values
            worst = max(worst, (ours - out.logits).abs().max().item())
            assert int(ours[0, -1].argmax()) == int(out.logits[0, -1].argmax())
            token, pos = int(ours[0, -1].argmax()), pos + 1
    m.clear_caches()
    assert worst <= 1e-4, f"max |diff| {worst}"


def test_model_cache_is_a_standard_hf_directory(embedded):
    """The converted cache names its architecture and has a generation config, so transformers and
    onnxruntime-genai's builder (which refuses `architectures: null`) take it as it is."""
    import json

    from transformers import AutoConfig, GenerationConfig

    cfg = json.loads((embedded.model_dir / "config.json").read_text())
    assert cfg["architectures"] == ["LlamaForCausalLM"] and cfg["model_type"] == "llama"
    assert AutoConfig.from_pretrained(embedded.model_dir).architectures == ["LlamaForCausalLM"]
    gen = GenerationConfig.from_pretrained(embedded.model_dir)
    assert gen.eos_token_id is not None


def test_chat_answer(embedded):
    ids = chat_prompt(embedded.tokenizer, "What is the capital of France?")
    g = generate(embedded.model, embedded.tokenizer, ids, max_new_tokens=20)
    assert g.text == "The capital of France is Paris."
    assert g.stop_reason == "eos"


def test_perplexity_on_eval_text_is_sane(embedded):
    from shrinkrt.evaluate.corpus import eval_text

    toks = embedded.tokenizer.encode(eval_text(), add_special_tokens=False)
    r = perplexity(embedded.model, toks, context=256, max_segments=2, progress=False)
    assert r["scored_tokens"] == 2 * 255
    assert 2.0 < r["perplexity"] < 30.0  # legal English for a 135M model; random would be ~49152
    r2 = perplexity(embedded.model, toks, context=256, chunk=64, max_segments=2, progress=False)
    assert abs(r2["perplexity"] - r["perplexity"]) < 1e-3 * r["perplexity"]  # same via chunked cache


def test_passkey_prompt_places_needle_and_model_retrieves_it(embedded):
    t = Trial(512, 0.5, "48213")
    ids = build_prompt(embedded.tokenizer, t)
    text = embedded.tokenizer.decode(ids)
    assert 400 <= len(ids) <= 512 and text.count("48213") == 2
    at = text.index("48213") / len(text)
    assert 0.35 < at < 0.65
    r = passkey(embedded.model, embedded.tokenizer, [t], progress=False)
    assert r["trials"][0]["cache_bytes"] == r["trials"][0]["stored_tokens"] * 30 * 2 * 3 * 64 * 4
