package handler_test

// Route-level tests of the guard (issue 4): rate limits, CSRF, content
// types, input validation, bot scoring and fingerprints, through the
// handler as the module builds it. Redis tests isolate their budgets in
// the shared Redis with a hash key of their own (see newHandler) and
// client IPs of their own.

import (
	"encoding/json"
	"fmt"
	"maps"
	"net/http"
	"net/http/httptest"
	"net/url"
	"slices"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/go-redis/redis_rate/v10"

	"github.com/chatproxy/caddy-chatproxy/guard"
	"github.com/chatproxy/caddy-chatproxy/handler"
	"github.com/chatproxy/caddy-chatproxy/internal/testenv"
	"github.com/chatproxy/caddy-chatproxy/internal/testkit"
	"github.com/chatproxy/caddy-chatproxy/sessions"
)

// grBrowserUA is an ordinary browser's User-Agent, so that the bot filter
// sees a person unless a test says otherwise.
const grBrowserUA = "Mozilla/5.0 (X11; Linux x86_64; rv:128.0) Gecko/20100101 Firefox/128.0"

// grN8nCall is what the fake n8n received for one message.
type grN8nCall = testkit.N8nBody

// grN8n is the fake n8n answering {"output":"ok"}.
type grN8n struct {
	*testkit.N8n
	URL string
}

func newGrN8n(t *testing.T) *grN8n {
	t.Helper()
	f := testkit.NewN8n(t, testkit.Output("ok"))
	return &grN8n{N8n: f, URL: f.URL()}
}

func (f *grN8n) count() int { return f.Hits() }

func (f *grN8n) last(t *testing.T) grN8nCall {
	t.Helper()
	return f.Last(t).Body
}

// grHandler is a handler with its store and its tokens' audience.
type grHandler struct {
	*handler.Handler
	store    sessions.Store
	audience string
}

func (g *grHandler) handlerStore() sessions.Store { return g.store }

func (g *grHandler) tokenAudience() string { return g.audience }

// grProxy builds a handler on a fresh embedded store with generous limits
// unless mutate sets others, and n8n at n8nURL when given.
func grProxy(t *testing.T, n8nURL string, mutate func(*envConfig)) *grHandler {
	t.Helper()
	if n8nURL == "" {
		n8nURL = "http://127.0.0.1:9/webhook/chat"
	}
	c := defaultEnvConfig(n8nURL)
	if mutate != nil {
		mutate(&c)
	}
	h, store := newHandler(t, c)
	return &grHandler{Handler: h, store: store, audience: sessions.BlockAudience(c.Upstream.WebhookURL)}
}

// grLimits returns generous limits with the given tiers replaced.
func grLimits(tiers map[string][]string) map[guard.Tier][]redis_rate.Limit {
	return limitsOver(generousLimits(), tiers)
}

type grReq struct {
	method, path, body string
	ip                 string            // Caddy's client_ip var; default 198.51.100.1
	headers            map[string]string // "" deletes a header
}

// grDo sends one request through the module as Caddy's server would. The
// User-Agent is a browser's and a body is JSON unless headers say
// otherwise. It reports errors instead of failing, so goroutines may call
// it.
func grDo(cp *grHandler, rq grReq) (*httptest.ResponseRecorder, error) {
	ip := rq.ip
	if ip == "" {
		ip = "198.51.100.1"
	}
	headers := map[string]string{"User-Agent": grBrowserUA}
	maps.Copy(headers, rq.headers)
	return testkit.Serve(cp, testkit.Request{Method: rq.method, Path: rq.path, Body: rq.body, ClientIP: ip, Headers: headers}, passedOn)
}

func grServe(t *testing.T, cp *grHandler, rq grReq) *httptest.ResponseRecorder {
	t.Helper()
	rec, err := grDo(cp, rq)
	if err != nil {
		t.Fatal(err)
	}
	return rec
}

// grCreate creates a session from ip with the allowed Origin, and extra
// headers.
func grCreate(t *testing.T, cp *grHandler, ip string, headers map[string]string) created {
	t.Helper()
	h := map[string]string{"Origin": allowedOrigin}
	for k, v := range headers {
		h[k] = v
	}
	rec := grServe(t, cp, grReq{method: "POST", path: "/api/v1/session/create", ip: ip, headers: h,
		body: `{"page_url":"https://shop.example.com/p/1"}`})
	if rec.Code != http.StatusCreated {
		t.Fatalf("create from %s: %d %s", ip, rec.Code, rec.Body)
	}
	return decode[created](t, rec)
}

// grChat posts a message with the bearer token and asks for a JSON reply.
func grChat(t *testing.T, cp *grHandler, token, message, ip string) *httptest.ResponseRecorder {
	t.Helper()
	b, _ := json.Marshal(map[string]string{"message": message})
	return grServe(t, cp, grReq{method: "POST", path: "/api/v1/chat/message", ip: ip, body: string(b),
		headers: map[string]string{"Authorization": "Bearer " + token, "Accept": "application/json"}})
}

// grWantReply checks a JSON chat answer carrying n8n's reply.
func grWantReply(t *testing.T, rec *httptest.ResponseRecorder) {
	t.Helper()
	if rec.Code != http.StatusOK {
		t.Fatalf("chat: %d %s", rec.Code, rec.Body)
	}
	var body struct {
		Response string `json:"response"`
	}
	if err := json.Unmarshal(rec.Body.Bytes(), &body); err != nil || body.Response != "ok" {
		t.Fatalf("chat reply = %s (%v), want response ok", rec.Body, err)
	}
}

// grRateLimited checks a 429 answer completely: the body has exactly the
// fields error, message, retry_after and tier; the headers agree with it.
// It returns retry_after and the message.
func grRateLimited(t *testing.T, rec *httptest.ResponseRecorder, tier string, limit int) (int, string) {
	t.Helper()
	if err := grCheckRateLimited(rec, tier, limit); err != nil {
		t.Fatal(err)
	}
	var body struct {
		Message    string `json:"message"`
		RetryAfter int    `json:"retry_after"`
	}
	_ = json.Unmarshal(rec.Body.Bytes(), &body)
	return body.RetryAfter, body.Message
}

