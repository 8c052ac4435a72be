//! The listener's record of one served request: one JSON line on stdout, for the host.

use evesnap::report::Report;
use evesnap::request::{Reply, Request};
use serde::Serialize;

use super::handle::Served;
use super::lines::Line;

/// What was asked, answered and done.
#[derive(Debug, Serialize)]
pub struct ServeRecord<'a> {
    /// When it was served (RFC 3339, UTC).
    pub at: String,
    pub request: Received<'a>,
    pub reply: &'a Reply,
    /// The flow's report, when a flow ran (`null` otherwise).
    pub report: Option<&'a Report>,
}

/// The request as it was read.
#[derive(Debug, Serialize)]
#[serde(untagged)]
pub enum Received<'a> {
    Parsed(&'a Request),
    /// A line that is not a request: its first bytes (as UTF-8, lossily) and its length.
    Unparsed {
        unparsed: String,
        bytes: usize,
    },
    /// A line over the limit: nothing of it was kept (`unparsed` is empty).
    Oversized {
        unparsed: &'static str,
        oversized: bool,
    },
}

/// How much of a line that is not a request the record keeps.
const UNPARSED_KEPT: usize = 200;

impl<'a> ServeRecord<'a> {
    /// The record of `served`, read from `line`, now.
    pub fn of(served: &'a Served, line: Line<'_>) -> Self {
        let request = match (&served.request, line) {
            (Some(r), _) => Received::Parsed(r),
            (None, Line::Text(line)) => Received::Unparsed {
                unparsed: String::from_utf8_lossy(&line[..line.len().min(UNPARSED_KEPT)])
                    .into_owned(),
                bytes: line.len(),
            },
            (None, Line::Oversized) => Received::Oversized {
                unparsed: "",
                oversized: true,
            },
        };
        ServeRecord {
            at: evesnap::time::now_rfc3339(),
            request,
            reply: &served.reply,
            report: served.report.as_ref(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use evesnap::exit::Exit;
    use serde_json::json;

    fn served() -> Served {
        Served {
            request: None,
            reply: Reply::failure(
                None,
                None,
                super::super::identify::refuse("bad-request", Exit::Usage, "no".into()),
            ),
            report: None,
            rated: false,
        }
    }

    #[test]
    fn a_line_that_is_not_a_request_is_recorded_as_before() {
        let served = served();
        let long = vec![b'x'; 300];
        let record =
            serde_json::to_value(ServeRecord::of(&served, Line::Text(&long))).expect("json");
        let keys: Vec<&str> = record
            .as_object()
            .expect("object")
            .keys()
            .map(String::as_str)
            .collect();
        assert_eq!(keys, ["at", "request", "reply", "report"]);
        assert_eq!(
            record["request"],
            json!({"unparsed": "x".repeat(200), "bytes": 300})
        );
        assert_eq!(record["report"], json!(null));
        assert_eq!(record["reply"]["error"]["kind"], "bad-request");
        let record = serde_json::to_value(ServeRecord::of(&served, Line::Oversized)).expect("json");
        assert_eq!(
            record["request"],
            json!({"unparsed": "", "oversized": true})
        );
    }
}
