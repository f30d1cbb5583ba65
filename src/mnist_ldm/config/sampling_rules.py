"""The sampling rules and names, each stated once: the `sample` params (`config`, `params_rules`), each sampling
request (`sampling_request`) and the diffusion math (`diffusion`) test values with these. Imports nothing of the
package.
"""

from __future__ import annotations

import math
from typing import Any, Optional

SAMPLERS = ("ddpm", "ddim")
DIGIT_CLASSES = 10  # the classes of a class-conditional (diffusion.conditional) model: the ten digits
ETA_EXPECTED = "a number in [0, 1]"
GUIDANCE_EXPECTED = "a finite number >= 0"
SEED_EXPECTED = "an integer in [0, 2^63)"
UNCONDITIONAL = ("needs a class-conditional model, and this one is unconditional (train with "
                 "diffusion.conditional=true, or use diffusion.only_digit)")


def eta_ok(eta: float) -> bool:
    """DDIM's eta lies in [0, 1] (nan does not): above 1, sigma_t^2 exceeds 1 - abar_{t_prev} and a step has
    no real solution; below 0, sigma_t is negative."""
    return 0.0 <= eta <= 1.0


def guidance_ok(guidance: float) -> bool:
    """A classifier-free guidance scale w: finite and >= 0 (0 = the unconditional model)."""
    return math.isfinite(guidance) and guidance >= 0


def seed_ok(seed: Any) -> bool:
    """A seed of any section or request: an integer in [0, 2^63)."""
    return isinstance(seed, int) and 0 <= seed < 2**63


def ddim_steps_ok(steps: int, T: int) -> bool:
    """DDIM takes 1 to T of a model's T diffusion steps."""
    return 1 <= steps <= T


def digit_problem(digit: Optional[int], num_classes: int) -> Optional[str]:
    """Why a model of `num_classes` digit classes (0: unconditional) cannot draw `digit` (None: every digit),
    as the rest of a line after `digit=3 `; None if it can."""
    if digit is None:
        return None
    if not num_classes:
        return UNCONDITIONAL
    return None if 0 <= digit < num_classes else f"is not allowed; expected 0 to {num_classes - 1}"


def unused(field: str, sampler: str, num_classes: int) -> Optional[str]:
    """Why a request's `field` (steps, eta, guidance, ...) would not change what `sampler` draws from a model of
    `num_classes` digit classes, as the rest of a line after `steps=10 `; None if it would. DDPM runs all T
    steps with eta 1; classifier-free guidance mixes a class-conditional model's two predictions."""
    if sampler == "ddpm" and field in ("steps", "eta"):
        return "is not used by sampler ddpm, which runs all T steps with eta 1 (sampler ddim takes steps and eta)"
    if field == "guidance" and not num_classes:
        return ("is not used by an unconditional model (guidance steers a class-conditional one: "
                "diffusion.conditional=true)")
    return None
