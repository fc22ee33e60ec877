"""inference-gateway: serves the exported models over gRPC (streaming Generate)."""
