"""The default profile: the zfs-fuse daemon on the host (started if none runs; the lab
remembers that it started it), pool `evesnap` on a sparse file in the lab folder, datasets
<pool>/lab/vm0/diskN each holding a raw ext4 image, and a VM that has those images as
virtio disks (serial diskN, PCI slot 7+N, mounted at /dataN), the real qemu-ga, and a second
virtio-serial port for VM-initiated requests."""

import json
import os
import signal
import subprocess
import time
from pathlib import Path

from .common import LabError, key_of, lab_file, log, pid_alive, read_pid, run
from .debs import apt_install, dep_names, fetch_debs
from .guest import GUEST_MODULE_TARGETS, GUEST_PACKAGES, build_guest, kernel_package, shutdown_script, write_files
from .profile import Profile
from .vm import agent_ping, launch_qemu, qemu_argv
from . import vsock


def lab_disks():
    """(serial, guest mountpoint, PCI slot) of each data disk: `diskN` at /dataN in slot 7+N.
    EVESNAP_LAB_DISKS (default 2, at most 20) sets how many; it is fixed when the VM boots."""
    text = os.environ.get("EVESNAP_LAB_DISKS", "2")
    if not text.isdigit() or not 1 <= int(text) <= 20:
        raise SystemExit(f"lab: error: EVESNAP_LAB_DISKS must be a number from 1 to 20, not {text!r}")
    return [(f"disk{i}", f"/data{i}", 0x7 + i) for i in range(int(text))]


DISKS = lab_disks()
DISK_IMAGE = "disk.img"
DISK_SIZE_MB = 64
MEMORY_MB = 256
POOL_SIZE = "2G"
REQUEST_PORT = "org.lfedge.eve.snapshot.0"
MODULE_TARGETS = GUEST_MODULE_TARGETS + vsock.GUEST_MODULES
# Host tools the lab itself runs; everything that goes into the VM is only extracted.
HOST_PACKAGES = {"zfs-fuse": "/usr/sbin/zfs-fuse", "kmod": "/usr/sbin/depmod", "cpio": "/usr/bin/cpio",
                 "e2fsprogs": "/usr/sbin/mkfs.ext4"}


# ---------------------------------------------------------------- the guest

def ensure_guest(cache):
    kernel_pkg = kernel_package()
    debs = fetch_debs(cache, GUEST_PACKAGES + [kernel_pkg])
    apt_install(sorted(set(dep_names(debs["qemu-guest-agent"][2].get("Depends", "")))))
    # scripts/lab.d/guest/; the inittab's `{hook}` is qemu-ga's fsfreeze-hook option or nothing
    # (EVESNAP_LAB_FSFREEZE_HOOK=1 makes /init pick inittab.hook).
    # A second qemu-ga listens on vsock (any CID, vsock.AGENT_PORT), reached through the hybrid
    # vsock device.
    init, shutdown = lab_file("guest/init"), shutdown_script()
    inittab = lab_file("guest/inittab", VSOCK_PORT=vsock.AGENT_PORT)
    script_hash = key_of(init, inittab, shutdown, MODULE_TARGETS)
    guest = cache / f"guest-{key_of(*(v for v, _, _ in debs.values()), script_hash)}"
    if (guest / ".complete").exists():
        return guest
    log(f"building the guest ({kernel_pkg}, qemu-ga {debs['qemu-guest-agent'][0]})")

    def populate(root, _tmp):
        write_files(root, {"etc/passwd": ("root:x:0:0:root:/root:/bin/sh\n", 0o644),
                           "etc/group": ("root:x:0:\n", 0o644),
                           "init": (init, 0o755), "etc/inittab": (inittab.format(hook=""), 0o644),
                           "etc/inittab.hook": (inittab.format(hook=" -F/etc/qemu/fsfreeze-hook"), 0o644),
                           "sbin/shutdown": (shutdown, 0o755)})

    return build_guest(cache, guest, debs, kernel_pkg, MODULE_TARGETS, populate)


# ---------------------------------------------------------------- zfs-fuse and the pool

def zfs_fuse_pid():
    res = run(["pidof", "zfs-fuse"], check=False)
    pids = res.stdout.split()
    return int(pids[0]) if pids else None


def zfs_ready():
    return run(["zpool", "list", "-H", "-o", "name"], check=False).returncode == 0


def dead_fuse_mounts():
    """Mountpoints of FUSE mounts whose daemon is gone ("Transport endpoint is not connected")."""
    dead = []
    for line in Path("/proc/mounts").read_text().splitlines():
        fields = line.split()
        if len(fields) > 2 and fields[2].startswith("fuse"):
            mnt = fields[1].replace("\\040", " ")
            try:
                os.stat(mnt)
            except OSError as e:
                if e.errno == 107:  # ENOTCONN
                    dead.append(mnt)
    return dead


