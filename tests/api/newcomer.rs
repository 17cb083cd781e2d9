//! What a newcomer meets first: the password prompt, the logs, the help,
//! `/metrics` and the messages of the errors they are most likely to hit.

use std::process::{Output, Stdio};
use std::time::Duration;

use reqwest::Method;
use serde_json::json;

use crate::helpers::*;
use terminal::Terminal;

/// How long a command may take before it counts as stuck (waiting for a
/// password nobody will type, say).
const STUCK: Duration = Duration::from_secs(60);

/// Run `tenantry` with stdin open and never written: a command that reads
/// it waits until [`STUCK`], which fails the test.
async fn tenantry_without_input(args: &[&str], env: &[(&str, String)]) -> Output {
    let mut cmd = tokio::process::Command::new(env!("CARGO_BIN_EXE_tenantry"));
    cmd.args(args)
        .env_clear()
        .env("PATH", std::env::var("PATH").unwrap_or_default())
        .env("RUST_LOG", "warn")
        .env("BCRYPT_COST", "4")
        .envs(env.iter().map(|(k, v)| (k, v)))
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true);
    let mut child = cmd.spawn().expect("spawn tenantry");
    let stdin = child.stdin.take();
    let out = tokio::time::timeout(STUCK, child.wait_with_output())
        .await
        .unwrap_or_else(|_| panic!("{args:?} waited for input instead of failing"))
        .expect("run tenantry");
    drop(stdin);
    out
}

#[tokio::test]
async fn a_bad_name_or_email_exits_2_without_asking_for_a_password() {
    let db = create_database().await;
    let env = cli_env(&db);
    for args in [
        ["tenants", "create", "x'; drop", "--email", "a@example.com"],
        ["tenants", "create", "olga", "--email", "nope"],
        ["admin", "create", "root", "--email", "a@example.com"],
        ["admin", "create", "olga", "--email", "nope"],
    ] {
        let out = tenantry_without_input(&args, &env).await;
        assert_eq!(out.status.code(), Some(2), "{args:?}: {}", stderr(&out));
    }
}

#[tokio::test]
async fn a_taken_name_or_email_fails_before_the_password_is_asked_for() {
    let db = create_database().await;
    let env = cli_env(&db);
    let create = ["tenants", "create", "paul", "--email", "paul@example.com"];
    let out = tenantry(&create, &env, Some(&format!("{PASSWORD}\n"))).await;
    assert!(out.status.success(), "{}", stderr(&out));

    let out = tenantry_without_input(&create, &env).await;
    assert_eq!(out.status.code(), Some(1), "{}", stderr(&out));
    assert!(stderr(&out).contains("already taken"), "{}", stderr(&out));

    let other_name = ["tenants", "create", "paula", "--email", "paul@example.com"];
    let out = tenantry_without_input(&other_name, &env).await;
    assert_eq!(out.status.code(), Some(1), "{}", stderr(&out));
    assert!(
        stderr(&out).contains("already registered"),
        "{}",
        stderr(&out)
    );

    let admin = ["admin", "create", "paul", "--email", "boss@example.com"];
    let out = tenantry_without_input(&admin, &env).await;
    assert_eq!(out.status.code(), Some(1), "{}", stderr(&out));
    assert!(stderr(&out).contains("already taken"), "{}", stderr(&out));
}

#[tokio::test]
async fn a_missing_secret_is_a_usage_error_before_the_password_is_asked_for() {
    let db = create_database().await;
    let env = cli_env(&db);
    // DATABASE_URL without JWT_SECRET: the audit pseudonyms cannot be keyed.
    for args in [
        ["tenants", "create", "rita", "--email", "rita@example.com"],
        ["admin", "create", "rita", "--email", "rita@example.com"],
    ] {
        let out = tenantry_without_input(&args, &env[..1]).await;
        assert_eq!(out.status.code(), Some(2), "{args:?}: {}", stderr(&out));
        assert!(stderr(&out).contains("JWT_SECRET"), "{}", stderr(&out));
    }
}

