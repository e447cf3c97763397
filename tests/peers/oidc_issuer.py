"""An independent HTTPS server standing in for a Kubernetes service-account issuer (Python's standard
library only: http.server and ssl).

Serves the files under --root over HTTPS with --cert/--key on 127.0.0.1 (an ephemeral port), prints one
JSON ready line with its port, then one JSON line per request: its path and whether the expected bearer
token (--token, when given) was sent; requests without it get 401. Exits after --max-seconds.
"""

import argparse
import http.server
import json
import ssl
import sys
import threading


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--root", required=True)
    p.add_argument("--cert", required=True)
    p.add_argument("--key", required=True)
    p.add_argument("--token")
    p.add_argument("--max-seconds", type=float, default=120)
    a = p.parse_args()
    lock = threading.Lock()

    class Handler(http.server.SimpleHTTPRequestHandler):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, directory=a.root, **kwargs)

        def log_message(self, *args):
            pass

        def do_GET(self):
            authorized = a.token is None or self.headers.get("Authorization") == f"Bearer {a.token}"
            with lock:
                print(json.dumps({"path": self.path, "authorized": authorized}), flush=True)
            if not authorized:
                self.send_error(401)
                return
            super().do_GET()

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(a.cert, a.key)
    server.socket = ctx.wrap_socket(server.socket, server_side=True)
    print(json.dumps({"event": "ready", "port": server.server_address[1]}), flush=True)
    threading.Timer(a.max_seconds, server.shutdown).start()
    server.serve_forever()
    sys.exit(0)


if __name__ == "__main__":
    main()
