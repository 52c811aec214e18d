//! `kiln admin`: operator commands against the shared Redis store: create, list and revoke API keys
//! (a new key is shown once; only its digest is stored), and set or show the tier table (validated
//! before it is stored; every gateway applies it within its refresh period).

use std::path::PathBuf;

use anyhow::{bail, Context, Result};
use clap::{Args, Subcommand};
use kiln_quota::{keys, ConfigStore, KeyRecord, KeyStore, RedisConfig, RedisStore, TierTable};
use kiln_telemetry::env_names as env;

#[derive(Args, Debug)]
pub struct AdminArgs {
    /// Redis URL of the cluster's store.
    #[arg(long, env = env::ADMIN_REDIS)]
    pub redis: String,
    /// Prefix of Kiln's Redis keys (as given to the gateways).
    #[arg(long, env = env::ADMIN_REDIS_PREFIX, default_value = "kiln:")]
    pub redis_prefix: String,
    /// Pepper mixed into API-key digests (the gateways' secret; never logged).
    #[arg(long, env = env::API_KEY_PEPPER, default_value = "", hide_env_values = true)]
    pub pepper: String,
    #[command(subcommand)]
    pub command: AdminCommand,
}

#[derive(Subcommand, Debug)]
pub enum AdminCommand {
    /// API keys.
    Keys {
        #[command(subcommand)]
        command: KeysCommand,
    },
    /// The tier table.
    Tiers {
        #[command(subcommand)]
        command: TiersCommand,
    },
}

#[derive(Subcommand, Debug)]
pub enum KeysCommand {
    /// Create a key; it is printed once and cannot be shown again.
    Create {
        #[arg(long)]
        user: String,
        /// free, plus, pro or team.
        #[arg(long, value_parser = kiln_quota::tiers::TIER_NAMES)]
        tier: String,
        /// Organisation whose pool team members share.
        #[arg(long)]
        org: Option<String>,
        /// Key id (default: generated).
        #[arg(long)]
        id: Option<String>,
    },
    /// List keys (ids, users, tiers; never the keys).
    List,
    /// Revoke a key by id; every gateway refuses it from the next request.
    Revoke { id: String },
}

#[derive(Subcommand, Debug)]
pub enum TiersCommand {
    /// Validate a tier table (TOML) and store it for every gateway.
    Set { file: PathBuf },
    /// Print the stored tier table (or the shipped defaults when none is stored).
    Show,
}

pub async fn run(args: AdminArgs) -> Result<()> {
    let mut config = RedisConfig::new(args.redis.clone());
    config.prefix = args.redis_prefix.clone();
    let store = RedisStore::new(config)?;
    store.ping().await.with_context(|| {
        format!(
            "--redis ({}): cannot reach {}",
            env::ADMIN_REDIS,
            args.redis
        )
    })?;
    match args.command {
        AdminCommand::Keys { command } => keys_command(&store, &args.pepper, command).await,
        AdminCommand::Tiers { command } => tiers_command(&store, command).await,
    }
}

async fn keys_command(store: &RedisStore, pepper: &str, command: KeysCommand) -> Result<()> {
    match command {
        KeysCommand::Create {
            user,
            tier,
            org,
            id,
        } => {
            if user.trim().is_empty() {
                bail!("--user must not be empty");
            }
            let key = keys::generate();
            let record = KeyRecord {
                id: id.unwrap_or_else(keys::new_id),
                user,
                org,
                tier,
                created_unix: std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .map_or(0, |d| d.as_secs()),
            };
            store
                .create_key(&keys::digest(pepper, &key), &record)
                .await?;
            println!("id: {}", record.id);
            println!("key: {key}");
            eprintln!("The key is shown once; store it now. Only its digest is kept.");
        }
        KeysCommand::List => {
            for k in store.list_keys().await? {
                println!(
                    "{}\tuser={}\torg={}\ttier={}\tcreated_unix={}",
                    k.id,
                    k.user,
                    k.org.as_deref().unwrap_or("-"),
                    k.tier,
                    k.created_unix
                );
            }
        }
        KeysCommand::Revoke { id } => {
            if !store.revoke_key(&id).await? {
                bail!("no key with id {id:?}");
            }
            println!("revoked {id}");
        }
    }
    Ok(())
}

async fn tiers_command(store: &RedisStore, command: TiersCommand) -> Result<()> {
    match command {
        TiersCommand::Set { file } => {
            let text = std::fs::read_to_string(&file)
                .with_context(|| format!("reading {}", file.display()))?;
            let table =
                TierTable::from_toml(&text).with_context(|| format!("{}", file.display()))?;
            store.set_tiers(&table.to_toml()).await?;
            println!("stored the tier table; gateways apply it within their refresh period");
        }
        TiersCommand::Show => match store.tiers().await? {
            Some(text) => print!("{text}"),
            None => print!(
                "# no table stored; gateways use their configured or shipped one\n{}",
                kiln_quota::tiers::SHIPPED_TIERS
            ),
        },
    }
    Ok(())
}
