"""Debian packages: what the machine's apt knows, .debs downloaded into the cache (never
installed when they only go into the VM), and one more suite seen only by the lab."""

import os
import re
import subprocess
import tempfile
import time
from pathlib import Path

from .common import LabError, log, run


def apt_updated_once():
    lists = Path("/var/lib/apt/lists")
    if not any(lists.glob("*_Packages*")):
        apt_refresh()


_APT_REFRESHED = []


def apt_refresh():
    """`apt-get update`, at most once per run: for a machine whose package lists are missing
    or so old that the versions they name are gone from the mirror."""
    if _APT_REFRESHED:
        return False
    _APT_REFRESHED.append(True)
    log("apt-get update")
    run(["apt-get", "update", "-q"])
    return True


def apt_show(pkg, source=None):
    """Version and Depends of the candidate of `pkg` (from the machine's sources, or from
    `source`, an `AptSource`)."""
    opts = source.options() if source else []
    res = run(["apt-cache", *opts, "show", "--no-all-versions", pkg], check=False)
    if res.returncode != 0 or not res.stdout.strip():
        if source:
            source.update()
        else:
            apt_updated_once()
        res = run(["apt-cache", *opts, "show", "--no-all-versions", pkg])
    fields = {}
    for line in res.stdout.splitlines():
        m = re.match(r"^([A-Za-z-]+): (.*)$", line)
        if m:
            fields.setdefault(m.group(1), m.group(2))
    return fields


def dep_names(depends):
    """First alternative of each dependency, without version constraints."""
    names = []
    for item in depends.split(","):
        first = item.split("|")[0].strip()
        name = re.sub(r"\s*\(.*\)", "", first).split(":")[0].strip()
        if name:
            names.append(name)
    return names


def installed(pkg):
    res = run(["dpkg-query", "-W", "-f=${Status}", pkg], check=False)
    return res.returncode == 0 and "install ok installed" in res.stdout


def apt_install(pkgs):
    missing = [p for p in pkgs if not installed(p)]
    if not missing:
        return
    apt_updated_once()
    log(f"apt-get install {' '.join(missing)}")
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    argv = ["apt-get", "install", "-y", "-q", "--no-install-recommends", *missing]
    if run(argv, env=env, check=False).returncode != 0 and apt_refresh():
        run(argv, env=env)
    elif not all(installed(p) for p in missing):
        raise LabError(f"apt-get install {' '.join(missing)} failed")


def fetch_debs(cache, pkgs, source=None):
    """Downloads the candidate .deb of each package into the cache (once per version)."""
    debs = {}
    folder = cache / "debs"
    folder.mkdir(parents=True, exist_ok=True)
    opts = source.options() if source else []
    for pkg in pkgs:
        fields = apt_show(pkg, source)
        version = fields["Version"]
        arch = fields.get("Architecture", "amd64")
        name = f"{pkg}_{version.replace(':', '%3a')}_{arch}.deb"
        path = folder / name
        if not path.exists():
            log(f"apt-get download {pkg} {version}")
            argv = ["apt-get", *opts, "-o", "APT::Sandbox::User=root", "download", f"{pkg}={version}"]
            got = subprocess.run(argv, cwd=folder, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL)
            if got.returncode != 0 and source is None and apt_refresh():
                # Old lists name a version the mirror no longer has: look again.
                return fetch_debs(cache, pkgs, source)
            if got.returncode != 0 or not path.exists():
                raise LabError(f"apt-get download {pkg}={version} failed")
        debs[pkg] = (version, path, fields)
    return debs


def extract(deb, dest):
    run(["dpkg-deb", "-x", str(deb), str(dest)])


class AptSource:
    """One more Debian suite/component (e.g. bookworm-backports contrib) seen only by the lab:
    the sources file lives in a temporary folder for as long as the `with` block runs, and
    its package lists and apt cache in `<cache>/apt-<name>`, so the machine's own apt
    configuration, lists and cache are never touched and `apt-get install` is unaffected."""

    def __init__(self, cache, suite, components):
        self.suite, self.components = suite, components
        self.state = cache / f"apt-{suite}-{components.replace(' ', '-')}"
        self.tmp = None

    def __enter__(self):
        self.tmp = tempfile.TemporaryDirectory(prefix="evesnap-apt-")
        (self.state / "lists/partial").mkdir(parents=True, exist_ok=True)
        (self.state / "cache/archives/partial").mkdir(parents=True, exist_ok=True)
        (Path(self.tmp.name) / "lab.sources").write_text(
            f"Types: deb\nURIs: {debian_mirror()}\nSuites: {self.suite}\nComponents: {self.components}\n"
            "Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg\n")
        # Lists a week old may name .debs the mirror no longer has: refresh them.
        stamp = self.state / "updated"
        if stamp.exists() and time.time() - stamp.stat().st_mtime > 7 * 86400:
            self.update()
        return self

    def __exit__(self, *exc):
        self.tmp.cleanup()
        self.tmp = None

    def options(self):
        assert self.tmp, "AptSource used outside its `with` block"
        return ["-o", f"Dir::Etc::sourcelist={Path(self.tmp.name) / 'lab.sources'}", "-o", "Dir::Etc::sourceparts=-",
                "-o", f"Dir::State::Lists={self.state / 'lists'}", "-o", f"Dir::Cache={self.state / 'cache'}",
                "-o", "APT::Get::List-Cleanup=0"]

    def update(self):
        log(f"apt-get update ({self.suite} {self.components}, lists in {self.state})")
        run(["apt-get", *self.options(), "update", "-q"])
        (self.state / "updated").write_text(time.strftime("%Y-%m-%dT%H:%M:%SZ\n", time.gmtime()))


def debian_mirror():
    """The Debian archive URI the machine's own sources use."""
    files = [Path("/etc/apt/sources.list"), *sorted(Path("/etc/apt/sources.list.d").glob("*.list")),
             *sorted(Path("/etc/apt/sources.list.d").glob("*.sources"))]
    for f in files:
        try:
            text = f.read_text()
        except OSError:
            continue
        for stanza in re.split(r"\n\s*\n", text):
            uris = re.search(r"^URIs:\s*(\S+)", stanza, re.M)
            suites = re.search(r"^Suites:\s*(.*)$", stanza, re.M)
            if uris and suites and "debian-security" not in uris.group(1) and \
                    any(not s.endswith("-security") for s in suites.group(1).split()):
                return uris.group(1).rstrip("/")
        for line in text.splitlines():
            m = re.match(r"^deb\s+(?:\[[^]]*\]\s+)?(\S+)\s+(\S+)", line)
            if m and "security" not in m.group(1) and "debian" in m.group(1):
                return m.group(1).rstrip("/")
    return "http://deb.debian.org/debian"
