"""A tiny compressed model (CSKV int4 features + 4-bit MLP weights) run with the kernels swapped in
and with the PyTorch reference, teacher-forced on the same tokens: shared by the CPU check (Triton
interpreter) and the GPU check (tests/gpu)."""
import torch

from shrinkrt.calib import quantize as qz
from shrinkrt.runtime.cskv import CSKVAttention, CSKVConfig
from shrinkrt.runtime.quant_linear import QuantLinear
from tests.conftest import tiny_hf_model
from tests.test_model import ours_from


def compressed_tiny(device, key_mode="pre-rope", bits=4, window=8, rank=12):
    model = ours_from(tiny_hf_model("llama")).to(device)

    def low_rank(w, r):  # (in, out) -> (in, r), (r, out)
        U, S, Vh = torch.linalg.svd(w, full_matrices=False)
        return (U[:, :r] * S[:r]).contiguous(), Vh[:r].contiguous()

    for layer in model.layers:
        a = layer.self_attn
        wk, wv = a.k_proj.weight.T.detach().float(), a.v_proj.weight.T.detach().float()
        if key_mode == "post-rope":  # features of the rotated keys: down = the top right-singular vectors
            _, _, Vh = torch.linalg.svd(wk, full_matrices=False)
            kd, ku = Vh[:rank].T.contiguous(), Vh[:rank].contiguous()
        else:
            kd, ku = low_rank(wk, rank)
        vd, vu = low_rank(wv, rank)
        layer.self_attn = CSKVAttention(a, CSKVConfig(key_mode, window, bits), kd, ku, vd, vu, model.rope_cos,
                                        model.rope_sin)
        for name in ("gate_proj", "up_proj", "down_proj"):
            lin = getattr(layer.mlp, name)
            w = lin.weight.detach().float().cpu()
            q, s, z, _ = qz.quantize_rtn(w, 4, 64)
            p = qz.pack(q, s, z, 4, 64)
            setattr(layer.mlp, name, QuantLinear(w.shape[1], w.shape[0], 4, 64, p.codes.to(device), p.scales.to(device),
                                                 p.zeros.to(device)))
    return model


def forced_logits(model, tokens, prefill: int):
    """Logits at every position: the first `prefill` tokens in one call, then one token per call."""
    model.setup_caches(1, tokens.shape[1])
    with torch.no_grad():
        out = [model(tokens[:, :prefill], 0)]
        out += [model(tokens[:, i:i + 1], i) for i in range(prefill, tokens.shape[1])]
    model.clear_caches()
    return torch.cat(out, dim=1)[0].float().cpu()


def compare(ref, got, margin=0.05):
    """(max |dlogit| relative to the logit scale, positions whose greedy token differs where the
    reference's top-2 margin exceeds `margin`)."""
    top2 = ref.topk(2, dim=-1).values
    clear = (top2[:, 0] - top2[:, 1]) > margin
    flips = ((ref.argmax(-1) != got.argmax(-1)) & clear).nonzero().flatten().tolist()
    return float((ref - got).abs().max() / ref.abs().max()), flips
