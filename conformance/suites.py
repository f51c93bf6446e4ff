"""Which SDK tests run, and how each SDK's suite is pointed at a server.

The files are those of the endpoints the gateway serves: chat completions, completions,
embeddings, models and responses (OpenAI), messages with count_tokens and models
(Anthropic). Each suite reads its server from ``TEST_API_BASE_URL`` (its conftest.py) and
sends a fixed API key, which the conformance policy declares (by hash) as a gateway key.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Suite:
    """One SDK's conformance suite."""

    dist: str
    """The PyPI distribution (and import name) of the SDK."""
    files: tuple[str, ...]
    """The test files run, relative to the sdist's root."""
    base_path: str
    """What follows the server's origin in ``TEST_API_BASE_URL``: OpenAI's SDK takes a base
    URL up to ``/v1``, Anthropic's the host root."""
    pytest_args: tuple[str, ...] = ()
    """Options the SDK's own pytest configuration sets and its tests need."""


SUITES: dict[str, Suite] = {
    "openai": Suite(
        dist="openai",
        files=(
            "tests/api_resources/chat/test_completions.py",
            "tests/api_resources/test_completions.py",
            "tests/api_resources/test_embeddings.py",
            "tests/api_resources/test_models.py",
            "tests/api_resources/test_responses.py",
            "tests/api_resources/responses/test_input_items.py",
            "tests/api_resources/responses/test_input_tokens.py",
        ),
        base_path="/v1",
    ),
    "anthropic": Suite(
        dist="anthropic",
        files=(
            "tests/api_resources/test_messages.py",
            "tests/api_resources/test_models.py",
        ),
        base_path="",
        # `import httpx` must mean httpx2 before anything imports it (the SDK's pyproject)
        pytest_args=("-p", "tests._alias_httpx"),
    ),
}

TEST_DEPENDENCIES: dict[str, str] = {
    "rich": "rich>=13.7",
    "inline_snapshot": "inline-snapshot>=0.28",
    "http_snapshot": "http-snapshot>=0.1.9",
    "pytest_asyncio": "pytest-asyncio>=0.24",
    "pytest_timeout": "pytest-timeout>=2.3",
}
"""Import name -> requirement: what the suites' conftest.py and tests/utils.py import beyond
the SDKs themselves (also in pyproject's ``test`` extra, so ``make`` installs them)."""

PYTEST_INI = """\
[pytest]
# the SDKs' own settings (their pyproject.toml) less xdist's -n: two cores, a few hundred calls
asyncio_mode = auto
asyncio_default_fixture_loop_scope = session
xfail_strict = true
filterwarnings =
    error
timeout = 60
"""
