//! A lab for backups: test hosts (a loopback sshd in its own mount namespace, whose `/var/lib` and
//! `/run/postgresql` are private) each running a real PostgreSQL, and a restic repository served over
//! sftp by another loopback sshd.
#![allow(dead_code)] // reason: each test binary uses its own subset of these helpers

use std::net::TcpStream;
use std::os::unix::fs::{PermissionsExt, symlink};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::OnceLock;
use std::sync::atomic::{AtomicU8, Ordering};
use std::time::{Duration, Instant};

use fediversity::api::{BackupSpec, DataSpec};
use fediversity::backup::{BackupTimeouts, Backuper, Repository};
use fediversity::nixos::host::{SshHost, SshTarget, SshTimeouts};

/// PostgreSQL's server binaries (Debian's `postgresql`).
pub const PGBIN: &str = "/usr/lib/postgresql/15/bin";

/// The data of the lab's application: two data paths and two databases with different owners.
pub fn data_spec() -> DataSpec {
    DataSpec {
        paths: vec!["/var/lib/app".into(), "/var/lib/app-keys/signing.key".into()],
        databases: vec!["app".into(), "chat".into()],
        services: vec![],
    }
}

/// Fails with a clear message when a tool the lab needs is missing.
pub fn require_tools() {
    for tool in [
        "/usr/sbin/sshd",
        "ssh",
        "ssh-keygen",
        "unshare",
        "runuser",
        "flock",
        "restic",
        "pg_dump",
        "pg_restore",
        "psql",
        "/usr/lib/postgresql/15/bin/initdb",
        "/usr/lib/postgresql/15/bin/pg_ctl",
    ] {
        let found = Command::new("sh")
            .args(["-c", &format!("command -v {tool}")])
            .stdout(Stdio::null())
            .status()
            .map(|s| s.success())
            .unwrap_or(false);
        assert!(
            found,
            "`{tool}` is missing: the backup tests need PostgreSQL 15 (postgresql), restic and OpenSSH (openssh-server); scripts/test.sh installs them"
        );
    }
}

#[path = "../common/ports.rs"]
#[allow(clippy::duplicate_mod)]
// reason: a test binary may hold this support module and `common` side by side
mod ports;
pub use ports::free_port;

static NEXT_ADDRESS: AtomicU8 = AtomicU8::new(60);

