//! The one place where the NixOS layer runs subprocesses: a timeout, captured output, typed errors.

use std::fmt;
use std::process::Stdio;
use std::time::Duration;

use thiserror::Error;
use tokio::io::AsyncWriteExt;

use super::escape::shell_word;

/// How much of a failing command's stderr is kept in an error (its end: where the reason is).
const STDERR_TAIL: usize = 2000;

/// A command to run: program, arguments, extra environment, optional stdin and a deadline.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CommandSpec {
    /// The program, looked up in `PATH`.
    pub program: String,
    /// Its arguments.
    pub args: Vec<String>,
    /// Environment variables set on top of the controller's own.
    pub env: Vec<(String, String)>,
    /// Bytes written to its stdin (stdin is closed otherwise).
    pub stdin: Option<Vec<u8>>,
    /// How long it may run before it is killed.
    pub timeout: Duration,
}

impl CommandSpec {
    /// `program args…` with a timeout, no extra environment and no stdin.
    pub fn new<S: Into<String>>(program: &str, args: impl IntoIterator<Item = S>, timeout: Duration) -> Self {
        Self {
            program: program.to_owned(),
            args: args.into_iter().map(Into::into).collect(),
            env: Vec::new(),
            stdin: None,
            timeout,
        }
    }

    /// Adds an environment variable.
    pub fn env(mut self, key: &str, value: &str) -> Self {
        self.env.push((key.to_owned(), value.to_owned()));
        self
    }
}

/// The command as one shell line (`KEY=value program arg…`, every word escaped): what the tests
/// compare and what logs show.
impl fmt::Display for CommandSpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut words: Vec<String> = self
            .env
            .iter()
            .map(|(k, v)| format!("{k}={}", shell_word(v)))
            .collect();
        words.push(shell_word(&self.program));
        words.extend(self.args.iter().map(|a| shell_word(a)));
        f.write_str(&words.join(" "))
    }
}

/// What a finished command printed and how it exited.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Output {
    /// Its exit code (`None` when a signal ended it).
    pub code: Option<i32>,
    /// Its stdout.
    pub stdout: String,
    /// Its stderr.
    pub stderr: String,
}

impl Output {
    /// Whether it exited 0.
    pub fn success(&self) -> bool {
        self.code == Some(0)
    }
}

/// Why a command did not produce a usable result.
#[derive(Debug, Error)]
pub enum CommandError {
    /// The program could not be started (not installed, not executable).
    #[error("failed to start `{program}`: {source}")]
    Spawn {
        /// The program.
        program: String,
        /// The operating system's reason.
        #[source]
        source: std::io::Error,
    },
    /// It ran longer than its timeout and was killed.
    #[error("`{program}` did not finish within {} s and was stopped", .after.as_secs_f64())]
    TimedOut {
        /// The program.
        program: String,
        /// The timeout.
        after: Duration,
    },
    /// It exited with a non-zero code or was killed by a signal.
    #[error("`{program}` failed ({}): {stderr}", .code.map_or("killed by a signal".to_owned(), |c| format!("exit code {c}")))]
    Failed {
        /// The program.
        program: String,
        /// Its exit code.
        code: Option<i32>,
        /// The end of its stderr.
        stderr: String,
    },
}

/// Runs `spec` and returns its output whatever its exit code; only failing to start it and running
/// out of time are errors. The child is killed when the timeout passes or the future is dropped.
pub async fn run(spec: &CommandSpec) -> Result<Output, CommandError> {
    let mut cmd = tokio::process::Command::new(&spec.program);
    cmd.args(&spec.args)
        .envs(spec.env.iter().map(|(k, v)| (k, v)))
        .stdin(if spec.stdin.is_some() {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true);
    tracing::debug!(command = %spec.program, "running");
    let mut child = cmd.spawn().map_err(|source| CommandError::Spawn {
        program: spec.program.clone(),
        source,
    })?;
    if let (Some(bytes), Some(mut stdin)) = (&spec.stdin, child.stdin.take()) {
        // A child that exits without reading its stdin is not an error of ours: ignore EPIPE.
        let _ = stdin.write_all(bytes).await;
    }
    match tokio::time::timeout(spec.timeout, child.wait_with_output()).await {
        Ok(Ok(out)) => Ok(Output {
            code: out.status.code(),
            stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
            stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
        }),
        Ok(Err(source)) => Err(CommandError::Spawn {
            program: spec.program.clone(),
            source,
        }),
        Err(_) => Err(CommandError::TimedOut {
            program: spec.program.clone(),
            after: spec.timeout,
        }),
    }
}

/// Runs `spec` and requires exit code 0.
pub async fn run_ok(spec: &CommandSpec) -> Result<Output, CommandError> {
    let out = run(spec).await?;
    if out.success() {
        Ok(out)
    } else {
        Err(CommandError::Failed {
            program: spec.program.clone(),
            code: out.code,
            stderr: tail(&out.stderr),
        })
    }
}

/// The last [`STDERR_TAIL`] bytes of `s` (on a character boundary), trimmed.
pub fn tail(s: &str) -> String {
    let s = s.trim();
    let mut start = s.len().saturating_sub(STDERR_TAIL);
    while !s.is_char_boundary(start) {
        start += 1;
    }
    s[start..].to_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_command_renders_as_one_escaped_shell_line() {
        let spec = CommandSpec::new(
            "nix",
            ["copy", "--to", "ssh://root@h", "/nix/store/a b"],
            Duration::from_secs(1),
        )
        .env("NIX_SSHOPTS", "-p 22");
        assert_eq!(
            spec.to_string(),
            "NIX_SSHOPTS='-p 22' nix copy --to ssh://root@h '/nix/store/a b'"
        );
    }

    #[tokio::test]
    async fn output_and_exit_code_are_captured() {
        let spec = CommandSpec::new(
            "/bin/sh",
            ["-c", "echo out; echo err >&2; exit 3"],
            Duration::from_secs(5),
        );
        let out = run(&spec).await.unwrap();
        assert_eq!(
            (out.code, out.stdout.as_str(), out.stderr.as_str()),
            (Some(3), "out\n", "err\n")
        );
        let err = run_ok(&spec).await.unwrap_err();
        assert_eq!(err.to_string(), "`/bin/sh` failed (exit code 3): err");
    }

    #[tokio::test]
    async fn stdin_is_passed_to_the_child() {
        let mut spec = CommandSpec::new("/bin/cat", Vec::<String>::new(), Duration::from_secs(5));
        spec.stdin = Some(b"hello".to_vec());
        assert_eq!(run_ok(&spec).await.unwrap().stdout, "hello");
    }

    #[tokio::test]
    async fn a_command_that_runs_too_long_is_stopped() {
        let spec = CommandSpec::new("/bin/sleep", ["5"], Duration::from_millis(100));
        let started = std::time::Instant::now();
        assert!(matches!(run(&spec).await, Err(CommandError::TimedOut { .. })));
        assert!(started.elapsed() < Duration::from_secs(2));
    }

    #[tokio::test]
    async fn a_missing_program_is_a_spawn_error() {
        let spec = CommandSpec::new(
            "/nonexistent/program",
            Vec::<String>::new(),
            Duration::from_secs(1),
        );
        assert!(matches!(run(&spec).await, Err(CommandError::Spawn { .. })));
    }

    #[test]
    fn the_stderr_tail_keeps_the_end() {
        let long = format!("{}END", "x".repeat(5000));
        let t = tail(&long);
        assert_eq!(t.len(), STDERR_TAIL);
        assert!(t.ends_with("END"));
    }
}
