//! The hostile-input corpus: every file of `tests/hostile/` is validated by the real binary and must give
//! the exit code, file, line and message its line in `tests/hostile/expected.txt` names; the file-system
//! oddities (links, FIFOs, devices, unreadable files, sizes) are made here, each with the same checks.

use std::os::unix::fs::symlink;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use fediversity::fixtures;

/// One expected outcome.
struct Case {
    exit: i32,
    /// Which file and line the problem must be reported at.
    at: Option<(PathBuf, usize)>,
    says: String,
    never: Option<String>,
}

/// Runs `fediversity validate PATH` (at most 20 s) and checks the outcome; returns a failure, if any.
fn check(name: &str, path: &Path, case: &Case) -> Option<String> {
    let started = Instant::now();
    let out = Command::new(env!("CARGO_BIN_EXE_fediversity"))
        .arg("validate")
        .arg(path)
        .output()
        .unwrap();
    let elapsed = started.elapsed();
    let mut text = String::from_utf8_lossy(&out.stdout).into_owned();
    text.push_str(&String::from_utf8_lossy(&out.stderr));
    let code = out.status.code().unwrap_or(-1);
    let mut wrong = Vec::new();
    if code != case.exit {
        wrong.push(format!("exit code {code}, expected {}", case.exit));
    }
    if let Some((file, line)) = &case.at {
        let location = format!("{}:{line}:", file.display());
        if !text.contains(&location) {
            wrong.push(format!("no problem at {location}"));
        }
    }
    if !text.contains(&case.says) {
        wrong.push(format!("does not say {:?}", case.says));
    }
    if let Some(never) = &case.never
        && text.contains(never.as_str())
    {
        wrong.push(format!("shows {never:?}"));
    }
    if text.chars().any(|c| c.is_control() && c != '\n' && c != '\t') {
        wrong.push("prints a raw control character".into());
    }
    if elapsed > Duration::from_secs(20) {
        wrong.push(format!("took {elapsed:?}"));
    }
    (!wrong.is_empty()).then(|| format!("{name}: {}\n{text}", wrong.join("; ")))
}

fn corpus() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/hostile")
}

#[test]
fn every_file_of_the_hostile_corpus_gets_its_exit_code_line_and_message() {
    let manifest = std::fs::read_to_string(corpus().join("expected.txt")).unwrap();
    let mut named = Vec::new();
    let mut failures = Vec::new();
    for line in manifest
        .lines()
        .filter(|l| !l.starts_with('#') && !l.trim().is_empty())
    {
        let fields: Vec<&str> = line.split(" | ").map(str::trim).collect();
        let [file, exit, at, says, never] = fields[..] else {
            panic!("malformed line in expected.txt: {line}");
        };
        let path = corpus().join(file);
        let case = Case {
            exit: exit.parse().unwrap(),
            at: (at != "-").then(|| (path.clone(), at.parse().unwrap())),
            says: says.to_owned(),
            never: (never != "-").then(|| never.to_owned()),
        };
        failures.extend(check(file, &path, &case));
        named.push(file.to_owned());
    }
    let mut files: Vec<String> = std::fs::read_dir(corpus())
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.ends_with(".yaml"))
        .collect();
    files.sort();
    named.sort();
    assert_eq!(files, named, "every corpus file has exactly one expected outcome");
    assert!(named.len() >= 40, "{} cases", named.len());
    assert!(failures.is_empty(), "{}", failures.join("\n\n"));
}

/// A folder holding one valid Deployment, to which a case adds its oddity.
fn folder() -> (tempfile::TempDir, PathBuf) {
    let outer = tempfile::tempdir().unwrap();
    let root = outer.path().join("objects");
    std::fs::create_dir_all(&root).unwrap();
    std::fs::write(
        root.join("good.yaml"),
        fixtures::deployment_yaml("good", "env", 1),
    )
    .unwrap();
    (outer, root)
}

fn valid(says: &str) -> Case {
    Case {
        exit: 0,
        at: None,
        says: says.to_owned(),
        never: None,
    }
}

fn problem(file: PathBuf, line: usize, says: &str) -> Case {
    Case {
        exit: 1,
        at: Some((file, line)),
        says: says.to_owned(),
        never: None,
    }
}

