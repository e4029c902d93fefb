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
Limits, because nothing behind it checks a body before buffering it (a 300 MB POST took the gateway to
630 MB): a request body over `--max-body-mib` (default 64 MiB: a TaskEdge upload of the embedded default
is ~20 kB, a full ViT-B/16 state dict 344 MB — raise it for `fedavg-full` on large models) is answered 413,
by its Content-Length before anything is read or, for a chunked or lying body, as soon as the bytes read pass
the cap; more than `--max-connections` requests in flight are answered 503 (and uvicorn's own
`limit_concurrency` caps connections). The SuperLink sees every node as 127.0.0.1, so the gateway logs each
request's client address, method, path, status and bytes (logger `fleet_gateway`) and forwards the address
as `X-Forwarded-For`. Uses only packages flwr itself depends on (starlette, httpx, uvicorn).
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
from starlette.requests import Request
from starlette.responses import PlainTextResponse, Response
from starlette.routing import Route

log = logging.getLogger("fleet_gateway")
MAX_BODY_MIB = 64
MAX_CONNECTIONS = 64
FLEET_PATH = re.compile(r"/v1/fleet/[a-z][a-z-]*")  # exact endpoint names: no dots, slashes or escapes
HOP_BY_HOP = {"connection", "keep-alive", "proxy-authenticate", "proxy-authorization", "te", "trailer",
              "trailers", "transfer-encoding", "upgrade", "host", "content-length", "content-encoding"}


class BodyTooLarge(Exception):
    pass


async def read_capped(request: Request, cap: int) -> bytes:
    """The request body, refused (BodyTooLarge) by its Content-Length before reading, or while streaming as
    soon as more than `cap` bytes have arrived: never more than cap + one chunk in memory."""
    declared = request.headers.get("content-length")
    if declared is not None and (not declared.isdigit() or int(declared) > cap):
        raise BodyTooLarge(declared)
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > cap:
            raise BodyTooLarge(size)
        chunks.append(chunk)
    return b"".join(chunks)


def create_app(superlink: str, root_certificates: str | None = None, insecure: bool = False,
               timeout: float = 300.0, max_body_bytes: int = MAX_BODY_MIB * 2**20,
               max_connections: int = MAX_CONNECTIONS, upstream_transport: httpx.AsyncBaseTransport | None = None
               ) -> Starlette:
    """The gateway app: POST /v1/fleet/<name> goes to `superlink` (host:port), anything else is refused.
    `upstream_transport`: httpx's transport to the SuperLink (tests give a mock)."""
    scheme = "http" if insecure else "https"
    verify: bool | str = False if insecure else (root_certificates or True)
    client = httpx.AsyncClient(base_url=f"{scheme}://{superlink}", verify=verify, timeout=timeout,
                               transport=upstream_transport)
    in_flight = asyncio.Semaphore(max_connections)

    async def forward(request: Request) -> Response:
        path, who = request.url.path, f"{request.client.host}:{request.client.port}" if request.client else "?"
        received = 0

        def done(response: Response) -> Response:
            log.info("%s %s %s -> %d (%d B in, %d B out)", who, request.method, path, response.status_code,
                     received, len(response.body or b""))
            return response

        if request.method != "POST" or not FLEET_PATH.fullmatch(path) or request.url.query:
            return done(PlainTextResponse("403: this address serves only the Flower Fleet API\n", status_code=403))
        if in_flight.locked():
            return done(PlainTextResponse(f"503: more than {max_connections} requests in flight\n", status_code=503))
        async with in_flight:
            try:
                body = await read_capped(request, max_body_bytes)
            except BodyTooLarge:
                return done(PlainTextResponse(f"413: request body over {max_body_bytes} bytes\n", status_code=413))
            received = len(body)
            headers = [(k, v) for k, v in request.headers.items() if k.lower() not in HOP_BY_HOP]
            headers.append(("x-forwarded-for", request.client.host if request.client else "unknown"))
            try:
                upstream = await client.post(path, content=body, headers=headers)
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
    p.add_argument("--max-connections", type=int, default=MAX_CONNECTIONS,
                   help=f"requests in flight (and uvicorn connections); more get 503 (default {MAX_CONNECTIONS})")
    a = p.parse_args(argv)
    if not a.max_body_mib > 0 or a.max_connections < 1:
        p.error("--max-body-mib must be > 0 and --max-connections >= 1")
    if not a.insecure and not (a.ssl_certfile and a.ssl_keyfile):
        p.error("--ssl-certfile and --ssl-keyfile are required (or --insecure for a loopback trial)")
    host, _, port = a.listen.rpartition(":")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    app = create_app(a.superlink, a.root_certificates, a.insecure, max_body_bytes=int(a.max_body_mib * 2**20),
                     max_connections=a.max_connections)
    uvicorn.run(app, host=host.strip("[]") or "0.0.0.0", port=int(port),
                ssl_certfile=None if a.insecure else a.ssl_certfile, ssl_keyfile=None if a.insecure else a.ssl_keyfile,
                log_level="warning", access_log=False, limit_concurrency=a.max_connections)


if __name__ == "__main__":
    main()
