"""Expose only the SuperLink's Fleet API to the network: a small TLS reverse proxy.

flwr 1.42 serves the Fleet API (SuperNodes), the Control API (`flwr run`, `flwr ls`, `flwr stop`,
`flwr supernode register`, ...) and the Runtime API (its own ServerApp) on ONE port, and the open-source
SuperLink authenticates no Control API caller: account authentication exists only as the Flower
Enterprise OIDC plugin (`FLWR_OIDC_ENABLED=1` exits with "unavailable in this Flower distribution"
without `flwr.ee`), and the SuperLink's TLS does not ask for client certificates. Whoever reaches the
port can therefore register node keys and submit apps that every SuperNode will install and run.
A firewall cannot separate the APIs (same port, inside TLS); their paths can (`/v1/fleet/*`,
`/v1/control/*`, `/v1/runtime/*`). So: keep the SuperLink on 127.0.0.1 (its default `--host`) and put
this gateway on the network interface. It terminates TLS with the SuperLink's certificate, forwards
exactly the Fleet endpoints (POST /v1/fleet/<name>) to the SuperLink over TLS, and answers everything
else with 403. Operators reach the Control API on the server itself or through an SSH tunnel
(`ssh -N -L 8000:127.0.0.1:8000 <server>`; the certificate is valid for 127.0.0.1).

    python deploy/fleet_gateway.py --listen 0.0.0.0:9443 --superlink 127.0.0.1:8000 \\
        --ssl-certfile certificates/server.pem --ssl-keyfile certificates/server.key \\
        --root-certificates certificates/ca.crt
    flower-supernode --superlink <server>:9443 --root-certificates ca.crt ...   # on each device

When the SuperLink is down the gateway answers 502, which SuperNodes retry like a refused connection.

Limits, because nothing behind the gateway checks a body before buffering it (a 300 MB POST took it to
630 MB). A request body over `--max-body-mib` (default 64) is answered 413 and the connection closed: by its
Content-Length before anything is read, or, for a chunked or lying body, as soon as the bytes read pass the
cap. Why 64 MiB: a SuperNode uploads a message as separate objects (`/v1/fleet/push-object`, one request
each) and flwr slices every array into chunks of at most 5 MiB (FLWR_PRIVATE_MAX_ARRAY_CHUNK_SIZE), so
without SecAgg+ no request exceeds ~5 MiB whatever the model; with `secure-aggregation=true` the masked
vector is ONE object of 4 bytes per parameter sent, which 64 MiB allows up to ~16 M parameters (every
TaskEdge/LoRA update; raise it for SecAgg+ with a dense full-model method: ResNet-50 needs ~100 MiB,
ViT-B/16 ~330 MiB). 413 is final for a SuperNode (it retries only 502/503/504).
More than `--max-in-flight` (default 32) forwarded requests at once are answered 503, which SuperNodes retry
with backoff; bodies are read only inside that limit, so buffered bodies stay under max-in-flight x
max-body (2 GiB at the defaults; ~5 MiB each in normal traffic). uvicorn's `limit_concurrency` answers 503
to requests on connections beyond `--max-connections` (default 512) open ones, idle keep-alive connections
included (each SuperNode holds one or a few); those 503s appear only as uvicorn's "Exceeded concurrency
limit." warning, without the address. The SuperLink sees every node as 127.0.0.1, so the gateway logs each
request it answers (client ip:port, method, path, status, bytes in and out; logger `fleet_gateway`) and
forwards the address as `X-Forwarded-For`, replacing any X-Forwarded-* the client sent (the SuperLink's
uvicorn trusts those headers from 127.0.0.1, so its access log shows the node's address too).
Uses only packages flwr itself depends on (starlette, httpx, uvicorn).
"""
from __future__ import annotations

import argparse
import asyncio
import logging
import re
from contextlib import asynccontextmanager

import httpx
import uvicorn
from starlette.applications import Starlette
from starlette.requests import ClientDisconnect, Request
from starlette.responses import PlainTextResponse, Response
from starlette.routing import Route

