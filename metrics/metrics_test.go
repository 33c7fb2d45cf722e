package metrics

import (
	"context"
	"net/http"
	"net/http/httptest"
	"strings"
	"testing"
	"time"

	"github.com/jackc/pgx/v5/pgxpool"
	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/testutil"
	"github.com/redis/go-redis/v9"
)

// A reload gives Caddy a fresh registry: the collectors register into it
// without error and keep counting from where they were.
func TestRegisterAcrossReload(t *testing.T) {
	rec := NewRecorder("n8n-reload01", nil)
	first := prometheus.NewPedanticRegistry()
	if err := Register(first); err != nil {
		t.Fatalf("first registry: %v", err)
	}
	// A second handler in the same config registers into the same registry.
	if err := Register(first); err != nil {
		t.Fatalf("registering twice into one registry: %v", err)
	}
	counter := rateLimited.WithLabelValues("session")
	before := testutil.ToFloat64(counter)
	rec.RateLimited("session")
	rec.RateLimited("session")
	if got := testutil.ToFloat64(counter); got != before+2 {
		t.Fatalf("before the reload: %v, want %v", got, before+2)
	}

	second := prometheus.NewPedanticRegistry() // the reloaded config's
	if err := Register(second); err != nil {
		t.Fatalf("second registry: %v", err)
	}
	rec = NewRecorder("n8n-reload01", nil) // the new config's handler
	rec.RateLimited("session")
	if got := testutil.ToFloat64(counter); got != before+3 {
		t.Fatalf("after the reload: %v, want %v (the count carries over)", got, before+3)
	}
	for _, reg := range []*prometheus.Registry{first, second} {
		if n, err := testutil.GatherAndCount(reg, "caddy_chatproxy_rate_limited_total"); err != nil || n < 4 {
			t.Fatalf("rate_limited_total series: %d, %v", n, err)
		}
		if err := testutil.GatherAndCompare(reg, strings.NewReader(`
# HELP caddy_chatproxy_active_streams Replies being streamed to clients right now.
# TYPE caddy_chatproxy_active_streams gauge
caddy_chatproxy_active_streams 0
`), "caddy_chatproxy_active_streams"); err != nil {
			t.Fatal(err)
		}
	}
	// The chat socket's series too: the open sockets gauge and the
	// counters go on from where they were.
	sockets := testutil.ToFloat64(activeSockets)
	refusedToken := testutil.ToFloat64(socketUpgradesRefused.WithLabelValues(UpgradeToken))
	rec.SocketOpened()
	rec.SocketUpgradeRefused(UpgradeToken)
	third := prometheus.NewPedanticRegistry()
	if err := Register(third); err != nil {
		t.Fatalf("third registry: %v", err)
	}
	NewRecorder("n8n-reload01", nil).SocketFrameRelayed(ToN8n)
	if got, err := gatherValue(third, "caddy_chatproxy_active_sockets", nil); err != nil || got != sockets+1 {
		t.Fatalf("active_sockets after the reload: %v, %v; want %v", got, err, sockets+1)
	}
	if got, err := gatherValue(third, "caddy_chatproxy_socket_upgrades_refused_total", map[string]string{"reason": UpgradeToken}); err != nil || got != refusedToken+1 {
		t.Fatalf("socket_upgrades_refused_total after the reload: %v, %v; want %v", got, err, refusedToken+1)
	}
	rec.SocketClosed(SocketVisitorLeft)
	if got := testutil.ToFloat64(activeSockets); got != sockets {
		t.Fatalf("active_sockets after the close: %v, want %v", got, sockets)
	}
	// Both registries read the same collector.
	got, err := gatherValue(second, "caddy_chatproxy_rate_limited_total", map[string]string{"tier": "session"})
	if err != nil || got != before+3 {
		t.Fatalf("gathered from the new registry: %v, %v", got, err)
	}
}

// Lint the metric names and help texts as promtool would.
func TestMetricsLint(t *testing.T) {
	rec := NewRecorder("n8n-lint0001", []string{"https://shop.example.com"})
	rec.Message(RouteStream, OutcomeOK, "shop.example.com")
	rec.SessionCreated(KindVisitor, "shop.example.com")
	rec.UpstreamTTFB(time.Millisecond)
	rec.UpstreamDuration(time.Millisecond)
	rec.UpstreamError("connect")
	rec.GuardRefused("honeypot")
	rec.UploadsAccepted(1)
	rec.UploadRefused("type_mismatch")
	rec.SocketOpened()
	rec.SocketFrameRelayed(ToVisitor)
	rec.SocketUpgradeRefused(UpgradeOrigin)
	rec.SocketClosed(SocketN8nClosed)
	reg := prometheus.NewPedanticRegistry()
	if err := Register(reg); err != nil {
		t.Fatal(err)
	}
	problems, err := testutil.GatherAndLint(reg)
	if err != nil {
		t.Fatal(err)
	}
	for _, p := range problems {
		t.Errorf("lint: %s: %s", p.Metric, p.Text)
	}
}

