// web-fetch.mjs: fetch, Headers, Request, Response and FormData for the bridge, on node:http.
//
// Node's own (undici) compiles a WebAssembly HTTP parser in every process as soon as anything
// touches one of these globals, and the SDKs inside pi-ai touch them even when they never fetch:
// about half of a bridge's CPU and a third of its memory. bridge.mjs imports this module first,
// so the globals are these stand-ins before any SDK loads, and undici never does.
//
// With PI_PROXY_RELAY (a Unix socket; PI_PROXY_RELAY_TOKEN names this bridge to it) every request
// goes to proxy.py's relay, which sends it upstream over its pooled connections; without it (the
// catalogue, `proxy.py login`) requests go out directly. Either way the upstream gets what undici
// would send: the caller's headers as given, plus undici's defaults where the caller set none.

import http from "node:http";
import zlib from "node:zlib";

const RELAY = process.env.PI_PROXY_RELAY;
const RELAY_TOKEN = process.env.PI_PROXY_RELAY_TOKEN;
const DEFAULT_HEADERS = [
  ["accept", "*/*"],
  ["accept-language", "*"],
  ["sec-fetch-mode", "cors"],
  ["user-agent", "node"],
  ["accept-encoding", "gzip, deflate"],
];
const DECODERS = { gzip: zlib.createGunzip, "x-gzip": zlib.createGunzip, deflate: zlib.createInflate, br: zlib.createBrotliDecompress };

class Headers {
  #entries = new Map(); // lower-case name -> [name as first given, value]

  constructor(init) {
    if (init == null) return;
    const pairs = init instanceof Headers || Symbol.iterator in Object(init) ? init : Object.entries(init);
    for (const [name, value] of pairs) this.append(name, value);
  }

  append(name, value) {
    const key = String(name).toLowerCase();
    const text = String(value).trim();
    const old = this.#entries.get(key);
    this.#entries.set(key, old ? [old[0], `${old[1]}, ${text}`] : [String(name), text]);
  }

  set(name, value) {
    this.#entries.set(String(name).toLowerCase(), [String(name), String(value).trim()]);
  }

  get(name) {
    return this.#entries.get(String(name).toLowerCase())?.[1] ?? null;
  }

  has(name) {
    return this.#entries.has(String(name).toLowerCase());
  }

  delete(name) {
    this.#entries.delete(String(name).toLowerCase());
  }

  getSetCookie() {
    return this.has("set-cookie") ? [this.get("set-cookie")] : [];
  }

  forEach(callback, thisArg) {
    for (const [name, value] of this) callback.call(thisArg, value, name, this);
  }

