"""Typed, frozen configuration: one dataclass per `params.yaml` section, and their range checks.

Reading the file lives in `params_file` (`load_params`, `params_from_dict`, `apply_overrides`), which
imports this module; this module imports nothing of the package but `errors`, `sampling_rules` (the
rules that the `sample` section shares with each sampling request) and `params_rules` (the rules across
sections). Every check raises a `ConfigError` whose message is one line starting with `params:`; the caller
swaps that prefix for where the value came from (the file's path, `--set ...`). A refused value is a
`FieldError`, which keeps its key, value and what was expected; `override` words it for a value that may come
from a command-line flag.
"""

from __future__ import annotations

import dataclasses
import math
import typing
from dataclasses import dataclass, fields
from typing import Any, Optional

from mnist_ldm.io.errors import UserError
from mnist_ldm.config.params_rules import cross_section_problem, min_images
from mnist_ldm.config.sampling_rules import ETA_EXPECTED, GUIDANCE_EXPECTED, SAMPLERS, SEED_EXPECTED, eta_ok, guidance_ok, seed_ok

DATA_SOURCES = ("auto", "idx", "huggingface", "bundled")
AUTOENCODER_KINDS = ("conv", "mlp", "none")  # none: pixel space, the images themselves
DENOISERS = ("mlp", "unet")
EVALUATOR_ARCHS = ("cnn", "allconv")
LR_SCHEDULES = ("constant", "cosine")  # training/loop.py's lr_factor


class ConfigError(UserError):
    pass


class FieldError(ConfigError):
    """A refused value of one param: its `key` (`sample.eta`), `value` and what it must be (`expected`)."""

    def __init__(self, key: str, value: Any, expected: str):
        self.key, self.value, self.expected = key, value, expected
        super().__init__(f"params: {key}={value!r} is not allowed; expected {expected}")


def _require(cond: bool, key: str, value: Any, allowed: str) -> None:
    if not cond:
        raise FieldError(key, value, allowed)


def _at_least_one(section: Any, s: str, *keys: str) -> None:
    """Each of `keys` (integer fields of `section`) must be >= 1."""
    for key in keys:
        value = getattr(section, key)
        _require(value >= 1, f"{s}.{key}", value, "an integer >= 1")


def _schedule_rules(section: Any, s: str) -> None:
    _require(section.lr_schedule in LR_SCHEDULES, f"{s}.lr_schedule", section.lr_schedule,
             f"one of {', '.join(LR_SCHEDULES)}")
    _require(section.warmup_steps >= 0, f"{s}.warmup_steps", section.warmup_steps, "an integer >= 0")


def float_keys(cls: type) -> list[str]:
    """The fields of a section dataclass declared `float` (the ones that must be finite)."""
    hints = typing.get_type_hints(cls)
    return [f.name for f in fields(cls) if hints[f.name] is float]


class _Section:
    """`validate(name)`: every float finite (whatever set it: the file, `--set`, a flag), then the section's rules."""

    def validate(self, s: str) -> None:
        for key in float_keys(type(self)):
            value = getattr(self, key)
            if isinstance(value, float) and not math.isfinite(value):
                raise FieldError(f"{s}.{key}", value, "a finite number (.nan, .inf and -.inf are refused)")
        seed = getattr(self, "seed", 0)
        _require(seed_ok(seed), f"{s}.seed", seed, SEED_EXPECTED)
        self.rules(s)

    def rules(self, s: str) -> None:
        pass


@dataclass(frozen=True)
class DataConfig(_Section):
    source: str = "auto"
    idx_dir: str = "data/raw/mnist"
    hf_dataset: str = "ylecun/mnist"
    hf_revision: str = "main"
    hf_timeout_s: float = 5.0
    bundled_test_fraction: float = 0.2
    limit_train: int = 0  # 0 keeps every image; >0 keeps the first N (for quick runs and tests)
    limit_test: int = 0
    seed: int = 0

    def rules(self, s: str) -> None:
        _require(self.source in DATA_SOURCES, f"{s}.source", self.source, f"one of {', '.join(DATA_SOURCES)}")
        _require(self.hf_timeout_s > 0, f"{s}.hf_timeout_s", self.hf_timeout_s, "a number > 0")
        _require(0 < self.bundled_test_fraction < 1, f"{s}.bundled_test_fraction",
                 self.bundled_test_fraction, "a number in (0, 1)")
        _require(self.limit_train >= 0, f"{s}.limit_train", self.limit_train, "an integer >= 0 (0 = all)")
        _require(self.limit_test >= 0, f"{s}.limit_test", self.limit_test, "an integer >= 0 (0 = all)")