func TestSiteLabels(t *testing.T) {
	rec := NewRecorder("n8n-sites001", []string{
		"https://shop.example.com", "http://localhost:3000", "https://*.example.org", "https://*.example.net:8443",
		"https://[2001:db8::1]", "not an origin",
	})
	for site, want := range map[string]string{
		"shop.example.com":           "shop.example.com",
		"SHOP.example.com":           "shop.example.com",
		"localhost:3000":             "localhost:3000",
		"localhost":                  OtherSite,
		"a.example.org":              "*.example.org",
		"a.b.example.org":            "*.example.org",
		"example.org":                OtherSite,
		"evil-example.org":           OtherSite,
		"a.example.org:8443":         OtherSite,
		"a.example.net:8443":         "*.example.net:8443",
		"a.example.net":              OtherSite,
		"[2001:db8::1]":              "[2001:db8::1]",
		"attacker.test":              OtherSite,
		"203.0.113.7":                OtherSite,
		"":                           OtherSite,
		"shop.example.com.evil":      OtherSite,
		"x.shop.example.com":         OtherSite,
		"a:b.example.org":            OtherSite,
		"not an origin":              OtherSite,
		"api.example.net:443":        OtherSite,
		"a.example.net:84430":        OtherSite,
		"shop.example.com:443":       OtherSite,
		"sub.localhost:3000":         OtherSite,
		"a.example.org.":             OtherSite,
		"a.example.org:8443/x":       OtherSite,
		"a.example.net:8443:1":       OtherSite,
		"[2001:db8::1]:443":          OtherSite,
		"[2001:db8::2]":              OtherSite,
		"a.b.example.net:8443":       "*.example.net:8443",
		"shop.example.com:8080":      OtherSite,
		"localhost:3001":             OtherSite,
		"b.example.org":              "*.example.org",
		"B.EXAMPLE.ORG":              "*.example.org",
		"xn--80ak6aa92e.example.org": "*.example.org",
	} {
		if got := rec.Site(site); got != want {
			t.Errorf("Site(%q) = %q, want %q", site, got, want)
		}
	}
	var nilRec *Recorder
	if got := nilRec.Site("shop.example.com"); got != OtherSite {
		t.Errorf("nil recorder: %q", got)
	}
	// A nil recorder records nothing and does not panic.
	nilRec.Message(RouteMessage, OutcomeOK, "x")
	nilRec.StreamStarted()
	nilRec.StreamEnded()
	nilRec.SetCircuitState("open")
}

// Files are counted as accepted, and refused uploads by their reason.
func TestUploadFiles(t *testing.T) {
	rec := NewRecorder("n8n-up", nil)
	count := func(result string) float64 {
		v, err := gatherValue(Gatherer(), "caddy_chatproxy_upload_files_total", map[string]string{"result": result})
		if err != nil {
			t.Fatal(err)
		}
		return v
	}
	accepted, tooLarge := count(UploadAccepted), 0.0
	if v, err := gatherValue(Gatherer(), "caddy_chatproxy_upload_files_total", map[string]string{"result": "file_too_large"}); err == nil {
		tooLarge = v
	}
	rec.UploadsAccepted(2)
	rec.UploadRefused("file_too_large")
	var nilRec *Recorder
	nilRec.UploadsAccepted(5)
	if got := count(UploadAccepted) - accepted; got != 2 {
		t.Errorf("accepted +%v, want +2", got)
	}
	if got := count("file_too_large") - tooLarge; got != 1 {
		t.Errorf("file_too_large +%v, want +1", got)
	}
}

func TestCircuitState(t *testing.T) {
	rec := NewRecorder("n8n-circuit1", nil)
	state := func(s string) float64 { return testutil.ToFloat64(circuitState.WithLabelValues("n8n-circuit1", s)) }
	if state("closed") != 1 || state("open") != 0 || state("half-open") != 0 {
		t.Fatalf("a new upstream is closed: closed=%v open=%v half-open=%v", state("closed"), state("open"), state("half-open"))
	}
	rec.SetCircuitState("open")
	if state("closed") != 0 || state("open") != 1 || state("half-open") != 0 {
		t.Fatalf("open: closed=%v open=%v half-open=%v", state("closed"), state("open"), state("half-open"))
	}
	rec.SetCircuitState("half-open")
	if state("half-open") != 1 || state("open") != 0 {
		t.Fatal("half-open not recorded")
	}
}

