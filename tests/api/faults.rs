//! Fault tests: the service killed with SIGKILL during a burst of signups,
//! PostgreSQL killed during a burst of requests.

use std::error::Error as _;
use std::time::Duration;

use serde_json::json;

use crate::helpers::*;

async fn serve(env: &[(&'static str, String)], port: u16) -> tokio::process::Child {
    let child = tokio::process::Command::new(env!("CARGO_BIN_EXE_tenantry"))
        .arg("serve")
        .env_clear()
        .env("PATH", std::env::var("PATH").unwrap_or_default())
        .envs(env.iter().cloned())
        .env("TENANTRY_BIND", format!("127.0.0.1:{port}"))
        .env("TENANTRY_RATE_LIMIT_AUTH", "0")
        .env("TENANTRY_RATE_LIMIT_ANON", "0")
        .env("TENANTRY_RATE_LIMIT_USER", "0")
        .env("BCRYPT_COST", "4")
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let api = reqwest::Client::new();
    for _ in 0..100 {
        if api
            .get(format!("http://127.0.0.1:{port}/health/live"))
            .send()
            .await
            .is_ok()
        {
            return child;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("serve did not come up");
}

#[tokio::test]
async fn a_service_killed_during_signups_leaves_every_201_usable_and_nothing_half_made() {
    let db = create_database().await;
    let env = cli_env(&db);
    let port = free_port();
    let mut child = serve(&env, port).await;
    let base = format!("http://127.0.0.1:{port}");
    let api = reqwest::Client::builder()
        .timeout(Duration::from_secs(10))
        .build()
        .unwrap();
    // A burst of signups; the service is killed (SIGKILL) as soon as three
    // of them have answered 201, with the rest in flight.
    let answered = std::sync::atomic::AtomicUsize::new(0);
    let signups = futures::future::join_all((0..40).map(|i| {
        let (api, base, answered) = (api.clone(), base.clone(), &answered);
        async move {
            let r = api
                .post(format!("{base}/api/auth/register"))
                .json(&json!({"username": format!("burst_{i}"), "email": format!("burst_{i}@example.com"), "password": PASSWORD}))
                .send()
                .await;
            let r = r.map(|r| r.status().as_u16()).map_err(|e| format!("{:?}", e.source()));
            if r.as_ref().ok() == Some(&201) {
                answered.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            }
            (i, r)
        }
    }));
    let kill = async {
        while answered.load(std::sync::atomic::Ordering::SeqCst) < 3 {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        child.start_kill().unwrap();
        child.wait().await.unwrap();
    };
    let (results, ()) = futures::join!(signups, kill);
    let created: Vec<u64> = results
        .iter()
        .filter(|(_, s)| s.as_ref().ok() == Some(&201))
        .map(|(i, _)| *i)
        .collect();
    assert!(
        !created.is_empty(),
        "some signups got through before the kill: {results:?}"
    );
    assert!(created.len() < 40, "the kill came during the burst");

    // Restart: every account that got a 201 logs in; nothing is half-made.
    let _child = serve(&env, port).await;
    for i in &created {
        let r = api
            .post(format!("{base}/api/auth/login"))
            .json(&json!({"username": format!("burst_{i}"), "password": PASSWORD}))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200, "burst_{i}");
    }
    let out = tenantry(&["fleet", "check"], &env, None).await;
    assert!(
        out.status.success(),
        "drift after the kill: {}{}",
        stdout(&out),
        stderr(&out)
    );
    let (users, tenants, schemas) = tenant_counts(&connect(&db).await).await;
    assert_eq!(users, tenants);
    assert_eq!(tenants, schemas);
    assert!(tenants >= created.len() as i64);
}

#[tokio::test]
async fn postgres_killed_during_a_burst_gives_only_503s_and_nothing_half_made() {
    // The embedded default on a cluster of its own (this test kills it): the
    // service follows the cluster to wherever it comes back.
    let dir = temp_dir("tenantry-killed");
    spawn_reaper(&dir);
    let mut settings = test_settings("unused");
    settings.database = tenantry::configuration::DatabaseTarget::Embedded;
    settings.data_dir = dir.clone();
    let app = spawn_app_on(settings, "tenantry".into()).await;
    let cluster = tenantry::embedded::Cluster::open(&dir).unwrap();
    let running = cluster.running().unwrap().expect("the service started it");
    let token = app.token("kim").await;

    let burst = futures::future::join_all((0..60).map(|i| {
        let app = &app;
        let token = token.clone();
        async move {
            tokio::time::sleep(Duration::from_millis(i * 10)).await;
            let r = if i % 2 == 0 {
                app.register(&format!("crash_{i}")).await
            } else {
                app.call(reqwest::Method::GET, "/api/experiences", &token)
                    .send()
                    .await
                    .unwrap()
            };
            r.status().as_u16()
        }
    }));
    let kill = async {
        tokio::time::sleep(Duration::from_millis(200)).await;
        nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(running.pid as i32),
            nix::sys::signal::Signal::SIGKILL,
        )
        .unwrap();
    };
    let (statuses, ()) = futures::join!(burst, kill);
    assert!(
        statuses.iter().all(|s| [200, 201, 503].contains(s)),
        "only successes and 503s: {statuses:?}"
    );
    assert!(
        statuses.contains(&503),
        "the kill came during the burst: {statuses:?}"
    );

    // PostgreSQL comes back (crash recovery, perhaps on another port); the
    // service recovers by itself and nothing is half-made.
    let mut back = None;
    for _ in 0..50 {
        match cluster.ensure_running(&[("fsync", "off")]) {
            Ok(r) => {
                back = Some(r);
                break;
            }
            Err(_) => tokio::time::sleep(Duration::from_millis(200)).await,
        }
    }
    let back = back.expect("the cluster restarts");
    let mut healthy = false;
    for _ in 0..100 {
        if app.get("/health").await.status() == 200 {
            healthy = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert!(
        healthy,
        "the service recovered: {}",
        app.get("/health").await.text().await.unwrap()
    );
    let check = tenantry::db::connect(&cluster.pg_config(&back, "tenantry"))
        .await
        .unwrap();
    let (users, tenants, schemas) = tenant_counts(&check).await;
    assert_eq!(
        (users, tenants),
        (tenants, schemas),
        "users, tenants and schemas agree"
    );
    let created = statuses.iter().filter(|s| **s == 201).count() as i64;
    assert!(
        tenants > created,
        "every 201 (and kim) is there: {tenants} vs {created}"
    );
    assert_eq!(
        app.call(reqwest::Method::GET, "/api/experiences", &token)
            .send()
            .await
            .unwrap()
            .status(),
        200
    );
    drop(check);
    let _ = cluster.stop();
}
