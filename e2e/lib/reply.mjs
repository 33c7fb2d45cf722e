// The stand-in n8n's reply to a message, in the pieces it streams it in.
// Shared by stand-in-n8n.mjs and the tests, so they agree on the text. A
// verified visitor (the request's user, verified true) is greeted by name
// first, as a workflow reading {{ $json.user.name }} would.
export function replyParts(input, user) {
	const parts = ["Echo: ", `${input}. `, "This ", "reply ", "was streamed ", "in 6 parts."];
	return user?.verified === true ? [greeting(user.name), ...parts] : parts;
}

export function replyText(input, user) {
	return replyParts(input, user).join("");
}

export function greeting(name) {
	return `Hello, ${name}! `;
}
