"""An independent QUIC client (aioquic) that presents a given client certificate to a quicmesh inbound
endpoint and reports whether the handshake was accepted. Used by the integration tests to check what the
proxy refuses, and why, with certificates that our own code would never produce.

usage: mtls_probe.py HOST PORT CERT KEY [SERVER_NAME]
prints one JSON line: {"accepted": bool, "error": str, "server_id": str}
With SERVER_NAME (the TLS server name asking a node gateway for an identity), `server_id` is the URI
SAN of the certificate the server presented ("" when none).
"""

import asyncio
import json
import ssl
import sys

from aioquic.asyncio import connect
from aioquic.quic.configuration import QuicConfiguration


def server_id(client):
    """The URI SAN of the certificate the server presented, read with `cryptography` (aioquic's)."""
    from cryptography import x509

    cert = getattr(client._quic.tls, "_peer_certificate", None)
    if cert is None:
        return ""
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName)
    except x509.ExtensionNotFound:
        return ""
    uris = san.value.get_values_for_type(x509.UniformResourceIdentifier)
    return uris[0] if len(uris) == 1 else ""


async def probe(host, port, cert, key, server_name=None):
    cfg = QuicConfiguration(is_client=True, alpn_protocols=["quicmesh/1"])
    if server_name:
        cfg.server_name = server_name
    cfg.verify_mode = ssl.CERT_NONE  # the server's certificate is not what is tested here
    cfg.load_cert_chain(cert, key)
    cfg.idle_timeout = 5.0
    try:
        async with connect(host, port, configuration=cfg, wait_connected=True) as client:
            # TLS 1.3 servers may refuse the client certificate after the client considers the
            # handshake done: a round trip on a stream settles it.
            reader, writer = await client.create_stream()
            writer.write(b"\x00\x00")
            writer.write_eof()
            try:
                await asyncio.wait_for(reader.read(), timeout=3)
            except Exception:
                pass
            await asyncio.wait_for(client.ping(), timeout=3)
            return {"accepted": True, "error": "", "server_id": server_id(client)}
    except Exception as e:  # noqa: BLE001 - any failure is a refusal to report
        return {"accepted": False, "error": f"{type(e).__name__}: {e}", "server_id": ""}


def main():
    host, port, cert, key = sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4]
    server_name = sys.argv[5] if len(sys.argv) > 5 else None
    result = asyncio.run(asyncio.wait_for(probe(host, port, cert, key, server_name), timeout=15))
    print(json.dumps(result))


if __name__ == "__main__":
    main()
