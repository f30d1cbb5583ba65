"""Reading `params.yaml` (and `--set section.key=value` items) into a validated `config.Params`.

Strict and finite: duplicate keys, a missing section, unknown keys, wrong types, text where a number
belongs (YAML 1.1 reads `2e-4` as a string), `.nan`/`.inf` and out-of-range values are each refused
with one line naming the file (or the `--set` item), the key and what is expected.
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from dataclasses import fields
from decimal import Decimal
from pathlib import Path
from typing import Any

import yaml

from mnist_ldm.config.sections import ConfigError, Params

SECTIONS = tuple(f.name for f in fields(Params))
_SECTION_TYPES = typing.get_type_hints(Params)
_MERGE_TAG = "tag:yaml.org,2002:merge"


class StrictLoader(yaml.SafeLoader):
    """`yaml.SafeLoader` that refuses a key given twice in one mapping, at any depth.

    The error is a `ConfigError` starting with `params:`; it names the key's dotted path and both lines.
    Keys brought in by a `<<: *anchor` merge may still be overridden, as YAML intends.
    """

    def __init__(self, stream: str) -> None:
        super().__init__(stream)
        self._paths: dict[int, str] = {}  # id(mapping node) -> its dotted path, filled in by its parent

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict:
        where = self._paths.get(id(node), "")
        seen: dict[Any, int] = {}
        for key_node, value_node in node.value:
            if key_node.tag == _MERGE_TAG or not isinstance(key_node, yaml.ScalarNode):
                continue  # merges are flattened by SafeLoader; complex keys are left to it
            key = self.construct_object(key_node)
            path = f"{where}.{key}" if where else str(key)
            line = key_node.start_mark.line + 1
            try:
                first = seen.get(key)
            except TypeError:  # an unhashable key: SafeLoader says so itself
                continue
            if first is not None:
                raise ConfigError(f"params: duplicate key '{path}' at lines {first} and {line}; "
                                  "keep only one (YAML would silently use the last)")
            seen[key] = line
            if isinstance(value_node, yaml.MappingNode):
                self._paths.setdefault(id(value_node), path)
        return super().construct_mapping(node, deep=deep)


def parse_yaml(text: str) -> Any:
    """`text` read with `StrictLoader`: a `ConfigError` (prefix `params:`) for duplicates or bad YAML."""
    loader = None
    try:
        loader = StrictLoader(text)  # its reader already refuses control characters
        return loader.get_single_data()
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        if isinstance(e, yaml.reader.ReaderError):
            line = text.count("\n", 0, e.position) + 1
            code = e.character if isinstance(e.character, int) else ord(e.character)
            raise ConfigError(f"params: not a text file: character {code:#04x} at line {line} is not "
                              "allowed in YAML") from None
        where = f" at line {mark.line + 1}" if mark else ""
        problem, context = getattr(e, "problem", None), getattr(e, "context", None)
        if problem and context:
            problem = f"{problem} ({context})" if context.startswith("while") else f"{context}, {problem}"
        problem = " ".join(str(problem or context or e).split())
        raise ConfigError(f"params: not valid YAML{where}: {problem}") from None
    finally:
        if loader is not None:
            loader.dispose()


def _type_ok(value: Any, tp: Any) -> bool:
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
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


def yaml_float_spellings(text: str, x: float) -> str:
    """`2.0e-4 or 0.0002`: ways to write `x` that YAML 1.1 reads as a float (it needs a dot, and a sign
    in the exponent); the exponent form only when `text` used one."""
    d = Decimal(repr(x))
    mantissa, _, exp = format(d.normalize(), "e").partition("e")
    sci = f"{mantissa if '.' in mantissa else mantissa + '.0'}e{int(exp):+d}".replace("e+-", "e-")
    plain = format(d, "f")
    plain = plain if "." in plain else plain + ".0"
    options = [sci] if "e" in text.lower() else []
    if len(plain) <= 24 or not options:
        options.append(plain)
    return " or ".join(s for s in options if isinstance(parse_yaml(s), float)) or plain


def check_value(cls: type, section: str, key: str, value: Any) -> Any:
    """`value` for `section.key` of dataclass `cls`, type-checked (an int given for a float becomes a float)."""
    hints = typing.get_type_hints(cls)
    valid = [f.name for f in fields(cls)]
    if key not in valid:
        raise ConfigError(f"params: unknown key '{section}.{key}'; valid keys in '{section}': {', '.join(valid)}")
    tp = hints[key]
    if tp is float and isinstance(value, str):
        try:
            x = float(value)
        except ValueError:
            x = None
        if x is not None and math.isfinite(x):
            raise ConfigError(f"params: {section}.{key}={value!r} is text in YAML; "
                              f"write {yaml_float_spellings(value, x)}")
    if tp is str and isinstance(value, (int, float, bool)):
        raise ConfigError(f"params: {section}.{key}={value!r} has the wrong type; expected str "
                          "(put the value in quotes)")
    if not _type_ok(value, tp):
        raise ConfigError(f"params: {section}.{key}={value!r} has the wrong type; expected {_type_name(tp)}")
    if tp is float:
        try:
            return float(value)
        except OverflowError:
            raise ConfigError(f"params: {section}.{key}={value!r} is not allowed; expected a finite number "
                              "(this one is too large for a float)") from None
    return value


def _build_section(cls: type, raw: Any, name: str):
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ConfigError(f"params: section '{name}' must be a mapping of keys to values, got {type(raw).__name__}")
    obj = cls(**{key: check_value(cls, name, key, value) for key, value in raw.items()})
    obj.validate(name)
    return obj


def params_from_dict(raw: Any, require_all_sections: bool = True) -> Params:
    """`Params` from a parsed params mapping; keys left out of a section take the dataclass defaults.

    With `require_all_sections` (what `load_params` uses), a section left out is an error; without it,
    it takes its defaults too (for tests and partial dicts).
    """
    if raw is None and not require_all_sections:
        raw = {}
    if raw is None:
        raise ConfigError(f"params: the file is empty; it needs the sections {', '.join(SECTIONS)}")
    if not isinstance(raw, dict):
        raise ConfigError(f"params: the file must hold a mapping of sections ({', '.join(SECTIONS)}), "
                          f"got {type(raw).__name__}")
    unknown = [k for k in raw if k not in SECTIONS]
    if unknown:
        raise ConfigError(f"params: unknown section '{unknown[0]}'; valid sections: {', '.join(SECTIONS)}")
    missing = [s for s in SECTIONS if s not in raw]
    if missing and require_all_sections:
        raise ConfigError(f"params: missing section{'s' if len(missing) > 1 else ''} {', '.join(missing)}; "
                          f"every section must be present ({', '.join(SECTIONS)}); keys left out inside a "
                          "section take their defaults")
    params = Params(**{name: _build_section(_SECTION_TYPES[name], raw.get(name), name) for name in SECTIONS})
    params.validate()
    return params


def _read_text(path: Path) -> str:
    if path.is_dir():
        raise ConfigError(f"{path}: is a directory, not a params file; pass the YAML file itself "
                          f"(e.g. {path / 'params.yaml'})")
    try:
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
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line = data.count(b"\n", 0, e.start) + 1
        raise ConfigError(f"{path}: not UTF-8 text (byte {data[e.start]:#04x} at line {line}); "
                          "save the params file as UTF-8") from None


def load_params(path: str | Path = "params.yaml") -> Params:
    """The validated `Params` in the YAML file at `path`; every problem is one `ConfigError` line."""
    path = Path(path)
    text = _read_text(path)
    try:
        return params_from_dict(parse_yaml(text))
    except ConfigError as e:
        raise ConfigError(str(e).replace("params:", f"{path}:", 1)) from None


def dotted_value(tree: Any, dotted: str) -> Any:
    """The value at a dotted key (`sample.eta`, `fcd.generated`; any depth) of nested dicts such as a parsed
    params.yaml or metrics JSON; None where a part is missing or its parent is not a dict."""
    node = tree
    for part in dotted.split("."):
        node = node.get(part) if isinstance(node, dict) else None
    return node


def _parse_item(item: str) -> tuple[str, str, Any]:
    left, eq, text = item.partition("=")
    parts = left.strip().split(".")
    if not eq or len(parts) != 2 or not all(parts):
        raise ConfigError("expected section.key=value, e.g. diffusion.lr=0.0005")
    section, key = parts
    if section not in SECTIONS:
        raise ConfigError(f"params: unknown section '{section}'; valid sections: {', '.join(SECTIONS)}")
    valid = [f.name for f in fields(_SECTION_TYPES[section])]
    if key not in valid:
        raise ConfigError(f"params: unknown key '{section}.{key}'; valid keys in '{section}': {', '.join(valid)}")
    if not text.strip():
        raise ConfigError(f"params: no value for {section}.{key}; write {section}.{key}=VALUE (null for none)")
    value = parse_yaml(text)
    return section, key, check_value(_SECTION_TYPES[section], section, key, value)


def apply_overrides(params: Params, items: list[str]) -> Params:
    """A copy of `params` with each `section.key=value` item applied (values read as YAML), re-validated.

    Errors name the `--set` item; a key set twice is refused, as in the file.
    """
    changes: dict[str, dict[str, Any]] = {}
    given: dict[tuple[str, str], str] = {}
    for item in items:
        try:
            section, key, value = _parse_item(item)
        except ConfigError as e:
            raise ConfigError(f"--set {item}: {str(e).removeprefix('params: ')}") from None
        if (section, key) in given:
            raise ConfigError(f"--set {item}: {section}.{key} is already set by --set {given[section, key]}; "
                              "give each key once")
        given[section, key] = item
        changes.setdefault(section, {})[key] = value
    new = {}
    for section, kw in changes.items():
        new[section] = dataclasses.replace(getattr(params, section), **kw)
        try:
            new[section].validate(section)
        except ConfigError as e:
            items_here = " ".join(f"--set {given[section, k]}" for k in kw)
            raise ConfigError(str(e).replace("params:", f"{items_here}:", 1)) from None
    out = dataclasses.replace(params, **new)
    out.validate()
    return out
