"""An independent HTTP/3 client (aioquic) for the ingress tests: requests on one connection, in order,
with bodies made from a fixed byte pattern, and answers summarised (status, headers, length, SHA-256).

usage:
  h3_client.py HOST PORT CAFILE SNI REQUESTS_JSON
      REQUESTS_JSON: a list of {"method", "authority", "path", "body_size", "malformed",
      "big_header" (bytes of extra header fields)}; prints one
      JSON list, an entry per request: {"status", "headers", "length", "sha256", "sent_sha256",
      "body" (first 4 KiB as text), "reset" (the stream's reset code, if reset), "error"}
  h3_client.py HOST PORT CAFILE SNI --vanish AUTHORITY PATH
      sends a POST head and 64 KiB of a 1 MiB body, prints "sent", and waits to be killed
"""

import asyncio
import hashlib
import json
import ssl
import sys

from aioquic.asyncio import connect
from aioquic.asyncio.protocol import QuicConnectionProtocol
from aioquic.h3.connection import H3_ALPN, H3Connection
from aioquic.h3.events import DataReceived, HeadersReceived
from aioquic.quic.configuration import QuicConfiguration
from aioquic.quic.events import StreamReset

BLOCK = bytes(range(251))


def pattern(n):
    """n bytes of 0, 1, ..., 250, 0, 1, ... (the tests' apps make the same)."""
    return (BLOCK * (n // len(BLOCK) + 1))[:n]


class Client(QuicConnectionProtocol):
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.h3 = H3Connection(self._quic)
        self.pending = {}

    def quic_event_received(self, event):
        if isinstance(event, StreamReset) and event.stream_id in self.pending:
            self.finish(event.stream_id, reset=event.error_code)
            return
        for e in self.h3.handle_event(event):
            r = self.pending.get(getattr(e, "stream_id", None))
            if r is None:
                continue
            if isinstance(e, HeadersReceived):
                fields = {k.decode(): v.decode() for k, v in e.headers}
                if r["status"] is None:
                    r["status"] = int(fields.pop(":status", "0"))
                    r["headers"] = fields
                else:
                    r["trailers"] = fields
            elif isinstance(e, DataReceived):
                r["_hash"].update(e.data)
                r["length"] += len(e.data)
                if len(r["_body"]) < 4096:
                    r["_body"] += e.data[: 4096 - len(r["_body"])]
            if getattr(e, "stream_ended", False):
                self.finish(e.stream_id)

    def finish(self, stream_id, reset=None):
        r = self.pending.pop(stream_id)
        r["reset"] = reset
        r["sha256"] = r.pop("_hash").hexdigest()
        r["body"] = r.pop("_body").decode("utf-8", "replace")
        fut = r.pop("_done")
        if not fut.done():
            fut.set_result(r)

    def start(self, method, authority, path, body, malformed=False, end=True, extra=()):
        sid = self._quic.get_next_available_stream_id()
        head = [(b":method", method.encode()), (b":scheme", b"https"), (b":authority", authority.encode())]
        if not malformed:
            head.append((b":path", path.encode()))
        if body:
            head.append((b"content-length", str(len(body) if end else 1 << 20).encode()))
        head.append((b"x-quicmesh-client-id", b"spiffe://mesh.local/ns/default/sa/forged"))
        head.extend(extra)
        done = asyncio.get_running_loop().create_future()
        self.pending[sid] = {
            "status": None, "headers": {}, "length": 0, "_hash": hashlib.sha256(), "_body": b"",
            "_done": done, "sent_sha256": hashlib.sha256(body).hexdigest(),
        }
        self.h3.send_headers(sid, head, end_stream=not body and end)
        if body:
            self.h3.send_data(sid, body, end_stream=end)
        self.transmit()
        return done


def configuration(cafile, sni):
    cfg = QuicConfiguration(is_client=True, alpn_protocols=H3_ALPN, server_name=sni)
    cfg.verify_mode = ssl.CERT_REQUIRED
    cfg.load_verify_locations(cafile)
    cfg.idle_timeout = 20.0
    return cfg


async def run(host, port, cafile, sni, requests):
    out = []
    try:
        await exchange_all(host, port, cafile, sni, requests, out)
    except Exception as e:  # noqa: BLE001 - a refused connection is reported to the test
        out.append({"status": None, "error": f"{type(e).__name__}: {e}"})
    return out


async def exchange_all(host, port, cafile, sni, requests, out):
    async with connect(host, port, configuration=configuration(cafile, sni), create_protocol=Client) as c:
        for q in requests:
            body = pattern(q.get("body_size", 0))
            # In fields of 4,000 bytes (the encoder refuses longer values).
            big = q.get("big_header", 0)
            extra = [(b"x-big-%d" % i, b"a" * 4000) for i in range((big + 3999) // 4000)]
            done = c.start(q.get("method", "GET"), q["authority"], q.get("path", "/"), body,
                           malformed=q.get("malformed", False), extra=extra)
            try:
                out.append(await asyncio.wait_for(done, timeout=30))
            except Exception as e:  # noqa: BLE001 - reported to the test
                out.append({"status": None, "error": f"{type(e).__name__}: {e}"})


async def vanish(host, port, cafile, sni, authority, path):
    async with connect(host, port, configuration=configuration(cafile, sni), create_protocol=Client) as c:
        c.start("POST", authority, path, pattern(64 * 1024), end=False)
        await c.ping()  # answered after the request's packets went out
        print("sent", flush=True)
        await asyncio.sleep(60)


def main():
    host, port, cafile, sni = sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4]
    if sys.argv[5] == "--vanish":
        asyncio.run(vanish(host, port, cafile, sni, sys.argv[6], sys.argv[7]))
        return
    result = asyncio.run(asyncio.wait_for(run(host, port, cafile, sni, json.loads(sys.argv[5])), 90))
    print(json.dumps(result))


if __name__ == "__main__":
    main()
