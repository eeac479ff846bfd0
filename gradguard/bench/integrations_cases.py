"""The guard's per-step overhead inside the Lightning Trainer and the Hugging Face Trainer, on a
~5M-parameter model (CPU). Issue target: within 5% of a bare run.

Each round runs one short training per variant, the variants in a new seeded order each round (so
load from other processes on a shared machine falls on all of them alike); a step's time is measured
by a callback from batch start to batch end (forward, backward, clip, optimizer step, the guard's
check and logging), the first steps of each run dropped as warm-up. A row is the median over rounds
of the per-round median step time; the target is checked on the median of per-round ratios.

Lightning: a 5-layer MLP (4.9M params) with AdamW; bare = no clipping, also bare with
``gradient_clip_val=1.0`` (Lightning's own clipping), guarded = ``GradGuardCallback(max_norm=1.0)``.
HF: a 6-layer GPT-2 (n_embd 256, 5.0M params) with Trainer's AdamW; bare = Trainer's default
(``max_grad_norm=1.0``: it clips every step), guarded = the same Trainer plus the callback.
Runs with one torch thread (see ``tables``). Skipped, with a message, when the packages are
missing.
"""
from __future__ import annotations

import importlib.util
import logging
import os
import statistics
import tempfile
import time
import warnings

import torch

from gradguard.bench.timing import Row, Table, round_orders

PL_BARE = "Lightning, bare (no clipping)"
PL_CLIP = "Lightning, bare + gradient_clip_val=1.0"
PL_GUARD = "Lightning + GradGuardCallback(max_norm=1.0)"
HF_BARE = "HF Trainer, bare (max_grad_norm=1.0)"
HF_GUARD = "HF Trainer + GradGuardCallback(max_norm=1.0)"


def _missing() -> list[str]:
    return [m for m in ("lightning", "transformers", "accelerate") if importlib.util.find_spec(m) is None]


def _rounds(variants: dict, rounds: int) -> dict[str, list[float]]:
    names = list(variants)
    out = {n: [] for n in names}
    for order in round_orders(names, rounds):
        for n in order:
            out[n].append(variants[n]())
    return out


def _table(title: str, per_round: dict, bare: str, guarded: str, extra: str) -> Table:
    rows = [Row(n, statistics.median(v)) for n, v in per_round.items()]
    t = Table(title, rows)
    t.check(f"{guarded} / {bare} (median of per-round ratios)",
            statistics.median(g / b for g, b in zip(per_round[guarded], per_round[bare])), "<=", 1.05)
    t.checks.append(extra)
    return t


# ---- Lightning -------------------------------------------------------------------------------

def _lightning_run(steps: int, warmup: int, guard: bool, clip: bool) -> float:
    import lightning.pytorch as pl

    from gradguard.integrations.lightning import GradGuardCallback

    class MLP(pl.LightningModule):
        def __init__(self):
            super().__init__()
            d = 1200
            self.net = torch.nn.Sequential(torch.nn.Linear(256, d), torch.nn.GELU(), torch.nn.Linear(d, d),
                                           torch.nn.GELU(), torch.nn.Linear(d, d), torch.nn.GELU(),
                                           torch.nn.Linear(d, d), torch.nn.GELU(), torch.nn.Linear(d, 256))

        def training_step(self, batch, batch_idx):
            x, = batch
            return torch.nn.functional.mse_loss(self.net(x), x)

        def configure_optimizers(self):
            return torch.optim.AdamW(self.parameters(), lr=1e-4)

    class Timer(pl.Callback):
        def __init__(self):
            self.times = []

        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            self.t0 = time.perf_counter()

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            self.times.append((time.perf_counter() - self.t0) * 1e3)

    torch.manual_seed(0)
    data = torch.utils.data.TensorDataset(torch.randn(32 * steps, 256))
    timer = Timer()
    callbacks = ([GradGuardCallback(max_norm=1.0)] if guard else []) + [timer]
    trainer = pl.Trainer(max_steps=steps, accelerator="cpu", logger=False, enable_progress_bar=False,
                         enable_checkpointing=False, enable_model_summary=False, callbacks=callbacks,
                         gradient_clip_val=1.0 if clip else None)
    trainer.fit(MLP(), torch.utils.data.DataLoader(data, batch_size=32))
    return statistics.median(timer.times[warmup:])


