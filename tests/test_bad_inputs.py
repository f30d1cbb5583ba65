"""Bad params, data files, checkpoints and flags: each is refused with one `error:` line that names it,
a non-zero exit, and no change to any output the pipeline already wrote."""

from __future__ import annotations

import gzip
import hashlib
import json
import os
import shutil
import signal
import struct
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable

import numpy as np
import pytest
import torch
import yaml

from conftest import REPO, cli, copy_repo, copy_trained, merge, run

# Everything a stage may write; an error must leave all of it as it was.
WATCHED_DIRS = ("models", "data/prepared", "data/latents", "outputs", "metrics", "plots")
WATCHED_FILES = ("params.yaml", "dvc.lock", "data/params_ok.json")


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
def repo(untracked_repo, tmp_path_factory) -> Path:
    """A shrunk copy of the project after a full `dvc repro` (tracking off: it only adds time here; a private
    copy of `untracked_repo`): models, data, samples and metrics exist."""
    repo = copy_repo(untracked_repo, tmp_path_factory.mktemp("bad_inputs") / "repo")
    for rel in ("models/autoencoder.pt", "models/diffusion.pt", "models/evaluator.pt", "data/prepared/train.npz",
                "data/latents/train.npz", "outputs/samples.npz", "metrics/eval.json"):
        assert (repo / rel).is_file(), rel
    return repo


@pytest.fixture(autouse=True)
def keep_params(request):
    """Cases use --params files elsewhere; params.yaml is restored even if a case edits it by mistake.
    (Tests that do not use the trained `repo` do not build it.)"""
    if "repo" not in request.fixturenames:
        yield
        return
    repo = request.getfixturevalue("repo")
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
    from mnist_ldm.autoencoder.model import Autoencoder, AutoencoderSpec
    from mnist_ldm.io.checkpoint import save_checkpoint

    model = Autoencoder(AutoencoderSpec(latent_dim=latent_dim))
    path = tmp / f"autoencoder_{latent_dim}d.pt"
    save_checkpoint(path, "mnist-ldm/autoencoder", {"model_config": model.spec.to_dict(),
                                                    "state_dict": model.state_dict()})
    return path


def infer(ckpt: str = "models/diffusion.pt", ae: str = "models/autoencoder.pt", *extra: str,
          output: str = "OUT/x.npz") -> list[str]:
    return ["infer", "--ckpt", ckpt, "--ae-ckpt", ae, "--num-images", "4", "--sampler", "ddim", "--steps", "2",
            "--output", output, *extra]


# Every path each command requires, as dvc.yaml passes them: a case changes only the one it is about.
STAGE_PATHS = {
    "prepare": {"out": "data/prepared"},
    "train-ae": {"data": "data/prepared", "out": "models/autoencoder.pt", "metrics": "metrics/autoencoder.json",
                 "plots": "plots/autoencoder"},
    "encode": {"data": "data/prepared", "ae_ckpt": "models/autoencoder.pt", "out": "data/latents"},
    "train-diffusion": {"ae_ckpt": "models/autoencoder.pt", "latents": "data/latents", "data": "data/prepared",
                        "out": "models/diffusion.pt", "metrics": "metrics/diffusion.json",
                        "plots": "plots/diffusion"},
    "sample": {"ckpt": "models/diffusion.pt", "ae_ckpt": "models/autoencoder.pt", "latents": "data/latents",
               "out": "outputs/samples.npz", "plots": "plots/sample", "metrics": "metrics/sample.json"},
    "train-evaluator": {"data": "data/prepared", "out": "models/evaluator.pt", "metrics": "metrics/evaluator.json"},
    "evaluate": {"samples": "outputs/samples.npz", "evaluator": "models/evaluator.pt", "data": "data/prepared",
                 "ae_ckpt": "models/autoencoder.pt", "latents": "data/latents", "output": "metrics/eval.json",
                 "plots": "plots/evaluate"},
}


def stage(command: str, *extra: str, **paths: str | Path) -> list[str]:
    """`command` with all its required paths (the repository's own unless given, e.g. ae_ckpt=...), then `extra`."""
    flags = {**STAGE_PATHS[command], **{k: str(v) for k, v in paths.items()}}
    return [command, *(x for k, v in flags.items() for x in ("--" + k.replace("_", "-"), v)), *extra]


TRAIN_DIFFUSION = stage("train-diffusion")
EVALUATE = stage("evaluate", "--no-tracking")


def write(path: Path, data: bytes) -> str:
    path.write_bytes(data)
    return str(path)


def params_text(repo: Path, changes: dict | None = None, drop: str | None = None) -> str:
    """The repository's params as YAML text, with `changes` merged in and section `drop` left out."""
    raw = merge(yaml.safe_load((repo / "params.yaml").read_text()), changes or {})
    raw.pop(drop, None)
    return yaml.safe_dump(raw, sort_keys=False)


def nan_weights(ckpt: dict, key: str = "state_dict", value: float = float("nan")) -> tuple[dict, str]:
    """`ckpt` with one element of its first float tensor under `key` set to `value`; and that tensor's name."""
    name = next(n for n, t in ckpt[key].items() if t.is_floating_point())
    ckpt[key] = {n: t.clone() for n, t in ckpt[key].items()}
    ckpt[key][name].view(-1)[0] = value
    return ckpt, name


def latents_copy(repo: Path, tmp: Path, **stats_changes) -> Path:
    """A copy of data/latents, with `stats_changes` applied to its stats.json."""
    d = tmp / "latents"
    shutil.copytree(repo / "data/latents", d)
    if stats_changes:
        stats = json.loads((d / "stats.json").read_text())
        (d / "stats.json").write_text(json.dumps({**stats, **stats_changes}))
    return d


def zero_image_prepared(repo: Path, tmp: Path) -> Path:
    """A prepared-data folder whose train.npz holds no images at all (test.npz and meta.json are real)."""
    d = tmp / "prepared"
    shutil.copytree(repo / "data/prepared", d)
    np.savez_compressed(d / "train.npz", images=np.zeros((0, 28, 28), np.uint8), labels=np.zeros((0,), np.uint8))
    return d


# --------------------------------------------------------------------------- the cases
# Each builder gets (repo, tmp dir) and returns (argv for mnist-ldm, strings the error line must contain).
# "OUT" in an argument is replaced by the case's tmp dir.

Case = Callable[[Path, Path], tuple[list[str], list[str]]]


