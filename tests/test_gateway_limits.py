"""deploy/fleet_gateway.py's limits, on the ASGI app with a mock SuperLink (httpx MockTransport) and, for what
only a real server shows (an early 413 on a socket, uvicorn's connection limit), on uvicorn on a free port:
body cap (by Content-Length before reading, and while streaming), requests in flight, open connections,
and every request logged with the client address, which is forwarded as the only X-Forwarded-For."""
import asyncio
import importlib.util
import logging
from pathlib import Path

import httpx
import pytest

spec = importlib.util.spec_from_file_location("fleet_gateway", Path(__file__).resolve().parents[1] / "deploy" /
                                              "fleet_gateway.py")
gw = importlib.util.module_from_spec(spec)
spec.loader.exec_module(gw)

PATH = "/v1/fleet/push-object"
CLIENT = ("10.1.2.3", 5555)


def _ok(request):
    return httpx.Response(200, content=b"ok")


def _gateway(handler, client=CLIENT, **kw):
    app = gw.create_app("superlink:8000", insecure=True, upstream_transport=httpx.MockTransport(handler), **kw)
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=app, client=client), base_url="http://gateway")


def _run(coro):
    """Run a test's coroutine; a broken limit fails it instead of hanging the suite."""
    return asyncio.run(asyncio.wait_for(coro, 10))


async def _until(condition, what: str):
    """Wait for a state change (not for time): checked every few ms, failing after 5 s."""
    for _ in range(1000):
        if condition():
            return
        await asyncio.sleep(0.005)
    raise AssertionError(f"never happened: {what}")


def _lines(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == "fleet_gateway"]


class Body:
    """A request body of `n` chunks of `size` bytes that records how many chunks the gateway pulled."""

    def __init__(self, n: int, size: int):
        self.n, self.size, self.pulled = n, size, 0

    async def __aiter__(self):
        for _ in range(self.n):
            self.pulled += 1
            yield b"x" * self.size


def test_content_length_over_the_cap_is_refused_before_reading(caplog):
    seen = []

    def upstream(request):
        seen.append((len(request.content), request.headers.get("content-length"),
                     request.headers.get("transfer-encoding")))
        return httpx.Response(200, content=b"ok")

    async def go():
        async with _gateway(upstream, max_body_bytes=1000) as c:
            at_cap, over = Body(5, 200), Body(10, 400)
            ok = await c.post(PATH, content=at_cap, headers={"content-length": "1000"})
            big = await c.post(PATH, content=over, headers={"content-length": "4000"})
            return ok, big, at_cap.pulled, over.pulled

    with caplog.at_level(logging.INFO, logger="fleet_gateway"):
        ok, big, pulled_ok, pulled_big = _run(go())
    assert ok.status_code == 200 and pulled_ok == 5
    assert seen == [(1000, "1000", None)]  # forwarded with its length, not re-chunked
    assert big.status_code == 413 and "over 1000 bytes" in big.text and big.headers["connection"] == "close"
    assert pulled_big == 0  # refused on the header alone: not one chunk read
    assert _lines(caplog)[1] == f"10.1.2.3:5555 POST {PATH} -> 413 (0 B in, {len(big.content)} B out)"


def test_streamed_body_is_refused_as_soon_as_it_passes_the_cap(caplog):
    seen = []

    def upstream(request):
        seen.append(request)
        return httpx.Response(200, content=b"ok")

    async def go():
        async with _gateway(upstream, max_body_bytes=1000) as c:
            chunked, lying = Body(10, 400), Body(10, 400)
            r1 = await c.post(PATH, content=chunked)  # no Content-Length: Transfer-Encoding chunked
            r2 = await c.post(PATH, content=lying, headers={"content-length": "10"})
            return r1, r2, chunked.pulled, lying.pulled

    with caplog.at_level(logging.INFO, logger="fleet_gateway"):
        r1, r2, pulled1, pulled2 = _run(go())
    assert r1.status_code == r2.status_code == 413
    assert pulled1 == pulled2 == 3  # 400, 800, 1200 > 1000: stopped there, 7 chunks never read
    assert seen == []  # nothing over the cap reached the SuperLink
    assert all("-> 413 (1200 B in" in line for line in _lines(caplog))


