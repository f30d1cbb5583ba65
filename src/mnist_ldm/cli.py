"""`mnist-ldm`: one subcommand per pipeline stage, plus `infer` (the seed's infer.py).

Flags override the matching `params.yaml` values; paths default to the pipeline's layout in dvc.yaml.
Errors a user can fix are printed as one line, `error: ...`, with exit status 2.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Optional, Sequence

from .config import SAMPLERS, load_params, override
from .errors import UserError


def _checked(cast, ok, expected: str):
    """An argparse type: `cast` the text, then require `ok(value)`; errors say what was expected."""
    def parse(text: str):
        try:
            value = cast(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {expected}, got {text!r}") from None
        if not ok(value):
            raise argparse.ArgumentTypeError(f"expected {expected}, got {value}")
        return value
    return parse


_digit = _checked(int, lambda v: 0 <= v <= 9, "a digit 0-9")
_positive_int = _checked(int, lambda v: v >= 1, "a positive integer")
_positive_float = _checked(float, lambda v: v > 0, "a positive number")


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # one line, exit 2, like every other user error
        self.exit(2, f"error: {self.prog}: {message}\n")


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="mnist-ldm", description="Latent diffusion on MNIST: the pipeline's stages and inference.")
    p.add_argument("--params", type=Path, default=Path("params.yaml"), help="params file (default: params.yaml)")
    sub = p.add_subparsers(dest="command", required=True, parser_class=_Parser)

    s = sub.add_parser("prepare", help="load MNIST and write data/prepared")
    s.add_argument("--out", type=Path, default=Path("data/prepared"))

    s = sub.add_parser("train-ae", help="train the convolutional autoencoder")
    s.add_argument("--data", type=Path, default=Path("data/prepared"))
    s.add_argument("--out", type=Path, default=Path("models/autoencoder.pt"))
    s.add_argument("--metrics", type=Path, default=Path("metrics/autoencoder.json"))
    s.add_argument("--plots", type=Path, default=Path("plots/autoencoder"))
    s.add_argument("--epochs", type=_positive_int)
    s.add_argument("--batch-size", type=_positive_int)
    s.add_argument("--lr", type=_positive_float)
    s.add_argument("--latent-dim", type=_positive_int)
    s.add_argument("--generate-images", action="store_true", help="log a reconstruction grid every epoch")

    s = sub.add_parser("encode", help="encode the prepared data into cached latents")
    s.add_argument("--data", type=Path, default=Path("data/prepared"))
    s.add_argument("--ae-ckpt", type=Path, default=Path("models/autoencoder.pt"))
    s.add_argument("--out", type=Path, default=Path("data/latents"))

    s = sub.add_parser("train-diffusion", help="train the latent denoiser")
    s.add_argument("--ae-ckpt", type=Path, default=Path("models/autoencoder.pt"))
    s.add_argument("--latents", type=Path, default=None, help="latent cache (default: encode --data here)")
    s.add_argument("--data", type=Path, default=Path("data/prepared"))
    s.add_argument("--out", type=Path, default=Path("models/diffusion.pt"))
    s.add_argument("--metrics", type=Path, default=Path("metrics/diffusion.json"))
    s.add_argument("--plots", type=Path, default=Path("plots/diffusion"))
    s.add_argument("--epochs", type=_positive_int)
    s.add_argument("--batch-size", type=_positive_int)
    s.add_argument("--lr", type=_positive_float)
    s.add_argument("--T", type=_positive_int, dest="T")
    s.add_argument("--only-digit", type=_digit)
    s.add_argument("--latent-dim", type=_positive_int)
    s.add_argument("--hidden-dim", type=_positive_int)
    s.add_argument("--conditional", action="store_true", default=None, help="class-conditional model (CFG)")
    s.add_argument("--generate-images", action="store_true", default=None, help="log a sample grid every epoch")

    s = sub.add_parser("sample", help="the pipeline's sampling stage")
    s.add_argument("--ckpt", type=Path, default=Path("models/diffusion.pt"))
    s.add_argument("--ae-ckpt", type=Path, default=Path("models/autoencoder.pt"))
    s.add_argument("--latents", type=Path, default=Path("data/latents"))
    s.add_argument("--out", type=Path, default=Path("outputs/samples.npz"))
    s.add_argument("--plots", type=Path, default=Path("plots/sample"))
    s.add_argument("--metrics", type=Path, default=Path("metrics/sample.json"))

    s = sub.add_parser("infer", help="generate digits from a trained pair of checkpoints")
    s.add_argument("--ckpt", type=Path, required=True, help="diffusion checkpoint")
    s.add_argument("--ae-ckpt", type=Path, required=True, help="autoencoder checkpoint")
    s.add_argument("--num-images", type=_positive_int, default=64)
    s.add_argument("--output", type=Path, default=Path("generated_digits.png"), help=".png grid or .npz arrays")
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--sampler", choices=SAMPLERS)
    s.add_argument("--steps", type=_positive_int, help="DDIM steps (default: sample.steps)")
    s.add_argument("--eta", type=float, help="DDIM noise: 0 deterministic, 1 DDPM-like")
    s.add_argument("--digit", type=_digit, help="class-conditional models: which digit")
    s.add_argument("--guidance", type=float, help="classifier-free guidance scale w")
    s.add_argument("--raw-weights", action="store_true", help="use the raw weights instead of the EMA")

    s = sub.add_parser("train-evaluator", help="train the CNN that scores samples")
    s.add_argument("--data", type=Path, default=Path("data/prepared"))
    s.add_argument("--out", type=Path, default=Path("models/evaluator.pt"))
    s.add_argument("--metrics", type=Path, default=Path("metrics/evaluator.json"))

    s = sub.add_parser("evaluate", help="score an .npz of images: FCD with floors, precision/recall, balance")
    s.add_argument("--samples", type=Path, default=Path("outputs/samples.npz"))
    s.add_argument("--evaluator", type=Path, default=Path("models/evaluator.pt"))
    s.add_argument("--data", type=Path, default=Path("data/prepared"))
    s.add_argument("--ae-ckpt", type=Path, default=Path("models/autoencoder.pt"))
    s.add_argument("--latents", type=Path, default=Path("data/latents"))
    s.add_argument("--output", type=Path, default=Path("metrics/eval.json"))
    s.add_argument("--plots", type=Path, default=Path("plots/evaluate"))
    s.add_argument("--no-tracking", action="store_true", help="do not log to MLflow (scoring outside the pipeline)")
    return p


def run(args: argparse.Namespace) -> None:
    params = load_params(args.params)
    cmd = args.command
    if cmd == "prepare":
        from . import data, tracking
        with tracking.stage_run("prepare", params, tracking.section_params(params, "data")) as trun:
            meta = data.prepare(params.data, args.out)
            trun.log_prepared(meta, args.out)
        print(f"prepare: {meta['counts']['train']} train / {meta['counts']['test']} test images from "
              f"{meta['source']} ({meta['description']}) -> {args.out}")
    elif cmd == "train-ae":
        from . import train_ae
        ae = override(params.autoencoder, "autoencoder", epochs=args.epochs, batch_size=args.batch_size,
                      lr=args.lr, latent_dim=args.latent_dim)
        params = _with(params, autoencoder=ae)
        train_ae.main(params, args.data, args.out, args.metrics, args.plots, args.generate_images)
    elif cmd == "encode":
        from . import encode, tracking
        from .data import load_meta
        with tracking.stage_run("encode", params, {"encode.data": str(args.data), "encode.ae_ckpt": str(args.ae_ckpt)},
                                load_meta(args.data)) as trun:
            stats = encode.main(args.data, args.ae_ckpt, args.out)
            trun.headline({"latent_std": stats["raw_std_overall"]})
            trun.log_artifact(args.out / "stats.json")
    elif cmd == "train-diffusion":
        from . import train_diffusion
        d = override(params.diffusion, "diffusion", epochs=args.epochs, batch_size=args.batch_size, lr=args.lr,
                     T=args.T, only_digit=args.only_digit, latent_dim=args.latent_dim, hidden_dim=args.hidden_dim,
                     conditional=args.conditional, generate_images=args.generate_images)
        params = _with(params, check=False, diffusion=d)  # the autoencoder checkpoint is checked instead
        train_diffusion.main(params, args.ae_ckpt, args.out, args.metrics, args.plots, args.latents, args.data)
    elif cmd == "sample":
        from . import sample
        sample.main(params, args.ckpt, args.ae_ckpt, args.latents, args.out, args.plots, args.metrics)
    elif cmd == "infer":
        from . import sample
        cfg = override(params.sample, "sample", num_images=args.num_images, seed=args.seed, sampler=args.sampler,
                       steps=args.steps, eta=args.eta, digit=args.digit, guidance=args.guidance,
                       use_ema=False if args.raw_weights else None)
        if args.sampler == "ddim" and args.steps is None and cfg.steps == 1000:
            cfg = override(cfg, "sample", steps=50)
        sample.infer(cfg, args.ckpt, args.ae_ckpt, args.output)
    elif cmd == "train-evaluator":
        from . import evaluator
        evaluator.main(params, args.data, args.out, args.metrics)
    elif cmd == "evaluate":
        from . import evaluate
        if args.no_tracking:
            params = _with(params, tracking=override(params.tracking, "tracking", enabled=False))
        evaluate.main(params, args.samples, args.evaluator, args.data, args.ae_ckpt, args.latents,
                      args.output, args.plots)


def _with(params, check: bool = True, **sections):
    import dataclasses

    new = dataclasses.replace(params, **sections)
    if check:
        new.validate()
    return new


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        run(args)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
