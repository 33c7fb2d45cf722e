package chatproxy

import (
	"crypto/hmac"
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"fmt"
	"path/filepath"
	"strings"

	"github.com/caddyserver/caddy/v2"
	"github.com/chatproxy/caddy-chatproxy/guard"
	"github.com/chatproxy/caddy-chatproxy/sessions"
	"github.com/redis/go-redis/v9"
)

// storePool shares one store (and its connection pool) between every
// handler configured with the same database, across config reloads: Caddy
// provisions the new config before cleaning up the old one, so the count
// never drops to zero on a reload.
var storePool = caddy.NewUsagePool()

// pooledStore is one shared store and the state of its purge, which all
// the handlers on the store share (see purge.go).
type pooledStore struct {
	sessions.Store
	purge *purgeState
}

func (p pooledStore) Destruct() error { return p.Close() }

// storeKind tells which store a database option selects, and its location.
func storeKind(database string) (string, error) {
	switch {
	case database == "":
		return "sqlite", nil
	case strings.HasPrefix(database, "postgres://"), strings.HasPrefix(database, "postgresql://"):
		return "postgres", nil
	case strings.HasPrefix(database, "sqlite:"):
		if sqlitePath(database) == "" {
			return "", errors.New("database: sqlite: needs a file path, as in sqlite:/var/lib/caddy/chat.db")
		}
		return "sqlite", nil
	}
	return "", errors.New("database: must be a postgres:// or postgresql:// URL, or sqlite:<path>")
}

func sqlitePath(database string) string {
	if database == "" {
		return sessions.DefaultSQLitePath()
	}
	p := strings.TrimPrefix(strings.TrimPrefix(database, "sqlite:"), "//")
	if p == "" {
		return ""
	}
	if abs, err := filepath.Abs(p); err == nil {
		p = abs
	}
	return p
}

// acquireStore takes a reference to the shared store for the database
// option. The key is a hash, so a password in the URL never appears in
// pool keys or logs.
func acquireStore(database string) (sessions.Store, string, error) {
	p, key, err := acquirePooledStore(database)
	return p.Store, key, err
}

// acquirePooledStore is acquireStore with the store's shared purge state.
func acquirePooledStore(database string) (pooledStore, string, error) {
	kind, err := storeKind(database)
	if err != nil {
		return pooledStore{}, "", err
	}
	var target string
	if kind == "postgres" {
		target = database
	} else {
		target = sqlitePath(database)
	}
	sum := sha256.Sum256([]byte(target))
	key := kind + ":" + hex.EncodeToString(sum[:])
	val, _, err := storePool.LoadOrNew(key, func() (caddy.Destructor, error) {
		var s sessions.Store
		var err error
		if kind == "postgres" {
			s, err = sessions.OpenPostgres(target)
		} else {
			s, err = sessions.OpenSQLite(target)
		}
		if err != nil {
			return nil, fmt.Errorf("database: %w", err)
		}
		return pooledStore{Store: s, purge: newPurgeState()}, nil
	})
	if err != nil {
		return pooledStore{}, "", err
	}
	return val.(pooledStore), key, nil
}

// redisPool shares one Redis client between every handler configured with
// the same URL, across reloads, as storePool does for stores.
var redisPool = caddy.NewUsagePool()

type pooledRedis struct{ *redis.Client }

func (p pooledRedis) Destruct() error { return p.Close() }

// acquireRedis takes a reference to the shared client for a Redis URL. The
// client connects lazily, so this does no network I/O.
func acquireRedis(rawURL string) (*redis.Client, string, error) {
	opts, err := guard.RedisOptions(rawURL)
	if err != nil {
		return nil, "", fmt.Errorf("redis: %w", err)
	}
	sum := sha256.Sum256([]byte(rawURL))
	key := "redis:" + hex.EncodeToString(sum[:])
	val, _, err := redisPool.LoadOrNew(key, func() (caddy.Destructor, error) {
		return pooledRedis{redis.NewClient(opts)}, nil
	})
	if err != nil {
		return nil, "", err
	}
	return val.(pooledRedis).Client, key, nil
}

// deriveKey derives a purpose-bound key from a configured secret, so one
// secret never serves two purposes directly.
func deriveKey(secret []byte, purpose string) []byte {
	mac := hmac.New(sha256.New, secret)
	mac.Write([]byte(purpose))
	return mac.Sum(nil)
}
