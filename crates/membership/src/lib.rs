//! Cluster membership in etcd (API v3), and nothing else: a worker registers itself under
//! `<prefix>workers/<name>` with a lease it keeps alive (so a crashed worker disappears when its
//! lease lapses) and deletes the key when it stops; the leading scheduler watches that prefix,
//! resuming from the last revision it saw after a reconnect; scheduler replicas elect a leader with
//! etcd's election API under `<prefix>scheduler-leader`, and gateways follow who leads. While etcd is
//! unreachable, everyone keeps the membership they know and reconnects in the background.

#![forbid(unsafe_code)]

use std::collections::BTreeMap;
use std::time::Duration;

use etcd_client::{Client, ConnectOptions, EventType, GetOptions, PutOptions, WatchOptions};
use serde::{Deserialize, Serialize};
use tokio::sync::{mpsc, watch};
use tracing::{debug, info, warn};

fn count_error(operation: &str) {
    kiln_telemetry::MEMBERSHIP_ETCD_ERRORS
        .with_label_values(&[operation])
        .inc();
}

/// Where and how to reach etcd.
#[derive(Clone, Debug)]
pub struct EtcdConfig {
    /// `http://host:port` endpoints.
    pub endpoints: Vec<String>,
    /// Prefix of every key Kiln writes, e.g. `kiln/`.
    pub prefix: String,
    /// Lease time-to-live: how long a crashed member stays listed.
    pub lease_ttl: Duration,
}

impl EtcdConfig {
    pub fn new(endpoints: Vec<String>) -> Self {
        EtcdConfig {
            endpoints,
            prefix: "kiln/".into(),
            lease_ttl: Duration::from_secs(5),
        }
    }

    fn workers_prefix(&self) -> String {
        format!("{}workers/", self.prefix)
    }

    fn election(&self) -> String {
        format!("{}scheduler-leader", self.prefix)
    }

    fn ttl_secs(&self) -> i64 {
        self.lease_ttl.as_secs().max(1) as i64
    }
}

#[derive(Debug, thiserror::Error)]
pub enum MembershipError {
    #[error("etcd: {0}")]
    Etcd(#[from] etcd_client::Error),
    #[error("corrupt member record under {key}: {error}")]
    Corrupt { key: String, error: String },
}

/// What a worker advertises.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct WorkerRecord {
    pub name: String,
    /// `http://host:port` of its `kiln.v1.Worker` service.
    pub address: String,
    pub model: String,
    pub device: String,
    pub kv_blocks: u32,
    pub block_size: u32,
    pub max_batch: u32,
}

/// A change of the worker set.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum MembershipEvent {
    Up(WorkerRecord),
    Down { name: String },
}

/// A client with short timeouts, so that an etcd outage is noticed quickly.
pub async fn connect(config: &EtcdConfig) -> Result<Client, MembershipError> {
    let options = ConnectOptions::new()
        .with_connect_timeout(Duration::from_secs(2))
        .with_timeout(Duration::from_secs(3))
        .with_keep_alive(Duration::from_secs(2), Duration::from_secs(2));
    Ok(Client::connect(&config.endpoints, Some(options)).await?)
}

/// Keeps `record` registered until `shutdown` resolves, then deletes it. After an outage longer
/// than the lease, the worker registers again with a new lease.
pub async fn register_worker(
    config: EtcdConfig,
    record: WorkerRecord,
    shutdown: impl std::future::Future<Output = ()>,
) {
    let key = format!("{}{}", config.workers_prefix(), record.name);
    let value = serde_json::to_vec(&record).expect("a worker record serialises");
    tokio::pin!(shutdown);
    loop {
        let session = async {
            let mut client = connect(&config).await?;
            let lease = client.lease_grant(config.ttl_secs(), None).await?.id();
            client
                .put(
                    key.clone(),
                    value.clone(),
                    Some(PutOptions::new().with_lease(lease)),
                )
                .await?;
            info!(%key, lease, "registered in etcd");
            let (mut keeper, mut acks) = client.lease_keep_alive(lease).await?;
            let mut tick = tokio::time::interval(config.lease_ttl / 3);
            loop {
                tick.tick().await;
                keeper.keep_alive().await?;
                match acks.message().await? {
                    Some(ack) if ack.ttl() > 0 => {}
                    // The lease expired (etcd was out longer than the TTL): register anew.
                    _ => return Ok::<_, MembershipError>(()),
                }
            }
        };
        tokio::select! {
            _ = &mut shutdown => break,
            result = session => match result {
                Ok(()) => warn!(%key, "lease expired; registering again"),
                Err(e) => {
                    count_error("register");
                    warn!(%key, error = %e, "etcd unreachable; will register again");
                }
            },
        }
        tokio::select! {
            _ = &mut shutdown => break,
            _ = tokio::time::sleep(Duration::from_millis(500)) => {}
        }
    }
    // Graceful stop: remove the key at once rather than waiting for the lease.
    if let Ok(mut client) = connect(&config).await {
        match client.delete(key.clone(), None).await {
            Ok(_) => info!(%key, "deregistered from etcd"),
            Err(e) => warn!(%key, error = %e, "could not deregister; the lease will expire"),
        }
    }
}

