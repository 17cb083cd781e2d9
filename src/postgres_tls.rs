//! TLS to PostgreSQL with libpq's parameters: `sslmode` (`disable`,
//! `prefer`, `require`, `verify-ca`, `verify-full`), `sslrootcert`,
//! `sslcert` and `sslkey`, in a URL or in key=value form.
//!
//! tokio-postgres knows only `disable`, `prefer` and `require` and refuses
//! the file parameters, so [`split`] takes them out of the connection
//! string first, and [`Tls::new`] builds the rustls configuration that
//! gives each mode libpq's meaning:
//!
//! - `disable`: no TLS;
//! - `prefer` (the default) and `require`: TLS (`prefer` falls back to
//!   plaintext when the server has none), the certificate unchecked, unless
//!   a root certificate is there (`sslrootcert`, or libpq's default
//!   `~/.postgresql/root.crt`): then, as libpq does, its chain is verified;
//! - `verify-ca`: the chain must lead to the root certificate;
//! - `verify-full`: that, and the certificate must name the host.
//!
//! `sslrootcert=system` trusts the platform's CAs (rustls-native-certs).
//! `sslcert` and `sslkey` (default `~/.postgresql/postgresql.crt` and
//! `.key` when both exist) are the client certificate, for `cert`
//! authentication. Unix sockets never use TLS (as libpq).

use std::path::{Path, PathBuf};
use std::sync::Arc;

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::client::WebPkiServerVerifier;
use rustls::crypto::CryptoProvider;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use rustls::{CertificateError, DigitallySignedStruct, RootCertStore, SignatureScheme};
use tokio_postgres::config::SslMode as WireMode;

/// libpq's `sslmode`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum SslMode {
    Disable,
    #[default]
    Prefer,
    Require,
    VerifyCa,
    VerifyFull,
}

impl SslMode {
    fn parse(value: &str) -> Result<SslMode, String> {
        Ok(match value {
            "disable" => SslMode::Disable,
            "prefer" => SslMode::Prefer,
            "require" => SslMode::Require,
            "verify-ca" => SslMode::VerifyCa,
            "verify-full" => SslMode::VerifyFull,
            // libpq's `allow` tries plaintext first: nothing we would offer.
            other => {
                return Err(format!(
                "sslmode {other:?} is not one of disable, prefer, require, verify-ca, verify-full"
            ))
            }
        })
    }

    pub fn as_str(self) -> &'static str {
        match self {
            SslMode::Disable => "disable",
            SslMode::Prefer => "prefer",
            SslMode::Require => "require",
            SslMode::VerifyCa => "verify-ca",
            SslMode::VerifyFull => "verify-full",
        }
    }
}

/// The TLS parameters of a connection string.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SslParams {
    pub mode: SslMode,
    pub rootcert: Option<String>,
    pub cert: Option<PathBuf>,
    pub key: Option<PathBuf>,
}

const KEYS: [&str; 4] = ["sslmode", "sslrootcert", "sslcert", "sslkey"];