def _params(changes: dict, culprits: list[str], cmd: list[str] | None = None) -> Case:
    def build(repo, tmp):
        return ["--params", params_file(repo, tmp, changes), *(cmd or TRAIN_DIFFUSION)], culprits
    return build


def _params_text(text: str | Callable[[Path], str | bytes], cmd: list[str], culprits: tuple[str, ...] = (),
                 params_after: bool = False) -> Case:
    """A params file holding `text` (or what `text(repo)` returns); the error names the file and `culprits`.
    With `params_after`, `--params` comes after the subcommand (both places are accepted)."""
    def build(repo, tmp):
        data = text(repo) if callable(text) else text
        path = write(tmp / "params.yaml", data.encode() if isinstance(data, str) else data)
        argv = [*cmd, "--params", path] if params_after else ["--params", path, *cmd]
        return argv, [path, *culprits]
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
    return stage("encode", data=prep), [str(prep / "test.npz")]


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
    return stage("evaluate", "--no-tracking", evaluator="models/diffusion.pt"), ["models/diffusion.pt"]


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


def _nan_diffusion(key: str, *extra: str, value: float = float("nan")) -> Case:
    """Non-finite weights in the diffusion checkpoint's `key` (infer reads the EMA weights with --ema, the raw ones with --raw-weights)."""
    def build(repo, tmp):
        ckpt, name = nan_weights(real_ckpt(repo, "diffusion.pt"), key, value)
        path = tmp / "diffusion_nan.pt"
        torch.save(ckpt, path)
        return infer(str(path), "models/autoencoder.pt", *extra), [str(path), f"'{name}'", "NaN or infinite"]
    return build


def _nan_autoencoder(command: str, value: float = float("nan")) -> Case:
    def build(repo, tmp):
        ckpt, name = nan_weights(real_ckpt(repo, "autoencoder.pt"), "state_dict", value)
        path = tmp / "autoencoder_nan.pt"
        torch.save(ckpt, path)
        argv = infer("models/diffusion.pt", str(path)) if command == "infer" else stage(command, ae_ckpt=path)
        return argv, [str(path), f"'{name}'", "NaN or infinite"]
    return build


def _ae_8d_train(repo, tmp):
    """An 8-d autoencoder with the 16-d latent cache: the cache was encoded by another autoencoder."""
    ae = autoencoder_ckpt(tmp, 8)
    return stage("train-diffusion", ae_ckpt=ae), [str(ae), "data/latents/stats.json", "another autoencoder"]


def _ae_latent_mismatch_infer(repo, tmp):
    ae = autoencoder_ckpt(tmp, 8)
    return infer("models/diffusion.pt", str(ae)), ["models/diffusion.pt", str(ae), "8-d", "16-d"]


def _other_ae_infer(repo, tmp):
    """Same latent size, other weights: only the md5 the diffusion checkpoint records tells them apart."""
    ae = autoencoder_ckpt(tmp, 16)
    return infer("models/diffusion.pt", str(ae)), ["models/diffusion.pt", str(ae), "another autoencoder"]


def _other_ae_sample(repo, tmp):
    """As above through the `sample` stage, with a latent cache that does belong to that autoencoder."""
    ae = autoencoder_ckpt(tmp, 16)
    latents = latents_copy(repo, tmp, ae_checkpoint_md5=md5(ae))
    return stage("sample", ae_ckpt=ae, latents=latents), ["models/diffusion.pt", str(ae), "another autoencoder"]


def _latents_of_other_ae(command: str) -> Case:
    """data/latents was encoded by the repository's autoencoder, and another one (same size) is given."""
    def build(repo, tmp):
        ae = autoencoder_ckpt(tmp, 16)
        argv = stage(command, *(["--no-tracking"] if command == "evaluate" else []), ae_ckpt=ae)
        return argv, ["data/latents/stats.json", str(ae), "another autoencoder"]
    return build


def _latents_no_producer(repo, tmp):
    """A cache from before producers were recorded: its autoencoder cannot be checked, so it is refused."""
    latents = latents_copy(repo, tmp, ae_checkpoint_md5=None)
    return stage("train-diffusion", latents=latents), [str(latents / "stats.json"), "models/autoencoder.pt"]


def _garbage_latents(repo, tmp):
    latents = latents_copy(repo, tmp)
    (latents / "train.npz").write_bytes(np.random.default_rng(1).bytes(5000))
    return stage("train-diffusion", latents=latents), [str(latents / "train.npz"), "not a readable latent file"]


def _zero_train_images(command: str) -> Case:
    """A prepared folder whose train.npz holds 0 images (not data.limit_train=0, which means all of them)."""
    def build(repo, tmp):
        prep = zero_image_prepared(repo, tmp)
        # outputs outside the repository: should the check ever be lost, shared outputs stay as they are
        outs = {k: "OUT/x_latents" if command == "encode" else f"OUT/x{Path(v).suffix}"
                for k, v in STAGE_PATHS[command].items() if k in ("out", "metrics", "output")}
        if "plots" in STAGE_PATHS[command]:
            outs["plots"] = "OUT/plots"
        return stage(command, data=prep, **outs), [str(prep / "train.npz"), "no images"]
    return build


def _samples_wrong_shape(repo, tmp):
    path = tmp / "samples.npz"
    np.savez(path, images=np.zeros((20, 32, 32), np.uint8))
    return stage("evaluate", "--no-tracking", samples=path), [str(path), "(20, 32, 32)"]


def _samples_no_images(repo, tmp):
    path = tmp / "samples.npz"
    np.savez(path, pictures=np.zeros((20, 28, 28), np.uint8))
    return stage("evaluate", "--no-tracking", samples=path), [str(path), "images"]


def _samples_missing(repo, tmp):
    return stage("evaluate", "--no-tracking", samples=tmp / "none.npz"), [str(tmp / "none.npz")]


def _latents_missing(repo, tmp):
    return stage("train-diffusion", latents=tmp / "latents"), [str(tmp / "latents")]


def _under_a_file(build: Callable[[str], list[str]], name: str) -> Case:
    """An output path whose parent is an existing file (OUT/somefile.txt/...)."""
    def case(repo, tmp):
        (tmp / "somefile.txt").write_text("not a folder\n")
        target = tmp / "somefile.txt" / name
        return build(str(target)), [str(target), "a parent of it is a file"]
    return case


def _output_is_a_folder(repo, tmp):
    (tmp / "dir.npz").mkdir()
    return infer(output=str(tmp / "dir.npz")), [str(tmp / "dir.npz"), "is a folder"]


def _fixed(argv: list[str], culprits: list[str]) -> Case:
    return lambda repo, tmp: (argv, culprits)