@dataclass(frozen=True)
class AutoencoderConfig(_Section):
    """`autoencoder:`: the conv autoencoder (28→14→7→4 → latent_dim), or its MLP sibling, and how
    it is trained."""

    kind: str = "conv"  # conv | mlp (784 -> 512 -> 256 -> latent_dim) | none (pixel space)
    latent_dim: int = 16
    epochs: int = 19
    batch_size: int = 256
    lr: float = 6e-3
    lr_schedule: str = "cosine"  # constant | cosine (to 0 at the last step), after warmup_steps
    warmup_steps: int = 200  # linear learning-rate warm-up
    generate_images: bool = True  # a reconstruction grid per epoch, logged to MLflow
    seed: int = 0
    checkpoint_every: int = 200  # optimizer steps between resumable checkpoints

    def rules(self, s: str) -> None:
        _require(self.kind in AUTOENCODER_KINDS, f"{s}.kind", self.kind, f"one of {', '.join(AUTOENCODER_KINDS)}")
        _at_least_one(self, s, "latent_dim", "epochs", "batch_size")
        _require(self.lr > 0, f"{s}.lr", self.lr, "a number > 0")
        _schedule_rules(self, s)
        _at_least_one(self, s, "checkpoint_every")


@dataclass(frozen=True)
class DiffusionConfig(_Section):
    """`diffusion:`: the latent DDPM, an MLP denoiser of FiLM residual blocks on a linear beta schedule, and
    its training. There is no latent_dim: the latent size is read from the autoencoder checkpoint."""

    denoiser: str = "mlp"  # mlp (FiLM residual MLP) | unet (pixel space: needs autoencoder.kind none)
    hidden_dim: int = 256  # mlp only
    num_blocks: int = 4  # mlp only
    unet_channels: int = 16  # unet only: width of its 28x28 level (then 2x, 2x); 16 = about 150K parameters
    T: int = 1000
    beta_start: float = 1e-4
    beta_end: float = 2e-2
    epochs: int = 60
    batch_size: int = 512
    lr: float = 1.6e-3
    lr_schedule: str = "cosine"  # constant | cosine (to 0 at the last step), after warmup_steps
    warmup_steps: int = 200  # linear learning-rate warm-up
    only_digit: Optional[int] = None
    conditional: bool = False
    cond_drop_prob: float = 0.1
    min_snr_gamma: float = 5.0  # > 0: weight each timestep's loss by min(SNR, gamma) / SNR (0 = L_simple)
    samples_per_timestep: int = 8  # consecutive rows of a batch that share one drawn timestep (1 = DDPM's draw)
    ema_decay: float = 0.999
    ema_warmup_steps: int = 500
    ema_max_fraction: float = 0.2  # the EMA averages over at most this fraction of the run's optimizer steps
    generate_images: bool = True  # a DDIM preview grid per epoch, logged to MLflow
    seed: int = 0
    checkpoint_every: int = 500

    def rules(self, s: str) -> None:
        _require(self.denoiser in DENOISERS, f"{s}.denoiser", self.denoiser, f"one of {', '.join(DENOISERS)}")
        _at_least_one(self, s, "hidden_dim", "num_blocks", "unet_channels")
        _require(self.T >= 2, f"{s}.T", self.T, "an integer >= 2")
        _require(0 < self.beta_start < 1, f"{s}.beta_start", self.beta_start, "a number in (0, 1)")
        _require(self.beta_start < self.beta_end < 1, f"{s}.beta_end", self.beta_end,
                 f"a number in (beta_start={self.beta_start}, 1)")
        _at_least_one(self, s, "epochs", "batch_size")
        _require(self.lr > 0, f"{s}.lr", self.lr, "a number > 0")
        _schedule_rules(self, s)
        _require(self.only_digit is None or 0 <= self.only_digit <= 9, f"{s}.only_digit", self.only_digit,
                 "null or an integer digit 0-9")
        _require(0 <= self.cond_drop_prob < 1, f"{s}.cond_drop_prob", self.cond_drop_prob, "a number in [0, 1)")
        _require(self.min_snr_gamma >= 0, f"{s}.min_snr_gamma", self.min_snr_gamma, "a number >= 0 (0 = off)")
        _at_least_one(self, s, "samples_per_timestep")
        _require(0 <= self.ema_decay < 1, f"{s}.ema_decay", self.ema_decay, "a number in [0, 1)")
        _require(self.ema_warmup_steps >= 0, f"{s}.ema_warmup_steps", self.ema_warmup_steps, "an integer >= 0")
        _require(0 < self.ema_max_fraction <= 1, f"{s}.ema_max_fraction", self.ema_max_fraction, "a number in (0, 1]")
        _at_least_one(self, s, "checkpoint_every")


@dataclass(frozen=True)
class SampleConfig(_Section):
    num_images: int = 0  # scored by `evaluate`; 0 = as many as the test set; the grid shows the first grid_size
    grid_size: int = 100
    sampler: str = "ddim"
    steps: int = 250
    eta: float = 1.0  # DDIM only: 0 = deterministic, 1 = DDPM-like noise
    use_ema: bool = False  # True: sample with the EMA of the weights
    guidance: float = 2.0  # classifier-free guidance scale w (conditional models only)
    digit: Optional[int] = None  # conditional models only: null samples every digit
    batch_size: int = 2500
    seed: int = 0

    def rules(self, s: str) -> None:
        _require(self.num_images >= 0, f"{s}.num_images", self.num_images, "an integer >= 0 (0 = test set size)")
        _at_least_one(self, s, "grid_size")
        _require(self.sampler in SAMPLERS, f"{s}.sampler", self.sampler, f"one of {', '.join(SAMPLERS)}")
        _at_least_one(self, s, "steps")
        _require(eta_ok(self.eta), f"{s}.eta", self.eta, ETA_EXPECTED)
        _require(guidance_ok(self.guidance), f"{s}.guidance", self.guidance, GUIDANCE_EXPECTED)
        _require(self.digit is None or 0 <= self.digit <= 9, f"{s}.digit", self.digit, "null or a digit 0-9")
        _at_least_one(self, s, "batch_size")


