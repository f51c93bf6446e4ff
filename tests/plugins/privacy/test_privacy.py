"""privacy: personal data and secrets never reach the provider, the cache or the logs."""

from __future__ import annotations

import logging
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from plugins.privacy import ALL_KINDS, Redactor, iban_ok, luhn
from tests.conftest import ADMIN_KEY, Emulator, Gw, config_error, policy

EMAIL = "jane.roe@example.org"
CARD = "4111 1111 1111 1111"
PHONE = "+44 20 7946 0958"
IBAN = "GB82 WEST 1234 5698 7654 32"
SSN = "123-45-6789"
IP = "10.20.30.40"
SECRET = "sk-proj-Q1w2E3r4T5y6U7i8O9p0AsDf"
PII_TEXT = (
    f"Write to {EMAIL} or call {PHONE}. Card {CARD}, IBAN {IBAN}, SSN {SSN}, "
    f"host {IP}, key {SECRET}."
)
ORIGINALS = (EMAIL, CARD, PHONE, IBAN, SSN, IP, SECRET)
COUNTS = "card=1,email=1,iban=1,ip=1,phone=1,secret=1,ssn=1"


def redact(text: str, kinds: tuple[str, ...] = ALL_KINDS) -> tuple[str, dict[str, int]]:
    counts: dict[str, int] = {}
    return Redactor(list(kinds), [], "[{KIND}]").redact(text, counts), counts


def test_detectors_find_each_kind() -> None:
    out, counts = redact(PII_TEXT)
    assert out == (
        "Write to [EMAIL] or call [PHONE]. Card [CARD], IBAN [IBAN], SSN [SSN], "
        "host [IP], key [SECRET]."
    )
    assert counts == dict.fromkeys(ALL_KINDS, 1)
    for text in (
        "(415) 555-0100",
        "415.555.0100",
        "415 555 0100",
        "+1-415-555-0100",
        "5500-0000-0000-0004",
        "DE89370400440532013000",
        "AKIAIOSFODNN7EXAMPLE",
        "Authorization: Bearer abcdefghijklmnopqrstuvwxyz012345",
        "-----BEGIN RSA PRIVATE KEY-----\nMIIEow\n-----END RSA PRIVATE KEY-----",
        "tw_" + "a" * 40,
        "Authorization: Bearer\u00a0abcdefghijklmnopqrstuvwxyz012345"[:-1] + "5 and more",
    ):
        out, counts = redact(text)
        assert sum(counts.values()) == 1 and "[" in out, (text, out)


@pytest.mark.parametrize(
    "text",
    [
        "order 1234 5678 9012 3456 failed the Luhn check",
        "released 2024-01-15 as v1.2.3 on port 8080",
        "not an address: 999.1.1.1",
        "an SSN cannot start with 000: 000-12-3456",
        "IBAN with a bad check: GB00 WEST 1234 5698 7654 32",
        "def total(xs):\n    return sum(xs) * 100 + 42\n",
        "a task-related sk-learn question",
        "count to 123456789 and back",
        "a matrix row: 1000 2000 3000 and 12 345 678",
        "mixed separators 415-555 0100",
    ],
)
def test_detectors_leave_lookalikes_alone(text: str) -> None:
    assert redact(text) == (text, {})


@st.composite
def numberish(draw: st.DrawFn) -> str:
    """Digit groups with separators, maybe a country code, parentheses or a letter prefix:
    the shapes phone numbers, cards, SSNs, addresses and IBANs take, and near misses."""
    groups = draw(st.lists(st.text("0123456789", min_size=1, max_size=5), min_size=1, max_size=6))
    seps = draw(st.lists(st.sampled_from(["", " ", ".", "-", ")", ") "]), min_size=len(groups)))
    text = "".join(g + sep for g, sep in zip(groups, seps, strict=False)).rstrip(" .-)")
    lead = draw(st.sampled_from(["", "", "+", "(", "+1 ", "GB", "DE8", "x", " "]))
    return lead + text


