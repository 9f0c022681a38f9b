//! End-to-end: the real daemon on the Proxmox VE simulator keeps its hosts' names on a real BIND 9
//! `named` (started here on a loopback port) over TSIG-signed RFC 2136 updates; every answer is
//! checked with `dig`. A name without our ownership TXT is never changed; failures back off.

mod bind_support;
mod proxmox_support;

use std::path::Path;
use std::time::{Duration, Instant};

use bind_support::{Bind, ZONE, tool};
use fediversity_testbed::{SimConfig, SimHandle};
use proxmox_support::*;
use serde_json::Value;

const LONG: Duration = Duration::from_secs(40);
const NAME: &str = "uni-mastodon.hosting.test.";
const OPERATOR_NAME: &str = "mastodon.uni.example.org.";

/// `spec.dns` for the environment, pointing at `bind` (and at it as the resolver).
fn dns_section(port: u16, key_file: &str, extra: &str) -> String {
    format!(
        "  dns:
    zone: {ZONE}
    server: {{ host: 127.0.0.1, port: {port} }}
    tsig: {{ keyName: fediversity-key, secretFile: {key_file} }}
    ttl: 60
{extra}"
    )
}

fn write_env(folder: &Folder, sim: &SimHandle, dns: &str) {
    folder.write_environment(&endpoint(sim), "", &folder.secret("token"));
    let text = std::fs::read_to_string(folder.dir.path().join("env.yaml")).unwrap();
    folder.write("env.yaml", &format!("{text}{dns}"));
}

fn deployment(daemon: &Daemon) -> Value {
    daemon.api("deployments/uni")
}

fn record_state(d: &Value) -> Option<(String, String)> {
    let r = &d["status"]["dns"]["records"][0];
    Some((
        r["state"].as_str()?.to_owned(),
        r["message"].as_str().unwrap_or_default().to_owned(),
    ))
}

fn metric(daemon: &Daemon, result: &str) -> u64 {
    let needle = format!("fediversity_dns_updates_total{{result=\"{result}\"}} ");
    daemon
        .metrics()
        .lines()
        .find_map(|l| l.strip_prefix(&needle)?.trim().parse().ok())
        .unwrap_or(0)
}

struct Rig {
    sim: SimHandle,
    folder: Folder,
    _state: tempfile::TempDir,
    daemon: Daemon,
}

async fn rig(dns: impl Fn(&Folder) -> String, policy: &str) -> Rig {
    let sim = sim(SimConfig::new().latency_scale(0.0)).await;
    let folder = Folder::new(&endpoint(&sim), "");
    write_env(&folder, &sim, &dns(&folder));
    folder.write_deployment("uni", &["mastodon: { size: small }"], policy, "");
    let state = state_dir();
    let daemon = Daemon::start(folder.dir.path(), state.path());
    Rig {
        sim,
        folder,
        _state: state,
        daemon,
    }
}

