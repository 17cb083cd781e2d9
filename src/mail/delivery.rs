//! Delivering the outbox: `serve` claims due rows, sends them (SMTP, or
//! `.eml` files when no SMTP server is configured) and records what
//! happened. At least once: a row is marked delivered only after the server
//! accepted it, and a claim that outlives its sender expires. Never twice
//! at once: a claim is an UPDATE of rows picked with `FOR UPDATE SKIP
//! LOCKED`, so two processes claim disjoint rows.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use lettre::message::header::ContentType;
use lettre::message::{Body, Mailbox};
use lettre::transport::smtp::authentication::Credentials;
use lettre::transport::smtp::client::{Certificate, Tls, TlsParameters};
use lettre::{AsyncSmtpTransport, AsyncTransport, Message, Tokio1Executor};
use serde::Serialize;
use tokio_postgres::GenericClient;

use crate::configuration::MailSettings;
use crate::mail::Letters;

/// How long a claim lasts: longer than any one send may take (the SMTP
/// timeout below), renewed before each send of a batch, so a row is sent
/// again only when its sender died.
const CLAIM_SECONDS: i64 = 120;
/// One SMTP conversation's timeout (connect, and the whole send).
const SMTP_TIMEOUT: Duration = Duration::from_secs(30);
/// Rows claimed at once.
const BATCH: i64 = 20;
/// How often the outbox is looked at without being woken (mail written by
/// other processes, retries coming due).
const POLL: Duration = Duration::from_secs(1);
/// The longest wait between two attempts.
const MAX_BACKOFF: Duration = Duration::from_secs(3600);

/// Where `TENANTRY_SMTP_URL` says to send: `smtp://host[:port]` (plain, or
/// `?tls=starttls` / `?tls=opportunistic`), `smtps://host[:port]` (implicit
/// TLS), `user:password@` for AUTH (percent-encoded), and `cacert=PATH` for
/// a CA (PEM) to trust besides the usual roots.
#[derive(Debug, Clone)]
pub struct SmtpTarget {
    host: String,
    port: u16,
    security: Security,
    credentials: Option<(String, String)>,
    cacert: Option<PathBuf>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Security {
    Plain,
    StartTls,
    Opportunistic,
    Implicit,
}

impl SmtpTarget {
    pub fn parse(raw: &str) -> Result<SmtpTarget, String> {
        let url = url::Url::parse(raw.trim()).map_err(|e| format!("not a URL ({e})"))?;
        let host = url
            .host_str()
            .filter(|h| !h.is_empty())
            .ok_or("has no host")?
            .trim_start_matches('[')
            .trim_end_matches(']')
            .to_owned();
        let mut tls = None;
        let mut cacert = None;
        for (k, v) in url.query_pairs() {
            match &*k {
                "tls" => tls = Some(v.into_owned()),
                "cacert" => cacert = Some(PathBuf::from(v.into_owned())),
                other => return Err(format!("unknown parameter {other:?} (known: tls, cacert)")),
            }
        }
        let security = match (url.scheme(), tls.as_deref()) {
            ("smtp", None | Some("none")) => Security::Plain,
            ("smtp", Some("starttls" | "required")) => Security::StartTls,
            ("smtp", Some("opportunistic")) => Security::Opportunistic,
            ("smtps", None | Some("implicit")) => Security::Implicit,
            (scheme @ ("smtp" | "smtps"), Some(t)) => {
                return Err(format!("tls={t} does not go with {scheme}:// (smtp:// takes tls=starttls or tls=opportunistic; smtps:// is implicit TLS)"))
            }
            (scheme, _) => return Err(format!("scheme {scheme}:// is not smtp:// or smtps://")),
        };
        let port = url.port().unwrap_or(match security {
            Security::Plain => 25,
            Security::StartTls | Security::Opportunistic => 587,
            Security::Implicit => 465,
        });
        let decode = |s: &str| {
            percent_decode(s).ok_or_else(|| "the user or password is not valid UTF-8".to_owned())
        };
        let credentials = match (url.username(), url.password()) {
            ("", None) => None,
            (user, password) => Some((decode(user)?, decode(password.unwrap_or(""))?)),
        };
        if credentials.is_some() && matches!(security, Security::Plain | Security::Opportunistic) {
            return Err(
                "a user and password go only over TLS: use ?tls=starttls or smtps://".into(),
            );
        }
        if let Some(path) = &cacert {
            if !path.is_file() {
                return Err(format!("cacert {} is not a readable file", path.display()));
            }
        }
        Ok(SmtpTarget {
            host,
            port,
            security,
            credentials,
            cacert,
        })
    }

