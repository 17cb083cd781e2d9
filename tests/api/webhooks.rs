//! Webhooks: lifecycle events reach a real HTTP receiver (started here, on
//! loopback), signed as Standard Webhooks says, at least once, in order per
//! tenant, across a receiver that is down or failing and a `serve` restart;
//! a rolled-back change sends nothing.

use std::collections::HashSet;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use actix_web::{web, App, HttpRequest, HttpResponse, HttpServer};
use base64::Engine;
use hmac::{Hmac, Mac};
use reqwest::Method;
use serde_json::{json, Value};

use crate::helpers::*;

/// One request the receiver got.
#[derive(Debug, Clone)]
struct Received {
    id: String,
    timestamp: String,
    signature: String,
    body: Vec<u8>,
}

impl Received {
    fn json(&self) -> Value {
        serde_json::from_slice(&self.body).unwrap()
    }

    /// The Standard Webhooks check: `v1,` + base64 HMAC-SHA256 of
    /// `id.timestamp.body` keyed with the secret's base64-decoded bytes.
    fn signed_with(&self, secret: &str) -> bool {
        let b64 = base64::engine::general_purpose::STANDARD;
        let key = b64.decode(secret.strip_prefix("whsec_").unwrap()).unwrap();
        let mut mac = Hmac::<sha2::Sha256>::new_from_slice(&key).unwrap();
        mac.update(format!("{}.{}.", self.id, self.timestamp).as_bytes());
        mac.update(&self.body);
        let expected = format!("v1,{}", b64.encode(mac.finalize().into_bytes()));
        self.signature.split(' ').any(|s| s == expected)
    }
}

/// A receiver on `port` that answers 500 while `failing` is set (and
/// counts those), 204 otherwise.
struct Receiver {
    got: Arc<Mutex<Vec<Received>>>,
    failing: Arc<AtomicBool>,
    refused: Arc<AtomicUsize>,
    handle: actix_web::dev::ServerHandle,
}

impl Receiver {
    async fn start(port: u16, failing: bool) -> Receiver {
        let got: Arc<Mutex<Vec<Received>>> = Arc::default();
        let failing = Arc::new(AtomicBool::new(failing));
        let refused = Arc::new(AtomicUsize::new(0));
        let (g, f, r) = (got.clone(), failing.clone(), refused.clone());
        let server = HttpServer::new(move || {
            let (g, f, r) = (g.clone(), f.clone(), r.clone());
            App::new().default_service(web::to(move |req: HttpRequest, body: web::Bytes| {
                let (g, f, r) = (g.clone(), f.clone(), r.clone());
                async move {
                    let header = |name: &str| {
                        req.headers()
                            .get(name)
                            .and_then(|v| v.to_str().ok())
                            .unwrap_or("")
                            .to_owned()
                    };
                    if f.load(Ordering::SeqCst) {
                        r.fetch_add(1, Ordering::SeqCst);
                        return HttpResponse::InternalServerError().finish();
                    }
                    g.lock().unwrap().push(Received {
                        id: header("webhook-id"),
                        timestamp: header("webhook-timestamp"),
                        signature: header("webhook-signature"),
                        body: body.to_vec(),
                    });
                    HttpResponse::NoContent().finish()
                }
            }))
        })
        .workers(1)
        .bind(("127.0.0.1", port))
        .unwrap()
        .run();
        let handle = server.handle();
        tokio::spawn(server);
        Receiver {
            got,
            failing,
            refused,
            handle,
        }
    }

    fn got(&self) -> Vec<Received> {
        self.got.lock().unwrap().clone()
    }

    fn of_type(&self, kind: &str) -> Vec<Received> {
        self.got()
            .into_iter()
            .filter(|r| r.json()["type"] == kind)
            .collect()
    }
}

async fn add_webhook(app: &TestApp, admin: &str, body: Value) -> (u16, Value) {
    let response = app
        .call(Method::POST, "/admin/webhooks", admin)
        .json(&body)
        .send()
        .await
        .unwrap();
    let status = response.status().as_u16();
    (status, json(response).await)
}

/// An endpoint on `port` for `events` (all when null): its id and secret.
async fn endpoint(app: &TestApp, admin: &str, port: u16, events: Value) -> (i64, String) {
    let mut body = json!({ "url": format!("http://127.0.0.1:{port}/hooks") });
    if !events.is_null() {
        body["events"] = events;
    }
    let (status, added) = add_webhook(app, admin, body).await;
    assert_eq!(status, 201, "{added}");
    (
        added["id"].as_i64().unwrap(),
        added["secret"].as_str().unwrap().to_owned(),
    )
}

