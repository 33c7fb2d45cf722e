// A page on an origin that is not in allowed_origins (another port of the
// same host: same site, so the browser even attaches the visitor's Lax
// session cookie) cannot create a session or chat: the page only ever sees
// a failed fetch or an opaque response, the server answers 403 to every
// attempt, and nothing reaches n8n or the visitor's conversation.
import assert from "node:assert/strict";
import { test } from "node:test";

import { accessLog, env, n8nRequests, openBrowser, screenshot, waitUntil } from "../lib/harness.mjs";

test("a page on a non-allowed origin cannot create a session or chat", async (t) => {
	const { context, close } = await openBrowser();
	t.after(close);

	// A real visitor session on the chat site, in this same browser.
	const chat = await context.newPage();
	const created = chat.waitForResponse((r) => new URL(r.url()).pathname === env.prefix + "/session/create");
	await chat.goto(env.apiOrigin + "/");
	assert.equal((await created).status(), 201);
	const validate = () => chat.evaluate((api) => fetch(api + "/session/validate").then((r) => r.json()), env.prefix);
	const visitor = await validate();
	assert.equal(visitor.valid, true);
	assert.ok((await context.cookies(env.apiOrigin)).some((c) => c.name === "chat_session"), "the browser holds a session cookie for the chat site");

	const n8nBefore = (await n8nRequests()).length;
	const logBefore = accessLog().length;

	// The other origin's page, watched from the browser's network stack:
	// Playwright's events for requests and responses, and the DevTools
	// protocol for the CORS preflights (Playwright does not report those).
	const page = await context.newPage();
	const responses = [];
	page.on("response", (r) => responses.push({ method: r.request().method(), path: new URL(r.url()).pathname, status: r.status() }));
	const cdp = await context.newCDPSession(page);
	await cdp.send("Network.enable");
	const sent = new Map();
	const preflights = [];
	const corsFailures = [];
	cdp.on("Network.requestWillBeSent", (e) => sent.set(e.requestId, e.request));
	cdp.on("Network.responseReceived", (e) => {
		const req = sent.get(e.requestId);
		if (e.type === "Preflight" || req?.method === "OPTIONS") {
			preflights.push({ path: new URL(e.response.url).pathname, status: e.response.status });
		}
	});
	cdp.on("Network.loadingFailed", (e) => {
		const req = sent.get(e.requestId);
		if (e.corsErrorStatus && req) corsFailures.push({ method: req.method, path: new URL(req.url).pathname, cors: e.corsErrorStatus.corsError });
	});

	await page.goto(`${env.otherOrigin}/?api=${encodeURIComponent(env.api)}`);
	const results = await page.evaluate(() => window.runAttempts());

	// What the page observes: every attempt refused, nothing readable.
	const byName = Object.fromEntries(results.map((r) => [r.name, r]));
	for (const name of ["create session (JSON, cors)", "chat message (JSON, cors, cookie)", "create session (text/plain, cors)", "@n8n/chat sendMessage (JSON, cors)"]) {
		assert.equal(byName[name].outcome, "rejected", `${name}: fetch rejects`);
		assert.match(byName[name].error, /^TypeError: /, `${name}: a network error, as CORS failures are`);
	}
	const noCors = byName["chat message (text/plain, no-cors, cookie)"];
	assert.deepEqual([noCors.outcome, noCors.type, noCors.status, noCors.body], ["resolved", "opaque", 0, ""], "no-cors: an opaque response, nothing readable");
	assert.ok(results.every((r) => r.refused), "every attempt was refused");

	// What the browser saw on the wire: 403 to each preflight, and the
	// CORS checks failing.
	const p = env.prefix;
	// (DevTools events may trail the page's promises by a moment.)
	await waitUntil("the preflights", () => preflights.length >= 3);
	await waitUntil("the CORS failures", () => corsFailures.length >= 4);
	await waitUntil("the no-cors response", () => responses.some((r) => r.status === 403));
	assert.deepEqual(
		preflights.map((x) => `${x.path} ${x.status}`).sort(),
		[`${p}/chat/message 403`, `${p}/n8n/chat 403`, `${p}/session/create 403`],
		"the server refused every preflight",
	);
	assert.deepEqual(
		corsFailures.map((x) => `${x.method} ${x.path}`).sort(),
		[`POST ${p}/chat/message`, `POST ${p}/n8n/chat`, `POST ${p}/session/create`, `POST ${p}/session/create`],
		`the browser's CORS check failed each cors-mode request (${corsFailures.map((x) => x.cors).join(", ")})`,
	);
	assert.ok(
		responses.some((r) => r.method === "POST" && r.path === `${p}/chat/message` && r.status === 403),
		"the no-cors chat message reached the server and got 403",
	);

	// What the server logged: every request from that origin answered 403.
	const entries = await waitUntil("the access log", () => {
		const fromOther = accessLog()
			.slice(logBefore)
			.filter((e) => (e.request.headers?.Origin ?? [])[0] === env.otherOrigin);
		return fromOther.length >= 5 ? fromOther : null;
	});
	assert.deepEqual(
		entries.map((e) => `${e.request.method} ${new URL(e.request.uri, "http://x").pathname} ${e.status}`).sort(),
		[
			`OPTIONS ${p}/chat/message 403`,
			`OPTIONS ${p}/n8n/chat 403`,
			`OPTIONS ${p}/session/create 403`,
			`POST ${p}/chat/message 403`,
			`POST ${p}/session/create 403`,
		],
		"Caddy's access log: 403 for everything the other origin sent",
	);

	// For the screenshot: the page's own table, and under it (added by the
	// test) what the browser's network log showed of the server's answers.
	await page.evaluate((lines) => {
		const note = document.createElement("pre");
		note.style.cssText = "margin-top:16px;padding:8px;background:#f4f4f4;border-left:4px solid #a00";
		note.textContent = "Added by the test, from the browser's network log (the page itself cannot see these):\n" + lines.join("\n");
		document.body.appendChild(note);
	}, [
		...preflights.map((x) => `OPTIONS ${x.path} → ${x.status}`),
		...responses.filter((r) => r.status === 403).map((r) => `${r.method} ${r.path} → ${r.status} (no-cors)`),
		...corsFailures.map((x) => `${x.method} ${x.path}: CORS error ${x.cors}`),
	]);
	await screenshot(page, "other-origin-refused.png");

	// Nothing got through: n8n was not called, the visitor's conversation
	// is untouched, and no session belongs to the other origin.
	assert.equal((await n8nRequests()).length, n8nBefore, "n8n received nothing");
	const after = await validate();
	assert.equal(after.session_id, visitor.session_id);
	assert.equal(after.message_count, 0, "the visitor's session has no messages");
});
