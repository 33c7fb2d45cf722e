package signed

import (
	"context"
	"errors"
	"sync"
	"time"

	"github.com/redis/go-redis/v9"
)

// DefaultReplayPrefix starts the Redis keys of remembered signatures:
// <prefix>:<hex MAC>.
const DefaultReplayPrefix = "chatproxy:sig"

// RedisReplay remembers signatures in Redis with SET NX and a TTL, so that
// every instance sharing the Redis refuses a replay.
type RedisReplay struct {
	client  redis.UniversalClient
	prefix  string
	timeout time.Duration
}

// NewRedisReplay remembers signatures under prefix (DefaultReplayPrefix
// when empty). Each call is bounded by timeout (1s when zero).
func NewRedisReplay(client redis.UniversalClient, prefix string, timeout time.Duration) *RedisReplay {
	if prefix == "" {
		prefix = DefaultReplayPrefix
	}
	if timeout <= 0 {
		timeout = time.Second
	}
	return &RedisReplay{client: client, prefix: prefix, timeout: timeout}
}

// First implements ReplayGuard.
func (r *RedisReplay) First(ctx context.Context, key string, ttl time.Duration) (bool, error) {
	if ttl < time.Second {
		ttl = time.Second
	}
	ctx, cancel := context.WithTimeout(ctx, r.timeout)
	defer cancel()
	ok, err := r.client.SetNX(ctx, r.prefix+":"+key, 1, ttl).Result()
	if err != nil {
		return false, errors.New("redis: " + trimRedis(err.Error()))
	}
	return ok, nil
}

// Forget implements Forgetter.
func (r *RedisReplay) Forget(ctx context.Context, key string) error {
	ctx, cancel := context.WithTimeout(ctx, r.timeout)
	defer cancel()
	if err := r.client.Del(ctx, r.prefix+":"+key).Err(); err != nil {
		return errors.New("redis: " + trimRedis(err.Error()))
	}
	return nil
}

func trimRedis(s string) string {
	const p = "redis: "
	if len(s) >= len(p) && s[:len(p)] == p {
		return s[len(p):]
	}
	return s
}

// DefaultMemoryEntries bounds the in-process replay cache: at the
// default window, about 100 signed requests a second.
const DefaultMemoryEntries = 1 << 16

// ErrCacheFull: the in-process cache holds only signatures that are still
// inside their window. Refusing keeps replays out; the caller retries.
var ErrCacheFull = errors.New("replay cache full")

// MemoryReplay remembers signatures in this process, at most max of them.
// When it is full, expired entries are dropped; if none has expired, new
// signatures are refused (First returns ErrCacheFull) rather than old ones
// forgotten, which would let them be replayed.
type MemoryReplay struct {
	mu   sync.Mutex
	max  int
	seen map[string]time.Time
	now  func() time.Time
}

// NewMemoryReplay returns a cache of at most max entries
// (DefaultMemoryEntries when max <= 0); now is its clock (time.Now when
// nil).
func NewMemoryReplay(max int, now func() time.Time) *MemoryReplay {
	if max <= 0 {
		max = DefaultMemoryEntries
	}
	if now == nil {
		now = time.Now
	}
	return &MemoryReplay{max: max, seen: make(map[string]time.Time), now: now}
}

// First implements ReplayGuard.
func (m *MemoryReplay) First(_ context.Context, key string, ttl time.Duration) (bool, error) {
	m.mu.Lock()
	defer m.mu.Unlock()
	now := m.now()
	if exp, ok := m.seen[key]; ok && now.Before(exp) {
		return false, nil
	}
	if len(m.seen) >= m.max {
		for k, exp := range m.seen {
			if !now.Before(exp) {
				delete(m.seen, k)
			}
		}
		if len(m.seen) >= m.max {
			return false, ErrCacheFull
		}
	}
	m.seen[key] = now.Add(ttl)
	return true, nil
}

// Forget implements Forgetter.
func (m *MemoryReplay) Forget(_ context.Context, key string) error {
	m.mu.Lock()
	defer m.mu.Unlock()
	delete(m.seen, key)
	return nil
}

// Len is the number of remembered signatures, expired or not.
func (m *MemoryReplay) Len() int {
	m.mu.Lock()
	defer m.mu.Unlock()
	return len(m.seen)
}

// NewReplay is the guard a handler uses: Redis when it has a client (so
// replays are refused across instances), else an in-process cache.
func NewReplay(client redis.UniversalClient, prefix string) ReplayGuard {
	if client != nil {
		return NewRedisReplay(client, prefix, 0)
	}
	return NewMemoryReplay(0, nil)
}
