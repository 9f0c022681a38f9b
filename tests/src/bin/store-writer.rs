//! A child process for crash tests: commits rounds of generations and status to a store, forever,
//! printing `committed N` after each round's last commit, until it is killed.

use std::io::Write;

use fediversity::api::{Kind, ObjectKey};
use fediversity::store::Store;

fn main() -> anyhow::Result<()> {
    let dir = std::env::args()
        .nth(1)
        .ok_or_else(|| anyhow::anyhow!("usage: store-writer STATE_DIR"))?;
    let store = Store::open(std::path::Path::new(&dir))?;
    let keys: Vec<ObjectKey> = (0..50)
        .map(|i| ObjectKey::new(Kind::Deployment, &format!("d{i}")))
        .collect();
    let start = store.object(&keys[0])?.map_or(0, |r| r.generation);
    let mut stdout = std::io::stdout();
    for round in (start + 1).. {
        store.observe_specs(keys.iter().map(|k| (k, format!("spec-{round}"))))?;
        for key in &keys {
            store.put_status(key, &serde_json::json!({ "observedGeneration": round }))?;
        }
        writeln!(stdout, "committed {round}")?;
        stdout.flush()?;
    }
    Ok(())
}
