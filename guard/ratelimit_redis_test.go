package guard

import (
	"context"
	"fmt"
	"regexp"
	"strings"
	"testing"
	"time"

	"github.com/go-redis/redis_rate/v10"
	"go.uber.org/zap"
	"go.uber.org/zap/zapcore"
	"go.uber.org/zap/zaptest/observer"
)

// Two limiters (two Caddy instances) on one Redis share one budget; a
// different prefix is a different budget.
func TestRedisSharedBudget(t *testing.T) {
	rdb, prefix := testRedis(t)
	other := redisAt(t, rdb.Options().Addr)
	limits := map[Tier][]redis_rate.Limit{TierIP: {redis_rate.PerMinute(60)}}
	a, err := NewLimiter(LimiterConfig{Redis: rdb, Prefix: prefix, Limits: limits, BlockAfter: -1})
	if err != nil {
		t.Fatal(err)
	}
	b, err := NewLimiter(LimiterConfig{Redis: other, Prefix: prefix, Limits: limits, BlockAfter: -1})
	if err != nil {
		t.Fatal(err)
	}
	ip := Key{TierIP, "192.0.2.77"}
	allowed := runConcurrentOn(t, 200, []*Limiter{a, b}, ip)
	t.Logf("two limiters, one Redis: 200 concurrent requests at 60/1m → %d allowed", allowed)
	if allowed != 60 {
		t.Fatalf("%d allowed across two limiters; want 60", allowed)
	}

	_, otherPrefix := testRedis(t)
	c, _ := NewLimiter(LimiterConfig{Redis: rdb, Prefix: otherPrefix, Limits: limits, BlockAfter: -1})
	if got := runConcurrent(t, 100, c, ip); got != 60 {
		t.Fatalf("another prefix: %d allowed; want its own 60", got)
	}
}

// The in-process limiter and the Redis script decide the same, figure for
// figure, for the same sequence of requests.
func TestRedisAndMemoryAgree(t *testing.T) {
	rdb, prefix := testRedis(t)
	limits := map[Tier][]redis_rate.Limit{
		TierIP:      {redis_rate.PerMinute(6), redis_rate.PerHour(20)},
		TierSession: {redis_rate.PerMinute(4)},
		TierDomain:  {redis_rate.PerMinute(30)},
	}
	memClock, redisClock := newFakeClock(), newFakeClock()
	mem, err := NewLimiter(LimiterConfig{Limits: limits, BlockAfter: -1, Now: memClock.Now})
	if err != nil {
		t.Fatal(err)
	}
	red, err := NewLimiter(LimiterConfig{Redis: rdb, Prefix: prefix, Limits: limits, BlockAfter: -1, Now: redisClock.Now})
	if err != nil {
		t.Fatal(err)
	}
	site := Key{TierDomain, "shop.example"}
	steps := 0
	for round := range 12 {
		for i := range 9 {
			keys := []Key{{TierIP, fmt.Sprint("ip", i%3)}, {TierSession, fmt.Sprint("s", i%4)}, site}
			dm, err1 := mem.Allow(context.Background(), keys...)
			dr, err2 := red.Allow(context.Background(), keys...)
			if err1 != nil || err2 != nil {
				t.Fatal(err1, err2)
			}
			steps++
			if dm.Allowed != dr.Allowed || dm.Blocked != dr.Blocked || dm.Tier != dr.Tier || dm.Limit != dr.Limit ||
				dm.Remaining != dr.Remaining || !near(dm.RetryAfter, dr.RetryAfter) || !near(dm.ResetAfter, dr.ResetAfter) {
				t.Fatalf("round %d request %d: memory %+v, redis %+v", round, i, dm, dr)
			}
		}
		step := time.Duration(round%4+1) * 7 * time.Second
		memClock.Advance(step)
		redisClock.Advance(step)
	}
	if red.Degraded() {
		t.Fatal("redis limiter degraded")
	}
	t.Logf("%d decisions identical in memory and Redis", steps)
}

