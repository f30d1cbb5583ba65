"""Bad params, data files, checkpoints and flags: each is refused with one `error:` line that names it,
a non-zero exit, and no change to any output the pipeline already wrote."""

from __future__ import annotations

import gzip
import hashlib
import shutil
import struct
from pathlib import Path
from typing import Callable

import numpy as np
import pytest
import torch
import yaml

from conftest import BIN, cli, make_repo_copy, merge, run

# Everything a stage may write; an error must leave all of it as it was.
WATCHED_DIRS = ("models", "data/prepared", "data/latents", "outputs", "metrics", "plots")
WATCHED_FILES = ("params.yaml", "dvc.lock")


def md5(path: Path) -> str:
    return hashlib.md5(path.read_bytes()).hexdigest()


def snapshot(repo: Path) -> dict[str, tuple[int, int, str]]:
    paths = [p for d in WATCHED_DIRS for p in (repo / d).rglob("*") if p.is_file()]
    paths += [repo / f for f in WATCHED_FILES]
    out = {}
    for p in sorted(paths):
        st = p.stat()
        out[str(p.relative_to(repo))] = (st.st_size, st.st_mtime_ns, md5(p))
    return out


@pytest.fixture(scope="module")
def repo(tmp_path_factory) -> Path:
    """A shrunk copy of the project after a full `dvc repro`: models, data, samples and metrics exist."""
    repo = make_repo_copy(tmp_path_factory.mktemp("bad_inputs") / "repo", {"tracking": {"enabled": False}})
    run([str(BIN / "dvc"), "repro"], repo)
    for rel in ("models/autoencoder.pt", "models/diffusion.pt", "models/evaluator.pt", "data/prepared/train.npz",
                "data/latents/train.npz", "outputs/samples.npz", "metrics/eval.json"):
        assert (repo / rel).is_file(), rel
    return repo


@pytest.fixture(autouse=True)
def keep_params(repo: Path):
    """Cases use --params files elsewhere; params.yaml is restored even if a case edits it by mistake."""
    text = (repo / "params.yaml").read_text()
    yield
    (repo / "params.yaml").write_text(text)


# --------------------------------------------------------------------------- helpers that build bad inputs

def params_file(repo: Path, tmp: Path, changes: dict, name: str = "params.yaml") -> str:
    raw = merge(yaml.safe_load((repo / "params.yaml").read_text()), changes)
    path = tmp / name
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    return str(path)


