"""A fake `zfs` for tests: answers the argv the zfs layer (shared/src/zfs) sends, over a
state kept in a JSON file, as OpenZFS 2.x (or zfs-fuse 0.7) does: usage texts, exit codes,
and the error texts the zfs layer recognises (the verbatim ones in shared/src/zfs/error.rs).

    python3 fake-zfs.py DIR ZFS-ARGS...

DIR holds `state.json` (read and written under an flock) and `calls.log`, where every
call appends its argv as one JSON array, before anything else (like zrepl's logmockzfs).
Tests run it through a `zfs` wrapper that passes DIR. The state:

    {"flavour": "openzfs" | "zfs-fuse",
     "txg": 100,                                  # the last transaction group
     "datasets": {"tank/vol0": {"type": "volume", "available": 1073741824,
                  "referenced": 65536, "usedbydataset": 65536, "refreservation": 0,
                  "usedbyrefreservation": 0, "origin": "-"}, ...},   # pools too
     "snapshots": {"tank/vol0@a": {"guid": "123", "createtxg": 7, "creation": 1764099000,
                   "userrefs": 0, "used": 0, "referenced": 65536,
                   "props": {"org.lfedge.evesnap:id": "..."}}, ...},
     "bookmarks": {"tank/vol0#b": {"createtxg": 8}},
     "faults": {"snapshot": {"sleep": 1.5, "stderr": "...", "status": 1}, ...}}

A fault named after a subcommand applies to its calls (not to the capability probes):
sleep first, then, with `stderr`, fail with it (status 1 by default);
with `sleep` alone, go on afterwards. An argv this fake does not know fails with status 2.
"""

import fcntl
import json
import os
import sys
import time

OPENZFS_USAGE = """missing snapshot argument
usage:
\tsnapshot [-r] [-o property=value] ... <filesystem|volume>@<snap> ...

For the property list, run: zfs set|get

For the delegated permission list, run: zfs allow|unallow
"""
FUSE_USAGE = OPENZFS_USAGE.replace(
    "<filesystem|volume>@<snap> ...", "<filesystem@snapname|volume@snapname>"
)
SNAPSHOT_PROPS = ("guid", "createtxg", "creation", "userrefs", "used", "referenced")
DATASET_PROPS = (
    "available",
    "referenced",
    "usedbydataset",
    "refreservation",
    "usedbyrefreservation",
    "origin",
    "mountpoint",
)


class Fail(Exception):
    def __init__(self, stderr, status=1):
        super().__init__(stderr)
        self.stderr = stderr
        self.status = status


def missing(name):
    return f"cannot open '{name}': dataset does not exist\n"


def value(state, name, prop):
    """A property as `zfs get -p` prints it; `-` where it does not apply."""
    if prop == "name":
        return name
    snap = state["snapshots"].get(name)
    if snap is not None:
        if prop == "type":
            return "snapshot"
        if ":" in prop:
            return snap["props"].get(prop, "-")
        return str(snap[prop]) if prop in SNAPSHOT_PROPS else "-"
    if "#" in name:
        return str(state["bookmarks"][name][prop])
    dataset = state["datasets"][name]
    if prop in ("type",) + DATASET_PROPS:
        return str(dataset.get(prop, "-"))
    if ":" in prop or prop in SNAPSHOT_PROPS:
        return "-"
    raise Fail(f"bad property list: invalid property '{prop}'\n", 2)


def exists(state, name):
    return name in state["datasets"] or name in state["snapshots"]


def children(state, dataset, depth):
    """The dataset's snapshots and child datasets, `depth` levels down (None: all)."""
    out = []
    for name in list(state["datasets"]) + list(state["snapshots"]):
        rest = name[len(dataset) :]
        if not name.startswith(dataset) or not rest:
            continue
        if rest.startswith("@"):
            out.append(name)
        elif rest.startswith("/") and (depth is None or rest.count("/") <= depth):
            out.append(name)
    return out


