package chatproxy

// Fault drills: the module under the failures it must survive, each with
// the outcome the operator relies on asserted, not just "no panic".
//
//  1. PostgreSQL unreachable, then back: TestDrillPostgresUnreachable and
//     TestDrillPostgresCutMidStream (below).
//  2. Redis unreachable: limits fall back to process memory and /health
//     says degraded, then Redis is used again — covered by
//     TestGuardRedisOutageFallsBackAndRecovers (guard_routes_test.go), which
//     cuts Redis with the same TCP forwarder used here (grTCPProxy).
//  3. n8n down: the circuit opens after the configured failures; the
//     behaviour once open is in TestChatCircuitBreaker and
//     TestChatCircuitBreakerProbeCloses (chat_test.go); that the open circuit
//     answers fast, for three ways of being down, is TestDrillN8nDown.
//  4. n8n stalls mid-stream: the "stall" cases of
//     TestChatFailuresAfterFirstByte (chat_test.go), on both stores: with a
//     short stream_idle_timeout the client gets the first text, then an
//     upstream_timeout error event and data: [DONE]; n8n sees its request
//     abandoned and the reply is stored as partial with the relayed text.
//  5. 1,000 clients leave mid-stream: TestDrillThousandClientsDisconnect.

import (
	"bytes"
	"context"
	"database/sql"
	"encoding/json"
	"fmt"
	"net"
	"net/http"
	"net/url"
	"runtime"
	"runtime/debug"
	"runtime/pprof"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/caddyserver/caddy/v2"

	"github.com/chatproxy/caddy-chatproxy/internal/testkit"
	"github.com/chatproxy/caddy-chatproxy/sessions"
)

// pgDrill is a chat environment whose PostgreSQL sits behind a TCP
// forwarder (grTCPProxy, guard_routes_test.go): cut closes the listener
// and every forwarded connection, so the database is unreachable (new
// connections are refused, pooled ones are dead); restore listens again on
// the same port. The module keeps its URL, its pool and its provisioned
// state throughout: nothing is restarted.
type pgDrill struct {
	fwd    *grTCPProxy
	direct string // the test's schema on the real server, for checks
}

// newPgDrillEnv is newChatEnv on PostgreSQL reached through a forwarder.
// The test's own schema (testenv's search_path option) is kept, and
// connect_timeout=1 bounds every connection attempt.
func newPgDrillEnv(t *testing.T, mutate ...func(*ChatProxy)) (*chatEnv, *pgDrill) {
	t.Helper()
	d := &pgDrill{}
	e := newChatEnv(t, chatEnvOpts{kind: "postgres", mutate: func(cp *ChatProxy) {
		for _, m := range mutate {
			m(cp)
		}
		d.direct = cp.Database
		u, err := url.Parse(cp.Database)
		if err != nil {
			t.Fatalf("parsing the test database URL: %v", err)
		}
		target := u.Host
		if u.Port() == "" {
			target = net.JoinHostPort(u.Hostname(), "5432")
		}
		d.fwd = &grTCPProxy{target: target}
		if err := d.fwd.start(); err != nil {
			t.Fatal(err)
		}
		t.Cleanup(d.fwd.stop) // after the module's Cleanup (LIFO)
		u.Host = d.fwd.addr
		q := u.Query()
		q.Set("connect_timeout", "1")
		// As testenv does: %20 for the space in options, never '+'.
		u.RawQuery = strings.ReplaceAll(q.Encode(), "+", "%20")
		cp.Database = u.String()
	}})
	return e, d
}

func (d *pgDrill) cut() { d.fwd.stop() }

func (d *pgDrill) restore(t *testing.T) {
	t.Helper()
	if err := d.fwd.start(); err != nil {
		t.Fatalf("listening again on %s: %v", d.fwd.addr, err)
	}
}

// waitHealthy polls /health until it answers 200 "ok" and returns how long
// that took. Once it has, no connection from before an outage is left
// idle in the pool: the pool hands out its newest idle connection first
// and dials only when none is idle, so every stale one was tried (and
// dropped) before the fresh one that answered the ping was made.
func waitHealthy(t *testing.T, e *chatEnv, within time.Duration) time.Duration {
	t.Helper()
	start := time.Now()
	for {
		code, h := e.health(t)
		if code == http.StatusOK && h.Status == "ok" && h.Checks["database"].Status == "ok" {
			return time.Since(start)
		}
		if time.Since(start) > within {
			t.Fatalf("/health still %d %+v %v after the database came back", code, h, within)
		}
		time.Sleep(25 * time.Millisecond)
	}
}

