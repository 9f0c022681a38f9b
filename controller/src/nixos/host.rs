//! The host transport: small primitives a deploy is made of (`NixHost`), and `SshHost`, the real one.

use std::future::Future;
use std::path::PathBuf;
use std::time::Duration;

use thiserror::Error;

use super::command::{self, CommandError, CommandSpec, Output};
use super::escape::shell_word;

mod script;

/// The system profile of a NixOS host.
pub const SYSTEM_PROFILE: &str = "/nix/var/nix/profiles/system";
/// Where the controller keeps its per-deploy files on a host (rollback script, activation result).
pub const DEFAULT_REMOTE_DIR: &str = "/var/lib/fediversity-deploy";

/// A path in the Nix store, checked to hold only the characters Nix allows in store paths (so it is
/// also a safe shell word).
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, serde::Serialize, serde::Deserialize)]
pub struct StorePath(String);

impl StorePath {
    /// Checks `path`: `/nix/store/` followed by a name of `[A-Za-z0-9+-._?=]`.
    pub fn new(path: &str) -> Result<Self, HostError> {
        let name = path.strip_prefix("/nix/store/").unwrap_or("");
        let ok = !name.is_empty()
            && name
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"+-._?=".contains(&b));
        if ok {
            Ok(Self(path.to_owned()))
        } else {
            Err(HostError::BadOutput {
                step: "store path",
                output: path.chars().take(200).collect(),
            })
        }
    }

    /// The path.
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// The first 12 characters of its hash: short, unique enough to name a deploy.
    pub fn short_hash(&self) -> &str {
        let name = &self.0["/nix/store/".len()..];
        &name[..name.len().min(12)]
    }
}

impl std::fmt::Display for StorePath {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

/// One generation of the system profile: its number and the system it points at.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Generation {
    /// The generation number (`system-N-link`).
    pub number: u32,
    /// The system store path.
    pub path: StorePath,
}

/// A deploy whose rollback was armed but that was neither confirmed nor rolled back: the controller
/// stopped in the middle of it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PendingDeploy {
    /// The deploy's id (its files on the host are named by it).
    pub id: String,
    /// How long ago its rollback was armed.
    pub armed_ago: Duration,
    /// The generation its rollback returns to (`None`: no profile before, or armed by an older release).
    pub previous: Option<Generation>,
    /// Whether its activation was started.
    pub activation_started: bool,
    /// The activation's exit code, once it finished.
    pub exit_code: Option<i32>,
}

/// What inspecting a host found: the generation its profile points at, and deploys left unconfirmed
/// by an earlier run, newest first.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Inspection {
    /// The generation the system profile points at.
    pub current: Option<Generation>,
    /// Unconfirmed deploys, newest first.
    pub pending: Vec<PendingDeploy>,
}

/// What a health check found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Health {
    /// Every check passed.
    Healthy,
    /// Not yet: try again (`systemctl is-system-running` says `starting`, or the HTTP check failed).
    NotYet(String),
}

/// The HTTP check of an Application, run on the host against its own web server.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HttpCheck {
    /// `https` (production) or `http`.
    pub scheme: String,
    /// The public host name, sent as `Host` and SNI.
    pub fqdn: String,
    /// The port of the web server on the host.
    pub port: u16,
    /// The path, e.g. `/health`.
    pub path: String,
    /// The status code that means healthy.
    pub expect_status: u16,
}

/// Why a host primitive failed.
#[derive(Debug, Error)]
pub enum HostError {
    /// The host presented another SSH host key than the pinned one.
    #[error(
        "the SSH host key of {host} is not the pinned one: deploy stopped (check the machine, then update the pinned key)"
    )]
    HostKeyChanged {
        /// The host.
        host: String,
    },
    /// SSH could not connect or lost the connection.
    #[error("{host} is unreachable over SSH: {reason}")]
    Unreachable {
        /// The host.
        host: String,
        /// SSH's own words.
        reason: String,
    },
    /// A command on the host failed.
    #[error("failed to {step} on {host} (exit code {code:?}): {stderr}")]
    Remote {
        /// The step, e.g. `set the system profile`.
        step: &'static str,
        /// The host.
        host: String,
        /// Its exit code.
        code: Option<i32>,
        /// The end of its stderr.
        stderr: String,
    },
    /// A command printed something unexpected.
    #[error("unexpected output of {step}: {output:?}")]
    BadOutput {
        /// The step.
        step: &'static str,
        /// What it printed.
        output: String,
    },
    /// A local command could not run or timed out.
    #[error(transparent)]
    Command(#[from] CommandError),
}

impl HostError {
    /// Whether the host could not be reached (the deploy may recover by waiting).
    pub fn is_unreachable(&self) -> bool {
        matches!(
            self,
            HostError::Unreachable { .. } | HostError::Command(CommandError::TimedOut { .. })
        )
    }
}

