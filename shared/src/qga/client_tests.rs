//! The client against scripted peers: stale output, garbage, silence, refusals.

use std::time::{Duration, Instant};

use serde_json::json;

use super::commands as qga;
use super::testing::{FakeAgent, SimState};
use super::{Address, Client, Error};

fn soon(secs: f64) -> Instant {
    Instant::now() + Duration::from_secs_f64(secs)
}

/// A peer that answers syncs and pings; `before` runs on each connection first.
fn pinger(before: impl Fn(&mut super::testing::Peer) + Send + 'static) -> FakeAgent {
    FakeAgent::start(move |peer| {
        before(peer);
        while let Some(req) = peer.next_request() {
            match req.execute.as_str() {
                "guest-sync-delimited" => peer.answer_sync(&req),
                _ => peer.reply(&req, json!({})),
            }
        }
    })
}

#[test]
fn stale_output_before_the_sync_is_skipped() {
    let agent = pinger(|peer| {
        // A reply for a client that went away, a stale delimited sync, half an object,
        // and a stale reply carrying another id.
        peer.send_raw(
            b"{\"return\": 3, \"id\": 77}\n\xff{\"return\": 123}\n{\"return\": {\"version\":",
        );
        peer.send_raw(b"\n{\"return\": {}, \"id\": 1}\n");
    });
    let mut client = Client::connect(&agent.address, soon(5.0)).expect("connects");
    client.ping().expect("ping");
    assert_eq!(
        client.execute(qga::guest_fsfreeze_thaw {}).ok(),
        None,
        "{{}} is no count"
    );
}

#[test]
fn replies_with_other_ids_are_skipped() {
    let agent = FakeAgent::start(|peer| {
        while let Some(req) = peer.next_request() {
            match req.execute.as_str() {
                "guest-sync-delimited" => peer.answer_sync(&req),
                _ => {
                    peer.send_raw(b"{\"return\": 99, \"id\": 4242}\n{\"return\": 98}\n");
                    peer.reply(&req, json!(2));
                }
            }
        }
    });
    let mut client = Client::connect(&agent.address, soon(5.0)).expect("connects");
    assert_eq!(
        client.execute(qga::guest_fsfreeze_thaw {}).expect("thaw"),
        2
    );
}

#[test]
fn garbage_is_a_protocol_error_and_the_next_command_resyncs() {
    let agent = FakeAgent::start(|peer| {
        let mut first = true;
        while let Some(req) = peer.next_request() {
            match req.execute.as_str() {
                "guest-sync-delimited" => peer.answer_sync(&req),
                _ if first => {
                    first = false;
                    peer.send_raw(b"this is not json\n");
                }
                _ => peer.reply(&req, json!({})),
            }
        }
    });
    let mut client = Client::connect(&agent.address, soon(5.0)).expect("connects");
    let err = client.ping().expect_err("garbage");
    assert!(matches!(err, Error::Protocol { .. }), "{err:?}");
    assert_eq!(
        crate::exit::HasExit::exit(&err),
        crate::exit::Exit::StepFailed
    );
    client.ping().expect("recovers");
}

#[test]
fn a_reply_of_the_wrong_shape_is_a_protocol_error() {
    let agent = FakeAgent::start(|peer| {
        while let Some(req) = peer.next_request() {
            match req.execute.as_str() {
                "guest-sync-delimited" => peer.answer_sync(&req),
                _ => peer.reply(&req, json!("banana")),
            }
        }
    });
    let mut client = Client::connect(&agent.address, soon(5.0)).expect("connects");
    let err = client
        .execute(qga::guest_fsfreeze_thaw {})
        .expect_err("not a count");
    assert!(matches!(err, Error::Protocol { .. }), "{err:?}");
}

