package chatproxy

import (
	"context"
	"net/http"
	"net/netip"
	"reflect"
	"strings"
	"testing"
	"time"

	"github.com/caddyserver/caddy/v2"
	"github.com/caddyserver/caddy/v2/caddyconfig/caddyfile"
	"github.com/prometheus/client_golang/prometheus"
	dto "github.com/prometheus/client_model/go"

	"github.com/chatproxy/caddy-chatproxy/internal/testenv"
	"github.com/chatproxy/caddy-chatproxy/metrics"
)

// mxOrigin is an allowed origin only these tests use, so the series of
// its site label move only by what they do.
const mxOrigin = "https://metrics-test.example.com"

const mxSite = "metrics-test.example.com"

// mxValue reads one series from the module's metrics: the value of a
// counter or gauge, the sample count of a histogram; 0 when absent.
func mxValue(t *testing.T, g prometheus.Gatherer, name string, labels map[string]string) float64 {
	t.Helper()
	families, err := g.Gather()
	if err != nil {
		t.Fatalf("gather: %v", err)
	}
	for _, f := range families {
		if f.GetName() != name {
			continue
		}
		for _, m := range f.GetMetric() {
			if !mxLabelsMatch(m, labels) {
				continue
			}
			switch {
			case m.Counter != nil:
				return m.GetCounter().GetValue()
			case m.Gauge != nil:
				return m.GetGauge().GetValue()
			case m.Histogram != nil:
				return float64(m.GetHistogram().GetSampleCount())
			}
		}
	}
	return 0
}

func mxLabelsMatch(m *dto.Metric, want map[string]string) bool {
	have := map[string]string{}
	for _, l := range m.GetLabel() {
		have[l.GetName()] = l.GetValue()
	}
	for k, v := range want {
		if have[k] != v {
			return false
		}
	}
	return len(have) == len(want)
}

// mxDelta tracks how series move over a test step.
type mxDelta struct {
	t      *testing.T
	before map[string]float64
	keys   map[string]mxKey
}

// mxKey names one series: its name and its labels as k=v pairs joined
// by commas (comparable, so it can key a map).
type mxKey struct {
	name, labels string
}

func (k mxKey) labelMap() map[string]string {
	m := map[string]string{}
	for pair := range strings.SplitSeq(k.labels, ",") {
		if kk, v, ok := strings.Cut(pair, "="); ok {
			m[kk] = v
		}
	}
	return m
}

func mxWatch(t *testing.T, keys ...mxKey) *mxDelta {
	d := &mxDelta{t: t, before: map[string]float64{}, keys: map[string]mxKey{}}
	for _, k := range keys {
		id := k.String()
		d.keys[id] = k
		d.before[id] = mxValue(t, metrics.Gatherer(), k.name, k.labelMap())
	}
	return d
}

func (k mxKey) String() string { return k.name + "{" + k.labels + "}" }

func mx(name string, kv ...string) mxKey {
	pairs := make([]string, 0, len(kv)/2)
	for i := 0; i+1 < len(kv); i += 2 {
		pairs = append(pairs, kv[i]+"="+kv[i+1])
	}
	return mxKey{name: "caddy_chatproxy_" + name, labels: strings.Join(pairs, ",")}
}

// want checks that each series moved by exactly its delta.
func (d *mxDelta) want(deltas map[mxKey]float64) {
	d.t.Helper()
	for k, delta := range deltas {
		id := k.String()
		if _, ok := d.keys[id]; !ok {
			d.t.Fatalf("series %s was not watched", id)
		}
		if got := mxValue(d.t, metrics.Gatherer(), k.name, k.labelMap()) - d.before[id]; got != delta {
			d.t.Errorf("%s moved by %v, want %v", id, got, delta)
		}
	}
}

