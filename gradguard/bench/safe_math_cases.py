"""Benchmark cases of the safe math ops (issue 3's bar).

2^26 float32 elements, 2 threads, medians. For safe_log and safe_exp: forward and
forward+backward, against the eager composite, the composite under torch.compile, and the bare
torch.log / torch.exp (the practical floor: one read, one write, the math). Forward is timed with
a fresh output (what a model does) and with a preallocated ``out=`` (allocation cost removed).

Cases are timed round-robin (every case once per round) and each target is checked on the
median of per-round ratios: on a shared machine the load changes between rounds, not within one.
Targets on the forward with a fresh output are the issue's bar; the out= line is the same bar
with allocation (page faults of a fresh 256 MB tensor, most of the time here) taken out.

Inputs: safe_log gets uniform [0, 1) with one exact zero per 1024 elements (log of
probabilities); safe_exp gets N(0, 30^2) logits, so ~0.3% of elements are above the default max.

Out of domain: safe_log and safe_sqrt of uniform(-1, 1), float32 and float16, 2^24 elements,
against the eager composite and the bare op on |x| (in domain, same bytes).

Division: a float16 and a bfloat16 tensor of 2^26 elements divided by 0.37 (computed in float32,
as torch.div does) and by a tensor of its dtype, forward and forward+backward, against torch.div.

Per call on a small tensor: 1,024 float32 elements, safe_log and safe_div against the bare ops
(and safe_log against the eager composite), forward and forward+backward, in us per call: where
the host's work is the whole cost (on a GPU, below millions of elements).

Under torch.compile (issue 11): a cross-entropy-style loss, softmax -> safe_log -> NLL, forward
and backward over 2^24 logits, both compiled, against the same loss written with
torch.log(torch.clamp(p, min=eps)); and the ulp differences inductor's own log/exp/sqrt make
against the eager kernels (2^20 float32 inputs per op).
"""
from __future__ import annotations

import statistics

import torch

import gradguard
from gradguard.bench.timing import Row, Table, interleaved_times
from gradguard.safe_math import EXP_MAX

FULL_N = 1 << 26
QUICK_N = 1 << 20


def _log_input(n, device):
    g = torch.Generator().manual_seed(0)
    x = torch.rand(n, generator=g)
    x[::1024] = 0.0
    return x.to(device)


def _exp_input(n, device):
    g = torch.Generator().manual_seed(0)
    return (torch.randn(n, generator=g) * 30.0).to(device)


def _fwd_bwd(fn, x, g):
    def run():
        x.grad = None
        fn(x).backward(g)
    return run


def _ratio(times, a, b) -> float:
    """Median over rounds of a's time / b's time in the same round."""
    return statistics.median(x / y for x, y in zip(times[a], times[b]))


def _table(title, fns, nbytes, floor, device, rounds):
    times = interleaved_times(fns, device, rounds)
    rows = [Row(name, statistics.median(ts), nbytes) for name, ts in times.items()]
    return Table(title, rows, floor=floor), times


def _op_tables(name, fused, composite, bare, bare_out, x, device, rounds, bwd_bytes):
    n = x.numel()
    elem = x.element_size()
    compiled = torch.compile(composite)
    out = torch.empty_like(x)
    fwd_bytes = 2 * n * elem
    threads = torch.get_num_threads()
    op = name[len("safe_"):]
    BARE, OURS = f"torch.{op} (bare)", f"gradguard.{name}"
    EAGER, COMPILED = f"eager composite {op}(clamp(x))", "composite under torch.compile"
    BARE_OUT, OURS_OUT = f"torch.{op}(out=) (bare, preallocated)", f"gradguard.{name}(out=) (preallocated)"

    fwd, t = _table(f"{name} forward, {n} float32, {device}, {threads} threads", {
        BARE: lambda: bare(x),
        OURS: lambda: fused(x),
        EAGER: lambda: composite(x),
        COMPILED: lambda: compiled(x),
        BARE_OUT: lambda: bare_out(x, out),
        OURS_OUT: lambda: fused(x, out=out),
    }, fwd_bytes, BARE, device, rounds)
    fwd.check(f"{name} / bare {op}", _ratio(t, OURS, BARE), "<=", 1.1)
    fwd.check(f"{name} / compiled composite", _ratio(t, OURS, COMPILED), "<=", 1.0)
    fwd.check(f"eager composite / {name} (speed-up)", _ratio(t, EAGER, OURS), ">=", 1.5)
    fwd.check(f"{name}(out=) / bare {op}(out=)", _ratio(t, OURS_OUT, BARE_OUT), "<=", 1.1)

    xg = x.clone().requires_grad_(True)
    g = torch.ones_like(x)
    fb, t = _table(f"{name} forward+backward, {n} float32, {device}, {threads} threads", {
        BARE: _fwd_bwd(bare, xg, g),
        OURS: _fwd_bwd(fused, xg, g),
        EAGER: _fwd_bwd(composite, xg, g),
        COMPILED: _fwd_bwd(compiled, xg, g),
    }, fwd_bytes + bwd_bytes, BARE, device, rounds)
    fb.check(f"eager composite / {name} (speed-up)", _ratio(t, EAGER, OURS), ">=", 1.5)
    fb.check(f"{name} / compiled composite", _ratio(t, OURS, COMPILED), "<=", 1.0)
    return [fwd, fb]