def _dup_key(repo: Path) -> str:
    return params_text(repo).replace("\ndiffusion:\n", "\ndiffusion:\n  lr: 0.0005\n", 1)


def _written(repo: Path, section: str, key: str, written: str) -> str:
    """The repository's params with `section.key` spelled exactly `written` (unquoted) in the YAML text."""
    text = params_text(repo, {section: {key: "@@"}})
    assert text.count(f"  {key}: '@@'\n") == 1, text
    return text.replace("'@@'", written)


def _float_as_text(section: str, key: str, written: str) -> Callable[[Path], str]:
    return lambda repo: _written(repo, section, key, written)


def _not_utf8(repo: Path) -> bytes:
    return params_text(repo).encode().replace(b"experiment: mnist-ldm", b"experiment: mnist-ldm \xe9t\xe9", 1)


def _params_dir(repo, tmp):
    return ["--params", str(tmp), *infer()], [str(tmp), "is a directory"]


def _section_not_mapping(repo: Path) -> str:
    text = params_text(repo, {"diffusion": "@@"})
    assert text.count("\ndiffusion: '@@'\n") == 1, text
    return text.replace("'@@'", "5")


ABSURD = "99999999999999999999999"
FAST = {}  # case -> seconds it must fail within (checks done before any expensive work)


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
    "diffusion-latent-dim-gone": _params({"diffusion": {"latent_dim": 16}}, ["diffusion.latent_dim", "unknown key"]),
    "sampler-euler": _params({"sample": {"sampler": "euler"}}, ["sample.sampler", "euler", "ddpm", "ddim"],
                             infer()),
    "source-s3": _params({"data": {"source": "s3"}}, ["data.source", "s3", "auto", "idx", "huggingface", "bundled"],
                         stage("prepare")),
    "negative-limit": _params({"data": {"limit_train": -5}}, ["data.limit_train"], stage("prepare")),
    "section-not-mapping": _params_text(_section_not_mapping, TRAIN_DIFFUSION, ("diffusion=5", "mapping")),
    "invalid-yaml": _params_text("diffusion:\n  lr: [0.1, 0.2\n  epochs: 3\n", TRAIN_DIFFUSION),
    "params-missing": _fixed(["--params", "nope.yaml", *TRAIN_DIFFUSION], ["nope.yaml"]),
    "params-duplicate-key": _params_text(_dup_key, TRAIN_DIFFUSION, ("duplicate key 'lr'", "line")),
    "params-empty": _params_text("", TRAIN_DIFFUSION, ("the file is empty",)),
    "params-empty-after-command": _params_text("", infer(), ("the file is empty",), params_after=True),
    "params-missing-section": _params_text(lambda repo: params_text(repo, drop="evaluate"), TRAIN_DIFFUSION,
                                           ("missing section evaluate",)),
    "params-lr-nan": _params_text(_float_as_text("diffusion", "lr", ".nan"), TRAIN_DIFFUSION,
                                  ("diffusion.lr=nan", "finite")),
    "params-guidance-inf": _params_text(_float_as_text("sample", "guidance", ".inf"), infer(),
                                        ("sample.guidance=inf", "finite")),
    "params-seed-1e30": _params_text(lambda repo: params_text(repo, {"sample": {"seed": 10 ** 30}}), infer(),
                                     (f"sample.seed={10 ** 30}", f"< {2 ** 63}")),
    "params-is-a-directory": _params_dir,
    "params-not-utf8": _params_text(_not_utf8, TRAIN_DIFFUSION, ("not UTF-8", "0xe9")),
    "set-lr-nan": _fixed(["--set", "diffusion.lr=.nan", *TRAIN_DIFFUSION], ["--set diffusion.lr=.nan", "finite"]),
    "set-unknown-key": _fixed([*infer(), "--set", "sample.latent_dim=8"], ["--set sample.latent_dim=8", "unknown key"]),
    # data files
    "idx-bad-magic": _bad_magic,
    "idx-truncated": _truncated_idx,
    "idx-missing": _idx_missing,
    "idx-corrupt-gzip": _idx_corrupt_gzip,
    "idx-label-out-of-range": _idx_bad_label,
    "idx-count-mismatch": _idx_count_mismatch,
    "idx-not-28x28": _idx_not_28x28,
    "prepared-split-corrupt": _encode_corrupt_test_split,
    "zero-train-images-train-ae": _zero_train_images("train-ae"),
    "zero-train-images-encode": _zero_train_images("encode"),
    "zero-train-images-train-evaluator": _zero_train_images("train-evaluator"),
    "zero-train-images-evaluate": _zero_train_images("evaluate"),
    "latents-missing": _latents_missing,
    "latents-garbage": _garbage_latents,
    "latents-of-other-ae-train-diffusion": _latents_of_other_ae("train-diffusion"),
    "latents-of-other-ae-sample": _latents_of_other_ae("sample"),
    "latents-of-other-ae-evaluate": _latents_of_other_ae("evaluate"),
    "latents-no-producer": _latents_no_producer,
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
    "ckpt-diffusion-nan-ema": _nan_diffusion("ema_state_dict", "--ema"),
    "ckpt-diffusion-nan-raw": _nan_diffusion("state_dict", "--raw-weights"),
    "ckpt-diffusion-inf-ema": _nan_diffusion("ema_state_dict", "--ema", value=float("inf")),
    "ckpt-autoencoder-nan-infer": _nan_autoencoder("infer"),
    "ckpt-autoencoder-nan-encode": _nan_autoencoder("encode"),
    "ckpt-autoencoder-inf-train-diffusion": _nan_autoencoder("train-diffusion", float("-inf")),
    "ae-8d-train": _ae_8d_train,
    "ae-latent-dim-infer": _ae_latent_mismatch_infer,
    "ae-other-weights-infer": _other_ae_infer,
    "ae-other-weights-sample": _other_ae_sample,
    # flags
    "latent-dim-flag": _fixed([*TRAIN_DIFFUSION, "--latent-dim", "8"], ["--latent-dim 8", "models/autoencoder.pt"]),
    "output-jpg": _fixed(infer(output="OUT/x.jpg"), ["--output", ".jpg"]),
    "output-under-a-file": _under_a_file(lambda p: infer("models/diffusion.pt", "models/autoencoder.pt",
                                                         "--num-images", "500000", "--sampler", "ddpm",
                                                         output=p), "x.npz"),
    "sample-plots-under-a-file": _under_a_file(lambda p: stage("sample", plots=p), "plots"),
    "train-diffusion-metrics-under-a-file": _under_a_file(lambda p: stage("train-diffusion", metrics=p), "x.json"),
    "output-is-a-folder": _output_is_a_folder,
    "digit-12": _fixed(infer("models/diffusion.pt", "models/autoencoder.pt", "--digit", "12"), ["--digit", "12"]),
    "num-images-0": _fixed(infer("models/diffusion.pt", "models/autoencoder.pt", "--num-images", "0"),
                           ["--num-images"]),
    "digit-on-unconditional": _fixed(infer("models/diffusion.pt", "models/autoencoder.pt", "--digit", "3"),
                                     ["--digit", "models/diffusion.pt", "unconditional"]),
    "steps-above-T": _fixed(infer("models/diffusion.pt", "models/autoencoder.pt", "--steps", "5000"),
                            ["--steps", "5000"]),
    "sampler-flag-euler": _fixed(infer("models/diffusion.pt", "models/autoencoder.pt", "--sampler", "euler"),
                                 ["--sampler", "euler"]),
    "guidance-flag-inf": _fixed(infer("models/diffusion.pt", "models/autoencoder.pt", "--guidance", "inf"),
                                ["--guidance inf", "sample.guidance", "a number"]),
    "eta-flag-1.5": _fixed(infer("models/diffusion.pt", "models/autoencoder.pt", "--eta", "1.5"),
                           ["--eta 1.5", "sample.eta=1.5", "<= 1"]),
    "seed-flag-absurd": _fixed(infer("models/diffusion.pt", "models/autoencoder.pt", "--seed", ABSURD),
                               ["--seed", ABSURD]),
    "lr-flag-nan": _fixed([*TRAIN_DIFFUSION, "--lr", "nan"], ["--lr", "nan"]),
    "epochs-0": _fixed([*TRAIN_DIFFUSION, "--epochs", "0"], ["--epochs"]),
    "samples-wrong-shape": _samples_wrong_shape,
    "samples-no-images": _samples_no_images,
    "samples-missing": _samples_missing,
    "missing-required-path": _fixed(["infer", "--ckpt", "models/diffusion.pt"], ["--ae-ckpt", "required"]),
    "unknown-command": _fixed(["fly"], ["fly"]),
}
FAST.update({"output-under-a-file": 20.0, "sample-plots-under-a-file": 20.0,
             "train-diffusion-metrics-under-a-file": 20.0})


