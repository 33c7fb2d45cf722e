package handler

import (
	"encoding/json"
	"io"
	"net/http"
	"net/http/httptest"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/caddyserver/caddy/v2"
	"github.com/caddyserver/caddy/v2/modules/caddyhttp"
	"github.com/go-redis/redis_rate/v10"
	"go.uber.org/zap"
	"go.uber.org/zap/zapcore"
	"go.uber.org/zap/zaptest/observer"

	"github.com/chatproxy/caddy-chatproxy/guard"
	"github.com/chatproxy/caddy-chatproxy/internal/testenv"
	"github.com/chatproxy/caddy-chatproxy/internal/testkit"
	"github.com/chatproxy/caddy-chatproxy/metrics"
	"github.com/chatproxy/caddy-chatproxy/n8n"
	"github.com/chatproxy/caddy-chatproxy/sessions"
)

// The hd* helpers build a Handler directly from a Config, as the module
// does, over a real store and an in-process limiter, in front of the shared
// fake n8n (testkit.N8n), which answers every message with hdReply.

const (
	hdOrigin      = "https://shop.example.com"
	hdOtherOrigin = "https://blog.example.com"
	hdJWTSecret   = "hardening-test-jwt-secret-0123456789abcdef"
	hdN8nSecret   = "hardening-test-n8n-secret-0123456789abcdef"
	hdReply       = "Hello from the workflow."
	hdBrowserUA   = "Mozilla/5.0 (X11; Linux x86_64) AppleWebKit/537.36 (KHTML, like Gecko) Chrome/126.0.0.0 Safari/537.36"
)

type hdEnv struct {
	h     *Handler
	store sessions.Store
	logs  *observer.ObservedLogs
}

// hdPostgres opens a store in a fresh PostgreSQL schema of its own.
func hdPostgres(t *testing.T) sessions.Store {
	t.Helper()
	store, err := sessions.OpenPostgres(testenv.PostgresURL(t))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = store.Close() })
	return store
}

// hdSQLite opens a store in a fresh SQLite file.
func hdSQLite(t *testing.T) sessions.Store {
	t.Helper()
	store, err := sessions.OpenSQLite(filepath.Join(t.TempDir(), "chat.db"))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = store.Close() })
	return store
}

// newHDEnv builds a handler over store; mutate adjusts its Config.
func newHDEnv(t *testing.T, store sessions.Store, mutate func(*Config)) *hdEnv {
	t.Helper()
	fake := testkit.NewN8n(t, testkit.Output(hdReply))
	upstream, err := n8n.New(n8n.Config{
		WebhookURL:    fake.URL(),
		SessionSecret: hdN8nSecret,
		Breaker:       n8n.BreakerConfig{FailureThreshold: 100},
	})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = upstream.Close() })
	origins, err := guard.ParseOrigins([]string{hdOrigin, hdOtherOrigin})
	if err != nil {
		t.Fatal(err)
	}
	limiter, err := guard.NewLimiter(guard.LimiterConfig{Limits: map[guard.Tier][]redis_rate.Limit{}})
	if err != nil {
		t.Fatal(err)
	}
	core, logs := observer.New(zapcore.DebugLevel)
	cfg := Config{
		Prefix:  "/api/v1",
		Origins: origins,
		Sessions: &sessions.Manager{
			Store:  store,
			Tokens: sessions.NewTokens([]byte(hdJWTSecret), nil),
			TTL:    time.Hour,
		},
		Store:            store,
		Cookie:           Cookie{Name: "chat_session", SameSite: http.SameSiteLaxMode},
		MaxBodySize:      64 << 10,
		Logger:           zap.New(core),
		Limiter:          limiter,
		Upstream:         upstream,
		MaxMessageLength: 4000,
		Metrics:          metrics.NewRecorder("n8n-hardening", []string{hdOrigin, hdOtherOrigin}),
	}
	if mutate != nil {
		mutate(&cfg)
	}
	return &hdEnv{h: New(cfg), store: store, logs: logs}
}

// do sends a request through the handler as Caddy's server would.
func (e *hdEnv) do(t *testing.T, method, path, body string, headers map[string]string) *httptest.ResponseRecorder {
	t.Helper()
	rec := httptest.NewRecorder()
	e.serveBodyTo(t, rec, method, path, body, headers)
	return rec
}

// serveTo is do for a request without a body, answered into w.
func (e *hdEnv) serveTo(t *testing.T, w http.ResponseWriter, method, path string, headers map[string]string) {
	t.Helper()
	e.serveBodyTo(t, w, method, path, "", headers)
}

func (e *hdEnv) serveBodyTo(t *testing.T, w http.ResponseWriter, method, path, body string, headers map[string]string) {
	t.Helper()
	var rd io.Reader
	if body != "" {
		rd = strings.NewReader(body)
	}
	r := httptest.NewRequest(method, "http://api.example.net"+path, rd)
	r.Header.Set("User-Agent", hdBrowserUA)
	if body != "" {
		r.Header.Set("Content-Type", "application/json")
	}
	for k, v := range headers {
		r.Header.Set(k, v)
	}
	r = caddyhttp.PrepareRequest(r, caddy.NewReplacer(), w, nil)
	caddyhttp.SetVar(r.Context(), caddyhttp.ClientIPVarKey, "203.0.113.21")
	next := caddyhttp.HandlerFunc(func(w http.ResponseWriter, _ *http.Request) error {
		w.WriteHeader(299)
		return nil
	})
	if err := e.h.ServeHTTP(w, r, next); err != nil {
		t.Fatalf("ServeHTTP: %v", err)
	}
}

// session creates a visitor session with the given headers and returns
// its token.
func (e *hdEnv) session(t *testing.T, headers map[string]string) string {
	t.Helper()
	rec := e.do(t, "POST", "/api/v1/session/create", `{}`, headers)
	if rec.Code != http.StatusCreated {
		t.Fatalf("create: %d %s", rec.Code, rec.Body)
	}
	var c struct {
		Token string `json:"token"`
	}
	if err := json.Unmarshal(rec.Body.Bytes(), &c); err != nil {
		t.Fatal(err)
	}
	return c.Token
}

// hdHeaders merges header maps.
func hdHeaders(kv ...string) map[string]string {
	m := map[string]string{}
	for i := 0; i+1 < len(kv); i += 2 {
		m[kv[i]] = kv[i+1]
	}
	return m
}

// hdWantError checks a JSON error answer.
func hdWantError(t *testing.T, rec *httptest.ResponseRecorder, status int, code string) {
	t.Helper()
	var body apiError
	_ = json.Unmarshal(rec.Body.Bytes(), &body)
	if rec.Code != status || body.Error != code {
		t.Fatalf("got %d %s, want %d %q", rec.Code, rec.Body, status, code)
	}
}

// hdNoErrorLogs checks nothing was logged at Error level.
func (e *hdEnv) hdNoErrorLogs(t *testing.T) {
	t.Helper()
	for _, l := range e.logs.AllUntimed() {
		if l.Level >= zapcore.ErrorLevel {
			t.Errorf("logged at %s: %q %v", l.Level, l.Message, l.ContextMap())
		}
	}
}
