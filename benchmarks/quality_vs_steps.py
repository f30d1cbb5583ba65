"""Quality vs cost, measured on one trained model in one run.

* FCD (vs the MNIST test set, at n = test-set size) and wall time for DDPM-1000 and DDIM-10/20/50/100,
  with EMA weights, plus raw weights for DDPM-1000 and DDIM-50.
* A class-conditional model (trained here with the same params and `diffusion.conditional=true`,
  unless --cond-ckpt is given): evaluator accuracy on the requested digit and FCD for guidance
  scales w = 0, 1, 2, 4.

Needs the pipeline's outputs (`dvc repro` first). Writes results/quality_vs_steps.{json,md} and PNG
plots, and logs them to MLflow (experiment `<tracking.experiment>-benchmarks`).

    python benchmarks/quality_vs_steps.py            # after `dvc repro` with full MNIST in data/raw/mnist
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from pathlib import Path

import torch

from mnist_ldm.evaluation import metrics

from mnist_ldm.io import plots
from mnist_ldm.io.atomic import write_json
from mnist_ldm.evaluator.model import features_and_probs, load_evaluator
from mnist_ldm.data.prepared import load_split
from mnist_ldm.config.params_file import load_params
from mnist_ldm.diffusion.pipeline import LatentDiffusionPipeline
from mnist_ldm.commands import train_diffusion
from mnist_ldm.runtime.command import command_parser, run_command

SAMPLERS = [("ddpm", 1000), ("ddim", 10), ("ddim", 20), ("ddim", 50), ("ddim", 100)]
RAW_WEIGHTS = [("ddpm", 1000), ("ddim", 50)]
GUIDANCE = [0.0, 1.0, 2.0, 4.0]


def run_config(ckpt, ae_ckpt, evaluator, f_test, n, sampler, steps, use_ema, seeds, labels=None, guidance=1.0):
    """One sampler setting, sampled once per seed: the FCD's mean and sample std over the seeds."""
    pipe = LatentDiffusionPipeline.from_checkpoints(ckpt, ae_ckpt, use_ema=use_ema)
    fcds, accs, seconds = [], [], []
    for seed in seeds:
        t0 = time.perf_counter()
        z, _ = pipe.sample_latents(n, sampler=sampler, steps=steps, eta=1.0 if sampler == "ddpm" else 0.0,
                                   guidance=guidance, labels=labels, seed=seed)
        images = pipe.decode(z)
        seconds.append(time.perf_counter() - t0)
        f_gen, p_gen = features_and_probs(evaluator, images)
        fcds.append(metrics.frechet_classifier_distance(f_gen, f_test))
        if labels is not None:
            accs.append(float((p_gen.argmax(1) == labels.numpy()).mean()))
    row = {"sampler": sampler, "steps": steps, "network_evals": pipe.network_evals(sampler, steps),
           "weights": "ema" if use_ema else "raw", "n": n, "seeds": list(seeds),
           "seconds": round(statistics.median(seconds), 2), "fcd": statistics.mean(fcds),
           "fcd_sd": statistics.stdev(fcds) if len(fcds) > 1 else 0.0, "fcd_each": fcds}
    if labels is not None:
        row.update(guidance=guidance, digit_accuracy=statistics.mean(accs))
    print(json.dumps(row))
    return row


def train_conditional(out: Path) -> Path:
    """A class-conditional model from the pipeline's own stage code, with tracking off."""
    code = run_command(command_parser(train_diffusion), [
        "--set", "diffusion.conditional=true", "--set", "tracking.enabled=false", "--ae-ckpt", "models/autoencoder.pt",
        "--latents", "data/latents", "--data", "data/prepared", "--out", str(out),
        "--metrics", str(out.with_suffix(".json")), "--plots", str(out.parent / "conditional_plots")])
    if code:
        raise SystemExit(code)
    return out


def charts(rows, cond_rows, out_dir: Path):
    plt = plots._figure()
    ema = [r for r in rows if r["weights"] == "ema"]
    fig, ax = plt.subplots(figsize=(6, 3.8))
    for sampler in ("ddim", "ddpm"):
        pts = [r for r in ema if r["sampler"] == sampler]
        ax.errorbar([r["network_evals"] for r in pts], [r["fcd"] for r in pts], yerr=[r["fcd_sd"] for r in pts],
                    fmt="o-" if sampler == "ddim" else "s", ms=6, capsize=3, label=f"{sampler.upper()} (EMA, ± sd)")
        for r in pts:
            ax.annotate(f"{r['seconds']:.0f}s", (r["network_evals"], r["fcd"]), textcoords="offset points",
                        xytext=(4, 4), fontsize=8)
    ax.set_xscale("log")
    ax.set_xlabel("network evaluations per sample (log)")
    ax.set_ylabel("FCD vs test (lower is better)")
    ax.set_title("quality vs sampling cost (labels: wall time)")
    ax.grid(alpha=0.3)
    ax.legend()
    plots.save_figure(fig, out_dir / "fcd_vs_steps.png")
    if cond_rows:
        fig, ax1 = plt.subplots(figsize=(6, 3.8))
        ws = [r["guidance"] for r in cond_rows]
        ax1.plot(ws, [100 * r["digit_accuracy"] for r in cond_rows], "o-", color="tab:green")
        ax1.set_xlabel("guidance scale w")
        ax1.set_ylabel("evaluator accuracy on requested digit (%)", color="tab:green")
        ax2 = ax1.twinx()
        ax2.plot(ws, [r["fcd"] for r in cond_rows], "s--", color="tab:red")
        ax2.set_ylabel("FCD", color="tab:red")
        ax1.set_title("classifier-free guidance sweep (DDIM-50)")
        ax1.grid(alpha=0.3)
        plots.save_figure(fig, out_dir / "guidance_sweep.png")


