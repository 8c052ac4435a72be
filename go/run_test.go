package evesnap

import (
	"context"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"
)

// A plan the tool refuses (no datasets): exit 2 as ErrUsage, with the tool's report.
func TestABadPlanIsAUsageError(t *testing.T) {
	binary := orchestrateBinary(t)
	report, err := runner(t, binary).Run(context.Background(), Plan{Agent: "unix:/nonexistent/qga.sock"})
	var exit *ExitError
	if !errors.Is(err, ErrUsage) || !errors.As(err, &exit) || !strings.Contains(exit.Message, "datasets") {
		t.Fatalf("want exit 2 naming datasets, got %v (report %+v)", err, report.Error)
	}
}

// A context cancelled before Run starts nothing.
func TestACancelledContextStartsNothing(t *testing.T) {
	ctx, cancel := context.WithCancel(context.Background())
	cancel()
	_, err := Runner{Binary: "/nonexistent/snap-orchestrate"}.Run(ctx, Plan{})
	var exit *ExitError
	if !errors.Is(err, context.Canceled) || errors.As(err, &exit) {
		t.Fatalf("got %v", err)
	}
}

// A real create on the lab: the report and its eve-api view.
func TestRunCreatesAnApplicationConsistentSnapshot(t *testing.T) {
	l, binary := testLab(t)
	plan := labPlan(t, l, "go-create")
	plan.ConfigID, plan.ConfigVersion = newUUID(t), "7"
	plan.GuestPre = []GuestCommand{{Path: "/bin/sh", Args: []string{"-c", "sync"}}}

	report, err := runner(t, binary).Run(context.Background(), plan)
	if err != nil {
		t.Fatalf("Run: %v (report %+v)", err, report.Error)
	}
	if !report.OK || report.Consistency != ApplicationConsistent || report.FreezeWindowMs == nil {
		t.Fatalf("report: ok %v, consistency %q, window %v", report.OK, report.Consistency, report.FreezeWindowMs)
	}
	for _, d := range l.Datasets {
		if !snapshotExists(d, plan.Snapshot) {
			t.Errorf("%s@%s was not created", d, plan.Snapshot)
		}
	}
	z := report.ZInfoSnapshot
	if z.ID != plan.ID || z.Type != SnapshotTypeAppUpdate || z.SnapErr != nil {
		t.Fatalf("zinfo_snapshot: %+v", z)
	}
	if z.ConfigID != plan.ConfigID || z.ConfigVersion != "7" {
		t.Fatalf("config not passed through: %+v", z)
	}
	if z.CreateTime == nil || time.Since(*z.CreateTime) > 10*time.Minute || time.Until(*z.CreateTime) > time.Minute {
		t.Fatalf("create_time %v", z.CreateTime)
	}
	if got := freezeStatus(t, l.Agent); got != "thawed" {
		t.Fatalf("guest %s after the run", got)
	}
}

