"""NanTracer: planted faults are attributed to the right phase, module, rows and op, in both
modes; good steps report None; the tracer detaches, resets and refuses bad arguments."""
from __future__ import annotations

import math

import pytest
import torch
from torch import nn

import gradguard

B, D = 8, 6


class Scaled(nn.Module):
    """x * factor, then exp: an activation that overflows when factor is large."""

    def __init__(self):
        super().__init__()
        self.factor = 1.0

    def forward(self, x):
        return torch.exp(x * self.factor)


class NanInBackward(torch.autograd.Function):
    """Identity forward; the backward turns the gradient of `row` into NaN."""

    @staticmethod
    def forward(ctx, x, row):
        ctx.row = row
        return x.clone()

    @staticmethod
    def backward(ctx, g):
        g = g.clone()
        g[ctx.row] = math.nan
        return g, None


class BadGrad(nn.Module):
    def __init__(self):
        super().__init__()
        self.row = None

    def forward(self, x):
        return x if self.row is None else NanInBackward.apply(x, self.row)


class Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(D, D)
        self.act = Scaled()
        self.norm = nn.LayerNorm(D)

    def forward(self, x):
        return self.norm(x + self.act(self.fc(x)))


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = nn.Linear(D, D)
        self.blocks = nn.ModuleList([Block(), Block()])
        self.bad_grad = BadGrad()
        self.head = nn.Linear(D, 3)

    def forward(self, x):
        h = self.embed(x)
        for b in self.blocks:
            h = b(h)
        return self.head(self.bad_grad(h))


def make():
    torch.manual_seed(0)
    return Net(), torch.randn(B, D), torch.randint(0, 3, (B,))


def step(model, x, y, log_zero=False):
    logits = model(x)
    p = torch.softmax(logits, dim=1)
    if log_zero:
        p = p * (torch.arange(B) != 2).unsqueeze(1)  # p = 0 for row 2
    loss = -torch.log(p.gather(1, y.unsqueeze(1))).mean()
    loss.backward()
    return loss


def reference_rows(t):
    """Rows holding NaN/Inf, computed in float64."""
    return (~torch.isfinite(t.double())).reshape(t.shape[0], -1).any(1).nonzero().flatten().tolist()


# Each planted fault: (name, plant(model, x) -> x, phase, module, rows or None when unknowable)
def plant_input(model, x):
    x = x.clone()
    x[3, 1] = math.nan
    x[5, 0] = math.inf
    return x


def plant_weight(model, x):
    with torch.no_grad():
        model.blocks[1].fc.weight[2, 4] = math.nan
    return x


def plant_exp(model, x):
    model.blocks[0].act.factor = 1e4  # exp(1e4 * z) overflows float32 wherever z > 0.009
    return x


def plant_backward(model, x):
    model.bad_grad.row = 6
    return x


FAULTS = {
    "nan_input": (plant_input, "input", ""),
    "nan_weight": (plant_weight, "forward", "blocks.1.fc"),
    "exp_overflow": (plant_exp, "forward", "blocks.0.act"),
    "nan_in_backward": (plant_backward, "backward", "bad_grad"),
}


def test_good_step_is_none():
    model, x, y = make()
    tracer = gradguard.NanTracer(model)
    step(model, x, y)
    assert tracer.first_nonfinite() is None
    assert tracer.first_nonfinite(loss=torch.tensor(1.0)) is None


@pytest.mark.parametrize("keep", [False, True])
@pytest.mark.parametrize("fault", sorted(FAULTS))
def test_always_mode_names_the_planted_fault(fault, keep):
    plant, phase, module = FAULTS[fault]
    model, x, y = make()
    tracer = gradguard.NanTracer(model, keep_tensors=keep)
    x = plant(model, x)
    step(model, x, y)
    origin = tracer.first_nonfinite()
    assert origin is not None, fault
    assert (origin.phase, origin.module) == (phase, module), str(origin)
    if fault == "nan_input":
        assert origin.rows == [3, 5] == reference_rows(x) and origin.kind == "NaN and Inf"
        assert str(origin).startswith("the input batch already held NaN and Inf (input [0]); 2 of 8 rows: batch rows [3, 5]")
    if fault == "nan_weight":
        assert origin.bad_params == ["`weight`"]
        assert "already held NaN/Inf" in str(origin)
    if fault == "exp_overflow":
        assert origin.where == "output" and origin.kind == "Inf"
        assert "its inputs were finite" in str(origin)
        if keep:  # the activations outlive backward: rows and op are known
            h = model.blocks[0].fc(model.embed(x)).detach()
            assert origin.rows == reference_rows(torch.exp(1e4 * h.double()).float())
            assert origin.op == "aten.exp" and origin.op_inputs_finite
    if fault == "nan_in_backward":
        assert origin.where == "gradient" and str(origin).startswith(
            "forward finite; the first non-finite gradient (NaN) appeared in the backward of `bad_grad`")
        if keep:
            assert origin.rows == [6]


def test_without_keep_tensors_rows_and_op_come_from_a_replay():
    """Autograd keeps saved activations without their Python objects, so after the forward the
    tracer cannot look at them unless it kept them: the module, phase and kind are known, rows
    and op are not; a replay knows all."""
    model, x, y = make()
    tracer = gradguard.NanTracer(model)
    plant_exp(model, x)
    step(model, x, y)
    origin = tracer.first_nonfinite()
    assert (origin.module, origin.rows, origin.op) == ("blocks.0.act", None, None)
    model.zero_grad()
    origin = tracer.replay(lambda b: step(model, *b), (x, y))
    h = model.blocks[0].fc(model.embed(x)).detach().double()
    assert origin.rows == reference_rows(torch.exp(1e4 * h))
    assert origin.op == "aten.exp" and origin.op_module == "blocks.0.act"
    assert "first non-finite op: aten.exp (from finite inputs)" in str(origin)


def test_log_zero_in_the_loss():
    model, x, y = make()
    tracer = gradguard.NanTracer(model)
    loss = step(model, x, y, log_zero=True)
    # Without the loss: the model's forward was finite, its output's gradient was not.
    origin = tracer.first_nonfinite()
    assert (origin.phase, origin.module) == ("backward", "")
    assert "it came from the backward of the loss" in str(origin)
    # With the loss: the loss itself is inf.
    origin = tracer.first_nonfinite(loss=loss)
    assert (origin.phase, origin.module, origin.kind) == ("loss", "", "Inf")
    assert math.isinf(float(loss.detach()))