#[tokio::test]
async fn importing_under_a_new_name_with_a_taken_email_suggests_the_email_option() {
    let db = create_database().await;
    let env = cli_env(&db);
    let create = ["tenants", "create", "alice", "--email", "alice@example.com"];
    let out = tenantry(&create, &env, Some(&format!("{PASSWORD}\n"))).await;
    assert!(out.status.success(), "{}", stderr(&out));
    let export = tenantry(&["tenants", "export", "alice"], &env, None).await;
    assert!(export.status.success(), "{}", stderr(&export));
    let file = temp_dir("tenantry-import").join("alice.json");
    std::fs::write(&file, &export.stdout).unwrap();
    let file = file.display().to_string();

    let out = tenantry_without_input(&["tenants", "import", &file, "--as", "alice2"], &env).await;
    assert_eq!(out.status.code(), Some(1), "{}", stderr(&out));
    let message = stderr(&out);
    assert!(
        message.contains("email is already registered") && message.contains("--email"),
        "{message}"
    );

    let out = tenantry(
        &[
            "tenants",
            "import",
            &file,
            "--as",
            "alice2",
            "--email",
            "alice2@example.com",
        ],
        &env,
        Some(&format!("{PASSWORD}\n")),
    )
    .await;
    assert!(out.status.success(), "{}", stderr(&out));
}

#[tokio::test]
async fn a_password_typed_on_a_terminal_is_not_echoed() {
    let db = create_database().await;
    let env = cli_env(&db);
    let typed = "violet kettle on a tuesday";
    let screen = tokio::task::spawn_blocking(move || {
        let mut term = Terminal::run(
            &["tenants", "create", "gina", "--email", "gina@example.com"],
            &env,
        );
        term.wait_for_output("password for gina: ");
        term.wait_for_echo_off();
        term.type_line(typed);
        term.wait_for_output("the same again: ");
        term.wait_for_echo_off();
        term.type_line(typed);
        term.finish()
    })
    .await
    .unwrap();
    assert!(screen.status.success(), "{}", screen.text);
    assert!(
        screen.text.contains("created tenant gina"),
        "{}",
        screen.text
    );
    assert!(!screen.text.contains(typed), "echoed: {}", screen.text);

    // The password typed is the one set.
    let app = spawn_app_on(test_settings(&db), db.clone()).await;
    let login = app
        .post_json(
            "/api/auth/login",
            &json!({"username": "gina", "password": typed}),
        )
        .await;
    assert_eq!(login.status(), 200);
}

#[tokio::test]
async fn two_different_passwords_typed_on_a_terminal_are_a_usage_error() {
    let db = create_database().await;
    let env = cli_env(&db);
    let screen = tokio::task::spawn_blocking(move || {
        let mut term = Terminal::run(
            &["tenants", "create", "hugo", "--email", "hugo@example.com"],
            &env,
        );
        term.wait_for_output("password for hugo: ");
        term.wait_for_echo_off();
        term.type_line("correct horse battery staple");
        term.wait_for_output("the same again: ");
        term.wait_for_echo_off();
        term.type_line("correct horse battery stapler");
        term.finish()
    })
    .await
    .unwrap();
    assert_eq!(screen.status.code(), Some(2), "{}", screen.text);
    assert!(screen.text.contains("differ"), "{}", screen.text);
    let out = tenantry(&["tenants", "list", "--json"], &cli_env(&db), None).await;
    assert_eq!(stdout(&out).trim(), "[]");
}

/// A command that logs (at debug, the database client logs every query).
const LOGGING: [&str; 2] = ["tenants", "list"];

#[tokio::test]
async fn logs_written_to_a_pipe_carry_no_colour_codes() {
    let db = create_database().await;
    let mut env = cli_env(&db);
    env.push(("RUST_LOG", "debug".into()));
    let out = tenantry(&LOGGING, &env, None).await;
    assert!(out.status.success(), "{}", stderr(&out));
    let log = stderr(&out);
    assert!(log.contains("DEBUG"), "nothing was logged: {log}");
    assert!(!log.contains("\x1b["), "colour codes in a pipe: {log:?}");
}

