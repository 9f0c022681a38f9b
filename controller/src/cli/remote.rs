//! The subcommands that talk to a running daemon: `get`, `describe`, `events`, `reconcile`.

use std::time::Duration;

use serde_json::Value;

use super::client::{Client, ClientError};
use super::output::{self, Format};
use crate::api::{Kind, Timestamp};

/// What `get` and friends accept as a kind: the three kinds, or hosts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Target {
    /// One of the three kinds.
    Kind(Kind),
    /// The hosts planned by Deployments.
    Hosts,
    /// The sources of desired state.
    Sources,
    /// The last backup of each host (`get backups [DEPLOYMENT]`).
    Backups,
}

impl std::str::FromStr for Target {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        match s.to_ascii_lowercase().as_str() {
            "host" | "hosts" => return Ok(Target::Hosts),
            "source" | "sources" | "src" => return Ok(Target::Sources),
            "backup" | "backups" => return Ok(Target::Backups),
            _ => {}
        }
        s.parse()
            .map(Target::Kind)
            .map_err(|e: String| format!("{e}, hosts, sources or backups"))
    }
}

impl Target {
    fn path(self) -> &'static str {
        match self {
            Target::Kind(kind) => kind.plural(),
            Target::Hosts => "hosts",
            Target::Sources => "sources",
            Target::Backups => "backups",
        }
    }
}

fn cell(value: &Value) -> String {
    match value {
        Value::Null => "-".into(),
        Value::String(s) if s.is_empty() => "-".into(),
        Value::String(s) => s.clone(),
        other => other.to_string(),
    }
}

/// The table of hosts' backups (`status.backups` entries with their Deployment).
pub fn backups_table(items: &[Value]) -> String {
    if items.is_empty() {
        return "No backups found.\n".into();
    }
    let (header, rows) = rows(Target::Backups, items);
    output::table(&header, &rows)
}

/// Bytes as `12.3 MiB`.
fn output_bytes(n: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut value = n as f64;
    let mut unit = 0;
    while value >= 1024.0 && unit < UNITS.len() - 1 {
        value /= 1024.0;
        unit += 1;
    }
    if unit == 0 {
        format!("{n} B")
    } else {
        format!("{value:.1} {}", UNITS[unit])
    }
}

fn rows(target: Target, items: &[Value]) -> (Vec<&'static str>, Vec<Vec<String>>) {
    let now = Timestamp::now();
    let ready = |o: &Value| output::condition(o, "Ready").map_or("Unknown".into(), |c| cell(&c["status"]));
    let reason = |o: &Value| output::condition(o, "Ready").map_or("-".into(), |c| cell(&c["reason"]));
    let age = |o: &Value| output::age(o["metadata"]["creationTimestamp"].as_str(), now);
    let name = |o: &Value| cell(&o["metadata"]["name"]);
    match target {
        Target::Kind(Kind::Deployment) => (
            vec![
                "NAME",
                "READY",
                "REASON",
                "DOMAIN",
                "ENVIRONMENT",
                "HOSTS",
                "SUSPENDED",
                "AGE",
            ],
            items
                .iter()
                .map(|o| {
                    let hosts = o["status"]["hosts"].as_array().map_or(0, Vec::len);
                    let suspended = o["spec"]["suspend"].as_bool().unwrap_or(false);
                    vec![
                        name(o),
                        ready(o),
                        reason(o),
                        cell(&o["spec"]["domain"]),
                        cell(&o["spec"]["runtimeEnvironment"]),
                        hosts.to_string(),
                        suspended.to_string(),
                        age(o),
                    ]
                })
                .collect(),
        ),
        Target::Kind(Kind::RuntimeEnvironment) => (
            vec!["NAME", "READY", "REASON", "BACKEND", "ENDPOINT", "AGE"],
            items
                .iter()
                .map(|o| {
                    let (backend, endpoint) = if o["spec"]["proxmox"].is_object() {
                        ("proxmox".to_owned(), cell(&o["spec"]["proxmox"]["endpoint"]))
                    } else {
                        (
                            "static".to_owned(),
                            format!(
                                "{} host(s)",
                                o["spec"]["staticHosts"].as_array().map_or(0, Vec::len)
                            ),
                        )
                    };
                    vec![name(o), ready(o), reason(o), backend, endpoint, age(o)]
                })
                .collect(),
        ),
        Target::Kind(Kind::Application) => (
            vec!["NAME", "READY", "DISPLAY NAME", "SIZES", "AGE"],
            items
                .iter()
                .map(|o| {
                    let sizes = o["spec"]["sizes"]
                        .as_object()
                        .map(|s| s.keys().cloned().collect::<Vec<_>>().join(","))
                        .unwrap_or_default();
                    vec![name(o), ready(o), cell(&o["spec"]["displayName"]), sizes, age(o)]
                })
                .collect(),
        ),
        Target::Sources => (Vec::new(), Vec::new()),
        Target::Backups => (
            vec![
                "HOST",
                "DEPLOYMENT",
                "RESULT",
                "SNAPSHOT",
                "TIME",
                "ADDED",
                "TOTAL",
                "FILES",
                "SECONDS",
                "MESSAGE",
            ],
            items
                .iter()
                .map(|b| {
                    let bytes = |v: &Value| v.as_u64().map_or("-".into(), output_bytes);
                    vec![
                        cell(&b["host"]),
                        cell(&b["deployment"]),
                        cell(&b["result"]),
                        cell(&b["snapshot"]),
                        cell(&b["time"]),
                        bytes(&b["bytesAdded"]),
                        bytes(&b["totalBytes"]),
                        cell(&b["files"]),
                        b["durationMillis"]
                            .as_u64()
                            .map_or("-".into(), |ms| format!("{:.1}", ms as f64 / 1000.0)),
                        cell(&b["message"]),
                    ]
                })
                .collect(),
        ),
        Target::Hosts => (
            vec![
                "NAME",
                "DEPLOYMENT",
                "PHASE",
                "VMID",
                "NODE",
                "ADDRESS",
                "DNS NAME",
            ],
            items
                .iter()
                .map(|h| {
                    vec![
                        cell(&h["name"]),
                        cell(&h["deployment"]),
                        cell(&h["phase"]),
                        cell(&h["vmid"]),
                        cell(&h["node"]),
                        cell(&h["address"]),
                        cell(&h["dnsName"]),
                    ]
                })
                .collect(),
        ),
    }
}

