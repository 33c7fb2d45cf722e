// A minimal chat widget for the caddy-chatproxy SSE API. It uses the session
// cookie (HttpOnly, set by /session/create), so no token is kept in script.
// Replies are rendered with textContent: the API stores text verbatim and
// safety comes from encoding on output.
//
// A reply survives a reload: while it streams, the page keeps its message
// id, the id of the last event shown and the text so far in sessionStorage;
// after a reload it shows that text and resumes the stream after that
// event (GET /chat/stream/{message_id} with Last-Event-ID), so the answer
// continues where it was, with nothing twice and nothing missing. The Stop
// button stops the reply being produced (POST /chat/stop/{message_id}).
"use strict";

const API = "/api/v1";
const list = document.getElementById("messages");
const statusLine = document.getElementById("status");
const form = document.getElementById("composer");
const input = document.getElementById("input");
const sendButton = document.getElementById("send");
const stopButton = document.getElementById("stop");
const PENDING = "chatproxy.pending"; // {id, last, text} of the reply streaming in

function savePending(p) {
	try { sessionStorage.setItem(PENDING, JSON.stringify(p)); } catch { /* storage off */ }
}
function loadPending() {
	try { return JSON.parse(sessionStorage.getItem(PENDING) || "null"); } catch { return null; }
}
function clearPending() {
	try { sessionStorage.removeItem(PENDING); } catch { /* storage off */ }
}

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

// A logged-in visitor. A site renders the proof its backend made for the
// user into its page; this demo takes it from the URL (?user_id=&user_hash=
// &name=&email=, or ?identity_token=). See "Verified visitors" in
// docs/http-api.md. Absent: an anonymous visitor.
const identity = (() => {
	const q = new URLSearchParams(location.search);
	const proof = {};
	for (const k of ["user_id", "user_hash", "name", "email", "identity_token"]) {
		if (q.get(k)) proof[k] = q.get(k);
	}
	return Object.keys(proof).length ? proof : null;
})();

// ensureSession makes sure the page has a session. A verified visitor's
// page asks for one on every load: the proxy continues the user's latest
// conversation (from any device) or takes over this browser's anonymous
// one; newConversation starts a fresh one instead.
async function ensureSession(newConversation = false) {
	if (!identity) {
		const valid = await api("/session/validate");
		if (valid.ok) return;
	}
	const body = { page_url: location.href, ...identity };
	if (identity && newConversation) body.new_conversation = true;
	const res = await api("/session/create", {
		method: "POST",
		headers: { "Content-Type": "application/json" },
		body: JSON.stringify(body),
	});
	if (!res.ok) throw new Error("could not start a session (" + res.status + ")");
}

// loadHistory shows the conversation and returns the bubble of a reply
// still being produced (status streaming), if any, with its id.
async function loadHistory() {
	const res = await api("/chat/history?limit=200");
	if (!res.ok) return null;
	const body = await res.json();
	list.replaceChildren();
	let streaming = null;
	for (const m of body.messages) {
		const li = addMessage(m.role, m.content, m.status === "streaming" ? "complete" : m.status);
		li.dataset.messageId = m.id;
		if (m.role === "assistant" && m.status === "streaming") streaming = { id: m.id, bubble: li };
	}
	return streaming;
}

// readSSE yields {id, data} for each server-sent event in a fetch body.
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
			const lines = event.split("\n");
			const data = lines.filter((l) => l.startsWith("data:")).map((l) => l.slice(5).replace(/^ /, "")).join("\n");
			const id = lines.filter((l) => l.startsWith("id:")).map((l) => l.slice(3).trim()).pop();
			if (data) yield { id: id === undefined ? null : Number(id), data };
		}
	}
}

// showStream shows a reply stream's events in bubble() (created on begin)
// and records, for a reload, how far it got. The stream is framed as n8n
// frames its own: begin (naming the stored reply), items, end, [DONE].
async function showStream(res, bubble, pending) {
	for await (const { id, data } of readSSE(res.body)) {
		if (data === "[DONE]") break;
		const event = JSON.parse(data);
		switch (event.type) {
		case "begin":
			bubble().dataset.messageId = event.message_id ?? "";
			pending.id = event.message_id;
			stopButton.hidden = false;
			break;
		case "item":
			bubble().textContent += event.content;
			pending.text += event.content;
			list.scrollTop = list.scrollHeight;
			break;
		case "error":
			bubble().className = "assistant error";
			bubble().textContent += (bubble().textContent ? "\n" : "") + event.message;
			break;
		case "end":
			break;
		default:
			// Types this page does not know are skipped, as the API asks.
		}
		if (id !== null && pending.id) {
			pending.last = id;
			savePending(pending);
		}
	}
	clearPending();
	stopButton.hidden = true;
}

// send posts a message and shows the reply as it streams in.
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
	await showStream(res, bubble, { id: null, last: 0, text: "" });
}

// resume continues a reply that was streaming when the page went away:
// the text kept in sessionStorage is shown, and the stream resumes after
// the last event shown (from begin when nothing was kept).
async function resume(streaming) {
	const kept = loadPending();
	const pending = kept && kept.id === streaming.id ? kept : { id: streaming.id, last: 1, text: "" };
	streaming.bubble.textContent = pending.text;
	statusLine.textContent = "…";
	sendButton.disabled = true;
	stopButton.hidden = false;
	try {
		const res = await api("/chat/stream/" + encodeURIComponent(streaming.id), {
			headers: { Accept: "text/event-stream", "Last-Event-ID": String(pending.last || 1) },
		});
		if (!res.ok) throw new Error("the reply could not be resumed (" + res.status + ")");
		await showStream(res, () => streaming.bubble, pending);
		statusLine.textContent = "";
	} finally {
		sendButton.disabled = false;
		stopButton.hidden = true;
	}
}

stopButton.addEventListener("click", async () => {
	const id = loadPending()?.id || list.querySelector("li.assistant:last-child")?.dataset.messageId;
	if (!id) return;
	stopButton.disabled = true;
	try {
		await api("/chat/stop/" + encodeURIComponent(id), { method: "POST" });
	} finally {
		stopButton.disabled = false;
	}
});

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
	clearPending();
	await api("/session", { method: "DELETE" });
	list.replaceChildren();
	await ensureSession(true);
	statusLine.textContent = "New conversation started.";
});

(async () => {
	try {
		await ensureSession();
		const streaming = await loadHistory();
		if (streaming) {
			await resume(streaming);
		} else {
			clearPending();
		}
	} catch (err) {
		statusLine.textContent = String(err.message || err);
	}
})();
