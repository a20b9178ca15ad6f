"""Action-space sensitivity: S[layer][channel][bits] = E_frames || A(channel at bits) - A* ||^2.

A* is the float policy's action chunk (the contract's output, environment units, all horizon steps
and action dimensions); A(channel c at b bits) is the chunk when only row c of one Linear is
replaced by what the packed layout stores for it at b bits (0 = pruned: the row is zero and the
channel outputs its bias; 16 bits costs 0 by definition). Two estimators, one table format:

* exact (`exact_sensitivity`): really run the perturbed policy. The calibration batch is
  replicated R times and replica r perturbs one (channel, bits) pair through a forward hook that
  adds x @ dW_c^T to output column c, so one forward measures R perturbations. Everything that
  ran before the perturbed layer is replayed from a cache instead of recomputed: the first forward
  records the calls of every module that finished before the layer started (the ViT, the
  projector, the decoder layers before it, ...), and later forwards return those outputs,
  repeated over the replicas. This works on any module tree through hooks; a self-check compares
  the replayed forward with the plain one before any measurement.
* jacobian (`jacobian_sensitivity`): first order in the perturbation. With g = dA/dy (action
  Jacobian at the layer's output y, per token) the change of the chunk is sum_t g_t (x_t . dW_c),
  and ||.||^2 over the action dimensions is estimated with random projections v of the action
  output (Hutchinson: E_v[(v . J u)^2] = ||J u||^2), or exactly with the unit vectors when the chunk
  is small. One backward per projection gives every layer at once; the per-channel value is the
  Gauss-Newton term sum_frames ||J_c dW_c x||^2 (no logits, no layer-local proxy).
"""
from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, Sequence

import numpy as np
import torch
from torch import nn

from ..io import atomic_write
from .accounting import policy_storage
from .calibration import CalibrationFrames
from .quantizer import ALL_BITS, check_bits, fake_quantize_rows
from .targets import QuantTargets, quantizable_linears

SENS_FORMAT = "qvla-sensitivity"
SENS_VERSION = 1


class SensitivityError(ValueError):
    """A sensitivity table is malformed or does not fit the request."""


# ---- the table --------------------------------------------------------------------------------
@dataclass
class SensitivityTable:
    """costs[layer]: float64 [out_features, len(bits)], NaN where a channel was not measured."""
    bits: tuple[int, ...]
    costs: dict[str, np.ndarray]
    in_features: dict[str, int]
    meta: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.bits = tuple(check_bits(b) for b in self.bits)
        if len(set(self.bits)) != len(self.bits):
            raise SensitivityError(f"repeated bit-widths in {self.bits}")
        for name, table in self.costs.items():
            if table.ndim != 2 or table.shape[1] != len(self.bits):
                raise SensitivityError(f"layer {name!r}: costs of shape {table.shape}, expected [channels, {len(self.bits)}]")
            if name not in self.in_features:
                raise SensitivityError(f"layer {name!r} has no in_features")

    def column(self, bits: int) -> int:
        if bits not in self.bits:
            raise SensitivityError(f"the table has no {bits}-bit column (it has {list(self.bits)})")
        return self.bits.index(bits)

    def measured(self, name: str) -> np.ndarray:
        """bool [channels]: channels whose every width was measured."""
        return np.isfinite(self.costs[name]).all(axis=1)

    def save(self, path: str | Path) -> Path:
        from safetensors.numpy import save_file

        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        meta = {"format": SENS_FORMAT, "version": str(SENS_VERSION), "bits": json.dumps(list(self.bits)),
                "in_features": json.dumps(self.in_features), "layers": json.dumps(list(self.costs)),
                "meta": json.dumps(self.meta)}
        atomic_write(path, lambda tmp: save_file({k: np.ascontiguousarray(v, dtype=np.float64) for k, v in self.costs.items()}, str(tmp), metadata=meta))
        return path

    @classmethod
    def load(cls, path: str | Path) -> "SensitivityTable":
        from safetensors import safe_open

        path = Path(path)
        if not path.is_file():
            raise SensitivityError(f"no sensitivity table at {path}")
        try:
            with safe_open(str(path), framework="numpy") as fh:
                meta = fh.metadata() or {}
                if meta.get("format") != SENS_FORMAT:
                    raise SensitivityError(f"{path} is not a {SENS_FORMAT} file")
                if meta.get("version") != str(SENS_VERSION):
                    raise SensitivityError(f"{path} has version {meta.get('version')}, expected {SENS_VERSION}")
                order = json.loads(meta["layers"])
                costs = {k: fh.get_tensor(k) for k in order}
            return cls(tuple(json.loads(meta["bits"])), costs, json.loads(meta["in_features"]),
                       json.loads(meta["meta"]))
        except SensitivityError:
            raise
        except Exception as exc:  # safetensors raises several types for damaged files
            raise SensitivityError(f"{path} is not a readable sensitivity table ({type(exc).__name__}: {exc})") from None


