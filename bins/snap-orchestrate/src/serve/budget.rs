//! The guest's budget: what a guest `create` may cost the host before it runs.
//!
//! A guest that loops "overwrite my disk, `--create`" pins a disk's worth of blocks per round.
//! Before a guest's create runs, [`decide`] checks, in this order:
//!
//! 1. **count**: the VM's guest snapshot sets (`org.lfedge.evesnap:origin=guest`, one per
//!    name across its volumes) are fewer than `--guest-max-snapshots`;
//! 2. **bytes**: the space they hold (the sum of their `used`, as zfs reports it: blocks only
//!    they keep) is under `--guest-max-bytes` (bytes, or a percentage of the pool's size);
//! 3. **pool floor**: on each pool of the requested disks, what is free minus what the new
//!    snapshot can pin (the disks' `referenced`: a full overwrite after it) stays at or above
//!    `--pool-floor`, so guest writes after an allowed snapshot cannot take the pool under it;
//! 4. **rate**: the newest guest snapshot is at least `--guest-min-interval` old (a create
//!    tried since the listener started, failed or not, holds the next one as long: that
//!    check is [`super::rate`]'s, before the agent is asked).
//!
//! Refusals are replies the guest can act on: `quota-exceeded` (code 7) and `no-room`
//! (code 7) with the guest's own numbers only (`quota`), `rate-limited` (code 8) with
//! `retry_after_s`. Nothing about the pool (its size, its free bytes) reaches the guest.
//! The facts come from zfs at each request, so a restarted listener keeps the budget.
//! Free space is what zfs reports: guest writes not yet synced (each snapshot syncs the
//! pool) are not counted yet, so at worst the pool may go under the floor by what the guest
//! wrote since its last snapshot; `referenced` bounds a full overwrite, not two.

use std::collections::{BTreeMap, BTreeSet};

use evesnap::exit::Exit;
use evesnap::report::Origin;
use evesnap::request::{GuestQuota, ReplyError};
use evesnap::zfs::{self, Problem, Zfs};

/// A size given on the command line: bytes (suffix K, M, G, T: powers of 1024), a
/// percentage of the pool's size, or both (`10%,1G`: the larger).
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Size {
    Bytes(u64),
    Percent(f64),
    Larger(u64, f64),
}

impl Size {
    /// The size in bytes when it does not depend on the pool's size.
    pub fn fixed(self) -> Option<u64> {
        match self {
            Size::Bytes(b) => Some(b),
            Size::Percent(_) | Size::Larger(..) => None,
        }
    }

    /// In bytes, for a pool of `total` bytes.
    pub fn of(self, total: u64) -> u64 {
        let percent = |p: f64| (total as f64 * p / 100.0) as u64;
        match self {
            Size::Bytes(b) => b,
            Size::Percent(p) => percent(p),
            Size::Larger(b, p) => b.max(percent(p)),
        }
    }

    fn one(text: &str) -> Result<Size, String> {
        let text = text.trim();
        if let Some(p) = text.strip_suffix('%') {
            return match p.trim().parse::<f64>() {
                Ok(p) if (0.0..=100.0).contains(&p) => Ok(Size::Percent(p)),
                _ => Err(format!("{text:?}: a percentage is 0-100%")),
            };
        }
        let (digits, unit) = match text.char_indices().find(|(_, c)| !c.is_ascii_digit()) {
            Some((i, _)) => text.split_at(i),
            None => (text, ""),
        };
        let shift = match unit.trim() {
            "" | "B" => 0,
            "K" | "KiB" => 10,
            "M" | "MiB" => 20,
            "G" | "GiB" => 30,
            "T" | "TiB" => 40,
            _ => {
                return Err(format!(
                    "{text:?}: bytes (K, M, G, T: powers of 1024) or N%"
                ))
            }
        };
        digits
            .parse::<u64>()
            .ok()
            .and_then(|n| n.checked_mul(1 << shift))
            .map(Size::Bytes)
            .ok_or_else(|| format!("{text:?}: bytes (K, M, G, T: powers of 1024) or N%"))
    }
}

impl std::str::FromStr for Size {
    type Err = String;

    fn from_str(text: &str) -> Result<Size, String> {
        let Some((a, b)) = text.split_once(',') else {
            return Size::one(text);
        };
        match (Size::one(a)?, Size::one(b)?) {
            (Size::Bytes(n), Size::Percent(p)) | (Size::Percent(p), Size::Bytes(n)) => {
                Ok(Size::Larger(n, p))
            }
            _ => Err(format!(
                "{text:?}: one percentage and one size, e.g. 10%,1G"
            )),
        }
    }
}

