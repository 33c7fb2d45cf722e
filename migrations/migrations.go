// Package migrations holds the versioned SQL schema of the session store,
// embedded in the binary, and applies it with goose.
//
// Each dialect has its own folder of goose-annotated files named
// NNNNN_description.sql. A version, once released, is never edited: change
// the schema by adding the next file to both folders.
package migrations

import (
	"context"
	"database/sql"
	"embed"
	"errors"
	"fmt"
	"hash/fnv"
	"io/fs"
	"path"
	"slices"
	"strconv"
	"strings"
	"sync"

	"github.com/pressly/goose/v3"
	"github.com/pressly/goose/v3/database"
	"github.com/pressly/goose/v3/lock"
)

// Dialect names a database the schema exists for. Its value is also the
// folder of that dialect's migrations.
type Dialect string

// Supported dialects.
const (
	Postgres Dialect = "postgres"
	SQLite   Dialect = "sqlite"
)

// TableName is goose's version table. It is our own name, not goose's
// default, so that an application sharing the database (or schema) that
// also uses goose keeps its own history.
const TableName = "chatproxy_schema_version"

//go:embed postgres/*.sql sqlite/*.sql
var files embed.FS

// sqliteLocks serializes migrations of one SQLite file within this process.
// SQLite has no advisory locks; across processes we rely on its write lock
// and busy_timeout (and on the SQLite files being replay-safe).
var sqliteLocks = struct {
	sync.Mutex
	m map[string]*sync.Mutex
}{m: map[string]*sync.Mutex{}}

// Up applies every pending migration of dialect d to db. It is safe to call
// from several processes at once: on Postgres they queue on an advisory lock
// scoped to the current schema; on SQLite on a per-file mutex and the
// database's write lock. When nothing is pending it takes no lock at all.
func Up(ctx context.Context, db *sql.DB, d Dialect) error {
	gd, err := gooseDialect(d)
	if err != nil {
		return err
	}
	latest := Latest(d)
	// Fast path: a started fleet finds the schema current and never queues.
	if v, err := Version(ctx, db, d); err == nil && v >= latest {
		return nil
	}

	opts := []goose.ProviderOption{
		goose.WithTableName(TableName),
		goose.WithLogger(goose.NopLogger()),
		goose.WithDisableGlobalRegistry(true),
	}
	switch d {
	case Postgres:
		var schema string
		if err := db.QueryRowContext(ctx, "SELECT coalesce(current_schema(), '')").Scan(&schema); err != nil {
			return fmt.Errorf("migrating: reading current schema: %w", err)
		}
		// One lock per schema: deployments (and parallel tests) in different
		// schemas of one database do not wait for each other. Retry every
		// second, for up to five minutes, like goose's default budget.
		locker, err := lock.NewPostgresSessionLocker(
			lock.WithLockID(lockID(schema)),
			lock.WithLockTimeout(1, 300),
		)
		if err != nil {
			return fmt.Errorf("migrating: %w", err)
		}
		opts = append(opts, goose.WithSessionLocker(locker))
	case SQLite:
		mu, err := sqliteLock(ctx, db)
		if err != nil {
			return fmt.Errorf("migrating: %w", err)
		}
		mu.Lock()
		defer mu.Unlock()
	}

	sub, err := fs.Sub(files, string(d))
	if err != nil {
		return fmt.Errorf("migrating: %w", err)
	}
	p, err := goose.NewProvider(gd, db, sub, opts...)
	if err != nil {
		return fmt.Errorf("migrating: %w", err)
	}
	if _, err := p.Up(ctx); err != nil {
		return fmt.Errorf("migrating: %w", err)
	}
	return nil
}

