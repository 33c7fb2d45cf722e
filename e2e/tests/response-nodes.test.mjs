// n8n's "Using Response Nodes" mode through the proxy with the official
// @n8n/chat widget (enableStreaming false): the stand-in n8n answers a
// message starting with "nodes:" with executionStarted, the widget opens
// its WebSocket at /chat on the webhookUrl's origin (the chat site), and
// the workflow Send Message → Send and Wait → Send Message runs to its
// end through the proxy. A socket upgrade without the proxy's token is
// refused and never reaches n8n; a reload shows the whole conversation.
// With allowFileUploads, the visitor's answer to Send and Wait carries a
// PNG over the socket (a data URL): the proxy checks it against the site's
// uploads block and relays the frame unchanged; a type the site does not
// accept closes the socket and never reaches n8n.
import assert from "node:assert/strict";
import { createHash } from "node:crypto";
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

// A real 1×1 PNG.
const png = Buffer.from("iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR42mNkYPhfDwAChwGA60e6kgAAAABJRU5ErkJggg==", "base64");
const sha256 = (b) => createHash("sha256").update(b).digest("hex");
const shown = (s) => (s.length > 160 ? `${s.slice(0, 160)}… (${s.length} bytes)` : s);

test("@n8n/chat widget (allowFileUploads): a file in the answer to Send and Wait goes over the socket, checked, to n8n unchanged", async (t) => {
	const { context, close } = await openBrowser();
	t.after(close);
	const page = await context.newPage();
	const transcript = [];
	let t0 = performance.now();
	const at = () => String(Math.round(performance.now() - t0)).padStart(6);
	const sockets = []; // one entry per socket the widget opened
	page.on("websocket", (ws) => {
		const s = { sent: [], closed: null };
		s.done = new Promise((resolve) => (s.closed = resolve));
		sockets.push(s);
		transcript.push(`${at()} WS open ${ws.url().replace(/token=[^&]+/, "token=…")}`);
		ws.on("framereceived", (f) => transcript.push(`${at()} << ${shown(String(f.payload))}`));
		ws.on("framesent", (f) => {
			s.sent.push(String(f.payload));
			transcript.push(`${at()} >> ${shown(String(f.payload))}`);
		});
		ws.on("close", () => {
			transcript.push(`${at()} WS closed`);
			s.closed();
		});
	});
	const within = (p, what) => {
		let timer;
		return Promise.race([p, new Promise((_, reject) => (timer = setTimeout(() => reject(new Error(what)), 20_000)))]).finally(() => clearTimeout(timer));
	};

	// The close codes and reasons the page's sockets get (Playwright's
	// websocket events do not tell them).
	await page.addInitScript(() => {
		const Base = window.WebSocket;
		window.__socketCloses = [];
		window.WebSocket = class extends Base {
			constructor(...args) {
				super(...args);
				this.addEventListener("close", (e) => window.__socketCloses.push({ code: e.code, reason: e.reason }));
			}
		};
	});
	const loaded = page.waitForResponse((r) => r.url() === webhook && (r.request().postData() ?? "").includes("loadPreviousSession"));
	await page.goto(`${env.widgetOrigin}/?streaming=0&uploads=1&webhook=${encodeURIComponent(webhook)}`);
	await loaded;
	const sessionId = await page.evaluate(() => localStorage.getItem("n8n-chat/sessionId"));
	const input = page.locator('textarea[data-test-id="chat-input"]');
	const attach = async (file) => {
		const chooser = page.waitForEvent("filechooser");
		await page.locator('[data-test-id="chat-attach-file-button"]').click();
		await (await chooser).setFiles([file]);
	};
	const start = async (text) => {
		const posted = page.waitForResponse((r) => r.url() === webhook && (r.request().postData() ?? "").includes(text));
		await input.fill(text);
		await input.press("Enter");
		const res = await posted;
		const body = await res.json();
		transcript.push(`${at()} POST → ${res.status()} ${JSON.stringify({ ...body, resumeToken: body.resumeToken ? "<proxy token>" : undefined })}`);
		assert.equal(body.executionStarted, true);
		return body;
	};

	// 1. A PNG in the answer: relayed unchanged, n8n decodes it whole.
	t0 = performance.now();
	const first = await start("nodes: file please");
	await page.locator(botSel).filter({ hasText: "What else do you want to say?" }).last().waitFor({ timeout: 20_000 });
	await attach({ name: "pixel.png", mimeType: "image/png", buffer: png });
	await input.fill("here is the pixel");
	await input.press("Enter");
	await page.locator(botSel).filter({ hasText: "you said: here is the pixel" }).waitFor({ timeout: 20_000 });
	await within(sockets[0].done, "the first socket did not close");

	const answer = sockets[0].sent.find((p) => p.includes('"action":"sendMessage"'));
	assert.ok(answer, "the widget answered over the socket");
	const a = JSON.parse(answer);
	assert.deepEqual(
		a.files.map((f) => [f.name, f.type, f.data.slice(0, f.data.indexOf(",") + 1)]),
		[["pixel.png", "image/png", "data:image/png;base64,"]],
		"the widget sends the file as a data URL",
	);
	let seen = await standInFrames();
	const relayed = seen.frames.filter((f) => f.exec === first.executionId && f.dir === "client->n8n").map((f) => f.data);
	assert.ok(relayed.includes(answer), "n8n got the widget's frame byte for byte");
	const ex = seen.executions.find((e) => e.id === first.executionId);
	assert.equal(ex?.status, "success");
	assert.deepEqual(ex.files, [{ name: "pixel.png", type: "image/png", dataURLPrefix: "data:image/png;base64,", size: png.length, sha256: sha256(png) }]);

	// The history keeps the file's name, type, size and hash.
	const history = await page.evaluate(
		([u, id]) => fetch(u, { method: "POST", headers: { "Content-Type": "application/json" }, body: JSON.stringify({ action: "loadPreviousSession", sessionId: id }) }).then((r) => r.json()),
		[webhook, sessionId],
	);
	const stored = history.data.find((m) => m.id.includes("HumanMessage") && m.kwargs.content === "here is the pixel");
	assert.deepEqual(stored?.kwargs.additional_kwargs.attachments, [{ name: "pixel.png", type: "image/png", size: png.length, sha256: sha256(png) }]);

	// 2. A type the site does not accept (the e2e uploads block allows
	// PNG and PDF): the proxy closes the socket, n8n never sees the answer.
	const second = await start("nodes: refused file");
	const prompts = page.locator(botSel).filter({ hasText: "What else do you want to say?" });
	await within(
		(async () => {
			while ((await prompts.count()) < 2) await new Promise((r) => setTimeout(r, 100));
		})(),
		"the second prompt did not show",
	);
	await attach({ name: "notes.txt", mimeType: "text/plain", buffer: Buffer.from("plain notes\n") });
	await input.fill("here are my notes");
	await input.press("Enter");
	await within(sockets[1].done, "the proxy did not close the socket");
	assert.ok(sockets[1].sent.some((p) => p.includes("here are my notes")), "the widget sent the answer");
	seen = await standInFrames();
	const reached = seen.frames.filter((f) => f.exec === second.executionId && f.dir === "client->n8n" && f.data.includes("sendMessage"));
	assert.deepEqual(reached, [], "the refused answer never reached n8n");
	assert.equal(seen.executions.find((e) => e.id === second.executionId)?.status, "waiting");
	const closes = await page.evaluate(() => window.__socketCloses);
	transcript.push(`socket closes seen by the page: ${JSON.stringify(closes)}`);
	assert.equal(closes[0]?.code, 1000, "n8n's end of the first execution reaches the widget as 1000");
	assert.equal(closes[1]?.code, 1008, "the refused answer closes the socket with 1008");
	assert.match(closes[1]?.reason ?? "", /text\/plain is not accepted/);
	await screenshot(page, "response-nodes-files.png");

	t.diagnostic("transcript (ms from Enter):\n" + transcript.join("\n"));
	console.log("transcript with files (ms from the first Enter):\n" + transcript.join("\n"));
});