// wantStoreDown checks that /health reports the database down: 503 "down".
func wantStoreDown(t *testing.T, e *chatEnv) {
	t.Helper()
	rec := e.serve(t, "GET", "/health", "", nil)
	h := decode[healthBody](t, rec)
	if rec.Code != http.StatusServiceUnavailable || h.Status != "down" || h.Checks["database"].Status != "down" ||
		h.Checks["n8n"].Status != "ok" {
		t.Fatalf("/health with the database unreachable: %d %s", rec.Code, rec.Body)
	}
}

// drillRow is one stored message.
type drillRow struct{ Role, Status, Content string }

// drillSession is one stored session: its message_count and its messages,
// oldest first.
type drillSession struct {
	Count int
	Msgs  []drillRow
}

// storeDSN is the database/sql driver and source that reach cp's store
// directly (not through the module).
func storeDSN(cp *ChatProxy) (driver, dsn string) {
	if kind, _ := sessions.StoreKind(cp.Database); kind == "sqlite" {
		return "sqlite", sessions.SQLitePath(cp.Database) + "?_pragma=query_only(1)"
	}
	return "pgx", cp.Database
}

// storedState reads every session and message straight from the tables
// (chatproxy_sessions, chatproxy_messages), bypassing the module.
func storedState(t *testing.T, driver, dsn string) map[string]*drillSession {
	t.Helper()
	db, err := sql.Open(driver, dsn)
	if err != nil {
		t.Fatal(err)
	}
	defer db.Close()
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	out := map[string]*drillSession{}
	rows, err := db.QueryContext(ctx, `SELECT id, message_count FROM chatproxy_sessions`)
	if err != nil {
		t.Fatalf("reading sessions: %v", err)
	}
	for rows.Next() {
		var id string
		var n int
		if err := rows.Scan(&id, &n); err != nil {
			t.Fatal(err)
		}
		out[id] = &drillSession{Count: n}
	}
	if err := rows.Err(); err != nil {
		t.Fatal(err)
	}
	rows, err = db.QueryContext(ctx, `SELECT session_id, role, status, content FROM chatproxy_messages ORDER BY seq`)
	if err != nil {
		t.Fatalf("reading messages: %v", err)
	}
	defer rows.Close()
	for rows.Next() {
		var id string
		var m drillRow
		if err := rows.Scan(&id, &m.Role, &m.Status, &m.Content); err != nil {
			t.Fatal(err)
		}
		s := out[id]
		if s == nil {
			t.Fatalf("message %+v of a session that does not exist (%s)", m, id)
		}
		s.Msgs = append(s.Msgs, m)
	}
	if err := rows.Err(); err != nil {
		t.Fatal(err)
	}
	for id, s := range out {
		if s.Count != len(s.Msgs) {
			t.Errorf("session %s: message_count %d but %d messages stored: %+v", id, s.Count, len(s.Msgs), s.Msgs)
		}
	}
	return out
}

// wantStored checks a session's stored messages exactly.
func wantStored(t *testing.T, st map[string]*drillSession, id string, want ...drillRow) {
	t.Helper()
	s := st[id]
	if s == nil {
		t.Fatalf("session %s is not stored", id)
	}
	if fmt.Sprint(s.Msgs) != fmt.Sprint(want) || s.Count != len(want) {
		t.Fatalf("session %s holds (message_count %d)\n  %+v\nwant\n  %+v", id, s.Count, s.Msgs, want)
	}
}

// sseReply reads a whole SSE answer: the concatenated items; it must be
// framed by begin and end, end with [DONE] and hold no error event.
func sseReply(t *testing.T, body string) string {
	t.Helper()
	events := replyEvents(t, testkit.ParseSSE(body))
	wantDone(t, events[len(events)-1])
	var text strings.Builder
	for _, ev := range events[:len(events)-1] {
		text.WriteString(itemOf(t, ev))
	}
	return text.String()
}

