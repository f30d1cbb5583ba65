"""How close the code runs to this machine's own limit: the fp32 matmul rate, measured first in the same
run, against the training and sampling throughput of the pipeline's networks, each also as the
fraction of that rate its matrix multiplies reach (multiply-adds of Linear and convolution layers
counted with forward hooks at the real shapes; a training step counted as 3 forward passes); the
pixel-space U-Net beside the latent MLP; and a profile of one latent DDPM sampling step at batch 2,500
that says where the time beyond the matrix multiplies goes; and the training speed-up of rows that share a
timestep (`diffusion.samples_per_timestep`).

    python benchmarks/speed.py        # prints tables, writes benchmarks/results/speed.json (about 2 minutes)
"""

from __future__ import annotations

import json
import platform
import time
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from mnist_ldm.autoencoder import Autoencoder, AutoencoderSpec
from mnist_ldm.denoiser import DenoiserSpec, LatentDenoiser, build_denoiser
from mnist_ldm.diffusion import NoiseSchedule, ddim_step, ddim_timesteps, ddpm_step, draw_timesteps
from mnist_ldm.training.denoiser import diffusion_loss
from mnist_ldm.training.loop import adam

RESULTS = Path(__file__).resolve().parent / "results"
SECONDS = 3.0  # per figure, after a warm-up


def timed(fn, seconds: float = SECONDS) -> float:
    """Calls of `fn` per second over about `seconds`, after three warm-up calls."""
    for _ in range(3):
        fn()
    n, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        fn()
        n += 1
    return n / (time.perf_counter() - start)


def matmul_gflops(size: int = 2048) -> float:
    a, b = torch.randn(size, size), torch.randn(size, size)
    return timed(lambda: a @ b) * 2 * size ** 3 / 1e9


def forward_flops(model: nn.Module, *inputs) -> float:
    """Multiply-add FLOPs (2 per MAC) of the Linear and convolution layers in one forward pass."""
    total = 0.0

    def hook(mod, inp, out):
        nonlocal total
        if isinstance(mod, nn.Linear):
            total += 2 * inp[0].numel() // mod.in_features * mod.in_features * mod.out_features
        elif isinstance(mod, nn.Conv2d):
            k = mod.kernel_size[0] * mod.kernel_size[1]
            total += 2 * out.numel() * mod.in_channels // mod.groups * k
        elif isinstance(mod, nn.ConvTranspose2d):
            k = mod.kernel_size[0] * mod.kernel_size[1]
            total += 2 * inp[0].numel() * mod.out_channels // mod.groups * k

    handles = [m.register_forward_hook(hook) for m in model.modules()
               if isinstance(m, (nn.Linear, nn.Conv2d, nn.ConvTranspose2d))]
    try:
        with torch.no_grad():
            model(*inputs)
    finally:
        for h in handles:
            h.remove()
    return total


def denoiser_training(model: nn.Module, batch: int, seconds: float = SECONDS, run: int = 1) -> tuple[float, float]:
    """(samples/s, FLOPs per sample) of full training steps: loss, backward, fused Adam; `run` rows share each
    timestep (`diffusion.samples_per_timestep`)."""
    s, gen, opt = NoiseSchedule.linear(1000, 1e-4, 0.02), torch.Generator().manual_seed(0), adam(model, 2e-4)
    d = model.spec.latent_dim
    z = torch.randn(60_000 if d < 100 else 2_000, d)

    def step():
        loss = diffusion_loss(model, s, z[torch.randint(0, len(z), (batch,), generator=gen)], gen, run=run)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    t = draw_timesteps(1000, batch, torch.Generator().manual_seed(0), "cpu", run)
    flops = 3 * forward_flops(model, torch.randn(batch, d), t, None, run) / batch
    return timed(step, seconds) * batch, flops


def denoiser_sampling(model: nn.Module, sampler: str, batch: int, seconds: float = SECONDS) -> tuple[float, float]:
    """(latents x steps per second, FLOPs per latent-step) of the sampling loop at `batch` latents."""
    s, gen = NoiseSchedule.linear(1000, 1e-4, 0.02), torch.Generator().manual_seed(0)
    ts = list(range(999, -1, -1)) if sampler == "ddpm" else ddim_timesteps(1000, 50)
    d = model.spec.latent_dim
    state = {"x": torch.randn(batch, d), "i": 0}
    model.eval()

    @torch.no_grad()
    def step():
        i, x = state["i"] % len(ts), state["x"]
        t = ts[i]
        eps = model(x, torch.full((batch,), t), None)
        if sampler == "ddpm":
            x = ddpm_step(s, eps, x, t, torch.randn(x.shape, generator=gen))
        else:
            t_prev = ts[i + 1] if i + 1 < len(ts) else -1
            x = ddim_step(s, eps, x, t, t_prev, 0.0, None)
        state["x"], state["i"] = x, i + 1

    flops = forward_flops(model, torch.randn(batch, d), torch.full((batch,), 500)) / batch
    return timed(step, seconds) * batch, flops, step


