// Drive the Vercel AI SDK's `openai(...)` provider (the Responses API) against the proxy, for
// tests/test_response_store.py: a tool loop with reasoning, then a second user turn on the same
// conversation. With the provider's default `store`, the SDK sends earlier reasoning and messages
// back as `item_reference`s; with `store: false`, as whole items.
// stdin: one JSON {baseURL, model, store?, prompts: [first, second], stream?, localShell?}: with
// localShell, the model's one tool is OpenAI's `local_shell` (the SDK "runs" a command by echoing
// it back), else a `get_weather` function. stdout: one JSON line
// per turn {text, reasoning, steps, toolCalls, toolResults, responseIds, sent}: `sent` holds, for each
// request the SDK made in that turn, the types of its input items (item_reference among them). A
// failure: one line {error, statusCode, responseBody}, exit status 1.
//   echo '{"baseURL":"http://127.0.0.1:4141/v1","model":"openai/gpt-5","prompts":["a","b"]}' \
//     | node tests/ai_sdk_client.mjs
import { createOpenAI } from "@ai-sdk/openai";
import { generateText, jsonSchema, stepCountIs, streamText, tool } from "ai";

let input = "";
for await (const chunk of process.stdin) input += chunk;
const { baseURL, model, store, prompts, stream, localShell } = JSON.parse(input);

// A failed call: its status and body as the SDK saw them, and exit 1.
const fail = (error) => {
  const { statusCode, responseBody } = error.lastError ?? error;
  process.stdout.write(JSON.stringify({ error: String(error.message), statusCode, responseBody }) + "\n",
    () => process.exit(1));
  return new Promise(() => {});
};
let sent = [];
const recording = async (url, init) => {
  sent.push(JSON.parse(init.body).input.map((item) => item.type ?? "message"));
  return fetch(url, init);
};
const openai = createOpenAI({ baseURL, apiKey: "unused", fetch: recording });
const tools = localShell ? {
  local_shell: openai.tools.localShell({ execute: async ({ action }) => ({ output: `ran ${action.command.join(" ")}` }) }),
} : {
  get_weather: tool({
    description: "Weather for a city",
    inputSchema: jsonSchema({ type: "object", properties: { city: { type: "string" } }, required: ["city"] }),
    execute: async ({ city }) => `sunny in ${city}`,
  }),
};
const providerOptions = {
  openai: { forceReasoning: true, reasoningEffort: "low", reasoningSummary: "auto", ...(store === undefined ? {} : { store }) },
};

const messages = [];
for (const prompt of prompts) {
  messages.push({ role: "user", content: prompt });
  const options = { model: openai(model), messages, tools, stopWhen: stepCountIs(4), providerOptions, maxRetries: 0 };
  let result;
  if (stream) {
    let failure;
    result = streamText({ ...options, onError: ({ error }) => { failure = error; } });
    await result.consumeStream();
    if (failure) await fail(failure);
  } else {
    result = await generateText(options).catch(fail);
  }
  const steps = await result.steps;
  messages.push(...(await result.response).messages);
  process.stdout.write(JSON.stringify({
    text: await result.text,
    reasoning: await result.reasoningText,
    steps: steps.length,
    toolCalls: steps.flatMap((step) => step.toolCalls.map((call) => ({ name: call.toolName, input: call.input }))),
    toolResults: steps.flatMap((step) => step.toolResults.map((r) => r.output)),
    responseIds: steps.map((step) => step.response.id),
    sent,
  }) + "\n");
  sent = [];
}
process.stdout.write("", () => process.exit(0));
