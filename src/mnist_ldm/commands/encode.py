"""Stage `encode`: the frozen encoder turns each split into latents once; diffusion training reads this cache."""

from __future__ import annotations

import argparse

from mnist_ldm.io.atomic import atomic_dir, write_json, write_npz
from mnist_ldm.config.sections import Params
from mnist_ldm.data.prepared import load_meta, load_split
from mnist_ldm.io.paths import check_paths
from mnist_ldm.runtime.command import PRECISION_TAG, add_paths, runtime_for

HELP = "encode the prepared data into cached latents"


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_paths(p, data="prepared data folder", ae_ckpt="autoencoder checkpoint",
              out="latent cache folder (data/latents)")


def run(params: Params, args: argparse.Namespace) -> dict:
    from mnist_ldm import tracking
    from mnist_ldm.autoencoder.model import encode_images, load_autoencoder
    from mnist_ldm.io.hashing import file_md5
    from mnist_ldm.data.latents import latent_stats

    check_paths(args, {"data": "a folder", "ae_ckpt": "a file"}, folders=["out"])
    rt = runtime_for(args)
    model = load_autoencoder(args.ae_ckpt)[0].to(rt.device)
    meta = load_meta(args.data)
    splits = {split: load_split(args.data, split) for split in ("train", "test")}  # both usable before any write
    with tracking.stage_run("encode", params, {"encode.data": str(args.data), "encode.ae_ckpt": str(args.ae_ckpt)},
                            meta) as trun:
        trun.set_tag(PRECISION_TAG, rt.precision)
        latents = {split: encode_images(model, data.images, precision=rt.precision) for split, data in splits.items()}
        stats = {**latent_stats(latents["train"], model.fixed_scale), "ae_checkpoint_md5": file_md5(args.ae_ckpt),
                 "runtime": rt.record()}
        with atomic_dir(args.out) as tmp:  # latents and their stats are replaced together or not at all
            for split, data in splits.items():
                write_npz(tmp / f"{split}.npz", z=latents[split], labels=data.labels)
            write_json(tmp / "stats.json", stats)
        trun.headline({"latent_std": stats["raw_std_overall"]})
        trun.log_artifact(args.out / "stats.json")
    print(f"encode: latents of std {stats['raw_std_overall']:.2f} (before standardizing) -> {args.out}")
    return stats
