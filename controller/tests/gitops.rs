//! GitOps end to end: the real daemon follows real git repositories (bare repositories over `file://`
//! and over ssh to a loopback sshd), records commits as revisions, keeps a broken file's last good
//! objects, and removes nothing when a commit deletes everything, the remote is unreachable, or the
//! branch was force-pushed to another history.

mod common;
mod sources_support;

use std::time::{Duration, Instant};

use sources_support::{
    Repo, Sshd, api, cli, metric, ready, source, start_with, token_file, wait_for, wait_ready,
};

#[test]
fn a_commit_that_edits_a_deployment_is_reconciled_and_shows_that_commit_as_last_applied_revision() {
    let (repo, first) = Repo::with_examples();
    let state = tempfile::tempdir().unwrap();
    let secrets = tempfile::tempdir().unwrap();
    let token = token_file(secrets.path(), "t0ken-for-tests");
    let daemon = start_with(
        &[
            format!("--source=ops={}", repo.url()),
            "--poll-interval=200ms".into(),
            format!("--api-token-file={}", token.display()),
        ],
        state.path(),
    );
    wait_ready(&daemon);
    wait_for(
        "the Deployment at the first commit",
        Duration::from_secs(10),
        || {
            let d = api(&daemon, "deployments/uni-utrecht");
            (d["status"]["lastAppliedRevision"] == first.as_str()).then_some(())
        },
    );

    repo.edit(
        "deployments/uni-utrecht.yaml",
        "enabled: false           # listed but off: no VM",
        "enabled: true",
    );
    let pushed = Instant::now();
    let second = repo.commit("turn peertube on");
    wait_for("the edit to be reconciled", Duration::from_secs(10), || {
        let d = api(&daemon, "deployments/uni-utrecht");
        (d["status"]["lastAppliedRevision"] == second.as_str()).then_some(())
    });
    let latency = pushed.elapsed();
    eprintln!("commit to lastAppliedRevision with a 200 ms poll: {latency:?}");
    assert!(latency < Duration::from_secs(3), "{latency:?}");
    let d = api(&daemon, "deployments/uni-utrecht");
    assert_eq!(d["status"]["lastAttemptedRevision"], second.as_str());
    assert_eq!(d["status"]["observedGeneration"], 2);
    assert_eq!(d["status"]["hosts"].as_array().map(Vec::len), Some(3), "{d}");
    assert_eq!(ready(&d).map(|r| r.0).as_deref(), Some("True"));
    assert_eq!(d["metadata"]["annotations"]["fediversity.eu/source-name"], "ops");
    assert_eq!(
        d["metadata"]["annotations"]["fediversity.eu/source"],
        "deployments/uni-utrecht.yaml:3"
    );

    // The source's own status: in the API, the CLI and the metrics.
    let ops = source(&daemon, "ops");
    assert_eq!(ops["type"], "git");
    assert_eq!(ops["revision"], second.as_str());
    assert_eq!(ops["appliedRevision"], second.as_str());
    assert!(ops["lastFetchTime"].is_string(), "{ops}");
    assert!(ops["lastError"].is_null(), "{ops}");
    let (code, table) = cli(&daemon, &["get", "sources"]);
    assert_eq!(code, 0, "{table}");
    assert!(table.starts_with("NAME "), "{table}");
    assert!(
        table.contains("ops") && table.contains(&second[..12]) && table.contains("Ready"),
        "{table}"
    );
    assert!(
        metric(
            &daemon,
            "fediversity_source_last_fetch_timestamp_seconds{source=\"ops\"}"
        )
        .is_some_and(|t| t > 1e9)
    );
    assert!(
        metric(
            &daemon,
            &format!("fediversity_source_info{{revision=\"{second}\",source=\"ops\",type=\"git\"}}")
        ) == Some(1.0)
    );

    // A git-owned object cannot be changed over the API, and the refusal names the owner.
    let file = repo.work().join("deployments/uni-utrecht.yaml");
    let (code, out) = cli(
        &daemon,
        &[
            "apply",
            "-f",
            file.to_str().unwrap(),
            "--token-file",
            token.to_str().unwrap(),
        ],
    );
    assert_ne!(code, 0, "{out}");
    assert!(out.contains("belongs to source `ops`"), "{out}");
    let (code, out) = cli(
        &daemon,
        &[
            "delete",
            "deployment",
            "uni-utrecht",
            "--token-file",
            token.to_str().unwrap(),
        ],
    );
    assert_ne!(code, 0, "{out}");
    assert!(out.contains("belongs to source `ops`"), "{out}");
    assert!(api(&daemon, "deployments/uni-utrecht")["metadata"]["name"] == "uni-utrecht");
}

