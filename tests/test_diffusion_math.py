"""The Gaussian diffusion math in mnist_ldm.diffusion.schedule against closed forms and an independent
numpy/float64 reference: schedule, forward process, posterior, DDPM and DDIM steps, the samplers
on a data distribution whose optimal denoiser is known exactly, and classifier-free guidance."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from mnist_ldm.diffusion.denoiser import DenoiserSpec, LatentDenoiser
from mnist_ldm.diffusion.schedule import (
    NoiseSchedule,
    ddim_invert_step,
    ddim_sigma,
    ddim_step,
    ddim_timesteps,
    ddpm_step,
    draw_timesteps,
    local_run,
    guided_eps,
    min_snr_weights,
    predict_x0,
    q_posterior,
    q_sample,
)
from mnist_ldm.diffusion.samplers import sample_loop

T, B0, B1 = 1000, 1e-4, 0.02  # the project's schedule (params.yaml)


# --------------------------------------------------------------------------- independent reference (numpy, float64)

class RefSchedule:
    """Ho et al. (2020), written out from the paper with 0-based t; abar_{-1} = 1."""

    def __init__(self, T: int, b0: float, b1: float):
        self.T = T
        self.beta = np.linspace(b0, b1, T, dtype=np.float64)
        self.alpha = 1.0 - self.beta
        self.abar = np.cumprod(self.alpha)
        self.abar_prev = np.concatenate([[1.0], self.abar[:-1]])

    def posterior_var(self, t: int) -> float:  # beta-tilde_t, eq. (7)
        return self.beta[t] * (1 - self.abar_prev[t]) / (1 - self.abar[t])

    def coef_x0(self, t: int) -> float:  # eq. (7)
        return math.sqrt(self.abar_prev[t]) * self.beta[t] / (1 - self.abar[t])

    def coef_xt(self, t: int) -> float:
        return math.sqrt(self.alpha[t]) * (1 - self.abar_prev[t]) / (1 - self.abar[t])

    def joint_conditional(self, t: int, x0: np.ndarray, xt: np.ndarray):
        """Mean and variance of x_{t-1} given (x_t, x_0) from the joint Gaussian of (x_{t-1}, x_t) given x_0.

        x_{t-1} | x0 ~ N(sqrt(abar_{t-1}) x0, 1 - abar_{t-1});  x_t = sqrt(alpha_t) x_{t-1} + sqrt(beta_t) e.
        """
        v1 = 1.0 - self.abar_prev[t]
        mean_prev, mean_t = math.sqrt(self.abar_prev[t]) * x0, math.sqrt(self.abar[t]) * x0
        cov = np.array([[v1, math.sqrt(self.alpha[t]) * v1],
                        [math.sqrt(self.alpha[t]) * v1, self.alpha[t] * v1 + self.beta[t]]])
        cond_mean = mean_prev + cov[0, 1] / cov[1, 1] * (xt - mean_t)
        cond_var = cov[0, 0] - cov[0, 1] ** 2 / cov[1, 1]
        return cond_mean, cond_var


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def sched() -> NoiseSchedule:
    return NoiseSchedule.linear(T, B0, B1)


@pytest.fixture(scope="module")
def ref() -> RefSchedule:
    return RefSchedule(T, B0, B1)


def _t(t: int, n: int) -> torch.Tensor:
    return torch.full((n,), t, dtype=torch.long)


# --------------------------------------------------------------------------- schedule

def test_linear_betas_endpoints_length_dtype():
    b = NoiseSchedule.linear(T, B0, B1).betas
    assert b.shape == (T,) and b.dtype == torch.float64
    assert b[0].item() == pytest.approx(B0, rel=1e-12)
    assert b[-1].item() == pytest.approx(B1, rel=1e-12)
    assert torch.all(b[1:] > b[:-1])
    np.testing.assert_allclose(b.numpy(), np.linspace(B0, B1, T), rtol=1e-12)


def test_alphas_cumprod_matches_numpy(sched, ref):
    np.testing.assert_allclose(sched.alphas_cumprod.numpy(), ref.abar, rtol=1e-12)
    np.testing.assert_allclose(sched.alphas_cumprod_prev.numpy(), ref.abar_prev, rtol=1e-12)
    np.testing.assert_allclose(sched.sqrt_alphas_cumprod.numpy(), np.sqrt(ref.abar), rtol=1e-12)
    np.testing.assert_allclose(sched.sqrt_one_minus_alphas_cumprod.numpy(), np.sqrt(1 - ref.abar), rtol=1e-12)
    assert sched.T == T
    assert all(getattr(sched, f).dtype == torch.float64 for f in ("alphas_cumprod", "posterior_variance"))


def test_posterior_variance_endpoints(sched, ref):
    last = T - 1
    closed = ref.beta[last] * (1 - ref.abar[last - 1]) / (1 - ref.abar[last])
    assert sched.posterior_variance[last].item() == pytest.approx(closed, rel=1e-12)
    assert sched.posterior_variance[last].item() == pytest.approx(B1, rel=1e-2)  # abar_T ~ 4e-5, so ~beta_T
    assert sched.posterior_variance[0].item() == 0.0
    np.testing.assert_allclose(sched.posterior_variance.numpy(), [ref.posterior_var(t) for t in range(T)],
                               rtol=1e-10, atol=1e-300)


def test_posterior_mean_coefficients(sched, ref):
    np.testing.assert_allclose(sched.posterior_mean_coef1.numpy(), [ref.coef_x0(t) for t in range(T)], rtol=1e-10)
    np.testing.assert_allclose(sched.posterior_mean_coef2.numpy(), [ref.coef_xt(t) for t in range(T)],
                               rtol=1e-10, atol=1e-300)
    # at t = 0 the posterior is a point mass on x_0
    assert sched.posterior_mean_coef1[0].item() == pytest.approx(1.0, rel=1e-12)
    assert sched.posterior_mean_coef2[0].item() == 0.0


# --------------------------------------------------------------------------- forward process and posterior

@pytest.mark.parametrize("t", [0, 10, 250, 999])
def test_q_sample_moments(sched, ref, t):
    n = 200_000
    x0_values = torch.tensor([-2.0, 0.5, 3.0], dtype=torch.float64)
    x0 = x0_values.expand(n, 3)
    gen = torch.Generator().manual_seed(100 + t)
    xt = q_sample(sched, x0, _t(t, n), torch.randn((n, 3), generator=gen, dtype=torch.float64))
    mean_true = math.sqrt(ref.abar[t]) * x0_values.numpy()
    var_true = 1.0 - ref.abar[t]
    mean, var = xt.mean(0).numpy(), xt.var(0).numpy()
    se_mean = math.sqrt(var_true / n)
    se_var = var_true * math.sqrt(2.0 / (n - 1))
    assert np.all(np.abs(mean - mean_true) < 5 * se_mean), (mean, mean_true)
    assert np.all(np.abs(var - var_true) < 5 * se_var), (var, var_true)


@pytest.mark.parametrize("t", [0, 1, 37, 500, 999])
def test_q_posterior_equals_joint_gaussian_conditional(sched, ref, t):
    rng = np.random.default_rng(t)
    x0 = rng.normal(size=(64, 5))
    xt = rng.normal(size=(64, 5)) * 2.0
    mean, var = q_posterior(sched, torch.from_numpy(x0), torch.from_numpy(xt), _t(t, 64))
    ref_mean, ref_var = ref.joint_conditional(t, x0, xt)
    np.testing.assert_allclose(mean.numpy(), ref_mean, rtol=1e-9, atol=1e-12)
    assert var.shape == (64, 1)
    np.testing.assert_allclose(var.numpy()[:, 0], ref_var, rtol=1e-9, atol=1e-15)


@pytest.mark.parametrize("t", [0, 1, 500, 999])
def test_predict_x0_inverts_q_sample(sched, t):
    gen = torch.Generator().manual_seed(t)
    x0 = torch.randn((32, 16), generator=gen, dtype=torch.float64)
    eps = torch.randn((32, 16), generator=gen, dtype=torch.float64)
    xt = q_sample(sched, x0, _t(t, 32), eps)
    torch.testing.assert_close(predict_x0(sched, xt, _t(t, 32), eps), x0, rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("t", [0, 1, 123, 999])
def test_ddpm_step_with_true_noise_is_the_true_posterior_mean(sched, ref, t):
    gen = torch.Generator().manual_seed(7 + t)
    x0 = torch.randn((50, 16), generator=gen, dtype=torch.float64)
    eps = torch.randn((50, 16), generator=gen, dtype=torch.float64)
    xt = q_sample(sched, x0, _t(t, 50), eps)
    out = ddpm_step(sched, eps, xt, t, torch.zeros_like(xt))
    expected = ref.coef_x0(t) * x0.numpy() + ref.coef_xt(t) * xt.numpy()
    np.testing.assert_allclose(out.numpy(), expected, rtol=1e-8, atol=1e-9)
    # the noise enters with scale sqrt(beta-tilde_t), and not at all at the last step
    z = torch.randn((50, 16), generator=gen, dtype=torch.float64)
    noisy = ddpm_step(sched, eps, xt, t, z)
    np.testing.assert_allclose((noisy - out).numpy(), math.sqrt(ref.posterior_var(t)) * z.numpy(),
                               rtol=1e-8, atol=1e-12)


# --------------------------------------------------------------------------- DDIM

def _np_trailing(T: int, steps: int) -> list[int]:
    return list(np.round(np.arange(T, 0, -T / steps)).astype(int) - 1)


@pytest.mark.parametrize("T_, steps", [(1000, 50), (1000, 20), (1000, 10), (1000, 1), (1000, 7), (1000, 1000),
                                       (50, 5), (50, 50), (100, 3), (10, 4), (5, 2)])
def test_ddim_timesteps_trailing_matches_reference(T_, steps):
    ts = ddim_timesteps(T_, steps)
    assert ts == _np_trailing(T_, steps)
    assert len(ts) == steps and ts[0] == T_ - 1 and ts[-1] >= 0
    assert all(a > b for a, b in zip(ts, ts[1:]))


def test_ddim_timesteps_properties_exhaustive():
    for T_ in range(2, 130):
        for steps in range(1, T_ + 1):
            ts = ddim_timesteps(T_, steps)
            assert len(ts) == steps, (T_, steps)
            assert ts[0] == T_ - 1 and ts[-1] >= 0, (T_, steps)
            assert all(a > b for a, b in zip(ts, ts[1:])), (T_, steps)
    assert ddim_timesteps(7, 7) == [6, 5, 4, 3, 2, 1, 0]
    assert ddim_timesteps(T, T) == list(range(T - 1, -1, -1))


def test_ddim_full_steps_eta1_is_the_ddpm_step(sched, ref):
    """Per-step mean and standard deviation of DDIM(eta=1, t_prev=t-1) equal DDPM's at every t."""
    gen = torch.Generator().manual_seed(0)
    xt = torch.randn((16, 16), generator=gen, dtype=torch.float64) * 1.5
    eps = torch.randn((16, 16), generator=gen, dtype=torch.float64)
    for t in range(T - 1, -1, -1):
        ddim_mean = ddim_step(sched, eps, xt, t, t - 1, 1.0, None)
        ddpm_mean = ddpm_step(sched, eps, xt, t, torch.zeros_like(xt))
        torch.testing.assert_close(ddim_mean, ddpm_mean, rtol=0, atol=1e-6)
        sigma = ddim_sigma(sched, t, t - 1, 1.0)
        assert sigma == pytest.approx(math.sqrt(sched.posterior_variance[t].item()), abs=1e-6)
        assert sigma == pytest.approx(math.sqrt(ref.posterior_var(t)), rel=1e-9, abs=1e-12)


