// A widget written against n8n's stream (e2e/site/sse: an EventSource on
// GET {prefix}/chat/stream that creates its reply bubble only on
// {"type":"begin"}) shows the reply: the stream is framed begin → items →
// end → [DONE], every event but [DONE] has an id (begin is 1), and begin
// names the stored reply.
import assert from "node:assert/strict";
import { test } from "node:test";

import { env, openBrowser, screenshot, unique } from "../lib/harness.mjs";
import { replyText } from "../lib/reply.mjs";

test("EventSource widget: the reply bubble opens on begin and fills with the items", async (t) => {
	const { context, close } = await openBrowser();
	t.after(close);
	const page = await context.newPage();
	await page.goto(env.apiOrigin + "/e2e-sse/");
	await page.waitForFunction(() => window.__ready === true);

	const text = unique("eventsource");
	const expected = replyText(text);
	await page.fill("#input", text);
	await page.press("#input", "Enter");
	await page.locator("#messages li.bot").filter({ hasText: expected }).waitFor();
	await page.waitForFunction(() => window.__done === 1);
	assert.equal((await page.locator("#messages li.bot").innerText()).trim(), expected);

	const events = await page.evaluate(() => window.__events);
	const types = events.map((e) => (e.data === "[DONE]" ? "[DONE]" : JSON.parse(e.data).type));
	assert.equal(types[0], "begin", `first event: ${types.join(" ")}`);
	assert.deepEqual(types.slice(-2), ["end", "[DONE]"]);
	assert.ok(types.slice(1, -2).every((x) => x === "item") && types.length >= 5, `begin, items, end, [DONE]: ${types.join(" ")}`);
	// ids 1, 2, … on every event; [DONE] carries none (EventSource keeps the last one).
	events.slice(0, -1).forEach((e, i) => assert.equal(e.id, String(i + 1), `event ${i + 1} id`));
	const begin = JSON.parse(events[0].data);

	// begin's message_id is the stored reply's id.
	const history = await page.evaluate((api) => fetch(api + "/chat/history").then((r) => r.json()), env.prefix);
	const stored = history.messages.at(-1);
	assert.equal(stored.role, "assistant");
	assert.equal(stored.content, expected);
	assert.equal(begin.message_id, stored.id, "begin names the stored reply");
	assert.equal(await page.locator("#messages li.bot").getAttribute("data-message-id"), stored.id);
	await screenshot(page, "sse-begin-widget.png");
});