@settings(max_examples=600, deadline=None)
@given(
    st.one_of(
        numberish(),
        st.text(
            alphabet="0123456789 .-+()@abcxyzGBDE_kAKISsp\u00a0\u0663é", min_size=1, max_size=40
        ),
    )
)
def test_the_gate_never_hides_a_match(text: str) -> None:
    """The RE2 gate must match wherever a precise detector would: a gate that said "nothing
    here" for a text holding personal data would let it through."""
    r = Redactor(list(ALL_KINDS), [], "[{KIND}]")
    counts: dict[str, int] = {}
    r._run(r.passes, text, counts)  # the precise passes alone, gate or not
    if counts:
        assert r.gate is not None and r.gate.search(text.encode()) is not None, (text, counts)


def test_checksums() -> None:
    assert luhn("4111111111111111") and not luhn("4111111111111112")
    assert iban_ok("GB82 WEST 1234 5698 7654 32") and not iban_ok("GB83 WEST 1234 5698 7654 32")


def test_only_enabled_kinds_run() -> None:
    out, counts = redact(PII_TEXT, ("email", "card"))
    assert counts == {"email": 1, "card": 1} and SSN in out and PHONE in out


def chain(extra: str = "") -> str:
    return "chain:\n  - name: auth\n  - name: privacy\n" + extra


async def test_the_provider_sees_placeholders(make_gateway: Any, emulator: Emulator) -> None:
    gw: Gw = await make_gateway(chain())
    await emulator.reset()
    raw = await gw.openai(await gw.create_key()).chat.completions.with_raw_response.create(
        model="gpt-5.4-mini",
        messages=[
            {"role": "system", "content": f"The operator is {EMAIL}."},
            {"role": "user", "content": [{"type": "text", "text": PII_TEXT}]},
        ],
    )
    assert raw.headers["x-tollway-redacted"] == "card=1,email=2,iban=1,ip=1,phone=1,secret=1,ssn=1"
    sent = str((await emulator.last())["body"])
    assert "[EMAIL]" in sent and "[CARD]" in sent and "[SECRET]" in sent
    assert not any(o in sent for o in ORIGINALS)
    # nothing to redact: no header
    plain = await gw.openai(await gw.create_key()).chat.completions.with_raw_response.create(
        model="gpt-5.4-mini", messages=[{"role": "user", "content": "hello"}]
    )
    assert "x-tollway-redacted" not in plain.headers
    async with gw.http.get(f"{gw.url}/metrics") as r:
        text = await r.text()
    assert 'tollway_redactions_total{kind="email"} 2.0' in text
    assert "tollway_redacted_requests_total 1.0" in text


async def test_tool_call_arguments_are_redacted(make_gateway: Any, emulator: Emulator) -> None:
    gw: Gw = await make_gateway(chain())
    await gw.openai(await gw.create_key()).chat.completions.create(
        model="gpt-5.4-mini",
        messages=[
            {"role": "user", "content": "email my manager"},
            {
                "role": "assistant",
                "content": None,
                "tool_calls": [
                    {
                        "id": "call_1",
                        "type": "function",
                        "function": {"name": "send", "arguments": f'{{"to": "{EMAIL}"}}'},
                    }
                ],
            },
            {"role": "tool", "tool_call_id": "call_1", "content": f"sent to {EMAIL}"},
        ],
    )
    sent = (await emulator.last())["body"]["messages"]
    assert sent[1]["tool_calls"][0]["function"]["arguments"] == '{"to": "[EMAIL]"}'
    assert sent[2]["content"] == "sent to [EMAIL]"


async def test_anthropic_completions_and_embeddings(make_gateway: Any, emulator: Emulator) -> None:
    gw: Gw = await make_gateway(chain())
    key = await gw.create_key()
    await emulator.reset()
    await gw.anthropic(key).messages.create(
        model="claude-sonnet",
        max_tokens=50,
        system=[{"type": "text", "text": f"Escalate to {EMAIL}"}],
        messages=[{"role": "user", "content": PII_TEXT}],
    )
    sent = str((await emulator.last())["body"])
    assert "[EMAIL]" in sent and not any(o in sent for o in ORIGINALS)
    client = gw.openai(key)
    await client.completions.create(model="gpt-5.4-mini", prompt=PII_TEXT)
    sent = str((await emulator.last())["body"])
    assert "[IBAN]" in sent and not any(o in sent for o in ORIGINALS)
    emb = await client.embeddings.create(model="text-embedding-3-small", input=[PII_TEXT, "x"])
    assert len(emb.data) == 2
    sent = str((await emulator.last())["body"])
    assert "[SSN]" in sent and not any(o in sent for o in ORIGINALS)


