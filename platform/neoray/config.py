"""Turning Hydra/OmegaConf sections into typed dataclasses, with errors that name the field."""

from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Mapping, Sequence
from typing import Any, TypeVar

T = TypeVar("T")


class ConfigError(ValueError):
    """A configuration value is wrong; the message names the field and how to fix it."""


def to_dict(section: Any) -> dict[str, Any]:
    """Plain dict from a Mapping or an OmegaConf node (resolving interpolations)."""
    if section is None:
        return {}
    if not isinstance(section, Mapping):
        try:
            from omegaconf import OmegaConf

            return OmegaConf.to_container(section, resolve=True)  # type: ignore[return-value]
        except (ImportError, ValueError) as err:
            raise ConfigError(f"expected a mapping, got {type(section).__name__}") from err
    return {str(k): v for k, v in section.items()}


def dataclass_from_config(cls: type[T], section: Any, where: str) -> T:
    """Build dataclass `cls` from a config section; unknown keys are rejected by name.

    `where` is the section's path in the config (e.g. "model"), used in error messages.
    """
    values = to_dict(section)
    fields = {f.name for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    unknown = sorted(set(values) - fields)
    if unknown:
        raise ConfigError(
            f"{where}: unknown field(s) {', '.join(unknown)}; valid fields are {', '.join(sorted(fields))}"
        )
    missing = sorted(
        f.name
        for f in dataclasses.fields(cls)  # type: ignore[arg-type]
        if f.name not in values
        and f.default is dataclasses.MISSING
        and f.default_factory is dataclasses.MISSING
    )
    if missing:
        raise ConfigError(
            f"{where}: required field(s) {', '.join(missing)} not set; add them to the config"
        )
    for name, value in values.items():
        refuse_nonfinite(value, f"{where}.{name}")
    return cls(**values)


def refuse_nonfinite(value: Any, where: str) -> None:
    """Refuse NaN and infinity in `value` (at any depth of lists and mappings). No setting
    means anything by them, and a NaN slips through every range check written as a comparison
    (`nan < 0` and `nan <= 0` are both false): `optim.grad_clip=nan` would turn clipping off,
    a component weight of nan would drop the component from the mixture, silently."""
    if isinstance(value, float) and not math.isfinite(value):
        raise ConfigError(f"{where}={value}: give a finite number")
    if isinstance(value, Mapping):
        for key, item in value.items():
            refuse_nonfinite(item, f"{where}.{key}")
    elif isinstance(value, Sequence) and not isinstance(value, str | bytes):
        for index, item in enumerate(value):
            refuse_nonfinite(item, f"{where}[{index}]")


# A key names a secret when one of its words ("_", "-" or "." separated) is one of these:
# `aws_secret_access_key`, `api_token`, `credentials`, `basic_auth`, `X-Amz-Signature` are;
# `tokenizer`, `tokens_seen`, `author` are not.
SECRET_KEY = re.compile(
    r"(^|[._-])(secrets?|passwords?|passwd|token|credentials?|access_key|api_?key|auth|"
    r"private_key|signature|sig)($|[._-])"
)
# A URL, up to the first character that cannot be part of one in a message or a command line.
URL = re.compile(r"[A-Za-z][A-Za-z0-9+.-]*://[^\s'\"<>]+")
# `name=value` in a query string, a command line or a message; the value is secret when the
# name is (see SECRET_KEY).
ASSIGNMENT = re.compile(r"(?P<name>[A-Za-z0-9_.-]+)=(?P<value>[^\s&#'\"]*)")
REDACTED = "***"


def flatten(values: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """{"optim": {"lr": 1}} -> {"optim.lr": 1}: one level, dotted keys as on a command line."""
    flat: dict[str, Any] = {}
    for key, value in values.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            flat.update(flatten(value, f"{name}."))
        else:
            flat[name] = value
    return flat


def unflatten(flat: Mapping[str, Any], section: str) -> dict[str, Any]:
    """Section `section` of a `flatten`ed config, nested again: {"data.split": 1,
    "data.components.code.weight": 2}, "data" -> {"split": 1, "components": {"code": {"weight": 2}}}."""
    nested: dict[str, Any] = {}
    for key, value in flat.items():
        if not key.startswith(f"{section}."):
            continue
        *parents, leaf = key[len(section) + 1 :].split(".")
        node = nested
        for parent in parents:
            node = node.setdefault(parent, {})
        node[leaf] = value
    return nested


def redact(values: Mapping[str, Any]) -> dict[str, Any]:
    """A copy of `values` (nested or flat) with the value of every key that names a secret
    (`SECRET_KEY`) replaced by "***", and every string value passed through `redact_text`, at
    any depth. Used wherever a config leaves the process: checkpoint manifests and experiment
    tracking."""
    redacted: dict[str, Any] = {}
    for key, value in values.items():
        if SECRET_KEY.search(str(key).lower()):
            redacted[key] = REDACTED
        else:
            redacted[key] = _redact_value(value)
    return redacted


def redact_text(text: str) -> str:
    """`text` with every secret it carries replaced by "***": a URL's password or lone user
    name (`http://user:***@host`, `https://***@host`; the password may hold "@"), and the value
    of every `name=value` whose name names a secret (`?token=***`, `storage.secret_key=***`).
    Used for whatever is printed, logged or written of a value that may hold one."""
    return ASSIGNMENT.sub(_redact_assignment, URL.sub(_redact_url, text))


def _redact_url(match: re.Match) -> str:
    scheme, rest = match.group(0).split("://", 1)
    end = min((rest.find(c) for c in "/?#" if c in rest), default=len(rest))
    authority, tail = rest[:end], rest[end:]
    if "@" in authority:
        userinfo, host = authority.rsplit("@", 1)
        user, colon, _ = userinfo.partition(":")
        authority = f"{user}:{REDACTED}@{host}" if colon else f"{REDACTED}@{host}"
    return f"{scheme}://{authority}{tail}"


def _redact_assignment(match: re.Match) -> str:
    name = match.group("name")
    if SECRET_KEY.search(name.lower()) and match.group("value"):
        return f"{name}={REDACTED}"
    return match.group(0)


def _redact_value(value: Any) -> Any:
    if isinstance(value, Mapping):
        return redact(value)
    if isinstance(value, str):
        return redact_text(value)
    if isinstance(value, list | tuple):
        return type(value)(_redact_value(item) for item in value)
    return value
