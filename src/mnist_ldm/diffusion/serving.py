"""The trained generator as an MLflow pyfunc model (what the `package_model` stage saves as `models/generator`).

    model = mlflow.pyfunc.load_model("models:/mnist-ldm@champion")
    out = model.predict({"n": 8, "seed": 0})                       # one row per image
    images = np.stack(out["image"]).reshape(-1, 28, 28)            # (8, 28, 28) uint8

One request per call (a one-row DataFrame, a dict, or over REST `{"dataframe_records": [{"n": 8}]}`): `n`
(1 to `max_images`) and the `sample` params' request fields, which default to those the model was packaged with.
A bad request (an unknown field, or a field sent as `params`, included) raises `MlflowException`
INVALID_PARAMETER_VALUE with one line naming the field: HTTP 400 from `mlflow models serve`. The weights are the
two checkpoint files, read with `torch.load(weights_only=True)`.
"""

from __future__ import annotations

import hashlib
import math
import tempfile
from pathlib import Path
from typing import Any

import mlflow.pyfunc
import numpy as np
import pandas as pd
import yaml
from mlflow.exceptions import MlflowException
from mlflow.models import ModelSignature
from mlflow.protos.databricks_pb2 import INVALID_PARAMETER_VALUE
from mlflow.pyfunc import PythonModel
from mlflow.types.schema import Array, ColSpec, ParamSchema, ParamSpec, Schema
from pydantic import ValidationError

from mnist_ldm.config.sections import REQUEST_FIELDS, RequestError, SamplingRequest, error_line
from mnist_ldm.diffusion.pipeline import LatentDiffusionPipeline
from mnist_ldm.runtime.device import runtime

MAX_IMAGES = 1000  # per request
# The model is saved "from code" (no pickle): MLflow runs this file, with the packaged `mnist_ldm` on sys.path.
MODEL_CODE = '''"""mnist-ldm generator: the model-from-code entry that MLflow runs to load the model."""
from mlflow.models import set_model

from mnist_ldm.diffusion.serving import MnistGenerator

set_model(MnistGenerator())
'''
FIELDS = ("n", *REQUEST_FIELDS)
DEFAULT_KEYS = (*REQUEST_FIELDS, "use_ema", "batch_size")


def bad_request(message: str) -> MlflowException:
    return MlflowException(message, error_code=INVALID_PARAMETER_VALUE)


def _scalar(v: Any) -> Any:
    """A plain Python value: numpy scalars and one-element lists unwrapped, an integral float (a pandas column
    with a null in it) an int. A NaN or infinite number stays, to be refused, never taken for the default."""
    if isinstance(v, (list, tuple)) and len(v) == 1:
        v = v[0]
    v = v.item() if isinstance(v, (np.ndarray, np.generic)) and v.size == 1 else v  # REST `inputs`: 0-d arrays
    return int(v) if isinstance(v, float) and v.is_integer() else v


def request_fields(model_input: Any) -> dict[str, Any]:
    """The given fields of one request; a null field (or NaN as `digit`: pandas' null of a numeric column) is
    left out."""
    if isinstance(model_input, pd.DataFrame):
        if len(model_input) != 1:
            raise bad_request(f"the request has {len(model_input)} rows; send one row (n asks for many images)")
        row = model_input.iloc[0].to_dict()
    elif isinstance(model_input, list) and len(model_input) == 1 and isinstance(model_input[0], dict):
        row = model_input[0]
    elif isinstance(model_input, dict):
        row = model_input
    else:
        raise bad_request(f"the request is a {type(model_input).__name__}; send one record with the field n")
    fields = {str(k): _scalar(v) for k, v in row.items()}
    return {k: v for k, v in fields.items()
            if not (v is None or (k == "digit" and isinstance(v, float) and math.isnan(v)))}


def resolve_request(model_input: Any, defaults: dict[str, Any], max_images: int) -> dict[str, Any]:
    """The request with the packaged defaults filled in, validated by the `sample` params' own fields."""
    given = request_fields(model_input)
    unknown = sorted(k for k in given if k not in FIELDS)
    if unknown:
        raise bad_request(f"unknown field(s) {', '.join(unknown)}; valid: {', '.join(FIELDS)}")
    n = given.pop("n", None)
    if n is None:
        raise bad_request(f"n is missing; give the number of images to generate (1 to {max_images})")
    if not isinstance(n, int) or isinstance(n, bool):
        raise bad_request(f"n={n!r} is not allowed; expected an integer")
    if not 1 <= n <= max_images:
        raise bad_request(f"n={n} is not allowed; expected 1 to {max_images} images per request")
    try:
        request = SamplingRequest(**{**{k: defaults[k] for k in REQUEST_FIELDS if k in defaults}, **given})
    except ValidationError as e:
        raise bad_request(error_line(e, model=SamplingRequest)) from None
    return {"n": n, **request.model_dump()}


