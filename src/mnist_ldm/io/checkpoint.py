"""Checkpoints: plain dicts of tensors and plain data with a `format` (which kind) and `format_version`, saved
atomically and loaded with `torch.load(weights_only=True)`, so loading runs no code from the file; a file of
the wrong kind is refused with one line naming it."""

from __future__ import annotations

import io
import pickle
from pathlib import Path
from typing import Any, Callable

import torch
from mnist_ldm.io.atomic import atomic_path
from mnist_ldm.io.errors import UserError, first_line
from mnist_ldm.io.paths import input_error

FORMAT_VERSION = 1
KINDS = {
    "mnist-ldm/autoencoder": "an autoencoder checkpoint (models/autoencoder.pt)",
    "mnist-ldm/diffusion": "a latent-diffusion checkpoint (models/diffusion.pt)",
    "mnist-ldm/evaluator": "an evaluator checkpoint (models/evaluator.pt)",
    "mnist-ldm/resume": "a resumable training state",
}


class CheckpointError(UserError):
    pass


def _to_cpu(obj: Any) -> Any:
    if torch.is_tensor(obj):
        return obj.detach().cpu()
    if isinstance(obj, dict):
        return {k: _to_cpu(v) for k, v in obj.items()}
    return type(obj)(_to_cpu(v) for v in obj) if isinstance(obj, (list, tuple)) else obj


def save_checkpoint(path: str | Path, kind: str, payload: dict[str, Any]) -> None:
    """`payload` on the CPU (it loads on any device) as a checkpoint of `kind`."""
    payload = _to_cpu({"format": kind, "format_version": FORMAT_VERSION, **payload})
    data = io.BytesIO()  # serialized in memory, then written: a full disk is an OSError (ENOSPC), not torch's
    torch.save(payload, data)  # RuntimeError; and the archive is not named after the (pid-stamped) temp file
    with atomic_path(path) as tmp:
        tmp.write_bytes(data.getbuffer())


def load_checkpoint(path: str | Path, kind: str, what: str = "checkpoint") -> dict[str, Any]:
    """`path`, which must be a checkpoint of `kind`; anything else is a CheckpointError naming the file."""
    path = Path(path)
    error = input_error(path, "a file", f"{what} not found", f"expected {KINDS[kind]}")
    if error:
        raise CheckpointError(error)
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        lines = str(e).splitlines()
        # torch words it "Unsupported global: GLOBAL x" or "unsupported GLOBAL x"; not its advice to allowlist it
        unsafe = next((ln.strip().split(" was not an allowed global")[0] for ln in lines
                       if "unsupported global" in ln.lower() or "unsupported operand" in ln.lower()), None)
        with open(path, "rb") as f:
            pickle_or_zip = f.read(4).startswith((b"PK\x03\x04", b"\x80"))  # torch's zip, or a protocol-2+ pickle
        if "unsupported global" not in (unsafe or "").lower() and not pickle_or_zip:
            raise CheckpointError(f"{path}: not a readable {what} (neither a zip archive nor a pickle: truncated, "
                                  f"corrupt or another kind of file)") from None
        reason = unsafe or (lines[0] if lines and "weights_only" not in lines[0] else "") or "unsafe pickle"
        raise CheckpointError(f"{path}: refused to load: the file holds pickled Python objects, not only tensors and "
                              f"plain data, and loading it could run code ({reason})") from None
    except (RuntimeError, EOFError, OSError, ValueError) as e:
        raise CheckpointError(f"{path}: not a readable {what} (truncated or corrupt: {first_line(e)})") from None
    if not isinstance(ckpt, dict) or "format" not in ckpt:
        raise CheckpointError(f"{path}: not an mnist-ldm checkpoint (no 'format' field); expected {KINDS[kind]}")
    if ckpt["format"] != kind:
        got = KINDS.get(ckpt["format"], repr(ckpt["format"]))
        raise CheckpointError(f"{path}: this is {got}, but {KINDS[kind]} was expected here")
    if ckpt.get("format_version") != FORMAT_VERSION:
        raise CheckpointError(f"{path}: checkpoint format version {ckpt.get('format_version')!r} is not supported; "
                              f"this version of mnist-ldm reads version {FORMAT_VERSION}")
    return ckpt


def load_model_checkpoint(path: str | Path, kind: str, what: str, build: Callable[[dict], torch.nn.Module],
                          weights: str = "state_dict") -> tuple[Any, dict]:
    """The model that `build` makes of the `model_config` in `path`, with its `weights` (finite, fitting), in eval
    mode on the CPU; a ValueError from `build` (a spec's checks, one line: config.sections.spec_from) names the
    file."""
    ckpt = load_checkpoint(path, kind, what)
    try:
        model, state = build(ckpt.get("model_config", {})), ckpt[weights]
    except ValueError as e:
        raise CheckpointError(f"{path}: {first_line(e)}") from None
    except (KeyError, TypeError) as e:
        raise CheckpointError(f"{path}: incomplete {what} (missing or malformed field {e})") from None
    for name, t in state.items():  # NaN weights would decode to blank images without any error
        if torch.is_tensor(t) and t.is_floating_point() and not torch.isfinite(t).all():
            raise CheckpointError(f"{path}: weights '{name}' hold NaN or infinite values; the checkpoint is "
                                  f"unusable (retrain it, e.g. dvc repro -f, or restore it with dvc checkout)")
    try:
        model.load_state_dict(state)
    except RuntimeError as e:  # its first line is only a heading
        lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
        raise CheckpointError(f"{path}: weights do not fit the model config it records "
                              f"({(lines[1] if len(lines) > 1 else lines[0] if lines else 'mismatch')[:200]})") from None
    return model.eval(), ckpt
