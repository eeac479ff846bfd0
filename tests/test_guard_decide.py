"""gradguard::guard_decide's compiled kernels against its reference (gradguard/reference/decide.py,
the specification), on random sequences of guarded steps: every output and every mutated state
tensor, step after step. With GRADGUARD_DISABLE_EXT=1 the op is the reference itself (the
sequences then check nothing new), but opcheck and the bad-input tests still run on it."""
from __future__ import annotations

import math
import random

import pytest
import torch
import torch.testing._internal.optests

from conftest import DEVICES, EXT_LOADED, needs_ext
from gradguard import _host, _ops, reference

op = torch.ops.gradguard.guard_decide
STEPS = 30
N = 7  # gradient tensors per step
HISTORY_ROWS = 3  # < STEPS: the ring wraps around many times
WINDOW = 4  # percentile window, also wraps
WARMUP = 3
SPIKE_ARGS = {"none": [], "zscore": [2.0, 0.9, float(WARMUP)], "percentile": [0.75, float(WINDOW), float(WARMUP)]}
# float32 results: exact or one float32 ulp (a float64 sum in another order can round the other
# way); float64 state that holds float32-rounded values follows them. float64 results: 1e-12.
F32_RTOL = 2.0 ** -23
F64_RTOL = 1e-12


def new_state(spike: str, layers: int, device, stateful: bool = True):
    if not stateful:
        return dict(counters=None, layer_nonfinite=None, layer_max_norm=None, history=None,
                    spike_state=torch.empty(0, dtype=torch.float64, device=device) if spike == "none" else
                    _spike_state(spike, device))
    return dict(counters=torch.zeros(5, dtype=torch.int64, device=device),
                layer_nonfinite=torch.zeros(layers, dtype=torch.int64, device=device),
                layer_max_norm=torch.zeros(layers, dtype=torch.float64, device=device),
                spike_state=_spike_state(spike, device),
                history=torch.zeros(HISTORY_ROWS, 3, dtype=torch.float64, device=device))


def _spike_state(spike, device):
    if spike == "zscore":
        return torch.zeros(3, dtype=torch.float64, device=device)
    if spike == "percentile":
        return torch.cat([torch.zeros(1), torch.full((WINDOW,), math.nan)]).double().to(device)
    return torch.empty(0, dtype=torch.float64, device=device)


def clone_state(state, device=None):
    return {k: (None if v is None else v.clone().to(device or v.device)) for k, v in state.items()}


def random_stats(rng: random.Random, numel, event: str):
    """multi_tensor_stats-shaped results of one step of grads of `numel` elements each: acc in
    [1, numel], amax around 1 (0 for an all-zero grad), and NaN/Inf counts, a spike of every grad
    or a huge tensor as `event` says."""
    n = len(numel)
    amax = [rng.uniform(0.5, 1.0) for _ in range(n)]
    acc = [max(1.0, k * rng.uniform(0.2, 0.4)) for k in numel]
    nan = [0] * n
    inf = [0] * n
    k = rng.randrange(n)
    if rng.random() < 0.1:  # a grad of zeros
        j = rng.randrange(n)
        amax[j], acc[j] = 0.0, 0.0
    if event == "spike":
        f = rng.choice([5.0, 30.0, 400.0])
        amax = [a * f for a in amax]
    elif event == "nan":
        nan[k] = rng.randint(1, numel[k])
    elif event == "inf":
        inf[k] = rng.randint(1, numel[k])
    elif event == "nan_inf":
        nan[k], inf[(k + 1) % n] = 1, 2
    elif event == "huge":  # finite, but its norm overflows float32
        amax[k] = 1e39
    return (torch.tensor(acc, dtype=torch.float64), torch.tensor(nan, dtype=torch.int64),
            torch.tensor(inf, dtype=torch.int64), torch.tensor(amax, dtype=torch.float64))


def _close(name, got, want, rtol):
    got = got.cpu()
    want = want.cpu()
    assert got.dtype == want.dtype and got.shape == want.shape, (name, got.dtype, want.dtype, got.shape, want.shape)
    if not got.is_floating_point():
        assert torch.equal(got, want), (name, got, want)
        return
    torch.testing.assert_close(got, want, rtol=rtol, atol=0.0, equal_nan=True, msg=lambda m: f"{name}: {m}")


def compare(got_out, want_out, got_state, want_state, double_out):
    rtol = F64_RTOL if double_out else F32_RTOL
    names = ("norms", "amax", "scalars", "found_inf", "multiplier", "grad_scale", "pre_scale")
    for name, g, w in zip(names, got_out, want_out):
        _close(name, g, w, F64_RTOL if g.dtype == torch.float64 and double_out else F32_RTOL if g.dtype == torch.float32
               else rtol)
    # found, skipped, amp_overflow, streak, clipped: exact.
    flags = [2, 3, 4, 5, 7]
    assert torch.equal(got_out[2].cpu()[flags], want_out[2].cpu()[flags]), (got_out[2], want_out[2])
    for k in want_state:
        if want_state[k] is None:
            assert got_state.get(k) is None
            continue
        _close(k, got_state[k], want_state[k], rtol)
    if want_state["history"] is not None:  # the skipped column: exact
        assert torch.equal(got_state["history"].cpu()[:, 2], want_state["history"].cpu()[:, 2])


