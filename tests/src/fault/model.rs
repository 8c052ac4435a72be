//! The fault families, their timings, and drawing one at random (the soak's trials).

use std::fmt;
use std::time::Duration;

/// A small deterministic generator (xorshift64*), so a soak can be replayed by its seed.
#[derive(Debug, Clone)]
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Rng {
        Rng(seed.max(1))
    }

    pub fn next_u64(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.0 = x;
        x.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    /// Uniform in `0..n` (`n > 0`).
    pub fn below(&mut self, n: u64) -> u64 {
        self.next_u64() % n.max(1)
    }

    pub fn millis(&mut self, from: u64, to: u64) -> Duration {
        Duration::from_millis(from + self.below(to.saturating_sub(from) + 1))
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Sig {
    Kill,
    Term,
}

impl Sig {
    pub(super) fn signal(self) -> nix::sys::signal::Signal {
        match self {
            Sig::Kill => nix::sys::signal::Signal::SIGKILL,
            Sig::Term => nix::sys::signal::Signal::SIGTERM,
        }
    }

    pub(super) fn name(self) -> &'static str {
        match self {
            Sig::Kill => "KILL",
            Sig::Term => "TERM",
        }
    }
}

/// Where in the create flow a signal lands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Phase {
    /// While `guest_pre` runs (before the freeze).
    BeforeFreeze,
    /// Frozen, `zfs snapshot` started but not yet at work (the shim waits first).
    Frozen,
    /// Frozen, the snapshot exists but `zfs snapshot` has not returned.
    Snapshot,
    /// Right after `zfs snapshot` returned: thawing.
    Thaw,
}

impl Phase {
    pub const ALL: [Phase; 4] = [
        Phase::BeforeFreeze,
        Phase::Frozen,
        Phase::Snapshot,
        Phase::Thaw,
    ];

    pub(super) fn name(self) -> &'static str {
        match self {
            Phase::BeforeFreeze => "before-freeze",
            Phase::Frozen => "frozen",
            Phase::Snapshot => "snapshot",
            Phase::Thaw => "thaw",
        }
    }
}

/// A tool of the `qga-freeze | zsnap | qga-thaw` pipeline.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Tool {
    Freeze,
    Zsnap,
    Thaw,
}

impl Tool {
    pub const ALL: [Tool; 3] = [Tool::Freeze, Tool::Zsnap, Tool::Thaw];

    pub(super) fn name(self) -> &'static str {
        match self {
            Tool::Freeze => "qga-freeze",
            Tool::Zsnap => "zsnap",
            Tool::Thaw => "qga-thaw",
        }
    }
}

/// The `zfs` call that hangs for good in [`Fault::ZfsHangsTerm`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HungCall {
    /// The preflight's `zfs get` (space, existing names), before anything in the guest.
    Preflight,
    /// `zfs snapshot`, the guest frozen.
    Snapshot,
    /// Retention's `zfs destroy` after the create.
    Destroy,
    /// `zfs rollback`, the guest's volumes unmounted.
    Rollback,
}

impl HungCall {
    pub const ALL: [HungCall; 4] = [
        HungCall::Preflight,
        HungCall::Snapshot,
        HungCall::Destroy,
        HungCall::Rollback,
    ];

    pub(super) fn name(self) -> &'static str {
        match self {
            HungCall::Preflight => "get (preflight)",
            HungCall::Snapshot => "snapshot (frozen)",
            HungCall::Destroy => "destroy (retention)",
            HungCall::Rollback => "rollback",
        }
    }
}

/// One fault, with its timing.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Fault {
    /// `snap-orchestrate` gets a signal at `phase`, `jitter` after its marker.
    Orchestrator {
        signal: Sig,
        phase: Phase,
        jitter: Duration,
    },
    /// One tool of the pipeline gets a signal while it works.
    Pipeline {
        tool: Tool,
        signal: Sig,
        jitter: Duration,
    },
    /// `qga-freeze | zsnap | qga-thaw` whose `zfs snapshot` outlasts the watchdog.
    PipelineOutlastsWatchdog,
    /// `qga-freeze | zsnap --datset … | qga-thaw`: the middle step's command line is mistyped.
    PipelineTypo,
    /// qemu-ga is killed inside the guest `after` the freeze (init respawns it).
    AgentKilled { signal: Sig, after: Duration },
    /// qemu-ga is killed inside the guest right after the freeze, and again each time init
    /// respawns it, for `away`: the run loses its agent after `guest_pre`.
    AgentAway { away: Duration },
    /// The VM is paused (QMP `stop`) once frozen and resumed `paused` later.
    VmPaused { paused: Duration },
    /// `zfs snapshot` fails.
    ZfsFails,
    /// `zfs snapshot` blocks past the orchestrator's own timeout (and the watchdog's deadline).
    ZfsHangs,
    /// `zfs snapshot` returns after the watchdog fired but within the agent timeout.
    ZfsOutlastsWatchdog,
    /// `zfs snapshot` is slow but finishes within the deadline.
    ZfsSlow { delay: Duration },
    /// The pool fills up between the preflight and the snapshot (`out of space`).
    PoolFull,
    /// The preflight finds no room.
    NoRoom,
    /// A held snapshot meets retention and a rollback that would destroy it.
    Held,
    /// Stale requests and garbage bytes are left on the agent channel before the run.
    Garbage { seed: u64 },
    /// Two orchestrations of the same VM at once.
    Concurrent,
    /// A rollback, interrupted by a signal during `zfs rollback` (or not).
    Rollback { signal: Option<Sig> },
    /// A `zfs` call of the run hangs for good, and the orchestrator gets SIGTERM.
    ZfsHangsTerm { call: HungCall },
    /// The freeze comes up short (a volume frozen behind qemu-ga's back); the plan's
    /// `freeze.on_failure` is `crash` (a labelled crash snapshot) or `fail` (none).
    FreezeFails { crash: bool },
    /// A rollback that keeps the newer snapshots under the running VM (QEMU holds the
    /// volumes' images open, so the switch must be undone), `zfs clone` failing or not.
    KeepNewer { clone_fails: bool },
}