def markdown(rows, cond_rows, n, host) -> str:
    base = next(r for r in rows if r["sampler"] == "ddpm" and r["weights"] == "ema")
    lines = [f"n = {n} generated vs {n} test images; FCD mean ± sample std over sampling seeds "
             f"{base['seeds']} (wall time: median); {host}; {time.strftime('%Y-%m-%d')}", "",
             "| sampler | weights | network evals | wall time (s) | speed-up | FCD | FCD / FCD(DDPM-1000) |",
             "|---|---|---:|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['sampler'].upper()}-{r['network_evals']} | {r['weights']} | {r['network_evals']} | "
                     f"{r['seconds']:.1f} | {base['seconds'] / r['seconds']:.1f}x | {r['fcd']:.3f} ± {r['fcd_sd']:.3f} | "
                     f"{r['fcd'] / base['fcd']:.3f} |")
    if cond_rows:
        lines += ["", "| guidance w | accuracy on requested digit | FCD |", "|---:|---:|---:|"]
        for r in cond_rows:
            lines.append(f"| {r['guidance']:g} | {100 * r['digit_accuracy']:.2f}% | {r['fcd']:.3f} ± {r['fcd_sd']:.3f} |")
    return "\n".join(lines) + "\n"


def log_mlflow(params, result, out_dir: Path):
    try:
        import mlflow
        from mnist_ldm.tracking import repo_root, tracking_uri
    except ImportError:
        return
    mlflow.set_tracking_uri(tracking_uri(repo_root()))
    mlflow.set_experiment(params.tracking.experiment + "-benchmarks")
    with mlflow.start_run(run_name=f"quality-vs-steps-{time.strftime('%Y%m%d-%H%M')}"):
        for r in result["samplers"]:
            tag = f"{r['sampler']}{r['network_evals']}_{r['weights']}"
            mlflow.log_metrics({f"fcd_{tag}": r["fcd"], f"seconds_{tag}": r["seconds"]})
        for r in result["guidance"]:
            mlflow.log_metrics({"digit_accuracy": r["digit_accuracy"], "fcd_guided": r["fcd"]},
                               step=int(r["guidance"] * 10))
        for p in out_dir.glob("*.png"):
            mlflow.log_artifact(str(p))
        mlflow.log_artifact(str(out_dir / "quality_vs_steps.md"))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--ckpt", type=Path, default=Path("models/diffusion.pt"))
    ap.add_argument("--cond-ckpt", type=Path, default=None, help="conditional model (default: train one)")
    ap.add_argument("--n", type=int, default=0, help="images per set (default: test-set size)")
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    ap.add_argument("--skip-conditional", action="store_true")
    ap.add_argument("--seeds", type=int, default=3, help="sampling seeds per setting (mean ± std; default 3)")
    args = ap.parse_args()
    params = load_params("params.yaml")
    torch.manual_seed(0)
    ae = Path("models/autoencoder.pt")
    evaluator, _ = load_evaluator("models/evaluator.pt")
    test = load_split(Path("data/prepared"), "test")
    n = args.n or len(test.images)
    f_test, _ = features_and_probs(evaluator, test.images[:n])
    host = f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, torch {torch.__version__}"

    seeds = range(1, args.seeds + 1)
    rows = [run_config(args.ckpt, ae, evaluator, f_test, n, s, k, True, seeds) for s, k in SAMPLERS]
    rows += [run_config(args.ckpt, ae, evaluator, f_test, n, s, k, False, seeds) for s, k in RAW_WEIGHTS]
    cond_rows = []
    if not args.skip_conditional:
        cond = args.cond_ckpt or train_conditional(args.out / "diffusion_conditional.pt")
        labels = torch.arange(n) % 10
        cond_rows = [run_config(cond, ae, evaluator, f_test, n, "ddim", 50, True, seeds, labels, w) for w in GUIDANCE]
    args.out.mkdir(parents=True, exist_ok=True)
    result = {"n": n, "host": host, "date": time.strftime("%Y-%m-%d"), "samplers": rows, "guidance": cond_rows}
    write_json(args.out / "quality_vs_steps.json", result)
    (args.out / "quality_vs_steps.md").write_text(markdown(rows, cond_rows, n, host))
    charts(rows, cond_rows, args.out)
    log_mlflow(params, result, args.out)
    print(markdown(rows, cond_rows, n, host))


if __name__ == "__main__":
    main()
