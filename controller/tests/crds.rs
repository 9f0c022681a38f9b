//! The committed CRDs in `crds/` are exactly what the Rust types generate.

use std::path::Path;

use fediversity::api::{Kind, crd};

#[test]
fn the_committed_crds_match_the_rust_types() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../crds");
    for kind in Kind::ALL {
        let path = dir.join(crd::file_name(kind));
        let committed = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        assert!(
            committed == crd::crd_yaml(kind),
            "{} drifted from the types: run `cargo run -- crds --output-dir crds` and commit the result",
            path.display()
        );
    }
}

#[test]
fn the_committed_crds_parse_and_name_their_kind() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../crds");
    for kind in Kind::ALL {
        let text = std::fs::read_to_string(dir.join(crd::file_name(kind))).unwrap();
        let value: serde_json::Value = yaml_serde::from_str(&text).unwrap();
        assert_eq!(value["kind"], "CustomResourceDefinition");
        assert_eq!(value["spec"]["names"]["kind"], kind.as_str());
        assert_eq!(
            value["metadata"]["name"],
            format!("{}.fediversity.eu", kind.plural())
        );
    }
}
