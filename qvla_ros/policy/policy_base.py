"""What both policy architectures (modeling_vla.VLAPolicy, modeling_oft.OFTPolicy) share: the
contract's outer steps and the seeded build.

    forward = unnormalize_actions(predict_normalized(*prepare_inputs(images, instruction, proprio)))

A subclass defines STAT_NAMES (its normalization buffers), `images_to_pixels`,
`normalize_proprio`, `predict_normalized`, `unnormalize_actions`, `device`, and has `config`
(n_cams, proprio_dim, max_text_tokens) and `tokenizer` (`encode`).

Knows no architecture: both modeling modules build on it, so neither imports the other for it.
"""
from __future__ import annotations

from typing import Callable, Sequence, TypeVar

import numpy as np
import torch
from torch import nn

from .checkpoint_files import default_dtype
from .processing_vla import check_raw_inputs

M = TypeVar("M", bound=nn.Module)


class ChunkPolicy(nn.Module):
    """`actions = policy(images, instruction, proprio)`: the package's policy contract."""

    #: the normalization buffers set_norm_stats fills
    STAT_NAMES: tuple[str, ...] = ()
    #: the dtype a statistic is read as before it is copied into its buffer; None: the buffer's own
    STAT_READ_DTYPE: torch.dtype | None = None

    # Statistics ---------------------------------------------------------------------------------
    def set_norm_stats(self, stats: dict[str, np.ndarray | torch.Tensor]) -> None:
        """stats: STAT_NAMES -> arrays of the buffers' shapes."""
        missing = [n for n in self.STAT_NAMES if n not in stats]
        if missing:
            raise ValueError(f"normalization stats lack {missing}")
        for name in self.STAT_NAMES:
            buf = getattr(self, name)
            dtype = self.STAT_READ_DTYPE if self.STAT_READ_DTYPE is not None else buf.dtype
            value = torch.as_tensor(np.asarray(stats[name]), dtype=dtype)
            if value.shape != buf.shape:
                raise ValueError(f"stat {name} has shape {tuple(value.shape)}, expected {tuple(buf.shape)}")
            buf.copy_(value)

    # Forward ------------------------------------------------------------------------------------
    def prepare_inputs(self, images: torch.Tensor, instruction: Sequence[str], proprio: torch.Tensor
                       ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """Checks the contract's raw inputs; returns (pixels, token_ids, text_mask, proprio_norm)."""
        cfg = self.config
        check_raw_inputs(images, instruction, proprio, cfg.n_cams, cfg.proprio_dim)
        dev = self.device
        ids, text_mask = self.tokenizer.encode(instruction, cfg.max_text_tokens)
        return (self.images_to_pixels(images.to(dev)), ids.to(dev), text_mask.to(dev),
                self.normalize_proprio(proprio.to(dev)))

    def forward(self, images: torch.Tensor, instruction: Sequence[str], proprio: torch.Tensor) -> torch.Tensor:
        """Action chunk float32 [B, horizon, action_dim] in the environment's (dataset's) units.

        images uint8 [B, n_cams, H, W, 3] RGB (OFT: third-person first, then wrist); instruction:
        B task strings (OFT builds its prompt from them); proprio float [B, proprio_dim], raw.
        """
        return self.unnormalize_actions(self.predict_normalized(*self.prepare_inputs(images, instruction, proprio)))

    # Checkpoints --------------------------------------------------------------------------------
    def cpu_state(self) -> dict[str, torch.Tensor]:
        """The state dict as save_pretrained writes it: detached, contiguous, on the CPU."""
        return {k: v.detach().contiguous().cpu() for k, v in self.state_dict().items()}

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())


def build_seeded(build: Callable[[], M], seed: int, device: str | torch.device, dtype: torch.dtype | None) -> M:
    """`build()` with the random generators seeded (and restored after), its tensors created
    directly on `device` in `dtype` (no CPU copy first)."""
    device = torch.device(device)
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(seed)
        with torch.device(device), default_dtype(dtype):
            return build()
