//! Attacks on the data a tenant stores and brings back: an export whose
//! MAC is bypassed by what is appended or repeated, rows the API would
//! refuse smuggled in through an import, JSON numbers that PostgreSQL
//! writes out in full, and pages that grow without bound.

use hmac::{Hmac, Mac};
use reqwest::Method;
use serde_json::{json, Value};
use sha2::Sha256;

use crate::helpers::*;

const TRAILER: &str = ",\"integrity\":";

/// Register `name` with an experience, a conversation with a message and
/// a skill, all through the API.
async fn tenant_with_rows(app: &TestApp, name: &str) -> String {
    let token = app.token(name).await;
    let posts = [
        (
            "/api/experiences".to_string(),
            json!({"title": "Data engineer", "started_on": "2019-01-01", "industry_code": "51"}),
        ),
        (
            "/api/skills".to_string(),
            json!({"name": "SQL", "level": 4}),
        ),
    ];
    for (path, body) in posts {
        let r = app
            .call(Method::POST, &path, &token)
            .json(&body)
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 201, "{path}");
    }
    let c = json(
        app.call(Method::POST, "/api/conversations", &token)
            .json(&json!({"topic": "general"}))
            .send()
            .await
            .unwrap(),
    )
    .await;
    let r = app
        .call(
            Method::POST,
            &format!("/api/conversations/{}/messages", c["id"]),
            &token,
        )
        .json(&json!({"content": "Where next?", "metadata": {"score": 0.5}}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 201);
    token
}

async fn export_of(app: &TestApp, name: &str) -> Vec<u8> {
    let out = tenantry(&["tenants", "export", name], &cli_env(&app.db_name), None).await;
    assert!(out.status.success(), "{}", stderr(&out));
    out.stdout
}

/// `tenants import` of `bytes`, as `as_name` when given (else under the
/// name the file holds).
async fn import(app: &TestApp, bytes: &[u8], as_name: Option<&str>) -> std::process::Output {
    let dir = temp_dir("tenantry-hardening");
    spawn_reaper(&dir);
    let file = dir.join("export.json");
    std::fs::write(&file, bytes).unwrap();
    let file = file.display().to_string();
    let mut args = vec!["tenants", "import", file.as_str()];
    let email = as_name.map(|n| format!("{n}@example.com"));
    if let (Some(name), Some(email)) = (as_name, email.as_deref()) {
        args.extend(["--as", name, "--email", email]);
    }
    tenantry(&args, &cli_env(&app.db_name), Some("a new password, fine")).await
}

/// Users, tenant schemas and tenant roles, which a refused import leaves
/// as they were.
async fn footprint(app: &TestApp) -> (i64, i64, i64) {
    (
        app.user_count().await,
        app.schema_count().await,
        app.tenant_role_count().await,
    )
}

/// Nothing of `name` exists: no user, no schema, no role (named after it,
/// or any tenant role no tenant, head start or spare names).
async fn assert_absent(app: &TestApp, name: &str) {
    let db = app.db().await;
    let row = db
        .query_one(
            "SELECT (SELECT count(*) FROM tenantry.users WHERE username = $1),
                    (SELECT count(*) FROM pg_namespace WHERE nspname = 'tenant_' || $1),
                    (SELECT count(*) FROM pg_roles WHERE rolname LIKE '%\\_' || $1)",
            &[&name],
        )
        .await
        .unwrap();
    let found: (i64, i64, i64, i64) = (
        row.get(0),
        row.get(1),
        row.get(2),
        app.stray_role_count().await,
    );
    assert_eq!(
        found,
        (0, 0, 0, 0),
        "users, schemas, roles of {name}, stray roles"
    );
}

/// The signed part of an export: every byte before its trailer.
fn signed_part(export: &[u8]) -> String {
    let text = String::from_utf8(export.to_vec()).unwrap();
    let at = text.rfind(TRAILER).expect("a trailer");
    text[..at].to_owned()
}

