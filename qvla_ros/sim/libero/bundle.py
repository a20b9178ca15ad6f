"""Which installed files LIBERO tasks really use: what scripts/make_libero_bundle.sh keeps of
robosuite's and the scene assets' model folders (the whole install is ~1.4 GB; the GPU machine
takes 64 MiB a call).

Two sources, combined, so that neither misses what the other sees:
  - every file Python opens while the project's adapter (env.py's LiberoEnv) builds a task's
    environment, resets it to a bundled initial state, steps it and renders its cameras (an audit
    hook on the "open" event: XML parsed by robosuite and LIBERO, bddl and init-state files);
  - every `file*=` attribute of the scene's MuJoCo XML (meshes, textures, skyboxes: MuJoCo reads
    those in C, where no Python hook sees them).

    python -m qvla_ros.sim.libero.bundle --suites libero_object libero_spatial --out used.txt

writes the absolute paths, one a line, sorted. scripts/make_libero_bundle.sh also runs this under
strace where strace exists and adds what the kernel saw opened. The audit hook and the XML
reading are shared with the MetaWorld collector (qvla_ros/sim/bundle_files.py).
"""
from __future__ import annotations

from functools import partial
from typing import Iterable

from ..bundle_files import collect_union, collector_main, existing_files, record_opens, xml_files

__all__ = ["xml_files", "collect_task_files", "collect", "main"]


def collect_task_files(suite: str, task_index: int, render: bool = True, steps: int = 2,
                       init_state: int = 0, image_size: int = 32) -> set[str]:
    """Files used by one task: built through LiberoEnv, reset to `init_state`, stepped `steps`
    times, cameras rendered when `render`. Absolute paths of existing files."""
    from .env import LiberoEnv

    with record_opens() as opened:
        env = LiberoEnv(suite, task_index, image_size=image_size,
                        cameras=("agentview", "robot0_eye_in_hand") if render else ())
        try:
            env.reset(init_state, render=render)
            for _ in range(steps):
                env.step([0, 0, 0, 0, 0, 0, -1], render=render)
            xml = env.libero_env.model.get_xml()
        finally:
            env.close()
    # (Modules imported by the first task count for it alone; the union over tasks has them.)
    return existing_files(opened | xml_files(xml))


def collect(suites: Iterable[str], tasks: Iterable[int] | None = None, render: bool = True,
            steps: int = 2, log=None) -> set[str]:
    """Union of collect_task_files over every task (or `tasks`) of every suite."""
    from .env import suite_size

    return collect_union(((f"{suite}/{i}", partial(collect_task_files, suite, i, render=render, steps=steps))
                          for suite in suites
                          for i in (list(tasks) if tasks is not None else range(suite_size(suite)))),
                         log)


def _add_args(parser) -> None:
    parser.add_argument("--suites", nargs="+", default=["libero_object", "libero_spatial"])
    parser.add_argument("--tasks", type=int, nargs="*", default=None, help="task indices (default all)")


def main(argv: list[str] | None = None) -> int:
    return collector_main(argv, __doc__.split("\n\n")[0], _add_args, 2,
                          lambda args, log: collect(args.suites, args.tasks, render=not args.no_render,
                                                    steps=args.steps, log=log))


if __name__ == "__main__":
    raise SystemExit(main())
