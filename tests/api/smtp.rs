//! A real SMTP server for the tests of mail: `SmtpSink` runs
//! `smtp_sink.py` (aiosmtpd) on a loopback port, in a Python virtual
//! environment this harness makes itself, and reads back what it received.
//!
//! The venv is `target/test-smtp-venv`, made once per test process (and
//! under a file lock, so two test processes racing for it make it once) with
//! `python3 -m venv` and `pip install aiosmtpd==AIOSMTPD`, and reused while it
//! imports that version. The TLS modes use a CA and a certificate for
//! `127.0.0.1` (an IP SAN) made once per process with the `openssl` CLI; the
//! CA is what `url()` passes as `cacert=`.
//!
//! The sink writes each accepted message as `<seq>.eml` (raw bytes) after
//! `<seq>.json` (its envelope), both renamed into place, so a reader never
//! sees half a mail; `fail_next` writes `control.json`, which the sink reads
//! at every DATA.

use std::fs::File;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::LazyLock;
use std::time::{Duration, Instant};

use lettre::message::header::ContentType;
use lettre::message::Mailbox;
use lettre::transport::smtp::authentication::Credentials;
use lettre::transport::smtp::client::{Certificate, Tls, TlsParameters};
use lettre::{AsyncSmtpTransport, AsyncTransport, Message, Tokio1Executor};
use tenantry::mail::delivery::SmtpTarget;
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, ChildStdin, ChildStdout};

use crate::helpers::{free_port, spawn_reaper, temp_dir};

/// The aiosmtpd the venv holds.
pub const AIOSMTPD: &str = "1.4.6";

/// How long a sink may take to say it listens.
const READY_TIMEOUT: Duration = Duration::from_secs(60);
/// How often `wait_for` looks at the sink's directory.
const POLL: Duration = Duration::from_millis(50);

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum SinkTls {
    /// Plain SMTP.
    #[default]
    None,
    /// STARTTLS, required before MAIL (`smtp://…?tls=starttls`).
    StartTls,
    /// TLS from the first byte (`smtps://…`).
    Implicit,
}

#[derive(Debug, Clone, Default)]
pub struct SinkOptions {
    pub tls: SinkTls,
    /// AUTH PLAIN/LOGIN with this user and password, required before MAIL.
    pub auth: Option<(String, String)>,
}

/// One message the sink accepted.
#[derive(Debug, Clone)]
pub struct ReceivedMail {
    /// The envelope's sender (MAIL FROM).
    pub from: String,
    /// The envelope's recipients (RCPT TO), in the order they were given.
    pub to: Vec<String>,
    /// The `Subject` header, encoded words decoded.
    pub subject: String,
    /// The text/plain part, transfer encoding decoded, line ends `\n`.
    pub body: String,
    /// The message as it arrived.
    pub raw: String,
    headers: Vec<(String, String)>,
}

impl ReceivedMail {
    /// The first header called `name` (any case), unfolded and decoded.
    pub fn header(&self, name: &str) -> Option<&str> {
        header(&self.headers, name)
    }
}

/// A running aiosmtpd on 127.0.0.1, killed when dropped.
pub struct SmtpSink {
    port: u16,
    dir: PathBuf,
    options: SinkOptions,
    process: Option<Process>,
}

/// The sink's process. Its stdin stays open while this lives: the sink stops
/// when it closes, so a test process that dies takes its sinks with it.
struct Process {
    child: Child,
    _stdin: ChildStdin,
    _stdout: BufReader<ChildStdout>,
}

impl SmtpSink {
    /// A plain SMTP sink.
    pub async fn start() -> SmtpSink {
        SmtpSink::start_with(SinkOptions::default()).await
    }

