"""CSKV: the bi-branch cache semantics, factor shapes, rank allocation, quantization, checkpoints."""
import pytest
import torch

from shrinkrt.calib import checkpoint
from shrinkrt.calib.cskv import (allocate_ranks, apply_kv, calibrate_kv, feature_budget, init_factors, prepare, rotate,
                                 spectrum, spread_positions, sqrt_psd)
from shrinkrt.errors import ShrinkError
from shrinkrt.runtime import cskv as cskv_runtime, kv_quant
from shrinkrt.runtime.cskv import CSKVAttention, CSKVConfig
from shrinkrt.runtime.loader import load
from tests.test_model import ours_from
from tests.conftest import tiny_hf_model


def swap_full_rank(model, key_mode, window, bits=16, sinks=0):
    """Exact factors (rank = kv_dim): the bi-branch model must equal the base model up to storage."""
    for layer in model.layers:
        a = layer.self_attn
        kv = a.k_proj.weight.shape[0]
        eye = torch.eye(kv)
        k_down = eye if key_mode == "post-rope" else a.k_proj.weight.T.float()
        layer.self_attn = CSKVAttention(a, CSKVConfig(key_mode, window, bits, sinks), k_down.clone(), eye.clone(),
                                        a.v_proj.weight.T.clone(), eye.clone(), model.rope_cos, model.rope_sin)


def run(model, tokens, chunk):
    model.setup_caches(1, tokens.shape[1])
    with torch.no_grad():
        return torch.cat([model(tokens[:, i:i + chunk], i) for i in range(0, tokens.shape[1], chunk)], dim=1)


TOKENS = torch.randint(0, 97, (1, 40), generator=torch.Generator().manual_seed(5))


@pytest.mark.parametrize("key_mode", ["pre-rope", "post-rope"])
@pytest.mark.parametrize("window", [0, 1, 8, 64])
def test_full_rank_equals_base_model(key_mode, window):
    base = ours_from(tiny_hf_model("llama"))
    ref = run(base, TOKENS, 40)
    swap_full_rank(base, key_mode, window)
    for chunk in (40, 7, 1):
        out = run(base, TOKENS, chunk)
        assert (out - ref).abs().max().item() < 5e-3, (chunk, (out - ref).abs().max().item())


@pytest.mark.parametrize("key_mode", ["pre-rope", "post-rope"])
@pytest.mark.parametrize("window", [1, 5])
def test_sinks_full_rank_and_chunking(key_mode, window):
    """Sink tokens at full precision: exact factors still give the base model, any chunking the same
    low-rank result, and the cache reports the sinks' bytes."""
    base = ours_from(tiny_hf_model("llama"))
    ref = run(base, TOKENS, 40)
    swap_full_rank(base, key_mode, window, sinks=3)
    for chunk in (40, 2, 1):
        assert (run(base, TOKENS, chunk) - ref).abs().max().item() < 5e-3
    model = ours_from(tiny_hf_model("llama"))
    gen = torch.Generator().manual_seed(0)
    for layer in model.layers:
        a = layer.self_attn
        in_k = 32 if key_mode == "post-rope" else 64
        layer.self_attn = CSKVAttention(a, CSKVConfig(key_mode, window, 4, 3), torch.randn(in_k, 5, generator=gen),
                                        torch.randn(5, 32, generator=gen) * 0.3, torch.randn(64, 7, generator=gen),
                                        torch.randn(7, 32, generator=gen) * 0.3, model.rope_cos, model.rope_sin)
    one = run(model, TOKENS, 40)
    for chunk in (2, 1):
        assert (run(model, TOKENS, chunk) - one).abs().max().item() < 1e-4
    full = 2 * 2 * 16 * 2  # K+V, 2 KV heads x 16 dims, fp16
    feat = kv_quant.row_bytes(5, 4) + kv_quant.row_bytes(7, 4)
    assert model.layers[0].self_attn.cache.nbytes() == (3 + window) * full + 40 * feat
    no_sinks = run(swap_sinks(model, 0), TOKENS, 40)
    assert (no_sinks - one).abs().max().item() > 1e-3  # the sinks do change the low-rank result


