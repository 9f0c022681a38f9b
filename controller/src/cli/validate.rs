//! `fediversity validate PATH...`: every problem of a set of object files, for humans and pre-commit hooks.

use std::io::Write;
use std::path::PathBuf;

use crate::source::dir::DirSource;
use crate::yaml::Limits;

/// Validates `paths`, writes the report to `out` and returns the exit code: 0 if valid, 1 if not.
pub fn run(paths: &[PathBuf], quiet: bool, out: &mut impl Write) -> std::io::Result<i32> {
    let snapshot = DirSource::new(paths.to_vec(), Limits::default()).scan(true);
    if let Some(failure) = &snapshot.failure {
        writeln!(out, "error: {}", crate::text::escape(failure))?;
        return Ok(1);
    }
    for problem in &snapshot.errors {
        writeln!(out, "{problem}")?;
    }
    let count = |kind| snapshot.objects.keys().filter(|k| k.kind == kind).count();
    if snapshot.errors.is_empty() {
        if !quiet {
            writeln!(
                out,
                "valid: {} objects ({} RuntimeEnvironment, {} Application, {} Deployment)",
                snapshot.objects.len(),
                count(crate::api::Kind::RuntimeEnvironment),
                count(crate::api::Kind::Application),
                count(crate::api::Kind::Deployment),
            )?;
        }
        Ok(0)
    } else {
        let n = snapshot.errors.len();
        writeln!(out, "invalid: {n} problem{}", if n == 1 { "" } else { "s" })?;
        Ok(1)
    }
}
