// The stand-in n8n's reply to a message, in the pieces it streams it in.
// Shared by stand-in-n8n.mjs and the tests, so they agree on the text.
export function replyParts(input) {
	return ["Echo: ", `${input}. `, "This ", "reply ", "was streamed ", "in 6 parts."];
}

export function replyText(input) {
	return replyParts(input).join("");
}
