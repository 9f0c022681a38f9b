//! What `--source` names: `[NAME=]LOCATION[?OPTIONS]`, a folder or a `git+URL#BRANCH`, and its options.

use std::fmt;
use std::path::PathBuf;
use std::time::Duration;

/// The name of the source that holds objects applied over the HTTP API.
pub const API_SOURCE: &str = "api";

/// Where a source reads from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Location {
    /// A folder (or a single file) of YAML.
    Dir(PathBuf),
    /// A git repository.
    Git {
        /// The URL given to `git fetch` (`file://`, `ssh://` or `https://`).
        url: String,
        /// The branch; the remote's default branch (`HEAD`) when not given.
        branch: Option<String>,
        /// A folder inside the repository to load instead of the whole tree.
        path: Option<PathBuf>,
    },
}

/// Per-source prune guards that can be relaxed explicitly.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Guards {
    /// Apply an empty snapshot after a non-empty one (removing everything the source defined).
    pub allow_empty: bool,
    /// Apply removals from a revision that does not descend from the last applied one.
    pub allow_force_push: bool,
}

/// One `--source` value, parsed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SourceSpec {
    /// The source's name: given as `NAME=`, or derived from the folder or repository name.
    pub name: String,
    /// Where it reads from.
    pub location: Location,
    /// Its prune guards.
    pub guards: Guards,
    /// Its own poll interval (git only), overriding `--poll-interval`.
    pub interval: Option<Duration>,
}

/// A `--source` value that cannot be used.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("--source {given}: {message}")]
pub struct SpecError {
    /// The value as given (with any password in a URL hidden).
    pub given: String,
    /// What is wrong.
    pub message: String,
}

fn is_name(text: &str) -> bool {
    !text.is_empty()
        && text.len() <= 63
        && text
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && !text.starts_with('-')
        && !text.ends_with('-')
}

/// A DNS-label-like name from a folder or repository name: `Ops.Repo.git` becomes `ops-repo`.
fn derive_name(base: &str) -> String {
    let base = base.strip_suffix(".git").unwrap_or(base);
    let mut name = String::new();
    for c in base.chars() {
        if c.is_ascii_alphanumeric() {
            name.push(c.to_ascii_lowercase());
        } else if !name.ends_with('-') {
            name.push('-');
        }
    }
    let name: String = name.trim_matches('-').chars().take(63).collect();
    let name = name.trim_end_matches('-').to_owned();
    if name.is_empty() { "source".into() } else { name }
}

pub use crate::text::redact;

fn flag(value: Option<&str>, option: &str) -> Result<bool, String> {
    match value {
        None | Some("true") => Ok(true),
        Some("false") => Ok(false),
        Some(other) => Err(format!("option {option}={other}: use true or false")),
    }
}