// eventually waits (up to 10 s, for a loaded machine) until each series
// has moved by its delta.
func (d *mxDelta) eventually(deltas map[mxKey]float64) {
	d.t.Helper()
	deadline := time.Now().Add(10 * time.Second)
	for {
		done := true
		for k, delta := range deltas {
			if mxValue(d.t, metrics.Gatherer(), k.name, k.labelMap())-d.before[k.String()] != delta {
				done = false
			}
		}
		if done || time.Now().After(deadline) {
			break
		}
		time.Sleep(2 * time.Millisecond)
	}
	d.want(deltas)
}

// mxEnv is a chat env whose proxy also allows mxOrigin. that also allows mxOrigin.
func mxEnv(t *testing.T, mutate func(*ChatProxy)) *chatEnv {
	return newChatEnv(t, chatEnvOpts{mutate: func(cp *ChatProxy) {
		cp.AllowedOrigins = append(cp.AllowedOrigins, mxOrigin)
		if mutate != nil {
			mutate(cp)
		}
	}})
}

func (e *chatEnv) mxSession(t *testing.T) created {
	t.Helper()
	rec := e.serve(t, "POST", "/api/v1/session/create", `{}`, map[string]string{"Origin": mxOrigin})
	if rec.Code != http.StatusCreated {
		t.Fatalf("create: %d %s", rec.Code, rec.Body)
	}
	return decode[created](t, rec)
}

// Each config load registers the collectors into its own registry (a
// reload provisions the new config before the old one is cleaned up), and
// several handlers share one registry; the counts carry over.
func TestMetricsRegisteredPerConfig(t *testing.T) {
	provisionIn := func(ctx caddy.Context, cp *ChatProxy) {
		t.Helper()
		if err := cp.Provision(ctx); err != nil {
			t.Fatalf("provision: %v", err)
		}
		t.Cleanup(func() { _ = cp.Cleanup() })
	}
	oldCtx, cancelOld := caddy.NewContext(caddy.Context{Context: context.Background()})
	defer cancelOld()
	old := mtConfig(t, func(cp *ChatProxy) { cp.AllowedOrigins = append(cp.AllowedOrigins, mxOrigin) })
	provisionIn(oldCtx, old)
	key := mx("sessions_created_total", "kind", "visitor", "site", mxSite)
	d := mxWatch(t, key)
	createFrom := func(cp *ChatProxy) {
		t.Helper()
		rec := grServe(t, cp, grReq{method: "POST", path: "/api/v1/session/create", headers: map[string]string{"Origin": mxOrigin}})
		if rec.Code != http.StatusCreated {
			t.Fatalf("create: %d %s", rec.Code, rec.Body)
		}
	}
	createFrom(old)

	// The reloaded config: two handlers in one new context.
	newCtx, cancelNew := caddy.NewContext(caddy.Context{Context: context.Background()})
	defer cancelNew()
	a := mtConfig(t, func(cp *ChatProxy) { cp.AllowedOrigins = append(cp.AllowedOrigins, mxOrigin) })
	b := mtConfig(t, func(cp *ChatProxy) { cp.AllowedOrigins = append(cp.AllowedOrigins, mxOrigin) })
	provisionIn(newCtx, a)
	provisionIn(newCtx, b)
	if err := old.Cleanup(); err != nil {
		t.Fatal(err)
	}
	createFrom(a)
	createFrom(b)
	d.want(map[mxKey]float64{key: 3})

	for name, reg := range map[string]*prometheus.Registry{"old": oldCtx.GetMetricsRegistry(), "new": newCtx.GetMetricsRegistry()} {
		if got := mxValue(t, reg, key.name, key.labelMap()); got != mxValue(t, metrics.Gatherer(), key.name, key.labelMap()) {
			t.Errorf("%s registry: %v, not the module's value", name, got)
		}
		families, err := reg.Gather()
		if err != nil {
			t.Fatalf("%s registry: %v", name, err)
		}
		have := map[string]bool{}
		for _, f := range families {
			have[f.GetName()] = true
		}
		for _, fam := range []string{"sessions_created_total", "circuit_state", "active_streams", "rate_limited_total", "guard_refusals_total", "chunks_relayed_total", "relayed_bytes_total"} {
			if !have["caddy_chatproxy_"+fam] {
				t.Errorf("%s registry has no caddy_chatproxy_%s", name, fam)
			}
		}
	}
	// The circuit state of both upstreams is there, closed.
	for _, cp := range []*ChatProxy{a, b} {
		if v := mxValue(t, newCtx.GetMetricsRegistry(), "caddy_chatproxy_circuit_state", map[string]string{"upstream": cp.upstreamLabel(), "state": "closed"}); v != 1 {
			t.Errorf("circuit_state closed for %s: %v", cp.upstreamLabel(), v)
		}
	}
}

