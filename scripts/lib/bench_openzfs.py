"""The bench's OpenZFS part (`scripts/bench`, or alone with `--only openzfs`): the figures on
real OpenZFS zvols, in the OpenZFS lab guest where the pool is (target/lab-bench-openzfs
unless EVESNAP_OPENZFS_LAB_DIR says otherwise).

The tools (the static release build, shown live at /opt/evesnap/bin) run in the guest against
its own qemu-ga on vsock loopback, so a freeze freezes the zvols' ext4. For 1 and 2 zvols,
interleaved, `reps` each:

  floor         scripts/bench.d/floor-client: guest-fsfreeze-freeze-list, one `zfs snapshot`
                of the zvols, thaw, on a connection opened before
  orchestrator  `snap-orchestrate` create: freeze_window_ms (flush_first, expedite_rcu off)
  pipeline      `qga-freeze | zsnap | qga-thaw`: thawed_at − frozen_at

then, with paced writers on the first- and last-frozen zvol's ext4, the orchestrator with the
plan's defaults: the worst writer's stall over the window; and a consistency group of two
agents (two qemu-ga's on vsock ports of their own, each in a mount namespace that shows only
its zvol's ext4: two VMs as far as the host can tell) against the first agent alone on its zvol. One
guest cannot stand in for several VMs snapshotted at once (they would share one vCPU), so
`concurrent_vm_over_alone` is the zfs-fuse lab's only.
"""

import json
import os
import statistics
import subprocess
import sys
import time
from datetime import datetime
from pathlib import Path

from qga import Agent

GROUP_AGENT_PORTS = (10081, 10082)


def say(msg):
    print(f"bench: openzfs: {msg}", file=sys.stderr, flush=True)


def median(values):
    return round(statistics.median(values), 3) if values else None


class Guest:
    """The OpenZFS lab guest through its control agent (one connection per call)."""

    def __init__(self, lab):
        self.lab = lab
        self.path = lab["agent"].removeprefix("unix:")
        self.bin = lab["guest_bin"]

    def sh(self, script, timeout=120):
        with Agent(self.path, timeout=30) as agent:
            return agent.sh(script, timeout=timeout)

    def tool(self, argv, stdin=None):
        """A tool of ours in the guest, `stdin` piped in; its document."""
        script = 'cd /tmp; doc=$1; shift; printf "%s" "$doc" | "$@"'
        with Agent(self.path, timeout=30) as agent:
            code, out, err = agent.exec(["/bin/sh", "-c", script, "sh", stdin or "", f"{self.bin}/{argv[0]}",
                                         *argv[1:]], timeout=120)
        if code != 0:
            raise SystemExit(f"bench: openzfs: {argv[0]} exited {code}: {err.strip()}\n{out}")
        return json.loads(out)

    def upload(self, local, remote):
        with Agent(self.path, timeout=30) as agent:
            agent.upload(Path(local).read_bytes(), remote)


def plan(agent, zvols, mounts, name, freeze):
    return {"version": 1, "agent": agent, "datasets": zvols, "snapshot": name,
            "freeze": {"mountpoints": mounts, "timeout_s": 30, "thaw_after_s": 60, **freeze}}


def orchestrator_once(g, agent, zvols, mounts, name, freeze):
    """`snap-orchestrate` in the guest; its report."""
    return g.tool(["snap-orchestrate"], json.dumps(plan(agent, zvols, mounts, name, freeze)))


def floor_once(g, agent, zvols, mounts, name):
    argv = ["/run/floor-client", agent, json.dumps(mounts), "zfs", "snapshot", *[f"{z}@{name}" for z in zvols]]
    out = g.sh(" ".join(f"'{a}'" for a in argv))
    return float(out.split()[3])


def pipeline_once(g, agent, zvols, mounts, name):
    b = g.bin
    freeze = " ".join([f"{b}/qga-freeze --agent {agent}"] + [f"--mountpoint {m}" for m in mounts])
    snap = " ".join([f"{b}/zsnap --name {name}"] + [f"--dataset {z}" for z in zvols])
    doc = json.loads(g.sh(f"cd /tmp; {freeze} | {snap} | {b}/qga-thaw"))
    steps = {s["tool"]: s for s in doc["steps"]}
    return (steps["qga-thaw"]["thawed_at_unix_us"] - steps["qga-freeze"]["frozen_at_unix_us"]) / 1000


def forget(g, prefix):
    g.sh(f"for s in $(zfs list -H -o name -t snapshot -r {g.lab['pool']} | grep -F '@{prefix}'); do "
         "zfs destroy \"$s\"; done; true")


