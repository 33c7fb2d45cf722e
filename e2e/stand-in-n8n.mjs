// A stand-in for an n8n Webhook node in "Streaming" response mode, for the
// browser end-to-end tests. It answers POST /webhook/chat the way n8n does:
// status 200, Content-Type application/json, one JSON object per line
// (begin, items, end), each line flushed on its own and spaced out in time
// so the browser can be seen receiving a reply piece by piece.
//
// It records every request it gets (action, sessionId, chatInput, and the
// verified visitor: the body's user and the signed token's user claim), so
// the tests can assert what reached "n8n" and what did not: GET /__requests
// lists them, GET /__counts counts them by action. A verified visitor is
// greeted by name, from the body's user.name.
//
// A multipart/form-data request (a message with files) is read as n8n's
// Chat Trigger reads it: the fields, then one "files" part per file. It is
// checked and the result recorded with the request (multipart.problems is
// empty when it is what the Chat Trigger expects): the part names and
// their order, metadata and session as JSON text, each file's name, type,
// size and SHA-256, and whether its bytes agree with its type.
//
//   E2E_N8N_PORT=8081 node stand-in-n8n.mjs
import { createHash, createHmac, timingSafeEqual } from "node:crypto";
import http from "node:http";

import { replyParts } from "./lib/reply.mjs";
import * as responseNodes from "./lib/response-nodes.mjs";

const port = Number(process.env.E2E_N8N_PORT);
const chunkDelayMs = Number(process.env.E2E_N8N_CHUNK_DELAY_MS || 150);
// A message starting with "slow" is answered more slowly, so that a test
// can reload the page (or press Stop) while the reply is still coming.
const slowDelayMs = Number(process.env.E2E_N8N_SLOW_DELAY_MS || 800);
if (!port) {
	console.error("stand-in-n8n: set E2E_N8N_PORT");
	process.exit(2);
}

const requests = [];

// tokenClaims returns the claims of the request's bearer token when it is
// an HS256 JWT signed with the session secret (what n8n's JWT Auth checks),
// else null.
function tokenClaims(authorization) {
	const secret = process.env.E2E_SESSION_SECRET;
	const token = (authorization ?? "").replace(/^Bearer /, "");
	const [head, payload, sig] = token.split(".");
	if (!secret || !head || !payload || !sig) return null;
	const want = createHmac("sha256", secret).update(`${head}.${payload}`).digest();
	const got = Buffer.from(sig, "base64url");
	if (got.length !== want.length || !timingSafeEqual(got, want)) return null;
	if (JSON.parse(Buffer.from(head, "base64url").toString()).alg !== "HS256") return null;
	return JSON.parse(Buffer.from(payload, "base64url").toString());
}

// bodyUser is the body's user (JSON text in a multipart body), or null.
function bodyUser(body) {
	let u = body.user ?? null;
	if (typeof u === "string") {
		try {
			u = JSON.parse(u);
		} catch {
			u = null;
		}
	}
	return u;
}

function chunk(type, content) {
	const metadata = { nodeId: "agent", nodeName: "AI Agent", itemIndex: 0, runIndex: 0, timestamp: Date.now() };
	return JSON.stringify(content === undefined ? { type, metadata } : { type, content, metadata }) + "\n";
}

const sleep = (ms) => new Promise((resolve) => setTimeout(resolve, ms));

async function readBody(req) {
	const parts = [];
	for await (const p of req) parts.push(p);
	return Buffer.concat(parts);
}

// The first bytes of each file type the tests send.
const signatures = {
	"image/png": Buffer.from([0x89, 0x50, 0x4e, 0x47, 0x0d, 0x0a, 0x1a, 0x0a]),
	"application/pdf": Buffer.from("%PDF-"),
};
const fieldOrder = ["action", "sessionId", "chatInput", "message", "metadata", "session", "jwt_token", "timestamp"];

// readMultipart parses a multipart body (with the runtime's own parser)
// and checks it has the Chat Trigger's shape.
async function readMultipart(req, raw) {
	const form = await new Response(raw, { headers: { "content-type": req.headers["content-type"] } }).formData();
	const body = {};
	const partNames = [];
	const files = [];
	const problems = [];
	for (const [name, value] of form.entries()) {
		partNames.push(name);
		if (typeof value === "string") {
			body[name] = value;
			continue;
		}
		const bytes = Buffer.from(await value.arrayBuffer());
		const sig = signatures[value.type];
		files.push({ field: name, name: value.name, type: value.type, size: bytes.length, sha256: createHash("sha256").update(bytes).digest("hex") });
		if (!sig || !bytes.subarray(0, sig.length).equals(sig)) problems.push(`${value.name}: bytes do not agree with ${value.type}`);
	}
	const fields = partNames.filter((n) => n !== "files");
	if (JSON.stringify(fields) !== JSON.stringify(fieldOrder)) problems.push(`fields ${fields.join(",")}, want ${fieldOrder.join(",")}`);
	if (partNames.slice(fields.length).some((n) => n !== "files") || files.length === 0) problems.push(`files must come last, in parts named "files": ${partNames.join(",")}`);
	for (const k of ["metadata", "session"]) {
		try {
			if (typeof JSON.parse(body[k]) !== "object") problems.push(`${k} is not a JSON object`);
		} catch {
			problems.push(`${k} is not JSON text`);
		}
	}
	if (!req.headers["content-length"]) problems.push("no Content-Length");
	return { body, multipart: { contentType: req.headers["content-type"], contentLength: Number(req.headers["content-length"]), partNames, files, problems } };
}

