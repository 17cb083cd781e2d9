//! The HTTP listener: actix-http over our own connection type, so that a
//! client that stops reading is cut off; HTTPS when `TENANTRY_TLS_CERT` and
//! `TENANTRY_TLS_KEY` are set ([`Tls`]).
//!
//! actix stops polling a response body while the socket's send buffer is
//! full and has no timer for that state: a client that requests a large
//! response (an export) and never reads would hold the connection, the body
//! and whatever the body holds (a database transaction) for as long as it
//! likes. [`Stalling`] gives every write a deadline: a write that makes no
//! progress for the client timeout fails, the connection ends and the
//! response body is dropped, which ends the work behind it.

use std::future::Future;
use std::io;
use std::net::TcpListener;
use std::pin::Pin;
use std::task::{ready, Context, Poll};
use std::time::Duration;

use actix_http::{HttpService, Protocol};
use actix_service::{fn_service, map_config, ServiceFactoryExt};
use actix_web::dev::{AppConfig, Server};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::time::Sleep;

/// A connection whose writes fail after `timeout` without progress.
pub struct Stalling<T> {
    io: T,
    timeout: Duration,
    /// Armed when a write could not proceed; disarmed by any progress.
    deadline: Option<Pin<Box<Sleep>>>,
}

impl<T> Stalling<T> {
    pub fn new(io: T, timeout: Duration) -> Stalling<T> {
        Stalling {
            io,
            timeout,
            deadline: None,
        }
    }

    /// The write is blocked: fail once it has been blocked for `timeout`.
    fn blocked<R>(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<R>> {
        let timeout = self.timeout;
        let deadline = self
            .deadline
            .get_or_insert_with(|| Box::pin(tokio::time::sleep(timeout)));
        ready!(deadline.as_mut().poll(cx));
        crate::metrics::stalled_client();
        Poll::Ready(Err(io::Error::new(
            io::ErrorKind::TimedOut,
            "the client stopped reading",
        )))
    }

    fn progressed<R>(
        &mut self,
        result: Poll<io::Result<R>>,
        cx: &mut Context<'_>,
    ) -> Poll<io::Result<R>> {
        match result {
            Poll::Pending => self.blocked(cx),
            ready => {
                self.deadline = None;
                ready
            }
        }
    }
}

impl<T: AsyncRead + Unpin> AsyncRead for Stalling<T> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_read(cx, buf)
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for Stalling<T> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let result = Pin::new(&mut self.io).poll_write(cx, buf);
        self.progressed(result, cx)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let result = Pin::new(&mut self.io).poll_write_vectored(cx, bufs);
        self.progressed(result, cx)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let result = Pin::new(&mut self.io).poll_flush(cx);
        self.progressed(result, cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let result = Pin::new(&mut self.io).poll_shutdown(cx);
        self.progressed(result, cx)
    }
}

/// A connection: plain TCP, or TLS over it.
pub enum Conn {
    Plain(actix_rt::net::TcpStream),
    Tls(Box<tokio_rustls::server::TlsStream<actix_rt::net::TcpStream>>),
}

impl AsyncRead for Conn {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Conn::Plain(io) => Pin::new(io).poll_read(cx, buf),
            Conn::Tls(io) => Pin::new(io).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for Conn {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            Conn::Plain(io) => Pin::new(io).poll_write(cx, buf),
            Conn::Tls(io) => Pin::new(io).poll_write(cx, buf),
        }
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            Conn::Plain(io) => Pin::new(io).poll_write_vectored(cx, bufs),
            Conn::Tls(io) => Pin::new(io).poll_write_vectored(cx, bufs),
        }
    }

    fn is_write_vectored(&self) -> bool {
        match self {
            Conn::Plain(io) => io.is_write_vectored(),
            Conn::Tls(io) => io.is_write_vectored(),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Conn::Plain(io) => Pin::new(io).poll_flush(cx),
            Conn::Tls(io) => Pin::new(io).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Conn::Plain(io) => Pin::new(io).poll_shutdown(cx),
            Conn::Tls(io) => Pin::new(io).poll_shutdown(cx),
        }
    }
}

/// The server's certificate chain and key, ready to accept TLS.
#[derive(Clone)]
pub struct Tls(tokio_rustls::TlsAcceptor);

