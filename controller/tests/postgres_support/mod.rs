//! A test host that runs a real PostgreSQL of its own, and the commands the tests run on it; for test
//! binaries that include both `backup_support` and `nixos_support`.
#![allow(dead_code)] // reason: each test binary uses its own subset of these helpers

use std::path::PathBuf;
use std::process::{Command, Stdio};

use crate::backup_support::{PGBIN, shell, template_cluster};
use crate::nixos_support::{Lab, TestHost};

/// Stops a host's PostgreSQL when dropped (it runs inside the host's namespace and outlives its sshd).
pub struct Postgres(PathBuf);

impl Drop for Postgres {
    fn drop(&mut self) {
        let _ = Command::new("runuser")
            .args(["-u", "postgres", "--", &format!("{PGBIN}/pg_ctl"), "-D"])
            .arg(&self.0)
            .args(["-m", "immediate", "-w", "stop"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status();
    }
}

/// A test host named `name` in `lab` running a PostgreSQL of its own, copied from the template cluster
/// (data in its private `/nix`, socket on a private tmpfs over `/run/postgresql`).
pub fn postgres_host(lab: &Lab, name: &str) -> (TestHost, Postgres) {
    with_cluster(lab, name, |setup| lab.host_with(name, setup))
}

/// The same host listening at `address:port` (where a simulated VM's address points).
pub fn postgres_host_at(lab: &Lab, name: &str, address: &str, port: u16) -> (TestHost, Postgres) {
    with_cluster(lab, name, |setup| lab.host_at_with(name, address, port, setup))
}

/// Copies the template cluster into the host's private `/nix` and starts the host with `start`, given
/// the setup line that starts its PostgreSQL.
fn with_cluster(lab: &Lab, name: &str, start: impl FnOnce(&str) -> TestHost) -> (TestHost, Postgres) {
    // The mount point of each host's private socket directory.
    std::fs::create_dir_all("/run/postgresql").unwrap();
    let root = lab.path().join(format!("host-{name}"));
    std::fs::create_dir_all(root.join("nix/var/postgresql")).unwrap();
    let status = Command::new("cp")
        .arg("-a")
        .arg(template_cluster())
        .arg(root.join("nix/var/postgresql/data"))
        .status()
        .unwrap();
    assert!(status.success(), "copying the template cluster failed");
    let status = Command::new("chown")
        .args(["-R", "postgres:postgres"])
        .arg(root.join("nix/var/postgresql"))
        .status()
        .unwrap();
    assert!(
        status.success(),
        "handing the cluster to the postgres user failed"
    );
    let host = start(&format!(
        "mount -t tmpfs -o mode=2775,uid=postgres,gid=postgres,size=1m tmpfs /run/postgresql && \
runuser -u postgres -- {PGBIN}/pg_ctl -D /nix/var/postgresql/data -l /nix/var/postgresql/log -w -t 60 -o '-p 5432' start >&2"
    ));
    (host, Postgres(root.join("nix/var/postgresql/data")))
}

/// Runs `line` on `host` as root and returns its stdout; panics when it fails.
pub fn on_host(lab: &Lab, host: &TestHost, line: &str) -> String {
    let out = Command::new("ssh")
        .args(lab.ssh_args(host))
        .arg(line)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{line}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Runs `sql` in the `app` database of `host` and returns its unaligned output, trimmed.
pub fn sql(lab: &Lab, host: &TestHost, sql: &str) -> String {
    on_host(
        lab,
        host,
        &format!(
            "runuser -u postgres -- psql -X -q -At -v ON_ERROR_STOP=1 -d app -c {}",
            shell(sql)
        ),
    )
    .trim()
    .to_owned()
}