#[test]
fn reconcile_with_source_and_wait_returns_once_the_object_reflects_the_newest_commit() {
    let (repo, _) = Repo::with_examples();
    let state = tempfile::tempdir().unwrap();
    // Polls are rare: only the on-demand fetch can bring the new commit in time.
    let daemon = start_with(
        &[
            format!("--source=ops={}", repo.url()),
            "--poll-interval=1h".into(),
        ],
        state.path(),
    );
    wait_ready(&daemon);
    repo.edit(
        "deployments/uni-utrecht.yaml",
        "registrations: approval",
        "registrations: open",
    );
    let newest = repo.commit("open registrations");
    let started = Instant::now();
    let (code, out) = cli(
        &daemon,
        &[
            "reconcile",
            "deployment",
            "uni-utrecht",
            "--with-source",
            "--wait",
            "--timeout",
            "20s",
        ],
    );
    let took = started.elapsed();
    eprintln!("reconcile --with-source --wait: {took:?}");
    assert_eq!(code, 0, "{out}");
    assert!(out.contains(&format!("source/ops: applied {newest}")), "{out}");
    assert!(out.contains("reconciled, Ready"), "{out}");
    // No waiting here: when the command returns, the object already shows the newest commit.
    let d = api(&daemon, "deployments/uni-utrecht");
    assert_eq!(d["status"]["lastAppliedRevision"], newest.as_str(), "{d}");
    assert_eq!(
        d["spec"]["applications"]["mastodon"]["settings"]["registrations"],
        "open"
    );

    // `reconcile source NAME --wait` alone fetches and reports the commit.
    let (code, out) = cli(
        &daemon,
        &["reconcile", "source", "ops", "--wait", "--timeout", "20s"],
    );
    assert_eq!(code, 0, "{out}");
    assert!(out.contains(&newest), "{out}");
}

