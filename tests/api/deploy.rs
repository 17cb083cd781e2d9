//! `deploy/tenantry.service` and `deploy/tenantry.env`, as README's
//! "Deploying" installs them: systemd accepts the unit, and `serve` runs with
//! exactly the environment it gives (secrets as credentials).

use std::collections::BTreeMap;
use std::path::Path;
use std::time::Duration;

use crate::helpers::*;

fn repo_file(path: &str) -> String {
    std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join(path)).unwrap()
}

/// `key=value` lines of one section of the unit (repeated keys kept).
fn section(unit: &str, name: &str) -> Vec<(String, String)> {
    let mut inside = false;
    let mut lines = Vec::new();
    for line in unit.lines().map(str::trim) {
        if line.starts_with('[') {
            inside = line == format!("[{name}]");
        } else if inside && !line.is_empty() && !line.starts_with('#') {
            let (k, v) = line.split_once('=').expect("key=value");
            lines.push((k.to_owned(), v.to_owned()));
        }
    }
    lines
}

fn values<'a>(lines: &'a [(String, String)], key: &str) -> Vec<&'a str> {
    lines
        .iter()
        .filter(|(k, _)| k == key)
        .map(|(_, v)| v.as_str())
        .collect()
}

/// Who `serve` runs as: the postgres OS user when the tests run as root
/// (an unprivileged service user, as the unit's `User=`), else the tests'
/// own user.
fn service_user() -> (u32, u32) {
    let me = nix::unistd::Uid::effective();
    if me.is_root() {
        let user = nix::unistd::User::from_name("postgres")
            .unwrap()
            .expect("the postgres OS user (the embedded cluster runs as it under root)");
        (user.uid.as_raw(), user.gid.as_raw())
    } else {
        (me.as_raw(), nix::unistd::Gid::effective().as_raw())
    }
}

/// The variables `tenantry --help` names.
async fn documented_variables() -> String {
    let help = tenantry(&["--help"], &[], None).await;
    stdout(&help)
}

