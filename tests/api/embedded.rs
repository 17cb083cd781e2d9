//! The embedded default, through the CLI: no DATABASE_URL, a data dir of
//! its own per test.

use std::time::Duration;

use serde_json::Value;

use crate::helpers::*;

fn embedded_env(dir: &std::path::Path) -> Vec<(&'static str, String)> {
    vec![("TENANTRY_DATA_DIR", dir.display().to_string())]
}

/// A data dir of its own, removed when the test process exits, and its
/// cluster stopped when the test ends, even when it failed half-way.
struct DataDir {
    path: std::path::PathBuf,
    env: Vec<(&'static str, String)>,
}

fn data_dir(prefix: &str) -> DataDir {
    let path = temp_dir(prefix);
    spawn_reaper(&path);
    let env = embedded_env(&path);
    DataDir { path, env }
}

impl Drop for DataDir {
    fn drop(&mut self) {
        let _ = std::process::Command::new(env!("CARGO_BIN_EXE_tenantry"))
            .args(["db", "stop"])
            .env_clear()
            .env("PATH", std::env::var("PATH").unwrap_or_default())
            .envs(self.env.iter().map(|(k, v)| (*k, v.clone())))
            .output();
    }
}

/// `tenantry serve` on the embedded cluster of `dir`, listening on `port`.
fn spawn_serve(dir: &std::path::Path, port: u16) -> tokio::process::Child {
    tokio::process::Command::new(env!("CARGO_BIN_EXE_tenantry"))
        .arg("serve")
        .env_clear()
        .env("PATH", std::env::var("PATH").unwrap_or_default())
        .env("TENANTRY_DATA_DIR", dir)
        .env("TENANTRY_BIND", format!("127.0.0.1:{port}"))
        .env("BCRYPT_COST", "4")
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap()
}

fn pid_of(out: &std::process::Output) -> String {
    let text = stdout(out);
    let start = text.find("pid ").expect("a pid") + 4;
    text[start..].split(',').next().unwrap().to_string()
}

#[tokio::test]
async fn the_embedded_cluster_starts_is_reused_and_keeps_data_across_restarts() {
    let data = data_dir("tenantry-embedded");
    let env = data.env.clone();

    let first = tenantry(&["db", "start"], &env, None).await;
    assert!(first.status.success(), "{}", stderr(&first));
    assert!(stdout(&first).starts_with("started"), "{}", stdout(&first));
    let second = tenantry(&["db", "start"], &env, None).await;
    assert!(stdout(&second).starts_with("already running"));
    assert_eq!(pid_of(&first), pid_of(&second));

    let status = tenantry(&["db", "status"], &env, None).await;
    assert!(stdout(&status).starts_with("running"));
    assert_eq!(status.status.code(), Some(0));

    // `db url` prints something psql accepts.
    let url = tenantry(&["db", "url"], &env, None).await;
    let url = stdout(&url).trim().to_string();
    let psql = CLUSTER.cluster.bindir().join("psql");
    let out = std::process::Command::new(psql)
        .args([url.as_str(), "-Atc", "SELECT current_database()"])
        .output()
        .unwrap();
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).trim(),
        "tenantry",
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    let created = tenantry(
        &["tenants", "create", "rosa", "--email", "rosa@example.com"],
        &env,
        Some(PASSWORD),
    )
    .await;
    assert!(created.status.success(), "{}", stderr(&created));

    let stopped = tenantry(&["db", "stop"], &env, None).await;
    assert_eq!(stdout(&stopped).trim(), "stopped");
    let status = tenantry(&["db", "status"], &env, None).await;
    assert_eq!(stdout(&status).trim(), "stopped");
    assert_eq!(
        status.status.code(),
        Some(3),
        "pg_ctl's convention for stopped"
    );

    // Any command that needs the database starts it again; the data is kept.
    let list = tenantry(&["tenants", "list", "--json"], &env, None).await;
    assert!(list.status.success(), "{}", stderr(&list));
    assert!(
        stderr(&list).contains("started the embedded PostgreSQL"),
        "a command that starts the server says so: {}",
        stderr(&list)
    );
    let list: Value = serde_json::from_str(&stdout(&list)).unwrap();
    assert_eq!(list[0]["username"], "rosa");
    let again = tenantry(&["tenants", "list", "--json"], &env, None).await;
    assert!(!stderr(&again).contains("started"), "{}", stderr(&again));
}