def ensure_zfs_fuse(lab):
    if zfs_fuse_pid() is None:
        for mnt in dead_fuse_mounts():
            log(f"unmounting dead FUSE mount {mnt}")
            run(["umount", "-l", mnt], check=False)
        log("starting zfs-fuse")
        with open(lab / "zfs-fuse.log", "ab") as out:
            proc = subprocess.Popen(["/usr/sbin/zfs-fuse", "--no-daemon"], stdin=subprocess.DEVNULL,
                                    stdout=out, stderr=out, start_new_session=True)
        (lab / "zfs-fuse.pid").write_text(f"{proc.pid}\n")
        deadline = time.monotonic() + 30
        while not zfs_ready():
            if proc.poll() is not None or time.monotonic() > deadline:
                raise LabError(f"zfs-fuse did not start; see {lab / 'zfs-fuse.log'}")
            time.sleep(0.2)
        run(["zfs", "mount", "-a"], check=False)
    elif not zfs_ready():
        raise LabError("a zfs-fuse process runs but does not answer `zpool list`")


def pool_health(pool):
    res = run(["zpool", "list", "-H", "-o", "health", pool], check=False)
    return res.stdout.strip() if res.returncode == 0 else None


def zfs_get(prop, name):
    res = run(["zfs", "get", "-H", "-p", "-o", "value", prop, name], check=False)
    return res.stdout.strip() if res.returncode == 0 else None


def pool_is_ours(pool, vdev):
    """Only a pool on this lab's own file is this lab's to use or destroy."""
    status = run(["zpool", "status", pool], check=False).stdout
    return str(vdev) in status


def pool_files(pool):
    """The file vdevs `zpool status` names for `pool` (absolute paths)."""
    status = run(["zpool", "status", pool], check=False).stdout
    return [Path(word) for line in status.splitlines() for word in line.split()[:1]
            if word.startswith("/")]


def forget_if_stale(pool):
    """A pool that zfs-fuse imported from its cache but whose files are all gone (a deleted
    checkout's lab) holds nothing: export it so that its name can be used again."""
    files = pool_files(pool)
    if files and not any(f.exists() for f in files):
        log(f"exporting pool {pool}: its files are gone ({', '.join(map(str, files))})")
        run(["zpool", "export", "-f", pool], check=False)


def ensure_pool(lab, pool):
    vdev = lab / "pool.img"
    mnt = lab / "mnt"
    if pool_health(pool) is not None:
        forget_if_stale(pool)
    health = pool_health(pool)
    if health is None and vdev.exists():
        run(["zpool", "import", "-d", str(lab), pool], check=False)
        health = pool_health(pool)
    if health is None:
        log(f"creating pool {pool} on {vdev}")
        run(["truncate", "-s", POOL_SIZE, str(vdev)])
        run(["zpool", "create", "-m", str(mnt), pool, str(vdev)])
    elif not pool_is_ours(pool, vdev):
        raise LabError(f"a pool {pool} exists that is not this lab's (not on {vdev}): "
                       "choose another pool name (EVESNAP_LAB_POOL) or use that pool's lab folder")
    elif health != "ONLINE":
        raise LabError(f"pool {pool} is {health}; `scripts/lab down --purge` and retry")
    # Datasets can be unmounted after a daemon restart; mount what is ours.
    run(["zfs", "mount", "-a"], check=False)
    datasets = []
    for disk, _, _ in DISKS:
        ds = f"{pool}/lab/vm0/{disk}"
        if zfs_get("mounted", ds) is None:
            run(["zfs", "create", "-p", ds])
        mountpoint = zfs_get("mountpoint", ds)
        if zfs_get("mounted", ds) != "yes":
            run(["zfs", "mount", ds])
        image = Path(mountpoint) / DISK_IMAGE
        if not image.exists():
            log(f"formatting {image}")
            tmp = image.with_suffix(".tmp")
            run(["truncate", "-s", f"{DISK_SIZE_MB}M", str(tmp)])
            run(["mkfs.ext4", "-q", "-F", "-L", disk, str(tmp)])
            tmp.rename(image)
        datasets.append((ds, image))
    return datasets


# ---------------------------------------------------------------- the profile

def wait_for_vsock_agent(lab, seconds):
    """The guest's second qemu-ga, on vsock through the hybrid vsock device, answers."""
    deadline = time.monotonic() + seconds
    while not agent_ping(lab / vsock.DEVICE_SOCKET, 1.0, vsock.AGENT_PORT):
        if time.monotonic() > deadline:
            raise LabError(f"the guest agent on vsock port {vsock.AGENT_PORT} did not answer within {seconds} s "
                           f"through {lab / vsock.DEVICE_SOCKET}; see {lab / 'vhost-vsock.log'}")
        time.sleep(0.2)


