//! The tenant guard: the only way code gets a connection routed to a tenant.
//!
//! [`TenantTx`] checks a connection out of the pool (its tenant's shard of
//! [`db::RequestPool`]), and in the same round
//! trip as `BEGIN` runs one statement ([`ENTER`]) that reads the tenant's
//! schema and role from the registry (never from the token) and sets `search_path` to `tenant_<name>, reference` and the role to the
//! tenant's own, both transaction-locally. It ends with `COMMIT` and the
//! session reset in one message ([`db::COMMIT_AND_RESET`]); a guard dropped
//! before that (handler error, panic, client gone mid-request) takes its
//! connection out of the pool and closes it: a connection is never returned
//! in a transaction or with tenant state on it.

use std::pin::pin;

use deadpool_postgres::{Object, PoolError};
use futures::future::maybe_done;
use tokio_postgres::types::ToSql;
use tokio_postgres::{Row, SimpleQueryMessage};
use uuid::Uuid;

use crate::db::{self, TenantPool};

/// Enter the tenant of user `$1` whose access token has generation `$2`:
/// its schema and role, read from the registry (never from the token), set
/// transaction-locally, and `$3` as the statement timeout of what follows.
/// A token whose session `$4` was ended (logout, the session deleted, a
/// replayed refresh token) enters nothing either. No active tenant, a disabled account or a token of
/// an older generation (password changed, signed out everywhere) makes
/// `1 / count(*)` divide by zero, which aborts the transaction: statements
/// pipelined behind this one then never run as the service. A suspended
/// account is found (its token is valid) and refused by
/// `tenantry.refuse_suspended()`, which raises SQLSTATE TS403 and aborts the
/// transaction the same way. A write (`$5`, see [`Access`]) to a tenant
/// over its storage quota is refused by `tenantry.refuse_over_quota()`
/// (SQLSTATE TQ403, V22; the flag is kept by `tenancy::usage`). All come
/// before the `set_config` calls: a projection evaluates its columns in
/// order (and an abort would undo the settings anyway).
const ENTER: &str = "SELECT 1 / count(*) AS entered,
        CASE WHEN bool_or(u.suspended_at IS NOT NULL) THEN tenantry.refuse_suspended() END AS suspended,
        CASE WHEN $5 AND bool_or(t.over_quota_since IS NOT NULL) THEN tenantry.refuse_over_quota() END AS over_quota,
        pg_catalog.set_config('search_path', pg_catalog.quote_ident(max(t.schema_name)) || ', reference', true),
        pg_catalog.set_config('role', max(t.role_name), true),
        pg_catalog.set_config('statement_timeout', $3, true)
 FROM tenantry.tenants t JOIN tenantry.users u ON u.id = t.user_id
 WHERE t.user_id = $1 AND t.status = 'active'
   AND u.token_generation = $2 AND u.disabled_at IS NULL
   AND NOT EXISTS (SELECT FROM tenantry.refresh_tokens r
                   WHERE r.family_id = $4 AND r.revoked_at IS NOT NULL)";

/// Taken (shared, until the transaction ends) before [`ENTER`], in its own
/// statement so that ENTER's snapshot is taken after it: an erasure takes
/// the same key exclusively for its final transaction, so it waits for the
/// requests already routed to the tenant, and requests that come after it
/// find the tenant gone (401), never half-dropped tables. The fleet's
/// per-tenant claim takes it exclusively too (see `db::TENANT_LOCK_CLASS`).
const ENTER_LOCK: &str =
    "SELECT pg_catalog.pg_advisory_xact_lock_shared($2, pg_catalog.hashtext($1::text))";

/// A change to a role that changes nothing (the tenants' group keeps
/// `INHERIT`): PostgreSQL resets every session's cached role memberships
/// on any change to a role. What mends a session whose list missed a batch
/// of spare roles (`tenancy::spares`; `scripts/repro-membership-race`).
/// The name is the installation's group, quoted by `format('%I')`.
pub const MEND: &str = "DO $$ BEGIN EXECUTE pg_catalog.format('ALTER ROLE %I INHERIT', \
    (SELECT 'tnt_' || id || '__tenants' FROM tenantry.installation)); END $$";

/// At most one [`MEND`] per this long in a process: a role refused for
/// good (its membership revoked by hand) must not make every request reset
/// every session's cache, which costs each of them a rebuild.
pub const MEND_EVERY: std::time::Duration = std::time::Duration::from_secs(10);

