//! Turns YAML files into objects and precise problems (file, line, column, document, field).

use std::collections::HashSet;
use std::fmt;
use std::io::Read;
use std::path::{Path, PathBuf};

use crate::api::{self, Object, ObjectKey};
use crate::yaml::{self, FieldPath, Limits};

/// One problem found while loading: where it is and what to do about it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Diagnostic {
    /// The file.
    pub file: PathBuf,
    /// The document in the file, counted from 0, when the problem is inside one.
    pub document: Option<usize>,
    /// The line, from 1.
    pub line: usize,
    /// The column, from 1.
    pub column: usize,
    /// The offending field, when the problem is about one.
    pub path: Option<FieldPath>,
    /// What is wrong and what to do.
    pub message: String,
}

impl fmt::Display for Diagnostic {
    /// `FILE:LINE:COLUMN: document N: FIELD: MESSAGE`, with the document counted from 1.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // Names and messages may carry what a file holds: control characters are shown escaped.
        let file = self.file.display().to_string();
        write!(
            f,
            "{}:{}:{}: ",
            crate::text::one_line(&file),
            self.line,
            self.column
        )?;
        if let Some(document) = self.document {
            write!(f, "document {}: ", document + 1)?;
        }
        if let Some(path) = self.path.as_ref().filter(|p| !p.is_root()) {
            write!(f, "{}: ", crate::text::one_line(&path.to_string()))?;
        }
        f.write_str(&crate::text::one_line(&self.message))
    }
}

/// An object and where it was defined.
#[derive(Debug, Clone, PartialEq)]
pub struct LoadedObject {
    /// The object.
    pub object: Object,
    /// The file that defines it.
    pub file: PathBuf,
    /// Its document in that file, from 0.
    pub document: usize,
    /// The line where its document starts.
    pub line: usize,
}

/// What one file yielded.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct FileLoad {
    /// The valid objects, in file order.
    pub objects: Vec<LoadedObject>,
    /// Every problem found.
    pub problems: Vec<Diagnostic>,
    /// Whether the file as a whole could not be read (too large, not UTF-8, not YAML): nothing in it is known.
    pub unreadable: bool,
    /// For each document that did not yield a valid object, what it claims to be, if that can be told.
    pub broken: Vec<Option<ObjectKey>>,
}

impl FileLoad {
    fn whole_file(file: &Path, line: usize, column: usize, document: Option<usize>, message: String) -> Self {
        Self {
            problems: vec![Diagnostic {
                file: file.into(),
                document,
                line,
                column,
                path: None,
                message,
            }],
            unreadable: true,
            ..Self::default()
        }
    }
}

/// The largest object, as JSON: Kubernetes caps objects near 1.5 MiB too. Every API response that lists
/// objects stays proportional to this, and an object this large is already far past any real need.
pub const MAX_OBJECT_BYTES: usize = 1536 * 1024;

/// Loads the objects of a file's text. `file` is only used to name the file in problems.
pub fn load_text(file: &Path, text: &str, limits: &Limits) -> FileLoad {
    let documents = match yaml::parse_documents(text, limits) {
        Ok(documents) => documents,
        Err(e) => return FileLoad::whole_file(file, e.mark.line, e.mark.column, Some(e.document), e.message),
    };
    let mut load = FileLoad::default();
    let mut seen: HashSet<ObjectKey> = HashSet::new();
    for (index, root) in documents {
        match api::parse_object(&root) {
            Ok(object) if object.json_size() > MAX_OBJECT_BYTES => {
                load.broken.push(Some(object.key()));
                load.problems.push(Diagnostic {
                    file: file.into(),
                    document: Some(index),
                    line: root.mark.line,
                    column: root.mark.column,
                    path: None,
                    message: format!(
                        "{} is {} bytes as JSON, more than the limit of {MAX_OBJECT_BYTES} bytes (1.5 MiB); \
                         keep large data (notes, certificates, files) out of the object",
                        object.key(),
                        object.json_size()
                    ),
                });
            }
            Ok(object) => {
                let key = object.key();
                if seen.insert(key.clone()) {
                    load.objects.push(LoadedObject {
                        object,
                        file: file.into(),
                        document: index,
                        line: root.mark.line,
                    });
                } else {
                    let at = root.get("metadata").and_then(|m| m.get("name")).unwrap_or(&root);
                    load.problems.push(Diagnostic {
                        file: file.into(),
                        document: Some(index),
                        line: at.mark.line,
                        column: at.mark.column,
                        path: Some(FieldPath::parse("metadata.name")),
                        message: format!(
                            "{key} is defined twice in this file; the first definition is used, remove one"
                        ),
                    });
                }
            }
            Err(problems) => {
                load.broken.push(api::identify(&root));
                load.problems.extend(problems.into_iter().map(|p| Diagnostic {
                    file: file.into(),
                    document: Some(index),
                    line: p.mark.line,
                    column: p.mark.column,
                    path: Some(p.path),
                    message: p.message,
                }));
            }
        }
    }
    load
}

