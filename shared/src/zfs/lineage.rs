//! What a rollback that keeps the newer snapshots reads of a filesystem or volume: its kind,
//! its origin (whose clone it is), whether it is mounted, its reservation and free space.

use super::{names, parse, Error, Zfs};

/// One filesystem's or volume's lineage and space facts, from `zfs get -H -p`.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Lineage {
    pub dataset: String,
    /// `filesystem` or `volume`.
    pub kind: String,
    /// The snapshot this dataset is a clone of, if it is one.
    pub origin: Option<String>,
    /// A mounted filesystem (never a volume).
    pub mounted: bool,
    pub refreservation: u64,
    pub available: u64,
    pub usedbyrefreservation: u64,
}

impl Lineage {
    const PROPS: &'static [&'static str] = &[
        "type",
        "origin",
        "mounted",
        "refreservation",
        "available",
        "usedbyrefreservation",
    ];

    pub fn is_volume(&self) -> bool {
        self.kind == "volume"
    }

    /// The dataset `origin` is a snapshot of.
    pub fn origin_dataset(&self) -> Option<&str> {
        self.origin
            .as_deref()
            .and_then(|o| o.split_once('@'))
            .map(|(d, _)| d)
    }
}

impl Zfs {
    /// The lineage of one filesystem or volume; `None` when it does not exist.
    pub fn lineage(&self, dataset: &str) -> Result<Option<Lineage>, Error> {
        names::check_dataset(dataset)?;
        let (table, _) = self.get(&[dataset.to_string()], Lineage::PROPS)?;
        let Some((name, props)) = table.into_iter().next() else {
            return Ok(None);
        };
        let cmd = "zfs get";
        let get = |p: &str| props.get(p).and_then(|v| v.as_deref());
        let num = |p: &str| parse::number(cmd, p, get(p)).map(Option::unwrap_or_default);
        Ok(Some(Lineage {
            dataset: name,
            kind: get("type").unwrap_or("-").to_string(),
            origin: get("origin")
                .filter(|o| *o != "-" && o.contains('@'))
                .map(str::to_string),
            mounted: get("mounted") == Some("yes"),
            refreservation: num("refreservation")?,
            available: num("available")?,
            usedbyrefreservation: num("usedbyrefreservation")?,
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_origin_dataset_is_the_part_before_the_at() {
        let mut l = Lineage {
            dataset: "p/a".into(),
            kind: "volume".into(),
            origin: Some("p/b@s".into()),
            mounted: false,
            refreservation: 0,
            available: 0,
            usedbyrefreservation: 0,
        };
        assert_eq!(l.origin_dataset(), Some("p/b"));
        assert!(l.is_volume());
        l.origin = None;
        assert_eq!(l.origin_dataset(), None);
    }
}
