//! The directory source at scale and under hostile input: snapshots, staleness, generations, watching.

use std::sync::Arc;
use std::time::{Duration, Instant};

use fediversity::api::{Kind, ObjectKey};
use fediversity::fixtures;
use fediversity::source::dir::DirSource;
use fediversity::store::{Store, canonical_hash};
use fediversity::yaml::Limits;

fn source(dir: &std::path::Path) -> DirSource {
    DirSource::new(vec![dir.to_path_buf()], Limits::default())
}

fn generations(
    store: &Store,
    snapshot: &fediversity::source::Snapshot,
) -> std::collections::BTreeMap<ObjectKey, u64> {
    let specs: Vec<(ObjectKey, String)> = snapshot
        .objects
        .iter()
        .map(|(k, o)| (k.clone(), canonical_hash(&o.loaded.object.spec_json())))
        .collect();
    store
        .observe_specs(specs.iter().map(|(k, h)| (k, h.clone())))
        .unwrap()
}

#[test]
fn ten_thousand_objects_in_single_and_multi_document_files_load_into_one_snapshot() {
    let dir = tempfile::tempdir().unwrap();
    let files = fixtures::write_tree(dir.path(), 10_000, 100).unwrap();
    assert_eq!(files.len(), 5_000 + 50);
    let snapshot = source(dir.path()).scan(true);
    assert!(snapshot.errors.is_empty(), "{:?}", snapshot.errors.first());
    assert_eq!(snapshot.objects.len(), 10_000);
    let deployments = snapshot
        .objects
        .keys()
        .filter(|k| k.kind == Kind::Deployment)
        .count();
    assert_eq!(deployments, 9_500);
}

#[test]
fn editing_one_file_among_ten_thousand_changes_only_its_objects_and_generations() {
    let dir = tempfile::tempdir().unwrap();
    let state = tempfile::tempdir().unwrap();
    fixtures::write_tree(dir.path(), 10_000, 100).unwrap();
    let store = Store::open(state.path()).unwrap();
    let mut src = source(dir.path());
    let before = src.scan(true);
    let gen_before = generations(&store, &before);
    assert!(gen_before.values().all(|g| *g == 1));

    // Change one Deployment's spec in a multi-document file, and touch another file without changing it.
    let batch = dir.path().join("multi/batch-05000.yaml");
    let text = std::fs::read_to_string(&batch).unwrap();
    let edited = text.replacen("maxTootChars: 500", "maxTootChars: 600", 1);
    assert_ne!(text, edited);
    std::fs::write(&batch, edited).unwrap();
    let single = dir.path().join("single/object-00007.yaml");
    std::fs::write(&single, std::fs::read(&single).unwrap()).unwrap();

    let after = src.scan(false);
    assert_ne!(before.revision, after.revision);
    assert_eq!(after.objects.len(), 10_000);
    let changed: Vec<&ObjectKey> = after
        .objects
        .iter()
        .filter(|(k, o)| !Arc::ptr_eq(o, &before.objects[*k]))
        .map(|(k, _)| k)
        .collect();
    // Only the 100 objects of the edited file were re-read; the touched but unchanged file kept its objects.
    assert_eq!(changed.len(), 100);
    assert!(changed.iter().all(|k| after.objects[*k].loaded.file == batch));
    let gen_after = generations(&store, &after);
    let bumped: Vec<(&ObjectKey, &u64)> = gen_after.iter().filter(|(_, g)| **g != 1).collect();
    assert_eq!(
        bumped,
        vec![(&ObjectKey::new(Kind::Deployment, "deploy-5005"), &2)]
    );

    // The same state again moves nothing, also after reopening the store.
    drop(store);
    let store = Store::open(state.path()).unwrap();
    assert_eq!(generations(&store, &src.scan(true)), gen_after);
}