// PostgreSQL becomes unreachable under a provisioned module and comes
// back: during the outage every route that needs the store answers 503
// store_unavailable with Retry-After, /health is 503 "down", n8n is never
// called and nothing is written; once the database is reachable again the
// same module (no restart, no reprovision) serves old and new sessions,
// and the tables hold exactly the exchanges that succeeded.
func TestDrillPostgresUnreachable(t *testing.T) {
	t.Parallel()
	// Writes wait store_wait for the database to come back, reads do not;
	// this outage outlasts it.
	const storeWait = time.Second
	e, db := newPgDrillEnv(t, func(cp *ChatProxy) { cp.StoreWait = caddy.Duration(storeWait) })
	e.fake.setScript(fakeStream("Hello ", "there."))
	const reply = "Hello there."
	user := func(s string) drillRow { return drillRow{"user", "complete", s} }
	answer := drillRow{"assistant", "complete", reply}

	a := e.newSession(t)
	if got := sseReply(t, e.serve(t, "POST", "/api/v1/chat/message", `{"message":"Before the outage"}`, authz(a.Token)).Body.String()); got != reply {
		t.Fatalf("reply before the outage %q", got)
	}
	if code, h := e.health(t); code != 200 || h.Status != "ok" {
		t.Fatalf("/health before the outage: %d %+v", code, h)
	}
	hits := e.fake.Hits()

	db.cut()
	cutAt := time.Now()
	widget := func(accept string) map[string]string {
		return map[string]string{"Origin": allowedOrigin, "Accept": accept}
	}
	for _, rq := range []struct {
		name, method, path, body string
		headers                  map[string]string
	}{
		{"session create", "POST", "/api/v1/session/create", `{"page_url":"https://shop.example.com/p/2"}`, map[string]string{"Origin": allowedOrigin}},
		{"chat message SSE", "POST", "/api/v1/chat/message", `{"message":"During the outage (SSE)"}`, authz(a.Token, "Accept", "text/event-stream")},
		{"chat message JSON", "POST", "/api/v1/chat/message", `{"message":"During the outage (JSON)"}`, authz(a.Token, "Accept", "application/json")},
		{"chat stream", "POST", "/api/v1/chat/stream", `{"message":"During the outage (stream)"}`, authz(a.Token)},
		{"widget sendMessage streaming", "POST", "/api/v1/n8n/chat", `{"action":"sendMessage","sessionId":"drill-widget-1","chatInput":"During the outage"}`, widget("text/plain")},
		{"widget sendMessage JSON", "POST", "/api/v1/n8n/chat", `{"action":"sendMessage","sessionId":"drill-widget-1","chatInput":"During the outage"}`, widget("application/json")},
		{"session validate", "GET", "/api/v1/session/validate", "", authz(a.Token)},
		{"history", "GET", "/api/v1/chat/history", "", authz(a.Token)},
	} {
		t.Run("outage/"+rq.name, func(t *testing.T) {
			start := time.Now()
			rec := e.serve(t, rq.method, rq.path, rq.body, rq.headers)
			took := time.Since(start)
			wantError(t, rec, http.StatusServiceUnavailable, "store_unavailable")
			if n, err := strconv.Atoi(rec.Header().Get("Retry-After")); err != nil || n < 1 {
				t.Fatalf("Retry-After %q", rec.Header().Get("Retry-After"))
			}
			for _, leak := range []string{db.fwd.addr, db.fwd.target, "postgres", "search_path", "dial", "refused"} {
				if strings.Contains(rec.Body.String(), leak) {
					t.Fatalf("error leaks %q: %s", leak, rec.Body)
				}
			}
			// A refused connection fails at once, a write after
			// store_wait; connect_timeout (1 s) bounds a silent one.
			if took > storeWait+2*time.Second {
				t.Fatalf("took %v to fail", took)
			}
			if rq.name == "session create" && took < storeWait {
				t.Fatalf("session create failed after %v, before store_wait (%v)", took, storeWait)
			}
		})
	}
	wantStoreDown(t, e)
	if got := e.fake.Hits() - hits; got != 0 {
		t.Fatalf("n8n was called %d times while the store was down", got)
	}
	outage := time.Since(cutAt)

	db.restore(t)
	recovered := waitHealthy(t, e, 10*time.Second)
	t.Logf("outage %v; /health ok again %v after the database was reachable", outage.Round(time.Millisecond), recovered.Round(time.Millisecond))

	// The same module, without a restart: the session from before the
	// outage goes on, a new one is created, the widget works.
	if got := sseReply(t, e.serve(t, "POST", "/api/v1/chat/message", `{"message":"After the outage"}`, authz(a.Token)).Body.String()); got != reply {
		t.Fatalf("reply after the outage %q", got)
	}
	c := e.newSession(t)
	rec := e.serve(t, "POST", "/api/v1/chat/message", `{"message":"New session"}`, authz(c.Token, "Accept", "application/json"))
	if rec.Code != 200 || decode[struct{ Response string }](t, rec).Response != reply {
		t.Fatalf("JSON chat on a new session: %d %s", rec.Code, rec.Body)
	}
	rec = e.serve(t, "POST", "/api/v1/n8n/chat", `{"action":"sendMessage","sessionId":"drill-widget-1","chatInput":"Widget after the outage"}`, widget("application/json"))
	if rec.Code != 200 || decode[struct{ Output string }](t, rec).Output != reply {
		t.Fatalf("widget after the outage: %d %s", rec.Code, rec.Body)
	}
	if got := e.fake.Hits() - hits; got != 3 {
		t.Fatalf("n8n calls after the outage: %d, want 3", got)
	}

	// Exactly the successful exchanges are stored: no session from the
	// refused create, no user message without its reply, message_count
	// equal to the rows (storedState checks that for every session).
	st := storedState(t, "pgx", db.direct)
	wantStored(t, st, a.SessionID, user("Before the outage"), answer, user("After the outage"), answer)
	wantStored(t, st, c.SessionID, user("New session"), answer)
	if len(st) != 3 {
		t.Fatalf("%d sessions stored, want 3 (two visitors, one widget): %v", len(st), st)
	}
	for id := range st {
		if id != a.SessionID && id != c.SessionID {
			wantStored(t, st, id, user("Widget after the outage"), answer)
		}
	}
	if h := e.history(t, a.Token); h.TotalCount != 4 || e.messageCount(t, a.Token) != 4 {
		t.Fatalf("history after the outage: %+v", h)
	}
}

