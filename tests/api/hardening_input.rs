//! Hostile search terms and cursors, sent to the live routes: what the
//! decoders accept, PostgreSQL accepts; what they refuse is a 400. And the
//! search is served by an index, also for tenants that signed up before it.

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;
use proptest::prelude::*;
use proptest::strategy::ValueTree;
use proptest::test_runner::{Config, TestRng, TestRunner};
use reqwest::Method;
use serde_json::{json, Value};

use crate::helpers::*;

/// Status and body of a GET with `query` as its query string parameters.
async fn get(app: &TestApp, token: &str, path: &str, query: &[(&str, &str)]) -> (u16, Value) {
    let response = app
        .call(Method::GET, path, token)
        .query(query)
        .send()
        .await
        .unwrap();
    let status = response.status().as_u16();
    let text = response.text().await.unwrap();
    let body = serde_json::from_str(&text).unwrap_or_else(|_| panic!("not JSON: {text}"));
    (status, body)
}

/// A 200 page, or a 400 with the JSON error shape naming a query field.
fn assert_page_or_400(status: u16, body: &Value, what: &str) {
    match status {
        200 => assert!(body["items"].is_array(), "{what}: {body}"),
        400 => {
            let code = body["error"]["code"].as_str().unwrap_or_default();
            assert!(code.starts_with("invalid_"), "{what}: {body}");
            assert!(body["error"]["message"].is_string(), "{what}: {body}");
        }
        other => panic!("{what}: {other} {body}"),
    }
}

fn cursor(kind: &str, parts: &[String]) -> String {
    URL_SAFE_NO_PAD.encode(serde_json::to_vec(&(kind, parts)).unwrap())
}

/// A tenant with an experience, a skill and a conversation with a message.
async fn tenant_with_data(app: &TestApp, name: &str) -> (String, i64) {
    let t = app.token(name).await;
    let send = |path: &str, body: Value| app.call(Method::POST, path, &t).json(&body).send();
    let created = send(
        "/api/experiences",
        json!({"title": "Platform engineer", "organization": "Acme", "started_on": "2020-01-01",
               "description": "Kubernetes and PostgreSQL", "skills": ["rust"]}),
    )
    .await
    .unwrap();
    assert_eq!(created.status(), 201);
    let skill = send("/api/skills", json!({"name": "Rust", "level": 3}))
        .await
        .unwrap();
    assert_eq!(skill.status(), 201);
    let conversation = json(
        send("/api/conversations", json!({"title": "Plans"}))
            .await
            .unwrap(),
    )
    .await;
    let id = conversation["id"].as_i64().unwrap();
    let message = send(
        &format!("/api/conversations/{id}/messages"),
        json!({"author": "user", "content": "hello"}),
    )
    .await
    .unwrap();
    assert_eq!(message.status(), 201);
    (t, id)
}

#[tokio::test]
async fn the_three_inputs_that_gave_a_500_get_a_page_or_a_400() {
    let app = spawn_app().await;
    let (t, _) = tenant_with_data(&app, "ines").await;

    // 50 dashes: 50 NOTs in a row overflowed the tsquery parser's stack.
    let dashes = "-".repeat(50);
    let (status, body) = get(&app, &t, "/api/experiences", &[("q", &dashes)]).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(
        body["items"],
        json!([]),
        "nothing but operators matches nothing"
    );
    let (status, body) = get(
        &app,
        &t,
        "/api/experiences",
        &[("q", &format!("{dashes}acme"))],
    )
    .await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(
        body["items"].as_array().unwrap().len(),
        1,
        "an even run of NOTs cancels out"
    );

    // A position of -1 became a negative OFFSET.
    let (status, body) = get(
        &app,
        &t,
        "/api/reference/industries",
        &[("cursor", "WyJpbmR1c3RyaWVzIiwgWyItMSJdXQ")],
    )
    .await;
    assert_eq!(status, 400, "{body}");
    assert_eq!(body["error"]["code"], "invalid_cursor");

    // A sort key with a NUL, which PostgreSQL text cannot hold.
    let (status, body) = get(
        &app,
        &t,
        "/api/skills",
        &[("cursor", "WyJzIiwgWyJhXHUwMDAwYiIsICIxIl1d")],
    )
    .await;
    assert_eq!(status, 400, "{body}");
    assert_eq!(body["error"]["code"], "invalid_cursor");
}