#[test]
fn a_commit_that_breaks_one_file_keeps_its_last_good_objects_and_reports_commit_file_and_line() {
    let (repo, first) = Repo::with_examples();
    let state = tempfile::tempdir().unwrap();
    let daemon = start_with(
        &[
            format!("--source=ops={}", repo.url()),
            "--poll-interval=1h".into(),
        ],
        state.path(),
    );
    wait_ready(&daemon);
    repo.edit(
        "deployments/uni-utrecht.yaml",
        "enabled: true            # no size",
        "enabled: yes            # no size",
    );
    repo.edit(
        "deployments/uni-utrecht.yaml",
        "domain: social.uu.nl",
        "domain: social.example.org",
    );
    let broken = repo.commit("a typo");
    let (code, out) = cli(
        &daemon,
        &["reconcile", "source", "ops", "--wait", "--timeout", "20s"],
    );
    assert_eq!(code, 0, "{out}");

    let ops = source(&daemon, "ops");
    assert_eq!(ops["revision"], broken.as_str());
    let errors = ops["errors"].to_string();
    let expected = format!(
        "{}:deployments/uni-utrecht.yaml:21:16: document 1: spec.applications.pixelfed.enabled: expected a boolean",
        &broken[..12]
    );
    assert!(errors.contains(&expected), "{errors}\nexpected {expected}");
    assert!(
        errors.contains("keeping the last good version of Deployment/uni-utrecht"),
        "{errors}"
    );
    // The last good version stays in force, unchanged.
    let d = api(&daemon, "deployments/uni-utrecht");
    assert_eq!(d["spec"]["domain"], "social.uu.nl");
    assert_eq!(d["metadata"]["generation"], 1);
    assert!(
        d["metadata"]["annotations"]["fediversity.eu/source"]
            .as_str()
            .is_some_and(|s| s.contains("stale")),
        "{d}"
    );
    assert_eq!(d["status"]["lastAppliedRevision"], first.as_str());
    let (_, table) = cli(&daemon, &["get", "sources"]);
    assert!(
        table.contains("1 problem") || table.contains("2 problem"),
        "{table}"
    );

    // The fix is picked up.
    repo.edit("deployments/uni-utrecht.yaml", "enabled: yes ", "enabled: true ");
    let fixed = repo.commit("fix the typo");
    let (code, out) = cli(
        &daemon,
        &["reconcile", "source", "ops", "--wait", "--timeout", "20s"],
    );
    assert_eq!(code, 0, "{out}");
    wait_for("the fixed Deployment", Duration::from_secs(10), || {
        let d = api(&daemon, "deployments/uni-utrecht");
        (d["status"]["lastAppliedRevision"] == fixed.as_str() && d["spec"]["domain"] == "social.example.org")
            .then_some(())
    });
    assert!(
        source(&daemon, "ops")["errors"]
            .as_array()
            .is_some_and(Vec::is_empty)
    );
}

