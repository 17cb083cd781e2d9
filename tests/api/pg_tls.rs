//! TLS to PostgreSQL (`DATABASE_URL`'s `sslmode`, `sslrootcert`, `sslcert`,
//! `sslkey`): a private cluster of its own with `ssl = on` and only
//! `hostssl` lines for TCP in `pg_hba.conf`, its certificates made by the
//! tests' CA (`smtp::cacert`).

use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::LazyLock;

use reqwest::Method;
use serde_json::json;
use tenantry::configuration::{DatabaseTarget, SecretString};
use tenantry::db::{Connector, Dedicated};
use tenantry::embedded::{Cluster, Running};

use crate::helpers::*;
use crate::smtp::{cacert, server_cert};

const PASSWORD_OF_SERVICE: &str = "tls service secret";
/// The role that signs in with a client certificate (`cert` in pg_hba).
const CERT_USER: &str = "tls_cert_user";

struct TlsCluster {
    cluster: Cluster,
    running: Running,
    /// Another CA, which signed nothing the server has.
    other_ca: PathBuf,
    /// A client certificate for [`CERT_USER`] by the tests' CA, and its key.
    client_cert: PathBuf,
    client_key: PathBuf,
}

static TLS_CLUSTER: LazyLock<TlsCluster> = LazyLock::new(start_tls_cluster);

fn openssl(dir: &Path, args: &[&str]) {
    let out = Command::new("openssl")
        .current_dir(dir)
        .args(args)
        .output()
        .expect("run openssl");
    assert!(
        out.status.success(),
        "openssl {}: {}",
        args[0],
        String::from_utf8_lossy(&out.stderr)
    );
}

fn start_tls_cluster() -> TlsCluster {
    let dir = temp_dir("tenantry-pg-tls");
    let cluster = Cluster::open(&dir).expect("open the TLS cluster");
    // Made (initdb) and started once without TLS, to be set up.
    cluster.ensure_running(&[]).expect("start the TLS cluster");
    spawn_reaper(&dir);
    cluster.stop().expect("stop the TLS cluster");

    let certs = temp_dir("tenantry-pg-tls-certs");
    let ec = crate::smtp::EC_KEY;
    openssl(
        &certs,
        &[
            &["req", "-x509"][..],
            &ec,
            &["-keyout", "other.key", "-out", "other-ca.pem", "-days", "7"],
            &["-subj", "/CN=Another CA"],
        ]
        .concat(),
    );
    openssl(
        &certs,
        &[
            &["req", "-new"][..],
            &ec,
            &["-keyout", "client.key", "-out", "client.csr"],
            &["-subj", &format!("/CN={CERT_USER}")],
        ]
        .concat(),
    );
    let ca_key = cacert().parent().unwrap().join("ca.key");
    std::fs::write(
        certs.join("client.ext"),
        "basicConstraints = critical, CA:FALSE\n\
         keyUsage = critical, digitalSignature\n\
         extendedKeyUsage = clientAuth\n",
    )
    .unwrap();
    openssl(
        &certs,
        &[
            "x509",
            "-req",
            "-in",
            "client.csr",
            "-CA",
            cacert().to_str().unwrap(),
            "-CAkey",
            ca_key.to_str().unwrap(),
            "-CAcreateserial",
            "-extfile",
            "client.ext",
            "-out",
            "client.crt",
            "-days",
            "7",
        ],
    );

    // The server's files, owned by the server's OS user (postgres, when the
    // tests run as root), its key private.
    let pgdata = dir.join("pgdata");
    let owner = std::fs::metadata(&pgdata).unwrap();
    let (cert, key) = server_cert();
    for (from, to) in [
        (cert, "server.crt"),
        (key, "server.key"),
        (cacert(), "root.crt"),
    ] {
        let to = pgdata.join(to);
        std::fs::copy(from, &to).unwrap();
        std::os::unix::fs::chown(&to, Some(owner.uid()), Some(owner.gid())).unwrap();
        std::fs::set_permissions(&to, std::os::unix::fs::PermissionsExt::from_mode(0o600)).unwrap();
    }
    let mut conf = std::fs::read_to_string(pgdata.join("postgresql.conf")).unwrap();
    conf.push_str(
        "\nssl = on\nssl_cert_file = 'server.crt'\nssl_key_file = 'server.key'\nssl_ca_file = 'root.crt'\nfsync = off\n",
    );
    std::fs::write(pgdata.join("postgresql.conf"), conf).unwrap();
    // TCP only with TLS; the tests' own superuser over the socket.
    std::fs::write(
        pgdata.join("pg_hba.conf"),
        format!(
            "local all all trust\n\
             hostssl all {CERT_USER} 127.0.0.1/32 cert\n\
             hostssl all all 127.0.0.1/32 scram-sha-256\n"
        ),
    )
    .unwrap();
    let running = cluster.ensure_running(&[]).expect("restart with TLS");
    TlsCluster {
        cluster,
        running,
        other_ca: certs.join("other-ca.pem"),
        client_cert: certs.join("client.crt"),
        client_key: certs.join("client.key"),
    }
}