def run_sequence(seed, device, p, mode, spike, double_out, use_index, max_norm_kind, amp_kind, stateful=True,
                 call=op):
    """STEPS steps of the op (on `device`) and of the reference (on CPU clones), compared after
    each step. Returns how many steps were non-finite, clipped, skipped, for the caller's checks
    that the sequence exercised those branches."""
    rng = random.Random(seed)
    # Its own generator (seed + 2: with seed + 1 a z-score sequence's one spike clip was a step with
    # a 1e-40 loss scale, bad since its inverse is judged in float32 for float64 results too).
    bad_scales = random.Random(seed + 2)
    layers = N + 4 if use_index else N
    index = torch.randperm(layers, generator=torch.Generator().manual_seed(seed))[:N] if use_index else None
    op_state = new_state(spike, layers, device, stateful)
    ref_state = clone_state(op_state, "cpu")
    seen = {"found": 0, "clipped": 0, "skipped": 0, "overflow": 0, "spike_clipped": 0}
    numel = [rng.randint(1, 500) for _ in range(N)]
    for step in range(STEPS):
        event = rng.choices(["normal", "spike", "nan", "inf", "nan_inf", "huge"], [10, 4, 2, 2, 1, 1])[0]
        stats = random_stats(rng, numel, event)
        max_norm = max_norm_value = None
        if max_norm_kind in ("tensor", "both"):
            v = rng.choices([2.0, 0.7, -1.0, math.nan], [10, 5, 1, 1])[0]
            max_norm = torch.tensor(v, dtype=rng.choice([torch.float32, torch.float64]))
        if max_norm_kind in ("number", "both"):
            max_norm_value = rng.choice([1.5, 3.0])
        loss_scale = scaler_found = None
        if amp_kind in ("scale", "both"):
            loss_scale = torch.tensor(rng.choice([1.0, 1024.0, 65536.0]), dtype=torch.float32)
            if bad_scales.random() < 0.08:
                # A scale backed off too far to undo (with the scaler's flag too, the streak
                # counts the step). From a generator of its own: the main sequence is unchanged.
                loss_scale.fill_(bad_scales.choice([0.0, 1e-40]))
        if amp_kind in ("found", "both"):
            scaler_found = torch.tensor(rng.choices([0.0, 1.0, 2.0], [8, 2, 1])[0], dtype=torch.float32)
        if loss_scale is not None:  # the grads still hold the scale
            stats = (stats[0], stats[1], stats[2], stats[3] * float(loss_scale))
        common = (p, max_norm_value, mode, spike, SPIKE_ARGS[spike], double_out)
        tensors = (*stats, index, max_norm, loss_scale, scaler_found)

        def on(dev, state):
            return (*[None if t is None else t.to(dev) for t in tensors], state["counters"], state["layer_nonfinite"],
                    state["layer_max_norm"], state["spike_state"], state["history"], *common)

        got = call(*on(device, op_state))
        want = reference.guard_decide(*on("cpu", ref_state))
        try:
            compare(got, want, op_state, ref_state, double_out)
        except AssertionError as e:
            raise AssertionError(f"step {step} ({event}): {e}") from None
        s = want[2]
        seen["found"] += int(s[2])
        seen["skipped"] += int(s[3])
        seen["overflow"] += int(s[4])
        seen["clipped"] += int(s[7])
        seen["spike_clipped"] += int(s[7]) if max_norm_kind == "none" else 0
    return seen


P_VALUES = [1.0, 2.0, 3.5, math.inf]
MAX_NORM_KINDS = ["none", "tensor", "number", "both"]
AMP_KINDS = ["none", "scale", "found", "both"]


def sequence_cases():
    # spike x mode x result dtype; each case runs one sequence per p, the other dimensions
    # (index, max_norm, GradScaler) rotated so that every value meets every spike policy and mode.
    cases = []
    for k, (spike, mode, double_out) in enumerate(
            (s, m, d) for s in reference.decide.SPIKES for m in reference.decide.MODES for d in (False, True)):
        cases.append(pytest.param(k, spike, mode, double_out, id=f"{spike}-{mode}-{'f64' if double_out else 'f32'}"))
    return cases


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("k, spike, mode, double_out", sequence_cases())
def test_random_sequences_match_reference(device, k, spike, mode, double_out):
    total = {"found": 0, "clipped": 0, "skipped": 0, "overflow": 0, "spike_clipped": 0}
    for j, p in enumerate(P_VALUES):
        seen = run_sequence(seed=1000 * k + j, device=device, p=p, mode=mode, spike=spike, double_out=double_out,
                            use_index=(j + k) % 2 == 1, max_norm_kind=MAX_NORM_KINDS[(j + k) % 4],
                            amp_kind=AMP_KINDS[(j + 2 * k) % 4])
        for key in total:
            total[key] += seen[key]
    # The sequences reached the branches they are meant to compare.
    assert total["found"] > 0 and total["clipped"] > 0, total
    assert (total["spike_clipped"] > 0) == (spike != "none"), total  # the policy's own limit was hit
    if mode in ("skip", "raise") or any(AMP_KINDS[(j + 2 * k) % 4] != "none" for j in range(4)):
        assert total["skipped"] > 0, total