LOSS_N = 1 << 24
LOSS_CLASSES = 1024


def _nll_loss(log_fn):
    def loss(logits, target):
        return torch.nn.functional.nll_loss(log_fn(torch.softmax(logits, dim=-1)), target)
    return loss


def _compiled_loss_table(device, quick, rounds):
    n = QUICK_N if quick else LOSS_N
    rows = n // LOSS_CLASSES
    g = torch.Generator().manual_seed(0)
    logits = (torch.randn(rows, LOSS_CLASSES, generator=g) * 8.0).to(device).requires_grad_(True)
    target = torch.randint(0, LOSS_CLASSES, (rows,), generator=g).to(device)
    eps = torch.finfo(torch.float32).tiny
    OURS, COMP = "gradguard.safe_log loss, torch.compile", "torch.log(torch.clamp) loss, torch.compile"
    fns = {OURS: torch.compile(_nll_loss(gradguard.safe_log)),
           COMP: torch.compile(_nll_loss(lambda p: torch.log(torch.clamp(p, min=eps))))}

    def step(fn):
        def run():
            logits.grad = None
            fn(logits, target).backward()
        return run

    # Reads the logits and writes their gradient, at least.
    table, t = _table(f"softmax -> log -> NLL, forward+backward, {n} float32 logits ({LOSS_CLASSES} classes), "
                      f"{device}, {torch.get_num_threads()} threads",
                      {name: step(fn) for name, fn in fns.items()}, 2 * n * 4, None, device, rounds)
    table.check("gradguard / composite, both compiled", _ratio(t, OURS, COMP), "<=", 1.02)
    return table


OOD_N = 1 << 24


def _out_of_domain_table(dtype, device, quick, rounds):
    """safe_log and safe_sqrt where half the inputs are below the bound (uniform(-1, 1)): MKL's
    log of a negative and sqrt of 0 are its slow special cases, which the kernel keeps away from
    (stand-ins, then math(bound) written over them). Against the eager composite (which runs
    log on the clamped values) and the bare op on in-domain inputs of the same size (|x|: the same
    bytes and math, no special case)."""
    n = QUICK_N if quick else OOD_N
    g = torch.Generator().manual_seed(0)
    x = (torch.rand(n, generator=g) * 2 - 1).to(dtype).to(device)
    inside = x.abs()
    eps = torch.finfo(dtype).tiny
    fns = {
        "gradguard.safe_log": lambda: gradguard.safe_log(x),
        "eager composite log(clamp(x, min=tiny))": lambda: torch.log(torch.clamp(x, min=eps)),
        "torch.log(|x|) (bare, in domain)": lambda: torch.log(inside),
        "gradguard.safe_sqrt": lambda: gradguard.safe_sqrt(x),
        "eager composite sqrt(clamp(x, min=0))": lambda: torch.sqrt(torch.clamp(x, min=0.0)),
        "torch.sqrt(|x|) (bare, in domain)": lambda: torch.sqrt(inside),
    }
    name = str(dtype).replace("torch.", "")
    table, t = _table(f"half the inputs out of domain, {n} {name}, {device}, {torch.get_num_threads()} threads",
                      fns, 2 * n * x.element_size(), None, device, rounds)
    for op in ("log", "sqrt"):
        ours = f"gradguard.safe_{op}"
        comp = next(k for k in fns if k.startswith(f"eager composite {op}"))
        table.check(f"safe_{op} / eager composite", _ratio(t, ours, comp), "<=", 1.0)
        # No target: the passes that keep the special cases away cost this much over in-domain math.
        table.checks.append(f"safe_{op} / bare {op} in domain = "
                            f"{_ratio(t, ours, f'torch.{op}(|x|) (bare, in domain)'):.2f}x (for reference)")
    return table


