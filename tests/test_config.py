"""Strict, finite params loading as DVC reads the file: each refusal is one line naming the file (or `--set` item,
or flag), the key and what was expected."""

from __future__ import annotations

import math
import os
import subprocess
import sys
from pathlib import Path
from typing import get_args

import pytest

from mnist_ldm.config.sections import AutoencoderConfig, ConfigError, DiffusionConfig, Params, SampleConfig
from mnist_ldm.config.params_file import (SECTIONS, apply_overrides, dotted_value, load_params, params_from_dict,
                                          parse_yaml, with_changes)

REPO = Path(__file__).resolve().parents[1]
BASE = (REPO / "params.yaml").read_text()


def refused(fn, *args, **kwargs) -> str:
    """The one-line message of the ConfigError that `fn(*args)` raises."""
    with pytest.raises(ConfigError) as info:
        fn(*args, **kwargs)
    msg = str(info.value)
    assert isinstance(info.value, ConfigError) and "\n" not in msg and msg.strip() == msg, msg
    return msg


def write(tmp_path: Path, text: str | bytes, name: str = "params.yaml") -> Path:
    path = tmp_path / name
    path.write_bytes(text.encode() if isinstance(text, str) else text)
    return path


def edited(key: str, new_line: str) -> str:
    """The project's params.yaml with the line of `section.key` replaced by `  key: <new_line>`."""
    section, name = key.split(".")
    out, current = [], None
    for line in BASE.splitlines():
        if line and not line.startswith((" ", "#")):
            current = line.rstrip(":")
        if current == section and line.startswith(f"  {name}:"):
            line = f"  {name}: {new_line}"
        out.append(line)
    text = "\n".join(out) + "\n"
    assert text != BASE or new_line in BASE
    return text


# --- the project's own file and the schema ---------------------------------------------------------

def test_project_params_load_and_match_the_schema():
    p = load_params(REPO / "params.yaml")
    assert p.autoencoder.generate_images is True and p.diffusion.generate_images is True
    assert "latent_dim" not in DiffusionConfig.model_fields
    assert "diffusion.latent_dim" not in p.flat() and p.flat()["autoencoder.latent_dim"] == 16
    assert all(math.isfinite(v) for v in p.flat().values() if isinstance(v, float))


def test_the_model_defaults_are_the_project_params():
    """Code that builds a config without params.yaml (tests, notebooks) gets the same values."""
    assert Params() == load_params(REPO / "params.yaml")


def test_diffusion_latent_dim_is_now_an_unknown_key(tmp_path):
    path = write(tmp_path, BASE.replace("diffusion:\n", "diffusion:\n  latent_dim: 16\n"))
    msg = refused(load_params, path)
    assert msg.startswith(f"{path}: unknown key 'diffusion.latent_dim'") and "hidden_dim" in msg


def test_autoencoder_generate_images_is_a_bool(tmp_path):
    assert load_params(write(tmp_path, edited("autoencoder.generate_images", "false"))).autoencoder.generate_images \
        is False
    msg = refused(load_params, write(tmp_path, edited("autoencoder.generate_images", "3")))
    assert msg == f"{tmp_path / 'params.yaml'}: autoencoder.generate_images=3 is not allowed; expected true or false"


def test_config_imports_alone_without_the_loader_or_torch():
    code = ("import sys, mnist_ldm.config.sections as c; assert 'mnist_ldm.config.params_file' not in sys.modules; "
            "assert not {'yaml', 'ruamel', 'dvc', 'torch'} & set(sys.modules); c.Params()")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=REPO)


