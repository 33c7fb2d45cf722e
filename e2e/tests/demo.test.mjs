// The demo page (examples/web) in a real browser: a session is created on
// page load, two messages get streamed replies (each bubble opened on the
// stream's begin event), and after a reload the conversation is back from
// the server.
import assert from "node:assert/strict";
import { test } from "node:test";

import { env, n8nRequests, openBrowser, screenshot, unique } from "../lib/harness.mjs";
import { replyText } from "../lib/reply.mjs";

const isAPI = (res, path) => new URL(res.url()).pathname === env.prefix + path;

// bubbles reads the chat list as [{role, text}].
function bubbles(page) {
	return page.$$eval("#messages > li", (lis) =>
		lis.map((li) => ({ role: li.classList.contains("user") ? "user" : li.classList.contains("assistant") ? "assistant" : li.className, text: li.textContent })),
	);
}

// watchLastReply records, while a reply streams in, the length of the last
// assistant bubble each time the DOM changes, with a timestamp.
async function watchLastReply(page) {
	await page.evaluate(() => {
		const list = document.getElementById("messages");
		window.__samples = [];
		window.__observer?.disconnect();
		window.__observer = new MutationObserver(() => {
			const last = list.lastElementChild;
			if (last && last.classList.contains("assistant")) {
				window.__samples.push({ t: performance.now(), len: last.textContent.length });
			}
		});
		window.__observer.observe(list, { childList: true, subtree: true, characterData: true });
	});
}

test("demo page: session on load, two streamed replies, history back after a reload", async (t) => {
	const { context, close } = await openBrowser();
	t.after(close);
	const page = await context.newPage();
	const apiCalls = [];
	page.on("response", (res) => {
		const u = new URL(res.url());
		if (u.pathname.startsWith(env.prefix)) apiCalls.push(`${res.request().method()} ${u.pathname} ${res.status()}`);
	});

	// Page load: validate (401, no session yet), create (201), history.
	const created = page.waitForResponse((r) => isAPI(r, "/session/create"));
	const firstHistory = page.waitForResponse((r) => isAPI(r, "/chat/history"));
	await page.goto(env.apiOrigin + "/");
	const createRes = await created;
	assert.equal(createRes.status(), 201, "POST /session/create");
	// (The page never reads the create response's body, so Chromium never
	// finishes loading it and Playwright cannot read it: ask validate.)
	const session = await page.evaluate((api) => fetch(api + "/session/validate").then((r) => r.json()), env.prefix);
	assert.equal(session.valid, true);
	assert.match(session.session_id, /^[A-Za-z0-9_-]{8,}$/);
	assert.equal(session.message_count, 0);
	const cookies = await context.cookies(env.apiOrigin);
	const cookie = cookies.find((c) => c.name === "chat_session");
	assert.ok(cookie, "the session cookie is set");
	assert.equal(cookie.httpOnly, true, "the session cookie is HttpOnly");
	assert.equal((await firstHistory).status(), 200);
	assert.deepEqual(await bubbles(page), [], "a new session starts empty");

	const sent = [unique("first"), unique("second")];
	for (const [i, text] of sent.entries()) {
		const expected = replyText(text);
		await watchLastReply(page);
		const streamed = page.waitForResponse((r) => isAPI(r, "/chat/message"));
		await page.fill("#input", text);
		await page.press("#input", "Enter");

		const res = await streamed;
		assert.equal(res.status(), 200, "POST /chat/message");
		assert.match(res.headers()["content-type"], /^text\/event-stream/);
		assert.ok(res.headers()["x-message-id"], "X-Message-ID is exposed");

		if (i === 0) {
			// A picture of the reply while it is still arriving (best effort:
			// the assertions on the growth below are what counts).
			await page
				.waitForFunction(
					(full) => {
						const last = document.querySelector("#messages > li.assistant:last-child");
						return last && last.textContent.length > 0 && last.textContent.length < full;
					},
					expected.length,
					{ timeout: 5_000 },
				)
				.then(
					() => screenshot(page, "demo-page-streaming.png"),
					() => {},
				);
		}
		await page.waitForFunction(
			(want) => document.querySelector("#messages > li.assistant:last-child")?.textContent === want,
			expected,
		);
		await page.waitForFunction(() => !document.getElementById("send").disabled);
		// The page opened the reply's bubble on begin, which names the stored reply.
		assert.equal(
			await page.locator("#messages > li.assistant:last-child").getAttribute("data-message-id"),
			res.headers()["x-message-id"],
			"begin's message_id is the X-Message-ID",
		);

		// The reply grew chunk by chunk, over time, not all at once.
		const samples = await page.evaluate(() => window.__samples);
		const lengths = [...new Set(samples.map((s) => s.len).filter((n) => n > 0))];
		assert.ok(lengths.length >= 3, `the reply arrived in pieces (lengths seen: ${lengths.join(", ")})`);
		assert.deepEqual(lengths, [...lengths].sort((a, b) => a - b), "the reply only grows");
		assert.equal(lengths.at(-1), expected.length);
		const firstPartial = samples.find((s) => s.len > 0);
		const complete = samples.find((s) => s.len === expected.length);
		assert.ok(complete.t - firstPartial.t >= 300, `pieces came over time (${Math.round(complete.t - firstPartial.t)} ms from first piece to last)`);
	}

	const before = await bubbles(page);
	const want = [
		{ role: "user", text: sent[0] },
		{ role: "assistant", text: replyText(sent[0]) },
		{ role: "user", text: sent[1] },
		{ role: "assistant", text: replyText(sent[1]) },
	];
	assert.deepEqual(before, want);

	// Reload: the same session (no new create), the history from the server.
	const creates = apiCalls.filter((c) => c.startsWith(`POST ${env.prefix}/session/create`)).length;
	const validated = page.waitForResponse((r) => isAPI(r, "/session/validate"));
	const history = page.waitForResponse((r) => isAPI(r, "/chat/history"));
	await page.reload();
	assert.equal((await validated).status(), 200, "the session is still valid after a reload");
	const historyRes = await history;
	assert.equal(historyRes.status(), 200);
	const body = await historyRes.json();
	assert.equal(body.session_id, session.session_id);
	assert.deepEqual(
		body.messages.map((m) => [m.role, m.content, m.status]),
		want.map((w) => [w.role, w.text, "complete"]),
	);
	await page.waitForFunction(() => document.querySelectorAll("#messages > li").length === 4);
	assert.deepEqual(await bubbles(page), want, "4 bubbles with the right roles after the reload");
	assert.equal(
		apiCalls.filter((c) => c.startsWith(`POST ${env.prefix}/session/create`)).length,
		creates,
		"a reload does not create another session",
	);
	await screenshot(page, "demo-page-after-reload.png");

	// n8n saw each message exactly once.
	const reqs = await n8nRequests();
	for (const text of sent) {
		assert.equal(reqs.filter((r) => r.action === "sendMessage" && r.chatInput === text).length, 1, `n8n got "${text}" once`);
	}
});
