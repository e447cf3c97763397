"""An independent OTLP/gRPC trace collector (grpcio and the opentelemetry-proto package from PyPI).

Listens on 127.0.0.1 (an ephemeral port), prints one JSON ready line with its port, then one JSON line
per span received: trace and span ids as hex, the parent span id, kind, name, status code, the
resource's and the span's attributes as strings. Exits after --max-seconds whatever happens.
"""

import argparse
import json
import sys
import threading
from concurrent import futures

import grpc
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2, trace_service_pb2_grpc

lock = threading.Lock()


def value(v):
    kind = v.WhichOneof("value")
    return "" if kind is None else str(getattr(v, kind))


class Collector(trace_service_pb2_grpc.TraceServiceServicer):
    def Export(self, request, context):
        for rs in request.resource_spans:
            resource = {a.key: value(a.value) for a in rs.resource.attributes}
            for ss in rs.scope_spans:
                for s in ss.spans:
                    line = {
                        "trace_id": s.trace_id.hex(),
                        "span_id": s.span_id.hex(),
                        "parent_span_id": s.parent_span_id.hex(),
                        "kind": s.kind,
                        "name": s.name,
                        "status": s.status.code,
                        "start": s.start_time_unix_nano,
                        "end": s.end_time_unix_nano,
                        "resource": resource,
                        "attributes": {a.key: value(a.value) for a in s.attributes},
                    }
                    with lock:
                        print(json.dumps(line), flush=True)
        return trace_service_pb2.ExportTraceServiceResponse()


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--max-seconds", type=float, default=120)
    a = p.parse_args()
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
    trace_service_pb2_grpc.add_TraceServiceServicer_to_server(Collector(), server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    print(json.dumps({"event": "ready", "port": port}), flush=True)
    server.wait_for_termination(timeout=a.max_seconds)
    server.stop(0)


if __name__ == "__main__":
    sys.exit(main())
