//! The tenant data API: what a user of the product does with their data.

use reqwest::Method;
use serde_json::{json, Value};

use crate::helpers::*;

fn experience(title: &str, started: &str) -> Value {
    json!({"title": title, "organization": "Acme", "started_on": started})
}

#[tokio::test]
async fn experiences_can_be_created_read_changed_and_deleted() {
    let app = spawn_app().await;
    let t = app.token("erin").await;

    let (status, created) = send(
        &app,
        Method::POST,
        "/api/experiences",
        &t,
        Some(json!({
            "kind": "work", "title": "Backend engineer", "organization": "Acme",
            "employment_type": "full_time", "started_on": "2020-01-15",
            "description": "Built the billing service", "skills": ["Rust", "PostgreSQL"]
        })),
    )
    .await;
    assert_eq!(status, 201, "{created}");
    let id = created["id"].as_i64().unwrap();
    assert_eq!(created["skills"], json!(["Rust", "PostgreSQL"]));
    assert_eq!(created["ended_on"], Value::Null);

    let (status, read) = send(
        &app,
        Method::GET,
        &format!("/api/experiences/{id}"),
        &t,
        None,
    )
    .await;
    assert_eq!(status, 200);
    assert_eq!(read, created);

    let (status, changed) = send(
        &app,
        Method::PATCH,
        &format!("/api/experiences/{id}"),
        &t,
        Some(json!({"ended_on": "2023-06-30", "organization": null})),
    )
    .await;
    assert_eq!(status, 200, "{changed}");
    assert_eq!(changed["ended_on"], "2023-06-30");
    assert_eq!(changed["organization"], Value::Null);
    assert_eq!(
        changed["title"], "Backend engineer",
        "untouched fields stay"
    );

    // The merged result is validated whole: ending before the start is refused.
    let (status, err) = send(
        &app,
        Method::PATCH,
        &format!("/api/experiences/{id}"),
        &t,
        Some(json!({"started_on": "2024-01-01"})),
    )
    .await;
    assert_eq!(status, 400);
    assert_eq!(err["error"]["code"], "invalid_ended_on");

    let (status, _) = send(
        &app,
        Method::DELETE,
        &format!("/api/experiences/{id}"),
        &t,
        None,
    )
    .await;
    assert_eq!(status, 204);
    let (status, err) = send(
        &app,
        Method::GET,
        &format!("/api/experiences/{id}"),
        &t,
        None,
    )
    .await;
    assert_eq!(status, 404);
    assert_eq!(err["error"]["code"], "not_found");
    let (status, _) = send(
        &app,
        Method::DELETE,
        &format!("/api/experiences/{id}"),
        &t,
        None,
    )
    .await;
    assert_eq!(status, 404);
}

#[tokio::test]
async fn experiences_page_with_a_cursor_newest_first() {
    let app = spawn_app().await;
    let t = app.token("fred").await;
    for i in 0..7 {
        let (status, _) = send(
            &app,
            Method::POST,
            "/api/experiences",
            &t,
            Some(experience(&format!("Job {i}"), &format!("201{i}-01-01"))),
        )
        .await;
        assert_eq!(status, 201);
    }
    let mut seen = Vec::new();
    let mut path = "/api/experiences?limit=3".to_string();
    loop {
        let (status, page) = send(&app, Method::GET, &path, &t, None).await;
        assert_eq!(status, 200, "{page}");
        let items = page["items"].as_array().unwrap();
        assert!(items.len() <= 3);
        seen.extend(
            items
                .iter()
                .map(|e| e["title"].as_str().unwrap().to_owned()),
        );
        match page["next_cursor"].as_str() {
            Some(cursor) => path = format!("/api/experiences?limit=3&cursor={cursor}"),
            None => break,
        }
    }
    let expected: Vec<String> = (0..7).rev().map(|i| format!("Job {i}")).collect();
    assert_eq!(seen, expected, "every item once, newest first");

    let (status, err) = send(
        &app,
        Method::GET,
        "/api/experiences?cursor=garbage",
        &t,
        None,
    )
    .await;
    assert_eq!(status, 400);
    assert_eq!(err["error"]["code"], "invalid_cursor");
    let (status, _) = send(&app, Method::GET, "/api/experiences?limit=0", &t, None).await;
    assert_eq!(status, 400);
    let (status, _) = send(&app, Method::GET, "/api/experiences?sort=title", &t, None).await;
    assert_eq!(status, 400, "unknown query parameters are refused");
    for hostile in [
        "%00",
        "a%00b",
        "%27%3B%20drop%20table%20experiences%3B--",
        "%E2%80%8B",
        "!!!%26%26%7C",
    ] {
        let (status, body) = send(
            &app,
            Method::GET,
            &format!("/api/experiences?q={hostile}"),
            &t,
            None,
        )
        .await;
        assert!(status == 200 || status == 400, "{hostile}: {status} {body}");
        let (status, body) = send(
            &app,
            Method::GET,
            &format!("/api/reference/skills?q={hostile}"),
            &t,
            None,
        )
        .await;
        assert!(status == 200 || status == 400, "{hostile}: {status} {body}");
    }
    let long = "x".repeat(10_000);
    let (status, _) = send(
        &app,
        Method::GET,
        &format!("/api/experiences?q={long}"),
        &t,
        None,
    )
    .await;
    assert_eq!(status, 400);
    assert_eq!(
        app.count("SELECT count(*) FROM tenant_fred.experiences")
            .await,
        7
    );
}