#[tokio::test]
async fn a_stale_postmaster_pid_after_a_crash_is_handled() {
    let data = data_dir("tenantry-crash");
    let env = data.env.clone();
    let dir = &data.path;

    let started = tenantry(&["db", "start"], &env, None).await;
    assert!(started.status.success(), "{}", stderr(&started));
    let pid: i32 = pid_of(&started).parse().unwrap();
    // Crash: the postmaster dies without removing postmaster.pid.
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(pid),
        nix::sys::signal::Signal::SIGKILL,
    )
    .unwrap();
    while std::path::Path::new(&format!("/proc/{pid}/stat")).exists()
        && !std::fs::read_to_string(format!("/proc/{pid}/stat"))
            .unwrap_or_default()
            .contains(" Z ")
    {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(dir.join("pgdata/postmaster.pid").exists());

    let list = tenantry(&["tenants", "list"], &env, None).await;
    assert!(list.status.success(), "{}", stderr(&list));
    assert_eq!(stdout(&list).trim(), "no tenants");
    let status = tenantry(&["db", "status"], &env, None).await;
    assert!(stdout(&status).starts_with("running"));
    assert_ne!(pid_of(&status), pid.to_string());
}

#[tokio::test]
async fn two_processes_starting_at_once_share_one_cluster() {
    let data = data_dir("tenantry-race");
    let env = data.env.clone();

    let (a, b) = tokio::join!(
        tenantry(&["system", "migrate"], &env, None),
        tenantry(&["system", "migrate"], &env, None)
    );
    assert!(a.status.success(), "{}", stderr(&a));
    assert!(b.status.success(), "{}", stderr(&b));
    let status = tenantry(&["db", "status"], &env, None).await;
    assert!(stdout(&status).starts_with("running"));
}

#[tokio::test]
async fn serve_stops_the_cluster_it_started_on_sigterm() {
    let data = data_dir("tenantry-serve");
    let env = data.env.clone();
    let dir = &data.path;
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();

    let mut serve = spawn_serve(dir, port);
    let client = reqwest::Client::new();
    let mut healthy = false;
    for _ in 0..300 {
        if let Ok(r) = client
            .get(format!("http://127.0.0.1:{port}/health"))
            .send()
            .await
        {
            healthy = r.status() == 200;
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(healthy, "serve never became healthy");

    // It generated its JWT secret, private to its user.
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(dir.join("jwt_secret"))
        .unwrap()
        .permissions()
        .mode();
    assert_eq!(mode & 0o777, 0o600);

    let registered = client
        .post(format!("http://127.0.0.1:{port}/api/auth/register"))
        .json(&serde_json::json!({"username": "sam", "email": "sam@example.com", "password": PASSWORD}))
        .send()
        .await
        .unwrap();
    assert_eq!(registered.status(), 201);

    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(serve.id().unwrap() as i32),
        nix::sys::signal::Signal::SIGTERM,
    )
    .unwrap();
    let status = tokio::time::timeout(Duration::from_secs(60), serve.wait())
        .await
        .expect("serve exits after SIGTERM")
        .unwrap();
    assert!(status.success());
    let db_status = tenantry(&["db", "status"], &env, None).await;
    assert_eq!(stdout(&db_status).trim(), "stopped");
}

#[tokio::test]
async fn db_commands_refuse_to_manage_a_database_url() {
    let out = tenantry(
        &["db", "stop"],
        &[
            ("DATABASE_URL", "host=/nonexistent user=x".into()),
            ("JWT_SECRET", JWT_SECRET.into()),
        ],
        None,
    )
    .await;
    assert_eq!(out.status.code(), Some(2));
    assert!(stderr(&out).contains("DATABASE_URL is set"));
}

#[tokio::test]
async fn a_private_data_dir_is_explained_as_root_and_works_as_its_owner() {
    let outer = temp_dir("tenantry-private");
    spawn_reaper(&outer);
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&outer, std::fs::Permissions::from_mode(0o700)).unwrap();
    let env = embedded_env(&outer.join("data"));
    let out = tenantry(&["db", "start"], &env, None).await;
    if nix::unistd::geteuid().is_root() {
        // Root hands the cluster to the `postgres` OS user, which cannot
        // reach a directory private to root: explained, nothing started.
        assert_eq!(out.status.code(), Some(1));
        assert!(stderr(&out).contains("cannot reach"), "{}", stderr(&out));
        assert!(stderr(&out).contains("TENANTRY_DATA_DIR"));
    } else {
        // Anyone else runs the cluster as themselves: their private dir works.
        assert!(out.status.success(), "{}", stderr(&out));
        let stopped = tenantry(&["db", "stop"], &env, None).await;
        assert!(stopped.status.success(), "{}", stderr(&stopped));
    }
}