// GET /metrics answers loopback and private clients (by Caddy's
// client_ip), 404 to everyone else, and costs no rate-limit budget.
func TestMetricsRoute(t *testing.T) {
	cp := newTestProxy(t, "sqlite", func(cp *ChatProxy) {
		cp.RateLimits = grLimits(map[string][]string{"ip": {"2/1m"}})
	})
	wantSecurityHeaders := func(rec interface{ Header() http.Header }, what string) {
		t.Helper()
		for k, v := range map[string]string{
			"X-Content-Type-Options": "nosniff", "X-Frame-Options": "DENY", "Cache-Control": "no-store",
			"Referrer-Policy":         "strict-origin-when-cross-origin",
			"Content-Security-Policy": "default-src 'none'; frame-ancestors 'none'",
		} {
			if got := rec.Header().Get(k); got != v {
				t.Errorf("%s: %s %q, want %q", what, k, got, v)
			}
		}
	}
	for _, ip := range []string{"127.0.0.1", "10.1.2.3", "172.20.0.5", "192.168.1.1", "::1", "fd00::1", "::ffff:10.1.2.3"} {
		for range 3 { // more than the ip tier allows
			rec := grServe(t, cp, grReq{method: "GET", path: "/metrics", ip: ip})
			if rec.Code != http.StatusOK || !strings.Contains(rec.Body.String(), "\ncaddy_chatproxy_") {
				t.Fatalf("from %s: %d\n%s", ip, rec.Code, rec.Body)
			}
			if ct := rec.Header().Get("Content-Type"); !strings.HasPrefix(ct, "text/plain; version=0.0.4") {
				t.Errorf("from %s: Content-Type %q", ip, ct)
			}
			wantSecurityHeaders(rec, "GET /metrics from "+ip)
			if rec.Header().Get("RateLimit-Limit") != "" {
				t.Errorf("from %s: /metrics is rate limited", ip)
			}
		}
	}
	// /metrics took nothing from 127.0.0.1's budget of 2.
	for range 2 {
		if rec := grServe(t, cp, grReq{method: "POST", path: "/api/v1/session/create", ip: "127.0.0.1"}); rec.Code != http.StatusCreated {
			t.Fatalf("create after scraping: %d %s", rec.Code, rec.Body)
		}
	}
	for _, ip := range []string{"203.0.113.7", "8.8.8.8", "2001:db8::1", "100.64.0.1", "172.32.0.1"} {
		for _, method := range []string{"GET", "HEAD", "POST", "OPTIONS"} {
			rec := grServe(t, cp, grReq{method: method, path: "/metrics", ip: ip})
			if rec.Code != http.StatusNotFound || strings.Contains(rec.Body.String(), "caddy_chatproxy") {
				t.Fatalf("%s from %s: %d %s", method, ip, rec.Code, rec.Body)
			}
			wantSecurityHeaders(rec, method+" /metrics from "+ip)
		}
	}
	if rec := grServe(t, cp, grReq{method: "POST", path: "/metrics", ip: "127.0.0.1"}); rec.Code != http.StatusMethodNotAllowed || rec.Header().Get("Allow") != "GET, HEAD" {
		t.Fatalf("POST from loopback: %d Allow %q", rec.Code, rec.Header().Get("Allow"))
	}

	// A custom metrics_allow replaces the defaults.
	custom := newTestProxy(t, "sqlite", func(cp *ChatProxy) { cp.MetricsAllow = []string{"192.0.2.0/24", "2001:db8::7"} })
	for ip, want := range map[string]int{
		"192.0.2.10": 200, "2001:db8::7": 200,
		"2001:db8::8": 404, "192.0.3.1": 404, "127.0.0.1": 404, "10.1.2.3": 404, "203.0.113.7": 404,
	} {
		if rec := grServe(t, custom, grReq{method: "GET", path: "/metrics", ip: ip}); rec.Code != want {
			t.Errorf("custom allow, from %s: %d, want %d", ip, rec.Code, want)
		}
	}
}

