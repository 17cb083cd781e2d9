//! Graceful shutdown of the real binary.

use std::time::Duration;

use reqwest::Method;

use crate::helpers::*;

#[tokio::test]
async fn sigterm_and_sigint_drain_requests_in_flight_then_exit_cleanly() {
    for signal in [
        nix::sys::signal::Signal::SIGTERM,
        nix::sys::signal::Signal::SIGINT,
    ] {
        let db = create_database().await;
        let port = free_port();
        let child = tokio::process::Command::new(env!("CARGO_BIN_EXE_tenantry"))
            .arg("serve")
            .env_clear()
            .env("PATH", std::env::var("PATH").unwrap_or_default())
            .envs(cli_env(&db))
            .env("TENANTRY_BIND", format!("127.0.0.1:{port}"))
            .env("TENANTRY_RATE_LIMIT_AUTH", "0")
            .env("BCRYPT_COST", "4")
            .env("RUST_LOG", "info")
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        let base = format!("http://127.0.0.1:{port}");
        let api = reqwest::Client::new();
        let mut up = false;
        for _ in 0..100 {
            if api.get(format!("{base}/health/live")).send().await.is_ok() {
                up = true;
                break;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        assert!(up, "serve came up");
        let signup: serde_json::Value = api
            .post(format!("{base}/api/auth/register"))
            .json(&serde_json::json!({"username": "sam", "email": "sam@example.com", "password": PASSWORD}))
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        let token = signup["access_token"].as_str().unwrap().to_owned();
        // A request held in flight: the test holds the tenant's lock.
        let holder = connect(&db).await;
        holder
            .batch_execute(&format!(
                "BEGIN; SELECT pg_advisory_xact_lock(1953395828, hashtext('{}'))",
                signup["user_id"].as_str().unwrap()
            ))
            .await
            .unwrap();
        let in_flight = api
            .request(Method::GET, format!("{base}/api/experiences"))
            .bearer_auth(&token)
            .send();
        let shutdown = async {
            tokio::time::sleep(Duration::from_millis(500)).await;
            nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(child.id().unwrap() as i32),
                signal,
            )
            .unwrap();
            tokio::time::sleep(Duration::from_millis(500)).await;
            // No new connections while draining.
            let refused = reqwest::Client::new()
                .get(format!("{base}/health/live"))
                .timeout(Duration::from_secs(2))
                .send()
                .await;
            holder.batch_execute("COMMIT").await.unwrap();
            refused
        };
        let (response, refused) = futures::join!(in_flight, shutdown);
        assert_eq!(
            response.unwrap().status(),
            200,
            "the request in flight finished"
        );
        assert!(
            refused.is_err(),
            "{signal}: a new connection after the signal was served"
        );
        let out = tokio::time::timeout(Duration::from_secs(20), child.wait_with_output())
            .await
            .expect("serve exits")
            .unwrap();
        let log = String::from_utf8_lossy(&out.stderr);
        assert!(out.status.success(), "{signal}: {log}");
        assert!(log.contains("shutting down"), "{log}");
        assert!(!log.contains("forced"), "{log}");
    }
}
