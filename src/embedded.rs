//! The embedded default: a private PostgreSQL cluster under the data dir.
//!
//! Layout of `TENANTRY_DATA_DIR`:
//! - `pgdata/`   the cluster (owned by the server's OS user, 0700)
//! - `run/`      its Unix socket and `postgres.log` (owned by the server's OS user, 0700)
//! - `cluster.lock` an advisory file lock held while starting or stopping, so
//!   two processes on the same data dir never race each other
//! - `pg_password`, `jwt_secret` generated secrets (0600)
//! - `port`       the port of the last start, tried first on the next one
//!
//! Everything here is blocking (it runs `initdb` and `pg_ctl`); async callers
//! go through `spawn_blocking`.

use std::fs::{self, DirBuilder, File, OpenOptions};
use std::io::{Read, Write};
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::{Duration, Instant};

/// Name of the database Tenantry uses inside the embedded cluster.
pub const DATABASE_NAME: &str = "tenantry";
/// The cluster's bootstrap superuser: used only to create the service role
/// and its database (and to adopt a database made by an older version).
pub const SUPERUSER: &str = "postgres";
/// The role `serve` and the CLI connect as: LOGIN, CREATEROLE, owner of the
/// `tenantry` database and schemas, not a superuser. Not `tenantry`: with the
/// default `search_path` (`"$user", public`) that name would make the
/// control-plane schema resolve unqualified.
pub const SERVICE_ROLE: &str = "tenantry_service";

/// The first line of [`PRIVATE_LOG_SETTINGS`], by which a configuration
/// that has them is recognised.
const PRIVATE_LOG_MARKER: &str = "# tenantry: keep personal data out of the server log";

/// What keeps usernames and emails out of `postgres.log`, which outlives an
/// erasure: no DETAIL lines (`Key (username)=(…) already exists`), no
/// statement text or parameters, no per-table autovacuum lines (they name
/// tenant schemas). Errors keep their one-line message, which may name a
/// schema or role (docs/gdpr.md, "Personal data in logs"). Only settings that every
/// supported PostgreSQL knows (an unknown one stops the server starting).
const PRIVATE_LOG_SETTINGS: &str = "
# tenantry: keep personal data out of the server log
log_error_verbosity = terse
log_min_error_statement = panic
log_statement = 'none'
log_min_duration_statement = -1
log_lock_waits = off
log_autovacuum_min_duration = -1
";

#[derive(Debug, thiserror::Error)]
pub enum ClusterError {
    #[error(
        "no PostgreSQL server binaries found (looked for pg_ctl and initdb on PATH, in `pg_config --bindir` \
         and under /usr/lib/postgresql/*/bin); install them (Debian/Ubuntu: `apt-get install postgresql`, \
         Fedora: `dnf install postgresql-server`, macOS: `brew install postgresql@16`) or set DATABASE_URL"
    )]
    NoBinaries,
    #[error(
        "running as root, but PostgreSQL refuses to run as root and there is no `postgres` OS user to run it as; \
         create one (`useradd --system postgres`) or run tenantry as a normal user"
    )]
    NoServerUser,
    #[error(
        "the `{user}` OS user, which runs the embedded PostgreSQL, cannot reach {dir} (a parent directory is not \
         searchable by it, as with a checkout under /root); set TENANTRY_DATA_DIR to a directory it can reach \
         (e.g. /var/lib/tenantry or /tmp/tenantry) or make the parents searchable (chmod o+x)"
    )]
    Unreachable { user: String, dir: PathBuf },
    #[error("the data dir path {0} is too long for a Unix socket; set TENANTRY_DATA_DIR to a shorter path")]
    PathTooLong(PathBuf),
    #[error("{what} failed: {detail}")]
    Command { what: String, detail: String },
    #[error("{context}: {source}")]
    Io {
        context: String,
        #[source]
        source: std::io::Error,
    },
}

fn io_err(context: impl Into<String>) -> impl FnOnce(std::io::Error) -> ClusterError {
    let context = context.into();
    move |source| ClusterError::Io { context, source }
}

