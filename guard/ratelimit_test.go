package guard

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"net/http"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/go-redis/redis_rate/v10"
	"github.com/redis/go-redis/v9"
)

func TestParseRate(t *testing.T) {
	good := map[string]redis_rate.Limit{
		"60/1m":       {Rate: 60, Burst: 60, Period: time.Minute},
		"1000/1h":     {Rate: 1000, Burst: 1000, Period: time.Hour},
		"5/30s":       {Rate: 5, Burst: 5, Period: 30 * time.Second},
		"100/1d":      {Rate: 100, Burst: 100, Period: 24 * time.Hour},
		"3/1d12h":     {Rate: 3, Burst: 3, Period: 36 * time.Hour},
		"2/1h30m":     {Rate: 2, Burst: 2, Period: 90 * time.Minute},
		"1/1s":        {Rate: 1, Burst: 1, Period: time.Second},
		"10/1.5s":     {Rate: 10, Burst: 10, Period: 1500 * time.Millisecond},
		"7/0.5d":      {Rate: 7, Burst: 7, Period: 12 * time.Hour},
		"1000000/30d": {Rate: 1000000, Burst: 1000000, Period: 30 * 24 * time.Hour},
	}
	for in, want := range good {
		got, err := ParseRate(in)
		if err != nil || got != want {
			t.Errorf("ParseRate(%q) = %v, %v; want %v", in, got, err, want)
		}
	}
	bad := []string{
		"", "60", "60/", "/1m", "0/1m", "-1/1m", "+5/1m", "60/0s", "60/500ms", "60/-1m",
		"60/+1m", "60/1x", "abc/1m", "60/1m/2", "2000000/1m", "60/31d", "60 /1m", "60/ 1m",
		"60/d", "60/1dd", "60/m", "1e3/1m", "60/400d", "0x10/1m",
	}
	for _, in := range bad {
		if got, err := ParseRate(in); err == nil {
			t.Errorf("ParseRate(%q) = %v; want an error", in, got)
		} else if !strings.Contains(err.Error(), fmt.Sprintf("%q", in)) {
			t.Errorf("ParseRate(%q) error %q does not quote the input", in, err)
		}
	}
}

func FuzzParseRate(f *testing.F) {
	for _, s := range []string{"60/1m", "1000/1h", "5/30s", "1/1d", "3/1d12h", "10/1.5s", "0/1m", "60/500ms", "9/9999999h", "1/.d"} {
		f.Add(s)
	}
	f.Fuzz(func(t *testing.T, s string) {
		l, err := ParseRate(s)
		if err != nil {
			if !l.IsZero() {
				t.Fatalf("ParseRate(%q) returned %v with error %v", s, l, err)
			}
			return
		}
		if err := checkLimit(l); err != nil {
			t.Fatalf("ParseRate(%q) = %v, out of bounds: %v", s, l, err)
		}
		if l.Rate != l.Burst {
			t.Fatalf("ParseRate(%q) = %v: burst differs from rate", s, l)
		}
		back, err := ParseRate(FormatRate(l))
		if err != nil || back != l {
			t.Fatalf("round trip of %q via %q = %v, %v; want %v", s, FormatRate(l), back, err, l)
		}
	})
}

func TestFormatWindow(t *testing.T) {
	for d, want := range map[time.Duration]string{
		time.Second: "1s", 30 * time.Second: "30s", time.Minute: "1m", 90 * time.Second: "90s",
		time.Hour: "1h", 36 * time.Hour: "36h", 48 * time.Hour: "2d", 1500 * time.Millisecond: "1.5s",
	} {
		if got := FormatWindow(d); got != want {
			t.Errorf("FormatWindow(%v) = %q; want %q", d, got, want)
		}
	}
}

func TestParseTier(t *testing.T) {
	for _, s := range []string{"ip", "session", "domain", "create", "user"} {
		if tier, err := ParseTier(s); err != nil || string(tier) != s {
			t.Errorf("ParseTier(%q) = %q, %v", s, tier, err)
		}
	}
	for _, s := range []string{"", "IP", "users", "ip "} {
		if _, err := ParseTier(s); err == nil {
			t.Errorf("ParseTier(%q): want an error", s)
		}
	}
}

