"""The protocols the gateway speaks: native gRPC, KServe v2 gRPC, OpenAI HTTP, and the
gRPC server that carries the first two."""
