//! Leader election on an etcd lease: one replica of several runs the work queue, the others serve reads.
//!
//! The leader key (`PREFIX leader`) is created only when absent, attached to this replica's lease; its
//! create revision is the fencing token every guarded store write is conditioned on (see
//! [`crate::store::Fence`]). The leader renews its lease every retry period and stops counting itself
//! leader once it has not renewed for the renew deadline, which is shorter than the lease: it stops
//! acting before another replica can take over, even when it was paused (the deadline runs on the
//! monotonic clock). On shutdown the leader clears its fence first, then revokes its lease, so that the
//! next replica takes over at once.

use std::sync::Arc;
use std::time::{Duration, Instant};

use etcd_client::Client;
use tokio::sync::watch;

use crate::store::{Fence, Store};

/// Lease, renew deadline and retry period (controller-runtime's defaults: 15 s, 10 s, 2 s).
#[derive(Debug, Clone)]
pub struct ElectionConfig {
    /// How long the leader key outlives the leader's last renewal.
    pub lease: Duration,
    /// After this long without a successful renewal the leader stops acting (shorter than `lease`).
    pub renew_deadline: Duration,
    /// How often the leader renews and a follower tries to take over.
    pub retry: Duration,
    /// This replica's name, stored in the leader key.
    pub identity: String,
}

impl Default for ElectionConfig {
    fn default() -> Self {
        Self {
            lease: Duration::from_secs(15),
            renew_deadline: Duration::from_secs(10),
            retry: Duration::from_secs(2),
            identity: String::new(),
        }
    }
}

/// This replica's part.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    /// Another replica leads (or none yet): serve reads, wait.
    Follower,
    /// This replica leads: it runs the work queue.
    Leader,
    /// etcd cannot be reached (or has no quorum): nobody here acts.
    Unavailable,
}

impl Role {
    /// The role's name in `/readyz`, the API and logs.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Follower => "follower",
            Self::Leader => "leader",
            Self::Unavailable => "unavailable",
        }
    }
}

/// Why the election cannot start.
#[derive(Debug, thiserror::Error)]
pub enum LeaderError {
    /// Leader election needs the etcd store.
    #[error("several replicas need the etcd store: give --store etcd://HOST:PORT,…")]
    NotEtcd,
    /// Its metrics cannot be registered.
    #[error("cannot register the leader election metrics: {0}")]
    Metric(#[from] prometheus::Error),
    /// The timings do not fit together.
    #[error(
        "the renew deadline ({renew:?}) must be shorter than the lease ({lease:?}) and longer than the retry period"
    )]
    Timings {
        /// The lease.
        lease: Duration,
        /// The renew deadline.
        renew: Duration,
    },
}

/// The role as the rest of the daemon sees it.
#[derive(Debug, Clone)]
pub struct Leadership {
    role: watch::Receiver<Role>,
    /// This replica's identity.
    pub identity: String,
}

impl Leadership {
    /// The current role.
    pub fn role(&self) -> Role {
        *self.role.borrow()
    }

    /// A receiver that sees every change of role.
    pub fn watch(&self) -> watch::Receiver<Role> {
        self.role.clone()
    }
}

/// Runs the election for one replica.
pub struct Elector {
    store: Arc<Store>,
    /// A client per etcd member; calls go to `current`, which moves on when a member fails.
    clients: Vec<Client>,
    current: std::sync::atomic::AtomicUsize,
    key: Vec<u8>,
    config: ElectionConfig,
    role: watch::Sender<Role>,
    leader: prometheus::IntGauge,
    changes: prometheus::IntCounter,
}

