package sessions_test

import (
	"context"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/chatproxy/caddy-chatproxy/sessions"
	"github.com/chatproxy/caddy-chatproxy/sessions/storetest"
)

func openSQLite(t *testing.T, path string) *sessions.SQLiteStore {
	t.Helper()
	st, err := sessions.OpenSQLite(path)
	if err != nil {
		t.Fatalf("OpenSQLite: %v", err)
	}
	t.Cleanup(func() {
		if err := st.Close(); err != nil {
			t.Errorf("Close: %v", err)
		}
	})
	return st
}

func TestSQLiteStore(t *testing.T) {
	storetest.Run(t, func(t *testing.T) sessions.Store {
		return openSQLite(t, filepath.Join(t.TempDir(), "data", "chatproxy", "chatproxy.db"))
	})
}

func TestSQLiteCreatesPrivateDirectory(t *testing.T) {
	dir := filepath.Join(t.TempDir(), "a", "b")
	st := openSQLite(t, filepath.Join(dir, "x.db"))
	if _, err := os.Stat(dir); !errors.Is(err, os.ErrNotExist) {
		t.Fatalf("OpenSQLite touched the disk: stat = %v", err)
	}
	if err := st.Ping(context.Background()); err != nil {
		t.Fatal(err)
	}
	fi, err := os.Stat(dir)
	if err != nil {
		t.Fatal(err)
	}
	if perm := fi.Mode().Perm(); perm != 0o700 {
		t.Errorf("directory mode = %v, want 0700", perm)
	}
}

// Nothing acknowledged is lost across a restart.
func TestSQLiteReopen(t *testing.T) {
	path := filepath.Join(t.TempDir(), "chatproxy.db")
	ctx := context.Background()
	exp := time.Now().Add(time.Hour)

	st, err := sessions.OpenSQLite(path)
	if err != nil {
		t.Fatal(err)
	}
	var want []string
	for _, id := range []string{"a", "b"} {
		if err := st.CreateSession(ctx, &sessions.Session{ID: id, Site: "example.com", ExpiresAt: exp}); err != nil {
			t.Fatal(err)
		}
	}
	for i := range 5 {
		m := &sessions.Message{SessionID: "a", Role: sessions.RoleUser, Content: strings.Repeat("x", i)}
		if err := st.AppendMessage(ctx, m); err != nil {
			t.Fatal(err)
		}
		want = append(want, m.ID)
	}
	if err := st.Close(); err != nil {
		t.Fatal(err)
	}

	st = openSQLite(t, path)
	stats, err := st.Stats(ctx)
	if err != nil {
		t.Fatal(err)
	}
	if stats.Sessions != 2 || stats.Messages != 5 {
		t.Errorf("after reopen: %+v, want 2 sessions, 5 messages", stats)
	}
	s, err := st.GetSession(ctx, "a")
	if err != nil || s.MessageCount != 5 {
		t.Fatalf("session a: %+v, %v", s, err)
	}
	p, err := st.ListMessages(ctx, "a", "", 10)
	if err != nil {
		t.Fatal(err)
	}
	for i, m := range p.Messages {
		if m.ID != want[i] {
			t.Errorf("message %d = %s, want %s", i, m.ID, want[i])
		}
	}
}

// Two stores on one file (a reload overlapping the old config, or two
// processes: each store has its own connections and file locks) migrate it
// once between them, and writing through both at once never fails with
// "database is locked".
func TestSQLiteTwoStoresOneFile(t *testing.T) {
	path := filepath.Join(t.TempDir(), "shared.db")
	stores := []*sessions.SQLiteStore{openSQLite(t, path), openSQLite(t, path)}
	ctx := context.Background()
	var wg sync.WaitGroup
	errs := make([]error, 2*100)
	for i := range errs {
		st := stores[i%2]
		wg.Go(func() {
			errs[i] = st.CreateSession(ctx, &sessions.Session{
				ID: fmt.Sprint("s", i), Site: "s", ExpiresAt: time.Now().Add(time.Hour),
			})
		})
	}
	wg.Wait()
	for i, err := range errs {
		if err != nil {
			t.Errorf("CreateSession #%d: %v", i, err)
		}
	}
	for i, st := range stores {
		stats, err := st.Stats(ctx)
		if err != nil {
			t.Fatal(err)
		}
		if stats.Sessions != int64(len(errs)) {
			t.Errorf("store %d sees %d sessions, want %d", i, stats.Sessions, len(errs))
		}
	}
}

func TestSQLiteUnwritablePath(t *testing.T) {
	// A regular file where a directory should be: fails even for root.
	file := filepath.Join(t.TempDir(), "file")
	if err := os.WriteFile(file, nil, 0o600); err != nil {
		t.Fatal(err)
	}
	st := openSQLite(t, filepath.Join(file, "sub", "chatproxy.db"))
	ctx := context.Background()
	err := st.Ping(ctx)
	if err == nil {
		t.Fatal("Ping: want an error")
	}
	if !strings.Contains(err.Error(), file) {
		t.Errorf("error %q does not name the path", err)
	}
	err = st.CreateSession(ctx, &sessions.Session{ID: "x", Site: "s", ExpiresAt: time.Now().Add(time.Hour)})
	if err == nil || !strings.HasPrefix(err.Error(), "creating session: ") {
		t.Errorf("CreateSession: err = %v, want a wrapped error", err)
	}
}

func TestOpenSQLiteRejects(t *testing.T) {
	for _, p := range []string{"", ":memory:", "file:x.db?mode=memory", "/tmp/a?b.db"} {
		if _, err := sessions.OpenSQLite(p); err == nil {
			t.Errorf("OpenSQLite(%q): want an error", p)
		}
	}
}

func TestDefaultSQLitePath(t *testing.T) {
	t.Setenv("XDG_DATA_HOME", "/srv/data")
	if got, want := sessions.DefaultSQLitePath(), filepath.Join("/srv/data", "caddy", "chatproxy", "chatproxy.db"); got != want {
		t.Errorf("DefaultSQLitePath() = %q, want %q", got, want)
	}
}

func TestSQLiteFileIsPrivate(t *testing.T) {
	path := filepath.Join(t.TempDir(), "sub", "chat.db")
	s := openSQLite(t, path)
	if err := s.Migrate(t.Context()); err != nil {
		t.Fatal(err)
	}
	for _, p := range []string{path, path + "-wal"} {
		fi, err := os.Stat(p)
		if err != nil {
			t.Fatal(err)
		}
		if mode := fi.Mode().Perm(); mode&0o077 != 0 {
			t.Errorf("%s has mode %o, want no group or other access", p, mode)
		}
	}
}
