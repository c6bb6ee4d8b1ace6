"""Real HTTP servers on 127.0.0.1 for the remote tests: `reinforcepp serve` in a subprocess, the
same FastAPI apps on uvicorn in a thread, and small stdlib servers that misbehave on purpose."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

from reinforcepp.remote.client import wait_until_up

ROOT = Path(__file__).resolve().parents[2]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def kill_group(proc: subprocess.Popen) -> None:
    """SIGKILL the process group that ``proc`` leads (started with ``start_new_session=True``), then reap it."""
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass  # the group is gone already
    proc.wait(timeout=30)


class ServeProcess:
    """``python -m reinforcepp.cli serve ARGS`` in a subprocess; ``url`` from its first line."""

    def __init__(self, *args: str, env: dict | None = None, timeout: float = 120.0) -> None:
        full_env = {**os.environ, "PYTHONPATH": str(ROOT), **(env or {})}
        # its own process group: kill() takes the children too (vLLM's engine core outlives a killed server)
        self.proc = subprocess.Popen([sys.executable, "-m", "reinforcepp.cli", "serve", *args, "--threads", "1"],
                                     stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=full_env, cwd=ROOT,
                                     start_new_session=True)
        deadline = time.monotonic() + timeout
        line = ""
        assert self.proc.stdout is not None
        while time.monotonic() < deadline:
            line = self.proc.stdout.readline()
            if line.startswith("reinforcepp serve:") or not line:
                break
        if " on http://" not in line:
            self.kill()
            raise RuntimeError(f"server did not start: {line!r} {self.proc.stderr.read() if self.proc.stderr else ''}")
        self.url = line.rsplit(" on ", 1)[1].strip()
        self.base = self.url.removesuffix("/rewards")
        wait_until_up(self.base)

    @property
    def port(self) -> int:
        return int(self.base.rsplit(":", 1)[1])

    def kill(self) -> None:
        kill_group(self.proc)
        for stream in (self.proc.stdout, self.proc.stderr):
            if stream is not None:
                stream.close()


class ThreadServer:
    """A FastAPI app served by uvicorn in a daemon thread on a free port."""

    def __init__(self, app: Any) -> None:
        import uvicorn

        from reinforcepp.serve.app import bind

        sock = bind("127.0.0.1", 0)
        self.url = f"http://127.0.0.1:{sock.getsockname()[1]}"
        self.server = uvicorn.Server(uvicorn.Config(app, log_level="warning", access_log=False, lifespan="on"))
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [sock]}, daemon=True)
        self.thread.start()
        wait_until_up(self.url)

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=10)


class _QuietServer(ThreadingHTTPServer):
    daemon_threads = True

    def handle_error(self, request: Any, client_address: Any) -> None:
        pass  # clients that hang up on purpose (deadline, size limit) are not errors here


class ScriptedServer:
    """A stdlib HTTP server whose handler is ``respond(handler, n)`` (``n``: 0-based request
    count; ``handler.body``: the decoded JSON body); it records every request's method, path and
    body."""

    def __init__(self, respond: Callable[[BaseHTTPRequestHandler, int], None]) -> None:
        self.requests: list[tuple[str, str, Any]] = []
        self.lock = threading.Lock()
        owner = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def _handle(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                raw = self.rfile.read(length) if length else b""
                try:
                    self.body = json.loads(raw) if raw else None
                except ValueError:
                    self.body = raw  # bytes (a weight chunk)
                with owner.lock:
                    owner.requests.append((self.command, self.path, self.body))
                    n = len(owner.requests) - 1
                respond(self, n)

            do_GET = do_POST = _handle

            def log_message(self, *args: Any) -> None:
                pass

        self.httpd = _QuietServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
        self.thread.start()

    def stop(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


def send_json(handler: BaseHTTPRequestHandler, status: int, payload: Any, headers: dict | None = None) -> None:
    body = json.dumps(payload).encode()
    handler.send_response(status)
    handler.send_header("Content-Type", "application/json")
    handler.send_header("Content-Length", str(len(body)))
    for k, v in (headers or {}).items():
        handler.send_header(k, v)
    handler.end_headers()
    handler.wfile.write(body)