log = logging.getLogger("fleet_gateway")
MAX_BODY_MIB = 64
MAX_IN_FLIGHT = 32
MAX_CONNECTIONS = 512
FLEET_PATH = re.compile(r"/v1/fleet/[a-z][a-z-]*")  # exact endpoint names: no dots, slashes or escapes
HOP_BY_HOP = {"connection", "keep-alive", "proxy-authenticate", "proxy-authorization", "te", "trailer",
              "trailers", "transfer-encoding", "upgrade", "host", "content-length", "content-encoding"}


def dropped(name: str) -> bool:
    """Request headers not forwarded: hop-by-hop ones, and the client's own proxy claims (X-Forwarded-*,
    Forwarded, X-Real-IP), which the SuperLink's uvicorn would believe from 127.0.0.1; the gateway sets XFF."""
    name = name.lower()
    return name in HOP_BY_HOP or name.startswith("x-forwarded-") or name in ("forwarded", "x-real-ip")


class BodyTooLarge(Exception):
    def __init__(self, read: int):
        super().__init__(read)
        self.read = read  # bytes read before refusing (0 when refused by Content-Length)


async def read_capped(request: Request, cap: int) -> tuple[list[bytes], int]:
    """The request body as chunks and their total, refused (BodyTooLarge) by its Content-Length before
    reading, or while streaming as soon as more than `cap` bytes have arrived: never more than cap + one
    chunk in memory, and no joined copy (the chunks go upstream as they are)."""
    declared = request.headers.get("content-length")
    if declared is not None and (not declared.isdigit() or int(declared) > cap):
        raise BodyTooLarge(0)
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > cap:
            raise BodyTooLarge(size)
        chunks.append(chunk)
    return chunks, size


def client_address(request: Request) -> tuple[str, str]:
    """(host, "host:port") of the TCP peer; IPv6 hosts bracketed so the port stays readable."""
    if request.client is None:
        return "unknown", "?"
    host, port = request.client.host, request.client.port
    return host, f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def create_app(superlink: str, root_certificates: str | None = None, insecure: bool = False,
               timeout: float = 300.0, max_body_bytes: int = MAX_BODY_MIB * 2**20,
               max_in_flight: int = MAX_IN_FLIGHT, upstream_transport: httpx.AsyncBaseTransport | None = None
               ) -> Starlette:
    """The gateway app: POST /v1/fleet/<name> goes to `superlink` (host:port), anything else is refused.
    `upstream_transport`: httpx's transport to the SuperLink (tests give a mock)."""
    scheme = "http" if insecure else "https"
    verify: bool | str = False if insecure else (root_certificates or True)
    client = httpx.AsyncClient(base_url=f"{scheme}://{superlink}", verify=verify, timeout=timeout,
                               transport=upstream_transport)
    in_flight = asyncio.Semaphore(max_in_flight)

    async def forward(request: Request) -> Response:
        path = request.url.path
        host, who = client_address(request)
        received = 0

        def done(response: Response) -> Response:
            log.info("%s %s %s -> %d (%d B in, %d B out)", who, request.method, path, response.status_code,
                     received, len(response.body or b""))
            return response

        if request.method != "POST" or not FLEET_PATH.fullmatch(path) or request.url.query:
            return done(PlainTextResponse("403: this address serves only the Flower Fleet API\n", status_code=403))
        if in_flight.locked():
            return done(PlainTextResponse(f"503: more than {max_in_flight} requests in flight\n", status_code=503))
        async with in_flight:
            try:
                chunks, received = await read_capped(request, max_body_bytes)
            except BodyTooLarge as exc:  # close: the rest of the body is not worth reading and discarding
                received = exc.read
                return done(PlainTextResponse(f"413: request body over {max_body_bytes} bytes\n", status_code=413,
                                              headers={"connection": "close"}))
            except ClientDisconnect:
                return done(Response(status_code=499))  # nginx's "client closed request": logged, never sent
            headers = [(k, v) for k, v in request.headers.items() if not dropped(k)]
            headers += [("content-length", str(received)), ("x-forwarded-for", host)]

            async def body():
                chunks.reverse()
                while chunks:
                    yield chunks.pop()  # each chunk is freed once sent

            try:
                upstream = await client.post(path, content=body(), headers=headers)
            except httpx.TransportError as exc:
                return done(PlainTextResponse(f"502: SuperLink unreachable ({type(exc).__name__})\n", status_code=502))
            return done(Response(upstream.content, status_code=upstream.status_code,
                                 headers={k: v for k, v in upstream.headers.items() if k.lower() not in HOP_BY_HOP}))

    @asynccontextmanager
    async def lifespan(_app):
        yield
        await client.aclose()

    methods = ["GET", "POST", "PUT", "PATCH", "DELETE", "HEAD", "OPTIONS"]
    return Starlette(routes=[Route("/{path:path}", forward, methods=methods)], lifespan=lifespan)


