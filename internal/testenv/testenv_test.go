package testenv

import (
	"context"
	"database/sql"
	"strings"
	"testing"

	"github.com/jackc/pgx/v5/pgxpool"
	_ "github.com/jackc/pgx/v5/stdlib"
)

// The schema must be selected on every connection, whichever way a package
// connects: pgxpool (the store) and database/sql (goose).
func TestPostgresURLSelectsSchema(t *testing.T) {
	u := PostgresURL(t)
	ctx := context.Background()

	pool, err := pgxpool.New(ctx, u)
	if err != nil {
		t.Fatal(err)
	}
	defer pool.Close()
	var viaPool string
	if err := pool.QueryRow(ctx, "SELECT current_schema()").Scan(&viaPool); err != nil {
		t.Fatal(err)
	}

	db, err := sql.Open("pgx", u)
	if err != nil {
		t.Fatal(err)
	}
	defer db.Close()
	var viaSQL string
	if err := db.QueryRowContext(ctx, "SELECT current_schema()").Scan(&viaSQL); err != nil {
		t.Fatal(err)
	}

	if !strings.HasPrefix(viaPool, "test_") || viaPool != viaSQL {
		t.Fatalf("current_schema: pool %q, database/sql %q; want the same test_ schema", viaPool, viaSQL)
	}
	// Tables land in the test schema, not in public.
	if _, err := pool.Exec(ctx, "CREATE TABLE probe (x int)"); err != nil {
		t.Fatal(err)
	}
	var schema string
	if err := pool.QueryRow(ctx, "SELECT table_schema FROM information_schema.tables WHERE table_name = 'probe' AND table_schema = current_schema()").Scan(&schema); err != nil {
		t.Fatal(err)
	}
	if schema != viaPool {
		t.Fatalf("probe table in %q, want %q", schema, viaPool)
	}
}

func TestPostgresURLIsolates(t *testing.T) {
	a, b := PostgresURL(t), PostgresURL(t)
	if a == b {
		t.Fatal("two calls returned the same URL")
	}
}

func TestWithSearchPath(t *testing.T) {
	tests := []struct{ in, want string }{
		{"postgres://u@h/db?sslmode=disable", "postgres://u@h/db?options=-c%20search_path%3Ds&sslmode=disable"},
		{"postgres://u@h/db?options=-c%20statement_timeout%3D5s", "postgres://u@h/db?options=-c%20statement_timeout%3D5s%20-c%20search_path%3Ds"},
		{"host=h user=u", "host=h user=u options='-c search_path=s'"},
	}
	for _, tt := range tests {
		got, err := withSearchPath(tt.in, "s")
		if err != nil || got != tt.want {
			t.Errorf("withSearchPath(%q) = %q, %v; want %q", tt.in, got, err, tt.want)
		}
	}
	if _, err := withSearchPath("host=h options='-c x=y'", "s"); err == nil {
		t.Error("keyword/value options: want an error")
	}
	// A malformed URL must not echo its password.
	_, err := withSearchPath("postgres://u:hunter2@h:bad/db", "s")
	if err == nil || strings.Contains(err.Error(), "hunter2") {
		t.Errorf("malformed URL: err = %v; want an error without the password", err)
	}
}

func TestRedisURL(t *testing.T) {
	u := RedisURL(t)
	if err := pingRedis(u); err != nil {
		t.Fatal(err)
	}
}

func TestPingRedisUnreachable(t *testing.T) {
	if err := pingRedis("redis://127.0.0.1:1/0"); err == nil {
		t.Fatal("want an error for a closed port")
	}
	if err := pingRedis("http://127.0.0.1:6379"); err == nil {
		t.Fatal("want an error for a foreign scheme")
	}
}

func TestRequireServices(t *testing.T) {
	t.Setenv("CI", "")
	t.Setenv("CHATPROXY_REQUIRE_SERVICES", "")
	if RequireServices() {
		t.Fatal("RequireServices with neither variable set")
	}
	t.Setenv("CI", "true")
	if !RequireServices() {
		t.Fatal("RequireServices with CI set")
	}
	t.Setenv("CI", "")
	t.Setenv("CHATPROXY_REQUIRE_SERVICES", "1")
	if !RequireServices() {
		t.Fatal("RequireServices with CHATPROXY_REQUIRE_SERVICES set")
	}
}
