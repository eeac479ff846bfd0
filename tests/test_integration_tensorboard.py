"""gradguard.integrations.tensorboard: the step hook with a real SummaryWriter (events read back
with TensorBoard's own reader) and with a recording writer (what is read, and how often)."""
from __future__ import annotations

import math

import pytest
import torch

pytest.importorskip("tensorboard")
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator  # noqa: E402

from gradguard import GradGuard, StepReport  # noqa: E402
from gradguard.integrations.tensorboard import TensorBoardHook  # noqa: E402
from integration_fixtures import plant_nan, ref_clip_coef, ref_total_norm  # noqa: E402

pytestmark = pytest.mark.integrations


def train(hook, steps=6, bad=3, max_norm=1.0):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Tanh(), torch.nn.Linear(16, 1))
    guard = GradGuard(torch.optim.SGD(model.parameters(), lr=0.1), max_norm=max_norm, model=model)
    guard.add_step_hook(hook)
    refs, layer_refs = {}, {}
    for step in range(1, steps + 1):
        x = torch.randn(16, 8)
        torch.nn.functional.mse_loss(model(x), x[:, :1]).backward()
        if step == bad:
            plant_nan(model[2].weight.grad)
        refs[step] = ref_total_norm([p.grad for p in model.parameters()])
        layer_refs[step] = sorted(ref_total_norm([p.grad]) for p in model.parameters())
        guard.step()
        guard.zero_grad()
    return guard, refs, layer_refs


def test_summary_writer_events(tmp_path):
    hook = TensorBoardHook(str(tmp_path), histogram_every=2)
    guard, refs, layer_refs = train(hook)
    hook.writer.flush()
    acc = EventAccumulator(str(tmp_path), size_guidance={"scalars": 0, "histograms": 0, "tensors": 0})
    acc.Reload()
    scalars = {tag: {e.step: e.value for e in acc.Scalars(tag)} for tag in acc.Tags()["scalars"]}
    assert sorted(scalars["grad/skipped"]) == list(range(1, 7))
    for step in range(1, 7):
        assert scalars["grad/skipped"][step] == float(step == 3)
        if step == 3:
            assert math.isnan(scalars["grad/total_norm"][3]) and scalars["grad/clip_coef"][3] == 1.0
        else:
            assert scalars["grad/total_norm"][step] == pytest.approx(refs[step], rel=1e-6)
            assert scalars["grad/clip_coef"][step] == pytest.approx(ref_clip_coef(refs[step], 1.0), rel=1e-6)
            assert scalars["grad/clipped"][step] == float(refs[step] > 1.0)
    texts = acc.Tensors("grad/nonfinite_layers/text_summary")
    assert [(t.step, t.tensor_proto.string_val[0].decode()) for t in texts] == [(3, "2.weight")]
    hists = {h.step: h.histogram_value for h in acc.Histograms("grad/layer_norms")}
    assert sorted(hists) == [2, 4, 6]
    for step, h in hists.items():
        assert h.num == 4
        assert h.min == pytest.approx(layer_refs[step][0], rel=1e-6)
        assert h.max == pytest.approx(layer_refs[step][-1], rel=1e-6)


class Recorder:
    def __init__(self):
        self.calls = []

    def add_scalar(self, tag, value, step):
        self.calls.append(("scalar", tag, value, step))

    def add_text(self, tag, text, step):
        self.calls.append(("text", tag, text, step))

    def add_histogram(self, tag, values, step):
        self.calls.append(("histogram", tag, values.tolist(), step))


def test_one_report_read_per_logged_step(monkeypatch):
    reads = []
    fetch = StepReport._fetch

    def counted(self):
        if self._host is None:
            reads.append(self.step)
        return fetch(self)

    monkeypatch.setattr(StepReport, "_fetch", counted)
    rec = Recorder()
    hook = TensorBoardHook(rec, every=2, histogram_every=4)
    train(hook, steps=8, bad=5)
    # Only logged steps are read, each once; the bad step 5 is not logged but counted.
    assert reads == [2, 4, 6, 8]
    totals = {step: value for kind, tag, value, step in rec.calls if tag == "grad/skipped_total"}
    assert totals == {2: 0.0, 4: 0.0, 6: 1.0, 8: 1.0}
    assert [step for kind, tag, _, step in rec.calls if kind == "histogram"] == [4, 8]
    assert not [c for c in rec.calls if c[0] == "text"]


