//! The one place the controller runs subprocesses (nix, ssh, git, and through ssh restic and pg_dump): a timeout, bounded captured output, passwords hidden in what is reported.

use std::fmt;
use std::path::PathBuf;
use std::process::Stdio;
use std::time::Duration;

use thiserror::Error;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWriteExt};

use crate::text::{redact_words, shell_word};

/// How much of a failing command's stderr is kept in an error (its end: where the reason is).
const STDERR_TAIL: usize = 2000;

/// The most a command may print on stdout, and on stderr, before it is stopped: a runaway program
/// must not take the controller's memory with it. Manifests of large hosts stay far below it.
pub const DEFAULT_OUTPUT_LIMIT: usize = 64 << 20;

/// A command to run: program, arguments, extra environment, optional stdin and a deadline.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CommandSpec {
    /// The program, looked up in `PATH`.
    pub program: String,
    /// Its arguments.
    pub args: Vec<String>,
    /// Environment variables set on top of the controller's own.
    pub env: Vec<(String, String)>,
    /// Environment variables of the controller's own that the command must not inherit.
    pub env_remove: Vec<String>,
    /// Its working directory (the controller's own when `None`).
    pub current_dir: Option<PathBuf>,
    /// Bytes written to its stdin (stdin is closed otherwise).
    pub stdin: Option<Vec<u8>>,
    /// How long it may run before it is killed.
    pub timeout: Duration,
    /// The most it may print on each of stdout and stderr before it is killed.
    pub output_limit: usize,
}

