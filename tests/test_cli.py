"""The `mnist-ldm` command line on the shrunk, trained repository: `infer` outputs and seeding, the
reference design's training flags, and one-line errors for checkpoints that cannot be used."""

from __future__ import annotations

import hashlib
import importlib
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from conftest import cli, make_repo_copy
from conftest import test_env as base_env  # aliased: pytest would collect a `test_*` name
from mnist_ldm.autoencoder.model import Autoencoder, AutoencoderSpec
from mnist_ldm.commands.cli import COMMANDS
from mnist_ldm.io.checkpoint import save_checkpoint
from mnist_ldm.diffusion.denoiser import DenoiserSpec, LatentDenoiser

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def env(**extra: str) -> dict[str, str]:
    # Tiny models on 2 shared cores: one intra-op thread per process avoids oversubscription.
    return base_env(OMP_NUM_THREADS="1", **extra)


def _snapshot(root: Path) -> dict[str, tuple[int, int]]:
    return {str(p.relative_to(root)): (p.stat().st_size, p.stat().st_mtime_ns)
            for p in sorted(root.rglob("*")) if p.is_file() and ".git" not in p.relative_to(root).parts[:1]}


@pytest.fixture(scope="module", autouse=True)
def repo_stays_unchanged(trained_repo):
    """Every test here only reads the shared trained repository."""
    before = _snapshot(trained_repo)
    yield
    after = _snapshot(trained_repo)
    assert after == before, sorted(set(after.items()) ^ set(before.items()))[:10]


def infer(repo: Path, output: Path, *extra: str, check: bool = True, ckpt: str = "models/diffusion.pt",
          ae_ckpt: str = "models/autoencoder.pt", num_images: int = 8):
    return cli("infer", "--ckpt", str(ckpt), "--ae-ckpt", str(ae_ckpt), "--num-images", str(num_images),
               "--output", str(output), *extra, cwd=repo, check=check, env=env())


def load_images(path: Path) -> np.ndarray:
    with np.load(path) as f:
        assert set(f.files) == {"images"}  # an unconditional model: no labels
        return f["images"]


# --------------------------------------------------------------------------- infer

@pytest.fixture(scope="module")
def seed3(trained_repo, tmp_path_factory) -> Path:
    """`infer --seed 3 --output X.npz`, run once for the tests that compare with it."""
    path = tmp_path_factory.mktemp("infer") / "seed3.npz"
    proc = infer(trained_repo, path, "--seed", "3")
    assert f"infer: 8 images (ddim, seed 3) -> {path}" in proc.stdout
    return path


def test_infer_npz_is_seeded(trained_repo, tmp_path, seed3):
    infer(trained_repo, tmp_path / "b.npz", "--seed", "3")
    infer(trained_repo, tmp_path / "c.npz", "--seed", "4")
    a, b, c = load_images(seed3), load_images(tmp_path / "b.npz"), load_images(tmp_path / "c.npz")
    assert a.shape == (8, 28, 28) and a.dtype == np.uint8
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)
    assert len({img.tobytes() for img in a}) == 8  # eight different images, not one repeated


def test_infer_png_is_the_grid_of_the_same_images(trained_repo, tmp_path, seed3):
    infer(trained_repo, tmp_path / "grid.png", "--seed", "3")
    raw = (tmp_path / "grid.png").read_bytes()
    assert raw.startswith(PNG_SIGNATURE)
    images = load_images(seed3)
    ncol = int(np.ceil(np.sqrt(8)))  # 3 columns, 3 rows, 28 px cells with 2 px padding: 92 px, too small to see
    nrow = int(np.ceil(8 / ncol))
    with Image.open(tmp_path / "grid.png") as im:
        assert im.format == "PNG"
        assert im.size == (5 * (2 + ncol * 30), 5 * (2 + nrow * 30))  # each pixel 5x5: 460 px, at least GRID_PX
        big = np.asarray(im.convert("L"))
    grid = big[::5, ::5]
    np.testing.assert_array_equal(big, grid.repeat(5, axis=0).repeat(5, axis=1))  # nearest: no blur
    for i, img in enumerate(images):
        r, c = divmod(i, ncol)
        np.testing.assert_array_equal(grid[2 + 30 * r: 30 + 30 * r, 2 + 30 * c: 30 + 30 * c], img)
    assert np.all(grid[2 + 30 * 2: 30 + 30 * 2, 2 + 30 * 2: 30 + 30 * 2] == 255)  # the empty 9th cell: padding


@pytest.mark.parametrize("flags", [["--sampler", "ddim", "--steps", "5"], ["--sampler", "ddim", "--steps", "5",
                                   "--eta", "0"], ["--sampler", "ddpm", "--raw-weights"]], ids=["ddim5", "ddim5-eta0",
                                                                                                "ddpm-raw"])
