// bridge.mjs: one pi-ai call per process, for proxy.py.
//
// Protocol (JSON lines; proxy.py is the only client):
//   stdin  one request line, then stdin stays open; its end means "abort".
//     {"op":"catalog"}
//         -> {"type":"catalog","providers":[{"id","envKey","models":[Model...]}]}
//            envKey: the environment variable pi-ai would take this provider's key from
//            (null when none is set; "<authenticated>" for ambient cloud credentials).
//     {"op":"stream","model":Model,"context":Context,"options":{...},"payload":{...}}
//         options: pi-ai SimpleStreamOptions (apiKey, headers, temperature, maxTokens, reasoning,
//         thinkingBudgets, toolChoice, sessionId, cacheRetention, metadata, timeoutMs, maxRetryDelayMs).
//         payload: fields merged into the upstream request body (pi-ai's onPayload), already in
//         the upstream API's own vocabulary; object values merge one level deep.
//         -> pi-ai's events without `partial`:
//            {"type":"start"}
//            {"type":"text_start|thinking_start","contentIndex":i}
//            {"type":"text_delta|thinking_delta|toolcall_delta","contentIndex":i,"delta":s}
//            {"type":"text_end|thinking_end","contentIndex":i,"content":s,"contentSignature"?:s}
//            content: the block's final text, which pi-ai may make differ from its deltas
//            (openai-responses streams "\n\n" after each reasoning summary part, then drops the last).
//            {"type":"toolcall_start","contentIndex":i,"id":s,"toolName":s}
//            {"type":"toolcall_end","contentIndex":i,"toolCall":ToolCall}
//            then exactly one of
//            {"type":"done","reason":"stop|length|toolUse","message":AssistantMessage}
//            {"type":"error","reason":"error|aborted","message":AssistantMessage,
//             "status"?:n,"retryAfter"?:s,"overflow"?:true}
//            status: the upstream's HTTP status when it sent one; overflow: pi-ai recognised a
//            context-window overflow in the error.
//   exit   0 after the final line is flushed. SIGTERM or the end of stdin aborts the upstream call.
//
// Why the events are reduced: every pi-ai event carries `partial`, the whole message so far;
// printing it per delta is quadratic in the answer's length.

import {
  findEnvKeys,
  getEnvApiKey,
  getModels,
  getProviders,
  isContextOverflow,
  streamSimple,
} from "@mariozechner/pi-ai";

const abort = new AbortController();
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

function readRequestLine() {
  return new Promise((resolve, reject) => {
    let buffered = "";
    const onData = (chunk) => {
      buffered += chunk;
      const newline = buffered.indexOf("\n");
      if (newline === -1) return;
      process.stdin.off("data", onData);
      process.stdin.off("end", onEnd);
      // From now on the end of stdin is the proxy saying "abort".
      process.stdin.on("end", () => abort.abort());
      resolve(JSON.parse(buffered.slice(0, newline)));
    };
    const onEnd = () => {
      if (buffered.trim()) resolve(JSON.parse(buffered));
      else reject(new Error("no request on stdin"));
    };
    process.stdin.setEncoding("utf8");
    process.stdin.on("data", onData);
    process.stdin.on("end", onEnd);
  });
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
function watchUpstreamResponses() {
  const seen = {};
  const fetchUpstream = globalThis.fetch;
  globalThis.fetch = async (...args) => {
    const response = await fetchUpstream(...args);
    seen.status = response.status;
    seen.retryAfter = response.headers.get("retry-after") ?? undefined;
    return response;
  };
  return seen;
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
    case "thinking_start":
      return { type, contentIndex };
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
      return { type, contentIndex, id: block?.id ?? "", toolName: block?.name ?? "" };
    }
    case "toolcall_end":
      return { type, contentIndex, toolCall: event.toolCall };
    case "done":
      return { type, reason: event.reason, message: event.message };
    default:
      return null;
  }
}

function errorEvent(reason, message, upstream, model) {
  const event = { type: "error", reason, message };
  if (reason !== "error") return event;
  if (upstream.status >= 400) {
    event.status = upstream.status;
    if (upstream.retryAfter) event.retryAfter = upstream.retryAfter;
  }
  if (isContextOverflow(message, model.contextWindow)) event.overflow = true;
  return event;
}

async function stream({ model, context, options, payload }) {
  const upstream = watchUpstreamResponses();
  const events = streamSimple(model, context, {
    ...options,
    signal: abort.signal,
    // The SDKs' own retries would hide a 429's retry-after from the client for many seconds.
    maxRetries: 0,
    onPayload: (body) => mergePayload(body, payload),
  });
  for await (const event of events) {
    if (event.type === "error") {
      emit(errorEvent(event.reason, event.error, upstream, model));
      return;
    }
    const reduced = reduce(event);
    if (reduced) emit(reduced);
  }
}

function failure(error) {
  const errorMessage = error instanceof Error ? error.message : String(error);
  return { role: "assistant", content: [], stopReason: "error", errorMessage };
}

process.on("SIGTERM", () => abort.abort());
// A second chance for a provider that ignores the abort signal: never outlive the request.
abort.signal.addEventListener("abort", () => setTimeout(() => finish(1), 1000).unref());

try {
  const request = await readRequestLine();
  if (request.op === "catalog") catalog();
  else if (request.op === "stream") await stream(request);
  else throw new Error(`unknown op: ${request.op}`);
  finish(0);
} catch (error) {
  emit({ type: "error", reason: abort.signal.aborted ? "aborted" : "error", message: failure(error) });
  finish(0);
}
