//! Every NixOS option our Nix files and generated hosts set is one we verified in nixpkgs' own module
//! sources (`nix/nixpkgs-options.json`), and every option nixpkgs requires is set.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

use rnix::ast::{self, HasEntry};
use serde::Deserialize;

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap().to_owned()
}

/// One verified option.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct Fact {
    path: String,
    #[serde(rename = "type")]
    kind: String,
    #[serde(default)]
    required: bool,
    #[serde(default)]
    required_when: Option<String>,
    #[serde(default)]
    freeform: bool,
    file: String,
    commit: String,
    #[serde(default)]
    evidence: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct Record {
    release: String,
    #[allow(dead_code)] // reason: documentation for readers of the record, not checked
    note: String,
    options: Vec<Fact>,
}

fn record() -> Record {
    let text = std::fs::read_to_string(repo().join("nix/nixpkgs-options.json")).unwrap();
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("nix/nixpkgs-options.json: {e}"))
}

/// `a.b."c.d".e` → [a, b, c.d, e].
fn split_path(path: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut cur = String::new();
    let mut quoted = false;
    for c in path.chars() {
        match c {
            '"' => quoted = !quoted,
            '.' if !quoted => out.push(std::mem::take(&mut cur)),
            c => cur.push(c),
        }
    }
    out.push(cur);
    out
}

/// A segment whose name is computed (`${cfg.domain}`, `"${name}"`).
const DYNAMIC: &str = "<dynamic>";

/// The option paths a module (or a generated host) sets, and the `fediversity.*` names it declares.
#[derive(Debug, Default)]
struct Walk {
    set: BTreeSet<Vec<String>>,
    declared: BTreeSet<String>,
}

fn attr_name(attr: &ast::Attr) -> String {
    match attr {
        ast::Attr::Ident(i) => i.ident_token().map(|t| t.text().to_owned()).unwrap_or_default(),
        ast::Attr::Str(s) => {
            let parts = s.normalized_parts();
            match parts.as_slice() {
                [ast::InterpolPart::Literal(l)] => l.clone(),
                [] => String::new(),
                _ => DYNAMIC.into(),
            }
        }
        ast::Attr::Dynamic(_) => DYNAMIC.into(),
    }
}

/// The function an application calls (`lib.mkIf` → `mkIf`) and its arguments, in order.
fn flatten_apply(apply: &ast::Apply) -> (String, Vec<ast::Expr>) {
    let mut args = vec![apply.argument().unwrap()];
    let mut head = apply.lambda().unwrap();
    loop {
        match head {
            ast::Expr::Apply(a) => {
                args.push(a.argument().unwrap());
                head = a.lambda().unwrap();
            }
            ast::Expr::Paren(p) => head = p.expr().unwrap(),
            _ => break,
        }
    }
    args.reverse();
    let name = match &head {
        ast::Expr::Ident(i) => i.ident_token().map(|t| t.text().to_owned()).unwrap_or_default(),
        ast::Expr::Select(s) => s
            .attrpath()
            .and_then(|p| p.attrs().last())
            .map(|a| attr_name(&a))
            .unwrap_or_default(),
        _ => String::new(),
    };
    (name, args)
}

impl Walk {
    fn value(&mut self, expr: ast::Expr, prefix: &[String]) {
        match expr {
            ast::Expr::Paren(p) => self.value(p.expr().unwrap(), prefix),
            ast::Expr::LetIn(l) => self.value(l.body().unwrap(), prefix),
            ast::Expr::With(w) => self.value(w.body().unwrap(), prefix),
            ast::Expr::AttrSet(set) => {
                for entry in set.attrpath_values() {
                    let mut path = prefix.to_vec();
                    path.extend(entry.attrpath().unwrap().attrs().map(|a| attr_name(&a)));
                    self.value(entry.value().unwrap(), &path);
                }
                for inherit in set.inherits() {
                    for attr in inherit.attrs() {
                        let mut path = prefix.to_vec();
                        path.push(attr_name(&attr));
                        self.leaf(path);
                    }
                }
            }
            ast::Expr::IfElse(i) => {
                self.value(i.body().unwrap(), prefix);
                self.value(i.else_body().unwrap(), prefix);
            }
            ast::Expr::BinOp(b) if b.operator() == Some(ast::BinOpKind::Update) => {
                self.value(b.lhs().unwrap(), prefix);
                self.value(b.rhs().unwrap(), prefix);
            }
            ast::Expr::Apply(a) => {
                let (name, args) = flatten_apply(&a);
                match name.as_str() {
                    "mkIf" | "optionalAttrs" | "mkDefault" | "mkForce" | "mkOverride" | "mkBefore"
                    | "mkAfter" | "mkOrder" => self.value(args.last().unwrap().clone(), prefix),
                    "mkMerge" => match args.last().unwrap() {
                        ast::Expr::List(list) => {
                            for item in list.items() {
                                self.value(item, prefix);
                            }
                        }
                        other => self.value(other.clone(), prefix),
                    },
                    _ => self.leaf(prefix.to_vec()),
                }
            }
            _ => self.leaf(prefix.to_vec()),
        }
    }