#[tokio::test]
async fn search_ranks_title_matches_above_description_matches() {
    let app = spawn_app().await;
    let t = app.token("gina").await;
    for body in [
        json!({"title": "Kubernetes platform lead", "started_on": "2019-01-01"}),
        json!({"title": "Accountant", "started_on": "2018-01-01", "description": "Moved the ledger to kubernetes"}),
        json!({"title": "Gardener", "started_on": "2017-01-01"}),
        json!({"title": "Consultant", "organization": "Kubernetes Foundation", "started_on": "2016-01-01"}),
        json!({"title": "Engineer", "started_on": "2015-01-01", "skills": ["kubernetes", "go"]}),
    ] {
        let (status, e) = send(&app, Method::POST, "/api/experiences", &t, Some(body)).await;
        assert_eq!(status, 201, "{e}");
    }
    let (status, page) = send(&app, Method::GET, "/api/experiences?q=kubernetes", &t, None).await;
    assert_eq!(status, 200, "{page}");
    let titles: Vec<&str> = page["items"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["title"].as_str().unwrap())
        .collect();
    assert_eq!(titles.len(), 4, "{titles:?}");
    assert_eq!(titles[0], "Kubernetes platform lead", "title weighs most");
    assert_eq!(
        *titles.last().unwrap(),
        "Accountant",
        "description weighs least"
    );
    assert!(!titles.contains(&"Gardener"));

    // Paging through search results gives the same order.
    let (_, first) = send(
        &app,
        Method::GET,
        "/api/experiences?q=kubernetes&limit=2",
        &t,
        None,
    )
    .await;
    let cursor = first["next_cursor"].as_str().unwrap();
    let (_, second) = send(
        &app,
        Method::GET,
        &format!("/api/experiences?q=kubernetes&limit=2&cursor={cursor}"),
        &t,
        None,
    )
    .await;
    let paged: Vec<&str> = first["items"]
        .as_array()
        .unwrap()
        .iter()
        .chain(second["items"].as_array().unwrap())
        .map(|e| e["title"].as_str().unwrap())
        .collect();
    assert_eq!(paged, titles);
    assert!(second["next_cursor"].is_null());
}

#[tokio::test]
async fn bad_experience_input_gets_a_4xx_naming_the_field() {
    let app = spawn_app().await;
    let t = app.token("hank").await;
    for (body, code) in [
        (json!({"started_on": "2020-01-01"}), "invalid_json"),
        (
            json!({"title": "", "started_on": "2020-01-01"}),
            "invalid_title",
        ),
        (
            json!({"title": "x".repeat(301), "started_on": "2020-01-01"}),
            "invalid_title",
        ),
        (
            json!({"title": "A", "started_on": "2020-13-01"}),
            "invalid_json",
        ),
        (
            json!({"title": "A", "started_on": "2020-01-01", "kind": "hobby"}),
            "invalid_json",
        ),
        (
            json!({"title": "A", "started_on": "2020-01-01", "salary": 1}),
            "invalid_json",
        ),
        (
            json!({"title": "A", "started_on": "2020-01-01", "ended_on": "2019-01-01"}),
            "invalid_ended_on",
        ),
        (
            json!({"title": "A", "started_on": "2020-01-01", "industry_code": "x'; drop"}),
            "invalid_industry_code",
        ),
        (
            json!({"title": "A\u{0}B", "started_on": "2020-01-01"}),
            "invalid_title",
        ),
        (
            json!({"title": 5, "started_on": "2020-01-01"}),
            "invalid_json",
        ),
    ] {
        let (status, err) = send(
            &app,
            Method::POST,
            "/api/experiences",
            &t,
            Some(body.clone()),
        )
        .await;
        assert_eq!(status, 400, "{body} → {err}");
        assert_eq!(err["error"]["code"], code, "{body}");
    }
    assert_eq!(
        app.count("SELECT count(*) FROM tenant_hank.experiences")
            .await,
        0
    );
    let (status, err) = send(&app, Method::GET, "/api/experiences/not-a-number", &t, None).await;
    assert_eq!(status, 404, "{err}");
}