// Version reports the schema version applied to db: 0 for a database never
// migrated. Unlike goose's own status calls it creates nothing, so a
// read-only `status` does not write to the database.
func Version(ctx context.Context, db *sql.DB, d Dialect) (int64, error) {
	gd, err := gooseDialect(d)
	if err != nil {
		return 0, err
	}
	// goose can only check for its table on Postgres, so ask both ourselves.
	var exists bool
	q := "SELECT to_regclass($1) IS NOT NULL"
	if d == SQLite {
		q = "SELECT EXISTS (SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = ?)"
	}
	if err := db.QueryRowContext(ctx, q, TableName).Scan(&exists); err != nil {
		return 0, fmt.Errorf("reading schema version: %w", err)
	}
	if !exists {
		return 0, nil
	}
	st, err := database.NewStore(gd, TableName)
	if err != nil {
		return 0, fmt.Errorf("reading schema version: %w", err)
	}
	v, err := st.GetLatestVersion(ctx, db)
	if errors.Is(err, database.ErrVersionNotFound) {
		return 0, nil
	}
	if err != nil {
		return 0, fmt.Errorf("reading schema version: %w", err)
	}
	return v, nil
}

// Latest is the newest version embedded for dialect d, the version Up
// brings a database to (0 for an unknown dialect).
func Latest(d Dialect) int64 {
	vs := Versions(d)
	if len(vs) == 0 {
		return 0
	}
	return vs[len(vs)-1]
}

// Versions lists the versions embedded for dialect d, oldest first.
func Versions(d Dialect) []int64 {
	entries, err := fs.ReadDir(files, string(d))
	if err != nil {
		return nil
	}
	var out []int64
	for _, e := range entries {
		name := path.Base(e.Name())
		num, _, ok := strings.Cut(name, "_")
		if !ok || !strings.HasSuffix(name, ".sql") {
			continue
		}
		if v, err := strconv.ParseInt(num, 10, 64); err == nil {
			out = append(out, v)
		}
	}
	slices.Sort(out)
	return out
}

// Pending reports the schema version applied to db and the embedded
// versions Up would apply, oldest first. Like Version it only reads.
func Pending(ctx context.Context, db *sql.DB, d Dialect) (current int64, pending []int64, err error) {
	current, err = Version(ctx, db, d)
	if err != nil {
		return 0, nil, err
	}
	return current, PendingAfter(d, current), nil
}

// PendingAfter lists the embedded versions of d newer than current.
func PendingAfter(d Dialect, current int64) []int64 {
	var pending []int64
	for _, v := range Versions(d) {
		if v > current {
			pending = append(pending, v)
		}
	}
	return pending
}

func gooseDialect(d Dialect) (goose.Dialect, error) {
	switch d {
	case Postgres:
		return goose.DialectPostgres, nil
	case SQLite:
		return goose.DialectSQLite3, nil
	}
	return "", fmt.Errorf("migrations: unknown dialect %q", d)
}

// lockID derives the advisory lock key from the schema the migrations
// will land in.
func lockID(schema string) int64 {
	h := fnv.New64a()
	h.Write([]byte("chatproxy-migrations\x00" + schema))
	return int64(h.Sum64())
}

// sqliteLock returns the mutex for db's main file, keyed by the path SQLite
// itself resolved, so two *sql.DB on one file share it.
func sqliteLock(ctx context.Context, db *sql.DB) (*sync.Mutex, error) {
	key, err := sqliteFile(ctx, db)
	if err != nil {
		return nil, err
	}
	if key == "" {
		// Not backed by a file (in-memory): nothing to share with.
		key = fmt.Sprintf("db:%p", db)
	}
	sqliteLocks.Lock()
	defer sqliteLocks.Unlock()
	mu, ok := sqliteLocks.m[key]
	if !ok {
		mu = new(sync.Mutex)
		sqliteLocks.m[key] = mu
	}
	return mu, nil
}

func sqliteFile(ctx context.Context, db *sql.DB) (string, error) {
	rows, err := db.QueryContext(ctx, "PRAGMA database_list")
	if err != nil {
		return "", fmt.Errorf("reading database file: %w", err)
	}
	defer rows.Close()
	for rows.Next() {
		var (
			seq        int
			name, file sql.NullString
		)
		if err := rows.Scan(&seq, &name, &file); err != nil {
			return "", fmt.Errorf("reading database file: %w", err)
		}
		if name.String == "main" {
			return file.String, nil
		}
	}
	if err := rows.Err(); err != nil {
		return "", fmt.Errorf("reading database file: %w", err)
	}
	return "", nil
}
