"""The OpenZFS profile (`up --openzfs`): a VM running OpenZFS 2.3 itself (spl/zfs modules built
for the guest kernel, the userland from bookworm-backports contrib), with pool `persist` on
its own disk, EVE-style zvols persist/vault/volumes/<uuid>.1 (one thick, one sparse) each
holding an ext4 mounted at /mnt/<uuid>, udevd, the control qemu-ga on virtio-serial, a second
qemu-ga inside the guest on AF_VSOCK loopback (vsock:1:10000) for tools run in the guest, and
a host folder shared read-only (9p) at /opt/evesnap/bin (docs/lab.md#openzfs-in-the-lab-vm)."""

import json
import os
import re
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

from qga import Agent, AgentError

from .disks import describe, disk_devices, disks, machine, shape
from .common import LabError, key_of, lab_file, log, run
from .debs import AptSource, apt_install, apt_show, dep_names, extract, fetch_debs
from .guest import GUEST_MODULE_TARGETS, GUEST_PACKAGES, build_guest, copy_with_libs, kernel_package, \
    shutdown_script, write_files
from .profile import Profile
from .vm import launch_qemu, qemu_argv, runs_with

ZFS_SOURCE = ("bookworm-backports", "contrib")
# Extracted into the guest, never installed: zfsutils-linux Conflicts with the host's zfs-fuse.
ZFS_USERLAND = ["zfsutils-linux", "libzfs6linux", "libzpool6linux", "libnvpair3linux", "libuutil3linux"]


OZ_POOL = "persist"
OZ_POOL_SIZE = "1G"
OZ_POOL_DISK = "persist0"  # the pool disk's name (its serial in the serial shape)
# EVE-style volumes: persist/vault/volumes/<uuid>.<generation>; (uuid, kind, size).
OZ_ZVOLS = [("6f1e0a52-3c8d-4b7a-9e21-5d4c3b2a1f00", "thick", "128M"),
            ("a3b9c7d1-2e4f-4a6b-8c0d-1e2f3a4b5c6d", "sparse", "256M")]
OZ_VSOCK_PORT = 10000
OZ_GUEST_BIN = "/opt/evesnap/bin"
OZ_BIN_TAG = "evesnap_bin"
OZ_MODULE_TARGETS = GUEST_MODULE_TARGETS + ["9pnet_virtio", "9p", "zfs"]


def oz_disk():
    """The pool disk, placed like a data disk (disks.py: EVE's shape unless
    EVESNAP_LAB_SHAPE=serial; EVESNAP_LAB_SCSI=persist0 or all puts it behind a SCSI HBA)."""
    return disks([OZ_POOL_DISK])[0]
OZ_UDEV_RULES = ["50-udev-default.rules", "60-block.rules", "60-persistent-storage.rules"]
# Bump when ensure_openzfs_guest() puts something else into the guest: a new cache key.
OZ_RECIPE = 2

OZ_HOST_PACKAGES = ["kmod", "cpio", "e2fsprogs", "gcc", "libc6-dev", "make", "binutils"]


# ---------------------------------------------------------------- the guest