impl SourceSpec {
    /// Parses `[NAME=]LOCATION[?OPTIONS]`. Options, joined by `&`: `path=SUB` (git), `allowEmpty`,
    /// `allowForcePush` (git), `interval=DURATION` (git).
    pub fn parse(text: &str) -> Result<Self, SpecError> {
        let fail = |message: String| SpecError {
            given: redact(text),
            message,
        };
        let (name, rest) = match text.split_once('=') {
            Some((name, rest)) if is_name(name) => (Some(name.to_owned()), rest),
            _ => (None, text),
        };
        let (location, options) = match rest.strip_prefix("git+") {
            Some(url) => {
                let (url, fragment) = match url.split_once('#') {
                    Some((url, fragment)) => (url, Some(fragment)),
                    None => (url, None),
                };
                // Options may come before the fragment (URL order) or after it.
                let (url, mut options) = match url.split_once('?') {
                    Some((url, options)) => (url, options.to_owned()),
                    None => (url, String::new()),
                };
                let branch = match fragment.map(|f| f.split_once('?').unwrap_or((f, ""))) {
                    Some((branch, more)) => {
                        if !more.is_empty() {
                            if !options.is_empty() {
                                options.push('&');
                            }
                            options.push_str(more);
                        }
                        (!branch.is_empty()).then(|| branch.to_owned())
                    }
                    None => None,
                };
                if let Some(branch) = &branch
                    && (branch.starts_with('-') || branch.contains("..") || branch.contains(' '))
                {
                    return Err(fail(format!("`{branch}` is not a branch name")));
                }
                let scheme_ok = ["file://", "ssh://", "https://", "http://"]
                    .iter()
                    .any(|s| url.starts_with(s));
                if !scheme_ok {
                    return Err(fail(
                        "a git source is git+file://, git+ssh:// or git+https:// followed by the repository"
                            .into(),
                    ));
                }
                (
                    Location::Git {
                        url: url.to_owned(),
                        branch,
                        path: None,
                    },
                    options,
                )
            }
            None => match rest.split_once('?') {
                Some((path, options)) => (Location::Dir(PathBuf::from(path)), options.to_owned()),
                None => (Location::Dir(PathBuf::from(rest)), String::new()),
            },
        };
        let mut spec = SourceSpec {
            name: String::new(),
            location,
            guards: Guards::default(),
            interval: None,
        };
        for option in options.split('&').filter(|o| !o.is_empty()) {
            let (key, value) = match option.split_once('=') {
                Some((k, v)) => (k, Some(v)),
                None => (option, None),
            };
            let is_git = matches!(spec.location, Location::Git { .. });
            match key {
                "allowEmpty" => spec.guards.allow_empty = flag(value, key).map_err(fail)?,
                "allowForcePush" if is_git => {
                    spec.guards.allow_force_push = flag(value, key).map_err(fail)?
                }
                "interval" if is_git => {
                    let value = value.unwrap_or_default();
                    spec.interval = Some(crate::api::parse_duration(value).map_err(fail)?);
                }
                "path" if is_git => {
                    let sub = value.unwrap_or_default().trim_matches('/');
                    let path = PathBuf::from(sub);
                    if sub.is_empty()
                        || path
                            .components()
                            .any(|c| !matches!(c, std::path::Component::Normal(_)))
                    {
                        return Err(fail(format!(
                            "path={sub}: give a folder inside the repository, like path=deployments"
                        )));
                    }
                    if let Location::Git { path: p, .. } = &mut spec.location {
                        *p = Some(path);
                    }
                }
                _ => {
                    return Err(fail(format!(
                        "unknown option `{key}` (git sources take path, allowEmpty, allowForcePush and interval; folders take allowEmpty)"
                    )));
                }
            }
        }
        spec.name = match name {
            Some(name) => name,
            None => match &spec.location {
                Location::Dir(path) => derive_name(
                    &path
                        .canonicalize()
                        .unwrap_or_else(|_| path.clone())
                        .file_name()
                        .map(|n| n.to_string_lossy().into_owned())
                        .unwrap_or_default(),
                ),
                Location::Git { url, path, .. } => {
                    let repo = derive_name(url.trim_end_matches('/').rsplit('/').next().unwrap_or_default());
                    match path {
                        Some(path) => derive_name(&format!("{repo}-{}", path.display())),
                        None => repo,
                    }
                }
            },
        };
        if spec.name == API_SOURCE {
            return Err(fail(format!(
                "the name `{API_SOURCE}` is reserved for objects applied over the API; name this source: --source NAME=LOCATION"
            )));
        }
        Ok(spec)
    }

    /// The location for people: the folder, or the URL with any password hidden, branch and path.
    pub fn display_location(&self) -> String {
        match &self.location {
            Location::Dir(path) => path.display().to_string(),
            Location::Git { url, branch, path } => {
                let mut out = format!("git+{}", redact(url));
                if let Some(path) = path {
                    out.push_str(&format!("?path={}", path.display()));
                }
                if let Some(branch) = branch {
                    out.push_str(&format!("#{branch}"));
                }
                out
            }
        }
    }

    /// `dir` or `git`.
    pub fn type_name(&self) -> &'static str {
        match self.location {
            Location::Dir(_) => "dir",
            Location::Git { .. } => "git",
        }
    }
}

impl fmt::Display for SourceSpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}={}", self.name, self.display_location())
    }
}

