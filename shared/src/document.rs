//! The job document: the one JSON value every tool reads on stdin and writes on stdout.
//!
//! ```json
//! {
//!   "version": 1,
//!   "ok": true,
//!   "steps": [
//!     {"tool": "qga-freeze", "ok": true, "started_at": "2026-11-25T19:30:00.123Z",
//!      "duration_ms": 3.1, "frozen": 2, "mountpoints": ["/data0", "/data1"], "watchdog": {..}}
//!   ],
//!   "error": null,
//!   "agent": "unix:/run/lab/qga.sock",
//!   "datasets": ["evesnap/lab/vm0/disk0"],
//!   "snapshot": "20261125-193000123"
//! }
//! ```
//!
//! - `version`: format version, always [`VERSION`]; other versions are refused.
//! - `ok`: every step so far succeeded.
//! - `steps`: one entry per tool run, in order; `tool`, `ok`, `started_at` (RFC 3339, UTC),
//!   `duration_ms` are always present, the rest is the tool's own (documented by each tool).
//! - `error`: `null`, or the first failure `{tool, kind, message}`; `kind` is the exit-code
//!   name from [`crate::exit`].
//! - Context that later tools reuse: `agent`, `datasets`, `snapshot`, `snapshot_id`. Any
//!   other field is kept untouched when a tool passes the document on.

use std::io::{self, IsTerminal, Read};
use std::os::fd::AsFd;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

use crate::exit::{Exit, HasExit};
use crate::steps::StepRecord;

/// The document format version this library reads and writes.
pub const VERSION: u32 = 1;

/// Upper bound on an upstream document, so a runaway producer cannot exhaust memory.
pub const MAX_DOCUMENT_BYTES: u64 = 16 * 1024 * 1024;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Document {
    pub version: u32,
    pub ok: bool,
    #[serde(default)]
    pub steps: Vec<Step>,
    #[serde(default)]
    pub error: Option<DocError>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub agent: Option<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub datasets: Vec<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub snapshot: Option<String>,
    /// The snapshot's id (eve-api `SnapshotDesc.id`), for zsnap's metadata.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub snapshot_id: Option<String>,
    /// Fields this version does not know, kept as they came.
    #[serde(flatten)]
    pub extra: Map<String, Value>,
}

/// One step: `tool`, `ok`, `started_at`, `duration_ms`, and the step's own fields (its
/// [`StepRecord`], or `{error, problems}` when it failed).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, schemars::JsonSchema)]
pub struct Step {
    pub tool: String,
    pub ok: bool,
    pub started_at: String,
    pub duration_ms: f64,
    /// The tool's own fields: one of the step records (`crate::steps`), published beside
    /// the report's schema in its `$defs`.
    #[serde(flatten)]
    pub fields: Map<String, Value>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DocError {
    pub tool: String,
    pub kind: String,
    pub message: String,
    /// Further fields, e.g. the orchestrator's eve-api `snap_err` fields; kept as they came.
    #[serde(flatten)]
    pub extra: Map<String, Value>,
}

impl Step {
    /// This step's typed record, when it is a `T::TOOL` step whose fields parse as one.
    pub fn record<T: StepRecord>(&self) -> Option<T> {
        if self.tool != T::TOOL {
            return None;
        }
        serde_json::from_value(Value::Object(self.fields.clone())).ok()
    }
}

/// A record's fields as a step's field map.
pub fn fields_of(record: &impl Serialize) -> Map<String, Value> {
    match serde_json::to_value(record) {
        Ok(Value::Object(map)) => map,
        // Records are structs; anything else is a programming error worth seeing.
        Ok(other) => Map::from_iter([("value".to_string(), other)]),
        Err(e) => Map::from_iter([("error".to_string(), Value::String(e.to_string()))]),
    }
}

impl Default for Document {
    fn default() -> Self {
        Document::new()
    }
}

impl Document {
    pub fn new() -> Self {
        Document {
            version: VERSION,
            ok: true,
            steps: Vec::new(),
            error: None,
            agent: None,
            datasets: Vec::new(),
            snapshot: None,
            snapshot_id: None,
            extra: Map::new(),
        }
    }

