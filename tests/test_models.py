"""Models: Anthropic's Models API shape for Anthropic's clients (the anthropic SDK's models.list()
and models.retrieve()), GET /v1/models/{id} resolving names as requests do, a provider prefix that
names no provider being a 404 everywhere (never a fallback to another provider), and no request
asking a model for more output than it gives (the fake upstreams refuse it, as the real APIs do)."""

import datetime

import anthropic
import openai
import pytest
import requests

import proxy
from proxy import ApiError
from tests.fake_upstream import Reply
from tests.helpers import error_family, models_json, response_error

COPILOT_SONNET = "fake-copilot/claude-sonnet-4.5"


@pytest.fixture
def claude(proxy):
    return anthropic.Anthropic(base_url=proxy.url, api_key="unused", max_retries=0)


def available_ids(proxy_) -> list:
    return [m["id"] for m in requests.get(f"{proxy_.url}/v1/models", timeout=30).json()["data"]]


# --- unit: Anthropic's pages -------------------------------------------------------------------------


ENTRIES = [{"id": f"p/m{i:02d}"} for i in range(45)]


def ids(page: dict) -> list:
    return [entry["id"] for entry in page["data"]]


def test_a_page_is_20_by_default_and_has_more_says_whether_more_lie_that_way():
    first = proxy.anthropic_model_page(ENTRIES, None, None, None, [])
    assert ids(first) == [f"p/m{i:02d}" for i in range(20)] and first["has_more"]
    assert (first["first_id"], first["last_id"]) == ("p/m00", "p/m19")
    last = proxy.anthropic_model_page(ENTRIES, "p/m39", None, None, [])
    assert ids(last) == [f"p/m{i:02d}" for i in range(40, 45)] and not last["has_more"]
    exact = proxy.anthropic_model_page(ENTRIES, None, None, "45", [])
    assert len(exact["data"]) == 45 and not exact["has_more"]


def test_before_id_pages_backwards():
    page = proxy.anthropic_model_page(ENTRIES, None, "p/m30", "10", [])
    assert ids(page) == [f"p/m{i:02d}" for i in range(20, 30)] and page["has_more"]
    start = proxy.anthropic_model_page(ENTRIES, None, "p/m05", "10", [])
    assert ids(start) == [f"p/m{i:02d}" for i in range(5)] and not start["has_more"]
    empty = proxy.anthropic_model_page(ENTRIES, None, "p/m00", None, [])
    assert empty == {"data": [], "has_more": False, "first_id": None, "last_id": None}


@pytest.mark.parametrize("after, before, limit, lifecycles, param", [
    (None, None, "0", [], "limit"), (None, None, "1001", [], "limit"), (None, None, "ten", [], "limit"),
    ("p/m01", "p/m05", None, [], "after_id"), ("p/nope", None, None, [], "after_id"),
    (None, "p/nope", None, [], "before_id"), (None, None, None, ["active", "gone"], "lifecycle")])
def test_bad_paging_is_a_400_naming_the_parameter(after, before, limit, lifecycles, param):
    with pytest.raises(ApiError) as caught:
        proxy.anthropic_model_page(ENTRIES, after, before, limit, lifecycles)
    assert (caught.value.status, caught.value.param) == (400, param)


def test_every_model_here_is_active():
    assert proxy.anthropic_model_page(ENTRIES, None, None, "1000", ["active"])["data"] == ENTRIES
    assert proxy.anthropic_model_page(ENTRIES, None, None, None, ["deprecated", "retired"])["data"] == []


def test_an_anthropic_model_entry():
    registry = proxy.build_registry([], models_json("http://127.0.0.1:1"))
    entry = proxy.anthropic_model(registry.models[COPILOT_SONNET])
    assert entry["id"] == COPILOT_SONNET and entry["type"] == "model" and entry["line"] == "sonnet"
    assert (entry["max_input_tokens"], entry["max_tokens"], entry["created_at"]) == (200000, 8192,
                                                                                      "1970-01-01T00:00:00Z")
    assert entry["capabilities"]["thinking"]["types"]["enabled"] == {"supported": True}
    assert entry["capabilities"]["image_input"] == {"supported": True}
    plain = proxy.anthropic_model({**registry.models["fake-chat/shared-model"], "id": "claude-3-5-haiku-20241022"})
    assert plain["created_at"] == "2024-10-22T00:00:00Z" and plain["line"] == "haiku"
    assert plain["capabilities"]["thinking"]["supported"] is False and plain["capabilities"]["effort"]["max"] == \
        {"supported": False}
    assert proxy.anthropic_model(registry.models["fake-chat/chat-model"])["line"] is None


# --- end to end: the anthropic SDK -----------------------------------------------------------------


