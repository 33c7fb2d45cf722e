package handler_test

import (
	"bufio"
	"context"
	"crypto/rand"
	"encoding/json"
	"fmt"
	"net/http"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/redis/go-redis/v9"

	"github.com/chatproxy/caddy-chatproxy/guard"
	"github.com/chatproxy/caddy-chatproxy/internal/testenv"
	"github.com/chatproxy/caddy-chatproxy/internal/testkit"
	"github.com/chatproxy/caddy-chatproxy/replies"
	"github.com/chatproxy/caddy-chatproxy/sessions"
)

// sseEv is one event of a reply stream as a test compares it.
type sseEv struct {
	id   uint64 // 0: [DONE]
	kind string // begin, item, error, end, [DONE]
	text string // an item's content, an error's code
}

func (v sseEv) String() string { return fmt.Sprintf("%d:%s:%s", v.id, v.kind, v.text) }

// readEvent reads one event of a reply stream.
func readEvent(t *testing.T, br *bufio.Reader) sseEv {
	t.Helper()
	ev := nextSSE(t, br)
	if len(ev.Data) == 1 && ev.Data[0] == "[DONE]" {
		if ev.HasID {
			t.Fatalf("[DONE] with an id: %+v", ev)
		}
		return sseEv{kind: "[DONE]"}
	}
	id, err := strconv.ParseUint(ev.ID, 10, 64)
	if err != nil || !ev.HasID {
		t.Fatalf("event without a numeric id: %+v", ev)
	}
	j := eventJSON(t, ev)
	out := sseEv{id: id, kind: j.Type, text: j.Content}
	if j.Type == "error" {
		out.text = j.Error
	}
	return out
}

// readRest reads events up to and including [DONE].
func readRest(t *testing.T, br *bufio.Reader) []sseEv {
	t.Helper()
	var out []sseEv
	for {
		ev := readEvent(t, br)
		out = append(out, ev)
		if ev.kind == "[DONE]" {
			return out
		}
	}
}

// wantEvents compares two event lists.
func wantEvents(t *testing.T, what string, got, want []sseEv) {
	t.Helper()
	if fmt.Sprint(got) != fmt.Sprint(want) {
		t.Fatalf("%s:\n got %v\nwant %v", what, got, want)
	}
}

// after is the part of a whole stream (begin … end, [DONE]) a resume
// after id must give: the events with greater ids, then [DONE].
func after(all []sseEv, id uint64) []sseEv {
	var out []sseEv
	for _, ev := range all {
		if ev.id > id || ev.kind == "[DONE]" {
			out = append(out, ev)
		}
	}
	return out
}

// resume opens GET /chat/stream/{id} on e with the bearer token and extra
// headers, returning the response.
func (e *chatEnv) resume(t *testing.T, ctx context.Context, token, id, query string, kv ...string) *http.Response {
	t.Helper()
	return e.doCtx(t, ctx, "GET", "/api/v1/chat/stream/"+id+query, "", authz(token, kv...))
}

// startGated sends a message on e whose reply the gate paces, reads begin
// and the first item, and returns the reply's id and the stream.
func (e *chatEnv) startGated(t *testing.T, ctx context.Context, token string, gate *testkit.StreamGate, items ...string) (string, *bufio.Reader, *http.Response) {
	t.Helper()
	e.fake.SetScript(e.fake.Gated(gate, false, items...))
	resp := e.doCtx(t, ctx, "POST", "/api/v1/chat/stream", `{"message":"Tell me"}`, authz(token))
	if resp.StatusCode != http.StatusOK {
		t.Fatalf("chat: %d", resp.StatusCode)
	}
	br := bufio.NewReader(resp.Body)
	id := wantBegin(t, br)
	if got := readEvent(t, br); got.String() != (sseEv{2, "item", items[0]}).String() {
		t.Fatalf("first item %v", got)
	}
	return id, br, resp
}

