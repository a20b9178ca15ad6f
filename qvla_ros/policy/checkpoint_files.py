"""The project's policy checkpoint folder, for every architecture: its file names, the one
writer, the header checks, and the error that names what is wrong.

    write_checkpoint(dir, fmt, version, config, tokenizer_json, state)   weights, tokenizer, config
    stored_tensor_specs(dir / WEIGHTS_FILE)                              names, shapes, dtypes; no data
    check_tensor_names(path, expected, stored, "config.json")           CheckpointError on a mismatch
    read_config_and_tokenizer(dir, meta, version, from_dict, from_str)  config.json's config, tokenizer.json

Knows no architecture: modeling_vla.py (which reads a folder of either architecture) and
modeling_oft.py both build on it, so neither imports the other to reach these.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Callable, Iterable

import torch

from ..io import atomic_write, atomic_write_text

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
TOKENIZER_FILE = "tokenizer.json"


class CheckpointError(ValueError):
    """A policy checkpoint is missing, corrupt, or does not match its configuration."""


def write_checkpoint(directory: str | os.PathLike, fmt: str, version: int, config: dict, tokenizer_json: str,
                     state: dict[str, torch.Tensor], provenance: dict | None = None) -> Path:
    """The one writer of the project's checkpoint folder, for every architecture: model.safetensors,
    tokenizer.json, config.json ({format, version, config[, provenance]}), each atomically.
    Weights first, config last: a folder whose write was cut short has no config.json that
    describes weights it lacks. `state`: the model's state dict, on the CPU."""
    from safetensors.torch import save_file

    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    meta = {"format": fmt, "version": version, "config": config}
    if provenance:
        meta["provenance"] = provenance
    atomic_write(out / WEIGHTS_FILE, lambda p: save_file(state, p, metadata={"format": fmt, "version": str(version)}))
    atomic_write_text(out / TOKENIZER_FILE, tokenizer_json)
    atomic_write_text(out / CONFIG_FILE, json.dumps(meta, indent=2) + "\n")
    return out


def stored_tensor_specs(path: Path) -> dict[str, tuple[tuple[int, ...], str]]:
    """{name: (shape, safetensors dtype)} from a safetensors file's header; no tensor data is
    read. CheckpointError if the file is not a readable safetensors file."""
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            stored = {}
            for key in f.keys():
                tensor = f.get_slice(key)
                stored[key] = (tuple(tensor.get_shape()), tensor.get_dtype())
    except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
        raise CheckpointError(f"{path} is corrupt: {exc}") from None
    return stored


def check_tensor_names(path: Path, expected: Iterable[str], stored: Iterable[str], sources: str) -> None:
    """Raise CheckpointError unless the file at `path` stores exactly the tensors named `expected`
    (those the files named by `sources` imply), listing the first few missing and unexpected."""
    expected, stored = set(expected), set(stored)
    missing, unexpected = sorted(expected - stored), sorted(stored - expected)
    if missing or unexpected:
        raise CheckpointError(f"{path} does not match {sources}: "
                              f"missing {missing[:5]}{'...' if len(missing) > 5 else ''}, "
                              f"unexpected {unexpected[:5]}{'...' if len(unexpected) > 5 else ''}")


def read_config_and_tokenizer(directory: Path, meta: dict, version: int, config_from_dict: Callable[[Any], Any],
                              tokenizer_from_str: Callable[[str, Any], Any],
                              tokenizer_errors: tuple[type[BaseException], ...] = (ValueError, UnicodeDecodeError)
                              ) -> tuple[Any, Any]:
    """(config, tokenizer) of a checkpoint folder whose config.json (already read as `meta`, its
    format checked) must have `version`: `config_from_dict(meta["config"])`, then
    `tokenizer_from_str(tokenizer.json's text, config)`. CheckpointError names the file and the
    problem: another version, a config from_dict refuses (ValueError, TypeError), a tokenizer
    that raises one of `tokenizer_errors`."""
    if meta.get("version") != version:
        raise CheckpointError(f"{directory / CONFIG_FILE} has version {meta.get('version')!r}; "
                              f"this library reads version {version}")
    try:
        config = config_from_dict(meta.get("config"))
    except (ValueError, TypeError) as exc:
        raise CheckpointError(f"{directory / CONFIG_FILE}: {exc}") from None
    try:
        tokenizer = tokenizer_from_str((directory / TOKENIZER_FILE).read_text(), config)
    except tokenizer_errors as exc:
        raise CheckpointError(f"{directory / TOKENIZER_FILE}: {exc}") from None
    return config, tokenizer


class default_dtype:
    """Context: tensors created without a dtype get `dtype` (so big models are born in bf16)."""

    def __init__(self, dtype: torch.dtype | None):
        self.dtype = dtype

    def __enter__(self):
        self.saved = torch.get_default_dtype()
        if self.dtype is not None:
            torch.set_default_dtype(self.dtype)

    def __exit__(self, *exc):
        torch.set_default_dtype(self.saved)
