"""The samplers, one class each (`timesteps`, and `step` after each network evaluation), found by name in
`SAMPLERS`; `sample_loop` runs any of them. A new sampler: its class and entry here, its name in
`config.sections.Sampler`."""

from __future__ import annotations

from typing import Callable, Iterator, Optional

import torch

from mnist_ldm.diffusion.schedule import NoiseSchedule, ddim_step, ddim_timesteps, ddpm_step, predict_x0


class DDPM:
    """All T ancestral steps (Ho et al. 2020, Algorithm 2); it takes no `steps` and no `eta`."""

    def __init__(self, schedule: NoiseSchedule, steps: Optional[int] = None, eta: float = 1.0):
        self.schedule, self.timesteps = schedule, list(range(schedule.T - 1, -1, -1))

    def step(self, eps: torch.Tensor, x: torch.Tensor, i: int, noise: torch.Tensor) -> torch.Tensor:
        """x at `timesteps[i]` -> x one step later, given the network's `eps` there."""
        return ddpm_step(self.schedule, eps, x, self.timesteps[i], noise)


class DDIM:
    """`steps` steps with trailing spacing (Song et al. 2021), noise `eta`: 0 deterministic, 1 DDPM's."""

    def __init__(self, schedule: NoiseSchedule, steps: Optional[int] = None, eta: float = 1.0):
        self.schedule, self.timesteps, self.eta = schedule, ddim_timesteps(schedule.T, steps or schedule.T), eta

    def step(self, eps: torch.Tensor, x: torch.Tensor, i: int, noise: torch.Tensor) -> torch.Tensor:
        ts = self.timesteps
        return ddim_step(self.schedule, eps, x, ts[i], ts[i + 1] if i + 1 < len(ts) else -1, self.eta, noise)


SAMPLERS = {"ddpm": DDPM, "ddim": DDIM}


def sample_loop(eps_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], s: NoiseSchedule, x_T: torch.Tensor,
                sampler: str = "ddpm", steps: Optional[int] = None, eta: float = 1.0,
                generator: Optional[torch.Generator] = None) -> Iterator[tuple[int, torch.Tensor, torch.Tensor]]:
    """Yields (t, x after the step, predicted x_0) per evaluation of `eps_fn(x_t, t)`; one `randn` per step."""
    scheduler, x = SAMPLERS[sampler](s, steps, eta), x_T
    for i, t in enumerate(scheduler.timesteps):
        tt = torch.full((x.shape[0],), t, dtype=torch.long, device=x.device)
        eps = eps_fn(x, tt)
        noise = torch.randn(x.shape, generator=generator, dtype=x.dtype, device=x.device)
        x_next = scheduler.step(eps, x, i, noise)
        yield t, x_next, predict_x0(s, x, tt, eps)
        x = x_next
