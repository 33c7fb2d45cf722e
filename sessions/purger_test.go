package sessions_test

import (
	"context"
	"errors"
	"fmt"
	"path/filepath"
	"sync"
	"testing"
	"time"

	"go.uber.org/zap"

	"github.com/chatproxy/caddy-chatproxy/sessions"
)

// purgeCountingStore wraps a Store and reports each Purge call; panicFirst
// makes the first call panic.
type purgeCountingStore struct {
	sessions.Store
	mu         sync.Mutex
	calls      [][2]time.Time // expiredBefore, messagesBefore
	panicFirst bool
	err        error
	called     chan struct{}
}

func (s *purgeCountingStore) Purge(ctx context.Context, exp, old time.Time) (int64, int64, error) {
	s.mu.Lock()
	s.calls = append(s.calls, [2]time.Time{exp, old})
	n, err := len(s.calls), s.err
	s.mu.Unlock()
	defer func() {
		select {
		case s.called <- struct{}{}:
		default:
		}
	}()
	if s.panicFirst && n == 1 {
		panic("purge exploded")
	}
	if err != nil {
		return 0, 0, err
	}
	return s.Store.Purge(ctx, exp, old)
}

func (s *purgeCountingStore) Calls() int {
	s.mu.Lock()
	defer s.mu.Unlock()
	return len(s.calls)
}

func newPurgeCountingStore(t *testing.T) *purgeCountingStore {
	t.Helper()
	st, err := sessions.OpenSQLite(filepath.Join(t.TempDir(), "chat.db"))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = st.Close() })
	return &purgeCountingStore{Store: st, called: make(chan struct{}, 16)}
}

func testPurger(store sessions.Store, state *sessions.PurgeState, retention, interval time.Duration) *sessions.Purger {
	return &sessions.Purger{
		Store: store, State: state, Retention: retention, Interval: interval,
		FirstDelay: 10 * time.Millisecond, Logger: zap.NewNop(), Now: time.Now,
	}
}

// The purge goroutine runs shortly after start and then periodically,
// with the right cut-offs; a panicking purge is logged and the loop goes
// on; the goroutine ends when the provision context is cancelled.
func TestPurgerLoop(t *testing.T) {
	store := newPurgeCountingStore(t)
	store.panicFirst = true
	p := testPurger(store, sessions.NewPurgeState(), 48*time.Hour, 40*time.Millisecond)
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan struct{})
	start := time.Now()
	go func() {
		defer close(done)
		p.Run(ctx)
	}()
	for i := range 3 {
		select {
		case <-store.called:
		case <-time.After(5 * time.Second):
			t.Fatalf("purge #%d did not run", i+1)
		}
	}
	cancel()
	select {
	case <-done:
	case <-time.After(5 * time.Second):
		t.Fatal("the purge goroutine did not end with its context")
	}
	n := store.Calls()
	time.Sleep(100 * time.Millisecond)
	if store.Calls() != n {
		t.Error("purges ran after the context was cancelled")
	}
	store.mu.Lock()
	defer store.mu.Unlock()
	first := store.calls[0]
	if first[0].Before(start) || first[0].Sub(first[1]) != 48*time.Hour {
		t.Errorf("cut-offs %v / %v: want now and now-48h", first[0], first[1])
	}
}

// Handlers sharing a store share its purge: a second run within half an
// interval is skipped unless its retention is shorter, since the first
// already deleted all it would; errors and the lock held elsewhere are
// not recorded as purges.
func TestPurgerSharedStore(t *testing.T) {
	store := newPurgeCountingStore(t)
	state := sessions.NewPurgeState()
	a := testPurger(store, state, 30*24*time.Hour, time.Hour)
	b := testPurger(store, state, 30*24*time.Hour, time.Hour)
	short := testPurger(store, state, 7*24*time.Hour, time.Hour)
	ctx := t.Context()
	for _, step := range []struct {
		p    *sessions.Purger
		want string
	}{
		{a, sessions.PurgeDone}, {b, sessions.PurgeSkipped}, {a, sessions.PurgeSkipped}, {short, sessions.PurgeDone}, {a, sessions.PurgeSkipped}, {short, sessions.PurgeSkipped},
	} {
		if got := step.p.Once(ctx); got != step.want {
			t.Fatalf("once = %s, want %s", got, step.want)
		}
	}
	if store.Calls() != 2 {
		t.Fatalf("%d purges reached the store, want 2", store.Calls())
	}
	// Half an interval later the next run purges again.
	later := time.Now().Add(31 * time.Minute)
	b.Now = func() time.Time { return later }
	if got := b.Once(ctx); got != sessions.PurgeDone {
		t.Fatalf("once after half an interval = %s, want %s", got, sessions.PurgeDone)
	}

	fresh := sessions.NewPurgeState()
	store.err = fmt.Errorf("purging: %w", sessions.ErrBusy)
	if got := withState(a, fresh).Once(ctx); got != sessions.PurgeBusy {
		t.Fatalf("once while another instance purges = %s, want %s", got, sessions.PurgeBusy)
	}
	store.err = errors.New("database on fire")
	if got := withState(a, fresh).Once(ctx); got != sessions.PurgeFailed {
		t.Fatalf("once on a failing store = %s, want %s", got, sessions.PurgeFailed)
	}
	store.err = nil
	if got := withState(a, fresh).Once(ctx); got != sessions.PurgeDone {
		t.Fatalf("once after a failure = %s, want %s (failures are not recorded as purges)", got, sessions.PurgeDone)
	}
	cancelled, cancel := context.WithCancel(ctx)
	cancel()
	if got := withState(a, sessions.NewPurgeState()).Once(cancelled); got != sessions.PurgeCanceled {
		t.Fatalf("once with a cancelled context = %s, want %s", got, sessions.PurgeCanceled)
	}
}

func withState(p *sessions.Purger, s *sessions.PurgeState) *sessions.Purger {
	q := *p
	q.State = s
	return &q
}