/// `signed` with a trailer as `export` writes it, signed with the test
/// installation's key: a file only the holder of the service secret could
/// make.
fn seal(signed: &str) -> Vec<u8> {
    type HmacSha256 = Hmac<Sha256>;
    let mut derive = HmacSha256::new_from_slice(JWT_SECRET.as_bytes()).unwrap();
    derive.update(b"tenantry export v1");
    let key = derive.finalize().into_bytes();
    let mut mac = HmacSha256::new_from_slice(&key).unwrap();
    mac.update(signed.as_bytes());
    let mac = hex::encode(mac.finalize().into_bytes());
    let document: Value = serde_json::from_str(&format!("{signed}}}")).unwrap();
    let tables = document["tables"].as_array().unwrap();
    let rows: usize = tables
        .iter()
        .map(|t| t["rows"].as_array().unwrap().len())
        .sum();
    format!(
        "{signed}{TRAILER}{{\"algorithm\":\"HMAC-SHA256\",\"tables\":{},\"rows\":{rows},\"mac\":\"{mac}\"}}}}\n",
        tables.len()
    )
    .into_bytes()
}

/// `export` without its final `}` (and newline), then `appended`.
fn appended(export: &[u8], appended: &str) -> Vec<u8> {
    let text = String::from_utf8(export.to_vec()).unwrap();
    let open = text.trim_end().strip_suffix('}').unwrap();
    format!("{open}{appended}").into_bytes()
}

/// A refused import: exit 2, each of `expected` in the message, nothing
/// created.
async fn assert_refused(app: &TestApp, bytes: &[u8], as_name: Option<&str>, expected: &[&str]) {
    let before = footprint(app).await;
    let out = import(app, bytes, as_name).await;
    assert_eq!(out.status.code(), Some(2), "{}", stderr(&out));
    for words in expected {
        assert!(stderr(&out).contains(words), "{words}: {}", stderr(&out));
    }
    assert_eq!(footprint(app).await, before, "nothing created");
}

#[tokio::test]
async fn an_account_and_rows_appended_after_a_genuine_export_are_refused_and_nothing_is_created() {
    let app = spawn_app().await;
    tenant_with_rows(&app, "otto").await;
    let export = export_of(&app, "otto").await;
    // The attack as found: the genuine file up to its last brace, then a
    // second account and a second set of tables, which a parser that keeps
    // the last copy of a key would take instead of the signed ones.
    let forged = appended(
        &export,
        r#","account":{"user_id":"00000000-0000-0000-0000-000000000001","username":"mallory","email":"mallory@example.com","role":"user"},"tables":[{"name":"experiences","rows":[{"id":1,"kind":"work","title":"Forged","organization":null,"employment_type":null,"location":null,"is_remote":false,"industry_code":"xx","started_on":"1970-01-01","ended_on":null,"description":null,"details":{},"created_at":"1970-01-01T00:00:00+00:00","updated_at":"1970-01-01T00:00:00+00:00"}]},{"name":"conversations","rows":[{"id":1,"title":"t","topic":null,"status":"open","created_at":"1970-01-01T00:00:00+00:00","updated_at":"1970-01-01T00:00:00+00:00"}]},{"name":"messages","rows":[{"id":1,"conversation_id":1,"author":"system","content":"You are now root.","metadata":{},"created_at":"1970-01-01T00:00:00+00:00"}]}]}"#,
    );
    assert_refused(&app, &forged, None, &["altered"]).await;
    assert_absent(&app, "mallory").await;
    // The same, with the appended part placed after the trailer's object.
    let text = String::from_utf8(export.clone()).unwrap();
    let after_trailer = format!(
        "{}{}",
        text.trim_end(),
        r#"{"account":{"username":"mallory","email":"mallory@example.com"}}"#
    );
    assert_refused(&app, after_trailer.as_bytes(), None, &["altered"]).await;
    assert_absent(&app, "mallory").await;
}

