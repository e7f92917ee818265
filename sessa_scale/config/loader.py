"""Loading configs: YAML files with `base:` inheritance, dotted `key=value` overrides, and
validation that reports every problem at once in one ConfigError.

A YAML file holds sections of the schema (`model:`, `train:`, ...) and optionally
`base: PATH` or `base: [PATH, ...]`, paths relative to the file itself. Bases are loaded
first and deep-merged in order, then the file itself: later wins, mappings merge key by key.
"""

from __future__ import annotations

import copy
import dataclasses
import os
from pathlib import Path
from typing import Any, Sequence

import yaml

from sessa_scale.config.schema import Config
from sessa_scale.config.validate import DEFAULT_SOURCE, check_values, coerce, field_types, section_names, show, suggest
from sessa_scale.config.vocab import resolve_vocab_size
from sessa_scale.errors import UserError

CLI_SOURCE = "command line"


class ConfigError(UserError):
    """An invalid configuration. `problems` lists each as "SOURCE: KEY: what is wrong"; the
    message joins them all into one paragraph."""

    def __init__(self, problems: Sequence[str]):
        self.problems = [p.rstrip(".") for p in problems]
        if len(self.problems) == 1:
            message = f"invalid configuration: {self.problems[0]}"
        else:
            numbered = "; ".join(f"({i}) {p}" for i, p in enumerate(self.problems, 1))
            message = f"invalid configuration, {len(self.problems)} problems: {numbered}"
        super().__init__(message if message.endswith("?") else message + ".")


class _StrictLoader(yaml.SafeLoader):
    """SafeLoader that rejects a key repeated within one mapping (PyYAML keeps the last silently)."""

    def construct_mapping(self, node, deep=False):
        seen = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if not isinstance(key, (str, int, float, bool)):
                continue  # unhashable keys are reported by SafeLoader itself
            if key in seen:
                raise yaml.constructor.ConstructorError(
                    None, None, f"duplicate key {key!r}", key_node.start_mark
                )
            seen.add(key)
        return super().construct_mapping(node, deep=deep)


# A loaded tree and, for every node (dotted path), the file or "command line" that set it.
_Sources = dict[str, str]


def _parse_yaml(path: Path) -> Any:
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError([f"{path}: cannot read the file ({exc.strerror or exc})"]) from None
    try:
        return yaml.load(text, Loader=_StrictLoader)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark is not None else ""
        what = getattr(exc, "problem", None) or str(exc)
        raise ConfigError([f"{path}: {where}invalid YAML: {what}"]) from None


def _sources_of(tree: dict, source: str, prefix: str = "") -> _Sources:
    out = {}
    for key, value in tree.items():
        dotted = f"{prefix}{key}"
        out[dotted] = source
        if isinstance(value, dict):
            out.update(_sources_of(value, source, dotted + "."))
    return out


def _merge(dst: dict, src: dict) -> None:
    """Deep-merge src into dst: mappings merge key by key, anything else is replaced."""
    for key, value in src.items():
        if isinstance(value, dict) and isinstance(dst.get(key), dict):
            _merge(dst[key], value)
        else:
            dst[key] = copy.deepcopy(value)


def _base_paths(raw: Any, path: Path) -> list[Path]:
    items = [raw] if isinstance(raw, str) else raw
    if raw is None or not isinstance(items, list) or not all(isinstance(i, str) and i.strip() for i in items):
        raise ConfigError([f"{path}: base: expected a path or a list of paths (relative to this file), got {show(raw)}"])
    return [Path(os.path.normpath(path.parent / item)) for item in items]


def _load_file(path: Path, chain: tuple[Path, ...] = ()) -> tuple[dict, _Sources]:
    """The file's tree with its bases merged underneath, and the source of every node;
    `chain` holds the files that include it, outermost first."""
    resolved = path.resolve()
    if resolved in [p.resolve() for p in chain]:
        cycle = " -> ".join(str(p) for p in (*chain, path))
        raise ConfigError([f"{chain[-1]}: base: inheritance cycle {cycle}"])
    if not path.is_file():
        if not chain:
            hint = "" if path.suffix in (".yaml", ".yml") else " (an override is written section.key=value)"
            raise ConfigError([f"{path}: config file not found{hint}"])
        raise ConfigError([f"{chain[-1]}: base: file not found: {path}"])
    data = _parse_yaml(path)
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(
            [f"{path}: the top level must be a mapping of sections ({', '.join(section_names())}), got {show(data)}"]
        )
    data = {str(k): v for k, v in data.items()}
    tree: dict = {}
    sources: _Sources = {}
    if "base" in data:
        for base in _base_paths(data.pop("base"), path):
            base_tree, base_sources = _load_file(base, (*chain, path))
            _merge(tree, base_tree)
            sources.update(base_sources)
    _merge(tree, data)
    sources.update(_sources_of(data, str(path)))
    return tree, sources