// The database becomes unreachable in the middle of a streamed reply:
// after the user message was stored and n8n called, before the reply is
// stored. A stream holds no database connection, so the client still gets
// the whole reply and data: [DONE].
//
// The assistant row is stored, as streaming and empty, with the user
// message, and finished by storeReply (handler/pipeline.go) once the reply
// has ended: detached from the request, retried until a timeout, its
// failure only logged. So:
//   - if the database is still unreachable when the reply's store gives
//     up, the row stays streaming and empty: the history shows the user
//     message unanswered (until the row is found lost and stored as an
//     error), which is true of what the visitor can find later, and
//     consistent (message_count counted both rows in one statement);
//   - if it is back by then, the reply is stored whole, as complete.
func TestDrillPostgresCutMidStream(t *testing.T) {
	t.Parallel()
	const (
		msg   = "Tell me a long story"
		first = "Once upon a time, "
		rest  = "the end."
	)
	const storeTimeout = 1500 * time.Millisecond
	// When is the database back: before the reply ends, while the reply's
	// store is being retried, or only after the retries gave up.
	const (
		beforeEnd = iota
		whileRetrying
		afterGivingUp
	)
	answered := []drillRow{{"user", "complete", msg}, {"assistant", "complete", first + rest}}
	tests := []struct {
		name string
		back int
		want []drillRow
	}{
		{"database back before the reply ends", beforeEnd, answered},
		{"database back while the reply's store is retried", whileRetrying, answered},
		// The question stays without its answer (its reply's row, stored
		// with the question, stays as it was: streaming, empty, until it is
		// found lost; see TestResumeLostReply): counts stay consistent.
		{"database down past the reply's store timeout", afterGivingUp, []drillRow{{"user", "complete", msg}, {"assistant", "streaming", ""}}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			t.Parallel()
			e, db := newPgDrillEnv(t, func(cp *ChatProxy) { cp.replyStoreTimeout = storeTimeout })
			gate := make(chan struct{})
			e.fake.setScript(e.fake.fakeThen(first, gate, func(w http.ResponseWriter, _ *http.Request) {
				_, _ = w.Write([]byte(n8nLine("item", rest) + n8nLine("end", "")))
				fakeFlush(w)
			}))
			s := e.newSession(t)
			resp := e.do(t, "POST", "/api/v1/chat/message", `{"message":"`+msg+`"}`, authz(s.Token))
			if resp.StatusCode != http.StatusOK {
				t.Fatalf("status %d", resp.StatusCode)
			}
			br := afterBegin(t, resp.Body)
			if got := itemOf(t, nextSSE(t, br)); got != first {
				t.Fatalf("first event %q", got)
			}
			db.cut()
			wantStoreDown(t, e)
			if tt.back == beforeEnd {
				db.restore(t)
				waitHealthy(t, e, 10*time.Second)
			}
			close(gate) // n8n finishes its reply
			if got := itemOf(t, nextSSE(t, br)); got != rest {
				t.Fatalf("second event %q", got)
			}
			wantEndDone(t, br)
			ended := time.Now()
			if tt.back == whileRetrying {
				time.Sleep(storeTimeout / 5) // a few attempts fail first
				db.restore(t)
			}
			wantStreamEnd(t, br)
			e.waitIdle(t) // storeReply has run
			if tt.back == afterGivingUp {
				// The store's clock starts when [DONE] is written, a moment
				// before the client reads it (ended): allow that moment on a
				// loaded machine. Giving up at the first failure would show
				// as ~50ms.
				if waited := time.Since(ended); waited < storeTimeout*9/10 {
					t.Fatalf("the reply's store gave up after %v, before its %v timeout", waited, storeTimeout)
				}
				db.restore(t)
			}
			waitHealthy(t, e, 10*time.Second)
			st := storedState(t, "pgx", db.direct)
			if len(st) != 1 {
				t.Fatalf("%d sessions stored, want 1", len(st))
			}
			wantStored(t, st, s.SessionID, tt.want...)
			// The module serves the session normally afterwards.
			e.fake.setScript(fakeStream("Still here."))
			if got := sseReply(t, e.serve(t, "POST", "/api/v1/chat/message", `{"message":"Are you there?"}`, authz(s.Token)).Body.String()); got != "Still here." {
				t.Fatalf("reply after the outage %q", got)
			}
			if h := e.history(t, s.Token); h.TotalCount != len(tt.want)+2 {
				t.Fatalf("history after the outage: %+v", h)
			}
		})
	}
}

