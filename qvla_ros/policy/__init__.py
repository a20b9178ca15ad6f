"""The VLA policies: `actions = policy(images, instruction, proprio)`, two architectures:
the project's small OFT-recipe policy (configuration_vla: micro, tiny) and the published
OpenVLA-OFT (configuration_oft: oft-micro, oft-7b).

    make_policy("tiny" | "oft-7b" | VLAConfig | OFTConfig, seed=0)   random weights
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