/// `fediversity get KIND [NAME]`.
pub async fn get(
    client: &Client,
    target: Target,
    name: Option<&str>,
    format: Format,
) -> Result<String, ClientError> {
    let value = match name {
        Some(name) => client.get(&format!("{}/{name}", target.path())).await?,
        None => client.get(target.path()).await?,
    };
    Ok(match format {
        Format::Json => format!("{}\n", serde_json::to_string_pretty(&value).unwrap_or_default()),
        Format::Yaml => output::yaml(&value),
        Format::Table => {
            let items = match name {
                // The backups of one Deployment are a list too.
                Some(_) if target == Target::Backups => {
                    value["items"].as_array().cloned().unwrap_or_default()
                }
                Some(_) => vec![value],
                None => value["items"].as_array().cloned().unwrap_or_default(),
            };
            if target == Target::Sources {
                return Ok(super::write::sources_table(
                    &serde_json::json!({ "items": items }),
                ));
            }
            if items.is_empty() {
                return Ok(format!("No {} found.\n", target.path()));
            }
            let (header, rows) = rows(target, &items);
            output::table(&header, &rows)
        }
    })
}

/// `fediversity describe KIND NAME`.
pub async fn describe(client: &Client, kind: Kind, name: &str) -> Result<String, ClientError> {
    let object = client.get(&format!("{}/{name}", kind.plural())).await?;
    let events = client
        .get(&format!("events?kind={}&name={name}", kind.as_str()))
        .await?;
    let mut out = String::new();
    let meta = &object["metadata"];
    out.push_str(&format!(
        "Name:         {}\nKind:         {}\n",
        cell(&meta["name"]),
        kind
    ));
    out.push_str(&format!(
        "Generation:   {} (observed {})\n",
        cell(&meta["generation"]),
        cell(&object["status"]["observedGeneration"])
    ));
    out.push_str(&format!("Created:      {}\n", cell(&meta["creationTimestamp"])));
    if let Some(source) = meta["annotations"][crate::http::view::SOURCE_ANNOTATION].as_str() {
        out.push_str(&format!("Source:       {source}\n"));
    }
    for (label, field) in [
        ("Applied:      ", "lastAppliedRevision"),
        ("Attempted:    ", "lastAttemptedRevision"),
    ] {
        if let Some(revision) = object["status"][field].as_str() {
            out.push_str(&format!("{label}{revision}\n"));
        }
    }
    out.push_str("Spec:\n");
    for line in output::yaml(&object["spec"]).lines() {
        out.push_str(&format!("  {line}\n"));
    }
    out.push_str("Conditions:\n");
    let conditions = object["status"]["conditions"]
        .as_array()
        .cloned()
        .unwrap_or_default();
    if conditions.is_empty() {
        out.push_str("  <none yet>\n");
    } else {
        let rows: Vec<Vec<String>> = conditions
            .iter()
            .map(|c| {
                vec![
                    cell(&c["type"]),
                    cell(&c["status"]),
                    cell(&c["reason"]),
                    cell(&c["lastTransitionTime"]),
                    cell(&c["message"]),
                ]
            })
            .collect();
        for line in output::table(&["TYPE", "STATUS", "REASON", "SINCE", "MESSAGE"], &rows).lines() {
            out.push_str(&format!("  {line}\n"));
        }
    }
    if let Some(hosts) = object["status"]["hosts"].as_array() {
        out.push_str("Hosts:\n");
        let rows: Vec<Vec<String>> = hosts
            .iter()
            .map(|h| {
                vec![
                    cell(&h["name"]),
                    cell(&h["phase"]),
                    cell(&h["vmid"]),
                    cell(&h["node"]),
                    cell(&h["address"]),
                ]
            })
            .collect();
        for line in output::table(&["NAME", "PHASE", "VMID", "NODE", "ADDRESS"], &rows).lines() {
            out.push_str(&format!("  {line}\n"));
        }
    }
    if let Some(records) = object["status"]["dns"]["operatorRecords"].as_array()
        && !records.is_empty()
    {
        out.push_str("Set at your domain:\n");
        for r in records {
            let apex = r["atApex"]
                .as_array()
                .map(|a| a.iter().map(cell).collect::<Vec<_>>().join(", "))
                .unwrap_or_default();
            out.push_str(&format!(
                "  {} {} {}   (at a zone apex: {apex})\n",
                cell(&r["name"]),
                cell(&r["type"]),
                cell(&r["value"])
            ));
        }
    }
    out.push_str(&migration_lines(&object["status"]["migration"]));
    out.push_str("Events:\n");
    out.push_str(&indent(&events_table(&events, false)));
    Ok(out)
}

