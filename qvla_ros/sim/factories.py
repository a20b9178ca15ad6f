"""Picklable policy factories: what `evaluate` sends to each worker process to build its policy.

    CheckpointPolicyFactory("runs/policy")                 qvla_ros.policy.load_policy(path)
    CheckpointPolicyFactory("runs/policy", plan="p.json")  qvla_ros.quant.load_quantized_policy
    make_factory("expert")                                 the scripted expert
    make_factory("expert", suite="libero-object")          LIBERO's scripted expert

The policy and quantization packages are imported inside the worker, when the factory is called,
so this module (and `qvla eval --policy expert`) works without them.
"""
from __future__ import annotations

import importlib
from pathlib import Path

from .benchmarks import DEFAULT_SUITE, get_benchmark

__all__ = ["CheckpointPolicyFactory", "make_factory"]


class CheckpointPolicyFactory:
    """Loads a policy checkpoint directory (optionally quantized by a BitPlan) on `device`.

    Args:
        path: checkpoint directory (config.json + model.safetensors + tokenizer.json); None = the
            policy package's shipped default.
        plan: BitPlan file to quantize with (requires qvla_ros.quant.load_quantized_policy).
        device: torch device the policy runs on.
        cuda_graph: on a CUDA device, run the forward as CUDA graphs (GraphedForward, one per
            batch size, eager with a logged reason where capture fails); False: eagerly.
    """

    def __init__(self, path: str | Path | None, plan: str | Path | None = None, device: str = "cpu",
                 cuda_graph: bool = True):
        self.path = None if path is None else str(path)
        self.plan = None if plan is None else str(plan)
        self.device = device
        self.cuda_graph = cuda_graph

    def __call__(self):
        if self.plan is not None:
            quant = importlib.import_module("qvla_ros.quant")
            loader = getattr(quant, "load_quantized_policy", None)
            if loader is None:
                raise RuntimeError("--plan needs qvla_ros.quant.load_quantized_policy, which this "
                                   "installation does not provide")
            policy = loader(self.path, self.plan)
        else:
            policy = importlib.import_module("qvla_ros.policy").load_policy(self.path, device=self.device)
        to = getattr(policy, "to", None)
        if to is not None:
            policy = to(self.device)
        eval_ = getattr(policy, "eval", None)
        if eval_ is not None:
            eval_()
        if self.cuda_graph and _is_cuda(self.device):
            policy = importlib.import_module("qvla_ros.policy.graphed").GraphedForward(policy)
        return policy

    def describe(self) -> dict:
        out = {"kind": "checkpoint", "path": self.path, "plan": self.plan, "device": self.device}
        if _is_cuda(self.device):
            out["cuda_graph"] = self.cuda_graph
        return out

    def __repr__(self) -> str:
        extra = "" if self.cuda_graph else ", cuda_graph=False"
        return f"CheckpointPolicyFactory({self.path!r}, plan={self.plan!r}, device={self.device!r}{extra})"


def _is_cuda(device) -> bool:
    return str(device).split(":", 1)[0] == "cuda"


def make_factory(policy: str, plan: str | None = None, device: str = "cpu", cuda_graph: bool = True,
                 suite: str = DEFAULT_SUITE):
    """Factory for the CLI's --policy: "expert" (the suite's scripted expert) or a checkpoint
    directory."""
    if policy == "expert":
        if plan is not None:
            raise ValueError("--plan applies to a checkpoint, not to the scripted expert")
        return get_benchmark(suite).expert_factory()
    if not Path(policy).is_dir():
        raise ValueError(f"--policy {policy!r} is neither 'expert' nor a checkpoint directory")
    if plan is not None and not Path(plan).is_file():
        raise ValueError(f"--plan {plan!r}: no such file")
    return CheckpointPolicyFactory(policy, plan=plan, device=device, cuda_graph=cuda_graph)