#[test]
fn oversized_lines_are_capped_and_the_connection_recovers() {
    let agent = FakeAgent::start(|peer| {
        let mut first = true;
        while let Some(req) = peer.next_request() {
            match req.execute.as_str() {
                "guest-sync-delimited" => peer.answer_sync(&req),
                _ if first => {
                    first = false;
                    // 1 MiB without a line end, then the end.
                    peer.send_raw(b"{\"return\": \"");
                    peer.send_raw(&vec![b'x'; 1024 * 1024]);
                    peer.send_raw(b"\"}\n");
                }
                _ => peer.reply(&req, json!({})),
            }
        }
    });
    let mut client = Client::connect(&agent.address, soon(5.0)).expect("connects");
    client.set_max_reply(64 * 1024);
    let err = client.ping().expect_err("too long");
    assert!(
        matches!(err, Error::ReplyTooLong { limit: 65536, .. }),
        "{err:?}"
    );
    client.ping().expect("recovers");
}

#[test]
fn a_silent_peer_times_out_by_the_deadline() {
    let agent = FakeAgent::start(|peer| while peer.next_request().is_some() {});
    let started = Instant::now();
    let err = Client::connect(&agent.address, soon(1.2)).expect_err("silent");
    let took = started.elapsed();
    assert!(matches!(err, Error::Timeout { .. }), "{err:?}");
    assert_eq!(
        crate::exit::HasExit::exit(&err),
        crate::exit::Exit::AgentTimeout
    );
    assert!(
        took >= Duration::from_millis(1100) && took < Duration::from_millis(2500),
        "{took:?}"
    );
    // It kept re-sending the sync while it waited (the agent may be booting).
    assert!(err.to_string().contains("guest-sync-delimited"), "{err}");
}

#[test]
fn a_command_without_reply_times_out_and_a_late_reply_is_not_taken_for_the_next() {
    let agent = FakeAgent::start(|peer| {
        let mut held = None;
        while let Some(req) = peer.next_request() {
            match req.execute.as_str() {
                "guest-sync-delimited" => {
                    // The held reply comes late, after the client gave up, before the sync.
                    if let Some(old) = held.take() {
                        peer.reply(&old, json!(5));
                    }
                    peer.answer_sync(&req);
                }
                "guest-fsfreeze-freeze" => held = Some(req),
                _ => peer.reply(&req, json!(1)),
            }
        }
    });
    let mut client = Client::connect(&agent.address, soon(5.0)).expect("connects");
    let started = Instant::now();
    let err = client
        .execute_within(qga::guest_fsfreeze_freeze {}, Duration::from_millis(300))
        .expect_err("held");
    assert!(err.is_timeout(), "{err:?}");
    assert!(started.elapsed() < Duration::from_secs(1));
    assert_eq!(
        client.execute(qga::guest_fsfreeze_thaw {}).expect("thaw"),
        1
    );
}

#[test]
fn an_unsynced_command_is_answered_by_its_own_id() {
    let agent = FakeAgent::start(|peer| {
        let mut held = None;
        while let Some(req) = peer.next_request() {
            match req.execute.as_str() {
                "guest-sync-delimited" => peer.answer_sync(&req),
                "guest-fsfreeze-freeze" => held = Some(req),
                _ => {
                    // The paused VM resumes: the held freeze is answered first.
                    if let Some(old) = held.take() {
                        peer.reply(&old, json!(3));
                    }
                    peer.reply(&req, json!(3));
                }
            }
        }
    });
    let mut client = Client::connect(&agent.address, soon(5.0)).expect("connects");
    client
        .execute_within(qga::guest_fsfreeze_freeze {}, Duration::from_millis(200))
        .expect_err("held");
    let thawed = client
        .execute_unsynced(qga::guest_fsfreeze_thaw {}, Duration::from_secs(2))
        .expect("thaw");
    assert_eq!(thawed, 3);
}

