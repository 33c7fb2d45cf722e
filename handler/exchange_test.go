package handler

import (
	"encoding/json"
	"fmt"
	"io"
	"net/http"
	"net/http/httptest"
	"net/netip"
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
	"github.com/chatproxy/caddy-chatproxy/internal/testkit"
	"github.com/chatproxy/caddy-chatproxy/metrics"
	"github.com/chatproxy/caddy-chatproxy/n8n"
	"github.com/chatproxy/caddy-chatproxy/sessions"
)

const (
	xtOrigin     = "https://shop.example.com"
	xtJWTSecret  = "exchange-test-jwt-secret-0123456789abcdef"
	xtN8nSecret  = "exchange-test-n8n-secret-0123456789abcdef"
	xtClientIP   = "203.0.113.9"
	xtBrowserUA  = "Mozilla/5.0 (X11; Linux x86_64) AppleWebKit/537.36 (KHTML, like Gecko) Chrome/126.0.0.0 Safari/537.36"
	xtSecretText = "my card number is 4111 1111 1111 1111"
)

// xtEnv is a handler built directly (as the module builds it) in front of
// a scripted n8n, logging into an observer.
type xtEnv struct {
	h    *Handler
	logs *observer.ObservedLogs
	n8n  *testkit.N8n // each test scripts what n8n answers
}

func newXTEnv(t *testing.T, logContent bool, limits map[guard.Tier][]redis_rate.Limit) *xtEnv {
	t.Helper()
	e := &xtEnv{n8n: testkit.NewN8n(t, nil)}

	store, err := sessions.OpenSQLite(filepath.Join(t.TempDir(), "chat.db"))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = store.Close() })
	origins, err := guard.ParseOrigins([]string{xtOrigin})
	if err != nil {
		t.Fatal(err)
	}
	if limits == nil {
		limits = map[guard.Tier][]redis_rate.Limit{}
	}
	limiter, err := guard.NewLimiter(guard.LimiterConfig{Limits: limits})
	if err != nil {
		t.Fatal(err)
	}
	upstream, err := n8n.New(n8n.Config{
		WebhookURL:    e.n8n.URL(),
		SessionSecret: xtN8nSecret,
		Breaker:       n8n.BreakerConfig{FailureThreshold: 100},
	})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = upstream.Close() })
	core, logs := observer.New(zapcore.DebugLevel)
	e.logs = logs
	e.h = New(Config{
		Prefix:  "/api/v1",
		Origins: origins,
		Sessions: &sessions.Manager{
			Store:  store,
			Tokens: sessions.NewTokens([]byte(xtJWTSecret), nil),
			TTL:    time.Hour,
		},
		Store:            store,
		Cookie:           Cookie{Name: "chat_session", SameSite: http.SameSiteLaxMode},
		MaxBodySize:      64 << 10,
		Logger:           zap.New(core),
		Limiter:          limiter,
		Upstream:         upstream,
		MaxMessageLength: 4000,
		Metrics:          metrics.NewRecorder("n8n-xtest001", []string{xtOrigin}),
		MetricsAllow:     []netip.Prefix{netip.MustParsePrefix("127.0.0.0/8")},
		LogContent:       logContent,
	})
	return e
}

// serve sends a request through the handler as Caddy's server would: with
// the request's replacer (so {http.request.uuid} exists) and client_ip.
func (e *xtEnv) serve(t *testing.T, method, path, body string, headers map[string]string) (*httptest.ResponseRecorder, string) {
	t.Helper()
	var rd io.Reader
	if body != "" {
		rd = strings.NewReader(body)
	}
	r := httptest.NewRequest(method, "http://api.example.net"+path, rd)
	r.Header.Set("User-Agent", xtBrowserUA)
	if body != "" {
		r.Header.Set("Content-Type", "application/json")
	}
	for k, v := range headers {
		r.Header.Set(k, v)
	}
	rec := httptest.NewRecorder()
	repl := caddy.NewReplacer()
	r = caddyhttp.PrepareRequest(r, repl, rec, nil)
	caddyhttp.SetVar(r.Context(), caddyhttp.ClientIPVarKey, xtClientIP)
	next := caddyhttp.HandlerFunc(func(w http.ResponseWriter, _ *http.Request) error {
		w.WriteHeader(299)
		return nil
	})
	if err := e.h.ServeHTTP(rec, r, next); err != nil {
		t.Fatalf("ServeHTTP: %v", err)
	}
	id, _ := repl.GetString("http.request.uuid") // the id this request was logged with
	return rec, id
}

func (e *xtEnv) session(t *testing.T) (id, token string) {
	t.Helper()
	rec, _ := e.serve(t, "POST", "/api/v1/session/create", `{}`, map[string]string{"Origin": xtOrigin})
	if rec.Code != http.StatusCreated {
		t.Fatalf("create: %d %s", rec.Code, rec.Body)
	}
	var c struct {
		SessionID string `json:"session_id"`
		Token     string `json:"token"`
	}
	if err := json.Unmarshal(rec.Body.Bytes(), &c); err != nil {
		t.Fatal(err)
	}
	return c.SessionID, c.Token
}