    fn transport(&self) -> Result<AsyncSmtpTransport<Tokio1Executor>, String> {
        let mut builder = AsyncSmtpTransport::<Tokio1Executor>::builder_dangerous(&self.host)
            .port(self.port)
            .timeout(Some(SMTP_TIMEOUT));
        if self.security != Security::Plain {
            let mut params = TlsParameters::builder(self.host.clone());
            if let Some(path) = &self.cacert {
                let pem = std::fs::read(path)
                    .map_err(|e| format!("cannot read {}: {e}", path.display()))?;
                let cert = Certificate::from_pem(&pem)
                    .map_err(|e| format!("{} is not a PEM certificate: {e}", path.display()))?;
                params = params.add_root_certificate(cert);
            }
            let params = params.build_rustls().map_err(|e| e.to_string())?;
            builder = builder.tls(match self.security {
                Security::StartTls => Tls::Required(params),
                Security::Opportunistic => Tls::Opportunistic(params),
                _ => Tls::Wrapper(params),
            });
        }
        if let Some((user, password)) = &self.credentials {
            builder = builder.credentials(Credentials::new(user.clone(), password.clone()));
        }
        Ok(builder.build())
    }

    /// Where it sends, without credentials (for the log).
    pub fn describe(&self) -> String {
        let scheme = if self.security == Security::Implicit {
            "smtps"
        } else {
            "smtp"
        };
        let tls = match self.security {
            Security::StartTls => "?tls=starttls",
            Security::Opportunistic => "?tls=opportunistic",
            _ => "",
        };
        format!("{scheme}://{}:{}{tls}", self.host, self.port)
    }
}

fn percent_decode(s: &str) -> Option<String> {
    percent_encoding::percent_decode_str(s)
        .decode_utf8()
        .ok()
        .map(|c| c.into_owned())
}

/// How mail leaves this process.
pub enum Sender {
    Smtp {
        transport: AsyncSmtpTransport<Tokio1Executor>,
        describe: String,
    },
    /// No SMTP server configured: one `.eml` file per mail in this directory.
    Files(PathBuf),
}

impl Sender {
    /// From the settings: SMTP when `TENANTRY_SMTP_URL` is set, else files
    /// under `<data dir>/mail/`.
    pub fn new(mail: &MailSettings, data_dir: &Path) -> Result<Sender, String> {
        match &mail.smtp_url {
            Some(url) => {
                let target = SmtpTarget::parse(url.expose())?;
                Ok(Sender::Smtp {
                    transport: target.transport()?,
                    describe: target.describe(),
                })
            }
            None => Ok(Sender::Files(
                files_dir(mail, data_dir).expect("no SMTP URL"),
            )),
        }
    }

    /// What the log says at start.
    pub fn describe(&self) -> String {
        match self {
            Sender::Smtp { describe, .. } => format!("over SMTP to {describe}"),
            Sender::Files(dir) => format!(
                "as .eml files under {} (no TENANTRY_SMTP_URL set)",
                dir.display()
            ),
        }
    }

