//! Accounts over real mail (issue 21): the service sends to a real SMTP
//! server on loopback (`smtp::SmtpSink`, aiosmtpd), and the tests read what
//! it received: verification, password reset, email change, and the
//! outbox's delivery through outages, refusals, restarts and two senders.

use std::time::Duration;

use reqwest::Method;
use serde_json::{json, Value};
use tenantry::configuration::{SecretString, Settings};

use crate::helpers::*;
use crate::smtp::{token_in, SinkOptions, SinkTls, SmtpSink};

const MAIL_WAIT: Duration = Duration::from_secs(30);

/// Settings that send to `sink`, retrying fast.
fn via(sink: &SmtpSink) -> impl FnOnce(&mut Settings) + '_ {
    move |s: &mut Settings| {
        s.mail.smtp_url = Some(SecretString::new(sink.url()));
        s.mail.backoff = Duration::from_millis(50);
    }
}

async fn post(app: &TestApp, path: &str, body: Value) -> reqwest::Response {
    app.post_json(path, &body).await
}

async fn signup(app: &TestApp, name: &str) -> Value {
    let response = app.register(name).await;
    assert_eq!(response.status(), 201, "register {name}");
    json(response).await
}

async fn sql(app: &TestApp, statement: &str) {
    app.db().await.batch_execute(statement).await.unwrap();
}

async fn resend_verification(app: &TestApp, tokens: &Value) -> reqwest::Response {
    app.call(
        Method::POST,
        "/api/auth/resend-verification",
        access(tokens),
    )
    .send()
    .await
    .unwrap()
}

async fn reset(app: &TestApp, token: &str, new_password: &str) -> reqwest::Response {
    post(
        app,
        "/api/auth/reset-password",
        json!({"token": token, "new_password": new_password}),
    )
    .await
}

async fn login(app: &TestApp, username: &str, password: &str) -> reqwest::Response {
    post(
        app,
        "/api/auth/login",
        json!({"username": username, "password": password}),
    )
    .await
}

fn access(tokens: &Value) -> &str {
    tokens["access_token"].as_str().unwrap()
}

async fn audit_actions(app: &TestApp) -> Vec<String> {
    app.db()
        .await
        .query("SELECT action FROM tenantry.audit_log ORDER BY seq", &[])
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect()
}

#[tokio::test]
async fn signup_mails_a_link_that_verifies_the_address_once() {
    let sink = SmtpSink::start().await;
    let app = spawn_app_with(via(&sink)).await;
    let tokens = signup(&app, "vera").await;
    let me = json(
        app.call(Method::GET, "/api/me", access(&tokens))
            .send()
            .await
            .unwrap(),
    )
    .await;
    assert_eq!(me["email_verified"], false);

    let mail = sink
        .wait_for_mail_to("vera@example.com", "Confirm your email", MAIL_WAIT)
        .await;
    assert!(mail.body.contains("/verify-email?token="), "{}", mail.body);
    let token = token_in(&mail.body);
    // Unverified accounts use their tenant meanwhile.
    let listed = app
        .call(Method::GET, "/api/experiences", access(&tokens))
        .send()
        .await
        .unwrap();
    assert_eq!(listed.status(), 200);

    let verified = post(&app, "/api/auth/verify-email", json!({"token": token})).await;
    assert_eq!(verified.status(), 200);
    let body = json(verified).await;
    assert_eq!(body["email_verified"], true);
    let me = json(
        app.call(Method::GET, "/api/me", access(&tokens))
            .send()
            .await
            .unwrap(),
    )
    .await;
    assert_eq!(me["email_verified"], true);

    let again = post(&app, "/api/auth/verify-email", json!({"token": token})).await;
    assert_eq!(again.status(), 400);
    assert_eq!(json(again).await["error"]["code"], "invalid_token");
    for bad in ["", "nonsense", &"x".repeat(300)] {
        let r = post(&app, "/api/auth/verify-email", json!({"token": bad})).await;
        assert_eq!(r.status(), 400, "{bad:?}");
    }
    assert!(audit_actions(&app)
        .await
        .contains(&"email_verified".to_owned()));
    // Delivered: the row keeps no body (it carried the token).
    assert_eq!(
        app.count(
            "SELECT count(*) FROM tenantry.outbox WHERE delivered_at IS NOT NULL AND body IS NULL"
        )
        .await,
        1
    );
}

