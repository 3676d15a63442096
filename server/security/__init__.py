"""Security at the edge of the server: API keys and per-adapter access (`keys`), the gRPC
interceptor that enforces them, per-key concurrency and the drain gate (`interceptor`),
and TLS/mTLS server credentials (`tls`). Documented in docs/security.md."""
