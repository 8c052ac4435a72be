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
	// App (its UUID) and AppName name the app instance in the error's entities.
	App      string   `json:"app,omitempty"`
	AppName  string   `json:"app_name,omitempty"`
	Action   Action   `json:"action,omitempty"`
	Agent    string   `json:"agent"`
	QMP      string   `json:"qmp,omitempty"`
	Datasets []string `json:"datasets,omitempty"`
	// Volumes name the app's volumes in EVE's terms (instead of Datasets): each is the
	// zvol <VolumeRoot>/<uuid>.<generation>, VolumeRoot defaulting to persist/vault/volumes.
	Volumes    []Volume `json:"volumes,omitempty"`
	VolumeRoot string   `json:"volume_root,omitempty"`
	// Retention is when MaxSnapshots makes room; empty: before the create for plans with an
	// App (EVE's order), after it otherwise.
	Retention RetentionOrder `json:"retention,omitempty"`
	// ShutdownClean states the VM shut itself down cleanly (a halted snapshot is then
	// "halted_clean").
	ShutdownClean       bool                 `json:"shutdown_clean,omitempty"`
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
	Delete   Action = "delete"
)

// Volume is one of EVE's volumes (eve-api VolumeConfig.uuid and its generation counter).
type Volume struct {
	UUID       string  `json:"uuid"`
	Generation *uint32 `json:"generation,omitempty"`
}

// RetentionOrder is when retention makes room.
type RetentionOrder string

const (
	BeforeCreate RetentionOrder = "before_create"
	AfterCreate  RetentionOrder = "after_create"
)

// OnFreezeFailure is what a failed freeze leads to.
type OnFreezeFailure string

const (
	// FailOnFreezeFailure fails the run; nothing is taken (the default).
	FailOnFreezeFailure OnFreezeFailure = "fail"
	// CrashOnFreezeFailure thaws, verifies, and takes a snapshot labelled crash.
	CrashOnFreezeFailure OnFreezeFailure = "crash"
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
	// ExpediteRCU and FlushFirst default to on (nil); set them to false to turn them off.
	ExpediteRCU *bool `json:"expedite_rcu,omitempty"`
	FlushFirst  *bool `json:"flush_first,omitempty"`
	// OnFailure is what a failed freeze leads to; empty: fail.
	OnFailure OnFreezeFailure `json:"on_failure,omitempty"`
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
	// KeepNewer keeps the volume's state and its newer snapshots under
	// <dataset>.evesnap-kept-<stamp>, to roll forward to later.
	KeepNewer bool `json:"keep_newer,omitempty"`
	VMStopped bool `json:"vm_stopped,omitempty"`
}

// GuestDisk is how the guest sees a dataset.
type GuestDisk struct {
	// QDev, Port and WWN say it as the host attached it (the QEMU device id, its
	// pcie-root-port's id, a SCSI disk's WWN); they need the plan's QMP.
	QDev   string `json:"qdev,omitempty"`
	Port   string `json:"port,omitempty"`
	WWN    string `json:"wwn,omitempty"`
	Serial string `json:"serial,omitempty"`
	PCI    string `json:"pci,omitempty"`
	Dev    string `json:"dev,omitempty"`
}