def test_the_anthropic_sdk_lists_every_model_across_pages_with_every_field(claude, proxy):
    expected = available_ids(proxy)
    assert len(expected) > 5
    listed = list(claude.models.list(limit=2))  # the SDK follows after_id page by page
    assert [m.id for m in listed] == expected
    for model in listed:
        assert model.type == "model" and model.display_name and model.lifecycle == "active"
        assert isinstance(model.created_at, datetime.datetime) and model.created_at.tzinfo is not None
        assert model.max_input_tokens > 0 and model.max_tokens > 0 and model.capabilities is not None
    sonnet = next(m for m in listed if m.id == COPILOT_SONNET)
    assert (sonnet.display_name, sonnet.line, sonnet.max_tokens) == ("claude-sonnet-4.5", "sonnet", 8192)


def test_the_anthropic_sdk_pages_backwards(claude, proxy):
    expected = available_ids(proxy)
    page = claude.models.list(before_id=expected[-1], limit=3)
    assert [m.id for m in page.data] == expected[-4:-1] and page.has_more
    backwards, end = [], len(expected) - 1  # the SDK follows first_id as before_id, page by page
    while end > 0:
        backwards += expected[max(0, end - 3):end]
        end -= 3
    assert [m.id for m in page] == backwards


def test_anthropic_model_errors_are_in_anthropics_shape(claude, proxy):
    for query in ({"limit": 0}, {"limit": 1001}, {"after_id": "p/none"}):
        with pytest.raises(anthropic.BadRequestError) as caught:
            claude.models.list(**query)
        assert caught.value.body["type"] == "error"
        assert caught.value.body["error"]["type"] == "invalid_request_error"
    with pytest.raises(anthropic.NotFoundError) as caught:
        claude.models.retrieve("fake-chat/no-such-model")
    assert caught.value.body["error"]["type"] == "not_found_error"
    assert caught.value.response.headers.get("request-id")


@pytest.mark.parametrize("name, canonical", [
    ("fake-copilot/claude-sonnet-4.5", COPILOT_SONNET),  # canonical
    ("chat-model", "fake-chat/chat-model"),  # a unique bare id
    ("claude-sonnet-4-5-20250929", COPILOT_SONNET),  # Anthropic's spelling of Copilot's model
    ("claude-opus-4-6", "fake-copilot/claude-opus-4.6"),
])
def test_a_model_is_retrieved_by_any_name_a_request_may_use(claude, client, name, canonical):
    model = claude.models.retrieve(name)
    assert (model.id, model.type) == (canonical, "model") and model.max_tokens > 0
    entry = client.models.retrieve(name)
    assert (entry.id, entry.object, entry.owned_by) == (canonical, "model", canonical.split("/")[0])


def test_an_ambiguous_bare_id_is_a_400_naming_the_candidates(client):
    with pytest.raises(openai.BadRequestError) as caught:
        client.models.retrieve("shared-model")
    assert "fake-anthropic/shared-model" in caught.value.message and "fake-chat/shared-model" in caught.value.message


# --- a provider prefix is not a hint -----------------------------------------------------------------


NOT_A_PROVIDER = [
    ("/v1/chat/completions", {"model": "someprovider/chat-model", "messages": [{"role": "user", "content": "hi"}]}),
    ("/v1/responses", {"model": "someprovider/gpt-test", "input": "hi"}),
    ("/v1/messages", {"model": "someprovider/claude-sonnet-4-5", "max_tokens": 10,
                      "messages": [{"role": "user", "content": "hi"}]}),
    ("/v1/messages", {"model": "someprovider/claude-sonnet-4.5", "max_tokens": 10,
                      "messages": [{"role": "user", "content": "hi"}]}),
    ("/v1/messages/count_tokens", {"model": "someprovider/claude-test",
                                   "messages": [{"role": "user", "content": "hi"}]}),
    ("/api/stream", {"model": {"provider": "someprovider", "id": "chat-model"},
                     "context": {"messages": [{"role": "user", "content": "hi"}]}}),
]


@pytest.mark.parametrize("path, body", NOT_A_PROVIDER, ids=[f"{p}:{b['model']}" for p, b in NOT_A_PROVIDER])
def test_a_prefix_that_names_no_provider_is_404_on_every_endpoint(proxy, fake, path, body):
    fake.push(Reply(text="must not be asked"))
    response = requests.post(proxy.url + path, json=body, timeout=30)
    error = response_error(response, 404, error_family(path))
    if path.startswith("/v1/messages"):
        assert error["type"] == "not_found_error"
        assert "no provider is named 'someprovider'" in error["message"]
    elif path == "/api/stream":
        assert "someprovider" in error["message"]
    else:
        assert error["code"] == "model_not_found" and error["param"] == "model"
        assert "no provider is named 'someprovider'" in error["message"]
    assert not fake.requests


