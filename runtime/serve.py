"""emrrg-serve: an HTTP report service for an X-ray console (FastAPI + uvicorn). Torch-free.

    emrrg-serve BUNDLE [--host 127.0.0.1] [--port 8080] [--backend auto] [--threads N]
                [--queue-size 4] [--max-request-mb 64] [--beams N] [--max-new-tokens N]
                [--upload-budget-mb 4 x max-request-mb] [--body-timeout 30] [--header-timeout 10]
                [--graceful-timeout 30] [--max-megapixels 64] [--allow-modality MOD ...] [--strict-inputs]
                [--api-key KEY (or $EMRRG_API_KEY)] [--ssl-certfile CERT.pem --ssl-keyfile KEY.pem]

This module is the command line (options, logging, uvicorn with a request-head deadline, signals). The API and
the design are described in emrrg.runtime.serve_app; the queue and the model live in emrrg.runtime.serve_service,
the JSON schemas in emrrg.runtime.serve_models. The names tests and callers import from here stay here.
"""
from __future__ import annotations

import argparse
import asyncio
import ipaddress
import logging
import math
import os
import signal
import sys

from emrrg.runtime.bundle import BundleError, load_manifest
from emrrg.runtime.report_runtime import BACKENDS
from emrrg.runtime.gate import add_input_arguments, policy_from_args
from emrrg.runtime.helpfmt import CommandParser, DefaultsHelpFormatter, add_decoding_arguments, count_int, positive_int
from emrrg.runtime.serve_app import API_KEY_ENV, MAX_HEADER_BYTES, OPEN_PATHS, create_app, log
from emrrg.runtime.serve_service import (  # noqa: F401  (re-exported: tests and callers import them from here)
    DEFAULT_BODY_TIMEOUT_S, DEFAULT_MAX_REQUEST_MB, DEFAULT_QUEUE_SIZE, FIRST_GENERATION_GUESS_S, UPLOAD_BUDGET_FACTOR,
    ReportService, per_request_s, retry_after_s,
)

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 8080
DEFAULT_GRACEFUL_TIMEOUT_S = 30
DEFAULT_HEADER_TIMEOUT_S = 10.0  # a whole request head (a few hundred bytes from a console)


# --------------------------------------------------------------------------- CLI

def is_loopback(host: str) -> bool:
    if host.lower() in ("localhost", "localhost.localdomain", "ip6-localhost"):
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def warn_if_exposed(host: str, auth: bool = False, tls: bool = False) -> bool:
    """Log a loud warning when the service would be reachable from other machines without an API key or
    without TLS; True when it warned."""
    if is_loopback(host) or (auth and tls):
        return False
    where = "ALL network interfaces" if host in ("0.0.0.0", "::", "") else f"{host}"
    lacks = " and ".join(x for x, have in (("NO authentication (--api-key)", auth), ("NO TLS (--ssl-certfile)", tls))
                         if not have)
    risk = ("anyone who can reach this port can upload patient\n!! images and read reports" if not auth else
            "images, reports and the API key cross the network\n!! in clear text")
    bar = "!" * 78
    log.warning("\n%s\n!! emrrg-serve is bound to %s, not to loopback.\n"
                "!! It has %s: %s. Bind to 127.0.0.1 behind an\n"
                "!! authenticating TLS proxy, or give --api-key and --ssl-certfile/--ssl-keyfile, and let a\n"
                "!! firewall limit this port to the X-ray console.\n%s", bar, where, lacks, risk, bar)
    return True


def api_key_text(s: str) -> str:
    """argparse type of --api-key: printable ASCII without spaces (it travels in an HTTP header)."""
    if not s or not all(33 <= ord(c) <= 126 for c in s):
        raise argparse.ArgumentTypeError("must be 1 or more printable ASCII characters without spaces "
                                         f"(set it with --api-key or ${API_KEY_ENV})")
    return s


def check_tls_files(certfile: str, keyfile: str) -> None:
    """Load the certificate and key as uvicorn will, so a wrong path or a mismatched pair is one line at
    start-up, not a traceback from the server."""
    import ssl

    try:
        ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER).load_cert_chain(certfile, keyfile)
    except FileNotFoundError as e:
        raise ValueError(f"no such file: {e.filename or certfile}") from None
    except (ssl.SSLError, OSError) as e:
        raise ValueError(f"cannot use --ssl-certfile {certfile} with --ssl-keyfile {keyfile} "
                         f"({getattr(e, 'reason', None) or e}): give a PEM certificate and its unencrypted PEM key") from None


LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