/// The OS user the server runs as when we are root.
#[derive(Debug, Clone)]
struct ServerUser {
    name: String,
    uid: u32,
    gid: u32,
}

/// A private cluster under a data dir (not necessarily running).
#[derive(Debug, Clone)]
pub struct Cluster {
    data_dir: PathBuf,
    bindir: PathBuf,
    user: Option<ServerUser>,
}

/// A running cluster as found in its `postmaster.pid`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Running {
    pub pid: u32,
    pub port: u16,
    pub socket_dir: PathBuf,
    /// True when this call started the server (so this process should stop it).
    pub started_here: bool,
}

impl Cluster {
    /// Find the server binaries and the OS user, and make sure the data dir
    /// exists. Starts nothing.
    pub fn open(data_dir: &Path) -> Result<Cluster, ClusterError> {
        let bindir = find_bindir().ok_or(ClusterError::NoBinaries)?;
        let user = if nix::unistd::geteuid().is_root() {
            let u = nix::unistd::User::from_name(SUPERUSER)
                .ok()
                .flatten()
                .ok_or(ClusterError::NoServerUser)?;
            Some(ServerUser {
                name: u.name,
                uid: u.uid.as_raw(),
                gid: u.gid.as_raw(),
            })
        } else {
            None
        };
        if !data_dir.exists() {
            // 0711: the server's OS user may pass through, but not list.
            DirBuilder::new()
                .recursive(true)
                .mode(0o711)
                .create(data_dir)
                .map_err(io_err(format!(
                    "cannot create data dir {}",
                    data_dir.display()
                )))?;
        }
        let data_dir = data_dir.canonicalize().map_err(io_err(format!(
            "cannot resolve data dir {}",
            data_dir.display()
        )))?;
        let cluster = Cluster {
            data_dir,
            bindir,
            user,
        };
        let socket = cluster.run_dir().join(".s.PGSQL.65535");
        if socket.as_os_str().len() > 100 {
            return Err(ClusterError::PathTooLong(cluster.data_dir.clone()));
        }
        Ok(cluster)
    }

    pub fn data_dir(&self) -> &Path {
        &self.data_dir
    }

    pub fn bindir(&self) -> &Path {
        &self.bindir
    }

    fn pgdata(&self) -> PathBuf {
        self.data_dir.join("pgdata")
    }

    fn run_dir(&self) -> PathBuf {
        self.data_dir.join("run")
    }

    pub fn log_file(&self) -> PathBuf {
        self.run_dir().join("postgres.log")
    }

    /// Take the data dir's lock for the duration of a start or stop.
    fn lock(&self) -> Result<File, ClusterError> {
        let path = self.data_dir.join("cluster.lock");
        let file = OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .mode(0o600)
            .open(&path)
            .map_err(io_err(format!("cannot open {}", path.display())))?;
        file.lock()
            .map_err(io_err(format!("cannot lock {}", path.display())))?;
        Ok(file)
    }

    /// Start the cluster (running `initdb` first if it has never been
    /// initialised), or reuse it when it is already running. `settings` are
    /// extra `-c name=value` server settings for a start by this call.
    pub fn ensure_running(&self, settings: &[(&str, &str)]) -> Result<Running, ClusterError> {
        let _lock = self.lock()?;
        if !self.pgdata().join("PG_VERSION").exists() {
            self.init()?;
        }
        if let Some(running) = self.running()? {
            return Ok(running);
        }
        // A free loopback port can be taken between our probe and the
        // server's bind; try a few.
        let mut last = None;
        for attempt in 0..5 {
            // The port of the last start when it is still free, so that
            // clients holding the old address find the server again.
            let port = match self.last_port().filter(|_| attempt == 0) {
                Some(port) if port_is_free(port) => port,
                _ => free_port()?,
            };
            match self.start(port, settings) {
                Ok(()) => {
                    let mut running = self.wait_ready()?;
                    running.started_here = true;
                    let _ = fs::write(self.data_dir().join("port"), running.port.to_string());
                    tracing::info!(port = running.port, socket = %running.socket_dir.display(), "embedded PostgreSQL started");
                    return Ok(running);
                }
                Err(e) => {
                    // e.g. the port was taken, or the old server's children
                    // are still exiting after a crash.
                    last = Some(e);
                    std::thread::sleep(Duration::from_millis(500));
                }
            }
        }
        Err(last.expect("at least one attempt"))
    }

