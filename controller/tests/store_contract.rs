//! The store contract: the same cases against the embedded redb store and against a real three-member
//! etcd cluster, plus what only the shared store does (fencing, large batches, a clear error when etcd
//! cannot be reached).

mod etcd_support;

use std::time::{Duration, Instant};

use etcd_support::EtcdCluster;
use fediversity::api::{Event, EventType, Kind, ObjectKey, Timestamp};
use fediversity::store::{EtcdConfig, Fence, MAX_EVENTS_PER_OBJECT, StatusJson, Store, StoreError, Write};
use serde_json::{Value, json};

fn key(name: &str) -> ObjectKey {
    ObjectKey::new(Kind::Deployment, name)
}

fn event(message: &str) -> Event {
    Event {
        type_: EventType::Normal,
        reason: "Test".into(),
        message: message.into(),
        time: Timestamp::now(),
    }
}

/// Opens the store under test again (the same records each time).
type Open<'a> = &'a dyn Fn() -> Store;

fn generations_start_at_one_and_move_only_when_the_spec_changes(open: Open) {
    let a = key("gen-a");
    {
        let store = open();
        assert_eq!(store.observe_specs([(&a, "h1".to_owned())]).unwrap()[&a], 1);
        assert_eq!(store.observe_specs([(&a, "h1".to_owned())]).unwrap()[&a], 1);
        assert_eq!(store.observe_specs([(&a, "h2".to_owned())]).unwrap()[&a], 2);
    }
    let store = open();
    assert_eq!(store.observe_specs([(&a, "h2".to_owned())]).unwrap()[&a], 2);
    assert_eq!(store.object(&a).unwrap().unwrap().generation, 2);
    assert!(
        store
            .objects()
            .unwrap()
            .iter()
            .any(|(id, r)| id == &a.to_string() && r.spec_hash == "h2")
    );
}

fn status_is_written_only_when_it_changes(open: Open) {
    let store = open();
    let a = key("status-a");
    let status = json!({"observedGeneration": 1});
    assert!(store.put_status(&a, &status).unwrap());
    assert!(!store.put_status(&a, &status).unwrap());
    assert_eq!(store.status::<Value>(&a).unwrap(), Some(status.clone()));
    assert!(
        store
            .statuses()
            .unwrap()
            .contains(&(a.to_string(), StatusJson::from_value(&status)))
    );
}

fn the_event_log_keeps_only_the_newest_events_and_forget_removes_everything(open: Open) {
    let store = open();
    let a = key("events-a");
    store.observe_specs([(&a, "h".to_owned())]).unwrap();
    for i in 0..(MAX_EVENTS_PER_OBJECT + 10) {
        store.record_event(&a, &event(&format!("event {i}"))).unwrap();
    }
    let events = store.events(&a).unwrap();
    assert_eq!(events.len(), MAX_EVENTS_PER_OBJECT);
    assert_eq!(events[0].message, "event 10");
    assert_eq!(
        events.last().unwrap().message,
        format!("event {}", MAX_EVENTS_PER_OBJECT + 9)
    );
    let all: Vec<_> = store
        .all_events()
        .unwrap()
        .into_iter()
        .filter(|(id, _)| id == &a.to_string())
        .collect();
    assert_eq!(all.len(), MAX_EVENTS_PER_OBJECT);
    store.put_status(&a, &json!({"x": 1})).unwrap();
    store.forget(&a).unwrap();
    assert!(store.events(&a).unwrap().is_empty());
    assert!(store.object(&a).unwrap().is_none());
    assert!(store.status::<Value>(&a).unwrap().is_none());
}

fn events_about_untracked_objects_are_dropped(open: Open) {
    let store = open();
    let ghost = key("ghost");
    store.record_event(&ghost, &event("nobody")).unwrap();
    assert!(store.events(&ghost).unwrap().is_empty());
}