def test_ddim_full_steps_eta1_loop_equals_ddpm_loop():
    s = NoiseSchedule.linear(100, 1e-4, 0.2)
    x_T = torch.randn((256, 4), generator=torch.Generator().manual_seed(1), dtype=torch.float64)

    def eps_fn(x, t):  # any smooth function of (x, t)
        return torch.tanh(x) * (1 + t[:, None].double() / 100)

    def run(sampler, **kw):
        out = list(sample_loop(eps_fn, s, x_T, sampler, eta=1.0, generator=torch.Generator().manual_seed(5), **kw))
        return out[-1][1], [t for t, _, _ in out]

    x_ddpm, ts_ddpm = run("ddpm")
    x_ddim, ts_ddim = run("ddim", steps=100)
    assert ts_ddpm == ts_ddim == list(range(99, -1, -1))
    torch.testing.assert_close(x_ddim, x_ddpm, rtol=0, atol=1e-6)


def test_ddim_eta0_ignores_noise(sched):
    gen = torch.Generator().manual_seed(3)
    xt = torch.randn((8, 16), generator=gen)
    eps = torch.randn((8, 16), generator=gen)
    for t, t_prev in [(999, 979), (500, 400), (20, -1)]:
        assert ddim_sigma(sched, t, t_prev, 0.0) == 0.0
        a = ddim_step(sched, eps, xt, t, t_prev, 0.0, torch.randn((8, 16), generator=gen))
        b = ddim_step(sched, eps, xt, t, t_prev, 0.0, torch.randn((8, 16), generator=gen))
        c = ddim_step(sched, eps, xt, t, t_prev, 0.0, None)
        assert torch.equal(a, b) and torch.equal(a, c)
    # and with eta > 0 the noise does matter
    n1, n2 = torch.randn((8, 16), generator=gen), torch.randn((8, 16), generator=gen)
    assert not torch.allclose(ddim_step(sched, eps, xt, 500, 400, 1.0, n1), ddim_step(sched, eps, xt, 500, 400, 1.0, n2))


