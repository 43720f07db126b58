"""pi-proxy: OpenAI- and Anthropic-compatible HTTP gateway over pi-ai.

Clients speak OpenAI Chat Completions, Anthropic Messages or OpenAI Responses to this server;
every request is answered by a short-lived `node bridge.mjs` process that calls
@mariozechner/pi-ai and prints its events as JSON lines.
Python owns HTTP, configuration, credentials and translation; the bridge only talks to pi-ai.

The file reads in the order data flows through it; a section uses only what comes before it:

   1. Configuration        flags and PI_PROXY_* environment variables
   2. Errors and helpers   ApiError, upstream failures -> HTTP statuses; request validation (and the DEBUG
                           log of fields not used), header checks
   3. pi's config files    models.json (JSON with comments), auth.json and its lock, resolving keys
   4. Model registry       pi-ai's catalogue merged with models.json; availability; name -> model
   5. Bridge               one `node bridge.mjs` per call: request, events, kill and reap
   6. Relay                the bridges' HTTP, sent upstream over pooled keep-alive connections
   7. Bridge pool          bridges started (and warmed) ahead of need; admission control; replaced, drained on shutdown
   8. pi messages          message builders, finish_context, extras -> upstream payload, Exchange (a request
                           translated), pi_events (the one shape of pi's events), replayed messages
   9. Remote images        images given by URL: fetched (PI_PROXY_REMOTE_IMAGES=1) from public addresses only
  10. OpenAI chat          one section per client API: request schema, request -> pi context, options and
  11. Anthropic messages   extras, pi events -> the API's stream (a translator: translate, fail), and the
  12. OpenAI responses     prepare function that makes a request an Exchange. Messages also: count_tokens'
  13. pi streamProxy       estimate, Claude model names; streamProxy: pi-agent-core's protocol
  14. Usage                a record per request: its log line, the totals behind GET /usage
  15. HTTP                 the Flask app: Proxy and Call, CLIENT_APIS (one row per client API) served by
                           one route and one SSE generator; a large request prepared in a child process;
                           authentication, client-disconnect detection
  16. Shutdown             SIGTERM: stop accepting, let requests finish for a grace period, end the rest
  17. Main                 command line (serve, login, logout, models) and the gevent server

Translation functions in sections 8 and 10-13 are pure: tests call them without HTTP or node.
tests/test_code_shape.py keeps the order: no section uses a name defined in a later one.
"""

if __name__ == "__main__":
    from gevent import monkey

    monkey.patch_all()

import argparse
import atexit
import base64
import binascii
import collections
import ctypes
import errno
import fcntl
import functools
import gc
import hmac
import io
import ipaddress
import itertools
import json
import logging
import math
import os
import pickle
import re
import resource
import secrets
import shutil
import signal
import socket
import ssl
import struct
import subprocess
import sys
import tempfile
import threading
import time
import traceback
import urllib.parse
import uuid
import zlib
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import certifi
import gevent
import gevent.event
import gevent.lock
import gevent.monkey
import gevent.os
import gevent.queue
import gevent.select
import gevent.server
import gevent.socket
import gevent.subprocess
import requests
import urllib3
from flask import Flask, Response, after_this_request, request
from gevent.pywsgi import Input, WSGIHandler, WSGIServer
from jsonschema import Draft202012Validator
from jsonschema.exceptions import best_match
from requests.adapters import HTTPAdapter
from werkzeug.exceptions import HTTPException
from werkzeug.wsgi import ClosingIterator

log = logging.getLogger("pi-proxy")
_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f\u2028\u2029]")


def one_line(record: logging.LogRecord) -> bool:
    """Every message logged here stays one line: control characters a client put into the names
    and values logged are escaped, so no client can forge log lines. Tracebacks keep their lines."""
    message = record.getMessage()
    if _CONTROL.search(message):
        record.msg, record.args = _CONTROL.sub(lambda found: repr(found.group())[1:-1], message), ()
    return True


log.addFilter(one_line)
HERE = Path(__file__).resolve().parent
BRIDGE_SCRIPT = HERE / "bridge.mjs"
BRIDGE_BUNDLE = HERE / "build" / "bridge.mjs"  # bridge.mjs and pi-ai in one build (`make install`)
BRIDGE_SOURCES = (BRIDGE_SCRIPT, HERE / "web-fetch.mjs")  # what the bundle is built from, pi-ai aside
STATUS_PAGE = HERE / "status.html"  # GET / from a browser: reads /usage (section 15)


# ==================================================================================================
# 1. Configuration
# ==================================================================================================


BRIDGE_MEMORY = 80 * 2**20  # a serving bridge's memory (67 MB measured), with some headroom
BRIDGES_PER_CORE = 32  # a bridge mostly waits for its upstream; its CPU goes to start-up and JSON lines