// redisHubs returns n hubs on the test Redis under one fresh key prefix,
// as n instances configured with the same redis would have.
func redisHubs(t *testing.T, n int) (*redis.Client, []*replies.Hub) {
	t.Helper()
	opts, err := guard.RedisOptions(testenv.RedisURL(t))
	if err != nil {
		t.Fatal(err)
	}
	rdb := redis.NewClient(opts)
	t.Cleanup(func() { _ = rdb.Close() })
	prefix := "chatproxy-test:" + rand.Text() + ":"
	hubs := make([]*replies.Hub, n)
	for i := range hubs {
		hubs[i] = replies.NewHub(replies.Config{Redis: rdb, Prefix: prefix})
		t.Cleanup(hubs[i].Close)
	}
	return rdb, hubs
}

// secondInstance is another handler on e's store (and the given hub), as
// a second Caddy instance behind the same load balancer.
func secondInstance(t *testing.T, e *chatEnv, hub *replies.Hub) *chatEnv {
	t.Helper()
	return newChatEnv(t, chatEnvOpts{mutate: func(c *envConfig) {
		c.Store = e.store
		c.Upstream.WebhookURL = e.fake.URL() // the same block: tokens are accepted
		c.Replies = hub
	}})
}

// A resumed stream gives exactly the events after the id it names, live
// while the reply is produced and then from the store, with the ids the
// first stream gave them: never a duplicate, never a gap. The visitor
// leaving mid-reply does not stop it while a resumed stream follows it.
func TestResumeSameInstance(t *testing.T) {
	for _, kind := range storeKinds {
		t.Run(kind, func(t *testing.T) {
			e := newChatEnv(t, chatEnvOpts{kind: kind, mutate: func(c *envConfig) { c.DetachedTimeout = 10 * time.Second }})
			s := e.newSession(t)
			gate := testkit.NewStreamGate()
			first, cancelFirst := context.WithCancel(context.Background())
			defer cancelFirst()
			id, _, _ := e.startGated(t, first, s.Token, gate, "One ", "two ", "three.")

			// Resumed with Last-Event-ID while the first stream is open.
			ctx, cancel := context.WithTimeout(context.Background(), 15*time.Second)
			defer cancel()
			resp := e.resume(t, ctx, s.Token, id, "", "Last-Event-ID", "2")
			if resp.StatusCode != http.StatusOK || resp.Header.Get("X-Message-ID") != id ||
				resp.Header.Get("Content-Type") != "text/event-stream" {
				t.Fatalf("resume: %d %v", resp.StatusCode, resp.Header)
			}
			br := bufio.NewReader(resp.Body)
			// The visitor reloads: the first stream goes, the reply goes on.
			cancelFirst()
			gate.Next(t)
			if got := readEvent(t, br); got.String() != (sseEv{3, "item", "two "}).String() {
				t.Fatalf("resumed stream's first event %v, want item 3", got)
			}
			gate.Next(t)
			gate.Next(t)
			rest := readRest(t, br)
			wantEvents(t, "rest of the resumed stream", rest, []sseEv{{4, "item", "three."}, {5, "end", ""}, {0, "[DONE]", ""}})
			e.waitIdle(t)
			if e.fake.Last(t).WasCanceled() {
				t.Fatal("n8n's request was cancelled though a resumed stream followed the reply")
			}
			wantExchange(t, e.history(t, s.Token), "Tell me", "One two three.", "complete")

			// From the store: every resume point gives exactly its tail.
			all := []sseEv{{1, "begin", ""}, {2, "item", "One "}, {3, "item", "two "}, {4, "item", "three."}, {5, "end", ""}, {0, "[DONE]", ""}}
			for n := uint64(0); n <= 5; n++ {
				resp := e.resume(t, ctx, s.Token, id, "?after="+strconv.FormatUint(n, 10))
				if resp.StatusCode != http.StatusOK {
					t.Fatalf("after=%d: %d", n, resp.StatusCode)
				}
				wantEvents(t, fmt.Sprintf("stored reply after %d", n), readRest(t, bufio.NewReader(resp.Body)), after(all, n))
			}
			// Last-Event-ID wins over a stale after= (EventSource reconnects
			// to the URL it was given).
			resp = e.resume(t, ctx, s.Token, id, "?after=1", "Last-Event-ID", "4")
			wantEvents(t, "Last-Event-ID over after=", readRest(t, bufio.NewReader(resp.Body)), after(all, 4))
		})
	}
}