#[test]
fn an_agent_that_wakes_up_late_is_waited_for() {
    // Like a booting guest: the first syncs go unanswered, then all are answered.
    let agent = FakeAgent::start(|peer| {
        let mut pending = Vec::new();
        let woke = Instant::now() + Duration::from_millis(1200);
        while let Some(req) = peer.next_request() {
            match req.execute.as_str() {
                "guest-sync-delimited" if Instant::now() < woke => pending.push(req),
                "guest-sync-delimited" => {
                    for old in pending.drain(..) {
                        peer.answer_sync(&old);
                    }
                    peer.answer_sync(&req);
                }
                _ => peer.reply(&req, json!(7)),
            }
        }
    });
    let mut client = Client::connect(&agent.address, soon(10.0)).expect("connects once awake");
    assert_eq!(
        client.execute(qga::guest_fsfreeze_thaw {}).expect("thaw"),
        7
    );
}

#[test]
fn refusals_are_typed() {
    let mut state = SimState::default();
    state.missing.push("guest-fsfreeze-freeze-list".into());
    state.failing.push((
        "guest-fsfreeze-freeze".into(),
        "failed to freeze /data0: Device or resource busy".into(),
    ));
    let (agent, _sim) = FakeAgent::simulated(state);
    let mut client = Client::connect(&agent.address, soon(5.0)).expect("connects");
    let err = client
        .execute(qga::guest_fsfreeze_freeze_list { mountpoints: None })
        .expect_err("missing");
    assert!(matches!(err, Error::Unsupported { .. }), "{err:?}");
    let err = client
        .execute(qga::guest_fsfreeze_freeze {})
        .expect_err("fails");
    assert!(
        matches!(&err, Error::Agent { source, .. } if source.desc.contains("busy")),
        "{err:?}"
    );
    assert_eq!(
        crate::exit::chain_of(&err),
        "the guest agent refused guest-fsfreeze-freeze: failed to freeze /data0: Device or resource busy (GenericError)"
    );
}

#[test]
fn commands_are_disabled_while_frozen() {
    let state = SimState {
        frozen: 2,
        ..SimState::default()
    };
    let (agent, _sim) = FakeAgent::simulated(state);
    let mut client = Client::connect(&agent.address, soon(5.0)).expect("connects");
    let err = client
        .guest_exec("/bin/true", &[], Duration::from_secs(1))
        .expect_err("disabled");
    assert!(matches!(err, Error::Disabled { .. }), "{err:?}");
    assert_eq!(
        client.fsfreeze_status().expect("status"),
        qga::GuestFsfreezeStatus::frozen
    );
}

#[test]
fn guest_exec_polls_and_decodes() {
    let agent = FakeAgent::start(|peer| {
        let mut polls = 0;
        while let Some(req) = peer.next_request() {
            match req.execute.as_str() {
                "guest-sync-delimited" => peer.answer_sync(&req),
                "guest-exec" => {
                    assert_eq!(req.arguments["path"], "/bin/sh");
                    assert_eq!(req.arguments["arg"], json!(["-c", "echo hi"]));
                    assert_eq!(req.arguments["capture-output"], json!(true));
                    peer.reply(&req, json!({"pid": 42}));
                }
                "guest-exec-status" if polls < 2 => {
                    polls += 1;
                    peer.reply(&req, json!({"exited": false}));
                }
                "guest-exec-status" => {
                    peer.reply(&req, json!({"exited": true, "exitcode": 3, "out-data": "aGkK", "err-data": "", "out-truncated": false}));
                }
                _ => peer.fail(&req, "CommandNotFound", "no"),
            }
        }
    });
    let mut client = Client::connect(&agent.address, soon(5.0)).expect("connects");
    let result = client
        .guest_exec("/bin/sh", &["-c", "echo hi"], Duration::from_secs(5))
        .expect("exec");
    assert_eq!(result.exitcode, Some(3));
    assert_eq!(result.stdout, b"hi\n");
    assert!(!result.success());
}