def test_nan_only_in_a_parameter_gradient():
    """The module's input gradient is finite, its weight's gradient is not."""

    class NanWeightGrad(torch.autograd.Function):
        @staticmethod
        def forward(ctx, w):
            return w.clone()

        @staticmethod
        def backward(ctx, g):
            return torch.full_like(g, math.nan)

    class Odd(nn.Linear):
        def forward(self, x):
            return nn.functional.linear(x, NanWeightGrad.apply(self.weight), self.bias)

    class Top(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.odd = nn.Linear(D, D), Odd(D, D)

        def forward(self, x):
            return self.odd(self.a(x))

    torch.manual_seed(0)
    model = Top()
    tracer = gradguard.NanTracer(model)
    model(torch.randn(B, D)).sum().backward()
    assert torch.isfinite(model.a.weight.grad).all() and not torch.isfinite(model.odd.weight.grad).any()
    origin = tracer.first_nonfinite()
    assert (origin.phase, origin.module, origin.where, origin.tensor) == (
        "backward", "odd", "parameter gradient", "odd.weight")
    assert "the parameter gradients are not (the first, in module order: `odd.weight`" in str(origin)


def test_code_between_submodules():
    """A NaN made by the parent's own code (not a submodule) is blamed on the parent."""

    class Parent(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Linear(D, D), nn.Linear(D, D)

        def forward(self, x):
            return self.b(torch.sqrt(self.a(x) - 100.0))  # sqrt of a negative: NaN

    class Top(nn.Module):
        def __init__(self):
            super().__init__()
            self.inner = Parent()

        def forward(self, x):
            return self.inner(x)

    torch.manual_seed(0)
    model = Top()
    tracer = gradguard.NanTracer(model)
    x = torch.randn(B, D)
    model(x).sum().backward()
    origin = tracer.first_nonfinite()
    assert (origin.phase, origin.module, origin.where, origin.submodule) == ("forward", "inner", "code", "inner.b")
    assert "appeared in the forward of `inner`, outside its submodules: the input of `inner.b`" in str(origin)


def test_autocast_bf16_fault():
    model, x, y = make()
    tracer = gradguard.NanTracer(model, keep_tensors=True)
    plant_exp(model, x)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits = model(x)
    assert logits.dtype == torch.bfloat16
    logits.float().sum().backward()
    origin = tracer.first_nonfinite()
    assert (origin.phase, origin.module) == ("forward", "blocks.0.act"), str(origin)
    assert origin.op == "aten.exp"


def test_nan_in_weight_under_autocast():
    model, x, y = make()
    tracer = gradguard.NanTracer(model)
    plant_weight(model, x)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        model(x).float().sum().backward()
    origin = tracer.first_nonfinite()
    assert (origin.phase, origin.module) == ("forward", "blocks.1.fc")


def test_module_called_twice_names_the_call():
    class Twice(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(D, D)
            self.act = Scaled()

        def forward(self, x):
            h = self.act(self.fc(x))
            self.act.factor = 1e4  # the second call overflows
            return self.act(self.fc(h))

    torch.manual_seed(0)
    model = Twice()
    tracer = gradguard.NanTracer(model)
    model(torch.randn(B, D)).sum().backward()
    origin = tracer.first_nonfinite()
    assert (origin.module, origin.module_call) == ("act", 2)
    assert "; call 2 of this module" in str(origin)


def test_tuple_and_dict_outputs():
    class Multi(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(D, D)

        def forward(self, x):
            h = self.fc(x)
            return {"ok": h, "bad": (h, torch.log(h - 100.0))}

    class Top(nn.Module):
        def __init__(self):
            super().__init__()
            self.multi, self.head = Multi(), nn.Linear(D, 1)

        def forward(self, x):
            out = self.multi(x)
            return self.head(out["ok"]) + out["bad"][1].sum()

    torch.manual_seed(0)
    model = Top()
    tracer = gradguard.NanTracer(model)
    model(torch.randn(B, D)).sum().backward()
    origin = tracer.first_nonfinite()
    assert (origin.phase, origin.module, origin.where) == ("forward", "multi", "output")


def test_gradient_checkpointing():
    from torch.utils.checkpoint import checkpoint

    class Ckpt(nn.Module):
        def __init__(self):
            super().__init__()
            self.net = Net()

        def forward(self, x):
            h = self.net.embed(x)
            for b in self.net.blocks:
                h = checkpoint(b, h, use_reentrant=False)
            return self.net.head(self.net.bad_grad(h))

    for plant, phase, module in (FAULTS["exp_overflow"], FAULTS["nan_in_backward"], FAULTS["nan_weight"]):
        torch.manual_seed(0)
        model = Ckpt()
        tracer = gradguard.NanTracer(model)
        x = plant(model.net, torch.randn(B, D))
        model(x).sum().backward()
        origin = tracer.first_nonfinite()
        assert (origin.phase, origin.module) == (phase, "net." + module), str(origin)


def test_reset_and_remove():
    model, x, y = make()
    tracer = gradguard.NanTracer(model)
    step(model, plant_input(model, x), y)
    assert tracer.first_nonfinite().phase == "input"
    tracer.reset()
    model.zero_grad()
    step(model, x, y)
    assert tracer.first_nonfinite() is None
    tracer.remove()
    model.zero_grad()
    step(model, plant_input(model, x), y)
    assert tracer.first_nonfinite() is None  # nothing is recorded after remove()
    assert not model.embed._forward_hooks and not model.embed._forward_pre_hooks


def test_a_forward_that_raised_leaves_no_stale_frames():
    model, x, y = make()
    tracer = gradguard.NanTracer(model)
    with pytest.raises(RuntimeError):
        model(torch.randn(B, D + 1))  # shape error inside embed
    model(plant_input(model, x)).sum().backward()
    assert tracer.first_nonfinite().phase == "input"


def test_op_checker_ignores_uninitialized_outputs():
    """empty_like's output is whatever the memory held before (here, most likely, the NaN bits of
    a buffer just freed): never the culprit."""
    from gradguard._trace_ops import FirstNonfiniteOp

    n = 1 << 16
    x = torch.randn(n)
    checker = FirstNonfiniteOp()
    buf = torch.full((n,), math.nan)
    del buf
    with checker:
        e = torch.empty_like(x)
        out = torch.exp(x * 1e4)
    assert checker.found is not None and checker.found[0] == "aten.exp", (checker.found, bool(torch.isnan(e).any()))
    del e, out


def test_bad_arguments():
    with pytest.raises(TypeError, match="`model` must be an nn.Module"):
        gradguard.NanTracer(object())
    with pytest.raises(ValueError, match="`mode` must be one of"):
        gradguard.NanTracer(nn.Linear(2, 2), mode="sometimes")
    with pytest.raises(ValueError, match="`batch_dim` must be an int >= 0"):
        gradguard.NanTracer(nn.Linear(2, 2), batch_dim=-1)
    with pytest.raises(TypeError, match="`fn` must be callable"):
        gradguard.NanTracer(nn.Linear(2, 2), mode="on_failure").replay(3)
    with pytest.raises(TypeError, match="`tracer` must be a gradguard.NanTracer"):
        gradguard.GradGuard(torch.optim.SGD(nn.Linear(2, 2).parameters(), lr=0.1), tracer=object())


def test_on_failure_attaches_nothing_and_replays():
    model, x, y = make()
    tracer = gradguard.NanTracer(model, mode="on_failure")
    assert not model.embed._forward_hooks
    for fault in sorted(FAULTS):
        plant, phase, module = FAULTS[fault]
        model, x, y = make()
        tracer = gradguard.NanTracer(model, mode="on_failure")
        xb = plant(model, x)
        tracer.begin_step()
        loss = step(model, xb, y)
        grads = [p.grad.clone() for p in model.parameters()]
        origin = tracer.replay(lambda b: step(model, *b), (xb, y))
        assert (origin.phase, origin.module) == (phase, module), (fault, str(origin))
        assert origin.op is not None or fault == "nan_input"
        # The step's gradients are back, bit for bit, and no hook stays attached.
        for p, g in zip(model.parameters(), grads):
            assert torch.equal(p.grad.nan_to_num(), g.nan_to_num())
        assert not model.embed._forward_hooks
        assert tracer.first_nonfinite() == origin
        del loss
    # A fault in the backward: the replay knows its rows and the op.
    assert origin.rows is not None or fault != "nan_in_backward"


def test_replay_reproduces_dropout_and_restores_buffers():
    class Drop(nn.Module):
        def __init__(self):
            super().__init__()
            self.bn = nn.BatchNorm1d(D)
            self.drop = nn.Dropout(0.5)
            self.act = Scaled()

        def forward(self, x):
            return self.act(self.drop(self.bn(x)))

    torch.manual_seed(0)
    model = Drop()
    model.act.factor = 30.0  # overflows only where dropout kept a large value: mask-dependent rows
    tracer = gradguard.NanTracer(model, mode="on_failure")
    x = torch.randn(64, D) * 3
    tracer.begin_step()
    out = model(x)
    expected = reference_rows(out.detach())
    out.sum().backward()
    stats = (model.bn.running_mean.clone(), model.bn.running_var.clone(), model.bn.num_batches_tracked.clone())
    torch.manual_seed(123)
    after = torch.rand(3)
    torch.manual_seed(123)
    origin = tracer.replay(lambda b: model(b).sum(), x)
    assert expected and origin.rows == expected
    assert (origin.phase, origin.module, origin.op) == ("forward", "act", "aten.exp")
    for a, b in zip(stats, (model.bn.running_mean, model.bn.running_var, model.bn.num_batches_tracked)):
        assert torch.equal(a, b)
    assert torch.equal(torch.rand(3), after)  # the RNG continues where the user left it


def test_replay_loss_in_dict_and_object():
    model, x, y = make()
    tracer = gradguard.NanTracer(model, mode="on_failure")

    def lightning_style(batch):
        logits = model(batch[0])
        return {"loss": -torch.log(torch.softmax(logits, 1) * 0).mean()}

    origin = tracer.replay(lightning_style, (x, y))
    assert origin.phase == "loss" and origin.op == "aten.log"

    class Out:
        def __init__(self, loss):
            self.loss = loss

    origin = tracer.replay(lambda b: Out(model(b[0]).sum() * math.inf), (x, y))
    assert origin.phase == "loss"


def test_gradguard_resets_the_tracer_each_step():
    model, x, y = make()
    tracer = gradguard.NanTracer(model)
    opt = gradguard.GradGuard(torch.optim.SGD(model.parameters(), lr=0.01), model=model, tracer=tracer)
    xb = plant_input(model, x)
    step(model, xb, y)
    opt.step()
    assert bool(opt.last.skipped)
    origin = tracer.first_nonfinite()
    assert (origin.phase, origin.rows) == ("input", reference_rows(xb))
    opt.zero_grad()
    step(model, x, y)  # a good step: a fresh record
    assert tracer.first_nonfinite() is None
    opt.step()
    assert tracer.first_nonfinite() is None and not bool(opt.last.skipped)


def test_gradguard_on_failure_replays_the_skipped_step():
    """The plain-loop recipe: the guard skips, the tracer replays that batch with the RNG state
    the guard saved when the previous step ended."""

    class DropNet(Net):
        def __init__(self):
            super().__init__()
            self.drop = nn.Dropout(0.3)

        def forward(self, x):
            return super().forward(self.drop(x))

    torch.manual_seed(0)
    model = DropNet()
    tracer = gradguard.NanTracer(model, mode="on_failure")
    opt = gradguard.GradGuard(torch.optim.SGD(model.parameters(), lr=0.01), model=model, tracer=tracer)
    for i in range(3):
        x, y = torch.randn(B, D), torch.randint(0, 3, (B,))
        if i == 2:
            plant_weight(model, x)
        tracer.begin_step()
        step(model, x, y)
        opt.step()
        if bool(opt.last.skipped):
            origin = tracer.replay(lambda b: step(model, *b), (x, y))
            assert (origin.phase, origin.module) == ("forward", "blocks.1.fc")
        opt.zero_grad()
    assert opt.summary()["skipped"] == 1


def test_compiled_model_on_failure_replays_eagerly():
    """Inside a torch.compile'd region nothing is recorded (the hooks are no-ops there); the
    replay runs eagerly with dynamo disabled and attributes the fault."""
    model, x, y = make()
    plant_exp(model, x)
    compiled = torch.compile(model, backend="eager")
    tracer = gradguard.NanTracer(model)
    compiled(x).sum().backward()
    assert tracer.first_nonfinite() is None  # the compiled region recorded nothing
    origin = tracer.replay(lambda b: compiled(b).sum(), x)
    assert (origin.phase, origin.module) == ("forward", "blocks.0.act")


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU (not run on the development machine)")
def test_cuda_always_mode_good_step_never_syncs():
    torch.manual_seed(0)
    model = Net().cuda()
    tracer = gradguard.NanTracer(model)
    opt = gradguard.GradGuard(torch.optim.AdamW(model.parameters(), fused=True), model=model, tracer=tracer)
    x, y = torch.randn(B, D, device="cuda"), torch.randint(0, 3, (B,), device="cuda")
    for _ in range(2):  # warm-up (lazy inits may sync)
        torch.nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
        opt.zero_grad()
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for _ in range(3):
            torch.nn.functional.cross_entropy(model(x), y).backward()
            opt.step()
            opt.zero_grad()
    finally:
        torch.cuda.set_sync_debug_mode(0)
    assert tracer.first_nonfinite() is None


class _SqrtBetween(nn.Module):
    """The model's own code between two submodules makes a NaN in the backward only:
    sqrt(relu(h) * 0) is 0 forward, and its gradient at 0 is inf (times 0: NaN)."""

    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(4, 4), nn.Linear(4, 2)

    def forward(self, x):
        return self.b(torch.sqrt(torch.relu(self.a(x)) * 0))


def test_a_backward_nan_in_the_models_own_code_is_not_blamed_on_the_loss():
    """The model's name is "", as the loss's is: a gradient no module took, produced by a child of
    the model itself, was reported as "it came from the backward of the loss"."""
    torch.manual_seed(0)
    model = _SqrtBetween()
    tracer = gradguard.NanTracer(model)
    out = model(torch.randn(3, 4))
    out.register_hook(lambda g: seen.append(bool(torch.isfinite(g).all())))
    seen = []
    out.sum().backward()
    assert seen == [True]  # the loss's gradient is finite
    origin = tracer.first_nonfinite()
    assert (origin.phase, origin.module, origin.where, origin.submodule) == ("backward", "", "code gradient", "a")
    assert "backward of the code around the traced modules" in str(origin) and "loss" not in str(origin)
    tracer.remove()
    nested = nn.Sequential(_SqrtBetween())  # the same code one level down was always named
    tracer = gradguard.NanTracer(nested)
    nested(torch.randn(3, 4)).sum().backward()
    assert (tracer.first_nonfinite().module, tracer.first_nonfinite().where) == ("0", "gradient")


class _LearnedQueries(nn.Module):
    def __init__(self):
        super().__init__()
        self.queries = nn.Parameter(torch.randn(8, 16))  # a Parameter passed straight to a submodule
        self.proj = nn.Linear(16, 16)

    def forward(self, x):
        return self.proj(self.queries).mean() + x.sum()


@pytest.mark.parametrize("keep_tensors", [False, True])
def test_gradient_hooks_do_not_pile_up_or_keep_old_steps(keep_tensors):
    """A gradient hook on a Parameter outlives the step, and one on a tensor the record holds
    (keep_tensors) makes a cycle the collector cannot see: the hooks piled up one per step, stayed
    after remove(), and kept every step's record (with keep_tensors, its activations) alive."""
    import gc
    import weakref

    model = _LearnedQueries()
    tracer = gradguard.NanTracer(model, keep_tensors=keep_tensors)
    records = []
    for _ in range(5):
        tracer.reset()
        records.append(weakref.ref(tracer._rec))
        model(torch.randn(2, 3)).backward()
        assert len(model.queries._backward_hooks or {}) <= 1
    tracer.reset()
    gc.collect()
    assert not model.queries._backward_hooks
    assert not any(r() is not None for r in records)
    # Ended by a GradGuard (on_failure's replay too): the same.
    guard = gradguard.GradGuard(torch.optim.SGD(model.parameters(), lr=0.1), tracer=tracer)
    for _ in range(3):
        model(torch.randn(2, 3)).backward()
        guard.step()
        guard.zero_grad()
    assert not model.queries._backward_hooks
    model(torch.randn(2, 3)).backward()
    model.queries.grad[0, 0] = float("nan")
    tracer.replay(lambda: model(torch.randn(2, 3)))
    tracer.remove()
    assert not model.queries._backward_hooks


def test_a_non_leaf_tensor_that_outlives_the_step_gathers_no_hooks():
    """A tensor computed once and fed to every step (a context, a cached embedding): its gradient
    hook was not kept for removal, so it gathered one per step, each holding its step's record."""
    import gc
    import weakref

    w = nn.Parameter(torch.randn(2, 3))
    ctx = w * 2  # not a leaf; lives across steps
    model = nn.Linear(3, 1)
    tracer = gradguard.NanTracer(model)
    records = []
    for _ in range(5):
        tracer.reset()
        records.append(weakref.ref(tracer._rec))
        model(ctx).sum().backward(retain_graph=True)
    tracer.reset()
    gc.collect()
    assert not ctx._backward_hooks
    assert not any(r() is not None for r in records)


def test_inference_mode_forwards_are_not_traced_and_do_not_fail():
    """An evaluation loop under torch.inference_mode() crashed in the pre-hook: inference tensors
    have no version counter. Also an inference tensor fed to a no_grad forward."""
    model = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 1))
    tracer = gradguard.NanTracer(model)
    with torch.inference_mode():
        x = torch.randn(2, 3)
        assert model(x).shape == (2, 1)
    with torch.no_grad():
        assert model(x).shape == (2, 1)
    bad = x.clone()
    bad[1, 0] = float("nan")
    tracer.reset()
    with torch.no_grad():
        model(bad)  # an inference tensor, outside inference mode: still checked
    origin = tracer.first_nonfinite()
    assert (origin.phase, origin.rows) == ("input", [1])


class _Sqrt(nn.Module):
    def forward(self, x):
        return torch.sqrt(x)


def test_a_backward_inf_is_blamed_on_the_innermost_module_that_took_the_tensor():
    """With an input that requires grad, the model itself (named "", as the loss) was the first
    consumer: the Inf from sqrt's backward at 0 was blamed on "the backward of the loss"."""
    model = nn.Sequential(_Sqrt(), nn.Linear(2, 1))
    tracer = gradguard.NanTracer(model)
    x = torch.tensor([[0.0, 1.0], [4.0, 9.0]], requires_grad=True)
    model(x).sum().backward()
    origin = tracer.first_nonfinite()
    assert (origin.phase, origin.module, origin.where) == ("backward", "0", "gradient"), origin
    assert "loss" not in str(origin)


def test_a_sparse_activation_is_not_checked_and_does_not_fail():
    class ToSparse(nn.Module):
        def forward(self, x):
            return x.to_sparse()

    model = nn.Sequential(nn.Linear(3, 3), ToSparse())
    tracer = gradguard.NanTracer(model)
    out = model(torch.randn(2, 3))
    assert out.layout == torch.sparse_coo and tracer.first_nonfinite() is None


def test_a_forward_that_raised_leaves_no_frame_for_a_direct_submodule_call():
    """The stack was reset only by the next call of the whole model: a submodule called directly
    after a forward that raised was reported as code inside the dead call."""
    model = nn.Sequential(nn.Linear(4, 8), nn.Sequential(nn.ReLU(), nn.Linear(7, 2)))
    tracer = gradguard.NanTracer(model)
    with pytest.raises(RuntimeError):
        model(torch.randn(16, 4))  # 8 features into Linear(7, 2)
    assert tracer._stack == []
    tracer.reset()
    model[0](torch.full((2, 4), math.inf))
    assert tracer.first_nonfinite().phase == "input"


class _BNExp(nn.Module):
    """BatchNorm (training mode: running statistics updated per forward), then an overflow."""

    def __init__(self):
        super().__init__()
        self.bn = nn.BatchNorm1d(D)
        self.fc = nn.Linear(D, D)

    def forward(self, x):
        return torch.exp(1e4 * self.fc(self.bn(x)))


@pytest.mark.parametrize("keep", [False, True])
def test_asking_leaves_batchnorm_statistics_as_they_were(keep):
    # The op search re-runs the bad module on its inputs: in training mode that updated
    # BatchNorm's running statistics a second time (and again at every first_nonfinite(loss=)).
    torch.manual_seed(0)
    model = nn.Sequential(_BNExp(), nn.Linear(D, 1))
    tracer = gradguard.NanTracer(model, keep_tensors=keep)
    x = torch.randn(B, D)
    loss = model(x).sum()
    loss.backward()
    bn = model[0].bn
    before = [b.clone() for b in bn.buffers()]
    for _ in range(2):
        origin = tracer.first_nonfinite(loss=loss)
        assert origin.module == "0" and origin.op == "aten.exp"
        assert all(torch.equal(b, s) for b, s in zip(bn.buffers(), before))


class _SqrtGain(nn.Module):
    """A learnable gain x * sqrt(w) with w = 0: forward finite, w's gradient inf, x's finite."""

    def __init__(self):
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(D))

    def forward(self, x):
        return x * torch.sqrt(self.weight)


@pytest.mark.parametrize("named", [True, False])
@pytest.mark.parametrize("mode,zero_grad", [("zero", False), ("skip", True)])
def test_a_parameter_gradient_cleaned_since_the_step_is_still_named(mode, zero_grad, named):
    # The live .grad was read: "zero" mode had zeroed it, or zero_grad() had cleared it, and the
    # tracer said the step was clean while the guard had flagged it. Named by the tracer's own
    # module names, also when the guard has none (its report says "param[2]").
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(D, D), _SqrtGain())
    tracer = gradguard.NanTracer(model)
    opt = gradguard.GradGuard(torch.optim.SGD(model.parameters(), lr=0.1), model=model if named else None,
                              on_nonfinite=mode, tracer=tracer)
    model(torch.randn(B, D)).sum().backward()
    opt.step()
    if zero_grad:
        opt.zero_grad()
    assert opt.last.nonfinite_layers == ["1.weight" if named else "param[2]"]
    origin = tracer.first_nonfinite()
    assert origin is not None and origin.where == "parameter gradient"
    assert origin.tensor == "1.weight" and origin.module == "1" and origin.kind == "Inf"


