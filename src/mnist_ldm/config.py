"""Typed, frozen configuration: one dataclass per `params.yaml` section.

`load_params()` reads the YAML once, rejects unknown keys, wrong types and out-of-range values with
one line that names the key, the value and what is allowed, and returns a `Params` object.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, Optional

import yaml

from .errors import UserError

DATA_SOURCES = ("auto", "idx", "huggingface", "bundled")
SAMPLERS = ("ddpm", "ddim")


class ConfigError(UserError):
    pass


def _require(cond: bool, key: str, value: Any, allowed: str) -> None:
    if not cond:
        raise ConfigError(f"params: {key}={value!r} is not allowed; expected {allowed}")


@dataclass(frozen=True)
class DataConfig:
    source: str = "auto"
    idx_dir: str = "data/raw/mnist"
    hf_dataset: str = "ylecun/mnist"
    hf_revision: str = "main"
    hf_timeout_s: float = 5.0
    bundled_test_fraction: float = 0.2
    limit_train: int = 0  # 0 keeps every image; >0 keeps the first N (for quick runs and tests)
    limit_test: int = 0
    seed: int = 0

    def validate(self, s: str) -> None:
        _require(self.source in DATA_SOURCES, f"{s}.source", self.source, f"one of {', '.join(DATA_SOURCES)}")
        _require(self.hf_timeout_s > 0, f"{s}.hf_timeout_s", self.hf_timeout_s, "a number > 0")
        _require(0 < self.bundled_test_fraction < 1, f"{s}.bundled_test_fraction",
                 self.bundled_test_fraction, "a number in (0, 1)")
        _require(self.limit_train >= 0, f"{s}.limit_train", self.limit_train, "an integer >= 0 (0 = all)")
        _require(self.limit_test >= 0, f"{s}.limit_test", self.limit_test, "an integer >= 0 (0 = all)")


@dataclass(frozen=True)
class AutoencoderConfig:
    latent_dim: int = 16
    epochs: int = 10
    batch_size: int = 128
    lr: float = 1e-3
    seed: int = 0
    checkpoint_every: int = 200  # optimizer steps between resumable checkpoints

    def validate(self, s: str) -> None:
        _require(self.latent_dim >= 1, f"{s}.latent_dim", self.latent_dim, "an integer >= 1")
        _require(self.epochs >= 1, f"{s}.epochs", self.epochs, "an integer >= 1")
        _require(self.batch_size >= 1, f"{s}.batch_size", self.batch_size, "an integer >= 1")
        _require(self.lr > 0, f"{s}.lr", self.lr, "a number > 0")
        _require(self.checkpoint_every >= 1, f"{s}.checkpoint_every", self.checkpoint_every, "an integer >= 1")


@dataclass(frozen=True)
class DiffusionConfig:
    latent_dim: int = 16
    hidden_dim: int = 256
    num_blocks: int = 4
    T: int = 1000
    beta_start: float = 1e-4
    beta_end: float = 2e-2
    epochs: int = 30
    batch_size: int = 128
    lr: float = 2e-4
    only_digit: Optional[int] = None
    conditional: bool = False
    cond_drop_prob: float = 0.1
    ema_decay: float = 0.999
    ema_warmup_steps: int = 500
    generate_images: bool = True  # a DDIM preview grid per epoch, logged to MLflow
    seed: int = 0
    checkpoint_every: int = 500

    def validate(self, s: str) -> None:
        _require(self.latent_dim >= 1, f"{s}.latent_dim", self.latent_dim, "an integer >= 1")
        _require(self.hidden_dim >= 1, f"{s}.hidden_dim", self.hidden_dim, "an integer >= 1")
        _require(self.num_blocks >= 1, f"{s}.num_blocks", self.num_blocks, "an integer >= 1")
        _require(self.T >= 2, f"{s}.T", self.T, "an integer >= 2")
        _require(0 < self.beta_start < 1, f"{s}.beta_start", self.beta_start, "a number in (0, 1)")
        _require(self.beta_start < self.beta_end < 1, f"{s}.beta_end", self.beta_end,
                 f"a number in (beta_start={self.beta_start}, 1)")
        _require(self.epochs >= 1, f"{s}.epochs", self.epochs, "an integer >= 1")
        _require(self.batch_size >= 1, f"{s}.batch_size", self.batch_size, "an integer >= 1")
        _require(self.lr > 0, f"{s}.lr", self.lr, "a number > 0")
        _require(self.only_digit is None or 0 <= self.only_digit <= 9, f"{s}.only_digit", self.only_digit,
                 "null or an integer digit 0-9")
        _require(0 <= self.cond_drop_prob < 1, f"{s}.cond_drop_prob", self.cond_drop_prob, "a number in [0, 1)")
        _require(0 <= self.ema_decay < 1, f"{s}.ema_decay", self.ema_decay, "a number in [0, 1)")
        _require(self.ema_warmup_steps >= 0, f"{s}.ema_warmup_steps", self.ema_warmup_steps, "an integer >= 0")
        _require(self.checkpoint_every >= 1, f"{s}.checkpoint_every", self.checkpoint_every, "an integer >= 1")


@dataclass(frozen=True)
class SampleConfig:
    num_images: int = 0  # scored by `evaluate`; 0 = as many as the test set; the grid shows the first grid_size
    grid_size: int = 100
    sampler: str = "ddpm"
    steps: int = 1000
    eta: float = 1.0  # DDIM only: 0 = deterministic, 1 = DDPM-like noise
    use_ema: bool = True
    guidance: float = 2.0  # classifier-free guidance scale w (conditional models only)
    digit: Optional[int] = None  # conditional models only: null samples every digit
    batch_size: int = 2500
    seed: int = 0

    def validate(self, s: str) -> None:
        _require(self.num_images >= 0, f"{s}.num_images", self.num_images, "an integer >= 0 (0 = test set size)")
        _require(self.grid_size >= 1, f"{s}.grid_size", self.grid_size, "an integer >= 1")
        _require(self.sampler in SAMPLERS, f"{s}.sampler", self.sampler, f"one of {', '.join(SAMPLERS)}")
        _require(self.steps >= 1, f"{s}.steps", self.steps, "an integer >= 1")
        _require(0 <= self.eta <= 1, f"{s}.eta", self.eta, "a number in [0, 1]")
        _require(self.guidance >= 0, f"{s}.guidance", self.guidance, "a number >= 0")
        _require(self.digit is None or 0 <= self.digit <= 9, f"{s}.digit", self.digit, "null or a digit 0-9")
        _require(self.batch_size >= 1, f"{s}.batch_size", self.batch_size, "an integer >= 1")


@dataclass(frozen=True)
class EvaluatorConfig:
    epochs: int = 3
    batch_size: int = 128
    lr: float = 1e-3
    seed: int = 0

    def validate(self, s: str) -> None:
        _require(self.epochs >= 1, f"{s}.epochs", self.epochs, "an integer >= 1")
        _require(self.batch_size >= 1, f"{s}.batch_size", self.batch_size, "an integer >= 1")
        _require(self.lr > 0, f"{s}.lr", self.lr, "a number > 0")


@dataclass(frozen=True)
class EvaluateConfig:
    n: int = 10000  # images per set; capped by the test set size
    k: int = 5  # neighbours for precision/recall/density/coverage
    seed: int = 0

    def validate(self, s: str) -> None:
        _require(self.n >= 10, f"{s}.n", self.n, "an integer >= 10")
        _require(self.k >= 1, f"{s}.k", self.k, "an integer >= 1")


@dataclass(frozen=True)
class TrackingConfig:
    enabled: bool = True
    experiment: str = "mnist-ldm"

    def validate(self, s: str) -> None:
        _require(bool(self.experiment.strip()), f"{s}.experiment", self.experiment, "a non-empty name")


@dataclass(frozen=True)
class Params:
    data: DataConfig = DataConfig()
    autoencoder: AutoencoderConfig = AutoencoderConfig()
    diffusion: DiffusionConfig = DiffusionConfig()
    sample: SampleConfig = SampleConfig()
    evaluator: EvaluatorConfig = EvaluatorConfig()
    evaluate: EvaluateConfig = EvaluateConfig()
    tracking: TrackingConfig = TrackingConfig()

    def validate(self) -> None:
        if self.diffusion.latent_dim != self.autoencoder.latent_dim:
            raise ConfigError(
                f"params: diffusion.latent_dim={self.diffusion.latent_dim} does not match "
                f"autoencoder.latent_dim={self.autoencoder.latent_dim}; the two must be equal")

    def flat(self) -> dict[str, Any]:
        """`{"section.key": value}` for every param, the form MLflow logs."""
        return {f"{sec}.{k}": v for sec, d in dataclasses.asdict(self).items() for k, v in d.items()}


def _type_ok(value: Any, tp: Any) -> bool:
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        return any(_type_ok(value, a) for a in typing.get_args(tp))
    if tp is type(None):
        return value is None
    if tp is bool:
        return isinstance(value, bool)
    if tp is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if tp is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    return isinstance(value, tp)


def _type_name(tp: Any) -> str:
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        return " or ".join("null" if a is type(None) else a.__name__ for a in typing.get_args(tp))
    return tp.__name__


def _build_section(cls: type, raw: Any, name: str):
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ConfigError(f"params: section '{name}' must be a mapping of keys to values, got {type(raw).__name__}")
    hints = typing.get_type_hints(cls)
    valid = [f.name for f in fields(cls)]
    kwargs = {}
    for key, value in raw.items():
        if key not in valid:
            raise ConfigError(f"params: unknown key '{name}.{key}'; valid keys in '{name}': {', '.join(valid)}")
        if not _type_ok(value, hints[key]):
            raise ConfigError(f"params: {name}.{key}={value!r} has the wrong type; expected {_type_name(hints[key])}")
        kwargs[key] = float(value) if hints[key] is float else value
    obj = cls(**kwargs)
    obj.validate(name)
    return obj


def params_from_dict(raw: Any) -> Params:
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ConfigError("params: the file must hold a mapping of sections")
    sections = {f.name: f.type for f in fields(Params)}
    hints = typing.get_type_hints(Params)
    unknown = [k for k in raw if k not in sections]
    if unknown:
        raise ConfigError(f"params: unknown section '{unknown[0]}'; valid sections: {', '.join(sections)}")
    params = Params(**{name: _build_section(hints[name], raw.get(name), name) for name in sections})
    params.validate()
    return params


def load_params(path: str | Path = "params.yaml") -> Params:
    path = Path(path)
    try:
        text = path.read_text()
    except FileNotFoundError:
        raise ConfigError(f"{path}: params file not found") from None
    try:
        raw = yaml.safe_load(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark else ""
        raise ConfigError(f"{path}: not valid YAML{where}") from None
    try:
        return params_from_dict(raw)
    except ConfigError as e:
        raise ConfigError(str(e).replace("params:", f"{path}:", 1)) from None


def override(section, name: str, **changes):
    """A copy of `section` with CLI overrides applied (None means 'not given'), re-validated."""
    changes = {k: v for k, v in changes.items() if v is not None}
    new = dataclasses.replace(section, **changes)
    try:
        new.validate(name)
    except ConfigError as e:  # the value may come from a flag: say so (--eta sets sample.eta, and so on)
        raise ConfigError(str(e).replace("params: ", "", 1).replace(" is not allowed", " (from a command-line "
                          "flag or params.yaml) is not allowed", 1)) from None
    return new
