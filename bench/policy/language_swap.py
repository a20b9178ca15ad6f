"""Language test: each task's scene, with the OTHER task of its scene pair as the instruction.

For every task A with scene partner B (suite.SCENE_PAIRS), episodes start from A's initial state
(held-out seeds) while the policy is told B's instruction. Recorded per task A:

- `did_A_anyway`: A's success criterion met although B was asked (lower = the instruction is
  followed; a policy that ignores language scores its normal success here);
- `A_when_told_A` and `B_when_told_B` from a normal `qvla eval` of the same policy (--baseline).

The faucet pair starts from the same visual state, so there the instruction is the only thing
that tells the two tasks apart and B_when_told_B is the rate of following the other instruction
from that very state. For the other four pairs B's goal is A's starting state (drawer closed vs
open, ...): "doing B" from A's start is vacuous, and `did_A_anyway` is the informative number.

    PYTHONPATH=. python bench/policy/language_swap.py --policy DIR --out DIR [--episodes-per-task 20]
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--policy", default=None, help="checkpoint directory (default: the shipped policy)")
    p.add_argument("--out", required=True, type=Path)
    p.add_argument("--episodes-per-task", type=int, default=20)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--device", default="cpu")
    p.add_argument("--max-steps", type=int, default=None, help="episode length limit (default: the suite's)")
    p.add_argument("--baseline", type=Path, default=None,
                   help="results.json of a normal `qvla eval` of the same policy, for the table")
    args = p.parse_args(argv)

    from qvla_ros.policy.wrappers import InstructionSwapFactory
    from qvla_ros.sim.evaluate import evaluate
    from qvla_ros.sim.factories import CheckpointPolicyFactory
    from qvla_ros.sim.suite import SCENE_PAIRS, get_task

    partner = {}
    for pair in SCENE_PAIRS:
        a, b = pair
        partner[a], partner[b] = b, a
    # The worker's observation carries A's instruction; replace it with B's.
    mapping = {get_task(a).instruction: get_task(b).instruction for a, b in partner.items()}
    base = CheckpointPolicyFactory(args.policy, device=args.device)
    swapped = evaluate(InstructionSwapFactory(base, mapping), tasks=None,
                       episodes_per_task=args.episodes_per_task, workers=args.workers,
                       batch_size=args.batch_size,
                       **({"max_steps": args.max_steps} if args.max_steps else {}))
    args.out.mkdir(parents=True, exist_ok=True)
    swapped.save(args.out / "swapped", plot=False)
    baseline = None
    if args.baseline is not None and args.baseline.is_file():
        baseline = json.loads(args.baseline.read_text())["per_task"]

    rows = {}
    for a, b in partner.items():
        rows[a] = {"told": get_task(b).instruction, "did_A_anyway": swapped.per_task[a]["rate"],
                   "did_A_anyway_ci95": swapped.per_task[a]["ci95"],
                   "A_when_told_A": (baseline or {}).get(a, {}).get("rate"),
                   "B_when_told_B": (baseline or {}).get(b, {}).get("rate")}
    record = {"format": "qvla-language-swap", "policy": args.policy,
              "episodes_per_task": args.episodes_per_task, "per_task": rows,
              "mean_did_A_anyway": sum(r["did_A_anyway"] for r in rows.values()) / len(rows),
              "settings": swapped.settings}
    (args.out / "language_swap.json").write_text(json.dumps(record, indent=1) + "\n")
    print(f"{'scene of':<14} {'told':<34} {'did A anyway':>12} {'A when told A':>14}")
    for a, r in rows.items():
        base_rate = "" if r["A_when_told_A"] is None else f"{r['A_when_told_A']:.0%}"
        print(f"{a:<14} {r['told']:<34} {r['did_A_anyway']:>12.0%} {base_rate:>14}")
    print(f"mean did-A-anyway {record['mean_did_A_anyway']:.1%}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
