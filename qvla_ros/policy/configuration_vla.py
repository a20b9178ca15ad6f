"""Configuration of the VLA policy: the OpenVLA-OFT recipe at any size.

A configuration is plain data (dataclasses of ints, floats and strings) so that it round-trips
through config.json exactly and names the model's size. `PRESETS` holds the named sizes:

- ``micro``: the smallest working model, for unit tests (a forward takes a few milliseconds);
- ``tiny``: the shipped, trained policy (every checkpoint file <= 16 MiB, a forward in tens of
  milliseconds on two CPU cores).

The 7B model is the published OpenVLA-OFT architecture, `oft-7b` in configuration_oft.py; this
recipe only serves the small trained policies.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from .config_checks import check_config_dict, check_positive_ints, resolve_config

CONFIG_FORMAT = "qvla-vla-policy"
CONFIG_VERSION = 1

PREFIX_ATTENTION_MODES = ("causal", "full")


@dataclass(frozen=True)
class VisionEncoderConfig:
    """One ViT patch encoder (SigLIP-style transformer blocks from `transformers`).

    Args:
        hidden_size: width of the encoder's tokens.
        num_layers: number of transformer blocks.
        num_heads: attention heads; must divide hidden_size.
        intermediate_size: width of each block's MLP.
        patch_size: side of the square patches, in pixels; must divide the policy's image_size.
    """

    hidden_size: int = 128
    num_layers: int = 4
    num_heads: int = 4
    intermediate_size: int = 512
    patch_size: int = 16

    def __post_init__(self) -> None:
        for name in ("hidden_size", "num_layers", "num_heads", "intermediate_size", "patch_size"):
            value = getattr(self, name)
            if not isinstance(value, int) or value <= 0:
                raise ValueError(f"VisionEncoderConfig.{name} must be a positive int, got {value!r}")
        if self.hidden_size % self.num_heads:
            raise ValueError(f"VisionEncoderConfig.hidden_size ({self.hidden_size}) must be a multiple "
                             f"of num_heads ({self.num_heads})")


@dataclass(frozen=True)
class VLAConfig:
    """Shape and behaviour of a VLA policy.

    Inputs (the policy contract):
        n_cams: cameras per observation; every camera goes through the same vision encoder(s).
        image_size: side of the square image the encoders see, in pixels; camera frames of another
            size are resized to it inside the policy.
        proprio_dim: length of the proprioceptive state vector (MetaWorld: xyz + gripper = 4).
        action_dim: length of one action (MetaWorld: 4).
        horizon: actions per chunk; one forward pass returns all of them.

    Vision:
        vision: one or more patch encoders run side by side on each image; their patch features
            are concatenated channel-wise (OpenVLA fuses SigLIP and DINOv2 this way). All must use
            the same patch_size.
        projector_hidden: width of the MLP projector from fused patch features to the decoder
            width; 0 means a single Linear.

    Decoder (a `transformers` LlamaModel):
        hidden_size, num_layers, num_heads, num_kv_heads, intermediate_size: Llama shapes.
        vocab_size: rows of the token embedding; must be at least the tokenizer's vocabulary.
        max_text_tokens: instructions are padded/truncated to this many tokens.
        rope_theta: RoPE base.
        prefix_attention: "causal" (OpenVLA-OFT: the prefix [patches, text, proprio] is causal)
            or "full" (the prefix attends both ways, so image tokens can read the instruction).
            Action slots always attend to everything, themselves included, both ways.
        attn_implementation: "sdpa" or "eager" (the `transformers` attention interface).

    Actions:
        slots_per_step: empty action-slot tokens per chunk step (1: one token per step; OpenVLA-OFT
            uses action_dim, one token per action dimension). The head reads the concatenated
            hidden states of a step's slots.
        head_hidden: width of the action head MLP.
        head_layers: hidden layers in the action head MLP (>= 1).
    """

    n_cams: int = 2
    image_size: int = 128
    proprio_dim: int = 4
    action_dim: int = 4
    horizon: int = 8
    vision: tuple[VisionEncoderConfig, ...] = (VisionEncoderConfig(),)
    projector_hidden: int = 256
    hidden_size: int = 256
    num_layers: int = 4
    num_heads: int = 4
    num_kv_heads: int = 4
    intermediate_size: int = 512
    vocab_size: int = 512
    max_text_tokens: int = 16
    rope_theta: float = 10000.0
    prefix_attention: str = "full"
    attn_implementation: str = "sdpa"
    slots_per_step: int = 1
    head_hidden: int = 256
    head_layers: int = 2
    name: str = field(default="custom", compare=False)

    def __post_init__(self) -> None:
        # Nested configs arrive as dicts from config.json; accept them here so from_dict stays thin.
        vision = tuple(v if isinstance(v, VisionEncoderConfig) else VisionEncoderConfig(**v)
                       for v in self.vision)
        object.__setattr__(self, "vision", vision)
        positive = ("n_cams", "image_size", "proprio_dim", "action_dim", "horizon", "hidden_size",
                    "num_layers", "num_heads", "num_kv_heads", "intermediate_size", "vocab_size",
                    "max_text_tokens", "slots_per_step", "head_hidden", "head_layers")
        check_positive_ints(self, positive)
        if not isinstance(self.projector_hidden, int) or self.projector_hidden < 0:
            raise ValueError(f"VLAConfig.projector_hidden must be an int >= 0, got {self.projector_hidden!r}")
        if not vision:
            raise ValueError("VLAConfig.vision must name at least one vision encoder")
        patch_sizes = {v.patch_size for v in vision}
        if len(patch_sizes) != 1:
            raise ValueError(f"VLAConfig.vision encoders must share one patch_size, got {sorted(patch_sizes)}")
        if self.image_size % vision[0].patch_size:
            raise ValueError(f"VLAConfig.image_size ({self.image_size}) must be a multiple of the "
                             f"patch_size ({vision[0].patch_size})")
        if self.hidden_size % self.num_heads:
            raise ValueError(f"VLAConfig.hidden_size ({self.hidden_size}) must be a multiple of "
                             f"num_heads ({self.num_heads})")
        if self.num_heads % self.num_kv_heads:
            raise ValueError(f"VLAConfig.num_heads ({self.num_heads}) must be a multiple of "
                             f"num_kv_heads ({self.num_kv_heads})")
        if (self.hidden_size // self.num_heads) % 2:
            raise ValueError("VLAConfig.hidden_size / num_heads must be even (rotary embeddings)")
        if self.prefix_attention not in PREFIX_ATTENTION_MODES:
            raise ValueError(f"VLAConfig.prefix_attention must be one of {PREFIX_ATTENTION_MODES}, "
                             f"got {self.prefix_attention!r}")
        if self.attn_implementation not in ("sdpa", "eager"):
            raise ValueError(f"VLAConfig.attn_implementation must be 'sdpa' or 'eager', "
                             f"got {self.attn_implementation!r}")
        if self.rope_theta <= 0:
            raise ValueError(f"VLAConfig.rope_theta must be > 0, got {self.rope_theta!r}")

    # Token layout -------------------------------------------------------------------------------
    @property
    def patches_per_image(self) -> int:
        return (self.image_size // self.vision[0].patch_size) ** 2

    @property
    def vision_width(self) -> int:
        """Channels of the fused patch features (sum over the encoders)."""
        return sum(v.hidden_size for v in self.vision)

    @property
    def num_action_slots(self) -> int:
        return self.horizon * self.slots_per_step

    @property
    def sequence_length(self) -> int:
        """Decoder tokens per sample: patches of every camera, text, proprio, action slots."""
        return self.n_cams * self.patches_per_image + self.max_text_tokens + 1 + self.num_action_slots

    # Serialization ------------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        data["vision"] = [dataclasses.asdict(v) for v in self.vision]
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "VLAConfig":
        check_config_dict(cls, data)
        data = dict(data)
        if "vision" in data:
            if not isinstance(data["vision"], (list, tuple)):
                raise ValueError("VLAConfig.vision must be a list of encoder configs")
            try:
                data["vision"] = tuple(VisionEncoderConfig(**v) if isinstance(v, dict) else v
                                       for v in data["vision"])
            except TypeError as exc:
                raise ValueError(f"bad VisionEncoderConfig in VLAConfig.vision: {exc}") from None
        return cls(**data)

    def replace(self, **changes: Any) -> "VLAConfig":
        return dataclasses.replace(self, **changes)


def _micro() -> VLAConfig:
    return VLAConfig(
        name="micro", n_cams=2, image_size=32, horizon=4,
        vision=(VisionEncoderConfig(hidden_size=32, num_layers=1, num_heads=2, intermediate_size=64,
                                    patch_size=8),),
        projector_hidden=64, hidden_size=64, num_layers=2, num_heads=4, num_kv_heads=2,
        intermediate_size=128, vocab_size=128, max_text_tokens=12, head_hidden=64,
    )


def _tiny() -> VLAConfig:
    # ~3.9 M parameters: 14.8 MiB in float32, so the checkpoint stays under 16 MiB per file.
    return VLAConfig(
        name="tiny", n_cams=2, image_size=128, horizon=8,
        vision=(VisionEncoderConfig(hidden_size=128, num_layers=4, num_heads=4, intermediate_size=512,
                                    patch_size=16),),
        projector_hidden=256, hidden_size=256, num_layers=4, num_heads=4, num_kv_heads=4,
        intermediate_size=512, vocab_size=256, max_text_tokens=16, head_hidden=256,
        prefix_attention="full",
    )


PRESETS = {"micro": _micro, "tiny": _tiny}


def get_config(name_or_config: str | VLAConfig | dict) -> VLAConfig:
    """A VLAConfig from a preset name, a dict (config.json's "config") or a VLAConfig."""
    return resolve_config(name_or_config, VLAConfig, PRESETS, "policy config")