#[test]
fn a_file_that_stops_parsing_keeps_its_last_good_objects_as_stale() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("d.yaml");
    let two = format!(
        "{}---\n{}",
        fixtures::deployment_yaml("a", "env", 1),
        fixtures::deployment_yaml("b", "env", 1)
    );
    std::fs::write(&file, &two).unwrap();
    let mut src = source(dir.path());
    assert_eq!(src.scan(false).objects.len(), 2);

    std::fs::write(&file, format!("{two}  bad: [indent\n")).unwrap();
    let snapshot = src.scan(false);
    assert_eq!(
        snapshot.objects.len(),
        2,
        "a broken file must not read as a deletion"
    );
    assert!(snapshot.objects.values().all(|o| o.stale));
    assert!(
        snapshot
            .errors
            .iter()
            .any(|e| e.message.starts_with("invalid YAML"))
    );
    assert!(snapshot.errors.iter().any(|e| {
        e.message
            .contains("keeping the last good version of Deployment/a, Deployment/b")
    }));

    // One document invalid, the other fine: only the invalid one is kept stale.
    let one_bad = format!(
        "{}---\n{}",
        fixtures::deployment_yaml("a", "env", 2),
        fixtures::deployment_yaml("b", "env", 1).replace("b.example.org", "b..org")
    );
    std::fs::write(&file, one_bad).unwrap();
    let snapshot = src.scan(false);
    let a = &snapshot.objects[&ObjectKey::new(Kind::Deployment, "a")];
    let b = &snapshot.objects[&ObjectKey::new(Kind::Deployment, "b")];
    assert!(!a.stale && b.stale);

    // The file parses again without `b`: now `b` is gone.
    std::fs::write(&file, fixtures::deployment_yaml("a", "env", 2)).unwrap();
    let snapshot = src.scan(false);
    assert_eq!(
        snapshot
            .objects
            .keys()
            .map(ToString::to_string)
            .collect::<Vec<_>>(),
        vec!["Deployment/a"]
    );
    assert!(snapshot.errors.is_empty());

    // Deleting the file removes its objects.
    std::fs::remove_file(&file).unwrap();
    assert!(src.scan(false).objects.is_empty());
}

#[test]
fn hidden_files_and_folders_are_ignored_and_yml_is_read() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::create_dir_all(dir.path().join(".git")).unwrap();
    std::fs::write(
        dir.path().join(".git/x.yaml"),
        fixtures::deployment_yaml("git", "e", 1),
    )
    .unwrap();
    std::fs::write(
        dir.path().join(".hidden.yaml"),
        fixtures::deployment_yaml("hidden", "e", 1),
    )
    .unwrap();
    std::fs::write(dir.path().join("notes.txt"), "not yaml").unwrap();
    std::fs::write(
        dir.path().join("short.yml"),
        fixtures::deployment_yaml("short", "e", 1),
    )
    .unwrap();
    let snapshot = source(dir.path()).scan(true);
    assert_eq!(
        snapshot
            .objects
            .keys()
            .map(ToString::to_string)
            .collect::<Vec<_>>(),
        vec!["Deployment/short"]
    );
}

#[test]
fn a_missing_folder_fails_the_snapshot_instead_of_emptying_it() {
    let snapshot = source(std::path::Path::new("/nonexistent/fediversity-objects")).scan(true);
    assert!(!snapshot.is_complete());
    assert!(
        snapshot
            .failure
            .unwrap()
            .contains("/nonexistent/fediversity-objects")
    );
}

/// Writes `content` as the only file of a fresh folder and returns the one problem found and how long
/// loading took.
fn hostile(content: &[u8]) -> (String, Duration) {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("hostile.yaml"), content).unwrap();
    let started = Instant::now();
    let snapshot = source(dir.path()).scan(true);
    let took = started.elapsed();
    assert!(snapshot.objects.is_empty());
    assert_eq!(snapshot.errors.len(), 1, "{:?}", snapshot.errors);
    (snapshot.errors[0].to_string(), took)
}

#[test]
fn a_50_megabyte_file_is_refused_at_once() {
    let mut content = fixtures::deployment_yaml("big", "env", 1).into_bytes();
    content.resize(50 * 1024 * 1024, b'#');
    let (error, took) = hostile(&content);
    assert!(
        error.contains("hostile.yaml:1:1: file is 52428800 bytes, more than the limit"),
        "{error}"
    );
    assert!(took < Duration::from_secs(1), "took {took:?}");
}

