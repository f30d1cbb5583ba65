"""Known answers for the evaluation on real digits (the bundled MNIST subset), with a real evaluator."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from mnist_ldm import metrics
from mnist_ldm.autoencoder import AutoencoderSpec, ConvAutoencoder
from mnist_ldm.config import DataConfig
from mnist_ldm.data import load_bundled
from mnist_ldm.evaluate import score
from mnist_ldm.evaluator import DigitClassifier, features_and_probs
from mnist_ldm.train_ae import as_batch


def _fit(model, loss, n, epochs, tmp_path, lr=1e-3):
    from mnist_ldm.trainer import run_training

    torch.manual_seed(0)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    run_training(model=model, optimizer=opt, loss_fn=loss, n_items=n, batch_size=64, epochs=epochs, seed=0,
                 resume_path=tmp_path / f"{type(model).__name__}.resume.pt", checkpoint_every=10**9,
                 run_fingerprint="t", on_epoch_end=lambda e, l: {}, desc="fit")
    return model.eval()


@pytest.fixture(scope="module")
def real(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("eval")
    data = load_bundled(DataConfig())
    x = torch.from_numpy(data.train.images)
    y = torch.from_numpy(data.train.labels).long()
    clf = DigitClassifier()
    clf_loss = lambda idx, g: F.cross_entropy(clf(as_batch(x[idx])), y[idx])  # noqa: E731
    _fit(clf, clf_loss, len(x), 5, tmp)
    ae = ConvAutoencoder(AutoencoderSpec())
    ae_loss = lambda idx, g: F.binary_cross_entropy_with_logits(ae(as_batch(x[idx])), as_batch(x[idx]))  # noqa: E731
    _fit(ae, ae_loss, len(x), 2, tmp)
    return data, clf, ae


def test_evaluator_is_accurate_enough_for_these_checks(real):
    data, clf, _ = real
    _, p = features_and_probs(clf, data.test.images)
    assert (p.argmax(1) == data.test.labels).mean() > 0.92


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
    with torch.no_grad():
        z_train = ae.encode(as_batch(data.train.images)).numpy()
    # The "generated" set here is real held-out digits, so it must land near the real floor.
    result = score(data.test.images[500:], None, clf, data.train.images, data.test.images[:500], ae, z_train,
                   n=500, k=5, seed=0)
    fcd = result["fcd"]
    assert fcd["train_vs_test"] < fcd["ae_reconstruction"] < fcd["standard_normal"]
    assert fcd["single_gaussian"] < fcd["standard_normal"]
    assert fcd["generated"] < fcd["single_gaussian"]
    assert result["class_balance"]["classes_present"] == 10
    assert 0.7 < result["memorization"]["ratio"] < 1.4
