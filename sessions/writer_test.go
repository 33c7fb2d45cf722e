package sessions_test

import (
	"context"
	"database/sql"
	"errors"
	"fmt"
	"io"
	"net"
	"net/url"
	"path/filepath"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/chatproxy/caddy-chatproxy/internal/testenv"
	"github.com/chatproxy/caddy-chatproxy/sessions"
)

// writerStore is a store under test and a way to open another store on
// the same database (to check what was committed from outside).
type writerStore struct {
	name string
	open func(t *testing.T) (st sessions.Store, reopen func(t *testing.T) sessions.Store)
}

// writerStores opens an empty, unused store of each kind. The store is not
// closed by a cleanup: tests close it (Close drains the queue).
func writerStores() []writerStore {
	return []writerStore{
		{name: "postgres", open: func(t *testing.T) (sessions.Store, func(*testing.T) sessions.Store) {
			u := testenv.PostgresURL(t)
			st, err := sessions.OpenPostgres(u)
			if err != nil {
				t.Fatal(err)
			}
			return st, func(t *testing.T) sessions.Store { return openPostgres(t, u) }
		}},
		{name: "sqlite", open: func(t *testing.T) (sessions.Store, func(*testing.T) sessions.Store) {
			path := filepath.Join(t.TempDir(), "chatproxy.db")
			st, err := sessions.OpenSQLite(path)
			if err != nil {
				t.Fatal(err)
			}
			return st, func(t *testing.T) sessions.Store { return openSQLite(t, path) }
		}},
	}
}

func closeStore(t *testing.T, st sessions.Store) {
	t.Helper()
	if err := st.Close(); err != nil {
		t.Errorf("Close: %v", err)
	}
}

func wctx(t *testing.T) context.Context {
	c, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	t.Cleanup(cancel)
	return c
}

func testSession(id string) *sessions.Session {
	return &sessions.Session{ID: id, Site: "example.com", ExpiresAt: time.Now().Add(time.Hour)}
}

// wantConversation checks a session holds exactly the given messages (by
// id, in order) and that message_count agrees.
func wantConversation(t *testing.T, st sessions.Store, id string, msgIDs ...string) {
	t.Helper()
	c := wctx(t)
	s, err := st.GetSession(c, id)
	if err != nil {
		t.Fatalf("session %s: %v", id, err)
	}
	p, err := st.ListMessages(c, id, "", 100000)
	if err != nil {
		t.Fatalf("messages of %s: %v", id, err)
	}
	var got []string
	for _, m := range p.Messages {
		got = append(got, m.ID)
	}
	if s.MessageCount != len(msgIDs) || p.TotalCount != len(msgIDs) || strings.Join(got, ",") != strings.Join(msgIDs, ",") {
		t.Fatalf("session %s: message_count %d, %d stored %v; want exactly %v", id, s.MessageCount, p.TotalCount, got, msgIDs)
	}
}

// 1,000 visitors at once, each creating a session, sending a message,
// getting a reply and being touched: every write is committed exactly
// once, and each caller gets its own row's result.
func TestWriterThousandConcurrentWriters(t *testing.T) {
	for _, ws := range writerStores() {
		t.Run(ws.name, func(t *testing.T) {
			st, reopen := ws.open(t)
			const n = 1000
			var wg sync.WaitGroup
			errs := make([]error, n)
			userIDs, replyIDs := make([]string, n), make([]string, n)
			var batches, biggest atomic.Int64
			_, release := sessions.HoldWrites(st, func(size int) {
				batches.Add(1)
				for b := biggest.Load(); int64(size) > b && !biggest.CompareAndSwap(b, int64(size)); b = biggest.Load() {
				}
			})
			release() // only counting
			c := wctx(t)
			for i := range n {
				wg.Go(func() {
					id := fmt.Sprintf("visitor-%04d", i)
					errs[i] = func() error {
						if err := st.CreateSession(c, testSession(id)); err != nil {
							return fmt.Errorf("create: %w", err)
						}
						um := &sessions.Message{SessionID: id, Content: "question " + id}
						s, err := st.AppendUserMessage(c, um, sessions.KindVisitor)
						if err != nil {
							return fmt.Errorf("user message: %w", err)
						}
						if s.ID != id || s.MessageCount != 1 {
							return fmt.Errorf("user message returned session %s with %d messages", s.ID, s.MessageCount)
						}
						rm := &sessions.Message{SessionID: id, Role: sessions.RoleAssistant, Content: "answer " + id}
						if err := st.AppendMessage(c, rm); err != nil {
							return fmt.Errorf("reply: %w", err)
						}
						if err := st.TouchSession(c, id, time.Now(), time.Time{}); err != nil {
							return fmt.Errorf("touch: %w", err)
						}
						userIDs[i], replyIDs[i] = um.ID, rm.ID
						return nil
					}()
				})
			}
			wg.Wait()
			for i, err := range errs {
				if err != nil {
					t.Errorf("writer %d: %v", i, err)
				}
			}
			closeStore(t, st)
			check := reopen(t)
			stats, err := check.Stats(c)
			if err != nil {
				t.Fatal(err)
			}
			if stats.Sessions != n || stats.Messages != 2*n {
				t.Fatalf("stored %d sessions and %d messages, want %d and %d", stats.Sessions, stats.Messages, n, 2*n)
			}
			for i := range n {
				wantConversation(t, check, fmt.Sprintf("visitor-%04d", i), userIDs[i], replyIDs[i])
			}
			// 4,000 writes: batched, not one commit each.
			t.Logf("%d commits attempted for %d writes, largest batch %d", batches.Load(), 4*n, biggest.Load())
			if batches.Load() >= 4*n || biggest.Load() < 2 {
				t.Errorf("%d commits for %d writes, largest batch %d: writes were not grouped", batches.Load(), 4*n, biggest.Load())
			}
		})
	}
}