func TestDefaultLimits(t *testing.T) {
	d := DefaultLimits()
	want := map[Tier]string{TierIP: "60/1m 1000/1h", TierSession: "30/1m", TierDomain: "1000/1m", TierCreate: "10/1m"}
	for tier, w := range want {
		var got []string
		for _, l := range d[tier] {
			got = append(got, FormatRate(l))
		}
		if strings.Join(got, " ") != w {
			t.Errorf("default %s = %v; want %s", tier, got, w)
		}
	}
	d[TierIP] = nil // a copy: changing it changes nothing else
	if len(DefaultLimits()[TierIP]) != 2 {
		t.Error("DefaultLimits shares its map")
	}
}

func TestNewLimiterRefusesBadConfig(t *testing.T) {
	cases := map[string]LimiterConfig{
		"unknown tier":     {Limits: map[Tier][]redis_rate.Limit{"users": {redis_rate.PerMinute(1)}}},
		"duplicate window": {Limits: map[Tier][]redis_rate.Limit{TierIP: {redis_rate.PerMinute(1), redis_rate.PerMinute(2)}}},
		"zero rate":        {Limits: map[Tier][]redis_rate.Limit{TierIP: {{Period: time.Minute}}}},
		"short window":     {Limits: map[Tier][]redis_rate.Limit{TierIP: {{Rate: 1, Burst: 1, Period: 500 * time.Millisecond}}}},
		"negative block":   {BlockFor: -time.Second},
		"bad block tier":   {BlockTiers: []Tier{"users"}},
		"no ctx timeouts":  {Redis: redis.NewClient(&redis.Options{Addr: "127.0.0.1:1"})},
		"cluster no tag": {Redis: redis.NewClusterClient(&redis.ClusterOptions{
			Addrs: []string{"127.0.0.1:1"}, ContextTimeoutEnabled: true,
		})},
	}
	for name, cfg := range cases {
		if _, err := NewLimiter(cfg); err == nil {
			t.Errorf("%s: NewLimiter accepted %+v", name, cfg)
		} else if c := err.Error()[0]; c < 'a' || c > 'z' {
			t.Errorf("%s: error %q is not lower case", name, err)
		}
	}
	cc := redis.NewClusterClient(&redis.ClusterOptions{Addrs: []string{"127.0.0.1:1"}, ContextTimeoutEnabled: true})
	if _, err := NewLimiter(LimiterConfig{Redis: cc, Prefix: "{chatproxy}"}); err != nil {
		t.Errorf("cluster with a hash tag: %v", err)
	}
	_ = cc.Close()
}

// allowN sends n requests for keys and counts those allowed.
func allowN(t *testing.T, l *Limiter, n int, keys ...Key) (allowed int, last Decision) {
	t.Helper()
	for range n {
		d, err := l.Allow(context.Background(), keys...)
		if err != nil {
			t.Fatal(err)
		}
		if d.Allowed {
			allowed++
		}
		last = d
	}
	return allowed, last
}

func mustAllow(t *testing.T, l *Limiter, keys ...Key) Decision {
	t.Helper()
	d, err := l.Allow(context.Background(), keys...)
	if err != nil {
		t.Fatal(err)
	}
	return d
}

func near(a, b time.Duration) bool {
	diff := a - b
	return diff < 2*time.Millisecond && diff > -2*time.Millisecond
}

