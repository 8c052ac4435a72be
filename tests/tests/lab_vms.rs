//! The lab's VMs (`EVESNAP_LAB_VMS`, two for the test lab): each one runs, with its own
//! agent, QMP socket, request channel and datasets, and its guest mounts its own disks.

use std::collections::BTreeSet;
use std::time::Duration;

use evesnap_tests::guest::{connect, guest_sh};
use evesnap_tests::lab::{test_lab, vm_lock};

#[test]
fn every_lab_vm_has_its_own_agent_qmp_channel_and_datasets() {
    let lab = test_lab();
    let _vm = vm_lock();
    assert!(lab.vms.len() >= 2, "the test lab boots 2 VMs: {lab:?}");
    assert_eq!(lab.vms[0].agent, lab.agent, "VM 0 is the top-level one");
    assert_eq!(lab.vms[0].datasets, lab.datasets);
    let mut seen = BTreeSet::new();
    for (i, vm) in lab.vms.iter().enumerate() {
        let name = format!("vm{i}");
        assert_eq!(vm.name.as_deref(), Some(name.as_str()));
        for unique in [
            vm.agent.clone(),
            vm.qmp.display().to_string(),
            vm.request_channel.display().to_string(),
        ] {
            assert!(seen.insert(unique.clone()), "{unique} is shared");
        }
        for dataset in &vm.datasets {
            assert!(
                dataset.starts_with(&format!("{}/lab/{name}/", lab.pool)),
                "{dataset} is not {name}'s"
            );
            assert!(seen.insert(dataset.clone()), "{dataset} is shared");
        }
        let mut qmp = evesnap::qmp::Qmp::connect(&vm.qmp, Duration::from_secs(5))
            .expect("the VM's QMP connects");
        assert!(qmp.status().expect("query-status").running);
        // Its guest has its own disks mounted where the lab object says.
        let mounts = guest_sh(&mut connect(vm), "cat /proc/mounts");
        for mountpoint in vm.guest_mounts.values() {
            assert!(
                mounts.contains(&format!(" {mountpoint} ext4 ")),
                "{name}: {mountpoint} not mounted:\n{mounts}"
            );
        }
    }
}