    async fn send(&self, row: &Claimed, message: Message) -> Result<(), String> {
        match self {
            // lettre's timeout bounds the connect only: a server that stops
            // answering mid-conversation is bounded here.
            Sender::Smtp { transport, .. } => {
                match tokio::time::timeout(SMTP_TIMEOUT, transport.send(message)).await {
                    Ok(sent) => sent.map(drop).map_err(|e| e.to_string()),
                    Err(_) => Err(format!(
                        "the SMTP server did not finish within {} s",
                        SMTP_TIMEOUT.as_secs()
                    )),
                }
            }
            Sender::Files(dir) => {
                let shown = dir.display().to_string();
                let dir = dir.clone();
                let name = format!(
                    "{}-{:06}-{}.eml",
                    row.created_at.format("%Y%m%dT%H%M%SZ"),
                    row.id,
                    row.kind.replace('.', "_")
                );
                let bytes = message.formatted();
                tokio::task::spawn_blocking(move || write_eml(&dir, &name, &bytes))
                    .await
                    .map_err(|e| e.to_string())?
                    .map_err(|e| format!("cannot write {shown}: {e}"))
            }
        }
    }
}

/// The directory mail is written to when no SMTP server is configured.
pub fn files_dir(mail: &MailSettings, data_dir: &Path) -> Option<PathBuf> {
    mail.smtp_url.is_none().then(|| data_dir.join("mail"))
}

/// Remove the `.eml` files of the outbox rows `ids` from `dir` (named
/// `<time>-<id>-<kind>.eml`); how many.
pub fn forget_files(dir: &Path, ids: &[i64]) -> usize {
    if ids.is_empty() {
        return 0;
    }
    let Ok(entries) = std::fs::read_dir(dir) else {
        return 0;
    };
    let mut removed = 0;
    for entry in entries.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        let id = name
            .trim_start_matches('.')
            .split('-')
            .nth(1)
            .and_then(|id| id.parse::<i64>().ok());
        if id.is_some_and(|id| ids.contains(&id)) && std::fs::remove_file(entry.path()).is_ok() {
            removed += 1;
        }
    }
    removed
}

/// Written under a temporary name and renamed, so a reader never sees half a
/// mail; readable by the owner only (mails carry tokens).
fn write_eml(dir: &Path, name: &str, bytes: &[u8]) -> std::io::Result<()> {
    use std::io::Write;
    use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)?;
    let tmp = dir.join(format!(".{name}.tmp"));
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(&tmp)?;
    f.write_all(bytes)?;
    f.sync_all()?;
    std::fs::rename(&tmp, dir.join(name))
}

/// A claimed row (no `Debug`: its body may carry a token).
struct Claimed {
    id: i64,
    kind: String,
    recipient: String,
    subject: String,
    body: String,
    attempts: i32,
    created_at: chrono::DateTime<chrono::Utc>,
}

const CLAIM: &str = "\
UPDATE tenantry.outbox o
   SET claimed_by = $1, claimed_until = now() + make_interval(secs => $2),
       attempts = o.attempts + 1
 WHERE o.id IN (SELECT id FROM tenantry.outbox
                 WHERE channel = 'mail' AND delivered_at IS NULL AND dead_at IS NULL
                   AND next_attempt_at <= now()
                   AND (claimed_until IS NULL OR claimed_until < now())
                 ORDER BY next_attempt_at, id
                 LIMIT $3
                 FOR UPDATE SKIP LOCKED)
RETURNING o.id, o.kind, o.recipient, o.subject, o.body, o.attempts, o.created_at";

const RENEW: &str = "\
UPDATE tenantry.outbox SET claimed_until = now() + make_interval(secs => $3)
 WHERE id = $1 AND claimed_by = $2 AND delivered_at IS NULL";

const DELIVERED: &str = "\
UPDATE tenantry.outbox
   SET delivered_at = now(), body = NULL, claimed_by = NULL, claimed_until = NULL, last_error = NULL
 WHERE id = $1 AND claimed_by = $2";

/// `$3` the error, `$4` the delay before the next attempt (seconds), `$5`
/// the attempts after which the row is dead.
const FAILED: &str = "\
UPDATE tenantry.outbox
   SET claimed_by = NULL, claimed_until = NULL, last_error = left($3, 1000),
       next_attempt_at = now() + make_interval(secs => $4),
       dead_at = CASE WHEN attempts >= $5 THEN now() END
 WHERE id = $1 AND claimed_by = $2
