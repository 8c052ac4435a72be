//! A consistency group's plan: several VMs snapshotted at one point in time (schema in
//! `group-plan.schema.json`). A plan with a `vms` field is a group plan; without it, the
//! single-VM [`Plan`] as before.
//!
//! Each VM is checked as the single-VM plan it becomes ([`GroupPlan::member`]), so a VM's
//! fields mean exactly what they mean there. The group's volumes must sit in one pool:
//! only there is one `zfs snapshot` one transaction group.

use std::collections::{BTreeMap, BTreeSet};

use serde::{Deserialize, Serialize};

use crate::plan::{Action, Error, FreezePlan, GuestCommand, GuestDisk, Plan, SnapshotType};

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct GroupPlan {
    pub version: u32,
    /// Snapshot id from the controller; generated when absent.
    #[serde(default)]
    pub id: Option<uuid::Uuid>,
    #[serde(default, rename = "type")]
    pub kind: SnapshotType,
    /// Only `create`: roll each VM back with its own plan.
    #[serde(default)]
    pub action: Action,
    /// Snapshot name, the same on every volume of every VM; default `evesnap-<id>`.
    #[serde(default)]
    pub snapshot: Option<String>,
    #[serde(default)]
    pub freeze: GroupFreeze,
    /// Retention after the create, per dataset (as in the single-VM plan).
    #[serde(default)]
    pub max_snapshots: Option<u32>,
    /// Seconds to wait for each VM's lock while another operation holds it.
    #[serde(default)]
    pub lock_wait_s: f64,
    /// The VMs, frozen in parallel around one atomic snapshot of all their volumes.
    pub vms: Vec<GroupVm>,
}

/// What every VM's freeze shares.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields, default)]
pub struct GroupFreeze {
    /// Deadline of each agent call, in seconds.
    pub timeout_s: f64,
    /// Each VM's auto-thaw watchdog deadline, in seconds (0 = off).
    pub thaw_after_s: f64,
}

impl Default for GroupFreeze {
    fn default() -> Self {
        let single = FreezePlan::default();
        GroupFreeze {
            timeout_s: single.timeout_s,
            thaw_after_s: single.thaw_after_s,
        }
    }
}

/// One VM of the group.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct GroupVm {
    /// Guest agent address: `unix:<path>`, a plain path, or `vsock:<cid>:<port>`.
    pub agent: String,
    #[serde(default)]
    pub qmp: Option<String>,
    /// The VM's volumes.
    pub datasets: Vec<String>,
    /// Mountpoints to freeze; empty means every filesystem of the guest.
    #[serde(default)]
    pub mountpoints: Vec<String>,
    #[serde(default)]
    pub guest_pre: Vec<GuestCommand>,
    #[serde(default)]
    pub guest_post: Vec<GuestCommand>,
    /// True (default): this VM's failure (agent, guest_pre, freeze, verification) fails
    /// the group. False: the group goes on and this VM's volumes are `crash`-consistent.
    #[serde(default = "default_true")]
    pub required: bool,
    #[serde(default)]
    pub disks: BTreeMap<String, GuestDisk>,
}

fn default_true() -> bool {
    true
}

impl GroupPlan {
    /// Parses and checks a group plan; fills in the id.
    pub fn from_json(text: &str) -> Result<GroupPlan, Error> {
        let mut plan: GroupPlan = serde_json::from_str(text).map_err(Error::Parse)?;
        if plan.version != crate::plan::VERSION {
            return Err(Error::Version(plan.version));
        }
        plan.id.get_or_insert_with(uuid::Uuid::new_v4);
        plan.check()?;
        Ok(plan)
    }

    /// The rules the types cannot say: every VM is a valid single-VM plan, no VM or
    /// volume twice, one pool.
    pub fn check(&self) -> Result<(), Error> {
        let invalid = |m: String| Err(Error::Invalid(m));
        if self.vms.is_empty() {
            return invalid("`vms` is empty: name at least one VM".into());
        }
        if self.action != Action::Create {
            return invalid(
                "a group plan can only `create`: roll each VM back with its own plan".into(),
            );
        }
        let mut agents = BTreeSet::new();
        let mut datasets = BTreeSet::new();
        for (i, vm) in self.vms.iter().enumerate() {
            let member = self.member(i);
            member
                .check()
                .map_err(|e| Error::Invalid(format!("`vms[{i}]`: {}", reason(&e))))?;
            let address = vm
                .agent
                .parse::<evesnap::qga::Address>()
                .map_err(|e| Error::Invalid(format!("`vms[{i}].agent`: {e}")))?;
            if !agents.insert(address.to_string()) {
                return invalid(format!("`vms[{i}].agent`: {address} names a VM twice"));
            }
            for d in &vm.datasets {
                if !datasets.insert(d.clone()) {
                    return invalid(format!("`vms[{i}].datasets`: `{d}` is in the group twice"));
                }
            }
        }
        let pools: BTreeSet<&str> = datasets.iter().map(|d| evesnap::zfs::pool_of(d)).collect();
        if pools.len() > 1 {
            let pools: Vec<&str> = pools.into_iter().collect();
            return invalid(format!(
                "the group's volumes are in several pools ({}): one atomic snapshot needs one pool",
                pools.join(", ")
            ));
        }
        Ok(())
    }

