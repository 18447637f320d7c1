"""KIVI and sink+window baselines: exactness limits, chunking invariance, stored bytes."""
import pytest
import torch

from shrinkrt.runtime.kv_baselines import BLOCK, apply_kivi, apply_sink_window
from tests.conftest import tiny_hf_model
from tests.test_cskv import TOKENS, run
from tests.test_model import ours_from

LONG = torch.randint(0, 97, (1, 100), generator=torch.Generator().manual_seed(8))


def test_sink_window_covering_everything_is_exact():
    base = ours_from(tiny_hf_model("llama"))
    ref = run(base, TOKENS, 40)
    apply_sink_window(base, 4, 64)
    assert (run(base, TOKENS, 40) - ref).abs().max().item() < 5e-3


def test_sink_window_drops_the_middle():
    base = ours_from(tiny_hf_model("llama"))
    ref = run(base, LONG, 100)
    apply_sink_window(base, 4, 16)
    out = run(base, LONG, 100)
    assert (out[:, :16] - ref[:, :16]).abs().max().item() < 5e-3  # nothing evicted yet
    assert (out[:, 40:] - ref[:, 40:]).abs().max().item() > 1e-2
    for chunk in (7, 1):
        assert (run(base, LONG, chunk) - out).abs().max().item() < 1e-4
    # 2 layers x 20 tokens (4 sinks + 16 recent) x (K+V) x 2 heads x 16 dims x 2 bytes
    assert base.cache_nbytes() == 2 * 20 * 2 * 2 * 16 * 2


@pytest.mark.parametrize("bits, tol", [(8, 0.05), (4, 0.5)])
def test_kivi_error_shrinks_with_bits(bits, tol):
    base = ours_from(tiny_hf_model("llama"))
    ref = run(base, LONG, 100)
    apply_kivi(base, bits, BLOCK)
    out = run(base, LONG, 100)
    err = (out - ref).abs().max().item()
    assert 0 < err < tol
    for chunk in (9, 1):
        assert (run(base, LONG, chunk) - out).abs().max().item() < 1e-4


def test_kivi_bytes():
    base = ours_from(tiny_hf_model("llama"))
    apply_kivi(base, 2, BLOCK)
    run(base, LONG, 100)
    # per layer: 3 complete blocks (96 tokens) quantized + 32 FP16 window tokens
    codes = 2 * 2 * 96 * (16 * 2 // 8)  # K and V, 2 heads, 96 tokens, 16 dims at 2 bits
    k_meta = 2 * 3 * 16 * 2 * 2  # per block per channel: scale + zero in fp16
    v_meta = 2 * 96 * 1 * 2 * 2  # per token per 32-channel group (1 group of 16): scale + zero
    window = 32 * 2 * 2 * 16 * 2
    assert base.cache_nbytes() == 2 * (codes + k_meta + v_meta + window)