#[test]
fn deleting_everything_an_unreachable_remote_and_a_force_push_delete_nothing_and_say_why() {
    let (repo, first) = Repo::with_examples();
    let state = tempfile::tempdir().unwrap();
    let daemon = start_with(
        &[
            format!("--source=ops={}", repo.url()),
            "--poll-interval=1h".into(),
        ],
        state.path(),
    );
    wait_ready(&daemon);
    let count = |daemon: &common::Daemon| {
        ["deployments", "applications", "runtimeenvironments"]
            .iter()
            .map(|k| api(daemon, k)["items"].as_array().map_or(0, Vec::len))
            .sum::<usize>()
    };
    assert_eq!(count(&daemon), 7);
    wait_for("the Deployment to be Ready", Duration::from_secs(10), || {
        (ready(&api(&daemon, "deployments/uni-utrecht"))
            .map(|r| r.0)
            .as_deref()
            == Some("True"))
        .then_some(())
    });

    // 1. A commit that deletes every file.
    for folder in ["deployments", "applications", "environments"] {
        std::fs::remove_dir_all(repo.work().join(folder)).unwrap();
    }
    let emptied = repo.commit("delete everything");
    let (code, out) = cli(
        &daemon,
        &["reconcile", "source", "ops", "--wait", "--timeout", "20s"],
    );
    assert_eq!(code, 1, "a held removal is reported as not healthy: {out}");
    assert!(out.contains("allowEmpty"), "{out}");
    let ops = source(&daemon, "ops");
    assert_eq!(ops["revision"], emptied.as_str());
    assert_eq!(ops["appliedRevision"], first.as_str());
    assert_eq!(ops["pruneBlocked"]["reason"], "EmptySnapshot", "{ops}");
    assert_eq!(ops["pruneBlocked"]["objects"].as_array().map(Vec::len), Some(7));
    assert_eq!(count(&daemon), 7, "nothing was removed");
    assert_eq!(
        metric(&daemon, "fediversity_source_prune_blocked{source=\"ops\"}"),
        Some(7.0)
    );
    let events = api(&daemon, "events?kind=Deployment&name=uni-utrecht").to_string();
    assert!(
        events.contains("PruneBlocked") && events.contains("Warning"),
        "{events}"
    );
    let (_, table) = cli(&daemon, &["get", "sources"]);
    assert!(
        table.contains("PruneBlocked (EmptySnapshot): 7 object(s) kept"),
        "{table}"
    );

    // 2. A force-push to an unrelated history holding only part of the objects.
    std::fs::remove_dir_all(repo.work().join(".git")).unwrap();
    sources_support::git(&repo.work(), &["init", "--quiet"]);
    common::copy_examples(&repo.work());
    std::fs::remove_dir_all(repo.work().join("deployments")).unwrap();
    let unrelated = repo.commit("another history");
    let (code, out) = cli(
        &daemon,
        &["reconcile", "source", "ops", "--wait", "--timeout", "20s"],
    );
    assert_eq!(code, 1, "{out}");
    assert!(
        out.contains("does not descend") && out.contains("allowForcePush"),
        "{out}"
    );
    let ops = source(&daemon, "ops");
    assert_eq!(ops["revision"], unrelated.as_str());
    assert_eq!(ops["pruneBlocked"]["reason"], "NotADescendant", "{ops}");
    assert_eq!(
        ops["pruneBlocked"]["objects"],
        serde_json::json!(["Deployment/uni-utrecht"])
    );
    assert_eq!(
        api(&daemon, "deployments/uni-utrecht")["metadata"]["name"],
        "uni-utrecht"
    );
    assert_eq!(count(&daemon), 7);

    // 3. An unreachable remote.
    std::fs::rename(repo.remote(), repo.root.path().join("moved.git")).unwrap();
    let (code, out) = cli(
        &daemon,
        &["reconcile", "source", "ops", "--wait", "--timeout", "20s"],
    );
    assert_eq!(code, 1, "{out}");
    assert!(out.contains("fetch failed") && out.contains("fetching"), "{out}");
    let ops = source(&daemon, "ops");
    assert!(
        ops["lastError"]
            .as_str()
            .is_some_and(|e| e.contains("remote.git")),
        "{ops}"
    );
    assert_eq!(count(&daemon), 7);
    assert!(
        metric(&daemon, "fediversity_source_fetch_failures_total{source=\"ops\"}").is_some_and(|n| n >= 1.0)
    );
    let (_, table) = cli(&daemon, &["get", "sources"]);
    assert!(table.contains("Failed: fetching"), "{table}");
    // The Deployment was never cleaned up: it still has its status.
    assert_eq!(
        ready(&api(&daemon, "deployments/uni-utrecht"))
            .map(|r| r.0)
            .as_deref(),
        Some("True")
    );
}

