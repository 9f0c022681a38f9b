//! Pure builders of the shell lines a backup, a restore and their housekeeping run on a host.
//!
//! Every value that reaches a line is either checked to be a plain word or escaped with
//! [`shell_word`]; secrets never appear here: they are files under `<dir>/secrets` written from stdin.

use crate::api::SftpRepository;
use crate::nixos::escape::{shell_word, shell_words};

/// The files a backup stages beside the data paths (and finds again in a restored snapshot).
pub const STAGING: &str = "staging";
/// How long a host waits for another backup or restore of its own to finish before giving up.
pub const LOCK_WAIT_SECS: u32 = 1800;
/// Exit code of a line that could not take the host's backup lock.
pub const EXIT_LOCKED: i32 = 75;

/// Per-database metadata and per-table checksums, taken inside the transaction whose snapshot
/// `pg_dump` dumps (so they describe exactly the dump), one JSON object per line.
pub const CHECKSUM_SQL: &str = "SELECT json_build_object('database', current_database(), 'owner', pg_get_userbyid(datdba), \
'encoding', pg_encoding_to_char(encoding), 'collate', datcollate, 'ctype', datctype) FROM pg_database WHERE datname = current_database();
SELECT format('SELECT json_build_object(%L, %L, %L, count(*), %L, coalesce(sum((''x''||substr(md5(t::text),1,16))::bit(64)::bigint::numeric), 0)::text) FROM %s t', \
'table', n.nspname||'.'||c.relname, 'rows', 'checksum', c.oid::regclass) FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace \
WHERE c.relkind IN ('r','p') AND n.nspname NOT IN ('pg_catalog','information_schema') AND n.nspname NOT LIKE 'pg\\_%' \
ORDER BY n.nspname, c.relname \\gexec
";

/// Session settings under which `t::text` is the same on every host.
pub const SESSION_SQL: &str = "SET TimeZone='UTC'; SET DateStyle='ISO'; SET IntervalStyle='postgres'; SET extra_float_digits=3; SET bytea_output='hex';";

/// How restic reaches the repository from a host.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ResticAccess {
    /// The repository string (`RESTIC_REPOSITORY`).
    pub repository: String,
    /// Whether an environment file with backend credentials was delivered.
    pub has_env: bool,
    /// The SFTP server, when restic must log in with a delivered key and known_hosts file.
    pub sftp: Option<SftpRepository>,
}

/// The host's working folder and the names inside it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Layout {
    /// The folder (a plain absolute path).
    pub dir: String,
}

impl Layout {
    /// `dir/secrets`.
    pub fn secrets(&self) -> String {
        format!("{}/secrets", self.dir)
    }

    /// `dir/staging`: dumps and manifest of the backup being taken.
    pub fn staging(&self) -> String {
        format!("{}/{STAGING}", self.dir)
    }

    /// `dir/restore`: where a snapshot is unpacked before its data is moved into place.
    pub fn restore(&self) -> String {
        format!("{}/restore", self.dir)
    }

    /// The staging folder as it lands inside the restore folder.
    pub fn restored_staging(&self) -> String {
        format!("{}{}", self.restore(), self.staging())
    }
}

/// Whether `s` is safe as a shell word without quoting (checked paths and names).
pub fn plain_word(s: &str) -> bool {
    !s.is_empty()
        && !s.starts_with('-')
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"@%+=:,./_-".contains(&b))
}

/// The line that stores stdin as secret `name` (mode 0600 in a 0700 folder), atomically.
pub fn put_secret(layout: &Layout, name: &str) -> String {
    let s = layout.secrets();
    format!(
        "set -e; umask 077; mkdir -p {s}; chmod 700 {s}; cat >{s}/{name}.tmp; mv {s}/{name}.tmp {s}/{name}"
    )
}

/// The line that removes the delivered secrets.
pub fn remove_secrets(layout: &Layout) -> String {
    format!("rm -rf {}", layout.secrets())
}

/// The prologue every restic line starts with: strict mode, the host's lock, restic's environment.
/// The password reaches restic as `RESTIC_PASSWORD_FILE`, backend keys from the sourced env file.
pub fn prologue(layout: &Layout, access: &ResticAccess) -> String {
    let d = &layout.dir;
    let s = layout.secrets();
    let mut out = format!(
        "set -eu; umask 077; mkdir -p {d}/cache; exec 9>{d}/lock; \
if ! flock -w {LOCK_WAIT_SECS} 9; then echo 'another backup or restore still runs on this host' >&2; exit {EXIT_LOCKED}; fi; \
export RESTIC_REPOSITORY={} RESTIC_PASSWORD_FILE={s}/password RESTIC_CACHE_DIR={d}/cache; ",
        shell_word(&access.repository)
    );
    if access.has_env {
        out.push_str(&format!("set -a; . {s}/env; set +a; "));
    }
    out.push_str(&format!(
        "restic() {{ command restic {}\"$@\"; }}; ",
        restic_options(layout, access)
    ));
    out
}