// The live part too: a resume from every id while the reply is produced
// gives that id's tail, the same as the stored reply gives later.
func TestResumeLiveFromEveryID(t *testing.T) {
	e := newChatEnv(t, chatEnvOpts{mutate: func(c *envConfig) { c.DetachedTimeout = 10 * time.Second }})
	s := e.newSession(t)
	gate := testkit.NewStreamGate()
	ctx, cancel := context.WithTimeout(context.Background(), 15*time.Second)
	defer cancel()
	id, first, _ := e.startGated(t, ctx, s.Token, gate, "a", "b", "c")
	var streams []*bufio.Reader
	for n := range 3 { // 0, 1, 2: all the client can have seen so far
		resp := e.resume(t, ctx, s.Token, id, "?after="+strconv.Itoa(n))
		if resp.StatusCode != http.StatusOK {
			t.Fatalf("after=%d: %d", n, resp.StatusCode)
		}
		streams = append(streams, bufio.NewReader(resp.Body))
	}
	gate.Next(t)
	gate.Next(t)
	gate.Next(t)
	all := append([]sseEv{{1, "begin", ""}, {2, "item", "a"}}, readRest(t, first)...)
	wantEvents(t, "first stream", all, []sseEv{{1, "begin", ""}, {2, "item", "a"}, {3, "item", "b"}, {4, "item", "c"}, {5, "end", ""}, {0, "[DONE]", ""}})
	for n, br := range streams {
		wantEvents(t, fmt.Sprintf("live resume after %d", n), readRest(t, br), after(all, uint64(n)))
	}
}

// On a second instance sharing Redis and the store: the live events come
// through Redis, then the stored ones; the tails are exact.
func TestResumeSecondInstance(t *testing.T) {
	_, hubs := redisHubs(t, 2)
	for _, kind := range storeKinds {
		t.Run(kind, func(t *testing.T) {
			const detached = 400 * time.Millisecond
			a := newChatEnv(t, chatEnvOpts{kind: kind, mutate: func(c *envConfig) {
				c.Replies = hubs[0]
				c.DetachedTimeout = detached
			}})
			b := secondInstance(t, a, hubs[1])
			s := a.newSession(t)
			gate := testkit.NewStreamGate()
			ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
			defer cancel()
			firstCtx, leave := context.WithCancel(ctx)
			id, _, _ := a.startGated(t, firstCtx, s.Token, gate, "Red", "is", "shared")
			// The page, reloaded, reaches b (the old page's request to a
			// goes away just after).
			resp := b.resume(t, ctx, s.Token, id, "", "Last-Event-ID", "2")
			if resp.StatusCode != http.StatusOK {
				t.Fatalf("resume on b: %d", resp.StatusCode)
			}
			br := bufio.NewReader(resp.Body)
			gate.Next(t)
			if got := readEvent(t, br); got.String() != (sseEv{3, "item", "is"}).String() {
				t.Fatalf("b's first event %v", got)
			}
			leave()
			// b's open stream keeps the reply going past a's detached
			// timeout (a has no client of its own; b's watch key says b has).
			time.Sleep(3 * detached)
			if a.fake.Last(t).WasCanceled() {
				t.Fatal("the reply was stopped while b followed it")
			}
			gate.Next(t)
			gate.Next(t)
			wantEvents(t, "b's live tail", readRest(t, br), []sseEv{{4, "item", "shared"}, {5, "end", ""}, {0, "[DONE]", ""}})
			a.waitIdle(t)
			if a.fake.Last(t).WasCanceled() {
				t.Fatal("the reply was cancelled while b followed it")
			}
			wantExchange(t, b.history(t, s.Token), "Tell me", "Redisshared", "complete")
			all := []sseEv{{1, "begin", ""}, {2, "item", "Red"}, {3, "item", "is"}, {4, "item", "shared"}, {5, "end", ""}, {0, "[DONE]", ""}}
			for n := uint64(0); n <= 5; n++ {
				resp := b.resume(t, ctx, s.Token, id, "?after="+strconv.FormatUint(n, 10))
				wantEvents(t, fmt.Sprintf("b, stored, after %d", n), readRest(t, bufio.NewReader(resp.Body)), after(all, n))
			}
		})
	}
}

