package sessions_test

import (
	"context"
	"errors"
	"fmt"
	"path/filepath"
	"sync"
	"testing"
	"time"

	"github.com/jackc/pgx/v5"

	"github.com/chatproxy/caddy-chatproxy/internal/testenv"
	"github.com/chatproxy/caddy-chatproxy/sessions"
	"github.com/chatproxy/caddy-chatproxy/sessions/storetest"
)

// With batches of 3 rows, the purge tests need many transactions per
// phase; they must come out exactly as with one.
func TestPurgeInSmallBatches(t *testing.T) {
	defer sessions.SetPurgeBatch(3)()
	t.Run("sqlite", func(t *testing.T) {
		storetest.RunPurge(t, func(t *testing.T) sessions.Store {
			return openSQLite(t, filepath.Join(t.TempDir(), "chat.db"))
		})
	})
	t.Run("postgres", func(t *testing.T) {
		testenv.PostgresURL(t)
		storetest.RunPurge(t, func(t *testing.T) sessions.Store {
			return openPostgres(t, testenv.PostgresURL(t))
		})
	})
}

// purgeFixture stores n sessions that expired an hour ago, each with two
// messages, and one live session, and returns the cut-off to purge with.
func purgeFixture(t *testing.T, st sessions.Store, n int) time.Time {
	t.Helper()
	ctx := t.Context()
	now := time.Now()
	for i := range n + 1 {
		s := &sessions.Session{ID: fmt.Sprintf("s%03d", i), Site: "example.com", ExpiresAt: now.Add(-time.Hour)}
		if i == n {
			s.ID, s.ExpiresAt = "live", now.Add(time.Hour)
		}
		if err := st.CreateSession(ctx, s); err != nil {
			t.Fatal(err)
		}
		for range 2 {
			if err := st.AppendMessage(ctx, &sessions.Message{SessionID: s.ID, Role: sessions.RoleUser, Content: "x"}); err != nil {
				t.Fatal(err)
			}
		}
	}
	return now
}

// Another instance holding the purge lock makes Purge return ErrBusy at
// once, having deleted nothing; the lock is per schema, and once it is
// released the purge goes ahead.
func TestPostgresPurgeSkipsWhileLocked(t *testing.T) {
	u := testenv.PostgresURL(t)
	st := openPostgres(t, u)
	ctx := t.Context()
	cut := purgeFixture(t, st, 3)

	holder, err := pgx.Connect(ctx, u) // another instance, mid-purge
	if err != nil {
		t.Fatal(err)
	}
	defer holder.Close(context.Background())
	tx, err := holder.Begin(ctx)
	if err != nil {
		t.Fatal(err)
	}
	var locked bool
	if err := tx.QueryRow(ctx, sessions.PurgeLockSQL).Scan(&locked); err != nil || !locked {
		t.Fatalf("taking the purge lock: %v, %v", locked, err)
	}

	start := time.Now()
	ns, nm, err := st.Purge(ctx, cut, cut.Add(-24*time.Hour))
	if !errors.Is(err, sessions.ErrBusy) || ns != 0 || nm != 0 {
		t.Fatalf("Purge while locked = %d, %d, %v; want 0, 0, ErrBusy", ns, nm, err)
	}
	if d := time.Since(start); d > 2*time.Second {
		t.Errorf("Purge waited %v for the lock; it must skip", d)
	}
	if stats, err := st.Stats(ctx); err != nil || stats.Sessions != 4 || stats.Messages != 8 {
		t.Fatalf("after a skipped purge: %+v, %v; want everything kept", stats, err)
	}

	// A deployment in another schema of the same database is not blocked.
	other := openPostgres(t, testenv.PostgresURL(t))
	otherCut := purgeFixture(t, other, 1)
	if ns, nm, err := other.Purge(ctx, otherCut, otherCut.Add(-24*time.Hour)); err != nil || ns != 1 || nm != 2 {
		t.Fatalf("Purge in another schema = %d, %d, %v; want 1, 2, nil", ns, nm, err)
	}

	if err := tx.Rollback(ctx); err != nil {
		t.Fatal(err)
	}
	if ns, nm, err := st.Purge(ctx, cut, cut.Add(-24*time.Hour)); err != nil || ns != 3 || nm != 6 {
		t.Fatalf("Purge after the lock was released = %d, %d, %v; want 3, 6, nil", ns, nm, err)
	}
}

// Several instances (separate pools, or separate handles on one file)
// purging at once: together they remove exactly what is past retention,
// once, whether the PostgreSQL lock made some of them skip or the SQLite
// write lock made them take turns.
func TestConcurrentPurges(t *testing.T) {
	defer sessions.SetPurgeBatch(4)()
	const instances = 4
	run := func(t *testing.T, stores []sessions.Store, cut time.Time) {
		var wg sync.WaitGroup
		var mu sync.Mutex
		var sessionsGone, messagesGone int64
		for _, st := range stores {
			wg.Go(func() {
				ns, nm, err := st.Purge(context.Background(), cut, cut.Add(-24*time.Hour))
				if err != nil && !errors.Is(err, sessions.ErrBusy) {
					t.Errorf("Purge: %v", err)
				}
				mu.Lock()
				sessionsGone += ns
				messagesGone += nm
				mu.Unlock()
			})
		}
		wg.Wait()
		// A skipped instance left the rest to the one holding the lock, but
		// that one may have stopped when another took over between batches:
		// one more purge finishes any such remainder, as the next hour's would.
		for {
			ns, nm, err := stores[0].Purge(context.Background(), cut, cut.Add(-24*time.Hour))
			if errors.Is(err, sessions.ErrBusy) {
				continue
			}
			if err != nil {
				t.Fatal(err)
			}
			sessionsGone += ns
			messagesGone += nm
			break
		}
		if sessionsGone != 20 || messagesGone != 40 {
			t.Errorf("instances removed %d sessions and %d messages in all, want 20 and 40", sessionsGone, messagesGone)
		}
		stats, err := stores[0].Stats(context.Background())
		if err != nil || stats.Sessions != 1 || stats.Messages != 2 {
			t.Errorf("after the purges: %+v, %v; want only the live session and its 2 messages", stats, err)
		}
	}
	t.Run("postgres", func(t *testing.T) {
		u := testenv.PostgresURL(t)
		stores := make([]sessions.Store, instances)
		for i := range stores {
			stores[i] = openPostgres(t, u)
		}
		run(t, stores, purgeFixture(t, stores[0], 20))
	})
	t.Run("sqlite", func(t *testing.T) {
		path := filepath.Join(t.TempDir(), "chat.db")
		stores := make([]sessions.Store, instances)
		for i := range stores {
			stores[i] = openSQLite(t, path)
		}
		run(t, stores, purgeFixture(t, stores[0], 20))
	})
}

// With batches of 2 sessions, erasing a user takes many transactions; it
// must come out exactly as with one.
func TestUserDeleteInSmallBatches(t *testing.T) {
	defer sessions.SetUserDeleteBatch(2)()
	t.Run("sqlite", func(t *testing.T) {
		storetest.RunUserDelete(t, func(t *testing.T) sessions.Store {
			return openSQLite(t, filepath.Join(t.TempDir(), "chat.db"))
		})
	})
	t.Run("postgres", func(t *testing.T) {
		testenv.PostgresURL(t)
		storetest.RunUserDelete(t, func(t *testing.T) sessions.Store {
			return openPostgres(t, testenv.PostgresURL(t))
		})
	})
}
