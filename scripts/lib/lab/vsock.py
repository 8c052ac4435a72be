"""AF_VSOCK for the lab VM without the host's vhost_vsock module (docs/lab.md#hybrid-vsock):
rust-vmm's vhost-device-vsock (built once with cargo into the cache) is the device's backend,
QEMU gives the guest a vhost-user-vsock-pci device, and the host reaches guest port P through
the daemon's Unix socket <lab>/vsock.sock (`CONNECT P`), while a guest connection to CID 2
port P arrives at <lab>/vsock.sock_P. Kept apart from the VM's other devices on purpose."""

import os
import shutil
import signal
import subprocess
import time

from .common import LabError, log, pid_alive, read_pid, run

VHOST_DEVICE_VSOCK = ("vhost-device-vsock", "0.3.0")
GUEST_CID = 3
# The port the guest's second qemu-ga listens on (any CID), and the one `serve` listens on for
# VM-initiated requests (the guest's eve-guest-agent connects to CID 2 there).
AGENT_PORT = 10000
REQUEST_PORT = 10001
# Guest modules on top of the common ones (vsock itself is there already).
GUEST_MODULES = ["vmw_vsock_virtio_transport"]
# What the daemon keeps in the lab folder.
DEVICE_SOCKET = "vsock.sock"
VHOST_USER_SOCKET = "vhost-vsock.sock"
PID_FILE = "vhost-vsock.pid"


def ensure_daemon(cache):
    """The vhost-device-vsock binary in the cache, built with `cargo install --locked` the first
    time (atomically: a half-built install is never used)."""
    name, version = VHOST_DEVICE_VSOCK
    root = cache / f"{name}-{version}"
    binary = root / "bin" / name
    if binary.exists():
        return binary
    cargo = shutil.which("cargo") or str(os.path.expanduser("~/.cargo/bin/cargo"))
    if not os.access(cargo, os.X_OK):
        raise LabError(f"cargo is needed once to build {name} {version} (none on PATH or in ~/.cargo/bin)")
    tmp = cache / f"{name}-{version}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    log(f"building {name} {version} with cargo (once, into {root})")
    env = dict(os.environ, CARGO_TARGET_DIR=str(cache / f"{name}-build"))
    env.setdefault("CARGO_BUILD_JOBS", "1")
    run([cargo, "install", "--locked", name, "--version", version, "--root", str(tmp)], env=env, timeout=3600)
    os.replace(tmp, root)
    shutil.rmtree(cache / f"{name}-build", ignore_errors=True)
    return binary


def daemon_running(lab):
    pid = read_pid(lab / PID_FILE)
    if pid and pid_alive(pid):
        try:
            if str(lab / VHOST_USER_SOCKET).encode() in open(f"/proc/{pid}/cmdline", "rb").read():
                return pid
        except OSError:
            return None
    return None


def stop_daemon(lab):
    """Stops the lab's daemon by its pid: SIGTERM, then SIGKILL (it does not always exit on
    SIGTERM once QEMU is gone), and removes its sockets."""
    pid = daemon_running(lab)
    if pid is not None:
        log(f"stopping vhost-device-vsock {pid}")
        os.kill(pid, signal.SIGTERM)
        deadline = time.monotonic() + 3
        while pid_alive(pid) and time.monotonic() < deadline:
            time.sleep(0.1)
        if pid_alive(pid):
            os.kill(pid, signal.SIGKILL)
    (lab / PID_FILE).unlink(missing_ok=True)
    for sock in [lab / VHOST_USER_SOCKET, lab / DEVICE_SOCKET]:
        sock.unlink(missing_ok=True)


def start_daemon(lab, binary):
    """A fresh daemon for a VM about to boot (QEMU connects to it as a vhost-user client)."""
    stop_daemon(lab)
    with open(lab / "vhost-vsock.log", "ab") as out:
        proc = subprocess.Popen([str(binary), "--guest-cid", str(GUEST_CID),
                                 "--socket", str(lab / VHOST_USER_SOCKET), "--uds-path", str(lab / DEVICE_SOCKET)],
                                stdin=subprocess.DEVNULL, stdout=out, stderr=out, start_new_session=True)
    (lab / PID_FILE).write_text(f"{proc.pid}\n")
    deadline = time.monotonic() + 10
    while not (lab / VHOST_USER_SOCKET).exists():
        if proc.poll() is not None or time.monotonic() > deadline:
            raise LabError(f"vhost-device-vsock did not start; see {lab / 'vhost-vsock.log'}")
        time.sleep(0.05)


def qemu_vsock_argv(lab, memory_mb):
    """The VM's vsock device: its RAM shared with the daemon (memfd), and the vhost-user
    device. `-machine` options merge with the profile's own `-machine`."""
    return ["-object", f"memory-backend-memfd,id=mem0,size={memory_mb}M,share=on",
            "-machine", "memory-backend=mem0",
            "-chardev", f"socket,id=vhvsock0,path={lab / VHOST_USER_SOCKET}",
            "-device", "vhost-user-vsock-pci,chardev=vhvsock0"]


def lab_fields(lab):
    """What the lab object says about vsock."""
    return {
        "agent_vsock": f"hvsock:{lab / DEVICE_SOCKET}:{AGENT_PORT}",
        "vsock": {"guest_cid": GUEST_CID, "uds": str(lab / DEVICE_SOCKET), "agent_port": AGENT_PORT,
                  "request_port": REQUEST_PORT,
                  "request_listener": str(lab / f"{DEVICE_SOCKET}_{REQUEST_PORT}")},
    }