func grCheckRateLimited(rec *httptest.ResponseRecorder, tier string, limit int) error {
	if rec.Code != http.StatusTooManyRequests {
		return fmt.Errorf("status %d, want 429; body %s", rec.Code, rec.Body)
	}
	if ct := rec.Header().Get("Content-Type"); ct != "application/json; charset=utf-8" {
		return fmt.Errorf("429 Content-Type %q", ct)
	}
	var fields map[string]json.RawMessage
	if err := json.Unmarshal(rec.Body.Bytes(), &fields); err != nil {
		return fmt.Errorf("429 body %s: %v", rec.Body, err)
	}
	keys := make([]string, 0, len(fields))
	for k := range fields {
		keys = append(keys, k)
	}
	slices.Sort(keys)
	if !slices.Equal(keys, []string{"error", "message", "retry_after", "tier"}) {
		return fmt.Errorf("429 body fields %v, want error, message, retry_after, tier: %s", keys, rec.Body)
	}
	var body struct {
		Error      string `json:"error"`
		Message    string `json:"message"`
		RetryAfter int    `json:"retry_after"`
		Tier       string `json:"tier"`
	}
	if err := json.Unmarshal(rec.Body.Bytes(), &body); err != nil {
		return fmt.Errorf("429 body %s: %v", rec.Body, err)
	}
	if body.Error != "rate_limited" || body.Message == "" || body.RetryAfter < 1 || body.Tier != tier {
		return fmt.Errorf("429 body %s, want rate_limited with retry_after ≥ 1 and tier %s", rec.Body, tier)
	}
	h := rec.Header()
	if got := h.Get("Retry-After"); got != strconv.Itoa(body.RetryAfter) {
		return fmt.Errorf("Retry-After %q, body retry_after %d", got, body.RetryAfter)
	}
	if got := h.Get("RateLimit-Limit"); got != strconv.Itoa(limit) {
		return fmt.Errorf("RateLimit-Limit %q, want %d", got, limit)
	}
	if got := h.Get("RateLimit-Remaining"); got != "0" {
		return fmt.Errorf("RateLimit-Remaining %q, want 0", got)
	}
	if reset, err := strconv.Atoi(h.Get("RateLimit-Reset")); err != nil || reset < 1 || reset < body.RetryAfter {
		return fmt.Errorf("RateLimit-Reset %q, want whole seconds ≥ retry_after %d", h.Get("RateLimit-Reset"), body.RetryAfter)
	}
	return nil
}

// grBackends are the limiter backends every budget test runs on.
var grBackends = []string{"memory", "redis"}

func grWithBackend(t *testing.T, backend string) func(*envConfig) {
	t.Helper()
	if backend == "memory" {
		return func(*envConfig) {}
	}
	u := testenv.RedisURL(t)
	return func(c *envConfig) {
		c.Redis = u
		// These tests count exact budgets; a loaded machine must not turn
		// a slow Redis answer into the in-process fallback.
		c.RedisTimeout = 5 * time.Second
	}
}

// 200 concurrent requests against one budget let exactly the limit
// through, with Redis and in process: `rate_limit create 10/1m` on session
// creation, and the default ip limit (60/1m) on session validation.
func TestGuardConcurrentRequestsExactLimit(t *testing.T) {
	for _, backend := range grBackends {
		t.Run(backend+"/create 10 per minute", func(t *testing.T) {
			withBackend := grWithBackend(t, backend)
			cp := grProxy(t, "", func(c *envConfig) {
				withBackend(c)
				c.Limits = limitsOver(guard.DefaultLimits(), map[string][]string{"create": {"10/1m"}}) // as `rate_limit create 10/1m`
			})
			recs := grConcurrently(t, 200, func() (*httptest.ResponseRecorder, error) {
				return grDo(cp, grReq{method: "POST", path: "/api/v1/session/create", ip: "198.51.100.10",
					headers: map[string]string{"Origin": allowedOrigin}})
			})
			var allowed, limited int
			var remaining []int
			for _, rec := range recs {
				switch rec.Code {
				case http.StatusCreated:
					allowed++
					if rec.Header().Get("RateLimit-Limit") != "10" {
						t.Errorf("201 RateLimit-Limit %q, want 10", rec.Header().Get("RateLimit-Limit"))
					}
					n, err := strconv.Atoi(rec.Header().Get("RateLimit-Remaining"))
					if err != nil {
						t.Errorf("201 RateLimit-Remaining %q", rec.Header().Get("RateLimit-Remaining"))
					}
					remaining = append(remaining, n)
				case http.StatusTooManyRequests:
					limited++
					if err := grCheckRateLimited(rec, "create", 10); err != nil {
						t.Error(err)
					}
				default:
					t.Errorf("unexpected %d %s", rec.Code, rec.Body)
				}
			}
			t.Logf("%s: 200 concurrent creations → %d × 201, %d × 429", backend, allowed, limited)
			if allowed != 10 || limited != 190 {
				t.Fatalf("got %d × 201 and %d × 429, want 10 and 190", allowed, limited)
			}
			// Each allowed request took its own place in the budget.
			slices.Sort(remaining)
			if !slices.Equal(remaining, []int{0, 1, 2, 3, 4, 5, 6, 7, 8, 9}) {
				t.Errorf("RateLimit-Remaining of the allowed creations = %v, want 0..9 once each", remaining)
			}
			if st, err := cp.handlerStore().Stats(t.Context()); err != nil || st.Sessions != 10 {
				t.Errorf("stored sessions = %+v, %v; want 10", st, err)
			}
		})
		t.Run(backend+"/ip default 60 per minute", func(t *testing.T) {
			withBackend := grWithBackend(t, backend)
			cp := grProxy(t, "", func(c *envConfig) {
				withBackend(c)
				c.Limits = guard.DefaultLimits() // every tier at its default
			})
			c := grCreate(t, cp, "198.51.100.20", nil)
			recs := grConcurrently(t, 200, func() (*httptest.ResponseRecorder, error) {
				return grDo(cp, grReq{method: "GET", path: "/api/v1/session/validate", ip: "198.51.100.21", headers: bearer(c.Token)})
			})
			var allowed, limited int
			for _, rec := range recs {
				switch rec.Code {
				case http.StatusOK:
					allowed++
				case http.StatusTooManyRequests:
					limited++
					if err := grCheckRateLimited(rec, "ip", 60); err != nil {
						t.Error(err)
					}
				default:
					t.Errorf("unexpected %d %s", rec.Code, rec.Body)
				}
			}
			t.Logf("%s: 200 concurrent validations → %d × 200, %d × 429", backend, allowed, limited)
			if allowed != 60 || limited != 140 {
				t.Fatalf("got %d × 200 and %d × 429, want 60 and 140", allowed, limited)
			}
		})
	}
}