def lab_object(lab, pool, datasets, pid):
    return {
        "dir": str(lab),
        "agent": f"unix:{lab / 'qga.sock'}",
        "qmp": str(lab / "qmp.sock"),
        "request_channel": str(lab / "request.sock"),
        "pool": pool,
        "datasets": [ds for ds, _ in datasets],
        "guest_mounts": {ds: mnt for (ds, _), (_, mnt, _) in zip(datasets, DISKS)},
        # How the guest sees each dataset: virtio serial and PCI address (plan field `disks`).
        "disks": {ds: {"serial": disk, "pci": f"0000:00:{slot:02x}.0"} for (ds, _), (disk, _, slot) in zip(datasets, DISKS)},
        # The same map as a file, for `snap-orchestrate serve --volumes` (VM-initiated snapshots).
        "volumes": str(lab / "volumes.json"),
        "qemu_pid": pid,
        **vsock.lab_fields(lab),
    }


class Default(Profile):
    name = "default"
    title = "lab"
    host_packages = HOST_PACKAGES
    boot_seconds = 180

    def ensure_guest(self):
        return ensure_guest(self.cache)

    def prepare_host(self):
        ensure_zfs_fuse(self.lab)
        self.datasets = ensure_pool(self.lab, self.pool)
        self.vsock_daemon = vsock.ensure_daemon(self.cache)

    def check_running(self, pid, guest):
        # A VM whose vsock backend died cannot get it back: restart it.
        return vsock.daemon_running(self.lab) is not None

    def start(self, qemu_root, guest):
        lab = self.lab
        hook = os.environ.get("EVESNAP_LAB_FSFREEZE_HOOK") == "1"
        argv = qemu_argv(lab, qemu_root, guest, "evesnap-lab", MEMORY_MB,
                         "console=ttyS0 panic=-1 quiet" + (" evesnap.fsfreeze_hook" if hook else ""))
        argv += ["-chardev", f"socket,path={lab / 'request.sock'},server=on,wait=off,id=req0",
                 "-device", f"virtserialport,bus=vser0.0,chardev=req0,name={REQUEST_PORT}"]
        for (disk, _, slot), (_, image) in zip(DISKS, self.datasets):
            argv += ["-drive", f"file={image},format=raw,if=none,id={disk},cache=writeback",
                     "-device", f"virtio-blk-pci,drive={disk},serial={disk},addr={slot:#x}"]
        argv += vsock.qemu_vsock_argv(lab, MEMORY_MB)
        vsock.start_daemon(lab, self.vsock_daemon)
        return launch_qemu(lab, qemu_root, argv)

    def ready(self, pid):
        wait_for_vsock_agent(self.lab, 60)
        obj = lab_object(self.lab, self.pool, self.datasets, pid)
        (self.lab / "volumes.json").write_text(json.dumps(obj["disks"], indent=2) + "\n")
        return obj

    def check_pool(self):
        if not zfs_ready() or pool_health(self.pool) != "ONLINE":
            raise LabError(f"pool {self.pool} is not online")

    def after_stop(self):
        vsock.stop_daemon(self.lab)

    def purge(self):
        lab, pool = self.lab, self.pool
        vdev = lab / "pool.img"
        if zfs_ready() and pool_health(pool) is not None:
            if pool_is_ours(pool, vdev):
                log(f"destroying pool {pool}")
                # zfs-fuse releases the files QEMU had open a moment after QEMU exits.
                for attempt in range(20):
                    res = run(["zpool", "destroy", "-f", pool], check=False)
                    if res.returncode == 0:
                        break
                    if "busy" not in res.stderr or attempt == 19:
                        raise LabError(f"zpool destroy {pool}: {res.stderr.strip()}")
                    time.sleep(0.5)
            else:
                log(f"pool {pool} is not backed by {vdev}: left alone")
        vdev.unlink(missing_ok=True)
        pid = read_pid(lab / "zfs-fuse.pid")
        if pid and pid_alive(pid) and pid == zfs_fuse_pid():
            remaining = run(["zpool", "list", "-H", "-o", "name"], check=False).stdout.split()
            if remaining:
                log(f"zfs-fuse left running: it still serves pools {', '.join(remaining)}")
            else:
                log(f"stopping zfs-fuse {pid}")
                os.kill(pid, signal.SIGTERM)
                deadline = time.monotonic() + 20
                while pid_alive(pid) and time.monotonic() < deadline:
                    time.sleep(0.2)
                (lab / "zfs-fuse.pid").unlink(missing_ok=True)
        for name in ("lab.json", "mnt"):
            p = lab / name
            if p.is_dir():
                try:
                    p.rmdir()
                except OSError:
                    pass
            else:
                p.unlink(missing_ok=True)
