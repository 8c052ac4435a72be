"""The default profile: the zfs-fuse daemon on the host (started if none runs; the lab
remembers that it started it), pool `evesnap` on a sparse file in the lab folder, datasets
<pool>/lab/vm0/diskN each holding a raw ext4 image labelled diskN, and a VM that has those
images as disks in EVE's shape (disks.py: q35, one pcie-root-port each, no serial; mounted at
/dataN by label), the real qemu-ga, and a second virtio-serial port for VM-initiated requests.
EVESNAP_LAB_VMS=N boots N such VMs, VM i on <pool>/lab/vm<i>/diskN with its folder <dir>/vm<i>
(VM 0: <dir> itself)."""

import functools
import json
import os
import signal
import subprocess
import time
from pathlib import Path

from .disks import describe, disk_devices, disks, machine, shape
from .common import LabError, key_of, lab_file, log, pid_alive, read_pid, run
from .debs import apt_install, dep_names, fetch_debs
from .guest import GUEST_MODULE_TARGETS, GUEST_PACKAGES, build_guest, kernel_package, shutdown_script, write_files
from .profile import Profile
from .vm import agent_ping, ensure_qemu, launch_qemu, qemu_argv, qemu_running, runs_with, stop_qemu, wait_for_agent
from . import vsock


@functools.cache
def lab_disks():
    """(name, guest mountpoint, Disk) of each data disk: `diskN` at /dataN (disks.py places
    it). EVESNAP_LAB_DISKS (default 2, at most 20) sets how many; it is fixed when the VM boots."""
    text = os.environ.get("EVESNAP_LAB_DISKS", "2")
    if not text.isdigit() or not 1 <= int(text) <= 20:
        raise SystemExit(f"lab: error: EVESNAP_LAB_DISKS must be a number from 1 to 20, not {text!r}")
    names = [f"disk{i}" for i in range(int(text))]
    return [(name, f"/data{i}", disk) for i, (name, disk) in enumerate(zip(names, disks(names)))]


def lab_vms():
    """How many VMs the lab boots: EVESNAP_LAB_VMS (default 1, at most 8). VM 0 lives in the
    lab folder itself (as with one VM), VM i > 0 in <dir>/vm<i>/ with the same file names."""
    text = os.environ.get("EVESNAP_LAB_VMS", "1")
    if not text.isdigit() or not 1 <= int(text) <= 8:
        raise SystemExit(f"lab: error: EVESNAP_LAB_VMS must be a number from 1 to 8, not {text!r}")
    return int(text)


VMS = lab_vms()


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
    """Mountpoints of zfs-fuse's FUSE mounts whose daemon is gone ("Transport endpoint is
    not connected")."""
    dead = []
    for line in Path("/proc/mounts").read_text().splitlines():
        fields = line.split()
        if len(fields) > 2 and (fields[2] == "fuse.zfs" or fields[1] == "/zfs-kstat"):
            mnt = fields[1].replace("\\040", " ")
            try:
                os.stat(mnt)
            except OSError as e:
                if e.errno == 107:  # ENOTCONN
                    dead.append(mnt)
    return dead


def unmount_dead_fuse_mounts():
    for mnt in dead_fuse_mounts():
        log(f"unmounting dead FUSE mount {mnt}")
        run(["umount", "-l", mnt], check=False)


def ensure_zfs_fuse(lab):
    if zfs_fuse_pid() is None:
        unmount_dead_fuse_mounts()
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
    else:
        # A zfs-fuse mount whose daemon died before this one started is dead
        # (ENOTCONN) though zfs now serves its pool again: `zfs mount -a` skips it
        # until it is gone.
        unmount_dead_fuse_mounts()


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


def pool_on(vdev):
    """The imported pool whose file is `vdev`, if any."""
    names = run(["zpool", "list", "-H", "-o", "name"], check=False).stdout.split()
    return next((name for name in names if vdev in pool_files(name)), None)


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
        owner = pool_on(vdev)
        if owner is not None:
            raise LabError(f"{vdev} holds pool {owner}, not {pool}: use EVESNAP_LAB_POOL={owner}, "
                           f"or remove that lab with EVESNAP_LAB_POOL={owner} scripts/lab down --purge")
        run(["zpool", "import", "-d", str(lab), pool], check=False)
        health = pool_health(pool)
        if health is None:
            raise LabError(f"{vdev} exists but holds no pool {pool} to import; "
                           "it is left alone: remove it (or the lab folder) to start afresh")
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
    return ensure_vm_datasets(pool, 0)


def ensure_vm_datasets(pool, vm):
    """VM `vm`'s datasets <pool>/lab/vm<vm>/diskN, each holding a formatted raw image."""
    datasets = []
    for disk, _, _ in lab_disks():
        ds = f"{pool}/lab/vm{vm}/{disk}"
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


