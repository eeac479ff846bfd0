"""Benchmark cases for grad_stats, all_finite and clip_grad_norm_ (issue bar: GPT-2 small, fp32)."""
from __future__ import annotations

import torch

import gradguard
from gradguard.bench.shapes import GPT2_SIZES, gpt2_shapes, make_grads, numel
from gradguard.bench.timing import Row, Table, median_ms


def _isfinite_per_tensor(grads):
    # What training loops write by hand: one reduction (and, on a GPU, one sync when read) per tensor.
    return torch.stack([torch.isfinite(g).all() for g in grads]).all()


def _params_with(grads):
    """Parameters (zeros, never read) whose .grad is a copy of each gradient."""
    params = []
    for g in grads:
        p = torch.nn.Parameter(torch.empty_like(g))
        p.grad = g.clone()
        params.append(p)
    return params


def stats_table(grads, label: str, device: str, repeats: int) -> Table:
    nbytes = sum(g.numel() * g.element_size() for g in grads)
    flat = torch.cat([g.reshape(-1) for g in grads])
    t = lambda fn: median_ms(fn, device, repeats)  # noqa: E731
    rows = [
        Row("read floor: torch.sum over one flat buffer, same bytes", t(lambda: flat.sum()), nbytes),
        Row("gradguard.grad_stats (norms, NaN/Inf counts, amax, total)", t(lambda: gradguard.grad_stats(grads)), nbytes),
        Row("gradguard.all_finite", t(lambda: gradguard.all_finite(grads)), nbytes),
        Row("torch._foreach_norm (norms only, no finiteness check)", t(lambda: torch._foreach_norm(grads)), nbytes),
        Row("per-tensor torch.isfinite(t).all(), stacked", t(lambda: _isfinite_per_tensor(grads)), nbytes),
    ]
    del flat
    tab = Table(f"grad_stats, {label}, {device}, {torch.get_num_threads()} threads", rows,
                floor="read floor: torch.sum over one flat buffer, same bytes")
    ours = tab.ms("gradguard.grad_stats (norms, NaN/Inf counts, amax, total)")
    tab.check("grad_stats / read floor", ours / tab.ms(tab.floor), "<=", 1.2)
    tab.check("_foreach_norm / grad_stats (speed-up)",
              tab.ms("torch._foreach_norm (norms only, no finiteness check)") / ours, ">=", 1.3)
    tab.check("per-tensor isfinite / grad_stats (speed-up)",
              tab.ms("per-tensor torch.isfinite(t).all(), stacked") / ours, ">=", 10.0)
    return tab


class ShrinkingMaxNorm:
    """max_norm for repeated clipping of the same grads: each call asks for 0.1% less than the
    last result, so every call really scales every gradient (a fixed max_norm would be met after
    the first call, and gradguard then writes nothing while PyTorch still multiplies by 1)."""

    def __init__(self, norm: float):
        self.value = norm

    def __call__(self) -> float:
        self.value *= 0.999
        return self.value


def clip_table(grads, label: str, device: str, repeats: int) -> Table:
    nbytes = sum(g.numel() * g.element_size() for g in grads)
    ours_g, theirs_g = _params_with(grads), _params_with(grads)
    big = 1e9  # a max_norm no gradient reaches: nothing to scale
    t = lambda fn: median_ms(fn, device, repeats)  # noqa: E731
    norm = float(gradguard.grad_stats(grads).total_norm)
    m_theirs, m_ours = ShrinkingMaxNorm(norm), ShrinkingMaxNorm(norm)
    rows = [
        Row("torch clip_grad_norm_(foreach=True), clipping", t(lambda: torch.nn.utils.clip_grad_norm_(
            theirs_g, m_theirs(), foreach=True)), 3 * nbytes),
        Row("gradguard.clip_grad_norm_, clipping", t(lambda: gradguard.clip_grad_norm_(ours_g, m_ours())), 3 * nbytes),
        Row("torch clip_grad_norm_(foreach=True), norm below max_norm", t(lambda: torch.nn.utils.clip_grad_norm_(
            theirs_g, big, foreach=True)), nbytes),
        Row("gradguard.clip_grad_norm_, norm below max_norm (no write)",
            t(lambda: gradguard.clip_grad_norm_(ours_g, big)), nbytes),
    ]
    tab = Table(f"clip_grad_norm_, {label}, {device}, {torch.get_num_threads()} threads", rows)
    tab.check("ours / torch, clipping", tab.ms("gradguard.clip_grad_norm_, clipping")
              / tab.ms("torch clip_grad_norm_(foreach=True), clipping"), "<=", 1.0)
    tab.check("ours / torch, nothing to clip", tab.ms("gradguard.clip_grad_norm_, norm below max_norm (no write)")
              / tab.ms("torch clip_grad_norm_(foreach=True), norm below max_norm"), "<=", 1.0)
    return tab


def sweep_table(device: str, repeats: int) -> Table:
    rows, pairs = [], []
    for size, cfg in GPT2_SIZES.items():
        grads = make_grads(gpt2_shapes(**cfg), device=device)
        nbytes = sum(g.numel() * g.element_size() for g in grads)
        flat = torch.cat([g.reshape(-1) for g in grads])
        floor = f"{size} ({len(grads)} tensors): read floor, torch.sum over flat"
        ours = f"{size}: gradguard.grad_stats"
        rows.append(Row(floor, median_ms(lambda: flat.sum(), device, repeats), nbytes))
        rows.append(Row(ours, median_ms(lambda: gradguard.grad_stats(grads), device, repeats), nbytes))
        rows.append(Row(f"{size}: torch._foreach_norm", median_ms(lambda: torch._foreach_norm(grads), device, repeats),
                        nbytes))
        pairs.append((size, ours, floor))
        del flat, grads
    tab = Table(f"grad_stats across GPT-2 sizes (fp32), {device}, {torch.get_num_threads()} threads", rows)
    for size, ours, floor in pairs:  # how the cost grows; the bar is the 124M table above
        tab.checks.append(f"{size}: grad_stats / read floor = {tab.ms(ours) / tab.ms(floor):.2f}x, "
                          f"_foreach_norm / grad_stats = {tab.ms(f'{size}: torch._foreach_norm') / tab.ms(ours):.2f}x")
    return tab


def tables(device: str = "cpu", quick: bool = False) -> list[Table]:
    if quick:  # a smoke run: small model, few repeats (CI, tests)
        grads = make_grads(gpt2_shapes(**GPT2_SIZES["10M"]), device=device)
        label = f"GPT-2 10M-shaped ({len(grads)} tensors, {numel(grads) / 1e6:.1f}M fp32)"
        return [stats_table(grads, label, device, 3), clip_table(grads, label, device, 3)]
    grads = make_grads(gpt2_shapes(), device=device)
    label = f"GPT-2 small-shaped ({len(grads)} tensors, {numel(grads) / 1e6:.1f}M fp32, " \
            f"{numel(grads) * 4 / 1e6:.0f} MB)"
    out = [stats_table(grads, label, device, 21), clip_table(grads, label, device, 11)]
    del grads
    out.append(sweep_table(device, 11))
    return out
