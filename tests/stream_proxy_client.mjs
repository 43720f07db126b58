// Drive pi-agent-core's real streamProxy client against the proxy, for tests/test_stream_proxy.py.
// stdin: one JSON {proxyUrl, authToken, model, context, options?, abortAfter?, abortAfterMs?}: abort
// (AbortSignal) once that many events were received, or after that many milliseconds. stdout: one JSON line per event, without
// `partial`, then {"type":"result","message":<the message streamProxy rebuilt>}.
//   echo '{"proxyUrl":"http://127.0.0.1:4141","authToken":"t","model":{...},"context":{...}}' \
//     | node tests/stream_proxy_client.mjs
import { streamProxy } from "@mariozechner/pi-agent-core";

let input = "";
for await (const chunk of process.stdin) input += chunk;
const { proxyUrl, authToken, model, context, options, abortAfter, abortAfterMs } = JSON.parse(input);
for (const m of context?.messages ?? []) m.timestamp ??= Date.now();

const out = (obj) => process.stdout.write(JSON.stringify(obj) + "\n");
const abort = new AbortController();
if (abortAfterMs !== undefined) setTimeout(() => abort.abort(), abortAfterMs);
const stream = streamProxy(model, context, { ...options, proxyUrl, authToken, signal: abort.signal });
let received = 0;
for await (const event of stream) {
  const { partial, ...rest } = event;
  out(rest);
  if (++received === abortAfter) abort.abort();
}
out({ type: "result", message: await stream.result() });
process.stdout.write("", () => process.exit(0));
