"""OpenVLA-OFT's fused vision backbone: DINOv2 (with registers, LayerScale) + SigLIP, timm-shaped.

The modules reproduce timm's VisionTransformer parameter for parameter, under timm's names
(`patch_embed.proj`, `cls_token`, `reg_token`, `pos_embed`, `blocks.N.{norm1,attn.qkv,attn.proj,
ls1,norm2,mlp.fc1,mlp.fc2,ls2}`), with LayerScale's `gamma` renamed `scale_factor` as prismatic
does, so a published `vision_backbone.*` state dict loads key for key. They are written here
rather than built with timm because timm imports torchvision, whose wheels on the package index
are CUDA builds that replace the project's pinned CPU torch.

Only the blocks OFT runs are built: it reads the output of the second-to-last block
(`get_intermediate_layers(n={depth - 2})`, no final norm) and drops the prefix tokens, so the last
block, the final `norm` and SigLIP's MAP head (`attn_pool`) never touch an action. The importer
checks that a checkpoint holds them (the published layout) and leaves them out.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .configuration_oft import OFTConfig, ViTTowerConfig

#: timm's ViT LayerNorm epsilon (norm_layer = LayerNorm(eps=1e-6)).
VIT_LN_EPS = 1e-6


class LayerScale(nn.Module):
    """x * scale_factor (timm LayerScale; the parameter under prismatic's name)."""

    def __init__(self, dim: int, init_value: float = 1e-5):
        super().__init__()
        self.scale_factor = nn.Parameter(torch.full((dim,), init_value))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.scale_factor


class PatchEmbed(nn.Module):
    """Non-overlapping patches -> tokens [B, N, D] (timm PatchEmbed, Conv2d with bias)."""

    def __init__(self, patch_size: int, dim: int):
        super().__init__()
        self.proj = nn.Conv2d(3, dim, kernel_size=patch_size, stride=patch_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x).flatten(2).transpose(1, 2)


class Attention(nn.Module):
    """timm Attention: fused qkv with bias, scaled dot product over all tokens, output proj."""

    def __init__(self, dim: int, num_heads: int):
        super().__init__()
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, c = x.shape
        q, k, v = self.qkv(x).reshape(b, n, 3, self.num_heads, c // self.num_heads).permute(2, 0, 3, 1, 4)
        return self.proj(F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, n, c))


class Mlp(nn.Module):
    """timm Mlp: fc1 -> exact GELU -> fc2."""

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class Block(nn.Module):
    """Pre-norm transformer block: x + ls1(attn(norm1(x))), then x + ls2(mlp(norm2(x)))."""

    def __init__(self, cfg: ViTTowerConfig):
        super().__init__()
        d = cfg.embed_dim
        self.norm1 = nn.LayerNorm(d, eps=VIT_LN_EPS)
        self.attn = Attention(d, cfg.num_heads)
        self.ls1 = LayerScale(d) if cfg.layer_scale else nn.Identity()
        self.norm2 = nn.LayerNorm(d, eps=VIT_LN_EPS)
        self.mlp = Mlp(d, cfg.mlp_hidden)
        self.ls2 = LayerScale(d) if cfg.layer_scale else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.ls1(self.attn(self.norm1(x)))
        return x + self.ls2(self.mlp(self.norm2(x)))


class ViTTower(nn.Module):
    """One tower up to its second-to-last block: pixels [B, 3, S, S] -> patch features [B, N, D]."""

    def __init__(self, cfg: ViTTowerConfig, image_size: int, patch_size: int):
        super().__init__()
        self.cfg = cfg
        d = cfg.embed_dim
        num_patches = (image_size // patch_size) ** 2
        self.patch_embed = PatchEmbed(patch_size, d)
        self.cls_token = nn.Parameter(torch.randn(1, 1, d) * 1e-6) if cfg.class_token else None
        self.reg_token = nn.Parameter(torch.randn(1, cfg.reg_tokens, d) * 1e-6) if cfg.reg_tokens else None
        embed_len = num_patches if cfg.no_embed_class else num_patches + cfg.num_prefix_tokens
        self.pos_embed = nn.Parameter(torch.randn(1, embed_len, d) * 0.02)
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.depth - 1))

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        x = self.patch_embed(pixels)
        prefix = [t.expand(x.shape[0], -1, -1) for t in (self.cls_token, self.reg_token) if t is not None]
        if self.cfg.no_embed_class:   # positions cover the patches; prefix tokens join afterwards
            x = torch.cat([*prefix, x + self.pos_embed], dim=1)
        else:
            x = torch.cat([*prefix, x], dim=1) + self.pos_embed
        for block in self.blocks:
            x = block(x)
        return x[:, self.cfg.num_prefix_tokens:]


class FusedVisionBackbone(nn.Module):
    """pixel_values [B, 6 * n_cams, S, S] -> [B, n_cams * patches, 2176]: per image, channels 0-2 go
    to the featurizer (DINOv2) and 3-5 to the fused featurizer (SigLIP); features are concatenated
    channel-wise (DINOv2 first), images patch-wise in input order (prismatic's vision backbone)."""

    def __init__(self, config: OFTConfig):
        super().__init__()
        self.n_cams = config.n_cams
        self.featurizer = ViTTower(config.featurizer, config.image_size, config.patch_size)
        self.fused_featurizer = ViTTower(config.fused_featurizer, config.image_size, config.patch_size)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        b, c, h, w = pixel_values.shape
        # All images of the batch through each tower at once: the same per-image arithmetic.
        images = pixel_values.reshape(b * self.n_cams, 6, h, w)
        feats = torch.cat([self.featurizer(images[:, :3]), self.fused_featurizer(images[:, 3:])], dim=2)
        return feats.reshape(b, self.n_cams * feats.shape[1], feats.shape[2])
