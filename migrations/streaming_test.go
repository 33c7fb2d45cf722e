package migrations_test

import (
	"context"
	"database/sql"
	"path/filepath"
	"testing"

	"github.com/chatproxy/caddy-chatproxy/internal/testenv"
	"github.com/chatproxy/caddy-chatproxy/migrations"
)

// Migration 3 lets a reply be stored as streaming and keeps every row
// written before it (SQLite rebuilds the table: the rows keep their order,
// and a deleted tail's seq is still not reused).
func TestStreamingStatusMigrationKeepsRows(t *testing.T) {
	for _, tc := range []struct {
		d  migrations.Dialect
		db func(t *testing.T) *sql.DB
	}{
		{migrations.SQLite, func(t *testing.T) *sql.DB {
			db, err := sql.Open("sqlite", filepath.Join(t.TempDir(), "m.db")+"?_pragma=foreign_keys(1)&_pragma=busy_timeout(10000)")
			if err != nil {
				t.Fatal(err)
			}
			return db
		}},
		{migrations.Postgres, func(t *testing.T) *sql.DB {
			db, err := sql.Open("pgx", testenv.PostgresURL(t))
			if err != nil {
				t.Fatal(err)
			}
			return db
		}},
	} {
		t.Run(string(tc.d), func(t *testing.T) {
			ctx := context.Background()
			db := tc.db(t)
			defer db.Close()
			if err := migrations.UpTo(ctx, db, tc.d, 1); err != nil {
				t.Fatal(err)
			}
			times := "1, 1, 2"
			if tc.d == migrations.Postgres {
				times = "now(), now(), now() + interval '1 day'"
			}
			exec(t, db, "INSERT INTO chatproxy_sessions (id, site, created_at, last_seen_at, expires_at) VALUES ('s', 'example.com', "+times+")")
			for _, id := range []string{"m1", "m2", "m3"} {
				at := "1"
				if tc.d == migrations.Postgres {
					at = "now()"
				}
				exec(t, db, "INSERT INTO chatproxy_messages (id, session_id, role, content, status, created_at) VALUES ('"+id+"', 's', 'user', 'text "+id+"', 'partial', "+at+")")
			}
			exec(t, db, "DELETE FROM chatproxy_messages WHERE id = 'm3'")
			if _, err := db.ExecContext(ctx, "UPDATE chatproxy_messages SET status = 'streaming' WHERE id = 'm1'"); err == nil {
				t.Fatal("schema 1 took status streaming")
			}
			if err := migrations.Up(ctx, db, tc.d); err != nil {
				t.Fatal(err)
			}
			exec(t, db, "UPDATE chatproxy_messages SET status = 'streaming' WHERE id = 'm1'")
			if _, err := db.ExecContext(ctx, "UPDATE chatproxy_messages SET status = 'bogus' WHERE id = 'm2'"); err == nil {
				t.Fatal("the status check is gone")
			}
			at := "1"
			if tc.d == migrations.Postgres {
				at = "now()"
			}
			exec(t, db, "INSERT INTO chatproxy_messages (id, session_id, role, content, created_at) VALUES ('m4', 's', 'assistant', '', "+at+")")
			rows, err := db.QueryContext(ctx, "SELECT id, content, status FROM chatproxy_messages ORDER BY seq")
			if err != nil {
				t.Fatal(err)
			}
			defer rows.Close()
			var got []string
			for rows.Next() {
				var id, content, status string
				if err := rows.Scan(&id, &content, &status); err != nil {
					t.Fatal(err)
				}
				got = append(got, id+":"+content+":"+status)
			}
			want := []string{"m1:text m1:streaming", "m2:text m2:partial", "m4::complete"}
			if len(got) != len(want) || got[0] != want[0] || got[1] != want[1] || got[2] != want[2] {
				t.Fatalf("rows after migrating: %q, want %q", got, want)
			}
			var seq int64
			if err := db.QueryRowContext(ctx, "SELECT seq FROM chatproxy_messages WHERE id = 'm4'").Scan(&seq); err != nil {
				t.Fatal(err)
			}
			if seq != 4 {
				t.Errorf("a new message after the migration has seq %d, want 4 (3 was used and deleted)", seq)
			}
			// The foreign key's cascade still applies.
			exec(t, db, "DELETE FROM chatproxy_sessions WHERE id = 's'")
			var n int
			if err := db.QueryRowContext(ctx, "SELECT count(*) FROM chatproxy_messages").Scan(&n); err != nil || n != 0 {
				t.Errorf("messages left after their session was deleted: %d, %v", n, err)
			}
		})
	}
}

func exec(t *testing.T, db *sql.DB, q string) {
	t.Helper()
	if _, err := db.ExecContext(context.Background(), q); err != nil {
		t.Fatalf("%s: %v", q, err)
	}
}
