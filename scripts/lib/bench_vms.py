"""The bench's many-VM part (`scripts/bench`, N = `--vms`, default 4): many VMs on one host.

On a lab of N VMs (EVESNAP_LAB_VMS=N, 2 disks each; target/lab-bench-vms, pool
evesnap-bench-vms unless EVESNAP_LAB_DIR / EVESNAP_LAB_POOL say otherwise), `reps` times each:

  alone       one `snap-orchestrate` of each VM by itself (every volume of the VM)
  concurrent  N orchestrations at once, one per VM: each VM's window against its window alone;
              how long each waited for its pool turn (`turn_wait_ms`, the windows of one pool take
              turns) and how long the N runs took together (`concurrent_all_runs_ms`)
  group       one consistency-group plan of all N VMs: the group's window (first freeze to
              last thaw) against one VM's window alone
  floor       what no tool can beat, the same three ways: a minimal client freezes a VM (on a
              connection opened before), takes the `zfs snapshot -r` the orchestrator takes,
              thaws; each VM alone, all VMs at once (one client each, in parallel threads), and
              the group (every VM frozen in parallel, one snapshot, every VM thawed in
              parallel): the ratios' own floors

Ratios: `concurrent_vm_over_alone` (the worst VM's median concurrent window over its median
alone) and `group_over_single` (the group's median window over VM 0's alone); scripts/bench
puts them into its result's `ratios` and the whole part under `vms`.
"""

import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time

from qga import Agent


def say(msg):
    print(f"bench: {msg}", file=sys.stderr, flush=True)


def median(values):
    return round(statistics.median(values), 3) if values else None


def lab_env(repo, vms):
    return dict(os.environ, EVESNAP_LAB_DIR=os.environ.get("EVESNAP_LAB_DIR", str(repo / "target/lab-bench-vms")),
                EVESNAP_LAB_POOL=os.environ.get("EVESNAP_LAB_POOL", "evesnap-bench-vms"),
                EVESNAP_LAB_VMS=str(vms), EVESNAP_LAB_DISKS="2")


def vm_plan(vm, name):
    return {"version": 1, "agent": vm["agent"], "datasets": vm["datasets"], "snapshot": name,
            "freeze": {"timeout_s": 30, "thaw_after_s": 60}}


def group_plan(vms, name):
    return {"version": 1, "snapshot": name, "freeze": {"timeout_s": 30, "thaw_after_s": 60},
            "vms": [{"agent": vm["agent"], "datasets": vm["datasets"]} for vm in vms]}


def start(bin_dir, plan, run_dir):
    proc = subprocess.Popen([str(bin_dir / "snap-orchestrate")], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True,
                            env=dict(os.environ, EVESNAP_RUN_DIR=run_dir, EVESNAP_LOG="quiet"))
    proc.stdin.write(json.dumps(plan))
    proc.stdin.close()
    return proc


def finished(proc):
    """The run's report."""
    out, err = proc.stdout.read(), proc.stderr.read()
    if proc.wait() != 0:
        raise SystemExit(f"bench: snap-orchestrate failed: {err}")
    return json.loads(out)


def window(proc):
    return finished(proc)["freeze_window_ms"]


def destroy_named(pool, prefix):
    listed = subprocess.run(["zfs", "list", "-H", "-o", "name", "-t", "snapshot", "-r", f"{pool}/lab"],
                            capture_output=True, text=True).stdout.split()
    for snapshot in listed:
        if snapshot.split("@", 1)[1].startswith(prefix):
            subprocess.run(["zfs", "destroy", snapshot], capture_output=True)