// n8n down: after circuit_breaker's failures the circuit is open, and an
// open circuit answers 503 upstream_unavailable with Retry-After at once,
// without calling n8n: far faster than the failures that opened it, and
// well under the first-byte timeout.
func TestDrillN8nDown(t *testing.T) {
	t.Parallel()
	const (
		failures        = 3
		upstreamTimeout = time.Second
		fastEnough      = upstreamTimeout / 4
	)
	tests := []struct {
		name    string
		script  func(f *n8nFake) n8nScript // nil: n8n_webhook is a port nothing listens on
		status  int
		code    string
		hitsPer int // n8n hits per failed message (a delivered message is never re-sent)
	}{
		{name: "connection refused", status: 503, code: "upstream_unavailable"},
		{name: "502 from the proxy in front of n8n", script: func(*n8nFake) n8nScript { return fakeReply(502, "text/html", "<html>502 Bad Gateway</html>") },
			status: 502, code: "upstream_error", hitsPer: 1},
		{name: "no answer within the first-byte timeout", script: func(f *n8nFake) n8nScript { return f.fakeHang() },
			status: 504, code: "upstream_timeout", hitsPer: 1},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			t.Parallel()
			e := newChatEnv(t, chatEnvOpts{mutate: func(cp *ChatProxy) {
				cp.CircuitBreakerFailures = failures
				cp.CircuitBreakerOpen = caddy.Duration(time.Minute)
				cp.UpstreamTimeout = caddy.Duration(upstreamTimeout)
				if tt.script == nil {
					cp.N8nWebhook = closedURL(t)
				}
			}})
			if tt.script != nil {
				e.fake.setScript(tt.script(e.fake))
			}
			s := e.newSession(t)
			var failing []time.Duration
			for i := range failures {
				if code, h := e.health(t); code != 200 || h.Checks["n8n"].Status != "ok" {
					t.Fatalf("after %d of %d failures: /health %d %+v, want the circuit still closed", i, failures, code, h)
				}
				start := time.Now()
				rec := e.serve(t, "POST", "/api/v1/chat/message", fmt.Sprintf(`{"message":"Anyone there? %d"}`, i), authz(s.Token, "Accept", "application/json"))
				failing = append(failing, time.Since(start))
				wantError(t, rec, tt.status, tt.code)
			}
			// The circuit opens for 1 s first, then probes n8n: a machine too
			// busy to ask everything within that time checks less rather
			// than fail.
			opened := time.Now()
			stillOpen := func() bool { return time.Since(opened) < 800*time.Millisecond }
			if code, h := e.health(t); stillOpen() && (code != 200 || h.Status != "degraded" || h.Checks["n8n"].Status != "down") {
				t.Fatalf("after %d failures: /health %d %+v, want degraded with n8n down", failures, code, h)
			}
			hits := e.fake.Hits()
			if hits != failures*tt.hitsPer {
				t.Fatalf("n8n hit %d times by %d failed messages, want %d", hits, failures, failures*tt.hitsPer)
			}

			// Each route is asked three times and its fastest answer must be
			// fast: an open circuit that still waited (a retry's backoff,
			// the first-byte timeout) is slow every time, whereas a machine
			// busy with other work may stall any single request.
			var fastest, slowest time.Duration
			for _, rq := range []struct {
				name, path, body string
				headers          map[string]string
			}{
				{"chat JSON", "/api/v1/chat/message", `{"message":"While open (JSON)"}`, authz(s.Token, "Accept", "application/json")},
				{"chat SSE", "/api/v1/chat/message", `{"message":"While open (SSE)"}`, authz(s.Token, "Accept", "text/event-stream")},
				{"stream", "/api/v1/chat/stream", `{"message":"While open (stream)"}`, authz(s.Token)},
				{"widget", "/api/v1/n8n/chat", `{"action":"sendMessage","sessionId":"drill-open-circuit","chatInput":"While open"}`, map[string]string{"Origin": allowedOrigin, "Accept": "text/plain"}},
			} {
				if !stillOpen() {
					t.Logf("%s and later routes not checked: the first open second is over", rq.name)
					break
				}
				best := time.Hour
				for range 3 {
					start := time.Now()
					rec := e.serve(t, "POST", rq.path, rq.body, rq.headers)
					took := time.Since(start)
					best, slowest = min(best, took), max(slowest, took)
					wantError(t, rec, http.StatusServiceUnavailable, "upstream_unavailable")
					if n, err := strconv.Atoi(rec.Header().Get("Retry-After")); err != nil || n != 1 {
						t.Fatalf("%s: Retry-After %q, want 1 s (the rest of the first open period)", rq.name, rec.Header().Get("Retry-After"))
					}
				}
				if best > fastEnough {
					t.Fatalf("%s: the open circuit took at least %v to answer, want under %v (first-byte timeout %v)", rq.name, best, fastEnough, upstreamTimeout)
				}
				fastest = max(fastest, best)
			}
			if e.fake.Hits() != hits {
				t.Fatalf("the open circuit let %d requests through to n8n", e.fake.Hits()-hits)
			}
			t.Logf("%d failures took %v; once open, answers took %v at most per route (%v the slowest of all 12)",
				failures, failing, fastest.Round(time.Microsecond), slowest.Round(time.Microsecond))
		})
	}
}