// holdWriter makes the writer stop at its next batch: a first write (a
// touch of a session that does not exist) is sent and the writer held
// before committing it, so later writes wait in the queue. The function
// returned releases the writer and checks the first write's result.
func holdWriter(t *testing.T, st sessions.Store, batch func(int)) func() {
	t.Helper()
	held, release := sessions.HoldWrites(st, batch)
	t.Cleanup(release)
	done := make(chan error, 1)
	go func() { done <- st.TouchSession(context.Background(), "plug", time.Now(), time.Time{}) }()
	select {
	case <-held:
	case <-time.After(30 * time.Second):
		t.Fatal("the writer did not take the first write")
	}
	return func() {
		release()
		if err := <-done; !errors.Is(err, sessions.ErrNotFound) {
			t.Errorf("first write: %v, want not found", err)
		}
	}
}

// waitQueued waits until n writes are in the store's queue.
func waitQueued(t *testing.T, st sessions.Store, n int) {
	t.Helper()
	for deadline := time.Now().Add(30 * time.Second); sessions.QueuedWrites(st) < n; {
		if time.Now().After(deadline) {
			t.Fatalf("%d writes queued, want %d", sessions.QueuedWrites(st), n)
		}
		time.Sleep(time.Millisecond)
	}
}

// Rows that fail in a batch (a message id already taken, which aborts a
// PostgreSQL transaction; a session that does not exist) fail only their
// own requests: the rest of the batch is committed.
func TestWriterBadRowFailsAlone(t *testing.T) {
	for _, ws := range writerStores() {
		t.Run(ws.name, func(t *testing.T) {
			st, reopen := ws.open(t)
			c := wctx(t)
			if err := st.CreateSession(c, testSession("s")); err != nil {
				t.Fatal(err)
			}
			taken := &sessions.Message{SessionID: "s", Role: sessions.RoleUser, Content: "first"}
			if err := st.AppendMessage(c, taken); err != nil {
				t.Fatal(err)
			}
			var sizes []int
			var mu sync.Mutex
			release := holdWriter(t, st, func(n int) { mu.Lock(); sizes = append(sizes, n); mu.Unlock() })

			const good = 40
			type result struct {
				msg *sessions.Message
				err error
			}
			results := make([]result, good+3)
			var wg sync.WaitGroup
			for i := range results {
				m := &sessions.Message{SessionID: "s", Role: sessions.RoleAssistant, Content: fmt.Sprint(i)}
				switch i {
				case 10:
					m.ID = taken.ID // taken: ErrExists
				case 20:
					m.SessionID = "nobody" // no such session: ErrNotFound
				case 30:
					m.Role = "" // AppendUserMessage's
				}
				results[i].msg = m
				wg.Go(func() {
					if i == 30 {
						_, results[i].err = st.AppendUserMessage(c, m, sessions.KindWidget) // wrong kind: ErrNotFound
						return
					}
					results[i].err = st.AppendMessage(c, m)
				})
			}
			waitQueued(t, st, len(results))
			release()
			wg.Wait()
			want := []string{taken.ID}
			for i, r := range results {
				switch i {
				case 10:
					if !errors.Is(r.err, sessions.ErrExists) {
						t.Errorf("append with a taken id: %v, want ErrExists", r.err)
					}
				case 20, 30:
					if !errors.Is(r.err, sessions.ErrNotFound) {
						t.Errorf("append %d to a missing session: %v, want ErrNotFound", i, r.err)
					}
				default:
					if r.err != nil {
						t.Errorf("append %d beside the bad rows: %v", i, r.err)
					}
				}
			}
			mu.Lock()
			t.Logf("attempts: %v", sizes)
			if len(sizes) < 2 || sizes[1] != len(results) {
				t.Errorf("attempts %v: the writes were not in one batch of %d", sizes, len(results))
			}
			mu.Unlock()
			closeStore(t, st)
			check := reopen(t)
			p, err := check.ListMessages(c, "s", "", 100)
			if err != nil {
				t.Fatal(err)
			}
			stored := map[string]bool{}
			for _, m := range p.Messages {
				stored[m.ID] = true
			}
			for i, r := range results {
				if r.err == nil {
					want = append(want, r.msg.ID)
					if !stored[r.msg.ID] {
						t.Errorf("append %d reported stored, is not", i)
					}
				}
			}
			wantConversation(t, check, "s", idsInOrder(p.Messages, want)...)
		})
	}
}