#[tokio::test]
async fn logs_on_a_terminal_are_coloured_unless_no_color_is_set() {
    let db = create_database().await;
    let mut env = cli_env(&db);
    env.push(("RUST_LOG", "debug".into()));
    let coloured = {
        let env = env.clone();
        tokio::task::spawn_blocking(move || Terminal::run(&LOGGING, &env).finish())
    }
    .await
    .unwrap();
    assert!(coloured.status.success(), "{}", coloured.text);
    assert!(coloured.text.contains("\x1b["), "{:?}", coloured.text);

    env.push(("NO_COLOR", "1".into()));
    let plain = tokio::task::spawn_blocking(move || Terminal::run(&LOGGING, &env).finish())
        .await
        .unwrap();
    assert!(plain.status.success(), "{}", plain.text);
    assert!(plain.text.contains("DEBUG"), "{}", plain.text);
    assert!(!plain.text.contains("\x1b["), "{:?}", plain.text);
}

#[tokio::test]
async fn a_spent_refresh_token_is_refused_with_a_message_about_the_refresh_token() {
    let app = spawn_app().await;
    let registered = json(app.register("rosa").await).await;
    let spent = &registered["refresh_token"];
    assert_eq!(app.refresh_status(spent).await, 200);

    let again = app
        .post_json("/api/auth/refresh", &json!({ "refresh_token": spent }))
        .await;
    assert_eq!(again.status(), 401);
    let body = json(again).await;
    assert_eq!(body["error"]["code"], "invalid_refresh_token");
    let message = body["error"]["message"].as_str().unwrap();
    assert!(
        message.contains("refresh token") && message.contains("sign in again"),
        "{message}"
    );
    assert!(!message.contains("access token"), "{message}");
}

#[tokio::test]
async fn a_malformed_session_id_is_a_404_without_the_parsers_words() {
    let app = spawn_app().await;
    let token = app.token("saul").await;
    let response = app
        .call(Method::DELETE, "/api/auth/sessions/not-a-uuid", &token)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 404);
    let body = json(response).await;
    assert_eq!(body["error"]["code"], "not_found");
    let message = body["error"]["message"].as_str().unwrap().to_lowercase();
    for internal in ["deserialize", "uuid", "parsing"] {
        assert!(!message.contains(internal), "{message}");
    }
}

