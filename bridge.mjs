// bridge.mjs: one pi-ai call per process, for proxy.py.
//
// Protocol (JSON lines; proxy.py is the only client):
//   argv   [--warm-up] and the pi-ai APIs whose provider modules to load before reading the request
//          (pi-ai loads them lazily on first use; a pooled bridge is loaded before its request comes).
//          --warm-up: before reading the request, stream one canned reply per loaded API (the
//          first through the relay's echo), so the request's path runs code already compiled (warmUp).
//          proxy.py runs the bundle `make install` builds, build/bridge.mjs: it loads 4x faster.
//   env    PI_PROXY_RELAY, PI_PROXY_RELAY_TOKEN: where HTTP requests go (web-fetch.mjs).
//   stdin  one request line; later lines answer prompts (login only); the end of stdin means "abort".
//     {"op":"catalog"}
//         -> {"type":"catalog","providers":[{"id","envKey","models":[Model...]}]}
//            envKey: the environment variable pi-ai would take this provider's key from
//            (null when none is set; "<authenticated>" for ambient cloud credentials).
//     {"op":"stream","model":Model,"context":Context,"options":{...},"payload":{...},"clientHeaders"?:{...}}
//         options: pi-ai SimpleStreamOptions (apiKey, headers, temperature, maxTokens, reasoning,
//         thinkingBudgets, sessionId, cacheRetention, metadata, timeoutMs, maxRetryDelayMs).
//         payload: fields merged into the upstream request body (pi-ai's onPayload), already in
//         the upstream API's own vocabulary; object values merge one level deep, null deletes.
//         clientHeaders: a streamProxy client's own headers, added to each upstream request that
//         does not carry that header already: they never replace one pi-ai or the proxy set.
//         -> pi-ai's events without `partial`:
//            {"type":"start"}
//            {"type":"text_start|thinking_start","contentIndex":i,"contentSignature"?:s,"redacted"?:true}
//            (a thinking block's signature on its start when pi-ai knows it then: openai-completions,
//            which ends its blocks only when the stream ends, and Anthropic's redacted thinking, whose
//            opaque data is its signature and which streams no text)
//            {"type":"text_delta|thinking_delta|toolcall_delta","contentIndex":i,"delta":s}
//            {"type":"text_end|thinking_end","contentIndex":i,"content":s,"contentSignature"?:s}
//            content: the block's final text, which pi-ai may make differ from its deltas
//            (openai-responses streams "\n\n" after each reasoning summary part, then drops the last).
//            {"type":"toolcall_start","contentIndex":i,"id":s,"toolName":s,"thoughtSignature"?:s}
//            (thoughtSignature: Google's, known when the call starts)
//            {"type":"toolcall_end","contentIndex":i,"toolCall":ToolCall}
//            then exactly one of
//            {"type":"done","reason":"stop|length|toolUse","message":AssistantMessage,
//             "stopSequence"?:s}   stopSequence: which of the request's stop_sequences ended it
//            {"type":"error","reason":"error|aborted","message":AssistantMessage,
//             "status"?:n,"retryAfter"?:s,"overflow"?:true}
//            status: the upstream's HTTP status when it sent one; overflow: pi-ai recognised a
//            context-window overflow in the error.
//            A Responses-API stream that ends in `response.incomplete` is reported as pi-ai reports
//            the other APIs' max-token stops (reason "length", with usage): pi-ai 0.73.1 skips it.
//     {"op":"refresh","provider":id,"credentials":OAuthCredentials}
//         -> {"type":"credentials","credentials":OAuthCredentials}   (pi-ai's refreshToken)
//     {"op":"login","provider":id}
//         -> {"type":"auth","url","instructions"?}, {"type":"progress","message"},
//            {"type":"prompt","message","placeholder"?,"allowEmpty"?}  answered by a stdin line
//            {"answer": s}, then {"type":"credentials","credentials":OAuthCredentials}
//   Failures of any op: {"type":"error","reason":"error|aborted","message":{"errorMessage":s}}.
//   exit   0 after the final line is flushed. SIGTERM or the end of stdin aborts the upstream call;
//          either one before the request arrives (an idle pooled bridge) ends the process at once.
//
// Why the events are reduced: every pi-ai event carries `partial`, the whole message so far;
// printing it per delta is quadratic in the answer's length.
//
// PI_PROXY_TEST_REDIRECTS (tests only): a JSON object {"https://origin": "http://127.0.0.1:port"}
// that redirects this process's HTTP requests, so OAuth and Copilot flows can meet fake servers.

