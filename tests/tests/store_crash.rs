//! The store survives SIGKILL at any moment: after reopening, every value is as last committed.

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::time::Duration;

use fediversity::api::{Kind, ObjectKey};
use fediversity::store::Store;

const KILLS: u64 = 25;

#[test]
fn a_store_killed_mid_write_reopens_cleanly_with_the_last_committed_values() {
    let state = tempfile::tempdir().unwrap();
    let keys: Vec<ObjectKey> = (0..50)
        .map(|i| ObjectKey::new(Kind::Deployment, &format!("d{i}")))
        .collect();
    let mut last_seen = 0;
    for attempt in 0..KILLS {
        let mut child = Command::new(env!("CARGO_BIN_EXE_store-writer"))
            .arg(state.path())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .unwrap();
        let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
        // Let it commit a varying number of rounds, then kill it while it is in the middle of writing.
        let rounds = 1 + attempt % 4;
        let mut printed = 0;
        for _ in 0..rounds {
            let line = lines.next().expect("the writer reports progress").unwrap();
            printed = line.strip_prefix("committed ").unwrap().parse::<u64>().unwrap();
        }
        std::thread::sleep(Duration::from_micros(300 * (attempt % 7)));
        child.kill().unwrap(); // SIGKILL
        child.wait().unwrap();

        let store = Store::open(state.path()).expect("the store opens cleanly after SIGKILL");
        let generations: Vec<u64> = keys
            .iter()
            .map(|k| store.object(k).unwrap().unwrap().generation)
            .collect();
        let generation = generations[0];
        // Generations of one round are one transaction: all or nothing.
        assert!(
            generations.iter().all(|g| *g == generation),
            "torn generations: {generations:?}"
        );
        // At least the last reported round is there, and at most the one in flight.
        assert!(
            generation == printed || generation == printed + 1,
            "generation {generation}, printed {printed}"
        );
        assert!(
            generation > last_seen,
            "generation went backwards: {generation} after {last_seen}"
        );
        for key in &keys {
            let status: serde_json::Value = store.status(key).unwrap().unwrap();
            let observed = status["observedGeneration"].as_u64().unwrap();
            // Each status write is its own transaction, made after the round's generations.
            assert!(
                observed == generation || observed + 1 == generation,
                "{key}: status {observed}, generation {generation}"
            );
            assert!(
                observed >= printed,
                "{key}: status {observed} lost a committed round {printed}"
            );
        }
        last_seen = generation;
    }
}

#[test]
fn a_store_in_use_is_refused_with_a_clear_error() {
    let state = tempfile::tempdir().unwrap();
    let mut child = Command::new(env!("CARGO_BIN_EXE_store-writer"))
        .arg(state.path())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    lines.next().unwrap().unwrap();
    let err = Store::open(state.path()).unwrap_err();
    child.kill().unwrap();
    child.wait().unwrap();
    assert!(
        err.to_string().contains("in use by another fediversity process"),
        "{err}"
    );
}