// GCRA arithmetic with an injected clock (which the Redis backend also
// uses when it is set), on both backends.
func TestGCRAMath(t *testing.T) {
	for _, b := range backends() {
		t.Run(b.name, func(t *testing.T) {
			clock := newFakeClock()
			l := b.newLimiter(t, LimiterConfig{
				Limits:     map[Tier][]redis_rate.Limit{TierIP: {redis_rate.PerMinute(60)}},
				BlockAfter: -1,
				Now:        clock.Now,
			})
			ip := Key{TierIP, "192.0.2.1"}

			// A fresh key: the whole burst, one emission interval (1s) per request.
			d := mustAllow(t, l, ip)
			if !d.Allowed || d.Remaining != 59 || !near(d.ResetAfter, time.Second) || d.Tier != TierIP || d.Limit != redis_rate.PerMinute(60) {
				t.Fatalf("first request: %+v", d)
			}
			allowed, d := allowN(t, l, 59, ip)
			if allowed != 59 || d.Remaining != 0 || !near(d.ResetAfter, time.Minute) {
				t.Fatalf("burst: %d allowed, last %+v", allowed, d)
			}

			// The 61st at the same instant: refused, retry in exactly 1s.
			d = mustAllow(t, l, ip)
			if d.Allowed || d.Blocked || !near(d.RetryAfter, time.Second) || !near(d.ResetAfter, time.Minute) || d.Remaining != 0 {
				t.Fatalf("over the burst: %+v", d)
			}
			// A refusal consumes nothing: 999ms later still 1ms to wait.
			clock.Advance(999 * time.Millisecond)
			d = mustAllow(t, l, ip)
			if d.Allowed || !near(d.RetryAfter, time.Millisecond) {
				t.Fatalf("after 999ms: %+v", d)
			}
			clock.Advance(time.Millisecond)
			if d = mustAllow(t, l, ip); !d.Allowed || d.Remaining != 0 {
				t.Fatalf("after 1s: %+v", d)
			}
			if d = mustAllow(t, l, ip); d.Allowed {
				t.Fatalf("second request after 1s: %+v", d)
			}

			// Refill: 30s give 30 requests.
			clock.Advance(30 * time.Second)
			if allowed, _ := allowN(t, l, 40, ip); allowed != 30 {
				t.Fatalf("after 30s: %d allowed; want 30", allowed)
			}

			// Full reset after a quiet minute: the whole burst again.
			clock.Advance(time.Minute)
			d = mustAllow(t, l, ip)
			if !d.Allowed || d.Remaining != 59 {
				t.Fatalf("after a quiet minute: %+v", d)
			}
			// Another key is independent.
			if d = mustAllow(t, l, Key{TierIP, "192.0.2.2"}); d.Remaining != 59 {
				t.Fatalf("other key: %+v", d)
			}
		})
	}
}

// A burst larger than the rate per period (redis_rate.Limit allows it).
func TestGCRABurstDiffersFromRate(t *testing.T) {
	for _, b := range backends() {
		t.Run(b.name, func(t *testing.T) {
			clock := newFakeClock()
			l := b.newLimiter(t, LimiterConfig{
				Limits:     map[Tier][]redis_rate.Limit{TierIP: {{Rate: 6, Burst: 3, Period: time.Minute}}},
				BlockAfter: -1,
				Now:        clock.Now,
			})
			ip := Key{TierIP, "a"}
			if allowed, d := allowN(t, l, 5, ip); allowed != 3 || !near(d.RetryAfter, 10*time.Second) {
				t.Fatalf("burst 3 at 6/1m: %d allowed, %+v", allowed, d)
			}
			clock.Advance(10 * time.Second)
			if allowed, _ := allowN(t, l, 5, ip); allowed != 1 {
				t.Fatalf("10s later: %d allowed; want 1", allowed)
			}
		})
	}
}

// windowRemaining reads the state of one window of a key, as requests
// left now, straight from the backend.
func windowRemaining(t *testing.T, l *Limiter, k Key, lim redis_rate.Limit) float64 {
	t.Helper()
	g := group{key: k, id: l.hashID(k.ID)}
	key := l.windowKey(g, lim)
	now := epochSeconds(l.clock())
	var tat float64
	var ok bool
	if l.rdb != nil {
		v, err := l.rdb.Get(context.Background(), key).Float64()
		if err != nil && !errors.Is(err, redis.Nil) {
			t.Fatal(err)
		}
		tat, ok = v, err == nil
	} else {
		l.mem.mu.Lock()
		tat, ok = l.mem.tats[key]
		l.mem.mu.Unlock()
	}
	if !ok || tat < now {
		return float64(lim.Burst)
	}
	emission := lim.Period.Seconds() / float64(lim.Rate)
	return (now - (tat - emission*float64(lim.Burst))) / emission
}