/// The listener's budget for guest creates (its `--guest-*` and `--pool-floor` flags).
#[derive(Debug, Clone, PartialEq)]
pub struct Budget {
    pub max_snapshots: u64,
    pub max_bytes: Size,
    pub min_interval_s: u64,
    pub pool_floor: Size,
}

/// One pool the requested disks live on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PoolSpace {
    /// `used + available` of the pool's root dataset.
    pub size: u64,
    pub free: u64,
    /// What the new snapshot can pin there: the requested disks' `referenced`.
    pub needs: u64,
}

/// What [`decide`] looks at: the VM's guest snapshots, the pools, the time.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Facts {
    /// Guest snapshot sets of this VM (one per name across its volumes).
    pub snapshots: u64,
    /// The sum of their `used`.
    pub bytes: u64,
    /// The newest one's `creation` (seconds since the epoch).
    pub newest: Option<u64>,
    pub pools: Vec<PoolSpace>,
    /// Seconds since the epoch.
    pub now: u64,
}

/// Why a guest create may not run now.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Refusal {
    TooMany(GuestQuota),
    TooManyBytes(GuestQuota),
    NoRoom(GuestQuota),
    RateLimited { retry_after_s: u32 },
}

/// Whether a guest create may run (see the module's documentation for the order).
pub fn decide(budget: &Budget, facts: &Facts) -> Result<(), Refusal> {
    // The byte quota in bytes: a percentage is of the (first) pool's size.
    let pool_size = facts.pools.iter().map(|p| p.size).max().unwrap_or(0);
    let max_bytes = budget.max_bytes.of(pool_size);
    let quota = GuestQuota {
        snapshots: facts.snapshots,
        max_snapshots: budget.max_snapshots,
        bytes: facts.bytes,
        // A share of the pool would tell the pool's size: the guest learns only that it
        // is over.
        max_bytes: budget.max_bytes.fixed(),
    };
    if facts.snapshots >= budget.max_snapshots {
        return Err(Refusal::TooMany(quota));
    }
    if facts.bytes >= max_bytes {
        return Err(Refusal::TooManyBytes(quota));
    }
    for pool in &facts.pools {
        let floor = budget.pool_floor.of(pool.size);
        if pool.free.saturating_sub(pool.needs) < floor {
            return Err(Refusal::NoRoom(quota));
        }
    }
    if let Some(newest) = facts.newest {
        let ready = newest.saturating_add(budget.min_interval_s);
        if facts.now < ready {
            return Err(Refusal::RateLimited {
                retry_after_s: u32::try_from(ready - facts.now).unwrap_or(u32::MAX),
            });
        }
    }
    Ok(())
}

impl Refusal {
    /// The reply's error: the guest's own numbers, nothing about the pool.
    pub fn to_error(&self) -> ReplyError {
        let (kind, exit, message, quota, retry_after_s) = match self {
            Refusal::TooMany(q) => (
                "quota-exceeded",
                Exit::Preflight,
                format!(
                    "this VM has {} of its {} guest snapshots: the host's operator must remove some first",
                    q.snapshots, q.max_snapshots
                ),
                Some(*q),
                None,
            ),
            Refusal::TooManyBytes(q) => (
                "quota-exceeded",
                Exit::Preflight,
                format!(
                    "this VM's guest snapshots hold {} bytes, {}: the host's operator must remove some first",
                    q.bytes,
                    match q.max_bytes {
                        Some(max) => format!("their quota is {max}"),
                        None => "their quota's worth".to_string(),
                    }
                ),
                Some(*q),
                None,
            ),
            Refusal::NoRoom(q) => (
                "no-room",
                Exit::Preflight,
                "the host has no room for another snapshot of this disk now".to_string(),
                Some(*q),
                None,
            ),
            Refusal::RateLimited { retry_after_s } => (
                "rate-limited",
                Exit::Busy,
                format!("too soon after this VM's last snapshot: retry in {retry_after_s} s"),
                None,
                Some(*retry_after_s),
            ),
        };
        ReplyError {
            kind: kind.into(),
            code: exit.code(),
            message,
            step: Some("budget".into()),
            problems: Vec::new(),
            quota: quota.map(Box::new),
            retry_after_s,
        }
    }
}

