// Shared by the browser tests: the addresses run.sh exported, a Chromium
// with a fresh profile, and readers for what the servers recorded.
import { execFileSync } from "node:child_process";
import { mkdtempSync, readFileSync, rmSync, existsSync } from "node:fs";
import { tmpdir } from "node:os";
import path from "node:path";

import { chromium } from "playwright-core";

function need(name) {
	const v = process.env[name];
	if (!v) throw new Error(`${name} is not set: run the tests with bash e2e/run.sh`);
	return v;
}

export const env = {
	apiOrigin: need("E2E_API_ORIGIN"),
	widgetOrigin: need("E2E_WIDGET_ORIGIN"),
	otherOrigin: need("E2E_OTHER_ORIGIN"),
	n8nURL: need("E2E_N8N_URL"),
	artifacts: need("E2E_ARTIFACTS"),
	prefix: "/api/v1",
	// The chat site's identity_secret: a test plays the site's backend.
	identitySecret: need("E2E_IDENTITY_SECRET"),
};
env.api = env.apiOrigin + env.prefix;

export const chromiumPath = "/usr/bin/chromium";

// The flags that work on this machine's closed network. playwright-core
// adds --headless itself.
const chromiumFlags = [
	"--no-sandbox",
	"--disable-gpu",
	"--disable-quic",
	"--no-first-run",
	"--disable-background-networking",
	"--disable-component-update",
	"--disable-sync",
];

// A visitor's user agent for this Chromium. Headless Chromium calls itself
// "HeadlessChrome", which the module's bot scorer rightly counts as
// automation; these tests play a person, so they look like one.
function visitorUserAgent() {
	let major = "156";
	try {
		const out = execFileSync(chromiumPath, ["--version"], { encoding: "utf8", stdio: ["ignore", "pipe", "ignore"] });
		major = out.match(/(\d+)\.\d+\.\d+\.\d+/)?.[1] ?? major;
	} catch {
		// keep the default
	}
	return `Mozilla/5.0 (X11; Linux x86_64) AppleWebKit/537.36 (KHTML, like Gecko) Chrome/${major}.0.0.0 Safari/537.36`;
}
const userAgent = visitorUserAgent();

// openBrowser starts Chromium on a fresh, empty --user-data-dir (a
// persistent context, so a reload keeps cookies and localStorage exactly
// as a real profile would) and returns its context and a close function.
export async function openBrowser() {
	const profile = mkdtempSync(path.join(tmpdir(), "chatproxy-e2e-profile-"));
	const context = await chromium.launchPersistentContext(profile, {
		executablePath: chromiumPath,
		headless: true,
		args: chromiumFlags,
		userAgent,
		viewport: { width: 1000, height: 760 },
	});
	context.setDefaultTimeout(15_000);
	return {
		context,
		async close() {
			await context.close().catch(() => {});
			rmSync(profile, { recursive: true, force: true });
		},
	};
}

export async function screenshot(page, name) {
	const file = path.join(env.artifacts, name);
	await page.screenshot({ path: file, fullPage: false });
	return file;
}

// n8nRequests lists every request the stand-in n8n received so far.
export async function n8nRequests() {
	const res = await fetch(env.n8nURL + "/__requests");
	if (!res.ok) throw new Error(`stand-in n8n: ${res.status}`);
	return res.json();
}

// n8nCounts counts the stand-in n8n's requests by body action.
export async function n8nCounts() {
	const res = await fetch(env.n8nURL + "/__counts");
	if (!res.ok) throw new Error(`stand-in n8n: ${res.status}`);
	return res.json();
}

// accessLog returns Caddy's access log entries for the chat site.
export function accessLog() {
	const file = path.join(env.artifacts, "caddy-access.log");
	if (!existsSync(file)) return [];
	return readFileSync(file, "utf8")
		.split("\n")
		.filter((l) => l.trim() !== "")
		.map((l) => JSON.parse(l));
}

// waitUntil polls fn until it returns a truthy value (returned) or the
// time is up (then it throws, naming what it waited for).
export async function waitUntil(what, fn, timeoutMs = 10_000) {
	const deadline = Date.now() + timeoutMs;
	let last;
	for (;;) {
		last = await fn();
		if (last) return last;
		if (Date.now() > deadline) throw new Error(`timed out waiting for ${what}`);
		await new Promise((r) => setTimeout(r, 50));
	}
}

// A word unique to this run, so texts never collide with earlier runs.
export function unique(prefix) {
	return `${prefix}-${Math.random().toString(36).slice(2, 8)}`;
}