const server = http.createServer(async (req, res) => {
	const url = new URL(req.url, "http://stand-in");
	if (req.method === "GET" && url.pathname === "/__requests") {
		res.writeHead(200, { "Content-Type": "application/json" });
		res.end(JSON.stringify(requests));
		return;
	}
	if (req.method === "GET" && url.pathname === "/__counts") {
		const counts = {};
		for (const r of requests) counts[r.action] = (counts[r.action] ?? 0) + 1;
		res.writeHead(200, { "Content-Type": "application/json" });
		res.end(JSON.stringify(counts));
		return;
	}
	if (req.method === "GET" && url.pathname === "/__frames") {
		res.writeHead(200, { "Content-Type": "application/json" });
		res.end(responseNodes.framesJSON());
		return;
	}
	if (url.pathname.startsWith("/chat")) {
		responseNodes.plainGet(res); // upgrades are taken by the server's upgrade event
		return;
	}
	if (req.method === "GET" && url.pathname === "/__ready") {
		res.writeHead(200, { "Content-Type": "text/plain" });
		res.end("ok");
		return;
	}
	if (url.pathname !== "/webhook/chat") {
		res.writeHead(404, { "Content-Type": "application/json" });
		res.end('{"code":404,"message":"The requested webhook is not registered."}');
		return;
	}
	const raw = await readBody(req);
	let body = {};
	let multipart = null;
	if ((req.headers["content-type"] ?? "").startsWith("multipart/form-data")) {
		try {
			({ body, multipart } = await readMultipart(req, raw));
		} catch (err) {
			multipart = { problems: [`unreadable multipart: ${err}`] };
		}
	} else {
		try {
			body = JSON.parse(raw.toString("utf8"));
		} catch {
			// recorded with an empty action below
		}
	}
	const entry = {
		at: new Date().toISOString(),
		method: req.method,
		action: typeof body.action === "string" ? body.action : "",
		sessionId: body.sessionId ?? null,
		chatInput: body.chatInput ?? null,
		authorization: req.headers.authorization ? req.headers.authorization.split(" ")[0] : null,
		jwtMatches: Boolean(body.jwt_token) && req.headers.authorization === `Bearer ${body.jwt_token}`,
		user: bodyUser(body),
		tokenUser: tokenClaims(req.headers.authorization)?.user ?? null,
		metadata: typeof body.metadata === "string" ? body.metadata : JSON.stringify(body.metadata ?? null),
		multipart,
	};
	requests.push(entry);
	console.log(`stand-in-n8n: ${req.method} ${url.pathname} action=${entry.action} chatInput=${JSON.stringify(entry.chatInput)}`);

	if (req.method !== "POST" || entry.action !== "sendMessage") {
		// n8n would run the workflow for anything; the tests assert that
		// nothing but sendMessage ever gets here.
		res.writeHead(200, { "Content-Type": "application/json; charset=utf-8" });
		res.end(JSON.stringify({ output: `unexpected action ${JSON.stringify(entry.action)}` }));
		return;
	}
	if (responseNodes.isResponseNodes(entry.chatInput)) {
		responseNodes.startExecution(res, entry.sessionId, entry.chatInput);
		return;
	}
	res.writeHead(200, {
		"Content-Type": "application/json; charset=utf-8",
		"Cache-Control": "no-cache, no-transform",
	});
	res.flushHeaders();
	res.write(chunk("begin"));
	const delay = String(entry.chatInput ?? "").startsWith("slow") ? slowDelayMs : chunkDelayMs;
	entry.finished = false;
	for (const part of replyParts(String(entry.chatInput ?? ""), entry.user)) {
		await sleep(delay);
		if (res.destroyed) {
			entry.cancelled = true;
			return;
		}
		res.write(chunk("item", part));
	}
	await sleep(delay);
	res.end(chunk("end"));
	entry.finished = true;
});

responseNodes.attach(server);
server.listen(port, "127.0.0.1", () => {
	console.log(`stand-in-n8n: listening on 127.0.0.1:${port}, ${chunkDelayMs} ms between chunks`);
});
for (const sig of ["SIGINT", "SIGTERM"]) {
	process.on(sig, () => {
		server.closeAllConnections();
		process.exit(0);
	});
}
