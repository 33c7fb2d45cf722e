package guard

import (
	"crypto/sha256"
	"encoding/hex"
	"fmt"

	"github.com/caddyserver/caddy/v2"
	"github.com/redis/go-redis/v9"
)

// sharedRedis holds one Redis client for every URL that handlers are
// configured with, across config reloads (Caddy provisions the new config
// before it cleans up the old one).
var sharedRedis = caddy.NewUsagePool()

type pooledRedis struct{ *redis.Client }

func (p pooledRedis) Destruct() error { return p.Close() }

// SharedRedis is a reference to the client every handler configured with
// the same Redis URL shares. Release it once.
type SharedRedis struct {
	Client *redis.Client
	// Key names the client in the pool and in metric labels: "redis:" and
	// a SHA-256 of the URL, so its password never shows.
	Key string
}

// AcquireRedis takes a reference to the shared client for a Redis URL
// (see RedisOptions). The client connects lazily, so this does no network
// I/O.
func AcquireRedis(rawURL string) (*SharedRedis, error) {
	opts, err := RedisOptions(rawURL)
	if err != nil {
		return nil, fmt.Errorf("redis: %w", err)
	}
	sum := sha256.Sum256([]byte(rawURL))
	key := "redis:" + hex.EncodeToString(sum[:])
	val, _, err := sharedRedis.LoadOrNew(key, func() (caddy.Destructor, error) {
		return pooledRedis{redis.NewClient(opts)}, nil
	})
	if err != nil {
		return nil, err
	}
	return &SharedRedis{Client: val.(pooledRedis).Client, Key: key}, nil
}

// Release gives the reference back; the last one closes the client.
func (s *SharedRedis) Release() error {
	if _, err := sharedRedis.Delete(s.Key); err != nil {
		return fmt.Errorf("releasing redis client: %w", err)
	}
	return nil
}