def make_server(app: Starlette, host: str, port: int, max_connections: int = MAX_CONNECTIONS,
                ssl_certfile: str | None = None, ssl_keyfile: str | None = None) -> uvicorn.Server:
    """uvicorn serving `app`, answering 503 to requests on connections beyond `max_connections` open ones.
    uvicorn counts the asking connection itself (`len(connections) >= limit_concurrency`), hence the + 1;
    no WebSocket support (the Fleet API is plain POSTs)."""
    return uvicorn.Server(uvicorn.Config(app, host=host, port=port, ssl_certfile=ssl_certfile,
                                         ssl_keyfile=ssl_keyfile, log_level="warning", access_log=False, ws="none",
                                         limit_concurrency=max_connections + 1))


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--listen", default="0.0.0.0:9443", help="host:port to serve on (default 0.0.0.0:9443)")
    p.add_argument("--superlink", default="127.0.0.1:8000", help="the SuperLink's host:port (default 127.0.0.1:8000)")
    p.add_argument("--ssl-certfile", help="certificate served to SuperNodes (the SuperLink's server.pem)")
    p.add_argument("--ssl-keyfile", help="its private key (server.key)")
    p.add_argument("--root-certificates", help="CA that signed the SuperLink's certificate (ca.crt)")
    p.add_argument("--insecure", action="store_true", help="plain HTTP on both sides (loopback trials only)")
    p.add_argument("--max-body-mib", type=float, default=MAX_BODY_MIB,
                   help=f"largest request body in MiB; bigger ones get 413 (default {MAX_BODY_MIB})")
    p.add_argument("--max-in-flight", type=int, default=MAX_IN_FLIGHT,
                   help=f"forwarded requests at once; more get 503 (default {MAX_IN_FLIGHT})")
    p.add_argument("--max-connections", type=int, default=MAX_CONNECTIONS,
                   help=f"open connections, idle keep-alive ones included; requests on more get 503 "
                        f"(default {MAX_CONNECTIONS})")
    a = p.parse_args(argv)
    if not a.max_body_mib > 0 or a.max_in_flight < 1 or a.max_connections < 1:
        p.error("--max-body-mib must be > 0, --max-in-flight and --max-connections >= 1")
    if not a.insecure and not (a.ssl_certfile and a.ssl_keyfile):
        p.error("--ssl-certfile and --ssl-keyfile are required (or --insecure for a loopback trial)")
    host, _, port = a.listen.rpartition(":")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)  # its own INFO line per upstream call: one line each
    app = create_app(a.superlink, a.root_certificates, a.insecure, max_body_bytes=int(a.max_body_mib * 2**20),
                     max_in_flight=a.max_in_flight)
    make_server(app, host.strip("[]") or "0.0.0.0", int(port), a.max_connections,
                ssl_certfile=None if a.insecure else a.ssl_certfile,
                ssl_keyfile=None if a.insecure else a.ssl_keyfile).run()


if __name__ == "__main__":
    main()
