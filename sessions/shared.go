package sessions

import (
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"fmt"
	"path/filepath"
	"strings"

	"github.com/caddyserver/caddy/v2"
)

// Store kinds, as a database option selects them.
const (
	KindPostgres = "postgres"
	KindSQLite   = "sqlite"
)

// StoreKind tells which store a database option selects: a postgres:// or
// postgresql:// URL is PostgreSQL; "" (the default) and sqlite:<path> are
// the embedded store.
func StoreKind(database string) (string, error) {
	switch {
	case database == "":
		return KindSQLite, nil
	case strings.HasPrefix(database, "postgres://"), strings.HasPrefix(database, "postgresql://"):
		return KindPostgres, nil
	case strings.HasPrefix(database, "sqlite:"):
		if SQLitePath(database) == "" {
			return "", errors.New("database: sqlite: needs a file path, as in sqlite:/var/lib/caddy/chat.db")
		}
		return KindSQLite, nil
	}
	return "", errors.New("database: must be a postgres:// or postgresql:// URL, or sqlite:<path>")
}

// SQLitePath is the absolute file of an embedded-store database option
// ("" is DefaultSQLitePath; sqlite:<path> and sqlite://<path> name a file).
// It is "" when the option names no file.
func SQLitePath(database string) string {
	if database == "" {
		return DefaultSQLitePath()
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

// sharedStores holds one store (and its connection pool) for every
// database that handlers are configured with, across config reloads:
// Caddy provisions the new config before it cleans up the old one, so the
// count never drops to zero on a reload.
var sharedStores = caddy.NewUsagePool()

// Shared is a reference to the store that every handler configured with
// the same database shares, with the state of its purge. Release it once.
type Shared struct {
	Store Store
	// Key names the store in the pool and in metric labels: its kind and a
	// SHA-256 of its location, so a password in the URL never shows.
	Key string
	// Purge is what the handlers on this store know of its purge.
	Purge *PurgeState
}

type sharedStore struct {
	Store
	purge *PurgeState
}

func (s sharedStore) Destruct() error { return s.Close() }

// AcquireShared takes a reference to the shared store for a database
// option, opening it on first use. Opening does no network I/O: stores
// connect on first use.
func AcquireShared(database string) (*Shared, error) {
	kind, err := StoreKind(database)
	if err != nil {
		return nil, err
	}
	target := database
	if kind == KindSQLite {
		target = SQLitePath(database)
	}
	sum := sha256.Sum256([]byte(target))
	key := kind + ":" + hex.EncodeToString(sum[:])
	val, _, err := sharedStores.LoadOrNew(key, func() (caddy.Destructor, error) {
		var s Store
		var err error
		if kind == KindPostgres {
			s, err = OpenPostgres(target)
		} else {
			s, err = OpenSQLite(target)
		}
		if err != nil {
			return nil, fmt.Errorf("database: %w", err)
		}
		return sharedStore{Store: s, purge: NewPurgeState()}, nil
	})
	if err != nil {
		return nil, err
	}
	s := val.(sharedStore)
	return &Shared{Store: s.Store, Key: key, Purge: s.purge}, nil
}

// Release gives the reference back; the last one closes the store.
func (s *Shared) Release() error {
	if _, err := sharedStores.Delete(s.Key); err != nil {
		return fmt.Errorf("releasing store: %w", err)
	}
	return nil
}

// SharedReferences reports how many handlers hold the store under key.
func SharedReferences(key string) (int, bool) {
	return sharedStores.References(key)
}