@pytest.mark.parametrize("t_prev, t, dtype, tol", [
    # neighbours on the DDIM-50 grid, in the float32 that sampling uses
    (-1, 19, torch.float32, 1e-5), (19, 39, torch.float32, 1e-5), (479, 499, torch.float32, 1e-5),
    (959, 979, torch.float32, 1e-5), (979, 999, torch.float32, 1e-5), (-1, 0, torch.float32, 1e-5),
    # jumps across the whole schedule divide by sqrt(abar_999) ~ 6e-3, so they are checked in float64
    (-1, 999, torch.float64, 1e-10), (0, 999, torch.float64, 1e-10), (3, 700, torch.float64, 1e-10),
])
def test_ddim_invert_then_step_is_identity(sched, t_prev, t, dtype, tol):
    gen = torch.Generator().manual_seed(t + 11)
    x = torch.randn((64, 16), generator=gen, dtype=dtype)
    eps = torch.randn((64, 16), generator=gen, dtype=dtype)
    up = ddim_invert_step(sched, eps, x, t_prev, t)
    assert not torch.allclose(up, x)
    back = ddim_step(sched, eps, up, t, t_prev, 0.0, None)
    torch.testing.assert_close(back, x, rtol=0, atol=tol)


# --------------------------------------------------------------------------- the samplers on a known distribution
#
# Data x_0 ~ N(0, s^2 I). Then x_t ~ N(0, (abar_t s^2 + 1 - abar_t) I) and the optimal noise prediction
# is E[eps | x_t] = sqrt(1 - abar_t) x_t / (abar_t s^2 + 1 - abar_t). Every step is linear in x, so the
# variance of the sampler's output can be propagated exactly (numpy below). That exact value is what a
# correct sampler must reproduce; it is close to s^2 only with many steps. With few steps it is
# systematically smaller: a deterministic DDIM step maps variance V_t to c^2 V_t <= V_{t_prev}
# (Cauchy-Schwarz), e.g. DDIM-20 on T=1000 gives std 0.863 s for s = 0.5, not "s within a few %".