    /// A sink on a fresh port with a fresh directory.
    pub async fn start_with(options: SinkOptions) -> SmtpSink {
        let dir = temp_dir("tenantry-smtp-sink");
        spawn_reaper(&dir);
        let mut sink = SmtpSink {
            port: 0,
            dir,
            options,
            process: None,
        };
        // The free port may be taken before the sink binds it (EADDRINUSE,
        // errno 98 on Linux): then another.
        for attempt in 1.. {
            sink.port = free_port();
            match sink.spawn().await {
                Ok(process) => {
                    sink.process = Some(process);
                    return sink;
                }
                Err(log) if attempt < 5 && log.contains("[Errno 98]") => {}
                Err(log) => panic!("the SMTP sink did not start: {log}"),
            }
        }
        unreachable!()
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    /// The `TENANTRY_SMTP_URL` that sends to this sink.
    pub fn url(&self) -> String {
        let scheme = match self.options.tls {
            SinkTls::Implicit => "smtps",
            SinkTls::None | SinkTls::StartTls => "smtp",
        };
        let mut url = url::Url::parse(&format!("{scheme}://127.0.0.1:{}", self.port)).unwrap();
        if let Some((user, password)) = &self.options.auth {
            url.set_username(user).unwrap();
            url.set_password(Some(password)).unwrap();
        }
        if self.options.tls == SinkTls::StartTls {
            url.query_pairs_mut().append_pair("tls", "starttls");
        }
        if self.options.tls != SinkTls::None {
            url.query_pairs_mut()
                .append_pair("cacert", cacert().to_str().unwrap());
        }
        url.into()
    }

    /// Kill the sink and wait for it to be gone: its port refuses
    /// connections until `restart`.
    pub async fn stop(&mut self) {
        if let Some(mut process) = self.process.take() {
            process.child.kill().await.expect("kill the SMTP sink");
        }
    }

    /// Start the sink again on the same port, directory and options; returns
    /// once it listens. Mails it receives are numbered on from those before.
    pub async fn restart(&mut self) {
        self.stop().await;
        match self.spawn().await {
            Ok(process) => self.process = Some(process),
            Err(log) => panic!(
                "the SMTP sink did not start again on port {}: {log}",
                self.port
            ),
        }
    }

    /// Refuse the next `n` messages at DATA with `code` (4xx: try later,
    /// 5xx: never); they are not stored.
    pub fn fail_next(&self, n: u32, code: u16) {
        assert!((400..600).contains(&code), "{code} is not a failure code");
        let control = serde_json::json!({ "fail": n, "code": code });
        write_atomically(
            &self.dir.join("control.json"),
            control.to_string().as_bytes(),
        );
    }

    /// Every message received so far, in order of arrival.
    pub fn mails(&self) -> Vec<ReceivedMail> {
        let mut seqs: Vec<u64> = std::fs::read_dir(&self.dir)
            .expect("read the SMTP sink's directory")
            .filter_map(|entry| {
                let name = entry.ok()?.file_name();
                name.to_str()?.strip_suffix(".eml")?.parse().ok()
            })
            .collect();
        seqs.sort_unstable();
        seqs.into_iter().map(|seq| self.read_mail(seq)).collect()
    }

    /// All mails once at least `count` arrived; panics with what did arrive
    /// when `timeout` passes first.
    pub async fn wait_for(&self, count: usize, timeout: Duration) -> Vec<ReceivedMail> {
        self.wait_until(timeout, &format!("{count} mail(s)"), |mails| {
            (mails.len() >= count).then(|| mails.to_vec())
        })
        .await
    }

    /// The first mail to `addr` whose subject contains `subject_contains`,
    /// waiting up to `timeout` for it.
    pub async fn wait_for_mail_to(
        &self,
        addr: &str,
        subject_contains: &str,
        timeout: Duration,
    ) -> ReceivedMail {
        let what = format!("a mail to {addr} with {subject_contains:?} in its subject");
        self.wait_until(timeout, &what, |mails| {
            mails
                .iter()
                .find(|m| {
                    m.to.iter().any(|to| to.eq_ignore_ascii_case(addr))
                        && m.subject.contains(subject_contains)
                })
                .cloned()
        })
        .await
    }

    async fn wait_until<T>(
        &self,
        timeout: Duration,
        what: &str,
        found: impl Fn(&[ReceivedMail]) -> Option<T>,
    ) -> T {
        let deadline = Instant::now() + timeout;
        loop {
            let mails = self.mails();
            if let Some(it) = found(&mails) {
                return it;
            }
            if Instant::now() >= deadline {
                let arrived: Vec<String> = mails
                    .iter()
                    .map(|m| format!("to {:?}: {:?}", m.to, m.subject))
                    .collect();
                panic!(
                    "waited {timeout:?} for {what} at the SMTP sink on port {}; {} arrived: {arrived:#?}\nsink log:\n{}",
                    self.port,
                    mails.len(),
                    self.log()
                );
            }
            tokio::time::sleep(POLL).await;
        }
    }

    fn read_mail(&self, seq: u64) -> ReceivedMail {
        let stem = self.dir.join(format!("{seq:06}"));
        let envelope: serde_json::Value = serde_json::from_slice(
            &std::fs::read(stem.with_extension("json")).expect("read a mail's envelope"),
        )
        .expect("a mail's envelope is JSON");
        let raw = std::fs::read(stem.with_extension("eml")).expect("read a mail");
        let mut mail = parse_mail(&String::from_utf8_lossy(&raw));
        mail.from = envelope["mail_from"]
            .as_str()
            .unwrap_or_default()
            .to_owned();
        mail.to = envelope["rcpt_tos"]
            .as_array()
            .expect("rcpt_tos")
            .iter()
            .map(|to| to.as_str().unwrap().to_owned())
            .collect();
        mail
    }

    /// What the sink wrote to stderr, all its runs.
    fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("sink.log")).unwrap_or_default()
    }

    /// Run the sink on `self.port`; `Err` carries its log when it exited
    /// before saying it listens.
    async fn spawn(&self) -> Result<Process, String> {
        let python = tokio::task::spawn_blocking(|| PYTHON.clone())
            .await
            .expect("make the SMTP sink's venv");
        let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/api/smtp_sink.py");
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.join("sink.log"))
            .expect("open the SMTP sink's log");
        let mut cmd = tokio::process::Command::new(python);
        cmd.arg(script)
            .arg(self.port.to_string())
            .arg(&self.dir)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(log)
            .kill_on_drop(true);
        if self.options.tls != SinkTls::None {
            let certs = tokio::task::spawn_blocking(|| &*CERTS)
                .await
                .expect("make the SMTP sink's certificate");
            let tls = match self.options.tls {
                SinkTls::StartTls => "starttls",
                _ => "implicit",
            };
            cmd.args(["--tls", tls])
                .arg("--cert")
                .arg(&certs.cert)
                .arg("--key")
                .arg(&certs.key);
        }
        if let Some((user, password)) = &self.options.auth {
            cmd.arg("--auth").arg(format!("{user}:{password}"));
        }
        let mut child = cmd.spawn().expect("spawn the SMTP sink");
        let stdin = child.stdin.take().unwrap();
        let mut stdout = BufReader::new(child.stdout.take().unwrap());
        let ready = format!("READY {}", self.port);
        let mut line = String::new();
        let read = tokio::time::timeout(READY_TIMEOUT, stdout.read_line(&mut line)).await;
        match read {
            Ok(Ok(_)) if line.trim_end() == ready => Ok(Process {
                child,
                _stdin: stdin,
                _stdout: stdout,
            }),
            Ok(_) => {
                // It exited (or said something else): its log says why.
                let _ = child.kill().await;
                Err(format!("it said {line:?}; its log:\n{}", self.log()))
            }
            Err(_) => {
                let _ = child.kill().await;
                Err(format!(
                    "it did not listen within {READY_TIMEOUT:?}; its log:\n{}",
                    self.log()
                ))
            }
        }
    }
}

