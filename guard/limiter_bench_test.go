package guard

import (
	"context"
	"strconv"
	"sync/atomic"
	"testing"
	"time"

	"github.com/go-redis/redis_rate/v10"
)

// BenchmarkAllow (ratelimit_redis_test.go) covers one client's chat keys,
// one goroutine at a time. These add what a busy site does: many clients
// at once (parallel, distinct keys, HMAC-named as the module configures
// the limiter), session creation's keys, and the repeated-message counter
// the bot filter calls for every message.

// benchLimits are the default tier shapes with budgets that never run out.
var benchLimits = map[Tier][]redis_rate.Limit{
	TierIP:      {redis_rate.PerMinute(1_000_000), redis_rate.PerHour(1_000_000)},
	TierSession: {redis_rate.PerMinute(1_000_000)},
	TierDomain:  {redis_rate.PerMinute(1_000_000)},
	TierCreate:  {redis_rate.PerMinute(1_000_000)},
}

var benchHashKey = []byte("bench-rate-limit-key-0123456789abcdef")

// benchLimiter returns a limiter in process, or on the test Redis (with a
// prefix of its own whose keys are deleted afterwards).
func benchLimiter(b *testing.B, backend string) *Limiter {
	b.Helper()
	cfg := LimiterConfig{Limits: benchLimits, HashKey: benchHashKey}
	if backend == "redis" {
		cfg.Redis, cfg.Prefix = testRedis(b)
	}
	l, err := NewLimiter(cfg)
	if err != nil {
		b.Fatal(err)
	}
	return l
}

func checkNotDegraded(b *testing.B, l *Limiter) {
	b.Helper()
	if l.Degraded() {
		b.Fatal("limiter degraded: Redis failed during the benchmark")
	}
}

// A chat message's four windows (ip 1m and 1h, session, domain) from many
// clients at once: 10,000 client IPs and sessions in turn, on one site.
func BenchmarkAllowParallel(b *testing.B) {
	for _, backend := range []string{"memory", "redis"} {
		b.Run(backend, func(b *testing.B) {
			l := benchLimiter(b, backend)
			var next atomic.Uint64
			b.ReportAllocs()
			b.SetParallelism(8) // requests in flight per CPU, as on a busy server
			b.RunParallel(func(pb *testing.PB) {
				ctx := context.Background()
				for pb.Next() {
					i := next.Add(1) % 10_000
					id := strconv.FormatUint(i, 10)
					d, err := l.Allow(ctx,
						Key{TierIP, "198.51." + strconv.FormatUint(i/256, 10) + "." + strconv.FormatUint(i%256, 10)},
						Key{TierSession, "session-" + id}, Key{TierDomain, "shop.example.com"})
					if err != nil || !d.Allowed {
						b.Fatalf("allow: %+v, %v", d, err)
					}
				}
			})
			checkNotDegraded(b, l)
		})
	}
}

// Session creation checks ip and create for the client.
func BenchmarkAllowCreate(b *testing.B) {
	for _, backend := range []string{"memory", "redis"} {
		b.Run(backend, func(b *testing.B) {
			l := benchLimiter(b, backend)
			ctx := context.Background()
			ip := IPKeyID("203.0.113.9")
			b.ReportAllocs()
			for b.Loop() {
				d, err := l.Allow(ctx, Key{TierIP, ip}, Key{TierCreate, ip})
				if err != nil || !d.Allowed {
					b.Fatalf("allow: %+v, %v", d, err)
				}
			}
			checkNotDegraded(b, l)
		})
	}
}

// The repeated-message count, one per chat message when bot detection is
// on (a Redis round trip of its own when Redis is set).
func BenchmarkCountRepeat(b *testing.B) {
	for _, backend := range []string{"memory", "redis"} {
		b.Run(backend, func(b *testing.B) {
			l := benchLimiter(b, backend)
			ctx := context.Background()
			i := 0
			b.ReportAllocs()
			for b.Loop() {
				i++
				if _, err := l.CountRepeat(ctx, "session-"+strconv.Itoa(i%1000), "where is my order?", 5*time.Minute); err != nil {
					b.Fatal(err)
				}
			}
			checkNotDegraded(b, l)
		})
	}
}

// Scoring one ordinary message with every signal in play (user agent,
// repeats counted in process, links, fingerprint).
func BenchmarkBotScore(b *testing.B) {
	l := benchLimiter(b, "memory")
	s, err := NewBotScorer(BotConfig{Repeats: l})
	if err != nil {
		b.Fatal(err)
	}
	sig := BotSignals{
		UserAgent:          "Mozilla/5.0 (X11; Linux x86_64) AppleWebKit/537.36 (KHTML, like Gecko) Chrome/131.0 Safari/537.36",
		Message:            "Hi! Can I change the delivery address of order #4417? See https://shop.example.com/orders/4417",
		SessionCreated:     time.Now().Add(-time.Minute),
		TokenFingerprint:   "fp1",
		RequestFingerprint: "fp1",
	}
	ctx := context.Background()
	i := 0
	b.ReportAllocs()
	for b.Loop() {
		i++
		// Many sessions, so that few repeat their text within a run (a
		// repeat only adds points; the work is the same).
		sig.SessionID = "session-" + strconv.Itoa(i%100_000)
		if v := s.Score(ctx, sig); v.Action == ActionHoneypot {
			b.Fatalf("unexpected verdict: %+v", v)
		}
	}
}

// Input checks of every chat message: normalizing the text and checking
// the context object.
func BenchmarkCheckChatInput(b *testing.B) {
	msg := "Hi!\r\nCan I change the delivery address of order #4417?\tThanks — Zoë 🙂"
	ctxObj := []byte(`{"page":{"title":"Order 4417","lang":"en"},"cart":{"items":3,"total":"59.90"}}`)
	b.ReportAllocs()
	for b.Loop() {
		if _, err := NormalizeMessage(msg, 4000); err != nil {
			b.Fatal(err)
		}
		if err := CheckObject(ctxObj, ObjectLimits{}); err != nil {
			b.Fatal(err)
		}
		if err := CheckPageURL("https://shop.example.com/orders/4417?ref=mail"); err != nil {
			b.Fatal(err)
		}
	}
}
