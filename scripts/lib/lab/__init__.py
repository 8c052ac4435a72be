"""The evesnap lab (scripts/lab): what both profiles share and the two profiles themselves.

common    running commands, logging, cache keys, pids, the files in scripts/lab.d
debs      Debian packages: apt, downloaded .debs, a private extra apt source
guest     the guest kernel and busybox initramfs both profiles boot
vm        the extracted QEMU, starting and stopping the VM, its agent and QMP
profile   what a profile provides, and `up`, `status`, `down` written once for both
zfsfuse   the default profile: a zfs-fuse pool on the host holding the VM's disks
openzfs   --openzfs: OpenZFS 2.3 with zvols inside the VM
"""
