"""The OpenVLA-OFT policy as published (L1-regression head, proprio, parallel decoding).

    images ─► 6 channels each ─► DINOv2 ‖ SigLIP (second-to-last block) ─► projector fc1/fc2/fc3 ─┐
    proprio ─► BOUNDS_Q99 ─► proprio_projector ─► one token ─────────────────────────────────────┤
    prompt ─► Llama tokenizer ─► embed_tokens ───────────────────────────────────────────────────┤
                                                                                                   ▼
    Llama-2 (bidirectional) over [BOS, patches, proprio, prompt, 56 zero placeholders, </s>]
      ─► hidden states [last prompt token, first 55 placeholders] ─► MLP-ResNet ─► [B, 8, 7]
      ─► BOUNDS_Q99 unnormalization (dataset_statistics.json[unnorm_key]).

The read-out is the reference's: `hidden[:, NUM_PATCHES + NUM_PROMPT_TOKENS : + 56]` with
NUM_PATCHES = patches + proprio and NUM_PROMPT_TOKENS = prompt length without BOS, i.e. it starts
one position before the placeholders. Prompts of a batch are padded on the right to
max_text_tokens; pad tokens are masked as keys and skipped in the position ids, so every sample
computes exactly what the reference computes for it alone, and the read-out is a gather at each
sample's own offset (fixed shapes: CUDA-graph safe).

State-dict names are the published ones (`vision_backbone.featurizer.*`,
`vision_backbone.fused_featurizer.*`, `projector.fc1/fc2/fc3`, `language_model.model.*`,
`proprio_projector.fc1/fc2`, `action_head.model.*`), so quantization plans name the layers as
the checkpoint does. `language_model.lm_head` is left out: an L1-regression forward never reads
logits (the importer checks it is there and drops it, with the towers' unused last blocks).
"""
from __future__ import annotations

import os
from pathlib import Path

import torch
from torch import nn
from transformers import LlamaConfig, LlamaModel

from .checkpoint_files import read_config_and_tokenizer, write_checkpoint
from .configuration_oft import OFT_CONFIG_FORMAT, OFT_CONFIG_VERSION, OFTConfig, get_oft_config
from .policy_base import ChunkPolicy, build_seeded
from .processing_oft import (OFTTokenizer, images_to_fused_pixels, normalize_bounds_q99, stand_in_tokenizer,
                             unnormalize_bounds_q99)
from .vision_oft import FusedVisionBackbone

#: Normalization buffers (float32 bounds, bool masks), saved with the weights.
OFT_STAT_NAMES = ("action_q01", "action_q99", "action_mask", "proprio_q01", "proprio_q99", "proprio_mask")


class OFTProjector(nn.Module):
    """prismatic's fused-backbone projector: fc1 (-> 4 x vision width) GELU fc2 GELU fc3."""

    def __init__(self, vision_width: int, llm_dim: int):
        super().__init__()
        self.fc1 = nn.Linear(vision_width, 4 * vision_width)
        self.fc2 = nn.Linear(4 * vision_width, llm_dim)
        self.fc3 = nn.Linear(llm_dim, llm_dim)
        self.act_fn1 = nn.GELU()
        self.act_fn2 = nn.GELU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc3(self.act_fn2(self.fc2(self.act_fn1(self.fc1(x)))))


class ProprioProjector(nn.Module):
    """fc1 GELU fc2: the proprio state to one decoder token."""

    def __init__(self, proprio_dim: int, llm_dim: int):
        super().__init__()
        self.fc1 = nn.Linear(proprio_dim, llm_dim)
        self.fc2 = nn.Linear(llm_dim, llm_dim)
        self.act_fn1 = nn.GELU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act_fn1(self.fc1(x)))


class MLPResNetBlock(nn.Module):
    """x + ReLU(Linear(LayerNorm(x))) (pre-norm feed-forward)."""

    def __init__(self, dim: int):
        super().__init__()
        self.ffn = nn.Sequential(nn.LayerNorm(dim), nn.Linear(dim, dim), nn.ReLU())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.ffn(x)