/// Options restic always gets: the SFTP login when a key was delivered.
fn restic_options(layout: &Layout, access: &ResticAccess) -> String {
    match &access.sftp {
        Some(sftp) => {
            let s = layout.secrets();
            let command = format!(
                "ssh -F none -i {s}/sftp_key -o IdentitiesOnly=yes -o UserKnownHostsFile={s}/known_hosts \
-o GlobalKnownHostsFile=/dev/null -o StrictHostKeyChecking=yes -o BatchMode=yes -o ServerAliveInterval=5 \
-o ServerAliveCountMax=3 -o ConnectTimeout=10 -p {} {}@{} -s sftp",
                sftp.port, sftp.user, sftp.host
            );
            format!("-o {} ", shell_word(&format!("sftp.command={command}")))
        }
        None => String::new(),
    }
}

/// The shell function that dumps one database with `pg_dump -Fc` inside a repeatable-read transaction
/// whose snapshot it exports, and takes the checksums in that same transaction.
fn dump_function() -> String {
    format!(
        "dump_db() {{ db=$1; out=$2; w=$(mktemp -d); mkfifo \"$w/in\" \"$w/out\"; \
runuser -u postgres -- psql -X -q -At -v ON_ERROR_STOP=1 -d \"$db\" <\"$w/in\" >\"$w/out\" & pid=$!; \
exec 3>\"$w/in\" 4<\"$w/out\"; \
printf '%s\\n' {session} 'BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY;' 'SELECT pg_export_snapshot();' >&3; \
if ! read -r snap <&4; then exec 3>&- 4<&-; wait $pid || true; echo \"cannot open database $db\" >&2; return 1; fi; \
runuser -u postgres -- pg_dump -Fc --snapshot=\"$snap\" -d \"$db\" >\"$out.dump\"; \
printf '%s' {checksums} >&3; printf 'COMMIT;\\n' >&3; exec 3>&-; \
cat <&4 >\"$out.json\"; exec 4<&-; wait $pid; rm -rf \"$w\"; }}; ",
        session = shell_word(SESSION_SQL),
        checksums = shell_word(CHECKSUM_SQL),
    )
}

/// The lines that write the file manifest of the existing `$@` paths into `dir`: `files.stat` (type,
/// mode, owner, group, size, path, link target; NUL-separated) and `files.sha256` (`sha256sum -z`).
fn manifest_lines(dir: &str) -> String {
    format!(
        "if [ $# -gt 0 ]; then find \"$@\" -printf '%y\\0%m\\0%u\\0%g\\0%s\\0%p\\0%l\\0' >{dir}/files.stat; \
find \"$@\" -type f -print0 | LC_ALL=C sort -z | xargs -0r sha256sum -z >{dir}/files.sha256; \
else : >{dir}/files.stat; : >{dir}/files.sha256; fi; "
    )
}

/// `set -- P…` with those of `paths` that exist.
fn existing_paths(paths: &[String]) -> String {
    format!(
        "set --; for p in {}; do if [ -e \"$p\" ] || [ -L \"$p\" ]; then set -- \"$@\" \"$p\"; fi; done; ",
        if paths.is_empty() {
            "''".to_owned()
        } else {
            shell_words(&paths.iter().map(String::as_str).collect::<Vec<_>>())
        }
    )
}

/// What one backup carries and how its snapshot is tagged.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BackupPlan {
    /// The host name restic records (`--host`).
    pub host: String,
    /// The data paths.
    pub paths: Vec<String>,
    /// The PostgreSQL databases.
    pub databases: Vec<String>,
    /// `key=value` tags.
    pub tags: Vec<String>,
}