def ensure_zfs_modules(cache, kernel_pkg, kernel_version, dkms_deb):
    """spl.ko and zfs.ko (stripped) for the guest kernel, built out of tree from zfs-dkms
    against the unpacked kernel headers (docs/lab.md#openzfs-modules-for-the-guest-kernel),
    cached per kernel and ZFS version."""
    dkms_version, dkms_path, _ = dkms_deb
    kernel_deb_version = apt_show(kernel_pkg)["Version"]
    out = cache / f"zfs-kmod-{dkms_version}-{kernel_version}-{kernel_deb_version}".replace(":", "_").replace("~", "_")
    if (out / ".complete").exists():
        return out
    headers = [f"linux-headers-{kernel_version}", f"linux-headers-{kernel_version.replace('-amd64', '-common')}"]
    kbuild = [n for n in dep_names(apt_show(headers[0]).get("Depends", "")) if n.startswith("linux-kbuild-")]
    debs = fetch_debs(cache, headers + kbuild)
    # The compiler, and what kbuild's prebuilt tools (modpost, objtool) load.
    apt_install(sorted({"gcc", "make", "perl", "bc", "binutils", "libc6-dev"}
                       | {n for k in kbuild for n in dep_names(debs[k][2].get("Depends", ""))}))
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    started = time.monotonic()
    log(f"building OpenZFS {dkms_version} modules for {kernel_version} (~3 min on 2 cores; "
        f"log in {out / 'build.log'})")
    with tempfile.TemporaryDirectory(dir=cache, prefix="zfs-build-") as tmp:
        tmp = Path(tmp)
        for _, path, _ in debs.values():
            extract(path, tmp / "headers")
        src_root = tmp / "headers/usr/src"
        obj = src_root / f"linux-headers-{kernel_version}"
        common = src_root / f"linux-headers-{kernel_version.replace('-amd64', '-common')}"
        # The amd64 headers include the common Makefile by its absolute /usr/src path.
        makefile = obj / "Makefile"
        makefile.write_text(makefile.read_text().replace(f"/usr/src/{common.name}", str(common)))
        extract(dkms_path, tmp / "dkms")
        src = next((tmp / "dkms/usr/src").glob("zfs-*"))
        with open(out / "build.log", "wb") as logf:
            def step(argv):
                logf.write(f"$ {' '.join(argv)}\n".encode())
                logf.flush()
                t0 = time.monotonic()
                res = subprocess.run(argv, cwd=src, stdin=subprocess.DEVNULL, stdout=logf, stderr=subprocess.STDOUT)
                logf.write(f"# {argv[0]} exited {res.returncode} after {time.monotonic() - t0:.0f} s\n".encode())
                if res.returncode != 0:
                    raise LabError(f"{' '.join(argv[:2])} for the OpenZFS modules exited {res.returncode}; "
                                   f"see {out / 'build.log'}")
            step(["./configure", "--with-config=kernel", f"--with-linux={common}", f"--with-linux-obj={obj}"])
            step(["make", f"-j{os.cpu_count() or 2}"])
        for name in ("spl.ko", "zfs.ko"):
            run(["strip", "--strip-debug", "-o", str(out / name), str(src / "module" / name)])
    (out / "versions").write_text(f"zfs-dkms {dkms_version}\n{kernel_pkg} {kernel_deb_version}\n")
    (out / ".complete").write_text("")
    log(f"OpenZFS modules built in {time.monotonic() - started:.0f} s")
    return out


def oz_scripts():
    """The guest's /init, /etc/inittab and /sbin/lab-persist (scripts/lab.d/guest-openzfs)."""
    init = lab_file("guest-openzfs/init", GUEST_BIN=OZ_GUEST_BIN, BIN_TAG=OZ_BIN_TAG)
    inittab = lab_file("guest-openzfs/inittab", VSOCK_PORT=OZ_VSOCK_PORT)
    persist = lab_file("guest-openzfs/lab-persist")
    return init, inittab, persist


