"""Benchmark cases for NanTracer (issue bar: CPU, a 6-layer transformer of ~10M parameters and a
ResNet-18 on 32x32 images, both in plain torch.nn).

Each case is one full training step (zero_grad, forward, loss, backward, AdamW step) on its own
copy of the same model, built from the same seed: the bare loop; the loop with a
``NanTracer(mode="always")`` (reset each step, never read on a good step); with
``mode="on_failure"`` (``begin_step()`` each step, nothing attached); and the same loop inside
``torch.autograd.detect_anomaly()`` for comparison. The cases run interleaved, one step each per
round in a new order each round (timing.round_orders), so that load from other processes falls on
all of them alike; the targets are checked on the median of per-round ratios to the bare loop.
"""
from __future__ import annotations

import copy
import statistics
import warnings

import torch
import torch.nn.functional as F
from torch import nn

import gradguard
from gradguard.bench.optim_cases import interleaved_times, ratio
from gradguard.bench.timing import Row, Table

BARE = "training step, no tracer"
ALWAYS = 'same + NanTracer(mode="always")'
ON_FAILURE = 'same + NanTracer(mode="on_failure")'
ANOMALY = "same inside torch.autograd.detect_anomaly()"


class Attention(nn.Module):
    def __init__(self, d, heads, dropout):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(d, 3 * d)
        self.proj = nn.Linear(d, d)
        self.drop = nn.Dropout(dropout)

    def forward(self, x):
        b, t, d = x.shape
        q, k, v = self.qkv(x).view(b, t, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.drop(self.proj(y.transpose(1, 2).reshape(b, t, d)))


class TransformerBlock(nn.Module):
    def __init__(self, d, heads, dropout):
        super().__init__()
        self.ln1, self.attn = nn.LayerNorm(d), Attention(d, heads, dropout)
        self.ln2 = nn.LayerNorm(d)
        self.mlp = nn.Sequential(nn.Linear(d, 4 * d), nn.GELU(), nn.Linear(4 * d, d), nn.Dropout(dropout))

    def forward(self, x):
        x = x + self.attn(self.ln1(x))
        return x + self.mlp(self.ln2(x))


class Transformer(nn.Module):
    def __init__(self, vocab=1024, d=384, layers=6, heads=6, seq=64, dropout=0.1):
        super().__init__()
        self.tok, self.pos = nn.Embedding(vocab, d), nn.Embedding(seq, d)
        self.blocks = nn.ModuleList([TransformerBlock(d, heads, dropout) for _ in range(layers)])
        self.ln = nn.LayerNorm(d)
        self.head = nn.Linear(d, vocab)

    def forward(self, idx):
        h = self.tok(idx) + self.pos(torch.arange(idx.shape[1], device=idx.device))
        for b in self.blocks:
            h = b(h)
        return self.head(self.ln(h))


class BasicBlock(nn.Module):
    def __init__(self, cin, cout, stride):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.relu = nn.ReLU()
        self.down = None
        if stride != 1 or cin != cout:
            self.down = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x):
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + (x if self.down is None else self.down(x)))


class ResNet18(nn.Module):
    """The CIFAR-style ResNet-18: a 3x3 stem, no max-pool, four stages of two basic blocks."""

    def __init__(self, classes=10, width=64):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, width, 3, 1, 1, bias=False), nn.BatchNorm2d(width), nn.ReLU())
        stages, cin = [], width
        for i, mult in enumerate((1, 2, 4, 8)):
            cout = width * mult
            stages.append(nn.Sequential(BasicBlock(cin, cout, 1 if i == 0 else 2), BasicBlock(cout, cout, 1)))
            cin = cout
        self.stages = nn.Sequential(*stages)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(cin, classes)

    def forward(self, x):
        return self.fc(self.pool(self.stages(self.stem(x))).flatten(1))


def _workloads(quick: bool):
    """(title, model, batch, loss) per model."""
    torch.manual_seed(0)
    if quick:
        tr = Transformer(vocab=128, d=64, layers=2, heads=2, seq=16)
        tokens = torch.randint(0, 128, (2, 16))
        rn = ResNet18(width=8)
        images, labels = torch.randn(2, 3, 32, 32), torch.randint(0, 10, (2,))
    else:
        tr = Transformer()
        tokens = torch.randint(0, 1024, (4, 64))
        rn = ResNet18()
        images, labels = torch.randn(8, 3, 32, 32), torch.randint(0, 10, (8,))

    def lm_loss(model, batch):
        logits = model(batch[:, :-1])
        return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), batch[:, 1:].reshape(-1))

    def cls_loss(model, batch):
        return F.cross_entropy(model(batch[0]), batch[1])

    # The titles from the workloads themselves (the quick run's are smaller).
    return [(f"{len(tr.blocks)}-layer transformer", tr, tokens, lm_loss,
             f"batch {tokens.shape[0]} x {tokens.shape[1]} tokens"),
            ("ResNet-18, 32x32", rn, (images, labels), cls_loss, f"batch {images.shape[0]}")]


def _cases(model, batch, loss_fn):
    """One step function per case, each on its own copy of the model and optimizer."""
    cases = {}
    for name in (BARE, ALWAYS, ON_FAILURE, ANOMALY):
        m = copy.deepcopy(model).train()
        opt = torch.optim.AdamW(m.parameters(), lr=1e-4)
        tracer = None
        if name == ALWAYS:
            tracer = gradguard.NanTracer(m, mode="always")
        elif name == ON_FAILURE:
            tracer = gradguard.NanTracer(m, mode="on_failure")

        def step(m=m, opt=opt, tracer=tracer, anomaly=name == ANOMALY, name=name):
            opt.zero_grad()
            if name == ALWAYS:
                tracer.reset()
            elif name == ON_FAILURE:
                tracer.begin_step()
            if anomaly:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    with torch.autograd.detect_anomaly():
                        loss_fn(m, batch).backward()
            else:
                loss_fn(m, batch).backward()
            opt.step()

        cases[name] = step
    return cases


def tables(device: str = "cpu", quick: bool = False) -> list[Table]:
    if device != "cpu":
        raise ValueError("gradguard.bench tracer: the tracer bench runs on the CPU (--device cpu)")
    repeats = 3 if quick else 11
    out = []
    for title, model, batch, loss_fn, shape in _workloads(quick):
        n = sum(p.numel() for p in model.parameters())
        cases = _cases(model, batch, loss_fn)
        times = interleaved_times(cases, device, repeats=repeats, warmup=1 if quick else 2)
        rows = [Row(name, statistics.median(times[name])) for name in cases]
        t = Table(f"NanTracer, {title} ({n / 1e6:.1f}M params, {shape}), forward+backward+AdamW step, "
                  f"{repeats} interleaved rounds", rows)
        t.check('"always" step / bare step (median of per-round ratios)', ratio(times, ALWAYS, BARE), "<=", 1.10)
        t.check('"on_failure" step / bare step', ratio(times, ON_FAILURE, BARE), "<=", 1.01)
        t.checks.append(f"(detect_anomaly step / bare step = {ratio(times, ANOMALY, BARE):.2f}x; "
                        f"detect_anomaly / \"always\" = {ratio(times, ANOMALY, ALWAYS):.2f}x)")
        out.append(t)
    return out
