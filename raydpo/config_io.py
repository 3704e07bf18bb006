"""Reading and writing the config tree (`raydpo.config`): YAML with the YAML error's line
and column, dotted command-line overrides (``trainer.lr=1e-5``) checked key by key, a "did
you mean ..." for an unknown key, one ``ConfigError`` naming every bad key with its source,
the saved ``<run_dir>/config.yaml`` of a run, and ``raydpo config show``'s listing."""

from __future__ import annotations

import difflib
import os
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ValidationError

from raydpo.config import RENAMED, RunConfig
from raydpo.errors import ConfigError


def _suggest(key: str, model: type[BaseModel], prefix: tuple[str, ...] = ()) -> str:
    close = difflib.get_close_matches(key, list(model.model_fields), n=1, cutoff=0.5)
    return f" (did you mean '{'.'.join(prefix + (close[0],))}'?)" if close else ""


def _model_at(root: type[BaseModel], path: tuple[str, ...]) -> type[BaseModel] | None:
    """The section model that owns the key at `path` (path excludes the key)."""
    model = root
    for part in path:
        field = model.model_fields.get(part)
        ann = field.annotation if field else None
        if not (isinstance(ann, type) and issubclass(ann, BaseModel)):
            return None
        model = ann
    return model


def _explain(err: ValidationError, root: type[BaseModel], source: str) -> ConfigError:
    lines = []
    for e in err.errors():
        loc = tuple(str(p) for p in e["loc"])
        key = ".".join(loc) or "<root>"
        if e["type"] == "extra_forbidden" and key in RENAMED:
            lines.append(f"  {key}: renamed to {RENAMED[key]}; use that key")
        elif e["type"] == "extra_forbidden":
            owner = _model_at(root, loc[:-1])
            hint = _suggest(loc[-1], owner, loc[:-1]) if owner else ""
            lines.append(f"  {key}: unknown key{hint}")
        elif e["type"] == "missing":
            lines.append(f"  {key}: required value is missing")
        elif e["type"] == "value_error":  # a cross-field check: its message names the keys
            lines.append(f"  {key}: {e['msg'].removeprefix('Value error, ')}")
        else:
            lines.append(f"  {key}: {e['msg']} (got {e.get('input')!r})")
    return ConfigError(f"invalid config ({source}):\n" + "\n".join(lines))


def _read_yaml(path: str | os.PathLike) -> dict[str, Any]:
    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError as e:
        raise ConfigError(f"cannot read config file {path}: {e.strerror}") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f"{path}:{mark.line + 1}:{mark.column + 1}" if mark else str(path)
        problem = getattr(e, "problem", None) or str(e)
        raise ConfigError(f"bad YAML at {where}: {problem}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: top level must be a mapping of sections, got {type(data).__name__}")
    return data


def apply_override(data: dict[str, Any], override: str, root: type[BaseModel] = RunConfig) -> None:
    """Apply one ``a.b.c=value`` override to the nested dict `data` in place.

    The value is parsed as YAML (so ``true``, ``3``, ``[a, b]`` and ``null``
    work); pydantic then coerces it to the field's type. Each key along the
    path is checked against the schema here, so a typo names itself.
    """
    if "=" not in override:
        raise ConfigError(f"override {override!r} must look like section.key=value")
    dotted, raw = override.split("=", 1)
    parts = dotted.strip().split(".")
    if not all(parts):
        raise ConfigError(f"override {override!r}: empty key in {dotted!r}")
    model: type[BaseModel] | None = root
    node = data
    if dotted.strip() in RENAMED:
        raise ConfigError(f"override {override!r}: {dotted.strip()} was renamed to {RENAMED[dotted.strip()]}")
    for i, part in enumerate(parts):
        here = ".".join(parts[: i + 1])
        if model is None:
            raise ConfigError(f"override {override!r}: {'.'.join(parts[:i])} is a value, not a section")
        if part not in model.model_fields:
            raise ConfigError(f"override {override!r}: unknown key {here}{_suggest(part, model, tuple(parts[:i]))}")
        if i == len(parts) - 1:
            try:
                node[part] = yaml.safe_load(raw) if raw.strip() else ""
            except yaml.YAMLError:
                node[part] = raw  # not YAML: keep the string and let the type check judge it
            return
        model = _model_at(model, (part,))
        child = node.get(part)
        if child is None:
            child = node[part] = {}
        if not isinstance(child, dict):
            raise ConfigError(f"override {override!r}: {here} is not a section in the loaded config")
        node = child


def load_config(
    path: str | os.PathLike | None = None,
    overrides: list[str] | tuple[str, ...] = (),
    root: type[BaseModel] = RunConfig,
) -> Any:
    """Load YAML at `path` (or defaults), apply dotted `overrides`, validate."""
    data = _read_yaml(path) if path is not None else {}
    for ov in overrides:
        apply_override(data, ov, root)
    source = f"{path}" if path is not None else "defaults"
    if overrides:
        source += " + overrides " + " ".join(overrides)
    try:
        return root.model_validate(data)
    except ValidationError as e:
        raise _explain(e, root, source) from None


def require(cfg: BaseModel, *keys: str, by: str) -> None:
    """Fail naming each dotted key in `keys` whose value is None; `by` names who needs it."""
    missing = []
    for key in keys:
        node: Any = cfg
        for part in key.split("."):
            node = getattr(node, part)
        if node is None:
            missing.append(key)
    if missing:
        raise ConfigError(
            f"{by} needs a value for: {', '.join(missing)} (set it in the YAML or as key=value)"
        )


def save_config(cfg: BaseModel, run_dir: str | os.PathLike) -> Path:
    """Write the resolved config to ``<run_dir>/config.yaml`` and return the path."""
    from raydpo.files import atomic_write

    return atomic_write(Path(run_dir) / "config.yaml", yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False))


def read_saved_config(run_dir: str | os.PathLike) -> dict[str, Any] | None:
    """A run's saved ``config.yaml``, validated, with today's defaults for keys it predates,
    as a plain dict (None if the run has none)."""
    path = Path(run_dir) / "config.yaml"
    if not path.exists():
        return None
    data = _read_yaml(path)
    for old, new in RENAMED.items():  # a run started before the rename: its keys under today's names
        (sec, key), (_, new_key) = old.split("."), new.split(".")
        section = data.get(sec)
        if isinstance(section, dict) and key in section and new_key not in section:
            section[new_key] = section.pop(key)
    try:
        return RunConfig.model_validate(data).model_dump(mode="json")
    except ValidationError as e:
        raise _explain(e, RunConfig, str(path)) from None


def describe(cfg: BaseModel | None = None, prefix: str = "") -> list[str]:
    """One line per leaf field of `cfg` (default: RunConfig()): key, type, value, meaning."""
    cfg = RunConfig() if cfg is None else cfg
    lines = []
    for name, field in type(cfg).model_fields.items():
        value = getattr(cfg, name)
        key = f"{prefix}{name}"
        if isinstance(value, BaseModel):
            lines.extend(describe(value, key + "."))
        else:
            ann = field.annotation
            tname = getattr(ann, "__name__", None) or str(ann).replace("typing.", "")
            lines.append(f"{key}  [{tname}] = {value!r}  -- {field.description}")
    return lines
