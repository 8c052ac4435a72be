package evesnap

import (
	"encoding/json"
	"errors"
	"os"
	"path/filepath"
	"reflect"
	"regexp"
	"sort"
	"strconv"
	"strings"
	"testing"
)

// schema is the part of a checked-in JSON Schema these tests compare with the Go types.
type schema struct {
	Properties map[string]json.RawMessage `json:"properties"`
	Defs       map[string]struct {
		Properties map[string]json.RawMessage `json:"properties"`
		Enum       []string                   `json:"enum"`
	} `json:"$defs"`
}

func readSchema(t *testing.T, name string) schema {
	t.Helper()
	text, err := os.ReadFile(filepath.Join(repoRoot(t), "bins", "snap-orchestrate", name))
	if err != nil {
		t.Fatal(err)
	}
	var s schema
	if err := json.Unmarshal(text, &s); err != nil {
		t.Fatalf("%s: %v", name, err)
	}
	return s
}

// jsonNames is the JSON field names of a Go struct.
func jsonNames(v interface{}) []string {
	var names []string
	typ := reflect.TypeOf(v)
	for i := 0; i < typ.NumField(); i++ {
		if tag := typ.Field(i).Tag.Get("json"); tag != "" && tag != "-" {
			names = append(names, strings.Split(tag, ",")[0])
		}
	}
	sort.Strings(names)
	return names
}

func keys(m map[string]json.RawMessage) []string {
	var names []string
	for name := range m {
		names = append(names, name)
	}
	sort.Strings(names)
	return names
}

// The Go types have exactly the fields of the schemas generated from the Rust types, so a
// field added on one side and not the other fails here.
func TestTheGoTypesMatchTheCheckedInSchemas(t *testing.T) {
	types := map[string]map[string]interface{}{
		"plan.schema.json": {"": Plan{}, "FreezePlan": FreezePlan{}, "GuestCommand": GuestCommand{},
			"RollbackPlan": RollbackPlan{}, "GuestDisk": GuestDisk{}},
		"report.schema.json": {"": Report{}, "ReportError": ReportError{}, "SnapshotEntry": SnapshotEntry{},
			"RolledBack": RolledBack{}, "ExpeditedRcu": ExpeditedRCU{}, "ZInfoSnapshot": ZInfoSnapshot{},
			"ErrorInfo": ErrorInfo{}, "DeviceEntity": DeviceEntity{}},
		"request.schema.json": {"": Request{}, "DiskRef": DiskRef{}},
		"reply.schema.json": {"": Reply{}, "SnapshotEntry": WireSnapshot{}, "ReplyError": ReplyError{},
			"GuestQuota": GuestQuota{}},
	}
	for file, byDef := range types {
		s := readSchema(t, file)
		for def, value := range byDef {
			props := s.Properties
			if def != "" {
				props = s.Defs[def].Properties
			}
			if got, want := jsonNames(value), keys(props); !reflect.DeepEqual(got, want) {
				t.Errorf("%s %q: Go %T has %v, the schema %v", file, def, value, got, want)
			}
		}
	}
}

// Every eve-api enum value the report can carry is one the Go enums know by name.
func TestTheReportsEveAPIEnumsAreKnown(t *testing.T) {
	s := readSchema(t, "report.schema.json")
	for def, names := range map[string][]string{
		"EveSnapshotType": snapshotTypeNames, "Severity": severityNames, "Entity": entityNames,
	} {
		for _, value := range s.Defs[def].Enum {
			if !contains(names, value) {
				t.Errorf("%s value %s is unknown to the Go package", def, value)
			}
		}
		if len(s.Defs[def].Enum) == 0 {
			t.Errorf("the report schema has no enum %s", def)
		}
	}
}

func contains(list []string, value string) bool {
	for _, v := range list {
		if v == value {
			return true
		}
	}
	return false
}

// The sentinels are shared/src/exit.rs's table: each code with its kind.
func TestTheSentinelsAreTheExitCodeTable(t *testing.T) {
	text, err := os.ReadFile(filepath.Join(repoRoot(t), "shared", "src", "exit.rs"))
	if err != nil {
		t.Fatal(err)
	}
	codes := map[string]int{}
	for _, m := range regexp.MustCompile(`(?m)^\s+(\w+) = (\d+),$`).FindAllStringSubmatch(string(text), -1) {
		codes[m[1]], _ = strconv.Atoi(m[2])
	}
	kinds := map[int]string{}
	for _, m := range regexp.MustCompile(`Exit::(\w+) => "([a-z-]+)",`).FindAllStringSubmatch(string(text), -1) {
		if code, ok := codes[m[1]]; ok && code != 0 {
			if _, seen := kinds[code]; !seen {
				kinds[code] = m[2]
			}
		}
	}
	if len(kinds) != len(exitTable) {
		t.Fatalf("exit.rs has %d non-zero codes %v, the Go table %d", len(kinds), kinds, len(exitTable))
	}
	for _, sentinel := range exitTable {
		if kinds[sentinel.Code] != sentinel.Kind {
			t.Errorf("code %d: exit.rs says %q, Go %q", sentinel.Code, kinds[sentinel.Code], sentinel.Kind)
		}
	}
}

func TestAnExitErrorIsItsSentinelOnly(t *testing.T) {
	err := error(&ExitError{Code: 6, Kind: "thaw-failed", Message: "thaw refused", Step: "thaw"})
	if !errors.Is(err, ErrThawFailed) || errors.Is(err, ErrStepFailed) {
		t.Fatalf("errors.Is: %v", err)
	}
	var exit *ExitError
	if !errors.As(err, &exit) || exit.Step != "thaw" {
		t.Fatalf("errors.As: %v", err)
	}
}

// protojson writes enums by name and accepts numbers; both decode.
func TestEveAPIEnumsDecodeByNameAndNumber(t *testing.T) {
	var e ErrorInfo
	in := `{"description":"d","timestamp":"2026-11-29T08:00:00.5Z","severity":"SEVERITY_ERROR",
		"entities":[{"entity":"ENTITY_VOLUME","entity_name":"p/a"},{"entity":5}],"retry_condition":"r"}`
	if err := json.Unmarshal([]byte(in), &e); err != nil {
		t.Fatal(err)
	}
	if e.Severity != SeverityError || e.Entities[0].Entity != EntityVolume || e.Entities[1].Entity != EntityAppInstance {
		t.Fatalf("decoded %+v", e)
	}
	if e.Timestamp.Nanosecond() != 500000000 {
		t.Fatalf("timestamp %v", e.Timestamp)
	}
	if err := json.Unmarshal([]byte(`"SEVERITY_FATAL"`), &e.Severity); err == nil {
		t.Fatal("an unknown severity decoded")
	}
}
