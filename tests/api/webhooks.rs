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
/// counts those), 204 otherwise; or, as [`Answer`] says, redirects every
/// request, or holds each (recorded as it arrives) until [`Receiver::answer`].
struct Receiver {
    got: Arc<Mutex<Vec<Received>>>,
    failing: Arc<AtomicBool>,
    refused: Arc<AtomicUsize>,
    held: Arc<tokio::sync::Semaphore>,
    handle: actix_web::dev::ServerHandle,
}

#[derive(Clone, Default)]
struct Answer {
    failing: bool,
    /// 307 to this URL.
    redirect_to: Option<String>,
    /// No answer until [`Receiver::answer`].
    held: bool,
}

impl Receiver {
    async fn start(port: u16, failing: bool) -> Receiver {
        Receiver::answering(
            port,
            Answer {
                failing,
                ..Default::default()
            },
        )
        .await
    }

    async fn answering(port: u16, answer: Answer) -> Receiver {
        let got: Arc<Mutex<Vec<Received>>> = Arc::default();
        let failing = Arc::new(AtomicBool::new(answer.failing));
        let refused = Arc::new(AtomicUsize::new(0));
        let held = Arc::new(tokio::sync::Semaphore::new(if answer.held {
            0
        } else {
            tokio::sync::Semaphore::MAX_PERMITS
        }));
        let (g, f, r, h) = (got.clone(), failing.clone(), refused.clone(), held.clone());
        let redirect_to = answer.redirect_to.clone();
        let server = HttpServer::new(move || {
            let (g, f, r, h) = (g.clone(), f.clone(), r.clone(), h.clone());
            let redirect_to = redirect_to.clone();
            App::new().default_service(web::to(move |req: HttpRequest, body: web::Bytes| {
                let (g, f, r, h) = (g.clone(), f.clone(), r.clone(), h.clone());
                let redirect_to = redirect_to.clone();
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
                    if let Some(to) = redirect_to {
                        r.fetch_add(1, Ordering::SeqCst);
                        return HttpResponse::TemporaryRedirect()
                            .insert_header(("location", to))
                            .finish();
                    }
                    g.lock().unwrap().push(Received {
                        id: header("webhook-id"),
                        timestamp: header("webhook-timestamp"),
                        signature: header("webhook-signature"),
                        body: body.to_vec(),
                    });
                    let _answer = h.acquire().await.unwrap();
                    HttpResponse::NoContent().finish()
                }
            }))
        })
        .workers(2)
        .bind(("127.0.0.1", port))
        .unwrap()
        .run();
        let handle = server.handle();
        tokio::spawn(server);
        Receiver {
            got,
            failing,
            refused,
            held,
            handle,
        }
    }

    /// One that holds every request (recorded as it arrives) until
    /// [`Receiver::answer`].
    async fn held(port: u16) -> Receiver {
        Receiver::answering(
            port,
            Answer {
                held: true,
                ..Default::default()
            },
        )
        .await
    }

    /// Answer the held requests, and every one after.
    fn answer(&self) {
        self.held
            .add_permits(tokio::sync::Semaphore::MAX_PERMITS - self.held.available_permits());
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

/// Events not yet delivered (with one endpoint: those not yet expanded
/// into a delivery, and the deliveries not delivered).
async fn undelivered(app: &TestApp) -> i64 {
    app.count(
        "SELECT (SELECT count(*) FROM tenantry.events WHERE NOT expanded)
              + (SELECT count(*) FROM tenantry.webhook_deliveries WHERE delivered_at IS NULL)",
    )
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

/// An endpoint's deliveries as `GET /admin/webhooks/{id}/deliveries` shows
/// them, newest first.
async fn deliveries(app: &TestApp, admin: &str, id: i64) -> Vec<Value> {
    let r = app
        .call(
            Method::GET,
            &format!("/admin/webhooks/{id}/deliveries?limit=100"),
            admin,
        )
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    serde_json::from_value(json(r).await).unwrap()
}

#[tokio::test]
async fn a_delivery_refused_every_time_goes_dead_holds_nothing_back_and_retry_sends_it_in_order() {
    let app = spawn_app_with(|s| s.webhooks.max_attempts = 2).await;
    let admin = admin_token(&app).await;
    let port = free_port();
    let receiver = Receiver::start(port, true).await;
    let (id, _) = endpoint(&app, &admin, port, Value::Null).await;

    // ada's two events each die after two attempts: the second is sent
    // only once the first is dead. bobo's one arrives once the receiver works.
    assert_eq!(app.register("ada").await.status(), 201);
    let r = app
        .call(Method::POST, "/admin/tenants/ada/suspend", &admin)
        .json(&json!({}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    until("both of ada's deliveries are dead", || async {
        deliveries(&app, &admin, id)
            .await
            .iter()
            .filter(|d| d["state"] == "dead")
            .count()
            == 2
    })
    .await;
    assert_eq!(
        receiver.refused.load(Ordering::SeqCst),
        4,
        "2 attempts each"
    );
    let dead = deliveries(&app, &admin, id).await;
    assert_eq!(dead[0]["type"], "tenant.suspended");
    assert_eq!(dead[1]["type"], "tenant.created");
    for d in &dead {
        assert_eq!(d["attempts"], 2, "{d}");
        assert_eq!(d["last_status"], 500, "{d}");
        assert_eq!(d["last_error"], "HTTP 500 Internal Server Error", "{d}");
        assert!(d["next_attempt_at"].is_null(), "{d}");
    }
    let listed = json(
        app.call(Method::GET, "/admin/webhooks", &admin)
            .send()
            .await
            .unwrap(),
    )
    .await;
    assert_eq!(
        (listed[0]["dead"].as_i64(), listed[0]["pending"].as_i64()),
        (Some(2), Some(0))
    );
    let metrics = app.get("/metrics").await.text().await.unwrap();
    assert!(
        metrics.contains("tenantry_webhook_deliveries{state=\"dead\"} 2"),
        "{metrics}"
    );
    assert!(
        metrics.contains("tenantry_webhook_deliveries{state=\"pending\"} 0"),
        "{metrics}"
    );
    let out = tenantry(&["webhooks", "list"], &cli_env(&app.db_name), None).await;
    assert!(stdout(&out).contains("127.0.0.1"), "{}", stdout(&out));

    receiver.failing.store(false, Ordering::SeqCst);
    assert_eq!(app.register("bobo").await.status(), 201);
    until("bobo's signup arrives", || async {
        receiver.of_type("tenant.created").len() == 1
    })
    .await;
    assert_eq!(receiver.got()[0].json()["data"]["username"], "bobo");

    // Retried over HTTP: ada's two come, in their order, and the retry is
    // in the audit log.
    let r = app
        .call(Method::POST, &format!("/admin/webhooks/{id}/retry"), &admin)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(json(r).await["retried"], 2);
    until("ada's events arrive", || async {
        receiver.got().len() == 3
    })
    .await;
    let ada: Vec<Value> = receiver.got()[1..].iter().map(Received::json).collect();
    assert_eq!(
        (ada[0]["type"].as_str(), ada[1]["type"].as_str()),
        (Some("tenant.created"), Some("tenant.suspended"))
    );
    assert_eq!(ada[0]["data"]["username"], "ada");
    until("nothing is left to deliver", || async {
        undelivered(&app).await == 0
    })
    .await;
    let audit = json(
        app.call(
            Method::GET,
            "/admin/audit?action=webhook_deliveries_retried",
            &admin,
        )
        .send()
        .await
        .unwrap(),
    )
    .await;
    assert_eq!(audit["items"][0]["details"]["deliveries"], 2, "{audit}");
    let missing = app
        .call(Method::POST, "/admin/webhooks/999/retry", &admin)
        .send()
        .await
        .unwrap();
    assert_eq!(missing.status(), 404);
    receiver.handle.stop(true).await;
}

#[tokio::test]
async fn redirects_are_not_followed_and_a_receiver_that_never_answers_times_out() {
    let app = spawn_app_with(|s| {
        s.webhooks.max_attempts = 1;
        s.webhooks.timeout = std::time::Duration::from_secs(1);
    })
    .await;
    let admin = admin_token(&app).await;
    // Where the redirect points: it must get nothing.
    let (elsewhere_port, redirecting_port) = (free_port(), free_port());
    let elsewhere = Receiver::start(elsewhere_port, false).await;
    let redirecting = Receiver::answering(
        redirecting_port,
        Answer {
            redirect_to: Some(format!("http://127.0.0.1:{elsewhere_port}/hooks")),
            ..Default::default()
        },
    )
    .await;
    // Accepts connections, never answers.
    let silent = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let silent_port = silent.local_addr().unwrap().port();
    let (redirected, _) = endpoint(&app, &admin, redirecting_port, Value::Null).await;
    let (timed_out, _) = endpoint(&app, &admin, silent_port, Value::Null).await;

    assert_eq!(app.register("cid").await.status(), 201);
    until("both deliveries are dead", || async {
        app.count("SELECT count(*) FROM tenantry.webhook_deliveries WHERE dead_at IS NOT NULL")
            .await
            == 2
    })
    .await;
    let d = &deliveries(&app, &admin, redirected).await[0];
    assert_eq!(d["last_status"], 307, "{d}");
    assert!(
        d["last_error"].as_str().unwrap().contains("redirect"),
        "{d}"
    );
    assert_eq!(redirecting.refused.load(Ordering::SeqCst), 1);
    assert!(elsewhere.got().is_empty(), "the redirect was not followed");
    let d = &deliveries(&app, &admin, timed_out).await[0];
    assert!(d["last_status"].is_null(), "{d}");
    assert_eq!(
        d["last_error"], "no answer in time (TENANTRY_WEBHOOK_TIMEOUT)",
        "{d}"
    );
    drop(silent);
    elsewhere.handle.stop(true).await;
    redirecting.handle.stop(true).await;
}

#[tokio::test]
async fn a_serve_stopped_mid_send_finishes_it_and_its_successor_sends_nothing_twice() {
    let db = create_database().await;
    let port = free_port();
    let receiver = Receiver::held(port).await;
    let dir = temp_dir("tenantry-webhooks-serve");
    let env = [("TENANTRY_DATA_DIR", dir.display().to_string())];
    let log = dir.join("first-serve.log");
    let (mut first, base) =
        serve_process_logging(&db, &env, std::fs::File::create(&log).unwrap().into()).await;
    let app = TestApp {
        address: base,
        db_name: db.clone(),
        api: reqwest::Client::new(),
    };
    let admin = admin_token(&app).await;
    endpoint(&app, &admin, port, json!(["tenant.created"])).await;
    for i in 0..5 {
        assert_eq!(app.register(&format!("stop{i}")).await.status(), 201);
    }
    until("the five are being sent, held by the receiver", || async {
        receiver.got().len() == 5
    })
    .await;

    // SIGTERM while five sends wait for their answers: once serve says its
    // sender is stopping they are answered; it records them before it
    // exits.
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(first.id().unwrap() as i32),
        nix::sys::signal::Signal::SIGTERM,
    )
    .unwrap();
    until("the sender is stopping, five sends under way", || async {
        std::fs::read_to_string(&log)
            .unwrap()
            .lines()
            .any(|l| l.contains("webhook delivery stopping") && l.contains("sends=5"))
    })
    .await;
    receiver.answer();
    assert!(first.wait().await.unwrap().success());
    assert_eq!(undelivered(&app).await, 0, "recorded as delivered");

    let (_second, base) = serve_process(&db, &env).await;
    let app = TestApp {
        address: base,
        ..app
    };
    for i in 5..8 {
        assert_eq!(app.register(&format!("stop{i}")).await.status(), 201);
    }
    until("the next three arrive", || async {
        receiver.got().len() >= 8
    })
    .await;
    until("nothing is left to deliver", || async {
        undelivered(&app).await == 0
    })
    .await;
    let got = receiver.got();
    let ids: HashSet<&str> = got.iter().map(|r| r.id.as_str()).collect();
    assert_eq!((got.len(), ids.len()), (8, 8), "each once: {got:?}");
    receiver.handle.stop(true).await;
}

#[tokio::test]
async fn a_delivered_event_is_forgotten_after_its_retention_and_changes_to_endpoints_are_audited() {
    let app = spawn_app_with(|s| {
        s.maintenance_interval = std::time::Duration::from_secs(1);
        s.mail.retention = std::time::Duration::ZERO;
    })
    .await;
    let admin = admin_token(&app).await;
    let port = free_port();
    let receiver = Receiver::start(port, false).await;
    let (id, _) = endpoint(&app, &admin, port, json!(["tenant.erased"])).await;
    let token = app.token("dora").await;
    app.erase_self(&token).await;
    until("the erasure arrives", || async {
        receiver.of_type("tenant.erased").len() == 1
    })
    .await;
    until("the outbox forgets dora", || async {
        app.count("SELECT count(*) FROM tenantry.events").await == 0
    })
    .await;
    let gone = app
        .call(Method::DELETE, &format!("/admin/webhooks/{id}"), &admin)
        .send()
        .await
        .unwrap();
    assert_eq!(gone.status(), 204);
    for action in ["webhook_added", "webhook_removed"] {
        let audit = json(
            app.call(
                Method::GET,
                &format!("/admin/audit?action={action}"),
                &admin,
            )
            .send()
            .await
            .unwrap(),
        )
        .await;
        assert_eq!(
            audit["items"][0]["details"]["endpoint"], id,
            "{action}: {audit}"
        );
    }
    receiver.handle.stop(true).await;
}

#[tokio::test]
async fn a_serve_killed_mid_send_leaves_the_delivery_to_the_next_which_sends_it_with_the_same_id() {
    let db = create_database().await;
    let port = free_port();
    let receiver = Receiver::held(port).await;
    // A claim holds for the attempt's timeout and 15 s.
    let env = [
        (
            "TENANTRY_DATA_DIR",
            temp_dir("tenantry-webhooks-kill").display().to_string(),
        ),
        ("TENANTRY_WEBHOOK_TIMEOUT", "1".to_string()),
    ];
    let (mut first, base) = serve_process(&db, &env).await;
    let app = TestApp {
        address: base,
        db_name: db.clone(),
        api: reqwest::Client::new(),
    };
    let admin = admin_token(&app).await;
    endpoint(&app, &admin, port, json!(["tenant.created"])).await;
    assert_eq!(app.register("kira").await.status(), 201);
    until("kira's event is being sent", || async {
        receiver.got().len() == 1
    })
    .await;
    first.kill().await.unwrap();
    first.wait().await.unwrap();
    receiver.answer();

    let (_second, _) = serve_process(&db, &env).await;
    until(
        "the next serve delivers it once the claim ran out",
        || async { undelivered(&app).await == 0 },
    )
    .await;
    let got = receiver.got();
    assert_eq!(got.len(), 2, "sent by both: {got:?}");
    assert_eq!(
        got[0].id, got[1].id,
        "with one webhook-id, to deduplicate on"
    );
    assert_eq!(got[1].json()["data"]["username"], "kira");
    receiver.handle.stop(true).await;
}