/// The backup line: clears stale locks, creates the repository when there is none, dumps every
/// database, writes the manifest, takes one snapshot of the staging folder and the data paths, and
/// prints restic's JSON summary.
pub fn backup(layout: &Layout, access: &ResticAccess, plan: &BackupPlan) -> String {
    let st = layout.staging();
    let d = &layout.dir;
    let mut s = prologue(layout, access);
    s.push_str(&format!(
        "restic unlock >/dev/null 2>&1 || true; {}rm -rf {st}; mkdir -p {st}/databases; ",
        init_if_missing(layout)
    ));
    if !plan.databases.is_empty() {
        s.push_str(&dump_function());
        for db in &plan.databases {
            s.push_str(&format!(
                "dump_db {} {st}/databases/{}; ",
                shell_word(db),
                shell_word(db)
            ));
        }
    }
    s.push_str(&existing_paths(&plan.paths));
    s.push_str(&manifest_lines(&st));
    let mut words = vec![
        "restic".to_owned(),
        "backup".to_owned(),
        "--json".to_owned(),
        "--quiet".to_owned(),
        "--host".to_owned(),
        plan.host.clone(),
    ];
    for t in &plan.tags {
        words.push("--tag".into());
        words.push(t.clone());
    }
    let words: Vec<&str> = words.iter().map(String::as_str).collect();
    s.push_str(&format!(
        "{} {st} \"$@\" >{d}/backup.json; grep '\"message_type\":\"summary\"' {d}/backup.json | tail -n 1",
        shell_words(&words)
    ));
    s
}

/// Creates the repository when `restic cat config` says there is none; any other failure stops the line.
fn init_if_missing(layout: &Layout) -> String {
    let d = &layout.dir;
    format!(
        "if ! restic cat config >/dev/null 2>{d}/config.err; then \
if grep -q 'Is there a repository at the following location' {d}/config.err; then restic init >/dev/null; \
else cat {d}/config.err >&2; exit 1; fi; fi; "
    )
}

/// The line that creates the repository when there is none (and does nothing when there is one).
pub fn ensure_repository(layout: &Layout, access: &ResticAccess) -> String {
    format!("{}{}true", prologue(layout, access), init_if_missing(layout))
}

/// The line that lists snapshots as JSON, optionally only those with all of `tags`.
pub fn snapshots(layout: &Layout, access: &ResticAccess, host: Option<&str>, tags: &[String]) -> String {
    let mut words = vec!["restic", "snapshots", "--json"];
    if let Some(h) = host {
        words.push("--host");
        words.push(h);
    }
    let joined = tags.join(",");
    if !tags.is_empty() {
        words.push("--tag");
        words.push(&joined);
    }
    format!("{}{}", prologue(layout, access), shell_words(&words))
}

/// The line that clears stale locks and checks the repository, reading `read_data` of the packs
/// (`None`: structure only; `Some("100%")`: everything).
pub fn check(layout: &Layout, access: &ResticAccess, read_data: Option<&str>) -> String {
    let mut words = vec!["restic".to_owned(), "check".to_owned()];
    match read_data {
        Some("100%") => words.push("--read-data".into()),
        Some(share) => words.push(format!("--read-data-subset={share}")),
        None => {}
    }
    let words: Vec<&str> = words.iter().map(String::as_str).collect();
    format!(
        "{}restic unlock >/dev/null 2>&1 || true; {} 2>&1",
        prologue(layout, access),
        shell_words(&words)
    )
}

/// The line that applies the retention to one host's snapshots and prunes unreferenced data.
pub fn forget(
    layout: &Layout,
    access: &ResticAccess,
    host: &str,
    daily: u32,
    weekly: u32,
    monthly: u32,
) -> String {
    let (d, w, m) = (daily.to_string(), weekly.to_string(), monthly.to_string());
    format!(
        "{}restic unlock >/dev/null 2>&1 || true; {}",
        prologue(layout, access),
        shell_words(&[
            "restic",
            "forget",
            "--prune",
            "--host",
            host,
            "--keep-daily",
            &d,
            "--keep-weekly",
            &w,
            "--keep-monthly",
            &m,
        ])
    )
}

/// The line that removes a snapshot (a backup that failed after restic saved it).
pub fn forget_snapshot(layout: &Layout, access: &ResticAccess, id: &str) -> String {
    format!(
        "{}{}",
        prologue(layout, access),
        shell_words(&["restic", "forget", id])
    )
}

/// The line that stops `services` (where systemd runs) and unpacks snapshot `id` into the restore folder.
pub fn restore_unpack(layout: &Layout, access: &ResticAccess, id: &str, services: &[String]) -> String {
    let r = layout.restore();
    let mut s = prologue(layout, access);
    s.push_str(&stop_services(services));
    s.push_str(&format!(
        "restic unlock >/dev/null 2>&1 || true; rm -rf {r}; mkdir -p {r}; {} >/dev/null",
        shell_words(&["restic", "restore", id, "--target", &r])
    ));
    s
}