// Without Redis a second instance cannot follow the reply live: its
// resumed stream waits and gives the tail from the store once stored.
func TestResumeSecondInstanceWithoutRedis(t *testing.T) {
	a := newChatEnv(t, chatEnvOpts{mutate: func(c *envConfig) { c.DetachedTimeout = 10 * time.Second }})
	b := secondInstance(t, a, replies.NewHub(replies.Config{}))
	s := a.newSession(t)
	gate := testkit.NewStreamGate()
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	defer cancel()
	id, first, _ := a.startGated(t, ctx, s.Token, gate, "x", "y")
	resp := b.resume(t, ctx, s.Token, id, "?after=2")
	if resp.StatusCode != http.StatusOK {
		t.Fatalf("resume on b: %d", resp.StatusCode)
	}
	gate.Next(t)
	gate.Next(t)
	readRest(t, first)
	wantEvents(t, "b's tail, from the store", readRest(t, bufio.NewReader(resp.Body)), []sseEv{{3, "item", "y"}, {4, "end", ""}, {0, "[DONE]", ""}})
}

// A stop on another instance stops the reply where it runs: n8n's request
// is cancelled, the visitor's stream ends with end and [DONE] (no error),
// the reply is stored partial, and the stop answers with that status.
func TestStopSecondInstance(t *testing.T) {
	_, hubs := redisHubs(t, 2)
	for _, kind := range storeKinds {
		t.Run(kind, func(t *testing.T) {
			a := newChatEnv(t, chatEnvOpts{kind: kind, mutate: func(c *envConfig) { c.Replies = hubs[0] }})
			b := secondInstance(t, a, hubs[1])
			s := a.newSession(t)
			gate := testkit.NewStreamGate()
			ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
			defer cancel()
			id, br, _ := a.startGated(t, ctx, s.Token, gate, "Half an ", "answer")
			rec := b.serve(t, "POST", "/api/v1/chat/stop/"+id, "", authz(s.Token))
			if rec.Code != http.StatusOK {
				t.Fatalf("stop: %d %s", rec.Code, rec.Body)
			}
			if got := decode[map[string]string](t, rec); got["message_id"] != id || got["status"] != "partial" {
				t.Fatalf("stop answered %v", got)
			}
			testkit.AwaitSignal(t, a.fake.Last(t).Canceled(), "n8n to see its request cancelled")
			wantEvents(t, "the stopped stream", readRest(t, br), []sseEv{{3, "end", ""}, {0, "[DONE]", ""}})
			a.waitIdle(t)
			wantExchange(t, a.history(t, s.Token), "Tell me", "Half an ", "partial")
			// Stopping it again: it has ended.
			rec = b.serve(t, "POST", "/api/v1/chat/stop/"+id, "", authz(s.Token))
			wantError(t, rec, http.StatusConflict, "not_streaming")
			// Its resumed stream ends as it did.
			resp := b.resume(t, ctx, s.Token, id, "?after=1")
			wantEvents(t, "the stopped reply, stored", readRest(t, bufio.NewReader(resp.Body)),
				[]sseEv{{2, "item", "Half an "}, {3, "end", ""}, {0, "[DONE]", ""}})
		})
	}
}