def freeze_order(g, mounts):
    text = g.sh("cat /proc/self/mountinfo")
    order = [line.split()[4] for line in text.splitlines() if len(line.split()) > 4]
    return sorted(mounts, key=lambda m: -order.index(m) if m in order else 0)


def run_span_us(report):
    """The run on the guest's clock: its first step's start to its last step's end (µs)."""
    def start(step):
        return datetime.fromisoformat(step["started_at"].replace("Z", "+00:00")).timestamp() * 1e6
    steps = report["steps"]
    return start(steps[0]) - 5000, start(steps[-1]) + steps[-1]["duration_ms"] * 1000 + 5000


def measure_stall(g, agent, zvols, mounts, reps, writer, defaults):
    """Writers on the first- and last-frozen ext4, the orchestrator with the plan's defaults:
    per run the window and each writer's longest write() call (ms)."""
    order = freeze_order(g, mounts)
    writers = [("first_frozen", order[0])] + ([("last_frozen", order[-1])] if len(order) > 1 else [])
    seconds = int(reps * 6 + 30)
    args = f"{seconds} {writer['threshold_us']} {writer['record_bytes']} {writer['bytes_per_s']} {writer['file_bytes']}"
    g.sh("; ".join(f"( /run/stall-writer {m}/stall.dat /run/oz-stall-{label}.log {args} ) </dev/null >/dev/null "
                   f"2>&1 & echo $! > /run/oz-stall-{label}.pid" for label, m in writers))
    time.sleep(1.0)
    runs = []
    try:
        for i in range(reps):
            report = orchestrator_once(g, agent, zvols, mounts, f"bo-stall-{len(zvols)}-{i}", defaults)
            runs.append((report["freeze_window_ms"], run_span_us(report)))
            time.sleep(1.0)
    finally:
        g.sh("; ".join(f"kill $(cat /run/oz-stall-{label}.pid) 2>/dev/null" for label, _ in writers)
             + "; sleep 0.3; " + "; ".join(f"rm -f {m}/stall.dat" for _, m in writers) + "; true")
    logs = {}
    for label, _ in writers:
        logs[label] = [(int(line.split()[0]), int(line.split()[1]) / 1000)
                       for line in g.sh(f"cat /run/oz-stall-{label}.log").splitlines()
                       if line and not line.startswith("#")]
    result = {"window": [], "worst": [], **{label: [] for label, _ in writers}}
    for window, (lo, hi) in runs:
        stalls = {label: max((ms for at, ms in logs[label] if lo <= at <= hi), default=0.0) for label in logs}
        result["window"].append(window)
        result["worst"].append(max(stalls.values()))
        for label, ms in stalls.items():
            result[label].append(ms)
    return result


def start_agents(g, mounts):
    """Two qemu-ga's on vsock ports of their own, each in a mount namespace that shows only its
    own zvol's ext4 (as in two VMs, neither agent's thaw reaches the other's filesystem); their
    addresses."""
    addresses = []
    for i, port in enumerate(GROUP_AGENT_PORTS):
        hide = mounts[1 - i]
        g.sh(f"[ -e /run/qga-bench-{port}.pid ] && kill $(cat /run/qga-bench-{port}.pid) 2>/dev/null; "
             f"mkdir -p /run/qga-bench-{port}; unshare -m --propagation private sh -c 'umount {hide} && exec "
             f"/usr/bin/qemu-ga -d -f /run/qga-bench-{port}.pid -m vsock-listen -p 1:{port} -t /run/qga-bench-{port}'")
        addresses.append(f"vsock:1:{port}")
    for address in addresses:
        for _ in range(100):
            try:
                g.sh(f"/usr/bin/qga-client {address} '{{\"execute\":\"guest-ping\"}}'")
                break
            except Exception:  # noqa: BLE001 (not up yet)
                time.sleep(0.2)
        else:
            raise SystemExit(f"bench: openzfs: the agent on {address} does not answer")
    return addresses


def measure_group(g, zvols, mounts, reps):
    """The group (two agents, one zvol each) and the first agent alone on its zvol."""
    agents = start_agents(g, mounts)
    off = {"flush_first": False, "expedite_rcu": False}
    alone, group = [], []
    try:
        for i in range(reps):
            alone.append(orchestrator_once(g, agents[0], zvols[:1], mounts[:1], f"bo-alone-{i}", off)
                         ["freeze_window_ms"])
            gplan = {"version": 1, "snapshot": f"bo-group-{i}", "freeze": {"timeout_s": 30, "thaw_after_s": 60},
                     "vms": [{"agent": a, "datasets": [z], "mountpoints": [m]}
                             for a, z, m in zip(agents, zvols, mounts)]}
            group.append(g.tool(["snap-orchestrate"], json.dumps(gplan))["freeze_window_ms"])
            forget(g, "bo-")
    finally:
        g.sh("; ".join(f"kill $(cat /run/qga-bench-{p}.pid) 2>/dev/null; rm -rf /run/qga-bench-{p}*"
                       for p in GROUP_AGENT_PORTS) + "; true")
    return alone, group


