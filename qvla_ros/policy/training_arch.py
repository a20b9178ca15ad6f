"""What the training loop (training.py) needs to know of each architecture, and nothing else:

    config = train_policy_config("tiny" | "oft-small" | config dict)    VLAConfig or OFTConfig
    tokenizer = new_tokenizer(config, sentences)                         trained on the run's sentences
    tokenizer = read_tokenizer(config, tokenizer_json_text)              a resumed run's
    stats = norm_stats(config, proprio, actions)                         for policy.set_norm_stats

VLA (configuration_vla: micro, tiny): a word-level tokenizer, mean/std statistics.
OFT (configuration_oft: oft-micro, oft-smoke, oft-small, ...): a trained subword (BPE)
tokenizer, OFT's BOUNDS_Q99 statistics. Everything else (batches, augmentation, the loss on
normalized chunks, checkpoints) goes through the policy contract both share.
"""
from __future__ import annotations

import numpy as np

from .configuration_oft import OFT_PRESETS, OFTConfig, get_oft_config
from .configuration_vla import VLAConfig, get_config
from .processing_oft import OFTTokenizer, compute_bounds_stats, train_subword_tokenizer
from .processing_vla import InstructionTokenizer, compute_norm_stats


def train_policy_config(config: str | dict | VLAConfig | OFTConfig) -> VLAConfig | OFTConfig:
    """The configuration a TrainConfig.config names: an OFT preset name, an OFT config dict (it
    has towers: "featurizer") or OFTConfig builds the OFT architecture, anything else the VLA."""
    if isinstance(config, OFTConfig) or (isinstance(config, str) and config in OFT_PRESETS) \
            or (isinstance(config, dict) and "featurizer" in config):
        return get_oft_config(config)
    return get_config(config)


def new_tokenizer(config: VLAConfig | OFTConfig, sentences: list[str]) -> InstructionTokenizer | OFTTokenizer:
    """A tokenizer learnt from every sentence the run trains on (and the suite's)."""
    if isinstance(config, OFTConfig):
        return train_subword_tokenizer(sentences, config)
    return InstructionTokenizer.train(sentences)


def read_tokenizer(config: VLAConfig | OFTConfig, text: str) -> InstructionTokenizer | OFTTokenizer:
    """The tokenizer a checkpoint's tokenizer.json holds, for a policy of `config`."""
    if isinstance(config, OFTConfig):
        return OFTTokenizer.from_str(text, config)
    return InstructionTokenizer.from_str(text)


def norm_stats(config: VLAConfig | OFTConfig, proprio: np.ndarray, actions: np.ndarray) -> dict[str, np.ndarray]:
    """The normalization statistics of training frames, in the policy's STAT_NAMES."""
    if isinstance(config, OFTConfig):
        return compute_bounds_stats(proprio, actions)
    return compute_norm_stats(proprio, actions)
