"""LLM-MQ: knapsack optimality, budgets, outlier CSR, calibrate/apply on a tiny model, the CLI
round trip, every bad-input error, and one fast check on the embedded model."""
import copy
import itertools
import json

import pytest
import torch

from shrinkrt.calib import mq
from shrinkrt.calib import quantize as qz
from shrinkrt.errors import ShrinkError
from shrinkrt.runtime.quant_linear import QuantLinear


@pytest.fixture(autouse=True)
def one_thread():
    """These tests run many small ops: on the shared 2-core machine a second torch thread only spins."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


# ---------------------------------------------------------------- knapsack
def brute_force(weights, costs, cap):
    best, pick = None, None
    for choice in itertools.product(*[range(len(w)) for w in weights]):
        w = sum(weights[i][j] for i, j in enumerate(choice))
        c = sum(costs[i][j] for i, j in enumerate(choice))
        if w <= cap and (best is None or c < best - 1e-12):
            best, pick = c, choice
    return best, pick


@pytest.mark.parametrize("seed", range(12))
def test_knapsack_is_optimal(seed):
    g = torch.Generator().manual_seed(seed)
    items = 2 + seed % 4
    weights = [torch.randint(1, 9, (int(torch.randint(1, 4, (1,), generator=g)),), generator=g).tolist()
               for _ in range(items)]
    costs = [torch.rand(len(w), generator=g).tolist() for w in weights]
    cap = sum(min(w) for w in weights) + int(torch.randint(0, 10, (1,), generator=g))
    best, _ = brute_force(weights, costs, cap)
    choice = mq.knapsack(weights, costs, cap)
    assert sum(weights[i][j] for i, j in enumerate(choice)) <= cap
    assert sum(costs[i][j] for i, j in enumerate(choice)) == pytest.approx(best, abs=1e-12)


def test_knapsack_infeasible_and_exact_fit():
    assert mq.knapsack([[3, 5], [4]], [[1.0, 0.0], [0.0]], 6) is None
    assert mq.knapsack([[3, 5], [4]], [[1.0, 0.0], [0.0]], 9) == [1, 0]
    assert mq.knapsack([[3, 5], [4]], [[1.0, 0.0], [0.0]], 8) == [0, 0]


# ---------------------------------------------------------------- options and budgets
def test_parse_budget():
    assert mq.parse_budget("3.0bpw", 8000) == 3000
    assert mq.parse_budget(" 4bpw ", 8000) == 4000
    assert mq.parse_budget("40MiB", 1) == 40 * 2**20
    assert mq.parse_budget("512KiB", 1) == 512 * 1024


@pytest.mark.parametrize("budget", ["3", "three bpw", "3.0 bits", "-1bpw", "0bpw", "1e3MiB"])
def test_bad_budget_is_a_clear_error(budget):
    with pytest.raises(ShrinkError, match="weight budget"):
        mq.parse_budget(budget, 1000)


@pytest.mark.parametrize("kw,msg", [
    ({"bits": (3, 5)}, "unknown bit width 5"),
    ({"bits": (1, 9)}, "unknown bit widths 1, 9"),
    ({"group_sizes": 48}, "group size 48"),
    ({"group_sizes": (32, 256)}, "group size 256"),
    ({"quantizer": "awq"}, "unknown quantizer 'awq'"),
    ({"outlier_fraction": 0.5}, "outlier fraction"),
])
def test_bad_options_are_clear_errors(kw, msg):
    args = {"bits": (2, 3, 4, 8), "group_sizes": 128, "quantizer": "gptq", "outlier_fraction": 0.005, **kw}
    with pytest.raises(ShrinkError, match=msg):
        mq.check_options(**args)


def test_layer_bytes_count_every_tensor():
    # 576x576 at 3 bits, group 128: codes 576 rows x 54 words, 5 fp16 scales and 1 zero word per row.
    b = mq.layer_bytes(576, 576, 3, 128, 0)
    assert b == mq.alloc(576 * 54 * 4) + mq.alloc(576 * 5 * 2) + mq.alloc(576 * 4)
    assert mq.layer_bytes(576, 576, 3, 128, 100) == b + mq.alloc(577 * 4) + mq.alloc(200) + mq.alloc(200)
    assert all(x % mq.ALIGN == 0 for x in (b, mq.layer_bytes(7, 33, 2, 64, 3)))


def test_outliers_csr_round_trip():
    torch.manual_seed(0)
    w = torch.randn(5, 70)
    keep = mq.select_outliers(w, torch.ones(70), 9)
    assert int(keep.sum()) == 9
    assert float(w.abs()[keep].min()) >= float(w.abs()[~keep].max())  # the largest |W| (equal rms)
    rowptr, cols, vals = mq.to_csr(keep, w)
    assert rowptr.dtype == torch.int32 and cols.dtype == torch.int16 and vals.dtype == torch.float16
    dense = torch.zeros_like(w)
    for r in range(5):
        for i in range(int(rowptr[r]), int(rowptr[r + 1])):
            dense[r, int(cols[i])] = float(vals[i])
    assert torch.equal(dense, torch.where(keep, w.half().float(), 0.0))


def test_activation_scale_steers_outlier_choice():
    w = torch.ones(2, 4)
    keep = mq.select_outliers(w, torch.tensor([1.0, 1.0, 9.0, 1.0]), 2)
    assert keep[:, 2].all() and int(keep.sum()) == 2


def test_quant_linear_adds_outliers():
    torch.manual_seed(1)
    w = torch.randn(6, 100)
    keep = mq.select_outliers(w, torch.ones(100), 5)
    q, s, z, deq = qz.quantize_rtn(w, 2, 64, keep)
    p = qz.pack(q, s, z, 2, 64)
    lin = QuantLinear(100, 6, 2, 64, p.codes, p.scales, p.zeros, mq.to_csr(keep, deq), torch.zeros(6))
    assert torch.equal(lin.weight(), torch.where(keep, deq.half().float(), deq))
    x = torch.randn(3, 100)
    assert torch.allclose(lin(x), x @ lin.weight().T, atol=1e-5)
    assert dict(lin.named_parameters()) == {}  # buffer-only


# ---------------------------------------------------------------- calibrate / apply on a tiny model
@pytest.fixture
def tiny(tiny_dir):
    from shrinkrt.runtime.loader import load

    return load(str(tiny_dir), progress=False)


def calib_tokens(n=384, seed=0):
    return torch.randint(3, 97, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


def test_calibrate_respects_budget_and_names(tiny):
    n_weights = sum(m.weight.numel() for _, m in mq.target_linears(tiny.model))
    for budget in ("4.5bpw", "6bpw"):
        section, tensors = mq.calibrate_weights(tiny, calib_tokens(), budget, progress=False)
        json.dumps(section)
        assert section["bytes"] <= mq.parse_budget(budget, n_weights)
        assert section["bits_per_weight"] <= float(budget[:-3])
        assert section["bytes"] == sum(L["bytes"] for L in section["layers"])
        raw = sum(t.numel() * t.element_size() for t in tensors.values())
        assert raw == section["bytes_unaligned"] <= section["bytes"]
        assert all(k.startswith("weights.layers.") for k in tensors)
        assert {L["name"] for L in section["layers"]} == {n for n, _ in mq.target_linears(tiny.model)}
    assert "lm_head" not in json.dumps(section["layers"]) and "embed" not in json.dumps(section["layers"])


def test_more_budget_buys_more_bits(tiny):
    toks = calib_tokens()
    low, _ = mq.calibrate_weights(tiny, toks, "4bpw", bits=(2, 4), outlier_fraction=0.0, progress=False)
    high, _ = mq.calibrate_weights(tiny, toks, "100bpw", bits=(2, 4), outlier_fraction=0.0, progress=False)
    assert all(L["bits"] == 4 for L in high["layers"])
    assert sum(L["sensitivity"] for L in low["layers"]) > sum(L["sensitivity"] for L in high["layers"])


def test_group_size_is_chosen_per_layer(tiny):
    """Offering groups of 32, 64 and 128 is a superset of the options of 128 alone, so the exact
    allocation can only lower the summed sensitivity at the same budget; the plan records each layer's
    own size, and the mixed plan applies and runs."""
    toks = calib_tokens()
    one, _ = mq.calibrate_weights(tiny, toks, "4.5bpw", bits=(2, 3, 4), group_sizes=(128,), outlier_fraction=0.0,
                                  progress=False)
    mixed, tensors = mq.calibrate_weights(tiny, toks, "4.5bpw", bits=(2, 3, 4), group_sizes=(32, 64, 128),
                                          outlier_fraction=0.0, progress=False)
    assert {L["group_size"] for L in one["layers"]} == {128} and one["group_sizes"] == [128]
    assert mixed["group_sizes"] == [32, 64, 128] and len({L["group_size"] for L in mixed["layers"]}) > 1
    assert sum(L["sensitivity"] for L in mixed["layers"]) < sum(L["sensitivity"] for L in one["layers"])
    n_weights = sum(m.weight.numel() for _, m in mq.target_linears(tiny.model))
    assert mixed["bytes"] <= mq.parse_budget("4.5bpw", n_weights)
    for L in mixed["layers"]:  # bytes follow each layer's own group size
        assert L["bytes"] == mq.layer_bytes(L["out_features"], L["in_features"], L["bits"], L["group_size"], 0)
        assert tensors[f"weights.{L['name']}.scales"].shape[1] == -(-L["in_features"] // L["group_size"])
    x = torch.tensor([toks[:32]])
    ref = tiny.model(x)
    mq.apply_weights(tiny.model, mixed, tensors)
    assert {m.group_size for m in tiny.model.modules() if isinstance(m, QuantLinear)} == \
        {L["group_size"] for L in mixed["layers"]}
    assert torch.isfinite(tiny.model(x)).all() and (tiny.model(x) - ref).abs().max() < 0.5 * ref.abs().max()


def test_calibrate_is_deterministic(tiny):
    a = mq.calibrate_weights(tiny, calib_tokens(), "5bpw", seed=3, progress=False)
    b = mq.calibrate_weights(tiny, calib_tokens(), "5bpw", seed=3, progress=False)
    assert a[0] == b[0] and a[1].keys() == b[1].keys() and all(torch.equal(a[1][k], b[1][k]) for k in a[1])


def test_unreachable_budget_is_refused_before_work(tiny, monkeypatch):
    monkeypatch.setattr(mq, "collect_stats", lambda *a, **k: pytest.fail("calibrated anyway"))
    with pytest.raises(ShrinkError, match="below the floor .* every linear at 2 bits"):
        mq.calibrate_weights(tiny, calib_tokens(), "1.5bpw", progress=False)
    with pytest.raises(ShrinkError, match="unknown bit width 6"):
        mq.calibrate_weights(tiny, calib_tokens(), "3bpw", bits=(2, 6), progress=False)


def test_apply_tracks_fp_at_8_bits(tiny):
    toks = calib_tokens()
    x = torch.tensor([toks[:64]])
    ref = tiny.model(x)
    section, tensors = mq.calibrate_weights(tiny, toks, "100bpw", bits=(8,), outlier_fraction=0.0, progress=False)
    mq.apply_weights(tiny.model, section, tensors)
    assert isinstance(tiny.model.layers[1].mlp.down_proj, QuantLinear)
    assert not any("proj" in n for n, _ in tiny.model.named_parameters())
    out = tiny.model(x)
    assert (out - ref).abs().max() < 0.02 * ref.abs().max()


def snap_to_q4_1(model):
    """Put every target linear on Q4_1 grids (groups of 32, fp16 step and min), as the embedded GGUF's are."""
    with torch.no_grad():
        for _, m in mq.target_linears(model):
            m.weight.copy_(qz.quantize_rtn(m.weight.float(), 4, 32, mins=True)[3])