impl Tls {
    /// Read a PEM certificate chain and its PEM private key (PKCS#8, SEC1 or
    /// PKCS#1). Errors name the file and what is wrong with it.
    pub fn from_pem_files(cert: &std::path::Path, key: &std::path::Path) -> Result<Tls, String> {
        use rustls_pki_types::pem::PemObject;
        use rustls_pki_types::{CertificateDer, PrivateKeyDer};
        let chain = CertificateDer::pem_file_iter(cert)
            .and_then(|certs| certs.collect::<Result<Vec<_>, _>>())
            .map_err(|e| format!("TENANTRY_TLS_CERT {}: {e}", cert.display()))?;
        if chain.is_empty() {
            return Err(format!(
                "TENANTRY_TLS_CERT {}: no PEM certificate in it",
                cert.display()
            ));
        }
        let key = PrivateKeyDer::from_pem_file(key)
            .map_err(|e| format!("TENANTRY_TLS_KEY {}: {e}", key.display()))?;
        // ring, as lettre's TLS uses (aws-lc-rs would need cmake to build);
        // rustls marks it deprecated only for lacking post-quantum key
        // exchange.
        #[allow(deprecated)]
        let provider = std::sync::Arc::new(rustls::crypto::ring::default_provider());
        let config = rustls::ServerConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .map_err(|e| e.to_string())?
            .with_no_client_auth()
            .with_single_cert(chain, key)
            .map_err(|e| {
                format!("TENANTRY_TLS_CERT and TENANTRY_TLS_KEY do not make a pair: {e}")
            })?;
        // HTTP/2 for clients that offer it (ALPN), HTTP/1.1 otherwise.
        let mut config = config;
        config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
        Ok(Tls(tokio_rustls::TlsAcceptor::from(std::sync::Arc::new(
            config,
        ))))
    }
}

/// How the listener treats its clients.
#[derive(Clone)]
pub struct ClientLimits {
    /// A request's head must arrive within it (else 408), and a response
    /// write may make no progress for longer (else the connection ends).
    pub timeout: Duration,
    /// How long requests in flight get to finish on shutdown.
    pub drain_seconds: u64,
    /// HTTPS: the TLS handshake must finish within `timeout` too.
    pub tls: Option<Tls>,
}

/// Serve the app that `app` builds (once per worker) on `listener`, the way
/// `actix_web::HttpServer` does, but over [`Stalling`] connections, and
/// with half-closed connections treated as gone: a client that closes its
/// side has given up, and dropping its request's handler cancels the
/// database work behind it (`routing::TenantTx`).
pub fn serve<F, A, B>(listener: TcpListener, limits: ClientLimits, app: F) -> io::Result<Server>
where
    F: Fn() -> actix_web::App<A> + Send + Clone + 'static,
    A: actix_web::dev::ServiceFactory<
            actix_web::dev::ServiceRequest,
            Config = (),
            Response = actix_web::dev::ServiceResponse<B>,
            Error = actix_web::Error,
            InitError = (),
        > + 'static,
    B: actix_web::body::MessageBody + 'static,
{
    let addr = listener.local_addr()?;
    let builder = actix_server::Server::build()
        // Signals are ours (`Application::run_until_stopped`).
        .disable_signals()
        .shutdown_timeout(limits.drain_seconds);
    let shutdown = builder.graceful_shutdown_signal();
    let builder = builder.listen("tenantry", listener, move || {
        let shutdown = shutdown.clone();
        let limits = limits.clone();
        let http = HttpService::build()
            .graceful_shutdown_signal(move || {
                let shutdown = shutdown.clone();
                async move { shutdown.notified().await }
            })
            .client_request_timeout(limits.timeout)
            .client_disconnect_timeout(Duration::from_secs(1))
            .h1_allow_half_closed(false)
            .local_addr(addr)
            .finish(map_config(app(), |_| AppConfig::default()));
        let limits = limits.clone();
        fn_service(move |io: actix_rt::net::TcpStream| {
            let peer = io.peer_addr().ok();
            let (timeout, tls) = (limits.timeout, limits.tls.clone());
            async move {
                let (conn, protocol) = match tls {
                    None => (Conn::Plain(io), Protocol::Http1),
                    Some(Tls(acceptor)) => {
                        match tokio::time::timeout(timeout, acceptor.accept(io)).await {
                            Ok(Ok(stream)) => {
                                let protocol = match stream.get_ref().1.alpn_protocol() {
                                    Some(b"h2") => Protocol::Http2,
                                    _ => Protocol::Http1,
                                };
                                (Conn::Tls(Box::new(stream)), protocol)
                            }
                            // Not TLS, a bad handshake or too slow: the
                            // connection ends.
                            Ok(Err(e)) => return Err(actix_http::error::DispatchError::Io(e)),
                            Err(_) => {
                                return Err(actix_http::error::DispatchError::Io(io::Error::new(
                                    io::ErrorKind::TimedOut,
                                    "TLS handshake timed out",
                                )))
                            }
                        }
                    }
                };
                Ok::<_, actix_http::error::DispatchError>((
                    Stalling::new(conn, timeout),
                    protocol,
                    peer,
                ))
            }
        })
        .and_then(http)
    })?;
    Ok(builder.run())
}
