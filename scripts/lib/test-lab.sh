# Sourced by scripts/test and scripts/soak: the test lab's folder and pool, and `lab`.
#
# Each lab folder gets a pool name of its own (prefix + hash of the folder): two checkouts on
# one machine (a CI clone next to a developer's tree) share the one zfs-fuse daemon and its
# pool cache, and must never share a pool. tests/src/lab.rs derives the same name.

# lab_pool_for PREFIX DIR: PREFIX-XXXXXXXX, the low 32 bits of FNV-1a 64 of DIR, in hex.
lab_pool_for() {
  python3 - "$1" "$2" <<'PY'
import sys
h = 0xcbf29ce484222325
for b in sys.argv[2].encode():
    h = ((h ^ b) * 0x100000001b3) & 0xffffffffffffffff
print(f"{sys.argv[1]}-{h & 0xffffffff:08x}")
PY
}

# use_test_lab DEFAULT_DIR PREFIX: exports EVESNAP_TEST_LAB_DIR and EVESNAP_TEST_LAB_POOL
# (either may be given in the environment instead).
use_test_lab() {
  export EVESNAP_TEST_LAB_DIR="${EVESNAP_TEST_LAB_DIR:-$1}"
  if [ -z "${EVESNAP_TEST_LAB_POOL:-}" ]; then
    EVESNAP_TEST_LAB_POOL="$(lab_pool_for "$2" "$EVESNAP_TEST_LAB_DIR")"
  fi
  export EVESNAP_TEST_LAB_POOL
}

# Two VMs by default (tests/src/lab.rs test_lab_vms: the consistency group tests).
lab() { EVESNAP_LAB_DIR="$EVESNAP_TEST_LAB_DIR" EVESNAP_LAB_POOL="$EVESNAP_TEST_LAB_POOL" \
  EVESNAP_LAB_VMS="${EVESNAP_TEST_LAB_VMS:-2}" scripts/lab "$@"; }