/// The phases a live migration walks, in order (one from the last backups skips the three marked).
const MIGRATION_STEPS: [&str; 8] = [
    "Provisioning",
    "PreCopying",
    "StoppingSource",
    "FinalCopying",
    "Verifying",
    "StartingTarget",
    "SwitchingNames",
    "RetiringSource",
];

/// `describe`'s Migration section from `status.migration` (nothing when there is none): where it
/// stands and how far, bytes, downtime, verification, the source, and why it failed or retries.
pub fn migration_lines(m: &Value) -> String {
    if !m.is_object() {
        return String::new();
    }
    let phase = m["phase"].as_str().unwrap_or("-");
    let mb = |v: &Value| format!("{:.1} MB", v.as_u64().unwrap_or(0) as f64 / 1e6);
    let progress = match MIGRATION_STEPS.iter().position(|p| *p == phase) {
        Some(i) => format!("step {} of {}", i + 1, MIGRATION_STEPS.len()),
        None => "done".to_owned(),
    };
    let mut out = format!(
        "Migration:\n  {} -> {}: {phase} ({progress}, since {})\n",
        cell(&m["from"]),
        cell(&m["to"]),
        cell(&m["phaseStarted"])
    );
    out.push_str(&format!(
        "  Copied:     {} before the stop, {} after it\n",
        mb(&m["bytesPreCopied"]),
        mb(&m["bytesFinallyCopied"])
    ));
    if let Some(seconds) = m["downtimeSeconds"].as_f64() {
        let ongoing = if m["finished"].is_null() && phase != "RetiringSource" {
            " so far"
        } else {
            ""
        };
        out.push_str(&format!("  Downtime:   {seconds:.1} s{ongoing}\n"));
    }
    out.push_str(&format!(
        "  Verified:   {}\n",
        if m["verified"] == true { "yes" } else { "not yet" }
    ));
    let mut source = cell(&m["source"]);
    if let Some(after) = m["sourceDestroyedAfter"].as_str() {
        source.push_str(&format!(" (destroyed after {after})"));
    }
    out.push_str(&format!("  Source:     {source}\n"));
    if let Some(snapshots) = m["fromBackup"]["snapshots"].as_object() {
        let listed: Vec<String> = snapshots
            .iter()
            .map(|(h, s)| format!("{h}: {}", cell(s)))
            .collect();
        out.push_str(&format!(
            "  From backup: {}; writes after {} lost\n",
            listed.join(", "),
            cell(&m["fromBackup"]["writesLostAfter"])
        ));
    }
    if let Some(failed) = m["failedIn"].as_str() {
        out.push_str(&format!("  Failed in:  {failed}\n"));
    }
    if let Some(message) = m["message"].as_str() {
        out.push_str(&format!("  Message:    {message}\n"));
    }
    out
}

