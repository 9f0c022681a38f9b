//! `fediversity demo`, the README's first command, from the repository's root: the quickstart becomes
//! Ready against the simulations with visible progress, an edit converges while it keeps running, and a
//! broken or missing quickstart is refused with a precise message.

mod common;

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use common::{Demo, repo_root, sigterm, wait_exit};

fn demo(dir: &Path, args: &[&str]) -> (i32, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_fediversity"))
        .current_dir(dir)
        .args(["demo", "--listen", "127.0.0.1:0"])
        .args(args)
        .output()
        .unwrap();
    let mut text = String::from_utf8_lossy(&out.stdout).into_owned();
    text.push_str(&String::from_utf8_lossy(&out.stderr));
    (out.status.code().unwrap_or(-1), text)
}

/// The rows of the table printed under `title`.
fn table<'a>(output: &'a str, title: &str) -> Vec<&'a str> {
    output
        .split(&format!("\n{title}\n"))
        .nth(1)
        .unwrap_or_else(|| panic!("no {title} table in:\n{output}"))
        .lines()
        .skip(1)
        .take_while(|l| !l.is_empty())
        .collect()
}

#[test]
fn the_demo_brings_the_quickstart_to_ready_shows_its_progress_and_exits_zero() {
    // The demo's own deadline: not everything Ready within a minute is a failure (exit 1).
    let (code, output) = demo(&repo_root(), &["--timeout", "60s"]);
    assert_eq!(code, 0, "{output}");
    assert!(output.contains("This is a simulation"), "{output}");
    assert!(output.contains("All 7 objects are Ready after"), "{output}");
    // Progress: every step of both operators' hosts shows, from the VM to its NixOS system.
    for host in [
        "dorpshuis-zuid-mastodon",
        "dorpshuis-zuid-pixelfed",
        "open-archief-matrix",
        "open-archief-peertube",
    ] {
        for step in [
            "reserving a VMID and cloning the template",
            "starting VM",
            "waiting for VM",
            "building its NixOS system",
        ] {
            assert!(
                output.contains(&format!("{host}: {step}")),
                "no `{host}: {step}` progress line in:\n{output}"
            );
        }
    }
    assert!(
        output.contains(": copying, activating and checking /nix/store/"),
        "{output}"
    );
    let deployments = table(&output, "DEPLOYMENTS");
    assert_eq!(deployments.len(), 2, "{output}");
    assert!(
        deployments.iter().all(|row| row.contains(" True ")),
        "{deployments:#?}"
    );
    let hosts = table(&output, "HOSTS");
    assert_eq!(hosts.len(), 4, "{output}");
    assert!(hosts.iter().all(|row| row.contains(" Ready ")), "{hosts:#?}");
    // Every host has its name in the provider's zone, and each operator is told what to set.
    assert!(
        hosts.iter().all(|row| row.contains(".hosting.example.")),
        "{hosts:#?}"
    );
    for host in ["dorpshuis-zuid-mastodon", "open-archief-peertube"] {
        assert!(
            output.contains(&format!("  {host}.hosting.example. A 10.80.")),
            "no A record of {host} in:\n{output}"
        );
    }
    assert!(
        output.contains(
            "  mastodon.social.dorpshuis-zuid.example. CNAME dorpshuis-zuid-mastodon.hosting.example."
        ),
        "{output}"
    );
    assert!(
        table(&output, "RUNTIME ENVIRONMENTS")[0].contains(" True "),
        "{output}"
    );
    assert!(output.contains("Stopped cleanly after"), "{output}");
    // The temporary working copy is gone after a successful run.
    let copy = output
        .split("into the working copy ")
        .nth(1)
        .and_then(|rest| rest.lines().next())
        .expect("the working copy is named");
    assert!(!Path::new(copy).exists(), "{copy} was left behind");
}

#[test]
fn while_it_keeps_running_an_edit_of_the_working_copy_converges_and_sigterm_stops_it_cleanly() {
    let work = tempfile::tempdir().unwrap();
    let work_dir = work.path().display().to_string();
    let mut demo = Demo::spawn(&["--latency-scale", "0.05", "--work-dir", &work_dir]);
    let ready = demo.wait_line("All 7 objects are Ready", 0, Duration::from_secs(60));
    demo.wait_line("Still running", ready, Duration::from_secs(10));
    let file = work.path().join("source/deployments/dorpshuis-zuid.yaml");
    let text = std::fs::read_to_string(&file).unwrap();
    let edited = text.replace("registrations: approval", "registrations: open");
    assert_ne!(text, edited);
    std::fs::write(&file, edited).unwrap();
    let rebuilt = demo.wait_line(
        "dorpshuis-zuid-mastodon: building its NixOS system",
        ready,
        Duration::from_secs(30),
    );
    demo.wait_line("NixOS generation 2", rebuilt, Duration::from_secs(30));
    let output = demo.output();
    assert!(
        !output[output.find("Still running").unwrap()..].contains("dorpshuis-zuid-pixelfed: building"),
        "only the edited host is rebuilt:\n{output}"
    );
    sigterm(&demo.child);
    assert_eq!(
        wait_exit(&mut demo.child, Duration::from_secs(20)),
        0,
        "{}",
        demo.output()
    );
    assert!(demo.output().contains("Stopped cleanly"), "{}", demo.output());
    // A folder given with --work-dir is kept, with the controller's log.
    assert!(work.path().join("controller.log").is_file());
}

#[test]
fn a_broken_quickstart_is_refused_with_its_file_and_line_and_nothing_starts() {
    let dir = tempfile::tempdir().unwrap();
    let quickstart = dir.path().join("quickstart");
    std::fs::create_dir_all(quickstart.join("deployments")).unwrap();
    std::fs::copy(
        repo_root().join("examples/quickstart/environment.yaml"),
        quickstart.join("environment.yaml"),
    )
    .unwrap();
    let deployment =
        std::fs::read_to_string(repo_root().join("examples/quickstart/deployments/open-archief.yaml"))
            .unwrap();
    std::fs::write(
        quickstart.join("deployments/open-archief.yaml"),
        deployment.replace("  domain:", "  domian:"),
    )
    .unwrap();
    let (code, output) = demo(&repo_root(), &["--quickstart", &quickstart.display().to_string()]);
    assert_eq!(code, 1, "{output}");
    assert!(output.contains("open-archief.yaml:"), "{output}");
    assert!(output.contains("domian"), "{output}");
    assert!(output.contains("is not valid"), "{output}");
    assert!(!output.contains("controller running"), "{output}");
}

#[test]
fn a_work_dir_holding_other_files_is_refused_and_left_as_it_is() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::create_dir_all(dir.path().join("state")).unwrap();
    std::fs::write(dir.path().join("state/precious"), "keep me").unwrap();
    let (code, output) = demo(&repo_root(), &["--work-dir", &dir.path().display().to_string()]);
    assert_ne!(code, 0, "{output}");
    assert!(
        output.contains("neither empty nor an earlier demo's folder"),
        "{output}"
    );
    assert_eq!(
        std::fs::read_to_string(dir.path().join("state/precious")).unwrap(),
        "keep me"
    );
}

#[test]
fn outside_the_repository_the_demo_says_where_to_run_it() {
    let dir = tempfile::tempdir().unwrap();
    let (code, output) = demo(dir.path(), &[]);
    assert_ne!(code, 0, "{output}");
    assert!(
        output.contains("run the demo from the repository's root"),
        "{output}"
    );
    assert!(!output.contains("controller running"), "{output}");
}