// Several windows per tier: a request refused by one window spends nothing
// from the others.
func TestMultiWindowRefusalConsumesNothing(t *testing.T) {
	for _, b := range backends() {
		t.Run(b.name, func(t *testing.T) {
			clock := newFakeClock()
			perMin := redis_rate.Limit{Rate: 6, Burst: 6, Period: time.Minute}
			perHour := redis_rate.Limit{Rate: 4, Burst: 4, Period: time.Hour}
			l := b.newLimiter(t, LimiterConfig{
				Limits:     map[Tier][]redis_rate.Limit{TierIP: {perMin, perHour}},
				BlockAfter: -1,
				Now:        clock.Now,
			})
			ip := Key{TierIP, "198.51.100.7"}

			// 4 pass both windows; then the 1h window refuses.
			allowed, d := allowN(t, l, 4, ip)
			if allowed != 4 || d.Limit != perHour || d.Remaining != 0 {
				t.Fatalf("4 requests: %d allowed, last %+v (want the tighter 1h window reported)", allowed, d)
			}
			allowed, d = allowN(t, l, 20, ip)
			if allowed != 0 || d.Limit != perHour || d.Tier != TierIP || !near(d.RetryAfter, 15*time.Minute) {
				t.Fatalf("20 more: %d allowed, last %+v; want refusals by the 1h window", allowed, d)
			}
			if got := windowRemaining(t, l, ip, perMin); got < 1.99 || got > 2.01 {
				t.Fatalf("the 1m window has %.3f left; want 2 (the refused requests spent it)", got)
			}

			// The other way round: the 1m window refuses, the 1h window keeps its budget.
			clock.Advance(2 * time.Hour)
			perMin2 := redis_rate.Limit{Rate: 2, Burst: 2, Period: time.Minute}
			perHour2 := redis_rate.Limit{Rate: 100, Burst: 100, Period: time.Hour}
			l2 := b.newLimiter(t, LimiterConfig{
				Limits:     map[Tier][]redis_rate.Limit{TierIP: {perMin2, perHour2}},
				BlockAfter: -1,
				Now:        clock.Now,
			})
			allowed, d = allowN(t, l2, 12, ip)
			if allowed != 2 || d.Limit != perMin2 {
				t.Fatalf("12 requests at 2/1m: %d allowed, last %+v", allowed, d)
			}
			if got := windowRemaining(t, l2, ip, perHour2); got < 97.99 || got > 98.01 {
				t.Fatalf("the 1h window has %.3f left; want 98", got)
			}
		})
	}
}

// All keys of a request are consumed together or not at all.
func TestRefusingTierSpendsNoOtherTier(t *testing.T) {
	for _, b := range backends() {
		t.Run(b.name, func(t *testing.T) {
			clock := newFakeClock()
			l := b.newLimiter(t, LimiterConfig{
				Limits: map[Tier][]redis_rate.Limit{
					TierIP:      {{Rate: 3, Burst: 3, Period: time.Hour}},
					TierSession: {redis_rate.PerMinute(10)},
					TierDomain:  {redis_rate.PerMinute(1000)},
				},
				BlockAfter: -1,
				Now:        clock.Now,
			})
			ip1, ip2 := Key{TierIP, "203.0.113.1"}, Key{TierIP, "203.0.113.2"}
			sess, site := Key{TierSession, "s1"}, Key{TierDomain, "shop.example"}
			if allowed, _ := allowN(t, l, 3, ip1, sess, site); allowed != 3 {
				t.Fatal("the first 3 should pass")
			}
			allowed, d := allowN(t, l, 25, ip1, sess, site)
			if allowed != 0 || d.Tier != TierIP {
				t.Fatalf("25 more from ip1: %d allowed, last %+v; want refused by ip", allowed, d)
			}
			// From another IP the session has 10-3 left: the refusals spent none.
			if d = mustAllow(t, l, ip2, sess, site); !d.Allowed {
				t.Fatalf("from ip2: %+v", d)
			}
			if got := windowRemaining(t, l, sess, redis_rate.PerMinute(10)); got < 5.99 || got > 6.01 {
				t.Fatalf("session window has %.3f left; want 6", got)
			}
			if got := windowRemaining(t, l, site, redis_rate.PerMinute(1000)); got < 995.99 || got > 996.01 {
				t.Fatalf("domain window has %.3f left; want 996", got)
			}
		})
	}
}

// 200 concurrent requests at 60/1m: exactly 60 pass.
func TestConcurrentRequestsExactBudget(t *testing.T) {
	for _, b := range backends() {
		t.Run(b.name, func(t *testing.T) {
			l := b.newLimiter(t, LimiterConfig{
				Limits:     map[Tier][]redis_rate.Limit{TierIP: {redis_rate.PerMinute(60)}},
				BlockAfter: -1,
			})
			allowed := runConcurrent(t, 200, l, Key{TierIP, "192.0.2.50"})
			t.Logf("%s: 200 concurrent requests at 60/1m → %d allowed", b.name, allowed)
			if allowed != 60 {
				t.Fatalf("%d of 200 concurrent requests allowed; want 60", allowed)
			}
		})
	}
}