def test_histograms_are_not_lost_when_every_does_not_divide_histogram_every():
    # every=3, histogram_every=2 wrote histograms only at multiples of both (6, 12): the first
    # logged step at or after each multiple of histogram_every writes one.
    rec = Recorder()
    train(TensorBoardHook(rec, every=3, histogram_every=2), steps=12, bad=0)
    assert [step for kind, _, _, step in rec.calls if kind == "histogram"] == [3, 6, 9, 12]
    rec = Recorder()
    hook = TensorBoardHook(rec, every=2, histogram_every=5)
    train(hook, steps=12, bad=0)
    assert [step for kind, _, _, step in rec.calls if kind == "histogram"] == [6, 10]
    rec.calls.clear()
    train(hook, steps=12, bad=0)  # the same hook on a fresh guard
    assert [step for kind, _, _, step in rec.calls if kind == "histogram"] == [6, 10]


def test_step_fn_and_prefix():
    rec = Recorder()
    train(TensorBoardHook(rec, prefix="guard/", step_fn=lambda r: 100 + r.step), steps=3, bad=2)
    assert ("text", "guard/nonfinite_layers", "2.weight", 102) in rec.calls
    assert {c[3] for c in rec.calls} == {101, 102, 103}


def test_lightning_step_fn_aligns_the_hook_with_the_callback(tmp_path):
    # The hook writes at the guard's 1-based step count, the Lightning callback at Lightning's
    # 0-based step: a NaN showed at step 4 under hook/ and step 3 under grad/. The README's
    # step_fn (Lightning's global_step, read while the guarded step runs) puts both at one step.
    pl = pytest.importorskip("lightning.pytorch")
    from lightning.pytorch.loggers import TensorBoardLogger

    from gradguard.integrations.lightning import GradGuardCallback

    class Tiny(pl.LightningModule):
        def __init__(self):
            super().__init__()
            self.net = torch.nn.Linear(8, 1)

        def training_step(self, batch, batch_idx):
            return torch.nn.functional.mse_loss(self.net(batch[0]), batch[1])

        def on_before_optimizer_step(self, optimizer):
            if self.trainer.global_step == 3:
                plant_nan(self.net.weight.grad)

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.1)

    class AddHook(pl.Callback):
        def on_train_start(self, trainer, pl_module):
            guard_cb.guard.add_step_hook(TensorBoardHook(trainer.logger.experiment, prefix="hook/",
                                                         step_fn=lambda report: trainer.global_step))

    torch.manual_seed(0)
    x = torch.randn(48, 8)
    data = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, x[:, :1]), batch_size=8)
    guard_cb = GradGuardCallback(max_norm=1.0)
    trainer = pl.Trainer(max_steps=6, callbacks=[guard_cb, AddHook()], accelerator="cpu", log_every_n_steps=1,
                         logger=TensorBoardLogger(str(tmp_path)), enable_progress_bar=False,
                         enable_model_summary=False, enable_checkpointing=False)
    trainer.fit(Tiny(), data)
    acc = EventAccumulator(trainer.logger.log_dir, size_guidance={"scalars": 0, "tensors": 0})
    acc.Reload()
    hook = {e.step: e.value for e in acc.Scalars("hook/skipped")}
    callback = {e.step: e.value for e in acc.Scalars("grad/skipped")}
    assert hook == callback and sorted(hook) == list(range(6)) and hook[3] == 1.0
    texts = {tag: [t.step for t in acc.Tensors(tag)] for tag in acc.Tags()["tensors"]}
    assert texts == {"hook/nonfinite_layers/text_summary": [3], "grad/nonfinite_layers/text_summary": [3]}


def test_bad_arguments():
    with pytest.raises(TypeError, match="`writer`"):
        TensorBoardHook(42)
    with pytest.raises(TypeError, match="`step_fn`"):
        TensorBoardHook(Recorder(), step_fn=3)
    with pytest.raises(ValueError, match="`every`"):
        TensorBoardHook(Recorder(), every=0)
    with pytest.raises(ValueError, match="`histogram_every`"):
        TensorBoardHook(Recorder(), histogram_every=1.5)