/// Stops the units where systemd runs (a host without systemd has none to stop).
pub fn stop_services(services: &[String]) -> String {
    if services.is_empty() {
        return String::new();
    }
    let units: Vec<&str> = services.iter().map(String::as_str).collect();
    format!(
        "if [ -d /run/systemd/system ]; then systemctl stop {}; fi; ",
        shell_words(&units)
    )
}

/// The line that starts the units again once the restore is verified.
pub fn start_services(services: &[String]) -> String {
    if services.is_empty() {
        return "true".into();
    }
    let units: Vec<&str> = services.iter().map(String::as_str).collect();
    format!(
        "if [ -d /run/systemd/system ]; then systemctl start {}; fi",
        shell_words(&units)
    )
}

/// The line that replaces each data path with its restored copy (or removes it when the snapshot
/// did not hold it). Paths were checked: absolute, no `..`, never `/`.
pub fn restore_move(layout: &Layout, paths: &[String]) -> String {
    let r = layout.restore();
    let mut s = format!(
        "set -eu; exec 9>{}/lock; flock -w {LOCK_WAIT_SECS} 9; ",
        layout.dir
    );
    for p in paths {
        let from = shell_word(&format!("{r}{p}"));
        let to = shell_word(p);
        s.push_str(&format!(
            "rm -rf {to}; if [ -e {from} ] || [ -L {from} ]; then mkdir -p \"$(dirname {to})\"; mv {from} {to}; fi; "
        ));
    }
    s.push_str("true");
    s
}

/// The line that restores database `db` from its dump in the restored staging folder into a new, empty
/// database with the recorded owner, encoding and collation (the owner role is created when missing).
pub fn restore_database(layout: &Layout, db: &str, meta: &DatabaseMeta) -> String {
    let dump = shell_word(&format!("{}/databases/{db}.dump", layout.restored_staging()));
    let sql = "SELECT format('CREATE ROLE %I', :'owner') WHERE NOT EXISTS (SELECT FROM pg_roles WHERE rolname = :'owner') \\gexec\n\
SELECT format('DROP DATABASE IF EXISTS %I WITH (FORCE)', :'db') \\gexec\n\
SELECT format('CREATE DATABASE %I OWNER %I TEMPLATE template0 ENCODING %L LC_COLLATE %L LC_CTYPE %L', :'db', :'owner', :'encoding', :'collate', :'ctype') \\gexec\n";
    format!(
        "set -eu; printf '%s' {} | runuser -u postgres -- psql -X -q -v ON_ERROR_STOP=1 -d postgres -v db={} -v owner={} -v encoding={} -v collate={} -v ctype={} >/dev/null; \
runuser -u postgres -- pg_restore --exit-on-error -d {} <{dump}",
        shell_word(sql),
        shell_word(db),
        shell_word(&meta.owner),
        shell_word(&meta.encoding),
        shell_word(&meta.collate),
        shell_word(&meta.ctype),
        shell_word(db),
    )
}

/// The line that prints the checksums of a live database (the same query as at backup time).
pub fn database_checksums(db: &str) -> String {
    format!(
        "printf '%s\\n%s' {} {} | runuser -u postgres -- psql -X -q -At -v ON_ERROR_STOP=1 -d {}",
        shell_word(SESSION_SQL),
        shell_word(CHECKSUM_SQL),
        shell_word(db)
    )
}

/// The line that writes the manifest of the live data paths into `dir/verify` and prints both files.
pub fn live_manifest(layout: &Layout, paths: &[String]) -> String {
    let v = format!("{}/verify", layout.dir);
    format!(
        "set -eu; umask 077; rm -rf {v}; mkdir -p {v}; {}{}cat {v}/files.stat; printf '\\0--sha256--\\0'; cat {v}/files.sha256",
        existing_paths(paths),
        manifest_lines(&v)
    )
}

/// The line that prints a manifest stored in the restored staging folder, as [`live_manifest`] does.
pub fn restored_manifest(layout: &Layout) -> String {
    let st = layout.restored_staging();
    format!("cat {st}/files.stat; printf '\\0--sha256--\\0'; cat {st}/files.sha256")
}

/// The line that prints a restored database's metadata and checksums.
pub fn restored_database_meta(layout: &Layout, db: &str) -> String {
    format!(
        "cat {}",
        shell_word(&format!("{}/databases/{db}.json", layout.restored_staging()))
    )
}

/// The line that removes the restore folder, the staging folder and the delivered secrets.
pub fn cleanup(layout: &Layout) -> String {
    format!(
        "rm -rf {} {} {} {}/verify",
        layout.restore(),
        layout.staging(),
        layout.secrets(),
        layout.dir
    )
}

