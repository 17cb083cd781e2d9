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

    let (icon_kind, _, icon) = asset(&app, "/admin/ui/icon.svg").await;
    assert_eq!(icon_kind, "image/svg+xml");
    assert!(icon.starts_with("<svg"), "{icon}");
    assert!(
        page.contains(r#"href="/admin/ui/icon.svg""#),
        "the page names its icon"
    );

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
    /// At 1280×800, the size the console is made for.
    async fn start() -> Browser {
        Browser::start_sized(1280, 800).await
    }

    async fn start_sized(width: u32, height: u32) -> Browser {
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
            &format!("--window-size={width},{height}"),
            &format!("--user-data-dir={}", profile.path().display()),
        ] {
            caps.add_arg(arg).unwrap();
        }
        // A desktop window is at least 500 pixels wide: a phone's width is
        // Chromium's own emulation of one.
        if width < 500 {
            caps.add_experimental_option(
                "mobileEmulation",
                serde_json::json!({
                    "deviceMetrics": { "width": width, "height": height, "pixelRatio": 2.0, "mobile": true, "touch": false }
                }),
            )
            .unwrap();
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

    /// Until `css` finds an element.
    async fn until_present(&self, css: &str) {
        until(&format!("{css} is on the page"), || async {
            self.driver
                .find_all(thirtyfour::By::Css(css))
                .await
                .is_ok_and(|found| !found.is_empty())
        })
        .await;
    }

    /// Until `css` finds an element whose text is `text`.
    async fn until_text(&self, css: &str, text: &str) {
        until(&format!("{css} says {text:?}"), || async {
            self.texts(css).await.iter().any(|t| t == text)
        })
        .await;
    }

    /// Until `css` finds an element whose text starts with `prefix`; that
    /// text.
    async fn until_text_starting(&self, css: &str, prefix: &str) -> String {
        let found = std::sync::Mutex::new(None);
        until(&format!("{css} starts with {prefix:?}"), || async {
            let text = self
                .texts(css)
                .await
                .into_iter()
                .find(|t| t.starts_with(prefix));
            let seen = text.is_some();
            *found.lock().unwrap() = text;
            seen
        })
        .await;
        found.into_inner().unwrap().expect("found")
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
        self.screenshot("sign-in").await;
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

    /// Show the console's page `hash` (`#/fleet`), as a link would.
    async fn open(&self, hash: &str) {
        self.driver
            .execute("location.hash = arguments[0];", vec![Value::from(hash)])
            .await
            .unwrap();
    }

    /// What makes the page shown hard to use: wider than the window (a
    /// sideways scroll of the whole page; a wide table scrolls in its own
    /// box), or a form control without a label.
    async fn unusable(&self) -> Vec<String> {
        let found = self
            .driver
            .execute(
                r#"const problems = [];
                   const width = document.documentElement.clientWidth;
                   if (document.documentElement.scrollWidth > width)
                     problems.push(`the page is ${document.documentElement.scrollWidth}px wide in ${width}px`);
                   for (const el of document.querySelectorAll("input, select, textarea, button")) {
                     if (el.closest("[hidden]")) continue;
                     const named = el.labels?.length || el.getAttribute("aria-label")
                       || (el.tagName === "BUTTON" && el.textContent.trim());
                     if (!named) problems.push(`${el.tagName.toLowerCase()}#${el.id} has no label`);
                   }
                   return problems;"#,
                Vec::new(),
            )
            .await
            .unwrap();
        found.convert().unwrap()
    }

    /// The element that has the keyboard's focus, with `keys` typed into it.
    async fn keys(&self, keys: impl Into<thirtyfour::TypingData>) {
        self.driver
            .active_element()
            .await
            .unwrap()
            .send_keys(keys)
            .await
            .unwrap();
    }

    /// Tab from where the focus is until it is on `css` (at most 40 keys).
    async fn tab_to(&self, css: &str) {
        let target = self.find(css).await;
        for _ in 0..40 {
            if self.driver.active_element().await.unwrap() == target {
                return;
            }
            self.keys(thirtyfour::Key::Tab).await;
        }
        panic!("tabbing never reached {css}");
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

    // Largest first: bob, the only one with a row, once measured.
    let (status, _) = send(
        &app,
        Method::POST,
        "/api/experiences",
        &app.access_token("bob").await,
        Some(serde_json::json!({"title": "Engineer", "organization": "Acme", "started_on": "2020-01-01"})),
    )
    .await;
    assert_eq!(status, 201);
    for name in ["alice", "bob", "malina"] {
        let (status, _) = send(
            &app,
            Method::GET,
            &format!("/admin/tenants/{name}/usage?refresh=true"),
            &admin,
            None,
        )
        .await;
        assert_eq!(status, 200);
    }
    thirtyfour::components::SelectElement::new(&browser.find("#sort").await)
        .await
        .unwrap()
        .select_by_value("size")
        .await
        .unwrap();
    browser.click("form[role=search] button").await;
    until("bob first", || async {
        browser.texts("tbody tr td:first-child").await == ["bob", "alice", "malina"]
    })
    .await;
    let sizes = browser.texts("tbody tr td:nth-child(4)").await;
    assert!(sizes.iter().all(|s| s.ends_with("KiB")), "{sizes:?}");
    browser.screenshot("tenants").await;
    browser.open("#/tenants").await;
    until("by name again", || async {
        browser.texts("tbody tr td:first-child").await == ["alice", "bob", "malina"]
    })
    .await;

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

    let before = app.count("SELECT count(*) FROM tenantry.audit_log").await;
    browser.sign_in(&app, "audra").await;
    browser.until_text("h1", "Audit log").await;
    browser.until_text("#who", "audra (auditor)").await;
    // The verdict counts the log as it was when the page asked: audra's
    // sign-in and all before it at least, nothing that was not written by
    // the time the page shows it.
    let verdict = browser
        .until_text_starting("#chain", "Chain verified: ")
        .await;
    let after = app.count("SELECT count(*) FROM tenantry.audit_log").await;
    let entries: i64 = verdict["Chain verified: ".len()..]
        .split_once(' ')
        .and_then(|(n, _)| n.parse().ok())
        .unwrap_or_else(|| panic!("no count of entries in {verdict:?}"));
    assert!(
        (before + 1..=after).contains(&entries),
        "{verdict:?}: the log held {before} entries before the sign-in, {after} after the page"
    );
    assert_eq!(
        verdict,
        format!("Chain verified: {entries} entries, 0 anchor(s) match. (No anchor written yet: serve writes them to its anchor file as it runs.)")
    );
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
    browser.screenshot("fleet").await;

    browser.type_into("#concurrency", "2").await;
    browser.type_into("#canary", "0").await;
    browser.click("form.filters button[type=submit]").await;
    browser
        .until_text(
            "#preview .message",
            &format!("The run migrates 3 tenant(s) to version {added}, 2 at a time, the first 0 alone (a canary that fails stops it)."),
        )
        .await;
    // The service's own plan, in the order of the run; nothing started.
    browser
        .until_text(
            "#planned",
            &format!(
                "In this order: uma (V{}), vic (V{}), wes (V{})",
                added - 1,
                added - 1,
                added - 1
            ),
        )
        .await;
    assert_eq!(
        service
            .count("SELECT count(*) FROM tenantry.fleet_runs")
            .await,
        0,
        "a preview starts no run"
    );
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
    browser.screenshot("webhooks").await;
    browser.click("tbody a").await;
    browser
        .until_text("h1", "Endpoint 1: latest deliveries")
        .await;
    assert_eq!(browser.texts("tbody td:nth-child(3)").await, ["dead"]);
    assert_eq!(
        browser.texts("tbody td:nth-child(6)").await,
        ["cannot connect"]
    );
    browser.screenshot("deliveries").await;
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

#[tokio::test]
async fn a_tenants_page_counts_its_live_sessions_and_names_its_node() {
    let app = spawn_app().await;
    let admin = admin_token(&app).await;
    let (status, registered) = {
        let r = app.register("sol").await;
        (r.status(), json(r).await)
    };
    assert_eq!(status, 201);
    app.access_token("sol").await;
    app.access_token("sol").await;
    // One of the three sessions signs out.
    let out = app
        .post_json(
            "/api/auth/logout",
            &serde_json::json!({ "refresh_token": registered["refresh_token"] }),
        )
        .await;
    assert!(out.status().is_success(), "{}", out.status());
    let (status, sol) = send(&app, Method::GET, "/admin/tenants/sol", &admin, None).await;
    assert_eq!(status, 200, "{sol}");
    assert_eq!(sol["sessions"], 2, "{sol}");
    assert_eq!(
        sol["username"], "sol",
        "the registry's fields as before: {sol}"
    );
    assert_eq!(sol["template_version"], latest_version(), "{sol}");
    if on_citus() {
        let (_, nodes) = send(&app, Method::GET, "/admin/cluster", &admin, None).await;
        let workers: Vec<String> = nodes
            .as_array()
            .unwrap()
            .iter()
            .filter(|n| n["role"] == "worker")
            .map(|n| format!("{}:{}", n["host"].as_str().unwrap(), n["port"]))
            .collect();
        let node = sol["node"].as_str().unwrap_or_default().to_owned();
        assert!(workers.contains(&node), "{node} among {workers:?}");
    } else {
        assert!(sol["node"].is_null(), "no node on plain PostgreSQL: {sol}");
    }
    // The CLI shows the same.
    let out = tenantry(&["tenants", "show", "sol"], &cli_env(&app.db_name), None).await;
    assert!(
        stdout(&out).contains("sessions:         2"),
        "{}",
        stdout(&out)
    );
}

#[tokio::test]
async fn in_a_browser_every_page_works_from_the_keyboard_and_fits_a_phone() {
    let app = spawn_app_with(|s| s.webhooks.max_attempts = 1).await;
    let admin = admin_token(&app).await;
    for name in ["pia", "zed"] {
        assert_eq!(app.register(name).await.status(), 201);
    }
    // A long URL in a table: the table scrolls, not the page.
    let long = format!("http://127.0.0.1:9/{}", "hooks/".repeat(30));
    let (status, _) = send(
        &app,
        Method::POST,
        "/admin/webhooks",
        &admin,
        Some(serde_json::json!({ "url": long })),
    )
    .await;
    assert_eq!(status, 201);
    // A run to show (of nothing: every tenant is at the latest version).
    let run = app.fleet_run_over_http(&admin).await["run_id"]
        .as_i64()
        .unwrap();

    for (width, height) in [(390, 844), (1280, 800)] {
        let browser = Browser::start_sized(width, height).await;
        // Signing in from the keyboard alone: the name field has the
        // focus, Tab reaches the password, Enter sends.
        browser
            .driver
            .goto(format!("{}/admin/ui/", app.address))
            .await
            .unwrap();
        browser.until_text("h1", "Sign in").await;
        let shown = browser
            .driver
            .execute("return document.documentElement.clientWidth;", Vec::new())
            .await
            .unwrap()
            .convert::<u32>()
            .unwrap();
        assert!(
            shown <= width && shown + 20 >= width,
            "the page is {shown}px wide in a {width}px window"
        );
        assert_eq!(
            browser.unusable().await,
            Vec::<String>::new(),
            "sign-in at {width}px"
        );
        browser.keys("ops").await;
        browser.keys(thirtyfour::Key::Tab).await;
        browser.keys(PASSWORD).await;
        browser.keys(thirtyfour::Key::Enter).await;
        browser.until_text("h1", "Tenants").await;

        // The menu is reached with Tab and followed with Enter.
        browser.tab_to("nav a[href='#/fleet']").await;
        browser.keys(thirtyfour::Key::Enter).await;
        browser.until_text("h1", "Fleet").await;
        // A search typed and sent from the keyboard.
        browser.tab_to("nav a[href='#/tenants']").await;
        browser.keys(thirtyfour::Key::Enter).await;
        browser.until_text("h1", "Tenants").await;
        browser.tab_to("#q").await;
        browser.keys("pi").await;
        browser.keys(thirtyfour::Key::Enter).await;
        until("the search from the keyboard, its page drawn", || async {
            browser.driver.current_url().await.unwrap().fragment() == Some("/tenants?q=pi")
                && browser.texts("tbody td:first-child").await == ["pia"]
        })
        .await;
        browser.tab_to("tbody a").await;
        browser.keys(thirtyfour::Key::Enter).await;
        browser.until_text("h1", "pia").await;

        let mut pages = vec![
            ("#/tenants", "Tenants".to_string()),
            ("#/tenants/pia", "pia".to_string()),
            ("#/fleet", "Fleet".to_string()),
            ("#/fleet/runs/RUN", format!("Run {run}")),
            ("#/webhooks", "Webhooks".to_string()),
            ("#/webhooks/1", "Endpoint 1: latest deliveries".to_string()),
            ("#/audit", "Audit log".to_string()),
        ];
        if on_citus() {
            pages.push(("#/cluster", "Cluster".to_string()));
        }
        for (hash, title) in &pages {
            let hash = hash.replace("RUN", &run.to_string());
            browser.open(&hash).await;
            browser.until_text("h1", title).await;
            // The heading is drawn with the page's data, in one go.
            assert_eq!(
                browser.unusable().await,
                Vec::<String>::new(),
                "{hash} at {width}px"
            );
        }
        if width < 600 {
            browser.open("#/tenants").await;
            until("both tenants listed", || async {
                browser.texts("tbody td:first-child").await == ["pia", "zed"]
            })
            .await;
            browser.screenshot("tenants-phone").await;
        }
        browser.quit().await;
    }
}

#[tokio::test]
async fn in_a_browser_an_admin_moves_a_tenant_and_rebalances_on_citus_and_sees_no_cluster_page_elsewhere(
) {
    let app = spawn_app().await;
    let admin = admin_token(&app).await;
    for name in ["ada", "ben"] {
        assert_eq!(app.register(name).await.status(), 201);
    }
    let browser = Browser::start().await;
    browser.sign_in(&app, "ops").await;
    browser.until_text("h1", "Tenants").await;
    // Whether the cluster page is there is asked after signing in.
    let asked = if on_citus() { "yes" } else { "no" };
    browser
        .until_present(&format!("#nav[data-cluster={asked}]"))
        .await;
    if on_citus() {
        cluster_pages(&app, &admin, &browser).await;
    } else {
        // Plain PostgreSQL: no cluster in the menu; the page says why.
        assert!(!browser
            .find("nav a[href='#/cluster']")
            .await
            .is_displayed()
            .await
            .unwrap());
        browser.open("#/cluster").await;
        browser
            .until_text(".message", "This database is not a Citus coordinator.")
            .await;
        browser.open("#/tenants/ada").await;
        browser.until_text("dd[data-field=Sessions]", "1").await;
        assert!(browser.texts("dd[data-field=Node]").await.is_empty());
    }
    browser.quit().await;
}

/// The Citus half of the test above: the nodes, a tenant moved from the
/// page, a rebalance followed to its end.
async fn cluster_pages(app: &TestApp, admin: &str, browser: &Browser) {
    let node_of = |name: &'static str| async move {
        let (_, t) = send(
            app,
            Method::GET,
            &format!("/admin/tenants/{name}"),
            admin,
            None,
        )
        .await;
        t["node"].as_str().unwrap().to_owned()
    };
    let (_, nodes) = send(app, Method::GET, "/admin/cluster", admin, None).await;
    let names: Vec<String> = nodes
        .as_array()
        .unwrap()
        .iter()
        .map(|n| format!("{}:{}", n["host"].as_str().unwrap(), n["port"]))
        .collect();
    assert_eq!(names.len(), 3, "a coordinator and two workers: {nodes}");
    let first_worker = names[1].clone();

    browser.click("nav a[href='#/cluster']").await;
    browser.until_text("h1", "Cluster").await;
    until("the nodes listed", || async {
        browser.texts("tbody td:first-child").await == names
    })
    .await;
    assert_eq!(
        browser.texts("tbody td:nth-child(2)").await,
        ["coordinator", "worker", "worker"]
    );

    // Both tenants onto the first worker, from the page.
    for name in ["ada", "ben"] {
        let from = node_of(name).await;
        browser.type_into("#move-tenant", name).await;
        thirtyfour::components::SelectElement::new(&browser.find("#move-node").await)
            .await
            .unwrap()
            .select_by_value(&first_worker)
            .await
            .unwrap();
        browser.click("form.filters button").await;
        let said = if from == first_worker {
            format!("{name} is on {first_worker} already.")
        } else {
            let mode = if app
                .db()
                .await
                .query_one("SELECT current_setting('wal_level')", &[])
                .await
                .unwrap()
                .get::<_, String>(0)
                == "logical"
            {
                "online"
            } else {
                "blocking its writes"
            };
            format!("Moved {name} from {from} to {first_worker} ({mode}) in")
        };
        until(&format!("the page says: {said}"), || async {
            browser
                .texts(".message")
                .await
                .iter()
                .any(|t| t.starts_with(&said))
        })
        .await;
        assert_eq!(node_of(name).await, first_worker);
    }
    until("two tenants on the first worker", || async {
        browser.texts("tbody td:nth-child(4)").await == ["0", "2", "0"]
    })
    .await;
    browser.screenshot("cluster").await;
    browser.type_into("#move-tenant", "nobody").await;
    browser.click("form.filters button").await;
    browser
        .until_text(".message", "There is no tenant named nobody.")
        .await;

    // A rebalance, followed to its end on its own page.
    browser.click("#rebalance").await;
    browser.until_text("dd[data-field=State]", "finished").await;
    let moves = browser.texts("dd[data-field=Moves]").await.join("");
    let (done, total) = moves.split_once(" of ").expect("done of total");
    assert_eq!(done, total, "{moves}");
    assert!(done.parse::<i64>().unwrap() >= 1, "{moves}");
    browser.screenshot("rebalance").await;
    browser.click("p a[href='#/cluster']").await;
    until("a tenant on each worker", || async {
        browser.texts("tbody td:nth-child(4)").await == ["0", "1", "1"]
    })
    .await;
    // A tenant's page names its node.
    browser.open("#/tenants/ada").await;
    let ada = node_of("ada").await;
    browser.until_text("dd[data-field=Node]", &ada).await;
}

#[tokio::test]
async fn a_dry_run_over_http_says_what_a_run_would_migrate_and_starts_none() {
    let app = spawn_app().await;
    let admin = admin_token(&app).await;
    for name in ["ann", "ben"] {
        assert_eq!(app.register(name).await.status(), 201);
    }
    let added = latest_version() + 1;
    let templates = builtin_templates_with(&[(
        &format!("V{added}__notes.sql"),
        "CREATE TABLE notes (id bigserial PRIMARY KEY, body text NOT NULL);",
    )]);
    let mut settings = test_settings(&app.db_name);
    settings.templates_dir = Some(templates);
    let service = spawn_app_on(settings, app.db_name.clone()).await;

    let (status, plan) = send(
        &service,
        Method::POST,
        "/admin/fleet/migrations",
        &admin,
        Some(serde_json::json!({ "dry_run": true, "canary": 1 })),
    )
    .await;
    assert_eq!(status, 200, "{plan}");
    assert_eq!(plan["target_version"], added);
    assert_eq!(plan["planned"], 2);
    assert_eq!(
        plan["tenants"],
        serde_json::json!([
            { "username": "ann", "from_version": added - 1 },
            { "username": "ben", "from_version": added - 1 },
        ])
    );
    // Nothing started, nothing changed.
    assert_eq!(
        service
            .count("SELECT count(*) FROM tenantry.fleet_runs")
            .await,
        0
    );
    assert_eq!(
        service
            .count(&format!(
                "SELECT count(*) FROM tenantry.tenants WHERE template_version = {added}"
            ))
            .await,
        0
    );
    // Bad options are refused as a run's are.
    let (status, body) = send(
        &service,
        Method::POST,
        "/admin/fleet/migrations",
        &admin,
        Some(serde_json::json!({ "dry_run": true, "target_version": 0 })),
    )
    .await;
    assert_eq!(status, 400, "{body}");
}