// A chat exchange moves the counters: sessions, messages by outcome,
// chunks, bytes and the upstream histograms; a stream is active while it
// runs.
func TestMetricsChatExchange(t *testing.T) {
	// detached_timeout off: a reply is stopped as soon as its visitor leaves.
	e := mxEnv(t, func(cp *ChatProxy) { cp.DetachedTimeout = DetachedTimeoutOff })
	up := e.cp.upstreamLabel()
	if strings.Contains(up, "webhook") || !strings.HasPrefix(up, "n8n-") || len(up) != 12 {
		t.Fatalf("upstream label %q", up)
	}
	keys := []mxKey{
		mx("sessions_created_total", "kind", "visitor", "site", mxSite),
		mx("sessions_created_total", "kind", "widget", "site", mxSite),
		mx("messages_total", "route", "stream", "outcome", "ok", "site", mxSite),
		mx("messages_total", "route", "message", "outcome", "ok", "site", mxSite),
		mx("messages_total", "route", "widget", "outcome", "ok", "site", mxSite),
		mx("messages_total", "route", "message", "outcome", "client_gone", "site", mxSite),
		mx("chunks_relayed_total"),
		mx("relayed_bytes_total"),
		mx("upstream_ttfb_seconds", "upstream", up),
		mx("upstream_duration_seconds", "upstream", up),
		mx("active_streams"),
	}
	d := mxWatch(t, keys...)

	s := e.mxSession(t)
	e.fake.setScript(fakeStream("Hel", "lo ", "world"))
	rec := e.serve(t, "POST", "/api/v1/chat/stream", `{"message":"hi there"}`, authz(s.Token, "Origin", mxOrigin))
	if rec.Code != 200 || !strings.Contains(rec.Body.String(), "[DONE]") {
		t.Fatalf("stream: %d %s", rec.Code, rec.Body)
	}
	e.fake.setScript(fakeOutput("A whole reply"))
	rec = e.serve(t, "POST", "/api/v1/chat/message", `{"message":"and as JSON?"}`, authz(s.Token, "Origin", mxOrigin, "Accept", "application/json"))
	if rec.Code != 200 {
		t.Fatalf("message: %d %s", rec.Code, rec.Body)
	}
	e.fake.setScript(fakeStream("Wid", "get"))
	rec = e.serve(t, "POST", "/api/v1/n8n/chat", `{"action":"sendMessage","sessionId":"widget-session-1","chatInput":"hello"}`,
		map[string]string{"Origin": mxOrigin, "Accept": "text/plain"})
	if rec.Code != 200 || !strings.Contains(rec.Body.String(), `"type":"end"`) {
		t.Fatalf("widget: %d %s", rec.Code, rec.Body)
	}
	d.want(map[mxKey]float64{
		keys[0]: 1, keys[1]: 1, keys[2]: 1, keys[3]: 1, keys[4]: 1,
		keys[6]:  5, // Hel, lo , world, Wid, get
		keys[7]:  float64(len("Hello world") + len("A whole reply") + len("Widget")),
		keys[8]:  3,
		keys[9]:  3,
		keys[10]: 0,
	})

	// While a reply streams, it is an active stream; a visitor who leaves
	// mid-reply is client_gone.
	d = mxWatch(t, keys...)
	never := make(chan struct{})
	e.fake.setScript(e.fake.fakeThen("Partial ", never, func(http.ResponseWriter, *http.Request) {}))
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	resp := e.doCtx(t, ctx, "POST", "/api/v1/chat/message", `{"message":"Long answer please"}`, authz(s.Token, "Origin", mxOrigin))
	if got := itemOf(t, nextSSE(t, afterBegin(t, resp.Body))); got != "Partial " {
		t.Fatalf("first event %q", got)
	}
	d.eventually(map[mxKey]float64{keys[10]: 1, keys[6]: 1}) // counted just after the write
	cancel()
	awaitSignal(t, e.fake.last(t).Canceled(), "n8n to see its request cancelled")
	e.waitIdle(t)
	d.want(map[mxKey]float64{keys[10]: 0, keys[5]: 1, keys[8]: 1, keys[9]: 1, keys[2]: 0})
}

