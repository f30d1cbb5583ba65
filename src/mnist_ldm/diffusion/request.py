"""One sampling request (sampler, steps, eta, guidance, digit, seed), checked once against the model that serves
it by the rules of `sampling_rules`.

    req = SamplingRequest.from_config(params.sample).checked(T=1000, num_classes=0)

The `sample` stage, `infer`, `package_model` (the packaged defaults) and the REST model all check their
request here, through `LatentDiffusionPipeline.check`. A refused field raises `RequestError`, which keeps
the field's name: its message names it as the command line does (`--eta/sample.eta=1.5 ...`, after the
checkpoint's path when given), and `request_message` as a REST request does (`eta=1.5 ...`).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Iterable, Optional

from mnist_ldm.io.errors import UserError
from mnist_ldm.config.sampling_rules import (ETA_EXPECTED, GUIDANCE_EXPECTED, SAMPLERS, SEED_EXPECTED, ddim_steps_ok, digit_problem,
                             eta_ok, guidance_ok, seed_ok, unused)

def _shown(value: Any) -> str:
    return repr(value) if isinstance(value, str) else str(value)


class RequestError(UserError):
    """One refused field of a sampling request: `field` (sampler, steps, eta, guidance, digit or seed), its
    `value`, and `problem`, the rest of the line (`is not allowed; expected ...`)."""

    def __init__(self, field: str, value: Any, problem: str, where: str = ""):
        self.field, self.value, self.problem, self.where = field, value, problem, where
        flagged = f"--{field.replace('_', '-')}/sample.{field}={_shown(value)} {problem}"
        super().__init__(f"{where}: {flagged}" if where else flagged)

    @property
    def request_message(self) -> str:
        """The message with the field named as a REST request names it: `eta=1.5 is not allowed; ...`."""
        return f"{self.field}={_shown(self.value)} {self.problem}"


def check_seed(seed: Any, where: str = "") -> None:
    if not seed_ok(seed):
        raise RequestError("seed", seed, f"is not allowed; expected {SEED_EXPECTED}", where)


@dataclass(frozen=True)
class SamplingRequest:
    sampler: str = "ddpm"
    steps: Optional[int] = None  # DDIM's steps; None = all T
    eta: float = 1.0  # DDIM only: 0 = deterministic, 1 = DDPM-like noise
    guidance: float = 1.0  # classifier-free guidance scale w (conditional models only)
    digit: Optional[int] = None  # conditional models only: None samples every digit
    seed: int = 0

    @classmethod
    def from_config(cls, cfg: Any) -> "SamplingRequest":
        """The request that a `config.SampleConfig` (the `sample` params) makes."""
        return cls(**{f.name: getattr(cfg, f.name) for f in dataclasses.fields(cls)})

    def checked(self, T: int, num_classes: int, where: str = "", given: Iterable[str] = ()) -> "SamplingRequest":
        """This request, if a model of `T` diffusion steps and `num_classes` digit classes (0: unconditional)
        can serve it; otherwise a `RequestError` for the first field it refuses (`where`: the model's file).
        `given`: the fields a user set (a flag, a REST field); one that would change nothing is refused too."""
        def refuse(field: str, problem: str) -> None:
            raise RequestError(field, getattr(self, field), problem, where)

        if self.sampler not in SAMPLERS:
            refuse("sampler", f"is not a sampler; valid: {', '.join(SAMPLERS)}")
        if self.sampler == "ddim" and self.steps is not None and not ddim_steps_ok(self.steps, T):
            refuse("steps", f"does not fit the T={T} diffusion steps of this model; use 1 to {T}")
        if not eta_ok(self.eta):
            refuse("eta", f"is not allowed; expected {ETA_EXPECTED}")
        if not guidance_ok(self.guidance):
            refuse("guidance", f"is not allowed; expected {GUIDANCE_EXPECTED}")
        problem = digit_problem(self.digit, num_classes)
        if problem:
            refuse("digit", problem)
        given = set(given)
        for field in (f.name for f in dataclasses.fields(self) if f.name in given):
            problem = unused(field, self.sampler, num_classes)
            if problem:
                refuse(field, f"{problem}; leave it out")
        check_seed(self.seed, where)
        return self
