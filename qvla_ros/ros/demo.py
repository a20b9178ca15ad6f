"""`qvla demo`: the closed loop through real DDS. Starts qvla_sim_bridge and qvla_policy_node as
separate processes with the same parameter files as launch/demo.launch.py, runs the episodes,
swaps the bit plan through `~/reload_plan` halfway, and prints success and latency.

    qvla demo                                  # every task once, shipped policy + shipped plans
    qvla demo --tasks drawer-open,drawer-close --episodes-per-task 3 --verbose
    qvla demo --suite libero-object --checkpoint ckpt/oft --tasks 0,1   # LIBERO: two 224 px
        cameras, 8 proprio values (the node's proprio_names set to LIBERO's), 8 x 7 chunks
"""
from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

__all__ = ["register"]

POLICY_PARAMS = ("policy_node.yaml", "demo.yaml")
BRIDGE_PARAMS = ("sim_bridge.yaml", "demo.yaml")


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "demo", help="the ROS 2 demo: sim bridge + policy node over DDS",
        description="Runs the benchmark through ROS 2: qvla_sim_bridge publishes the cameras, "
                    "proprio and instruction, qvla_policy_node answers with action chunks, both "
                    "as separate processes over DDS. The bit plan is reloaded halfway through. "
                    "Settings come from config/policy_node.yaml, sim_bridge.yaml and demo.yaml.")
    from qvla_ros.sim.benchmarks import DEFAULT_SUITE, SUITES

    p.add_argument("--suite", choices=SUITES, default=DEFAULT_SUITE,
                   help="benchmark the bridge serves (LIBERO needs --checkpoint: the shipped "
                        "policy is MetaWorld's)")
    p.add_argument("--tasks", default=None,
                   help="comma-separated suite tasks (default: every task of the suite)")
    p.add_argument("--max-steps", type=int, default=0,
                   help="steps after which an episode counts as failed (default: the suite's)")
    p.add_argument("--episodes-per-task", type=int, default=1)
    p.add_argument("--seed-offset", type=int, default=0, help="held-out seed block, as qvla eval")
    p.add_argument("--checkpoint", default=None,
                   help="policy checkpoint directory (default: the shipped policy)")
    p.add_argument("--plan", default=None,
                   help="bit plan to start with (default: demo.yaml's; 'none' = full precision)")
    p.add_argument("--reload-plan", default=None,
                   help="bit plan swapped in halfway (default: demo.yaml's; 'none' = no reload)")
    p.add_argument("--domain-id", type=int, default=None,
                   help="ROS_DOMAIN_ID for the demo's nodes (default: the environment's)")
    p.add_argument("--timeout", type=float, default=1800.0, help="give up after this many seconds")
    p.add_argument("--verbose", action="store_true", help="show the nodes' own log lines")
    p.add_argument("--json", type=Path, default=None, help="also write the results here")
    p.set_defaults(func=run)


def _demo_settings() -> dict:
    """The plans named in config/demo.yaml."""
    import yaml

    from qvla_ros.ros.paths import config_file

    doc = yaml.safe_load(Path(config_file("demo.yaml")).read_text()) or {}

    def section(node):
        for key, value in doc.items():
            if key.split("/")[-1] == node:
                return (value or {}).get("ros__parameters", {})
        return {}

    return {"plan": section("qvla_policy_node").get("plan", ""),
            "reload_plan": section("qvla_demo").get("reload_plan", "")}


def _choose_plan(asked: str | None, configured: str, role: str) -> str:
    """The plan file to use ("" = none), saying why when the configured one is not there."""
    from qvla_ros.ros.paths import resolve

    if asked is not None:
        if asked.lower() == "none":
            return ""
        if not os.path.isfile(resolve(asked)):
            raise SystemExit(f"qvla demo: no plan file at {asked!r} ({role})")
        return resolve(asked)
    if configured and os.path.isfile(resolve(configured)):
        return resolve(configured)
    if configured:
        what = "serving full precision" if role == "start" else "no plan reload halfway"
        print(f"qvla demo: the shipped plan {configured!r} is not there (no plans shipped in "
              f"config/plans/ yet?): {what}", file=sys.stderr)
    return ""


