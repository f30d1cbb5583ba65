"""Samplers on a trained toy model: DDIM inversion round trip (LatentDiffusionPipeline.invert),
determinism, the pipeline's sampling API, the latent scaler, EMA."""

from __future__ import annotations

import functools
import math

import numpy as np
import pytest
import torch

from mnist_ldm.autoencoder.model import Autoencoder, AutoencoderSpec
from mnist_ldm.diffusion.denoiser import DenoiserSpec, LatentDenoiser
from mnist_ldm.diffusion.samplers import sample_loop
from mnist_ldm.diffusion.schedule import NoiseSchedule
from mnist_ldm.io.errors import UserError
from mnist_ldm.data.latents import LatentScaler
from mnist_ldm.config.sections import ConfigError, RequestError, SampleConfig, SamplingRequest
from mnist_ldm.diffusion.pipeline import LatentDiffusionPipeline, Samples
from mnist_ldm.diffusion.train import diffusion_loss
from mnist_ldm.runtime.loop import EMA

pytestmark = pytest.mark.usefixtures("one_thread")


def _pipeline(model: LatentDenoiser, s: NoiseSchedule, scaler: LatentScaler | None = None) -> LatentDiffusionPipeline:
    """The toy denoiser in a pipeline, with an untrained autoencoder of the same latent size."""
    torch.manual_seed(0)
    d = model.spec.latent_dim
    ae = Autoencoder(AutoencoderSpec(latent_dim=d, channels=(4, 4, 4)))
    return LatentDiffusionPipeline(ae, model, s, scaler or LatentScaler((0.0,) * d, (1.0,) * d))


@functools.lru_cache(maxsize=None)  # trained once per size; the tests only run it (eval mode, no grad)
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
        loss = diffusion_loss(model, s, data[idx], gen)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model.eval(), s, data


def test_ddim_inversion_round_trip_on_trained_toy_model():
    model, s, data = _toy_model()
    x0 = data[:64]
    with torch.no_grad():
        noise = _pipeline(model, s).invert(x0, steps=100)
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
    assert ema.current_decay() == 0.9 and ema.updates == 1  # no warm-up: the full decay from the start
    warm = EMA(model, decay=0.999, warmup_steps=100)
    assert warm.current_decay() == 0.0  # horizon 1 at the first update: the average is a copy of the weights


def _horizon(decay: float, warmup: int, u: int) -> float:
    """The documented warm-up: 1 / (1 - d) grows linearly from 1 at update 0 to 1 / (1 - decay) at warmup."""
    return 1.0 + (1.0 / (1.0 - decay) - 1.0) * min(u, warmup) / warmup


@pytest.mark.parametrize("decay, warmup", [(0.999, 100), (0.9999, 500), (0.9, 7), (0.5, 1), (0.0, 10)])
def test_ema_warmup_decay_follows_the_closed_form(decay, warmup):
    ema = EMA(torch.nn.Linear(2, 2), decay=decay, warmup_steps=warmup)
    ds = []
    for u in range(warmup + 5):
        ema.updates = u
        ds.append(ema.current_decay())
        assert ds[-1] == pytest.approx(1.0 - 1.0 / _horizon(decay, warmup, u), rel=1e-12, abs=1e-15), u
    assert ds[0] == 0.0
    assert all(d == decay for d in ds[warmup:])  # from warmup_steps on: exactly `decay`
    assert all(a <= b for a, b in zip(ds, ds[1:])) and all(0.0 <= d <= decay for d in ds)