# --------------------------------------------------------------------------- paths a command cannot use
# Outputs that are inputs, devices, symlink loops and absurd sizes. Besides the repository, every file the
# case put in its tmp dir must be left as it was.

def _loop(tmp: Path, name: str) -> Path:
    (tmp / f"{name}.b").symlink_to(tmp / f"{name}.a")
    (tmp / f"{name}.a").symlink_to(tmp / f"{name}.b")
    return tmp / f"{name}.a"


def _ckpt_symlink_loop(repo, tmp):
    loop = _loop(tmp, "ckpt")
    return infer(str(loop)), [f"--ckpt {loop}", "symlink loop"]


def _ckpt_dangling(repo, tmp):
    (tmp / "gone.pt").symlink_to(tmp / "moved" / "diffusion.pt")
    return infer(str(tmp / "gone.pt")), [f"--ckpt {tmp / 'gone.pt'}", "does not exist"]


def _output_symlink_loop(repo, tmp):
    loop = _loop(tmp, "eval")
    return stage("evaluate", "--no-tracking", output=loop, plots="OUT/plots"), [f"--output {loop}", "symlink loop"]


def _output_into_dvc_cache(repo, tmp):
    cached = next(p for p in sorted((repo / ".dvc/cache").rglob("*")) if p.is_file())
    (tmp / "eval.json").symlink_to(cached)
    return stage("evaluate", "--no-tracking", output=tmp / "eval.json", plots="OUT/plots"), \
        [f"--output {tmp / 'eval.json'}", "DVC's cache", "dvc unprotect"]


def _prepare_here_params_elsewhere(repo, tmp):
    return ["--params", params_file(repo, tmp, {}), *stage("prepare", out=".")], ["--out .", "the current folder"]


# --------------------------------------------------------------------------- files trusted past their type

def _samples(make: Callable[[np.ndarray], dict]) -> Case:
    """evaluate --samples: the repository's samples as `make(images)` writes them."""
    def build(repo, tmp):
        with np.load(repo / "outputs/samples.npz") as f:
            images = f["images"]
        path = tmp / "samples.npz"
        np.savez(path, **make(images))
        return stage("evaluate", "--no-tracking", samples=path), [str(path)]
    return build


def _nan_pixel(images: np.ndarray) -> dict:
    x = images.astype(np.float32) / 255
    x[0, 0, 0] = np.nan  # `min() < 0` is False with a NaN: a range check that compares misses it
    return {"images": x}


def _meta(text: str, culprit: str) -> Case:
    def build(repo, tmp):
        prep = tmp / "prepared"
        shutil.copytree(repo / "data/prepared", prep)
        (prep / "meta.json").write_text(text)
        return stage("train-evaluator", data=prep, out="OUT/x.pt", metrics="OUT/x.json"), \
            [str(prep / "meta.json"), culprit]
    return build


def _prepared_labels(labels: Callable[[np.ndarray], np.ndarray]) -> Case:
    """A prepared folder whose train.npz holds `labels(its labels)`."""
    def build(repo, tmp):
        prep = tmp / "prepared"
        shutil.copytree(repo / "data/prepared", prep)
        with np.load(prep / "train.npz") as f:
            images, old = f["images"], f["labels"]
        np.savez(prep / "train.npz", images=images, labels=labels(old))
        return stage("train-evaluator", data=prep, out="OUT/x.pt", metrics="OUT/x.json"), \
            [str(prep / "train.npz"), "uint8 labels 0-9"]
    return build


def _ckpt_field(name: str, change: Callable[[dict], None], *culprits: str) -> Case:
    """A copy of models/`name` with `change` applied, used where infer reads it."""
    def build(repo, tmp):
        ckpt = real_ckpt(repo, name)
        change(ckpt)
        path = tmp / name
        torch.save(ckpt, path)
        argv = infer(str(path)) if name == "diffusion.pt" else infer("models/diffusion.pt", str(path))
        return argv, [str(path), *culprits]
    return build