def _div_16bit_table(dtype, device, quick, rounds):
    """A float16/bfloat16 tensor divided by a number (a loss scale, 1/n) and by a tensor of its
    dtype. By a number, torch.div divides in float32 by the number's float32 value and rounds
    once, and so does gradguard.safe_div, in one pass (the op widens each element in registers;
    the input's gradient is the op again). By a tensor, both compute each quotient in float32 and
    round it (the CPU kernel's AVX2 rows). Against torch.div, forward (one read per operand, one
    write) and forward+backward (the backward reads the incoming gradient, the operands it needs,
    and writes the gradients)."""
    n = QUICK_N if quick else FULL_N
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, generator=g).to(dtype).to(device)
    d = (torch.rand(n, generator=g) + 0.5).to(dtype).to(device)
    xg = x.clone().requires_grad_(True)
    dg = d.clone().requires_grad_(True)
    grad = torch.ones_like(x)

    def fwd_bwd_tensor(fn):
        def run():
            xg.grad = dg.grad = None
            fn(xg, dg).backward(grad)
        return run

    cases = {  # name: (function, tensors of n elements moved)
        "torch.div(x, 0.37) (bare)": (lambda: torch.div(x, 0.37), 2),
        "gradguard.safe_div(x, 0.37)": (lambda: gradguard.safe_div(x, 0.37), 2),
        "torch.div(x, 0.37) forward+backward": (_fwd_bwd(lambda t: torch.div(t, 0.37), xg, grad), 4),
        "gradguard.safe_div(x, 0.37) forward+backward": (_fwd_bwd(lambda t: gradguard.safe_div(t, 0.37), xg, grad), 4),
        "torch.div(x, y) (bare)": (lambda: torch.div(x, d), 3),
        "gradguard.safe_div(x, y)": (lambda: gradguard.safe_div(x, d), 3),
        "torch.div(x, y) forward+backward": (fwd_bwd_tensor(torch.div), 8),
        "gradguard.safe_div(x, y) forward+backward": (fwd_bwd_tensor(gradguard.safe_div), 8),
    }
    times = interleaved_times({k: fn for k, (fn, _) in cases.items()}, device, rounds)
    rows = [Row(k, statistics.median(ts), cases[k][1] * n * x.element_size()) for k, ts in times.items()]
    name = str(dtype).replace("torch.", "")
    table = Table(f"division, {n} {name}, {device}, {torch.get_num_threads()} threads", rows)
    for by in ("0.37", "y"):
        table.check(f"safe_div / torch.div by {'a number' if by == '0.37' else 'a tensor'}, forward",
                    _ratio(times, f"gradguard.safe_div(x, {by})", f"torch.div(x, {by}) (bare)"), "<=", 1.1)
        table.check(f"safe_div / torch.div by {'a number' if by == '0.37' else 'a tensor'}, forward+backward",
                    _ratio(times, f"gradguard.safe_div(x, {by}) forward+backward",
                           f"torch.div(x, {by}) forward+backward"), "<=", 1.1)
    return table


SMALL_N = 1024
SMALL_CALLS = 1000


def _small_tensor_table(device, rounds):
    """What a call costs where the tensor is small and the host's work is the whole cost (on a
    GPU, below millions of elements): 1,024 float32 elements, each case a loop of 1,000 calls, so
    the ms of a row are us per call. gradguard's fixed cost is its Python wrapper (argument
    checks, the dtype rule) and the op's dispatch; the ops' autograd is C++ where the extension
    is loaded (a Python autograd kernel cost ~10 us a call without grad, ~55 us with it)."""
    g = torch.Generator().manual_seed(0)
    x = (torch.rand(SMALL_N, generator=g) + 0.1).to(device)
    d = (torch.rand(SMALL_N, generator=g) + 0.5).to(device)
    xg = x.clone().requires_grad_(True)
    eps = torch.finfo(torch.float32).tiny

    def calls(fn):
        def run():
            for _ in range(SMALL_CALLS):
                fn()
        return run

    def fwd_bwd(fn):
        def once():
            xg.grad = None
            fn(xg).sum().backward()
        return calls(once)

    fns = {
        "torch.log(x) (bare)": lambda t: torch.log(t),
        "torch.log(torch.clamp(x, min=tiny)) (eager composite)": lambda t: torch.log(torch.clamp(t, min=eps)),
        "gradguard.safe_log(x)": gradguard.safe_log,
        "torch.div(x, y) (bare)": lambda t: torch.div(t, d),
        "gradguard.safe_div(x, y)": lambda t: gradguard.safe_div(t, d),
        "torch.div(x, 0.37) (bare)": lambda t: torch.div(t, 0.37),
        "gradguard.safe_div(x, 0.37)": lambda t: gradguard.safe_div(t, 0.37),
    }
    cases = {}
    for name, fn in fns.items():
        cases[f"{name} forward"] = calls(lambda fn=fn: fn(x))
        cases[f"{name} forward+backward"] = fwd_bwd(fn)
    times = interleaved_times(cases, device, rounds)
    rows = [Row(k, statistics.median(ts)) for k, ts in times.items()]
    table = Table(f"per call on a small tensor ({SMALL_N} float32, {device}, {torch.get_num_threads()} threads; "
                  f"ms per {SMALL_CALLS} calls = us per call)", rows)
    for ours, theirs in (("gradguard.safe_log(x)", "torch.log(torch.clamp(x, min=tiny)) (eager composite)"),
                         ("gradguard.safe_log(x)", "torch.log(x) (bare)"),
                         ("gradguard.safe_div(x, y)", "torch.div(x, y) (bare)"),
                         ("gradguard.safe_div(x, 0.37)", "torch.div(x, 0.37) (bare)")):
        for part in ("forward", "forward+backward"):
            table.checks.append(f"{ours} / {theirs}, {part}: "
                                f"{_ratio(times, f'{ours} {part}', f'{theirs} {part}'):.2f}x")
    return table


