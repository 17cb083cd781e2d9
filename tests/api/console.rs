//! The admin console (`GET /admin/ui/`): served from the binary, under a
//! policy that lets it load only its own files and call only the service;
//! and the admin API it stands on (tenants found by part of their name).

use reqwest::Method;
use serde_json::Value;

use crate::helpers::*;

/// The console's files, as the service sends them: (type, policy, body).
async fn asset(app: &TestApp, path: &str) -> (String, String, String) {
    let r = app.get(path).await;
    assert_eq!(r.status(), 200, "{path}");
    let header = |name: &str| {
        r.headers()
            .get(name)
            .map(|v| v.to_str().unwrap().to_owned())
            .unwrap_or_default()
    };
    let (kind, policy) = (header("content-type"), header("content-security-policy"));
    (kind, policy, r.text().await.unwrap())
}

#[tokio::test]
async fn the_console_is_served_from_the_binary_and_loads_nothing_from_elsewhere() {
    let app = spawn_app().await;
    let (kind, policy, page) = asset(&app, "/admin/ui/").await;
    assert_eq!(
        asset(&app, "/admin/ui").await.2,
        page,
        "with or without the slash"
    );
    assert!(kind.starts_with("text/html"), "{kind}");
    let (script_kind, script_policy, script) = asset(&app, "/admin/ui/app.js").await;
    assert!(script_kind.starts_with("text/javascript"), "{script_kind}");
    let (style_kind, style_policy, style) = asset(&app, "/admin/ui/app.css").await;
    assert!(style_kind.starts_with("text/css"), "{style_kind}");

    // The policy: only its own files and API; no inline script or style.
    for p in [&policy, &script_policy, &style_policy] {
        for directive in [
            "default-src 'none'",
            "script-src 'self'",
            "style-src 'self'",
            "connect-src 'self'",
            "frame-ancestors 'none'",
        ] {
            assert!(p.contains(directive), "{directive} in {p}");
        }
        assert!(!p.contains("unsafe"), "{p}");
    }
    // Every script is a file of its own; nothing names another host.
    assert!(page.contains(r#"<script type="module" src="/admin/ui/app.js"></script>"#));
    assert_eq!(page.matches("<script").count(), 1, "{page}");
    let inline_handler = page.match_indices(" on").any(|(at, _)| {
        let rest = &page[at + 3..];
        let letters = rest.chars().take_while(char::is_ascii_lowercase).count();
        letters > 0 && rest[letters..].starts_with('=')
    });
    assert!(!inline_handler, "no inline event handlers: {page}");
    for (name, text) in [("page", &page), ("script", &script), ("style", &style)] {
        for other_host in ["http://", "https://", "//cdn", "url("] {
            assert!(!text.contains(other_host), "{name} names {other_host}");
        }
    }
    // The token is kept in memory, never in storage or a cookie.
    for kept in ["localStorage", "sessionStorage", "document.cookie"] {
        assert!(!script.contains(kept), "the script uses {kept}");
    }

    let missing = app.get("/admin/ui/other.js").await;
    assert_eq!(missing.status(), 404);
    assert_eq!(json(missing).await["error"]["code"], "not_found");
}

#[tokio::test]
async fn admins_find_tenants_by_part_of_their_name() {
    let app = spawn_app().await;
    let admin = admin_token(&app).await;
    for name in ["alice", "malina", "bob"] {
        assert_eq!(app.register(name).await.status(), 201);
    }
    let names = |page: Value| -> Vec<String> {
        page["items"]
            .as_array()
            .unwrap()
            .iter()
            .map(|t| t["username"].as_str().unwrap().to_owned())
            .collect()
    };
    let found = app
        .call(Method::GET, "/admin/tenants?q=LI", &admin)
        .send()
        .await
        .unwrap();
    assert_eq!(found.status(), 200);
    assert_eq!(names(json(found).await), ["alice", "malina"]);
    let page = app
        .call(Method::GET, "/admin/tenants?q=li&limit=1", &admin)
        .send()
        .await
        .unwrap();
    let page = json(page).await;
    assert_eq!(names(page.clone()), ["alice"]);
    let cursor = page["next_cursor"].as_str().unwrap();
    let next = app
        .call(
            Method::GET,
            &format!("/admin/tenants?q=li&limit=1&cursor={cursor}"),
            &admin,
        )
        .send()
        .await
        .unwrap();
    assert_eq!(names(json(next).await), ["malina"]);
    let too_long = app
        .call(
            Method::GET,
            &format!("/admin/tenants?q={}", "a".repeat(201)),
            &admin,
        )
        .send()
        .await
        .unwrap();
    assert_eq!(too_long.status(), 400);
    assert_eq!(json(too_long).await["error"]["code"], "invalid_q");
}

/// Headless Chromium, driven over WebDriver by a `chromedriver` this test
/// starts (Debian's `chromium` and `chromium-driver`; `.ci/run` installs
/// them).
struct Browser {
    driver: thirtyfour::WebDriver,
    chromedriver: tokio::process::Child,
    _profile: tempfile::TempDir,
}

impl Drop for Browser {
    fn drop(&mut self) {
        if let Some(pid) = self.chromedriver.id() {
            let _ = nix::sys::signal::killpg(
                nix::unistd::Pid::from_raw(pid as i32),
                nix::sys::signal::Signal::SIGKILL,
            );
        }
    }
}

impl Browser {
    async fn start() -> Browser {
        use thirtyfour::{ChromiumLikeCapabilities, DesiredCapabilities, WebDriver};
        let chromedriver = ["/usr/bin/chromedriver", "/usr/lib/chromium/chromedriver"]
            .into_iter()
            .find(|p| std::path::Path::new(p).exists())
            .expect(
                "chromedriver is missing: apt-get install chromium chromium-driver (.ci/run does)",
            );
        // A port found free may be taken before chromedriver binds it (by
        // another test): then it exits, and another port is tried.
        let (port, child) = 'started: {
            for _ in 0..5 {
                let port = free_port();
                let mut child = tokio::process::Command::new(chromedriver)
                    .arg(format!("--port={port}"))
                    // Its own process group, Chromium's processes with it:
                    // `Drop` ends them all, whatever the test did.
                    .process_group(0)
                    .stdout(std::process::Stdio::null())
                    .stderr(std::process::Stdio::null())
                    .kill_on_drop(true)
                    .spawn()
                    .unwrap();
                let status = format!("http://127.0.0.1:{port}/status");
                let mut exited = false;
                until("chromedriver answers or exits", || {
                    exited = child.try_wait().unwrap().is_some();
                    let (status, exited) = (status.clone(), exited);
                    async move {
                        exited
                            || reqwest::get(&status)
                                .await
                                .is_ok_and(|r| r.status().is_success())
                    }
                })
                .await;
                if !exited {
                    break 'started (port, child);
                }
            }
            panic!("chromedriver did not start");
        };
        let profile = tempfile::tempdir().unwrap();
        let mut caps = DesiredCapabilities::chrome();
        for arg in [
            "--headless=new",
            // As root (CI) Chromium runs only without its sandbox.
            "--no-sandbox",
            "--disable-dev-shm-usage",
            "--window-size=1280,800",
            &format!("--user-data-dir={}", profile.path().display()),
        ] {
            caps.add_arg(arg).unwrap();
        }
        let driver = WebDriver::new(format!("http://127.0.0.1:{port}"), caps)
            .await
            .expect("a Chromium session");
        Browser {
            driver,
            chromedriver: child,
            _profile: profile,
        }
    }

    async fn find(&self, css: &str) -> thirtyfour::WebElement {
        self.driver
            .find(thirtyfour::By::Css(css))
            .await
            .unwrap_or_else(|e| panic!("{css}: {e}"))
    }

    /// The texts of what `css` finds now.
    async fn texts(&self, css: &str) -> Vec<String> {
        let mut texts = Vec::new();
        if let Ok(found) = self.driver.find_all(thirtyfour::By::Css(css)).await {
            for e in found {
                texts.push(e.text().await.unwrap_or_default());
            }
        }
        texts
    }

    /// Until `css` finds an element whose text is `text`.
    async fn until_text(&self, css: &str, text: &str) {
        until(&format!("{css} says {text:?}"), || async {
            self.texts(css).await.iter().any(|t| t == text)
        })
        .await;
    }

    async fn type_into(&self, css: &str, text: &str) {
        let field = self.find(css).await;
        field.clear().await.unwrap();
        field.send_keys(text).await.unwrap();
    }

    async fn click(&self, css: &str) {
        self.find(css).await.click().await.unwrap();
    }

    async fn sign_in(&self, app: &TestApp, username: &str) {
        self.driver
            .goto(format!("{}/admin/ui/", app.address))
            .await
            .unwrap();
        self.until_text("h1", "Sign in").await;
        self.type_into("#username", username).await;
        self.type_into("#password", PASSWORD).await;
        self.click("form button[type=submit]").await;
    }

    /// Every URL the page loaded (itself, its files, its API calls).
    async fn requested(&self) -> Vec<String> {
        let urls = self
            .driver
            .execute(
                "return [location.href].concat(performance.getEntriesByType('resource').map(e => e.name));",
                Vec::new(),
            )
            .await
            .unwrap();
        urls.convert().unwrap()
    }

    /// A screenshot into `TENANTRY_SCREENSHOTS` when it is set
    /// (`scripts/console-screenshots`).
    async fn screenshot(&self, name: &str) {
        if let Some(dir) = std::env::var_os("TENANTRY_SCREENSHOTS") {
            let png = self.driver.screenshot_as_png().await.unwrap();
            std::fs::write(std::path::Path::new(&dir).join(format!("{name}.png")), png).unwrap();
        }
    }

    async fn quit(self) {
        self.driver.clone().quit().await.unwrap();
    }
}

#[tokio::test]
async fn in_a_browser_an_admin_finds_suspends_resumes_and_erases_a_tenant() {
    let app = spawn_app().await;
    let admin = admin_token(&app).await;
    for name in ["alice", "malina", "bob"] {
        assert_eq!(app.register(name).await.status(), 201);
    }
    let browser = Browser::start().await;
    browser.sign_in(&app, "ops").await;
    browser.until_text("h1", "Tenants").await;
    browser.until_text("#who", "ops (admin)").await;
    until("three tenants listed", || async {
        browser.texts("tbody tr td:first-child").await == ["alice", "bob", "malina"]
    })
    .await;
    browser.screenshot("tenants").await;

    // Search by part of the name, open the tenant.
    browser.type_into("#q", "lin").await;
    browser.click("form[role=search] button").await;
    until("only malina", || async {
        browser.texts("tbody tr td:first-child").await == ["malina"]
    })
    .await;
    browser.click("tbody a").await;
    browser.until_text("h1", "malina").await;
    browser.until_text("dd[data-field=Status]", "active").await;
    browser.screenshot("tenant").await;

    // Suspend with a reason, then resume; the API agrees each time.
    browser.type_into("#reason", "checking a complaint").await;
    browser.click(".actions form:first-child button").await;
    browser.until_text(".message", "Suspended.").await;
    browser
        .until_text("dd[data-field=Status]", "suspended")
        .await;
    let status = |body: Value| body["status"].as_str().unwrap().to_owned();
    let malina = app
        .call(Method::GET, "/admin/tenants/malina", &admin)
        .send()
        .await
        .unwrap();
    assert_eq!(status(json(malina).await), "suspended");
    browser.click(".actions form:first-child button").await;
    browser.until_text(".message", "Resumed.").await;
    browser.until_text("dd[data-field=Status]", "active").await;

    // Erase: the name typed wrong refuses; typed right, the receipt shows.
    browser.type_into("#confirm-name", "malin").await;
    browser.click("button.danger").await;
    browser
        .until_text(".message", "Type malina to erase this tenant.")
        .await;
    browser.type_into("#confirm-name", "malina").await;
    browser.click("button.danger").await;
    browser.until_text("h1", "malina erased").await;
    let receipt: Value =
        serde_json::from_str(&browser.find("pre").await.text().await.unwrap()).unwrap();
    assert_eq!(receipt["username"], "malina");
    let gone = app
        .call(Method::GET, "/admin/tenants/malina", &admin)
        .send()
        .await
        .unwrap();
    assert_eq!(gone.status(), 404);

    // Everything the pages loaded came from the service itself.
    let requested = browser.requested().await;
    assert!(requested.len() > 3, "{requested:?}");
    for url in &requested {
        assert!(url.starts_with(&app.address), "{url} is another host's");
    }

    // ops' sessions revoked elsewhere: the console's next call is refused,
    // and it asks to sign in again (nothing else drawn over the form).
    let revoked = app
        .call(Method::POST, "/api/auth/revoke-all", &admin)
        .send()
        .await
        .unwrap();
    assert!(revoked.status().is_success(), "{}", revoked.status());
    browser.click("nav a[href='#/tenants']").await;
    browser
        .until_text(".message", "Your session ended; sign in again.")
        .await;
    browser.until_text("h1", "Sign in").await;
    assert!(!browser.find("#nav").await.is_displayed().await.unwrap());
    browser.quit().await;
}

#[tokio::test]
async fn in_a_browser_the_console_refuses_a_tenant_and_shows_an_auditor_only_the_audit_log() {
    let app = spawn_app().await;
    assert_eq!(app.register("rolf").await.status(), 201);
    let out = tenantry(
        &[
            "admin",
            "create",
            "audra",
            "--auditor",
            "--email",
            "audra@example.com",
        ],
        &cli_env(&app.db_name),
        Some(PASSWORD),
    )
    .await;
    assert!(out.status.success(), "{}", stderr(&out));

    let browser = Browser::start().await;
    browser.sign_in(&app, "rolf").await;
    browser
        .until_text(
            ".message",
            "This account is neither an admin nor an auditor.",
        )
        .await;
    browser.until_text("h1", "Sign in").await;
    assert!(!browser.find("#nav").await.is_displayed().await.unwrap());

    browser.sign_in(&app, "audra").await;
    browser.until_text("h1", "Audit log").await;
    browser.until_text("#who", "audra (auditor)").await;
    let entries = app.count("SELECT count(*) FROM tenantry.audit_log").await;
    browser
        .until_text(
            "#chain",
            &format!("Chain verified: {entries} entries, 0 anchor(s) match."),
        )
        .await;
    until("the audit log lists the signup", || async {
        browser
            .texts("tbody td:nth-child(3)")
            .await
            .iter()
            .any(|a| a == "register")
    })
    .await;
    assert!(
        !browser
            .find("nav a[href='#/tenants']")
            .await
            .is_displayed()
            .await
            .unwrap(),
        "no tenants page for an auditor"
    );
    browser.screenshot("audit").await;
    // The tenants page sends an auditor back to the audit log.
    browser
        .driver
        .execute("location.hash = '#/tenants';", Vec::new())
        .await
        .unwrap();
    until("back on the audit log", || async {
        browser.driver.current_url().await.unwrap().fragment() == Some("/audit")
    })
    .await;
    browser.until_text("h1", "Audit log").await;
    // A reload signs out: the token was in memory only.
    browser.driver.refresh().await.unwrap();
    browser.until_text("h1", "Sign in").await;
    // Signing out ends the sign-in's session on the server too.
    browser.sign_in(&app, "audra").await;
    browser.until_text("h1", "Audit log").await;
    browser.click("#sign-out").await;
    browser.until_text(".message", "Signed out.").await;
    browser.until_text("h1", "Sign in").await;
    browser.quit().await;
}

#[tokio::test]
async fn in_a_browser_an_admin_previews_starts_and_follows_a_fleet_run_and_retries_its_failure() {
    let app = spawn_app().await;
    for name in ["uma", "vic", "wes"] {
        assert_eq!(app.register(name).await.status(), 201);
    }
    // A version the service publishes at start; wes already has its column,
    // so it fails for wes.
    let added = latest_version() + 1;
    let file = format!("V{added}__rating.sql");
    let templates = builtin_templates_with(&[(
        &file,
        "ALTER TABLE experiences ADD COLUMN rating integer NOT NULL DEFAULT 0;\n",
    )]);
    let db = app.db().await;
    db.batch_execute("ALTER TABLE tenant_wes.experiences ADD COLUMN rating text")
        .await
        .unwrap();
    let mut settings = test_settings(&app.db_name);
    settings.templates_dir = Some(templates);
    let service = spawn_app_on(settings, app.db_name.clone()).await;
    admin_token(&service).await;

    let browser = Browser::start().await;
    browser.sign_in(&service, "ops").await;
    browser.until_text("h1", "Tenants").await;
    browser.click("nav a[href='#/fleet']").await;
    browser.until_text("h1", "Fleet").await;
    browser
        .until_text("dd[data-field='Latest version']", &added.to_string())
        .await;
    browser
        .until_text("dd[data-field='Behind the latest']", "3")
        .await;

    browser.type_into("#concurrency", "2").await;
    browser.type_into("#canary", "0").await;
    browser.click("form.filters button[type=submit]").await;
    browser
        .until_text(
            "#preview .message",
            &format!("The run migrates 3 tenant(s) to version {added}, 2 at a time, the first 0 alone (a canary that fails stops it)."),
        )
        .await;
    browser.click("#start-run").await;
    browser.until_text("dd[data-field=Status]", "failed").await;
    browser
        .until_text("dd[data-field=Progress]", "3 of 3")
        .await;
    browser.until_text("dd[data-field=Succeeded]", "2").await;
    assert_eq!(browser.texts("tbody td:first-child").await, ["wes"]);
    let error = browser.texts("td.error").await.join("");
    assert!(error.contains(&file), "{error}");
    browser.screenshot("fleet-run").await;

    // wes mended by hand; the failed tenant is retried from the page.
    db.batch_execute("ALTER TABLE tenant_wes.experiences DROP COLUMN rating")
        .await
        .unwrap();
    assert_eq!(
        browser.texts("#retry-failed").await,
        ["Run again for the tenants still behind"]
    );
    browser.click("#retry-failed").await;
    browser
        .until_text("dd[data-field=Progress]", "1 of 1")
        .await;
    browser
        .until_text("dd[data-field=Status]", "succeeded")
        .await;
    browser.click("p a[href='#/fleet']").await;
    browser
        .until_text("dd[data-field='Behind the latest']", "0")
        .await;
    browser.quit().await;
}

#[tokio::test]
async fn in_a_browser_an_admin_sees_a_dead_webhook_delivery_and_sends_it_again() {
    let app = spawn_app_with(|s| s.webhooks.max_attempts = 1).await;
    let admin = admin_token(&app).await;
    // Nothing listens there (the discard port).
    let url = "http://127.0.0.1:9/hooks".to_string();
    let added = app
        .call(Method::POST, "/admin/webhooks", &admin)
        .json(&serde_json::json!({ "url": url }))
        .send()
        .await
        .unwrap();
    assert_eq!(added.status(), 201);
    assert_eq!(app.register("yara").await.status(), 201);
    until("the delivery is dead", || async {
        app.count("SELECT count(*) FROM tenantry.webhook_deliveries WHERE dead_at IS NOT NULL")
            .await
            == 1
    })
    .await;

    let browser = Browser::start().await;
    browser.sign_in(&app, "ops").await;
    browser.until_text("h1", "Tenants").await;
    browser.click("nav a[href='#/webhooks']").await;
    browser.until_text("h1", "Webhooks").await;
    browser.until_text("tbody td:nth-child(2)", &url).await;
    assert_eq!(
        browser.texts("tbody td:nth-child(5)").await,
        ["1"],
        "one dead"
    );
    browser.click("tbody a").await;
    browser
        .until_text("h1", "Endpoint 1: latest deliveries")
        .await;
    assert_eq!(browser.texts("tbody td:nth-child(3)").await, ["dead"]);
    assert_eq!(
        browser.texts("tbody td:nth-child(6)").await,
        ["cannot connect"]
    );
    browser.click("#retry-dead").await;
    browser
        .until_text(".message", "1 dead deliveries are due again.")
        .await;
    browser.quit().await;
}

#[tokio::test]
async fn the_audit_chain_is_verified_over_http_and_a_tampered_entry_is_found() {
    let app = spawn_app().await;
    let admin = admin_token(&app).await;
    assert_eq!(app.register("tess").await.status(), 201);
    let verdict = || async {
        let r = app
            .call(Method::GET, "/admin/audit/verify", &admin)
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200);
        json(r).await
    };
    let entries = app.count("SELECT count(*) FROM tenantry.audit_log").await;
    let intact = verdict().await;
    assert_eq!(intact["intact"], true, "{intact}");
    assert_eq!(intact["entries"], entries);
    // An entry rewritten by a superuser, past the append-only trigger.
    app.db()
        .await
        .batch_execute(
            "SET session_replication_role = replica;
             UPDATE tenantry.audit_log SET entry = entry || ' ' WHERE seq = 2;
             RESET session_replication_role",
        )
        .await
        .unwrap();
    let broken = verdict().await;
    assert_eq!(broken["intact"], false, "{broken}");
    assert_eq!(broken["broken_at"], 2, "{broken}");
    let user = app.access_token("tess").await;
    let refused = app
        .call(Method::GET, "/admin/audit/verify", &user)
        .send()
        .await
        .unwrap();
    assert_eq!(refused.status(), 403);
}