    /// Parses a document from text, with an error that gives line and column.
    pub fn from_json(text: &str) -> Result<Self, Error> {
        Document::from_value(serde_json::from_str(text).map_err(Error::Parse)?)
    }

    /// A document from a parsed JSON value: the version first, then the shape.
    pub fn from_value(value: Value) -> Result<Self, Error> {
        match value.get("version") {
            Some(Value::Number(n)) if n.as_u64() == Some(u64::from(VERSION)) => {}
            Some(other) => return Err(Error::Version(other.to_string())),
            None => return Err(Error::Version("missing".into())),
        }
        serde_json::from_value(value).map_err(Error::Shape)
    }

    pub fn to_json(&self) -> String {
        // A document is plain data; serialising it cannot fail.
        serde_json::to_string_pretty(self).unwrap_or_else(|e| format!("{{\"error\":\"{e}\"}}"))
    }

    /// Appends a step.
    pub fn push(&mut self, step: Step) {
        if !step.ok {
            self.ok = false;
        }
        self.steps.push(step);
    }

    /// Inserts a step at `index`, for a step measured earlier but finished later (the
    /// snapshot, whose read-back waits until after the thaw), so steps stay in start order.
    pub fn insert(&mut self, index: usize, step: Step) {
        if !step.ok {
            self.ok = false;
        }
        self.steps.insert(index.min(self.steps.len()), step);
    }

    /// Records a failure of `tool`: `ok` becomes false and, if no earlier failure was
    /// recorded, `error` is set. The first failure is the one worth reporting.
    pub fn record_failure(&mut self, tool: &str, exit: Exit, message: &str) {
        self.ok = false;
        if self.error.is_none() {
            self.error = Some(DocError {
                tool: tool.to_string(),
                kind: exit.kind().to_string(),
                message: message.to_string(),
                extra: Map::new(),
            });
        }
    }

    /// Why the pipeline so far failed, if it did: the first failed step, else the recorded
    /// error, else `ok: false`. Tools downstream of a failure do nothing but pass it on (a
    /// thaw excepted).
    pub fn upstream_failure(&self) -> Option<String> {
        if let Some(step) = self.failed_step() {
            return Some(format!("the upstream step {} failed", step.tool));
        }
        if let Some(error) = &self.error {
            return Some(format!(
                "the upstream step {} failed ({})",
                error.tool, error.kind
            ));
        }
        (!self.ok).then(|| "the upstream document says a step failed".to_string())
    }

    /// The first step that failed, if any.
    pub fn failed_step(&self) -> Option<&Step> {
        self.steps.iter().find(|s| !s.ok)
    }

    /// The last successful `T` step, and its index.
    pub fn last_ok<T: StepRecord>(&self) -> Option<(usize, T)> {
        self.steps
            .iter()
            .enumerate()
            .rev()
            .find(|(_, s)| s.tool == T::TOOL && s.ok)
            .and_then(|(i, s)| s.record().map(|r| (i, r)))
    }

    /// A document from a typed value of the same shape (a report), at the process edge.
    pub fn from_typed(value: &impl Serialize) -> Result<Self, Error> {
        let value = serde_json::to_value(value).map_err(Error::Shape)?;
        serde_json::from_value(value).map_err(Error::Shape)
    }
}

/// Measures one step; [`StepTimer::finish`] turns it into a [`Step`].
#[derive(Debug)]
pub struct StepTimer {
    tool: String,
    started_at: String,
    start: Instant,
}

impl StepTimer {
    pub fn start(tool: &str) -> Self {
        StepTimer {
            tool: tool.to_string(),
            started_at: crate::time::now_rfc3339(),
            start: Instant::now(),
        }
    }

    pub fn elapsed(&self) -> Duration {
        self.start.elapsed()
    }

