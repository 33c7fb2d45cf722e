package guard

import (
	"context"
	"crypto/rand"
	"encoding/hex"
	"io"
	"net"
	"sync"
	"testing"
	"time"

	"github.com/redis/go-redis/v9"

	"github.com/chatproxy/caddy-chatproxy/internal/testenv"
)

// fakeClock is a settable clock for tests.
type fakeClock struct {
	mu sync.Mutex
	t  time.Time
}

func newFakeClock() *fakeClock {
	return &fakeClock{t: time.Date(2026, 3, 1, 12, 0, 0, 0, time.UTC)}
}

func (c *fakeClock) Now() time.Time {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.t
}

func (c *fakeClock) Advance(d time.Duration) {
	c.mu.Lock()
	c.t = c.t.Add(d)
	c.mu.Unlock()
}

func randomHex(n int) string {
	b := make([]byte, n)
	_, _ = rand.Read(b)
	return hex.EncodeToString(b)
}

// testRedis returns a client for the test Redis (skipping without one) and
// a random key prefix whose keys are deleted when the test ends.
func testRedis(t testing.TB) (*redis.Client, string) {
	t.Helper()
	opt, err := RedisOptions(testenv.RedisURL(t))
	if err != nil {
		t.Fatal(err)
	}
	rdb := redis.NewClient(opt)
	prefix := "chatproxy-test-" + randomHex(6)
	t.Cleanup(func() {
		deleteKeys(t, rdb, prefix)
		_ = rdb.Close()
	})
	return rdb, prefix
}

// redisAt returns a client for addr with the options of the test Redis.
func redisAt(t testing.TB, addr string) *redis.Client {
	t.Helper()
	opt, err := RedisOptions(testenv.RedisURL(t))
	if err != nil {
		t.Fatal(err)
	}
	opt.Addr = addr
	rdb := redis.NewClient(opt)
	t.Cleanup(func() { _ = rdb.Close() })
	return rdb
}

func deleteKeys(t testing.TB, rdb *redis.Client, prefix string) {
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	iter := rdb.Scan(ctx, 0, prefix+":*", 500).Iterator()
	var keys []string
	for iter.Next(ctx) {
		keys = append(keys, iter.Val())
	}
	if err := iter.Err(); err != nil {
		t.Logf("scanning test keys: %v", err)
		return
	}
	if len(keys) > 0 {
		if err := rdb.Del(ctx, keys...).Err(); err != nil {
			t.Logf("deleting test keys: %v", err)
		}
	}
}

// backend builds limiters for one kind of state.
type backend struct {
	name string
	// newLimiter builds a limiter over the backend's state; limiters built
	// by one backend value share it.
	newLimiter func(t *testing.T, cfg LimiterConfig) *Limiter
}

// backends returns the in-process backend and the Redis backend; the
// Redis one skips (or, in CI, fails) the subtest using it when Redis is
// not reachable. Each limiter gets its own key prefix.
func backends() []backend {
	return []backend{{
		name: "memory",
		newLimiter: func(t *testing.T, cfg LimiterConfig) *Limiter {
			l, err := NewLimiter(cfg)
			if err != nil {
				t.Fatal(err)
			}
			return l
		},
	}, {
		name: "redis",
		newLimiter: func(t *testing.T, cfg LimiterConfig) *Limiter {
			rdb, prefix := testRedis(t)
			cfg.Redis = rdb
			cfg.Prefix = prefix
			l, err := NewLimiter(cfg)
			if err != nil {
				t.Fatal(err)
			}
			return l
		},
	}}
}

// tcpProxy forwards connections to a backend; it can refuse connections
// (closed) or accept and never answer (stalled), to play a Redis outage.
type tcpProxy struct {
	target string
	addr   string

	mu      sync.Mutex
	ln      net.Listener
	conns   map[net.Conn]bool
	stalled bool
	wg      sync.WaitGroup
}

func newTCPProxy(t testing.TB, target string) *tcpProxy {
	t.Helper()
	p := &tcpProxy{target: target, conns: make(map[net.Conn]bool)}
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	p.addr = ln.Addr().String()
	p.serve(ln)
	t.Cleanup(func() {
		p.Close()
		p.wg.Wait()
	})
	return p
}

func (p *tcpProxy) serve(ln net.Listener) {
	p.mu.Lock()
	p.ln = ln
	p.mu.Unlock()
	p.wg.Add(1)
	go func() {
		defer p.wg.Done()
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			p.mu.Lock()
			p.conns[c] = true
			stalled := p.stalled
			p.mu.Unlock()
			if stalled {
				continue // hold the connection open, answer nothing
			}
			p.wg.Add(1)
			go func() {
				defer p.wg.Done()
				p.pipe(c)
			}()
		}
	}()
}

func (p *tcpProxy) pipe(c net.Conn) {
	up, err := net.DialTimeout("tcp", p.target, time.Second)
	if err != nil {
		_ = c.Close()
		return
	}
	p.mu.Lock()
	p.conns[up] = true
	p.mu.Unlock()
	done := make(chan struct{}, 2)
	go func() { _, _ = io.Copy(up, c); done <- struct{}{} }()
	go func() { _, _ = io.Copy(c, up); done <- struct{}{} }()
	<-done
	_ = c.Close()
	_ = up.Close()
	<-done
}

// Close stops listening and cuts every connection: connections are
// refused from now on.
func (p *tcpProxy) Close() {
	p.mu.Lock()
	defer p.mu.Unlock()
	if p.ln != nil {
		_ = p.ln.Close()
		p.ln = nil
	}
	for c := range p.conns {
		_ = c.Close()
		delete(p.conns, c)
	}
}

// Reopen listens again on the same address.
func (p *tcpProxy) Reopen(t testing.TB, stalled bool) {
	t.Helper()
	var ln net.Listener
	var err error
	for range 50 { // the port may take a moment to be free again
		if ln, err = net.Listen("tcp", p.addr); err == nil {
			break
		}
		time.Sleep(20 * time.Millisecond)
	}
	if err != nil {
		t.Fatal(err)
	}
	p.mu.Lock()
	p.stalled = stalled
	p.mu.Unlock()
	p.serve(ln)
}