// runConcurrent fires n requests at once, from the given limiters in turn.
func runConcurrent(t *testing.T, n int, l *Limiter, keys ...Key) int {
	return runConcurrentOn(t, n, []*Limiter{l}, keys...)
}

func runConcurrentOn(t *testing.T, n int, ls []*Limiter, keys ...Key) int {
	t.Helper()
	var allowed atomic.Int64
	var wg sync.WaitGroup
	start := make(chan struct{})
	errs := make(chan error, n)
	for i := range n {
		wg.Add(1)
		go func() {
			defer wg.Done()
			<-start
			d, err := ls[i%len(ls)].Allow(context.Background(), keys...)
			if err != nil {
				errs <- err
				return
			}
			if d.Allowed {
				allowed.Add(1)
			}
		}()
	}
	close(start)
	wg.Wait()
	close(errs)
	for err := range errs {
		t.Fatal(err)
	}
	for _, l := range ls {
		if l.Degraded() {
			t.Fatal("limiter degraded during the test")
		}
	}
	return int(allowed.Load())
}

func TestRepeatOffenderBlocked(t *testing.T) {
	clock := newFakeClock()
	l, err := NewLimiter(LimiterConfig{
		Limits:      map[Tier][]redis_rate.Limit{TierIP: {redis_rate.PerMinute(2)}, TierSession: {redis_rate.PerMinute(100)}},
		BlockAfter:  3,
		BlockWindow: time.Minute,
		BlockFor:    5 * time.Minute,
		Now:         clock.Now,
	})
	if err != nil {
		t.Fatal(err)
	}
	ip, sess := Key{TierIP, "192.0.2.9"}, Key{TierSession, "s"}
	if allowed, _ := allowN(t, l, 2, ip, sess); allowed != 2 {
		t.Fatal("burst of 2 should pass")
	}
	for i := 1; i <= 3; i++ {
		if d := mustAllow(t, l, ip, sess); d.Allowed || d.Blocked {
			t.Fatalf("refusal %d: %+v; want refused, not blocked yet", i, d)
		}
	}
	d := mustAllow(t, l, ip, sess)
	if d.Allowed || !d.Blocked || d.Tier != TierIP || d.RetryAfter != 5*time.Minute {
		t.Fatalf("4th refusal: %+v; want blocked for 5m", d)
	}
	body := d.Body()
	if body.RetryAfter != 300 || !strings.Contains(body.Message, "blocked") {
		t.Fatalf("blocked body: %+v", body)
	}

	// Blocked: refused without further checks, and the block is not
	// extended by the requests it refuses.
	clock.Advance(4 * time.Minute)
	d = mustAllow(t, l, ip, sess)
	if d.Allowed || !d.Blocked || !near(d.RetryAfter, time.Minute) {
		t.Fatalf("4m into the block: %+v", d)
	}
	// The session's budget was not spent by the blocked requests.
	if got := windowRemaining(t, l, sess, redis_rate.PerMinute(100)); got < 99.99 {
		t.Fatalf("session window has %.2f left; blocked requests spent it", got)
	}
	clock.Advance(time.Minute + time.Millisecond)
	if d = mustAllow(t, l, ip, sess); !d.Allowed {
		t.Fatalf("after the block: %+v", d)
	}

	// Refusals spread wider than BlockWindow never add up to a block.
	l2, _ := NewLimiter(LimiterConfig{
		Limits:     map[Tier][]redis_rate.Limit{TierIP: {{Rate: 1, Burst: 1, Period: time.Hour}}},
		BlockAfter: 3, BlockWindow: time.Minute, BlockFor: 5 * time.Minute, Now: clock.Now,
	})
	mustAllow(t, l2, ip)
	for range 10 {
		if d := mustAllow(t, l2, ip); d.Blocked {
			t.Fatalf("blocked by refusals more than a minute apart: %+v", d)
		}
		clock.Advance(time.Minute)
	}
}

func TestDomainTierNotBlockedByDefault(t *testing.T) {
	l, err := NewLimiter(LimiterConfig{
		Limits:     map[Tier][]redis_rate.Limit{TierDomain: {redis_rate.PerMinute(1)}},
		BlockAfter: 2,
	})
	if err != nil {
		t.Fatal(err)
	}
	site := Key{TierDomain, "shop.example"}
	if _, d := allowN(t, l, 20, site); d.Allowed || d.Blocked {
		t.Fatalf("domain tier: %+v; want refused, never blocked", d)
	}
}