static LAST_MEND: std::sync::Mutex<Option<std::time::Instant>> = std::sync::Mutex::new(None);

/// Send [`MEND`] (unless one went out within [`MEND_EVERY`]) after `refused`.
async fn mend(pool: &(impl TenantPool + Sync), user: Uuid, refused: &tokio_postgres::Error) {
    {
        let mut last = LAST_MEND.lock().unwrap_or_else(|p| p.into_inner());
        if last.is_some_and(|at| at.elapsed() < MEND_EVERY) {
            return;
        }
        *last = Some(std::time::Instant::now());
    }
    tracing::warn!(error = %refused, "the tenant's role was refused: resetting the sessions' role memberships");
    crate::metrics::memberships_mended();
    // As the service: a router may not alter a role.
    match pool.get_as_service(user).await {
        Ok(client) => {
            if let Err(e) = client.batch_execute(MEND).await {
                tracing::warn!(error = %e, "resetting the sessions' role memberships failed");
            }
        }
        Err(e) => {
            tracing::warn!(error = %e, "no connection to reset the sessions' role memberships")
        }
    }
}

/// Which connection a routed transaction enters on, and how it tries
/// again when the tenant's role is refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Via {
    /// The tenant's own shard (with router roles, its router's).
    Router,
    /// With router roles, after the router was refused the tenant's role:
    /// one of the service's own connections (the service is a member of
    /// every tenant role), so a router that lacks a membership (handed
    /// over by the next `serve`) still serves.
    Service,
    /// After [`mend`]: once more, the last try.
    Mended,
}

impl Via {
    /// The next try after a refusal, if any: through the service when the
    /// pool has routers, then once after mending the sessions' lists.
    fn after_refusal(self, pool: &impl TenantPool) -> Option<Via> {
        match self {
            Via::Router if pool.routed() => Some(Via::Service),
            Via::Router | Via::Service => Some(Via::Mended),
            Via::Mended => None,
        }
    }

    fn mends(self) -> bool {
        self == Via::Mended
    }

    async fn checkout(
        self,
        pool: &(impl TenantPool + Sync),
        user: Uuid,
    ) -> Result<db::Checkout, RoutingError> {
        match self {
            Via::Router => Ok(pool.checkout_tenant(user).await?),
            Via::Service | Via::Mended => Ok((pool.get_as_service(user).await?, None)),
        }
    }
}

/// `attempt` through the tenant's own connection, and after a refused
/// `SET ROLE` again as [`Via::after_refusal`] says ([`mend`]ing first for
/// the last try).
async fn refusals_retried<T, Fut>(
    pool: &(impl TenantPool + Sync),
    caller: Caller,
    mut attempt: impl FnMut(Via) -> Fut,
) -> Result<T, RoutingError>
where
    Fut: std::future::Future<Output = Result<T, RoutingError>>,
{
    let mut via = Via::Router;
    let mut sent_again = false;
    loop {
        match attempt(via).await {
            // Direct routing on Citus: the map's node no longer holds the
            // tenant; once more, to where the map now says.
            Err(RoutingError::Elsewhere) if !sent_again => sent_again = true,
            Err(RoutingError::Elsewhere) => {
                return Err(RoutingError::NodeUnavailable(
                    "the tenant was not on its worker twice in a row (moving?)".into(),
                ))
            }
            Err(RoutingError::RoleRefused(e)) => match via.after_refusal(pool) {
                Some(next) => {
                    if next.mends() {
                        mend(pool, caller.user_id, &e).await;
                    }
                    via = next;
                }
                None => return Err(RoutingError::RoleRefused(e)),
            },
            done => return done,
        }
    }
}

/// What the guard runs where the connection is: [`ENTER`], or on a worker
/// the same checks on the registry's copy (`db::citus::enter_on_node`).
fn enter_sql(on: Option<&db::OnNode>) -> &str {
    match on {
        Some(on) => &on.enter,
        None => ENTER,
    }
}

/// The guard's parameters: [`ENTER`]'s five, and on a worker the shard it
/// checks the node holds.
fn enter_params_for<'a>(
    on: Option<&db::OnNode>,
    all: &'a [&'a (dyn ToSql + Sync); 6],
) -> &'a [&'a (dyn ToSql + Sync)] {
    if on.is_some() {
        all
    } else {
        &all[..5]
    }
}

/// The SQLSTATE of `tenantry.refuse_suspended()` (V15).
const SUSPENDED: &str = "TS403";