def swap_sinks(model, sinks):
    for layer in model.layers:
        layer.self_attn.cfg = CSKVConfig(layer.self_attn.cfg.key_mode, layer.self_attn.cfg.window,
                                         layer.self_attn.cfg.bits, sinks)
    return model


@pytest.mark.parametrize("key_mode", ["pre-rope", "post-rope"])
@pytest.mark.parametrize("bits", [16, 8, 4])
def test_chunking_does_not_change_low_rank_results(key_mode, bits, monkeypatch):
    """One-shot prefill, chunked prefill, token-by-token decode and any query blocking compute the
    same attention."""
    model = ours_from(tiny_hf_model("qwen2"))  # with q/k/v biases
    gen = torch.Generator().manual_seed(0)
    for layer in model.layers:
        a = layer.self_attn
        in_k = 32 if key_mode == "post-rope" else 64
        layer.self_attn = CSKVAttention(a, CSKVConfig(key_mode, 6, bits), torch.randn(in_k, 5, generator=gen),
                                        torch.randn(5, 32, generator=gen) * 0.3, torch.randn(64, 7, generator=gen),
                                        torch.randn(7, 32, generator=gen) * 0.3, model.rope_cos, model.rope_sin)
    one = run(model, TOKENS, 40)
    for chunk in (9, 6, 1):
        assert (run(model, TOKENS, chunk) - one).abs().max().item() < 1e-4
    for block in (5, 6, 17):  # blocks shorter than, equal to and longer than the window
        monkeypatch.setattr(cskv_runtime, "QUERY_BLOCK", block)
        assert (run(model, TOKENS, 40) - one).abs().max().item() < 1e-4
        assert (run(model, TOKENS, 13) - one).abs().max().item() < 1e-4


@pytest.mark.parametrize("n", [5, 8, 9, 23])  # below, exactly at, one past, well past the window
def test_window_hand_over(n):
    model = ours_from(tiny_hf_model("llama"))
    swap_full_rank(model, "pre-rope", 8, bits=8)
    model.setup_caches(1, 32)
    with torch.no_grad():
        model(TOKENS[:, :n], 0)
    cache = model.layers[0].self_attn.cache
    assert cache.length == n
    held = sorted(p for p in cache.win_pos.tolist() if p >= 0)
    assert held == list(range(max(0, n - 8), n))  # the newest W tokens, nothing else
    # Every token has its features in the compressed branch, written when it arrived.
    assert cache.feat_k.scales[0, :n].abs().min() > 0 and cache.feat_k.scales[0, n:].abs().max() == 0


