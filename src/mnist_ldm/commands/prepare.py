"""Stage `prepare`: MNIST from the configured source, written as `data/prepared` in one piece."""

from __future__ import annotations

import argparse

from mnist_ldm import tracking
from mnist_ldm.io.atomic import atomic_dir
from mnist_ldm.config.sections import Params
from mnist_ldm.data.prepared import limit, write_prepared
from mnist_ldm.data.sources import load_mnist
from mnist_ldm.io.paths import check_paths
from mnist_ldm.runtime.command import add_paths

HELP = "load MNIST and write the prepared data folder"


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_paths(p, out="prepared data folder (data/prepared)")


def run(params: Params, args: argparse.Namespace) -> dict:
    check_paths(args, folders=["out"])
    with tracking.stage_run("prepare", params, tracking.section_params(params, "data")) as trun:
        data = load_mnist(params.data)
        train, test = limit(data.train, params.data.limit_train), limit(data.test, params.data.limit_test)
        with atomic_dir(args.out) as tmp:
            meta = write_prepared(tmp, train, test, data.source, data.description)
        trun.log_prepared(meta, args.out)
    print(f"prepare: {meta['counts']['train']} train / {meta['counts']['test']} test images from "
          f"{meta['source']} ({meta['description']}) -> {args.out}")
    return meta