def test_infer_samplers(trained_repo, tmp_path, flags):
    proc = infer(trained_repo, tmp_path / "s.npz", *flags, num_images=5)
    assert f"({flags[1]}, seed 0)" in proc.stdout
    images = load_images(tmp_path / "s.npz")
    assert images.shape == (5, 28, 28) and images.dtype == np.uint8


def test_infer_defaults_come_from_the_sample_params(trained_repo, tmp_path):
    """No flag: params.yaml's `sample` section (shrunk: num_images 0 -> grid_size 16, ddim, 5 steps, seed 0).
    `--sampler ddim` alone keeps sample.steps; `--params` and `--set` work before or after the command."""
    pair = ["--ckpt", "models/diffusion.pt", "--ae-ckpt", "models/autoencoder.pt"]
    proc = cli("infer", *pair, "--output", str(tmp_path / "a.npz"), cwd=trained_repo, env=env())
    assert f"infer: 16 images (ddim, seed 0) -> {tmp_path / 'a.npz'}" in proc.stdout
    a = load_images(tmp_path / "a.npz")
    assert a.shape == (16, 28, 28)
    infer(trained_repo, tmp_path / "b.npz", "--sampler", "ddim", "--steps", "5", "--seed", "0", num_images=16)
    np.testing.assert_array_equal(load_images(tmp_path / "b.npz"), a)
    infer(trained_repo, tmp_path / "c.npz", "--sampler", "ddim", num_images=16)  # steps stay sample.steps
    np.testing.assert_array_equal(load_images(tmp_path / "c.npz"), a)
    infer(trained_repo, tmp_path / "d.npz", "--sampler", "ddim", "--steps", "2", num_images=16)
    assert not np.array_equal(load_images(tmp_path / "d.npz"), a)

    params = yaml.safe_load((trained_repo / "params.yaml").read_text())
    params["sample"].update(num_images=3, seed=7)
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    for where in ("before", "after"):
        flag = ["--params", str(tmp_path / "params.yaml")]
        argv = [*flag, "infer", *pair] if where == "before" else ["infer", *pair, *flag]
        out = tmp_path / f"p_{where}.npz"
        proc = cli(*argv, "--output", str(out), cwd=trained_repo, env=env())
        assert f"infer: 3 images (ddim, seed 7) -> {out}" in proc.stdout, where
        assert load_images(out).shape == (3, 28, 28)
    proc = cli("--set", "sample.num_images=2", "infer", *pair, "--set", "sample.seed=4", "--output",
               str(tmp_path / "s.npz"), cwd=trained_repo, env=env())
    assert f"infer: 2 images (ddim, seed 4) -> {tmp_path / 's.npz'}" in proc.stdout


# --------------------------------------------------------------------------- the reference design's training flags