// grConcurrently runs n requests at once (released together) and returns
// their answers.
func grConcurrently(t *testing.T, n int, do func() (*httptest.ResponseRecorder, error)) []*httptest.ResponseRecorder {
	t.Helper()
	recs := make([]*httptest.ResponseRecorder, n)
	errs := make([]error, n)
	start := make(chan struct{})
	var wg sync.WaitGroup
	for i := range n {
		wg.Go(func() {
			<-start
			recs[i], errs[i] = do()
		})
	}
	close(start)
	wg.Wait()
	for _, err := range errs {
		if err != nil {
			t.Fatal(err)
		}
	}
	return recs
}

// The ip tier counts the session and chat routes, each request once, and
// nothing else: not preflights, /health, refused origins, wrong methods or
// requests passed on to the next handler.
func TestGuardIPTierCountsSessionAndChatRoutesOnly(t *testing.T) {
	n8n := newGrN8n(t)
	cp := grProxy(t, n8n.URL, func(c *envConfig) { c.Limits = grLimits(map[string][]string{"ip": {"5/1m"}}) })
	const ip = "198.51.100.30"
	for i := range 5 {
		for _, rq := range []grReq{
			{method: "OPTIONS", path: "/api/v1/chat/message", headers: map[string]string{"Origin": allowedOrigin, "Access-Control-Request-Method": "POST"}},
			{method: "OPTIONS", path: "/api/v1/session/create", headers: map[string]string{"Origin": allowedOrigin, "Access-Control-Request-Method": "POST"}},
			{method: "GET", path: "/health"},
			{method: "GET", path: "/api/v1/elsewhere"},
			{method: "GET", path: "/api/v1/chat/message"},
			{method: "POST", path: "/api/v1/session/create", headers: map[string]string{"Origin": "https://evil.example.net"}},
		} {
			rq.ip = ip
			rec := grServe(t, cp, rq)
			want := map[string]int{"OPTIONS": 204, "GET /health": 200, "GET /api/v1/elsewhere": passedOn, "GET /api/v1/chat/message": 405, "POST": 403}
			code, ok := want[rq.method+" "+rq.path]
			if !ok {
				code = want[rq.method]
			}
			if rec.Code != code {
				t.Fatalf("round %d: %s %s: %d, want %d; %s", i, rq.method, rq.path, rec.Code, code, rec.Body)
			}
			if h := rec.Header().Get("RateLimit-Limit"); h != "" {
				t.Fatalf("%s %s was counted: RateLimit-Limit %q", rq.method, rq.path, h)
			}
		}
	}

	// Five counted requests, one per kind of route: each takes one place.
	c := grCreate(t, cp, ip, nil)
	remainingAfter := func(rec *httptest.ResponseRecorder) string { return rec.Header().Get("RateLimit-Remaining") }
	// The creation took the first place: validate sees 3 left after itself.
	rec := grServe(t, cp, grReq{method: "GET", path: "/api/v1/session/validate", ip: ip, headers: bearer(c.Token)})
	if rec.Code != 200 || rec.Header().Get("RateLimit-Limit") != "5" || remainingAfter(rec) != "3" {
		t.Fatalf("validate: %d limit %q remaining %q", rec.Code, rec.Header().Get("RateLimit-Limit"), remainingAfter(rec))
	}
	rec = grServe(t, cp, grReq{method: "GET", path: "/api/v1/chat/history", ip: ip, headers: bearer(c.Token)})
	if rec.Code != 200 || remainingAfter(rec) != "2" {
		t.Fatalf("history: %d remaining %q", rec.Code, remainingAfter(rec))
	}
	rec = grChat(t, cp, c.Token, "hello there", ip)
	grWantReply(t, rec)
	if remainingAfter(rec) != "1" {
		t.Fatalf("chat: remaining %q, want 1", remainingAfter(rec))
	}
	rec = grServe(t, cp, grReq{method: "POST", path: "/api/v1/n8n/chat", ip: ip, headers: map[string]string{"Origin": allowedOrigin},
		body: `{"action":"sendMessage","sessionId":"widget-ip-tier-1","chatInput":"hello from the widget"}`})
	if rec.Code != 200 || rec.Body.String() != "{\"output\":\"ok\"}\n" || remainingAfter(rec) != "0" {
		t.Fatalf("widget: %d %s remaining %q", rec.Code, rec.Body, remainingAfter(rec))
	}

	// The budget is spent: every counted route now answers 429 for the ip
	// tier, and n8n is not called.
	calls := n8n.count()
	for _, rq := range []grReq{
		{method: "POST", path: "/api/v1/chat/message", body: `{"message":"one more"}`, headers: bearer(c.Token)},
		{method: "POST", path: "/api/v1/session/create", headers: map[string]string{"Origin": allowedOrigin}},
		{method: "GET", path: "/api/v1/session/validate", headers: bearer(c.Token)},
		{method: "POST", path: "/api/v1/n8n/chat", body: `{"action":"loadPreviousSession","sessionId":"widget-ip-tier-1"}`},
	} {
		rq.ip = ip
		grRateLimited(t, grServe(t, cp, rq), "ip", 5)
	}
	if n8n.count() != calls || calls != 2 {
		t.Fatalf("n8n calls %d → %d, want 2 and no more", calls, n8n.count())
	}
	// Preflights and /health still answer, and another client is unaffected.
	if rec := grServe(t, cp, grReq{method: "GET", path: "/health", ip: ip}); rec.Code != 200 {
		t.Fatalf("health after the budget is spent: %d", rec.Code)
	}
	if rec := grServe(t, cp, grReq{method: "OPTIONS", path: "/api/v1/chat/message", ip: ip,
		headers: map[string]string{"Origin": allowedOrigin, "Access-Control-Request-Method": "POST"}}); rec.Code != 204 {
		t.Fatalf("preflight after the budget is spent: %d %s", rec.Code, rec.Body)
	}
	if rec := grServe(t, cp, grReq{method: "GET", path: "/api/v1/session/validate", ip: "198.51.100.31", headers: bearer(c.Token)}); rec.Code != 200 {
		t.Fatalf("another IP: %d %s", rec.Code, rec.Body)
	}
}