#[test]
fn file_system_oddities_are_problems_of_their_file_and_never_hang_or_leave_the_folder() {
    let mut failures = Vec::new();
    let mut run = |name: &str, root: &Path, case: Case| failures.extend(check(name, root, &case));

    let (_keep, root) = folder();
    symlink(".", root.join("loop-a")).unwrap();
    symlink(".", root.join("loop-b")).unwrap();
    symlink("..", root.join("parent")).unwrap();
    run("link loops", &root, valid("valid: 1 objects"));

    let (_keep, root) = folder();
    symlink("nowhere.yaml", root.join("dangling.yaml")).unwrap();
    run(
        "dangling link",
        &root,
        problem(
            root.join("dangling.yaml"),
            1,
            "a link to a file that does not exist",
        ),
    );

    let (_keep, root) = folder();
    let fifo = root.join("pipe.yaml");
    assert!(Command::new("mkfifo").arg(&fifo).status().unwrap().success());
    run(
        "FIFO",
        &root,
        problem(fifo, 1, "a FIFO (named pipe), not a regular file"),
    );

    let (_keep, root) = folder();
    let device = root.join("device.yaml");
    let made = Command::new("mknod")
        .arg(&device)
        .args(["c", "1", "3"])
        .stderr(std::process::Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    if made {
        run(
            "device",
            &root,
            problem(device, 1, "a device, not a regular file"),
        );
    } else {
        // Without the privilege to make a device node, a link to one: refused as leaving the folder.
        symlink("/dev/zero", &device).unwrap();
        run(
            "device",
            &root,
            problem(device, 1, "points outside the source folder"),
        );
    }

    let (outer, root) = folder();
    std::fs::write(outer.path().join("secret.yaml"), "password: hunter2\n").unwrap();
    symlink("../secret.yaml", root.join("steal.yaml")).unwrap();
    let mut case = problem(root.join("steal.yaml"), 1, "points outside the source folder");
    case.never = Some("hunter2".into());
    run("link outside the folder", &root, case);

    let (_keep, root) = folder();
    std::fs::create_dir_all(root.join("sub")).unwrap();
    symlink("sub", root.join("folder.yaml")).unwrap();
    run("link to a folder named .yaml", &root, valid("valid: 1 objects"));

    let (_keep, root) = folder();
    let unreadable = root.join("unreadable.yaml");
    std::fs::write(&unreadable, fixtures::deployment_yaml("secret", "env", 1)).unwrap();
    std::fs::set_permissions(&unreadable, std::os::unix::fs::PermissionsExt::from_mode(0o000)).unwrap();
    if rustix::process::geteuid().is_root() {
        // The superuser reads every file: the file is simply valid.
        run("unreadable file (as root)", &root, valid("valid: 2 objects"));
    } else {
        run(
            "unreadable file",
            &root,
            problem(unreadable, 1, "Permission denied"),
        );
    }

    let (_keep, root) = folder();
    let big = root.join("big.yaml");
    std::fs::write(&big, vec![b'#'; 9 * 1024 * 1024]).unwrap();
    run(
        "a file over 8 MiB",
        &root,
        problem(big, 1, "more than the limit of"),
    );

    let (_keep, root) = folder();
    let huge = root.join("huge-object.yaml");
    std::fs::write(
        &huge,
        fixtures::deployment_yaml("huge", "env", 1).replacen(
            "metadata:\n",
            &format!(
                "metadata:\n  annotations:\n    note: {}\n",
                "x".repeat(2 * 1024 * 1024)
            ),
            1,
        ),
    )
    .unwrap();
    run(
        "an object over 1.5 MiB",
        &root,
        problem(huge, 1, "more than the limit of 1572864 bytes"),
    );

    let (_keep, root) = folder();
    let name = root.join("na\u{1b}[31mme.yaml");
    std::fs::write(&name, "kind: [\n").unwrap();
    run(
        "a file name with an escape sequence",
        &root,
        Case {
            exit: 1,
            at: None,
            says: "na\\u{1b}[31mme.yaml:2:1:".into(),
            never: None,
        },
    );

    assert!(failures.is_empty(), "{}", failures.join("\n\n"));
}