// A refused run: the report comes back with the error, and its eve-api view says how bad
// (a warning: nothing changed, the guest runs), on what and when to retry.
func TestAFailedRunMapsToEveAPIsSnapErr(t *testing.T) {
	l, binary := testLab(t)
	first := labPlan(t, l, "go-taken")
	if _, err := runner(t, binary).Run(context.Background(), first); err != nil {
		t.Fatalf("the first run: %v", err)
	}
	again := first
	again.ID, again.AppUUID, again.AppName = newUUID(t), newUUID(t), "vault-app"

	report, err := runner(t, binary).Run(context.Background(), again)
	if !errors.Is(err, ErrPreflight) || errors.Is(err, ErrBusy) {
		t.Fatalf("want exit 7, got %v", err)
	}
	var exit *ExitError
	if !errors.As(err, &exit) || exit.Step != "preflight" || !strings.Contains(exit.Message, "exists already") {
		t.Fatalf("exit error %+v", exit)
	}
	e := report.ZInfoSnapshot.SnapErr
	if report.OK || e == nil {
		t.Fatalf("no snap_err: %+v", report.ZInfoSnapshot)
	}
	if e.Severity != SeverityWarning || !strings.HasPrefix(e.RetryCondition, "with another snapshot name") {
		t.Fatalf("severity %v, retry %q", e.Severity, e.RetryCondition)
	}
	if e.Description != report.Error.Message || time.Since(e.Timestamp) > 10*time.Minute {
		t.Fatalf("description %q, timestamp %v", e.Description, e.Timestamp)
	}
	want := []DeviceEntity{{Entity: EntityAppInstance, EntityID: again.AppUUID, EntityName: "vault-app"}}
	for _, d := range l.Datasets {
		want = append(want, DeviceEntity{Entity: EntityVolume, EntityName: d})
	}
	if fmt.Sprint(e.Entities) != fmt.Sprint(want) {
		t.Fatalf("entities %+v, want %+v", e.Entities, want)
	}
	if report.ZInfoSnapshot.CreateTime != nil {
		t.Fatalf("a refused run has a create_time: %v", report.ZInfoSnapshot.CreateTime)
	}
}

// Cancelling the context while the guest is frozen (a zfs whose snapshot hangs): the tool
// gets SIGTERM, thaws, and its report comes back with the context's error.
func TestCancellingARunThawsTheGuestAndReturnsTheReport(t *testing.T) {
	l, binary := testLab(t)
	plan := labPlan(t, l, "go-cancel")
	shim, started := slowZfs(t, 8)
	r := runner(t, binary)
	r.Env = append(r.Env, "EVESNAP_ZFS="+shim)
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	go func() {
		for deadline := time.Now().Add(2 * time.Minute); time.Now().Before(deadline); {
			if _, err := os.Stat(started); err == nil {
				break
			}
			time.Sleep(10 * time.Millisecond)
		}
		cancel()
	}()

	began := time.Now()
	report, err := r.Run(ctx, plan)
	if !errors.Is(err, context.Canceled) || !errors.Is(err, ErrStepFailed) {
		t.Fatalf("want a cancelled exit 1, got %v", err)
	}
	if took := time.Since(began); took > 60*time.Second {
		t.Fatalf("the run took %v", took)
	}
	if report.Error == nil || report.Error.Step != "snapshot" ||
		!strings.Contains(report.Error.Message, "interrupted by signal 15") {
		t.Fatalf("report error %+v", report.Error)
	}
	thawed := false
	for _, s := range report.Steps {
		thawed = thawed || (s.Tool == "qga-thaw" && s.OK)
	}
	if !thawed {
		t.Fatalf("no successful qga-thaw step in %+v", report.Steps)
	}
	if got := freezeStatus(t, l.Agent); got != "thawed" {
		t.Fatalf("guest %s after the cancelled run", got)
	}
	if e := report.ZInfoSnapshot.SnapErr; e == nil || e.Severity != SeverityWarning {
		t.Fatalf("snap_err %+v", e)
	}
}

// slowZfs is a zfs whose snapshot touches the returned marker and waits delay seconds
// before the real one runs (not the bare `zfs snapshot` that probes the usage text).
func slowZfs(t *testing.T, delay int) (shim, started string) {
	real, err := exec.LookPath("zfs")
	if err != nil {
		t.Fatalf("no zfs on PATH: %v", err)
	}
	dir := t.TempDir()
	shim, started = filepath.Join(dir, "zfs"), filepath.Join(dir, "snapshot-started")
	script := fmt.Sprintf("#!/bin/sh\nif [ \"$1\" = snapshot ] && [ $# -gt 1 ]; then touch '%s'; sleep %d; fi\nexec '%s' \"$@\"\n",
		started, delay, real)
	if err := os.WriteFile(shim, []byte(script), 0o755); err != nil {
		t.Fatal(err)
	}
	return shim, started
}