// First: the web globals (fetch, Headers, ...) must be ours before any SDK touches them.
import "./web-fetch.mjs";
import { createInterface } from "node:readline";
import {
  calculateCost,
  findEnvKeys,
  getEnvApiKey,
  getModels,
  getProviders,
  isContextOverflow,
  streamSimple,
} from "@mariozechner/pi-ai";
import { getOAuthProvider } from "@mariozechner/pi-ai/oauth";

// Each API's provider module, as register-builtins imports it on first use (same module instance).
const PROVIDER_MODULES = {
  "anthropic-messages": () => import("@mariozechner/pi-ai/anthropic"),
  "azure-openai-responses": () => import("@mariozechner/pi-ai/azure-openai-responses"),
  "bedrock-converse-stream": () => import("@mariozechner/pi-ai/bedrock-provider"),
  "google-generative-ai": () => import("@mariozechner/pi-ai/google"),
  "google-vertex": () => import("@mariozechner/pi-ai/google-vertex"),
  "mistral-conversations": () => import("@mariozechner/pi-ai/mistral"),
  "openai-codex-responses": () => import("@mariozechner/pi-ai/openai-codex-responses"),
  "openai-completions": () => import("@mariozechner/pi-ai/openai-completions"),
  "openai-responses": () => import("@mariozechner/pi-ai/openai-responses"),
};

// Blocking writes to the stdout pipe: when the proxy's client does not read, the pipe fills and this
// whole process waits, so it stops reading its upstream too (TCP then holds the upstream back).
// Node's pipe writes are otherwise asynchronous and queue in memory without bound.
process.stdout._handle?.setBlocking?.(true);

const abort = new AbortController();
const upstream = {}; // the last upstream HTTP response seen: status, retryAfter, stopSequence
let pending = [];

function emit(event) {
  if (pending.length === 0) setImmediate(flush);
  pending.push(JSON.stringify(event));
}

function flush() {
  if (pending.length === 0) return;
  process.stdout.write(pending.join("\n") + "\n");
  pending = [];
}

function finish(code) {
  flush();
  // Exiting right after write() to a pipe can lose the tail: exit once stdout has drained.
  process.stdout.write("", () => process.exit(code));
}

const input = createInterface({ input: process.stdin, crlfDelay: Infinity });
const lines = input[Symbol.asyncIterator]();
input.on("close", () => abort.abort());

async function readLine() {
  const { value, done } = await lines.next();
  if (done) throw new Error("stdin closed");
  return JSON.parse(value);
}

function catalog() {
  const providers = getProviders().map((id) => {
    const envKey = findEnvKeys(id)?.[0] ?? (getEnvApiKey(id) === "<authenticated>" ? "<authenticated>" : null);
    return { id, envKey, models: getModels(id) };
  });
  emit({ type: "catalog", providers });
}

// The SDKs inside pi-ai throw on an HTTP error before pi-ai's onResponse runs, and pi-ai reports
// only a message string. Watching fetch keeps the upstream's real status and retry-after.
function watchFetch(sniffStopSequence, sniffIncomplete, clientHeaders) {
  const redirects = Object.entries(JSON.parse(process.env.PI_PROXY_TEST_REDIRECTS || "{}"));
  const fetchUpstream = globalThis.fetch;
  globalThis.fetch = async (resource, init) => {
    const url = String(resource instanceof Request ? resource.url : resource);
    const redirect = redirects.find(([origin]) => url.startsWith(origin));
    if (redirect) resource = redirect[1] + url.slice(redirect[0].length);
    if (clientHeaders) init = withClientHeaders(resource, init, clientHeaders);
    const response = await fetchUpstream(resource, init);
    upstream.status = response.status;
    upstream.retryAfter = response.headers.get("retry-after") ?? undefined;
    if (!response.ok || !response.body) return response;
    if (sniffStopSequence) return withStopSequenceSniffer(response);
    return sniffIncomplete ? withIncompleteSniffer(response) : response;
  };
}

function withClientHeaders(resource, init, clientHeaders) {
  const headers = new Headers(init?.headers ?? (resource instanceof Request ? resource.headers : undefined));
  for (const [name, value] of Object.entries(clientHeaders)) if (!headers.has(name)) headers.set(name, value);
  return { ...init, headers };
}

