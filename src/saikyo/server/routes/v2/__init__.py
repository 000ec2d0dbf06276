"""Open Inference Protocol v2 (KServe / Triton HTTP): routes, wire format, OpenAPI descriptions."""
