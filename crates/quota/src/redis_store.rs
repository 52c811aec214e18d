//! The Redis store, shared by every gateway. Each quota operation is one Lua script run with
//! EVALSHA (loaded once per server, reloaded by the client after a Redis restart), so checking and
//! charging every limit is atomic whatever the number of gateways. Every key it writes expires by
//! itself. It runs against one Redis primary (`redis://host:port`) or a Redis Cluster
//! (`redis+cluster://host:port,host:port,...`, the seed nodes).
//!
//! Layout under the prefix (default `kiln:`). A caller's quota keys all carry one hash tag, its
//! *domain*: `{org:<name>}` for a member of an organisation's pool (the pool and every member's own
//! limits are charged together), `{user:<name>}` otherwise. So every key one script touches lies in
//! one cluster slot, the slot of the routing key `<prefix>{<domain>}` it is called with (KEYS[1]).
//! Quota keys: `{d}w:<subject>:<window ms>` (sorted set of charge ids by time), `{d}r:<subject>`
//! (GCRA theoretical arrival time), `{d}f:<subject>` (sorted set of in-flight charge ids by lease
//! expiry), `{d}c:<charge>` (settlement state), `{d}i:<idempotency key>` (charge id). Single-key
//! records: `res:<charge>` (finished answer), `key:<digest>` (API key record), `keyids` (id ->
//! digest), `tiers` (the tier table's TOML).

use std::time::Duration;

use redis::aio::{ConnectionLike, ConnectionManager, ConnectionManagerConfig};
use redis::cluster_async::ClusterConnection;
use redis::{AsyncCommands, Cmd, Pipeline, RedisFuture, Script, Value};
use tokio::sync::OnceCell;

use crate::store::{
    Charge, ConfigStore, Decision, KeyRecord, KeyStore, Limit, QuotaStore, Refusal, Settlement,
    Usage, WindowUsage,
};
use crate::tiers::Scope;
use crate::QuotaError;

/// The admission script (also run by `kiln bench` through `redis-benchmark`).
pub const ADMIT_SCRIPT: &str = include_str!("../lua/admit.lua");

/// Settings of the Redis connection.
#[derive(Clone, Debug)]
pub struct RedisConfig {
    pub url: String,
    pub prefix: String,
    /// Longest wait for one answer; beyond it the store counts as unreachable.
    pub timeout: Duration,
}

impl RedisConfig {
    pub fn new(url: impl Into<String>) -> Self {
        RedisConfig {
            url: url.into(),
            prefix: "kiln:".into(),
            timeout: Duration::from_millis(500),
        }
    }
}

/// The scheme of a Redis Cluster's seed list: `redis+cluster://host:port,host:port`.
pub const CLUSTER_SCHEME: &str = "redis+cluster://";

enum Client {
    Single(redis::Client),
    Cluster(Box<redis::cluster::ClusterClient>),
}

/// A connection to one primary (reconnecting by itself) or to a cluster (following its slots,
/// redirections and failovers).
#[derive(Clone)]
enum Connection {
    Single(ConnectionManager),
    Cluster(ClusterConnection),
}

impl ConnectionLike for Connection {
    fn req_packed_command<'a>(&'a mut self, cmd: &'a Cmd) -> RedisFuture<'a, Value> {
        match self {
            Connection::Single(c) => c.req_packed_command(cmd),
            Connection::Cluster(c) => c.req_packed_command(cmd),
        }
    }

    fn req_packed_commands<'a>(
        &'a mut self,
        pipeline: &'a Pipeline,
        offset: usize,
        count: usize,
    ) -> RedisFuture<'a, Vec<Value>> {
        match self {
            Connection::Single(c) => c.req_packed_commands(pipeline, offset, count),
            Connection::Cluster(c) => c.req_packed_commands(pipeline, offset, count),
        }
    }

    fn get_db(&self) -> i64 {
        match self {
            Connection::Single(c) => c.get_db(),
            Connection::Cluster(c) => c.get_db(),
        }
    }
}

/// The hash-tagged prefix of a caller's quota keys (see the module documentation): the org pool's
/// subject when the caller charges one, else its own.
fn domain_prefix(prefix: &str, scopes: &[Scope]) -> String {
    let domain = scopes
        .iter()
        .find(|s| s.subject.starts_with("org:"))
        .or(scopes.first())
        .map_or("", |s| s.subject.as_str());
    format!("{prefix}{{{domain}}}")
}

pub struct RedisStore {
    client: Client,
    config: RedisConfig,
    conn: OnceCell<Connection>,
    admit: Script,
    settle: Script,
    renew: Script,
    usage: Script,
}

