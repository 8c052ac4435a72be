package evesnap

import (
	"encoding/json"
	"fmt"
	"time"
)

// ZInfoSnapshot is eve-api's info.ZInfoSnapshot as the report carries it (protojson with
// proto field names). The enums are numbered as in the proto: info.SnapshotType(z.Type),
// info.Severity(e.Severity) and info.Entity(d.Entity) convert them.
type ZInfoSnapshot struct {
	ID            string `json:"id"`
	ConfigID      string `json:"config_id,omitempty"`
	ConfigVersion string `json:"config_version,omitempty"`
	// CreateTime is nil when no snapshot was created.
	CreateTime *time.Time   `json:"create_time,omitempty"`
	Type       SnapshotType `json:"type"`
	SnapErr    *ErrorInfo   `json:"snap_err,omitempty"`
}

// ErrorInfo is eve-api's info.ErrorInfo.
type ErrorInfo struct {
	Description    string         `json:"description"`
	Timestamp      time.Time      `json:"timestamp"`
	Severity       Severity       `json:"severity"`
	Entities       []DeviceEntity `json:"entities,omitempty"`
	RetryCondition string         `json:"retry_condition"`
}

// DeviceEntity is eve-api's info.DeviceEntity.
type DeviceEntity struct {
	Entity     Entity `json:"entity"`
	EntityID   string `json:"entity_id,omitempty"`
	EntityName string `json:"entity_name,omitempty"`
}

// SnapshotType is eve-api's info.SnapshotType.
type SnapshotType int32

const (
	SnapshotTypeUnspecified SnapshotType = 0
	SnapshotTypeAppUpdate   SnapshotType = 1
	SnapshotTypeImmediate   SnapshotType = 2
)

// Severity is eve-api's info.Severity. evesnap reports SeverityError only when the guest
// may still be frozen (exit 6), SeverityWarning for every other failure.
type Severity int32

const (
	SeverityUnspecified Severity = 0
	SeverityNotice      Severity = 1
	SeverityWarning     Severity = 2
	SeverityError       Severity = 3
)

// Entity is eve-api's info.Entity (the values a snapshot uses, and the rest for decoding).
type Entity int32

const (
	EntityUnspecified     Entity = 0
	EntityBaseOS          Entity = 1
	EntitySystemAdapter   Entity = 2
	EntityVault           Entity = 3
	EntityAttestation     Entity = 4
	EntityAppInstance     Entity = 5
	EntityPort            Entity = 6
	EntityNetwork         Entity = 7
	EntityNetworkInstance Entity = 8
	EntityContentTree     Entity = 9
	EntityContentBlob     Entity = 10
	EntityVolume          Entity = 11
)

var snapshotTypeNames = []string{"SNAPSHOT_TYPE_UNSPECIFIED", "SNAPSHOT_TYPE_APP_UPDATE", "SNAPSHOT_TYPE_IMMEDIATE"}

var severityNames = []string{"SEVERITY_UNSPECIFIED", "SEVERITY_NOTICE", "SEVERITY_WARNING", "SEVERITY_ERROR"}

var entityNames = []string{
	"ENTITY_UNSPECIFIED", "ENTITY_BASE_OS", "ENTITY_SYSTEM_ADAPTER", "ENTITY_VAULT",
	"ENTITY_ATTESTATION", "ENTITY_APP_INSTANCE", "ENTITY_PORT", "ENTITY_NETWORK",
	"ENTITY_NETWORK_INSTANCE", "ENTITY_CONTENT_TREE", "ENTITY_CONTENT_BLOB", "ENTITY_VOLUME",
}

func (t SnapshotType) String() string { return enumName(snapshotTypeNames, int32(t)) }
func (s Severity) String() string     { return enumName(severityNames, int32(s)) }
func (e Entity) String() string       { return enumName(entityNames, int32(e)) }

func (t SnapshotType) MarshalJSON() ([]byte, error) { return json.Marshal(t.String()) }
func (s Severity) MarshalJSON() ([]byte, error)     { return json.Marshal(s.String()) }
func (e Entity) MarshalJSON() ([]byte, error)       { return json.Marshal(e.String()) }

// UnmarshalJSON accepts the value's name or number, as protojson does.
func (t *SnapshotType) UnmarshalJSON(data []byte) error {
	n, err := enumValue("SnapshotType", snapshotTypeNames, data)
	*t = SnapshotType(n)
	return err
}

// UnmarshalJSON accepts the value's name or number, as protojson does.
func (s *Severity) UnmarshalJSON(data []byte) error {
	n, err := enumValue("Severity", severityNames, data)
	*s = Severity(n)
	return err
}

// UnmarshalJSON accepts the value's name or number, as protojson does.
func (e *Entity) UnmarshalJSON(data []byte) error {
	n, err := enumValue("Entity", entityNames, data)
	*e = Entity(n)
	return err
}

func enumName(names []string, n int32) string {
	if n >= 0 && int(n) < len(names) {
		return names[n]
	}
	return fmt.Sprint(n)
}

func enumValue(enum string, names []string, data []byte) (int32, error) {
	var number int32
	if err := json.Unmarshal(data, &number); err == nil {
		return number, nil
	}
	var name string
	if err := json.Unmarshal(data, &name); err != nil {
		return 0, fmt.Errorf("eve-api %s: %s is neither a name nor a number", enum, data)
	}
	for i, known := range names {
		if known == name {
			return int32(i), nil
		}
	}
	return 0, fmt.Errorf("eve-api %s: unknown value %q", enum, name)
}
