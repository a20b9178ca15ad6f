"""Input processing of the VLA policy: the instruction tokenizer, image conversion and the
normalization statistics that the checkpoint carries.

No model hub is reachable, so the tokenizer is trained here: a word-level vocabulary over the
suite's instructions (the `tokenizers` library), with [UNK] for words it never saw. It ships with
the checkpoint as tokenizer.json.
"""
from __future__ import annotations

from collections.abc import Iterable, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from tokenizers import Tokenizer, models, normalizers, pre_tokenizers

PAD_TOKEN = "[PAD]"
UNK_TOKEN = "[UNK]"
SPECIAL_TOKENS = (PAD_TOKEN, UNK_TOKEN)

# Standard deviations below this are treated as this (a constant dimension, such as a gripper
# that never moves in the data, must not blow up the normalized values).
MIN_STD = 1e-2


class InstructionTokenizer:
    """Word-level tokenizer: lower-cased words and punctuation -> ids; [PAD]=0, [UNK]=1."""

    def __init__(self, tokenizer: Tokenizer):
        vocab = tokenizer.get_vocab()
        for token in SPECIAL_TOKENS:
            if token not in vocab:
                raise ValueError(f"tokenizer has no {token} token")
        self._tok = tokenizer
        self.pad_id = vocab[PAD_TOKEN]
        self.unk_id = vocab[UNK_TOKEN]

    @classmethod
    def train(cls, instructions: Iterable[str]) -> "InstructionTokenizer":
        """A vocabulary of every word in `instructions` (sorted, so the same set gives the same ids)."""
        tok = cls._empty()
        words = set()
        for text in instructions:
            if not isinstance(text, str):
                raise ValueError(f"instructions must be strings, got {type(text).__name__}")
            words.update(w for w, _ in tok.pre_tokenizer.pre_tokenize_str(tok.normalizer.normalize_str(text)))
        vocab = {t: i for i, t in enumerate(SPECIAL_TOKENS)}
        for word in sorted(words):
            vocab.setdefault(word, len(vocab))
        tok.model = models.WordLevel(vocab=vocab, unk_token=UNK_TOKEN)
        return cls(tok)

    @staticmethod
    def _empty() -> Tokenizer:
        tok = Tokenizer(models.WordLevel(vocab={t: i for i, t in enumerate(SPECIAL_TOKENS)},
                                         unk_token=UNK_TOKEN))
        tok.normalizer = normalizers.Sequence([normalizers.NFD(), normalizers.StripAccents(),
                                               normalizers.Lowercase()])
        tok.pre_tokenizer = pre_tokenizers.Whitespace()
        return tok

    @classmethod
    def from_str(cls, text: str) -> "InstructionTokenizer":
        try:
            tok = Tokenizer.from_str(text)
        except Exception as exc:  # the tokenizers library raises a bare Exception on bad JSON
            raise ValueError(f"not a valid tokenizer.json: {exc}") from None
        return cls(tok)

    def to_str(self) -> str:
        return self._tok.to_str()

    @property
    def vocab_size(self) -> int:
        return self._tok.get_vocab_size()

    def tokenize(self, text: str) -> list[str]:
        return self._tok.encode(text).tokens

    def encode(self, texts: Sequence[str], max_tokens: int) -> tuple[torch.Tensor, torch.Tensor]:
        """ids int64 [B, max_tokens] (padded with [PAD], truncated) and mask bool [B, max_tokens]."""
        if isinstance(texts, str) or not all(isinstance(t, str) for t in texts):
            raise ValueError("instruction must be a list of strings, one per batch element")
        ids = torch.full((len(texts), max_tokens), self.pad_id, dtype=torch.long)
        for row, enc in enumerate(self._tok.encode_batch(list(texts))):
            seq = enc.ids[:max_tokens]
            ids[row, :len(seq)] = torch.tensor(seq, dtype=torch.long)
        return ids, ids != self.pad_id

    def decode(self, ids: Sequence[int]) -> str:
        return self._tok.decode([int(i) for i in ids if int(i) != self.pad_id])