@pytest.mark.parametrize("decay, warmup", [(0.999, 100), (0.9999, 500), (0.9, 7)])
def test_ema_warmup_is_continuous_at_warmup_steps(decay, warmup):
    """The horizon 1/(1-d) takes equal steps all the way up to warmup_steps and none after: no jump there."""
    ema = EMA(torch.nn.Linear(2, 2), decay=decay, warmup_steps=warmup)
    horizons = []
    for u in range(warmup + 3):
        ema.updates = u
        horizons.append(1.0 / (1.0 - ema.current_decay()))
    step = (1.0 / (1.0 - decay) - 1.0) / warmup
    increments = np.diff(horizons)
    np.testing.assert_allclose(increments[:warmup], step, rtol=1e-9)  # the last ramp step lands on decay
    np.testing.assert_allclose(increments[warmup:], 0.0, atol=1e-9 * horizons[-1])
    assert horizons[warmup] == pytest.approx(1.0 / (1.0 - decay), rel=1e-12)
    # the decay just before warm-up ends is one ramp step short of `decay`, not a different curve
    ema.updates = warmup - 1
    assert 1.0 / (1.0 - ema.current_decay()) == pytest.approx(1.0 / (1.0 - decay) - step, rel=1e-9)


@pytest.mark.parametrize("decay, warmup, cap", [(0.999, 500, 128.0), (0.999, 0, 50.0), (0.99, 10, 1000.0)])
def test_ema_horizon_never_exceeds_its_cap(decay, warmup, cap):
    """A short run (4,000 images: 640 steps against a 1,000-step horizon) caps the horizon; a cap above the
    horizon changes nothing, bit for bit."""
    ema = EMA(torch.nn.Linear(2, 2), decay=decay, warmup_steps=warmup, max_horizon=cap)
    free = EMA(torch.nn.Linear(2, 2), decay=decay, warmup_steps=warmup)
    for u in range(max(warmup, 1) + 5):
        ema.updates = free.updates = u
        horizon = 1.0 / (1.0 - ema.current_decay())
        free_horizon = 1.0 / (1.0 - free.current_decay())
        assert horizon <= cap * (1 + 1e-12)
        assert horizon == pytest.approx(min(free_horizon, cap), rel=1e-9)
        if free_horizon <= cap:
            assert ema.current_decay() == free.current_decay()


def test_the_prior_caps_its_ema_horizon_at_a_fraction_of_its_steps(tmp_path, one_thread):
    from mnist_ldm.config.sections import DiffusionConfig
    from mnist_ldm.diffusion.train import train_denoiser

    z, y = torch.randn(640, 4), torch.zeros(640, dtype=torch.long)
    cfg = DiffusionConfig(hidden_dim=16, num_blocks=1, T=20, epochs=2, batch_size=64, warmup_steps=0,
                          ema_decay=0.999, ema_warmup_steps=0, ema_max_fraction=0.2)
    _, ema, *_ = train_denoiser(cfg, z, y, z[:64], y[:64], tmp_path / "r.pt", "test")
    assert ema.current_decay() == pytest.approx(1 - 1 / (0.2 * 20))  # 20 steps: a 4-step horizon
    full = DiffusionConfig(hidden_dim=16, num_blocks=1, T=20, epochs=2, batch_size=64, warmup_steps=0,
                           ema_decay=0.5, ema_warmup_steps=0, ema_max_fraction=0.2)
    _, ema, *_ = train_denoiser(full, z, y, z[:64], y[:64], tmp_path / "s.pt", "test")
    assert ema.current_decay() == 0.5  # a 2-step horizon is under the cap: `ema_decay` as given


def test_the_per_epoch_held_out_loss_reads_a_fixed_subset_of_the_test_latents(tmp_path, one_thread):
    from mnist_ldm.config.sections import DiffusionConfig
    from mnist_ldm.diffusion.train import held_out_loss, train_denoiser
    from mnist_ldm.runtime.loop import EPOCH_TEST_ITEMS

    z, y = torch.randn(640, 4), torch.zeros(640, dtype=torch.long)
    z_test = torch.randn(EPOCH_TEST_ITEMS + 500, 4)
    cfg = DiffusionConfig(hidden_dim=16, num_blocks=1, T=20, epochs=1, batch_size=64, warmup_steps=0)
    model, ema, _, s, history = train_denoiser(cfg, z, y, z_test, torch.zeros(len(z_test), dtype=torch.long),
                                               tmp_path / "r.pt", "test")
    subset = z_test[:EPOCH_TEST_ITEMS]
    assert history[-1]["test_loss"] == held_out_loss(model, s, subset, None)  # the last epoch's weights are final
    assert history[-1]["test_loss_ema"] == held_out_loss(ema.model, s, subset, None)
    assert history[-1]["test_loss"] != held_out_loss(model, s, z_test, None)