// Pool statistics are read at scrape time from the tracked pools, and a
// pool's series go when it is untracked.
func TestPoolCollector(t *testing.T) {
	cfg, err := pgxpool.ParseConfig("postgres://u:hunter2-secret@127.0.0.1:1/db?sslmode=disable&pool_max_conns=7")
	if err != nil {
		t.Fatal(err)
	}
	pool, err := pgxpool.NewWithConfig(context.Background(), cfg) // connects lazily
	if err != nil {
		t.Fatal(err)
	}
	defer pool.Close()
	rdb := redis.NewClient(&redis.Options{Addr: "127.0.0.1:1"})
	defer rdb.Close()

	untrackDB := TrackDBPool("postgres-test0001", pool)
	untrackRedis := TrackRedisPool("redis-test0001", rdb)
	reg := prometheus.NewPedanticRegistry()
	if err := Register(reg); err != nil {
		t.Fatal(err)
	}
	if v, err := gatherValue(reg, "caddy_chatproxy_db_pool_max_conns", map[string]string{"pool": "postgres-test0001"}); err != nil || v != 7 {
		t.Fatalf("db_pool_max_conns: %v, %v", v, err)
	}
	for _, name := range []string{"db_pool_acquired_conns", "db_pool_idle_conns", "db_pool_total_conns", "db_pool_empty_acquire_total"} {
		if _, err := gatherValue(reg, "caddy_chatproxy_"+name, map[string]string{"pool": "postgres-test0001"}); err != nil {
			t.Error(err)
		}
	}
	for _, name := range []string{"redis_pool_hits_total", "redis_pool_misses_total", "redis_pool_timeouts_total", "redis_pool_total_conns", "redis_pool_idle_conns"} {
		if _, err := gatherValue(reg, "caddy_chatproxy_"+name, map[string]string{"pool": "redis-test0001"}); err != nil {
			t.Error(err)
		}
	}
	// The URL and its password are nowhere in the output.
	rec := httptest.NewRecorder()
	Handler().ServeHTTP(rec, httptest.NewRequest(http.MethodGet, "/metrics", nil))
	if rec.Code != 200 || !strings.Contains(rec.Body.String(), `caddy_chatproxy_db_pool_max_conns{pool="postgres-test0001"} 7`) {
		t.Fatalf("/metrics: %d\n%s", rec.Code, rec.Body)
	}
	for _, leak := range []string{"hunter2", "127.0.0.1"} {
		if strings.Contains(rec.Body.String(), leak) {
			t.Fatalf("/metrics leaks %q", leak)
		}
	}

	// A pool tracked by two handlers stays until both let it go; a second
	// untrack by the same handler changes nothing.
	untrackA := TrackDBPool("postgres-test0002", pool)
	untrackB := TrackDBPool("postgres-test0002", pool)
	untrackA()
	untrackA()
	if _, err := gatherValue(reg, "caddy_chatproxy_db_pool_max_conns", map[string]string{"pool": "postgres-test0002"}); err != nil {
		t.Fatalf("the pool went while still tracked: %v", err)
	}
	untrackB()
	if n, _ := testutil.GatherAndCount(reg, "caddy_chatproxy_db_pool_max_conns"); n != 1 {
		t.Fatalf("%d db pools after untracking postgres-test0002, want 1", n)
	}

	untrackDB()
	untrackRedis()
	for _, name := range []string{"caddy_chatproxy_db_pool_max_conns", "caddy_chatproxy_redis_pool_total_conns"} {
		if n, err := testutil.GatherAndCount(reg, name); err != nil || n != 0 {
			t.Fatalf("%s after untrack: %d series, %v", name, n, err)
		}
	}
}

func TestHandlerServesText(t *testing.T) {
	NewRecorder("n8n-handler1", nil).ChunkRelayed(5)
	rec := httptest.NewRecorder()
	Handler().ServeHTTP(rec, httptest.NewRequest(http.MethodGet, "/metrics", nil))
	if rec.Code != 200 {
		t.Fatalf("status %d", rec.Code)
	}
	if ct := rec.Header().Get("Content-Type"); !strings.HasPrefix(ct, "text/plain") {
		t.Fatalf("Content-Type %q", ct)
	}
	for _, want := range []string{"caddy_chatproxy_chunks_relayed_total ", "caddy_chatproxy_relayed_bytes_total ", `caddy_chatproxy_circuit_state{state="closed",upstream="n8n-handler1"} 1`} {
		if !strings.Contains(rec.Body.String(), want) {
			t.Errorf("missing %q in\n%s", want, rec.Body)
		}
	}
}

// gatherValue finds one series by name and labels (a subset) and returns
// its value; for histograms, its sample count.
func gatherValue(g prometheus.Gatherer, name string, labels map[string]string) (float64, error) {
	families, err := g.Gather()
	if err != nil {
		return 0, err
	}
	for _, f := range families {
		if f.GetName() != name {
			continue
		}
	metric:
		for _, m := range f.GetMetric() {
			have := map[string]string{}
			for _, l := range m.GetLabel() {
				have[l.GetName()] = l.GetValue()
			}
			for k, v := range labels {
				if have[k] != v {
					continue metric
				}
			}
			switch {
			case m.Counter != nil:
				return m.GetCounter().GetValue(), nil
			case m.Gauge != nil:
				return m.GetGauge().GetValue(), nil
			case m.Histogram != nil:
				return float64(m.GetHistogram().GetSampleCount()), nil
			}
		}
	}
	return 0, &missingError{name: name, labels: labels}
}

type missingError struct {
	name   string
	labels map[string]string
}

func (e *missingError) Error() string {
	var b strings.Builder
	b.WriteString("no series " + e.name)
	for k, v := range e.labels {
		b.WriteString(" " + k + "=" + v)
	}
	return b.String()
}