#[tokio::test]
async fn a_failed_fleet_migration_shows_the_detail_naming_the_offending_row() {
    let app = spawn_app().await;
    for user in ["ann", "bob"] {
        assert_eq!(app.register(user).await.status(), 201, "{user}");
    }
    // bob has two experiences of one title: a unique index cannot be built.
    app.db()
        .await
        .batch_execute(
            "INSERT INTO tenant_bob.experiences (title, started_on)
             VALUES ('Cook', '2020-01-01'), ('Cook', '2021-01-01')",
        )
        .await
        .unwrap();
    let file = format!("V{}__unique_titles.sql", latest_version() + 1);
    let templates = builtin_templates_with(&[(
        &file,
        "CREATE UNIQUE INDEX experiences_title_key ON experiences (title);\n",
    )]);
    let mut env = cli_env(&app.db_name);
    env.push(("TENANTRY_TEMPLATES_DIR", templates.display().to_string()));

    let out = tenantry(&["fleet", "migrate", "--canary", "0"], &env, None).await;
    assert_eq!(out.status.code(), Some(1), "{}", stderr(&out));
    let detail = "DETAIL: Key (title)=(Cook) is duplicated.";
    assert!(stdout(&out).contains(detail), "{}", stdout(&out));
    let recorded: String = app
        .db()
        .await
        .query_one(
            "SELECT error FROM tenantry.fleet_results WHERE username = 'bob'",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert!(recorded.contains(detail), "{recorded}");
}

#[tokio::test]
async fn help_names_every_tenants_command_and_describes_the_arguments() {
    let out = tenantry(&["--help"], &[], None).await;
    assert!(out.status.success());
    let help = stdout(&out);
    let tenants = help
        .lines()
        .find(|l| l.trim_start().starts_with("tenants"))
        .unwrap_or_else(|| panic!("{help}"));
    for word in [
        "list", "show", "create", "export", "import", "delete", "move",
    ] {
        assert!(tenants.contains(word), "{tenants}");
    }

    let out = tenantry(&["tenants", "create", "--help"], &[], None).await;
    assert!(out.status.success());
    let help = stdout(&out);
    let described = |name: &str| {
        help.lines()
            .find(|l| l.trim_start().starts_with(name))
            .is_some_and(|l| l.trim_start().len() > name.len() + 2)
    };
    assert!(described("<NAME>"), "{help}");
    assert!(described("--email <EMAIL>"), "{help}");
}

/// Every series the service defines, each to be described and present from
/// the first scrape.
const METRICS: [&str; 11] = [
    "tenantry_database_errors_total",
    "tenantry_clients_cut_off_total",
    "tenantry_exports_total",
    "tenantry_exports_running",
    "tenantry_tenants_pending_migration",
    "tenantry_fleet_run_running",
    "tenantry_pool_connections",
    "tenantry_pool_waiting",
    "http_requests_total",
    "http_request_duration_seconds",
    "tenantry_provisioning_duration_seconds",
];

#[tokio::test]
async fn metrics_are_described_and_present_from_the_first_scrape() {
    let app = spawn_app().await;
    let first = app.get("/metrics").await.text().await.unwrap();
    // The first scrape: nothing of the service has been used.
    for name in &METRICS[..8] {
        assert!(
            first.contains(&format!("# HELP {name} ")),
            "no HELP for {name}:\n{first}"
        );
        assert!(
            first.lines().any(|l| l.starts_with(name)),
            "no {name}:\n{first}"
        );
    }
    // The rest are labelled by what was done (a request, a signup).
    assert_eq!(app.register("mona").await.status(), 201);
    let later = app.get("/metrics").await.text().await.unwrap();
    for name in METRICS {
        assert!(
            later.contains(&format!("# HELP {name} ")),
            "no HELP for {name}:\n{later}"
        );
    }
}

#[tokio::test]
async fn cli_output_says_1_row_and_1_session_and_its_headers_are_capitals() {
    let app = spawn_app().await;
    let token = app.token("nora").await;
    let created = app
        .call(Method::POST, "/api/experiences", &token)
        .json(&json!({"title": "Cook", "started_on": "2020-01-01"}))
        .send()
        .await
        .unwrap();
    assert_eq!(created.status(), 201);
    let env = cli_env(&app.db_name);

    let out = tenantry(&["tenants", "list"], &env, None).await;
    assert!(out.status.success(), "{}", stderr(&out));
    let header = stdout(&out).lines().next().unwrap_or_default().to_owned();
    assert_eq!(header, header.to_uppercase(), "{header}");

    let out = tenantry(&["tenants", "delete", "nora", "--yes"], &env, None).await;
    assert!(out.status.success(), "{}", stderr(&out));
    let receipt = stdout(&out);
    assert!(receipt.contains(", 1 session revoked"), "{receipt}");
    let experiences = receipt
        .lines()
        .find(|l| l.trim_start().starts_with("experiences "))
        .unwrap_or_else(|| panic!("{receipt}"));
    assert!(experiences.ends_with(" 1 row"), "{experiences}");
    for wrong in ["1 rows", "1 sessions", "1 tables", " 1 entries"] {
        assert!(!receipt.contains(wrong), "{receipt}");
    }
}

/// A pseudo-terminal running `tenantry` as its session's controlling
/// terminal: what a person at a terminal sees and types.
mod terminal {
    use std::io::{Read, Write};
    use std::os::fd::OwnedFd;
    use std::os::unix::process::CommandExt;
    use std::process::{Child, Command, ExitStatus};
    use std::sync::{Arc, Mutex};
    use std::thread::JoinHandle;
    use std::time::{Duration, Instant};

    use nix::sys::termios::{tcgetattr, LocalFlags};

    use super::STUCK;

    pub struct Terminal {
        master: std::fs::File,
        slave: Option<OwnedFd>,
        child: Child,
        screen: Arc<Mutex<Vec<u8>>>,
        reader: Option<JoinHandle<()>>,
    }

    pub struct Screen {
        pub status: ExitStatus,
        /// Everything the terminal showed (stdout and stderr both).
        pub text: String,
    }

    impl Terminal {
        pub fn run(args: &[&str], env: &[(&str, String)]) -> Terminal {
            let pty = nix::pty::openpty(
                None::<&nix::pty::Winsize>,
                None::<&nix::sys::termios::Termios>,
            )
            .expect("openpty");
            // Only the child is given the terminal (dup'd onto 0-2, which
            // clears the flag): a process started by another test now (a
            // detached reaper outlives this one) must not hold it open,
            // or the reader would never see its end.
            for fd in [&pty.master, &pty.slave] {
                nix::fcntl::fcntl(
                    fd,
                    nix::fcntl::FcntlArg::F_SETFD(nix::fcntl::FdFlag::FD_CLOEXEC),
                )
                .expect("FD_CLOEXEC on the terminal");
            }
            let mut cmd = Command::new(env!("CARGO_BIN_EXE_tenantry"));
            cmd.args(args)
                .env_clear()
                .env("PATH", std::env::var("PATH").unwrap_or_default())
                .env("RUST_LOG", "warn")
                .env("BCRYPT_COST", "4")
                .envs(env.iter().map(|(k, v)| (k, v)))
                .stdin(pty.slave.try_clone().unwrap())
                .stdout(pty.slave.try_clone().unwrap())
                .stderr(pty.slave.try_clone().unwrap());
            // SAFETY: setsid and ioctl are async-signal-safe; nothing is
            // allocated between fork and exec.
            unsafe {
                cmd.pre_exec(|| {
                    nix::unistd::setsid()?;
                    if nix::libc::ioctl(0, nix::libc::TIOCSCTTY, 0) != 0 {
                        return Err(std::io::Error::last_os_error());
                    }
                    Ok(())
                });
            }
            let child = cmd.spawn().expect("spawn tenantry on a terminal");
            let master = std::fs::File::from(pty.master);
            let screen = Arc::new(Mutex::new(Vec::new()));
            let reader = {
                let mut master = master.try_clone().unwrap();
                let screen = screen.clone();
                std::thread::spawn(move || {
                    let mut buf = [0u8; 4096];
                    // EIO once the last slave descriptor is closed.
                    while let Ok(n @ 1..) = master.read(&mut buf) {
                        screen.lock().unwrap().extend_from_slice(&buf[..n]);
                    }
                })
            };
            Terminal {
                master,
                slave: Some(pty.slave),
                child,
                screen,
                reader: Some(reader),
            }
        }

        fn text(&self) -> String {
            String::from_utf8_lossy(&self.screen.lock().unwrap()).into_owned()
        }

        /// Poll `ready` until it holds, or fail after [`STUCK`].
        fn until(&self, what: &str, ready: impl Fn(&Terminal) -> bool) {
            let start = Instant::now();
            while !ready(self) {
                assert!(
                    start.elapsed() < STUCK,
                    "gave up waiting for {what}; the terminal shows {:?}",
                    self.text()
                );
                std::thread::sleep(Duration::from_millis(10));
            }
        }

        pub fn wait_for_output(&self, text: &str) {
            self.until(text, |t| t.text().contains(text));
        }

        /// The prompt is written before the terminal stops echoing: typing
        /// before then would be echoed by the terminal, not by tenantry.
        pub fn wait_for_echo_off(&self) {
            self.until("echo off", |t| {
                let slave = t.slave.as_ref().unwrap();
                !tcgetattr(slave)
                    .expect("tcgetattr")
                    .local_flags
                    .contains(LocalFlags::ECHO)
            });
        }

        pub fn type_line(&mut self, line: &str) {
            self.master
                .write_all(format!("{line}\n").as_bytes())
                .expect("type");
        }

        pub fn finish(mut self) -> Screen {
            let start = Instant::now();
            let status = loop {
                if let Some(status) = self.child.try_wait().expect("wait") {
                    break status;
                }
                if start.elapsed() > STUCK {
                    let _ = self.child.kill();
                    panic!("tenantry did not finish: {:?}", self.text());
                }
                std::thread::sleep(Duration::from_millis(10));
            };
            drop(self.slave.take());
            self.reader.take().unwrap().join().unwrap();
            Screen {
                status,
                text: self.text(),
            }
        }
    }
}
