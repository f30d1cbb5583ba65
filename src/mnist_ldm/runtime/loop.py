"""The deterministic, resumable minibatch loop of the three trainings, and the EMA of weights.

Epoch e's data order is a permutation drawn from its own generator seeded with (seed, e); all other randomness
comes from one `torch.Generator` saved with the model, optimizer and EMA every `checkpoint_every` steps. A run
killed at any point and started again ends with exactly the weights of an uninterrupted one (same CPU, threads).
"""

from __future__ import annotations

import copy
import math
import sys
from pathlib import Path
from typing import Callable, Optional

import torch
import torch.nn as nn

from mnist_ldm.io.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from mnist_ldm.io.errors import UserError
from mnist_ldm.io.hashing import json_digest
from mnist_ldm.runtime.device import CPU, Runtime
from mnist_ldm.runtime.progress import progress

EPOCH_TEST_ITEMS = 2000  # held-out items behind the per-epoch curves (the final figures use the whole test split)
DIVERGED = 1000.0  # a training loss this many times its first value has run away: the stage stops


def fingerprint(*parts) -> str:
    """A short hash of everything a training run depends on; a resume state is used only if it matches."""
    return json_digest(parts, 16)


def adam(model: nn.Module, lr: float) -> torch.optim.Optimizer:
    """Adam with the fused kernel: one pass over all parameters, about 20% faster steps on CPU here."""
    return torch.optim.Adam(model.parameters(), lr=lr, fused=True)


def lr_factor(step: int, total: int, schedule: str = "constant", warmup_steps: int = 0) -> float:
    """The base learning rate's multiplier at step `step` of `total`: a linear warm-up from 1/warmup_steps to 1,
    then constant, or a cosine decay to 0 after the last step."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    if schedule == "constant":
        return 1.0
    return 0.5 * (1.0 + math.cos(math.pi * (step - warmup_steps) / max(1, total - warmup_steps)))


def total_steps(n_items: int, batch_size: int, epochs: int) -> int:
    """Optimizer steps of a run: every epoch ends with a last, possibly smaller, batch."""
    return math.ceil(n_items / batch_size) * epochs


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


class EMA:
    """Exponential moving average of parameters. The averaging horizon 1 / (1 - d) grows linearly from 1 (a copy)
    at the first update to 1 / (1 - decay) at `warmup_steps`, and never exceeds `max_horizon` updates, so a short
    run's average is not dominated by its first, untrained weights."""

    def __init__(self, model: nn.Module, decay: float, warmup_steps: int, max_horizon: float = math.inf):
        self.model = copy.deepcopy(model).eval().requires_grad_(False)
        self.decay, self.warmup_steps, self.updates = decay, warmup_steps, 0
        self.max_horizon = max(1.0, max_horizon)

    def current_decay(self) -> float:
        horizon = 1.0 / (1.0 - self.decay)
        if self.warmup_steps and self.updates < self.warmup_steps:
            horizon = 1.0 + (horizon - 1.0) * self.updates / self.warmup_steps
        elif horizon <= self.max_horizon:
            return self.decay
        return 1.0 - 1.0 / min(horizon, self.max_horizon)

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        d = self.current_decay()
        torch._foreach_lerp_(list(self.model.parameters()), [p.detach() for p in model.parameters()], 1.0 - d)
        self.updates += 1

    def state_dict(self) -> dict:
        return {"weights": self.model.state_dict(), "updates": self.updates}

    def load_state_dict(self, state: dict) -> None:
        self.model.load_state_dict(state["weights"])
        self.updates = int(state["updates"])


