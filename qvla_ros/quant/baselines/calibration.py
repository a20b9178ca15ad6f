"""Calibration batches and the statistics the baselines read from a policy's Linear inputs.

Every baseline sees the policy only through the policy contract: a calibration batch is a dict
{"images": uint8 [B, n_cams, H, W, 3], "instruction": list[str], "proprio": float32 [B, P]}
and `run_policy(policy, batch)` returns the action chunk. The statistics are gathered with
forward pre-hooks on the Linears, so a module called several times per forward (one vision
encoder over several cameras) contributes every call.
"""
from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field

import torch
from torch import nn

BATCH_KEYS = ("images", "instruction", "proprio")


#: frames per calibration forward when batches are cut from CalibrationFrames
DEFAULT_BATCH = 16


def batches_from_frames(frames, batch_size: int = DEFAULT_BATCH) -> list[dict]:
    """Calibration batches cut from the QVLA core's CalibrationFrames (the same frames QVLA uses)."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    images, instructions, proprio = frames.inputs()
    return [{"images": images[i:i + batch_size], "instruction": list(instructions[i:i + batch_size]),
             "proprio": proprio[i:i + batch_size]} for i in range(0, images.shape[0], batch_size)]


def check_batches(batches) -> list[dict]:
    """The calibration batches as a list, each checked for the policy contract's keys.
    CalibrationFrames (qvla_ros.quant.calibration) are cut into batches of DEFAULT_BATCH."""
    if hasattr(batches, "inputs") and hasattr(batches, "images"):
        return batches_from_frames(batches)
    batches = list(batches)
    if not batches:
        raise ValueError("calibration needs at least one batch of frames, got none")
    for i, batch in enumerate(batches):
        missing = [k for k in BATCH_KEYS if k not in batch]
        if missing:
            raise ValueError(f"calibration batch {i} lacks {missing}; a batch is a dict with "
                             f"keys {BATCH_KEYS}")
    return [dict(b) for b in batches]


def stack_batches(batches: Sequence[Mapping]) -> dict | None:
    """All calibration batches as ONE batch (frames concatenated in order), or None when their
    tensors cannot be stacked (different image sizes, say). Under the policy contract each
    frame's actions depend on that frame alone, so one forward of the stacked batch gives every
    Linear the same input rows as the batches' forwards together."""
    if len(batches) == 1:
        return dict(batches[0])
    out = {}
    for key in BATCH_KEYS:
        parts = [b[key] for b in batches]
        if isinstance(parts[0], torch.Tensor):
            if any(not isinstance(t, torch.Tensor) or t.shape[1:] != parts[0].shape[1:]
                   or t.dtype != parts[0].dtype for t in parts):
                return None
            out[key] = torch.cat(parts)
        else:
            out[key] = [item for part in parts for item in part]
    return out


def run_policy(policy: nn.Module, batch: Mapping) -> torch.Tensor:
    """Actions of `policy` on one batch (the policy contract), as float32."""
    return policy(batch["images"], batch["instruction"], batch["proprio"]).float()


@torch.no_grad()
def calibration_actions(policy: nn.Module, batches: Sequence[Mapping]) -> torch.Tensor:
    """Actions of `policy` on every batch, concatenated over frames [frames, horizon, action_dim]:
    what quant.action_error compares (SmoothQuant's alpha is chosen on it)."""
    return torch.cat([run_policy(policy, b) for b in batches])


def input_rows(x: torch.Tensor) -> torch.Tensor:
    """A Linear's input as float32 rows [tokens, in_features] (every leading dimension folded)."""
    return x.detach().reshape(-1, x.shape[-1]).float()


@dataclass
class InputStats:
    """Per-input-channel statistics of one Linear's input over the calibration batches.

    absmax: max |x_j| (SmoothQuant); absmean: mean |x_j| (AWQ); hessian: sum x x^T / n (GPTQ,
    only when asked for); sample: up to `max_samples` input rows kept for layer-output searches.
    """

    absmax: torch.Tensor
    absmean_sum: torch.Tensor
    rows: int = 0
    hessian: torch.Tensor | None = None
    sample: list[torch.Tensor] = field(default_factory=list)
    sample_rows: int = 0

    @property
    def absmean(self) -> torch.Tensor:
        return self.absmean_sum / max(self.rows, 1)

    @property
    def h(self) -> torch.Tensor:
        if self.hessian is None:
            raise ValueError("these statistics were gathered without a Hessian")
        return self.hessian / max(self.rows, 1)

    def sample_tensor(self) -> torch.Tensor:
        return torch.cat(self.sample) if self.sample else torch.zeros(0, self.absmax.numel())


class StopForward(Exception):
    """Raised by a hook once every input a pass needs has been seen (the rest is wasted work)."""