    pub fn id(&self) -> uuid::Uuid {
        self.id.unwrap_or_default()
    }

    /// Every VM's datasets, in the plan's order.
    pub fn datasets(&self) -> Vec<String> {
        self.vms.iter().flat_map(|vm| vm.datasets.clone()).collect()
    }

    /// VM `i` as the single-VM plan the flow's per-VM steps run with.
    pub fn member(&self, i: usize) -> Plan {
        let vm = &self.vms[i];
        Plan {
            version: self.version,
            id: self.id,
            kind: self.kind,
            config_id: None,
            config_version: None,
            app: None,
            app_name: None,
            action: Action::Create,
            agent: vm.agent.clone(),
            qmp: vm.qmp.clone(),
            datasets: vm.datasets.clone(),
            volumes: Vec::new(),
            volume_root: None,
            retention: None,
            shutdown_clean: false,
            snapshot: self.snapshot.clone(),
            freeze: FreezePlan {
                mountpoints: vm.mountpoints.clone(),
                timeout_s: self.freeze.timeout_s,
                thaw_after_s: self.freeze.thaw_after_s,
                required: vm.required,
                ..FreezePlan::default()
            },
            guest_pre: vm.guest_pre.clone(),
            guest_post: vm.guest_post.clone(),
            max_snapshots: self.max_snapshots,
            origin: evesnap::report::Origin::Controller,
            lock_wait_s: self.lock_wait_s,
            application_quiesced: false,
            quiesced_until: None,
            rollback: None,
            disks: vm.disks.clone(),
        }
    }
}

/// The message of a member's refusal without its "the plan is not valid" prefix.
fn reason(error: &Error) -> String {
    match error {
        Error::Invalid(why) => why.clone(),
        other => other.to_string(),
    }
}

/// A plan of either kind, told apart by the `vms` field.
#[derive(Debug, Clone, PartialEq)]
pub enum AnyPlan {
    Single(Box<Plan>),
    Group(GroupPlan),
}

impl AnyPlan {
    pub fn from_json(text: &str) -> Result<AnyPlan, Error> {
        let is_group = serde_json::from_str::<serde_json::Map<String, serde_json::Value>>(text)
            .is_ok_and(|object| object.contains_key("vms"));
        if is_group {
            GroupPlan::from_json(text).map(AnyPlan::Group)
        } else {
            Plan::from_json(text).map(|plan| AnyPlan::Single(Box::new(plan)))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn group(vms: &str) -> String {
        format!(r#"{{"version":1,"vms":[{vms}]}}"#)
    }

    #[test]
    fn a_plan_with_vms_is_a_group() {
        let text = group(
            r#"{"agent":"unix:/a","datasets":["p/vm0/d0"]},
               {"agent":"unix:/b","datasets":["p/vm1/d0"],"required":false}"#,
        );
        let AnyPlan::Group(plan) = AnyPlan::from_json(&text).expect("valid") else {
            panic!("not a group");
        };
        assert_eq!(plan.datasets(), ["p/vm0/d0", "p/vm1/d0"]);
        assert!(plan.member(0).freeze.required && !plan.member(1).freeze.required);
        assert_eq!(
            plan.member(1).snapshot_name(),
            plan.member(0).snapshot_name()
        );
        let single = r#"{"version":1,"agent":"unix:/a","datasets":["p/a"]}"#;
        assert!(matches!(AnyPlan::from_json(single), Ok(AnyPlan::Single(_))));
    }

    #[test]
    fn wrong_groups_are_refused_by_name() {
        for (vms, needle) in [
            ("", "`vms` is empty"),
            (
                r#"{"agent":"unix:/a","datasets":["p/a"]},{"agent":"/a","datasets":["p/b"]}"#,
                "names a VM twice",
            ),
            (
                r#"{"agent":"unix:/a","datasets":["p/a"]},{"agent":"unix:/b","datasets":["p/a"]}"#,
                "twice",
            ),
            (
                r#"{"agent":"unix:/a","datasets":["p/a"]},{"agent":"unix:/b","datasets":["q/a"]}"#,
                "several pools (p, q)",
            ),
            (
                r#"{"agent":"unix:/a","datasets":[]}"#,
                "`vms[0]`: `datasets`",
            ),
            (
                r#"{"agent":"unix:/a","datasets":["p/a"],"guest_pre":[{"path":"x"}]}"#,
                "`vms[0]`",
            ),
        ] {
            let err = GroupPlan::from_json(&group(vms)).unwrap_err().to_string();
            assert!(err.contains(needle), "{vms}: {err}");
        }
        let err = GroupPlan::from_json(
            r#"{"version":1,"vms":[{"agent":"unix:/a","datasets":["p/a"],"agnet":1}]}"#,
        )
        .unwrap_err();
        assert!(std::error::Error::source(&err)
            .expect("cause")
            .to_string()
            .contains("agnet"));
        let err = GroupPlan::from_json(
            r#"{"version":1,"action":"rollback","vms":[{"agent":"unix:/a","datasets":["p/a"]}]}"#,
        )
        .unwrap_err()
        .to_string();
        assert!(err.contains("only `create`"), "{err}");
    }
}