def ensure_openzfs_guest(cache):
    """The OpenZFS guest: the default guest's kernel, busybox and qemu-ga, plus spl/zfs
    modules built for that kernel, the OpenZFS 2.3 userland, udevd with the rules zpool and
    zvols need, mke2fs, the vsock and 9p modules and the tiny `qga-client`."""
    kernel_pkg = kernel_package()
    kernel_version = kernel_pkg.replace("linux-image-", "")
    debs = fetch_debs(cache, GUEST_PACKAGES + [kernel_pkg, "udev"])
    with AptSource(cache, *ZFS_SOURCE) as source:
        zdebs = fetch_debs(cache, ["zfs-dkms"] + ZFS_USERLAND, source)
    # The libraries the extracted binaries load come from the host (same Debian release).
    libs = set(dep_names(debs["qemu-guest-agent"][2].get("Depends", "")))
    for pkg in ["udev"] + ZFS_USERLAND:
        meta = debs[pkg][2] if pkg in debs else zdebs[pkg][2]
        libs.update(dep_names(meta.get("Depends", "")))
    libs -= set(ZFS_USERLAND) | {"python3", "adduser", "udev"}
    apt_install(sorted(libs | {"gcc", "libc6-dev", "e2fsprogs"}))
    modules = ensure_zfs_modules(cache, kernel_pkg, kernel_version, zdebs["zfs-dkms"])
    init, inittab, persist = oz_scripts()
    shutdown, qga_client = shutdown_script(), lab_file("qga-client.c")
    e2fs = run(["dpkg-query", "-W", "-f=${Version}", "e2fsprogs"]).stdout
    key = key_of(*(v for v, _, _ in debs.values()), *(v for v, _, _ in zdebs.values()), modules.name, e2fs,
                 init, inittab, persist, shutdown, qga_client, OZ_MODULE_TARGETS, OZ_UDEV_RULES, OZ_RECIPE)
    guest = cache / f"guest-openzfs-{key}"
    if (guest / ".complete").exists():
        return guest
    log(f"building the OpenZFS guest ({kernel_pkg}, zfs {zdebs['zfs-dkms'][0]}, udev {debs['udev'][0]})")

    def populate(root, tmp):
        write_files(root, {
            "init": (init, 0o755), "etc/inittab": (inittab, 0o644), "sbin/shutdown": (shutdown, 0o755),
            "sbin/lab-persist": (persist, 0o755),
            "etc/passwd": ("root:x:0:0:root:/root:/bin/sh\n", 0o644),
            "etc/group": ("".join(f"{g}:x:{i}:\n" for g, i in (
                ("root", 0), ("tty", 5), ("disk", 6), ("lp", 7), ("kmem", 15), ("dialout", 20), ("cdrom", 24),
                ("floppy", 25), ("tape", 26), ("audio", 29), ("video", 44), ("input", 105), ("kvm", 106),
                ("render", 107), ("sgx", 108))), 0o644)})
        # udevd (udevadm is the daemon too) and the rules the zpool/zvol paths need.
        udev = tmp / "udev"
        extract(debs["udev"][1], udev)
        (root / "bin").mkdir(exist_ok=True)
        shutil.copy2(udev / "bin/udevadm", root / "bin/udevadm")
        copy_with_libs(udev / "bin/udevadm", root)
        (root / "lib/systemd").mkdir(parents=True)
        os.symlink("/bin/udevadm", root / "lib/systemd/systemd-udevd")
        (root / "lib/udev/rules.d").mkdir(parents=True)
        for rule in OZ_UDEV_RULES:
            shutil.copy2(udev / "lib/udev/rules.d" / rule, root / "lib/udev/rules.d" / rule)
        # The OpenZFS userland with its libraries.
        zfs = tmp / "zfs"
        for pkg in ZFS_USERLAND:
            extract(zdebs[pkg][1], zfs)
        (root / "sbin").mkdir(exist_ok=True)
        for name in ("zfs", "zpool", "zdb"):
            shutil.copy2(zfs / "sbin" / name, root / "sbin" / name)
            copy_with_libs(zfs / "sbin" / name, root, [zfs])
        (root / "usr/sbin").mkdir(parents=True, exist_ok=True)
        for name in ("zfs", "zpool"):  # where other distributions put them
            os.symlink(f"/sbin/{name}", root / "usr/sbin" / name)
        shutil.copy2(zfs / "lib/udev/zvol_id", root / "lib/udev/zvol_id")
        shutil.copy2(zfs / "lib/udev/rules.d/60-zvol.rules", root / "lib/udev/rules.d/60-zvol.rules")
        # mke2fs for the ext4 on the zvols (the host's e2fsprogs: same release).
        shutil.copy2("/usr/sbin/mke2fs", root / "sbin/mke2fs")
        copy_with_libs(Path("/usr/sbin/mke2fs"), root)
        shutil.copy2("/etc/mke2fs.conf", root / "etc/mke2fs.conf")
        # The in-guest QGA client (scripts/lab.d/qga-client.c), static.
        (tmp / "qga-client.c").write_text(qga_client)
        (root / "usr/bin").mkdir(parents=True, exist_ok=True)
        run(["gcc", "-static", "-O2", "-Wall", "-o", str(root / "usr/bin/qga-client"), str(tmp / "qga-client.c")])
        run(["strip", str(root / "usr/bin/qga-client")])

    return build_guest(cache, guest, debs, kernel_pkg, OZ_MODULE_TARGETS, populate,
                       extra_modules=[modules / "spl.ko", modules / "zfs.ko"])


# ---------------------------------------------------------------- the profile

def oz_zvols(pool):
    return [(f"{pool}/vault/volumes/{uuid}.1", kind, size, f"/mnt/{uuid}") for uuid, kind, size in OZ_ZVOLS]


def oz_bin_dir(lab):
    return Path(os.environ.get("EVESNAP_GUEST_BIN_DIR") or lab / "guest-bin").resolve()


def oz_running_bin_dir(pid):
    """The host folder a running VM shares as the guest's bin folder."""
    try:
        args = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return None
    for a in args:
        m = re.match(rb"local,id=gbin,path=(.*),security_model=", a)
        if m:
            return Path(m.group(1).decode())
    return None


def oz_guest_agent(agent):
    """Checks the second qemu-ga (AF_VSOCK, CID 1 = VMADDR_CID_LOCAL via vsock_loopback) from
    inside the guest with qga-client; its address, or LabError."""
    address = f"vsock:1:{OZ_VSOCK_PORT}"
    deadline = time.monotonic() + 30
    while True:
        code, out, err = agent.exec(["/usr/bin/qga-client", address, '{"execute":"guest-ping"}'], timeout=40)
        if code == 0 and out.strip() and json.loads(out.splitlines()[-1]).get("return") == {}:
            return address
        if time.monotonic() > deadline:
            raise LabError(f"the in-guest agent on {address} does not answer: {err.strip() or out.strip()}")
        time.sleep(0.5)


def oz_pool_disk_in_guest():
    """How lab-persist finds the pool disk in the guest: by WWN behind a SCSI HBA, by serial in
    the serial shape, else as the only virtio disk."""
    if shape() == "serial":
        return f"/dev/disk/by-id/virtio-{OZ_POOL_DISK}"
    return f"wwn={oz_disk().wwn}" if oz_disk().scsi else "/dev/vda"


