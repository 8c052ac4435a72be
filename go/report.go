package evesnap

import "encoding/json"

// Report is snap-orchestrate's output (bins/snap-orchestrate/report.schema.json).
type Report struct {
	Version  int          `json:"version"`
	OK       bool         `json:"ok"`
	Steps    []Step       `json:"steps"`
	Error    *ReportError `json:"error"`
	Agent    string       `json:"agent"`
	Datasets []string     `json:"datasets"`
	Snapshot string       `json:"snapshot"`
	ID       string       `json:"id"`
	Type     SnapshotKind `json:"type"`
	Action   Action       `json:"action"`
	Origin   Origin       `json:"origin"`
	// CreateTime is RFC 3339 (also in ZInfoSnapshot.CreateTime, parsed).
	CreateTime     string          `json:"create_time,omitempty"`
	Snapshots      []SnapshotEntry `json:"snapshots,omitempty"`
	Consistency    Consistency     `json:"consistency,omitempty"`
	FreezeWindowMs *float64        `json:"freeze_window_ms,omitempty"`
	PoolTurnWaitMs *float64        `json:"pool_turn_wait_ms,omitempty"`
	ExpeditedRCU   *ExpeditedRCU   `json:"expedited_rcu,omitempty"`
	App            string          `json:"app,omitempty"`
	AppName        string          `json:"app_name,omitempty"`
	// ZInfoSnapshot is eve-api's view of the run.
	ZInfoSnapshot ZInfoSnapshot `json:"zinfo_snapshot"`
	// GuestPost is "ran", "pending" or empty.
	GuestPost  string       `json:"guest_post,omitempty"`
	RolledBack []RolledBack `json:"rolled_back,omitempty"`
	Destroyed  []string     `json:"destroyed,omitempty"`
	// Deleted lists what a delete destroyed (empty when the set was already gone).
	Deleted []string `json:"deleted,omitempty"`
	// Existing: the create found its id's set already whole, or the rollback found every
	// volume already there; nothing was done.
	Existing bool `json:"existing,omitempty"`
	// VolumeSnapshots maps volume UUID to "dataset@name" (eve-api VolumeSnapshotMeta).
	VolumeSnapshots map[string]string `json:"volume_snapshots,omitempty"`
	// Warnings are failures the run went on from (a crash-consistent fallback).
	Warnings []ReportWarning `json:"warnings,omitempty"`
	// VMs is a consistency group's per-VM part (a plan with "vms"); Agent is then empty.
	VMs []VMReport `json:"vms,omitempty"`
}

// VMReport is one VM of a consistency group.
type VMReport struct {
	Agent          string       `json:"agent"`
	Datasets       []string     `json:"datasets"`
	Required       bool         `json:"required"`
	OK             bool         `json:"ok"`
	Steps          []Step       `json:"steps"`
	Frozen         *int64       `json:"frozen,omitempty"`
	Consistency    Consistency  `json:"consistency,omitempty"`
	FreezeWindowMs *float64     `json:"freeze_window_ms,omitempty"`
	GuestPost      string       `json:"guest_post,omitempty"`
	Error          *ReportError `json:"error,omitempty"`
}

// ReportWarning is a failure the run went on from, as its plan allows.
type ReportWarning struct {
	Kind    string `json:"kind"`
	Step    string `json:"step"`
	Message string `json:"message"`
}

// ReportError is the run's first failure as evesnap records it.
type ReportError struct {
	Tool        string `json:"tool"`
	Kind        string `json:"kind"`
	Message     string `json:"message"`
	Description string `json:"description"`
	Step        string `json:"step"`
	Timestamp   string `json:"timestamp"`
}

// Consistency is what a snapshot can claim.
type Consistency string

const (
	ApplicationConsistent Consistency = "application"
	FilesystemConsistent  Consistency = "filesystem"
	CrashConsistent       Consistency = "crash"
	// Halted: the VM was not running; HaltedClean: it shut itself down cleanly.
	Halted      Consistency = "halted"
	HaltedClean Consistency = "halted_clean"
)

// SnapshotEntry is one snapshot taken.
type SnapshotEntry struct {
	Name      string `json:"name"`
	GUID      string `json:"guid"`
	CreateTxg uint64 `json:"createtxg"`
	Creation  uint64 `json:"creation"`
}

// RolledBack is a dataset and the snapshot it went back to.
type RolledBack struct {
	Dataset string `json:"dataset"`
	To      string `json:"to"`
}

// ExpeditedRCU says whether the guest ran with expedited RCU for the freeze.
type ExpeditedRCU struct {
	Set      bool   `json:"set"`
	Restored *bool  `json:"restored,omitempty"`
	Error    string `json:"error,omitempty"`
}

// Step is one step of the run: the common fields and the step's own, undecoded.
type Step struct {
	Tool       string
	OK         bool
	StartedAt  string
	DurationMs float64
	Fields     map[string]json.RawMessage
}

var stepCommon = []string{"tool", "ok", "started_at", "duration_ms"}

// UnmarshalJSON reads the common fields and keeps the rest in Fields.
func (s *Step) UnmarshalJSON(data []byte) error {
	var fields map[string]json.RawMessage
	if err := json.Unmarshal(data, &fields); err != nil {
		return err
	}
	targets := []interface{}{&s.Tool, &s.OK, &s.StartedAt, &s.DurationMs}
	for i, name := range stepCommon {
		if raw, ok := fields[name]; ok {
			if err := json.Unmarshal(raw, targets[i]); err != nil {
				return err
			}
			delete(fields, name)
		}
	}
	s.Fields = fields
	return nil
}

// MarshalJSON writes the step back as one object.
func (s Step) MarshalJSON() ([]byte, error) {
	fields := make(map[string]interface{}, len(s.Fields)+4)
	for name, raw := range s.Fields {
		fields[name] = raw
	}
	fields["tool"], fields["ok"] = s.Tool, s.OK
	fields["started_at"], fields["duration_ms"] = s.StartedAt, s.DurationMs
	return json.Marshal(fields)
}
