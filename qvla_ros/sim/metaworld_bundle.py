"""Which installed MetaWorld files the suite's ten tasks really use: what
scripts/make_metaworld_bundle.sh keeps of metaworld/assets (39 MiB installed, of which the ten
tasks read a small part; the GPU machine takes 64 MiB a call, working tree included).

Each task is built through the project's environment (env.py's SuiteEnv), reset, stepped and its
cameras rendered, and the files it used are the union of (qvla_ros/sim/bundle_files.py):
  - every file Python opens meanwhile (audit hook);
  - the task's model XML and every XML its <include>s pull in, and every `file*=` attribute of
    the compiled model's XML (meshes, textures): MuJoCo reads those in C.

    python -m qvla_ros.sim.metaworld_bundle --out used.txt         # all ten tasks

writes the absolute paths, one a line, sorted. scripts/make_metaworld_bundle.sh also runs this
under strace where strace exists and adds what the kernel saw opened.
"""
from __future__ import annotations

import os
import tempfile
from functools import partial
from typing import Iterable

from .bundle_files import collect_union, collector_main, existing_files, record_opens, xml_files, xml_includes

__all__ = ["collect_task_files", "collect", "main"]


def _compiled_xml(model) -> str:
    """The XML MuJoCo last compiled (includes expanded), which is `model`'s when called right
    after the model was loaded."""
    import mujoco

    with tempfile.TemporaryDirectory(prefix="qvla-mwxml-") as tmp:
        path = os.path.join(tmp, "model.xml")
        mujoco.mj_saveLastXML(path, model)
        with open(path) as f:
            return f.read()


def collect_task_files(task: str, render: bool = True, steps: int = 3, seed: int = 0,
                       image_size: int = 32) -> set[str]:
    """Files used by one task of the suite: built through SuiteEnv, reset with `seed`, stepped
    `steps` times (a fixed action that moves the hand and closes the gripper), both cameras
    rendered when `render`. Absolute paths of existing files."""
    from .env import SuiteEnv

    with record_opens() as opened:
        env = SuiteEnv(task, image_size=image_size)
        try:
            model_xml = env._env.model_name
            xml = _compiled_xml(env._env.model)
            env.reset(seed, render=render)
            for _ in range(steps):
                env.step([0.3, -0.2, 0.1, 1.0], render=render)
        finally:
            env.close()
    # The saved XML keeps the file names relative to the main model file's folder.
    named = xml_files(xml, base_dir=os.path.dirname(model_xml)) | xml_includes(model_xml)
    # (Modules imported by the first task count for it alone; the union over tasks has them.)
    return existing_files(opened | named)


def collect(tasks: Iterable[str] | None = None, render: bool = True, steps: int = 3,
            log=None) -> set[str]:
    """Union of collect_task_files over the suite's tasks (or `tasks`)."""
    from .suite import TASK_NAMES

    return collect_union(((name, partial(collect_task_files, name, render=render, steps=steps))
                          for name in (list(tasks) if tasks is not None else list(TASK_NAMES))), log)


def _add_args(parser) -> None:
    parser.add_argument("--tasks", nargs="*", default=None, help="task names (default: the ten)")


def main(argv: list[str] | None = None) -> int:
    return collector_main(argv, __doc__.split("\n\n")[0], _add_args, 3,
                          lambda args, log: collect(args.tasks, render=not args.no_render,
                                                    steps=args.steps, log=log))


if __name__ == "__main__":
    raise SystemExit(main())