def test_an_evaluation_forward_is_not_recorded():
    # model.eval() + torch.no_grad() (a validation batch with a NaN) between training steps: its
    # NaN was named as the origin of the next training step's overflow.
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(D, D), Scaled())
    tracer = gradguard.NanTracer(model)
    opt = gradguard.GradGuard(torch.optim.SGD(model.parameters(), lr=0.0), tracer=tracer)
    model(torch.randn(B, D)).sum().backward()
    opt.step()
    opt.zero_grad()
    model.eval()
    with torch.no_grad():
        bad = torch.randn(B, D)
        bad[5, 0] = math.nan
        model(bad)
    model.train()
    model[1].factor = 1e4
    model(torch.randn(B, D)).sum().backward()
    opt.step()
    origin = tracer.first_nonfinite()
    assert origin.phase == "forward" and origin.module == "1" and origin.where == "output"


class _Siblings(nn.Module):
    def __init__(self, bad_first):
        super().__init__()
        self.pre, self.a, self.b = nn.Linear(D, D), nn.Linear(D, D), _SqrtOfSquare()
        self.bad_first = bad_first
        with torch.no_grad():
            self.pre.weight[1].zero_()
            self.pre.bias[1] = 0.0

    def forward(self, x):
        h = self.pre(x)
        return self.b(h) + self.a(h) if self.bad_first else self.a(h) + self.b(h)


