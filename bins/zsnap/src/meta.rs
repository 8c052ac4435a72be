//! evesnap's metadata on each snapshot, as ZFS user properties `org.lfedge.evesnap:*`.
//!
//! | property                      | value                                                   |
//! |-------------------------------|---------------------------------------------------------|
//! | `org.lfedge.evesnap:id`       | the snapshot id (eve-api `SnapshotDesc.id`, a UUID)      |
//! | `org.lfedge.evesnap:type`     | `IMMEDIATE` or `APP_UPDATE` (eve-api `SnapshotType`)     |
//! | `org.lfedge.evesnap:frozen`   | `true` when the guest's filesystems were frozen          |
//! | `org.lfedge.evesnap:version`  | the version of the tool that took it                     |

use evesnap::document::Document;

pub const PREFIX: &str = "org.lfedge.evesnap:";
pub const ID: &str = "org.lfedge.evesnap:id";
pub const TYPE: &str = "org.lfedge.evesnap:type";
pub const FROZEN: &str = "org.lfedge.evesnap:frozen";
pub const VERSION: &str = "org.lfedge.evesnap:version";
/// Every metadata property, for `zfs get`.
pub const KEYS: [&str; 4] = [ID, TYPE, FROZEN, VERSION];

/// The metadata of one snapshot set.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Metadata {
    pub id: String,
    pub kind: String,
    pub frozen: bool,
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
        ]
    }
}

/// Whether the upstream document shows the guest frozen now: a `qga-freeze` step with
/// `ok: true` and `frozen > 0`, and no `qga-thaw` step after it.
pub fn guest_frozen(doc: &Document) -> bool {
    let Some(freeze) = doc.steps.iter().rposition(|s| s.tool == "qga-freeze") else {
        return false;
    };
    let step = &doc.steps[freeze];
    let frozen = step
        .fields
        .get("frozen")
        .and_then(serde_json::Value::as_u64)
        .unwrap_or(0);
    step.ok && frozen > 0 && !doc.steps[freeze + 1..].iter().any(|s| s.tool == "qga-thaw")
}

/// The deadline (ms since the epoch) of the auto-thaw watchdog the upstream freeze armed,
/// if the document shows one: after it, the guest may be thawed whatever the document says.
pub fn watchdog_deadline_ms(doc: &Document) -> Option<u64> {
    let freeze = doc
        .steps
        .iter()
        .rev()
        .find(|s| s.tool == "qga-freeze" && s.ok)?;
    freeze
        .fields
        .get("watchdog")?
        .get("deadline_unix_ms")?
        .as_u64()
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

    const FREEZE: &str =
        r#"{"tool":"qga-freeze","ok":true,"started_at":"t","duration_ms":1,"frozen":2}"#;
    const THAW: &str =
        r#"{"tool":"qga-thaw","ok":true,"started_at":"t","duration_ms":1,"thawed":2}"#;

    #[test]
    fn frozen_from_the_document() {
        assert!(guest_frozen(&doc(FREEZE)));
        assert!(!guest_frozen(&doc("")));
        assert!(!guest_frozen(&doc(&format!("{FREEZE},{THAW}"))));
        assert!(guest_frozen(&doc(&format!("{FREEZE},{THAW},{FREEZE}"))));
        let none = r#"{"tool":"qga-freeze","ok":true,"started_at":"t","duration_ms":1,"frozen":0}"#;
        assert!(!guest_frozen(&doc(none)));
        let failed =
            r#"{"tool":"qga-freeze","ok":false,"started_at":"t","duration_ms":1,"frozen":2}"#;
        assert!(!guest_frozen(&doc(failed)));
    }

    #[test]
    fn the_watchdog_deadline_comes_from_the_freeze_step() {
        let with = r#"{"tool":"qga-freeze","ok":true,"started_at":"t","duration_ms":1,"frozen":2,
            "watchdog":{"deadline_unix_ms":1795635060123}}"#;
        assert_eq!(watchdog_deadline_ms(&doc(with)), Some(1_795_635_060_123));
        assert_eq!(watchdog_deadline_ms(&doc(FREEZE)), None);
        assert!(now_ms() > 1_700_000_000_000);
    }

    #[test]
    fn properties_are_valid_user_properties() {
        let m = Metadata {
            id: "6f1c".into(),
            kind: "IMMEDIATE".into(),
            frozen: true,
        };
        for (k, v) in m.properties() {
            evesnap::zfs::names::check_user_property(&k, &v).expect("valid");
            assert!(k.starts_with(PREFIX));
        }
    }
}
