//! The PostgreSQL client programs a backup runs (`pg_dump`, `pg_restore`):
//! where they are, how they reach the database, and running one with its
//! progress shown.

use std::ffi::OsString;
use std::io::IsTerminal;
use std::os::unix::ffi::OsStringExt;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio_postgres::config::{ChannelBinding, Host, LoadBalanceHosts, TargetSessionAttrs};

use crate::cli::Failure;

/// `name` beside the embedded cluster's server when there is one (the same
/// version as the server it talks to), else where the server binaries are
/// looked for (PATH, `pg_config --bindir`, the newest
/// `/usr/lib/postgresql/*/bin`).
pub fn find(name: &str, server_bindir: Option<&Path>) -> Result<PathBuf, Failure> {
    if let Some(path) = server_bindir
        .map(|dir| dir.join(name))
        .filter(|p| p.is_file())
    {
        return Ok(path);
    }
    crate::embedded::find_tool(name).ok_or_else(|| {
        Failure::Other(format!(
            "{name} not found (looked on PATH, in `pg_config --bindir` and under /usr/lib/postgresql/*/bin); \
             install the PostgreSQL client programs of the server's major version or newer \
             (Debian/Ubuntu: `apt-get install postgresql-client`, Fedora: `dnf install postgresql`, \
             macOS: `brew install libpq`)"
        ))
    })
}

/// The first release of each major version whose `pg_restore` and `psql`
/// fence the dump's SQL off from psql's own commands (`\restrict`,
/// CVE-2025-8714): with an older one, a tampered dump could run shell
/// commands as whoever restores.
const RESTRICT_SINCE: [(u32, u32); 5] = [(13, 22), (14, 19), (15, 14), (16, 10), (17, 6)];

/// Whether `version` (major, minor) has `\restrict`.
fn has_restrict((major, minor): (u32, u32)) -> bool {
    major > 17
        || RESTRICT_SINCE
            .iter()
            .any(|&(m, since)| m == major && minor >= since)
}

/// Refuse (exit 2) a client program too old to restore safely.
pub async fn refuse_without_restrict(program: &Path) -> Result<(), Failure> {
    let out = tokio::process::Command::new(program)
        .arg("--version")
        .output()
        .await
        .map_err(|e| Failure::Other(format!("cannot run {}: {e}", program.display())))?;
    let text = String::from_utf8_lossy(&out.stdout);
    // "psql (PostgreSQL) 15.20 (Debian 15.20-0+deb12u1)"
    let version = text
        .split_whitespace()
        .find_map(|word| {
            let (major, minor) = word.split_once('.')?;
            Some((major.parse().ok()?, minor.parse().ok()?))
        })
        .ok_or_else(|| {
            Failure::Other(format!(
                "cannot tell the version of {} from {:?}",
                program.display(),
                text.trim()
            ))
        })?;
    if has_restrict(version) {
        Ok(())
    } else {
        Err(Failure::Usage(format!(
            "{} is {}.{}, which lacks \\restrict (CVE-2025-8714): a restore with it could run a tampered dump's shell commands; install a newer minor release (13.22, 14.19, 15.14, 16.10, 17.6 or later)",
            program.display(),
            version.0,
            version.1
        )))
    }
}

