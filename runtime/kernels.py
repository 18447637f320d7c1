"""The GPU fast path of the reference runtime: the Triton kernels of plugins/kernels (JIT) stand in
for the PyTorch reference when the tensors are on a CUDA device. One explicit switch,
`set_kernels(False)` (the CLI's `--no-kernels`, recorded in eval and profile results), runs the
reference on the GPU too, for comparisons; on the CPU the reference always runs.
"""
from __future__ import annotations

import torch

_SETTINGS = {"kernels": True}
_TRITON: list[bool] = []  # resolved once: triton importable and not the CPU interpreter


def set_kernels(on: bool) -> None:
    _SETTINGS["kernels"] = bool(on)


def kernels_on() -> bool:
    return _SETTINGS["kernels"]


def _triton_compiles() -> bool:
    if not _TRITON:
        import os

        try:
            import triton  # noqa: F401
            _TRITON.append(os.environ.get("TRITON_INTERPRET") != "1")  # interpreted kernels are not a fast path
        except ImportError:
            _TRITON.append(False)
    return _TRITON[0]


def enabled(t: torch.Tensor) -> bool:
    return t.is_cuda and _SETTINGS["kernels"] and _triton_compiles()


def quant_linear(m, x: torch.Tensor) -> torch.Tensor:
    """y = x @ W^T (+ bias) for a QuantLinear: the fused GEMV for up to 8 rows, else the weight
    dequantized once by the kernel and a tensor-core matmul."""
    from shrinkrt.plugins.kernels.dequant import dequant
    from shrinkrt.plugins.kernels.qgemv import qgemv

    shape = x.shape
    x2 = x.reshape(-1, shape[-1]).half()
    y = qgemv(x2, m) if x2.shape[0] <= 8 else x2 @ dequant(m).T
    if m.bias is not None:
        y = y + m.bias.half()
    return y.view(*shape[:-1], m.out_features).to(x.dtype)


def cskv_decode(layer, q: torch.Tensor, start: int) -> torch.Tensor:
    """One decode token's attention over the layer's bi-branch cache (already holding position
    `start`): q (B, H, 1, hd) rotated -> (B, H, 1, hd) float32."""
    from shrinkrt.plugins.kernels.bibranch_attn import bibranch_decode

    c = layer.cache
    fk, fv = c.feat_k, c.feat_v
    codes = (lambda f: f.codes.view(torch.int8) if f.bits == 4 else f.codes)  # noqa: E731
    zeros = torch.zeros(layer.n_kv_heads * layer.head_dim, device=q.device)
    kb = layer.k_proj.bias.detach().float() if layer.k_proj.bias is not None else zeros
    vb = layer.v_proj.bias.detach().float() if layer.v_proj.bias is not None else zeros
    bits = layer.cfg.bits
    y = bibranch_decode(q[:, :, 0].half(), c.win_k, c.win_v, codes(fk), fk.scales if bits < 16 else None, codes(fv),
                        fv.scales if bits < 16 else None, layer.k_up, layer.v_up, kb, vb, layer.rope_cos,
                        layer.rope_sin, start, bits, layer.cfg.key_mode == "post-rope")
    return y.float().unsqueeze(2)
