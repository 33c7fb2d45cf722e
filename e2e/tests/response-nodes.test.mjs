// n8n's "Using Response Nodes" mode through the proxy with the official
// @n8n/chat widget (enableStreaming false): the stand-in n8n answers a
// message starting with "nodes:" with executionStarted, the widget opens
// its WebSocket at /chat on the webhookUrl's origin (the chat site), and
// the workflow Send Message → Send and Wait → Send Message runs to its
// end through the proxy. A socket upgrade without the proxy's token is
// refused and never reaches n8n; a reload shows the whole conversation.
import assert from "node:assert/strict";
import { test } from "node:test";

import WebSocket from "ws";

import { env, openBrowser, screenshot } from "../lib/harness.mjs";

const webhook = env.api + "/n8n/chat";
const msgSel = ".chat-messages-list .chat-message:not(.chat-message-typing)";
const botSel = ".chat-messages-list .chat-message-from-bot:not(.chat-message-typing)";

async function conversation(page) {
	return page.$$eval(msgSel, (els) =>
		els.map((el) => [el.classList.contains("chat-message-from-user") ? "user" : "bot", el.innerText.trim()]),
	);
}

async function standInFrames() {
	const res = await fetch(env.n8nURL + "/__frames");
	return res.json();
}

// tryUpgrade opens a socket from outside the browser and reports the
// handshake's HTTP status (101 when it opened).
function tryUpgrade(url, origin) {
	return new Promise((resolve) => {
		const ws = new WebSocket(url, { headers: origin ? { Origin: origin } : {} });
		ws.on("open", () => {
			ws.terminate();
			resolve(101);
		});
		ws.on("unexpected-response", (req, res) => {
			// With this listener set, ending the request is ours to do.
			resolve(res.statusCode);
			req.destroy();
		});
		ws.on("error", () => resolve(0));
	});
}

test("@n8n/chat widget: Send Message → Send and Wait → Send Message over the proxy's /chat socket", async (t) => {
	const { context, close } = await openBrowser();
	t.after(close);
	const page = await context.newPage();
	const transcript = [];
	let t0 = 0;
	const at = () => String(Math.round(performance.now() - t0)).padStart(6);
	let socketClosed;
	const closed = new Promise((resolve) => (socketClosed = resolve));
	let socketURL = "";
	page.on("websocket", (ws) => {
		socketURL = ws.url();
		transcript.push(`${at()} WS open ${ws.url().replace(/token=[^&]+/, "token=…")}`);
		ws.on("framereceived", (f) => transcript.push(`${at()} << ${f.payload}`));
		ws.on("framesent", (f) => transcript.push(`${at()} >> ${f.payload}`));
		ws.on("close", () => {
			transcript.push(`${at()} WS closed`);
			socketClosed();
		});
	});

	const loaded = page.waitForResponse((r) => r.url() === webhook && (r.request().postData() ?? "").includes("loadPreviousSession"));
	await page.goto(`${env.widgetOrigin}/?streaming=0&webhook=${encodeURIComponent(webhook)}`);
	await loaded;
	const sessionId = await page.evaluate(() => localStorage.getItem("n8n-chat/sessionId"));
	const input = page.locator('textarea[data-test-id="chat-input"]');

	const posted = page.waitForResponse((r) => r.url() === webhook && (r.request().postData() ?? "").includes("sendMessage"));
	await input.fill("nodes: widget hello");
	t0 = performance.now();
	await input.press("Enter");
	const res = await posted;
	const body = await res.json();
	transcript.push(`${at()} POST → ${res.status()} ${JSON.stringify({ ...body, resumeToken: body.resumeToken ? "<proxy token>" : undefined })}`);
	assert.equal(res.status(), 200);
	assert.match(res.headers()["content-type"], /^application\/json/);
	assert.equal(body.executionStarted, true);
	assert.match(body.executionId, /^\d+$/);
	assert.ok(body.resumeToken, "the proxy adds its resumeToken");

	await page.locator(botSel).filter({ hasText: "What else do you want to say?" }).waitFor({ timeout: 20_000 });
	await input.fill("typed reply");
	await input.press("Enter");
	await page.locator(botSel).filter({ hasText: "you said: typed reply" }).waitFor({ timeout: 20_000 });
	let timer;
	await Promise.race([closed, new Promise((_, reject) => (timer = setTimeout(() => reject(new Error("the socket did not close")), 20_000)))]);
	clearTimeout(timer);

	const want = [
		["user", "nodes: widget hello"],
		["bot", "first: widget hello"],
		["bot", "What else do you want to say?"],
		["user", "typed reply"],
		["bot", "you said: typed reply"],
	];
	assert.deepEqual(await conversation(page), want);
	await screenshot(page, "response-nodes.png");

	// The widget's socket went to the chat site, with the proxy's token.
	const u = new URL(socketURL);
	assert.equal(u.origin.replace(/^ws/, "http"), env.apiOrigin);
	assert.equal(u.pathname, "/chat");
	assert.equal(u.searchParams.get("sessionId"), sessionId);
	assert.equal(u.searchParams.get("executionId"), body.executionId);
	assert.equal(u.searchParams.get("token"), body.resumeToken);

	// What n8n saw: one socket, the widget's answer, the acks, its own close.
	const seen = await standInFrames();
	const mine = seen.frames.filter((f) => f.exec === body.executionId);
	const sent = mine.filter((f) => f.dir === "client->n8n").map((f) => f.data);
	assert.ok(sent.includes("n8n|heartbeat-ack"), "the widget's acks reached n8n");
	assert.ok(
		sent.some((d) => d.startsWith("{") && JSON.parse(d).chatInput === "typed reply" && JSON.parse(d).sessionId === sessionId),
		"the widget's answer reached n8n unchanged",
	);
	assert.equal(seen.executions.find((e) => e.id === body.executionId)?.status, "success");
	const upgradesBefore = seen.sockets.upgrades;

	// The hole stays closed: another client attaching to that execution
	// without the token, or from another origin, is refused by the proxy.
	const base = `${u.origin}/chat?sessionId=${sessionId}&executionId=${body.executionId}&isPublic=true`;
	assert.equal(await tryUpgrade(base, env.widgetOrigin), 403, "no token");
	assert.equal(await tryUpgrade(`${base}&token=${body.resumeToken}`, env.otherOrigin), 403, "an origin that is not allowed");
	assert.equal(await tryUpgrade(`${u.origin}/chat?sessionId=intruder-0001&executionId=${body.executionId}&isPublic=true&token=${body.resumeToken}`, env.widgetOrigin), 403, "another sessionId");
	const plain = await fetch(base.replace(/^ws/, "http"), { headers: { Origin: env.widgetOrigin } });
	assert.equal(plain.status, 404, "a plain GET");
	const after = await standInFrames();
	assert.equal(after.sockets.upgrades, upgradesBefore, "no refused upgrade reached n8n");
	assert.equal(after.sockets.plainGets, 0, "no plain GET reached n8n");

	// A reload: loadPreviousSession shows the whole conversation.
	await page.reload();
	await page.waitForFunction((sel) => document.querySelectorAll(sel).length === 5, msgSel);
	assert.deepEqual(await conversation(page), want, "loadPreviousSession restores all five messages");

	t.diagnostic("transcript (ms from Enter):\n" + transcript.join("\n"));
	console.log("transcript (ms from Enter):\n" + transcript.join("\n"));
});