def _truncated_features(repo, tmp):
    from mnist_ldm.evaluator.model import save_reference

    path = tmp / "features.npz"
    save_reference(path, {k: np.zeros((100, 128)) for k in ("train", "test", "test_to_train")}, weights_sha256="0")
    path.write_bytes(path.read_bytes()[:3000])
    return stage("evaluate", "--no-tracking", "--features", str(path), output="OUT/x.json", plots="OUT/plots"), \
        [str(path), "reference features"]


def _fifo_params(repo, tmp):
    os.mkfifo(tmp / "params.fifo")  # nobody writes to it: reading it would wait for ever
    return ["--params", str(tmp / "params.fifo"), *infer()], [str(tmp / "params.fifo"), "not a regular file"]


def _alias_bomb(repo: Path) -> str:
    """diffusion.lr as nine levels of YAML aliases, 9^9 numbers once expanded: the error must not expand it."""
    value = "&a0 [1, 1, 1, 1, 1, 1, 1, 1, 1]"
    for i in range(1, 9):
        value = f"&a{i} [{value}, " + ", ".join([f"*a{i - 1}"] * 8) + "]"
    return _written(repo, "diffusion", "lr", value)


TRUSTED = {
    "samples-nan-pixel": _samples(_nan_pixel),
    "samples-labels-shorter": _samples(lambda im: {"images": im, "labels": np.zeros(3, np.int64)}),
    "samples-labels-12": _samples(lambda im: {"images": im, "labels": np.full(len(im), 12)}),
    "samples-labels-text": _samples(lambda im: {"images": im, "labels": np.array(["7"] * len(im))}),
    "prepared-labels-shorter": _prepared_labels(lambda y: y[:-1]),
    "prepared-labels-12": _prepared_labels(lambda y: np.where(y == 3, 12, y).astype(np.uint8)),
    "prepared-labels-text": _prepared_labels(lambda y: y.astype(str)),
    "meta-json-list": _meta("[]", "expected a mapping"),
    "meta-json-empty": _meta("{}", "missing key 'source'"),
    "meta-json-bad-hash": _meta(json.dumps({"source": "x", "description": "y", "counts": {"train": 1, "test": 1},
                                            "content_hash": 5}), "content_hash=5"),
    "features-truncated": _truncated_features,
    "ckpt-negative-width": _ckpt_field("diffusion.pt", lambda c: c["model_config"].update(hidden_dim=-4),
                                       "model_config.hidden_dim=-4", ">= 1"),
    "ckpt-T-1e12": _ckpt_field("diffusion.pt", lambda c: c["schedule"].update(T=10 ** 12), "T=1000000000000"),
    "ckpt-schedule-kind-unknown": _ckpt_field("diffusion.pt", lambda c: c["schedule"].update(kind="cosine"),
                                              "schedule.kind='cosine'"),
    "ckpt-autoencoder-negative-channels": _ckpt_field("autoencoder.pt",
                                                      lambda c: c["model_config"].update(channels=[-1, 64, 128]),
                                                      "model_config.channels.0=-1"),
    "ckpt-autoencoder-kind-unknown": _ckpt_field("autoencoder.pt", lambda c: c["model_config"].update(kind="vae"),
                                                 "model_config.kind='vae'"),
    # values taken and not used, or reported as what they are not
    "device-empty": _fixed([*infer(), "--device", ""], ["--device=''", "not a device"]),
    "second-evaluator-is-evaluator": _fixed([*EVALUATE, "--second-evaluator", "models/evaluator.pt"],
                                            ["--second-evaluator models/evaluator.pt", "weights of --evaluator"]),
    "infer-output-onto-pipeline-output": _fixed(infer(output="outputs/samples.npz"),
                                                ["--output outputs/samples.npz", "stage 'sample'"]),
    "sample-out-png": _fixed(stage("sample", out="OUT/x.png", plots="OUT/plots", metrics="OUT/x.json"),
                             ["--out", "x.png", ".npz"]),
    # what the operating system hands over
    "params-dev-zero": _fixed(["--params", "/dev/zero", *infer()], ["/dev/zero", "not a regular file"]),
    "params-fifo": _fifo_params,
    "params-alias-bomb": _params_text(_alias_bomb, TRAIN_DIFFUSION, ("diffusion.lr=[[", "expected a number")),
    # training that goes wrong but finishes
    "train-ae-diverges": _fixed(["--set", "autoencoder.lr=1", *stage("train-ae", out="OUT/x.pt", metrics="OUT/x.json",
                                                                      plots="OUT/plots")],
                                ["train_ae: loss became", "1000x its first", "lower lr"]),
}
FAST.update({name: 20.0 for name in TRUSTED if name.startswith(("params-", "device-", "infer-", "sample-"))})
CASES.update(TRUSTED)


