//! The directory walker under hostile file systems: link loops, links outside the root, files replaced by
//! dangling links, FIFOs and devices. None may hang the walk, leave the root, or read as a deletion.

use std::os::unix::fs::symlink;
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use fediversity::api::{Kind, ObjectKey};
use fediversity::fixtures;
use fediversity::source::Snapshot;
use fediversity::source::dir::DirSource;
use fediversity::yaml::Limits;

/// Scans `dir` on another thread and fails if that takes more than a few seconds (a walk without end).
fn scan_within(src: DirSource, limit: Duration) -> (DirSource, Snapshot) {
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let mut src = src;
        let snapshot = src.scan(false);
        let _ = tx.send((src, snapshot));
    });
    rx.recv_timeout(limit)
        .expect("the scan did not end: the walker loops or blocks")
}

fn source(dir: &Path) -> DirSource {
    DirSource::new(vec![dir.to_path_buf()], Limits::default())
}

fn key(name: &str) -> ObjectKey {
    ObjectKey::new(Kind::Deployment, name)
}

/// Makes something at a path.
type Maker = dyn Fn(&Path);

fn mkfifo(path: &Path) {
    let status = Command::new("mkfifo").arg(path).status().unwrap();
    assert!(status.success());
}

#[test]
fn links_to_folders_are_never_followed_so_link_loops_end_and_the_walk_stays_inside_the_root() {
    let outer = tempfile::tempdir().unwrap();
    std::fs::write(
        outer.path().join("outside.yaml"),
        fixtures::deployment_yaml("outside", "env", 1),
    )
    .unwrap();
    let root = outer.path().join("objects");
    std::fs::create_dir_all(root.join("sub")).unwrap();
    std::fs::write(root.join("sub/a.yaml"), fixtures::deployment_yaml("a", "env", 1)).unwrap();
    symlink(".", root.join("loop1")).unwrap();
    symlink(".", root.join("loop2")).unwrap();
    symlink("..", root.join("sub/up")).unwrap();
    symlink("..", root.join("parent")).unwrap();
    // Even a link to a folder named like a YAML file is not followed.
    symlink("sub", root.join("folder.yaml")).unwrap();

    let started = Instant::now();
    let (_, snapshot) = scan_within(source(&root), Duration::from_secs(10));
    assert!(
        started.elapsed() < Duration::from_secs(2),
        "{:?}",
        started.elapsed()
    );
    assert!(snapshot.errors.is_empty(), "{:?}", snapshot.errors);
    assert_eq!(
        snapshot.objects.keys().cloned().collect::<Vec<_>>(),
        vec![key("a")]
    );
}

#[test]
fn a_link_to_a_file_outside_the_root_is_refused_and_one_inside_is_read() {
    let outer = tempfile::tempdir().unwrap();
    std::fs::write(
        outer.path().join("secret.yaml"),
        fixtures::deployment_yaml("secret", "env", 1),
    )
    .unwrap();
    let root = outer.path().join("objects");
    std::fs::create_dir_all(root.join(".data")).unwrap();
    std::fs::write(
        root.join(".data/b.yaml"),
        fixtures::deployment_yaml("b", "env", 1),
    )
    .unwrap();
    // The layout of a Kubernetes ConfigMap mount: visible links into a hidden folder.
    symlink(".data/b.yaml", root.join("b.yaml")).unwrap();
    symlink("../secret.yaml", root.join("steal.yaml")).unwrap();
    symlink("/etc/passwd", root.join("passwd.yaml")).unwrap();

    let (_, snapshot) = scan_within(source(&root), Duration::from_secs(10));
    assert_eq!(
        snapshot.objects.keys().cloned().collect::<Vec<_>>(),
        vec![key("b")]
    );
    let errors: Vec<String> = snapshot.errors.iter().map(ToString::to_string).collect();
    assert_eq!(errors.len(), 2, "{errors:?}");
    for (error, file) in errors.iter().zip(["passwd.yaml", "steal.yaml"]) {
        assert!(error.contains(file), "{error}");
        assert!(error.contains("points outside the source folder"), "{error}");
        assert!(
            !error.contains("root:"),
            "nothing of the target is shown: {error}"
        );
    }
}

