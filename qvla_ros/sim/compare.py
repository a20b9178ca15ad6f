"""`qvla compare`: every method on one policy, one calibration set and one benchmark.

For each method (QVLA after the baseline whose measured memory it matches):

1. quantize a fresh copy of the float policy on the shared calibration frames; measure its weight
   memory from the stored tensors; save the quantized policy (policy/: the one quantized-checkpoint
   format, quant/checkpoint.py) and, for methods stored as MixedBitLinear, its BitPlan (plan.json);
2. offline: action error against held-out demonstrations (sim.metrics.offline_action_error) and
   the deviation from the float policy's actions on the same frames (quant.action_error);
3. closed loop: sim.evaluate on every task, episodes on held-out seeds, Wilson 95% intervals.

Everything lands under OUT/runs/<method>-<config id>/ and is reused when present: the config id
hashes the method, the float policy's weights, the calibration frames and the method's settings
(for QVLA: the budget it was given), so changing any of them re-runs just what changed. Closed-loop
episodes are appended to episodes.jsonl as they finish; an interrupted run resumes at the first
task not yet complete. The table (compare.md, compare.json) is rewritten after every method, so a
partial run already shows its rows; the plot (compare.png) is drawn at the end.

The harness lives in sim/ because it drives the benchmark; the methods it runs are
quant/baselines/ (which never import sim/), the table and plot are compare_report.py.
"""
from __future__ import annotations

import copy
import hashlib
import json
import os
import platform
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from tqdm.auto import tqdm

from ..io import atomic_write_text
from ..quant.action_error import action_error
from ..quant.baselines.api import quantize_baseline
from ..quant.baselines.calibration import batches_from_frames, calibration_actions
from ..quant.baselines.methods import MethodSpec, resolve_order
from ..quant.baselines.qvla_match import QvlaRunner
from ..quant.baselines.smoothquant import DEFAULT_ALPHAS
from ..quant.checkpoint import is_quantized_checkpoint, load_quantized, save_quantized
from ..quant.sensitivity import check_device
from .benchmarks import DEFAULT_SUITE, get_benchmark
from .compare_report import DEVIATION_KEY, add_paired_tests, plot_comparison, write_markdown
from .paired import outcomes_of

RUNS_DIR = "runs"
POLICY_DIR = "policy"  # the quantized policy of one run (quant/checkpoint.py)
#: CompareSettings.dtype -> the dtype the float policy is loaded in (qvla compare --dtype)
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


