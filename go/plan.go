package evesnap

// PlanVersion is the plan format version snap-orchestrate reads.
const PlanVersion = 1

// Plan is snap-orchestrate's input (bins/snap-orchestrate/plan.schema.json). Pointer and
// omitempty fields left unset take the tool's defaults.
type Plan struct {
	Version int `json:"version"`
	// ID is the snapshot id (eve-api SnapshotDesc.id, a UUID); generated when empty.
	ID   string       `json:"id,omitempty"`
	Type SnapshotKind `json:"type,omitempty"`
	// ConfigID and ConfigVersion are passed through to ZInfoSnapshot.
	ConfigID      string `json:"config_id,omitempty"`
	ConfigVersion string `json:"config_version,omitempty"`
	// AppUUID and AppName name the app instance in the error's entities.
	AppUUID             string               `json:"app_uuid,omitempty"`
	AppName             string               `json:"app_name,omitempty"`
	Action              Action               `json:"action,omitempty"`
	Agent               string               `json:"agent"`
	QMP                 string               `json:"qmp,omitempty"`
	Datasets            []string             `json:"datasets,omitempty"`
	Snapshot            string               `json:"snapshot,omitempty"`
	Freeze              *FreezePlan          `json:"freeze,omitempty"`
	GuestPre            []GuestCommand       `json:"guest_pre,omitempty"`
	GuestPost           []GuestCommand       `json:"guest_post,omitempty"`
	MaxSnapshots        *uint32              `json:"max_snapshots,omitempty"`
	Origin              Origin               `json:"origin,omitempty"`
	LockWaitS           float64              `json:"lock_wait_s,omitempty"`
	ApplicationQuiesced bool                 `json:"application_quiesced,omitempty"`
	Rollback            *RollbackPlan        `json:"rollback,omitempty"`
	Disks               map[string]GuestDisk `json:"disks,omitempty"`
}

// SnapshotKind is evesnap's spelling of eve-api's SnapshotType in plans and reports.
type SnapshotKind string

const (
	AppUpdate SnapshotKind = "app_update"
	Immediate SnapshotKind = "immediate"
)

// Action is what a run does.
type Action string

const (
	Create   Action = "create"
	Rollback Action = "rollback"
)

// Origin is who asked for a snapshot.
type Origin string

const (
	FromController Origin = "controller"
	FromGuest      Origin = "guest"
)

// FreezePlan is the plan's "freeze" object.
type FreezePlan struct {
	Enabled     *bool    `json:"enabled,omitempty"`
	Mountpoints []string `json:"mountpoints,omitempty"`
	TimeoutS    *float64 `json:"timeout_s,omitempty"`
	ThawAfterS  *float64 `json:"thaw_after_s,omitempty"`
	Required    *bool    `json:"required,omitempty"`
	ExpediteRCU bool     `json:"expedite_rcu,omitempty"`
}

// GuestCommand is a program run in the guest through guest-exec (no shell).
type GuestCommand struct {
	Path     string   `json:"path"`
	Args     []string `json:"args,omitempty"`
	TimeoutS *float64 `json:"timeout_s,omitempty"`
	Fatal    *bool    `json:"fatal,omitempty"`
}

// RollbackPlan is the plan's "rollback" object.
type RollbackPlan struct {
	To           string `json:"to"`
	DestroyNewer bool   `json:"destroy_newer,omitempty"`
	VMStopped    bool   `json:"vm_stopped,omitempty"`
}

// GuestDisk is how the guest sees a dataset.
type GuestDisk struct {
	Serial string `json:"serial,omitempty"`
	PCI    string `json:"pci,omitempty"`
	Dev    string `json:"dev,omitempty"`
}