fn store_error(e: redis::RedisError) -> QuotaError {
    if e.is_io_error()
        || e.is_timeout()
        || e.is_connection_dropped()
        || e.is_connection_refusal()
        || e.is_unrecoverable_error()
    {
        QuotaError::Unavailable(e.to_string())
    } else {
        QuotaError::Store(e.to_string())
    }
}

impl RedisStore {
    /// Prepares a store; the connection is made on first use and remade after an outage.
    pub fn new(config: RedisConfig) -> Result<Self, QuotaError> {
        let bad =
            |e: redis::RedisError| QuotaError::Store(format!("redis url {:?}: {e}", config.url));
        let client = match config.url.strip_prefix(CLUSTER_SCHEME) {
            Some(seeds) => {
                let nodes: Vec<String> = seeds
                    .split(',')
                    .filter(|s| !s.is_empty())
                    .map(|s| format!("redis://{s}"))
                    .collect();
                if nodes.is_empty() {
                    return Err(QuotaError::Store(format!(
                        "redis url {:?}: name at least one seed node, {CLUSTER_SCHEME}host:port,...",
                        config.url
                    )));
                }
                Client::Cluster(Box::new(
                    redis::cluster::ClusterClient::builder(nodes)
                        .connection_timeout(config.timeout)
                        .response_timeout(config.timeout)
                        .retries(2)
                        .build()
                        .map_err(bad)?,
                ))
            }
            None => Client::Single(redis::Client::open(config.url.as_str()).map_err(bad)?),
        };
        Ok(RedisStore {
            client,
            config,
            conn: OnceCell::new(),
            admit: Script::new(ADMIT_SCRIPT),
            settle: Script::new(include_str!("../lua/settle.lua")),
            renew: Script::new(include_str!("../lua/renew.lua")),
            usage: Script::new(include_str!("../lua/usage.lua")),
        })
    }

    /// The shared multiplexed connection; it reconnects by itself after errors.
    async fn conn(&self) -> Result<Connection, QuotaError> {
        self.conn
            .get_or_try_init(|| async {
                match &self.client {
                    Client::Single(client) => {
                        let config = ConnectionManagerConfig::new()
                            .set_connection_timeout(Some(self.config.timeout))
                            .set_response_timeout(Some(self.config.timeout))
                            .set_number_of_retries(1)
                            .set_max_delay(Duration::from_millis(500));
                        client
                            .get_connection_manager_with_config(config)
                            .await
                            .map(Connection::Single)
                    }
                    Client::Cluster(client) => {
                        client.get_async_connection().await.map(Connection::Cluster)
                    }
                }
                .map_err(store_error)
            })
            .await
            .cloned()
    }

    /// A script call for a caller's `scopes`: routed by, and its keys under, their domain.
    fn invocation<'a>(&self, script: &'a Script, scopes: &[Scope]) -> redis::ScriptInvocation<'a> {
        let prefix = domain_prefix(&self.config.prefix, scopes);
        let mut call = script.prepare_invoke();
        call.key(&prefix).arg(prefix);
        call
    }

    fn key(&self, rest: &str) -> String {
        format!("{}{rest}", self.config.prefix)
    }

    /// Round-trips a PING: for readiness checks.
    pub async fn ping(&self) -> Result<(), QuotaError> {
        let mut conn = self.conn().await?;
        redis::cmd("PING")
            .query_async::<String>(&mut conn)
            .await
            .map(|_| ())
            .map_err(store_error)
    }
}

fn text(v: &Value) -> Result<String, QuotaError> {
    match v {
        Value::BulkString(b) => Ok(String::from_utf8_lossy(b).into_owned()),
        Value::SimpleString(s) => Ok(s.clone()),
        Value::Int(i) => Ok(i.to_string()),
        other => Err(QuotaError::Store(format!(
            "unexpected script value {other:?}"
        ))),
    }
}

fn int(v: &Value) -> Result<i64, QuotaError> {
    match v {
        Value::Int(i) => Ok(*i),
        other => text(other)?
            .parse()
            .map_err(|_| QuotaError::Store(format!("expected an integer, got {other:?}"))),
    }
}

fn ms(v: i64) -> Duration {
    Duration::from_millis(v.max(0) as u64)
}

fn window_usage(chunk: &[Value], limit: Option<u32>) -> Result<WindowUsage, QuotaError> {
    Ok(WindowUsage {
        subject: text(&chunk[0])?,
        window_seconds: int(&chunk[1])? as u64 / 1000,
        limit: limit.unwrap_or(0),
        used: int(&chunk[chunk.len() - 2])? as u32,
        reset_after: ms(int(&chunk[chunk.len() - 1])?),
    })
}