def _bits(t):
    """A tensor's bytes as integers: NaN payloads and signs compared too."""
    t = t.detach().cpu().contiguous()
    return t.view({torch.float64: torch.int64, torch.float32: torch.int32}.get(t.dtype, t.dtype))


@needs_ext
@pytest.mark.parametrize("double_out", [False, True])
@pytest.mark.parametrize("loss_scale", [None, 1024.0, 0.0, 3.0, math.nan])
def test_cpu_vector_loop_equals_the_scalar_loop_bit_for_bit(double_out, loss_scale):
    # The CPU kernel's per-tensor loop runs four tensors a step with AVX2 for p = 2 and unit-stride
    # arrays (guard_decide_cpu.cpp); stride-2 views of the same values take its scalar loop. Both
    # must give the same bits, NaN and Inf counts, zero grads, NaN and Inf norms, NaN maxima in
    # the per-layer state and every tail length included; a NaN loss scale too, whose NaN factor
    # meets NaN operands, the case where x86's choice of operand decides the NaN's bits (the
    # kernel keeps it on the scalar loop). (Without AVX2 both calls are scalar.)
    rng = random.Random(5 + int(double_out))
    for n in (1, 3, 4, 5, 8, 37, 1000, 1003):
        acc = [rng.choice([0.0, rng.uniform(0.0, 1.0), rng.uniform(1.0, 1e6)]) for _ in range(n)]
        amax = [rng.choice([0.0, rng.uniform(1e-30, 1.0), rng.uniform(1.0, 1e30), 3e38]) for _ in range(n)]
        nan = [rng.choice([0, 0, 0, 1, 7]) for _ in range(n)]
        inf = [rng.choice([0, 0, 0, 2]) for _ in range(n)]
        lnf = [rng.randint(0, 5) for _ in range(n)]
        lmn = [rng.choice([0.0, rng.uniform(0.0, 10.0), math.nan, math.inf]) for _ in range(n)]
        calls = []
        for stride in (1, 2):
            def spread(values, dtype):
                t = torch.zeros(n * stride, dtype=dtype)
                t[::stride] = torch.tensor(values, dtype=dtype)
                return t[::stride]
            state = dict(counters=torch.zeros(5, dtype=torch.int64), layer_nonfinite=spread(lnf, torch.int64),
                         layer_max_norm=spread(lmn, torch.float64))
            out = op(spread(acc, torch.float64), spread(nan, torch.int64), spread(inf, torch.int64),
                     spread(amax, torch.float64), None, None,
                     None if loss_scale is None else torch.tensor(loss_scale), None, state["counters"],
                     state["layer_nonfinite"], state["layer_max_norm"], None, None, 2.0, 1.0, "skip", "none", [],
                     double_out)
            calls.append((out, state))
        (vec, vec_state), (sca, sca_state) = calls
        for name, a, b in zip(("norms", "amax", "scalars", "found_inf", "multiplier", "grad_scale", "pre_scale"),
                              vec, sca):
            assert torch.equal(_bits(a), _bits(b)), (n, name, a, b)
        for k in vec_state:
            assert torch.equal(_bits(vec_state[k]), _bits(sca_state[k])), (n, k)


def _compiled_entry(*args):
    got = _host._C.guard_decide(*args)
    assert got is not None, "plain tensors: the compiled entry takes the call"
    return got


@pytest.mark.skipif(_host._C is None, reason="the compiled host helpers are not loaded")
@pytest.mark.parametrize("spike", reference.decide.SPIKES)
@pytest.mark.parametrize("mode", ["skip", "zero"])
def test_compiled_entry_matches_reference(spike, mode):
    # GradGuard's typed call (gradguard._C.guard_decide, csrc/cpu/host_helpers.cpp) parses the
    # arguments itself: every kind of max_norm, loss scale, index and spike argument through it.
    for j, p in enumerate(P_VALUES):
        run_sequence(seed=77 + j, device="cpu", p=p, mode=mode, spike=spike, double_out=j % 2 == 1,
                     use_index=j % 2 == 0, max_norm_kind=MAX_NORM_KINDS[j], amp_kind=AMP_KINDS[j],
                     call=_compiled_entry)