class _SqrtOfSquare(nn.Module):
    """Forward finite (sqrt(0) = 0), backward 0 * inf = NaN where the input is 0."""

    def forward(self, h):
        return torch.sqrt(h * h)


@pytest.mark.parametrize("bad_first", [True, False])
def test_siblings_that_took_the_same_tensor_are_all_named(bad_first):
    # The gradient hook sees only the sum of a's and b's contributions: naming whichever was
    # called first blamed `a` for b's NaN.
    torch.manual_seed(0)
    model = _Siblings(bad_first)
    tracer = gradguard.NanTracer(model)
    model(torch.randn(B, D)).sum().backward()
    origin = tracer.first_nonfinite()
    assert origin.phase == "backward" and sorted(origin.candidates) == ["a", "b"]
    assert "one of `b`, `a`" in str(origin) if bad_first else "one of `a`, `b`" in str(origin)


def test_a_parameter_of_another_optimizer_is_still_named():
    # The tracer ends its steps with one guard (a GAN's generator); the NaN is in a parameter
    # of the other optimizer's: its live gradient is the one to look at.
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(D, D), _SqrtGain())
    tracer = gradguard.NanTracer(model)
    first = gradguard.GradGuard(torch.optim.SGD(model[0].parameters(), lr=0.1), tracer=tracer)
    torch.optim.SGD(model[1].parameters(), lr=0.1)  # the other optimizer, not guarded here
    model(torch.randn(B, D)).sum().backward()
    first.step()
    origin = tracer.first_nonfinite()
    assert origin is not None and origin.tensor == "1.weight" and origin.where == "parameter gradient"


