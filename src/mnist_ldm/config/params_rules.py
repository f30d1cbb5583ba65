"""The rules that tie one params section to another, each stated once. `config.Params.validate` applies them
after each section's own checks, so that `check_params` refuses, before DVC deletes any output, a combination
that a later stage would refuse (or silently ignore): DDIM's steps against diffusion.T, the U-Net against the
autoencoder, a digit or a guidance scale for an unconditional model, steps or eta for DDPM. `check_params`
also checks evaluate.k against the number of images the pipeline's `evaluate` compares. Imports nothing of
the package but `sampling_rules`.
"""

from __future__ import annotations

from typing import Any, Optional

from mnist_ldm.config.sampling_rules import DIGIT_CLASSES, ddim_steps_ok, digit_problem, unused

UNUSED_CHECKED = ("steps", "eta", "guidance")  # `sample` keys that a sampler or an unconditional model ignores


def min_images(k: int) -> int:
    """The fewest images `evaluate` compares for its k-nearest-neighbour metrics (precision, recall, ...)."""
    return k + 2


def cross_section_problem(p: Any) -> Optional[str]:
    """The first rule between sections that `p` (a `config.Params`) breaks, as a one-line message starting
    with `params:`; None if it breaks none."""
    s, d = p.sample, p.diffusion
    if s.sampler == "ddim" and not ddim_steps_ok(s.steps, d.T):
        return (f"params: sample.steps={s.steps} is more than diffusion.T={d.T}; expected sample.steps <= "
                f"diffusion.T (DDIM takes that many of the T steps), or sample.sampler=ddpm")
    if d.denoiser == "unet" and p.autoencoder.kind != "none":
        return (f"params: diffusion.denoiser='unet' is not allowed with autoencoder.kind={p.autoencoder.kind!r}; "
                f"expected autoencoder.kind=none (the U-Net denoises 28x28 pixels), or diffusion.denoiser=mlp")
    classes = DIGIT_CLASSES if d.conditional else 0
    problem = digit_problem(s.digit, classes)
    if problem:
        return f"params: sample.digit={s.digit} {problem}; expected sample.digit=null, or diffusion.conditional=true"
    e, e2 = p.evaluator, p.second_evaluator
    if (e.arch, e.seed) == (e2.arch, e2.seed):
        return (f"params: second_evaluator.arch={e2.arch!r} and second_evaluator.seed={e2.seed} are evaluator's; "
                f"expected another arch or seed (the second evaluator must be trained on its own)")
    default = type(s)()
    for key in UNUSED_CHECKED:  # a value changed from its default and then ignored is refused
        value, was = getattr(s, key), getattr(default, key)
        problem = unused(key, s.sampler, classes)
        if problem and value != was:
            return f"params: sample.{key}={value!r} {problem}; expected sample.{key}={was!r} (its default) here"
    return None


def evaluated_images_problem(p: Any) -> Optional[str]:
    """evaluate.k against the other sections' caps on the images the pipeline's `evaluate` compares (it takes
    the fewest of evaluate.n, the samples and the prepared sets), as one line; None if they leave enough.
    `check_params` checks it: `infer` takes sample.num_images for its grid, where evaluate.k plays no part."""
    need = min_images(p.evaluate.k)
    caps = {"sample.num_images": p.sample.num_images, "data.limit_test": p.data.limit_test,
            "data.limit_train": p.data.limit_train}  # 0: every image
    for key, n in caps.items():
        if 0 < n < need:
            return (f"evaluate.k={p.evaluate.k} needs at least {need} images to compare, and {key}={n} leaves "
                    f"{n}; expected a smaller evaluate.k, or {key} >= {need}")
    return None