def test_requests_beyond_the_in_flight_limit_get_503_and_are_served_again_after(caplog):
    release = asyncio.Event()
    reached = []

    async def upstream(request):
        reached.append(request.content)
        if len(reached) <= 2:  # the first two hold the limit until released
            await release.wait()
        return httpx.Response(200, content=b"ok")

    async def go():
        async with _gateway(upstream, max_in_flight=2) as c:
            held = [asyncio.create_task(c.post(PATH, content=b"a")) for _ in range(2)]
            await _until(lambda: len(reached) == 2, "two requests at the SuperLink")
            over = await c.post(PATH, content=b"b")
            release.set()
            done = await asyncio.gather(*held)
            after = await c.post(PATH, content=b"c")
            return over, done, after

    with caplog.at_level(logging.INFO, logger="fleet_gateway"):
        over, done, after = _run(go())
    assert over.status_code == 503 and "more than 2 requests in flight" in over.text
    assert [r.status_code for r in done] == [200, 200] and after.status_code == 200
    assert reached == [b"a", b"a", b"c"]  # the refused one never reached the SuperLink
    assert f"10.1.2.3:5555 POST {PATH} -> 503 (0 B in, {len(over.content)} B out)" in _lines(caplog)


def test_every_request_is_logged_with_the_client_address_and_forwarded_as_the_only_xff(caplog):
    forwarded = []

    def upstream(request):
        forwarded.append({k: request.headers.get_list(k) for k in ("x-forwarded-for", "x-forwarded-proto",
                                                                   "forwarded", "x-real-ip")})
        return httpx.Response(200, content=b"ok")

    def down(request):
        raise httpx.ConnectError("connection refused", request=request)

    spoof = {"x-forwarded-for": "6.6.6.6", "x-forwarded-proto": "http", "forwarded": "for=6.6.6.6",
             "x-real-ip": "6.6.6.6"}

    async def go():
        async with _gateway(upstream) as c:
            await c.post(PATH, content=b"hello", headers=spoof)
            await c.get("/v1/control/list-runs")
        async with _gateway(upstream, client=("::1", 4444)) as c:
            await c.post(PATH, content=b"hi")
        async with _gateway(down) as c:
            return await c.post(PATH, content=b"hey")

    with caplog.at_level(logging.INFO, logger="fleet_gateway"):
        bad_gateway = _run(go())
    lines = _lines(caplog)
    assert lines[0] == f"10.1.2.3:5555 POST {PATH} -> 200 (5 B in, 2 B out)"
    assert lines[1].startswith("10.1.2.3:5555 GET /v1/control/list-runs -> 403 (0 B in, ")
    assert lines[2] == f"[::1]:4444 POST {PATH} -> 200 (2 B in, 2 B out)"
    assert bad_gateway.status_code == 502 and lines[3].startswith(f"10.1.2.3:5555 POST {PATH} -> 502 (3 B in, ")
    assert len(lines) == 4
    none = {"x-forwarded-proto": [], "forwarded": [], "x-real-ip": []}
    assert forwarded == [{"x-forwarded-for": ["10.1.2.3"], **none}, {"x-forwarded-for": ["::1"], **none}]


def test_client_gone_mid_body_is_logged_and_not_forwarded(caplog):
    seen = []
    app = gw.create_app("superlink:8000", insecure=True, upstream_transport=httpx.MockTransport(seen.append))
    messages = iter([{"type": "http.request", "body": b"abc", "more_body": True}, {"type": "http.disconnect"}])
    scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "POST", "scheme": "http",
             "path": PATH, "raw_path": PATH.encode(), "query_string": b"", "root_path": "",
             "headers": [(b"transfer-encoding", b"chunked")], "client": CLIENT, "server": ("gateway", 80)}

    async def receive():
        return next(messages)

    async def send(message):
        pass

    with caplog.at_level(logging.INFO, logger="fleet_gateway"):
        _run(app(scope, receive, send))
    assert _lines(caplog) == [f"10.1.2.3:5555 POST {PATH} -> 499 (0 B in, 0 B out)"] and seen == []


