//! Sources into desired state: the feed that applies snapshots under the prune guards, the bridges from folder sources, and the sources' metrics.

use std::sync::Arc;
use std::time::Duration;

use prometheus::{
    HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge, IntGaugeVec, Opts, Registry,
};
use tokio::sync::watch;

use crate::api::{Kind, ObjectKey};
use crate::runtime::runner::ControllerHandle;
use crate::runtime::shutdown::ShutdownState;
use crate::source::set::{Record, SourceSet};
use crate::source::{Baseline, Fetch, Update};
use crate::state::{DesiredState, PruneBlocked, SourceStatus, StatusBook};
use crate::store::Store;

/// The sources' metrics: totals over every source, and series per source.
pub(super) struct SourceMetrics {
    snapshots: IntCounter,
    failures: IntCounter,
    errors: IntGauge,
    objects: IntGauge,
    last_applied: IntGauge,
    info: IntGaugeVec,
    last_fetch: IntGaugeVec,
    fetch_failures: IntCounterVec,
    fetch_duration: HistogramVec,
    prune_blocked: IntGaugeVec,
    source_errors: IntGaugeVec,
    stale: IntGaugeVec,
}

impl SourceMetrics {
    pub(super) fn register(registry: &Registry) -> Result<Self, prometheus::Error> {
        let counter = |name: &str, help: &str| -> Result<IntCounter, prometheus::Error> {
            let c = IntCounter::new(name, help)?;
            registry.register(Box::new(c.clone()))?;
            Ok(c)
        };
        let gauge = |name: &str, help: &str| -> Result<IntGauge, prometheus::Error> {
            let g = IntGauge::new(name, help)?;
            registry.register(Box::new(g.clone()))?;
            Ok(g)
        };
        Ok(Self {
            snapshots: counter(
                "fediversity_source_snapshots_total",
                "Snapshots applied from the sources.",
            )?,
            failures: counter(
                "fediversity_source_failures_total",
                "Source loads that failed as a whole (nothing was pruned).",
            )?,
            errors: gauge(
                "fediversity_source_errors",
                "Problems in the last snapshot (files that do not load, invalid objects).",
            )?,
            objects: gauge("fediversity_source_objects", "Objects in the last snapshot.")?,
            last_applied: gauge(
                "fediversity_source_last_applied_timestamp_seconds",
                "When the last snapshot was applied, in seconds since the epoch.",
            )?,
            info: register(
                registry,
                IntGaugeVec::new(
                    Opts::new(
                        "fediversity_source_info",
                        "One series per source, with its type and the revision of its newest snapshot.",
                    ),
                    &["source", "type", "revision"],
                )?,
            )?,
            last_fetch: register(
                registry,
                IntGaugeVec::new(
                    Opts::new(
                        "fediversity_source_last_fetch_timestamp_seconds",
                        "When each source was last fetched or read successfully, in seconds since the epoch.",
                    ),
                    &["source"],
                )?,
            )?,
            fetch_failures: register(
                registry,
                IntCounterVec::new(
                    Opts::new(
                        "fediversity_source_fetch_failures_total",
                        "Fetches or loads of each source that failed as a whole (nothing was pruned).",
                    ),
                    &["source"],
                )?,
            )?,
            fetch_duration: register(
                registry,
                HistogramVec::new(
                    HistogramOpts::new(
                        "fediversity_source_fetch_duration_seconds",
                        "How long each fetch took.",
                    )
                    .buckets(vec![0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 120.0]),
                    &["source"],
                )?,
            )?,
            prune_blocked: register(
                registry,
                IntGaugeVec::new(
                    Opts::new(
                        "fediversity_source_prune_blocked",
                        "Objects of each source whose removal a prune guard holds back (empty snapshot, force-push).",
                    ),
                    &["source"],
                )?,
            )?,
            source_errors: register(
                registry,
                IntGaugeVec::new(
                    Opts::new(
                        "fediversity_source_problems",
                        "Problems in each source's newest snapshot, duplicates across sources included.",
                    ),
                    &["source"],
                )?,
            )?,
            stale: register(
                registry,
                IntGaugeVec::new(
                    Opts::new(
                        "fediversity_source_stale",
                        "1 when a source has not loaded successfully for more than three of its intervals.",
                    ),
                    &["source"],
                )?,
            )?,
        })
    }
}