/// The primitives a deploy onto one NixOS host is made of (colmena's `Host`, split finer so that a
/// rollback can be armed before anything changes).
pub trait NixHost: Send + Sync {
    /// The host's name (for messages).
    fn name(&self) -> &str;
    /// The generation the system profile points at (`None` when there is no profile yet).
    fn current(&self) -> impl Future<Output = Result<Option<Generation>, HostError>> + Send;
    /// The profile and the deploys an earlier run left unconfirmed (a host that keeps no such record
    /// has none).
    fn inspect(&self) -> impl Future<Output = Result<Inspection, HostError>> + Send {
        async {
            Ok(Inspection {
                current: self.current().await?,
                pending: Vec::new(),
            })
        }
    }
    /// Copies the closure of `path` into the host's store.
    fn copy_closure(&self, path: &StorePath) -> impl Future<Output = Result<(), HostError>> + Send;
    /// Arms the host's own rollback: unless disarmed within `after`, the host switches the profile back
    /// to `previous` (or removes it when there was none) and activates that system.
    fn arm_rollback(
        &self,
        id: &str,
        previous: Option<&Generation>,
        after: Duration,
    ) -> impl Future<Output = Result<(), HostError>> + Send;
    /// Points the system profile at `path` and returns the new generation.
    fn set_profile(&self, path: &StorePath) -> impl Future<Output = Result<Generation, HostError>> + Send;
    /// Starts `switch-to-configuration switch` of `path`, detached from the SSH session.
    fn activate(&self, id: &str, path: &StorePath) -> impl Future<Output = Result<(), HostError>> + Send;
    /// The activation's exit code once it has finished.
    fn activation_status(&self, id: &str) -> impl Future<Output = Result<Option<i32>, HostError>> + Send;
    /// Runs the armed rollback now (a no-op when the timer already ran or it was disarmed).
    fn roll_back(&self, id: &str) -> impl Future<Output = Result<(), HostError>> + Send;
    /// Health checks over a new connection.
    fn health(&self, http: Option<&HttpCheck>) -> impl Future<Output = Result<Health, HostError>> + Send;
    /// Cancels the armed rollback and removes the deploy's files.
    fn disarm_rollback(&self, id: &str) -> impl Future<Output = Result<(), HostError>> + Send;
}

/// How to reach a host over SSH.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SshTarget {
    /// The host's name; also the `HostKeyAlias` its pinned key is recorded under.
    pub name: String,
    /// The login user.
    pub user: String,
    /// Its address.
    pub address: String,
    /// Its SSH port.
    pub port: u16,
    /// The private key file.
    pub identity_file: PathBuf,
    /// The known_hosts file holding its pinned key (written by the controller).
    pub known_hosts: PathBuf,
}

/// Timeouts of SSH and the commands run through it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SshTimeouts {
    /// `ConnectTimeout`.
    pub connect: Duration,
    /// `ServerAliveInterval` (with `ServerAliveCountMax=3`).
    pub keep_alive: Duration,
    /// A short command (read a link, start a unit).
    pub command: Duration,
    /// Copying a closure.
    pub copy: Duration,
}

impl Default for SshTimeouts {
    fn default() -> Self {
        Self {
            connect: Duration::from_secs(10),
            keep_alive: Duration::from_secs(5),
            command: Duration::from_secs(60),
            copy: Duration::from_secs(1800),
        }
    }
}

/// A NixOS host reached with the system's OpenSSH client, its key pinned.
#[derive(Debug, Clone)]
pub struct SshHost {
    target: SshTarget,
    timeouts: SshTimeouts,
    remote_dir: String,
    nix_config: Option<String>,
}

/// Words a remote shell line may be built from without escaping: checked so that every path the
/// controller puts into a remote command or `NIX_SSHOPTS` is one word.
fn plain_word(s: &str) -> bool {
    !s.is_empty()
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"@%+=:,./-_".contains(&b))
}

/// A deploy id: letters, digits and `-` only (it names files and systemd units).
fn check_id(id: &str) -> Result<(), HostError> {
    if !id.is_empty() && id.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-') {
        Ok(())
    } else {
        Err(HostError::BadOutput {
            step: "deploy id",
            output: id.to_owned(),
        })
    }
}

impl SshHost {
    /// A host reached as `target`, keeping its deploy files in [`DEFAULT_REMOTE_DIR`].
    pub fn new(target: SshTarget, timeouts: SshTimeouts) -> Result<Self, HostError> {
        for (what, value) in [
            ("identity file", target.identity_file.to_string_lossy()),
            ("known_hosts file", target.known_hosts.to_string_lossy()),
            ("user", target.user.as_str().into()),
            ("address", target.address.as_str().into()),
            ("host name", target.name.as_str().into()),
        ] {
            // NIX_SSHOPTS is split at spaces, so every value must be one plain word.
            if !plain_word(&value) {
                return Err(HostError::BadOutput {
                    step: "SSH settings",
                    output: format!("{what} `{value}` must be one word of letters, digits and @%+=:,./-_"),
                });
            }
        }
        Ok(Self {
            target,
            timeouts,
            remote_dir: DEFAULT_REMOTE_DIR.into(),
            nix_config: None,
        })
    }

    /// Keeps the deploy files in `dir` instead (a plain absolute path).
    pub fn with_remote_dir(mut self, dir: &str) -> Self {
        if plain_word(dir) && dir.starts_with('/') {
            self.remote_dir = dir.to_owned();
        }
        self
    }

    /// Passes extra Nix configuration (`NIX_CONFIG`) to `nix copy`.
    pub fn with_nix_config(mut self, config: Option<String>) -> Self {
        self.nix_config = config;
        self
    }