fn a_batch_applies_statuses_events_and_forgets_in_order(open: Open) {
    let store = open();
    let (a, b) = (key("batch-a"), key("batch-b"));
    store
        .observe_specs([(&a, "h".to_owned()), (&b, "h".to_owned())])
        .unwrap();
    store
        .apply(&[
            Write::Status(a.clone(), StatusJson::from_value(&json!({"n": 1}))),
            Write::Event(a.clone(), event("one")),
            Write::Status(a.clone(), StatusJson::from_value(&json!({"n": 2}))),
            Write::Event(a.clone(), event("two")),
            Write::Event(b.clone(), event("b")),
            Write::Forget(b.clone()),
        ])
        .unwrap();
    assert_eq!(store.status::<Value>(&a).unwrap(), Some(json!({"n": 2})));
    let messages: Vec<String> = store.events(&a).unwrap().into_iter().map(|e| e.message).collect();
    assert_eq!(messages, ["one", "two"]);
    assert!(store.object(&b).unwrap().is_none());
    assert!(store.events(&b).unwrap().is_empty());
    assert_eq!(store.object(&a).unwrap().unwrap().next_event, 2);
}

fn inventory_entries_list_by_prefix_and_a_claim_keeps_the_first_value(open: Open) {
    let store = open();
    store
        .put_inventory("vm/env-a/20001", &json!({"vmid": 20001}))
        .unwrap();
    store
        .put_inventory("vm/env-a/20003", &json!({"vmid": 20003}))
        .unwrap();
    store
        .put_inventory("vm/env-b/20002", &json!({"vmid": 20002}))
        .unwrap();
    let listed: Vec<(String, Value)> = store.inventory_list("vm/env-a/").unwrap();
    assert_eq!(
        listed.iter().map(|(k, _)| k.as_str()).collect::<Vec<_>>(),
        ["vm/env-a/20001", "vm/env-a/20003"]
    );
    store.remove_inventory("vm/env-a/20001").unwrap();
    assert!(store.inventory::<Value>("vm/env-a/20001").unwrap().is_none());
    assert_eq!(
        store.inventory::<Value>("vm/env-b/20002").unwrap(),
        Some(json!({"vmid": 20002}))
    );
    assert_eq!(
        store
            .claim_inventory("installation/id", &"first".to_owned())
            .unwrap(),
        "first"
    );
    assert_eq!(
        store
            .claim_inventory("installation/id", &"second".to_owned())
            .unwrap(),
        "first"
    );
    drop(store);
    assert_eq!(
        open().inventory::<String>("installation/id").unwrap().as_deref(),
        Some("first")
    );
}

fn run_contract(open: Open) {
    generations_start_at_one_and_move_only_when_the_spec_changes(open);
    status_is_written_only_when_it_changes(open);
    the_event_log_keeps_only_the_newest_events_and_forget_removes_everything(open);
    events_about_untracked_objects_are_dropped(open);
    a_batch_applies_statuses_events_and_forgets_in_order(open);
    inventory_entries_list_by_prefix_and_a_claim_keeps_the_first_value(open);
}

#[test]
fn the_embedded_store_keeps_the_store_contract() {
    let dir = tempfile::tempdir().unwrap();
    run_contract(&|| Store::open(dir.path()).unwrap());
}

#[test]
fn the_etcd_store_keeps_the_store_contract_on_a_three_member_cluster() {
    let cluster = EtcdCluster::start();
    let config = EtcdConfig::parse(&cluster.url("contract")).unwrap();
    run_contract(&|| Store::open_etcd(&config).unwrap());
    // Another prefix is another installation: nothing of the first shows there.
    let other = Store::open_etcd(&EtcdConfig::parse(&cluster.url("other")).unwrap()).unwrap();
    assert!(other.objects().unwrap().is_empty());
    assert!(other.inventory::<String>("installation/id").unwrap().is_none());
}

