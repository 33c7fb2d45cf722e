package chatproxy

import (
	"bytes"
	"context"
	"database/sql"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"testing"

	caddycmd "github.com/caddyserver/caddy/v2/cmd"
	"github.com/jackc/pgx/v5"
	"github.com/spf13/cobra"

	"github.com/chatproxy/caddy-chatproxy/internal/testenv"
	"github.com/chatproxy/caddy-chatproxy/migrations"
	"github.com/chatproxy/caddy-chatproxy/sessions"
)

// statusThenMigrate runs `status` on a store never migrated, checks with
// unchanged what it left behind, then `migrate` and `status` again.
func statusThenMigrate(t *testing.T, database string, unchanged func(t *testing.T)) {
	t.Helper()
	targets, err := commandTargets("", "", database)
	if err != nil || len(targets) != 1 {
		t.Fatalf("targets: %v, %v", targets, err)
	}
	out := captureStdout(t, func() error { return runStatus(t.Context(), targets[0]) })
	if !strings.HasSuffix(out, ": not migrated (pending migrations: "+versionList(migrations.Versions(migrations.SQLite))+"; run `caddy chatproxy migrate`)\n") {
		t.Errorf("status of a fresh store printed %q", out)
	}
	unchanged(t)
	captureStdout(t, func() error { return runMigrate(t.Context(), targets[0]) })
	out = captureStdout(t, func() error { return runStatus(t.Context(), targets[0]) })
	if !strings.HasSuffix(out, fmt.Sprintf(": schema version %d, 0 sessions, 0 messages\n", migrations.Latest(migrations.SQLite))) {
		t.Errorf("status after migrate printed %q", out)
	}
}

// `caddy chatproxy status` only reads: on a fresh PostgreSQL schema it
// creates no table (nor anything else), so a new binary's status does not
// migrate before the operator's backup.
func TestStatusCommandOnlyReadsPostgres(t *testing.T) {
	u := testenv.PostgresURL(t)
	statusThenMigrate(t, u, func(t *testing.T) {
		conn, err := pgx.Connect(t.Context(), u)
		if err != nil {
			t.Fatal(err)
		}
		defer conn.Close(context.WithoutCancel(t.Context()))
		var objects []string
		rows, err := conn.Query(t.Context(), `
SELECT c.relname FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
WHERE n.nspname = current_schema()
UNION ALL
SELECT t.typname FROM pg_type t JOIN pg_namespace n ON n.oid = t.typnamespace
WHERE n.nspname = current_schema()`)
		if err == nil {
			objects, err = pgx.CollectRows(rows, pgx.RowTo[string])
		}
		if err != nil {
			t.Fatal(err)
		}
		if len(objects) != 0 {
			t.Errorf("status created %v in the schema", objects)
		}
	})
}

// The same for the embedded store: no directory, no file; and a file that
// exists but is empty gets no table.
func TestStatusCommandOnlyReadsSQLite(t *testing.T) {
	t.Run("no file", func(t *testing.T) {
		dir := filepath.Join(t.TempDir(), "chatproxy")
		path := filepath.Join(dir, "chat.db")
		statusThenMigrate(t, "sqlite:"+path, func(t *testing.T) {
			if _, err := os.Stat(dir); !errors.Is(err, os.ErrNotExist) {
				t.Errorf("status created %s: stat = %v", dir, err)
			}
		})
	})
	t.Run("empty file", func(t *testing.T) {
		path := filepath.Join(t.TempDir(), "chat.db")
		if err := os.WriteFile(path, nil, 0o600); err != nil {
			t.Fatal(err)
		}
		statusThenMigrate(t, "sqlite:"+path, func(t *testing.T) {
			db, err := sql.Open("sqlite", "file:"+path+"?mode=ro")
			if err != nil {
				t.Fatal(err)
			}
			defer db.Close()
			var n int
			if err := db.QueryRow(`SELECT count(*) FROM sqlite_master`).Scan(&n); err != nil {
				t.Fatal(err)
			}
			if n != 0 {
				t.Errorf("status created %d schema objects", n)
			}
		})
	})
}

func TestStatusLinePending(t *testing.T) {
	got := statusLine(&sessions.Status{SchemaVersion: 1, Pending: []int64{2, 3}, Sessions: 4, Messages: 9})
	want := "schema version 1, 4 sessions, 9 messages; pending migrations: 2, 3 (run `caddy chatproxy migrate`)"
	if got != want {
		t.Errorf("statusLine = %q, want %q", got, want)
	}
}

// chatproxyCommand builds `caddy chatproxy` the way caddy's own command
// line does (caddycmd's caddyCmdToCobra, under a root that, like Caddy's,
// silences cobra's usage on errors).
func chatproxyCommand(t *testing.T) (root *cobra.Command, stdout, stderr *bytes.Buffer) {
	t.Helper()
	c, ok := caddycmd.Commands()["chatproxy"]
	if !ok {
		t.Fatal("the chatproxy command is not registered")
	}
	cmd := &cobra.Command{Use: c.Name + " " + c.Usage, Short: c.Short, Long: c.Long}
	c.CobraFunc(cmd)
	root = &cobra.Command{Use: "caddy", SilenceUsage: true}
	root.AddCommand(cmd)
	stdout, stderr = new(bytes.Buffer), new(bytes.Buffer)
	root.SetOut(stdout)
	root.SetErr(stderr)
	return root, stdout, stderr
}

// A mistyped subcommand prints the usage and fails, so a script notices.
func TestUnknownSubcommandFails(t *testing.T) {
	root, stdout, stderr := chatproxyCommand(t)
	root.SetArgs([]string{"chatproxy", "frobnicate"})
	err := root.Execute()
	if err == nil || !strings.Contains(err.Error(), `unknown subcommand "frobnicate"`) {
		t.Errorf("err = %v, want unknown subcommand", err)
	}
	if out := stderr.String(); !strings.Contains(out, "Usage:") || !strings.Contains(out, "migrate") || !strings.Contains(out, "status") {
		t.Errorf("stderr = %q, want the usage; stdout = %q", out, stdout)
	}

	// Without a subcommand it prints the help, as Caddy's other commands do.
	root, stdout, _ = chatproxyCommand(t)
	root.SetArgs([]string{"chatproxy"})
	if err := root.Execute(); err != nil || !strings.Contains(stdout.String(), "migrate") {
		t.Errorf("chatproxy without a subcommand: err = %v, stdout = %q", err, stdout)
	}
}
