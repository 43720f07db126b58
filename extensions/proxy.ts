/**
 * pi extension: run and inspect this checkout's pi-proxy from inside a pi session.
 *
 *   /proxy, /proxy status   URL, started by this session or external, models, usage when reported
 *   /proxy start            start `.venv/bin/python proxy.py` unless a proxy already answers
 *   /proxy stop             stop the proxy this session started (never an external one)
 *   /proxy clients          copy-paste setup for Claude Code, Codex and the OpenAI / Anthropic SDKs
 *   pi --proxy              start it with the session, stop it when pi exits
 *
 * Address and token come from the proxy's own PI_PROXY_HOST / PI_PROXY_PORT / PI_PROXY_AUTH_TOKEN,
 * so the proxy started here (it inherits pi's environment) and the one probed are the same.
 * A started proxy gets `--watch-stdin` and a pipe from pi as its stdin: when pi exits, however it
 * exits (SIGKILL included), the pipe closes and the proxy shuts down with its bridges.
 */

import type { ExtensionAPI, ExtensionContext } from "@mariozechner/pi-coding-agent";
import { type ChildProcess, spawn } from "node:child_process";
import { existsSync } from "node:fs";
import { dirname, join } from "node:path";
import { fileURLToPath } from "node:url";

const CHECKOUT = dirname(dirname(fileURLToPath(import.meta.url)));
const PYTHON = join(CHECKOUT, ".venv", "bin", "python");
const PROXY_SCRIPT = join(CHECKOUT, "proxy.py");

const STATUS_KEY = "proxy";
const START_TIMEOUT_MS = 30_000; // loading pi-ai's catalogue takes about a second; a cold disk, more
const PROBE_TIMEOUT_MS = 2_000;
const OUTPUT_LINES_KEPT = 40;
const OUTPUT_LINES_SHOWN = 12;
const SUBCOMMANDS = [
	{ value: "status", label: "status", description: "URL, who started it, models, usage" },
	{ value: "start", label: "start", description: "start this checkout's proxy unless one already answers" },
	{ value: "stop", label: "stop", description: "stop the proxy this session started" },
	{ value: "clients", label: "clients", description: "setup for Claude Code, Codex and the SDKs" },
];
const USAGE = "Usage: /proxy [status|start|stop|clients]";

/** The proxy's address as a client reaches it (a wildcard bind is reached on loopback). */
function proxyUrl(env: NodeJS.ProcessEnv): string {
	const host = env.PI_PROXY_HOST || "127.0.0.1";
	const reachable = host === "0.0.0.0" ? "127.0.0.1" : host === "::" ? "::1" : host;
	return `http://${reachable.includes(":") ? `[${reachable}]` : reachable}:${env.PI_PROXY_PORT || "4141"}`;
}

/** A proxy this pi process started. */
interface ManagedProxy {
	child: ChildProcess;
	output: string[]; // its last lines, stdout and stderr
	exit?: { code: number | null; signal: NodeJS.Signals | null };
	exited: Promise<void>;
	ready: boolean; // answered /healthz: an exit from now on is news
	stopping: boolean; // /proxy stop, the end of pi, or a failed start: an exit is expected
}

/** This pi process's proxy, kept on globalThis: pi rebinds extensions on /new, /resume, /fork and
 * /reload (a fresh instance of this module may load), and the proxy carries on across them. */
interface Shared {
	managed?: ManagedProxy;
	starting: boolean; // a /proxy start (or --proxy) is under way
}
const SHARED_KEY = Symbol.for("pi-proxy.extension");
const shared: Shared = ((globalThis as { [SHARED_KEY]?: Shared })[SHARED_KEY] ??= { starting: false });

function launch(): ManagedProxy {
	// stdin is a pipe pi never writes to: its end is the proxy's signal that pi is gone.
	const child = spawn(PYTHON, [PROXY_SCRIPT, "--watch-stdin"], {
		cwd: CHECKOUT,
		env: process.env,
		stdio: ["pipe", "pipe", "pipe"],
	});
	const managed: ManagedProxy = { child, output: [], exited: Promise.resolve(), ready: false, stopping: false };
	managed.exited = new Promise((resolve) => {
		child.once("exit", (code, signal) => {
			managed.exit = { code, signal };
			resolve();
		});
		child.once("error", (error) => {
			managed.output.push(`could not run ${PYTHON}: ${error.message}`);
			managed.exit ??= { code: null, signal: null };
			resolve();
		});
	});
	for (const stream of [child.stdout, child.stderr]) keepLastLines(stream, managed.output);
	// Neither the child nor its pipes keep pi's event loop alive (pi -p must still exit by itself).
	child.unref();
	for (const stream of [child.stdin, child.stdout, child.stderr]) (stream as unknown as { unref?: () => void }).unref?.();
	return managed;
}