async def _request(port: int, head: bytes):
    """Open a connection, send `head`, read one response: (status, headers, reader, writer)."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(head)
    await writer.drain()
    status = int((await reader.readline()).split()[1])
    headers = {}
    while (line := await reader.readline()) not in (b"\r\n", b""):
        key, _, value = line.decode().partition(":")
        headers[key.strip().lower()] = value.strip()
    await reader.readexactly(int(headers.get("content-length", 0)))
    return status, headers, reader, writer


def _post(length: int, body: bytes = b"") -> bytes:
    return f"POST {PATH} HTTP/1.1\r\nHost: gateway\r\nContent-Length: {length}\r\n\r\n".encode() + body


def test_real_server_refuses_early_and_limits_open_connections(caplog):
    """uvicorn as `main` runs it: a 413 arrives while the 1 GB body is still unsent and the connection is
    closed; with --max-connections 1 a second connection gets uvicorn's 503 while the first (idle, kept
    alive) is open, and a new one is served once it has closed."""
    app = gw.create_app("superlink:8000", insecure=True, upstream_transport=httpx.MockTransport(_ok),
                        max_body_bytes=1000)
    server = gw.make_server(app, "127.0.0.1", 0, max_connections=1)

    async def go():
        serving = asyncio.create_task(server.serve())
        await _until(lambda: server.started or serving.done(), "uvicorn started")
        port = server.servers[0].sockets[0].getsockname()[1]
        try:
            status, headers, reader, writer = await _request(port, _post(10**9))
            assert (status, headers["connection"]) == (413, "close")
            assert await asyncio.wait_for(reader.read(), 5) == b""  # closed by the gateway, body never read
            writer.close()
            await _until(lambda: not server.server_state.connections, "the 413 connection gone")

            status_a, _, _, writer_a = await _request(port, _post(2, b"hi"))  # stays open (keep-alive)
            status_b, _, _, writer_b = await _request(port, _post(2, b"hi"))
            writer_a.close()
            writer_b.close()
            await _until(lambda: not server.server_state.connections, "both connections gone")
            status_c, _, _, writer_c = await _request(port, _post(2, b"hi"))
            writer_c.close()
            return status_a, status_b, status_c, writer_a.get_extra_info("sockname")[1]
        finally:  # force: a request still waiting for its body must not hold the shutdown
            server.should_exit = server.force_exit = True
            await serving

    with caplog.at_level(logging.INFO, logger="fleet_gateway"):
        status_a, status_b, status_c, port_a = _run(go())
    assert (status_a, status_b, status_c) == (200, 503, 200)
    lines = _lines(caplog)
    assert lines[0].startswith(f"127.0.0.1:") and "-> 413 (0 B in" in lines[0]
    assert lines[1] == f"127.0.0.1:{port_a} POST {PATH} -> 200 (2 B in, 2 B out)"  # the real peer address
    assert len(lines) == 3  # uvicorn's 503 never reaches the app


def test_cli_flags_reach_the_app_and_uvicorn(monkeypatch):
    """Defaults 64 MiB / 32 in flight / 512 connections; the flags reach create_app and make_server."""
    made = {}

    class Server:
        def run(self):
            made["ran"] = True

    def create_app(superlink, *args, **kw):
        made["app"] = kw
        return "app"

    def make_server(app, host, port, max_connections, **kw):
        made["server"] = (app, host, port, max_connections)
        return Server()

    monkeypatch.setattr(gw, "create_app", create_app)
    monkeypatch.setattr(gw, "make_server", make_server)
    monkeypatch.setattr(gw.logging, "basicConfig", lambda **kw: None)
    httpx_log = logging.getLogger("httpx")
    before = httpx_log.level
    try:
        gw.main(["--insecure", "--listen", "127.0.0.1:9000"])
        assert httpx_log.level == logging.WARNING  # no second (httpx) log line per forwarded request
    finally:
        httpx_log.setLevel(before)
    assert made == {"app": {"max_body_bytes": 64 * 2**20, "max_in_flight": 32},
                    "server": ("app", "127.0.0.1", 9000, 512), "ran": True}
    gw.main(["--insecure", "--listen", "[::1]:9001", "--max-body-mib", "0.5", "--max-in-flight", "3",
             "--max-connections", "7"])
    assert made["app"] == {"max_body_bytes": 2**19, "max_in_flight": 3} and made["server"][1:] == ("::1", 9001, 7)
    for bad in (["--max-body-mib", "0"], ["--max-in-flight", "0"], ["--max-connections", "0"]):
        with pytest.raises(SystemExit):
            gw.main(["--insecure", *bad])