#[test]
fn etcd_writes_that_guard_actions_need_a_current_fence() {
    let cluster = EtcdCluster::start();
    let config = EtcdConfig::parse(&cluster.url("fence")).unwrap();
    let store = Store::open_etcd(&config).unwrap();
    store.require_leadership();
    // Without leadership: guarded writes are refused, a source's bookkeeping is not.
    let err = store.put_inventory("vm/d/a", &json!(1)).unwrap_err();
    assert!(matches!(err, StoreError::NotLeader), "{err}");
    assert!(store.remove_inventory("vm/d/a").is_err());
    store.put_inventory("source:git", &json!({"rev": "abc"})).unwrap();
    assert!(!store.may_act());

    // Holding the leader key: writes pass.
    let leader_key = b"/fence/leader".to_vec();
    let mut client = store.etcd().unwrap().1.remove(0);
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let revision = rt.block_on(async {
        let lease = client.lease_grant(5, None).await.unwrap().id();
        fediversity::store::try_lead(&mut client, leader_key.clone(), b"me".to_vec(), lease)
            .await
            .unwrap()
            .unwrap()
    });
    let fence = |valid: Duration, revision: i64| Fence {
        key: leader_key.clone(),
        revision,
        valid_until: Instant::now() + valid,
    };
    store.set_fence(Some(fence(Duration::from_secs(5), revision)));
    assert!(store.may_act());
    store.put_inventory("vm/d/a", &json!(1)).unwrap();

    // A fence past its deadline (a replica paused past its renewals) is refused without asking etcd.
    store.set_fence(Some(fence(Duration::ZERO, revision)));
    assert!(matches!(
        store.put_inventory("vm/d/b", &json!(2)),
        Err(StoreError::NotLeader)
    ));

    // Another term (the key recreated by someone else): etcd refuses the write, and it is not made.
    rt.block_on(async {
        client.delete(leader_key.clone(), None).await.unwrap();
        client
            .put(leader_key.clone(), b"other".to_vec(), None)
            .await
            .unwrap();
    });
    store.set_fence(Some(fence(Duration::from_secs(5), revision)));
    assert!(matches!(
        store.put_inventory("vm/d/c", &json!(3)),
        Err(StoreError::NotLeader)
    ));
    assert!(store.inventory::<Value>("vm/d/c").unwrap().is_none());
    assert!(!store.may_act(), "a refused write clears the fence");
    assert_eq!(store.inventory::<Value>("vm/d/a").unwrap(), Some(json!(1)));
}

#[test]
fn etcd_batches_beyond_its_transaction_and_page_limits_are_kept_whole() {
    let cluster = EtcdCluster::start();
    let store = Store::open_etcd(&EtcdConfig::parse(&cluster.url("large")).unwrap()).unwrap();
    let keys: Vec<ObjectKey> = (0..2500).map(|i| key(&format!("o{i:05}"))).collect();
    let generations = store
        .observe_specs(keys.iter().map(|k| (k, "h".to_owned())))
        .unwrap();
    assert!(generations.values().all(|g| *g == 1) && generations.len() == keys.len());
    let mut writes: Vec<Write> = keys
        .iter()
        .map(|k| Write::Status(k.clone(), StatusJson::from_value(&json!({"ok": k.to_string()}))))
        .collect();
    writes.extend(keys.iter().map(|k| Write::Event(k.clone(), event("made"))));
    store.apply(&writes).unwrap();
    assert_eq!(store.objects().unwrap().len(), keys.len());
    assert_eq!(store.statuses().unwrap().len(), keys.len());
    assert_eq!(store.all_events().unwrap().len(), keys.len());
    assert_eq!(store.object(&keys[1234]).unwrap().unwrap().next_event, 1);
}