@dataclass(frozen=True)
class EvaluatorConfig(_Section):
    """`evaluator:`: the digit classifier whose features score samples (see `evaluator.py`)."""

    arch: str = "cnn"  # cnn | allconv
    epochs: int = 3
    batch_size: int = 128
    lr: float = 1e-3
    seed: int = 0
    checkpoint_every: int = 200  # optimizer steps between resumable checkpoints

    def rules(self, s: str) -> None:
        _require(self.arch in EVALUATOR_ARCHS, f"{s}.arch", self.arch, f"one of {', '.join(EVALUATOR_ARCHS)}")
        _at_least_one(self, s, "epochs", "batch_size")
        _require(self.lr > 0, f"{s}.lr", self.lr, "a number > 0")
        _at_least_one(self, s, "checkpoint_every")


@dataclass(frozen=True)
class SecondEvaluatorConfig(EvaluatorConfig):
    """`second_evaluator:`: another network, trained on its own, that scores the same images."""

    arch: str = "allconv"
    epochs: int = 2
    lr: float = 3e-3
    seed: int = 1


@dataclass(frozen=True)
class EvaluateConfig(_Section):
    n: int = 10000  # images per set; capped by the test set size
    k: int = 5  # neighbours for precision/recall/density/coverage
    seed: int = 0

    def rules(self, s: str) -> None:
        _require(self.n >= 10, f"{s}.n", self.n, "an integer >= 10")
        _at_least_one(self, s, "k")
        _require(min_images(self.k) <= self.n, f"{s}.k", self.k, f"an integer <= {self.n - 2} (k neighbours need "
                 f"k + 2 images to compare, and evaluate.n={self.n})")


def registry_name_ok(name: str) -> bool:
    """A registered-model name that MLflow 3 takes (`mlflow.utils.validation._validate_model_name`: not blank, no
    '/' or ':', unchanged by `posixpath.normpath`; its file store: no path separator or '%'), without
    surrounding spaces."""
    return (bool(name.strip()) and name == name.strip() and not any(c in name for c in "/\\:%")
            and name != "." and not name.startswith(".."))


@dataclass(frozen=True)
class TrackingConfig(_Section):
    enabled: bool = True
    experiment: str = "mnist-ldm"
    registered_model: str = "mnist-ldm"  # the Model Registry name that `package_model` adds a version to

    def rules(self, s: str) -> None:
        _require(bool(self.experiment.strip()), f"{s}.experiment", self.experiment, "a non-empty name")
        _require(registry_name_ok(self.registered_model), f"{s}.registered_model", self.registered_model,
                 "a name the MLflow Model Registry takes: not empty, no surrounding spaces, no '/', '\\', ':' or "
                 "'%', not '.' and not starting with '..'")


@dataclass(frozen=True)
class Params:
    data: DataConfig = DataConfig()
    autoencoder: AutoencoderConfig = AutoencoderConfig()
    diffusion: DiffusionConfig = DiffusionConfig()
    sample: SampleConfig = SampleConfig()
    evaluator: EvaluatorConfig = EvaluatorConfig()
    second_evaluator: SecondEvaluatorConfig = SecondEvaluatorConfig()
    evaluate: EvaluateConfig = EvaluateConfig()
    tracking: TrackingConfig = TrackingConfig()

    def validate(self) -> None:
        """Every section's checks, then the rules across sections (`params_rules`: DDIM takes at most T steps,
        the U-Net works on pixels, a digit or guidance needs a conditional model, ...)."""
        for f in fields(self):
            getattr(self, f.name).validate(f.name)
        problem = cross_section_problem(self)
        if problem:
            raise ConfigError(problem)

    def flat(self) -> dict[str, Any]:
        """`{"section.key": value}` for every param, the form MLflow logs."""
        return {f"{sec}.{k}": v for sec, d in dataclasses.asdict(self).items() for k, v in d.items()}


def override(section, name: str, **changes):
    """A copy of `section` with CLI overrides applied (None means 'not given'), re-validated."""
    changes = {k: v for k, v in changes.items() if v is not None}
    new = dataclasses.replace(section, **changes)
    try:
        new.validate(name)
    except FieldError as e:  # the value may come from a flag: say so (--eta sets sample.eta, and so on)
        raise ConfigError(f"{e.key}={e.value!r} (from a command-line flag or params.yaml) is not allowed; "
                          f"expected {e.expected}") from None
    return new
