"""The sampling rules and names, each stated once: the `sample` params (`config`), each sampling request
(`sampling_request`) and the diffusion math (`diffusion`) test values with these. Imports nothing of the package.
"""

from __future__ import annotations

import math
from typing import Any

SAMPLERS = ("ddpm", "ddim")
ETA_EXPECTED = "a number in [0, 1]"
GUIDANCE_EXPECTED = "a finite number >= 0"
SEED_EXPECTED = "an integer in [0, 2^63)"


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