def vm_dir(lab, vm):
    """Where VM `vm` keeps its sockets, pid file and serial log."""
    return lab if vm == 0 else lab / f"vm{vm}"


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
        "guest_mounts": {ds: mnt for (ds, _), (_, mnt, _) in zip(datasets, lab_disks())},
        "shape": shape(),
        # Each dataset's disk as the host knows it (plan field `disks`): in EVE's shape the
        # QEMU device id, its root port's id and, behind a SCSI HBA, the WWN.
        "disks": {ds: describe(disk) for (ds, _), (_, _, disk) in zip(datasets, lab_disks())},
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
        self.guest = ensure_guest(self.cache)  # also for VMs 1.. (more_vms_ready)
        return self.guest

    def prepare_host(self):
        ensure_zfs_fuse(self.lab)
        self.datasets = ensure_pool(self.lab, self.pool)
        self.more = [ensure_vm_datasets(self.pool, vm) for vm in range(1, VMS)]
        self.vsock_daemon = vsock.ensure_daemon(self.cache)

    def check_running(self, pid, guest):
        # A VM whose vsock backend died cannot get it back: restart it.
        if vsock.daemon_running(self.lab) is None:
            return False
        wanted = ["-machine", machine(), str(guest / "initramfs.gz")]
        for (_, _, disk), (_, image) in zip(lab_disks(), self.datasets):
            wanted += disk_devices(disk, image)
        if not runs_with(pid, wanted):
            log("the running VM has another guest build or disk shape: restarting it")
            return False
        return True

    def start(self, qemu_root, guest):
        self.qemu_root = qemu_root
        return start_vm(self.lab, qemu_root, guest, "evesnap-lab", self.datasets, self.vsock_daemon)

    def ready(self, pid):
        wait_for_vsock_agent(self.lab, 60)
        obj = lab_object(self.lab, self.pool, self.datasets, pid)
        (self.lab / "volumes.json").write_text(json.dumps(obj["disks"], indent=2) + "\n")
        obj["vms"] = [dict(obj, name="vm0")] + more_vms_ready(self)
        return obj

    def before_stop(self):
        stop_more_vms(self.lab)

    def check_pool(self):
        if not zfs_ready() or pool_health(self.pool) != "ONLINE":
            raise LabError(f"pool {self.pool} is not online")

    def after_stop(self):
        vsock.stop_daemon(self.lab)

    def purge(self):
        lab, pool = self.lab, self.pool
        stop_more_vms(lab)
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


# ---------------------------------------------------------------- more than one VM

def start_vm(lab, qemu_root, guest, name, datasets, vsock_daemon):
    """Boots one lab VM from folder `lab` with `datasets`' images as its disks; its pid."""
    hook = os.environ.get("EVESNAP_LAB_FSFREEZE_HOOK") == "1"
    argv = qemu_argv(lab, qemu_root, guest, name, MEMORY_MB,
                     f"console=ttyS0 panic=-1 quiet evesnap.disks={len(lab_disks())}"
                     + (" evesnap.fsfreeze_hook" if hook else ""))
    argv += ["-chardev", f"socket,path={lab / 'request.sock'},server=on,wait=off,id=req0",
             "-device", f"virtserialport,bus=vser0.0,chardev=req0,name={REQUEST_PORT}"]
    for (_, _, disk), (_, image) in zip(lab_disks(), datasets):
        argv += disk_devices(disk, image)
    # Each VM its own vhost-device-vsock daemon and device socket, in its own folder.
    argv += vsock.qemu_vsock_argv(lab, MEMORY_MB)
    vsock.start_daemon(lab, vsock_daemon)
    return launch_qemu(lab, qemu_root, argv)


def more_vms_ready(p):
    """VMs 1..VMS-1 (EVESNAP_LAB_VMS): started where not running (all at once, then each
    waited for), each one's lab object with its name."""
    pids = {}
    for vm, datasets in enumerate(p.more, start=1):
        folder = vm_dir(p.lab, vm)
        folder.mkdir(parents=True, exist_ok=True)
        pid = qemu_running(folder)
        if pid is None:
            if not hasattr(p, "qemu_root"):
                p.qemu_root = ensure_qemu(p.cache)
            pid = start_vm(folder, p.qemu_root, p.guest, f"evesnap-lab-vm{vm}", datasets, p.vsock_daemon)
        pids[vm] = pid
    objects = []
    for vm, datasets in enumerate(p.more, start=1):
        folder = vm_dir(p.lab, vm)
        wait_for_agent(folder, pids[vm], p.boot_seconds)
        wait_for_vsock_agent(folder, 60)
        obj = lab_object(folder, p.pool, datasets, pids[vm])
        (folder / "volumes.json").write_text(json.dumps(obj["disks"], indent=2) + "\n")
        objects.append(dict(obj, name=f"vm{vm}"))
    return objects


def stop_more_vms(lab):
    """Stops every VM i > 0 this lab folder holds (whatever EVESNAP_LAB_VMS says now)."""
    for folder in sorted(lab.glob("vm[0-9]*")):
        if folder.is_dir():
            stop_qemu(folder)
            vsock.stop_daemon(folder)
