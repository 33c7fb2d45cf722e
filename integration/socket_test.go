package integration

import (
	"context"
	"encoding/json"
	"fmt"
	"net/http"
	"strings"
	"testing"
	"time"

	"github.com/caddyserver/caddy/v2/caddytest"
	"github.com/coder/websocket"

	"github.com/chatproxy/caddy-chatproxy/internal/testkit"
)

// The socket runs through a real Caddy server, with the wrappers a site
// puts around handlers (access log, encode): the upgrade must hijack the
// connection through them.
const socketCaddyfile = `
{
	admin localhost:2999
	skip_install_trust
	http_port 9080
	https_port 9443
	grace_period 1ns
}

http://localhost:9080 {
	log {
		output discard
	}
	encode gzip zstd
	chat_proxy {
		n8n_webhook %s
		upstream_auth none
		jwt_secret integration-visitor-jwt-secret-0123456789
		session_secret integration-n8n-session-secret-0123456789
		database sqlite:%s/chat.db
		allowed_origins http://localhost:9080
	}
}
`

// TestChatSocketThroughCaddy: the @n8n/chat flow of n8n's "Using Response
// Nodes" mode (Send Message → Send and Wait → answer → Send Message)
// through Caddy, and a refused upgrade that never reaches n8n.
func TestChatSocketThroughCaddy(t *testing.T) {
	n8n := testkit.NewN8nChat(t, testkit.N8nChatOptions{
		Workflow: []testkit.ChatStep{
			{Text: "first: widget hello"},
			{Wait: true, Text: "What else do you want to say?"},
			{Text: "you said: {reply}"},
		},
		HeartbeatInterval: 200 * time.Millisecond,
		PollInterval:      100 * time.Millisecond,
	})
	tester := caddytest.NewTester(t)
	tester.InitServer(fmt.Sprintf(socketCaddyfile, n8n.WebhookURL(), t.TempDir()), "caddyfile")
	if t.Failed() {
		t.FailNow()
	}
	c := client{t: t, http: &http.Client{}}
	const sid = "0b0c1a2e-widget-session"
	origin := map[string]string{"Origin": "http://localhost:9080", "Accept-Encoding": "gzip"}
	status, hdr, body := c.do("POST", "http://localhost:9080/api/v1/n8n/chat",
		`{"action":"sendMessage","sessionId":"`+sid+`","chatInput":"widget hello","metadata":{}}`, origin)
	var st struct {
		ExecutionStarted bool   `json:"executionStarted"`
		ExecutionID      string `json:"executionId"`
		ResumeToken      string `json:"resumeToken"`
	}
	if status != 200 || !strings.HasPrefix(hdr.Get("Content-Type"), "application/json") || json.Unmarshal([]byte(body), &st) != nil || !st.ExecutionStarted {
		t.Fatalf("sendMessage: %d %v %s", status, hdr, body)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	defer cancel()
	base := "ws://localhost:9080/chat?sessionId=" + sid + "&executionId=" + st.ExecutionID + "&isPublic=true"
	hh := http.Header{"Origin": {"http://localhost:9080"}}

	if _, resp, err := websocket.Dial(ctx, base, &websocket.DialOptions{HTTPHeader: hh}); err == nil || resp == nil || resp.StatusCode != 403 {
		t.Fatalf("upgrade without a token: %v %v", resp, err)
	}
	if n := n8n.Sockets(); n != 0 {
		t.Fatalf("n8n saw %d socket requests from a refused upgrade", n)
	}

	ws, _, err := websocket.Dial(ctx, base+"&token="+st.ResumeToken, &websocket.DialOptions{HTTPHeader: hh})
	if err != nil {
		t.Fatal(err)
	}
	defer ws.CloseNow()
	var got []string
	for {
		_, data, err := ws.Read(ctx)
		if err != nil {
			if code := websocket.CloseStatus(err); code != websocket.StatusNormalClosure {
				t.Fatalf("close %d (%v) after %q", code, err, got)
			}
			break
		}
		switch s := string(data); s {
		case "n8n|heartbeat":
			_ = ws.Write(ctx, websocket.MessageText, []byte("n8n|heartbeat-ack"))
		case "What else do you want to say?":
			got = append(got, s)
			_ = ws.Write(ctx, websocket.MessageText, []byte(`{"sessionId":"`+sid+`","action":"sendMessage","chatInput":"typed reply","files":[]}`))
		default:
			got = append(got, s)
		}
	}
	want := "first: widget hello|n8n|continue|What else do you want to say?|you said: typed reply|n8n|continue"
	if strings.Join(got, "|") != want {
		t.Fatalf("frames %q, want %s", got, want)
	}
}
