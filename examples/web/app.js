// A minimal chat widget for the caddy-chatproxy SSE API. It uses the session
// cookie (HttpOnly, set by /session/create), so no token is kept in script.
// Replies are rendered with textContent: the API stores text verbatim and
// safety comes from encoding on output.
"use strict";

const API = "/api/v1";
const list = document.getElementById("messages");
const statusLine = document.getElementById("status");
const form = document.getElementById("composer");
const input = document.getElementById("input");
const sendButton = document.getElementById("send");

function addMessage(role, text, status) {
	const li = document.createElement("li");
	li.className = role + (status && status !== "complete" ? " " + status : "");
	li.textContent = text;
	list.appendChild(li);
	list.scrollTop = list.scrollHeight;
	return li;
}

async function api(path, options = {}) {
	const res = await fetch(API + path, { credentials: "same-origin", ...options });
	return res;
}

async function ensureSession() {
	const valid = await api("/session/validate");
	if (valid.ok) return;
	const res = await api("/session/create", {
		method: "POST",
		headers: { "Content-Type": "application/json" },
		body: JSON.stringify({ page_url: location.href }),
	});
	if (!res.ok) throw new Error("could not start a session (" + res.status + ")");
}

async function loadHistory() {
	const res = await api("/chat/history?limit=200");
	if (!res.ok) return;
	const body = await res.json();
	list.replaceChildren();
	for (const m of body.messages) addMessage(m.role, m.content, m.status);
}

// readSSE yields the data payload of each server-sent event in a fetch body.
async function* readSSE(body) {
	const reader = body.pipeThrough(new TextDecoderStream()).getReader();
	let buffer = "";
	for (;;) {
		const { value, done } = await reader.read();
		if (done) return;
		buffer += value.replace(/\r\n?/g, "\n");
		let end;
		while ((end = buffer.indexOf("\n\n")) >= 0) {
			const event = buffer.slice(0, end);
			buffer = buffer.slice(end + 2);
			const data = event.split("\n").filter((l) => l.startsWith("data:")).map((l) => l.slice(5).replace(/^ /, "")).join("\n");
			if (data) yield data;
		}
	}
}

// send posts a message and shows the reply as it streams in. The stream is
// framed as n8n frames its own: begin (naming the stored reply), items,
// end, then [DONE]; the reply's bubble is created on begin.
async function send(text) {
	addMessage("user", text, "complete");
	let reply = null;
	const bubble = () => reply ?? (reply = addMessage("assistant", "", "complete"));
	statusLine.textContent = "…";
	const res = await api("/chat/message", {
		method: "POST",
		headers: { "Content-Type": "application/json", Accept: "text/event-stream" },
		body: JSON.stringify({ message: text, page_url: location.href }),
	});
	if (!res.ok) {
		let message = "the message could not be sent (" + res.status + ")";
		try { message = (await res.json()).message || message; } catch { /* not JSON */ }
		if (res.status === 401) { await ensureSession(); }
		bubble().className = "assistant error";
		reply.textContent = message;
		return;
	}
	for await (const data of readSSE(res.body)) {
		if (data === "[DONE]") break;
		const event = JSON.parse(data);
		switch (event.type) {
		case "begin":
			bubble().dataset.messageId = event.message_id ?? "";
			break;
		case "item":
			bubble().textContent += event.content;
			list.scrollTop = list.scrollHeight;
			break;
		case "error":
			bubble().className = "assistant error";
			reply.textContent += (reply.textContent ? "\n" : "") + event.message;
			break;
		case "end":
			break;
		default:
			// Types this page does not know are skipped, as the API asks.
		}
	}
}

form.addEventListener("submit", async (e) => {
	e.preventDefault();
	const text = input.value.trim();
	if (!text) return;
	input.value = "";
	sendButton.disabled = true;
	try {
		await send(text);
		statusLine.textContent = "";
	} catch (err) {
		statusLine.textContent = String(err.message || err);
	} finally {
		sendButton.disabled = false;
		input.focus();
	}
});

input.addEventListener("keydown", (e) => {
	if (e.key === "Enter" && !e.shiftKey) {
		e.preventDefault();
		form.requestSubmit();
	}
});

document.getElementById("new-chat").addEventListener("click", async () => {
	await api("/session", { method: "DELETE" });
	list.replaceChildren();
	await ensureSession();
	statusLine.textContent = "New conversation started.";
});

(async () => {
	try {
		await ensureSession();
		await loadHistory();
	} catch (err) {
		statusLine.textContent = String(err.message || err);
	}
})();
