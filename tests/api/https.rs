//! HTTPS (`TENANTRY_TLS_CERT`, `TENANTRY_TLS_KEY`): `serve` speaks TLS on its
//! address, with the certificate it was given.

use std::sync::Arc;

use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, ServerName};
use tenantry::configuration::TlsFiles;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::helpers::*;
use crate::smtp::{cacert, server_cert};

fn tls_files() -> TlsFiles {
    let (cert, key) = server_cert();
    TlsFiles {
        cert: cert.to_path_buf(),
        key: key.to_path_buf(),
    }
}

/// A TLS client that trusts `roots` (PEM files).
fn connector(roots: &[&std::path::Path]) -> tokio_rustls::TlsConnector {
    connector_offering(roots, &[])
}

/// The same, offering `alpn` (e.g. `h2`).
fn connector_offering(roots: &[&std::path::Path], alpn: &[&[u8]]) -> tokio_rustls::TlsConnector {
    let mut store = rustls::RootCertStore::empty();
    for root in roots {
        for cert in CertificateDer::pem_file_iter(root).unwrap() {
            store.add(cert.unwrap()).unwrap();
        }
    }
    #[allow(deprecated)]
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(store)
        .with_no_client_auth();
    config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
    tokio_rustls::TlsConnector::from(Arc::new(config))
}

fn port_of(app: &TestApp) -> u16 {
    app.address.rsplit(':').next().unwrap().parse().unwrap()
}

/// One HTTP/1.1 request over TLS; the whole answer as text.
async fn over_tls(
    connector: &tokio_rustls::TlsConnector,
    port: u16,
    request: &str,
) -> std::io::Result<String> {
    let tcp = tokio::net::TcpStream::connect(("127.0.0.1", port)).await?;
    let name = ServerName::try_from("127.0.0.1").unwrap();
    let mut tls = connector.connect(name, tcp).await?;
    tls.write_all(request.as_bytes()).await?;
    let mut answer = Vec::new();
    tls.read_to_end(&mut answer).await?;
    Ok(String::from_utf8_lossy(&answer).into_owned())
}

#[tokio::test]
async fn serve_speaks_https_with_its_certificate_and_nothing_else() {
    let app = spawn_app_with(|s| s.tls = Some(tls_files())).await;
    let port = port_of(&app);
    let trusting = connector(&[cacert()]);

    let live = over_tls(
        &trusting,
        port,
        "GET /health/live HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n",
    )
    .await
    .unwrap();
    assert!(live.starts_with("HTTP/1.1 200"), "{live}");

    let body =
        format!(r#"{{"username":"tlsa","email":"tlsa@example.com","password":"{PASSWORD}"}}"#);
    let signup = over_tls(
        &trusting,
        port,
        &format!(
            "POST /api/auth/register HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n\
             Content-Length: {}\r\nConnection: close\r\n\r\n{body}",
            body.len()
        ),
    )
    .await
    .unwrap();
    assert!(signup.starts_with("HTTP/1.1 201"), "{signup}");
    assert_eq!(
        app.count("SELECT count(*) FROM tenantry.users WHERE username = 'tlsa'")
            .await,
        1
    );

    // A client that does not trust the certificate's CA refuses it.
    let distrusting = connector(&[]);
    let refused = over_tls(
        &distrusting,
        port,
        "GET /health/live HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n",
    )
    .await;
    assert!(refused.is_err(), "{refused:?}");

    // Plain HTTP on the HTTPS port gets no HTTP answer.
    let plain = app
        .api
        .get(format!("{}/health/live", app.address))
        .send()
        .await;
    assert!(plain.is_err(), "{plain:?}");
}

#[tokio::test]
async fn serve_refuses_to_start_with_half_or_broken_tls_settings() {
    let db = create_database().await;
    let (cert, key) = server_cert();
    let bad = temp_dir("tenantry-bad-pem").join("cert.pem");
    std::fs::write(&bad, "not a certificate\n").unwrap();
    for (vars, says) in [
        (
            vec![("TENANTRY_TLS_CERT", cert.to_string_lossy().into_owned())],
            "needs both TENANTRY_TLS_CERT and TENANTRY_TLS_KEY",
        ),
        (
            vec![
                ("TENANTRY_TLS_CERT", bad.to_string_lossy().into_owned()),
                ("TENANTRY_TLS_KEY", key.to_string_lossy().into_owned()),
            ],
            "no PEM certificate",
        ),
        (
            vec![
                ("TENANTRY_TLS_CERT", cert.to_string_lossy().into_owned()),
                ("TENANTRY_TLS_KEY", "/nonexistent/key.pem".to_owned()),
            ],
            "TENANTRY_TLS_KEY /nonexistent/key.pem",
        ),
    ] {
        let mut env = cli_env(&db);
        env.extend(vars);
        env.push(("TENANTRY_BIND", format!("127.0.0.1:{}", free_port())));
        let out = tenantry(&["serve"], &env, None).await;
        assert_eq!(out.status.code(), Some(2), "{}", stderr(&out));
        assert!(stderr(&out).contains(says), "{}", stderr(&out));
    }
}

#[tokio::test]
async fn a_client_offering_http2_gets_http2_over_tls() {
    let app = spawn_app_with(|s| s.tls = Some(tls_files())).await;
    let tcp = tokio::net::TcpStream::connect(("127.0.0.1", port_of(&app)))
        .await
        .unwrap();
    let tls = connector_offering(&[cacert()], &[b"h2", b"http/1.1"])
        .connect(ServerName::try_from("127.0.0.1").unwrap(), tcp)
        .await
        .unwrap();
    assert_eq!(tls.get_ref().1.alpn_protocol(), Some(&b"h2"[..]));
    let (mut client, connection) = h2::client::handshake(tls).await.unwrap();
    tokio::spawn(connection);
    let request = http::Request::get("https://127.0.0.1/health/live")
        .body(())
        .unwrap();
    let (response, _) = client.send_request(request, true).unwrap();
    let response = response.await.unwrap();
    assert_eq!(response.status(), 200);
    assert_eq!(response.version(), http::Version::HTTP_2);
}
