"""Configuration: YAML in, frozen typed settings out.

The file has two top-level sections, both from the specification: ``gateway:``
(docs/requirements.md §7, camelCase keys) and ``rate_limiting:`` (docs/requirements.md §9,
docs/original-router.md §8, snake_case keys, as the original Router wrote them). Python attributes are snake_case everywhere.

Every setting is one dataclass field whose metadata names its YAML key and the parser
that checks it, so adding a key is one line::

    read_timeout: float = _key("readTimeout", DURATION, "10s")

The default is written in YAML form and goes through the same parser when the class is
defined, so the defaults are themselves a valid configuration. A section class may define
``_finish(self, path)`` for checks that span several keys (``tls.enabled`` needs a
certificate) and for values filled in at load time (``nodeId`` from the host name).

Why PyYAML: it is the long-maintained YAML library for Python, its ``safe_load`` builds
only plain scalars, lists and dicts (no object construction from tags), and YAML is far
too large a grammar to hand-write a parser for. It speaks YAML 1.1, so unquoted
``yes``/``no``/``on``/``off`` are booleans; the string parsers say so in their errors.

Strictness: a value must already have the right YAML type (``port: "8080"`` is an error,
``enabled: "yes"`` is an error). The one exception is text produced by ``${VAR}``
substitution: an environment variable is always a string, so ``port: ${PORT}`` is
converted to the field's type (int, bool, list of strings split on commas).

Errors are ``ConfigError(path, reason)`` where path is the dotted YAML path of the
offending key, e.g. ``rate_limiting.for_instance.rules[1].max_requests``; the CLI turns
them into exit code 2 before anything listens.
"""
from __future__ import annotations

import dataclasses
import difflib
import math
import os
import re
import socket
from collections.abc import Callable, Iterator, Mapping
from dataclasses import MISSING, dataclass, field
from fractions import Fraction
from typing import Any, TypeVar
from urllib.parse import urlsplit

import yaml

from .files import read_regular
from .valkey import parse_address

__all__ = [
    "ConfigError", "load_config", "load_config_text", "default_settings",
    "parse_duration", "parse_size", "effective_config", "dump_effective",
    "Settings", "GatewaySettings", "NodeSettings", "FleetSettings", "HttpSettings",
    "HttpTlsSettings",
    "TransportsSettings", "TcpTransportSettings", "TlsTransportSettings",
    "RoutingSettings", "ServiceRoutingSettings", "OutlierDetectionSettings",
    "AuthSettings", "AuthRateLimitSettings", "OpenApiSettings",
    "HealthSettings", "LoggingSettings", "MetricsSettings", "AdminSettings",
    "RateLimitingSettings", "RateLimitRule", "InstanceLimitSettings",
    "EnvironmentLimitSettings", "CircuitBreakerSettings", "MicroserviceLimitSettings",
    "RouteLimitSettings", "PlanSettings", "PlanEnvironmentLimitSettings",
    "PlanMicroserviceLimitSettings", "PlanRouteLimitSettings", "TenantLimitSettings", "FrozenMap",
]

MASK = "********"


class ConfigError(Exception):
    """A configuration problem, located by the dotted YAML path of the key at fault.

    ``path`` is ``"<file>"`` when the file cannot be read or is not valid YAML, and
    ``"<root>"`` when the document is not a mapping. ``source`` names the file (or
    ``"<string>"``) and is not part of ``str()``, which is ``"{path}: {reason}"``.
    """

    def __init__(self, path: str, reason: str, source: str | None = None) -> None:
        super().__init__(path, reason)
        self.path = path
        self.reason = reason
        self.source = source

    def __str__(self) -> str:
        return f"{self.path}: {self.reason}"


# --------------------------------------------------------------------------- durations/sizes

_NUMBER = r"(?:\d+(?:\.\d*)?|\.\d+)"
_DURATION_UNITS = {"ms": Fraction(1, 1000), "s": Fraction(1), "m": Fraction(60),
                   "h": Fraction(3600)}
# Longest unit first so "ms" is not read as "m" followed by garbage.
_DURATION_PART = re.compile(rf"\s*({_NUMBER})\s*(ms|s|m|h)", re.IGNORECASE)
_DURATION_HELP = "use a number with a unit: 500ms, 30s, 5m, 1h, 1m30s (a bare number is seconds)"


def parse_duration(value: Any) -> float:
    """Seconds from ``"30s"``, ``"500ms"``, ``"5m"``, ``"1h"``, ``"1m30s"`` or a plain number."""
    if isinstance(value, bool):
        raise ValueError(f"expected a duration, got {_describe(value)}; {_DURATION_HELP}")
    if isinstance(value, (int, float)):
        seconds = value
    elif isinstance(value, str):
        text = value.strip()
        if text.startswith("-"):
            raise ValueError(f"duration {value!r} is negative")
        if re.fullmatch(_NUMBER, text):
            seconds = Fraction(text)
        else:
            seconds, pos = Fraction(0), 0
            for match in _DURATION_PART.finditer(text):
                if match.start() != pos:
                    break
                seconds += Fraction(match[1]) * _DURATION_UNITS[match[2].lower()]
                pos = match.end()
            if not text or pos != len(text):
                raise ValueError(f"invalid duration {value!r}: {_DURATION_HELP}")
    else:
        raise ValueError(f"expected a duration, got {_describe(value)}; {_DURATION_HELP}")
    seconds = float(seconds)
    if not math.isfinite(seconds) or seconds < 0:
        raise ValueError(f"duration {value!r} must be a finite number of seconds >= 0")
    return seconds


# Binary multiples for KB/MB/GB as nginx reads k/m/g: "16KB" is 16384 bytes.
_SIZE_UNITS = {"": 1, "b": 1,
               "k": 1 << 10, "kb": 1 << 10, "kib": 1 << 10,
               "m": 1 << 20, "mb": 1 << 20, "mib": 1 << 20,
               "g": 1 << 30, "gb": 1 << 30, "gib": 1 << 30}
_SIZE_RE = re.compile(rf"({_NUMBER})\s*([a-z]*)", re.IGNORECASE)
_SIZE_HELP = "use bytes or a unit: 512B, 16KB, 100MB, 1GB (KB/MB/GB are 1024-based, KiB/MiB/GiB too)"


def parse_size(value: Any) -> int:
    """Bytes from ``"512B"``, ``"16KB"``, ``"64KiB"``, ``"100MB"``, ``"1GB"`` or a plain int."""
    if isinstance(value, bool) or not isinstance(value, (int, str)):
        raise ValueError(f"expected a size, got {_describe(value)}; {_SIZE_HELP}")
    if isinstance(value, int):
        size = value
    else:
        text = value.strip()
        if text.startswith("-"):
            raise ValueError(f"size {value!r} is negative")
        match = _SIZE_RE.fullmatch(text)
        unit = match and _SIZE_UNITS.get(match[2].lower())
        if not unit:
            raise ValueError(f"invalid size {value!r}: {_SIZE_HELP}")
        exact = Fraction(match[1]) * unit
        if exact.denominator != 1:
            raise ValueError(f"size {value!r} is not a whole number of bytes")
        size = int(exact)
    if size < 0:
        raise ValueError(f"size {value!r} is negative")
    return size


def _format_duration(seconds: float) -> str | float:
    if seconds.is_integer():
        whole = int(seconds)
        for unit, length in (("h", 3600), ("m", 60)):
            if whole and whole % length == 0:
                return f"{whole // length}{unit}"
        return f"{whole}s"
    millis = round(seconds * 1000)
    # Only when it parses back to the very same float; otherwise plain seconds.
    return f"{millis}ms" if millis / 1000 == seconds else seconds


def _format_size(size: int) -> str | int:
    for unit, length in (("GB", 1 << 30), ("MB", 1 << 20), ("KB", 1 << 10)):
        if size and size % length == 0:
            return f"{size // length}{unit}"
    return size


def _format_seconds(seconds: float) -> int | float:
    return int(seconds) if seconds.is_integer() else seconds


# --------------------------------------------------------------------------- value parsers
# A parser is called as parser(value, path) and returns the typed value. Scalar parsers
# raise ValueError (the caller adds the path); container parsers raise ConfigError
# themselves because they know the paths of their items.

Parser = Callable[[Any, str], Any]


class _FromEnv(str):
    """A string that came out of ${VAR} substitution, so it may be coerced to the field's type."""
    __slots__ = ()