#[tokio::test]
async fn serve_refuses_a_busy_port_without_leaving_a_cluster_running() {
    let data = data_dir("tenantry-busy");
    let mut env = data.env.clone();
    let busy = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    env.push(("TENANTRY_BIND", busy.local_addr().unwrap().to_string()));

    let out = tenantry(&["serve"], &env, None).await;
    assert_eq!(out.status.code(), Some(1));
    assert!(
        stderr(&out).contains("cannot listen on"),
        "{}",
        stderr(&out)
    );
    let status = tenantry(&["db", "status"], &env, None).await;
    assert_eq!(stdout(&status).trim(), "stopped");
}

#[tokio::test]
async fn serve_stops_the_cluster_it_started_when_startup_fails_later() {
    let data = data_dir("tenantry-badstart");
    let mut env = data.env.clone();
    // A cluster whose `tenantry` database refuses connections: the cluster
    // starts, then the bootstrap fails.
    let started = tenantry(&["db", "start"], &env, None).await;
    assert!(started.status.success(), "{}", stderr(&started));
    let url = stdout(&tenantry(&["db", "url"], &env, None).await)
        .trim()
        .to_string();
    let psql = CLUSTER.cluster.bindir().join("psql");
    let admin_url = url.replace("/tenantry?", "/postgres?");
    let out = std::process::Command::new(&psql)
        .args([
            admin_url.as_str(),
            "-c",
            "ALTER DATABASE tenantry ALLOW_CONNECTIONS false",
        ])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let stopped = tenantry(&["db", "stop"], &env, None).await;
    assert_eq!(stdout(&stopped).trim(), "stopped");

    env.push(("TENANTRY_BIND", "127.0.0.1:0".into()));
    let out = tenantry(&["serve"], &env, None).await;
    assert_eq!(out.status.code(), Some(1));
    assert!(
        stderr(&out).contains("not currently accepting connections"),
        "{}",
        stderr(&out)
    );
    let status = tenantry(&["db", "status"], &env, None).await;
    assert_eq!(stdout(&status).trim(), "stopped");
}

/// `db stop` / `db start` while `serve` runs: serve recovers, and on its way
/// out leaves the server that `db start` started running.
#[tokio::test]
async fn serve_survives_a_cluster_restart_and_leaves_the_new_server_running() {
    let data = data_dir("tenantry-restart");
    let env = data.env.clone();
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let mut serve = spawn_serve(&data.path, port);
    let client = reqwest::Client::builder()
        .timeout(Duration::from_secs(20))
        .build()
        .unwrap();
    let health = || client.get(format!("http://127.0.0.1:{port}/health")).send();
    let mut up = false;
    for _ in 0..300 {
        if let Ok(r) = health().await {
            up = r.status() == 200;
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(up, "serve never became healthy");

    let stop = tenantry(&["db", "stop"], &env, None).await;
    assert!(stop.status.success());
    assert!(
        stderr(&stop).contains("running `tenantry serve`"),
        "db stop under a running service says so: {}",
        stderr(&stop)
    );
    let down = health().await.expect("an answer, not a hang");
    assert_eq!(down.status(), 503);
    assert!(down.headers().contains_key("retry-after"));
    assert!(tenantry(&["db", "start"], &env, None)
        .await
        .status
        .success());
    let mut back = false;
    for _ in 0..40 {
        if health().await.is_ok_and(|r| r.status() == 200) {
            back = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    assert!(back, "serve found the restarted cluster");

    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(serve.id().unwrap() as i32),
        nix::sys::signal::Signal::SIGTERM,
    )
    .unwrap();
    tokio::time::timeout(Duration::from_secs(60), serve.wait())
        .await
        .expect("serve exits after SIGTERM")
        .unwrap();
    let status = tenantry(&["db", "status"], &env, None).await;
    assert!(
        stdout(&status).starts_with("running"),
        "{}",
        stdout(&status)
    );
}
