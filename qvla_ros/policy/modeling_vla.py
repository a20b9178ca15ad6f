"""The VLA policy: OpenVLA-OFT's recipe at any size, built from `transformers` parts.

    images ─► ViT patch encoder(s) per camera ─► MLP projector ─┐
    instruction ─► tokenizer ─► decoder token embedding ────────┤
    proprio ─► normalize ─► MLP ─► one token ───────────────────┤─► LlamaModel ─► action-slot
    learned empty action-slot tokens (horizon x slots_per_step) ┘   hidden states ─► MLP head
                                                                    ─► [B, horizon, action_dim]

The decoder attends over [patches of every camera, instruction, proprio, action slots] with a
custom 4-D mask: the prefix is causal (OpenVLA-OFT) or full, and every action slot sees the whole
sequence including the slots after it, so ONE forward pass gives the whole chunk (parallel
decoding). Trained with an L1 loss on normalized actions. Every Linear is a plain nn.Linear
(the quantizer swaps them by dotted name).

Normalization statistics are buffers, saved with the weights: callers pass raw uint8 images and
raw proprio and get actions in the environment's units.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Sequence

import torch
from torch import nn
from transformers import LlamaConfig, LlamaModel, SiglipVisionConfig, SiglipVisionModel

from .checkpoint_files import (CONFIG_FILE, TOKENIZER_FILE, WEIGHTS_FILE, CheckpointError, check_tensor_names,
                               default_dtype, read_config_and_tokenizer, stored_tensor_specs, write_checkpoint)
from .configuration_oft import OFT_CONFIG_FORMAT, OFTConfig
from .configuration_vla import CONFIG_FORMAT, CONFIG_VERSION, VLAConfig, get_config
from .policy_base import ChunkPolicy, build_seeded
from .processing_vla import InstructionTokenizer, default_instructions, images_to_pixels

STAT_NAMES = ("proprio_mean", "proprio_std", "action_mean", "action_std", "action_min", "action_max")


def _mlp(sizes: Sequence[int]) -> nn.Sequential:
    layers: list[nn.Module] = []
    for i, (fan_in, fan_out) in enumerate(zip(sizes[:-1], sizes[1:])):
        layers.append(nn.Linear(fan_in, fan_out))
        if i < len(sizes) - 2:
            layers.append(nn.GELU())
    return nn.Sequential(*layers)


def build_attention_mask(config: VLAConfig, text_mask: torch.Tensor) -> torch.Tensor:
    """bool [B, 1, L, L], True where query row may attend to key column.

    Keys that are instruction padding are never attended to. Prefix rows attend causally or fully
    within the prefix (config.prefix_attention) and never to the action slots; action-slot rows
    attend to every valid key, the other slots (before AND after them) included.
    """
    b = text_mask.shape[0]
    n_img = config.n_cams * config.patches_per_image
    prefix = n_img + config.max_text_tokens + 1
    total = prefix + config.num_action_slots
    dev = text_mask.device
    key_valid = torch.ones(b, total, dtype=torch.bool, device=dev)
    key_valid[:, n_img:n_img + config.max_text_tokens] = text_mask
    allowed = torch.zeros(total, total, dtype=torch.bool, device=dev)
    if config.prefix_attention == "causal":
        allowed[:prefix, :prefix] = torch.ones(prefix, prefix, dtype=torch.bool, device=dev).tril()
    else:
        allowed[:prefix, :prefix] = True
    allowed[prefix:, :] = True
    return (allowed.unsqueeze(0) & key_valid.unsqueeze(1)).unsqueeze(1)


class VLAPolicy(ChunkPolicy):
    """`actions = policy(images, instruction, proprio)`; see the package's policy contract."""

    STAT_NAMES = STAT_NAMES
    STAT_READ_DTYPE = torch.float32

    def __init__(self, config: VLAConfig, tokenizer: InstructionTokenizer | None = None):
        super().__init__()
        self.config = config
        self.tokenizer = tokenizer if tokenizer is not None else InstructionTokenizer.train(default_instructions())
        if self.tokenizer.vocab_size > config.vocab_size:
            raise ValueError(f"tokenizer has {self.tokenizer.vocab_size} tokens but the config's "
                             f"vocab_size is {config.vocab_size}")
        d = config.hidden_size
        self.vision = nn.ModuleList([
            SiglipVisionModel(SiglipVisionConfig(
                hidden_size=v.hidden_size, intermediate_size=v.intermediate_size,
                num_hidden_layers=v.num_layers, num_attention_heads=v.num_heads,
                image_size=config.image_size, patch_size=v.patch_size, vision_use_head=False,
                attn_implementation=config.attn_implementation))
            for v in config.vision
        ])
        proj = [config.vision_width, config.projector_hidden, d] if config.projector_hidden else [config.vision_width, d]
        self.projector = _mlp(proj)
        self.proprio_projector = _mlp([config.proprio_dim, d, d])
        self.action_queries = nn.Parameter(torch.randn(config.num_action_slots, d) * 0.02)
        self.decoder = LlamaModel(LlamaConfig(
            vocab_size=config.vocab_size, hidden_size=d, intermediate_size=config.intermediate_size,
            num_hidden_layers=config.num_layers, num_attention_heads=config.num_heads,
            num_key_value_heads=config.num_kv_heads, max_position_embeddings=max(2048, config.sequence_length),
            rope_parameters={"rope_type": "default", "rope_theta": config.rope_theta},
            pad_token_id=self.tokenizer.pad_id, bos_token_id=None, eos_token_id=None, use_cache=False,
            attn_implementation=config.attn_implementation))
        self.action_head = _mlp([config.slots_per_step * d] + [config.head_hidden] * config.head_layers
                                + [config.action_dim])
        # Identity statistics until set_norm_stats() is given the training data's.
        for name in STAT_NAMES:
            dim = config.proprio_dim if name.startswith("proprio") else config.action_dim
            init = {"std": 1.0, "mean": 0.0, "min": -1.0, "max": 1.0}[name.rsplit("_", 1)[1]]
            self.register_buffer(name, torch.full((dim,), init, dtype=torch.float32))

    # Statistics (set_norm_stats: ChunkPolicy) ----------------------------------------------------
    def normalize_proprio(self, proprio: torch.Tensor) -> torch.Tensor:
        return (proprio.float() - self.proprio_mean) / self.proprio_std

    def normalize_actions(self, actions: torch.Tensor) -> torch.Tensor:
        return (actions.float() - self.action_mean) / self.action_std

    def unnormalize_actions(self, actions: torch.Tensor) -> torch.Tensor:
        actions = actions.float() * self.action_std + self.action_mean
        return torch.maximum(torch.minimum(actions, self.action_max), self.action_min)

    # Forward ------------------------------------------------------------------------------------
    @property
    def device(self) -> torch.device:
        return self.action_queries.device

    @property
    def dtype(self) -> torch.dtype:
        return self.action_queries.dtype

    def encode_tokens(self, pixels: torch.Tensor, token_ids: torch.Tensor, text_mask: torch.Tensor,
                      proprio_norm: torch.Tensor) -> torch.Tensor:
        """Decoder hidden states of the action slots, [B, horizon, slots_per_step * hidden].

        pixels: float [B * n_cams, 3, S, S] in [-1, 1]; token_ids/text_mask: [B, max_text_tokens];
        proprio_norm: float [B, proprio_dim], already normalized.
        """
        cfg = self.config
        b = token_ids.shape[0]
        pixels = pixels.to(self.dtype)
        feats = torch.cat([enc(pixel_values=pixels).last_hidden_state for enc in self.vision], dim=-1)
        patches = self.projector(feats.reshape(b, cfg.n_cams * cfg.patches_per_image, cfg.vision_width))
        text = self.decoder.embed_tokens(token_ids)
        prop = self.proprio_projector(proprio_norm.to(self.dtype)).unsqueeze(1)
        slots = self.action_queries.unsqueeze(0).expand(b, -1, -1)
        tokens = torch.cat([patches, text.to(patches.dtype), prop.to(patches.dtype), slots.to(patches.dtype)], dim=1)
        mask = build_attention_mask(cfg, text_mask)
        if cfg.attn_implementation == "eager":
            # The eager path adds the mask to the scores; sdpa takes the boolean mask as is.
            mask = torch.zeros(mask.shape, dtype=tokens.dtype, device=tokens.device).masked_fill_(
                ~mask, torch.finfo(tokens.dtype).min)
        hidden = self.decoder(inputs_embeds=tokens, attention_mask=mask, use_cache=False).last_hidden_state
        return hidden[:, -cfg.num_action_slots:].reshape(b, cfg.horizon, cfg.slots_per_step * cfg.hidden_size)

    def predict_normalized(self, pixels: torch.Tensor, token_ids: torch.Tensor, text_mask: torch.Tensor,
                           proprio_norm: torch.Tensor) -> torch.Tensor:
        """Normalized action chunk [B, horizon, action_dim] (float32) from preprocessed inputs."""
        return self.action_head(self.encode_tokens(pixels, token_ids, text_mask, proprio_norm)).float()

    def images_to_pixels(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 [B, n_cams, H, W, 3] -> float [B * n_cams, 3, S, S] in [-1, 1] (prepare_inputs: ChunkPolicy)."""
        return images_to_pixels(images, self.config.image_size)

    # Checkpoints --------------------------------------------------------------------------------
    def save_pretrained(self, directory: str | os.PathLike) -> Path:
        """Writes config.json, tokenizer.json and model.safetensors (each atomically) into directory."""
        return write_checkpoint(directory, CONFIG_FORMAT, CONFIG_VERSION, self.config.to_dict(),
                                self.tokenizer.to_str(), self.cpu_state())


def read_checkpoint_config(directory: Path):
    """(config, tokenizer) from a checkpoint's config.json and tokenizer.json, checked: format and
    version, a config dict (a preset name in its place is refused: it would build whatever that
    preset is, whatever the weights hold). A config.json of format qvla-oft-policy gives
    (OFTConfig, OFTTokenizer). CheckpointError names the file and the problem."""
    try:
        meta = json.loads((directory / CONFIG_FILE).read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise CheckpointError(f"{directory / CONFIG_FILE} is not valid JSON: {exc}") from None
    if isinstance(meta, dict) and meta.get("format") == OFT_CONFIG_FORMAT:
        from .modeling_oft import read_oft_checkpoint_config  # the published OpenVLA-OFT architecture

        return read_oft_checkpoint_config(directory, meta)
    if not isinstance(meta, dict) or meta.get("format") != CONFIG_FORMAT:
        raise CheckpointError(f"{directory / CONFIG_FILE} is not a {CONFIG_FORMAT} config "
                              f"(format {meta.get('format') if isinstance(meta, dict) else None!r})")
    return read_config_and_tokenizer(directory, meta, CONFIG_VERSION, VLAConfig.from_dict,
                                     lambda text, config: InstructionTokenizer.from_str(text))


def meta_skeleton(directory: Path, config: VLAConfig, tokenizer: InstructionTokenizer,
                  stored_tensors: int, dtype: torch.dtype | None = None) -> "VLAPolicy":
    """The policy config.json describes, on the meta device (no storage), for checking a
    checkpoint's tensors before anything is allocated. `stored_tensors` (how many the weights
    file holds) bounds the build: every layer stores at least one tensor, and the skeleton's cost
    grows with the layer count even on the meta device."""
    if isinstance(config, OFTConfig):
        from .modeling_oft import OFTPolicy as policy_class, oft_layer_count

        layers = oft_layer_count(config)
    else:
        policy_class = VLAPolicy
        layers = config.num_layers + config.head_layers + sum(v.num_layers for v in config.vision)
    if layers > stored_tensors:
        raise CheckpointError(f"{CONFIG_FILE} in {directory} describes {layers} layers, but "
                              f"{WEIGHTS_FILE} holds only {stored_tensors} tensors")
    try:
        with torch.device("meta"), default_dtype(dtype):
            policy = policy_class(config, tokenizer=tokenizer)
        for name in (STAT_NAMES if policy_class is VLAPolicy else ()):
            # statistics stay float32 whatever the weights' dtype (make_policy); OFTPolicy's
            # buffers are created with explicit dtypes
            setattr(policy, name, getattr(policy, name).float())
        return policy
    except ValueError as exc:
        raise CheckpointError(f"{directory}: {exc}") from None
    except RuntimeError as exc:  # sizes whose element count overflows even without storage
        raise CheckpointError(f"{CONFIG_FILE} in {directory} describes a model too large to "
                              f"build: {exc}") from None


def _check_stored_tensors(path: Path, config: VLAConfig, tokenizer: InstructionTokenizer) -> None:
    """Raise CheckpointError unless the tensors stored at `path` (names, shapes, float or not, read
    from the safetensors header) are those config.json implies. Runs before anything is
    allocated: a config.json edited to describe a huge model is refused here instead of being
    built (which can take all the memory there is), and integer or bool data is not silently cast
    into float weights."""
    stored = stored_tensor_specs(path)
    skeleton = meta_skeleton(path.parent, config, tokenizer, len(stored))
    expected = {k: (tuple(v.shape), v.is_floating_point()) for k, v in skeleton.state_dict().items()}
    check_tensor_names(path, expected, stored, "config.json")
    for key, (shape, dtype) in stored.items():
        want_shape, want_float = expected[key]
        if shape != want_shape:
            raise CheckpointError(f"{path}: tensor {key} has shape {shape}, config.json implies "
                                  f"{want_shape}")
        is_float = dtype.startswith(("F", "BF"))
        if is_float != want_float:
            raise CheckpointError(f"{path}: tensor {key} is stored as {dtype}, it must be "
                                  f"{'a float type' if want_float else 'an integer type'}")


def make_policy(config_name_or_config: str | VLAConfig | dict = "tiny", seed: int = 0,
                device: str | torch.device = "cpu", dtype: torch.dtype | None = None,
                tokenizer: InstructionTokenizer | None = None) -> VLAPolicy:
    """A policy with random weights (seeded), built directly on `device` in `dtype`.

    Parameters are allocated on `device` as they are created (no CPU copy first), so `oft-7b`
    can be built on a GPU in bf16. The normalization statistics stay float32. An OFT preset name
    (`oft-micro`, `oft-7b`) or OFTConfig builds the published OpenVLA-OFT architecture.
    """
    from .configuration_oft import OFT_PRESETS

    if isinstance(config_name_or_config, OFTConfig) or (isinstance(config_name_or_config, str)
                                                         and config_name_or_config in OFT_PRESETS):
        from .modeling_oft import make_oft_policy

        return make_oft_policy(config_name_or_config, seed=seed, device=device, dtype=dtype, tokenizer=tokenizer)
    config = get_config(config_name_or_config)
    policy = build_seeded(lambda: VLAPolicy(config, tokenizer=tokenizer), seed, device, dtype)
    for name in STAT_NAMES:
        setattr(policy, name, getattr(policy, name).float())
    return policy.eval()


def default_checkpoint_dir() -> Path:
    return Path(__file__).resolve().parent.parent / "assets" / "policy_tiny"


def load_policy(path: str | os.PathLike | None = None, device: str | torch.device = "cpu",
                dtype: torch.dtype | None = None) -> VLAPolicy:
    """Loads a checkpoint directory (path=None: the shipped tiny policy). Raises CheckpointError
    naming the file and the problem when anything is missing, corrupt or mismatched."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    directory = Path(path) if path is not None else default_checkpoint_dir()
    if not directory.is_dir():
        raise CheckpointError(f"policy checkpoint {directory} is not a directory")
    for name in (CONFIG_FILE, TOKENIZER_FILE, WEIGHTS_FILE):
        if not (directory / name).is_file():
            raise CheckpointError(f"policy checkpoint {directory} has no {name}")
    config, tokenizer = read_checkpoint_config(directory)
    _check_stored_tensors(directory / WEIGHTS_FILE, config, tokenizer)
    try:
        state = load_file(directory / WEIGHTS_FILE)
    except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
        raise CheckpointError(f"{directory / WEIGHTS_FILE} is corrupt: {exc}") from None
    try:
        if isinstance(config, OFTConfig):
            from .modeling_oft import make_oft_policy

            policy = make_oft_policy(config, device=device, dtype=dtype, tokenizer=tokenizer)
        else:
            policy = make_policy(config, device=device, dtype=dtype, tokenizer=tokenizer)
    except ValueError as exc:
        raise CheckpointError(f"{directory}: {exc}") from None
    expected = policy.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    if missing or unexpected:
        raise CheckpointError(f"{directory / WEIGHTS_FILE} does not match config.json: "
                              f"missing {missing[:5]}{'...' if len(missing) > 5 else ''}, "
                              f"unexpected {unexpected[:5]}{'...' if len(unexpected) > 5 else ''}")
    for key, tensor in state.items():
        if tensor.shape != expected[key].shape:
            raise CheckpointError(f"{directory / WEIGHTS_FILE}: tensor {key} has shape "
                                  f"{tuple(tensor.shape)}, config.json implies {tuple(expected[key].shape)}")
        if not torch.isfinite(tensor.float()).all():
            raise CheckpointError(f"{directory / WEIGHTS_FILE}: tensor {key} holds NaN or inf")
    policy.load_state_dict({k: v.to(expected[k].dtype) for k, v in state.items()})
    return policy.eval()
