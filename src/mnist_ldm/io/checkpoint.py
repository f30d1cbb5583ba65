"""Self-describing checkpoints, saved atomically and loaded without running code from the file.

Every checkpoint is a plain dict of tensors, numbers, strings, lists and dicts with a `format`
(which kind of checkpoint) and `format_version`, so `torch.load(weights_only=True)` reads it and a
file of the wrong kind is refused with one line naming the file.
"""

from __future__ import annotations

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


def save_checkpoint(path: str | Path, kind: str, payload: dict[str, Any]) -> None:
    assert kind in KINDS, kind
    payload = _to_cpu({"format": kind, "format_version": FORMAT_VERSION, **payload})  # loads on any device
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as f:  # a file object: the archive is not named after the (pid-stamped) temp file
            torch.save(payload, f)


def _to_cpu(obj: Any) -> Any:
    if torch.is_tensor(obj):
        return obj.detach().cpu()
    if isinstance(obj, dict):
        return {k: _to_cpu(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_to_cpu(v) for v in obj)
    return obj


def load_checkpoint(path: str | Path, kind: str, what: str = "checkpoint") -> dict[str, Any]:
    """Load `path`, which must be a checkpoint of `kind`; anything else is a CheckpointError naming the file."""
    path = Path(path)
    error = input_error(path, "a file", f"{what} not found", f"expected {KINDS[kind]}")
    if error:
        raise CheckpointError(error)
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        reason = str(e).splitlines()[0] if "weights_only" not in str(e).splitlines()[0] else ""
        for line in str(e).splitlines():  # torch words it "Unsupported global: GLOBAL x" or "unsupported GLOBAL x"
            if "unsupported global" in line.lower() or "unsupported operand" in line.lower():
                reason = line.strip().split(" was not an allowed global")[0]  # not torch's advice to allowlist it
                break
        if "unsupported global" not in reason.lower() and not _pickle_or_zip(path):
            raise CheckpointError(f"{path}: not a readable {what} (neither a zip archive nor a pickle: truncated, "
                                  f"corrupt or another kind of file)") from None
        raise CheckpointError(f"{path}: refused to load: the file holds pickled Python objects, not only tensors and "
                              f"plain data, and loading it could run code ({reason or 'unsafe pickle'})") from None
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


def _pickle_or_zip(path: Path) -> bool:
    """Whether the file starts like a torch zip archive or a protocol-2+ pickle (torch's legacy format)."""
    with open(path, "rb") as f:
        head = f.read(4)
    return head.startswith(b"PK\x03\x04") or head.startswith(b"\x80")


def state_dict_mismatch(e: RuntimeError) -> str:
    """The first concrete problem in torch's load_state_dict error (its first line is only a heading)."""
    lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
    return (lines[1] if len(lines) > 1 else lines[0] if lines else "mismatch")[:200]


def check_finite(state_dict: dict, path: str | Path, which: str = "weights") -> None:
    """Refuse weights holding NaN or infinity (they decode to blank images without any error)."""
    for name, t in state_dict.items():
        if torch.is_tensor(t) and t.is_floating_point() and not torch.isfinite(t).all():
            raise CheckpointError(f"{path}: {which} '{name}' hold NaN or infinite values; the checkpoint is "
                                  f"unusable (retrain it, e.g. dvc repro -f, or restore it with dvc checkout)")


def load_model_checkpoint(path: str | Path, kind: str, what: str, build: Callable[[dict], torch.nn.Module],
                          weights: str = "state_dict") -> tuple[Any, dict]:
    """Build the model that `path` describes, load its `weights` (finite, fitting), eval mode, CPU."""
    ckpt = load_checkpoint(path, kind, what)
    try:
        model = build(ckpt.get("model_config", {}))
        state = ckpt[weights]
    except (KeyError, TypeError, ValueError) as e:
        raise CheckpointError(f"{path}: incomplete {what} (missing or malformed field {e})") from None
    check_finite(state, path)
    try:
        model.load_state_dict(state)
    except RuntimeError as e:
        raise CheckpointError(f"{path}: weights do not fit the model config it records "
                              f"({state_dict_mismatch(e)})") from None
    return model.eval(), ckpt