RETURNING dead_at IS NOT NULL";

/// The delay before attempt `attempts + 1`: the base doubled per attempt
/// made, capped, times a jitter from 0.5 to 1.5 (so senders that failed
/// together do not retry together).
pub fn backoff(base: Duration, attempts: u32, jitter: f64) -> Duration {
    let doubled = base.saturating_mul(1u32 << attempts.saturating_sub(1).min(20));
    doubled.min(MAX_BACKOFF).mul_f64(jitter.clamp(0.5, 1.5))
}

/// Give back the claims of a sender that stops ($1: its `claimed_by`).
const RELEASE: &str = "
UPDATE tenantry.outbox SET claimed_by = NULL, claimed_until = NULL
 WHERE claimed_by = $1 AND delivered_at IS NULL";

/// A running sender ([`Outbox::spawn`]).
pub struct Delivering {
    stop: Arc<Stop>,
    task: tokio::task::JoinHandle<()>,
    /// What is delivered, in the warning of a stop that took too long.
    what: &'static str,
    /// How long its claims hold, in that warning.
    claim_seconds: u64,
}

/// Asked of a background sender by [`Delivering::stop`].
#[derive(Default)]
pub struct Stop {
    flag: std::sync::atomic::AtomicBool,
    notify: tokio::sync::Notify,
}

impl Stop {
    pub fn stopping(&self) -> bool {
        self.flag.load(std::sync::atomic::Ordering::SeqCst)
    }

    /// Returns when a stop is asked for (at once if it was already).
    pub async fn asked(&self) {
        let notified = self.notify.notified();
        if !self.stopping() {
            notified.await;
        }
    }
}

impl Delivering {
    /// A sender's `task`, which ends soon after `stop` is asked.
    pub fn new(
        what: &'static str,
        stop: Arc<Stop>,
        task: tokio::task::JoinHandle<()>,
        claim_seconds: u64,
    ) -> Delivering {
        Delivering {
            stop,
            task,
            what,
            claim_seconds,
        }
    }

    /// Stop after what is being sent (if any), give back what was claimed
    /// and not sent, and wait for that, at most `within`.
    pub async fn stop(self, within: Duration) {
        self.stop
            .flag
            .store(true, std::sync::atomic::Ordering::SeqCst);
        self.stop.notify.notify_waiters();
        if tokio::time::timeout(within, self.task).await.is_err() {
            tracing::warn!(
                "{} did not stop in time; its claims run out in {} s",
                self.what,
                self.claim_seconds
            );
        }
    }
}

/// The `application_name` of the sender's session.
pub const OUTBOX_SESSION: &str = crate::db::OUTBOX_SESSION;

/// The outbox sender of one `serve` process. It has a database connection
/// of its own (made again when lost), so it never takes one from requests.
pub struct Outbox {
    connector: crate::db::Connector,
    client: Option<crate::db::Connection>,
    sender: Sender,
    from: Mailbox,
    max_attempts: u32,
    backoff: Duration,
    /// Who claims (`tenantry.outbox.claimed_by`): this process, uniquely.
    me: String,
    /// The installation, in Message-IDs.
    installation: String,
    /// Set by [`Delivering::stop`].
    stop: Arc<Stop>,
}

impl Outbox {
    pub fn new(
        connector: crate::db::Connector,
        settings: &MailSettings,
        sender: Sender,
        installation: &str,
    ) -> Result<Outbox, String> {
        let from = settings
            .from
            .parse::<Mailbox>()
            .map_err(|e| format!("TENANTRY_MAIL_FROM: {e}"))?;
        Ok(Outbox {
            connector,
            client: None,
            sender,
            from,
            max_attempts: settings.max_attempts,
            backoff: settings.backoff,
            me: format!("{}:{}", std::process::id(), uuid::Uuid::new_v4()),
            installation: installation.to_owned(),
            stop: Arc::default(),
        })
    }