/// Take the TLS parameters out of a connection string (URL or key=value):
/// the rest, for tokio-postgres, and the parameters.
pub fn split(conninfo: &str) -> Result<(String, SslParams), String> {
    let trimmed = conninfo.trim();
    let mut found = Vec::new();
    let rest = if trimmed.starts_with("postgres://") || trimmed.starts_with("postgresql://") {
        let (base, query) = match trimmed.split_once('?') {
            Some((base, query)) => (base, query),
            None => (trimmed, ""),
        };
        let mut kept = Vec::new();
        for pair in query.split('&').filter(|p| !p.is_empty()) {
            let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
            let key = decode(k)?;
            if KEYS.contains(&key.as_str()) {
                found.push((key, decode(v)?));
            } else {
                kept.push(pair);
            }
        }
        if kept.is_empty() {
            base.to_owned()
        } else {
            format!("{base}?{}", kept.join("&"))
        }
    } else {
        let mut kept = Vec::new();
        for (key, value) in key_values(trimmed)? {
            if KEYS.contains(&key.as_str()) {
                found.push((key, value));
            } else {
                kept.push(format!(
                    "{key}='{}'",
                    value.replace('\\', "\\\\").replace('\'', "\\'")
                ));
            }
        }
        kept.join(" ")
    };
    let mut params = SslParams::default();
    let mut mode_given = false;
    for (key, value) in found {
        match key.as_str() {
            "sslmode" => {
                params.mode = SslMode::parse(&value)?;
                mode_given = true;
            }
            "sslrootcert" => params.rootcert = Some(value),
            "sslcert" => params.cert = Some(PathBuf::from(value)),
            _ => params.key = Some(PathBuf::from(value)),
        }
    }
    // As libpq 16: trusting every public CA is safe only with the host name
    // checked too, so `system` means verify-full and allows nothing weaker.
    if params.rootcert.as_deref() == Some("system") {
        if !mode_given {
            params.mode = SslMode::VerifyFull;
        } else if params.mode != SslMode::VerifyFull {
            return Err(format!(
                "weak sslmode \"{}\" may not be used with sslrootcert=system (use \"verify-full\")",
                params.mode.as_str()
            ));
        }
    }
    Ok((rest, params))
}

/// What tokio-postgres would only find out when connecting: TLS needs the
/// server's name, which `hostaddr` alone does not give.
pub fn check(config: &tokio_postgres::Config, params: &SslParams) -> Result<(), String> {
    if params.mode != SslMode::Disable
        && config.get_hosts().is_empty()
        && !config.get_hostaddrs().is_empty()
    {
        return Err(format!(
            "hostaddr without host: TLS (sslmode={}) needs the server's name; add host=<its name> (or sslmode=disable for no TLS)",
            params.mode.as_str()
        ));
    }
    Ok(())
}

fn decode(text: &str) -> Result<String, String> {
    percent_encoding::percent_decode_str(text)
        .decode_utf8()
        .map(|s| s.into_owned())
        .map_err(|_| format!("{text:?} is not UTF-8 once percent-decoded"))
}

/// libpq's key=value syntax: `key = value`, a value either single-quoted
/// (with `\'` and `\\`) or running to the next space (with `\` escapes).
fn key_values(text: &str) -> Result<Vec<(String, String)>, String> {
    let mut chars = text.chars().peekable();
    let mut pairs = Vec::new();
    loop {
        while chars.next_if(|c| c.is_whitespace()).is_some() {}
        if chars.peek().is_none() {
            return Ok(pairs);
        }
        let mut key = String::new();
        while let Some(c) = chars.next_if(|c| *c != '=' && !c.is_whitespace()) {
            key.push(c);
        }
        while chars.next_if(|c| c.is_whitespace()).is_some() {}
        if chars.next() != Some('=') {
            return Err(format!(
                "missing \"=\" after {key:?} in the connection string"
            ));
        }
        while chars.next_if(|c| c.is_whitespace()).is_some() {}
        let mut value = String::new();
        if chars.next_if_eq(&'\'').is_some() {
            loop {
                match chars.next() {
                    Some('\\') => value.extend(chars.next()),
                    Some('\'') => break,
                    Some(c) => value.push(c),
                    None => return Err(format!("unterminated quoted value of {key:?}")),
                }
            }
        } else {
            while let Some(c) = chars.next_if(|c| !c.is_whitespace()) {
                if c == '\\' {
                    value.extend(chars.next());
                } else {
                    value.push(c);
                }
            }
        }
        pairs.push((key, value));
    }
}

/// What tokio-postgres is told, and the TLS it is given.
#[derive(Clone)]
pub struct Tls {
    pub(crate) maker: tokio_postgres_rustls::MakeRustlsConnect,
    pub(crate) mode: SslMode,
    params: SslParams,
}

impl std::fmt::Debug for Tls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Tls({})", self.mode.as_str())
    }
}