// The session tier limits one conversation and the domain tier a whole
// site, across sessions and IPs; another site keeps its own budget.
func TestGuardSessionAndDomainTiers(t *testing.T) {
	n8n := newGrN8n(t)
	cp := grProxy(t, n8n.URL, func(c *envConfig) {
		c.Limits = grLimits(map[string][]string{"session": {"3/1m"}, "domain": {"5/1m"}})
	})
	s1 := grCreate(t, cp, "198.51.100.40", nil)
	for i := range 3 {
		grWantReply(t, grChat(t, cp, s1.Token, fmt.Sprintf("question %d", i), "198.51.100.40"))
	}
	grRateLimited(t, grChat(t, cp, s1.Token, "question 4", "198.51.100.40"), "session", 3)
	// The refused message spent nothing from the site's budget: a second
	// session of the site, from another IP, gets the two places left.
	s2 := grCreate(t, cp, "198.51.100.41", nil)
	grWantReply(t, grChat(t, cp, s2.Token, "first", "198.51.100.41"))
	grWantReply(t, grChat(t, cp, s2.Token, "second", "198.51.100.41"))
	grRateLimited(t, grChat(t, cp, s2.Token, "third", "198.51.100.41"), "domain", 5)
	s3 := grCreate(t, cp, "198.51.100.42", nil)
	grRateLimited(t, grChat(t, cp, s3.Token, "hello", "198.51.100.42"), "domain", 5)
	// Another allowed site is a separate budget.
	s4 := grCreate(t, cp, "198.51.100.43", map[string]string{"Origin": "https://blog.example.org"})
	grWantReply(t, grChat(t, cp, s4.Token, "hello", "198.51.100.43"))
	if got := n8n.count(); got != 6 {
		t.Fatalf("n8n calls = %d, want 6 (3 + 2 + 0 + 1)", got)
	}
	if got := n8n.last(t).Session.OriginDomain; got != "blog.example.org" {
		t.Fatalf("last call's origin_domain = %q", got)
	}
}

// A client that keeps hitting a limit is blocked: after 10 refusals within
// a minute the next refusal blocks it for 5 minutes, and retry_after jumps
// from the window's few seconds to the block time. The block is on that
// tier's key only.
func TestGuardRepeatOffenderBlocked(t *testing.T) {
	for _, backend := range grBackends {
		t.Run(backend, func(t *testing.T) {
			withBackend := grWithBackend(t, backend)
			cp := grProxy(t, "", func(c *envConfig) {
				withBackend(c)
				c.Limits = grLimits(map[string][]string{"create": {"10/1m"}})
			})
			const ip = "198.51.100.50"
			create := grReq{method: "POST", path: "/api/v1/session/create", ip: ip}
			for i := range 10 {
				if rec := grServe(t, cp, create); rec.Code != 201 {
					t.Fatalf("creation %d: %d %s", i+1, rec.Code, rec.Body)
				}
			}
			for i := range 10 {
				retry, msg := grRateLimited(t, grServe(t, cp, create), "create", 10)
				if retry > 6 || strings.Contains(msg, "blocked") {
					t.Fatalf("refusal %d: retry_after %d, message %q; want at most 6 s (one place every 6 s), not blocked", i+1, retry, msg)
				}
			}
			for i := range 3 {
				retry, msg := grRateLimited(t, grServe(t, cp, create), "create", 10)
				if retry < 295 || retry > 300 || !strings.Contains(msg, "temporarily blocked") {
					t.Fatalf("refusal %d: retry_after %d, message %q; want the 5 min block", 11+i, retry, msg)
				}
			}
			// Other tiers of the same client, and other clients, go on.
			c := grCreate(t, cp, "198.51.100.51", nil)
			if rec := grServe(t, cp, grReq{method: "GET", path: "/api/v1/session/validate", ip: ip, headers: bearer(c.Token)}); rec.Code != 200 {
				t.Fatalf("validate from the blocked IP: %d %s", rec.Code, rec.Body)
			}
		})
	}
}

// The CSRF rule at the chat route, every cell of origin (allowed, denied,
// absent) × auth (cookie, bearer) × Sec-Fetch-Site (same-origin, same-site,
// cross-site, none, absent): a denied Origin is 403 whatever the auth; the
// allowed Origin the session was created from passes, another allowed one
// is 403; without an Origin a bearer token passes and a
// cookie needs Sec-Fetch-Site: same-origin. n8n is called exactly for the
// cells answered 200.
func TestGuardCSRFMatrixAtChatRoute(t *testing.T) {
	n8n := newGrN8n(t)
	cp := grProxy(t, n8n.URL, nil)
	c := grCreate(t, cp, "198.51.100.80", nil)
	origins := []struct{ name, value string }{
		{"allowed", allowedOrigin}, {"allowed wildcard", "https://blog.example.org"}, {"denied", "https://evil.example.net"},
		{"look-alike", "https://shop.example.com.evil.net"}, {"null", "null"}, {"absent", ""},
	}
	cell := 0
	for _, o := range origins {
		for _, auth := range []string{"cookie", "bearer"} {
			for _, sfs := range []string{"same-origin", "same-site", "cross-site", "none", ""} {
				cell++
				var wantCode int
				var wantErr string
				switch {
				case o.name == "allowed":
					wantCode = 200
				case o.name == "allowed wildcard":
					// Allowed, but not the origin the session was created from.
					wantCode, wantErr = 403, "origin_mismatch"
				case o.value != "":
					wantCode, wantErr = 403, "origin_not_allowed"
				case auth == "bearer" || sfs == "same-origin":
					wantCode = 200
				default:
					wantCode, wantErr = 403, "csrf_refused"
				}
				name := fmt.Sprintf("origin %s, %s, Sec-Fetch-Site %q", o.name, auth, sfs)
				h := map[string]string{"Accept": "application/json", "Origin": o.value, "Sec-Fetch-Site": sfs}
				if auth == "cookie" {
					h["Cookie"] = "chat_session=" + c.Token
				} else {
					h["Authorization"] = "Bearer " + c.Token
				}
				before := n8n.count()
				rec := grServe(t, cp, grReq{method: "POST", path: "/api/v1/chat/message", ip: "198.51.100.80", headers: h,
					body: fmt.Sprintf(`{"message":"cell %d: where is my parcel?"}`, cell)})
				calls := n8n.count() - before
				if rec.Code != wantCode {
					t.Errorf("%s: %d, want %d; %s", name, rec.Code, wantCode, rec.Body)
					continue
				}
				if wantCode == 200 {
					if calls != 1 || !strings.Contains(rec.Body.String(), `"response":"ok"`) {
						t.Errorf("%s: n8n called %d times, body %s", name, calls, rec.Body)
					}
					continue
				}
				if calls != 0 {
					t.Errorf("%s: refused, but n8n was called %d times", name, calls)
				}
				var e apiErr
				if err := json.Unmarshal(rec.Body.Bytes(), &e); err != nil || e.Error != wantErr {
					t.Errorf("%s: body %s, want error %s", name, rec.Body, wantErr)
				}
			}
		}
	}

	// The GET stream (EventSource, cookie only) follows the same rule.
	for _, tc := range []struct {
		origin, sfs string
		want        int
	}{
		{"", "same-origin", 200}, {allowedOrigin, "cross-site", 200}, {"", "cross-site", 403},
		{"", "same-site", 403}, {"", "", 403}, {"https://evil.example.net", "same-origin", 403},
	} {
		before := n8n.count()
		rec := grServe(t, cp, grReq{method: "GET", path: "/api/v1/chat/stream?message=" + url.QueryEscape("stream question "+tc.origin+tc.sfs),
			ip: "198.51.100.80", headers: map[string]string{"Cookie": "chat_session=" + c.Token, "Origin": tc.origin, "Sec-Fetch-Site": tc.sfs}})
		if rec.Code != tc.want {
			t.Errorf("GET stream, Origin %q, Sec-Fetch-Site %q: %d, want %d; %s", tc.origin, tc.sfs, rec.Code, tc.want, rec.Body)
			continue
		}
		wantCalls := 0
		if tc.want == 200 {
			wantCalls = 1
			if ct := rec.Header().Get("Content-Type"); ct != "text/event-stream" || !strings.Contains(rec.Body.String(), `"content":"ok"`) ||
				!strings.HasSuffix(rec.Body.String(), "data: [DONE]\n\n") {
				t.Errorf("GET stream, Origin %q, Sec-Fetch-Site %q: %s %q", tc.origin, tc.sfs, ct, rec.Body)
			}
		}
		if got := n8n.count() - before; got != wantCalls {
			t.Errorf("GET stream, Origin %q, Sec-Fetch-Site %q: n8n called %d times, want %d", tc.origin, tc.sfs, got, wantCalls)
		}
	}
}