/// The SQLSTATE of `tenantry.refuse_over_quota()` (V22).
const OVER_QUOTA: &str = "TQ403";

/// The SQLSTATE of `tenantry_guard.refuse_elsewhere()`: a worker that no
/// longer holds the tenant (`db::citus::enter_on_node`).
const ELSEWHERE: &str = "TR421";

/// Who a routed request is for: the access token's user, generation and
/// session (the refresh-token family it was issued in; `None` for a token
/// issued outside one).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Caller {
    pub user_id: Uuid,
    pub generation: i32,
    pub session: Option<Uuid>,
}

#[derive(Debug, thiserror::Error)]
pub enum RoutingError {
    #[error("no active tenant for this user")]
    NoTenant,
    /// The account is suspended: its token is valid, its tenant is there,
    /// and it may not use it.
    #[error("the account is suspended")]
    Suspended,
    /// A write to a tenant over its storage quota.
    #[error("the tenant is over its storage quota")]
    OverQuota,
    #[error("cannot get a database connection: {0}")]
    Pool(#[from] PoolError),
    /// `SET ROLE` to the tenant's role was refused (SQLSTATE 42501): this
    /// session's cached role memberships may have missed a batch of spare
    /// roles (a PostgreSQL race, see `tenancy::spares`). Tried once more
    /// after [`mend`]; a 500 if it persists.
    #[error("the tenant's role was refused: {0}")]
    RoleRefused(tokio_postgres::Error),
    #[error(transparent)]
    Postgres(#[from] tokio_postgres::Error),
    /// Direct routing on Citus: the worker that holds the tenant gives no
    /// connection, or the connection to it was lost (503
    /// `node_unavailable`).
    #[error("{0}")]
    NodeUnavailable(String),
    /// Direct routing on Citus: the worker the placement map gave no
    /// longer holds the tenant (moved by someone else); sent again once
    /// where the map then says.
    #[error("the worker no longer holds the tenant")]
    Elsewhere,
}

impl From<db::CheckoutError> for RoutingError {
    fn from(e: db::CheckoutError) -> Self {
        match e {
            db::CheckoutError::Pool(e) => RoutingError::Pool(e),
            node @ db::CheckoutError::Node { .. } => {
                RoutingError::NodeUnavailable(node.to_string())
            }
        }
    }
}

/// An error on a worker's connection that says the worker is gone, or
/// that it no longer holds the tenant (counted; the map reads the
/// tenant's placement again before the next try).
fn on_node(on: Option<&db::OnNode>, user: Uuid, e: RoutingError) -> RoutingError {
    match (on, e) {
        (Some(on), RoutingError::Elsewhere) => {
            on.direct.stale(user);
            RoutingError::Elsewhere
        }
        (Some(on), RoutingError::Postgres(e)) if db::connection_lost(&e) => {
            on.direct.refresh_soon();
            RoutingError::NodeUnavailable(format!("the worker {} is unavailable: {e}", on.name()))
        }
        (_, e) => e,
    }
}

/// The guard's own statement failed on a worker because a table it names
/// is gone (an operator, a later guard): the nodes and the guard's names
/// are read again.
fn guard_failed(on: Option<&db::OnNode>, e: &tokio_postgres::Error) {
    if let Some(on) = on {
        if e.code() == Some(&tokio_postgres::error::SqlState::UNDEFINED_TABLE) {
            on.direct.refresh_soon();
        }
    }
}

impl RoutingError {
    fn from_enter(e: tokio_postgres::Error) -> RoutingError {
        // What ENTER raises when the user has no active tenant (erased,
        // disabled, being deleted), and what `tenantry.refuse_suspended()`
        // raises for a suspended account.
        match e.code() {
            Some(code) if *code == tokio_postgres::error::SqlState::DIVISION_BY_ZERO => {
                RoutingError::NoTenant
            }
            Some(code) if code.code() == SUSPENDED => RoutingError::Suspended,
            Some(code) if code.code() == OVER_QUOTA => RoutingError::OverQuota,
            Some(code) if code.code() == ELSEWHERE => RoutingError::Elsewhere,
            Some(code) if *code == tokio_postgres::error::SqlState::INSUFFICIENT_PRIVILEGE => {
                RoutingError::RoleRefused(e)
            }
            _ => e.into(),
        }
    }
}

/// Whether a routed transaction may write. Reads run `BEGIN READ ONLY`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Access {
    ReadOnly,
    /// A write that may add data: refused while the tenant is over its
    /// storage quota.
    ReadWrite,
    /// A write that only removes rows: allowed over the quota, since it is
    /// how a tenant gets back under it.
    Delete,
}

impl Access {
    fn begin(self) -> &'static str {
        match self {
            Access::ReadOnly => "BEGIN READ ONLY",
            Access::ReadWrite | Access::Delete => "BEGIN",
        }
    }