fn decode_decision(values: Vec<Value>) -> Result<Decision, QuotaError> {
    let tag = values.first().map(text).transpose()?.unwrap_or_default();
    match tag.as_str() {
        "duplicate" => Ok(Decision::Duplicate {
            charge_id: text(&values[1])?,
        }),
        "refused" if values.len() == 6 => {
            let (a, b) = (int(&values[3])?, int(&values[4])?);
            let limit = match text(&values[2])?.as_str() {
                "window" => Limit::Window {
                    seconds: a as u64 / 1000,
                    images: b as u32,
                },
                "rate" => Limit::Rate {
                    interval_ms: a as u64,
                    burst: b as u32,
                },
                _ => Limit::InFlight { max: a as u32 },
            };
            let retry = int(&values[5])?;
            Ok(Decision::Refused(Refusal {
                subject: text(&values[1])?,
                limit,
                retry_after: (retry >= 0).then(|| ms(retry)),
            }))
        }
        "admitted" => values[1..]
            .chunks(5)
            .map(|c| {
                if c.len() != 5 {
                    return Err(QuotaError::Store("truncated admission answer".into()));
                }
                window_usage(c, Some(int(&c[2])? as u32))
            })
            .collect::<Result<_, _>>()
            .map(Decision::Admitted),
        _ => Err(QuotaError::Store(format!(
            "unexpected admission answer {values:?}"
        ))),
    }
}

#[tonic::async_trait]
impl QuotaStore for RedisStore {
    async fn admit(&self, charge: &Charge<'_>) -> Result<Decision, QuotaError> {
        let mut conn = self.conn().await?;
        let mut call = self.invocation(&self.admit, charge.scopes);
        call.arg(charge.charge_id)
            .arg(charge.idempotency.unwrap_or(""))
            .arg(charge.lease.as_millis() as u64)
            .arg(charge.retention.as_millis() as u64)
            .arg(charge.scopes.len());
        for scope in charge.scopes {
            call.arg(&scope.subject).arg(scope.windows.len());
            for (window_ms, images) in &scope.windows {
                call.arg(*window_ms).arg(*images);
            }
            let (interval, burst) = scope.rate.unwrap_or((0, 0));
            call.arg(interval)
                .arg(burst)
                .arg(scope.max_in_flight.map_or(-1, i64::from));
        }
        let values: Vec<Value> = call.invoke_async(&mut conn).await.map_err(store_error)?;
        decode_decision(values)
    }

    async fn settle(
        &self,
        charge_id: &str,
        idempotency: Option<&str>,
        scopes: &[Scope],
        settlement: Settlement,
    ) -> Result<bool, QuotaError> {
        let mut conn = self.conn().await?;
        let mut call = self.invocation(&self.settle, scopes);
        call.arg(charge_id)
            .arg(match settlement {
                Settlement::Commit => "commit",
                Settlement::Refund => "refund",
            })
            .arg(idempotency.unwrap_or(""))
            .arg(scopes.len());
        for scope in scopes {
            call.arg(&scope.subject).arg(scope.windows.len());
            for (window_ms, _) in &scope.windows {
                call.arg(*window_ms);
            }
        }
        let settled: i64 = call.invoke_async(&mut conn).await.map_err(store_error)?;
        Ok(settled == 1)
    }

    async fn renew(
        &self,
        charge_id: &str,
        scopes: &[Scope],
        lease: Duration,
    ) -> Result<(), QuotaError> {
        let subjects: Vec<&str> = scopes
            .iter()
            .filter(|s| s.max_in_flight.is_some())
            .map(|s| s.subject.as_str())
            .collect();
        if subjects.is_empty() {
            return Ok(());
        }
        let mut conn = self.conn().await?;
        let mut call = self.invocation(&self.renew, scopes);
        call.arg(charge_id).arg(lease.as_millis() as u64);
        for s in subjects {
            call.arg(s);
        }
        call.invoke_async::<i64>(&mut conn)
            .await
            .map(|_| ())
            .map_err(store_error)
    }