#[tokio::test]
async fn an_expired_verification_link_is_refused_and_resending_is_throttled() {
    let sink = SmtpSink::start().await;
    let app = spawn_app_with(via(&sink)).await;
    let tokens = signup(&app, "ellis").await;
    let first = sink
        .wait_for_mail_to("ellis@example.com", "Confirm", MAIL_WAIT)
        .await;
    sql(
        &app,
        "UPDATE tenantry.account_tokens SET expires_at = now() - interval '1 second'",
    )
    .await;
    let expired = post(
        &app,
        "/api/auth/verify-email",
        json!({"token": token_in(&first.body)}),
    )
    .await;
    assert_eq!(expired.status(), 400);

    // Right after the signup's mail: too soon.
    let resend = resend_verification(&app, &tokens).await;
    assert_eq!(resend.status(), 429);
    assert!(resend.headers().get("retry-after").is_some());
    assert_eq!(json(resend).await["error"]["code"], "too_many_mails");
    // A minute later (the signup's token made two minutes ago): a new link.
    sql(
        &app,
        "UPDATE tenantry.account_tokens SET created_at = now() - interval '2 minutes'",
    )
    .await;
    let resend = resend_verification(&app, &tokens).await;
    assert_eq!(resend.status(), 202);
    sink.wait_for(2, MAIL_WAIT).await;
    let second = sink.mails().pop().unwrap();
    let token = token_in(&second.body);
    assert_ne!(token, token_in(&first.body));
    let ok = post(&app, "/api/auth/verify-email", json!({"token": token})).await;
    assert_eq!(ok.status(), 200);
    let resend = resend_verification(&app, &tokens).await;
    assert_eq!(resend.status(), 409);
    // Without a token: 401.
    let anonymous = post(&app, "/api/auth/resend-verification", json!({})).await;
    assert_eq!(anonymous.status(), 401);
}

#[tokio::test]
async fn a_password_reset_sets_the_password_and_ends_every_session_at_once() {
    let sink = SmtpSink::start().await;
    let app = spawn_app_with(via(&sink)).await;
    let tokens = signup(&app, "rosa").await;
    sink.wait_for(1, MAIL_WAIT).await;
    let second = json(login(&app, "rosa", PASSWORD).await).await;

    let asked = post(
        &app,
        "/api/auth/forgot-password",
        json!({"email": " Rosa@Example.com "}),
    )
    .await;
    assert_eq!(asked.status(), 202);
    let mail = sink
        .wait_for_mail_to("rosa@example.com", "Reset your password", MAIL_WAIT)
        .await;
    assert!(mail.body.contains("Hello rosa,"), "{}", mail.body);
    let token = token_in(&mail.body);

    // A weak password is refused and does not use the token up.
    let weak = reset(&app, &token, "short").await;
    assert_eq!(weak.status(), 400);
    assert_eq!(json(weak).await["error"]["code"], "invalid_new_password");

    let new_password = "a brand new passphrase";
    let done = reset(&app, &token, new_password).await;
    assert_eq!(done.status(), 200);
    assert_eq!(json(done).await["sessions_revoked"], 2);

    // The very next request of either session's access token: 401.
    for t in [access(&tokens), access(&second)] {
        let r = app
            .call(Method::GET, "/api/experiences", t)
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 401);
        let r = app.call(Method::GET, "/api/me", t).send().await.unwrap();
        assert_eq!(r.status(), 401);
    }
    assert_eq!(app.refresh_status(&tokens["refresh_token"]).await, 401);
    let old = login(&app, "rosa", PASSWORD).await;
    assert_eq!(old.status(), 401);
    let new = login(&app, "rosa", new_password).await;
    assert_eq!(new.status(), 200);

    let used = reset(&app, &token, "yet another passphrase").await;
    assert_eq!(used.status(), 400);
    assert_eq!(json(used).await["error"]["code"], "invalid_token");
    let notice = sink
        .wait_for_mail_to("rosa@example.com", "Your password was reset", MAIL_WAIT)
        .await;
    assert!(!notice.body.contains("token="));
    assert!(audit_actions(&app)
        .await
        .contains(&"password_reset".to_owned()));
}