def test_mins_keep_q4_1_sourced_weights_exactly(tiny):
    """On weights that are Q4_1 already, offering 4-bit group-32 with fp16 mins lets the allocation keep
    every linear exactly (sensitivity 0, outputs equal to FP's) at 5.0 bits per weight plus alignment,
    where zero points cost accuracy at the same bits; the plan records the format and applies."""
    snap_to_q4_1(tiny.model)
    toks = calib_tokens()
    x = torch.tensor([toks[:48]])
    ref = tiny.model(x)
    kw = dict(bits=(2, 4), group_sizes=(32, 128), outlier_fraction=0.01, progress=False)
    section, tensors = mq.calibrate_weights(tiny, toks, "100bpw", **kw)
    assert section["min_formats"] == [[4, 32]]
    assert all(L.get("mins") and L["bits"] == 4 and L["group_size"] == 32 and L["sensitivity"] == 0.0
               and L["outliers"] == 0 for L in section["layers"])
    for L in section["layers"]:
        assert L["bytes"] == mq.layer_bytes(L["out_features"], L["in_features"], 4, 32, 0, mins=True)
        assert tensors[f"weights.{L['name']}.mins"].dtype == torch.float16
        assert f"weights.{L['name']}.zeros" not in tensors
    n_weights = sum(m.weight.numel() for _, m in mq.target_linears(tiny.model))
    unaligned = sum(r * c * 4 // 8 + r * (c // 32) * 4 for r, c in (m.weight.shape for _, m in mq.target_linears(tiny.model)))
    assert section["bytes_unaligned"] == unaligned and 8 * unaligned / n_weights == 5.0
    without, _ = mq.calibrate_weights(tiny, toks, "100bpw", mins=False, **kw)
    assert without["min_formats"] == [] and not any(L.get("mins") for L in without["layers"])
    assert sum(L["sensitivity"] for L in without["layers"]) > 0
    mq.apply_weights(tiny.model, section, tensors)
    assert all(m.has_mins for m in tiny.model.modules() if isinstance(m, QuantLinear))
    assert torch.equal(tiny.model(x), ref)


def test_choose_plan_judges_the_variants_by_calibration_nll(tiny):
    """The knapsack trusts the proxy; choose_plan checks each variant's plan on the calibration tokens.
    Mins candidates made to lie (sensitivity 0, their stored mins wrecked) win the knapsack over all
    options, so the NLL check must reject that plan for a variant without them; the model comes back
    unchanged, and calibrate_weights records the choice in the manifest."""
    snap_to_q4_1(tiny.model)
    toks = calib_tokens()
    x = torch.tensor([toks[:48]])
    ref = tiny.model(x)
    stats = mq.collect_stats(tiny.model, toks, progress=False)
    cands = mq.build_candidates(tiny.model, stats, (2, 4), (32, 128), "gptq", 0.0, False)
    budget = mq.parse_budget("4.6bpw", sum(m.weight.numel() for _, m in mq.target_linears(tiny.model)))
    honest, choice = mq.choose_plan(tiny.model, toks, cands, budget)
    nll = choice["calib_nll"]
    # the untrained model's plans differ by noise (< PLAN_MARGIN): the first variant's plan stays
    assert choice["chosen"] == "all options" and max(nll.values()) - min(nll.values()) < mq.PLAN_MARGIN, nll
    for cs in cands.values():
        for c in cs:
            if c.mins:
                c.sensitivity, c.nbytes = 0.0, min(o.nbytes for o in cs)  # free and lossless, says the proxy
                if c.param_bits == 8:  # steps 50x: every scale and min of the row wrecked
                    c.tensors["param_steps"] = c.tensors["param_steps"] * 50
                else:
                    c.tensors["mins"] = c.tensors["mins"] + 30.0
    plan, choice = mq.choose_plan(tiny.model, toks, cands, budget)
    assert all(c.mins for c in mq.allocate(cands, budget).values())  # what the knapsack alone would ship
    assert choice["chosen"] != "all options" and not any(c.mins for c in plan.values())
    nll = choice["calib_nll"]
    assert nll["all options"] > nll[choice["chosen"]] + 10 * mq.PLAN_MARGIN, nll
    assert torch.equal(tiny.model(x), ref)  # every variant's linears were put back
    kw = dict(bits=(2, 4), group_sizes=(32, 128), progress=False)
    section, _ = mq.calibrate_weights(tiny, toks, "4.6bpw", **kw)
    assert section["plan_choice"]["chosen"] in mq.PLAN_VARIANTS and len(section["plan_choice"]["calib_nll"]) >= 2
    assert section["plan_choice"]["on"].startswith("the calibration tokens") and section["plan_choice"]["tokens"] == 384
    held = calib_tokens(256, seed=9)  # scored on text the fit never saw: other NLLs, same candidates
    section2, _ = mq.calibrate_weights(tiny, toks, "4.6bpw", select_tokens=held, **kw)
    c2 = section2["plan_choice"]
    assert c2["on"] == "held-out calibration text" and c2["tokens"] == 256
    assert c2["calib_nll"] != section["plan_choice"]["calib_nll"] and c2["calib_nll"].keys() == section["plan_choice"]["calib_nll"].keys()


def test_8bit_param_mins_are_offered_counted_and_applied(tiny):
    """Every 4-bit group-32 linear is also offered with 8-bit param codes: its bytes are the codes plus 1 +
    1 bytes per group plus 4 per row (each tensor ALIGN-rounded); a plan of them records param_bits 8,
    applies (QuantLinear reading the codes) and computes close to the fp16-param plan on Q4_1 weights;
    sequential GPTQ keeps the format; a checkpoint claiming it on a zero-point layer, or missing the
    steps, is refused."""
    snap_to_q4_1(tiny.model)
    toks = calib_tokens()
    x = torch.tensor([toks[:48]])
    ref = tiny.model(x)
    stats = mq.collect_stats(tiny.model, toks, progress=False)
    cands = mq.build_candidates(tiny.model, stats, (2, 4), (32,), "gptq-act-order", 0.0, False)
    pick = {}
    for n, cs in cands.items():
        kinds = [(c.mins, c.param_bits) for c in cs if c.mins]
        assert kinds == [(True, 16), (True, 8)], kinds
        pick[n] = next(c for c in cs if c.mins and c.param_bits == 8)
        rows, cols = pick[n].tensors["codes"].shape[0], stats[n].H.shape[0]
        G = cols // 32
        assert pick[n].nbytes == mq.alloc(rows * cols // 2) + 2 * mq.alloc(rows * G) + mq.alloc(rows * 4)
        assert pick[n].nbytes == mq.layer_bytes(rows, cols, 4, 32, 0, mins=True, param_bits=8)
        assert 0 < pick[n].sensitivity
    section, tensors = mq.assemble(tiny.model, pick, group_sizes=(32,), quantizer="gptq-act-order",
                                   outlier_fraction=0.0, budget=None, budget_bytes=None, seed=0)
    assert all(L["mins"] and L["param_bits"] == 8 for L in section["layers"])
    model = copy.deepcopy(tiny.model)
    mq.apply_weights(model, section, tensors)
    qls = [m for m in model.modules() if isinstance(m, QuantLinear)]
    assert qls and all(m.param_bits == 8 and m.scales.dtype == torch.uint8 for m in qls)
    out = model(x)
    assert 0 < float((out - ref).detach().abs().max()) < 0.05 * float(ref.detach().abs().max())
    seq = mq.requantize_sequential(tiny.model, toks, pick, stats, "gptq-act-order", 0.0, False)
    assert all(c.param_bits == 8 and c.mins and c.nbytes == pick[n].nbytes for n, c in seq.items())
    name = section["layers"][0]["name"]
    bad = copy.deepcopy(section)
    bad["layers"][0].update(mins=False)
    with pytest.raises(ShrinkError, match="has param_bits 8 \\(16, or 8 in a layer with mins\\)"):
        mq.apply_weights(copy.deepcopy(tiny.model), bad, tensors)
    t2 = dict(tensors)
    t2.pop(f"weights.{name}.param_steps")
    with pytest.raises(ShrinkError, match="param_steps' is missing"):
        mq.apply_weights(copy.deepcopy(tiny.model), section, t2)


@pytest.mark.parametrize("breakage,msg", [
    (lambda s, t: t.pop("weights.layers.0.mlp.up_proj.codes"), "'weights.layers.0.mlp.up_proj.codes' is missing"),
    (lambda s, t: t.__setitem__("weights.layers.0.mlp.up_proj.scales", torch.zeros(3, dtype=torch.float16)),
     "up_proj.scales' is float16\\[3\\]"),
    (lambda s, t: t.__setitem__("weights.layers.9.x", torch.zeros(1)), "'weights.layers.9.x' is not in the plan"),
    (lambda s, t: s["layers"][0].__setitem__("bits", 4), "disagree"),
    (lambda s, t: s["layers"][0].__setitem__("name", "layers.0.input_layernorm"), "not a linear layer"),
    (lambda s, t: s["layers"][0].__setitem__("in_features", 7), "the model's is"),
    (lambda s, t: s.__setitem__("format_version", 99), "version"),
    (lambda s, t: s["layers"][0].__setitem__("mins", True), "mins are for 4-bit group-32 layers without outliers"),
    (lambda s, t: s["layers"][0].__setitem__("mins", "yes"), "has mins 'yes'"),
])
def test_disagreeing_checkpoint_modifies_nothing(tiny, breakage, msg):
    section, tensors = mq.calibrate_weights(tiny, calib_tokens(), "4bpw", bits=(2, 3), outlier_fraction=0.0,
                                            progress=False)
    breakage(section, tensors)
    before = {k: v.clone() for k, v in tiny.model.state_dict().items()}
    with pytest.raises(ShrinkError, match=msg):
        mq.apply_weights(tiny.model, section, tensors)
    after = tiny.model.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)


def test_cli_calibrate_eval_generate(tiny_dir, tmp_path, capsys):
    from shrinkrt.cli import main

    ck = tmp_path / "ck"
    assert main(["calibrate", "--model", str(tiny_dir), "--weight-budget", "4bpw", "--calib-tokens", "256",
                 "--out", str(ck), "--quiet"]) == 0
    manifest = json.loads((ck / "manifest.json").read_text())
    assert manifest["weights"]["method"] == "llm-mq" and manifest["weights"]["bits_per_weight"] <= 4.0
    drawn = manifest["calibration"]  # both domains by default, 1024-token pieces: the first 256 are licenses
    assert [d["name"] for d in drawn["domains"]] == ["licenses", "code"] and drawn["tokens"] == 256
    assert [d["tokens"] for d in drawn["domains"]] == [256, 0] and drawn["segment"] == 1024
    assert main(["generate", "w1 w2", "--raw", "--model", str(tiny_dir), "--checkpoint", str(ck),
                 "--max-new-tokens", "3"]) == 0
    capsys.readouterr()
    bad = tmp_path / "bad"
    assert main(["calibrate", "--model", str(tiny_dir), "--weight-budget", "1bpw", "--out", str(bad), "--quiet"]) == 2
    assert "below the floor" in capsys.readouterr().err and not bad.exists()
    assert main(["calibrate", "--model", str(tiny_dir), "--weight-budget", "4bpw", "--group-size", "32,96",
                 "--out", str(bad), "--quiet"]) == 2
    assert "group size 96 is not supported (supported: 32, 64, 128)" in capsys.readouterr().err and not bad.exists()
    assert main(["calibrate", "--model", str(tiny_dir), "--weight-budget", "4bpw", "--group-size", "big",
                 "--out", str(bad), "--quiet"]) == 2
    assert "--group-size must be 'auto' or comma-separated integers (got 'big')" in capsys.readouterr().err
    assert main(["calibrate", "--model", str(tiny_dir), "--weight-budget", "4bpw", "--calib-text", "code,news",
                 "--out", str(bad), "--quiet"]) == 2
    assert "--calib-text must list domains among licenses, code (got 'code,news')" in capsys.readouterr().err
    auto = tmp_path / "auto"
    assert main(["calibrate", "--model", str(tiny_dir), "--weight-budget", "4bpw", "--group-size", "auto",
                 "--calib-tokens", "256", "--calib-text", "code", "--out", str(auto), "--quiet"]) == 0
    manifest = json.loads((auto / "manifest.json").read_text())
    assert manifest["weights"]["group_sizes"] == [32, 64, 128]
    assert [(d["name"], d["tokens"]) for d in manifest["calibration"]["domains"]] == [("code", 256)]


# ---------------------------------------------------------------- the embedded model
@pytest.mark.model
def test_gptq_on_real_activations(embedded):
    """Layer 3's MLP of SmolLM2 with its real inputs: GPTQ at 3 bits beats RTN in output error, and
    4-bit GPTQ stays within a few percent of the layer's output energy."""
    model = embedded.model
    seen = {}
    hook = model.layers[3].mlp.down_proj.register_forward_pre_hook(lambda m, a: seen.setdefault("x", a[0][0]))
    from shrinkrt.evaluate import corpus

    ids = embedded.tokenizer.encode(corpus.calib_text(), add_special_tokens=False)[:128]
    with torch.inference_mode():
        model(torch.tensor([ids]))
    hook.remove()
    X, w = seen["x"].float(), model.layers[3].mlp.down_proj.weight.detach().float()
    H = X.T @ X / X.shape[0]
    energy = float((w @ X.T).pow(2).mean())
    err = lambda deq: float(((deq - w) @ X.T).pow(2).mean()) / energy  # noqa: E731
    assert err(qz.quantize_gptq(w, H, 3, 128)[3]) < err(qz.quantize_rtn(w, 3, 128, col_weight=torch.diag(H))[3])
    assert err(qz.quantize_gptq(w, H, 4, 128)[3]) < 0.05


def test_sequential_requantizes_on_the_quantized_inputs(tiny):
    """Sequential GPTQ keeps every layer's option (bits, group, outliers, bytes); layer 0's q/k/v see
    the same (embedding) input as before, so they come out the same, while later layers change; the
    model's own weights are restored; the quantized model's logits on the calibration tokens move
    less from the FP model's."""
    toks = calib_tokens()
    opts = dict(bits=(2, 3), outlier_fraction=0.005, progress=False, quantizer="gptq-act-order")
    before = {k: v.clone() for k, v in tiny.model.state_dict().items()}
    base, base_t = mq.calibrate_weights(tiny, toks, "3.6bpw", **opts)
    seq, seq_t = mq.calibrate_weights(tiny, toks, "3.6bpw", sequential=True, **opts)
    assert seq["sequential"] is True and base["sequential"] is False
    strip = lambda s: [(L["name"], L["bits"], L["group_size"], L["outliers"], L["bytes"]) for L in s["layers"]]  # noqa: E731
    assert strip(seq) == strip(base) and seq["bytes"] == base["bytes"]
    assert all(torch.equal(before[k], v) for k, v in tiny.model.state_dict().items())
    first = "weights.layers.0.self_attn.q_proj.codes"
    assert torch.equal(seq_t[first], base_t[first])
    later = [k for k in seq_t if k.endswith(".codes") and not k.startswith("weights.layers.0.")]
    assert any(not torch.equal(seq_t[k], base_t[k]) for k in later)
    x = torch.tensor([toks[:128], toks[128:256]])
    ref = tiny.model(x)
    errs = []
    for section, tensors in ((base, base_t), (seq, seq_t)):
        model = copy.deepcopy(tiny.model)
        mq.apply_weights(model, section, tensors)
        errs.append(float((model(x) - ref).pow(2).mean()))
    assert errs[1] < errs[0]