def test_reported_bytes_are_stored_bytes():
    model = ours_from(tiny_hf_model("llama"))
    swap_full_rank(model, "post-rope", 8, bits=4)
    model.setup_caches(1, 32)
    with torch.no_grad():
        model(TOKENS[:, :20], 0)
    total = 0
    for layer in model.layers:
        c = layer.self_attn.cache
        held = int((c.win_pos >= 0).sum())
        total += held * (c.win_k[:, :, 0].nbytes + c.win_v[:, :, 0].nbytes)
        for store in (c.feat_k, c.feat_v):
            total += store.codes[:, :20].nbytes + store.scales[:, :20].nbytes
    assert model.cache_nbytes() == total
    # 2 layers x [8 window tok x (K+V) x 2 heads x 16 dims x 2 B + 20 tok x 2 x (16 codes + 2 scale B)]
    assert total == 2 * (8 * 2 * 2 * 16 * 2 + 20 * 2 * (32 // 2 + 2))


@pytest.mark.parametrize("bits", [8, 4])
def test_quantize_round_trip(bits):
    x = torch.randn(3, 50, 37, generator=torch.Generator().manual_seed(1)) * 3
    codes, scales = kv_quant.quantize(x, bits)
    assert codes.dtype == (torch.int8 if bits == 8 else torch.uint8)
    assert codes.shape[-1] == (37 if bits == 8 else 19) and scales.shape[-1] == 2
    back = kv_quant.dequantize(codes, scales, bits, 37)
    step = scales.float().repeat_interleave(32, dim=-1)[..., :37]
    assert ((back - x).abs() <= step / 2 + 1e-3 * step).all()  # within half a step (FP16 scale rounding)
    assert kv_quant.row_bytes(37, bits) == codes.shape[-1] + 2 * scales.shape[-1]


def test_rank_allocation_follows_spectra_and_budget():
    flat = torch.ones(16)  # white spectrum: every component worth the same
    steep = torch.tensor([100.0] + [0.01] * 15)  # one dominant direction
    ranks = allocate_ranks([flat, steep], budget_per_token=20 * 2, bits=16, max_rank=16)
    assert ranks[1] == 1 and ranks[0] == 16 or sum(ranks) == 20
    assert ranks[0] > ranks[1]
    assert sum(kv_quant.row_bytes(r, 16) for r in ranks) <= 40
    with pytest.raises(ShrinkError, match="raise --kv-ratio or shrink --window"):
        allocate_ranks([flat, steep], budget_per_token=3, bits=16, max_rank=16)


@pytest.fixture(scope="module")
def calibrated():
    hf = tiny_hf_model("llama")
    lm = type("LM", (), {})()
    lm.model = ours_from(hf)
    tokens = torch.randint(3, 97, (1024,), generator=torch.Generator().manual_seed(9)).tolist()
    return lm, tokens


@pytest.mark.parametrize("key_mode", ["pre-rope", "post-rope"])
def test_calibration_meets_budget_and_is_deterministic(calibrated, key_mode):
    lm, tokens = calibrated
    args = lm.model.args
    kw = dict(kv_ratio=0.5, window=4, kv_bits=8, key_mode=key_mode, fit_steps=20, seed=3, progress=False)
    s1, t1 = calibrate_kv(lm, tokens, **kw)
    s2, t2 = calibrate_kv(lm, tokens, **kw)
    assert all(torch.equal(t1[k], t2[k]) for k in t1)
    assert s1["feature_basis"] == ("whitened (post-RoPE keys: one scale)" if key_mode == "post-rope" else "whitened") \
        + ", seeded random orthogonal rotation (seed = rank)"
    assert s1["kv_bytes_fraction_at_3k"] <= 0.5 + 1e-9
    for i, row in enumerate(s1["layers"]):
        in_k = args.kv_dim if key_mode == "post-rope" else args.dim
        assert t1[f"kv.layers.{i}.k_down"].shape == (in_k, row["rank_k"])
        assert t1[f"kv.layers.{i}.v_up"].shape == (row["rank_v"], args.kv_dim)
        assert row["rel_err_k"] <= row["rel_err_k_init"] + 1e-9
    assert feature_budget(args, 0.5, 4) >= s1["feature_bytes_per_token"]


def test_rotation_keeps_the_product_and_cuts_int4_error():
    """Whitened eigen-features with a few dominant features per token (as real K/V features have) lose
    much of a token's small features to its group scale at int4; the rotation spreads the energy."""
    gen = torch.Generator().manual_seed(0)
    n, dim, r = 4096, 64, 48
    x = torch.randn(n, dim, generator=gen)
    spikes = (torch.rand(n, dim, generator=gen) < 0.03) * 12.0  # heavy-tailed per token
    x = x + spikes * torch.randn(n, dim, generator=gen).sign()
    down, up = torch.eye(dim)[:, :r], torch.randn(r, 32, generator=gen)  # features = the spiky coordinates
    d0, u0 = prepare(down, up, x, 16)  # 16 bits: whitened only
    d1, u1 = prepare(down, up, x, 4)
    assert torch.allclose(d0 @ u0, down @ up, atol=1e-4) and torch.allclose(d1 @ u1, down @ up, atol=1e-4)
    assert torch.equal(rotate(d0, u0, r)[0], d1)  # seeded: the same turn every time
    err = lambda d, u: float((kv_quant.fake_quantize(x @ d, 4) @ u - x @ d @ u).pow(2).sum() / (x @ d @ u).pow(2).sum())
    assert err(d1, u1) < 0.5 * err(d0, u0)  # measured 0.0088 vs 0.0253


def test_one_scale_keeps_score_error_where_whitening_concentrates_it():
    """Keys whose channels differ 100x in spread, read by queries that look along the wide channels (as
    rotated keys and queries do): whitening equalises the features, so the int4 error lands on the
    wide channels; one scale for all keeps it isotropic. Same reconstruction error, half the score error."""
    gen = torch.Generator().manual_seed(0)
    n, d = 4096, 64
    std = torch.logspace(-1, 1, d)
    k = torch.randn(n, d, generator=gen) * std
    q = torch.randn(256, d, generator=gen) * std
    eye = torch.eye(d)
    errs = {}
    for per_feature in (True, False):
        down, up = prepare(eye, eye, k, 4, per_feature=per_feature)
        assert torch.allclose(down @ up, eye, atol=1e-4)
        k_hat = kv_quant.fake_quantize(k @ down, 4) @ up
        errs[per_feature] = (float(((k_hat - k) @ q.T).std() / (k @ q.T).std()),
                             float((k_hat - k).pow(2).sum() / k.pow(2).sum()))
    assert errs[False][0] < 0.6 * errs[True][0]  # measured 0.045 vs 0.097
    assert errs[False][1] < 1.2 * errs[True][1]  # measured 0.0098 vs 0.0094


def test_spread_positions_move_whole_segments_deterministically():
    pos = torch.cat([torch.arange(100), torch.arange(100), torch.arange(40)])
    a, b = spread_positions(pos, 1000, seed=1), spread_positions(pos, 1000, seed=1)
    assert torch.equal(a, b) and not torch.equal(a, spread_positions(pos, 1000, seed=2))
    for lo, hi in ((0, 100), (100, 200), (200, 240)):
        seg = a[lo:hi]
        assert torch.equal(seg - seg[0], torch.arange(hi - lo))  # relative positions kept
        assert 0 <= int(seg[0]) and int(seg[-1]) < 1000
    assert len({int(a[0]), int(a[100]), int(a[200])}) == 3
    assert torch.equal(spread_positions(torch.arange(50), 50, seed=0), torch.arange(50))  # no room to move


def test_activation_init_beats_weight_svd(calibrated):
    lm, tokens = calibrated
    kw = dict(kv_ratio=0.3, window=4, kv_bits=16, fit_steps=0, progress=False)
    act, _ = calibrate_kv(lm, tokens, init="activation", **kw)
    wsvd, _ = calibrate_kv(lm, tokens, init="weight", **kw)
    err = lambda s: sum(r["rel_err_k"] + r["rel_err_v"] for r in s["layers"])
    assert err(act) < err(wsvd)


def test_checkpoint_round_trip_and_validation(tiny_dir, tmp_path):
    lm = load(str(tiny_dir), progress=False)
    tokens = torch.randint(3, 97, (512,), generator=torch.Generator().manual_seed(2)).tolist()
    section, tensors = calibrate_kv(lm, tokens, kv_ratio=0.6, window=4, kv_bits=4, fit_steps=5, progress=False)
    base = checkpoint.base_identity(lm)
    path = checkpoint.save(tmp_path / "ck", {"base_model": base, "kv": section}, tensors)
    from shrinkrt.calib.apply import apply_checkpoint

    fresh = load(str(tiny_dir), progress=False)
    apply_checkpoint(fresh, path)
    assert all(isinstance(l.self_attn, CSKVAttention) for l in fresh.model.layers)
    out = run(fresh.model, TOKENS, 40)
    assert torch.isfinite(out).all()
    bad = dict(tensors)
    bad["kv.layers.1.k_up"] = bad["kv.layers.1.k_up"][:, :-1]
    with pytest.raises(ShrinkError, match=r"kv.layers.1.k_up has shape"):
        apply_kv(load(str(tiny_dir), progress=False).model, section, bad)


def test_weighted_init_minimises_the_weighted_error():
    """Eckart-Young in the metric M: the M-weighted PCA beats the plain PCA on the M-weighted error."""
    g = torch.Generator().manual_seed(4)
    x = torch.randn(2000, 24, generator=g) @ torch.randn(24, 24, generator=g)
    w_t = torch.randn(24, 12, generator=g)
    y = x @ w_t
    a = torch.randn(12, 12, generator=g)
    sq, sq_inv = (t.float() for t in sqrt_psd(a @ a.T + torch.diag(torch.rand(12, generator=g) * 5)))
    eye = torch.eye(12)
    err = lambda down, up: float(((x @ down @ up - y) @ sq).pow(2).sum() / (y @ sq).pow(2).sum())
    weighted = init_factors(w_t, spectrum(y @ sq)[1], 4, "activation", False, sq, sq_inv)
    plain = init_factors(w_t, spectrum(y)[1], 4, "activation", False, eye, eye)
    assert err(*weighted) < err(*plain)
    # rank = full: exact in either metric
    full = init_factors(w_t, spectrum(y @ sq)[1], 12, "activation", False, sq, sq_inv)
    assert err(*full) < 1e-6


def test_weight_bytes_count_factors_not_caches():
    model = ours_from(tiny_hf_model("llama"))
    before = model.weight_nbytes()
    swap_full_rank(model, "pre-rope", 8)
    model.setup_caches(1, 32)
    # per layer: k_down (64x32) + k_up (32x32) + v_down (64x32) + v_up (32x32), float32
    assert model.weight_nbytes() == before + 2 * 4 * (64 * 32 + 32 * 32 + 64 * 32 + 32 * 32)


def test_key_weight_moves_the_budget_between_keys_and_values(calibrated):
    """--key-weight scales the keys' measured error curves in the exact knapsack, so a heavier weight
    never leaves the keys more measured error (nor the values less) under the same byte budget:
    w1 EK1 + EV1 <= w1 EK2 + EV2 and w2 EK2 + EV2 <= w2 EK1 + EV1 give (w2 - w1)(EK1 - EK2) >= 0."""
    from shrinkrt.calib.cskv import RANK_GRID

    lm, tokens = calibrated
    args = lm.model.args
    kw = dict(kv_ratio=0.6, window=4, kv_bits=16, fit_steps=0, progress=False)
    cache = {}
    errs, ranks = {}, {}
    for w in (0.01, 1.0, 100.0):
        s, _ = calibrate_kv(lm, tokens, key_weight=w, curve_cache=cache, **kw)
        assert s["key_weight"] == w and s["feature_bytes_per_token"] <= feature_budget(args, 0.6, 4)
        (curves,) = cache.values()
        grid = [r for r in RANK_GRID if r < args.kv_dim] + [args.kv_dim]
        rows = s["layers"]
        errs[w] = (sum(curves[2 * i][grid.index(r["rank_k"])] for i, r in enumerate(rows)),
                   sum(curves[2 * i + 1][grid.index(r["rank_v"])] for i, r in enumerate(rows)))
        ranks[w] = [(r["rank_k"], r["rank_v"]) for r in rows]
    assert errs[0.01][0] >= errs[1.0][0] >= errs[100.0][0]
    assert errs[0.01][1] <= errs[1.0][1] <= errs[100.0][1]
    assert ranks[100.0] != ranks[1.0]  # measured: keys 8 -> 16 in layer 0, values 32 -> 24 in layer 1
    # (the tiny random model's value errors dominate, so only a strong weight moves it)
    for bad in (0.0, -1.0, float("nan")):
        with pytest.raises(ShrinkError, match="--key-weight must be a positive number"):
            calibrate_kv(lm, tokens, key_weight=bad, **kw)
    with pytest.raises(ShrinkError, match="needs --kv-allocation error"):
        calibrate_kv(lm, tokens, key_weight=2.0, allocation="energy", **kw)
