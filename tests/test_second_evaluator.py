"""The second evaluator: another architecture, trained on its own, scoring the same image sets (bundled MNIST)."""

from __future__ import annotations


import numpy as np
import pytest
import torch

from mnist_ldm.autoencoder.model import Autoencoder, AutoencoderSpec, encode_images
from mnist_ldm.io.checkpoint import save_checkpoint
from mnist_ldm.config.sections import DataConfig, EvaluatorConfig, Params, SecondEvaluatorConfig
from mnist_ldm.config.sections import ConfigError
from mnist_ldm.io.errors import UserError
from mnist_ldm.evaluator.model import (EvaluatorAllConv, EvaluatorCNN, build_evaluator, features_and_probs, load_evaluator,
                                 load_reference, reference_features, save_reference)
from mnist_ldm.data.sources import load_bundled
from mnist_ldm.config.params_file import params_from_dict
from mnist_ldm.evaluation.scoring import score
from mnist_ldm.evaluator.train import train_evaluator
from mnist_ldm.runtime.loop import count_parameters

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """Both evaluators as the stages train them (3 epochs on the bundled 4,000 training digits)."""
    tmp = tmp_path_factory.mktemp("second")
    data = load_bundled(DataConfig())
    nets = {}
    for cfg in (EvaluatorConfig(), SecondEvaluatorConfig(epochs=3)):
        nets[cfg.arch], history = train_evaluator(cfg, data.train, data.test, tmp / f"{cfg.arch}.resume.pt", "h")
        assert len(history) == 3
    return data, nets


def test_both_architectures_learn_digits_with_their_own_features(trained):
    data, nets = trained
    cnn, allconv = nets["cnn"], nets["allconv"]
    assert isinstance(cnn, EvaluatorCNN) and isinstance(allconv, EvaluatorAllConv)
    assert count_parameters(cnn) != count_parameters(allconv)
    f1, p1 = features_and_probs(cnn, data.test.images)
    f2, p2 = features_and_probs(allconv, data.test.images)
    assert f1.shape == f2.shape == (len(data.test.images), 128)
    assert (p1.argmax(1) == data.test.labels).mean() > 0.9
    assert (p2.argmax(1) == data.test.labels).mean() > 0.85  # batch norm and averaging learn slower on 96 steps
    # two views of the digits: the feature spaces are not a copy of each other
    c = np.corrcoef(f1.mean(0), f2.mean(0))[0, 1]
    assert abs(c) < 0.95
    # batch norm runs on its running statistics when scoring: a batch's features do not depend on its company
    alone = features_and_probs(allconv, data.test.images[:10])[0]
    np.testing.assert_allclose(alone, f2[:10], rtol=1e-5, atol=1e-6)


def test_the_second_evaluator_scores_the_same_sets_and_leaves_the_first_unchanged(trained):
    data, nets = trained
    torch.manual_seed(0)
    ae = Autoencoder(AutoencoderSpec())  # untrained: its reconstructions are a floor far above real digits
    z_train = encode_images(ae, data.train.images)
    args = (data.test.images[500:], None, nets["cnn"], data.train.images, data.test.images[:500], ae, z_train)
    alone = score(*args, n=400, k=5, seed=0)
    both = score(*args, n=400, k=5, seed=0, second=nets["allconv"])
    second = both.pop("second_evaluator")
    assert both == alone
    assert second["arch"] == "allconv" and set(second["fcd"]) == set(alone["fcd"])
    assert set(second["prdc"]) == {"precision", "recall", "density", "coverage"}
    fcd = second["fcd"]
    # the "generated" set is real held-out digits: near the real floor, far below the broken ones, in both spaces
    for f in (alone["fcd"], fcd):
        assert f["generated"] < 2 * f["train_vs_test"] + 1
        assert f["generated"] * 5 < min(f["ae_reconstruction"], f["standard_normal"])
    assert second["fcd_ratio_to_ae_reconstruction"] == pytest.approx(fcd["generated"] / fcd["ae_reconstruction"])
    assert alone["fcd_ratio_to_ae_reconstruction"] == pytest.approx(
        alone["fcd"]["generated"] / alone["fcd"]["ae_reconstruction"])
    assert second["fcd"] != alone["fcd"]