    /// ENTER's `$5`: whether being over the quota refuses this access.
    fn refused_over_quota(self) -> bool {
        self == Access::ReadWrite
    }

    /// How [`TenantTx::once`] ends. A read-only `once` ran exactly one
    /// statement of ours, a SELECT in a READ ONLY transaction, after the
    /// entry: nothing in it can have left session state (what it reads was
    /// made by the templates, which are linted and admin-written), so it
    /// skips the reset, which costs as much PostgreSQL time as the read
    /// itself (measured with pgbench: 3,300 vs 2,050 routed reads/s).
    /// Writes fire whatever the templates attached to the tables: reset.
    fn end(self) -> &'static str {
        match self {
            Access::ReadOnly => "COMMIT",
            Access::ReadWrite | Access::Delete => db::COMMIT_AND_RESET,
        }
    }
}

/// A transaction routed to one tenant. See the module docs.
pub struct TenantTx {
    client: Option<Object>,
    /// The pool's TLS, for a cancel request.
    tls: Option<crate::postgres_tls::Tls>,
}

impl TenantTx {
    /// Check out, `BEGIN` and enter the user's tenant: one round trip (two
    /// the first time a connection routes, to prepare the statement).
    #[tracing::instrument(name = "route", skip_all, fields(user = %caller.user_id))]
    pub async fn begin(
        pool: &(impl TenantPool + Sync),
        caller: Caller,
        access: Access,
    ) -> Result<TenantTx, RoutingError> {
        refusals_retried(pool, caller, |via| Self::enter(pool, caller, access, via)).await
    }

    async fn enter(
        pool: &(impl TenantPool + Sync),
        caller: Caller,
        access: Access,
        via: Via,
    ) -> Result<TenantTx, RoutingError> {
        let (client, on) = via.checkout(pool, caller.user_id).await?;
        Self::enter_on(pool, client, on.as_ref(), caller, access)
            .await
            .map_err(|e| on_node(on.as_ref(), caller.user_id, e))
    }

    async fn enter_on(
        pool: &(impl TenantPool + Sync),
        client: Object,
        on: Option<&db::OnNode>,
        caller: Caller,
        access: Access,
    ) -> Result<TenantTx, RoutingError> {
        let lock = client.prepare_cached(ENTER_LOCK).await?;
        let enter = client.prepare_cached(enter_sql(on)).await?;
        let mut guard = TenantTx {
            client: Some(client),
            tls: pool.tls().cloned(),
        };
        let c = guard.client();
        let user_text = caller.user_id.to_string();
        let lock_params: [&(dyn ToSql + Sync); 2] = [&user_text, &db::TENANT_LOCK_CLASS];
        let timeout = format!("{}ms", pool.statement_timeout().as_millis());
        let over_quota_refused = access.refused_over_quota();
        let shard = on.map(|on| on.placed.shard);
        let enter_params: [&(dyn ToSql + Sync); 6] = [
            &caller.user_id,
            &caller.generation,
            &timeout,
            &caller.session,
            &over_quota_refused,
            &shard,
        ];
        let enter_params = enter_params_for(on, &enter_params);
        let (begun, locked, entered) = futures::join!(
            c.batch_execute(access.begin()),
            c.execute(&lock, &lock_params),
            c.query_one(&enter, enter_params)
        );
        begun?;
        if let Err(e) = locked {
            drop(entered);
            let _ = guard.end(db::COMMIT_AND_RESET).await;
            return Err(e.into());
        }
        match entered {
            Ok(_) => Ok(guard),
            Err(e) => {
                guard_failed(on, &e);
                let err = RoutingError::from_enter(e);
                if matches!(err, RoutingError::RoleRefused(_)) {
                    // This session's cached memberships may have missed a
                    // batch of spares: it is closed, not reused.
                    guard.discard();
                } else {
                    // An unknown user is not worth a connection: end the
                    // aborted transaction and give it back clean.
                    guard.end(db::COMMIT_AND_RESET).await?;
                }
                Err(err)
            }
        }
    }