// drillFigures is what the disconnect drill measures.
type drillFigures struct {
	goroutines int // runtime.NumGoroutine
	ours       int // goroutines in this module or in net/http connection code
	inflight   int // requests the module's server is handling
	upActive   int // requests the fake n8n is still answering
	upConns    int // connections open to the fake n8n
	acquired   int // PostgreSQL connections checked out of the pool (-1: embedded store)
}

func (f drillFigures) String() string {
	return fmt.Sprintf("goroutines %d (module/net/http %d), proxy requests %d, n8n requests %d, n8n conns %d, pool acquired %d",
		f.goroutines, f.ours, f.inflight, f.upActive, f.upConns, f.acquired)
}

// drillGoroutines counts all goroutines, and those whose stack is in this
// module's code or in net/http's server or client connections: the ones a
// leaked stream would keep.
func drillGoroutines() (total, ours int, dump string) {
	var buf bytes.Buffer
	_ = pprof.Lookup("goroutine").WriteTo(&buf, 2)
	dump = buf.String()
	for g := range strings.SplitSeq(dump, "\n\n") {
		if !strings.HasPrefix(g, "goroutine ") {
			continue
		}
		total++
		if strings.Contains(g, "caddy-chatproxy") || strings.Contains(g, "net/http.(*conn).serve") ||
			strings.Contains(g, "net/http.(*persistConn)") {
			ours++
		}
	}
	return total, ours, dump
}

func (e *chatEnv) drillFigures(withStacks bool) drillFigures {
	f := drillFigures{
		goroutines: runtime.NumGoroutine(),
		inflight:   e.live.InFlight(),
		upActive:   e.fake.Active(),
		upConns:    e.fake.OpenConns(),
		acquired:   -1,
	}
	if pg, ok := e.store.(*sessions.PostgresStore); ok {
		f.acquired = int(pg.Pool().Stat().AcquiredConns())
	}
	if withStacks {
		f.goroutines, f.ours, _ = drillGoroutines()
	}
	return f
}