/// What a backup recorded of one database.
#[derive(Debug, Clone, PartialEq, Eq, serde::Deserialize, serde::Serialize)]
pub struct DatabaseMeta {
    /// Its name.
    pub database: String,
    /// The owning role.
    pub owner: String,
    /// Its encoding, e.g. `UTF8`.
    pub encoding: String,
    /// Its `LC_COLLATE`.
    pub collate: String,
    /// Its `LC_CTYPE`.
    pub ctype: String,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn layout() -> Layout {
        Layout {
            dir: "/var/lib/fediversity-backup".into(),
        }
    }

    fn access() -> ResticAccess {
        ResticAccess {
            repository: "sftp:backup@192.0.2.7:/srv/restic/env a".into(),
            has_env: true,
            sftp: Some(SftpRepository::parse("sftp:backup@192.0.2.7:/srv/restic").unwrap()),
        }
    }

    #[test]
    fn the_repository_is_created_by_the_same_words_alone_or_before_a_backup() {
        let init = "if ! restic cat config >/dev/null 2>/var/lib/fediversity-backup/config.err; then \
if grep -q 'Is there a repository at the following location' /var/lib/fediversity-backup/config.err; then restic init >/dev/null; \
else cat /var/lib/fediversity-backup/config.err >&2; exit 1; fi; fi; ";
        let alone = ensure_repository(&layout(), &access());
        assert!(alone.ends_with(&format!("{init}true")), "{alone}");
        assert!(alone.contains("flock -w"), "{alone}");
        let plan = BackupPlan {
            host: "h".into(),
            paths: vec![],
            databases: vec![],
            tags: vec![],
        };
        assert!(backup(&layout(), &access(), &plan).contains(init));
    }

    #[test]
    fn secrets_reach_restic_as_files_and_never_as_words() {
        let s = backup(
            &layout(),
            &access(),
            &BackupPlan {
                host: "op-mastodon".into(),
                paths: vec!["/var/lib/mastodon".into()],
                databases: vec!["mastodon".into()],
                tags: vec!["deployment=op".into()],
            },
        );
        assert!(s.contains("RESTIC_PASSWORD_FILE=/var/lib/fediversity-backup/secrets/password"));
        assert!(s.contains("set -a; . /var/lib/fediversity-backup/secrets/env; set +a"));
        assert!(s.contains("-i /var/lib/fediversity-backup/secrets/sftp_key"));
        assert!(!s.contains("RESTIC_PASSWORD="));
        assert!(s.contains("RESTIC_REPOSITORY='sftp:backup@192.0.2.7:/srv/restic/env a'"));
    }

    #[test]
    fn every_path_and_name_is_one_escaped_word() {
        let s = backup(
            &layout(),
            &access(),
            &BackupPlan {
                host: "h".into(),
                paths: vec!["/srv/a b/$(reboot)".into()],
                databases: vec!["matrix-synapse".into()],
                tags: vec![],
            },
        );
        assert!(s.contains("for p in '/srv/a b/$(reboot)'; do"));
        assert!(s.contains(
            "dump_db matrix-synapse /var/lib/fediversity-backup/staging/databases/matrix-synapse;"
        ));
        let m = restore_move(&layout(), &["/srv/it's".into()]);
        assert!(m.contains("rm -rf '/srv/it'\\''s';"));
    }

    #[test]
    fn a_restored_database_gets_its_recorded_owner_and_collation_through_psql_variables() {
        let meta = DatabaseMeta {
            database: "matrix-synapse".into(),
            owner: "matrix-synapse".into(),
            encoding: "UTF8".into(),
            collate: "C".into(),
            ctype: "C".into(),
        };
        let s = restore_database(&layout(), "matrix-synapse", &meta);
        assert!(s.contains("-v owner=matrix-synapse -v encoding=UTF8 -v collate=C -v ctype=C"));
        assert!(s.contains("CREATE DATABASE %I OWNER %I TEMPLATE template0"));
        assert!(s.ends_with("pg_restore --exit-on-error -d matrix-synapse </var/lib/fediversity-backup/restore/var/lib/fediversity-backup/staging/databases/matrix-synapse.dump"));
    }

    #[test]
    fn a_full_check_reads_all_data_and_a_periodic_one_a_share() {
        assert!(check(&layout(), &access(), Some("100%")).contains("restic check --read-data 2>&1"));
        assert!(check(&layout(), &access(), Some("5%")).contains("restic check --read-data-subset=5% 2>&1"));
    }
}
