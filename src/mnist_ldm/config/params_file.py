"""Reading `params.yaml` as DVC reads it (ruamel's YAML 1.2 safe loader, as `dvc.utils.serialize.parse_yaml`:
`010` is 10, `2e-4` a number, `yes` text), and the `--set section.key=value` items and flags that change it for one
command, read the same way. The models of `sections` validate every value; a refusal is one `ConfigError` line
naming where the value came from: the file, the `--set` item or the flag."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Iterable

from pydantic import ValidationError

from mnist_ldm.config.sections import ConfigError, Params, error_line

SECTIONS = tuple(Params.model_fields)


def parse_yaml(text: str) -> Any:
    """`text` read as DVC reads YAML; a `ConfigError` (prefix `params:`) for bad YAML or a duplicate key."""
    from ruamel.yaml import YAML
    from ruamel.yaml.error import YAMLError
    from ruamel.yaml.reader import ReaderError

    try:
        return YAML(typ="safe").load(text)
    except ReaderError as e:
        line = text.count("\n", 0, e.position) + 1
        raise ConfigError(f"params: not a text file: character {e.character:#04x} at line {line} is not allowed "
                          "in YAML") from None
    except YAMLError as e:
        mark, problem = getattr(e, "problem_mark", None), getattr(e, "problem", None) or str(e)
        at = f" at line {mark.line + 1}" if mark else ""
        dup = re.match(r'found duplicate key "(.*)" with value', problem)
        if dup:
            raise ConfigError(f"params: duplicate key '{dup[1]}'{at}; give each key once") from None
        context = getattr(e, "context", None)
        if context:
            problem = f"{problem} ({context})" if context.startswith("while") else f"{context}, {problem}"
        raise ConfigError(f"params: not valid YAML{at}: {' '.join(problem.split())}") from None


def params_from_dict(raw: Any, require_all_sections: bool = True, where: str = "params") -> Params:
    """`Params` from a parsed params mapping; keys left out of a section take their defaults. With
    `require_all_sections` (what `load_params` uses), a section left out is an error; without it, it takes its
    defaults too (for tests and partial dicts)."""
    if require_all_sections and raw in (None, {}):
        raise ConfigError(f"{where}: the file is empty; it needs the sections {', '.join(SECTIONS)}")
    raw = {} if raw is None else raw
    if not isinstance(raw, dict):
        raise ConfigError(f"{where}: the file must hold a mapping of sections ({', '.join(SECTIONS)}), "
                          f"got {type(raw).__name__}")
    missing = [s for s in SECTIONS if s not in raw]
    if missing and require_all_sections and not set(raw) - set(SECTIONS):  # an unknown one is named first
        raise ConfigError(f"{where}: missing section{'s' if len(missing) > 1 else ''} {', '.join(missing)}; "
                          f"every section must be present ({', '.join(SECTIONS)}); keys left out inside a "
                          "section take their defaults")
    try:
        return Params.model_validate({k: {} if v is None else v for k, v in raw.items()})
    except ValidationError as e:
        raise ConfigError(error_line(e, where)) from None


def load_params(path: str | Path = "params.yaml") -> Params:
    """The validated `Params` in the YAML file at `path`; every problem is one `ConfigError` line."""
    path = Path(path)
    if path.is_dir():
        raise ConfigError(f"{path}: is a directory, not a params file; pass the YAML file itself "
                          f"(e.g. {path / 'params.yaml'})")
    try:
        if path.exists() and not path.is_file():  # a device or a named pipe: endless, or waiting for a writer
            raise ConfigError(f"{path}: is not a regular file (a device, named pipe or socket); pass a YAML file")
        data = path.read_bytes()
    except FileNotFoundError:
        raise ConfigError(f"{path}: params file not found; check the path, or run from the project "
                          "root where params.yaml lives") from None
    except PermissionError:
        raise ConfigError(f"{path}: params file is not readable (permission denied); make it readable "
                          f"(chmod u+r {path}) or pass another file") from None
    except OSError as e:
        raise ConfigError(f"{path}: cannot read the params file ({e.strerror or e}); pass a readable "
                          "YAML file") from None
    try:
        raw = parse_yaml(data.decode("utf-8-sig"))
    except UnicodeDecodeError as e:
        line = data.count(b"\n", 0, e.start) + 1
        raise ConfigError(f"{path}: not UTF-8 text (byte {data[e.start]:#04x} at line {line}); "
                          "save the params file as UTF-8") from None
    except ConfigError as e:
        raise ConfigError(str(e).replace("params:", f"{path}:", 1)) from None
    return params_from_dict(raw, where=str(path))


def dotted_value(tree: Any, dotted: str) -> Any:
    """The value at a dotted key (`sample.eta`, `fcd.generated`; any depth) of nested dicts such as a parsed
    params.yaml or metrics JSON; None where a part is missing or its parent is not a dict."""
    node = tree
    for part in dotted.split("."):
        node = node.get(part) if isinstance(node, dict) else None
    return node


def with_changes(params: Params, changes: Iterable[tuple[str, str, Any]], sections_only: bool = False) -> Params:
    """`params` with each `(origin, "section.key", value)` applied and validated; a refusal names the origin of
    the key it is about (every origin, for a rule between keys), and a key changed twice is refused.
    `sections_only`: each changed section is validated alone, without the rules between sections (a flag
    changes one command's run; the sampling request it makes meets its model's own rules)."""
    tree, origins = params.model_dump(), {}
    for origin, key, value in changes:
        if key in origins:
            raise ConfigError(f"{origin}: {key} is already set by {origins[key]}; give each key once")
        origins[key] = origin
        section, _, name = key.partition(".")
        tree.setdefault(section, {})[name] = value
    if not origins:
        return params
    update = {}
    for section in sorted({k.partition(".")[0] for k in origins}) if sections_only else [""]:
        model = Params.model_fields[section].annotation if section else Params
        try:
            update[section] = model.model_validate(tree[section] if section else tree)
        except ValidationError as e:
            loc = ".".join([section, *map(str, e.errors()[0]["loc"])]).strip(".")
            named = [o for k, o in origins.items() if k == loc or k.startswith(loc + ".") or loc.startswith(k + ".")]
            raise ConfigError(error_line(e, " ".join(named or origins.values()), model, section)) from None
    return params.model_copy(update=update) if sections_only else update[""]


def apply_overrides(params: Params, items: list[str]) -> Params:
    """`params` with each `section.key=value` item (the value read as YAML) applied, validated as params.yaml is."""
    changes = []
    for item in items:
        key, eq, text = (part.strip() for part in item.partition("="))
        try:
            if not eq or len(key.split(".")) != 2 or not all(key.split(".")):
                raise ConfigError("expected section.key=value, e.g. diffusion.lr=0.0005")
            if not text:
                raise ConfigError(f"no value for {key}; write {key}=VALUE (null for none)")
            changes.append((f"--set {item}", key, parse_yaml(text)))
        except ConfigError as e:
            raise ConfigError(f"--set {item}: {str(e).removeprefix('params: ')}") from None
    return with_changes(params, changes)