@pytest.mark.skipif(_host._C is None, reason="the compiled host helpers are not loaded")
def test_compiled_entry_reads_its_python_arguments_safely():
    args = _good_args()
    want = _call(args, op)
    st = _good_args()  # fresh state: the op updates its counters in place
    got = _call({**st, "spike_args": tuple(st["spike_args"])}, _compiled_entry)  # a tuple, as torch.ops takes
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=0, atol=0, equal_nan=True)

    class Shrinks:  # a number whose __float__ edits the list being read
        def __init__(self, value):
            self.value = value

        def __float__(self):
            box.clear()
            return 2.0

    box = [Shrinks(2.0), 0.9, 3.0]
    _call({**_good_args(), "spike_args": box}, _compiled_entry)  # read from a snapshot: no crash
    assert box == []
    with pytest.raises(TypeError, match="bool"):
        _call({**_good_args(), "double_out": 1}, _compiled_entry)


@pytest.mark.skipif(_host._C is None, reason="the compiled host helpers are not loaded")
def test_a_torch_function_mode_sees_guard_decide():
    seen = []

    class Watch(torch.overrides.TorchFunctionMode):
        def __torch_function__(self, func, types, args=(), kwargs=None):
            seen.append(str(func))
            return func(*args, **(kwargs or {}))

    args = _good_args()
    with Watch():
        _host.guard_decide(*[args[k] for k in ARG_ORDER])
    assert any("guard_decide" in f for f in seen), seen


@pytest.mark.skipif(_host._C is None, reason="the compiled host helpers are not loaded")
def test_compiled_entry_leaves_a_tensor_subclass_to_torch_ops():
    class Marked(torch.Tensor):
        pass

    args = {**_good_args(), "max_norm": torch.tensor(1.0).as_subclass(Marked)}
    assert _host._C.guard_decide(*[args[k] for k in ARG_ORDER]) is None
    args = {**_good_args(), "acc": torch.ones(3, dtype=torch.float64).as_subclass(Marked)}
    assert _host._C.guard_decide(*[args[k] for k in ARG_ORDER]) is None
    out = _host.guard_decide(*[args[k] for k in ARG_ORDER])  # through torch.ops
    assert len(out) == 7


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("spike", reference.decide.SPIKES)
@pytest.mark.parametrize("amp_kind", AMP_KINDS)
def test_stateless_calls_match_reference(device, spike, amp_kind):
    # clip_grad_norm_ keeps no counters, layers or history: all five may be None (the spike state
    # stays, a policy needs one).
    for j, p in enumerate(P_VALUES):
        run_sequence(seed=77 + j, device=device, p=p, mode=["skip", "zero", "ignore", "raise"][j], spike=spike,
                     double_out=j % 2 == 1, use_index=False, max_norm_kind=MAX_NORM_KINDS[j], amp_kind=amp_kind,
                     stateful=False)


@pytest.mark.parametrize("device", DEVICES)
def test_empty_and_single_tensor(device):
    for n in (0, 1):
        acc = torch.ones(n, dtype=torch.float64)
        zeros = torch.zeros(n, dtype=torch.int64)
        amax = torch.full((n,), 3.0, dtype=torch.float64)
        for spike in reference.decide.SPIKES:
            st_op, st_ref = new_state(spike, n, device), new_state(spike, n, "cpu")
            args = lambda dev, st: (acc.to(dev), zeros.to(dev), zeros.to(dev), amax.to(dev), None,
                                    torch.tensor(1.0, device=dev), None, None, st["counters"], st["layer_nonfinite"],
                                    st["layer_max_norm"], st["spike_state"], st["history"], 2.0, None, "skip", spike,
                                    SPIKE_ARGS[spike], False)
            for _ in range(WARMUP + 2):
                compare(op(*args(device, st_op)), reference.guard_decide(*args("cpu", st_ref)), st_op, st_ref, False)


@pytest.mark.parametrize("device", DEVICES)
def test_percentile_window_ranks_ties_and_nan(device):
    # The device kernel ranks the window by counting (ties broken by position) instead of sorting:
    # windows with equal values, +-0 and unfilled (NaN) slots, q on and between ranks.
    windows = [[1.0, 1.0, 1.0, 1.0], [3.0, -0.0, 0.0, 3.0], [math.nan, 2.0, math.nan, 1.0],
               [math.nan] * 4, [5.0, math.nan, math.nan, math.nan], [4.0, 1.0, 3.0, 2.0]]
    for window in windows:
        for q in (0.0, 0.25, 0.5, 0.6, 1.0):
            for basis in (0.5, 2.5, 10.0):
                st = torch.tensor([10.0] + window, dtype=torch.float64)
                args = lambda dev, s: (torch.ones(1, dtype=torch.float64, device=dev),
                                       torch.zeros(1, dtype=torch.int64, device=dev),
                                       torch.zeros(1, dtype=torch.int64, device=dev),
                                       torch.full((1,), basis, dtype=torch.float64, device=dev), None, None, None, None,
                                       None, None, None, s, None, 1.0, None, "skip", "percentile",
                                       [q, 4.0, 2.0], True)
                s_op, s_ref = st.clone().to(device), st.clone()
                got, want = op(*args(device, s_op)), reference.guard_decide(*args("cpu", s_ref))
                compare(got, want, {"spike_state": s_op}, {"spike_state": s_ref, "history": None}, True)


