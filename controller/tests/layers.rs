//! The module layers of docs/design.md, enforced: a module imports only itself and the layers below it.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

/// The crate's top-level modules, lowest first. A module may name `crate::X` only for X at or below
/// its own place; a new module must be placed here (and in docs/design.md's diagram).
const LAYERS: &[&str] = &[
    // vocabulary
    "text",
    "process",
    "yaml",
    "api",
    "fixtures",
    "load",
    // persistence and the engine
    "store",
    "installation",
    "leader",
    "runtime",
    // what providers are given and report
    "provider",
    // desired state
    "source",
    "state",
    // providers and services: leaves that never import the reconcilers, the state or the daemon
    "proxmox",
    "nixos",
    "dns",
    "backup",
    // moving Deployments between environments (a service over backup)
    "migrate",
    // reconcilers, serving, wiring, the command line
    "reconcile",
    "http",
    "daemon",
    "cli",
];

/// Providers may not name these even where the order would let them (they get what they need in their
/// request and through the `provider` traits).
const PROVIDERS: &[&str] = &["proxmox", "nixos", "dns"];
const NOT_FOR_PROVIDERS: &[&str] = &["reconcile", "state", "daemon", "cli", "http", "source"];

/// Every `crate::X` named in `source` outside comments, with the line it is on.
fn crate_paths(source: &str) -> Vec<(usize, String)> {
    let mut found = Vec::new();
    for (n, line) in source.lines().enumerate() {
        let code = match line.find("//") {
            Some(i) => &line[..i],
            None => line,
        };
        let mut rest = code;
        while let Some(i) = rest.find("crate::") {
            let before = rest[..i].chars().last();
            rest = &rest[i + "crate::".len()..];
            if before.is_some_and(|c| c.is_alphanumeric() || c == '_') {
                continue; // e.g. `fediversity_crate::`, not this crate
            }
            let name: String = rest
                .chars()
                .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
                .collect();
            if !name.is_empty() {
                found.push((n + 1, name));
            }
        }
    }
    found
}

/// The top-level module a file under `src/` belongs to (`None` for the crate roots).
fn module_of(relative: &Path) -> Option<String> {
    let first = relative.components().next()?.as_os_str().to_str()?.to_owned();
    let name = first.strip_suffix(".rs").unwrap_or(&first).to_owned();
    (name != "lib" && name != "main").then_some(name)
}

/// Every breach of the layer order in `files` (module, relative path, source).
fn breaches(files: &[(String, String, String)]) -> Vec<String> {
    let rank: BTreeMap<&str, usize> = LAYERS.iter().enumerate().map(|(i, m)| (*m, i)).collect();
    let mut out = Vec::new();
    for (module, path, source) in files {
        let Some(&own) = rank.get(module.as_str()) else {
            out.push(format!(
                "{path}: module `{module}` has no place in LAYERS (tests/layers.rs)"
            ));
            continue;
        };
        for (line, target) in crate_paths(source) {
            if &target == module {
                continue;
            }
            match rank.get(target.as_str()) {
                // `crate::SomeType` re-exported at the root, or a macro: not a module.
                None if target.chars().next().is_some_and(|c| c.is_uppercase()) => {}
                None => out.push(format!("{path}:{line}: `crate::{target}` is not a known module")),
                Some(&other) if other > own => out.push(format!(
                    "{path}:{line}: `{module}` imports `{target}`, a higher layer"
                )),
                Some(_)
                    if PROVIDERS.contains(&module.as_str())
                        && NOT_FOR_PROVIDERS.contains(&target.as_str()) =>
                {
                    out.push(format!(
                        "{path}:{line}: the provider `{module}` imports `{target}`"
                    ))
                }
                Some(_) => {}
            }
        }
    }
    out
}

fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) {
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            rust_files(&path, out);
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.push(path);
        }
    }
}

fn sources() -> Vec<(String, String, String)> {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut paths = Vec::new();
    rust_files(&src, &mut paths);
    paths.sort();
    paths
        .into_iter()
        .filter_map(|p| {
            let relative = p.strip_prefix(&src).unwrap().to_owned();
            let module = module_of(&relative)?;
            let source = std::fs::read_to_string(&p).unwrap();
            Some((module, relative.display().to_string(), source))
        })
        .collect()
}

#[test]
fn no_module_imports_a_higher_layer_and_no_provider_imports_the_reconcilers_or_the_state() {
    let files = sources();
    assert!(
        files.len() > 50,
        "the walk found the crate's files ({})",
        files.len()
    );
    let found = breaches(&files);
    assert!(found.is_empty(), "layer breaches:\n{}", found.join("\n"));
}

#[test]
fn every_module_of_the_crate_root_has_a_place_in_the_layers() {
    let lib = std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("src/lib.rs")).unwrap();
    let declared: Vec<&str> = lib
        .lines()
        .filter_map(|l| l.trim().strip_prefix("pub mod "))
        .map(|l| l.trim_end_matches(';'))
        .collect();
    assert!(declared.len() >= LAYERS.len() - 1, "{declared:?}");
    for module in &declared {
        assert!(
            LAYERS.contains(module),
            "`{module}` is declared in lib.rs but has no layer"
        );
    }
    for module in LAYERS {
        assert!(
            declared.contains(module),
            "`{module}` has a layer but is not declared in lib.rs"
        );
    }
}

#[test]
fn the_check_catches_an_upward_import_a_provider_reading_the_state_and_an_unplaced_module() {
    let files = vec![
        (
            "store".to_owned(),
            "store/mod.rs".to_owned(),
            "use crate::api::Kind;\nuse crate::reconcile::Context;\n".to_owned(),
        ),
        (
            "nixos".to_owned(),
            "nixos/x.rs".to_owned(),
            "let b = crate::state::StatusBook::load(s);\n".to_owned(),
        ),
        (
            "runtime".to_owned(),
            "runtime/y.rs".to_owned(),
            "// use crate::daemon::run; (a comment)\n".to_owned(),
        ),
        ("teleport".to_owned(), "teleport/mod.rs".to_owned(), String::new()),
    ];
    let found = breaches(&files);
    assert_eq!(
        found,
        vec![
            "store/mod.rs:2: `store` imports `reconcile`, a higher layer".to_owned(),
            "nixos/x.rs:1: the provider `nixos` imports `state`".to_owned(),
            "teleport/mod.rs: module `teleport` has no place in LAYERS (tests/layers.rs)".to_owned(),
        ]
    );
}
