"""The policy forward replayed as a CUDA graph, one graph per input shape; eager where it cannot be.

    runner = GraphedForward(policy)                 # policy: VLAPolicy (float or quantized) or a
    actions = runner(images, instruction, proprio)  # wrapper with the same split (InstructionSwap)
    runner.forward_mode                             # "cuda-graph" or "eager: <reason>"

The policy's preprocessing (`prepare_inputs`: input checks, tokenization, images to pixels,
proprio normalization) runs outside the graph, as it always does; the graph holds
`unnormalize_actions(predict_normalized(pixels, token_ids, text_mask, proprio_norm))` between
static input buffers and a static output. A call copies its prepared inputs into the buffers of
the graph for their shapes, replays it and returns a clone of the output, so a caller may keep
what it got while the next call replays. Graphs are keyed by the prepared inputs' shapes and
dtypes (for the VLA policy: the batch size) and share one private memory pool: calls are
serialized (one lock), so no two replays are ever in flight and the pool is never read by two
graphs at once.

Capture (`capture()`, or the first call with a new shape unless `lazy=False`): the eager forward
runs `warmup` times on a side stream (Triton autotuning, lazy buffers and cuBLAS handles settle
there), the graph is captured in thread-local mode (another thread may go on running forwards on
its own stream meanwhile), replayed once and compared with the eager output. Anything that goes
wrong (not a CUDA device, an exception while capturing, a replay that differs from eager by more
than the tolerance) switches this runner to the eager forward for good, logs why (logging module)
and keeps the reason in `eager_reason`. The eager forward is the policy's own `__call__`, so the
eager path gives exactly what the policy gives.

The graphs hold the addresses of the weights and the kernels chosen at capture (the kernel
switches of qvla_ros.kernels are read then): move the policy with `runner.to(...)` (which drops
the graphs), never replace its parameters or modules behind the runner's back, and build a new
runner after changing a kernel switch.
"""
from __future__ import annotations

import logging
import os
import threading
from typing import Any, Callable, Sequence

import torch

__all__ = ["CUDA_GRAPH", "CudaGraphBackend", "GraphedForward", "graphs_disabled_reason"]

log = logging.getLogger(__name__)

CUDA_GRAPH = "cuda-graph"  # forward_mode while graphs run
ENV_SWITCH = "QVLA_CUDA_GRAPH"  # "0" turns capture off (the eager forward runs, reason says so)
_SPLIT = ("prepare_inputs", "predict_normalized", "unnormalize_actions")


def graphs_disabled_reason() -> str | None:
    """Why graphs are off by configuration (QVLA_CUDA_GRAPH=0), or None."""
    if os.environ.get(ENV_SWITCH, "1").strip().lower() in ("0", "false", "no", "off"):
        return f"CUDA graphs turned off ({ENV_SWITCH}={os.environ[ENV_SWITCH]})"
    return None


class CudaGraphBackend:
    """The CUDA side of GraphedForward: whether inputs can be graphed, capture, replay. A test
    gives GraphedForward a stand-in with the same three methods to exercise the logic on CPU."""

    def __init__(self):
        self.pool = None  # one private memory pool for every graph of one runner

    def unavailable(self, inputs: Sequence[torch.Tensor]) -> str | None:
        devices = sorted({str(t.device) for t in inputs})
        if not all(t.device.type == "cuda" for t in inputs):
            return f"the policy runs on {', '.join(devices)}; CUDA graphs need a CUDA device"
        if not torch.cuda.is_available():
            return "CUDA is not available"
        return None

    def capture(self, fn: Callable[[], torch.Tensor], warmup: int) -> tuple[Any, torch.Tensor, torch.Tensor]:
        """(graph, static output, eager output of the last warm-up run). fn reads the static
        input buffers; the caller has filled them."""
        graph = torch.cuda.CUDAGraph()
        if self.pool is None:
            self.pool = torch.cuda.graph_pool_handle()
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(max(1, warmup)):
                eager = fn()
            eager = eager.clone()
        torch.cuda.current_stream().wait_stream(side)
        with torch.cuda.graph(graph, pool=self.pool, capture_error_mode="thread_local"):
            static_out = fn()
        return graph, static_out, eager

    def replay(self, graph) -> None:
        graph.replay()

    def after_failure(self) -> None:
        """Leave the device usable after a failed capture (best effort)."""
        try:
            torch.cuda.synchronize()
        except Exception:  # the failure itself may be what synchronize reports again
            pass