    /// Deliver until the runtime ends: whatever is due, then wait to be
    /// woken (a commit in this process) or for the next poll, until
    /// [`Delivering::stop`].
    pub fn spawn(self, letters: &Letters) -> Delivering {
        let woken = letters.woken();
        tracing::info!("mail is delivered {}", self.sender.describe());
        let stop = Arc::new(Stop::default());
        let mut me = self;
        me.stop = stop.clone();
        let task = tokio::spawn(async move {
            while !me.stopping() {
                let busy = match me.deliver_due().await {
                    Ok(n) => n as i64 == BATCH,
                    Err(e) => {
                        me.client = None;
                        tracing::warn!(error = %e, "mail delivery skipped: no database connection");
                        false
                    }
                };
                if !busy && !me.stopping() {
                    tokio::select! {
                        _ = tokio::time::timeout(POLL, woken.notified()) => {}
                        _ = me.stop.asked() => {}
                    }
                }
            }
            me.release().await;
        });
        Delivering::new("mail delivery", stop, task, CLAIM_SECONDS as u64)
    }

    fn stopping(&self) -> bool {
        self.stop.stopping()
    }

    /// Give back what this process claimed and did not send (a stop
    /// between a claim and its sends), for another process now rather than
    /// when the claim runs out.
    async fn release(&mut self) {
        let me = self.me.clone();
        let released = match self.client().await {
            Ok(client) => client
                .execute(RELEASE, &[&me])
                .await
                .map_err(|e| e.to_string()),
            Err(e) => Err(e),
        };
        match released {
            Ok(0) => {}
            Ok(n) => tracing::info!(mails = n, "mail delivery stopped; unsent mails released"),
            Err(e) => {
                tracing::warn!(error = %e, "mail delivery stopped; its claims run out in {CLAIM_SECONDS} s")
            }
        }
    }

    async fn client(&mut self) -> Result<&tokio_postgres::Client, String> {
        // Told apart from the request pool's sessions in pg_stat_activity
        // by its name (`OUTBOX_SESSION`).
        self.connector
            .kept(&mut self.client, crate::db::Dedicated::Outbox)
            .await
            .map_err(|e| e.to_string())
    }

    /// Claim what is due and send it; how many rows were claimed.
    pub async fn deliver_due(&mut self) -> Result<usize, String> {
        let me = self.me.clone();
        let rows = self
            .client()
            .await?
            .query(CLAIM, &[&me, &(CLAIM_SECONDS as f64), &BATCH])
            .await
            .map_err(|e| e.to_string())?;
        let claimed: Vec<Claimed> = rows
            .iter()
            .map(|r| Claimed {
                id: r.get(0),
                kind: r.get(1),
                recipient: r.get(2),
                subject: r.get(3),
                body: r.get(4),
                attempts: r.get(5),
                created_at: r.get(6),
            })
            .collect();
        let n = claimed.len();
        for row in claimed {
            if self.stopping() {
                // Released by the stop (`release`).
                break;
            }
            // The claim is renewed before each send, so a slow batch never
            // outlives it: a row whose claim was lost is someone else's.
            let renewed = self
                .client()
                .await?
                .execute(RENEW, &[&row.id, &me, &(CLAIM_SECONDS as f64)])
                .await
                .map_err(|e| e.to_string())?;
            if renewed == 0 {
                tracing::warn!(
                    outbox_id = row.id,
                    "mail claim lost before sending; left to its new claim"
                );
                continue;
            }
            let outcome = match self.message(&row) {
                Ok(message) => self.sender.send(&row, message).await,
                Err(e) => Err(e),
            };
            self.record(&row, outcome).await?;
        }
        Ok(n)
    }

