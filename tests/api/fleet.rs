//! Fleet migrations against real PostgreSQL: the admin adds a version after
//! the built-in ones and runs `tenantry fleet migrate` (the real binary) over
//! tenants that signed up at the latest built-in one.

use std::process::Output;
use std::time::Duration;

use reqwest::Method;
use serde_json::Value;
use tenantry::tenancy::fleet::RUN_LOCK;

use crate::helpers::*;

/// The version tenants sign up at: the latest built-in template.
fn base_version() -> i32 {
    latest_version()
}

/// The version the admin adds in these tests.
fn added_version() -> i32 {
    base_version() + 1
}

/// The added version's file.
fn rating_file() -> String {
    format!("V{}__rating.sql", added_version())
}

/// A realistic new version: a column with a default and an index.
const RATING: &str = "ALTER TABLE experiences ADD COLUMN rating integer NOT NULL DEFAULT 0;\n\
                         CREATE INDEX experiences_rating_idx ON experiences (rating);\n";

/// The same, slow enough to act while a run is under way.
fn slow_rating(seconds: f64) -> String {
    format!("SELECT pg_sleep({seconds});\n{RATING}")
}

struct Fleet {
    app: TestApp,
    env: Vec<(&'static str, String)>,
    templates: std::path::PathBuf,
}

/// Tenants signed up at the built-in templates' latest version, and a CLI
/// environment whose templates add [`rating_file`].
async fn fleet_at_base(users: &[&str], rating: &str) -> Fleet {
    let app = spawn_app().await;
    for user in users {
        assert_eq!(app.register(user).await.status(), 201, "{user}");
    }
    let templates = builtin_templates_with(&[(&rating_file(), rating)]);
    let mut env = cli_env(&app.db_name);
    env.push(("TENANTRY_TEMPLATES_DIR", templates.display().to_string()));
    Fleet {
        app,
        env,
        templates,
    }
}

impl Fleet {
    /// The service's settings on this database with the added version.
    fn settings(&self) -> tenantry::configuration::Settings {
        let mut settings = test_settings(&self.app.db_name);
        settings.templates_dir = Some(self.templates.clone());
        settings
    }

    /// The service restarted with the added version.
    async fn service(&self) -> TestApp {
        spawn_app_on(self.settings(), self.app.db_name.clone()).await
    }

    /// Give `user` a `rating` column already, so the added version cannot
    /// apply to them.
    async fn poison(&self, user: &str) {
        self.app
            .db()
            .await
            .batch_execute(&format!(
                "ALTER TABLE tenant_{user}.experiences ADD COLUMN rating text"
            ))
            .await
            .unwrap();
    }

    /// `user`'s tenant lock, held (as a request being served would) until
    /// the returned session ends.
    async fn hold_tenant_lock(&self, user: &str) -> tokio_postgres::Client {
        let holder = self.app.db().await;
        holder
            .execute(
                "SELECT pg_advisory_lock($1, hashtext(user_id::text)) FROM tenantry.tenants WHERE username = $2",
                &[&tenantry::tenancy::fleet::TENANT_LOCK_CLASS, &user],
            )
            .await
            .unwrap();
        holder
    }

    async fn fleet(&self, args: &[&str]) -> Output {
        let mut all = vec!["fleet"];
        all.extend_from_slice(args);
        tenantry(&all, &self.env, None).await
    }

    fn fleet_command(&self, args: &[&str]) -> tokio::process::Command {
        let mut cmd = tokio::process::Command::new(env!("CARGO_BIN_EXE_tenantry"));
        cmd.arg("fleet")
            .args(args)
            .env_clear()
            .env("PATH", std::env::var("PATH").unwrap_or_default())
            .env("RUST_LOG", "warn")
            .envs(self.env.iter().map(|(k, v)| (*k, v.clone())))
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .kill_on_drop(true);
        cmd
    }

    async fn registry_version(&self, user: &str) -> i32 {
        self.app
            .db()
            .await
            .query_one(
                "SELECT template_version FROM tenantry.tenants WHERE username = $1",
                &[&user],
            )
            .await
            .unwrap()
            .get(0)
    }

    async fn history_versions(&self, user: &str) -> Vec<i32> {
        history_of(&self.app, &format!("tenant_{user}")).await
    }

    /// Whether the added version's column and index exist in the tenant's
    /// schema.
    async fn has_rating(&self, user: &str) -> (bool, bool) {
        let row = self
            .app
            .db()
            .await
            .query_one(
                "SELECT EXISTS (SELECT 1 FROM information_schema.columns
                                WHERE table_schema = $1 AND table_name = 'experiences' AND column_name = 'rating'),
                        EXISTS (SELECT 1 FROM pg_indexes WHERE schemaname = $1 AND indexname = 'experiences_rating_idx')",
                &[&format!("tenant_{user}")],
            )
            .await
            .unwrap();
        (row.get(0), row.get(1))
    }

    /// The tenant is wholly at the base version or wholly at the added one:
    /// registry, history and tables agree. Returns the version.
    async fn assert_whole(&self, user: &str) -> i32 {
        let version = self.registry_version(user).await;
        let history = self.history_versions(user).await;
        let rating = self.has_rating(user).await;
        match version {
            v if v == base_version() => {
                assert_eq!(history, versions_up_to(v), "{user}");
                assert_eq!(rating, (false, false), "{user}");
            }
            v if v == added_version() => {
                assert_eq!(history, versions_up_to(v), "{user}");
                assert_eq!(rating, (true, true), "{user}");
            }
            other => panic!("{user} is at V{other}"),
        }
        version
    }

    async fn status(&self) -> Value {
        let out = self.fleet(&["status", "--json"]).await;
        assert!(out.status.success(), "{}", stderr(&out));
        serde_json::from_str(&stdout(&out)).unwrap()
    }

    async fn result_of(&self, user: &str) -> Option<(String, Option<String>)> {
        self.app
            .db()
            .await
            .query_opt(
                "SELECT status, error FROM tenantry.fleet_results WHERE username = $1
                 ORDER BY run_id DESC LIMIT 1",
                &[&user],
            )
            .await
            .unwrap()
            .map(|r| (r.get(0), r.get(1)))
    }

    async fn runs(&self) -> i64 {
        self.app
            .count("SELECT count(*) FROM tenantry.fleet_runs")
            .await
    }
}