def _ulp_distance(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """|a - b| in float32 ulps (the distance between their positions on the ordered int line)."""
    def ordered(t):
        i = t.view(torch.int32).to(torch.int64)
        return torch.where(i < 0, -(i & 0x7FFFFFFF), i)
    return (ordered(a) - ordered(b)).abs()


def _ulp_table(device):
    """Inductor's log/exp/sqrt are its own (vectorized) functions, not eager's: how far apart
    compiled and eager safe math are, on 2^20 float32 inputs per op. Division is correctly
    rounded on both sides."""
    n = QUICK_N
    g = torch.Generator().manual_seed(0)
    inputs = {
        "safe_log": torch.exp(torch.rand(n, generator=g) * 170 - 85),    # every binade of [e^-85, e^85)
        "safe_exp": torch.rand(n, generator=g) * 190 - 100,             # [-100, 90): underflow to clamped
        "safe_sqrt": torch.exp(torch.rand(n, generator=g) * 170 - 85),
        "safe_div": torch.randn(n, generator=g) * 1e3,
    }
    other = torch.randn(n, generator=g)
    ops = {"safe_log": gradguard.safe_log, "safe_exp": gradguard.safe_exp, "safe_sqrt": gradguard.safe_sqrt,
           "safe_div": lambda x: gradguard.safe_div(x, other.to(x.device))}
    table = Table(f"compiled vs eager safe math values, {n} float32 inputs per op, {device} (ulp distance)", [])
    for name, fn in ops.items():
        x = inputs[name].to(device)
        d = _ulp_distance(torch.compile(fn, fullgraph=True)(x), fn(x))
        table.checks.append(f"{name}: max {int(d.max())} ulp, {100 * (d > 0).double().mean().item():.2f}% "
                            "of inputs differ")
    return table


def tables(device: str = "cpu", quick: bool = False) -> list[Table]:
    n = QUICK_N if quick else FULL_N
    rounds = 3 if quick else 11
    threads = torch.get_num_threads()
    if device == "cpu":
        torch.set_num_threads(2)
    try:
        eps = torch.finfo(torch.float32).tiny
        m = EXP_MAX[torch.float32]
        out = _op_tables(
            "safe_log", gradguard.safe_log, lambda x: torch.log(torch.clamp(x, min=eps)), torch.log,
            lambda x, o: torch.log(x, out=o), _log_input(n, device), device, rounds,
            bwd_bytes=3 * n * 4)  # backward reads grad and input, writes the gradient
        out += _op_tables(
            "safe_exp", gradguard.safe_exp, lambda x: torch.exp(torch.clamp(x, max=m)), torch.exp,
            lambda x, o: torch.exp(x, out=o), _exp_input(n, device), device, rounds,
            bwd_bytes=4 * n * 4)  # backward reads grad, result and input, writes the gradient
        for dtype in (torch.float32, torch.float16):
            out.append(_out_of_domain_table(dtype, device, quick, 3 if quick else 7))
        for dtype in (torch.float16, torch.bfloat16):
            out.append(_div_16bit_table(dtype, device, quick, 3 if quick else 7))
        out.append(_small_tensor_table(device, 3 if quick else 7))
        out.append(_compiled_loss_table(device, quick, rounds))
        out.append(_ulp_table(device))
    finally:
        torch.set_num_threads(threads)
    return out


if __name__ == "__main__":
    import sys

    for table in tables(quick="--quick" in sys.argv):
        print(table.format())
        print()