#[tokio::test]
async fn cursor_values_beyond_what_postgresql_holds_are_a_400() {
    let app = spawn_app().await;
    let (t, _) = tenant_with_data(&app, "hugo").await;
    let s = |v: &[&str]| v.iter().map(|p| p.to_string()).collect::<Vec<_>>();
    for (path, kind, parts) in [
        // chrono reaches back to year -262143, PostgreSQL to 4713 BC.
        ("/api/experiences", "d", s(&["-100000-01-01", "1"])),
        (
            "/api/conversations",
            "c",
            s(&["-100000-01-01T00:00:00Z", "1"]),
        ),
        ("/api/experiences?q=acme", "r", s(&["NaN", "1"])),
        ("/api/experiences", "d", s(&["2020-01-01", "-5"])),
        ("/api/skills", "s", s(&[&"x".repeat(5000), "1"])),
    ] {
        let c = cursor(kind, &parts);
        let (status, body) = get(&app, &t, path, &[("cursor", &c)]).await;
        assert_eq!(status, 400, "{path} {parts:?}: {body}");
        assert_eq!(body["error"]["code"], "invalid_cursor");
    }
}

/// Text biased towards what search syntax and cursors give meaning to.
fn hostile_text() -> impl Strategy<Value = String> {
    let piece = prop_oneof![
        Just("-".to_string()),
        Just("\"".to_string()),
        Just(" ".to_string()),
        Just("or".to_string()),
        Just("\0".to_string()),
        Just("'".to_string()),
        Just("\\".to_string()),
        Just("%_".to_string()),
        "[!&|()<>:*]".prop_map(|s| s),
        any::<char>().prop_map(String::from),
        "[a-z]{1,8}".prop_map(|s| s),
    ];
    prop_oneof![
        3 => proptest::collection::vec(piece, 0..120).prop_map(|v| v.concat()),
        1 => any::<String>(),
        1 => (1usize..300).prop_map(|n| "-".repeat(n)),
    ]
}

/// Cursor parts: numbers and dates at and beyond what the columns hold,
/// and text.
fn hostile_part() -> impl Strategy<Value = String> {
    prop_oneof![
        any::<i64>().prop_map(|n| n.to_string()),
        Just("-1".to_string()),
        Just(i64::MAX.to_string()),
        Just("99999999999999999999".to_string()),
        prop_oneof![
            Just("NaN"),
            Just("inf"),
            Just("-inf"),
            Just("1e39"),
            Just("-0.0")
        ]
        .prop_map(str::to_owned),
        any::<f32>().prop_map(|f| f.to_string()),
        (-300_000i32..300_000, 1u32..13, 1u32..29)
            .prop_map(|(y, m, d)| format!("{y:04}-{m:02}-{d:02}")),
        (-300_000i32..300_000).prop_map(|y| format!("{y:+05}-01-01T00:00:00Z")),
        hostile_text(),
    ]
}

/// A cursor: well formed for `kind` with hostile parts, or anything.
fn hostile_cursor(kind: &'static str, parts: usize) -> impl Strategy<Value = String> {
    prop_oneof![
        4 => proptest::collection::vec(hostile_part(), parts..=parts)
            .prop_map(move |p| cursor(kind, &p)),
        1 => proptest::collection::vec(hostile_part(), 0..4).prop_map(move |p| cursor(kind, &p)),
        1 => hostile_text(),
        1 => proptest::collection::vec(any::<u8>(), 0..64).prop_map(|b| URL_SAFE_NO_PAD.encode(b)),
    ]
}

/// `count` values of `strategy`, the same on every run.
fn sample<S: Strategy>(strategy: S, count: usize) -> Vec<S::Value> {
    let mut runner = TestRunner::new_with_rng(
        Config::default(),
        TestRng::deterministic_rng(proptest::test_runner::RngAlgorithm::ChaCha),
    );
    (0..count)
        .map(|_| strategy.new_tree(&mut runner).unwrap().current())
        .collect()
}

#[tokio::test]
async fn hundreds_of_hostile_search_terms_get_a_page_or_a_400_never_a_5xx() {
    let app = spawn_app().await;
    let (t, _) = tenant_with_data(&app, "jorge").await;
    let rank_cursor = sample(hostile_cursor("r", 2), 40);
    for (i, q) in sample(hostile_text(), 200).iter().enumerate() {
        let (status, body) = get(&app, &t, "/api/experiences", &[("q", q)]).await;
        assert_page_or_400(status, &body, &format!("experiences q={q:?}"));
        if i % 5 == 0 {
            let c = &rank_cursor[i / 5];
            let (status, body) =
                get(&app, &t, "/api/experiences", &[("q", q), ("cursor", c)]).await;
            assert_page_or_400(status, &body, &format!("q={q:?} cursor={c}"));
        }
        if i % 4 == 0 {
            for path in [
                "/api/reference/skills",
                "/api/reference/industries",
                "/api/skills",
            ] {
                let (status, body) = get(&app, &t, path, &[("q", q)]).await;
                assert_page_or_400(status, &body, &format!("{path} q={q:?}"));
            }
        }
    }
}