    fn message(&self, row: &Claimed) -> Result<Message, String> {
        let to = row
            .recipient
            .parse::<Mailbox>()
            .map_err(|e| format!("bad recipient: {e}"))?;
        Message::builder()
            .from(self.from.clone())
            .to(to)
            .subject(row.subject.clone())
            .date(SystemTime::from(row.created_at))
            .message_id(Some(format!(
                "<outbox.{}.{}@tenantry>",
                row.id, self.installation
            )))
            .header(ContentType::TEXT_PLAIN)
            .body(body_of(&row.body))
            .map_err(|e| e.to_string())
    }

    async fn record(&mut self, row: &Claimed, outcome: Result<(), String>) -> Result<(), String> {
        let (me, backoff_base, max_attempts) =
            (self.me.clone(), self.backoff, self.max_attempts as i32);
        let client = self.client().await?;
        match outcome {
            Ok(()) => {
                client
                    .execute(DELIVERED, &[&row.id, &me])
                    .await
                    .map_err(|e| e.to_string())?;
                metrics::counter!("tenantry_mail_sent_total").increment(1);
                tracing::info!(outbox_id = row.id, kind = %row.kind, "mail delivered");
            }
            Err(error) => {
                let attempts = u32::try_from(row.attempts).unwrap_or(0);
                let delay = backoff(backoff_base, attempts, 0.5 + rand::random::<f64>());
                let dead: Option<bool> = client
                    .query_opt(
                        FAILED,
                        &[&row.id, &me, &error, &delay.as_secs_f64(), &max_attempts],
                    )
                    .await
                    .map_err(|e| e.to_string())?
                    .map(|r| r.get(0));
                metrics::counter!("tenantry_mail_failed_attempts_total").increment(1);
                if dead == Some(true) {
                    metrics::counter!("tenantry_mail_dead_total").increment(1);
                    tracing::error!(outbox_id = row.id, kind = %row.kind, attempts, %error,
                        "mail is dead after its last attempt; `tenantry outbox retry` sends it again");
                } else {
                    tracing::warn!(outbox_id = row.id, kind = %row.kind, attempts, %error,
                        retry_in_ms = delay.as_millis() as u64, "mail not delivered; will retry");
                }
            }
        }
        Ok(())
    }
}

/// Plain 7-bit text when it is ASCII with lines within RFC 5322's 998
/// characters (ours are), so the link and its `token=` read as written in the
/// raw mail too; lettre would pick quoted-printable for any line over 76,
/// which breaks a long link with soft line breaks and `=3D`.
/// Anything else: lettre's choice.
fn body_of(text: &str) -> Body {
    use lettre::message::header::ContentTransferEncoding;
    let seven_bit = text.bytes().all(|b| b.is_ascii() && b != 0 && b != b'\r')
        && text.lines().all(|l| l.len() <= 998);
    if seven_bit {
        Body::dangerous_pre_encoded(
            text.replace('\n', "\r\n").into_bytes(),
            ContentTransferEncoding::SevenBit,
        )
    } else {
        Body::new(text.to_owned())
    }
}

/// What `tenantry outbox status` shows.
#[derive(Debug, Serialize, PartialEq, Eq)]
pub struct Status {
    /// Waiting for their first or next attempt (including those being sent).
    pub pending: i64,
    /// Being sent right now (claimed).
    pub sending: i64,
    /// Given up on after the last attempt.
    pub dead: i64,
    /// Delivered, still within the retention period.
    pub delivered: i64,
    /// Seconds the oldest pending mail has waited.
    pub oldest_pending_seconds: Option<i64>,
    /// The dead mails, oldest first (at most 100).
    pub dead_mails: Vec<DeadMail>,
}

#[derive(Debug, Serialize, PartialEq, Eq)]
pub struct DeadMail {
    pub id: i64,
    pub kind: String,
    pub recipient: String,
    pub attempts: i32,
    pub last_error: Option<String>,
    pub created_at: String,
}