function keepLastLines(stream: NodeJS.ReadableStream | null, lines: string[]) {
	if (!stream) return;
	let partial = "";
	stream.setEncoding("utf8");
	stream.on("data", (chunk: string) => {
		const parts = (partial + chunk).split("\n");
		partial = (parts.pop() ?? "").slice(-4000);
		lines.push(...parts.filter((line) => line.trim()));
		lines.splice(0, Math.max(0, lines.length - OUTPUT_LINES_KEPT));
	});
}

function running(managed: ManagedProxy | undefined): managed is ManagedProxy {
	return managed !== undefined && managed.exit === undefined;
}

function exitText(managed: ManagedProxy): string {
	const exit = managed.exit;
	if (!exit) return "still running";
	return exit.signal ? `killed by ${exit.signal}` : exit.code === null ? "did not start" : `exited with status ${exit.code}`;
}

function lastLines(managed: ManagedProxy): string {
	const shown = managed.output.slice(-OUTPUT_LINES_SHOWN);
	return shown.length ? `\nIts last output:\n${shown.map((line) => `  ${line}`).join("\n")}` : "\nIt printed nothing.";
}

async function timeLeft(promise: Promise<void>, ms: number): Promise<boolean> {
	let timer: NodeJS.Timeout | undefined;
	const timeout = new Promise<boolean>((resolve) => {
		timer = setTimeout(() => resolve(false), ms);
	});
	const done = await Promise.race([promise.then(() => true), timeout]);
	clearTimeout(timer);
	return done;
}

/** SIGTERM (the proxy lets requests in flight finish for its shutdown grace), then SIGKILL. */
async function terminate(managed: ManagedProxy): Promise<void> {
	managed.stopping = true;
	if (!running(managed)) return;
	managed.child.kill("SIGTERM");
	const graceMs = 1000 * Number(process.env.PI_PROXY_SHUTDOWN_GRACE_S || 8) + 3000;
	if (!(await timeLeft(managed.exited, graceMs))) {
		managed.child.kill("SIGKILL");
		await timeLeft(managed.exited, 2000);
	}
}

interface Probe {
	up: boolean;
	models?: string[]; // undefined: the proxy did not list them (e.g. 401: wrong or missing token)
	modelsProblem?: string;
	usage?: { requests?: number; tokens?: number };
}

