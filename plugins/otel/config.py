"""The otel plugin's config: where spans go and what they may hold."""

from __future__ import annotations

from typing import Literal
from urllib.parse import urlsplit

from pydantic import BaseModel, ConfigDict, Field, SecretStr, field_validator

from proxy.policy import Seconds

Protocol = Literal["http/protobuf", "grpc"]

DEFAULT_ENDPOINTS: dict[Protocol, str] = {
    "http/protobuf": "http://127.0.0.1:4318/v1/traces",
    "grpc": "http://127.0.0.1:4317",
}
"""A local collector's traces address per protocol (OpenTelemetry's default ports)."""


class OtelConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    protocol: Protocol = Field(
        "http/protobuf",
        description="OTLP transport: http/protobuf (POST to the traces URL) or grpc (the "
        "TraceService; needs opentelemetry-exporter-otlp-proto-grpc, in the otel extra).",
    )
    endpoint: str | None = Field(
        None,
        description="The collector: for http/protobuf its traces URL (default "
        "http://127.0.0.1:4318/v1/traces), for grpc its address (default "
        "http://127.0.0.1:4317; https:// for TLS).",
    )
    headers: dict[str, SecretStr] = Field(
        default_factory=dict,
        description="Headers sent with each export, gRPC metadata with grpc (a collector's API "
        "key: use $env or $file).",
    )
    service_name: str = Field("tollway", description="The resource's service.name.")
    sample_ratio: float = Field(
        1.0,
        ge=0.0,
        le=1.0,
        description="Share of new traces recorded; a client's sampled traceparent is followed.",
    )
    schedule_delay: Seconds = Field(
        5.0, gt=0, description="Time between exports of the batch of finished spans (5s, 500ms)."
    )
    max_queue_size: int = Field(
        2048,
        ge=1,
        description="Finished spans kept waiting for export; beyond it they are dropped.",
    )
    export_timeout: Seconds = Field(10.0, gt=0, description="How long an export may take (10s).")
    user: Literal["none", "hash", "raw"] = Field(
        "hash",
        description="How the caller appears on spans (tollway.user): left out, a SHA-256 prefix "
        "of the user id, or the user id itself.",
    )
    capture_content: bool = Field(
        False,
        description="Record prompts and whole completions (gen_ai.input.messages, "
        "gen_ai.output.messages). Place the plugin after privacy so it sees redacted requests.",
    )

    @field_validator("endpoint")
    @classmethod
    def _endpoint(cls, v: str | None) -> str | None:
        parts = urlsplit(v or "http://default")
        if parts.scheme not in ("http", "https") or not parts.netloc:
            raise ValueError("endpoint must be an http:// or https:// URL")
        return v

    @property
    def url(self) -> str:
        """Where spans go: ``endpoint``, or the protocol's local default."""
        return self.endpoint or DEFAULT_ENDPOINTS[self.protocol]
