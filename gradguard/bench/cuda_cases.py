"""GPU benchmark cases of issue 4: gradguard's CUDA statistics kernel against the read bandwidth
measured in the same run and against PyTorch's best two-call equivalent.

Run with ``python -m gradguard.bench --only cuda [--quick] [--json FILE]``; every figure
names the card it was measured on. Baselines are PyTorch's own ops, nothing re-implemented here.
"""
from __future__ import annotations

import time

import torch

import gradguard
from gradguard.bench.shapes import gpt2_shapes
from gradguard.bench.timing import Row, Table, median_ms


def _device_grads(shapes, dtype, device, seed=0):
    """Gradient-like tensors made on the device (making 1.5B values on the host takes minutes)."""
    g = torch.Generator(device=device).manual_seed(seed)
    return [torch.randn(s, generator=g, device=device, dtype=dtype).mul_(1e-3) for s in shapes]


def _small_shapes(n=2000, seed=0):
    """n tensors of 4K to 256K elements, log-uniform (about 120M elements for n = 2000): the
    many-small-tensor regime of adapters, norms and biases, large enough to time bandwidth."""
    g = torch.Generator().manual_seed(seed)
    exps = torch.empty(n).uniform_(12.0, 18.0, generator=g)
    return [(int(2.0 ** e),) for e in exps.tolist()]


def _graph_ms(fn, device, repeats):
    """Median time of fn() replayed from a CUDA graph: the device time without Python and
    dispatcher overhead (the kernels are the same)."""
    s = torch.cuda.Stream(device)
    s.wait_stream(torch.cuda.current_stream(device))
    with torch.cuda.stream(s):
        fn()
    torch.cuda.current_stream(device).wait_stream(s)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    ms = median_ms(graph.replay, device, repeats=repeats)
    del graph
    return ms


def stats_table(name, grads, device, repeats):
    nbytes = sum(t.numel() * t.element_size() for t in grads)
    numel = sum(t.numel() for t in grads)
    flat = torch.empty(numel, dtype=grads[0].dtype, device=device).normal_()
    rows = []
    floor = "read floor: torch.sum over one flat buffer of the same bytes"
    rows.append(Row(floor, median_ms(lambda: torch.sum(flat), device, repeats), nbytes))
    del flat
    rows.append(Row("(copy bandwidth: Tensor.copy_ of 256 MB, counts read+write)",
                    _copy_ms(device, repeats), 2 * 256 * 2**20))

    op = torch.ops.gradguard.multi_tensor_stats
    rows.append(Row("gradguard multi_tensor_stats (the kernel, one call)",
                    median_ms(lambda: op(grads, 2.0), device, repeats), nbytes))
    rows.append(Row("  same, replayed from a CUDA graph (no host overhead)",
                    _graph_ms(lambda: op(grads, 2.0), device, repeats), nbytes))
    rows.append(Row("gradguard.grad_stats (kernel + norms/total/found_inf)",
                    median_ms(lambda: gradguard.grad_stats(grads), device, repeats), nbytes))

    found_inf = torch.zeros((), device=device)
    inv_scale = torch.ones((), device=device)

    def torch_pair():
        torch._foreach_norm(grads, 2.0)
        torch._amp_foreach_non_finite_check_and_unscale_(grads, found_inf, inv_scale)

    baseline = "_foreach_norm + _amp_foreach_non_finite_check_and_unscale_"  # torch ops
    rows.append(Row(baseline, median_ms(torch_pair, device, repeats), nbytes))
    rows.append(Row("torch._foreach_norm alone (no finiteness check)",
                    median_ms(lambda: torch._foreach_norm(grads, 2.0), device, repeats), nbytes))

    table = Table(f"grad_stats, {name}: {len(grads)} tensors, {numel / 1e9:.3f}B elements, "
                  f"{nbytes / 1e9:.2f} GB", rows, floor=floor)
    kernel_ms = table.ms("gradguard multi_tensor_stats (the kernel, one call)")
    table.check("kernel bandwidth / read floor bandwidth", table.ms(floor) / kernel_ms, ">=", 0.85)
    # The same ratio without host overhead: with thousands of small tensors the Python and
    # dispatcher time per call can exceed the device time, and this separates the two.
    table.check("  (graph replay) bandwidth / read floor bandwidth",
                table.ms(floor) / table.ms("  same, replayed from a CUDA graph (no host overhead)"), ">=", 0.85)
    table.check("torch two-call time / kernel time", table.ms(baseline) / kernel_ms, ">=", 1.5)
    return table