#[tokio::test]
async fn reset_tokens_are_refused_expired_after_a_password_change_and_only_reset_their_own_user() {
    let sink = SmtpSink::start().await;
    let app = spawn_app_with(via(&sink)).await;
    let ana = signup(&app, "ana").await;
    signup(&app, "ben").await;
    sink.wait_for(2, MAIL_WAIT).await;
    let reset_link = |to: &'static str| {
        let sink = &sink;
        let app = &app;
        async move {
            // One reset mail a minute per account: the earlier ones are
            // made older, as a minute passing would.
            sql(
                app,
                "UPDATE tenantry.account_tokens SET created_at = created_at - interval '2 minutes'
                      WHERE purpose = 'reset_password'",
            )
            .await;
            let before = sink.mails().len();
            let r = post(app, "/api/auth/forgot-password", json!({"email": to})).await;
            assert_eq!(r.status(), 202);
            sink.wait_for(before + 1, MAIL_WAIT).await;
            let mail = sink.mails().pop().unwrap();
            assert_eq!(mail.to, vec![to.to_owned()]);
            token_in(&mail.body)
        }
    };

    // Expired.
    let token = reset_link("ana@example.com").await;
    sql(
        &app,
        "UPDATE tenantry.account_tokens SET expires_at = now() - interval '1 second'
              WHERE purpose = 'reset_password'",
    )
    .await;
    let r = reset(&app, &token, "expired token password").await;
    assert_eq!(r.status(), 400);

    // Asked for, then the password changed: the link no longer works.
    let token = reset_link("ana@example.com").await;
    let changed = app
        .call(Method::POST, "/api/auth/change-password", access(&ana))
        .json(&json!({"current_password": PASSWORD, "new_password": "changed by ana herself"}))
        .send()
        .await
        .unwrap();
    assert_eq!(changed.status(), 200);
    let r = reset(&app, &token, "after the change pw").await;
    assert_eq!(r.status(), 400);
    assert_eq!(json(r).await["error"]["code"], "invalid_token");

    // Ben's token resets Ben, never Ana.
    let token = reset_link("ben@example.com").await;
    let r = reset(&app, &token, "ben's fresh passphrase").await;
    assert_eq!(r.status(), 200);
    let ana_login = login(&app, "ana", "changed by ana herself").await;
    assert_eq!(ana_login.status(), 200);
    let ben_login = login(&app, "ben", "ben's fresh passphrase").await;
    assert_eq!(ben_login.status(), 200);
}

#[tokio::test]
async fn forgot_password_answers_alike_for_unknown_addresses_and_mails_no_one() {
    let sink = SmtpSink::start().await;
    let app = spawn_app_with(via(&sink)).await;
    signup(&app, "kim").await;
    sink.wait_for(1, MAIL_WAIT).await;
    let unknown = post(
        &app,
        "/api/auth/forgot-password",
        json!({"email": "nobody@example.com"}),
    )
    .await;
    let (unknown_status, unknown_body) = (unknown.status(), unknown.text().await.unwrap());
    let known = post(
        &app,
        "/api/auth/forgot-password",
        json!({"email": "kim@example.com"}),
    )
    .await;
    assert_eq!(
        (known.status(), known.text().await.unwrap()),
        (unknown_status, unknown_body)
    );
    assert_eq!(unknown_status, 202);
    // Requests are handled in order: once kim's mail is here, nobody's
    // request was handled too, and sent nothing.
    sink.wait_for_mail_to("kim@example.com", "Reset", MAIL_WAIT)
        .await;
    assert!(sink
        .mails()
        .iter()
        .all(|m| !m.to.contains(&"nobody@example.com".to_owned())));
    let bad = post(
        &app,
        "/api/auth/forgot-password",
        json!({"email": "not an address"}),
    )
    .await;
    assert_eq!(bad.status(), 400);
}

fn median(v: &mut [f64]) -> f64 {
    v.sort_by(|a, b| a.partial_cmp(b).unwrap());
    v[v.len() / 2]
}

fn quartiles(v: &mut [f64]) -> (f64, f64) {
    v.sort_by(|a, b| a.partial_cmp(b).unwrap());
    (v[v.len() / 4], v[v.len() * 3 / 4])
}

/// Known and unknown addresses, measured in a random order, 60 of each:
/// the difference of their medians must be below the noise (the spread of
/// the unknown address's own times, their interquartile range).
#[tokio::test]
async fn forgot_password_takes_the_same_time_for_known_and_unknown_addresses() {
    let sink = SmtpSink::start().await;
    let app = spawn_app_with(via(&sink)).await;
    signup(&app, "tess").await;
    let url = format!("{}/api/auth/forgot-password", app.address);
    let time = |email: &'static str| {
        let url = url.clone();
        let api = app.api.clone();
        async move {
            let started = std::time::Instant::now();
            let r = api
                .post(url)
                .json(&json!({"email": email}))
                .send()
                .await
                .unwrap();
            let status = r.status();
            r.bytes().await.unwrap();
            assert_eq!(status, 202);
            started.elapsed().as_secs_f64() * 1000.0
        }
    };
    // Warm up connections and code paths.
    for _ in 0..10 {
        time("tess@example.com").await;
        time("ghost@example.com").await;
    }
    let (mut known, mut unknown) = (Vec::new(), Vec::new());
    for i in 0..60u32 {
        // A fixed pseudo-random order (no pattern the server could follow).
        if (i.wrapping_mul(2_654_435_761) >> 7) % 2 == 0 {
            known.push(time("tess@example.com").await);
            unknown.push(time("ghost@example.com").await);
        } else {
            unknown.push(time("ghost@example.com").await);
            known.push(time("tess@example.com").await);
        }
    }
    let difference = (median(&mut known) - median(&mut unknown)).abs();
    let (q1, q3) = quartiles(&mut unknown);
    let noise = q3 - q1;
    assert!(
        difference <= noise,
        "known vs unknown differ by {difference:.3} ms, more than the noise ({noise:.3} ms)"
    );
}

