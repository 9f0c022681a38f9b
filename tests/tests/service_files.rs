//! The files for running the controller outside Kubernetes pass the real tools.

use std::process::Command;

use fediversity_e2e::{repo_root, run, text, tool};

#[test]
fn the_systemd_unit_passes_systemd_analyze_verify() {
    let unit =
        std::fs::read_to_string(repo_root().join("deploy/systemd/fediversity-controller.service")).unwrap();
    assert!(
        unit.contains("ExecStart=/usr/local/bin/fediversity run"),
        "the unit runs the daemon"
    );
    assert!(
        unit.contains("DynamicUser=yes") && unit.contains("StateDirectory=fediversity"),
        "a dedicated user and state dir"
    );
    assert!(unit.contains("Restart=on-failure"));
    // Verify the unit as installed, with stand-ins for the binary and the environment file that a fresh
    // machine does not have.
    let dir = tempfile::tempdir().unwrap();
    let checked = unit
        .replace("/usr/local/bin/fediversity", "/bin/true")
        .replace("EnvironmentFile=/etc", "EnvironmentFile=-/etc")
        .replace("LoadCredential=secrets:/etc/fediversity/secrets", "");
    let path = dir.path().join("fediversity-controller.service");
    std::fs::write(&path, checked).unwrap();
    let out = run(Command::new(tool("SYSTEMD_ANALYZE", "systemd-analyze"))
        .arg("verify")
        .arg(&path));
    assert!(out.status.success(), "{}", text(&out));
    assert!(!text(&out).contains("Unknown key"), "{}", text(&out));
}

#[test]
fn the_nixos_module_and_package_parse_with_real_nix() {
    for file in ["nix/module.nix", "nix/package.nix"] {
        let path = repo_root().join(file);
        let out = run(Command::new(tool("NIX_INSTANTIATE", "nix-instantiate"))
            .env("NIX_CONFIG", "build-users-group =\nsubstituters =")
            .arg("--parse")
            .arg(&path));
        assert!(out.status.success(), "{file}: {}", text(&out));
    }
    let module = std::fs::read_to_string(repo_root().join("nix/module.nix")).unwrap();
    for option in [
        "services.fediversity-controller",
        // A fixed system user, not DynamicUser: Nix's `trusted-users` needs a name that exists.
        "users.users.fediversity",
        "User = \"fediversity\"",
        "StateDirectory = \"fediversity\"",
    ] {
        assert!(module.contains(option), "nix/module.nix lacks {option}");
    }
}