/// Reads the facts from zfs: the guest snapshots of every volume of the VM, and the pools
/// of the `requested` datasets.
pub fn facts(zfs: &Zfs, volumes: &[String], requested: &[String]) -> Result<Facts, zfs::Error> {
    let mut sets: BTreeMap<String, u64> = BTreeMap::new();
    let mut bytes = 0u64;
    for dataset in volumes {
        for s in zfs.snapshots(dataset, &[Origin::PROPERTY])? {
            if Origin::of(&s.properties) != Origin::Guest {
                continue;
            }
            bytes = bytes.saturating_add(s.used);
            let newest = sets.entry(s.short_name().to_string()).or_default();
            *newest = (*newest).max(s.creation);
        }
    }
    let (spaces, _) = zfs.space(requested)?;
    let pools: BTreeSet<&str> = requested.iter().map(|d| zfs::pool_of(d)).collect();
    let mut out = Vec::new();
    for pool in pools {
        let (table, _) = zfs.get(&[pool.to_string()], &["used", "available"])?;
        let number = |p: &str| {
            table
                .iter()
                .find(|(name, _)| name == pool)
                .and_then(|(_, props)| props.get(p).cloned().flatten())
                .and_then(|v| v.parse::<u64>().ok())
                .unwrap_or(0)
        };
        let free = number("available");
        out.push(PoolSpace {
            size: number("used").saturating_add(free),
            free,
            needs: spaces
                .iter()
                .filter(|s| zfs::pool_of(&s.dataset) == pool)
                .map(|s| s.referenced)
                .sum(),
        });
    }
    Ok(Facts {
        snapshots: sets.len() as u64,
        bytes,
        newest: sets.values().copied().max(),
        pools: out,
        now: std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs()),
    })
}

