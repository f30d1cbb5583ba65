"""Known answers for the evaluation on real digits (the bundled MNIST subset), with a real evaluator."""

from __future__ import annotations

import re

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from mnist_ldm.evaluation import metrics
from mnist_ldm.autoencoder.model import Autoencoder, AutoencoderSpec, encode_images, reconstruction_metrics
from mnist_ldm.evaluator.model import EvaluatorCNN, accuracy, features_and_probs
from mnist_ldm.config.sections import DataConfig
from mnist_ldm.io.errors import UserError
from mnist_ldm.data.images import as_batch, to_uint8
from mnist_ldm.data.sources import load_bundled
from mnist_ldm.evaluation.scoring import load_samples, score
from mnist_ldm.runtime.loop import run_training

pytestmark = pytest.mark.usefixtures("one_thread")


def _fit(model, loss, n, epochs, tmp_path, lr=1e-3):
    torch.manual_seed(0)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    run_training(model=model, optimizer=opt, loss_fn=loss, n_items=n, batch_size=64, epochs=epochs, seed=0,
                 resume_path=tmp_path / f"{type(model).__name__}.resume.pt", checkpoint_every=10**9,
                 run_fingerprint="t", on_epoch_end=lambda *_: {}, desc="fit")
    return model.eval()


@pytest.fixture(scope="module")
def real(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("eval")
    data = load_bundled(DataConfig())
    x = torch.from_numpy(data.train.images)
    y = torch.from_numpy(data.train.labels).long()
    clf = EvaluatorCNN()
    clf_loss = lambda idx, g: F.cross_entropy(clf(as_batch(x[idx])), y[idx])  # noqa: E731
    _fit(clf, clf_loss, len(x), 5, tmp)
    ae = Autoencoder(AutoencoderSpec())
    ae_loss = lambda idx, g: F.binary_cross_entropy_with_logits(ae(as_batch(x[idx])), as_batch(x[idx]))  # noqa: E731
    _fit(ae, ae_loss, len(x), 2, tmp)
    return data, clf, ae


def test_evaluator_is_accurate_enough_for_these_checks(real):
    data, clf, _ = real
    f, p = features_and_probs(clf, data.test.images)
    assert (p.argmax(1) == data.test.labels).mean() > 0.92
    assert accuracy(clf, data.test.images, data.test.labels) == (p.argmax(1) == data.test.labels).mean()
    assert f.shape == (len(data.test.images), 128) and f.dtype == np.float64 and p.dtype == np.float64
    np.testing.assert_allclose(p.sum(1), 1.0, rtol=1e-6)
    # batching does not change the features
    f_small, _ = features_and_probs(clf, data.test.images[:50], batch_size=7)
    np.testing.assert_allclose(f_small, f[:50], rtol=1e-5, atol=1e-6)


def test_autoencoder_helpers_agree_with_the_model(real):
    data, _, ae = real
    images = data.test.images[:300]
    with torch.no_grad():
        direct = ae.encode(as_batch(images)).numpy()
        logits = ae(as_batch(images))
    z = encode_images(ae, images, batch_size=128)
    assert z.shape == (300, 16) and z.dtype == np.float32
    np.testing.assert_allclose(z, direct, rtol=1e-5, atol=1e-5)
    x = as_batch(images)
    rec = reconstruction_metrics(ae, images, batch_size=128)
    assert rec["test_bce"] == pytest.approx(F.binary_cross_entropy_with_logits(logits, x).item(), rel=1e-5)
    assert rec["test_mse"] == pytest.approx(F.mse_loss(torch.sigmoid(logits), x).item(), rel=1e-5)
    assert rec["test_mse"] < 0.6 * (x**2).mean().item()  # a trained autoencoder beats an all-black image (~0.1)
    np.testing.assert_array_equal(to_uint8(as_batch(images)), images)  # the two conversions are inverses


def test_two_halves_of_real_data_score_near_the_floor(real):
    data, clf, ae = real
    test = data.test.images
    f_a, _ = features_and_probs(clf, test[:500])
    f_b, _ = features_and_probs(clf, test[500:])
    f_train, _ = features_and_probs(clf, data.train.images[:500])
    halves = metrics.frechet_classifier_distance(f_a, f_b)
    with torch.no_grad():
        noise = (ae.decode(torch.randn(500, 16))[:, 0] * 255).to(torch.uint8).numpy()
    f_noise, _ = features_and_probs(clf, noise)
    assert halves < 0.1 * metrics.frechet_classifier_distance(f_a, f_noise)
    # Halves of one set and train-vs-test are both "real vs real": the same order of magnitude.
    assert halves < 3 * metrics.frechet_classifier_distance(f_train, f_b) + 1e-9
    pr = metrics.prdc(f_b, f_a, k=5)
    calibrated = metrics.prdc(f_b, f_train, k=5)
    for key in ("precision", "recall"):
        assert abs(pr[key] - calibrated[key]) < 0.08, (key, pr[key], calibrated[key])
        assert pr[key] > 0.75


def test_one_class_removed_shows_in_class_balance(real):
    data, clf, _ = real
    keep = data.test.labels != 3
    _, p = features_and_probs(clf, data.test.images[keep])
    balance = metrics.class_balance(p)
    assert balance["classes_present"] == 9
    assert abs(balance["tv_to_uniform"] - 0.1) < 0.035


def test_score_orders_the_floors(real):
    """The full scoring used by the stage: real < reconstruction < Gaussian baseline < N(0, I)."""
    data, clf, ae = real
    z_train = encode_images(ae, data.train.images)
    # The "generated" set here is real held-out digits, so it must land near the real floor.
    result = score(data.test.images[500:], None, clf, data.train.images, data.test.images[:500], ae, z_train,
                   n=500, k=5, seed=0)
    fcd = result["fcd"]
    assert fcd["train_vs_test"] < fcd["ae_reconstruction"] < fcd["standard_normal"]
    assert fcd["single_gaussian"] < fcd["standard_normal"]
    assert fcd["generated"] < fcd["single_gaussian"]
    assert result["class_balance"]["classes_present"] == 10
    assert 0.7 < result["memorization"]["ratio"] < 1.4
    assert result["n"] == 500 and "absent" not in result
    assert result["fcd_ratio_to_single_gaussian"] == pytest.approx(fcd["generated"] / fcd["single_gaussian"])
    assert sum(result["class_counts"].values()) == 500


def test_score_without_autoencoder_marks_the_floors_absent(real):
    data, clf, _ = real
    labels = data.test.labels[500:]
    result = score(data.test.images[500:], labels, clf, data.train.images, data.test.images[:500], None, None,
                   n=300, k=5, seed=0)
    assert set(result["fcd"]) == {"generated", "train_vs_test"} and result["n"] == 300
    assert set(result["absent"]) == {"fcd.ae_reconstruction", "fcd.single_gaussian", "fcd.standard_normal"}
    assert "fcd_ratio_to_single_gaussian" not in result
    assert result["label_accuracy"] > 0.9  # real digits with their true labels
    with pytest.raises(UserError, match="need at least 7"):
        score(data.test.images[:6], None, clf, data.train.images, data.test.images, None, None, n=100, k=5, seed=0)


def test_load_samples_accepts_uint8_and_unit_floats(tmp_path, real):
    data, _, _ = real
    ims, labels = data.test.images[:5], data.test.labels[:5]
    np.savez(tmp_path / "u8.npz", images=ims, labels=labels)
    got, got_labels = load_samples(tmp_path / "u8.npz")
    np.testing.assert_array_equal(got, ims)
    np.testing.assert_array_equal(got_labels, labels)
    np.savez(tmp_path / "float.npz", images=(ims / 255.0)[:, None].astype(np.float32))  # (N, 1, 28, 28) in [0, 1]
    got, got_labels = load_samples(tmp_path / "float.npz")
    assert got.dtype == np.uint8 and got_labels is None
    np.testing.assert_array_equal(got, ims)
    np.savez(tmp_path / "wide.npz", images=ims.astype(np.float32))  # 0-255 as floats: ambiguous, refused
    for name, words in (("missing.npz", "samples file not found"), ("wide.npz", "floats in [0, 1]")):
        with pytest.raises(UserError, match=re.escape(words)):
            load_samples(tmp_path / name)
    np.savez(tmp_path / "other.npz", x=ims)
    with pytest.raises(UserError, match="no array 'images'"):
        load_samples(tmp_path / "other.npz")
    np.savez(tmp_path / "shape.npz", images=np.zeros((3, 32, 32), np.uint8))
    with pytest.raises(UserError, match=r"expected \(N, 28, 28\)"):
        load_samples(tmp_path / "shape.npz")


def test_every_floor_is_independent_of_the_reference_set_and_as_large_as_the_generated_set(real, monkeypatch):
    """Score the same generated set against two disjoint reference sets. A floor built from the
    reference images (say, reconstructions of test[:n]) would change with the reference; every floor
    here must be the same set of images both times, of the generated set's size, and share no image
    with either reference."""
    data, clf, ae = real
    z_train = encode_images(ae, data.train.images)
    compared = []  # (first set, second set) of every FCD, the way score() calls it
    real_fcd = metrics.frechet_classifier_distance

    def recording(a, b):
        compared.append((a, b))
        return real_fcd(a, b)

    monkeypatch.setattr(metrics, "frechet_classifier_distance", recording)
    generated, references = data.test.images[600:], (data.test.images[:300], data.test.images[300:600])
    seen = []
    for reference in references:
        compared.clear()
        result = score(generated, None, clf, data.train.images, reference, ae, z_train, n=300, k=5, seed=0)
        names = list(result["fcd"])
        assert names[0] == "generated" and len(compared) == len(names)
        seen.append(dict(zip(names, compared)))
    f_refs = [features_and_probs(clf, r)[0] for r in references]
    for name in seen[0]:
        if name == "generated":
            continue
        (floor_a, ref_a), (floor_b, ref_b) = seen[0][name], seen[1][name]
        assert np.array_equal(ref_a, f_refs[0]) and np.array_equal(ref_b, f_refs[1])
        assert np.array_equal(floor_a, floor_b), f"floor {name} changes with the reference set: it reuses it"
        assert len(floor_a) == len(seen[0]["generated"][0]) == 300, name
        for f_ref in f_refs:  # no image of a floor is one of the reference images
            dists = ((floor_a[:, None, :] - f_ref[None, :, :]) ** 2).sum(-1)
            assert dists.min() > 1e-8, f"floor {name} contains a reference image"
