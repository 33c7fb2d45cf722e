package chatproxy

import (
	"net/http"
	"strings"
	"testing"

	"github.com/chatproxy/caddy-chatproxy/sessions"
)

func TestEmbeddedStoreKeepsSessionsAcrossRestart(t *testing.T) {
	db := "sqlite:" + t.TempDir() + "/chat.db"
	first := &ChatProxy{N8nWebhook: "http://127.0.0.1:9/w", JWTSecret: testJWTSecret, SessionSecret: testSessionSecret, Database: db, RateLimits: generousLimits()}
	provision(t, first)
	c := createSession2(t, first)
	if err := first.Cleanup(); err != nil { // the last reference: the store is closed
		t.Fatal(err)
	}
	if n, _ := sessions.SharedReferences(storeKeyOf(first)); n != 0 {
		t.Fatalf("store still referenced after cleanup: %d", n)
	}
	second := &ChatProxy{N8nWebhook: "http://127.0.0.1:9/w", JWTSecret: testJWTSecret, SessionSecret: testSessionSecret, Database: db, RateLimits: generousLimits()}
	provision(t, second)
	rec := serve(t, second, req{method: "GET", path: "/api/v1/session/validate", headers: bearer(c.Token)})
	if rec.Code != 200 || !strings.Contains(rec.Body.String(), c.SessionID) {
		t.Fatalf("after restart: %d %s", rec.Code, rec.Body)
	}
}

func createSession2(t *testing.T, cp *ChatProxy) created {
	t.Helper()
	rec := serve(t, cp, req{method: "POST", path: "/api/v1/session/create"})
	if rec.Code != http.StatusCreated {
		t.Fatalf("create: %d %s", rec.Code, rec.Body)
	}
	return decode[created](t, rec)
}
