"""Training-hygiene warnings: forgotten zero_grad, eval mode; and silence under accumulation."""
from __future__ import annotations

import warnings

import pytest
import torch

from gradguard import GradGuard, HygieneWarning
from optim_util import TinyNet


def _setup(**kw):
    torch.manual_seed(0)
    model = TinyNet()
    return model, GradGuard(torch.optim.SGD(model.parameters(), lr=0.01), model=model, **kw)


def _backward(model, seed=0):
    gen = torch.Generator().manual_seed(seed)
    model(torch.randn(4, 8, generator=gen)).pow(2).mean().backward()


def _hygiene_warnings(fn):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        fn()
    return [w for w in caught if issubclass(w.category, HygieneWarning)]


def test_step_twice_without_zero_grad_warns_once_naming_zero_grad():
    model, opt = _setup()

    def loop():
        for i in range(4):
            _backward(model, i)
            opt.step()  # never cleared

    caught = _hygiene_warnings(loop)
    assert len(caught) == 1
    assert issubclass(caught[0].category, UserWarning)
    assert "zero_grad()" in str(caught[0].message) and "step() was called twice" in str(caught[0].message)
    assert caught[0].filename == __file__  # points at the user's step() call


def test_step_twice_with_no_backward_in_between_warns():
    model, opt = _setup()
    _backward(model)

    def twice():
        opt.step()
        opt.step()

    assert len(_hygiene_warnings(twice)) == 1


@pytest.mark.parametrize("clear", ["opt", "opt_in_place", "model", "model_in_place", "set_none", "inner"])
@pytest.mark.parametrize("micro_batches", [1, 4])
def test_no_warning_when_cleared_between_steps(clear, micro_batches):
    model, opt = _setup()

    def loop():
        for step in range(3):
            for k in range(micro_batches):  # gradient accumulation
                _backward(model, 10 * step + k)
            opt.step()
            if clear == "opt":
                opt.zero_grad()
            elif clear == "opt_in_place":
                opt.zero_grad(set_to_none=False)
            elif clear == "model":
                model.zero_grad()
            elif clear == "model_in_place":
                model.zero_grad(set_to_none=False)
            elif clear == "set_none":
                for p in model.parameters():
                    p.grad = None
            else:
                opt.optimizer.zero_grad()

    assert _hygiene_warnings(loop) == []


def test_no_warning_for_a_head_cleared_in_place_that_a_step_did_not_reach():
    # opt.zero_grad(set_to_none=False) every step, and task B's batches only every other step:
    # its head's gradients were zeroed with no backward after, which moves each version by one,
    # as a backward without a clear does; the check warned "this step used the sum of both steps'
    # gradients" over gradients that were exactly 0. The guard's own zero_grad() now says so.
    torch.manual_seed(0)
    trunk, head_a, head_b = torch.nn.Linear(8, 8), torch.nn.Linear(8, 1), torch.nn.Linear(8, 1)
    opt_main = GradGuard(torch.optim.SGD([*trunk.parameters(), *head_a.parameters()], lr=0.01))
    opt_b = GradGuard(torch.optim.SGD(head_b.parameters(), lr=0.01))

    def loop():
        for i in range(4):
            opt_main.zero_grad(set_to_none=False)
            opt_b.zero_grad(set_to_none=False)
            h = trunk(torch.randn(4, 8))
            loss = head_a(h).pow(2).mean() + (head_b(h).pow(2).mean() if i % 2 == 0 else 0.0)
            loss.backward()
            opt_main.step()
            opt_b.step()

    assert _hygiene_warnings(loop) == []
    # Forgetting it is still caught, after a step that did clear.
    _backward_b = lambda: head_b(trunk(torch.randn(4, 8))).pow(2).mean().backward()  # noqa: E731

    def forgot():
        for _ in range(2):
            _backward_b()
            opt_b.step()

    assert len(_hygiene_warnings(forgot)) == 1


def test_eval_mode_warns_once_and_only_with_model():
    model, opt = _setup()
    model.eval()

    def loop():
        for i in range(3):
            _backward(model, i)
            opt.step()
            opt.zero_grad()

    caught = _hygiene_warnings(loop)
    assert len(caught) == 1 and "eval()" in str(caught[0].message)
    model.train()
    _, unnamed = _setup()
    bare = GradGuard(torch.optim.SGD(model.parameters(), lr=0.01))
    model.eval()

    def loop_without_model():
        _backward(model)
        bare.step()
        bare.zero_grad()

    assert _hygiene_warnings(loop_without_model) == []


def test_warnings_are_silenceable():
    model, opt = _setup(hygiene=False)

    def loop():
        model.eval()
        for i in range(3):
            _backward(model, i)
            opt.step()

    assert _hygiene_warnings(loop) == []
    model, opt = _setup()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        warnings.filterwarnings("ignore", category=HygieneWarning)
        loop()
    assert not [w for w in caught if issubclass(w.category, HygieneWarning)]


def test_a_step_without_gradients_does_not_use_up_the_eval_warning():
    # A step with no gradient at all has nothing to check (README); it warned about eval() mode
    # anyway, and the once-only warning was then spent before the first real step.
    model, opt = _setup()
    model.eval()
    assert _hygiene_warnings(opt.step) == []
    _backward(model)
    caught = _hygiene_warnings(opt.step)
    assert len(caught) == 1 and "eval()" in str(caught[0].message)


class _SparseEmbedding(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = torch.nn.Embedding(10, 4, sparse=True)
        self.lin = torch.nn.Linear(4, 1)

    def forward(self, i):
        return self.lin(self.emb(i))


@pytest.mark.parametrize("mode", ["skip", "zero"])
@pytest.mark.parametrize("clear", [False, True])
def test_a_sparse_gradient_is_watched_too(mode, clear):
    # The end of a step remembered the view of a sparse gradient's values that the scaling takes,
    # which never matched the next step's gradient: a forgotten zero_grad() went unwarned.
    torch.manual_seed(0)
    model = _SparseEmbedding()
    opt = GradGuard(torch.optim.SGD(model.parameters(), lr=0.01), model=model, on_nonfinite=mode)
    idx = torch.tensor([1, 2, 3, 2])

    def run():
        for _ in range(3):
            if clear:
                opt.zero_grad()
            model(idx).sum().backward()
            opt.step()

    got = _hygiene_warnings(run)
    assert len(got) == (0 if clear else 1), [str(w.message) for w in got]


def test_a_step_that_raises_keeps_no_gradient_alive():
    import gc
    import math
    import weakref

    import gradguard

    p = torch.nn.Parameter(torch.ones(4))
    opt = GradGuard(torch.optim.SGD([p], lr=0.1), on_nonfinite="raise")
    p.grad = torch.full((4,), math.nan)
    ref = weakref.ref(p.grad)
    with pytest.raises(gradguard.NonFiniteGradError):
        opt.step()
    opt.zero_grad()
    gc.collect()
    assert ref() is None  # the hygiene check's list of the step's gradients went with the step
