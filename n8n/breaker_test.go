package n8n

import (
	"errors"
	"strings"
	"testing"
	"time"
)

var (
	errDown = newError(ReasonConnect, errors.New("connection refused"))
	errUp   = newError(ReasonWorkflowError, errors.New("error chunk"))
)

// clockBreaker is a breaker on a clock the test moves.
func clockBreaker(cfg BreakerConfig) (*breaker, *time.Time, *[]string) {
	now := time.Unix(1_700_000_000, 0)
	var changes []string
	b := newBreaker(cfg, func(from, to BreakerState) { changes = append(changes, string(from)+">"+string(to)) })
	b.now = func() time.Time { return now }
	return b, &now, &changes
}

func mustAllow(t *testing.T, b *breaker) func(error) {
	t.Helper()
	done, err := b.allow()
	if err != nil {
		t.Fatalf("refused in state %s: %v", b.State(), err)
	}
	return done
}

// TestBreakerProbesAfterGrowingIntervals: open 1 s, then 2, 4, 8, 16 s
// after failed probes, capped at OpenTimeout; a good probe closes it and
// the next opening starts at 1 s again.
func TestBreakerProbesAfterGrowingIntervals(t *testing.T) {
	b, now, _ := clockBreaker(BreakerConfig{FailureThreshold: 3, OpenTimeout: 30 * time.Second, HalfOpenProbes: 1})
	for range 3 {
		mustAllow(t, b)(errDown)
	}
	for i, want := range []time.Duration{1, 2, 4, 8, 16, 30, 30} {
		want *= time.Second
		if b.State() != StateOpen {
			t.Fatalf("interval %d: state %s", i, b.State())
		}
		if ra := b.retryAfter(); ra != want {
			t.Fatalf("interval %d: Retry-After %v, want %v", i, ra, want)
		}
		*now = now.Add(want - time.Millisecond)
		if _, err := b.allow(); err == nil {
			t.Fatalf("interval %d: a probe went %v early", i, time.Millisecond)
		}
		*now = now.Add(time.Millisecond)
		mustAllow(t, b)(errDown) // the probe fails: open again, for longer
	}
	*now = now.Add(30 * time.Second)
	mustAllow(t, b)(nil)
	if b.State() != StateClosed {
		t.Fatalf("state %s after a good probe", b.State())
	}
	for range 3 {
		mustAllow(t, b)(errDown)
	}
	if ra := b.retryAfter(); b.State() != StateOpen || ra != time.Second {
		t.Fatalf("reopened: %s for %v, want open for 1s", b.State(), ra)
	}
}

// TestBreakerShortOpenTimeout: an open time under a second is the whole
// interval every time.
func TestBreakerShortOpenTimeout(t *testing.T) {
	b, now, _ := clockBreaker(BreakerConfig{FailureThreshold: 1, OpenTimeout: 200 * time.Millisecond, HalfOpenProbes: 1})
	mustAllow(t, b)(errDown)
	for range 3 {
		if b.State() != StateOpen {
			t.Fatalf("state %s", b.State())
		}
		*now = now.Add(200 * time.Millisecond)
		mustAllow(t, b)(errDown)
	}
}

// TestBreakerVerdicts: workflow errors reset the count of failures in a
// row (n8n answered); cancellations leave it; a half-open probe that was
// cancelled frees its place; outcomes of requests let through before the
// circuit changed state are ignored.
func TestBreakerVerdicts(t *testing.T) {
	b, now, changes := clockBreaker(BreakerConfig{FailureThreshold: 3, OpenTimeout: 30 * time.Second, HalfOpenProbes: 1})
	canceled := newError(ReasonCanceled, errors.New("gone"))
	mustAllow(t, b)(errDown)
	mustAllow(t, b)(errDown)
	mustAllow(t, b)(errUp) // resets
	mustAllow(t, b)(errDown)
	mustAllow(t, b)(canceled) // neither
	mustAllow(t, b)(errDown)
	if b.State() != StateClosed {
		t.Fatalf("opened after 2 failures in a row")
	}
	late := mustAllow(t, b) // under way while the circuit opens
	mustAllow(t, b)(errDown)
	if b.State() != StateOpen {
		t.Fatalf("state %s after 3 failures in a row", b.State())
	}
	late(nil) // an old success does not close it
	if b.State() != StateOpen {
		t.Fatalf("an outcome from before the opening closed the circuit")
	}

	*now = now.Add(time.Second)
	probe := mustAllow(t, b)
	if _, err := b.allow(); err == nil {
		t.Fatal("a second request went through while the probe is under way")
	}
	probe(canceled) // says nothing: another request may probe
	probe = mustAllow(t, b)
	probe(errUp) // n8n answered, even with a workflow error: closed
	if b.State() != StateClosed {
		t.Fatalf("state %s after a probe n8n answered", b.State())
	}
	want := "closed>open open>half-open half-open>closed"
	if got := strings.Join(*changes, " "); got != want {
		t.Fatalf("changes %q, want %q", got, want)
	}
}
