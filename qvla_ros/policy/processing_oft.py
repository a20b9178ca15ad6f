"""Input processing of the OpenVLA-OFT policy: the checkpoint's Llama tokenizer and prompt, the
6-channel per-tower image normalization, BOUNDS_Q99 proprio/action normalization.

Published behaviour followed here (moojink/openvla-oft):
- prompt `In: What action should the robot take to {task.lower()}?\\nOut:`, tokenized with BOS
  (the Llama tokenizer's post-processor), then `▁` (id 29871 in Llama-2) appended unless the
  prompt already ends with it (predict_action);
- each image resized to the towers' side and normalized twice, once per tower (DINOv2: ImageNet
  mean/std; SigLIP: 0.5/0.5), giving 6 channels; the images are stacked channel-wise;
- proprio: clip(2 (x - q01) / (q99 - q01 + 1e-8) - 1, -1, 1) where mask, else x (normalize_proprio);
- actions: 0.5 (a + 1) (q99 - q01 + 1e-8) + q01 where mask, else a (_unnormalize_actions).
"""
from __future__ import annotations

import json
import string
from collections.abc import Iterable, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers

from .configuration_oft import OFT_PROMPT, OFTConfig
from .processing_vla import DEFAULT_INSTRUCTIONS

BOUNDS_EPS = 1e-8


class OFTTokenizer:
    """The checkpoint's tokenizer.json (the `tokenizers` library) with the ids OFT relies on
    checked against the configuration. Raises ValueError naming the mismatch."""

    def __init__(self, tokenizer: Tokenizer, config: OFTConfig):
        self._tok = tokenizer
        self.config = config
        size = tokenizer.get_vocab_size(with_added_tokens=True)
        if size > config.vocab_size:
            raise ValueError(f"the tokenizer has {size} tokens but the decoder's embedding has "
                             f"{config.vocab_size} rows")
        for name, token in (("bos_id", "<s>"), ("stop_id", "</s>"), ("empty_id", "\u2581")):
            found = tokenizer.token_to_id(token)
            if found != getattr(config, name):
                raise ValueError(f"the tokenizer's {token!r} is id {found}, the policy's {name} is "
                                 f"{getattr(config, name)}")

    @classmethod
    def from_str(cls, text: str, config: OFTConfig) -> "OFTTokenizer":
        try:
            tok = Tokenizer.from_str(text)
        except Exception as exc:  # the tokenizers library raises a bare Exception on bad JSON
            raise ValueError(f"not a valid tokenizer.json: {exc}") from None
        return cls(tok, config)

    def to_str(self) -> str:
        return self._tok.to_str()

    @property
    def vocab_size(self) -> int:
        return self._tok.get_vocab_size(with_added_tokens=True)

    def prompt_ids(self, instruction: str) -> list[int]:
        """BOS + the published prompt's tokens, ending with the empty token."""
        ids = self._tok.encode(OFT_PROMPT.format(instruction.lower()), add_special_tokens=False).ids
        ids = [self.config.bos_id, *ids]
        if ids[-1] != self.config.empty_id:
            ids.append(self.config.empty_id)
        return ids

    def encode(self, instructions: Sequence[str], max_tokens: int) -> tuple[torch.Tensor, torch.Tensor]:
        """ids int64 [B, max_tokens] right-padded with pad_id, and mask bool [B, max_tokens]. A prompt
        longer than max_tokens is refused: cutting it would drop the words or the empty token the
        actions are read at."""
        if isinstance(instructions, str) or not all(isinstance(t, str) for t in instructions):
            raise ValueError("instruction must be a list of strings, one per batch element")
        ids = torch.full((len(instructions), max_tokens), self.config.pad_id, dtype=torch.long)
        mask = torch.zeros((len(instructions), max_tokens), dtype=torch.bool)
        for row, text in enumerate(instructions):
            seq = self.prompt_ids(text)
            if len(seq) > max_tokens:
                raise ValueError(f"instruction {text!r} is {len(seq)} prompt tokens; this policy takes at "
                                 f"most {max_tokens} (max_text_tokens)")
            ids[row, :len(seq)] = torch.tensor(seq, dtype=torch.long)
            mask[row, :len(seq)] = True
        return ids, mask


def stand_in_tokenizer(config: OFTConfig) -> OFTTokenizer:
    """A word-level tokenizer for policies built from a preset with random weights (no checkpoint
    tokenizer exists for them): the prompt's and the benchmark suite's words, with <s>, </s>, `▁`
    and <PAD> at the configuration's ids. A real checkpoint always brings its own tokenizer."""
    reserved = {"<unk>": 0, "<s>": config.bos_id, "</s>": config.stop_id, "\u2581": config.empty_id,
                "<PAD>": config.pad_id}
    words = set(pre_tokenizers.Whitespace().pre_tokenize_str(OFT_PROMPT.format(" ".join(DEFAULT_INSTRUCTIONS))))
    vocab, next_id = dict(reserved), 0
    for word in sorted(w for w, _ in words):
        while next_id in reserved.values():
            next_id += 1
        if word not in vocab:
            vocab[word] = next_id
            next_id += 1
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return OFTTokenizer(tok, config)


#: Special tokens of a trained subword tokenizer, in id order from 0: the small OFT presets
#: (oft-micro, oft-smoke, oft-small) put bos_id, stop_id, empty_id, pad_id at 1-4.
SUBWORD_SPECIALS = ("<unk>", "<s>", "</s>", "\u2581", "<PAD>")