    fn leaf(&mut self, path: Vec<String>) {
        if !path.is_empty() {
            self.set.insert(path);
        }
    }

    /// `options.fediversity.<name>` and `options.fediversity = { <name> = … }`: our own option names.
    fn options(&mut self, expr: ast::Expr, prefix: &[String]) {
        if prefix.len() == 2 && prefix[0] == "fediversity" {
            self.declared.insert(prefix[1].clone());
            return;
        }
        match expr {
            ast::Expr::AttrSet(set) => {
                for entry in set.attrpath_values() {
                    let mut path = prefix.to_vec();
                    path.extend(entry.attrpath().unwrap().attrs().map(|a| attr_name(&a)));
                    let path: Vec<String> = path.into_iter().take(2).collect();
                    self.options(entry.value().unwrap(), &path);
                }
            }
            ast::Expr::Paren(p) => self.options(p.expr().unwrap(), prefix),
            _ => {}
        }
    }

    /// A module: a function or attribute set with `options`, `config`, `imports`, or config directly.
    fn module(&mut self, text: &str, name: &str) {
        let parsed = rnix::Root::parse(text);
        assert!(parsed.errors().is_empty(), "{name}: {:?}", parsed.errors());
        let mut expr = parsed.tree().expr().unwrap();
        loop {
            expr = match expr {
                ast::Expr::Lambda(l) => l.body().unwrap(),
                ast::Expr::LetIn(l) => l.body().unwrap(),
                ast::Expr::Paren(p) => p.expr().unwrap(),
                other => break expr = other,
            };
        }
        let ast::Expr::AttrSet(set) = expr else {
            panic!("{name}: not a module (an attribute set)");
        };
        for entry in set.attrpath_values() {
            let path: Vec<String> = entry.attrpath().unwrap().attrs().map(|a| attr_name(&a)).collect();
            match path[0].as_str() {
                "imports" | "meta" => {}
                "options" => self.options(entry.value().unwrap(), &path[1..]),
                "config" => self.value(entry.value().unwrap(), &path[1..]),
                _ => self.value(entry.value().unwrap(), &path),
            }
        }
    }
}

fn walk_files(files: &[PathBuf]) -> Walk {
    let mut walk = Walk::default();
    for f in files {
        let text = std::fs::read_to_string(f).unwrap_or_else(|e| panic!("{}: {e}", f.display()));
        walk.module(&text, &f.display().to_string());
    }
    walk
}

fn matches(fact: &[String], path: &[String], freeform: bool) -> bool {
    if path.len() < fact.len() || (path.len() > fact.len() && !freeform) {
        return false;
    }
    fact.iter()
        .zip(path)
        .all(|(f, p)| f == p || (f == "<name>" && !p.is_empty()))
}

/// What is wrong with the paths `walk` sets, against the record and our own declarations.
fn problems(walk: &Walk, own: &BTreeSet<String>, record: &Record, whole_host: bool) -> Vec<String> {
    let facts: Vec<(Vec<String>, &Fact)> = record.options.iter().map(|f| (split_path(&f.path), f)).collect();
    let mut problems = Vec::new();
    for path in &walk.set {
        let shown = path.join(".");
        if path[0] == "fediversity" {
            if !own.contains(&path[1]) {
                problems.push(format!("`{shown}` is not declared by our modules"));
            }
            continue;
        }
        if !facts.iter().any(|(f, fact)| matches(f, path, fact.freeform)) {
            problems.push(format!("`{shown}` is set but not in nix/nixpkgs-options.json"));
        }
    }
    if whole_host {
        let is_set = |p: &[String]| {
            walk.set
                .iter()
                .any(|s| matches(p, s, true) || matches(s, p, false))
        };
        for (f, fact) in &facts {
            if !fact.required {
                continue;
            }
            let applies = fact
                .required_when
                .as_deref()
                .is_none_or(|w| is_set(&split_path(w)));
            if applies && !is_set(f) {
                problems.push(format!("`{}` is required and not set", fact.path));
            }
        }
    }
    problems
}

/// Our modules: every Nix file that is a NixOS module (not the package, the option fragment, the
/// template builder or the VM tests).
fn modules() -> Vec<PathBuf> {
    let nix = repo().join("nix");
    let mut files = vec![
        nix.join("base.nix"),
        nix.join("environment.nix"),
        nix.join("proxmox-guest.nix"),
        nix.join("module.nix"),
        nix.join("template-config.nix"),
    ];
    for app in ["mastodon", "pixelfed", "peertube", "matrix"] {
        files.push(nix.join(format!("applications/{app}.nix")));
    }
    files
}

