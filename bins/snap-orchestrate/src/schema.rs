//! The JSON Schemas of what crosses the process edge, generated from the types and checked
//! in beside this crate (`<name>.schema.json`; `scripts/mangen` rewrites them): the plan
//! (input), the report (output, with every step record in its `$defs`), and the VM wire
//! (`serve`'s requests and replies).

/// A document whose schema is published.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Kind {
    /// The plan (stdin of `snap-orchestrate`).
    Plan,
    /// A consistency group's plan (a plan with `vms`).
    GroupPlan,
    /// The report (stdout of `snap-orchestrate`).
    Report,
    /// A request from the guest (`snap-orchestrate serve`).
    Request,
    /// A reply to the guest.
    Reply,
}

impl Kind {
    pub const ALL: [Kind; 5] = [
        Kind::Plan,
        Kind::GroupPlan,
        Kind::Report,
        Kind::Request,
        Kind::Reply,
    ];

    /// The checked-in file's name.
    pub fn file_name(self) -> &'static str {
        match self {
            Kind::Plan => "plan.schema.json",
            Kind::GroupPlan => "group-plan.schema.json",
            Kind::Report => "report.schema.json",
            Kind::Request => "request.schema.json",
            Kind::Reply => "reply.schema.json",
        }
    }

    /// The schema, pretty-printed, with a final newline.
    pub fn text(self) -> String {
        let schema = match self {
            Kind::Plan => schemars::schema_for!(crate::Plan),
            Kind::GroupPlan => schemars::schema_for!(crate::GroupPlan),
            Kind::Report => {
                let mut generator = schemars::SchemaGenerator::default();
                evesnap::steps::add_schemas(&mut generator);
                generator.into_root_schema_for::<evesnap::report::Report>()
            }
            Kind::Request => schemars::schema_for!(evesnap::request::Request),
            Kind::Reply => schemars::schema_for!(evesnap::request::Reply),
        };
        serde_json::to_string_pretty(&schema).unwrap_or_default() + "\n"
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn checked_in_schemas_match_the_types() {
        for kind in Kind::ALL {
            let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join(kind.file_name());
            if std::env::var_os("EVESNAP_UPDATE_MAN").is_some() {
                std::fs::write(&path, kind.text()).expect("write schema");
            }
            let checked_in = std::fs::read_to_string(&path).unwrap_or_default();
            assert_eq!(
                checked_in,
                kind.text(),
                "{} is stale: run scripts/mangen",
                kind.file_name()
            );
        }
    }

    /// A step's open fields are described by the records published beside the report.
    #[test]
    fn the_report_schema_publishes_the_step_records() {
        let schema: serde_json::Value = serde_json::from_str(&Kind::Report.text()).expect("schema");
        for record in [
            "FreezeReport",
            "ThawReport",
            "SnapshotReport",
            "RollbackReport",
            "Failed",
        ] {
            assert!(
                schema["$defs"][record].is_object(),
                "{record} is not published"
            );
        }
        assert_eq!(
            schema["$defs"]["RollbackReport"]["additionalProperties"],
            false
        );
    }

    /// A report as the flow writes it parses back strictly, and validates against the
    /// checked-in schema's required fields.
    #[test]
    fn a_report_round_trips_strictly() {
        let report = evesnap::report::Report::new(
            uuid::Uuid::new_v4(),
            evesnap::report::SnapshotType::AppUpdate,
            evesnap::report::Action::Create,
            "unix:/a",
            &["p/a".to_string()],
            "s",
        );
        let text = serde_json::to_string(&report).expect("json");
        let back: evesnap::report::Report = serde_json::from_str(&text).expect("strict");
        assert_eq!(back, report);
        let schema: serde_json::Value = serde_json::from_str(&Kind::Report.text()).expect("schema");
        let value: serde_json::Value = serde_json::from_str(&text).expect("value");
        for field in schema["required"].as_array().expect("required") {
            let field = field.as_str().expect("name");
            assert!(value.get(field).is_some(), "{field} missing from {text}");
        }
    }
}
