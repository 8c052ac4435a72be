"""What every part of the lab uses: logging, running commands, cache keys, pid files, and
the guest scripts in scripts/lab.d."""

import hashlib
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[3]
# The scripts and sources that go into the guests, as files (see scripts/lab.d).
LAB_D = REPO / "scripts/lab.d"


def log(msg):
    print(f"lab: {msg}", file=sys.stderr, flush=True)


class LabError(Exception):
    pass


def run(argv, check=True, capture=True, env=None, timeout=600):
    res = subprocess.run(argv, stdin=subprocess.DEVNULL, capture_output=capture, text=True, env=env,
                         timeout=timeout)
    if check and res.returncode != 0:
        raise LabError(f"{' '.join(map(str, argv))} exited {res.returncode}: {(res.stderr or '').strip()}")
    return res


def lab_file(name, **placeholders):
    """The text of scripts/lab.d/<name>, each `__KEY__` replaced by its value. Cache keys are
    computed over this text, so a changed file rebuilds what embeds it."""
    text = (LAB_D / name).read_text()
    for key, value in placeholders.items():
        text = text.replace(f"__{key}__", str(value))
    return text


def key_of(*parts):
    return hashlib.sha256("\n".join(map(str, parts)).encode()).hexdigest()[:16]


def pid_alive(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def read_pid(path):
    try:
        return int(path.read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return None
