package evesnap

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"os/exec"
	"strings"
	"syscall"
	"time"
)

// Runner runs snap-orchestrate. The zero value runs "snap-orchestrate" from PATH.
type Runner struct {
	// Binary is the snap-orchestrate executable (default: "snap-orchestrate" on PATH).
	Binary string
	// KillAfter bounds the wait for the tool after the SIGTERM a cancelled context sends
	// (default 30 s; the tool itself ends within 10 s). Past it the tool is killed: its
	// auto-thaw watchdog, a process of its own, still thaws the guest at the plan's
	// freeze.thaw_after_s.
	KillAfter time.Duration
	// Stderr receives the tool's log (default: kept, and its end used in errors when the
	// tool wrote no report).
	Stderr io.Writer
	// Env is the tool's environment (default: this process's).
	Env []string
}

// Run runs plan with the default Runner.
func Run(ctx context.Context, plan Plan) (Report, error) {
	return Runner{}.Run(ctx, plan)
}

// Run writes plan to snap-orchestrate's stdin and returns the report it prints. It returns
// the report also when the run failed, with an *ExitError. When ctx is done before the
// tool is, the tool gets SIGTERM (it thaws the guest first, then reports) and Run waits for
// its report.
func (r Runner) Run(ctx context.Context, plan Plan) (Report, error) {
	var report Report
	if err := ctx.Err(); err != nil {
		return report, fmt.Errorf("evesnap: not started: %w", err)
	}
	if plan.Version == 0 {
		plan.Version = PlanVersion
	}
	input, err := json.Marshal(plan)
	if err != nil {
		return report, fmt.Errorf("evesnap: the plan: %w", err)
	}
	binary := r.Binary
	if binary == "" {
		binary = "snap-orchestrate"
	}
	var stdout, stderr bytes.Buffer
	cmd := exec.Command(binary)
	cmd.Stdin = bytes.NewReader(input)
	cmd.Stdout = &stdout
	cmd.Stderr = &stderr
	if r.Stderr != nil {
		cmd.Stderr = io.MultiWriter(&stderr, r.Stderr)
	}
	cmd.Env = r.Env
	if err := cmd.Start(); err != nil {
		return report, fmt.Errorf("evesnap: cannot start %s: %w", binary, err)
	}
	stopped := r.stopOnCancel(ctx, cmd)
	waitErr := cmd.Wait()
	cause := stopped()
	parsed := json.Unmarshal(stdout.Bytes(), &report)

	code := cmd.ProcessState.ExitCode()
	var exitErr *exec.ExitError
	if waitErr != nil && !errors.As(waitErr, &exitErr) {
		return report, fmt.Errorf("evesnap: %s: %w", binary, waitErr)
	}
	if code < 0 && cause != nil {
		return report, fmt.Errorf("evesnap: %s %s after the run was stopped: %w", binary, cmd.ProcessState, cause)
	}
	if code < 0 {
		return report, fmt.Errorf("evesnap: %s %s", binary, cmd.ProcessState)
	}
	if code == 0 {
		if parsed != nil {
			return report, fmt.Errorf("evesnap: %s printed no report: %w", binary, parsed)
		}
		return report, nil
	}
	failure := &ExitError{Code: code, Kind: kindOf(code), cause: cause}
	if report.Error != nil {
		failure.Message, failure.Step = report.Error.Message, report.Error.Step
	} else {
		failure.Message = lastLine(stderr.String())
	}
	return report, failure
}

// stopOnCancel sends SIGTERM to the tool when ctx is done, and SIGKILL KillAfter later.
// The function it returns ends the watch once the tool has exited, and gives ctx's error
// when the tool was stopped.
func (r Runner) stopOnCancel(ctx context.Context, cmd *exec.Cmd) func() error {
	killAfter := r.KillAfter
	if killAfter <= 0 {
		killAfter = 30 * time.Second
	}
	exited := make(chan struct{})
	result := make(chan error, 1)
	go func() {
		select {
		case <-exited:
			result <- nil
			return
		case <-ctx.Done():
		}
		_ = cmd.Process.Signal(syscall.SIGTERM)
		select {
		case <-exited:
		case <-time.After(killAfter):
			_ = cmd.Process.Kill()
			<-exited
		}
		result <- ctx.Err()
	}()
	return func() error {
		close(exited)
		return <-result
	}
}

func lastLine(text string) string {
	lines := strings.Split(strings.TrimSpace(text), "\n")
	return lines[len(lines)-1]
}