// idsInOrder returns want in the order the page holds them, failing
// nothing itself: wantConversation compares.
func idsInOrder(ms []sessions.Message, want []string) []string {
	in := map[string]bool{}
	for _, id := range want {
		in[id] = true
	}
	var out []string
	for _, m := range ms {
		if in[m.ID] {
			out = append(out, m.ID)
			delete(in, m.ID)
		}
	}
	for id := range in {
		out = append(out, id) // missing: makes the comparison fail
	}
	return out
}

// A full queue refuses at once with ErrOverloaded; what was queued is
// still committed.
func TestWriterQueueFull(t *testing.T) {
	for _, ws := range writerStores() {
		t.Run(ws.name, func(t *testing.T) {
			st, reopen := ws.open(t)
			const size = 8
			sessions.SetWriteQueue(st, size)
			c := wctx(t)
			if err := st.Ping(c); err != nil {
				t.Fatal(err)
			}
			release := holdWriter(t, st, nil)
			var wg sync.WaitGroup
			errs := make([]error, size)
			for i := range size {
				wg.Go(func() { errs[i] = st.CreateSession(c, testSession(fmt.Sprint("queued-", i))) })
			}
			waitQueued(t, st, size)
			start := time.Now()
			err := st.CreateSession(c, testSession("one-too-many"))
			if !errors.Is(err, sessions.ErrOverloaded) {
				t.Fatalf("write to a full queue: %v, want ErrOverloaded", err)
			}
			if took := time.Since(start); took > time.Second {
				t.Errorf("refusing took %v; want at once", took)
			}
			release()
			wg.Wait()
			for i, err := range errs {
				if err != nil {
					t.Errorf("queued write %d: %v", i, err)
				}
			}
			closeStore(t, st)
			check := reopen(t)
			stats, err := check.Stats(c)
			if err != nil {
				t.Fatal(err)
			}
			if stats.Sessions != size {
				t.Errorf("%d sessions stored, want the %d queued", stats.Sessions, size)
			}
		})
	}
}

// Close commits what is queued before it returns; writes after it are
// refused.
func TestWriterCloseDrains(t *testing.T) {
	for _, ws := range writerStores() {
		t.Run(ws.name, func(t *testing.T) {
			st, reopen := ws.open(t)
			c := wctx(t)
			if err := st.Ping(c); err != nil {
				t.Fatal(err)
			}
			release := holdWriter(t, st, nil)
			const n = 200
			var wg sync.WaitGroup
			errs := make([]error, n)
			for i := range n {
				wg.Go(func() { errs[i] = st.CreateSession(c, testSession(fmt.Sprint("draining-", i))) })
			}
			waitQueued(t, st, n)
			closed := make(chan error, 1)
			go func() { closed <- st.Close() }()
			for !sessions.WritesClosed(st) {
				time.Sleep(time.Millisecond)
			}
			if err := st.CreateSession(c, testSession("late")); err == nil {
				t.Error("write after Close: want an error")
			}
			select {
			case err := <-closed:
				t.Fatalf("Close returned (%v) with writes queued", err)
			case <-time.After(50 * time.Millisecond):
			}
			release()
			if err := <-closed; err != nil {
				t.Fatalf("Close: %v", err)
			}
			wg.Wait()
			for i, err := range errs {
				if err != nil {
					t.Errorf("write %d queued before Close: %v", i, err)
				}
			}
			check := reopen(t)
			stats, err := check.Stats(c)
			if err != nil {
				t.Fatal(err)
			}
			if stats.Sessions != n {
				t.Errorf("%d sessions stored, want the %d queued before Close", stats.Sessions, n)
			}
		})
	}
}

