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
/// Seconds a file's change time must lie before a manifest is taken for its hash to be remembered: a
/// file changed within the same timestamp tick as it was listed would otherwise keep its stat data.
pub const RACY_SECS: u32 = 2;
/// The separator between a manifest and the count of files it hashed (quick manifests only).
pub const REHASHED_MARK: &str = "\0--rehashed--\0";
/// The separator before each database's checksums in combined output.
pub const DATABASE_MARK: &str = "\0--database--\0";

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

    /// `dir/quick`: the stat data and SHA-256 of the files last hashed in one lineage (see
    /// [`quick_manifest_lines`]).
    pub fn quick(&self) -> String {
        format!("{}/quick", self.dir)
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

/// The line that stores the secrets `(name, length)` from stdin, one after the other (mode 0600 in a 0700
/// folder), each atomically: one connection for all of them.
pub fn put_secrets(layout: &Layout, secrets: &[(&str, usize)]) -> String {
    let s = layout.secrets();
    let mut out = format!("set -e; umask 077; mkdir -p {s}; chmod 700 {s}; ");
    for (name, len) in secrets {
        out.push_str(&format!(
            "head -c {len} >{s}/{name}.tmp; [ \"$(wc -c <{s}/{name}.tmp)\" -eq {len} ] || {{ echo 'a secret arrived cut off' >&2; exit 1; }}; mv {s}/{name}.tmp {s}/{name}; "
        ));
    }
    out
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
        "set -eu; umask 077; mkdir -p {d}/cache; if [ -z \"${{FEDIVERSITY_LOCKED:-}}\" ]; then {}fi; \
export RESTIC_REPOSITORY={} RESTIC_PASSWORD_FILE={s}/password RESTIC_CACHE_DIR={d}/cache; ",
        lock(layout),
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

/// Takes the host's backup lock (fd 9) for the rest of the line, or exits with [`EXIT_LOCKED`]; a
/// line that already holds it sets `FEDIVERSITY_LOCKED`, and [`prologue`] then leaves it alone.
pub fn lock(layout: &Layout) -> String {
    let d = &layout.dir;
    format!(
        "mkdir -p {d}; exec 9>{d}/lock; \
if ! flock -w {LOCK_WAIT_SECS} 9; then echo 'another backup or restore still runs on this host' >&2; exit {EXIT_LOCKED}; fi; "
    )
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

/// The lines that write the same two files as [`manifest_lines`], hashing only the files whose device,
/// inode, size, modification time and change time (ns) differ from those recorded in `layout.quick()`
/// when they were last hashed, trusted only when recorded for the same `lineage` (a plain word);
/// anything else is hashed. Afterwards the record holds the files whose change time lies more than
/// [`RACY_SECS`] before the listing began (a later change cannot then keep the same stat data), and
/// `dir/rehashed` the number of files hashed. Needs absolute data paths; GNU find, sort, join, sed.
pub fn quick_manifest_lines(layout: &Layout, dir: &str, lineage: &str) -> String {
    let q = layout.quick();
    let l = shell_word(lineage);
    format!(
        "if [ $# -gt 0 ]; then ( export LC_ALL=C; w=$(mktemp -d {dir}/quick.XXXXXX); \
T=$(($(date +%s) - {RACY_SECS})); \
find \"$@\" -fprintf {dir}/files.stat '%y\\0%m\\0%u\\0%g\\0%s\\0%p\\0%l\\0' \\( -type f -fprintf $w/all '%D:%i:%s:%T@:%C@%p\\0' \
\\( -newerct \"@$T\" -o -fprintf $w/old '%D:%i:%s:%T@:%C@\\0' \\) \\); \
if [ \"$(cat {q}/lineage 2>/dev/null)\" = {l} ] && [ -f {q}/sums ]; then cp {q}/sums $w/C; else : >$w/C; fi; \
sort -z -t/ -k1,1 $w/all >$w/L; join -z -t/ -v1 $w/L $w/C >$w/N; \
cut -z -d/ -f1 $w/N | tr '\\0' '\\n' >$w/Nk; sed -z 's|^[^/]*||' $w/N | xargs -0r sha256sum -- >$w/Ns; \
if [ \"$(wc -l <$w/Nk)\" -ne \"$(wc -l <$w/Ns)\" ]; then echo 'files vanished while they were hashed' >&2; exit 1; fi; \
sed 's/^\\\\//' $w/Ns | cut -c1-64 | paste -d/ $w/Nk - | tr '\\n' '\\0' >$w/H; \
sort -z -t/ -k1,1 -u $w/C $w/H >$w/CH; \
join -z -t/ $w/L $w/CH | sed -z 's|^[^/]*\\(/.*\\)/\\([0-9a-f]*\\)$|\\2  \\1|' >{dir}/files.sha256; \
if [ \"$(tr -cd '\\0' <$w/L | wc -c)\" -ne \"$(tr -cd '\\0' <{dir}/files.sha256 | wc -c)\" ]; then echo 'a file has no checksum' >&2; exit 1; fi; \
sort -z -u $w/old | join -z -t/ - $w/CH >$w/keep; \
n=$(mktemp -d {q}.XXXXXX); mv $w/keep $n/sums; echo {l} >$n/lineage; rm -rf {q}; mv -T $n {q} 2>/dev/null || rm -rf $n; \
wc -l <$w/Nk >{dir}/rehashed; rm -rf $w ); \
else : >{dir}/files.stat; : >{dir}/files.sha256; echo 0 >{dir}/rehashed; fi; "
    )
}

/// The manifest lines: quick within `lineage` (see [`quick_manifest_lines`]) when every path is
/// absolute, else every file hashed.
fn manifest_for(layout: &Layout, dir: &str, paths: &[String], lineage: Option<&str>) -> String {
    match lineage.filter(|_| paths.iter().all(|p| p.starts_with('/'))) {
        Some(l) => quick_manifest_lines(layout, dir, l),
        None => manifest_lines(dir),
    }
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
    /// The lineage (a plain word) whose recorded hashes the manifest may reuse; `None`: hash every file.
    pub lineage: Option<String>,
}

/// The backup line: dumps every database while the manifest is written, takes one snapshot of the
/// staging folder and the data paths, and prints restic's JSON summary (then, in a lineage, the
/// manifest and the databases' checksums). Should restic fail, stale locks are cleared, the repository
/// is created when there is none, and it runs once more: each restic run opens the repository anew, so
/// the common case pays for one.
pub fn backup(layout: &Layout, access: &ResticAccess, plan: &BackupPlan) -> String {
    let st = layout.staging();
    let d = &layout.dir;
    let mut s = prologue(layout, access);
    s.push_str(&format!("rm -rf {st}; mkdir -p {st}/databases; "));
    if !plan.databases.is_empty() {
        s.push_str(&dump_function());
        s.push_str("( ");
        for db in &plan.databases {
            s.push_str(&format!(
                "dump_db {} {st}/databases/{}; ",
                shell_word(db),
                shell_word(db)
            ));
        }
        s.push_str(") & dumps=$!; ");
    }
    s.push_str(&existing_paths(&plan.paths));
    s.push_str(&manifest_for(layout, &st, &plan.paths, plan.lineage.as_deref()));
    if !plan.databases.is_empty() {
        s.push_str("wait $dumps; ");
    }
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
    let run = format!("{} {st} \"$@\" >{d}/backup.json", shell_words(&words));
    s.push_str(&format!(
        "if ! {run} 2>{d}/backup.err; then restic unlock >/dev/null 2>&1 || true; {}{run}; fi; \
grep '\"message_type\":\"summary\"' {d}/backup.json | tail -n 1",
        init_if_missing(layout)
    ));
    if plan.lineage.is_some() {
        // The manifest and the databases' checksums follow, so that no second connection reads them.
        s.push_str(&format!(
            "; printf '\\0--manifest--\\0'; {}",
            restored_manifest_in(&st)
        ));
        for db in &plan.databases {
            s.push_str(&format!(
                "; printf '\\0--database--\\0'; cat {}",
                shell_word(&format!("{st}/databases/{db}.json"))
            ));
        }
    }
    s
}

/// The separator between a backup's summary and the manifest it recorded (backups in a lineage).
pub const MANIFEST_MARK: &str = "\0--manifest--\0";

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
    live_manifest_in(layout, paths, None)
}

/// [`live_manifest`], quick within `lineage` (see [`quick_manifest_lines`]); it then also prints
/// [`REHASHED_MARK`] and the number of files it hashed.
pub fn live_manifest_in(layout: &Layout, paths: &[String], lineage: Option<&str>) -> String {
    // A folder of its own: a manifest a killed controller left running never mixes with this one.
    let d = &layout.dir;
    let mut s = format!(
        "set -eu; umask 077; mkdir -p {d}; v=$(mktemp -d {d}/verify.XXXXXX); {}{}cat $v/files.stat; printf '\\0--sha256--\\0'; cat $v/files.sha256",
        existing_paths(paths),
        manifest_for(layout, "$v", paths, lineage)
    );
    if lineage.is_some() {
        s.push_str("; printf '\\0--rehashed--\\0'; cat $v/rehashed");
    }
    s.push_str("; rm -rf $v");
    s
}

/// The line that prints the live data paths' manifest (quick within `lineage`) and, after
/// [`DATABASE_MARK`] each, the checksums of every database: one connection for a side's state.
pub fn live_state(layout: &Layout, paths: &[String], databases: &[String], lineage: Option<&str>) -> String {
    let mut s = live_manifest_in(layout, paths, lineage);
    for db in databases {
        s.push_str(&format!(
            "; printf '\\0--database--\\0'; {}",
            database_checksums(db)
        ));
    }
    s
}

/// The line that prints a manifest stored in the restored staging folder, as [`live_manifest`] does.
pub fn restored_manifest(layout: &Layout) -> String {
    restored_manifest_in(&layout.restored_staging())
}

fn restored_manifest_in(st: &str) -> String {
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
        "rm -rf {} {} {} {d}/verify {d}/verify.*",
        layout.restore(),
        layout.staging(),
        layout.secrets(),
        d = layout.dir
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
    use crate::backup::manifest::FileManifest;

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
            lineage: None,
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
                lineage: None,
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
                lineage: None,
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

    /// Runs a quick manifest of `data` under `work` on this machine: the manifest and the files hashed.
    fn quick(work: &std::path::Path, data: &std::path::Path, lineage: &str) -> (FileManifest, usize) {
        let layout = Layout {
            dir: work.to_string_lossy().into_owned(),
        };
        let paths = vec![data.to_string_lossy().into_owned()];
        let out = std::process::Command::new("sh")
            .args(["-c", &live_manifest_in(&layout, &paths, Some(lineage))])
            .output()
            .unwrap();
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        let (m, n) = FileManifest::parse_counted(&String::from_utf8(out.stdout).unwrap()).unwrap();
        (m, n.unwrap())
    }

    fn full(work: &std::path::Path, data: &std::path::Path) -> FileManifest {
        let layout = Layout {
            dir: work.to_string_lossy().into_owned(),
        };
        let out = std::process::Command::new("sh")
            .args([
                "-c",
                &live_manifest(&layout, &[data.to_string_lossy().into_owned()]),
            ])
            .output()
            .unwrap();
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        FileManifest::parse(&String::from_utf8(out.stdout).unwrap()).unwrap()
    }

    #[test]
    fn a_quick_manifest_hashes_only_files_whose_stat_data_changed_and_equals_a_full_one() {
        let tmp = tempfile::tempdir().unwrap();
        let (work, data) = (tmp.path().join("work"), tmp.path().join("data"));
        std::fs::create_dir_all(data.join("sub dir")).unwrap();
        let names = [
            "plain",
            "with space",
            "with\nnewline",
            "with\ttab",
            "back\\slash",
            "-dash",
            "ünï 日本",
            "sub dir/deep",
        ];
        for (i, n) in names.iter().enumerate() {
            std::fs::write(data.join(n), format!("content {i}")).unwrap();
        }
        std::fs::hard_link(data.join("plain"), data.join("hard link")).unwrap();
        std::os::unix::fs::symlink("plain", data.join("link")).unwrap();
        // Files changed within the last RACY_SECS are always hashed again: wait them out.
        std::thread::sleep(std::time::Duration::from_millis(
            u64::from(RACY_SECS) * 1000 + 1100,
        ));
        let (first, hashed) = quick(&work, &data, "lineage-a");
        assert_eq!(hashed, 9, "no record yet: every file is hashed");
        assert_eq!(first, full(&work, &data));
        let (again, hashed) = quick(&work, &data, "lineage-a");
        assert_eq!((hashed, &again), (0, &first), "nothing changed: nothing hashed");

        // Same size, the modification time set back: the change time still gives it away.
        let before = std::fs::metadata(data.join("with space"))
            .unwrap()
            .modified()
            .unwrap();
        std::fs::write(data.join("with space"), "CONTENT 1").unwrap();
        std::fs::File::options()
            .write(true)
            .open(data.join("with space"))
            .unwrap()
            .set_modified(before)
            .unwrap();
        std::fs::remove_file(data.join("-dash")).unwrap();
        std::fs::write(data.join("sub dir/new"), "new").unwrap();
        let (changed, hashed) = quick(&work, &data, "lineage-a");
        assert_eq!(hashed, 2, "the rewritten and the new file");
        assert_eq!(changed, full(&work, &data));
        assert_ne!(
            changed.entries[&format!("{}/with space", data.display())].sha256,
            first.entries[&format!("{}/with space", data.display())].sha256
        );
        // Just changed: hashed again next time too, until they are older than the racy window.
        let (_, hashed) = quick(&work, &data, "lineage-a");
        assert_eq!(hashed, 2);

        // Another lineage trusts nothing; a lost record neither.
        let (other, hashed) = quick(&work, &data, "lineage-b");
        assert_eq!((hashed, &other), (9, &changed));
        std::fs::remove_dir_all(work.join("quick")).unwrap();
        let (_, hashed) = quick(&work, &data, "lineage-b");
        assert_eq!(hashed, 9);
    }

    #[test]
    fn a_full_check_reads_all_data_and_a_periodic_one_a_share() {
        assert!(check(&layout(), &access(), Some("100%")).contains("restic check --read-data 2>&1"));
        assert!(check(&layout(), &access(), Some("5%")).contains("restic check --read-data-subset=5% 2>&1"));
    }
}