// drillRaceBuild reports whether the test binary was built with -race.
func drillRaceBuild() bool {
	bi, ok := debug.ReadBuildInfo()
	if !ok {
		return false
	}
	for _, s := range bi.Settings {
		if s.Key == "-race" {
			return s.Value == "true"
		}
	}
	return false
}

// 1,000 visitors leave in the middle of their streams at once, half with
// a FIN and half with a RST. Afterwards nothing is left behind: no handler
// or goroutine, no connection to n8n (each upstream request was
// cancelled once no client resumed it for detached_timeout, here 1s), no
// PostgreSQL connection checked out, and every reply is stored as partial
// with the text relayed before the visitor left.
//
// Not parallel: goroutine counts are process-wide. Parallel tests of this
// package only start once every sequential top-level test has returned, so
// none runs alongside this one; what earlier sequential tests left winding
// down is covered by a margin, far below the thousands a leak would add.
func TestDrillThousandClientsDisconnect(t *testing.T) {
	streams := 1000
	if drillRaceBuild() {
		// The race detector allows 8128 live goroutines; 1,000 streams
		// take about 9 each.
		streams = 400
		t.Logf("race build: %d streams instead of 1,000", streams)
	}
	// Per stream: client and server ends of the visitor's connection, and
	// of the module's connection to n8n.
	drillNofile(t, uint64(4*streams+1024))
	for _, kind := range storeKinds {
		t.Run(kind, func(t *testing.T) { drillDisconnects(t, kind, streams) })
	}
}

