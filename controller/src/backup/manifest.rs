//! The verification manifest: every file under the data paths (type, mode, owner, size, SHA-256,
//! link target) and every table's row count and checksum, and how two of them are compared.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use thiserror::Error;

use super::script::DatabaseMeta;

/// Why host output could not be read as a manifest.
#[derive(Debug, Error, PartialEq, Eq)]
pub enum ManifestError {
    /// The `find -printf` records did not come in sevens.
    #[error("the file listing is cut off or malformed ({0} fields)")]
    Listing(usize),
    /// A `sha256sum -z` record was malformed.
    #[error("a checksum record is malformed: {0:?}")]
    Checksum(String),
    /// A database line was not the expected JSON.
    #[error("database checksums are malformed: {0}")]
    Database(String),
}

/// One entry under a data path.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Entry {
    /// `f` file, `d` folder, `l` symlink (as `find %y` prints it).
    pub kind: char,
    /// Permission bits in octal.
    pub mode: String,
    /// Owner and group names.
    pub owner: String,
    /// Size in bytes (files only; folders' sizes depend on the filesystem).
    pub size: Option<u64>,
    /// SHA-256 of a file's content.
    pub sha256: Option<String>,
    /// A symlink's target.
    pub link: Option<String>,
}

/// The files of the data paths, by absolute path.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct FileManifest {
    /// Entries by path.
    pub entries: BTreeMap<String, Entry>,
}

impl FileManifest {
    /// Reads what [`super::script::live_manifest`] prints: the `find` records, a separator, the
    /// `sha256sum -z` records.
    pub fn parse(output: &str) -> Result<Self, ManifestError> {
        Ok(Self::parse_counted(output)?.0)
    }

    /// Reads what [`super::script::live_manifest_in`] prints: the manifest, and how many files were
    /// hashed when it was a quick one.
    pub fn parse_counted(output: &str) -> Result<(Self, Option<usize>), ManifestError> {
        let (output, rehashed) = match output.split_once(super::script::REHASHED_MARK) {
            Some((m, n)) => (
                m,
                Some(
                    n.trim()
                        .parse()
                        .map_err(|_| ManifestError::Checksum(format!("rehashed count {n:?}")))?,
                ),
            ),
            None => (output, None),
        };
        Ok((Self::parse_listing(output)?, rehashed))
    }

    fn parse_listing(output: &str) -> Result<Self, ManifestError> {
        let (stat, sums) = output.split_once("\0--sha256--\0").unwrap_or((output, ""));
        let fields: Vec<&str> = stat.split('\0').collect();
        // A trailing NUL leaves one empty field at the end.
        let fields = match fields.split_last() {
            Some((&"", rest)) => rest,
            _ => &fields[..],
        };
        if fields.len() % 7 != 0 {
            return Err(ManifestError::Listing(fields.len()));
        }
        let mut entries = BTreeMap::new();
        for r in fields.chunks(7) {
            let kind = r[0].chars().next().unwrap_or('?');
            entries.insert(
                r[5].to_owned(),
                Entry {
                    kind,
                    mode: r[1].to_owned(),
                    owner: format!("{}:{}", r[2], r[3]),
                    size: if kind == 'f' { r[4].parse().ok() } else { None },
                    sha256: None,
                    link: (kind == 'l').then(|| r[6].to_owned()),
                },
            );
        }
        for record in sums.split('\0').filter(|r| !r.is_empty()) {
            let (hash, path) = record
                .split_once("  ")
                .or_else(|| record.split_once(" *"))
                .ok_or_else(|| ManifestError::Checksum(record.chars().take(120).collect()))?;
            if hash.len() != 64 {
                return Err(ManifestError::Checksum(record.chars().take(120).collect()));
            }
            if let Some(e) = entries.get_mut(path) {
                e.sha256 = Some(hash.to_owned());
            }
        }
        Ok(Self { entries })
    }

