"""bf16 on the CPU: allowed where the CPU has native bf16 units, refused with one line elsewhere. Where it
is allowed, a bf16 training repeats bit for bit and differs from fp32, encoding, decoding and the
evaluator's features stay within stated tolerances of fp32, and resume states do not cross precisions
(resuming a killed bf16 stage: tests/test_resume.py)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from mnist_ldm.runtime.device import CPU, Runtime, resolve_precision, runtime
from mnist_ldm.runtime.memory import BF16_CPU_FLAGS, cpu_has_native_bf16
from mnist_ldm.io.errors import UserError

NATIVE = cpu_has_native_bf16()


@pytest.mark.parametrize("flags, native", [("fpu sse2 avx2 avx512f", False), ("fpu avx512f avx512_bf16", True),
                                           ("fpu amx_tile amx_bf16 amx_int8", True), ("fpu avx512_bf16x", False)])
def test_native_bf16_is_read_from_the_kernel_flags(tmp_path, flags, native):
    info = tmp_path / "cpuinfo"
    info.write_text(f"processor\t: 0\nmodel name\t: test\nflags\t\t: {flags}\n\nprocessor\t: 1\nflags\t\t: {flags}\n")
    assert cpu_has_native_bf16(str(info)) is native
    assert cpu_has_native_bf16(str(tmp_path / "absent")) is False


def test_bf16_on_this_cpu_is_allowed_exactly_when_native():
    if NATIVE:
        assert resolve_precision("bf16", torch.device("cpu")) == "bf16"
    else:
        with pytest.raises(UserError, match=f"no native bf16 units.*{BF16_CPU_FLAGS[0]}.*use fp32"):
            resolve_precision("bf16", torch.device("cpu"))
    with pytest.raises(UserError, match="not a precision; valid: fp32, bf16"):
        resolve_precision("fp16", torch.device("cpu"))


@pytest.mark.skipif(not NATIVE, reason="this CPU has no native bf16 units")
def test_cpu_autocast_computes_in_bf16_with_fp32_weights():
    rt = runtime("cpu", "bf16")
    layer = torch.nn.Linear(64, 64)
    with rt.autocast():
        y = layer(torch.randn(8, 64))
    assert y.dtype == torch.bfloat16 and layer.weight.dtype == torch.float32


# --------------------------------------------------------------------------- bf16 through every stage that computes

bf16_only = pytest.mark.skipif(not NATIVE, reason="this CPU has no native bf16 units (amx_bf16 or avx512_bf16)")
BF16 = Runtime(torch.device("cpu"), "bf16")  # no CpuShare: the tests pin one thread themselves


def train_small(tmp_path, rt: Runtime, name: str):
    """A conv autoencoder and the evaluator trained for one epoch (5 steps each) on 320 real digits at `rt`'s
    precision."""
    from mnist_ldm.config.sections import AutoencoderConfig, DataConfig, EvaluatorConfig
    from mnist_ldm.data.prepared import Split
    from mnist_ldm.data.sources import load_bundled
    from mnist_ldm.autoencoder.train import train_autoencoder
    from mnist_ldm.evaluator.train import train_evaluator

    data = load_bundled(DataConfig())
    train = Split(data.train.images[:320], data.train.labels[:320])
    test = Split(data.test.images[:200], data.test.labels[:200])
    ae, ae_history = train_autoencoder(AutoencoderConfig(epochs=1, batch_size=64, warmup_steps=0), train, test,
                                       tmp_path / f"{name}-ae.resume.pt", "test", rt=rt)
    ev, ev_history = train_evaluator(EvaluatorConfig(epochs=1, batch_size=64), train, test,
                                     tmp_path / f"{name}-ev.resume.pt", "test", rt=rt)
    return {"ae": ae, "evaluator": ev, "history": ae_history + ev_history, "test": test}


@pytest.fixture(scope="module")
def trained(tmp_path_factory, one_thread):
    if not NATIVE:
        pytest.skip("this CPU has no native bf16 units (amx_bf16 or avx512_bf16)")
    tmp = tmp_path_factory.mktemp("precision")
    return {name: train_small(tmp, rt, name) for name, rt in (("fp32", CPU), ("bf16", BF16), ("bf16 again", BF16))}


def same_weights(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


@bf16_only
def test_bf16_training_repeats_bit_for_bit_and_differs_from_fp32(trained):
    """fp32 master weights: the trained models are fp32 either way; bf16 rounds the forward passes, so the
    weights differ from fp32's, and a second bf16 run on this machine repeats the first exactly."""
    for part in ("ae", "evaluator"):
        fp32, bf16, again = (trained[name][part] for name in ("fp32", "bf16", "bf16 again"))
        assert all(p.dtype == torch.float32 for p in bf16.parameters())
        assert same_weights(bf16, again), f"{part}: two bf16 runs differ"
        assert not same_weights(bf16, fp32), f"{part}: bf16 trained exactly as fp32 did"
    assert trained["bf16"]["history"] == trained["bf16 again"]["history"]
    assert trained["bf16"]["history"] != trained["fp32"]["history"]
    # the losses are fp32 figures and close to fp32's: bf16 changed the rounding, not what was learnt
    for a, b in zip(trained["fp32"]["history"], trained["bf16"]["history"]):
        assert a["train_loss"] == pytest.approx(b["train_loss"], rel=0.05)