def train_subword_tokenizer(instructions: Iterable[str], config: OFTConfig, vocab_size: int | None = None
                            ) -> OFTTokenizer:
    """A byte-pair-encoding tokenizer learnt from the prompts of `instructions`, Llama-2-style
    (lower-cased, spaces as `▁` prefixes, the prompt's own tokens), at most `vocab_size`
    (default: config.vocab_size) tokens.

    Why subwords: a word-level vocabulary maps every word it never saw to one [UNK], so "shut the
    drawer" and "shut the window" would differ only by the noun and any two unseen verbs would be
    the same token. Here the alphabet (lower-case letters, digits, punctuation) is always in the
    vocabulary and merges are learnt only from pairs seen at least twice, so an unseen word is
    spelled in known pieces; nothing ASCII becomes <unk>.
    """
    want = {"<unk>": 0, "<s>": config.bos_id, "</s>": config.stop_id, "\u2581": config.empty_id,
            "<PAD>": config.pad_id}
    if [want[t] for t in SUBWORD_SPECIALS] != list(range(len(SUBWORD_SPECIALS))):
        raise ValueError(f"a trained subword tokenizer puts {SUBWORD_SPECIALS} at ids 0-4; this configuration "
                         f"has bos/stop/empty/pad at {config.bos_id}/{config.stop_id}/{config.empty_id}/"
                         f"{config.pad_id}")
    vocab_size = config.vocab_size if vocab_size is None else vocab_size
    if not 64 <= vocab_size <= config.vocab_size:
        raise ValueError(f"vocab_size must be in [64, {config.vocab_size}] (the decoder's embedding rows), "
                         f"got {vocab_size}")
    texts = [t for t in instructions]
    if not texts or not all(isinstance(t, str) and t.strip() for t in texts):
        raise ValueError("instructions must be non-empty strings, at least one")
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.normalizer = normalizers.Sequence([normalizers.NFD(), normalizers.StripAccents(), normalizers.Lowercase()])
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="\u2581", prepend_scheme="always")
    tok.decoder = decoders.Metaspace(replacement="\u2581", prepend_scheme="always")
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, min_frequency=2, special_tokens=list(SUBWORD_SPECIALS),
                                  initial_alphabet=list(string.ascii_lowercase + string.digits + string.punctuation),
                                  show_progress=False)
    tok.train_from_iterator([OFT_PROMPT.format(t.lower()) for t in texts], trainer)
    # `▁` must stay an ordinary vocabulary entry (the word-boundary piece, as in Llama), not an
    # added special token: the encoder would cut it out of text and the decoder drop it.
    data = json.loads(tok.to_str())
    data["added_tokens"] = [t for t in data["added_tokens"] if t["content"] != "\u2581"]
    return OFTTokenizer(Tokenizer.from_str(json.dumps(data)), config)


def compute_bounds_stats(proprio: np.ndarray, actions: np.ndarray) -> dict[str, np.ndarray]:
    """OFT's BOUNDS_Q99 statistics of training frames (proprio [N, P], actions [N, A]): per
    dimension the 1st and 99th percentiles and a mask. A dimension whose percentiles coincide
    (a constant, e.g. a gripper the data never moves) is left unnormalized (mask False) rather
    than divided by ~0."""
    out = {}
    for name, x in (("proprio", proprio), ("action", actions)):
        x = np.asarray(x, dtype=np.float64)
        if x.ndim != 2 or len(x) == 0 or not np.isfinite(x).all():
            raise ValueError(f"{name} must be a finite [N, D] array with N > 0, got shape {x.shape}")
        q01, q99 = np.quantile(x, 0.01, axis=0), np.quantile(x, 0.99, axis=0)
        out[f"{name}_q01"] = q01.astype(np.float32)
        out[f"{name}_q99"] = q99.astype(np.float32)
        out[f"{name}_mask"] = (q99 - q01) > 1e-6
    if len(proprio) != len(actions):
        raise ValueError(f"proprio has {len(proprio)} frames, actions {len(actions)}")
    return out


def images_to_fused_pixels(images: torch.Tensor, config: OFTConfig) -> torch.Tensor:
    """uint8 [B, n_cams, H, W, 3] RGB -> float [B, 6 * n_cams, S, S]: per image the featurizer's
    3 normalized channels, then the fused featurizer's (S = config.image_size; other sizes are
    resized bicubically with antialiasing, as the published processor's bicubic Resize)."""
    if images.dtype != torch.uint8 or images.dim() != 5 or images.shape[-1] != 3:
        raise ValueError(f"images must be uint8 [B, n_cams, H, W, 3], got {images.dtype} {tuple(images.shape)}")
    b, n, h, w, _ = images.shape
    s = config.image_size
    x = images.reshape(b * n, h, w, 3).permute(0, 3, 1, 2).float().div_(255.0)
    if (h, w) != (s, s):
        x = F.interpolate(x, size=(s, s), mode="bicubic", align_corners=False, antialias=True).clamp_(0, 1)
    towers = []
    for tower in (config.featurizer, config.fused_featurizer):
        mean = torch.tensor(tower.mean, device=x.device).view(1, 3, 1, 1)
        std = torch.tensor(tower.std, device=x.device).view(1, 3, 1, 1)
        towers.append((x - mean) / std)
    return torch.cat(towers, dim=1).reshape(b, n * 6, s, s)


def normalize_bounds_q99(x: torch.Tensor, q01: torch.Tensor, q99: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """The published proprio normalization: [q01, q99] -> [-1, 1], clipped, where mask."""
    scaled = (2 * (x - q01) / (q99 - q01 + BOUNDS_EPS) - 1).clamp(-1.0, 1.0)
    return torch.where(mask, scaled, x.clamp(-1.0, 1.0))


def unnormalize_bounds_q99(a: torch.Tensor, q01: torch.Tensor, q99: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """The published action unnormalization: [-1, 1] -> [q01, q99] where mask, else unchanged."""
    return torch.where(mask, 0.5 * (a + 1) * (q99 - q01 + BOUNDS_EPS) + q01, a)