// JSON routes refuse bodies an HTML form can send (text/plain, urlencoded,
// multipart) with 415, before anything else happens.
func TestGuardJSONRoutesRefuseFormBodies(t *testing.T) {
	n8n := newGrN8n(t)
	cp := grProxy(t, n8n.URL, nil)
	c := grCreate(t, cp, "198.51.100.90", nil)
	multipart := "--XyZ\r\nContent-Disposition: form-data; name=\"message\"\r\n\r\nhi\r\n--XyZ--\r\n"
	for _, route := range []struct {
		path, json string
	}{
		{"/api/v1/session/create", `{"page_url":"https://shop.example.com/"}`},
		{"/api/v1/chat/message", `{"message":"hi"}`},
		{"/api/v1/chat/stream", `{"message":"hi"}`},
		{"/api/v1/n8n/chat", `{"action":"sendMessage","sessionId":"widget-form-body-1","chatInput":"hi"}`},
	} {
		for _, body := range []struct{ contentType, body string }{
			{"text/plain", route.json},
			{"text/plain;charset=UTF-8", route.json},
			{"application/x-www-form-urlencoded", "message=hi&chatInput=hi"},
			{"multipart/form-data; boundary=XyZ", multipart},
			{"application/json; charset=iso-8859-1", route.json},
			{"", route.json},
		} {
			rec := grServe(t, cp, grReq{method: "POST", path: route.path, ip: "198.51.100.90", body: body.body,
				headers: map[string]string{"Origin": allowedOrigin, "Authorization": "Bearer " + c.Token, "Content-Type": body.contentType}})
			if rec.Code != http.StatusUnsupportedMediaType {
				t.Errorf("%s with %q: %d %s, want 415", route.path, body.contentType, rec.Code, rec.Body)
				continue
			}
			var e apiErr
			if err := json.Unmarshal(rec.Body.Bytes(), &e); err != nil || e.Error != "unsupported_media_type" || e.Message == "" {
				t.Errorf("%s with %q: body %s", route.path, body.contentType, rec.Body)
			}
		}
	}
	if n := n8n.count(); n != 0 {
		t.Fatalf("n8n was called %d times", n)
	}
	if st, err := cp.handlerStore().Stats(t.Context()); err != nil || st.Sessions != 1 || st.Messages != 0 {
		t.Fatalf("store = %+v, %v; want only the one session and no message", st, err)
	}
}