// Stop on the same instance, without Redis.
func TestStopSameInstance(t *testing.T) {
	e := newChatEnv(t, chatEnvOpts{})
	s := e.newSession(t)
	gate := testkit.NewStreamGate()
	ctx, cancel := context.WithTimeout(context.Background(), 15*time.Second)
	defer cancel()
	id, br, _ := e.startGated(t, ctx, s.Token, gate, "Stop ", "me")
	rec := e.serve(t, "POST", "/api/v1/chat/stop/"+id, "", authz(s.Token))
	if rec.Code != http.StatusOK || decode[map[string]string](t, rec)["status"] != "partial" {
		t.Fatalf("stop: %d %s", rec.Code, rec.Body)
	}
	wantEvents(t, "the stopped stream", readRest(t, br), []sseEv{{3, "end", ""}, {0, "[DONE]", ""}})
	testkit.AwaitSignal(t, e.fake.Last(t).Canceled(), "n8n to see its request cancelled")
}

// With no client following it for detached_timeout, a reply is stopped
// and stored partial; while one follows, it goes on.
func TestDetachedTimeoutStopsReply(t *testing.T) {
	for _, kind := range storeKinds {
		t.Run(kind, func(t *testing.T) {
			e := newChatEnv(t, chatEnvOpts{kind: kind, mutate: func(c *envConfig) { c.DetachedTimeout = 300 * time.Millisecond }})
			s := e.newSession(t)
			gate := testkit.NewStreamGate()
			ctx, leave := context.WithCancel(context.Background())
			defer leave()
			start := time.Now()
			e.startGated(t, ctx, s.Token, gate, "Nobody ", "reads this")
			leave()
			testkit.AwaitSignal(t, e.fake.Last(t).Canceled(), "n8n to see its request cancelled")
			if d := time.Since(start); d < 300*time.Millisecond {
				t.Fatalf("cancelled after %v, before the detached timeout", d)
			}
			e.waitIdle(t)
			wantExchange(t, e.history(t, s.Token), "Tell me", "Nobody ", "partial")
		})
	}
}

// With on_client_disconnect finish, a reply nobody follows is read to its
// end, whatever detached_timeout says.
func TestDetachedTimeoutFinishMode(t *testing.T) {
	e := newChatEnv(t, chatEnvOpts{mutate: func(c *envConfig) {
		c.DetachedTimeout = 100 * time.Millisecond
		c.FinishOnDisconnect = true
	}})
	s := e.newSession(t)
	gate := testkit.NewStreamGate()
	ctx, leave := context.WithCancel(context.Background())
	defer leave()
	e.startGated(t, ctx, s.Token, gate, "Read ", "to the end")
	leave()
	time.Sleep(300 * time.Millisecond) // past the detached timeout
	gate.Next(t)
	gate.Next(t)
	testkit.AwaitSignal(t, e.fake.Last(t).Finished(), "n8n to finish its reply")
	e.waitIdle(t)
	deadline := time.Now().Add(5 * time.Second)
	for e.history(t, s.Token).Messages[1].Status == "streaming" && time.Now().Before(deadline) {
		time.Sleep(10 * time.Millisecond)
	}
	wantExchange(t, e.history(t, s.Token), "Tell me", "Read to the end", "complete")
}

// The history shows a reply being produced as streaming.
func TestHistoryShowsStreaming(t *testing.T) {
	for _, kind := range storeKinds {
		t.Run(kind, func(t *testing.T) {
			e := newChatEnv(t, chatEnvOpts{kind: kind})
			s := e.newSession(t)
			gate := testkit.NewStreamGate()
			ctx, cancel := context.WithTimeout(context.Background(), 15*time.Second)
			defer cancel()
			id, br, _ := e.startGated(t, ctx, s.Token, gate, "Still ", "going")
			h := e.history(t, s.Token)
			if len(h.Messages) != 2 || h.Messages[1].ID != id || h.Messages[1].Status != "streaming" || h.Messages[1].Role != "assistant" {
				t.Fatalf("history while the reply runs: %+v", h.Messages)
			}
			gate.Next(t)
			gate.Next(t)
			readRest(t, br)
			e.waitIdle(t)
			wantExchange(t, e.history(t, s.Token), "Tell me", "Still going", "complete")
		})
	}
}