class _Student(nn.Module):
    def __init__(self):
        super().__init__()
        self.teacher, self.head = nn.Sequential(nn.Linear(D, D), Scaled()), nn.Linear(D, 1)

    def forward(self, x):
        with torch.no_grad():
            t = self.teacher(x)
        return self.head(x + t)


def test_a_frozen_teacher_called_under_no_grad_in_a_training_forward_is_traced():
    # The evaluation rule looked at each module's own mode: a teacher in eval() under no_grad
    # inside the training forward was not recorded, and its overflow was blamed on the code.
    torch.manual_seed(0)
    model = _Student()
    model.teacher.eval()
    model.teacher[1].factor = 1e4
    tracer = gradguard.NanTracer(model)
    model(torch.randn(B, D)).sum().backward()
    origin = tracer.first_nonfinite()
    assert origin.phase == "forward" and origin.module == "teacher.1" and origin.where == "output"


# ---- found by a review on 2026-12-06 ---------------------------------------------------------------

def test_a_replayed_step_answers_for_itself_only():
    # replay() left its record in place: the next step appended to it, and first_nonfinite() gave
    # the replay's cached answer for every later good step and for a new fault.
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3))
    for mode in ("always", "on_failure"):
        tracer = gradguard.NanTracer(model, mode=mode)
        opt = gradguard.GradGuard(torch.optim.SGD(model.parameters(), lr=0.0), model=model, tracer=tracer)

        def fwd_bwd(x, y):
            loss = nn.functional.cross_entropy(model(x), y)
            loss.backward()
            return loss

        y = torch.randint(0, 3, (8,))
        bad = torch.randn(8, 4)
        bad[6] = math.inf
        tracer.begin_step()
        fwd_bwd(bad, y)
        opt.step()
        first = tracer.replay(fwd_bwd, bad, y)
        assert first.phase == "input" and tracer.first_nonfinite() is first, mode
        opt.zero_grad()
        tracer.begin_step()
        fwd_bwd(torch.randn(8, 4), y)
        assert tracer.first_nonfinite() is None, mode  # mid-step
        opt.step()
        assert not opt.last.skipped and tracer.first_nonfinite() is None, mode
        opt.zero_grad()
        saved = model[2].weight[0, 0].item()
        with torch.no_grad():
            model[2].weight[0, 0] = math.nan  # a new fault: its own answer
        tracer.begin_step()
        fwd_bwd(torch.randn(8, 4), y)
        opt.step()
        got = tracer.first_nonfinite() if mode == "always" else tracer.replay(fwd_bwd, torch.randn(8, 4), y)
        assert opt.last.skipped and got.module == "2" and "weight" in str(got), (mode, str(got))
        with torch.no_grad():
            model[2].weight[0, 0] = saved
        opt.zero_grad()
        tracer.remove()


def test_attention_masks_are_not_faults():
    # A boolean padding mask (torch turns it into a -inf float mask for every layer) and a causal
    # float mask made every finite step of a TransformerEncoder report an Inf.
    torch.manual_seed(0)
    enc = nn.TransformerEncoder(nn.TransformerEncoderLayer(8, 2, 16, dropout=0.0, batch_first=True), 2,
                                enable_nested_tensor=False)
    tracer = gradguard.NanTracer(enc)
    opt = gradguard.GradGuard(torch.optim.SGD(enc.parameters(), lr=0.1), model=enc, tracer=tracer)
    x = torch.randn(2, 5, 8)
    pad = torch.tensor([[False] * 5, [False] * 3 + [True] * 2])
    causal = nn.Transformer.generate_square_subsequent_mask(5)
    for kw in ({"src_key_padding_mask": pad}, {"mask": causal, "is_causal": True}):
        enc(x, **kw).sum().backward()
        opt.step()
        assert not opt.last.skipped and tracer.first_nonfinite() is None, kw
        opt.zero_grad()
    # A NaN the model makes is still found.
    with torch.no_grad():
        enc.layers[1].linear1.bias[0] = math.nan
    enc(x, src_key_padding_mask=pad).sum().backward()
    opt.step()
    assert opt.last.skipped and "layers.1" in tracer.first_nonfinite().module