#[test]
fn an_unreachable_etcd_is_reported_with_its_address_and_what_to_check() {
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let mut config = EtcdConfig::parse(&format!("etcd://127.0.0.1:{port}/x")).unwrap();
    config.timeout = Duration::from_secs(1);
    let started = Instant::now();
    let err = Store::open_etcd(&config).unwrap_err().to_string();
    assert!(started.elapsed() < Duration::from_secs(10));
    assert!(err.contains(&format!("127.0.0.1:{port}")), "{err}");
    assert!(err.contains("quorum") || err.contains("majority"), "{err}");
    for bad in [
        "http://h:1",
        "etcd://",
        "etcd://host",
        "etcd://h:1/a#b",
        "etcd://h:1;rm/x",
    ] {
        assert!(EtcdConfig::parse(bad).is_err(), "{bad} was accepted");
    }
}

fn copy(from: &str, to: &str) -> (bool, String) {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_fediversity"))
        .args(["store", "copy", "--from", from, "--to", to])
        .output()
        .unwrap();
    let mut text = String::from_utf8_lossy(&out.stdout).into_owned();
    text.push_str(&String::from_utf8_lossy(&out.stderr));
    (out.status.success(), text)
}

#[test]
fn store_copy_moves_an_installation_to_etcd_and_back_record_for_record() {
    let cluster = EtcdCluster::start();
    let dir = tempfile::tempdir().unwrap();
    let original = {
        let store = Store::open(dir.path()).unwrap();
        let (a, b) = (key("copy-a"), key("copy-b"));
        store
            .observe_specs([(&a, "h1".to_owned()), (&b, "h2".to_owned())])
            .unwrap();
        store.put_status(&a, &json!({"ready": true})).unwrap();
        for i in 0..(MAX_EVENTS_PER_OBJECT + 3) {
            store.record_event(&a, &event(&format!("e{i}"))).unwrap();
        }
        store
            .put_inventory("vm/copy-a/mastodon", &json!({"vmid": 1001}))
            .unwrap();
        store
            .claim_inventory("installation/id", &"inst-1".to_owned())
            .unwrap();
        store.dump().unwrap().sorted()
    };
    let url = cluster.url("copied");
    let (ok, text) = copy(&dir.path().display().to_string(), &url);
    assert!(ok, "{text}");
    assert!(
        text.contains("verified") && text.contains(&format!("{MAX_EVENTS_PER_OBJECT} events")),
        "{text}"
    );
    let etcd = Store::open_etcd(&EtcdConfig::parse(&url).unwrap()).unwrap();
    assert_eq!(etcd.dump().unwrap().sorted(), original);
    assert_eq!(
        etcd.inventory::<String>("installation/id").unwrap().as_deref(),
        Some("inst-1")
    );
    assert_eq!(
        etcd.events(&key("copy-a")).unwrap().last().unwrap().message,
        format!("e{}", MAX_EVENTS_PER_OBJECT + 2)
    );
    // The copy goes on from where the original was: the next event follows the last one.
    etcd.record_event(&key("copy-a"), &event("after")).unwrap();
    assert_eq!(
        etcd.events(&key("copy-a")).unwrap().last().unwrap().message,
        "after"
    );
    drop(etcd);

    // Into a store that already holds records: refused, nothing mixed.
    let (ok, text) = copy(&dir.path().display().to_string(), &url);
    assert!(!ok && text.contains("already holds"), "{text}");

    let back = tempfile::tempdir().unwrap();
    let (ok, text) = copy(&url, &back.path().display().to_string());
    assert!(ok, "{text}");
    let restored = Store::open(back.path()).unwrap();
    let dump = restored.dump().unwrap().sorted();
    assert_eq!(dump.objects.len(), original.objects.len());
    assert_eq!(dump.inventory, original.inventory);
    assert_eq!(dump.events.len(), MAX_EVENTS_PER_OBJECT);
    let last = restored.events(&key("copy-a")).unwrap().pop().unwrap();
    assert_eq!(last.message, "after", "the event added in etcd came back");
}