#[tokio::test]
async fn an_email_change_takes_effect_when_the_new_address_is_verified() {
    let sink = SmtpSink::start().await;
    let app = spawn_app_with(via(&sink)).await;
    let tokens = signup(&app, "cleo").await;
    signup(&app, "dora").await;
    sink.wait_for(2, MAIL_WAIT).await;
    let change = |email: &str, password: &str| {
        app.call(Method::POST, "/api/me/email", access(&tokens))
            .json(&json!({"email": email, "password": password}))
            .send()
    };
    assert_eq!(
        change("cleo@new.example.org", "wrong password!!")
            .await
            .unwrap()
            .status(),
        401
    );
    let taken = change("dora@example.com", PASSWORD).await.unwrap();
    assert_eq!(taken.status(), 409);
    assert_eq!(json(taken).await["error"]["code"], "email_taken");
    assert_eq!(
        change("cleo@example.com", PASSWORD).await.unwrap().status(),
        400
    );
    assert_eq!(
        change("not-an-address", PASSWORD).await.unwrap().status(),
        400
    );

    // A minute after the signup's mail (one verification mail a minute).
    sql(
        &app,
        "UPDATE tenantry.account_tokens SET created_at = now() - interval '2 minutes'",
    )
    .await;
    let asked = change("Cleo@New.Example.org", PASSWORD).await.unwrap();
    assert_eq!(asked.status(), 202);
    let to_new = sink
        .wait_for_mail_to("cleo@new.example.org", "Confirm your email", MAIL_WAIT)
        .await;
    let notice = sink
        .wait_for_mail_to("cleo@example.com", "being changed", MAIL_WAIT)
        .await;
    assert!(notice.body.contains("cleo@new.example.org"));
    assert!(
        !notice.body.contains("token="),
        "the old address gets no link"
    );
    // Not yet changed.
    let me = json(
        app.call(Method::GET, "/api/me", access(&tokens))
            .send()
            .await
            .unwrap(),
    )
    .await;
    assert_eq!(me["email"], "cleo@example.com");

    let verified = post(
        &app,
        "/api/auth/verify-email",
        json!({"token": token_in(&to_new.body)}),
    )
    .await;
    assert_eq!(verified.status(), 200);
    assert_eq!(json(verified).await["email"], "cleo@new.example.org");
    let me = json(
        app.call(Method::GET, "/api/me", access(&tokens))
            .send()
            .await
            .unwrap(),
    )
    .await;
    assert_eq!(
        (me["email"].as_str(), me["email_verified"].as_bool()),
        (Some("cleo@new.example.org"), Some(true))
    );
    // A reset now goes to the new address; the old one gets nothing.
    let before = sink.mails().len();
    post(
        &app,
        "/api/auth/forgot-password",
        json!({"email": "cleo@example.com"}),
    )
    .await;
    post(
        &app,
        "/api/auth/forgot-password",
        json!({"email": "cleo@new.example.org"}),
    )
    .await;
    sink.wait_for_mail_to("cleo@new.example.org", "Reset", MAIL_WAIT)
        .await;
    assert_eq!(sink.mails().len(), before + 1);
    let actions = audit_actions(&app).await;
    assert!(actions.contains(&"email_change_requested".to_owned()));
    assert!(actions.contains(&"email_changed".to_owned()));
}

/// The outbox row of the one mail, as (attempts, last_error, delivered,
/// dead).
async fn outbox_row(app: &TestApp) -> (i32, Option<String>, bool, bool) {
    let row = app
        .db()
        .await
        .query_one(
            "SELECT attempts, last_error, delivered_at IS NOT NULL, dead_at IS NOT NULL
               FROM tenantry.outbox ORDER BY id LIMIT 1",
            &[],
        )
        .await
        .unwrap();
    (row.get(0), row.get(1), row.get(2), row.get(3))
}