def in_threads(work, items):
    """`work(item)` for every item at once; the results in order."""
    results = [None] * len(items)

    def one(i):
        results[i] = work(items[i])
    threads = [threading.Thread(target=one, args=(i,)) for i in range(len(items))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return results


def floor_once(machines, parent, name):
    """Freeze `machines` in parallel (connections opened before), `zfs snapshot -r parent@name`,
    thaw in parallel: the first freeze reply to the last thaw reply, in ms."""
    agents = [Agent(vm["agent"].removeprefix("unix:"), timeout=30) for vm in machines]
    try:
        def freeze(agent):
            agent.execute("guest-fsfreeze-freeze")
            return time.monotonic()

        def thaw(agent):
            agent.execute("guest-fsfreeze-thaw")
            return time.monotonic()
        frozen = in_threads(freeze, agents)
        try:
            subprocess.run(["zfs", "snapshot", "-r", f"{parent}@{name}"], check=True, capture_output=True)
        finally:
            thawed = in_threads(thaw, agents)
    finally:
        for agent in agents:
            agent.close()
    return (max(thawed) - min(frozen)) * 1000


def common_parent(datasets):
    return os.path.commonpath(datasets)


def run(repo, bin_dir, vms, reps, keep_lab):
    env = lab_env(repo, vms)
    say(f"bringing a lab of {vms} VMs up ({env['EVESNAP_LAB_DIR']})")
    lab = json.loads(subprocess.run([str(repo / "scripts/lab"), "up"], env=env, check=True, capture_output=True,
                                    text=True, stdin=subprocess.DEVNULL).stdout)
    machines = lab["vms"][:vms]
    run_dir = tempfile.mkdtemp(prefix="evesnap-bench-vms-")
    alone = {vm["name"]: [] for vm in machines}
    concurrent = {vm["name"]: [] for vm in machines}
    turn_wait = {vm["name"]: [] for vm in machines}
    concurrent_all = []
    group = []
    floors = {"single": [], "group": []}
    floor_alone = {vm["name"]: [] for vm in machines}
    floor_concurrent = {vm["name"]: [] for vm in machines}
    try:
        for i in range(reps):
            for vm in machines:
                floor_alone[vm["name"]].append(floor_once([vm], common_parent(vm["datasets"]), f"bv-fa-{i}"))
            windows = in_threads(lambda vm: floor_once([vm], common_parent(vm["datasets"]), f"bv-fc-{i}"), machines)
            for vm, ms in zip(machines, windows):
                floor_concurrent[vm["name"]].append(ms)
            floors["single"].append(floor_alone[machines[0]["name"]][-1])
            floors["group"].append(floor_once(machines, common_parent([d for vm in machines for d in vm["datasets"]]),
                                              f"bv-fg-{i}"))
            for vm in machines:
                alone[vm["name"]].append(window(start(bin_dir, vm_plan(vm, f"bv-alone-{i}"), run_dir)))
            began = time.monotonic()
            procs = [(vm["name"], start(bin_dir, vm_plan(vm, f"bv-conc-{i}"), run_dir)) for vm in machines]
            for name, proc in procs:
                report = finished(proc)
                concurrent[name].append(report["freeze_window_ms"])
                turn_wait[name].append(report.get("pool_turn_wait_ms", 0.0))
            concurrent_all.append((time.monotonic() - began) * 1000)
            group.append(window(start(bin_dir, group_plan(machines, f"bv-group-{i}"), run_dir)))
            destroy_named(lab["pool"], "bv-")
            say(f"round {i + 1}/{reps}: alone {[alone[n][-1] for n in alone]}, concurrent "
                f"{[concurrent[n][-1] for n in concurrent]}, group {group[-1]} ms")
    finally:
        destroy_named(lab["pool"], "bv-")
        if not keep_lab:
            subprocess.run([str(repo / "scripts/lab"), "down", "--purge"], env=env, capture_output=True,
                           stdin=subprocess.DEVNULL)
    med_alone = {n: median(v) for n, v in alone.items()}
    med_conc = {n: median(v) for n, v in concurrent.items()}
    single = med_alone[machines[0]["name"]]
    ratios = {"concurrent_vm_over_alone": max(round(med_conc[n] / med_alone[n], 3) for n in med_alone),
              "concurrent_by_vm": {n: round(med_conc[n] / med_alone[n], 3) for n in med_alone},
              "group_over_single": round(median(group) / single, 3),
              "group_over_single_floor": round(median(floors["group"]) / median(floors["single"]), 3),
              "concurrent_vm_over_alone_floor": max(round(median(floor_concurrent[n]) / median(floor_alone[n]), 3)
                                                    for n in floor_alone)}
    return {"reps": reps, "vms": vms, "machine": f"{os.cpu_count()} cores, TCG guests, zfs-fuse",
            "alone_ms": med_alone, "concurrent_ms": med_conc, "group_ms": median(group), "ratios": ratios,
            "turn_wait_ms": {n: median(v) for n, v in turn_wait.items()},
            "concurrent_all_runs_ms": median(concurrent_all),
            "floor_ms": {**{k: median(v) for k, v in floors.items()},
                         "alone": {n: median(v) for n, v in floor_alone.items()},
                         "concurrent": {n: median(v) for n, v in floor_concurrent.items()}},
            "detail": {"alone_ms": alone, "concurrent_ms": concurrent, "group_ms": group, "turn_wait_ms": turn_wait,
                       "concurrent_all_runs_ms": concurrent_all,
                       "floor_ms": {**floors, "alone": floor_alone, "concurrent": floor_concurrent}}}