    /// Files (not folders or links) listed.
    pub fn files(&self) -> usize {
        self.entries.values().filter(|e| e.kind == 'f').count()
    }

    /// Bytes of all files.
    pub fn bytes(&self) -> u64 {
        self.entries.values().filter_map(|e| e.size).sum()
    }
}

/// What [`super::script::live_state`] prints, read: the files, how many of them were hashed (quick
/// manifests), and each database's checksums in the order asked.
pub fn parse_state(
    output: &str,
    databases: usize,
) -> Result<(FileManifest, Option<usize>, Vec<DatabaseSums>), ManifestError> {
    let mut parts = output.split(super::script::DATABASE_MARK);
    let (files, rehashed) = FileManifest::parse_counted(parts.next().unwrap_or(""))?;
    let dbs = parts.map(DatabaseSums::parse).collect::<Result<Vec<_>, _>>()?;
    if dbs.len() != databases {
        return Err(ManifestError::Database(format!(
            "{} databases' checksums instead of {databases}",
            dbs.len()
        )));
    }
    Ok((files, rehashed, dbs))
}

/// The word naming a lineage of quick manifests (see [`super::script::quick_manifest_lines`]): the
/// record's format, `label` (a migration) and the data paths; hashes recorded under another word are
/// never reused.
pub fn lineage_word(label: &str, paths: &[String]) -> String {
    use sha2::{Digest, Sha256};
    let mut h = Sha256::new();
    h.update(b"fediversity quick manifest v1\n");
    h.update(label.as_bytes());
    for p in paths {
        h.update(b"\0");
        h.update(p.as_bytes());
    }
    h.finalize()[..16].iter().map(|b| format!("{b:02x}")).collect()
}

/// One table's row count and checksum.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TableSum {
    /// Rows.
    pub rows: u64,
    /// The sum of the first 64 bits of each row's MD5 (order-independent).
    pub checksum: String,
}

/// A database's metadata and its tables' checksums.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DatabaseSums {
    /// Owner, encoding, collation.
    pub meta: DatabaseMeta,
    /// Tables by `schema.name`.
    pub tables: BTreeMap<String, TableSum>,
}

#[derive(Deserialize)]
struct TableLine {
    table: String,
    rows: u64,
    checksum: String,
}

impl DatabaseSums {
    /// Reads the JSON lines the checksum query prints: the metadata first, then one line per table.
    pub fn parse(output: &str) -> Result<Self, ManifestError> {
        let mut lines = output.lines().filter(|l| !l.trim().is_empty());
        let first = lines
            .next()
            .ok_or_else(|| ManifestError::Database("no output".into()))?;
        let meta: DatabaseMeta =
            serde_json::from_str(first).map_err(|e| ManifestError::Database(e.to_string()))?;
        let mut tables = BTreeMap::new();
        for line in lines {
            let t: TableLine =
                serde_json::from_str(line).map_err(|e| ManifestError::Database(e.to_string()))?;
            tables.insert(
                t.table,
                TableSum {
                    rows: t.rows,
                    checksum: t.checksum,
                },
            );
        }
        Ok(Self { meta, tables })
    }

    /// Rows in all tables.
    pub fn rows(&self) -> u64 {
        self.tables.values().map(|t| t.rows).sum()
    }
}

/// The differences between what a snapshot recorded and what a host holds, one sentence each.
pub fn compare_files(expected: &FileManifest, actual: &FileManifest) -> Vec<String> {
    let mut out = Vec::new();
    for (path, want) in &expected.entries {
        match actual.entries.get(path) {
            None => out.push(format!("missing: {path}")),
            Some(have) if have != want => {
                let what = if have.kind != want.kind {
                    "type"
                } else if have.sha256 != want.sha256 || have.size != want.size {
                    "content"
                } else if have.link != want.link {
                    "link target"
                } else if have.mode != want.mode {
                    "mode"
                } else {
                    "owner"
                };
                out.push(format!("{what} differs: {path}"));
            }
            Some(_) => {}
        }
    }
    for path in actual.entries.keys() {
        if !expected.entries.contains_key(path) {
            out.push(format!("unexpected: {path}"));
        }
    }
    out
}

