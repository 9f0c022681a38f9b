//! The Nix expressions the project ships for providers but cannot run here (no nixpkgs, no KVM): the
//! Proxmox template and one NixOS VM test per application. They are parse-checked with real Nix and
//! rnix; that they parse is all these tests claim (see the README for running them).

use std::path::{Path, PathBuf};
use std::process::Command;

use fediversity::nixos::check_syntax;

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap().to_owned()
}

const APPLICATIONS: [&str; 4] = ["mastodon", "pixelfed", "peertube", "matrix"];

fn shipped() -> Vec<PathBuf> {
    let nix = repo().join("nix");
    let mut files = vec![
        nix.join("template.nix"),
        nix.join("template-config.nix"),
        nix.join("tests/common.nix"),
        nix.join("package.nix"),
        nix.join("module.nix"),
    ];
    files.extend(APPLICATIONS.iter().map(|a| nix.join(format!("tests/{a}.nix"))));
    files
}

#[test]
fn the_template_and_the_vm_tests_parse_with_nix_and_rnix() {
    let found = Command::new("sh")
        .args(["-c", "command -v nix-instantiate"])
        .output()
        .is_ok_and(|o| o.status.success());
    assert!(
        found,
        "`nix-instantiate` is missing: install nix-bin (scripts/test.sh does)"
    );
    for file in shipped() {
        let text = std::fs::read_to_string(&file).unwrap_or_else(|e| panic!("{}: {e}", file.display()));
        check_syntax(&text).unwrap_or_else(|e| panic!("{}: {e}", file.display()));
    }
    let out = Command::new("nix-instantiate")
        .arg("--parse")
        .args(shipped())
        .env(
            "NIX_CONFIG",
            "substituters =\nexperimental-features = nix-command\nbuild-users-group =",
        )
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
}

#[test]
fn the_template_is_nixpkgs_proxmox_image_on_the_same_ground_as_every_generated_host() {
    let template = std::fs::read_to_string(repo().join("nix/template.nix")).unwrap();
    assert!(template.contains("nixos/modules/virtualisation/proxmox-image.nix"));
    assert!(
        template.contains("./proxmox-guest.nix"),
        "the template must share the hosts' ground"
    );
    assert!(template.contains("system.build.VMA"));
    let golden = std::fs::read_to_string(repo().join("controller/tests/golden/nixos/mastodon.nix")).unwrap();
    assert!(
        golden.contains(&format!(
            "\"/catalog/{}\"",
            fediversity::nixos::generate::PROXMOX_GUEST_MODULE
        )),
        "a generated VM host imports the same guest module"
    );
}

#[test]
fn there_is_one_vm_test_per_catalog_application_checking_health_and_the_first_account() {
    let common = std::fs::read_to_string(repo().join("nix/tests/common.nix")).unwrap();
    assert!(common.contains("pkgs.testers.runNixOSTest"));
    assert!(common.contains("firstAccount.passwordFile"));
    for app in APPLICATIONS {
        let test = std::fs::read_to_string(repo().join(format!("nix/tests/{app}.nix"))).unwrap();
        let yaml =
            std::fs::read_to_string(repo().join(format!("examples/quickstart/applications/{app}.yaml")))
                .unwrap();
        let path = test
            .split("healthPath = \"")
            .nth(1)
            .and_then(|s| s.split('"').next())
            .unwrap_or_else(|| panic!("{app}: no healthPath"));
        assert!(
            yaml.contains(&format!("healthCheck: {{ path: {path},")),
            "{app}: the VM test checks {path}, which is not the Application's health check"
        );
    }
}