// Redis unreachable mid-test: the limits go on in process, Degraded says
// so, one warning is logged, and Redis is used again once it is back.
func TestRedisOutageFallsBackAndRecovers(t *testing.T) {
	rdb, prefix := testRedis(t)
	proxy := newTCPProxy(t, rdb.Options().Addr)
	client := redisAt(t, proxy.addr)
	core, logs := observer.New(zapcore.InfoLevel)
	l, err := NewLimiter(LimiterConfig{
		Redis:      client,
		Prefix:     prefix,
		Limits:     map[Tier][]redis_rate.Limit{TierIP: {redis_rate.PerMinute(5)}},
		BlockAfter: -1,
		RedisRetry: 200 * time.Millisecond,
		Logger:     zap.New(core),
	})
	if err != nil {
		t.Fatal(err)
	}
	ip := Key{TierIP, "192.0.2.200"}

	if allowed, d := allowN(t, l, 3, ip); allowed != 3 || d.Remaining != 2 || l.Degraded() {
		t.Fatalf("through Redis: %d allowed, %+v, degraded %v", allowed, d, l.Degraded())
	}

	proxy.Close()
	start := time.Now()
	allowed, d := allowN(t, l, 12, ip)
	elapsed := time.Since(start)
	if !l.Degraded() {
		t.Fatal("not degraded with Redis unreachable")
	}
	// A fresh in-process budget: the limit still holds, never fail-open.
	if allowed != 5 || d.Allowed || d.Tier != TierIP {
		t.Fatalf("during the outage: %d of 12 allowed (want 5, in process), last %+v", allowed, d)
	}
	t.Logf("outage: 12 requests in %v, %d allowed in process", elapsed, allowed)
	if elapsed > time.Second {
		t.Fatalf("12 requests took %v during the outage", elapsed)
	}
	warns := logs.FilterLevelExact(zapcore.WarnLevel).All()
	if len(warns) != 1 || !strings.Contains(warns[0].Message, "redis unreachable") {
		t.Fatalf("warnings: %+v; want exactly one", warns)
	}

	// Still down after the retry interval: still one warning.
	time.Sleep(250 * time.Millisecond)
	allowN(t, l, 3, ip)
	if n := logs.FilterLevelExact(zapcore.WarnLevel).Len(); n != 1 {
		t.Fatalf("%d warnings after a failed retry; want 1 per outage", n)
	}

	proxy.Reopen(t, false)
	deadline := time.Now().Add(3 * time.Second)
	for l.Degraded() && time.Now().Before(deadline) {
		d = mustAllow(t, l, ip)
		time.Sleep(20 * time.Millisecond)
	}
	if l.Degraded() {
		t.Fatal("still degraded 3s after Redis came back")
	}
	// The request that found Redis again was counted there: 3 + 1 of 5.
	if !d.Allowed || d.Remaining != 1 {
		t.Fatalf("first request after recovery: %+v; want allowed from Redis's budget with 1 left", d)
	}
	infos := logs.FilterMessageSnippet("reachable again").All()
	if len(infos) != 1 {
		t.Fatalf("recovery log lines: %d; want 1", len(infos))
	}
	if d = mustAllow(t, l, ip); !d.Allowed || d.Remaining != 0 {
		t.Fatalf("second request after recovery: %+v", d)
	}
	if d = mustAllow(t, l, ip); d.Allowed {
		t.Fatalf("Redis budget exhausted, yet allowed: %+v", d)
	}
}

