"""The shared HTTP client against real servers on 127.0.0.1 that misbehave on purpose: retries
on 503, a deadline against a trickling server, no redirects, no proxy for loopback, the token,
the response size limit."""

from __future__ import annotations

import time

import pytest

from reinforcepp.remote import (
    RemoteClient,
    RemoteError,
    RemoteRewardFunction,
    RemoteSettings,
    read_token,
)
from reinforcepp.remote.client import is_loopback
from tests.remote.servers import ScriptedServer, free_port, send_json

FAST = {"backoff": 0.01, "timeout": 10.0}


@pytest.fixture
def scripted(request):
    servers: list[ScriptedServer] = []

    def make(respond):
        servers.append(ScriptedServer(respond))
        return servers[-1]

    yield make
    for s in servers:
        s.stop()


def test_503_then_200_is_retried(scripted):
    def respond(h, n):
        if n < 2:
            send_json(h, 503, {"error": "busy"})
        else:
            send_json(h, 200, {"rewards": [0.5, 1.0]})

    server = scripted(respond)
    fn = RemoteRewardFunction(server.url + "/score", RemoteSettings(retries=3, **FAST))
    assert fn(["a", "b"], ["x", "y"]) == [0.5, 1.0]
    assert len(server.requests) == 3 and all(r[2]["completions"] == ["x", "y"] for r in server.requests)


def test_503_forever_gives_up_after_the_retries(scripted):
    server = scripted(lambda h, n: send_json(h, 503, {"error": "overloaded"}))
    client = RemoteClient(server.url, RemoteSettings(retries=2, **FAST))
    with pytest.raises(RemoteError, match=r"answered HTTP 503 after 3 attempts: .*overloaded"):
        client.post("/x", {})
    assert len(server.requests) == 3


def test_other_errors_are_not_retried(scripted):
    server = scripted(lambda h, n: send_json(h, 500, {"error": "bug in the server"}))
    client = RemoteClient(server.url, RemoteSettings(retries=3, **FAST))
    with pytest.raises(RemoteError, match=r"/x answered HTTP 500: .*bug in the server"):
        client.post("/x", {})
    assert len(server.requests) == 1


def test_trickling_server_hits_the_total_deadline(scripted):
    def trickle(h, n):  # headers, then one byte every 0.2 s for 60 s
        h.send_response(200)
        h.send_header("Content-Type", "application/json")
        h.send_header("Content-Length", "300")
        h.end_headers()
        try:
            for _ in range(300):
                h.wfile.write(b" ")
                h.wfile.flush()
                time.sleep(0.2)
        except OSError:
            pass

    server = scripted(trickle)
    client = RemoteClient(server.url, RemoteSettings(timeout=1.0, retries=3, backoff=0.01))
    start = time.monotonic()
    with pytest.raises(RemoteError, match=r"no complete answer within remote_timeout=1s"):
        client.post("/x", {})
    # A per-read timeout would wait for the whole 60 s answer; the deadline ends the call near 1 s
    # (the bound is loose on purpose: the machine may be loaded).
    assert time.monotonic() - start < 30
    assert len(server.requests) == 1  # a deadline is not retried


def test_redirect_is_an_error_not_followed(scripted):
    def respond(h, n):
        if h.path == "/rewards":
            h.send_response(302)
            h.send_header("Location", "/elsewhere")
            h.send_header("Content-Length", "0")
            h.end_headers()
        else:
            send_json(h, 200, [0.25])

    server = scripted(respond)
    fn = RemoteRewardFunction(server.url + "/rewards", RemoteSettings(**FAST))
    with pytest.raises(RemoteError, match=r"HTTP 302 redirecting to /elsewhere; redirects are not followed"):
        fn(["p"], ["c"])
    assert [path for _, path, _ in server.requests] == ["/rewards"]


def test_response_size_limit(scripted):
    big = [0.0] * 200_000  # ~1 MB of JSON
    server = scripted(lambda h, n: send_json(h, 200, {"rewards": big}))
    client = RemoteClient(server.url, RemoteSettings(max_response_bytes=100_000, **FAST))
    with pytest.raises(RemoteError, match=r"declares \d+ bytes > the limit of 100000 bytes"):
        client.post("/x", {})

    def chunked(h, n):  # no Content-Length: the limit is enforced while reading
        h.send_response(200)
        h.send_header("Transfer-Encoding", "chunked")
        h.end_headers()
        for _ in range(50):
            piece = b"[" + b"0," * 5000 + b"0]"
            h.wfile.write(b"%x\r\n%s\r\n" % (len(piece), piece))
        h.wfile.write(b"0\r\n\r\n")

    server = scripted(chunked)
    client = RemoteClient(server.url, RemoteSettings(max_response_bytes=100_000, **FAST))
    with pytest.raises(RemoteError, match=r"the answer exceeds the limit of 100000 bytes"):
        client.post("/x", {})


def test_no_proxy_for_loopback(scripted, monkeypatch):
    dead = f"http://127.0.0.1:{free_port()}"  # a proxy that would refuse every connection
    for var in ("http_proxy", "HTTP_PROXY", "all_proxy", "ALL_PROXY"):
        monkeypatch.setenv(var, dead)
    monkeypatch.delenv("no_proxy", raising=False)
    monkeypatch.delenv("NO_PROXY", raising=False)
    server = scripted(lambda h, n: send_json(h, 200, {"ok": True}))
    assert RemoteClient(server.url, RemoteSettings(**FAST)).get("/info") == {"ok": True}
    assert is_loopback("127.0.0.1") and is_loopback("::1") and is_loopback("localhost") and not is_loopback("10.0.0.1")


def test_unreachable_is_retried_then_one_line(monkeypatch):
    url = f"http://127.0.0.1:{free_port()}"
    client = RemoteClient(url, RemoteSettings(retries=2, **FAST))
    message = rf"^remote service {url}/x could not be reached after 3 attempt\(s\): "
    with pytest.raises(RemoteError, match=message) as info:
        client.post("/x", {})
    assert "\n" not in str(info.value)


def test_token_is_sent_and_read_from_file_or_environment(scripted, tmp_path, monkeypatch):
    seen = []

    def respond(h, n):
        seen.append(h.headers.get("Authorization"))
        send_json(h, 200, {})

    server = scripted(respond)
    monkeypatch.delenv("REINFORCEPP_REMOTE_TOKEN", raising=False)
    assert read_token(None) is None
    monkeypatch.setenv("REINFORCEPP_REMOTE_TOKEN", "from-env")
    (tmp_path / "tok").write_text("from-file\n")
    assert read_token(None) == "from-env" and read_token(str(tmp_path / "tok")) == "from-file"
    with pytest.raises(RemoteError, match="remote_token_file .* cannot be read"):
        read_token(str(tmp_path / "missing"))
    RemoteClient(server.url, RemoteSettings(token=read_token(str(tmp_path / "tok")), **FAST)).get("/info")
    RemoteClient(server.url, RemoteSettings(**FAST)).get("/info")
    assert seen == ["Bearer from-file", None]
    assert "from-file" not in repr(RemoteSettings(token="from-file"))


def test_concurrent_requests_keep_their_order(scripted):
    def respond(h, n):
        time.sleep(0.05 * (n % 3))  # answers arrive out of order
        send_json(h, 200, {"rewards": [len(c) for c in h.body["completions"]]})

    server = scripted(respond)
    fn = RemoteRewardFunction(server.url, RemoteSettings(concurrency=4, **FAST), batch_size=2)
    completions = ["a" * i for i in range(9)]
    assert fn(["p"] * 9, completions) == list(range(9))
    assert len(server.requests) == 5