/// A failed flow's error as the guest may see it: a `no-room` preflight finding carries the
/// pool's free bytes, so it becomes the budget's own `no-room`, without numbers.
pub fn hide_pool(error: &mut ReplyError) {
    let no_room = error
        .problems
        .iter()
        .any(|p| matches!(p, Problem::NoRoom { .. }));
    if no_room {
        error.kind = "no-room".into();
        error.message = "the host has no room for another snapshot of this disk now".into();
        error.problems.clear();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const GIB: u64 = 1 << 30;
    const MIB: u64 = 1 << 20;

    fn budget() -> Budget {
        Budget {
            max_snapshots: 3,
            max_bytes: Size::Bytes(100 * MIB),
            min_interval_s: 30,
            pool_floor: Size::Percent(10.0),
        }
    }

    fn facts() -> Facts {
        Facts {
            snapshots: 0,
            bytes: 0,
            newest: None,
            pools: vec![PoolSpace {
                size: GIB,
                free: GIB / 2,
                needs: 64 * MIB,
            }],
            now: 1_000_000,
        }
    }

    #[test]
    fn sizes_parse_as_bytes_or_percent() {
        assert_eq!("10%".parse(), Ok(Size::Percent(10.0)));
        assert_eq!("512M".parse(), Ok(Size::Bytes(512 * MIB)));
        assert_eq!("2G".parse(), Ok(Size::Bytes(2 * GIB)));
        assert_eq!("4096".parse(), Ok(Size::Bytes(4096)));
        for bad in ["", "x", "101%", "-1%", "1.5G", "1Q", "99999999999T"] {
            assert!(bad.parse::<Size>().is_err(), "{bad}");
        }
        assert_eq!(Size::Percent(10.0).of(GIB), GIB / 10);
        let both: Size = "10%,512M".parse().expect("both");
        assert_eq!(both, Size::Larger(512 * MIB, 10.0));
        assert_eq!(both.of(GIB), 512 * MIB, "the larger on a small pool");
        assert_eq!(both.of(100 * GIB), 10 * GIB, "the larger on a big pool");
        assert!("1G,2G".parse::<Size>().is_err());
        assert!("1G,2G,3%".parse::<Size>().is_err());
    }

    #[test]
    fn a_guest_within_its_budget_may_create() {
        assert_eq!(decide(&budget(), &facts()), Ok(()));
        let mut f = facts();
        f.snapshots = 2;
        f.bytes = 99 * MIB;
        f.newest = Some(f.now - 30);
        assert_eq!(decide(&budget(), &f), Ok(()));
    }

    #[test]
    fn the_count_quota_comes_first_with_the_guests_own_numbers() {
        let mut f = facts();
        f.snapshots = 3;
        f.newest = Some(f.now);
        let Err(Refusal::TooMany(q)) = decide(&budget(), &f) else {
            panic!("{:?}", decide(&budget(), &f))
        };
        assert_eq!((q.snapshots, q.max_snapshots), (3, 3));
        let e = Refusal::TooMany(q).to_error();
        assert_eq!((e.kind.as_str(), e.code), ("quota-exceeded", 7));
        assert!(e.message.contains("3 of its 3"), "{}", e.message);
    }

    #[test]
    fn the_byte_quota_may_be_a_share_of_the_pool() {
        let mut b = budget();
        b.max_bytes = Size::Percent(10.0);
        let mut f = facts();
        f.bytes = GIB / 10;
        let Err(Refusal::TooManyBytes(q)) = decide(&b, &f) else {
            panic!("{:?}", decide(&b, &f))
        };
        assert_eq!((q.bytes, q.max_bytes), (GIB / 10, None));
        let e = Refusal::TooManyBytes(q).to_error();
        assert_eq!(e.kind, "quota-exceeded");
        // The quota, 10% of the pool, would tell the pool's size: only the guest's own
        // bytes are in the reply.
        let text = serde_json::to_string(&e).expect("json");
        let pool = GIB.to_string();
        assert!(
            !text.contains(&pool) && !text.contains("max_bytes"),
            "{text}"
        );
        f.bytes = GIB / 10 - 1;
        f.snapshots = 3;
        let Err(Refusal::TooMany(q)) = decide(&b, &f) else {
            panic!("{:?}", decide(&b, &f))
        };
        assert_eq!(q.max_bytes, None, "in every refusal");
        // A quota set in bytes tells nothing about the pool: it is there.
        f.bytes = 100 * MIB;
        f.snapshots = 0;
        let Err(Refusal::TooManyBytes(q)) = decide(&budget(), &f) else {
            panic!("{:?}", decide(&budget(), &f))
        };
        assert_eq!(q.max_bytes, Some(100 * MIB));
    }

    #[test]
    fn the_pool_floor_counts_what_the_snapshot_can_pin() {
        let mut f = facts();
        // 10% of 1 GiB is the floor; 64 MiB may be pinned by a full overwrite.
        f.pools[0].free = GIB / 10 + 64 * MIB;
        assert_eq!(decide(&budget(), &f), Ok(()));
        f.pools[0].free -= 1;
        let refusal = decide(&budget(), &f).expect_err("under the floor");
        assert!(matches!(refusal, Refusal::NoRoom(_)), "{refusal:?}");
        let e = refusal.to_error();
        assert_eq!(e.kind, "no-room");
        // Nothing about the pool: no free bytes, no size, in any field.
        let text = serde_json::to_string(&e).expect("json");
        for secret in [f.pools[0].free, f.pools[0].size, GIB / 10] {
            assert!(!text.contains(&secret.to_string()), "{text}");
        }
    }

    #[test]
    fn too_soon_is_rate_limited_with_the_wait() {
        let mut f = facts();
        f.snapshots = 1;
        f.newest = Some(f.now - 12);
        assert_eq!(
            decide(&budget(), &f),
            Err(Refusal::RateLimited { retry_after_s: 18 })
        );
        let e = Refusal::RateLimited { retry_after_s: 18 }.to_error();
        assert_eq!(
            (e.kind.as_str(), e.code, e.retry_after_s),
            ("rate-limited", 8, Some(18))
        );
        assert!(e.quota.is_none());
    }

    #[test]
    fn a_flow_no_room_loses_its_numbers() {
        let mut e = ReplyError {
            kind: "preflight-failed".into(),
            code: 7,
            message: "disk0: 524288 bytes missing (… 524288 are available)".into(),
            step: Some("preflight".into()),
            problems: vec![Problem::NoRoom {
                dataset: "disk0".into(),
                needed: 1048576,
                available: 524288,
                missing: 524288,
            }],
            quota: None,
            retry_after_s: None,
        };
        hide_pool(&mut e);
        assert_eq!(e.kind, "no-room");
        let text = serde_json::to_string(&e).expect("json");
        assert!(!text.contains("524288"), "{text}");
        // Any other finding stays as it is.
        let taken = Problem::NameTaken {
            snapshot: "disk0@s".into(),
        };
        let mut e = ReplyError {
            kind: "preflight-failed".into(),
            problems: vec![taken.clone()],
            ..ReplyError::default()
        };
        hide_pool(&mut e);
        assert_eq!(
            (e.kind.as_str(), e.problems),
            ("preflight-failed", vec![taken])
        );
    }
}