/// A database on the TLS cluster owned by its own service role (LOGIN
/// CREATEROLE, with a password), and [`CERT_USER`].
pub async fn tls_database() -> String {
    let c = &*TLS_CLUSTER;
    let admin = tenantry::db::connect(&c.cluster.pg_config(&c.running, "postgres"))
        .await
        .unwrap();
    let name = format!("tls_{}", uuid::Uuid::new_v4().simple());
    admin
        .batch_execute(&format!(
            "CREATE ROLE {name}_svc LOGIN CREATEROLE PASSWORD '{PASSWORD_OF_SERVICE}'"
        ))
        .await
        .unwrap();
    admin
        .batch_execute(&format!("CREATE DATABASE {name} OWNER {name}_svc"))
        .await
        .unwrap();
    admin
        .batch_execute(&format!(
            "DO $$ BEGIN
               -- Two tests at once: one makes it, the other then sees it.
               PERFORM pg_advisory_xact_lock(7);
               IF NOT EXISTS (SELECT 1 FROM pg_roles WHERE rolname = '{CERT_USER}') THEN
                 CREATE ROLE {CERT_USER} LOGIN;
               END IF;
             END $$;"
        ))
        .await
        .unwrap();
    name
}

/// The service's key=value connection string on the TLS cluster, plus
/// `extra`.
pub fn conninfo(db: &str, extra: &str) -> String {
    format!(
        "host=127.0.0.1 port={} user={db}_svc password='{PASSWORD_OF_SERVICE}' dbname={db} {extra}",
        TLS_CLUSTER.running.port
    )
}

/// Connect with `url`: whether the session is encrypted, or the error.
async fn try_connect(url: &str) -> Result<bool, String> {
    let connector = Connector::from_url(url)?;
    let client = connector
        .connect(Dedicated::Command)
        .await
        .map_err(|e| e.to_string())?;
    let row = client
        .query_one(
            "SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()",
            &[],
        )
        .await
        .unwrap();
    Ok(row.get(0))
}