def run_batches(policy: nn.Module, batches: Iterable[Mapping], before_each) -> None:
    """run_policy over every batch, before_each() first (hooks reset their per-forward counts); a
    StopForward from a hook ends that batch's forward early."""
    for batch in batches:
        before_each()
        try:
            run_policy(policy, batch)
        except StopForward:
            pass


class _Collector:
    def __init__(self, in_features: int, hessian: bool, max_samples: int, generator: torch.Generator,
                 stop_after: int | None = None, device: torch.device | str = "cpu"):
        # Statistics live where the layer does: a 7B policy's Hessians accumulate on its GPU.
        self.stats = InputStats(absmax=torch.zeros(in_features, device=device),
                                absmean_sum=torch.zeros(in_features, device=device),
                                hessian=torch.zeros(in_features, in_features, dtype=torch.float64, device=device)
                                if hessian else None)
        self.max_samples = max_samples
        self.gen = generator
        self.stop_after = stop_after
        self.calls = 0

    def __call__(self, module, args):
        self.calls += 1
        x = input_rows(args[0])
        s = self.stats
        s.absmax = torch.maximum(s.absmax, x.abs().amax(0))
        s.absmean_sum += x.abs().sum(0)
        s.rows += x.shape[0]
        if s.hessian is not None:
            # float32 products, float64 running sum: exact enough, and twice as fast on CPU.
            s.hessian += (x.T @ x).double()
        room = self.max_samples - s.sample_rows
        if room > 0:
            # A random subset of rows, so image patches, text and action slots all appear.
            take = x if x.shape[0] <= room else x[torch.randperm(x.shape[0], generator=self.gen)[:room].to(x.device)]
            s.sample.append(take.clone())
            s.sample_rows += take.shape[0]
        if self.stop_after is not None and self.calls >= self.stop_after:
            raise StopForward


@torch.no_grad()
def collect_input_stats(policy: nn.Module, modules: Mapping[str, nn.Linear],
                        batches: Iterable[Mapping], *, hessian: bool = False,
                        max_samples: int = 0, seed: int = 0,
                        stop_after_calls: int | None = None) -> dict[str, InputStats]:
    """Input statistics of each named Linear in `modules` over `batches` (one pass).

    stop_after_calls: with ONE module, end each batch's forward once that module has run this
    many times (its calls per forward, from `forward_order`): the layers after it are not needed.
    """
    if stop_after_calls is not None and len(modules) != 1:
        raise ValueError("stop_after_calls needs exactly one module to watch")
    gen = torch.Generator().manual_seed(seed)
    collectors = {name: _Collector(m.in_features, hessian, max_samples, gen, stop_after_calls, m.weight.device)
                  for name, m in modules.items()}
    handles = [m.register_forward_pre_hook(collectors[name]) for name, m in modules.items()]
    def reset():
        for c in collectors.values():
            c.calls = 0

    try:
        run_batches(policy, batches, reset)
    finally:
        for h in handles:
            h.remove()
    unseen = [n for n, c in collectors.items() if c.stats.rows == 0]
    if unseen:
        raise ValueError(f"these Linears never ran on the calibration batches: {unseen[:5]}")
    return {name: c.stats for name, c in collectors.items()}


@torch.no_grad()
def groups_by_shared_input(policy: nn.Module, modules: Mapping[str, nn.Linear],
                           batch: Mapping) -> list[list[str]]:
    """The Linears in forward order, grouped where they read the very same input tensor (q/k/v
    after one norm, gate/up after another). Sequential methods (GPTQ) handle one group per
    calibration pass, so each group sees the inputs of the already-quantized layers before it."""
    return forward_order(policy, modules, batch)[0]


@torch.no_grad()
def forward_order(policy: nn.Module, modules: Mapping[str, nn.Linear],
                  batch: Mapping) -> tuple[list[list[str]], dict[str, int]]:
    """(groups_by_shared_input, how many times each Linear runs in one forward)."""
    calls: dict[str, int] = {n: 0 for n in modules}
    groups: list[list[str]] = []
    # Only the latest first-call input is held (as the tensor itself, not its id(), so a freed
    # tensor's id cannot be reused by a later, unrelated input): holding every layer's input
    # would keep the whole forward's activations alive, tens of GB for a 7B policy.
    last_input: list[torch.Tensor] = []
    seen: set[str] = set()

    def hook_for(name):
        def hook(module, args):
            calls[name] += 1
            if name not in seen:
                seen.add(name)
                if groups and args[0] is last_input[0]:
                    groups[-1].append(name)
                else:
                    groups.append([name])
                last_input[:] = [args[0]]
        return hook

    handles = [m.register_forward_pre_hook(hook_for(n)) for n, m in modules.items()]
    try:
        run_policy(policy, batch)
    finally:
        for h in handles:
            h.remove()
        last_input.clear()
    missing = [n for n in modules if n not in seen]
    if missing:
        raise ValueError(f"these Linears never ran on the calibration batch: {missing[:5]}")
    return groups, calls