// tcpForwarder forwards connections to target; cut closes the listener
// and every connection (the database is unreachable: new connections are
// refused, pooled ones are dead), restore listens again on the same port.
type tcpForwarder struct {
	target, addr string
	mu           sync.Mutex
	ln           net.Listener
	conns        map[net.Conn]bool
	wg           sync.WaitGroup
}

func (f *tcpForwarder) start(t *testing.T) {
	t.Helper()
	addr := f.addr
	if addr == "" {
		addr = "127.0.0.1:0"
	}
	var ln net.Listener
	var err error
	for deadline := time.Now().Add(5 * time.Second); ; time.Sleep(20 * time.Millisecond) {
		if ln, err = net.Listen("tcp", addr); err == nil || time.Now().After(deadline) {
			break
		}
	}
	if err != nil {
		t.Fatal(err)
	}
	f.mu.Lock()
	f.ln, f.addr = ln, ln.Addr().String()
	if f.conns == nil {
		f.conns = map[net.Conn]bool{}
	}
	f.mu.Unlock()
	f.wg.Go(func() {
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			up, err := net.DialTimeout("tcp", f.target, time.Second)
			if err != nil {
				_ = c.Close()
				continue
			}
			f.mu.Lock()
			f.conns[c], f.conns[up] = true, true
			f.mu.Unlock()
			pipe := func(dst, src net.Conn) {
				_, _ = io.Copy(dst, src)
				_ = dst.Close()
				_ = src.Close()
			}
			f.wg.Go(func() { pipe(up, c) })
			f.wg.Go(func() { pipe(c, up) })
		}
	})
}

func (f *tcpForwarder) cut() {
	f.mu.Lock()
	if f.ln != nil {
		_ = f.ln.Close()
	}
	for c := range f.conns {
		_ = c.Close()
	}
	clear(f.conns)
	f.mu.Unlock()
	f.wg.Wait()
}

// forwardedPostgres is the test's PostgreSQL schema reached through a
// forwarder, and the direct URL.
func forwardedPostgres(t *testing.T) (via, direct string, fwd *tcpForwarder) {
	t.Helper()
	direct = testenv.PostgresURL(t)
	u, err := url.Parse(direct)
	if err != nil {
		t.Fatal(err)
	}
	target := u.Host
	if u.Port() == "" {
		target = net.JoinHostPort(u.Hostname(), "5432")
	}
	fwd = &tcpForwarder{target: target}
	fwd.start(t)
	t.Cleanup(fwd.cut)
	u.Host = fwd.addr
	q := u.Query()
	q.Set("connect_timeout", "1")
	u.RawQuery = strings.ReplaceAll(q.Encode(), "+", "%20")
	return u.String(), direct, fwd
}