def test_nested_float8_and_functorch_tensors_are_not_checked():
    # Each crashed a forward that runs without the tracer: the nested tensors of a
    # TransformerEncoder's fast path (an eval() teacher with a padding mask), a float8 activation
    # (aminmax has no kernel for either), and torch.func's per-sample gradients (flags read after
    # the vmap had ended).
    from torch.func import functional_call, grad, vmap

    torch.manual_seed(0)

    class Student(nn.Module):
        def __init__(self):
            super().__init__()
            self.teacher = nn.TransformerEncoder(nn.TransformerEncoderLayer(8, 2, 16, batch_first=True), 2)
            self.head = nn.Linear(8, 1)

        def forward(self, x, pad):
            with torch.no_grad():
                t = self.teacher(x, src_key_padding_mask=pad)
            return self.head(x + t)

    m = Student()
    m.teacher.eval()
    tracer = gradguard.NanTracer(m)
    m(torch.randn(2, 5, 8), torch.tensor([[False] * 5, [False] * 3 + [True] * 2])).sum().backward()
    assert tracer.first_nonfinite() is None
    tracer.remove()

    class Q(nn.Module):
        def forward(self, x):
            return x.to(torch.float8_e4m3fn)  # an fp8 quantize step

    class DQ(nn.Module):
        def forward(self, x):
            return x.to(torch.float32)

    q = nn.Sequential(nn.Linear(4, 4), Q(), DQ(), nn.Linear(4, 1))
    tracer = gradguard.NanTracer(q)
    q(torch.randn(3, 4)).sum().backward()
    assert tracer.first_nonfinite() is None
    tracer.remove()

    s = nn.Sequential(nn.Linear(4, 4), nn.Tanh(), nn.Linear(4, 1))
    params = {k: v.detach() for k, v in s.named_parameters()}

    def loss(p, x):
        return functional_call(s, p, (x.unsqueeze(0),)).sum()

    x = torch.randn(5, 4)
    want = vmap(grad(loss), in_dims=(None, 0))(params, x)
    tracer = gradguard.NanTracer(s)
    got = vmap(grad(loss), in_dims=(None, 0))(params, x)
    assert all(torch.equal(got[k], want[k]) for k in want) and tracer.first_nonfinite() is None


def test_loss_is_judged_after_the_last_micro_batch_forward():
    # With gradient accumulation the loss's flag went in at the first micro-batch's backward: a
    # NaN made in the second micro-batch's forward was reported as the loss's.
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3))
    tracer = gradguard.NanTracer(model)
    y = torch.randint(0, 3, (8,))
    for i in range(2):
        if i == 1:
            with torch.no_grad():
                model[2].weight[1, 1] = math.nan
        loss = nn.functional.cross_entropy(model(torch.randn(8, 4)), y) / 2
        loss.backward()
    got = tracer.first_nonfinite(loss=loss)
    assert got.phase == "forward" and got.module == "2", str(got)
    # A loss made non-finite from finite outputs is still the loss's.
    tracer.reset()
    with torch.no_grad():
        model[2].weight[1, 1] = 0.0
    for i in range(2):
        out = model(torch.randn(8, 4))
        loss = out.sum() * (math.inf if i == 1 else 1.0)
        loss.backward()
    assert tracer.first_nonfinite(loss=loss).phase == "loss"


def test_sentences_name_the_root_and_the_other_consumers():
    # The root module's own output read "the output of ``"; a backward origin named in a child
    # listed its parent as "also went to" by position, and the named child itself where the
    # parent came first.
    from gradguard import Origin

    s = str(Origin(phase="forward", module="", where="output", call=1))
    assert "the output of the model itself" in s and "``" not in s
    s = str(Origin(phase="backward", module="1.fc", where="gradient", consumers=["1", "1.fc"]))
    assert s.endswith("appeared in the backward of `1.fc` (the tensor also went to `1`)"), s
    s = str(Origin(phase="backward", module="1.fc", where="gradient", consumers=["1.fc"]))
    assert "also went to" not in s


class _AttnThenExp(nn.Module):
    """Attention with a padding mask (whose -inf fill is on purpose), then an exp that can overflow."""

    def __init__(self):
        super().__init__()
        self.attn = nn.MultiheadAttention(16, 2, batch_first=True)
        self.act = Scaled()
        self.head = nn.Linear(16, 2)

    def forward(self, x, pad):
        return self.head(self.act(self.attn(x, x, x, key_padding_mask=pad, need_weights=False)[0]))


def test_the_op_checker_skips_an_attention_masks_minus_inf_fill():
    # The -inf that masked_fill_ puts into a padding mask was named as the first non-finite op
    # (and, for a NaN born in the backward, a forward op carrying it): an op asked for +-inf
    # makes nothing, nor do the ops that carry it along; the exp that overflows does.
    torch.manual_seed(0)
    model = _AttnThenExp()
    model.act.factor = 1e3
    x = torch.randn(2, 5, 16)
    pad = torch.zeros(2, 5, dtype=torch.bool)
    pad[1, 3:] = True
    tracer = gradguard.NanTracer(model, mode="on_failure")
    tracer.begin_step()
    origin = tracer.replay(lambda: model(x, pad).sum())
    assert (origin.module, origin.op, origin.op_module, origin.op_inputs_finite) == ("act", "aten.exp", "act", True)
    tracer.remove()
    tracer = gradguard.NanTracer(model, keep_tensors=True)
    model.zero_grad()
    model(x, pad).sum().backward()
    origin = tracer.first_nonfinite()
    assert (origin.module, origin.op) == ("act", "aten.exp"), str(origin)


def test_the_op_checker_names_a_softmax_over_a_fully_masked_row():
    # NaN made from -inf inputs without NaN (every key of a row masked: -inf - -inf): that op made it.
    from gradguard._trace_ops import FirstNonfiniteOp

    scores = torch.randn(2, 4)
    with FirstNonfiniteOp() as checker:  # the mask made in the checked code
        mask = torch.zeros(2, 4).masked_fill_(torch.tensor([[False] * 4, [True] * 4]), -math.inf)
        out = (scores + mask).softmax(-1)
    assert out[1].isnan().all() and checker.found[:2] == ("aten._softmax", False)
    with FirstNonfiniteOp() as checker:  # made before (a buffer, a module's argument in a replay)
        out = (scores + mask).softmax(-1)
    assert checker.found[:2] == ("aten._softmax", False)
    weight = torch.tensor([1.0, math.inf], requires_grad=True)
    with FirstNonfiniteOp() as checker:  # an Inf that came in (a weight: no mask): the first op holding one
        (weight * 2 - weight * 2).sum()
    assert checker.found[:2] == ("aten.mul", False)
    nan = torch.tensor([1.0, math.nan])
    with FirstNonfiniteOp() as checker:  # after a mask, a NaN that came in: the first op holding it
        (scores[0] + mask[0]).softmax(-1) * nan.sum()
    assert checker.found[:2] == ("aten.sum", False)
    with FirstNonfiniteOp() as checker:  # some keys of each row left: the softmax makes nothing
        part = torch.zeros(2, 4).masked_fill_(torch.tensor([[False, True, False, True]] * 2), -math.inf)
        out = (scores + part).softmax(-1)
    assert out.isfinite().all() and checker.found is None  # the mask's -inf, carried along, is nothing made