    /// One statement in its own routed transaction, all in one round trip:
    /// `BEGIN`, enter, the statement, `COMMIT` (and the reset after a write,
    /// see [`Access::end`]). If entering fails,
    /// the transaction is aborted, so the statement never runs as anyone
    /// but the tenant; its rows are returned only when all four succeeded.
    /// A statement new to the connection is prepared behind the `BEGIN` and
    /// the entry (its names must resolve in the tenant's schema): one more
    /// round trip, once per connection.
    #[tracing::instrument(name = "route", skip_all, fields(user = %caller.user_id))]
    pub async fn once(
        pool: &(impl TenantPool + Sync),
        caller: Caller,
        access: Access,
        sql: &str,
        params: &[&(dyn ToSql + Sync)],
    ) -> Result<Vec<Row>, RoutingError> {
        refusals_retried(pool, caller, |via| {
            Self::once_entered(pool, caller, access, sql, params, via)
        })
        .await
    }

    async fn once_entered(
        pool: &(impl TenantPool + Sync),
        caller: Caller,
        access: Access,
        sql: &str,
        params: &[&(dyn ToSql + Sync)],
        via: Via,
    ) -> Result<Vec<Row>, RoutingError> {
        let (client, on) = via.checkout(pool, caller.user_id).await?;
        Self::once_on(pool, client, on.as_ref(), caller, access, sql, params)
            .await
            .map_err(|e| on_node(on.as_ref(), caller.user_id, e))
    }

    async fn once_on(
        pool: &(impl TenantPool + Sync),
        client: Object,
        on: Option<&db::OnNode>,
        caller: Caller,
        access: Access,
        sql: &str,
        params: &[&(dyn ToSql + Sync)],
    ) -> Result<Vec<Row>, RoutingError> {
        let lock = client.prepare_cached(ENTER_LOCK).await?;
        let enter = client.prepare_cached(enter_sql(on)).await?;
        let mut guard = TenantTx {
            client: Some(client),
            tls: pool.tls().cloned(),
        };
        let user_text = caller.user_id.to_string();
        let timeout = format!("{}ms", pool.statement_timeout().as_millis());
        let over_quota_refused = access.refused_over_quota();
        let shard = on.map(|on| on.placed.shard);
        let (begun, locked, entered, statement, rows, ended) = {
            let c = guard.client();
            let lock_params: [&(dyn ToSql + Sync); 2] = [&user_text, &db::TENANT_LOCK_CLASS];
            let enter_params: [&(dyn ToSql + Sync); 6] = [
                &caller.user_id,
                &caller.generation,
                &timeout,
                &caller.session,
                &over_quota_refused,
                &shard,
            ];
            let enter_params = enter_params_for(on, &enter_params);
            let mut begun = pin!(maybe_done(c.batch_execute(access.begin())));
            let mut locked = pin!(maybe_done(c.execute(&lock, &lock_params)));
            let mut entered = pin!(maybe_done(c.query_one(&enter, enter_params)));
            // Polling a request once puts it on the wire (see db::pipeline).
            let _ = futures::poll!(begun.as_mut());
            let _ = futures::poll!(locked.as_mut());
            let _ = futures::poll!(entered.as_mut());
            let mut prepared = pin!(maybe_done(c.prepare_cached(sql)));
            if futures::poll!(prepared.as_mut()).is_pending() {
                futures::join!(
                    begun.as_mut(),
                    locked.as_mut(),
                    entered.as_mut(),
                    prepared.as_mut()
                );
            }
            let statement = prepared
                .as_mut()
                .take_output()
                .expect("the statement is prepared or failed");
            let (rows, ended) = match &statement {
                Ok(statement) => {
                    let mut rows = pin!(maybe_done(c.query(statement, params)));
                    let mut ended = pin!(maybe_done(c.simple_query(access.end())));
                    futures::join!(
                        begun.as_mut(),
                        locked.as_mut(),
                        entered.as_mut(),
                        rows.as_mut(),
                        ended.as_mut()
                    );
                    (rows.as_mut().take_output(), ended.as_mut().take_output())
                }
                Err(_) => {
                    let ended = c.simple_query(access.end()).await;
                    futures::join!(begun.as_mut(), locked.as_mut(), entered.as_mut());
                    (None, Some(ended))
                }
            };
            (
                begun.as_mut().take_output().expect("joined"),
                locked.as_mut().take_output().expect("joined"),
                entered.as_mut().take_output().expect("joined"),
                statement.map(drop),
                rows,
                ended.expect("joined"),
            )
        };
        // The transaction is over, one way or the other: the connection is
        // clean again, unless it broke, or was refused the tenant's role
        // (its cached memberships may have missed a batch of spares: it is
        // closed, not reused).
        let refused = matches!(&entered, Err(e)
            if e.code() == Some(&tokio_postgres::error::SqlState::INSUFFICIENT_PRIVILEGE));
        if refused {
            guard.discard();
        } else if let Ok(replies) = &ended {
            guard.release_if_clean(replies);
        }
        begun?;
        locked?;
        if let Err(e) = &entered {
            guard_failed(on, e);
        }
        entered.map_err(RoutingError::from_enter)?;
        let rows = rows.transpose()?;
        statement?;
        ended?;
        Ok(rows.unwrap_or_default())
    }

