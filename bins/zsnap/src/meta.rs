//! evesnap's metadata on each snapshot, as ZFS user properties `org.lfedge.evesnap:*`.
//!
//! | property                      | value                                                   |
//! |-------------------------------|---------------------------------------------------------|
//! | `org.lfedge.evesnap:id`       | the snapshot id (eve-api `SnapshotDesc.id`, a UUID)      |
//! | `org.lfedge.evesnap:type`     | `IMMEDIATE` or `APP_UPDATE` (eve-api `SnapshotType`)     |
//! | `org.lfedge.evesnap:frozen`   | `true` when the guest's filesystems were frozen (written |
//! |                               | after `zfs snapshot` returned inside the freeze)         |
//! | `org.lfedge.evesnap:version`  | the version of the tool that took it                     |
//! | `org.lfedge.evesnap:origin`   | `controller` or `guest`: who asked (controller retention  |
//! |                               | never touches the guest's; absent = `controller`)         |
//! | `org.lfedge.evesnap:crash_reason` | why a snapshot meant to be frozen was taken unfrozen |
//! |                               | (`snap-orchestrate`'s `freeze.on_failure: crash`)         |

use evesnap::document::Document;
use evesnap::qga::watchdog::Relay;
pub use evesnap::report::Origin;
use evesnap::steps::{FreezeReport, StepRecord, ThawReport};

pub const PREFIX: &str = "org.lfedge.evesnap:";
pub const ID: &str = "org.lfedge.evesnap:id";
pub const TYPE: &str = "org.lfedge.evesnap:type";
pub const FROZEN: &str = "org.lfedge.evesnap:frozen";
pub const VERSION: &str = "org.lfedge.evesnap:version";
pub const ORIGIN: &str = Origin::PROPERTY;
pub const CRASH_REASON: &str = "org.lfedge.evesnap:crash_reason";
/// Longest `crash_reason` written (the report keeps the whole message).
pub const MAX_CRASH_REASON: usize = 1000;
/// Every metadata property, for `zfs get`.
pub const KEYS: [&str; 5] = [ID, TYPE, FROZEN, VERSION, ORIGIN];

/// The metadata of one snapshot set.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Metadata {
    pub id: String,
    pub kind: String,
    pub frozen: bool,
    pub origin: Origin,
}

impl Metadata {
    /// As user properties, in a fixed order.
    pub fn properties(&self) -> Vec<(String, String)> {
        vec![
            (ID.to_string(), self.id.clone()),
            (TYPE.to_string(), self.kind.clone()),
            (FROZEN.to_string(), self.frozen.to_string()),
            (
                VERSION.to_string(),
                format!("zsnap {}", env!("CARGO_PKG_VERSION")),
            ),
            (ORIGIN.to_string(), self.origin.as_str().to_string()),
        ]
    }
}

/// A failure's message as a `crash_reason` value: one line (a property value takes no
/// tabs, newlines or NUL), at most [`MAX_CRASH_REASON`] bytes.
pub fn crash_reason(message: &str) -> String {
    let mut value: String = message
        .chars()
        .map(|c| if c.is_control() { ' ' } else { c })
        .collect();
    if value.len() > MAX_CRASH_REASON {
        let mut end = MAX_CRASH_REASON - 3;
        while !value.is_char_boundary(end) {
            end -= 1;
        }
        value.truncate(end);
        value.push_str("...");
    }
    value
}

/// Whether the upstream document shows the guest frozen now: a successful `qga-freeze`
/// step that froze something, and no `qga-thaw` step after it.
pub fn guest_frozen(doc: &Document) -> bool {
    let Some(at) = doc.steps.iter().rposition(|s| s.tool == FreezeReport::TOOL) else {
        return false;
    };
    let step = &doc.steps[at];
    let froze = step
        .record::<FreezeReport>()
        .is_some_and(|f| f.frozen.unwrap_or(0) > 0);
    step.ok
        && froze
        && !doc.steps[at + 1..]
            .iter()
            .any(|s| s.tool == ThawReport::TOOL)
}

/// The deadline (ms since the epoch) of the auto-thaw watchdog the upstream freeze armed,
/// if the document shows one: after it, the guest may be thawed whatever the document says.
pub fn watchdog_deadline_ms(doc: &Document) -> Option<u64> {
    let (_, freeze) = doc.last_ok::<FreezeReport>()?;
    Some(freeze.watchdog?.deadline_unix_ms)
}