#[test]
fn a_file_replaced_by_a_dangling_link_a_fifo_or_a_device_keeps_its_objects_stale() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("d.yaml");
    std::fs::write(&file, fixtures::deployment_yaml("a", "env", 1)).unwrap();
    let (mut src, first) = scan_within(source(dir.path()), Duration::from_secs(10));
    assert!(first.errors.is_empty() && first.objects.len() == 1);

    let replace = |make: &Maker| {
        // Replaced atomically, as a deploy tool would: made aside, then renamed over the file.
        let aside = dir.path().join(".new");
        make(&aside);
        std::fs::rename(&aside, &file).unwrap();
    };
    let cases: [(&str, &Maker); 3] = [
        ("a link to a file that does not exist", &|p: &Path| {
            symlink("missing.yaml", p).unwrap();
        }),
        ("a FIFO", &|p: &Path| mkfifo(p)),
        ("a device", &|p: &Path| {
            // A device node needs privileges; without them, a link to one stands in (refused as well).
            let made = Command::new("mknod")
                .arg(p)
                .args(["c", "1", "3"])
                .stderr(std::process::Stdio::null())
                .status()
                .is_ok_and(|s| s.success());
            if !made {
                symlink("/dev/null", p).unwrap();
            }
        }),
    ];
    for (what, make) in cases {
        replace(make);
        let (next, snapshot) = scan_within(src, Duration::from_secs(10));
        src = next;
        let object = snapshot
            .objects
            .get(&key("a"))
            .unwrap_or_else(|| panic!("{what}: the object must not read as deleted"));
        assert!(object.stale, "{what}");
        let errors: Vec<String> = snapshot.errors.iter().map(ToString::to_string).collect();
        assert!(
            errors
                .iter()
                .any(|e| e.contains("d.yaml:1:1: cannot read the file")),
            "{what}: {errors:?}"
        );
        assert!(
            errors
                .iter()
                .any(|e| e.contains("keeping the last good version of Deployment/a")),
            "{what}: {errors:?}"
        );
    }

    // A regular file again: fresh, no problems.
    std::fs::remove_file(&file).unwrap();
    std::fs::write(&file, fixtures::deployment_yaml("a", "env", 2)).unwrap();
    let (_, snapshot) = scan_within(src, Duration::from_secs(10));
    assert!(snapshot.errors.is_empty(), "{:?}", snapshot.errors);
    assert!(!snapshot.objects[&key("a")].stale);
}

mod common;

fn events_with(daemon: &common::Daemon, reason: &str) -> Vec<serde_json::Value> {
    common::api(daemon, "events")["items"]
        .as_array()
        .cloned()
        .unwrap_or_default()
        .into_iter()
        .filter(|e| e["reason"] == reason)
        .collect()
}

#[test]
fn the_daemon_reports_a_problem_once_when_it_appears_and_once_when_it_clears_and_a_failing_source_turns_stale()
 {
    let outer = tempfile::tempdir().unwrap();
    let state = tempfile::tempdir().unwrap();
    let root = outer.path().join("objects");
    std::fs::create_dir_all(&root).unwrap();
    let file = root.join("d.yaml");
    let good = fixtures::deployment_yaml("a", "env", 1);
    std::fs::write(&file, &good).unwrap();
    let args: Vec<std::ffi::OsString> = vec![
        "--source".into(),
        root.clone().into(),
        "--state-dir".into(),
        state.path().into(),
        "--provider".into(),
        "plan-only".into(),
        "--rescan".into(),
        "1s".into(),
    ];
    let daemon = common::spawn(&args);
    common::wait_for("the daemon to become ready", Duration::from_secs(20), || {
        common::http_get(&daemon.server, "/readyz")
            .is_some_and(|(code, _)| code == 200)
            .then_some(())
    });

    // Nothing else changes: the file becomes a FIFO. The object stays (stale), and the problem is evented.
    std::fs::remove_file(&file).unwrap();
    mkfifo(&file);
    let event = common::wait_for("a SourceProblem event", Duration::from_secs(10), || {
        events_with(&daemon, "SourceProblem").into_iter().next()
    });
    assert_eq!(event["object"]["name"], "a", "{event}");
    assert!(event["message"].as_str().unwrap().contains("FIFO"), "{event}");
    let object = common::api(&daemon, "deployments/a");
    assert!(
        object["metadata"]["annotations"]["fediversity.eu/source"]
            .as_str()
            .unwrap()
            .contains("stale"),
        "{object}"
    );
    // Several rescans later, still one event per problem.
    std::thread::sleep(Duration::from_millis(2500));
    let problems = events_with(&daemon, "SourceProblem").len();
    assert_eq!(problems, 2, "the FIFO and the kept objects, once each");

    std::fs::remove_file(&file).unwrap();
    std::fs::write(&file, &good).unwrap();
    common::wait_for("SourceProblemCleared events", Duration::from_secs(10), || {
        (events_with(&daemon, "SourceProblemCleared").len() == 2).then_some(())
    });

    // The whole folder goes away: the source fails, and after three intervals it is stale.
    std::fs::rename(&root, outer.path().join("gone")).unwrap();
    let stale = common::wait_for("the source to turn stale", Duration::from_secs(15), || {
        let sources = common::api(&daemon, "sources");
        sources["items"][0]["stale"].as_str().map(str::to_owned)
    });
    assert!(stale.contains("three of its 1 s intervals"), "{stale}");
    let (_, metrics) = common::http_get(&daemon.server, "/metrics").unwrap();
    assert!(
        metrics.contains("fediversity_source_stale{source=\"objects\"} 1"),
        "{metrics}"
    );
    assert!(common::api(&daemon, "deployments/a")["metadata"]["name"] == "a");
    std::fs::rename(outer.path().join("gone"), &root).unwrap();
    common::wait_for("the source to be fresh again", Duration::from_secs(15), || {
        let sources = common::api(&daemon, "sources");
        sources["items"][0]["stale"].is_null().then_some(())
    });
}