def weight_deltas(weight: torch.Tensor, bits: Sequence[int],
                  round_rows: Callable[[torch.Tensor, int], torch.Tensor] = fake_quantize_rows) -> torch.Tensor:
    """dW [len(bits), N, K] float32: stored weights at each width minus the float weights
    (16 bits -> 0 by definition; 0 bits -> -W). round_rows(W, b) gives the stored rows at a width
    in {2, 3, 4, 8}: round-to-nearest by default, GPTQ's for QVLA with GPTQ rows."""
    w = weight.detach().to(torch.float32)
    out = torch.zeros(len(bits), *w.shape, device=w.device)
    for i, b in enumerate(bits):
        if b == 0:
            out[i] = -w
        elif b != 16:
            out[i] = round_rows(w, b) - w
    return out


def _resolve_layers(policy: nn.Module, layers: Iterable[str] | None, targets: QuantTargets | None) -> dict[str, nn.Linear]:
    try:
        candidates = quantizable_linears(policy, targets)
    except ValueError as exc:       # no layer left to quantize: the table's own error, so the CLI's one line
        raise SensitivityError(f"no quantizable Linear layer: {exc}") from None
    if layers is None:
        return candidates
    modules = dict(policy.named_modules())
    out = {}
    for name in layers:
        if not isinstance(modules.get(name), nn.Linear):
            raise SensitivityError(f"{name!r} is not a Linear layer of the policy")
        out[name] = modules[name]
    return out


def _call_policy(policy: nn.Module, inputs) -> torch.Tensor:
    actions = policy(*inputs)
    if not isinstance(actions, torch.Tensor) or actions.dim() != 3:
        raise SensitivityError("the policy must return an action chunk tensor [B, horizon, action_dim]")
    return actions.float()


# ---- exact estimator: call tracing and replay -------------------------------------------------
@dataclass
class _Call:
    module: nn.Module
    index: int          # k-th call of this module
    start: int
    end: int = -1
    parent: int | None = None  # position in the trace of the enclosing call


def _trace_calls(policy: nn.Module, run: Callable[[], Any]) -> list[_Call]:
    """Every submodule call of one forward, with start/end clock ticks and nesting."""
    calls: list[_Call] = []
    stack: list[int] = []
    counts: dict[int, int] = {}
    clock = [0]

    def pre(module, args):
        clock[0] += 1
        k = counts.get(id(module), 0)
        counts[id(module)] = k + 1
        calls.append(_Call(module, k, clock[0], parent=stack[-1] if stack else None))
        stack.append(len(calls) - 1)

    def post(module, args, output):
        clock[0] += 1
        calls[stack.pop()].end = clock[0]

    handles = []
    for name, module in policy.named_modules():
        if name:
            handles.append(module.register_forward_pre_hook(pre))
            handles.append(module.register_forward_hook(post))
    try:
        with torch.no_grad():
            run()
    finally:
        for h in handles:
            h.remove()
    return calls


def _first_tensor(args, kwargs) -> torch.Tensor | None:
    for value in (*args, *kwargs.values()):
        if isinstance(value, torch.Tensor):
            return value
    return None


def _repeat_batch(obj, rows: int, ratio: int):
    """Repeat every tensor in `obj` whose leading dim is `rows` `ratio` times (replica-major)."""
    if isinstance(obj, torch.Tensor):
        if ratio > 1 and obj.dim() > 0 and obj.shape[0] == rows:
            return obj.repeat(ratio, *([1] * (obj.dim() - 1)))
        return obj.clone()
    if isinstance(obj, tuple) and hasattr(obj, "_fields"):
        return type(obj)(*(_repeat_batch(v, rows, ratio) for v in obj))
    if isinstance(obj, (list, tuple)):
        return type(obj)(_repeat_batch(v, rows, ratio) for v in obj)
    if isinstance(obj, dict):
        # transformers' ModelOutput is an ordered dict subclass built from keyword arguments.
        return type(obj)(**{k: _repeat_batch(v, rows, ratio) for k, v in obj.items()})
    return obj


class _PrefixReplay:
    """Replays, from a cache, every call that finishes before `target` first starts.

    Inside the context, each wrapped module's forward either returns its recorded output
    (repeated over the replicas, detected from its live input's batch size) or runs normally.
    """

    def __init__(self, calls: list[_Call], target: nn.Module):
        starts = [c.start for c in calls if c.module is target]
        if not starts:
            raise SensitivityError("the layer is never called by the policy's forward")
        first = min(starts)
        cacheable = [c.end < first for c in calls]
        maximal = [cacheable[i] and (c.parent is None or not cacheable[c.parent]) for i, c in enumerate(calls)]
        skipped = [False] * len(calls)
        for i, c in enumerate(calls):
            p = c.parent
            while p is not None:
                if maximal[p]:
                    skipped[i] = True
                    break
                p = calls[p].parent
        # per module: the sequence of what its live calls do ("cache" slot or None = run)
        self.plans: dict[int, list[int | None]] = {}
        self.modules: dict[int, nn.Module] = {}
        self.n_slots = 0
        for i, c in enumerate(calls):
            if skipped[i]:
                continue
            slot = None
            if maximal[i]:
                slot = self.n_slots
                self.n_slots += 1
            self.plans.setdefault(id(c.module), []).append(slot)
            self.modules[id(c.module)] = c.module
        self.plans = {k: v for k, v in self.plans.items() if any(s is not None for s in v)}
        self.outputs: list[Any] = [None] * self.n_slots
        self.input_rows: list[int] = [0] * self.n_slots
        self.recording = True
        self._counters: dict[int, int] = {}

    def reset(self) -> None:
        self._counters = {}

    def _wrap(self, key: int, module: nn.Module):
        original = module.forward
        plan = self.plans[key]

        def forward(*args, **kwargs):
            k = self._counters.get(key, 0)
            self._counters[key] = k + 1
            slot = plan[k] if k < len(plan) else None
            if slot is None:
                return original(*args, **kwargs)
            live = _first_tensor(args, kwargs)
            if self.recording:
                out = original(*args, **kwargs)
                self.outputs[slot] = _repeat_batch(out, -1, 1)
                self.input_rows[slot] = live.shape[0] if live is not None and live.dim() else 0
                return out
            rows = self.input_rows[slot]
            ratio = 1
            if live is not None and live.dim() and rows:
                if live.shape[0] % rows:
                    raise SensitivityError("replayed call got a batch that is not a multiple of the recorded one")
                ratio = live.shape[0] // rows
            return _repeat_batch(self.outputs[slot], rows, ratio)

        return forward

    def __enter__(self):
        for key, module in self.modules.items():
            if key in self.plans:
                module.forward = self._wrap(key, module)
        return self

    def __exit__(self, *exc):
        for key, module in self.modules.items():
            if key in self.plans and "forward" in module.__dict__:
                del module.forward