def test_ema_updates_follow_the_recursion_with_the_warmup_decay():
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 3)
    ema = EMA(model, decay=0.99, warmup_steps=10)
    expected = {k: v.detach().double().clone() for k, v in model.named_parameters()}
    gen = torch.Generator().manual_seed(1)
    for u in range(15):
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn(p.shape, generator=gen))
        d = 1.0 - 1.0 / _horizon(0.99, 10, u)
        for k, p in model.named_parameters():
            expected[k] = d * expected[k] + (1.0 - d) * p.detach().double()
        ema.update(model)
        if u == 0:  # decay 0 at the first update: the average is exactly the current weights
            for k, p in model.named_parameters():
                assert torch.equal(dict(ema.model.named_parameters())[k], p)
    assert ema.updates == 15
    for k, p in ema.model.named_parameters():
        torch.testing.assert_close(p.double(), expected[k], rtol=1e-5, atol=1e-5)
        assert not p.requires_grad


# --------------------------------------------------------------------------- the pipeline's sampling API

@pytest.fixture(scope="module")
def toy_pipe():
    model, s, data = _toy_model()
    return _pipeline(model, s), data


def test_sample_latents_is_seeded_batched_and_returns_a_trajectory(toy_pipe):
    pipe, _ = toy_pipe
    z, traj = pipe.sample_latents(10, sampler="ddim", steps=10, eta=1.0, seed=3, progress=False)
    assert z.shape == (10, 2) and traj == []
    z2, _ = pipe.sample_latents(10, sampler="ddim", steps=10, eta=1.0, seed=3, progress=False)
    assert torch.equal(z, z2)
    assert not torch.equal(z, pipe.sample_latents(10, sampler="ddim", steps=10, eta=1.0, seed=4, progress=False)[0])
    # batches: n latents whatever the batch size, a partial last batch included
    zb, _ = pipe.sample_latents(10, sampler="ddim", steps=10, eta=1.0, seed=3, batch_size=4, progress=False)
    assert zb.shape == (10, 2) and torch.isfinite(zb).all()
    # the trajectory: predicted x_0 of the first batch every k evaluations, then the final latents
    z, traj = pipe.sample_latents(8, sampler="ddim", steps=10, eta=0.0, seed=0, batch_size=4, progress=False,
                                  trajectory_every=5)
    assert len(traj) == 10 // 5 + 1
    assert all(x.shape == (4, 2) for x in traj)
    assert torch.equal(traj[-1], z[:4])


def test_sample_returns_decoded_images_and_trajectory(toy_pipe):
    pipe, _ = toy_pipe
    out = pipe.sample(12, sampler="ddim", steps=10, eta=0.0, seed=0, progress=False, trajectory_points=5)
    assert isinstance(out, Samples)
    assert out.images.shape == (12, 28, 28) and out.images.dtype == np.uint8
    assert out.labels is None  # an unconditional model
    assert len(out.trajectory) == 5 + 1 and all(t.shape == (10, 28, 28) for t in out.trajectory)
    np.testing.assert_array_equal(out.trajectory[-1], out.images[:10])
    z, _ = pipe.sample_latents(12, sampler="ddim", steps=10, eta=0.0, seed=0, progress=False)
    np.testing.assert_array_equal(out.images, pipe.decode(z))
    assert pipe.sample(3, sampler="ddpm", seed=0, progress=False).trajectory is None


