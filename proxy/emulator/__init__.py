"""An OpenAI- and Anthropic-compatible upstream emulator for the demo, the tests and benchmarks.

There is no internet here, yet the gateway must be exercised against something that speaks the
providers' wire formats closely enough that the official ``openai`` and ``anthropic`` SDKs work
against it unchanged. Replies are deterministic (``"Echo:"`` plus the words of the last user
message) so tests can assert exact output, and tokens follow one rule (whitespace-separated
words, at least 1) so usage metering can be checked by hand.

Benchmarks use it as the upstream, so the hot path avoids needless work: static bodies are
serialised once, stream events are built from pre-encoded byte templates, and a stream with no
pacing controls goes out in a single write.

Behaviour is steered per request by ``x-emulator-*`` headers (see ``controls._Controls``), which
the gateway forwards untouched, or by a model named ``emu-slow-<ms>`` or ``emu-status-<code>``
where headers can't be set.

The modules, one concern each:

- ``app``: the aiohttp app, its routes, the wrapper every ``/v1`` endpoint runs behind
  (accounting, auth, body parsing, injected faults) and ``serve``;
- ``controls``: the ``x-emulator-*`` controls, hanging, and paced or aborted streams;
- ``state``: the call counters, last request, fail-times budgets, ids and ``/_emulator/*``;
- ``wire``: the JSON type, the two dialects and their error shapes;
- ``prompts``: reading a request's model, messages and prompts, checked as the API checks;
- ``replies``: the deterministic reply and the token rule;
- ``tools``: which function tools a reply calls (``tool_choice``, parallel calls), and their
  arguments, alike in all three APIs;
- ``chat``: OpenAI chat completions and legacy completions, whole and streamed;
- ``messages``: Anthropic Messages, whole and streamed, and their token counting;
- ``responses``: the OpenAI Responses API, whole and streamed, its stored responses and its
  token counting (``/v1/responses/input_tokens``);
- ``items``: reading a Responses request's input items, tools and output format;
- ``schema``: a JSON value fitting a JSON schema (structured-output replies);
- ``embeddings``: OpenAI embeddings;
- ``models``: the model lists of ``/v1/models`` and one model's ``/v1/models/{id}``.
"""

from proxy.emulator.app import create_emulator_app, serve

__all__ = ["create_emulator_app", "serve"]