// Input validation at the routes: each refusal is 400 with a message that
// names the field, and n8n is never called for one.
func TestGuardInputValidationAtRoutes(t *testing.T) {
	n8n := newGrN8n(t)
	cp := grProxy(t, n8n.URL, func(c *envConfig) { c.MaxMessageLength = 20 })
	c := grCreate(t, cp, "198.51.100.100", nil)
	auth := map[string]string{"Authorization": "Bearer " + c.Token, "Accept": "application/json"}
	manyKeys := make([]string, 65)
	for i := range manyKeys {
		manyKeys[i] = fmt.Sprintf(`"k%d":%d`, i, i)
	}
	tooManyKeys := "{" + strings.Join(manyKeys, ",") + "}"
	const tooDeep = `{"a":{"b":{"c":{"d":{}}}}}`
	widget := func(sessionID, chatInput, metadata string) string {
		b, _ := json.Marshal(map[string]any{"action": "sendMessage", "sessionId": sessionID, "chatInput": chatInput, "metadata": json.RawMessage(metadata)})
		return string(b)
	}
	for _, tc := range []struct {
		name, method, path, body string
		code                     string // error code
		message                  string // the whole error message
	}{
		{"message too long", "POST", "/api/v1/chat/message", `{"message":"123456789012345678901"}`,
			"invalid_request", "message must be at most 20 characters (got 21)"},
		{"message too long in runes", "POST", "/api/v1/chat/message", `{"message":"` + strings.Repeat("я", 21) + `"}`,
			"invalid_request", "message must be at most 20 characters (got 21)"},
		{"empty message", "POST", "/api/v1/chat/message", `{"message":" \n\t "}`,
			"invalid_request", "message must not be empty"},
		{"missing message", "POST", "/api/v1/chat/message", `{}`,
			"invalid_request", "message must not be empty"},
		{"NUL", "POST", "/api/v1/chat/message", `{"message":"a\u0000b"}`,
			"invalid_request", "message contains a control character (U+0000 at byte 1)"},
		{"BEL", "POST", "/api/v1/chat/message", `{"message":"ab\u0007"}`,
			"invalid_request", "message contains a control character (U+0007 at byte 2)"},
		{"ESC", "POST", "/api/v1/chat/stream", `{"message":"\u001b[31mred"}`,
			"invalid_request", "message contains a control character (U+001B at byte 0)"},
		{"DEL", "POST", "/api/v1/chat/message", `{"message":"a\u007f"}`,
			"invalid_request", "message contains a control character (U+007F at byte 1)"},
		{"C1 control", "POST", "/api/v1/chat/message", `{"message":"a\u0085b"}`,
			"invalid_request", "message contains a control character (U+0085 at byte 1)"},
		{"invalid UTF-8 in the body", "POST", "/api/v1/chat/message", "{\"message\":\"caf\xe9\"}",
			"invalid_json", "the request body is not valid UTF-8"},
		{"invalid UTF-8 in the GET stream's query", "GET", "/api/v1/chat/stream?message=caf%E9", "",
			"invalid_request", "message is not valid UTF-8"},
		{"control character in the GET stream's query", "GET", "/api/v1/chat/stream?message=a%00b", "",
			"invalid_request", "message contains a control character (U+0000 at byte 1)"},
		{"message of the wrong type", "POST", "/api/v1/chat/message", `{"message":42}`,
			"invalid_request", `field "message" has the wrong type`},
		{"context too deep", "POST", "/api/v1/chat/message", `{"message":"hi","context":` + tooDeep + `}`,
			"invalid_request", "context must not nest deeper than 4 levels"},
		{"context with too many keys", "POST", "/api/v1/chat/message", `{"message":"hi","context":` + tooManyKeys + `}`,
			"invalid_request", "context must have at most 64 keys in all"},
		{"context not an object", "POST", "/api/v1/chat/message", `{"message":"hi","context":[1,2]}`,
			"invalid_request", "context must be a JSON object"},
		{"context with NUL", "POST", "/api/v1/chat/message", `{"message":"hi","context":{"a":"x\u0000"}}`,
			"invalid_request", `context contains a NUL character (\u0000)`},
		{"page_url javascript", "POST", "/api/v1/chat/message", `{"message":"hi","page_url":"javascript:alert(1)"}`,
			"invalid_request", "page_url must be an http or https URL"},
		{"page_url ftp", "POST", "/api/v1/chat/message", `{"message":"hi","page_url":"ftp://shop.example.com/p/1"}`,
			"invalid_request", "page_url must be an http or https URL"},
		{"page_url relative", "POST", "/api/v1/chat/message", `{"message":"hi","page_url":"/p/1"}`,
			"invalid_request", "page_url must be an http or https URL"},
		{"page_url with user info", "POST", "/api/v1/chat/message", `{"message":"hi","page_url":"https://u:pw@shop.example.com/"}`,
			"invalid_request", "page_url must not contain user info"},
		{"page_url too long", "POST", "/api/v1/chat/message", `{"message":"hi","page_url":"https://shop.example.com/` + strings.Repeat("a", 2030) + `"}`,
			"invalid_request", "page_url must be at most 2048 bytes (got 2055)"},
		{"create: page_url javascript", "POST", "/api/v1/session/create", `{"page_url":"javascript:alert(1)"}`,
			"invalid_request", "page_url must be an http or https URL"},
		{"create: metadata too deep", "POST", "/api/v1/session/create", `{"metadata":` + tooDeep + `}`,
			"invalid_request", "metadata must not nest deeper than 4 levels"},
		{"create: metadata with too many keys", "POST", "/api/v1/session/create", `{"metadata":` + tooManyKeys + `}`,
			"invalid_request", "metadata must have at most 64 keys in all"},
		{"widget: chatInput too long", "POST", "/api/v1/n8n/chat", widget("widget-validation-1", strings.Repeat("x", 21), "null"),
			"invalid_request", "chatInput must be at most 20 characters (got 21)"},
		{"widget: chatInput with NUL", "POST", "/api/v1/n8n/chat", widget("widget-validation-1", "a\x00", "null"),
			"invalid_request", "chatInput contains a control character (U+0000 at byte 1)"},
		{"widget: metadata too deep", "POST", "/api/v1/n8n/chat", widget("widget-validation-1", "hi", tooDeep),
			"invalid_request", "metadata must not nest deeper than 4 levels"},
		{"widget: sessionId too short", "POST", "/api/v1/n8n/chat", widget("short", "hi", "null"),
			"invalid_request", "sessionId must be 8 to 128 characters of A-Z, a-z, 0-9, _ and -"},
		{"widget: sessionId with a slash", "POST", "/api/v1/n8n/chat", widget("../../etc/passwd", "hi", "null"),
			"invalid_request", "sessionId must be 8 to 128 characters of A-Z, a-z, 0-9, _ and -"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			before := n8n.count()
			rec := grServe(t, cp, grReq{method: tc.method, path: tc.path, body: tc.body, ip: "198.51.100.100", headers: auth})
			if rec.Code != http.StatusBadRequest {
				t.Fatalf("%d %s, want 400", rec.Code, rec.Body)
			}
			var e apiErr
			if err := json.Unmarshal(rec.Body.Bytes(), &e); err != nil || e.Error != tc.code || e.Message != tc.message {
				t.Fatalf("body %s, want error %q message %q", rec.Body, tc.code, tc.message)
			}
			if n8n.count() != before {
				t.Fatal("n8n was called")
			}
		})
	}

	// The limits are inclusive and count characters, not bytes; tabs and
	// newlines are kept, CR LF becomes LF, surrounding space is trimmed.
	for _, tc := range []struct{ sent, forwarded string }{
		{strings.Repeat("я", 20), strings.Repeat("я", 20)},
		{"12345678901234567890", "12345678901234567890"},
		{"  a\tb\r\nc\rd  ", "a\tb\nc\nd"},
	} {
		grWantReply(t, grChat(t, cp, c.Token, tc.sent, "198.51.100.100"))
		if got := n8n.last(t); got.ChatInput != tc.forwarded || got.Message != tc.forwarded {
			t.Fatalf("sent %q: n8n got chatInput %q message %q, want %q", tc.sent, got.ChatInput, got.Message, tc.forwarded)
		}
	}
	// Nothing of a refused request was stored. (A refused message on the
	// widget route still creates its widget session: the route sets the
	// session up before it checks chatInput.)
	if st, err := cp.handlerStore().Stats(t.Context()); err != nil || st.Messages != 6 {
		t.Fatalf("store = %+v, %v; want the 3 accepted exchanges only (6 messages)", st, err)
	}
}

