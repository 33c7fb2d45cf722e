// The stand-in n8n's "Using Response Nodes" mode, as research
// n8n-chat-advanced.md captured it from n8n 2.8.4. A sendMessage whose
// chatInput starts with "nodes:" starts an execution of the workflow
//   Send Message "first: <text>" → Send and Wait "What else do you want to say?"
//   → Send Message "you said: <answer>"
// and is answered {"executionStarted":true,"executionId":"<n>"} (sequential
// ids). The conversation goes on over a WebSocket at /chat (any path
// starting with /chat, as n8n's chat server accepts):
//   - "n8n|heartbeat" on connect and every E2E_N8N_HEARTBEAT_MS (30 s);
//   - each message at the next poll (E2E_N8N_POLL_MS, n8n's 3 s);
//   - "n8n|continue" right after a Send Message;
//   - a Send and Wait waits for the client's sendMessage frame;
//   - after the last node, a close frame without a status (1005);
//   - an unknown execution: `Execution with id "N" does not exist`, close 1008;
//   - no "n8n|heartbeat-ack" for 60 s: the execution is cancelled and the
//     connection dropped (1006);
//   - a plain GET without an upgrade: 500 with an HTML page.
// Like n8n it checks nothing else: no token, no Origin, no session binding.
// Every frame is recorded with its time (GET /__frames).
import { createHash } from "node:crypto";

import { WebSocketServer } from "ws";

const heartbeatMs = Number(process.env.E2E_N8N_HEARTBEAT_MS || 30_000);
const pollMs = Number(process.env.E2E_N8N_POLL_MS || 3_000);
const ackTimeoutMs = 60_000;

let nextId = 40;
const executions = new Map();
export const frames = [];
export const sockets = { upgrades: 0, plainGets: 0 };

export function isResponseNodes(chatInput) {
	return typeof chatInput === "string" && chatInput.startsWith("nodes:");
}

// startExecution answers the POST.
export function startExecution(res, sessionId, chatInput) {
	const id = String(++nextId);
	const text = chatInput.slice("nodes:".length).trim();
	executions.set(id, {
		id,
		sessionId,
		status: "waiting",
		step: 0,
		steps: [
			{ wait: false, text: () => `first: ${text}` },
			{ wait: true, text: () => "What else do you want to say?" },
			{ wait: false, text: (e) => `you said: ${e.replies.at(-1) ?? ""}` },
		],
		replies: [],
		files: [],
		delivered: null,
		sock: null,
	});
	res.writeHead(200, { "Content-Type": "application/json; charset=utf-8" });
	res.end(JSON.stringify({ executionStarted: true, executionId: id }));
}

function record(exec, fromN8n, data) {
	frames.push({ at: Date.now(), exec, dir: fromN8n ? "n8n->client" : "client->n8n", data });
	const shown = data.length > 300 ? `${data.slice(0, 300)}… (${data.length} bytes)` : data;
	console.log(`stand-in-n8n: socket exec ${exec} ${fromN8n ? "<<" : ">>"} ${shown}`);
}

// answerFile is what n8n's runNode takes from a file of an answer frame:
// its name and type, and the bytes of its data URL (decoded here from
// what follows the comma; the data URL itself is kept as it came).
function answerFile(f) {
	const data = typeof f?.data === "string" ? f.data : "";
	const bytes = Buffer.from(data.slice(data.indexOf(",") + 1), "base64");
	return { name: f?.name, type: f?.type, dataURLPrefix: data.slice(0, data.indexOf(",") + 1), size: bytes.length, sha256: createHash("sha256").update(bytes).digest("hex") };
}

export function framesJSON() {
	return JSON.stringify({ sockets, frames, executions: [...executions.values()].map((e) => ({ id: e.id, status: e.status, replies: e.replies, files: e.files })) });
}

// plainGet answers GET /chat without an upgrade as n8n does.
export function plainGet(res) {
	sockets.plainGets++;
	res.writeHead(500, { "Content-Type": "text/html; charset=utf-8" });
	res.end("<!DOCTYPE html><html><body><pre>Internal Server Error</pre></body></html>");
}

export function attach(server) {
	const wss = new WebSocketServer({ noServer: true, perMessageDeflate: false });
	server.on("upgrade", (req, socket, head) => {
		const url = new URL(req.url, "http://stand-in");
		if (!url.pathname.startsWith("/chat")) {
			socket.destroy();
			return;
		}
		sockets.upgrades++;
		wss.handleUpgrade(req, socket, head, (ws) => session(ws, url));
	});
	return wss;
}

function session(ws, url) {
	const id = url.searchParams.get("executionId");
	const send = (data) => {
		record(id, true, data);
		ws.send(data);
	};
	if (!url.searchParams.get("sessionId") || !id) {
		ws.close(1008);
		return;
	}
	const e = executions.get(id);
	if (!e || e.status !== "waiting") {
		send(`Execution with id "${id}" does not exist`);
		ws.close(1008);
		return;
	}
	if (e.sock) e.sock.terminate(); // the same key replaces the old socket
	e.sock = ws;
	let lastAck = Date.now();
	const stop = () => {
		clearInterval(hb);
		clearInterval(poll);
	};
	ws.on("message", (data, isBinary) => {
		const s = data.toString();
		record(id, false, s);
		if (isBinary) return;
		if (s === "n8n|heartbeat-ack") {
			lastAck = Date.now();
			return;
		}
		let m;
		try {
			m = JSON.parse(s);
		} catch {
			return; // only logged by n8n
		}
		if (typeof m?.sessionId !== "string" || m.action !== "sendMessage" || typeof m.chatInput !== "string") return;
		const st = e.steps[e.step];
		if (st?.wait && e.delivered === ws) {
			e.replies.push(m.chatInput);
			e.files.push(...(Array.isArray(m.files) ? m.files : []).map(answerFile));
			e.step++;
			e.delivered = null;
		}
	});
	ws.on("close", (code) => {
		stop();
		record(id, false, `close ${code}`);
	});
	const hb = setInterval(() => {
		if (Date.now() - lastAck > ackTimeoutMs) {
			e.status = "canceled";
			record(id, true, "terminate (1006)");
			stop();
			ws.terminate();
			return;
		}
		send("n8n|heartbeat");
	}, heartbeatMs);
	const poll = setInterval(() => {
		if (e.sock !== ws) return stop();
		if (e.step >= e.steps.length) {
			e.status = "success";
			record(id, true, "close (no status: 1005)");
			stop();
			ws.close(); // a close frame without a status code
			return;
		}
		const st = e.steps[e.step];
		if (e.delivered === ws) return;
		send(st.text(e));
		e.delivered = ws;
		if (!st.wait) {
			send("n8n|continue");
			e.step++;
			e.delivered = null;
		}
	}, pollMs);
	send("n8n|heartbeat");
}
