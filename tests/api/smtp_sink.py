"""A real SMTP server for the integration tests (tests/api/smtp.rs starts it).

    python smtp_sink.py PORT DIR [--tls none|starttls|implicit] [--cert PEM --key PEM]
                                 [--auth USER:PASSWORD]

aiosmtpd on 127.0.0.1:PORT. Every accepted message is written to DIR as
`<seq>.json` (the envelope: mail_from, rcpt_tos) and then `<seq>.eml` (the
message's raw bytes), each under a temporary name and renamed, so a reader that
sees an `.eml` sees it whole and its envelope beside it. `seq` is zero-padded
and goes on from the highest one in DIR (a restarted sink appends).

Failure injection: `DIR/control.json` is read at every DATA; with
`{"fail": N, "code": C}` and N > 0 the message is refused with code C (4xx or
5xx) and not stored, and N is decremented.

Prints `READY <port>` on stdout once it listens. Stops when its stdin closes
(its test process is gone) or on SIGTERM.
"""

import argparse
import json
import os
import re
import signal
import ssl
import sys
import threading

from aiosmtpd.controller import Controller
from aiosmtpd.smtp import AuthResult, LoginPassword

CONTROL = "control.json"
SEQ_WIDTH = 6


def write_atomically(path, data):
    tmp = os.path.join(os.path.dirname(path), "." + os.path.basename(path) + ".tmp")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.rename(tmp, path)


class Sink:
    def __init__(self, directory):
        self.dir = directory
        seqs = [
            int(m.group(1))
            for m in (re.fullmatch(r"(\d+)\.eml", n) for n in os.listdir(directory))
            if m
        ]
        self.seq = max(seqs, default=0)

    def injected_failure(self):
        """The reply for a failure to inject now, or None."""
        path = os.path.join(self.dir, CONTROL)
        try:
            with open(path, "rb") as f:
                control = json.load(f)
        except FileNotFoundError:
            return None
        left = int(control.get("fail", 0))
        if left <= 0:
            return None
        code = int(control.get("code", 451))
        control["fail"] = left - 1
        write_atomically(path, json.dumps(control).encode())
        if code < 500:
            return f"{code} 4.3.0 Injected temporary failure"
        return f"{code} 5.3.0 Injected permanent failure"

    async def handle_DATA(self, server, session, envelope):
        # The handler runs on the sink's one event loop: no two calls interleave.
        failure = self.injected_failure()
        if failure is not None:
            return failure
        self.seq += 1
        stem = os.path.join(self.dir, f"{self.seq:0{SEQ_WIDTH}d}")
        meta = {"mail_from": envelope.mail_from, "rcpt_tos": list(envelope.rcpt_tos)}
        write_atomically(stem + ".json", json.dumps(meta).encode())
        write_atomically(stem + ".eml", envelope.original_content)
        return "250 2.0.0 Message accepted"


class Authenticator:
    def __init__(self, user, password):
        self.user = user.encode()
        self.password = password.encode()

    def __call__(self, server, session, envelope, mechanism, auth_data):
        ok = (
            mechanism in ("PLAIN", "LOGIN")
            and isinstance(auth_data, LoginPassword)
            and auth_data.login == self.user
            and auth_data.password == self.password
        )
        # handled=False: aiosmtpd answers a failure itself (535).
        return AuthResult(success=ok, handled=False)


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("port", type=int)
    parser.add_argument("dir")
    parser.add_argument("--tls", choices=("none", "starttls", "implicit"), default="none")
    parser.add_argument("--cert")
    parser.add_argument("--key")
    parser.add_argument("--auth", help="USER:PASSWORD")
    args = parser.parse_args()

    kwargs = {}
    context = None
    if args.tls != "none":
        if not (args.cert and args.key):
            parser.error("--tls needs --cert and --key")
        context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        context.load_cert_chain(args.cert, args.key)
    if args.tls == "starttls":
        kwargs.update(tls_context=context, require_starttls=True)
    elif args.tls == "implicit":
        kwargs.update(ssl_context=context)
    if args.auth is not None:
        user, _, password = args.auth.partition(":")
        kwargs.update(
            authenticator=Authenticator(user, password),
            auth_required=True,
            # aiosmtpd counts only STARTTLS as TLS: an implicit-TLS session
            # is encrypted from its first byte, a plain one never is (the
            # tests of AUTH without TLS ask for that).
            auth_require_tls=args.tls == "starttls",
        )

    controller = Controller(
        Sink(args.dir), hostname="127.0.0.1", port=args.port, **kwargs
    )
    controller.start()

    stopped = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stopped.set())

    def watch_stdin():
        # EOF: the test process that started the sink is gone.
        sys.stdin.buffer.read()
        stopped.set()

    threading.Thread(target=watch_stdin, daemon=True).start()
    print(f"READY {args.port}", flush=True)
    stopped.wait()
    controller.stop()


if __name__ == "__main__":
    main()