// grMustPass are messages real visitors send; none may be refused or
// altered (no keyword lists, no HTML escaping).
var grMustPass = []string{
	"hi",
	"hello",
	"Can I update my order?",
	"select a size",
	"DROP me a line",
	"Здравствуйте! Где мой заказ №1234?",
	"你好，我想退货。",
	"مرحبا، هل يمكنني تغيير عنوان الشحن؟",
	"Thanks!! 🎉👍🏽 ❤️",
	"My code fails:\n<script>alert('x')</script>\nSELECT * FROM orders WHERE id = '1' OR '1'='1'; DROP TABLE orders; --\n\tif (a < b && c > d) { return \"ok\"; }",
	"Is this the right page? https://shop.example.com/p/1?size=m&colour=red",
	"hi",
}

// The must-pass corpus, with the default bot_detection and limits and a
// browser's User-Agent, reaches n8n verbatim through all three chat
// routes, and is stored verbatim.
func TestGuardMustPassCorpusReachesN8nVerbatim(t *testing.T) {
	n8n := newGrN8n(t)
	cp := grProxy(t, n8n.URL, func(c *envConfig) { c.Limits, c.Bots = guard.DefaultLimits(), true })

	c := grCreate(t, cp, "198.51.100.110", nil)
	for _, msg := range grMustPass {
		grWantReply(t, grChat(t, cp, c.Token, msg, "198.51.100.110"))
		if got := n8n.last(t); got.ChatInput != msg || got.Message != msg || got.Session.SessionID != c.SessionID {
			t.Fatalf("JSON route: sent %q, n8n got chatInput %q message %q", msg, got.ChatInput, got.Message)
		}
	}
	rec := grServe(t, cp, grReq{method: "GET", path: "/api/v1/chat/history?limit=200", ip: "198.51.100.110", headers: bearer(c.Token)})
	var hist historyBody
	if err := json.Unmarshal(rec.Body.Bytes(), &hist); err != nil || rec.Code != 200 {
		t.Fatalf("history: %d %s", rec.Code, rec.Body)
	}
	var stored []string
	for _, m := range hist.Messages {
		if m.Role == "user" {
			stored = append(stored, m.Content)
		}
	}
	if !slices.Equal(stored, grMustPass) {
		t.Fatalf("stored user messages differ from what was sent:\n got  %q\n want %q", stored, grMustPass)
	}

	s := grCreate(t, cp, "198.51.100.111", nil)
	for _, msg := range grMustPass {
		b, _ := json.Marshal(map[string]string{"message": msg})
		rec := grServe(t, cp, grReq{method: "POST", path: "/api/v1/chat/stream", ip: "198.51.100.111", body: string(b),
			headers: map[string]string{"Authorization": "Bearer " + s.Token, "Origin": allowedOrigin}})
		if rec.Code != 200 || !strings.Contains(rec.Body.String(), `"content":"ok"`) {
			t.Fatalf("SSE route, %q: %d %s", msg, rec.Code, rec.Body)
		}
		if got := n8n.last(t); got.ChatInput != msg {
			t.Fatalf("SSE route: sent %q, n8n got %q", msg, got.ChatInput)
		}
	}

	for _, msg := range grMustPass {
		b, _ := json.Marshal(map[string]string{"action": "sendMessage", "sessionId": "must-pass-widget-1", "chatInput": msg})
		rec := grServe(t, cp, grReq{method: "POST", path: "/api/v1/n8n/chat", ip: "198.51.100.112", body: string(b),
			headers: map[string]string{"Origin": allowedOrigin}})
		if rec.Code != 200 || rec.Body.String() != "{\"output\":\"ok\"}\n" {
			t.Fatalf("widget route, %q: %d %s", msg, rec.Code, rec.Body)
		}
		if got := n8n.last(t); got.ChatInput != msg {
			t.Fatalf("widget route: sent %q, n8n got %q", msg, got.ChatInput)
		}
	}
	if got, want := n8n.count(), 3*len(grMustPass); got != want {
		t.Fatalf("n8n calls = %d, want %d", got, want)
	}
}

