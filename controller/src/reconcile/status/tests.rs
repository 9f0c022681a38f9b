//! Tests of the typed status: its JSON shape, and the pure steps that build it.

use serde_json::json;

use super::*;
use crate::api::{ConditionStatus, Timestamp};

/// A Deployment status as the map-built status wrote it, every field present.
fn written_before() -> serde_json::Value {
    json!({
        "observedGeneration": 3,
        "conditions": [{
            "type": "Ready", "status": "True", "reason": "Succeeded", "message": "ok",
            "lastTransitionTime": "2026-12-01T10:00:00Z", "observedGeneration": 3
        }],
        "lastHandledReconcileAt": "7",
        "hosts": [{ "name": "op-mastodon", "phase": "Ready", "vmid": 101, "node": "pve",
                    "address": "10.0.0.5", "stepMillis": { "build": 1200 } }],
        "endpoints": { "mastodon": "https://mastodon.op.example" },
        "lastAppliedRevision": "abc",
        "lastAttemptedRevision": "abc",
        "dns": { "zone": "hosts.example", "records": [], "operatorRecords": [] },
        "backups": [{ "host": "op-mastodon", "result": "Succeeded", "bytesAdded": 1, "totalBytes": 2,
                      "files": 3, "durationMillis": 4, "failures": 0 }],
        "restore": { "hosts": [] },
        "lastHandledBackupAt": "8",
        "lastHandledRestoreAt": "9",
        "lastHandledFinalBackupAt": "10",
        "runtimeEnvironment": "lab",
        "migrationGeneration": 2,
        "migration": {
            "phase": "Succeeded", "from": "lab", "to": "lab2",
            "started": "2026-12-01T09:00:00Z", "phaseStarted": "2026-12-01T09:05:00Z",
            "finished": "2026-12-01T09:06:00Z", "bytesPreCopied": 10, "bytesFinallyCopied": 1,
            "downtimeSeconds": 4.5, "verified": true, "source": "Stopped",
            "refused": "cannot go back to lab now"
        },
        "export": {
            "final": true, "time": "2026-12-01T11:00:00Z",
            "hosts": [{ "host": "op-mastodon", "application": "mastodon", "result": "Succeeded",
                        "snapshot": "0123abcd", "servicesStopped": ["mastodon.target"] }]
        }
    })
}

#[test]
fn a_status_written_as_a_map_reads_back_typed_with_every_field_and_the_same_json() {
    let before = written_before();
    let typed: DeploymentStatus = serde_json::from_value(before.clone()).expect("it has the typed shape");
    assert_eq!(typed.runtime_environment.as_deref(), Some("lab"));
    assert_eq!(typed.migration_generation, Some(2));
    assert_eq!(
        typed.migration.as_ref().and_then(|m| m.refused.as_deref()),
        Some("cannot go back to lab now")
    );
    let export = typed.export.as_ref().expect("status.export");
    assert!(export.final_);
    assert_eq!(export.hosts[0].snapshot.as_deref(), Some("0123abcd"));
    assert_eq!(typed.last_handled_final_backup_at.as_deref(), Some("10"));
    assert_eq!(
        serde_json::to_value(&typed).unwrap(),
        before,
        "the API, the CLI and the dashboards read the same field names"
    );
}

#[test]
fn a_status_serializes_once_to_the_text_the_book_keeps() {
    let typed: DeploymentStatus = serde_json::from_value(written_before()).unwrap();
    let text = crate::store::StatusJson::from_typed(&typed);
    assert_eq!(text.parse(), written_before());
    assert_eq!(text.parse_as::<DeploymentStatus>(), Some(typed));
}

#[test]
fn an_empty_deployment_status_shows_only_its_generation_and_conditions() {
    let value = serde_json::to_value(DeploymentStatus::default()).unwrap();
    assert_eq!(value, json!({ "observedGeneration": 0, "conditions": [] }));
}

#[test]
fn deployment_facts_replace_what_was_found_and_keep_the_rest() {
    let mut status: DeploymentStatus = serde_json::from_value(written_before()).unwrap();
    let kept_migration = status.migration.clone();
    let host = HostStatus {
        name: "op-pixelfed".into(),
        phase: "Cloning".into(),
        ..HostStatus::default()
    };
    DeploymentFacts {
        hosts: Some(vec![host.clone()]),
        runtime_environment: Some("lab2".into()),
        ..DeploymentFacts::default()
    }
    .apply(&mut status);
    assert_eq!(status.hosts, [host]);
    assert_eq!(status.runtime_environment.as_deref(), Some("lab2"));
    assert_eq!(status.migration, kept_migration, "no migration found: kept");
    assert_eq!(status.migration_generation, Some(2));
    assert!(status.dns.is_some(), "no names found: kept");
    assert_eq!(status.endpoints.len(), 1);
}

#[test]
fn environment_facts_replace_every_observed_field() {
    let mut status = RuntimeEnvironmentStatus {
        version: Some("8.0".into()),
        nodes: vec!["old".into()],
        warnings: vec!["stale".into()],
        insecure: true,
        ..RuntimeEnvironmentStatus::default()
    };
    apply_environment_facts(
        &mut status,
        EnvironmentFacts {
            version: Some("9.1.3".into()),
            nodes: vec!["pve".into()],
            vms_owned: 2,
            vms_orphaned: 1,
            template_present: Some(true),
            insecure: false,
            warnings: Vec::new(),
        },
    );
    assert_eq!(
        serde_json::to_value(&status).unwrap(),
        json!({
            "observedGeneration": 0, "conditions": [], "version": "9.1.3", "nodes": ["pve"],
            "vmsOwned": 2, "vmsOrphaned": 1, "templatePresent": true
        })
    );
}

#[test]
fn the_applied_revision_moves_only_when_ready() {
    let mut status = DeploymentStatus {
        last_applied_revision: Some("old".into()),
        ..DeploymentStatus::default()
    };
    record_revision(&mut status, "new", false);
    assert_eq!(status.last_attempted_revision.as_deref(), Some("new"));
    assert_eq!(status.last_applied_revision.as_deref(), Some("old"));
    record_revision(&mut status, "new", true);
    assert_eq!(status.last_applied_revision.as_deref(), Some("new"));
}

#[test]
fn observing_a_generation_keeps_the_last_handled_request_when_none_is_pending() {
    let mut status = AnyStatus::empty(Kind::Application);
    status.observed(4, Some("12".into()));
    status.observed(5, None);
    let AnyStatus::Application(s) = &status else {
        panic!("an Application's status")
    };
    assert_eq!(
        (s.observed_generation, s.last_handled_reconcile_at.as_deref()),
        (5, Some("12"))
    );
}

#[test]
fn each_kind_keeps_its_conditions_in_its_own_status() {
    for kind in Kind::ALL {
        let mut status = AnyStatus::empty(kind);
        status.conditions_mut().push(Condition {
            type_: "Ready".into(),
            status: ConditionStatus::True,
            reason: "Succeeded".into(),
            message: String::new(),
            last_transition_time: Timestamp::from_unix(0),
            observed_generation: 1,
        });
        assert_eq!(status.conditions().len(), 1, "{kind:?}");
    }
}