/// What a path holds when it cannot be read as a regular file.
fn file_type_name(meta: &std::fs::Metadata) -> &'static str {
    use std::os::unix::fs::FileTypeExt;
    let t = meta.file_type();
    if t.is_dir() {
        "a folder"
    } else if t.is_fifo() {
        "a FIFO (named pipe)"
    } else if t.is_socket() {
        "a socket"
    } else if t.is_char_device() || t.is_block_device() {
        "a device"
    } else {
        "not a regular file"
    }
}

/// Reads a regular file, at most `max_bytes + 1` bytes of it. Anything else (a FIFO, a device, a socket,
/// a folder, a dangling link, an unreadable file) is refused with a message, and is never opened in a way
/// that could block: the file is checked before it is opened, opened without blocking, and checked again
/// on the open handle (it may have been replaced in between).
/// Returns the bytes read and the file's size.
pub fn read_regular(file: &Path, max_bytes: usize) -> Result<(Vec<u8>, u64), String> {
    use std::os::unix::fs::OpenOptionsExt;
    let not_regular = |meta: &std::fs::Metadata| {
        format!(
            "cannot read the file: it is {}, not a regular file; replace it with a regular file (its last \
             good objects are kept meanwhile)",
            file_type_name(meta)
        )
    };
    let meta = match std::fs::metadata(file) {
        Ok(meta) => meta,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound && std::fs::symlink_metadata(file).is_ok() => {
            return Err("cannot read the file: it is a link to a file that does not exist".into());
        }
        Err(e) => return Err(format!("cannot read the file: {e}")),
    };
    if !meta.is_file() {
        return Err(not_regular(&meta));
    }
    let handle = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(rustix::fs::OFlags::NONBLOCK.bits().cast_signed())
        .open(file)
        .map_err(|e| format!("cannot read the file: {e}"))?;
    let meta = handle
        .metadata()
        .map_err(|e| format!("cannot read the file: {e}"))?;
    if !meta.is_file() {
        return Err(not_regular(&meta));
    }
    // Read at most one byte past the limit, so a file that grows while being read is still refused.
    let mut bytes = Vec::new();
    handle
        .take(max_bytes as u64 + 1)
        .read_to_end(&mut bytes)
        .map_err(|e| format!("cannot read the file: {e}"))?;
    Ok((bytes, meta.len()))
}

/// Reads and loads a file, refusing one larger than the limit before reading it, and anything that is
/// not a regular file.
pub fn load_file(file: &Path, limits: &Limits) -> FileLoad {
    match read_regular(file, limits.max_bytes) {
        Ok((bytes, size)) => load_bytes(file, bytes, size, limits),
        Err(message) => FileLoad::whole_file(file, 1, 1, None, message),
    }
}

/// A file whose reading failed as a whole: nothing in it is known (its last good objects are kept).
pub fn unreadable_file(file: &Path, message: String) -> FileLoad {
    FileLoad::whole_file(file, 1, 1, None, message)
}

/// Loads the bytes read from `file` (at most one past the limit; `size` is the file's size): refuses them
/// when over the limit or not UTF-8.
pub fn load_bytes(file: &Path, bytes: Vec<u8>, size: u64, limits: &Limits) -> FileLoad {
    if bytes.len() > limits.max_bytes {
        return FileLoad::whole_file(
            file,
            1,
            1,
            None,
            format!(
                "file is {} bytes, more than the limit of {} bytes; split it into smaller files",
                size.max(bytes.len() as u64),
                limits.max_bytes
            ),
        );
    }
    match String::from_utf8(bytes) {
        Ok(text) => load_text(file, &text, limits),
        Err(e) => {
            let offset = e.utf8_error().valid_up_to();
            let before = &e.as_bytes()[..offset];
            let line = before.iter().filter(|&&b| b == b'\n').count() + 1;
            let column = offset - before.iter().rposition(|&b| b == b'\n').map_or(0, |p| p + 1) + 1;
            FileLoad::whole_file(
                file,
                line,
                column,
                None,
                "file is not valid UTF-8 text; save it as UTF-8".into(),
            )
        }
    }
}