def test_the_choices_are_the_registries_names():
    """config names the samplers and architectures without importing torch: each choice list is its registry's."""
    from mnist_ldm.autoencoder.model import KINDS
    from mnist_ldm.config import sections as c
    from mnist_ldm.diffusion.denoiser import DENOISERS
    from mnist_ldm.diffusion.samplers import SAMPLERS
    from mnist_ldm.evaluator.model import ARCHS

    assert get_args(c.Sampler) == tuple(SAMPLERS) and set(c.IGNORED_BY_SAMPLER) <= set(SAMPLERS)
    assert get_args(c.AutoencoderKind) == tuple(KINDS) and get_args(c.DenoiserArch) == tuple(DENOISERS)
    assert get_args(c.EvaluatorArch) == tuple(ARCHS)


# --- 1. duplicate keys ---------------------------------------------------------------------------

def test_duplicate_key_inside_a_section(tmp_path):
    path = write(tmp_path, BASE.replace("  lr: 0.0016\n", "  lr: 0.0016\n  # a second try\n  lr: 0.0005\n"))
    second = path.read_text().splitlines().index("  lr: 0.0005") + 1
    assert refused(load_params, path) == f"{path}: duplicate key 'lr' at line {second}; give each key once"


def test_duplicate_section(tmp_path):
    path = write(tmp_path, BASE + "tracking:\n  enabled: false\n")
    msg = refused(load_params, path)
    assert msg.startswith(f"{path}: duplicate key 'tracking' at line {len(BASE.splitlines()) + 1};")


def test_duplicate_key_in_a_flow_mapping_on_one_line(tmp_path):
    path = write(tmp_path, BASE.replace("tracking:\n  enabled: true\n", "tracking: {enabled: true, enabled: false,\n"
                                        "  experiment: x}\n").replace("  experiment: mnist-ldm\n", "")
                 .replace(next(ln for ln in BASE.splitlines(True) if ln.startswith("  registered_model:")), ""))
    line = path.read_text().splitlines().index("tracking: {enabled: true, enabled: false,") + 1
    assert f"duplicate key 'enabled' at line {line}" in refused(load_params, path)


def test_merge_keys_may_still_be_overridden():
    assert parse_yaml("a: &b {x: 1, y: 2}\nc:\n  <<: *b\n  x: 5\n")["c"] == {"x": 5, "y": 2}


# --- 2. empty, not a mapping, missing sections ------------------------------------------------------

@pytest.mark.parametrize("text", ["", "\n\n", "# only a comment\n"])
def test_empty_file(tmp_path, text):
    path = write(tmp_path, text)
    assert refused(load_params, path) == (f"{path}: the file is empty; it needs the sections "
                                          f"{', '.join(SECTIONS)}")


@pytest.mark.parametrize("text, kind", [("- data\n- sample\n", "list"), ("just words\n", "str"), ("5\n", "int")])
def test_file_not_a_mapping(tmp_path, text, kind):
    path = write(tmp_path, text)
    assert refused(load_params, path) == (f"{path}: the file must hold a mapping of sections "
                                          f"({', '.join(SECTIONS)}), got {kind}")


def _without(text: str, section: str) -> str:
    out, skip = [], False
    for line in text.splitlines():
        if line and not line.startswith((" ", "#")):
            skip = line == f"{section}:"
        if not skip:
            out.append(line)
    return "\n".join(out) + "\n"


def test_one_missing_section(tmp_path):
    path = write(tmp_path, _without(BASE, "evaluate"))
    msg = refused(load_params, path)
    assert msg.startswith(f"{path}: missing section evaluate; every section must be present (data, ")


def test_several_missing_sections(tmp_path):
    path = write(tmp_path, _without(_without(BASE, "tracking"), "data"))
    assert refused(load_params, path).startswith(f"{path}: missing sections data, tracking;")


def test_keys_left_out_of_a_present_section_take_defaults(tmp_path):
    text = _without(BASE, "sample").replace("\nevaluator:", "\nsample:\n  steps: 7\n\nevaluator:", 1)
    p = load_params(write(tmp_path, text.replace("tracking:\n  enabled: true\n  experiment: mnist-ldm\n",
                                                 "tracking:\n")))
    assert p.sample == SampleConfig(steps=7) and p.tracking.enabled is True


