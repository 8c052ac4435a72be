"""The guest both profiles boot: Debian's kernel (uncompressed, so QEMU boots it through
PVH) and a busybox initramfs with the real qemu-ga and the kernel modules it needs
(docs/lab.md#the-vm-from-debian-packages). Each profile adds its own files."""

import gzip
import lzma
import os
import re
import shutil
import subprocess
import tempfile
from pathlib import Path

from .common import LabError, lab_file, run
from .debs import apt_show, dep_names, extract

GUEST_PACKAGES = ["qemu-guest-agent", "busybox-static"]
# virtio_scsi and sd_mod: the disks EVESNAP_LAB_SCSI puts behind a virtio-scsi HBA (the q35
# pcie-root-ports need nothing: Debian builds the PCIe port driver in).
GUEST_MODULE_TARGETS = ["virtio_pci", "virtio_console", "virtio_blk", "virtio_scsi", "sd_mod", "ext4", "vsock",
                        "vsock_loopback"]


def kernel_package():
    """The versioned kernel image package that linux-image-amd64 stands for."""
    return dep_names(apt_show("linux-image-amd64")["Depends"])[0]


def shutdown_script():
    """/sbin/shutdown for every guest: qemu-ga's guest-shutdown execs it, busybox has none."""
    return lab_file("guest/shutdown")


def extract_vmlinux(bzimage):
    data = bzimage.read_bytes()
    off = data.find(b"\xfd7zXZ\x00")
    if off < 0:
        raise LabError(f"no XZ payload in {bzimage}")
    return lzma.LZMADecompressor().decompress(data[off:])


def module_load_order(tree, version, sysmap, targets=None):
    run(["depmod", "-b", str(tree), "-F", str(sysmap), version])
    order = []
    for target in targets or GUEST_MODULE_TARGETS:
        res = run(["modprobe", "-d", str(tree), "-S", version, "--show-depends", target])
        for line in res.stdout.splitlines():
            parts = line.split()
            if parts and parts[0] == "insmod" and parts[1] not in order:
                order.append(parts[1])
    return order


def copy_with_libs(binary, dest_root, lib_roots=()):
    """Copies every library ldd lists for a dynamic binary, at the same paths (the binary
    itself is the caller's). Libraries found under one of `lib_roots` (extracted .debs, searched
    first) land at their path inside that root."""
    files = [binary]
    env = None
    if lib_roots:
        dirs = [str(Path(r) / d) for r in lib_roots for d in ("lib/x86_64-linux-gnu", "usr/lib/x86_64-linux-gnu")]
        env = dict(os.environ, LD_LIBRARY_PATH=":".join(dirs))
    res = run(["ldd", str(binary)], env=env)
    for line in res.stdout.splitlines():
        if "not found" in line:
            raise LabError(f"{binary}: library missing on the host: {line.strip()}")
        m = re.search(r"(/\S+)", line.split("=>")[-1])
        if m:
            files.append(Path(m.group(1)))
    for f in files[1:]:
        rel = str(f).lstrip("/")
        for r in lib_roots:
            if f.is_relative_to(r):
                rel = str(f.relative_to(r))
        target = dest_root / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(os.path.realpath(f), target)


def write_files(root, files):
    """files: {path inside root: (text, mode)}."""
    for name, (text, mode) in files.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
        os.chmod(path, mode)


def build_guest(cache, guest, debs, kernel_pkg, targets, populate, extra_modules=()):
    """Builds `guest`/vmlinux and `guest`/initramfs.gz: busybox, qemu-ga with its libraries, the
    kernel modules `targets` need in load order (`/etc/modules.load`; `extra_modules` are
    out-of-tree .ko files added to the tree first), then `populate(root, tmp)` adds the profile's
    own files."""
    shutil.rmtree(guest, ignore_errors=True)
    guest.mkdir(parents=True)
    with tempfile.TemporaryDirectory(dir=cache) as tmp:
        tmp = Path(tmp)
        kroot, root = tmp / "kernel", tmp / "root"
        extract(debs[kernel_pkg][1], kroot)
        version = next((kroot / "lib/modules").iterdir()).name
        (guest / "vmlinux").write_bytes(extract_vmlinux(kroot / f"boot/vmlinuz-{version}"))
        for ko in extra_modules:
            (kroot / f"lib/modules/{version}/extra").mkdir(parents=True, exist_ok=True)
            shutil.copy2(ko, kroot / f"lib/modules/{version}/extra" / Path(ko).name)
        order = module_load_order(kroot, version, kroot / f"boot/System.map-{version}", targets)
        mods = root / "lib/modules"
        mods.mkdir(parents=True)
        names = []
        for path in order:
            src = Path(path)
            shutil.copy2(src, mods / src.name)
            names.append(src.name)
        (root / "etc").mkdir()
        (root / "etc/modules.load").write_text("\n".join(names) + "\n")
        populate(root, tmp)
        bb = tmp / "busybox"
        extract(debs["busybox-static"][1], bb)
        (root / "bin").mkdir(exist_ok=True)
        shutil.copy2(bb / "bin/busybox", root / "bin/busybox")
        qga = tmp / "qga"
        extract(debs["qemu-guest-agent"][1], qga)
        (root / "usr/bin").mkdir(parents=True, exist_ok=True)
        shutil.copy2(qga / "usr/sbin/qemu-ga", root / "usr/bin/qemu-ga")
        if (qga / "etc/qemu").exists():
            shutil.copytree(qga / "etc/qemu", root / "etc/qemu")
        copy_with_libs(qga / "usr/sbin/qemu-ga", root)
        for d in ("proc", "sys", "dev", "run", "tmp", "root"):
            (root / d).mkdir(exist_ok=True)
        files = subprocess.run(["find", ".", "-mindepth", "1"], cwd=root, capture_output=True, check=True).stdout
        cpio = subprocess.run(["cpio", "-o", "-H", "newc", "--quiet", "-R", "0:0"], cwd=root, input=files,
                              capture_output=True, check=True).stdout
        with gzip.open(guest / "initramfs.gz", "wb", compresslevel=6) as out:
            out.write(cpio)
        (guest / "kernel-version").write_text(version + "\n")
    (guest / ".complete").write_text("")
    return guest

