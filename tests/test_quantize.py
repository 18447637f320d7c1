"""Group-wise quantizers (RTN, GPTQ) and the packed layout: exact round trips at every bit width,
odd shapes, and GPTQ beating RTN where inputs are correlated."""
import pytest
import torch

from shrinkrt.calib import quantize as qz
from shrinkrt.errors import ShrinkError

ODD_SHAPES = [(1, 1), (3, 31), (5, 33), (7, 100), (2, 129), (4, 200)]


@pytest.fixture(autouse=True)
def one_thread():
    """These tests run many small ops: on the shared 2-core machine a second torch thread only spins."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.mark.parametrize("bits", qz.SUPPORTED_BITS)
@pytest.mark.parametrize("rows,cols", ODD_SHAPES)
def test_bit_stream_round_trip(bits, rows, cols):
    g = torch.Generator().manual_seed(bits * 1000 + cols)
    v = torch.randint(0, 2**bits, (rows, cols), generator=g)
    v[0, 0], v[-1, -1] = 2**bits - 1, 2**bits - 1  # all ones: exercises the sign bit of the words
    words = qz.pack_bits(v, bits, qz.code_words(cols, bits))
    assert words.dtype == torch.int32 and words.shape == (rows, qz.code_words(cols, bits))
    assert torch.equal(qz.unpack_bits(words, bits, cols), v)


def test_bit_order_is_little_endian_stream():
    # 3-bit codes 0..10: code 10 straddles words 0 and 1 (bits 30..32).
    v = torch.arange(11).view(1, 11) % 8
    w = qz.pack_bits(v, 3, 2)
    stream = sum(int(c) << (3 * j) for j, c in enumerate(v[0]))
    assert (int(w[0, 0]) & 0xFFFFFFFF) == stream & 0xFFFFFFFF
    assert (int(w[0, 1]) & 0xFFFFFFFF) == stream >> 32


def test_pack_refuses_overflow():
    with pytest.raises(ValueError):
        qz.pack_bits(torch.zeros(1, 33, dtype=torch.int64), 4, 4)


@pytest.mark.parametrize("bits", qz.SUPPORTED_BITS)
@pytest.mark.parametrize("group", qz.GROUP_SIZES)
@pytest.mark.parametrize("rows,cols", [(3, 31), (5, 130), (6, 257)])
def test_packed_round_trip_and_dequantize(bits, group, rows, cols):
    torch.manual_seed(0)
    w = torch.randn(rows, cols)
    q, s, z, deq = qz.quantize_rtn(w, bits, group)
    p = qz.pack(q, s, z, bits, group)
    assert p.codes.dtype == torch.int32 and p.zeros.dtype == torch.int32 and p.scales.dtype == torch.float16
    assert p.scales.shape == (rows, qz.n_groups(cols, group))
    q2, z2 = qz.unpack(p)
    assert torch.equal(q2, q) and torch.equal(z2, z)
    # The stored layout dequantizes to exactly what the quantizer said the model computes with.
    assert torch.equal(qz.dequantize(p.codes, p.scales, p.zeros, bits, group, cols), deq)
    # Padding up to a whole 32-code tile holds the last group's zero point: it dequantizes to 0.
    tiles = -(-cols // qz.TILE) * qz.TILE
    tail = qz.unpack_bits(p.codes, bits, tiles)[:, cols:]
    assert torch.equal(tail, z[:, -1:].expand_as(tail))


@pytest.mark.parametrize("bits", qz.SUPPORTED_BITS)
def test_rtn_error_is_within_half_a_step(bits):
    torch.manual_seed(1)
    w = torch.randn(8, 256)
    q, s, z, deq = qz.quantize_rtn(w, bits, 64)
    assert int(q.min()) >= 0 and int(q.max()) <= 2**bits - 1
    step = s.repeat_interleave(64, dim=1)
    inside = deq.sub(w).abs() <= step / 2 + 1e-6
    # The range search may clip the extremes of a group; everything else rounds to nearest.
    assert inside.float().mean() > 0.95


def test_error_falls_with_bits():
    torch.manual_seed(2)
    w = torch.randn(16, 256)
    errs = [float((qz.quantize_rtn(w, b, 128)[3] - w).pow(2).mean()) for b in qz.SUPPORTED_BITS]
    assert errs == sorted(errs, reverse=True) and errs[-1] < 1e-4


def correlated(n=2048, dim=256, rank=24, seed=3):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, rank, generator=g) @ torch.randn(rank, dim, generator=g) + 0.05 * torch.randn(n, dim, generator=g)


def layer_problem(X, bits):
    """(H, w, output error of a quantized w on X) for the quantizer comparisons."""
    w = torch.randn(48, X.shape[1], generator=torch.Generator().manual_seed(bits))
    return X.T @ X / X.shape[0], w, lambda deq: float(((deq - w) @ X.T).pow(2).mean())


@pytest.mark.parametrize("bits", [2, 3, 4])
def test_gptq_beats_rtn_on_correlated_inputs(bits):
    X = correlated()
    H, w, out_err = layer_problem(X, bits)
    rtn = out_err(qz.quantize_rtn(w, bits, 64, col_weight=torch.diag(H))[3])
    gptq = out_err(qz.quantize_gptq(w, H, bits, 64)[3])
    assert gptq < 0.5 * rtn


def test_gptq_output_is_on_the_grid():
    X = correlated(dim=130)
    H = X.T @ X / X.shape[0]
    w = torch.randn(5, 130)
    q, s, z, deq = qz.quantize_gptq(w, H, 3, 64)
    p = qz.pack(q, s, z, 3, 64)
    assert torch.equal(qz.dequantize(p.codes, p.scales, p.zeros, 3, 64, 130), deq)


def skewed(n=2048, dim=256, seed=6):
    """Correlated inputs whose channels differ 100x in energy (as real activations do)."""
    g = torch.Generator().manual_seed(seed)
    return correlated(n, dim, seed=seed) * torch.logspace(0, 2, dim)[torch.randperm(dim, generator=g)]


@pytest.mark.parametrize("bits", [2, 3, 4])
def test_act_order_gptq_beats_input_order_on_skewed_inputs(bits):
    H, w, out_err = layer_problem(skewed(), bits)
    plain, act = (out_err(qz.quantize_gptq(w, H, bits, 64, act_order=o)[3]) for o in (False, True))
    assert act < 0.9 * plain


def test_act_order_gptq_stays_on_the_contiguous_group_grid():
    X = skewed(dim=130)
    H = X.T @ X / X.shape[0]
    w = torch.randn(5, 130)
    keep = torch.zeros_like(w, dtype=torch.bool)
    keep[2, 100] = True
    q, s, z, deq = qz.quantize_gptq(w, H, 3, 64, keep, act_order=True)
    p = qz.pack(q, s, z, 3, 64)  # the stored layout knows no permutation: groups of 64 input columns
    dense = qz.dequantize(p.codes, p.scales, p.zeros, 3, 64, 130)
    assert torch.equal(torch.where(keep, deq, dense), deq) and float(dense[2, 100]) == 0.0
    # the permuted inverse Hessian given up front is the one it computes itself
    perm = qz.activation_order(H)
    again = qz.quantize_gptq(w, H, 3, 64, keep, hinv=qz.inverse_hessian(H[perm][:, perm]), act_order=True)
    assert all(torch.equal(a, b) for a, b in zip((q, s, z, deq), again))


def test_per_row_bits_match_separate_calls():
    torch.manual_seed(4)
    X = correlated(dim=128)
    H = X.T @ X / X.shape[0]
    w = torch.randn(6, 128)
    bits = torch.tensor([2, 2, 3, 3, 8, 8])
    for quant in (lambda b, ww: qz.quantize_rtn(ww, b, 64), lambda b, ww: qz.quantize_gptq(ww, H, b, 64)):
        stacked = quant(bits, w)
        for r0, b in ((0, 2), (2, 3), (4, 8)):
            alone = quant(b, w[r0:r0 + 2])
            assert torch.equal(stacked[0][r0:r0 + 2], alone[0])
            assert torch.allclose(stacked[3][r0:r0 + 2], alone[3], atol=1e-6)


@pytest.mark.parametrize("gptq", [False, True])
def test_kept_weights_are_exact_and_leave_the_range(gptq):
    torch.manual_seed(5)
    w = torch.randn(4, 128)
    w[1, 7] = 40.0  # an outlier that would stretch its group's range 10x
    keep = torch.zeros_like(w, dtype=torch.bool)
    keep[1, 7] = True
    X = correlated(dim=128)
    H = X.T @ X / X.shape[0]
    q, s, z, deq = (qz.quantize_gptq(w, H, 4, 64, keep) if gptq else qz.quantize_rtn(w, 4, 64, keep))
    assert int(q[1, 7]) == int(z[1, 0])  # dense part exactly 0 under the outlier
    if not gptq:
        assert float(deq[1, 7]) == 40.0
    assert float(s[1, 0]) < 1.0  # the range ignores the outlier (it would need a step of ~2.8)


def test_unknown_bits_is_a_clear_error():
    with pytest.raises(ShrinkError, match="unsupported bit width 5"):
        qz.quantize_rtn(torch.randn(2, 64), 5, 64)


def q41_weights(rows, cols, seed=0):
    """Weights on Q4_1 grids, as the source GGUF's linears are: per 32 columns d * q + m with fp16 d and
    m, q in 0..15 (codes 0 and 15 present in every group, as Q4_1's min/max rule puts them)."""
    gen = torch.Generator().manual_seed(seed)
    G = cols // 32
    d = (torch.rand(rows, G, 1, generator=gen) * 0.02 + 0.001).half().float()
    m = (-torch.rand(rows, G, 1, generator=gen) * 0.15).half().float()
    q = torch.randint(0, 16, (rows, G, 32), generator=gen)
    q[:, :, 0], q[:, :, 1] = 0, 15
    return (q * d + m).reshape(rows, cols)


@pytest.mark.parametrize("quantizer", ["rtn", "gptq", "gptq-act-order"])
def test_mins_hold_q4_1_weights_exactly_and_zero_points_do_not(quantizer):
    """4-bit group-32 with fp16 mins is Q4_1's own form: every quantizer keeps such weights bit for bit
    (and the packed layer dequantizes to them), while integer zero points move the grid off by up to half
    a step and lose them."""
    w = q41_weights(24, 96)
    x = torch.randn(512, 96, generator=torch.Generator().manual_seed(1)) * torch.linspace(0.2, 3, 96)
    H = x.T @ x / 512

    def run(mins):
        if quantizer == "rtn":
            return qz.quantize_rtn(w, 4, 32, col_weight=torch.diag(H), mins=mins)
        return qz.quantize_gptq(w, H, 4, 32, act_order=quantizer == "gptq-act-order", mins=mins)

    q, s, m, deq = run(True)
    assert torch.equal(deq, w)
    p = qz.pack(q, s, m, 4, 32, mins=True)
    assert p.zeros is None and p.mins.dtype == torch.float16 and tuple(p.mins.shape) == (24, 3)
    assert torch.equal(qz.dequantize(p.codes, p.scales, None, 4, 32, 96, p.mins), w)
    codes, mins = qz.unpack(p)
    assert torch.equal(codes, q) and torch.equal(mins, m)
    *_, deq_z = run(False)
    assert (deq_z - w).abs().max() > 1e-4


def test_mins_pack_tail_and_formats():
    """Columns past K in the last tile hold code 0 (dequantizing to the min: kernels mask them); mins are
    refused outside the min formats and with outliers."""
    w = q41_weights(3, 64)[:, :50]
    q, s, m, deq = qz.quantize_rtn(w, 4, 32, mins=True)
    p = qz.pack(q, s, m, 4, 32, mins=True)
    full = qz.unpack_bits(p.codes, 4, 64)
    assert torch.equal(full[:, :50], q) and bool((full[:, 50:] == 0).all())
    with pytest.raises(ShrinkError, match="fp16 mins are stored for 4-bit group-32 layers only"):
        qz.pack(*qz.quantize_rtn(w, 3, 32, mins=True)[:3], 3, 32, mins=True)
    keep = torch.zeros_like(w, dtype=torch.bool)
    keep[0, 0] = True
    with pytest.raises(ValueError, match="no outliers"):
        qz.quantize_rtn(w, 4, 32, keep=keep, mins=True)


@pytest.mark.parametrize("quantizer", ["rtn", "gptq", "gptq-act-order"])
def test_8bit_params_pack_exactly_and_stay_close_to_fp16_params(quantizer):
    """Scales and mins as 8-bit codes on per-row fp16 steps: what the quantizer computes with is what the
    packed layer dequantizes to (bit for bit: the codes stand for fp16 values), the codes fit their
    ranges, the layer takes 1 + 1 bytes per group and 4 per row, and on Q4_1 weights (which fp16 params
    hold exactly) the error stays far below what integer zero points cost."""
    w = q41_weights(24, 96)
    x = torch.randn(512, 96, generator=torch.Generator().manual_seed(1)) * torch.linspace(0.2, 3, 96)
    H = x.T @ x / 512
    steps = qz.row_param_steps(w, 4, 32, torch.diag(H))
    assert steps.shape == (24, 2) and torch.equal(steps, steps.half().float()) and bool((steps > 0).all())

    def run(**kw):
        if quantizer == "rtn":
            return qz.quantize_rtn(w, 4, 32, col_weight=torch.diag(H), mins=True, **kw)
        return qz.quantize_gptq(w, H, 4, 32, act_order=quantizer == "gptq-act-order", mins=True, **kw)

    q, s, m, deq = run(steps=steps)
    p = qz.pack(q, s, m, 4, 32, mins=True, steps=steps)
    assert (p.scales.dtype, p.mins.dtype, p.param_steps.dtype) == (torch.uint8, torch.int8, torch.float16)
    assert int(p.scales.min()) >= 1 and int(p.mins.min()) >= -qz.MIN_CODE_MAX
    assert p.nbytes() == 24 * 96 // 2 + 2 * 24 * 3 + 4 * 24
    assert torch.equal(qz.dequantize(p.codes, p.scales, None, 4, 32, 96, p.mins, p.param_steps), deq)
    codes, mins = qz.unpack(p)
    assert torch.equal(codes, q) and torch.equal(mins, m)
    err = lambda d: float((((d - w) ** 2) * torch.diag(H)).sum())  # noqa: E731
    *_, deq_z = qz.quantize_rtn(w, 4, 32, col_weight=torch.diag(H))
    assert 0 < err(deq) < 0.25 * err(deq_z), (err(deq), err(deq_z))
    with pytest.raises(ValueError, match="param steps are for a layer stored with mins"):
        qz.quantize_rtn(w, 4, 32, steps=steps)