def test_params_from_dict_is_strict_unless_asked():
    assert "missing sections" in refused(params_from_dict, {"sample": {"steps": 5}})
    p = params_from_dict({"sample": {"steps": 5}}, require_all_sections=False)
    assert p.sample.steps == 5 and p.diffusion == DiffusionConfig()
    assert params_from_dict(None, require_all_sections=False) == Params()


# --- 3. the file as DVC reads it (YAML 1.2) ---------------------------------------------------------

SCALARS = ["010", "0o10", "1:00:00", "yes", "no", "on", "off", "~", "2e-4", "1_000", "0x10", ".5", "+1", "1.0e+3",
           "1E-3", "true", "'0.5'", "null", "1e4", ".nan", "-.inf", "2."]
TYPED_KEYS = ["data.hf_revision", "sample.seed", "diffusion.lr", "autoencoder.generate_images", "diffusion.only_digit"]


@pytest.fixture(scope="module")
def dvc_reads(tmp_path_factory) -> dict[str, object]:
    """Each scalar as `dvc params show` reads it, from a fresh git + DVC repository whose stage reads them."""
    from dvc.repo import Repo

    root = tmp_path_factory.mktemp("dvc_reads")
    subprocess.run(["git", "init", "-q"], cwd=root, check=True)
    Repo.init(str(root))
    (root / "params.yaml").write_text("table:\n" + "".join(f"  k{i}: {v}\n" for i, v in enumerate(SCALARS)))
    (root / "dvc.yaml").write_text("stages:\n  s:\n    cmd: 'true'\n    params:\n      - table\n")
    with Repo(str(root)) as repo:
        shown = repo.params.show()[""]["data"]["params.yaml"]["data"]["table"]
    return {s: shown[f"k{i}"] for i, s in enumerate(SCALARS)}


def _same(a, b) -> bool:
    return type(a) is type(b) and (a == b or (isinstance(a, float) and math.isnan(a) and math.isnan(b)))


@pytest.mark.parametrize("scalar", SCALARS)
def test_the_project_reads_a_scalar_as_dvc_does_or_refuses_it(tmp_path, dvc_reads, scalar):
    """What ran is what `dvc params diff` and dvc.lock show: the same value for every key, or one refusing line."""
    assert _same(parse_yaml(f"k: {scalar}")["k"], dvc_reads[scalar])
    for key in TYPED_KEYS:
        path = write(tmp_path, edited(key, scalar))
        try:
            got = dotted_value(load_params(path).model_dump(), key)
        except ConfigError as e:
            assert str(e).startswith(f"{path}: {key}=") and "\n" not in str(e), str(e)
            continue
        want = dvc_reads[scalar]
        assert got == (float(want) if isinstance(got, float) else want), (key, scalar, got, want)


def test_numbers_yaml_1_1_read_as_text_are_numbers(tmp_path):
    assert load_params(write(tmp_path, edited("diffusion.lr", "2e-4"))).diffusion.lr == 2e-4
    assert load_params(write(tmp_path, edited("sample.seed", "010"))).sample.seed == 10  # not octal 8
    msg = refused(load_params, write(tmp_path, edited("data.hf_revision", "1.0")))
    assert msg.endswith("data.hf_revision=1.0 is not allowed; expected text (put the value in quotes)")


def test_other_wrong_types(tmp_path):
    msg = refused(load_params, write(tmp_path, edited("diffusion.lr", "fast")))
    assert msg == f"{tmp_path / 'params.yaml'}: diffusion.lr='fast' is not allowed; expected a number"
    assert "expected an integer" in refused(load_params, write(tmp_path, edited("diffusion.epochs", "true")))
    assert "expected a number" in refused(load_params, write(tmp_path, edited("diffusion.lr", "'0.5'")))


# --- 4. finite floats -----------------------------------------------------------------------------