@dataclass
class CompareSettings:
    """What `qvla compare` runs (every field is recorded in compare.json).

    Args:
        methods: method names (methods.py grammar).
        policy: float policy checkpoint directory; None = the shipped one.
        data: demonstration folder: calibration frames ("train" split), offline metrics ("val").
        synthetic: random calibration frames instead of data (smoke runs; no offline metrics).
        frames: calibration frames, shared by every method.
        calib_batch: frames per calibration forward.
        estimator: QVLA's sensitivity estimator ("jacobian" or "exact").
        projections: the jacobian estimator's random action projections per frame (None: its
            default, one per action number for chunks of at most 64 numbers).
        episodes_per_task: closed-loop episodes per task (0: skip the closed loop).
        workers: rollout worker processes (with ray: Ray actors).
        dtype: "float32" or "bfloat16": the width the float policy is loaded in (load_policy), so
            the float row, every method's calibration and every weight no method quantizes are in
            it (bfloat16: the policy as a robot deploys it; the checkpoints keep it).
        device: torch device of the float policy, of every method's quantization (calibration,
            sensitivity, GPTQ/AWQ statistics), of the offline metrics and of each rollout worker's
            policy. Quantized policies are saved from the CPU; on a CUDA device each worker makes
            its own CUDA context.
        ray: run the rollouts on a Ray cluster ('local', 'auto', an address; None: local processes).
        suite: the benchmark the closed loop runs (sim.benchmarks.SUITES); the policy's inputs and
            actions must match it, which is checked before any work.
        tasks: None (the suite) or comma-separated task names.
        max_steps: steps before an episode counts as failed (None: the suite's default).
        offline_frames: held-out frames for the offline metrics (0: no offline metrics).
        alphas: SmoothQuant's alpha candidates.
        seed: calibration sampling seed.
    """

    methods: list[str]
    policy: str | None = None
    data: str | None = None
    synthetic: bool = False
    frames: int = 64
    calib_batch: int = 16
    estimator: str = "jacobian"
    projections: int | None = None
    episodes_per_task: int = 50
    workers: int = 2
    device: str = "cpu"
    dtype: str = "float32"
    ray: str | None = None
    suite: str = DEFAULT_SUITE
    tasks: str | None = None
    max_steps: int | None = None
    offline_frames: int = 512
    alphas: tuple[float, ...] = DEFAULT_ALPHAS
    seed: int = 0
    extra: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not self.methods:
            raise ValueError("give at least one method to compare")
        if self.data is None and not self.synthetic:
            raise ValueError("give a demonstration folder (data) or ask for synthetic frames")
        for name in ("frames", "calib_batch"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.offline_frames < 0:
            raise ValueError(f"offline_frames must be >= 0, got {self.offline_frames}")
        if self.projections is not None and self.projections < 1:
            raise ValueError(f"projections must be >= 1, got {self.projections}")
        if self.episodes_per_task < 0 or self.workers < 0:
            raise ValueError("episodes_per_task and workers must be >= 0")
        self.suite = get_benchmark(self.suite).name      # unknown suites fail here
        check_device(self.device)                         # unknown or absent devices fail here
        if self.dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {list(DTYPES)}, got {self.dtype!r}")


class SavedPolicyFactory:
    """Picklable zero-argument factory for rollout workers: loads a quantized policy folder
    written by checkpoint.save_quantized onto `device` and keeps each layer's dequantized weights
    cached, which makes the CPU path fast enough for rollouts."""

    def __init__(self, path: str | Path, describe: dict | None = None, device: str = "cpu"):
        self.path = str(path)
        self.device = device
        self._describe = dict(describe or {})

    def __call__(self):
        policy = load_quantized(self.path).to(self.device)
        for module in policy.modules():
            if hasattr(module, "cache_dequantized"):
                module.cache_dequantized = True
        return policy.eval()

    def describe(self) -> dict:
        return {"kind": "qvla-compare", "path": self.path, "device": self.device, **self._describe}


def _slug(name: str) -> str:
    return name.replace("@", "_at_").replace("/", "_")


def _write_json(path: Path, obj) -> None:
    atomic_write_text(path, json.dumps(obj, indent=1, sort_keys=False, default=str))


def _read_json(path: Path):
    return json.loads(path.read_text()) if path.is_file() else None


def machine() -> dict:
    from .evaluate import cpu_model

    return {"cpu": cpu_model(), "cores": os.cpu_count(), "torch": torch.__version__,
            "torch_threads": torch.get_num_threads(), "python": platform.python_version(),
            "host": platform.node()}


class Comparison:
    """One `qvla compare` run over an output folder (see the module docstring)."""

    def __init__(self, settings: CompareSettings, out: str | Path, progress: bool = True):
        self.settings = settings
        self.out = Path(out)
        self.progress = progress
        self.specs = resolve_order(settings.methods)
        self._policy = None
        self._fingerprint = None
        self._frames = None
        self._offline_frames = None
        self._qvla = None

    # ---- shared inputs ------------------------------------------------------------------------
    @property
    def policy(self):
        if self._policy is None:
            from ..policy import load_policy

            self._policy = load_policy(self.settings.policy, device=self.settings.device,
                                       dtype=DTYPES[self.settings.dtype]).eval()
        return self._policy

    @property
    def fingerprint(self) -> dict:
        if self._fingerprint is None:
            from ..quant.plan import model_fingerprint

            self._fingerprint = model_fingerprint(self.policy)
        return self._fingerprint

    @property
    def frames(self):
        if self._frames is None:
            from ..quant.calibration import frames_from_demos, synthetic_frames

            s = self.settings
            if s.synthetic:
                self._frames = synthetic_frames(self.policy.config, s.frames, seed=s.seed)
            else:
                self._frames = frames_from_demos(s.data, s.frames, split="train", seed=s.seed)
        return self._frames

    @property
    def qvla(self) -> QvlaRunner:
        if self._qvla is None:
            self._qvla = QvlaRunner(self.frames, estimator=self.settings.estimator,
                                    cache_dir=self.out / "sensitivity", seed=self.settings.seed,
                                    projections=self.settings.projections, progress=self.progress)
        return self._qvla

    def config_id(self, spec: MethodSpec, budget: float | None) -> str:
        s = self.settings
        method = spec.to_dict()
        # Settings that came later enter the id only away from their default, so a folder of runs
        # made before them is still found: a planned-layers budget scope, a float32 policy.
        if method.get("scope") == "planned":
            del method["scope"]
        doc = {"method": method, "policy": self.fingerprint["weights"],
               "frames": self.frames.source, "n_frames": len(self.frames), "calib_batch": s.calib_batch,
               "alphas": list(s.alphas) if spec.family == "smoothquant" else None,
               "estimator": s.estimator if spec.family == "qvla" else None,
               "budget": None if budget is None else round(budget, 6)}
        if spec.family == "qvla" and s.projections is not None:
            doc["projections"] = s.projections
        if s.dtype != "float32":
            doc["dtype"] = s.dtype
        return hashlib.sha256(json.dumps(doc, sort_keys=True, default=str).encode()).hexdigest()[:12]

    # ---- one method ---------------------------------------------------------------------------
    def run_dir(self, spec: MethodSpec, budget: float | None) -> Path:
        return self.out / RUNS_DIR / f"{_slug(spec.name)}-{self.config_id(spec, budget)}"

    def quantize(self, spec: MethodSpec, budget: float | None) -> dict:
        run = self.run_dir(spec, budget)
        record = _read_json(run / "quant.json")
        if record is not None and is_quantized_checkpoint(run / POLICY_DIR):
            return record
        # A cache from before the pickle-free format (policy.pt), or of an older checkpoint format, is
        # never read: re-quantized.
        policy = copy.deepcopy(self.policy)
        batches = batches_from_frames(self.frames, self.settings.calib_batch)
        result = quantize_baseline(policy, spec, batches, alphas=self.settings.alphas, budget=budget,
                                   qvla=self.qvla, progress=self.progress)
        policy.to("cpu")      # saved from the CPU whatever it was quantized on
        run.mkdir(parents=True, exist_ok=True)
        if result.plan is not None:
            result.plan.save(run / "plan.json")
        # The run's plan (above) may describe layers a baseline wrapped (SmoothQuant's InputScaled),
        # so the checkpoint itself records the modules only.
        save_quantized(policy, None, run / POLICY_DIR)
        (run / "policy.pt").unlink(missing_ok=True)
        record = {"method": spec.to_dict(), "label": spec.label, "config_id": self.config_id(spec, budget),
                  "memory": result.memory.to_dict(), "info": result.info,
                  "plan_id": None if result.plan is None else result.plan.plan_id,
                  "quantize_seconds": round(result.seconds, 2), "budget": budget}
        _write_json(run / "quant.json", record)
        return record

    @torch.no_grad()
    def offline(self, spec: MethodSpec, budget: float | None) -> dict | None:
        if self.settings.data is None or self.settings.offline_frames == 0:
            return None
        run = self.run_dir(spec, budget)
        cached = _read_json(run / "offline.json")
        # A cache from before the one action-error metric holds only "action_mse_vs_fp" (per-element
        # mean, another normalization): it is scored again rather than mixed into the table.
        if cached is not None and DEVIATION_KEY in cached:
            return cached
        from ..dataset import DemoDataset
        from .metrics import offline_action_error

        policy = SavedPolicyFactory(run / POLICY_DIR, device=self.settings.device)()
        val = DemoDataset(self.settings.data, split="val")
        metrics = offline_action_error(policy, val, max_frames=self.settings.offline_frames)
        metrics[DEVIATION_KEY] = self._deviation_from_fp(policy)
        _write_json(run / "offline.json", metrics)
        return metrics

    def _deviation_from_fp(self, policy) -> float:
        """quant.action_error of `policy` against the float policy's actions on held-out frames."""
        if self._offline_frames is None:
            from ..quant.calibration import frames_from_demos

            frames = frames_from_demos(self.settings.data, min(self.settings.offline_frames, 128),
                                       split="val", seed=self.settings.seed + 1)
            batches = batches_from_frames(frames, 32)
            self._offline_frames = (batches, calibration_actions(self.policy, batches))
        batches, reference = self._offline_frames
        return action_error(calibration_actions(policy, batches), reference)

    def closed_loop(self, spec: MethodSpec, budget: float | None) -> dict | None:
        s = self.settings
        if s.episodes_per_task == 0:
            return None
        from .evaluate import EvalResults, evaluate

        bench = get_benchmark(s.suite)
        run = self.run_dir(spec, budget)
        tasks = [t.name for t in bench.resolve_tasks(s.tasks)]
        seeds = [bench.eval_seed(i) for i in range(s.episodes_per_task)]
        max_steps = s.max_steps or bench.max_steps
        # MetaWorld's key stays as it was, so earlier runs' episodes are still found.
        suite_part = "" if bench.name == DEFAULT_SUITE else f"{bench.name}-"
        key = f"closed_loop-{suite_part}{s.episodes_per_task}ep-{max_steps}steps"
        done = _read_json(run / f"{key}.json")
        log = run / f"{key}.episodes.jsonl"
        if done is not None and set(done["per_task"]) >= set(tasks):
            if "outcomes" not in done:  # recorded before outcomes were kept: they are in the log
                done["outcomes"] = _outcomes(self._logged_episodes(log, tasks, seeds))
            return done
        episodes = self._logged_episodes(log, tasks, seeds)
        complete = {t for t in tasks if sum(1 for e in episodes if e["task"] == t) == len(seeds)}
        todo = [t for t in tasks if t not in complete]
        settings = {}
        if todo:
            factory = SavedPolicyFactory(run / POLICY_DIR, {"method": spec.name}, device=s.device)
            result = evaluate(factory, todo, seeds=seeds, workers=s.workers, ray_address=s.ray,
                              max_steps=max_steps, progress=self.progress, episode_log=log,
                              suite=bench.name)
            settings = result.settings
            episodes = [e for e in episodes if e["task"] in complete] + result.episodes
        merged = EvalResults.from_episodes(tasks, [e for e in episodes if e["task"] in tasks],
                                           {**settings, "tasks": tasks, "resumed_tasks": sorted(complete)})
        record = {"per_task": merged.per_task, "overall": merged.overall, "settings": merged.settings,
                  "outcomes": _outcomes(e for e in episodes if e["task"] in tasks)}
        _write_json(run / f"{key}.json", record)
        return record

    @staticmethod
    def _logged_episodes(log: Path, tasks: list[str], seeds: list[int]) -> list[dict]:
        """Episodes of an interrupted run, one per (task, seed) (the last one logged wins)."""
        if not log.is_file():
            return []
        wanted = set(seeds)
        found: dict[tuple[str, int], dict] = {}
        for line in log.read_text().splitlines():
            try:
                ep = json.loads(line)
            except json.JSONDecodeError:
                continue  # a line cut short by the interruption
            if ep.get("task") in tasks and ep.get("seed") in wanted:
                found[(ep["task"], ep["seed"])] = ep
        return list(found.values())

    # ---- the whole comparison -----------------------------------------------------------------
    def prepare(self) -> None:
        """Load the float policy and the calibration frames, and check the policy against the
        suite (bad paths and mismatched policies fail here, before any work)."""
        _ = self.fingerprint, self.frames
        s = self.settings
        if s.data is not None and s.offline_frames:
            from ..dataset import DemoDataset

            if len(DemoDataset(s.data, split="val")) == 0:
                raise ValueError(f"{s.data} has no held-out ('val') episodes for the offline metrics "
                                 "(dataset.HELD_OUT_EVERY); record more demonstrations, or pass "
                                 "--offline-frames 0 to skip those metrics")
        if s.episodes_per_task:
            bench = get_benchmark(s.suite)
            bench.resolve_tasks(s.tasks)
            bench.check_policy(self.policy.config, bench.cameras)

    def run(self) -> dict:
        self.out.mkdir(parents=True, exist_ok=True)
        rows: list[dict] = []
        measured: dict[str, float] = {}
        bar = tqdm(self.specs, desc="compare", unit="method", disable=not self.progress)
        for spec in bar:
            bar.set_postfix(method=spec.name)
            budget = measured.get(spec.match) if spec.match else None
            if spec.match and budget is None:
                raise RuntimeError(f"{spec.name}: {spec.match} has no measured memory")
            started = time.perf_counter()
            record = dict(self.quantize(spec, budget))
            measured[spec.name] = record["memory"]["bits_per_param"]
            record["offline"] = self.offline(spec, budget)
            record["closed_loop"] = self.closed_loop(spec, budget)
            record["seconds"] = round(time.perf_counter() - started, 1)
            rows.append(record)
            self.write_report(rows, plot=False)
        return self.write_report(rows)

    def write_report(self, rows: list[dict], plot: bool = True) -> dict:
        settings = asdict(self.settings)
        settings["max_steps"] = settings["max_steps"] or get_benchmark(self.settings.suite).max_steps
        add_paired_tests(rows)
        doc = {"format": "qvla-compare", "version": 1, "settings": settings,
               "calibration": self.frames.source, "policy": self.fingerprint,
               "machine": machine(), "rows": rows}
        _write_json(self.out / "compare.json", doc)
        write_markdown(doc, self.out / "compare.md")
        if plot:
            plot_comparison(doc, self.out / "compare.png")
        return doc


def _outcomes(episodes) -> dict[str, dict[str, bool]]:
    """{task: {seed: success}} of closed-loop episode records (seeds as JSON keys: strings)."""
    return {task: {str(seed): ok for seed, ok in sorted(per.items())}
            for task, per in outcomes_of(episodes).items()}