// exchangeLines returns the "chat exchange" log entries.
func (e *xtEnv) exchangeLines() []observer.LoggedEntry {
	return e.logs.FilterMessage("chat exchange").AllUntimed()
}

// wantOneExchange checks that exactly one exchange line was logged, and
// nothing else at Warn or above, and returns its fields.
func (e *xtEnv) wantOneExchange(t *testing.T, level zapcore.Level) map[string]any {
	t.Helper()
	lines := e.exchangeLines()
	if len(lines) != 1 {
		t.Fatalf("%d exchange lines, want 1: %+v", len(lines), e.logs.AllUntimed())
	}
	for _, l := range e.logs.AllUntimed() {
		if l.Message != "chat exchange" && l.Level >= zapcore.WarnLevel {
			t.Errorf("another %s line: %q %v", l.Level, l.Message, l.ContextMap())
		}
	}
	if lines[0].Level != level {
		t.Errorf("exchange line at %s, want %s", lines[0].Level, level)
	}
	return lines[0].ContextMap()
}

// noLeaks checks that no log line holds a secret, the webhook or (without
// log_content) the message text.
func (e *xtEnv) noLeaks(t *testing.T, extra ...string) {
	t.Helper()
	for _, l := range e.logs.AllUntimed() {
		text := l.Message + fmt.Sprint(l.ContextMap())
		for _, leak := range append([]string{testkit.WebhookPath, "webhook", e.n8n.Server().URL, xtJWTSecret, xtN8nSecret}, extra...) {
			if strings.Contains(text, leak) {
				t.Errorf("log line %q leaks %q: %v", l.Message, leak, l.ContextMap())
			}
		}
	}
}

func TestExchangeLogStream(t *testing.T) {
	e := newXTEnv(t, false, nil)
	e.n8n.SetScript(testkit.Stream("Hel", "lo ", "there"))
	sid, token := e.session(t)
	e.logs.TakeAll()

	body, _ := json.Marshal(map[string]string{"message": xtSecretText})
	rec, reqID := e.serve(t, "POST", "/api/v1/chat/stream", string(body), map[string]string{"Authorization": "Bearer " + token})
	if rec.Code != 200 || !strings.Contains(rec.Body.String(), "data: [DONE]") {
		t.Fatalf("stream: %d %s", rec.Code, rec.Body)
	}
	f := e.wantOneExchange(t, zapcore.InfoLevel)
	want := map[string]any{
		"session_id": sid, "site": "shop.example.com", "route": "stream", "status": int64(200), "outcome": "ok",
		"chunks": int64(3), "bytes": int64(len("Hello there")), "upstream_status": int64(200),
		"message_id": rec.Header().Get("X-Message-ID"), "request_id": reqID,
	}
	for k, v := range want {
		if f[k] != v {
			t.Errorf("field %s = %#v, want %#v", k, f[k], v)
		}
	}
	if reqID == "" {
		t.Error("no request id")
	}
	ttfb, _ := f["ttfb"].(time.Duration)
	duration, _ := f["duration"].(time.Duration)
	if ttfb <= 0 || duration < ttfb {
		t.Errorf("ttfb %v, duration %v", ttfb, duration)
	}
	for _, k := range []string{"message", "reply", "client_ip"} {
		if _, ok := f[k]; ok {
			t.Errorf("field %s logged without log_content", k)
		}
	}
	e.noLeaks(t, xtSecretText, "4111", "Hello there", xtClientIP)
}

// With log_content on, the message and the reply are in the line.
func TestExchangeLogContent(t *testing.T) {
	e := newXTEnv(t, true, nil)
	e.n8n.SetScript(testkit.Stream("Hi ", "you"))
	_, token := e.session(t)
	e.logs.TakeAll()
	body, _ := json.Marshal(map[string]string{"message": xtSecretText})
	rec, _ := e.serve(t, "POST", "/api/v1/chat/message", string(body), map[string]string{"Authorization": "Bearer " + token, "Accept": "application/json"})
	if rec.Code != 200 {
		t.Fatalf("message: %d %s", rec.Code, rec.Body)
	}
	f := e.wantOneExchange(t, zapcore.InfoLevel)
	if f["message"] != xtSecretText || f["reply"] != "Hi you" || f["route"] != "message" || f["outcome"] != "ok" {
		t.Fatalf("fields %v", f)
	}
	if f["chunks"] != int64(0) || f["bytes"] != int64(len("Hi you")) {
		t.Errorf("a JSON answer: chunks %v bytes %v", f["chunks"], f["bytes"])
	}
	e.noLeaks(t)
}