// A Redis that accepts connections but never answers costs one request
// the call timeout; during the outage other requests do not wait.
func TestRedisStallBoundedByTimeout(t *testing.T) {
	rdb, prefix := testRedis(t)
	proxy := newTCPProxy(t, rdb.Options().Addr)
	proxy.Close()
	proxy.Reopen(t, true)
	client := redisAt(t, proxy.addr)
	l, err := NewLimiter(LimiterConfig{
		Redis:        client,
		Prefix:       prefix,
		Limits:       map[Tier][]redis_rate.Limit{TierIP: {redis_rate.PerMinute(5)}},
		RedisTimeout: 250 * time.Millisecond,
		RedisRetry:   time.Minute,
	})
	if err != nil {
		t.Fatal(err)
	}
	ip := Key{TierIP, "192.0.2.201"}
	start := time.Now()
	d := mustAllow(t, l, ip)
	first := time.Since(start)
	if !d.Allowed || !l.Degraded() {
		t.Fatalf("stalled Redis: %+v, degraded %v", d, l.Degraded())
	}
	if first > 900*time.Millisecond {
		t.Fatalf("first request took %v with a 250ms Redis timeout", first)
	}
	start = time.Now()
	allowed, _ := allowN(t, l, 20, ip)
	rest := time.Since(start)
	t.Logf("stalled Redis: first request %v, next 20 in %v (%d allowed)", first, rest, allowed)
	if rest > 100*time.Millisecond || allowed != 4 {
		t.Fatalf("during the outage 20 requests took %v, %d allowed; want fast, 4", rest, allowed)
	}
}

// Keys are <prefix>:<tier>:<window>:<hashed id>; raw identities never
// appear.
func TestRedisKeyNames(t *testing.T) {
	rdb, prefix := testRedis(t)
	for _, hashKey := range [][]byte{nil, []byte("0123456789abcdef0123456789abcdef")} {
		l, err := NewLimiter(LimiterConfig{Redis: rdb, Prefix: prefix, HashKey: hashKey, BlockAfter: 1})
		if err != nil {
			t.Fatal(err)
		}
		ip := Key{TierIP, "192.0.2.33"}
		keys := []Key{ip, {TierSession, "sess-secret-id"}, {TierDomain, "shop.example"}}
		allowN(t, l, 70, keys...) // past the session limit: strikes and a block
		allowN(t, l, 70, ip)      // past the ip limit too
		if _, err := l.CountRepeat(context.Background(), "sess-secret-id", "hello", time.Minute); err != nil {
			t.Fatal(err)
		}
	}
	names, err := rdb.Keys(context.Background(), prefix+":*").Result()
	if err != nil {
		t.Fatal(err)
	}
	re := regexp.MustCompile(`^` + regexp.QuoteMeta(prefix) + `:(?:(?:ip|session|domain|create):(?:\d+[smhd]|strikes|blocked)|repeat:[0-9a-f]{32}):[0-9a-f]{32}$`)
	seen := map[string]bool{}
	for _, n := range names {
		if !re.MatchString(n) {
			t.Errorf("key %q has an unexpected form", n)
		}
		if strings.Contains(n, "192.0.2") || strings.Contains(n, "secret") || strings.Contains(n, "shop") {
			t.Errorf("key %q holds a raw identity", n)
		}
		seen[strings.Join(strings.Split(n, ":")[1:3], ":")] = true
	}
	for _, want := range []string{"ip:1m", "ip:1h", "session:1m", "domain:1m", "session:blocked", "ip:blocked"} {
		if !seen[want] {
			t.Errorf("no %s key among %v", want, names)
		}
	}
	// The two hash keys named different keys: two sets of windows.
	ipMinute := 0
	for _, n := range names {
		if strings.HasPrefix(n, prefix+":ip:1m:") {
			ipMinute++
		}
	}
	if ipMinute != 2 {
		t.Errorf("%d ip:1m keys; want one per hash key", ipMinute)
	}
}

// Repeat offenders in Redis, with Redis's own clock and TTLs.
func TestRedisRepeatOffenderBlocked(t *testing.T) {
	rdb, prefix := testRedis(t)
	l, err := NewLimiter(LimiterConfig{
		Redis: rdb, Prefix: prefix,
		Limits:     map[Tier][]redis_rate.Limit{TierIP: {redis_rate.PerMinute(2)}},
		BlockAfter: 2, BlockWindow: time.Minute, BlockFor: 400 * time.Millisecond,
	})
	if err != nil {
		t.Fatal(err)
	}
	ip := Key{TierIP, "192.0.2.150"}
	allowN(t, l, 2, ip)
	for i := 1; i <= 2; i++ {
		if d := mustAllow(t, l, ip); d.Allowed || d.Blocked {
			t.Fatalf("refusal %d: %+v", i, d)
		}
	}
	d := mustAllow(t, l, ip)
	// Retry-After is the longer of the block and the rate's own wait.
	if !d.Blocked || d.RetryAfter < 29*time.Second {
		t.Fatalf("3rd refusal: %+v; want blocked, retry after ~30s", d)
	}
	if d = mustAllow(t, l, ip); !d.Blocked || d.RetryAfter > 400*time.Millisecond || d.RetryAfter <= 0 {
		t.Fatalf("while blocked: %+v", d)
	}
	time.Sleep(450 * time.Millisecond)
	if d = mustAllow(t, l, ip); d.Blocked || d.Allowed {
		t.Fatalf("after the block: %+v; want refused by the rate, no longer blocked", d)
	}
}