def default_max_bridges() -> int:
    """As many bridges as half the memory holds (the cgroup's limit, in a container), at most 32
    per core, at least 4."""
    memory = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    try:
        memory = min(memory, int(Path("/sys/fs/cgroup/memory.max").read_text()))
    except (OSError, ValueError):  # no cgroup v2, or "max"
        pass
    return max(4, min(memory // 2 // BRIDGE_MEMORY, BRIDGES_PER_CORE * len(os.sched_getaffinity(0))))


@dataclass
class Config:
    host: str = "127.0.0.1"
    port: int = 4141
    max_body_size: int = 52_428_800
    upstream_timeout_ms: int = 120_000
    agent_dir: Path = Path("~/.pi/agent").expanduser()
    auth_token: str | None = None  # clients must present it; None: no proxy authentication
    bridge_pool: int = 2
    bridge_warm_up: bool = True  # pooled bridges run each API's request path once before their request
    shutdown_grace_s: float = 8.0  # under `docker stop`'s 10 s before its SIGKILL
    # What one request may ask of the proxy (checked before schema validation: section 15)
    max_depth: int = 64  # nesting of arrays and objects in a request body
    max_messages: int = 100_000  # messages (Responses: input items) in one request
    max_tools: int = 5_000  # tools declared in one request
    max_json_values: int = 5_000_000  # values (array members and object fields) in one request body
    remote_images: bool = False  # fetch images given by http(s) URL (section 9)
    remote_image_max_bytes: int = 20_000_000  # per image, decompressed
    remote_image_max_count: int = 16  # images given by URL in one request
    remote_image_max_total_bytes: int = 50_000_000  # all of one request's fetched images, decompressed
    remote_image_timeout: float = 10.0  # seconds for all of one request's fetches, redirects included
    test_redirects: dict = field(default_factory=dict)  # tests only: {"https://origin": "http://127.0.0.1:port"}
    max_bridges: int = field(default_factory=default_max_bridges)  # bridges serving requests at once
    queue_size: int | None = None  # requests waiting for a bridge; None: 4 x max_bridges
    queue_timeout_s: float = 30.0  # how long a request waits for a bridge before it is refused
    client_header_timeout_s: float = 30.0  # a request's line and headers, from its first byte (or the accept)
    client_body_timeout_s: float = 60.0  # a request's whole body
    client_idle_timeout_s: float = 60.0  # a kept-alive connection between two requests
    client_stall_timeout_s: float = 60.0  # a client that reads nothing of its response
    allowed_hosts: frozenset = frozenset()  # Host names clients use beyond loopback and the bound address
    cors_origins: frozenset = frozenset()  # web origins whose pages may call the proxy ("*": any)
    response_store_bytes: int = 64 * 2**20  # the Responses store's memory (ResponseStore)
    response_store_age_s: float = 24 * 3600.0  # how long it keeps what it stored

    def __post_init__(self):
        if self.queue_size is None:
            self.queue_size = 4 * self.max_bridges


def parse_command_line(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="proxy.py", description="OpenAI/Anthropic gateway over pi-ai")
    parser.add_argument("--host", help="address to bind (env PI_PROXY_HOST, default 127.0.0.1)")
    parser.add_argument("--port", type=int, help="port to bind (env PI_PROXY_PORT, default 4141)")
    parser.add_argument("--auth-token", help="token clients must send (env PI_PROXY_AUTH_TOKEN)")
    parser.add_argument("--watch-stdin", action="store_true",
                        help="shut down when standard input reaches its end: a parent holding the other end "
                             "of a pipe ties the proxy's life to its own (pi's /proxy start does)")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")
    commands.add_parser("serve", help="run the proxy (the default)")
    login = commands.add_parser("login", help="log in to an OAuth provider; credentials go to auth.json")
    login.add_argument("provider", nargs="?", default="github-copilot",
                       help="github-copilot (default), anthropic or openai-codex")
    logout = commands.add_parser("logout", help="remove a provider's credentials from auth.json")
    logout.add_argument("provider")
    commands.add_parser("models", help="list the available models and where their credentials come from")
    commands.add_parser("usage", help="show the GitHub Copilot quota (GET /usage has it and the proxy's usage)")
    return parser.parse_args(argv)


def load_config(args: argparse.Namespace, environ=os.environ) -> Config:
    """Flags win over PI_PROXY_* environment variables, which win over the defaults."""
    defaults = Config()
    return Config(
        host=args.host or environ.get("PI_PROXY_HOST", defaults.host),
        port=args.port if args.port is not None else int(environ.get("PI_PROXY_PORT", defaults.port)),
        max_body_size=int(environ.get("PI_PROXY_MAX_BODY_SIZE", defaults.max_body_size)),
        upstream_timeout_ms=int(environ.get("PI_PROXY_UPSTREAM_TIMEOUT_MS", defaults.upstream_timeout_ms)),
        agent_dir=Path(environ.get("PI_CODING_AGENT_DIR") or "~/.pi/agent").expanduser(),
        auth_token=args.auth_token or environ.get("PI_PROXY_AUTH_TOKEN") or None,
        bridge_pool=int(environ.get("PI_PROXY_BRIDGE_POOL", defaults.bridge_pool)),
        bridge_warm_up=environ.get("PI_PROXY_BRIDGE_WARM_UP", "1") != "0",
        shutdown_grace_s=float(environ.get("PI_PROXY_SHUTDOWN_GRACE_S", defaults.shutdown_grace_s)),
        max_depth=int(environ.get("PI_PROXY_MAX_DEPTH", defaults.max_depth)),
        max_messages=int(environ.get("PI_PROXY_MAX_MESSAGES", defaults.max_messages)),
        max_tools=int(environ.get("PI_PROXY_MAX_TOOLS", defaults.max_tools)),
        max_json_values=int(environ.get("PI_PROXY_MAX_JSON_VALUES", defaults.max_json_values)),
        remote_images=environ.get("PI_PROXY_REMOTE_IMAGES", "") == "1",
        remote_image_max_bytes=int(environ.get("PI_PROXY_REMOTE_IMAGE_MAX_BYTES", defaults.remote_image_max_bytes)),
        remote_image_max_count=int(environ.get("PI_PROXY_REMOTE_IMAGE_MAX_COUNT", defaults.remote_image_max_count)),
        remote_image_max_total_bytes=int(environ.get("PI_PROXY_REMOTE_IMAGE_MAX_TOTAL_BYTES",
                                                     defaults.remote_image_max_total_bytes)),
        remote_image_timeout=float(environ.get("PI_PROXY_REMOTE_IMAGE_TIMEOUT", defaults.remote_image_timeout)),
        max_bridges=int(environ.get("PI_PROXY_MAX_BRIDGES") or defaults.max_bridges),
        queue_size=int(environ["PI_PROXY_QUEUE_SIZE"]) if environ.get("PI_PROXY_QUEUE_SIZE") else None,
        queue_timeout_s=float(environ.get("PI_PROXY_QUEUE_TIMEOUT_S", defaults.queue_timeout_s)),
        client_header_timeout_s=float(environ.get("PI_PROXY_CLIENT_HEADER_TIMEOUT_S",
                                                  defaults.client_header_timeout_s)),
        client_body_timeout_s=float(environ.get("PI_PROXY_CLIENT_BODY_TIMEOUT_S", defaults.client_body_timeout_s)),
        client_idle_timeout_s=float(environ.get("PI_PROXY_CLIENT_IDLE_TIMEOUT_S", defaults.client_idle_timeout_s)),
        client_stall_timeout_s=float(environ.get("PI_PROXY_CLIENT_STALL_TIMEOUT_S", defaults.client_stall_timeout_s)),
        allowed_hosts=frozenset(comma_list(environ.get("PI_PROXY_ALLOWED_HOSTS", ""))),
        cors_origins=frozenset(origin.rstrip("/") for origin in comma_list(environ.get("PI_PROXY_CORS_ORIGINS", ""))),
        response_store_bytes=int(environ.get("PI_PROXY_RESPONSE_STORE_BYTES", defaults.response_store_bytes)),
        response_store_age_s=float(environ.get("PI_PROXY_RESPONSE_STORE_AGE_S", defaults.response_store_age_s)),
        # The bridge reads it too: Copilot's GitHub endpoints, for the quota here as for logins there.
        test_redirects=json.loads(environ.get("PI_PROXY_TEST_REDIRECTS") or "{}"),
    )


def comma_list(text: str) -> list[str]:
    """`a, b,c` -> ["a", "b", "c"], lower case (host names and origins compare so)."""
    return [item.strip().lower() for item in text.split(",") if item.strip()]


# ==================================================================================================
# 2. Errors and helpers
# ==================================================================================================
# Used everywhere below: ApiError (answered in the client's API's own error shape), how an upstream
# failure becomes one, and the checks every API applies to what a client sends (validate, against
# request schemas that mark the fields knowingly ignored).

ERROR_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    413: "request_too_large",
    429: "rate_limit_error",
    529: "overloaded_error",
}
ANTHROPIC_ERROR_TYPES = {*ERROR_TYPES.values(), "api_error"}
STATUS_OF_TYPE = {type_: status for status, type_ in ERROR_TYPES.items()} | {"api_error": 500}


class ApiError(Exception):
    """An error answered to the client in its API's own shape."""

    def __init__(self, status: int, message: str, type_: str = "invalid_request_error", param=None,
                 code=None, retry_after: str | None = None, upstream_event: dict | None = None,
                 details: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.type = status, message, type_
        self.param, self.code, self.retry_after = param, code, retry_after
        self.upstream_event = upstream_event  # the bridge's error event (redacted), when upstream failed
        self.details = details  # Anthropic's `error.details`, which the anthropic SDK acts on
        self.request_id = None  # the request's id, named in every body (as Anthropic's API does)

    def __reduce__(self):  # sent by a large request's child process (section 15)
        return ApiError, (self.status, self.message, self.type, self.param, self.code, self.retry_after,
                          self.upstream_event, self.details)

    def openai_body(self) -> dict:
        return self._named({"error": {"message": self.message, "type": self.type, "param": self.param,
                                      "code": self.code}})

    def anthropic_body(self) -> dict:
        type_ = self.type if self.type in ANTHROPIC_ERROR_TYPES else "api_error"
        error = {"type": type_, "message": self.message, **({"details": self.details} if self.details else {})}
        return self._named({"type": "error", "error": error})

    def pi_body(self) -> dict:
        return self._named({"error": self.message})  # pi-agent-core's streamProxy reads only `error`

    def _named(self, body: dict) -> dict:
        return {**body, "request_id": self.request_id} if self.request_id else body


_STATUS_PREFIX = re.compile(r"^(\d{3}) (.*)$", re.S)


def parse_upstream_message(text: str) -> tuple[int | None, str]:
    """pi-ai's error message -> (status, readable message). The SDKs write "<status> <message>";
    Anthropic's "<status> <its whole JSON error body>"; an in-stream error may be that JSON alone,
    whose error type then tells the status."""
    found = _STATUS_PREFIX.match(text)
    status, rest = (int(found.group(1)), found.group(2)) if found else (None, text)
    try:
        error = json.loads(rest).get("error")
    except (ValueError, AttributeError):
        return status, rest
    if not isinstance(error, dict) or not error.get("message"):
        return status, rest
    return status or STATUS_OF_TYPE.get(error.get("type")), error["message"]


def upstream_error(event: dict, secrets=()) -> ApiError:
    """A bridge `error` event -> the ApiError a client should see. The status the upstream sent
    is kept (the bridge observes it; pi-ai's message carries it too); transport failures become
    502 and silence 504; a failure of the bridge itself keeps its own status (502, or 503 when the
    proxy ended it to shut down). The (redacted) event stays attached for clients that want pi's
    own form."""
    raw = redact((event.get("message") or {}).get("errorMessage") or "upstream error", secrets)
    redacted = {**event, "message": {**(event.get("message") or {}), "errorMessage": raw}}
    parsed_status, message = parse_upstream_message(raw)
    status = event.get("status") or parsed_status
    if event.get("local"):  # the bridge failed, or the proxy ended it: its own status and words
        type_ = "api_error"
    elif event.get("timeout") or (status is None and re.search(r"timed? ?out", message, re.I)):
        status, message, type_ = 504, f"Upstream timed out: {message}", "timeout_error"
    elif status is None:
        status, message, type_ = 502, f"Upstream request failed: {message}", "api_error"
    elif event.get("overflow"):
        return ApiError(400, message, code="context_length_exceeded", upstream_event=redacted)
    elif status == 408:
        status, type_ = 504, "timeout_error"
    else:
        status = status if status >= 400 else 502
        type_ = ERROR_TYPES.get(status, "api_error")
    return ApiError(status, message, type_, retry_after=event.get("retryAfter"), upstream_event=redacted)


def shown(value: str, limit: int = 100) -> str:
    """A client's value quoted in an error message, cut short: errors never echo huge input."""
    return repr(value if len(value) <= limit else value[:limit] + "...")


def redact(text: str, secrets) -> str:
    for secret in secrets:
        if secret and len(secret) >= 8:
            text = text.replace(secret, "[redacted]")
    return text


IGNORED = "x-ignored"  # a schema annotation (jsonschema skips unknown keywords): why the field is not used
MAX_UNUSED_LOGGED = 20  # paths logged per request: a body of a million unknown keys writes a few lines


def ignored(why: str, schema: dict | None = None) -> dict:
    """The schema of a property accepted on purpose and not used, e.g.
    `"store": ignored("nothing is stored", {"type": "boolean"})`: values valid per `schema` pass.

    The rule: every field a client sends is honoured, translated, or knowingly ignored, and at
    DEBUG each one that is not used is logged with its path (`messages[3].reasoning_content`). The
    request schemas, which `validate` checks bodies against, say which is which, so every endpoint
    gets the log line from its validator (validate -> log_unused_fields -> unused_fields):
    - a property some applying schema describes without this mark is used; its value is walked on;
    - a property marked with ignored(why) is logged as ignored, with `why`, and not walked into;
    - a property no schema describes is logged as unknown (the request still goes on);
    - an object whose schemas describe no properties (a tool's JSON Schema) is used whole, and
      `additionalProperties` describes the names a schema does not list (it too may be ignored()).
    A schema applies together with its `allOf` members, the `then` (or `else`) of its `if`, and the
    `anyOf`/`oneOf` branches the value matches, so the per-type rules of blocks and items count.
    Null values mean "unset" and are not reported. A field whose loss changes the conversation is
    not for this mark: refuse it (400) instead. The README lists the ignored fields per endpoint."""
    return {**(schema or {}), IGNORED: why}


_BRANCH_VALIDATORS: dict[int, tuple] = {}  # id -> (an `if` or anyOf branch of a module schema, its validator)


def _matches(schema, value) -> bool:
    if not isinstance(schema, dict):
        return bool(schema)
    entry = _BRANCH_VALIDATORS.get(id(schema))
    if entry is None or entry[0] is not schema:
        entry = _BRANCH_VALIDATORS[id(schema)] = (schema, Draft202012Validator(schema))
    return entry[1].is_valid(value)


_JSON_TYPES = {"string": str, "array": list, "object": dict, "null": type(None), "boolean": bool,
               "integer": int, "number": (int, float)}


def _may_match(schema, value) -> bool:
    """Whether `value` can match `schema` by its `type`, `const` and `enum` alone: a cheap first
    look at anyOf branches, which mostly differ there (a string or an array of blocks)."""
    if not isinstance(schema, dict):
        return bool(schema)
    types = schema.get("type", ())
    types = [types] if isinstance(types, str) else types
    if types and not isinstance(value, tuple(_JSON_TYPES[name] for name in types)):
        return False
    return ("const" not in schema or schema["const"] == value) and ("enum" not in schema or value in schema["enum"])


def _applying(schemas: list, value) -> list:
    """`schemas` and the subschemas that apply to `value` with them (allOf, if/then/else, the
    anyOf/oneOf branches it matches: validated only when a first look leaves several)."""
    found, pending = [], list(schemas)
    while pending:
        schema = pending.pop()
        if not isinstance(schema, dict):
            continue
        found.append(schema)
        pending += schema.get("allOf", [])
        branches = [branch for branch in schema.get("anyOf", []) + schema.get("oneOf", []) if _may_match(branch, value)]
        pending += [branch for branch in branches if _matches(branch, value)] if len(branches) > 1 else branches
        if "if" in schema:
            branch = schema.get("then" if _matches(schema["if"], value) else "else")
            if branch is not None:
                pending.append(branch)
    return found


def unused_fields(body, schema: dict):
    """(path, why) for each field of a valid `body` that is not used, an object's own before its
    members': `why` is the ignored() reason, or None for a field no schema describes. Nothing
    below such a field is walked."""
    pending = [(body, [schema], ())]
    while pending:
        value, schemas, path = pending.pop()
        schemas = _applying(schemas, value)
        children = []
        if isinstance(value, dict):
            rest = [s["additionalProperties"] for s in schemas if "additionalProperties" in s]
            if not rest and not any("properties" in s for s in schemas):
                continue  # described as a whole: passed on as it is
            for name, member in value.items():
                if member is None:
                    continue
                described = [s["properties"][name] for s in schemas if name in s.get("properties", {})] or rest
                used = [s for s in described if not (isinstance(s, dict) and IGNORED in s)]
                if used:
                    children.append((member, used, (*path, name)))
                else:
                    yield json_path((*path, name)), described[0][IGNORED] if described else None
        elif isinstance(value, list):
            described = [s["items"] for s in schemas if "items" in s]
            children = [(member, described, (*path, index)) for index, member in enumerate(value)]
        pending += reversed(children)


def log_unused_fields(body, schema: dict):
    """At DEBUG: the fields of a request that are not used, grouped by why, at most MAX_UNUSED_LOGGED."""
    found = list(itertools.islice(unused_fields(body, schema), MAX_UNUSED_LOGGED + 1))
    by_reason = {}
    for path, why in found[:MAX_UNUSED_LOGGED]:
        by_reason.setdefault(why, []).append(path)
    what = schema.get("title", "request")
    for why, paths in by_reason.items():
        log.debug("%s: ignored (%s): %s", what, "unknown to this proxy" if why is None else why, ", ".join(paths))
    if len(found) > MAX_UNUSED_LOGGED:
        log.debug("%s: more fields ignored; only the first %d are logged", what, MAX_UNUSED_LOGGED)


_PLAIN_NAME = re.compile(r"[A-Za-z_$][A-Za-z0-9_$-]{0,63}")


def json_path(path) -> str:
    """jsonschema's path deque -> `messages[0].content`. A name that is not plain (a client's
    own keys can be anything) is quoted, escaped and cut short: `metadata["a.b\\n..."]`."""
    text = ""
    for part in path:
        if isinstance(part, int):
            text += f"[{part}]"
        elif _PLAIN_NAME.fullmatch(part):
            text += f".{part}" if text else part
        else:
            text += "[" + json.dumps(part if len(part) <= 64 else part[:64] + "...") + "]"
    return text


def validate(body, validator: Draft202012Validator) -> dict:
    """The request body with nulls dropped (clients send `"stop": null` for "unset"), or ApiError."""
    if not isinstance(body, dict):
        raise ApiError(400, "The request body must be a JSON object")
    body = {key: value for key, value in body.items() if value is not None}
    try:
        error = best_match(validator.iter_errors(body))
    except RecursionError:
        raise ApiError(400, "The request body is nested too deeply", code="invalid_json") from None
    if error is not None:
        path = list(error.absolute_path)
        if error.validator == "required":  # name the missing field, not its parent
            path.append(next(name for name in error.validator_value if name not in error.instance))
        param = json_path(path) or None
        where = f" at {param}" if param else ""
        message = error.message if len(error.message) <= 300 else error.message[:300] + "..."
        raise ApiError(400, f"Invalid request{where}: {message}", param=param, code="invalid_value")
    if log.isEnabledFor(logging.DEBUG):
        log_unused_fields(body, validator.schema)
    return body


_HEADER_NAME = re.compile(r"^[!#$%&'*+.^_`|~0-9A-Za-z-]+$")
_NOT_IN_HEADER_VALUE = re.compile(r"[^\t\x20-\x7e\x80-\xff]")


def check_header(name: str | None, value: str, param: str):
    """A client's value that pi-ai sends as an HTTP header (session ids, streamProxy's headers):
    one the upstream's HTTP client would refuse (control characters such as CR/LF, characters
    past U+00FF) is the client's 400, not a failed upstream call."""
    if name is not None and not _HEADER_NAME.match(name):
        raise ApiError(400, f"{param}: {shown(name)} is not a valid HTTP header name", param=param,
                       code="invalid_value")
    if _NOT_IN_HEADER_VALUE.search(value):
        raise ApiError(400, f"{param} goes to the upstream as an HTTP header: it may not hold control characters "
                            "or characters past U+00FF", param=param, code="invalid_value")


# ==================================================================================================
# 3. pi's config files
# ==================================================================================================

_JSON_STRING_OR_COMMENT = re.compile(r'"(?:\\.|[^"\\])*"|//[^\n]*')
_JSON_STRING_OR_TRAILING_COMMA = re.compile(r'"(?:\\.|[^"\\])*"|,(\s*[}\]])')


def parse_jsonc(text: str):
    """JSON with // comments and trailing commas: exactly what pi accepts in models.json."""
    text = _JSON_STRING_OR_COMMENT.sub(lambda m: m.group(0) if m.group(0)[0] == '"' else "", text)
    text = _JSON_STRING_OR_TRAILING_COMMA.sub(lambda m: m.group(1) if m.group(1) is not None else m.group(0), text)
    return json.loads(text)


_command_outputs: dict[str, str | None] = {}
COMMAND_TIMEOUT = 10.0  # seconds a `!command` may take


def resolve_config_value(value: str, cached: bool = True, timeout: float = COMMAND_TIMEOUT) -> str | None:
    """pi's rule for keys and header values: `!cmd` runs cmd through the shell (its trimmed
    output; None if it fails), an environment variable's name gives its value, anything else is
    the literal. pi caches command output for auth.json keys but not for models.json values."""
    if not value.startswith("!"):
        return os.environ.get(value) or value
    if cached and value in _command_outputs:
        return _command_outputs[value]
    output = run_command(value[1:], timeout)
    if cached:
        _command_outputs[value] = output or None
    return output or None


def run_command(command: str, timeout: float) -> str:
    """A config command's trimmed output ("" if it fails). It runs in a process group of its own,
    killed whole when it is done or out of time: nothing it started outlives it. Past `timeout`
    the request that needed it fails (ApiError 503), saying so; the command is not shown."""
    process = subprocess.Popen(command, shell=True, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                               stderr=subprocess.DEVNULL, text=True, start_new_session=True)
    try:
        output, _ = process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        raise ApiError(503, f"A `!command` in pi's configuration (a key or header value) did not finish within "
                            f"{timeout:g} s and was stopped", "api_error") from None
    finally:
        try:
            os.killpg(process.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        process.communicate()
    return output.strip() if process.returncode == 0 else ""


def private_draft(path: Path, text: str) -> Path:
    """`text` in a new file beside `path`, readable by this user only, for the caller to move
    into place whole (a reader never sees half a file, nor a moment of wider permissions)."""
    draft = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    descriptor = os.open(draft, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(descriptor, "w") as file:
        file.write(text)
    return draft


class AuthFile:
    """auth.json: provider id -> {"type":"api_key","key"} | {"type":"oauth","access","refresh","expires",
    "enterpriseUrl"?}. Shared with `pi` and other proxy processes: it is re-read when it changes on
    disk, and changed only under pi's lock, re-read under it, written whole and atomically."""

    LOCK_STALE_SECONDS = 30  # pi's (proper-lockfile's) rule: an older lock's holder is gone

    def __init__(self, path: Path):
        self.path = path
        self._stamp = None
        self._entries: dict = {}

    def entries(self) -> dict:
        try:
            stat = self.path.stat()
        except FileNotFoundError:
            self._stamp, self._entries = None, {}
            return self._entries
        stamp = (stat.st_mtime_ns, stat.st_size, stat.st_ino)
        if stamp != self._stamp:
            try:
                self._entries = json.loads(self.path.read_text())
            except (OSError, ValueError) as error:
                log.error("cannot read %s: %s", self.path, error)
                self._entries = {}
            self._stamp = stamp
        return self._entries

    @contextmanager
    def locked(self, timeout: float = 15.0):
        """pi's lock: a directory `auth.json.lock` made with mkdir, stale after 30 s."""
        self.path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        lock = Path(os.path.realpath(self.path) + ".lock")
        deadline = time.monotonic() + timeout
        while True:
            try:
                lock.mkdir()
                break
            except FileExistsError:
                try:
                    if time.time() - lock.stat().st_mtime > self.LOCK_STALE_SECONDS:
                        lock.rmdir()
                        continue
                except FileNotFoundError:
                    continue
                if time.monotonic() > deadline:
                    raise ApiError(503, f"{self.path} stays locked by another process", "api_error") from None
                time.sleep(0.05)
        try:
            yield
        finally:
            lock.rmdir()

    def update(self, provider: str, entry: dict | None):
        """Set (or with None, remove) one provider's entry, keeping the others. Call under locked()."""
        self._stamp = None
        entries = dict(self.entries())
        if entry is None:
            entries.pop(provider, None)
        else:
            entries[provider] = entry
        os.replace(private_draft(self.path, json.dumps(entries, indent=2)), self.path)


ENVELOPE_KEY_FILE = "pi-proxy-envelope.key"


def envelope_key(agent_dir: Path) -> bytes:
    """This installation's secret for the envelopes the proxy mints (seal_reasoning): made on
    first use, mode 0600, beside auth.json; every proxy sharing the agent dir shares it."""
    path = agent_dir / ENVELOPE_KEY_FILE
    if not path.exists():
        agent_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        temporary = private_draft(path, os.urandom(32).hex() + "\n")
        try:
            os.link(temporary, path)  # the first proxy's key wins; a key in use is never replaced
        except FileExistsError:
            pass
        finally:
            os.unlink(temporary)
    return path.read_bytes().strip()


COPILOT = "github-copilot"


def copilot_base_url(access: str, enterprise: str | None) -> str:
    """pi-ai's rule: the Copilot token's proxy-ep (proxy. -> api.), else the enterprise domain."""
    found = re.search(r"proxy-ep=([^;]+)", access)
    if found:
        return "https://" + re.sub(r"^proxy\.", "api.", found.group(1))
    if enterprise:
        host = urllib.parse.urlsplit(enterprise if "://" in enterprise else f"https://{enterprise}").hostname
        return f"https://copilot-api.{host}"
    return "https://api.individual.githubcopilot.com"


def expired(credentials: dict) -> bool:
    return time.time() * 1000 >= credentials.get("expires", 0)


@dataclass
class Credential:
    key: str
    source: str  # where the key came from, safe to show: "auth.json", "env:NAME", "models.json"
    base_url: str | None = None  # Copilot: the API host its token names
    refreshable: bool = False  # an OAuth or exchanged token: a 401 may be cured by a refresh


class Credentials:
    """A provider's key in pi's order: auth.json, then the environment, then models.json's apiKey.

    OAuth access tokens are refreshed when expired (or found bad), through `refresh(provider,
    credentials) -> credentials` (pi-ai, via the bridge): one refresh at a time per provider in this
    process, and across processes under auth.json's lock, re-reading the file first so a token
    another process refreshed is used as is. A GitHub token from the environment is exchanged for
    a Copilot token, kept in memory until it expires."""

    def __init__(self, auth_file: AuthFile, env_keys: dict, config_keys: dict, refresh):
        self.auth_file = auth_file
        self.env_keys = env_keys  # provider -> name of the environment variable pi-ai reads
        self.config_keys = config_keys  # provider -> models.json apiKey (unresolved)
        self.refresh = refresh
        self._locks = collections.defaultdict(threading.Lock)
        self._exchanged: dict[str, dict] = {}  # GitHub token -> Copilot credentials

    def source(self, provider: str) -> str | None:
        """Where the provider's key would come from, without refreshing or running anything."""
        entry = self.auth_file.entries().get(provider)
        if isinstance(entry, dict) and entry.get("type") in ("api_key", "oauth"):
            return "auth.json" if entry["type"] == "api_key" else "auth.json (oauth)"
        env_name = self.env_keys.get(provider)
        if env_name == "<authenticated>":
            return "ambient cloud credentials"
        if env_name and os.environ.get(env_name):
            return f"env:{env_name}"
        return "models.json" if self.config_keys.get(provider) else None

    def for_provider(self, provider: str, bad_key: str | None = None) -> Credential | None:
        """The provider's credential; `bad_key` is one the upstream refused (401): refresh it."""
        entry = self.auth_file.entries().get(provider)
        if isinstance(entry, dict) and entry.get("type") == "api_key" and entry.get("key"):
            key = resolve_config_value(entry["key"])
            if key:
                return Credential(key, "auth.json")
        elif isinstance(entry, dict) and entry.get("type") == "oauth":
            if expired(entry) or entry.get("access") == bad_key:
                entry = self._refresh_stored(provider, entry)
            base_url = copilot_base_url(entry["access"], entry.get("enterpriseUrl")) if provider == COPILOT else None
            return Credential(entry["access"], "auth.json (oauth)", base_url, refreshable=True)
        env_name = self.env_keys.get(provider)
        if env_name == "<authenticated>":
            return Credential("", "ambient cloud credentials")
        if env_name and os.environ.get(env_name):
            if provider == COPILOT:  # a GitHub token: pi-ai would send it as is, Copilot wants its own
                return self._exchange(os.environ[env_name], f"env:{env_name}", bad_key)
            return Credential(os.environ[env_name], f"env:{env_name}")
        if self.config_keys.get(provider):
            key = resolve_config_value(self.config_keys[provider], cached=False)
            if key:
                return Credential(key, "models.json")
        return None

    def github_token(self) -> tuple[str, str | None] | None:
        """The GitHub token behind the Copilot credential, and its enterprise domain, if any."""
        entry = self.auth_file.entries().get(COPILOT)
        if isinstance(entry, dict) and entry.get("type") == "oauth" and entry.get("refresh"):
            return entry["refresh"], entry.get("enterpriseUrl")
        env_name = self.env_keys.get(COPILOT)
        return (os.environ[env_name], None) if env_name and os.environ.get(env_name) else None

    def _refresh_stored(self, provider: str, seen: dict) -> dict:
        with self._locks[provider], self.auth_file.locked():
            self.auth_file._stamp = None  # re-read under the lock
            current = self.auth_file.entries().get(provider) or seen
            if current.get("access") != seen.get("access") and not expired(current):
                return current  # refreshed meanwhile, by another request or process
            log.info("refreshing the %s OAuth token", provider)
            refreshed = {"type": "oauth", **self.refresh(provider, current)}
            self.auth_file.update(provider, refreshed)
            return refreshed

    def _exchange(self, github_token: str, source: str, bad_key: str | None) -> Credential:
        with self._locks[COPILOT]:
            copilot = self._exchanged.get(github_token)
            if copilot is None or expired(copilot) or copilot["access"] == bad_key:
                copilot = self._exchanged[github_token] = self.refresh(
                    COPILOT, {"refresh": github_token, "access": "", "expires": 0})
        return Credential(copilot["access"], source, copilot_base_url(copilot["access"], None), refreshable=True)


# ==================================================================================================
# 4. Model registry
# ==================================================================================================

CUSTOM_MODEL_DEFAULTS = {
    "reasoning": False,
    "input": ["text"],
    "cost": {"input": 0, "output": 0, "cacheRead": 0, "cacheWrite": 0},
    "contextWindow": 128000,
    "maxTokens": 16384,
}
_OVERRIDABLE = ("name", "reasoning", "input", "contextWindow", "maxTokens")


@dataclass
class ProviderSettings:
    """What models.json says about a provider that applies per request rather than per model."""

    api_key: str | None = None
    headers: dict = field(default_factory=dict)
    auth_header: bool = False


@dataclass
class Registry:
    models: dict = field(default_factory=dict)  # canonical "provider/id" -> pi-ai model
    settings: dict = field(default_factory=dict)  # provider -> ProviderSettings
    model_headers: dict = field(default_factory=dict)  # canonical id -> models.json headers


class ModelsJsonError(ValueError):
    pass


def build_registry(catalog: list, models_json: dict | None) -> Registry:
    """pi-ai's catalogue with models.json applied as pi applies it: a built-in provider's
    baseUrl/compat apply to its models, `models` adds models or replaces a built-in one of the
    same id whole, `modelOverrides` patches built-in models field by field; apiKey, headers and
    authHeader apply per request. The caller validates models_json first (check_models_json)."""
    providers = {p["id"]: {m["id"]: m for m in p["models"]} for p in catalog}
    registry = Registry()
    for name, spec in ((models_json or {}).get("providers") or {}).items():
        builtin = providers.get(name, {})
        models = {model_id: _builtin_model(name, spec, model, registry) for model_id, model in builtin.items()}
        first_builtin = next(iter(builtin.values()), {})
        for custom in spec.get("models") or []:
            model = _custom_model(name, spec, custom, first_builtin)
            if model is None:
                continue
            models[custom["id"]] = model
            registry.model_headers.pop(f"{name}/{custom['id']}", None)
            if custom.get("headers"):
                registry.model_headers[f"{name}/{custom['id']}"] = custom["headers"]
        providers[name] = models
        registry.settings[name] = ProviderSettings(spec.get("apiKey"), spec.get("headers") or {},
                                                   bool(spec.get("authHeader")))
    for provider, models in providers.items():
        for model_id, model in models.items():
            registry.models[f"{provider}/{model_id}"] = model
    return registry


def _builtin_model(provider: str, spec: dict, model: dict, registry: Registry) -> dict:
    """A built-in model with its provider's models.json entry applied (its override's headers go
    to the registry)."""
    model = {**model, "baseUrl": spec.get("baseUrl", model["baseUrl"]),
             "compat": {**(model.get("compat") or {}), **(spec.get("compat") or {})}}
    override = (spec.get("modelOverrides") or {}).get(model["id"])
    if override:
        model = _apply_override(model, override)
        if override.get("headers"):
            registry.model_headers[f"{provider}/{model['id']}"] = override["headers"]
    return model


def _custom_model(provider: str, spec: dict, custom: dict, first_builtin: dict) -> dict | None:
    """A model models.json defines, or None when neither it nor its provider says its API and URL."""
    api = custom.get("api") or spec.get("api") or first_builtin.get("api")
    base_url = custom.get("baseUrl") or spec.get("baseUrl") or first_builtin.get("baseUrl")
    if not api or not base_url:
        return None
    return {
        **CUSTOM_MODEL_DEFAULTS,
        **{k: v for k, v in custom.items() if k not in ("headers", "compat", "baseUrl", "api")},
        "name": custom.get("name", custom["id"]),
        "api": api,
        "provider": provider,
        "baseUrl": base_url,
        "compat": {**(spec.get("compat") or {}), **(custom.get("compat") or {})},
    }


def _apply_override(model: dict, override: dict) -> dict:
    model = {**model, **{k: override[k] for k in _OVERRIDABLE if k in override}}
    if "thinkingLevelMap" in override:
        model["thinkingLevelMap"] = {**(model.get("thinkingLevelMap") or {}), **override["thinkingLevelMap"]}
    if "cost" in override:
        model["cost"] = {**model["cost"], **override["cost"]}
    if "compat" in override:
        model["compat"] = {**(model.get("compat") or {}), **override["compat"]}
    return model


def check_models_json(data, builtin_providers: set) -> None:
    """pi's validation of models.json; any problem rejects the whole file (as pi does)."""
    if not isinstance(data, dict) or not isinstance(data.get("providers"), dict):
        raise ModelsJsonError('it must be an object with a "providers" object')
    for name, spec in data["providers"].items():
        _check_provider(name, spec, builtin_providers)


def _check_provider(name: str, spec, builtin_providers: set):
    if not isinstance(spec, dict):
        raise ModelsJsonError(f"provider {name!r} must be an object")
    models = spec.get("models") or []
    if not isinstance(models, list) or not all(isinstance(m, dict) and isinstance(m.get("id"), str)
                                               and m["id"] for m in models):
        raise ModelsJsonError(f'provider {name!r}: "models" must be a list of objects with an "id"')
    if not models and not any(spec.get(k) for k in ("baseUrl", "headers", "compat", "modelOverrides")):
        raise ModelsJsonError(f'provider {name!r}: must specify "baseUrl", "headers", "compat", '
                              '"modelOverrides", or "models"')
    if models and name not in builtin_providers:
        _check_custom_provider(name, spec, models)
    _check_limits(name, [*models, *(spec.get("modelOverrides") or {}).values()])


def _check_custom_provider(name: str, spec: dict, models: list):
    """A provider pi-ai does not know: models.json must say where it is and how to talk to it."""
    for required in ("baseUrl", "apiKey"):
        if not spec.get(required):
            raise ModelsJsonError(f'provider {name!r}: "{required}" is required when defining custom models')
    for model in models:
        if not (model.get("api") or spec.get("api")):
            raise ModelsJsonError(f'provider {name!r}, model {model["id"]!r}: no "api" specified')


def _check_limits(name: str, models: list):
    for model in models:
        for limit in ("contextWindow", "maxTokens"):
            if limit in model and not (isinstance(model[limit], int) and model[limit] > 0):
                raise ModelsJsonError(f"provider {name!r}: invalid {limit}")


def read_models_json(agent_dir: Path, builtin_providers: set) -> tuple[dict | None, str | None]:
    """models.json, or None and the reason it was rejected (built-in models keep working)."""
    path = agent_dir / "models.json"
    if not path.exists():
        return None, None
    try:
        data = parse_jsonc(path.read_text())
        check_models_json(data, builtin_providers)
    except (OSError, ValueError) as error:
        return None, f"{path} was not loaded: {error}. Built-in models are still available."
    return data, None


def canonical_id(model: dict) -> str:
    return f"{model['provider']}/{model['id']}"


def resolve_model(name: str, models: dict, is_available) -> dict:
    """A requested model name -> the pi-ai model. Canonical `provider/id` wins; a bare id must
    belong to exactly one available provider."""
    if name in models:
        model = models[name]
        if not is_available(model["provider"]):
            raise ApiError(401, f"No credentials for provider {model['provider']!r} (model {shown(name)})",
                           "authentication_error")
        return model
    matches = [m for m in models.values() if m["id"] == name and is_available(m["provider"])]
    if len(matches) == 1:
        return matches[0]
    if len(matches) > 1:
        candidates = ", ".join(sorted(canonical_id(m) for m in matches))
        raise ApiError(400, f"Model {shown(name)} is offered by several providers; use one of: {candidates}",
                       "invalid_request_error", param="model", code="ambiguous_model")
    raise ApiError(404, f"The model {shown(name)} does not exist or has no credentials configured"
                        + no_such_provider(name, models), "not_found_error", param="model", code="model_not_found")


def within_output_limit(options: dict, model: dict) -> dict:
    """pi-ai options with `maxTokens` no higher than the model's own limit: clients ask for more
    than a model can give (the AI SDK asks 128000 of Claude names it does not know), and the
    upstream would answer that with a 400."""
    limit = model.get("maxTokens")
    if not limit or options.get("maxTokens", 0) <= limit:
        return options
    log.debug("max tokens %d is above the %d of %s: clamped", options["maxTokens"], limit, canonical_id(model))
    return {**options, "maxTokens": limit}


def no_such_provider(name: str, models: dict) -> str:
    """Why `someprovider/model` names nothing, when its prefix is no provider's name: a prefix is
    never a hint, so such a name never falls back to another provider's model of that id."""
    provider = name.partition("/")[0]
    if "/" not in name or any(model["provider"] == provider for model in models.values()):
        return ""
    return f" (no provider is named {shown(provider)})"


# ==================================================================================================
# 5. Bridge
# ==================================================================================================


def bridge_script() -> Path:
    """The bundle loads about four times faster than bridge.mjs with pi-ai's hundreds of files; a
    bundle older than its sources would run stale code, so then the source runs."""
    try:
        if BRIDGE_BUNDLE.stat().st_mtime >= max(source.stat().st_mtime for source in BRIDGE_SOURCES):
            return BRIDGE_BUNDLE
    except OSError:
        pass
    log.warning("%s is missing or older than its sources (run `make install`); running bridge.mjs", BRIDGE_BUNDLE)
    return BRIDGE_SCRIPT


# Request bodies are parsed with their outer arrays and objects taken apart, their members handed to
# the C parser one by one: an array a cap names (the messages, the tools) is refused as soon as the
# parser passes its cap, before the rest of it is read and built.
_JSON_SPACE = re.compile(r"[ \t\n\r]*")
_JSON_VALUE = json.JSONDecoder().raw_decode
_CHUNKED_LEVELS = 4  # request -> context -> messages -> message: one message per C call


def parse_json(text: str, caps: dict | None = None):
    """json.loads(text), in chunks. `caps` maps a dotted path to (most entries, its setting): an
    array there with more is refused (413) as soon as the parser passes its cap."""
    caps = {tuple(path.split(".")): cap for path, cap in (caps or {}).items()}
    value, end = _parse_chunked(text, _JSON_SPACE.match(text).end(), _CHUNKED_LEVELS, (), caps)
    if _JSON_SPACE.match(text, end).end() != len(text):
        raise json.JSONDecodeError("Extra data", text, end)
    return value


def _parse_chunked(text: str, index: int, levels: int, path: tuple | None, caps: dict):
    """A value at `path` (None inside an array: caps name no array entries)."""
    opening = text[index:index + 1]
    if levels == 0 or opening not in ("[", "{"):
        return _JSON_VALUE(text, index)
    closing, members = ("]", []) if opening == "[" else ("}", {})
    cap = caps.get(path) if opening == "[" else None
    index = _JSON_SPACE.match(text, index + 1).end()
    if text[index:index + 1] == closing:
        return members, index + 1
    while True:
        if opening == "{":
            key, index = _JSON_VALUE(text, index)
            index = _JSON_SPACE.match(text, index).end()
            if not isinstance(key, str) or text[index:index + 1] != ":":
                raise json.JSONDecodeError("Expecting a property name and ':'", text, index)
            index = _JSON_SPACE.match(text, index + 1).end()
            value, index = _parse_chunked(text, index, levels - 1, None if path is None else (*path, key), caps)
            members[key] = value
        else:
            value, index = _parse_chunked(text, index, levels - 1, None, caps)
            members.append(value)
            if cap and len(members) > cap[0]:
                dotted = ".".join(path)
                raise ApiError(413, f"{dotted} holds more than {cap[0]} entries; this proxy takes at most {cap[0]} "
                                    f"({cap[1]})", "request_too_large", param=dotted, code="request_too_large")
        index = _JSON_SPACE.match(text, index).end()
        separator = text[index:index + 1]
        if separator == closing:
            return members, index + 1
        if separator != ",":
            raise json.JSONDecodeError("Expecting ',' delimiter", text, index)
        index = _JSON_SPACE.match(text, index + 1).end()


class JsonText(list):
    """JSON text in pieces (bytes), written as they are: a large request's pi context comes from its
    child process (section 15) in the pieces it was read in, never joined into one object here."""


def json_text(value) -> JsonText:
    """value as JSON text, in one piece. What JSON cannot carry (NaN, Infinity, nesting too deep to
    write) is the client's 400, found where the request is prepared: before a bridge is taken."""
    try:
        return JsonText([json.dumps(value, allow_nan=False).encode()])
    except (ValueError, RecursionError):
        raise ApiError(400, "The request holds values that cannot be forwarded (NaN, Infinity, or nesting "
                            "too deep)", code="invalid_value") from None


LINE_BLOCK = 262_144  # bytes of a bridge's request line written between the loop's turns (Bridge.send)


def bridge_line(bridge_request: dict, context: JsonText | None = None) -> list[bytes]:
    """A bridge's request line, in pieces (Bridge.send lets the loop serve its other clients between
    them): bridge_request, with `context`, the pi context, in it as it is."""
    head = b"".join(json_text(bridge_request))
    if context is None:
        return [head + b"\n"]
    return [head[:-1] + b',"context":', *context, b"}\n"]


def let_the_loop_poll():
    """Give the loop one turn at its sockets and timers before going on. A read or write that finds
    its socket or pipe ready never yields; gevent.sleep(0) runs only the greenlets already scheduled,
    and gevent.idle() waits for the loop to have nothing else to do, which under load may be never.
    A 0.1 ms timer fires after the loop's next poll."""
    gevent.sleep(0.0001)


class BridgeGone(Exception):
    """The bridge was stopped, or closed its relay connection: its upstream request must stop."""


class Bridge:
    """One `node bridge.mjs` process answering one request, given by send(). Every path ends in
    close(), which kills the process if it still runs and always reaps it."""

    START_ALLOWANCE = 30.0  # seconds a bridge may take to start and reach its upstream (a loaded machine)
    LINES_BUFFERED = 256  # event lines read ahead of the response (a few hundred bytes each)

    def __init__(self, command: list, env: dict | None = None, token: str | None = None):
        self.proc = gevent.subprocess.Popen(
            command,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            cwd=HERE,
            env=env,
        )
        self.token = token  # how it names itself to the relay
        self.upstream_contacted = 0.0  # time.monotonic() of its last request through the relay
        self.relayed: set[gevent.Greenlet] = set()  # the relay's greenlets sending its requests upstream
        self.stderr_tail = b""
        # Bounded: a client that does not read stops the reader, the stdout pipe fills, and node
        # (whose writes to a pipe block) stops reading its upstream. Memory per stalled client stays
        # at these lines, whatever the upstream sends.
        self.lines = gevent.queue.Queue(maxsize=self.LINES_BUFFERED)
        self._readers = [gevent.spawn(self._read_stdout), gevent.spawn(self._drain_stderr)]
        self._reaper = None
        self.stopped_because = None  # why the proxy ended it, told to its client instead of the exit status

    def send(self, line: list[bytes]):
        """Give the bridge its request (bridge_line's pieces), the loop's other clients served
        between pieces: a pipe its reader keeps emptying takes 40 MB without a write ever yielding."""
        try:
            written = 0
            for piece in line:
                if written >= LINE_BLOCK:  # a small request's few pieces go at once, without a turn
                    let_the_loop_poll()
                    written = 0
                self.proc.stdin.write(piece)
                written += len(piece)
            self.proc.stdin.flush()
        except OSError:
            pass  # the process died at once; events() reports it

    def _read_stdout(self):
        # A reader of its own, so waiting for a line can time out without interrupting a read. It
        # reads 8 KiB once the loop has found the pipe readable, as it does a client's socket: a
        # read that finds output waiting returns without yielding, and the queue's hand-offs to the
        # response alone never let the loop poll, so a fast bridge kept every other client waiting.
        fd, part = self.proc.stdout.fileno(), []
        while True:
            gevent.socket.wait_read(fd)
            try:
                chunk = os.read(fd, 8192)
            except BlockingIOError:
                continue
            if not chunk:
                break
            start = 0
            while (end := chunk.find(b"\n", start)) != -1:
                part.append(chunk[start:end + 1])
                self.lines.put(b"".join(part))
                part, start = [], end + 1
            if start < len(chunk):
                part.append(chunk[start:])
        if part:
            self.lines.put(b"".join(part))
        self.lines.put(b"")

    def _drain_stderr(self):
        for line in self.proc.stderr:
            self.stderr_tail = (self.stderr_tail + line)[-2000:]

    def events(self, idle_timeout: float, heartbeat: float | None = None):
        """Yield the bridge's events. The last one is always `done` or `error`: a bridge that goes
        silent for idle_timeout seconds, dies, or prints garbage yields a synthetic error. The
        silence counts from the bridge's last line or its last request to the upstream (through
        the relay), whichever came later: the time a bridge takes to start (up to START_ALLOWANCE
        more) is not the upstream's. With `heartbeat`, every that many seconds of silence yields
        {"type": "heartbeat"}."""
        last_line = time.monotonic()
        while True:
            left = self._silence_ends(last_line, idle_timeout) - time.monotonic()
            beat = heartbeat is not None and heartbeat < left
            try:
                # A line already queued needs no timer (most of a fast stream's lines).
                line = self.lines.get_nowait() if self.lines.qsize() else \
                    self.lines.get(timeout=max(heartbeat if beat else left, 0))
            except gevent.queue.Empty:
                if beat:
                    yield {"type": "heartbeat"}
                    continue
                if self._silence_ends(last_line, idle_timeout) > time.monotonic():
                    continue
                yield {"type": "error", "reason": "error", "timeout": True,
                       "message": {"errorMessage": f"upstream sent nothing for {idle_timeout:g} s"}}
                return
            if line is None:
                continue  # the bridge has contacted the upstream (contacted()): count from now
            last_line = time.monotonic()
            if not line:
                yield self._failure(self._exit_reason())
                return
            try:
                event = json.loads(line)
            except ValueError:
                yield self._failure("the proxy's bridge printed something that is not JSON")
                return
            if event.get("type") == "error" and self.stopped_because:  # not pi-ai's "Request was aborted"
                event = self._failure(self.stopped_because, status=503)
            yield event
            if event.get("type") in ("done", "error", "credentials"):
                return

    def contacted(self):
        """The relay has sent this bridge's request upstream: the upstream's time starts now."""
        self.upstream_contacted = time.monotonic()
        if not self.lines.qsize():  # wakes events(), which may be waiting out the start allowance
            self.lines.put_nowait(None)

    def _silence_ends(self, last_line: float, idle_timeout: float) -> float:
        if not self.upstream_contacted:
            return last_line + self.START_ALLOWANCE + idle_timeout
        return max(last_line, self.upstream_contacted) + idle_timeout

    @staticmethod
    def _failure(message: str, status: int = 502) -> dict:
        """An error event for a failure of the bridge or the proxy, not of the upstream."""
        return {"type": "error", "reason": "error", "local": True, "status": status,
                "message": {"errorMessage": message}}

    def _exit_reason(self) -> str:
        code = self.proc.wait()
        if self.stopped_because:
            return self.stopped_because
        self._readers[1].join(timeout=1)
        tail = self.stderr_tail.decode(errors="replace").strip().splitlines()
        detail = f": {tail[-1]}" if tail else ""
        return f"the proxy's bridge exited unexpectedly (status {code}){detail}"

    @property
    def stopping(self) -> bool:
        return self._reaper is not None

    def close(self) -> gevent.Greenlet:
        """Stop the process if it still runs and reap it in the background (a SIGTERM may take
        up to a second to work), so a response ends on the bridge's final event, not its exit."""
        if self._reaper is None:
            if self.proc.poll() is None:
                self.proc.terminate()
            # The upstream sees its request end now, not when node gets round to exiting.
            for relaying in list(self.relayed):
                relaying.kill(BridgeGone, block=False)
            self._reaper = gevent.spawn(self._reap)
        return self._reaper

    def _reap(self):
        try:
            self.proc.wait(timeout=1)
        except gevent.subprocess.TimeoutExpired:
            self.proc.kill()
        self.proc.wait()
        # Wait for the readers to end: closing a pipe while its reader is inside a read raises
        # (RuntimeError: reentrant call) and leaves the pipes open.
        gevent.killall(self._readers, timeout=1)
        for pipe in (self.proc.stdin, self.proc.stdout, self.proc.stderr):
            try:
                pipe.close()
            except OSError:
                pass


def watch_peer(peer: socket.socket, on_gone):
    """Call on_gone when a bridge closes its relay socket (it sends nothing after its request, so
    readable means closed). Clients, which may half-close, have watch_client."""
    try:
        gevent.socket.wait_read(peer.fileno())
        gone = peer.recv(1, socket.MSG_PEEK) == b""
    except OSError:
        gone = True
    if gone:
        on_gone()


def refresh_oauth(bridge: Bridge, provider: str, credentials: dict) -> dict:
    """Fresh OAuth credentials from pi-ai's refreshToken (for Copilot: a GitHub token -> a Copilot
    token), asked of a pooled bridge: it is loaded, and its HTTP goes through the relay."""
    bridge.send(bridge_line({"op": "refresh", "provider": provider, "credentials": credentials}))
    try:
        *_, final = bridge.events(60)
    finally:
        bridge.close()
    if final["type"] != "credentials":
        secrets = [credentials.get("refresh"), credentials.get("access")]
        reason = redact(final["message"]["errorMessage"], secrets)
        raise ApiError(401, f"Refreshing the {provider} credentials failed: {reason}", "authentication_error")
    return final["credentials"]


def load_catalog(node: str) -> list:
    """pi-ai's built-in providers and models, once at startup."""
    result = subprocess.run([node, str(bridge_script())], input=b'{"op":"catalog"}\n', capture_output=True,
                            cwd=HERE, timeout=60)
    for line in result.stdout.splitlines():
        event = json.loads(line)
        if event.get("type") == "catalog":
            return event["providers"]
    raise RuntimeError("bridge.mjs did not print the catalogue: "
                       + result.stderr.decode(errors="replace").strip()[-500:])


# ==================================================================================================
# 6. Relay
# ==================================================================================================
# Bridges do no network I/O of their own (web-fetch.mjs): each HTTP request a pooled bridge makes
# comes here over a Unix socket in a directory only this user may enter, naming its bridge with
# the token given in the bridge's environment; anything else is refused. The relay sends it
# upstream over keep-alive connections pooled per origin, so after the first request to an origin
# a request pays one round trip, not DNS, TCP and TLS in a fresh process. The upstream gets the
# request as the bridge made it, minus hop-by-hop headers; the response passes back as it arrives;
# nothing is retried or followed. A bridge that goes away mid-request (killed: its client left)
# closes its socket: the relay then closes that upstream connection at once, so the upstream sees
# the disconnect and the connection is never reused. Headers carry upstream keys: never logged.

HOP_BY_HOP = {"connection", "keep-alive", "proxy-connection", "proxy-authenticate", "proxy-authorization", "te",
              "trailer", "transfer-encoding", "upgrade"}
# APIs whose SDKs connect on their own, not through fetch (the relay): Amazon Bedrock's AWS SDK, and
# openai-codex-responses' WebSocket transport (on a Node with a global WebSocket, 22+). (Vertex AI's
# Google sign-in token requests go through node-fetch, also on their own.)
DIRECT_APIS = {"bedrock-converse-stream", "openai-codex-responses", "google-vertex"}
RELAY_TOKEN_HEADER = "x-pi-relay-token"  # which bridge asks; the relay's own, never sent upstream
RELAY_ERROR_HEADER = "x-pi-relay-error"  # why no upstream response came: the bridge's fetch throws it
# Answered by the relay itself, with the request's body: a bridge's warm-up runs its whole HTTP path
# without contacting an upstream (.invalid names never resolve).
RELAY_ECHO = "http://relay.invalid/echo"


def upstream_ssl_context(environ=os.environ) -> ssl.SSLContext:
    """The roots a user has told Python or Node to trust: REQUESTS_CA_BUNDLE or SSL_CERT_FILE
    replace the default (certifi's Mozilla roots, as bundled in Node); NODE_EXTRA_CA_CERTS adds
    to them, as it does in Node."""
    context = ssl.create_default_context(
        cafile=environ.get("REQUESTS_CA_BUNDLE") or environ.get("SSL_CERT_FILE") or certifi.where())
    if environ.get("NODE_EXTRA_CA_CERTS"):
        context.load_verify_locations(environ["NODE_EXTRA_CA_CERTS"])
    return context


class Upstreams:
    """Keep-alive connections to the upstreams: at most POOL_PER_ORIGIN kept idle per origin, for
    the MAX_ORIGINS origins used last; through the proxy HTTPS_PROXY / HTTP_PROXY name for an
    origin NO_PROXY does not exempt (HTTPS tunnels with CONNECT)."""

    MAX_ORIGINS, POOL_PER_ORIGIN = 16, 8

    def __init__(self, environ=os.environ):
        self.options = {"num_pools": self.MAX_ORIGINS, "maxsize": self.POOL_PER_ORIGIN,
                        "ssl_context": upstream_ssl_context(environ)}
        self.direct = urllib3.PoolManager(**self.options)
        self.proxied: dict[str, urllib3.ProxyManager] = {}

    def manager(self, url: str) -> urllib3.PoolManager:
        proxy = requests.utils.select_proxy(url, requests.utils.get_environ_proxies(url))
        if not proxy:
            return self.direct
        if proxy not in self.proxied:
            userinfo = urllib.parse.urlsplit(proxy)
            auth = f"{urllib.parse.unquote(userinfo.username)}:{urllib.parse.unquote(userinfo.password or '')}" \
                if userinfo.username else None
            self.proxied[proxy] = urllib3.ProxyManager(
                proxy, proxy_headers=urllib3.make_headers(proxy_basic_auth=auth) if auth else None, **self.options)
        return self.proxied[proxy]

    def send(self, method: str, url: str, headers: dict, body: bytes, timeout: float) -> urllib3.BaseHTTPResponse:
        """The upstream's response, its body unread. Never retried (a POST may not be repeated
        behind its sender's back); a read that waits `timeout` seconds fails."""
        return self.manager(url).urlopen(
            method, url, body=body or None, headers=headers, redirect=False, retries=False,
            preload_content=False, decode_content=False,
            timeout=urllib3.Timeout(connect=min(timeout, 30.0), read=timeout))


RELAY_READ = 262_144  # bytes of a bridge's request body read at a time


def read_relay_request(reader) -> tuple[str, str, list, bytearray]:
    """method, absolute URL, [(name, value)] and body of a bridge's request (HTTP/1.1, absolute
    form, Content-Length framing, as web-fetch.mjs sends it). ValueError if it is not one."""
    method, target, _version = reader.readline(8192).decode("latin-1").split()
    headers = []
    while (line := reader.readline(65536)) not in (b"\r\n", b"\n", b""):
        name, colon, value = line.decode("latin-1").partition(":")
        if not colon or len(headers) >= 256:
            raise ValueError("not a bridge's request")
        headers.append((name.strip(), value.strip()))
    length = next((int(value) for name, value in headers if name.lower() == "content-length"), 0)
    body = bytearray()  # read a part at a time: a read that finds its data waiting never yields
    while len(body) < length:
        part = reader.read1(min(RELAY_READ, length - len(body)))
        if not part:
            raise ValueError("the bridge's request ended early")
        body += part
        if len(body) < length:
            let_the_loop_poll()
    return method, target, headers, body


def relay_head(status: int, reason: str, headers) -> bytes:
    """A response head for the bridge (one response per connection)."""
    lines = [f"HTTP/1.1 {status} {reason}"]
    lines += [f"{name}: {value}" for name, value in headers]
    return ("\r\n".join([*lines, "connection: close", "", ""])).encode("latin-1")


class Relay:
    """The pooled bridges' HTTP client (see the section's comment). `bridges` maps each bridge's
    token to the Bridge, for as long as its process lives."""

    def __init__(self, upstream_timeout: float):
        self.upstream_timeout = upstream_timeout
        self.directory = Path(tempfile.mkdtemp(prefix="pi-proxy-"))  # mode 0700
        self.path = str(self.directory / "relay.sock")
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        listener.bind(self.path)
        listener.listen(128)
        self.server = gevent.server.StreamServer(listener, self._serve)
        self.server.start()
        self.upstreams = Upstreams()
        self.bridges: dict[str, Bridge] = {}
        atexit.register(self.close)

    def environment(self, token: str, command: list) -> dict:
        """The environment of a bridge whose HTTP goes through the relay. NODE_EXTRA_CA_CERTS
        costs each node ~40 ms CPU: kept only for a bridge with an API that connects directly."""
        environ = {**os.environ, "PI_PROXY_RELAY": self.path, "PI_PROXY_RELAY_TOKEN": token}
        if not DIRECT_APIS & set(command):
            environ.pop("NODE_EXTRA_CA_CERTS", None)
        return environ

    def close(self):
        self.server.close()
        shutil.rmtree(self.directory, ignore_errors=True)

    def _serve(self, bridge_socket: socket.socket, _address):
        response, complete = None, False
        watcher = None
        try:
            method, url, headers, body = read_relay_request(bridge_socket.makefile("rb"))
            token = next((value for name, value in headers if name.lower() == RELAY_TOKEN_HEADER), "")
            bridge = self.bridges.get(token)
            if bridge is None or bridge.stopping or not url.startswith(("http://", "https://")):
                bridge_socket.sendall(relay_head(403, "Forbidden", [("content-length", "0")]))
                return
            if url == RELAY_ECHO:
                bridge_socket.sendall(relay_head(200, "OK", [("content-type", "text/event-stream"),
                                                             ("content-length", str(len(body)))]) + body)
                return
            bridge.contacted()
            serving = gevent.getcurrent()
            bridge.relayed.add(serving)
            watcher = gevent.spawn(watch_peer, bridge_socket, lambda: serving.kill(BridgeGone, block=False))
            try:
                response = self.upstreams.send(method, url, upstream_headers(headers), body, self.upstream_timeout)
            except (urllib3.exceptions.HTTPError, OSError) as error:
                reason = re.sub(r"\s+", " ", str(getattr(error, "reason", None) or error))[:500]
                log.info("relay: %s %s failed: %s", method, urllib.parse.urlsplit(url).netloc, reason)
                bridge_socket.sendall(relay_head(502, "Bad Gateway",
                                                 [(RELAY_ERROR_HEADER, reason), ("content-length", "0")]))
                return
            relay_response(response, bridge_socket)
            complete = True
        except (BridgeGone, ValueError, OSError, urllib3.exceptions.HTTPError):
            pass  # the bridge went away, or the upstream broke off: the bridge sees its socket close
        finally:
            if watcher is not None:
                watcher.kill(block=False)
                bridge.relayed.discard(gevent.getcurrent())
            if response is not None:
                if not complete:
                    response.close()  # the connection, not only the response: it must not be reused
                response.release_conn()
            bridge_socket.close()


def upstream_headers(headers: list) -> dict:
    """A bridge's request headers as the upstream gets them: the bridge's own set, minus hop-by-hop
    headers and the relay's token."""
    sent = {name: value for name, value in headers
            if name.lower() not in HOP_BY_HOP and name.lower() != RELAY_TOKEN_HEADER}
    # urllib3 adds these two unless told to skip them.
    for name in ("User-Agent", "Accept-Encoding"):
        if not any(key.lower() == name.lower() for key in sent):
            sent[name] = urllib3.util.SKIP_HEADER
    return sent


def relay_response(response, bridge_socket: socket.socket):
    """The upstream's response, passed to the bridge as it arrives: chunked unless the upstream
    gave a length, so that either way a body cut short reads as cut."""
    headers = [(name, value) for name, value in response.headers.iteritems() if name.lower() not in HOP_BY_HOP]
    chunked = "content-length" not in response.headers
    bridge_socket.sendall(relay_head(response.status, response.reason or "",
                                     [*headers, ("transfer-encoding", "chunked")] if chunked else headers))
    while chunk := response.read1(65536):
        bridge_socket.sendall(b"%x\r\n%s\r\n" % (len(chunk), chunk) if chunked else chunk)
    if chunked:
        bridge_socket.sendall(b"0\r\n\r\n")


# ==================================================================================================
# 7. Bridge pool
# ==================================================================================================


class ClientGone(Exception):
    """The client disconnected before its request got a bridge."""


def client_at_end(client: socket.socket) -> bool:
    """The client's socket has reached its end of input: it closed, or half-closed, its side.
    Pending data (a pipelined request) is not an end. OSError if the socket failed."""
    return bool(gevent.select.select([client], [], [], 0)[0]) and client.recv(1, socket.MSG_PEEK) == b""


class Admission:
    """At most `limit` bridges serve requests at once. A request beyond it waits for a bridge to
    end, in a queue of at most `queue_size` requests, for at most `timeout` seconds; then, or when the
    queue is full, it is refused: 429 (Anthropic clients: 529 overloaded_error) with Retry-After.
    A burst is smoothed out; a flood is refused instead of exhausting the machine's memory."""

    RETRY_AFTER = "5"
    CLIENT_CHECK = 0.5  # s: how often a waiting request looks whether its client is still there

    def __init__(self, limit: int, queue_size: int, timeout: float):
        self.limit, self.queue_size, self.timeout = limit, queue_size, timeout
        self.slots = gevent.lock.Semaphore(limit)
        self.waiting = 0

    def enter(self, client: socket.socket | None = None):
        """Admitted, or ApiError 429; a waiting request whose `client` disconnects leaves the queue
        (ClientGone) instead of taking a bridge for nobody."""
        if not self.waiting and self.slots.acquire(blocking=False):
            return
        if self.waiting >= self.queue_size:
            raise self.refusal(f"all {self.limit} of its bridges are serving requests and "
                               f"{self.waiting} requests are waiting")
        self.waiting += 1
        try:
            admitted = self.wait(client)
        finally:
            self.waiting -= 1
        if not admitted:
            raise self.refusal(f"no bridge of its {self.limit} became free within {self.timeout:g} s")

    def wait(self, client: socket.socket | None) -> bool:
        deadline = time.monotonic() + self.timeout
        try:
            half_closed = client is None or client_at_end(client)  # see watch_client
            while (left := deadline - time.monotonic()) > 0:
                if self.slots.acquire(timeout=min(left, self.CLIENT_CHECK)):
                    return True
                if not half_closed and client_at_end(client):
                    raise ClientGone
        except OSError:
            raise ClientGone from None
        return False

    def leave(self):
        self.slots.release()

    def refusal(self, why: str) -> "ApiError":
        return ApiError(429, f"The proxy is busy: {why} (PI_PROXY_MAX_BRIDGES); retry in {self.RETRY_AFTER} s",
                        "overloaded_error", code="proxy_overloaded", retry_after=self.RETRY_AFTER)


class Demand:
    """How many requests ran at once lately: the most at any moment of the last `window` seconds
    (a sliding-window maximum: the deque holds (when, count) with counts decreasing)."""

    def __init__(self, window: float):
        self.window = window
        self.peaks: collections.deque = collections.deque()

    def note(self, count: int, now: float):
        while self.peaks and self.peaks[-1][1] <= count:
            self.peaks.pop()
        self.peaks.append((now, count))

    def peak(self, now: float) -> int:
        while self.peaks and self.peaks[0][0] < now - self.window:
            self.peaks.popleft()
        return self.peaks[0][1] if self.peaks else 0


class BridgePool:
    """Bridges started ahead of need, so a request does not wait for node to boot and load pi-ai.

    The pool keeps `size` bridges, or as many as requests ran at once in the last five minutes
    (at most DEMAND_CAP): clients working in parallel then find their next bridges loaded, and a
    quieter pool shrinks back to `size`. Each bridge waits for its one request with pi-ai and the
    provider modules loaded. take() hands out the oldest (the likeliest to be loaded) and starts
    a replacement in the background; an idle
    bridge that dies, or one node cannot start, is replaced a second later (a bridge that cannot
    start must not spin); drain() kills and reaps every bridge, idle or serving (retire_idle() only
    the idle ones, for a graceful shutdown). With size 0 take() spawns on demand. take() waits for
    `admission`; a bridge it hands out holds its place until its process has exited."""

    RESPAWN_DELAY = 1.0
    DEMAND_WINDOW = 300.0
    DEMAND_CAP = 8  # idle bridges cost ~57 MB each

    def __init__(self, command, size: int, admission: Admission, relay: Relay):
        self.command, self.size, self.admission = command, size, admission  # command() -> argv, read at each spawn
        self.relay = relay
        self.idle: list[Bridge] = []
        self.live: set[Bridge] = set()
        self.serving: set[Bridge] = set()
        self.demand = Demand(self.DEMAND_WINDOW)
        self.draining = False
        self._refilling = gevent.lock.Semaphore()
        self._refill_due = False
        self._shrink_due = False
        self.refill()

    def counts(self) -> dict:
        """For GET /usage: the bridges serving requests, those waiting for one, and how many the
        pool keeps now."""
        return {"serving": len(self.serving), "idle": len(self.idle), "pool": self.target()}

    def target(self) -> int:
        """How many idle bridges the pool keeps now (size 0: none, a bridge per request)."""
        recent = min(self.demand.peak(time.monotonic()), self.DEMAND_CAP, self.admission.limit)
        return max(self.size, recent) if self.size else 0

    def take(self, client: socket.socket | None = None) -> Bridge:
        """The oldest idle bridge still running, else a new one; the pool refills meanwhile.
        ApiError 503 if node cannot be started (e.g. it was uninstalled since startup), 429 if
        admission refuses; ClientGone if the `client` left while waiting for admission."""
        self.admission.enter(client)
        while self.idle:
            bridge = self.idle.pop(0)
            if bridge.proc.poll() is None:
                break
            bridge.close()
        else:
            try:
                bridge = self._spawn()
            except OSError as error:
                self.admission.leave()
                raise ApiError(503, f"The proxy cannot start its bridge process: {error}", "api_error") from None
        self.serving.add(bridge)
        self.demand.note(len(self.serving), time.monotonic())
        gevent.spawn(self.refill)
        return bridge

    def refill(self):
        with self._refilling:  # spawning yields; one refill at a time keeps the count right
            target = self.target()
            while not self.draining and len(self.idle) < target:
                try:
                    self.idle.append(self._spawn())
                except OSError as error:
                    if self.refill_later():
                        log.error("cannot start a bridge (retrying in %g s): %s", self.RESPAWN_DELAY, error)
                    return
            while len(self.idle) > target:
                self.idle.pop().close()  # the newest: the oldest are the likeliest to be loaded
            if target > self.size:
                self.shrink_later()

    def shrink_later(self):
        """A refill once the demand window has passed, which ends the bridges no longer needed."""
        if self._shrink_due:
            return
        self._shrink_due = True

        def due():
            self._shrink_due = False
            self.refill()
        gevent.spawn_later(self.DEMAND_WINDOW / 4, due)

    def refill_later(self) -> bool:
        """One refill RESPAWN_DELAY from now, unless one is already due: failing spawns must not
        multiply. True if this call scheduled it."""
        if self._refill_due:
            return False
        self._refill_due = True

        def due():
            self._refill_due = False
            self.refill()
        gevent.spawn_later(self.RESPAWN_DELAY, due)
        return True

    def _spawn(self) -> Bridge:
        token, command = secrets.token_urlsafe(24), self.command()
        bridge = Bridge(command, self.relay.environment(token, command), token)
        self.relay.bridges[token] = bridge
        self.live.add(bridge)
        gevent.spawn(self._watch, bridge)
        return bridge

    def _watch(self, bridge: Bridge):
        bridge.proc.wait()
        self.live.discard(bridge)
        self.relay.bridges.pop(bridge.token, None)
        if bridge in self.serving:
            self.serving.discard(bridge)
            self.admission.leave()
        if bridge in self.idle:
            self.idle.remove(bridge)
            bridge.close()
            log.warning("an idle bridge exited (status %s): %s", bridge.proc.returncode,
                        bridge.stderr_tail.decode(errors="replace").strip()[-300:] or "no message")
            self.refill_later()

    def retire_idle(self):
        """Stop refilling and end the idle bridges; the serving ones go on."""
        self.draining = True
        idle, self.idle = self.idle, []
        for bridge in idle:
            bridge.close()

    def drain(self, reason: str = "the proxy is shutting down"):
        self.draining = True
        self.idle.clear()
        for bridge in self.live:
            bridge.stopped_because = reason
        gevent.joinall([bridge.close() for bridge in list(self.live)])


# ==================================================================================================
# 8. pi messages
# ==================================================================================================
# What every client API's translation builds on: pi's messages as the request translators make them,
# finish_context (the end of every request -> context translation), the extras the upstream gets in
# its own vocabulary (upstream_payload), and a final message replayed as pi events.

_DATA_URI = re.compile(r"^data:(image/[a-zA-Z0-9.+-]+);base64,(.*)$", re.S)


def image_from_url(url: str, param: str) -> dict:
    """A data: URI -> a pi image block; an http(s) URL -> a block that names it, fetched later
    (fetch_remote_images) or refused."""
    if url[:8].lower().startswith(("http://", "https://")):
        return {"type": "image", "url": url, "param": param}
    found = _DATA_URI.match(url)
    if not found:
        raise ApiError(400, "Images must be base64 data: URIs or http(s) URLs", param=param,
                       code="unsupported_image_url")
    try:
        base64.b64decode(found.group(2), validate=True)
    except binascii.Error:
        raise ApiError(400, "The image data is not valid base64", param=param, code="invalid_image") from None
    return {"type": "image", "data": found.group(2), "mimeType": found.group(1)}


def text_of(blocks: list) -> str:
    return "".join(block["text"] for block in blocks if block["type"] == "text")


ZERO_USAGE = {"input": 0, "output": 0, "cacheRead": 0, "cacheWrite": 0, "totalTokens": 0,
              "cost": {"input": 0, "output": 0, "cacheRead": 0, "cacheWrite": 0, "total": 0}}


def user_message(content: list) -> dict:
    return {"role": "user", "content": content, "timestamp": 0}


def assistant_message(model: dict, content: list, has_tool_calls: bool) -> dict:
    """History rebuilt from a client is stamped with the target model, so pi-ai treats it as that
    model's own output."""
    return {
        "role": "assistant",
        "content": content,
        "api": model["api"],
        "provider": model["provider"],
        "model": model["id"],
        "usage": ZERO_USAGE,
        "stopReason": "toolUse" if has_tool_calls else "stop",
        "timestamp": 0,
    }


def tool_result(call_id: str, tool_name: str, content: list, is_error: bool = False) -> dict:
    return {"role": "toolResult", "toolCallId": call_id, "toolName": tool_name, "content": content,
            "isError": is_error, "timestamp": 0}


def parse_arguments(arguments: str | None, param: str) -> dict:
    if not arguments or not arguments.strip():
        return {}
    try:
        parsed = json.loads(arguments)
    except ValueError:
        raise ApiError(400, "Tool call arguments must be a JSON object", param=param) from None
    if not isinstance(parsed, dict):
        raise ApiError(400, "Tool call arguments must be a JSON object", param=param)
    return parsed


def json_instruction(response_format: dict) -> str:
    """APIs without a JSON mode get the request for JSON as an instruction instead."""
    schema = response_format.get("json_schema", {}).get("schema")
    if schema:
        return "Respond only with a JSON value that conforms to this JSON Schema:\n" + json.dumps(schema)
    return "Respond only with a valid JSON object."


JSON_MODE_APIS = ("openai-completions", "openai-responses")  # upstream APIs with a JSON mode of their own


def finish_context(model: dict, system: list, messages: list, tools: list, param: str,
                   response_format: dict | None = None) -> dict:
    """The end of every request -> context translation: the images checked against the model,
    the system prompt's parts (and a JSON instruction where the upstream has no JSON mode) joined
    into pi's one system prompt, the tools."""
    if "image" not in model.get("input", []) and any(
            block["type"] == "image" for message in messages if message["role"] != "assistant"
            for block in message["content"]):
        raise ApiError(400, f"The model {canonical_id(model)!r} does not accept images", param=param)
    if response_format and response_format["type"] != "text" and model["api"] not in JSON_MODE_APIS:
        system = [*system, json_instruction(response_format)]
    context = {"messages": messages}
    system_prompt = "\n\n".join(part for part in system if part)
    if system_prompt:
        context["systemPrompt"] = system_prompt
    if tools:
        context["tools"] = tools
    return context


# Extras: the fields of a client's request that pi-ai does not model, in neutral form: OpenAI chat's
# names, plus `top_k`; `tool_choice` is "auto" | "required" | "none" | {"name": N}. Per upstream API,
# the neutral names it has a field for; then its own vocabulary (UPSTREAM_VOCABULARY).
EXTRAS_BY_API = {
    "openai-completions": ("top_p", "stop", "seed", "frequency_penalty", "presence_penalty", "response_format",
                           "parallel_tool_calls", "user", "tool_choice"),
    "anthropic-messages": ("top_p", "top_k", "stop", "tool_choice", "parallel_tool_calls"),
    "openai-responses": ("top_p", "parallel_tool_calls", "user", "tool_choice", "response_format"),
}
TOOL_CHOICE_FOR_ANTHROPIC = {"auto": "auto", "required": "any", "none": "none"}  # neutral -> Anthropic's type


def upstream_payload(extras: dict, api: str) -> dict:
    """Neutral extras -> fields merged into the upstream request body (pi-ai's onPayload), in that
    API's own vocabulary. What an API has no field for is dropped (logged at DEBUG)."""
    supported = EXTRAS_BY_API.get(api, ())
    dropped = sorted(set(extras) - set(supported))
    if dropped:
        log.debug("%s has no equivalent for %s; dropped", api, ", ".join(dropped))
    payload = {name: value for name, value in extras.items() if name in supported}
    if api in UPSTREAM_VOCABULARY:
        UPSTREAM_VOCABULARY[api](payload, payload.pop("tool_choice", None))
    return payload


def completions_payload(payload: dict, choice):
    if choice is not None:
        payload["tool_choice"] = {"type": "function", "function": choice} if isinstance(choice, dict) else choice


def anthropic_payload(payload: dict, choice):
    if "stop" in payload:
        stop = payload.pop("stop")
        payload["stop_sequences"] = [stop] if isinstance(stop, str) else stop
    serial = payload.pop("parallel_tool_calls", None) is False  # Anthropic says so in its tool_choice
    if choice is not None or serial:
        payload["tool_choice"] = {"type": "tool", **choice} if isinstance(choice, dict) \
            else {"type": TOOL_CHOICE_FOR_ANTHROPIC[choice or "auto"]}
        if serial and payload["tool_choice"]["type"] != "none":
            payload["tool_choice"]["disable_parallel_tool_use"] = True


def responses_payload(payload: dict, choice):
    if choice is not None:
        payload["tool_choice"] = {"type": "function", **choice} if isinstance(choice, dict) else choice
    response_format = payload.pop("response_format", None)
    if response_format and response_format["type"] == "json_schema":
        spec = response_format["json_schema"]
        payload["text"] = {"format": {"type": "json_schema", "name": spec["name"],
                                      "schema": spec.get("schema", {}), "strict": spec.get("strict", False)}}
    elif response_format and response_format["type"] == "json_object":
        payload["text"] = {"format": {"type": "json_object"}}


UPSTREAM_VOCABULARY = {"openai-completions": completions_payload, "anthropic-messages": anthropic_payload,
                       "openai-responses": responses_payload}


@dataclass
class Exchange:
    """A client's request, translated: what the bridge is asked (context, options, the upstream
    payload) and the translator that answers pi's events in the client's API (see CLIENT_APIS)."""

    context: JsonText  # the pi context (json_text)
    options: dict
    payload: dict  # upstream_payload: fields pi-ai does not model, in the upstream API's vocabulary
    translator: object  # pi events -> the client API's frames: translate(event), fail(ApiError)
    stream: bool = True  # False: a whole reply, assembled from the translator's frames
    heartbeat: float | None = None  # seconds of upstream silence between `heartbeat` events
    client_headers: dict | None = None  # a streamProxy client's own headers (addable_headers)
    refused: Callable[[ApiError], ApiError] | None = None  # rewords a failure before any content


def pi_events(events):
    """pi-ai's events in the one shape the translators handle:
    - a tool call's arguments always arrive as toolcall_delta events: a call the upstream delivered
      whole (no deltas) gets them as one delta just before its toolcall_end;
    - a text or thinking block streams its final text: trailing whitespace waits for the block's
      next delta or its end, where the final text decides what is left to send (pi-ai's
      openai-responses reasoning streams "\n\n" after every summary part, the last one too, but its
      final text drops that one). A redacted thinking block has no text to stream."""
    streamed, sent, held, redacted = set(), {}, {}, set()
    for event in events:
        kind, index = event["type"], event.get("contentIndex")
        if kind == "toolcall_delta" and event["delta"]:
            streamed.add(index)
        elif kind == "toolcall_end" and index not in streamed:
            yield tool_arguments_delta(index, event["toolCall"])
        elif kind == "thinking_start" and event.get("redacted"):
            redacted.add(index)
        elif kind in ("text_delta", "thinking_delta"):
            text = held.pop(index, "") + event["delta"]
            settled = text.rstrip()
            held[index], sent[index] = text[len(settled):], sent.get(index, 0) + len(settled)
            if settled:
                yield {**event, "delta": settled}
            continue
        elif kind in ("text_end", "thinking_end") and index not in redacted:
            final, whitespace = event.get("content"), held.pop(index, "")
            rest = whitespace if final is None else final[sent.pop(index, 0):]
            if rest:
                yield {"type": kind.replace("_end", "_delta"), "contentIndex": index, "delta": rest}
        yield event


def tool_arguments_delta(index: int, tool_call: dict) -> dict:
    return {"type": "toolcall_delta", "contentIndex": index, "delta": json.dumps(tool_call.get("arguments") or {})}


def replayed(translator, done: dict) -> list:
    """The frames a translator makes of a `done` event's final message, replayed (whole replies)."""
    events = [{"type": "start"}, *replay_message(done["message"]), done]
    return [frame for event in events for frame in translator.translate(event)]


def replay_message(message: dict):
    """A final pi message as the events that would have streamed it (pi_events' shape), for whole
    replies."""
    for index, block in enumerate(message.get("content", [])):
        if block["type"] == "text":
            yield from ({"type": "text_start", "contentIndex": index},
                        {"type": "text_delta", "contentIndex": index, "delta": block["text"]},
                        {"type": "text_end", "contentIndex": index})
        elif block["type"] == "thinking" and block.get("redacted"):  # as the bridge streams it: no text
            yield from ({"type": "thinking_start", "contentIndex": index, "redacted": True,
                         "contentSignature": block["thinkingSignature"]},
                        {"type": "thinking_end", "contentIndex": index})
        elif block["type"] == "thinking":
            yield from ({"type": "thinking_start", "contentIndex": index},
                        {"type": "thinking_delta", "contentIndex": index, "delta": block["thinking"]},
                        {"type": "thinking_end", "contentIndex": index,
                         "contentSignature": block.get("thinkingSignature")})
        elif block["type"] == "toolCall":
            yield from ({"type": "toolcall_start", "contentIndex": index, "id": block["id"], "toolName": block["name"]},
                        tool_arguments_delta(index, block),
                        {"type": "toolcall_end", "contentIndex": index, "toolCall": block})


# ==================================================================================================
# 9. Remote images
# ==================================================================================================
# An image given by http(s) URL is fetched here, only with PI_PROXY_REMOTE_IMAGES=1: the proxy may
# sit inside a network the client cannot see, so every address a host name resolves to (at every
# redirect hop) must be public, and the connection goes to the very address that was checked.
# A request's images are fetched at once, under one deadline and one byte budget (decompressed);
# what went wrong is told as "refused" (the proxy's own rules) or "failed", never what another
# host answered or what a name resolves to (the operator's log at INFO has the details).

REMOTE_IMAGE_REDIRECTS = 3
REMOTE_IMAGE_CONNECT_TIMEOUT = 3.0  # seconds, within the whole fetch's time cap
_REDIRECTS = (301, 302, 303, 307, 308)
_INFLATED = {"gzip": 47, "x-gzip": 47, "deflate": 47}  # zlib wbits: gzip or zlib header, found out


class RemoteImageRefused(Exception):
    """Why a remote image was not used; fetch_remote_images turns it into a 400 naming the field."""


class ImageFailed(RemoteImageRefused):
    """The fetch failed on the other side; the details go to the log, not to the client."""

    def __init__(self, detail: str):
        super().__init__("fetching it failed")
        self.detail = detail


def image_type(data: bytes) -> str | None:
    """The image type the bytes really are (the types every provider accepts), or None."""
    if data[:8] == b"\x89PNG\r\n\x1a\n":
        return "image/png"
    if data[:3] == b"\xff\xd8\xff":
        return "image/jpeg"
    if data[:6] in (b"GIF87a", b"GIF89a"):
        return "image/gif"
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "image/webp"
    return None


def address_refusal(address: str) -> str | None:
    """Why an image may not be fetched from this IP address, or None if it is public."""
    ip = ipaddress.ip_address(address)
    if isinstance(ip, ipaddress.IPv6Address):  # IPv4 wrapped in IPv6 is judged as that IPv4
        ip = ip.ipv4_mapped or ip.sixtofour or (ip.teredo[1] if ip.teredo else ip)
    kinds = [("loopback", ip.is_loopback), ("link-local", ip.is_link_local), ("multicast", ip.is_multicast),
             ("unspecified", ip.is_unspecified), ("private", ip.is_private), ("reserved", ip.is_reserved),
             ("non-public", not ip.is_global)]
    kind = next((kind for kind, found in kinds if found), None)
    return kind and f"{address} is {'an' if kind[0] in 'aeiou' else 'a'} {kind} address"


def checked_addresses(host: str, port: int, resolve=socket.getaddrinfo) -> list:
    """The addresses `host` resolves to, if every one of them is allowed. A refusal names an
    address only when the URL itself gave it."""
    try:
        infos = resolve(host, port, type=socket.SOCK_STREAM)
    except (socket.gaierror, UnicodeError):
        raise ImageFailed(f"{host} does not resolve") from None
    addresses = list(dict.fromkeys(info[4][0] for info in infos))
    for address in addresses:
        refusal = address_refusal(address)
        if refusal and host == address:
            raise RemoteImageRefused(f"refused: {refusal}")
        if refusal:
            log.info("remote image refused: %s resolves to %s", host, address)
            raise RemoteImageRefused(f"refused: {host} resolves to a non-public address")
    if not addresses:
        raise ImageFailed(f"{host} does not resolve")
    return addresses


class PinnedAdapter(HTTPAdapter):
    """Connects to the address that was checked, whatever DNS answers by now; the Host header,
    TLS server name and certificate check still use the URL's host name."""

    def __init__(self, address: str):
        super().__init__(max_retries=0)
        self.address = address

    def build_connection_pool_key_attributes(self, request, verify, cert=None):
        host_params, pool_kwargs = super().build_connection_pool_key_attributes(request, verify, cert)
        if host_params["scheme"] == "https":
            pool_kwargs = {**pool_kwargs, "server_hostname": host_params["host"],
                           "assert_hostname": host_params["host"]}
        return {**host_params, "host": self.address}, pool_kwargs


class ImageBudget:
    """The bytes a request's images may still take, together (decompressed)."""

    def __init__(self, total: int):
        self.total, self.left = total, total

    def take(self, count: int):
        self.left -= count
        if self.left < 0:
            raise RemoteImageRefused(f"refused: the request's images together are larger than {self.total} bytes")


def add_remote_images(context: dict, fetch_images):
    """Replace the context's image blocks that name a URL (image_from_url) with the images
    fetch_images((URL, param) pairs) brings: fetch_remote_images, or in a large request's child
    process, the proxy's (section 15)."""
    pending = [(blocks, index) for message in context["messages"] if message["role"] != "assistant"
               for blocks in [message["content"]] for index, block in enumerate(blocks) if "url" in block]
    if pending:
        images = fetch_images([(blocks[index]["url"], blocks[index]["param"]) for blocks, index in pending])
        for (blocks, index), image in zip(pending, images, strict=True):
            blocks[index] = image


def fetch_remote_images(wanted: list, config: Config, addresses=checked_addresses) -> list:
    """The images `wanted` ((URL, param) pairs) names, in its order: all fetched at once, within
    remote_image_timeout and the byte budget; the first failure, in order of finishing, refuses the
    request and stops the other fetches. `addresses(host, port)` is the checked resolver
    (checked_addresses)."""
    first = wanted[0][1]
    if not config.remote_images:
        raise ApiError(400, f"The image at {first} is given by URL, and this proxy fetches none (its operator can "
                            "allow it with PI_PROXY_REMOTE_IMAGES=1); send the image as base64 data", param=first,
                       code="unsupported_image_url")
    if len(wanted) > config.remote_image_max_count:
        raise ApiError(400, f"The request gives {len(wanted)} images by URL; this proxy fetches at most "
                            f"{config.remote_image_max_count} (PI_PROXY_REMOTE_IMAGE_MAX_COUNT)",
                       param=wanted[config.remote_image_max_count][1], code="too_many_images")
    budget = ImageBudget(config.remote_image_max_total_bytes)
    fetches = {gevent.spawn(fetch_image, url, config, budget, addresses): index
               for index, (url, _) in enumerate(wanted)}
    images = [None] * len(wanted)
    try:
        for fetch in gevent.iwait(list(fetches), timeout=config.remote_image_timeout):
            index = fetches[fetch]
            if isinstance(fetch.exception, RemoteImageRefused):
                refuse(wanted[index][1], fetch.exception)
            images[index] = fetch.get()
        late = [index for fetch, index in fetches.items() if not fetch.ready()]
        if late:
            refuse(wanted[late[0]][1], RemoteImageRefused(
                f"refused: fetching the request's images took longer than {config.remote_image_timeout:g} s"))
    finally:
        gevent.killall(list(fetches), block=False)
    return images


def refuse(param: str, refused: RemoteImageRefused):
    if isinstance(refused, ImageFailed):
        log.info("remote image at %s: %s", param, refused.detail)
    raise ApiError(400, f"The image at {param} could not be used: {refused}", param=param,
                   code="invalid_image_url") from None


def fetch_image(url: str, config: Config, budget: ImageBudget, addresses) -> dict:
    """GET an image under the size caps, following a few redirects, each one checked."""
    try:
        for _ in range(REMOTE_IMAGE_REDIRECTS + 1):
            response = fetch_checked(url, config, addresses)
            with response:
                if response.status_code not in _REDIRECTS or "location" not in response.headers:
                    return image_in(response, config.remote_image_max_bytes, budget)
                url = urllib.parse.urljoin(url, response.headers["location"])
    except requests.RequestException as error:
        raise ImageFailed(shown(str(error), 200)) from None
    raise RemoteImageRefused(f"refused: more than {REMOTE_IMAGE_REDIRECTS} redirects")


def fetch_checked(url: str, config: Config, addresses) -> requests.Response:
    """One GET, without following redirects, to an address of the URL's host that passed the check."""
    parts = urllib.parse.urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise RemoteImageRefused(f"refused: only http and https URLs are fetched, not {shown(url, 100)}")
    try:
        port = parts.port or (443 if parts.scheme == "https" else 80)
    except ValueError:
        raise RemoteImageRefused("refused: the URL's port is not a number") from None
    host = f"[{parts.hostname}]" if ":" in parts.hostname else parts.hostname
    headers = {"Host": host + (f":{parts.port}" if parts.port else ""), "Accept": "image/*",
               "Accept-Encoding": ", ".join(_INFLATED)}
    checked = addresses(parts.hostname, port)
    for attempt, address in enumerate(checked, 1):
        with requests.Session() as session:
            session.trust_env = False  # an HTTP(S)_PROXY would connect elsewhere than the checked address
            session.mount(f"{parts.scheme}://", PinnedAdapter(address))
            try:
                return session.get(url, headers=headers, allow_redirects=False, stream=True,
                                   timeout=(min(REMOTE_IMAGE_CONNECT_TIMEOUT, config.remote_image_timeout),
                                            config.remote_image_timeout))
            except requests.ConnectionError:
                if attempt == len(checked):
                    raise


def image_in(response: requests.Response, max_bytes: int, budget: ImageBudget) -> dict:
    """The response's body as a pi image block, if it is an image no larger than max_bytes once
    decompressed (inflated here step by step, never past the cap: a small gzip body can be huge)."""
    if response.status_code != 200:
        raise ImageFailed(f"the server answered HTTP {response.status_code}")
    content_type = response.headers.get("content-type", "").split(";")[0].strip().lower()
    if not content_type.startswith("image/"):
        raise ImageFailed(f"the server sent {shown(content_type or 'no content type', 60)}, not an image")
    encoding = response.headers.get("content-encoding", "identity").strip().lower()
    if encoding != "identity" and encoding not in _INFLATED:
        raise ImageFailed(f"the server sent a body encoded as {shown(encoding, 30)}")
    too_large = RemoteImageRefused(f"refused: the image is larger than {max_bytes} bytes")
    length = response.headers.get("content-length", "")
    if encoding == "identity" and length.isdigit() and int(length) > max_bytes:
        raise too_large
    inflater = zlib.decompressobj(_INFLATED[encoding]) if encoding in _INFLATED else None
    data = bytearray()
    try:
        for chunk in response.raw.stream(65536, decode_content=False):
            while chunk:
                piece, chunk = (inflater.decompress(chunk, max_bytes - len(data) + 1), inflater.unconsumed_tail) \
                    if inflater else (chunk, b"")
                data += piece
                budget.take(len(piece))
                if len(data) > max_bytes:
                    raise too_large
    except zlib.error:
        raise ImageFailed(f"the {encoding} body does not decompress") from None
    mime_type = image_type(bytes(data[:16]))
    if mime_type is None:
        raise ImageFailed(f"the bytes sent as {shown(content_type, 60)} are not a PNG, JPEG, GIF or WebP image")
    return {"type": "image", "data": base64.b64encode(data).decode(), "mimeType": mime_type}


# ==================================================================================================
# 10. OpenAI chat completions
# ==================================================================================================

# Where OpenAI-compatible servers put an assistant's reasoning, in the order pi-ai reads them.
REASONING_FIELDS = ("reasoning_content", "reasoning", "reasoning_text")
_TEXT_PART = {"type": "object", "required": ["type", "text"],
              "properties": {"type": {"const": "text"}, "text": {"type": "string"}}}
_CONTENT = {
    "anyOf": [
        {"type": "string"},
        {"type": "null"},
        {
            "type": "array",
            "items": {
                "type": "object",
                "required": ["type"],
                "properties": {"type": {"enum": ["text", "image_url", "refusal"]}},
                "allOf": [
                    {"if": {"properties": {"type": {"const": "text"}}}, "then": _TEXT_PART},
                    {
                        "if": {"properties": {"type": {"const": "image_url"}}},
                        "then": {
                            "required": ["image_url"],
                            "properties": {
                                "image_url": {"type": "object", "required": ["url"],
                                              "properties": {"url": {"type": "string"},
                                                             "detail": ignored("pi-ai has no image detail level")}}
                            },
                        },
                    },
                ],
            },
        },
    ]
}
_TOOL_CALL = {
    "type": "object",
    "required": ["id", "function"],
    "properties": {
        "id": {"type": "string"},
        "type": {"const": "function"},
        "function": {
            "type": "object",
            "required": ["name"],
            "properties": {"name": {"type": "string"}, "arguments": {"type": "string"}},
        },
    },
}
CHAT_SCHEMA = {
    "title": "chat completions request",
    "type": "object",
    "required": ["model", "messages"],
    "properties": {
        "model": {"type": "string", "minLength": 1},
        "messages": {
            "type": "array",
            "minItems": 1,
            "items": {
                "type": "object",
                "required": ["role"],
                "properties": {
                    "role": {"enum": ["system", "developer", "user", "assistant", "tool"]},
                    "content": _CONTENT,
                    "name": ignored("pi-ai's messages name no author", {"type": "string"}),
                    "tool_calls": {"type": "array", "items": _TOOL_CALL},
                    "tool_call_id": {"type": "string"},
                    **{name: {"type": ["string", "null"]} for name in REASONING_FIELDS},
                },
                "allOf": [
                    {"if": {"properties": {"role": {"const": "tool"}}},
                     "then": {"required": ["tool_call_id", "content"]}},
                    {"if": {"properties": {"role": {"enum": ["system", "developer", "user"]}}},
                     "then": {"required": ["content"]}},
                ],
            },
        },
        "stream": {"type": "boolean"},
        "stream_options": {"type": "object", "properties": {"include_usage": {"type": "boolean"}}},
        "temperature": {"type": "number", "minimum": 0, "maximum": 2},
        "top_p": {"type": "number", "minimum": 0, "maximum": 1},
        "max_tokens": {"type": "integer", "minimum": 1},
        "max_completion_tokens": {"type": "integer", "minimum": 1},
        "stop": {"anyOf": [{"type": "string"}, {"type": "array", "items": {"type": "string"}}]},
        "seed": {"type": "integer"},
        "frequency_penalty": {"type": "number", "minimum": -2, "maximum": 2},
        "presence_penalty": {"type": "number", "minimum": -2, "maximum": 2},
        "response_format": {
            "type": "object",
            "required": ["type"],
            "properties": {"type": {"enum": ["text", "json_object", "json_schema"]}},
            "if": {"properties": {"type": {"const": "json_schema"}}},
            "then": {
                "required": ["json_schema"],
                "properties": {"json_schema": {"type": "object", "required": ["name"],
                                               "properties": {"name": {"type": "string"},
                                                              "schema": {"type": "object"}}}},
            },
        },
        "tools": {
            "type": "array",
            "items": {
                "type": "object",
                "required": ["type", "function"],
                "properties": {
                    "type": {"const": "function"},
                    "function": {
                        "type": "object",
                        "required": ["name"],
                        "properties": {
                            "name": {"type": "string", "pattern": "^[a-zA-Z0-9_.-]{1,128}$"},
                            "description": {"type": "string"},
                            "parameters": {"type": "object"},
                            "strict": ignored("pi-ai declares every tool with strict: false", {"type": "boolean"}),
                        },
                    },
                },
            },
        },
        "tool_choice": {
            "anyOf": [
                {"enum": ["auto", "none", "required"]},
                {"type": "object", "required": ["type", "function"],
                 "properties": {"type": {"const": "function"},
                                "function": {"type": "object", "required": ["name"],
                                             "properties": {"name": {"type": "string"}}}}},
            ]
        },
        "parallel_tool_calls": {"type": "boolean"},
        "reasoning_effort": {"enum": ["none", "minimal", "low", "medium", "high", "xhigh"]},
        "user": {"type": "string"},
        "metadata": ignored("metadata of stored completions: nothing is stored", {"type": "object"}),
        "store": ignored("nothing is stored", {"type": "boolean"}),
        "n": {"type": "integer", "minimum": 1},
        "logprobs": {"type": "boolean"},
        "top_logprobs": {"type": "integer", "minimum": 0},
        "logit_bias": {"type": "object"},
    },
}
CHAT_VALIDATOR = Draft202012Validator(CHAT_SCHEMA)


def chat_body(body) -> dict:
    return reject_unsupported(validate(body, CHAT_VALIDATOR))


def reject_unsupported(body: dict) -> dict:
    """Features pi-ai cannot honour are refused by name rather than silently ignored."""
    if body.get("n", 1) != 1:
        raise ApiError(400, "n > 1 is not supported by this proxy", param="n", code="unsupported_parameter")
    if body.get("logprobs"):
        raise ApiError(400, "logprobs is not supported by this proxy", param="logprobs", code="unsupported_parameter")
    for name in ("top_logprobs", "logit_bias"):
        if body.get(name):
            raise ApiError(400, f"{name} is not supported by this proxy", param=name, code="unsupported_parameter")
    return body


def chat_content_to_pi(content, param: str) -> list:
    if content is None:
        return []
    if isinstance(content, str):
        return [{"type": "text", "text": content}]
    blocks = []
    for index, part in enumerate(content):
        if part["type"] == "image_url":
            blocks.append(image_from_url(part["image_url"]["url"], f"{param}[{index}].image_url.url"))
        elif part["type"] == "refusal":
            blocks.append({"type": "text", "text": part.get("refusal", "")})
        else:
            blocks.append({"type": "text", "text": part["text"]})
    return blocks


def chat_reasoning(message: dict, model: dict, param: str) -> list:
    """An assistant message's reasoning (sent back by pi, LiteLLM, pydantic-ai; `reasoning` as
    OpenRouter names it) -> a pi thinking block. For openai-completions its signature is the
    field's name, as pi-ai's own: pi-ai replays the text in that field. Chat carries no signature
    that Anthropic or the Responses API could check, and those upstreams drop earlier turns'
    thinking anyway, so toward them it is dropped (pi-ai would make it visible text)."""
    field = next((name for name in REASONING_FIELDS if message.get(name)), None)
    if field is None:
        return []
    if model["api"] != "openai-completions":
        log.debug("dropping %s.%s: %s has no unsigned reasoning", param, field, model["api"])
        return []
    return [{"type": "thinking", "thinking": message[field], "thinkingSignature": field}]


def chat_assistant_message(message: dict, content: list, model: dict, tool_names: dict, param: str) -> dict:
    """An assistant message -> pi's; its tool calls' names are noted in `tool_names` (by call id)."""
    calls = message.get("tool_calls") or []
    blocks = chat_reasoning(message, model, param) + [b for b in content if b["text"]]
    for index, call in enumerate(calls):
        function = call["function"]
        tool_names[call["id"]] = function["name"]
        arguments = parse_arguments(function.get("arguments"), f"{param}.tool_calls[{index}].function.arguments")
        blocks.append({"type": "toolCall", "id": call["id"], "name": function["name"], "arguments": arguments})
    return assistant_message(model, blocks, bool(calls))



def chat_to_context(body: dict, model: dict) -> dict:
    """OpenAI chat messages and tools -> a pi-ai Context. System and developer messages, wherever
    they stand, become the system prompt (pi's context has only one)."""
    system, messages, tool_names = [], [], {}
    for index, message in enumerate(body["messages"]):
        role, param = message["role"], f"messages[{index}]"
        content = chat_content_to_pi(message.get("content"), f"{param}.content")
        if role in ("system", "developer"):
            system.append(text_of(content))
        elif role == "user":
            messages.append(user_message(content))
        elif role == "assistant":
            messages.append(chat_assistant_message(message, content, model, tool_names, param))
        else:
            call_id = message["tool_call_id"]
            if call_id not in tool_names:
                raise ApiError(400, f"tool_call_id {call_id!r} does not answer any earlier assistant tool call",
                               param=f"{param}.tool_call_id")
            messages.append(tool_result(call_id, tool_names[call_id], [b for b in content if b["type"] == "text"]))
    tools = [{"name": t["function"]["name"], "description": t["function"].get("description", ""),
              "parameters": t["function"].get("parameters") or {"type": "object", "properties": {}}}
             for t in body.get("tools", [])]
    return finish_context(model, system, messages, tools, "messages", body.get("response_format"))


def chat_options(body: dict) -> dict:
    """The parts of a chat request that pi-ai models itself (SimpleStreamOptions)."""
    options = {}
    if "temperature" in body:
        options["temperature"] = body["temperature"]
    max_tokens = body.get("max_completion_tokens", body.get("max_tokens"))
    if max_tokens is not None:
        options["maxTokens"] = max_tokens
    if body.get("reasoning_effort", "none") != "none":
        options["reasoning"] = body["reasoning_effort"]
    if body.get("user"):
        options["metadata"] = {"user_id": body["user"]}
    return options


def thinking_for_history(options: dict, context: dict, model: dict) -> dict:
    """`options` without `reasoning` when Anthropic would refuse the request with thinking on: it
    continues a tool loop (ends in tool results) whose assistant turn does not start with signed
    thinking, which chat completions cannot carry for Anthropic (chat_reasoning). That one turn
    then goes without thinking, as Anthropic's own error advises, instead of failing."""
    messages = context["messages"]
    turns = [m for m in messages if m["role"] != "toolResult"]
    if "reasoning" not in options or model["api"] != "anthropic-messages" or not messages \
            or messages[-1]["role"] != "toolResult" or not turns or turns[-1]["role"] != "assistant":
        return options
    first = (turns[-1]["content"] or [{"type": "text"}])[0]
    if first["type"] == "thinking" and first.get("thinkingSignature"):
        return options
    log.debug("thinking off for this turn: %s refuses a tool loop replayed without its signed thinking",
              canonical_id(model))
    return {name: value for name, value in options.items() if name not in ("reasoning", "thinkingBudgets")}


def chat_extras(body: dict) -> dict:
    """The chat request's fields that pi-ai does not model, in neutral form (see upstream_payload)."""
    extras = {name: body[name] for name in ("top_p", "stop", "seed", "frequency_penalty", "presence_penalty",
                                            "response_format", "parallel_tool_calls", "user") if name in body}
    choice = body.get("tool_choice")
    if choice is not None:
        extras["tool_choice"] = {"name": choice["function"]["name"]} if isinstance(choice, dict) else choice
    return extras


FINISH_REASONS = {"stop": "stop", "length": "length", "toolUse": "tool_calls"}


def chat_usage(usage: dict) -> dict:
    """pi-ai usage -> OpenAI usage. OpenAI counts cached tokens inside prompt_tokens."""
    prompt = usage.get("input", 0) + usage.get("cacheRead", 0) + usage.get("cacheWrite", 0)
    completion = usage.get("output", 0)
    return {
        "prompt_tokens": prompt,
        "completion_tokens": completion,
        "total_tokens": prompt + completion,
        "prompt_tokens_details": {"cached_tokens": usage.get("cacheRead", 0)},
        "cost": usage.get("cost", {}).get("total", 0),
    }


def finish_reason(message: dict, reason: str) -> str:
    if any(block["type"] == "toolCall" for block in message.get("content", [])):
        return "tool_calls"
    return FINISH_REASONS.get(reason, "stop")


def completion_of(chunks: list) -> dict:
    """A `chat.completion` object: the chunks of a stream put together, as a client would."""
    text, reasoning, calls, finish = [], [], {}, None
    for chunk in chunks[:-1]:
        choice = chunk["choices"][0]
        delta, finish = choice["delta"], choice["finish_reason"] or finish
        text.append(delta.get("content") or "")
        reasoning.append(delta.get("reasoning_content") or "")
        for call in delta.get("tool_calls", []):
            if call["index"] not in calls:
                calls[call["index"]] = {"id": call["id"], "type": "function",
                                        "function": {"name": call["function"]["name"], "arguments": ""}}
            calls[call["index"]]["function"]["arguments"] += call["function"]["arguments"]
    text, reasoning, calls = "".join(text), "".join(reasoning), list(calls.values())
    reply = {"role": "assistant", "content": text if text or not calls else None}
    if reasoning:
        reply["reasoning_content"] = reasoning
    if calls:
        reply["tool_calls"] = calls
    return {"id": chunks[-1]["id"], "object": "chat.completion", "created": chunks[-1]["created"],
            "model": chunks[-1]["model"], "choices": [{"index": 0, "message": reply, "finish_reason": finish,
                                                      "logprobs": None}], "usage": chunks[-1]["usage"]}


class ChatChunks:
    """pi events -> `chat.completion.chunk` objects, one event at a time.

    pi numbers content blocks (text, thinking, tool calls together); OpenAI numbers tool calls
    alone, so tool calls get their own index here."""

    def __init__(self, completion_id: str, model_name: str, created: int, include_usage: bool):
        self.base = {"id": completion_id, "object": "chat.completion.chunk", "created": created, "model": model_name}
        self.include_usage = include_usage
        self.tool_index: dict[int, int] = {}  # pi contentIndex -> OpenAI tool_calls index

    def chunk(self, delta: dict, finish=None) -> dict:
        return {**self.base, "choices": [{"index": 0, "delta": delta, "finish_reason": finish, "logprobs": None}]}

    def translate(self, event: dict) -> list:
        kind = event["type"]
        if kind == "start":
            return [self.chunk({"role": "assistant", "content": ""})]
        if kind == "text_delta":
            return [self.chunk({"content": event["delta"]})]
        if kind == "thinking_delta":
            return [self.chunk({"reasoning_content": event["delta"]})]
        if kind == "toolcall_start":
            index = self.tool_index.setdefault(event["contentIndex"], len(self.tool_index))
            call = {"index": index, "id": event["id"], "type": "function",
                    "function": {"name": event["toolName"], "arguments": ""}}
            return [self.chunk({"tool_calls": [call]})]
        if kind == "toolcall_delta" and event["delta"]:
            return [self.tool_arguments(event["contentIndex"], event["delta"])]
        if kind == "done":
            chunks = [self.chunk({}, finish_reason(event["message"], event["reason"]))]
            if self.include_usage:
                chunks.append({**self.base, "choices": [], "usage": chat_usage(event["message"].get("usage", {}))})
            return chunks
        return []

    def tool_arguments(self, content_index: int, arguments: str) -> dict:
        call = {"index": self.tool_index[content_index], "function": {"arguments": arguments}}
        return self.chunk({"tool_calls": [call]})

    @staticmethod
    def fail(error: ApiError) -> list:
        """A failure after the headers went out: an error chunk (`data: [DONE]` follows)."""
        return [error.openai_body()]


def prepare_chat(body: dict, model: dict, proxy, fetch_images) -> Exchange:
    context = chat_to_context(body, model)
    add_remote_images(context, fetch_images)
    stream = bool(body.get("stream"))
    include_usage = bool(body.get("stream_options", {}).get("include_usage")) or not stream
    chunks = ChatChunks(f"chatcmpl-{uuid.uuid4().hex}", body["model"], int(time.time()), include_usage)
    options = thinking_for_history(chat_options(body), context, model)
    return Exchange(json_text(context), options, upstream_payload(chat_extras(body), model["api"]), chunks, stream)


# ==================================================================================================
# 11. Anthropic messages
# ==================================================================================================

# Envelopes: what the proxy hands out that pi-ai would forward as it is (sections 11 and 12).
_REASONING_ENVELOPE = "pi-proxy.2:"  # .1 envelopes carried no MAC: they read as foreign now


def seal_reasoning(model_id: str, signature: str, key: bytes, redacted: bool = False) -> str:
    """A reasoning item's `encrypted_content`: pi-ai's signature for the thinking block (Anthropic's
    signature, or its redacted thinking's data; the whole upstream reasoning item for
    openai-responses) and the model it is valid for, with a MAC under this installation's envelope
    key (envelope_key): pi-ai forwards what is inside as is, so only what this proxy minted may
    come back in."""
    payload = json.dumps({"model": model_id, "signature": signature, **({"redacted": True} if redacted else {})},
                         separators=(",", ":"))
    sealed = _REASONING_ENVELOPE + base64.urlsafe_b64encode(payload.encode()).decode()
    return sealed + "." + _envelope_mac(sealed, key)


def _envelope_mac(sealed: str, key: bytes) -> str:
    return base64.urlsafe_b64encode(hmac.digest(key, sealed.encode(), "sha256")).decode().rstrip("=")


def open_reasoning(sealed: str | None, model: dict, key: bytes) -> dict | None:
    """The pi thinking block's signature (and redacted mark) sealed in a reasoning item, if this
    proxy's installation made it for this model; None otherwise (foreign, forged or altered)."""
    if not sealed or not sealed.startswith(_REASONING_ENVELOPE) or "." not in sealed:
        return None
    sealed, mac = sealed.rsplit(".", 1)
    if not hmac.compare_digest(mac.encode(), _envelope_mac(sealed, key).encode()):
        return None
    try:
        payload = json.loads(base64.urlsafe_b64decode(sealed[len(_REASONING_ENVELOPE):]))
    except (ValueError, binascii.Error):
        return None
    if not isinstance(payload, dict) or payload.get("model") != canonical_id(model) or not payload.get("signature"):
        return None
    return {"thinkingSignature": payload["signature"], **({"redacted": True} if payload.get("redacted") else {})}


def signature_out(model: dict, signature: str | None, key: bytes) -> str:
    """A thinking signature as a Messages client gets it: Anthropic's own as it is (Anthropic
    checks it when it comes back); any other API's, which pi-ai forwards as it is (for
    openai-responses, whole raw items), sealed like a Responses reasoning item."""
    if not signature or model["api"] == "anthropic-messages":
        return signature or ""
    return seal_reasoning(canonical_id(model), signature, key)


def signature_in(model: dict, signature: str | None, key: bytes) -> str | None:
    """A thinking signature from a Messages client as pi-ai gets it (see signature_out); None when
    this installation did not make it for this model."""
    if not signature or model["api"] == "anthropic-messages":
        return signature or None
    opened = open_reasoning(signature, model, key)
    return opened and opened["thinkingSignature"]


_A_TEXT = {"required": ["text"], "properties": {"text": {"type": "string"}}}
_A_IMAGE = {
    "required": ["source"],
    "properties": {"source": {
        "type": "object", "required": ["type"],
        "properties": {"type": {"enum": ["base64", "url"]}},
        "allOf": [{"if": {"properties": {"type": {"const": "base64"}}},
                   "then": {"required": ["media_type", "data"],
                            "properties": {"media_type": {"type": "string"}, "data": {"type": "string"}}}},
                  {"if": {"properties": {"type": {"const": "url"}}},
                   "then": {"required": ["url"], "properties": {"url": {"type": "string"}}}}],
    }},
}


_A_CACHE_CONTROL = ignored("pi-ai sets its own cache breakpoints (cacheRetention)", {"type": "object"})


def _a_blocks(allowed: list, extra_rules: list = ()) -> dict:
    rules = [{"if": {"properties": {"type": {"const": "text"}}}, "then": _A_TEXT},
             {"if": {"properties": {"type": {"const": "image"}}}, "then": _A_IMAGE}, *extra_rules]
    return {"type": "array", "items": {"type": "object", "required": ["type"], "allOf": rules,
                                       "properties": {"type": {"enum": allowed}, "cache_control": _A_CACHE_CONTROL}}}


_A_TOOL_RESULT_CONTENT = {"anyOf": [{"type": "string"}, _a_blocks(["text", "image"])]}
_A_CONTENT_RULES = [
    {"if": {"properties": {"type": {"const": "tool_use"}}},
     "then": {"required": ["id", "name"], "properties": {"id": {"type": "string"}, "name": {"type": "string"},
                                                         "input": {"type": "object"}}}},
    {"if": {"properties": {"type": {"const": "tool_result"}}},
     "then": {"required": ["tool_use_id"], "properties": {"tool_use_id": {"type": "string"},
                                                          "content": _A_TOOL_RESULT_CONTENT,
                                                          "is_error": {"type": "boolean"}}}},
    {"if": {"properties": {"type": {"const": "thinking"}}},
     "then": {"required": ["thinking"], "properties": {"thinking": {"type": "string"},
                                                       "signature": {"type": "string"}}}},
    {"if": {"properties": {"type": {"const": "redacted_thinking"}}},
     "then": {"required": ["data"], "properties": {"data": {"type": "string"}}}},
]
ANTHROPIC_BLOCK_TYPES = ["text", "image", "tool_use", "tool_result", "thinking", "redacted_thinking"]
_A_MESSAGES_PROPERTIES = {
    "model": {"type": "string", "minLength": 1},
    "messages": {
        "type": "array",
        "items": {
            "type": "object",
            "required": ["role", "content"],
            "properties": {
                "role": {"enum": ["user", "assistant", "system"]},
                "content": {"anyOf": [{"type": "string"}, _a_blocks(ANTHROPIC_BLOCK_TYPES, _A_CONTENT_RULES)]},
            },
        },
    },
    "system": {"anyOf": [{"type": "string"}, _a_blocks(["text"])]},
    "tools": {"type": "array", "items": {"type": "object", "required": ["name"], "properties": {
        "name": {"type": "string", "minLength": 1}, "description": {"type": "string"},
        "input_schema": {"type": "object"}, "type": {"type": "string"}, "cache_control": _A_CACHE_CONTROL,
        "defer_loading": ignored("every tool is sent whole", {"type": "boolean"})}}},
    "tool_choice": {
        "type": "object", "required": ["type"],
        "properties": {"type": {"enum": ["auto", "any", "tool", "none"]}, "name": {"type": "string"},
                       "disable_parallel_tool_use": {"type": "boolean"}},
        "if": {"properties": {"type": {"const": "tool"}}}, "then": {"required": ["name"]},
    },
    "thinking": {
        "type": "object", "required": ["type"],
        "properties": {"type": {"enum": ["enabled", "adaptive", "disabled"]},
                       "budget_tokens": {"type": "integer", "minimum": 1}},
        "if": {"properties": {"type": {"const": "enabled"}}}, "then": {"required": ["budget_tokens"]},
    },
    "output_config": {"type": "object", "properties": {"effort": {"enum": ["low", "medium", "high", "max"]}}},
    "temperature": {"type": "number", "minimum": 0, "maximum": 1},
    "top_p": {"type": "number", "minimum": 0, "maximum": 1},
    "top_k": {"type": "integer", "minimum": 0},
    "stop_sequences": {"type": "array", "items": {"type": "string"}},
    "metadata": {"type": "object", "properties": {"user_id": {"type": "string"}}},
    "stream": {"type": "boolean"},
    # Server-side settings whose absence changes no conversation (reject_server_state refuses the others).
    "context_management": ignored("the whole history goes upstream; nothing is cleared from it", {"type": "object"}),
    "cache_control": _A_CACHE_CONTROL,
    "service_tier": ignored("the upstream's own tier", {"type": "string"}),
    "speed": ignored("the upstream's own speed", {"type": "string"}),
    "inference_geo": ignored("the upstream's own region", {"type": "string"}),
    "diagnostics": ignored("no prompt-cache diagnostics", {"type": "object"}),
}
MESSAGES_VALIDATOR = Draft202012Validator({
    "title": "messages request", "type": "object", "required": ["model", "messages", "max_tokens"],
    "properties": {**_A_MESSAGES_PROPERTIES, "max_tokens": {"type": "integer", "minimum": 1}},
})
COUNT_TOKENS_VALIDATOR = Draft202012Validator({
    "title": "count_tokens request", "type": "object", "required": ["model", "messages"],
    "properties": _A_MESSAGES_PROPERTIES,
})


def messages_body(body) -> dict:
    return validate(body, MESSAGES_VALIDATOR)

# Tool-use ids must match ^[a-zA-Z0-9_-]+$ for Anthropic clients, but pi-ai's ids need not (the
# Responses API's are "call_x|fc_y"). Such ids are wrapped reversibly, so results still pair.
_SAFE_TOOL_ID = re.compile(r"^[a-zA-Z0-9_-]+$")
_WRAPPED_TOOL_ID = "toolu_pi_"


def client_tool_id(pi_id: str) -> str:
    if _SAFE_TOOL_ID.match(pi_id) and not pi_id.startswith(_WRAPPED_TOOL_ID):
        return pi_id
    return _WRAPPED_TOOL_ID + base64.urlsafe_b64encode(pi_id.encode()).decode().rstrip("=")


def pi_tool_id(client_id: str) -> str:
    if not client_id.startswith(_WRAPPED_TOOL_ID):
        return client_id
    wrapped = client_id[len(_WRAPPED_TOOL_ID):]
    try:
        return base64.urlsafe_b64decode(wrapped + "=" * (-len(wrapped) % 4)).decode()
    except (binascii.Error, UnicodeDecodeError):
        return client_id


def anthropic_blocks(content) -> list:
    return [{"type": "text", "text": content}] if isinstance(content, str) else content


def anthropic_image(block: dict, param: str) -> dict:
    source = block["source"]
    if source["type"] == "url":
        return image_from_url(source["url"], f"{param}.source.url")
    return {"type": "image", "data": source["data"], "mimeType": source["media_type"]}


ANTHROPIC_USER_BLOCKS = {  # a block in a user (or system) message -> a pi block
    "text": lambda block, param: {"type": "text", "text": block["text"]},
    "image": lambda block, param: anthropic_image(block, param),
}


def anthropic_user_content(blocks: list, param: str) -> list:
    content = []
    for index, block in enumerate(blocks):
        if block["type"] not in ANTHROPIC_USER_BLOCKS:
            raise ApiError(400, f"A {block['type']} block cannot stand here", param=f"{param}[{index}].type")
        content.append(ANTHROPIC_USER_BLOCKS[block["type"]](block, f"{param}[{index}]"))
    return content


# Messages fields whose state lives on Anthropic's servers: nothing here can hold or run them, and
# an answer without them would be to another conversation, so each is refused by name.
SERVER_STATE_FIELDS = {
    "thread": "message threads keep the conversation on Anthropic's servers and this proxy keeps none; "
              "send the whole history in `messages`",
    "container": "code execution containers run on Anthropic's servers, which this proxy does not reach",
    "mcp_servers": "this proxy cannot connect the model to MCP servers; declare their tools as client tools",
    "compaction": "server-side compaction is not available through this proxy; compact on the client",
}
# Tools without an input_schema are run (web search, code execution, MCP) or defined (bash, text
# editor, computer, memory) by Anthropic: no other model can be given them. Only the tool-search
# tools may go unsaid: every tool is then sent whole (defer_loading aside), which hides none.
_TOOL_SEARCH = "tool_search_tool_"


def reject_server_state(body: dict):
    for name, reason in SERVER_STATE_FIELDS.items():
        if name in body:
            # The anthropic SDK's thread helpers (tool_runner) resend unthreaded on this error_code.
            details = {"error_code": "thread_unsupported_request", "unsupported": [name]} if name == "thread" else None
            raise ApiError(400, f"{name} is not supported: {reason}", param=name, code="unsupported_parameter",
                           details=details)
    for index, tool in enumerate(body.get("tools", [])):
        kind = tool.get("type", "custom")
        if "input_schema" not in tool and kind == "custom":
            raise ApiError(400, f"tools[{index}].input_schema: Field required", param=f"tools[{index}].input_schema",
                           code="invalid_value")
        if "input_schema" not in tool and not kind.startswith(_TOOL_SEARCH):
            raise ApiError(400, f"tools[{index}]: the {shown(kind)} tool is run or defined by Anthropic itself; "
                                "this proxy can offer a model only tools with an input_schema",
                           param=f"tools[{index}].type", code="unsupported_parameter")


# The two directions side by side. A client's assistant block -> a pi block, or None (dropped): a
# signature goes to pi-ai only if it is the upstream's own or this installation's (signature_in).
ANTHROPIC_TO_PI_BLOCK = {
    "text": lambda block, model, key: {"type": "text", "text": block["text"]} if block["text"] else None,
    "thinking": lambda block, model, key: {"type": "thinking", "thinking": block["thinking"],
                                           "thinkingSignature": signature_in(model, block.get("signature"), key)},
    "redacted_thinking": lambda block, model, key: redacted_thinking_in(signature_in(model, block["data"], key)),
    "tool_use": lambda block, model, key: {"type": "toolCall", "id": pi_tool_id(block["id"]), "name": block["name"],
                                           "arguments": block.get("input") or {}},
}
# A block of pi's answer -> the block a stream's content_block_start opens (AnthropicEvents).
ANTHROPIC_BLOCK_STARTS = {  # (the translator, pi contentIndex, a redacted block's data) -> the block
    "text": lambda events, index, data: {"type": "text", "text": ""},
    "thinking": lambda events, index, data: {"type": "thinking", "thinking": "", "signature": ""},
    "redacted_thinking": lambda events, index, data: {"type": "redacted_thinking", "data": events.seal(data)},
    "tool_use": lambda events, index, data: {"type": "tool_use", "id": events.tool_calls[index][0],
                                             "name": events.tool_calls[index][1], "input": {}},
}


def redacted_thinking_in(signature: str | None) -> dict | None:
    return {"type": "thinking", "thinking": "", "thinkingSignature": signature, "redacted": True} if signature else None


def anthropic_to_context(body: dict, model: dict, key: bytes) -> dict:
    """An Anthropic Messages request -> a pi-ai Context. Tool results in a user turn become pi
    toolResult messages (ahead of the turn's other content); `role: "system"` messages are folded
    into the system prompt; assistant turns are stamped with the target model."""
    reject_server_state(body)
    system = [text_of(anthropic_blocks(body.get("system", "")))]
    messages, tool_names = [], {}
    for index, message in enumerate(body["messages"]):
        blocks, param = anthropic_blocks(message["content"]), f"messages[{index}].content"
        if message["role"] == "system":
            system.append(text_of(anthropic_user_content(blocks, param)))
        elif message["role"] == "assistant":
            content = anthropic_assistant_content(blocks, model, key, param)
            tool_names.update((block["id"], block["name"]) for block in content if block["type"] == "toolCall")
            messages.append(assistant_message(model, content, any(b["type"] == "toolCall" for b in content)))
        else:
            messages += anthropic_user_turn(blocks, tool_names, model, param)
    tools = []
    for index, tool in enumerate(body.get("tools", [])):
        if "input_schema" not in tool:  # a tool-search tool (reject_server_state)
            log.debug("ignoring tools[%d] (%s): every tool is sent whole", index, tool["type"])
            continue
        tools.append({"name": tool["name"], "description": tool.get("description", ""),
                      "parameters": tool["input_schema"]})
    return finish_context(model, system, messages, tools, "messages")


def anthropic_assistant_content(blocks: list, model: dict, key: bytes, param: str) -> list:
    content = []
    for index, block in enumerate(blocks):
        if block["type"] not in ANTHROPIC_TO_PI_BLOCK:
            raise ApiError(400, f"A {block['type']} block cannot stand in an assistant message",
                           param=f"{param}[{index}].type")
        converted = ANTHROPIC_TO_PI_BLOCK[block["type"]](block, model, key)
        if converted is not None:
            content.append(converted)
    return content


def anthropic_user_turn(blocks: list, tool_names: dict, model: dict, param: str) -> list:
    """A user message -> pi messages: its tool results first, then the rest of it."""
    messages, results = [], [(i, b) for i, b in enumerate(blocks) if b["type"] == "tool_result"]
    for index, block in results:
        call_id = pi_tool_id(block["tool_use_id"])
        result = anthropic_user_content(anthropic_blocks(block.get("content", "")), f"{param}[{index}].content")
        messages.append(tool_result(call_id, tool_names.get(call_id, ""), result, bool(block.get("is_error"))))
    rest = anthropic_user_content([b for b in blocks if b["type"] != "tool_result"], param)
    if results and rest and model["provider"] == COPILOT:
        # Copilot bills a turn as the user's (X-Initiator) unless it ends in tool results;
        # Claude Code's reminders after tool results must not make it one.
        messages[-1]["content"] = messages[-1]["content"] + rest
    elif rest or not results:
        messages.append(user_message(rest))
    return messages


def reasoning_for_budget(budget: int) -> str:
    """pi-ai's thinking levels by their default budgets (1024/2048/8192/16384 tokens)."""
    for level, limit in (("minimal", 1024), ("low", 2048), ("medium", 8192)):
        if budget <= limit:
            return level
    return "high"


ADAPTIVE_EFFORTS = {"low": "low", "medium": "medium", "high": "high", "max": "xhigh"}


def anthropic_options(body: dict) -> dict:
    options = {"maxTokens": body["max_tokens"]}
    if "temperature" in body:
        options["temperature"] = body["temperature"]
    thinking = body.get("thinking", {"type": "disabled"})
    if thinking["type"] == "enabled":
        level = reasoning_for_budget(thinking["budget_tokens"])
        options["reasoning"] = level
        options["thinkingBudgets"] = {level: thinking["budget_tokens"]}
    elif thinking["type"] == "adaptive":
        options["reasoning"] = ADAPTIVE_EFFORTS[body.get("output_config", {}).get("effort", "high")]
    user_id = body.get("metadata", {}).get("user_id")
    if user_id:
        options["metadata"] = {"user_id": user_id}
    return options


ANTHROPIC_TOOL_CHOICE = {kind: neutral for neutral, kind in TOOL_CHOICE_FOR_ANTHROPIC.items()}


def anthropic_extras(body: dict) -> dict:
    extras = {name: body[name] for name in ("top_p", "top_k") if name in body}
    if body.get("stop_sequences"):
        extras["stop"] = body["stop_sequences"]
    choice = body.get("tool_choice")
    if choice:
        extras["tool_choice"] = {"name": choice["name"]} if choice["type"] == "tool" \
            else ANTHROPIC_TOOL_CHOICE[choice["type"]]
        if choice.get("disable_parallel_tool_use"):
            extras["parallel_tool_calls"] = False
    return extras


STOP_REASONS = {"stop": "end_turn", "length": "max_tokens", "toolUse": "tool_use"}


def anthropic_stop(done: dict) -> dict:
    """stop_reason and stop_sequence for a bridge `done` event."""
    if any(block["type"] == "toolCall" for block in done["message"].get("content", [])):
        return {"stop_reason": "tool_use", "stop_sequence": None}  # Claude Code runs tools only on tool_use
    if done.get("stopSequence") is not None:
        return {"stop_reason": "stop_sequence", "stop_sequence": done["stopSequence"]}
    return {"stop_reason": STOP_REASONS.get(done["reason"], "end_turn"), "stop_sequence": None}


def anthropic_usage(usage: dict) -> dict:
    return {"input_tokens": usage.get("input", 0), "output_tokens": usage.get("output", 0),
            "cache_read_input_tokens": usage.get("cacheRead", 0),
            "cache_creation_input_tokens": usage.get("cacheWrite", 0)}


ANTHROPIC_DELTA_FIELDS = {"text_delta": "text", "thinking_delta": "thinking", "signature_delta": "signature"}


def message_of(frames: list) -> dict:
    """An Anthropic `message` object: the events of a stream put together, as a client would."""
    message, arguments = None, collections.defaultdict(str)  # block index -> its input's JSON
    for name, data in frames:
        if name == "message_start":
            message = data["message"]
        elif name == "content_block_start":
            message["content"].append(dict(data["content_block"]))
        elif name == "content_block_delta" and data["delta"]["type"] == "input_json_delta":
            arguments[data["index"]] += data["delta"]["partial_json"]
        elif name == "content_block_delta":
            field = ANTHROPIC_DELTA_FIELDS[data["delta"]["type"]]
            message["content"][data["index"]][field] += data["delta"][field]
        elif name == "message_delta":
            message.update(data["delta"], usage=data["usage"])
    for index, text in arguments.items():
        message["content"][index]["input"] = json.loads(text)
    return message


class AnthropicEvents:
    """pi events -> Anthropic stream events, (name, data) pairs, keeping Anthropic's grammar:
    message_start, then blocks one at a time (start, deltas, stop) indexed from 0, then
    message_delta and message_stop. pi may interleave blocks (openai-completions ends all its
    blocks only when the stream ends): a block is closed as soon as another one starts, and a
    later text or thinking delta for it opens a fresh block of the same kind. A tool call's
    block is never reopened (its id must stay unique), so text or thinking arriving while one is
    open is held back until it closes. Every thinking block ends with its signature_delta, as
    Anthropic's do, whenever it closes; redacted thinking is a redacted_thinking block, whole."""

    def __init__(self, message_id: str, model_name: str, input_estimate: int, seal):
        self.message_id, self.model_name, self.input_estimate = message_id, model_name, input_estimate
        self.seal = seal  # signature -> what the client gets (signature_out)
        self.open = None  # (pi contentIndex, kind) of the block now open
        self.index = -1  # the Anthropic index of the last block started
        self.tool_calls: dict[int, tuple] = {}  # pi contentIndex -> (client id, name)
        self.signatures: dict[int, str] = {}  # pi contentIndex -> its thinking signature, once known
        self.held: list[tuple] = []  # (contentIndex, kind, delta) held back while a tool call is open

    def translate(self, event: dict) -> list:
        kind, index = event["type"], event.get("contentIndex")
        if kind == "start":
            return [("message_start", {"type": "message_start", "message": {
                "id": self.message_id, "type": "message", "role": "assistant", "model": self.model_name,
                "content": [], "stop_reason": None, "stop_sequence": None,
                "usage": {"input_tokens": self.input_estimate, "output_tokens": 1,
                          "cache_read_input_tokens": 0, "cache_creation_input_tokens": 0}}})]
        if kind == "heartbeat":
            return [("ping", {"type": "ping"})]
        if kind == "thinking_start" and event.get("redacted"):
            return [*self.start_block(index, "redacted_thinking", event["contentSignature"]), *self.close()]
        if kind in ("text_start", "thinking_start"):
            if event.get("contentSignature"):  # openai-completions: known at the start, the block closes early
                self.signatures[index] = event["contentSignature"]
            return self.start_block(index, kind.split("_")[0])
        if kind == "toolcall_start":
            self.tool_calls[index] = (client_tool_id(event["id"]), event["toolName"])
            return self.start_block(index, "tool_use")
        if kind in ("text_delta", "thinking_delta"):
            block = kind.split("_")[0]
            delta = {"type": kind, block: event["delta"]}
            if self.open and self.open[1] == "tool_use":
                self.held.append((index, block, delta))
                return []
            return [*self.ensure_open(index, block), self.delta(delta)]
        if kind == "toolcall_delta" and event["delta"]:
            return [*self.ensure_open(index, "tool_use"),
                    self.delta({"type": "input_json_delta", "partial_json": event["delta"]})]
        if kind == "thinking_end" and event.get("contentSignature"):
            self.signatures[index] = event["contentSignature"]
        if kind.endswith("_end") and self.open and self.open[0] == index:
            return self.close()
        if kind == "done":
            return [*self.close(),
                    ("message_delta", {"type": "message_delta", "delta": anthropic_stop(event),
                                       "usage": anthropic_usage(event["message"].get("usage", {}))}),
                    ("message_stop", {"type": "message_stop"})]
        return []

    def start_block(self, index: int, kind: str, data: str = "") -> list:
        frames = self.close()
        self.index += 1
        self.open = (index, kind)
        block = ANTHROPIC_BLOCK_STARTS[kind](self, index, data)
        frames.append(("content_block_start", {"type": "content_block_start", "index": self.index,
                                               "content_block": block}))
        return frames

    def ensure_open(self, index: int, kind: str) -> list:
        return [] if self.open == (index, kind) else self.start_block(index, kind)

    def delta(self, delta: dict) -> tuple:
        return "content_block_delta", {"type": "content_block_delta", "index": self.index, "delta": delta}

    def close(self) -> list:
        frames = []
        if self.open is not None:
            (index, kind), self.open = self.open, None
            if kind == "thinking":
                signature = self.seal(self.signatures.get(index, ""))
                frames.append(self.delta({"type": "signature_delta", "signature": signature}))
            frames.append(("content_block_stop", {"type": "content_block_stop", "index": self.index}))
        if self.held:
            held, self.held = self.held, []
            for index, kind, delta in held:
                frames += [*self.ensure_open(index, kind), self.delta(delta)]
            frames += self.close()
        return frames

    @staticmethod
    def fail(error: ApiError) -> list:
        return [("error", error.anthropic_body())]


# Token estimate (count_tokens and message_start). No tokenizer for current Claude models exists
# offline, so this is a linear model over regex counts of BPE pre-token pieces, calibrated on the
# legacy Claude tokenizer (npm @anthropic-ai/tokenizer) over 201 samples of English and code: mean
# error 2-5%, worst 10% on held-out files. Claude 3-4.x count 10-20% more than that tokenizer,
# hence CLAUDE_SCALE; GPT-family models (o200k) count 0-25% fewer. Overcounting is the safe side:
# Claude Code compacts on these numbers. Non-English text is not calibrated.
_PIECES = re.compile(r"[A-Za-z]+|[!-/:-@\[-`{-~]+")  # ASCII letter runs and punctuation runs
_DIGIT_GROUPS = re.compile(r"[0-9]{1,3}")
_CAMEL_HUMPS = re.compile(r"[a-z][A-Z]")
_NON_ASCII = re.compile(r"[^\x00-\x7f]")
_CJK = re.compile(r"[\u3040-\u30ff\u3400-\u4dbf\u4e00-\u9fff\uac00-\ud7af\uf900-\ufaff\uff00-\uffef]")
_NON_ASCII_LETTER = re.compile(r"[^\x00-\x7f\W\d_]")
CLAUDE_SCALE = 1.15
MESSAGE_OVERHEAD = 3  # tokens of framing per message or system prompt
TOOLS_OVERHEAD = 346  # Anthropic's tool-use system prompt, present whenever tools are
IMAGE_FALLBACK_TOKENS = 1600  # the per-image maximum, when the size cannot be read


def estimate_text_tokens(text: str) -> float:
    if not text:
        return 0.0
    count = (1.044 * len(_PIECES.findall(text)) + 1.045 * len(_CAMEL_HUMPS.findall(text))
             + 1.45 * len(_DIGIT_GROUPS.findall(text)) + 1.11 * text.count("\n") + 0.59 * text.count("\t"))
    if not text.isascii():
        non_ascii, cjk = len(_NON_ASCII.findall(text)), len(_CJK.findall(text))
        letters = len(_NON_ASCII_LETTER.findall(text)) - cjk
        count += cjk + 0.5 * letters + 1.5 * (non_ascii - cjk - letters)
    return max(count, len(text) / 6)  # text without separators (base64, "aaaa") still grows


def image_size(data: bytes) -> tuple[int, int] | None:
    """(width, height) from a PNG, GIF, WebP or JPEG header."""
    if data[:8] == b"\x89PNG\r\n\x1a\n" and data[12:16] == b"IHDR":
        return struct.unpack(">II", data[16:24])
    if data[:6] in (b"GIF87a", b"GIF89a"):
        return struct.unpack("<HH", data[6:10])
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        if data[12:16] == b"VP8X":
            return int.from_bytes(data[24:27], "little") + 1, int.from_bytes(data[27:30], "little") + 1
        if data[12:16] == b"VP8L" and data[20:21] == b"\x2f":
            bits = int.from_bytes(data[21:25], "little")
            return (bits & 0x3FFF) + 1, ((bits >> 14) & 0x3FFF) + 1
        if data[12:16] == b"VP8 " and data[23:26] == b"\x9d\x01\x2a":
            width, height = struct.unpack("<HH", data[26:30])
            return width & 0x3FFF, height & 0x3FFF
        return None
    position = 2 if data[:2] == b"\xff\xd8" else len(data)
    while position + 9 <= len(data) and data[position] == 0xFF:
        marker = data[position + 1]
        if marker == 0xFF or marker in (0xD8, 0x01) or 0xD0 <= marker <= 0xD7:
            position += 1 if marker == 0xFF else 2
            continue
        if 0xC0 <= marker <= 0xCF and marker not in (0xC4, 0xC8, 0xCC):  # a start-of-frame segment
            height, width = struct.unpack(">HH", data[position + 5:position + 9])
            return width, height
        position += 2 + int.from_bytes(data[position + 2:position + 4], "big")
    return None


def estimate_image_tokens(data_b64: str) -> int:
    """Anthropic's rule: width*height/750 after scaling into 1568 px and ~1.19 megapixels."""
    head = "".join(data_b64[:262144].split())
    try:
        size = image_size(base64.b64decode(head[:len(head) - len(head) % 4]))
    except (binascii.Error, ValueError, struct.error):
        size = None
    if not size or min(size) <= 0:
        return IMAGE_FALLBACK_TOKENS
    width, height = size
    scale = min(1.0, 1568 / max(width, height), math.sqrt(1092 * 1092 / (width * height)))
    return max(1, math.ceil(max(1, int(width * scale)) * max(1, int(height * scale)) / 750))


def count_request_tokens(context: dict, model: dict) -> int:
    """An estimate of a pi context's input tokens for `model`."""
    text = estimate_text_tokens(context.get("systemPrompt", ""))
    fixed = MESSAGE_OVERHEAD * (1 + len(context["messages"]))  # framing, the same for every tokenizer
    if context.get("tools"):
        fixed += TOOLS_OVERHEAD
        text += sum(estimate_text_tokens(json.dumps(tool)) for tool in context["tools"])
    for message in context["messages"]:
        for block in message["content"]:
            if block["type"] == "text":
                text += estimate_text_tokens(block["text"])
            elif block["type"] == "toolCall":
                text += estimate_text_tokens(block["name"] + json.dumps(block["arguments"]))
            elif block["type"] == "thinking":  # Anthropic drops old thinking; counting it errs safe
                text += estimate_text_tokens(block["thinking"])
            elif block["type"] == "image":
                fixed += estimate_image_tokens(block["data"])
    scale = CLAUDE_SCALE if "claude" in model["id"] else 1.0
    return max(1, round(text * scale) + fixed)


_CLAUDE_DATE = re.compile(r"-(\d{8}|latest)$")
_VERSION_DOT = re.compile(r"(?<=\d)\.(?=\d)")


def claude_key(name: str) -> str:
    """Anthropic and Copilot spell one Claude model differently: claude-sonnet-4-5-20250929,
    claude-sonnet-4-5[1m] and claude-sonnet-4.5 all have the key claude-sonnet-4-5."""
    name = name.lower().split("[", 1)[0]
    return _VERSION_DOT.sub("-", _CLAUDE_DATE.sub("", name))


def resolve_claude_model(name: str, models: dict, is_available) -> dict:
    """Model resolution for Anthropic clients: the usual rules, then the Claude model of the same
    family and version under another spelling (a `provider/` prefix: among that provider's
    models only). Never a different version, never another provider's model."""
    try:
        return resolve_model(name.split("[", 1)[0], models, is_available)
    except ApiError as error:
        if error.status != 404:
            raise
    provider, _, bare = name.partition("/")
    key, bare_key = claude_key(name), claude_key(bare)
    matches = [m for m in models.values() if is_available(m["provider"]) and (
        claude_key(m["id"]) == key or (bare and m["provider"] == provider and claude_key(m["id"]) == bare_key))]
    if len(matches) == 1:
        return matches[0]
    if len(matches) > 1:
        candidates = ", ".join(sorted(canonical_id(m) for m in matches))
        raise ApiError(400, f"Model {shown(name)} is offered by several providers; use one of: {candidates}",
                       param="model", code="ambiguous_model")
    claudes = sorted(canonical_id(m) for m in models.values()
                     if is_available(m["provider"]) and "claude" in m["id"])
    raise ApiError(404, f"model: {shown(name)} is not available{no_such_provider(name, models)}. Available Claude "
                        "models: " + (", ".join(claudes) if claudes else "none"),
                   "not_found_error", param="model", code="model_not_found")


_CLAUDE_LINE = re.compile(r"claude-(?:[0-9.-]+-)?(opus|sonnet|haiku)\b")
_ID_DATE = re.compile(r"-(\d{4})(\d{2})(\d{2})$")
_SUPPORTED, _UNSUPPORTED = {"supported": True}, {"supported": False}
ANTHROPIC_PAGE_LIMIT, ANTHROPIC_MAX_PAGE_LIMIT = 20, 1000  # as Anthropic's GET /v1/models
LIFECYCLES = ("active", "deprecated", "retired")


def anthropic_model(model: dict) -> dict:
    """A model as Anthropic's Models API describes one. `capabilities` say what this proxy's
    /v1/messages takes for it (no batches, PDFs, citations, server tools or context management).
    The catalogue has no release dates: `created_at` is the date in the id, else the epoch (as
    Anthropic's API gives for an unknown date)."""
    date = _ID_DATE.search(model["id"])
    line = _CLAUDE_LINE.search(model["id"].lower())
    thinking = _SUPPORTED if model.get("reasoning") else _UNSUPPORTED
    return {
        "type": "model", "id": canonical_id(model), "display_name": model.get("name") or model["id"],
        "created_at": "{}-{}-{}T00:00:00Z".format(*date.groups()) if date else "1970-01-01T00:00:00Z",
        "max_input_tokens": model["contextWindow"], "max_tokens": model["maxTokens"],
        "lifecycle": "active", "deprecated_at": None, "retires_at": None, "line": line and line.group(1),
        "capabilities": {
            "batch": _UNSUPPORTED, "citations": _UNSUPPORTED, "code_execution": _UNSUPPORTED,
            "pdf_input": _UNSUPPORTED, "structured_outputs": _UNSUPPORTED,
            "image_input": _SUPPORTED if "image" in model.get("input", []) else _UNSUPPORTED,
            "context_management": {"supported": False, "clear_thinking_20251015": _UNSUPPORTED,
                                   "clear_tool_uses_20250919": _UNSUPPORTED, "compact_20260112": _UNSUPPORTED},
            "server_tools": {"supported": False, "code_execution": _UNSUPPORTED, "web_search": _UNSUPPORTED},
            "effort": {"supported": thinking["supported"], "low": thinking, "medium": thinking, "high": thinking,
                       "max": thinking, "xhigh": _UNSUPPORTED},
            "thinking": {"supported": thinking["supported"],
                         "types": {"enabled": thinking, "adaptive": thinking, "disabled": _SUPPORTED,
                                   "between_tools": _UNSUPPORTED}},
        },
    }


def anthropic_model_page(entries: list, after_id: str | None, before_id: str | None, limit: str | None,
                         lifecycles: list) -> dict:
    """One page of Anthropic's model list, as its API pages: `limit` (default 20, 1 to 1000) entries
    after `after_id` or just before `before_id` (not both; an id not in the list is a 400);
    `has_more` says whether more lie that way; `lifecycle` filters (every model here is active)."""
    try:
        count = ANTHROPIC_PAGE_LIMIT if limit is None else int(limit)
    except ValueError:
        count = 0
    if not 1 <= count <= ANTHROPIC_MAX_PAGE_LIMIT:
        raise ApiError(400, f"limit: must be an integer from 1 to {ANTHROPIC_MAX_PAGE_LIMIT}", param="limit")
    if after_id and before_id:
        raise ApiError(400, "after_id and before_id cannot both be given", param="after_id")
    unknown = [value for value in lifecycles if value not in LIFECYCLES]
    if unknown:
        raise ApiError(400, f"lifecycle: {shown(unknown[0])} is not one of {', '.join(LIFECYCLES)}", param="lifecycle")
    if lifecycles and "active" not in lifecycles:
        entries = []
    ids = [entry["id"] for entry in entries]
    for name, cursor in (("after_id", after_id), ("before_id", before_id)):
        if cursor and cursor not in ids:
            raise ApiError(400, f"{name}: no model has the id {shown(cursor)}", param=name)
    if before_id:
        end = ids.index(before_id)
        start = max(0, end - count)
        page, has_more = entries[start:end], start > 0
    else:
        start = ids.index(after_id) + 1 if after_id else 0
        page, has_more = entries[start:start + count], start + count < len(entries)
    return {"data": page, "has_more": has_more, "first_id": page[0]["id"] if page else None,
            "last_id": page[-1]["id"] if page else None}


PING_INTERVAL = 10.0  # seconds of upstream silence between Anthropic `ping` events
_TWO_NUMBERS = re.compile(r"(\d+)\D+?(\d+)")


def anthropic_overflow(error: ApiError, estimate: int, model: dict) -> ApiError:
    """Claude Code recognises a context overflow only by Anthropic's wording."""
    if error.code != "context_length_exceeded" or error.message.startswith("prompt is too long"):
        return error
    numbers = _TWO_NUMBERS.search(error.message)
    used, limit = (numbers.groups() if numbers else (estimate, model["contextWindow"]))
    return ApiError(400, f"prompt is too long: {used} tokens > {limit} maximum", code="context_length_exceeded")


def messages_context(body: dict, model: dict, proxy, fetch_images) -> tuple[dict, int]:
    """A Messages request's pi context, its images fetched, and its input-token estimate (also
    count_tokens' answer)."""
    context = anthropic_to_context(body, model, proxy.envelope_key())
    add_remote_images(context, fetch_images)
    return context, count_request_tokens(context, model)


def prepare_messages(body: dict, model: dict, proxy, fetch_images) -> Exchange:
    key = proxy.envelope_key()
    context, estimate = messages_context(body, model, proxy, fetch_images)
    events = AnthropicEvents(f"msg_{uuid.uuid4().hex[:24]}", body["model"], estimate,
                             functools.partial(signature_out, model, key=key))
    return Exchange(json_text(context), anthropic_options(body), upstream_payload(anthropic_extras(body), model["api"]),
                    events,
                    bool(body.get("stream")), PING_INTERVAL,
                    refused=functools.partial(anthropic_overflow, estimate=estimate, model=model))


# ==================================================================================================
# 12. OpenAI responses
# ==================================================================================================

_R_PARTS = {"type": ["string", "array"], "items": {"type": "object", "required": ["type"], "properties": {
    "type": {"type": "string"}, "text": {}, "refusal": {}, "image_url": {},
    "detail": ignored("pi-ai has no image detail level"),
    "annotations": ignored("citations of a replayed answer"), "logprobs": ignored("logprobs of a replayed answer")}}}
_R_ITEM_RULES = {
    "message": {"required": ["role", "content"],
                "properties": {"role": {"enum": ["user", "system", "developer", "assistant"]}, "content": _R_PARTS}},
    "function_call": {"required": ["call_id", "name"],
                      "properties": {"call_id": {"type": "string"}, "name": {"type": "string"},
                                     "namespace": {"type": "string"}, "arguments": {"type": "string"}}},
    "custom_tool_call": {"required": ["call_id", "name"],
                         "properties": {"call_id": {"type": "string"}, "name": {"type": "string"},
                                        "namespace": {"type": "string"}, "input": {"type": "string"}}},
    "function_call_output": {"required": ["call_id", "output"],
                             "properties": {"call_id": {"type": "string"}, "output": _R_PARTS}},
    "custom_tool_call_output": {"required": ["call_id", "output"],
                                "properties": {"call_id": {"type": "string"}, "output": _R_PARTS}},
    "reasoning": {"properties": {"summary": {"type": "array", "items": {"type": "object"}},
                                 "encrypted_content": {"type": ["string", "null"]}}},
    "item_reference": {"required": ["id"], "properties": {"id": {"type": "string"}}},
    "local_shell_call": {"required": ["call_id", "action"], "properties": {"call_id": {"type": "string"}, "action": {
        "type": "object", "required": ["command"],
        "properties": {"type": {"const": "exec"}, "command": {"type": "array", "items": {"type": "string"}},
                       "env": {"type": "object"}, "working_directory": {}, "timeout_ms": {}, "user": {}}}}},
    # OpenAI's reference names the call by `id`, the AI SDK by `call_id`.
    "local_shell_call_output": {"required": ["output"], "anyOf": [{"required": ["call_id"]}, {"required": ["id"]}],
                                "properties": {"call_id": {"type": "string"}, "id": {"type": "string"},
                                               "output": {"type": "string"}}},
}
HOSTED_TOOLS_DROPPED = ("web_search", "web_search_preview", "web_search_2025_08_26", "web_search_preview_2025_03_11",
                        "tool_search")  # they only add facts the model would look up (Codex always declares web_search)

_R_TOOL_RULES = {
    "function": {"required": ["name"], "properties": {"name": {"type": "string", "minLength": 1},
                                                      "description": {"type": ["string", "null"]},
                                                      "parameters": {"type": ["object", "null"]}}},
    "custom": {"required": ["name"], "properties": {"name": {"type": "string", "minLength": 1},
                                                    "description": {"type": ["string", "null"]},
                                                    "format": {"type": "object"}}},
}
_R_TOOL = {"type": "object", "required": ["type"], "properties": {"type": {"type": "string"}},
           "allOf": [{"if": {"properties": {"type": {"const": kind}}}, "then": rule}
                     for kind, rule in _R_TOOL_RULES.items()]
           + [{"if": {"properties": {"type": {"enum": list(HOSTED_TOOLS_DROPPED)}}},
               "then": {"additionalProperties": ignored("a hosted tool this proxy drops: nothing here can run it")}}]}
_R_TOOLS = {"type": "array", "items": {
    "allOf": [_R_TOOL, {"if": {"properties": {"type": {"const": "namespace"}}},
                        "then": {"required": ["name", "tools"],
                                 "properties": {"name": {"type": "string"},
                                                "tools": {"type": "array", "items": _R_TOOL}}}}]}}
RESPONSES_VALIDATOR = Draft202012Validator({
    "title": "responses request",
    "type": "object",
    "required": ["model", "input"],
    "properties": {
        "model": {"type": "string", "minLength": 1},
        "input": {"type": ["string", "array"], "items": {
            "type": "object",
            "properties": {"type": {"type": "string"},
                           "id": ignored("the id of a replayed output item"),
                           "status": ignored("the status of a replayed output item")},
            # An item without a type is a message (OpenAI's "easy input message").
            "allOf": [{"if": {"properties": {"type": {"const": kind}},
                              **({} if kind == "message" else {"required": ["type"]})},
                       "then": rule} for kind, rule in _R_ITEM_RULES.items()]}},
        "instructions": {"type": "string"},
        "tools": _R_TOOLS,
        "tool_choice": {"anyOf": [{"enum": ["auto", "none", "required"]},
                                  {"type": "object", "required": ["type"],
                                   "properties": {"type": {"type": "string"}, "name": {"type": "string"},
                                                  "namespace": {"type": "string"}}}]},
        "parallel_tool_calls": {"type": "boolean"},
        "reasoning": {"type": "object", "properties": {
            "effort": {"enum": ["none", "minimal", "low", "medium", "high", "xhigh", None]}}},
        "max_output_tokens": {"type": "integer", "minimum": 1},
        "temperature": {"type": "number", "minimum": 0, "maximum": 2},
        "top_p": {"type": "number", "minimum": 0, "maximum": 1},
        "text": {"type": "object", "properties": {"format": {
            "type": "object", "required": ["type"],
            "properties": {"type": {"enum": ["text", "json_object", "json_schema"]}},
            "if": {"properties": {"type": {"const": "json_schema"}}},
            "then": {"required": ["name"], "properties": {"name": {"type": "string"}, "schema": {"type": "object"}}}}}},
        "store": {"type": "boolean"},
        "stream": {"type": "boolean"},
        "metadata": {"type": "object"},
        "user": {"type": "string"},
        "include": {"type": "array", "items": {"type": "string"}},
        "prompt_cache_key": {"type": "string"},
        "previous_response_id": {"type": "string"},
        "background": {"type": "boolean"},
    },
})


def responses_body(body) -> dict:
    return reject_stateful(validate(body, RESPONSES_VALIDATOR))


def reject_stateful(body: dict) -> dict:
    """Conversations and background responses live on OpenAI's servers only (stored responses: ResponseStore)."""
    if body.get("conversation"):
        raise ApiError(400, "conversation is not supported: this proxy keeps no conversations; send the whole "
                            "conversation in `input`, or chain responses with previous_response_id",
                       param="conversation", code="unsupported_parameter")
    if body.get("background"):
        raise ApiError(400, "background responses are not supported by this proxy", param="background",
                       code="unsupported_parameter")
    return body


class ResponseStore:
    """What this proxy answered on /v1/responses, for the clients that refer to it later as OpenAI's
    stored responses allow: output items by id (`item_reference`), responses by id
    (`previous_response_id`). Only in this process's memory (a restart forgets it all), as JSON text:
    at most `max_bytes` of it; nothing older than `max_age` seconds is used; the least recently used
    goes first. Ids are 128-bit random and nothing lists them: an id is a capability, whoever
    presents it may use what it names (as input, never read back directly)."""

    ENTRY_BYTES = 400  # what an entry costs beyond its JSON text (its key, tuple, bytes object, slot): ~370 measured

    def __init__(self, max_bytes: int, max_age: float, clock=time.monotonic):
        self.max_bytes, self.max_age, self.clock = max_bytes, max_age, clock
        # ("item" or "response", id) -> (expiry, JSON text), least recently used first
        self.entries = collections.OrderedDict()
        self.size = 0
        self.hits = None  # in a large request's child process, the keys it read: the proxy refreshes them (touch)

    def put(self, key: tuple, value):
        self.put_json(key, json.dumps(value, separators=(",", ":")).encode())

    def put_json(self, key: tuple, data: bytes):
        if len(data) + self.ENTRY_BYTES > self.max_bytes:
            log.debug("not storing %s %s: %d bytes are more than the store holds", *key, len(data))
            return
        self.entries[key] = (self.clock() + self.max_age, data)
        self.size += len(data) + self.ENTRY_BYTES
        while self.entries and (self.size > self.max_bytes or self.expired(next(iter(self.entries)))):
            self.drop(next(iter(self.entries)))

    def get(self, key: tuple, budget: "ByteBudget"):
        """The value stored under `key` (charged to `budget`), or None."""
        if key not in self.entries:
            return None
        if self.expired(key):
            self.drop(key)
            return None
        self.entries.move_to_end(key)
        if self.hits is not None:
            self.hits.append(key)
        data = self.entries[key][1]
        budget.charge(len(data))
        return json.loads(data)

    def expired(self, key: tuple) -> bool:
        return self.entries[key][0] <= self.clock()

    def touch(self, keys: list):
        """Make what a child process read (in its own copy of the store) the most recently used here."""
        for key in keys:
            if key in self.entries:
                self.entries.move_to_end(key)

    def drop(self, key: tuple):
        self.size -= len(self.entries.pop(key)[1]) + self.ENTRY_BYTES

    def keep(self, response: dict, input_json: JsonText, previous: str | None):
        """A finished response: its output items under their ids; under its own id, its previous
        response, its input as sent (input_json: its items as JSON text) and its output's ids (what
        previous_response_id brings back)."""
        for item in response["output"]:
            self.put(("item", item["id"]), item)
        output = json.dumps([item["id"] for item in response["output"]]).encode()
        self.put_json(("response", response["id"]),
                      b'{"previous":%s,"input":%s,"output":%s}' % (json.dumps(previous).encode(), b"".join(input_json),
                                                                    output))

    def history(self, response_id: str, budget: "ByteBudget") -> list | None:
        """As OpenAI defines previous_response_id: the response's input items and output items,
        after those of its own previous response, and so on; None if any of it is forgotten."""
        chain = []
        while response_id is not None:
            record = self.get(("response", response_id), budget)
            if record is None:
                return None
            chain.append(record)
            response_id = record["previous"]
        items = []
        for record in reversed(chain):
            for item in [*record["input"], *({"type": "item_reference", "id": id_} for id_ in record["output"])]:
                item = self.get(("item", item["id"]), budget) if item.get("type") == "item_reference" else item
                if item is None:
                    return None
                items.append(item)
        return items


def input_items(body: dict) -> list:
    """`input` as a list of items (a string is one user message)."""
    return body["input"] if isinstance(body["input"], list) else [{"role": "user", "content": body["input"]}]


class ByteBudget:
    """What one request may bring back from the store: no more than a request body may hold (else a
    few references, each to a large item, would expand into any amount of memory)."""

    def __init__(self, limit: int):
        self.limit = self.left = limit

    def charge(self, size: int):
        self.left -= size
        if self.left < 0:
            raise ApiError(413, f"The input with the items and responses it refers to comes to more than {self.limit} "
                                "bytes (PI_PROXY_MAX_BODY_SIZE)", "request_too_large")


def stored_input(body: dict, store: ResponseStore, max_bytes: int) -> list:
    """(param, item) pairs: the history of `previous_response_id`, then `input` with each
    `item_reference` replaced by the item it names. What cannot be found is a 400, never dropped."""
    budget, items = ByteBudget(max_bytes), []
    previous = body.get("previous_response_id")
    if previous:
        history = store.history(previous, budget)
        if history is None:
            raise ApiError(400, f"Previous response with id {shown(previous)} not found. This proxy keeps responses "
                                "in memory for a limited time and size (PI_PROXY_RESPONSE_STORE_AGE_S, _BYTES) "
                                "and forgets them when it restarts: send the whole conversation in `input`.",
                           param="previous_response_id", code="previous_response_not_found")
        items += [("previous_response_id", item) for item in history]
    for index, item in enumerate(input_items(body)):
        if item.get("type") == "item_reference":
            found = store.get(("item", item["id"]), budget)
            if found is None:
                raise ApiError(400, f"Item with id {shown(item['id'])} not found. This proxy keeps the "
                                    "items it produced in memory for a limited time and size, and forgets them when "
                                    "it restarts: send the items themselves (with the AI SDK: `store: false`).",
                               param=f"input[{index}]", code="item_not_found")
            item = found
        items.append((f"input[{index}]", item))
    return items


@dataclass(frozen=True)
class ClientTool:
    """A tool as the client declared it; pi sees each as one function tool."""

    name: str
    namespace: str | None = None
    kind: str = "function"  # or "custom" (freeform: one string argument, CUSTOM_INPUT), or LOCAL_SHELL


CUSTOM_INPUT = "input"
LOCAL_SHELL = "local_shell"  # OpenAI's tool for running commands on the client's machine: a function to pi
LOCAL_SHELL_PARAMETERS = {"type": "object", "required": ["command"], "properties": {
    "command": {"type": "array", "items": {"type": "string"}, "description": "The program and its arguments"},
    "working_directory": {"type": "string"}, "timeout_ms": {"type": "integer"},
    "env": {"type": "object", "additionalProperties": {"type": "string"}}, "user": {"type": "string"}}}
# Tools that OpenAI runs on its servers. Without them the model answers another question (it cannot
# search the user's files, run code, see the screen, draw, or reach the MCP server): a 400. Others,
# web search above all (HOSTED_TOOLS_DROPPED), are dropped.
HOSTED_TOOLS_REFUSED = {"file_search", "code_interpreter", "computer_use_preview", "computer_use", "image_generation",
                        "mcp"}


def responses_tools(tools: list) -> tuple[list, dict]:
    """Responses tools -> (pi tools, pi tool name -> ClientTool). Namespaces are flattened (a name
    that two namespaces share becomes `namespace__name`); a custom tool takes its raw text as one
    string argument; local_shell becomes a function of the same name; a hosted tool is refused
    (HOSTED_TOOLS_REFUSED) or, if its absence changes no answer, dropped."""
    declared = []
    for index, tool in enumerate(tools):
        inner = [(f"tools[{index}].tools[{n}]", t, tool["name"]) for n, t in enumerate(tool["tools"])] \
            if tool["type"] == "namespace" else [(f"tools[{index}]", tool, None)]
        for param, tool_, namespace in inner:
            if tool_["type"] in ("function", "custom"):
                declared.append((tool_, namespace))
            elif tool_["type"] == LOCAL_SHELL:
                declared.append(({"type": LOCAL_SHELL, "name": LOCAL_SHELL, "parameters": LOCAL_SHELL_PARAMETERS,
                                  "description": "Run a command on the user's machine and get its output."}, None))
            elif tool_["type"] in HOSTED_TOOLS_REFUSED:
                raise ApiError(400, f"The hosted tool {tool_['type']!r} is not available through this proxy: the "
                                    "upstream models cannot run it here. Remove it from `tools`.",
                               param=f"{param}.type", code="unsupported_tool")
            else:
                log.debug("dropping hosted tool %s at %s", tool_["type"], param)
    counts = collections.Counter(tool["name"] for tool, _ in declared)
    pi_tools, by_pi_name = [], {}
    for tool, namespace in declared:
        pi_name = tool["name"] if counts[tool["name"]] == 1 or not namespace else f"{namespace}__{tool['name']}"
        description = tool.get("description") or ""
        if tool["type"] == "custom":
            grammar = (tool.get("format") or {}).get("definition")
            if grammar:
                description += f"\n\nThe `{CUSTOM_INPUT}` argument must follow this grammar:\n{grammar}"
            parameters = {"type": "object", "properties": {CUSTOM_INPUT: {"type": "string"}},
                          "required": [CUSTOM_INPUT]}
        else:
            parameters = tool.get("parameters") or {"type": "object", "properties": {}}
        pi_tools.append({"name": pi_name, "description": description, "parameters": parameters})
        by_pi_name[pi_name] = ClientTool(tool["name"], namespace, tool["type"])
    return pi_tools, by_pi_name


def response_parts_to_pi(content, param: str) -> list:
    """Message or tool-output content (a string or parts) -> pi text and image blocks."""
    if isinstance(content, str):
        return [{"type": "text", "text": content}]
    blocks = []
    for index, part in enumerate(content):
        if part["type"] == "input_image":
            if not isinstance(part.get("image_url"), str):
                raise ApiError(400, "Images are accepted as data: URIs or http(s) URLs in `image_url`",
                               param=f"{param}[{index}].image_url", code="unsupported_image_url")
            blocks.append(image_from_url(part["image_url"], f"{param}[{index}].image_url"))
        elif isinstance(part.get("text") or part.get("refusal"), str):
            blocks.append({"type": "text", "text": part.get("text") or part["refusal"]})
        else:
            log.debug("dropping a %s content part at %s", part["type"], param)
    return blocks


def loose_text(item: dict) -> str:
    """The text an input item of an unknown type carries, if any."""
    for name in ("text", "content", "output", "input"):
        value = item.get(name)
        if isinstance(value, str) and value:
            return value
        if isinstance(value, list):
            text = "".join(part["text"] for part in value
                           if isinstance(part, dict) and isinstance(part.get("text"), str))
            if text:
                return text
    return ""


class ResponsesInput:
    """A Responses request's input items -> pi messages, an item at a time (RESPONSES_INPUT_ITEMS
    names the method that takes it). `instructions` and system/developer messages become the
    system prompt; consecutive output items (reasoning, assistant messages, tool calls) form one
    assistant turn, stamped with the target model; reasoning items are kept only when they were
    made for this very model; items of unknown types are kept as text when they carry any."""

    def __init__(self, model: dict, tools: dict, key: bytes, instructions: str):
        self.model, self.key = model, key
        self.pi_names = {(tool.namespace, tool.name): pi_name for pi_name, tool in tools.items()}
        self.system, self.messages, self.turn, self.tool_names = [instructions], [], [], {}

    def end_turn(self):
        if self.turn:
            self.messages.append(assistant_message(self.model, self.turn,
                                                   any(block["type"] == "toolCall" for block in self.turn)))
            self.turn = []

    def system_text(self, item: dict, param: str):
        self.system.append(text_of(response_parts_to_pi(item["content"], f"{param}.content")))

    def assistant_text(self, item: dict, param: str):
        self.turn += [b for b in response_parts_to_pi(item["content"], f"{param}.content") if b["type"] == "text"]

    def user_input(self, item: dict, param: str):
        self.end_turn()
        content = response_parts_to_pi(item["content"], f"{param}.content")
        if content:
            self.messages.append(user_message(content))

    def reasoning(self, item: dict, param: str):
        opened = open_reasoning(item.get("encrypted_content"), self.model, self.key)
        if opened is None:
            log.debug("dropping reasoning item %s: not made for %s", param, canonical_id(self.model))
            return
        thinking = "".join(part.get("text", "") for part in item.get("summary") or [])
        self.turn.append({"type": "thinking", "thinking": thinking, **opened})

    def tool_call(self, item: dict, param: str):
        name = LOCAL_SHELL if item["type"] == "local_shell_call" else item["name"]
        pi_name = self.pi_names.get((item.get("namespace"), name), name)
        if item["type"] == "custom_tool_call":
            arguments = {CUSTOM_INPUT: item.get("input", "")}
        elif item["type"] == "local_shell_call":
            arguments = {key: value for key, value in item["action"].items() if key != "type" and value is not None}
        else:
            arguments = parse_arguments(item.get("arguments"), f"{param}.arguments")
        self.tool_names[item["call_id"]] = pi_name
        self.turn.append({"type": "toolCall", "id": item["call_id"], "name": pi_name, "arguments": arguments})

    def tool_output(self, item: dict, param: str):
        self.end_turn()
        call_id = item.get("call_id", item.get("id"))
        if call_id not in self.tool_names:
            raise ApiError(400, f"call_id {call_id!r} does not answer any earlier tool call",
                           param=f"{param}.{'call_id' if 'call_id' in item else 'id'}")
        self.messages.append(tool_result(call_id, self.tool_names[call_id],
                                         response_parts_to_pi(item["output"], f"{param}.output")))

    def other(self, item: dict, param: str):
        self.end_turn()
        text = loose_text(item)
        log.debug("input item %s of type %s kept as %s", param, item.get("type", "message"),
                  "text" if text else "nothing")
        if text:
            self.messages.append(user_message([{"type": "text", "text": text}]))


RESPONSES_INPUT_ITEMS = {  # (item type, a message's role) -> the ResponsesInput method that takes the item
    ("message", "system"): ResponsesInput.system_text,
    ("message", "developer"): ResponsesInput.system_text,
    ("message", "assistant"): ResponsesInput.assistant_text,
    ("message", "user"): ResponsesInput.user_input,
    ("reasoning", None): ResponsesInput.reasoning,
    ("function_call", None): ResponsesInput.tool_call,
    ("custom_tool_call", None): ResponsesInput.tool_call,
    ("function_call_output", None): ResponsesInput.tool_output,
    ("custom_tool_call_output", None): ResponsesInput.tool_output,
    ("local_shell_call", None): ResponsesInput.tool_call,
    ("local_shell_call_output", None): ResponsesInput.tool_output,
}


def responses_to_context(body: dict, items: list, model: dict, pi_tools: list, tools: dict, key: bytes) -> dict:
    """A Responses request and its input items ((param, item) pairs: stored_input) -> a pi-ai
    Context (see ResponsesInput)."""
    history = ResponsesInput(model, tools, key, body.get("instructions", ""))
    for param, item in items:
        kind = item.get("type", "message")
        take = RESPONSES_INPUT_ITEMS.get((kind, item.get("role") if kind == "message" else None), ResponsesInput.other)
        take(history, item, param)
    history.end_turn()
    return finish_context(model, history.system, history.messages, pi_tools, "input", responses_format(body))


def responses_format(body: dict) -> dict | None:
    """`text.format` -> chat's `response_format`, the neutral form upstream_payload knows."""
    spec = body.get("text", {}).get("format")
    if not spec or spec["type"] == "text":
        return None
    if spec["type"] == "json_object":
        return {"type": "json_object"}
    return {"type": "json_schema", "json_schema": {"name": spec["name"], "schema": spec.get("schema", {}),
                                                   "strict": bool(spec.get("strict"))}}


def responses_as_chat(body: dict, tools: dict) -> dict:
    """The Responses fields that chat completions also has, under chat's names, so that
    chat_options and chat_extras translate them."""
    chat = {name: body[name] for name in ("temperature", "top_p", "parallel_tool_calls", "user") if name in body}
    if "max_output_tokens" in body:
        chat["max_completion_tokens"] = body["max_output_tokens"]
    if body.get("reasoning", {}).get("effort"):
        chat["reasoning_effort"] = body["reasoning"]["effort"]
    response_format = responses_format(body)
    if response_format:
        chat["response_format"] = response_format
    choice = body.get("tool_choice")
    if isinstance(choice, str):
        chat["tool_choice"] = choice
    elif isinstance(choice, dict) and (choice["type"] == LOCAL_SHELL or choice["type"] in ("function", "custom")
                                       and choice.get("name")):
        pi_names = {(t.namespace, t.name): pi_name for pi_name, t in tools.items()}
        name = choice.get("name", LOCAL_SHELL)
        chat["tool_choice"] = {"type": "function",
                               "function": {"name": pi_names.get((choice.get("namespace"), name), name)}}
    elif choice is not None:
        log.debug("tool_choice of type %s has no pi equivalent; using auto", choice["type"])
    return chat


def responses_options(body: dict, chat: dict) -> dict:
    options = chat_options(chat)
    if body.get("prompt_cache_key"):
        check_header(None, body["prompt_cache_key"], "prompt_cache_key")
        options["sessionId"] = body["prompt_cache_key"]
    return options


def responses_usage(usage: dict) -> dict:
    """pi-ai usage -> Responses usage. Like OpenAI, input_tokens includes the cached tokens."""
    chat = chat_usage(usage)
    return {"input_tokens": chat["prompt_tokens"],
            "input_tokens_details": {"cached_tokens": chat["prompt_tokens_details"]["cached_tokens"]},
            "output_tokens": chat["completion_tokens"], "output_tokens_details": {"reasoning_tokens": 0},
            "total_tokens": chat["total_tokens"]}


def response_object(body: dict, response_id: str, created: int) -> dict:
    """The `response` object's fields that do not change while it streams."""
    return {"id": response_id, "object": "response", "created_at": created, "status": "in_progress",
            "error": None, "incomplete_details": None, "instructions": body.get("instructions"),
            "max_output_tokens": body.get("max_output_tokens"), "model": body["model"], "output": [],
            "parallel_tool_calls": body.get("parallel_tool_calls", True),
            "previous_response_id": body.get("previous_response_id"),
            "reasoning": {"effort": None, "summary": None, **body.get("reasoning", {})}, "store": stored(body),
            "temperature": body.get("temperature"), "text": body.get("text", {"format": {"type": "text"}}),
            "tool_choice": body.get("tool_choice", "auto"), "tools": body.get("tools", []),
            "top_p": body.get("top_p"), "truncation": "disabled", "usage": None, "user": body.get("user"),
            "metadata": body.get("metadata", {})}


def stored(body: dict) -> bool:
    """Whether the response is kept for later reference: OpenAI's default, unless `store: false`."""
    return body.get("store", True)


def failure_code(error: ApiError) -> str:
    """An ApiError -> the `code` of a failed response (the codes Codex recognises)."""
    if error.status == 429:
        return "rate_limit_exceeded"
    return error.code or ("server_error" if error.status >= 500 else error.type)


ITEM_OF_BLOCK = {"text": "message", "thinking": "reasoning", "toolcall": "tool"}
ITEM_PREFIXES = {"function": "fc", "custom": "ctc", LOCAL_SHELL: "lsh"}  # a tool call item's id, by ClientTool.kind


def local_shell_action(arguments: str) -> dict | None:
    """A local_shell function call's arguments -> the `action` of its local_shell_call item, or None
    if they do not name a command."""
    try:
        action = json.loads(arguments)
    except ValueError:
        return None
    if not isinstance(action, dict) or not isinstance(action.get("command"), list) or not action["command"] \
            or not all(isinstance(word, str) for word in action["command"]):
        return None
    known = {name: action[name] for name in LOCAL_SHELL_PARAMETERS["properties"] if action.get(name) is not None}
    return {"type": "exec", "env": {}, **known}




class ResponsesEvents:
    """pi events -> Responses stream events (dicts with `type` and `sequence_number`).

    Output items stream one at a time: output_item.added, the item's own events, output_item.done.
    pi may interleave blocks (openai-completions ends all its blocks only when the stream ends), so
    an item is finished as soon as another block needs the stream, and a later delta for it opens
    a new item. The terminal event's response lists every finished item; a response that completes
    (or is cut short by its token limit) goes to `keep` if given."""

    def __init__(self, response: dict, model_id: str, tools: dict, key: bytes, keep=None):
        self.response, self.model_id, self.tools, self.key, self.keep = response, model_id, tools, key, keep
        self.sequence = 0
        self.output = []  # finished items
        self.open = None  # (pi contentIndex, item kind, item) now streaming
        self.text = []  # the open item's text, summary or arguments so far, in pieces (joined once)
        self.calls = {}  # pi contentIndex -> (call id, pi tool name)
        self.signatures = {}  # pi contentIndex -> a thinking block's signature, known at its start
        self.redacted = set()  # pi contentIndex of redacted thinking: a reasoning item with no summary

    def event(self, type_: str, **fields) -> dict:
        event = {"type": type_, **fields, "sequence_number": self.sequence}
        self.sequence += 1
        return event

    def translate(self, event: dict) -> list:
        kind, index = event["type"], event.get("contentIndex")
        if kind == "start":
            return [self.event("response.created", response=self.snapshot("in_progress")),
                    self.event("response.in_progress", response=self.snapshot("in_progress"))]
        if kind in ("text_start", "thinking_start", "toolcall_start"):
            if kind == "toolcall_start":
                self.calls[index] = (event["id"], event["toolName"])
            if event.get("contentSignature"):
                self.signatures[index] = event["contentSignature"]
            if event.get("redacted"):
                self.redacted.add(index)
            return self.start_item(index, ITEM_OF_BLOCK[kind.split("_")[0]])
        if kind == "text_delta":
            return [*self.ensure_open(index, "message"), self.delta("response.output_text.delta", event["delta"])]
        if kind == "thinking_delta" and event["delta"]:
            return [*self.ensure_open(index, "reasoning"), *self.summary_delta(event["delta"])]
        if kind == "toolcall_delta" and event["delta"]:
            frames = self.ensure_open(index, "tool")
            self.text.append(event["delta"])
            if self.open[2]["type"] == "function_call":
                frames.append(self.event("response.function_call_arguments.delta", item_id=self.open[2]["id"],
                                         output_index=len(self.output), delta=event["delta"]))
            return frames
        if kind == "thinking_end" and self.is_open(index):
            return self.finish(signature=event.get("contentSignature"))
        if kind.endswith("_end") and self.is_open(index):
            return self.finish()
        if kind == "done":
            message = event["message"]
            frames = self.finish()
            incomplete = event["reason"] == "length"
            response = self.snapshot("incomplete" if incomplete else "completed")
            response["usage"] = responses_usage(message.get("usage", {}))
            if incomplete:
                response["incomplete_details"] = {"reason": "max_output_tokens"}
            if self.keep is not None:
                self.keep(response)
            return [*frames, self.event(f"response.{response['status']}", response=response)]
        return []

    def fail(self, error: ApiError) -> list:
        """The terminal event for a stream that broke after it began."""
        frames = self.finish()
        response = self.snapshot("failed")
        response["error"] = {"code": failure_code(error), "message": error.message}
        return [*frames, self.event("response.failed", response=response)]

    def snapshot(self, status: str) -> dict:
        return {**self.response, "status": status, "output": list(self.output)}

    def is_open(self, index: int) -> bool:
        return self.open is not None and self.open[0] == index

    def ensure_open(self, index: int, kind: str) -> list:
        return [] if self.open is not None and self.open[:2] == (index, kind) else self.start_item(index, kind)

    def start_item(self, index: int, kind: str) -> list:
        frames = self.finish()
        if kind == "message":
            item = {"id": f"msg_{uuid.uuid4().hex}", "type": "message", "status": "in_progress",
                    "role": "assistant", "content": []}
        elif kind == "reasoning":
            item = {"id": f"rs_{uuid.uuid4().hex}", "type": "reasoning", "summary": []}
        else:
            call_id, pi_name = self.calls[index]
            tool = self.tools.get(pi_name, ClientTool(pi_name))
            item = {"id": f"{ITEM_PREFIXES[tool.kind]}_{uuid.uuid4().hex}", "status": "in_progress", "call_id": call_id}
            if tool.kind == LOCAL_SHELL:
                item |= {"type": "local_shell_call", "action": {"type": "exec", "command": [], "env": {}}}
            else:
                item |= {"type": "custom_tool_call", "name": tool.name, "input": ""} if tool.kind == "custom" \
                    else {"type": "function_call", "name": tool.name, "arguments": ""}
            if tool.namespace:
                item["namespace"] = tool.namespace
        self.open, self.text = (index, kind, item), []
        frames.append(self.event("response.output_item.added", output_index=len(self.output), item=dict(item)))
        if item["type"] == "message":
            frames.append(self.event("response.content_part.added", item_id=item["id"], output_index=len(self.output),
                                     content_index=0, part=self.text_part("")))
        return frames

    def delta(self, type_: str, delta: str) -> dict:
        self.text.append(delta)
        return self.event(type_, item_id=self.open[2]["id"], output_index=len(self.output), content_index=0,
                          delta=delta, logprobs=[])

    def summary_delta(self, delta: str) -> list:
        item_id, frames = self.open[2]["id"], []
        if not any(self.text):
            frames.append(self.event("response.reasoning_summary_part.added", item_id=item_id,
                                     output_index=len(self.output), summary_index=0,
                                     part={"type": "summary_text", "text": ""}))
        self.text.append(delta)
        frames.append(self.event("response.reasoning_summary_text.delta", item_id=item_id,
                                 output_index=len(self.output), summary_index=0, delta=delta))
        return frames

    @staticmethod
    def text_part(text: str) -> dict:
        return {"type": "output_text", "text": text, "annotations": [], "logprobs": []}

    def finish(self, signature: str | None = None) -> list:
        """Close the open item: its closing events and output_item.done."""
        if self.open is None:
            return []
        (index, _, item), text, where = self.open, "".join(self.text), {"output_index": len(self.output)}
        self.open, where["item_id"] = None, item["id"]
        frames = []
        if item["type"] == "message":
            item |= {"status": "completed", "content": [self.text_part(text)]}
            frames += [self.event("response.output_text.done", **where, content_index=0, text=text, logprobs=[]),
                       self.event("response.content_part.done", **where, content_index=0, part=self.text_part(text))]
        elif item["type"] == "reasoning":
            if text:
                part = {"type": "summary_text", "text": text}
                item["summary"] = [part]
                frames += [self.event("response.reasoning_summary_text.done", **where, summary_index=0, text=text),
                           self.event("response.reasoning_summary_part.done", **where, summary_index=0, part=part)]
            signature = signature or self.signatures.get(index)
            if signature:
                item["encrypted_content"] = seal_reasoning(self.model_id, signature, self.key, index in self.redacted)
        else:
            if not text:  # a call cut short before its first argument
                text = "{}"
                if item["type"] == "function_call":
                    frames.append(self.event("response.function_call_arguments.delta", **where, delta=text))
            # What was streamed cannot be taken back: a call cut short stays as it is, marked incomplete.
            item["status"] = "completed" if _is_json_object(text) else "incomplete"
            if item["type"] == "local_shell_call":
                action = local_shell_action(text)
                item["status"] = "completed" if action else "incomplete"
                item["action"] = action or item["action"]
            elif item["type"] == "function_call":
                item["arguments"] = text
                frames.append(self.event("response.function_call_arguments.done", **where, name=item["name"],
                                         arguments=text))
            else:
                value = json.loads(text).get(CUSTOM_INPUT) if item["status"] == "completed" else None
                item["input"] = value if isinstance(value, str) else text
                frames += [self.event("response.custom_tool_call_input.delta", **where, delta=item["input"]),
                           self.event("response.custom_tool_call_input.done", **where, input=item["input"])]
        self.output.append(item)
        frames.append(self.event("response.output_item.done", output_index=where["output_index"], item=item))
        return frames


def _is_json_object(text: str) -> bool:
    try:
        return isinstance(json.loads(text), dict)
    except ValueError:
        return False


def prepare_responses(body: dict, model: dict, proxy, fetch_images) -> Exchange:
    key = proxy.envelope_key()
    pi_tools, tools = responses_tools(body.get("tools", []))
    items = stored_input(body, proxy.response_store, proxy.config.max_body_size)
    context = responses_to_context(body, items, model, pi_tools, tools, key)
    add_remote_images(context, fetch_images)
    chat = responses_as_chat(body, tools)
    # Kept as sent: its item_reference entries are resolved again when a later response chains onto it.
    keep = functools.partial(proxy.response_store.keep, input_json=json_text(input_items(body)),
                             previous=body.get("previous_response_id")) if stored(body) else None
    events = ResponsesEvents(response_object(body, f"resp_{uuid.uuid4().hex}", int(time.time())),
                             canonical_id(model), tools, key, keep)
    return Exchange(json_text(context), responses_options(body, chat),
                    upstream_payload(chat_extras(chat), model["api"]), events, bool(body.get("stream")))


def response_of(frames: list) -> dict:
    """The `response` object: the terminal event's."""
    return frames[-1]["response"]


# ==================================================================================================
# 13. pi streamProxy
# ==================================================================================================
# pi-agent-core's streamProxy(model, context, {proxyUrl, authToken}) posts {model, context,
# options} to /api/stream and rebuilds the message from pi's own events, reduced (no `partial`).
# The client's model object only names the model: connection fields (baseUrl, headers, api)
# come from this proxy's registry, or a client could send the server's keys anywhere.

_PI_TEXT = {"required": ["text"], "properties": {"text": {"type": "string"}}}
_PI_IMAGE = {"required": ["data", "mimeType"],
             "properties": {"data": {"type": "string"}, "mimeType": {"type": "string"}}}
_PI_THINKING = {"required": ["thinking"], "properties": {"thinking": {"type": "string"}}}
_PI_TOOL_CALL = {"required": ["id", "name", "arguments"],
                 "properties": {"id": {"type": "string"}, "name": {"type": "string"},
                                "arguments": {"type": "object"}}}
_PI_BLOCK_RULES = {"text": _PI_TEXT, "image": _PI_IMAGE, "thinking": _PI_THINKING, "toolCall": _PI_TOOL_CALL}


_PI_OWN = {}  # the fields of pi-ai's own types not checked here (signatures, usage...): pi-ai reads them


def _pi_blocks(allowed: list) -> dict:
    return {"type": "array", "items": {
        "type": "object", "required": ["type"], "properties": {"type": {"enum": allowed}},
        "additionalProperties": _PI_OWN,
        "allOf": [{"if": {"properties": {"type": {"const": kind}}}, "then": _PI_BLOCK_RULES[kind]}
                  for kind in allowed]}}


_PI_MESSAGE_RULES = {
    "user": {"required": ["content"],
             "properties": {"content": {"anyOf": [{"type": "string"}, _pi_blocks(["text", "image"])]}}},
    "assistant": {"required": ["content"],
                  "properties": {"content": _pi_blocks(["text", "thinking", "toolCall"]),
                                 "api": {"type": "string"}, "provider": {"type": "string"},
                                 "model": {"type": "string"}, "stopReason": {"type": "string"}}},
    "toolResult": {"required": ["toolCallId", "content"],
                   "properties": {"toolCallId": {"type": "string"}, "toolName": {"type": "string"},
                                  "content": _pi_blocks(["text", "image"]), "isError": {"type": "boolean"}}},
}
PI_STREAM_VALIDATOR = Draft202012Validator({
    "title": "streamProxy request",
    "type": "object",
    "required": ["model", "context"],
    "properties": {
        "model": {"type": "object", "required": ["provider", "id"],
                  "properties": {"provider": {"type": "string", "minLength": 1},
                                 "id": {"type": "string", "minLength": 1}},
                  "additionalProperties": ignored("the model is this proxy's: only its provider and id are read")},
        "context": {"type": "object", "required": ["messages"], "additionalProperties": _PI_OWN, "properties": {
            "systemPrompt": {"type": "string"},
            "messages": {"type": "array", "items": {
                "type": "object", "required": ["role"], "additionalProperties": _PI_OWN,
                "properties": {"role": {"enum": list(_PI_MESSAGE_RULES)}},
                "allOf": [{"if": {"properties": {"role": {"const": role}}}, "then": rule}
                          for role, rule in _PI_MESSAGE_RULES.items()]}},
            "tools": {"type": "array", "items": {
                "type": "object", "required": ["name", "parameters"], "additionalProperties": _PI_OWN,
                "properties": {"name": {"type": "string", "minLength": 1}, "description": {"type": "string"},
                               "parameters": {"type": "object"}}}},
        }},
        "options": {"type": "object", "properties": {
            "temperature": {"type": "number", "minimum": 0},
            "maxTokens": {"type": "integer", "minimum": 1},
            "reasoning": {"enum": ["minimal", "low", "medium", "high", "xhigh"]},
            "thinkingBudgets": {"type": "object", "additionalProperties": {"type": "integer", "minimum": 1}},
            "cacheRetention": {"enum": ["none", "short", "long"]},
            "sessionId": {"type": "string"},
            "metadata": {"type": "object"},
            "maxRetryDelayMs": {"type": "integer", "minimum": 0},
            "headers": {"type": "object", "additionalProperties": {"type": "string"}},
            "transport": ignored("the proxy makes the upstream connections"),
        }},
    },
})
PI_STREAM_OPTIONS = ("temperature", "maxTokens", "reasoning", "thinkingBudgets", "cacheRetention", "sessionId",
                     "metadata", "maxRetryDelayMs")
# Headers a client may never set: those that carry credentials in some provider's requests, and
# those that frame the request or concern one connection (the upstream's HTTP client sets them).
CREDENTIAL_HEADERS = frozenset({"authorization", "proxy-authorization", "x-api-key", "api-key", "x-goog-api-key",
                                "cf-aig-authorization", "chatgpt-account-id", "cookie"})
FRAMING_HEADERS = frozenset({"host", "content-length", "transfer-encoding", "content-encoding", "connection",
                             "keep-alive", "proxy-connection", "te", "trailer", "upgrade", "expect"})


def pi_stream_body(body) -> dict:
    """The validated request; `null` options mean "not set", as everywhere."""
    if isinstance(body, dict) and isinstance(body.get("options"), dict):
        body = {**body, "options": {k: v for k, v in body["options"].items() if v is not None}}
    return validate(body, PI_STREAM_VALIDATOR)


def pi_stream_options(options: dict) -> dict:
    """The options pi-ai is given (PI_STREAM_VALIDATOR marks the ignored ones)."""
    if "sessionId" in options:
        check_header(None, options["sessionId"], "options.sessionId")
    for name, value in (options.get("headers") or {}).items():
        check_header(name, value, f"options.headers.{name}")
    return {name: options[name] for name in PI_STREAM_OPTIONS if name in options}


def addable_headers(requested: dict) -> dict:
    """A client's extra headers, minus credential and framing headers (names compare
    case-insensitively). The bridge adds them to each upstream request only where pi-ai and the
    proxy set no header of that name, so they never replace one. Values stay literal: unlike
    models.json values they are never resolved as environment variable names or `!commands`."""
    forbidden = CREDENTIAL_HEADERS | FRAMING_HEADERS
    dropped = sorted(name for name in requested if name.lower() in forbidden)
    if dropped:
        log.info("a client may not set these headers; dropped: %s", ", ".join(dropped))
    return {name: value for name, value in requested.items() if name.lower() not in forbidden}


def lookup_pi_model(model: dict, models: dict, is_available) -> dict:
    """The registry's model named by the client's (provider, id); no other field of it is used."""
    name = f"{model['provider']}/{model['id']}"
    if name not in models:
        raise ApiError(404, f"The model {name!r} does not exist on this proxy", "not_found_error",
                       param="model", code="model_not_found")
    return resolve_model(name, models, is_available)


# streamProxy's client rebuilds a tool call from its id, name and arguments alone, and a message
# from its events' stopReason and usage. So Google's thoughtSignature on a tool call, which Gemini
# wants back with the call, travels in the call's id (`<id>|pi-thought:<signature>`, the
# signature being base64) and is put back where pi-ai keeps it when the conversation returns.
_THOUGHT_IN_ID = "|pi-thought:"


def pi_stream_call_id(call_id: str, thought_signature: str | None) -> str:
    return f"{call_id}{_THOUGHT_IN_ID}{thought_signature}" if thought_signature else call_id


def pi_stream_context(context: dict) -> dict:
    """A streamProxy client's context as pi-ai made it: tool call ids that carry a thoughtSignature
    (pi_stream_call_id) become the id and the call's thoughtSignature again."""
    messages = []
    for message in context["messages"]:
        if message["role"] == "assistant":
            content = []
            for block in message["content"]:
                call_id, found, signature = block.get("id", "").partition(_THOUGHT_IN_ID)
                if block["type"] == "toolCall" and found:
                    block = {"thoughtSignature": signature, **block, "id": call_id}
                content.append(block)
            message = {**message, "content": content}
        elif message["role"] == "toolResult" and _THOUGHT_IN_ID in message["toolCallId"]:
            message = {**message, "toolCallId": message["toolCallId"].partition(_THOUGHT_IN_ID)[0]}
        messages.append(message)
    return {**context, "messages": messages}


class PiStreamEvents:
    """Bridge events (in pi_events' shape) -> streamProxy events. The bridge already prints pi's
    reduced events; what changes is the end (usage instead of the whole message; and pi-ai's
    responseId, which pi-agent-core 0.73.1's client does not read) and a tool call's id
    (pi_stream_call_id). What streamProxy rebuilds only from deltas, pi_events already gives as
    deltas: every tool call's arguments, and each block's final text."""

    def __init__(self, secrets=()):
        self.secrets = secrets  # redacted from error messages (those of Call.error already are)

    def translate(self, event: dict) -> list:
        kind = event["type"]
        if kind in ("text_end", "thinking_end"):
            return [{name: value for name, value in event.items() if name != "content"}]
        if kind == "toolcall_start":
            return [{"type": kind, "contentIndex": event["contentIndex"], "toolName": event["toolName"],
                     "id": pi_stream_call_id(event["id"], event.get("thoughtSignature"))}]
        if kind == "toolcall_end":
            return [{"type": kind, "contentIndex": event["contentIndex"]}]
        if kind == "done":
            done = {"type": kind, "reason": event["reason"], "usage": event["message"].get("usage") or ZERO_USAGE}
            response_id = event["message"].get("responseId")
            return [{**done, "responseId": response_id} if response_id else done]
        if kind == "error":
            message = event.get("message") or {}
            return [{"type": kind, "reason": event["reason"],
                     "errorMessage": redact(message.get("errorMessage") or "upstream error", self.secrets),
                     "usage": message.get("usage") or ZERO_USAGE}]
        return [event]

    def fail(self, error: ApiError) -> list:
        """An upstream failure, before any content too: the stream's final `error` event, with pi-ai's
        own message, as calling pi-ai directly would give."""
        return self.translate(error.upstream_event)


def prepare_pi(body: dict, model: dict, proxy, fetch_images) -> Exchange:
    options = body.get("options", {})
    return Exchange(json_text(pi_stream_context(body["context"])), pi_stream_options(options), {}, PiStreamEvents(),
                    client_headers=options.get("headers"))


# ==================================================================================================
# 14. Usage
# ==================================================================================================
# One RequestRecord per API request: created when the request is admitted, fed the bridge's events
# by its Call, finished when the response's last byte is written (the response's close). Finishing
# writes the request's log line and adds it to the Ledger behind GET /usage.

REQUEST_ID = re.compile(r"[A-Za-z0-9._:+=/-]{8,128}")  # an incoming x-request-id reused only if it matches
TOKEN_KINDS = {"input": "input", "output": "output", "cacheRead": "cache_read", "cacheWrite": "cache_write"}
ERROR_OUTCOMES = {*ERROR_TYPES.values(), "api_error", "timeout_error", "error"}  # failures inside a 200 stream


def request_id(incoming: str | None) -> str:
    return incoming if incoming and REQUEST_ID.fullmatch(incoming) else f"req_{uuid.uuid4().hex[:24]}"


class RequestRecord:
    """What one API request did, never what it said: no message text, no keys."""

    def __init__(self, id_: str, endpoint: str):
        self.id, self.endpoint = id_, endpoint
        self.time, self.started = time.time(), time.monotonic()
        self.model = self.resolved = self.api = self.error = self.last = self.first_token = None
        self.stream, self.status, self.client_gone = False, None, False

    def note_body(self, body):
        if isinstance(body, dict):
            model = body.get("model")
            if isinstance(model, dict):  # pi's streamProxy names a model by provider and id
                model = f"{model.get('provider')}/{model.get('id')}"
            # repr's escapes: no newline or control character of a client's reaches a log line
            self.model = shown(model, 80)[1:-1] if isinstance(model, str) else None
            self.stream = self.endpoint == "api/stream" or body.get("stream") is True

    def note_model(self, model: dict):
        self.resolved, self.api = canonical_id(model), model["api"]

    def observe(self, events):
        """The bridge's events, passed through; notes the first content and the last event."""
        for event in events:
            if event["type"] in ("done", "error"):
                self.last = event
            elif self.first_token is None and event["type"] not in ("start", "heartbeat"):
                self.first_token = time.monotonic()
            yield event

    def fields(self) -> dict:
        usage = ((self.last or {}).get("message") or {}).get("usage") or {}
        if self.error is None and self.last is not None and self.last["type"] == "error":
            self.error = upstream_error(self.last).type
        if self.client_gone or (self.stream and self.status == 200 and self.last is None):
            outcome = "client_gone"
        else:
            outcome = self.error or (self.last or {}).get("reason") or ("ok" if self.status < 400 else "error")
        record = {"time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(self.time)), "id": self.id,
                  "endpoint": self.endpoint, "model": self.model, "resolved": self.resolved, "api": self.api,
                  "stream": self.stream, "status": self.status, "outcome": outcome}
        for kind, name in TOKEN_KINDS.items():
            record[name] = usage.get(kind) or 0
        record["cost_usd"] = round((usage.get("cost") or {}).get("total") or 0, 6)
        record["ttft_ms"] = None if self.first_token is None else round((self.first_token - self.started) * 1000)
        record["total_ms"] = round((time.monotonic() - self.started) * 1000)
        return record

    def finish(self, ledger: "Ledger"):
        record = self.fields()
        ledger.add(record)
        log.info(log_line(record), extra={"request": record})


def log_line(record: dict) -> str:
    """The human-readable form: `request <id> chat gpt-4o -> openai/gpt-4o ... total=812ms`."""
    resolved = f" -> {record['resolved']} ({record['api']})" if record["resolved"] else ""
    ttft = "-" if record["ttft_ms"] is None else f"{record['ttft_ms']}ms"
    return (f"request {record['id']} {record['endpoint']} {record['model'] or '-'}{resolved}"
            f" {'stream' if record['stream'] else 'whole'} {record['status']} {record['outcome']}"
            f" in={record['input']} out={record['output']} cache_read={record['cache_read']}"
            f" cache_write={record['cache_write']} cost=${record['cost_usd']:.6f} ttft={ttft}"
            f" total={record['total_ms']}ms")


class JsonLogFormatter(logging.Formatter):
    """PI_PROXY_LOG_FORMAT=json: one JSON object per line; a request's line carries its record's fields."""

    def format(self, record: logging.LogRecord) -> str:
        line = {"time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + f".{int(record.msecs):03d}Z",
                "level": record.levelname, "logger": record.name}
        line.update(getattr(record, "request", None) or {"message": record.getMessage()})
        if record.exc_info:
            line["exception"] = self.formatException(record.exc_info)
        return json.dumps(line)


class Figures:
    """Requests, errors, tokens by kind, cost and time to first token (p50/p90 over the last 1,000)."""

    def __init__(self):
        self.requests = self.errors = 0
        self.tokens = dict.fromkeys(TOKEN_KINDS.values(), 0)
        self.cost = 0.0
        self.ttfts = collections.deque(maxlen=1000)

    def add(self, record: dict):
        self.requests += 1
        self.errors += record["status"] >= 400 or record["outcome"] in ERROR_OUTCOMES
        for name in self.tokens:
            self.tokens[name] += record[name]
        self.cost += record["cost_usd"]
        if record["ttft_ms"] is not None:
            self.ttfts.append(record["ttft_ms"])

    def summary(self) -> dict:
        ordered = sorted(self.ttfts)

        def percentile(p):
            return ordered[min(len(ordered) - 1, int(p * len(ordered)))] if ordered else None

        return {"requests": self.requests, "errors": self.errors, "tokens": dict(self.tokens),
                "cost_usd": round(self.cost, 6), "ttft_ms": {"p50": percentile(0.5), "p90": percentile(0.9)}}


class Ledger:
    """Usage since start, in bounded memory: totals, per model (models come from the registry), one
    bucket per minute for the last hour, the last 100 records."""

    def __init__(self):
        self.started = time.time()
        self.totals, self.models = Figures(), collections.defaultdict(Figures)
        self.minutes = collections.deque(maxlen=60)  # [minute (epoch s), requests, errors, tokens, cost]
        self.recent = collections.deque(maxlen=100)

    def add(self, record: dict):
        self.totals.add(record)
        if record["resolved"]:
            self.models[record["resolved"]].add(record)
        minute = int(time.time()) // 60 * 60
        if not self.minutes or self.minutes[-1][0] != minute:
            self.minutes.append([minute, 0, 0, 0, 0.0])
        bucket = self.minutes[-1]
        bucket[1] += 1
        bucket[2] += record["status"] >= 400 or record["outcome"] in ERROR_OUTCOMES
        bucket[3] += sum(record[name] for name in TOKEN_KINDS.values())
        bucket[4] += record["cost_usd"]
        self.recent.append(record)

    def report(self) -> dict:
        now = int(time.time()) // 60 * 60
        buckets = {bucket[0]: bucket for bucket in self.minutes}
        series = [buckets.get(minute, [minute, 0, 0, 0, 0.0]) for minute in range(now - 59 * 60, now + 60, 60)]
        return {
            "since": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(self.started)),
            "totals": self.totals.summary(),
            "models": {name: figures.summary() for name, figures in sorted(self.models.items())},
            "minutes": [{"minute": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(minute)), "requests": requests,
                         "errors": errors, "tokens": tokens, "cost_usd": round(cost, 6)}
                        for minute, requests, errors, tokens, cost in series],
            "recent": list(self.recent),
        }


def copilot_quota(github: tuple[str, str | None], redirects: dict) -> dict:
    """The Copilot subscription's quota as GitHub reports it to Copilot clients (the endpoint VS Code's
    Copilot reads): plan, reset date, premium requests, chat and completions; a failure is the answer."""
    token, enterprise = github
    host = urllib.parse.urlsplit(enterprise if "://" in enterprise else f"https://{enterprise}").hostname \
        if enterprise else "github.com"
    url = f"https://api.{host}/copilot_internal/user"
    for origin, target in redirects.items():
        if url.startswith(origin):
            url = target + url[len(origin):]
    try:
        reply = requests.get(url, timeout=10, headers={**COPILOT_CLIENT_HEADERS, "Authorization": f"token {token}"})
        if reply.status_code != 200:
            return {"error": f"GitHub answered {reply.status_code} to the quota request"}
        data = reply.json()
    except (requests.RequestException, ValueError) as error:
        return {"error": f"the quota request failed: {type(error).__name__}"}
    snapshots = data.get("quota_snapshots") or {}
    limited, monthly = data.get("limited_user_quotas") or {}, data.get("monthly_quotas") or {}

    def quota(name: str, old_name: str):
        snapshot = snapshots.get(name)
        if snapshot is None and old_name in monthly:  # free plans: remaining of a monthly allowance
            total, left = monthly[old_name], limited.get(old_name, monthly[old_name])
            snapshot = {"entitlement": total, "remaining": left,
                        "percent_remaining": 100 * left / total if total else 0}
        if not isinstance(snapshot, dict):
            return None
        if snapshot.get("unlimited"):
            return "unlimited"
        return {key: snapshot.get(key)
                for key in ("entitlement", "remaining", "percent_remaining", "overage_permitted")}

    return {"plan": data.get("copilot_plan"),
            "reset": data.get("quota_reset_date") or data.get("limited_user_reset_date"),
            "premium_requests": quota("premium_interactions", "premium_interactions"),
            "chat": quota("chat", "chat"), "completions": quota("completions", "completions")}


COPILOT_CLIENT_HEADERS = {"Accept": "application/json", "Editor-Version": "vscode/1.107.0",
                          "Editor-Plugin-Version": "copilot-chat/0.35.0", "User-Agent": "GitHubCopilotChat/0.35.0",
                          "X-GitHub-Api-Version": "2025-04-01"}


def quota_lines(quota: dict) -> list:
    """`python proxy.py usage`: the quota for the terminal."""
    if "error" in quota:
        return [f"GitHub Copilot quota: unavailable ({quota['error']})"]
    lines = [f"GitHub Copilot plan: {quota['plan'] or 'unknown'}"
             + (f", resets {quota['reset']}" if quota["reset"] else "")]
    for key, label in (("premium_requests", "premium requests"), ("chat", "chat"), ("completions", "completions")):
        figures = quota[key]
        if figures == "unlimited" or figures is None:
            lines.append(f"  {label:17} {figures or 'not reported'}")
        else:
            lines.append(f"  {label:17} {figures['remaining'] or 0:g} of {figures['entitlement'] or 0:g} left "
                         f"({figures['percent_remaining'] or 0:.1f}%)")
    return lines


# ==================================================================================================
# 15. HTTP
# ==================================================================================================


def sse_data(payload) -> bytes:
    return b"data: " + json.dumps(payload, separators=(",", ":")).encode() + b"\n\n"


UPSTREAM_KEY_HEADER = "X-Pi-Upstream-Api-Key"  # a client's own upstream key, for this request only


@dataclass
class ClientRequest:
    """What the code below the routes needs of an API request, read from Flask's `request` once, by
    its route: Proxy and Call never read Flask's globals."""

    record: "RequestRecord"
    upstream_key: str | None = None  # UPSTREAM_KEY_HEADER: the client's own key for the upstream
    connection: socket.socket | None = None  # the client's socket: a Call watches it (watch_client)
    calls: list = field(default_factory=list)  # its Calls that no response owns yet (create_app's close_calls)


class Proxy:
    """The server's state: configuration, models and credentials, and how to run the bridge."""

    def __init__(self, config: Config, node: str, registry: Registry, credentials: Credentials):
        self.config, self.node = config, node
        self.registry, self.credentials = registry, credentials
        self.started = int(time.time())
        self.apis_by_provider = {}
        for model in registry.models.values():
            self.apis_by_provider.setdefault(model["provider"], set()).add(model["api"])
        self.relay = Relay(config.upstream_timeout_ms / 1000)
        self.bridges = BridgePool(self.bridge_command, config.bridge_pool,
                                  Admission(config.max_bridges, config.queue_size, config.queue_timeout_s), self.relay)
        self._envelope_key = None  # read or made on first use
        self.response_store = ResponseStore(config.response_store_bytes, config.response_store_age_s)
        self.preparers = gevent.lock.BoundedSemaphore(os.cpu_count() or 2)  # child processes (prepared)
        self.ledger = Ledger()
        self._quota = (0.0, None)  # (when fetched, the Copilot quota), kept for a minute

    def envelope_key(self) -> bytes:
        if self._envelope_key is None:
            self._envelope_key = envelope_key(self.config.agent_dir)
        return self._envelope_key

    def copilot_quota(self) -> dict | None:
        """The Copilot quota (None without a Copilot login), fetched at most once a minute."""
        github = self.credentials.github_token()
        if github is None:
            return None
        fetched, quota = self._quota
        if quota is None or time.monotonic() - fetched > 60:
            quota = copilot_quota(github, self.config.test_redirects)
            self._quota = (time.monotonic(), quota)
        return quota

    def is_available(self, provider: str) -> bool:
        return self.credentials.source(provider) is not None

    def available_models(self) -> list:
        providers = {model["provider"] for model in self.registry.models.values()}
        available = {provider for provider in providers if self.is_available(provider)}  # once each
        return [m for m in self.registry.models.values() if m["provider"] in available]

    def model_availability(self, upstream_key: str | None):
        """Which providers a request may use: all of them when it brings its own upstream key."""
        return (lambda provider: True) if upstream_key else self.is_available

    def start(self, model: dict, exchange: Exchange, client: ClientRequest) -> "Call":
        """Start the upstream call, read up to its first content (see Call). If the upstream
        refuses a refreshable token (401), it is refreshed and the call made once more: nothing
        has reached the client yet."""
        client.record.note_model(model)
        options = within_output_limit(exchange.options, model)
        credential = Credential(client.upstream_key, "request header") if client.upstream_key else \
            self.credentials.for_provider(model["provider"])
        if credential is None:
            raise ApiError(401, f"No credentials for provider {model['provider']!r}", "authentication_error")
        while True:
            bridge_request, secrets = self.stream_request(model, options, exchange.payload, credential,
                                                          exchange.client_headers)
            try:
                return self.open_stream(bridge_line(bridge_request, exchange.context), secrets, exchange.heartbeat,
                                        client)
            except ApiError as error:
                if error.status != 401 or not credential.refreshable:
                    raise
            log.info("the upstream refused the %s token; refreshing it and retrying once", model["provider"])
            credential = self.credentials.for_provider(model["provider"], bad_key=credential.key)
            credential.refreshable = False

    def stream_request(self, model: dict, options: dict, payload: dict, credential: Credential,
                       client_headers: dict | None = None) -> tuple[dict, list]:
        """The bridge request for one call (its context aside: bridge_line), and the secrets that
        must never reach the client.
        `client_headers` are a client's own additions (see addable_headers)."""
        settings = self.registry.settings.get(model["provider"], ProviderSettings())
        # pi-ai sends the model's own headers; models.json's provider headers, then its model
        # headers, go over them (resolved like keys), then authHeader's Authorization.
        layered = {**settings.headers, **self.registry.model_headers.get(canonical_id(model), {})}
        headers = {name: resolve_config_value(value, cached=False) or "" for name, value in layered.items()}
        if settings.auth_header and credential.key:
            headers["Authorization"] = f"Bearer {credential.key}"
        secrets = [credential.key, *headers.values()]
        if credential.base_url:
            model = {**model, "baseUrl": credential.base_url}
        # The SDKs' own timer starts a moment before the relay sees the request: a second more
        # lets the proxy's (Bridge.events) decide, with its message; the SDKs' stays a backstop.
        options = {**options, "apiKey": credential.key or None, "headers": headers,
                   "timeoutMs": self.config.upstream_timeout_ms + 1000}
        bridge_request = {"op": "stream", "model": model, "options": options, "payload": payload}
        if client_headers:
            bridge_request["clientHeaders"] = addable_headers(client_headers)
        return bridge_request, secrets

    def bridge_command(self) -> list:
        """node, the bridge, and the APIs of the available models: their provider modules are
        loaded before the request comes."""
        apis = {api for provider, apis in self.apis_by_provider.items() if self.is_available(provider) for api in apis}
        return [self.node, str(bridge_script()), *(["--warm-up"] if self.config.bridge_warm_up else []), *sorted(apis)]

    def open_stream(self, line: list[bytes], secrets: list, heartbeat: float | None, client: ClientRequest) -> "Call":
        """A bridge taken from the pool and given its request line; from here on the request's
        Call owns it (see Call)."""
        try:
            bridge = self.bridges.take(client.connection)
        except ClientGone:
            client.record.client_gone = True
            log.info("client disconnected while waiting for a bridge")
            raise ApiError(499, "The client disconnected while its request waited for a bridge", "api_error",
                           code="client_closed_request") from None
        try:
            bridge.send(line)
            return Call(bridge, bridge.events(self.config.upstream_timeout_ms / 1000, heartbeat), secrets, client)
        except BaseException:
            bridge.close()
            raise


class Call:
    """One upstream call in flight: the bridge, its events, and the client connection it serves.
    If the client goes away, the bridge is killed at once, even while the upstream is silent.

    Nothing taken is lost: each Call is listed in its request's `calls` until a streaming
    response takes it over (sse_response); whatever ends the request otherwise (a whole reply, an
    error, any exception) closes the Calls still listed (create_app's close_calls)."""

    def __init__(self, bridge: Bridge, events, secrets: list, client: ClientRequest):
        self.client, self.record = client, client.record
        self.bridge, self.secrets = bridge, secrets
        self._watcher = None
        client.calls.append(self)
        if client.connection is not None:
            self._watcher = gevent.spawn(watch_client, client.connection, self.client_gone)
        events = pi_events(self.record.observe(events))
        self.events = itertools.chain(self.opening(events), events)  # all of them, in pi_events' shape

    def client_gone(self):
        self.record.client_gone = True
        self.bridge.close()

    def error(self, event: dict) -> ApiError:
        """The ApiError of a bridge `error` event, naming this request."""
        error = upstream_error(event, self.secrets)
        error.request_id = self.record.id
        return error

    def opening(self, events) -> list:
        """The events up to the first piece of content (or the end), read when the call starts. A
        failure before any content is raised as ApiError, so the client gets the upstream's real
        HTTP status rather than a stream that breaks at once."""
        opening = []
        for event in events:
            if event["type"] == "error":
                self.close()
                raise self.error(event)
            if event["type"] == "heartbeat":
                continue
            opening.append(event)
            if event["type"] != "start":
                break
        return opening

    def final(self) -> dict:
        """Read the call to its last event (`done` or `error`) and close it: for whole replies."""
        last = None
        try:
            for last in self.events:  # noqa: B007 - only the last event matters
                pass
        finally:
            self.close()
        return last

    def close(self):
        if self._watcher is not None:
            self._watcher.kill(block=False)
        self.bridge.close()


def watch_client(client: socket.socket, on_gone):
    """Wait until the client's socket is readable: an end of input (b"") means gone; data means a
    pipelined request, which is not a disconnect, so stop watching. An end of input already there
    when the call starts is a client that half-closed its socket once its request was sent (legal
    HTTP/1.1: it still reads the answer); on the wire a close looks the same, so for such a client
    a disconnect shows only when writing the answer fails."""
    try:
        if client_at_end(client):
            return
        gevent.socket.wait_read(client.fileno())
        gone = client.recv(1, socket.MSG_PEEK) == b""
    except OSError:
        gone = True
    if gone:
        log.info("client disconnected; stopping its upstream call")
        on_gone()


def wants_status_page() -> bool:
    """A browser asking for / (its Accept names text/html); other clients get the JSON probe answer."""
    return request.path == "/" and request.method == "GET" and "text/html" in request.headers.get("Accept", "")


def error_response(error: ApiError) -> Response:
    error.request_id = request.environ.get("pi_proxy.request_id")
    record = request.environ.get("pi_proxy.record")
    if record is not None:
        record.error = error.type
    bodies = {"anthropic": error.anthropic_body, "pi": error.pi_body, "openai": error.openai_body}
    family = api_family(request.path)
    # Anthropic's clients know overload as 529 (and retry it); OpenAI's and pi's as 429.
    status = 529 if family == "anthropic" and error.type == "overloaded_error" else error.status
    response = Response(json.dumps(bodies[family]()), status=status, mimetype="application/json")
    if error.retry_after:
        response.headers["Retry-After"] = error.retry_after
    return response


# A web page can make its visitor's browser send requests here: cross-origin "simple" POSTs (a
# text/plain fetch, a form) go out without a CORS preflight, and DNS rebinding points the page's own
# name at 127.0.0.1, making its requests same-origin. Hence the browser guard: the Host must be a name
# the proxy is reachable as (a rebound name is not), an Origin must be one allowed to call the proxy,
# and POST bodies must be JSON. Non-browser clients send no Origin and a loopback Host.


def host_name(host: str) -> str:
    """A Host header's name: lower case, without its port, IPv6 brackets or a trailing dot."""
    host = host.strip().lower()
    if host.startswith("["):
        host = host[1:host.find("]")]
    elif host.count(":") == 1:
        host = host.split(":")[0]
    return host.rstrip(".")


def host_allowed(name: str, bound: str, allowed: frozenset) -> bool:
    """`localhost`, loopback addresses, the bound address (bound to all, any address) and the
    names in PI_PROXY_ALLOWED_HOSTS. DNS can point any name at 127.0.0.1, but no address at another."""
    if name in allowed or name in ("localhost", bound.lower()):
        return True
    try:
        address = ipaddress.ip_address(name)
    except ValueError:
        return False
    address = getattr(address, "ipv4_mapped", None) or address
    return address.is_loopback or bound in ("0.0.0.0", "::")


def origin_allowed(origin: str, allowed: frozenset) -> bool:
    return "*" in allowed or origin.lower() in allowed


CORS_PREFLIGHT_MAX_AGE = "600"  # seconds a browser may reuse a preflight's answer


class BodyTimeout(OSError):
    """A request body that did not arrive within PI_PROXY_CLIENT_BODY_TIMEOUT_S (TimedInput)."""


def close_connection(response: Response) -> Response:
    response.headers["Connection"] = "close"
    return response


BODY_CHUNK = 262_144  # bytes of a request body read at a time


def read_body(limit: int) -> bytearray:
    """The request's body, or ApiError 413 past `limit` bytes, chunked bodies included."""
    too_large = ApiError(413, f"The request body is larger than {limit} bytes", "request_too_large")
    if (request.content_length or 0) > limit:
        raise too_large
    body = bytearray()  # grown in place: joining 50 MB of parts would hold the loop for 30 ms
    try:
        while len(body) <= limit and (part := request.stream.read(min(BODY_CHUNK, limit + 1 - len(body)))):
            body += part
            if len(part) == BODY_CHUNK:  # more may follow: a client sending 50 MB fast would have the loop
                let_the_loop_poll()      # to itself, each read finding its data waiting
    except OSError as error:  # cut short, malformed chunks, or too slow: the connection is unusable
        after_this_request(close_connection)
        if isinstance(error, BodyTimeout):
            raise ApiError(408, str(error), code="request_timeout") from None
        log.info("a request body could not be read: %s", error)
        raise ApiError(400, f"The request body could not be read: {error}") from None
    if len(body) > limit:
        raise too_large
    return body


def client_request() -> ClientRequest:
    """The API request's values the code below its route needs (see ClientRequest)."""
    return ClientRequest(request.environ["pi_proxy.record"], request.headers.get(UPSTREAM_KEY_HEADER),
                         request.environ.get("pi_proxy.socket"), calls=request.environ.setdefault("pi_proxy.calls", []))


def checked_body(raw: bytearray, config: Config, check, messages: str, tools: str, record: "RequestRecord") -> dict:
    """The request's JSON body: parsed, within the caps, then checked (validated) by `check`.
    `messages` and `tools` are where this API keeps its messages and its tools."""
    counted = {messages: (config.max_messages, "PI_PROXY_MAX_MESSAGES"),
               tools: (config.max_tools, "PI_PROXY_MAX_TOOLS")}
    body = parse_body(raw, counted)
    record.note_body(body)
    check_caps(body, config)
    return check(body)


def parse_body(raw: bytearray, counted: dict):
    try:
        return parse_json(raw.decode(json.detect_encoding(raw), "surrogatepass"), counted)
    except (ValueError, UnicodeDecodeError) as error:
        raise ApiError(400, f"The request body is not valid JSON: {error}", code="invalid_json") from None
    except RecursionError:
        raise ApiError(400, "The request body is nested too deeply", code="invalid_json") from None


def check_caps(body, config: Config):
    """Bounded work per request, before the schema sees it (the messages and tools were counted
    while parsing, parse_json): the whole body's values are counted (413), its nesting measured,
    and numbers JSON cannot carry to the bridge (NaN, Infinity) refused (400)."""
    if not isinstance(body, (dict, list)):
        return
    values, stack = 0, [(body, 1, None)]
    while stack:
        value, depth, where = stack.pop()
        values += len(value)
        if values > config.max_json_values:
            raise ApiError(413, f"The request body holds more than {config.max_json_values} values "
                                "(PI_PROXY_MAX_JSON_VALUES)", "request_too_large", code="request_too_large")
        for key, member in value.items() if isinstance(value, dict) else enumerate(value):
            if isinstance(member, (dict, list)):
                if depth >= config.max_depth:
                    param = linked_path((where, key))
                    raise ApiError(400, f"{param} is nested more than {config.max_depth} levels deep "
                                        "(PI_PROXY_MAX_DEPTH)", param=param, code="invalid_value")
                stack.append((member, depth + 1, (where, key)))
            elif isinstance(member, float) and not math.isfinite(member):
                param = linked_path((where, key))
                raise ApiError(400, f"{param} is {member}: JSON has no such number", param=param,
                               code="invalid_value")


def linked_path(link) -> str:
    """check_caps' (parent link, key) chain -> `messages[0].content`."""
    parts = collections.deque()
    while link is not None:
        link, key = link
        parts.appendleft(key)
    return json_path(parts)


def prepare_call(api: "ClientApi", raw: bytearray, proxy: Proxy, client: ClientRequest, fetch_images) -> tuple:
    """A client API's request body -> (the pi model, the Exchange): a job for `prepared`."""
    body = checked_body(raw, proxy.config, api.check, api.messages, api.tools, client.record)
    model = api.resolve(body["model"], proxy.registry.models, proxy.model_availability(client.upstream_key))
    return model, api.prepare(body, model, proxy, fetch_images)


def count_tokens_estimate(raw: bytearray, proxy: Proxy, client: ClientRequest, fetch_images) -> int:
    """A count_tokens request body -> its input-token estimate: a job for `prepared`."""
    body = checked_body(raw, proxy.config, functools.partial(validate, validator=COUNT_TOKENS_VALIDATOR), "messages",
                        "tools", client.record)
    model = resolve_claude_model(body["model"], proxy.registry.models, proxy.model_availability(client.upstream_key))
    return messages_context(body, model, proxy, fetch_images)[1]


# A large request is parsed, checked, translated and serialised in a child process forked for it.
# Here, that work would share the GIL with the loop, and what it builds (hundreds of thousands of
# objects for a long conversation) the collector would walk at each full pass: tens of ms during
# which no client is served. The child has the proxy's state as of the fork (registry, credentials,
# the Responses store); it sends back its small results pickled and the pi context as JSON text in
# a frame of its own, and asks this process for the remote images (fetching needs the loop). It
# must never run gevent: its copy of the loop has every client's watchers. It closes what it
# inherited and dies with the proxy (PDEATHSIG); the proxy kills and reaps it whatever happens.
PREPARED_APART_BYTES = 100_000  # a request body larger than this is prepared in a child process
_FRAME = struct.Struct("!cQ")  # a frame's kind (b"b": JSON text; b"p": a pickled message) and its size
BUFFER_BYTES = 65_536  # JSON text this large travels in a frame of its own, as it is
PIPE_BYTES = 1_048_576  # what the child's pipe to the proxy holds (Linux lets it be set), and is read at a time
CHILD_NICENESS = 10  # the child yields the CPU to the loop: the large request waits, not everyone else
PREPARE_TIMEOUT = 120.0  # seconds a child may take (the largest request the caps allow: about 10 s here)
PR_SET_PDEATHSIG = 1  # prctl(2): the signal a process gets when its parent ends
_fork = gevent.monkey.get_original("os", "fork")  # a plain fork: gevent is not reinitialised in the child
_set_signal = gevent.monkey.get_original("signal", "signal")


def prepared(job, raw: bytearray, proxy: Proxy, client: ClientRequest):
    """job(raw, proxy, client, fetch_images): prepare_call or count_tokens_estimate, here for a
    small body, in a child process (prepare_apart) for a large one, at most one per core at once."""
    if len(raw) <= PREPARED_APART_BYTES:
        return job(raw, proxy, client, functools.partial(fetch_remote_images, config=proxy.config))
    proxy.envelope_key()  # read or made here, once, not in each child
    with proxy.preparers:
        return prepare_apart(job, raw, proxy, client)


class ChildPickler(pickle.Pickler):
    """Pickles a child's message: large JSON text goes into `buffers` (sent as it is), and the
    Responses store (a translator's `keep` refers to it) stands for the proxy's own."""

    def __init__(self, file, store: "ResponseStore"):
        super().__init__(file, pickle.HIGHEST_PROTOCOL)
        self.store, self.buffers = store, []

    def persistent_id(self, obj):
        if obj is self.store:
            return "store"
        if type(obj) is JsonText and sum(map(len, obj)) >= BUFFER_BYTES:
            self.buffers.append(obj)
            return len(self.buffers) - 1
        return None


class ProxyUnpickler(pickle.Unpickler):
    def __init__(self, file, store: "ResponseStore", buffers: list):
        super().__init__(file)
        self.store, self.buffers = store, buffers

    def persistent_load(self, pid):
        return self.store if pid == "store" else JsonText(self.buffers[pid])


def send_message(fd: int, message: tuple, store: "ResponseStore", wait):
    """message, pickled, its large JSON text first, as it is (ChildPickler). wait(fd) returns once fd
    is writable: gevent's wait_write here; in the child, whose pipes block, nothing."""
    data = io.BytesIO()
    pickler = ChildPickler(data, store)
    pickler.dump(message)
    frames = [(b"b", pieces) for pieces in pickler.buffers] + [(b"p", [data.getvalue()])]
    for kind, pieces in frames:
        for piece in [_FRAME.pack(kind, sum(map(len, pieces))), *pieces]:
            view = memoryview(piece)
            while view:
                wait(fd)
                try:
                    view = view[os.write(fd, view):]
                except BlockingIOError:
                    pass


def read_message(fd: int, store: "ResponseStore", wait) -> tuple:
    """The message send_message sent; its JSON text in the pieces it was read in. wait(fd)
    returns once fd is readable (as for send_message). EOFError if the pipe ends first."""
    buffers = []
    while True:
        kind, size = _FRAME.unpack(b"".join(read_pieces(fd, _FRAME.size, wait)))
        if kind == b"p":
            return ProxyUnpickler(io.BytesIO(b"".join(read_pieces(fd, size, wait))), store, buffers).load()
        buffers.append(read_pieces(fd, size, wait))


def read_pieces(fd: int, size: int, wait) -> list[bytes]:
    """size bytes from fd, as read: one 60 MB buffer, zeroed by Python before the first read, or
    joined after the last, would hold the loop for tens of ms."""
    pieces, left = [], size
    while left:
        wait(fd)
        try:
            piece = os.read(fd, min(left, PIPE_BYTES))
        except BlockingIOError:
            continue
        if not piece:
            raise EOFError("the pipe ended")
        pieces.append(piece)
        left -= len(piece)
    return pieces


def prepare_apart(job, raw: bytearray, proxy: Proxy, client: ClientRequest):
    """job's result, computed by a child process; its ApiError raised here. The remote images it
    asks for are fetched here (fetch_remote_images), on the loop."""
    from_child, to_proxy = os.pipe()
    from_proxy, to_child = os.pipe()
    try:
        fcntl.fcntl(from_child, fcntl.F_SETPIPE_SZ, PIPE_BYTES)  # else 64 KiB a read: a 60 MB context in 1,000
    except (AttributeError, OSError):  # not Linux, or a lower pipe-max-size
        pass
    parent = os.getpid()
    try:
        pid = gevent.os.fork_and_watch(fork=_fork)
    except OSError as error:  # out of processes or memory
        for fd in (from_child, to_proxy, from_proxy, to_child):
            os.close(fd)
        raise ApiError(503, f"The proxy could not start a process to prepare the request: {error}",
                       "overloaded_error", code="proxy_overloaded", retry_after=Admission.RETRY_AFTER) from None
    if pid == 0:
        child_prepares(job, raw, proxy, client, parent, to_proxy, from_proxy)
    os.close(to_proxy)
    os.close(from_proxy)
    os.set_blocking(from_child, False)
    os.set_blocking(to_child, False)
    store = proxy.response_store
    try:
        with gevent.Timeout(PREPARE_TIMEOUT, ApiError(503, f"Preparing the request took longer than "
                                                           f"{PREPARE_TIMEOUT:g} s", "api_error")):
            while True:
                kind, payload, *noted = read_message(from_child, store, gevent.socket.wait_read)
                if kind != "images":
                    break
                try:
                    reply = ("images", fetch_remote_images(payload, proxy.config))
                except ApiError as error:
                    reply = ("refused", error)
                send_message(to_child, reply, store, gevent.socket.wait_write)
    except EOFError:
        raise RuntimeError("the child process preparing the request ended without an answer") from None
    finally:
        os.close(from_child)
        os.close(to_child)
        if gevent.os.waitpid(pid, os.WNOHANG) == (0, 0):
            os.kill(pid, signal.SIGKILL)
            gevent.os.waitpid(pid, 0)
    client.record.model, client.record.stream, hits = noted
    store.touch(hits)
    if kind == "refused":
        raise payload
    if kind == "failed":
        raise RuntimeError(f"preparing the request failed in its child process:\n{payload}")
    return payload


def blocking(fd: int):
    """The child's wait for its pipes, which block: none."""


def child_prepares(job, raw: bytearray, proxy: Proxy, client: ClientRequest, parent: int, out: int, back: int):
    """The child process: job's outcome sent to the proxy, then exit; it never returns."""
    status = 1
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        if hasattr(libc, "prctl"):  # Linux
            libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
        if os.getppid() != parent:  # the proxy ended before prctl
            return
        for signum in (signal.SIGTERM, signal.SIGINT):  # the proxy's handlers are its loop's
            _set_signal(signum, signal.SIG_DFL)
        low = 3
        for fd in sorted((out, back)):  # client sockets, the listening socket, bridges' pipes
            os.closerange(low, fd)
            low = fd + 1
        os.closerange(low, resource.getrlimit(resource.RLIMIT_NOFILE)[0])
        gc.freeze()  # the proxy's objects: a collection walking them would copy every page they are on
        os.nice(CHILD_NICENESS)
        proxy.response_store.hits = []

        def ask_for_images(wanted: list) -> list:
            send_message(out, ("images", wanted), proxy.response_store, blocking)
            kind, payload = read_message(back, proxy.response_store, blocking)
            if kind == "refused":
                raise payload
            return payload

        try:
            outcome = ("done", job(raw, proxy, client, ask_for_images))
        except ApiError as error:
            outcome = ("refused", error.with_traceback(None))
        except Exception:
            outcome = ("failed", traceback.format_exc())
        noted = (client.record.model, client.record.stream, proxy.response_store.hits)
        try:
            send_message(out, (*outcome, *noted), proxy.response_store, blocking)
        except OSError:
            raise
        except Exception:  # the outcome could not be pickled, so nothing was sent: a bug, told as one
            send_message(out, ("failed", traceback.format_exc(), *noted), proxy.response_store, blocking)
        status = 0
    finally:
        os._exit(status)


def sse_response(frames, call: Call) -> Response:
    response = Response(coalesce(frames, call.bridge), mimetype="text/event-stream",
                        headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
    # Runs even if the client vanished before the first frame (a generator's finally would not).
    response.call_on_close(call.close)
    call.client.calls.remove(call)  # the response owns it now
    return response


COALESCED_BYTES = 65536  # at most this much per write; then the other clients get their turn


def coalesce(frames, bridge: Bridge):
    """One socket write for all the frames of the events the bridge has already printed (it
    prints a tick's events at once), instead of one write per frame; nothing waits for more.
    A backlog of events goes out in writes of COALESCED_BYTES, with the loop given to the other
    clients between them: a write to a socket that can take it never does that by itself."""
    batch, size = [], 0
    for frame in frames:
        batch.append(frame)
        size += len(frame)
        if not bridge.lines.qsize() or size >= COALESCED_BYTES:
            yield b"".join(batch)
            if size >= COALESCED_BYTES:
                let_the_loop_poll()
            batch, size = [], 0
    if batch:
        yield b"".join(batch)


def sse_event(name: str, payload) -> bytes:
    return b"event: " + name.encode() + b"\ndata: " + json.dumps(payload, separators=(",", ":")).encode() + b"\n\n"


def stream_sse(call: Call, translator, api: "ClientApi"):
    """Any client API's SSE body: its translator's frames for each of the call's events. It always
    ends as the API's protocol says: an upstream failure becomes the translator's error frames
    (fail), then the API's trailer, if it has one (chat: `data: [DONE]`)."""
    encode = api.encode
    try:
        for event in call.events:
            if event["type"] == "error":
                yield from map(encode, translator.fail(call.error(event)))
                break
            yield from map(encode, translator.translate(event))
        if api.trailer:
            yield api.trailer
    finally:
        call.close()


def sse_named(frame: tuple) -> bytes:
    """An Anthropic frame, (event name, data)."""
    return sse_event(*frame)


def sse_typed(frame: dict) -> bytes:
    """A Responses frame, named by its type."""
    return sse_event(frame["type"], frame)


@dataclass(frozen=True)
class ClientApi:
    """One client API: how its request becomes a pi call (an Exchange) and how the answer is sent.
    Adding an API: its section (request schema and translation, a translator with translate and
    fail, a prepare function), then a row in CLIENT_APIS."""

    name: str  # in usage records and log lines
    family: str  # its error shape (error_response): "openai", "anthropic" or "pi"
    check: Callable  # the request body -> the validated body, or ApiError 400
    messages: str  # where the body keeps its messages, and its tools (their caps: checked_body)
    tools: str
    resolve: Callable  # (the requested model, the registry's models, is_available) -> a pi model
    prepare: Callable  # (body, pi model, Proxy, fetch_images) -> Exchange; fetch_images: see add_remote_images
    encode: Callable[[object], bytes]  # a translator's frame -> SSE bytes
    whole: Callable[[list], dict] | None = None  # a whole reply's frames -> the reply; None: it always streams
    trailer: bytes = b""  # after a stream's last frame
    fails_in_stream: bool = False  # an upstream failure before any content is also the stream's error event


CLIENT_APIS = {
    "/v1/chat/completions": ClientApi(
        "chat", "openai", chat_body, "messages", "tools", resolve_model, prepare_chat, sse_data,
        whole=completion_of, trailer=b"data: [DONE]\n\n"),
    "/v1/messages": ClientApi(
        "messages", "anthropic", messages_body, "messages", "tools", resolve_claude_model, prepare_messages,
        sse_named, whole=message_of),
    "/v1/responses": ClientApi(
        "responses", "openai", responses_body, "input", "tools", resolve_model, prepare_responses, sse_typed,
        whole=response_of),
    "/api/stream": ClientApi(
        "api/stream", "pi", pi_stream_body, "context.messages", "context.tools", lookup_pi_model, prepare_pi,
        sse_data, fails_in_stream=True),
}
ENDPOINTS = {path: api.name for path, api in CLIENT_APIS.items()} | {"/v1/messages/count_tokens": "count_tokens"}


def api_family(path: str) -> str:
    """Whose error shape and headers a request gets (error_response): its client API's, or, for the
    other paths (count_tokens, the model list, a path that does not exist), that of the API whose
    prefix it has."""
    if path in CLIENT_APIS:
        return CLIENT_APIS[path].family
    # The model list is Anthropic's for Anthropic's clients, which send `anthropic-version`.
    if path.startswith("/v1/messages") or (path.startswith("/v1/models") and "anthropic-version" in request.headers):
        return "anthropic"
    return "openai"


def model_entry(model: dict, created: int) -> dict:
    return {"id": canonical_id(model), "object": "model", "created": created, "owned_by": model["provider"]}


def create_app(proxy: Proxy) -> Flask:
    app = Flask("pi-proxy")

    @app.before_request
    def admit():
        """Every request gets an id; an API request also a record, finished after its last byte."""
        id_ = request.environ["pi_proxy.request_id"] = request_id(request.headers.get("x-request-id"))
        if request.path in ENDPOINTS and request.method == "POST":
            request.environ["pi_proxy.record"] = RequestRecord(id_, ENDPOINTS[request.path])

    @app.after_request
    def identify(response: Response):
        id_ = request.environ.get("pi_proxy.request_id")
        if id_ is not None:
            response.headers["x-request-id"] = id_
            if api_family(request.path) == "anthropic":
                response.headers["request-id"] = id_
        record = request.environ.get("pi_proxy.record")
        if record is not None:
            record.status = response.status_code
            response.call_on_close(lambda: record.finish(proxy.ledger))
        return response

    @app.errorhandler(ApiError)
    def on_api_error(error: ApiError):
        return error_response(error)

    @app.errorhandler(HTTPException)
    def on_http_error(error: HTTPException):
        return error_response(ApiError(error.code, error.description,
                                       ERROR_TYPES.get(error.code, "invalid_request_error")))

    @app.errorhandler(Exception)
    def on_unexpected(error: Exception):
        log.exception("unexpected error on %s %s", request.method, request.path)
        return error_response(ApiError(500, "Internal proxy error", "api_error"))

    @app.teardown_request
    def close_calls(_error):
        for call in request.environ.pop("pi_proxy.calls", []):
            call.close()

    @app.before_request
    def refuse_when_closing():
        if request.environ.get("pi_proxy.closing"):
            response = error_response(ApiError(503, "The proxy is shutting down; retry elsewhere or later",
                                               "api_error"))
            response.headers["Connection"] = "close"
            return response

    @app.before_request
    def guard_browsers():
        """Host, Origin and content type (above); an allowed origin's CORS preflight is answered here,
        before authentication (a preflight carries no credentials). /healthz does nothing to guard."""
        if request.path == "/healthz":
            return None
        host, origin = request.headers.get("Host"), request.headers.get("Origin")
        if host is not None and not host_allowed(host_name(host), proxy.config.host, proxy.config.allowed_hosts):
            raise ApiError(403, f"This proxy does not answer to the host name {shown(host)}; if clients reach it "
                                "by that name, add it to PI_PROXY_ALLOWED_HOSTS", "permission_error",
                           code="host_not_allowed")
        if origin is not None and not origin_allowed(origin, proxy.config.cors_origins):
            raise ApiError(403, f"Web pages of {shown(origin)} may not use this proxy; to allow them, add the "
                                "origin to PI_PROXY_CORS_ORIGINS", "permission_error", code="origin_not_allowed")
        if origin is not None and request.method == "OPTIONS" and "Access-Control-Request-Method" in request.headers:
            return Response(status=204, headers={
                "Access-Control-Allow-Methods": "GET, POST",
                "Access-Control-Allow-Headers": request.headers.get("Access-Control-Request-Headers", ""),
                "Access-Control-Max-Age": CORS_PREFLIGHT_MAX_AGE})
        if request.method == "POST" and request.mimetype not in ("application/json", ""):
            raise ApiError(415, "The request body must be JSON, sent with `Content-Type: application/json`",
                           code="unsupported_content_type")
        return None

    @app.after_request
    def allow_origin(response: Response) -> Response:
        origin = request.headers.get("Origin")
        if origin is not None and origin_allowed(origin, proxy.config.cors_origins):
            response.headers["Access-Control-Allow-Origin"] = origin
            response.headers["Access-Control-Expose-Headers"] = "Retry-After, x-request-id, request-id"
            response.headers.add("Vary", "Origin")
        return response

    @app.before_request
    def authenticate():
        if proxy.config.auth_token is None or request.path == "/healthz" or wants_status_page():
            return  # the page has no figures of its own: it asks for the token, then reads /usage
        bearer = request.headers.get("Authorization", "")
        supplied = request.headers.get("x-api-key") or (bearer[7:] if bearer[:7].lower() == "bearer " else "")
        if not hmac.compare_digest(supplied.encode(), proxy.config.auth_token.encode()):
            raise ApiError(401, "This proxy needs its token: send `Authorization: Bearer <token>` or "
                                "`x-api-key: <token>`", "authentication_error", code="invalid_proxy_token")

    @app.get("/healthz")
    def healthz():
        return {"status": "ok"}

    @app.get("/v1/models")
    def list_models():
        if api_family(request.path) == "anthropic":
            args = request.args
            return anthropic_model_page([anthropic_model(m) for m in proxy.available_models()], args.get("after_id"),
                                        args.get("before_id"), args.get("limit"),
                                        args.getlist("lifecycle[]") + args.getlist("lifecycle"))
        data = [model_entry(m, proxy.started) for m in proxy.available_models()]
        return {"object": "list", "data": data}

    @app.get("/v1/models/<path:model_id>")
    def get_model(model_id):
        """A model by any name a request may give it (canonical, a unique bare id, a Claude alias)."""
        try:
            model = resolve_claude_model(model_id, proxy.registry.models, proxy.is_available)
        except ApiError as error:
            if error.status != 401:
                raise
            raise ApiError(404, error.message, "not_found_error", param="model", code="model_not_found") from None
        if api_family(request.path) == "anthropic":
            return anthropic_model(model)
        return model_entry(model, proxy.started)

    def client_api(api: ClientApi):
        """Every client API's route (CLIENT_APIS): its request read once, made a pi call, and its
        answer streamed or assembled whole."""
        client = client_request()
        model, exchange = prepared(functools.partial(prepare_call, api), read_body(proxy.config.max_body_size), proxy,
                                   client)
        refused = exchange.refused or (lambda error: error)
        try:
            call = proxy.start(model, exchange, client)
        except ApiError as error:
            if api.fails_in_stream and error.upstream_event is not None:
                return Response([api.encode(frame) for frame in exchange.translator.fail(error)],
                                mimetype="text/event-stream")
            raise refused(error) from None
        exchange.context.clear()  # the bridge has its line: a large request's 60 MB are not kept to the end
        if exchange.stream:
            return sse_response(stream_sse(call, exchange.translator, api), call)
        final = call.final()
        if final["type"] == "error":
            raise refused(upstream_error(final, call.secrets))
        return api.whole(replayed(exchange.translator, final))

    for path, api in CLIENT_APIS.items():
        app.add_url_rule(path, path, functools.partial(client_api, api), methods=["POST"])

    @app.post("/v1/messages/count_tokens")
    def count_tokens():
        estimate = prepared(count_tokens_estimate, read_body(proxy.config.max_body_size), proxy, client_request())
        return {"input_tokens": estimate}

    @app.get("/usage")
    def usage():
        report = {**proxy.ledger.report(), "bridges": proxy.bridges.counts(), "copilot": proxy.copilot_quota()}
        return Response(json.dumps(report), mimetype="application/json")  # fields in their order

    @app.route("/", methods=["GET", "HEAD"])
    def root():
        if wants_status_page():
            return Response(STATUS_PAGE.read_bytes(), mimetype="text/html",
                            headers={"Content-Security-Policy": "default-src 'self'; script-src 'unsafe-inline'; "
                                                                "style-src 'unsafe-inline'; img-src 'self' data:"})
        return {"status": "ok", "service": "pi-proxy"}  # Claude Code probes HEAD and GET /

    @app.post("/api/event_logging/batch")
    def event_logging():
        return {}  # Claude Code's telemetry: accepted and dropped

    return app


# ==================================================================================================
# 16. Shutdown
# ==================================================================================================


class InFlight:
    """WSGI middleware counting the requests being answered; a stream counts until its last byte.
    Once `closing`, requests still arriving on kept-alive connections are marked for refusal."""

    def __init__(self, app):
        self.app, self.count = app, 0
        self.closing = False
        self.none_left = gevent.event.Event()
        self.none_left.set()

    def __call__(self, environ, start_response):
        environ["pi_proxy.closing"] = self.closing
        self.count += 1
        self.none_left.clear()
        try:
            return ClosingIterator(self.app(environ, start_response), self._finished)
        except BaseException:
            self._finished()
            raise

    def _finished(self):
        self.count -= 1
        if not self.count:
            self.none_left.set()


def shut_down(server: WSGIServer, in_flight: InFlight, bridges: "BridgePool", grace: float):
    """Refuse new connections, give the requests in flight `grace` seconds to finish, then kill
    the bridges still serving: their streams end with their protocol's error event ("the proxy is
    shutting down"), which the handlers get a moment to write."""
    server.close()
    in_flight.closing = True
    log.info("shutting down: %d requests in flight, up to %g s to finish", in_flight.count, grace)
    bridges.retire_idle()
    if not in_flight.none_left.wait(timeout=grace):
        log.warning("shutting down: ending %d requests still in flight after %g s", in_flight.count, grace)
    bridges.drain()
    in_flight.none_left.wait(timeout=2)


# ==================================================================================================
# 17. Main
# ==================================================================================================


class TimedInput(Input):
    """A request body read within a deadline: a body trickled byte by byte must not hold its
    connection forever. Past it every read fails (BodyTimeout), the discarding of an unread rest too."""

    __slots__ = ("timeout", "deadline")

    def __init__(self, body: Input, timeout: float):
        super().__init__(body.rfile, body.content_length, body.socket, body.chunked_input)
        self.timeout, self.deadline = timeout, time.monotonic() + timeout

    def read(self, length=None):
        return self._within_deadline(super().read, length)

    def readline(self, size=None):
        return self._within_deadline(super().readline, size)

    def _within_deadline(self, read, size):
        if (self.chunk_length == 0) if self.chunked_input else self.position >= (self.content_length or 0):
            return read(size)  # all read: b"" at once
        left = self.deadline - time.monotonic()
        if left > 0:
            with gevent.Timeout(left, False):
                return read(size)
        self.deadline = 0
        raise BodyTimeout(f"The request body did not arrive within {self.timeout:g} s")


class Handler(WSGIHandler):
    """Hands the client socket to the app (to notice disconnects), sends small frames at once, and
    bounds every wait on the client (Config.client_*): for the next request on a kept-alive
    connection, for a request's head, for its body (TimedInput), and for a client to read what is
    written to it. Malformed requests are the client's fault: logged briefly, at INFO."""

    requests_handled = 0

    def handle_one_request(self):
        config = self.server.config
        first_byte = None
        with gevent.Timeout(config.client_idle_timeout_s if self.requests_handled else config.client_header_timeout_s,
                            False):
            try:
                first_byte = self.rfile.peek(1)[:1]
            except OSError:
                first_byte = b""
        if not first_byte:  # closed, or idle too long
            return None
        self.requests_handled += 1
        self._head_timer = gevent.Timeout(config.client_header_timeout_s)
        self._head_timer.start()
        try:
            result = super().handle_one_request()
        except gevent.Timeout as timeout:
            if timeout is not self._head_timer:
                raise
            log.info("a client sent no complete request head within %g s; closing its connection",
                     config.client_header_timeout_s)
            return None
        finally:
            self._head_timer.cancel()
        if isinstance(getattr(self, "wsgi_input", None), TimedInput) and not self.wsgi_input.deadline:
            return None  # the rest of a late body is still on its way: the connection is unusable
        return result

    def _sendall(self, data):
        stall = self.server.config.client_stall_timeout_s
        timer = gevent.Timeout(stall)
        timer.start()
        try:
            super()._sendall(data)
        except gevent.Timeout as timeout:
            if timeout is not timer:
                raise
            log.info("a client read nothing for %g s; ending its response", stall)
            raise OSError(errno.EPIPE, "the client stopped reading") from None  # gevent's "client went away"
        finally:
            timer.cancel()

    def _handle_client_error(self, error):
        log.info("malformed request from %s: %s", self.client_address[0], shown(str(error) or type(error).__name__))
        return "400", b"HTTP/1.1 400 Bad Request\r\nConnection: close\r\nContent-Length: 0\r\n\r\n"

    def handle(self):
        try:
            self.socket.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        except OSError:
            pass
        super().handle()

    def get_environ(self):
        self._head_timer.cancel()
        environ = super().get_environ()
        if environ["wsgi.input"] is self.wsgi_input:
            self.wsgi_input = environ["wsgi.input"] = TimedInput(self.wsgi_input,
                                                                 self.server.config.client_body_timeout_s)
        environ["pi_proxy.socket"] = self.socket
        # gevent decodes chunked bodies itself; this tells Werkzeug to read one to its end
        # (capped by MAX_CONTENT_LENGTH) instead of treating it as empty.
        environ["wsgi.input_terminated"] = True
        return environ


def find_node() -> str:
    node = shutil.which("node")
    if node is None:
        raise SystemExit("pi-proxy: `node` was not found on PATH; install Node.js 20 or newer")
    return node


def build_proxy(config: Config) -> Proxy:
    node = find_node()
    catalog = load_catalog(node)
    models_json, problem = read_models_json(config.agent_dir, {p["id"] for p in catalog})
    if problem:
        log.error(problem)
    registry = build_registry(catalog, models_json)
    env_keys = {p["id"]: p["envKey"] for p in catalog}
    config_keys = {name: s.api_key for name, s in registry.settings.items() if s.api_key}
    credentials = Credentials(AuthFile(config.agent_dir / "auth.json"), env_keys, config_keys,
                              lambda provider, old: refresh_oauth(proxy.bridges.take(), provider, old))
    proxy = Proxy(config, node, registry, credentials)
    return proxy


def watch_stdin(stopping: gevent.event.Event):
    """--watch-stdin: the end of standard input means the parent that holds the pipe's other end has
    exited (however it exited, SIGKILL included): shut down as on SIGTERM. What is read is ignored."""
    fd = sys.stdin.fileno()
    while True:
        gevent.socket.wait_read(fd)
        if not os.read(fd, 65536):
            break
    log.info("standard input closed: shutting down")
    stopping.set()


def serve(config: Config, watching_stdin: bool = False):
    proxy = build_proxy(config)
    # What startup made (pi-ai's catalogue, the registry, compiled schemas) lives as long as the
    # proxy: kept out of the collector's full passes, which would otherwise walk it at every one.
    gc.freeze()
    in_flight = InFlight(create_app(proxy))
    server = WSGIServer((config.host, config.port), in_flight, handler_class=Handler, log=None, error_log=log)
    server.config = config  # the Handler's timeouts
    raise_open_files_limit()
    try:
        server.init_socket()
    except OSError as error:  # the port is taken, the address is not this machine's: say so, no traceback
        reason = os.strerror(error.errno) if error.errno else error
        raise SystemExit(f"pi-proxy: cannot listen on {config.host}:{config.port}: {reason}") from None
    url = f"http://{config.host}:{server.server_port}"
    available = proxy.available_models()
    providers = sorted({m["provider"] for m in available})
    print(f"pi-proxy listening on {url} with {len(available)} models available"
          + (f" ({', '.join(providers)})" if providers else ""), flush=True)
    if not available:
        print("hint: no provider has credentials. Run `python proxy.py login` for GitHub Copilot, set a "
              f"provider's key (e.g. OPENAI_API_KEY), add it to {config.agent_dir / 'auth.json'}, or declare "
              f"providers in {config.agent_dir / 'models.json'}", flush=True)
    if config.auth_token is None and not is_loopback(config.host):
        print(f"warning: listening on {config.host} without a token: anyone who can reach it spends your "
              "credentials. Set PI_PROXY_AUTH_TOKEN (or --auth-token).", flush=True)
    if "*" in config.cors_origins:
        print("warning: PI_PROXY_CORS_ORIGINS=*: every web page you visit can use this proxy"
              + (" (it still needs the token)" if config.auth_token else ", with your credentials"), flush=True)
    stopping = gevent.event.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        gevent.signal_handler(signum, stopping.set)
    if watching_stdin:
        gevent.spawn(watch_stdin, stopping)
    server.start()
    stopping.wait()
    shut_down(server, in_flight, proxy.bridges, config.shutdown_grace_s)


def raise_open_files_limit():
    """Each connection holds a file descriptor and each bridge three: the usual soft limit of
    1024 (or 256) would lock clients out long before memory runs short."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    wanted = hard if hard != resource.RLIM_INFINITY else 65536
    if soft != resource.RLIM_INFINITY and soft < wanted:
        resource.setrlimit(resource.RLIMIT_NOFILE, (wanted, hard))


def is_loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"


def login(config: Config, provider: str) -> int:
    """pi-ai's OAuth login through the bridge; its prompts are asked here, on the terminal."""
    process = subprocess.Popen([find_node(), str(BRIDGE_SCRIPT)], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                               text=True, cwd=HERE)

    def send(message: dict):
        process.stdin.write(json.dumps(message) + "\n")
        process.stdin.flush()

    send({"op": "login", "provider": provider})
    try:
        for line in process.stdout:
            event = json.loads(line)
            if event["type"] == "auth":
                print(f"Open {event['url']}" + (f"\n{event['instructions']}" if event.get("instructions") else ""),
                      flush=True)
            elif event["type"] == "progress":
                print(event["message"], flush=True)
            elif event["type"] == "prompt":
                send({"answer": input(f"{event['message']}: ")})
            elif event["type"] == "credentials":
                auth_file = AuthFile(config.agent_dir / "auth.json")
                with auth_file.locked():
                    auth_file.update(provider, {"type": "oauth", **event["credentials"]})
                print(f"Logged in to {provider}; credentials saved in {auth_file.path}")
                return 0
            else:
                print(f"Login failed: {event['message']['errorMessage']}", file=sys.stderr)
                return 1
    finally:
        process.stdin.close()
        process.wait()
    return 1


def logout(config: Config, provider: str) -> int:
    auth_file = AuthFile(config.agent_dir / "auth.json")
    if provider not in auth_file.entries():
        print(f"{provider} has no entry in {auth_file.path}")
        return 1
    with auth_file.locked():
        auth_file.update(provider, None)
    print(f"Removed {provider} from {auth_file.path}")
    return 0


def list_models(config: Config) -> int:
    proxy = build_proxy(config)
    available = proxy.available_models()
    for model in available:
        print(f"{canonical_id(model):60} {proxy.credentials.source(model['provider'])}")
    print(f"{len(available)} models available")
    return 0


def show_usage(config: Config) -> int:
    github = build_proxy(config).credentials.github_token()
    if github is None:
        print("No GitHub Copilot login (run `python proxy.py login`)")
        return 1
    quota = copilot_quota(github, config.test_redirects)
    print("\n".join(quota_lines(quota)))
    return 1 if "error" in quota else 0


def main(argv=None):
    logging.basicConfig(level=os.environ.get("PI_PROXY_LOG_LEVEL", "INFO").upper(),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    # urllib3 logs each relayed URL (query strings may carry keys) and each connection the bounded
    # pool does not keep ("Connection pool is full"): neither is for the user's log.
    logging.getLogger("urllib3").setLevel(logging.ERROR)
    if os.environ.get("PI_PROXY_LOG_FORMAT") == "json":
        logging.getLogger().handlers[0].setFormatter(JsonLogFormatter())
    args = parse_command_line(argv)
    config = load_config(args)
    if args.command == "login":
        sys.exit(login(config, args.provider))
    if args.command == "logout":
        sys.exit(logout(config, args.provider))
    if args.command == "models":
        sys.exit(list_models(config))
    if args.command == "usage":
        sys.exit(show_usage(config))
    serve(config, args.watch_stdin)


if __name__ == "__main__":
    main()