  *entries() {
    const sorted = [...this.#entries].sort(([a], [b]) => (a < b ? -1 : 1));
    for (const [key, [, value]] of sorted) yield [key, value];
  }

  *keys() {
    for (const [name] of this.entries()) yield name;
  }

  *values() {
    for (const [, value] of this.entries()) yield value;
  }

  [Symbol.iterator]() {
    return this.entries();
  }

  // [name as given, value] pairs, for the wire
  raw() {
    return [...this.#entries.values()];
  }
}

class FormData {
  #entries = [];

  append(name, value, filename) {
    this.#entries.push([String(name), value, filename]);
  }

  set(name, value, filename) {
    this.delete(name);
    this.append(name, value, filename);
  }

  get(name) {
    return this.#entries.find(([key]) => key === name)?.[1] ?? null;
  }

  getAll(name) {
    return this.#entries.filter(([key]) => key === name).map(([, value]) => value);
  }

  has(name) {
    return this.#entries.some(([key]) => key === name);
  }

  delete(name) {
    this.#entries = this.#entries.filter(([key]) => key !== name);
  }

  *entries() {
    for (const [name, value] of this.#entries) yield [name, value];
  }

  [Symbol.iterator]() {
    return this.entries();
  }

  // multipart/form-data: [content type, bytes]
  async encode() {
    const boundary = `----formdata-pi-proxy-${Math.random().toString(16).slice(2)}`;
    const parts = [];
    for (const [name, value, filename] of this.#entries) {
      const quoted = (text) => text.replace(/"/g, "%22").replace(/\r?\n|\r/g, " ");
      if (typeof value === "string") {
        parts.push(`--${boundary}\r\nContent-Disposition: form-data; name="${quoted(name)}"\r\n\r\n${value}\r\n`);
      } else {
        const file = filename ?? value.name ?? "blob";
        parts.push(`--${boundary}\r\nContent-Disposition: form-data; name="${quoted(name)}"; filename="${quoted(file)}"\r\n`
          + `Content-Type: ${value.type || "application/octet-stream"}\r\n\r\n`,
        Buffer.from(await value.arrayBuffer()), "\r\n");
      }
    }
    parts.push(`--${boundary}--\r\n`);
    return [`multipart/form-data; boundary=${boundary}`, Buffer.concat(parts.map((part) => Buffer.from(part)))];
  }
}

// A body as fetch accepts it -> [default content type or null, Buffer or null]
async function bodyBytes(body) {
  if (body == null) return [null, null];
  if (typeof body === "string") return ["text/plain;charset=UTF-8", Buffer.from(body)];
  if (body instanceof URLSearchParams) return ["application/x-www-form-urlencoded;charset=UTF-8", Buffer.from(String(body))];
  if (body instanceof FormData) return body.encode();
  if (body instanceof ArrayBuffer) return [null, Buffer.from(body)];
  if (ArrayBuffer.isView(body)) return [null, Buffer.from(body.buffer, body.byteOffset, body.byteLength)];
  if (body instanceof Blob) return [body.type || null, Buffer.from(await body.arrayBuffer())];
  if (typeof body.getReader === "function" || Symbol.asyncIterator in body) {
    const chunks = [];
    for await (const chunk of body) chunks.push(Buffer.from(chunk));
    return [null, Buffer.concat(chunks)];
  }
  return ["text/plain;charset=UTF-8", Buffer.from(String(body))];
}

function streamOf(body) {
  if (body == null || body instanceof ReadableStream) return body ?? null;
  return new ReadableStream({
    async start(controller) {
      const [, bytes] = await bodyBytes(body);
      if (bytes?.length) controller.enqueue(new Uint8Array(bytes));
      controller.close();
    },
  });
}

class Body {
  get bodyUsed() {
    return this.body?.locked ?? false;
  }

  async arrayBuffer() {
    const bytes = await this.bytes();
    return bytes.buffer.slice(bytes.byteOffset, bytes.byteOffset + bytes.byteLength);
  }

  async bytes() {
    if (!this.body) return new Uint8Array(0);
    const chunks = [];
    for await (const chunk of this.body) chunks.push(chunk);
    return new Uint8Array(Buffer.concat(chunks));
  }

  async text() {
    return new TextDecoder().decode(await this.bytes());
  }

  async json() {
    return JSON.parse(await this.text());
  }

  async blob() {
    return new Blob([await this.bytes()], { type: this.headers.get("content-type") ?? "" });
  }
}

class Request extends Body {
  constructor(input, init = {}) {
    super();
    const base = input instanceof Request ? input : null;
    this.url = base ? base.url : String(input);
    this.method = (init.method ?? base?.method ?? "GET").toUpperCase();
    this.headers = new Headers(init.headers ?? base?.headers);
    this.source = "body" in init ? init.body : base?.source; // as given: fetch sends it as it is
    this.signal = init.signal ?? base?.signal ?? new AbortController().signal;
    this.redirect = init.redirect ?? base?.redirect ?? "follow";
    this.duplex = init.duplex ?? base?.duplex;
  }

  get body() {
    this.stream ??= streamOf(this.source);
    return this.stream;
  }

  clone() {
    return new Request(this);
  }
}

class Response extends Body {
  constructor(body = null, init = {}) {
    super();
    this.status = init.status ?? 200;
    this.statusText = init.statusText ?? "";
    this.headers = new Headers(init.headers);
    this.body = streamOf(body);
    this.url = init.url ?? "";
    this.redirected = init.redirected ?? false;
    this.type = "default";
  }

  get ok() {
    return this.status >= 200 && this.status < 300;
  }

  clone() {
    const [one, two] = this.body ? this.body.tee() : [null, null];
    this.body = one;
    return new Response(two, this);
  }

  static json(data, init = {}) {
    const headers = new Headers(init.headers);
    if (!headers.has("content-type")) headers.set("content-type", "application/json");
    return new Response(JSON.stringify(data), { ...init, headers });
  }

  static error() {
    return new Response(null, { status: 0 });
  }
}

function abortReason(signal) {
  return signal.reason ?? new DOMException("This operation was aborted", "AbortError");
}

// One HTTP exchange: resolves with the node response once its head has arrived.
async function exchange(url, method, headers, body, signal) {
  const target = new URL(url);
  const options = { method, headers: Object.fromEntries(headers.raw()), signal };
  if (RELAY) {
    // To the relay in absolute form, as to a forward proxy; the token names this bridge.
    Object.assign(options, { socketPath: RELAY, path: url, setHost: false });
    options.headers = { host: target.host, ...options.headers, "x-pi-relay-token": RELAY_TOKEN };
  }
  const transport = !RELAY && target.protocol === "https:" ? await import("node:https") : http;
  return new Promise((resolve, reject) => {
    const request = transport.request(RELAY ? options : target, RELAY ? undefined : options);
    request.on("response", resolve);
    request.on("error", reject);
    request.end(body ?? undefined);
  });
}

function responseStream(message, signal) {
  const decode = DECODERS[(message.headers["content-encoding"] ?? "").trim().toLowerCase()];
  const source = decode ? message.pipe(decode()) : message;
  if (decode) message.on("error", (error) => source.destroy(error));
  return new ReadableStream({
    start(controller) {
      source.on("data", (chunk) => controller.enqueue(new Uint8Array(chunk.buffer, chunk.byteOffset, chunk.length)));
      source.on("end", () => controller.close());
      source.on("error", (error) => controller.error(signal.aborted ? abortReason(signal) : new TypeError("terminated", { cause: error })));
      signal.addEventListener("abort", () => message.destroy(abortReason(signal)), { once: true });
    },
    cancel() {
      message.destroy();
    },
  });
}

const REDIRECTS = new Set([301, 302, 303, 307, 308]);

async function fetch(input, init = {}) {
  const request = new Request(input, init);
  const { signal } = request;
  if (signal.aborted) throw abortReason(signal);
  let [contentType, body] = await bodyBytes(request.source);
  const headers = new Headers(request.headers);
  if (contentType && !headers.has("content-type")) headers.set("content-type", contentType);
  for (const [name, value] of DEFAULT_HEADERS) if (!headers.has(name)) headers.set(name, value);
  if (body) headers.set("content-length", String(body.length));
  let { url, method } = request;
  for (let hops = 0; ; hops++) {
    let message;
    try {
      message = await exchange(url, method, headers, body, signal);
    } catch (error) {
      throw signal.aborted ? abortReason(signal) : new TypeError("fetch failed", { cause: error });
    }
    if (RELAY && message.headers["x-pi-relay-error"] !== undefined) {
      message.resume(); // the relay got no response from the upstream: as undici reports it
      throw new TypeError("fetch failed", { cause: new Error(message.headers["x-pi-relay-error"]) });
    }
    const location = message.headers.location;
    if (REDIRECTS.has(message.statusCode) && location && request.redirect === "follow" && hops < 20) {
      message.resume();
      url = new URL(location, url).href;
      if (message.statusCode === 303 || (message.statusCode < 303 && method === "POST")) {
        [method, body] = [method === "HEAD" ? "HEAD" : "GET", null];
        for (const name of ["content-type", "content-length", "content-encoding", "content-language", "content-location"]) {
          headers.delete(name);
        }
      }
      continue;
    }
    const responseHeaders = new Headers();
    for (let i = 0; i < message.rawHeaders.length; i += 2) responseHeaders.append(message.rawHeaders[i], message.rawHeaders[i + 1]);
    const nullBody = method === "HEAD" || [101, 204, 205, 304].includes(message.statusCode);
    if (nullBody) message.resume();
    return new Response(nullBody ? null : responseStream(message, signal), {
      status: message.statusCode,
      statusText: message.statusMessage,
      headers: responseHeaders,
      url,
      redirected: hops > 0,
    });
  }
}

for (const [name, value] of Object.entries({ fetch, Headers, Request, Response, FormData })) {
  Object.defineProperty(globalThis, name, { value, writable: true, configurable: true, enumerable: name === "fetch" });
}