@bf16_only
def test_encoding_decoding_and_features_run_in_bf16_within_a_stated_tolerance(trained):
    """The same fp32 weights at fp32 and at bf16: bf16 keeps 8 significant bits, so after a few layers the
    outputs move by about 1% of their spread (measured here: latents 0.7% of their std, features 1.7%,
    pixels at most 1 gray level). Stated tolerances: every latent within 3% of the latents' std, decoded
    pixels within 4 of 255 gray levels on 99% of pixels, every feature within 5% of the features' std, and
    the evaluator's class the same on 95% of the images."""
    from mnist_ldm.autoencoder.model import encode_images
    from mnist_ldm.diffusion.denoiser import DenoiserSpec, build_denoiser
    from mnist_ldm.diffusion.schedule import NoiseSchedule
    from mnist_ldm.evaluator.model import features_and_probs
    from mnist_ldm.data.latents import LatentScaler
    from mnist_ldm.diffusion.pipeline import LatentDiffusionPipeline

    ae, ev, test = trained["fp32"]["ae"], trained["fp32"]["evaluator"], trained["fp32"]["test"]
    z32, z16 = encode_images(ae, test.images), encode_images(ae, test.images, precision="bf16")
    assert z16.dtype == np.float32 and not np.array_equal(z32, z16)
    assert np.abs(z16 - z32).max() < 0.03 * z32.std()

    scaler = LatentScaler.fit(z32)
    pipe = LatentDiffusionPipeline(ae, build_denoiser(DenoiserSpec(16, 32, 1)), NoiseSchedule.linear(10, 1e-4, 0.02),
                                   scaler)
    z_std = scaler.standardize(z32)
    im32, im16 = pipe.to(CPU).decode(z_std), pipe.to(BF16).decode(z_std)
    gap = np.abs(im32.astype(int) - im16.astype(int))
    assert im16.dtype == np.uint8 and gap.max() > 0 and np.quantile(gap, 0.99) <= 4
    assert torch.equal(pipe.to(BF16).encode(test.images), scaler.standardize(z16))

    (f32, p32), (f16, p16) = features_and_probs(ev, test.images), features_and_probs(ev, test.images, precision="bf16")
    assert f16.dtype == p16.dtype == np.float64 and not np.array_equal(f32, f16)
    assert np.abs(f16 - f32).max() < 0.05 * f32.std()
    np.testing.assert_allclose(p16.sum(1), 1.0, rtol=1e-6)
    assert (p16.argmax(1) == p32.argmax(1)).mean() >= 0.95


@bf16_only
def test_a_resume_state_of_another_precision_is_not_taken_up(tmp_path, one_thread, capsys):
    """A bf16 run starts afresh beside an fp32 run's resume state (and the reverse): the fingerprint differs."""
    from mnist_ldm.runtime.loop import adam, run_training

    class Stop(Exception):
        pass

    def train(rt: Runtime, stop_at_epoch: int) -> None:
        torch.manual_seed(0)
        model, x = torch.nn.Linear(4, 1), torch.randn(64, 4)

        def on_epoch_end(epoch: int, loss: float) -> dict:
            if epoch == stop_at_epoch:
                raise Stop
            return {}

        def loss_fn(idx: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
            return model(x[idx]).float().pow(2).mean()

        run_training(model=model, optimizer=adam(model, 1e-2), loss_fn=loss_fn, n_items=64, batch_size=16, epochs=3,
                     seed=0, resume_path=tmp_path / "r.resume.pt", checkpoint_every=1, run_fingerprint="t",
                     on_epoch_end=on_epoch_end, desc="t", rt=rt)

    for first, second in ((CPU, BF16), (BF16, CPU)):
        with pytest.raises(Stop):
            train(first, stop_at_epoch=2)  # stopped at step 8, leaves the resume state of step 7
        capsys.readouterr()
        with pytest.raises(Stop):
            train(second, stop_at_epoch=1)
        err = capsys.readouterr().err
        assert "saved for other params or data; starting from scratch" in err and "resuming" not in err
        (tmp_path / "r.resume.pt").unlink()