def _parse_override(item: str) -> tuple[dict, str | None]:
    """`a.b=value` -> ({"a": {"b": value}}, None), or ({}, problem)."""
    key, sep, raw = item.partition("=")
    key = key.strip()
    parts = key.split(".")
    if not sep or not all(parts):
        return {}, f"{CLI_SOURCE}: {item!r}: an override must look like section.key=value, e.g. train.max_steps=30"
    try:
        value = yaml.safe_load(raw) if raw.strip() else None
    except yaml.YAMLError as exc:
        return {}, f"{CLI_SOURCE}: {key}: cannot parse the value {raw!r} ({getattr(exc, 'problem', None) or exc})"
    if len(parts) == 2 and parts[0] in section_names():
        base, _ = field_types(parts[0]).get(parts[1], (None, False))
        if base is str and value is not None and not isinstance(value, str):
            value = raw.strip()  # run.name=350m or run.name=yes stay strings
    for part in reversed(parts):
        value = {part: value}
    return value, None


def _build(tree: dict, sources: _Sources, problems: list[str]) -> tuple[Config, set[str]]:
    """A Config from a merged tree; type and unknown-key problems are appended to `problems`.
    Returns the config and the dotted keys that were not set because of a problem."""
    cfg = Config()
    bad: set[str] = set()
    for name, section_tree in tree.items():
        src = sources[name]
        if name not in section_names():
            problems.append(f"{src}: {name}: {suggest(name, None)}")
            continue
        if section_tree is None:
            continue
        if not isinstance(section_tree, dict):
            problems.append(f"{src}: {name}: expected a mapping of {name} keys, got {show(section_tree)}")
            bad.update(f"{name}.{k}" for k in field_types(name))
            continue
        types = field_types(name)
        section = getattr(cfg, name)
        for key, value in section_tree.items():
            dotted = f"{name}.{key}"
            src = sources[dotted]
            if key not in types:
                problems.append(f"{src}: {dotted}: {suggest(str(key), name)}")
                continue
            converted, problem = coerce(value, *types[key])
            if problem:
                problems.append(f"{src}: {dotted}: {problem}")
                bad.add(dotted)
            else:
                setattr(section, key, converted)
    return cfg, bad


def _finish(tree: dict, sources: _Sources, problems: list[str]) -> Config:
    """The validated Config of a merged tree (model.vocab_size "auto" resolved, its source
    annotated with how); raises ConfigError listing every problem."""
    cfg, bad = _build(tree, sources, problems)
    if "model.vocab_size" not in bad:
        src = sources.get("model.vocab_size", DEFAULT_SOURCE)
        note, problem = resolve_vocab_size(cfg)
        if problem:
            problems.append(f"{src}: model.vocab_size: {problem}")
            bad.add("model.vocab_size")
        elif note:
            sources["model.vocab_size"] = f"{src} ({note})"
    problems.extend(check_values(cfg, sources, bad))
    if problems:
        raise ConfigError(problems)
    return cfg


def load_config(path: str | Path | None, overrides: Sequence[str] = ()) -> Config:
    """The validated Config: schema defaults, then the YAML file at `path` (with its bases),
    then the `key=value` overrides in order. Raises ConfigError listing every problem."""
    return load_config_with_sources(path, overrides)[0]


def load_config_with_sources(path: str | Path | None, overrides: Sequence[str] = ()) -> tuple[Config, dict[str, str]]:
    """load_config, and where each value came from: dotted key -> "defaults", the file that set it,
    or "command line" (model.vocab_size "auto" also says how it was resolved)."""
    tree: dict = {}
    sources: _Sources = {}
    if path is not None:
        tree, sources = _load_file(Path(path))
    problems: list[str] = []
    for item in overrides:
        override, problem = _parse_override(item)
        if problem:
            problems.append(problem)
            continue
        _merge(tree, override)
        sources.update(_sources_of(override, CLI_SOURCE))
    cfg = _finish(tree, sources, problems)
    leaves = {f"{section}.{key}" for section, values in config_to_dict(cfg).items() for key in values}
    return cfg, {key: sources.get(key, DEFAULT_SOURCE) for key in sorted(leaves)}


def config_from_dict(d: dict, source: str) -> Config:
    """A validated Config from a nested dict (such as a checkpoint's embedded config); missing
    keys keep their defaults. Problems name `source`."""
    if not isinstance(d, dict):
        raise ConfigError([f"{source}: expected a mapping of sections ({', '.join(section_names())}), got {show(d)}"])
    tree = {str(k): v for k, v in d.items()}
    return _finish(copy.deepcopy(tree), _sources_of(tree, source), [])


def config_to_dict(cfg: Config) -> dict:
    """The config as a nested dict of plain values (sections -> keys -> values)."""
    return dataclasses.asdict(cfg)


def save_config(cfg: Config, path: str | Path) -> None:
    """Write the resolved config as YAML that load_config reads back to an equal Config."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    text = "# Resolved sessa_scale config (defaults, files and overrides applied).\n"
    tmp.write_text(text + yaml.safe_dump(config_to_dict(cfg), sort_keys=False), encoding="utf-8")
    os.replace(tmp, path)