def run(args) -> int:
    from qvla_ros.ros.harness import NodeProcess
    from qvla_ros.ros.transport import apply_transport
    from qvla_ros.ros.paths import config_file
    from qvla_ros.sim.benchmarks import DEFAULT_SUITE, get_benchmark

    if args.episodes_per_task < 1 or args.seed_offset < 0 or args.max_steps < 0:
        raise SystemExit("qvla demo: --episodes-per-task must be >= 1, --seed-offset and "
                         "--max-steps >= 0")
    bench = get_benchmark(args.suite)
    try:
        tasks = [t.name for t in bench.resolve_tasks(args.tasks)]
        for episode in range(args.episodes_per_task):
            bench.eval_seed(episode, args.seed_offset)
    except ValueError as exc:
        raise SystemExit(f"qvla demo: {exc}") from None
    settings = _demo_settings()
    if bench.name != DEFAULT_SUITE:
        # demo.yaml's plans belong to the shipped MetaWorld policy: another suite's checkpoint
        # starts without a plan unless one is named.
        if not args.checkpoint:
            raise SystemExit(f"qvla demo: --suite {bench.name} needs --checkpoint (a policy with "
                             f"{bench.action_dim}-d actions, {bench.proprio_dim} proprio values; "
                             "the shipped policy is MetaWorld's)")
        settings = {"plan": "", "reload_plan": ""}
    plan = _choose_plan(args.plan, settings["plan"], "start")
    reload_plan = _choose_plan(args.reload_plan, settings["reload_plan"], "reload")
    total = len(tasks) * args.episodes_per_task

    env = dict(os.environ)
    if args.domain_id is not None:
        env["ROS_DOMAIN_ID"] = str(args.domain_id)
    # Both nodes run on this machine: discover on it only, unless the user chose otherwise.
    env.setdefault("ROS_AUTOMATIC_DISCOVERY_RANGE", "LOCALHOST")
    # Camera frames over ~512 KiB need the shipped transport profile (qvla_ros/ros/transport.py);
    # this process's monitor node uses it too, so it goes into os.environ before rclpy.init.
    apply_transport(env)
    os.environ.update({k: env[k] for k in ("ROS_DOMAIN_ID", "ROS_AUTOMATIC_DISCOVERY_RANGE",
                                           "FASTDDS_DEFAULT_PROFILES_FILE") if k in env})
    print(f"qvla demo: {total} episode(s) of {bench.name} {', '.join(tasks)} through ROS 2 "
          f"(ROS_DOMAIN_ID={env.get('ROS_DOMAIN_ID', '0')}); policy "
          f"{args.checkpoint or 'shipped'}, plan {_label(plan)}"
          + (f", reloading {_label(reload_plan)} halfway" if reload_plan else ""), flush=True)

    policy_overrides = {"plan": plan}
    if bench.name != DEFAULT_SUITE:
        # The JointState names the bridge publishes for this suite (policy_node.yaml's are
        # MetaWorld's four).
        policy_overrides["proprio_names"] = list(bench.proprio_names)
    if args.checkpoint:
        policy_overrides["checkpoint"] = str(Path(args.checkpoint).resolve())
    policy = NodeProcess.start("qvla_policy_node", [config_file(f) for f in POLICY_PARAMS],
                               overrides=policy_overrides, env=env, echo=args.verbose)
    bridge = NodeProcess.start("qvla_sim_bridge", [config_file(f) for f in BRIDGE_PARAMS],
                               overrides={"suite": bench.name, "tasks": tasks,
                                          "episodes_per_task": args.episodes_per_task,
                                          "seed_offset": args.seed_offset,
                                          "max_steps": args.max_steps},
                               env=env, echo=args.verbose)
    start = time.monotonic()
    try:
        report = _watch(policy, bridge, total, reload_plan, args.timeout)
        report["wall_s"] = time.monotonic() - start
    finally:
        bridge.stop()
        policy.stop()
    _print_report(report, plan, reload_plan)
    if args.json is not None:
        args.json.write_text(json.dumps(report, indent=2))
    return 0 if report["summary"] is not None else 1


def _label(plan: str) -> str:
    return Path(plan).name if plan else "none (full precision)"


def _plan_names(*plans: str) -> dict[str, str]:
    """{plan id: file name} of the plans used, for the report ("" = full precision). The id is
    read from the plan file's JSON (no model needed)."""
    names = {"": "full precision"}
    for plan in plans:
        if plan:
            try:
                names[json.loads(Path(plan).read_text())["plan_id"]] = Path(plan).name
            except (OSError, ValueError, KeyError, TypeError):
                pass
    return names


