"""`qvla`: one verb per stage of the pipeline.

    qvla demos      scripted-expert demonstrations for the benchmark suite
    qvla eval       closed-loop success of a policy (optionally quantized by a plan)
    qvla compare    QVLA against the baselines, closed loop, one table + plot
    qvla train      train a policy from demonstrations
    qvla import-oft import a published OpenVLA-OFT checkpoint into the project's format
    qvla calibrate  action-space sensitivity table of a policy
    qvla allocate   bit plan under a memory budget, from a sensitivity table
    qvla quantize   apply a bit plan: packed mixed-bit checkpoint
    qvla demo       the ROS 2 demo: sim bridge + policy node over DDS

Each verb lives beside the stage it drives (a `register(subparsers)` function in the module named
below); this file only wires them up, importing a stage only when its verb runs.
"""
from __future__ import annotations

import argparse
import importlib
import sys

# verb -> module holding `register(subparsers)`, which adds the verb's parser and sets `func`.
VERBS = {
    "demos": "qvla_ros.sim.commands",
    "eval": "qvla_ros.sim.commands",
    "compare": "qvla_ros.sim.commands",
    "train": "qvla_ros.policy.commands",
    "import-oft": "qvla_ros.policy.import_oft",
    "calibrate": "qvla_ros.quant.commands",
    "allocate": "qvla_ros.quant.commands",
    "quantize": "qvla_ros.quant.commands",
    "demo": "qvla_ros.ros.demo",
}


def build_parser(verb: str | None = None) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="qvla", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="verb", metavar="VERB")
    # Import only the module of the verb asked for (torch, MuJoCo, rclpy are slow to import),
    # or every module when listing help.
    modules = [VERBS[verb]] if verb in VERBS else list(dict.fromkeys(VERBS.values()))
    for name in modules:
        try:
            importlib.import_module(name).register(sub)
        except ModuleNotFoundError as exc:
            if verb in VERBS:
                raise
            # Help still lists the verbs whose stage is installed.
            print(f"qvla: {name} unavailable ({exc})", file=sys.stderr)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    verb = next((a for a in argv if not a.startswith("-")), None)
    parser = build_parser(verb)
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        print("qvla: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