@pytest.mark.parametrize("guarded", [False, True])
def test_a_good_step_costs_first_nonfinite_two_reads(guarded, monkeypatch):
    # The flags' index, then the parameters' gradient counts in one read: every parameter's
    # gradient was read on its own (34 reads for this model's 34 parameters). After a GradGuard
    # step that guards every parameter, its found flag alone: one read.
    torch.manual_seed(0)
    model = nn.Sequential(*[nn.Sequential(nn.Linear(16, 16), nn.LayerNorm(16), nn.GELU()) for _ in range(8)],
                          nn.Linear(16, 4))
    tracer = gradguard.NanTracer(model)
    opt = gradguard.GradGuard(torch.optim.SGD(model.parameters(), lr=0.01), model=model, tracer=tracer)
    model(torch.randn(8, 16)).square().mean().backward()
    if guarded:
        opt.step()
    reads = []
    for name in ("item", "tolist", "__bool__", "__int__", "__float__", "__index__"):
        orig = getattr(torch.Tensor, name)
        monkeypatch.setattr(torch.Tensor, name,
                            lambda self, *a, _o=orig, _n=name, **k: reads.append(_n) or _o(self, *a, **k))
    assert tracer.first_nonfinite() is None
    monkeypatch.undo()
    assert len(reads) == (1 if guarded else 2), reads
    for p in model.parameters():  # and a NaN in a parameter's own gradient is still found
        p.grad = None
    model(torch.randn(8, 16)).square().mean().backward()
    model[3][0].bias.grad[2] = math.nan
    origin = tracer.first_nonfinite()
    assert (origin.where, origin.tensor, origin.kind) == ("parameter gradient", "3.0.bias", "NaN")


def test_a_model_output_that_a_module_also_took_names_the_loss_too():
    # A model returning (features, head(features)); the loss's backward on the features made
    # NaN (a pairwise distance's sqrt at 0). `head` alone was named, whose gradients are finite.
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.enc, self.head = nn.Linear(4, 8), nn.Linear(8, 3)

        def forward(self, x):
            feats = self.enc(x)
            return feats, self.head(feats)

    torch.manual_seed(0)
    model = Net()
    tracer = gradguard.NanTracer(model)
    feats, logits = model(torch.randn(8, 4))
    dist = (feats[:, None] - feats[None]).pow(2).sum(-1).sqrt()
    loss = nn.functional.cross_entropy(logits, torch.zeros(8, dtype=torch.long)) + dist.mean()
    loss.backward()
    origin = tracer.first_nonfinite(loss=loss)
    assert (origin.phase, origin.candidates, origin.loss_too) == ("backward", ["head"], True)
    assert "in the backward of one of `head`, the loss (each took the same tensor: a model output" in str(origin)


def test_the_root_module_is_named_in_words_in_every_list():
    class Sqrt(nn.Module):
        def forward(self, x):
            return x.sqrt()

    model = nn.Sequential(Sqrt(), nn.Linear(2, 1))
    tracer = gradguard.NanTracer(model)
    model(torch.tensor([[0.0, 1.0], [4.0, 9.0]], requires_grad=True)).sum().backward()
    text = str(tracer.first_nonfinite())
    assert "``" not in text and "(the tensor also went to the model itself)" in text, text


@pytest.mark.parametrize("mode", ["skip", "raise"])
def test_lbfgs_evaluations_inside_the_step_belong_to_that_step(mode):
    # GradGuard ended the tracer's step after the closure's first evaluation: LBFGS's later
    # evaluations went into the next step's record, whose first_nonfinite() then reported a
    # rolled-back evaluation's Inf for a finite step. A step that raises ends it too.
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 1))
    tracer = gradguard.NanTracer(model)
    opt = gradguard.GradGuard(torch.optim.LBFGS(model.parameters(), lr=1e30, max_iter=4), model=model, tracer=tracer,
                              on_nonfinite=mode)
    x, y = torch.randn(16, 4), torch.randn(16, 1)

    def closure():
        opt.zero_grad()
        loss = (model(x) - y).square().mean()
        loss.backward()
        return loss

    if mode == "raise":
        with pytest.raises(gradguard.NonFiniteGradError, match="evaluation 2 of the closure"):
            opt.step(closure)
        assert not tracer._rec.hooks  # the step ended: no hook left on this step's tensors
    else:
        opt.step(closure)  # the second evaluation overflows (lr 1e30): rolled back
        assert bool(opt.last.skipped)
    origin = tracer.first_nonfinite()
    assert origin is not None and origin.phase == "forward" and origin.call > 4  # a later evaluation's forward
    opt.param_groups[0].update(lr=1e-3, max_iter=1)
    opt.step(closure)
    assert not bool(opt.last.skipped) and tracer.first_nonfinite() is None


@pytest.mark.parametrize("inplace", [False, True])
def test_a_backward_nan_after_an_inplace_relu_names_the_module_after_it(inplace):
    # The tensor ReLU(inplace=True) changes kept the gradient hook placed before the change,
    # which sees the gradient of the value before the ReLU: "one of `1`, `2`" was named.
    torch.manual_seed(0)
    bad = BadGrad()
    bad.row = 3
    model = nn.Sequential(nn.Linear(4, 4), nn.ReLU(inplace=inplace), bad, nn.Linear(4, 2))
    tracer = gradguard.NanTracer(model)
    model(torch.randn(8, 4)).sum().backward()
    origin = tracer.first_nonfinite()
    assert (origin.phase, origin.module, origin.candidates) == ("backward", "2", []), str(origin)


def test_a_change_under_no_grad_keeps_the_tensors_gradient_site():
    # h.clamp_() under no_grad bumps h's version but not its node: one gradient, whose takers are
    # both named (split into two sites, one of them was lost from the list).
    class Twice(nn.Module):
        def forward(self, x):
            return x * 2

    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b, self.c = nn.Linear(4, 4), Twice(), BadGrad()
            self.c.row = 0

        def forward(self, x):
            h = self.a(x)
            y = self.b(h)
            with torch.no_grad():
                h.clamp_(-10, 10)
            return y + self.c(h)

    torch.manual_seed(0)
    model = M()
    tracer = gradguard.NanTracer(model)
    model(torch.randn(2, 4)).sum().backward()
    origin = tracer.first_nonfinite()
    assert origin.candidates == ["b", "c"], str(origin)


def test_lbfgs_zero_mode_names_a_first_evaluations_parameter_gradient():
    # The first evaluation's NaN, only in a parameter's gradient, zeroed in "zero" mode: the report
    # counted it; the tracer read the live (later, finite) gradients instead and answered None.
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 1))
    tracer = gradguard.NanTracer(model)
    opt = gradguard.GradGuard(torch.optim.LBFGS(model.parameters(), lr=0.1, max_iter=3), model=model, tracer=tracer,
                              on_nonfinite="zero")
    x, calls = torch.randn(8, 4), {"n": 0}

    def closure():
        opt.zero_grad()
        calls["n"] += 1
        loss = model(x).pow(2).mean()
        loss.backward()
        if calls["n"] == 1:
            with torch.no_grad():
                model[1].bias.grad.fill_(math.nan)
        return loss

    opt.step(closure)
    origin = tracer.first_nonfinite()
    assert origin is not None and (origin.where, origin.tensor) == ("parameter gradient", "1.bias")