fn register<T: prometheus::core::Collector + Clone + 'static>(
    registry: &Registry,
    collector: T,
) -> Result<T, prometheus::Error> {
    registry.register(Box::new(collector.clone()))?;
    Ok(collector)
}

/// The store entry that remembers a source across restarts.
pub(super) fn record_id(name: &str) -> String {
    format!("source:{name}")
}

/// Which directory source a bridge forwards, and how it tells the source's health.
pub(super) struct Bridge {
    /// The source's index.
    pub(super) index: usize,
    /// When the source last completed a scan (seconds since the epoch; 0: never).
    pub(super) loaded_at: Arc<std::sync::atomic::AtomicU64>,
    /// How often the health is reported (the rescan interval).
    pub(super) every: Duration,
}

/// Forwards a directory source's snapshots to the feed; a fetch request re-sends the current one (a
/// folder is watched, so it is always current). Every `every`, it also reports when the source last
/// completed a scan, so that a scan that no longer completes shows as a stale source.
pub(super) async fn bridge(
    bridge: Bridge,
    mut snapshots: watch::Receiver<Arc<crate::source::Snapshot>>,
    mut requests: tokio::sync::mpsc::UnboundedReceiver<String>,
    updates: tokio::sync::mpsc::UnboundedSender<Update>,
) {
    let Bridge {
        index,
        loaded_at,
        every,
    } = bridge;
    let mut token = None;
    let mut beat = tokio::time::interval(every);
    beat.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    beat.tick().await;
    let mut send_snapshot = true;
    loop {
        let update = if send_snapshot {
            let snapshot = snapshots.borrow_and_update().clone();
            let fetch = Fetch {
                at: crate::api::Timestamp::now(),
                seconds: 0.0,
                ok: snapshot.is_complete(),
            };
            Update {
                source: index,
                snapshot: Some(snapshot),
                fetch: Some(fetch),
                token: token.take(),
                done: None,
            }
        } else {
            let at = loaded_at.load(std::sync::atomic::Ordering::Relaxed);
            let complete = snapshots.borrow().is_complete();
            Update {
                source: index,
                fetch: Some(Fetch {
                    at: if at == 0 {
                        crate::api::Timestamp::now()
                    } else {
                        crate::api::Timestamp::from_unix(at)
                    },
                    seconds: 0.0,
                    ok: at != 0 && complete,
                }),
                ..Update::default()
            }
        };
        if updates.send(update).is_err() {
            return;
        }
        send_snapshot = tokio::select! {
            changed = snapshots.changed() => if changed.is_err() { return } else { true },
            request = requests.recv() => match request {
                Some(t) => { token = Some(t); true }
                None => return,
            },
            _ = beat.tick() => false,
        };
    }
}