HOSTILE: dict[str, Case] = {
    "evaluate-output-is-samples": _fixed(stage("evaluate", "--no-tracking", output="outputs/samples.npz",
                                               plots="OUT/plots"),
                                         ["--output outputs/samples.npz", "is also --samples", "an input"]),
    "evaluate-output-is-params": _fixed(stage("evaluate", "--no-tracking", output="params.yaml", plots="OUT/plots"),
                                        ["--output params.yaml", "is also --params"]),
    "evaluate-plots-is-latents": _fixed(stage("evaluate", "--no-tracking", output="OUT/x.json", plots="data/latents"),
                                        ["--plots data/latents", "is also --latents"]),
    "encode-out-inside-data": _fixed(stage("encode", out="data/prepared/latents"),
                                     ["--out data/prepared/latents", "is inside --data data/prepared"]),
    "encode-out-holds-data": _fixed(stage("encode", out="data"), ["--out data", "holds --data data/prepared"]),
    "train-ae-metrics-inside-plots": _fixed(stage("train-ae", out="OUT/x.pt", metrics="OUT/p/x.json", plots="OUT/p"),
                                            ["--metrics", "is inside --plots", "another output"]),
    "train-evaluator-out-is-metrics": _fixed(stage("train-evaluator", out="OUT/x.json", metrics="OUT/x.json"),
                                             ["--out", "is also --metrics"]),
    "evaluate-plots-dot": _fixed(stage("evaluate", "--no-tracking", output="OUT/x.json", plots="."), ["--plots ."]),
    "evaluate-plots-root": _fixed(stage("evaluate", "--no-tracking", output="OUT/x.json", plots="/"), ["--plots /"]),
    "prepare-out-dot": _fixed(stage("prepare", out="."), ["--out .", "holds --params params.yaml"]),
    "prepare-out-dot-params-elsewhere": _prepare_here_params_elsewhere,
    "evaluate-output-dev-null": _fixed(stage("evaluate", "--no-tracking", output="/dev/null", plots="OUT/plots"),
                                       ["--output /dev/null", "character device"]),
    "evaluate-output-symlink-loop": _output_symlink_loop,
    "evaluate-output-into-dvc-cache": _output_into_dvc_cache,
    "ckpt-is-a-folder": _fixed(infer("models"), ["--ckpt models", "is a folder, not a file"]),
    "ckpt-dev-null": _fixed(infer("/dev/null"), ["--ckpt /dev/null", "character device"]),
    "ckpt-symlink-loop": _ckpt_symlink_loop,
    "ckpt-dangling-symlink": _ckpt_dangling,
    "ae-ckpt-is-root": _fixed(infer("models/diffusion.pt", "/"), ["--ae-ckpt /", "is a folder"]),
    "data-dev-null": _fixed(stage("train-evaluator", data="/dev/null", out="OUT/x.pt", metrics="OUT/x.json"),
                            ["--data /dev/null", "character device, not a folder"]),
    "latents-is-a-file": _fixed(stage("train-diffusion", latents="models/diffusion.pt"),
                                ["--latents models/diffusion.pt", "is a file, not a folder"]),
    "samples-is-a-folder": _fixed(stage("evaluate", "--no-tracking", samples=".", output="OUT/x.json",
                                        plots="OUT/plots"), ["--samples .", "is a folder"]),
    "num-images-1e8": _fixed(infer("models/diffusion.pt", "models/autoencoder.pt", "--num-images", "100000000"),
                             ["--num-images 100000000", "of memory", "is available"]),
    "sample-batch-1e9": _fixed(["--set", "sample.num_images=1000000000", "--set", "sample.batch_size=1000000000",
                                *stage("sample", out="OUT/x.npz", plots="OUT/plots", metrics="OUT/x.json")],
                               ["sample.num_images=1000000000", "of memory"]),
}
FAST.update({name: 20.0 for name in HOSTILE})
CASES.update(HOSTILE)


def tmp_tree(tmp: Path) -> dict[str, str]:
    """Every file and symlink under `tmp`: its md5, or where the link points."""
    return {str(p.relative_to(tmp)): (f"-> {os.readlink(p)}" if p.is_symlink() else md5(p))
            for p in sorted(tmp.rglob("*")) if p.is_symlink() or p.is_file()}


@pytest.mark.parametrize("name", list(CASES))
def test_bad_input_is_one_line_error_and_changes_nothing(name: str, repo: Path, tmp_path: Path):
    argv, culprits = CASES[name](repo, tmp_path)
    argv = [a.replace("OUT", str(tmp_path)) for a in argv]
    before, users = snapshot(repo), tmp_tree(tmp_path)

    t0 = time.monotonic()
    proc = cli(*argv, cwd=repo, check=False)
    seconds = time.monotonic() - t0

    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    context = f"mnist-ldm {' '.join(argv)}\n--- stderr (tail)\n" + "\n".join(lines[-15:])
    assert proc.returncode == 2, context
    assert lines and lines[-1].startswith("error:"), context
    assert "Traceback" not in proc.stderr, context
    assert sum(line.startswith("error:") for line in lines) == 1, context
    for culprit in culprits:
        assert culprit in lines[-1], f"{culprit!r} not named\n{context}"
    assert snapshot(repo) == before, f"outputs changed\n{context}"
    assert tmp_tree(tmp_path) == users, f"files in the case's folder changed\n{context}"
    assert not list(tmp_path.glob("x.*")), "an output file was written despite the error"
    if name in FAST:  # refused before loading models or sampling, not after
        assert seconds < FAST[name], f"took {seconds:.1f} s to fail\n{context}"


def test_an_environment_variable_is_checked_like_a_flag(repo: Path, tmp_path: Path):
    """WORLD_SIZE (torchrun's) that is not a number: one line naming it, before any work."""
    proc = cli(*infer(output=str(tmp_path / "x.npz")), cwd=repo, check=False, env={**os.environ, "WORLD_SIZE": "abc"})
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    assert lines[-1] == "error: WORLD_SIZE='abc' is not allowed; expected a whole number >= 0 (torchrun sets it)"
    assert list(tmp_path.iterdir()) == []


def test_a_failing_stage_under_dvc_ends_with_how_to_get_its_outputs_back(repo: Path, tmp_path: Path):
    """As DVC runs a stage (DVC_STAGE set), a refusal is the `error:` line, then the `dvc checkout` line."""
    proc = cli(*stage("sample", out=str(tmp_path / "x.png")), cwd=repo, check=False,
               env={**os.environ, "DVC_STAGE": "sample"})
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert proc.returncode == 2 and lines[-2].startswith("error: --out"), proc.stderr[-2000:]
    assert lines[-1] == ("DVC removed the previous outputs of stage 'sample' before running it; `dvc checkout "
                         "sample` brings them back from the cache, `git checkout HEAD -- metrics/sample.json` the "
                         "ones git keeps"), proc.stderr[-2000:]


def test_a_locked_tracking_store_is_one_line(repo: Path, tmp_path: Path):
    """Another process holds mlflow.db's write lock: the stage says so in one line, before its work."""
    import sqlite3

    before = snapshot(repo)
    db = md5(repo / "mlflow.db")
    holder = sqlite3.connect(repo / "mlflow.db", isolation_level=None)
    holder.execute("BEGIN EXCLUSIVE")
    try:
        proc = cli("--set", "tracking.enabled=true", *stage("evaluate", output=str(tmp_path / "x.json"),
                                                            plots=str(tmp_path / "plots")), cwd=repo, check=False)
    finally:
        holder.execute("ROLLBACK")
        holder.close()
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    assert lines[-1].startswith(f"error: MLflow store {repo / 'mlflow.db'} cannot be written (database is locked)")
    assert sum(line.startswith("error:") for line in lines) == 1 and len(lines[-1]) < 300, proc.stderr[-2000:]
    assert snapshot(repo) == before and md5(repo / "mlflow.db") == db and list(tmp_path.iterdir()) == []


