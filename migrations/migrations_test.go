package migrations_test

import (
	"context"
	"database/sql"
	"path/filepath"
	"sync"
	"testing"

	_ "github.com/jackc/pgx/v5/stdlib"
	_ "modernc.org/sqlite"

	"github.com/chatproxy/caddy-chatproxy/internal/testenv"
	"github.com/chatproxy/caddy-chatproxy/migrations"
)

// Both dialects must move in step: the stores assume the same schema version.
func TestLatestInStep(t *testing.T) {
	pg, lite := migrations.Latest(migrations.Postgres), migrations.Latest(migrations.SQLite)
	if pg < 1 || pg != lite {
		t.Fatalf("Latest: postgres %d, sqlite %d; want equal and >= 1", pg, lite)
	}
	if v := migrations.Latest("oracle"); v != 0 {
		t.Fatalf("Latest(unknown) = %d, want 0", v)
	}
}

func TestUnknownDialect(t *testing.T) {
	db, err := sql.Open("sqlite", filepath.Join(t.TempDir(), "x.db"))
	if err != nil {
		t.Fatal(err)
	}
	defer db.Close()
	if err := migrations.Up(context.Background(), db, "oracle"); err == nil {
		t.Fatal("Up with an unknown dialect: want an error")
	}
	if _, err := migrations.Version(context.Background(), db, "oracle"); err == nil {
		t.Fatal("Version with an unknown dialect: want an error")
	}
}

func TestSQLite(t *testing.T) {
	db, err := sql.Open("sqlite", filepath.Join(t.TempDir(), "m.db")+"?_pragma=busy_timeout(10000)&_txlock=immediate")
	if err != nil {
		t.Fatal(err)
	}
	defer db.Close()
	check(t, db, migrations.SQLite, "SELECT count(*) FROM sqlite_master WHERE name = ?")
}

func TestPostgres(t *testing.T) {
	db, err := sql.Open("pgx", testenv.PostgresURL(t))
	if err != nil {
		t.Fatal(err)
	}
	defer db.Close()
	check(t, db, migrations.Postgres, "SELECT count(*) FROM pg_tables WHERE schemaname = current_schema() AND tablename = $1")
}

// check runs the same life cycle on a fresh database of either dialect.
func check(t *testing.T, db *sql.DB, d migrations.Dialect, tableCount string) {
	t.Helper()
	ctx := context.Background()
	exists := func(table string) bool {
		t.Helper()
		var n int
		if err := db.QueryRowContext(ctx, tableCount, table).Scan(&n); err != nil {
			t.Fatal(err)
		}
		return n > 0
	}

	v, err := migrations.Version(ctx, db, d)
	if err != nil || v != 0 {
		t.Fatalf("Version before Up = %d, %v; want 0, nil", v, err)
	}
	if exists(migrations.TableName) {
		t.Fatal("Version created the version table; it must not write")
	}

	// Concurrent callers in one process all succeed.
	var wg sync.WaitGroup
	errs := make(chan error, 4)
	for range 4 {
		wg.Go(func() { errs <- migrations.Up(ctx, db, d) })
	}
	wg.Wait()
	close(errs)
	for err := range errs {
		if err != nil {
			t.Fatalf("Up: %v", err)
		}
	}
	if err := migrations.Up(ctx, db, d); err != nil {
		t.Fatalf("second Up: %v", err)
	}

	v, err = migrations.Version(ctx, db, d)
	if err != nil || v != migrations.Latest(d) {
		t.Fatalf("Version after Up = %d, %v; want %d", v, err, migrations.Latest(d))
	}
	for _, table := range []string{"chatproxy_sessions", "chatproxy_messages", migrations.TableName} {
		if !exists(table) {
			t.Errorf("table %s missing after Up", table)
		}
	}
}