pub async fn status(client: &impl GenericClient) -> Result<Status, tokio_postgres::Error> {
    let row = client
        .query_one(
            "SELECT count(*) FILTER (WHERE delivered_at IS NULL AND dead_at IS NULL),
                    count(*) FILTER (WHERE delivered_at IS NULL AND dead_at IS NULL
                                       AND claimed_until > now()),
                    count(*) FILTER (WHERE dead_at IS NOT NULL),
                    count(*) FILTER (WHERE delivered_at IS NOT NULL),
                    (extract(epoch FROM now() - min(created_at)
                        FILTER (WHERE delivered_at IS NULL AND dead_at IS NULL)))::bigint
               FROM tenantry.outbox WHERE channel = 'mail'",
            &[],
        )
        .await?;
    let dead_mails = client
        .query(
            "SELECT id, kind, recipient, attempts, last_error,
                    to_char(created_at AT TIME ZONE 'UTC', 'YYYY-MM-DD\"T\"HH24:MI:SS\"Z\"')
               FROM tenantry.outbox WHERE channel = 'mail' AND dead_at IS NOT NULL
              ORDER BY id LIMIT 100",
            &[],
        )
        .await?
        .iter()
        .map(|r| DeadMail {
            id: r.get(0),
            kind: r.get(1),
            recipient: r.get(2),
            attempts: r.get(3),
            last_error: r.get(4),
            created_at: r.get(5),
        })
        .collect();
    Ok(Status {
        pending: row.get(0),
        sending: row.get(1),
        dead: row.get(2),
        delivered: row.get(3),
        oldest_pending_seconds: row.get(4),
        dead_mails,
    })
}

/// Make the dead mails (or the one with `id`) due again with a fresh count
/// of attempts; how many.
pub async fn retry_dead(
    client: &impl GenericClient,
    id: Option<i64>,
) -> Result<u64, tokio_postgres::Error> {
    client
        .execute(
            "UPDATE tenantry.outbox
                SET dead_at = NULL, attempts = 0, next_attempt_at = now()
              WHERE channel = 'mail' AND dead_at IS NOT NULL AND ($1::bigint IS NULL OR id = $1)",
            &[&id],
        )
        .await
}

/// Delivered rows older than `retention`; how many were deleted.
pub async fn purge_delivered(
    client: &impl GenericClient,
    retention: Duration,
) -> Result<u64, tokio_postgres::Error> {
    client
        .execute(
            "DELETE FROM tenantry.outbox
              WHERE delivered_at < now() - make_interval(secs => $1)",
            &[&retention.as_secs_f64()],
        )
        .await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn smtp_urls_name_their_security() {
        let t = SmtpTarget::parse("smtp://127.0.0.1:2525").unwrap();
        assert_eq!((t.port, t.security), (2525, Security::Plain));
        assert!(t.credentials.is_none());
        let t = SmtpTarget::parse("smtps://user:p%40ss@mail.example.com").unwrap();
        assert_eq!((t.port, t.security), (465, Security::Implicit));
        assert_eq!(t.credentials, Some(("user".to_owned(), "p@ss".to_owned())));
        assert!(!t.describe().contains("p@ss"));
        let t = SmtpTarget::parse("smtp://host:587?tls=starttls").unwrap();
        assert_eq!(t.security, Security::StartTls);
        for bad in [
            "http://host",
            "smtp://",
            "smtp://host?tls=bogus",
            "smtps://host?tls=starttls",
            "smtp://host?cacert=/nonexistent/ca.pem",
            "smtp://host?x=1",
            "smtp://user:pw@host:25",
            "smtp://user:pw@host:587?tls=opportunistic",
            "not a url",
        ] {
            assert!(SmtpTarget::parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn backoff_doubles_with_jitter_and_is_capped() {
        let base = Duration::from_secs(2);
        assert_eq!(backoff(base, 1, 1.0), Duration::from_secs(2));
        assert_eq!(backoff(base, 3, 1.0), Duration::from_secs(8));
        assert_eq!(backoff(base, 3, 0.5), Duration::from_secs(4));
        assert_eq!(backoff(base, 60, 1.5), MAX_BACKOFF.mul_f64(1.5));
    }
}