ALL_FLOATS = [f"{s}.{k}" for s, f in Params.model_fields.items() for k, g in f.annotation.model_fields.items()
              if g.annotation is float]


def test_the_float_list_is_what_params_yaml_holds():
    assert {"diffusion.lr", "sample.guidance", "sample.eta", "data.hf_timeout_s"} <= set(ALL_FLOATS)


@pytest.mark.parametrize("key", ALL_FLOATS)
@pytest.mark.parametrize("written, shown", [(".nan", "nan"), (".inf", "inf"), ("-.inf", "-inf")])
def test_every_float_refuses_nan_and_inf(tmp_path, key, written, shown):
    path = write(tmp_path, edited(key, written))
    assert refused(load_params, path) == (f"{path}: {key}={shown} is not allowed; expected a finite number "
                                          "(.nan, .inf and -.inf are refused)")


def test_an_integer_too_large_for_a_float(tmp_path):
    path = write(tmp_path, edited("sample.guidance", "1" + "0" * 400))
    assert "sample.guidance=1000" in (msg := refused(load_params, path)) and "expected a number" in msg


def flag(key: str, value, name: str = "--x"):
    """`with_changes` as a command flag applies it: validated with its section."""
    return with_changes(Params(), [(f"{name} {value}", key, value)], sections_only=True)


def test_flags_cannot_set_nan_or_inf():
    assert refused(flag, "sample.guidance", float("inf"), "--guidance") == (
        "--guidance inf: sample.guidance=inf is not allowed; expected a finite number (.nan, .inf and -.inf are "
        "refused)")
    assert "sample.eta=nan" in refused(flag, "sample.eta", float("nan"))
    assert "autoencoder.lr=inf" in refused(flag, "autoencoder.lr", float("inf"))
    assert flag("sample.guidance", 3.5).sample.guidance == 3.5


def test_a_flag_is_checked_with_its_section_only():
    """`--T 50` trains a short model although sample.steps (250) is more: the sampling request meets the rules of
    the model it samples from, not diffusion.T of params.yaml."""
    assert flag("diffusion.T", 50).diffusion.T == 50
    assert refused(flag, "autoencoder.epochs", 0, "--epochs") == (
        "--epochs 0: autoencoder.epochs=0 is not allowed; expected an integer >= 1")


def test_dotted_value_reads_nested_dicts():
    tree = {"sample": {"eta": 0.5, "digit": None}, "fcd": {"generated": 3.0}, "n": 7}
    assert dotted_value(tree, "sample.eta") == 0.5 and dotted_value(tree, "fcd.generated") == 3.0
    assert dotted_value(tree, "n") == 7 and dotted_value(tree, "sample") == {"eta": 0.5, "digit": None}
    assert dotted_value(tree, "sample.steps") is None and dotted_value(tree, "n.x") is None
    assert dotted_value(None, "a.b") is None


def test_existing_range_checks_stay():
    assert refused(flag, "sample.eta", 1.5) == "--x 1.5: sample.eta=1.5 is not allowed; expected a number <= 1.0"
    assert "diffusion.ema_decay=1.0" in refused(flag, "diffusion.ema_decay", 1.0)


@pytest.mark.parametrize("section", ["autoencoder", "diffusion"])
def test_lr_schedule_names_the_valid_ones(section):
    assert refused(flag, f"{section}.lr_schedule", "linear") == (
        f"--x linear: {section}.lr_schedule='linear' is not allowed; expected one of constant, cosine")
    assert f"{section}.warmup_steps=-1" in refused(flag, f"{section}.warmup_steps", -1)
    assert getattr(flag(f"{section}.lr_schedule", "constant"), section).lr_schedule == "constant"


def test_autoencoder_kind_names_the_valid_ones():
    assert refused(flag, "autoencoder.kind", "vae") == (
        "--x vae: autoencoder.kind='vae' is not allowed; expected one of conv, mlp, none")


