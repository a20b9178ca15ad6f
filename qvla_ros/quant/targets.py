"""Which Linear layers of a policy QVLA quantizes.

By default every nn.Linear except the action head and the projectors (image and proprio), which
stay 16-bit as in QVLA: they are small, and the head maps straight onto the actions.
"""
from __future__ import annotations

import re
from dataclasses import dataclass

from torch import nn

DEFAULT_EXCLUDE = (r"(^|\.)action_head\.", r"(^|\.)projector\.", r"(^|\.)proprio_projector\.")


@dataclass(frozen=True)
class QuantTargets:
    """Regular expressions over dotted module names (re.search).

    Args:
        include: a Linear is a candidate when it matches any of these.
        exclude: ... and none of these.
    """
    include: tuple[str, ...] = (r".",)
    exclude: tuple[str, ...] = DEFAULT_EXCLUDE

    def __post_init__(self) -> None:
        for pattern in (*self.include, *self.exclude):
            try:
                re.compile(pattern)
            except re.error as exc:
                raise ValueError(f"bad module-name pattern {pattern!r}: {exc}") from None

    def matches(self, name: str) -> bool:
        return (any(re.search(p, name) for p in self.include)
                and not any(re.search(p, name) for p in self.exclude))


def quantizable_linears(model: nn.Module, targets: QuantTargets | None = None) -> dict[str, nn.Linear]:
    """{dotted name: nn.Linear} of the layers to quantize, in the model's module order."""
    targets = targets or QuantTargets()
    found = {name: m for name, m in model.named_modules()
             if type(m) is nn.Linear and targets.matches(name)}
    if not found:
        raise ValueError("no Linear layer of the model matches the quantization targets "
                         f"(include={list(targets.include)}, exclude={list(targets.exclude)})")
    return found