    /// The step with a typed record as its fields.
    pub fn finish_with(self, ok: bool, record: &impl Serialize) -> Step {
        self.finish(ok, fields_of(record))
    }

    pub fn finish(self, ok: bool, fields: Map<String, Value>) -> Step {
        Step {
            tool: self.tool,
            ok,
            started_at: self.started_at,
            duration_ms: crate::time::millis(self.start.elapsed()),
            fields,
        }
    }
}

/// What a tool found on its standard input.
#[derive(Debug, Clone, PartialEq)]
pub enum Upstream {
    /// A terminal, `/dev/null`, an empty file or a closed stdin: the tool starts the pipeline.
    None,
    /// A document written by the previous tool.
    Document(Box<Document>),
}

impl Upstream {
    pub fn into_document(self) -> Option<Document> {
        match self {
            Upstream::None => None,
            Upstream::Document(d) => Some(*d),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("cannot read the upstream document from stdin")]
    Read(#[source] io::Error),
    #[error("the upstream step produced no document (the pipe closed empty): it died or failed before writing")]
    UpstreamDied,
    #[error("the upstream document is larger than {MAX_DOCUMENT_BYTES} bytes")]
    TooLarge,
    #[error("the upstream document is not valid JSON")]
    Parse(#[source] serde_json::Error),
    #[error(
        "the upstream document has unsupported version {0} (this tool reads version {VERSION})"
    )]
    Version(String),
    #[error("the upstream document has a wrong field")]
    Shape(#[source] serde_json::Error),
}

impl HasExit for Error {
    fn exit(&self) -> Exit {
        match self {
            Error::UpstreamDied => Exit::UpstreamFailed,
            _ => Exit::Usage,
        }
    }
}

/// Reads the upstream document from this process's stdin.
///
/// A terminal, a closed stdin, a character device such as `/dev/null` or an empty
/// regular file means "no upstream"; a pipe or socket that closes without a byte means
/// the upstream step died.
pub fn read_stdin() -> Result<Upstream, Error> {
    let stdin = io::stdin();
    if stdin.is_terminal() {
        return Ok(Upstream::None);
    }
    let kind = match nix::sys::stat::fstat(stdin.as_fd()) {
        Ok(stat) => InputKind::from_mode(stat.st_mode),
        // stdin closed (EBADF): nobody upstream.
        Err(nix::errno::Errno::EBADF) => return Ok(Upstream::None),
        Err(e) => return Err(Error::Read(e.into())),
    };
    read_from(stdin.lock(), kind)
}

/// What kind of file the input is; decides what an empty input means.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum InputKind {
    /// A pipe or socket: an upstream process writes it.
    Stream,
    /// A regular file, `/dev/null` or another device.
    File,
}

impl InputKind {
    fn from_mode(mode: nix::libc::mode_t) -> Self {
        let fmt = mode & nix::libc::S_IFMT;
        if fmt == nix::libc::S_IFIFO || fmt == nix::libc::S_IFSOCK {
            InputKind::Stream
        } else {
            InputKind::File
        }
    }
}

/// Reads an upstream document from `input`; see [`read_stdin`] for what empty means.
///
/// A stream carries one document: it is read up to the end of that JSON value, not to the
/// end of the stream, so a writer may keep its end open (the auto-thaw watchdog holds a
/// copy of it to see whether the document was read) without holding the reader up.
pub fn read_from(input: impl Read, kind: InputKind) -> Result<Upstream, Error> {
    let limited = input.take(MAX_DOCUMENT_BYTES + 1);
    let value = match kind {
        InputKind::Stream => {
            let mut values = serde_json::Deserializer::from_reader(limited).into_iter::<Value>();
            match values.next() {
                None => return Err(Error::UpstreamDied),
                Some(Err(e)) if values.byte_offset() as u64 > MAX_DOCUMENT_BYTES => {
                    drop(e);
                    return Err(Error::TooLarge);
                }
                Some(Err(e)) if e.is_io() => return Err(Error::Read(e.into())),
                Some(Err(e)) => return Err(Error::Parse(e)),
                Some(Ok(value)) => value,
            }
        }
        InputKind::File => {
            let mut text = String::new();
            let mut limited = limited;
            limited.read_to_string(&mut text).map_err(Error::Read)?;
            if text.len() as u64 > MAX_DOCUMENT_BYTES {
                return Err(Error::TooLarge);
            }
            if text.trim().is_empty() {
                return Ok(Upstream::None);
            }
            serde_json::from_str(&text).map_err(Error::Parse)?
        }
    };
    Document::from_value(value).map(|d| Upstream::Document(Box::new(d)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unknown_fields_survive_a_round_trip() {
        let text = r#"{"version":1,"ok":true,"steps":[{"tool":"x","ok":true,
            "started_at":"2026-01-01T00:00:00Z","duration_ms":1.5,"custom":[1,2]}],
            "error":null,"agent":"unix:/a","future":{"k":"v"}}"#;
        let doc = Document::from_json(text).expect("parses");
        assert_eq!(doc.extra["future"]["k"], "v");
        assert_eq!(doc.steps[0].fields["custom"][1], 2);
        let again = Document::from_json(&doc.to_json()).expect("parses again");
        assert_eq!(doc, again);
    }