@pytest.mark.parametrize("device", DEVICES)
def test_percentile_limit_is_torch_nanquantile_bit_for_bit(device):
    # The interpolation between the two ranks is torch.lerp, which rounds once (an FMA): with two
    # roundings the limit, and so the float64 clip coefficient, was 1 ulp off torch.nanquantile
    # for ~1% of random windows (39 of 3,000).
    rng = random.Random(5)
    for _ in range(1500):
        w = rng.randint(2, 12)
        q = rng.choice([0.5, 0.75, 0.9, 0.95, 0.99, rng.random()])
        st = torch.tensor([float(w)] + [rng.uniform(0.1, 10.0) for _ in range(w)], dtype=torch.float64)
        args = lambda dev, s: (torch.ones(1, dtype=torch.float64, device=dev),
                               torch.zeros(1, dtype=torch.int64, device=dev),
                               torch.zeros(1, dtype=torch.int64, device=dev),
                               torch.full((1,), 100.0, dtype=torch.float64, device=dev), None, None, None, None,
                               None, None, None, s, None, 2.0, None, "skip", "percentile", [q, float(w), 0.0], True)
        got, want = op(*args(device, st.clone().to(device))), reference.guard_decide(*args("cpu", st.clone()))
        assert got[2][1].item() == want[2][1].item(), (st.tolist(), q, got[2][1].item(), want[2][1].item())

@needs_ext
def test_cpu_kernel_is_registered():
    # With the extension loaded the dispatcher runs the compiled CPU kernel, not the reference.
    assert torch._C._dispatch_has_kernel_for_dispatch_key("gradguard::guard_decide", "CPU")


def _opcheck_args(device, case):
    acc = torch.tensor([4.0, 1.0, 9.0], dtype=torch.float64, device=device)
    nan = torch.tensor([0, 1, 0], device=device)
    zero = torch.zeros(3, dtype=torch.int64, device=device)
    amax = torch.tensor([0.5, 2.0, 1.5], dtype=torch.float64, device=device)
    st = new_state(case, 5, device)
    if case == "zscore":
        return (acc, zero, zero, amax, torch.tensor([4, 0, 2], device=device), torch.tensor(1.0, device=device), None,
                None, st["counters"], st["layer_nonfinite"], st["layer_max_norm"], st["spike_state"], st["history"],
                2.0, 3.0, "skip", "zscore", SPIKE_ARGS["zscore"], False)
    if case == "percentile":
        st = new_state(case, 3, device)
        return (acc, nan, zero, amax, None, None, torch.tensor(8.0, device=device), torch.tensor(0.0, device=device),
                st["counters"], st["layer_nonfinite"], st["layer_max_norm"], st["spike_state"], st["history"], 1.0,
                None, "zero", "percentile", SPIKE_ARGS["percentile"], True)
    return (acc, nan, zero, amax, None, None, None, None, None, None, None, None, None, math.inf, 1.0, "zero", "none",
            [], False)


OPCHECK_EAGER = ("test_schema", "test_autograd_registration", "test_faketensor")


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("case", ["zscore", "percentile", "stateless"])
def test_opcheck(device, case):
    torch.library.opcheck(op.default, _opcheck_args(device, case), test_utils=OPCHECK_EAGER)


# The schema's argument was once named `mode`, which collides with the `mode` parameter of torch's
# auto_functionalized redirect under aot dispatch / torch.compile; hence `nonfinite`.
@pytest.mark.parametrize("case", ["zscore", "stateless"])
def test_opcheck_aot_dispatch(case):
    args = list(_opcheck_args("cpu", case))
    args[1] = torch.zeros_like(args[1])  # finite: this check compares outputs with NaN != NaN
    torch.library.opcheck(op.default, tuple(args), test_utils=("test_aot_dispatch_dynamic",))


def _good_args():
    n = 3
    st = new_state("zscore", n, "cpu")
    return dict(acc=torch.ones(n, dtype=torch.float64), nan_count=torch.zeros(n, dtype=torch.int64),
                inf_count=torch.zeros(n, dtype=torch.int64), amax=torch.ones(n, dtype=torch.float64), index=None,
                max_norm=torch.tensor(1.0), loss_scale=None, scaler_found=None, **{k: st[k] for k in (
                    "counters", "layer_nonfinite", "layer_max_norm", "spike_state", "history")},
                norm_type=2.0, max_norm_value=None, nonfinite="skip", spike="zscore", spike_args=SPIKE_ARGS["zscore"],
                double_out=False)