fn run(program: &str, args: &[&str]) -> String {
    let out = Command::new(program).args(args).output().unwrap();
    assert!(
        out.status.success(),
        "{program} {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn keygen(path: &Path) {
    run(
        "ssh-keygen",
        &["-q", "-t", "ed25519", "-N", "", "-f", &path.to_string_lossy()],
    );
}

fn wait_port(address: &str, port: u16, what: &str, log: &Path) {
    let started = Instant::now();
    while TcpStream::connect((address, port)).is_err() {
        assert!(
            started.elapsed() < Duration::from_secs(15),
            "{what} did not start: {}",
            std::fs::read_to_string(log).unwrap_or_default()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// A PostgreSQL data folder initialised once per test binary and copied into each host.
pub fn template_cluster() -> &'static PathBuf {
    static TEMPLATE: OnceLock<PathBuf> = OnceLock::new();
    TEMPLATE.get_or_init(|| {
        // Templates of earlier test processes that are gone.
        for entry in std::fs::read_dir(std::env::temp_dir())
            .into_iter()
            .flatten()
            .flatten()
        {
            let name = entry.file_name().to_string_lossy().into_owned();
            if let Some(pid) = name.strip_prefix("fediversity-pg-template-")
                && !Path::new("/proc").join(pid).exists()
            {
                let _ = std::fs::remove_dir_all(entry.path());
            }
        }
        let dir = std::env::temp_dir().join(format!("fediversity-pg-template-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        run("chown", &["postgres:postgres", &dir.to_string_lossy()]);
        let data = dir.join("data");
        run(
            "runuser",
            &[
                "-u",
                "postgres",
                "--",
                &format!("{PGBIN}/initdb"),
                "-D",
                &data.to_string_lossy(),
                "-U",
                "postgres",
                "-E",
                "UTF8",
                "--locale=C.UTF-8",
                "--auth-local=trust",
                "--auth-host=scram-sha-256",
                "--no-sync",
            ],
        );
        std::fs::write(
            data.join("postgresql.auto.conf"),
            "listen_addresses = ''\nfsync = off\nsynchronous_commit = off\nfull_page_writes = off\n",
        )
        .unwrap();
        data
    })
}

/// The lab: the client key every host trusts, and the sftp repository server.
pub struct Lab {
    /// The lab's folder (removed when dropped).
    pub dir: tempfile::TempDir,
    sftp: Option<Child>,
    /// The sftp server's port.
    pub sftp_port: u16,
}

impl Lab {
    /// Creates the lab and starts the sftp server.
    pub fn new() -> Self {
        require_tools();
        let dir = tempfile::Builder::new()
            .prefix("fediversity-backup-lab")
            .tempdir()
            .unwrap();
        std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
        let p = dir.path();
        keygen(&p.join("id_ed25519"));
        std::fs::copy(p.join("id_ed25519.pub"), p.join("authorized_keys")).unwrap();
        std::fs::create_dir_all(p.join("repository")).unwrap();
        std::fs::write(p.join("restic-password"), "correct horse battery staple\n").unwrap();
        std::fs::create_dir_all("/run/sshd").unwrap();
        std::fs::create_dir_all("/run/postgresql").unwrap();
        let mut lab = Self {
            dir,
            sftp: None,
            sftp_port: free_port(),
        };
        keygen(&lab.path().join("sftp_host_key"));
        let public = std::fs::read_to_string(lab.path().join("sftp_host_key.pub")).unwrap();
        let key = public.split_whitespace().take(2).collect::<Vec<_>>().join(" ");
        std::fs::write(
            lab.path().join("sftp_known_hosts"),
            format!("[127.0.0.1]:{} {key}\n", lab.sftp_port),
        )
        .unwrap();
        lab.start_sftp();
        lab
    }

    /// The lab's folder.
    pub fn path(&self) -> &Path {
        self.dir.path()
    }

    /// The repository's folder on the sftp server.
    pub fn repository(&self) -> PathBuf {
        self.path().join("repository/restic")
    }

    /// Starts (again) the sftp server.
    pub fn start_sftp(&mut self) {
        let p = self.path().to_owned();
        let p = p.as_path();
        let config = format!(
            "Port {}\nListenAddress 127.0.0.1\nHostKey {}\nPidFile {}\nAuthorizedKeysFile {}\n\
AuthenticationMethods publickey\nPermitRootLogin prohibit-password\nUsePAM no\nStrictModes no\n\
Subsystem sftp internal-sftp\n",
            self.sftp_port,
            p.join("sftp_host_key").display(),
            p.join("sftp.pid").display(),
            p.join("authorized_keys").display()
        );
        std::fs::write(p.join("sftp_config"), config).unwrap();
        let log = std::fs::File::create(p.join("sftp.log")).unwrap();
        let child = Command::new("/usr/sbin/sshd")
            .args(["-D", "-e", "-f"])
            .arg(p.join("sftp_config"))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .unwrap();
        self.sftp = Some(child);
        wait_port(
            "127.0.0.1",
            self.sftp_port,
            "the sftp server",
            &p.join("sftp.log"),
        );
    }

    /// Stops the sftp server (the repository becomes unreachable).
    pub fn stop_sftp(&mut self) {
        if let Some(mut c) = self.sftp.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// The environment's `spec.backup` for this lab.
    pub fn backup_spec(&self) -> BackupSpec {
        let yaml = format!(
            "repository: sftp:root@127.0.0.1:{}\npasswordFile: {}\nsftpIdentityFile: {}\nsftpKnownHostsFile: {}\n",
            self.repository().display(),
            self.path().join("restic-password").display(),
            self.path().join("id_ed25519").display(),
            self.path().join("sftp_known_hosts").display()
        );
        let mut spec: BackupSpec = yaml_serde::from_str(&yaml).unwrap();
        spec.repository = format!(
            "sftp://root@127.0.0.1:{}/{}",
            self.sftp_port,
            self.repository().display()
        );
        spec
    }

    /// The repository access with its secrets read.
    pub fn repo(&self) -> Repository {
        Repository::from_spec(&self.backup_spec()).unwrap()
    }

    /// A backuper with test timeouts.
    pub fn backuper(&self) -> Backuper {
        Backuper::new(
            "/var/lib/fediversity-backup",
            BackupTimeouts {
                short: Duration::from_secs(60),
                long: Duration::from_secs(600),
            },
        )
    }

    /// Starts a host named `name` with an empty PostgreSQL.
    pub fn host(&self, name: &str) -> DataHost {
        let address = format!("127.0.0.{}", NEXT_ADDRESS.fetch_add(1, Ordering::SeqCst));
        DataHost::start(self.path(), name, &address, free_port())
    }

    /// Runs `restic` on this machine against the lab's repository (for inspecting it).
    pub fn restic(&self, args: &[&str]) -> std::process::Output {
        let sftp = format!(
            "ssh -F none -i {} -o UserKnownHostsFile={} -o StrictHostKeyChecking=yes -o BatchMode=yes -p {} root@127.0.0.1 -s sftp",
            self.path().join("id_ed25519").display(),
            self.path().join("sftp_known_hosts").display(),
            self.sftp_port
        );
        Command::new("restic")
            .arg("-o")
            .arg(format!("sftp.command={sftp}"))
            .args(args)
            .env(
                "RESTIC_REPOSITORY",
                format!("sftp:ignored:{}", self.repository().display()),
            )
            .env("RESTIC_PASSWORD_FILE", self.path().join("restic-password"))
            .env("RESTIC_CACHE_DIR", self.path().join("cache"))
            .output()
            .unwrap()
    }
}

impl Default for Lab {
    fn default() -> Self {
        Self::new()
    }
}

impl Drop for Lab {
    fn drop(&mut self) {
        self.stop_sftp();
    }
}

/// A test host: sshd on a loopback address, in a mount namespace where `/var/lib` is `root/var-lib`
/// and `/run/postgresql` a private tmpfs, with a PostgreSQL server started inside it.
pub struct DataHost {
    /// Its name.
    pub name: String,
    /// Its private folder.
    pub root: PathBuf,
    /// Its loopback address.
    pub address: String,
    /// Its SSH port.
    pub port: u16,
    /// Its host key line for known_hosts.
    pub host_key: String,
    child: Child,
    lab: PathBuf,
}

impl DataHost {
    fn start(lab: &Path, name: &str, address: &str, port: u16) -> Self {
        let root = lab.join(format!("host-{name}"));
        let var_lib = root.join("var-lib");
        std::fs::create_dir_all(var_lib.join("postgresql")).unwrap();
        run(
            "cp",
            &[
                "-a",
                &template_cluster().to_string_lossy(),
                &var_lib.join("postgresql/data").to_string_lossy(),
            ],
        );
        run(
            "chown",
            &[
                "-R",
                "postgres:postgres",
                &var_lib.join("postgresql").to_string_lossy(),
            ],
        );
        let key = root.join("ssh_host_ed25519_key");
        keygen(&key);
        let public = std::fs::read_to_string(root.join("ssh_host_ed25519_key.pub")).unwrap();
        let host_key = public.split_whitespace().take(2).collect::<Vec<_>>().join(" ");
        let config = format!(
            "Port {port}\nListenAddress {address}\nHostKey {}\nPidFile {}\n\
PermitRootLogin prohibit-password\nPasswordAuthentication no\nKbdInteractiveAuthentication no\n\
AuthorizedKeysFile {}\nStrictModes no\nUsePAM no\n",
            key.display(),
            root.join("sshd.pid").display(),
            lab.join("authorized_keys").display()
        );
        std::fs::write(root.join("sshd_config"), config).unwrap();
        let log = std::fs::File::create(root.join("sshd.log")).unwrap();
        let child = Command::new("unshare")
            .args(["-m", "--propagation", "private", "sh", "-ec"])
            .arg(format!(
                "mount --bind {var_lib} /var/lib; \
mount -t tmpfs -o mode=2775,uid=postgres,gid=postgres,size=1m tmpfs /run/postgresql; \
runuser -u postgres -- {PGBIN}/pg_ctl -D /var/lib/postgresql/data -l /var/lib/postgresql/log -w -t 60 -o '-p 5432' start >&2; \
exec /usr/sbin/sshd -D -e -f {config}",
                var_lib = var_lib.display(),
                config = root.join("sshd_config").display()
            ))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .unwrap();
        wait_port(address, port, &format!("host {name}"), &root.join("sshd.log"));
        Self {
            name: name.to_owned(),
            root,
            address: address.to_owned(),
            port,
            host_key,
            child,
            lab: lab.to_owned(),
        }
    }

    /// The host as the controller reaches it.
    pub fn ssh(&self) -> SshHost {
        let known = self.root.join("known_hosts");
        std::fs::write(&known, format!("{} {}\n", self.name, self.host_key)).unwrap();
        SshHost::new(
            SshTarget {
                name: self.name.clone(),
                user: "root".into(),
                address: self.address.clone(),
                port: self.port,
                identity_file: self.lab.join("id_ed25519"),
                known_hosts: known,
            },
            SshTimeouts {
                connect: Duration::from_secs(5),
                keep_alive: Duration::from_secs(5),
                command: Duration::from_secs(60),
                copy: Duration::from_secs(60),
            },
        )
        .unwrap()
    }

    /// Runs a shell line on the host (inside its namespace) and returns stdout; panics on failure.
    pub fn sh(&self, line: &str) -> String {
        let out = self.sh_output(line);
        assert!(
            out.status.success(),
            "{line}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// Runs a shell line on the host and returns its output whatever the exit code.
    pub fn sh_output(&self, line: &str) -> std::process::Output {
        let host = self.ssh();
        let mut args = host.ssh_options();
        args.extend([
            "-T".into(),
            format!("root@{}", self.address),
            "--".into(),
            line.into(),
        ]);
        Command::new("ssh").args(&args).output().unwrap()
    }

    /// Where the host's `/var/lib/X` is, seen from outside.
    pub fn var_lib(&self, rel: &str) -> PathBuf {
        self.root.join("var-lib").join(rel)
    }

    /// Runs SQL as the superuser in database `db`.
    pub fn psql(&self, db: &str, sql: &str) -> String {
        self.sh(&format!(
            "runuser -u postgres -- psql -X -q -At -v ON_ERROR_STOP=1 -d {db} <<'SQL'\n{sql}\nSQL"
        ))
    }

    /// Creates the application's roles and databases and seeds them: tens of thousands of rows over
    /// several tables, binary columns, and a second database with the C collation and another owner.
    pub fn seed_databases(&self) {
        self.psql(
            "postgres",
            "CREATE ROLE app LOGIN; CREATE DATABASE app OWNER app;\n\
CREATE ROLE chat LOGIN; CREATE DATABASE chat OWNER chat TEMPLATE template0 LC_COLLATE 'C' LC_CTYPE 'C';",
        );
        self.sh(&format!(
            "runuser -u postgres -- psql -X -q -v ON_ERROR_STOP=1 -d app -c 'SET ROLE app' -c {}",
            shell(SEED_SQL)
        ));
        self.sh(&format!(
            "runuser -u postgres -- psql -X -q -v ON_ERROR_STOP=1 -d chat -c 'SET ROLE chat' -c {}",
            shell("CREATE TABLE rooms (id bigint PRIMARY KEY, name text COLLATE \"C\", state jsonb); \
INSERT INTO rooms SELECT i, 'room ' || i || ' ünï', jsonb_build_object('n', i) FROM generate_series(1, 5000) i;")
        ));
    }

    /// Fills the data paths: many small files, a large one, binary, empty, unicode and space-containing
    /// names, symlinks, restrictive modes, another owner.
    pub fn seed_files(&self) {
        let app = self.var_lib("app");
        let media = app.join("media");
        std::fs::create_dir_all(&media).unwrap();
        for i in 0..300u32 {
            let bytes: Vec<u8> = (0..(1000 + i * 37))
                .map(|b| (b.wrapping_mul(31) ^ i) as u8)
                .collect();
            std::fs::write(media.join(format!("{i:04}.bin")), bytes).unwrap();
        }
        let mut big = vec![0u8; 6 * 1024 * 1024];
        let mut x: u64 = 0x9e3779b97f4a7c15;
        for chunk in big.chunks_mut(8) {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            chunk.copy_from_slice(&x.to_le_bytes()[..chunk.len()]);
        }
        std::fs::write(app.join("large video.mp4"), &big).unwrap();
        std::fs::write(app.join("empty"), b"").unwrap();
        std::fs::write(app.join("日本語 ünïcødé.txt"), "ça va? 🎉\n").unwrap();
        std::fs::write(app.join("with\ttab and  spaces.txt"), "x").unwrap();
        symlink("large video.mp4", app.join("latest")).unwrap();
        symlink("/nonexistent/target", app.join("dangling")).unwrap();
        let secrets = app.join("secrets");
        std::fs::create_dir_all(&secrets).unwrap();
        std::fs::write(secrets.join("secret-key-base"), "s3cr3t\n").unwrap();
        std::fs::set_permissions(
            secrets.join("secret-key-base"),
            std::fs::Permissions::from_mode(0o600),
        )
        .unwrap();
        std::fs::set_permissions(&secrets, std::fs::Permissions::from_mode(0o700)).unwrap();
        std::fs::write(app.join("owned-by-postgres"), "p").unwrap();
        run(
            "chown",
            &[
                "postgres:postgres",
                &app.join("owned-by-postgres").to_string_lossy(),
            ],
        );
        let keys = self.var_lib("app-keys");
        std::fs::create_dir_all(&keys).unwrap();
        std::fs::write(keys.join("signing.key"), "ed25519 a_key\n").unwrap();
        std::fs::set_permissions(keys.join("signing.key"), std::fs::Permissions::from_mode(0o400)).unwrap();
    }
}

impl Drop for DataHost {
    fn drop(&mut self) {
        let data = self.var_lib("postgresql/data");
        let _ = Command::new("runuser")
            .args(["-u", "postgres", "--", &format!("{PGBIN}/pg_ctl"), "-D"])
            .arg(&data)
            .args(["-m", "immediate", "-w", "stop"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status();
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// One single-quoted shell word.
pub fn shell(s: &str) -> String {
    format!("'{}'", s.replace('\'', "'\\''"))
}

/// The seeded schema: 50,000 rows over four tables, with a bytea column (from the data rig).
pub const SEED_SQL: &str = "CREATE TABLE customers (id bigint PRIMARY KEY, name text, created timestamptz);
CREATE TABLE orders (id bigint PRIMARY KEY, customer_id bigint REFERENCES customers, amount numeric(12,2), note text);
CREATE TABLE blobs (id bigint PRIMARY KEY, sha text, payload bytea NOT NULL);
CREATE TABLE events (id bigserial PRIMARY KEY, at timestamptz DEFAULT now(), body text);
INSERT INTO customers SELECT i, 'cust '||i||' é', '2024-01-01'::timestamptz + i*interval '1 min' FROM generate_series(1,20000) i;
INSERT INTO orders SELECT i, 1+(i%20000), (i%9973)/7.0, repeat('x', i%50) FROM generate_series(1,20000) i;
INSERT INTO blobs SELECT i, md5(i::text), decode(repeat(md5(i::text),16),'hex') FROM generate_series(1,10000) i;";