#[tokio::test]
async fn each_sslmode_does_what_libpq_says() {
    let db = tls_database().await;
    let c = &*TLS_CLUSTER;
    let ca = cacert().display().to_string();

    // prefer (the default) and require: encrypted, unverified.
    assert_eq!(try_connect(&conninfo(&db, "")).await, Ok(true));
    assert_eq!(
        try_connect(&conninfo(&db, "sslmode=prefer")).await,
        Ok(true)
    );
    assert_eq!(
        try_connect(&conninfo(&db, "sslmode=require")).await,
        Ok(true)
    );
    // verify-full with the CA, in both forms; for the name in the
    // certificate too.
    assert_eq!(
        try_connect(&conninfo(
            &db,
            &format!("sslmode=verify-full sslrootcert={ca}")
        ))
        .await,
        Ok(true)
    );
    let url = format!(
        "postgresql://{db}_svc:{}@localhost:{}/{db}?sslmode=verify-full&sslrootcert={}",
        PASSWORD_OF_SERVICE.replace(' ', "%20"),
        c.running.port,
        ca.replace('/', "%2F")
    );
    assert_eq!(try_connect(&url).await, Ok(true));

    // Another CA: refused, and said why.
    let other = c.other_ca.display();
    for mode in ["verify-ca", "verify-full", "require"] {
        let refused = try_connect(&conninfo(
            &db,
            &format!("sslmode={mode} sslrootcert={other}"),
        ))
        .await
        .unwrap_err();
        assert!(refused.contains("unknown CA"), "{mode}: {refused}");
    }
    // A host name the certificate does not have: verify-full refuses,
    // verify-ca (the chain only) does not.
    let elsewhere = |mode: &str| {
        format!(
            "host=db.example.invalid hostaddr=127.0.0.1 port={} user={db}_svc password='{PASSWORD_OF_SERVICE}' dbname={db} sslmode={mode} sslrootcert={ca}",
            c.running.port
        )
    };
    let mismatch = try_connect(&elsewhere("verify-full")).await.unwrap_err();
    assert!(mismatch.contains("host name mismatch"), "{mismatch}");
    assert_eq!(try_connect(&elsewhere("verify-ca")).await, Ok(true));

    // disable: the server itself refuses (hostssl only).
    let plain = try_connect(&conninfo(&db, "sslmode=disable"))
        .await
        .unwrap_err();
    assert!(plain.contains("no pg_hba.conf entry"), "{plain}");
    assert!(plain.contains("accepts only TLS"), "{plain}");

    // verify-* without a CA is a configuration error, found before
    // connecting.
    let no_ca = try_connect(&conninfo(&db, "sslmode=verify-full"))
        .await
        .unwrap_err();
    assert!(no_ca.contains("sslrootcert"), "{no_ca}");
    let no_file = try_connect(&conninfo(
        &db,
        "sslmode=verify-full sslrootcert=/nonexistent/ca.pem",
    ))
    .await
    .unwrap_err();
    assert!(no_file.contains("/nonexistent/ca.pem"), "{no_file}");

    // Client certificate authentication (`cert` in pg_hba).
    let as_cert_user = |extra: &str| {
        format!(
            "host=localhost port={} user={CERT_USER} dbname={db} sslmode=verify-full sslrootcert={ca} {extra}",
            c.running.port
        )
    };
    assert_eq!(
        try_connect(&as_cert_user(&format!(
            "sslcert={} sslkey={}",
            c.client_cert.display(),
            c.client_key.display()
        )))
        .await,
        Ok(true)
    );
    let without = try_connect(&as_cert_user("")).await.unwrap_err();
    assert!(without.contains("client certificate"), "{without}");
    // A key others may read is refused, as libpq refuses it.
    let open_key = temp_dir("tenantry-open-key").join("client.key");
    std::fs::copy(&c.client_key, &open_key).unwrap();
    std::fs::set_permissions(
        &open_key,
        std::os::unix::fs::PermissionsExt::from_mode(0o644),
    )
    .unwrap();
    let exposed = try_connect(&as_cert_user(&format!(
        "sslcert={} sslkey={}",
        c.client_cert.display(),
        open_key.display()
    )))
    .await
    .unwrap_err();
    assert!(exposed.contains("has mode 644"), "{exposed}");
    // hostaddr alone names no server for TLS to check.
    let nameless = try_connect(&format!(
        "hostaddr=127.0.0.1 port={} user={db}_svc password='{PASSWORD_OF_SERVICE}' dbname={db} sslmode=require",
        c.running.port
    ))
    .await
    .unwrap_err();
    assert!(nameless.contains("hostaddr without host"), "{nameless}");
    let half = try_connect(&as_cert_user(&format!(
        "sslcert={}",
        c.client_cert.display()
    )))
    .await
    .unwrap_err();
    assert!(half.contains("sslkey"), "{half}");
}

#[tokio::test]
async fn a_server_without_tls_is_refused_when_tls_is_required() {
    // The suite's own cluster has ssl = off.
    let db = create_database().await;
    let role = service_role(&db);
    connect(&db)
        .await
        .batch_execute(&format!(
            "ALTER ROLE {role} PASSWORD '{PASSWORD_OF_SERVICE}'"
        ))
        .await
        .unwrap();
    let url = format!(
        "host=127.0.0.1 port={} user={role} password='{PASSWORD_OF_SERVICE}' dbname={db}",
        CLUSTER.running.port
    );
    assert_eq!(try_connect(&url).await, Ok(false), "prefer falls back");
    let refused = try_connect(&format!("{url} sslmode=require"))
        .await
        .unwrap_err();
    assert!(refused.contains("the server has no TLS"), "{refused}");
}

