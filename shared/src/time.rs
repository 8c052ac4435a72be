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

/// Now as [`eve_timestamp`].
pub fn now_eve_timestamp() -> String {
    eve_timestamp(OffsetDateTime::now_utc())
}

/// Now, in microseconds since the epoch: the clock every tool stamps the freeze window
/// with, so a pipeline's window can be computed across processes.
pub fn now_unix_us() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_micros() as u64)
}

/// The longest duration a tool accepts (a year): every duration becomes a deadline
/// (`Instant + Duration`), which a larger value would overflow.
pub const MAX_SECONDS: f64 = 365.0 * 24.0 * 3600.0;

/// A number of seconds from 0 to [`MAX_SECONDS`] as a duration.
pub fn seconds(value: f64) -> Result<Duration, String> {
    if !value.is_finite() || !(0.0..=MAX_SECONDS).contains(&value) {
        return Err(format!(
            "{value} is not a number of seconds from 0 to {MAX_SECONDS}"
        ));
    }
    Ok(Duration::from_secs_f64(value))
}

/// [`seconds`] above 0: a timeout.
pub fn timeout(value: f64) -> Result<Duration, String> {
    match seconds(value)? {
        d if d.is_zero() => Err("a timeout must be above 0 seconds".into()),
        d => Ok(d),
    }
}

/// A command-line number of seconds (`--thaw-after 0` included), for clap.
pub fn parse_seconds(text: &str) -> Result<Duration, String> {
    number_of_seconds(text).and_then(seconds)
}

/// A command-line timeout (above 0 seconds), for clap.
pub fn parse_timeout(text: &str) -> Result<Duration, String> {
    number_of_seconds(text).and_then(timeout)
}

fn number_of_seconds(text: &str) -> Result<f64, String> {
    text.trim()
        .parse()
        .map_err(|_| format!("{text:?} is not a number of seconds"))
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

    #[test]
    fn seconds_parse() {
        assert_eq!(parse_seconds("1.5"), Ok(Duration::from_millis(1500)));
        assert_eq!(parse_seconds(" 0 "), Ok(Duration::ZERO));
        assert!(parse_timeout("0").is_err());
        for bad in ["-1", "x", "nan", "inf", "1e30"] {
            assert!(parse_seconds(bad).is_err(), "{bad}");
        }
    }
}
