"""otel: OpenTelemetry traces of each request (GenAI semantic conventions), over OTLP."""