def test_a_good_guarded_step_answers_none_whatever_a_module_masked():
    # Masked logits (masked_fill(-inf) before a cross-entropy): the loss and the gradients are
    # finite, the guard steps, and the output's deliberate -inf was every good step's answer.
    class Policy(nn.Module):
        def __init__(self):
            super().__init__()
            self.body = nn.Linear(D, 4)

        def forward(self, x, valid):
            return self.body(x).masked_fill(~valid, -math.inf)

    torch.manual_seed(0)
    model = Policy()
    tracer = gradguard.NanTracer(model)
    opt = gradguard.GradGuard(torch.optim.SGD(model.parameters(), lr=0.1), model=model, tracer=tracer)
    valid = torch.ones(B, 4, dtype=torch.bool)
    valid[:, 0] = False
    torch.nn.functional.cross_entropy(model(torch.randn(B, D), valid), torch.full((B,), 1)).backward()
    opt.step()
    assert not bool(opt.last.skipped) and tracer.first_nonfinite() is None
    # A guard of some of the parameters only says nothing of the others: the record answers.
    half = gradguard.GradGuard(torch.optim.SGD([model.body.bias], lr=0.1), tracer=tracer)
    torch.nn.functional.cross_entropy(model(torch.randn(B, D), valid), torch.full((B,), 1)).backward()
    half.step()
    assert tracer.first_nonfinite() is not None


def test_begin_step_per_micro_batch_keeps_the_steps_events():
    # begin_step() marks where a step starts for replay(); with gradient accumulation a loop (the
    # Lightning recipe: on_train_batch_start) calls it per micro-batch: the first micro-batch's
    # NaN is the step's answer. Without a guard, reset() starts the next step's record.
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(D, D), nn.ReLU(), nn.Linear(D, 1))
    tracer = gradguard.NanTracer(model)
    opt = gradguard.GradGuard(torch.optim.SGD(model.parameters(), lr=0.1), model=model, tracer=tracer)
    xs = []  # held: the rows of a batch are known while the caller holds it
    for micro in range(2):
        tracer.begin_step()
        xs.append(torch.randn(B, D))
        if micro == 0:
            xs[0][3, 1] = math.nan
        model(xs[-1]).sum().backward()
    opt.step()
    origin = tracer.first_nonfinite()
    assert bool(opt.last.skipped) and origin.phase == "input" and origin.rows == [3], origin
    bare = gradguard.NanTracer(nn.Sequential(nn.Linear(D, 1)))
    for step in range(3):
        bare.reset()
        bare.begin_step()
        x = torch.randn(B, D)
        if step == 0:
            x[2, 1] = math.nan
        bare.model(x).sum().backward()
        assert (bare.first_nonfinite() is not None) == (step == 0), step
        bare.model.zero_grad()


def test_a_finite_guarded_step_still_answers_for_a_no_grad_forward():
    # A no_grad forward in training mode (pseudo-labels, a target network) reaches no gradient:
    # the guard finds the step finite, but an Inf batch there poisons BatchNorm's statistics.
    # The guard's flag does not speak for it: the record answers.
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(D, D), nn.BatchNorm1d(D), nn.Linear(D, 1))
    tracer = gradguard.NanTracer(model)
    opt = gradguard.GradGuard(torch.optim.SGD(model.parameters(), lr=0.1), model=model, tracer=tracer)
    bad = torch.randn(B, D)
    bad[0, 0] = math.inf
    with torch.no_grad():
        model(bad)
    model(torch.randn(B, D)).square().mean().backward()
    opt.step()
    origin = tracer.first_nonfinite()
    assert not bool(opt.last.skipped) and origin is not None and origin.phase == "input", origin


def _on_failure_setup(model):
    """(model, an "on_failure" tracer, a guarded SGD, the step's forward and backward)."""
    tracer = gradguard.NanTracer(model, mode="on_failure")
    opt = gradguard.GradGuard(torch.optim.SGD(model.parameters(), lr=0.01), model=model, tracer=tracer)

    def fb(x):
        loss = model(x).square().mean()
        loss.backward()
        return loss

    return model, tracer, opt, fb


def test_a_replays_tensors_are_freed_at_the_next_step():
    # "on_failure": a replay's record holds what it traced (rows, op); it stayed alive through
    # every later good step, where nobody asks first_nonfinite() (36 MB on a 4-block MLP).
    import gc  # noqa: PLC0415
    import weakref  # noqa: PLC0415

    torch.manual_seed(0)
    model, tracer, opt, fb = _on_failure_setup(nn.Sequential(nn.Linear(D, D), nn.Linear(D, 1)))
    x = torch.randn(B, D)
    x[1, 0] = math.nan
    fb(x)
    opt.step()
    opt.zero_grad()
    assert tracer.replay(fb, x).phase == "input"
    held = weakref.ref(x)
    del x
    gc.collect()
    assert held() is not None  # the replay's answer holds for its step
    fb(torch.randn(B, D))
    opt.step()  # a good step: nobody asks
    gc.collect()
    assert held() is None


def test_a_replays_op_is_named_only_where_it_fits_the_origin():
    # A module that clamps a log's -inf away (finite output) and a later module with a NaN
    # backward: the answer read "the first non-finite gradient appeared in the backward of `bad`;
    # first non-finite op: aten.log in `sl`", an op in another module, in the forward.
    class BadBackward(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x):
            return x * 2

        @staticmethod
        def backward(ctx, g):
            return g * math.nan

    class ClampedLog(nn.Module):
        def forward(self, x):
            return torch.log(torch.relu(x)).clamp(min=-30.0)

    class Bad(nn.Module):
        def forward(self, x):
            return BadBackward.apply(x)

    torch.manual_seed(0)
    model, tracer, opt, fb = _on_failure_setup(
        nn.Sequential(nn.Linear(4, 4), ClampedLog(), nn.Linear(4, 4), Bad(), nn.Linear(4, 1)))
    x = torch.randn(B, 4)
    fb(x)
    opt.step()
    assert bool(opt.last.skipped)
    origin = tracer.replay(fb, x)
    assert origin.phase == "backward" and origin.module == "3" and origin.op is None, origin


@pytest.mark.parametrize("carried", [False, True])
def test_the_op_named_for_a_nan_made_the_nan(carried):
    # One module clamps a log's -inf away (or first carries it along an add), then makes its
    # NaN by 0 / 0: the op search named aten.log, the first op with a non-finite output from
    # finite inputs, for a NaN that aten.div made.
    class Mixed(nn.Module):
        def forward(self, x):
            lp = torch.log(torch.relu(x))
            if carried:
                lp = lp + 1.0
            z = x - x
            return lp.clamp(min=-30.0) + z / z

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(D, D), Mixed(), nn.Linear(D, 1))
    tracer = gradguard.NanTracer(model, keep_tensors=True)
    opt = gradguard.GradGuard(torch.optim.SGD(model.parameters(), lr=0.01), model=model, tracer=tracer)
    model(torch.randn(B, D)).mean().backward()
    opt.step()
    origin = tracer.first_nonfinite()
    assert origin.module == "1" and origin.kind == "NaN" and origin.op == "aten.div", origin