#[test]
fn two_sources_split_the_objects_and_one_defined_twice_is_an_error_on_both() {
    let (provider, _) = Repo::with_examples();
    std::fs::remove_dir_all(provider.work().join("deployments")).unwrap();
    provider.commit("the provider keeps environments and the catalog");
    let operators = tempfile::tempdir().unwrap();
    sources_support::git(operators.path(), &["init", "--quiet", "--bare", "remote.git"]);
    sources_support::git(operators.path(), &["init", "--quiet", "work"]);
    let ops_repo = Repo { root: operators };
    std::fs::create_dir_all(ops_repo.work().join("tenants/deployments")).unwrap();
    std::fs::copy(
        common::examples().join("deployments/uni-utrecht.yaml"),
        ops_repo.work().join("tenants/deployments/uni-utrecht.yaml"),
    )
    .unwrap();
    std::fs::write(ops_repo.work().join("README.yaml"), "not: an object\n").unwrap();
    ops_repo.commit("first tenant");
    let state = tempfile::tempdir().unwrap();
    let operators_url = format!("git+file://{}?path=tenants#main", ops_repo.remote().display());
    let daemon = start_with(
        &[
            format!("--source=provider={}", provider.url()),
            format!("--source=operators={operators_url}"),
            "--poll-interval=1h".into(),
        ],
        state.path(),
    );
    wait_ready(&daemon);
    wait_for("the Deployment to be Ready", Duration::from_secs(10), || {
        (ready(&api(&daemon, "deployments/uni-utrecht"))
            .map(|r| r.0)
            .as_deref()
            == Some("True"))
        .then_some(())
    });
    let d = api(&daemon, "deployments/uni-utrecht");
    assert_eq!(
        d["metadata"]["annotations"]["fediversity.eu/source-name"],
        "operators"
    );
    // Only the path is loaded: the stray file at the top is not.
    assert!(
        source(&daemon, "operators")["errors"]
            .as_array()
            .is_some_and(Vec::is_empty)
    );

    // The operators' repository now also defines an Application of the provider's catalog.
    std::fs::copy(
        common::examples().join("quickstart/applications/mastodon.yaml"),
        ops_repo.work().join("tenants/mastodon.yaml"),
    )
    .unwrap();
    ops_repo.edit(
        "tenants/mastodon.yaml",
        "displayName: Mastodon",
        "displayName: Not Mastodon",
    );
    ops_repo.commit("a second catalog entry");
    let (code, out) = cli(
        &daemon,
        &["reconcile", "source", "operators", "--wait", "--timeout", "20s"],
    );
    assert_eq!(code, 0, "{out}");
    for name in ["provider", "operators"] {
        let errors = source(&daemon, name)["errors"].to_string();
        assert!(
            errors.contains("Application/mastodon is also defined by source"),
            "{name}: {errors}"
        );
    }
    let app = api(&daemon, "applications/mastodon");
    assert_eq!(
        app["metadata"]["annotations"]["fediversity.eu/source-name"],
        "provider"
    );
    assert_eq!(app["spec"]["displayName"], "Mastodon", "no silent override");
}

#[test]
fn a_repository_over_ssh_to_a_loopback_sshd_is_followed_and_its_loss_removes_nothing() {
    let mut sshd = Sshd::start();
    let (repo, first) = Repo::with_examples();
    let state = tempfile::tempdir().unwrap();
    let url = format!(
        "git+ssh://root@127.0.0.1:{}{}#main",
        sshd.port,
        repo.remote().display()
    );
    let daemon = start_with(
        &[
            format!("--source=ops={url}"),
            "--poll-interval=1h".into(),
            format!("--git-ssh-command={}", sshd.ssh_command()),
        ],
        state.path(),
    );
    wait_ready(&daemon);
    wait_for(
        "the Deployment at the first commit",
        Duration::from_secs(10),
        || {
            (api(&daemon, "deployments/uni-utrecht")["status"]["lastAppliedRevision"] == first.as_str())
                .then_some(())
        },
    );
    repo.edit(
        "deployments/uni-utrecht.yaml",
        "registrations: approval",
        "registrations: closed",
    );
    let second = repo.commit("close registrations");
    let started = Instant::now();
    let (code, out) = cli(
        &daemon,
        &["reconcile", "source", "ops", "--wait", "--timeout", "30s"],
    );
    eprintln!("fetch over ssh and apply: {:?}", started.elapsed());
    assert_eq!(code, 0, "{out}");
    wait_for("the commit fetched over ssh", Duration::from_secs(10), || {
        (api(&daemon, "deployments/uni-utrecht")["status"]["lastAppliedRevision"] == second.as_str())
            .then_some(())
    });
    assert!(
        source(&daemon, "ops")["location"]
            .as_str()
            .is_some_and(|l| l.starts_with("git+ssh://root@127.0.0.1"))
    );

    sshd.stop();
    let (code, out) = cli(
        &daemon,
        &["reconcile", "source", "ops", "--wait", "--timeout", "40s"],
    );
    assert_eq!(code, 1, "{out}");
    assert!(out.contains("fetch failed"), "{out}");
    assert_eq!(
        api(&daemon, "deployments/uni-utrecht")["metadata"]["name"],
        "uni-utrecht"
    );
}