#[tokio::test]
async fn the_whole_service_runs_over_tls() {
    let db = tls_database().await;
    let url = conninfo(
        &db,
        &format!("sslmode=verify-full sslrootcert={}", cacert().display()),
    );
    let mut settings = test_settings(&db);
    settings.database = DatabaseTarget::Url(SecretString::new(url.clone()));
    let app = spawn_app_on(settings, db.clone()).await;

    // Signup and a routed request.
    let token = app.token("tls_erin").await;
    let created = app
        .call(Method::POST, "/api/experiences", &token)
        .json(&json!({"title": "Engineer", "organization": "Acme", "started_on": "2020-01-15"}))
        .send()
        .await
        .unwrap();
    assert_eq!(created.status(), 201);
    let listed = json(
        app.call(Method::GET, "/api/experiences", &token)
            .send()
            .await
            .unwrap(),
    )
    .await;
    assert_eq!(listed["items"][0]["title"], "Engineer");

    // A command over TLS (the CLI takes the same DATABASE_URL), then a fleet
    // run started over HTTP with a version the tenant lacks.
    let env = vec![
        ("DATABASE_URL", url.clone()),
        ("JWT_SECRET", JWT_SECRET.to_string()),
    ];
    let out = tenantry(
        &["admin", "create", "tls_ops", "--email", "ops@example.com"],
        &env,
        Some(PASSWORD),
    )
    .await;
    assert!(out.status.success(), "{}", stderr(&out));
    let added = latest_version() + 1;
    let templates = builtin_templates_with(&[(
        &format!("V{added}__tls_note.sql"),
        "ALTER TABLE experiences ADD COLUMN tls_note text;\n",
    )]);
    let mut settings = test_settings(&db);
    settings.database = DatabaseTarget::Url(SecretString::new(url.clone()));
    settings.templates_dir = Some(templates);
    let service = spawn_app_on(settings, db.clone()).await;
    let login = service
        .post_json(
            "/api/auth/login",
            &json!({"username": "tls_ops", "password": PASSWORD}),
        )
        .await;
    let admin = json(login).await["access_token"]
        .as_str()
        .unwrap()
        .to_owned();
    let report = service.fleet_run_over_http(&admin).await;
    assert_eq!(report["status"], "succeeded", "{report}");
    assert_eq!(report["succeeded"], 1, "{report}");

    // A backup over TLS: pg_dump and psql get the same sslmode and CA
    // (the server takes nothing else over TCP).
    let backup = temp_dir("tenantry-tls-backup").join("backup");
    let out = tenantry(&["backup", backup.to_str().unwrap()], &env, None).await;
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(backup.join("manifest.json").is_file());

    // Export and erasure.
    let export = service
        .call(Method::GET, "/api/me/export", &token)
        .send()
        .await
        .unwrap();
    assert_eq!(export.status(), 200);
    let document = export.text().await.unwrap();
    assert!(document.contains("Engineer"), "{document}");
    let erased = service
        .call(Method::DELETE, "/api/me", &token)
        .json(&json!({"password": PASSWORD}))
        .send()
        .await
        .unwrap();
    assert_eq!(erased.status(), 200);

    // Every session the service has open on its database is encrypted (and
    // pg_hba would have refused any other over TCP).
    let c = &*TLS_CLUSTER;
    let admin_db = tenantry::db::connect(&c.cluster.pg_config(&c.running, "postgres"))
        .await
        .unwrap();
    let row = admin_db
        .query_one(
            "SELECT count(*) FILTER (WHERE s.ssl), count(*) FILTER (WHERE NOT s.ssl)
               FROM pg_stat_activity a JOIN pg_stat_ssl s USING (pid)
              WHERE a.datname = $1 AND a.client_addr IS NOT NULL",
            &[&db],
        )
        .await
        .unwrap();
    let (encrypted, plain): (i64, i64) = (row.get(0), row.get(1));
    assert!(encrypted > 0);
    assert_eq!(plain, 0);
}
