//! A fake QMP socket: greets, accepts `qmp_capabilities`, and answers each command from a
//! table (`qom-get` by `<path> <property>`), as the lab's QEMU 7.2 answered them
//! (docs/lab.md#eves-vm-shape). Serves connections until the test process ends.

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixListener;
use std::path::PathBuf;

use serde_json::{json, Value};

use crate::support::unique;

/// The lab VM in EVE's shape: `virtio-disk0` behind root port `pci.8` (the guest numbered
/// its bus 1) reading DS0's zvol, `scsi-disk1` (WWN 0x5001405e7a5b0001) on HBA `scsi1`
/// behind `pci.9` (bus 2) reading DS1's.
pub fn eve_shaped() -> Value {
    json!({
        "query-pci": [{"bus": 0, "devices": [
            {"bus": 0, "qdev_id": "vser0", "slot": 1, "function": 0},
            {"bus": 0, "qdev_id": "pci.8", "slot": 8, "function": 0, "pci_bridge": {
                "bus": {"number": 0, "secondary": 1, "subordinate": 1},
                "devices": [{"bus": 1, "qdev_id": "virtio-disk0", "slot": 0, "function": 0}]}},
            {"bus": 0, "qdev_id": "pci.9", "slot": 9, "function": 0, "pci_bridge": {
                "bus": {"number": 0, "secondary": 2, "subordinate": 2},
                "devices": [{"bus": 2, "qdev_id": "scsi1", "slot": 0, "function": 0}]}}]}],
        "query-block": [
            {"device": "", "qdev": "/machine/peripheral/virtio-disk0/virtio-backend",
             "inserted": {"file": "/dev/zvol/tank/vm0/disk0"}},
            {"device": "", "qdev": "scsi-disk1", "inserted": {"file": "/dev/zvol/tank/vm0/disk1"}}],
        "qom-list": [{"name": "type", "type": "string"},
                     {"name": "scsi-disk1", "type": "child<scsi-hd>"},
                     {"name": "virtio-disk0", "type": "child<virtio-blk-pci>"}],
        "qom-get": {
            "/machine/peripheral/scsi-disk1 parent_bus": "/machine/peripheral/scsi1/virtio-backend/scsi1.0",
            "/machine/peripheral/scsi-disk1 channel": 0,
            "/machine/peripheral/scsi-disk1 scsi-id": 0,
            "/machine/peripheral/scsi-disk1 lun": 0,
            "/machine/peripheral/scsi-disk1 wwn": 5764959772534833153u64},
        "query-status": {"running": true, "singlestep": false, "status": "running"},
    })
}

/// Starts a fake QMP socket answering from `table`; its path.
pub fn fake_qmp(table: Value) -> PathBuf {
    let dir = unique("qmp");
    std::fs::create_dir_all(&dir).expect("qmp folder");
    let path = dir.join("qmp.sock");
    let listener = UnixListener::bind(&path).expect("bind the fake QMP socket");
    std::thread::spawn(move || {
        for stream in listener.incoming() {
            let Ok(stream) = stream else { return };
            let table = table.clone();
            std::thread::spawn(move || serve(stream, &table));
        }
    });
    path
}

fn serve(stream: std::os::unix::net::UnixStream, table: &Value) {
    let mut writer = stream.try_clone().expect("clone");
    let greeting = json!({"QMP": {"version": {"qemu": {"major": 7, "minor": 2, "micro": 0}}, "capabilities": []}});
    if writeln!(writer, "{greeting}").is_err() {
        return;
    }
    for line in BufReader::new(stream).lines() {
        let Ok(line) = line else { return };
        let Ok(request) = serde_json::from_str::<Value>(&line) else {
            return;
        };
        let command = request["execute"].as_str().unwrap_or_default();
        let answer = match command {
            "qmp_capabilities" => Some(json!({})),
            "qom-get" => {
                let key = format!(
                    "{} {}",
                    request["arguments"]["path"].as_str().unwrap_or_default(),
                    request["arguments"]["property"]
                        .as_str()
                        .unwrap_or_default()
                );
                table["qom-get"].get(&key).cloned()
            }
            other => table.get(other).cloned(),
        };
        let mut reply = match answer {
            Some(value) => json!({"return": value}),
            None => {
                json!({"error": {"class": "GenericError", "desc": format!("fake QMP: no {command}")}})
            }
        };
        if let Some(id) = request.get("id") {
            reply["id"] = id.clone();
        }
        if writeln!(writer, "{reply}").is_err() {
            return;
        }
    }
}