def idx_images(n: int, rows: int = 28, cols: int = 28, magic: int = 0x803, pixels: int | None = None) -> bytes:
    body = bytes(range(256)) * ((n * rows * cols) // 256 + 1)
    return struct.pack(">IIII", magic, n, rows, cols) + body[:n * rows * cols if pixels is None else pixels]


def idx_labels(labels: list[int], magic: int = 0x801, count: int | None = None) -> bytes:
    return struct.pack(">II", magic, len(labels) if count is None else count) + bytes(labels)


def idx_dir(tmp: Path, **override: bytes) -> Path:
    """Four valid small IDX files (10 train, 10 test images), with the named ones replaced."""
    files = {
        "train-images-idx3-ubyte": idx_images(10),
        "train-labels-idx1-ubyte": idx_labels(list(range(10))),
        "t10k-images-idx3-ubyte": idx_images(10),
        "t10k-labels-idx1-ubyte": idx_labels(list(range(10))),
    }
    d = tmp / "idx"
    d.mkdir()
    for name, data in files.items():
        if name in override or name + ".gz" in override:
            continue
        (d / name).write_bytes(data)
    for name, data in override.items():
        (d / name).write_bytes(data)
    return d


def prepare_idx(repo: Path, tmp: Path, tracking: bool = False, **files: bytes) -> list[str]:
    d = idx_dir(tmp, **files)
    changes = {"data": {"source": "idx", "idx_dir": str(d)}, "tracking": {"enabled": tracking}}
    return ["--params", params_file(repo, tmp, changes), "prepare", "--out", "data/prepared"]


def real_ckpt(repo: Path, name: str) -> dict:
    return torch.load(repo / "models" / name, map_location="cpu", weights_only=True)


def autoencoder_ckpt(tmp: Path, latent_dim: int) -> Path:
    """A well-formed autoencoder checkpoint of another latent size (untrained weights)."""
    from mnist_ldm.autoencoder import AutoencoderSpec, ConvAutoencoder
    from mnist_ldm.checkpoint import save_checkpoint

    model = ConvAutoencoder(AutoencoderSpec(latent_dim=latent_dim))
    path = tmp / f"autoencoder_{latent_dim}d.pt"
    save_checkpoint(path, "mnist-ldm/autoencoder", {"model_config": model.spec.to_dict(),
                                                    "state_dict": model.state_dict()})
    return path


def infer(ckpt: str = "models/diffusion.pt", ae: str = "models/autoencoder.pt", *extra: str,
          output: str = "OUT/x.npz") -> list[str]:
    return ["infer", "--ckpt", ckpt, "--ae-ckpt", ae, "--num-images", "4", "--sampler", "ddim", "--steps", "2",
            "--output", output, *extra]


TRAIN_DIFFUSION = ["train-diffusion", "--latents", "data/latents", "--data", "data/prepared", "--out",
                   "models/diffusion.pt", "--metrics", "metrics/diffusion.json", "--plots", "plots/diffusion"]
EVALUATE = ["evaluate", "--output", "metrics/eval.json", "--plots", "plots/evaluate", "--no-tracking"]


def write(path: Path, data: bytes) -> str:
    path.write_bytes(data)
    return str(path)


# --------------------------------------------------------------------------- the cases
# Each builder gets (repo, tmp dir) and returns (argv for mnist-ldm, strings the error line must contain).
# "OUT" in an argument is replaced by the case's tmp dir.

Case = Callable[[Path, Path], tuple[list[str], list[str]]]


def _params(changes: dict, culprits: list[str], cmd: list[str] | None = None) -> Case:
    def build(repo, tmp):
        return ["--params", params_file(repo, tmp, changes), *(cmd or TRAIN_DIFFUSION)], culprits
    return build


def _params_text(text: str, cmd: list[str]) -> Case:
    def build(repo, tmp):
        path = write(tmp / "params.yaml", text.encode())
        return ["--params", path, *cmd], [path]
    return build


def _bad_magic(repo, tmp):  # with MLflow logging on: the failed run is recorded, the error stays the last line
    return prepare_idx(repo, tmp, tracking=True, **{"train-images-idx3-ubyte": idx_images(10, magic=0x801)}), \
        ["train-images-idx3-ubyte", "magic"]


def _truncated_idx(repo, tmp):
    return prepare_idx(repo, tmp, **{"t10k-images-idx3-ubyte": idx_images(10, pixels=5 * 784 + 17)}), \
        ["t10k-images-idx3-ubyte", "truncated"]


def _idx_missing(repo, tmp):
    d = tmp / "empty"
    d.mkdir()
    return ["--params", params_file(repo, tmp, {"data": {"source": "idx", "idx_dir": str(d)}}),
            "prepare", "--out", "data/prepared"], ["data.idx_dir", str(d)]


def _idx_corrupt_gzip(repo, tmp):
    gz = gzip.compress(idx_images(10))
    return prepare_idx(repo, tmp, **{"train-images-idx3-ubyte.gz": gz[:len(gz) // 2]}), \
        ["train-images-idx3-ubyte.gz"]


def _idx_bad_label(repo, tmp):
    return prepare_idx(repo, tmp, **{"t10k-labels-idx1-ubyte": idx_labels([0, 1, 2, 3, 4, 5, 6, 7, 8, 12])}), \
        ["t10k-labels-idx1-ubyte", "12"]


def _idx_count_mismatch(repo, tmp):
    return prepare_idx(repo, tmp, **{"train-labels-idx1-ubyte": idx_labels(list(range(9)))}), \
        ["train-labels-idx1-ubyte"]


def _idx_not_28x28(repo, tmp):
    return prepare_idx(repo, tmp, **{"train-images-idx3-ubyte": idx_images(10, rows=32, cols=32)}), \
        ["train-images-idx3-ubyte", "32x32"]


def _encode_corrupt_test_split(repo, tmp):
    """train.npz is fine, test.npz is garbage: encode must fail before writing any latents."""
    prep = tmp / "prepared"
    prep.mkdir()
    shutil.copy(repo / "data/prepared/train.npz", prep / "train.npz")
    shutil.copy(repo / "data/prepared/meta.json", prep / "meta.json")
    (prep / "test.npz").write_bytes(b"PK\x03\x04 not really a zip archive")
    return ["encode", "--data", str(prep), "--ae-ckpt", "models/autoencoder.pt", "--out", "data/latents"], \
        [str(prep / "test.npz")]


def _truncated_ckpt(repo, tmp):
    data = (repo / "models/diffusion.pt").read_bytes()
    path = write(tmp / "diffusion_truncated.pt", data[:len(data) // 2])
    return infer(path), [path, "truncated or corrupt"]


def _empty_ckpt(repo, tmp):
    path = write(tmp / "empty.pt", b"")
    return infer(path), [path]


def _random_bytes_ckpt(repo, tmp):
    path = write(tmp / "random.pt", np.random.default_rng(0).bytes(4096))
    return infer(path), [path, "not a readable"]  # corrupt, not an attack: no "refused to load" here


def _missing_ckpt(repo, tmp):
    return infer(str(tmp / "nope.pt")), [str(tmp / "nope.pt")]


def _ae_as_diffusion(repo, tmp):
    return infer("models/autoencoder.pt", "models/autoencoder.pt"), ["models/autoencoder.pt", "autoencoder"]


def _evaluator_as_ae(repo, tmp):
    return infer("models/diffusion.pt", "models/evaluator.pt"), ["models/evaluator.pt", "evaluator"]


def _diffusion_as_evaluator(repo, tmp):
    return [*EVALUATE, "--evaluator", "models/diffusion.pt"], ["models/diffusion.pt"]


def _plain_dict_ckpt(repo, tmp):
    path = tmp / "plain.pt"
    torch.save({"weights": torch.zeros(3)}, path)
    return infer(str(path)), [str(path), "format"]


def _future_format_version(repo, tmp):
    ckpt = real_ckpt(repo, "diffusion.pt")
    ckpt["format_version"] = 99
    path = tmp / "diffusion_v99.pt"
    torch.save(ckpt, path)
    return infer(str(path)), [str(path), "version 99"]


def _weights_do_not_fit(repo, tmp):
    ckpt = real_ckpt(repo, "diffusion.pt")
    ckpt["model_config"]["hidden_dim"] += 8
    path = tmp / "diffusion_wrong_config.pt"
    torch.save(ckpt, path)
    return infer(str(path)), [str(path)]


def _ae_latent_mismatch_train(repo, tmp):
    ae = autoencoder_ckpt(tmp, 8)
    return [*TRAIN_DIFFUSION, "--ae-ckpt", str(ae)], [str(ae), "diffusion.latent_dim"]


def _ae_latent_mismatch_infer(repo, tmp):
    ae = autoencoder_ckpt(tmp, 8)
    return infer("models/diffusion.pt", str(ae)), [str(ae)]


def _samples_wrong_shape(repo, tmp):
    path = tmp / "samples.npz"
    np.savez(path, images=np.zeros((20, 32, 32), np.uint8))
    return [*EVALUATE, "--samples", str(path)], [str(path), "(20, 32, 32)"]


def _samples_no_images(repo, tmp):
    path = tmp / "samples.npz"
    np.savez(path, pictures=np.zeros((20, 28, 28), np.uint8))
    return [*EVALUATE, "--samples", str(path)], [str(path), "images"]


def _samples_missing(repo, tmp):
    return [*EVALUATE, "--samples", str(tmp / "none.npz")], [str(tmp / "none.npz")]


def _latents_missing(repo, tmp):
    return [*TRAIN_DIFFUSION[:1], "--latents", str(tmp / "latents"), *TRAIN_DIFFUSION[3:]], \
        [str(tmp / "latents")]


def _fixed(argv: list[str], culprits: list[str]) -> Case:
    return lambda repo, tmp: (argv, culprits)


CASES: dict[str, Case] = {
    # params.yaml
    "unknown-key": _params({"diffusion": {"learning_rate": 0.1}}, ["diffusion.learning_rate"]),
    "unknown-section": _params({"difusion": {"lr": 0.1}}, ["difusion"]),
    "wrong-type-lr": _params({"diffusion": {"lr": "fast"}}, ["diffusion.lr", "fast"]),
    "bool-for-int": _params({"diffusion": {"epochs": True}}, ["diffusion.epochs"]),
    "negative-lr": _params({"diffusion": {"lr": -0.001}}, ["diffusion.lr"]),
    "T-is-1": _params({"diffusion": {"T": 1}}, ["diffusion.T"]),
    "beta-end-below-start": _params({"diffusion": {"beta_start": 0.02, "beta_end": 0.01}}, ["diffusion.beta_end"]),
    "only-digit-12": _params({"diffusion": {"only_digit": 12}}, ["diffusion.only_digit", "12"]),
    "latent-dim-mismatch": _params({"autoencoder": {"latent_dim": 8}},
                                   ["diffusion.latent_dim", "autoencoder.latent_dim"]),
    "sampler-euler": _params({"sample": {"sampler": "euler"}}, ["sample.sampler", "euler", "ddpm", "ddim"],
                             infer()),
    "source-s3": _params({"data": {"source": "s3"}}, ["data.source", "s3", "auto", "idx", "huggingface", "bundled"],
                         ["prepare", "--out", "data/prepared"]),
    "negative-limit": _params({"data": {"limit_train": -5}}, ["data.limit_train"], ["prepare", "--out", "data/prepared"]),
    "section-not-mapping": _params_text("diffusion: 5\n", TRAIN_DIFFUSION),
    "invalid-yaml": _params_text("diffusion:\n  lr: [0.1, 0.2\n  epochs: 3\n", TRAIN_DIFFUSION),
    "params-missing": _fixed(["--params", "nope.yaml", *TRAIN_DIFFUSION], ["nope.yaml"]),
    # data files
    "idx-bad-magic": _bad_magic,
    "idx-truncated": _truncated_idx,
    "idx-missing": _idx_missing,
    "idx-corrupt-gzip": _idx_corrupt_gzip,
    "idx-label-out-of-range": _idx_bad_label,
    "idx-count-mismatch": _idx_count_mismatch,
    "idx-not-28x28": _idx_not_28x28,
    "prepared-split-corrupt": _encode_corrupt_test_split,
    "latents-missing": _latents_missing,
    # checkpoints
    "ckpt-truncated": _truncated_ckpt,
    "ckpt-empty": _empty_ckpt,
    "ckpt-random-bytes": _random_bytes_ckpt,
    "ckpt-missing": _missing_ckpt,
    "ckpt-autoencoder-as-diffusion": _ae_as_diffusion,
    "ckpt-evaluator-as-autoencoder": _evaluator_as_ae,
    "ckpt-diffusion-as-evaluator": _diffusion_as_evaluator,
    "ckpt-plain-dict": _plain_dict_ckpt,
    "ckpt-future-version": _future_format_version,
    "ckpt-weights-do-not-fit": _weights_do_not_fit,
    "ae-latent-dim-train": _ae_latent_mismatch_train,
    "ae-latent-dim-infer": _ae_latent_mismatch_infer,
    # flags
    "output-jpg": _fixed(infer(output="OUT/x.jpg"), ["--output", ".jpg"]),
    "digit-12": _fixed(infer("models/diffusion.pt", "models/autoencoder.pt", "--digit", "12"), ["--digit", "12"]),
    "num-images-0": _fixed(infer("models/diffusion.pt", "models/autoencoder.pt", "--num-images", "0"),
                           ["--num-images"]),
    "digit-on-unconditional": _fixed(infer("models/diffusion.pt", "models/autoencoder.pt", "--digit", "3"),
                                     ["--digit", "models/diffusion.pt", "unconditional"]),
    "steps-above-T": _fixed(infer("models/diffusion.pt", "models/autoencoder.pt", "--steps", "5000"),
                            ["--steps", "5000"]),
    "sampler-flag-euler": _fixed(infer("models/diffusion.pt", "models/autoencoder.pt", "--sampler", "euler"),
                                 ["--sampler", "euler"]),
    "epochs-0": _fixed([*TRAIN_DIFFUSION, "--epochs", "0"], ["--epochs"]),
    "samples-wrong-shape": _samples_wrong_shape,
    "samples-no-images": _samples_no_images,
    "samples-missing": _samples_missing,
    "unknown-command": _fixed(["fly"], ["fly"]),
}


@pytest.mark.parametrize("name", list(CASES))
def test_bad_input_is_one_line_error_and_changes_nothing(name: str, repo: Path, tmp_path: Path):
    argv, culprits = CASES[name](repo, tmp_path)
    argv = [a.replace("OUT", str(tmp_path)) for a in argv]
    before = snapshot(repo)

    proc = cli(*argv, cwd=repo, check=False)

    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    context = f"mnist-ldm {' '.join(argv)}\n--- stderr (tail)\n" + "\n".join(lines[-15:])
    assert proc.returncode == 2, context
    assert lines and lines[-1].startswith("error:"), context
    assert "Traceback" not in proc.stderr, context
    assert sum(line.startswith("error:") for line in lines) == 1, context
    for culprit in culprits:
        assert culprit in lines[-1], f"{culprit!r} not named\n{context}"
    assert snapshot(repo) == before, f"outputs changed\n{context}"
    assert not list(tmp_path.glob("x.*")), "an output file was written despite the error"

