"""deploy/fleet_gateway.py's limits, on the ASGI app with a mock SuperLink: body cap (by Content-Length and
while streaming), requests in flight, the client address logged and forwarded."""
import asyncio
import importlib.util
import logging
from pathlib import Path

import httpx

spec = importlib.util.spec_from_file_location("fleet_gateway", Path(__file__).resolve().parents[1] / "deploy" /
                                              "fleet_gateway.py")
gw = importlib.util.module_from_spec(spec)
spec.loader.exec_module(gw)

PATH = "/v1/fleet/push-messages"


def _gateway(handler, **kw):
    upstream = httpx.MockTransport(handler)
    app = gw.create_app("superlink:8000", insecure=True, upstream_transport=upstream, **kw)
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=app, client=("10.1.2.3", 5555)),
                             base_url="http://gateway")


def test_body_over_the_cap_is_refused_by_length_and_while_streaming():
    seen = []

    def upstream(request):
        seen.append(len(request.content))
        return httpx.Response(200, content=b"ok")

    async def go():
        async with _gateway(upstream, max_body_bytes=1000) as c:
            small = await c.post(PATH, content=b"x" * 1000)
            big = await c.post(PATH, content=b"x" * 1001)  # refused by its Content-Length

            async def chunks():  # no Content-Length: refused once the bytes read pass the cap
                for _ in range(10):
                    yield b"y" * 400

            streamed = await c.post(PATH, content=chunks())
            lying = await c.post(PATH, content=b"z" * 5000, headers={"content-length": "10"})
            return small, big, streamed, lying

    small, big, streamed, lying = asyncio.run(go())
    assert small.status_code == 200 and seen[0] == 1000
    assert big.status_code == streamed.status_code == 413 and "over 1000 bytes" in big.text
    assert lying.status_code in (413, 400) and seen == [1000]  # nothing over the cap reached the SuperLink


def test_requests_beyond_the_limit_get_503_and_are_served_again_after():
    release = asyncio.Event()
    entered = []

    async def upstream(request):
        entered.append(1)
        await release.wait()
        return httpx.Response(200, content=b"ok")

    async def go():
        async with _gateway(upstream, max_connections=2) as c:
            held = [asyncio.create_task(c.post(PATH, content=b"a")) for _ in range(2)]
            while len(entered) < 2:
                await asyncio.sleep(0)
            over = await c.post(PATH, content=b"b")
            release.set()
            done = await asyncio.gather(*held)
            after = await c.post(PATH, content=b"c")
            return over, done, after

    over, done, after = asyncio.run(go())
    assert over.status_code == 503 and "more than 2 requests in flight" in over.text
    assert [r.status_code for r in done] == [200, 200] and after.status_code == 200


def test_every_request_is_logged_with_the_client_address_and_forwarded_for(caplog):
    forwarded = []

    def upstream(request):
        forwarded.append(request.headers.get("x-forwarded-for"))
        return httpx.Response(200, content=b"ok")

    async def go():
        async with _gateway(upstream) as c:
            await c.post(PATH, content=b"hello")
            await c.get("/v1/control/list-runs")

    with caplog.at_level(logging.INFO, logger="fleet_gateway"):
        asyncio.run(go())
    lines = [r.getMessage() for r in caplog.records if r.name == "fleet_gateway"]
    assert lines[0] == f"10.1.2.3:5555 POST {PATH} -> 200 (5 B in, 2 B out)"
    assert lines[1].startswith("10.1.2.3:5555 GET /v1/control/list-runs -> 403")
    assert forwarded == ["10.1.2.3"]
