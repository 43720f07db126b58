// Drive pi-ai directly (no proxy) for tests of tests/fake_upstream.py.
// stdin: one JSON {model, context, options}; stdout: one JSON line per streamSimple event,
// without the (huge, repetitive) `partial` field. Run with cwd = repo root so node_modules resolves:
//   echo '{"model":{...},"context":{"messages":[...]},"options":{"apiKey":"k","maxRetries":0}}' \
//     | node tests/pi_direct.mjs
// If streamSimple throws synchronously, a single {"type":"exception","message":...} line is printed.
import { streamSimple } from "@mariozechner/pi-ai";

let input = "";
for await (const chunk of process.stdin) input += chunk;
const { model, context, options } = JSON.parse(input);
for (const m of context?.messages ?? []) m.timestamp ??= Date.now();

const out = (obj) => process.stdout.write(JSON.stringify(obj) + "\n");
try {
  const stream = streamSimple(model, context, options ?? {});
  for await (const event of stream) {
    const { partial, ...rest } = event;
    out(rest);
  }
} catch (error) {
  out({ type: "exception", message: String(error?.message ?? error) });
}
process.stdout.write("", () => process.exit(0));