    /// The SSH options, the same for `ssh` and `nix copy` (`NIX_SSHOPTS`): pinned key, no prompts,
    /// no user configuration, no connection sharing, bounded connect and keep-alive.
    pub fn ssh_options(&self) -> Vec<String> {
        let t = &self.target;
        let mut opts = vec!["-F".to_owned(), "none".to_owned()];
        for o in [
            "BatchMode=yes".to_owned(),
            "StrictHostKeyChecking=yes".to_owned(),
            format!("UserKnownHostsFile={}", t.known_hosts.display()),
            "GlobalKnownHostsFile=/dev/null".to_owned(),
            format!("HostKeyAlias={}", t.name),
            "IdentitiesOnly=yes".to_owned(),
            format!("IdentityFile={}", t.identity_file.display()),
            format!("ConnectTimeout={}", self.timeouts.connect.as_secs().max(1)),
            format!(
                "ServerAliveInterval={}",
                self.timeouts.keep_alive.as_secs().max(1)
            ),
            "ServerAliveCountMax=3".to_owned(),
            "ControlPath=none".to_owned(),
            "LogLevel=ERROR".to_owned(),
        ] {
            opts.push("-o".into());
            opts.push(o);
        }
        opts.push("-p".into());
        opts.push(t.port.to_string());
        opts
    }

    /// `ssh … user@address -- <remote>`: one remote shell line.
    pub fn ssh_command(&self, remote: &str, timeout: Duration) -> CommandSpec {
        let mut args = self.ssh_options();
        args.push("-T".into());
        args.push(format!("{}@{}", self.target.user, self.target.address));
        args.push("--".into());
        args.push(remote.to_owned());
        CommandSpec::new("ssh", args, timeout)
    }

    /// `nix copy --to ssh://user@address PATH` with the same SSH options.
    pub fn copy_command(&self, path: &StorePath) -> CommandSpec {
        let spec = CommandSpec::new(
            "nix",
            [
                "--extra-experimental-features".to_owned(),
                "nix-command".to_owned(),
                "copy".to_owned(),
                "--to".to_owned(),
                format!("ssh://{}@{}", self.target.user, self.target.address),
                path.as_str().to_owned(),
            ],
            self.timeouts.copy,
        )
        .env("NIX_SSHOPTS", &self.ssh_options().join(" "));
        match &self.nix_config {
            Some(config) => spec.env("NIX_CONFIG", config),
            None => spec,
        }
    }

    /// Runs one remote shell line with `stdin` and its own timeout, for work beside deploys (backups).
    /// A non-zero exit is returned as output, not as an error; SSH's own failures are errors.
    pub async fn run_script(
        &self,
        step: &'static str,
        script: &str,
        stdin: Option<Vec<u8>>,
        timeout: Duration,
    ) -> Result<Output, HostError> {
        let mut spec = self.ssh_command(script, timeout);
        spec.stdin = stdin;
        let out = command::run(&spec).await.map_err(|e| match e {
            CommandError::TimedOut { .. } => HostError::Unreachable {
                host: self.target.name.clone(),
                reason: format!("{step}: {e}"),
            },
            e => HostError::Command(e),
        })?;
        if out.code == Some(255) || out.stderr.contains("Host key verification failed") {
            return Err(self.classify(step, out.code, &out.stderr));
        }
        Ok(out)
    }

    /// Runs one remote line; SSH's own failures (exit 255) become `HostKeyChanged` or `Unreachable`.
    async fn remote(
        &self,
        step: &'static str,
        script: &str,
        stdin: Option<Vec<u8>>,
    ) -> Result<Output, HostError> {
        let mut spec = self.ssh_command(script, self.timeouts.command);
        spec.stdin = stdin;
        let out = command::run(&spec).await.map_err(|e| match e {
            CommandError::TimedOut { .. } => HostError::Unreachable {
                host: self.target.name.clone(),
                reason: format!("{step}: {e}"),
            },
            e => HostError::Command(e),
        })?;
        if out.success() {
            return Ok(out);
        }
        Err(self.classify(step, out.code, &out.stderr))
    }

    fn classify(&self, step: &'static str, code: Option<i32>, stderr: &str) -> HostError {
        let host = self.target.name.clone();
        if stderr.contains("Host key verification failed")
            || stderr.contains("HOST IDENTIFICATION HAS CHANGED")
        {
            return HostError::HostKeyChanged { host };
        }
        let ssh_failed = code == Some(255)
            || stderr.contains("cannot connect to")
            || stderr.contains("Connection refused")
            || stderr.contains("Connection timed out")
            || stderr.contains("Connection closed")
            || stderr.contains("Connection reset");
        if ssh_failed {
            return HostError::Unreachable {
                host,
                reason: command::tail(stderr),
            };
        }
        HostError::Remote {
            step,
            host,
            code,
            stderr: command::tail(stderr),
        }
    }
}

impl SshHost {
    /// The remote line that writes stdin to the secret `file` under `dir`: the folder root-owned and
    /// traversable (0711), the file created root-only, given its owner (when that user exists yet:
    /// otherwise systemd-tmpfiles does it on activation) and mode, filled, then moved into place.
    pub fn put_secret_script(dir: &str, file: &super::secrets::SecretFile) -> String {
        let d = shell_word(dir.trim_end_matches('/'));
        let name = shell_word(&file.name);
        let owner = shell_word(&format!("{}:{}", file.owner, file.group));
        let mode = shell_word(&file.mode);
        format!(
            "set -e; umask 077; mkdir -p {d}; chown root:root {d}; chmod 0711 {d}; \
t=$(mktemp {d}/.{name}.XXXXXX); chown {owner} \"$t\" 2>/dev/null || true; chmod {mode} \"$t\"; \
cat > \"$t\"; mv -f \"$t\" {d}/{name}"
        )
    }

