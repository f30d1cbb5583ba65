"""GPU check: the full-MNIST pipeline with default params on CUDA, then the denoiser's speed on it.

    make gpu-check            # or: python benchmarks/gpu_check.py [--device cuda:0] [--out DIR]

Runs every stage through its `stages/<name>.py` entry (the commands dvc.yaml runs) with tracking
off, so it needs neither DVC nor MLflow: only PyTorch with CUDA and the four MNIST IDX files in
`data/raw/mnist`. Prints each stage's wall time, the total and the evaluation figures, then
training and sampling throughput in fp32 and bf16, and writes everything to `<out>/gpu_check.json`.
Outputs go to `<out>` (default `gpu_check/`), never over the pipeline's own.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))  # the package, also where it is not pip-installed


def stages(o: Path) -> list[tuple[str, list[str]]]:
    return [
        ("prepare", ["--out", f"{o}/prepared"]),
        ("train_ae", ["--data", f"{o}/prepared", "--out", f"{o}/autoencoder.pt", "--metrics", f"{o}/autoencoder.json",
                      "--plots", f"{o}/plots/autoencoder"]),
        ("encode", ["--data", f"{o}/prepared", "--ae-ckpt", f"{o}/autoencoder.pt", "--out", f"{o}/latents"]),
        ("train_diffusion", ["--ae-ckpt", f"{o}/autoencoder.pt", "--latents", f"{o}/latents", "--data",
                             f"{o}/prepared", "--out", f"{o}/diffusion.pt", "--metrics", f"{o}/diffusion.json",
                             "--plots", f"{o}/plots/diffusion"]),
        ("sample", ["--ckpt", f"{o}/diffusion.pt", "--ae-ckpt", f"{o}/autoencoder.pt", "--latents", f"{o}/latents",
                    "--out", f"{o}/samples.npz", "--plots", f"{o}/plots/sample", "--metrics", f"{o}/sample.json"]),
        ("train_evaluator", ["--data", f"{o}/prepared", "--out", f"{o}/evaluator.pt", "--metrics",
                             f"{o}/evaluator.json"]),
        ("evaluate", ["--samples", f"{o}/samples.npz", "--evaluator", f"{o}/evaluator.pt", "--data", f"{o}/prepared",
                      "--ae-ckpt", f"{o}/autoencoder.pt", "--latents", f"{o}/latents", "--output", f"{o}/eval.json",
                      "--plots", f"{o}/plots/evaluate"]),
    ]


def run_pipeline(out: Path, device: str) -> dict:
    env = {**os.environ, "MNIST_LDM_DEVICE": device, "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1",
           "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO / "src"), os.environ.get("PYTHONPATH")]))}
    common = ["--set", "tracking.enabled=false", "--set", "data.source=idx"]
    times = {}
    for name, args in stages(out):
        t0 = time.perf_counter()
        proc = subprocess.run([sys.executable, f"stages/{name}.py", *common, *args], cwd=REPO, env=env,
                              capture_output=True, text=True)
        times[name] = round(time.perf_counter() - t0, 1)
        tail = proc.stdout.strip().splitlines()[-1:] or proc.stderr.strip().splitlines()[-1:]
        print(f"{name:<16} {times[name]:7.1f} s  {tail[0] if tail else ''}", flush=True)
        if proc.returncode:
            print(proc.stderr[-4000:], file=sys.stderr)
            raise SystemExit(f"gpu check: stage {name} failed (exit {proc.returncode})")
    ev = json.loads((out / "eval.json").read_text())
    return {"stage_seconds": times, "total_seconds": round(sum(times.values()), 1), "fcd": ev["fcd"],
            "prdc": ev["prdc"], "evaluator_test_accuracy": ev.get("evaluator_test_accuracy")}


def timed(fn, repeats: int) -> float:
    fn()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(repeats):
        fn()
    torch.cuda.synchronize()
    return (time.perf_counter() - t0) / repeats


def speed(out: Path, device: str) -> dict:
    from mnist_ldm.runtime.device import runtime
    from mnist_ldm.diffusion.schedule import NoiseSchedule
    from mnist_ldm.diffusion.pipeline import LatentDiffusionPipeline
    from mnist_ldm.diffusion.train import diffusion_loss
    from mnist_ldm.runtime.loop import adam

    result = {"gpu": torch.cuda.get_device_name(), "torch": torch.__version__}
    for precision in ("fp32", "bf16"):
        rt = runtime(device, precision)
        pipe = LatentDiffusionPipeline.from_checkpoints(out / "diffusion.pt", out / "autoencoder.pt").to(rt)
        model = pipe.denoiser.train()
        opt, s = adam(model, 1e-4), NoiseSchedule.linear(1000, 1e-4, 2e-2).to(rt.device)
        gen = rt.generator(0)
        for batch in (128, 1024):
            z = torch.randn(batch, pipe.latent_dim, device=rt.device)

            def step():
                with rt.autocast():
                    loss = diffusion_loss(model, s, z, gen)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
            sec = timed(step, 200)
            result[f"train_{precision}_batch{batch}_samples_per_s"] = round(batch / sec)
        model.eval()
        for sampler, steps in (("ddpm", 1000), ("ddim", 50)):
            n = 10_000

            def sample():
                pipe.sample_latents(n, sampler=sampler, steps=steps, eta=0.0 if sampler == "ddim" else 1.0,
                                    batch_size=n, progress=False)
            sec = timed(sample, 1)
            result[f"sample_{precision}_{sampler}{steps}_10k_seconds"] = round(sec, 2)
            result[f"sample_{precision}_{sampler}{steps}_latent_steps_per_s"] = round(n * pipe.network_evals(sampler, steps) / sec)
        print(json.dumps({k: v for k, v in result.items() if precision in k}), flush=True)
    return result


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--out", type=Path, default=REPO / "gpu_check")
    ap.add_argument("--skip-pipeline", action="store_true", help="only the speed figures (needs an earlier run)")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit(f"gpu check: torch {torch.__version__} sees no CUDA device here; nothing to check")
    if not (REPO / "data/raw/mnist").is_dir():
        raise SystemExit("gpu check: put the four MNIST IDX files in data/raw/mnist first")
    args.out.mkdir(parents=True, exist_ok=True)
    report = {"date": time.strftime("%Y-%m-%d"), "device": torch.cuda.get_device_name()}
    if not args.skip_pipeline:
        report["pipeline"] = run_pipeline(args.out, args.device)
        print(json.dumps(report["pipeline"]), flush=True)
    report["speed"] = speed(args.out, args.device)
    (args.out / "gpu_check.json").write_text(json.dumps(report, indent=2) + "\n")
    print(f"gpu check: written {args.out / 'gpu_check.json'}")


if __name__ == "__main__":
    main()
