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
    // credentials under %d.
    let credentials = dir.join("credentials");
    std::fs::create_dir(&credentials).unwrap();
    let data = dir.join("state");
    let db = create_database().await;
    let sources = BTreeMap::from([
        (
            "/etc/tenantry/database_url",
            format!("{}\n", service_url(&db)),
        ),
        ("/etc/tenantry/jwt_secret", format!("{JWT_SECRET}\n")),
    ]);
    for credential in values(&service, "LoadCredential") {
        let (name, source) = credential.split_once(':').unwrap();
        let value = sources
            .get(source)
            .unwrap_or_else(|| panic!("a credential from {source}: add it to this test"));
        std::fs::write(credentials.join(name), value).unwrap();
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
    std::fs::create_dir_all(&data).unwrap();
    let port = free_port();
    env.retain(|(k, _)| k != "TENANTRY_BIND");
    env.push(("TENANTRY_BIND".into(), format!("127.0.0.1:{port}")));
    env.push(("BCRYPT_COST".into(), "4".into()));

    let command = |extra: &[(&str, &str)]| {
        let mut command = tokio::process::Command::new(env!("CARGO_BIN_EXE_tenantry"));
        command
            .arg("serve")
            .env_clear()
            .env("PATH", std::env::var("PATH").unwrap_or_default())
            .envs(env.iter().map(|(k, v)| (k.clone(), v.clone())))
            .envs(extra.iter().map(|(k, v)| (*k, *v)))
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::piped())
            .kill_on_drop(true);
        command
    };
    let mut serve = command(&[]).spawn().unwrap();
    let client = reqwest::Client::new();
    until("serve answers /health", || async {
        client
            .get(format!("http://127.0.0.1:{port}/health"))
            .send()
            .await
            .is_ok_and(|r| r.status() == 200)
    })
    .await;
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