class MLPResNet(nn.Module):
    """LayerNorm, fc1, ReLU, residual blocks, LayerNorm, fc2."""

    def __init__(self, num_blocks: int, input_dim: int, hidden_dim: int, output_dim: int):
        super().__init__()
        self.layer_norm1 = nn.LayerNorm(input_dim)
        self.fc1 = nn.Linear(input_dim, hidden_dim)
        self.relu = nn.ReLU()
        self.mlp_resnet_blocks = nn.ModuleList(MLPResNetBlock(hidden_dim) for _ in range(num_blocks))
        self.layer_norm2 = nn.LayerNorm(hidden_dim)
        self.fc2 = nn.Linear(hidden_dim, output_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.relu(self.fc1(self.layer_norm1(x)))
        for block in self.mlp_resnet_blocks:
            x = block(x)
        return self.fc2(self.layer_norm2(x))


class L1RegressionActionHead(nn.Module):
    """[B, horizon * action_dim, D] hidden states -> [B, horizon, action_dim]: each chunk step reads
    its action_dim consecutive rows concatenated (action_dim * D wide)."""

    def __init__(self, config: OFTConfig):
        super().__init__()
        self.horizon = config.horizon
        self.model = MLPResNet(config.head_blocks, config.action_dim * config.hidden_size, config.head_hidden,
                               config.action_dim)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.model(hidden.reshape(hidden.shape[0], self.horizon, -1))


class LanguageModel(nn.Module):
    """Holds the Llama decoder as `model`, so its weights keep the published `language_model.model.*`."""

    def __init__(self, config: OFTConfig):
        super().__init__()
        self.model = LlamaModel(LlamaConfig(
            vocab_size=config.vocab_size, hidden_size=config.hidden_size,
            intermediate_size=config.intermediate_size, num_hidden_layers=config.num_layers,
            num_attention_heads=config.num_heads, num_key_value_heads=config.num_kv_heads,
            rms_norm_eps=config.rms_norm_eps, max_position_embeddings=max(2048, config.sequence_length),
            rope_parameters={"rope_type": "default", "rope_theta": config.rope_theta},
            pad_token_id=config.pad_id, bos_token_id=config.bos_id, eos_token_id=config.stop_id,
            use_cache=False, attn_implementation=config.attn_implementation))


class OFTPolicy(ChunkPolicy):
    """`actions = policy(images, instruction, proprio)`, the package's policy contract, computed as
    OpenVLA-OFT computes it. The split prepare_inputs / predict_normalized / unnormalize_actions is
    the one GraphedForward captures."""

    #: set_norm_stats (ChunkPolicy) reads q01/q99 as float32, the masks as bool: each buffer's dtype
    STAT_NAMES = OFT_STAT_NAMES

    def __init__(self, config: OFTConfig, tokenizer: OFTTokenizer | None = None):
        super().__init__()
        self.config = config
        self.tokenizer = tokenizer if tokenizer is not None else stand_in_tokenizer(config)
        if self.tokenizer.config != config:
            raise ValueError("the tokenizer was checked against another configuration")
        self.vision_backbone = FusedVisionBackbone(config)
        self.projector = OFTProjector(config.vision_width, config.hidden_size)
        self.language_model = LanguageModel(config)
        self.proprio_projector = ProprioProjector(config.proprio_dim, config.hidden_size)
        self.action_head = L1RegressionActionHead(config)
        # Identity bounds ([-1, 1] <-> [-1, 1]) until set_norm_stats() gets a dataset's.
        for name in OFT_STAT_NAMES:
            dim = config.proprio_dim if name.startswith("proprio") else config.action_dim
            kind = name.rsplit("_", 1)[1]
            if kind == "mask":
                self.register_buffer(name, torch.ones(dim, dtype=torch.bool))
            else:
                self.register_buffer(name, torch.full((dim,), -1.0 if kind == "q01" else 1.0, dtype=torch.float32))

    # Statistics (set_norm_stats: ChunkPolicy) ----------------------------------------------------
    def normalize_proprio(self, proprio: torch.Tensor) -> torch.Tensor:
        return normalize_bounds_q99(proprio.float(), self.proprio_q01, self.proprio_q99, self.proprio_mask)

    def normalize_actions(self, actions: torch.Tensor) -> torch.Tensor:
        """Raw actions -> the [-1, 1] targets the head is trained on (OFT clips them, as its data
        pipeline does)."""
        return normalize_bounds_q99(actions.float(), self.action_q01, self.action_q99, self.action_mask)

    def unnormalize_actions(self, actions: torch.Tensor) -> torch.Tensor:
        return unnormalize_bounds_q99(actions.float(), self.action_q01, self.action_q99, self.action_mask)

    # Forward ------------------------------------------------------------------------------------
    @property
    def device(self) -> torch.device:
        return self.projector.fc1.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.vision_backbone.featurizer.pos_embed.dtype

    def action_hidden_states(self, pixels: torch.Tensor, token_ids: torch.Tensor, text_mask: torch.Tensor,
                             proprio_norm: torch.Tensor) -> torch.Tensor:
        """The decoder's last hidden states the action head reads, [B, horizon * action_dim, D].

        pixels float [B, 6 * n_cams, S, S] (images_to_fused_pixels); token_ids / text_mask
        [B, max_text_tokens] (OFTTokenizer.encode: BOS first, right-padded); proprio_norm
        [B, proprio_dim] already normalized.
        """
        cfg = self.config
        b, t_max = token_ids.shape
        patches = self.projector(self.vision_backbone(pixels.to(self.dtype)))
        proprio = self.proprio_projector(proprio_norm.to(patches.dtype)).unsqueeze(1)
        embed = self.language_model.model.embed_tokens
        text = embed(token_ids).to(patches.dtype)
        placeholders = patches.new_zeros(b, cfg.num_action_tokens, cfg.hidden_size)   # "empty" action tokens
        stop = embed(torch.full((b, 1), cfg.stop_id, dtype=torch.long, device=token_ids.device)).to(patches.dtype)
        tokens = torch.cat([text[:, :1], patches, proprio, text[:, 1:], placeholders, stop], dim=1)
        ones = torch.ones(b, 1 + patches.shape[1] + 1, dtype=torch.bool, device=token_ids.device)
        tail = torch.ones(b, cfg.num_action_tokens + 1, dtype=torch.bool, device=token_ids.device)
        valid = torch.cat([ones[:, :1] & text_mask[:, :1], ones[:, 1:], text_mask[:, 1:], tail], dim=1)
        # Pads get no position of their own: valid tokens sit where they sit in the unpadded sequence.
        position_ids = (valid.long().cumsum(1) - 1).clamp_(min=0)
        # Fully bidirectional: every token attends to every valid token (pads only as queries).
        mask = valid[:, None, None, :].expand(b, 1, tokens.shape[1], tokens.shape[1])
        if cfg.attn_implementation == "eager":
            mask = torch.zeros(mask.shape, dtype=tokens.dtype, device=tokens.device).masked_fill_(
                ~mask, torch.finfo(tokens.dtype).min)
        hidden = self.language_model.model(inputs_embeds=tokens, attention_mask=mask, position_ids=position_ids,
                                           use_cache=False).last_hidden_state
        # Reference read-out start: NUM_PATCHES + NUM_PROMPT_TOKENS = (patches + 1) + (prompt - 1).
        n_patches = patches.shape[1] + 1
        start = n_patches + text_mask.sum(1) - 1                                  # the last prompt token
        first_placeholder = n_patches + t_max
        index = torch.arange(cfg.num_action_tokens, device=hidden.device).unsqueeze(0).expand(b, -1)
        index = torch.where(index == 0, start.unsqueeze(1), first_placeholder + index - 1)
        return hidden.gather(1, index.unsqueeze(-1).expand(-1, -1, hidden.shape[-1]))

    def predict_normalized(self, pixels: torch.Tensor, token_ids: torch.Tensor, text_mask: torch.Tensor,
                           proprio_norm: torch.Tensor) -> torch.Tensor:
        """Normalized action chunk [B, horizon, action_dim] (float32) from preprocessed inputs."""
        return self.action_head(self.action_hidden_states(pixels, token_ids, text_mask, proprio_norm)).float()

    def images_to_pixels(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 [B, n_cams, H, W, 3] -> float [B, 6 * n_cams, S, S] (prepare_inputs: ChunkPolicy)."""
        return images_to_fused_pixels(images, self.config)

    # Checkpoints --------------------------------------------------------------------------------
    def save_pretrained(self, directory: str | os.PathLike, provenance: dict | None = None) -> Path:
        """config.json, tokenizer.json, model.safetensors (each atomically): the project's format,
        which load_policy, quantize and the node read."""
        return write_oft_checkpoint(directory, self.config, self.tokenizer, self.cpu_state(), provenance)


def write_oft_checkpoint(directory: str | os.PathLike, config: OFTConfig, tokenizer: OFTTokenizer,
                         state: dict[str, torch.Tensor], provenance: dict | None = None) -> Path:
    """The project's OFT checkpoint (OFTPolicy.save_pretrained and the importer, which writes a
    published checkpoint's tensors without building the model). `state`: OFTPolicy's state dict, CPU."""
    return write_checkpoint(directory, OFT_CONFIG_FORMAT, OFT_CONFIG_VERSION, config.to_dict(),
                            tokenizer.to_str(), state, provenance)


def oft_layer_count(config: OFTConfig) -> int:
    """Layers a skeleton of `config` builds (each stores at least one tensor): bounds a build."""
    return (config.num_layers + config.featurizer.depth + config.fused_featurizer.depth + config.head_blocks)


def make_oft_policy(config: str | OFTConfig | dict = "oft-micro", seed: int = 0, device: str | torch.device = "cpu",
                    dtype: torch.dtype | None = None, tokenizer: OFTTokenizer | None = None) -> OFTPolicy:
    """An OFT policy with random weights (seeded), built directly on `device` in `dtype`
    (normalization statistics stay float32 / bool)."""
    config = get_oft_config(config)
    return build_seeded(lambda: OFTPolicy(config, tokenizer=tokenizer), seed, device, dtype).eval()


def read_oft_checkpoint_config(directory: Path, meta: dict) -> tuple[OFTConfig, OFTTokenizer]:
    """(config, tokenizer) of a checkpoint in the project's OFT format (config.json already read
    as `meta`); CheckpointError names the file and the problem."""
    return read_config_and_tokenizer(directory, meta, OFT_CONFIG_VERSION, OFTConfig.from_dict, OFTTokenizer.from_str,
                                     tokenizer_errors=(ValueError, UnicodeDecodeError, OSError))