#[tokio::test]
async fn mail_waits_while_the_server_is_down_and_arrives_when_it_is_back() {
    let mut sink = SmtpSink::start().await;
    sink.stop().await;
    let app = spawn_app_with(via(&sink)).await;
    let tokens = signup(&app, "otto").await;
    // Two failed attempts, recorded.
    until("two failed attempts", || async {
        outbox_row(&app).await.0 >= 2
    })
    .await;
    let (_, error, delivered, dead) = outbox_row(&app).await;
    assert!(error.is_some() && !delivered && !dead);
    sink.restart().await;
    let mail = sink
        .wait_for_mail_to("otto@example.com", "Confirm", MAIL_WAIT)
        .await;
    let ok = post(
        &app,
        "/api/auth/verify-email",
        json!({"token": token_in(&mail.body)}),
    )
    .await;
    assert_eq!(ok.status(), 200);
    until("delivered", || async { outbox_row(&app).await.2 }).await;
    assert_eq!(sink.mails().len(), 1);
    drop(tokens);
}

/// `tenantry serve` as a process of its own, sending to `smtp_url`.
async fn serve(db: &str, smtp_url: &str) -> (tokio::process::Child, String) {
    serve_process(
        db,
        &[
            ("TENANTRY_SMTP_URL", smtp_url.to_owned()),
            // Retries 0.2, 0.4, 0.8, … s apart: the few a slow shutdown
            // leaves room for still end within seconds of the restart.
            ("TENANTRY_MAIL_BACKOFF_MS", "200".into()),
            (
                "TENANTRY_DATA_DIR",
                temp_dir("tenantry-mail-serve").display().to_string(),
            ),
        ],
    )
    .await
}

#[tokio::test]
async fn mail_written_while_the_server_was_down_survives_a_restart_of_serve() {
    let mut sink = SmtpSink::start().await;
    sink.stop().await;
    let db = create_database().await;
    let (mut first, base) = serve(&db, &sink.url()).await;
    let api = reqwest::Client::new();
    let r = api
        .post(format!("{base}/api/auth/register"))
        .json(&json!({"username": "petra", "email": "petra@example.com", "password": PASSWORD}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 201);
    let client = connect(&db).await;
    until("a failed attempt", || async {
        client
            .query_one("SELECT max(attempts) FROM tenantry.outbox", &[])
            .await
            .unwrap()
            .get::<_, Option<i32>>(0)
            .unwrap_or(0)
            >= 1
    })
    .await;
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(first.id().unwrap() as i32),
        nix::sys::signal::Signal::SIGTERM,
    )
    .unwrap();
    assert!(first.wait().await.unwrap().success());
    sink.restart().await;
    let (_second, _) = serve(&db, &sink.url()).await;
    let mail = sink
        .wait_for_mail_to("petra@example.com", "Confirm", MAIL_WAIT)
        .await;
    assert!(mail.body.contains("token="));
}

#[tokio::test]
async fn a_mail_refused_every_time_goes_dead_and_outbox_retry_sends_it() {
    let sink = SmtpSink::start().await;
    sink.fail_next(3, 554);
    let app = spawn_app_with(|s| {
        via(&sink)(s);
        s.mail.max_attempts = 3;
    })
    .await;
    signup(&app, "dana").await;
    until("dead", || async { outbox_row(&app).await.3 }).await;
    let (attempts, error, ..) = outbox_row(&app).await;
    assert_eq!(attempts, 3);
    assert!(error.unwrap().contains("554"));
    assert!(sink.mails().is_empty());

    let env = cli_env(&app.db_name);
    let status = tenantry(&["outbox", "status", "--json"], &env, None).await;
    assert!(status.status.success(), "{}", stderr(&status));
    let status: Value = serde_json::from_str(&stdout(&status)).unwrap();
    assert_eq!(
        (status["dead"].as_i64(), status["pending"].as_i64()),
        (Some(1), Some(0))
    );
    assert_eq!(status["dead_mails"][0]["recipient"], "dana@example.com");
    let text = tenantry(&["outbox", "status"], &env, None).await;
    assert!(stdout(&text).contains("dead 1"), "{}", stdout(&text));
    let metrics = app.get("/metrics").await.text().await.unwrap();
    assert!(
        metrics.contains("tenantry_outbox_mails{state=\"dead\"} 1"),
        "{metrics}"
    );

    let retried = tenantry(&["outbox", "retry"], &env, None).await;
    assert!(retried.status.success(), "{}", stderr(&retried));
    assert!(stdout(&retried).contains("1 dead mail"));
    let mail = sink
        .wait_for_mail_to("dana@example.com", "Confirm", MAIL_WAIT)
        .await;
    assert!(mail.body.contains("token="));
    let none = tenantry(&["outbox", "retry", "--id", "999999"], &env, None).await;
    assert_eq!(none.status.code(), Some(1));
}