impl fmt::Display for Fault {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Fault::Orchestrator {
                signal,
                phase,
                jitter,
            } => write!(
                f,
                "orchestrator SIG{} @{} +{}ms",
                signal.name(),
                phase.name(),
                jitter.as_millis()
            ),
            Fault::Pipeline {
                tool,
                signal,
                jitter,
            } => write!(
                f,
                "pipeline {} SIG{} +{}ms",
                tool.name(),
                signal.name(),
                jitter.as_millis()
            ),
            Fault::PipelineOutlastsWatchdog => {
                write!(f, "pipeline zfs snapshot outlasts the watchdog")
            }
            Fault::PipelineTypo => write!(f, "pipeline zsnap mistyped (--datset)"),
            Fault::AgentKilled { signal, after } => write!(
                f,
                "qemu-ga SIG{} while frozen +{}ms",
                signal.name(),
                after.as_millis()
            ),
            Fault::AgentAway { away } => {
                write!(f, "qemu-ga kept away while frozen {}ms", away.as_millis())
            }
            Fault::VmPaused { paused } => {
                write!(f, "VM paused while frozen {}ms", paused.as_millis())
            }
            Fault::ZfsFails => write!(f, "zfs snapshot fails"),
            Fault::ZfsHangs => write!(f, "zfs snapshot hangs past the deadline"),
            Fault::ZfsOutlastsWatchdog => write!(f, "zfs snapshot outlasts the watchdog"),
            Fault::ZfsSlow { delay } => write!(f, "zfs snapshot slow {}ms", delay.as_millis()),
            Fault::PoolFull => write!(f, "pool full at the snapshot"),
            Fault::NoRoom => write!(f, "no room at the preflight"),
            Fault::Held => write!(f, "held snapshot"),
            Fault::Garbage { seed } => write!(f, "garbage on the agent channel ({seed:x})"),
            Fault::Concurrent => write!(f, "two orchestrations at once"),
            Fault::Rollback { signal: None } => write!(f, "rollback"),
            Fault::Rollback { signal: Some(s) } => {
                write!(f, "rollback SIG{} during zfs rollback", s.name())
            }
            Fault::FreezeFails { crash } => write!(
                f,
                "freeze fails, on_failure {}",
                if *crash { "crash" } else { "fail" }
            ),
            Fault::KeepNewer { clone_fails } => write!(
                f,
                "keep_newer rollback under the running VM{}",
                if *clone_fails {
                    ", zfs clone fails"
                } else {
                    ""
                }
            ),
            Fault::ZfsHangsTerm { call } => write!(f, "zfs {} hangs, SIGTERM", call.name()),
        }
    }
}

impl Fault {
    /// A random fault with a random timing.
    pub fn random(rng: &mut Rng) -> Fault {
        let signal = |rng: &mut Rng| {
            if rng.below(2) == 0 {
                Sig::Kill
            } else {
                Sig::Term
            }
        };
        match rng.below(19) {
            0..=4 => Fault::Orchestrator {
                signal: signal(rng),
                phase: Phase::ALL[rng.below(4) as usize],
                jitter: rng.millis(0, 400),
            },
            5 | 6 if rng.below(6) == 0 => Fault::PipelineOutlastsWatchdog,
            5 | 6 if rng.below(5) == 0 => Fault::PipelineTypo,
            5 | 6 => Fault::Pipeline {
                tool: Tool::ALL[rng.below(3) as usize],
                signal: signal(rng),
                jitter: rng.millis(0, 400),
            },
            7 if rng.below(2) == 0 => Fault::AgentAway {
                away: rng.millis(5000, 9000),
            },
            7 => Fault::AgentKilled {
                signal: signal(rng),
                after: rng.millis(100, 1500),
            },
            8 => Fault::VmPaused {
                paused: rng.millis(500, 9000),
            },
            9 => match rng.below(4) {
                0 => Fault::ZfsFails,
                1 => Fault::ZfsHangs,
                2 => Fault::ZfsOutlastsWatchdog,
                _ => Fault::ZfsSlow {
                    delay: rng.millis(200, 3000),
                },
            },
            10 => {
                if rng.below(2) == 0 {
                    Fault::PoolFull
                } else {
                    Fault::NoRoom
                }
            }
            11 => Fault::Held,
            12 => Fault::Garbage {
                seed: rng.next_u64(),
            },
            13 => Fault::Concurrent,
            14 => Fault::ZfsHangsTerm {
                call: HungCall::ALL[rng.below(4) as usize],
            },
            15 => Fault::FreezeFails {
                crash: rng.below(2) == 0,
            },
            16 => Fault::KeepNewer {
                clone_fails: rng.below(2) == 0,
            },
            _ => Fault::Rollback {
                signal: match rng.below(3) {
                    0 => None,
                    1 => Some(Sig::Kill),
                    _ => Some(Sig::Term),
                },
            },
        }
    }
}