func TestCountRepeat(t *testing.T) {
	for _, b := range backends() {
		t.Run(b.name, func(t *testing.T) {
			clock := newFakeClock()
			l := b.newLimiter(t, LimiterConfig{Now: clock.Now})
			ctx := context.Background()
			count := func(sess, text string) int {
				n, err := l.CountRepeat(ctx, sess, text, 300*time.Millisecond)
				if err != nil {
					t.Fatal(err)
				}
				return n
			}
			for want := 1; want <= 3; want++ {
				if got := count("s1", "hello"); got != want {
					t.Fatalf("count %d; want %d", got, want)
				}
			}
			if count("s1", "other") != 1 || count("s2", "hello") != 1 {
				t.Fatal("texts or sessions share counts")
			}
			// The window: fake time for memory, real TTL for Redis.
			clock.Advance(time.Second)
			if b.name == "redis" {
				time.Sleep(350 * time.Millisecond)
			}
			if got := count("s1", "hello"); got != 1 {
				t.Fatalf("after the window: %d; want 1", got)
			}
			if _, err := l.CountRepeat(ctx, "", "x", time.Minute); err == nil {
				t.Fatal("empty session accepted")
			}
		})
	}
}

func TestRedisOptions(t *testing.T) {
	opt, err := RedisOptions("redis://:pw@127.0.0.1:6380/2")
	if err != nil {
		t.Fatal(err)
	}
	if !opt.ContextTimeoutEnabled || opt.DialTimeout != time.Second || opt.ReadTimeout != time.Second || opt.DB != 2 || opt.Password != "pw" {
		t.Fatalf("options: %+v", opt)
	}
	opt, err = RedisOptions("redis://127.0.0.1:6379/0?read_timeout=5s&dial_timeout=3s")
	if err != nil || opt.ReadTimeout != 5*time.Second || opt.DialTimeout != 3*time.Second {
		t.Fatalf("URL timeouts not kept: %+v, %v", opt, err)
	}
	_, err = RedisOptions("http://user:hunter2@example.com")
	if err == nil || strings.Contains(err.Error(), "hunter2") {
		t.Fatalf("bad URL: %v", err)
	}
}

// The four keys of a chat message (ip 1m and 1h, session, domain), in
// process and in one Redis round trip.
func BenchmarkAllow(b *testing.B) {
	keys := []Key{{TierIP, "192.0.2.1"}, {TierSession, "s"}, {TierDomain, "shop.example"}}
	huge := map[Tier][]redis_rate.Limit{
		TierIP:      {redis_rate.PerMinute(1_000_000), redis_rate.PerHour(1_000_000)},
		TierSession: {redis_rate.PerMinute(1_000_000)},
		TierDomain:  {redis_rate.PerMinute(1_000_000)},
	}
	b.Run("memory", func(b *testing.B) {
		l, _ := NewLimiter(LimiterConfig{Limits: huge})
		for b.Loop() {
			if _, err := l.Allow(context.Background(), keys...); err != nil {
				b.Fatal(err)
			}
		}
	})
	b.Run("redis", func(b *testing.B) {
		rdb, prefix := testRedis(b)
		l, _ := NewLimiter(LimiterConfig{Redis: rdb, Prefix: prefix, Limits: huge})
		for b.Loop() {
			if _, err := l.Allow(context.Background(), keys...); err != nil {
				b.Fatal(err)
			}
		}
		if l.Degraded() {
			b.Fatal("degraded")
		}
	})
}
