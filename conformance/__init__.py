"""SDK conformance: the official SDKs' own API tests, run through the gateway.

The ``openai`` and ``anthropic`` packages ship, in their source distributions, a test suite
(``tests/api_resources/``) that calls every endpoint with the SDK and checks that each reply
parses into the SDK's types. Those tests were written against the providers' API
descriptions, not against Tollway, so they are an independent oracle of the wire shapes: a
reply the gateway or its emulator gets wrong fails them. ``python -m conformance.run`` fetches
the suites of the installed SDK versions, runs the endpoint files the gateway serves once
through a gateway and once against the emulator alone, and compares with the committed
expectations (``expected-<sdk>.txt``). See docs/conformance.md.
"""