// An n8n failure is one Warn line carrying n8n's status and the reason,
// never n8n's URL.
func TestExchangeLogUpstreamError(t *testing.T) {
	e := newXTEnv(t, false, nil)
	// n8n's answer when the workflow fails (research §2.5).
	e.n8n.SetScript(testkit.Reply(http.StatusInternalServerError, "application/json; charset=utf-8", `{"message":"Error in workflow"}`))
	sid, token := e.session(t)
	e.logs.TakeAll()
	body, _ := json.Marshal(map[string]string{"message": xtSecretText})
	rec, _ := e.serve(t, "POST", "/api/v1/chat/stream", string(body), map[string]string{"Authorization": "Bearer " + token})
	if rec.Code != http.StatusBadGateway {
		t.Fatalf("stream: %d %s", rec.Code, rec.Body)
	}
	f := e.wantOneExchange(t, zapcore.WarnLevel)
	for k, v := range map[string]any{
		"session_id": sid, "status": int64(502), "outcome": "upstream_error", "upstream_status": int64(500),
		"upstream_code": "upstream_error", "upstream_reason": "status", "mid_stream": false, "chunks": int64(0),
	} {
		if f[k] != v {
			t.Errorf("field %s = %#v, want %#v", k, f[k], v)
		}
	}
	e.noLeaks(t, xtSecretText)
}

// Refusals are exchanges too: one Info line each, with the outcome.
func TestExchangeLogRefusals(t *testing.T) {
	e := newXTEnv(t, false, map[guard.Tier][]redis_rate.Limit{guard.TierSession: {redis_rate.PerMinute(1)}})
	e.n8n.SetScript(testkit.Stream("ok"))
	_, token := e.session(t)
	auth := map[string]string{"Authorization": "Bearer " + token}

	for _, tc := range []struct {
		body    string
		status  int
		outcome string
	}{
		{`{"message":""}`, 400, "invalid"},
		{`{"message":"hello"}`, 200, "ok"},
		{`{"message":"hello again"}`, 429, "rate_limited"},
	} {
		e.logs.TakeAll()
		rec, _ := e.serve(t, "POST", "/api/v1/chat/stream", tc.body, auth)
		if rec.Code != tc.status {
			t.Fatalf("%s: %d %s", tc.body, rec.Code, rec.Body)
		}
		f := e.wantOneExchange(t, zapcore.InfoLevel)
		if f["outcome"] != tc.outcome || f["status"] != int64(tc.status) {
			t.Errorf("%s: outcome %v status %v, want %s %d", tc.body, f["outcome"], f["status"], tc.outcome, tc.status)
		}
	}
	// Session routes are not chat exchanges.
	e.logs.TakeAll()
	e.serve(t, "GET", "/api/v1/session/validate", "", auth)
	if n := len(e.exchangeLines()); n != 0 {
		t.Fatalf("validate logged %d exchange lines", n)
	}
}

// /metrics from an allowed network; everyone else sees no such route.
func TestMetricsRouteHandler(t *testing.T) {
	e := newXTEnv(t, false, nil)
	serveFrom := func(ip, method string) *httptest.ResponseRecorder {
		r := httptest.NewRequest(method, "http://api.example.net/metrics", nil)
		rec := httptest.NewRecorder()
		r = caddyhttp.PrepareRequest(r, caddy.NewReplacer(), rec, nil)
		caddyhttp.SetVar(r.Context(), caddyhttp.ClientIPVarKey, ip)
		if err := e.h.ServeHTTP(rec, r, caddyhttp.HandlerFunc(func(w http.ResponseWriter, _ *http.Request) error {
			w.WriteHeader(299)
			return nil
		})); err != nil {
			t.Fatal(err)
		}
		return rec
	}
	if rec := serveFrom("127.0.0.1", "GET"); rec.Code != 200 || !strings.Contains(rec.Body.String(), "caddy_chatproxy_") {
		t.Fatalf("from loopback: %d", rec.Code)
	}
	if rec := serveFrom("::ffff:127.0.0.1", "GET"); rec.Code != 200 {
		t.Fatalf("from IPv4-mapped loopback: %d", rec.Code)
	}
	if rec := serveFrom("127.0.0.1", "POST"); rec.Code != 405 || rec.Header().Get("Allow") != "GET, HEAD" {
		t.Fatalf("POST from loopback: %d %q", rec.Code, rec.Header().Get("Allow"))
	}
	for _, ip := range []string{"10.1.2.3", "203.0.113.7", "not-an-ip", ""} {
		for _, m := range []string{"GET", "POST"} {
			if rec := serveFrom(ip, m); rec.Code != 404 || rec.Header().Get("X-Content-Type-Options") != "nosniff" {
				t.Fatalf("%s from %q: %d", m, ip, rec.Code)
			}
		}
	}
}