def _setup_logging() -> None:
    """The service's log on stderr: CommandParser already set the format and the level of emrrg and uvicorn
    (-q, -v, EMRRG_LOG_LEVEL: runtime/logs.py); this covers create_app callers that did not parse a command line."""
    root = logging.getLogger()
    if not root.handlers:
        logging.basicConfig(level=logging.INFO, stream=sys.stderr, format=LOG_FORMAT)
        for name in ("emrrg", "uvicorn.error"):
            logging.getLogger(name).setLevel(logging.INFO)
    # pydicom's own log messages can quote element values; its real failures surface as exceptions anyway.
    logging.getLogger("pydicom").setLevel(logging.ERROR)


def head_timeout_protocol(timeout_s: float):
    """uvicorn's h11 protocol with a deadline on request heads: while the server is not working on a request
    (a new connection, after a response, while a body it has answered keeps arriving), the next request head
    must be complete within `timeout_s`, else the connection is closed, with a 408 when part of a head came.
    uvicorn alone waits for a head forever (its keep-alive timer stops at the first byte)."""
    import h11
    from uvicorn.protocols.http.h11_impl import H11Protocol

    class HeadTimeoutProtocol(H11Protocol):
        _head_timer: asyncio.TimerHandle | None = None

        def connection_made(self, transport) -> None:
            super().connection_made(transport)
            self._sync_head_timer()

        def data_received(self, data: bytes) -> None:
            super().data_received(data)
            self._sync_head_timer()

        def on_response_complete(self) -> None:
            super().on_response_complete()
            self._sync_head_timer()

        def connection_lost(self, exc) -> None:
            self._stop_head_timer()
            super().connection_lost(exc)

        def _sync_head_timer(self) -> None:
            waiting = (self.conn.their_state is h11.IDLE or self.conn.our_state is h11.DONE) and \
                not self.transport.is_closing()
            if not waiting:
                self._stop_head_timer()
            elif self._head_timer is None:
                self._head_timer = self.loop.call_later(timeout_s, self._head_timed_out)

        def _stop_head_timer(self) -> None:
            if self._head_timer is not None:
                self._head_timer.cancel()
                self._head_timer = None

        def _head_timed_out(self) -> None:
            self._head_timer = None
            if self.transport.is_closing():
                return
            partial = self.conn.their_state is h11.IDLE and bool(self.conn.trailing_data[0])
            if partial:
                self.transport.write(b"HTTP/1.1 408 Request Timeout\r\ncontent-length: 0\r\nconnection: close\r\n\r\n")
            log.info("closed a connection: %s within --header-timeout %g s",
                     "request head not complete" if partial else "no new request", timeout_s)
            try:
                self.conn.send(h11.ConnectionClosed())
            except h11.LocalProtocolError:
                pass
            self.transport.close()

    return HeadTimeoutProtocol


def _positive_float(s: str) -> float:
    v = float(s)
    if not (v > 0 and math.isfinite(v)):
        raise argparse.ArgumentTypeError(f"must be > 0, got {s}")
    return v


def _port(s: str) -> int:
    v = int(s)
    if not 0 <= v <= 65535:
        raise argparse.ArgumentTypeError(f"not a TCP port: {v}")
    return v


