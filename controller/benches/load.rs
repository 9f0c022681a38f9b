//! Benchmark of the first layer: loading 10,000 objects, incremental reloads, store generations, hostile
//! input. Run with `cargo bench -p fediversity --bench load`; prints one line per figure.

use std::time::{Duration, Instant};

use fediversity::api::ObjectKey;
use fediversity::fixtures;
use fediversity::source::dir::DirSource;
use fediversity::store::{Store, canonical_hash};
use fediversity::yaml::Limits;

fn best_of<T>(runs: usize, mut f: impl FnMut() -> T) -> (Duration, T) {
    let mut best = Duration::MAX;
    let mut last = None;
    for _ in 0..runs {
        let started = Instant::now();
        let value = f();
        best = best.min(started.elapsed());
        last = Some(value);
    }
    (best, last.expect("at least one run"))
}

fn main() {
    let objects: usize = std::env::var("BENCH_OBJECTS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(10_000);
    let dir = tempfile::tempdir().expect("temp dir");
    let files = fixtures::write_tree(dir.path(), objects, 100).expect("write objects");
    let bytes: u64 = files
        .iter()
        .map(|f| std::fs::metadata(f).map(|m| m.len()).unwrap_or(0))
        .sum();
    println!(
        "objects: {objects} in {} files ({:.1} MiB)",
        files.len(),
        bytes as f64 / 1048576.0
    );
    let rss_before = fixtures::proc_status_kib("VmRSS:");

    let started = Instant::now();
    let mut source = DirSource::new(vec![dir.path().to_path_buf()], Limits::default());
    let snapshot = source.scan(true);
    let cold = started.elapsed();
    assert_eq!(snapshot.objects.len(), objects);
    assert!(snapshot.errors.is_empty());
    let peak = fixtures::proc_status_kib("VmHWM:");
    let rss_after = fixtures::proc_status_kib("VmRSS:");
    println!(
        "first load (cold cache): {:.0} ms ({:.0} objects/s)",
        cold.as_secs_f64() * 1e3,
        objects as f64 / cold.as_secs_f64()
    );
    println!(
        "memory: peak RSS {:.1} MiB; snapshot holds {:.1} MiB",
        peak as f64 / 1024.0,
        rss_after.saturating_sub(rss_before) as f64 / 1024.0
    );

    let (full, _) = best_of(5, || source.scan(true));
    println!(
        "full rescan (re-read and hash every file, parse none): {:.0} ms",
        full.as_secs_f64() * 1e3
    );
    let (idle, _) = best_of(5, || source.scan(false));
    println!(
        "incremental rescan with no change (stat only): {:.1} ms",
        idle.as_secs_f64() * 1e3
    );

    let batch = files
        .iter()
        .find(|f| f.to_string_lossy().contains("/multi/"))
        .expect("a multi-document file");
    let text = std::fs::read_to_string(batch).expect("read");
    let mut flip = false;
    let (edit, _) = best_of(5, || {
        flip = !flip;
        let edited = if flip {
            text.replacen("maxTootChars: 500", "maxTootChars: 501", 1)
        } else {
            text.clone()
        };
        std::fs::write(batch, edited).expect("write");
        source.scan(false)
    });
    println!(
        "incremental rescan after editing one 100-document file: {:.1} ms",
        edit.as_secs_f64() * 1e3
    );

    let state = tempfile::tempdir().expect("temp dir");
    let store = Store::open(state.path()).expect("store");
    let specs: Vec<(ObjectKey, String)> = snapshot
        .objects
        .iter()
        .map(|(k, o)| (k.clone(), canonical_hash(&o.loaded.object.spec_json())))
        .collect();
    let started = Instant::now();
    store
        .observe_specs(specs.iter().map(|(k, h)| (k, h.clone())))
        .expect("observe");
    println!(
        "store: first generations of {objects} objects in one transaction: {:.0} ms",
        started.elapsed().as_secs_f64() * 1e3
    );
    let (unchanged, _) = best_of(5, || {
        store
            .observe_specs(specs.iter().map(|(k, h)| (k, h.clone())))
            .expect("observe")
    });
    println!(
        "store: generations of {objects} unchanged objects: {:.0} ms",
        unchanged.as_secs_f64() * 1e3
    );
    let key = &specs[0].0;
    let mut n = 0u64;
    let (status, wrote) = best_of(20, || {
        n += 1;
        store
            .put_status(key, &serde_json::json!({ "observedGeneration": n }))
            .expect("status")
    });
    assert!(wrote, "each status differs, so each is written");
    println!(
        "store: one status write (fsync'd commit): {:.2} ms",
        status.as_secs_f64() * 1e3
    );

    let hostile_dir = tempfile::tempdir().expect("temp dir");
    let mut big = fixtures::deployment_yaml("big", "env", 1).into_bytes();
    big.resize(50 * 1024 * 1024, b'#');
    let mut laughs = String::from("a0: &a0 [lol, lol, lol, lol, lol, lol, lol, lol, lol, lol]\n");
    for i in 1..=9 {
        laughs.push_str(&format!(
            "a{i}: &a{i} [{}]\n",
            vec![format!("*a{}", i - 1); 10].join(", ")
        ));
    }
    let nesting = format!("a: {}{}", "[".repeat(10_000), "]".repeat(10_000));
    for (name, content) in [
        ("50 MB file", big),
        ("billion laughs", laughs.into_bytes()),
        ("10,000-level nesting", nesting.into_bytes()),
    ] {
        let sub = hostile_dir.path().join(name.replace([' ', ','], "-"));
        std::fs::create_dir_all(&sub).expect("dir");
        std::fs::write(sub.join("hostile.yaml"), content).expect("write");
        let (took, snap) = best_of(3, || {
            DirSource::new(vec![sub.clone()], Limits::default()).scan(true)
        });
        assert_eq!(snap.errors.len(), 1);
        println!(
            "hostile {name}: refused in {:.2} ms: {}",
            took.as_secs_f64() * 1e3,
            snap.errors[0].message
        );
    }
}