def run(repo, static_bin, reps, keep_lab, tools, writer, defaults, summary):
    """The OpenZFS part; its result (medians, ratios, detail)."""
    lab_dir = Path(os.environ.get("EVESNAP_OPENZFS_LAB_DIR") or repo / "target/lab-bench-openzfs")
    env = dict(os.environ, EVESNAP_LAB_DIR=str(lab_dir), EVESNAP_GUEST_BIN_DIR=str(static_bin))
    env.pop("EVESNAP_LAB_POOL", None)
    say(f"bringing the OpenZFS lab up ({lab_dir})")
    lab = json.loads(subprocess.run([str(repo / "scripts/lab"), "up", "--openzfs"], env=env, check=True,
                                    capture_output=True, text=True, stdin=subprocess.DEVNULL).stdout)
    g = Guest(lab)
    agent = lab["guest_agent"]
    zvols = lab["zvols"]
    mounts = [lab["guest_mounts"][z] for z in zvols]
    for tool in ("floor-client", "stall-writer"):
        g.upload(tools[tool], f"/run/{tool}")
    off = {"flush_first": False, "expedite_rcu": False}
    detail, ratios_by = {}, {}
    try:
        forget(g, "bo-")
        for n in range(1, len(zvols) + 1):
            zs, ms = zvols[:n], mounts[:n]
            say(f"{n} zvol(s): floor, orchestrator, pipeline, interleaved")
            w = {"floor": [], "orchestrator": [], "pipeline": []}
            for i in range(reps):
                kinds = list(w)[i % 3:] + list(w)[:i % 3]
                for kind in kinds:
                    name = f"bo-{kind}-{n}-{i}"
                    if kind == "floor":
                        w[kind].append(floor_once(g, agent, zs, ms, name))
                    elif kind == "orchestrator":
                        w[kind].append(orchestrator_once(g, agent, zs, ms, name, off)["freeze_window_ms"])
                    else:
                        w[kind].append(pipeline_once(g, agent, zs, ms, name))
                forget(g, "bo-")
            say(f"{n} zvol(s): writers on the zvols' ext4, the plan's defaults")
            stall = measure_stall(g, agent, zs, ms, reps, writer, defaults)
            forget(g, "bo-")
            d = {**{f"{k}_ms": summary(v) for k, v in w.items()},
                 "stall": {k: summary(v) for k, v in stall.items()}}
            detail[str(n)] = d
            med = {k: d[f"{k}_ms"]["median"] for k in w}
            ratios_by[str(n)] = {
                "orchestrator_over_floor": round(med["orchestrator"] / med["floor"], 3),
                "pipeline_minus_floor_ms": round(med["pipeline"] - med["floor"], 3),
                "worst_stall_over_window": round(d["stall"]["worst"]["median"] / d["stall"]["window"]["median"], 3)}
            say(f"{n} zvol(s): floor {med['floor']} ms, orchestrator {med['orchestrator']} ms, pipeline "
                f"{med['pipeline']} ms; worst stall/window {ratios_by[str(n)]['worst_stall_over_window']}")
        say("a group of two agents against one alone")
        alone, group = measure_group(g, zvols, mounts, reps)
    finally:
        forget(g, "bo-")
        if not keep_lab:
            subprocess.run([str(repo / "scripts/lab"), "down", "--purge", "--openzfs"], env=env, capture_output=True,
                           stdin=subprocess.DEVNULL)
    ratios = {key: max(r[key] for r in ratios_by.values()) for key in next(iter(ratios_by.values()))}
    ratios["worst_stall_over_window"] = {**{v: r["worst_stall_over_window"] for v, r in ratios_by.items()},
                                         "worst": ratios["worst_stall_over_window"]}
    ratios["group_over_single"] = round(median(group) / median(alone), 3)
    ratios["by_volumes"] = ratios_by
    return {"reps": reps, "machine": "TCG guest, OpenZFS 2.3 zvols, tools inside the guest on vsock loopback",
            "ratios": ratios, "detail": detail,
            "group": {"alone_ms": summary(alone), "group_ms": summary(group), "vms": 2}}