def test_samples_per_timestep_above_the_batch_warns_and_trains_the_same(repo: Path, tmp_path: Path):
    """diffusion.samples_per_timestep=100000 with batches of 64: a warning, and the weights of 64 (no padded rows:
    it ran 60x slower)."""
    out = {}
    for spt in (100000, 64):
        proc = cli("--set", f"diffusion.samples_per_timestep={spt}", "--set", "diffusion.generate_images=false",
                   *stage("train-diffusion", out=tmp_path / f"{spt}.pt", metrics=tmp_path / f"{spt}.json",
                          plots=tmp_path / f"plots{spt}"), cwd=repo)
        out[spt] = (proc.stderr, torch.load(tmp_path / f"{spt}.pt", weights_only=True)["state_dict"])
    assert "warning: diffusion.samples_per_timestep=100000 is more than diffusion.batch_size=64" in out[100000][0]
    assert "warning" not in out[64][0]
    assert all(torch.equal(out[100000][1][k], out[64][1][k]) for k in out[64][1])


def test_metrics_json_never_holds_nan(tmp_path: Path):
    """write_json turns non-finite floats into null and records them under "absent"; strict JSON readers
    (DVC, MLflow, json.loads with parse_constant raising) accept the file."""
    from mnist_ldm.io.atomic import write_json

    def no_constants(name: str):
        raise ValueError(f"non-standard JSON constant {name}")

    path = tmp_path / "m.json"
    write_json(path, {"fcd": {"generated": float("nan"), "floor": 1.5}, "loss": float("inf"),
                      "curve": [0.5, float("-inf")], "ok": np.float32(2.0), "bad32": np.float32("nan"),
                      "per_class": np.array([1.0, np.nan])})
    text = path.read_text()
    assert "NaN" not in text and "Infinity" not in text, text
    data = json.loads(text, parse_constant=no_constants)
    assert data["fcd"] == {"generated": None, "floor": 1.5}
    assert data["loss"] is None and data["curve"] == [0.5, None] and data["bad32"] is None
    assert data["ok"] == 2.0 and data["per_class"] == [1.0, None]
    assert set(data["absent"]) == {"fcd.generated", "loss", "curve[1]", "bad32", "per_class[1]"}, data["absent"]
    assert all("not finite" in why for why in data["absent"].values())

    write_json(path, {"fcd": 1.0})  # all finite: no "absent" entry at all
    assert json.loads(path.read_text(), parse_constant=no_constants) == {"fcd": 1.0}



def test_a_bad_param_is_refused_before_torch_or_mlflow_load(tmp_path: Path):
    """Every command validates params.yaml before it imports the library: a typo costs a fraction of a
    second, not torch's start-up."""
    bad = tmp_path / "params.yaml"
    bad.write_text((REPO / "params.yaml").read_text().replace("lr: 0.0016", "lr: fast"))
    script = f"""
import shlex, sys, yaml
from mnist_ldm.commands.cli import COMMANDS, main
stages = yaml.safe_load(open({str(REPO / "dvc.yaml")!r}))["stages"]
extra = {{"infer": ["--ckpt", "a.pt", "--ae-ckpt", "b.pt"], "promote": [], "ui": [], "summary": [],
          "evaluate": shlex.split(stages["evaluate"]["cmd"])[2:]}}
for command, module in COMMANDS.items():
    args = extra[command] if command in extra else shlex.split(stages[module]["cmd"])[2:]
    code = main([command, "--params", {str(bad)!r}, *args])
    loaded = [m for m in ("torch", "mlflow") if m in sys.modules]
    print(command, code, loaded)
    assert code == 2 and not loaded, (command, code, loaded)
"""
    proc = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 13 and all("diffusion.lr='fast'" in e for e in errors), proc.stderr


# --------------------------------------------------------------------------- outputs it owns, written through links

def test_a_symlinked_output_is_written_through_to_its_target(repo: Path, tmp_path: Path):
    """`--output link.npz` pointing at real/x.npz: the link stays a link, the file it points to gets the new
    samples (written beside it and renamed into place: no temporary file is left in either folder)."""
    (tmp_path / "real").mkdir()
    target = tmp_path / "real" / "x.npz"
    target.write_bytes(b"an older output")
    link = tmp_path / "link.npz"
    link.symlink_to(target)
    cli(*infer(output=str(link)), cwd=repo)
    assert link.is_symlink() and os.readlink(link) == str(target)
    with np.load(target) as f:
        assert f["images"].shape == (4, 28, 28)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["link.npz", "real"]
    assert [p.name for p in (tmp_path / "real").iterdir()] == ["x.npz"]


def test_atomic_folder_and_file_write_through_symlinks(tmp_path: Path):
    from mnist_ldm.io.atomic import atomic_dir, write_json

    (tmp_path / "real").mkdir()
    (tmp_path / "real" / "fcd.png").write_bytes(b"old")
    (tmp_path / "plots").symlink_to(tmp_path / "real")
    with atomic_dir(tmp_path / "plots") as tmp:
        (tmp / "fcd.png").write_bytes(b"new")
    assert (tmp_path / "plots").is_symlink() and (tmp_path / "real" / "fcd.png").read_bytes() == b"new"
    (tmp_path / "m.json").symlink_to(tmp_path / "real" / "m.json")  # dangling: the target is created
    write_json(tmp_path / "m.json", {"a": 1})
    assert (tmp_path / "m.json").is_symlink() and json.loads((tmp_path / "real" / "m.json").read_text()) == {"a": 1}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.json", "plots", "real"]
    assert sorted(p.name for p in (tmp_path / "real").iterdir()) == ["fcd.png", "m.json"]


def test_a_users_folder_given_as_an_output_keeps_every_file_of_its_own(repo: Path, tmp_path: Path):
    """`prepare --out` a user's folder: the stage's files are written into it (an older one of the same name
    replaced), and the user's file and subfolder stay as they were; nothing temporary is left beside it."""
    d = tmp_path / "v"
    (d / "photos").mkdir(parents=True)
    (d / "thesis.txt").write_text("four years of work\n")
    (d / "photos" / "cat.jpg").write_bytes(b"\xff\xd8 a photo")
    (d / "meta.json").write_text("from an older run")
    users = {k: v for k, v in tmp_tree(tmp_path).items() if "meta.json" not in k}
    cli(*stage("prepare", out=d), cwd=repo)
    assert {k: v for k, v in tmp_tree(tmp_path).items() if k in users} == users
    assert sorted(p.name for p in d.iterdir()) == ["meta.json", "photos", "test.npz", "thesis.txt", "train.npz"]
    assert (d / "meta.json").read_bytes() == (repo / "data/prepared/meta.json").read_bytes()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["v"]


def test_interrupt_outside_dvc_says_only_interrupted(monkeypatch):
    from mnist_ldm.runtime.command import interrupted_line

    monkeypatch.delenv("DVC_STAGE", raising=False)
    assert interrupted_line() == "interrupted"


