package handler_test

import (
	"strings"
	"testing"

	"github.com/chatproxy/caddy-chatproxy/internal/testkit"
)

// TestChatReplyWithUnstorableTextIsInHistory: a reply carrying NUL and
// invalid UTF-8 (which PostgreSQL refuses, SQLSTATE 22021) is relayed and
// stored cleaned on both stores, so it is in the history.
func TestChatReplyWithUnstorableTextIsInHistory(t *testing.T) {
	t.Parallel()
	for _, kind := range storeKinds {
		t.Run(kind, func(t *testing.T) {
			t.Parallel()
			for _, tc := range []struct {
				name   string
				script testkit.Script
				accept string
				want   string
			}{
				{"text/plain JSON mode", testkit.Reply(200, "text/plain; charset=utf-8", "ok\x00 bad \xff end"), "application/json", "ok bad \uFFFD end"},
				{"stream SSE", testkit.Stream("nul \u0000 here", ", split ✓"), "text/event-stream", "nul  here, split ✓"},
			} {
				t.Run(tc.name, func(t *testing.T) {
					e := newChatEnv(t, chatEnvOpts{kind: kind})
					e.fake.SetScript(tc.script)
					s := e.newSession(t)
					rec := e.serve(t, "POST", "/api/v1/chat/message", `{"message":"hello"}`, authz(s.Token, "Accept", tc.accept))
					if rec.Code != 200 {
						t.Fatalf("%d %s", rec.Code, rec.Body)
					}
					if strings.Contains(rec.Body.String(), "\x00") || strings.Contains(rec.Body.String(), "\xff") {
						t.Fatalf("relayed unclean text: %q", rec.Body)
					}
					wantExchange(t, e.history(t, s.Token), "hello", tc.want, "complete")
				})
			}
		})
	}
}