def _fwd_bwd_of(xr, grad):
    """fwd_bwd(f): a callable running f(xr).backward(grad), xr's gradient cleared first."""
    def fwd_bwd(f):
        def run():
            xr.grad = None
            f(xr).backward(grad)
        return run
    return fwd_bwd


def safe_math_table(device, repeats, n):
    """safe_log/safe_exp on CUDA: forward against bare torch.log/torch.exp, forward+backward
    against the eager composites (the ops through autograd, as users call them)."""
    ops = torch.ops.gradguard
    g = torch.Generator(device=device).manual_seed(0)
    x = torch.randn(n, generator=g, device=device).abs_()
    x[::1000] = 0.0  # some elements below the bound, as in real use
    grad = torch.randn(n, generator=g, device=device)
    nbytes = 2 * n * x.element_size()  # one read, one write
    rows = [Row("torch.log (bare, no clamp)", median_ms(lambda: torch.log(x), device, repeats), nbytes),
            Row("gradguard safe_log forward", median_ms(lambda: ops.safe_log(x, 1e-6, False), device, repeats), nbytes),
            Row("torch.log(torch.clamp(x, min=eps)) (composite)",
                median_ms(lambda: torch.log(torch.clamp(x, min=1e-6)), device, repeats), nbytes),
            Row("torch.exp (bare, no clamp)", median_ms(lambda: torch.exp(x), device, repeats), nbytes),
            Row("gradguard safe_exp forward", median_ms(lambda: ops.safe_exp(x, 80.0, False), device, repeats), nbytes),
            Row("torch.exp(torch.clamp(x, max=m)) (composite)",
                median_ms(lambda: torch.exp(torch.clamp(x, max=80.0)), device, repeats), nbytes)]
    xr = x.clone().requires_grad_()
    fwd_bwd = _fwd_bwd_of(xr, grad)

    rows += [Row("safe_log forward+backward (gradguard)",
                 median_ms(fwd_bwd(lambda t: ops.safe_log(t, 1e-6, False)), device, repeats)),
             Row("safe_log forward+backward (eager composite)",
                 median_ms(fwd_bwd(lambda t: torch.log(torch.clamp(t, min=1e-6))), device, repeats)),
             Row("safe_exp forward+backward (gradguard)",
                 median_ms(fwd_bwd(lambda t: ops.safe_exp(t, 80.0, False)), device, repeats)),
             Row("safe_exp forward+backward (eager composite)",
                 median_ms(fwd_bwd(lambda t: torch.exp(torch.clamp(t, max=80.0))), device, repeats))]
    t = Table(f"safe math, {n / 2**20:.0f}M fp32 elements", rows)
    for op, bare in (("safe_log", "torch.log (bare, no clamp)"), ("safe_exp", "torch.exp (bare, no clamp)")):
        t.check(f"{op} forward / {bare.split()[0]}", t.ms(f"gradguard {op} forward") / t.ms(bare), "<=", 1.1)
        t.check(f"{op} composite fwd+bwd / gradguard fwd+bwd",
                t.ms(f"{op} forward+backward (eager composite)") / t.ms(f"{op} forward+backward (gradguard)"), ">=", 1.5)
    return t


