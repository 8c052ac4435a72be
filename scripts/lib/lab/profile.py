"""`up`, `status` and `down`, written once for both profiles; a profile (zfsfuse.Default,
openzfs.OpenZfs) fills in what differs: its host packages and guest, what the host needs
before the VM boots, the VM's devices, what the guest needs once its agent answers, the lab
object, the pool check, and what `down --purge` removes."""

import json
import time

from .common import LabError, log
from .debs import apt_install
from .vm import ensure_qemu, qemu_running, stop_qemu, wait_for_agent


class Profile:
    name = None  # written to <dir>/profile (the default profile writes none)
    title = None  # in messages: "the <title> in <dir> is not up"
    host_packages = []  # installed on the host
    boot_seconds = 180  # how long a fresh VM may take until its agent answers

    def __init__(self, lab, pool, cache):
        self.lab, self.pool, self.cache = lab, pool, cache

    def ensure_guest(self):
        """The guest's cache folder (vmlinux, initramfs.gz), built when missing."""
        raise NotImplementedError

    def prepare_host(self):
        """Everything on the host the VM needs before it boots (idempotent)."""

    def check_running(self, pid, guest):
        """Whether the running VM can stay as it is; False restarts it, LabError refuses."""
        return True

    def start(self, qemu_root, guest):
        """Boots the VM; its pid."""
        raise NotImplementedError

    def ready(self, pid):
        """Once the agent answers: whatever the guest still needs; the lab object."""
        raise NotImplementedError

    def check_pool(self):
        """LabError unless the pool is online."""
        raise NotImplementedError

    def before_stop(self):
        """Called while the VM still runs, before `down` stops it."""

    def after_stop(self):
        """Called by `down` once the VM has stopped (or was not running)."""

    def purge(self):
        """`down --purge`, after the VM has stopped: the pool and the folder's files."""
        raise NotImplementedError


def check_profile(lab, profile):
    """A lab folder belongs to one profile: refuse to mix them (their files would collide)."""
    marker = lab / "profile"
    found = marker.read_text().strip() if marker.exists() else ("default" if (lab / "lab.json").exists() else None)
    if found is not None and found != profile:
        raise LabError(f"{lab} holds a lab of the {found} profile; use another --dir, or `scripts/lab down --purge"
                       f"{' --openzfs' if found == 'openzfs' else ''} --dir {lab}` first")
    if found is None and profile != "default":
        lab.mkdir(parents=True, exist_ok=True)
        marker.write_text(profile + "\n")


def up(p):
    """Brings the lab up (idempotent: a running VM is kept, a killed one restarted) and prints
    its object, which also goes to <dir>/lab.json for `status`."""
    lab = p.lab
    lab.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    apt_install(sorted(p.host_packages))
    qemu_root = ensure_qemu(p.cache)
    guest = p.ensure_guest()
    p.prepare_host()
    pid = qemu_running(lab)
    if pid is not None and not p.check_running(pid, guest):
        down(p, purge=False)
        pid = None
    if pid is None:
        pid = p.start(qemu_root, guest)
        booted = time.monotonic()
        wait_for_agent(lab, pid, p.boot_seconds)
        log(f"guest agent answers {time.monotonic() - booted:.1f} s after the VM started")
    else:
        wait_for_agent(lab, pid, 60)
    obj = p.ready(pid)
    log(f"up in {time.monotonic() - started:.1f} s")
    (lab / "lab.json").write_text(json.dumps(obj, indent=2) + "\n")
    print(json.dumps(obj, indent=2))


def status(p):
    """Prints the lab object when the VM runs, its agent answers and the pool is online."""
    pid = qemu_running(p.lab)
    if pid is None or not (p.lab / "lab.json").exists():
        raise LabError(f"the {p.title} in {p.lab} is not up (no QEMU)")
    wait_for_agent(p.lab, pid, 5)
    p.check_pool()
    print((p.lab / "lab.json").read_text(), end="")


def down(p, purge):
    """Stops the VM; with `purge` the profile also removes its pool and files."""
    if qemu_running(p.lab) is not None:
        p.before_stop()
    stop_qemu(p.lab)
    p.after_stop()
    if purge:
        p.purge()
