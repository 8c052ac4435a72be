//! A request's deadline: the guest sends when it stops waiting, on its own clock; the host
//! reads that clock through the guest agent when it takes the request up.

use std::time::{Duration, Instant};

use evesnap::exit::Exit;
use evesnap::request::{ReplyError, Request};

use super::identify::refuse;

/// The guest's clock, read through the agent when a request was taken up.
#[derive(Debug, Clone, Copy)]
pub(super) struct GuestClock {
    /// Just before the agent was asked (the guest read its clock after this).
    pub(super) asked_at: Instant,
    /// The guest's `CLOCK_REALTIME`, ms since the epoch.
    pub(super) now_ms: u64,
}

/// Taken off a request's remaining time for the two clocks' drift over a request's length.
const DEADLINE_MARGIN: Duration = Duration::from_millis(100);

/// The request's deadline on this host's monotonic clock, or an `expired` refusal when it
/// has passed on the guest's clock. Conservative: the guest read its clock after
/// `asked_at`, so `asked_at + (deadline - guest now)` is no later than the guest's own
/// deadline, and [`DEADLINE_MARGIN`] comes off that. No deadline, or no clock (a `list`
/// without the agent): no bound.
pub(super) fn deadline_of(
    request: &Request,
    clock: Option<&GuestClock>,
) -> Result<Option<Instant>, ReplyError> {
    let (Some(deadline_ms), Some(clock)) = (request.deadline_ms, clock) else {
        return Ok(None);
    };
    let left = Duration::from_millis(deadline_ms.saturating_sub(clock.now_ms));
    if left <= DEADLINE_MARGIN {
        return Err(refuse(
            "expired",
            Exit::AgentTimeout,
            format!(
                "the request's deadline had passed on the guest's clock when it was taken up \
                 ({} ms late): the requester gave up, nothing was done",
                clock.now_ms.saturating_sub(deadline_ms)
            ),
        ));
    }
    // A deadline beyond what the clock can hold is no bound.
    Ok(clock.asked_at.checked_add(left - DEADLINE_MARGIN))
}

#[cfg(test)]
mod tests {
    use super::*;
    use evesnap::request::{DiskRef, Op, VERSION};

    fn request(deadline_ms: Option<u64>) -> Request {
        Request {
            version: VERSION,
            id: "a".into(),
            op: Op::Create,
            disk: DiskRef {
                path: "/data0".into(),
                ..DiskRef::default()
            },
            name: None,
            to: None,
            quiesced: true,
            deadline_ms,
            accept_crash: false,
        }
    }

    #[test]
    fn the_bound_is_the_guest_time_left_less_the_margin_from_when_the_agent_was_asked() {
        let asked_at = Instant::now();
        let clock = GuestClock {
            asked_at,
            now_ms: 1_000_000,
        };
        let bound = deadline_of(&request(Some(1_005_000)), Some(&clock)).expect("in time");
        assert_eq!(bound, Some(asked_at + Duration::from_millis(4_900)));
        // No deadline, or no clock to read it on: no bound.
        assert_eq!(deadline_of(&request(None), Some(&clock)).expect("ok"), None);
        assert_eq!(deadline_of(&request(Some(1)), None).expect("ok"), None);
        // The furthest deadline a guest can send: a far bound or none, never a panic.
        assert!(deadline_of(&request(Some(u64::MAX)), Some(&clock)).is_ok());
    }

    #[test]
    fn a_request_past_or_within_the_margin_of_its_deadline_is_expired() {
        let clock = GuestClock {
            asked_at: Instant::now(),
            now_ms: 1_000_000,
        };
        for deadline in [1, 999_000, 1_000_000, 1_000_100] {
            let error = deadline_of(&request(Some(deadline)), Some(&clock)).expect_err("expired");
            assert_eq!(
                (error.kind.as_str(), error.code),
                ("expired", 4),
                "{error:?}"
            );
        }
        assert!(deadline_of(&request(Some(1_000_101)), Some(&clock)).is_ok());
    }
}