impl Drop for SmtpSink {
    fn drop(&mut self) {
        if let Some(process) = &mut self.process {
            let _ = process.child.start_kill();
        }
    }
}

/// The CA (PEM) that the TLS sinks' certificate chains to.
pub fn cacert() -> &'static Path {
    &CERTS.ca
}

/// A server certificate for 127.0.0.1 and localhost and its key (PEM),
/// signed by [`cacert`]: the sinks' own, and what HTTPS tests serve.
pub fn server_cert() -> (&'static Path, &'static Path) {
    (&CERTS.cert, &CERTS.key)
}

/// The value of the `token` query parameter of the first link in `body`.
pub fn token_in(body: &str) -> String {
    let start = ["http://", "https://"]
        .iter()
        .filter_map(|scheme| body.find(scheme))
        .min()
        .unwrap_or_else(|| panic!("no link in {body:?}"));
    let link = body[start..]
        .split(|c: char| c.is_whitespace() || matches!(c, '<' | '>' | '"' | '\''))
        .next()
        .unwrap()
        .trim_end_matches(['.', ',', ';', ':', ')', ']']);
    let url = url::Url::parse(link).unwrap_or_else(|e| panic!("{link:?} is not a URL: {e}"));
    url.query_pairs()
        .find(|(k, _)| k == "token")
        .map(|(_, v)| v.into_owned())
        .unwrap_or_else(|| panic!("the first link in the text, {link}, has no token"))
}

