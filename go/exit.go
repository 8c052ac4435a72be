package evesnap

import "fmt"

// ExitError is a run that ended with a non-zero code of evesnap's exit-code table
// (shared/src/exit.rs). errors.Is(err, ErrThawFailed) and the like compare the code; when
// the run was cancelled, errors.Is(err, context.Canceled) holds too.
type ExitError struct {
	Code int
	// Kind is the code's name, as the report's error.kind.
	Kind string
	// Message is the report's error.message, or the tool's stderr when there is no report.
	Message string
	// Step is the step that failed (preflight, guest_pre, freeze, snapshot, thaw, ...).
	Step string
	// cause is why the tool was stopped (the context's error), if it was.
	cause error
}

func (e *ExitError) Error() string {
	text := fmt.Sprintf("snap-orchestrate: exit %d (%s)", e.Code, e.Kind)
	if e.Step != "" {
		text += " in " + e.Step
	}
	if e.Message != "" {
		text += ": " + e.Message
	}
	return text
}

// Is matches a sentinel of the same code.
func (e *ExitError) Is(target error) bool {
	t, ok := target.(*ExitError)
	return ok && t.Code == e.Code
}

// Unwrap gives the context's error when the run was cancelled.
func (e *ExitError) Unwrap() error { return e.cause }

// The exit-code table, one sentinel per non-zero code.
var (
	ErrStepFailed       = &ExitError{Code: 1, Kind: "step-failed"}
	ErrUsage            = &ExitError{Code: 2, Kind: "bad-input"}
	ErrAgentUnreachable = &ExitError{Code: 3, Kind: "agent-unreachable"}
	ErrAgentTimeout     = &ExitError{Code: 4, Kind: "agent-timeout"}
	ErrUpstreamFailed   = &ExitError{Code: 5, Kind: "upstream-failed"}
	// ErrThawFailed: the guest may still be frozen.
	ErrThawFailed = &ExitError{Code: 6, Kind: "thaw-failed"}
	ErrPreflight  = &ExitError{Code: 7, Kind: "preflight-failed"}
	ErrBusy       = &ExitError{Code: 8, Kind: "busy"}
)

// exitTable is every sentinel, in code order.
var exitTable = []*ExitError{
	ErrStepFailed, ErrUsage, ErrAgentUnreachable, ErrAgentTimeout, ErrUpstreamFailed,
	ErrThawFailed, ErrPreflight, ErrBusy,
}

// kindOf is the name of code, or "unknown".
func kindOf(code int) string {
	for _, e := range exitTable {
		if e.Code == code {
			return e.Kind
		}
	}
	return "unknown"
}
