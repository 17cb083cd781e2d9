//! Usage and quotas: bytes per tenant measured for the whole fleet in one
//! pass and for one tenant on demand; a tenant over its quota gets 403
//! `quota_exceeded` on writes while reads, deletions, export and erasure
//! work, and writes again once back under. From the admin routes and the
//! CLI.

use reqwest::Method;
use serde_json::{json, Value};

use crate::helpers::*;

/// An experience whose description does not compress: ~19 kB stored.
fn bulky(i: usize) -> Value {
    let text: String = (0..600)
        .map(|_| format!("{} ", uuid::Uuid::new_v4().simple()))
        .collect();
    json!({"title": format!("job {i}"), "organization": "Acme",
           "started_on": "2020-01-01", "description": text})
}

/// POST experience `i` ([`bulky`]) as `token`.
async fn post_bulky(app: &TestApp, token: &str, i: usize) -> (u16, Value) {
    send(app, Method::POST, "/api/experiences", token, Some(bulky(i))).await
}

/// Write `n` bulky experiences as `token`; their ids.
async fn fill(app: &TestApp, token: &str, n: usize) -> Vec<i64> {
    let mut ids = Vec::new();
    for i in 0..n {
        let (status, body) = post_bulky(app, token, i).await;
        assert_eq!(status, 201, "{body}");
        ids.push(body["id"].as_i64().unwrap());
    }
    ids
}

async fn usage_of(app: &TestApp, admin: &str, user: &str, refresh: bool) -> Value {
    let path = format!("/admin/tenants/{user}/usage?refresh={refresh}");
    let (status, body) = send(app, Method::GET, &path, admin, None).await;
    assert_eq!(status, 200, "{body}");
    body
}

async fn set_quota(app: &TestApp, admin: &str, user: &str, body: Value) -> (u16, Value) {
    let path = format!("/admin/tenants/{user}/quota");
    send(app, Method::PUT, &path, admin, Some(body)).await
}

fn bytes(usage: &Value) -> i64 {
    usage["bytes"].as_i64().expect("measured")
}

#[tokio::test]
async fn a_tenant_over_its_quota_reads_deletes_and_exports_but_writes_only_once_back_under() {
    let app = spawn_app().await;
    let admin = admin_token(&app).await;
    let token = app.token("quinn").await;

    // Never measured yet: nothing is known, nothing is refused.
    let first = usage_of(&app, &admin, "quinn", false).await;
    assert_eq!(first["bytes"], Value::Null, "{first}");
    assert_eq!(first["quota_bytes"], Value::Null, "no quota by default");
    let empty = bytes(&usage_of(&app, &admin, "quinn", true).await);
    assert!(empty > 0, "an empty tenant's tables and indexes take pages");

    // A quota 200 kB above what the empty schema takes, then 400 kB of rows.
    let quota = empty + 200_000;
    let (status, set) = set_quota(&app, &admin, "quinn", json!({"quota_bytes": quota})).await;
    assert_eq!(status, 200, "{set}");
    assert_eq!(set["quota_bytes"], quota);
    assert_eq!(set["quota_source"], "tenant");
    assert_eq!(set["over_quota_since"], Value::Null);
    let ids = fill(&app, &token, 20).await;
    // Writes go on until a measurement finds the tenant over.
    let over = usage_of(&app, &admin, "quinn", true).await;
    assert!(bytes(&over) > quota, "{over}");
    assert!(over["over_quota_since"].is_string(), "{over}");

    let (status, body) = post_bulky(&app, &token, 99).await;
    assert_eq!(status, 403, "{body}");
    assert_eq!(body["error"]["code"], "quota_exceeded");
    let (status, body) = send(
        &app,
        Method::PATCH,
        &format!("/api/experiences/{}", ids[0]),
        &token,
        Some(json!({"title": "renamed"})),
    )
    .await;
    assert_eq!(status, 403, "an update may grow the tenant too: {body}");
    let (status, body) = send(
        &app,
        Method::GET,
        "/api/experiences?limit=100",
        &token,
        None,
    )
    .await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["items"].as_array().unwrap().len(), ids.len());
    let (status, _) = send(&app, Method::GET, "/api/me/export", &token, None).await;
    assert_eq!(status, 200, "export works over the quota");

    // Deleting is how a tenant gets back under: allowed, and a refresh
    // (which vacuums an over-quota tenant first) lets it write again.
    for id in &ids {
        let (status, body) = send(
            &app,
            Method::DELETE,
            &format!("/api/experiences/{id}"),
            &token,
            None,
        )
        .await;
        assert!(status == 204 || status == 200, "{status} {body}");
    }
    // Rows a transaction elsewhere may still see (a backup's, another
    // test's CREATE DATABASE, which holds every database's horizon) stay
    // until it ends: a later refresh reclaims them.
    until(
        "a refresh finds the tenant back under its quota",
        || async { usage_of(&app, &admin, "quinn", true).await["over_quota_since"] == Value::Null },
    )
    .await;
    let under = usage_of(&app, &admin, "quinn", false).await;
    assert!(bytes(&under) <= quota, "{under}");
    let (status, body) = post_bulky(&app, &token, 7).await;
    assert_eq!(status, 201, "{body}");

    // Erasure works whatever the quota says.
    set_quota(&app, &admin, "quinn", json!({"quota_bytes": 1})).await;
    let (status, body) = post_bulky(&app, &token, 8).await;
    assert_eq!(
        status, 403,
        "a quota below the last measurement refuses at once: {body}"
    );
    app.erase_self(&token).await;
    assert_eq!(
        app.count("SELECT count(*) FROM tenantry.tenant_usage")
            .await,
        0,
        "the erased tenant's usage goes with it"
    );
}

