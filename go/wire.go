package evesnap

// The VM wire of snap-orchestrate serve (bins/snap-orchestrate/request.schema.json and
// reply.schema.json): one JSON object per line each way.

// WireVersion is the wire format version.
const WireVersion = 1

// Op is what a guest asks for.
type Op string

const (
	OpCreate   Op = "create"
	OpList     Op = "list"
	OpRollback Op = "rollback"
)

// Request is a guest's request.
type Request struct {
	Version    int     `json:"version"`
	ID         string  `json:"id"`
	Op         Op      `json:"op"`
	Disk       DiskRef `json:"disk"`
	Name       string  `json:"name,omitempty"`
	To         string  `json:"to,omitempty"`
	Quiesced   bool    `json:"quiesced,omitempty"`
	DeadlineMs *uint64 `json:"deadline_ms,omitempty"`
	// AcceptCrash: a failed freeze gives a crash-consistent snapshot instead of an error.
	AcceptCrash bool `json:"accept_crash,omitempty"`
}

// DiskRef is the guest's description of one of its disks.
type DiskRef struct {
	Path       string `json:"path"`
	Device     string `json:"device,omitempty"`
	Mountpoint string `json:"mountpoint,omitempty"`
	Serial     string `json:"serial,omitempty"`
	PCI        string `json:"pci,omitempty"`
}

// Reply is the host's answer.
type Reply struct {
	Version        int            `json:"version"`
	ID             *string        `json:"id"`
	OK             bool           `json:"ok"`
	Op             Op             `json:"op,omitempty"`
	Disks          []string       `json:"disks,omitempty"`
	Snapshot       string         `json:"snapshot,omitempty"`
	Snapshots      []WireSnapshot `json:"snapshots,omitempty"`
	Consistency    Consistency    `json:"consistency,omitempty"`
	FreezeWindowMs *float64       `json:"freeze_window_ms,omitempty"`
	Destroyed      []string       `json:"destroyed,omitempty"`
	// CrashReason says why a snapshot is crash-consistent after a failed freeze.
	CrashReason string      `json:"crash_reason,omitempty"`
	Error       *ReplyError `json:"error,omitempty"`
}

// WireSnapshot is a snapshot of a guest disk, as the guest sees it.
type WireSnapshot struct {
	Disk        string      `json:"disk"`
	Name        string      `json:"name"`
	GUID        string      `json:"guid"`
	Creation    uint64      `json:"creation"`
	Consistency Consistency `json:"consistency,omitempty"`
}

// ReplyError says why a request failed.
type ReplyError struct {
	Kind        string                   `json:"kind"`
	Code        int                      `json:"code"`
	Message     string                   `json:"message"`
	Step        string                   `json:"step,omitempty"`
	Problems    []map[string]interface{} `json:"problems,omitempty"`
	Quota       *GuestQuota              `json:"quota,omitempty"`
	RetryAfterS *uint32                  `json:"retry_after_s,omitempty"`
}

// GuestQuota is the guest's snapshot budget.
type GuestQuota struct {
	Snapshots    uint64 `json:"snapshots"`
	MaxSnapshots uint64 `json:"max_snapshots"`
	Bytes        uint64 `json:"bytes"`
	// MaxBytes is absent when the quota is a share of the pool.
	MaxBytes *uint64 `json:"max_bytes,omitempty"`
}