def _copy_ms(device, repeats):
    src = torch.empty(64 * 2**20, dtype=torch.float32, device=device).normal_()
    dst = torch.empty_like(src)
    return median_ms(lambda: dst.copy_(src), device, repeats)


def tables(device: str = "cuda", quick: bool = False) -> list[Table]:
    """The GPU tables of issue 4: grad_stats over GPT-2-XL and over 2,000 small tensors, and
    safe_log/safe_exp where the safe math ops exist."""
    if not torch.cuda.is_available():
        raise RuntimeError("gradguard.bench.cuda_cases needs a CUDA GPU")
    device = torch.device(device)
    card = torch.cuda.get_device_name(device)
    stamp = time.strftime("%Y-%m-%d", time.gmtime())
    repeats = 5 if quick else 20
    out = []
    # GPT-2-XL (48 layers, d 1600): 1.56B fp32 elements; quick mode uses GPT-2 medium (355M).
    xl = gpt2_shapes(24, 1024) if quick else gpt2_shapes(48, 1600)
    grads = _device_grads(xl, torch.float32, device)
    t = stats_table("GPT-2 medium fp32" if quick else "GPT-2-XL fp32", grads, device, repeats)
    t.title = f"{t.title} [{card}, {stamp}]"
    out.append(t)
    del grads
    torch.cuda.empty_cache()
    grads = _device_grads(_small_shapes(2000), torch.float32, device, seed=1)
    t = stats_table("2,000 small fp32 tensors", grads, device, repeats)
    t.title = f"{t.title} [{card}, {stamp}]"
    out.append(t)
    del grads
    if hasattr(torch.ops.gradguard, "safe_log"):  # the safe math ops (issue 3) are defined
        for t in (safe_math_table(device, repeats, 2**22 if quick else 2**26),
                  div_by_number_table(device, repeats, 2**22 if quick else 2**27)):
            t.title = f"{t.title} [{card}, {stamp}]"
            out.append(t)
    return out


def div_by_number_table(device, repeats, n):
    """A float16 tensor divided by a number (a loss scale): gradguard.safe_div in one pass (the op
    takes the 16-bit input with the float32 divisor) against torch.div, forward and
    forward+backward."""
    g = torch.Generator(device=device).manual_seed(0)
    x = torch.randn(n, generator=g, device=device).half()
    grad = torch.randn(n, generator=g, device=device).half()
    xr = x.clone().requires_grad_()
    fwd_bwd = _fwd_bwd_of(xr, grad)

    nbytes = 2 * n * x.element_size()
    rows = [Row("torch.div(x, 0.37) (bare)", median_ms(lambda: torch.div(x, 0.37), device, repeats), nbytes),
            Row("gradguard.safe_div(x, 0.37)", median_ms(lambda: gradguard.safe_div(x, 0.37), device, repeats), nbytes),
            Row("torch.div forward+backward", median_ms(fwd_bwd(lambda t: torch.div(t, 0.37)), device, repeats),
                2 * nbytes),
            Row("gradguard.safe_div forward+backward",
                median_ms(fwd_bwd(lambda t: gradguard.safe_div(t, 0.37)), device, repeats), 2 * nbytes)]
    t = Table(f"division by a number, {n / 2**20:.0f}M fp16 elements", rows)
    t.check("safe_div / torch.div, forward", t.ms("gradguard.safe_div(x, 0.37)") / t.ms("torch.div(x, 0.37) (bare)"),
            "<=", 1.1)
    t.check("safe_div / torch.div, forward+backward",
            t.ms("gradguard.safe_div forward+backward") / t.ms("torch.div forward+backward"), "<=", 1.1)
    return t


def main(argv=None):
    """The old entry point: the same as ``python -m gradguard.bench --only cuda``."""
    from gradguard.bench.__main__ import main as bench_main

    return bench_main(["--only", "cuda", *(argv or [])])


if __name__ == "__main__":
    raise SystemExit(main(__import__("sys").argv[1:]))