def options(args, flags, valued):
    """Splits `-x` flags and `-o value` options from operands."""
    seen, values, operands = set(), {}, []
    it = iter(args)
    for arg in it:
        if arg in flags:
            seen.add(arg)
        elif arg in valued:
            values.setdefault(arg, []).append(next(it))
        else:
            operands.append(arg)
    return seen, values, operands


def cmd_get(state, args):
    seen, values, names = options(args, {"-H", "-p", "-r"}, {"-o", "-d"})
    if not {"-H", "-p"} <= seen or values.get("-o") != ["name,property,value"] or not names:
        raise Fail(f"fake zfs: unexpected get {args}\n", 2)
    props, names = names[0].split(","), names[1:]
    depth = int(values["-d"][0]) if "-d" in values else None
    out, err = [], ""
    for name in names:
        if not exists(state, name):
            err += missing(name)
            continue
        rows = [name]
        if "-r" in seen or depth is not None:
            rows += children(state, name, depth)
        for row in rows:
            out += [f"{row}\t{p}\t{value(state, row, p)}" for p in props]
    return "".join(line + "\n" for line in out), err, 1 if err else 0


def cmd_list(state, args):
    seen, values, operands = options(args, {"-H", "-p", "-r"}, {"-o", "-t", "-d", "-s"})
    if "-p" in seen and state["flavour"] == "zfs-fuse":
        raise Fail("invalid option 'p'\nusage:\n\tlist [-rH][-d max] ...\n", 2)
    cols = values["-o"][0].split(",")
    if values.get("-d") == ["0"] and not operands:
        names = [d for d in state["datasets"] if "/" not in d]
    elif len(operands) == 1 and operands[0] in state["datasets"]:
        dataset, kind = operands[0], values["-t"][0]
        if kind == "filesystem,volume" and "-r" in seen:
            names = [dataset] + [
                c for c in children(state, dataset, None) if c in state["datasets"]
            ]
        elif kind == "snapshot":
            names = [s for s in state["snapshots"] if s.startswith(dataset + "@")]
        elif kind == "bookmark":
            names = [b for b in state["bookmarks"] if b.startswith(dataset + "#")]
        else:
            raise Fail(f"fake zfs: unexpected list {args}\n", 2)
        if values.get("-s") == ["createtxg"]:
            names.sort(key=lambda n: int(value(state, n, "createtxg")))
    elif len(operands) == 1:
        raise Fail(missing(operands[0]))
    else:
        raise Fail(f"fake zfs: unexpected list {args}\n", 2)
    rows = ["\t".join(value(state, n, c) for c in cols) for n in names]
    return "".join(r + "\n" for r in rows), "", 0


def cmd_snapshot(state, args):
    usage = FUSE_USAGE if state["flavour"] == "zfs-fuse" else OPENZFS_USAGE
    seen, values, names = options(args, {"-r"}, {"-o"})
    if not names:
        return "", usage, 2
    if len(names) > 1 and state["flavour"] == "zfs-fuse":
        return "", "too many arguments\n" + usage.split("\n", 1)[1], 2
    created = []
    for name in names:
        dataset, _, short = name.partition("@")
        if dataset not in state["datasets"]:
            raise Fail(missing(dataset))
        below = children(state, dataset, None) if "-r" in seen else []
        created += [name] + [f"{d}@{short}" for d in below if d in state["datasets"]]
    for name in created:
        if name in state["snapshots"]:
            raise Fail(f"cannot create snapshot '{name}': dataset already exists\n")
    state["txg"] += 1
    props = dict(kv.split("=", 1) for kv in values.get("-o", []))
    for name in created:
        dataset = state["datasets"][name.partition("@")[0]]
        state["snapshots"][name] = {
            "guid": str(int.from_bytes(os.urandom(8), "big")),
            "createtxg": state["txg"],
            "creation": int(time.time()),
            "userrefs": 0,
            "used": 0,
            "referenced": dataset["referenced"],
            "props": dict(props),
        }
    return "", "", 0