def oz_prepare_guest(lab, pool, seconds=300):
    """Pool and zvols ready in the guest (idempotent), the in-guest agent checked."""
    specs = [f"{uuid}:{kind}:{size}" for uuid, kind, size in OZ_ZVOLS]
    with Agent(lab / "qga.sock", 30) as agent:
        code, out, err = agent.exec(["/sbin/lab-persist", pool, oz_pool_disk_in_guest(), *specs], timeout=seconds)
        if code != 0:
            raise LabError(f"lab-persist in the guest exited {code}: {err.strip()}")
        got = {}
        for line in out.splitlines():
            zvol, dev, mnt = line.split()
            got[zvol] = mnt
        guest_agent = oz_guest_agent(agent)
    want = {zvol: mnt for zvol, _, _, mnt in oz_zvols(pool)}
    if got != want:
        raise LabError(f"lab-persist reported {got}, expected {want}")
    return guest_agent


def oz_object(lab, pool, guest_agent, bin_dir, pid):
    zvols = oz_zvols(pool)
    return {
        "dir": str(lab),
        "agent": f"unix:{lab / 'qga.sock'}",
        "qmp": str(lab / "qmp.sock"),
        "pool": pool,
        "zvols": [z for z, _, _, _ in zvols],
        "guest_mounts": {z: mnt for z, _, _, mnt in zvols},
        "guest_bin": OZ_GUEST_BIN,
        "guest_bin_host": str(bin_dir),
        "guest_agent": guest_agent,
        "shape": shape(),
        # The pool disk as the host knows it (disks.py), keyed by the pool.
        "disks": {pool: describe(oz_disk())},
        "qemu_pid": pid,
    }




class OpenZfs(Profile):
    name = "openzfs"
    title = "OpenZFS lab"
    host_packages = OZ_HOST_PACKAGES
    boot_seconds = 300

    def ensure_guest(self):
        return ensure_openzfs_guest(self.cache)

    def prepare_host(self):
        self.bin_dir = oz_bin_dir(self.lab)
        self.bin_dir.mkdir(parents=True, exist_ok=True)
        vdev = self.lab / "pool.img"
        if not vdev.exists():
            run(["truncate", "-s", OZ_POOL_SIZE, str(vdev)])

    def check_running(self, pid, guest):
        if not runs_with(pid, [str(guest / "initramfs.gz"), "-machine", machine(),
                               *disk_devices(oz_disk(), self.lab / "pool.img")]):
            log("the running VM boots an older guest build or another disk shape: restarting it")
            return False
        if oz_running_bin_dir(pid) != self.bin_dir:
            raise LabError(f"the running VM shares {oz_running_bin_dir(pid)} as {OZ_GUEST_BIN}, not {self.bin_dir}: "
                           "`scripts/lab down --openzfs` first to change EVESNAP_GUEST_BIN_DIR")
        return True

    def start(self, qemu_root, guest):
        lab = self.lab
        argv = qemu_argv(lab, qemu_root, guest, "evesnap-openzfs", 1024, "console=ttyS0 panic=-1 quiet")
        argv += disk_devices(oz_disk(), lab / "pool.img")
        argv += ["-fsdev", f"local,id=gbin,path={self.bin_dir},security_model=none,readonly=on",
                 "-device", f"virtio-9p-pci,fsdev=gbin,mount_tag={OZ_BIN_TAG},addr=0x9"]
        return launch_qemu(lab, qemu_root, argv)

    def ready(self, pid):
        started = time.monotonic()
        guest_agent = oz_prepare_guest(self.lab, self.pool)
        log(f"pool {self.pool} and zvols ready, in-guest agent answers on {guest_agent} "
            f"({time.monotonic() - started:.1f} s)")
        return oz_object(self.lab, self.pool, guest_agent, self.bin_dir, pid)

    def check_pool(self):
        with Agent(self.lab / "qga.sock", 10) as agent:
            code, out, _ = agent.exec(["/sbin/zpool", "list", "-H", "-o", "health", self.pool], timeout=20)
        if code != 0 or out.strip() != "ONLINE":
            raise LabError(f"pool {self.pool} in the guest is not online")

    def before_stop(self):
        # Let ZFS write out its last transaction group before the VM goes.
        try:
            with Agent(self.lab / "qga.sock", 5) as agent:
                agent.exec(["/bin/sync"], timeout=20)
        except (OSError, AgentError, ValueError):
            pass

    def purge(self):
        for name in ("pool.img", "lab.json", "serial.log", "profile"):
            (self.lab / name).unlink(missing_ok=True)
        try:
            (self.lab / "guest-bin").rmdir()  # only when empty: it may hold someone's binaries
        except OSError:
            pass
