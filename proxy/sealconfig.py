"""The config fields of a plugin that seals what it keeps (``proxy.sealing``): its key ring.

The response cache and the stored responses both keep user data sealed with AES-256-GCM, in
process memory or in the shared store (Redis), and configure it the same way: ``key`` seals
new values, ``old_keys`` still open what retired keys sealed, and without a key each process
makes its own, which only works when no other instance has to open the values. A plugin's
config subclasses ``SealedConfig`` and says when its store is shared (``shared``).

Why in the core: the two plugins' fields mean exactly the same, and a plugin never imports
another plugin; a third-party plugin that keeps user data can use it too.
"""

from __future__ import annotations

import secrets
from typing import Any, ClassVar, Self

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    SecretStr,
    ValidationInfo,
    field_validator,
    model_validator,
)

from proxy.policy import Policy, errors_at, policy_of
from proxy.sealing import KEY_LEN, key_id, parse_key


class SealedConfig(BaseModel):
    """``key`` and ``old_keys``, checked when the policy loads; ``key_ring`` for ``Sealer``."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    key_name: ClassVar[str] = "encryption key"
    """What a key is called in errors (never the key itself)."""

    shared_by: ClassVar[str] = "key"
    """The field a missing key is reported at: the one that made the store shared, when the
    config has one (the cache's ``backend``), else ``key`` itself."""

    key: SecretStr | None = Field(
        None,
        description="AES-256 key (64 hex chars or base64) sealing what is kept; new values use "
        "it. Required when the store is shared (Redis); without it each process makes its own.",
    )
    old_keys: list[SecretStr] = Field(
        default_factory=list,
        description="Retired keys still accepted until what they sealed expires.",
    )

    @field_validator("key", "old_keys")
    @classmethod
    def _keys(cls, v: Any) -> Any:
        for k in v if isinstance(v, list) else [v]:
            if k is not None:
                parse_key(k.get_secret_value(), cls.key_name)
        return v

    def shared(self, policy: Policy) -> bool:
        """Whether other instances open what this plugin keeps (its store is Redis)."""
        return policy.state.distributed

    @model_validator(mode="after")
    def _shared_needs_key(self, info: ValidationInfo) -> Self:
        # a per-process key would leave every other instance unable to open a value
        policy = policy_of(info)
        if policy is None or self.key is not None or not self.shared(policy):
            return self
        message = "the store is shared (state.url is Redis): set config.key so every instance "
        message += "can open what it keeps"
        raise errors_at(type(self).__name__, [((self.shared_by,), message)])

    def key_ring(self, shared: bool) -> list[tuple[str, bytes]]:
        """The ``(key id, key)`` ring for ``Sealer``: ``key`` first (it seals), then
        ``old_keys``; without ``key``, one made for this process (an unshared store only)."""
        if self.key is None:
            if shared:
                raise ValueError("a shared store needs config.key so every instance can open it")
            key = secrets.token_bytes(KEY_LEN)  # values live only in this process
            return [(key_id(key), key)]
        given = [self.key, *self.old_keys]
        keys = [parse_key(s.get_secret_value(), self.key_name) for s in given]
        return [(key_id(k), k) for k in keys]