def serve_main(argv: list[str] | None = None) -> None:
    p = CommandParser(prog="emrrg-serve", formatter_class=DefaultsHelpFormatter, log_format=LOG_FORMAT,
                      log_names=("uvicorn",),
                                description="HTTP report service for an X-ray console: POST /v1/reports (DICOM/PNG/"
                                            "JPEG, or multipart 'views'), GET /healthz, GET /v1/model, /openapi.json.")
    p.add_argument("bundle", help="bundle directory written by emrrg-export")
    p.add_argument("--host", default=DEFAULT_HOST, help="address to bind (anything but loopback is warned about: "
                                                        "no authentication, no TLS)")
    p.add_argument("--port", type=_port, default=DEFAULT_PORT, help="TCP port")
    p.add_argument("--backend", default="auto", choices=BACKENDS, help="execution backend")
    p.add_argument("--threads", type=positive_int, default=None,
                   help="ONNX Runtime intra-op threads (default: all cores)")
    p.add_argument("--queue-size", type=count_int, default=DEFAULT_QUEUE_SIZE,
                   help="requests that may wait while one runs; more get 503 with Retry-After")
    p.add_argument("--max-request-mb", type=_positive_float, default=DEFAULT_MAX_REQUEST_MB,
                   help="largest accepted request body in MiB (413 above)")
    p.add_argument("--upload-budget-mb", type=_positive_float, default=None,
                   help=f"MiB of request bodies that may be read at once, apart from the queue; each reserves its "
                        f"Content-Length, a chunked one --max-request-mb; more get 503 (default: {UPLOAD_BUDGET_FACTOR} x "
                        f"--max-request-mb)")
    p.add_argument("--body-timeout", type=_positive_float, default=DEFAULT_BODY_TIMEOUT_S,
                   help="seconds for a whole request body to arrive after its head (408 and close after)")
    p.add_argument("--header-timeout", type=_positive_float, default=DEFAULT_HEADER_TIMEOUT_S,
                   help="seconds for a whole request head (line + headers) to arrive; the connection is closed after")
    add_decoding_arguments(p, min_new_tokens=False, applies_to=" for requests that give none")
    add_input_arguments(p)
    p.add_argument("--graceful-timeout", type=_positive_float, default=DEFAULT_GRACEFUL_TIMEOUT_S,
                   help="seconds to let running and queued requests finish on SIGTERM/SIGINT")
    env_key = os.environ.get(API_KEY_ENV) or None
    p.add_argument("--api-key", type=api_key_text, default=None,
                   help=f"require this key on every request but {', '.join(sorted(OPEN_PATHS))}: 'Authorization: "
                        f"Bearer KEY' or 'X-API-Key: KEY', else 401. Prefer ${API_KEY_ENV}: a command line is "
                        f"visible to other local users (default: ${API_KEY_ENV} when set, else no authentication)")
    p.add_argument("--ssl-certfile", default=None,
                   help="PEM certificate (chain) to serve HTTPS with; needs --ssl-keyfile (default: none, plain HTTP)")
    p.add_argument("--ssl-keyfile", default=None,
                   help="PEM private key (unencrypted) of --ssl-certfile (default: none, plain HTTP)")
    a = p.parse_args(argv)
    if a.api_key is None and env_key is not None:
        try:
            a.api_key = api_key_text(env_key)
        except argparse.ArgumentTypeError as e:
            p.error(f"${API_KEY_ENV}: {e}")
    if (a.ssl_certfile is None) != (a.ssl_keyfile is None):
        p.error("--ssl-certfile and --ssl-keyfile go together: give both (or neither, for plain HTTP)")
    if a.upload_budget_mb is not None and a.upload_budget_mb < a.max_request_mb:
        p.error(f"--upload-budget-mb {a.upload_budget_mb:g} is below --max-request-mb {a.max_request_mb:g}: "
                "a body of the largest accepted size could never be read; raise it")

    import uvicorn

    _setup_logging()
    try:
        load_manifest(a.bundle)  # fail fast on a wrong path; the full check runs while loading
        if a.ssl_certfile:
            check_tls_files(a.ssl_certfile, a.ssl_keyfile)
    except (BundleError, ValueError) as e:
        print(f"emrrg-serve: error: {e}", file=sys.stderr)
        raise SystemExit(2) from None
    warn_if_exposed(a.host, auth=a.api_key is not None, tls=a.ssl_certfile is not None)
    service = ReportService(a.bundle, backend=a.backend, threads=a.threads, queue_size=a.queue_size,
                            max_request_bytes=int(a.max_request_mb * 2**20), beams=a.beams,
                            upload_budget_bytes=int(a.upload_budget_mb * 2**20) if a.upload_budget_mb else None,
                            body_timeout_s=a.body_timeout,
                            max_new_tokens=a.max_new_tokens, policy=policy_from_args(a))
    config = uvicorn.Config(create_app(service, api_key=a.api_key), host=a.host, port=a.port, log_config=None, access_log=False,
                            lifespan="on", server_header=False, timeout_graceful_shutdown=int(math.ceil(a.graceful_timeout)),
                            http=head_timeout_protocol(a.header_timeout), h11_max_incomplete_event_size=MAX_HEADER_BYTES,
                            ssl_certfile=a.ssl_certfile, ssl_keyfile=a.ssl_keyfile)
    server = uvicorn.Server(config)
    service.on_fatal = lambda: setattr(server, "should_exit", True)

    # uvicorn handles SIGINT/SIGTERM itself (graceful shutdown), then re-raises the signal once it is done;
    # these handlers receive that re-raise, so a graceful stop exits 0 instead of dying by the signal.
    received: list[int] = []
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda s, _f: received.append(s))
    server.run()
    if service.state == "failed":
        print("emrrg-serve: error: the bundle could not be loaded (see the log above)", file=sys.stderr)
        raise SystemExit(2)
    if not server.started:
        raise SystemExit(1)
    if received:
        log.info("exited after %s", signal.Signals(received[0]).name)


if __name__ == "__main__":  # pragma: no cover
    serve_main()