impl CommandSpec {
    /// `program args…` with a timeout, no extra environment and no stdin.
    pub fn new<S: Into<String>>(program: &str, args: impl IntoIterator<Item = S>, timeout: Duration) -> Self {
        Self {
            program: program.to_owned(),
            args: args.into_iter().map(Into::into).collect(),
            env: Vec::new(),
            env_remove: Vec::new(),
            current_dir: None,
            stdin: None,
            timeout,
            output_limit: DEFAULT_OUTPUT_LIMIT,
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
    /// It printed more than its output limit and was killed.
    #[error("`{program}` printed more than {limit} bytes on {stream} and was stopped")]
    TooMuchOutput {
        /// The program.
        program: String,
        /// `stdout` or `stderr`.
        stream: &'static str,
        /// The limit.
        limit: usize,
    },
    /// It exited with a non-zero code or was killed by a signal.
    #[error("`{program}` failed ({}): {stderr}", .code.map_or("killed by a signal".to_owned(), |c| format!("exit code {c}")))]
    Failed {
        /// The program.
        program: String,
        /// Its exit code.
        code: Option<i32>,
        /// The end of its stderr, passwords in URLs hidden.
        stderr: String,
    },
}

/// Reads `from` to its end, or to one byte past `limit` (then the caller stops the child).
async fn read_bounded(
    from: Option<impl AsyncRead + Unpin>,
    limit: usize,
) -> std::io::Result<(Vec<u8>, bool)> {
    let mut bytes = Vec::new();
    if let Some(from) = from {
        from.take(limit as u64 + 1).read_to_end(&mut bytes).await?;
    }
    let over = bytes.len() > limit;
    Ok((bytes, over))
}

/// Runs `spec` and returns its output whatever its exit code; only failing to start it, running out
/// of time and printing too much are errors. The child is killed when the timeout passes, its output
/// goes over the limit, or the future is dropped.
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
    for key in &spec.env_remove {
        cmd.env_remove(key);
    }
    if let Some(dir) = &spec.current_dir {
        cmd.current_dir(dir);
    }
    tracing::debug!(command = %spec.program, "running");
    let spawn_error = |source| CommandError::Spawn {
        program: spec.program.clone(),
        source,
    };
    let mut child = cmd.spawn().map_err(spawn_error)?;
    let stdin = child.stdin.take();
    let (stdout, stderr) = (child.stdout.take(), child.stderr.take());
    let feed = async {
        if let (Some(bytes), Some(mut stdin)) = (&spec.stdin, stdin) {
            // A child that exits without reading its stdin is not an error of ours: ignore EPIPE.
            // Dropping the pipe afterwards closes it: the child reads its end of input.
            let _ = stdin.write_all(bytes).await;
        }
        Ok(())
    };
    let work = async {
        // Fed and read at once: a child that prints before it has read all its input cannot block.
        let ((), out, err) = tokio::try_join!(
            feed,
            read_bounded(stdout, spec.output_limit),
            read_bounded(stderr, spec.output_limit)
        )
        .map_err(spawn_error)?;
        for (stream, over) in [("stdout", out.1), ("stderr", err.1)] {
            if over {
                return Err(CommandError::TooMuchOutput {
                    program: spec.program.clone(),
                    stream,
                    limit: spec.output_limit,
                });
            }
        }
        let status = child.wait().await.map_err(spawn_error)?;
        Ok(Output {
            code: status.code(),
            stdout: String::from_utf8_lossy(&out.0).into_owned(),
            stderr: String::from_utf8_lossy(&err.0).into_owned(),
        })
    };
    // On an error or a timeout the child is dropped here, which kills it.
    match tokio::time::timeout(spec.timeout, work).await {
        Ok(result) => result,
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

/// The last [`STDERR_TAIL`] bytes of `s` (on a character boundary), trimmed, with passwords in URLs
/// hidden: what may go into an error, a log line or a status.
pub fn tail(s: &str) -> String {
    let s = s.trim();
    let mut start = s.len().saturating_sub(STDERR_TAIL);
    while !s.is_char_boundary(start) {
        start += 1;
    }
    s[start..]
        .lines()
        .map(redact_words)
        .collect::<Vec<_>>()
        .join("\n")
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
    async fn the_working_directory_and_the_environment_are_set_and_removed_variables_are_gone() {
        let dir = std::env::temp_dir();
        let mut spec = CommandSpec::new(
            "/bin/sh",
            ["-c", "pwd; echo \"a=$FEDI_A b=${HOME:-unset}\""],
            Duration::from_secs(5),
        )
        .env("FEDI_A", "x y");
        spec.env_remove = vec!["HOME".into()];
        spec.current_dir = Some(dir.clone());
        let out = run_ok(&spec).await.unwrap();
        let canonical = dir.canonicalize().unwrap();
        assert_eq!(out.stdout, format!("{}\na=x y b=unset\n", canonical.display()));
    }

    #[tokio::test]
    async fn a_command_that_runs_too_long_is_stopped() {
        let spec = CommandSpec::new("/bin/sleep", ["5"], Duration::from_millis(100));
        let started = std::time::Instant::now();
        assert!(matches!(run(&spec).await, Err(CommandError::TimedOut { .. })));
        assert!(started.elapsed() < Duration::from_secs(2));
    }

    #[tokio::test]
    async fn a_command_that_prints_without_end_is_stopped_at_the_limit() {
        let mut spec = CommandSpec::new("/usr/bin/yes", Vec::<String>::new(), Duration::from_secs(20));
        spec.output_limit = 1 << 20;
        let err = run(&spec).await.unwrap_err();
        assert_eq!(
            err.to_string(),
            "`/usr/bin/yes` printed more than 1048576 bytes on stdout and was stopped"
        );
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

    #[tokio::test]
    async fn a_password_a_failing_command_prints_in_a_url_stays_out_of_its_error() {
        let spec = CommandSpec::new(
            "/bin/sh",
            [
                "-c",
                "echo \"fatal: unable to access 'https://bot:hunter2@git.example.org/x.git/'\" >&2; exit 128",
            ],
            Duration::from_secs(5),
        );
        let err = run_ok(&spec).await.unwrap_err().to_string();
        assert!(!err.contains("hunter2"), "{err}");
        assert!(err.contains("https://bot:***@git.example.org/x.git/"), "{err}");
    }

    #[test]
    fn the_stderr_tail_keeps_the_end() {
        let long = format!("{}END", "x".repeat(5000));
        let t = tail(&long);
        assert_eq!(t.len(), STDERR_TAIL);
        assert!(t.ends_with("END"));
    }
}
