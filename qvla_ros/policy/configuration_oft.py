"""Configuration of the OpenVLA-OFT policy as published (moojink/openvla-oft, its prismatic code).

The architecture is fixed; a configuration only sets sizes, so that a published checkpoint and a
small test model are the same code. `OFT_PRESETS` holds the named sizes:

- ``oft-micro``: the smallest working model of this architecture, for unit tests (builds and runs
  a forward in well under a second on two CPU cores);
- ``oft-small``: the architecture at a size one H200 trains from scratch on the language MetaWorld
  demonstrations in well under an hour (~54 M parameters, a 12-layer decoder; MetaWorld's inputs:
  two 128 px cameras read at 112 px, proprio 4, chunks of 8 x 4 actions);
- ``oft-smoke``: oft-small's inputs at oft-micro's widths, for CPU smoke runs of oft-small's
  training (seconds);
- ``oft-7b``: the published OpenVLA-OFT on LIBERO: DINOv2 ViT-L/14 with 4 registers +
  SigLIP so400m/14 at 224 px, Llama-2-7B (vocabulary 32064), two images, proprio 8, chunks of
  8 x 7 actions. Random weights when built from the preset; real ones through `qvla import-oft`.

Every field has a meaning in the published model; comments say where it comes from.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from .config_checks import check_config_dict, check_positive_ints, resolve_config

OFT_CONFIG_FORMAT = "qvla-oft-policy"
OFT_CONFIG_VERSION = 1

#: The published prompt (experiments/robot/openvla_utils.py: get_vla_action); `{}` is the lower-cased
#: task instruction.
OFT_PROMPT = "In: What action should the robot take to {}?\nOut:"

#: timm's per-model image normalization (data_cfg) for the two published towers.
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
SIGLIP_MEAN, SIGLIP_STD = (0.5, 0.5, 0.5), (0.5, 0.5, 0.5)


@dataclass(frozen=True)
class ViTTowerConfig:
    """One timm VisionTransformer tower, described by the fields that shape its weights.

    Args:
        timm_id: the timm model id the published config names (recorded, not fetched).
        embed_dim, depth, num_heads: transformer width, blocks, attention heads.
        mlp_hidden: width of each block's MLP (timm: int(embed_dim * mlp_ratio)).
        class_token: a [CLS] prefix token (DINOv2: yes; SigLIP: no).
        reg_tokens: register prefix tokens (DINOv2 "reg4": 4).
        layer_scale: LayerScale after attention and MLP (DINOv2: init 1e-5; stored as
            ls1/ls2.scale_factor, the prismatic rename of timm's `gamma`).
        no_embed_class: position embeddings cover the patches only, prefix tokens are concatenated
            after they are added (timm's no_embed_class; DINOv2 in timm: yes).
        map_head: a MAP attention-pooling head (`attn_pool.*`, SigLIP). It is stored in published
            checkpoints but never run: OFT reads the second-to-last block.
        mean, std: per-channel normalization of this tower's 3 input channels.
    """

    timm_id: str
    embed_dim: int
    depth: int
    num_heads: int
    mlp_hidden: int
    class_token: bool
    reg_tokens: int
    layer_scale: bool
    no_embed_class: bool
    map_head: bool
    mean: tuple[float, float, float]
    std: tuple[float, float, float]

    def __post_init__(self) -> None:
        object.__setattr__(self, "mean", tuple(float(x) for x in self.mean))
        object.__setattr__(self, "std", tuple(float(x) for x in self.std))
        for name in ("embed_dim", "depth", "num_heads", "mlp_hidden"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ValueError(f"ViTTowerConfig.{name} must be a positive int, got {value!r}")
        if self.depth < 2:
            raise ValueError(f"ViTTowerConfig.depth must be >= 2 (OFT reads the second-to-last block), "
                             f"got {self.depth}")
        if self.embed_dim % self.num_heads:
            raise ValueError(f"ViTTowerConfig.embed_dim ({self.embed_dim}) must be a multiple of "
                             f"num_heads ({self.num_heads})")
        if not isinstance(self.reg_tokens, int) or self.reg_tokens < 0:
            raise ValueError(f"ViTTowerConfig.reg_tokens must be an int >= 0, got {self.reg_tokens!r}")
        if len(self.mean) != 3 or len(self.std) != 3 or min(self.std) <= 0:
            raise ValueError("ViTTowerConfig.mean/std must be 3 values each, std > 0")

    @property
    def num_prefix_tokens(self) -> int:
        return int(self.class_token) + self.reg_tokens


def dinov2_tower(embed_dim: int = 1024, depth: int = 24, num_heads: int = 16,
                 mlp_hidden: int = 4096) -> ViTTowerConfig:
    """timm `vit_large_patch14_reg4_dinov2.lvd142m` (the published `featurizer`) at any size."""
    return ViTTowerConfig(timm_id="vit_large_patch14_reg4_dinov2.lvd142m", embed_dim=embed_dim, depth=depth,
                          num_heads=num_heads, mlp_hidden=mlp_hidden, class_token=True, reg_tokens=4,
                          layer_scale=True, no_embed_class=True, map_head=False,
                          mean=IMAGENET_MEAN, std=IMAGENET_STD)


def siglip_tower(embed_dim: int = 1152, depth: int = 27, num_heads: int = 16,
                 mlp_hidden: int = 4304) -> ViTTowerConfig:
    """timm `vit_so400m_patch14_siglip_224` (the published `fused_featurizer`) at any size."""
    return ViTTowerConfig(timm_id="vit_so400m_patch14_siglip_224", embed_dim=embed_dim, depth=depth,
                          num_heads=num_heads, mlp_hidden=mlp_hidden, class_token=False, reg_tokens=0,
                          layer_scale=False, no_embed_class=False, map_head=True,
                          mean=SIGLIP_MEAN, std=SIGLIP_STD)


@dataclass(frozen=True)
class OFTConfig:
    """Sizes of an OpenVLA-OFT policy (L1-regression head, proprio, no FiLM, no diffusion).

    Inputs (the policy contract):
        n_cams: images per observation (LIBERO: third-person + wrist = 2; the published
            `num_images_in_input`).
        image_size, patch_size: the towers' square input side and patch side, in pixels.
        proprio_dim, action_dim, horizon: proprio length, action length, actions per chunk
            (LIBERO: 8, 7, 8; the published PROPRIO_DIM, ACTION_DIM, NUM_ACTIONS_CHUNK).

    Vision: featurizer (DINOv2), fused_featurizer (SigLIP). Each image is fed as 6 channels, the
        first 3 normalized for the featurizer, the last 3 for the fused featurizer.

    Decoder (Llama-2, attention fully bidirectional): hidden_size, num_layers, num_heads,
        num_kv_heads, intermediate_size, vocab_size (rows of the embedding, 32064 published),
        rms_norm_eps, rope_theta.

    Text: bos_id, stop_id (`</s>`, appended after the action placeholders), empty_id (`▁`,
        appended to a prompt that does not end with it, as predict_action does), pad_id;
        max_text_tokens: prompt tokens (BOS included) a batch is padded to; a longer prompt is
        refused rather than cut.

    Head: head_blocks (MLP-ResNet residual blocks, 2 published); head_hidden (its width).
    """

    n_cams: int = 2
    image_size: int = 224
    patch_size: int = 14
    proprio_dim: int = 8
    action_dim: int = 7
    horizon: int = 8
    featurizer: ViTTowerConfig = field(default_factory=dinov2_tower)
    fused_featurizer: ViTTowerConfig = field(default_factory=siglip_tower)
    hidden_size: int = 4096
    num_layers: int = 32
    num_heads: int = 32
    num_kv_heads: int = 32
    intermediate_size: int = 11008
    vocab_size: int = 32064
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    bos_id: int = 1
    stop_id: int = 2
    empty_id: int = 29871
    pad_id: int = 32000
    max_text_tokens: int = 48
    head_blocks: int = 2
    head_hidden: int = 4096
    attn_implementation: str = "sdpa"
    name: str = field(default="custom", compare=False)

    def __post_init__(self) -> None:
        for key in ("featurizer", "fused_featurizer"):
            value = getattr(self, key)
            if isinstance(value, dict):
                try:
                    object.__setattr__(self, key, ViTTowerConfig(**value))
                except TypeError as exc:
                    raise ValueError(f"bad OFTConfig.{key}: {exc}") from None
            elif not isinstance(value, ViTTowerConfig):
                raise ValueError(f"OFTConfig.{key} must be a ViTTowerConfig, got {type(value).__name__}")
        positive = ("n_cams", "image_size", "patch_size", "proprio_dim", "action_dim", "horizon",
                    "hidden_size", "num_layers", "num_heads", "num_kv_heads", "intermediate_size",
                    "vocab_size", "max_text_tokens", "head_blocks", "head_hidden")
        check_positive_ints(self, positive)
        if self.image_size % self.patch_size:
            raise ValueError(f"OFTConfig.image_size ({self.image_size}) must be a multiple of patch_size "
                             f"({self.patch_size})")
        if self.hidden_size % self.num_heads or self.num_heads % self.num_kv_heads:
            raise ValueError(f"OFTConfig: hidden_size ({self.hidden_size}) must be a multiple of num_heads "
                             f"({self.num_heads}), num_heads of num_kv_heads ({self.num_kv_heads})")
        if (self.hidden_size // self.num_heads) % 2:
            raise ValueError("OFTConfig.hidden_size / num_heads must be even (rotary embeddings)")
        for name in ("bos_id", "stop_id", "empty_id", "pad_id"):
            value = getattr(self, name)
            if not isinstance(value, int) or not 0 <= value < self.vocab_size:
                raise ValueError(f"OFTConfig.{name} must be a token id below vocab_size ({self.vocab_size}), "
                                 f"got {value!r}")
        if self.max_text_tokens < 2:
            raise ValueError("OFTConfig.max_text_tokens must be >= 2 (BOS and the empty token)")
        if self.attn_implementation not in ("sdpa", "eager"):
            raise ValueError(f"OFTConfig.attn_implementation must be 'sdpa' or 'eager', "
                             f"got {self.attn_implementation!r}")
        if self.rms_norm_eps <= 0 or self.rope_theta <= 0:
            raise ValueError("OFTConfig.rms_norm_eps and rope_theta must be > 0")

    # Token layout -------------------------------------------------------------------------------
    @property
    def patches_per_image(self) -> int:
        return (self.image_size // self.patch_size) ** 2

    @property
    def vision_width(self) -> int:
        """Channels of the fused patch features (DINOv2 then SigLIP): 2176 published."""
        return self.featurizer.embed_dim + self.fused_featurizer.embed_dim

    @property
    def num_action_tokens(self) -> int:
        """Empty action placeholders: one per action dimension per chunk step (56 published)."""
        return self.horizon * self.action_dim

    @property
    def sequence_length(self) -> int:
        """Decoder tokens: BOS, patches, proprio, the rest of the prompt (padded), placeholders, stop."""
        return 1 + self.n_cams * self.patches_per_image + 1 + (self.max_text_tokens - 1) \
            + self.num_action_tokens + 1

    # Serialization ------------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "OFTConfig":
        check_config_dict(cls, data)
        return cls(**data)

    def replace(self, **changes: Any) -> "OFTConfig":
        return dataclasses.replace(self, **changes)


def _oft_micro() -> OFTConfig:
    # Every published structure at toy width: the published chunk (8 x 7 actions, 56 placeholders),
    # 2 images of 28 px (4 patches of 14 px each), both
    # towers with their prefix tokens, LayerScale and MAP head, a 2-layer Llama with grouped KV.
    # The towers keep the published 16 heads: a checkpoint's shapes do not tell the head count, so
    # the importer takes it from the timm id, and an imported micro checkpoint is this preset.
    return OFTConfig(
        name="oft-micro", n_cams=2, image_size=28, patch_size=14, proprio_dim=8, action_dim=7, horizon=8,
        featurizer=dinov2_tower(embed_dim=32, depth=3, mlp_hidden=64),
        fused_featurizer=siglip_tower(embed_dim=48, depth=3, mlp_hidden=80),
        hidden_size=64, num_layers=2, num_heads=4, num_kv_heads=2, intermediate_size=128,
        vocab_size=192, bos_id=1, stop_id=2, empty_id=3, pad_id=4, max_text_tokens=32,
        head_hidden=64,
    )


#: MetaWorld's inputs (qvla_ros.sim.env: two 128 px cameras, proprio xyz + gripper, 4-d actions),
#: shared by oft-small and its smoke-sized twin so that one demonstration folder trains either.
_METAWORLD_INPUTS = dict(n_cams=2, image_size=112, patch_size=14, proprio_dim=4, action_dim=4, horizon=8)
#: the token ids and rows of the subword tokenizer training builds (processing_oft.train_subword_tokenizer):
#: ids 0-4 are its special tokens, 512 embedding rows hold its vocabulary.
_SUBWORD_TOKENS = dict(vocab_size=512, bos_id=1, stop_id=2, empty_id=3, pad_id=4, max_text_tokens=48)


#: LIBERO's inputs (qvla_ros.sim.libero: third-person + wrist cameras at 224 px, 8 proprio values,
#: 7-d actions in OFT's chunks of 8) at oft-small's 112 px, for the LIBERO twins of the presets.
_LIBERO_INPUTS = dict(_METAWORLD_INPUTS, proprio_dim=8, action_dim=7)


def _oft_small() -> OFTConfig:
    # ~54 M parameters, 14x the VLA `tiny` (3.9 M): 38.5 M in a 12-layer Llama (512 wide, MHA with
    # head dim 64 as Llama-2, the MLP at Llama's 2.75x), 11 M in two 8-block towers of 256 (read at
    # block 7, as OFT reads the second-to-last), the rest in projector, proprio projector and head.
    # 112 px keeps the published 14 px patches at an 8 x 8 grid per camera (the cameras' 128 px
    # frames are resized, as the node resizes any frame): 1 + 2 * 64 + 1 + 47 + 32 + 1 = 210
    # decoder tokens. The towers run 4 heads of 64 rather than the published 16: this preset is
    # trained here, never imported, so nothing needs the timm id's head count.
    return OFTConfig(
        name="oft-small", **_METAWORLD_INPUTS, **_SUBWORD_TOKENS,
        featurizer=dinov2_tower(embed_dim=256, depth=8, num_heads=4, mlp_hidden=1024),
        fused_featurizer=siglip_tower(embed_dim=256, depth=8, num_heads=4, mlp_hidden=1024),
        hidden_size=512, num_layers=12, num_heads=8, num_kv_heads=8, intermediate_size=1408,
        head_hidden=512,
    )


def _oft_smoke() -> OFTConfig:
    # oft-small's inputs, tokens and sequence layout at oft-micro's widths: a CPU run of the
    # whole training path (bench/gpu/train_oft_small.sh with SMOKE=1, the tests) in seconds.
    return OFTConfig(
        name="oft-smoke", **_METAWORLD_INPUTS, **_SUBWORD_TOKENS,
        featurizer=dinov2_tower(embed_dim=32, depth=2, num_heads=2, mlp_hidden=64),
        fused_featurizer=siglip_tower(embed_dim=32, depth=2, num_heads=2, mlp_hidden=64),
        hidden_size=64, num_layers=2, num_heads=4, num_kv_heads=2, intermediate_size=128,
        head_hidden=64,
    )


def _oft_small_libero() -> OFTConfig:
    # oft-small's network on LIBERO's inputs and actions (bench/gpu/train_oft_small.sh SUITE=libero-object).
    return _oft_small().replace(name="oft-small-libero", **_LIBERO_INPUTS)


def _oft_smoke_libero() -> OFTConfig:
    return _oft_smoke().replace(name="oft-smoke-libero", **_LIBERO_INPUTS)


def _oft_7b() -> OFTConfig:
    # The published LIBERO model. 1 + 2 * 256 + 1 + 47 + 56 + 1 = 618 decoder tokens at
    # max_text_tokens 48 (LIBERO's longest prompts are ~40 tokens; OFT itself runs 590-610 unpadded).
    return OFTConfig(name="oft-7b")


OFT_PRESETS = {"oft-micro": _oft_micro, "oft-small": _oft_small, "oft-smoke": _oft_smoke,
               "oft-small-libero": _oft_small_libero, "oft-smoke-libero": _oft_smoke_libero, "oft-7b": _oft_7b}


def get_oft_config(name_or_config: str | OFTConfig | dict) -> OFTConfig:
    """An OFTConfig from a preset name, a dict (config.json's "config") or an OFTConfig."""
    return resolve_config(name_or_config, OFTConfig, OFT_PRESETS, "OFT config")