def cmd_set(state, args):
    """`zfs set k=v ... <snapshot>` (user properties of snapshots only)."""
    if len(args) < 2 or any("=" not in kv for kv in args[:-1]):
        return "", "missing arguments\n", 2
    name = args[-1]
    if len(args) > 2 and state["flavour"] == "zfs-fuse":
        return "", "cannot open '" + args[1] + "': invalid dataset name\n", 1
    if name not in state["snapshots"]:
        raise Fail(missing(name))
    for kv in args[:-1]:
        k, v = kv.split("=", 1)
        state["snapshots"][name]["props"][k] = v
    return "", "", 0


def cmd_destroy(state, args):
    if len(args) != 1:
        raise Fail(f"fake zfs: unexpected destroy {args}\n", 2)
    name = args[0]
    if "#" in name:
        if state["bookmarks"].pop(name, None) is None:
            raise Fail(missing(name))
        return "", "", 0
    snap = state["snapshots"].get(name)
    if snap is None:
        raise Fail("could not find any snapshots to destroy; check snapshot names.\n")
    if snap["userrefs"] > 0:
        raise Fail(
            f"cannot destroy snapshot {name}: it's being held. "
            f"Run 'zfs holds -r {name}' to see holders.\n"
        )
    del state["snapshots"][name]
    return "", "", 0


def cmd_rollback(state, args):
    """The zfs layer never sends `-r`: newer snapshots and bookmarks are destroyed first."""
    if len(args) != 1:
        raise Fail(f"fake zfs: unexpected rollback {args}\n", 2)
    name = args[0]
    if name not in state["snapshots"]:
        raise Fail(missing(name))
    dataset, _, _ = name.partition("@")
    txg = state["snapshots"][name]["createtxg"]
    newer = []
    for kind, mark in (("snapshots", "@"), ("bookmarks", "#")):
        ours = {n: v["createtxg"] for n, v in state[kind].items() if n.startswith(dataset + mark)}
        newer += sorted((n for n in ours if ours[n] > txg), key=lambda n: -ours[n])
    if newer:
        fuse = state["flavour"] == "zfs-fuse"
        what = "snapshots" if fuse else "snapshots or bookmarks"
        listed = "snapshots" if fuse else "snapshots and bookmarks"
        raise Fail(
            f"cannot rollback to '{name}': more recent {what} exist\n"
            f"use '-r' to force deletion of the following {listed}:\n"
            + "".join(n + "\n" for n in newer)
        )
    return "", "", 0


def fault(state, command):
    f = state.get("faults", {}).get(command)
    if not f:
        return
    time.sleep(f.get("sleep", 0))
    if "stderr" in f:
        raise Fail(f["stderr"], f.get("status", 1))


# The capability probes (shared/src/zfs/mod.rs, Zfs::capabilities): never faulted.
PROBES = (["snapshot"], ["list", "-H", "-p", "-o", "name", "-d", "0"])
COMMANDS = {
    "get": cmd_get,
    "list": cmd_list,
    "snapshot": cmd_snapshot,
    "set": cmd_set,
    "destroy": cmd_destroy,
    "rollback": cmd_rollback,
}


def main():
    folder, args = sys.argv[1], sys.argv[2:]
    with open(os.path.join(folder, "calls.log"), "a") as log:
        log.write(json.dumps(args) + "\n")
    command = COMMANDS.get(args[0] if args else "")
    if command is None:
        sys.stderr.write(f"fake zfs: unexpected {args}\n")
        return 2
    with open(os.path.join(folder, "state.json"), "r+") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        text = f.read()
        state = json.loads(text)
        try:
            if args not in PROBES:
                fault(state, args[0])
            out, err, status = command(state, args[1:])
        except Fail as e:
            out, err, status = "", e.stderr, e.status
        except (KeyError, IndexError, StopIteration, ValueError) as e:
            out, err, status = "", f"fake zfs: unexpected {args} ({e!r})\n", 2
        new = json.dumps(state, indent=1)
        if status == 0 and new != text:
            f.seek(0)
            f.truncate()
            f.write(new)
    sys.stdout.write(out)
    sys.stderr.write(err)
    return status


if __name__ == "__main__":
    sys.exit(main())