/// Follows the worker set: an `Up` for every worker present or joining, a `Down` for every worker
/// leaving. Reconnects after errors, resuming the watch from the revision after the last one seen
/// (or re-reading the set when etcd compacted that history), so no change is missed or repeated.
pub fn watch_workers(config: EtcdConfig) -> mpsc::UnboundedReceiver<MembershipEvent> {
    let (tx, rx) = mpsc::unbounded_channel();
    tokio::spawn(async move {
        let mut known: BTreeMap<String, WorkerRecord> = BTreeMap::new();
        let mut next_revision: Option<i64> = None;
        loop {
            match follow(&config, &mut known, &mut next_revision, &tx).await {
                Ok(()) => return, // the receiver is gone
                Err(e) => {
                    count_error("watch");
                    warn!(error = %e, "membership watch interrupted; keeping the known workers");
                    tokio::time::sleep(Duration::from_millis(500)).await;
                }
            }
        }
    });
    rx
}

async fn follow(
    config: &EtcdConfig,
    known: &mut BTreeMap<String, WorkerRecord>,
    next_revision: &mut Option<i64>,
    tx: &mpsc::UnboundedSender<MembershipEvent>,
) -> Result<(), MembershipError> {
    let prefix = config.workers_prefix();
    let mut client = connect(config).await?;
    if next_revision.is_none() {
        let listing = client
            .get(prefix.clone(), Some(GetOptions::new().with_prefix()))
            .await?;
        let mut present = BTreeMap::new();
        for kv in listing.kvs() {
            let record = decode(kv.key(), kv.value())?;
            present.insert(record.name.clone(), record);
        }
        for name in known.keys() {
            if !present.contains_key(name)
                && tx
                    .send(MembershipEvent::Down { name: name.clone() })
                    .is_err()
            {
                return Ok(());
            }
        }
        for record in present.values() {
            if known.get(&record.name) != Some(record)
                && tx.send(MembershipEvent::Up(record.clone())).is_err()
            {
                return Ok(());
            }
        }
        *known = present;
        let revision = listing.header().map_or(0, |h| h.revision());
        *next_revision = Some(revision + 1);
        debug!(workers = known.len(), revision, "read the worker set");
    }
    let start = next_revision.unwrap_or(0);
    let mut stream = client
        .watch(
            prefix.clone(),
            Some(WatchOptions::new().with_prefix().with_start_revision(start)),
        )
        .await?;
    while let Some(response) = stream.message().await? {
        if response.compact_revision() > 0 || response.canceled() {
            // The history we needed is gone: read the whole set again.
            *next_revision = None;
            return Err(MembershipError::Corrupt {
                key: prefix,
                error: format!("watch cancelled ({})", response.cancel_reason()),
            });
        }
        for event in response.events() {
            let Some(kv) = event.kv() else { continue };
            *next_revision = Some(kv.mod_revision() + 1);
            let name = String::from_utf8_lossy(kv.key())
                .trim_start_matches(&prefix)
                .to_string();
            let change = match event.event_type() {
                EventType::Put => {
                    let record = decode(kv.key(), kv.value())?;
                    known.insert(name, record.clone());
                    MembershipEvent::Up(record)
                }
                EventType::Delete => {
                    known.remove(&name);
                    MembershipEvent::Down { name }
                }
            };
            if tx.send(change).is_err() {
                return Ok(());
            }
        }
    }
    Err(MembershipError::Corrupt {
        key: prefix,
        error: "watch stream ended".into(),
    })
}