def test_train_commands_accept_the_design_flags(trained_repo, tmp_path):
    repo = make_repo_copy(tmp_path / "repo")
    shutil.copytree(trained_repo / "data" / "prepared", repo / "data" / "prepared")
    out = tmp_path / "out"
    store = tmp_path / "mlflow.db"
    e = env(MLFLOW_TRACKING_URI=f"sqlite:///{store}")

    proc = cli("train-ae", "--data", "data/prepared", "--epochs", "1", "--generate-images", "--out",
               str(out / "ae.pt"), "--metrics", str(out / "ae.json"), "--plots", str(out / "ae_plots"), cwd=repo,
               env=e)
    assert "train_ae:" in proc.stdout
    assert (out / "ae.pt").is_file() and (out / "ae.json").is_file()
    assert {"reconstructions.png", "loss.png"} <= {p.name for p in (out / "ae_plots").iterdir()}

    # the diffusion model trains on the latents of this autoencoder, encoded outside the repository
    proc = cli("encode", "--data", "data/prepared", "--ae-ckpt", str(out / "ae.pt"), "--out", str(out / "latents"),
               cwd=repo, env=e)
    assert "encode:" in proc.stdout and (out / "latents" / "stats.json").is_file()

    flags = ["train-diffusion", "--ae-ckpt", str(out / "ae.pt"), "--latents", str(out / "latents"), "--data",
             "data/prepared", "--epochs", "1", "--T", "50", "--batch-size", "64", "--lr", "2e-4", "--only-digit",
             "5", "--hidden-dim", "32", "--out", str(out / "d.pt"), "--metrics", str(out / "d.json"),
             "--plots", str(out / "d_plots")]
    # --latent-dim is checked against the autoencoder, which sets the latent size
    proc = cli(*flags, "--latent-dim", "8", cwd=repo, env=e, check=False)
    assert proc.returncode == 2 and proc.stderr.strip().splitlines() == [
        f"error: --latent-dim 8 does not match the 16-d latents of the autoencoder in {out / 'ae.pt'}, which sets "
        "the latent size"], proc.stderr[-2000:]
    assert not (out / "d.pt").exists()
    proc = cli(*flags, "--latent-dim", "16", cwd=repo, env=e)
    assert "train_diffusion:" in proc.stdout
    assert (out / "d_plots" / "loss.png").is_file()

    with np.load(repo / "data" / "prepared" / "train.npz") as f:
        labels = f["labels"]
    ckpt = torch.load(out / "d.pt", weights_only=True)
    assert ckpt["format"] == "mnist-ldm/diffusion"
    assert ckpt["trained_on"]["only_digit"] == 5
    assert ckpt["trained_on"]["latents"] == int((labels == 5).sum())
    assert 0 < ckpt["trained_on"]["latents"] < len(labels)
    cfg = ckpt["train_config"]
    assert (cfg["epochs"], cfg["T"], cfg["batch_size"], cfg["lr"], cfg["only_digit"],
            cfg["hidden_dim"]) == (1, 50, 64, 2e-4, 5, 32)
    assert "latent_dim" not in cfg  # the latent size is the autoencoder's, not a diffusion param
    assert ckpt["model_config"]["latent_dim"] == 16 and ckpt["trained_on"]["autoencoder_config"]["latent_dim"] == 16
    assert ckpt["schedule"]["T"] == 50 and ckpt["model_config"]["hidden_dim"] == 32
    assert ckpt["trained_on"]["autoencoder_md5"] == hashlib.md5((out / "ae.pt").read_bytes()).hexdigest()
    ae_ckpt = torch.load(out / "ae.pt", weights_only=True)
    assert ae_ckpt["train_config"]["epochs"] == 1

    # logged to the store named by MLFLOW_TRACKING_URI, not the repository's own
    assert store.is_file() and not (repo / "mlflow.db").exists()
    # nothing was written into the repository's own output paths
    assert not (repo / "models" / "autoencoder.pt").exists() and not (repo / "metrics" / "diffusion.json").exists()

    # and the pair generates
    infer(repo, tmp_path / "fives.npz", ckpt=str(out / "d.pt"), ae_ckpt=str(out / "ae.pt"), num_images=4)
    assert load_images(tmp_path / "fives.npz").shape == (4, 28, 28)


# --------------------------------------------------------------------------- unusable checkpoints

def _diffusion_ckpt(trained_repo: Path) -> dict:
    return torch.load(trained_repo / "models" / "diffusion.pt", weights_only=True)


