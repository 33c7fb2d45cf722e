// The official @n8n/chat widget with allowFileUploads: true sends a PNG and
// a PDF through {prefix}/n8n/chat (the e2e Caddyfile has an uploads block):
// the widget posts multipart, the proxy checks and forwards it, and the
// stand-in n8n checks it has the Chat Trigger's shape (fields, then one
// "files" part per file, names, types and bytes intact). The reply shows,
// and loadPreviousSession lists the files (never their bytes).
import assert from "node:assert/strict";
import { createHash } from "node:crypto";
import { test } from "node:test";

import { env, n8nRequests, openBrowser, screenshot, unique } from "../lib/harness.mjs";
import { replyText } from "../lib/reply.mjs";

const webhook = env.api + "/n8n/chat";
const botSel = ".chat-messages-list .chat-message-from-bot:not(.chat-message-typing)";

// A real 1×1 PNG and a small real PDF.
const png = Buffer.from("iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR42mNkYPhfDwAChwGA60e6kgAAAABJRU5ErkJggg==", "base64");
const pdf = Buffer.from(
	"%PDF-1.4\n1 0 obj<</Type/Catalog/Pages 2 0 R>>endobj\n2 0 obj<</Type/Pages/Kids[3 0 R]/Count 1>>endobj\n" +
		"3 0 obj<</Type/Page/MediaBox[0 0 72 72]/Parent 2 0 R>>endobj\ntrailer<</Root 1 0 R>>\n%%EOF\n",
);
const sha256 = (b) => createHash("sha256").update(b).digest("hex");

for (const streaming of [false, true]) {
	test(`@n8n/chat widget (allowFileUploads, enableStreaming: ${streaming}): a PNG and a PDF reach n8n as the Chat Trigger's multipart`, async (t) => {
		const { context, close } = await openBrowser();
		t.after(close);
		const page = await context.newPage();
		const url = `${env.widgetOrigin}/?uploads=1&streaming=${streaming ? 1 : 0}&webhook=${encodeURIComponent(webhook)}`;
		const loaded = page.waitForResponse((r) => r.url() === webhook && r.request().method() === "POST");
		await page.goto(url);
		await loaded;

		// Attach both files through the widget's own file dialog.
		const chooser = page.waitForEvent("filechooser");
		await page.locator('[data-test-id="chat-attach-file-button"]').click();
		await (await chooser).setFiles([
			{ name: "pixel.png", mimeType: "image/png", buffer: png },
			{ name: "report.pdf", mimeType: "application/pdf", buffer: pdf },
		]);

		const text = unique(streaming ? "files-streamed" : "files");
		const expected = replyText(text);
		const sent = page.waitForResponse(
			(r) => r.url() === webhook && (r.request().headers()["content-type"] ?? "").startsWith("multipart/form-data"),
		);
		const input = page.locator('textarea[data-test-id="chat-input"]');
		await input.fill(text);
		await input.press("Enter");
		const res = await sent;
		assert.equal(res.status(), 200, `the upload was accepted: ${await res.text().catch(() => "")}`);
		await page.locator(botSel).filter({ hasText: expected }).waitFor();
		await screenshot(page, `widget-uploads-streaming-${streaming}.png`);

		// What n8n received, as the stand-in read and checked it.
		const got = (await n8nRequests()).filter((r) => r.chatInput === text);
		assert.equal(got.length, 1, "n8n got the message once");
		const m = got[0].multipart;
		assert.ok(m, "n8n got multipart/form-data");
		assert.deepEqual(m.problems, [], "the multipart has the Chat Trigger's shape");
		assert.deepEqual(m.partNames, ["action", "sessionId", "chatInput", "message", "metadata", "session", "jwt_token", "timestamp", "files", "files"]);
		assert.deepEqual(
			m.files.map((f) => [f.field, f.name, f.type, f.size, f.sha256]),
			[
				["files", "pixel.png", "image/png", png.length, sha256(png)],
				["files", "report.pdf", "application/pdf", pdf.length, sha256(pdf)],
			],
		);
		assert.equal(got[0].authorization, "Bearer", "the upstream JWT applies as for JSON");
		assert.ok(got[0].jwtMatches, "the bearer token is the body's jwt_token");
		console.log(`n8n received: Content-Type ${m.contentType}, Content-Length ${m.contentLength}, parts ${m.partNames.join(", ")}; ` +
			m.files.map((f) => `${f.name} (${f.type}, ${f.size} B)`).join(", "));

		// The history keeps what the files were, not their bytes.
		const sessionId = await page.evaluate(() => localStorage.getItem("n8n-chat/sessionId"));
		const history = await page.evaluate(
			([u, id]) => fetch(u, { method: "POST", headers: { "Content-Type": "application/json" }, body: JSON.stringify({ action: "loadPreviousSession", sessionId: id }) }).then((r) => r.json()),
			[webhook, sessionId],
		);
		const user = history.data.find((d) => d.kwargs.content === text);
		assert.deepEqual(
			user.kwargs.additional_kwargs.attachments.map((a) => [a.name, a.type, a.size, a.sha256]),
			[
				["pixel.png", "image/png", png.length, sha256(png)],
				["report.pdf", "application/pdf", pdf.length, sha256(pdf)],
			],
		);
	});
}