class _ChannelPerturbation:
    """Forward hook on a Linear: replica r of the batch gets x @ dW[r]^T added to column chan[r]."""

    def __init__(self, module: nn.Linear, name: str = "?"):
        self.module = module
        self.name = name
        self.delta_rows: torch.Tensor | None = None   # [R, K]
        self.channels: torch.Tensor | None = None     # [R]
        self.checked = False
        self.handle = module.register_forward_hook(self)

    def __call__(self, module, inputs, output):
        if self.delta_rows is None:
            return output
        x = inputs[0]
        r = self.delta_rows.shape[0]
        if x.shape[0] % r:
            raise SensitivityError(f"layer {self.name}: input batch {x.shape[0]} is not a multiple of {r} replicas")
        n = output.shape[-1]
        xr = x.reshape(r, -1, x.shape[-1]).to(torch.float32)
        if r > 1 and not self.checked:
            # The first call of a forward sees unperturbed inputs: in a replica-major batch every
            # replica's rows are the same. Anything else (cameras stacked before replicas, say)
            # would mix perturbations across replicas.
            self.checked = True
            if not _replicas_match(xr):
                raise SensitivityError(
                    f"layer {self.name}: its input batch is not replica-major (the {r} replicas' rows differ), "
                    "so the exact estimator cannot batch perturbations here; use replicas=1")
        u = torch.einsum("rmk,rk->rm", xr, self.delta_rows)
        out = output.reshape(r, -1, n).clone()
        m = out.shape[1]
        out[torch.arange(r)[:, None], torch.arange(m)[None, :], self.channels[:, None]] += u.to(out.dtype)
        return out.reshape(output.shape)

    def remove(self) -> None:
        self.handle.remove()


def _replicas_match(blocks: torch.Tensor) -> bool:
    """Whether blocks [R, ...] (one per replica of the same frames) hold the same numbers: up to
    the rounding a GEMM may do differently for different rows of one batch, far below the
    difference between two cameras or frames that a wrong layout would put side by side."""
    ref = blocks[0].float()
    tol = (1e-4 if blocks.dtype in (torch.float32, torch.float64) else 2e-2) * float(ref.abs().max()) + 1e-30
    return all(float((blocks[i].float() - ref).abs().max()) <= tol for i in range(1, blocks.shape[0]))


def _prepare_measurement(policy: nn.Module, bits: Sequence[int], layers: Iterable[str] | None,
                         targets: QuantTargets | None, device, dtype: torch.dtype | None
                         ) -> tuple[tuple[int, ...], dict[str, nn.Linear]]:
    """exact_ and jacobian_sensitivity's start: (the checked bits, the layers to measure); the
    policy moved IN PLACE to device / dtype where either is given, and put in eval mode.
    SensitivityError when no layer is left to measure."""
    bits = tuple(check_bits(b) for b in bits)
    if device is not None or dtype is not None:
        policy.to(device=check_device(device), dtype=dtype)
    chosen = _resolve_layers(policy, layers, targets)
    if not chosen:
        raise SensitivityError("the policy has no quantizable Linear layer to measure (check --exclude)")
    policy.eval()
    return bits, chosen