#[tokio::test]
async fn fleet_migrate_brings_every_tenant_to_the_new_version_and_a_rerun_does_nothing() {
    let fleet = fleet_at_base(&["amy", "ben", "cal", "dee", "eve"], RATING).await;
    let status = fleet.status().await;
    assert_eq!(status["target_version"], added_version());
    assert_eq!(status["pending"], 5);
    assert_eq!(
        status["versions"],
        serde_json::json!([{"version": base_version(), "tenants": 5}])
    );

    let out = fleet.fleet(&["migrate", "--concurrency", "2"]).await;
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(
        stdout(&out).contains("5 migrated, 0 failed"),
        "{}",
        stdout(&out)
    );
    for user in ["amy", "ben", "cal", "dee", "eve"] {
        assert_eq!(fleet.assert_whole(user).await, added_version());
    }
    // The tenant's role owns what the template created.
    let owner: String = fleet
        .app
        .db()
        .await
        .query_one(
            "SELECT tableowner::text FROM pg_tables WHERE schemaname = 'tenant_amy' AND tablename = 'experiences'",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(owner, fleet.app.role_of("amy").await);

    let status = fleet.status().await;
    assert_eq!(status["pending"], 0);
    assert_eq!(status["last_run"]["status"], "succeeded");
    assert_eq!(status["last_run"]["succeeded"], 5);
    assert!(status["last_run"]["started_by"]
        .as_str()
        .unwrap()
        .starts_with("cli:"));

    let again = fleet.fleet(&["migrate"]).await;
    assert!(again.status.success(), "{}", stderr(&again));
    assert!(
        stdout(&again).contains(&format!("0 tenant(s) to V{}", added_version())),
        "{}",
        stdout(&again)
    );
    let results: i64 = fleet
        .app
        .count("SELECT count(*) FROM tenantry.fleet_results")
        .await;
    assert_eq!(results, 5, "the rerun touched no tenant");
}

#[tokio::test]
async fn a_poisoned_tenant_fails_alone_stays_intact_and_succeeds_on_rerun() {
    let fleet = fleet_at_base(&["ann", "bob", "cid", "dot"], RATING).await;
    // bob already has a column of that name: the version cannot apply to him.
    fleet.poison("bob").await;

    let out = fleet.fleet(&["migrate", "--canary", "0"]).await;
    assert_eq!(out.status.code(), Some(1), "{}", stderr(&out));
    assert!(
        stdout(&out).contains("3 migrated, 1 failed"),
        "{}",
        stdout(&out)
    );
    assert!(stdout(&out).contains("failed bob"), "{}", stdout(&out));
    for user in ["ann", "cid", "dot"] {
        assert_eq!(fleet.assert_whole(user).await, added_version());
    }
    assert_eq!(fleet.registry_version("bob").await, base_version());
    assert_eq!(
        fleet.history_versions("bob").await,
        versions_up_to(base_version())
    );
    let (status, error) = fleet.result_of("bob").await.unwrap();
    assert_eq!(status, "failed");
    let error = error.unwrap();
    assert!(
        error.contains(&rating_file()) && error.contains("already exists"),
        "{error}"
    );
    let status = fleet.status().await;
    assert_eq!(status["pending"], 1);
    assert_eq!(status["failed"], 1);
    assert_eq!(status["last_run"]["status"], "failed");
    assert_eq!(status["last_run"]["failures"][0]["username"], "bob");

    // The cause removed, the next run picks up exactly bob.
    fleet
        .app
        .db()
        .await
        .batch_execute("ALTER TABLE tenant_bob.experiences DROP COLUMN rating")
        .await
        .unwrap();
    let out = fleet.fleet(&["migrate"]).await;
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(
        stdout(&out).contains(&format!("1 tenant(s) to V{}", added_version())),
        "{}",
        stdout(&out)
    );
    assert_eq!(fleet.assert_whole("bob").await, added_version());
    assert_eq!(fleet.status().await["failed"], 0);
}

#[tokio::test]
async fn a_failing_canary_stops_the_run_before_the_rest_are_touched() {
    // Tenants go in username order: aaron is the canary.
    let fleet = fleet_at_base(&["aaron", "beth", "carl"], RATING).await;
    fleet.poison("aaron").await;
    let out = fleet.fleet(&["migrate", "--canary", "1"]).await;
    assert_eq!(out.status.code(), Some(1));
    assert!(stdout(&out).contains("a canary failed"), "{}", stdout(&out));
    assert_eq!(fleet.registry_version("aaron").await, base_version());
    assert_eq!(
        fleet.history_versions("aaron").await,
        versions_up_to(base_version())
    );
    for user in ["beth", "carl"] {
        assert_eq!(fleet.assert_whole(user).await, base_version());
    }
    assert!(fleet.result_of("beth").await.is_none());
    assert_eq!(fleet.status().await["last_run"]["status"], "aborted");
}

#[tokio::test]
async fn max_failures_stops_starting_tenants() {
    let fleet = fleet_at_base(&["fay", "gus", "hal", "ida"], RATING).await;
    for user in ["fay", "gus"] {
        fleet.poison(user).await;
    }
    let out = fleet
        .fleet(&[
            "migrate",
            "--canary",
            "0",
            "--concurrency",
            "1",
            "--max-failures",
            "1",
        ])
        .await;
    assert_eq!(out.status.code(), Some(1));
    assert!(stdout(&out).contains("--max-failures"), "{}", stdout(&out));
    assert!(stdout(&out).contains("3 not started"), "{}", stdout(&out));
    assert_eq!(fleet.result_of("fay").await.unwrap().0, "failed");
    assert_eq!(fleet.registry_version("gus").await, base_version());
    assert!(fleet.result_of("gus").await.is_none(), "not started");
    for user in ["hal", "ida"] {
        assert_eq!(fleet.assert_whole(user).await, base_version());
        assert!(fleet.result_of(user).await.is_none(), "not started");
    }
}

#[tokio::test]
async fn a_dry_run_prints_the_plan_and_changes_nothing() {
    let fleet = fleet_at_base(&["jon", "kim"], RATING).await;
    let out = fleet.fleet(&["migrate", "--dry-run"]).await;
    assert!(out.status.success(), "{}", stderr(&out));
    let text = stdout(&out);
    assert!(
        text.contains(&format!(
            "2 tenant(s) would be migrated to V{}",
            added_version()
        )),
        "{text}"
    );
    assert!(
        text.contains("jon")
            && text.contains(&format!(
                "V{} → V{}  {}",
                base_version(),
                added_version(),
                rating_file()
            )),
        "{text}"
    );
    for user in ["jon", "kim"] {
        assert_eq!(fleet.assert_whole(user).await, base_version());
    }
    assert_eq!(fleet.runs().await, 0);
    let recorded: i64 = fleet
        .app
        .count(&format!(
            "SELECT count(*) FROM tenantry.templates WHERE version = {}",
            added_version()
        ))
        .await;
    assert_eq!(recorded, 0, "a dry run records nothing");
}

#[tokio::test]
async fn one_tenant_can_be_migrated_alone() {
    let fleet = fleet_at_base(&["lea", "max"], RATING).await;
    let out = fleet.fleet(&["migrate", "--tenant", "max"]).await;
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(fleet.assert_whole("max").await, added_version());
    assert_eq!(fleet.assert_whole("lea").await, base_version());
    let out = fleet.fleet(&["migrate", "--tenant", "nobody"]).await;
    assert_eq!(out.status.code(), Some(2));
    assert!(
        stderr(&out).contains("no tenant named nobody"),
        "{}",
        stderr(&out)
    );
}

#[tokio::test]
async fn targets_only_go_forward() {
    let fleet = fleet_at_base(&["ned"], RATING).await;
    let out = fleet.fleet(&["migrate", "--to", "3"]).await;
    assert_eq!(out.status.code(), Some(2));
    assert!(
        stderr(&out).contains("templates only go forward"),
        "{}",
        stderr(&out)
    );
    let beyond = (added_version() + 4).to_string();
    let out = fleet.fleet(&["migrate", "--to", &beyond]).await;
    assert_eq!(out.status.code(), Some(2));
    assert!(
        stderr(&out).contains(&format!(
            "no template V{beyond}: the latest is V{}",
            added_version()
        )),
        "{}",
        stderr(&out)
    );
    let out = fleet.fleet(&["migrate", "--to", "zero"]).await;
    assert_eq!(out.status.code(), Some(2));
    assert_eq!(fleet.assert_whole("ned").await, base_version());
    assert_eq!(fleet.runs().await, 0);
}

#[tokio::test]
async fn a_changed_or_missing_template_is_refused_and_nothing_is_touched() {
    let fleet = fleet_at_base(&["oli", "pam"], RATING).await;
    assert!(fleet.fleet(&["migrate"]).await.status.success());

    // The added version edited after it was applied, and one more added:
    // refused, naming the edited one.
    let notes_file = format!("V{}__notes.sql", added_version() + 1);
    std::fs::write(
        fleet.templates.join(rating_file()),
        format!("{RATING}-- tweaked\n"),
    )
    .unwrap();
    std::fs::write(
        fleet.templates.join(&notes_file),
        "CREATE TABLE notes (id bigserial PRIMARY KEY);",
    )
    .unwrap();
    let out = fleet.fleet(&["migrate"]).await;
    assert_eq!(out.status.code(), Some(1));
    assert!(
        stderr(&out).contains(&format!("template {} has changed", rating_file())),
        "{}",
        stderr(&out)
    );
    let refused = tenantry::startup::Application::build(fleet.settings())
        .await
        .err()
        .expect("serve refuses changed templates");
    assert!(refused.to_string().contains(&rating_file()), "{refused}");

    // The added version gone from the set: refused at load (a gap).
    std::fs::remove_file(fleet.templates.join(rating_file())).unwrap();
    let out = fleet.fleet(&["migrate"]).await;
    assert_eq!(out.status.code(), Some(1));
    assert!(
        stderr(&out).contains(&format!("template V{} is missing", added_version())),
        "{}",
        stderr(&out)
    );
    // Only the built-in versions left in the directory: it only proposes;
    // the added version is published, so the run has it from the database
    // (and nothing left to do). A published version without its text is
    // refused: see `health_and_fleet_status_tell_…`.
    std::fs::remove_file(fleet.templates.join(&notes_file)).unwrap();
    let out = fleet.fleet(&["migrate"]).await;
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(
        stdout(&out).contains(&format!("0 tenant(s) to V{}", added_version())),
        "{}",
        stdout(&out)
    );

    for user in ["oli", "pam"] {
        assert_eq!(fleet.assert_whole(user).await, added_version());
    }
    let notes: i64 = fleet
        .app
        .count("SELECT count(*) FROM pg_tables WHERE tablename = 'notes'")
        .await;
    assert_eq!(notes, 0);
    // The first run, and the one with nothing to do: none of the refused.
    assert_eq!(fleet.runs().await, 2);
}

#[tokio::test]
async fn tenants_newer_than_the_published_set_are_refused() {
    let fleet = fleet_at_base(&["quin"], RATING).await;
    assert!(fleet.fleet(&["migrate"]).await.status.success());
    // A published version is never taken back: the database refuses.
    let db = fleet.app.db().await;
    let delete = format!(
        "DELETE FROM tenantry.templates WHERE version = {}",
        added_version()
    );
    let refused = db.batch_execute(&delete).await.unwrap_err();
    assert!(
        refused
            .as_db_error()
            .is_some_and(|e| e.message().contains("may not be removed")),
        "{refused:?}"
    );
    // A control plane that lost the record anyway (restored from a copy
    // older than its tenants, by a superuser, triggers off).
    db.batch_execute(&format!(
        "SET session_replication_role = replica; {delete}; RESET session_replication_role"
    ))
    .await
    .unwrap();
    let env = cli_env(&fleet.app.db_name);
    let out = tenantry(&["fleet", "migrate"], &env, None).await;
    assert_eq!(out.status.code(), Some(1));
    assert!(
        stderr(&out).contains(&format!(
            "1 tenant(s) are at template version {}, newer than the latest published one (V{})",
            added_version(),
            base_version()
        )),
        "{}",
        stderr(&out)
    );
}

#[tokio::test]
async fn a_template_with_commit_is_refused_at_load() {
    let fleet = fleet_at_base(
        &["rae"],
        "ALTER TABLE experiences ADD COLUMN rating int;\nCOMMIT;\n",
    )
    .await;
    let out = fleet.fleet(&["migrate"]).await;
    assert_eq!(out.status.code(), Some(1));
    let err = stderr(&out);
    assert!(
        err.contains(&rating_file())
            && err.contains("line 2")
            && err.contains("COMMIT is not allowed"),
        "{err}"
    );
    assert_eq!(fleet.assert_whole("rae").await, base_version());
    assert_eq!(fleet.runs().await, 0);
}

#[tokio::test]
async fn a_second_runner_is_refused_while_one_holds_the_run_lock() {
    let fleet = fleet_at_base(&["sam", "tia"], &slow_rating(1.0)).await;
    // Forced: the test holds the run lock as another runner would.
    let holder = fleet.app.db().await;
    holder
        .execute(
            "SELECT pg_advisory_lock($1, $2)",
            &[&RUN_LOCK.0, &RUN_LOCK.1],
        )
        .await
        .unwrap();
    let out = fleet.fleet(&["migrate"]).await;
    assert_eq!(out.status.code(), Some(1));
    assert!(
        stderr(&out).contains("another fleet migration is running"),
        "{}",
        stderr(&out)
    );
    assert_eq!(fleet.runs().await, 0);
    drop(holder);

    // A real run under way, and a second one started meanwhile.
    let first = fleet
        .fleet_command(&["migrate", "--concurrency", "1"])
        .spawn()
        .unwrap();
    wait_for(
        &fleet.app,
        "SELECT count(*) FROM tenantry.fleet_runs WHERE status = 'running'",
    )
    .await;
    let second = fleet.fleet(&["migrate"]).await;
    assert_eq!(second.status.code(), Some(1));
    assert!(
        stderr(&second).contains("another fleet migration is running (run 1 started by cli:"),
        "{}",
        stderr(&second)
    );
    let first = first.wait_with_output().await.unwrap();
    assert!(first.status.success(), "{}", stderr(&first));
    for user in ["sam", "tia"] {
        assert_eq!(fleet.assert_whole(user).await, added_version());
    }
}

/// Poll until a counting query returns at least one.
async fn wait_for(app: &TestApp, sql: &str) {
    for _ in 0..400 {
        if app.count(sql).await > 0 {
            return;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    panic!("timed out waiting for: {sql}");
}

#[tokio::test]
async fn a_run_killed_mid_way_leaves_every_tenant_whole_and_the_next_run_finishes() {
    let users = ["uma", "vic", "wes", "xia", "yan", "zoe"];
    let fleet = fleet_at_base(&users, &slow_rating(0.3)).await;
    let mut run = fleet
        .fleet_command(&["migrate", "--concurrency", "1", "--canary", "0"])
        .spawn()
        .unwrap();
    wait_for(
        &fleet.app,
        &format!(
            "SELECT (count(*) >= 2)::int::int8 FROM tenantry.tenants WHERE template_version = {}",
            added_version()
        ),
    )
    .await;
    run.kill().await.unwrap(); // SIGKILL mid-run

    // Let the server finish or roll back what was in flight.
    wait_for(
        &fleet.app,
        "SELECT (count(*) = 0)::int::int8 FROM pg_stat_activity
         WHERE datname = current_database() AND query LIKE '%pg_sleep%' AND pid <> pg_backend_pid()",
    )
    .await;
    let mut done = 0;
    for user in users {
        if fleet.assert_whole(user).await == added_version() {
            done += 1;
        }
    }
    assert!(
        (2..6).contains(&done),
        "{done} of 6 migrated before the kill"
    );
    let status = fleet.status().await;
    assert_eq!(status["last_run"]["status"], "interrupted");
    assert_eq!(status["pending"], 6 - done);

    let out = fleet.fleet(&["migrate"]).await;
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(
        stdout(&out).contains(&format!("{} tenant(s) to V{}", 6 - done, added_version())),
        "{}",
        stdout(&out)
    );
    for user in users {
        assert_eq!(fleet.assert_whole(user).await, added_version());
    }
    let runs: Vec<String> = fleet
        .app
        .db()
        .await
        .query("SELECT status FROM tenantry.fleet_runs ORDER BY id", &[])
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert_eq!(runs, ["interrupted", "succeeded"]);
}

#[tokio::test]
async fn a_dropped_connection_rolls_its_tenant_back_and_the_run_goes_on() {
    let fleet = fleet_at_base(&["abe", "bea", "cyd"], &slow_rating(0.5)).await;
    // Published first: publishing builds a tenant from nothing, which
    // sleeps too, and the connection to drop is a tenant's.
    let published = tenantry(&["templates", "publish"], &fleet.env, None).await;
    assert!(published.status.success(), "{}", stderr(&published));
    let run = fleet
        .fleet_command(&["migrate", "--concurrency", "1", "--canary", "0"])
        .spawn()
        .unwrap();
    let sleeping = "SELECT count(*) FROM pg_stat_activity
                    WHERE datname = current_database() AND query LIKE '%pg_sleep(0.5)%' AND pid <> pg_backend_pid()";
    wait_for(&fleet.app, sleeping).await;
    // The first tenant's (abe's) migration loses its connection mid-template.
    fleet
        .app
        .db()
        .await
        .execute(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity
             WHERE datname = current_database() AND query LIKE '%pg_sleep(0.5)%' AND pid <> pg_backend_pid()",
            &[],
        )
        .await
        .unwrap();
    let out = run.wait_with_output().await.unwrap();
    assert_eq!(out.status.code(), Some(1), "{}", stderr(&out));
    assert_eq!(fleet.assert_whole("abe").await, base_version());
    let (status, error) = fleet.result_of("abe").await.unwrap();
    assert_eq!(status, "failed");
    assert!(error.unwrap().contains("connection"));
    for user in ["bea", "cyd"] {
        assert_eq!(fleet.assert_whole(user).await, added_version());
    }
    let out = fleet.fleet(&["migrate"]).await;
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(fleet.assert_whole("abe").await, added_version());
}

#[tokio::test]
async fn a_busy_tenant_times_out_alone_and_is_retried_by_the_next_run() {
    let fleet = fleet_at_base(&["dan", "eli", "flo"], RATING).await;
    // A long transaction holds a lock on eli's table (a request would).
    let blocker = fleet.app.db().await;
    blocker
        .batch_execute("BEGIN; LOCK TABLE tenant_eli.experiences IN ACCESS SHARE MODE")
        .await
        .unwrap();
    let out = fleet
        .fleet(&["migrate", "--canary", "0", "--lock-timeout", "0.3"])
        .await;
    assert_eq!(out.status.code(), Some(1));
    let (status, error) = fleet.result_of("eli").await.unwrap();
    assert_eq!(status, "failed");
    assert!(error.unwrap().contains("lock timeout"));
    assert_eq!(fleet.assert_whole("eli").await, base_version());
    for user in ["dan", "flo"] {
        assert_eq!(fleet.assert_whole(user).await, added_version());
    }
    blocker.batch_execute("COMMIT").await.unwrap();
    let out = fleet.fleet(&["migrate"]).await;
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(fleet.assert_whole("eli").await, added_version());
}

#[tokio::test]
async fn signups_during_a_run_get_the_latest_version_and_are_not_migrated_again() {
    let old = ["gil", "hua", "ivy", "jax"];
    let fleet = fleet_at_base(&old, &slow_rating(0.6)).await;
    // The service restarted with the new templates, serving signups.
    let service = fleet.service().await;
    // The run cannot end before the signups: jax's tenant lock is held (as
    // a request being served would), and the run waits for it.
    let holder = fleet.hold_tenant_lock("jax").await;

    let run = fleet
        .fleet_command(&[
            "migrate",
            "--concurrency",
            "1",
            "--canary",
            "0",
            "--lock-timeout",
            "120",
        ])
        .spawn()
        .unwrap();
    wait_for(
        &fleet.app,
        "SELECT count(*) FROM tenantry.fleet_runs WHERE status = 'running'",
    )
    .await;
    for user in ["kai", "lou"] {
        let response = service.register(user).await;
        assert_eq!(response.status(), 201);
        assert_eq!(json(response).await["template_version"], added_version());
    }
    let still_running = fleet
        .app
        .count("SELECT count(*) FROM tenantry.fleet_runs WHERE status = 'running'")
        .await;
    assert_eq!(still_running, 1, "the signups happened during the run");
    drop(holder);
    let out = run.wait_with_output().await.unwrap();
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(stdout(&out).contains("4 migrated"), "{}", stdout(&out));
    for user in old.iter().chain(&["kai", "lou"]) {
        assert_eq!(fleet.assert_whole(user).await, added_version());
    }
    assert!(fleet.result_of("kai").await.is_none());
}

#[tokio::test]
async fn requests_keep_working_while_tenants_are_on_different_versions() {
    let fleet = fleet_at_base(&["mia", "noa"], RATING).await;
    assert!(fleet
        .fleet(&["migrate", "--tenant", "noa"])
        .await
        .status
        .success());
    let mut settings = fleet.settings();
    settings.pool_size = 1; // every request on the same connection
    let service = spawn_app_on(settings, fleet.app.db_name.clone()).await;
    for _ in 0..3 {
        for (user, version) in [("mia", base_version()), ("noa", added_version())] {
            let login = service
                .post_json(
                    "/api/auth/login",
                    &serde_json::json!({"username": user, "password": PASSWORD}),
                )
                .await;
            assert_eq!(login.status(), 200);
            let token = json(login).await["access_token"]
                .as_str()
                .unwrap()
                .to_owned();
            let me = service
                .api
                .get(format!("{}/api/me", service.address))
                .bearer_auth(token)
                .send()
                .await
                .unwrap();
            assert_eq!(me.status(), 200);
            assert_eq!(json(me).await["tenant"]["template_version"], version);
        }
    }
}

#[tokio::test]
async fn fleet_check_reports_drift_and_repair_removes_only_orphans() {
    let fleet = fleet_at_base(&["ozzy", "pia", "quy"], RATING).await;
    let prefix = fleet.app.role_prefix().await;
    let db = fleet.app.db().await;
    // Orphans as a crashed or hand-run tenantry would leave them: made by
    // the service role.
    let service = connect_as_service(&fleet.app.db_name).await;
    service
        .batch_execute(&format!(
            "CREATE SCHEMA tenant_ghost;
             CREATE TABLE tenant_ghost.t (id int);
             CREATE ROLE \"{prefix}ghost\" NOLOGIN;"
        ))
        .await
        .unwrap();
    db.batch_execute(&format!(
        "INSERT INTO tenantry.users (username, email, password_hash) VALUES ('lonely', 'lonely@example.com', 'x');
         DROP SCHEMA tenant_pia CASCADE;
         DELETE FROM tenant_quy.refinery_schema_history WHERE version = {};",
        base_version()
    ))
    .await
    .unwrap();

    let out = fleet.fleet(&["check", "--json"]).await;
    assert_eq!(out.status.code(), Some(1));
    let report: Value = serde_json::from_str(&stdout(&out)).unwrap();
    let mut found: Vec<(String, String)> = report["drift"]
        .as_array()
        .unwrap()
        .iter()
        .map(|d| {
            (
                d["kind"].as_str().unwrap().to_owned(),
                d["name"].as_str().unwrap().to_owned(),
            )
        })
        .collect();
    found.sort();
    let mut expected = vec![
        ("history_mismatch".to_string(), "tenant_quy".to_string()),
        ("missing_schema".into(), "tenant_pia".into()),
        ("orphan_role".into(), format!("{prefix}ghost")),
        ("orphan_schema".into(), "tenant_ghost".into()),
        ("user_without_tenant".into(), "lonely".into()),
    ];
    expected.sort();
    assert_eq!(found, expected);
    assert_eq!(fleet.status().await["drift"], 4, "catalog-level drift");

    let out = fleet.fleet(&["check", "--repair"]).await;
    assert_eq!(out.status.code(), Some(1), "two findings need a person");
    assert!(
        stdout(&out).contains("5 finding(s), 3 repaired"),
        "{}",
        stdout(&out)
    );
    let left: (i64, i64, i64) = {
        let row = db
            .query_one(
                "SELECT (SELECT count(*) FROM pg_namespace WHERE nspname = 'tenant_ghost'),
                        (SELECT count(*) FROM pg_roles WHERE rolname = $1),
                        (SELECT count(*) FROM tenantry.users WHERE username = 'lonely')",
                &[&format!("{prefix}ghost")],
            )
            .await
            .unwrap();
        (row.get(0), row.get(1), row.get(2))
    };
    assert_eq!(left, (0, 0, 0));
    // Registered tenants are untouched by a repair.
    assert_eq!(fleet.registry_version("pia").await, base_version());
    assert_eq!(fleet.assert_whole("ozzy").await, base_version());
    // The username is free again.
    assert_eq!(fleet.app.register("lonely").await.status(), 201);
}

/// A token for an account made with `tenantry admin create` (or an
/// `--auditor`), logged in over HTTP.
async fn staff_token(app: &TestApp, name: &str, extra: &[&str]) -> String {
    let mut args = vec!["admin", "create", name, "--email"];
    let email = format!("{name}@example.com");
    args.push(&email);
    args.extend_from_slice(extra);
    let out = tenantry(&args, &cli_env(&app.db_name), Some(PASSWORD)).await;
    assert!(out.status.success(), "{}", stderr(&out));
    let login = app
        .post_json(
            "/api/auth/login",
            &serde_json::json!({"username": name, "password": PASSWORD}),
        )
        .await;
    assert_eq!(login.status(), 200);
    json(login).await["access_token"]
        .as_str()
        .unwrap()
        .to_owned()
}

/// Follow `GET /admin/fleet/migrations/{run_id}` until the run is over.
async fn finished_run(service: &TestApp, token: &str, run_id: i64) -> Value {
    for _ in 0..200 {
        let report = json(
            service
                .api
                .get(format!(
                    "{}/admin/fleet/migrations/{run_id}",
                    service.address
                ))
                .bearer_auth(token)
                .send()
                .await
                .unwrap(),
        )
        .await;
        if report["status"] != "running" {
            return report;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("run {run_id} did not finish");
}

#[tokio::test]
async fn admins_run_and_follow_a_migration_over_http() {
    let fleet = fleet_at_base(&["ray", "sue", "tom"], RATING).await;
    let service = fleet.service().await;
    let admin = staff_token(&service, "root_ops", &[]).await;
    let auditor = staff_token(&service, "audrey", &["--auditor"]).await;
    let user_login = service
        .post_json(
            "/api/auth/login",
            &serde_json::json!({"username": "ray", "password": PASSWORD}),
        )
        .await;
    let user = json(user_login).await["access_token"]
        .as_str()
        .unwrap()
        .to_owned();
    // An admin has no tenant schema.
    assert_eq!(fleet.app.schema_count().await, 3);

    let get = |path: &str, token: Option<&str>| {
        let mut request = service.api.get(format!("{}{path}", service.address));
        if let Some(t) = token {
            request = request.bearer_auth(t);
        }
        request.send()
    };
    let post = |body: Value, token: &str| {
        service
            .api
            .post(format!("{}/admin/fleet/migrations", service.address))
            .bearer_auth(token)
            .json(&body)
            .send()
    };
    assert_eq!(get("/admin/fleet", None).await.unwrap().status(), 401);
    assert_eq!(
        get("/admin/fleet", Some(&user)).await.unwrap().status(),
        403
    );
    assert_eq!(
        get("/admin/fleet", Some(&auditor)).await.unwrap().status(),
        403
    );
    let forbidden = post(serde_json::json!({}), &user).await.unwrap();
    assert_eq!(forbidden.status(), 403);
    assert_eq!(json(forbidden).await["error"]["code"], "forbidden");

    let status = get("/admin/fleet", Some(&admin)).await.unwrap();
    assert_eq!(status.status(), 200);
    let status = json(status).await;
    assert_eq!(status["pending"], 3);
    assert_eq!(status["target_version"], added_version());

    // Bad requests are 400s with the JSON error shape.
    for (body, code) in [
        (
            serde_json::json!({"target_version": added_version() + 4}),
            "invalid_target_version",
        ),
        (
            serde_json::json!({"target_version": 3}),
            "invalid_target_version",
        ),
        (serde_json::json!({"concurrency": 0}), "invalid_concurrency"),
        (serde_json::json!({"surprise": true}), "invalid_json"),
    ] {
        let response = post(body.clone(), &admin).await.unwrap();
        assert_eq!(response.status(), 400, "{body}");
        assert_eq!(json(response).await["error"]["code"], code, "{body}");
    }

    // Another runner holds the lock: 409.
    let holder = fleet.app.db().await;
    holder
        .execute(
            "SELECT pg_advisory_lock($1, $2)",
            &[&RUN_LOCK.0, &RUN_LOCK.1],
        )
        .await
        .unwrap();
    let busy = post(serde_json::json!({}), &admin).await.unwrap();
    assert_eq!(busy.status(), 409);
    assert_eq!(json(busy).await["error"]["code"], "fleet_busy");
    drop(holder);

    let started = post(serde_json::json!({"concurrency": 2, "canary": 1}), &admin)
        .await
        .unwrap();
    assert_eq!(started.status(), 202);
    let started = json(started).await;
    assert_eq!(started["planned"], 3);
    let run_id = started["run_id"].as_i64().unwrap();
    let report = finished_run(&service, &admin, run_id).await;
    assert_eq!(report["status"], "succeeded", "{report}");
    assert_eq!(report["succeeded"], 3);
    assert_eq!(report["started_by"], "admin:root_ops");
    for user in ["ray", "sue", "tom"] {
        assert_eq!(fleet.assert_whole(user).await, added_version());
    }
    let missing = get("/admin/fleet/migrations/999999", Some(&admin))
        .await
        .unwrap();
    assert_eq!(missing.status(), 404);
    let garbage = get("/admin/fleet/migrations/abc", Some(&admin))
        .await
        .unwrap();
    assert_eq!(garbage.status(), 404);
}

#[tokio::test]
async fn a_failed_tenant_shows_in_the_run_report_over_http() {
    let fleet = fleet_at_base(&["uli", "val"], RATING).await;
    fleet.poison("val").await;
    let service = fleet.service().await;
    let admin = staff_token(&service, "ops_lead", &[]).await;
    let run_id = service
        .start_fleet_run(&admin, serde_json::json!({"canary": 0}))
        .await;
    let report = finished_run(&service, &admin, run_id).await;
    assert_eq!(report["status"], "failed", "{report}");
    assert_eq!(report["failed"], 1);
    assert_eq!(report["failures"][0]["username"], "val");
    assert!(report["failures"][0]["error"]
        .as_str()
        .unwrap()
        .contains(&rating_file()));
}

/// A version applied through another process's templates: this `serve`
/// (started before it, without it) says so in `/health`, with how to fix it,
/// and `fleet status` without those templates fails instead of exiting 0.
#[tokio::test]
async fn health_and_fleet_status_tell_when_this_processs_templates_are_refused() {
    let fleet = fleet_at_base(&["ivy"], RATING).await;
    let body = json(fleet.app.get("/health").await).await;
    assert_eq!(body["status"], "healthy", "{body}");

    // The run publishes the added version: the service, started before on
    // the built-in templates, reads it from the database (no restart).
    let out = fleet.fleet(&["migrate"]).await;
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(
        stdout(&out).contains(&format!("published {}", rating_file())),
        "{}",
        stdout(&out)
    );
    let body = json(fleet.app.get("/health").await).await;
    assert_eq!(body["status"], "healthy", "{body}");
    assert_eq!(body["template_version"], added_version(), "{body}");
    let joined = fleet.app.register("jon").await;
    assert_eq!(json(joined).await["template_version"], added_version());

    // A version recorded without its text, as a tenantry before published
    // templates did: nothing can be provisioned or migrated at it.
    let notes_file = format!("V{}__notes.sql", added_version() + 1);
    let notes = builtin_templates_with(&[
        (&rating_file(), RATING),
        (
            &notes_file,
            "CREATE TABLE notes (id bigserial PRIMARY KEY);",
        ),
    ]);
    let checksum = tenantry::templates::TemplateSet::from_dir(&notes)
        .unwrap()
        .all()
        .last()
        .unwrap()
        .checksum()
        .to_string();
    fleet
        .app
        .db()
        .await
        .execute(
            "INSERT INTO tenantry.templates (version, name, checksum) VALUES ($1, 'notes', $2)",
            &[&(added_version() + 1), &checksum],
        )
        .await
        .unwrap();
    let body = json(fleet.app.get("/health").await).await;
    assert_eq!(body["status"], "degraded", "{body}");
    let reasons = body["reasons"].to_string();
    assert!(reasons.contains(&notes_file), "{reasons}");
    assert!(
        reasons.contains("tenantry templates publish DIR"),
        "{reasons}"
    );
    // Signups go on at the newest version that can be used.
    let kept = fleet.app.register("kit").await;
    assert_eq!(json(kept).await["template_version"], added_version());

    let status = tenantry(&["fleet", "status"], &cli_env(&fleet.app.db_name), None).await;
    assert_eq!(status.status.code(), Some(1), "{}", stdout(&status));
    assert!(stdout(&status).contains("REFUSED"), "{}", stdout(&status));
    let as_json = tenantry(
        &["fleet", "status", "--json"],
        &cli_env(&fleet.app.db_name),
        None,
    )
    .await;
    assert_eq!(as_json.status.code(), Some(1), "{}", stderr(&as_json));
    let printed: Value = serde_json::from_str(&stdout(&as_json)).unwrap();
    assert!(
        printed["template_problem"]
            .as_str()
            .is_some_and(|p| p.contains(&notes_file)),
        "{printed}"
    );
    let refused = fleet.fleet(&["migrate"]).await;
    assert_eq!(refused.status.code(), Some(1), "{}", stdout(&refused));
    assert!(
        stderr(&refused).contains(&notes_file),
        "{}",
        stderr(&refused)
    );

    // The fix the messages give: publish the directory that holds it.
    let published = tenantry(
        &["templates", "publish", &notes.display().to_string()],
        &cli_env(&fleet.app.db_name),
        None,
    )
    .await;
    assert!(published.status.success(), "{}", stderr(&published));
    let body = json(fleet.app.get("/health").await).await;
    assert_eq!(body["status"], "degraded", "{body}");
    assert_eq!(body["template_version"], added_version() + 1, "{body}");
    assert!(
        body["reasons"].to_string().contains("tenant(s) behind"),
        "only the tenants behind are left: {body}"
    );
    let fixed = fleet.app.register("lee").await;
    assert_eq!(json(fixed).await["template_version"], added_version() + 1);
    // With no variable set, the same commands are content.
    let env = cli_env(&fleet.app.db_name);
    let status = tenantry(&["fleet", "status"], &env, None).await;
    assert!(status.status.success(), "{}", stdout(&status));
    let out = tenantry(&["fleet", "migrate"], &env, None).await;
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(stdout(&out).contains("3 migrated"), "{}", stdout(&out));
    let body = json(fleet.app.get("/health").await).await;
    assert_eq!(body["status"], "healthy", "{body}");
}

/// Two services on one database: a version published through one (at its
/// start, from its TENANTRY_TEMPLATES_DIR) is what the other's next signup
/// gets, without a restart; the one started on the built-in templates
/// keeps running and a plain CLI command sees the same set.
#[tokio::test]
async fn a_version_published_through_one_service_is_used_by_the_others_next_signup() {
    let fleet = fleet_at_base(&["una"], RATING).await;
    let before = fleet.app.register("vic").await;
    assert_eq!(json(before).await["template_version"], base_version());
    // `serve` publishes its templates' new versions at start.
    let second = fleet.service().await;
    let after = fleet.app.register("wes").await;
    assert_eq!(json(after).await["template_version"], added_version());
    let on_second = second.register("xia").await;
    assert_eq!(json(on_second).await["template_version"], added_version());

    let env = cli_env(&fleet.app.db_name);
    let listed = tenantry(&["templates", "list", "--json"], &env, None).await;
    assert!(listed.status.success(), "{}", stderr(&listed));
    let listed: Value = serde_json::from_str(&stdout(&listed)).unwrap();
    let last = listed["published"]
        .as_array()
        .unwrap()
        .last()
        .unwrap()
        .clone();
    assert_eq!(last["file"], rating_file(), "{listed}");
    let origin = last["origin"].as_str().unwrap();
    assert!(
        origin.contains(&fleet.templates.display().to_string()) && origin.contains("by serve"),
        "{origin}"
    );
    assert_eq!(last["usable"], true);
    // The plain CLI, no variable set, creates tenants at it too.
    let made = tenantry(
        &["tenants", "create", "yan", "--email", "yan@example.com"],
        &env,
        Some(&format!("{PASSWORD}\n")),
    )
    .await;
    assert!(made.status.success(), "{}", stderr(&made));
    assert_eq!(fleet.registry_version("yan").await, added_version());
    // A service restarted without the variable starts, on the published set.
    let plain = spawn_app_on(test_settings(&fleet.app.db_name), fleet.app.db_name.clone()).await;
    let body = json(plain.get("/health").await).await;
    assert_eq!(body["status"], "degraded", "una and vic are behind: {body}");
    assert_eq!(body["template_version"], added_version(), "{body}");
    let restarted = plain.register("zia").await;
    assert_eq!(json(restarted).await["template_version"], added_version());
}

/// Two services on one database: a run started over HTTP on one is seen
/// running on the other, which refuses a second one (409 `fleet_busy`).
#[tokio::test]
async fn a_run_started_on_one_service_is_seen_and_refused_again_on_another() {
    let fleet = fleet_at_base(&["oli"], RATING).await;
    let first = fleet.service().await;
    let second = fleet.service().await;
    let admin = staff_token(&first, "two_ops", &[]).await;
    // The run waits for oli's tenant lock, held here (as a request would).
    let holder = fleet.hold_tenant_lock("oli").await;
    let run_id = first
        .start_fleet_run(&admin, serde_json::json!({"canary": 0}))
        .await;
    wait_for(
        &fleet.app,
        "SELECT count(*) FROM tenantry.fleet_runs WHERE status = 'running'",
    )
    .await;

    let seen = json(
        second
            .call(Method::GET, "/admin/fleet", &admin)
            .send()
            .await
            .unwrap(),
    )
    .await;
    assert_eq!(seen["last_run"]["run_id"], run_id, "{seen}");
    assert_eq!(seen["last_run"]["status"], "running", "{seen}");
    let refused = second
        .call(Method::POST, "/admin/fleet/migrations", &admin)
        .json(&serde_json::json!({}))
        .send()
        .await
        .unwrap();
    assert_eq!(refused.status(), 409);
    assert_eq!(json(refused).await["error"]["code"], "fleet_busy");

    drop(holder);
    let report = || async {
        json(
            second
                .call(
                    Method::GET,
                    &format!("/admin/fleet/migrations/{run_id}"),
                    &admin,
                )
                .send()
                .await
                .unwrap(),
        )
        .await
    };
    until("the run ends", || async {
        report().await["status"] != "running"
    })
    .await;
    let report = report().await;
    assert_eq!(report["status"], "succeeded", "{report}");
}

/// The race a publication and a signup run: the signup's transaction
/// waits for the publishing one (held open here) and, once it commits, is
/// made again at the new version. No tenant is made behind a version
/// published before it committed, so a run planned after the publication
/// misses none.
#[tokio::test]
async fn a_signup_waiting_on_a_publication_is_made_at_the_published_version() {
    let fleet = fleet_at_base(&["zed"], RATING).await;
    let added = tenantry::templates::TemplateSet::from_dir(&fleet.templates).unwrap();
    let added = added.all().last().unwrap().clone();
    // A publication under way, as `templates publish` makes it.
    let publisher = fleet.app.db().await;
    publisher
        .batch_execute("BEGIN; LOCK TABLE tenantry.templates IN EXCLUSIVE MODE")
        .await
        .unwrap();
    publisher
        .execute(
            "INSERT INTO tenantry.templates (version, name, checksum, sql, origin)
             VALUES ($1, $2, $3, $4, 'a test')",
            &[
                &added.version().get(),
                &added.name(),
                &added.checksum().to_string(),
                &added.sql(),
            ],
        )
        .await
        .unwrap();
    let signup = fleet.app.register_in_background("amos");
    let waiting = "SELECT count(*) FROM pg_stat_activity
                   WHERE wait_event_type = 'Lock' AND query LIKE '%provisioning_at%'";
    wait_for(&fleet.app, waiting).await;
    publisher.batch_execute("COMMIT").await.unwrap();
    let made = signup.await.unwrap().unwrap();
    assert_eq!(made.status(), 201);
    assert_eq!(json(made).await["template_version"], added_version());
    assert_eq!(fleet.assert_whole("amos").await, added_version());
    assert_eq!(fleet.status().await["pending"], 1, "only zed is behind");
}

/// The other side of that race: a publication waits for a signup in flight
/// (held here: its name is taken by a transaction not yet ended), so the
/// signup commits at the version it started at and the next run, planned
/// after the publication, has it.
#[tokio::test]
async fn a_publication_waits_for_a_signup_in_flight_and_the_next_run_has_it() {
    let fleet = fleet_at_base(&["yul"], RATING).await;
    // The name taken by a transaction held open here: the signup's insert
    // waits for it, after its first statement took its place before
    // publishing.
    let holder = fleet.app.db().await;
    holder
        .batch_execute(
            "BEGIN; INSERT INTO tenantry.users (id, username, email, password_hash, role)
             VALUES (gen_random_uuid(), 'bea', 'someone@example.com', 'x', 'user')",
        )
        .await
        .unwrap();
    let signup = fleet.app.register_in_background("bea");
    wait_for(
        &fleet.app,
        "SELECT count(*) FROM pg_stat_activity
         WHERE wait_event_type = 'Lock' AND query LIKE '%INSERT INTO tenantry.users%'",
    )
    .await;
    let (dir, env) = (
        fleet.templates.display().to_string(),
        cli_env(&fleet.app.db_name),
    );
    let publish =
        tokio::spawn(async move { tenantry(&["templates", "publish", &dir], &env, None).await });
    wait_for(
        &fleet.app,
        "SELECT count(*) FROM pg_stat_activity
         WHERE wait_event_type = 'Lock' AND query LIKE '%LOCK TABLE tenantry.templates%'",
    )
    .await;
    holder.batch_execute("ROLLBACK").await.unwrap();
    let made = signup.await.unwrap().unwrap();
    assert_eq!(made.status(), 201);
    assert_eq!(json(made).await["template_version"], base_version());
    let published = publish.await.unwrap();
    assert!(published.status.success(), "{}", stderr(&published));
    assert!(
        stdout(&published).contains(&format!("published {}", rating_file())),
        "{}",
        stdout(&published)
    );
    let out = tenantry(&["fleet", "migrate"], &cli_env(&fleet.app.db_name), None).await;
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(stdout(&out).contains("2 migrated"), "{}", stdout(&out));
    for user in ["yul", "bea"] {
        assert_eq!(fleet.assert_whole(user).await, added_version());
    }
}