/// The venv's python, with aiosmtpd.
static PYTHON: LazyLock<PathBuf> = LazyLock::new(venv_python);

fn venv_python() -> PathBuf {
    let target = Path::new(env!("CARGO_MANIFEST_DIR")).join("target");
    let venv = target.join("test-smtp-venv");
    let python = venv.join("bin/python");
    std::fs::create_dir_all(&target).expect("create target/");
    // Another test process may be making it: one at a time, and the second
    // finds it made.
    let lock = File::create(target.join("test-smtp-venv.lock")).expect("create the venv's lock");
    lock.lock().expect("lock the venv's lock file");
    if has_aiosmtpd(&python) {
        return python;
    }
    // Half made (a process killed while making it) or another version.
    if venv.exists() {
        std::fs::remove_dir_all(&venv).expect("remove the old venv");
    }
    run(
        Command::new("python3").arg("-m").arg("venv").arg(&venv),
        "python3 -m venv",
        "the SMTP sink needs Python 3 with its venv module \
         (Debian: apt-get install python3 python3-venv)",
    );
    run(
        Command::new(&python).args([
            "-m",
            "pip",
            "install",
            "--quiet",
            "--disable-pip-version-check",
            &format!("aiosmtpd=={AIOSMTPD}"),
        ]),
        "pip install aiosmtpd",
        "pip needs to reach PyPI (or a wheel of aiosmtpd and its dependencies in PIP_FIND_LINKS)",
    );
    assert!(
        has_aiosmtpd(&python),
        "{} does not import aiosmtpd {AIOSMTPD} after installing it",
        python.display()
    );
    python
}