def check_raw_inputs(images, instruction, proprio, n_cams: int, proprio_dim: int) -> int:
    """Checks the policy contract's raw inputs (images uint8 [B, n_cams, H, W, 3], B instruction
    strings, proprio [B, proprio_dim]) and returns B; ValueError names what is wrong."""
    if not isinstance(images, torch.Tensor) or images.dtype != torch.uint8 or images.dim() != 5 \
            or images.shape[1] != n_cams or images.shape[-1] != 3:
        got = f"{images.dtype} {tuple(images.shape)}" if isinstance(images, torch.Tensor) else type(images).__name__
        raise ValueError(f"images must be uint8 [B, {n_cams}, H, W, 3], got {got}")
    b = images.shape[0]
    if isinstance(instruction, str) or len(instruction) != b:
        raise ValueError(f"instruction must be a list of {b} strings")
    if not isinstance(proprio, torch.Tensor) or proprio.shape != (b, proprio_dim):
        got = tuple(proprio.shape) if isinstance(proprio, torch.Tensor) else type(proprio).__name__
        raise ValueError(f"proprio must be a float tensor [{b}, {proprio_dim}], got {got}")
    return b


def images_to_pixels(images: torch.Tensor, image_size: int) -> torch.Tensor:
    """uint8 [B, n_cams, H, W, 3] RGB -> float [B * n_cams, 3, S, S] in [-1, 1] (S = image_size).

    Frames of another size are resized bilinearly (antialiased when shrinking).
    """
    if images.dtype != torch.uint8 or images.dim() != 5 or images.shape[-1] != 3:
        raise ValueError(f"images must be uint8 [B, n_cams, H, W, 3], got {images.dtype} {tuple(images.shape)}")
    b, c, h, w, _ = images.shape
    pixels = images.reshape(b * c, h, w, 3).permute(0, 3, 1, 2).float()
    if (h, w) != (image_size, image_size):
        pixels = F.interpolate(pixels, size=(image_size, image_size), mode="bilinear",
                               align_corners=False, antialias=h > image_size or w > image_size)
    return pixels.mul_(2.0 / 255.0).sub_(1.0)


def compute_norm_stats(proprio: np.ndarray, actions: np.ndarray) -> dict[str, np.ndarray]:
    """Per-dimension statistics the policy normalizes with (float32 arrays).

    proprio [N, proprio_dim] and actions [N, action_dim] over all training frames. Actions also
    get their observed range, which bounds the policy's outputs.
    """
    proprio = np.asarray(proprio, dtype=np.float64)
    actions = np.asarray(actions, dtype=np.float64)
    if proprio.ndim != 2 or actions.ndim != 2 or len(proprio) == 0 or len(proprio) != len(actions):
        raise ValueError(f"need proprio [N, P] and actions [N, A] with the same N > 0, got "
                         f"{proprio.shape} and {actions.shape}")
    if not (np.isfinite(proprio).all() and np.isfinite(actions).all()):
        raise ValueError("proprio/actions contain NaN or inf")
    return {
        "proprio_mean": proprio.mean(0).astype(np.float32),
        "proprio_std": np.maximum(proprio.std(0), MIN_STD).astype(np.float32),
        "action_mean": actions.mean(0).astype(np.float32),
        "action_std": np.maximum(actions.std(0), MIN_STD).astype(np.float32),
        "action_min": actions.min(0).astype(np.float32),
        "action_max": actions.max(0).astype(np.float32),
    }


#: The benchmark suite's ten instructions (language-world's sentences, in qvla_ros.sim.suite's task
#: order), the default tokenizer's vocabulary. Policy data, kept here so a policy's vocabulary (and
#: its fingerprint) never depends on whether the simulation stage imports; test_sim_suite checks
#: that they are the suite's.
DEFAULT_INSTRUCTIONS: tuple[str, ...] = (
    "pull the drawer open", "push the drawer close",
    "slide the window open", "slide the window closed",
    "turn the faucet left", "turn the faucet right",
    "pull the door open", "push the door closed to the target location",
    "push down the handle", "pull up the handle",
)


def default_instructions() -> list[str]:
    """The benchmark suite's instructions: the default tokenizer's vocabulary."""
    return list(DEFAULT_INSTRUCTIONS)
