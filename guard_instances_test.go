package chatproxy

// The guard across provisioned modules (issue 4): two instances sharing
// one budget through Redis, and a Redis outage; the route-level guard
// tests are in handler/guard_routes_test.go. Redis tests isolate
// their budgets in the shared Redis with a jwt_secret of their own (the
// limiter's key names are hashed with a key derived from it) and client
// IPs of their own.

import (
	"crypto/rand"
	"encoding/hex"
	"encoding/json"
	"fmt"
	"io"
	"maps"
	"net"
	"net/http"
	"net/http/httptest"
	"net/url"
	"slices"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/chatproxy/caddy-chatproxy/guard"
	"github.com/chatproxy/caddy-chatproxy/internal/testenv"
	"github.com/chatproxy/caddy-chatproxy/internal/testkit"
)

// grBrowserUA is an ordinary browser's User-Agent, so that the bot filter
// sees a person unless a test says otherwise.
const grBrowserUA = "Mozilla/5.0 (X11; Linux x86_64; rv:128.0) Gecko/20100101 Firefox/128.0"

// grSecret is a jwt_secret unique to one test run.
func grSecret() string {
	b := make([]byte, 16)
	_, _ = rand.Read(b)
	return "guard-routes-jwt-" + hex.EncodeToString(b)
}

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

// grProxy provisions a chat_proxy on a fresh embedded store with a
// jwt_secret of its own, generous limits unless mutate sets others, and
// n8n at n8nURL when given.
func grProxy(t *testing.T, n8nURL string, mutate func(*ChatProxy)) *ChatProxy {
	t.Helper()
	return newTestProxy(t, "sqlite", func(cp *ChatProxy) {
		cp.JWTSecret = grSecret()
		if n8nURL != "" {
			cp.N8nWebhook = n8nURL
		}
		if mutate != nil {
			mutate(cp)
		}
	})
}

