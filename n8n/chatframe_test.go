package n8n

import (
	"net/url"
	"reflect"
	"strings"
	"testing"
)

func TestParseChatFrame(t *testing.T) {
	approve := "http://proxy.test/webhook-waiting/44/node-1?approved=true&signature=abc"
	tests := []struct {
		name  string
		frame string
		want  ChatFrame
	}{
		{"heartbeat", "n8n|heartbeat", ChatFrame{Kind: FrameHeartbeat}},
		{"json heartbeat", `{"type":"heartbeat"}`, ChatFrame{Kind: FrameHeartbeatJSON}},
		{"continue", "n8n|continue", ChatFrame{Kind: FrameContinue}},
		{"json continue", `{"type":"continue"}`, ChatFrame{Kind: FrameContinue}},
		{"plain message", "first: hello nodes", ChatFrame{Kind: FrameMessage, Text: "first: hello nodes"}},
		{"json message", `{"type":"message","text":"hi"}`, ChatFrame{Kind: FrameMessage, Text: "hi"}},
		{"json without type is text", `{"text":"x"}`, ChatFrame{Kind: FrameMessage, Text: `{"text":"x"}`}},
		{"heartbeat with spaces is text", " n8n|heartbeat", ChatFrame{Kind: FrameMessage, Text: " n8n|heartbeat"}},
		{"unknown execution", `Execution with id "999999" does not exist`, ChatFrame{Kind: FrameError, Text: `Execution with id "999999" does not exist`}},
		{"json error", `{"type":"error","message":"Connection rejected"}`, ChatFrame{Kind: FrameError, Text: "Connection rejected"}},
		{"json error without message", `{"type":"error"}`, ChatFrame{Kind: FrameError, Text: "the chat workflow reported an error"}},
		{"buttons", `{"type":"with-buttons","text":"Approve?","blockUserInput":true,"buttons":[` +
			`{"text":"Approve","link":"` + approve + `","type":"primary"},` +
			`{"text":"Evil","link":"javascript:alert(1)","type":"primary"},` +
			`{"text":"","link":"https://x.test/","type":"primary"},` +
			`{"text":"Decline","link":"https://proxy.test/webhook-waiting/44/node-1?approved=false","type":"danger"}]}`,
			ChatFrame{Kind: FrameButtons, Text: "Approve?", BlockUserInput: true, Buttons: []ChatButton{
				{Text: "Approve", Link: approve, Type: "primary"},
				{Text: "Decline", Link: "https://proxy.test/webhook-waiting/44/node-1?approved=false"},
			}}},
		{"buttons not a list", `{"type":"with-buttons","text":"t","buttons":{}}`, ChatFrame{Kind: FrameButtons, Text: "t"}},
		{"buttons without text is text", `{"type":"with-buttons","buttons":[]}`, ChatFrame{Kind: FrameMessage, Text: `{"type":"with-buttons","buttons":[]}`}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			if got := ParseChatFrame([]byte(tt.frame)); !reflect.DeepEqual(got, tt.want) {
				t.Errorf("ParseChatFrame(%q) = %+v, want %+v", tt.frame, got, tt.want)
			}
		})
	}
}

// FuzzParseChatFrame: any frame is classified without panicking; a control
// frame carries nothing, a message keeps the frame's text or a JSON text,
// and every button relayed has text and an absolute http(s) link.
func FuzzParseChatFrame(f *testing.F) {
	for _, s := range []string{"n8n|heartbeat", "n8n|continue", `{"type":"heartbeat"}`, "hello",
		`{"type":"with-buttons","text":"t","blockUserInput":false,"buttons":[{"text":"A","link":"https://h/webhook-waiting/1/n?approved=true","type":"primary"}]}`,
		`{"type":"error","message":"m"}`, `Execution with id "1" does not exist`, `{"type":"message","text":"x"}`} {
		f.Add([]byte(s))
	}
	f.Fuzz(func(t *testing.T, data []byte) {
		fr := ParseChatFrame(data)
		switch fr.Kind {
		case FrameHeartbeat, FrameHeartbeatJSON, FrameContinue:
			if fr.Text != "" || fr.Buttons != nil {
				t.Fatalf("control frame %q carries %+v", data, fr)
			}
		case FrameMessage:
			if fr.Text != string(data) && !strings.Contains(string(data), `"text"`) {
				t.Fatalf("message %q became %q", data, fr.Text)
			}
		case FrameButtons, FrameError:
		default:
			t.Fatalf("unknown kind %d", fr.Kind)
		}
		if len(fr.Buttons) > maxButtons {
			t.Fatalf("%d buttons", len(fr.Buttons))
		}
		for _, b := range fr.Buttons {
			u, err := url.Parse(b.Link)
			if b.Text == "" || err != nil || u.Host == "" || (!strings.EqualFold(u.Scheme, "http") && !strings.EqualFold(u.Scheme, "https")) {
				t.Fatalf("button %+v relayed", b)
			}
		}
	})
}
