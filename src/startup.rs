//! Building the application: database, bootstrap, templates, keys, and the
//! HTTP server with its one route table.

use std::net::TcpListener;
use std::sync::Arc;

use actix_web::dev::Server;
use actix_web::{web, App};

use crate::api::middleware::{self, RateLimits};
use crate::api::{AppState, FleetRuns};
use crate::audit::Pseudonyms;
use crate::auth::{Hasher, JwtKeys};
use crate::configuration::{CitusRouting, DatabaseTarget, Settings, SettingsError};
use crate::db::{self, DbError, Installation, Target};
use crate::templates::{TemplateError, TemplateSet};
use crate::tenancy::integrity::IntegrityError;
use crate::tenancy::publication::{self, Opening, Problem, Proposals, Publication, Templates};

#[derive(Debug, thiserror::Error)]
pub enum StartupError {
    #[error(transparent)]
    Db(#[from] DbError),
    #[error(transparent)]
    Templates(#[from] TemplateError),
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        addr: String,
        #[source]
        source: std::io::Error,
    },
    #[error(transparent)]
    Settings(#[from] SettingsError),
    #[error("cannot prepare the dummy password hash: {0}")]
    Hash(#[from] crate::auth::AuthError),
    #[error(transparent)]
    Integrity(#[from] IntegrityError),
    #[error(transparent)]
    Published(Problem),
    #[error("cannot send mail: {0}")]
    Mail(String),
}

/// Everything a command that works on tenants needs.
pub struct Context {
    pub target: Target,
    pub pool: db::RequestPool,
    pub installation: Installation,
    /// The published set (see `tenancy::publication`).
    pub templates: Arc<Templates>,
    /// What opening published.
    pub publication: Publication,
    /// What this process proposes (`TENANTRY_TEMPLATES_DIR` or built-in).
    pub proposals: Proposals,
}

impl Context {
    /// `serve`'s request pool with `TENANTRY_ROUTER_ROLES` router roles
    /// (`db::routers`): made and handed their tenants first, each login
    /// tried. Without them (none configured, Citus, or a router that cannot
    /// log in or be made: said in the log), the pool as opened.
    async fn with_routers(&mut self, settings: &Settings) -> Result<db::RequestPool, StartupError> {
        if self.installation.citus {
            return Ok(self.pool.clone());
        }
        let mut client = self.target.connect().await?;
        let mut tries = 0;
        let (mut logins, changed) = loop {
            match db::routers::ensure(&mut client, &self.installation, settings.router_roles).await
            {
                Ok(done) => break done,
                // Once more: a concurrent change (another `serve` starting).
                Err(e) if tries == 0 => {
                    tracing::info!(error = %e, "making the router roles failed; once more");
                    tries += 1;
                }
                Err(e) => {
                    tracing::warn!(error = %e, "cannot make the router roles: the request pool logs in as the service");
                    return Ok(self.pool.clone());
                }
            }
        };
        self.installation.routers = logins.len();
        if logins.is_empty() {
            return Ok(self.pool.clone());
        }
        if changed != db::routers::HandOver::default() {
            tracing::info!(
                made = changed.made,
                granted = changed.granted,
                revoked = changed.revoked,
                "router roles handed their tenants"
            );
        }
        let connector = self.target.connector.clone();
        let logs_in = |login: db::routers::Login| {
            let as_router = connector.with_config(|config| {
                config.user(login.role.as_str());
                config.password(login.password.as_bytes());
            });
            async move { as_router.connect(db::Dedicated::Command).await.map(drop) }
        };
        for (k, login) in logins.iter_mut().enumerate() {
            if logs_in(login.clone()).await.is_ok() {
                continue;
            }
            // A password changed by hand, or restored from another
            // installation: a new one, tried once.
            let failed = match db::routers::rekey(&mut client, &self.installation, k).await {
                Ok(new) => match logs_in(new.clone()).await {
                    Ok(()) => {
                        *login = new;
                        continue;
                    }
                    Err(e) => e.to_string(),
                },
                Err(e) => e.to_string(),
            };
            tracing::warn!(
                router = login.role.as_str(),
                error = %failed,
                "a router role cannot log in (pg_hba.conf must admit it as it admits the \
                 service): the request pool logs in as the service"
            );
            return Ok(self.pool.clone());
        }
        Ok(db::RequestPool::routed(
            &self.target.connector,
            settings.pool_size,
            db::ConnectionLimits::default(),
            db::Retire::Spread,
            &logins,
        )?)
    }
}

impl Context {
    /// Resolve the database (starting the embedded cluster if needed), run
    /// the bootstrap and read the published templates (publishing nothing).
    pub async fn open(settings: &Settings, pool_size: usize) -> Result<Context, StartupError> {
        Self::open_with(settings, pool_size, Opening::Read).await
    }

    /// [`Context::open`] for `templates publish` (`Opening::Publish`) and
    /// for commands that make tenants (`Opening::Provision`).
    pub async fn open_with(
        settings: &Settings,
        pool_size: usize,
        opening: Opening,
    ) -> Result<Context, StartupError> {
        let proposals = proposals(settings, format!("cli:{}", os_user()))?;
        let target = Target::resolve(settings).await?;
        if let Some((cluster, running)) = &target.embedded {
            if running.started_here {
                // A command-line user should know a server now runs.
                eprintln!(
                    "note: started the embedded PostgreSQL under {} (port {}); it keeps running for the next command: `tenantry db stop` stops it",
                    cluster.data_dir().display(),
                    running.port
                );
            }
        }
        Self::on(target, &proposals, opening, pool_size).await
    }

    async fn on(
        target: Target,
        proposals: &Proposals,
        opening: Opening,
        pool_size: usize,
    ) -> Result<Context, StartupError> {
        let mut client = target.connect().await?;
        let (installation, _) = db::bootstrap(&mut client).await?;
        if installation.citus {
            // What a killed signup left (its session, and so its lock, is
            // gone): swept before anything else runs.
            let swept = crate::provisioning::sweep_pending(&client)
                .await
                .map_err(DbError::from)?;
            if swept > 0 {
                tracing::info!(signups = swept, "swept what killed signups left");
            }
        }
        // Publishing builds a tenant from nothing on a connection of its own.
        let scratch = match opening {
            Opening::Read => None,
            _ => Some(target.connect().await?),
        };
        let (published, publication) = publication::open(
            &client,
            scratch.as_deref().unwrap_or(&client),
            &installation,
            proposals,
            opening,
        )
        .await
        .map_err(StartupError::from)?;
        drop(scratch);
        for file in &publication.published {
            tracing::info!(file, "template published");
        }
        drop(client);
        let pool = target.pool(pool_size, &installation)?;
        Ok(Context {
            target,
            pool,
            installation,
            templates: Arc::new(Templates::new(published)),
            publication,
            proposals: proposals.clone(),
        })
    }
}

impl Context {
    /// Before a command makes a tenant: on a database with no template yet
    /// (opened `Opening::Read`), publish the proposals (the first process on
    /// a new installation does).
    pub async fn ready_to_provision(&self) -> Result<(), StartupError> {
        if self.templates.published().newest() > 0 {
            return Ok(());
        }
        let (client, scratch) = (self.target.connect().await?, self.target.connect().await?);
        publication::publish(&client, &scratch, &self.installation, &self.proposals).await?;
        self.templates.refresh(&*client).await?;
        Ok(())
    }

    /// The set a fleet run would migrate to: the published one, or the
    /// proposals where they continue it (what `fleet migrate` publishes
    /// first). For `fleet status` and `fleet migrate --dry-run`, which
    /// publish nothing.
    pub fn proposed(&self) -> Arc<TemplateSet> {
        let published = self.templates.get();
        let continues = self.proposals.set.latest() > published.latest()
            && published.all().iter().all(|p| {
                self.proposals
                    .set
                    .get(p.version())
                    .is_some_and(|t| t.name() == p.name() && t.checksum() == p.checksum())
            });
        if continues {
            Arc::new(self.proposals.set.clone())
        } else {
            published
        }
    }
}

impl From<Problem> for StartupError {
    fn from(p: Problem) -> Self {
        match p {
            Problem::Integrity(IntegrityError::Postgres(e)) => StartupError::Db(DbError::from(e)),
            Problem::Integrity(e) => StartupError::Integrity(e),
            Problem::Templates(e) => StartupError::Templates(e),
            other => StartupError::Published(other),
        }
    }
}

/// The proposed templates: `TENANTRY_TEMPLATES_DIR`'s, or the built-in ones.
fn proposals(settings: &Settings, by: String) -> Result<Proposals, TemplateError> {
    // Absolute, so that `templates list` says where a version came from.
    let dir = settings
        .templates_dir
        .as_ref()
        .map(|d| std::fs::canonicalize(d).unwrap_or_else(|_| d.clone()));
    Ok(Proposals {
        set: TemplateSet::load(dir.as_deref())?,
        explicit: settings.templates_dir.is_some(),
        by,
    })
}

/// The user running this command, for records of who did what.
pub fn os_user() -> String {
    nix::unistd::User::from_uid(nix::unistd::getuid())
        .ok()
        .flatten()
        .map(|u| u.name)
        .unwrap_or_else(|| format!("uid {}", nix::unistd::getuid()))
}

pub struct Application {
    port: u16,
    server: Server,
    target: Target,
    fleet_runs: FleetRuns,
    /// The mail and webhook senders, stopped after the requests, each
    /// given its time.
    senders: Senders,
}

type Senders = Vec<(crate::mail::delivery::Delivering, std::time::Duration)>;

/// How long requests in flight get to finish after SIGTERM/SIGINT.
pub const DRAIN_SECONDS: u64 = 30;

/// How long the mail and webhook senders get (together) to finish their
/// sends and give back their claims after the requests have drained.
pub const MAIL_STOP: std::time::Duration = std::time::Duration::from_secs(10);

impl Application {
    /// Bind (port 0 picks a free one, as the tests do) and build the server.
    /// Whatever can be refused is refused before the embedded cluster
    /// starts; a failure after it started stops it again.
    pub async fn build(settings: Settings) -> Result<Application, StartupError> {
        if let (None, DatabaseTarget::Url(_)) = (&settings.jwt_secret, &settings.database) {
            return Err(SettingsError::MissingJwtSecret.into());
        }
        let proposals = proposals(&settings, "serve".into())?;
        let tls = match &settings.tls {
            Some(files) => Some(
                crate::transport::Tls::from_pem_files(&files.cert, &files.key).map_err(
                    |reason| SettingsError::Invalid {
                        name: "TENANTRY_TLS_CERT",
                        reason,
                    },
                )?,
            ),
            None => None,
        };
        let bind_err = |source| StartupError::Bind {
            addr: settings.bind.to_string(),
            source,
        };
        let listener = TcpListener::bind(settings.bind).map_err(bind_err)?;
        let port = listener.local_addr().map_err(bind_err)?.port();

        let target = Target::resolve(&settings).await?;
        match Self::serve_on(&settings, target.clone(), proposals, listener, tls).await {
            Ok((server, fleet_runs, senders)) => Ok(Application {
                port,
                server,
                target,
                fleet_runs,
                senders,
            }),
            Err(e) => {
                if let Some((cluster, running)) = target.embedded {
                    if running.started_here {
                        let _ = tokio::task::spawn_blocking(move || cluster.stop()).await;
                    }
                }
                Err(e)
            }
        }
    }

    async fn serve_on(
        settings: &Settings,
        target: Target,
        proposals: Proposals,
        listener: TcpListener,
        tls: Option<crate::transport::Tls>,
    ) -> Result<(Server, FleetRuns, Senders), StartupError> {
        let connector = target.connector.with_cap(settings.extra_connections);
        // `serve` publishes what its templates add at start (an upgrade's
        // new built-in versions, or TENANTRY_TEMPLATES_DIR's), and refuses
        // a directory that disagrees with what is published.
        let mut context =
            Context::on(target, &proposals, Opening::Serve, settings.pool_size).await?;
        context.pool = context.with_routers(settings).await?;
        // A published version this process cannot use (or tenants ahead of
        // the published set): it serves anyway, at the newest version it
        // can use, and `/health` says what is wrong and how to fix it.
        let check = crate::tenancy::integrity::verify(
            &**context
                .pool
                .get()
                .await
                .map_err(|e| DbError::Pool(e.to_string()))?,
            &context.templates.get(),
        )
        .await;
        match check {
            Ok(()) => {}
            Err(IntegrityError::Postgres(e)) => return Err(DbError::from(e).into()),
            Err(problem) => tracing::error!(%problem, "the published templates have a problem"),
        }
        // Embedded mode: generated once, kept 0600 in the data dir.
        let secret = settings.jwt_secret()?;
        let mut pool = context
            .pool
            .with_statement_timeout(settings.statement_timeout);
        if context.installation.citus && settings.citus_routing == CitusRouting::Direct {
            let direct = db::Direct::start(
                &db::citus_session(&context.target.connector),
                settings.pool_size,
                db::ConnectionLimits::default(),
                settings.statement_timeout,
                settings.citus_refresh_interval,
            )
            .await?;
            tracing::info!(
                workers = direct.nodes().len(),
                tenants = direct.placed(),
                "tenants' requests go straight to their workers"
            );
            pool = pool.with_direct(direct);
        }
        let letters = crate::mail::Letters::new(&settings.mail.public_url).with_files(
            crate::mail::delivery::files_dir(&settings.mail, &settings.data_dir),
        );
        // Tenant roles for the next signups, made before the first one.
        let spares =
            crate::tenancy::spares::Keeper::new(settings.spare_roles, settings.spare_schemas);
        spares
            .start(
                pool.clone(),
                connector.clone(),
                context.installation.clone(),
                context.templates.clone(),
                settings.maintenance_interval,
            )
            .await;
        if let Err(e) = pool.open_service().await {
            tracing::warn!(error = %e, "cannot open the service's connections ahead");
        }
        let state = web::Data::new(AppState {
            pool: pool.clone(),
            connector,
            installation: context.installation,
            templates: context.templates,
            spares,
            jwt: match &settings.jwt_previous_secret {
                Some(previous) => JwtKeys::new(secret.expose().as_bytes())
                    .with_previous(previous.expose().as_bytes()),
                None => JwtKeys::new(secret.expose().as_bytes()),
            },
            hasher: Hasher::new(settings.bcrypt_cost).await?,
            pseudonyms: Pseudonyms::from_secret(secret.expose().as_bytes()),
            export_key: crate::tenancy::export::ExportKey::from_secret(secret.expose().as_bytes()),
            exports: crate::api::exports::ExportBudget::new(settings.export_concurrency),
            health: Default::default(),
            export_timeout: settings.export_timeout,
            login_max_failures: settings.limits.login_max_failures,
            client_timeout: settings.client_timeout,
            metrics_token: settings.metrics_token.clone(),
            fleet_runs: FleetRuns::default(),
            letters: letters.clone(),
            password_resets: crate::api::account::ResetRequests::start(pool.clone(), letters),
            tenant_quota_bytes: settings.tenant_quota_bytes,
            audit_anchor_file: settings.audit_anchor_file.clone(),
        });
        let fleet_runs = state.fleet_runs.clone();
        let sender = crate::mail::delivery::Sender::new(&settings.mail, &settings.data_dir)
            .map_err(StartupError::Mail)?;
        let mail = crate::mail::delivery::Outbox::new(
            state.connector.clone(),
            &settings.mail,
            sender,
            state.installation.id.as_str(),
        )
        .map_err(StartupError::Mail)?
        .spawn(&state.letters);
        crate::metrics::handle();
        let limits = web::Data::new(RateLimits::new(&settings.limits));
        let mut senders = vec![(mail, MAIL_STOP)];
        match crate::webhooks::delivery::Sender::new(state.connector.clone(), &settings.webhooks) {
            // Sends still under way then are sent again by the next
            // process (their claims run out).
            Ok(sender) => senders.push((sender.spawn(), MAIL_STOP)),
            Err(e) => tracing::warn!(error = %e, "webhooks are not delivered: no HTTP client"),
        }
        crate::maintenance::spawn(
            state.clone().into_inner(),
            limits.clone().into_inner(),
            settings.audit_anchor_file.clone(),
            settings.maintenance_interval,
            settings.mail.clone(),
            settings.usage_interval,
        );
        let addr = settings.bind.to_string();
        let limits_of_clients = crate::transport::ClientLimits {
            timeout: settings.client_timeout,
            drain_seconds: DRAIN_SECONDS,
            tls,
        };
        let server = crate::transport::serve(listener, limits_of_clients, move || {
            App::new()
                .app_data(state.clone())
                .app_data(limits.clone())
                .configure(crate::api::configure)
                .wrap(actix_web::middleware::from_fn(middleware::body_timeout))
                .wrap(actix_web::middleware::from_fn(middleware::rate_limit))
                .wrap(actix_web::middleware::from_fn(middleware::head_as_get))
                .wrap(middleware::security_headers())
                .wrap(actix_web::middleware::from_fn(middleware::observe))
        })
        .map_err(|source| StartupError::Bind { addr, source })?;
        Ok((server, fleet_runs, senders))
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    /// Where the database is (for `serve`, which stops an embedded cluster
    /// it started).
    pub fn target(&self) -> &Target {
        &self.target
    }

    /// Serve until SIGINT/SIGTERM: actix's own signal handling is off
    /// (`transport::serve`), so that fleet runs are stopped at a tenant
    /// boundary before the server drains its requests.
    pub async fn run_until_stopped(self) -> std::io::Result<()> {
        let handle = self.server.handle();
        let fleet_runs = self.fleet_runs.clone();
        tokio::spawn(async move {
            let signal = shutdown_signal().await;
            tracing::info!(
                signal,
                drain_seconds = DRAIN_SECONDS,
                "shutting down: no new connections; finishing requests in flight and stopping fleet runs at a tenant boundary"
            );
            fleet_runs.stop_all();
            handle.stop(true).await;
        });
        let served = self.server.await;
        tracing::info!("stopped serving");
        // After the requests (which may still have written mail and
        // events): what is being sent goes out, what was claimed and not
        // sent is given back for the next process at once.
        futures::future::join_all(
            self.senders
                .into_iter()
                .map(|(sender, within)| sender.stop(within)),
        )
        .await;
        served
    }
}

/// SIGTERM or SIGINT, whichever comes first.
async fn shutdown_signal() -> &'static str {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = match signal(SignalKind::terminate()) {
        Ok(s) => s,
        Err(_) => {
            let _ = tokio::signal::ctrl_c().await;
            return "SIGINT";
        }
    };
    tokio::select! {
        _ = term.recv() => "SIGTERM",
        _ = tokio::signal::ctrl_c() => "SIGINT",
    }
}