def test_the_unet_needs_pixel_space():
    assert "diffusion.denoiser='fancy'" in refused(flag, "diffusion.denoiser", "fancy")
    with pytest.raises(ValueError, match=r"diffusion.denoiser='unet' is not allowed with autoencoder.kind="
                                         r"'conv'; expected autoencoder.kind=none"):
        Params(diffusion=DiffusionConfig(denoiser="unet"))
    Params(autoencoder=AutoencoderConfig(kind="none"), diffusion=DiffusionConfig(denoiser="unet"))
    Params(autoencoder=AutoencoderConfig(kind="none"))  # an MLP on the 784 pixels is allowed too


def test_ddim_steps_fit_the_diffusion_steps():
    """Caught when the params are read, not after the prior has trained: DDIM takes at most T steps."""
    with pytest.raises(ValueError, match=r"sample.steps=250 is more than the T=100 diffusion steps of this model "
                                         r"\(diffusion.T\); expected 1 to 100"):
        Params(diffusion=DiffusionConfig(T=100))
    Params(diffusion=DiffusionConfig(T=100), sample=SampleConfig(steps=100))
    Params(diffusion=DiffusionConfig(T=100), sample=SampleConfig(sampler="ddpm"))  # DDPM takes all T


def test_min_snr_gamma_is_zero_or_positive():
    assert "diffusion.min_snr_gamma=-1.0" in refused(flag, "diffusion.min_snr_gamma", -1.0)
    assert flag("diffusion.min_snr_gamma", 5).diffusion.min_snr_gamma == 5.0


def test_samples_per_timestep_is_a_positive_integer():
    assert "diffusion.samples_per_timestep=0" in refused(flag, "diffusion.samples_per_timestep", 0)
    assert flag("diffusion.samples_per_timestep", 1).diffusion.samples_per_timestep == 1


# --- 5. the file itself ---------------------------------------------------------------------------

def test_missing_file(tmp_path):
    path = tmp_path / "nope.yaml"
    assert refused(load_params, path) == (f"{path}: params file not found; check the path, or run from the "
                                          "project root where params.yaml lives")


def test_directory(tmp_path):
    assert refused(load_params, tmp_path) == (f"{tmp_path}: is a directory, not a params file; pass the YAML "
                                              f"file itself (e.g. {tmp_path / 'params.yaml'})")


def test_not_utf8(tmp_path):
    path = write(tmp_path, BASE.encode().replace(b"mnist-ldm\n", b"mnist-ldm \xe9t\xe9\n"))
    line = BASE.splitlines().index("  experiment: mnist-ldm") + 1
    assert refused(load_params, path) == (f"{path}: not UTF-8 text (byte 0xe9 at line {line}); "
                                          "save the params file as UTF-8")


def test_utf8_with_bom_is_fine(tmp_path):
    assert load_params(write(tmp_path, b"\xef\xbb\xbf" + BASE.encode())) == load_params(REPO / "params.yaml")


def test_control_character(tmp_path):
    path = write(tmp_path, BASE.replace("  seed: 0\n", "  seed: 0\x00\n", 1))
    line = BASE.splitlines().index("  seed: 0") + 1
    assert refused(load_params, path) == (f"{path}: not a text file: character 0x00 at line {line} "
                                          "is not allowed in YAML")


def test_unreadable(tmp_path, monkeypatch):
    path = write(tmp_path, BASE)
    path.chmod(0)
    if os.access(path, os.R_OK):  # root reads anything: fake the refusal the kernel would give
        def deny(self):
            raise PermissionError(13, "Permission denied", str(self))
        monkeypatch.setattr(Path, "read_bytes", deny)
    try:
        assert refused(load_params, path) == (f"{path}: params file is not readable (permission denied); "
                                              f"make it readable (chmod u+r {path}) or pass another file")
    finally:
        path.chmod(0o644)