S_DATA = 0.5
N_SAMPLES = 20_000


def _oracle(s: NoiseSchedule, data_std: float):
    ac = s.alphas_cumprod

    def eps_fn(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        a = ac[t].to(x.dtype)[:, None]
        return (1 - a).sqrt() * x / (a * data_std**2 + 1 - a)

    return eps_fn


def _ref_output_std(ref: RefSchedule, data_std: float, sampler: str, steps: int = 0, eta: float = 0.0) -> float:
    s2 = data_std**2
    var = 1.0  # x_T ~ N(0, I)
    if sampler == "ddpm":
        pairs = [(t, t - 1) for t in range(ref.T - 1, -1, -1)]
    else:
        ts = _np_trailing(ref.T, steps)
        pairs = list(zip(ts, ts[1:] + [-1]))
    for t, tp in pairs:
        a = ref.abar[t]
        ap = ref.abar[tp] if tp >= 0 else 1.0
        v = a * s2 + 1 - a
        k_eps = math.sqrt(1 - a) / v                     # eps_hat = k_eps x
        k_x0 = (1 - math.sqrt(1 - a) * k_eps) / math.sqrt(a)  # x0_hat = k_x0 x
        if sampler == "ddpm":
            gain = ref.coef_x0(t) * k_x0 + ref.coef_xt(t)
            noise_var = ref.posterior_var(t) if t > 0 else 0.0
        else:
            sig2 = eta**2 * (1 - ap) / (1 - a) * (1 - a / ap)
            gain = math.sqrt(ap) * k_x0 + math.sqrt(1 - ap - sig2) * k_eps
            noise_var = sig2
        var = gain**2 * var + noise_var
    return math.sqrt(var)


def _run_sampler(s, sampler, seed, **kw):
    gen = torch.Generator().manual_seed(seed)
    x_T = torch.randn((N_SAMPLES, 1), generator=gen, dtype=torch.float64)
    steps = list(sample_loop(_oracle(s, S_DATA), s, x_T, sampler, generator=gen, **kw))
    return steps


SHORT = (100, 1e-4, 0.2)  # abar_T = 2e-5: x_T ~ N(0, I) is (almost exactly) the forward marginal


@pytest.mark.parametrize("schedule, sampler, kw, close_to_s", [
    (SHORT, "ddpm", {}, 0.07),                            # exact value 0.936 s
    ((T, B0, B1), "ddim", {"steps": 20, "eta": 0.0}, None),  # exact value 0.863 s
    ((T, B0, B1), "ddim", {"steps": 50, "eta": 1.0}, None),
    ((T, B0, B1), "ddim", {"steps": T, "eta": 1.0}, 0.02),  # = DDPM with 1000 steps: 0.992 s
    ((T, B0, B1), "ddim", {"steps": T, "eta": 0.0}, 0.02),
])
def test_sampler_with_oracle_eps_gives_the_data_distribution(schedule, sampler, kw, close_to_s):
    s, ref = NoiseSchedule.linear(*schedule), RefSchedule(*schedule)
    steps = _run_sampler(s, sampler, 0, **kw)
    n_steps = s.T if sampler == "ddpm" else kw["steps"]
    assert len(steps) == n_steps
    assert [t for t, _, _ in steps] == (list(range(s.T - 1, -1, -1)) if sampler == "ddpm"
                                        else ddim_timesteps(s.T, n_steps))
    x = steps[-1][1].numpy()
    n = x.size
    std = x.std()
    expected = _ref_output_std(ref, S_DATA, sampler, kw.get("steps", 0), kw.get("eta", 0.0))
    se = expected / math.sqrt(2 * n)
    assert abs(std - expected) < 5 * se, (std, expected)
    assert abs(x.mean()) < 5 * expected / math.sqrt(n)
    if close_to_s is not None:  # enough steps: the data distribution itself
        assert std == pytest.approx(S_DATA, rel=close_to_s)
    assert std < 0.75, "the sampler returned (nearly) its unit-variance input noise"
    # the last yielded x_0 prediction is the sample itself (up to the last step's coefficients)
    assert np.abs(steps[-1][2].numpy() - x).max() < 0.05


def test_sampler_seeded_golden_loop_is_reproducible(sched):
    a = _run_sampler(sched, "ddim", 9, steps=20, eta=1.0)[-1][1]
    b = _run_sampler(sched, "ddim", 9, steps=20, eta=1.0)[-1][1]
    c = _run_sampler(sched, "ddim", 10, steps=20, eta=1.0)[-1][1]
    assert torch.equal(a, b)
    assert not torch.allclose(a, c)


def test_ddim_eta_bounds_are_allowed(sched):
    assert ddim_sigma(sched, 500, 480, 0.0) == 0.0
    assert 0.0 < ddim_sigma(sched, 500, 480, 1.0) < math.sqrt(1 - sched.alphas_cumprod[480].item())
    for eta in (0.0, 1.0):
        assert len(list(sample_loop(_oracle(sched, 1.0), sched, torch.zeros(2, 2), "ddim", 4, eta))) == 4


# --------------------------------------------------------------------------- classifier-free guidance

@pytest.fixture(scope="module")
def cond_model() -> LatentDenoiser:
    torch.manual_seed(0)
    return LatentDenoiser(DenoiserSpec(num_classes=10, hidden_dim=16, num_blocks=1)).eval()


def test_guided_eps_interpolates_conditional_and_unconditional(cond_model):
    gen = torch.Generator().manual_seed(0)
    x = torch.randn((12, 16), generator=gen)
    t = torch.randint(0, T, (12,), generator=gen)
    y = torch.arange(12) % 10
    with torch.no_grad():
        eps_u = cond_model(x, t, torch.full_like(y, cond_model.null_label))
        eps_c = cond_model(x, t, y)
        assert not torch.allclose(eps_u, eps_c, atol=1e-4), "labels must change the prediction for this test"
        torch.testing.assert_close(guided_eps(cond_model, x, t, y, 0.0), eps_u, rtol=0, atol=1e-6)
        torch.testing.assert_close(guided_eps(cond_model, x, t, y, 1.0), eps_c, rtol=0, atol=1e-6)
        torch.testing.assert_close(guided_eps(cond_model, x, t, y, 2.0), 2 * eps_c - eps_u, rtol=0, atol=1e-5)
        torch.testing.assert_close(guided_eps(cond_model, x, t, y, 0.5), 0.5 * (eps_c + eps_u), rtol=0, atol=1e-5)
        # no label: the unconditional branch
        torch.testing.assert_close(guided_eps(cond_model, x, t, None, 2.0), eps_u, rtol=0, atol=1e-6)


def test_guided_eps_unconditional_model_ignores_labels():
    torch.manual_seed(0)
    model = LatentDenoiser(DenoiserSpec(hidden_dim=16, num_blocks=1)).eval()
    x, t = torch.randn(4, 16), torch.tensor([0, 5, 50, 999])
    with torch.no_grad():
        torch.testing.assert_close(guided_eps(model, x, t, torch.arange(4), 3.0), model(x, t))


def test_min_snr_weights_match_their_closed_form(sched, ref):
    t = torch.arange(T)
    snr = ref.abar / (1 - ref.abar)
    want = np.minimum(snr, 5.0) / snr
    got = min_snr_weights(sched, t, 5.0).double().numpy()
    np.testing.assert_allclose(got, want, rtol=1e-6)
    assert got[0] < 0.01 and got[-1] == 1.0  # nearly clean steps weigh little, noisy ones fully
    crossing = int(np.argmax(snr < 5.0))  # from here on SNR < gamma: weight exactly 1
    assert (got[crossing:] == 1.0).all() and (got[:crossing] < 1.0).all()
    assert (min_snr_weights(sched, t, 0.0) == 1.0).all()  # off: DDPM's L_simple


def test_diffusion_loss_with_min_snr_is_the_weighted_mean_of_per_sample_errors(sched):
    from mnist_ldm.diffusion.train import diffusion_loss

    model = LatentDenoiser(DenoiserSpec(4, 16, 1)).eval()
    z0 = torch.randn(64, 4, generator=torch.Generator().manual_seed(0))
    plain = diffusion_loss(model, sched, z0, torch.Generator().manual_seed(1))
    weighted = diffusion_loss(model, sched, z0, torch.Generator().manual_seed(1), min_snr_gamma=5.0)
    gen = torch.Generator().manual_seed(1)  # the draws diffusion_loss makes, in its order
    t = torch.randint(0, sched.T, (64,), generator=gen)
    noise = torch.randn(z0.shape, generator=gen)
    with torch.no_grad():
        err = (model(q_sample(sched, z0, t, noise), t, None) - noise).pow(2).mean(dim=1)
    assert plain.item() == pytest.approx(err.mean().item(), rel=1e-5)
    assert weighted.item() == pytest.approx((min_snr_weights(sched, t, 5.0) * err).mean().item(), rel=1e-5)
    assert weighted.item() < plain.item()


# --------------------------------------------------------------------------- training timesteps

def test_timesteps_drawn_one_per_row_are_ddpms_uniform_draw():
    got = draw_timesteps(T, 64, torch.Generator().manual_seed(3), "cpu")
    assert torch.equal(got, torch.randint(0, T, (64,), generator=torch.Generator().manual_seed(3)))


def test_timesteps_shared_by_runs_form_an_evenly_spaced_lattice():
    for seed in range(20):
        t = draw_timesteps(T, 256, torch.Generator().manual_seed(seed), "cpu", run=8)
        runs = t.view(32, 8)
        assert (runs == runs[:, :1]).all()  # 32 runs of 8 rows, one timestep each
        values = runs[:, 0].double()
        gaps = torch.remainder(torch.diff(torch.cat([values, values[:1]])), T)  # cyclically, T / 32 = 31.25 apart
        assert set(gaps.tolist()) <= {31.0, 32.0} and gaps.sum() == T


def test_timesteps_shared_by_runs_are_uniform_on_every_row():
    """Each row's t is uniform on 0..T-1 (mean (T-1)/2, variance (T^2-1)/12), the rows of a shorter last run too."""
    gen, n = torch.Generator().manual_seed(0), 4000
    draws = torch.stack([draw_timesteps(T, 20, gen, "cpu", run=8) for _ in range(n)]).double()  # runs of 8, 8, 4
    mean, var = (T - 1) / 2, (T * T - 1) / 12
    assert ((draws.mean(0) - mean).abs() < 4 * math.sqrt(var / n)).all()
    assert ((draws.var(0) / var - 1).abs() < 0.1).all()
    counts = torch.bincount(draws[:, 0].long() // 100, minlength=10).double()  # one row, 10 bins: chi-square, 9 dof
    assert ((counts - n / 10) ** 2 / (n / 10)).sum() < 27.9  # p = 0.001


def test_timesteps_shared_by_runs_keep_each_processes_shard_in_runs():
    """Under torchrun a process takes rows rank, rank + world, ...: with world dividing run, its rows come in
    runs of run / world, so the global batch (and the training) is the same at any process count."""
    t = draw_timesteps(T, 20, torch.Generator().manual_seed(0), "cpu", run=4)  # runs of 4, 4, 4, 4, 4
    assert local_run(4, 2) == 2 and local_run(4, 1) == 4 and local_run(4, 3) == 1 and local_run(8, 4) == 2
    for rank in range(2):
        shard = t[rank::2]  # 10 rows: 5 runs of 2
        assert (shard.view(5, 2) == shard.view(5, 2)[:, :1]).all()
        assert torch.equal(shard[::2], t[::4])  # each local run is one of the batch's runs
    values = sorted(t[::4].tolist())  # 5 runs, evenly spaced
    assert set(np.diff(values + [values[0] + T]).tolist()) <= {199, 200, 201}