/// Registers this process as the relay of the upstream freeze (see
/// [`evesnap::qga::watchdog::Relay`]) when the document shows a live freeze with a watchdog.
pub fn relay(doc: &Document) -> Option<Relay> {
    if !guest_frozen(doc) {
        return None;
    }
    let watchdog = doc.last_ok::<FreezeReport>()?.1.watchdog?;
    Relay::start(&watchdog)
        .map_err(|e| {
            evesnap::warn!(
                "not registered with the freeze's watchdog (should this step die, it thaws at its deadline): {}",
                evesnap::exit::chain_of(&e)
            )
        })
        .ok()
}

/// Now, in ms since the epoch (the watchdog's clock).
pub fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn doc(steps: &str) -> Document {
        Document::from_json(&format!(r#"{{"version":1,"ok":true,"steps":[{steps}]}}"#))
            .expect("doc")
    }

    /// A `qga-freeze` step as qga-freeze writes it.
    fn freeze(ok: bool, frozen: i64, deadline_unix_ms: Option<u64>) -> String {
        let watchdog = deadline_unix_ms.map(|ms| evesnap::qga::watchdog::Watchdog {
            pid: Some(1),
            token: "t".into(),
            agent: "unix:/a".into(),
            deadline: "2026-11-29T00:00:00Z".into(),
            deadline_unix_ms: ms,
            state_file: "/s".into(),
            log_file: "/l".into(),
        });
        let record = FreezeReport {
            frozen: Some(frozen),
            mountpoints: None,
            adopted: false,
            agent_version: "7.2".into(),
            freeze_ms: 1.0,
            frozen_at_unix_us: 1,
            watchdog,
        };
        let step = evesnap::document::StepTimer::start(FreezeReport::TOOL).finish_with(ok, &record);
        serde_json::to_string(&step).expect("step")
    }

    const THAW: &str =
        r#"{"tool":"qga-thaw","ok":true,"started_at":"t","duration_ms":1,"thawed":2}"#;

    #[test]
    fn frozen_from_the_document() {
        let frozen = freeze(true, 2, None);
        assert!(guest_frozen(&doc(&frozen)));
        assert!(!guest_frozen(&doc("")));
        assert!(!guest_frozen(&doc(&format!("{frozen},{THAW}"))));
        assert!(guest_frozen(&doc(&format!("{frozen},{THAW},{frozen}"))));
        assert!(!guest_frozen(&doc(&freeze(true, 0, None))));
        assert!(!guest_frozen(&doc(&freeze(false, 2, None))));
        // A step that is not what qga-freeze writes proves nothing.
        let partial =
            r#"{"tool":"qga-freeze","ok":true,"started_at":"t","duration_ms":1,"frozen":2}"#;
        assert!(!guest_frozen(&doc(partial)));
    }

    #[test]
    fn the_watchdog_deadline_comes_from_the_freeze_step() {
        let with = freeze(true, 2, Some(1_795_635_060_123));
        assert_eq!(watchdog_deadline_ms(&doc(&with)), Some(1_795_635_060_123));
        assert_eq!(watchdog_deadline_ms(&doc(&freeze(true, 2, None))), None);
        assert!(now_ms() > 1_700_000_000_000);
    }

    #[test]
    fn a_crash_reason_is_one_valid_line_of_bounded_length() {
        let reason = crash_reason("the freeze failed;\tthe guest was thawed\nagain");
        assert_eq!(reason, "the freeze failed; the guest was thawed again");
        let long = crash_reason(&"é".repeat(2000));
        assert!(
            long.len() <= MAX_CRASH_REASON && long.ends_with("..."),
            "{}",
            long.len()
        );
        for value in [reason, long] {
            evesnap::zfs::names::check_user_property(CRASH_REASON, &value).expect("valid");
        }
    }

    #[test]
    fn properties_are_valid_user_properties() {
        let m = Metadata {
            id: "6f1c".into(),
            kind: "IMMEDIATE".into(),
            frozen: true,
            origin: Origin::Guest,
        };
        for (k, v) in m.properties() {
            evesnap::zfs::names::check_user_property(&k, &v).expect("valid");
            assert!(k.starts_with(PREFIX));
        }
    }
}