#[tokio::test]
async fn hundreds_of_hostile_cursors_get_a_page_or_a_400_never_a_5xx() {
    let app = spawn_app().await;
    let (t, conversation) = tenant_with_data(&app, "kemal").await;
    let messages = format!("/api/conversations/{conversation}/messages");
    let lists: [(&str, &'static str, usize); 6] = [
        ("/api/experiences", "d", 2),
        ("/api/skills", "s", 2),
        ("/api/conversations", "c", 2),
        (&messages, "m", 1),
        ("/api/reference/industries", "industries", 1),
        ("/api/reference/skills", "skills", 1),
    ];
    for (path, kind, parts) in lists {
        for c in sample(hostile_cursor(kind, parts), 60) {
            let (status, body) = get(&app, &t, path, &[("cursor", &c)]).await;
            assert_page_or_400(status, &body, &format!("{path} cursor={c}"));
        }
    }
}

#[tokio::test]
async fn search_is_served_by_the_index_on_the_stored_document() {
    let app = spawn_app().await;
    let t = app.token("lars").await;
    for i in 0..20 {
        let response = app
            .call(Method::POST, "/api/experiences", &t)
            .json(
                &json!({"title": format!("Role {i}"), "started_on": "2020-01-01",
                          "description": "word ".repeat(200)}),
            )
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 201);
    }
    let db = app.db().await;
    db.batch_execute("VACUUM ANALYZE tenant_lars.experiences")
        .await
        .unwrap();
    // The planner picks a sequential scan for a table this small; with it
    // priced out, the plan shows whether the index can serve the query.
    db.batch_execute("BEGIN; SET LOCAL search_path = tenant_lars; SET LOCAL enable_seqscan = off;")
        .await
        .unwrap();
    let plan: Vec<String> = db
        .query(
            &format!("EXPLAIN {}", tenantry::api::experiences::SEARCH_SQL),
            &[&"zzzz", &None::<f32>, &None::<i64>, &51i64],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    db.batch_execute("ROLLBACK").await.unwrap();
    let plan = plan.join("\n");
    assert!(
        plan.contains("Index Scan on experiences_search_doc_idx"),
        "{plan}"
    );
    assert!(
        !plan.contains("to_tsvector"),
        "no document computed: {plan}"
    );
}

/// Ranked search results: (title, rank) in order.
async fn search(app: &TestApp, token: &str, q: &str) -> Vec<(String, f64)> {
    let (status, body) = get(app, token, "/api/experiences", &[("q", q)]).await;
    assert_eq!(status, 200, "{body}");
    body["items"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| {
            (
                e["title"].as_str().unwrap().to_owned(),
                e["rank"].as_f64().unwrap(),
            )
        })
        .collect()
}

#[tokio::test]
async fn a_tenant_from_before_the_index_searches_alike_and_the_fleet_adds_it() {
    let app = spawn_app().await;
    let t = app.token("mona").await;
    for body in [
        json!({"title": "Kubernetes platform lead", "started_on": "2019-01-01"}),
        json!({"title": "Accountant", "started_on": "2018-01-01", "description": "Moved the ledger to kubernetes"}),
        json!({"title": "Consultant", "organization": "Kubernetes Foundation", "started_on": "2016-01-01"}),
        json!({"title": "Engineer", "started_on": "2015-01-01", "skills": ["kubernetes", "go"]}),
        json!({"title": "Gardener", "started_on": "2017-01-01"}),
    ] {
        let response = app
            .call(Method::POST, "/api/experiences", &t)
            .json(&body)
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 201);
    }
    let queries = [
        "kubernetes",
        "\"platform lead\" or accountant",
        "kubernetes -go",
    ];
    let mut indexed = Vec::new();
    for q in queries {
        indexed.push(search(&app, &t, q).await);
    }
    assert_eq!(indexed[0].len(), 4, "{:?}", indexed[0]);

    // The tenant as it was before the stored document's version.
    let latest = latest_version();
    app.db()
        .await
        .batch_execute(&format!(
            "ALTER TABLE tenant_mona.experiences DROP COLUMN search_doc;
             DELETE FROM tenant_mona.refinery_schema_history WHERE version = {latest};
             UPDATE tenantry.tenants SET template_version = {} WHERE username = 'mona';",
            latest - 1
        ))
        .await
        .unwrap();
    for (q, expected) in queries.iter().zip(&indexed) {
        assert_eq!(&search(&app, &t, q).await, expected, "{q}");
    }

    let out = tenantry(&["fleet", "migrate"], &cli_env(&app.db_name), None).await;
    assert!(out.status.success(), "{}{}", stdout(&out), stderr(&out));
    let indexed_again = app
        .count(
            "SELECT count(*) FROM pg_indexes
             WHERE schemaname = 'tenant_mona' AND indexname = 'experiences_search_doc_idx'",
        )
        .await;
    assert_eq!(indexed_again, 1);
    for (q, expected) in queries.iter().zip(&indexed) {
        assert_eq!(&search(&app, &t, q).await, expected, "{q}");
    }
}
