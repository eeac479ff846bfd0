"""Parameter shapes of real models, for benchmarks and demos (no weights, just shapes)."""
from __future__ import annotations

import torch


def gpt2_shapes(n_layer: int = 12, d_model: int = 768, vocab: int = 50257, n_ctx: int = 1024):
    """GPT-2's parameter shapes in HF order: 148 tensors, 124.4M elements for GPT-2 small;
    (24, 1024) gives GPT-2 medium (355M), (48, 1600) GPT-2 XL (1.56B)."""
    d = d_model
    shapes = [(vocab, d), (n_ctx, d)]
    for _ in range(n_layer):
        shapes += [(d,), (d,), (d, 3 * d), (3 * d,), (d, d), (d,),
                   (d,), (d,), (d, 4 * d), (4 * d,), (4 * d, d), (d,)]
    shapes += [(d,), (d,)]
    return shapes


GPT2_SIZES = {
    "10M": dict(n_layer=4, d_model=256, vocab=16384),
    "124M": dict(),
    "350M": dict(n_layer=24, d_model=1024),
}


def make_grads(shapes, dtype=torch.float32, device="cpu", seed: int = 0):
    """Random normal tensors of the given shapes, scaled like gradients (std 1e-3)."""
    g = torch.Generator(device="cpu").manual_seed(seed)
    out = []
    for s in shapes:
        t = torch.randn(s, generator=g, dtype=torch.float32).mul_(1e-3)
        out.append(t.to(device=device, dtype=dtype))
    return out


def numel(tensors) -> int:
    return sum(t.numel() for t in tensors)