def _describe(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return f"the boolean {str(value).lower()}"
    if isinstance(value, (int, float)):
        return f"the number {value!r}"
    if isinstance(value, str):
        return f"the string {str(value)!r}"
    if isinstance(value, list):
        return "a list"
    if isinstance(value, dict):
        return "a mapping"
    return f"a {type(value).__name__} ({value!r})"


def _check_range(value: Any, low: Any, high: Any) -> None:
    if (low is None or value >= low) and (high is None or value <= high):
        return
    if low is not None and high is not None:
        raise ValueError(f"must be between {low} and {high}, got {value}")
    if low is not None:
        raise ValueError(f"must be at least {low}, got {value}")
    raise ValueError(f"must be at most {high}, got {value}")


# The largest count or limit any integer key takes unless it names its own bound: the
# Cython codecs and the kernel read these as C ints / int64s, and a value past 2**31-1
# passed check-config and then raised OverflowError or ValueError in the supervisor or a
# worker (backlog, maxConnections, maxHeaderCount, rate-limit rules: window.pyx).
MAX_INTEGER = (1 << 31) - 1
# Sizes unless a key names its own bound: 1 TiB. Larger ones overflowed Py_ssize_t fields
# of the HTTP codec (maxHeaderBytes, and the window minBodyRate x bodyReadTimeout) and
# made every client connection fail at run time.
MAX_SIZE = 1 << 40
# Durations: at most a year. A timer of 1e30 s overflows C integers in the event loop and
# the codecs (bodyReadTimeout x minBodyRate, tcpKeepAlive); "never" is 0 where a key says so.
MAX_DURATION = 365 * 24 * 3600
# And, when not 0, at least a millisecond: shorter ones became 0 in millisecond fields
# (heartbeat_interval_ms sent to services: a heartbeat busy loop) or timers firing at once.
MIN_DURATION = 0.001


def _integer(low: int | None = None, high: int | None = None) -> Parser:
    def parse(value: Any, path: str) -> int:
        if isinstance(value, _FromEnv):
            try:
                value = int(value.strip(), 10)
            except ValueError:
                raise ValueError(f"expected an integer, the environment gave {str(value)!r}") from None
        elif isinstance(value, bool) or not isinstance(value, int):
            hint = " (remove the quotes)" if isinstance(value, str) and value.strip().isdigit() else ""
            raise ValueError(f"expected an integer, got {_describe(value)}{hint}")
        _check_range(value, low, high)
        if high is None and value > MAX_INTEGER:
            raise ValueError(f"must be at most {MAX_INTEGER}, got {value}")
        return value
    return parse


_ENV_BOOLEANS = {"true": True, "yes": True, "on": True, "1": True,
                 "false": False, "no": False, "off": False, "0": False}


def _boolean(value: Any, path: str) -> bool:
    if isinstance(value, _FromEnv) and value.strip().lower() in _ENV_BOOLEANS:
        return _ENV_BOOLEANS[value.strip().lower()]
    if not isinstance(value, bool):
        raise ValueError(f"expected true or false, got {_describe(value)}")
    return value


def _string(check: Callable[[str], str] | None = None, *, non_empty: bool = False) -> Parser:
    def parse(value: Any, path: str) -> str:
        if not isinstance(value, str):
            hint = ""
            if isinstance(value, bool):
                hint = " (YAML 1.1 reads unquoted yes/no/on/off as booleans: quote the value)"
            elif isinstance(value, (int, float)):
                hint = " (quote it)"
            elif value is None:
                hint = ' (write "" for an empty value)'
            raise ValueError(f"expected a string, got {_describe(value)}{hint}")
        text = str(value)  # drops the _FromEnv marker
        if non_empty and not text.strip():
            raise ValueError("must not be empty")
        return check(text) if check else text
    return parse


def _choice(*choices: str) -> Parser:
    by_lower = {c.lower(): c for c in choices}
    as_string = _string()

    def parse(value: Any, path: str) -> str:
        text = as_string(value, path)
        try:
            return by_lower[text.strip().lower()]
        except KeyError:
            raise ValueError(f"must be one of {', '.join(choices)}; got {text!r}"
                             + _suggestion(text, choices)) from None
    return parse


def _tls_version(value: Any, path: str) -> str:
    # `minVersion: 1.3` unquoted is a YAML float; it is still plainly a version.
    if isinstance(value, float) and value in (1.2, 1.3):
        value = str(value)
    return _choice("1.2", "1.3")(value, path)


def _duration(*, positive: bool = False, high: float = MAX_DURATION) -> Parser:
    def parse(value: Any, path: str) -> float:
        seconds = parse_duration(value)
        if positive and seconds <= 0:
            raise ValueError(f"must be greater than 0, got {value!r}")
        if 0 < seconds < MIN_DURATION:
            raise ValueError(f"must be {'' if positive else '0 or '}at least 1ms, got {value!r}")
        if seconds > high:
            raise ValueError(f"must be at most {_format_duration(float(high))}, got {value!r}")
        return seconds
    return parse


def _size(low: int = 0, high: int | None = None) -> Parser:
    def parse(value: Any, path: str) -> int:
        size = parse_size(value)
        _check_range(size, low, high)
        if high is None and size > MAX_SIZE:
            raise ValueError(f"must be at most 1TB ({MAX_SIZE} bytes), got {size}")
        return size
    return parse


def _apply(parser: Parser, value: Any, path: str) -> Any:
    try:
        return parser(value, path)
    except ValueError as exc:
        raise ConfigError(path, str(exc)) from None


def _list_of(item: Parser, *, split_env: bool = False) -> Parser:
    def parse(value: Any, path: str) -> tuple:
        if value is None:
            return ()
        if split_env and isinstance(value, _FromEnv):
            # "${REGIONS}" can only give a string; a comma list is the usual shell form.
            value = [_FromEnv(part.strip()) for part in value.split(",") if part.strip()]
        if not isinstance(value, (list, tuple)):
            raise ValueError(f"expected a list, got {_describe(value)}")
        return tuple(_apply(item, v, f"{path}[{i}]") for i, v in enumerate(value))
    return parse


_V = TypeVar("_V")


class FrozenMap(Mapping[str, _V]):
    """A read-only name -> section mapping.

    Not types.MappingProxyType: that cannot be pickled (settings may be handed to worker
    processes) and has no hash, which would make the frozen settings unhashable.
    """
    __slots__ = ("_items", "_hash")

    def __init__(self, items: Mapping[str, _V] | None = None) -> None:
        self._items = dict(items or {})
        self._hash: int | None = None

    def __getitem__(self, name: str) -> _V:
        return self._items[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self._items)

    def __len__(self) -> int:
        return len(self._items)

    def __hash__(self) -> int:
        if self._hash is None:
            self._hash = hash(frozenset(self._items.items()))
        return self._hash

    def __reduce__(self) -> tuple:
        return FrozenMap, (self._items,)

    def __repr__(self) -> str:
        return f"FrozenMap({self._items!r})"


def _mapping_of(item: Parser) -> Parser:
    def parse(value: Any, path: str) -> FrozenMap:
        if value is None:
            return FrozenMap()
        if not isinstance(value, dict):
            raise ValueError(f"expected a mapping of names, got {_describe(value)}")
        items = {}
        for name, v in value.items():
            if not isinstance(name, str) or not name:
                raise ConfigError(f"{path}.{name}", "names must be non-empty strings (quote it)")
            items[name] = _apply(item, v, f"{path}.{name}")
        return FrozenMap(items)
    return parse


def _section_of(cls: type, *, optional: bool = False) -> Parser:
    def parse(value: Any, path: str) -> Any:
        if optional and value is None:
            return None
        return _load_section(cls, value, path)
    return parse


# --------------------------------------------------------------------------- field helpers

def _key(yaml_name: str, parser: Parser, default: Any = MISSING, *, secret: bool = False,
         dump: Callable[[Any], Any] | None = None) -> Any:
    """One setting. ``default`` is in YAML form and is parsed here, once."""
    meta = {"yaml": yaml_name, "parse": parser, "secret": secret, "dump": dump}
    if default is MISSING:
        return field(metadata=meta)
    return field(default=parser(default, f"<default of {yaml_name}>"), metadata=meta)


def _section(yaml_name: str, cls: type, *, optional: bool = False) -> Any:
    """A nested section; when absent it still goes through its _finish (defaults filled)."""
    meta = {"yaml": yaml_name, "parse": _section_of(cls, optional=optional), "secret": False,
            "dump": None, "always_parse": not optional}
    if optional:
        return field(default=None, metadata=meta)
    return field(default_factory=cls, metadata=meta)


def _join(path: str, name: str) -> str:
    return f"{path}.{name}" if path else name


def _suggestion(word: str, allowed: Any) -> str:
    allowed = list(allowed)

    def squash(s: str) -> str:
        return s.replace("_", "").replace("-", "").lower()
    # camelCase vs snake_case is the commonest slip between the two sections.
    same = [a for a in allowed if squash(a) == squash(word)]
    close = same or difflib.get_close_matches(word, allowed, n=1, cutoff=0.6)
    return f"; did you mean {close[0]!r}?" if close else ""


def _load_section(cls: type, raw: Any, path: str) -> Any:
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ConfigError(path or "<root>", f"expected a mapping, got {_describe(raw)}")
    by_yaml = {f.metadata["yaml"]: f for f in dataclasses.fields(cls)}
    for name in raw:
        if name not in by_yaml:
            where = "top-level key" if not path else "key"
            raise ConfigError(
                _join(path, str(name)),
                f"unknown {where}{_suggestion(str(name), by_yaml)} "
                f"(allowed here: {', '.join(by_yaml)})")
    values = {}
    for name, f in by_yaml.items():
        child = _join(path, name)
        if name in raw:
            values[f.name] = _apply(f.metadata["parse"], raw[name], child)
        elif f.metadata.get("always_parse"):
            values[f.name] = _apply(f.metadata["parse"], None, child)
        elif f.default is MISSING and f.default_factory is MISSING:
            raise ConfigError(child, "required key is missing")
    section = cls(**values)
    finish = getattr(section, "_finish", None)
    return finish(path) if finish else section


_settings = dataclass(frozen=True, slots=True, kw_only=True)


# --------------------------------------------------------------------------- checks

def _thumbprint(value: Any, path: str) -> str:
    text = _string()(value, path)
    # Certificate viewers print "AB:CD:..." or "AB CD ..."; we compare bare lowercase hex.
    hexits = re.sub(r"[\s:]", "", text).lower()
    if not re.fullmatch(r"[0-9a-f]*", hexits) or len(hexits) not in (40, 64):
        raise ValueError(f"{text!r} is not a SHA-1 (40 hex digits) or SHA-256 (64 hex digits) "
                         f"certificate thumbprint")
    return hexits


# As _HOST_NAME, without the wildcard, and with `_` (docker compose service names).
_URL_LABEL = r"[a-z0-9_](?:[a-z0-9_-]{0,61}[a-z0-9_])?"
_URL_HOST = re.compile(rf"^{_URL_LABEL}(?:\.{_URL_LABEL})*\.?$")


def _url_host(parts, text: str) -> None:
    """The host of an origin or issuer URL must be one a client can name: urlsplit takes
    "https://gw ex.com", a non-ASCII name or port 0, and DPoP's `htu` then never matched
    (every proof refused) or the Authority's keys were never fetched (every token 401)."""
    import ipaddress
    try:
        ipaddress.ip_address(parts.hostname)
    except ValueError:
        if not _URL_HOST.match(parts.hostname):
            raise ValueError(f"{text!r}: {parts.hostname!r} is not a host name or IP address "
                             f"(an internationalised name is written in its xn-- form)") from None
    if parts.port == 0 or any(c.isspace() or ord(c) < 0x20 for c in text):
        raise ValueError(f"{text!r}: port 0, whitespace or a control character in a URL")


def _origin(text: str) -> str:
    if not text:
        return text
    parts = urlsplit(text)
    parts.port  # noqa: B018 -- raises ValueError for a port out of range
    if (parts.scheme not in ("http", "https") or not parts.hostname or parts.username
            or parts.password or parts.path not in ("", "/") or parts.query or parts.fragment):
        raise ValueError(f"must be an absolute http(s) origin such as https://gw.example.com "
                         f"(no path, query or credentials), got {text!r}")
    _url_host(parts, text)
    # Normalised as RFC 3986 §6.2.3 says, so DPoP `htu` comparisons can be plain string ones.
    host = parts.hostname if ":" not in parts.hostname else f"[{parts.hostname}]"
    default_port = 443 if parts.scheme == "https" else 80
    port = f":{parts.port}" if parts.port not in (None, default_port) else ""
    return f"{parts.scheme}://{host}{port}"


def _cidr(value: Any, path: str) -> str:
    import ipaddress
    text = _string(non_empty=True)(value, path).strip()
    try:
        network = ipaddress.ip_network(text, strict=False)
    except ValueError:
        raise ValueError(f"{text!r} is not an IP address or network (CIDR)") from None
    # "10.0.0.7/8" was read as 10.0.0.0/8: a typo for one proxy's address trusted a whole
    # network's X-Forwarded-For without a word. Which one was meant is the operator's call.
    if "/" in text and network.network_address != ipaddress.ip_interface(text).ip:
        raise ValueError(f"{text!r} has host bits set: write the network ({network}) or the "
                         f"one address ({text.split('/')[0]})")
    return str(network)


_HOST_LABEL = r"[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?"
_HOST_NAME = re.compile(rf"^(?:\*\.)?{_HOST_LABEL}(?:\.{_HOST_LABEL})*$")


def _allowed_host(value: Any, path: str) -> str:
    """A host name ("api.example.com"), its subdomains ("*.example.com"), or an IP address;
    lowercase, no port, an IPv6 address in brackets (as a Host field writes it)."""
    import ipaddress
    text = _string(non_empty=True)(value, path).strip().lower().rstrip(".")
    try:
        ip = ipaddress.ip_address(text.strip("[]"))
    except ValueError:
        if not _HOST_NAME.match(text) or len(text) > 253:
            raise ValueError(f"{text!r} is not a host name, *.domain or IP address "
                             f"(no scheme, port or path)") from None
        return text
    return f"[{ip}]" if ip.version == 6 else str(ip)


def _listen_host(text: str) -> str:
    """An address to bind (IP literal or a name the host resolves); resolved when binding,
    where a failure names the key. Refused here what can never be one: a NUL made the
    socket layer raise TypeError (a traceback at start), and an IPv6 literal in brackets
    is a URL's spelling, not getaddrinfo's."""
    if any(c.isspace() or ord(c) < 0x20 or ord(c) == 0x7F for c in text):
        raise ValueError(f"{text!r} is not an address to listen on: it contains whitespace or a "
                         f"control character")
    if text.startswith("["):
        raise ValueError(f"{text!r}: write an IPv6 address without brackets ({text.strip('[]')})")
    return text


def _optional_header_name(text: str) -> str:
    if text and not _TOKEN.match(text):
        raise ValueError(f"{text!r} is not a header field name (RFC 9110 token)")
    return text.lower()


def _path_prefix(text: str) -> str:
    if not text.startswith("/"):
        raise ValueError("must start with '/'")
    return text


_TOKEN = re.compile(r"^[!#$%&'*+.^_`|~0-9A-Za-z-]+$")


def _header_name(value: Any, path: str) -> str:
    text = _string(non_empty=True)(value, path).strip()
    if not _TOKEN.match(text):
        raise ValueError(f"{text!r} is not a header field name (RFC 9110 token)")
    return text.lower()


def _connection_string(text: str) -> str:
    # Read here as the Valkey client will read it, so a bad option, port or cluster form
    # stops the configuration naming its key, not the gateway's start with a traceback.
    if text.strip():
        try:
            parse_address(text)
        except OSError as exc:          # a TLS file named in the URL
            raise ValueError(f"cannot read {exc.filename or 'a TLS file'}: "
                             f"{exc.strerror or exc}") from None
    return text


def _check_certificate(section: Any, path: str) -> None:
    if not section.enabled:
        return
    if not section.certificate_path:
        raise ConfigError(_join(path, "certificatePath"), "required when enabled is true")
    if not section.certificate_path.lower().endswith((".pfx", ".p12")) and not section.key_path:
        raise ConfigError(_join(path, "keyPath"),
                          "required with a PEM certificate (only a .pfx/.p12 bundle carries its key)")


# Parsers, named for how they read in the declarations below.
PORT = _integer(0, 65535)
COUNT = _integer(1)
NON_NEGATIVE = _integer(0)
BOOL = _boolean
STRING = _string()
DURATION = _duration()
POSITIVE_DURATION = _duration(positive=True)
CLIENT_CERTIFICATE_MODE = _choice("NoCertificate", "AllowCertificate", "RequireCertificate")


def _seconds_key(yaml_name: str, default: Any, *, positive: bool = True) -> Any:
    """A ``...Seconds`` key: a number of seconds (durations accepted), dumped as a number."""
    return _key(yaml_name, _duration(positive=positive), default, dump=_format_seconds)


def _duration_key(yaml_name: str, default: Any, *, positive: bool = False,
                  high: float = MAX_DURATION) -> Any:
    return _key(yaml_name, _duration(positive=positive, high=high), default,
                dump=_format_duration)


def _size_key(yaml_name: str, default: Any, *, low: int = 0, high: int | None = None) -> Any:
    return _key(yaml_name, _size(low, high), default, dump=_format_size)


# --------------------------------------------------------------------------- gateway:

@_settings
class FleetSettings:
    """gateway.node.fleet: what the other gateway pods route, shared through Valkey, so a
    new pod is not ready (and answers 503, not 404) until the services they route have
    dialled it too (docs/operations.md, "A new pod: the fleet view")."""
    # Its own key, not the rate limiter's or the replay cache's: it only works when the
    # services can find a pod that is not ready yet (deploy/kubernetes/service.yaml), so it
    # must never be switched on by configuring something else.
    valkey: str = _key("valkey", _string(_connection_string), "", secret=True)
    publish_interval: float = _duration_key("publishInterval", "5s", positive=True)
    entry_ttl: float = _duration_key("entryTtl", "20s", positive=True)
    warmup_timeout: float = _duration_key("warmupTimeout", "45s")
    timeout: float = _duration_key("timeout", "500ms", positive=True)

    def _finish(self, path: str) -> FleetSettings:
        if self.entry_ttl <= self.publish_interval:
            raise ConfigError(_join(path, "entryTtl"),
                              f"must be longer than publishInterval "
                              f"({_format_duration(self.publish_interval)}), or a live pod's "
                              f"entry expires between two of its publishes")
        return self


@_settings
class NodeSettings:
    region: str = _key("region", _string(non_empty=True), "local")
    node_id: str = _key("nodeId", STRING, "")
    environment: str = _key("environment", _string(non_empty=True), "dev")
    workers: int = _key("workers", _integer(0, 256), 1)
    # SIGTERM: readiness fails at once, the listeners close only this much later, so load
    # balancers and kube-proxy stop sending before connections are refused (docs/operations.md).
    pre_stop_delay: float = _duration_key("preStopDelay", "2s")
    # A restarted worker takes no client connection before the service instances its
    # siblings know have reached it, or this long (no 404 window after a restart).
    warmup_timeout: float = _duration_key("warmupTimeout", "5s")
    # With several workers: one whose event loop has not turned for this long is killed and
    # restarted by the supervisor (stellagw/watchdog.py). 0 = never.
    worker_stall_timeout: float = _duration_key("workerStallTimeout", "15s")
    fleet: FleetSettings = _section("fleet", FleetSettings)

    def _finish(self, path: str) -> NodeSettings:
        # Resolved here so every consumer (and check-config) sees the real values.
        return dataclasses.replace(
            self,
            node_id=self.node_id or socket.gethostname(),
            workers=self.workers or os.cpu_count() or 1)


@_settings
class HttpTlsSettings:
    enabled: bool = _key("enabled", BOOL, False)
    certificate_path: str = _key("certificatePath", STRING, "")
    key_path: str = _key("keyPath", STRING, "")
    certificate_password: str = _key("certificatePassword", STRING, "", secret=True)
    client_certificate_mode: str = _key("clientCertificateMode", CLIENT_CERTIFICATE_MODE,
                                        "AllowCertificate")
    client_ca_path: str = _key("clientCaPath", STRING, "")
    min_version: str = _key("minVersion", _tls_version, "1.2")

    def _finish(self, path: str) -> HttpTlsSettings:
        _check_certificate(self, path)
        return self


@_settings
class HttpSettings:
    host: str = _key("host", _string(_listen_host, non_empty=True), "127.0.0.1")
    port: int = _key("port", PORT, 8080)
    public_origin: str = _key("publicOrigin", _string(_origin), "")
    max_connections: int = _key("maxConnections", COUNT, 10000)
    # One client address holds at most this many of a worker's connections (WebSockets
    # included), so a single host cannot take every one: 0 = no cap. A trusted proxy's own
    # connections are not counted (many clients each); behind the PROXY protocol, its
    # source address is (docs/http-edge.md, "Client address").
    max_connections_per_client: int = _key("maxConnectionsPerClient", NON_NEGATIVE, 1000)
    max_header_bytes: int = _size_key("maxHeaderBytes", "16KB", low=1)
    max_header_count: int = _key("maxHeaderCount", COUNT, 100)
    max_url_length: int = _key("maxUrlLength", COUNT, 8192)
    header_read_timeout: float = _duration_key("headerReadTimeout", "10s", positive=True)
    keep_alive_timeout: float = _duration_key("keepAliveTimeout", "75s")
    # A body must bring minBodyRate bytes/s over every bodyReadTimeout window (slow uploads
    # that never stop are a slowloris of their own; docs/http-edge.md).
    body_read_timeout: float = _duration_key("bodyReadTimeout", "10s", positive=True)
    # At most 1GB/s: the window's bytes (rate x bodyReadTimeout) are a C Py_ssize_t.
    min_body_rate: int = _size_key("minBodyRate", "1KB", high=1 << 30)
    # A client owed bytes that takes none of them for this long is cut (RST): closing
    # alone would wait for a buffer that a client reading nothing never drains
    # (docs/http-edge.md, "What one connection can hold").
    send_timeout: float = _duration_key("sendTimeout", "60s", positive=True)
    # ... and one that takes less than minSendRate bytes/s over a sendTimeout window: a slow
    # read (a window's worth now and then) would hold the connection and its buffers for ever.
    min_send_rate: int = _size_key("minSendRate", "256B", high=1 << 30)
    # The most a worker holds, summed over its client connections paused for writing, of
    # answers their clients have not taken: past it the one owing the most is reset. A
    # whole RESPONSE goes to the client's buffer at once (up to maxFrameSize), and a client
    # reading minSendRate keeps it for hours (docs/http-edge.md, "What one connection can
    # hold").
    response_buffer_budget: int = _size_key("responseBufferBudget", "256MB", low=1024 * 1024)
    # The client's address behind load balancers (docs/http-edge.md, "Client address"):
    # X-Forwarded-For / Forwarded believed only from these networks; the PROXY protocol
    # header required at the start of every client connection.
    trusted_proxies: tuple[str, ...] = _key("trustedProxies", _list_of(_cidr, split_env=True), [])
    proxy_protocol: str = _key("proxyProtocol", _choice("off", "v1", "v2", "any"), "off")
    # The host names clients may ask for (Host, or an absolute-form target's authority):
    # others get 421. Empty: any valid host, forwarded as X-Forwarded-Host as it came.
    allowed_hosts: tuple[str, ...] = _key("allowedHosts", _list_of(_allowed_host, split_env=True),
                                          [])
    # A client's own request id header taken as the correlation id when no X-Correlation-Id
    # came (e.g. "X-Request-Id"); empty: only X-Correlation-Id.
    request_id_header: str = _key("requestIdHeader", _string(_optional_header_name), "")
    # Request headers a client must never choose (docs/http-edge.md): dropped on the way in.
    strip_request_headers: tuple[str, ...] = _key(
        "stripRequestHeaders", _list_of(_header_name, split_env=True),
        ["x-real-ip", "true-client-ip", "x-client-ip", "cf-connecting-ip", "fastly-client-ip",
         "x-cluster-client-ip", "x-http-method-override", "x-http-method",
         "x-method-override", "x-original-url", "x-rewrite-url"])
    shutdown_timeout: float = _duration_key("shutdownTimeout", "30s")
    backlog: int = _key("backlog", COUNT, 2048)
    # TCP keep-alive on client connections: idle time before the kernel's first probe
    # (listeners.keep_alive); a client gone without a FIN is found and its connection
    # closed. 0 = off.
    # At most 32767 s: Linux's TCP_KEEPIDLE limit (setsockopt refuses more, per connection).
    tcp_keep_alive: float = _duration_key("tcpKeepAlive", "60s", high=32767)
    tls: HttpTlsSettings = _section("tls", HttpTlsSettings)


def _registration_secret(text: str) -> str:
    if text and len(text) < 32:
        raise ValueError("must be at least 32 characters (or empty: then only loopback peers "
                         "may register over tcp)")
    return text


_SERVICE_PATTERN = re.compile(r"^[A-Za-z0-9._*-]{1,64}$")


def _service_pattern(text: str) -> str:
    if not _SERVICE_PATTERN.match(text):
        raise ValueError(f"{text!r} is not a service name pattern (1-64 of A-Z a-z 0-9 . _ - "
                         f"and * for any run of them)")
    return text


_IDENTITY_HELP = ("must be cn:<subject common name>, dns:<subjectAltName DNS name> or "
                  "sha256:<certificate thumbprint>")


def _certificate_identity(name: Any, path: str) -> str:
    kind, _, value = str(name).partition(":")
    kind = kind.strip().lower()
    value = value.strip()
    if kind == "sha256":
        # Written as certificate viewers print them ("AB:CD:..."); compared as bare hex.
        value = re.sub(r"[\s:]", "", value).lower()
        if not re.fullmatch(r"[0-9a-f]{64}", value):
            raise ConfigError(path, f"{name!r} is not a SHA-256 thumbprint (64 hex digits)")
    elif kind == "dns":
        value = value.lower()
    elif kind != "cn":
        raise ConfigError(path, _IDENTITY_HELP)
    if not value:
        raise ConfigError(path, _IDENTITY_HELP)
    return f"{kind}:{value}"


def _service_identities(value: Any, path: str) -> FrozenMap:
    if value is None:
        return FrozenMap()
    if not isinstance(value, dict):
        raise ValueError(f"expected a mapping of certificate names to lists of service names, "
                         f"got {_describe(value)}")
    items = {}
    for name, allowed in value.items():
        where = f"{path}.{name}"
        key = _certificate_identity(name, where)
        if key in items:
            raise ConfigError(where, f"the same certificate name as another entry ({key})")
        items[key] = _apply(_non_empty_list(_string(_service_pattern)), allowed, where)
    return FrozenMap(items)


@_settings
class TcpTransportSettings:
    enabled: bool = _key("enabled", BOOL, True)
    host: str = _key("host", _string(_listen_host, non_empty=True), "127.0.0.1")
    port: int = _key("port", PORT, 9100)
    max_connections: int = _key("maxConnections", COUNT, 1000)
    # Socket options (SO_RCVBUF/SO_SNDBUF) are C ints.
    receive_buffer_size: int = _size_key("receiveBufferSize", 65536, low=1, high=MAX_INTEGER)
    send_buffer_size: int = _size_key("sendBufferSize", 65536, low=1, high=MAX_INTEGER)
    # The frame length field is a 32-bit unsigned integer (docs/design.md §3).
    max_frame_size: int = _size_key("maxFrameSize", "16MB", low=64, high=0xFFFFFFFF)
    # Before its HELLO is accepted a peer is nobody: what it may make us hold is this, not
    # maxFrameSize (its HELLO is read whole to check its signature).
    max_hello_size: int = _size_key("maxHelloSize", "1MB", low=64, high=0xFFFFFFFF)
    # What the registrations of one service (its HELLOs and ENDPOINTS_UPDATEs, over all its
    # links to a worker, identical content counted once) may make a worker hold: parsed,
    # a registration takes 15-30 times its bytes, and 40 links of one service with 1 MB
    # HELLOs took 1.1 GB.
    max_service_registration_size: int = _size_key("maxServiceRegistrationSize", "32MB",
                                                   low=1024, high=0xFFFFFFFF)
    # The same over every service registered through this listener's kind: one peer with
    # a link per service name (maxConnections of them, 1 MB HELLOs) took ~15 MB a link.
    max_registration_size: int = _size_key("maxRegistrationSize", "64MB",
                                           low=1024, high=0xFFFFFFFF)
    # Who may register (docs/service-identity.md): HELLOs signed with a key derived from
    # this; empty = loopback peers only on tcp.
    registration_secret: str = _key("registrationSecret", _string(_registration_secret), "",
                                    secret=True)
    registration_max_clock_skew: float = _duration_key("registrationMaxClockSkew", "60s",
                                                       positive=True)
    # A link with no frame for health.heartbeatTimeoutSeconds (Unhealthy) plus this is closed.
    dead_link_grace: float = _duration_key("deadLinkGrace", "30s")
    # Past the high-water mark a link that does not read gets no PONGs; past the limit it
    # is closed: a service that stops reading cannot grow our memory without bound.
    write_buffer_high_water: int = _size_key("writeBufferHighWater", "1MB", low=1)
    write_buffer_limit: int = _size_key("writeBufferLimit", "16MB", low=1)

    def _finish(self, path: str) -> TcpTransportSettings:
        if self.write_buffer_limit < self.write_buffer_high_water:
            raise ConfigError(_join(path, "writeBufferLimit"),
                              f"must be at least writeBufferHighWater "
                              f"({_format_size(self.write_buffer_high_water)})")
        return self


@_settings
class TlsTransportSettings(TcpTransportSettings):
    enabled: bool = _key("enabled", BOOL, False)
    port: int = _key("port", PORT, 9443)
    certificate_path: str = _key("certificatePath", STRING, "")
    key_path: str = _key("keyPath", STRING, "")
    certificate_password: str = _key("certificatePassword", STRING, "", secret=True)
    client_certificate_mode: str = _key("clientCertificateMode", CLIENT_CERTIFICATE_MODE,
                                        "RequireCertificate")
    client_ca_path: str = _key("clientCaPath", STRING, "")
    allowed_client_certificate_thumbprints: tuple[str, ...] = _key(
        "allowedClientCertificateThumbprints", _list_of(_thumbprint, split_env=True), [])
    # Certificate name (cn:/dns:/sha256:) -> the service names it may register.
    service_identities: FrozenMap = _key("serviceIdentities", _service_identities, {})

    def _finish(self, path: str) -> TlsTransportSettings:
        _check_certificate(self, path)
        if self.enabled and self.service_identities and (
                self.client_certificate_mode == "NoCertificate" or not self.client_ca_path):
            raise ConfigError(_join(path, "serviceIdentities"),
                              "maps client certificates, so they must be asked for and "
                              "verified: set clientCertificateMode (RequireCertificate) and "
                              "clientCaPath")
        return TcpTransportSettings._finish(self, path)


@_settings
class TransportsSettings:
    tcp: TcpTransportSettings = _section("tcp", TcpTransportSettings)
    tls: TlsTransportSettings = _section("tls", TlsTransportSettings)
    # Bytes the worker keeps for requests waiting for a link over writeBufferHighWater (each
    # its head and the body read so far), over all its links; past it a request that would
    # wait is answered 503 at once. At least a few requests with a 64 KiB body each.
    held_request_budget: int = _size_key("heldRequestBudget", "64MB", low=256 * 1024)


# As services register them (routing/state.py): weights name versions the same way.
_SEMVER = re.compile(r"^(0|[1-9]\d*)\.(0|[1-9]\d*)\.(0|[1-9]\d*)(?:-[0-9A-Za-z.-]+)?(?:\+[0-9A-Za-z.-]+)?$")
_SERVICE_NAME = re.compile(r"^[A-Za-z0-9._-]{1,64}$")
_STICKY_HELP = "must be identity, tenant, header:<name> or cookie:<name>"


def _sticky_key(text: str) -> str:
    kind, sep, name = text.strip().partition(":")
    kind = kind.strip().lower()
    if not sep and kind in ("identity", "tenant"):
        return kind
    if sep and kind in ("header", "cookie"):
        name = name.strip()
        if not _TOKEN.match(name):
            raise ValueError(f"{name!r} is not a {kind} name (an RFC 9110 token)")
        # Header names are case-insensitive, cookie names are not (RFC 6265 §5.3).
        return f"{kind}:{name.lower() if kind == 'header' else name}"
    raise ValueError(f"{_STICKY_HELP}; got {text!r}")


def _optional_sticky_key(text: str) -> str:
    return _sticky_key(text) if text.strip() else ""


def _version_weights(value: Any, path: str) -> FrozenMap:
    if value is None:
        return FrozenMap()
    if not isinstance(value, dict):
        raise ValueError(f'expected a mapping of versions to weights, e.g. {{"1.2.0": 90, '
                         f'"1.3.0": 10}}, got {_describe(value)}')
    items = {}
    for version, weight in value.items():
        where = f"{path}.{version}"
        if not isinstance(version, str) or not _SEMVER.match(version):
            raise ConfigError(where, f"{version!r} is not a version as services register "
                                     f"them (MAJOR.MINOR.PATCH; quote it)")
        items[version] = _apply(_integer(0, 1_000_000), weight, where)
    if items and not any(items.values()):
        raise ValueError("every weight is 0: at least one version must take the traffic")
    return FrozenMap(items)


@_settings
class ServiceRoutingSettings:
    """gateway.routing.services.<name> (docs/selection.md "Versions")."""
    # Unpinned requests split across these versions in proportion; none: the newest
    # version, ramped in over versionRamp.
    weights: FrozenMap[int] = _key("weights", _version_weights, {})
    # "" = gateway.routing.stickyKey.
    sticky_key: str = _key("stickyKey", _string(_optional_sticky_key), "")


@_settings
class OutlierDetectionSettings:
    """gateway.routing.outlierDetection (docs/selection.md "Outlier ejection")."""
    # 5xx answers and timeouts in a row that take an instance out of selection; 0 = off.
    consecutive_errors: int = _key("consecutiveErrors", NON_NEGATIVE, 5)
    base_ejection_time: float = _duration_key("baseEjectionTime", "30s", positive=True)
    max_ejection_time: float = _duration_key("maxEjectionTime", "5m", positive=True)
    max_ejection_percent: int = _key("maxEjectionPercent", _integer(0, 100), 50)

    def _finish(self, path: str) -> OutlierDetectionSettings:
        if self.max_ejection_time < self.base_ejection_time:
            raise ConfigError(_join(path, "maxEjectionTime"),
                              f"must be at least baseEjectionTime "
                              f"({_format_duration(self.base_ejection_time)}): it caps the "
                              f"interval that grows from it")
        return self


@_settings
class RoutingSettings:
    # At most 1h, as an endpoint's own timeout (routing/state.py): it travels in the REQUEST
    # frame as 32-bit milliseconds, and 8760h made every request a 500 ("timeout_ms out of
    # range") after check-config had passed it.
    default_timeout: float = _duration_key("defaultTimeout", "30s", positive=True, high=3600)
    # A streamed response (or a request body still streaming beside it) that moves no byte
    # either way for this long is ended: CANCEL to the service, the client cut.
    stream_idle_timeout: float = _duration_key("streamIdleTimeout", "5m", positive=True)
    max_request_body_size: int = _size_key("maxRequestBodySize", "100MB")
    # A service's response head (its header lines as the client would get them) past this
    # is a 502: what the gateway writes to a client and to the proxies in front of it stays
    # within what they accept (Envoy's max_response_headers_kb is 60 KiB).
    max_response_header_bytes: int = _size_key("maxResponseHeaderBytes", "64KB", low=1024)
    streaming_enabled: bool = _key("streamingEnabled", BOOL, True)
    streaming_buffer_size: int = _size_key("streamingBufferSize", 16384, low=1)
    neighbor_regions: tuple[str, ...] = _key(
        "neighborRegions", _list_of(_string(non_empty=True), split_env=True), [])
    # How long a service stays known (its routes answer 503, not 404) after its last
    # instance left a worker; 0 = never forgotten (docs/selection.md).
    service_expiry: float = _duration_key("serviceExpiry", "10m")
    # Templates of different services that some request matches both (/users/{id} and
    # another's /users/me) are refused at registration, else the more specific one takes
    # the other service's requests (docs/routing.md).
    allow_overlapping_services: bool = _key("allowOverlappingServices", BOOL, False)
    # A new version's share of unpinned traffic grows from 0 to all of it over this long,
    # so a bad release meets a few clients first; 0 = at once (docs/selection.md).
    version_ramp: float = _duration_key("versionRamp", "60s")
    # What keeps one client on one version while versions split the traffic.
    sticky_key: str = _key("stickyKey", _string(_sticky_key), "identity")
    services: FrozenMap[ServiceRoutingSettings] = _key(
        "services", _mapping_of(_section_of(ServiceRoutingSettings)), {})
    outlier_detection: OutlierDetectionSettings = _section("outlierDetection",
                                                           OutlierDetectionSettings)

    def _finish(self, path: str) -> RoutingSettings:
        for name in self.services:
            if not _SERVICE_NAME.match(name):
                raise ConfigError(_join(path, f"services.{name}"),
                                  "not a service name (1-64 of A-Z a-z 0-9 . _ -, as services "
                                  "register them)")
        return self


@_settings
class AuthRateLimitSettings:
    enabled: bool = _key("enabled", BOOL, False)
    requests_per_minute: int = _key("requestsPerMinute", COUNT, 1000)
    burst_size: int = _key("burstSize", NON_NEGATIVE, 100)
    redis_connection_string: str = _key("redisConnectionString", _string(_connection_string),
                                        "", secret=True)


# JWS algorithms the gateway verifies (RFC 7518 §3.1 asymmetric ones; EdDSA per RFC 8037).
# HMAC (HS*) and "none" are refused by name: a shared secret can never be a JWKS key, and
# letting a token pick a MAC is the classic key-confusion hole (RFC 8725 §2.1, §3.1).
JWS_ASYMMETRIC_ALGORITHMS = ("ES256", "ES384", "ES512", "RS256", "RS384", "RS512",
                             "PS256", "PS384", "PS512", "EdDSA")


def _jws_algorithm(value: Any, path: str) -> str:
    text = _string(non_empty=True)(value, path).strip()
    if text.lower() == "none":
        raise ValueError('"none" (unsigned tokens) is never accepted')
    if text.upper().startswith("HS"):
        raise ValueError(f"{text} is a MAC algorithm (shared secret); only asymmetric "
                         f"algorithms are accepted: {', '.join(JWS_ASYMMETRIC_ALGORITHMS)}")
    if text not in JWS_ASYMMETRIC_ALGORITHMS:
        raise ValueError(f"unsupported algorithm {text!r}; use one of "
                         f"{', '.join(JWS_ASYMMETRIC_ALGORITHMS)}"
                         + _suggestion(text, JWS_ASYMMETRIC_ALGORITHMS))
    return text


def _non_empty_list(item: Parser) -> Parser:
    as_list = _list_of(item, split_env=True)

    def parse(value: Any, path: str) -> tuple:
        items = as_list(value, path)
        if not items:
            raise ValueError("must list at least one value")
        return tuple(dict.fromkeys(items))   # duplicates dropped, order kept
    return parse


_LOOPBACK_HOSTS = ("localhost", "127.0.0.1", "::1")


def _issuer_url(text: str) -> str:
    if not text:
        return text
    parts = urlsplit(text)
    parts.port  # noqa: B018 -- raises ValueError for a port out of range
    if (parts.scheme not in ("http", "https") or not parts.hostname or parts.username
            or parts.password or parts.query or parts.fragment):
        raise ValueError(f"must be the Authority's issuer URL, e.g. https://authority.example.com "
                         f"(no query, fragment or credentials), got {text!r}")
    _url_host(parts, text)
    # Keys fetched over plain HTTP could be swapped by anyone on the path; loopback only
    # (the development Authority).
    if parts.scheme == "http" and parts.hostname not in _LOOPBACK_HOSTS:
        raise ValueError(f"must use https (http is accepted for loopback only), got {text!r}")
    return text


def _nonce_secret(text: str) -> str:
    if text and len(text) < 32:
        raise ValueError("must be at least 32 characters (or empty for a random per-instance secret)")
    return text


@_settings
class AuthDpopNonceSettings:
    enabled: bool = _key("enabled", BOOL, False)
    secret: str = _key("secret", _string(_nonce_secret), "", secret=True)
    lifetime: float = _duration_key("lifetime", "300s", positive=True)


@_settings
class AuthReplayCacheSettings:
    valkey: str = _key("valkey", _string(_connection_string), "", secret=True)
    on_valkey_error: str = _key("onValkeyError", _choice("reject", "local"), "local")
    # At most 2**24: the table is ≥ 32 bytes per entry in shared memory made before the
    # workers fork (2**24 is 512 MiB); 2**31-1 asked for 64 GiB and stopped the start with
    # "Cannot allocate memory" and no key.
    max_entries: int = _key("maxEntries", _integer(1, 1 << 24), 100000)
    timeout: float = _duration_key("timeout", "250ms", positive=True)


@_settings
class AuthSettings:
    dpop_enabled: bool = _key("dpopEnabled", BOOL, True)
    dpop_max_clock_skew: float = _duration_key("dpopMaxClockSkew", "60s")
    mtls_enabled: bool = _key("mtlsEnabled", BOOL, True)
    rate_limiting: AuthRateLimitSettings = _section("rateLimiting", AuthRateLimitSettings)
    # Access tokens and DPoP (docs/auth.md).
    required: bool = _key("required", BOOL, False)
    authority: str = _key("authority", _string(_issuer_url), "")
    jwks_path: str = _key("jwksPath", STRING, "")
    keys_fetch_timeout: float = _duration_key("keysFetchTimeout", "5s", positive=True)
    audiences: tuple[str, ...] = _key("audiences", _non_empty_list(_string(non_empty=True)),
                                      ["stellaops-gateway"])
    algorithms: tuple[str, ...] = _key("algorithms", _non_empty_list(_jws_algorithm),
                                       ["ES256", "RS256", "PS256", "EdDSA"])
    require_at_jwt_typ: bool = _key("requireAtJwtTyp", BOOL, False)
    max_token_lifetime: float = _duration_key("maxTokenLifetime", "1h", positive=True)
    keys_refresh_interval: float = _duration_key("keysRefreshInterval", "5m", positive=True)
    keys_min_refetch_interval: float = _duration_key("keysMinRefetchInterval", "30s")
    max_token_bytes: int = _size_key("maxTokenBytes", 8192, low=1024, high=1 << 20)
    dpop_nonce: AuthDpopNonceSettings = _section("dpopNonce", AuthDpopNonceSettings)
    replay_cache: AuthReplayCacheSettings = _section("replayCache", AuthReplayCacheSettings)
    # Refuse Bearer tokens without a DPoP or mTLS binding everywhere (an endpoint can ask
    # for the same in its HELLO: docs/auth.md).
    require_sender_constraint: bool = _key("requireSenderConstraint", BOOL, False)
    enable_legacy_headers: bool = _key("enableLegacyHeaders", BOOL, True)
    allow_scope_header: bool = _key("allowScopeHeader", BOOL, False)

    def _finish(self, path: str) -> AuthSettings:
        if self.jwks_path and not self.authority:
            raise ConfigError(_join(path, "authority"),
                              "required with jwksPath: it is the issuer (`iss`) tokens must name")
        if self.required and not (self.authority or self.jwks_path):
            raise ConfigError(_join(path, "authority"),
                              "required is true, so tokens must be verifiable: set the Authority's "
                              "issuer URL (and jwksPath for a static key file)")
        return self


@_settings
class OpenApiSettings:
    enabled: bool = _key("enabled", BOOL, True)
    cache_ttl_seconds: float = _seconds_key("cacheTtlSeconds", 300, positive=False)
    title: str = _key("title", STRING, "Stella Ops API")
    version: str = _key("version", _string(non_empty=True), "1.0.0")


def _required_service(text: str) -> str:
    if not _SERVICE_NAME.match(text):
        raise ValueError(f"{text!r} is not a service name (1-64 of A-Z a-z 0-9 . _ -, as services "
                         f"register them)")
    return text


@_settings
class HealthSettings:
    heartbeat_interval_seconds: float = _seconds_key("heartbeatIntervalSeconds", 10)
    heartbeat_timeout_seconds: float = _seconds_key("heartbeatTimeoutSeconds", 30)
    degraded_after_seconds: float = _seconds_key("degradedAfterSeconds", 15)
    check_interval_seconds: float = _seconds_key("checkIntervalSeconds", 5)
    unhealthy_threshold: int = _key("unhealthyThreshold", COUNT, 3)
    # Service names as services register them: one no service can have kept /health/ready
    # at 503 for ever.
    required_services: tuple = _key(
        "requiredServices", _list_of(_string(_required_service), split_env=True), [])

    def _finish(self, path: str) -> HealthSettings:
        # Past the timeout an instance is Unhealthy, so a later Degraded mark would never show.
        if self.degraded_after_seconds > self.heartbeat_timeout_seconds:
            raise ConfigError(_join(path, "degradedAfterSeconds"),
                              f"must not exceed heartbeatTimeoutSeconds "
                              f"({_format_seconds(self.heartbeat_timeout_seconds)})")
        return self


@_settings
class LoggingSettings:
    level: str = _key("level", _choice("debug", "info", "warning", "error"), "info")
    access_log: bool = _key("accessLog", BOOL, True)


@_settings
class MetricsSettings:
    enabled: bool = _key("enabled", BOOL, True)


@_settings
class TracingSettings:
    enabled: bool = _key("enabled", BOOL, False)
    service_name: str = _key("serviceName", STRING, "stellagw")
    exporter: str = _key("exporter", _choice("otlp", "console", "none"), "otlp")
    otlp_endpoint: str = _key("otlpEndpoint", STRING, "")

    def _finish(self, path: str) -> TracingSettings:
        # Checked here, not when a worker starts: a missing exporter then stops start-up
        # (and check-config) with exit 2 and the key, instead of killing each worker.
        if self.enabled:
            from .observe.tracing import unavailable
            problem = unavailable(self.exporter)
            if problem is not None:
                raise ConfigError(_join(path, problem[0]), problem[1])
        return self


PUBLIC_ENDPOINTS = ("live", "ready", "startup", "metrics", "openapi", "details")


@_settings
class AdminSettings:
    """The operator's listener: probes, /metrics, readiness details, OpenAPI (docs/operations.md)."""
    enabled: bool = _key("enabled", BOOL, True)
    host: str = _key("host", _string(_listen_host, non_empty=True), "127.0.0.1")
    # 0 = a free port, named in the `listening` line. A fixed default would make every second
    # gateway on a host (and every test gateway) refuse to start over a port nobody chose.
    port: int = _key("port", PORT, 0)
    # Its own cap, so probes are never refused because clients filled gateway.http's.
    max_connections: int = _key("maxConnections", COUNT, 64)
    # What the client listener serves of the built-ins; `ready`/`startup` there answer the
    # status only unless `details` is listed too. `all`: everything, as before there was an
    # admin listener (development, tests).
    public_endpoints: tuple[str, ...] = _key(
        "publicEndpoints", _list_of(_choice(*PUBLIC_ENDPOINTS, "all"), split_env=True),
        ["live", "ready", "startup"])


def _overlap(host_a: str, host_b: str) -> bool:
    wildcard = ("0.0.0.0", "::", "")
    return host_a == host_b or host_a in wildcard or host_b in wildcard


def _method(text: str) -> str:
    # Written into Access-Control-Allow-Methods as it is: a method is an RFC 9110 token.
    if not _TOKEN.match(text):
        raise ValueError(f"{text!r} is not an HTTP method (an RFC 9110 token, e.g. GET)")
    return text


def _origin_or_star(text: str) -> str:
    return text if text == "*" else _origin(text)


_CORS_HEADERS = ["authorization", "content-type", "dpop", "x-correlation-id"]
_CORS_EXPOSE = ["x-correlation-id", "www-authenticate", "dpop-nonce", "retry-after",
                "x-ratelimit-limit", "x-ratelimit-remaining", "x-ratelimit-reset"]


def _check_cors(section, path: str):
    if section.allow_credentials and "*" in section.allow_origins:
        raise ConfigError(_join(path, "allowOrigins"),
                          '"*" cannot go with allowCredentials: list the origins')
    return section


@_settings
class CorsRouteSettings:
    """A per-path override of the CORS policy (the first matching prefix wins)."""
    path_prefix: str = _key("pathPrefix", _string(_path_prefix))
    allow_origins: tuple[str, ...] = _key("allowOrigins", _list_of(_string(_origin_or_star)), [])
    allow_methods: tuple[str, ...] = _key("allowMethods", _list_of(_string(_method)), [])
    allow_headers: tuple[str, ...] = _key("allowHeaders", _list_of(_header_name), _CORS_HEADERS)
    expose_headers: tuple[str, ...] = _key("exposeHeaders", _list_of(_header_name), _CORS_EXPOSE)
    allow_credentials: bool = _key("allowCredentials", BOOL, False)
    max_age: float = _duration_key("maxAge", "10m")

    def _finish(self, path: str):
        return _check_cors(self, path)


@_settings
class CorsSettings:
    """gateway.cors (docs/http-edge.md "CORS"): off while allowOrigins is empty."""
    allow_origins: tuple[str, ...] = _key("allowOrigins", _list_of(_string(_origin_or_star)), [])
    allow_methods: tuple[str, ...] = _key("allowMethods", _list_of(_string(_method)), [])
    allow_headers: tuple[str, ...] = _key("allowHeaders", _list_of(_header_name), _CORS_HEADERS)
    expose_headers: tuple[str, ...] = _key("exposeHeaders", _list_of(_header_name), _CORS_EXPOSE)
    allow_credentials: bool = _key("allowCredentials", BOOL, False)
    max_age: float = _duration_key("maxAge", "10m")
    routes: tuple[CorsRouteSettings, ...] = _key("routes", _list_of(_section_of(CorsRouteSettings)), [])

    @property
    def enabled(self) -> bool:
        return bool(self.allow_origins) or any(r.allow_origins for r in self.routes)

    def _finish(self, path: str):
        return _check_cors(self, path)


@_settings
class CompressionSettings:
    """gateway.compression: gzip of service answers (the OpenAPI documents always)."""
    enabled: bool = _key("enabled", BOOL, False)
    min_size: int = _size_key("minSize", "1KB")
    level: int = _key("level", _integer(1, 9), 5)
    types: tuple[str, ...] = _key("types", _list_of(_string(non_empty=True)),
                                  ["application/json", "application/problem+json",
                                   "application/xml", "application/javascript",
                                   "application/yaml", "image/svg+xml", "text/"])


@_settings
class RetrySettings:
    """gateway.retries (docs/selection.md "Retries")."""
    enabled: bool = _key("enabled", BOOL, True)
    budget_percent: int = _key("budgetPercent", _integer(0, 100), 20)
    min_retries_per_second: int = _key("minRetriesPerSecond", _integer(0), 3)


@_settings
class GatewaySettings:
    node: NodeSettings = _section("node", NodeSettings)
    http: HttpSettings = _section("http", HttpSettings)
    admin: AdminSettings = _section("admin", AdminSettings)
    transports: TransportsSettings = _section("transports", TransportsSettings)
    routing: RoutingSettings = _section("routing", RoutingSettings)
    auth: AuthSettings = _section("auth", AuthSettings)
    openapi: OpenApiSettings = _section("openapi", OpenApiSettings)
    health: HealthSettings = _section("health", HealthSettings)
    logging: LoggingSettings = _section("logging", LoggingSettings)
    metrics: MetricsSettings = _section("metrics", MetricsSettings)
    tracing: TracingSettings = _section("tracing", TracingSettings)
    cors: CorsSettings = _section("cors", CorsSettings)
    compression: CompressionSettings = _section("compression", CompressionSettings)
    retries: RetrySettings = _section("retries", RetrySettings)

    def _finish(self, path: str) -> GatewaySettings:
        # Two of our own listeners on one port would be refused at start as "address in
        # use" with nobody else there; say which keys collide instead.
        listeners = [("http.port", self.http.host, self.http.port)]
        if self.admin.enabled:
            listeners.append(("admin.port", self.admin.host, self.admin.port))
        for kind in ("tcp", "tls"):
            node = getattr(self.transports, kind)
            if node.enabled:
                listeners.append((f"transports.{kind}.port", node.host, node.port))
        for i, (key, host, port) in enumerate(listeners):
            for other, other_host, other_port in listeners[:i]:
                if port and port == other_port and _overlap(host, other_host):
                    raise ConfigError(_join(path, key),
                                      f"{port} is also {_join(path, other)}: each listener "
                                      f"needs its own port")
        return self


# --------------------------------------------------------------------------- rate_limiting:

@_settings
class RateLimitRule:
    max_requests: int = _key("max_requests", COUNT)
    per_seconds: int = _key("per_seconds", COUNT)


RULES = _list_of(_section_of(RateLimitRule))
# WindowLimiter's per-rule scratch lives on the C stack (cext/window.pyx C_MAX_RULES).
MAX_INSTANCE_RULES = 16


def _rule_paths(section: Any, path: str) -> Iterator[tuple[str, tuple[RateLimitRule, ...]]]:
    yield _join(path, "rules"), section.rules
    yield _join(path, "tenant_rules"), section.tenant_rules


_NESTED_REPEAT_HELP = (
    "an unbounded repeat inside another, as in (a+)+ or (/[^/]+)*: a request path can make "
    "matching take exponential time (\"/api/\" + 35 a's kept a worker's loop for minutes); "
    "make the inner repeat possessive ([^/]++) or atomic ((?>...)), or rewrite the pattern")


def _nested_repeat(pattern: str) -> bool:
    """Whether an unbounded repeat holds another one that can backtrack (star height > 1),
    the classic catastrophic-backtracking shape. re.search runs on every request path of
    the route's service, and Python's re has no time limit. Possessive repeats and atomic
    groups give nothing back, so they end the search below them."""
    from re import _constants as c, _parser

    def walk(items, inside: bool) -> bool:
        for op, av in items:
            if op in (c.MAX_REPEAT, c.MIN_REPEAT):
                unbounded = av[1] == c.MAXREPEAT
                if (unbounded and inside) or walk(av[2], inside or unbounded):
                    return True
            elif op is c.SUBPATTERN and walk(av[3], inside):
                return True
            elif op is c.BRANCH and any(walk(branch, inside) for branch in av[1]):
                return True
            elif op in (c.ASSERT, c.ASSERT_NOT) and walk(av[1], inside):
                return True
            elif op is c.GROUPREF_EXISTS and any(walk(b, inside) for b in av[1:] if b):
                return True
            elif op in (c.POSSESSIVE_REPEAT, c.ATOMIC_GROUP):
                continue
        return False
    return walk(_parser.parse(pattern), False)


@_settings
class RouteLimitSettings:
    pattern: str = _key("pattern", _string(non_empty=True))
    match_type: str = _key("match_type", _choice("exact", "prefix", "regex"), "exact")
    rules: tuple[RateLimitRule, ...] = _key("rules", RULES, [])
    tenant_rules: tuple[RateLimitRule, ...] = _key("tenant_rules", RULES, [])

    def _finish(self, path: str) -> RouteLimitSettings:
        # docs/original-router.md §8: regex routes compile at startup and a bad one fails fast.
        if self.match_type == "regex":
            try:
                re.compile(self.pattern)
            except re.error as exc:
                raise ConfigError(_join(path, "pattern"), f"invalid regular expression: {exc}") from None
            if _nested_repeat(self.pattern):
                raise ConfigError(_join(path, "pattern"), _NESTED_REPEAT_HELP)
        return self


@_settings
class MicroserviceLimitSettings:
    rules: tuple[RateLimitRule, ...] = _key("rules", RULES, [])
    tenant_rules: tuple[RateLimitRule, ...] = _key("tenant_rules", RULES, [])
    routes: FrozenMap[RouteLimitSettings] = _key(
        "routes", _mapping_of(_section_of(RouteLimitSettings)), {})


@_settings
class CircuitBreakerSettings:
    failure_threshold: int = _key("failure_threshold", COUNT, 5)
    timeout_seconds: float = _seconds_key("timeout_seconds", 30)
    half_open_timeout: float = _seconds_key("half_open_timeout", 10)


@_settings
class EnvironmentLimitSettings:
    valkey_connection: str = _key("valkey_connection", _string(_connection_string), "",
                                  secret=True)
    valkey_bucket: str = _key("valkey_bucket", _string(non_empty=True), "stella-router-rate-limit")
    rules: tuple[RateLimitRule, ...] = _key("rules", RULES, [])
    tenant_rules: tuple[RateLimitRule, ...] = _key("tenant_rules", RULES, [])
    circuit_breaker: CircuitBreakerSettings = _section("circuit_breaker", CircuitBreakerSettings)
    microservices: FrozenMap[MicroserviceLimitSettings] = _key(
        "microservices", _mapping_of(_section_of(MicroserviceLimitSettings)), {})


@_settings
class InstanceLimitSettings:
    rules: tuple[RateLimitRule, ...] = _key("rules", RULES, [])
    tenant_rules: tuple[RateLimitRule, ...] = _key("tenant_rules", RULES, [])

    def _finish(self, path: str) -> InstanceLimitSettings:
        for where, rules in _rule_paths(self, path):
            if len(rules) > MAX_INSTANCE_RULES:
                raise ConfigError(where, f"at most {MAX_INSTANCE_RULES} rules, got {len(rules)}: "
                                         f"the instance tier checks every rule of a key in one "
                                         f"pass over a fixed-size table")
        return self


# A plan changes numbers, never shapes: which rules apply where, not which paths a route
# matches. So its route overrides name routes of rate_limiting.for_environment and carry
# only rules; every plan then resolves a request to the same route as the base does.

@_settings
class PlanRouteLimitSettings:
    rules: tuple[RateLimitRule, ...] = _key("rules", RULES, [])
    tenant_rules: tuple[RateLimitRule, ...] = _key("tenant_rules", RULES, [])


@_settings
class PlanMicroserviceLimitSettings:
    rules: tuple[RateLimitRule, ...] = _key("rules", RULES, [])
    tenant_rules: tuple[RateLimitRule, ...] = _key("tenant_rules", RULES, [])
    routes: FrozenMap[PlanRouteLimitSettings] = _key(
        "routes", _mapping_of(_section_of(PlanRouteLimitSettings)), {})


@_settings
class PlanEnvironmentLimitSettings:
    rules: tuple[RateLimitRule, ...] = _key("rules", RULES, [])
    tenant_rules: tuple[RateLimitRule, ...] = _key("tenant_rules", RULES, [])
    microservices: FrozenMap[PlanMicroserviceLimitSettings] = _key(
        "microservices", _mapping_of(_section_of(PlanMicroserviceLimitSettings)), {})


@_settings
class PlanSettings:
    for_instance: InstanceLimitSettings = _section("for_instance", InstanceLimitSettings)
    for_environment: PlanEnvironmentLimitSettings | None = _section(
        "for_environment", PlanEnvironmentLimitSettings, optional=True)


@_settings
class TenantLimitSettings:
    plan: str = _key("plan", _string(non_empty=True))


@_settings
class RateLimitingSettings:
    process_back_pressure_when_more_than_per_5min: int = _key(
        "process_back_pressure_when_more_than_per_5min", NON_NEGATIVE, 0)
    for_instance: InstanceLimitSettings = _section("for_instance", InstanceLimitSettings)
    for_environment: EnvironmentLimitSettings | None = _section(
        "for_environment", EnvironmentLimitSettings, optional=True)
    plans: FrozenMap[PlanSettings] = _key("plans", _mapping_of(_section_of(PlanSettings)), {})
    tenants: FrozenMap[TenantLimitSettings] = _key(
        "tenants", _mapping_of(_section_of(TenantLimitSettings)), {})

    def _finish(self, path: str) -> RateLimitingSettings:
        for tenant, entry in self.tenants.items():
            if entry.plan not in self.plans:
                known = ", ".join(self.plans) or "none"
                raise ConfigError(_join(path, f"tenants.{tenant}.plan"),
                                  f"no plan {entry.plan!r} in {_join(path, 'plans')}"
                                  f"{_suggestion(entry.plan, self.plans)} (plans: {known})")
        env = self.for_environment
        for name, plan in self.plans.items():
            where = _join(path, f"plans.{name}.for_environment")
            if plan.for_environment is None:
                continue
            if env is None:
                raise ConfigError(where, f"overrides rules of {_join(path, 'for_environment')}, "
                                         f"which is not configured")
            for service, svc in plan.for_environment.microservices.items():
                base = env.microservices.get(service)
                base_routes = base.routes if base is not None else {}
                for route in svc.routes:
                    if route not in base_routes:
                        raise ConfigError(
                            f"{where}.microservices.{service}.routes.{route}",
                            f"no route {route!r} in {_join(path, 'for_environment')}."
                            f"microservices.{service}.routes{_suggestion(route, base_routes)}; "
                            f"a plan changes the rules of a route, whose pattern stays where "
                            f"the route is defined")
        return self


@_settings
class Settings:
    gateway: GatewaySettings = _section("gateway", GatewaySettings)
    rate_limiting: RateLimitingSettings = _section("rate_limiting", RateLimitingSettings)


# --------------------------------------------------------------------------- ${VAR} substitution

_REFERENCE = re.compile(r"\$\$\{|\$\{([^}]*)\}")
_REFERENCE_BODY = re.compile(r"([A-Za-z_][A-Za-z0-9_]*)(?::-(.*))?", re.DOTALL)


def _substitute(text: str, env: Mapping[str, str], path: str) -> str:
    if "${" not in text:
        return text
    substituted = False

    def replace(match: re.Match[str]) -> str:
        nonlocal substituted
        if match[0] == "$${":
            return "${"
        body = _REFERENCE_BODY.fullmatch(match[1])
        if not body:
            raise ConfigError(path, f"malformed reference {match[0]!r}: "
                                    f"use ${{NAME}} or ${{NAME:-default}} ($${{ for a literal ${{)")
        name, default = body[1], body[2]
        substituted = True
        value = env.get(name)
        if value:
            return value
        if default is not None:  # shell ":-": the default also covers an empty variable
            return default
        if value is None:
            raise ConfigError(path, f"environment variable {name} is not set "
                                    f"(write ${{{name}:-default}} to give a default)")
        return value

    result = _REFERENCE.sub(replace, text)
    if "${" in _REFERENCE.sub("", text):  # an unterminated "${" the pattern did not consume
        raise ConfigError(path, f"unterminated ${{ in {text!r}")
    return _FromEnv(result) if substituted else result


def _substitute_tree(node: Any, env: Mapping[str, str], path: str) -> Any:
    # Values only: keys (service and route names) are never substituted.
    if isinstance(node, str):
        return _substitute(node, env, path)
    if isinstance(node, dict):
        return {k: _substitute_tree(v, env, _join(path, str(k))) for k, v in node.items()}
    if isinstance(node, list):
        return [_substitute_tree(v, env, f"{path}[{i}]") for i, v in enumerate(node)]
    return node


# --------------------------------------------------------------------------- loading

# Values a document may hold once its aliases are expanded. Expanding is what the loader
# does (_substitute_tree copies the tree): nine levels of ten aliases in 1 KB are 10^9
# values (a "billion laughs"), a recursive alias (`x: &a [*a]`) never ends — it raised
# RecursionError, which killed the supervisor on a SIGHUP and with it every worker.
MAX_CONFIG_VALUES = 100_000


def _expanded_size(node, sizes: dict, limit: int) -> int:
    """How many values `node` (a composed YAML node) holds with its aliases expanded, each
    shared node counted every time it is used; past `limit`, or for a node inside itself,
    ValueError. Linear in the distinct nodes: each one's size is computed once."""
    key = id(node)
    size = sizes.get(key)
    if size is not None:
        if size < 0:
            raise ValueError("a recursive alias (a node that contains itself)")
        return size
    sizes[key] = -1                     # being computed: met again below, it is a cycle
    size = 1
    if isinstance(node, yaml.SequenceNode):
        for item in node.value:
            size += _expanded_size(item, sizes, limit)
            if size > limit:
                break
    elif isinstance(node, yaml.MappingNode):
        for k, v in node.value:
            size += _expanded_size(k, sizes, limit) + _expanded_size(v, sizes, limit)
            if size > limit:
                break
    if size > limit:
        raise ValueError(f"more than {limit} values once its aliases are expanded")
    sizes[key] = size
    return size


# Numbers YAML 1.1 reads in another base: `0700` is 448, `010` is 8, `0x10` 16, `0b11` 3,
# `1:30` 90 (base 60). Each loaded as a number nobody wrote (`port: 0700` listened on 448).
_NOT_DECIMAL = re.compile(r"[-+]?(?:0[0-7_]+|0x[0-9a-fA-F_]+|0b[01_]+|[0-9][0-9_]*(?::[0-5]?[0-9])+(?:\.[0-9_]*)?)")


def _check_nodes(node, path: str, seen: set) -> None:
    """A key written twice in one mapping is an error naming it: PyYAML keeps the last one
    without a word, so `port: 8080` above a forgotten `port: 9090` started on 9090. So is a
    number in YAML 1.1's octal, hex, binary or base-60 form (_NOT_DECIMAL)."""
    if id(node) in seen:
        return
    seen.add(id(node))
    if isinstance(node, yaml.ScalarNode):
        if (node.tag in ("tag:yaml.org,2002:int", "tag:yaml.org,2002:float") and node.style is None
                and _NOT_DECIMAL.fullmatch(node.value)):
            number = yaml.safe_load(node.value)
            raise ConfigError(path or "<root>",
                              f"YAML 1.1 reads {node.value} as the number {number} (octal, hex, "
                              f"binary or base 60): write {number} if that number is meant (quote it for text)")
    elif isinstance(node, yaml.SequenceNode):
        for i, item in enumerate(node.value):
            _check_nodes(item, f"{path}[{i}]", seen)
    elif isinstance(node, yaml.MappingNode):
        lines: dict[str, int] = {}
        for k, v in node.value:
            if isinstance(k, yaml.ScalarNode) and k.tag != "tag:yaml.org,2002:merge":
                line = k.start_mark.line + 1
                if k.value in lines:
                    raise ConfigError(_join(path, k.value),
                                      f"given twice in one mapping (lines {lines[k.value]} and "
                                      f"{line}); YAML would keep only the last: remove one")
                lines[k.value] = line
                _check_nodes(v, _join(path, k.value), seen)
            else:
                _check_nodes(v, path, seen)


def _safe_load(text: str):
    """yaml.safe_load, refusing documents whose aliases expand too far (or for ever), and
    keys given twice in one mapping."""
    loader = yaml.SafeLoader(text)
    try:
        node = loader.get_single_node()
        if node is None:
            return None
        _expanded_size(node, {}, MAX_CONFIG_VALUES)
        _check_nodes(node, "", set())
        return loader.construct_document(node)
    finally:
        loader.dispose()


def load_config_text(text: str, env: Mapping[str, str] | None = None,
                     source: str = "<string>") -> Settings:
    """Parse and check a YAML document; raises ConfigError naming the key at fault."""
    try:
        raw = _safe_load(text)
    except ConfigError as exc:
        exc.source = source
        raise
    except (ValueError, RecursionError) as exc:
        raise ConfigError("<file>", f"invalid YAML in {source}: {exc or 'nested too deeply'}",
                          source) from None
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = exc.problem or exc.context or "syntax error"
        raise ConfigError("<file>", f"invalid YAML in {source}{where}: {problem}", source) from None
    except yaml.YAMLError as exc:
        raise ConfigError("<file>", f"invalid YAML in {source}: {exc}", source) from None
    if raw is not None and not isinstance(raw, dict):
        raise ConfigError("<root>", f"expected a mapping with 'gateway' and/or 'rate_limiting', "
                                    f"got {_describe(raw)}", source)
    try:
        raw = _substitute_tree(raw or {}, os.environ if env is None else env, "")
        return _load_section(Settings, raw, "")
    except ConfigError as exc:
        exc.source = source
        raise


def load_config(path: str | os.PathLike[str], env: Mapping[str, str] | None = None) -> Settings:
    """Load a YAML configuration file; raises ConfigError (path "<file>" when unreadable)."""
    name = os.fspath(path)
    try:
        text = read_regular(name).decode("utf-8")
    except OSError as exc:
        raise ConfigError("<file>", f"cannot read {name}: {exc.strerror or exc}", name) from None
    except UnicodeDecodeError as exc:
        raise ConfigError("<file>", f"{name} is not UTF-8 text ({exc.reason} at byte {exc.start})",
                          name) from None
    return load_config_text(text, env, source=name)


def default_settings() -> Settings:
    """The settings of an empty configuration file."""
    return load_config_text("", env={}, source="<defaults>")


# --------------------------------------------------------------------------- effective config

_URL_PASSWORD = re.compile(r"(?P<head>[A-Za-z][A-Za-z0-9+.-]*://[^:/@\s]*:)(?P<password>[^@/\s]+)(?=@)")


def _mask_url_password(text: str) -> str:
    return _URL_PASSWORD.sub(lambda m: m["head"] + MASK, text)


def _dump_value(value: Any, fmt: Callable[[Any], Any] | None, mask: bool) -> Any:
    if dataclasses.is_dataclass(value):
        return _dump_section(value, mask)
    if isinstance(value, tuple):
        return [_dump_value(v, fmt, mask) for v in value]
    if isinstance(value, Mapping):
        return {k: _dump_value(v, fmt, mask) for k, v in value.items()}
    if fmt is not None:
        return fmt(value)
    if mask and isinstance(value, str):
        return _mask_url_password(value)
    return value


def _dump_section(section: Any, mask: bool) -> dict[str, Any]:
    out = {}
    for f in dataclasses.fields(section):
        value = getattr(section, f.name)
        if mask and f.metadata["secret"] and value:
            out[f.metadata["yaml"]] = MASK
        else:
            out[f.metadata["yaml"]] = _dump_value(value, f.metadata["dump"], mask)
    return out


def effective_config(settings: Settings, mask_secrets: bool = True) -> dict[str, Any]:
    """Every setting as a YAML-shaped dict under the original key names.

    Durations come out as "30s"/"500ms", sizes as "16KB"/"100MB" (or plain numbers when
    not a whole unit). With mask_secrets, non-empty secrets become "********" and so do
    passwords inside URLs in any other string.
    """
    return _dump_section(settings, mask_secrets)


def _escape_references(node: Any) -> Any:
    # The dump must load back to the same values, so a literal "${" is written "$${".
    if isinstance(node, str):
        return node.replace("${", "$${")
    if isinstance(node, dict):
        return {k: _escape_references(v) for k, v in node.items()}
    if isinstance(node, list):
        return [_escape_references(v) for v in node]
    return node


def dump_effective(settings: Settings) -> str:
    """YAML text of effective_config (secrets masked); what `stellagw check-config` prints."""
    return yaml.safe_dump(_escape_references(effective_config(settings)),
                          sort_keys=False, allow_unicode=True, default_flow_style=False)