// limits returns generous limits with the given tiers replaced.
func grLimits(tiers map[string][]string) map[string][]guard.Rate {
	l := generousLimits()
	for k, v := range testRates(tiers) {
		l[k] = v
	}
	return l
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
func grDo(cp *ChatProxy, rq grReq) (*httptest.ResponseRecorder, error) {
	ip := rq.ip
	if ip == "" {
		ip = "198.51.100.1"
	}
	headers := map[string]string{"User-Agent": grBrowserUA}
	maps.Copy(headers, rq.headers)
	return testkit.Serve(cp, testkit.Request{Method: rq.method, Path: rq.path, Body: rq.body, ClientIP: ip, Headers: headers}, passedOn)
}

func grServe(t *testing.T, cp *ChatProxy, rq grReq) *httptest.ResponseRecorder {
	t.Helper()
	rec, err := grDo(cp, rq)
	if err != nil {
		t.Fatal(err)
	}
	return rec
}

// grCreate creates a session from ip with the allowed Origin, and extra
// headers.
func grCreate(t *testing.T, cp *ChatProxy, ip string, headers map[string]string) created {
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
func grChat(t *testing.T, cp *ChatProxy, token, message, ip string) *httptest.ResponseRecorder {
	t.Helper()
	b, _ := json.Marshal(map[string]string{"message": message})
	return grServe(t, cp, grReq{method: "POST", path: "/api/v1/chat/message", ip: ip, body: string(b),
		headers: map[string]string{"Authorization": "Bearer " + token, "Accept": "application/json"}})
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

// Two chat_proxy instances on one Redis (same redis URL and jwt_secret, as
// every instance of a site is configured) enforce one budget; without
// Redis each instance has its own, so a deployment of N instances without
// Redis lets N times the configured rate through. That is why production
// with several instances needs `redis`.
func TestGuardTwoInstancesShareOneBudget(t *testing.T) {
	for _, tc := range []struct {
		name        string
		redis       func(t *testing.T) (string, string) // the two instances' redis options
		wantCreate  int                                 // of 30 creations at 10/1m
		wantMessage int                                 // of 12 messages at 4/1m
	}{
		{"redis, same URL", func(t *testing.T) (string, string) {
			u := testenv.RedisURL(t)
			return u, u
		}, 10, 4},
		{"redis, separate clients", func(t *testing.T) (string, string) {
			// A second spelling of the URL gets its own client and
			// connections, as a second Caddy process would.
			u := testenv.RedisURL(t)
			sep := "?"
			if strings.Contains(u, "?") {
				sep = "&"
			}
			return u, u + sep + "client_name=chatproxy-second-instance"
		}, 10, 4},
		{"in process", func(*testing.T) (string, string) { return "", "" }, 20, 8},
	} {
		t.Run(tc.name, func(t *testing.T) {
			n8n := newGrN8n(t)
			secret, db := grSecret(), "sqlite:"+t.TempDir()+"/shared.db"
			ua, ub := tc.redis(t)
			instance := func(redisURL string) *ChatProxy {
				return grProxy(t, n8n.URL, func(cp *ChatProxy) {
					cp.JWTSecret, cp.Database, cp.Redis = secret, db, redisURL
					if redisURL != "" {
						cp.redisTimeout = 5 * time.Second
					}
					cp.RateLimits = grLimits(map[string][]string{"create": {"10/1m"}, "session": {"4/1m"}})
				})
			}
			a, b := instance(ua), instance(ub)

			var created [2]int
			for i := range 30 {
				cp := []*ChatProxy{a, b}[i%2]
				rec := grServe(t, cp, grReq{method: "POST", path: "/api/v1/session/create", ip: "198.51.100.60"})
				switch rec.Code {
				case 201:
					created[i%2]++
				case 429:
					grRateLimited(t, rec, "create", 10)
				default:
					t.Fatalf("creation %d: %d %s", i, rec.Code, rec.Body)
				}
			}
			t.Logf("%s: 30 alternating creations at 10/1m → %d allowed (%d on A, %d on B)", tc.name, created[0]+created[1], created[0], created[1])
			if created[0]+created[1] != tc.wantCreate {
				t.Fatalf("allowed creations = %d (%d on A, %d on B), want %d", created[0]+created[1], created[0], created[1], tc.wantCreate)
			}

			// One conversation, its messages alternating between the
			// instances: the session tier is shared the same way.
			c := grCreate(t, a, "198.51.100.61", nil)
			sent := 0
			for i := range 12 {
				cp := []*ChatProxy{a, b}[i%2]
				rec := grChat(t, cp, c.Token, fmt.Sprintf("message number %d", i), "198.51.100.61")
				switch rec.Code {
				case 200:
					sent++
				case 429:
					grRateLimited(t, rec, "session", 4)
				default:
					t.Fatalf("message %d: %d %s", i, rec.Code, rec.Body)
				}
			}
			if sent != tc.wantMessage || n8n.count() != tc.wantMessage {
				t.Fatalf("messages allowed %d, n8n calls %d; want %d", sent, n8n.count(), tc.wantMessage)
			}
		})
	}
}

// grTCPProxy forwards TCP connections to a target; stop closes the
// listener and every connection (Redis becomes unreachable), start listens
// again on the same address.
type grTCPProxy struct {
	target string
	addr   string
	mu     sync.Mutex
	ln     net.Listener
	conns  map[net.Conn]bool
	wg     sync.WaitGroup
}

func (p *grTCPProxy) start() error {
	addr := p.addr
	if addr == "" {
		addr = "127.0.0.1:0"
	}
	var ln net.Listener
	var err error
	for deadline := time.Now().Add(5 * time.Second); ; {
		if ln, err = net.Listen("tcp", addr); err == nil || time.Now().After(deadline) {
			break
		}
		time.Sleep(20 * time.Millisecond)
	}
	if err != nil {
		return err
	}
	p.mu.Lock()
	p.ln, p.addr = ln, ln.Addr().String()
	if p.conns == nil {
		p.conns = make(map[net.Conn]bool)
	}
	p.mu.Unlock()
	p.wg.Go(func() {
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			up, err := net.DialTimeout("tcp", p.target, time.Second)
			if err != nil {
				_ = c.Close()
				continue
			}
			p.mu.Lock()
			p.conns[c], p.conns[up] = true, true
			p.mu.Unlock()
			pipe := func(dst, src net.Conn) {
				_, _ = io.Copy(dst, src)
				_ = dst.Close()
				_ = src.Close()
			}
			p.wg.Go(func() { pipe(up, c) })
			p.wg.Go(func() { pipe(c, up) })
		}
	})
	return nil
}

func (p *grTCPProxy) stop() {
	p.mu.Lock()
	if p.ln != nil {
		_ = p.ln.Close()
	}
	for c := range p.conns {
		_ = c.Close()
	}
	clear(p.conns)
	p.mu.Unlock()
	p.wg.Wait()
}

type grHealth struct {
	Status string `json:"status"`
	Checks map[string]struct {
		Status string `json:"status"`
	} `json:"checks"`
}

func grHealthOf(t *testing.T, cp *ChatProxy) (int, grHealth) {
	t.Helper()
	rec := grServe(t, cp, grReq{method: "GET", path: "/health"})
	var h grHealth
	if err := json.Unmarshal(rec.Body.Bytes(), &h); err != nil {
		t.Fatalf("health body %s: %v", rec.Body, err)
	}
	return rec.Code, h
}

// Redis made unreachable mid-test (a TCP proxy in front of it, closed):
// requests are still limited, in process; /health says degraded; when Redis
// is back the limiter uses it again and the budget is shared again.
func TestGuardRedisOutageFallsBackAndRecovers(t *testing.T) {
	real, err := url.Parse(testenv.RedisURL(t))
	if err != nil {
		t.Fatal(err)
	}
	target := real.Host
	if real.Port() == "" {
		target = net.JoinHostPort(real.Hostname(), "6379")
	}
	proxy := &grTCPProxy{target: target}
	if err := proxy.start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(proxy.stop)
	viaProxy := *real
	viaProxy.Host = proxy.addr
	secret := grSecret()
	instance := func() *ChatProxy {
		return grProxy(t, "", func(cp *ChatProxy) {
			cp.JWTSecret, cp.Redis = secret, viaProxy.String()
			cp.RateLimits = grLimits(map[string][]string{"create": {"3/1m"}})
		})
	}
	a, b := instance(), instance()
	both := []*ChatProxy{a, b}

	wantHealth := func(cp *ChatProxy, status, redis string) {
		t.Helper()
		code, h := grHealthOf(t, cp)
		if code != 200 || h.Status != status || h.Checks["redis"].Status != redis || h.Checks["database"].Status != "ok" {
			t.Fatalf("health = %d %+v, want 200 %s with redis %s", code, h, status, redis)
		}
	}
	// alternate sends n creations from ip to A and B in turn and returns
	// how many were allowed.
	alternate := func(ip string, n int, on []*ChatProxy) int {
		t.Helper()
		allowed := 0
		for i := range n {
			rec := grServe(t, on[i%len(on)], grReq{method: "POST", path: "/api/v1/session/create", ip: ip})
			switch rec.Code {
			case 201:
				allowed++
			case 429:
				grRateLimited(t, rec, "create", 3)
			default:
				t.Fatalf("creation: %d %s", rec.Code, rec.Body)
			}
		}
		return allowed
	}

	for _, cp := range both {
		wantHealth(cp, "ok", "ok")
	}
	if got := alternate("198.51.100.70", 8, both); got != 3 {
		t.Fatalf("through Redis: %d of 8 alternating creations allowed, want 3 (one shared budget)", got)
	}

	proxy.stop()
	startOutage := time.Now()
	rec := grServe(t, a, grReq{method: "POST", path: "/api/v1/session/create", ip: "198.51.100.71"})
	firstLatency := time.Since(startOutage)
	if rec.Code != 201 {
		t.Fatalf("first request with Redis down: %d %s", rec.Code, rec.Body)
	}
	if firstLatency > time.Second {
		t.Fatalf("the first request with Redis down took %v; the limiter should give up on Redis within its 250ms timeout", firstLatency)
	}
	// Limits go on in process: A allows the rest of its 3, then refuses;
	// B, with its own in-process state, allows its own 3.
	if got := 1 + alternate("198.51.100.71", 5, []*ChatProxy{a}); got != 3 {
		t.Fatalf("instance A during the outage: %d allowed, want 3", got)
	}
	if got := alternate("198.51.100.71", 6, []*ChatProxy{b}); got != 3 {
		t.Fatalf("instance B during the outage: %d allowed, want 3 (its own in-process budget)", got)
	}
	var healthLatency time.Duration
	for _, cp := range both {
		start := time.Now()
		code, h := grHealthOf(t, cp)
		healthLatency = max(healthLatency, time.Since(start))
		if r := h.Checks["redis"].Status; code != 200 || h.Status != "degraded" || r != "down" && r != "degraded" {
			t.Fatalf("health during the outage = %d %+v, want 200 degraded with redis down", code, h)
		}
	}
	// /health bounds each check (2 s), so it answers even while Redis
	// does not.
	if healthLatency > 3*time.Second {
		t.Fatalf("/health took %v during the outage", healthLatency)
	}

	if err := proxy.start(); err != nil {
		t.Fatalf("reopening the proxy: %v", err)
	}
	// The limiter tries Redis again every 5 s (one request probes); poll
	// until both instances are back on it.
	reopened := time.Now()
	for deadline := reopened.Add(15 * time.Second); ; {
		for _, cp := range both {
			if rec := grServe(t, cp, grReq{method: "GET", path: "/api/v1/session/validate", ip: "198.51.100.72"}); rec.Code != 401 {
				t.Fatalf("probe request: %d %s", rec.Code, rec.Body)
			}
		}
		_, ha := grHealthOf(t, a)
		_, hb := grHealthOf(t, b)
		if ha.Status == "ok" && hb.Status == "ok" {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("not back on Redis 15 s after it returned: A %+v, B %+v", ha, hb)
		}
		time.Sleep(50 * time.Millisecond)
	}
	t.Logf("first request during the outage took %v, /health %v; back on Redis %v after it returned",
		firstLatency.Round(time.Millisecond), healthLatency.Round(time.Millisecond), time.Since(reopened).Round(time.Millisecond))
	for _, cp := range both {
		wantHealth(cp, "ok", "ok")
	}
	if got := alternate("198.51.100.73", 8, both); got != 3 {
		t.Fatalf("after Redis returned: %d of 8 alternating creations allowed, want 3 (shared again)", got)
	}
}