ARG_ORDER = list(_good_args())
BAD = {
    "acc-dtype": ("acc", dict(acc=torch.ones(3, dtype=torch.float32))),
    "acc-2d": ("acc", dict(acc=torch.ones(3, 1, dtype=torch.float64))),
    "nan_count-shape": ("nan_count", dict(nan_count=torch.zeros(4, dtype=torch.int64))),
    "inf_count-dtype": ("inf_count", dict(inf_count=torch.zeros(3, dtype=torch.int32))),
    "amax-dtype": ("amax", dict(amax=torch.ones(3, dtype=torch.float32))),
    "index-dtype": ("index", dict(index=torch.zeros(3, dtype=torch.int32))),
    "index-shape": ("index", dict(index=torch.zeros(2, dtype=torch.int64))),
    "index-without-layers": ("index", dict(index=torch.arange(3), layer_nonfinite=None, layer_max_norm=None)),
    "max_norm-numel": ("max_norm", dict(max_norm=torch.ones(2))),
    "max_norm-int": ("max_norm", dict(max_norm=torch.tensor(1))),
    "loss_scale-int": ("loss_scale", dict(loss_scale=torch.tensor(2))),
    "scaler_found-numel": ("scaler_found", dict(scaler_found=torch.zeros(0))),
    "max_norm-device": ("max_norm", dict(max_norm=torch.tensor(1.0, device="meta"))),
    "counters-shape": ("counters", dict(counters=torch.zeros(4, dtype=torch.int64))),
    "counters-dtype": ("counters", dict(counters=torch.zeros(5, dtype=torch.float64))),
    "layer_max_norm-alone": ("layer_max_norm", dict(layer_nonfinite=None)),
    "layer_max_norm-dtype": ("layer_max_norm", dict(layer_max_norm=torch.zeros(3, dtype=torch.float32))),
    "layer_nonfinite-size": ("layer_nonfinite", dict(layer_nonfinite=torch.zeros(4, dtype=torch.int64),
                                                     layer_max_norm=torch.zeros(4, dtype=torch.float64))),
    "history-shape": ("history", dict(history=torch.zeros(3, 2, dtype=torch.float64))),
    "history-empty": ("history", dict(history=torch.zeros(0, 3, dtype=torch.float64))),
    "history-without-counters": ("history", dict(counters=None)),
    "norm_type-negative": ("norm_type", dict(norm_type=-1.0)),
    "norm_type-zero": ("norm_type", dict(norm_type=0.0)),
    "nonfinite": ("nonfinite", dict(nonfinite="skipp")),
    "spike": ("spike", dict(spike="zclip")),
    "spike_args-length": ("spike_args", dict(spike_args=[2.0, 0.9])),
    "spike_state-dtype": ("spike_state", dict(spike_state=torch.zeros(3, dtype=torch.float32))),
    "spike_state-shape": ("spike_state", dict(spike_state=torch.zeros(4, dtype=torch.float64))),
    "spike_state-missing": ("spike_state", dict(spike_state=None)),
    "percentile-shape": ("spike_state", dict(spike="percentile", spike_args=[0.5, 4.0, 1.0])),
    # Named by every kernel: the reference failed inside torch.nanquantile or int() with torch's
    # words, and the fake kernel took them; a window of 1e20 made a negative shape (an undefined
    # cast) in the compiled check.
    **{f"percentile-{k}": ("spike_args", dict(spike="percentile", spike_args=[q, w, 1.0],
                                              spike_state=torch.zeros(3, dtype=torch.float64)))
       for k, q, w in (("q-above-1", 1.5, 2.0), ("q-nan", math.nan, 2.0), ("window-0", 0.5, 0.0),
                       ("window-negative", 0.5, -1.0), ("window-inf", 0.5, math.inf), ("window-nan", 0.5, math.nan),
                       ("window-1e20", 0.5, 1e20))},
    # float8 was taken by the reference and refused by the compiled kernel.
    "max_norm-float8": ("max_norm", dict(max_norm=torch.tensor(1.0).to(torch.float8_e4m3fn))),
}
# An index outside the layers: an IndexError naming `index` (the compiled kernel's c10::IndexError;
# the reference checks on the CPU before anything is written: a RuntimeError until now).
INDEX_CASES = {
    "index-range": dict(index=torch.tensor([0, 5, 1])),
    "index-negative": dict(index=torch.tensor([0, -1, 1])),
}


def _call(args, call=op):
    return call(*[args[k] for k in ARG_ORDER])


# torch.ops, and GradGuard's typed compiled call where it is loaded: the same refusals.
CALLERS = ["torch.ops"] + (["compiled"] if _host._C is not None else [])


