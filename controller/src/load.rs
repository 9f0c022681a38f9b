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
        write!(f, "{}:{}:{}: ", self.file.display(), self.line, self.column)?;
        if let Some(document) = self.document {
            write!(f, "document {}: ", document + 1)?;
        }
        if let Some(path) = self.path.as_ref().filter(|p| !p.is_root()) {
            write!(f, "{path}: ")?;
        }
        f.write_str(&self.message)
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

/// Reads and loads a file, refusing one larger than the limit before reading it.
pub fn load_file(file: &Path, limits: &Limits) -> FileLoad {
    let unreadable =
        |e: std::io::Error| FileLoad::whole_file(file, 1, 1, None, format!("cannot read the file: {e}"));
    let handle = match std::fs::File::open(file) {
        Ok(handle) => handle,
        Err(e) => return unreadable(e),
    };
    // Read at most one byte past the limit, so a file that grows while being read is still refused.
    let mut bytes = Vec::new();
    let cap = limits.max_bytes as u64 + 1;
    if let Err(e) = handle.take(cap).read_to_end(&mut bytes) {
        return unreadable(e);
    }
    if bytes.len() > limits.max_bytes {
        let size = std::fs::metadata(file)
            .map(|m| m.len())
            .unwrap_or(bytes.len() as u64);
        return FileLoad::whole_file(
            file,
            1,
            1,
            None,
            format!(
                "file is {size} bytes, more than the limit of {} bytes; split it into smaller files",
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
