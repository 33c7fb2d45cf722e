// Resumable replies on the demo page (examples/web): reloading the page
// while a reply is still streaming shows the reply continuing where it
// was and finishing, with nothing shown twice and nothing missing; n8n's
// request runs to its end (detached_timeout keeps it going across the
// reload). The Stop button stops a reply: n8n's request is cancelled and
// the reply is kept as partial.
import assert from "node:assert/strict";
import { test } from "node:test";

import { env, n8nRequests, openBrowser, screenshot, unique, waitUntil } from "../lib/harness.mjs";
import { replyParts, replyText } from "../lib/reply.mjs";

const lastAssistant = (page) =>
	page.$$eval("#messages > li.assistant", (lis) => {
		const li = lis[lis.length - 1];
		return li ? { text: li.textContent, id: li.dataset.messageId ?? "", cls: li.className } : null;
	});

async function openDemo(context) {
	const page = await context.newPage();
	const ready = page.waitForResponse((r) => new URL(r.url()).pathname === env.prefix + "/chat/history");
	await page.goto(env.apiOrigin + "/");
	await ready;
	return page;
}

test("demo page: a reload mid-reply resumes the stream and the reply finishes", async (t) => {
	const { context, close } = await openBrowser();
	t.after(close);
	let page = await openDemo(context);
	const text = unique("slow resume");
	const parts = replyParts(text);
	await page.fill("#input", text);
	await page.press("#input", "Enter");
	// Two parts shown: the reply is well under way.
	await waitUntil("two parts of the reply", async () => (await lastAssistant(page))?.text === parts[0] + parts[1], 15_000);
	const before = await lastAssistant(page);
	assert.ok(before.id, "the reply's bubble knows its message id (from begin)");
	const kept = await page.evaluate(() => JSON.parse(sessionStorage.getItem("chatproxy.pending")));
	assert.equal(kept.id, before.id);
	assert.equal(kept.text, parts[0] + parts[1]);
	assert.equal(kept.last, 3, "begin is 1, the two items 2 and 3");

	const resumed = [];
	page.on("request", (r) => {
		const u = new URL(r.url());
		if (u.pathname === `${env.prefix}/chat/stream/${before.id}`) resumed.push(r.headers()["last-event-id"]);
	});
	await page.reload();
	// The history shows the reply as streaming; the page resumes it.
	await waitUntil("the reply to finish after the reload", async () => (await lastAssistant(page))?.text === replyText(text), 20_000);
	await screenshot(page, "resume-after-reload.png");
	assert.deepEqual(resumed, ["3"], "one resume, after the last event shown before the reload");
	const after = await lastAssistant(page);
	assert.equal(after.id, before.id);
	assert.equal(after.cls, "assistant", "shown as a complete reply");
	// The end event and [DONE] follow the last part; then nothing is pending.
	await waitUntil("the stream's end", async () => (await page.evaluate(() => sessionStorage.getItem("chatproxy.pending"))) === null, 15_000);

	// n8n's request ran to its end, and the stored reply is whole.
	const req = (await n8nRequests()).find((r) => r.chatInput === text);
	assert.equal(req.finished, true, "n8n finished its reply");
	assert.notEqual(req.cancelled, true);
	const history = await page.evaluate((api) => fetch(api + "/chat/history").then((r) => r.json()), env.prefix);
	const stored = history.messages.find((m) => m.id === before.id);
	assert.equal(stored.status, "complete");
	assert.equal(stored.content, replyText(text));

	// A second reload after the end shows it from the history, unchanged.
	page = await openDemo(context);
	assert.equal((await lastAssistant(page)).text, replyText(text));
});

test("demo page: Stop ends the reply, cancels n8n's request, keeps it partial", async (t) => {
	const { context, close } = await openBrowser();
	t.after(close);
	const page = await openDemo(context);
	const text = unique("slow stop");
	const parts = replyParts(text);
	await page.fill("#input", text);
	await page.press("#input", "Enter");
	await waitUntil("the first part of the reply", async () => (await lastAssistant(page))?.text === parts[0], 15_000);
	await page.click("#stop");
	await waitUntil("the stop button to go", async () => page.$eval("#stop", (b) => b.hidden), 15_000);
	const shown = await lastAssistant(page);
	assert.ok(replyText(text).startsWith(shown.text) && shown.text.length < replyText(text).length, `the reply stopped short: ${JSON.stringify(shown.text)}`);
	await waitUntil("n8n to see its request cancelled", async () => (await n8nRequests()).find((r) => r.chatInput === text)?.cancelled, 15_000);
	const history = await page.evaluate((api) => fetch(api + "/chat/history").then((r) => r.json()), env.prefix);
	const stored = history.messages.find((m) => m.id === shown.id);
	assert.equal(stored.status, "partial");
	assert.equal(stored.content, shown.text, "what was shown is what is kept");
});
