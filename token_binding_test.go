package chatproxy

import (
	"context"
	"encoding/json"
	"io"
	"net/http"
	"net/http/httptest"
	"strings"
	"testing"
	"time"

	"github.com/caddyserver/caddy/v2"
	"github.com/caddyserver/caddy/v2/modules/caddyhttp"

	"github.com/chatproxy/caddy-chatproxy/internal/testenv"
	"github.com/chatproxy/caddy-chatproxy/sessions"
)

// Two chat_proxy blocks for two n8n workflows share jwt_secret and a
// database, as two chats on one Caddy often do; block A allows two
// origins, block B a third. A
// visitor token works only in the block that issued it and, when its
// session was created from an Origin, only from that origin.
func TestTokensBoundToBlockAndOrigin(t *testing.T) {
	const (
		secret  = "token-binding-test-jwt-secret-0123456789abcdef"
		originX = "https://shop.example.com"
		originY = "https://blog.example.com"
		originZ = "https://other.example.org"
	)
	pg := testenv.PostgresURL(t)
	block := func(webhook, prefix string, origins ...string) *ChatProxy {
		t.Helper()
		cp := &ChatProxy{
			// Never called: every request here is answered before n8n.
			N8nWebhook:     "http://127.0.0.1:9" + webhook,
			JWTSecret:      secret,
			SessionSecret:  "token-binding-test-n8n-secret-0123456789abcdef",
			AllowedOrigins: origins,
			PathPrefix:     prefix,
			Database:       pg,
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
	a := block("/webhook/chat-a", "/api/v1", originX, originY)
	a2 := block("/webhook/chat-a", "/api/v1", originX, originY) // another instance of A
	b := block("/webhook/chat-b", "/api/v1", originZ)
	c := block("/webhook/chat-a", "/support/api", originX) // A's workflow under another path

	do := func(cp *ChatProxy, method, path, body string, headers map[string]string) *httptest.ResponseRecorder {
		t.Helper()
		var rd io.Reader
		if body != "" {
			rd = strings.NewReader(body)
		}
		r := httptest.NewRequest(method, "http://api.example.net"+path, rd)
		if body != "" {
			r.Header.Set("Content-Type", "application/json")
		}
		for k, v := range headers {
			r.Header.Set(k, v)
		}
		rec := httptest.NewRecorder()
		r = caddyhttp.PrepareRequest(r, caddy.NewReplacer(), rec, nil)
		caddyhttp.SetVar(r.Context(), caddyhttp.ClientIPVarKey, "203.0.113.31")
		next := caddyhttp.HandlerFunc(func(w http.ResponseWriter, _ *http.Request) error {
			w.WriteHeader(299)
			return nil
		})
		if err := cp.ServeHTTP(rec, r, next); err != nil {
			t.Fatalf("ServeHTTP: %v", err)
		}
		return rec
	}
	create := func(cp *ChatProxy, headers map[string]string) (id, token string) {
		t.Helper()
		rec := do(cp, "POST", "/api/v1/session/create", "{}", headers)
		if rec.Code != http.StatusCreated {
			t.Fatalf("create: %d %s", rec.Code, rec.Body)
		}
		var body struct {
			SessionID string `json:"session_id"`
			Token     string `json:"token"`
		}
		if err := json.Unmarshal(rec.Body.Bytes(), &body); err != nil {
			t.Fatal(err)
		}
		return body.SessionID, body.Token
	}
	bearer := func(token string, kv ...string) map[string]string {
		m := map[string]string{"Authorization": "Bearer " + token}
		for i := 0; i+1 < len(kv); i += 2 {
			m[kv[i]] = kv[i+1]
		}
		return m
	}
	cookie := func(token, origin string) map[string]string {
		return map[string]string{"Cookie": "chat_session=" + token, "Origin": origin}
	}
	want := func(name string, rec *httptest.ResponseRecorder, status int, code string) {
		t.Helper()
		var body struct {
			Error string `json:"error"`
		}
		_ = json.Unmarshal(rec.Body.Bytes(), &body)
		if rec.Code != status || body.Error != code {
			t.Errorf("%s: %d %s, want %d %q", name, rec.Code, strings.TrimSpace(rec.Body.String()), status, code)
		}
	}

	sessionID, fromX := create(a, map[string]string{"Origin": originX})
	_, unbound := create(a, nil)

	// Where the token belongs: its block (any instance), its origin, or
	// no Origin at all (a server-side client holding the token).
	want("A, bearer from X", do(a, "GET", "/api/v1/session/validate", "", bearer(fromX, "Origin", originX)), 200, "")
	want("A, cookie from X", do(a, "GET", "/api/v1/chat/history", "", cookie(fromX, originX)), 200, "")
	want("A's other instance, bearer from X", do(a2, "GET", "/api/v1/chat/history", "", bearer(fromX, "Origin", originX)), 200, "")
	want("A, bearer without Origin", do(a, "GET", "/api/v1/session/validate", "", bearer(fromX)), 200, "")
	want("A, unbound token from Y", do(a, "GET", "/api/v1/session/validate", "", bearer(unbound, "Origin", originY)), 200, "")
	// A block for the same workflow under another path_prefix is the same
	// chat (a reload that moves the prefix keeps the sessions).
	want("C (A's workflow, other prefix), from X", do(c, "GET", "/support/api/chat/history", "", bearer(fromX, "Origin", originX)), 200, "")

	// Another block sharing jwt_secret and the database.
	want("B, history", do(b, "GET", "/api/v1/chat/history", "", bearer(fromX)), 401, "invalid_token")
	want("B, history by id", do(b, "GET", "/api/v1/chat/history/"+sessionID, "", bearer(fromX)), 401, "invalid_token")
	want("B, validate from Z", do(b, "GET", "/api/v1/session/validate", "", bearer(fromX, "Origin", originZ)), 401, "invalid_token")
	want("B, chat message", do(b, "POST", "/api/v1/chat/message", `{"message":"hello"}`, bearer(fromX, "Accept", "application/json")), 401, "invalid_token")
	want("B, unbound token", do(b, "GET", "/api/v1/session/validate", "", bearer(unbound)), 401, "invalid_token")

	// Another origin that block A allows.
	want("A, bearer from Y", do(a, "GET", "/api/v1/chat/history", "", bearer(fromX, "Origin", originY)), 403, "origin_mismatch")
	want("A, cookie from Y", do(a, "GET", "/api/v1/chat/history", "", cookie(fromX, originY)), 403, "origin_mismatch")
	want("A, chat message from Y", do(a, "POST", "/api/v1/chat/message", `{"message":"hello"}`, bearer(fromX, "Origin", originY, "Accept", "application/json")), 403, "origin_mismatch")
	want("A, cookie stream from Y", do(a, "GET", "/api/v1/chat/stream?message=hello", "", cookie(fromX, originY)), 403, "origin_mismatch")
	want("A, delete from Y", do(a, "DELETE", "/api/v1/session", "", bearer(fromX, "Origin", originY)), 403, "origin_mismatch")

	// A token of the old form (the fixed audience, no block) is refused:
	// visitors holding one start a new session once.
	old, err := sessions.NewTokens([]byte(secret), nil).Issue(&sessions.Session{ID: sessionID, Site: "shop.example.com", ExpiresAt: time.Now().Add(time.Hour)})
	if err != nil {
		t.Fatal(err)
	}
	want("A, token without the block audience", do(a, "GET", "/api/v1/session/validate", "", bearer(old)), 401, "invalid_token")
	// The session itself was never touched by the refusals.
	want("A, still valid", do(a, "GET", "/api/v1/session/validate", "", bearer(fromX, "Origin", originX)), 200, "")
}