    pub async fn query(
        &self,
        sql: &str,
        params: &[&(dyn ToSql + Sync)],
    ) -> Result<Vec<Row>, tokio_postgres::Error> {
        let c = self.client();
        let statement = c.prepare_cached(sql).await?;
        c.query(&statement, params).await
    }

    pub async fn query_opt(
        &self,
        sql: &str,
        params: &[&(dyn ToSql + Sync)],
    ) -> Result<Option<Row>, tokio_postgres::Error> {
        let c = self.client();
        let statement = c.prepare_cached(sql).await?;
        c.query_opt(&statement, params).await
    }

    pub async fn execute(
        &self,
        sql: &str,
        params: &[&(dyn ToSql + Sync)],
    ) -> Result<u64, tokio_postgres::Error> {
        let c = self.client();
        let statement = c.prepare_cached(sql).await?;
        c.execute(&statement, params).await
    }

    /// Commit, reset the session and give the connection back.
    pub async fn commit(mut self) -> Result<(), RoutingError> {
        self.end(db::COMMIT_AND_RESET).await
    }

    /// Roll back, reset the session and give the connection back.
    pub async fn rollback(mut self) -> Result<(), RoutingError> {
        self.end(&ROLLBACK_AND_RESET).await
    }

    async fn end(&mut self, sql: &str) -> Result<(), RoutingError> {
        let replies = self.client().simple_query(sql).await?;
        self.release_if_clean(&replies);
        Ok(())
    }

    /// Back to the pool, unless the reset found SQL-prepared statements
    /// (see `db::SESSION_RESET`): then the connection is closed.
    fn release_if_clean(&mut self, replies: &[SimpleQueryMessage]) {
        let leaked = replies.iter().rev().find_map(|m| match m {
            SimpleQueryMessage::Row(row) => row.get("leaked").map(|n| n != "0"),
            _ => None,
        });
        if leaked == Some(true) {
            tracing::warn!("a routed connection kept a prepared statement; closing it");
            if let Some(client) = self.client.take() {
                drop(Object::take(client));
            }
        } else {
            self.release();
        }
    }

    fn client(&self) -> &Object {
        self.client
            .as_ref()
            .expect("a live guard has its connection")
    }

    /// Back to the pool (the transaction ended and the session was reset).
    fn release(&mut self) {
        self.client.take();
    }

    /// Closed instead of going back (its transaction is over or aborted).
    fn discard(&mut self) {
        if let Some(client) = self.client.take() {
            drop(Object::take(client));
        }
    }
}

static ROLLBACK_AND_RESET: std::sync::LazyLock<String> =
    std::sync::LazyLock::new(|| format!("ROLLBACK; {}", db::SESSION_RESET));

impl Drop for TenantTx {
    /// Dropped in a transaction, or with its reply unread: the connection
    /// may be mid-transaction as the tenant. Never reuse it. Its statement
    /// may still be running (the client went away and actix dropped the
    /// handler): closing the socket does not stop a backend that is busy,
    /// a cancel request does.
    fn drop(&mut self) {
        if let Some(client) = self.client.take() {
            tracing::debug!("discarding a routed connection that did not finish");
            let cancel = client.cancel_token();
            drop(Object::take(client));
            let tls = self
                .tls
                .take()
                .unwrap_or_else(crate::postgres_tls::Tls::none);
            if let Ok(runtime) = tokio::runtime::Handle::try_current() {
                runtime.spawn(async move {
                    if let Err(e) = cancel.cancel_query(tls.maker).await {
                        tracing::debug!(error = %e, "cannot cancel an abandoned statement");
                    }
                });
            }
        }
    }
}