fn own_options() -> BTreeSet<String> {
    walk_files(&modules()).declared
}

#[test]
fn every_option_our_modules_set_is_in_the_record_of_verified_nixpkgs_options() {
    let record = record();
    assert!(record.release.contains("nixos"), "{}", record.release);
    let own = own_options();
    for expected in [
        "environment",
        "secretFiles",
        "rootAuthorizedKeys",
        "readiness",
        "firstAccount",
    ] {
        assert!(
            own.contains(expected),
            "fediversity.{expected} is not declared: {own:?}"
        );
    }
    let mut all = Vec::new();
    for file in modules() {
        let walk = walk_files(std::slice::from_ref(&file));
        assert!(!walk.set.is_empty(), "{}: nothing found", file.display());
        for p in problems(&walk, &own, &record, false) {
            all.push(format!("{}: {p}", file.display()));
        }
    }
    assert!(all.is_empty(), "{}", all.join("\n"));
}

#[test]
fn every_generated_host_with_its_modules_sets_what_nixpkgs_requires() {
    let record = record();
    let own = own_options();
    let nix = repo().join("nix");
    let golden = repo().join("controller/tests/golden/nixos");
    let mut checked = 0;
    for (host, app) in [
        ("mastodon", "mastodon"),
        ("mastodon-hostile", "mastodon"),
        ("pixelfed", "pixelfed"),
        ("peertube", "peertube"),
        ("matrix", "matrix"),
    ] {
        let files = vec![
            golden.join(format!("{host}.nix")),
            nix.join("base.nix"),
            nix.join("environment.nix"),
            nix.join("proxmox-guest.nix"),
            nix.join(format!("applications/{app}.nix")),
        ];
        let walk = walk_files(&files);
        // The generated file itself sets only our options and the host name.
        let generated = walk_files(&files[..1]);
        for path in &generated.set {
            assert!(
                path[0] == "fediversity" || path == &["networking", "hostName"],
                "{host}: the generated file sets `{}`",
                path.join(".")
            );
        }
        let found = problems(&walk, &own, &record, true);
        assert!(found.is_empty(), "{host}:\n{}", found.join("\n"));
        // Our own required option behind `security.acme.defaults.email` (no default in environment.nix).
        let acme: Vec<String> = ["fediversity", "environment", "acme", "email"]
            .map(String::from)
            .to_vec();
        assert!(generated.set.contains(&acme), "{host}: no ACME e-mail");
        checked += 1;
    }
    assert_eq!(checked, 5);
}

#[test]
fn an_option_missing_from_the_record_and_an_unset_required_one_are_both_reported() {
    let record = record();
    let own = own_options();
    let mut walk = Walk::default();
    walk.module(
        "{ lib, ... }: { services.mastodon = { enable = true; localDomain = \"x\"; bogusOption = lib.mkIf true 1; }; }",
        "test",
    );
    let found = problems(&walk, &own, &record, true);
    assert!(
        found
            .iter()
            .any(|p| p.contains("`services.mastodon.bogusOption` is set but not in")),
        "{found:?}"
    );
    assert!(
        found
            .iter()
            .any(|p| p.contains("`services.mastodon.streamingProcesses` is required")),
        "{found:?}"
    );
}

#[test]
fn a_host_without_the_guest_module_lacks_its_root_file_system_and_boot_loader() {
    let record = record();
    let own = own_options();
    let nix = repo().join("nix");
    let walk = walk_files(&[
        repo().join("controller/tests/golden/nixos/mastodon.nix"),
        nix.join("base.nix"),
        nix.join("environment.nix"),
        nix.join("applications/mastodon.nix"),
    ]);
    let found = problems(&walk, &own, &record, true);
    for required in ["fileSystems.\"/\".device", "boot.loader.grub.device"] {
        assert!(
            found
                .iter()
                .any(|p| p.contains(&format!("`{required}` is required"))),
            "{required}: {found:?}"
        );
    }
}

#[test]
fn every_fact_names_its_nixpkgs_file_commit_and_type() {
    let record = record();
    let mut seen = BTreeMap::new();
    for fact in &record.options {
        assert!(!fact.kind.is_empty(), "{}: no type", fact.path);
        assert!(
            fact.file.starts_with("nixos/") || fact.file.starts_with("nix/"),
            "{}: {}",
            fact.path,
            fact.file
        );
        assert!(
            fact.commit.len() == 40 && fact.commit.bytes().all(|b| b.is_ascii_hexdigit())
                || (fact.commit == "unknown" && fact.evidence.is_some()),
            "{}: commit `{}`",
            fact.path,
            fact.commit
        );
        if let Some(e) = &fact.evidence {
            assert!(!e.is_empty());
        }
        assert!(
            seen.insert(fact.path.clone(), ()).is_none(),
            "{} is listed twice",
            fact.path
        );
    }
}
