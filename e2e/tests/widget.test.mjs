// The official @n8n/chat widget (pinned in e2e/package.json, served from
// node_modules by Caddy on an allowed origin) pointed at {prefix}/n8n/chat,
// with enableStreaming true and false: replies appear, a reload restores the
// conversation through loadPreviousSession, and loadPreviousSession never
// reaches n8n.
import assert from "node:assert/strict";
import { test } from "node:test";

import { env, n8nCounts, n8nRequests, openBrowser, screenshot, unique } from "../lib/harness.mjs";
import { replyText } from "../lib/reply.mjs";

const webhook = env.api + "/n8n/chat";
const userSel = ".chat-messages-list .chat-message-from-user";
const botSel = ".chat-messages-list .chat-message-from-bot:not(.chat-message-typing)";

// widgetCall matches the widget's POSTs to the webhook with a given action.
function widgetCall(action) {
	return (res) => {
		const req = res.request();
		if (res.url() !== webhook || req.method() !== "POST") return false;
		try {
			return JSON.parse(req.postData() ?? "{}").action === action;
		} catch {
			return false;
		}
	};
}

async function conversation(page) {
	return page.$$eval(".chat-messages-list .chat-message:not(.chat-message-typing)", (els) =>
		els.map((el) => ({
			from: el.classList.contains("chat-message-from-user") ? "user" : el.classList.contains("chat-message-from-bot") ? "bot" : el.className,
			text: el.innerText.trim(),
		})),
	);
}

for (const streaming of [true, false]) {
	const label = `enableStreaming: ${streaming}`;
	test(`@n8n/chat widget (${label}): replies, then loadPreviousSession restores the conversation without n8n`, async (t) => {
		const { context, close } = await openBrowser();
		t.after(close);
		const page = await context.newPage();
		const url = `${env.widgetOrigin}/?streaming=${streaming ? 1 : 0}&webhook=${encodeURIComponent(webhook)}`;

		// First visit: the widget asks for the previous session (none yet).
		const firstLoad = page.waitForResponse(widgetCall("loadPreviousSession"));
		await page.goto(url);
		const load1 = await firstLoad;
		assert.equal(load1.status(), 200, "loadPreviousSession");
		assert.deepEqual(await load1.json(), { data: [] }, "a new widget session has no history");
		const sessionId = await page.evaluate(() => localStorage.getItem("n8n-chat/sessionId"));
		assert.match(sessionId ?? "", /^[0-9a-f-]{36}$/, "the widget picked its own sessionId");

		const sent = [unique(streaming ? "streamed" : "json"), unique(streaming ? "streamed-again" : "json-again")];
		const input = page.locator('textarea[data-test-id="chat-input"]');
		for (const [i, text] of sent.entries()) {
			const expected = replyText(text);
			await page.evaluate(
				([sel, index]) => {
					// Record this reply's bubble (bot bubble number index) at every DOM change.
					window.__samples = [];
					window.__observer?.disconnect();
					window.__observer = new MutationObserver(() => {
						const bubble = document.querySelectorAll(sel)[index];
						if (bubble) window.__samples.push({ t: performance.now(), text: bubble.innerText.trim() });
					});
					window.__observer.observe(document.querySelector(".chat-messages-list"), { childList: true, subtree: true, characterData: true });
				},
				[botSel, i],
			);
			const replied = page.waitForResponse(widgetCall("sendMessage"));
			await input.fill(text);
			await input.press("Enter");

			const res = await replied;
			assert.equal(res.status(), 200, "sendMessage");
			const accept = res.request().headers()["accept"] ?? "";
			if (streaming) {
				assert.equal(accept, "text/plain", "the widget streams with Accept: text/plain");
			} else {
				assert.notEqual(accept, "text/plain");
			}
			await page.locator(botSel).filter({ hasText: expected }).waitFor();
			assert.equal((await page.locator(botSel).nth(i).innerText()).trim(), expected, `reply ${i + 1}`);

			const body = await res.text();
			if (streaming) {
				// NDJSON, one chunk per line, begin … items … end.
				const lines = body.trim().split("\n").map((l) => JSON.parse(l));
				assert.equal(lines[0].type, "begin");
				assert.equal(lines.at(-1).type, "end");
				const items = lines.filter((l) => l.type === "item");
				assert.ok(items.length >= 2, `several item lines (${items.length})`);
				assert.equal(items.map((l) => l.content).join(""), expected);
				// …and the bubble grew as they came in.
				const samples = (await page.evaluate(() => window.__samples)).filter((s) => s.text !== "");
				const texts = [...new Set(samples.map((s) => s.text))];
				assert.ok(texts.length >= 3, `the bubble grew piece by piece (${texts.length} states seen)`);
				for (const s of texts) assert.ok(expected.startsWith(s), `a partial reply is a prefix of the final one: ${JSON.stringify(s)}`);
				const first = samples[0];
				const complete = samples.find((s) => s.text === expected);
				assert.ok(complete.t - first.t >= 300, `pieces came over time (${Math.round(complete.t - first.t)} ms from first piece to last)`);
			} else {
				assert.deepEqual(JSON.parse(body), { output: expected }, "the JSON reply the widget reads");
			}
		}
		const want = [
			{ from: "user", text: sent[0] },
			{ from: "bot", text: replyText(sent[0]) },
			{ from: "user", text: sent[1] },
			{ from: "bot", text: replyText(sent[1]) },
		];
		assert.deepEqual(await conversation(page), want);

		// Reload: the same sessionId, and the conversation comes back.
		const secondLoad = page.waitForResponse(widgetCall("loadPreviousSession"));
		await page.reload();
		const load2 = await secondLoad;
		assert.equal(load2.status(), 200);
		assert.equal(JSON.parse(load2.request().postData()).sessionId, sessionId, "the reload asks for the same session");
		const restored = await load2.json();
		assert.deepEqual(
			restored.data.map((m) => [m.id.includes("HumanMessage") ? "user" : "bot", m.kwargs.content]),
			want.map((w) => [w.from, w.text]),
			"loadPreviousSession answers LangChain-shaped messages",
		);
		await page.waitForFunction((sel) => document.querySelectorAll(sel).length === 4, ".chat-messages-list .chat-message:not(.chat-message-typing)");
		assert.deepEqual(await conversation(page), want, "the widget shows the restored conversation");
		await screenshot(page, `widget-streaming-${streaming}.png`);

		// n8n ran once per message and never for loadPreviousSession.
		const counts = await n8nCounts();
		assert.equal(counts.loadPreviousSession ?? 0, 0, "no loadPreviousSession reached n8n");
		assert.deepEqual(Object.keys(counts), ["sendMessage"], `n8n only ever got sendMessage (${JSON.stringify(counts)})`);
		const reqs = await n8nRequests();
		for (const text of sent) {
			assert.equal(reqs.filter((r) => r.action === "sendMessage" && r.chatInput === text).length, 1, `n8n got "${text}" once`);
		}
	});
}
