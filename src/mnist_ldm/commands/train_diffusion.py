"""Stage `train_diffusion`: the latent DDPM on standardized cached latents, saved as a self-describing checkpoint."""

from __future__ import annotations

import argparse

from mnist_ldm.io.atomic import atomic_dir
from mnist_ldm.config.sections import Params
from mnist_ldm.data.prepared import load_meta
from mnist_ldm.io.errors import UserError
from mnist_ldm.io.paths import check_paths
from mnist_ldm.runtime.command import PRECISION_TAG, add_param_flags, add_paths, publish, runtime_for, writes_outputs

HELP = "train the latent denoiser"


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_paths(p, curves=True, ae_ckpt="autoencoder checkpoint (sets the latent size)",
              latents="latent cache written by 'encode'", data="prepared data folder (for meta.json)",
              out="checkpoint to write", metrics="metrics JSON to write", plots="folder for the PNG pictures")
    add_param_flags(p, **{k: f"diffusion.{k}" for k in ("epochs", "batch_size", "lr", "T", "only_digit", "hidden_dim",
                                                          "conditional", "generate_images")})
    p.add_argument("--latent-dim", type=int,
                   help="checked against the autoencoder checkpoint, which sets the latent size")


def run(params: Params, args: argparse.Namespace) -> dict:
    import torch
    from mnist_ldm.io import plots
    from mnist_ldm import tracking
    from mnist_ldm.autoencoder.model import load_autoencoder
    from mnist_ldm.io.checkpoint import save_checkpoint
    from mnist_ldm.io.hashing import file_md5
    from mnist_ldm.data.latents import LatentScaler, check_producer, load_latents
    from mnist_ldm.diffusion.pipeline import LatentDiffusionPipeline
    from mnist_ldm.diffusion.train import held_out_loss, select_digit, train_denoiser
    from mnist_ldm.runtime.loop import count_parameters, resume_path_for

    cfg = params.diffusion
    check_paths(args, {"ae_ckpt": "a file", "latents": "a folder", "data": "a folder"},
                ["out", "metrics", "curves"], ["plots"])
    rt = runtime_for(args)
    ae, _ = load_autoencoder(args.ae_ckpt)
    if args.latent_dim is not None and args.latent_dim != ae.spec.latent_dim:
        raise UserError(f"--latent-dim {args.latent_dim} does not match the {ae.spec.latent_dim}-d latents of the "
                        f"autoencoder in {args.ae_ckpt}, which sets the latent size")
    if cfg.denoiser == "unet" and ae.spec.kind != "none":
        raise UserError(f"diffusion.denoiser=unet denoises 28x28 pixels, but {args.ae_ckpt} is a {ae.spec.kind} "
                        f"autoencoder with {ae.spec.latent_dim}-d latents; use autoencoder.kind=none")
    stats = check_producer(args.latents, args.ae_ckpt)
    scaler = LatentScaler.from_dict(stats, str(args.latents / "stats.json"))
    meta = load_meta(args.data)
    z_tr, y_tr = select_digit(*load_latents(args.latents, "train"), cfg.only_digit)
    z_te, y_te = select_digit(*load_latents(args.latents, "test"), cfg.only_digit)
    ae_md5 = file_md5(args.ae_ckpt)
    with tracking.training_run("train_diffusion", params, "diffusion", meta, "mnist-train-latents", args.latents) as run:
        run.set_tag(PRECISION_TAG, rt.precision)

        def preview(model, s, epoch):  # the per-epoch MLflow grid: 50 DDIM steps are cheap enough
            pipe = LatentDiffusionPipeline(ae, model, s, scaler).to(rt)
            z, _ = pipe.sample_latents(64, sampler="ddim", steps=min(50, s.T), eta=0.0, guidance=2.0, seed=epoch,
                                       labels=pipe.labels_for(64, None), progress=False)
            return plots.grid_array(pipe.decode(z), 8)

        z_held, y_held = scaler.standardize(z_te), torch.from_numpy(y_te).long()
        model, ema, optimizer, s, history = train_denoiser(
            cfg, scaler.standardize(z_tr), torch.from_numpy(y_tr).long(), z_held, y_held,
            resume_path_for(args.out), f"{meta['content_hash']}:{ae_md5}",
            on_epoch=run.log_epoch, preview=preview if cfg.generate_images and run.logging else None, rt=rt)
        if not writes_outputs(rt, "train_diffusion", model):
            return {}
        # the per-epoch curve used a fixed subset of the held-out latents; the final figures use all of them
        z_held = z_held.to(rt.device)
        y_held = y_held.to(rt.device) if cfg.conditional else None
        final = {"train_loss": history[-1]["train_loss"],
                 "test_loss": held_out_loss(model, s, z_held, y_held, rt.precision),
                 "test_loss_ema": held_out_loss(ema.model, s, z_held, y_held, rt.precision),
                 "params": count_parameters(model),
                 "train_latents": int(len(z_tr))}
        with atomic_dir(args.plots) as tmp:
            title = f"{'pixel' if ae.spec.kind == 'none' else 'latent'} diffusion loss (MSE on noise)"
            plots.save_figure(plots.line_chart(history, ["train_loss", "test_loss", "test_loss_ema"], title),
                              tmp / "loss.png")
            # inside: a checkpoint that cannot be written (a full disk) leaves the plots as they were
            save_checkpoint(args.out, "mnist-ldm/diffusion", {
                "model_config": model.spec.to_dict(),
                "state_dict": model.state_dict(),
                "ema_state_dict": ema.model.state_dict(),
                "ema": {"decay": cfg.ema_decay, "warmup_steps": cfg.ema_warmup_steps, "updates": ema.updates},
                "optimizer": optimizer.state_dict(),
                "step": ema.updates,
                "schedule": {"kind": "linear", "T": cfg.T, "beta_start": cfg.beta_start, "beta_end": cfg.beta_end},
                "latent_stats": scaler.to_dict(),
                "train_config": cfg.model_dump(exclude={"generate_images"}),
                "trained_on": {"data_source": meta["source"], "data_hash": meta["content_hash"],
                               "autoencoder_md5": ae_md5, "autoencoder_config": ae.spec.to_dict(),
                               "only_digit": cfg.only_digit, "latents": int(len(z_tr))},
                "runtime": rt.record(),
                "history": history,
                "metrics": final,
            })
        resume_path_for(args.out).unlink(missing_ok=True)  # the checkpoint is written: drop the resume state
        publish(run, final, args.metrics, [args.plots / "loss.png", args.metrics], curves=args.curves, history=history)
    print(f"train_diffusion: {final['params']:,}-parameter denoiser, held-out loss {final['test_loss']:.4f} "
          f"(EMA {final['test_loss_ema']:.4f}) -> {args.out}")
    return final
