"""A real OTLP/gRPC trace receiver for tests: collects what services export."""

from __future__ import annotations

import threading
from concurrent import futures

import grpc
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2, trace_service_pb2_grpc


class OtlpTraceReceiver(trace_service_pb2_grpc.TraceServiceServicer):
    def __init__(self) -> None:
        self.spans: list[dict] = []
        self._lock = threading.Lock()
        self.server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
        trace_service_pb2_grpc.add_TraceServiceServicer_to_server(self, self.server)
        self.port = self.server.add_insecure_port("127.0.0.1:0")

    def Export(self, request, context):
        with self._lock:
            for resource_spans in request.resource_spans:
                attrs = {a.key: a.value.string_value
                         for a in resource_spans.resource.attributes}
                for scope in resource_spans.scope_spans:
                    for span in scope.spans:
                        self.spans.append({
                            "service": attrs.get("service.name", ""),
                            "name": span.name,
                            "trace_id": span.trace_id.hex(),
                            "attributes": {a.key: a.value.string_value
                                           for a in span.attributes},
                        })
        return trace_service_pb2.ExportTraceServiceResponse()

    def start(self) -> OtlpTraceReceiver:
        self.server.start()
        return self

    def stop(self) -> None:
        self.server.stop(0)