fn has_aiosmtpd(python: &Path) -> bool {
    let check = format!("import sys, aiosmtpd; sys.exit(aiosmtpd.__version__ != '{AIOSMTPD}')");
    Command::new(python)
        .args(["-c", &check])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

/// Run `cmd`; panic with its output and `hint` when it cannot run or fails.
fn run(cmd: &mut Command, what: &str, hint: &str) {
    let out = cmd
        .output()
        .unwrap_or_else(|e| panic!("cannot run {what} ({e}): {hint}"));
    assert!(
        out.status.success(),
        "{what} failed ({}): {hint}\n{}{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

struct Certs {
    ca: PathBuf,
    cert: PathBuf,
    key: PathBuf,
}

/// `openssl req` arguments for a new P-256 key without a passphrase.
pub const EC_KEY: [&str; 5] = [
    "-newkey",
    "ec",
    "-pkeyopt",
    "ec_paramgen_curve:prime256v1",
    "-nodes",
];

/// A CA and a server certificate for 127.0.0.1 and localhost, signed by it.
static CERTS: LazyLock<Certs> = LazyLock::new(|| {
    let dir = temp_dir("tenantry-smtp-certs");
    spawn_reaper(&dir);
    let openssl = |args: &[&str]| {
        run(
            Command::new("openssl").current_dir(&dir).args(args),
            &format!("openssl {}", args[0]),
            "the TLS modes of the SMTP sink need the openssl CLI (Debian: apt-get install openssl)",
        )
    };
    let ec = EC_KEY;
    openssl(
        &[
            &["req", "-x509"][..],
            &ec,
            &["-keyout", "ca.key", "-out", "ca.pem", "-days", "7"],
            &["-subj", "/CN=Tenantry test CA"],
            &["-addext", "basicConstraints=critical,CA:TRUE"],
            &["-addext", "keyUsage=critical,keyCertSign,cRLSign"],
        ]
        .concat(),
    );
    openssl(
        &[
            &["req", "-new"][..],
            &ec,
            &[
                "-keyout",
                "sink.key",
                "-out",
                "sink.csr",
                "-subj",
                "/CN=127.0.0.1",
            ],
        ]
        .concat(),
    );
    std::fs::write(
        dir.join("sink.ext"),
        "subjectAltName = IP:127.0.0.1, DNS:localhost\n\
         basicConstraints = critical, CA:FALSE\n\
         keyUsage = critical, digitalSignature\n\
         extendedKeyUsage = serverAuth\n",
    )
    .unwrap();
    let serial = format!("0x{}", uuid::Uuid::new_v4().simple());
    openssl(&[
        "x509",
        "-req",
        "-in",
        "sink.csr",
        "-CA",
        "ca.pem",
        "-CAkey",
        "ca.key",
        "-set_serial",
        &serial,
        "-days",
        "7",
        "-extfile",
        "sink.ext",
        "-out",
        "sink.pem",
    ]);
    Certs {
        ca: dir.join("ca.pem"),
        cert: dir.join("sink.pem"),
        key: dir.join("sink.key"),
    }
});

fn write_atomically(path: &Path, bytes: &[u8]) {
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, bytes).expect("write the SMTP sink's control file");
    std::fs::rename(&tmp, path).expect("rename the SMTP sink's control file");
}

/// Headers, subject and text/plain body of a raw message (the envelope is
/// left empty).
fn parse_mail(raw: &str) -> ReceivedMail {
    // The line end before the end-of-data dot belongs to the SMTP terminator
    // (RFC 5321 4.1.1.4), which aiosmtpd keeps in the content.
    let message = raw.strip_suffix("\r\n").unwrap_or(raw);
    let (head, body) = split_head(message);
    let headers = parse_headers(head);
    ReceivedMail {
        from: String::new(),
        to: Vec::new(),
        subject: header(&headers, "subject").unwrap_or_default().to_owned(),
        body: text_plain(&headers, body).unwrap_or_default(),
        raw: raw.to_owned(),
        headers,
    }
}

/// The header section and the body: they part at the first empty line.
fn split_head(entity: &str) -> (&str, &str) {
    if let Some(body) = entity
        .strip_prefix("\r\n")
        .or_else(|| entity.strip_prefix('\n'))
    {
        return ("", body);
    }
    ["\r\n\r\n", "\n\n"]
        .iter()
        .filter_map(|sep| entity.find(sep).map(|at| (at, sep.len())))
        .min()
        .map_or((entity, ""), |(at, len)| {
            (&entity[..at], &entity[at + len..])
        })
}

/// Unfolded headers, encoded words decoded.
fn parse_headers(head: &str) -> Vec<(String, String)> {
    let mut unfolded: Vec<(String, String)> = Vec::new();
    for line in head.lines() {
        if line.starts_with([' ', '\t']) {
            if let Some((_, value)) = unfolded.last_mut() {
                value.push_str(line);
            }
        } else if let Some((name, value)) = line.split_once(':') {
            unfolded.push((name.trim().to_owned(), value.to_owned()));
        }
    }
    unfolded
        .into_iter()
        .map(|(name, value)| (name, decode_words(value.trim())))
        .collect()
}

fn header<'a>(headers: &'a [(String, String)], name: &str) -> Option<&'a str> {
    headers
        .iter()
        .find(|(n, _)| n.eq_ignore_ascii_case(name))
        .map(|(_, v)| v.as_str())
}