#[test]
fn a_billion_laughs_file_is_refused_at_once() {
    let mut text = String::from("a0: &a0 [lol, lol, lol, lol, lol, lol, lol, lol, lol, lol]\n");
    for i in 1..=9 {
        let refs = vec![format!("*a{}", i - 1); 10].join(", ");
        text.push_str(&format!("a{i}: &a{i} [{refs}]\n"));
    }
    let (error, took) = hostile(text.as_bytes());
    assert!(error.contains("alias bomb"), "{error}");
    assert!(took < Duration::from_secs(1), "took {took:?}");
}

#[test]
fn a_ten_thousand_level_nesting_is_refused_at_once() {
    let flow_lists = format!("a: {}{}", "[".repeat(10_000), "]".repeat(10_000));
    let flow_maps = format!("{}x{}", "{k: ".repeat(10_000), "}".repeat(10_000));
    let block_lists = format!("{}x\n", "- ".repeat(10_000));
    for text in [flow_lists, flow_maps, block_lists] {
        let (error, took) = hostile(text.as_bytes());
        assert!(error.contains("nesting too deep"), "{error}");
        assert!(took < Duration::from_secs(1), "took {took:?}");
    }
}

#[test]
fn too_many_documents_in_one_file_are_refused() {
    let (error, _) = hostile("---\na: 1\n".repeat(10_001).as_bytes());
    assert!(error.contains("more than 10000 documents"), "{error}");
}

#[test]
fn binary_garbage_is_refused_with_a_clear_error() {
    let (error, _) = hostile(&[0x61, 0x3a, 0x20, 0xff, 0xfe, 0x00, 0x01]);
    assert!(error.contains("not valid UTF-8"), "{error}");
}

#[tokio::test]
async fn the_watcher_publishes_a_new_snapshot_when_a_file_changes() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join("a.yaml"),
        fixtures::deployment_yaml("a", "env", 1),
    )
    .unwrap();
    let (mut rx, task) = source(dir.path()).watch(Duration::from_millis(50), Duration::from_secs(3600));
    assert_eq!(rx.borrow_and_update().objects.len(), 1);
    std::fs::write(
        dir.path().join("b.yaml"),
        fixtures::deployment_yaml("b", "env", 1),
    )
    .unwrap();
    tokio::time::timeout(Duration::from_secs(10), rx.changed())
        .await
        .expect("a snapshot within 10 s")
        .unwrap();
    assert_eq!(rx.borrow().objects.len(), 2);
    std::fs::remove_file(dir.path().join("a.yaml")).unwrap();
    tokio::time::timeout(Duration::from_secs(10), rx.changed())
        .await
        .expect("a snapshot within 10 s")
        .unwrap();
    assert_eq!(
        rx.borrow()
            .objects
            .keys()
            .map(ToString::to_string)
            .collect::<Vec<_>>(),
        vec!["Deployment/b"]
    );
    drop(rx);
    task.abort();
}

#[tokio::test]
async fn an_unchanged_folder_is_scanned_once_and_not_again_by_its_own_reads() {
    let dir = tempfile::tempdir().unwrap();
    fixtures::write_tree(dir.path(), 200, 20).unwrap();
    let source = source(dir.path());
    let scans = source.scan_counter();
    let (rx, task) = source.watch(Duration::from_millis(50), Duration::from_secs(3600));
    assert_eq!(rx.borrow().objects.len(), 200);
    // Each scan opens every folder it walks; were opens taken for changes, this would be dozens of scans.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let after_rest = scans.load(std::sync::atomic::Ordering::Relaxed);
    assert_eq!(
        after_rest, 1,
        "scans of an unchanged folder over 2 s (only the first load)"
    );
    // Reading the files from outside is not a change either.
    for entry in std::fs::read_dir(dir.path().join("single")).unwrap() {
        std::fs::read(entry.unwrap().path()).unwrap();
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(
        scans.load(std::sync::atomic::Ordering::Relaxed),
        1,
        "scans after another process read every file"
    );
    // A real change still gets exactly one more scan after the burst settles.
    std::fs::write(
        dir.path().join("single").join("new.yaml"),
        fixtures::deployment_yaml("new", "env-0", 1),
    )
    .unwrap();
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while scans.load(std::sync::atomic::Ordering::Relaxed) < 2 && std::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(
        scans.load(std::sync::atomic::Ordering::Relaxed),
        2,
        "scans after one new file"
    );
    drop(rx);
    task.abort();
}