#[tokio::test]
async fn quotas_come_from_the_tenant_or_the_default_and_changes_are_audited() {
    let app = spawn_app_with(|s| s.tenant_quota_bytes = 1).await;
    let admin = admin_token(&app).await;
    let token = app.token("rhea").await;
    let measured = usage_of(&app, &admin, "rhea", true).await;
    assert_eq!(measured["quota_bytes"], 1, "{measured}");
    assert_eq!(measured["quota_source"], "default");
    assert!(measured["over_quota_since"].is_string(), "{measured}");
    let (status, _) = post_bulky(&app, &token, 1).await;
    assert_eq!(status, 403);

    // 0 is no quota for this tenant, whatever the default.
    let (status, none) = set_quota(&app, &admin, "rhea", json!({"quota_bytes": 0})).await;
    assert_eq!(status, 200, "{none}");
    assert_eq!(none["quota_bytes"], Value::Null);
    assert_eq!(none["quota_source"], "tenant");
    assert_eq!(none["over_quota_since"], Value::Null);
    let (status, body) = post_bulky(&app, &token, 2).await;
    assert_eq!(status, 201, "{body}");

    // null: back to the default.
    let (status, back) = set_quota(&app, &admin, "rhea", json!({"quota_bytes": null})).await;
    assert_eq!(status, 200, "{back}");
    assert_eq!(back["quota_source"], "default");
    assert!(back["over_quota_since"].is_string(), "{back}");

    // Bad input: a 400 or 404 with a JSON error, nothing changed.
    for (body, code) in [
        (json!({}), "invalid_quota_bytes"),
        (json!({"quota_bytes": -1}), "invalid_quota_bytes"),
    ] {
        let (status, error) = set_quota(&app, &admin, "rhea", body.clone()).await;
        assert_eq!(status, 400, "{body}: {error}");
        assert_eq!(error["error"]["code"], code, "{body}: {error}");
    }
    for body in [
        json!({"quota_bytes": "lots"}),
        json!({"quota_bytes": 1, "x": 1}),
    ] {
        let (status, error) = set_quota(&app, &admin, "rhea", body.clone()).await;
        assert_eq!(status, 400, "{body}: {error}");
        assert!(error["error"]["code"].is_string(), "{error}");
    }
    let (status, _) = set_quota(&app, &admin, "nobody", json!({"quota_bytes": 5})).await;
    assert_eq!(status, 404);
    let (status, _) = send(
        &app,
        Method::GET,
        "/admin/tenants/nobody/usage",
        &admin,
        None,
    )
    .await;
    assert_eq!(status, 404);
    let (status, _) = set_quota(&app, &token, "rhea", json!({"quota_bytes": 0})).await;
    assert_eq!(status, 403, "a user may not lift their own quota");

    let audited = app
        .count("SELECT count(*) FROM tenantry.audit_log WHERE action = 'tenant_quota_set'")
        .await;
    assert_eq!(audited, 2, "two quota changes, none of the refused ones");
}