// Refusals are counted: by tier, by guard reason, and as message
// outcomes; an n8n failure by its reason, and the circuit's state.
func TestMetricsRefusals(t *testing.T) {
	e := mxEnv(t, func(cp *ChatProxy) {
		cp.RateLimits = grLimits(map[string][]string{"create": {"2/1m"}, "session": {"2/1m"}})
		cp.CircuitBreakerFailures = 1
	})
	up := e.cp.upstreamLabel()
	keys := []mxKey{
		mx("rate_limited_total", "tier", "create"),
		mx("rate_limited_total", "tier", "session"),
		mx("guard_refusals_total", "reason", "origin"),
		mx("guard_refusals_total", "reason", "csrf"),
		mx("guard_refusals_total", "reason", "input"),
		mx("guard_refusals_total", "reason", "honeypot"),
		mx("messages_total", "route", "message", "outcome", "rate_limited", "site", mxSite),
		mx("messages_total", "route", "message", "outcome", "honeypot", "site", mxSite),
		mx("messages_total", "route", "message", "outcome", "invalid", "site", mxSite),
		mx("messages_total", "route", "message", "outcome", "upstream_error", "site", mxSite),
		mx("upstream_errors_total", "upstream", up, "reason", "status"),
		mx("upstream_errors_total", "upstream", up, "reason", "circuit_open"),
		mx("circuit_state", "upstream", up, "state", "open"),
		mx("circuit_state", "upstream", up, "state", "closed"),
		mx("upstream_duration_seconds", "upstream", up),
	}
	d := mxWatch(t, keys...)
	s := e.mxSession(t)
	s2 := e.mxSession(t)
	if rec := e.serve(t, "POST", "/api/v1/session/create", `{}`, map[string]string{"Origin": mxOrigin}); rec.Code != 429 {
		t.Fatalf("third create: %d", rec.Code)
	}
	if rec := e.serve(t, "POST", "/api/v1/session/create", `{}`, map[string]string{"Origin": "https://evil.example"}); rec.Code != 403 {
		t.Fatalf("create from a disallowed origin: %d", rec.Code)
	}
	if rec := e.serve(t, "GET", "/api/v1/session/validate", "", map[string]string{"Cookie": "chat_session=" + s.Token}); rec.Code != 403 {
		t.Fatalf("cookie without origin: %d", rec.Code)
	}
	chat := func(token, body string, want int) {
		t.Helper()
		rec := e.serve(t, "POST", "/api/v1/chat/message", body, authz(token, "Origin", mxOrigin, "Accept", "application/json"))
		if rec.Code != want {
			t.Fatalf("chat %s: %d, want %d: %s", body, rec.Code, want, rec.Body)
		}
	}
	chat(s.Token, `{"message":"`+strings.Repeat("x", 5000)+`"}`, 400)
	chat(s.Token, `{"message":"hi","website":"http://spam.example"}`, 200) // the honeypot
	e.fake.setScript(fakeReply(502, "text/plain", "bad gateway"))          // n8n unreachable behind its proxy: counts for the circuit
	chat(s.Token, `{"message":"fails"}`, 502)
	chat(s.Token, `{"message":"circuit open now"}`, 429) // the session tier: 2/1m
	chat(s2.Token, `{"message":"circuit open now"}`, 503)
	d.want(map[mxKey]float64{
		keys[0]: 1, keys[1]: 1, keys[2]: 1, keys[3]: 1, keys[4]: 1, keys[5]: 1,
		keys[6]: 1, keys[7]: 1, keys[8]: 1, keys[9]: 2,
		keys[10]: 1, keys[11]: 1, keys[12]: 1, keys[13]: -1,
		keys[14]: 1, // an open circuit never calls n8n: no duration
	})
}

