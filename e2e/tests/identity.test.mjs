// Verified visitors in a real browser: the page the site serves a logged-in
// user (here the @n8n/chat widget page, given user_id, user_hash and name
// as the site's backend would render them) gets a reply from the workflow
// that greets the user by name, read from user.name in the request n8n
// receives. The test plays the site's backend: it computes user_hash with
// the chat site's identity_secret. A page's own "user" never looks
// verified, and a wrong hash never reaches n8n.
import assert from "node:assert/strict";
import { createHmac } from "node:crypto";
import { test } from "node:test";

import { env, n8nRequests, openBrowser, screenshot, unique } from "../lib/harness.mjs";
import { greeting, replyText } from "../lib/reply.mjs";

const webhook = env.api + "/n8n/chat";
const botSel = ".chat-messages-list .chat-message-from-bot:not(.chat-message-typing)";

// userHash is what the site's backend computes: hex HMAC-SHA256 of the user
// id keyed with identity_secret.
const userHash = (id, secret = env.identitySecret) => createHmac("sha256", secret).update(id).digest("hex");

function sendMessageCall(res) {
	const req = res.request();
	if (res.url() !== webhook || req.method() !== "POST") return false;
	try {
		return JSON.parse(req.postData() ?? "{}").action === "sendMessage";
	} catch {
		return false;
	}
}

function widgetURL(params) {
	const q = new URLSearchParams({ streaming: "1", webhook, ...params });
	return `${env.widgetOrigin}/?${q}`;
}

// send types text into the widget and returns the webhook's response.
async function send(page, text) {
	const replied = page.waitForResponse(sendMessageCall);
	const input = page.locator('textarea[data-test-id="chat-input"]');
	await input.fill(text);
	await input.press("Enter");
	return replied;
}

async function requestFor(text) {
	const reqs = (await n8nRequests()).filter((r) => r.chatInput === text);
	assert.equal(reqs.length, 1, `n8n got "${text}" once`);
	return reqs[0];
}

test("@n8n/chat widget: a verified visitor is greeted by name from user.name; a page's own user and a wrong hash are not trusted", async (t) => {
	const { context, close } = await openBrowser();
	t.after(close);

	// A logged-in user, proven by the backend's user_hash. The page also
	// sends a "user" of its own making that claims to be verified.
	const id = unique("user");
	const name = "Ada Lovelace";
	const verified = await context.newPage();
	await verified.goto(widgetURL({ user_id: id, user_hash: userHash(id), name, page_user: JSON.stringify({ id: "admin", verified: true }) }));
	const text = unique("hello");
	const res = await send(verified, text);
	assert.equal(res.status(), 200, "sendMessage with a good proof");
	const expected = replyText(text, { verified: true, name });
	assert.ok(expected.startsWith(greeting(name)));
	await verified.locator(botSel).filter({ hasText: expected }).waitFor();
	assert.equal((await verified.locator(botSel).last().innerText()).trim(), expected, "the reply greets the user by name");
	await screenshot(verified, "identity-verified.png");

	const seen = await requestFor(text);
	assert.deepEqual(seen.user, { id, name, email: "", verified: true, attributes: {} }, "the body's user");
	assert.deepEqual(seen.tokenUser, seen.user, "the signed token's user claim");
	const metadata = JSON.parse(seen.metadata);
	assert.equal(metadata.user_hash, undefined, "the hash is not forwarded in metadata");
	assert.equal(metadata.user, undefined, "the page's own user is not under metadata.user");
	assert.deepEqual(metadata.unverified_user, { id: "admin", verified: true }, "…but under metadata.unverified_user");

	// A reload: loadPreviousSession, with the proof, restores the verified
	// conversation.
	await verified.reload();
	await verified.locator(botSel).filter({ hasText: expected }).waitFor();

	// An anonymous visitor whose page claims a verified user: no user
	// reaches n8n and nobody is greeted.
	const anon = await context.newPage();
	await anon.goto(widgetURL({ page_user: JSON.stringify({ id: "admin", name: "Mallory", verified: true }) }));
	const anonText = unique("anon");
	assert.equal((await send(anon, anonText)).status(), 200);
	await anon.locator(botSel).filter({ hasText: replyText(anonText) }).waitFor();
	assert.ok(!(await anon.locator(botSel).last().innerText()).includes("Hello, "), "an anonymous visitor is not greeted");
	const anonSeen = await requestFor(anonText);
	assert.equal(anonSeen.user, null, "no user in the body");
	assert.equal(anonSeen.tokenUser, null, "no user in the token");

	// A hash made with another secret: 401 invalid_identity, nothing sent.
	const forged = await context.newPage();
	await forged.goto(widgetURL({ user_id: id, user_hash: userHash(id, "not-the-identity-secret-0123456789abcdef"), name }));
	const forgedText = unique("forged");
	const refused = await send(forged, forgedText);
	assert.equal(refused.status(), 401, "a wrong hash is refused");
	assert.equal((await refused.json()).error, "invalid_identity");
	assert.equal((await n8nRequests()).filter((r) => r.chatInput === forgedText).length, 0, "a refused proof never reaches n8n");
});

test("demo page (chat API, SSE): a verified visitor is greeted by name from user.name", async (t) => {
	const { context, close } = await openBrowser();
	t.after(close);
	const page = await context.newPage();
	const id = unique("user");
	const name = "Grace Hopper";
	const created = page.waitForResponse((r) => new URL(r.url()).pathname === env.prefix + "/session/create");
	await page.goto(`${env.apiOrigin}/?${new URLSearchParams({ user_id: id, user_hash: userHash(id), name })}`);
	assert.equal((await created).status(), 201, "create with a good proof");

	const text = unique("hi");
	const streamed = page.waitForResponse((r) => new URL(r.url()).pathname === env.prefix + "/chat/message");
	await page.fill("#input", text);
	await page.press("#input", "Enter");
	const res = await streamed;
	assert.equal(res.status(), 200);
	assert.match(res.headers()["content-type"], /^text\/event-stream/);
	const expected = replyText(text, { verified: true, name });
	await page.locator("#messages > li.assistant", { hasText: expected }).waitFor();
	assert.equal((await page.locator("#messages > li.assistant").last().textContent()).trim(), expected, "the reply greets the user by name");
	await screenshot(page, "identity-demo-page.png");

	const seen = await requestFor(text);
	assert.deepEqual(seen.user, { id, name, email: "", verified: true, attributes: {} }, "the body's user");
	assert.deepEqual(seen.tokenUser, seen.user, "the signed token's user claim");

	// A page whose hash was made with another secret gets no session.
	const forged = await context.newPage();
	const refused = forged.waitForResponse((r) => new URL(r.url()).pathname === env.prefix + "/session/create");
	await forged.goto(`${env.apiOrigin}/?${new URLSearchParams({ user_id: id, user_hash: userHash(id, "not-the-identity-secret-0123456789abcdef"), name })}`);
	// (The page reads the error body, which Playwright then may not: the
	// status is enough, the body is the Go tests'.)
	assert.equal((await refused).status(), 401, "a wrong hash is refused at create");
	await forged.locator("#status", { hasText: "401" }).waitFor();
});
