//! `tenantry outbox`: the mail waiting, sent and given up on, and sending
//! the dead ones again.

use clap::Subcommand;

use crate::cli::Failure;
use crate::configuration::Settings;
use crate::mail::delivery;
use crate::startup::Context;

#[derive(Subcommand, Debug)]
pub enum OutboxCommand {
    /// Mail pending, being sent, dead (given up after the last attempt) and delivered; the dead ones listed
    Status {
        /// Print a JSON object
        #[arg(long)]
        json: bool,
    },
    /// Make the dead mails due again with a fresh count of attempts (a running serve sends them)
    Retry {
        /// Only this mail (its id in `outbox status`)
        #[arg(long)]
        id: Option<i64>,
    },
}

pub async fn run(settings: Settings, action: OutboxCommand) -> Result<(), Failure> {
    let ctx = Context::open(&settings, 1).await?;
    let client = ctx.pool.get().await?;
    match action {
        OutboxCommand::Status { json } => {
            let status = delivery::status(&**client).await?;
            if json {
                println!("{}", serde_json::to_string_pretty(&status)?);
                return Ok(());
            }
            println!(
                "pending {} (sending now {}), dead {}, delivered {} (kept {} days)",
                status.pending,
                status.sending,
                status.dead,
                status.delivered,
                settings.mail.retention.as_secs() / 86_400
            );
            if let Some(age) = status.oldest_pending_seconds {
                println!("the oldest pending mail has waited {age} s");
            }
            if !status.dead_mails.is_empty() {
                println!("\ndead mails (`tenantry outbox retry` sends them again):");
                println!(
                    "{:>8}  {:<24} {:<32} {:>8}  last error",
                    "id", "kind", "to", "attempts"
                );
                for m in &status.dead_mails {
                    println!(
                        "{:>8}  {:<24} {:<32} {:>8}  {}",
                        m.id,
                        m.kind,
                        m.recipient,
                        m.attempts,
                        m.last_error.as_deref().unwrap_or("")
                    );
                }
            }
            Ok(())
        }
        OutboxCommand::Retry { id } => {
            let n = delivery::retry_dead(&**client, id).await?;
            match (n, id) {
                (0, Some(id)) => Err(Failure::Other(format!(
                    "no dead mail with id {id} (see `tenantry outbox status`)"
                ))),
                (n, _) => {
                    println!(
                        "{n} dead mail(s) are due again; a running `tenantry serve` sends them"
                    );
                    Ok(())
                }
            }
        }
    }
}
