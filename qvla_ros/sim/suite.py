"""The benchmark's task suite and its seed rules.

Ten MetaWorld v3 tasks, chosen as five pairs that share one scene (the same objects, the same
robot, the same cameras) and differ in what the instruction asks:

    drawer-open   / drawer-close     "pull the drawer open"   / "push the drawer close"
    window-open   / window-close     "slide the window open"  / "slide the window closed"
    faucet-open   / faucet-close     "turn the faucet left"   / "turn the faucet right"
    door-open     / door-close       "pull the door open"     / "push the door closed ..."
    handle-press  / handle-pull      "push down the handle"   / "pull up the handle"

Why these:
- Language matters. A policy that ignores the instruction can solve at most one task of each
  pair, so it is capped near 50%. The faucet pair loads the same model in the same start
  configuration (the handle at the same angle; only the randomized faucet position varies), and
  goal markers are not rendered, so no image cue says which way to turn: only the sentence does.
  In the other pairs the start states differ (an open drawer is there to be
  closed), so vision carries part of the answer there. Quantization that damages the language
  pathway shows up as success lost on the pairs, which an action-centric metric should catch.
- Goals are implied by objects. Every task's target follows from an object in the image (a
  drawer, a window, a handle), unlike reach/push/pick-place whose random goal exists only as a
  marker; an image-based policy can in principle solve all ten at 128 px without markers.
- The scripted experts (metaworld.policies) are reliable on all ten (measured here: 28-30 of 30
  on every task, 40-130 steps per episode), so the harness check (expert through `evaluate`)
  reads ~99%, and demonstrations are cheap.
- Instructions are language-world's sentence for each task, verbatim.

Seeds: one integer per episode sets the task's randomized initial state (object and goal
positions) through the environment's own RNG. Demonstrations draw from [0, EVAL_SEED_BASE),
evaluation from [EVAL_SEED_BASE, ...): the two ranges never overlap, so evaluation always runs on
initial states no demonstration has seen. `evaluate` refuses demonstration seeds unless told.
"""
from __future__ import annotations

from dataclasses import dataclass

from language_world import TASK_DESCRIPTIONS

__all__ = [
    "TaskSpec", "TASKS", "TASK_NAMES", "SCENE_PAIRS", "get_task", "resolve_tasks",
    "EVAL_SEED_BASE", "demo_seed", "eval_seed", "is_eval_seed", "DEFAULT_MAX_STEPS",
]

# Evaluation seeds start here; demonstration seeds stay below it.
EVAL_SEED_BASE = 1_000_000

# Slowest expert episode measured over the suite is ~130 steps; 300 leaves a learned policy more
# than twice that before an episode counts as failed, and stays under MetaWorld's hard 500.
DEFAULT_MAX_STEPS = 300


@dataclass(frozen=True)
class TaskSpec:
    """One task of the suite.

    Args:
        name: MetaWorld task name without version ("drawer-open").
        instruction: the natural-language instruction given to the policy.
        scene: name of the scene it shares with its pair ("drawer").
    """

    name: str
    instruction: str
    scene: str

    @property
    def env_name(self) -> str:
        """MetaWorld's registry name of the environment."""
        return f"{self.name}-v3"


def _spec(name: str, scene: str) -> TaskSpec:
    return TaskSpec(name=name, instruction=TASK_DESCRIPTIONS[name], scene=scene)


TASKS: tuple[TaskSpec, ...] = (
    _spec("drawer-open", "drawer"), _spec("drawer-close", "drawer"),
    _spec("window-open", "window"), _spec("window-close", "window"),
    _spec("faucet-open", "faucet"), _spec("faucet-close", "faucet"),
    _spec("door-open", "door"), _spec("door-close", "door"),
    _spec("handle-press", "handle"), _spec("handle-pull", "handle"),
)
TASK_NAMES: tuple[str, ...] = tuple(t.name for t in TASKS)
_BY_NAME = {t.name: t for t in TASKS}

# Pairs of task names that share a scene.
SCENE_PAIRS: tuple[tuple[str, ...], ...] = tuple(
    tuple(t.name for t in TASKS if t.scene == scene) for scene in dict.fromkeys(t.scene for t in TASKS)
)


def get_task(task: str | TaskSpec) -> TaskSpec:
    """The suite's TaskSpec for a name ("drawer-open" or "drawer-open-v3"); ValueError if unknown."""
    if isinstance(task, TaskSpec):
        return task
    if not isinstance(task, str):
        raise TypeError(f"task must be a task name or TaskSpec, got {type(task).__name__}")
    name = task[:-3] if task.endswith("-v3") else task
    if name not in _BY_NAME:
        raise ValueError(f"unknown task {task!r}; the suite has: {', '.join(TASK_NAMES)}")
    return _BY_NAME[name]


def resolve_tasks(tasks=None) -> list[TaskSpec]:
    """TaskSpecs for None (whole suite), a comma-separated string, or an iterable of names."""
    if tasks is None:
        return list(TASKS)
    if isinstance(tasks, (str, TaskSpec)):
        tasks = [tasks] if isinstance(tasks, TaskSpec) else [t for t in tasks.split(",") if t.strip()]
    specs = [get_task(t.strip() if isinstance(t, str) else t) for t in tasks]
    if not specs:
        raise ValueError("no tasks given")
    if len({s.name for s in specs}) != len(specs):
        raise ValueError(f"task listed twice in {[s.name for s in specs]}")
    return specs


def demo_seed(episode: int) -> int:
    """Seed of a task's demonstration attempt number `episode` (0, 1, ...)."""
    if not 0 <= episode < EVAL_SEED_BASE:
        raise ValueError(f"demonstration attempt {episode} outside [0, {EVAL_SEED_BASE})")
    return episode


def eval_seed(episode: int, offset: int = 0) -> int:
    """Seed of a task's evaluation episode number `episode`; `offset` picks another held-out block."""
    if episode < 0 or offset < 0:
        raise ValueError(f"evaluation episode {episode} and offset {offset} must be >= 0")
    return EVAL_SEED_BASE + offset + episode


def is_eval_seed(seed: int) -> bool:
    return seed >= EVAL_SEED_BASE
