"""An independent gRPC client (grpcio) of the controller's ProxyApi.RegisterEndpoint.

Compiles controller.proto with grpcio-tools, connects over TLS with the given client certificate and
registers an endpoint for --service. Prints one line: "OK <version>" or "<STATUS_CODE> <message>".
Used by tests/mesh/controller_hardening.rs to check secure naming with a client that shares no code
with the controller.
"""

import argparse
import importlib
import os
import sys

import grpc
from grpc_tools import protoc


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--proto-dir", required=True)
    p.add_argument("--out-dir", required=True)
    p.add_argument("--target", required=True)
    p.add_argument("--ca", required=True)
    p.add_argument("--cert", required=True)
    p.add_argument("--key", required=True)
    p.add_argument("--service", required=True)
    p.add_argument("--name", required=True)
    a = p.parse_args()

    if not os.path.exists(os.path.join(a.out_dir, "controller_pb2_grpc.py")):
        rc = protoc.main([
            "protoc",
            f"-I{a.proto_dir}",
            f"--python_out={a.out_dir}",
            f"--grpc_python_out={a.out_dir}",
            "controller.proto",
        ])
        if rc != 0:
            print(f"protoc failed with {rc}", file=sys.stderr)
            return 2
    sys.path.insert(0, a.out_dir)
    pb = importlib.import_module("controller_pb2")
    pb_grpc = importlib.import_module("controller_pb2_grpc")

    def read(path: str) -> bytes:
        with open(path, "rb") as f:
            return f.read()

    creds = grpc.ssl_channel_credentials(
        root_certificates=read(a.ca),
        private_key=read(a.key),
        certificate_chain=read(a.cert),
    )
    with grpc.secure_channel(a.target, creds) as channel:
        stub = pb_grpc.ProxyApiStub(channel)
        req = pb.RegisterEndpointRequest(
            endpoint=pb.Endpoint(
                metadata=pb.Metadata(name=a.name),
                service=a.service,
                address="127.0.0.1:4433",
            )
        )
        try:
            resp = stub.RegisterEndpoint(req, timeout=10)
            print(f"OK {resp.version}")
        except grpc.RpcError as e:
            print(f"{e.code().name} {e.details()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