// No label value names a session, a client address, the webhook or any
// free text: scan everything the module exports after the tests above.
func TestMetricsLabelsHoldNoIdentifiers(t *testing.T) {
	e := mxEnv(t, nil)
	s := e.mxSession(t)
	e.fake.setScript(fakeStream("ok"))
	if rec := e.serve(t, "POST", "/api/v1/chat/stream", `{"message":"label check"}`, authz(s.Token)); rec.Code != 200 {
		t.Fatalf("stream: %d", rec.Code)
	}
	if rec := e.serve(t, "POST", "/api/v1/n8n/chat", `{"action":"sendMessage","sessionId":"label-check-widget","chatInput":"x"}`,
		map[string]string{"Accept": "text/plain"}); rec.Code != 200 {
		t.Fatalf("widget: %d", rec.Code)
	}
	// Without an Origin a session's site is the Host header, which anyone
	// can set: it never becomes a label.
	if rec := serve(t, e.cp, req{method: "POST", path: "/api/v1/session/create"}); rec.Code != 201 {
		t.Fatalf("create: %d", rec.Code)
	}
	families, err := metrics.Gatherer().Gather()
	if err != nil {
		t.Fatal(err)
	}
	forbidden := []string{s.SessionID, "label-check-widget", "webhook", fakeWebhookPath, e.fake.srv.URL, chatClientIP, "api.example.net", testJWTSecret, "label check"}
	seen := 0
	for _, f := range families {
		if !strings.HasPrefix(f.GetName(), "caddy_chatproxy_") {
			t.Errorf("family %s outside the namespace", f.GetName())
		}
		for _, m := range f.GetMetric() {
			for _, l := range m.GetLabel() {
				seen++
				v := l.GetValue()
				if _, err := netip.ParseAddr(strings.Trim(v, "[]")); err == nil {
					t.Errorf("%s{%s=%q}: an IP address", f.GetName(), l.GetName(), v)
				}
				for _, bad := range forbidden {
					if strings.Contains(v, bad) {
						t.Errorf("%s{%s=%q} holds %q", f.GetName(), l.GetName(), v, bad)
					}
				}
				if len(v) > 40 || strings.HasPrefix(v, "w_") {
					t.Errorf("%s{%s=%q}: looks like an identifier", f.GetName(), l.GetName(), v)
				}
				if l.GetName() == "site" && v != metrics.OtherSite && !strings.Contains(v, "example") {
					t.Errorf("%s: site %q is not a configured origin's host", f.GetName(), v)
				}
			}
		}
	}
	if seen == 0 {
		t.Fatal("no labels gathered")
	}
}