#[test]
fn a_missing_or_refusing_socket_is_unreachable() {
    let dir = std::env::temp_dir().join(format!("evesnap-unreach-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("dir");
    let missing = Address::Unix(dir.join("none.sock"));
    let started = Instant::now();
    let err = Client::connect(&missing, soon(0.6)).expect_err("missing");
    assert!(matches!(err, Error::Unreachable { .. }), "{err:?}");
    assert_eq!(
        crate::exit::HasExit::exit(&err),
        crate::exit::Exit::AgentUnreachable
    );
    assert!(started.elapsed() < Duration::from_secs(2));
    // A socket file nobody listens on refuses.
    let path = dir.join("dead.sock");
    drop(std::os::unix::net::UnixListener::bind(&path).expect("bind"));
    let err = Client::connect(&Address::Unix(path), soon(0.3)).expect_err("refused");
    assert!(matches!(err, Error::Unreachable { .. }), "{err:?}");
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn vsock_without_a_listener_is_unreachable_or_times_out() {
    // This host has no vsock transport to a guest: the connect fails one way or another,
    // but by the deadline and with a typed error.
    let started = Instant::now();
    let err =
        Client::connect(&Address::Vsock { cid: 3, port: 4444 }, soon(0.5)).expect_err("no vsock");
    assert!(
        matches!(err, Error::Unreachable { .. } | Error::Timeout { .. }),
        "{err:?}"
    );
    assert!(
        started.elapsed() < Duration::from_secs(2),
        "{:?}",
        started.elapsed()
    );
}

#[test]
fn a_kept_connection_is_used_as_it_is_unless_something_arrived_on_it() {
    use std::sync::{Arc, Mutex};
    // The peer logs what it reads; after its first ping reply it sends a stray reply
    // (another id) when `stray` is set, a moment later.
    let run = |stray: bool| -> Vec<String> {
        let log = Arc::new(Mutex::new(Vec::new()));
        let agent = {
            let log = log.clone();
            FakeAgent::start(move |peer| {
                let mut pings = 0;
                while let Some(req) = peer.next_request() {
                    log.lock().expect("log").push(req.execute.clone());
                    match req.execute.as_str() {
                        "guest-sync-delimited" => peer.answer_sync(&req),
                        _ => {
                            peer.reply(&req, json!({}));
                            pings += 1;
                            if stray && pings == 1 {
                                std::thread::sleep(Duration::from_millis(100));
                                peer.send_raw(b"{\"return\": 5, \"id\": 9}\n");
                            }
                        }
                    }
                }
            })
        };
        let mut client = Client::connect(&agent.address, soon(5.0)).expect("connects");
        client.ping().expect("first ping");
        std::thread::sleep(Duration::from_millis(300));
        let fd = client.into_fd();
        let mut kept = Client::from_kept_fd(fd, agent.address.clone(), soon(5.0)).expect("kept");
        kept.ping().expect("ping on the kept connection");
        let log = log.lock().expect("log").clone();
        log
    };
    assert_eq!(
        run(false),
        ["guest-sync-delimited", "guest-ping", "guest-ping"],
        "a quiet connection needs no new handshake"
    );
    assert_eq!(
        run(true),
        [
            "guest-sync-delimited",
            "guest-ping",
            "guest-sync-delimited",
            "guest-ping"
        ],
        "output since the handover: handshake first"
    );
}

mod hybrid_vsock {
    use super::*;
    use crate::exit::{Exit, HasExit};
    use crate::qga::testing::FakeAgent;
    use crate::qga::testing_hybrid::{Behaviour, HybridDevice};

    fn chain(err: Error) -> String {
        format!("{:#}", anyhow::Error::new(err))
    }

    fn forwarding(agent: &FakeAgent, port: u32) -> HybridDevice {
        let Address::Unix(backend) = &agent.address else {
            unreachable!("fake agents listen on Unix sockets")
        };
        HybridDevice::start(Behaviour::Forward {
            port,
            backend: backend.clone(),
        })
    }

    #[test]
    fn connect_ok_opens_the_guest_port() {
        let (agent, sim) = FakeAgent::simulated(SimState::default());
        let device = forwarding(&agent, 10000);
        let address = device.address(10000);
        let mut client = Client::connect(&address, soon(5.0)).expect("connects");
        assert_eq!(client.address(), &address);
        assert_eq!(
            client
                .execute(qga::guest_fsfreeze_freeze {})
                .expect("freeze"),
            3
        );
        assert_eq!(sim.state().frozen, 3);
        assert_eq!(
            client.execute(qga::guest_fsfreeze_thaw {}).expect("thaw"),
            3
        );
        assert_eq!(sim.state().frozen, 0);
        assert_eq!(device.connects.load(std::sync::atomic::Ordering::SeqCst), 1);
    }

    #[test]
    fn a_kept_connection_is_handed_over_like_a_unix_one() {
        let (agent, _sim) = FakeAgent::simulated(SimState::default());
        let device = forwarding(&agent, 10000);
        let address = device.address(10000);
        let mut client = Client::connect(&address, soon(5.0)).expect("connects");
        client.ping().expect("ping");
        let fd = client.into_fd();
        let mut kept = Client::from_kept_fd(fd, address, soon(5.0)).expect("adopted");
        assert!(kept.is_synced(), "nothing arrived: used as it is");
        kept.ping().expect("ping on the kept connection");
        assert_eq!(device.connects.load(std::sync::atomic::Ordering::SeqCst), 1);
    }

    #[test]
    fn a_closed_connect_is_unreachable_naming_the_socket_and_port() {
        let (agent, _sim) = FakeAgent::simulated(SimState::default());
        // The device forwards 10000 only: CONNECT 10001 finds no listener in the guest.
        let device = forwarding(&agent, 10000);
        let started = Instant::now();
        let err = Client::connect(&device.address(10001), soon(0.7)).expect_err("refused");
        let Error::Unreachable { source, .. } = &err else {
            panic!("{err:?}")
        };
        // The device is there: the watchdog keeps trying (a paused VM, an agent restarting).
        assert!(crate::qga::stream::is_hybrid_refusal(source), "{source:?}");
        assert_eq!(err.exit(), Exit::AgentUnreachable);
        let chain = chain(err);
        assert!(chain.contains("hvsock:"), "{chain}");
        assert!(
            chain.contains("did not open guest vsock port 10001"),
            "{chain}"
        );
        assert!(chain.contains("without OK"), "{chain}");
        // Refusals are retried until the deadline, like a refused socket.
        assert!(device.connects.load(std::sync::atomic::Ordering::SeqCst) >= 2);
        assert!(started.elapsed() < Duration::from_secs(2));
    }

    #[test]
    fn a_reply_other_than_ok_is_unreachable_and_quoted() {
        for reply in ["ERR no", "OK", "OK x", "HELLO 3"] {
            let device = HybridDevice::start(Behaviour::Answer(reply.to_string()));
            let err = Client::connect(&device.address(10000), soon(0.3)).expect_err(reply);
            assert_eq!(err.exit(), Exit::AgentUnreachable, "{reply}: {err:?}");
            let text = chain(err);
            assert!(text.contains(&format!("{reply:?}")), "{text}");
        }
    }

    #[test]
    fn a_connect_never_answered_times_out_by_the_deadline() {
        let device = HybridDevice::start(Behaviour::Silent);
        let started = Instant::now();
        let err = Client::connect(&device.address(10000), soon(0.5)).expect_err("silent");
        assert!(matches!(err, Error::Timeout { .. }), "{err:?}");
        assert_eq!(err.exit(), Exit::AgentTimeout);
        let elapsed = started.elapsed();
        assert!(
            elapsed >= Duration::from_millis(450) && elapsed < Duration::from_secs(2),
            "{elapsed:?}"
        );
    }

    #[test]
    fn a_missing_device_socket_is_unreachable() {
        let device = HybridDevice::start(Behaviour::Refuse);
        let missing = Address::hybrid_vsock(device.path.with_file_name("none.sock"), 1);
        let err = Client::connect(&missing, soon(0.3)).expect_err("missing");
        assert_eq!(err.exit(), Exit::AgentUnreachable);
        let Error::Unreachable { source, .. } = &err else {
            panic!("{err:?}")
        };
        assert!(!crate::qga::stream::is_hybrid_refusal(source), "{source:?}");
    }
}
