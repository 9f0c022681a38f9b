//! The demo's progress lines: what changed between two looks at the daemon's objects and hosts.

use std::collections::{BTreeMap, BTreeSet};

use serde_json::Value;

use crate::cli::output;

/// The longest message shown on a progress line.
const MESSAGE_CHARS: usize = 110;

/// The reason of the events that report the steps of a running reconcile.
const STEP_REASON: &str = "Progressing";

/// Remembers what was last shown of each object and host, and which step events were shown.
#[derive(Debug, Default)]
pub struct Progress {
    shown: BTreeMap<String, String>,
    steps: BTreeSet<String>,
}

/// `Kind/name` of an object in the API's JSON.
pub fn object_name(object: &Value) -> String {
    format!(
        "{}/{}",
        object["kind"].as_str().unwrap_or("?"),
        object["metadata"]["name"].as_str().unwrap_or("?")
    )
}

/// Whether the object's Ready condition is True for its current generation.
pub fn is_ready(object: &Value) -> bool {
    let ready = output::condition(object, "Ready").is_some_and(|c| c["status"] == "True");
    let generation = object["metadata"]["generation"].as_u64();
    ready && generation.is_some() && object["status"]["observedGeneration"].as_u64() == generation
}

/// The names of the objects that are not Ready, with their reason.
pub fn not_ready(objects: &[Value]) -> Vec<String> {
    objects
        .iter()
        .filter(|o| !is_ready(o))
        .map(|o| {
            let reason = output::condition(o, "Ready")
                .and_then(|c| c["reason"].as_str())
                .unwrap_or("not reconciled yet");
            format!("{} ({reason})", object_name(o))
        })
        .collect()
}

fn shorten(text: &str) -> String {
    let line = text.lines().next().unwrap_or("");
    if line.chars().count() <= MESSAGE_CHARS {
        line.to_owned()
    } else {
        let cut: String = line.chars().take(MESSAGE_CHARS - 1).collect();
        format!("{cut}…")
    }
}

fn object_state(object: &Value) -> String {
    let Some(ready) = output::condition(object, "Ready") else {
        return "Pending            not reconciled yet".to_owned();
    };
    let word = if is_ready(object) {
        "Ready"
    } else {
        ready["reason"].as_str().unwrap_or("Unknown")
    };
    // While a reconcile runs, its current step says more than the last outcome.
    let reconciling = output::condition(object, "Reconciling").filter(|c| c["status"] == "True");
    let message = reconciling.unwrap_or(ready)["message"].as_str().unwrap_or("");
    format!("{word:<18} {}", shorten(message))
}

fn host_state(host: &Value) -> String {
    let phase = host["phase"].as_str().unwrap_or("Pending");
    let mut place = Vec::new();
    if let Some(vmid) = host["vmid"].as_u64() {
        place.push(format!("VM {vmid}"));
    }
    if let Some(node) = host["node"].as_str() {
        place.push(format!("on {node}"));
    }
    if let Some(address) = host["address"].as_str() {
        place.push(format!("at {address}"));
    }
    // A Ready host's message repeats its system's store path; its generation says enough.
    let message = match host["generation"].as_u64() {
        Some(generation) if phase == "Ready" => format!("NixOS generation {generation}"),
        _ => host["message"].as_str().map(shorten).unwrap_or_default(),
    };
    let mut text = format!("{phase:<18}");
    if !place.is_empty() {
        text.push(' ');
        text.push_str(&place.join(" "));
    }
    if !message.is_empty() {
        text.push_str(if place.is_empty() { " " } else { ": " });
        text.push_str(&message);
    }
    text
}

