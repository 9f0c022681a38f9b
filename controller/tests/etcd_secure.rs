//! The etcd store over TLS with a client certificate and with a user and password file, against a real
//! etcd started by the test with certificates made by `openssl`; a wrong certificate or password ends in
//! a clear message that names the cause and never the password.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use fediversity::api::{Kind, ObjectKey};
use fediversity::store::Store;

mod common;
use common::{free_port, http_get};

/// A password that must never appear in any output.
const PASSWORD: &str = "s3cret-etcd-pw-7f1c";

/// Runs `openssl` with `args` in `dir`; fails the test with its output when it fails.
fn openssl(dir: &Path, args: &[&str]) {
    let out = Command::new("openssl")
        .current_dir(dir)
        .args(args)
        .output()
        .expect("openssl (Debian package openssl) must be installed");
    assert!(
        out.status.success(),
        "openssl {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A CA, a server certificate for 127.0.0.1 and two client certificates: one signed by the CA, one
/// by a CA etcd does not trust.
struct Certificates {
    dir: tempfile::TempDir,
}

/// `openssl req` making a new P-256 key `NAME.key` with the subject `CN=NAME`, and `extra` arguments.
fn new_key(dir: &Path, name: &str, extra: &[&str]) {
    let (key, subject) = (format!("{name}.key"), format!("/CN={name}"));
    let mut args = vec![
        "req",
        "-newkey",
        "ec",
        "-pkeyopt",
        "ec_paramgen_curve:prime256v1",
        "-nodes",
        "-keyout",
        &key,
        "-subj",
        &subject,
    ];
    args.extend_from_slice(extra);
    openssl(dir, &args);
}

impl Certificates {
    fn make() -> Self {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        for ca in ["ca", "other-ca"] {
            let out = format!("{ca}.pem");
            new_key(
                d,
                ca,
                &[
                    "-x509",
                    "-out",
                    &out,
                    "-days",
                    "2",
                    "-addext",
                    "basicConstraints=critical,CA:TRUE",
                    "-addext",
                    "keyUsage=critical,keyCertSign,cRLSign",
                ],
            );
        }
        std::fs::write(
            d.join("server.ext"),
            "subjectAltName=IP:127.0.0.1\nextendedKeyUsage=serverAuth,clientAuth\n\
             keyUsage=critical,digitalSignature\n",
        )
        .unwrap();
        std::fs::write(
            d.join("client.ext"),
            "extendedKeyUsage=clientAuth\nkeyUsage=critical,digitalSignature\n",
        )
        .unwrap();
        for (name, ca, ext) in [
            ("server", "ca", "server.ext"),
            ("client", "ca", "client.ext"),
            ("stranger", "other-ca", "client.ext"),
        ] {
            let (csr, pem) = (format!("{name}.csr"), format!("{name}.pem"));
            new_key(d, name, &["-out", &csr]);
            let (ca_pem, ca_key) = (format!("{ca}.pem"), format!("{ca}.key"));
            openssl(
                d,
                &[
                    "x509",
                    "-req",
                    "-in",
                    &csr,
                    "-CA",
                    &ca_pem,
                    "-CAkey",
                    &ca_key,
                    "-CAcreateserial",
                    "-out",
                    &pem,
                    "-days",
                    "2",
                    "-extfile",
                    ext,
                ],
            );
        }
        Self { dir }
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    /// Command-line flags, each followed by the path of its file here.
    fn flags(&self, pairs: &[(&str, &str)]) -> Vec<std::ffi::OsString> {
        pairs
            .iter()
            .flat_map(|(flag, file)| [(*flag).into(), self.path(file).into()])
            .collect()
    }
}

/// One etcd member on loopback, stopped when dropped.
struct Etcd {
    child: Child,
    port: u16,
    _data: tempfile::TempDir,
}

impl Drop for Etcd {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Etcd {
    /// Starts a member: with `tls`, it serves https only and requires client certificates signed by
    /// the test CA.
    fn start(tls: Option<&Certificates>) -> Self {
        let data = tempfile::tempdir().unwrap();
        let port = free_port();
        let peer = free_port();
        let scheme = if tls.is_some() { "https" } else { "http" };
        let client = format!("{scheme}://127.0.0.1:{port}");
        let mut command = Command::new("etcd");
        command
            .args(["--name", "solo"])
            .arg("--data-dir")
            .arg(data.path().join("data"))
            .args([
                "--listen-client-urls",
                &client,
                "--advertise-client-urls",
                &client,
            ])
            .args(["--listen-peer-urls", &format!("http://127.0.0.1:{peer}")])
            .args([
                "--initial-advertise-peer-urls",
                &format!("http://127.0.0.1:{peer}"),
            ])
            .args(["--initial-cluster", &format!("solo=http://127.0.0.1:{peer}")])
            .args(["--logger", "zap", "--log-level", "error"])
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        if let Some(c) = tls {
            command
                .args(c.flags(&[
                    ("--cert-file", "server.pem"),
                    ("--key-file", "server.key"),
                    ("--trusted-ca-file", "ca.pem"),
                ]))
                .arg("--client-cert-auth");
        }
        let child = command
            .spawn()
            .expect("etcd (Debian package etcd-server) must be installed");
        let etcd = Self {
            child,
            port,
            _data: data,
        };
        let until = Instant::now() + Duration::from_secs(30);
        while !etcd.ctl(tls, None, &["put", "/probe", "ok"]).status.success() {
            assert!(Instant::now() < until, "etcd did not start on port {port}");
            std::thread::sleep(Duration::from_millis(100));
        }
        etcd
    }

    /// `etcdctl` against this member, as a client of the test CA, optionally as `user`.
    fn ctl(&self, tls: Option<&Certificates>, user: Option<&str>, args: &[&str]) -> Output {
        let scheme = if tls.is_some() { "https" } else { "http" };
        let mut command = Command::new("etcdctl");
        command.env("ETCDCTL_API", "3").args([
            "--endpoints",
            &format!("{scheme}://127.0.0.1:{}", self.port),
            "--command-timeout",
            "3s",
        ]);
        if let Some(c) = tls {
            command.args(c.flags(&[
                ("--cacert", "ca.pem"),
                ("--cert", "client.pem"),
                ("--key", "client.key"),
            ]));
        }
        if let Some(u) = user {
            command.args(["--user", u]);
        }
        command
            .args(args)
            .output()
            .expect("etcdctl (Debian package etcd-client) must be installed")
    }

    fn url(&self, prefix: &str) -> String {
        format!("etcd://127.0.0.1:{}/{prefix}", self.port)
    }
}

/// A state directory whose embedded store holds one Deployment's generation and one inventory record.
fn filled_state() -> tempfile::TempDir {
    let state = tempfile::tempdir().unwrap();
    let store = Store::open(state.path()).unwrap();
    let key = ObjectKey::new(Kind::Deployment, "copied");
    store.observe_specs([(&key, "spec-hash".to_owned())]).unwrap();
    store
        .put_inventory("test/record", &serde_json::json!({"vmid": 1234}))
        .unwrap();
    state
}

/// The keys under `prefix` as etcdctl lists them, without the prefix.
fn keys(out: &Output, prefix: &str) -> Vec<String> {
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter(|l| !l.is_empty())
        .map(|l| l.trim_start_matches(prefix).to_owned())
        .collect()
}

/// `fediversity store copy --from FROM --to TO` with `extra` flags; its output.
fn store_copy(from: &str, to: &str, extra: &[&std::ffi::OsStr]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_fediversity"))
        .args(["store", "copy", "--from", from, "--to", to])
        .args(extra)
        .output()
        .unwrap()
}

fn text(out: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// `--etcd-ca/cert/key` flags for the client certificate `cert`.
fn tls_flags(certs: &Certificates, cert: &str) -> Vec<std::ffi::OsString> {
    certs.flags(&[
        ("--etcd-ca", "ca.pem"),
        ("--etcd-cert", &format!("{cert}.pem")),
        ("--etcd-key", &format!("{cert}.key")),
    ])
}

fn os(v: &[std::ffi::OsString]) -> Vec<&std::ffi::OsStr> {
    v.iter().map(std::ffi::OsString::as_os_str).collect()
}

#[test]
fn a_store_is_copied_into_etcd_over_tls_with_a_client_certificate_and_back_unchanged() {
    let certs = Certificates::make();
    let etcd = Etcd::start(Some(&certs));
    let state = filled_state();
    let from = state.path().display().to_string();
    let good = tls_flags(&certs, "client");

    let out = store_copy(&from, &etcd.url("tls"), &os(&good));
    assert!(out.status.success(), "copy into etcd over TLS: {}", text(&out));
    // etcdctl, another client of the CA, finds the records under the prefix.
    let first = keys(
        &etcd.ctl(Some(&certs), None, &["get", "--prefix", "--keys-only", "/tls/"]),
        "/tls/",
    );
    assert!(
        first.iter().any(|k| k == "inventory/test/record") && first.iter().any(|k| k.contains("copied")),
        "the inventory record and the Deployment under /tls/ in etcd: {first:?}"
    );

    // Back into an empty state directory, and from there into a second prefix: the same keys.
    let back = tempfile::tempdir().unwrap();
    let out = store_copy(&etcd.url("tls"), &back.path().display().to_string(), &os(&good));
    assert!(
        out.status.success(),
        "copy back from etcd over TLS: {}",
        text(&out)
    );
    let out = store_copy(&back.path().display().to_string(), &etcd.url("again"), &os(&good));
    assert!(
        out.status.success(),
        "the copied-back store copies again: {}",
        text(&out)
    );
    let again = keys(
        &etcd.ctl(Some(&certs), None, &["get", "--prefix", "--keys-only", "/again/"]),
        "/again/",
    );
    assert_eq!(
        again, first,
        "the same keys after a round trip through a state directory"
    );

    // A certificate from a CA etcd does not trust is refused with a message naming etcd and the
    // endpoint, and nothing is written.
    let out = store_copy(&from, &etcd.url("stranger"), &os(&tls_flags(&certs, "stranger")));
    assert!(!out.status.success(), "a stranger's certificate must be refused");
    let said = text(&out);
    assert!(
        said.contains(&format!("etcd://127.0.0.1:{}", etcd.port))
            && said.contains("TLS handshake")
            && said.contains("--etcd-cert"),
        "the refusal names the endpoint, the handshake and the flag to check: {said}"
    );
    let stray = etcd.ctl(
        Some(&certs),
        None,
        &["get", "--prefix", "--keys-only", "/stranger/"],
    );
    assert!(stray.stdout.is_empty(), "nothing written by a refused client");

    // A CA that did not sign the member's certificate: the member is not trusted.
    let mut wrong_ca = good.clone();
    wrong_ca[1] = certs.path("other-ca.pem").into();
    let out = store_copy(&from, &etcd.url("wrong-ca"), &os(&wrong_ca));
    assert!(
        !out.status.success(),
        "a member signed by another CA must not be trusted"
    );
    let said = text(&out);
    assert!(
        said.contains("certificate is not accepted") && said.contains("--etcd-ca"),
        "the refusal says the member's certificate is not trusted: {said}"
    );

    // Plain text against an https-only member fails within the store's timeout, not hangs, and
    // points at the TLS flags.
    let started = Instant::now();
    let out = store_copy(&from, &etcd.url("plain"), &[]);
    assert!(!out.status.success(), "plain text against a TLS member must fail");
    let said = text(&out);
    assert!(
        said.contains("--etcd-ca"),
        "the failure points at the TLS flags: {said}"
    );
    assert!(
        started.elapsed() < Duration::from_secs(60),
        "the failure came within the store's timeout: {:?}",
        started.elapsed()
    );
}

#[test]
fn a_daemon_on_etcd_over_tls_leads_and_keeps_its_records_there() {
    let certs = Certificates::make();
    let etcd = Etcd::start(Some(&certs));
    let source = tempfile::tempdir().unwrap();
    let state = tempfile::tempdir().unwrap();
    std::fs::write(
        source.path().join("mastodon.yaml"),
        fediversity::fixtures::application_yaml("mastodon"),
    )
    .unwrap();
    let server = format!("127.0.0.1:{}", free_port());
    let mut daemon = Command::new(env!("CARGO_BIN_EXE_fediversity"))
        .args(["run", "--source"])
        .arg(source.path())
        .arg("--state-dir")
        .arg(state.path())
        .args(["--store", &etcd.url("daemon"), "--listen", &server])
        .args(os(&tls_flags(&certs, "client")))
        .env("RUST_LOG", "error")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let until = Instant::now() + Duration::from_secs(60);
    let stored = loop {
        let role = http_get(&server, "/api/v1/leader")
            .map(|(_, b)| b)
            .unwrap_or_default();
        let listed = keys(
            &etcd.ctl(
                Some(&certs),
                None,
                &["get", "--prefix", "--keys-only", "/daemon/"],
            ),
            "/daemon/",
        );
        if role.contains("\"leader\"") && listed.iter().any(|k| k.contains("mastodon")) {
            break listed;
        }
        if Instant::now() > until {
            let _ = daemon.kill();
            panic!("no leader with the Application stored within 60 s: role {role}, keys {listed:?}");
        }
        std::thread::sleep(Duration::from_millis(200));
    };
    let _ = daemon.kill();
    let _ = daemon.wait();
    assert!(
        stored.iter().any(|k| k.starts_with("leader")),
        "the leader key is in etcd over TLS: {stored:?}"
    );
    assert!(
        std::fs::read_dir(state.path())
            .unwrap()
            .flatten()
            .all(|e| !e.file_name().to_string_lossy().ends_with(".redb")),
        "no embedded store was written beside etcd"
    );
}

#[test]
fn a_user_with_a_password_file_is_let_in_and_a_wrong_password_is_refused_without_being_shown() {
    let etcd = Etcd::start(None);
    for args in [
        &["user", "add", &format!("root:{PASSWORD}")][..],
        &["auth", "enable"][..],
    ] {
        let out = etcd.ctl(None, None, args);
        assert!(out.status.success(), "etcdctl {args:?}: {}", text(&out));
    }
    let root = format!("root:{PASSWORD}");
    let state = filled_state();
    let from = state.path().display().to_string();
    let secrets = tempfile::tempdir().unwrap();
    let good = secrets.path().join("good");
    let bad = secrets.path().join("bad");
    std::fs::write(&good, format!("{PASSWORD}\n")).unwrap();
    std::fs::write(&bad, "not-the-password").unwrap();
    let user = |file: &Path| -> Vec<std::ffi::OsString> {
        vec![
            "--etcd-user".into(),
            "root".into(),
            "--etcd-password-file".into(),
            file.into(),
        ]
    };

    let out = store_copy(&from, &etcd.url("auth"), &os(&user(&good)));
    assert!(
        out.status.success(),
        "copy as root with the password file: {}",
        text(&out)
    );
    let stored = keys(
        &etcd.ctl(None, Some(&root), &["get", "--prefix", "--keys-only", "/auth/"]),
        "/auth/",
    );
    assert!(
        stored.iter().any(|k| k == "inventory/test/record"),
        "the inventory record under /auth/: {stored:?}"
    );

    let out = store_copy(&from, &etcd.url("denied"), &os(&user(&bad)));
    assert!(!out.status.success(), "a wrong password must be refused");
    let said = text(&out);
    assert!(
        said.contains("refused the user \"root\": wrong user name or password")
            && said.contains("--etcd-password-file"),
        "the refusal names the user and the flag to check: {said}"
    );
    assert!(
        !said.contains("not-the-password") && !said.contains(PASSWORD),
        "no password in the output: {said}"
    );

    let out = store_copy(&from, &etcd.url("anonymous"), &[]);
    assert!(!out.status.success(), "an anonymous copy must be refused");
    let said = text(&out);
    assert!(
        said.contains("requires a user name and password") && said.contains("--etcd-user"),
        "the refusal says a user is needed: {said}"
    );
    for prefix in ["/denied/", "/anonymous/"] {
        let stray = etcd.ctl(None, Some(&root), &["get", "--prefix", "--keys-only", prefix]);
        assert!(
            stray.status.success() && stray.stdout.is_empty(),
            "nothing written under {prefix} by a refused client: {}",
            text(&stray)
        );
    }

    let out = store_copy(
        &from,
        &etcd.url("missing"),
        &os(&user(&secrets.path().join("missing"))),
    );
    assert!(!out.status.success());
    let said = text(&out);
    assert!(
        said.contains("password file") && said.contains("missing"),
        "the refusal names the password file: {said}"
    );
}