// Bad requests to the resume and stop routes: the right status, and
// nothing stopped.
func TestResumeAndStopRefusals(t *testing.T) {
	e := newChatEnv(t, chatEnvOpts{})
	s := e.newSession(t)
	other := e.newSession(t)
	e.fake.SetScript(testkit.Stream("Done."))
	rec := e.serve(t, "POST", "/api/v1/chat/stream", `{"message":"Hi"}`, authz(s.Token))
	events := testkit.ParseSSE(rec.Body.String())
	id := eventJSON(t, events[0]).MessageID
	e.waitIdle(t)
	userID := e.history(t, s.Token).Messages[0].ID
	for _, tc := range []struct {
		name, method, path string
		headers            map[string]string
		status             int
		code               string
	}{
		{"no token", "GET", "/chat/stream/" + id, nil, 401, "unauthorized"},
		{"unknown id", "GET", "/chat/stream/0193aaaa-0000-7000-8000-000000000000", authz(s.Token), 404, "not_found"},
		{"another visitor's reply", "GET", "/chat/stream/" + id, authz(other.Token), 404, "not_found"},
		{"a user message", "GET", "/chat/stream/" + userID, authz(s.Token), 404, "not_found"},
		{"after not a number", "GET", "/chat/stream/" + id + "?after=abc", authz(s.Token), 400, "invalid_request"},
		{"after negative", "GET", "/chat/stream/" + id + "?after=-1", authz(s.Token), 400, "invalid_request"},
		{"after empty", "GET", "/chat/stream/" + id + "?after=", authz(s.Token), 400, "invalid_request"},
		{"after with a sign", "GET", "/chat/stream/" + id + "?after=%2B1", authz(s.Token), 400, "invalid_request"},
		{"after too large", "GET", "/chat/stream/" + id + "?after=99999999999999999999", authz(s.Token), 400, "invalid_request"},
		{"after beyond the end", "GET", "/chat/stream/" + id + "?after=4", authz(s.Token), 400, "invalid_request"},
		{"bad Last-Event-ID", "GET", "/chat/stream/" + id, authz(s.Token, "Last-Event-ID", "1 2"), 400, "invalid_request"},
		{"stop: no token", "POST", "/chat/stop/" + id, nil, 401, "unauthorized"},
		{"stop: another visitor's reply", "POST", "/chat/stop/" + id, authz(other.Token), 404, "not_found"},
		{"stop: unknown id", "POST", "/chat/stop/nope", authz(s.Token), 404, "not_found"},
		{"stop: finished reply", "POST", "/chat/stop/" + id, authz(s.Token), 409, "not_streaming"},
		{"stop: cookie without browser evidence", "POST", "/chat/stop/" + id, map[string]string{"Cookie": "chat_session=" + s.Token}, 403, ""},
		{"stop: GET", "GET", "/chat/stop/" + id, authz(s.Token), 405, "method_not_allowed"},
		{"resume: POST", "POST", "/chat/stream/" + id, authz(s.Token), 405, "method_not_allowed"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			rec := e.serve(t, tc.method, "/api/v1"+tc.path, "", tc.headers)
			if tc.code == "" {
				if rec.Code != tc.status {
					t.Fatalf("status %d, want %d: %s", rec.Code, tc.status, rec.Body)
				}
				return
			}
			wantError(t, rec, tc.status, tc.code)
		})
	}
	// A cookie from the site's own page may resume.
	rec = e.serve(t, "GET", "/api/v1/chat/stream/"+id+"?after=3", "",
		map[string]string{"Cookie": "chat_session=" + s.Token, "Origin": allowedOrigin})
	if rec.Code != 200 || !strings.HasSuffix(rec.Body.String(), "data: [DONE]\n\n") || strings.Contains(rec.Body.String(), "id:") {
		t.Fatalf("resume after the end event: %d %q", rec.Code, rec.Body)
	}
}