def _watch(policy, bridge, total: int, reload_plan: str, timeout: float) -> dict:
    """Follow the run from a monitor node until the bridge's summary; reload halfway."""
    import rclpy
    from tqdm import tqdm

    from qvla_ros.ros.demo_monitor import DemoMonitor

    rclpy.init()
    monitor = DemoMonitor().spin_in_background()
    bar = tqdm(total=total, desc="episodes", unit="ep", file=sys.stdout)
    reload = None
    deadline = time.monotonic() + timeout
    try:
        while monitor.summary is None:
            for proc in (policy, bridge):
                if proc.popen.poll() is not None and monitor.summary is None:
                    time.sleep(1.0)  # a summary published just before the exit may be in flight
                    if monitor.summary is None:
                        raise SystemExit(f"qvla demo: {proc.name} exited (code "
                                         f"{proc.popen.returncode}):\n{proc.output_unlocked()}")
            if time.monotonic() > deadline:
                raise SystemExit(f"qvla demo: not done after {timeout:.0f} s")
            done = len(monitor.episodes)
            if done > bar.n:
                last = monitor.episodes[-1]
                bar.set_postfix(success=f"{sum(e['success'] for e in monitor.episodes)}/{done}",
                                last=f"{last['task']} {'ok' if last['success'] else 'fail'}")
                bar.update(done - bar.n)
            if reload_plan and reload is None and done >= total // 2 and total > 1:
                bar.write(f"reloading {_label(reload_plan)} through "
                          f"{monitor.reload_client.srv_name} after episode {done} ...")
                reload = {"after_episode": done, "plan": reload_plan, "sent": time.monotonic()}
                reload["future"] = monitor.reload_client.call_async(
                    monitor.reload_request(reload_plan))
            if reload is not None and "answer" not in reload and reload["future"].done():
                answer = reload["future"].result()
                reload.update(answer={"success": answer.success, "message": answer.message,
                                      "active_plan_id": answer.active_plan_id},
                              seconds=time.monotonic() - reload["sent"])
                bar.write(f"reload {'done' if answer.success else 'REFUSED'}: {answer.message}")
            time.sleep(0.05)
        bar.update(len(monitor.episodes) - bar.n)
    finally:
        bar.close()
        stats = monitor.chunk_stats()
        episodes, summary = list(monitor.episodes), monitor.summary
        monitor.close()
        rclpy.try_shutdown()
    if reload is not None:
        reload.pop("future", None)
        reload.pop("sent", None)
    return {"episodes": episodes, "summary": summary, "chunks": stats, "reload": reload}


def _print_report(report: dict, plan: str, reload_plan: str) -> None:
    import numpy as np

    episodes, summary, chunks = report["episodes"], report["summary"], report["chunks"]
    names = _plan_names(plan, reload_plan)

    def name(plan_id):
        return f"{names[plan_id]} ({plan_id})" if plan_id and plan_id in names else names.get(
            plan_id, plan_id)

    print(f"\n {'#':>3}  {'task':<14} {'seed':>8}  {'result':<8} {'steps':>5}  plan(s)")
    for i, e in enumerate(episodes, 1):
        plans = ", ".join(name(p) for p in e["plan_ids"])
        print(f" {i:>3}  {e['task']:<14} {e['seed']:>8}  "
              f"{'success' if e['success'] else 'failure':<8} {e['steps']:>5}  {plans}")
    k, n = summary["successes"], summary["episodes"]
    print(f"\nsuccess: {k}/{n} ({100 * k / max(n, 1):.0f}%); episodes took "
          f"{summary['wall_s']:.0f} s, {report['wall_s']:.0f} s with start-up")
    by_plan: dict[str, list[bool]] = {}
    for e in episodes:
        if len(e["plan_ids"]) == 1:
            by_plan.setdefault(name(e["plan_ids"][0]), []).append(e["success"])
    if len(by_plan) > 1:
        print("  per plan (episodes served by one plan): " + "; ".join(
            f"{p}: {sum(v)}/{len(v)}" for p, v in by_plan.items()))
    if report["reload"] is not None:
        r = report["reload"]
        answer = r.get("answer") or {"message": "no answer"}
        took = f" in {r['seconds']:.2f} s" if "seconds" in r else ""
        print(f"reload after episode {r['after_episode']} ({_label(r['plan'])}): "
              f"{answer['message']}{took}")

    def pct(values, q):
        return float(np.percentile(np.asarray(values) * 1e3, q)) if values else float("nan")

    print(f"latency over {len(chunks['latency'])} chunks (ms, p50 / p99):")
    print(f"  policy forward               {pct(chunks['inference'], 50):7.1f} / "
          f"{pct(chunks['inference'], 99):7.1f}")
    print(f"  image in -> chunk out (node) {pct(chunks['latency'], 50):7.1f} / "
          f"{pct(chunks['latency'], 99):7.1f}")
    print(f"  bridge round trip over DDS   {summary['round_trip_ms_p50']:7.1f} / "
          f"{summary['round_trip_ms_p99']:7.1f}")