export default function proxyExtension(pi: ExtensionAPI) {
	const url = proxyUrl(process.env);
	const token = process.env.PI_PROXY_AUTH_TOKEN || undefined;
	const headers: Record<string, string> = token ? { Authorization: `Bearer ${token}` } : {};
	let ui: ExtensionContext["ui"] | undefined; // the latest session's, for news that arrives later

	function notify(message: string, type: "info" | "warning" | "error" = "info") {
		try {
			ui?.notify(message, type);
		} catch {
			// the session that asked is gone; nobody to tell
		}
	}

	function setFooter(text: string | undefined) {
		try {
			ui?.setStatus(STATUS_KEY, text);
		} catch {
			// as above
		}
	}

	/** GET a path of the proxy: its status and JSON body (undefined: no answer, or not JSON). */
	async function get(path: string): Promise<{ status: number; body: unknown } | undefined> {
		try {
			const response = await fetch(`${url}${path}`, { headers, signal: AbortSignal.timeout(PROBE_TIMEOUT_MS) });
			return { status: response.status, body: await response.json().catch(() => undefined) };
		} catch {
			return undefined;
		}
	}

	async function healthy(): Promise<boolean> {
		return (await get("/healthz"))?.status === 200;
	}

	async function probe(): Promise<Probe> {
		if (!(await healthy())) return { up: false };
		const [models, usage] = await Promise.all([get("/v1/models"), get("/usage")]);
		const result: Probe = { up: true };
		const listed = (models?.body as { data?: { id: string }[] } | undefined)?.data;
		if (models?.status === 200 && Array.isArray(listed)) {
			result.models = listed.map((model) => model.id);
		} else {
			result.modelsProblem =
				models?.status === 401
					? token
						? "it refused PI_PROXY_AUTH_TOKEN (401)"
						: "it wants a token: set PI_PROXY_AUTH_TOKEN"
					: `GET /v1/models answered ${models ? models.status : "nothing"}`;
		}
		// GET /usage is optional (older proxies answer 404): figures only when it answers them.
		if (usage?.status === 200) result.usage = usageFigures(usage.body);
		return result;
	}

	function footerFor(state: Probe): string | undefined {
		if (!state.up) return undefined;
		return state.models ? `proxy: ${url} (${state.models.length} models)` : `proxy: ${url}`;
	}

	async function refreshFooter(): Promise<Probe> {
		const state = await probe();
		setFooter(footerFor(state));
		return state;
	}

	async function status() {
		const managed = shared.managed;
		const state = await probe();
		if (!state.up && (shared.starting || running(managed))) {
			notify(`pi-proxy is starting (this session started it); ${url} does not answer yet`);
			return;
		}
		setFooter(footerFor(state));
		if (!state.up) {
			notify(`No proxy answers at ${url}. Start one with /proxy start (or run pi --proxy).`);
			return;
		}
		const owner = running(managed)
			? `started by this session (pid ${managed.child.pid})`
			: "external: not started by this session";
		const lines = [`pi-proxy at ${url}: ${owner}`];
		lines.push(state.models ? `${state.models.length} models available` : `models unknown: ${state.modelsProblem}`);
		const usage = state.usage;
		if (usage?.requests !== undefined || usage?.tokens !== undefined) {
			const parts = [];
			if (usage.requests !== undefined) parts.push(`${usage.requests.toLocaleString("en-US")} requests served`);
			if (usage.tokens !== undefined) parts.push(`${usage.tokens.toLocaleString("en-US")} tokens`);
			lines.push(`${parts.join(", ")} since it started`);
		}
		notify(lines.join("\n"));
	}

	async function start() {
		if (shared.starting) {
			notify(`pi-proxy is already starting at ${url}`);
			return;
		}
		shared.starting = true;
		try {
			await startUnlessRunning();
		} finally {
			shared.starting = false;
		}
	}

	async function startUnlessRunning() {
		const existing = shared.managed;
		const state = await probe();
		if (state.up) {
			setFooter(footerFor(state));
			const owner = running(existing) ? "started by this session" : "not started by this session";
			const models = state.models ? `, ${state.models.length} models` : "";
			notify(`A proxy already answers at ${url} (${owner}${models}); not starting another.`);
			return;
		}
		if (!existsSync(PYTHON)) {
			notify(`Cannot start pi-proxy: ${PYTHON} is missing. Run \`make install\` in ${CHECKOUT} first.`, "error");
			return;
		}
		setFooter(`proxy: starting ${url}`);
		const managed = launch();
		shared.managed = managed;
		managed.exited.then(() => {
			if (shared.managed !== managed) return;
			shared.managed = undefined;
			if (managed.stopping || !managed.ready) return; // whoever stopped it, or the failed start, says so
			setFooter(undefined);
			notify(`pi-proxy (pid ${managed.child.pid}) ${exitText(managed)}.${lastLines(managed)}`, "warning");
		});
		const deadline = Date.now() + START_TIMEOUT_MS;
		while (running(managed) && !managed.stopping && Date.now() < deadline) {
			if (await healthy()) {
				managed.ready = true;
				const ready = await refreshFooter();
				const models = ready.models ? `${ready.models.length} models available` : `models unknown: ${ready.modelsProblem}`;
				notify(`pi-proxy started at ${url} (pid ${managed.child.pid}): ${models}. It stops when this pi exits.`);
				return;
			}
			await new Promise((resolve) => setTimeout(resolve, 100));
		}
		if (managed.stopping) return; // /proxy stop (or the end of the session) came first
		const why = running(managed) ? `did not answer ${url}/healthz within ${START_TIMEOUT_MS / 1000} s` : exitText(managed);
		managed.stopping = true;
		await terminate(managed);
		setFooter(undefined);
		notify(`pi-proxy failed to start: it ${why}.${lastLines(managed)}`, "error");
	}

	async function stop() {
		const managed = shared.managed;
		if (running(managed)) {
			await terminate(managed);
			shared.managed = undefined;
			const state = await refreshFooter();
			notify(
				`pi-proxy (pid ${managed.child.pid}) stopped.` +
					(state.up ? ` Another proxy still answers at ${url}; it was not started by this session.` : ""),
			);
			return;
		}
		const state = await refreshFooter();
		notify(
			state.up
				? `The proxy at ${url} was not started by this session; leaving it running.`
				: `No proxy answers at ${url}; nothing to stop.`,
		);
	}

	async function clients() {
		const state = await probe();
		const key = token ? "$PI_PROXY_AUTH_TOKEN" : "unused";
		const pyKey = token ? 'os.environ["PI_PROXY_AUTH_TOKEN"]' : '"unused"';
		const model = state.models?.[0] ?? "<model id from GET /v1/models>";
		notify(
			[
				`Clients for pi-proxy at ${url}` +
					(state.up ? "" : " (nothing answers there yet: /proxy start)") +
					(token ? "; the token is read from PI_PROXY_AUTH_TOKEN, set it in the client's shell too" : ""),
				"",
				"Claude Code:",
				`  ANTHROPIC_BASE_URL=${url} ANTHROPIC_AUTH_TOKEN=${key} claude`,
				"",
				"Codex (~/.codex/config.toml), then `codex`:",
				`  model = "${model}"`,
				'  model_provider = "pi"',
				"  [model_providers.pi]",
				'  name = "pi-proxy"',
				`  base_url = "${url}/v1"`,
				'  wire_api = "responses"',
				`  env_key = "${token ? "PI_PROXY_AUTH_TOKEN" : "PI_PROXY_KEY"}"` +
					(token ? "" : "   # export PI_PROXY_KEY=unused"),
				"",
				"OpenAI SDK (Python):",
				`  client = openai.OpenAI(base_url="${url}/v1", api_key=${pyKey})`,
				"OpenAI SDK (TypeScript):",
				`  new OpenAI({ baseURL: "${url}/v1", apiKey: ${token ? "process.env.PI_PROXY_AUTH_TOKEN" : '"unused"'} })`,
				"",
				"Anthropic SDK (Python):",
				`  client = anthropic.Anthropic(base_url="${url}", api_key=${pyKey})`,
				"Anthropic SDK (TypeScript):",
				`  new Anthropic({ baseURL: "${url}", apiKey: ${token ? "process.env.PI_PROXY_AUTH_TOKEN" : '"unused"'} })`,
			].join("\n"),
		);
	}

	pi.registerFlag("proxy", {
		description: "Start pi-proxy with the session (it stops when pi exits)",
		type: "boolean",
		default: false,
	});

	pi.on("session_start", async (_event, ctx) => {
		ui = ctx.ui;
		// Not awaited: pi stays responsive while the proxy starts; its notification comes when ready.
		if (pi.getFlag("proxy") === true && !running(shared.managed) && !shared.starting) void start();
		else void refreshFooter();
	});

	pi.on("session_shutdown", async (event) => {
		// /new, /resume, /fork and /reload rebind this extension; the proxy carries on. Quitting ends it.
		const managed = shared.managed;
		if (event.reason === "quit" && running(managed)) await terminate(managed);
	});

	pi.registerCommand("proxy", {
		description: "pi-proxy: status, start, stop, clients",
		getArgumentCompletions: (prefix) => {
			const matches = SUBCOMMANDS.filter((item) => item.value.startsWith(prefix.trim()));
			return matches.length ? matches : null;
		},
		handler: async (args, ctx) => {
			ui = ctx.ui;
			const [subcommand = "status", ...rest] = args.trim().split(/\s+/).filter(Boolean);
			const run = new Map([["status", status], ["start", start], ["stop", stop], ["clients", clients]]).get(subcommand);
			if (!run || rest.length) notify(USAGE, "warning");
			else await run();
		},
	});
}

/** Requests and tokens from `GET /usage`'s totals, as far as it reports them. */
function usageFigures(body: unknown): Probe["usage"] {
	const totals = (body as { totals?: Record<string, unknown> } | undefined)?.totals;
	if (!totals || typeof totals !== "object") return undefined;
	const number = (value: unknown) => (typeof value === "number" && Number.isFinite(value) ? value : undefined);
	let tokens = number(totals.tokens);
	if (tokens === undefined && totals.tokens && typeof totals.tokens === "object") {
		tokens = Object.values(totals.tokens).reduce<number>((sum, value) => sum + (number(value) ?? 0), 0);
	}
	return { requests: number(totals.requests), tokens };
}