    /// Reads the one-time password of the operator's first account from `file` on the host and
    /// deletes it there: it can be fetched once, and then only the operator has it.
    pub async fn take_first_password(&self, file: &str) -> Result<String, HostError> {
        let f = shell_word(file);
        let script = format!(
            "if [ -s {f} ]; then cat {f} && rm -f {f}; else echo 'no first password waits on this host: it was \
fetched already, or the account is not created yet (see fediversity-first-account.service)' >&2; exit 3; fi"
        );
        let out = self.remote("fetch the first password", &script, None).await?;
        Ok(out.stdout.trim_end().to_owned())
    }

    /// Writes `content` (on stdin, never in an argument) as the secret `file` under `dir`.
    pub async fn put_secret(
        &self,
        dir: &str,
        file: &super::secrets::SecretFile,
        content: Vec<u8>,
    ) -> Result<(), HostError> {
        self.remote(
            "deliver a secret",
            &Self::put_secret_script(dir, file),
            Some(content),
        )
        .await
        .map(drop)
    }
}

/// What the health script printed, judged: the ready units (when the system names them) or the
/// system's state, and the HTTP check.
pub fn judge_health(stdout: &str, http: Option<&HttpCheck>) -> Health {
    let mut problems = Vec::new();
    for line in stdout.lines() {
        if let Some((unit, state)) = line.strip_prefix("unit=").and_then(|l| l.rsplit_once(':')) {
            if state.trim() != "active" {
                problems.push(format!("{unit} is {}", none_if_empty(state.trim())));
            }
        } else if let Some(state) = line.strip_prefix("system=") {
            // `offline` is what a host without a running systemd manager answers.
            if !matches!(state.trim(), "running" | "offline" | "") {
                problems.push(format!("systemctl is-system-running: {}", state.trim()));
            }
        } else if let Some(code) = line.strip_prefix("http=") {
            let expected = http.map_or(200, |h| h.expect_status);
            if code.trim() != expected.to_string() {
                problems.push(format!(
                    "HTTP check answered {} (expected {expected})",
                    code.trim()
                ));
            }
        }
    }
    let held = stdout.lines().any(|l| l.starts_with("held="));
    if http.is_some() && !held && !stdout.contains("http=") {
        problems.push("the HTTP check printed nothing".into());
    }
    if problems.is_empty() {
        Health::Healthy
    } else {
        Health::NotYet(problems.join("; "))
    }
}

fn none_if_empty(s: &str) -> &str {
    if s.is_empty() { "not known to systemd" } else { s }
}

fn parse_link(link: &str) -> Option<u32> {
    link.strip_prefix("system-")?.strip_suffix("-link")?.parse().ok()
}

impl NixHost for SshHost {
    fn name(&self) -> &str {
        &self.target.name
    }

    async fn current(&self) -> Result<Option<Generation>, HostError> {
        let out = self
            .remote("read the system profile", &Self::current_script(), None)
            .await?;
        parse_current(&out.stdout)
    }

    async fn inspect(&self) -> Result<Inspection, HostError> {
        let script = format!("{}; {}", Self::current_script(), self.pending_script());
        let out = self.remote("inspect the host", &script, None).await?;
        let (profile, pending) = out
            .stdout
            .split_once("--- pending\n")
            .unwrap_or((out.stdout.as_str(), ""));
        Ok(Inspection {
            current: parse_current(profile)?,
            pending: pending
                .lines()
                .filter(|l| !l.trim().is_empty())
                .map(parse_pending)
                .collect::<Result<_, _>>()?,
        })
    }

    async fn copy_closure(&self, path: &StorePath) -> Result<(), HostError> {
        let spec = self.copy_command(path);
        let out = command::run(&spec).await?;
        if out.success() {
            Ok(())
        } else {
            Err(self.classify("copy the closure", out.code, &out.stderr))
        }
    }

    async fn arm_rollback(
        &self,
        id: &str,
        previous: Option<&Generation>,
        after: Duration,
    ) -> Result<(), HostError> {
        check_id(id)?;
        let script = self.rollback_script(id, previous);
        self.remote(
            "arm the rollback",
            &self.arm_script(id, after, previous, script.len()),
            Some(script.into_bytes()),
        )
        .await
        .map(drop)
    }

    async fn set_profile(&self, path: &StorePath) -> Result<Generation, HostError> {
        let out = self
            .remote("set the system profile", &Self::set_profile_script(path), None)
            .await?;
        let link = out.stdout.trim();
        let number = parse_link(link).ok_or_else(|| HostError::BadOutput {
            step: "nix-env --set",
            output: link.to_owned(),
        })?;
        Ok(Generation {
            number,
            path: path.clone(),
        })
    }

    async fn activate(&self, id: &str, path: &StorePath) -> Result<(), HostError> {
        check_id(id)?;
        let script = self.activation_script(id, path);
        self.remote(
            "start the activation",
            &self.activate_script(id, script.len()),
            Some(script.into_bytes()),
        )
        .await
        .map(drop)
    }