#[tokio::test]
async fn conversations_hold_their_messages_in_order() {
    let app = spawn_app().await;
    let t = app.token("iris").await;
    let (status, c) = send(
        &app,
        Method::POST,
        "/api/conversations",
        &t,
        Some(json!({"title": "Next role", "topic": "career_planning"})),
    )
    .await;
    assert_eq!(status, 201, "{c}");
    let id = c["id"].as_i64().unwrap();
    let path = format!("/api/conversations/{id}/messages");
    let (status, page) = send(&app, Method::GET, &path, &t, None).await;
    assert_eq!(status, 200);
    assert_eq!(page["items"], json!([]));
    for (author, content) in [
        ("user", "Where next?"),
        ("assistant", "Tell me more."),
        ("user", "Data work."),
    ] {
        let (status, m) = send(
            &app,
            Method::POST,
            &path,
            &t,
            Some(json!({"author": author, "content": content})),
        )
        .await;
        assert_eq!(status, 201, "{m}");
        assert_eq!(m["conversation_id"], id);
    }
    let (_, page) = send(&app, Method::GET, &format!("{path}?limit=2"), &t, None).await;
    let (_, rest) = send(
        &app,
        Method::GET,
        &format!(
            "{path}?limit=2&cursor={}",
            page["next_cursor"].as_str().unwrap()
        ),
        &t,
        None,
    )
    .await;
    let contents: Vec<&str> = page["items"]
        .as_array()
        .unwrap()
        .iter()
        .chain(rest["items"].as_array().unwrap())
        .map(|m| m["content"].as_str().unwrap())
        .collect();
    assert_eq!(contents, ["Where next?", "Tell me more.", "Data work."]);

    let (status, list) = send(&app, Method::GET, "/api/conversations", &t, None).await;
    assert_eq!(status, 200);
    assert_eq!(list["items"][0]["id"], id);

    let (status, _) = send(
        &app,
        Method::GET,
        "/api/conversations/999/messages",
        &t,
        None,
    )
    .await;
    assert_eq!(status, 404);
    let (status, _) = send(
        &app,
        Method::POST,
        "/api/conversations/999/messages",
        &t,
        Some(json!({"content": "hi"})),
    )
    .await;
    assert_eq!(status, 404);
    let (status, err) = send(
        &app,
        Method::POST,
        &path,
        &t,
        Some(json!({"content": "", "author": "user"})),
    )
    .await;
    assert_eq!(status, 400);
    assert_eq!(err["error"]["code"], "invalid_content");
    let (status, _) = send(
        &app,
        Method::POST,
        &path,
        &t,
        Some(json!({"content": "x", "author": "root"})),
    )
    .await;
    assert_eq!(status, 400);
}

#[tokio::test]
async fn summaries_are_replaced_and_keep_their_revisions() {
    let app = spawn_app().await;
    let t = app.token("jade").await;
    let (status, _) = send(&app, Method::GET, "/api/summaries/quick", &t, None).await;
    assert_eq!(status, 404, "no summary before the first PUT");
    for (i, content) in ["Data engineer.", "Data engineer, 8 years."]
        .iter()
        .enumerate()
    {
        let (status, s) = send(
            &app,
            Method::PUT,
            "/api/summaries/quick",
            &t,
            Some(json!({"headline": "Engineer", "content": content})),
        )
        .await;
        assert_eq!(status, 200, "{s}");
        assert_eq!(s["revision"], i + 1);
    }
    let (status, s) = send(&app, Method::GET, "/api/summaries/quick", &t, None).await;
    assert_eq!(status, 200);
    assert_eq!(s["content"], "Data engineer, 8 years.");
    assert_eq!(s["kind"], "quick");
    assert_eq!(
        app.count("SELECT count(*) FROM tenant_jade.summary_revisions WHERE kind = 'quick'")
            .await,
        2
    );
    let (status, profile) = send(
        &app,
        Method::PUT,
        "/api/summaries/profile",
        &t,
        Some(json!({"content": "Long form.", "details": {"links": ["https://example.com"]}})),
    )
    .await;
    assert_eq!(status, 200);
    assert_eq!(profile["revision"], 1);
    assert_eq!(profile["details"]["links"][0], "https://example.com");

    let (status, _) = send(&app, Method::GET, "/api/summaries/other", &t, None).await;
    assert_eq!(status, 404);
    let (status, _) = send(
        &app,
        Method::PUT,
        "/api/summaries/quick",
        &t,
        Some(json!({"content": "x".repeat(2001)})),
    )
    .await;
    assert_eq!(status, 400);
    let (status, _) = send(
        &app,
        Method::PUT,
        "/api/summaries/quick",
        &t,
        Some(json!({"content": "x", "details": [1]})),
    )
    .await;
    assert_eq!(status, 400);
}

