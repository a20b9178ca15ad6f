"""The VLA policy (OpenVLA-OFT recipe at any size): `actions = policy(images, instruction, proprio)`.

    make_policy("tiny" | "oft-7b" | VLAConfig, seed=0)   random weights
    load_policy(path=None, device="cpu")                 a checkpoint directory (None: the shipped one)
    policy.save_pretrained(dir)                          config.json + tokenizer.json + model.safetensors
"""
from .configuration_vla import PRESETS, VisionEncoderConfig, VLAConfig, get_config
from .modeling_vla import (CheckpointError, VLAPolicy, build_attention_mask, default_checkpoint_dir,
                           load_policy, make_policy)
from .processing_vla import InstructionTokenizer, compute_norm_stats

__all__ = ["PRESETS", "VisionEncoderConfig", "VLAConfig", "get_config", "CheckpointError", "VLAPolicy",
           "build_attention_mask", "default_checkpoint_dir", "load_policy", "make_policy",
           "InstructionTokenizer", "compute_norm_stats"]
