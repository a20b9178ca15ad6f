"""The checks both policy configurations (configuration_vla.VLAConfig, configuration_oft.OFTConfig)
make alike: positive int fields, config.json's dict, a preset name, dict or config to a config.

Knows no architecture: both configuration modules build on it, neither imports the other.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable, Iterable, Mapping, TypeVar

C = TypeVar("C")


def _a(word: str) -> str:
    return f"an {word}" if word[:1].upper() in "AEIOU" else f"a {word}"


def check_positive_ints(config: Any, names: Iterable[str]) -> None:
    """ValueError naming the first of `names` that is not an int > 0 (a bool is not an int here)."""
    for name in names:
        value = getattr(config, name)
        if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
            raise ValueError(f"{type(config).__name__}.{name} must be a positive int, got {value!r}")


def check_config_dict(cls: type, data: Any) -> None:
    """ValueError unless `data` (config.json's "config") is a dict of `cls`'s dataclass fields."""
    if not isinstance(data, dict):
        raise ValueError(f"{_a(cls.__name__)} must be read from a JSON object, got {type(data).__name__}")
    unknown = sorted(set(data) - {f.name for f in dataclasses.fields(cls)})
    if unknown:
        raise ValueError(f"unknown {cls.__name__} fields: {unknown}")


def resolve_config(name_or_config: Any, cls: type[C], presets: Mapping[str, Callable[[], C]], kind: str) -> C:
    """A `cls` from a preset name, a dict (config.json's "config", through cls.from_dict) or a
    `cls`; ValueError names `kind` ("policy config", "OFT config") and the known presets."""
    if isinstance(name_or_config, cls):
        return name_or_config
    if isinstance(name_or_config, dict):
        return cls.from_dict(name_or_config)
    if isinstance(name_or_config, str):
        if name_or_config not in presets:
            raise ValueError(f"unknown {kind} {name_or_config!r}; known: {sorted(presets)}")
        return presets[name_or_config]()
    raise ValueError(f"{_a(kind)} is a preset name, dict or {cls.__name__}, got {type(name_or_config).__name__}")
