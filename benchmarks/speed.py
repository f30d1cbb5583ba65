"""How close the code runs to this machine's own limits: the fp32 and the bf16 matmul rates (2048x2048,
2 threads), measured first in the same run, against the training and sampling throughput of the
pipeline's networks at fp32 and, for the main figures, at bf16 autocast (`--precision bf16`), each also
as the fraction of both rates its matrix multiplies reach (multiply-adds of Linear and convolution layers
counted with forward hooks at the real shapes; a training step counted as 3 forward passes); the
pixel-space U-Net beside the latent MLP; and a profile of one latent DDPM sampling step at batch 2,500
that says where the time beyond the matrix multiplies goes; and the training speed-up of rows that share a
timestep (`diffusion.samples_per_timestep`). Every figure runs with glibc's malloc as the pipeline's commands
set it (`mnist_ldm.runtime.memory`); the conv autoencoder's training is also measured in a child process with glibc as
it comes, and the ratio printed. Last, the CPU time of opening a stage's MLflow run (`stage_run`: MLflow, its sqlite
store, DVC's view of the pipeline) with its set-up's objects kept out of the cyclic GC (`long_lived`) and without.

    python benchmarks/speed.py        # prints tables, writes benchmarks/results/speed.json (about 3 minutes)
    python benchmarks/speed.py --seconds 0.05 --only bf16 --no-save   # a quick run of the bf16 figures alone
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from mnist_ldm.autoencoder.model import Autoencoder, AutoencoderSpec
from mnist_ldm.runtime.device import autocast
from mnist_ldm.runtime.memory import cpu_has_native_bf16
from mnist_ldm.diffusion.denoiser import DenoiserSpec, LatentDenoiser, build_denoiser
from mnist_ldm.diffusion.schedule import NoiseSchedule, ddim_step, ddim_timesteps, ddpm_step, draw_timesteps
from mnist_ldm.runtime.memory import keep_freed_memory
from mnist_ldm.diffusion.train import diffusion_loss
from mnist_ldm.runtime.loop import adam

RESULTS = Path(__file__).resolve().parent / "results"
REPO = RESULTS.parents[1]
SECONDS = 3.0  # per figure, after a warm-up
THREADS = 2  # this machine's cores: every figure, the matmul rates included, runs on this many threads
CPU = torch.device("cpu")


def timed(fn, seconds: float = SECONDS) -> float:
    """Calls of `fn` per second over about `seconds`, after three warm-up calls."""
    for _ in range(3):
        fn()
    n, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        fn()
        n += 1
    return n / (time.perf_counter() - start)


def matmul_gflops(size: int = 2048, dtype: torch.dtype = torch.float32, seconds: float = SECONDS) -> float:
    a, b = torch.randn(size, size, dtype=dtype), torch.randn(size, size, dtype=dtype)
    return timed(lambda: a @ b, seconds) * 2 * size ** 3 / 1e9


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


def denoiser_training(model: nn.Module, batch: int, seconds: float = SECONDS, run: int = 1,
                      precision: str = "fp32", compiled: bool = False) -> tuple[float, float]:
    """(samples/s, FLOPs per sample) of full training steps: loss (under `precision`'s autocast, as the
    training loop runs it), backward, fused Adam; `run` rows share each timestep (`diffusion.samples_per_timestep`).
    `compiled`: the loss and its backward through `torch.compile` (inductor's fused CPU kernels; compiled once,
    before the timing)."""
    s, gen, opt = NoiseSchedule.linear(1000, 1e-4, 0.02), torch.Generator().manual_seed(0), adam(model, 2e-4)
    d = model.spec.latent_dim
    z = torch.randn(60_000 if d < 100 else 2_000, d)

    def loss_and_grads(z0: torch.Tensor) -> None:
        with autocast(CPU, precision):
            loss = diffusion_loss(model, s, z0, gen, run=run)
        loss.backward()

    fused = torch.compile(loss_and_grads) if compiled else loss_and_grads

    def step():
        opt.zero_grad(set_to_none=True)
        fused(z[torch.randint(0, len(z), (batch,), generator=gen)])
        opt.step()

    if compiled:
        step()  # compiles
    t = draw_timesteps(1000, batch, torch.Generator().manual_seed(0), "cpu", run)
    flops = 3 * forward_flops(model, torch.randn(batch, d), t, None, run) / batch
    return timed(step, seconds) * batch, flops


def denoiser_sampling(model: nn.Module, sampler: str, batch: int, seconds: float = SECONDS, precision: str = "fp32"):
    """(latents x steps per second, FLOPs per latent-step, the step) of the sampling loop at `batch` latents,
    the denoiser under `precision`'s autocast and the sampler's arithmetic in fp32, as the pipeline runs them."""
    s, gen = NoiseSchedule.linear(1000, 1e-4, 0.02), torch.Generator().manual_seed(0)
    ts = list(range(999, -1, -1)) if sampler == "ddpm" else ddim_timesteps(1000, 50)
    d = model.spec.latent_dim
    state = {"x": torch.randn(batch, d), "i": 0}
    model.eval()

    @torch.no_grad()
    def step():
        i, x = state["i"] % len(ts), state["x"]
        t = ts[i]
        with autocast(CPU, precision):
            eps = model(x, torch.full((batch,), t), None).float()
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


def autoencoder_training(kind: str, batch: int = 128, seconds: float = SECONDS,
                         precision: str = "fp32") -> tuple[float, float]:
    model = Autoencoder(AutoencoderSpec(kind=kind)).to(memory_format=torch.channels_last)  # as train_ae runs it
    opt, x = adam(model, 1e-3), torch.rand(batch, 1, 28, 28)

    def step():
        with autocast(CPU, precision):
            logits = model(x).float()
        loss = F.binary_cross_entropy_with_logits(logits, x)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    return timed(step, seconds) * batch, 3 * forward_flops(model, x) / batch


def autoencoder_rate_glibc_defaults(seconds: float) -> float:
    """The conv autoencoder's fp32 training images/s at batch 256, in a child process whose malloc is left as
    glibc sets it."""
    out = subprocess.run([sys.executable, __file__, "--glibc-defaults", "--seconds", str(seconds)],
                         capture_output=True, text=True, check=True)
    return float(out.stdout.split()[-1])


# a child process: `sample`'s MLflow run opened and closed; with "collected", `long_lived` does nothing
TRACKING_SETUP = """import contextlib, sys
import mnist_ldm.runtime.memory as memory
if sys.argv[1] == "collected":
    memory.long_lived = contextlib.contextmanager(lambda: (yield))