@pytest.mark.parametrize("kw, words", [
    ({"sampler": "euler"}, "sampler='euler' is not allowed; expected one of ddpm, ddim"),
    ({"sampler": "ddim", "steps": 101}, "--steps/sample.steps=101"),
    ({"sampler": "ddim", "steps": 0}, "steps=0 is not allowed"),
    ({"sampler": "ddim", "eta": 1.5}, "eta=1.5 is not allowed"),
    ({"sampler": "ddim", "eta": -0.5}, "eta=-0.5 is not allowed"),
    ({"guidance": -1.0}, "guidance=-1.0 is not allowed"),
    ({"guidance": float("nan")}, "guidance=nan is not allowed"),
    ({"steps": 10, "digit": 3}, "needs a class-conditional model"),
])
def test_sample_refuses_requests_the_model_cannot_serve(toy_pipe, kw, words):
    pipe, _ = toy_pipe
    with pytest.raises(ConfigError) as info:
        pipe.sample(2, progress=False, **kw)
    assert words in str(info.value) and "\n" not in str(info.value)


@pytest.mark.parametrize("kw, field, rest", [
    ({"sampler": "ddim", "steps": 11}, "steps", "steps=11 is more than the T=10 diffusion steps of this model "
                                                "(diffusion.T); expected 1 to 10"),
    ({"steps": 5, "digit": 3}, "digit", "digit=3 needs a class-conditional model"),
    ({"sampler": "ddpm", "eta": 0.0}, "eta", "eta=0.0 is not used by sampler ddpm"),
    ({"steps": 5, "guidance": 3.0}, "guidance", "guidance=3.0 is not used by an unconditional model"),
])
def test_a_refused_request_names_its_field_for_the_command_line_and_for_rest(kw, field, rest):
    """One check, one error: the CLI's message (`--eta/sample.eta=...`, after the checkpoint) and the REST
    one (`eta=...`) come from the same exception's field, not from rewording each other."""
    with pytest.raises(RequestError) as info:
        SamplingRequest(**kw).checked(T=10, num_classes=0, where="models/diffusion.pt", given=kw)
    e = info.value
    assert isinstance(e, ConfigError) and e.field == field and e.value == kw[field]
    assert e.request_message.startswith(rest) and "\n" not in e.request_message
    assert str(e) == f"models/diffusion.pt: --{field}/sample.{e.request_message}"


def test_a_request_is_validated_by_the_sample_fields_and_defaults_to_them():
    from pydantic import ValidationError

    assert SamplingRequest() == SamplingRequest.of(SampleConfig())  # the packaged `sample` params' defaults
    for kw in ({"eta": 1.5}, {"guidance": float("inf")}, {"seed": -1}, {"sampler": "euler"}, {"steps": 0}):
        with pytest.raises(ValidationError):
            SamplingRequest(**kw)
        with pytest.raises(ValidationError):
            SampleConfig(**kw)


def test_a_request_is_checked_against_the_model_that_serves_it():
    req = SamplingRequest.of(SampleConfig(digit=7, steps=5, seed=3))
    assert (req.sampler, req.steps, req.eta, req.guidance, req.digit, req.seed) == ("ddim", 5, 1.0, 2.0, 7, 3)
    assert req.checked(T=5, num_classes=10) is req
    with pytest.raises(RequestError, match=r"^--steps/sample\.steps=5 is more than the T=4"):
        req.checked(T=4, num_classes=10)
    with pytest.raises(RequestError, match=r"^--digit/sample\.digit=7 is not allowed; expected 0 to 4$"):
        req.checked(T=5, num_classes=5)


def test_pipeline_refuses_mismatched_latent_sizes(toy_pipe):
    pipe, _ = toy_pipe
    with pytest.raises(UserError, match="latent sizes differ"):
        LatentDiffusionPipeline(Autoencoder(AutoencoderSpec(latent_dim=3, channels=(4, 4, 4))), pipe.denoiser,
                                pipe.schedule, pipe.scaler)
    with pytest.raises(UserError, match="latent sizes differ"):
        LatentDiffusionPipeline(pipe.autoencoder, pipe.denoiser, pipe.schedule, LatentScaler((0.0,) * 3, (1.0,) * 3))