def test_a_checkpoint_from_before_the_second_architecture_loads_as_the_cnn(trained, tmp_path):
    _, nets = trained
    path = tmp_path / "old.pt"
    save_checkpoint(path, "mnist-ldm/evaluator", {"state_dict": nets["cnn"].state_dict(),
                                                  "model_config": {"feature_dim": 128}, "metrics": {}})
    model, _ = load_evaluator(path)
    assert isinstance(model, EvaluatorCNN)
    with pytest.raises(ValueError, match="not one of cnn, allconv"):
        build_evaluator("resnet")


def test_params_refuse_a_second_evaluator_that_is_the_first_and_an_unknown_arch():
    raw = {"evaluator": {"arch": "cnn", "seed": 3}, "second_evaluator": {"arch": "cnn", "seed": 3}}
    with pytest.raises(ConfigError, match=r"second_evaluator.arch='cnn' and second_evaluator.seed=3 are evaluator's; "
                                          r"expected another arch or seed"):
        params_from_dict(raw, require_all_sections=False)
    ok = params_from_dict({**raw, "second_evaluator": {"arch": "cnn", "seed": 4}}, require_all_sections=False)
    assert ok.second_evaluator == SecondEvaluatorConfig(arch="cnn", seed=4)
    with pytest.raises(ConfigError, match=r"second_evaluator.arch='vit' is not allowed; expected one of cnn, allconv"):
        params_from_dict({"second_evaluator": {"arch": "vit"}}, require_all_sections=False)
    # left out, the second evaluator is the other architecture with its own seed
    assert (Params().second_evaluator.arch, Params().second_evaluator.seed) == ("allconv", 1)


def test_kept_reference_features_give_the_scores_of_computing_them_again(trained, tmp_path):
    data, nets = trained
    meta = {"weights_sha256": "a" * 64, "data_hash": "b" * 40, "precision": "fp32"}
    paths = []
    for arch in ("cnn", "allconv"):
        ref = reference_features(nets[arch], data.train.images, data.test.images)
        assert ref["train"].shape == (len(data.train.images), 128) and ref["test_to_train"].shape == (len(data.test.images),)
        paths.append(tmp_path / f"{arch}.npz")
        save_reference(paths[-1], ref, **meta)
        loaded, why = load_reference(paths[-1], **meta)
        assert why == "" and all(np.array_equal(loaded[k], ref[k]) and loaded[k].dtype == np.float64 for k in ref)
    refs = tuple(load_reference(p, **meta)[0] for p in paths)
    args = (data.test.images[500:], None, nets["cnn"], data.train.images, data.test.images[:500], None, None)
    assert score(*args, n=400, k=5, seed=0, second=nets["allconv"], references=refs) == \
        score(*args, n=400, k=5, seed=0, second=nets["allconv"])
    # another precision: computed again; another evaluator or dataset: refused, naming the file
    assert load_reference(paths[0], **{**meta, "precision": "bf16"}) == (None, "computed at fp32, this run is bf16")
    for key, what in (("weights_sha256", "another evaluator"), ("data_hash", "another dataset")):
        with pytest.raises(UserError, match=f"{paths[0]}: computed for {what}"):
            load_reference(paths[0], **{**meta, key: "c" * 40})
    np.savez(tmp_path / "other.npz", a=np.zeros(2))
    with pytest.raises(UserError, match="other.npz: not an evaluator's reference features file"):
        load_reference(tmp_path / "other.npz", **meta)


def test_evaluate_refuses_second_features_without_the_second_evaluator(tmp_path, capsys):
    from mnist_ldm.commands.cli import main

    args = ["evaluate", "--no-tracking", "--samples", str(tmp_path / "s.npz"), "--evaluator", str(tmp_path / "e.pt"),
            "--data", str(tmp_path / "d"), "--ae-ckpt", str(tmp_path / "a.pt"), "--latents", str(tmp_path / "l"),
            "--output", str(tmp_path / "eval.json"), "--plots", str(tmp_path / "p"),
            "--second-features", str(tmp_path / "f.npz")]
    assert main(args) == 2
    err = capsys.readouterr().err.strip()
    assert err == "error: --second-features without --second-evaluator: give the checkpoint they belong to too"
    assert not (tmp_path / "eval.json").exists() and not (tmp_path / "p").exists()