@pytest.mark.parametrize("caller", CALLERS)
@pytest.mark.parametrize("case", list(BAD))
def test_bad_argument_is_named(case, caller):
    name, change = BAD[case]
    args = {**_good_args(), **change}
    before = {k: v.clone() for k, v in args.items() if isinstance(v, torch.Tensor) and v.device.type != "meta"}
    with pytest.raises(RuntimeError, match=f"gradguard.guard_decide: .*`{name}`"):
        _call(args, op if caller == "torch.ops" else _compiled_entry)
    for k, v in before.items():  # a refused call writes nothing
        assert torch.equal(args[k], v), k


@pytest.mark.parametrize("kernel", ["op", "reference"])
@pytest.mark.parametrize("case", list(INDEX_CASES))
def test_an_index_outside_the_layers_is_an_index_error(case, kernel):
    args = {**_good_args(), **INDEX_CASES[case]}
    before = {k: v.clone() for k, v in args.items() if isinstance(v, torch.Tensor)}
    with pytest.raises(IndexError, match="gradguard.guard_decide: .*`index`"):
        _call(args, op if kernel == "op" else _ops._guard_decide_default)
    for k, v in before.items():
        assert torch.equal(args[k], v), k


@pytest.mark.parametrize("kernel", ["op", "reference", "fake"])
@pytest.mark.parametrize("case", [k for k in BAD if k.startswith("percentile-") or k == "max_norm-float8"])
def test_every_kernel_names_a_bad_spike_argument_and_limit(case, kernel):
    name, change = BAD[case]
    args = {**_good_args(), **change}
    if kernel == "fake":
        from torch._subclasses.fake_tensor import FakeTensorMode  # noqa: PLC0415

        with FakeTensorMode() as mode:
            args = {k: mode.from_tensor(v) if isinstance(v, torch.Tensor) else v for k, v in args.items()}
            with pytest.raises(RuntimeError, match=f"gradguard.guard_decide: .*`{name}`"):
                _call(args)
        return
    with pytest.raises(RuntimeError, match=f"gradguard.guard_decide: .*`{name}`"):
        _call(args, op if kernel == "op" else _ops._guard_decide_default)


@pytest.mark.parametrize("kernel", ["op", "reference"])
def test_a_repeated_index_adds_the_counts_and_keeps_the_largest_norm(kernel):
    # The reference's indexed assignment kept the last tensor's norm (3), the CPU kernel the
    # largest (5): the two kernels of one op disagreed. (GradGuard's index is distinct.)
    args = {**_good_args(), "acc": torch.tensor([25.0, 1.0, 9.0], dtype=torch.float64),
            "nan_count": torch.tensor([0, 1, 0]), "index": torch.tensor([0, 0, 0]), "max_norm": None,
            "layer_nonfinite": torch.zeros(2, dtype=torch.int64), "layer_max_norm": torch.zeros(2, dtype=torch.float64)}
    _call(args, op if kernel == "op" else _ops._guard_decide_default)
    assert args["layer_max_norm"].tolist() == [5.0, 0.0] and args["layer_nonfinite"].tolist() == [1, 0]


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_repeated_index_adds_every_entry():
    # The CUDA kernel's lanes updated the per-layer entries with plain read-modify-writes: with an
    # index repeated across lanes, one lane's update was lost (two non-finite tensors counted once).
    # Now atomics, as the CPU kernel (sequential) and the reference (index_add_, scatter_reduce_).
    n = 1500  # three block strides of the 512-thread kernel, every warp on the same entries
    acc = torch.arange(1.0, n + 1, dtype=torch.float64) ** 2
    nan = torch.zeros(n, dtype=torch.int64)
    nan[::3] = 1
    index = torch.tensor([i % 2 for i in range(n)])
    got = []
    for dev in ("cpu", "cuda"):
        args = {**_good_args(), "acc": acc, "nan_count": nan, "inf_count": torch.zeros(n, dtype=torch.int64),
                "amax": torch.ones(n, dtype=torch.float64), "index": index, "max_norm": None,
                "layer_nonfinite": torch.zeros(2, dtype=torch.int64), "layer_max_norm": torch.zeros(2, dtype=torch.float64)}
        args = {k: v.to(dev) if isinstance(v, torch.Tensor) else v for k, v in args.items()}
        _call(args, op)
        got.append((args["layer_nonfinite"].tolist(), args["layer_max_norm"].tolist()))
    want_bad = [sum(1 for i in range(0, n, 3) if i % 2 == k) for k in (0, 1)]
    assert got[0][0] == want_bad and got[1] == got[0]


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_kernel_registered_and_graph_capturable():
    # One launch, no host sync, no allocation beyond the outputs: the op can be captured in a CUDA
    # graph, and each replay is one more step of the same sequence (state mutated in place).
    assert torch._C._dispatch_has_kernel_for_dispatch_key("gradguard::guard_decide", "CUDA")
    rng = random.Random(5)
    numel = [rng.randint(1, 500) for _ in range(N)]
    spike = "zscore"
    st_dev, st_ref = new_state(spike, N, "cuda"), new_state(spike, N, "cpu")
    static = [t.cuda() for t in random_stats(rng, numel, "normal")]
    max_norm = torch.tensor(2.0, device="cuda")
    common = (2.0, None, "skip", spike, SPIKE_ARGS[spike], False)

    def args(ts, mn, st):
        return (*ts, None, mn, None, None, st["counters"], st["layer_nonfinite"], st["layer_max_norm"],
                st["spike_state"], st["history"], *common)

    warm_state = clone_state(st_dev)  # warm-up call on scratch state, outside the capture
    torch.cuda.synchronize()
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        op(*args(static, max_norm, warm_state))
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        outs = op(*args(static, max_norm, st_dev))
    for step in range(12):
        event = ["normal", "spike", "nan", "normal"][step % 4]
        fresh = random_stats(rng, numel, event)
        for s, f in zip(static, fresh):
            s.copy_(f)
        graph.replay()
        want = reference.guard_decide(*args(fresh, max_norm.cpu(), st_ref))
        compare(outs, want, st_dev, st_ref, False)