// pi-ai 0.73.1 reads the Responses API's usage and stop reason only from `response.completed`; a
// stream that ends in `response.incomplete` (max_output_tokens) would read as a plain stop with no
// usage. This notes that event's response, for markIncomplete.
function withIncompleteSniffer(response) {
  let partialLine = "";
  return sniffed(response, (text) => {
    const lines = (partialLine + text).split("\n");
    partialLine = lines.pop();
    for (const line of lines) {
      if (!line.startsWith("data: ") || !line.includes('"response.incomplete"')) continue;
      try {
        const event = JSON.parse(line.slice(6));
        if (event.type === "response.incomplete") upstream.incomplete = event.response ?? {};
      } catch {
        // not an event of ours; pi-ai reports unparsable streams itself
      }
    }
  });
}

// What pi-ai does on `response.completed`, for a stream that ended in `response.incomplete`.
function markIncomplete(event, model) {
  const { message } = event;
  const usage = upstream.incomplete.usage;
  if (usage) {
    const cached = usage.input_tokens_details?.cached_tokens || 0;
    message.usage = {
      input: (usage.input_tokens || 0) - cached,
      output: usage.output_tokens || 0,
      cacheRead: cached,
      cacheWrite: 0,
      totalTokens: usage.total_tokens || 0,
      cost: { input: 0, output: 0, cacheRead: 0, cacheWrite: 0, total: 0 },
    };
    calculateCost(model, message.usage);
  }
  message.stopReason = "length";
  return { ...event, reason: "length" };
}

// pi-ai reports Anthropic's "stop_sequence" stop as a plain stop; only the stream says which
// sequence matched. Used only when the request has stop sequences.
function withStopSequenceSniffer(response) {
  let tail = "";
  return sniffed(response, (text) => {
    const seen = tail + text;
    const found = /"stop_sequence"\s*:\s*("(?:[^"\\]|\\.)*")/.exec(seen);
    if (found) upstream.stopSequence = JSON.parse(found[1]);
    tail = seen.slice(-256);
  });
}

// The response with its body passed on unchanged, while `onText` reads it decoded, chunk by chunk.
function sniffed(response, onText) {
  const decoder = new TextDecoder();
  const sniffer = new TransformStream({
    transform(chunk, controller) {
      controller.enqueue(chunk);
      onText(decoder.decode(chunk, { stream: true }));
    },
  });
  const { status, statusText, headers } = response;
  return new Response(response.body.pipeThrough(sniffer), { status, statusText, headers });
}

function mergePayload(body, payload) {
  if (!payload) return undefined;
  const merged = { ...body };
  for (const [key, value] of Object.entries(payload)) {
    const isObject = (v) => v && typeof v === "object" && !Array.isArray(v);
    merged[key] = isObject(value) && isObject(body[key]) ? { ...body[key], ...value } : value;
    if (value === null) delete merged[key];
  }
  return merged;
}

function reduce(event) {
  const { type, contentIndex } = event;
  switch (type) {
    case "start":
      return { type };
    case "text_start":
      return { type, contentIndex };
    case "thinking_start": {
      const block = event.partial.content[contentIndex];
      if (block?.redacted) return { type, contentIndex, contentSignature: block.thinkingSignature, redacted: true };
      return block?.thinkingSignature ? { type, contentIndex, contentSignature: block.thinkingSignature } : { type, contentIndex };
    }
    case "text_delta":
    case "thinking_delta":
    case "toolcall_delta":
      return { type, contentIndex, delta: event.delta };
    case "text_end":
    case "thinking_end": {
      const block = event.partial.content[contentIndex];
      const contentSignature = block?.textSignature ?? block?.thinkingSignature;
      const reduced = { type, contentIndex, content: event.content };
      return contentSignature ? { ...reduced, contentSignature } : reduced;
    }
    case "toolcall_start": {
      const block = event.partial.content[contentIndex];
      const reduced = { type, contentIndex, id: block?.id ?? "", toolName: block?.name ?? "" };
      return block?.thoughtSignature ? { ...reduced, thoughtSignature: block.thoughtSignature } : reduced;
    }
    case "toolcall_end":
      return { type, contentIndex, toolCall: event.toolCall };
    case "done":
      return upstream.stopSequence === undefined
        ? { type, reason: event.reason, message: event.message }
        : { type, reason: event.reason, message: event.message, stopSequence: upstream.stopSequence };
    default:
      return null;
  }
}