fn indent(text: &str) -> String {
    text.lines().map(|l| format!("  {l}\n")).collect()
}

fn events_table(events: &Value, with_object: bool) -> String {
    let items = events["items"].as_array().cloned().unwrap_or_default();
    if items.is_empty() {
        return "<none>\n".into();
    }
    let now = Timestamp::now();
    let rows: Vec<Vec<String>> = items
        .iter()
        .map(|e| {
            let mut row = vec![
                output::age(e["time"].as_str(), now),
                cell(&e["type"]),
                cell(&e["reason"]),
            ];
            if with_object {
                row.push(format!(
                    "{}/{}",
                    cell(&e["object"]["kind"]),
                    cell(&e["object"]["name"])
                ));
            }
            row.push(cell(&e["message"]));
            row
        })
        .collect();
    if with_object {
        output::table(&["AGE", "TYPE", "REASON", "OBJECT", "MESSAGE"], &rows)
    } else {
        output::table(&["AGE", "TYPE", "REASON", "MESSAGE"], &rows)
    }
}

/// `fediversity events [KIND NAME]`.
pub async fn events(client: &Client, object: Option<(Kind, &str)>) -> Result<String, ClientError> {
    let path = match object {
        Some((kind, name)) => format!("events?kind={}&name={name}", kind.as_str()),
        None => "events".into(),
    };
    Ok(events_table(&client.get(&path).await?, object.is_none()))
}

/// `fediversity reconcile KIND NAME [--wait]`: returns the message to print and whether it ended Ready.
pub async fn reconcile(
    client: &Client,
    kind: Kind,
    name: &str,
    wait: Option<Duration>,
) -> Result<(String, bool), ClientError> {
    let path = format!("{}/{name}", kind.plural());
    let what = format!("{kind}/{name}: the reconcile (is the object suspended or the daemon busy?)");
    let handled = "/status/lastHandledReconcileAt";
    let Some(object) = client
        .request_and_wait(&format!("{path}/reconcile"), &path, handled, wait, &what)
        .await?
    else {
        return Ok((format!("{kind}/{name}: reconcile requested\n"), true));
    };
    let ready = output::condition(&object, "Ready");
    let is_ready = ready.is_some_and(|c| c["status"] == "True");
    let reason = ready.map_or("-".into(), |c| cell(&c["reason"]));
    let message = ready.map_or(String::new(), |c| cell(&c["message"]));
    let verdict = if is_ready { "Ready" } else { "not Ready" };
    Ok((
        format!("{kind}/{name}: reconciled, {verdict} ({reason}): {message}\n"),
        is_ready,
    ))
}

/// One host's part of an in-place restore: the snapshot it would get and what it replaces.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RestorePlanHost {
    /// The host.
    pub host: String,
    /// The snapshot's (short) ID.
    pub snapshot: String,
    /// When the snapshot was taken.
    pub time: String,
    /// The data paths replaced.
    pub paths: Vec<String>,
    /// The databases replaced.
    pub databases: Vec<String>,
    /// The units stopped during the restore.
    pub services: Vec<String>,
}

/// Picks each host's snapshot from the repository's list (`get backups NAME`): its latest for
/// `latest`, else the one with that ID (which belongs to one host).
pub fn choose_snapshots(items: &[Value], snapshot: &str) -> Vec<(String, String, String, String)> {
    let mut by_host: std::collections::BTreeMap<String, (String, String, String)> = Default::default();
    for item in items {
        let (Some(host), Some(id), Some(time)) = (
            item["host"].as_str(),
            item["snapshot"].as_str(),
            item["time"].as_str(),
        ) else {
            continue;
        };
        let application = item["application"].as_str().unwrap_or_default().to_owned();
        let wanted = if snapshot == "latest" {
            by_host.get(host).is_none_or(|(_, t, _)| t.as_str() <= time)
        } else {
            !id.is_empty() && (id.starts_with(snapshot) || snapshot.starts_with(id))
        };
        if wanted {
            by_host.insert(host.to_owned(), (id.to_owned(), time.to_owned(), application));
        }
    }
    by_host
        .into_iter()
        .map(|(host, (id, time, app))| (host, id, time, app))
        .collect()
}