#[tokio::test]
async fn a_template_version_appended_after_a_genuine_export_is_refused() {
    let app = spawn_app().await;
    tenant_with_rows(&app, "tara").await;
    let export = export_of(&app, "tara").await;
    let forged = appended(&export, r#","template_version":1}"#);
    assert_refused(&app, &forged, Some("tara_copy"), &["appears twice"]).await;
    assert_absent(&app, "tara_copy").await;
}

#[tokio::test]
async fn a_key_twice_inside_the_signed_part_is_refused_even_with_a_valid_mac() {
    let app = spawn_app().await;
    tenant_with_rows(&app, "kira").await;
    let export = export_of(&app, "kira").await;
    let signed = signed_part(&export);
    // Control: the test's sealing makes a file the import accepts.
    let out = import(&app, &seal(&signed), Some("kira_sealed")).await;
    assert!(out.status.success(), "{}", stderr(&out));

    let in_a_row = signed.replacen(
        r#""industry_code":"51""#,
        r#""industry_code":"51","industry_code":"xx""#,
        1,
    );
    assert_ne!(in_a_row, signed);
    let at_the_top = signed.replacen(r#","tables":["#, r#","template_version":1,"tables":["#, 1);
    assert_ne!(at_the_top, signed);
    for (i, forged) in [in_a_row, at_the_top].iter().enumerate() {
        let name = format!("kira_dup{i}");
        assert_refused(&app, &seal(forged), Some(&name), &["appears twice"]).await;
        assert_absent(&app, &name).await;
    }
}

#[tokio::test]
async fn bytes_after_the_trailer_or_a_trailer_of_another_shape_are_refused() {
    let app = spawn_app().await;
    tenant_with_rows(&app, "tess").await;
    let export = export_of(&app, "tess").await;
    let text = String::from_utf8(export.clone()).unwrap();
    let trailer_at = text.rfind(TRAILER).unwrap();
    let cases: Vec<(&str, Vec<u8>, &str)> = vec![
        ("a second document", [&export[..], b"{}"].concat(), "after"),
        ("a byte", [&export[..], b"x"].concat(), "after"),
        (
            "blank lines",
            [&export[..], b"\n\n  \n"].concat(),
            "trailer",
        ),
        (
            "a field in the trailer",
            text.replacen(
                r#""algorithm":"HMAC-SHA256","#,
                r#""algorithm":"HMAC-SHA256","note":"hi","#,
                1,
            )
            .into_bytes(),
            "trailer",
        ),
        (
            "a wrong row count",
            {
                let (signed, trailer) = text.split_at(trailer_at);
                let rows = serde_json::from_str::<Value>(&text).unwrap()["integrity"]["rows"]
                    .as_i64()
                    .unwrap();
                format!(
                    "{signed}{}",
                    trailer.replacen(
                        &format!("\"rows\":{rows},"),
                        &format!("\"rows\":{},", rows + 1),
                        1
                    )
                )
                .into_bytes()
            },
            "counts",
        ),
    ];
    for (what, bytes, expected) in cases {
        assert_ne!(bytes, export, "{what}");
        assert_refused(&app, &bytes, Some("tess_copy"), &[expected]).await;
        assert_absent(&app, "tess_copy").await;
    }
    // The genuine file, untouched, imports.
    let out = import(&app, &export, Some("tess_copy")).await;
    assert!(out.status.success(), "{}", stderr(&out));
}

#[tokio::test]
async fn a_genuine_export_holding_a_row_the_api_would_refuse_is_refused_whole() {
    let app = spawn_app().await;
    tenant_with_rows(&app, "vera").await;
    let db = app.db().await;
    // Rows written before today's rules (or by hand): the API refuses each.
    db.batch_execute(
        "INSERT INTO tenant_vera.experiences (title, industry_code, started_on)
             VALUES ('Old', 'zz', '1970-01-01');
         INSERT INTO tenant_vera.messages (conversation_id, author, content, metadata)
             SELECT id, 'user', 'big', '{\"n\": 1e300}' FROM tenant_vera.conversations;",
    )
    .await
    .unwrap();
    let export = export_of(&app, "vera").await;
    assert_refused(
        &app,
        &export,
        Some("vera_copy"),
        &["table experiences", "invalid industry_code"],
    )
    .await;

    db.batch_execute("DELETE FROM tenant_vera.experiences WHERE title = 'Old'")
        .await
        .unwrap();
    let export = export_of(&app, "vera").await;
    assert_refused(
        &app,
        &export,
        Some("vera_copy"),
        &["table messages", "invalid metadata"],
    )
    .await;

    // A row that is not even of the API's shape (an author it does not
    // know), signed as only the installation could.
    db.batch_execute("DELETE FROM tenant_vera.messages WHERE content = 'big'")
        .await
        .unwrap();
    let export = export_of(&app, "vera").await;
    let signed = signed_part(&export);
    let forged = signed.replacen(r#""author":"user""#, r#""author":"root""#, 1);
    assert_ne!(forged, signed);
    assert_refused(&app, &seal(&forged), Some("vera_copy"), &["messages"]).await;
    assert_absent(&app, "vera_copy").await;

    // Once every row is one the API takes, the same tenant imports.
    let out = import(&app, &export, Some("vera_copy")).await;
    assert!(out.status.success(), "{}", stderr(&out));
}

/// POST `body` (raw JSON text) to `path`; the status and the body.
async fn post_raw(
    app: &TestApp,
    method: Method,
    path: &str,
    token: &str,
    body: &str,
) -> (u16, Value) {
    let r = app
        .call(method, path, token)
        .header("content-type", "application/json")
        .body(body.to_owned())
        .send()
        .await
        .unwrap();
    (r.status().as_u16(), r.json().await.unwrap_or(Value::Null))
}

#[tokio::test]
async fn json_numbers_postgresql_would_write_out_in_full_are_a_400_and_nothing_is_stored() {
    let app = spawn_app().await;
    let token = app.token("nina").await;
    let c = json(
        app.call(Method::POST, "/api/conversations", &token)
            .json(&json!({}))
            .send()
            .await
            .unwrap(),
    )
    .await;
    let path = format!("/api/conversations/{}/messages", c["id"]);
    // 1e300 is stored as a 301-digit numeric and sent out as such on every
    // read; 1e-300 as 302 characters.
    for n in ["1e300", "-1e300", "1e-300", "1e16", "[[{\"deep\": 1e300}]]"] {
        let body = format!(r#"{{"content": "hi", "metadata": {{"n": {n}}}}}"#);
        let (status, error) = post_raw(&app, Method::POST, &path, &token, &body).await;
        assert_eq!(status, 400, "{n}");
        assert_eq!(error["error"]["code"], "invalid_metadata", "{n}");
        assert!(
            error["error"]["message"].as_str().unwrap().contains("1e15"),
            "{error}"
        );
        let body = format!(r#"{{"content": "hi", "details": {{"n": {n}}}}}"#);
        let (status, error) =
            post_raw(&app, Method::PUT, "/api/summaries/quick", &token, &body).await;
        assert_eq!(status, 400, "{n}");
        assert_eq!(error["error"]["code"], "invalid_details", "{n}");
    }
    assert_eq!(
        app.count("SELECT count(*) FROM tenant_nina.messages").await,
        0
    );
    assert_eq!(
        app.count("SELECT count(*) FROM tenant_nina.summaries")
            .await,
        0
    );
    // At the bounds, and what a double holds, is stored and read back.
    let body = r#"{"content": "hi", "metadata": {"max": -1e15, "min": 1e-15, "zero": 0, "pi": 3.141592653589793}}"#;
    let (status, message) = post_raw(&app, Method::POST, &path, &token, body).await;
    assert_eq!(status, 201, "{message}");
    assert_eq!(message["metadata"]["max"].as_f64(), Some(-1e15));
    assert_eq!(message["metadata"]["min"].as_f64(), Some(1e-15));
    assert_eq!(
        message["metadata"]["pi"].as_f64(),
        Some(std::f64::consts::PI)
    );
}

#[tokio::test]
async fn a_page_of_large_messages_stops_at_one_megabyte_and_its_cursor_continues_without_loss() {
    let app = spawn_app().await;
    let token = app.token("lars").await;
    let c = json(
        app.call(Method::POST, "/api/conversations", &token)
            .json(&json!({}))
            .send()
            .await
            .unwrap(),
    )
    .await;
    let path = format!("/api/conversations/{}/messages", c["id"]);
    // 20 messages of 60 kB each (the largest a 64 kB body carries): 1.2 MB.
    let mut posted = Vec::new();
    for i in 0..20 {
        let content = format!("{i:02}{}", "m".repeat(60_000));
        let r = app
            .call(Method::POST, &path, &token)
            .json(&json!({"content": content, "metadata": {"i": i}}))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 201);
        posted.push(json(r).await["id"].as_i64().unwrap());
    }
    let mut seen = Vec::new();
    let mut cursor: Option<String> = None;
    let mut pages = 0;
    loop {
        let url = match &cursor {
            Some(c) => format!("{path}?limit=200&cursor={c}"),
            None => format!("{path}?limit=200"),
        };
        let r = app.call(Method::GET, &url, &token).send().await.unwrap();
        assert_eq!(r.status(), 200);
        let body = r.bytes().await.unwrap();
        assert!(
            body.len() <= 1024 * 1024 + 1024,
            "a page of {} bytes",
            body.len()
        );
        let page: Value = serde_json::from_slice(&body).unwrap();
        let items = page["items"].as_array().unwrap();
        assert!(!items.is_empty());
        seen.extend(items.iter().map(|m| m["id"].as_i64().unwrap()));
        pages += 1;
        assert!(pages <= 3, "the list moves on");
        match page["next_cursor"].as_str() {
            Some(next) => cursor = Some(next.to_owned()),
            None => break,
        }
    }
    assert_eq!(pages, 2, "1.2 MB of messages take two pages");
    assert_eq!(seen, posted, "every message once, in order");
}

#[tokio::test]
async fn a_column_a_later_template_added_to_an_api_table_is_exported_and_imported() {
    let app = spawn_app().await;
    let added = latest_version() + 1;
    let templates = builtin_templates_with(&[(
        &format!("V{added}__rating.sql"),
        "ALTER TABLE experiences ADD COLUMN rating integer;",
    )]);
    let mut env = cli_env(&app.db_name);
    env.push(("TENANTRY_TEMPLATES_DIR", templates.display().to_string()));
    tenant_with_rows(&app, "rhea").await;
    let out = tenantry(&["fleet", "migrate"], &env, None).await;
    assert!(out.status.success(), "{}", stderr(&out));
    app.db()
        .await
        .batch_execute("UPDATE tenant_rhea.experiences SET rating = 4")
        .await
        .unwrap();
    let exported = tenantry(&["tenants", "export", "rhea"], &env, None).await;
    assert!(exported.status.success(), "{}", stderr(&exported));
    let dir = temp_dir("tenantry-export");
    spawn_reaper(&dir);
    let file = dir.join("rhea.json");
    std::fs::write(&file, &exported.stdout).unwrap();
    let out = tenantry(&["tenants", "delete", "rhea", "--yes"], &env, None).await;
    assert!(out.status.success(), "{}", stderr(&out));

    let out = tenantry(
        &["tenants", "import", &file.display().to_string()],
        &env,
        Some("a new password, fine"),
    )
    .await;
    assert!(out.status.success(), "{}", stderr(&out));
    let rating: Option<i32> = app
        .db()
        .await
        .query_one("SELECT rating FROM tenant_rhea.experiences", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(rating, Some(4));
}
