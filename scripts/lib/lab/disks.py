"""How the lab attaches its data disks to the VM, for both profiles (docs/lab.md#eves-vm-shape).

`eve` (the default): EVE's shape (lf-edge/eve pkg/pillar/hypervisor/kvm.go): a q35 machine,
each disk behind its own `pcie-root-port` (`id pci.N`, slot N of pcie.0) at `addr 0x0`, as a
`virtio-blk-pci` without serial; the disks chosen by EVESNAP_LAB_SCSI (`all`, or a comma list
of disk names such as `disk1`) go through a `virtio-scsi-pci` HBA of their own behind their
root port, as a `scsi-hd` carrying a WWN (standing in for EVE's `vhost-scsi-pci` with `wwpn`,
which needs the host kernel's LIO target). The host describes each disk as it knows it: the
QEMU device id (`qdev`), the root port's id (`port`), the WWN; never by serial.

`serial` (EVESNAP_LAB_SHAPE=serial, for comparison): the old shape, an i440fx machine with
each disk a `virtio-blk-pci` on the root bus at slot 7+N with the serial `diskN`."""

import os
from dataclasses import dataclass

# The first root port's slot on pcie.0; disk N sits behind the port in slot FIRST_PORT_SLOT+N.
FIRST_PORT_SLOT = 0x8
# NAA-5 (IEEE registered) WWNs, one per disk: the last 16 bits are the disk's index.
WWN_BASE = 0x5001405E7A5B0000


@dataclass(frozen=True)
class Disk:
    name: str  # diskN: the ext4 label, and the host's name for it
    index: int
    scsi: bool  # behind a virtio-scsi-pci HBA (eve shape only)

    @property
    def qdev(self):
        return f"scsi-disk{self.index}" if self.scsi else f"virtio-disk{self.index}"

    @property
    def slot(self):
        return FIRST_PORT_SLOT + self.index if shape() == "eve" else 0x7 + self.index

    @property
    def port(self):
        return f"pci.{self.slot}"

    @property
    def hba(self):
        return f"scsi{self.index}"

    @property
    def wwn(self):
        return f"{WWN_BASE + self.index:#018x}"


def shape():
    value = os.environ.get("EVESNAP_LAB_SHAPE", "eve")
    if value not in ("eve", "serial"):
        raise SystemExit(f"lab: error: EVESNAP_LAB_SHAPE must be `eve` or `serial`, not {value!r}")
    return value


def machine():
    """q35 for EVE's shape (EVE uses pc-q35-3.1; QEMU 7.2's q35 has the same devices)."""
    return "q35" if shape() == "eve" else "pc"


def scsi_names(names):
    """The disks EVESNAP_LAB_SCSI puts behind a virtio-scsi HBA: `all`, or a comma list of names."""
    text = os.environ.get("EVESNAP_LAB_SCSI", "").strip()
    if not text:
        return set()
    if shape() != "eve":
        raise SystemExit("lab: error: EVESNAP_LAB_SCSI needs EVE's shape (not EVESNAP_LAB_SHAPE=serial)")
    if text == "all":
        return set(names)
    chosen = {n.strip() for n in text.split(",")}
    unknown = sorted(chosen - set(names))
    if unknown:
        raise SystemExit(f"lab: error: EVESNAP_LAB_SCSI names {', '.join(unknown)}, not among the disks "
                         f"{', '.join(names)}")
    return chosen


def disks(names):
    """The Disk of each name, in order."""
    scsi = scsi_names(names)
    return [Disk(name, i, name in scsi) for i, name in enumerate(names)]


def disk_devices(disk, image, cache="writeback"):
    """QEMU arguments attaching `image` (raw) as `disk`."""
    drive = ["-drive", f"file={image},format=raw,if=none,id=drive-{disk.qdev},cache={cache}"]
    if shape() == "serial":
        return drive + ["-device", f"virtio-blk-pci,id={disk.qdev},drive=drive-{disk.qdev},serial={disk.name},"
                                   f"addr={disk.slot:#x}"]
    port = ["-device", f"pcie-root-port,id={disk.port},bus=pcie.0,chassis={disk.slot},addr={disk.slot:#x}"]
    if disk.scsi:
        return drive + port + [
            "-device", f"virtio-scsi-pci,id={disk.hba},bus={disk.port},addr=0x0",
            "-device", f"scsi-hd,id={disk.qdev},drive=drive-{disk.qdev},bus={disk.hba}.0,channel=0,scsi-id=0,"
                       f"lun=0,wwn={disk.wwn}"]
    return drive + port + ["-device", f"virtio-blk-pci,id={disk.qdev},drive=drive-{disk.qdev},bus={disk.port},"
                                      f"addr=0x0"]


def describe(disk):
    """The disk as the host knows it (plan field `disks`, serve's volumes map)."""
    if shape() == "serial":
        return {"serial": disk.name, "pci": f"0000:00:{disk.slot:02x}.0"}
    described = {"qdev": disk.qdev, "port": disk.port}
    if disk.scsi:
        described["wwn"] = disk.wwn
    return described