/// RFC 2047: `=?charset?B|Q?text?=` words decoded (as UTF-8), the blanks
/// between two of them dropped.
fn decode_words(value: &str) -> String {
    use base64::Engine;
    static WORD: LazyLock<regex::Regex> =
        LazyLock::new(|| regex::Regex::new(r"=\?[^?]+\?([bBqQ])\?([^?]*)\?=").unwrap());
    let mut out = String::new();
    // The bytes of adjacent words: a character may be split between them.
    let mut pending: Vec<u8> = Vec::new();
    let mut last = 0;
    for word in WORD.captures_iter(value) {
        let whole = word.get(0).unwrap();
        let between = &value[last..whole.start()];
        let adjacent = last > 0 && between.trim().is_empty();
        if !adjacent {
            out.push_str(&String::from_utf8_lossy(&std::mem::take(&mut pending)));
            out.push_str(between);
        }
        let text = &word[2];
        let decoded = if word[1].eq_ignore_ascii_case("b") {
            base64::engine::general_purpose::STANDARD.decode(text).ok()
        } else {
            quoted_printable::decode(text.replace('_', " "), quoted_printable::ParseMode::Robust)
                .ok()
        };
        pending.extend(decoded.unwrap_or_else(|| whole.as_str().as_bytes().to_vec()));
        last = whole.end();
    }
    out.push_str(&String::from_utf8_lossy(&pending));
    out.push_str(&value[last..]);
    out
}

/// The first text/plain part of an entity, decoded.
fn text_plain(headers: &[(String, String)], body: &str) -> Option<String> {
    let content_type = header(headers, "content-type").unwrap_or("text/plain");
    let mime = content_type
        .split(';')
        .next()
        .unwrap()
        .trim()
        .to_ascii_lowercase();
    if mime.starts_with("multipart/") {
        let boundary = parameter(content_type, "boundary")?;
        let delimiter = format!("--{boundary}");
        return body
            .split(&delimiter)
            .skip(1)
            .take_while(|part| !part.starts_with("--"))
            .find_map(|part| {
                let part = part.strip_prefix("\r\n").or(part.strip_prefix('\n'))?;
                // The line end before a delimiter belongs to it.
                let part = part
                    .strip_suffix("\r\n")
                    .or(part.strip_suffix('\n'))
                    .unwrap_or(part);
                let (head, body) = split_head(part);
                text_plain(&parse_headers(head), body)
            });
    }
    if mime != "text/plain" {
        return None;
    }
    let encoding = header(headers, "content-transfer-encoding")
        .unwrap_or("7bit")
        .trim()
        .to_ascii_lowercase();
    let bytes = match encoding.as_str() {
        "quoted-printable" => {
            quoted_printable::decode(body, quoted_printable::ParseMode::Robust).ok()?
        }
        "base64" => {
            use base64::Engine;
            let compact: String = body.split_whitespace().collect();
            base64::engine::general_purpose::STANDARD
                .decode(compact)
                .ok()?
        }
        _ => body.as_bytes().to_vec(),
    };
    Some(String::from_utf8_lossy(&bytes).replace("\r\n", "\n"))
}

/// A parameter of a header value (`; name=value` or `; name="value"`).
fn parameter(value: &str, name: &str) -> Option<String> {
    value.split(';').skip(1).find_map(|p| {
        let (k, v) = p.split_once('=')?;
        k.trim()
            .eq_ignore_ascii_case(name)
            .then(|| v.trim().trim_matches('"').to_owned())
    })
}

// Tests of the sink itself, sending with lettre.

const WAIT: Duration = Duration::from_secs(10);

/// A lettre client of `sink` as its options say, with `credentials`.
fn client(
    sink: &SmtpSink,
    tls: SinkTls,
    credentials: Option<(&str, &str)>,
) -> AsyncSmtpTransport<Tokio1Executor> {
    let mut builder = AsyncSmtpTransport::<Tokio1Executor>::builder_dangerous("127.0.0.1")
        .port(sink.port())
        .timeout(Some(WAIT));
    if tls != SinkTls::None {
        let pem = std::fs::read(cacert()).unwrap();
        let params = TlsParameters::builder("127.0.0.1".into())
            .add_root_certificate(Certificate::from_pem(&pem).unwrap())
            .build_rustls()
            .unwrap();
        builder = builder.tls(match tls {
            SinkTls::StartTls => Tls::Required(params),
            _ => Tls::Wrapper(params),
        });
    }
    if let Some((user, password)) = credentials {
        builder = builder.credentials(Credentials::new(user.into(), password.into()));
    }
    builder.build()
}