    fn last_port(&self) -> Option<u16> {
        fs::read_to_string(self.data_dir().join("port"))
            .ok()?
            .trim()
            .parse()
            .ok()
    }

    /// The running server, if any. A `postmaster.pid` left behind by a crash
    /// (its process gone, or the pid reused by something else) is removed.
    pub fn running(&self) -> Result<Option<Running>, ClusterError> {
        let pidfile = self.pgdata().join("postmaster.pid");
        let mut text = String::new();
        match File::open(&pidfile) {
            Ok(mut f) => {
                f.read_to_string(&mut text)
                    .map_err(io_err(format!("cannot read {}", pidfile.display())))?;
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(io_err(format!("cannot read {}", pidfile.display()))(e)),
        }
        let lines: Vec<&str> = text.lines().collect();
        let Some(pid) = lines.first().and_then(|l| l.trim().parse::<u32>().ok()) else {
            // Still being written by a server that is starting up.
            return Ok(None);
        };
        match process_state(pid) {
            // Stale after a crash or kill -9, the process reaped. PostgreSQL
            // itself takes over a pid file whose process is gone, and checks
            // its shared memory interlock on the way, so leave the file to it.
            None => return Ok(None),
            // Dead but unreaped (a zombie: in containers nobody may reap it),
            // or the pid now belongs to an unrelated process. PostgreSQL
            // would refuse to start ("lock file already exists"), so take
            // the stale file away; `start` waits for any orphaned backends.
            Some(state) if state == 'Z' || state == 'X' || !is_postgres_process(pid) => {
                tracing::warn!(pidfile = %pidfile.display(), pid, "removing stale postmaster.pid");
                let _ = fs::remove_file(&pidfile);
                return Ok(None);
            }
            Some(_) => {}
        }
        let port = lines.get(3).and_then(|l| l.trim().parse().ok());
        let socket_dir = lines.get(4).map(|l| PathBuf::from(l.trim()));
        match (port, socket_dir) {
            (Some(port), Some(socket_dir)) => Ok(Some(Running {
                pid,
                port,
                socket_dir,
                started_here: false,
            })),
            // Still being written by a server that is starting up.
            _ => Ok(None),
        }
    }

    /// Stop the server if it runs. Returns whether there was one.
    pub fn stop(&self) -> Result<bool, ClusterError> {
        let _lock = self.lock()?;
        if self.running()?.is_none() {
            return Ok(false);
        }
        let out = self
            .command("pg_ctl")
            .arg("stop")
            .arg("-D")
            .arg(self.pgdata())
            .args(["-m", "fast", "-w", "-t", "60", "-s"])
            .output()
            .map_err(io_err("cannot run pg_ctl"))?;
        check(out, "pg_ctl stop")?;
        tracing::info!("embedded PostgreSQL stopped");
        Ok(true)
    }

    /// Superuser connection settings for the running server, over its Unix
    /// socket.
    pub fn pg_config(&self, running: &Running, dbname: &str) -> tokio_postgres::Config {
        self.pg_config_as(running, dbname, SUPERUSER)
    }

    /// Connection settings for `user`, over the Unix socket.
    pub fn pg_config_as(
        &self,
        running: &Running,
        dbname: &str,
        user: &str,
    ) -> tokio_postgres::Config {
        socket_config(&running.socket_dir, running.port, dbname, user)
    }

    /// Connection settings for `user` to wherever the server listens now,
    /// read from its pid file (a restarted cluster may have another port):
    /// `None` while it is down. Cheap, and without side effects.
    pub fn current_config(&self, dbname: &str, user: &str) -> Option<tokio_postgres::Config> {
        let text = fs::read_to_string(self.pgdata().join("postmaster.pid")).ok()?;
        let mut lines = text.lines().skip(3);
        let port = lines.next()?.trim().parse().ok()?;
        let socket_dir = PathBuf::from(lines.next()?.trim());
        Some(socket_config(&socket_dir, port, dbname, user))
    }

    /// A connection string `psql` accepts, as the service role.
    pub fn url(&self, running: &Running, dbname: &str) -> String {
        format!(
            "postgresql://{SERVICE_ROLE}@/{dbname}?host={}&port={}",
            percent_encode(&running.socket_dir.to_string_lossy()),
            running.port
        )
    }

    fn init(&self) -> Result<(), ClusterError> {
        self.check_reachable()?;
        for dir in [self.pgdata(), self.run_dir()] {
            DirBuilder::new()
                .recursive(true)
                .mode(0o700)
                .create(&dir)
                .map_err(io_err(format!("cannot create {}", dir.display())))?;
            fs::set_permissions(&dir, fs::Permissions::from_mode(0o700))
                .map_err(io_err(format!("cannot chmod {}", dir.display())))?;
            if let Some(u) = &self.user {
                std::os::unix::fs::chown(&dir, Some(u.uid), Some(u.gid))
                    .map_err(io_err(format!("cannot chown {}", dir.display())))?;
            }
        }
        // The superuser gets a password for TCP connections on the loopback
        // port; the Unix socket (in a 0700 directory) trusts its OS user.
        let password = generated_secret(&self.data_dir.join("pg_password"))?;
        let pwfile = self.run_dir().join("initdb.pw");
        write_private(&pwfile, &password, self.user.as_ref())?;
        let out = self
            .command("initdb")
            .arg("-D")
            .arg(self.pgdata())
            .args([
                "-U",
                SUPERUSER,
                "-E",
                "UTF8",
                "--no-locale",
                "--auth-local=trust",
                "--auth-host=scram-sha-256",
                "--no-instructions",
            ])
            .arg(format!("--pwfile={}", pwfile.display()))
            .output()
            .map_err(io_err("cannot run initdb"));
        let _ = fs::remove_file(&pwfile);
        check(out?, "initdb")?;
        let conf = self.pgdata().join("postgresql.conf");
        let mut f = OpenOptions::new()
            .append(true)
            .open(&conf)
            .map_err(io_err(format!("cannot open {}", conf.display())))?;
        writeln!(
            f,
            "\n# added by tenantry\nlisten_addresses = '127.0.0.1'\nunix_socket_directories = '{}'\nmax_connections = 200\n",
            self.run_dir().display().to_string().replace('\'', "''")
        )
        .map_err(io_err(format!("cannot write {}", conf.display())))?;
        tracing::info!(pgdata = %self.pgdata().display(), "initialised embedded PostgreSQL cluster");
        Ok(())
    }

    /// Add [`PRIVATE_LOG_SETTINGS`] to the server's configuration unless it
    /// has them (a cluster initialised before they existed gets them at its
    /// next start). Later lines win, so they are appended; an operator may
    /// edit them afterwards.
    fn ensure_private_log_settings(&self) -> Result<(), ClusterError> {
        let conf = self.pgdata().join("postgresql.conf");
        let text =
            fs::read_to_string(&conf).map_err(io_err(format!("cannot read {}", conf.display())))?;
        if text.contains(PRIVATE_LOG_MARKER) {
            return Ok(());
        }
        let mut f = OpenOptions::new()
            .append(true)
            .open(&conf)
            .map_err(io_err(format!("cannot open {}", conf.display())))?;
        f.write_all(PRIVATE_LOG_SETTINGS.as_bytes())
            .map_err(io_err(format!("cannot write {}", conf.display())))
    }

    fn start(&self, port: u16, settings: &[(&str, &str)]) -> Result<(), ClusterError> {
        self.ensure_private_log_settings()?;
        self.wait_for_orphans();
        let mut opts = format!("-p {port}");
        for (name, value) in settings {
            let simple = |s: &str| {
                !s.is_empty()
                    && s.chars()
                        .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '.')
            };
            if !simple(name) || !simple(value) {
                return Err(ClusterError::Command {
                    what: "pg_ctl start".into(),
                    detail: format!("unsupported server setting {name}={value}"),
                });
            }
            opts.push_str(&format!(" -c {name}={value}"));
        }
        let out = self
            .command("pg_ctl")
            .arg("start")
            .arg("-D")
            .arg(self.pgdata())
            .arg("-l")
            .arg(self.log_file())
            .args(["-w", "-t", "60", "-s", "-o", &opts])
            .output()
            .map_err(io_err("cannot run pg_ctl"))?;
        check(out, "pg_ctl start").map_err(|e| match e {
            ClusterError::Command { what, detail } => ClusterError::Command {
                what,
                detail: format!("{detail}\n{}", tail(&self.log_file(), 15)),
            },
            other => other,
        })
    }