fn decode(key: &[u8], value: &[u8]) -> Result<WorkerRecord, MembershipError> {
    serde_json::from_slice(value).map_err(|e| MembershipError::Corrupt {
        key: String::from_utf8_lossy(key).into_owned(),
        error: e.to_string(),
    })
}

/// Leadership held by this scheduler; `lost` resolves when it can no longer be sure it leads.
pub struct Leadership {
    /// This term's fencing epoch: the etcd revision at which this leader's election key was
    /// created, larger for every later term. Workers refuse calls from an older epoch.
    pub epoch: u64,
    lost: watch::Receiver<bool>,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    lease: i64,
    config: EtcdConfig,
}

impl Leadership {
    /// Resolves once leadership is lost (the lease could not be renewed in time).
    pub async fn lost(&mut self) {
        let _ = self.lost.wait_for(|lost| *lost).await;
    }

    /// Steps down at once (graceful shutdown): the next candidate is elected without waiting for
    /// the lease to lapse.
    pub async fn resign(mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Ok(mut client) = connect(&self.config).await {
            let _ = client.lease_revoke(self.lease).await;
        }
    }
}

/// Campaigns until this scheduler (announcing `address`) leads; retries through etcd outages.
pub async fn campaign(config: &EtcdConfig, address: &str) -> Leadership {
    loop {
        match try_campaign(config, address).await {
            Ok(leadership) => return leadership,
            Err(e) => {
                count_error("campaign");
                warn!(error = %e, "election interrupted; campaigning again");
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
        }
    }
}

async fn try_campaign(config: &EtcdConfig, address: &str) -> Result<Leadership, MembershipError> {
    let mut client = connect(config).await?;
    let lease = client.lease_grant(config.ttl_secs(), None).await?.id();
    let (mut keeper, mut acks) = client.lease_keep_alive(lease).await?;
    let (lost_tx, lost) = watch::channel(false);
    let (stop, mut stopped) = tokio::sync::oneshot::channel::<()>();
    let ttl = config.lease_ttl;
    // Keep the lease alive while campaigning (a campaign may wait for a long time) and after.
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(ttl / 3);
        let mut last_ack = tokio::time::Instant::now();
        loop {
            tokio::select! {
                _ = tick.tick() => {}
                _ = &mut stopped => break,
            }
            let renewed = async {
                keeper.keep_alive().await?;
                acks.message().await
            };
            match tokio::time::timeout(ttl / 3, renewed).await {
                Ok(Ok(Some(ack))) if ack.ttl() > 0 => last_ack = tokio::time::Instant::now(),
                Ok(Ok(_)) => break,
                _ => {
                    // Another leader may be elected once the lease runs out: step down before that.
                    if last_ack.elapsed() >= ttl * 2 / 3 {
                        break;
                    }
                }
            }
        }
        let _ = lost_tx.send(true);
    });
    let name = config.election();
    let won = client.campaign(name.clone(), address, lease).await?;
    let epoch = won.leader().map_or(0, |key| key.rev()).max(0) as u64;
    info!(%name, %address, epoch, "elected scheduler leader");
    Ok(Leadership {
        epoch,
        lost,
        stop: Some(stop),
        lease,
        config: config.clone(),
    })
}

/// Follows the address of the leading scheduler (`None` while there is none).
pub fn follow_leader(config: EtcdConfig) -> watch::Receiver<Option<String>> {
    let (tx, rx) = watch::channel(None);
    tokio::spawn(async move {
        let name = config.election();
        loop {
            let result = async {
                let mut client = connect(&config).await?;
                let mut stream = client.observe(name.clone()).await?;
                while let Some(leader) = stream.message().await? {
                    let address = leader
                        .kv()
                        .map(|kv| String::from_utf8_lossy(kv.value()).into_owned());
                    tx.send_if_modified(|current| {
                        let changed = *current != address;
                        if changed {
                            info!(leader = ?address, "scheduler leader changed");
                            *current = address.clone();
                        }
                        changed
                    });
                }
                Ok::<_, MembershipError>(())
            }
            .await;
            if tx.is_closed() {
                return;
            }
            if let Err(e) = result {
                count_error("observe");
                debug!(error = %e, "leader observation interrupted; observing again");
            }
            tokio::time::sleep(Duration::from_millis(300)).await;
        }
    });
    rx
}