class _Graph:
    __slots__ = ("graph", "inputs", "output")

    def __init__(self, graph, inputs: tuple[torch.Tensor, ...], output: torch.Tensor):
        self.graph, self.inputs, self.output = graph, inputs, output


def _key(inputs: Sequence[torch.Tensor]) -> tuple:
    return tuple((tuple(t.shape), t.dtype, str(t.device)) for t in inputs)


def _mismatch(graphed: torch.Tensor, eager: torch.Tensor, atol: float, rtol: float) -> str | None:
    """Why the graph's output is not the eager one (shape, non-finite, distance), or None."""
    if graphed.shape != eager.shape:
        return f"graph output has shape {list(graphed.shape)}, eager {list(eager.shape)}"
    g, e = graphed.float(), eager.float()
    finite = torch.isfinite(e)
    if not torch.equal(torch.isfinite(g), finite):
        return "graph output is non-finite where eager is finite (or the other way round)"
    if not finite.any():
        return None
    err = float((g - e)[finite].abs().max())
    bound = atol + rtol * float(e[finite].abs().max())
    if err > bound:
        return f"graph output differs from eager by {err:.3g} (tolerance {bound:.3g})"
    return None


class GraphedForward:
    """`policy(images, instruction, proprio)` with the forward replayed from CUDA graphs.

    policy: has `prepare_inputs`, `predict_normalized` and `unnormalize_actions` (VLAPolicy, a
        quantized VLAPolicy, InstructionSwap); anything else runs eagerly, with that reason.
    enabled: False runs eagerly ("turned off"); so does QVLA_CUDA_GRAPH=0.
    lazy: capture a graph for a new input shape on the call that first brings it; False: such a
        call runs eagerly (once per shape it is logged) and only `capture()` makes graphs.
    max_graphs: graphs kept at most; a new shape beyond them runs eagerly.
    warmup: eager runs on a side stream before each capture.
    atol, rtol: how far a replay may be from the eager output (max abs difference <= atol + rtol
        * max abs eager value) before the graph is refused.
    """

    def __init__(self, policy, *, enabled: bool = True, lazy: bool = True, max_graphs: int = 16,
                 warmup: int = 2, atol: float = 1e-2, rtol: float = 1e-2, backend=None):
        if isinstance(policy, GraphedForward):
            policy = policy.policy
        self.policy = policy
        self.config = policy.config
        self.lazy = lazy
        self.max_graphs = max_graphs
        self.warmup = warmup
        self.atol, self.rtol = atol, rtol
        self._backend = backend if backend is not None else CudaGraphBackend()
        self._graphs: dict[tuple, _Graph] = {}
        self._lock = threading.RLock()
        self._told: set = set()  # shapes whose eager run was logged (lazy=False / max_graphs)
        self.eager_reason: str | None = None
        missing = [m for m in _SPLIT if not callable(getattr(policy, m, None))]
        if missing:
            self.fall_back(f"{type(policy).__name__} has no {', '.join(missing)}: no forward to capture",
                           logging.INFO)
        elif not enabled:
            self.fall_back("CUDA graphs turned off by the caller", logging.INFO)
        elif graphs_disabled_reason():
            self.fall_back(graphs_disabled_reason(), logging.INFO)

    # State --------------------------------------------------------------------------------------
    @property
    def graphed(self) -> bool:
        """True while the graph path is on (a shape not captured yet still waits for capture)."""
        return self.eager_reason is None

    @property
    def forward_mode(self) -> str:
        """"cuda-graph" or "eager: <reason>" (for diagnostics)."""
        if self.eager_reason is not None:
            return f"eager: {self.eager_reason}"
        if not self._graphs:
            return "eager: no graph captured yet"
        return CUDA_GRAPH

    @property
    def shapes(self) -> list[tuple]:
        """The keys (shape, dtype, device of each prepared input) of the captured graphs."""
        return list(self._graphs)

    def fall_back(self, reason: str, level: int = logging.WARNING) -> None:
        """Run eagerly from now on, for `reason` (logged once, kept in eager_reason)."""
        with self._lock:
            if self.eager_reason is None:
                log.log(level, "forward runs eagerly: %s", reason)
            self.eager_reason = reason
            self._graphs.clear()

    # Policy contract ----------------------------------------------------------------------------
    def eval(self) -> "GraphedForward":
        self.policy.eval()
        return self

    def to(self, *args, **kwargs) -> "GraphedForward":
        """Moves the policy and drops the graphs (they hold the old addresses)."""
        with self._lock:
            self.policy = self.policy.to(*args, **kwargs)
            self._graphs.clear()
        return self

    def __call__(self, images: torch.Tensor, instruction: Sequence[str], proprio: torch.Tensor) -> torch.Tensor:
        if self.eager_reason is not None:
            return self._eager(images, instruction, proprio)
        with self._lock, torch.inference_mode():
            inputs = self.policy.prepare_inputs(images, instruction, proprio)
            entry = self._graphs.get(_key(inputs))
            if entry is None:
                if not self._may_capture(inputs):
                    return self._eager(images, instruction, proprio)
                _, entry = self._capture(inputs)
                if entry is None:
                    return self._eager(images, instruction, proprio)
            return self._replay(entry, inputs)

    # Capture ------------------------------------------------------------------------------------
    def capture(self, images: torch.Tensor, instruction: Sequence[str], proprio: torch.Tensor) -> torch.Tensor:
        """Capture the graph for these inputs' shapes (if not captured yet) and return the EAGER
        output for them (from the warm-up; on the eager path, the policy's call). A failure is
        not raised: the runner turns eager and says why (forward_mode)."""
        if self.eager_reason is None:
            with self._lock, torch.inference_mode():
                inputs = self.policy.prepare_inputs(images, instruction, proprio)
                if _key(inputs) not in self._graphs:
                    eager, entry = self._capture(inputs)
                    if entry is not None:
                        return eager
        return self._eager(images, instruction, proprio)

    def verify(self, images: torch.Tensor, instruction: Sequence[str], proprio: torch.Tensor) -> bool:
        """Replay against eager on these inputs (use others than those captured with: a graph
        that kept capture-time values would still match those). A mismatch turns the runner
        eager, with the difference as the reason. True when graphs are (still) in use."""
        if self.eager_reason is not None:
            return False
        with self._lock, torch.inference_mode():
            inputs = self.policy.prepare_inputs(images, instruction, proprio)
            entry = self._graphs.get(_key(inputs))
            if entry is None:
                return self.eager_reason is None
            graphed = self._replay(entry, inputs)
            eager = self._predict(*inputs)
            why = _mismatch(graphed, eager, self.atol, self.rtol)
            if why is not None:
                self.fall_back(f"check on fresh inputs failed: {why}")
        return self.eager_reason is None

    def _may_capture(self, inputs) -> bool:
        key = _key(inputs)
        if self.lazy and len(self._graphs) < self.max_graphs:
            return True
        if key not in self._told:
            self._told.add(key)
            why = "lazy capture is off" if not self.lazy else f"{self.max_graphs} graphs are kept at most"
            log.warning("inputs of shapes %s run eagerly: no graph captured for them (%s)",
                        [list(s) for s, _, _ in key], why)
        return False

    def _capture(self, inputs) -> tuple[torch.Tensor | None, _Graph | None]:
        """(eager output, graph entry) for the prepared inputs; (None, None) after a failure."""
        reason = self._backend.unavailable(inputs)
        if reason is not None:
            self.fall_back(reason, logging.INFO)
            return None, None
        static = tuple(t.clone() for t in inputs)
        try:
            graph, output, eager = self._backend.capture(lambda: self._predict(*static), self.warmup)
            self._backend.replay(graph)
        except Exception as exc:
            self._backend.after_failure()
            self.fall_back(f"capture failed: {type(exc).__name__}: {exc}")
            return None, None
        why = _mismatch(output, eager, self.atol, self.rtol)
        if why is not None:
            self.fall_back(f"replay does not match eager: {why}")
            return None, None
        entry = _Graph(graph, static, output)
        self._graphs[_key(inputs)] = entry
        log.info("captured a CUDA graph of the forward for inputs %s (%d graphs)",
                 [list(t.shape) for t in inputs], len(self._graphs))
        return eager, entry

    def _predict(self, pixels, token_ids, text_mask, proprio_norm) -> torch.Tensor:
        p = self.policy
        return p.unnormalize_actions(p.predict_normalized(pixels, token_ids, text_mask, proprio_norm))

    def _replay(self, entry: _Graph, inputs) -> torch.Tensor:
        for buffer, value in zip(entry.inputs, inputs):
            buffer.copy_(value)
        self._backend.replay(entry.graph)
        return entry.output.clone()

    def _eager(self, images, instruction, proprio) -> torch.Tensor:
        with torch.inference_mode():
            return self.policy(images, instruction, proprio)
