"""Pipeline configuration: YAML files in `config/`, merged over the defaults, with dotted overrides."""

from __future__ import annotations

import copy
import os
from pathlib import Path
from typing import Any

import yaml

DEFAULT_CONFIG = Path(__file__).resolve().parent.parent / "config" / "default.yaml"


class ConfigError(ValueError):
    """A configuration file or override is invalid."""


def parse_config(text: str, overrides: dict[str, Any] | None = None) -> dict[str, Any]:
    """Parse YAML text and apply `{"a.b": value}` overrides (None values are ignored)."""
    try:
        config = yaml.safe_load(text) or {}
    except yaml.YAMLError as error:
        raise ConfigError(f"invalid YAML configuration: {error}") from error
    if not isinstance(config, dict):
        raise ConfigError("a configuration must be a mapping at the top level")
    config = copy.deepcopy(config)
    for dotted, value in (overrides or {}).items():
        if value is None:
            continue
        node = config
        *parents, leaf = dotted.split(".")
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = value
    return config


def load_config(path: str | Path | None = None, overrides: dict[str, Any] | None = None) -> dict[str, Any]:
    """Read a config file (default: `config/default.yaml`) and apply overrides."""
    path = Path(path or DEFAULT_CONFIG)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as error:
        raise ConfigError(f"cannot read configuration {path}: {error}") from error
    return parse_config(text, overrides)


def cxr_home() -> Path:
    """Root of local state: `$CXR_HOME`, default `~/.cxr`."""
    return Path(os.environ.get("CXR_HOME", Path.home() / ".cxr")).expanduser()
