"""Samplers on a trained toy model: DDIM inversion round trip, determinism, EMA."""

from __future__ import annotations

import torch

from mnist_ldm.denoiser import DenoiserSpec, LatentDenoiser
from mnist_ldm.diffusion import NoiseSchedule, sample_loop
from mnist_ldm.sample import ddim_invert
from mnist_ldm.train_diffusion import diffusion_loss
from mnist_ldm.trainer import EMA


def _toy_model(steps: int = 600) -> tuple[LatentDenoiser, NoiseSchedule, torch.Tensor]:
    """A small denoiser trained on a 2-D mixture of two Gaussians."""
    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(0)
    centers = torch.tensor([[-1.5, 0.0], [1.5, 0.0]])
    data = centers[torch.randint(0, 2, (4096,), generator=gen)] + 0.3 * torch.randn(4096, 2, generator=gen)
    model = LatentDenoiser(DenoiserSpec(latent_dim=2, hidden_dim=64, num_blocks=2))
    s = NoiseSchedule.linear(100, 1e-4, 0.2)
    opt = torch.optim.Adam(model.parameters(), lr=2e-3)
    for _ in range(steps):
        idx = torch.randint(0, len(data), (256,), generator=gen)
        loss = diffusion_loss(model, s, data[idx], None, gen, 0.0)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model.eval(), s, data


def test_ddim_inversion_round_trip_on_trained_toy_model():
    model, s, data = _toy_model()
    x0 = data[:64]
    with torch.no_grad():
        noise = ddim_invert(model, s, x0, steps=100)
        for _, x, _ in sample_loop(lambda xt, t: model(xt, t), s, noise, "ddim", 100, eta=0.0):
            pass
    err = (x - x0).norm(dim=1).mean() / x0.norm(dim=1).mean()
    assert err < 0.05, f"DDIM encode-decode relative error {err:.3f}"
    # The inverted points look like noise: roughly unit variance, not the data's bimodal layout.
    assert 0.6 < noise.std() < 1.6


def test_trained_toy_model_samples_the_mixture():
    model, s, _ = _toy_model()
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for _, x, _ in sample_loop(lambda xt, t: model(xt, t), s, torch.randn(2000, 2, generator=gen), "ddpm",
                                   generator=gen):
            pass
    # Two modes at x = +-1.5: most samples are near one of them, few in the empty middle.
    near_mode = ((x[:, 0].abs() - 1.5).abs() < 0.6).float().mean()
    assert near_mode > 0.8, f"only {near_mode:.2f} of samples near a mode"


def test_ddim_eta0_is_deterministic_and_seeded_runs_repeat():
    model, s, _ = _toy_model(steps=50)
    x_T = torch.randn(32, 2, generator=torch.Generator().manual_seed(3))

    def run(seed):
        gen = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for _, x, _ in sample_loop(lambda xt, t: model(xt, t), s, x_T, "ddim", 20, 0.0, gen):
                pass
        return x

    assert torch.equal(run(0), run(1))  # eta = 0: no noise is used, whatever the generator


def test_ema_tracks_a_smoothed_copy_of_the_weights():
    model = torch.nn.Linear(3, 3)
    ema = EMA(model, decay=0.9, warmup_steps=0)
    start = ema.model.weight.detach().clone()
    with torch.no_grad():
        model.weight.add_(1.0)
    ema.update(model)
    # One update moves the average 10 % of the way: e = 0.9 e + 0.1 w.
    assert torch.allclose(ema.model.weight, start + 0.1, atol=1e-6)
    warm = EMA(model, decay=0.999, warmup_steps=100)
    assert warm.current_decay() == 0.1  # (1 + 0) / (10 + 0): early averages follow the weights closely