    fn wait_ready(&self) -> Result<Running, ClusterError> {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Some(r) = self.running()? {
                if r.socket_dir.join(format!(".s.PGSQL.{}", r.port)).exists() {
                    return Ok(r);
                }
            }
            if Instant::now() > deadline {
                return Err(ClusterError::Command {
                    what: "pg_ctl start".into(),
                    detail: format!(
                        "server did not become ready\n{}",
                        tail(&self.log_file(), 15)
                    ),
                });
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// After a crash, backends of the dead server may still be exiting; a
    /// new server must not run beside them. They all have the data dir as
    /// their working directory.
    fn wait_for_orphans(&self) {
        let pgdata = self.pgdata();
        let deadline = Instant::now() + Duration::from_secs(15);
        while Instant::now() < deadline {
            let busy = fs::read_dir("/proc")
                .map(|entries| {
                    entries.filter_map(|e| e.ok()).any(|e| {
                        e.file_name()
                            .to_str()
                            .is_some_and(|n| n.bytes().all(|b| b.is_ascii_digit()))
                            && fs::read_link(e.path().join("cwd")).is_ok_and(|cwd| cwd == pgdata)
                            && process_state(
                                e.file_name().to_str().unwrap_or("0").parse().unwrap_or(0),
                            )
                            .is_some_and(|s| s != 'Z' && s != 'X')
                    })
                })
                .unwrap_or(false);
            if !busy {
                return;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// When a different OS user runs the server, it must be able to reach
    /// the data dir; say so plainly instead of letting initdb fail obscurely.
    fn check_reachable(&self) -> Result<(), ClusterError> {
        let Some(u) = &self.user else { return Ok(()) };
        let ok = Command::new("test")
            .arg("-x")
            .arg(&self.data_dir)
            .uid(u.uid)
            .gid(u.gid)
            .current_dir("/")
            .status()
            .map(|s| s.success())
            .unwrap_or(false);
        if ok {
            Ok(())
        } else {
            Err(ClusterError::Unreachable {
                user: u.name.clone(),
                dir: self.data_dir.clone(),
            })
        }
    }

    /// A server command, run as the server's OS user when we are root.
    pub fn command(&self, program: &str) -> Command {
        let mut cmd = Command::new(self.bindir.join(program));
        cmd.current_dir("/").env_remove("PGDATA").env("LC_ALL", "C");
        if let Some(u) = &self.user {
            // std drops supplementary groups when it changes the uid.
            cmd.uid(u.uid).gid(u.gid);
        }
        cmd
    }
}

/// Read a generated secret, creating it (0600) on first use.
pub fn generated_secret(path: &Path) -> Result<String, ClusterError> {
    match fs::read_to_string(path) {
        Ok(s) if !s.trim().is_empty() => return Ok(s.trim().to_owned()),
        Ok(_) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(io_err(format!("cannot read {}", path.display()))(e)),
    }
    // The first command on a new data dir may need the secret before the
    // cluster (which makes the dir) is started.
    if let Some(dir) = path
        .parent()
        .filter(|d| !d.as_os_str().is_empty() && !d.exists())
    {
        DirBuilder::new()
            .recursive(true)
            .mode(0o711)
            .create(dir)
            .map_err(io_err(format!("cannot create data dir {}", dir.display())))?;
    }
    use rand::Rng;
    let bytes: [u8; 32] = rand::rng().random();
    let secret = hex::encode(bytes);
    write_private(path, &secret, None)?;
    Ok(secret)
}

fn write_private(
    path: &Path,
    content: &str,
    owner: Option<&ServerUser>,
) -> Result<(), ClusterError> {
    let mut f = OpenOptions::new()
        .create(true)
        .truncate(true)
        .write(true)
        .mode(0o600)
        .open(path)
        .map_err(io_err(format!("cannot write {}", path.display())))?;
    f.write_all(content.as_bytes())
        .map_err(io_err(format!("cannot write {}", path.display())))?;
    if let Some(u) = owner {
        std::os::unix::fs::chown(path, Some(u.uid), Some(u.gid))
            .map_err(io_err(format!("cannot chown {}", path.display())))?;
    }
    Ok(())
}

fn check(out: Output, what: &str) -> Result<(), ClusterError> {
    if out.status.success() {
        Ok(())
    } else {
        Err(ClusterError::Command {
            what: what.into(),
            detail: format!(
                "{}\n{}",
                String::from_utf8_lossy(&out.stderr).trim(),
                String::from_utf8_lossy(&out.stdout).trim()
            )
            .trim()
            .to_owned(),
        })
    }
}

fn tail(path: &Path, n: usize) -> String {
    let text = fs::read_to_string(path).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    let start = lines.len().saturating_sub(n);
    format!(
        "server log ({}):\n{}",
        path.display(),
        lines[start..].join("\n")
    )
}

/// The state letter of a process (`R`, `S`, `Z`, …), or `None` if it is gone.
fn process_state(pid: u32) -> Option<char> {
    let stat = fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // "pid (comm) S …": the state follows the last parenthesis.
    stat.rsplit_once(')')?.1.trim_start().chars().next()
}

fn is_postgres_process(pid: u32) -> bool {
    fs::read_to_string(format!("/proc/{pid}/comm"))
        .map(|c| c.trim().starts_with("postgres") || c.trim().starts_with("postmaster"))
        .unwrap_or(false)
}

fn socket_config(socket_dir: &Path, port: u16, dbname: &str, user: &str) -> tokio_postgres::Config {
    let mut config = tokio_postgres::Config::new();
    config
        .host_path(socket_dir)
        .port(port)
        .user(user)
        .dbname(dbname)
        .application_name("tenantry");
    config
}

fn port_is_free(port: u16) -> bool {
    std::net::TcpListener::bind(("127.0.0.1", port)).is_ok()
}

fn free_port() -> Result<u16, ClusterError> {
    let listener =
        std::net::TcpListener::bind("127.0.0.1:0").map_err(io_err("cannot find a free port"))?;
    Ok(listener
        .local_addr()
        .map_err(io_err("cannot find a free port"))?
        .port())
}

fn percent_encode(s: &str) -> String {
    let mut out = String::new();
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || b"-._~".contains(&b) {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// The programs of a server installation.
const SERVER_TOOLS: [&str; 3] = ["pg_ctl", "initdb", "postgres"];

/// Where the server binaries are: PATH, then `pg_config --bindir`, then the
/// newest `/usr/lib/postgresql/*/bin`.
pub fn find_bindir() -> Option<PathBuf> {
    find_bindir_in(std::env::var_os("PATH"), Path::new("/usr/lib/postgresql"))
}

/// A PostgreSQL client program (`pg_dump`, `pg_restore`), looked for where
/// [`find_bindir`] looks for the server's: a machine with only the client
/// package installed has no server binaries beside it.
pub fn find_tool(name: &str) -> Option<PathBuf> {
    find_dir_with(
        std::env::var_os("PATH"),
        Path::new("/usr/lib/postgresql"),
        &[name],
    )
    .map(|dir| dir.join(name))
}

fn find_bindir_in(path: Option<std::ffi::OsString>, versions_root: &Path) -> Option<PathBuf> {
    find_dir_with(path, versions_root, &SERVER_TOOLS)
}

/// The first directory holding all of `tools` (the first of them decides
/// which entries of PATH are looked at).
fn find_dir_with(
    path: Option<std::ffi::OsString>,
    versions_root: &Path,
    tools: &[&str],
) -> Option<PathBuf> {
    let has_tools = |dir: &Path| tools.iter().all(|b| dir.join(b).is_file());
    let dirs: Vec<PathBuf> = path
        .map(|p| std::env::split_paths(&p).collect())
        .unwrap_or_default();
    for dir in &dirs {
        let first = dir.join(tools[0]);
        if first.is_file() {
            // Follow symlinks (e.g. /usr/local/bin/pg_ctl) to the real bindir.
            if let Some(real) = first
                .canonicalize()
                .ok()
                .and_then(|p| p.parent().map(Path::to_path_buf))
            {
                if has_tools(&real) {
                    return Some(real);
                }
            }
            if has_tools(dir) {
                return Some(dir.clone());
            }
        }
    }
    if let Some(pg_config) = dirs
        .iter()
        .map(|d| d.join("pg_config"))
        .find(|p| p.is_file())
    {
        if let Ok(out) = Command::new(pg_config).arg("--bindir").output() {
            let dir = PathBuf::from(String::from_utf8_lossy(&out.stdout).trim());
            if out.status.success() && has_tools(&dir) {
                return Some(dir);
            }
        }
    }
    let mut versions: Vec<(u32, PathBuf)> = fs::read_dir(versions_root)
        .ok()?
        .filter_map(|e| e.ok())
        .filter_map(|e| {
            let v: u32 = e.file_name().to_str()?.parse().ok()?;
            let bin = e.path().join("bin");
            has_tools(&bin).then_some((v, bin))
        })
        .collect();
    versions.sort();
    versions.pop().map(|(_, dir)| dir)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fake_bindir(dir: &Path) {
        fs::create_dir_all(dir).unwrap();
        for tool in ["pg_ctl", "initdb", "postgres"] {
            fs::write(dir.join(tool), "").unwrap();
        }
    }

    #[test]
    fn the_newest_installed_version_is_found_when_path_has_none() {
        let root = std::env::temp_dir().join(format!("tenantry-bindir-{}", std::process::id()));
        for v in ["9", "14", "16", "not-a-version"] {
            fake_bindir(&root.join("lib").join(v).join("bin"));
        }
        let empty = root.join("empty");
        fs::create_dir_all(&empty).unwrap();
        let found = find_bindir_in(Some(empty.clone().into_os_string()), &root.join("lib"));
        assert_eq!(found, Some(root.join("lib/16/bin")));

        // PATH wins over the versioned directories.
        fake_bindir(&root.join("onpath"));
        let found = find_bindir_in(
            Some(root.join("onpath").into_os_string()),
            &root.join("lib"),
        );
        assert_eq!(found, Some(root.join("onpath")));

        // Nothing anywhere: none, and the error says how to install them.
        assert_eq!(
            find_bindir_in(Some(empty.into_os_string()), &root.join("nowhere")),
            None
        );
        assert!(ClusterError::NoBinaries
            .to_string()
            .contains("apt-get install postgresql"));
        fs::remove_dir_all(&root).unwrap();
    }

    #[test]
    fn a_client_program_is_found_without_the_server_beside_it() {
        let root = std::env::temp_dir().join(format!("tenantry-tool-{}", std::process::id()));
        let client_only = root.join("client");
        fs::create_dir_all(&client_only).unwrap();
        fs::write(client_only.join("pg_dump"), "").unwrap();
        fake_bindir(&root.join("lib/15/bin"));
        fs::write(root.join("lib/15/bin/pg_restore"), "").unwrap();
        let path = Some(client_only.clone().into_os_string());
        let versions = root.join("lib");
        assert_eq!(
            find_dir_with(path.clone(), &versions, &["pg_dump"]),
            Some(client_only.clone())
        );
        // Not where only a client is: the server's programs are looked for.
        assert_eq!(
            find_bindir_in(path.clone(), &versions),
            Some(root.join("lib/15/bin"))
        );
        assert_eq!(
            find_dir_with(path, &versions, &["pg_restore"]),
            Some(root.join("lib/15/bin"))
        );
        fs::remove_dir_all(&root).unwrap();
    }

    #[test]
    fn socket_paths_are_percent_encoded_for_urls() {
        assert_eq!(percent_encode("/tmp/a b/run"), "%2Ftmp%2Fa%20b%2Frun");
    }
}