async fn undelivered(app: &TestApp) -> i64 {
    app.count("SELECT count(*) FROM tenantry.webhook_deliveries WHERE delivered_at IS NULL")
        .await
}

#[tokio::test]
async fn signups_made_while_the_receiver_is_down_all_arrive_once_signed_with_two_senders() {
    let app = spawn_app().await;
    let admin = admin_token(&app).await;
    let port = free_port();
    let (_, secret) = endpoint(&app, &admin, port, json!(["tenant.created"])).await;

    let names: Vec<String> = (0..20).map(|i| format!("hook{i:02}")).collect();
    for name in &names {
        assert_eq!(app.register(name).await.status(), 201);
    }
    until("an attempt failed: nothing listens", || async {
        app.count("SELECT count(*) FROM tenantry.webhook_deliveries WHERE last_error IS NOT NULL")
            .await
            > 0
    })
    .await;
    assert_eq!(undelivered(&app).await, 20);

    // A second serve starts on the database (the first keeps running: two
    // senders share the deliveries), then the receiver comes up.
    let again = spawn_app_on(test_settings(&app.db_name), app.db_name.clone()).await;
    let receiver = Receiver::start(port, false).await;
    until("every delivery is delivered", || async {
        undelivered(&again).await == 0
    })
    .await;
    let got = receiver.got();
    assert_eq!(got.len(), 20, "each once: {got:?}");
    let ids: HashSet<&str> = got.iter().map(|r| r.id.as_str()).collect();
    assert_eq!(ids.len(), 20, "20 distinct webhook-ids");
    let mut usernames: Vec<String> = Vec::new();
    for r in &got {
        assert!(r.signed_with(&secret), "a valid signature: {r:?}");
        assert!(!r.signed_with("whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"));
        let body = r.json();
        assert_eq!(body["type"], "tenant.created");
        assert!(body["timestamp"].is_string());
        assert!(body["data"]["user_id"].is_string());
        usernames.push(body["data"]["username"].as_str().unwrap().to_owned());
    }
    usernames.sort();
    assert_eq!(usernames, names);
    receiver.handle.stop(true).await;
}

#[tokio::test]
async fn a_failing_receiver_is_retried_and_events_come_in_order_per_tenant() {
    let app = spawn_app().await;
    let admin = admin_token(&app).await;
    let port = free_port();
    // Failing until all four changes are made: each event waits for the
    // tenant's earlier ones, whatever the timing.
    let receiver = Receiver::start(port, true).await;
    let (id, secret) = endpoint(&app, &admin, port, Value::Null).await;

    let token = app.token("olga").await;
    let (status, _) = {
        let r = app
            .call(Method::POST, "/admin/tenants/olga/suspend", &admin)
            .json(&json!({}))
            .send()
            .await
            .unwrap();
        (r.status().as_u16(), ())
    };
    assert_eq!(status, 200);
    let r = app
        .call(Method::POST, "/admin/tenants/olga/resume", &admin)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    app.erase_self(&token).await;
    until("the first event was refused twice", || async {
        receiver.refused.load(Ordering::SeqCst) >= 2
    })
    .await;
    assert_eq!(undelivered(&app).await, 4);
    receiver.failing.store(false, Ordering::SeqCst);
    until("olga's four events arrive", || async {
        receiver.got().len() == 4
    })
    .await;
    let kinds: Vec<String> = receiver
        .got()
        .iter()
        .map(|r| r.json()["type"].as_str().unwrap().to_owned())
        .collect();
    assert_eq!(
        kinds,
        [
            "tenant.created",
            "tenant.suspended",
            "tenant.resumed",
            "tenant.erased"
        ],
        "in the order they happened, the first one retried"
    );
    let erased = &receiver.of_type("tenant.erased")[0];
    assert!(erased.signed_with(&secret));
    assert_eq!(erased.json()["data"]["username"], "olga");
    assert!(erased.json()["data"]["user_id"].is_string());

    let out = tenantry(
        &["webhooks", "deliveries", &id.to_string(), "--json"],
        &cli_env(&app.db_name),
        None,
    )
    .await;
    assert!(out.status.success(), "{}", stderr(&out));
    let deliveries: Vec<Value> = serde_json::from_str(&stdout(&out)).unwrap();
    assert_eq!(deliveries.len(), 4);
    let first = deliveries.last().unwrap();
    assert_eq!(first["type"], "tenant.created");
    assert!(first["attempts"].as_i64().unwrap() >= 3, "{first}");
    assert_eq!(first["state"], "delivered");
    assert_eq!(first["last_status"], 204);
    receiver.handle.stop(true).await;
}

