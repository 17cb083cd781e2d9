//! `tenantry webhooks`: the endpoints that get lifecycle events, their
//! deliveries, and sending the dead ones again.

use clap::Subcommand;

use crate::cli::Failure;
use crate::configuration::Settings;
use crate::startup::Context;
use crate::webhooks::{self, EventType};

#[derive(Subcommand, Debug)]
pub enum WebhooksCommand {
    /// Register an endpoint (http:// or https://); prints its secret once. Deliveries are POSTed by a running serve
    Add {
        /// Where to POST the events (redirects are not followed)
        url: String,
        /// Only these event types, comma-separated (default: all): tenant.created, tenant.email_verified, tenant.suspended, tenant.resumed, tenant.migrated, tenant.erased, tenant.quota_exceeded, fleet.run_finished
        #[arg(long)]
        events: Option<String>,
        /// Print a JSON object (with the secret)
        #[arg(long)]
        json: bool,
    },
    /// Every endpoint, with its pending and dead deliveries
    List {
        /// Print a JSON array
        #[arg(long)]
        json: bool,
    },
    /// Remove an endpoint and its deliveries
    Remove {
        /// The endpoint's id (see `webhooks list`)
        id: i64,
    },
    /// An endpoint's latest deliveries, newest first
    Deliveries {
        /// The endpoint's id (see `webhooks list`)
        id: i64,
        /// How many (1 to 1000)
        #[arg(long, default_value_t = 50)]
        limit: i64,
        /// Print a JSON array
        #[arg(long)]
        json: bool,
    },
    /// Make the dead deliveries due again with a fresh count of attempts (a running serve sends them)
    Retry {
        /// Only this endpoint's
        id: Option<i64>,
    },
}

/// `--events a,b`: the types, checked.
pub fn parse_events(raw: &str) -> Result<Vec<EventType>, String> {
    let types: Vec<EventType> = raw
        .split(',')
        .map(str::trim)
        .filter(|t| !t.is_empty())
        .map(EventType::parse)
        .collect::<Result<_, _>>()?;
    if types.is_empty() {
        return Err("--events names no event type".into());
    }
    Ok(types)
}

pub async fn run(settings: Settings, action: WebhooksCommand) -> Result<(), Failure> {
    // Input first: a bad one is exit 2 before any connection.
    match &action {
        WebhooksCommand::Add { url, events, .. } => {
            webhooks::parse_url(url).map_err(Failure::Usage)?;
            if let Some(raw) = events {
                parse_events(raw).map_err(Failure::Usage)?;
            }
        }
        WebhooksCommand::Deliveries { limit, .. } if !(1..=1000).contains(limit) => {
            return Err(Failure::Usage("--limit must be from 1 to 1000".into()));
        }
        _ => {}
    }
    let ctx = Context::open(&settings, 1).await?;
    let mut client = ctx.pool.get().await?;
    let by = crate::cli::cli_change();
    match action {
        WebhooksCommand::Add { url, events, json } => {
            let url = webhooks::parse_url(&url).map_err(Failure::Usage)?;
            let types = events
                .as_deref()
                .map(parse_events)
                .transpose()
                .map_err(Failure::Usage)?;
            let (endpoint, secret) =
                webhooks::add(&mut client, &url, types.as_deref(), &by).await?;
            if json {
                let mut value = serde_json::to_value(&endpoint)?;
                value["secret"] = secret.into();
                println!("{}", serde_json::to_string_pretty(&value)?);
            } else {
                println!("endpoint {} added: {}", endpoint.id, endpoint.url);
                println!("secret (shown only now; receivers verify signatures with it): {secret}");
            }
        }
        WebhooksCommand::List { json } => {
            let all = webhooks::endpoints(&**client, None).await?;
            if json {
                println!("{}", serde_json::to_string_pretty(&all)?);
            } else if all.is_empty() {
                println!("no endpoints");
            } else {
                println!(
                    "{:>5} {:>8} {:>5}  {:<40} EVENTS",
                    "ID", "PENDING", "DEAD", "URL"
                );
                for e in &all {
                    let events = e
                        .events
                        .as_ref()
                        .map(|t| t.join(","))
                        .unwrap_or_else(|| "all".into());
                    println!(
                        "{:>5} {:>8} {:>5}  {:<40} {events}",
                        e.id, e.pending, e.dead, e.url
                    );
                }
            }
        }
        WebhooksCommand::Remove { id } => {
            if !webhooks::remove(&mut client, id, &by).await? {
                return Err(Failure::Other(format!("no endpoint {id}")));
            }
            println!("endpoint {id} removed, with its deliveries");
        }
        WebhooksCommand::Deliveries { id, limit, json } => {
            let list = webhooks::deliveries(&**client, id, limit)
                .await?
                .ok_or_else(|| Failure::Other(format!("no endpoint {id}")))?;
            if json {
                println!("{}", serde_json::to_string_pretty(&list)?);
            } else if list.is_empty() {
                println!("no deliveries");
            } else {
                println!(
                    "{:<19} {:<36} {:<22} {:<9} {:>8} {:>6}  LAST ERROR",
                    "CREATED", "WEBHOOK-ID", "TYPE", "STATE", "ATTEMPTS", "STATUS"
                );
                for d in &list {
                    let status = d.last_status.map(|s| s.to_string()).unwrap_or_default();
                    println!(
                        "{:<19} {:<36} {:<22} {:<9} {:>8} {status:>6}  {}",
                        d.created_at.format("%Y-%m-%d %H:%M:%S"),
                        d.msg_id,
                        d.kind,
                        d.state,
                        d.attempts,
                        d.last_error.as_deref().unwrap_or("")
                    );
                }
            }
        }
        WebhooksCommand::Retry { id } => {
            let n = webhooks::retry(&mut client, id, &by)
                .await?
                .ok_or_else(|| Failure::Other(format!("no endpoint {}", id.unwrap_or_default())))?;
            match n {
                1 => println!("1 dead delivery is due again"),
                n => println!("{n} dead deliveries are due again"),
            }
        }
    }
    Ok(())
}