#[tokio::test]
async fn two_serve_processes_deliver_each_of_fifty_mails_exactly_once() {
    let sink = SmtpSink::start().await;
    let first = spawn_app_with(via(&sink)).await;
    let mut settings = test_settings(&first.db_name);
    via(&sink)(&mut settings);
    let second = spawn_app_on(settings, first.db_name.clone()).await;
    let signups = (0..50).map(|i| {
        let app = if i % 2 == 0 { &first } else { &second };
        async move { signup(app, &format!("burst_{i}")).await }
    });
    futures::future::join_all(signups).await;
    sink.wait_for(50, MAIL_WAIT).await;
    // Every row delivered, none claimed: nothing more will be sent.
    until("all delivered", || async {
        first
            .count("SELECT count(*) FROM tenantry.outbox WHERE delivered_at IS NULL OR claimed_by IS NOT NULL")
            .await
            == 0
    })
    .await;
    let mails = sink.mails();
    let mut recipients: Vec<String> = mails.iter().flat_map(|m| m.to.clone()).collect();
    recipients.sort();
    let before = recipients.len();
    recipients.dedup();
    assert_eq!((before, recipients.len()), (50, 50), "no mail twice");
}

#[tokio::test]
async fn mail_goes_over_starttls_and_over_implicit_tls_with_authentication() {
    for options in [
        SinkOptions {
            tls: SinkTls::StartTls,
            auth: None,
        },
        SinkOptions {
            tls: SinkTls::Implicit,
            auth: Some(("mailer".into(), "s3cret pass".into())),
        },
    ] {
        let sink = SmtpSink::start_with(options).await;
        let app = spawn_app_with(via(&sink)).await;
        signup(&app, "tilda").await;
        let mail = sink
            .wait_for_mail_to("tilda@example.com", "Confirm", MAIL_WAIT)
            .await;
        assert!(mail.body.contains("token="));
    }
}

#[tokio::test]
async fn erasure_removes_the_users_undelivered_mail() {
    let mut sink = SmtpSink::start().await;
    sink.stop().await;
    let app = spawn_app_with(via(&sink)).await;
    let tokens = signup(&app, "gus").await;
    assert_eq!(app.count("SELECT count(*) FROM tenantry.outbox").await, 1);
    let erased = app
        .call(Method::DELETE, "/api/me", access(&tokens))
        .json(&json!({"password": PASSWORD}))
        .send()
        .await
        .unwrap();
    assert_eq!(erased.status(), 200);
    assert_eq!(app.count("SELECT count(*) FROM tenantry.outbox").await, 0);
    assert_eq!(
        app.count("SELECT count(*) FROM tenantry.account_tokens")
            .await,
        0
    );
}

#[tokio::test]
async fn accounts_that_never_verify_are_erased_after_the_ttl() {
    let sink = SmtpSink::start().await;
    let app = spawn_app_with(via(&sink)).await;
    let old = signup(&app, "olive").await;
    signup(&app, "young").await;
    let verified = signup(&app, "vince").await;
    signup(&app, "sully").await;
    sink.wait_for(4, MAIL_WAIT).await;
    // Sully never verified either, but is suspended (restriction of
    // processing): kept as is.
    let suspended = tenantry(
        &["tenants", "suspend", "sully"],
        &cli_env(&app.db_name),
        None,
    )
    .await;
    assert!(suspended.status.success(), "{}", stderr(&suspended));
    let vince_mail = sink
        .wait_for_mail_to("vince@example.com", "Confirm", MAIL_WAIT)
        .await;
    let ok = post(
        &app,
        "/api/auth/verify-email",
        json!({"token": token_in(&vince_mail.body)}),
    )
    .await;
    assert_eq!(ok.status(), 200);
    // Olive and Vince signed up two days ago.
    sql(
        &app,
        "UPDATE tenantry.users SET created_at = now() - interval '2 days'
              WHERE username IN ('olive', 'vince', 'sully')",
    )
    .await;
    // A serve with a one-day TTL: its maintenance runs at start.
    let mut settings = test_settings(&app.db_name);
    via(&sink)(&mut settings);
    settings.mail.unverified_ttl = Some(Duration::from_secs(86_400));
    let _maintained = spawn_app_on(settings, app.db_name.clone()).await;
    until("olive erased", || async {
        app.count("SELECT count(*) FROM tenantry.users WHERE username = 'olive'")
            .await
            == 0
    })
    .await;
    let left: Vec<String> = app
        .db()
        .await
        .query("SELECT username FROM tenantry.users ORDER BY 1", &[])
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert_eq!(left, ["sully", "vince", "young"]);
    assert_eq!(
        app.count("SELECT count(*) FROM pg_namespace WHERE nspname = 'tenant_olive'")
            .await,
        0
    );
    let erasure: String = app
        .db()
        .await
        .query_one(
            "SELECT entry FROM tenantry.audit_log WHERE action = 'tenant_erased'",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert!(erasure.contains("email_unverified"), "{erasure}");
    assert!(erasure.contains("maintenance"), "{erasure}");
    let r = app
        .call(Method::GET, "/api/experiences", access(&old))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 401);
    let r = app
        .call(Method::GET, "/api/experiences", access(&verified))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
}