/// How `pg_dump` and `pg_restore` reach the database: libpq's environment
/// variables, from the connection settings every other command uses (the
/// `DATABASE_URL`, or the embedded cluster's socket directory, port, service
/// role and database), so that they connect exactly where Tenantry does.
///
/// Everything goes into the child's environment and nothing onto its
/// command line: a command line is readable by every user of the machine
/// (`ps`, `/proc/PID/cmdline`), a process's environment only by its owner
/// and root (`/proc/PID/environ` is 0400), so a password in `DATABASE_URL`
/// stays private. Handing the URL over whole is not possible that way:
/// libpq expands a connection string given as `--dbname`, never one in
/// `PGDATABASE`.
pub fn libpq_conninfo(
    connector: &crate::db::Connector,
    application: &str,
) -> Result<Vec<(&'static str, OsString)>, String> {
    // Where the embedded cluster listens now; TLS as every connection.
    let config = &connector.current_config(connector.config());
    let ssl = connector.tls().params();
    let mut env: Vec<(&'static str, OsString)> = Vec::new();
    let join = |parts: Vec<String>| OsString::from(parts.join(","));
    if !config.get_hosts().is_empty() {
        let hosts = config
            .get_hosts()
            .iter()
            .map(|h| match h {
                Host::Tcp(name) => Ok(name.clone()),
                Host::Unix(path) => path
                    .to_str()
                    .map(str::to_owned)
                    .ok_or_else(|| format!("socket directory {} is not UTF-8", path.display())),
            })
            .collect::<Result<Vec<_>, _>>()?;
        env.push(("PGHOST", join(hosts)));
    }
    if !config.get_hostaddrs().is_empty() {
        let addrs = config.get_hostaddrs().iter().map(|a| a.to_string());
        env.push(("PGHOSTADDR", join(addrs.collect())));
    }
    if !config.get_ports().is_empty() {
        let ports = config.get_ports().iter().map(|p| p.to_string());
        env.push(("PGPORT", join(ports.collect())));
    }
    if let Some(user) = config.get_user() {
        env.push(("PGUSER", user.into()));
    }
    if let Some(password) = config.get_password() {
        env.push(("PGPASSWORD", OsString::from_vec(password.to_vec())));
    }
    if let Some(dbname) = config.get_dbname() {
        env.push(("PGDATABASE", dbname.into()));
    }
    if let Some(options) = config.get_options() {
        env.push(("PGOPTIONS", options.into()));
    }
    env.push(("PGAPPNAME", application.into()));
    env.push(("PGSSLMODE", ssl.mode.as_str().into()));
    match ssl.rootcert.as_deref() {
        // libpq knows `system` from PostgreSQL 16 on; older client programs
        // get the platform's bundle by its path.
        Some("system") => env.push((
            "PGSSLROOTCERT",
            SYSTEM_BUNDLES
                .iter()
                .find(|p| Path::new(p).is_file())
                .copied()
                .unwrap_or("system")
                .into(),
        )),
        Some(file) => env.push(("PGSSLROOTCERT", file.into())),
        None => {}
    }
    if let Some(cert) = &ssl.cert {
        env.push(("PGSSLCERT", cert.into()));
    }
    if let Some(key) = &ssl.key {
        env.push(("PGSSLKEY", key.into()));
    }
    if let Some(timeout) = config.get_connect_timeout() {
        // libpq counts whole seconds (and takes less than 2 as 2).
        env.push((
            "PGCONNECT_TIMEOUT",
            timeout.as_secs().max(1).to_string().into(),
        ));
    }
    match config.get_target_session_attrs() {
        TargetSessionAttrs::ReadWrite => env.push(("PGTARGETSESSIONATTRS", "read-write".into())),
        TargetSessionAttrs::ReadOnly => env.push(("PGTARGETSESSIONATTRS", "read-only".into())),
        _ => {}
    }
    match config.get_channel_binding() {
        ChannelBinding::Disable => env.push(("PGCHANNELBINDING", "disable".into())),
        ChannelBinding::Require => env.push(("PGCHANNELBINDING", "require".into())),
        _ => {}
    }
    if let LoadBalanceHosts::Random = config.get_load_balance_hosts() {
        env.push(("PGLOADBALANCEHOSTS", "random".into()));
    }
    Ok(env)
}

/// Where the platform keeps its CA bundle (Debian/Ubuntu, Fedora/RHEL,
/// Alpine/openSUSE).
const SYSTEM_BUNDLES: [&str; 3] = [
    "/etc/ssl/certs/ca-certificates.crt",
    "/etc/pki/tls/certs/ca-bundle.crt",
    "/etc/ssl/ca-bundle.pem",
];

/// What sizes the server's lock table, which one transaction (`pg_dump`'s,
/// the restore's) can fill at most: `max_locks_per_transaction`, and the
/// slots it is multiplied by (connections, prepared transactions and
/// background processes).
pub const LOCK_TABLE: &str = "
SELECT current_setting('max_locks_per_transaction')::int8,
       current_setting('max_connections')::int8
       + current_setting('max_prepared_transactions')::int8
       + current_setting('autovacuum_max_workers')::int8 + 1
       + current_setting('max_worker_processes')::int8
       + current_setting('max_wal_senders')::int8";

/// A client program with nothing inherited that could make it connect
/// elsewhere than Tenantry does: every `PG*` variable is removed, and
/// `env` (from [`libpq_conninfo`]) set. It runs in a process group of its
/// own, so a Ctrl-C at the terminal reaches this process only, which stops
/// it in an order that leaves nothing behind.
fn command(program: &Path, env: &[(&'static str, OsString)]) -> tokio::process::Command {
    let mut cmd = tokio::process::Command::new(program);
    for (key, _) in std::env::vars_os() {
        if key.to_str().is_some_and(|k| k.starts_with("PG")) {
            cmd.env_remove(&key);
        }
    }
    cmd.envs(env.iter().map(|(k, v)| (k, v)))
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .process_group(0)
        .kill_on_drop(true);
    cmd
}

fn spawn(
    cmd: &mut tokio::process::Command,
    program: &Path,
) -> Result<tokio::process::Child, Failure> {
    cmd.spawn()
        .map_err(|e| Failure::Other(format!("cannot run {}: {e}", program.display())))
}

/// A child's stderr, read to its end in the background (so it never
/// blocks on a full pipe).
fn collect(stderr: Option<tokio::process::ChildStderr>) -> tokio::task::JoinHandle<String> {
    tokio::spawn(async move {
        let mut text = Vec::new();
        if let Some(mut stderr) = stderr {
            let _ = stderr.read_to_end(&mut text).await;
        }
        String::from_utf8_lossy(&text).trim().to_owned()
    })
}

/// What a long step shows: a spinner with the time taken (and `output`'s
/// size) on a terminal, nothing otherwise (the caller prints a line per
/// phase).
struct Spinner(Option<indicatif::ProgressBar>);

impl Spinner {
    fn new(what: &str) -> Spinner {
        Spinner(std::io::stderr().is_terminal().then(|| {
            let spinner = indicatif::ProgressBar::new_spinner();
            spinner.set_style(
                indicatif::ProgressStyle::with_template("{spinner} {msg} ({elapsed})")
                    .expect("a valid template"),
            );
            spinner.set_message(what.to_owned());
            spinner.enable_steady_tick(Duration::from_millis(120));
            spinner
        }))
    }

    fn size(&self, what: &str, output: Option<&Path>) {
        if let (Some(spinner), Some(size)) = (&self.0, output.and_then(file_size)) {
            spinner.set_message(format!("{what}: {}", bytes(size)));
        }
    }
}

impl Drop for Spinner {
    fn drop(&mut self) {
        if let Some(spinner) = &self.0 {
            spinner.finish_and_clear();
        }
    }
}

fn failed(what: &str, program: &Path, status: std::process::ExitStatus, errors: &str) -> Failure {
    let hint = if errors.contains("max_locks_per_transaction") {
        "\n(it holds a lock on every table at once, in one transaction: raise \
         max_locks_per_transaction in the server's configuration and restart it; \
         see docs/backups.md)"
    } else {
        ""
    };
    Failure::Other(format!(
        "{what} failed ({} {status}):\n{errors}{hint}",
        program.display()
    ))
}

/// Run `program` with `args`, connecting with `env`. Its stderr is shown
/// when it fails (its warnings when it succeeds). Ctrl-C stops it and
/// returns an error, so the caller can clean up.
pub async fn run(
    program: &Path,
    args: &[OsString],
    env: &[(&'static str, OsString)],
    what: &str,
    output: Option<&Path>,
) -> Result<Duration, Failure> {
    let mut child = spawn(command(program, env).args(args), program)?;
    let errors = collect(child.stderr.take());
    let started = Instant::now();
    let spinner = Spinner::new(what);
    let mut tick = tokio::time::interval(Duration::from_millis(500));
    let status = loop {
        tokio::select! {
            status = child.wait() => break status,
            _ = tokio::signal::ctrl_c() => {
                let _ = child.kill().await;
                return Err(Failure::Other(format!("interrupted: {what} was stopped")));
            }
            _ = tick.tick() => spinner.size(what, output),
        }
    }
    .map_err(|e| Failure::Other(format!("{} did not finish: {e}", program.display())))?;
    drop(spinner);
    let errors = errors.await.unwrap_or_default();
    if !status.success() {
        return Err(failed(what, program, status, &errors));
    }
    if !errors.is_empty() {
        eprintln!("{errors}");
    }
    Ok(started.elapsed())
}

/// `pg_restore --list` of an archive: what is in it (and a first check
/// that this `pg_restore` reads it).
pub async fn list(pg_restore: &Path, archive: &Path) -> Result<String, Failure> {
    let mut cmd = command(pg_restore, &[]);
    cmd.arg("--list").arg(archive).stdout(Stdio::piped());
    let out = spawn(&mut cmd, pg_restore)?
        .wait_with_output()
        .await
        .map_err(|e| Failure::Other(format!("{} did not finish: {e}", pg_restore.display())))?;
    if !out.status.success() {
        return Err(failed(
            "reading the database dump",
            pg_restore,
            out.status,
            String::from_utf8_lossy(&out.stderr).trim(),
        ));
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Restore `archive` in ONE transaction with what must happen in it before
/// (`prelude`) and after (`postlude`): `pg_restore` turns the archive into
/// SQL, and `psql` runs `BEGIN`, the prelude, that SQL, the postlude and
/// `COMMIT`, fed by this process. The `COMMIT` is sent only once
/// `pg_restore` has finished well; whatever ends the input before it (a
/// failure, Ctrl-C, this process killed) leaves `psql` at the end of its
/// input inside the transaction, and its session's end rolls it back. (With
/// `psql --single-transaction` the end of the input would commit instead.)
pub async fn restore_in_one_transaction(
    pg_restore: &Path,
    psql: &Path,
    archive: &Path,
    env: &[(&'static str, OsString)],
    prelude: &str,
    postlude: &str,
) -> Result<Duration, Failure> {
    const WHAT: &str = "restoring the database";
    let mut convert = command(pg_restore, &[]);
    convert.arg("--file=-").arg(archive).stdout(Stdio::piped());
    let mut run = command(psql, env);
    run.args([
        "--no-psqlrc",
        "--quiet",
        "--no-password",
        "--set=ON_ERROR_STOP=1",
        "--file=-",
    ])
    .stdin(Stdio::piped());
    let mut converter = spawn(&mut convert, pg_restore)?;
    let mut runner = spawn(&mut run, psql)?;
    let converter_errors = collect(converter.stderr.take());
    let runner_errors = collect(runner.stderr.take());
    let mut sql = converter.stdout.take().expect("stdout is piped");
    let mut input = runner.stdin.take().expect("stdin is piped");
    let started = Instant::now();
    let spinner = Spinner::new(WHAT);

    let fed = async {
        input.write_all(b"BEGIN;\n").await?;
        input.write_all(prelude.as_bytes()).await?;
        tokio::io::copy(&mut sql, &mut input).await?;
        Ok::<_, std::io::Error>(())
    };
    let fed = tokio::select! {
        fed = fed => fed,
        _ = tokio::signal::ctrl_c() => {
            // No COMMIT: the transaction goes with psql's session.
            let _ = runner.kill().await;
            let _ = converter.kill().await;
            return Err(Failure::Other(format!("interrupted: {WHAT} was stopped; nothing was restored")));
        }
    };
    // pg_restore has written everything (or psql stopped reading).
    drop(sql);
    let converted = converter.wait().await;
    let converted_well = matches!(&converted, Ok(status) if status.success());
    let committed = if fed.is_ok() && converted_well {
        async {
            input.write_all(postlude.as_bytes()).await?;
            input.write_all(b"COMMIT;\n").await?;
            input.shutdown().await
        }
        .await
    } else {
        Ok(())
    };
    drop(input);
    let ran = runner.wait().await;
    drop(spinner);
    let runner_errors = runner_errors.await.unwrap_or_default();
    let converter_errors = converter_errors.await.unwrap_or_default();
    match ran {
        Ok(status) if !status.success() => return Err(failed(WHAT, psql, status, &runner_errors)),
        Err(e) => {
            return Err(Failure::Other(format!(
                "{} did not finish: {e}",
                psql.display()
            )))
        }
        Ok(_) => {}
    }
    match converted {
        Ok(status) if !status.success() => {
            return Err(failed(WHAT, pg_restore, status, &converter_errors))
        }
        Err(e) => {
            return Err(Failure::Other(format!(
                "{} did not finish: {e}",
                pg_restore.display()
            )))
        }
        Ok(_) => {}
    }
    if let Err(e) = fed.and(committed) {
        return Err(Failure::Other(format!(
            "{WHAT} failed: cannot feed {}: {e}",
            psql.display()
        )));
    }
    for errors in [converter_errors, runner_errors] {
        if !errors.is_empty() {
            eprintln!("{errors}");
        }
    }
    Ok(started.elapsed())
}

fn file_size(path: &Path) -> Option<u64> {
    std::fs::metadata(path).ok().map(|m| m.len())
}

/// "812 B", "3.4 MB", "1.2 GB".
pub fn bytes(n: u64) -> String {
    const UNITS: [&str; 4] = ["kB", "MB", "GB", "TB"];
    if n < 1000 {
        return format!("{n} B");
    }
    let mut value = n as f64 / 1000.0;
    let mut unit = 0;
    while value >= 1000.0 && unit < UNITS.len() - 1 {
        value /= 1000.0;
        unit += 1;
    }
    format!("{value:.1} {}", UNITS[unit])
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env_of(config: &str) -> Vec<(&'static str, String)> {
        let connector = crate::db::Connector::from_url(config).unwrap();
        libpq_conninfo(&connector, "tenantry backup")
            .unwrap()
            .into_iter()
            .map(|(k, v)| (k, v.into_string().unwrap()))
            .collect()
    }

    fn get<'a>(env: &'a [(&'static str, String)], key: &str) -> Option<&'a str> {
        env.iter().find(|(k, _)| *k == key).map(|(_, v)| v.as_str())
    }

    #[test]
    fn a_url_becomes_libpq_variables_with_the_password_among_them() {
        let env = env_of(
            "postgresql://svc:s%3Acret@db.example.com:6432/tenantry?sslmode=require&connect_timeout=7",
        );
        assert_eq!(get(&env, "PGHOST"), Some("db.example.com"));
        assert_eq!(get(&env, "PGPORT"), Some("6432"));
        assert_eq!(get(&env, "PGUSER"), Some("svc"));
        assert_eq!(get(&env, "PGPASSWORD"), Some("s:cret"));
        assert_eq!(get(&env, "PGDATABASE"), Some("tenantry"));
        assert_eq!(get(&env, "PGSSLMODE"), Some("require"));
        assert_eq!(get(&env, "PGCONNECT_TIMEOUT"), Some("7"));
        assert_eq!(get(&env, "PGAPPNAME"), Some("tenantry backup"));
    }

    #[test]
    fn only_client_programs_with_restrict_restore() {
        for ok in [(15, 14), (15, 20), (16, 10), (17, 6), (18, 0), (13, 22)] {
            assert!(has_restrict(ok), "{ok:?}");
        }
        for old in [(15, 13), (16, 9), (17, 5), (12, 22), (14, 18)] {
            assert!(!has_restrict(old), "{old:?}");
        }
    }

    #[test]
    fn the_tls_files_go_to_libpq_as_given() {
        // (With sslmode=disable the files are not read here.)
        let env = env_of(
            "host=db.example.com user=svc dbname=x sslmode=disable sslrootcert=/r/ca.pem sslcert=/k/c.pem sslkey=/k/k.pem",
        );
        assert_eq!(get(&env, "PGSSLMODE"), Some("disable"));
        assert_eq!(get(&env, "PGSSLROOTCERT"), Some("/r/ca.pem"));
        assert_eq!(get(&env, "PGSSLCERT"), Some("/k/c.pem"));
        assert_eq!(get(&env, "PGSSLKEY"), Some("/k/k.pem"));
        let env =
            env_of("host=db.example.com user=svc dbname=x sslmode=verify-full sslrootcert=system");
        assert_eq!(get(&env, "PGSSLMODE"), Some("verify-full"));
        let bundle = get(&env, "PGSSLROOTCERT").unwrap();
        assert!(
            bundle == "system" || Path::new(bundle).is_file(),
            "{bundle}"
        );
    }

    #[test]
    fn a_socket_and_several_hosts_are_kept() {
        let env = env_of("host=/tmp/run,db2 port=5432,5433 user=svc dbname=x");
        assert_eq!(get(&env, "PGHOST"), Some("/tmp/run,db2"));
        assert_eq!(get(&env, "PGPORT"), Some("5432,5433"));
        assert_eq!(get(&env, "PGPASSWORD"), None);
        assert_eq!(get(&env, "PGSSLMODE"), Some("prefer"));
        assert_eq!(
            get(
                &env_of("host=h dbname=x target_session_attrs=read-write"),
                "PGTARGETSESSIONATTRS"
            ),
            Some("read-write")
        );
    }

    #[test]
    fn sizes_read_well() {
        assert_eq!(bytes(812), "812 B");
        assert_eq!(bytes(3_400_000), "3.4 MB");
        assert_eq!(bytes(1_240_000_000), "1.2 GB");
    }
}