    async fn usage(&self, scopes: &[Scope]) -> Result<Usage, QuotaError> {
        let mut conn = self.conn().await?;
        let mut call = self.invocation(&self.usage, scopes);
        call.arg(scopes.len());
        for scope in scopes {
            call.arg(&scope.subject).arg(scope.windows.len());
            for (window_ms, _) in &scope.windows {
                call.arg(*window_ms);
            }
        }
        let values: Vec<Value> = call.invoke_async(&mut conn).await.map_err(store_error)?;
        let split = values
            .iter()
            .position(|v| matches!(v, Value::BulkString(b) if b == b"in_flight"))
            .ok_or_else(|| QuotaError::Store("usage answer without in-flight part".into()))?;
        let limits = scopes.iter().flat_map(|s| s.windows.iter().map(|w| w.1));
        let windows = values[..split]
            .chunks(4)
            .zip(limits)
            .map(|(c, limit)| window_usage(c, Some(limit)))
            .collect::<Result<_, _>>()?;
        let in_flight = values[split + 1..]
            .chunks(2)
            .map(|c| Ok((text(&c[0])?, int(&c[1])? as u32)))
            .collect::<Result<_, QuotaError>>()?;
        Ok(Usage { windows, in_flight })
    }

    async fn save_result(
        &self,
        charge_id: &str,
        bytes: &[u8],
        retention: Duration,
    ) -> Result<(), QuotaError> {
        let mut conn = self.conn().await?;
        conn.pset_ex::<_, _, ()>(
            self.key(&format!("res:{charge_id}")),
            bytes,
            retention.as_millis() as u64,
        )
        .await
        .map_err(store_error)
    }

    async fn result(&self, charge_id: &str) -> Result<Option<Vec<u8>>, QuotaError> {
        let mut conn = self.conn().await?;
        conn.get(self.key(&format!("res:{charge_id}")))
            .await
            .map_err(store_error)
    }
}

#[tonic::async_trait]
impl KeyStore for RedisStore {
    async fn create_key(&self, digest: &str, record: &KeyRecord) -> Result<(), QuotaError> {
        let mut conn = self.conn().await?;
        let serialized = record_text(record);
        let fresh: bool = conn
            .hset_nx(self.key("keyids"), &record.id, digest)
            .await
            .map_err(store_error)?;
        if !fresh {
            return Err(QuotaError::Conflict(format!(
                "a key with id {:?} exists",
                record.id
            )));
        }
        conn.set::<_, _, ()>(self.key(&format!("key:{digest}")), serialized)
            .await
            .map_err(store_error)
    }

    async fn lookup_key(&self, digest: &str) -> Result<Option<KeyRecord>, QuotaError> {
        let mut conn = self.conn().await?;
        let json: Option<String> = conn
            .get(self.key(&format!("key:{digest}")))
            .await
            .map_err(store_error)?;
        json.map(|j| parse_record(&j)).transpose()
    }

    async fn list_keys(&self) -> Result<Vec<KeyRecord>, QuotaError> {
        let mut conn = self.conn().await?;
        let ids: Vec<(String, String)> = conn
            .hgetall(self.key("keyids"))
            .await
            .map_err(store_error)?;
        let mut records = Vec::with_capacity(ids.len());
        for (_, digest) in ids {
            let json: Option<String> = conn
                .get(self.key(&format!("key:{digest}")))
                .await
                .map_err(store_error)?;
            if let Some(j) = json {
                records.push(parse_record(&j)?);
            }
        }
        records.sort_by(|a, b| a.id.cmp(&b.id));
        Ok(records)
    }

    async fn revoke_key(&self, id: &str) -> Result<bool, QuotaError> {
        let mut conn = self.conn().await?;
        let digest: Option<String> = conn
            .hget(self.key("keyids"), id)
            .await
            .map_err(store_error)?;
        let Some(digest) = digest else {
            return Ok(false);
        };
        // Two commands, not a transaction: the keys may lie in different cluster slots. The record
        // goes first, so the key stops working even if the second command is lost.
        conn.del::<_, ()>(self.key(&format!("key:{digest}")))
            .await
            .map_err(store_error)?;
        conn.hdel::<_, _, ()>(self.key("keyids"), id)
            .await
            .map_err(store_error)?;
        Ok(true)
    }
}

#[tonic::async_trait]
impl ConfigStore for RedisStore {
    async fn tiers(&self) -> Result<Option<String>, QuotaError> {
        let mut conn = self.conn().await?;
        conn.get(self.key("tiers")).await.map_err(store_error)
    }

    async fn set_tiers(&self, toml: &str) -> Result<(), QuotaError> {
        let mut conn = self.conn().await?;
        conn.set(self.key("tiers"), toml).await.map_err(store_error)
    }
}

fn record_text(record: &KeyRecord) -> String {
    toml::to_string(record).expect("a key record serialises")
}

fn parse_record(text: &str) -> Result<KeyRecord, QuotaError> {
    toml::from_str(text).map_err(|e| QuotaError::Store(format!("corrupt key record: {e}")))
}