/// `message` sent through `smtp`. lettre's timeout bounds only the
/// connect, so the test bounds the conversation.
async fn send(
    smtp: &AsyncSmtpTransport<Tokio1Executor>,
    message: Message,
) -> Result<(), lettre::transport::smtp::Error> {
    tokio::time::timeout(WAIT, smtp.send(message))
        .await
        .expect("the SMTP conversation hung")
        .map(drop)
}

fn letter(to: &str, subject: &str, body: &str) -> Message {
    Message::builder()
        .from(
            "Tenantry <tenantry@example.com>"
                .parse::<Mailbox>()
                .unwrap(),
        )
        .to(to.parse().unwrap())
        .subject(subject)
        .header(ContentType::TEXT_PLAIN)
        .body(body.to_owned())
        .unwrap()
}

fn the_service_accepts(sink: &SmtpSink) {
    if let Err(e) = SmtpTarget::parse(&sink.url()) {
        panic!("the service refuses {}: {e}", sink.url());
    }
}

#[tokio::test]
async fn a_plain_mail_arrives_with_its_envelope_subject_and_body() {
    let sink = SmtpSink::start().await;
    the_service_accepts(&sink);
    let body = "Hello Zoë,\n\nopen https://tenantry.test/verify?token=Ab-9_xY to verify your \
                address; this line is long enough to be wrapped by quoted-printable, which \
                keeps lines under 76 characters.\n";
    let message = Message::builder()
        .from("tenantry@example.com".parse::<Mailbox>().unwrap())
        .to("Zoë <zoe@example.com>".parse().unwrap())
        .cc("ann@example.com".parse().unwrap())
        .subject("Prüfe deine Adresse ✓ — a subject long enough to be folded over two lines")
        .header(ContentType::TEXT_PLAIN)
        .body(body.to_owned())
        .unwrap();

    send(&client(&sink, SinkTls::None, None), message)
        .await
        .expect("send");

    let mails = sink.wait_for(1, WAIT).await;
    assert_eq!(mails.len(), 1);
    let mail = &mails[0];
    assert_eq!(mail.from, "tenantry@example.com");
    assert_eq!(mail.to, ["zoe@example.com", "ann@example.com"]);
    assert_eq!(
        mail.subject,
        "Prüfe deine Adresse ✓ — a subject long enough to be folded over two lines"
    );
    assert_eq!(mail.body, body);
    assert_eq!(token_in(&mail.body), "Ab-9_xY");
    assert!(mail
        .header("From")
        .unwrap()
        .contains("tenantry@example.com"));
    assert!(mail.raw.contains("Subject:"));
}

#[tokio::test]
async fn a_mail_over_starttls_arrives_and_plain_text_is_refused() {
    let sink = SmtpSink::start_with(SinkOptions {
        tls: SinkTls::StartTls,
        auth: None,
    })
    .await;
    the_service_accepts(&sink);
    assert!(sink.url().contains("tls=starttls"));

    let refused = send(
        &client(&sink, SinkTls::None, None),
        letter("bob@example.com", "in clear", "no\n"),
    )
    .await;
    send(
        &client(&sink, SinkTls::StartTls, None),
        letter("bob@example.com", "over TLS", "yes\n"),
    )
    .await
    .expect("send over STARTTLS");

    assert!(
        refused.is_err(),
        "a sink that requires STARTTLS took a mail in clear"
    );
    let mail = sink
        .wait_for_mail_to("bob@example.com", "over TLS", WAIT)
        .await;
    assert_eq!(mail.body, "yes\n");
    assert_eq!(sink.mails().len(), 1);
}