    async fn activation_status(&self, id: &str) -> Result<Option<i32>, HostError> {
        check_id(id)?;
        let out = self
            .remote(
                "read the activation result",
                &self.activation_status_script(id),
                None,
            )
            .await?;
        let text = out.stdout.trim();
        if text.is_empty() {
            return Ok(None);
        }
        text.parse().map(Some).map_err(|_| HostError::BadOutput {
            step: "activation result",
            output: text.to_owned(),
        })
    }

    async fn roll_back(&self, id: &str) -> Result<(), HostError> {
        check_id(id)?;
        self.remote("roll back", &self.roll_back_script(id), None)
            .await
            .map(drop)
    }

    async fn health(&self, http: Option<&HttpCheck>) -> Result<Health, HostError> {
        let out = self
            .remote("run the health checks", &Self::health_script(http), None)
            .await?;
        Ok(judge_health(&out.stdout, http))
    }

    async fn disarm_rollback(&self, id: &str) -> Result<(), HostError> {
        check_id(id)?;
        self.remote("disarm the rollback", &self.disarm_script(id), None)
            .await
            .map(drop)
    }
}

/// The generation in the output of `current_script` (two lines, or none without a profile).
fn parse_current(stdout: &str) -> Result<Option<Generation>, HostError> {
    let mut lines = stdout.lines();
    let (Some(link), Some(path)) = (lines.next(), lines.next()) else {
        return Ok(None);
    };
    let number = parse_link(link.trim()).ok_or_else(|| HostError::BadOutput {
        step: "readlink of the system profile",
        output: link.to_owned(),
    })?;
    Ok(Some(Generation {
        number,
        path: StorePath::new(path.trim())?,
    }))
}

/// One line of `pending_script`'s output.
fn parse_pending(line: &str) -> Result<PendingDeploy, HostError> {
    let bad = || HostError::BadOutput {
        step: "unconfirmed deploys",
        output: line.to_owned(),
    };
    let fields: Vec<&str> = line.split_whitespace().collect();
    let [id, ago, started, rc, rest @ ..] = fields.as_slice() else {
        return Err(bad());
    };
    check_id(id)?;
    let previous = match rest {
        [] => None,
        [number, path] => Some(Generation {
            number: number.parse().map_err(|_| bad())?,
            path: StorePath::new(path)?,
        }),
        _ => return Err(bad()),
    };
    Ok(PendingDeploy {
        id: (*id).to_owned(),
        armed_ago: Duration::from_secs(ago.parse::<i64>().map_err(|_| bad())?.max(0).unsigned_abs()),
        previous,
        activation_started: *started == "1",
        exit_code: if *rc == "-" {
            None
        } else {
            Some(rc.parse().map_err(|_| bad())?)
        },
    })
}