def run_training(*, model: nn.Module, optimizer: torch.optim.Optimizer,
                 loss_fn: Callable[[torch.Tensor, torch.Generator], torch.Tensor], n_items: int, batch_size: int,
                 epochs: int, seed: int, resume_path: Path, checkpoint_every: int, run_fingerprint: str,
                 on_epoch_end: Callable[[int, float], dict], ema: Optional[EMA] = None, lr_schedule: str = "constant",
                 warmup_steps: int = 0, desc: str = "train", rt: Runtime = CPU) -> list[dict]:
    """Train and return the per-epoch history (each epoch's metrics, with what `on_epoch_end(epoch, mean train
    loss)` adds); `loss_fn(global batch indices, generator)` is the mean loss over this rank's shard of the batch.

    Under torchrun every rank walks the same seeded order and draws the same random numbers, and DDP averages the
    gradients, so the params mean the same at any number of processes. Only rank 0 writes the resume state, which
    a run at another precision does not take up; a finished run leaves none behind."""
    if n_items == 0:
        raise UserError(f"{desc}: no training items (check the data and params such as diffusion.only_digit)")
    if rt.dist.world > batch_size:
        raise UserError(f"{desc}: batch_size {batch_size} is smaller than the {rt.dist.world} processes; "
                        f"the global batch is split between them")
    steps_per_epoch = total_steps(n_items, batch_size, 1)
    total = steps_per_epoch * epochs
    if rt.precision != "fp32":  # a resume state saved at another precision does not match
        run_fingerprint = fingerprint(run_fingerprint, rt.precision)
    gen = rt.generator(seed)
    base_lrs = [g["lr"] for g in optimizer.param_groups]  # before a resume overwrites them with the last step's
    step, epoch_loss_sum, history = _resume(resume_path, run_fingerprint, model, optimizer, ema, gen, desc)
    check_every = 1 if rt.device.type == "cpu" else 50  # reading the loss is a host sync on an accelerator
    # the epoch's loss so far, summed over this rank's items (a resumed partial sum, global, lives on rank 0)
    loss_sum = torch.tensor(epoch_loss_sum if rt.dist.main else 0.0, dtype=torch.float64, device=rt.device)

    bar = progress(total=total, initial=step, desc=desc, unit="step", disable=not rt.dist.main)
    first = None  # the first loss this run checks: one DIVERGED times as large stops it
    order_epoch, order = -1, None
    try:  # close the bar before any error is printed, so the error stays the last line
        while step < total:
            epoch, i = divmod(step, steps_per_epoch)
            if epoch != order_epoch:  # this epoch's data order, from (seed, epoch) alone, the same on any device
                order = torch.randperm(n_items, generator=torch.Generator().manual_seed(seed * 100_003 + epoch))
                order, order_epoch = order.to(rt.device), epoch
            idx = order[i * batch_size:(i + 1) * batch_size]
            rt.tick()
            model.train()
            with rt.autocast():
                loss = loss_fn(idx, gen)
            last_step = i + 1 == steps_per_epoch
            if step % check_every == 0 or last_step:
                value = loss.item()
                first = first if first is not None else abs(value)
                if not value <= DIVERGED * max(first, 1e-12):  # NaN, or a loss that ran away
                    last = f"{resume_path} (left as it was)" if resume_path.exists() else "none written yet"
                    grew = f", over {DIVERGED:g}x its first {first:.4g} (a lower lr may help)" \
                        if math.isfinite(value) else ""
                    raise UserError(f"{desc}: loss became {value:.4g} at step {step + 1} (epoch {epoch + 1}){grew}; "
                                    f"training stopped; last good checkpoint: {last}")
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            factor = lr_factor(step, total, lr_schedule, warmup_steps)
            for group, base in zip(optimizer.param_groups, base_lrs):
                group["lr"] = base * factor
            optimizer.step()
            if ema is not None:
                ema.update(model)
            step += 1
            loss_sum += loss.detach().double() * len(rt.dist.shard(idx))
            bar.update(1)
            if step % check_every == 0:
                bar.set_postfix(epoch=f"{epoch + 1}/{epochs}", loss=f"{loss.item():.4f}", refresh=False)
            if last_step:
                metrics = {"epoch": epoch + 1, "train_loss": rt.all_sum(loss_sum).item() / n_items,
                           "lr": optimizer.param_groups[0]["lr"]}  # the rate of the epoch's last step
                metrics.update(on_epoch_end(epoch + 1, metrics["train_loss"]))
                history.append(metrics)
                loss_sum.zero_()
            if step % checkpoint_every == 0 and step < total:
                epoch_loss_sum = rt.all_sum(loss_sum.clone()).item()  # every rank takes part
                if rt.dist.main:
                    save_checkpoint(resume_path, "mnist-ldm/resume", {
                        "fingerprint": run_fingerprint, "model": model.state_dict(),
                        "optimizer": optimizer.state_dict(), "ema": ema.state_dict() if ema is not None else None,
                        "generator": gen.get_state(), "generator_device": gen.device.type,
                        "torch_rng": torch.get_rng_state(), "step": step, "epoch_loss_sum": epoch_loss_sum,
                        "history": history})
    finally:
        bar.close()
    return history


def _resume(path: Path, fp: str, model, optimizer, ema, gen, desc: str) -> tuple[int, float, list]:
    """(step, the epoch's loss so far, history) of the resume state at `path`, loaded into the model, optimizer,
    EMA and generators when it belongs to this run; else (0, 0.0, [])."""
    if not path.exists():
        return 0, 0.0, []
    try:
        ckpt = load_checkpoint(path, "mnist-ldm/resume", "resume state")
    except CheckpointError as e:
        print(f"warning: {desc}: ignoring unusable resume state: {e}", file=sys.stderr)
        return 0, 0.0, []
    saved_on = ckpt.get("generator_device", "cpu")
    why = (f"was saved on {saved_on}, this run uses {gen.device.type}" if saved_on != gen.device.type
           else "was saved for other params or data" if ckpt["fingerprint"] != fp else None)
    if why:
        print(f"{desc}: {path} {why}; starting from scratch", file=sys.stderr)
        return 0, 0.0, []
    model.load_state_dict(ckpt["model"])
    optimizer.load_state_dict(ckpt["optimizer"])
    if ema is not None:
        ema.load_state_dict(ckpt["ema"])
    gen.set_state(ckpt["generator"])
    torch.set_rng_state(ckpt["torch_rng"])
    print(f"{desc}: resuming from {path} at step {int(ckpt['step'])}", file=sys.stderr)
    return int(ckpt["step"]), float(ckpt["epoch_loss_sum"]), list(ckpt["history"])


def resume_path_for(out: Path) -> Path:
    """Where the resume state of the stage writing `out` lives: beside it, git-ignored, never a DVC output."""
    return out.with_name(out.stem + ".resume.pt")
