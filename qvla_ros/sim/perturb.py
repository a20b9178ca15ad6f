"""Observation perturbations for robustness evaluation: what a policy sees differs from training,
the scene does not.

    qvla eval --perturb brightness=1.2          every camera image 20% brighter
    qvla eval --perturb shift=2                 every image translated 2 px right and down
    qvla eval --perturb rephrase                each task's instruction replaced by a phrasing the
                                                training never used (HELD_OUT_INSTRUCTIONS)
    qvla eval --perturb brightness=0.8,shift=-2 several at once

The perturbation wraps the policy (`PerturbedPolicy`) inside each rollout worker, so the
environment, the seeds and therefore the episodes stay the same as an unperturbed run's: the two
results pair episode by episode (qvla_ros.sim.paired).
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import torch

__all__ = ["HELD_OUT_INSTRUCTIONS", "Perturbation", "PerturbedPolicy"]

#: One phrasing per task of the language MetaWorld suite, in words its training instructions
#: (language_world.TASK_DESCRIPTIONS) do not use for that task: "drag/shut/tap/swing/lift" against
#: "pull/push/slide/turn". test_sim_perturb checks they differ from the training text.
HELD_OUT_INSTRUCTIONS = {
    "drawer-open": "drag the drawer out",
    "drawer-close": "shut the drawer",
    "window-open": "move the window sash to the open side",
    "window-close": "shut the window",
    "faucet-open": "rotate the tap to the left",
    "faucet-close": "rotate the tap to the right",
    "door-open": "swing the door open",
    "door-close": "shut the door",
    "handle-press": "press the handle down",
    "handle-pull": "lift the handle up",
}


@dataclass(frozen=True)
class Perturbation:
    """brightness: factor on every pixel (clipped to [0, 255]); shift_pixels: translation of every
    image by this many pixels right and down (negative: left and up), edges repeated; rephrase:
    instructions replaced by HELD_OUT_INSTRUCTIONS (an instruction without one is refused)."""

    brightness: float = 1.0
    shift_pixels: int = 0
    rephrase: bool = False

    def __post_init__(self):
        if not (np.isfinite(self.brightness) and self.brightness > 0):
            raise ValueError(f"brightness must be a positive factor, got {self.brightness}")
        if abs(self.shift_pixels) > 32:
            raise ValueError(f"shift must be within +-32 pixels, got {self.shift_pixels}")

    @classmethod
    def parse(cls, text: str | None) -> "Perturbation | None":
        """'brightness=1.2,shift=2,rephrase' -> Perturbation; None or '' -> None."""
        if not text:
            return None
        fields: dict[str, Any] = {}
        for item in (p.strip() for p in text.split(",")):
            if not item:
                continue
            key, _, value = item.partition("=")
            try:
                if key == "brightness" and value:
                    fields["brightness"] = float(value)
                elif key == "shift" and value:
                    fields["shift_pixels"] = int(value)
                elif key == "rephrase" and not value:
                    fields["rephrase"] = True
                else:
                    raise ValueError
            except ValueError:
                raise ValueError(f"bad perturbation {item!r}: use brightness=FACTOR, shift=PIXELS "
                                 f"or rephrase, comma-separated") from None
        return cls(**fields)

    @property
    def is_identity(self) -> bool:
        return self.brightness == 1.0 and self.shift_pixels == 0 and not self.rephrase

    def describe(self) -> dict:
        return asdict(self)

    @property
    def spec(self) -> str:
        """The `parse` text of this perturbation ('brightness=1.2,shift=2'); 'plain' for none."""
        parts = ([f"brightness={self.brightness:g}"] if self.brightness != 1.0 else []) + \
                ([f"shift={self.shift_pixels}"] if self.shift_pixels else []) + \
                (["rephrase"] if self.rephrase else [])
        return ",".join(parts) or "plain"

    def images(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 [B, C, H, W, 3] -> the same, perturbed."""
        out = images
        if self.brightness != 1.0:
            out = (out.float() * self.brightness).round_().clamp_(0, 255).to(torch.uint8)
        s = self.shift_pixels
        if s:
            h, w = out.shape[-3], out.shape[-2]
            # Source row/column of every output pixel: a translation with the edge repeated.
            rows = (torch.arange(h) - s).clamp_(0, h - 1)
            cols = (torch.arange(w) - s).clamp_(0, w - 1)
            out = out.index_select(-3, rows).index_select(-2, cols)
        return out

    def instructions(self, instructions: list[str]) -> list[str]:
        if not self.rephrase:
            return list(instructions)
        by_text = _held_out_by_training_text()
        missing = sorted({t for t in instructions if t not in by_text})
        if missing:
            raise ValueError(f"no held-out phrasing for instruction(s) {missing}")
        return [by_text[t] for t in instructions]


def _held_out_by_training_text() -> dict[str, str]:
    from .suite import resolve_tasks

    return {spec.instruction: HELD_OUT_INSTRUCTIONS[spec.name] for spec in resolve_tasks(None)
            if spec.name in HELD_OUT_INSTRUCTIONS}


class PerturbedPolicy:
    """The policy contract, with the perturbation applied to each observation first. Like
    policy.wrappers.InstructionSwap it keeps the preprocessing split GraphedForward captures
    (prepare_inputs perturbs too, so a graph around this wrapper sees what __call__ sees).
    Everything else (config, bind_envs of the scripted expert, forward_mode, ...) is the wrapped
    policy's."""

    def __init__(self, policy, perturbation: Perturbation):
        self.policy, self.perturbation = policy, perturbation

    def _perturbed(self, images, instruction, proprio):
        p = self.perturbation
        return p.images(images), p.instructions(list(instruction)), proprio

    def __call__(self, images, instruction, proprio):
        return self.policy(*self._perturbed(images, instruction, proprio))

    @property
    def prepare_inputs(self):
        # Missing on the wrapped policy -> AttributeError, as GraphedForward expects of a policy
        # without the split. Without this property __getattr__ would hand out the UNperturbed one.
        prepare = self.policy.prepare_inputs
        return lambda images, instruction, proprio: prepare(*self._perturbed(images, instruction, proprio))

    def __getattr__(self, name):
        return getattr(self.policy, name)