// A database outage shorter than store_wait loses nothing: writes in
// flight when it starts and writes sent during it wait in the queue and
// are committed, exactly once, when it is back. Writes on a session cut
// at any point of their commit included (an unacknowledged commit is
// found stored on the next attempt).
func TestWriterRidesOutPostgresOutage(t *testing.T) {
	via, direct, fwd := forwardedPostgres(t)
	st, err := sessions.OpenPostgres(via)
	if err != nil {
		t.Fatal(err)
	}
	st.SetStoreWait(4 * time.Second)
	c := wctx(t)
	const writers = 40
	for i := range writers {
		if err := st.CreateSession(c, testSession(fmt.Sprint("w", i))); err != nil {
			t.Fatal(err)
		}
	}
	stop := make(chan struct{})
	var wg sync.WaitGroup
	var mu sync.Mutex
	stored := map[string][]string{} // session: message ids acknowledged
	var failures []error
	var created []string
	for i := range writers {
		wg.Go(func() {
			id := fmt.Sprint("w", i)
			for k := 0; ; k++ {
				select {
				case <-stop:
					return
				default:
				}
				var err error
				if k%5 == 4 {
					// A new session now and then: creations ride it out too.
					nid := fmt.Sprintf("%s-new-%d", id, k)
					if err = st.CreateSession(c, testSession(nid)); err == nil {
						mu.Lock()
						created = append(created, nid)
						mu.Unlock()
					}
				} else {
					m := &sessions.Message{SessionID: id, Content: fmt.Sprint(k)}
					if _, err = st.AppendUserMessage(c, m, sessions.KindVisitor); err == nil {
						mu.Lock()
						stored[id] = append(stored[id], m.ID)
						mu.Unlock()
					}
				}
				if err != nil {
					mu.Lock()
					failures = append(failures, err)
					mu.Unlock()
				}
			}
		})
	}
	time.Sleep(300 * time.Millisecond)
	fwd.cut()
	cutAt := time.Now()
	time.Sleep(1500 * time.Millisecond)
	fwd.start(t)
	t.Logf("database unreachable for %v", time.Since(cutAt).Round(time.Millisecond))
	time.Sleep(500 * time.Millisecond)
	close(stop)
	wg.Wait()
	closeStore(t, st)
	for _, err := range failures {
		t.Errorf("write failed during a %v outage with store_wait 4s: %v", 1500*time.Millisecond, err)
	}
	check := openPostgres(t, direct)
	total := 0
	for i := range writers {
		id := fmt.Sprint("w", i)
		wantConversation(t, check, id, stored[id]...)
		total += len(stored[id])
	}
	for _, id := range created {
		if _, err := check.GetSession(c, id); err != nil {
			t.Errorf("session %s acknowledged, not stored: %v", id, err)
		}
	}
	stats, err := check.Stats(c)
	if err != nil {
		t.Fatal(err)
	}
	if stats.Messages != int64(total) || stats.Sessions != int64(writers+len(created)) {
		t.Errorf("stored %d messages, %d sessions; acknowledged %d, %d", stats.Messages, stats.Sessions, total, writers+len(created))
	}
	t.Logf("%d messages and %d sessions acknowledged across the outage", total, len(created))
}

// An outage longer than store_wait fails the writes waiting for it after
// about store_wait, with the store's error (not ErrOverloaded).
func TestWriterGivesUpAfterStoreWait(t *testing.T) {
	via, _, fwd := forwardedPostgres(t)
	st := openPostgres(t, via)
	const wait = 700 * time.Millisecond
	st.SetStoreWait(wait)
	c := wctx(t)
	if err := st.CreateSession(c, testSession("s")); err != nil {
		t.Fatal(err)
	}
	fwd.cut()
	start := time.Now()
	err := st.AppendMessage(c, &sessions.Message{SessionID: "s", Role: sessions.RoleUser, Content: "lost"})
	took := time.Since(start)
	if err == nil || errors.Is(err, sessions.ErrOverloaded) || errors.Is(err, sessions.ErrNotFound) {
		t.Fatalf("write during a long outage: %v, want the store's error", err)
	}
	if took < wait || took > wait+3*time.Second {
		t.Errorf("gave up after %v (%v), want about store_wait (%v)", took, err, wait)
	}
	fwd.start(t)
}

// The embedded store's outage: another process holds the database's write
// lock for a while. Writes wait and are committed when it lets go.
func TestWriterRidesOutSQLiteLock(t *testing.T) {
	path := filepath.Join(t.TempDir(), "chatproxy.db")
	st, err := sessions.OpenSQLite(path)
	if err != nil {
		t.Fatal(err)
	}
	c := wctx(t)
	if err := st.CreateSession(c, testSession("s")); err != nil {
		t.Fatal(err)
	}
	other, err := sql.Open("sqlite", path+"?_pragma=busy_timeout(10000)&_txlock=immediate")
	if err != nil {
		t.Fatal(err)
	}
	defer other.Close()
	tx, err := other.BeginTx(c, nil)
	if err != nil {
		t.Fatal(err)
	}
	const n = 100
	var wg sync.WaitGroup
	errs := make([]error, n)
	ids := make([]string, n)
	for i := range n {
		wg.Go(func() {
			m := &sessions.Message{SessionID: "s", Role: sessions.RoleUser, Content: fmt.Sprint(i)}
			errs[i] = st.AppendMessage(c, m)
			ids[i] = m.ID
		})
	}
	time.Sleep(time.Second)
	if err := tx.Commit(); err != nil {
		t.Fatal(err)
	}
	wg.Wait()
	for i, err := range errs {
		if err != nil {
			t.Errorf("write %d: %v", i, err)
		}
	}
	closeStore(t, st)
	check := openSQLite(t, path)
	if s, err := check.GetSession(c, "s"); err != nil || s.MessageCount != n {
		t.Fatalf("after the lock: %+v, %v; want %d messages", s, err, n)
	}
}