func TestDecisionHeadersAndBody(t *testing.T) {
	clock := newFakeClock()
	l, _ := NewLimiter(LimiterConfig{Limits: map[Tier][]redis_rate.Limit{TierIP: {redis_rate.PerMinute(60)}}, Now: clock.Now})
	ip := Key{TierIP, "x"}
	_, d := allowN(t, l, 60, ip)
	h := http.Header{}
	d.SetHeaders(h)
	if h.Get("RateLimit-Limit") != "60" || h.Get("RateLimit-Remaining") != "0" || h.Get("RateLimit-Reset") != "60" || h.Get("Retry-After") != "" {
		t.Fatalf("allowed headers: %v", h)
	}
	clock.Advance(500 * time.Millisecond)
	d = mustAllow(t, l, ip)
	h = http.Header{}
	d.SetHeaders(h)
	if h.Get("Retry-After") != "1" || h.Get("RateLimit-Remaining") != "0" || h.Get("RateLimit-Reset") != "60" {
		t.Fatalf("refused headers: %v (%+v)", h, d)
	}
	b, err := json.Marshal(d.Body())
	if err != nil {
		t.Fatal(err)
	}
	want := `{"error":"rate_limited","message":"too many requests; retry in 1 second","retry_after":1,"tier":"ip"}`
	if string(b) != want {
		t.Fatalf("body %s; want %s", b, want)
	}
	// No limit applied: no RateLimit headers.
	h = http.Header{}
	Decision{Allowed: true}.SetHeaders(h)
	if len(h) != 0 {
		t.Fatalf("headers without a limit: %v", h)
	}
}

func TestAllowInputs(t *testing.T) {
	l, _ := NewLimiter(LimiterConfig{Limits: map[Tier][]redis_rate.Limit{TierIP: {redis_rate.PerMinute(1)}}})
	ctx := context.Background()
	if _, err := l.Allow(ctx, Key{TierIP, ""}); err == nil {
		t.Error("empty id accepted")
	}
	if _, err := l.Allow(ctx, Key{"users", "x"}); err == nil {
		t.Error("unknown tier accepted")
	}
	// A tier without limits is not limited.
	if _, d := allowN(t, l, 5, Key{TierSession, "s"}); !d.Allowed || !d.Limit.IsZero() {
		t.Errorf("unlimited tier: %+v", d)
	}
	// Duplicate keys count once.
	if d := mustAllow(t, l, Key{TierIP, "dup"}, Key{TierIP, "dup"}); !d.Allowed {
		t.Errorf("duplicate key counted twice: %+v", d)
	}
	canceled, cancel := context.WithCancel(ctx)
	cancel()
	if _, err := l.Allow(canceled, Key{TierIP, "y"}); !errors.Is(err, context.Canceled) {
		t.Errorf("canceled context: %v", err)
	}
}

// The in-process state cannot grow without bound: expired entries are
// swept as it grows.
func TestMemStoreSweeps(t *testing.T) {
	clock := newFakeClock()
	l, _ := NewLimiter(LimiterConfig{Limits: map[Tier][]redis_rate.Limit{TierIP: {redis_rate.PerSecond(1)}}, Now: clock.Now})
	for i := range 50_000 {
		mustAllow(t, l, Key{TierIP, fmt.Sprint("ip", i)})
		clock.Advance(time.Millisecond) // each entry lives 1s: ~1000 are live at any time
	}
	l.mem.mu.Lock()
	n := l.mem.size()
	l.mem.mu.Unlock()
	if n > 4*memSweepMinSize {
		t.Fatalf("%d entries kept for ~1000 live ones", n)
	}
}

func TestIPKeyID(t *testing.T) {
	for in, want := range map[string]string{
		"192.0.2.1":            "192.0.2.1",
		"::ffff:192.0.2.1":     "192.0.2.1",
		"2001:db8:1:2:3:4:5:6": "2001:db8:1:2::/64",
		"2001:db8:1:2:ffff::1": "2001:db8:1:2::/64",
		"fe80::1%eth0":         "fe80::/64",
		"not-an-ip":            "not-an-ip",
	} {
		if got := IPKeyID(in); got != want {
			t.Errorf("IPKeyID(%q) = %q; want %q", in, got, want)
		}
	}
}