from mnist_ldm.config.params_file import load_params
from mnist_ldm.tracking.runs import stage_run
with stage_run("sample", load_params("params.yaml"), {}):
    pass
"""


def tracking_setup_cpu(runs: int = 5) -> dict:
    """CPU seconds (user + sys) of `TRACKING_SETUP` in this repository on a new sqlite store, after one run that
    creates the store: the mean of `runs` runs each way, alternating."""
    cpu: dict[str, list[float]] = {"long_lived": [], "collected": []}
    with tempfile.TemporaryDirectory() as tmp:
        env = {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{tmp}/mlflow.db", "OMP_NUM_THREADS": "1"}
        for mode in ["long_lived"] + [m for _ in range(runs) for m in cpu]:
            before = resource.getrusage(resource.RUSAGE_CHILDREN)
            subprocess.run([sys.executable, "-c", TRACKING_SETUP, mode], cwd=REPO, env=env, check=True,
                           capture_output=True)
            after = resource.getrusage(resource.RUSAGE_CHILDREN)
            cpu[mode].append(after.ru_utime + after.ru_stime - before.ru_utime - before.ru_stime)
    mean = {mode: sum(v[-runs:]) / runs for mode, v in cpu.items()}
    return {"cpu_s_long_lived": round(mean["long_lived"], 2), "cpu_s_gc_on": round(mean["collected"], 2),
            "ratio": round(mean["collected"] / mean["long_lived"], 2), "runs": runs}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seconds", type=float, default=SECONDS, help="timing per figure (default %(default)s)")
    ap.add_argument("--only", choices=("fp32", "bf16"), help="measure the figures of one precision alone")
    ap.add_argument("--no-save", action="store_true", help="print only; leave benchmarks/results/speed.json as it is")
    ap.add_argument("--glibc-defaults", action="store_true",
                    help="print the conv autoencoder's training images/s (batch 256) with glibc's malloc untouched")
    args = ap.parse_args()
    sec = args.seconds
    torch.set_num_threads(THREADS)
    if args.glibc_defaults:
        print(autoencoder_training("conv", 256, sec)[0])
        return
    keep_freed_memory()
    rates = {name: matmul_gflops(dtype=dtype, seconds=sec)
             for name, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16))}
    torch.manual_seed(0)
    den = LatentDenoiser(DenoiserSpec(16, 256, 4))
    rows = []
    wanted = [p for p in ("fp32", "bf16") if args.only in (None, p)]

    def add(name: str, unit: str, per_s: float, flops: float, precision: str = "fp32") -> None:
        achieved = per_s * flops / 1e9
        rows.append({"figure": name + (" [bf16]" if precision == "bf16" else ""), "precision": precision, "unit": unit,
                     "per_second": round(per_s, 1), "gflop_per_item": flops / 1e9, "gflops": round(achieved, 2),
                     "fraction_of_fp32_matmul": round(achieved / rates["fp32"], 3),
                     "fraction_of_bf16_matmul": round(achieved / rates["bf16"], 3)})

    profile = None
    if "fp32" in wanted:
        for batch in (128, 1024):
            add(f"denoiser training, batch {batch}", "samples/s", *denoiser_training(den, batch, sec))
    for precision in wanted:
        # the default batch, each row its own timestep against 8 rows per timestep (the default)
        for run in ((1, 8) if precision == "fp32" else (8,)):
            add(f"denoiser training, batch 256, {run}/timestep", "samples/s",
                *denoiser_training(den, 256, sec, run=run, precision=precision), precision)
        add("denoiser training, batch 256, 8/timestep, torch.compile", "samples/s",
            *denoiser_training(den, 256, sec, run=8, precision=precision, compiled=True), precision)
        for sampler in ("ddpm", "ddim"):
            per_s, flops, step_fn = denoiser_sampling(den, sampler, 2500, sec, precision)
            add(f"{sampler.upper()} sampling, batch 2500", "latents*steps/s", per_s, flops, precision)
            if sampler == "ddpm" and precision == "fp32":
                profile = sampling_profile(step_fn)
        for kind, batch in (("conv", 128), ("conv", 256), ("mlp", 128)):
            add(f"autoencoder ({kind}) training, batch {batch}", "images/s",
                *autoencoder_training(kind, batch, seconds=sec, precision=precision), precision)
    if "fp32" in wanted:
        unet = build_denoiser(DenoiserSpec(784, arch="unet"))  # pixel space, the reference design's ~150K U-Net
        add("pixel U-Net training, batch 128", "images/s", *denoiser_training(unet, 128, seconds=sec * 10 / 3))
        add("pixel U-Net DDPM sampling, batch 2500", "images*steps/s",
            *denoiser_sampling(unet, "ddpm", 2500, sec * 10 / 3)[:2])

    heap = None
    if "fp32" in wanted:
        untuned = autoencoder_rate_glibc_defaults(sec)
        tuned = autoencoder_training("conv", 256, seconds=sec)[0]  # measured again, next to the child's figure
        heap = {"images_per_s_glibc_defaults": round(untuned, 1), "images_per_s_kept_memory": round(tuned, 1),
                "ratio": round(tuned / untuned, 3)}

    setup = tracking_setup_cpu() if args.only is None else None

    native = "native" if cpu_has_native_bf16() else "no native bf16 units"
    print(f"matmul (2048x2048, {THREADS} threads): fp32 {rates['fp32']:.1f} GFLOP/s, bf16 {rates['bf16']:.1f} GFLOP/s "
          f"({native}) — the reference limits")
    print(f"{'figure':<45} {'throughput':>24} {'GFLOP/s':>9} {'of fp32':>8} {'of bf16':>8}")
    for r in rows:
        print(f"{r['figure']:<45} {r['per_second']:>12,.0f} {r['unit']:<11} {r['gflops']:>9.1f} "
              f"{r['fraction_of_fp32_matmul']:>8.0%} {r['fraction_of_bf16_matmul']:>8.0%}")
    per_s = {r["figure"]: r["per_second"] for r in rows}
    if "fp32" in wanted:
        shared = per_s["denoiser training, batch 256, 8/timestep"] / per_s["denoiser training, batch 256, 1/timestep"]
        print(f"\n8 rows per timestep against 1 (diffusion.samples_per_timestep, batch 256): {shared:.2f}x "
              f"the training samples/s")
    if len(wanted) == 2:
        print("\nbf16 autocast against fp32 (throughput):")
        for name in (r["figure"] for r in rows if r["precision"] == "bf16"):
            fp32_name = name.removesuffix(" [bf16]")
            print(f"  {fp32_name:<45} {per_s[name] / per_s[fp32_name]:.2f}x")
    if heap is not None:
        print(f"\nconv autoencoder training, batch 256, fp32: {heap['images_per_s_kept_memory']:,.0f} images/s with freed "
              f"memory kept (mnist_ldm.runtime.memory), {heap['images_per_s_glibc_defaults']:,.0f} with glibc's defaults: "
              f"{heap['ratio']:.2f}x")
    if setup is not None:
        print(f"\na stage's MLflow run opened and closed (stage_run, a child process, mean of {setup['runs']}): "
              f"{setup['cpu_s_long_lived']:.2f} CPU-s with its set-up kept out of the cyclic GC "
              f"(mnist_ldm.runtime.memory.long_lived), {setup['cpu_s_gc_on']:.2f} without: {setup['ratio']:.2f}x")
    if profile is not None:
        print("\none latent DDPM step at batch 2,500, by operator (torch.profiler, self CPU time):")
        for r in profile:
            print(f"  {r['op']:<32} {r['ms_per_step']:>7.2f} ms {r['share']:>6.1%}")
    if args.no_save:
        return
    RESULTS.mkdir(exist_ok=True)
    out = {"date": time.strftime("%Y-%m-%d"), "machine": platform.processor() or platform.machine(),
           "threads": THREADS, "torch": torch.__version__, "native_bf16": cpu_has_native_bf16(),
           "matmul_gflops": round(rates["fp32"], 1), "matmul_gflops_bf16": round(rates["bf16"], 1), "figures": rows,
           "ddpm_step_profile_batch2500": profile, "heap": heap,
           "tracking_setup": setup}
    (RESULTS / "speed.json").write_text(json.dumps(out, indent=2) + "\n")
    print(f"-> {RESULTS / 'speed.json'}")


if __name__ == "__main__":
    main()