// PostgreSQL and Redis pools are reported while a handler uses them.
func TestMetricsPools(t *testing.T) {
	redisURL := testenv.RedisURL(t)
	cp := newTestProxy(t, "postgres", func(cp *ChatProxy) { cp.Redis = redisURL })
	db, rd := metrics.PoolLabel(storeKeyOf(cp)), metrics.PoolLabel(redisKeyOf(cp))
	if !strings.HasPrefix(db, "postgres-") || len(db) != len("postgres-")+8 || !strings.HasPrefix(rd, "redis-") {
		t.Fatalf("pool labels %q %q", db, rd)
	}
	// Use both pools once.
	if rec := grServe(t, cp, grReq{method: "POST", path: "/api/v1/session/create"}); rec.Code != 201 {
		t.Fatalf("create: %d %s", rec.Code, rec.Body)
	}
	g := metrics.Gatherer()
	if v := mxValue(t, g, "caddy_chatproxy_db_pool_max_conns", map[string]string{"pool": db}); v < 1 {
		t.Errorf("db_pool_max_conns{pool=%q} = %v", db, v)
	}
	if v := mxValue(t, g, "caddy_chatproxy_db_pool_total_conns", map[string]string{"pool": db}); v < 1 {
		t.Errorf("db_pool_total_conns{pool=%q} = %v", db, v)
	}
	if v := mxValue(t, g, "caddy_chatproxy_redis_pool_total_conns", map[string]string{"pool": rd}); v < 1 {
		t.Errorf("redis_pool_total_conns{pool=%q} = %v", rd, v)
	}
	if v := mxValue(t, g, "caddy_chatproxy_redis_pool_hits_total", map[string]string{"pool": rd}) +
		mxValue(t, g, "caddy_chatproxy_redis_pool_misses_total", map[string]string{"pool": rd}); v < 1 {
		t.Errorf("redis pool hits+misses = %v", v)
	}
	if err := cp.Cleanup(); err != nil {
		t.Fatal(err)
	}
	for _, name := range []string{"caddy_chatproxy_db_pool_max_conns", "caddy_chatproxy_redis_pool_total_conns"} {
		families, _ := g.Gather()
		for _, f := range families {
			for _, m := range f.GetMetric() {
				if f.GetName() == name && (mxLabelsMatch(m, map[string]string{"pool": db}) || mxLabelsMatch(m, map[string]string{"pool": rd})) {
					t.Errorf("%s still reported after the handler was cleaned up", name)
				}
			}
		}
	}
}

func TestUnmarshalCaddyfileMetricsOptions(t *testing.T) {
	for _, tc := range []struct {
		name  string
		input string
		want  ChatProxy
		json  string
	}{
		{"metrics_allow", "chat_proxy {\n\tmetrics_allow 10.0.0.0/8 127.0.0.1 ::1/128 {env.SCRAPER_NET}\n}",
			ChatProxy{MetricsAllow: []string{"10.0.0.0/8", "127.0.0.1", "::1/128", "{env.SCRAPER_NET}"}},
			`{"metrics_allow":["10.0.0.0/8","127.0.0.1","::1/128","{env.SCRAPER_NET}"]}`},
		{"log_content on", "chat_proxy {\n\tlog_content on\n}", ChatProxy{LogContent: true}, `{"log_content":true}`},
		{"log_content off", "chat_proxy {\n\tlog_content off\n}", ChatProxy{}, `{}`},
	} {
		t.Run(tc.name, func(t *testing.T) {
			var got ChatProxy
			if err := got.UnmarshalCaddyfile(caddyfile.NewTestDispenser(tc.input)); err != nil {
				t.Fatal(err)
			}
			if !reflect.DeepEqual(got, tc.want) {
				t.Fatalf("got  %s\nwant %s", cfDump(t, &got), cfDump(t, &tc.want))
			}
			if s := cfDump(t, &got); s != tc.json {
				t.Fatalf("JSON %s, want %s", s, tc.json)
			}
		})
	}
}