/// The known_hosts line pinning `key` (`TYPE BASE64`) under the alias `name`.
pub fn known_hosts_line(name: &str, key: &str) -> Result<String, HostError> {
    if key.contains(|c: char| c.is_control() && c != ' ') {
        return Err(HostError::BadOutput {
            step: "host key",
            output: "a host key is one line".into(),
        });
    }
    let mut parts = key.split_whitespace();
    let (Some(kind), Some(blob)) = (parts.next(), parts.next()) else {
        return Err(HostError::BadOutput {
            step: "host key",
            output: "expected `TYPE BASE64`, e.g. `ssh-ed25519 AAAA…`".into(),
        });
    };
    let kind_ok = kind.starts_with("ssh-") || kind.starts_with("ecdsa-") || kind.starts_with("sk-");
    let blob_ok = blob
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || b"+/=".contains(&b));
    if !kind_ok || !blob_ok || !plain_word(name) {
        return Err(HostError::BadOutput {
            step: "host key",
            output: format!("`{kind}` key for `{name}` is not a valid SSH public key"),
        });
    }
    Ok(format!("{name} {kind} {blob}\n"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn host() -> SshHost {
        SshHost::new(
            SshTarget {
                name: "uni-mastodon".into(),
                user: "root".into(),
                address: "192.0.2.10".into(),
                port: 2222,
                identity_file: "/var/lib/fediversity/ssh/id_ed25519".into(),
                known_hosts: "/var/lib/fediversity/known_hosts/uni-mastodon".into(),
            },
            SshTimeouts::default(),
        )
        .unwrap()
    }

    fn path() -> StorePath {
        StorePath::new("/nix/store/0123456789abcdefghijklmnopqrstuv-nixos-system-uni-mastodon").unwrap()
    }

    const OPTS: &str = "-F none -o BatchMode=yes -o StrictHostKeyChecking=yes \
-o UserKnownHostsFile=/var/lib/fediversity/known_hosts/uni-mastodon -o GlobalKnownHostsFile=/dev/null \
-o HostKeyAlias=uni-mastodon -o IdentitiesOnly=yes -o IdentityFile=/var/lib/fediversity/ssh/id_ed25519 \
-o ConnectTimeout=10 -o ServerAliveInterval=5 -o ServerAliveCountMax=3 -o ControlPath=none -o LogLevel=ERROR -p 2222";

    #[test]
    fn the_ssh_command_pins_the_key_and_never_prompts() {
        let spec = host().ssh_command("true", Duration::from_secs(5));
        assert_eq!(spec.to_string(), format!("ssh {OPTS} -T root@192.0.2.10 -- true"));
    }

    #[test]
    fn nix_copy_uses_the_same_ssh_options() {
        assert_eq!(
            host().copy_command(&path()).to_string(),
            format!(
                "NIX_SSHOPTS='{OPTS}' nix --extra-experimental-features nix-command copy --to ssh://root@192.0.2.10 {}",
                path()
            )
        );
    }

    #[test]
    fn the_profile_is_read_and_set_with_readlink_and_nix_env() {
        assert_eq!(
            SshHost::current_script(),
            "p=/nix/var/nix/profiles/system; if [ -e \"$p\" ]; then readlink \"$p\"; readlink -e \"$p\"; fi"
        );
        assert_eq!(
            SshHost::set_profile_script(&path()),
            format!(
                "nix-env -p /nix/var/nix/profiles/system --set {} && readlink /nix/var/nix/profiles/system",
                path()
            )
        );
    }

    #[test]
    fn the_rollback_is_armed_with_systemd_run_or_a_setsid_fallback() {
        assert_eq!(
            host().arm_script(
                "abc-1",
                Duration::from_secs(90),
                Some(&Generation {
                    number: 3,
                    path: path()
                }),
                120
            ),
            format!(
                "set -e; mkdir -p /var/lib/fediversity-deploy; \
cat >/var/lib/fediversity-deploy/rollback-abc-1.sh.part; \
if [ \"$(wc -c </var/lib/fediversity-deploy/rollback-abc-1.sh.part)\" -ne 120 ]; then \
rm -f /var/lib/fediversity-deploy/rollback-abc-1.sh.part; echo 'the script arrived cut short' >&2; exit 5; fi; \
mv /var/lib/fediversity-deploy/rollback-abc-1.sh.part /var/lib/fediversity-deploy/rollback-abc-1.sh; \
echo '3 {}' >/var/lib/fediversity-deploy/armed-abc-1; \
if [ -d /run/systemd/system ] && command -v systemd-run >/dev/null 2>&1; then \
systemd-run --unit=fediversity-rollback-abc-1 --on-active=90s --timer-property=AccuracySec=1s --quiet \
/bin/sh /var/lib/fediversity-deploy/rollback-abc-1.sh; \
else setsid nohup /bin/sh -c 'sleep 90; exec /bin/sh /var/lib/fediversity-deploy/rollback-abc-1.sh' \
>/dev/null 2>&1 </dev/null & echo $! >/var/lib/fediversity-deploy/watchdog-abc-1.pid; fi",
                path()
            )
        );
    }

    #[test]
    fn deploys_left_unconfirmed_are_read_with_their_previous_generation_and_activation_state() {
        let inspect = format!(
            "system-4-link\n{p}\n--- pending\nabc-2 40 1 0 3 {p}\nabc-1 95 0 - \n",
            p = path()
        );
        let (profile, pending) = inspect.split_once("--- pending\n").unwrap();
        assert_eq!(parse_current(profile).unwrap().unwrap().number, 4);
        let pending: Vec<PendingDeploy> = pending
            .lines()
            .map(parse_pending)
            .collect::<Result<_, _>>()
            .unwrap();
        assert_eq!(
            pending,
            [
                PendingDeploy {
                    id: "abc-2".into(),
                    armed_ago: Duration::from_secs(40),
                    previous: Some(Generation {
                        number: 3,
                        path: path()
                    }),
                    activation_started: true,
                    exit_code: Some(0),
                },
                PendingDeploy {
                    id: "abc-1".into(),
                    armed_ago: Duration::from_secs(95),
                    previous: None,
                    activation_started: false,
                    exit_code: None,
                }
            ]
        );
        for bad in [
            "abc 1",
            "a;b 1 0 -",
            "abc-1 x 0 -",
            "abc-1 1 0 - 3",
            "abc-1 1 0 - 3 /etc/passwd",
        ] {
            assert!(parse_pending(bad).is_err(), "{bad:?} must be refused");
        }
    }

    #[test]
    fn the_rollback_script_returns_to_the_previous_generation_and_activates_it() {
        let prev = Generation {
            number: 3,
            path: path(),
        };
        let script = host().rollback_script("abc-1", Some(&prev));
        assert_eq!(
            script,
            format!(
                "#!/bin/sh\n# Rollback of deploy abc-1, armed by the Fediversity controller.\n\
if [ \"$1\" != claimed ]; then mv /var/lib/fediversity-deploy/armed-abc-1 /var/lib/fediversity-deploy/fired-abc-1 2>/dev/null || exit 0; fi\n\
PATH=/run/current-system/sw/bin:$PATH\n\
link=$(readlink /nix/var/nix/profiles/system || true)\n\
if [ -n \"$link\" ] && [ \"$link\" != system-3-link ]; then\n\
  nix-env -p /nix/var/nix/profiles/system --switch-generation 3\n\
  gen=${{link#system-}}; gen=${{gen%-link}}\n\
  nix-env -p /nix/var/nix/profiles/system --delete-generations \"$gen\"\n\
fi\n\
{}/bin/switch-to-configuration switch >/var/lib/fediversity-deploy/rollback-abc-1.log 2>&1\n\
echo $? >/var/lib/fediversity-deploy/rolled-back-abc-1\n",
                path()
            )
        );
    }

    #[test]
    fn an_immediate_rollback_claims_the_marker_and_stops_the_timer_first() {
        assert_eq!(
            host().roll_back_script("abc-1"),
            "if mv /var/lib/fediversity-deploy/armed-abc-1 /var/lib/fediversity-deploy/fired-abc-1 2>/dev/null; then \
if [ -d /run/systemd/system ]; then systemctl stop fediversity-rollback-abc-1.timer 2>/dev/null || true; fi; \
if [ -f /var/lib/fediversity-deploy/watchdog-abc-1.pid ]; then kill -- -$(cat /var/lib/fediversity-deploy/watchdog-abc-1.pid) 2>/dev/null || true; fi; \
/bin/sh /var/lib/fediversity-deploy/rollback-abc-1.sh claimed; \
else i=0; while [ ! -e /var/lib/fediversity-deploy/rolled-back-abc-1 ] && [ $i -lt 600 ]; do sleep 0.1; i=$((i+1)); done; fi; \
rm -f /var/lib/fediversity-deploy/watchdog-abc-1.pid /var/lib/fediversity-deploy/rollback-abc-1.sh \
/var/lib/fediversity-deploy/activate-abc-1.sh /var/lib/fediversity-deploy/rc-abc-1"
        );
    }

    #[test]
    fn without_a_previous_generation_the_rollback_removes_the_profile() {
        let script = host().rollback_script("abc-1", None);
        assert!(
            script.contains(
                "if [ -n \"$link\" ]; then rm -f /nix/var/nix/profiles/system \"/nix/var/nix/profiles/$link\"; fi\n"
            ),
            "{script}"
        );
    }

    #[test]
    fn the_activation_runs_detached_and_records_its_exit_code() {
        assert_eq!(
            host().activate_script("abc-1", 99),
            "set -e; mkdir -p /var/lib/fediversity-deploy; rm -f /var/lib/fediversity-deploy/rc-abc-1; \
cat >/var/lib/fediversity-deploy/activate-abc-1.sh.part; \
if [ \"$(wc -c </var/lib/fediversity-deploy/activate-abc-1.sh.part)\" -ne 99 ]; then \
rm -f /var/lib/fediversity-deploy/activate-abc-1.sh.part; echo 'the script arrived cut short' >&2; exit 5; fi; \
mv /var/lib/fediversity-deploy/activate-abc-1.sh.part /var/lib/fediversity-deploy/activate-abc-1.sh; \
if [ -d /run/systemd/system ] && command -v systemd-run >/dev/null 2>&1; then \
systemd-run --unit=fediversity-switch-abc-1 --collect --no-ask-password --quiet \
--service-type=exec -E LOCALE_ARCHIVE -E NIXOS_INSTALL_BOOTLOADER=0 /bin/sh /var/lib/fediversity-deploy/activate-abc-1.sh; \
else setsid nohup /bin/sh /var/lib/fediversity-deploy/activate-abc-1.sh >/dev/null 2>&1 </dev/null & fi"
        );
        assert_eq!(
            host().activation_script("abc-1", &path()),
            format!(
                "#!/bin/sh\n{}/bin/switch-to-configuration switch >/var/lib/fediversity-deploy/activation-abc-1.log 2>&1\n\
echo $? >/var/lib/fediversity-deploy/rc-abc-1.tmp && mv /var/lib/fediversity-deploy/rc-abc-1.tmp /var/lib/fediversity-deploy/rc-abc-1\n",
                path()
            )
        );
    }

    #[test]
    fn the_health_check_asks_systemd_and_the_web_server_on_the_host() {
        let check = HttpCheck {
            scheme: "https".into(),
            fqdn: "mastodon.social.uu.nl".into(),
            port: 443,
            path: "/health".into(),
            expect_status: 200,
        };
        assert_eq!(
            SshHost::health_script(Some(&check)),
            "held=; if [ -f /run/current-system/etc/fediversity/restore-hold ] && \
[ ! -e \"$(head -n 1 /run/current-system/etc/fediversity/restore-hold)\" ]; then \
held=\" $(tail -n +2 /run/current-system/etc/fediversity/restore-hold | tr '\\n' ' ')\"; echo held=until-restored; fi; \
if [ -f /run/current-system/etc/fediversity/ready-units ] && command -v systemctl >/dev/null 2>&1; then \
for u in $(cat /run/current-system/etc/fediversity/ready-units); do case \"$held \" in *\" $u \"*) continue;; esac; \
echo unit=$u:$(systemctl is-active $u 2>/dev/null || true); done; \
elif [ -d /run/systemd/system ] && command -v systemctl >/dev/null 2>&1; then \
echo system=$(systemctl is-system-running 2>/dev/null || true); fi; \
if [ -z \"$held\" ]; then echo http=$(curl --silent --insecure --output /dev/null --max-time 5 --write-out '%{http_code}' \
--resolve mastodon.social.uu.nl:443:127.0.0.1 https://mastodon.social.uu.nl:443/health || true); fi"
        );
    }

    #[test]
    fn disarming_fails_once_the_timer_fired_and_otherwise_stops_it_and_removes_the_files() {
        assert_eq!(
            host().disarm_script("abc-1"),
            "if ! mv /var/lib/fediversity-deploy/armed-abc-1 /var/lib/fediversity-deploy/disarmed-abc-1 2>/dev/null; then \
echo 'the rollback timer fired before the deploy was confirmed' >&2; exit 3; fi; \
if [ -d /run/systemd/system ]; then systemctl stop fediversity-rollback-abc-1.timer 2>/dev/null || true; fi; \
if [ -f /var/lib/fediversity-deploy/watchdog-abc-1.pid ]; then kill -- -$(cat /var/lib/fediversity-deploy/watchdog-abc-1.pid) 2>/dev/null || true; fi; \
rm -f /var/lib/fediversity-deploy/watchdog-abc-1.pid /var/lib/fediversity-deploy/rollback-abc-1.sh \
/var/lib/fediversity-deploy/activate-abc-1.sh /var/lib/fediversity-deploy/rc-abc-1 /var/lib/fediversity-deploy/disarmed-abc-1"
        );
    }

    #[test]
    fn settings_that_would_split_nix_sshopts_are_refused() {
        let mut target = host().target.clone();
        target.identity_file = "/keys/my key".into();
        assert!(SshHost::new(target, SshTimeouts::default()).is_err());
    }

    #[test]
    fn a_changed_host_key_is_told_apart_from_an_unreachable_host() {
        let h = host();
        assert!(matches!(
            h.classify("x", Some(255), "Host key verification failed.\r\n"),
            HostError::HostKeyChanged { .. }
        ));
        assert!(matches!(
            h.classify(
                "x",
                Some(255),
                "ssh: connect to host 192.0.2.10 port 2222: Connection refused"
            ),
            HostError::Unreachable { .. }
        ));
        assert!(matches!(
            h.classify("x", Some(1), "nope"),
            HostError::Remote { .. }
        ));
    }

    #[test]
    fn store_paths_and_known_hosts_lines_are_checked() {
        assert!(StorePath::new("/nix/store/abc; rm -rf /").is_err());
        assert!(StorePath::new("/tmp/x").is_err());
        assert_eq!(
            known_hosts_line("h1", "ssh-ed25519 AAAAC3Nz comment").unwrap(),
            "h1 ssh-ed25519 AAAAC3Nz\n"
        );
        assert!(known_hosts_line("h1", "ssh-ed25519 AAAA\nevil").is_err());
    }

    #[test]
    fn units_held_until_the_restore_and_the_http_check_do_not_count_before_the_marker_exists() {
        let dir = tempfile::tempdir().unwrap();
        let (hold, units, marker) = (
            dir.path().join("restore-hold"),
            dir.path().join("ready-units"),
            dir.path().join("restored"),
        );
        std::fs::write(
            &hold,
            format!(
                "{}\nmastodon-web.service\nmastodon-media-auto-remove.timer\n",
                marker.display()
            ),
        )
        .unwrap();
        std::fs::write(&units, "mastodon-web.service nginx.service\n").unwrap();
        let check = HttpCheck {
            scheme: "http".into(),
            fqdn: "m.example".into(),
            port: 9,
            path: "/health".into(),
            expect_status: 200,
        };
        // The host's script, pointed at these files; `systemctl` answers for itself (or is absent).
        let script = SshHost::health_script(Some(&check))
            .replace(
                super::super::readiness::RESTORE_HOLD_ON_HOST,
                &hold.to_string_lossy(),
            )
            .replace(
                super::super::readiness::READY_UNITS_ON_HOST,
                &units.to_string_lossy(),
            )
            .replace("command -v systemctl", "command -v sh");
        let run = || {
            let out = std::process::Command::new("sh")
                .arg("-c")
                .arg(&script)
                .output()
                .unwrap();
            String::from_utf8_lossy(&out.stdout).into_owned()
        };
        let held = run();
        assert!(held.contains("held=until-restored"), "{held}");
        assert!(
            !held.contains("mastodon-web.service") && held.contains("unit=nginx.service:"),
            "{held}"
        );
        assert!(!held.contains("http="), "{held}");
        let nginx_only = held.replace("held=until-restored\n", "").replace(
            &held
                .lines()
                .find(|l| l.starts_with("unit=nginx"))
                .unwrap()
                .to_owned(),
            "unit=nginx.service:active",
        );
        assert_eq!(
            judge_health(&format!("held=until-restored\n{nginx_only}"), Some(&check)),
            Health::Healthy
        );
        // Once restored, every ready unit and the HTTP check count again.
        std::fs::write(&marker, "4f2a9c1d\n").unwrap();
        let restored = run();
        assert!(!restored.contains("held="), "{restored}");
        assert!(
            restored.contains("unit=mastodon-web.service:") && restored.contains("http="),
            "{restored}"
        );
        assert!(matches!(judge_health(&restored, Some(&check)), Health::NotYet(_)));
    }

    #[test]
    fn named_ready_units_decide_and_a_degraded_system_waiting_on_acme_does_not() {
        // The system names its units: `systemctl is-system-running` (degraded by acme-*) is not asked.
        let ready = "unit=mastodon-web.service:active\nunit=nginx.service:active\nhttp=200\n";
        let check = HttpCheck {
            scheme: "https".into(),
            fqdn: "m.example".into(),
            port: 443,
            path: "/health".into(),
            expect_status: 200,
        };
        assert_eq!(judge_health(ready, Some(&check)), Health::Healthy);
        let starting = "unit=mastodon-web.service:activating\nunit=nginx.service:active\nhttp=502\n";
        assert_eq!(
            judge_health(starting, Some(&check)),
            Health::NotYet(
                "mastodon-web.service is activating; HTTP check answered 502 (expected 200)".into()
            )
        );
        assert_eq!(
            judge_health("unit=gone.service:\n", None),
            Health::NotYet("gone.service is not known to systemd".into())
        );
        // Without named units, the whole system's state still counts.
        assert!(matches!(
            judge_health("system=degraded\n", None),
            Health::NotYet(_)
        ));
    }
}
