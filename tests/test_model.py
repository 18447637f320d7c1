"""The reference forward against transformers' modeling code on tiny random models."""
import pytest
import torch

from shrinkrt.runtime.config import ModelArgs
from shrinkrt.runtime.loader import build_model
from tests.conftest import tiny_hf_model


def ours_from(hf):
    args = ModelArgs.from_hf_config(hf.config.to_dict())
    state = {k.removeprefix("model."): v.clone() for k, v in hf.state_dict().items()}
    return build_model(args, state).eval()


VARIANTS = {
    "llama": ("llama", {}),
    "llama-tied": ("llama", {"tie_word_embeddings": True}),
    "llama-bias": ("llama", {"attention_bias": True, "mlp_bias": True}),
    "llama3-rope": ("llama", {"rope_parameters": {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0,
                                                   "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                                   "original_max_position_embeddings": 16}}),
    "linear-rope": ("llama", {"rope_parameters": {"rope_type": "linear", "rope_theta": 10000.0, "factor": 4.0}}),
    "qwen2": ("qwen2", {}),
    "mistral": ("mistral", {"sliding_window": None}),
    "mha": ("llama", {"num_key_value_heads": 4}),
}


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_prefill_and_decode_match_transformers(variant):
    model_type, over = VARIANTS[variant]
    hf = tiny_hf_model(model_type, **over)
    ours = ours_from(hf)
    tokens = torch.randint(0, 97, (2, 40), generator=torch.Generator().manual_seed(1))
    ours.setup_caches(2, 64)
    with torch.no_grad():
        out = hf(tokens[:, :30], use_cache=True)
        diff = (ours(tokens[:, :30], 0) - out.logits).abs().max().item()
        assert diff <= 1e-5, f"prefill differs by {diff}"
        cache = out.past_key_values
        for i in range(30, 40):
            step = tokens[:, i:i + 1]
            o = hf(step, past_key_values=cache, use_cache=True)
            cache = o.past_key_values
            d = (ours(step, i) - o.logits).abs().max().item()
            assert d <= 1e-5, f"decode step {i} differs by {d}"


def test_llama3_rope_scaling_changes_frequencies():
    _, over = VARIANTS["llama3-rope"]
    hf = tiny_hf_model("llama", **over)
    from shrinkrt.runtime.model import rope_inv_freq

    args = ModelArgs.from_hf_config(hf.config.to_dict())
    plain = ModelArgs.from_hf_config(tiny_hf_model("llama", rope_theta=500000.0).config.to_dict())
    scaled, base = rope_inv_freq(args), rope_inv_freq(plain)
    assert not torch.equal(scaled, base)
    assert torch.allclose(scaled[-1], base[-1] / 8.0)  # longest slowed by factor


def test_chunked_prefill_equals_one_shot():
    ours = ours_from(tiny_hf_model("llama"))
    tokens = torch.randint(0, 97, (1, 48), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        ours.setup_caches(1, 48)
        full = ours(tokens, 0)
        ours.setup_caches(1, 48)
        parts = torch.cat([ours(tokens[:, i:i + 7], i) for i in range(0, 48, 7)], dim=1)
        ours.setup_caches(1, 48)
        last = ours(tokens, 0, last_only=True)
    assert (full - parts).abs().max().item() <= 1e-5
    assert last.shape == (1, 1, 97) and torch.allclose(last[0, 0], full[0, -1])


def test_sliding_window_matches_transformers():
    hf = tiny_hf_model("mistral", sliding_window=8)
    hf.config._attn_implementation = "eager"
    ours = ours_from(hf)
    assert ours.args.sliding_window == 8
    tokens = torch.randint(0, 97, (1, 20), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        diff = (ours(tokens, 0) - hf(tokens).logits).abs().max().item()
    assert diff <= 1e-5


def test_cache_bounds_are_enforced():
    ours = ours_from(tiny_hf_model("llama"))
    ours.setup_caches(1, 16)
    with torch.no_grad(), pytest.raises(ValueError, match="exceed the cache of 16"):
        ours(torch.zeros(1, 17, dtype=torch.long), 0)
    with pytest.raises(ValueError, match="exceeds the model's context 128"):
        ours.setup_caches(1, 129)


def test_cache_reports_bytes_it_stores():
    ours = ours_from(tiny_hf_model("llama"))
    ours.setup_caches(1, 32)
    with torch.no_grad():
        ours(torch.zeros(1, 10, dtype=torch.long), 0)
    # 2 layers x (K + V) x 2 kv heads x 16 dims x 4 bytes x 10 tokens
    assert ours.cache_length() == 10
    assert ours.cache_nbytes() == 2 * 2 * 2 * 16 * 4 * 10
    held = sum(l.self_attn.cache.k[:, :, :10].nbytes + l.self_attn.cache.v[:, :, :10].nbytes for l in ours.layers)
    assert ours.cache_nbytes() == held
    assert ours.weight_nbytes() == sum(p.nbytes for p in ours.parameters())