def make_truncated(trained_repo: Path, path: Path) -> str:
    raw = (trained_repo / "models" / "diffusion.pt").read_bytes()
    path.write_bytes(raw[: len(raw) // 2])
    return str(path)


def make_config_says_8(trained_repo: Path, path: Path) -> str:
    ckpt = _diffusion_ckpt(trained_repo)
    ckpt["model_config"]["latent_dim"] = 8  # the weights are still 16-d
    torch.save(ckpt, path)
    return str(path)


def make_real_8d_model(trained_repo: Path, path: Path) -> str:
    ckpt = _diffusion_ckpt(trained_repo)
    spec = DenoiserSpec(latent_dim=8, hidden_dim=32, num_blocks=1)
    state = LatentDenoiser(spec).state_dict()
    ckpt.update(model_config=spec.to_dict(), state_dict=state, ema_state_dict=state,
                latent_stats={"mean": [0.0] * 8, "std": [1.0] * 8})
    torch.save(ckpt, path)
    return str(path)


def make_other_autoencoder(path: Path) -> str:
    """A well-formed autoencoder of the same latent size (16-d) with other (untrained) weights."""
    torch.manual_seed(1)
    model = Autoencoder(AutoencoderSpec(latent_dim=16))
    save_checkpoint(path, "mnist-ldm/autoencoder", {"model_config": model.spec.to_dict(),
                                                    "state_dict": model.state_dict()})
    return str(path)


PAIR = ["was trained on the latents of another autoencoder", "pass the autoencoder it was trained with"]


@pytest.mark.parametrize("case, words", [
    ("truncated", ["not a readable diffusion checkpoint", "truncated or corrupt"]),
    ("ae_as_ckpt", ["this is an autoencoder checkpoint", "latent-diffusion checkpoint", "was expected"]),
    ("config_latent_8", ["weights do not fit the model config"]),
    ("model_latent_8", [*PAIR, "8-d", "16-d"]),
    ("other_autoencoder", [*PAIR, "16-d"]),
    ("missing", ["diffusion checkpoint not found"]),
])
def test_infer_unusable_checkpoint_is_one_error_line(trained_repo, tmp_path, case, words):
    real_ae = "models/autoencoder.pt"
    ckpt, ae = {
        "truncated": lambda: (make_truncated(trained_repo, tmp_path / "truncated.pt"), real_ae),
        "ae_as_ckpt": lambda: (real_ae, real_ae),
        "config_latent_8": lambda: (make_config_says_8(trained_repo, tmp_path / "config8.pt"), real_ae),
        "model_latent_8": lambda: (make_real_8d_model(trained_repo, tmp_path / "model8.pt"), real_ae),
        "other_autoencoder": lambda: ("models/diffusion.pt", make_other_autoencoder(tmp_path / "other_ae.pt")),
        "missing": lambda: (str(tmp_path / "nope.pt"), real_ae),
    }[case]()
    out = tmp_path / "never.npz"
    proc = infer(trained_repo, out, check=False, ckpt=ckpt, ae_ckpt=ae)
    assert proc.returncode == 2, (proc.returncode, proc.stderr[-2000:])
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    line = lines[0]
    assert line.startswith("error: ")
    assert ckpt in line  # the diffusion checkpoint it refers to
    if case in ("model_latent_8", "other_autoencoder"):
        # the pair does not fit: one line naming both files, the diffusion checkpoint first
        assert line.startswith(f"error: {ckpt} was trained on") and ae in line, line
        if case == "other_autoencoder":  # same size, other weights: told apart by the recorded md5
            md5 = hashlib.md5(Path(ae).read_bytes()).hexdigest()
            recorded = _diffusion_ckpt(trained_repo)["trained_on"]["autoencoder_md5"]
            assert f"md5 {md5[:12]}" in line and f"md5 {recorded[:12]}" in line, line
    else:
        assert line.startswith(f"error: {ckpt}: ")
    for w in words:
        assert w in line, (w, line)
    assert "Traceback" not in proc.stderr and not out.exists()


# --------------------------------------------------------------------------- one entry path

@pytest.mark.parametrize("extra,nproc,line", [
    (["--epochs", "0"], "", "error: --epochs 0: autoencoder.epochs=0 is not allowed; expected an integer >= 1"),
    ([], "two", "error: MNIST_LDM_NPROC='two' is not allowed; expected a number of processes >= 1"),
])
def test_cli_and_stage_script_run_a_command_the_same_way(trained_repo, extra, nproc, line):
    """`mnist-ldm train-ae` and `python stages/train_ae.py` go through one entry: the same flags and errors,
    and both read MNIST_LDM_NPROC (the switch that re-runs a training stage under torchrun)."""
    from conftest import BIN, run

    args = ["--data", "data/prepared", "--out", "x/ae.pt", "--metrics", "x/ae.json", "--plots", "x/ae", *extra]
    for entry in ([str(BIN / "mnist-ldm"), "train-ae"], [str(BIN / "python"), "stages/train_ae.py"]):
        proc = run([*entry, *args], trained_repo, check=False, env=env(MNIST_LDM_NPROC=nproc))
        assert (proc.returncode, proc.stderr.strip()) == (2, line), entry


@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_help_says_what_the_command_does_and_lists_only_the_flags_it_uses(tmp_path, command):
    """Each subcommand's --help opens with what it does; one that runs no network neither lists nor takes
    --device and --precision (given before the subcommand, they are refused in one line)."""
    module = importlib.import_module(f"mnist_ldm.commands.{COMMANDS[command]}")
    shown = cli(command, "--help", cwd=tmp_path, env=env(COLUMNS="200")).stdout
    assert shown.split("\n\n")[1].strip() == module.HELP, shown
    computes = getattr(module, "COMPUTES", True)
    assert ("--device" in shown, "--precision" in shown) == (computes, computes), shown
    if not computes:
        for flag, value in (("--device", "cpu"), ("--precision", "fp32")):
            proc = cli(flag, value, command, *(["--out", "ok.json"] if command == "check-params" else []),
                       cwd=tmp_path, check=False)
            assert (proc.returncode, proc.stderr.strip()) == (
                2, f"error: mnist-ldm: {flag}: {command} runs no network; expected it without {flag}")
    assert sorted(p.name for p in tmp_path.iterdir()) == []


def test_promote_with_tracking_off_is_refused_before_the_store_is_opened(tmp_path):
    """`tracking.enabled: false` and `mnist-ldm promote`: one line naming the key, exit 2, no store created."""
    shutil.copy(Path(__file__).resolve().parents[1] / "params.yaml", tmp_path / "params.yaml")
    proc = cli("promote", "--set", "tracking.enabled=false", cwd=tmp_path, check=False,
               env=env(MLFLOW_TRACKING_URI=f"sqlite:///{tmp_path / 'store.db'}"))
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and len(lines) == 1, proc.stderr
    assert lines[0].startswith("error: tracking.enabled is false") and "@champion" in lines[0], lines
    assert sorted(p.name for p in tmp_path.iterdir()) == ["params.yaml"]