#[tokio::test]
async fn the_cli_measures_every_tenant_in_one_pass_and_sets_quotas() {
    let app = spawn_app().await;
    let env = cli_env(&app.db_name);
    let big = app.token("bigco").await;
    for name in ["smallco", "tinyco"] {
        app.token(name).await;
    }
    fill(&app, &big, 10).await;

    let out = tenantry(&["tenants", "usage", "--refresh", "--json"], &env, None).await;
    assert!(out.status.success(), "{}", stderr(&out));
    let all: Vec<Value> = serde_json::from_str(&stdout(&out)).unwrap();
    let names: Vec<&str> = all
        .iter()
        .map(|u| u["username"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["bigco", "smallco", "tinyco"]);
    let size = |name: &str| bytes(all.iter().find(|u| u["username"] == name).unwrap());
    assert!(size("smallco") > 0);
    assert!(
        size("bigco") > size("smallco") + 150_000,
        "ten ~19 kB rows show: {all:?}"
    );
    assert_eq!(
        app.count("SELECT count(*) FROM tenantry.tenant_usage")
            .await,
        3
    );

    // A quota below what bigco takes refuses its writes at once.
    let out = tenantry(&["tenants", "quota", "bigco", "100kB"], &env, None).await;
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(
        stdout(&out).contains("over quota since"),
        "{}",
        stdout(&out)
    );
    let (status, _) = post_bulky(&app, &big, 1).await;
    assert_eq!(status, 403);
    let out = tenantry(&["tenants", "show", "bigco"], &env, None).await;
    assert!(
        stdout(&out).contains("quota state:      over quota since"),
        "{}",
        stdout(&out)
    );
    let out = tenantry(&["tenants", "quota", "bigco", "none"], &env, None).await;
    assert!(out.status.success(), "{}", stderr(&out));
    let (status, _) = post_bulky(&app, &big, 2).await;
    assert_eq!(status, 201);

    // The default comes from the environment of the process that measures.
    let mut strict = env.clone();
    strict.push(("TENANTRY_TENANT_QUOTA_BYTES", "1".into()));
    let out = tenantry(&["tenants", "quota", "bigco", "default"], &strict, None).await;
    assert!(out.status.success(), "{}", stderr(&out));
    let out = tenantry(&["tenants", "usage", "tinyco", "--refresh"], &strict, None).await;
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(
        stdout(&out).contains("over quota since"),
        "{}",
        stdout(&out)
    );

    // Bad input: exit 2 with a message; an unknown tenant: exit 1.
    for args in [
        &["tenants", "quota", "bigco", "-5"][..],
        &["tenants", "quota", "bigco", "1.5GB"][..],
        &["tenants", "quota", "Not A Name", "5"][..],
        &["tenants", "usage", "Not A Name"][..],
    ] {
        let out = tenantry(args, &env, None).await;
        assert_eq!(out.status.code(), Some(2), "{args:?}: {}", stderr(&out));
        assert!(!stderr(&out).is_empty());
    }
    let mut bad_env = env.clone();
    bad_env.push(("TENANTRY_TENANT_QUOTA_BYTES", "a lot".into()));
    let out = tenantry(&["tenants", "usage"], &bad_env, None).await;
    assert_eq!(out.status.code(), Some(2), "{}", stderr(&out));
    assert!(
        stderr(&out).contains("TENANTRY_TENANT_QUOTA_BYTES"),
        "{}",
        stderr(&out)
    );
    for args in [
        &["tenants", "quota", "nobody", "5"][..],
        &["tenants", "usage", "nobody"][..],
    ] {
        let out = tenantry(args, &env, None).await;
        assert_eq!(out.status.code(), Some(1), "{args:?}: {}", stderr(&out));
        assert!(
            stderr(&out).contains("no tenant named nobody"),
            "{}",
            stderr(&out)
        );
    }
}

#[tokio::test]
async fn metrics_show_the_fleets_usage_as_a_distribution_without_names() {
    let app = spawn_app().await;
    for name in ["uma", "ulf"] {
        app.token(name).await;
    }
    let out = tenantry(
        &["tenants", "usage", "--refresh"],
        &cli_env(&app.db_name),
        None,
    )
    .await;
    assert!(out.status.success(), "{}", stderr(&out));
    let text = app.get("/metrics").await.text().await.unwrap();
    let value = |series: &str| -> f64 {
        text.lines()
            .find_map(|l| l.strip_prefix(series).and_then(|v| v.trim().parse().ok()))
            .unwrap_or_else(|| panic!("{series} in {text}"))
    };
    assert_eq!(value("tenantry_tenants_by_usage_bytes{le=\"+Inf\"} "), 2.0);
    assert_eq!(
        value("tenantry_tenants_by_usage_bytes{le=\"10737418240\"} "),
        2.0
    );
    assert_eq!(value("tenantry_tenants_over_quota "), 0.0);
    let total: i64 = app
        .count("SELECT sum(bytes)::int8 FROM tenantry.tenant_usage")
        .await;
    assert_eq!(value("tenantry_tenants_usage_bytes_sum ") as i64, total);
    assert!(
        !text.contains("uma") && !text.contains("ulf"),
        "no tenant named"
    );
}

#[tokio::test]
async fn a_measurement_waiting_on_one_tenant_holds_nothing_others_wait_on() {
    let app = spawn_app().await;
    let ann = app.token("ann").await;
    app.token("bob").await;
    // A transaction that holds bob's table, as a fleet run's does.
    let holder = connect(&app.db_name).await;
    holder
        .batch_execute("BEGIN; LOCK TABLE tenant_bob.experiences IN ACCESS EXCLUSIVE MODE")
        .await
        .unwrap();
    let env = cli_env(&app.db_name);
    let measuring = tokio::spawn(async move {
        tenantry(&["tenants", "usage", "--refresh", "--json"], &env, None).await
    });
    until("the measurement waits for bob's table", || async {
        app.count(
            "SELECT count(*) FROM pg_stat_activity
             WHERE wait_event_type = 'Lock' AND query LIKE '%n.nspname = t.schema_name%'",
        )
        .await
            == 1
    })
    .await;

    // Meanwhile a signup, a write, a migration's DDL on another tenant's
    // table and an erasure all go through.
    assert_eq!(app.register("cleo").await.status(), 201);
    let (status, body) = post_bulky(&app, &ann, 1).await;
    assert_eq!(status, 201, "{body}");
    app.db()
        .await
        .batch_execute("ALTER TABLE tenant_ann.experiences ADD COLUMN extra integer")
        .await
        .unwrap();
    app.erase_self(&ann).await;
    assert!(!measuring.is_finished(), "still waiting for bob's table");

    holder.batch_execute("COMMIT").await.unwrap();
    let out = measuring.await.unwrap();
    assert!(out.status.success(), "{}", stderr(&out));
    let all: Vec<Value> = serde_json::from_str(&stdout(&out)).unwrap();
    let names: Vec<&str> = all
        .iter()
        .map(|u| u["username"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["bob", "cleo"]);
    assert!(bytes(&all[0]) > 0, "bob measured: {all:?}");
    assert_eq!(all[1]["bytes"], Value::Null, "cleo came after it began");
}

#[tokio::test]
async fn serve_measures_the_fleet_at_its_interval() {
    let app = spawn_app_with(|s| {
        s.maintenance_interval = std::time::Duration::from_secs(1);
        s.usage_interval = Some(std::time::Duration::from_secs(1));
        s.tenant_quota_bytes = 1;
    })
    .await;
    let token = app.token("vera").await;
    until(
        "serve measures vera and finds her over the default quota",
        || async {
            app.count(
            "SELECT count(*) FROM tenantry.tenants t JOIN tenantry.tenant_usage g USING (user_id)
             WHERE t.username = 'vera' AND g.bytes > 0 AND t.over_quota_since IS NOT NULL",
        )
        .await
            == 1
        },
    )
    .await;
    let (status, body) = post_bulky(&app, &token, 1).await;
    assert_eq!(status, 403, "{body}");
}

#[tokio::test]
async fn admins_list_tenants_largest_first_a_page_at_a_time() {
    let app = spawn_app().await;
    let admin = admin_token(&app).await;
    let mut tokens = std::collections::HashMap::new();
    for name in ["alice", "bob", "carol", "dave"] {
        tokens.insert(name, app.token(name).await);
    }
    fill(&app, &tokens["carol"], 6).await;
    fill(&app, &tokens["bob"], 2).await;
    for name in ["alice", "bob", "carol", "dave"] {
        usage_of(&app, &admin, name, true).await;
    }
    // erin and fay are never measured: they come last.
    app.token("erin").await;
    app.token("fay").await;

    let list = |query: String| {
        let app = &app;
        let admin = &admin;
        async move {
            let (status, body) = send(
                app,
                Method::GET,
                &format!("/admin/tenants?{query}"),
                admin,
                None,
            )
            .await;
            assert_eq!(status, 200, "{query}: {body}");
            body
        }
    };
    let names = |page: &Value| -> Vec<String> {
        page["items"]
            .as_array()
            .unwrap()
            .iter()
            .map(|t| t["username"].as_str().unwrap().to_owned())
            .collect()
    };
    let whole = list("sort=size".into()).await;
    let order = names(&whole);
    assert_eq!(order.len(), 6, "{whole}");
    assert_eq!(order[..2], ["carol", "bob"], "{whole}");
    assert_eq!(order[4..], ["erin", "fay"], "{whole}");
    // Largest first, equal sizes by name, the unmeasured last.
    let keys: Vec<(i64, String)> = whole["items"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| {
            (
                -t["usage_bytes"].as_i64().unwrap_or(-1),
                t["username"].as_str().unwrap().to_owned(),
            )
        })
        .collect();
    let mut sorted = keys.clone();
    sorted.sort();
    assert_eq!(keys, sorted, "{whole}");
    assert!(whole["items"][4]["usage_bytes"].is_null(), "{whole}");

    // One or two at a time (pages that end on a measured tenant, on an
    // unmeasured one): the same order, nothing lost or repeated.
    for limit in [1, 2] {
        let mut paged = Vec::new();
        let mut query = format!("sort=size&limit={limit}");
        loop {
            let page = list(query.clone()).await;
            paged.extend(names(&page));
            match page["next_cursor"].as_str() {
                Some(cursor) => query = format!("sort=size&limit={limit}&cursor={cursor}"),
                None => break,
            }
        }
        assert_eq!(paged, order, "limit {limit}");
    }

    // With a search, and a cursor of one order refused by the other.
    let with_a = list("sort=size&q=a".into()).await;
    assert_eq!(names(&with_a)[0], "carol", "{with_a}");
    let refused = |query: String| {
        let (app, admin) = (&app, &admin);
        async move {
            let (status, body) = send(
                app,
                Method::GET,
                &format!("/admin/tenants?{query}"),
                admin,
                None,
            )
            .await;
            assert_eq!(
                (status, &body["error"]["code"]),
                (400, &json!("invalid_cursor")),
                "{query}"
            );
        }
    };
    let by_name = list("limit=1".into()).await;
    let cursor = by_name["next_cursor"].as_str().unwrap();
    refused(format!("sort=size&cursor={cursor}")).await;
    let by_size = list("sort=size&limit=1".into()).await;
    let cursor = by_size["next_cursor"].as_str().unwrap();
    refused(format!("cursor={cursor}")).await;
    let (status, body) = send(
        &app,
        Method::GET,
        "/admin/tenants?sort=weight",
        &admin,
        None,
    )
    .await;
    assert_eq!(status, 400, "{body}");
}