#[tokio::test]
async fn a_rolled_back_signup_sends_nothing_and_a_fleet_run_sends_its_events() {
    let app = spawn_app().await;
    let admin = admin_token(&app).await;
    let port = free_port();
    let receiver = Receiver::start(port, false).await;
    endpoint(&app, &admin, port, Value::Null).await;

    assert_eq!(app.register("pia").await.status(), 201);
    assert_eq!(
        app.register("pia").await.status(),
        409,
        "taken: rolled back"
    );
    assert_eq!(app.register("quin").await.status(), 201);
    until("two signups arrive", || async {
        receiver.of_type("tenant.created").len() == 2
    })
    .await;

    // A version added and rolled out: one tenant.migrated per tenant, one
    // fleet.run_finished.
    let templates = builtin_templates_with(&[(
        &format!("V{}__rating.sql", latest_version() + 1),
        "ALTER TABLE experiences ADD COLUMN rating integer NOT NULL DEFAULT 0;\n",
    )]);
    let mut env = cli_env(&app.db_name);
    env.push(("TENANTRY_TEMPLATES_DIR", templates.display().to_string()));
    let out = tenantry(&["fleet", "migrate"], &env, None).await;
    assert!(out.status.success(), "{}{}", stdout(&out), stderr(&out));
    until("the run's events arrive", || async {
        receiver.of_type("fleet.run_finished").len() == 1
            && receiver.of_type("tenant.migrated").len() == 2
    })
    .await;
    let migrated: Vec<Value> = receiver
        .of_type("tenant.migrated")
        .iter()
        .map(Received::json)
        .collect();
    for m in &migrated {
        assert_eq!(m["data"]["to_version"], latest_version() + 1, "{m}");
    }
    let finished = receiver.of_type("fleet.run_finished")[0].json();
    assert_eq!(finished["data"]["succeeded"], 2, "{finished}");
    assert_eq!(
        receiver.of_type("tenant.created").len(),
        2,
        "none for the rolled-back one"
    );
    receiver.handle.stop(true).await;
}

#[tokio::test]
async fn endpoints_are_checked_listed_and_removed() {
    let app = spawn_app().await;
    let admin = admin_token(&app).await;
    for (body, code) in [
        (json!({"url": "ftp://example.com/x"}), "invalid_url"),
        (json!({"url": "not a url"}), "invalid_url"),
        (json!({"url": "https://u:p@example.com/"}), "invalid_url"),
        (
            json!({"url": "https://example.com/", "events": ["tenant.nope"]}),
            "invalid_events",
        ),
        (
            json!({"url": "https://example.com/", "events": []}),
            "invalid_events",
        ),
    ] {
        let (status, error) = add_webhook(&app, &admin, body.clone()).await;
        assert_eq!(status, 400, "{body}: {error}");
        assert_eq!(error["error"]["code"], code, "{body}: {error}");
    }
    let user = app.token("rolf").await;
    let (status, _) = add_webhook(&app, &user, json!({"url": "https://example.com/"})).await;
    assert_eq!(status, 403);

    let (id, secret) = endpoint(&app, &admin, 9, json!(["tenant.erased"])).await;
    assert!(secret.starts_with("whsec_"));
    let listed = json(
        app.call(Method::GET, "/admin/webhooks", &admin)
            .send()
            .await
            .unwrap(),
    )
    .await;
    assert_eq!(listed[0]["id"], id);
    assert_eq!(listed[0]["events"], json!(["tenant.erased"]));
    assert!(listed[0].get("secret").is_none(), "never shown again");

    let env = cli_env(&app.db_name);
    for args in [
        &["webhooks", "add", "gopher://x"][..],
        &["webhooks", "add", "https://x.example", "--events", "nope"][..],
        &["webhooks", "deliveries", "1", "--limit", "0"][..],
    ] {
        let out = tenantry(args, &env, None).await;
        assert_eq!(out.status.code(), Some(2), "{args:?}: {}", stderr(&out));
    }
    let out = tenantry(&["webhooks", "list"], &env, None).await;
    assert!(
        stdout(&out).contains("127.0.0.1:9/hooks"),
        "{}",
        stdout(&out)
    );

    let gone = app
        .call(Method::DELETE, &format!("/admin/webhooks/{id}"), &admin)
        .send()
        .await
        .unwrap();
    assert_eq!(gone.status(), 204);
    let again = app
        .call(Method::DELETE, &format!("/admin/webhooks/{id}"), &admin)
        .send()
        .await
        .unwrap();
    assert_eq!(again.status(), 404);
    let out = tenantry(&["webhooks", "remove", &id.to_string()], &env, None).await;
    assert_eq!(out.status.code(), Some(1), "{}", stderr(&out));
}
