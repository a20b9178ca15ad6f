"""bench/libero/results.json (issue #20's record) from the files the LIBERO runs leave: the scripted
experts' success (expert_success.py -> expert.json), the trained float policy's evaluation
(`qvla eval --suite libero-object` -> results.json; train_oft_small.sh brings it back as
eval_results.json) and the comparison (`qvla compare --suite libero-object` -> compare.json).

    python bench/libero/results.py --expert bench/libero/expert.json --eval eval_results.json \
        --compare compare.json --out bench/libero/results.json

Writes: expert_success (per suite: rate, interval, episodes), float_success (rate, interval,
episodes, suite), and per method: success, interval, whole_policy_bits, bits_per_param, the share
of float's success and the paired tests against float and the best baseline at no more memory.
Any input may be left out; its part is then absent, never filled in.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path


def _rate(overall: dict) -> dict:
    return {"rate": overall["rate"], "ci95": overall["ci95"], "episodes": overall["episodes"]}


def expert_part(doc: dict) -> dict:
    return {suite: _rate(record["overall"]) for suite, record in doc["suites"].items()}


def float_part(doc: dict) -> dict:
    if doc.get("format") != "qvla-eval":
        raise ValueError("--eval is not a `qvla eval` results file")
    settings = doc.get("settings", {})
    return {**_rate(doc["overall"]), "suite": settings.get("suite"), "policy": settings.get("policy")}


def methods_part(doc: dict) -> dict:
    if doc.get("format") != "qvla-compare":
        raise ValueError("--compare is not a `qvla compare` compare.json")
    rows = {r["method"]["name"]: r for r in doc["rows"]}
    fp = rows.get("fp", {}).get("closed_loop")
    out = {}
    for name, row in rows.items():
        loop, memory = row.get("closed_loop"), row["memory"]
        entry = {"whole_policy_bits": memory.get("policy_bits_per_param"),
                 "bits_per_param": memory["bits_per_param"], "budget": row.get("budget")}
        if loop is not None:
            entry.update(success=loop["overall"]["rate"], ci95=loop["overall"]["ci95"],
                         episodes=loop["overall"]["episodes"])
            if fp is not None and fp["overall"]["rate"] > 0:
                entry["of_float"] = loop["overall"]["rate"] / fp["overall"]["rate"]
        paired = row.get("paired") or {}
        for key in ("vs_fp", "vs_best_baseline"):
            if paired.get(key):
                entry[key] = paired[key]
        out[name] = entry
    return {"suite": doc["settings"].get("suite"), "dtype": doc["settings"].get("dtype", "float32"),
            "episodes_per_task": doc["settings"]["episodes_per_task"], "rows": out}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--expert", type=Path, default=None)
    ap.add_argument("--eval", type=Path, default=None, help="the float policy's `qvla eval` results.json")
    ap.add_argument("--compare", type=Path, default=None, help="`qvla compare`'s compare.json")
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args(argv)
    doc = {"format": "qvla-libero-results", "version": 1, "sources": {}}
    for key, path, part in (("expert_success", args.expert, expert_part), ("float_success", args.eval, float_part),
                            ("methods", args.compare, methods_part)):
        if path is not None:
            doc[key] = part(json.loads(path.read_text()))
            doc["sources"][key] = str(path)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(doc, indent=1) + "\n")
    print(f"results.py: {', '.join(k for k in doc if k not in ('format', 'version', 'sources'))} -> {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