fn vm_address(sim: &SimHandle) -> Option<String> {
    our_vms(sim)
        .into_iter()
        .find(|v| v.agent_ready)
        .and_then(|v| v.address)
        .map(|a| a.to_string())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_host_gets_its_name_follows_its_address_and_loses_it_when_destroyed() {
    let bind = Bind::start();
    let (port, key) = (bind.port, bind.key_file());
    let rig = rig(|_| dns_section(port, &key, ""), "Delete").await;
    let daemon = &rig.daemon;

    // Create: from the guest agent having an address to the name answering dig.
    let (address, got_address) = wait_for("the VM's address", LONG, || {
        vm_address(&rig.sim).map(|a| (a, Instant::now()))
    });
    let answered = wait_for("the name to answer dig", LONG, || {
        (bind.dig(NAME, "A") == vec![address.clone()]).then(Instant::now)
    });
    eprintln!(
        "address to dig answer: {} ms",
        answered.duration_since(got_address).as_millis()
    );
    let txt = bind.dig(NAME, "TXT");
    assert_eq!(txt.len(), 1, "{txt:?}");
    assert!(
        txt[0].starts_with("\"heritage=fediversity,owner=") && txt[0].ends_with(",deployment=uni\""),
        "{txt:?}"
    );
    let d = wait_for("DNSPublished", LONG, || {
        let d = deployment(daemon);
        (condition(&d, "DNSPublished")?.0 == "True").then_some(d)
    });
    assert_eq!(d["status"]["hosts"][0]["dnsName"], NAME);
    assert_eq!(d["status"]["dns"]["records"][0]["addresses"][0], address.as_str());
    let operator = &d["status"]["dns"]["operatorRecords"][0];
    assert_eq!(operator["name"], OPERATOR_NAME);
    assert_eq!(operator["type"], "CNAME");
    assert_eq!(operator["value"], NAME);
    assert_eq!(operator["atApex"][0], format!("A {address}"));
    assert_eq!(condition(&d, "DNSReady").unwrap().1, "NotChecked");
    let env = daemon.api("runtimeenvironments/sim");
    assert!(!env["status"]["warnings"].to_string().contains("DNS"), "{env}");
    let (code, hosts) = daemon.cli(&["get", "hosts"]);
    assert_eq!(code, 0, "{hosts}");
    assert!(hosts.contains("DNS NAME") && hosts.contains(NAME), "{hosts}");
    let (code, described) = daemon.cli(&["describe", "deployment", "uni"]);
    assert_eq!(code, 0, "{described}");
    assert!(
        described.contains(&format!("Set at your domain:\n  {OPERATOR_NAME} CNAME {NAME}")),
        "{described}"
    );
    assert_eq!(metric(daemon, "created"), 1);
    let metrics = daemon.metrics();
    let sample = |name: &str| {
        metrics
            .lines()
            .find_map(|l| l.strip_prefix(name)?.trim().parse::<f64>().ok())
            .unwrap_or_default()
    };
    let (sum, count) = (
        sample("fediversity_dns_update_duration_seconds_sum "),
        sample("fediversity_dns_update_duration_seconds_count "),
    );
    assert!(count >= 1.0);
    eprintln!("read and update of one name: {:.1} ms", sum / count * 1000.0);
    let events = daemon.api("events?kind=Deployment&name=uni");
    assert!(events.to_string().contains("DNSRecordCreated"), "{events}");

    // A host destroyed while its Deployment stays: pixelfed is disabled (deletionPolicy Delete).
    let pixelfed = "uni-pixelfed.hosting.test.";
    rig.folder.write_deployment(
        "uni",
        &["mastodon: { size: small }", "pixelfed: { size: small }"],
        "Delete",
        "",
    );
    wait_for("pixelfed's name to answer dig", LONG, || {
        (bind.dig(pixelfed, "A").len() == 1).then_some(())
    });
    rig.folder.write_deployment(
        "uni",
        &["mastodon: { size: small }", "pixelfed: { enabled: false }"],
        "Delete",
        "",
    );
    wait_for("pixelfed's name to be gone", LONG, || {
        (bind.dig(pixelfed, "A").is_empty() && bind.dig(pixelfed, "TXT").is_empty()).then_some(())
    });
    assert_eq!(
        bind.dig(NAME, "A"),
        vec![address.clone()],
        "mastodon keeps its name"
    );
    assert_eq!(metric(daemon, "deleted"), 1);

    // Address change: the environment now publishes the host behind NAT at another address.
    let nat = format!("    addressSource: Nat\n    nat: {{ \"{address}\": 198.51.100.77 }}\n");
    write_env(&rig.folder, &rig.sim, &dns_section(port, &key, &nat));
    wait_for("the new address to answer dig", LONG, || {
        (bind.dig(NAME, "A") == vec!["198.51.100.77".to_owned()]).then_some(())
    });
    assert_eq!(bind.dig(NAME, "TXT"), txt, "the ownership mark stays");
    wait_for("the update to be counted", LONG, || {
        (metric(daemon, "updated") == 1).then_some(())
    });

    // Host destroyed: the Deployment is removed under deletionPolicy Delete.
    rig.folder.remove("dep-uni.yaml");
    wait_for("the name to be gone", LONG, || {
        (bind.dig(NAME, "A").is_empty() && bind.dig(NAME, "TXT").is_empty()).then_some(())
    });
    wait_for("the VM to be destroyed", LONG, || {
        our_vms(&rig.sim).is_empty().then_some(())
    });
    assert_eq!(metric(daemon, "deleted"), 2);
    assert!(!bind.log().contains("update failed"), "{}", bind.log());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_retained_vm_keeps_its_name_when_its_deployment_is_removed() {
    let bind = Bind::start();
    let (port, key) = (bind.port, bind.key_file());
    let rig = rig(|_| dns_section(port, &key, ""), "Retain").await;
    let address = wait_for("the name to answer dig", LONG, || {
        let a = bind.dig(NAME, "A");
        (a.len() == 1).then(|| a[0].clone())
    });
    rig.folder.remove("dep-uni.yaml");
    wait_for("the Deployment to be gone", LONG, || {
        (rig.daemon.api("deployments/uni")["status"].is_null()).then_some(())
    });
    std::thread::sleep(Duration::from_secs(1));
    assert_eq!(bind.dig(NAME, "A"), vec![address], "kept with its retained VM");
    assert_eq!(our_vms(&rig.sim).len(), 1, "the VM is retained");
    assert_eq!(metric(&rig.daemon, "deleted"), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_foreign_record_with_the_same_name_is_never_changed_or_deleted_and_is_reported() {
    let bind = Bind::start();
    bind.nsupdate(&format!("update add {NAME} 300 A 203.0.113.9"));
    assert_eq!(bind.dig(NAME, "A"), vec!["203.0.113.9"]);
    let (port, key) = (bind.port, bind.key_file());
    let rig = rig(|_| dns_section(port, &key, ""), "Delete").await;
    let daemon = &rig.daemon;
    let d = wait_for("the conflict to be reported", LONG, || {
        let d = deployment(daemon);
        (record_state(&d)?.0 == "Conflict").then_some(d)
    });
    let (_, message) = record_state(&d).unwrap();
    assert!(message.contains("not created by this controller"), "{message}");
    let (status, reason, text) = condition(&d, "DNSPublished").unwrap();
    assert_eq!(
        (status.as_str(), reason.as_str()),
        ("False", "DNSConflict"),
        "{text}"
    );
    let (ready, _, ready_message) = condition(&d, "Ready").unwrap();
    assert_eq!(ready, "False");
    assert!(
        ready_message.contains("DNS: uni-mastodon.hosting.test."),
        "{ready_message}"
    );
    assert!(metric(daemon, "conflict") >= 1);
    assert_eq!(metric(daemon, "created"), 0);
    let events = daemon.api("events?kind=Deployment&name=uni");
    assert!(events.to_string().contains("DNSConflict"), "{events}");

    // Removing the Deployment (deletionPolicy Delete) still leaves the foreign record alone.
    rig.folder.remove("dep-uni.yaml");
    wait_for("the VM to be destroyed", LONG, || {
        our_vms(&rig.sim).is_empty().then_some(())
    });
    std::thread::sleep(Duration::from_secs(1));
    assert_eq!(
        bind.dig(NAME, "A"),
        vec!["203.0.113.9"],
        "the foreign record changed"
    );
    assert!(bind.dig(NAME, "TXT").is_empty());
    assert_eq!(metric(daemon, "deleted"), 0);
    assert_eq!(metric(daemon, "updated"), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_wrong_tsig_key_is_a_clear_error_that_backs_off_without_a_retry_storm() {
    let bind = Bind::start();
    let port = bind.port;
    let rig = rig(
        |folder| {
            let wrong = folder.secrets.path().join("wrong.key");
            std::fs::write(&wrong, "c2VjcmV0LXRoYXQtdGhlLXNlcnZlci1kb2VzLW5vdC1rbm93\n").unwrap();
            dns_section(port, &wrong.display().to_string(), "")
        },
        "Delete",
    )
    .await;
    let daemon = &rig.daemon;
    let d = wait_for("the refusal to be reported", LONG, || {
        let d = deployment(daemon);
        (record_state(&d)?.0 == "Failed").then_some(d)
    });
    let (_, message) = record_state(&d).unwrap();
    assert!(message.contains("refused our signed request"), "{message}");
    assert!(message.contains("spec.dns.tsig"), "{message}");
    assert!(condition(&d, "DNSPublished").unwrap().1 == "DNSUpdateFailed");
    let first = metric(daemon, "rejected");
    assert!(first >= 1);
    // Backoff: 5 s, then 10 s. Over the next 6 s at most one more attempt reaches the server.
    std::thread::sleep(Duration::from_secs(6));
    let after = metric(daemon, "rejected");
    assert!(after <= first + 1, "{first} then {after} attempts in 6 s");
    let d = deployment(daemon);
    assert!(
        record_state(&d).unwrap().1.contains("next attempt in"),
        "{:?}",
        record_state(&d)
    );
    assert!(bind.dig(NAME, "A").is_empty());
    let env = rig.daemon.api("runtimeenvironments/sim");
    assert!(
        env["status"]["warnings"]
            .to_string()
            .contains("DNS: the DNS server 127.0.0.1:"),
        "the environment shows the refusal too: {env}"
    );
    assert!(
        bind.log().contains("fediversity-key"),
        "the server names the key: {}",
        bind.log()
    );
    let everything = format!("{d}{}", daemon.metrics());
    assert!(!everything.contains("c2VjcmV0"), "the secret leaked");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_server_that_is_down_is_reported_and_the_name_is_published_once_it_is_back() {
    let mut bind = Bind::start();
    bind.stop();
    let (port, key) = (bind.port, bind.key_file());
    let rig = rig(|_| dns_section(port, &key, ""), "Delete").await;
    let daemon = &rig.daemon;
    let d = wait_for("the outage to be reported", LONG, || {
        let d = deployment(daemon);
        (record_state(&d)?.0 == "Failed").then_some(d)
    });
    let (_, message) = record_state(&d).unwrap();
    assert!(message.contains("did not answer"), "{message}");
    assert!(metric(daemon, "unreachable") >= 1);
    bind.run();
    let started = Instant::now();
    wait_for("the name to be published after the outage", LONG, || {
        (bind.dig(NAME, "A").len() == 1).then_some(())
    });
    eprintln!(
        "published {} ms after the server came back",
        started.elapsed().as_millis()
    );
    wait_for("DNSPublished", LONG, || {
        (condition(&deployment(daemon), "DNSPublished")?.0 == "True").then_some(())
    });
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_zone_the_server_does_not_serve_is_named_in_status() {
    let bind = Bind::start();
    let (port, key) = (bind.port, bind.key_file());
    let rig = rig(
        |_| dns_section(port, &key, "").replace("zone: hosting.test", "zone: elsewhere.test"),
        "Delete",
    )
    .await;
    let d = wait_for("the zone problem to be reported", LONG, || {
        let d = deployment(&rig.daemon);
        (record_state(&d)?.0 == "Failed").then_some(d)
    });
    let (_, message) = record_state(&d).unwrap();
    assert!(
        message.contains("does not serve the zone elsewhere.test"),
        "{message}"
    );
    assert!(bind.dig("uni-mastodon.elsewhere.test.", "A").is_empty());
    let env = rig.daemon.api("runtimeenvironments/sim");
    assert!(
        env["status"]["warnings"]
            .to_string()
            .contains("does not serve the zone elsewhere.test"),
        "{env}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dns_ready_turns_true_once_the_operators_cname_is_set() {
    let bind = Bind::start();
    let (port, key) = (bind.port, bind.key_file());
    let resolver = format!("    resolver: {{ host: 127.0.0.1, port: {port} }}\n");
    let rig = rig(|_| dns_section(port, &key, &resolver), "Delete").await;
    let daemon = &rig.daemon;
    let d = wait_for("DNSReady False", LONG, || {
        let d = deployment(daemon);
        (condition(&d, "DNSReady")?.0 == "False").then_some(d)
    });
    let (_, reason, message) = condition(&d, "DNSReady").unwrap();
    assert_eq!(reason, "OperatorRecordsMissing");
    assert!(
        message.contains(&format!("set {OPERATOR_NAME} CNAME {NAME} at your domain")),
        "{message}"
    );
    let (ready, _, ready_message) = condition(&d, "Ready").unwrap();
    assert_eq!(ready, "False", "the Deployment says it waits for the operator");
    assert!(
        ready_message.contains("waiting for the operator's DNS"),
        "{ready_message}"
    );
    assert_eq!(d["status"]["dns"]["operatorRecords"][0]["resolves"], false);

    bind.nsupdate(&format!("update add {OPERATOR_NAME} 60 CNAME {NAME}"));
    let d = wait_for("DNSReady True", LONG, || {
        let d = deployment(daemon);
        (condition(&d, "DNSReady")?.0 == "True").then_some(d)
    });
    assert_eq!(d["status"]["dns"]["operatorRecords"][0]["resolves"], true);
    wait_for("the Deployment to be Ready", LONG, || {
        (condition(&deployment(daemon), "Ready")?.0 == "True").then_some(())
    });
}

#[test]
fn the_rig_finds_bind_and_dig() {
    for name in ["named", "dig", "nsupdate", "tsig-keygen"] {
        assert!(Path::new(&tool(name)).is_file());
    }
}

fn zone_spec(bind: &Bind) -> fediversity::api::DnsSpec {
    fediversity::api::DnsSpec {
        zone: ZONE.into(),
        server: fediversity::api::DnsServer {
            host: "127.0.0.1".into(),
            port: bind.port,
        },
        tsig: fediversity::api::TsigSpec {
            key_name: "fediversity-key".into(),
            algorithm: fediversity::api::TsigAlgorithm::HmacSha256,
            secret_file: bind.key_file(),
        },
        ttl: 60,
        address_source: fediversity::api::AddressSource::GuestAgent,
        nat: Default::default(),
        resolver: None,
    }
}

#[tokio::test]
async fn a_change_made_by_someone_else_after_our_read_is_refused_by_the_server_not_overwritten() {
    use fediversity::dns::{Addresses, Applied, Decision, HickoryZone, ZoneClient, decide, owner_txt};
    let bind = Bind::start();
    let zone = HickoryZone::new(&zone_spec(&bind)).unwrap();
    let owner = owner_txt("installation", "uni");
    let ip = |a: &str| Addresses::of([a.parse().unwrap()]);

    // Claimed by us.
    let seen = zone.observe(NAME).await.unwrap();
    let Decision::Apply(_, claim) = decide(NAME, Some(&ip("192.0.2.10")), &seen, &owner, 60) else {
        panic!("a free name is claimed")
    };
    assert_eq!(zone.apply(&claim).await.unwrap(), Applied::Done);
    assert_eq!(bind.dig(NAME, "A"), vec!["192.0.2.10"]);

    // We read it and plan a move; meanwhile someone else changes the address.
    let seen = zone.observe(NAME).await.unwrap();
    assert!(seen.txt.contains(&owner));
    let Decision::Apply(_, update) = decide(NAME, Some(&ip("192.0.2.11")), &seen, &owner, 60) else {
        panic!("an address change is an update")
    };
    bind.nsupdate(&format!(
        "update delete {NAME} A\nupdate add {NAME} 60 A 203.0.113.50"
    ));
    let applied = zone.apply(&update).await.unwrap();
    assert!(
        matches!(&applied, Applied::PrerequisiteFailed(code) if code.contains("NXRRSET")),
        "{applied:?}"
    );
    assert_eq!(bind.dig(NAME, "A"), vec!["203.0.113.50"], "their change stands");

    // The same holds for a claim raced by someone else, and for a removal.
    let other = "uni-pixelfed.hosting.test.";
    let Decision::Apply(_, claim) = decide(other, Some(&ip("192.0.2.12")), &Default::default(), &owner, 60)
    else {
        panic!()
    };
    bind.nsupdate(&format!("update add {other} 60 A 203.0.113.51"));
    let applied = zone.apply(&claim).await.unwrap();
    assert!(
        matches!(&applied, Applied::PrerequisiteFailed(code) if code.contains("YXDOMAIN")),
        "{applied:?}"
    );
    assert_eq!(bind.dig(other, "A"), vec!["203.0.113.51"]);
    assert!(bind.dig(other, "TXT").is_empty());
    let Decision::Apply(_, removal) = decide(NAME, None, &seen, &owner, 60) else {
        panic!()
    };
    assert!(matches!(
        zone.apply(&removal).await.unwrap(),
        Applied::PrerequisiteFailed(_)
    ));
    assert_eq!(bind.dig(NAME, "A"), vec!["203.0.113.50"], "not removed");
}