#[tokio::test]
async fn skills_record_their_progression() {
    let app = spawn_app().await;
    let t = app.token("kyle").await;
    // A real catalog id, from the shared reference data.
    let (status, catalog) = send(
        &app,
        Method::GET,
        "/api/reference/skills?q=python",
        &t,
        None,
    )
    .await;
    assert_eq!(status, 200, "{catalog}");
    let python = catalog["items"][0]["id"].as_i64().unwrap();

    let (status, s) = send(
        &app,
        Method::POST,
        "/api/skills",
        &t,
        Some(json!({"name": "Python", "catalog_skill_id": python, "level": 2, "years_experience": 1.5, "note": "first course"})),
    )
    .await;
    assert_eq!(status, 201, "{s}");
    let (status, s) = send(
        &app,
        Method::POST,
        "/api/skills",
        &t,
        Some(json!({"name": "python", "level": 4})),
    )
    .await;
    assert_eq!(status, 200, "the same skill, case-insensitively: {s}");
    assert_eq!(s["level"], 4);
    assert_eq!(s["catalog_skill_id"], python, "kept");
    let levels: Vec<i64> = s["progression"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["level"].as_i64().unwrap())
        .collect();
    assert_eq!(levels, [2, 4]);

    let (status, list) = send(&app, Method::GET, "/api/skills", &t, None).await;
    assert_eq!(status, 200);
    assert_eq!(list["items"].as_array().unwrap().len(), 1);
    assert_eq!(list["items"][0]["years_experience"], 1.5);

    let (status, err) = send(
        &app,
        Method::POST,
        "/api/skills",
        &t,
        Some(json!({"name": "Go", "level": 6})),
    )
    .await;
    assert_eq!(status, 400);
    assert_eq!(err["error"]["code"], "invalid_level");
    let (status, err) = send(
        &app,
        Method::POST,
        "/api/skills",
        &t,
        Some(json!({"name": "Go", "level": 3, "catalog_skill_id": 999999})),
    )
    .await;
    assert_eq!(status, 400);
    assert_eq!(err["error"]["code"], "invalid_catalog_skill_id");
}

#[tokio::test]
async fn reference_tables_are_served_from_an_allow_list() {
    let app = spawn_app().await;
    let t = app.token("lena").await;
    for table in [
        "skills",
        "skill_categories",
        "industries",
        "career_paths",
        "role_templates",
        "competencies",
    ] {
        let (status, page) = send(
            &app,
            Method::GET,
            &format!("/api/reference/{table}?limit=5"),
            &t,
            None,
        )
        .await;
        assert_eq!(status, 200, "{table}: {page}");
        assert_eq!(page["items"].as_array().unwrap().len(), 5, "{table}");
        // The next page starts after this one.
        let cursor = page["next_cursor"].as_str().unwrap();
        let (status, next) = send(
            &app,
            Method::GET,
            &format!("/api/reference/{table}?limit=5&cursor={cursor}"),
            &t,
            None,
        )
        .await;
        assert_eq!(status, 200);
        assert_ne!(next["items"][0], page["items"][0], "{table}");
        assert!(
            !page["items"]
                .as_array()
                .unwrap()
                .contains(&next["items"][0]),
            "{table}"
        );
    }
    let (_, found) = send(
        &app,
        Method::GET,
        "/api/reference/industries?q=Information",
        &t,
        None,
    )
    .await;
    assert!(found["items"]
        .as_array()
        .unwrap()
        .iter()
        .any(|i| i["code"] == "51"));
    for table in [
        "users",
        "tenants",
        "pg_authid",
        "..%2Ftenantry",
        "experiences",
    ] {
        let (status, err) = send(
            &app,
            Method::GET,
            &format!("/api/reference/{table}"),
            &t,
            None,
        )
        .await;
        assert_eq!(status, 404, "{table}");
        assert_eq!(err["error"]["code"], "not_found");
    }
    let (status, _) = send(
        &app,
        Method::GET,
        "/api/reference/skills?q=%25%25",
        &t,
        None,
    )
    .await;
    assert_eq!(status, 200, "LIKE wildcards in q are plain text");
}
