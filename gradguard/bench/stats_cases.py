"""Benchmark cases for grad_stats, all_finite and clip_grad_norm_ (issue bar: GPT-2 small, fp32)."""
from __future__ import annotations

import glob
import os
import statistics
import time
from dataclasses import dataclass

import torch

import gradguard
from gradguard.bench.shapes import GPT2_SIZES, gpt2_shapes, make_grads, numel
from gradguard.bench.timing import Row, Table, interleaved_times, median_ms, ratio, round_orders, sync


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


READ_FLOOR = ("read floor: the fastest of gradguard_bench.read_floor (1/4/8 streams, 1 with a prefetch) "
              "and torch.sum")
TORCH_SUM = "torch.sum over one flat buffer, same bytes (reference)"
GRAD_STATS = "gradguard.grad_stats (norms, NaN/Inf counts, amax, total)"
FOREACH_NORM = "torch._foreach_norm (norms only, no finiteness check)"
STREAMS = (1, 4, 8)
# The walks the floors are the fastest of, as (streams per thread, software prefetch into L2 in
# bytes ahead, 0 for none). With a prefetch 4-16 KB ahead the walks read and rewrote 15-30%
# faster on an Intel Xeon (2026-12-07, 256 MB, two threads: ~26 GB/s against 22-23 and 20), and
# the 512-bit kernels that prefetch (csrc/cpu/prefetch.h) beat the walks without one: a floor
# must be the fastest way to move the bytes.
PREFETCH_BYTES = (4096, 8192)
READ_WALKS = tuple((k, 0) for k in STREAMS) + tuple((1, p) for p in PREFETCH_BYTES)
REWRITE_WALKS = ((1, 0), (4, 0)) + tuple((1, p) for p in PREFETCH_BYTES)


def walk_label(streams: int, prefetch: int) -> str:
    return f"{streams} stream(s) per thread" + (f", prefetch {prefetch} B ahead" if prefetch else "")


def have_floor() -> bool:
    """The floors are C++ loops in the extension (csrc/cpu/bandwidth_floor.cpp)."""
    try:
        torch.ops.gradguard_bench.read_floor
        return True
    except (AttributeError, RuntimeError):
        return False