async def test_custom_detectors_and_skipped_features(make_gateway: Any, emulator: Emulator) -> None:
    config = {
        "redact": ["email"],
        "custom": [{"name": "employee_id", "pattern": "EMP-[0-9]{6}"}],
        "placeholder": "<{kind}>",
        "skip_features": ["raw"],
    }
    base = policy(
        features={"raw": {"price_per_request": 0.01}},
        tiers={"free": {"features": ["basic_suggestions", "raw"]}},
    )
    gw: Gw = await make_gateway(
        [{"name": "auth"}, {"name": "privacy", "config": config}], base=base
    )
    client = gw.openai(await gw.create_key())
    text = f"EMP-123456 wrote from {EMAIL}, card {CARD}"
    raw = await client.chat.completions.with_raw_response.create(
        model="gpt-5.4-mini", messages=[{"role": "user", "content": text}]
    )
    assert raw.headers["x-tollway-redacted"] == "email=1,employee_id=1"
    sent = (await emulator.last())["body"]["messages"][0]["content"]
    assert sent == f"<employee_id> wrote from <email>, card {CARD}"
    await client.chat.completions.create(
        model="gpt-5.4-mini",
        messages=[{"role": "user", "content": text}],
        extra_headers={"X-Tollway-Feature": "raw"},
    )
    assert (await emulator.last())["body"]["messages"][0]["content"] == text


async def test_cache_keys_on_the_redacted_request(make_gateway: Any, emulator: Emulator) -> None:
    """Two prompts that differ only in personal data are one request for the provider: the
    second is a hit, and the stored answer never held the address."""
    gw: Gw = await make_gateway(chain("  - name: cache\n    config: {default_ttl: 1h}\n"))
    client = gw.openai(await gw.create_key())
    await emulator.reset()
    for who in ("ann@example.com", "bob@example.net"):
        raw = await client.chat.completions.with_raw_response.create(
            model="gpt-5.4-mini", messages=[{"role": "user", "content": f"greet {who}"}]
        )
        assert "@" not in (raw.parse().choices[0].message.content or "")
    assert raw.headers["x-tollway-cache"] == "hit"
    assert (await emulator.stats())["requests"] == 1


async def test_no_personal_data_secret_or_prompt_in_logs(
    make_gateway: Any, emulator: Emulator, caplog: pytest.LogCaptureFixture
) -> None:
    """Every log line of a request's life (debug included), errors and fallbacks too."""
    caplog.set_level(logging.DEBUG)
    gw: Gw = await make_gateway(chain())
    key = await gw.create_key()
    client = gw.openai(key, max_retries=0)
    await client.chat.completions.create(
        model="gpt-5.4-mini", messages=[{"role": "user", "content": PII_TEXT}]
    )
    with pytest.raises(Exception):  # noqa: B017 - any provider error shape will do
        await client.chat.completions.create(
            model="gpt-5.4-mini",
            messages=[{"role": "user", "content": PII_TEXT}],
            extra_headers={"x-emulator-status": "500"},
        )
    logged = "\n".join(r.getMessage() + str(r.exc_info or "") for r in caplog.records)
    for secret in (*ORIGINALS, key, "upstream-secret", ADMIN_KEY, "Write to"):
        assert secret not in logged


@pytest.mark.parametrize(
    ("config", "error"),
    [
        ("{redact: [email, passport]}", "redact[1]: Input should be"),
        ("{custom: [{name: x, pattern: '(unclosed'}]}", "not a valid regular expression"),
        ("{custom: [{name: x, pattern: 'a*'}]}", "matches the empty string"),
        ("{custom: [{name: email, pattern: 'x'}]}", "used twice"),
    ],
)
def test_bad_config_is_refused(config: str, error: str) -> None:
    message = config_error("privacy", config)
    assert message.startswith("chain[0] (privacy).config") and error in message
