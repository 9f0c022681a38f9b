//! Request log and counters by method and route, readable in-process and at `/_sim/stats`.

use std::collections::BTreeMap;

use serde::Serialize;

/// How many request records are kept (older ones are dropped).
const LOG_CAPACITY: usize = 10_000;

/// One answered request.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct RequestRecord {
    /// Sequence number, from 1.
    pub seq: u64,
    /// HTTP method.
    pub method: String,
    /// The path as requested (without the query).
    pub path: String,
    /// `METHOD /route/{template}`, or `None` for unknown routes.
    pub route: Option<String>,
    /// The answer's status code.
    pub status: u16,
    /// `user@realm` or `user@realm!token`, when authenticated.
    pub principal: Option<String>,
    /// Whether a fault was injected into this answer.
    pub fault: bool,
}

/// Counters over all requests since start (or the last reset).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct Stats {
    /// All requests.
    pub total: u64,
    /// By `METHOD /route/{template}` (unknown routes count under `METHOD <unknown>`).
    pub by_route: BTreeMap<String, u64>,
    /// By status code.
    pub by_status: BTreeMap<u16, u64>,
    /// Answers replaced or produced by fault injection.
    pub faults_injected: u64,
    /// 401 answers.
    pub auth_failures: u64,
    /// Tasks started.
    pub tasks_started: u64,
}

impl Stats {
    /// The count for one route, e.g. `stats.count("POST", "/nodes/{node}/qemu/{vmid}/clone")`.
    pub fn count(&self, method: &str, route: &str) -> u64 {
        self.by_route
            .get(&format!("{method} {route}"))
            .copied()
            .unwrap_or(0)
    }
}

/// The recorder behind the stats.
#[derive(Debug, Default)]
pub struct Recorder {
    stats: Stats,
    log: std::collections::VecDeque<RequestRecord>,
    seq: u64,
}

impl Recorder {
    /// Records one answered request.
    pub fn record(&mut self, mut record: RequestRecord) {
        self.seq += 1;
        record.seq = self.seq;
        self.stats.total += 1;
        let key = record
            .route
            .clone()
            .unwrap_or_else(|| format!("{} <unknown>", record.method));
        *self.stats.by_route.entry(key).or_default() += 1;
        *self.stats.by_status.entry(record.status).or_default() += 1;
        self.stats.faults_injected += u64::from(record.fault);
        self.stats.auth_failures += u64::from(record.status == 401);
        if self.log.len() == LOG_CAPACITY {
            self.log.pop_front();
        }
        self.log.push_back(record);
    }

    /// Counts a started task.
    pub fn task_started(&mut self) {
        self.stats.tasks_started += 1;
    }

    /// A copy of the counters.
    pub fn stats(&self) -> Stats {
        self.stats.clone()
    }

    /// A copy of the log, oldest first.
    pub fn log(&self) -> Vec<RequestRecord> {
        self.log.iter().cloned().collect()
    }

    /// Clears counters and log.
    pub fn reset(&mut self) {
        self.stats = Stats::default();
        self.log.clear();
    }
}
