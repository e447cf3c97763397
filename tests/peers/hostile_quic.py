#!/usr/bin/env python3
"""Hostile QUIC peers for the memory-bound tests, independent of quinn (aioquic + raw UDP).

initials: sends COUNT client Initial packets in SECONDS from one UDP socket: the first flight of an
          aioquic client (its ClientHello), re-protected under a fresh destination connection ID for
          each packet, so each one is a new connection attempt for the server; it never answers: no Retry is followed, no handshake completes. Prints one JSON line with what was
          sent and what came back (Retry packets, other packets).
streams:  opens CONNECTIONS authenticated connections (client certificate and key given as files) and
          on each one opens STREAMS bidirectional streams that send one byte each and never a whole
          header; prints {"event":"opened",...} once every stream was sent, holds them for HOLD
          seconds, then closes the connections and prints a summary line.

Every loop is bounded in count and time; traffic goes only to the address given (the test's loopback).
"""

import argparse
import asyncio
import json
import os
import socket
import ssl
import sys
import time

from aioquic.asyncio import connect
from aioquic.quic.configuration import QuicConfiguration
from aioquic.buffer import Buffer
from aioquic.quic.connection import QuicConnection
from aioquic.quic.crypto import CryptoPair
from aioquic.quic.packet import QuicPacketType, pull_quic_header

ALPN = ["quicmesh/1"]
SNI = "peer.quicmesh.invalid"


def initial_template(addr) -> tuple:
    """The first flight of one aioquic client, decrypted: (version, DCID offset, DCID length,
    plain header, plain payload, packet number, rest of the datagram)."""
    cfg = QuicConfiguration(is_client=True, alpn_protocols=ALPN, server_name=SNI)
    cfg.verify_mode = ssl.CERT_NONE
    conn = QuicConnection(configuration=cfg)
    conn.connect(addr, now=time.time())
    datagram = conn.datagrams_to_send(now=time.time())[0][0]
    buf = Buffer(data=datagram)
    header = pull_quic_header(buf)
    if header.packet_type != QuicPacketType.INITIAL:
        raise SystemExit("unexpected first flight from aioquic")
    server = CryptoPair()
    server.setup_initial(header.destination_cid, is_client=False, version=header.version)
    packet = datagram[: header.packet_length]
    plain_header, payload, pn = server.decrypt_packet(packet, buf.tell(), 0)
    # What follows the Initial in the datagram (aioquic pads the datagram to 1200 bytes) is kept as is.
    tail = datagram[header.packet_length :]
    return header.version, 6, len(header.destination_cid), plain_header, payload, pn, tail


def initials(host: str, port: int, count: int, seconds: float) -> dict:
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 << 20)
    sock.setblocking(False)
    addr = (host, port)
    version, at, cid_len, plain_header, payload, pn, tail = initial_template(addr)
    start = time.monotonic()
    sent = 0
    sent_bytes = 0
    replies = {"retry": 0, "other": 0}

    def drain():
        while True:
            try:
                data = sock.recv(65536)
            except BlockingIOError:
                return
            # Long header, v1: type bits 0x30 = Retry.
            if data and data[0] & 0x80 and (data[0] & 0x30) == 0x30:
                replies["retry"] += 1
            else:
                replies["other"] += 1

    while sent < count:
        # Pace evenly over the window; never run past twice the window whatever the machine's speed.
        due = start + seconds * sent / count
        now = time.monotonic()
        if now - start > 2 * seconds:
            break
        if due > now:
            time.sleep(due - now)
        # The same ClientHello under a fresh destination connection ID: a new connection attempt for
        # the server, protected with the Initial keys of that ID (RFC 9001 section 5.2).
        dcid = os.urandom(cid_len)
        header = plain_header[:at] + dcid + plain_header[at + cid_len :]
        crypto = CryptoPair()
        crypto.setup_initial(dcid, is_client=True, version=version)
        data = crypto.encrypt_packet(header, payload, pn) + tail
        sock.sendto(data, addr)
        sent_bytes += len(data)
        sent += 1
        if sent % 64 == 0:
            drain()
    elapsed = time.monotonic() - start
    # Late replies to the last packets.
    deadline = time.monotonic() + 0.5
    while time.monotonic() < deadline:
        drain()
        time.sleep(0.02)
    return {
        "event": "done",
        "mode": "initials",
        "sent": sent,
        "bytes": sent_bytes,
        "seconds": round(elapsed, 3),
        "replies": replies,
    }


async def one_connection(host, port, cfg, streams, opened, hold_until):
    # Entered by hand: aioquic's own exit waits for the close without a bound.
    cm = connect(host, port, configuration=cfg, wait_connected=True)
    client = await asyncio.wait_for(cm.__aenter__(), timeout=10)
    try:
        quic = client._quic
        for _ in range(streams):
            sid = quic.get_next_available_stream_id()
            # One byte of the two-byte length prefix: the header never completes.
            quic.send_stream_data(sid, b"\x00", end_stream=False)
        client.transmit()
        opened.append(streams)
        while time.monotonic() < hold_until:
            await asyncio.sleep(0.05)
            client.transmit()
    finally:
        client.close()
        try:
            await asyncio.wait_for(client.wait_closed(), timeout=2)
        except asyncio.TimeoutError:
            pass
        client._transport.close()


async def streams_main(args) -> dict:
    cfg = QuicConfiguration(is_client=True, alpn_protocols=ALPN, server_name=SNI)
    cfg.verify_mode = ssl.CERT_NONE
    cfg.load_cert_chain(args.cert, args.key)
    cfg.idle_timeout = 60.0
    opened = []
    start = time.monotonic()
    hold_until = start + args.hold
    tasks = [
        asyncio.create_task(
            one_connection(args.host, args.port, cfg, args.streams, opened, hold_until)
        )
        for _ in range(args.connections)
    ]
    # Report once every connection has sent all its streams (bounded wait).
    while len(opened) < args.connections and time.monotonic() < hold_until:
        if any(t.done() for t in tasks):
            break
        await asyncio.sleep(0.02)
    print(
        json.dumps(
            {
                "event": "opened",
                "connections": len(opened),
                "streams": sum(opened),
                "seconds": round(time.monotonic() - start, 3),
            }
        ),
        flush=True,
    )
    results = await asyncio.wait_for(
        asyncio.gather(*tasks, return_exceptions=True), timeout=args.hold + 10
    )
    errors = [repr(r) for r in results if isinstance(r, BaseException)]
    return {
        "event": "done",
        "mode": "streams",
        "connections": len(opened),
        "streams": sum(opened),
        "errors": errors[:4],
    }


def main():
    p = argparse.ArgumentParser()
    sub = p.add_subparsers(dest="mode", required=True)
    i = sub.add_parser("initials")
    i.add_argument("--host", default="127.0.0.1")
    i.add_argument("--port", type=int, required=True)
    i.add_argument("--count", type=int, default=10000)
    i.add_argument("--seconds", type=float, default=10.0)
    s = sub.add_parser("streams")
    s.add_argument("--host", default="127.0.0.1")
    s.add_argument("--port", type=int, required=True)
    s.add_argument("--cert", required=True)
    s.add_argument("--key", required=True)
    s.add_argument("--connections", type=int, default=8)
    s.add_argument("--streams", type=int, default=8192)
    s.add_argument("--hold", type=float, default=8.0)
    args = p.parse_args()
    if args.mode == "initials":
        out = initials(args.host, args.port, args.count, args.seconds)
    else:
        out = asyncio.run(streams_main(args))
    print(json.dumps(out), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