/// The differences between a database's recorded and restored checksums.
pub fn compare_database(db: &str, expected: &DatabaseSums, actual: &DatabaseSums) -> Vec<String> {
    let mut out = Vec::new();
    if expected.meta.owner != actual.meta.owner {
        out.push(format!(
            "database {db}: owner {} instead of {}",
            actual.meta.owner, expected.meta.owner
        ));
    }
    if (expected.meta.collate.as_str(), expected.meta.ctype.as_str())
        != (actual.meta.collate.as_str(), actual.meta.ctype.as_str())
    {
        out.push(format!("database {db}: collation differs"));
    }
    for (table, want) in &expected.tables {
        match actual.tables.get(table) {
            None => out.push(format!("database {db}: table {table} missing")),
            Some(have) if have.rows != want.rows => out.push(format!(
                "database {db}: table {table} has {} rows instead of {}",
                have.rows, want.rows
            )),
            Some(have) if have.checksum != want.checksum => {
                out.push(format!("database {db}: table {table} content differs"))
            }
            Some(_) => {}
        }
    }
    for table in actual.tables.keys() {
        if !expected.tables.contains_key(table) {
            out.push(format!("database {db}: unexpected table {table}"));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    const HASH: &str = "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855";

    fn listing() -> String {
        format!(
            "d\x00700\x00root\x00root\x004096\x00/d\x00\x00\
f\x00600\x00root\x00root\x000\x00/d/a b\x00\x00\
l\x00777\x00root\x00root\x003\x00/d/l\x00a b\x00\
\x00--sha256--\x00{HASH}  /d/a b\x00"
        )
    }

    #[test]
    fn a_listing_with_spaces_links_and_empty_files_is_read() {
        let m = FileManifest::parse(&listing()).unwrap();
        assert_eq!(m.entries.len(), 3);
        assert_eq!(m.entries["/d/a b"].sha256.as_deref(), Some(HASH));
        assert_eq!(m.entries["/d/l"].link.as_deref(), Some("a b"));
        assert_eq!(m.entries["/d"].size, None);
        assert_eq!((m.files(), m.bytes()), (1, 0));
    }

    #[test]
    fn a_changed_file_a_missing_file_and_an_extra_file_are_each_named() {
        let a = FileManifest::parse(&listing()).unwrap();
        let mut b = a.clone();
        b.entries.get_mut("/d/a b").unwrap().sha256 = Some("0".repeat(64));
        b.entries.remove("/d/l");
        b.entries.insert("/d/new".into(), a.entries["/d/a b"].clone());
        assert_eq!(
            compare_files(&a, &b),
            vec!["content differs: /d/a b", "missing: /d/l", "unexpected: /d/new"]
        );
        assert!(compare_files(&a, &a).is_empty());
    }

    #[test]
    fn a_cut_off_listing_is_an_error() {
        assert!(matches!(
            FileManifest::parse("f\x00600\x00root"),
            Err(ManifestError::Listing(3))
        ));
    }

    #[test]
    fn database_lines_are_read_and_compared_by_table() {
        let text = "{\"database\" : \"app\", \"owner\" : \"app\", \"encoding\" : \"UTF8\", \"collate\" : \"C\", \"ctype\" : \"C\"}\n\
{\"table\" : \"public.t\", \"rows\" : 2, \"checksum\" : \"-17\"}\n";
        let a = DatabaseSums::parse(text).unwrap();
        assert_eq!(a.rows(), 2);
        let mut b = a.clone();
        b.tables.get_mut("public.t").unwrap().rows = 1;
        assert_eq!(
            compare_database("app", &a, &b),
            vec!["database app: table public.t has 1 rows instead of 2"]
        );
    }
}