impl Elector {
    /// Prepares the election on `store` (which must be etcd) and registers its metrics.
    pub fn new(
        store: Arc<Store>,
        config: ElectionConfig,
        registry: &prometheus::Registry,
    ) -> Result<(Self, Leadership), LeaderError> {
        let (etcd, clients) = store.etcd().ok_or(LeaderError::NotEtcd)?;
        if config.renew_deadline >= config.lease || config.renew_deadline <= config.retry {
            return Err(LeaderError::Timings {
                lease: config.lease,
                renew: config.renew_deadline,
            });
        }
        let leader = prometheus::IntGauge::new(
            "fediversity_leader",
            "1 while this replica is the leader (runs the work queue), 0 otherwise.",
        )?;
        let changes = prometheus::IntCounter::new(
            "fediversity_leader_changes_total",
            "Times this replica became leader or stopped being leader.",
        )?;
        registry.register(Box::new(leader.clone()))?;
        registry.register(Box::new(changes.clone()))?;
        store.require_leadership();
        let (tx, rx) = watch::channel(Role::Follower);
        let leadership = Leadership {
            role: rx,
            identity: config.identity.clone(),
        };
        Ok((
            Self {
                store,
                clients,
                current: std::sync::atomic::AtomicUsize::new(0),
                key: format!("{}leader", etcd.prefix).into_bytes(),
                config,
                role: tx,
                leader,
                changes,
            },
            leadership,
        ))
    }

    fn set_role(&self, role: Role) {
        let old = *self.role.borrow();
        if old == role {
            return;
        }
        if (old == Role::Leader) != (role == Role::Leader) {
            self.changes.inc();
        }
        self.leader.set(i64::from(role == Role::Leader));
        match role {
            Role::Leader => tracing::info!(identity = %self.config.identity, "became the leader: acting"),
            Role::Follower if old == Role::Leader => {
                tracing::warn!("no longer the leader: stopped acting")
            }
            Role::Follower => tracing::info!("following: another replica leads; serving reads"),
            Role::Unavailable => {
                tracing::warn!("etcd is unreachable or has no quorum: not acting until it answers again")
            }
        }
        let _ = self.role.send(role);
    }

    /// The client of the member calls go to now.
    fn client(&self) -> Client {
        let i = self.current.load(std::sync::atomic::Ordering::Relaxed);
        self.clients[i % self.clients.len()].clone()
    }

    /// A call to etcd bounded by the retry period (a lost quorum makes calls hang); when the member
    /// cannot be reached, the next call goes to the next member.
    async fn bounded<T>(
        &self,
        call: impl Future<Output = Result<T, etcd_client::Error>>,
    ) -> Result<T, String> {
        let next = || {
            self.current.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        };
        match tokio::time::timeout(self.config.retry.max(Duration::from_millis(500)), call).await {
            Ok(Ok(v)) => Ok(v),
            Ok(Err(e)) => {
                if crate::store::unreachable(&e) {
                    next();
                }
                Err(e.to_string())
            }
            Err(_) => {
                next();
                Err("no answer in time".into())
            }
        }
    }

