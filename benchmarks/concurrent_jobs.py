"""Two CPU jobs on one machine (`dvc queue start -j 2`, or `infer` beside a stage): throughput of two
jobs side by side against one alone, with each job's thread pool sized to its share of the cores
(the default) and with every job taking the whole machine (the old behaviour, `MNIST_LDM_THREADS`
= all cores).

The work is what dominates the pipeline's CPU time: denoiser training steps (the default model,
batch 256) and DDPM sampling steps (batch 2,500). Each job runs the library's CPU runtime, so it
registers and re-checks its share exactly as a stage does.

    python benchmarks/concurrent_jobs.py            # prints a table, writes benchmarks/results/concurrent_jobs.json
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"
WORK = {"train": 300, "sample": 60}  # steps per job: about 10-20 s alone on 2 cores


def worker(work: str, steps: int) -> None:
    import torch

    from mnist_ldm.diffusion.denoiser import DenoiserSpec, LatentDenoiser
    from mnist_ldm.runtime.device import runtime
    from mnist_ldm.diffusion.schedule import NoiseSchedule, ddpm_step
    from mnist_ldm.diffusion.train import diffusion_loss
    from mnist_ldm.runtime.loop import adam

    rt = runtime("cpu")
    torch.manual_seed(0)
    model = LatentDenoiser(DenoiserSpec(16, 256, 4))
    s = NoiseSchedule.linear(1000, 1e-4, 0.02)
    gen = torch.Generator().manual_seed(0)
    if work == "train":
        opt, z = adam(model, 2e-4), torch.randn(60_000, 16)

        def step(i: int) -> None:
            loss = diffusion_loss(model, s, z[torch.randint(0, len(z), (256,), generator=gen)], gen)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
    else:
        model.eval()
        x = torch.randn(2500, 16)

        @torch.no_grad()
        def step(i: int) -> None:
            nonlocal x
            step_t = 999 - i % 1000
            eps = model(x, torch.full((len(x),), step_t), None)
            x = ddpm_step(s, eps, x, step_t, torch.randn(x.shape, generator=gen))

    threads = []
    start = time.perf_counter()
    for i in range(steps):
        rt.tick()
        step(i)
        threads.append(torch.get_num_threads())
    seconds = time.perf_counter() - start
    print(json.dumps({"steps": steps, "seconds": seconds, "threads_first": threads[0], "threads_last": threads[-1]}))


def run_jobs(work: str, jobs: int, env: dict, steps: int = 0) -> dict:
    """`jobs` workers of `steps` steps each (default WORK[work]) started together; throughput = all steps /
    wall time until the last one finishes."""
    steps = steps or WORK[work]
    start = time.perf_counter()
    procs = [subprocess.Popen([sys.executable, __file__, "--worker", work, str(steps)], env=env,
                              stdout=subprocess.PIPE, text=True) for _ in range(jobs)]
    outs = [json.loads(p.communicate()[0].strip().splitlines()[-1]) for p in procs]
    wall = time.perf_counter() - start
    assert all(p.returncode == 0 for p in procs)
    return {"jobs": jobs, "steps_per_job": steps, "wall_s": round(wall, 2), "steps_per_s": round(jobs * steps / wall, 2),
            "threads": [(o["threads_first"], o["threads_last"]) for o in outs]}


def main() -> None:
    cores = len(os.sched_getaffinity(0))
    base = {k: v for k, v in os.environ.items() if k not in ("OMP_NUM_THREADS", "MNIST_LDM_THREADS")}
    base["MNIST_LDM_JOBS_DIR"] = tempfile.mkdtemp(prefix="mnist-ldm-jobs-")  # no other job on the machine counts
    rows = {}
    for work in WORK:
        alone = run_jobs(work, 1, base)
        shared = run_jobs(work, 2, base)
        # full pools can run 10-20x slower (they spin against each other): a tenth of the steps, so that
        # `make bench` stays short; the figure is a rate either way
        greedy = run_jobs(work, 2, {**base, "MNIST_LDM_THREADS": str(cores)}, steps=WORK[work] // 10)
        rows[work] = {"alone": alone, "two_shared": shared, "two_full_pools": greedy,
                      "ratio_two_shared_to_alone": round(shared["steps_per_s"] / alone["steps_per_s"], 3),
                      "ratio_two_full_pools_to_alone": round(greedy["steps_per_s"] / alone["steps_per_s"], 3)}
    print(f"{cores} cores; steps/s of all jobs together (threads per job: first step -> last step)")
    print(f"{'work':<7} {'one alone':>18} {'two, shared cores':>24} {'two, full pools':>22}")
    for work, r in rows.items():
        cells = [f"{r[k]['steps_per_s']:.1f} {r[k]['threads']}" for k in ("alone", "two_shared", "two_full_pools")]
        print(f"{work:<7} {cells[0]:>18} {cells[1]:>24} {cells[2]:>22}   "
              f"ratios to alone: {r['ratio_two_shared_to_alone']:.2f} shared, {r['ratio_two_full_pools_to_alone']:.2f} full")
    RESULTS.mkdir(exist_ok=True)
    out = {"date": time.strftime("%Y-%m-%d"), "cores": cores, "steps_per_job": WORK, "results": rows}
    (RESULTS / "concurrent_jobs.json").write_text(json.dumps(out, indent=2) + "\n")
    print(f"-> {RESULTS / 'concurrent_jobs.json'}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--worker", nargs=2, metavar=("WORK", "STEPS"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(args.worker[0], int(args.worker[1]))
    else:
        main()
