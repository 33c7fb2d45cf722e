package handler

import (
	"context"
	"net/http"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/chatproxy/caddy-chatproxy/sessions"
)

// pingCounter is a store that counts its pings.
type pingCounter struct {
	sessions.Store
	pings atomic.Int64
}

func (p *pingCounter) Ping(ctx context.Context) error {
	p.pings.Add(1)
	time.Sleep(20 * time.Millisecond) // a check takes a moment: callers overlap it
	return p.Store.Ping(ctx)
}

// /health is open to anyone and polled by load balancers: a burst of
// requests costs one database ping, and a result is reused for about a
// second.
func TestHealthSharesOneCheck(t *testing.T) {
	store := &pingCounter{Store: hdPostgres(t)}
	e := newHDEnv(t, store, nil)
	burst := func() {
		t.Helper()
		var wg sync.WaitGroup
		codes := make([]int, 100)
		for i := range codes {
			wg.Go(func() { codes[i] = e.do(t, "GET", "/health", "", nil).Code })
		}
		wg.Wait()
		for i, c := range codes {
			if c != http.StatusOK {
				t.Fatalf("request %d: /health %d", i, c)
			}
		}
	}
	burst()
	if got := store.pings.Load(); got != 1 {
		t.Fatalf("100 concurrent /health requests pinged the database %d times, want 1", got)
	}
	time.Sleep(healthMaxAge + 100*time.Millisecond)
	burst()
	if got := store.pings.Load(); got != 2 {
		t.Fatalf("a second burst after %v: %d pings in all, want 2", healthMaxAge, got)
	}
}
