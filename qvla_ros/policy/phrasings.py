"""Several phrasings per task for training: each sampled frame's instruction is replaced by one of
its task's training phrasings, so the policy learns the task from the meaning, not one sentence.

    TRAINING_PHRASINGS[canonical instruction] = (canonical, other phrasings...)
    table = PhrasingTable(data.instructions, tokenizer, max_tokens, TRAINING_PHRASINGS)
    ids, mask = table.sample(instr, generator)     # training batches
    ids, mask = table.canonical(instr)             # validation: the episode's own sentence

The keys are the benchmark suite's sentences (processing_vla.DEFAULT_INSTRUCTIONS, language-world's
verbatim), so the lists are policy data and need no simulation import; an instruction without a
list (LIBERO's) keeps its one sentence.

Held out: qvla_ros.sim.perturb.HELD_OUT_INSTRUCTIONS are the phrasings the robustness test
(`qvla eval --perturb rephrase`) tells a policy, promised to be phrasings training never used.
These lists therefore contain none of them, and none of the words those phrasings introduce
(drag, out, shut, move, sash, side, rotate, tap, swing, press, lift): a policy that follows a
held-out phrasing must get there from known words and the subword pieces of unknown ones.
test/test_policy_phrasings.py checks both.
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch

#: canonical sentence -> its training phrasings, the canonical one first. The faucet pair differs
#: only in direction words: "left" / "on" / "open" against "right" / "off" / "close".
TRAINING_PHRASINGS: dict[str, tuple[str, ...]] = {
    "pull the drawer open": (
        "pull the drawer open", "open the drawer", "pull open the drawer", "pull the drawer toward you",
        "slide the drawer open", "get the drawer open"),
    "push the drawer close": (
        "push the drawer close", "close the drawer", "push the drawer in", "push the drawer closed",
        "slide the drawer closed", "push in the drawer"),
    "slide the window open": (
        "slide the window open", "open the window", "slide open the window", "push the window open",
        "slide the window to open it", "open up the window"),
    "slide the window closed": (
        "slide the window closed", "close the window", "slide the window to close it", "push the window closed",
        "slide the window back", "close up the window"),
    "turn the faucet left": (
        "turn the faucet left", "turn the faucet on", "turn on the faucet", "twist the faucet handle left",
        "open the faucet", "turn the faucet handle to the left"),
    "turn the faucet right": (
        "turn the faucet right", "turn the faucet off", "turn off the faucet", "twist the faucet handle right",
        "close the faucet", "turn the faucet handle to the right"),
    "pull the door open": (
        "pull the door open", "open the door", "pull open the door", "pull the door toward you",
        "open the door by pulling it", "pull the door wide open"),
    "push the door closed to the target location": (
        "push the door closed to the target location", "close the door", "push the door closed",
        "push the door back closed", "close the door all the way", "push the door to close it"),
    "push down the handle": (
        "push down the handle", "push the handle down", "lower the handle", "push the lever down",
        "bring the handle down", "push the handle all the way down"),
    "pull up the handle": (
        "pull up the handle", "pull the handle up", "raise the handle", "pull the lever up",
        "bring the handle up", "pull the handle all the way up"),
}


class PhrasingTable:
    """Every phrasing of a dataset's instructions, tokenized once, to sample from on the device.

    Args:
        instructions: the dataset's distinct instructions (ChunkData.instructions); frame
            instruction indices point into this list.
        tokenizer: has `encode(texts, max_tokens) -> (ids, mask)` (either architecture's).
        max_tokens: the policy's max_text_tokens.
        phrasings: canonical sentence -> phrasings; None or {} keeps each instruction's own sentence.
        device: where the token tensors live (the training batch's device).
    """

    def __init__(self, instructions: Sequence[str], tokenizer, max_tokens: int,
                 phrasings: Mapping[str, Sequence[str]] | None = None, device: str | torch.device = "cpu"):
        phrasings = phrasings or {}
        texts, offsets, counts = [], [], []
        for text in instructions:
            # The episode's own sentence always first (canonical() reads row offsets[i]).
            options = [text, *(p for p in phrasings.get(text, ()) if p != text)]
            offsets.append(len(texts))
            counts.append(len(options))
            texts.extend(options)
        if not texts:
            raise ValueError("no instructions to phrase")
        self.texts = texts
        ids, mask = tokenizer.encode(texts, max_tokens)
        self.ids, self.mask = ids.to(device), mask.to(device)
        self.offsets = torch.tensor(offsets, dtype=torch.long, device=device)
        self.counts = torch.tensor(counts, dtype=torch.long, device=device)

    def sample(self, instr: torch.Tensor, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        """(ids, mask) [B, max_tokens]: for each frame's instruction index a uniformly drawn phrasing.
        The draw comes from `generator` (CPU), so a resumed run continues the same sequence."""
        u = torch.rand(len(instr), generator=generator).to(self.ids.device)
        instr = instr.to(self.ids.device)
        count = self.counts[instr]
        row = self.offsets[instr] + torch.minimum((u * count).long(), count - 1)
        return self.ids[row], self.mask[row]

    def canonical(self, instr: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(ids, mask) of each frame's own instruction sentence."""
        row = self.offsets[instr.to(self.ids.device)]
        return self.ids[row], self.mask[row]


def all_training_texts(instructions: Sequence[str], phrasings: Mapping[str, Sequence[str]] | None) -> list[str]:
    """Every sentence a run trains on (for a tokenizer's vocabulary), in a fixed order."""
    phrasings = phrasings or {}
    out = []
    for text in instructions:
        for p in (text, *phrasings.get(text, ())):
            if p not in out:
                out.append(p)
    return out
