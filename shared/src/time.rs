//! Wall-clock formats used in documents and snapshot names.

use std::time::Duration;

use time::format_description::well_known::Rfc3339;
use time::macros::format_description;
use time::OffsetDateTime;

/// Now, as RFC 3339 in UTC with milliseconds, e.g. `2026-11-25T19:30:00.123Z`.
pub fn now_rfc3339() -> String {
    rfc3339(OffsetDateTime::now_utc())
}

pub fn rfc3339(at: OffsetDateTime) -> String {
    let at = at
        .replace_nanosecond(at.millisecond() as u32 * 1_000_000)
        .unwrap_or(at);
    at.format(&Rfc3339)
        .unwrap_or_else(|_| at.unix_timestamp().to_string())
}

/// EVE's snapshot-name timestamp, `YYYYMMDD-HHMMSSmmm` in UTC.
pub fn eve_timestamp(at: OffsetDateTime) -> String {
    let format =
        format_description!("[year][month][day]-[hour][minute][second][subsecond digits:3]");
    at.format(&format)
        .unwrap_or_else(|_| at.unix_timestamp().to_string())
}

/// Now, in microseconds since the epoch: the clock every tool stamps the freeze window
/// with, so a pipeline's window can be computed across processes.
pub fn now_unix_us() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_micros() as u64)
}

/// A duration in milliseconds with microsecond resolution, for reports.
pub fn millis(d: Duration) -> f64 {
    d.as_micros() as f64 / 1000.0
}

#[cfg(test)]
mod tests {
    use super::*;
    use time::macros::datetime;

    #[test]
    fn formats() {
        let at = datetime!(2026-11-25 19:30:00.123456 UTC);
        assert_eq!(rfc3339(at), "2026-11-25T19:30:00.123Z");
        assert_eq!(eve_timestamp(at), "20261125-193000123");
        assert_eq!(millis(Duration::from_micros(2_345)), 2.345);
    }
}