def test_interpolation_endpoints_reproduce_the_two_latents(toy_pipe):
    pipe, data = toy_pipe
    # Look at the latents that `interpolate` decodes (this toy's untrained decoder would blur them all alike).
    probe = LatentDiffusionPipeline(pipe.autoencoder, pipe.denoiser, pipe.schedule, pipe.scaler)
    probe.decode = lambda z: z.numpy()
    z_a, z_b = data[:32], data[32:64]
    grid = probe.interpolate(z_a, z_b, points=5, steps=100)
    assert grid.shape == (32 * 5, 2)
    rows = torch.from_numpy(grid).reshape(32, 5, 2)  # row-major: pair i, point j
    # column 0 is z_a inverted and sampled back, the last column z_b: exactly the inversion round trip ...
    for col, z in ((0, z_a), (4, z_b)):
        with torch.no_grad():
            for _, x, _ in sample_loop(lambda xt, t: pipe.denoiser(xt, t), pipe.schedule, pipe.invert(z, 100),
                                       "ddim", 100, eta=0.0):
                pass
        torch.testing.assert_close(rows[:, col], x, rtol=0, atol=1e-4)
        # ... which lands back on the latent for typical points (a few on a mode's edge may cross over)
        err = (rows[:, col] - z).norm(dim=1) / z.norm(dim=1)
        assert err.median() < 0.05, (col, err)
    # the points between are samples of the model too (near a mode of the mixture), not straight-line blends
    assert ((rows[..., 0].abs() - 1.5).abs() < 0.75).float().mean() > 0.8
    # and the real pipeline decodes them: (pairs * points, 28, 28) uint8
    images = pipe.interpolate(z_a[:1], z_b[:1], points=3, steps=10)
    assert images.shape == (3, 28, 28) and images.dtype == np.uint8


def test_latent_scaler_standardizes_and_round_trips():
    rng = np.random.default_rng(0)
    z = (rng.normal(size=(500, 4)) * [4.0, 9.0, 0.5, 1.0] + [1.0, -2.0, 0.0, 30.0]).astype(np.float32)
    scaler = LatentScaler.fit(z)
    assert scaler.dim == 4
    np.testing.assert_allclose(scaler.mean, z.astype(np.float64).mean(0), rtol=1e-12)
    np.testing.assert_allclose(scaler.std, z.astype(np.float64).std(0), rtol=1e-12)
    zs = scaler.standardize(z)
    assert zs.dtype == torch.float32 and zs.shape == (500, 4)
    np.testing.assert_allclose(zs.double().mean(0).numpy(), 0.0, atol=1e-5)
    np.testing.assert_allclose(zs.double().std(0, unbiased=False).numpy(), 1.0, rtol=1e-5)
    torch.testing.assert_close(scaler.unstandardize(zs), torch.from_numpy(z), rtol=1e-5, atol=1e-4)
    assert LatentScaler.from_dict(scaler.to_dict()) == scaler
    for bad in ({"mean": [0.0]}, {"mean": [0.0, 1.0], "std": [1.0]}, {"mean": [0.0], "std": [0.0]},
                {"mean": [float("nan")], "std": [1.0]}, {"mean": ["a"], "std": [1.0]}):
        with pytest.raises(UserError, match="^where: "):
            LatentScaler.from_dict(bad, "where")


def test_lr_factor_warms_up_linearly_then_follows_its_closed_form():
    from mnist_ldm.runtime.loop import lr_factor

    total, warm = 110, 10
    assert [lr_factor(i, total, "cosine", warm) for i in range(warm)] == pytest.approx([(i + 1) / 10 for i in range(10)])
    assert [lr_factor(i, total, "constant", warm) for i in range(warm, total)] == [1.0] * 100
    cos = [lr_factor(i, total, "cosine", warm) for i in range(warm, total)]
    assert cos == pytest.approx([0.5 * (1 + math.cos(math.pi * k / 100)) for k in range(100)])
    assert cos[0] == 1.0 and lr_factor(60, total, "cosine", warm) == pytest.approx(0.5)  # halfway
    assert all(a > b for a, b in zip(cos, cos[1:])) and 0 < cos[-1] < 1e-3  # decays to ~0 at the last step
    assert lr_factor(0, 5, "cosine") == 1.0 and lr_factor(0, 5, "constant") == 1.0  # no warm-up