    #[test]
    fn empty_pipe_is_a_dead_upstream_but_empty_file_is_none() {
        assert!(matches!(
            read_from(&b""[..], InputKind::Stream),
            Err(Error::UpstreamDied)
        ));
        assert_eq!(
            read_from(&b" \n"[..], InputKind::File).expect("none"),
            Upstream::None
        );
    }

    #[test]
    fn a_stream_is_read_to_the_end_of_its_document_not_of_the_stream() {
        // The writer keeps its end open (as the watchdog's copy does): reading must not wait.
        let (read, write) = nix::unistd::pipe().expect("pipe");
        let mut writer = std::fs::File::from(write);
        std::io::Write::write_all(&mut writer, b"{\"version\":1,\"ok\":true}\n").expect("write");
        let reader =
            std::thread::spawn(move || read_from(std::fs::File::from(read), InputKind::Stream));
        let started = Instant::now();
        while !reader.is_finished() {
            assert!(
                started.elapsed() < Duration::from_secs(5),
                "the reader waits for the end of the stream"
            );
            std::thread::sleep(Duration::from_millis(10));
        }
        let upstream = reader.join().expect("reader").expect("document");
        assert!(matches!(upstream, Upstream::Document(d) if d.ok));
        drop(writer);
    }

    #[test]
    fn garbage_names_line_and_column() {
        let err = read_from(&b"{\"version\":1,\n \"ok\": tru}"[..], InputKind::Stream).unwrap_err();
        assert!(matches!(err, Error::Parse(_)));
        let cause = std::error::Error::source(&err).expect("cause").to_string();
        assert!(cause.contains("line 2"), "{cause}");
        assert_eq!(err.exit(), Exit::Usage);
    }

    #[test]
    fn wrong_version_and_wrong_types_are_refused() {
        assert!(matches!(
            Document::from_json(r#"{"version":2,"ok":true}"#),
            Err(Error::Version(_))
        ));
        assert!(matches!(
            Document::from_json(r#"{"ok":true}"#),
            Err(Error::Version(_))
        ));
        assert!(matches!(
            Document::from_json(r#"{"version":1,"ok":"yes"}"#),
            Err(Error::Shape(_))
        ));
        assert!(matches!(Document::from_json("[1]"), Err(Error::Version(_))));
    }

    #[test]
    fn first_failure_is_kept() {
        let mut doc = Document::new();
        doc.record_failure("a", Exit::AgentTimeout, "late");
        doc.record_failure("b", Exit::StepFailed, "other");
        let error = doc.error.expect("error");
        assert_eq!(
            (error.tool.as_str(), error.kind.as_str()),
            ("a", "agent-timeout")
        );
        assert!(!doc.ok);
    }
}