impl Tls {
    /// No TLS: the embedded cluster's Unix socket.
    pub fn none() -> Tls {
        Tls::new(&SslParams {
            mode: SslMode::Disable,
            ..SslParams::default()
        })
        .expect("no files to read")
    }

    /// Build the TLS for `params`, reading the certificate files now (a
    /// missing or broken one is a configuration error, found at start).
    pub fn new(params: &SslParams) -> Result<Tls, String> {
        // ring, as the HTTPS side (`transport::Tls`) and lettre use; rustls
        // marks it deprecated only for lacking post-quantum key exchange.
        #[allow(deprecated)]
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let home = std::env::var_os("HOME").map(PathBuf::from);
        let default_file = |name: &str| {
            home.as_ref()
                .map(|h| h.join(".postgresql").join(name))
                .filter(|p| p.is_file())
        };
        let roots = match (&params.rootcert, params.mode) {
            (_, SslMode::Disable) => None,
            (Some(system), _) if system == "system" => Some(system_roots()?),
            (Some(file), _) => Some(roots_from(Path::new(file))?),
            (None, mode) => match default_file("root.crt") {
                Some(file) => Some(roots_from(&file)?),
                None if matches!(mode, SslMode::VerifyCa | SslMode::VerifyFull) => {
                    return Err(format!(
                        "sslmode={} needs the CA's certificate: set sslrootcert (a PEM file, or \"system\" for the platform's CAs)",
                        params.mode.as_str()
                    ))
                }
                None => None,
            },
        };
        let verifier: Arc<dyn ServerCertVerifier> = match roots {
            None => Arc::new(Unverified(provider.clone())),
            Some(roots) => {
                let webpki =
                    WebPkiServerVerifier::builder_with_provider(Arc::new(roots), provider.clone())
                        .build()
                        .map_err(|e| format!("cannot use sslrootcert: {e}"))?;
                if params.mode == SslMode::VerifyFull {
                    webpki
                } else {
                    Arc::new(ChainOnly(webpki))
                }
            }
        };
        let builder = rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .map_err(|e| e.to_string())?
            .dangerous()
            .with_custom_certificate_verifier(verifier);
        let (cert, key) = match (&params.cert, &params.key) {
            (Some(cert), Some(key)) => (Some(cert.clone()), Some(key.clone())),
            (Some(_), None) => return Err("sslcert is set without sslkey".into()),
            (None, Some(_)) => return Err("sslkey is set without sslcert".into()),
            (None, None) => (
                default_file("postgresql.crt"),
                default_file("postgresql.key"),
            ),
        };
        let config = match (cert, key) {
            (Some(cert), Some(key)) if params.mode != SslMode::Disable => {
                use rustls::pki_types::pem::PemObject;
                readable(&cert, "sslcert")?;
                readable(&key, "sslkey")?;
                private(&key)?;
                let chain = CertificateDer::pem_file_iter(&cert)
                    .and_then(|certs| certs.collect::<Result<Vec<_>, _>>())
                    .map_err(|e| format!("cannot read sslcert {}: {e}", cert.display()))?;
                if chain.is_empty() {
                    return Err(format!("sslcert {} holds no certificate", cert.display()));
                }
                let key = PrivateKeyDer::from_pem_file(&key)
                    .map_err(|e| format!("cannot read sslkey {}: {e}", key.display()))?;
                builder
                    .with_client_auth_cert(chain, key)
                    .map_err(|e| format!("sslcert and sslkey do not make a pair: {e}"))?
            }
            _ => builder.with_no_client_auth(),
        };
        Ok(Tls {
            maker: tokio_postgres_rustls::MakeRustlsConnect::new(config),
            mode: params.mode,
            params: params.clone(),
        })
    }

    /// The parameters it was built from (for libpq's own programs:
    /// `pg_dump`, `psql`).
    pub fn params(&self) -> &SslParams {
        &self.params
    }

