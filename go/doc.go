// Package evesnap runs snap-orchestrate from Go (EVE's pillar, e.g. volumemgr) and gives
// its plan, report and VM-wire documents as Go types.
//
// Run writes the plan to the tool's stdin and decodes the report from its stdout. A failed
// run returns the report too, with an *ExitError that errors.Is matches against the
// sentinels of the exit-code table (ErrAgentUnreachable, ErrThawFailed, ...). Cancelling the
// context sends SIGTERM to the tool, which thaws the guest before it exits, and Run still
// waits for the report.
//
// Report.ZInfoSnapshot is eve-api's ZInfoSnapshot (lf-edge/eve-api proto/info/info.proto)
// with enum values numbered as in the proto, so pillar converts it field by field (see
// README, "From Go").
//
// Standard library only.
package evesnap
