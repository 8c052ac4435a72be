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
with `sleep` alone, go on afterwards. With `"nth": N` it applies to the Nth call of the
subcommand only (counted in calls.log); with `"with": WORD` only to its calls whose argv
has WORD (`{"get": {"with": "origin", ...}}`: the clones read alone); with `"after": true`
the call does its work first and fails afterwards (a call cut short once its change was
made). An argv this fake does not know fails with status 2.

Datasets may carry `origin` (a clone's snapshot) and `mounted` (`yes`/`no`, filesystems);
`clone`, `promote`, `rename`, `mount`, `unmount` and `destroy` of a dataset change them as
zfs does; zfs-fuse renames no mounted filesystem ("dataset is busy").
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
    "mounted",
    "mountpoint",
    "written",
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
    if ":" in prop:
        return dataset.get("props", {}).get(prop, "-")
    if prop in SNAPSHOT_PROPS:
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
    """`zfs set k=v ... <name> ...` (user properties of snapshots and datasets); zfs-fuse
    takes one property and one name."""
    pairs = [kv for kv in args if "=" in kv]
    names = args[len(pairs):]
    if not pairs or not names or any("=" in n for n in names):
        return "", "missing arguments\n", 2
    if len(args) > 2 and state["flavour"] == "zfs-fuse":
        return "", "cannot open '" + args[1] + "': invalid dataset name\n", 1
    targets = []
    for name in names:
        if name in state["snapshots"]:
            targets.append(state["snapshots"][name]["props"])
        elif name in state["datasets"]:
            targets.append(state["datasets"][name].setdefault("props", {}))
        else:
            raise Fail(missing(name))
    for props in targets:
        for kv in pairs:
            k, v = kv.split("=", 1)
            props[k] = v
    return "", "", 0


def cmd_destroy(state, args):
    if len(args) != 1:
        raise Fail(f"fake zfs: unexpected destroy {args}\n", 2)
    name = args[0]
    if name in state["datasets"]:
        below = children(state, name, None)
        if below:
            raise Fail(
                f"cannot destroy '{name}': filesystem has children\n"
                "use '-r' to destroy the following datasets:\n" + "".join(b + "\n" for b in below)
            )
        del state["datasets"][name]
        return "", "", 0
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
    # OpenZFS 2.3: a zvol with data rolled back reports `written` 1024, not 0
    # (docs/lab.md#a-rolled-back-zvol-is-not-written-0).
    if "written" in state["datasets"][dataset]:
        state["datasets"][dataset]["written"] = 1024
    return "", "", 0


def cmd_clone(state, args):
    _, values, operands = options(args, set(), {"-o"})
    if len(operands) != 2:
        raise Fail(f"fake zfs: unexpected clone {args}\n", 2)
    snap, target = operands
    if snap not in state["snapshots"]:
        raise Fail(missing(snap))
    if target in state["datasets"]:
        raise Fail(f"cannot create '{target}': dataset already exists\n")
    if target.rpartition("/")[0] not in state["datasets"]:
        raise Fail(f"cannot create '{target}': parent does not exist\n")
    source = state["datasets"][snap.partition("@")[0]]
    props = dict(kv.split("=", 1) for kv in values.get("-o", []))
    volume = source["type"] == "volume"
    state["datasets"][target] = {
        "type": source["type"],
        "available": source["available"],
        "referenced": state["snapshots"][snap]["referenced"],
        "usedbydataset": 0,
        "refreservation": int(props.get("refreservation", 0)),
        "usedbyrefreservation": int(props.get("refreservation", 0)),
        "origin": snap,
        "mounted": "-" if volume else "yes",
    }
    return "", "", 0


def cmd_promote(state, args):
    if len(args) != 1 or args[0] not in state["datasets"]:
        raise Fail(missing(args[0] if args else ""))
    clone = args[0]
    origin = state["datasets"][clone].get("origin", "-")
    if origin == "-":
        raise Fail(f"cannot promote '{clone}': not a cloned filesystem\n")
    parent, _, _ = origin.partition("@")
    txg = state["snapshots"][origin]["createtxg"]
    moving = [
        n for n, v in state["snapshots"].items()
        if n.startswith(parent + "@") and v["createtxg"] <= txg
    ]
    for name in moving:
        if f"{clone}@{name.partition('@')[2]}" in state["snapshots"]:
            raise Fail(f"cannot promote '{clone}': conflicting snapshot names\n")
    renamed = {n: f"{clone}@{n.partition('@')[2]}" for n in moving}
    for old, new in renamed.items():
        state["snapshots"][new] = state["snapshots"].pop(old)
    for d in state["datasets"].values():
        if d.get("origin", "-") in renamed:
            d["origin"] = renamed[d["origin"]]
    state["datasets"][clone]["origin"] = state["datasets"][parent].get("origin", "-")
    state["datasets"][parent]["origin"] = renamed[origin]
    return "", "", 0


def cmd_rename(state, args):
    if len(args) != 2:
        raise Fail(f"fake zfs: unexpected rename {args}\n", 2)
    old, new = args
    if old not in state["datasets"]:
        raise Fail(missing(old))
    if new in state["datasets"]:
        raise Fail(f"cannot rename to '{new}': dataset already exists\n")
    if state["flavour"] == "zfs-fuse" and state["datasets"][old].get("mounted") == "yes":
        raise Fail(f"cannot rename '{old}': dataset is busy\n")

    def moved(name):
        for mark in ("@", "#", "/"):
            if name.startswith(old + mark):
                return new + name[len(old):]
        return new if name == old else name

    for kind in ("datasets", "snapshots", "bookmarks"):
        state[kind] = {moved(n): v for n, v in state[kind].items()}
    for d in state["datasets"].values():
        if d.get("origin", "-") != "-":
            d["origin"] = moved(d["origin"])
    return "", "", 0


def mounting(mounted):
    def cmd(state, args):
        if len(args) != 1 or args[0] not in state["datasets"]:
            raise Fail(missing(args[0] if args else ""))
        dataset = state["datasets"][args[0]]
        if dataset["type"] != "filesystem":
            raise Fail(f"cannot mount '{args[0]}': not a filesystem\n")
        dataset["mounted"] = mounted
        return "", "", 0

    return cmd


def calls_so_far(folder, command):
    """How many calls of `command` calls.log has (this one included), probes left out."""
    with open(os.path.join(folder, "calls.log")) as log:
        argvs = [json.loads(line) for line in log]
    return sum(1 for a in argvs if a and a[0] == command and a not in PROBES)


def fault(state, args, folder):
    """The fault for this call, after its sleep; None when there is none."""
    command = args[0]
    f = state.get("faults", {}).get(command)
    if not f or ("nth" in f and calls_so_far(folder, command) != f["nth"]):
        return None
    if "with" in f and f["with"] not in args:
        return None
    time.sleep(f.get("sleep", 0))
    if "stderr" not in f:
        return None
    if not f.get("after"):
        raise Fail(f["stderr"], f.get("status", 1))
    return f


# The capability probes (shared/src/zfs/mod.rs, Zfs::capabilities): never faulted.
PROBES = (["snapshot"], ["list", "-H", "-p", "-o", "name", "-d", "0"])
COMMANDS = {
    "get": cmd_get,
    "list": cmd_list,
    "snapshot": cmd_snapshot,
    "set": cmd_set,
    "destroy": cmd_destroy,
    "rollback": cmd_rollback,
    "clone": cmd_clone,
    "promote": cmd_promote,
    "rename": cmd_rename,
    "mount": mounting("yes"),
    "unmount": mounting("no"),
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
            late = fault(state, args, folder) if args not in PROBES else None
            out, err, status = command(state, args[1:])
            if late and status == 0:
                # The change is made (and written below), then the call fails.
                new = json.dumps(state, indent=1)
                f.seek(0)
                f.truncate()
                f.write(new)
                text = new
                out, err, status = "", late["stderr"], late.get("status", 1)
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
