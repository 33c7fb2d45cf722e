package integration

import (
	"bufio"
	"context"
	"encoding/json"
	"fmt"
	"net/http"
	"strings"
	"testing"
	"time"

	"github.com/caddyserver/caddy/v2/caddytest"

	"github.com/chatproxy/caddy-chatproxy/internal/testkit"
)

// socketAPICaddyfile: the chat API in front of a "Using Response Nodes"
// workflow, under encode; wait_timeout is what the reload changes.
const socketAPICaddyfile = `
{
	admin localhost:2999
	skip_install_trust
	http_port 9080
	https_port 9443
	grace_period 10s
}

http://localhost:9080 {
	encode gzip zstd
	chat_proxy {
		n8n_webhook %s
		upstream_auth none
		jwt_secret integration-visitor-jwt-secret-0123456789
		session_secret integration-n8n-session-secret-0123456789
		database sqlite:%s/chat.db
		wait_timeout %s
	}
}
`

// sseSummary reads a chat stream up to [DONE] (or until stop says so)
// and sums it up: begin, item:<text>, buttons, end, waiting, error:<code>.
func sseSummary(t *testing.T, br *bufio.Reader, stop func(typ string) bool) ([]string, []map[string]any) {
	t.Helper()
	var out []string
	var raw []map[string]any
	for {
		ev := testkit.NextSSE(t, br)
		if len(ev.Data) != 1 {
			t.Fatalf("event %+v", ev)
		}
		if ev.Data[0] == "[DONE]" {
			return append(out, "[DONE]"), raw
		}
		var m map[string]any
		if err := json.Unmarshal([]byte(ev.Data[0]), &m); err != nil {
			t.Fatal(err)
		}
		raw = append(raw, m)
		typ, _ := m["type"].(string)
		switch typ {
		case "item":
			out = append(out, "item:"+m["content"].(string))
		case "error":
			out = append(out, "error:"+m["error"].(string))
		default:
			out = append(out, typ)
		}
		if stop != nil && stop(typ) {
			return out, raw
		}
	}
}

// TestChatAPIResponseNodesThroughCaddy: n8n's "Using Response Nodes" mode
// on the chat API in a real Caddy, under encode: an approval's buttons in
// the stream, its link served through Caddy to n8n, the wait that
// follows ending the stream; a reload closes the socket holding the
// waiting execution with a closing frame (the old config's Cleanup), and
// the visitor's answer, on the new config, resumes the same execution.
func TestChatAPIResponseNodesThroughCaddy(t *testing.T) {
	n8n := testkit.NewN8nChat(t, testkit.N8nChatOptions{
		Workflow: []testkit.ChatStep{
			{Approval: true, Text: "Refund 20 EUR?"},
			{Wait: true, Text: "Why? ({reply})"},
			{Text: "noted: {reply}"},
		},
		HeartbeatInterval: 200 * time.Millisecond,
		PollInterval:      100 * time.Millisecond,
		WebhookBase:       "http://localhost:9080/",
	})
	dir := t.TempDir()
	tester := caddytest.NewTester(t)
	tester.InitServer(fmt.Sprintf(socketAPICaddyfile, n8n.WebhookURL(), dir, "10m"), "caddyfile")
	if t.Failed() {
		t.FailNow()
	}
	c := client{t: t, http: &http.Client{}}
	status, _, body := c.do("POST", "http://localhost:9080/api/v1/session/create", `{}`, nil)
	var sess struct {
		Token string `json:"token"`
	}
	if status != http.StatusCreated || json.Unmarshal([]byte(body), &sess) != nil {
		t.Fatalf("create: %d %s", status, body)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	message := func(text string) *bufio.Reader {
		t.Helper()
		b, _ := json.Marshal(map[string]string{"message": text})
		req, _ := http.NewRequestWithContext(ctx, "POST", "http://localhost:9080/api/v1/chat/message", strings.NewReader(string(b)))
		req.Header.Set("Content-Type", "application/json")
		req.Header.Set("Authorization", "Bearer "+sess.Token)
		req.Header.Set("Accept-Encoding", "gzip") // the stream must still come uncompressed
		resp, err := c.http.Do(req)
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { _ = resp.Body.Close() })
		if resp.StatusCode != http.StatusOK || resp.Header.Get("Content-Encoding") != "" {
			t.Fatalf("message: %d, Content-Encoding %q", resp.StatusCode, resp.Header.Get("Content-Encoding"))
		}
		return bufio.NewReader(resp.Body)
	}

	br := message("refund please")
	got, raw := sseSummary(t, br, func(typ string) bool { return typ == "end" })
	if strings.Join(got, " ") != "begin item:Refund 20 EUR? buttons end" {
		t.Fatalf("stream: %q", got)
	}
	link := raw[2]["buttons"].([]any)[0].(map[string]any)["link"].(string)
	if !strings.HasPrefix(link, "http://localhost:9080/webhook-waiting/") {
		t.Fatalf("approve link %q", link)
	}
	if status, _, body := c.do("GET", link, "", nil); status != http.StatusOK || !strings.Contains(body, "recorded") {
		t.Fatalf("approve link through Caddy: %d %s", status, body)
	}
	got, _ = sseSummary(t, br, nil)
	if strings.Join(got, " ") != "begin item:Why? (approved=true) end waiting [DONE]" {
		t.Fatalf("stream after the click: %q", got)
	}

	// A reload: the old config's socket holding the wait closes (1001).
	tester.InitServer(fmt.Sprintf(socketAPICaddyfile, n8n.WebhookURL(), dir, "9m"), "caddyfile")
	deadline := time.Now().Add(10 * time.Second)
	for {
		var closes []string
		for _, f := range n8n.Frames() {
			if !f.FromN8n && strings.HasPrefix(f.Data, "close ") {
				closes = append(closes, f.Data)
			}
		}
		if len(closes) > 0 {
			if closes[0] != "close 1001" {
				t.Fatalf("the holding socket ended with %q, want close 1001", closes)
			}
			break
		}
		if time.Now().After(deadline) {
			t.Fatal("the reload left the holding socket open")
		}
		time.Sleep(20 * time.Millisecond)
	}

	got, _ = sseSummary(t, message("it arrived broken"), nil)
	if strings.Join(got, " ") != "begin item:noted: it arrived broken end [DONE]" {
		t.Fatalf("answer after the reload: %q", got)
	}
	if n8n.Posts() != 1 {
		t.Fatalf("%d executions, want the first one resumed", n8n.Posts())
	}
}