    /// What tokio-postgres itself is told: it knows no verification, only
    /// whether to try TLS and whether to insist.
    pub fn wire_mode(&self) -> WireMode {
        match self.mode {
            SslMode::Disable => WireMode::Disable,
            SslMode::Prefer => WireMode::Prefer,
            SslMode::Require | SslMode::VerifyCa | SslMode::VerifyFull => WireMode::Require,
        }
    }
}

/// Can `file` be opened? If not, why, in words that say what to fix.
fn readable(file: &Path, what: &str) -> Result<(), String> {
    match std::fs::File::open(file) {
        Ok(_) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::PermissionDenied => Err(format!(
            "cannot read {what} {}: permission denied for the user this runs as (the service's user must be able to read it and every directory above it)",
            file.display()
        )),
        Err(e) => Err(format!("cannot read {what} {}: {e}", file.display())),
    }
}

/// libpq's rule for a client key (which `pg_dump` and `psql` apply when a
/// backup runs): no access for others, and for the group only when root
/// owns it.
fn private(key: &Path) -> Result<(), String> {
    use std::os::unix::fs::MetadataExt;
    let meta = std::fs::metadata(key).map_err(|e| format!("sslkey {}: {e}", key.display()))?;
    let allowed = if meta.uid() == 0 { 0o640 } else { 0o600 };
    let mode = meta.mode() & 0o777;
    if mode & !allowed != 0 {
        return Err(format!(
            "sslkey {} has mode {mode:o}: a private key must be u=rw (0600), or u=rw,g=r (0640) when root owns it, as libpq requires",
            key.display()
        ));
    }
    Ok(())
}

fn roots_from(file: &Path) -> Result<RootCertStore, String> {
    use rustls::pki_types::pem::PemObject;
    readable(file, "sslrootcert")?;
    let mut roots = RootCertStore::empty();
    let certs = CertificateDer::pem_file_iter(file)
        .and_then(|certs| certs.collect::<Result<Vec<_>, _>>())
        .map_err(|e| format!("cannot read sslrootcert {}: {e}", file.display()))?;
    let (added, _) = roots.add_parsable_certificates(certs);
    if added == 0 {
        return Err(format!(
            "sslrootcert {} holds no usable certificate",
            file.display()
        ));
    }
    Ok(roots)
}

fn system_roots() -> Result<RootCertStore, String> {
    let found = rustls_native_certs::load_native_certs();
    let mut roots = RootCertStore::empty();
    roots.add_parsable_certificates(found.certs);
    if roots.is_empty() {
        return Err(format!(
            "sslrootcert=system: no CA certificates found on this machine{}",
            found
                .errors
                .first()
                .map(|e| format!(" ({e})"))
                .unwrap_or_default()
        ));
    }
    Ok(roots)
}

/// `verify-ca` (and `prefer`/`require` with a root certificate): the chain
/// is checked, the name is not.
#[derive(Debug)]
struct ChainOnly(Arc<WebPkiServerVerifier>);

impl ServerCertVerifier for ChainOnly {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        match self
            .0
            .verify_server_cert(end_entity, intermediates, server_name, ocsp, now)
        {
            Err(rustls::Error::InvalidCertificate(
                CertificateError::NotValidForName | CertificateError::NotValidForNameContext { .. },
            )) => Ok(ServerCertVerified::assertion()),
            other => other,
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.0.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.0.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.supported_verify_schemes()
    }
}

/// `prefer` and `require` without a root certificate: encrypted, the
/// server unauthenticated (libpq's meaning of those modes). The handshake's
/// signature is checked when the certificate can be read, but a certificate
/// rustls cannot (an X.509 v1 one, like the self-signed certificate Citus
/// makes when it turns `ssl` on) is accepted as libpq accepts it: with no
/// certificate checked, its signature proves nothing about the server.
#[derive(Debug)]
struct Unverified(Arc<CryptoProvider>);

/// The signature's check, unless it failed only for the certificate's form.
fn unless_unreadable(
    checked: Result<HandshakeSignatureValid, rustls::Error>,
) -> Result<HandshakeSignatureValid, rustls::Error> {
    match checked {
        Err(rustls::Error::InvalidCertificate(
            CertificateError::BadEncoding | CertificateError::Other(_),
        )) => Ok(HandshakeSignatureValid::assertion()),
        other => other,
    }
}