@pytest.mark.parametrize("value", [None, 0.5], ids=["alone", "with_a_number_limit"])
@pytest.mark.parametrize("limit", [-1.0, math.nan], ids=["negative", "nan"])
@pytest.mark.parametrize("mode", ["zero", "ignore", "skip"])
@pytest.mark.parametrize("kernel", ["op", "reference"])
def test_an_invalid_max_norm_tensor_never_clips(kernel, mode, limit, value, device):
    # The op reads max_norm on the device (a read back would sync), so it sees whatever the
    # tensor holds: a bad one flags the step and is no limit (it made a negative or NaN
    # multiplier in "zero" mode); another limit still clips there.
    args = _good_args()
    st = new_state("none", 3, device)
    args.update(acc=torch.full((3,), 4.0, dtype=torch.float64, device=device),
                nan_count=torch.tensor([0, 1, 0], device=device), inf_count=torch.zeros(3, dtype=torch.int64,
                                                                                        device=device),
                amax=torch.ones(3, dtype=torch.float64, device=device),
                max_norm=torch.tensor(limit, device=device), max_norm_value=value, nonfinite=mode, spike="none",
                spike_args=[],
                **{k: st[k] for k in ("counters", "layer_nonfinite", "layer_max_norm", "spike_state", "history")})
    fn = _call if kernel == "op" else (lambda a: reference.guard_decide(*[a[k] for k in ARG_ORDER]))
    norms, amax, scalars, found, mult, grad_scale, pre_scale = fn(args)
    assert float(found) == 1.0
    if mode == "zero" and value is not None:  # clipped by the number, over the finite elements' norm
        want = value / (math.sqrt(12.0) + 1e-6)
        assert float(scalars[1]) == pytest.approx(want, rel=1e-15) and float(mult) == float(scalars[1])
    else:
        assert float(scalars[1]) == 1.0 and float(mult) == 1.0 and float(grad_scale) == 1.0 and float(pre_scale) == 1.0


@pytest.mark.parametrize("kernel", ["op", "reference"])
@pytest.mark.parametrize("exponent", [16, 120, 124, 127])
def test_a_grad_scale_past_float32_moves_the_clip_into_pre_scale(kernel, exponent, device):
    # grad_scale = loss_scale / clip_coef is a float32 a fused optimizer divides by: a GradScaler
    # scale grown to 2^124 over a coefficient below 1/16 made it inf (every gradient zeroed).
    # There it is the loss scale alone and pre_scale the coefficient; 1 everywhere else.
    ls = 2.0 ** exponent
    st = new_state("none", 1, device)
    args = _good_args()
    args.update(acc=torch.tensor([64.0], dtype=torch.float64, device=device),
                nan_count=torch.zeros(1, dtype=torch.int64, device=device),
                inf_count=torch.zeros(1, dtype=torch.int64, device=device),
                amax=torch.tensor([ls], dtype=torch.float64, device=device), max_norm=None, max_norm_value=0.4,
                loss_scale=torch.tensor(ls, device=device), spike="none", spike_args=[],
                **{k: st[k] for k in ("counters", "layer_nonfinite", "layer_max_norm", "spike_state", "history")})
    fn = _call if kernel == "op" else (lambda a: reference.guard_decide(*[a[k] for k in ARG_ORDER]))
    norms, amax, scalars, found, mult, grad_scale, pre_scale = fn(args)
    coef = 0.4 / (8.0 + 1e-6)
    assert float(found) == 0.0 and float(scalars[1]) == pytest.approx(coef, rel=1e-7)
    past = math.isinf(float(torch.tensor(ls / float(scalars[1]), dtype=torch.float32)))
    assert past == (exponent >= 124)
    if past:
        assert float(pre_scale) == float(torch.tensor(float(scalars[1]), dtype=torch.float32))
        assert float(grad_scale) == ls
    else:
        assert float(pre_scale) == 1.0
        assert float(grad_scale) == float(torch.tensor(ls / float(scalars[1]), dtype=torch.float32))