impl Progress {
    /// One line for every step event not shown yet, and for every object or host whose state changed
    /// since the last look. Steps come from events, so that concurrent steps of one object all show.
    pub fn update(&mut self, objects: &[Value], hosts: &[Value], events: &[Value]) -> Vec<String> {
        let mut lines = Vec::new();
        for event in events.iter().filter(|e| e["reason"] == STEP_REASON) {
            let id = event.to_string();
            if self.steps.insert(id) {
                let object = format!(
                    "{}/{}",
                    event["object"]["kind"].as_str().unwrap_or("?"),
                    event["object"]["name"].as_str().unwrap_or("?")
                );
                let message = shorten(event["message"].as_str().unwrap_or(""));
                lines.push(format!("{object:<36} {STEP_REASON:<18} {message}"));
            }
        }
        let entries = objects
            .iter()
            .map(|o| (object_name(o), object_state(o)))
            .chain(hosts.iter().map(|h| {
                (
                    format!("host {}", h["name"].as_str().unwrap_or("?")),
                    host_state(h),
                )
            }));
        for (name, state) in entries {
            if self.shown.get(&name) != Some(&state) {
                // A running reconcile's steps were shown from its events.
                if !state.starts_with(STEP_REASON) {
                    lines.push(format!("{name:<36} {state}"));
                }
                self.shown.insert(name, state);
            }
        }
        lines
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn deployment(status: &str, reason: &str, observed: u64) -> Value {
        json!({
            "kind": "Deployment",
            "metadata": { "name": "open-archief", "generation": 2 },
            "status": {
                "observedGeneration": observed,
                "conditions": [{ "type": "Ready", "status": status, "reason": reason, "message": "2 VMs: cloning" }]
            }
        })
    }

    #[test]
    fn a_change_is_shown_once_and_an_unchanged_object_not_again() {
        let mut progress = Progress::default();
        let first = progress.update(&[deployment("False", "DependencyNotReady", 2)], &[], &[]);
        assert_eq!(first.len(), 1);
        assert!(first[0].starts_with("Deployment/open-archief"), "{first:?}");
        assert!(first[0].contains("DependencyNotReady") && first[0].contains("2 VMs: cloning"));
        assert!(
            progress
                .update(&[deployment("False", "DependencyNotReady", 2)], &[], &[])
                .is_empty()
        );
        let ready = progress.update(&[deployment("True", "Succeeded", 2)], &[], &[]);
        assert!(ready[0].contains("Ready"), "{ready:?}");
    }

    #[test]
    fn every_step_event_is_shown_once_even_when_steps_of_one_object_run_at_once() {
        let step = |host: &str| {
            json!({ "type": "Normal", "reason": "Progressing", "time": "2026-11-26T10:00:00Z",
                "message": format!("{host}: building its NixOS system"),
                "object": { "kind": "Deployment", "name": "open-archief" } })
        };
        let other = json!({ "type": "Normal", "reason": "Succeeded", "time": "2026-11-26T10:00:00Z",
            "message": "done", "object": { "kind": "Deployment", "name": "open-archief" } });
        let mut progress = Progress::default();
        let events = [step("open-archief-matrix"), step("open-archief-peertube"), other];
        let lines = progress.update(&[deployment("False", "Progressing", 2)], &[], &events);
        assert_eq!(lines.len(), 2, "{lines:?}");
        assert!(
            lines[0].contains("open-archief-matrix: building")
                && lines[1].contains("open-archief-peertube: building")
        );
        assert!(
            progress
                .update(&[deployment("False", "Progressing", 2)], &[], &events)
                .is_empty()
        );
    }

    #[test]
    fn ready_for_an_older_generation_is_not_ready() {
        assert!(is_ready(&deployment("True", "Succeeded", 2)));
        assert!(!is_ready(&deployment("True", "Succeeded", 1)));
        assert_eq!(
            not_ready(&[deployment("True", "Succeeded", 1)]),
            vec!["Deployment/open-archief (Succeeded)".to_owned()]
        );
    }

    #[test]
    fn a_host_line_says_where_the_host_runs() {
        let mut progress = Progress::default();
        let host = json!({ "name": "open-archief-matrix", "phase": "Ready", "vmid": 20001, "node": "pve",
            "address": "10.80.0.2", "generation": 1, "message": "runs /nix/store/abc-nixos-system (generation 1)" });
        let lines = progress.update(&[], &[host], &[]);
        assert_eq!(lines.len(), 1);
        assert!(
            lines[0].contains("Ready")
                && lines[0].contains("VM 20001 on pve at 10.80.0.2: NixOS generation 1"),
            "{lines:?}"
        );
    }

    #[test]
    fn long_messages_are_cut_to_one_short_line() {
        let long = "x".repeat(500) + "\nsecond line";
        let short = shorten(&long);
        assert_eq!(short.chars().count(), MESSAGE_CHARS);
        assert!(short.ends_with('…') && !short.contains("second"));
    }
}