def lightning_table(rounds: int, steps: int, warmup: int) -> Table:
    per_round = _rounds({
        PL_BARE: lambda: _lightning_run(steps, warmup, guard=False, clip=False),
        PL_CLIP: lambda: _lightning_run(steps, warmup, guard=False, clip=True),
        PL_GUARD: lambda: _lightning_run(steps, warmup, guard=True, clip=False),
    }, rounds)
    clip_ratio = statistics.median(g / b for g, b in zip(per_round[PL_GUARD], per_round[PL_CLIP]))
    return _table(f"Lightning step, 4.9M-param MLP, AdamW, batch 32 ({rounds} rounds x {steps} steps)", per_round,
                  PL_BARE, PL_GUARD, f"(guarded / bare + Lightning's clipping = {clip_ratio:.2f}x)")


# ---- Hugging Face ----------------------------------------------------------------------------

GPT2_CONFIG = dict(n_layer=6, n_embd=256, n_head=4, vocab_size=1024, n_positions=64, bos_token_id=0, eos_token_id=0)


class _Tokens(torch.utils.data.Dataset):
    def __init__(self, n, vocab, seq):
        self.ids = torch.randint(0, vocab, (n, seq), generator=torch.Generator().manual_seed(0))

    def __len__(self):
        return len(self.ids)

    def __getitem__(self, i):
        return {"input_ids": self.ids[i], "labels": self.ids[i]}


def _hf_run(steps: int, warmup: int, guard: bool) -> float:
    import transformers

    from gradguard.integrations.transformers import GradGuardCallback

    class Timer(transformers.TrainerCallback):
        def __init__(self):
            self.times = []

        def on_step_begin(self, args, state, control, **kw):
            self.t0 = time.perf_counter()

        def on_step_end(self, args, state, control, **kw):
            self.times.append((time.perf_counter() - self.t0) * 1e3)

    torch.manual_seed(0)
    model = transformers.GPT2LMHeadModel(transformers.GPT2Config(**GPT2_CONFIG))
    timer = Timer()
    with tempfile.TemporaryDirectory() as out:
        args = transformers.TrainingArguments(output_dir=out, max_steps=steps, per_device_train_batch_size=8,
                                              logging_steps=10, report_to=[], use_cpu=True, save_strategy="no",
                                              disable_tqdm=True)
        callbacks = ([GradGuardCallback(max_norm=1.0)] if guard else []) + [timer]
        trainer = transformers.Trainer(model=model, args=args, train_dataset=_Tokens(8 * steps, 1024, 64),
                                       callbacks=callbacks)
        trainer.remove_callback(transformers.trainer_callback.PrinterCallback)  # its log lines, not timing
        trainer.train()
    return statistics.median(timer.times[warmup:])


def hf_table(rounds: int, steps: int, warmup: int) -> Table:
    per_round = _rounds({HF_BARE: lambda: _hf_run(steps, warmup, guard=False),
                         HF_GUARD: lambda: _hf_run(steps, warmup, guard=True)}, rounds)
    return _table(f"HF Trainer step, 6-layer GPT-2, n_embd 256, seq 64, batch 8 ({rounds} rounds x {steps} steps)",
                  per_round, HF_BARE, HF_GUARD, "(bare clips with torch clip_grad_norm_; guarded: the guard clips)")


def tables(device: str = "cpu", quick: bool = False) -> list[Table]:
    missing = _missing()
    if missing:
        print(f"[integrations] skipped: {', '.join(missing)} not installed "
              "(pip install -r requirements-integrations.txt)", flush=True)
        return []
    if device != "cpu":
        print("[integrations] runs on the CPU only; skipped for device", device, flush=True)
        return []
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    for name in ("lightning", "lightning.pytorch", "transformers", "accelerate"):
        logging.getLogger(name).setLevel(logging.ERROR)
    rounds, steps, warmup = (1, 5, 2) if quick else (7, 12, 3)
    threads = torch.get_num_threads()
    # One thread: on a shared, oversubscribed machine two OpenMP threads wait on each other and a
    # step's time swings by several x; one thread keeps the rounds comparable.
    torch.set_num_threads(1)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return [lightning_table(rounds, steps, warmup), hf_table(rounds, steps, warmup)]
    finally:
        torch.set_num_threads(threads)