// Bedrock's AWS SDK makes its own connections (no fetch to watch); pi-ai keeps the exception's
// name, or its prefix for it, at the start of the message, and that name says the HTTP status.
const BEDROCK_STATUS = {
  "Validation error": 400, ServiceQuotaExceededException: 400, AccessDeniedException: 403,
  UnrecognizedClientException: 403, ResourceNotFoundException: 404, ModelTimeoutException: 408,
  ModelErrorException: 424, "Model stream error": 424, "Throttling error": 429, ModelNotReadyException: 429,
  "Internal server error": 500, "Service unavailable": 503,
};

function errorEvent(reason, message, model) {
  const event = { type: "error", reason, message };
  if (reason !== "error") return event;
  if (upstream.status >= 400) {
    event.status = upstream.status;
    if (upstream.retryAfter) event.retryAfter = upstream.retryAfter;
  } else if (model.api === "bedrock-converse-stream") {
    const status = BEDROCK_STATUS[message.errorMessage?.split(":")[0]];
    if (status) event.status = status;
  }
  if (isContextOverflow(message, model.contextWindow)) event.overflow = true;
  return event;
}

async function stream({ model, context, options, payload, clientHeaders }) {
  watchFetch(Boolean(payload?.stop_sequences), model.api.endsWith("-responses"), clientHeaders);
  const events = streamSimple(model, context, {
    ...options,
    signal: abort.signal,
    // The SDKs' own retries would hide a 429's retry-after from the client for many seconds.
    maxRetries: 0,
    onPayload: (body) => mergePayload(body, payload),
  });
  for await (const event of events) {
    if (event.type === "error") {
      emit(errorEvent(event.reason, event.error, model));
      return;
    }
    const reduced = reduce(event.type === "done" && upstream.incomplete ? markIncomplete(event, model) : event);
    if (reduced) emit(reduced);
  }
}

function oauthProvider(id) {
  const provider = getOAuthProvider(id);
  if (!provider) throw new Error(`${id} has no OAuth login`);
  return provider;
}

async function refresh({ provider, credentials }) {
  watchFetch(false);
  emit({ type: "credentials", credentials: await oauthProvider(provider).refreshToken(credentials) });
}

async function login({ provider }) {
  watchFetch(false);
  const ask = async (prompt) => {
    emit({ type: "prompt", message: prompt.message, placeholder: prompt.placeholder, allowEmpty: prompt.allowEmpty });
    return (await readLine()).answer;
  };
  const credentials = await oauthProvider(provider).login({
    onAuth: ({ url, instructions }) => emit({ type: "auth", url, instructions }),
    onPrompt: ask,
    onManualCodeInput: () => ask({ message: "Paste the authorization code or the redirect URL" }),
    onProgress: (message) => emit({ type: "progress", message }),
    signal: abort.signal,
  });
  emit({ type: "credentials", credentials });
}

