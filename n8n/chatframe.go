package n8n

import (
	"bytes"
	"encoding/json"
	"net/url"
	"regexp"
	"strings"
)

// ChatFrameKind is what a frame of n8n's chat WebSocket is.
type ChatFrameKind int

// The kinds of frame n8n sends on its chat socket. n8n 2.8.4 sends the
// plain-text variants, newer n8n JSON ({"type":…}).
const (
	// FrameMessage is a bot message (a Chat node's text, or any frame
	// that is nothing else, as the widget shows it).
	FrameMessage ChatFrameKind = iota
	// FrameButtons is a Send and Wait approval: text and buttons whose
	// links resume the execution (GET /webhook-waiting/…).
	FrameButtons
	// FrameHeartbeat is "n8n|heartbeat": answer "n8n|heartbeat-ack".
	FrameHeartbeat
	// FrameHeartbeatJSON is {"type":"heartbeat"}: answer
	// {"type":"heartbeat-ack"}.
	FrameHeartbeatJSON
	// FrameContinue is "n8n|continue" or {"type":"continue"}: the
	// workflow goes on without waiting for the visitor.
	FrameContinue
	// FrameError is {"type":"error","message":…} (newer n8n refusing the
	// socket), or n8n's `Execution with id "N" does not exist`.
	FrameError
)

// ChatButton is one button of an approval message, as n8n sends it.
type ChatButton struct {
	Text string `json:"text"`
	Link string `json:"link"`
	Type string `json:"type,omitempty"` // primary or secondary
}

// ChatFrame is a parsed frame of n8n's chat socket.
type ChatFrame struct {
	Kind ChatFrameKind
	// Text is a message's text, or an error's message.
	Text string
	// Buttons and BlockUserInput come with FrameButtons; buttons whose
	// link is not an absolute http(s) URL are left out.
	Buttons        []ChatButton
	BlockUserInput bool
}

// Frames of n8n's chat socket, and the answers to its heartbeats.
const (
	FrameHeartbeatText   = "n8n|heartbeat"
	FrameHeartbeatAck    = "n8n|heartbeat-ack"
	FrameContinueText    = "n8n|continue"
	FrameHeartbeatAckRaw = `{"type":"heartbeat-ack"}`
)

// execGone is n8n's text for a socket opened for an execution it does not
// have (it then closes with 1008).
var execGone = regexp.MustCompile(`^Execution with id "[^"]*" does not exist$`)

// ParseChatFrame reads a text frame of n8n's chat socket. It never fails:
// what is not a known control frame is a message, as the @n8n/chat widget
// treats it.
func ParseChatFrame(data []byte) ChatFrame {
	switch string(data) {
	case FrameHeartbeatText:
		return ChatFrame{Kind: FrameHeartbeat}
	case FrameContinueText:
		return ChatFrame{Kind: FrameContinue}
	}
	if execGone.Match(data) {
		return ChatFrame{Kind: FrameError, Text: string(data)}
	}
	t := bytes.TrimSpace(data)
	if len(t) > 0 && t[0] == '{' {
		var m struct {
			Type           *string         `json:"type"`
			Text           *string         `json:"text"`
			Message        *string         `json:"message"`
			BlockUserInput bool            `json:"blockUserInput"`
			Buttons        json.RawMessage `json:"buttons"`
		}
		if json.Unmarshal(t, &m) == nil && m.Type != nil {
			switch *m.Type {
			case "heartbeat":
				return ChatFrame{Kind: FrameHeartbeatJSON}
			case "continue":
				return ChatFrame{Kind: FrameContinue}
			case "error":
				msg := "the chat workflow reported an error"
				if m.Message != nil && *m.Message != "" {
					msg = *m.Message
				}
				return ChatFrame{Kind: FrameError, Text: msg}
			case "message":
				if m.Text != nil {
					return ChatFrame{Kind: FrameMessage, Text: *m.Text}
				}
			case "with-buttons":
				if m.Text != nil {
					return ChatFrame{Kind: FrameButtons, Text: *m.Text, Buttons: parseButtons(m.Buttons), BlockUserInput: m.BlockUserInput}
				}
			}
		}
	}
	return ChatFrame{Kind: FrameMessage, Text: string(data)}
}

// maxButtons bounds the buttons relayed from one message.
const maxButtons = 16

// parseButtons keeps the buttons that have text and an absolute http(s)
// link; anything else in the list is dropped.
func parseButtons(raw json.RawMessage) []ChatButton {
	var list []json.RawMessage
	if json.Unmarshal(raw, &list) != nil {
		return nil
	}
	var out []ChatButton
	for _, item := range list {
		var b ChatButton
		if json.Unmarshal(item, &b) != nil || b.Text == "" || !httpLink(b.Link) {
			continue
		}
		if b.Type != "primary" && b.Type != "secondary" {
			b.Type = ""
		}
		out = append(out, b)
		if len(out) == maxButtons {
			break
		}
	}
	return out
}

func httpLink(s string) bool {
	u, err := url.Parse(s)
	if err != nil || u.Host == "" || u.User != nil {
		return false
	}
	return strings.EqualFold(u.Scheme, "https") || strings.EqualFold(u.Scheme, "http")
}