// The bot corpus is refused with 403 {"error":"rejected"} and n8n is not
// called; the honeypot gets a normal-looking answer, without n8n; an API
// client with a plain message is not a bot.
func TestGuardBotCorpusRefused(t *testing.T) {
	n8n := newGrN8n(t)
	cp := grProxy(t, n8n.URL, func(c *envConfig) { c.Bots = true })
	links := func(n int) string {
		var b strings.Builder
		b.WriteString("great deals")
		for i := range n {
			fmt.Fprintf(&b, " https://cheap-watches-%d.example.net/buy", i)
		}
		return b.String()
	}
	// session creates a session from a client with User-Agent ua; send
	// posts one message in it with ua.
	session := func(ip, ua string) created {
		return grCreate(t, cp, ip, map[string]string{"User-Agent": ua})
	}
	send := func(c created, ip, ua, body string) *httptest.ResponseRecorder {
		return grServe(t, cp, grReq{method: "POST", path: "/api/v1/chat/message", ip: ip, body: body,
			headers: map[string]string{"Authorization": "Bearer " + c.Token, "Accept": "application/json", "User-Agent": ua}})
	}
	msg := func(m string) string {
		b, _ := json.Marshal(map[string]string{"message": m})
		return string(b)
	}
	wantRejected := func(name string, rec *httptest.ResponseRecorder) {
		t.Helper()
		var e apiErr
		if rec.Code != 403 || json.Unmarshal(rec.Body.Bytes(), &e) != nil || e.Error != "rejected" {
			t.Fatalf("%s: %d %s, want 403 rejected", name, rec.Code, rec.Body)
		}
	}

	const curl = "curl/8.5.0"
	c := session("198.51.100.120", curl)
	wantRejected("curl with 4 links", send(c, "198.51.100.120", curl, msg(links(4))))
	wantRejected("10 links from a browser", send(grCreate(t, cp, "198.51.100.121", nil), "198.51.100.121", grBrowserUA, msg(links(10))))
	wantRejected("10 links on the widget route", grServe(t, cp, grReq{method: "POST", path: "/api/v1/n8n/chat", ip: "198.51.100.122",
		body: `{"action":"sendMessage","sessionId":"bot-widget-0001","chatInput":` + strconv.Quote(links(10)) + `}`}))
	wantRejected("10 links on the GET stream", grServe(t, cp, grReq{method: "GET", path: "/api/v1/chat/stream?message=" + url.QueryEscape(links(10)),
		ip: "198.51.100.121", headers: bearer(grCreate(t, cp, "198.51.100.121", nil).Token)}))
	if n := n8n.count(); n != 0 {
		t.Fatalf("n8n called %d times for bots", n)
	}

	// The same text again and again from an automation client: the
	// repeats add up until the message is refused (30 points for the
	// user agent, +10 per repeat beyond the second, refused above 50).
	const py = "python-requests/2.31.0"
	r := session("198.51.100.123", py)
	var got []int
	for range 6 {
		got = append(got, send(r, "198.51.100.123", py, msg("BUY CHEAP WATCHES NOW")).Code)
	}
	if !slices.Equal(got, []int{200, 200, 200, 200, 403, 403}) {
		t.Fatalf("repeated message from %s: statuses %v, want 4 × 200 then 403", py, got)
	}
	if n := n8n.count(); n != 4 {
		t.Fatalf("n8n calls = %d, want 4", n)
	}

	// Not bots: an API client saying hi (even as its first message, right
	// after creating the session), and a person repeating a word.
	grWantReply(t, send(session("198.51.100.124", curl), "198.51.100.124", curl, msg("hi")))
	p := grCreate(t, cp, "198.51.100.125", nil)
	for range 2 {
		grWantReply(t, send(p, "198.51.100.125", grBrowserUA, msg("hello?")))
	}
	calls := n8n.count()

	// The honeypot: a normal-looking 200, n8n not called, nothing stored.
	h := grCreate(t, cp, "198.51.100.126", nil)
	rec := send(h, "198.51.100.126", grBrowserUA, `{"message":"hello","website":"https://spam.example.net"}`)
	var reply struct {
		Response  string `json:"response"`
		SessionID string `json:"session_id"`
		MessageID string `json:"message_id"`
	}
	if rec.Code != 200 || json.Unmarshal(rec.Body.Bytes(), &reply) != nil || reply.Response == "" || reply.SessionID != h.SessionID || reply.MessageID == "" {
		t.Fatalf("honeypot (JSON): %d %s", rec.Code, rec.Body)
	}
	rec = grServe(t, cp, grReq{method: "POST", path: "/api/v1/chat/stream", ip: "198.51.100.126", headers: bearer(h.Token),
		body: `{"message":"hello","website":"x"}`})
	if rec.Code != 200 || rec.Header().Get("Content-Type") != "text/event-stream" || rec.Header().Get("X-Message-ID") == "" ||
		!strings.Contains(rec.Body.String(), `{"type":"item","content":`) || !strings.HasSuffix(rec.Body.String(), "data: [DONE]\n\n") {
		t.Fatalf("honeypot (SSE): %d %v %q", rec.Code, rec.Header(), rec.Body)
	}
	if n := n8n.count(); n != calls {
		t.Fatalf("the honeypot called n8n (%d → %d)", calls, n)
	}
	hist := grServe(t, cp, grReq{method: "GET", path: "/api/v1/chat/history", ip: "198.51.100.126", headers: bearer(h.Token)})
	if hist.Code != 200 || !strings.Contains(hist.Body.String(), `"total_count":0`) {
		t.Fatalf("honeypot messages were stored: %s", hist.Body)
	}

	// bot_detection off lets the same link flood through.
	off := grProxy(t, n8n.URL, func(c *envConfig) { c.Bots = false })
	grWantReply(t, grChatNew(t, off, links(10)))
}

// grChatNew posts one message in a new session of cp with a browser's agent.
func grChatNew(t *testing.T, cp *grHandler, message string) *httptest.ResponseRecorder {
	t.Helper()
	c := grCreate(t, cp, "198.51.100.127", nil)
	return grChat(t, cp, c.Token, message, "198.51.100.127")
}

// A token used with another User-Agent and Accept-Language (a browser
// update, a language switch) still works: the fingerprint mismatch only
// adds risk, it never logs the visitor out nor refuses alone, even at the
// strictest threshold.
func TestGuardFingerprintMismatchKeepsTheSession(t *testing.T) {
	n8n := newGrN8n(t)
	for _, threshold := range []string{"", "1"} {
		cp := grProxy(t, n8n.URL, func(c *envConfig) { c.Bots, c.BotThreshold = botDetection(t, threshold) })
		c := grCreate(t, cp, "198.51.100.130", map[string]string{"Accept-Language": "en-GB,en;q=0.9"})
		other := map[string]string{
			"User-Agent":      "Mozilla/5.0 (Macintosh; Intel Mac OS X 14_5) AppleWebKit/605.1.15 (KHTML, like Gecko) Version/17.5 Safari/605.1.15",
			"Accept-Language": "de-DE,de;q=0.9",
		}
		before := n8n.count()
		for _, h := range []map[string]string{
			{"Authorization": "Bearer " + c.Token},
			{"Cookie": "chat_session=" + c.Token, "Origin": allowedOrigin},
		} {
			h["Accept"] = "application/json"
			for k, v := range other {
				h[k] = v
			}
			grWantReply(t, grServe(t, cp, grReq{method: "POST", path: "/api/v1/chat/message", ip: "203.0.113.99", headers: h,
				body: `{"message":"Can I change the delivery address?"}`}))
		}
		if got := n8n.count() - before; got != 2 {
			t.Fatalf("bot_detection %q: n8n calls %d, want 2", threshold, got)
		}
		if got := n8n.last(t).Session.UserAgent; got != other["User-Agent"] {
			t.Fatalf("n8n got user_agent %q", got)
		}
		rec := grServe(t, cp, grReq{method: "GET", path: "/api/v1/session/validate", ip: "203.0.113.99", headers: bearer(c.Token)})
		if rec.Code != 200 {
			t.Fatalf("validate after the mismatch: %d %s", rec.Code, rec.Body)
		}
	}
}