def sampling_profile(step, steps: int = 20, top: int = 8) -> list[dict]:
    """Self CPU time per operator over `steps` sampling steps: what the step spends beside its matmuls."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(steps):
            step()
    events = [e for e in prof.key_averages() if e.self_cpu_time_total > 0]
    total = sum(e.self_cpu_time_total for e in events)
    events.sort(key=lambda e: -e.self_cpu_time_total)
    rows = [{"op": e.key, "ms_per_step": e.self_cpu_time_total / 1e3 / steps, "share": e.self_cpu_time_total / total}
            for e in events[:top]]
    rest = total - sum(e.self_cpu_time_total for e in events[:top])
    return rows + [{"op": "(all other operators)", "ms_per_step": rest / 1e3 / steps, "share": rest / total}]


def autoencoder_training(kind: str, batch: int = 128) -> tuple[float, float]:
    model = Autoencoder(AutoencoderSpec(kind=kind))
    opt, x = adam(model, 1e-3), torch.rand(batch, 1, 28, 28)

    def step():
        loss = F.binary_cross_entropy_with_logits(model(x), x)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    return timed(step) * batch, 3 * forward_flops(model, x) / batch


def main() -> None:
    threads = torch.get_num_threads()
    rate = matmul_gflops()
    torch.manual_seed(0)
    den = LatentDenoiser(DenoiserSpec(16, 256, 4))
    rows = []

    def add(name: str, unit: str, per_s: float, flops: float) -> None:
        achieved = per_s * flops / 1e9
        rows.append({"figure": name, "unit": unit, "per_second": round(per_s, 1), "gflop_per_item": flops / 1e9,
                     "gflops": round(achieved, 2), "fraction_of_matmul_rate": round(achieved / rate, 3)})

    for batch in (128, 1024):
        add(f"denoiser training, batch {batch}", "samples/s", *denoiser_training(den, batch))
    for run in (1, 8):  # the default batch, each row its own timestep against 8 rows per timestep (the default)
        add(f"denoiser training, batch 256, {run}/timestep", "samples/s", *denoiser_training(den, 256, run=run))
    for sampler in ("ddpm", "ddim"):
        per_s, flops, ddpm_step_fn = denoiser_sampling(den, sampler, 2500)
        add(f"{sampler.upper()} sampling, batch 2500", "latents*steps/s", per_s, flops)
        if sampler == "ddpm":
            profile = sampling_profile(ddpm_step_fn)
    for kind in ("conv", "mlp"):
        add(f"autoencoder ({kind}) training, batch 128", "images/s", *autoencoder_training(kind))
    unet = build_denoiser(DenoiserSpec(784, arch="unet"))  # pixel space, the design's ~150K U-Net
    add("pixel U-Net training, batch 128", "images/s", *denoiser_training(unet, 128, seconds=10))
    add("pixel U-Net DDPM sampling, batch 2500", "images*steps/s", *denoiser_sampling(unet, "ddpm", 2500, 10)[:2])

    print(f"fp32 matmul (2048x2048, {threads} threads): {rate:.1f} GFLOP/s — the reference limit")
    print(f"{'figure':<38} {'throughput':>24} {'GFLOP/s':>9} {'of limit':>9}")
    for r in rows:
        print(f"{r['figure']:<38} {r['per_second']:>12,.0f} {r['unit']:<11} {r['gflops']:>9.1f} "
              f"{r['fraction_of_matmul_rate']:>8.0%}")
    shared = {r["figure"]: r["per_second"] for r in rows}
    print(f"\n8 rows per timestep against 1 (diffusion.samples_per_timestep, batch 256): "
          f"{shared['denoiser training, batch 256, 8/timestep'] / shared['denoiser training, batch 256, 1/timestep']:.2f}x "
          f"the training samples/s")
    print("\none latent DDPM step at batch 2,500, by operator (torch.profiler, self CPU time):")
    for r in profile:
        print(f"  {r['op']:<32} {r['ms_per_step']:>7.2f} ms {r['share']:>6.1%}")
    RESULTS.mkdir(exist_ok=True)
    out = {"date": time.strftime("%Y-%m-%d"), "machine": platform.processor() or platform.machine(),
           "threads": threads, "torch": torch.__version__, "matmul_gflops": round(rate, 1), "figures": rows,
           "ddpm_step_profile_batch2500": profile}
    (RESULTS / "speed.json").write_text(json.dumps(out, indent=2) + "\n")
    print(f"-> {RESULTS / 'speed.json'}")


if __name__ == "__main__":
    main()