#[tokio::test]
async fn without_smtp_a_newcomer_reads_the_mail_in_eml_files() {
    let app = spawn_app().await;
    signup(&app, "nina").await;
    let dir = test_settings(&app.db_name).data_dir.join("mail");
    let eml = mail_file(&dir, "verify_email").await;
    assert!(eml.contains("To: nina@example.com"), "{eml}");
    assert!(eml.contains("Subject: Confirm your email address"), "{eml}");
    // Plain text: the link reads as written.
    let token = token_in(&eml);
    let ok = post(&app, "/api/auth/verify-email", json!({"token": token})).await;
    assert_eq!(ok.status(), 200);
}

#[tokio::test]
async fn delivered_mail_and_expired_tokens_are_purged_in_the_background() {
    let sink = SmtpSink::start().await;
    let app = spawn_app_with(via(&sink)).await;
    signup(&app, "pia").await;
    signup(&app, "quin").await;
    sink.wait_for(2, MAIL_WAIT).await;
    until("delivered", || async {
        app.count("SELECT count(*) FROM tenantry.outbox WHERE delivered_at IS NOT NULL")
            .await
            == 2
    })
    .await;
    // Pia's mail was delivered eight days ago, her token expired; Quin's are
    // fresh.
    let db = app.db().await;
    db.batch_execute(
        "UPDATE tenantry.outbox SET delivered_at = now() - interval '8 days'
          WHERE recipient = 'pia@example.com';
         UPDATE tenantry.account_tokens SET expires_at = now() - interval '1 second'
          WHERE email = 'pia@example.com'",
    )
    .await
    .unwrap();
    // A serve's maintenance runs at its start (retention: 7 days).
    let mut settings = test_settings(&app.db_name);
    via(&sink)(&mut settings);
    let _maintained = spawn_app_on(settings, app.db_name.clone()).await;
    until("purged", || async {
        app.count("SELECT count(*) FROM tenantry.outbox").await == 1
            && app
                .count("SELECT count(*) FROM tenantry.account_tokens")
                .await
                == 1
    })
    .await;
    let left: String = db
        .query_one("SELECT recipient FROM tenantry.outbox", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(left, "quin@example.com");
}

#[tokio::test]
async fn racing_resends_queue_on_the_account_and_only_one_mail_goes_out() {
    let sink = SmtpSink::start().await;
    let app = spawn_app_with(via(&sink)).await;
    let tokens = signup(&app, "rhea").await;
    sink.wait_for(1, MAIL_WAIT).await;
    sql(
        &app,
        "UPDATE tenantry.account_tokens SET created_at = now() - interval '2 minutes'",
    )
    .await;
    // The test holds the account's row: both resends wait on it.
    let mut holder = app.db().await;
    let tx = holder.transaction().await.unwrap();
    tx.execute(
        "SELECT FROM tenantry.users WHERE username = 'rhea' FOR UPDATE",
        &[],
    )
    .await
    .unwrap();
    let (first, second) = (
        tokio::spawn({
            let request = app.call(
                Method::POST,
                "/api/auth/resend-verification",
                access(&tokens),
            );
            async move { request.send().await.unwrap().status().as_u16() }
        }),
        tokio::spawn({
            let request = app.call(
                Method::POST,
                "/api/auth/resend-verification",
                access(&tokens),
            );
            async move { request.send().await.unwrap().status().as_u16() }
        }),
    );
    until("both resends wait on the account", || async {
        app.count(
            "SELECT count(*) FROM pg_stat_activity
              WHERE wait_event_type = 'Lock' AND query LIKE '%FROM tenantry.users WHERE id = $1 FOR UPDATE%'",
        )
        .await
            == 2
    })
    .await;
    tx.commit().await.unwrap();
    let mut statuses = [first.await.unwrap(), second.await.unwrap()];
    statuses.sort();
    assert_eq!(statuses, [202, 429]);
    sink.wait_for(2, MAIL_WAIT).await;
    assert_eq!(
        app.count("SELECT count(*) FROM tenantry.account_tokens")
            .await,
        2
    );
}

#[tokio::test]
async fn a_pending_email_change_ends_with_signing_out_everywhere_and_changes_are_limited() {
    let sink = SmtpSink::start().await;
    let app = spawn_app_with(via(&sink)).await;
    let tokens = signup(&app, "ivo").await;
    sink.wait_for(1, MAIL_WAIT).await;
    let change = |email: &'static str| {
        app.call(Method::POST, "/api/me/email", access(&tokens))
            .json(&json!({"email": email, "password": PASSWORD}))
            .send()
    };
    // Right after the signup's mail: too soon for another.
    let early = change("ivo@elsewhere.example").await.unwrap();
    assert_eq!(early.status(), 429);
    assert_eq!(json(early).await["error"]["code"], "too_many_mails");
    sql(
        &app,
        "UPDATE tenantry.account_tokens SET created_at = now() - interval '2 minutes'",
    )
    .await;
    assert_eq!(change("ivo@elsewhere.example").await.unwrap().status(), 202);
    let link = sink
        .wait_for_mail_to("ivo@elsewhere.example", "Confirm", MAIL_WAIT)
        .await;
    // Whoever asked for it had the password; signing out everywhere takes
    // the change back.
    let out = app
        .call(Method::POST, "/api/auth/revoke-all", access(&tokens))
        .send()
        .await
        .unwrap();
    assert_eq!(out.status(), 204);
    let used = post(
        &app,
        "/api/auth/verify-email",
        json!({"token": token_in(&link.body)}),
    )
    .await;
    assert_eq!(used.status(), 400);
    assert_eq!(
        app.count("SELECT count(*) FROM tenantry.users WHERE email = 'ivo@example.com'")
            .await,
        1
    );
}