/// What an in-place restore would do, in words.
pub fn restore_plan_text(deployment: &str, plan: &[RestorePlanHost]) -> String {
    let mut out = format!("Restoring Deployment {deployment} in place would, on each host:\n");
    let none = |v: &[String]| {
        if v.is_empty() {
            "none".to_owned()
        } else {
            v.join(", ")
        }
    };
    for h in plan {
        out.push_str(&format!(
            "  {}: stop services ({}), replace data paths ({}) and databases ({}) with snapshot {} taken {}, \
verify them against the snapshot's manifest, start the services and check health.\n",
            h.host,
            none(&h.services),
            none(&h.paths),
            none(&h.databases),
            h.snapshot,
            h.time
        ));
    }
    for h in plan {
        out.push_str(&format!(
            "Everything written to {} after {} would be lost.\n",
            h.host, h.time
        ));
    }
    out
}

/// `restore deployment NAME [--snapshot ID] [--confirm] [--wait]`: without `confirm`, says what it would
/// do and does nothing.
pub async fn restore(
    client: &Client,
    name: &str,
    snapshot: &str,
    confirm: bool,
    wait: Option<Duration>,
) -> Result<i32, ClientError> {
    let listed = client.get(&format!("backups/{name}")).await?;
    let items = listed["items"].as_array().cloned().unwrap_or_default();
    let chosen = choose_snapshots(&items, snapshot);
    if chosen.is_empty() {
        eprintln!(
            "error: the repository has no snapshot {snapshot} of Deployment {name} (`fediversity get backups {name}` lists them); nothing was done"
        );
        return Ok(1);
    }
    let mut plan = Vec::new();
    for (host, id, time, application) in chosen {
        let app = if application.is_empty() {
            Value::Null
        } else {
            client.get(&format!("applications/{application}")).await?
        };
        let list = |field: &str| -> Vec<String> {
            app["spec"]["data"][field]
                .as_array()
                .map(|a| a.iter().filter_map(|v| v.as_str().map(str::to_owned)).collect())
                .unwrap_or_default()
        };
        plan.push(RestorePlanHost {
            host,
            snapshot: id,
            time,
            paths: list("paths"),
            databases: list("databases"),
            services: list("services"),
        });
    }
    print!("{}", crate::text::escape(&restore_plan_text(name, &plan)));
    if !confirm {
        println!("Nothing was done: run again with --confirm to restore.");
        return Ok(0);
    }
    // One named snapshot goes by the ID shown; `latest` stays `latest` on every host.
    let asked = if snapshot == "latest" {
        "latest".to_owned()
    } else {
        plan[0].snapshot.clone()
    };
    let handled = client
        .request_and_wait(
            &format!("deployments/{name}/restore?snapshot={asked}&confirm=true"),
            &format!("deployments/{name}"),
            "/status/lastHandledRestoreAt",
            wait,
            &format!("the restore of Deployment {name}"),
        )
        .await?;
    let Some(object) = handled else {
        println!("in-place restore of Deployment {name} requested");
        return Ok(0);
    };
    let hosts = object["status"]["restore"]["hosts"]
        .as_array()
        .cloned()
        .unwrap_or_default();
    let mut ok = true;
    for h in &plan {
        let entry = hosts.iter().find(|e| e["host"] == h.host.as_str());
        let result = entry.and_then(|e| e["result"].as_str()).unwrap_or("NotRestored");
        let message = entry.and_then(|e| e["message"].as_str()).unwrap_or_default();
        ok &= result == "Restored";
        println!("{}: {result}: {}", h.host, crate::text::escape(message));
    }
    Ok(if ok { 0 } else { 1 })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn describe_shows_where_a_migration_stands_how_far_and_its_downtime_so_far() {
        let m = serde_json::json!({
            "phase": "FinalCopying", "from": "old", "to": "new", "phaseStarted": "2026-12-03T07:00:00Z",
            "bytesPreCopied": 104_900_000u64, "bytesFinallyCopied": 1_200_000u64, "downtimeSeconds": 3.4,
            "verified": false, "source": "Stopped",
        });
        let text = migration_lines(&m);
        assert!(
            text.contains("old -> new: FinalCopying (step 4 of 8, since 2026-12-03T07:00:00Z)"),
            "{text}"
        );
        assert!(
            text.contains("Copied:     104.9 MB before the stop, 1.2 MB after it"),
            "{text}"
        );
        assert!(text.contains("Downtime:   3.4 s so far"), "{text}");
        assert!(text.contains("Verified:   not yet"), "{text}");
        assert_eq!(migration_lines(&serde_json::Value::Null), "");
    }

    #[test]
    fn describe_shows_a_migration_from_backup_with_its_data_loss_window() {
        let m = serde_json::json!({
            "phase": "Succeeded", "from": "old", "to": "new", "phaseStarted": "2026-12-03T07:00:00Z",
            "finished": "2026-12-03T07:01:00Z", "bytesPreCopied": 0, "bytesFinallyCopied": 0,
            "downtimeSeconds": 60.0, "verified": true, "source": "Unreachable",
            "fromBackup": { "snapshots": { "op-app": "4f2a9c1e" }, "writesLostAfter": "2026-12-01T03:00:00Z" },
        });
        let text = migration_lines(&m);
        assert!(text.contains("new: Succeeded (done, since"), "{text}");
        assert!(text.contains("Downtime:   60.0 s\n"), "{text}");
        assert!(
            text.contains("From backup: op-app: 4f2a9c1e; writes after 2026-12-01T03:00:00Z lost"),
            "{text}"
        );
        assert!(text.contains("Source:     Unreachable"), "{text}");
    }

    #[test]
    fn an_in_place_restore_picks_each_hosts_latest_or_the_named_snapshot_and_says_what_is_lost() {
        let item = |host: &str, id: &str, time: &str| serde_json::json!({"host": host, "snapshot": id, "time": time, "application": "app"});
        let items = [
            item("op-a", "aaaa0001", "2026-12-01T10:00:00Z"),
            item("op-a", "aaaa0002", "2026-12-02T10:00:00Z"),
            item("op-b", "bbbb0001", "2026-12-01T11:00:00Z"),
        ];
        let latest: Vec<(String, String)> = choose_snapshots(&items, "latest")
            .into_iter()
            .map(|(h, id, _, _)| (h, id))
            .collect();
        assert_eq!(
            latest,
            vec![
                ("op-a".to_owned(), "aaaa0002".to_owned()),
                ("op-b".to_owned(), "bbbb0001".to_owned())
            ]
        );
        let named = choose_snapshots(&items, "aaaa0001ffffffff");
        assert_eq!(named.len(), 1);
        assert_eq!(
            (named[0].0.as_str(), named[0].2.as_str()),
            ("op-a", "2026-12-01T10:00:00Z")
        );
        assert!(choose_snapshots(&items, "cccc0001").is_empty());
        let text = restore_plan_text(
            "op",
            &[RestorePlanHost {
                host: "op-a".into(),
                snapshot: "aaaa0001".into(),
                time: "2026-12-01T10:00:00Z".into(),
                paths: vec!["/var/lib/app".into()],
                databases: vec!["app".into()],
                services: vec![],
            }],
        );
        assert!(text.contains("stop services (none), replace data paths (/var/lib/app) and databases (app) with snapshot aaaa0001 taken 2026-12-01T10:00:00Z"), "{text}");
        assert!(
            text.contains("Everything written to op-a after 2026-12-01T10:00:00Z would be lost."),
            "{text}"
        );
    }

    #[test]
    fn backups_are_listed_one_row_per_host_with_readable_sizes() {
        let item = serde_json::json!({
            "host": "op-mastodon", "deployment": "op", "result": "Succeeded", "snapshot": "30721fa9",
            "time": "2026-12-02T19:00:00Z", "bytesAdded": 792_629, "totalBytes": 8_928_202u64,
            "files": 313, "durationMillis": 6625, "failures": 0
        });
        let (header, rows) = rows(Target::Backups, &[item]);
        assert_eq!(header[0], "HOST");
        assert_eq!(
            rows[0],
            vec![
                "op-mastodon",
                "op",
                "Succeeded",
                "30721fa9",
                "2026-12-02T19:00:00Z",
                "774.1 KiB",
                "8.5 MiB",
                "313",
                "6.6",
                "-"
            ]
        );
        assert_eq!("backups".parse::<Target>(), Ok(Target::Backups));
    }
}