def _default_replicas(frames: int, target_rows: int = 64) -> int:
    return max(1, target_rows // max(frames, 1))


def exact_sensitivity(policy: nn.Module, frames: CalibrationFrames, *, bits: Sequence[int] = ALL_BITS,
                      layers: Iterable[str] | None = None, targets: QuantTargets | None = None,
                      channels: Mapping[str, np.ndarray] | None = None, max_channels: int | None = None,
                      replicas: int | None = None, seed: int = 0, progress: bool = True,
                      check_tolerance: float = 1e-4, device: str | torch.device | None = None,
                      dtype: torch.dtype | None = None) -> SensitivityTable:
    """Measure S by running the perturbed policy (see the module docstring).

    channels / max_channels: measure only these channels (or a seeded random subset of this size
    per layer); the others are NaN. replicas: perturbations per forward (default: 64 rows / frames);
    with more than one, every perturbed layer checks that its input batch really is replica-major
    (the replicas' rows identical) and refuses otherwise; replicas=1 assumes no layout at all.
    device, dtype: as in jacobian_sensitivity (the policy is moved in place). One layer's weight
    deltas exist at a time.
    """
    from tqdm.auto import tqdm

    bits, chosen = _prepare_measurement(policy, bits, layers, targets, device, dtype)
    inputs = frames.inputs()
    f = len(frames)
    r_max = replicas or _default_replicas(f)
    rng = np.random.default_rng(seed)
    with torch.no_grad():
        reference = _call_policy(policy, inputs)
    calls = _trace_calls(policy, lambda: policy(*inputs))
    measured_bits = [i for i, b in enumerate(bits) if b != 16]
    plan = {}
    for name, module in chosen.items():
        n = module.out_features
        if channels is not None and name in channels:
            idx = np.asarray(channels[name], dtype=np.int64)
        elif max_channels is not None and max_channels < n:
            idx = np.sort(rng.choice(n, size=max_channels, replace=False))
        else:
            idx = np.arange(n)
        plan[name] = idx
    total = sum(len(idx) * len(measured_bits) for idx in plan.values())
    costs: dict[str, np.ndarray] = {}
    checks: dict[str, float] = {}
    started = time.time()
    bar = tqdm(total=total, desc="exact sensitivity", unit="pert", disable=not progress)
    for name, module in chosen.items():
        table = np.full((module.out_features, len(bits)), np.nan)
        idx = plan[name]
        table[idx, :] = 0.0
        deltas = weight_deltas(module.weight, bits)
        pairs = [(c, bi) for c in idx.tolist() for bi in measured_bits]
        replay = _PrefixReplay(calls, module)
        hook = _ChannelPerturbation(module, name)
        try:
            with torch.no_grad(), replay:
                replay.reset()
                _call_policy(policy, inputs)          # records the prefix
                replay.recording = False
                replay.reset()
                check = _call_policy(policy, inputs)  # replayed, unperturbed
                err = float((check - reference).abs().max())
                checks[name] = err
                if err > check_tolerance * max(1.0, float(reference.abs().max())):
                    raise SensitivityError(f"layer {name}: replaying the cached prefix changes the actions by "
                                           f"{err:.3g}; the policy's forward is not replayable")
                for start in range(0, len(pairs), r_max):
                    chunk = pairs[start:start + r_max]
                    r = len(chunk)
                    hook.channels = torch.tensor([c for c, _ in chunk], device=deltas.device)
                    hook.delta_rows = torch.stack([deltas[bi, c] for c, bi in chunk])
                    hook.checked = False
                    replay.reset()
                    out = _call_policy(policy, frames.inputs(r)).reshape(r, f, *reference.shape[1:])
                    err2 = (out - reference.unsqueeze(0)).pow(2).sum(dim=(-1, -2)).mean(dim=1).double().cpu().numpy()
                    for (c, bi), value in zip(chunk, err2):
                        table[c, bi] = value
                    bar.update(r)
        finally:
            hook.remove()
        del deltas
        costs[name] = table
    bar.close()
    meta = {"estimator": "exact", "frames": f, "calibration": frames.source, "replicas": r_max,
            "seconds": round(time.time() - started, 2), "replay_max_abs_error": max(checks.values(), default=0.0),
            "policy": _policy_fingerprint(policy),
            "storage": policy_storage(policy)}
    return SensitivityTable(bits, costs, {n: m.in_features for n, m in chosen.items()}, meta)


def _policy_fingerprint(policy: nn.Module) -> dict[str, Any]:
    from .plan import model_fingerprint

    return model_fingerprint(policy)


# ---- jacobian estimator -----------------------------------------------------------------------
class _JacobianTap:
    """Hooks on one Linear for the one-frame-at-a-time Jacobian pass.

    The frame runs as R identical replicas, replica r carrying projection v_r in the backward.
    Forward (every call of the layer): the layer's weight change at each width, dW [nb, N, K], is
    made on the layer's device, turned into the change of this call's output for one replica,
    dy = x_0 dW^T [nb, M, N] (kept until the frame's backward passes are done), and freed, so
    one layer's weight deltas exist at a time. The batch layout is checked, not assumed: the
    call's input must split into R identical replica blocks, else the layer is named and refused.
    Backward: each call adds, per replica, sum over its rows of (dA/dy . dy) to `linear`
    [N, nb, R]; summing over ALL calls before squaring is what makes a layer called several times
    per forward (an encoder run once per camera) exact to first order. One frame per forward
    means every row of a replica belongs to that frame.
    """

    def __init__(self, name: str, module: nn.Linear, deltas: Callable[[], torch.Tensor], n_bits: int,
                 store_dtype: torch.dtype):
        self.name = name
        self.module = module
        self.deltas = deltas
        self.n_bits = n_bits
        self.store_dtype = store_dtype
        self.acc = torch.zeros(module.out_features, n_bits, dtype=torch.float64, device=module.weight.device)
        self.linear: torch.Tensor | None = None
        self.replicas = 1
        self.check_layout = True
        self.calls = 0
        #: called once per frame, when this layer's weight changes for the frame are done (progress)
        self.on_measured: Callable[[], None] = lambda: None
        self.handle = module.register_forward_hook(self.forward_hook)

    def forward_hook(self, module, inputs, output):
        self.calls += 1
        r = self.replicas
        x = inputs[0].detach()
        rows = x.reshape(-1, x.shape[-1])
        if rows.shape[0] % r:
            raise SensitivityError(f"layer {self.name}: input of {rows.shape[0]} rows does not split into "
                                   f"{r} replicas")
        blocks = rows.reshape(r, -1, rows.shape[-1])
        if self.check_layout and r > 1 and not _replicas_match(blocks):
            raise SensitivityError(
                f"layer {self.name}: its input is not replica-major (the {r} replicas' rows differ), so "
                "projections cannot share one forward here; use replicas=1 (--replicas 1)")
        dw = self.deltas()                                                       # [nb, N, K]
        # dy^T [N, nb, M], channel-major so the backward's contraction over rows is one bmm
        # a bf16 policy's dy is kept in bf16 anyway: compute it there (tensor cores), else in fp32+
        low = x.dtype in (torch.bfloat16, torch.float16)
        work = x.dtype if low else torch.promote_types(dw.dtype, x.dtype)
        dy = torch.matmul(dw.to(work), blocks[0].to(work).T).transpose(0, 1).contiguous().to(self.store_dtype)
        del dw
        if not output.requires_grad:
            output = output.detach().requires_grad_(True)

        def grad_hook(grad, dy=dy):
            g = grad.detach().reshape(r, -1, grad.shape[-1]).permute(2, 1, 0).to(dy.dtype).contiguous()  # [N, M, R]
            part = torch.bmm(dy, g).float()                                                  # [N, nb, R]
            self.linear = part if self.linear is None else self.linear + part

        output.register_hook(grad_hook)
        if self.calls == 1:
            self.on_measured()
        return output

    def end_projections(self) -> None:
        """After one backward: square each replica's summed first-order change and add it up."""
        if self.linear is not None:
            self.acc += self.linear.double().pow(2).sum(dim=2)
        self.linear = None

    def remove(self) -> None:
        self.handle.remove()


def _rtn_deltas(module: nn.Linear, bits: Sequence[int], dtype: torch.dtype = torch.float32
                ) -> Callable[[], torch.Tensor]:
    return lambda: weight_deltas(module.weight, bits).to(dtype)


def jacobian_sensitivity(policy: nn.Module, frames: CalibrationFrames, *, bits: Sequence[int] = ALL_BITS,
                         layers: Iterable[str] | None = None, targets: QuantTargets | None = None,
                         projections: int | None = None, replicas: int | None = None, seed: int = 0,
                         deltas: Mapping[str, torch.Tensor] | None = None,
                         device: str | torch.device | None = None, dtype: torch.dtype | None = None,
                         progress: bool = True) -> SensitivityTable:
    """First-order estimate of S from action-space Jacobians (see the module docstring).

    Streams: frames run one at a time; within a frame's forward each layer's weight deltas are
    made on the device, used and freed before the next layer's (only the output changes dy, in
    the policy's dtype, wait for the backward passes). Peak memory: the policy, one frame's
    activations and dy, one layer's deltas.

    projections: random Gaussian projections of the action chunk per frame; None uses the unit
        vectors (exact first order) when the chunk has at most 64 numbers, else 16 random ones.
    replicas: projections per backward pass (default: all of them, up to 64). The frame runs
        once as that many replicas; further blocks of projections are further backward passes
        over the retained graph. Memory grows with it: a 7B policy takes 1-4.
    deltas: per layer, the weight change dW [len(bits), N, K] each width makes (default: the
        project's round-to-nearest, made per layer on the fly); another rounding (GPTQ's) passes
        its own, so S measures the rows that will actually be stored.
    device, dtype: where and in which dtype to run; the policy is moved IN PLACE (a 7B policy
        is not copied). None keeps the policy where and as it is.
    """
    from tqdm.auto import tqdm

    bits, chosen = _prepare_measurement(policy, bits, layers, targets, device, dtype)
    f_total = len(frames)
    measured = [i for i, b in enumerate(bits) if b != 16]
    measured_bits = [bits[i] for i in measured]
    with torch.no_grad():
        probe = _call_policy(policy, frames.select([0]).inputs())
    d = int(np.prod(probe.shape[1:]))
    basis = projections is None and d <= 64
    p = d if basis else (projections or 16)
    if p < 1:
        raise SensitivityError(f"projections must be >= 1, got {p}")
    gen = torch.Generator().manual_seed(seed)
    if deltas is not None:
        missing = [n for n in chosen if n not in deltas]
        wrong = [n for n, m in chosen.items() if n in deltas
                 and tuple(deltas[n].shape) != (len(bits), m.out_features, m.in_features)]
        if missing or wrong:
            raise SensitivityError(f"deltas must hold [{len(bits)}, out, in] for every layer; missing "
                                   f"{missing[:3]}, wrongly shaped {wrong[:3]}")
    store = _floating_dtype(policy)
    taps = {}
    for name, m in chosen.items():
        if deltas is None:
            make = _rtn_deltas(m, measured_bits)
        else:
            make = (lambda t=deltas[name], dev=m.weight.device: t[measured].to(dev, torch.float32))
        taps[name] = _JacobianTap(name, m, make, len(measured), store)
    grads = {prm: prm.requires_grad for prm in policy.parameters()}
    started = time.time()
    calls_per_forward: dict[str, int] = {}
    try:
        for prm in policy.parameters():
            prm.requires_grad_(False)
        r = max(1, min(p, replicas or 64))
        blocks = [(s, min(s + r, p)) for s in range(0, p, r)]
        # Counted in layers (one layer of one frame each), as each layer's weight changes are made
        # inside the frame's forward: at 7B a frame takes seconds, and time left needs a finer unit.
        bar = tqdm(total=f_total * len(taps), desc="jacobian sensitivity", unit="layer", disable=not progress)
        for tap in taps.values():
            tap.on_measured = lambda: bar.update(1)
        for f in range(f_total):
            bar.set_postfix_str(f"frame {f + 1}/{f_total}", refresh=False)
            for tap in taps.values():
                tap.calls, tap.replicas, tap.check_layout = 0, r, f == 0
            with torch.enable_grad():
                actions = _call_policy(policy, frames.select([f]).inputs(r)).reshape(r, d)
            if f == 0:
                calls_per_forward = {n: t.calls for n, t in taps.items()}
                never = [n for n, c in calls_per_forward.items() if c == 0]
                if never:
                    raise SensitivityError(f"these layers never run in the policy's forward: {never[:3]}")
                if not actions.requires_grad:
                    raise SensitivityError("the actions do not depend on any measured layer's output")
            if basis:
                vs = torch.eye(d, device=actions.device)
            else:
                vs = torch.randn(p, d, generator=gen).to(actions.device)
            for j, (s, e) in enumerate(blocks):
                v = torch.zeros(r, d, device=actions.device)
                v[:e - s] = vs[s:e]     # a last, partial block leaves its spare replicas at zero
                actions.backward(v, retain_graph=j < len(blocks) - 1)
                for tap in taps.values():
                    tap.end_projections()
            del actions
        bar.close()
    finally:
        for tap in taps.values():
            tap.remove()
        for prm, flag in grads.items():
            prm.requires_grad_(flag)
    scale = 1.0 / f_total if basis else 1.0 / (f_total * p)
    costs = {}
    for name, tap in taps.items():
        table = np.zeros((tap.module.out_features, len(bits)))
        table[:, measured] = (tap.acc * scale).cpu().numpy()
        costs[name] = table
    meta = {"estimator": "jacobian", "frames": f_total, "calibration": frames.source,
            "projections": "unit vectors (exact first order)" if basis else f"{p} gaussian",
            "replicas": r, "calls_per_forward": {n: c for n, c in calls_per_forward.items() if c != 1},
            "device": str(probe.device), "dtype": str(store).replace("torch.", ""),
            "seconds": round(time.time() - started, 2), "policy": _policy_fingerprint(policy),
            "storage": policy_storage(policy)}
    return SensitivityTable(bits, costs, {n: m.in_features for n, m in chosen.items()}, meta)


def _floating_dtype(policy: nn.Module) -> torch.dtype:
    for prm in policy.parameters():
        if prm.is_floating_point():
            return prm.dtype
    return torch.float32


def check_device(device: str | torch.device | None) -> torch.device | None:
    """The device, or a SensitivityError that names it when it does not exist here."""
    if device is None:
        return None
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as exc:
        raise SensitivityError(f"unknown device {device!r}: {exc}") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise SensitivityError(f"device {device!r} asked for, but CUDA is not available on this machine")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise SensitivityError(f"device {device!r} asked for, but this machine has "
                                   f"{torch.cuda.device_count()} CUDA device(s)")
    elif dev.type != "cpu":
        raise SensitivityError(f"device {device!r}: only cpu and cuda are supported")
    return dev


# ---- comparison -------------------------------------------------------------------------------
def spearman(a: np.ndarray, b: np.ndarray) -> float:
    """Spearman rank correlation of two 1-D arrays (average ranks for ties)."""
    from scipy.stats import spearmanr

    a, b = np.asarray(a).ravel(), np.asarray(b).ravel()
    keep = np.isfinite(a) & np.isfinite(b)
    if keep.sum() < 3:
        return math.nan
    return float(spearmanr(a[keep], b[keep]).statistic)


def compare_tables(reference: SensitivityTable, estimate: SensitivityTable) -> dict[str, Any]:
    """Spearman rank agreement of `estimate` with `reference` on the entries both measured:
    overall, per layer, per width, and of the channel order inside each layer at each width."""
    common = [b for b in reference.bits if b in estimate.bits and b != 16]
    per_layer, per_bits_vals = {}, {b: ([], []) for b in common}
    all_ref, all_est, within = [], [], {b: [] for b in common}
    for name in reference.costs:
        if name not in estimate.costs:
            continue
        ref = reference.costs[name][:, [reference.column(b) for b in common]]
        est = estimate.costs[name][:, [estimate.column(b) for b in common]]
        keep = np.isfinite(ref).all(axis=1) & np.isfinite(est).all(axis=1)
        if not keep.any():
            continue
        per_layer[name] = spearman(ref[keep], est[keep])
        all_ref.append(ref[keep].ravel())
        all_est.append(est[keep].ravel())
        for j, b in enumerate(common):
            per_bits_vals[b][0].append(ref[keep, j])
            per_bits_vals[b][1].append(est[keep, j])
            within[b].append(spearman(ref[keep, j], est[keep, j]))
    return {
        "overall": spearman(np.concatenate(all_ref), np.concatenate(all_est)) if all_ref else math.nan,
        "per_layer": per_layer,
        "per_bits": {b: spearman(np.concatenate(v[0]), np.concatenate(v[1])) for b, v in per_bits_vals.items() if v[0]},
        "within_layer_median_per_bits": {b: float(np.nanmedian(v)) for b, v in within.items() if v},
        "entries": int(sum(len(a) for a in all_ref)),
    }


def rescale_to_exact(estimate: SensitivityTable, exact: SensitivityTable,
                     estimate_on_exact_frames: SensitivityTable | None = None,
                     min_channels: int = 3) -> SensitivityTable:
    """The `estimate` table with each (layer, width) column scaled by the median ratio exact/estimate
    over the channels `exact` measured there ("hybrid" estimator).

    The ratio must compare like with like: when `exact` was measured on fewer frames than
    `estimate`, pass the estimator's table on those same frames as `estimate_on_exact_frames`.
    Inside a layer and width the channel order of `estimate` is kept; what the exact sample
    corrects is the scale between layers and widths, which is what the global allocation trades.
    """
    same = estimate_on_exact_frames if estimate_on_exact_frames is not None else estimate
    costs, factors = {}, {}
    for name, table in estimate.costs.items():
        out = table.copy()
        if name in exact.costs and name in same.costs:
            for j, b in enumerate(estimate.bits):
                if b == 16 or b not in exact.bits or b not in same.bits:
                    continue
                ref = exact.costs[name][:, exact.column(b)]
                est = same.costs[name][:, same.column(b)]
                keep = np.isfinite(ref) & np.isfinite(est) & (est > 0) & (ref > 0)
                if keep.sum() >= min_channels:
                    factor = float(np.median(ref[keep] / est[keep]))
                    out[:, j] = table[:, j] * factor
                    factors[f"{name}@{b}"] = factor
        costs[name] = out
    meta = dict(estimate.meta)
    meta.update({"estimator": f"{estimate.meta.get('estimator', '?')}+exact-rescaled",
                 "rescale_factors": factors, "exact_meta": {k: v for k, v in exact.meta.items() if k != "policy"}})
    return SensitivityTable(estimate.bits, costs, dict(estimate.in_features), meta)


# ---- the layer-local proxy (for comparison only) ----------------------------------------------
def layer_local_sensitivity(policy: nn.Module, frames: CalibrationFrames, *, bits: Sequence[int] = ALL_BITS,
                            layers: Iterable[str] | None = None, targets: QuantTargets | None = None,
                            batch: int = 16) -> SensitivityTable:
    """E over frames of ||x dW_c^T||^2 summed over tokens: the channel's own output error, blind to
    what the rest of the policy does with it (the kind of layer-local reconstruction proxy that
    LLM quantizers and QVLA's released code rank channels by). A baseline for the benchmark, not
    an estimator of the action cost."""
    bits = tuple(check_bits(b) for b in bits)
    chosen = _resolve_layers(policy, layers, targets)
    grams = {name: torch.zeros(m.in_features, m.in_features, dtype=torch.float64) for name, m in chosen.items()}

    def hook_for(name):
        def hook(module, inputs, output):
            x = inputs[0].detach().reshape(-1, inputs[0].shape[-1]).double()
            grams[name] += x.T @ x
        return hook

    handles = [m.register_forward_hook(hook_for(n)) for n, m in chosen.items()]
    started = time.time()
    try:
        with torch.no_grad():
            for s in range(0, len(frames), batch):
                policy(*frames.select(range(s, min(s + batch, len(frames)))).inputs())
    finally:
        for h in handles:
            h.remove()
    costs = {}
    for name, module in chosen.items():
        deltas = weight_deltas(module.weight, bits).double()
        costs[name] = (torch.einsum("bnk,kj,bnj->nb", deltas, grams[name], deltas) / len(frames)).numpy()
    meta = {"estimator": "layer-local", "frames": len(frames), "calibration": frames.source,
            "seconds": round(time.time() - started, 2), "policy": _policy_fingerprint(policy),
            "storage": policy_storage(policy)}
    return SensitivityTable(bits, costs, {n: m.in_features for n, m in chosen.items()}, meta)


# ---- validation that can fail: rank agreement inside each layer and width, against a null ------
def _ranks(values: np.ndarray) -> np.ndarray:
    from scipy.stats import rankdata

    return rankdata(values).astype(np.float64)


def _top_mask(values: np.ndarray, k: int) -> np.ndarray:
    """bool mask of the k largest entries (ties broken by position, so exactly k are True)."""
    order = np.argsort(-values, kind="stable")
    mask = np.zeros(values.shape[0], dtype=bool)
    mask[order[:k]] = True
    return mask


def _row_pearson(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Pearson correlation of a [n] with each row of b [draws, n] (NaN where a row is constant)."""
    a = a - a.mean()
    b = b - b.mean(axis=1, keepdims=True)
    den = np.sqrt((a * a).sum() * (b * b).sum(axis=1))
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(den > 0, (b @ a) / den, np.nan)


def rank_agreement(reference: SensitivityTable, estimate: SensitivityTable, *, top: float = 0.10,
                   null_draws: int = 200, seed: int = 0, min_channels: int = 8) -> dict[str, Any]:
    """How well `estimate` orders the channels of each layer at each width like `reference` does,
    beside what a random channel order scores (the null).

    Per (layer, width) cell, over the channels both tables measured there (at least
    `min_channels`, else the cell is left out):
      spearman: rank correlation of the two cost columns;
      overlap: |top_ref & top_est| / k, the share of the reference's k = ceil(top * n) costliest
        channels that the estimate also puts in its top k;
      null: the same two statistics for `null_draws` random permutations of the estimate's values
        over those channels (seeded): mean, 95th percentile, and the permutation p-value
        (1 + #draws scoring at least the observed) / (1 + draws);
      beats_null: the statistic is strictly above the null's 95th percentile (a random order does
        this in at most ~5% of cells).
    Widths at 16 bits (cost 0 by definition) are skipped. Pooling channels of different layers
    and widths into one Spearman is NOT a check: the scale between layers and widths alone makes a
    random within-cell order score high, so the summary reports the pooled figure beside its null
    (channel order randomized inside every cell, scales kept) only to show that.
    """
    if not 0 < top <= 1:
        raise SensitivityError(f"top must be in (0, 1], got {top}")
    if null_draws < 1:
        raise SensitivityError(f"null_draws must be >= 1, got {null_draws}")
    rng = np.random.default_rng(seed)
    common = [b for b in reference.bits if b in estimate.bits and b != 16]
    cells: dict[str, dict[int, dict[str, Any]]] = {}
    pooled_ref, pooled_est, pooled_null = [], [], []
    for name in reference.costs:
        if name not in estimate.costs:
            continue
        for b in common:
            ref = reference.costs[name][:, reference.column(b)]
            est = estimate.costs[name][:, estimate.column(b)]
            keep = np.isfinite(ref) & np.isfinite(est)
            n = int(keep.sum())
            if n < max(min_channels, 3):
                continue
            ref, est = ref[keep], est[keep]
            k = max(1, math.ceil(top * n))
            perms = np.argsort(rng.random((null_draws, n)), axis=1)
            r_ref, r_est = _ranks(ref), _ranks(est)
            rho = float(_row_pearson(r_ref, r_est[None, :])[0])
            rho_null = _row_pearson(r_ref, r_est[perms])
            top_ref, top_est = _top_mask(ref, k), _top_mask(est, k)
            overlap = float((top_ref & top_est).sum() / k)
            overlap_null = (top_ref[None, :] & top_est[perms]).sum(axis=1) / k
            cell = {"channels": n, "top_k": k}
            for stat, value, null in (("spearman", rho, rho_null), ("overlap", overlap, overlap_null)):
                null = null[np.isfinite(null)]
                p95 = float(np.percentile(null, 95)) if null.size else math.nan
                cell[stat] = value
                cell[f"{stat}_null_mean"] = float(null.mean()) if null.size else math.nan
                cell[f"{stat}_null_p95"] = p95
                cell[f"{stat}_p"] = float((1 + (null >= value - 1e-12).sum()) / (1 + null.size))
                cell[f"{stat}_beats_null"] = bool(np.isfinite(value) and value > p95)
            cells.setdefault(name, {})[b] = cell
            pooled_ref.append(ref)
            pooled_est.append(est)
            pooled_null.append(est[perms[: min(null_draws, 50)]])

    def summarize(chosen: list[dict[str, Any]]) -> dict[str, Any]:
        out: dict[str, Any] = {"cells": len(chosen)}
        if not chosen:
            return out
        for stat in ("spearman", "overlap"):
            values = np.array([c[stat] for c in chosen], dtype=float)
            out[f"{stat}_median"] = float(np.nanmedian(values))
            out[f"{stat}_min"] = float(np.nanmin(values))
            out[f"{stat}_null_p95_median"] = float(np.nanmedian([c[f"{stat}_null_p95"] for c in chosen]))
            out[f"{stat}_null_mean_median"] = float(np.nanmedian([c[f"{stat}_null_mean"] for c in chosen]))
            out[f"{stat}_beats_null"] = float(np.mean([c[f"{stat}_beats_null"] for c in chosen]))
        out["both_beat_null"] = float(np.mean([c["spearman_beats_null"] and c["overlap_beats_null"]
                                               for c in chosen]))
        return out

    flat = [c for per in cells.values() for c in per.values()]
    per_bits = {b: summarize([per[b] for per in cells.values() if b in per]) for b in common}
    per_layer = {name: summarize(list(per.values())) for name, per in cells.items()}
    summary = summarize(flat)
    if pooled_ref:
        ref_all, est_all = np.concatenate(pooled_ref), np.concatenate(pooled_est)
        null_all = np.concatenate(pooled_null, axis=1)
        pooled_null_rho = np.array([spearman(ref_all, row) for row in null_all])
        summary["pooled_spearman"] = spearman(ref_all, est_all)
        summary["pooled_spearman_null_mean"] = float(np.nanmean(pooled_null_rho))
        summary["pooled_spearman_null_p95"] = float(np.nanpercentile(pooled_null_rho, 95))
    return {"top": top, "null_draws": null_draws, "seed": seed, "min_channels": min_channels,
            "bits": common, "cells": cells, "per_bits": per_bits, "per_layer": per_layer, "summary": summary}