def _as_words(flat: torch.Tensor) -> torch.Tensor:
    """The buffer's bytes as a contiguous tensor whose size is a multiple of 8 bytes."""
    b = flat.reshape(-1).view(torch.uint8)
    return b[: b.numel() // 8 * 8]


def read_floor_cases(flat: torch.Tensor) -> dict:
    """The reads the floor is the fastest of: the C++ walks, and torch.sum over the same bytes,
    which on some days (one thread, or a list that fits in L3) read them faster than every walk."""
    words = _as_words(flat)
    cases = {f"read floor, {walk_label(k, p)}": (lambda k=k, p=p: torch.ops.gradguard_bench.read_floor(words, k, p))
             for k, p in READ_WALKS}
    cases[TORCH_SUM] = lambda: flat.sum()
    return cases


def add_best(times: dict, name: str, parts: list[str]) -> None:
    """A row that is, in every round, the fastest of `parts` (the floor is what the best walk
    achieves); the parts stay in the table."""
    times[name] = [min(vals) for vals in zip(*(times[p] for p in parts))]


def stats_table(grads, label: str, device: str, repeats: int, target: float = 0.9) -> Table:
    """grad_stats against the read floor of the same bytes, all cases interleaved round by round.
    `target` is the share of the floor's speed the kernel must reach."""
    nbytes = sum(g.numel() * g.element_size() for g in grads)
    flat = torch.cat([g.reshape(-1) for g in grads])
    cases = {
        TORCH_SUM: lambda: flat.sum(),
        GRAD_STATS: lambda: gradguard.grad_stats(grads),
        "gradguard.all_finite": lambda: gradguard.all_finite(grads),
        FOREACH_NORM: lambda: torch._foreach_norm(grads),
    }
    floor_parts = []
    if have_floor() and device == "cpu":
        floor_cases = read_floor_cases(flat)
        floor_parts = list(floor_cases)
        cases.update(floor_cases)
    times = interleaved_times(cases, device, repeats)
    floor = TORCH_SUM
    if floor_parts:
        add_best(times, READ_FLOOR, floor_parts)
        floor = READ_FLOOR
    slow = median_ms(lambda: _isfinite_per_tensor(grads), device, max(3, repeats // 4))
    del flat
    rows = [Row(n, statistics.median(v), nbytes) for n, v in times.items()]
    rows.append(Row("per-tensor torch.isfinite(t).all(), stacked (measured apart)", slow, nbytes))
    tab = Table(f"grad_stats, {label}, {device}, {torch.get_num_threads()} threads", rows, floor=floor)
    tab.check(f"grad_stats / {'read floor' if floor_parts else 'torch.sum (no read floor built)'}",
              ratio(times, GRAD_STATS, floor), "<=", round(1.0 / target, 2))
    tab.check("grad_stats / torch.sum", ratio(times, GRAD_STATS, TORCH_SUM), "<=", 1.0)
    tab.check("_foreach_norm / grad_stats (speed-up)", ratio(times, FOREACH_NORM, GRAD_STATS), ">=", 1.3)
    tab.check("per-tensor isfinite / grad_stats (speed-up)", slow / tab.ms(GRAD_STATS), ">=", 10.0)
    return tab


KERNEL_ALONE = "gradguard multi_tensor_stats op (the kernel alone)"
KERNEL_FLAT = "multi_tensor_stats op over one flat tensor, same bytes"
STATES = ("cold", "warm")
EVICT_MIN_BYTES = 128 << 20
EVICT_MAX_BYTES = 4 << 30


def largest_cache_bytes() -> int:
    """The largest CPU cache this machine reports (sysfs, then sysconf), 0 where none is."""
    sizes = []
    for path in glob.glob("/sys/devices/system/cpu/cpu0/cache/index*/size"):
        try:
            with open(path) as f:
                text = f.read().strip()
        except OSError:
            continue
        scale = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}.get(text[-1:].upper(), 1)
        digits = text[:-1] if scale > 1 else text
        if digits.isdigit():
            sizes.append(int(digits) * scale)
    try:
        sizes.append(max(0, os.sysconf("SC_LEVEL3_CACHE_SIZE")))
    except (ValueError, OSError, AttributeError):
        pass
    return max(sizes, default=0)


def evict_bytes() -> int:
    """What the cold state reads before each call: twice the largest cache reported, at least
    128 MB (at most 4 GB). A fixed 128 MB was not enough on the Intel Xeon VM of 2026-12-07,
    which reports a 480 MB L3: after it the floor read the 52-tensor list's flat copy (read by
    seven cases a round) at warm speed, 0.70 against 1.38-1.60 ms after 0.5-2 GB, while the list
    itself (read by three) came partly from DRAM: 'cold' then judged a DRAM read against an L3
    one (kernel 2.5x the floor; 1.1-1.4x after 0.5-2 GB)."""
    return min(EVICT_MAX_BYTES, max(EVICT_MIN_BYTES, 2 * largest_cache_bytes()))


@dataclass
class CacheStateTable(Table):
    """A Table whose rows are named 'cold: case' and 'warm: case' and whose format() prints the
    two states of each case side by side, each against its own state's floor row. `floor` stays
    None (a single floor would judge the warm rows against the cold floor)."""

    state_floor: str | None = None  # the case name (without 'state: ') both states divide by

    def format(self) -> str:
        cases = list(dict.fromkeys(r.name.split(": ", 1)[1] for r in self.rows))
        by = {r.name: r for r in self.rows}
        w = max(len(c) for c in cases)
        sub = f"{'ms':>8} {'GB/s':>6} {'x floor':>7}"
        head = f"{'case':<{w}} | {'cold':^23} | {'warm':^23}"
        lines = [self.title, head, f"{'':<{w}} | {sub} | {sub}", "-" * len(head)]
        for c in cases:
            line = f"{c:<{w}}"
            for s in STATES:
                r = by.get(f"{s}: {c}")
                if r is None:
                    line += f" | {'':>23}"
                    continue
                gb = f"{r.gbps:6.1f}" if r.gbps else f"{'':>6}"
                xf = f"{r.ms / by[f'{s}: {self.state_floor}'].ms:7.2f}" if self.state_floor else f"{'':>7}"
                line += f" | {r.ms:8.3f} {gb} {xf}"
            lines.append(line)
        lines += [f"  {c}" for c in self.checks]
        return "\n".join(lines)

    def as_dict(self) -> dict:
        return {**super().as_dict(), "state_floor": self.state_floor}


# Calls made just before a warm call. On the Xeon of 2026-12-07 a list read once after another
# case's cold eviction (a 960 MB read) came at DRAM speed at the next read: with one call the
# kernel was 2.1-2.4x the floor warm (whose flat copy eight cases read, so it stayed in the cache),
# 1.34-1.42x when each case's warm call followed its own cold one (the rotated order until then),
# with two 1.31-1.38x (shuffled) against 1.15x (rotated); with four both orders agreed (1.17-1.20x).
WARM_CALLS = 4


def cache_state_table(grads, label: str, device: str, repeats: int, target: float = 0.8,
                      evict: int | None = None) -> CacheStateTable:
    """grad_stats against the read floor, every case in the same cache state. A list inside L3
    (GPT-2 10M: 30.5 MB; L3 32 MB on the VMs of 2026-12-03/05) is read from L3 or DRAM by what
    ran before: interleaved, the floor rounds re-read one flat copy from L3 while grad_stats reads
    its tensors, which they evicted, from DRAM. So each case is timed cold (caches evicted by
    reading `evict` bytes before each call, untimed; evict_bytes() by default) and warm (the same
    call WARM_CALLS times just before, untimed), interleaved round by round; `target` is the share
    of the floor's speed the kernel must reach in either state."""
    evict_bytes_ = evict_bytes() if evict is None else evict
    nbytes = sum(g.numel() * g.element_size() for g in grads)
    flat = torch.cat([g.reshape(-1) for g in grads])
    with_floor = have_floor() and device == "cpu"
    # Ones, not empty: pages never written all map to the one zero page and evict nothing.
    evict_buf = torch.ones(evict_bytes_ // 4, dtype=torch.float32, device=device)
    if with_floor:
        evict_words = _as_words(evict_buf)
        evict_caches = lambda: torch.ops.gradguard_bench.read_floor(evict_words, 1)  # noqa: E731
    else:
        evict_caches = lambda: evict_buf.sum()  # noqa: E731
    cases = {}
    floor_parts = []
    if with_floor:
        # Over the flat copy only. Reading the 52 tensors themselves would take one read_floor
        # call per tensor: 52 thread fork/joins, the small tensors split over threads, which is
        # not the floor of a single pass; the kernel over one flat tensor (below) shows instead
        # what the list costs the kernel.
        floor_cases = read_floor_cases(flat)
        floor_parts = list(floor_cases)
        cases.update(floor_cases)
    cases.update({
        KERNEL_ALONE: lambda: torch.ops.gradguard.multi_tensor_stats.default(grads, 2.0),
        KERNEL_FLAT: lambda: torch.ops.gradguard.multi_tensor_stats.default([flat], 2.0),
        GRAD_STATS: lambda: gradguard.grad_stats(grads),
        FOREACH_NORM: lambda: torch._foreach_norm(grads),
        TORCH_SUM: lambda: flat.sum(),
    })

    def timed(fn) -> float:
        t0 = time.perf_counter()
        fn()
        sync(device)
        return (time.perf_counter() - t0) * 1e3

    def run(name: str, state: str) -> float:
        if state == "cold":
            evict_caches()
        else:
            for _ in range(WARM_CALLS):
                cases[name]()
        sync(device)
        return timed(cases[name])

    items = [(n, s) for n in cases for s in STATES]
    for n, s in items:  # warm-up: first-call allocations, lazy init
        run(n, s)
    times = {f"{s}: {n}": [0.0] * repeats for n, s in items}
    for r, order in enumerate(round_orders(items, repeats)):
        for n, s in order:
            times[f"{s}: {n}"][r] = run(n, s)
    del flat, evict_buf
    floor = TORCH_SUM
    if floor_parts:
        floor = READ_FLOOR
        for s in STATES:
            add_best(times, f"{s}: {READ_FLOOR}", [f"{s}: {p}" for p in floor_parts])
    order = ([READ_FLOOR] if floor_parts else []) + list(cases)
    rows = [Row(f"{s}: {n}", statistics.median(times[f"{s}: {n}"]), nbytes) for n in order for s in STATES]
    tab = CacheStateTable(f"grad_stats in equal cache states (cold: {evict_bytes_ >> 20} MB read before each "
                          f"call; warm: the same call {WARM_CALLS} times just before), {label}, {device}, "
                          f"{torch.get_num_threads()} threads, median of {repeats} interleaved rounds",
                          rows, state_floor=floor)
    floor_word = "read floor" if floor_parts else "torch.sum (no read floor built)"
    bar = round(1.0 / target, 2)
    for what, name in (("kernel alone", KERNEL_ALONE), ("grad_stats", GRAD_STATS)):
        for s in STATES:
            tab.check(f"{s}: {what} / {floor_word}", ratio(times, f"{s}: {name}", f"{s}: {floor}"), "<=", bar)
    tab.check("cold: _foreach_norm / grad_stats (speed-up)",
              ratio(times, f"cold: {FOREACH_NORM}", f"cold: {GRAD_STATS}"), ">=", 1.3)
    return tab


def dtype_table(shapes, label: str, device: str, repeats: int) -> Table:
    """grad_stats on the same shapes in every dtype, each against the read floor of its own
    bytes (float16/bfloat16 read half the bytes of float32, float64 twice)."""
    rows, pairs, all_times = [], [], {}
    for dtype in (torch.float16, torch.bfloat16, torch.float32, torch.float64):
        grads = make_grads(shapes, dtype=dtype, device=device)
        nbytes = sum(g.numel() * g.element_size() for g in grads)
        flat = torch.cat([g.reshape(-1) for g in grads])
        name = str(dtype).replace("torch.", "")
        cases = {f"{name}: gradguard.grad_stats": lambda g=grads: gradguard.grad_stats(g)}
        floor_cases = read_floor_cases(flat)
        cases.update({f"{name}: {k}": f for k, f in floor_cases.items()})
        times = interleaved_times(cases, device, repeats)
        add_best(times, f"{name}: {READ_FLOOR}", [f"{name}: {k}" for k in floor_cases])
        for n in (f"{name}: {READ_FLOOR}", f"{name}: gradguard.grad_stats"):
            rows.append(Row(n, statistics.median(times[n]), nbytes))
        pairs.append((name, ratio(times, f"{name}: gradguard.grad_stats", f"{name}: {READ_FLOOR}")))
        all_times.update(times)
        del grads, flat
    tab = Table(f"grad_stats per dtype, {label}, {device}, {torch.get_num_threads()} threads", rows)
    for name, r in pairs:
        tab.check(f"{name}: grad_stats / read floor", r, "<=", 1.11)
    return tab


COPY_FLOOR = "copy floor: gradguard_bench.copy_floor, best of 1/4 streams"
SCALE_FLOOR = "in-place rewrite floor: gradguard_bench.rewrite_floor, best of 1/4 streams and 1 with a prefetch"


def _zero_then_mul(tensors, factor):
    for t in tensors:
        t.nan_to_num_(nan=0.0, posinf=0.0, neginf=0.0)
    torch._foreach_mul_(tensors, factor)


def scale_table(grads, label: str, device: str, repeats: int) -> Table:
    """The read+write kernels (clipping's scale pass) against the fastest in-place rewrite of the
    same bytes (each word read and written back where it is). Not a copy: a copy to another
    buffer also reads its destination in (write-allocate), ~1.5x the traffic of an in-place
    rewrite, so against it the kernels looked 0.6x "the floor"; it stays as a reference row."""
    nbytes = sum(g.numel() * g.element_size() for g in grads)
    work = [g.clone() for g in grads]
    flat = torch.cat([g.reshape(-1) for g in grads])
    src, dst = _as_words(flat), torch.empty_like(_as_words(flat))
    # Alternating factors: every call really writes, and the values stay put over the rounds.
    flip = {"s": 1.0}

    def factor():
        flip["s"] = 0.5 if flip["s"] != 0.5 else 2.0
        return torch.tensor(flip["s"])

    cases = {
        "torch dst.copy_(src), same bytes (reference)": lambda: dst.copy_(src),
        "gradguard maybe_scale_ (x *= c, c != 1)": lambda: torch.ops.gradguard.maybe_scale_(work, factor()),
        "gradguard zero_nonfinite_and_scale_": lambda: torch.ops.gradguard.zero_nonfinite_and_scale_(work, factor()),
        "torch._foreach_mul_ (same grads)": lambda: torch._foreach_mul_(work, factor()),
        "torch nan_to_num_ each + _foreach_mul_ (\"zero\" mode in torch)": lambda: _zero_then_mul(work, factor()),
    }
    copies, rewrites = [], []
    if have_floor() and device == "cpu":
        for k in (1, 4):
            name = f"copy floor, {k} stream(s) per thread"
            cases[name] = lambda k=k: torch.ops.gradguard_bench.copy_floor(dst, src, k)
            copies.append(name)
        for k, p in REWRITE_WALKS:
            name = f"in-place rewrite floor, {walk_label(k, p)}"
            # xor 0: the bytes are kept
            cases[name] = lambda k=k, p=p: torch.ops.gradguard_bench.rewrite_floor(src, 0, k, p)
            rewrites.append(name)
    times = interleaved_times(cases, device, repeats)
    floor = "torch._foreach_mul_ (same grads)"  # without the compiled floors: the strongest torch way
    if rewrites:
        add_best(times, COPY_FLOOR, copies)
        add_best(times, SCALE_FLOOR, rewrites)
        floor = SCALE_FLOOR
    del work, flat, src, dst
    tab = Table(f"scale kernels (read + write in place), {label}, {device}, {torch.get_num_threads()} threads",
                [Row(n, statistics.median(v), 2 * nbytes) for n, v in times.items()], floor=floor)
    tab.check("maybe_scale_ / in-place floor", ratio(times, "gradguard maybe_scale_ (x *= c, c != 1)", floor),
              "<=", 1.11)
    tab.check("zero_nonfinite_and_scale_ / in-place floor",
              ratio(times, "gradguard zero_nonfinite_and_scale_", floor), "<=", 1.11)
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
    """Both clip_grad_norm_ implementations, clipping every call and never clipping, all four
    cases interleaved round by round (one case after another was at the mercy of this VM's
    drift: one run of four showed gradguard's clipping at 1.15x torch's, the others 0.64-0.92x)."""
    nbytes = sum(g.numel() * g.element_size() for g in grads)
    ours_g, theirs_g = _params_with(grads), _params_with(grads)
    big = 1e9  # a max_norm no gradient reaches: nothing to scale
    norm = float(gradguard.grad_stats(grads).total_norm)
    m_theirs, m_ours = ShrinkingMaxNorm(norm), ShrinkingMaxNorm(norm)
    t_clip, o_clip = "torch clip_grad_norm_(foreach=True), clipping", "gradguard.clip_grad_norm_, clipping"
    t_none = "torch clip_grad_norm_(foreach=True), norm below max_norm"
    o_none = "gradguard.clip_grad_norm_, norm below max_norm (no write)"
    cases = {
        t_clip: lambda: torch.nn.utils.clip_grad_norm_(theirs_g, m_theirs(), foreach=True),
        o_clip: lambda: gradguard.clip_grad_norm_(ours_g, m_ours()),
        t_none: lambda: torch.nn.utils.clip_grad_norm_(theirs_g, big, foreach=True),
        o_none: lambda: gradguard.clip_grad_norm_(ours_g, big),
    }
    times = interleaved_times(cases, device, repeats)
    # torch multiplies by its clamped coefficient whether or not it is 1: it rewrites the grads
    # either way (the GB/s column counts what each case moves).
    moved = {t_clip: 3 * nbytes, o_clip: 3 * nbytes, t_none: 3 * nbytes, o_none: nbytes}
    rows = [Row(n, statistics.median(v), moved[n]) for n, v in times.items()]
    tab = Table(f"clip_grad_norm_, {label}, {device}, {torch.get_num_threads()} threads, "
                f"{repeats} interleaved rounds", rows)
    tab.check("ours / torch, clipping", ratio(times, o_clip, t_clip), "<=", 1.0)
    tab.check("ours / torch, nothing to clip", ratio(times, o_none, t_none), "<=", 1.0)
    return tab


def sweep_table(device: str, repeats: int) -> Table:
    """How grad_stats' cost grows with the model, against torch.sum over a flat copy of the same
    bytes (a reference, not the read floor: the tables above measure that) and _foreach_norm,
    interleaved per size."""
    rows, pairs = [], []
    for size, cfg in GPT2_SIZES.items():
        grads = make_grads(gpt2_shapes(**cfg), device=device)
        nbytes = sum(g.numel() * g.element_size() for g in grads)
        flat = torch.cat([g.reshape(-1) for g in grads])
        tsum = f"{size} ({len(grads)} tensors): torch.sum over a flat copy"
        ours, fe = f"{size}: gradguard.grad_stats", f"{size}: torch._foreach_norm"
        times = interleaved_times({tsum: lambda f=flat: f.sum(), ours: lambda g=grads: gradguard.grad_stats(g),
                                   fe: lambda g=grads: torch._foreach_norm(g)}, device, repeats)
        rows += [Row(n, statistics.median(times[n]), nbytes) for n in (tsum, ours, fe)]
        pairs.append((size, ratio(times, ours, tsum), ratio(times, fe, ours)))
        del flat, grads
    tab = Table(f"grad_stats across GPT-2 sizes (fp32), {device}, {torch.get_num_threads()} threads, median of "
                f"{repeats} interleaved rounds", rows)
    for size, to_sum, fe_ratio in pairs:  # how the cost grows; the bar is the 124M table above
        tab.checks.append(f"{size}: grad_stats / torch.sum = {to_sum:.2f}x, _foreach_norm / grad_stats = "
                          f"{fe_ratio:.2f}x")
    return tab


FALLBACK_TARGET = 3.0


def fallback_table(device: str, repeats: int, sizes=("10M", "124M")) -> Table:
    """The pure-PyTorch fallback (the reference kernel of multi_tensor_stats, what every device
    without compiled kernels runs) against torch._foreach_norm on the same list, interleaved;
    issue 10's target: within 3x."""
    from gradguard import reference  # noqa: PLC0415

    rows, cases = [], []
    times_all = {}
    for size in sizes:
        grads = make_grads(gpt2_shapes(**GPT2_SIZES[size]), device=device)
        nbytes = sum(g.numel() * g.element_size() for g in grads)
        ref, fe = f"{size} ({len(grads)} tensors): reference multi_tensor_stats", f"{size}: torch._foreach_norm"
        times = interleaved_times({ref: lambda: reference.multi_tensor_stats(grads, 2.0),
                                   fe: lambda: torch._foreach_norm(grads)}, device, repeats)
        times_all[size] = (times, ref, fe)
        rows += [Row(ref, statistics.median(times[ref]), nbytes), Row(fe, statistics.median(times[fe]), nbytes)]
        del grads
    tab = Table(f"The pure-PyTorch fallback vs torch._foreach_norm (fp32, p=2), {device}, "
                f"{torch.get_num_threads()} threads, median of {repeats} interleaved rounds", rows)
    for size, (times, ref, fe) in times_all.items():
        tab.check(f"{size}: reference / _foreach_norm", ratio(times, ref, fe), "<=", FALLBACK_TARGET)
    return tab


def tables(device: str = "cpu", quick: bool = False) -> list[Table]:
    small = gpt2_shapes(**GPT2_SIZES["10M"])
    if quick:  # a smoke run: small model, few repeats (CI, tests)
        grads = make_grads(small, device=device)
        label = f"GPT-2 10M-shaped ({len(grads)} tensors, {numel(grads) / 1e6:.1f}M fp32)"
        return [stats_table(grads, label, device, 3, target=0.8), clip_table(grads, label, device, 3),
                fallback_table(device, 3, sizes=("10M",))]
    grads = make_grads(gpt2_shapes(), device=device)
    label = f"GPT-2 small-shaped ({len(grads)} tensors, {numel(grads) / 1e6:.1f}M fp32, " \
            f"{numel(grads) * 4 / 1e6:.0f} MB)"
    out = [stats_table(grads, label, device, 21), scale_table(grads, label, device, 11),
           clip_table(grads, label, device, 11)]
    # The same list in bfloat16: the 16-bit scale loops (simd_avx2.h) against the same floor.
    grads = [g.to(torch.bfloat16) for g in grads]
    out.append(scale_table(grads, f"GPT-2 small-shaped, bfloat16 ({numel(grads) * 2 / 1e6:.0f} MB)", device, 11))
    del grads
    if have_floor() and device == "cpu":
        out.append(dtype_table(gpt2_shapes(), "GPT-2 small-shaped", device, 9))
    grads10 = make_grads(small, device=device)
    # 30.5 MB, inside L3: measured in equal cache states (see cache_state_table).
    out.append(cache_state_table(grads10, f"GPT-2 10M-shaped ({len(grads10)} tensors, "
                                 f"{numel(grads10) / 1e6:.1f}M fp32)", device, 41, target=0.8))
    del grads10
    out.append(sweep_table(device, 11))
    out.append(fallback_table(device, 11))
    return out
