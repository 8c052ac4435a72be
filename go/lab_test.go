package evesnap

import (
	"bufio"
	"encoding/json"
	"fmt"
	"hash/fnv"
	"math/rand"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"
)

// lab is what `scripts/lab status` prints (the fields these tests use).
type lab struct {
	Dir      string               `json:"dir"`
	Agent    string               `json:"agent"`
	QMP      string               `json:"qmp"`
	Pool     string               `json:"pool"`
	Datasets []string             `json:"datasets"`
	Disks    map[string]GuestDisk `json:"disks"`
}

// repoRoot is the repository this package lives in.
func repoRoot(t *testing.T) string {
	wd, err := os.Getwd()
	if err != nil {
		t.Fatal(err)
	}
	return filepath.Dir(wd)
}

// underScriptsTest: scripts/test exports the test lab's folder and brings the lab up, so a
// missing lab is a failure there, never a skip.
func underScriptsTest() bool {
	return os.Getenv("EVESNAP_TEST_LAB_DIR") != ""
}

// labPoolFor is scripts/lib/test-lab.sh's lab_pool_for: PREFIX-<low 32 bits of FNV-1a 64>.
func labPoolFor(prefix, dir string) string {
	h := fnv.New64a()
	h.Write([]byte(dir))
	return fmt.Sprintf("%s-%08x", prefix, h.Sum64()&0xffffffff)
}

// testLab is the running test lab with exclusive use of its VM until the test ends (the
// flock of <dir>/vm.lock, as the Rust tests take it), and snap-orchestrate's path.
func testLab(t *testing.T) (lab, string) {
	t.Helper()
	root := repoRoot(t)
	dir := os.Getenv("EVESNAP_TEST_LAB_DIR")
	if dir == "" {
		dir = filepath.Join(root, "target", "lab-test")
	}
	pool := os.Getenv("EVESNAP_TEST_LAB_POOL")
	if pool == "" {
		pool = labPoolFor("evesnap-test", dir)
	}
	missing := func(format string, args ...interface{}) {
		t.Helper()
		if underScriptsTest() {
			t.Fatalf(format, args...)
		}
		t.Skipf("SKIPPED, no test lab: "+format+" (scripts/test brings it up; by hand: "+
			"EVESNAP_LAB_DIR=%s EVESNAP_LAB_POOL=%s scripts/lab up)", append(args, dir, pool)...)
	}
	cmd := exec.Command(filepath.Join(root, "scripts", "lab"), "status")
	cmd.Env = append(os.Environ(), "EVESNAP_LAB_DIR="+dir, "EVESNAP_LAB_POOL="+pool)
	out, err := cmd.Output()
	if err != nil {
		missing("scripts/lab status for %s: %v", dir, err)
	}
	var l lab
	if err := json.Unmarshal(out, &l); err != nil {
		t.Fatalf("scripts/lab status printed no lab object (%v): %s", err, out)
	}
	binary := orchestrateBinary(t)
	lock, err := os.OpenFile(filepath.Join(dir, "vm.lock"), os.O_CREATE|os.O_WRONLY, 0o644)
	if err != nil {
		t.Fatal(err)
	}
	if err := syscall.Flock(int(lock.Fd()), syscall.LOCK_EX); err != nil {
		t.Fatalf("flock vm.lock: %v", err)
	}
	t.Cleanup(func() { lock.Close() })
	return l, binary
}

// orchestrateBinary is $EVESNAP_SNAP_ORCHESTRATE or the workspace's debug build; a test
// fails without it under scripts/test (which builds it) and skips, saying so, otherwise.
func orchestrateBinary(t *testing.T) string {
	t.Helper()
	binary := os.Getenv("EVESNAP_SNAP_ORCHESTRATE")
	if binary == "" {
		binary = filepath.Join(repoRoot(t), "target", "debug", "snap-orchestrate")
	}
	if _, err := os.Stat(binary); err != nil {
		if underScriptsTest() {
			t.Fatalf("snap-orchestrate is not built: %v", err)
		}
		t.Skipf("SKIPPED: snap-orchestrate is not built (cargo build --workspace --bins): %v", err)
	}
	return binary
}

// runner runs the built snap-orchestrate with a runtime folder of the test's own, private
// as the tools require (t.TempDir's folders are 0755).
func runner(t *testing.T, binary string) Runner {
	dir := t.TempDir()
	if err := os.Chmod(dir, 0o700); err != nil {
		t.Fatal(err)
	}
	return Runner{
		Binary: binary,
		Env:    append(os.Environ(), "EVESNAP_RUN_DIR="+dir),
	}
}

// labPlan is a create plan for every volume of the lab under a fresh snapshot name whose
// snapshots are destroyed when the test ends.
func labPlan(t *testing.T, l lab, name string) Plan {
	timeout, thawAfter := 20.0, 60.0
	name = fmt.Sprintf("%s-%d-%d", name, os.Getpid(), rand.Int31())
	t.Cleanup(func() {
		for _, d := range l.Datasets {
			_ = exec.Command("zfs", "destroy", d+"@"+name).Run()
		}
	})
	return Plan{
		ID:       newUUID(t),
		Type:     AppUpdate,
		Agent:    l.Agent,
		QMP:      l.QMP,
		Datasets: l.Datasets,
		Disks:    l.Disks,
		Snapshot: name,
		Freeze:   &FreezePlan{TimeoutS: &timeout, ThawAfterS: &thawAfter},
	}
}

func newUUID(t *testing.T) string {
	id, err := os.ReadFile("/proc/sys/kernel/random/uuid")
	if err != nil {
		t.Fatal(err)
	}
	return strings.TrimSpace(string(id))
}

// snapshotExists asks zfs whether dataset@name exists.
func snapshotExists(dataset, name string) bool {
	return exec.Command("zfs", "list", "-H", "-o", "name", "-t", "snapshot", dataset+"@"+name).Run() == nil
}

// freezeStatus asks the lab's guest agent for guest-fsfreeze-status, after a guest-sync
// that skips whatever an earlier client left unread.
func freezeStatus(t *testing.T, agent string) string {
	t.Helper()
	conn, err := net.DialTimeout("unix", strings.TrimPrefix(agent, "unix:"), 5*time.Second)
	if err != nil {
		t.Fatalf("connect to the guest agent: %v", err)
	}
	defer conn.Close()
	_ = conn.SetDeadline(time.Now().Add(30 * time.Second))
	lines := bufio.NewScanner(conn)
	id := rand.Int31()
	fmt.Fprintf(conn, "{\"execute\":\"guest-sync\",\"arguments\":{\"id\":%d}}\n", id)
	for {
		if !lines.Scan() {
			t.Fatalf("guest-sync: no answer: %v", lines.Err())
		}
		var sync struct{ Return *int32 }
		if json.Unmarshal(lines.Bytes(), &sync) == nil && sync.Return != nil && *sync.Return == id {
			break
		}
	}
	fmt.Fprintln(conn, `{"execute":"guest-fsfreeze-status"}`)
	if !lines.Scan() {
		t.Fatalf("guest-fsfreeze-status: no answer: %v", lines.Err())
	}
	var status struct{ Return string }
	if err := json.Unmarshal(lines.Bytes(), &status); err != nil {
		t.Fatalf("guest-fsfreeze-status: %s: %v", lines.Bytes(), err)
	}
	return status.Return
}