#[tokio::test]
async fn a_suspended_account_cannot_verify_or_reset_and_gets_no_reset_mail() {
    let sink = SmtpSink::start().await;
    let app = spawn_app_with(via(&sink)).await;
    signup(&app, "sami").await;
    signup(&app, "tara").await;
    let verify = sink
        .wait_for_mail_to("sami@example.com", "Confirm", MAIL_WAIT)
        .await;
    // A reset link asked for before the suspension.
    post(
        &app,
        "/api/auth/forgot-password",
        json!({"email": "sami@example.com"}),
    )
    .await;
    let reset_mail = sink
        .wait_for_mail_to("sami@example.com", "Reset", MAIL_WAIT)
        .await;
    let suspended = tenantry(
        &["tenants", "suspend", "sami", "--reason", "dispute"],
        &cli_env(&app.db_name),
        None,
    )
    .await;
    assert!(suspended.status.success(), "{}", stderr(&suspended));

    let r = post(
        &app,
        "/api/auth/verify-email",
        json!({"token": token_in(&verify.body)}),
    )
    .await;
    assert_eq!(r.status(), 403);
    assert_eq!(json(r).await["error"]["code"], "account_suspended");
    let token = token_in(&reset_mail.body);
    let r = reset(&app, &token, "a password while suspended").await;
    assert_eq!(r.status(), 403);
    // Its password stays; the tokens stay unused for after a resumption.
    assert_eq!(
        app.count("SELECT count(*) FROM tenantry.account_tokens a JOIN tenantry.users u ON u.id = a.user_id
              WHERE u.username = 'sami' AND a.used_at IS NULL")
            .await,
        2
    );
    sql(
        &app,
        "UPDATE tenantry.account_tokens SET created_at = now() - interval '2 minutes'",
    )
    .await;
    // Requests are handled in order: once Tara's reset mail is here, Sami's
    // request before it was handled too.
    post(
        &app,
        "/api/auth/forgot-password",
        json!({"email": "sami@example.com"}),
    )
    .await;
    post(
        &app,
        "/api/auth/forgot-password",
        json!({"email": "tara@example.com"}),
    )
    .await;
    sink.wait_for_mail_to("tara@example.com", "Reset", MAIL_WAIT)
        .await;
    assert_eq!(
        app.count(
            "SELECT count(*) FROM tenantry.outbox WHERE kind = 'password_reset' AND recipient = 'sami@example.com'"
        )
        .await,
        1,
        "no second reset mail while suspended"
    );
}
