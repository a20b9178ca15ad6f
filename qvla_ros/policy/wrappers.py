"""Policy wrappers for experiments that change what the policy is told, not what it is.

`InstructionSwap` replaces instructions before they reach the policy: the language test of the
suite runs a task's scene while telling the policy to do the other task of the same scene.
"""
from __future__ import annotations

from typing import Callable, Mapping, Sequence

import torch


class InstructionSwap:
    """Calls `policy` with `mapping[text]` in place of each instruction text it knows.

    Keeps the policy contract (same inputs, same outputs, `.config`), and the split into
    preprocessing and forward that GraphedForward captures (prepare_inputs swaps the texts).
    """

    def __init__(self, policy, mapping: Mapping[str, str]):
        self.policy = policy
        self.mapping = dict(mapping)
        self.config = policy.config

    def __call__(self, images: torch.Tensor, instruction: Sequence[str], proprio: torch.Tensor) -> torch.Tensor:
        return self.policy(images, self._swap(instruction), proprio)

    def _swap(self, instruction: Sequence[str]) -> list[str]:
        if isinstance(instruction, str):  # let the policy refuse it with its own message
            return instruction
        return [self.mapping.get(t, t) for t in instruction]

    # The split GraphedForward captures; each is missing (AttributeError) when the policy lacks it.
    @property
    def prepare_inputs(self):
        prepare = self.policy.prepare_inputs
        return lambda images, instruction, proprio: prepare(images, self._swap(instruction), proprio)

    @property
    def predict_normalized(self):
        return self.policy.predict_normalized

    @property
    def unnormalize_actions(self):
        return self.policy.unnormalize_actions

    def eval(self) -> "InstructionSwap":
        self.policy.eval()
        return self

    def to(self, device) -> "InstructionSwap":
        self.policy = self.policy.to(device)
        return self


class InstructionSwapFactory:
    """Picklable factory (for evaluation workers): builds `base_factory()` wrapped in InstructionSwap."""

    def __init__(self, base_factory: Callable, mapping: Mapping[str, str]):
        if not callable(base_factory):
            raise ValueError("base_factory must be a zero-argument callable building a policy")
        self.base_factory = base_factory
        self.mapping = dict(mapping)

    def __call__(self) -> InstructionSwap:
        return InstructionSwap(self.base_factory(), self.mapping)

    def describe(self) -> dict:
        base = getattr(self.base_factory, "describe", lambda: {"factory": repr(self.base_factory)})()
        return {"kind": "instruction-swap", "base": base, "mapping": self.mapping}
