"""The VM: QEMU 7.2 extracted from its .debs, started from a lab folder (pid file, sockets,
serial log), its control agent and QMP, and stopping it again."""

import json
import os
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path

import qga  # scripts/lib/qga.py, the lab scripts' QGA client

from . import disks
from .common import LabError, key_of, log, pid_alive, read_pid
from .debs import apt_install, dep_names, extract, fetch_debs

# Extracted, never installed: installing qemu-system-x86 would remove the machine's qemu-utils.
QEMU_PACKAGES = ["qemu-system-x86", "qemu-system-common", "qemu-system-data", "seabios"]
NOT_LIBRARIES = {"qemu-system-common", "qemu-system-data", "seabios", "ipxe-qemu"}
QGA_PORT = "org.qemu.guest_agent.0"
# What a running QEMU keeps in the lab folder; a killed one leaves them behind.
VM_FILES = ("qga.sock", "qmp.sock", "request.sock", "qemu.pid")


def ensure_qemu(cache):
    debs = fetch_debs(cache, QEMU_PACKAGES)
    libs = set()
    for pkg in ("qemu-system-x86",):
        libs.update(n for n in dep_names(debs[pkg][2].get("Depends", "")) if n not in NOT_LIBRARIES)
    apt_install(sorted(libs))
    root = cache / f"qemu-{key_of(*(debs[p][0] for p in QEMU_PACKAGES))}"
    if not (root / ".complete").exists():
        log("extracting QEMU")
        shutil.rmtree(root, ignore_errors=True)
        for pkg in QEMU_PACKAGES:
            extract(debs[pkg][1], root)
        (root / ".complete").write_text("")
    return root


def qemu_env(root):
    return dict(os.environ, QEMU_MODULE_DIR=str(root / "usr/lib/x86_64-linux-gnu/qemu"))


def accel():
    wanted = os.environ.get("EVESNAP_LAB_ACCEL", "auto")
    if wanted in ("tcg", "kvm"):
        return wanted
    # kvm_pvm cannot run a stock kernel (docs/lab.md#kvm): only a real KVM counts.
    if os.access("/dev/kvm", os.R_OK | os.W_OK) and not Path("/sys/module/kvm_pvm").exists():
        return "kvm"
    return "tcg"


def qemu_running(lab):
    pid = read_pid(lab / "qemu.pid")
    if pid and pid_alive(pid):
        try:
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
        except OSError:
            return None
        if str(lab / "qmp.sock").encode() in cmdline:
            return pid
    return None


def qemu_argv(lab, qemu_root, guest, name, memory_mb, append):
    """The VM every profile boots: PVH kernel + initramfs, serial log, QMP, and the control
    agent on virtio-serial port org.qemu.guest_agent.0 (socket <lab>/qga.sock); q35 in EVE's
    shape (disks.machine())."""
    mode = accel()
    return [str(qemu_root / "usr/bin/qemu-system-x86_64"),
            "-L", str(qemu_root / "usr/share/qemu"), "-L", str(qemu_root / "usr/share/seabios"),
            "-name", name, "-machine", disks.machine(), "-accel", mode,
            "-cpu", "host" if mode == "kvm" else "max",
            "-m", str(memory_mb), "-smp", "1", "-nodefaults", "-display", "none", "-no-reboot", "-no-shutdown",
            "-kernel", str(guest / "vmlinux"), "-initrd", str(guest / "initramfs.gz"),
            "-append", append,
            "-serial", f"file:{lab / 'serial.log'}",
            "-qmp", f"unix:{lab / 'qmp.sock'},server=on,wait=off",
            "-device", "virtio-serial-pci,id=vser0",
            "-chardev", f"socket,path={lab / 'qga.sock'},server=on,wait=off,id=qga0",
            "-device", f"virtserialport,bus=vser0.0,chardev=qga0,name={QGA_PORT}"]


def runs_with(pid, args):
    """Whether the running QEMU `pid` was started with every one of `args` (e.g. the disk
    devices of the shape asked for now)."""
    try:
        running = set(Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace").split("\0"))
    except OSError:
        return False
    return all(a in running for a in args)


def launch_qemu(lab, qemu_root, argv):
    """Starts QEMU daemonized with its pid file in the lab folder; its pid. Sockets and a pid
    file a killed QEMU left behind are removed first."""
    for stale in VM_FILES:
        (lab / stale).unlink(missing_ok=True)
    argv = argv + ["-pidfile", str(lab / "qemu.pid"), "-daemonize"]
    log(f"booting the VM ({argv[argv.index('-accel') + 1]})")
    res = subprocess.run(argv, env=qemu_env(qemu_root), stdin=subprocess.DEVNULL, capture_output=True,
                         text=True, start_new_session=True)
    if res.returncode != 0:
        raise LabError(f"QEMU did not start: {res.stderr.strip()}")
    pid = read_pid(lab / "qemu.pid")
    if not pid:
        raise LabError("QEMU started but wrote no pid file")
    return pid


def agent_ping(sock_path, timeout, vsock_port=None):
    """One handshake as the real agent needs it (docs/lab.md#the-agent-on-the-wire,
    scripts/lib/qga.py), then guest-ping; with `vsock_port`, through a hybrid vsock device."""
    return qga.ping(sock_path, timeout, vsock_port)


def wait_for_agent(lab, pid, seconds):
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if not pid_alive(pid):
            raise LabError(f"QEMU exited while the guest booted; see {lab / 'serial.log'}")
        try:
            if agent_ping(lab / "qga.sock", 1.0):
                return
        except OSError:
            pass
        time.sleep(0.2)
    raise LabError(f"the guest agent did not answer within {seconds} s; see {lab / 'serial.log'}")


def qmp(lab, *commands, timeout=5.0):
    """Runs QMP commands; returns the last reply."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(timeout)
        s.connect(str(lab / "qmp.sock"))
        f = s.makefile("rwb")
        json.loads(f.readline())  # greeting
        reply = None
        for cmd in ("qmp_capabilities",) + commands:
            f.write(json.dumps({"execute": cmd}).encode() + b"\n")
            f.flush()
            while True:
                line = f.readline()
                if not line:
                    return reply
                msg = json.loads(line)
                if "event" not in msg:
                    reply = msg
                    break
        return reply


def stop_qemu(lab):
    pid = qemu_running(lab)
    if pid is not None:
        log(f"stopping QEMU {pid}")
        try:
            qmp(lab, "quit")
        except (OSError, ValueError):
            pass
        deadline = time.monotonic() + 10
        while pid_alive(pid) and time.monotonic() < deadline:
            time.sleep(0.1)
        if pid_alive(pid):
            os.kill(pid, signal.SIGKILL)
    for stale in VM_FILES:
        (lab / stale).unlink(missing_ok=True)
