package storetest

import (
	"errors"
	"sync"
	"testing"
	"time"

	"github.com/chatproxy/caddy-chatproxy/sessions"
)

// A waiting execution is recorded per session, taken once, cleared only by
// its holder, and goes with its session.
func testWaiting(t *testing.T, st sessions.Store) {
	mustCreate(t, st, newSession("wait-a"))
	now := t0.Add(time.Minute)
	w := sessions.Waiting{
		ExecutionID: "41", ResumeToken: "n8n-token", Holder: "holder-1",
		Integrated: true, Blocked: true, Until: now.Add(10 * time.Minute),
	}

	_, err := st.TakeWaiting(ctx(t), "wait-a", now)
	wantErr(t, "TakeWaiting with nothing waiting", err, sessions.ErrNotFound)
	wantErr(t, "SetWaiting on a missing session", st.SetWaiting(ctx(t), "missing", w), sessions.ErrNotFound)
	bad := w
	bad.ExecutionID = ""
	wantErr(t, "SetWaiting without an execution id", st.SetWaiting(ctx(t), "wait-a", bad), sessions.ErrInvalidData)

	if err := st.SetWaiting(ctx(t), "wait-a", w); err != nil {
		t.Fatalf("SetWaiting: %v", err)
	}
	read, err := st.GetWaiting(ctx(t), "wait-a")
	if err != nil {
		t.Fatalf("GetWaiting: %v", err)
	}
	got, err := st.TakeWaiting(ctx(t), "wait-a", now)
	if err != nil {
		t.Fatalf("TakeWaiting: %v", err)
	}
	if *read != *got {
		t.Errorf("GetWaiting = %+v, TakeWaiting = %+v", *read, *got)
	}
	if _, err := st.GetWaiting(ctx(t), "wait-a"); !isNotFound(err) {
		t.Errorf("GetWaiting after TakeWaiting: %v, want ErrNotFound", err)
	}
	want := w
	want.Until = w.Until.UTC().Truncate(time.Microsecond)
	if !timeEqual(got.Until, want.Until) {
		t.Errorf("Until = %v, want %v in UTC", got.Until, want.Until)
	}
	got.Until = want.Until
	if *got != want {
		t.Errorf("TakeWaiting = %+v, want %+v", *got, want)
	}
	_, err = st.TakeWaiting(ctx(t), "wait-a", now)
	wantErr(t, "second TakeWaiting", err, sessions.ErrNotFound)

	// A new record replaces the old one; an empty token stays empty.
	if err := st.SetWaiting(ctx(t), "wait-a", w); err != nil {
		t.Fatal(err)
	}
	w2 := sessions.Waiting{ExecutionID: "42", Holder: "holder-2", Until: now.Add(time.Minute)}
	if err := st.SetWaiting(ctx(t), "wait-a", w2); err != nil {
		t.Fatal(err)
	}
	if ok, err := st.ClearWaiting(ctx(t), "wait-a", "holder-1"); err != nil || ok {
		t.Errorf("ClearWaiting by the replaced holder = %v, %v; want false", ok, err)
	}
	got, err = st.TakeWaiting(ctx(t), "wait-a", now)
	if err != nil || got.ExecutionID != "42" || got.ResumeToken != "" || got.Integrated || got.Blocked || got.Holder != "holder-2" {
		t.Errorf("TakeWaiting after replace = %+v, %v", got, err)
	}

	// Only the holder clears it.
	if err := st.SetWaiting(ctx(t), "wait-a", w); err != nil {
		t.Fatal(err)
	}
	if ok, err := st.ClearWaiting(ctx(t), "wait-a", "someone-else"); err != nil || ok {
		t.Errorf("ClearWaiting by another holder = %v, %v; want false", ok, err)
	}
	if ok, err := st.ClearWaiting(ctx(t), "wait-a", "holder-1"); err != nil || !ok {
		t.Errorf("ClearWaiting by its holder = %v, %v; want true", ok, err)
	}
	if ok, err := st.ClearWaiting(ctx(t), "wait-a", "holder-1"); err != nil || ok {
		t.Errorf("second ClearWaiting = %v, %v; want false", ok, err)
	}
	_, err = st.TakeWaiting(ctx(t), "wait-a", now)
	wantErr(t, "TakeWaiting after ClearWaiting", err, sessions.ErrNotFound)

	// A wait that is over is not handed out, and is gone.
	if err := st.SetWaiting(ctx(t), "wait-a", w); err != nil {
		t.Fatal(err)
	}
	_, err = st.TakeWaiting(ctx(t), "wait-a", w.Until)
	wantErr(t, "TakeWaiting when the wait is over", err, sessions.ErrNotFound)
	if err := st.SetWaiting(ctx(t), "wait-a", w); err != nil {
		t.Fatal(err)
	}
	if _, err := st.TakeWaiting(ctx(t), "wait-a", now); err != nil {
		t.Errorf("TakeWaiting after an expired record was set again: %v", err)
	}

	// It goes with its session: deleted, or revoked (then nothing is set).
	if err := st.SetWaiting(ctx(t), "wait-a", w); err != nil {
		t.Fatal(err)
	}
	if err := st.DeleteSession(ctx(t), "wait-a"); err != nil {
		t.Fatal(err)
	}
	mustCreate(t, st, newSession("wait-a"))
	_, err = st.TakeWaiting(ctx(t), "wait-a", now)
	wantErr(t, "TakeWaiting after the session was deleted and made again", err, sessions.ErrNotFound)
	if err := st.RevokeSession(ctx(t), "wait-a", now); err != nil {
		t.Fatal(err)
	}
	wantErr(t, "SetWaiting on a revoked session", st.SetWaiting(ctx(t), "wait-a", w), sessions.ErrNotFound)
}

// Of several messages racing for one waiting execution, exactly one
// resumes it.
func testWaitingTakeOnce(t *testing.T, st sessions.Store) {
	mustCreate(t, st, newSession("wait-race"))
	now := t0.Add(time.Minute)
	for round := range 5 {
		if err := st.SetWaiting(ctx(t), "wait-race", sessions.Waiting{ExecutionID: "7", Holder: "h", Until: now.Add(time.Hour)}); err != nil {
			t.Fatal(err)
		}
		var wg sync.WaitGroup
		var mu sync.Mutex
		taken := 0
		for range 8 {
			wg.Go(func() {
				_, err := st.TakeWaiting(ctx(t), "wait-race", now)
				switch {
				case err == nil:
					mu.Lock()
					taken++
					mu.Unlock()
				case !isNotFound(err):
					t.Errorf("TakeWaiting: %v", err)
				}
			})
		}
		wg.Wait()
		if taken != 1 {
			t.Fatalf("round %d: %d callers took the execution, want 1", round, taken)
		}
	}
}

func isNotFound(err error) bool { return errors.Is(err, sessions.ErrNotFound) }