class MnistGenerator(PythonModel):
    def load_context(self, context) -> None:
        cfg = context.model_config or {}
        self.defaults = dict(cfg.get("defaults") or {})
        self.max_images = int(cfg.get("max_images", MAX_IMAGES))
        self.pipe = LatentDiffusionPipeline.from_checkpoints(
            context.artifacts["diffusion"], context.artifacts["autoencoder"],
            use_ema=bool(self.defaults.get("use_ema", True))).to(runtime())

    def predict(self, context, model_input: pd.DataFrame, params=None):
        for k, v in (params or {}).items():  # a request's `params`: the signature names the fields so they get here
            if v is not None:
                raise bad_request(f"params {k}={v!r} is not read; send {k} in the record, beside n")
        req = resolve_request(model_input, self.defaults, self.max_images)
        given = [k for k in request_fields(model_input) if k != "n"]
        try:  # a given field that would change nothing (steps for ddpm, ...) is refused, not ignored
            request = self.pipe.check(SamplingRequest(**{k: req[k] for k in REQUEST_FIELDS}), given)
        except RequestError as e:  # named as the request names it: `eta=1.5 is not allowed; ...`
            raise bad_request(e.request_message) from None
        out = self.pipe.generate(req["n"], request, batch_size=int(self.defaults.get("batch_size") or 2500),
                                 progress=False)
        labels = [None] * len(out.images) if out.labels is None else [int(v) for v in out.labels]
        return pd.DataFrame({"label": pd.Series(labels, dtype=object),
                             "image": list(out.images.reshape(len(out.images), -1))})


def signature():
    """No input schema: MLflow would drop a column it does not name, and every field is checked here (`REQUEST` in
    the model's metadata says what each must be). The fields as `params` (default null), so that a request's
    `params` reach `predict`, which refuses them, instead of MLflow dropping them. Output: one row per image."""
    params = ParamSchema([ParamSpec(k, {"sampler": "string", "eta": "double", "guidance": "double"}.get(k, "long"),
                                    None) for k in FIELDS])
    outputs = Schema([ColSpec("long", "label", required=False), ColSpec(Array("long"), "image")])
    return ModelSignature(inputs=None, outputs=outputs, params=params)


REQUEST = {"n": f"integer 1 to {MAX_IMAGES}, required",  # what each field must be, from the `sample` params' fields
           **{k: f.description or "" for k, f in SamplingRequest.model_fields.items()}}


def save_generator(path, diffusion_ckpt, ae_ckpt, defaults: dict[str, Any], package_dir, pip_requirements: list[str],
                   metadata: dict[str, Any]) -> None:
    """Save the pair of checkpoints as an MLflow pyfunc model in the (empty or missing) folder `path`;
    `package_dir` is a copy of the `mnist_ldm` modules that this module needs (the model's `code_paths`)."""
    cfg = {"defaults": {k: defaults[k] for k in DEFAULT_KEYS}, "max_images": MAX_IMAGES}
    with tempfile.TemporaryDirectory() as tmp:
        entry = Path(tmp) / "generator.py"
        entry.write_text(MODEL_CODE)
        mlflow.pyfunc.save_model(
            path, python_model=str(entry),
            artifacts={"diffusion": str(diffusion_ckpt), "autoencoder": str(ae_ckpt)},
            code_paths=[str(package_dir)], pip_requirements=pip_requirements, signature=signature(),
            input_example=pd.DataFrame([{"n": 4, "seed": 0}]), model_config=cfg,
            metadata={**metadata, "request": REQUEST, "response": "one row per image: label (requested digit or "
                      "null), image (784 uint8, 28x28 row by row)"})
    # The same checkpoints, code and defaults give the same folder, so its hash in dvc.lock changes only with them:
    # MLflow's creation time, random id and temporary code path go (only the code file's name is read back).
    mlmodel = Path(path) / "MLmodel"
    spec = yaml.safe_load(mlmodel.read_text())
    spec.pop("utc_time_created", None), spec.pop("model_uuid", None)
    spec["flavors"]["python_function"]["model_code_path"] = "generator.py"
    spec["model_uuid"] = hashlib.md5(yaml.safe_dump(spec, sort_keys=True).encode() + b"".join(
        Path(f).read_bytes() for f in (diffusion_ckpt, ae_ckpt))).hexdigest()
    mlmodel.write_text(yaml.safe_dump(spec, sort_keys=False))