/// Checks that no two sources share a name.
pub fn check_unique(specs: &[SourceSpec]) -> Result<(), SpecError> {
    for (i, spec) in specs.iter().enumerate() {
        if let Some(other) = specs[..i].iter().find(|o| o.name == spec.name) {
            return Err(SpecError {
                given: spec.display_location(),
                message: format!(
                    "its name `{}` is also the name of {}; give each source a name: --source NAME=LOCATION",
                    spec.name,
                    other.display_location()
                ),
            });
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_plain_folder_is_a_directory_source_named_after_the_folder() {
        let spec = SourceSpec::parse("/srv/Provider_State").unwrap();
        assert_eq!(spec.location, Location::Dir("/srv/Provider_State".into()));
        assert_eq!(spec.name, "provider-state");
        assert_eq!(spec.guards, Guards::default());
    }

    #[test]
    fn a_git_url_takes_a_branch_a_path_and_guard_options() {
        let spec =
            SourceSpec::parse("ops=git+ssh://git@example.org/ops.git?path=deployments&allowEmpty#main")
                .unwrap();
        assert_eq!(spec.name, "ops");
        assert_eq!(
            spec.location,
            Location::Git {
                url: "ssh://git@example.org/ops.git".into(),
                branch: Some("main".into()),
                path: Some("deployments".into()),
            }
        );
        assert!(spec.guards.allow_empty && !spec.guards.allow_force_push);
        let spec =
            SourceSpec::parse("git+file:///srv/provider.git#prod?allowForcePush&interval=30s").unwrap();
        assert_eq!(spec.name, "provider");
        assert!(spec.guards.allow_force_push);
        assert_eq!(spec.interval, Some(Duration::from_secs(30)));
    }

    #[test]
    fn bad_source_values_are_refused_with_the_reason() {
        for (text, expect) in [
            ("git+ftp://x/y.git", "git+file://"),
            ("git+file:///x?path=../etc", "inside the repository"),
            ("git+file:///x?nope", "unknown option `nope`"),
            ("git+file:///x#--upload-pack=evil", "not a branch name"),
            ("api=/srv/x", "reserved"),
            ("/srv/x?allowForcePush", "unknown option"),
        ] {
            let err = SourceSpec::parse(text).unwrap_err().to_string();
            assert!(err.contains(expect), "{text}: {err}");
        }
    }

    #[test]
    fn passwords_in_urls_are_never_shown() {
        let spec = SourceSpec::parse("x=git+https://bot:s3cret@git.example.org/ops.git").unwrap();
        assert!(!spec.to_string().contains("s3cret"), "{spec}");
        assert!(spec.to_string().contains("bot:***@git.example.org"), "{spec}");
        let err = SourceSpec::parse("git+https://bot:s3cret@h/x?bad").unwrap_err();
        assert!(!err.to_string().contains("s3cret"), "{err}");
    }

    #[test]
    fn two_sources_with_one_name_are_refused() {
        let specs = vec![
            SourceSpec::parse("/a/state").unwrap(),
            SourceSpec::parse("/b/state").unwrap(),
        ];
        let err = check_unique(&specs).unwrap_err().to_string();
        assert!(err.contains("NAME=LOCATION"), "{err}");
    }

    #[test]
    fn credentials_in_a_url_are_never_shown() {
        assert_eq!(
            redact("https://root:Hunter2@pve1.example.net:8006"),
            "https://root:***@pve1.example.net:8006"
        );
        assert_eq!(
            redact("https://ghp_secrettoken@git.example.org/ops/state.git"),
            "https://***@git.example.org/ops/state.git"
        );
        assert_eq!(
            redact("ssh://git@git.example.org/ops/state.git"),
            "ssh://git@git.example.org/ops/state.git"
        );
        let spec =
            SourceSpec::parse("git+https://ghp_secrettoken@git.example.org/ops/state.git#main").unwrap();
        assert!(
            !spec.display_location().contains("secrettoken"),
            "{}",
            spec.display_location()
        );
        let refused =
            crate::api::validate::endpoint("https://root:Hunter2@pve1.example.net:8006").unwrap_err();
        assert!(!refused.contains("Hunter2"), "{refused}");
    }
}