def test_invalid_yaml_is_one_line(tmp_path):
    path = write(tmp_path, "diffusion:\n  lr: [0.1, 0.2\n  epochs: 3\n")
    assert refused(load_params, path).startswith(f"{path}: not valid YAML at line ")
    path = write(tmp_path, BASE + "---\ndata: {}\n")
    assert refused(load_params, path) == (f"{path}: not valid YAML at line {len(BASE.splitlines()) + 1}: expected a "
                                          "single document in the stream, but found another document")


# --- 7. --set section.key=value -------------------------------------------------------------------

BASE_PARAMS = load_params(REPO / "params.yaml")


def test_set_applies_typed_values():
    p = apply_overrides(BASE_PARAMS, ["diffusion.lr=0.0005", "sample.digit=null", "diffusion.conditional=true"])
    assert (p.diffusion.lr, p.sample.digit, p.diffusion.conditional) == (0.0005, None, True)
    assert apply_overrides(p, ["sample.digit=7", "tracking.experiment=other run"]).sample.digit == 7
    assert BASE_PARAMS.diffusion.lr == 0.0016 and apply_overrides(BASE_PARAMS, []) == BASE_PARAMS
    assert isinstance(apply_overrides(BASE_PARAMS, ["diffusion.lr=1"]).diffusion.lr, float)
    assert apply_overrides(BASE_PARAMS, ["diffusion.lr=2e-4"]).diffusion.lr == 2e-4  # YAML 1.2, as DVC reads it


@pytest.mark.parametrize("item, expected", [
    ("difusion.lr=0.1", "--set difusion.lr=0.1: unknown section 'difusion'; valid sections: "
                        "data, autoencoder, diffusion, sample, evaluator, second_evaluator, evaluate, tracking"),
    ("diffusion.learning_rate=0.1", "--set diffusion.learning_rate=0.1: unknown key 'diffusion.learning_rate'; "
                                    "valid keys in 'diffusion': denoiser, hidden_dim, num_blocks, unet_channels, T, "),
    ("diffusion.lr=fast", "--set diffusion.lr=fast: diffusion.lr='fast' is not allowed; expected a number"),
    ("sample.guidance=.inf", "--set sample.guidance=.inf: sample.guidance=inf is not allowed; expected a finite "),
    ("sample.digit=12", "--set sample.digit=12: sample.digit=12 is not allowed; expected an integer <= 9"),
    ("diffusion.epochs=3.5", "--set diffusion.epochs=3.5: diffusion.epochs=3.5 is not allowed; expected an integer"),
    ("diffusion.lr", "--set diffusion.lr: expected section.key=value, e.g. diffusion.lr=0.0005"),
    ("lr=0.1", "--set lr=0.1: expected section.key=value"),
    ("sample.digit=", "--set sample.digit=: no value for sample.digit; write sample.digit=VALUE (null for none)"),
    ("sample.digit=[1", "--set sample.digit=[1: not valid YAML"),
])
def test_set_refusals(item, expected):
    assert refused(apply_overrides, BASE_PARAMS, [item]).startswith(expected)


def test_set_checks_the_result_not_each_step():
    p = apply_overrides(BASE_PARAMS, ["diffusion.beta_start=0.05", "diffusion.beta_end=0.1"])
    assert (p.diffusion.beta_start, p.diffusion.beta_end) == (0.05, 0.1)
    msg = refused(apply_overrides, BASE_PARAMS, ["diffusion.beta_start=0.05"])
    assert msg.startswith("--set diffusion.beta_start=0.05: diffusion.beta_end=0.02 is not allowed; expected a number"
                          " in (beta_start=0.05, 1)")


def test_set_twice_is_refused():
    assert refused(apply_overrides, BASE_PARAMS, ["diffusion.lr=0.1", "diffusion.lr=0.2"]) == (
        "--set diffusion.lr=0.2: diffusion.lr is already set by --set diffusion.lr=0.1; give each key once")