def as_from_a_shell() -> None:
    """In the child, before exec: SIGINT and SIGTERM as a shell starts a command, neither blocked nor ignored.
    A test worker may carry either state from an earlier test's library, and children inherit both."""
    signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT, signal.SIGTERM})
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, signal.SIG_DFL)


def signal_states(pid: int) -> str:
    """The blocked and ignored signal masks of `pid`, its process group and this process (from /proc)."""
    out = []
    for p in sorted({pid, os.getpid(), *(int(d.name) for d in Path("/proc").iterdir()
                                          if d.name.isdigit() and pgid_of(int(d.name)) == pid)}):
        try:
            status = Path(f"/proc/{p}/status").read_text().splitlines()
            cmd = Path(f"/proc/{p}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")[:80]
        except OSError:
            continue
        out.append(f"{p} {cmd}: " + " ".join(line for line in status if line.startswith(("SigBlk", "SigIgn"))))
    return "\n".join(out)


def pgid_of(pid: int) -> int:
    try:
        return os.getpgid(pid)
    except OSError:
        return -1


def wait_for_sampling(log: Path, proc: subprocess.Popen, deadline: float) -> None:
    """Until the command writing `log` draws its sampling progress bar (fails if it has not by `deadline`)."""
    while "sample ddpm" not in log.read_text(errors="replace") and time.monotonic() < deadline:
        time.sleep(0.2)
    assert "sample ddpm" in log.read_text(errors="replace") and proc.poll() is None, log.read_text()[-2000:]


def test_interrupted_dvc_stage_says_how_to_bring_back_its_outputs(trained_repo: Path, tmp_path: Path):
    """Ctrl-C during `dvc repro` of `sample`: DVC deleted the stage's outputs before running it; the stage's
    last line says so and names `dvc checkout sample`, which brings them back byte for byte."""
    from conftest import BIN, test_env, write_params

    repo = copy_trained(trained_repo, tmp_path / "repo")
    outs = ("outputs/samples.npz", "plots/sample/grid.png", "metrics/sample.json")
    before = {rel: md5(repo / rel) for rel in outs}
    # a minute of sampling (about 3 GB of memory), MLflow off
    write_params(repo, {"sample": {"num_images": 300000, "sampler": "ddpm", "steps": 250, "eta": 1.0},
                        "tracking": {"enabled": False}})  # ddpm takes no steps or eta of its own
    log = tmp_path / "repro.log"
    with open(log, "w") as f:
        proc = subprocess.Popen([str(BIN / "dvc"), "repro", "sample"], cwd=repo, env=test_env(), stdout=f,
                                stderr=subprocess.STDOUT, start_new_session=True, preexec_fn=as_from_a_shell)
    try:
        deadline = time.monotonic() + 120
        while (repo / "outputs/samples.npz").exists() and time.monotonic() < deadline:
            time.sleep(0.2)
        assert not (repo / "outputs/samples.npz").exists(), log.read_text()[-2000:]
        # into its sampling (a fixed wait could end while DVC, slowed by other work on the machine, is still
        # between removing the outputs and starting the command)
        wait_for_sampling(log, proc, deadline)
        states = signal_states(proc.pid)  # a blocked or ignored SIGINT, inherited, would make Ctrl-C do nothing
        os.killpg(proc.pid, signal.SIGINT)
        proc.wait(timeout=120)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    text = log.read_text()
    assert proc.returncode != 0, f"{states}\n{text[-2000:]}"
    line = "interrupted: DVC removed the previous outputs of stage 'sample' before running it; " \
           "`dvc checkout sample` brings them back from the cache, `git checkout HEAD -- metrics/sample.json` " \
           "the ones git keeps"
    assert line in text.splitlines(), text[-3000:]
    assert "Traceback" not in text, text[-3000:]
    subprocess.run(["git", "checkout", "params.yaml"], cwd=repo, check=True)
    run([str(BIN / "dvc"), "checkout", "sample"], repo)
    run(["git", "checkout", "HEAD", "--", "metrics/sample.json"], repo)
    assert {rel: md5(repo / rel) for rel in outs} == before


def test_sigterm_ends_a_command_like_ctrl_c(repo: Path, tmp_path: Path):
    """SIGTERM (e.g. `kill`, `dvc queue kill`) mid-sampling: exit 130, the interrupt line last, no traceback,
    no output; with DVC_STAGE set, as DVC sets it for a stage's command, the line names the stage."""
    from conftest import BIN, test_env

    out = tmp_path / "x.npz"
    argv = [str(BIN / "mnist-ldm"), *infer(output=str(out))]
    argv[argv.index("--num-images") + 1], argv[argv.index("--sampler") + 1] = "300000", "ddpm"
    del argv[argv.index("--steps"):argv.index("--steps") + 2]  # ddpm runs all T steps: --steps is refused
    log = tmp_path.parent / f"{tmp_path.name}.stderr"  # beside tmp_path, which must stay empty
    with open(log, "w") as f:
        proc = subprocess.Popen(argv, cwd=repo, env=test_env(DVC_STAGE="sample"), stdout=subprocess.DEVNULL,
                                stderr=f, text=True, preexec_fn=as_from_a_shell)
    try:
        wait_for_sampling(log, proc, time.monotonic() + 120)
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    err = log.read_text(errors="replace")
    lines = [line.split("\r")[-1].strip() for line in err.splitlines() if line.strip()]
    assert proc.returncode == 130 and "Traceback" not in err, err[-2000:]
    assert lines[-1] == ("interrupted: DVC removed the previous outputs of stage 'sample' before running it; "
                         "`dvc checkout sample` brings them back from the cache, `git checkout HEAD -- "
                         "metrics/sample.json` the ones git keeps"), err[-2000:]
    assert not out.exists() and sorted(p.name for p in tmp_path.iterdir()) == []


def test_the_interrupt_line_starts_its_own_line_after_a_bar_cut_short_in_its_constructor(capsys):
    """Ctrl-C or SIGTERM can land in tqdm's constructor after it drew the bar and before it noted the time; tqdm's
    `close` then leaves the bar on its line. `close_bars` (run before `interrupted` is printed) clears it too."""
    from mnist_ldm.runtime.progress import close_bars, progress

    bar = progress(total=50, desc="sample ddpm")
    del bar.last_print_t  # the constructor's state when the interrupt lands right after its first draw
    close_bars()
    print("interrupted", file=sys.stderr)
    err = capsys.readouterr().err
    assert "sample ddpm" in err and err.splitlines()[-1].split("\r")[-1] == "interrupted", repr(err)