    /// Campaigns, leads, and campaigns again, until `stop` turns true; then resigns if leading.
    pub async fn run(self, mut stop: watch::Receiver<bool>) {
        let ttl = self.config.lease.as_secs().max(2) as i64;
        let mut lease: Option<i64> = None;
        let mut tick = tokio::time::interval(self.config.retry);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            if *stop.borrow() {
                break;
            }
            // A lease of our own, kept alive while following so that taking over needs one call.
            let id = match lease {
                Some(id) => {
                    let mut c = self.client();
                    match self.bounded(c.lease_keep_alive(id)).await {
                        Ok((mut keeper, mut stream)) => {
                            let alive = self
                                .bounded(async {
                                    keeper.keep_alive().await?;
                                    stream.message().await
                                })
                                .await;
                            match alive {
                                Ok(Some(r)) if r.ttl() > 0 => Some(id),
                                Ok(_) => None,
                                Err(e) => {
                                    tracing::debug!(error = %e, "cannot renew the follower's lease");
                                    self.set_role(Role::Unavailable);
                                    None
                                }
                            }
                        }
                        Err(_) => None,
                    }
                }
                None => None,
            };
            let id = match id {
                Some(id) => id,
                None => {
                    let mut c = self.client();
                    match self.bounded(c.lease_grant(ttl, None)).await {
                        Ok(r) => r.id(),
                        Err(e) => {
                            tracing::debug!(error = %e, "cannot grant a lease");
                            self.set_role(Role::Unavailable);
                            lease = None;
                            wait(&mut tick, &mut stop).await;
                            continue;
                        }
                    }
                }
            };
            lease = Some(id);
            let attempt_at = Instant::now();
            let mut c = self.client();
            let won = self
                .bounded(crate::store::try_lead(
                    &mut c,
                    self.key.clone(),
                    self.config.identity.clone().into_bytes(),
                    id,
                ))
                .await;
            match won {
                Ok(Some(revision)) => {
                    self.lead(id, revision, attempt_at, &mut stop).await;
                    lease = None;
                }
                Ok(None) => self.set_role(Role::Follower),
                Err(e) => {
                    tracing::debug!(error = %e, "cannot campaign");
                    self.set_role(Role::Unavailable);
                }
            }
            wait(&mut tick, &mut stop).await;
        }
        self.set_role(Role::Follower);
    }

    /// Leads until the lease cannot be renewed in time or `stop` turns true.
    async fn lead(&self, lease: i64, revision: i64, since: Instant, stop: &mut watch::Receiver<bool>) {
        let mut valid_until = since + self.config.renew_deadline;
        self.store.set_fence(Some(Fence {
            key: self.key.clone(),
            revision,
            valid_until,
        }));
        self.set_role(Role::Leader);
        let mut c = self.client();
        let mut keeper = self.bounded(c.lease_keep_alive(lease)).await.ok();
        let mut tick = tokio::time::interval(self.config.retry);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        tick.tick().await;
        loop {
            let stopping = tokio::select! {
                _ = tick.tick() => false,
                _ = stop.wait_for(|s| *s) => true,
            };
            if stopping {
                self.resign(lease).await;
                return;
            }
            if Instant::now() >= valid_until {
                break;
            }
            let sent = Instant::now();
            if keeper.is_none() {
                let mut c = self.client();
                keeper = self.bounded(c.lease_keep_alive(lease)).await.ok();
            }
            let renewed = match &mut keeper {
                Some((k, s)) => matches!(
                    self.bounded(async {
                        k.keep_alive().await?;
                        s.message().await
                    })
                    .await,
                    Ok(Some(r)) if r.ttl() > 0
                ),
                None => false,
            };
            if renewed {
                valid_until = sent + self.config.renew_deadline;
                self.store.set_fence(Some(Fence {
                    key: self.key.clone(),
                    revision,
                    valid_until,
                }));
            } else {
                keeper = None;
                if Instant::now() >= valid_until {
                    break;
                }
            }
        }
        self.store.set_fence(None);
        tracing::warn!("could not renew the leader lease within the renew deadline");
        self.set_role(Role::Unavailable);
    }

    /// Stops acting at once, then hands over: the lease is revoked, deleting the leader key.
    async fn resign(&self, lease: i64) {
        self.store.set_fence(None);
        self.set_role(Role::Follower);
        let mut c = self.client();
        match self.bounded(c.lease_revoke(lease)).await {
            Ok(_) => tracing::info!("resigned the leadership"),
            Err(e) => tracing::warn!(error = %e, "cannot revoke the leader lease; it expires on its own"),
        }
    }
}

async fn wait(tick: &mut tokio::time::Interval, stop: &mut watch::Receiver<bool>) {
    tokio::select! {
        _ = tick.tick() => {}
        _ = stop.wait_for(|s| *s) => {}
    }
}

/// This machine's host name (for the replica's identity), or `replica` when it cannot be read.
pub fn host_name() -> String {
    std::env::var("HOSTNAME")
        .ok()
        .or_else(|| std::fs::read_to_string("/etc/hostname").ok())
        .map(|h| h.trim().to_owned())
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "replica".into())
}