func drillDisconnects(t *testing.T, kind string, streams int) {
	const first = "The first words of a long answer, "
	e := newChatEnv(t, chatEnvOpts{kind: kind, mutate: func(cp *ChatProxy) { cp.DetachedTimeout = caddy.Duration(time.Second) }})
	// n8n writes one item, then holds the stream until the proxy abandons
	// it: unlike fakeThen's, this hold is not limited to fakeWaitLimit, as
	// opening 1,000 streams on a loaded machine may take longer than that.
	e.fake.setScript(func(w http.ResponseWriter, r *http.Request, _ *n8nCall) {
		n8nStreamHead(w)
		_, _ = w.Write([]byte(n8nLine("begin", "") + n8nLine("item", first)))
		fakeFlush(w)
		select {
		case <-r.Context().Done():
		case <-e.fake.Quit():
		case <-time.After(2 * time.Minute):
		}
	})

	// The sessions, through the module.
	tokens, ids := make([]string, streams), make([]string, streams)
	var next atomic.Int32
	var wg sync.WaitGroup
	var createErr atomic.Value
	for range 8 {
		wg.Go(func() {
			for i := int(next.Add(1)) - 1; i < streams; i = int(next.Add(1)) - 1 {
				rec := serveRecorded(e.cp, req{method: "POST", path: "/api/v1/session/create", body: `{"page_url":"https://shop.example.com/p/1"}`,
					headers: map[string]string{"Origin": allowedOrigin, "User-Agent": chatUA}})
				var c created
				if err := json.Unmarshal(rec.Body.Bytes(), &c); rec.Code != http.StatusCreated || err != nil {
					createErr.Store(fmt.Sprintf("create %d: %d %s", i, rec.Code, rec.Body))
					return
				}
				tokens[i], ids[i] = c.Token, c.SessionID
			}
		})
	}
	wg.Wait()
	if v := createErr.Load(); v != nil {
		t.Fatal(v)
	}

	// A client that opens one connection per stream and remembers them.
	var connsMu sync.Mutex
	var conns []*net.TCPConn
	dialer := &net.Dialer{Timeout: 10 * time.Second}
	tr := &http.Transport{
		DialContext: func(ctx context.Context, network, addr string) (net.Conn, error) {
			c, err := dialer.DialContext(ctx, network, addr)
			if err == nil {
				connsMu.Lock()
				conns = append(conns, c.(*net.TCPConn))
				connsMu.Unlock()
			}
			return c, err
		},
		DisableKeepAlives:   true,
		DisableCompression:  true,
		MaxIdleConnsPerHost: streams,
	}
	client := &http.Client{Transport: tr}
	t.Cleanup(tr.CloseIdleConnections)

	runtime.GC()
	before := e.drillFigures(true)

	start := time.Now()
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	resps, errs := make([]*http.Response, streams), make([]error, streams)
	for i := range streams {
		wg.Go(func() {
			r, err := http.NewRequestWithContext(ctx, "POST", e.srv.URL+"/api/v1/chat/message",
				strings.NewReader(fmt.Sprintf(`{"message":"Drill message number %d"}`, i)))
			if err != nil {
				errs[i] = err
				return
			}
			r.Header.Set("Content-Type", "application/json")
			r.Header.Set("User-Agent", chatUA)
			r.Header.Set("Authorization", "Bearer "+tokens[i])
			resps[i], errs[i] = client.Do(r)
		})
	}
	wg.Wait()
	t.Cleanup(func() {
		for _, r := range resps {
			if r != nil {
				_ = r.Body.Close()
			}
		}
	})
	for i := range streams {
		if errs[i] != nil {
			t.Fatalf("stream %d: %v", i, errs[i])
		}
		if resps[i].StatusCode != http.StatusOK {
			t.Fatalf("stream %d: status %d", i, resps[i].StatusCode)
		}
	}
	// Every client has its first chunk.
	for i, resp := range resps {
		if got := itemOf(t, nextSSE(t, afterBegin(t, resp.Body))); got != first {
			t.Fatalf("stream %d: first event %q", i, got)
		}
	}
	opened := time.Since(start)
	during := e.drillFigures(true)
	if during.inflight != streams || during.upActive != streams || during.upConns < streams {
		t.Fatalf("with every stream open: %v; want %d of each", during, streams)
	}
	connsMu.Lock()
	cs := conns
	connsMu.Unlock()
	if len(cs) != streams {
		t.Fatalf("%d client connections for %d streams", len(cs), streams)
	}

	// Everyone leaves at once: even ones reset the connection, odd ones
	// close it.
	left := time.Now()
	for i, c := range cs {
		if i%2 == 0 {
			_ = c.SetLinger(0)
		}
		_ = c.Close()
	}
	for _, r := range resps {
		_ = r.Body.Close()
	}

	const margin, oursMargin = 50, 10
	var after drillFigures
	for deadline := time.Now().Add(20 * time.Second); ; time.Sleep(20 * time.Millisecond) {
		after = e.drillFigures(false)
		settled := after.inflight == 0 && after.upActive == 0 && after.upConns <= before.upConns &&
			after.acquired <= 0 && after.goroutines <= before.goroutines+margin
		if settled {
			after.goroutines, after.ours, _ = drillGoroutines()
			if after.goroutines <= before.goroutines+margin && after.ours <= before.ours+oursMargin {
				break
			}
		}
		if time.Now().After(deadline) {
			var dump string
			after.goroutines, after.ours, dump = drillGoroutines()
			t.Logf("goroutines left:\n%.20000s", dump)
			t.Fatalf("20 s after %d clients left: %v; before: %v", streams, after, before)
		}
	}
	settle := time.Since(left)

	canceled := 0
	for _, c := range e.fake.Calls() {
		if c.WasCanceled() {
			canceled++
		}
	}
	if canceled != streams || e.fake.Hits() != streams {
		t.Fatalf("n8n saw %d of %d requests abandoned (%d hits)", canceled, streams, e.fake.Hits())
	}

	// Every reply is stored, partial, with the text relayed.
	driver, dsn := storeDSN(e.cp)
	st := storedState(t, driver, dsn)
	if len(st) != streams {
		t.Fatalf("%d sessions stored, want %d", len(st), streams)
	}
	statuses := map[string]int{}
	for i, id := range ids {
		s := st[id]
		if s == nil || len(s.Msgs) != 2 {
			t.Fatalf("session %d: %+v", i, s)
		}
		u, a := s.Msgs[0], s.Msgs[1]
		if u != (drillRow{"user", "complete", fmt.Sprintf("Drill message number %d", i)}) {
			t.Fatalf("session %d: user message %+v", i, u)
		}
		statuses[a.Status]++
		if a != (drillRow{"assistant", "partial", first}) {
			t.Errorf("session %d: assistant reply %+v, want %q partial", i, a, first)
		}
	}
	t.Logf("%s: %d streams open in %v, all %d left; settled %v later; stored replies by status %v",
		kind, streams, opened.Round(time.Millisecond), streams, settle.Round(time.Millisecond), statuses)
	t.Logf("%s: before  %v", kind, before)
	t.Logf("%s: during  %v", kind, during)
	t.Logf("%s: after   %v", kind, after)
}
