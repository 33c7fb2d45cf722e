package chatproxy

import (
	"context"
	"crypto/rand"
	"encoding/hex"
	"net/http"
	"net/url"
	"strings"
	"testing"
	"time"

	"github.com/caddyserver/caddy/v2"

	"github.com/chatproxy/caddy-chatproxy/internal/testenv"
)

// withQuery adds a query parameter to a URL.
func withQuery(t *testing.T, raw, key, value string) string {
	t.Helper()
	u, err := url.Parse(raw)
	if err != nil {
		t.Fatal(err)
	}
	q := u.Query()
	q.Set(key, value)
	u.RawQuery = strings.ReplaceAll(q.Encode(), "+", "%20")
	return u.String()
}

// Two Caddy instances behind a load balancer, sharing one PostgreSQL and
// one Redis: each has its own context, its own database pool and Redis
// client (the URLs differ only in a connection name, so nothing is shared
// in process, as with two processes), and the same secrets. A
// conversation whose messages alternate between them has one history, in
// order, one message_count, and one session rate budget.
func TestTwoInstancesShareHistoryAndLimits(t *testing.T) {
	pg := testenv.PostgresURL(t)
	rdb := testenv.RedisURL(t)
	// A jwt_secret of its own keys this test's rate-limit budgets apart
	// from every other run sharing the Redis.
	b := make([]byte, 24)
	_, _ = rand.Read(b)
	jwtSecret := "instances-test-" + hex.EncodeToString(b)

	fake := newN8nFake(t, nil)
	fake.setScript(func(w http.ResponseWriter, r *http.Request, c *n8nCall) {
		fakeStream("reply to "+c.Body.ChatInput)(w, r, c)
	})
	instance := func(name string) *ChatProxy {
		cp := &ChatProxy{
			N8nWebhook:     fake.URL(),
			JWTSecret:      jwtSecret,
			SessionSecret:  testSessionSecret,
			AllowedOrigins: []string{allowedOrigin},
			Database:       withQuery(t, pg, "application_name", "chatproxy-"+name),
			Redis:          withQuery(t, rdb, "client_name", "chatproxy-"+name),
			RateLimits: testRates(map[string][]string{
				"session": {"3/1m"}, "ip": {"100000/1m"}, "domain": {"100000/1m"}, "create": {"100000/1m"},
			}),
			// The budget is counted exactly: no in-process fallback on a
			// slow answer from a loaded machine's Redis.
			redisTimeout: 5 * time.Second,
		}
		ctx, cancel := caddy.NewContext(caddy.Context{Context: context.Background()})
		t.Cleanup(cancel)
		if err := cp.Provision(ctx); err != nil {
			t.Fatal(err)
		}
		if err := cp.Validate(); err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { _ = cp.Cleanup() })
		return cp
	}
	a, b2 := instance("a"), instance("b")
	if storeKeyOf(a) == storeKeyOf(b2) || redisKeyOf(a) == redisKeyOf(b2) {
		t.Fatal("the instances share a pool in process; they would not be two instances")
	}

	c := createSession(t, a) // created on one instance, used on both
	chat := func(cp *ChatProxy, text string) (int, string) {
		rec := serve(t, cp, req{method: "POST", path: "/api/v1/chat/message", body: `{"message":"` + text + `"}`,
			headers: map[string]string{"Authorization": "Bearer " + c.Token, "User-Agent": chatUA}})
		return rec.Code, rec.Body.String()
	}
	order := []*ChatProxy{a, b2, a}
	texts := []string{"first", "second", "third"}
	for i, cp := range order {
		code, body := chat(cp, texts[i])
		if code != 200 || !strings.Contains(body, `"content":"reply to `+texts[i]+`"`) || !strings.HasSuffix(body, "data: [DONE]\n\n") {
			t.Fatalf("message %d: %d %s", i+1, code, body)
		}
	}
	// The fourth message, on the other instance, is over the session's
	// budget of 3 per minute: the budget is one, in Redis.
	code, body := chat(b2, "fourth")
	if code != http.StatusTooManyRequests || !strings.Contains(body, `"tier":"session"`) {
		t.Fatalf("fourth message: %d %s, want 429 from the session tier", code, body)
	}
	// n8n saw one conversation growing: the count it is sent includes the
	// new message (1, 3, 5), whichever instance sent it.
	calls := fake.Calls()
	if len(calls) != 3 {
		t.Fatalf("n8n received %d requests, want 3", len(calls))
	}
	for i, call := range calls {
		if call.Body.Session.MessageCount != 2*i+1 || call.Body.SessionID != c.SessionID {
			t.Errorf("request %d: session %s, message_count %d; want %s, %d", i+1, call.Body.SessionID, call.Body.Session.MessageCount, c.SessionID, 2*i+1)
		}
	}
	for _, cp := range []*ChatProxy{a, b2} {
		h := decode[historyBody](t, serve(t, cp, req{method: "GET", path: "/api/v1/chat/history", headers: bearer(c.Token)}))
		if len(h.Messages) != 6 || h.TotalCount != 6 {
			t.Fatalf("history: %+v", h)
		}
		for i, m := range h.Messages {
			wantRole, wantContent := "user", texts[i/2]
			if i%2 == 1 {
				wantRole, wantContent = "assistant", "reply to "+texts[i/2]
			}
			if m.Role != wantRole || m.Content != wantContent || m.Status != "complete" {
				t.Fatalf("message %d = %+v, want %s %q", i, m, wantRole, wantContent)
			}
		}
		rec := serve(t, cp, req{method: "GET", path: "/api/v1/session/validate", headers: bearer(c.Token)})
		if !strings.Contains(rec.Body.String(), `"message_count":6`) {
			t.Fatalf("validate: %s", rec.Body)
		}
	}
}