impl ServerCertVerifier for Unverified {
    fn verify_server_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        unless_unreadable(rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        ))
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        unless_unreadable(rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        ))
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

/// A connection error in words: its whole chain of causes, with what the
/// TLS ones mean for the settings.
pub fn explain(error: &tokio_postgres::Error) -> String {
    let mut text = error.to_string();
    let mut source = std::error::Error::source(error);
    while let Some(cause) = source {
        let more = cause.to_string();
        if !text.contains(&more) {
            text.push_str(": ");
            text.push_str(&more);
        }
        source = cause.source();
    }
    let hint = if text.contains("UnknownIssuer") {
        Some("the server's certificate is not signed by the CA in sslrootcert (unknown CA)")
    } else if text.contains("not valid for name") || text.contains("NotValidForName") {
        Some("the server's certificate does not name the host connected to (host name mismatch; sslmode=verify-full checks it)")
    } else if text.contains("server does not support TLS") {
        Some("the server has no TLS (ssl = off), and sslmode requires it")
    } else if text.contains("no pg_hba.conf entry") && text.contains("no encryption") {
        Some("the server accepts only TLS connections here: use sslmode=require or stronger")
    } else if text.contains("CertificateRequired")
        || text.contains("certificate required")
        || text.contains("requires a valid client certificate")
    {
        Some("the server wants a client certificate: set sslcert and sslkey")
    } else {
        None
    };
    match hint {
        Some(hint) => format!("{hint}: {text}"),
        None => text,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tls_parameters_leave_urls_and_key_value_strings_for_tokio_postgres() {
        let (rest, params) = split(
            "postgresql://u:p%40ss@db.example.com:5432/app?sslmode=verify-full&application_name=x&sslrootcert=%2Fetc%2Fca.pem",
        )
        .unwrap();
        assert_eq!(
            rest,
            "postgresql://u:p%40ss@db.example.com:5432/app?application_name=x"
        );
        assert_eq!(params.mode, SslMode::VerifyFull);
        assert_eq!(params.rootcert.as_deref(), Some("/etc/ca.pem"));

        let (rest, params) = split(
            "host=db.example.com user=app sslmode = verify-ca sslcert='/k/my cert.pem' sslkey=/k/key.pem password='it\\'s' dbname=a\\ b",
        )
        .unwrap();
        assert_eq!(
            rest,
            "host='db.example.com' user='app' password='it\\'s' dbname='a b'"
        );
        assert_eq!(params.mode, SslMode::VerifyCa);
        assert_eq!(params.cert.as_deref(), Some(Path::new("/k/my cert.pem")));
        assert_eq!(params.key.as_deref(), Some(Path::new("/k/key.pem")));
        let parsed: tokio_postgres::Config = rest.parse().unwrap();
        assert_eq!(parsed.get_password(), Some(&b"it's"[..]));
        assert_eq!(parsed.get_dbname(), Some("a b"));

        let (rest, params) = split("postgres://localhost/db").unwrap();
        assert_eq!(
            (rest.as_str(), params),
            ("postgres://localhost/db", SslParams::default())
        );
        assert!(split("host=x sslmode=allow").unwrap_err().contains("allow"));
        assert!(split("host=x sslmode").unwrap_err().contains("sslmode"));
        assert!(split("host='x").unwrap_err().contains("unterminated"));

        // sslrootcert=system: verify-full, and nothing weaker.
        let (_, params) = split("host=db.example.com sslrootcert=system").unwrap();
        assert_eq!(params.mode, SslMode::VerifyFull);
        for weak in ["prefer", "require", "verify-ca", "disable"] {
            let refused = split(&format!("host=x sslrootcert=system sslmode={weak}")).unwrap_err();
            assert!(refused.contains("weak sslmode"), "{refused}");
        }
    }
}
