//! The operator's first password is fetched once from a real host over SSH, then gone from it; the
//! catalog creates each application's first account without the password reaching the journal.

mod nixos_support;

use std::process::Command;

use nixos_support::Lab;

const PASSWORD: &str = "Xq3-one-time-Password";
/// Inside the host's own `/nix` (the rest of the file system is the machine's own).
const FILE: &str = "/nix/var/fediversity-first-account/password";

fn fetch(lab: &Lab, host: &nixos_support::TestHost) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_fediversity"))
        .args(["first-password", &host.name, "--address", &host.address])
        .args(["--port", &host.port.to_string()])
        .arg("--identity")
        .arg(lab.path().join("id_ed25519"))
        .arg("--state-dir")
        .arg(lab.path().join("state"))
        .args(["--password-file", FILE])
        .output()
        .unwrap()
}

#[test]
fn the_first_password_is_fetched_once_with_the_controllers_key_and_then_gone_from_the_host() {
    let lab = Lab::new();
    let alpha = lab.host("alpha");
    let on_host = alpha.root.join(FILE.trim_start_matches('/'));
    std::fs::create_dir_all(on_host.parent().unwrap()).unwrap();
    std::fs::write(&on_host, format!("{PASSWORD}\n")).unwrap();

    // Without the controller's pinned key for the host, nothing is asked.
    let refused = fetch(&lab, &alpha);
    assert_eq!(refused.status.code(), Some(1));
    assert!(
        String::from_utf8_lossy(&refused.stderr).contains("has not pinned the key of host `alpha`"),
        "{}",
        String::from_utf8_lossy(&refused.stderr)
    );
    assert!(on_host.exists());

    let dir = lab.path().join("state/known_hosts");
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(
        dir.join("alpha"),
        fediversity::nixos::host::known_hosts_line("alpha", &alpha.host_key).unwrap(),
    )
    .unwrap();
    let first = fetch(&lab, &alpha);
    assert!(
        first.status.success(),
        "{}",
        String::from_utf8_lossy(&first.stderr)
    );
    assert_eq!(String::from_utf8_lossy(&first.stdout), format!("{PASSWORD}\n"));
    assert!(
        !on_host.exists(),
        "the password is deleted from the host once fetched"
    );

    let second = fetch(&lab, &alpha);
    assert_eq!(second.status.code(), Some(1));
    assert!(second.stdout.is_empty());
    let why = String::from_utf8_lossy(&second.stderr);
    assert!(why.contains("fetched already"), "{why}");
}

#[test]
fn each_application_creates_its_first_account_once_and_keeps_the_password_out_of_the_journal() {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../nix/applications");
    for (app, creates) in [
        ("mastodon", "mastodon-tootctl accounts create"),
        ("pixelfed", "pixelfed-manage user:create"),
        ("matrix", "matrix-synapse-register_new_matrix_user"),
        ("peertube", "PT_INITIAL_ROOT_PASSWORD"),
    ] {
        let text = std::fs::read_to_string(root.join(format!("{app}.nix"))).unwrap();
        assert!(
            text.contains(creates),
            "{app}: the first account is created with {creates}"
        );
        // Once: a marker next to the password file ends it.
        assert!(
            text.contains("${first.passwordFile}.done"),
            "{app}: not idempotent"
        );
        if app != "peertube" {
            assert!(
                text.contains("ConditionPathExists = \"!${first.passwordFile}.done\""),
                "{app}: the unit runs again after the account exists"
            );
            // The password goes to a root-only file (UMask 0077), stdout to nowhere, never echo.
            assert!(
                text.contains("StandardOutput = \"null\""),
                "{app}: stdout reaches the journal"
            );
            assert!(
                text.contains("UMask = \"0077\""),
                "{app}: the password file is not root-only"
            );
        }
    }
}