def test_a_claude_alias_under_a_provider_stays_with_that_provider(proxy, fake):
    """fake-anthropic has no Sonnet 4.5 (fake-copilot has): its prefix does not fall back."""
    body = {"model": "fake-anthropic/claude-sonnet-4-5", "max_tokens": 10,
            "messages": [{"role": "user", "content": "hi"}]}
    response = requests.post(proxy.url + "/v1/messages", json=body, timeout=30)
    assert response.status_code == 404 and response.json()["error"]["type"] == "not_found_error"
    assert requests.get(f"{proxy.url}/v1/models/someprovider/claude-sonnet-4-5", timeout=30).status_code == 404
    fake.push(Reply(text="mapped"))
    body["model"] = "fake-copilot/claude-sonnet-4-5-20250929"
    assert requests.post(proxy.url + "/v1/messages", json=body, timeout=30).json()["content"][0]["text"] == "mapped"
    assert [r.body["model"] for r in fake.requests] == ["claude-sonnet-4.5"]


# --- a model's output limit ----------------------------------------------------------------------------


def test_max_tokens_above_the_models_limit_is_clamped():
    model = {"provider": "p", "id": "m", "maxTokens": 8192}
    assert proxy.within_output_limit({"maxTokens": 128000, "temperature": 1}, model) == \
        {"maxTokens": 8192, "temperature": 1}
    assert proxy.within_output_limit({"maxTokens": 8192}, model) == {"maxTokens": 8192}
    assert proxy.within_output_limit({}, model) == {}


def test_the_fake_refuses_more_output_than_a_model_gives_as_the_real_apis_do(fake):
    """Without it, a missing clamp would pass unnoticed."""
    for path, body, param in [
        ("/v1/chat/completions", {"model": "chat-model", "max_completion_tokens": 8193, "messages": []},
         "max_completion_tokens"),
        ("/v1/responses", {"model": "gpt-test", "max_output_tokens": 9000, "input": "hi"}, "max_output_tokens")]:
        answer = requests.post(fake.base_url + path, json=body, timeout=10)
        assert answer.status_code == 400 and answer.json()["error"]["param"] == param
    answer = requests.post(fake.base_url + "/v1/messages", json={"model": "claude-test", "max_tokens": 8193},
                           timeout=10)
    assert answer.status_code == 400 and answer.json()["error"]["message"].startswith("max_tokens: 8193 > 8192")
    fake.push(Reply(text="within"))
    answer = requests.post(fake.base_url + "/v1/messages", json={"model": "claude-test", "max_tokens": 8192},
                           timeout=10)
    assert answer.status_code == 200


OVER_THE_LIMIT = [  # every endpoint and each of its names for the limit, asking 128000 of an 8192 model
    ("/v1/chat/completions", "fake-chat/chat-model", {"max_tokens": 128000}),
    ("/v1/chat/completions", "fake-anthropic/claude-test", {"max_completion_tokens": 128000}),
    ("/v1/messages", "fake-copilot/claude-sonnet-4.5", {"max_tokens": 128000}),
    ("/v1/messages", "fake-responses/gpt-test", {"max_tokens": 128000, "stream": True}),
    ("/v1/responses", "fake-responses/gpt-test", {"max_output_tokens": 128000}),
    ("/v1/responses", "fake-chat/chat-model", {"max_output_tokens": 128000, "stream": True}),
    ("/api/stream", "fake-anthropic/claude-test", {"options": {"maxTokens": 128000}}),
]


def over_the_limit(path: str, model: str, fields: dict) -> dict:
    hi = [{"role": "user", "content": "hi"}]
    if path == "/api/stream":
        provider, id_ = model.split("/")
        return {"model": {"provider": provider, "id": id_}, "context": {"messages": hi}, **fields}
    return {"model": model, **({"input": "hi"} if path == "/v1/responses" else {"messages": hi}), **fields}


@pytest.mark.parametrize("path, model, fields", OVER_THE_LIMIT, ids=[f"{p}:{m}:{min(f)}" for p, m, f in OVER_THE_LIMIT])
def test_more_output_than_the_model_gives_is_clamped_on_every_endpoint(proxy, fake, path, model, fields):
    fake.push(Reply(text="clamped"))
    response = requests.post(proxy.url + path, json=over_the_limit(path, model, fields), timeout=30)
    assert response.status_code == 200, response.text
    assert "clamped" in response.text
    upstream = fake.requests[-1].body
    assert [upstream[name] for name in ("max_tokens", "max_completion_tokens", "max_output_tokens")
            if name in upstream] == [8192]
    assert f"max tokens 128000 is above the 8192 of {model}: clamped" in proxy.log_path.read_text()
