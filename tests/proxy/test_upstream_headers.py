"""Which client headers reach the provider: decided once per name, and the memo stays bounded."""

from __future__ import annotations

from multidict import CIMultiDict, CIMultiDictProxy

from proxy import upstream
from proxy.policy import Provider
from proxy.upstream import ProviderClient


def _client(kind: str, **extra: object) -> ProviderClient:
    return ProviderClient.build(
        "p",
        Provider.model_validate(
            {"kind": kind, "base_url": "http://x", "api_key": "sk-up", **extra}
        ),
    )


def _headers(*pairs: tuple[str, str]) -> CIMultiDictProxy[str]:
    return CIMultiDictProxy(CIMultiDict(pairs))


def test_same_names_in_any_case_give_the_same_answer_every_time() -> None:
    c = _client("openai")
    for _ in range(3):  # the first call fills the memo, the next ones read it
        for auth in ("Authorization", "authorization", "AUTHORIZATION"):
            out = c.headers(
                _headers(
                    (auth, "Bearer tw-secret"),
                    ("X-Tollway-Feature", "docs"),
                    ("anthropic-beta", "x"),
                    ("X-Trace", "t1"),
                )
            )
            assert out == {
                "x-trace": "t1",
                "authorization": "Bearer sk-up",
                "content-type": "application/json",
            }


def test_anthropic_provider_keeps_the_clients_version_and_allowed_account_headers() -> None:
    pairs = (("anthropic-version", "2023-01-01"), ("anthropic-beta", "b"))
    out = _client("anthropic").headers(_headers(*pairs))
    assert out["anthropic-version"] == "2023-01-01"
    assert "anthropic-beta" not in out  # an account header: only where the policy allows it
    assert out["x-api-key"] == "sk-up"
    out = _client("anthropic", forward_headers=["Anthropic-Beta"]).headers(_headers(*pairs))
    assert out["anthropic-beta"] == "b"


def test_memo_of_header_names_is_bounded() -> None:
    c = _client("openai")
    for i in range(upstream._NAMES_KEPT * 3):
        out = c.headers(_headers((f"x-n{i}", "v"), ("Cookie", "s=1")))
        assert out[f"x-n{i}"] == "v" and "cookie" not in out
    assert len(c.forwarded_names) <= upstream._NAMES_KEPT