/// What the feed works with.
pub(super) struct Feed {
    pub(super) updates: tokio::sync::mpsc::UnboundedReceiver<Update>,
    pub(super) set: SourceSet,
    /// Each source's type and location, by index.
    pub(super) infos: Vec<(&'static str, String)>,
    /// The force-push base of each git source, by index.
    pub(super) baselines: Vec<Option<Baseline>>,
    /// How often each source is expected to load (none for the API's), by index.
    pub(super) intervals: Vec<Option<Duration>>,
    /// When the feed started (a source that never loaded is stale counted from here).
    pub(super) started: crate::api::Timestamp,
    pub(super) desired: Arc<DesiredState>,
    pub(super) store: Arc<Store>,
    pub(super) book: Arc<StatusBook>,
    pub(super) handle: ControllerHandle,
    pub(super) metrics: SourceMetrics,
}

/// What the feed keeps per source between updates.
#[derive(Default, Clone)]
pub(super) struct Tracked {
    pub(super) last_fetch: Option<crate::api::Timestamp>,
    pub(super) last_attempt: Option<crate::api::Timestamp>,
    pub(super) handled: Option<String>,
    pub(super) record: Option<Record>,
    pub(super) info: Option<[String; 3]>,
    pub(super) stale: bool,
}

/// Applies the sources' snapshots to the desired state and wakes what changed. Updates that arrive
/// together are applied together; nothing is applied before every source has loaded once.
pub(super) async fn feed(mut feed: Feed, mut shutdown: watch::Receiver<ShutdownState>) {
    let mut first = true;
    // What the store already holds of each source is not written again at start.
    let mut tracked: Vec<Tracked> = feed
        .set
        .members()
        .iter()
        .map(|member| Tracked {
            record: feed.store.inventory(&record_id(&member.name)).ok().flatten(),
            ..Tracked::default()
        })
        .collect();
    for member in feed.set.members() {
        feed.metrics.fetch_failures.with_label_values(&[&member.name]);
        feed.metrics
            .prune_blocked
            .with_label_values(&[&member.name])
            .set(0);
    }
    loop {
        let next = tokio::select! {
            update = feed.updates.recv() => update,
            _ = shutdown.wait_for(|s| *s != ShutdownState::Running) => return,
        };
        let Some(update) = next else { return };
        let mut batch = vec![update];
        while let Ok(more) = feed.updates.try_recv() {
            batch.push(more);
        }
        let mut held = Vec::new();
        let mut handled = Vec::new();
        let mut done = Vec::new();
        for update in batch {
            let index = update.source;
            let Some(name) = feed.set.members().get(index).map(|m| m.name.clone()) else {
                continue;
            };
            if let Some(fetch) = update.fetch {
                tracked[index].last_attempt = Some(fetch.at);
                feed.metrics
                    .fetch_duration
                    .with_label_values(&[&name])
                    .observe(fetch.seconds);
                if fetch.ok {
                    tracked[index].last_fetch = Some(fetch.at);
                    feed.metrics
                        .last_fetch
                        .with_label_values(&[&name])
                        .set(i64::try_from(fetch.at.unix()).unwrap_or(0));
                }
            }
            if let Some(snapshot) = &update.snapshot {
                let (before, failed_before) = {
                    let member = &feed.set.members()[index];
                    (member.errors.clone(), member.failure.clone())
                };
                if let Some(failure) = &snapshot.failure {
                    feed.metrics.failures.inc();
                    feed.metrics.fetch_failures.with_label_values(&[&name]).inc();
                    if failed_before.as_ref() != Some(failure) {
                        tracing::error!(source = %name, %failure, "the source failed; keeping its objects, pruning nothing");
                    }
                } else {
                    if let Some(failure) = failed_before {
                        tracing::info!(source = %name, %failure, "the source loads again");
                    }
                    report_problems(&feed.book, &name, &before, snapshot);
                }
                let newly = feed.set.update(index, snapshot);
                if !newly.is_empty() {
                    held.push((index, newly));
                }
                if let Some(Some(baseline)) = feed.baselines.get(index) {
                    *baseline.lock().unwrap_or_else(std::sync::PoisonError::into_inner) =
                        feed.set.members()[index].applied_revision.clone();
                }
            }
            if let Some(token) = update.token {
                handled.push((index, token));
            }
            done.extend(update.done);
        }
        if feed.set.is_loaded() {
            apply(&mut feed, &mut first).await;
        }
        for (index, keys) in held {
            let member = &feed.set.members()[index];
            if let Some(hold) = &member.hold {
                tracing::warn!(source = %member.name, objects = keys.len(), "{hold}");
                for key in keys {
                    feed.book.record(
                        &key,
                        crate::api::EventType::Warning,
                        "PruneBlocked",
                        format!("source `{}`: its removal is held back: {hold}", member.name),
                    );
                }
            }
        }
        for (index, token) in handled {
            tracked[index].handled = Some(token);
        }
        report(&feed, &mut tracked);
        for done in done {
            let _ = done.send(());
        }
    }
}

/// Logs each problem of a source's new snapshot once when it appears and once when it clears, and
/// records it as an event on the objects defined in the file concerned (a file that never loaded has
/// none: the log says it).
fn report_problems(
    book: &StatusBook,
    source: &str,
    before: &[crate::load::Diagnostic],
    snapshot: &crate::source::Snapshot,
) {
    use std::collections::BTreeSet;
    let old: BTreeSet<String> = before.iter().map(ToString::to_string).collect();
    let new: BTreeSet<String> = snapshot.errors.iter().map(ToString::to_string).collect();
    let objects_of = |file: &std::path::Path| -> Vec<ObjectKey> {
        snapshot
            .objects
            .iter()
            .filter(|(_, o)| o.loaded.file == file)
            .map(|(k, _)| k.clone())
            .collect()
    };
    for problem in &snapshot.errors {
        let text = problem.to_string();
        if old.contains(&text) {
            continue;
        }
        tracing::warn!(source, "source problem: {text}");
        for key in objects_of(&problem.file) {
            book.record(
                &key,
                crate::api::EventType::Warning,
                "SourceProblem",
                format!("source `{source}`: {text}"),
            );
        }
    }
    for problem in before {
        let text = problem.to_string();
        if new.contains(&text) {
            continue;
        }
        tracing::info!(source, "source problem cleared: {text}");
        for key in objects_of(&problem.file) {
            book.record(
                &key,
                crate::api::EventType::Normal,
                "SourceProblemCleared",
                format!("source `{source}`: no longer: {text}"),
            );
        }
    }
}

/// Merges the sources, applies the result, wakes what changed and remembers each source in the store.
async fn apply(feed: &mut Feed, first: &mut bool) {
    let merged = Arc::new(feed.set.merge());
    let failure = feed
        .set
        .members()
        .iter()
        .filter_map(|m| m.failure.as_ref().map(|f| format!("source `{}`: {f}", m.name)))
        .collect::<Vec<_>>();
    let failure = (!failure.is_empty()).then(|| failure.join("; "));
    let applied = {
        let (desired, store, merged) = (feed.desired.clone(), feed.store.clone(), merged.clone());
        tokio::task::spawn_blocking(move || desired.apply_merged(&merged, failure, &store)).await
    };
    let changes = match applied {
        Ok(Ok(changes)) => changes,
        Ok(Err(e)) => {
            tracing::error!(error = %e, "failed to record generations; the snapshot is applied again on the next update");
            return;
        }
        Err(e) => {
            tracing::error!(error = %e, "snapshot task failed");
            return;
        }
    };
    let metrics = &feed.metrics;
    metrics.snapshots.inc();
    metrics
        .errors
        .set(i64::try_from(merged.errors.len()).unwrap_or(i64::MAX));
    metrics
        .objects
        .set(i64::try_from(merged.objects.len()).unwrap_or(i64::MAX));
    metrics
        .last_applied
        .set(i64::try_from(crate::api::Timestamp::now().unix()).unwrap_or(0));
    tracing::info!(
        revision = %merged.revision,
        objects = merged.objects.len(),
        changed = changes.changed.len(),
        removed = changes.removed.len(),
        held = merged.held.len(),
        problems = merged.errors.len(),
        "snapshot applied"
    );
    for key in &changes.changed {
        feed.handle.spec_changed(key.clone());
        if key.kind != Kind::Deployment {
            for dependent in feed.desired.dependents(key) {
                feed.handle.enqueue(dependent);
            }
        }
    }
    for key in changes.removed {
        feed.handle.enqueue(key);
    }
    if *first {
        // Objects the store remembers but no source has were removed while the controller was down:
        // they go through cleanup too, except those whose removal a prune guard holds back.
        for (id, _) in feed.store.objects().unwrap_or_default() {
            if let Ok(key) = id.parse::<ObjectKey>()
                && !merged.objects.contains_key(&key)
                && !merged.held.contains(&key)
                && feed.book.status(&key).is_some()
            {
                feed.handle.enqueue(key);
            }
        }
        feed.handle.set_ready();
        *first = false;
    }
}

/// Updates each source's reported status and metrics, and its record in the store when it changed.
fn report(feed: &Feed, tracked: &mut [Tracked]) {
    let mut statuses = Vec::new();
    for (index, member) in feed.set.members().iter().enumerate() {
        let (type_, location) = feed.infos.get(index).cloned().unwrap_or(("?", String::new()));
        let errors: Vec<String> = member
            .errors
            .iter()
            .chain(&member.conflicts)
            .map(ToString::to_string)
            .collect();
        let name = member.name.as_str();
        feed.metrics
            .prune_blocked
            .with_label_values(&[name])
            .set(i64::try_from(member.held.len()).unwrap_or(i64::MAX));
        feed.metrics
            .source_errors
            .with_label_values(&[name])
            .set(i64::try_from(errors.len()).unwrap_or(i64::MAX));
        let info = [
            name.to_owned(),
            type_.to_owned(),
            member.revision.clone().unwrap_or_default(),
        ];
        let track = &mut tracked[index];
        let stale = feed.intervals.get(index).copied().flatten().and_then(|interval| {
            let since = track.last_fetch.unwrap_or(feed.started);
            let age = crate::api::Timestamp::now().unix().saturating_sub(since.unix());
            let limit = 3 * interval.as_secs().max(1);
            (age > limit).then(|| {
                format!(
                    "has not loaded successfully for {age} s, more than three of its {} s intervals; the \
                     objects in force stay, but changes are not picked up (see lastError, errors and the logs)",
                    interval.as_secs().max(1)
                )
            })
        });
        feed.metrics
            .stale
            .with_label_values(&[name])
            .set(i64::from(stale.is_some()));
        match (&stale, track.stale) {
            (Some(why), false) => tracing::warn!(source = name, "the source is stale: it {why}"),
            (None, true) => tracing::info!(source = name, "the source is no longer stale"),
            _ => {}
        }
        track.stale = stale.is_some();
        if track.info.as_ref() != Some(&info) {
            if let Some(old) = &track.info {
                let _ = feed
                    .metrics
                    .info
                    .remove_label_values(&[&old[0], &old[1], &old[2]]);
            }
            feed.metrics
                .info
                .with_label_values(&[&info[0], &info[1], &info[2]])
                .set(1);
            track.info = Some(info);
        }
        if member.loaded {
            let record = feed.set.record(index);
            if track.record.as_ref() != Some(&record) {
                match feed.store.put_inventory(&record_id(name), &record) {
                    Ok(()) => track.record = Some(record),
                    Err(e) => {
                        tracing::error!(source = name, error = %e, "cannot remember the source's state")
                    }
                }
            }
        }
        statuses.push(SourceStatus {
            name: name.to_owned(),
            type_: type_.to_owned(),
            location,
            loaded: member.loaded,
            revision: member.revision.clone(),
            applied_revision: member.applied_revision.clone(),
            last_fetch_time: track.last_fetch.map(|t| t.to_string()),
            last_attempt_time: track.last_attempt.map(|t| t.to_string()),
            last_error: member.failure.clone(),
            errors,
            objects: member.object_count(),
            prune_blocked: member.hold.as_ref().map(|hold| PruneBlocked {
                reason: hold.reason().to_owned(),
                message: hold.to_string(),
                objects: member.held.iter().map(ToString::to_string).collect(),
            }),
            last_handled_reconcile_at: track.handled.clone(),
            stale,
        });
    }
    feed.desired.set_sources(statuses);
}