func TestUnmarshalCaddyfileMetricsErrors(t *testing.T) {
	for _, tc := range []struct {
		name, input, want string
	}{
		{"metrics_allow without value", "chat_proxy {\n\tmetrics_allow\n}",
			"chat_proxy: option 'metrics_allow' needs at least one network, as in: metrics_allow 127.0.0.1/32 10.0.0.0/8, at Testfile:2"},
		{"metrics_allow bad CIDR", "chat_proxy {\n\tmetrics_allow 10.0.0.0/8 10.0.0.0/33\n}",
			`chat_proxy: option 'metrics_allow': invalid network "10.0.0.0/33" (use a CIDR such as 10.0.0.0/8, or an IP address), at Testfile:2`},
		{"metrics_allow host name", "chat_proxy {\n\tmetrics_allow\tprometheus.internal\n}",
			`chat_proxy: option 'metrics_allow': invalid network "prometheus.internal" (use a CIDR such as 10.0.0.0/8, or an IP address), at Testfile:2`},
		{"metrics_allow with a zone", "chat_proxy {\n\tmetrics_allow fe80::1%eth0\n}",
			`chat_proxy: option 'metrics_allow': invalid network "fe80::1%eth0" (use a CIDR such as 10.0.0.0/8, or an IP address), at Testfile:2`},
		{"metrics_allow with a block", "chat_proxy {\n\tmetrics_allow 10.0.0.0/8 {\n\t}\n}",
			"chat_proxy: option 'metrics_allow' does not take a block, at Testfile:2"},
		{"duplicate metrics_allow", "chat_proxy {\n\tmetrics_allow 10.0.0.0/8\n\tmetrics_allow 127.0.0.1\n}",
			"chat_proxy: duplicate option 'metrics_allow', at Testfile:3"},
		{"log_content yes", "chat_proxy {\n\tlog_content yes\n}",
			`chat_proxy: option 'log_content' must be on or off, got "yes", at Testfile:2`},
		{"log_content without value", "chat_proxy {\n\tlog_content\n}",
			"chat_proxy: option 'log_content' needs a value, at Testfile:2"},
		{"log_content with two values", "chat_proxy {\n\tlog_content on off\n}",
			"chat_proxy: option 'log_content' takes one value, at Testfile:2"},
		{"duplicate log_content", "chat_proxy {\n\tlog_content on\n\n\tlog_content off\n}",
			"chat_proxy: duplicate option 'log_content', at Testfile:4"},
	} {
		t.Run(tc.name, func(t *testing.T) { wantCaddyfileError(t, tc.input, tc.want) })
	}
}

// The JSON config's metrics_allow is checked at provision time, after
// placeholders are resolved.
func TestProvisionMetricsAllow(t *testing.T) {
	t.Setenv("CHATPROXY_MX_NET", "192.0.2.0/24")
	for _, tc := range []struct {
		allow []string
		want  string
	}{
		{[]string{"10.0.0.0/8", "300.0.0.0/8"}, `metrics_allow: invalid network "300.0.0.0/8" (use a CIDR such as 10.0.0.0/8, or an IP address)`},
		{[]string{""}, "metrics_allow: required"},
		{[]string{"{env.CHATPROXY_MX_UNSET}"}, "metrics_allow: evaluated placeholder {env.CHATPROXY_MX_UNSET} is empty"},
		{[]string{"{env.CHATPROXY_MX_NET}"}, ""},
	} {
		cp := mtConfig(t, func(cp *ChatProxy) { cp.MetricsAllow = tc.allow })
		err := mtProvision(t, cp)
		switch {
		case tc.want == "" && err != nil:
			t.Errorf("%q: %v", tc.allow, err)
		case tc.want != "" && (err == nil || err.Error() != tc.want):
			t.Errorf("%q: error %v, want %q", tc.allow, err, tc.want)
		}
	}
	cp := mtConfig(t, func(cp *ChatProxy) { cp.MetricsAllow = []string{"{env.CHATPROXY_MX_NET}"} })
	if err := mtProvision(t, cp); err != nil {
		t.Fatal(err)
	}
	if rec := grServe(t, cp, grReq{method: "GET", path: "/metrics", ip: "192.0.2.44"}); rec.Code != 200 {
		t.Fatalf("from the resolved network: %d", rec.Code)
	}
}

// upstreamLabel is the upstream label of cp's metrics.
func (cp *ChatProxy) upstreamLabel() string {
	return metrics.UpstreamLabel(cp.jwtSecret, cp.webhook.String())
}