#[tokio::test]
async fn implicit_tls_with_auth_takes_the_right_password_only() {
    let sink = SmtpSink::start_with(SinkOptions {
        tls: SinkTls::Implicit,
        auth: Some(("mailer".into(), "s3cret pass".into())),
    })
    .await;
    the_service_accepts(&sink);
    assert!(sink
        .url()
        .starts_with("smtps://mailer:s3cret%20pass@127.0.0.1:"));

    let wrong = send(
        &client(&sink, SinkTls::Implicit, Some(("mailer", "wrong"))),
        letter("carol@example.com", "wrong password", "no\n"),
    )
    .await;
    let anonymous = send(
        &client(&sink, SinkTls::Implicit, None),
        letter("carol@example.com", "no password", "no\n"),
    )
    .await;
    send(
        &client(&sink, SinkTls::Implicit, Some(("mailer", "s3cret pass"))),
        letter("carol@example.com", "right password", "yes\n"),
    )
    .await
    .expect("send with the right password");

    assert!(wrong.is_err(), "a wrong password was taken");
    assert!(anonymous.is_err(), "a mail without AUTH was taken");
    let mails = sink.wait_for(1, WAIT).await;
    assert_eq!(mails.len(), 1);
    assert_eq!(mails[0].subject, "right password");
}

#[tokio::test]
async fn injected_failures_refuse_the_next_mails_then_it_accepts() {
    let sink = SmtpSink::start().await;
    let smtp = client(&sink, SinkTls::None, None);
    sink.fail_next(2, 451);

    let first = send(&smtp, letter("dan@example.com", "1", "1\n")).await;
    let second = send(&smtp, letter("dan@example.com", "2", "2\n")).await;
    send(&smtp, letter("dan@example.com", "3", "3\n"))
        .await
        .expect("the third is accepted");
    sink.fail_next(1, 554);
    let fourth = send(&smtp, letter("dan@example.com", "4", "4\n")).await;

    for refused in [&first, &second] {
        let e = refused.as_ref().expect_err("refused");
        assert!(e.is_transient(), "451 is a transient error: {e}");
    }
    let e = fourth.expect_err("refused");
    assert!(e.is_permanent(), "554 is a permanent error: {e}");
    let subjects: Vec<String> = sink.mails().into_iter().map(|m| m.subject).collect();
    assert_eq!(subjects, ["3"]);
}

#[tokio::test]
async fn a_stopped_sink_refuses_and_a_restarted_one_takes_mail_on_the_same_port() {
    let mut sink = SmtpSink::start().await;
    let smtp = client(&sink, SinkTls::None, None);
    let port = sink.port();
    send(&smtp, letter("eve@example.com", "before", "1\n"))
        .await
        .expect("send before the stop");

    sink.stop().await;
    let while_stopped = send(&smtp, letter("eve@example.com", "stopped", "2\n")).await;
    sink.restart().await;
    send(&smtp, letter("eve@example.com", "after", "3\n"))
        .await
        .expect("send after the restart");

    assert!(while_stopped.is_err(), "a stopped sink took a mail");
    assert_eq!(sink.port(), port);
    let subjects: Vec<String> = sink
        .wait_for(2, WAIT)
        .await
        .into_iter()
        .map(|m| m.subject)
        .collect();
    assert_eq!(subjects, ["before", "after"]);
}

#[test]
fn token_in_reads_the_token_of_the_first_link() {
    let body = "Hi,\n\nconfirm: <https://app.test/verify?user=7&token=q-Z_09azAZ> (or \
                http://other.test/x?token=second).\n";
    assert_eq!(token_in(body), "q-Z_09azAZ");
    assert_eq!(
        token_in("reset at http://127.0.0.1:8080/reset?token=abc_DEF-123."),
        "abc_DEF-123"
    );
}

#[test]
fn a_multipart_mail_gives_its_text_plain_part() {
    let raw = "Subject: =?utf-8?q?caf=C3=A9?= =?utf-8?b?4pyT?=\r\n\
               Content-Type: multipart/alternative; boundary=\"b1\"\r\n\r\n\
               --b1\r\nContent-Type: text/html\r\n\r\n<p>no</p>\r\n\
               --b1\r\nContent-Type: text/plain; charset=utf-8\r\n\
               Content-Transfer-Encoding: base64\r\n\r\naMOpbGxvCg==\r\n--b1--\r\n";
    let mail = parse_mail(raw);
    assert_eq!(mail.subject, "café✓");
    assert_eq!(mail.body, "héllo\n");
}