// A reply still streaming long after its instance could have produced it
// (the instance went away) is stored as an error when found, and its
// resumed stream ends instead of waiting.
func TestResumeLostReply(t *testing.T) {
	e := newChatEnv(t, chatEnvOpts{})
	s := e.newSession(t)
	e.fake.SetScript(testkit.Stream("x"))
	rec := e.serve(t, "POST", "/api/v1/chat/stream", `{"message":"Hi"}`, authz(s.Token))
	if rec.Code != 200 {
		t.Fatal(rec.Code)
	}
	e.waitIdle(t)
	// A lost reply: its row as an instance that died left it.
	_, err := e.store.AppendExchange(t.Context(), &sessions.Message{SessionID: s.SessionID, Content: "Anyone?"},
		&sessions.Message{CreatedAt: time.Now().Add(-2 * time.Hour)}, "visitor")
	if err != nil {
		t.Fatal(err)
	}
	h := e.history(t, s.Token)
	lost := h.Messages[len(h.Messages)-1]
	if lost.Status != "error" || lost.Role != "assistant" {
		t.Fatalf("lost reply in the history: %+v", lost)
	}
	resp := e.resume(t, t.Context(), s.Token, lost.ID, "")
	got := readRest(t, bufio.NewReader(resp.Body))
	wantEvents(t, "a lost reply", got, []sseEv{{1, "begin", ""}, {2, "error", "reply_lost"}, {3, "end", ""}, {0, "[DONE]", ""}})
}

// A reply requested as JSON is stored streaming too, so it can be found in
// the history and stopped: the JSON answer is what arrived (all of n8n's
// first chunk, or nothing when the stop came before the proxy read it),
// and exactly that is stored, as partial.
func TestStopJSONReply(t *testing.T) {
	e := newChatEnv(t, chatEnvOpts{})
	s := e.newSession(t)
	e.fake.SetScript(e.fake.Then("What arrived", e.fake.Quit(), func(http.ResponseWriter, *http.Request) {}))
	type answer struct {
		status int
		body   map[string]string
		err    error
	}
	done := make(chan answer, 1)
	go func() {
		req, _ := http.NewRequest("POST", e.srv.URL+"/api/v1/chat/message", strings.NewReader(`{"message":"Answer in JSON"}`))
		req.Header.Set("Content-Type", "application/json")
		req.Header.Set("Accept", "application/json")
		req.Header.Set("User-Agent", chatUA)
		req.Header.Set("Authorization", "Bearer "+s.Token)
		resp, err := e.client.Do(req)
		if err != nil {
			done <- answer{err: err}
			return
		}
		defer resp.Body.Close()
		var body map[string]string
		err = json.NewDecoder(resp.Body).Decode(&body)
		done <- answer{status: resp.StatusCode, body: body, err: err}
	}()
	var id string
	deadline := time.Now().Add(10 * time.Second)
	for id == "" {
		if time.Now().After(deadline) {
			t.Fatal("the reply never showed as streaming in the history")
		}
		h := e.history(t, s.Token)
		if n := len(h.Messages); n == 2 && h.Messages[1].Status == "streaming" && e.fake.Hits() == 1 {
			id = h.Messages[1].ID
		} else {
			time.Sleep(10 * time.Millisecond)
		}
	}
	// n8n has sent its first chunk (Then writes it at once); stop.
	rec := e.serve(t, "POST", "/api/v1/chat/stop/"+id, "", authz(s.Token))
	if rec.Code != http.StatusOK || decode[map[string]string](t, rec)["status"] != "partial" {
		t.Fatalf("stop: %d %s", rec.Code, rec.Body)
	}
	var got string
	select {
	case a := <-done:
		got = a.body["response"]
		if a.err != nil || a.status != 200 || got != "What arrived" && got != "" || a.body["message_id"] != id {
			t.Fatalf("JSON answer: %d %v %v", a.status, a.body, a.err)
		}
	case <-time.After(10 * time.Second):
		t.Fatal("the JSON answer did not come after the stop")
	}
	e.waitIdle(t)
	wantExchange(t, e.history(t, s.Token), "Answer in JSON", got, "partial")
}