// One canned upstream reply per API, as the fake upstreams in tests/ send them: a text "w", then stop.
const sse = (events) => events.map(([name, data]) => (name ? `event: ${name}\n` : "") + `data: ${JSON.stringify(data)}\n\n`).join("");
const RESPONSES_REPLY = sse([
  [null, { type: "response.created", response: { id: "w", status: "in_progress", output: [] } }],
  [null, { type: "response.output_item.added", output_index: 0, item: { type: "message", id: "m", role: "assistant", status: "in_progress", content: [] } }],
  [null, { type: "response.content_part.added", item_id: "m", output_index: 0, content_index: 0, part: { type: "output_text", text: "", annotations: [] } }],
  [null, { type: "response.output_text.delta", item_id: "m", output_index: 0, content_index: 0, delta: "w" }],
  [null, { type: "response.output_item.done", output_index: 0, item: { type: "message", id: "m", role: "assistant", status: "completed", content: [{ type: "output_text", text: "w", annotations: [] }] } }],
  [null, { type: "response.completed", response: { id: "w", status: "completed", output: [], usage: { input_tokens: 1, output_tokens: 1, total_tokens: 2, input_tokens_details: { cached_tokens: 0 } } } }],
]);
const WARM_UP_REPLIES = {
  "openai-completions": sse([
    [null, { id: "w", object: "chat.completion.chunk", created: 0, model: "w", choices: [{ index: 0, delta: { role: "assistant", content: "w" }, finish_reason: null }] }],
    [null, { id: "w", object: "chat.completion.chunk", created: 0, model: "w", choices: [{ index: 0, delta: {}, finish_reason: "stop" }], usage: { prompt_tokens: 1, completion_tokens: 1, total_tokens: 2 } }],
  ]) + "data: [DONE]\n\n",
  "anthropic-messages": sse([
    ["message_start", { type: "message_start", message: { id: "w", type: "message", role: "assistant", model: "w", content: [], stop_reason: null, usage: { input_tokens: 1, output_tokens: 1 } } }],
    ["content_block_start", { type: "content_block_start", index: 0, content_block: { type: "text", text: "" } }],
    ["content_block_delta", { type: "content_block_delta", index: 0, delta: { type: "text_delta", text: "w" } }],
    ["content_block_stop", { type: "content_block_stop", index: 0 }],
    ["message_delta", { type: "message_delta", delta: { stop_reason: "end_turn" }, usage: { output_tokens: 1 } }],
    ["message_stop", { type: "message_stop" }],
  ]),
  "openai-responses": RESPONSES_REPLY,
};

// The first request through an SDK pays for compiling its code paths (request building, HTTP,
// SSE parsing, pi-ai's event handling): 20-30 ms CPU on the request's path. A pooled bridge pays
// it before its request comes. The first API's request goes, in the SDK's request's stead, to the
// relay's echo (proxy.py), which returns the canned reply: that warms the HTTP path all APIs
// share, and no upstream is contacted; the other APIs' replies are made in-process.
async function warmUp(apis) {
  const fetchUpstream = globalThis.fetch;
  let viaRelay = Boolean(process.env.PI_PROXY_RELAY);
  const reply = (text) => {
    const relayed = viaRelay;
    viaRelay = false;
    return relayed
      ? fetchUpstream("http://relay.invalid/echo", { method: "POST", body: text, headers: { "content-type": "text/event-stream" } })
      : new Response(text, { headers: { "content-type": "text/event-stream" } });
  };
  try {
    for (const api of apis.filter((name) => WARM_UP_REPLIES[name])) {
      globalThis.fetch = async () => reply(WARM_UP_REPLIES[api]);
      const model = { id: "w", name: "w", api, provider: "warm-up", baseUrl: "http://warm-up.invalid/v1", reasoning: false,
        input: ["text"], cost: { input: 0, output: 0, cacheRead: 0, cacheWrite: 0 }, contextWindow: 1000, maxTokens: 100 };
      const context = { messages: [{ role: "user", content: "w", timestamp: 0 }] };
      for await (const event of streamSimple(model, context, { apiKey: "w", maxRetries: 0 })) JSON.stringify(reduce(event));
    }
  } finally {
    globalThis.fetch = fetchUpstream;
  }
}

function failure(error) {
  const errorMessage = error instanceof Error ? error.message : String(error);
  return { role: "assistant", content: [], stopReason: "error", errorMessage };
}

process.on("SIGTERM", () => abort.abort());
// A second chance for a provider that ignores the abort signal: never outlive the request.
abort.signal.addEventListener("abort", () => setTimeout(() => finish(1), 1000).unref());

const ops = { catalog, stream, refresh, login };
try {
  const warm = process.argv[2] === "--warm-up";
  const apis = process.argv.slice(warm ? 3 : 2);
  await Promise.all(apis.map((api) => PROVIDER_MODULES[api]?.()));
  if (warm) await warmUp(apis);
  const stopped = new Promise((_, reject) => {
    const stop = () => reject(new Error("stopped before a request came"));
    if (abort.signal.aborted) stop();
    else abort.signal.addEventListener("abort", stop);
  });
  const request = await Promise.race([readLine(), stopped]);
  process.title = "pi-proxy bridge: serving"; // what `ps` shows; an idle pooled bridge keeps its command line
  if (!ops[request.op]) throw new Error(`unknown op: ${request.op}`);
  await ops[request.op](request);
  finish(0);
} catch (error) {
  emit({ type: "error", reason: abort.signal.aborted ? "aborted" : "error", message: failure(error) });
  finish(0);
}