#[tokio::test]
async fn the_systemd_unit_is_valid_and_runs_serve_with_its_environment() {
    let unit = repo_file("deploy/tenantry.service");
    let service = section(&unit, "Service");
    let exec = values(&service, "ExecStart");
    assert_eq!(exec, ["/usr/local/bin/tenantry serve"]);

    // systemd's own check, with the binary where the unit expects it
    // replaced by the one under test (verify wants it executable).
    let dir = temp_dir("tenantry-deploy");
    spawn_reaper(&dir);
    let analyze = std::process::Command::new("systemd-analyze")
        .arg("--version")
        .output();
    if analyze.is_ok_and(|o| o.status.success()) {
        let copy = dir.join("tenantry.service");
        std::fs::write(
            &copy,
            unit.replace("/usr/local/bin/tenantry", env!("CARGO_BIN_EXE_tenantry")),
        )
        .unwrap();
        let verify = std::process::Command::new("systemd-analyze")
            .arg("verify")
            .arg(&copy)
            .output()
            .unwrap();
        let said = String::from_utf8_lossy(&verify.stderr);
        assert!(verify.status.success(), "{said}");
        // Unknown keys and bad values are only warned about: none.
        assert!(!said.contains("tenantry.service:"), "{said}");
    } else {
        eprintln!(
            "systemd-analyze is not installed: the unit is checked by the rest of this test only"
        );
    }

    // Stopping: SIGTERM, with time for the drain; a usage error (exit 2)
    // is not restarted.
    assert_eq!(values(&service, "KillSignal"), ["SIGTERM"]);
    let stop: u64 = values(&service, "TimeoutStopSec")[0].parse().unwrap();
    assert!(
        stop > tenantry::startup::DRAIN_SECONDS + tenantry::startup::MAIL_STOP.as_secs(),
        "{stop}"
    );
    assert_eq!(values(&service, "RestartPreventExitStatus"), ["2"]);

    // The environment serve gets: the unit's, the env file's, the
    // credentials under %d; as an unprivileged user when the tests run as
    // root (the unit's User=; here the postgres OS user), with
    // /etc/tenantry as README's step 3 makes it: 0750, group of the
    // service's user, the CA of a TLS-only PostgreSQL in it (0644), the
    // secrets 0600 root (read by systemd, handed over as credentials).
    let (uid, gid) = service_user();
    let etc = dir.join("etc-tenantry");
    std::fs::create_dir(&etc).unwrap();
    std::os::unix::fs::chown(&etc, None, Some(gid)).unwrap();
    std::fs::set_permissions(&etc, std::os::unix::fs::PermissionsExt::from_mode(0o750)).unwrap();
    std::fs::copy(crate::smtp::cacert(), etc.join("db-ca.pem")).unwrap();
    std::fs::set_permissions(
        etc.join("db-ca.pem"),
        std::os::unix::fs::PermissionsExt::from_mode(0o644),
    )
    .unwrap();
    let db = crate::pg_tls::tls_database().await;
    let url = crate::pg_tls::conninfo(
        &db,
        &format!(
            "sslmode=verify-full sslrootcert={}",
            etc.join("db-ca.pem").display()
        ),
    );
    let credentials = dir.join("credentials");
    std::fs::create_dir(&credentials).unwrap();
    let data = dir.join("state");
    std::fs::create_dir(&data).unwrap();
    for owned in [&credentials, &data] {
        std::os::unix::fs::chown(owned, Some(uid), Some(gid)).unwrap();
        std::fs::set_permissions(owned, std::os::unix::fs::PermissionsExt::from_mode(0o700))
            .unwrap();
    }
    let sources = BTreeMap::from([
        ("/etc/tenantry/database_url", format!("{url}\n")),
        ("/etc/tenantry/jwt_secret", format!("{JWT_SECRET}\n")),
    ]);
    for credential in values(&service, "LoadCredential") {
        let (name, source) = credential.split_once(':').unwrap();
        let value = sources
            .get(source)
            .unwrap_or_else(|| panic!("a credential from {source}: add it to this test"));
        let file = credentials.join(name);
        std::fs::write(&file, value).unwrap();
        std::os::unix::fs::chown(&file, Some(uid), Some(gid)).unwrap();
        std::fs::set_permissions(&file, std::os::unix::fs::PermissionsExt::from_mode(0o400))
            .unwrap();
    }
    let substitute = |value: &str| {
        value
            .replace("%d", &credentials.display().to_string())
            .replace("/var/lib/tenantry", &data.display().to_string())
    };
    let mut env: Vec<(String, String)> = Vec::new();
    for assignment in values(&service, "Environment") {
        let (k, v) = assignment.split_once('=').unwrap();
        env.push((k.to_owned(), substitute(v)));
    }
    assert_eq!(
        values(&service, "EnvironmentFile"),
        ["/etc/tenantry/tenantry.env"]
    );
    for line in repo_file("deploy/tenantry.env").lines().map(str::trim) {
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let (k, v) = line.split_once('=').unwrap();
        env.push((k.to_owned(), v.to_owned()));
    }
    // Every variable set is one the binary knows.
    let help = documented_variables().await;
    for (name, _) in &env {
        let base = name.strip_suffix("_FILE").unwrap_or(name);
        assert!(help.contains(base), "{name} is not in `tenantry --help`");
    }
    assert!(env.iter().any(|(k, _)| k == "DATABASE_URL_FILE"));
    assert!(env.iter().any(|(k, _)| k == "JWT_SECRET_FILE"));
    let port = free_port();
    env.retain(|(k, _)| k != "TENANTRY_BIND");
    env.push(("TENANTRY_BIND".into(), format!("127.0.0.1:{port}")));
    env.push(("BCRYPT_COST".into(), "4".into()));

    // The binary where the service's user may run it (the checkout's
    // directories may be closed to it, as a clone in `mktemp -d` is).
    let binary = dir.join("tenantry");
    std::fs::copy(env!("CARGO_BIN_EXE_tenantry"), &binary).unwrap();
    std::fs::set_permissions(&binary, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
    let command = |extra: &[(&str, &str)]| {
        let mut command = tokio::process::Command::new(&binary);
        command
            .arg("serve")
            .env_clear()
            .env("PATH", std::env::var("PATH").unwrap_or_default())
            .envs(env.iter().map(|(k, v)| (k.clone(), v.clone())))
            .envs(extra.iter().map(|(k, v)| (*k, *v)))
            .uid(uid)
            .gid(gid)
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::piped())
            .kill_on_drop(true);
        command
    };
    let mut serve = command(&[]).spawn().unwrap();
    let client = reqwest::Client::new();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    loop {
        if let Some(status) = serve.try_wait().unwrap() {
            let mut said = String::new();
            use tokio::io::AsyncReadExt;
            serve
                .stderr
                .take()
                .unwrap()
                .read_to_string(&mut said)
                .await
                .unwrap();
            panic!("serve exited ({status}) with the unit's environment: {said}");
        }
        let health = client
            .get(format!("http://127.0.0.1:{port}/health"))
            .send()
            .await;
        if health.is_ok_and(|r| r.status() == 200) {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "serve never answered /health"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(serve.id().unwrap() as i32),
        nix::sys::signal::Signal::SIGTERM,
    )
    .unwrap();
    let status = tokio::time::timeout(Duration::from_secs(stop), serve.wait())
        .await
        .expect("serve stops within TimeoutStopSec")
        .unwrap();
    assert!(status.success(), "{status}");

    // A secret both in the environment and as a credential: exit 2, which
    // the unit does not restart.
    let twice = command(&[("JWT_SECRET", JWT_SECRET)])
        .output()
        .await
        .unwrap();
    assert_eq!(twice.status.code(), Some(2));
    assert!(
        String::from_utf8_lossy(&twice.stderr).contains("JWT_SECRET_FILE"),
        "{}",
        String::from_utf8_lossy(&twice.stderr)
    );
}
