package handler_test

import (
	"bufio"
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"mime/multipart"
	"net/http"
	"net/http/httptest"
	"net/textproto"
	"net/url"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/caddyserver/caddy/v2"
	"github.com/caddyserver/caddy/v2/modules/caddyhttp"

	"github.com/chatproxy/caddy-chatproxy/handler"
	"github.com/chatproxy/caddy-chatproxy/internal/testenv"
	"github.com/chatproxy/caddy-chatproxy/internal/testkit"
	"github.com/chatproxy/caddy-chatproxy/n8n"
	"github.com/chatproxy/caddy-chatproxy/sessions"
	"github.com/chatproxy/caddy-chatproxy/upload"
)

// socketAPIEnv is the chat API in front of the stand-in n8n in "Using
// Response Nodes" mode: one or more handlers (instances) sharing one
// store, each behind a live HTTP server.
type socketAPIEnv struct {
	n8n      *testkit.N8nChat
	store    sessions.Store
	handlers []*handler.Handler
	drains   []*handler.Drain
	srvs     []*httptest.Server
	client   *http.Client
}

// fastChat is the stand-in's timing, shortened: heartbeats every 100 ms,
// polls every 40 ms.
func fastChat(steps ...testkit.ChatStep) testkit.N8nChatOptions {
	return testkit.N8nChatOptions{Workflow: steps, HeartbeatInterval: 100 * time.Millisecond, PollInterval: 40 * time.Millisecond}
}

// newSocketAPIEnv starts n8n (opts), then instances handlers on a store of
// kind; webhookBase sets the stand-in's WEBHOOK_URL to the first
// instance's origin. mutate adjusts each handler's configuration.
func newSocketAPIEnv(t *testing.T, kind string, instances int, opts testkit.N8nChatOptions, webhookBase bool, mutate func(*envConfig)) *socketAPIEnv {
	t.Helper()
	e := &socketAPIEnv{client: &http.Client{Transport: &http.Transport{DisableCompression: true}}}
	t.Cleanup(e.client.CloseIdleConnections)
	// The servers exist before the handlers, so the stand-in can make
	// its links on the first one's origin.
	var hs = make([]*handler.Handler, instances)
	for i := range instances {
		srv := httptest.NewUnstartedServer(nil)
		i := i
		srv.Config.Handler = http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
			r = caddyhttp.PrepareRequest(r, caddy.NewReplacer(), w, nil)
			caddyhttp.SetVar(r.Context(), caddyhttp.ClientIPVarKey, chatClientIP)
			next := caddyhttp.HandlerFunc(func(w http.ResponseWriter, _ *http.Request) error {
				w.WriteHeader(passedOn)
				return nil
			})
			if err := hs[i].ServeHTTP(w, r, next); err != nil {
				t.Errorf("ServeHTTP %s %s returned %v", r.Method, r.URL.Path, err)
			}
		})
		srv.Start()
		t.Cleanup(srv.Close)
		e.srvs = append(e.srvs, srv)
	}
	if webhookBase {
		opts.WebhookBase = e.srvs[0].URL + "/"
	}
	e.n8n = testkit.NewN8nChat(t, opts)
	database, sqlitePath := kind, ""
	switch kind {
	case "postgres":
		database = testenv.PostgresURL(t)
	default:
		sqlitePath = filepath.Join(t.TempDir(), "chat.db")
	}
	for i := range instances {
		c := defaultEnvConfig(e.n8n.WebhookURL())
		c.Upstream.Auth = n8n.Auth{Mode: n8n.AuthNone}
		c.Database, c.SQLitePath = database, sqlitePath
		c.Drain = handler.NewDrain()
		if mutate != nil {
			mutate(&c)
		}
		hs[i], e.store = newHandler(t, c)
		e.drains = append(e.drains, c.Drain)
	}
	e.handlers = hs
	return e
}

// message posts a chat message to instance i and returns the response.
func (e *socketAPIEnv) message(t *testing.T, i int, token, text string) *http.Response {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	t.Cleanup(cancel)
	body, _ := json.Marshal(map[string]string{"message": text})
	r, _ := http.NewRequestWithContext(ctx, "POST", e.srvs[i].URL+"/api/v1/chat/message", strings.NewReader(string(body)))
	r.Header.Set("Content-Type", "application/json")
	r.Header.Set("User-Agent", chatUA)
	r.Header.Set("Authorization", "Bearer "+token)
	resp, err := e.client.Do(r)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = resp.Body.Close() })
	return resp
}

// messageWithFile posts a multipart chat message with one file to
// instance i.
func (e *socketAPIEnv) messageWithFile(t *testing.T, i int, token, text, name, ctype string, data []byte) *http.Response {
	t.Helper()
	var body bytes.Buffer
	mw := multipart.NewWriter(&body)
	_ = mw.WriteField("message", text)
	hdr := textproto.MIMEHeader{}
	hdr.Set("Content-Disposition", fmt.Sprintf(`form-data; name="files"; filename=%q`, name))
	hdr.Set("Content-Type", ctype)
	part, _ := mw.CreatePart(hdr)
	_, _ = part.Write(data)
	_ = mw.Close()
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	t.Cleanup(cancel)
	r, _ := http.NewRequestWithContext(ctx, "POST", e.srvs[i].URL+"/api/v1/chat/message", &body)
	r.Header.Set("Content-Type", mw.FormDataContentType())
	r.Header.Set("User-Agent", chatUA)
	r.Header.Set("Authorization", "Bearer "+token)
	resp, err := e.client.Do(r)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = resp.Body.Close() })
	return resp
}

// sseEvent is an event of a stream with several replies.
type sseEvent struct {
	Type           string           `json:"type"`
	MessageID      string           `json:"message_id"`
	Content        string           `json:"content"`
	Error          string           `json:"error"`
	Message        string           `json:"message"`
	Buttons        []n8n.ChatButton `json:"buttons"`
	BlockUserInput bool             `json:"block_user_input"`
	done           bool             // data: [DONE]
}

func readSocketEvent(t *testing.T, br *bufio.Reader) sseEvent {
	t.Helper()
	ev := nextSSE(t, br)
	if len(ev.Data) != 1 {
		t.Fatalf("event has %d data lines: %+v", len(ev.Data), ev)
	}
	if ev.Data[0] == "[DONE]" {
		return sseEvent{done: true}
	}
	if !ev.HasID {
		t.Fatalf("event without id: %+v", ev)
	}
	var v sseEvent
	dec := json.NewDecoder(strings.NewReader(ev.Data[0]))
	dec.DisallowUnknownFields()
	if err := dec.Decode(&v); err != nil {
		t.Fatalf("event %q: %v", ev.Data[0], err)
	}
	return v
}

// summary is a stream's events in short: "begin:<n>" (the n-th message id
// seen), "item:<text>", "buttons:<n>", "end", "waiting", "error:<code>",
// "[DONE]"; ids maps each message id to its number (from 1).
func summary(t *testing.T, br *bufio.Reader, until func(sseEvent) bool) ([]string, []string) {
	t.Helper()
	var out, ids []string
	num := func(id string) string {
		for i, have := range ids {
			if have == id {
				return string(rune('1' + i))
			}
		}
		ids = append(ids, id)
		return string(rune('0' + len(ids)))
	}
	for {
		ev := readSocketEvent(t, br)
		switch {
		case ev.done:
			out = append(out, "[DONE]")
			return out, ids
		case ev.Type == "begin":
			out = append(out, "begin:"+num(ev.MessageID))
		case ev.Type == "item":
			out = append(out, "item:"+ev.Content)
		case ev.Type == "buttons":
			out = append(out, "buttons:"+num(ev.MessageID))
		case ev.Type == "error":
			out = append(out, "error:"+ev.Error)
		default:
			out = append(out, ev.Type)
		}
		if until != nil && until(ev) {
			return out, ids
		}
	}
}

func wantSocketStream(t *testing.T, got []string, want string) {
	t.Helper()
	if g := strings.Join(got, " "); g != want {
		t.Fatalf("stream:\n got  %s\n want %s", g, want)
	}
}

// histOf is the history as "role:content:status" lines.
func histOf(t *testing.T, h *handler.Handler, token string) ([]string, historyBody) {
	t.Helper()
	rec := serve(t, h, req{method: "GET", path: "/api/v1/chat/history", headers: authz(token)})
	if rec.Code != http.StatusOK {
		t.Fatalf("history: %d %s", rec.Code, rec.Body)
	}
	hb := decode[historyBody](t, rec)
	var out []string
	for _, m := range hb.Messages {
		out = append(out, m.Role+":"+m.Content+":"+m.Status)
	}
	return out, hb
}

func wantHistory(t *testing.T, got []string, want ...string) {
	t.Helper()
	if strings.Join(got, "\n") != strings.Join(want, "\n") {
		t.Fatalf("history:\n got  %q\n want %q", got, want)
	}
}

// waitUntil polls cond for up to 10 s.
func waitUntil(t *testing.T, what string, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(10 * time.Second)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatalf("timed out waiting for %s", what)
		}
		time.Sleep(10 * time.Millisecond)
	}
}

// framesFromProxy lists what the stand-in saw from the proxy starting
// with prefix: its frames ("n8n|heartbeat-ack"), its closes ("close
// <code>"), the keys its sockets were opened with ("open public").
func framesFromProxy(f *testkit.N8nChat, prefix string) []string {
	var out []string
	for _, fr := range f.Frames() {
		if !fr.FromN8n && strings.HasPrefix(fr.Data, prefix) {
			out = append(out, fr.Data)
		}
	}
	return out
}

// Several messages for one visitor message: each is a reply of its own in
// the same stream (begin with its stored id, item, end), the first named
// by X-Message-ID; the proxy answers n8n's heartbeats; every message is
// stored, in order.
func TestAPISocketSeveralMessages(t *testing.T) {
	for _, kind := range storeKinds {
		t.Run(kind, func(t *testing.T) {
			e := newSocketAPIEnv(t, kind, 1, fastChat(
				testkit.ChatStep{Text: "one"}, testkit.ChatStep{Text: "two"}, testkit.ChatStep{Text: "three"},
			), false, nil)
			s := createSession(t, e.handlers[0])
			resp := e.message(t, 0, s.Token, "hello")
			if resp.StatusCode != http.StatusOK || resp.Header.Get("Content-Type") != "text/event-stream" {
				t.Fatalf("status %d, Content-Type %q", resp.StatusCode, resp.Header.Get("Content-Type"))
			}
			got, ids := summary(t, bufio.NewReader(resp.Body), nil)
			wantSocketStream(t, got, "begin:1 item:one end begin:2 item:two end begin:3 item:three end [DONE]")
			if resp.Header.Get("X-Message-ID") != ids[0] {
				t.Errorf("X-Message-ID %q, first reply %q", resp.Header.Get("X-Message-ID"), ids[0])
			}
			waitUntil(t, "the replies to be stored", func() bool {
				h, _ := histOf(t, e.handlers[0], s.Token)
				return len(h) == 4
			})
			h, hb := histOf(t, e.handlers[0], s.Token)
			wantHistory(t, h, "user:hello:complete", "assistant:one:complete", "assistant:two:complete", "assistant:three:complete")
			for i, id := range ids {
				if hb.Messages[i+1].ID != id {
					t.Errorf("message %d stored as %s, streamed as %s", i+1, hb.Messages[i+1].ID, id)
				}
			}
			if acks := framesFromProxy(e.n8n, "n8n|heartbeat-ack"); len(acks) == 0 {
				t.Error("the proxy answered none of n8n's heartbeats")
			}
			if e.n8n.Posts() != 1 {
				t.Errorf("%d executions started, want 1", e.n8n.Posts())
			}
		})
	}
}

// Send Message → Send and Wait → Send Message: the first stream ends with
// waiting; the visitor's answer, sent to another instance sharing the
// store, resumes the same execution over a socket of its own (under n8n's
// other socket key) instead of starting one; the first instance's socket
// closes; the history holds the whole conversation.
func TestAPISocketWaitResumesOnAnotherInstance(t *testing.T) {
	for _, kind := range storeKinds {
		t.Run(kind, func(t *testing.T) {
			e := newSocketAPIEnv(t, kind, 2, fastChat(
				testkit.ChatStep{Text: "first: hello nodes"},
				testkit.ChatStep{Wait: true, Text: "What else do you want to say?"},
				testkit.ChatStep{Text: "you said: {reply}"},
			), false, nil)
			s := createSession(t, e.handlers[0])
			got, _ := summary(t, bufio.NewReader(e.message(t, 0, s.Token, "hello").Body), nil)
			wantSocketStream(t, got, "begin:1 item:first: hello nodes end begin:2 item:What else do you want to say? end waiting [DONE]")
			wt, err := e.store.GetWaiting(context.Background(), s.SessionID)
			if err != nil {
				t.Fatalf("no waiting execution recorded: %v", err)
			}

			got, _ = summary(t, bufio.NewReader(e.message(t, 1, s.Token, "typed reply").Body), nil)
			wantSocketStream(t, got, "begin:1 item:you said: typed reply end [DONE]")
			ex, _ := e.n8n.Execution(wt.ExecutionID)
			if e.n8n.Posts() != 1 || ex.Status != "success" || len(ex.Replies) != 1 || ex.Replies[0] != "typed reply" {
				t.Fatalf("%d executions; execution %s %s with replies %q; want 1, success, [typed reply]", e.n8n.Posts(), wt.ExecutionID, ex.Status, ex.Replies)
			}
			if opens := framesFromProxy(e.n8n, "open "); strings.Join(opens, ",") != "open public,open integrated" {
				t.Errorf("sockets opened with keys %q; the resuming one must use the other key", opens)
			}
			// The holder's socket closes once the execution went on.
			waitUntil(t, "the holding socket to close", func() bool { return len(framesFromProxy(e.n8n, "close ")) >= 1 })
			if _, err := e.store.GetWaiting(context.Background(), s.SessionID); err == nil {
				t.Error("the session still waits")
			}
			waitUntil(t, "the history", func() bool { h, _ := histOf(t, e.handlers[1], s.Token); return len(h) == 5 })
			h, _ := histOf(t, e.handlers[1], s.Token)
			wantHistory(t, h, "user:hello:complete", "assistant:first: hello nodes:complete",
				"assistant:What else do you want to say?:complete", "user:typed reply:complete", "assistant:you said: typed reply:complete")
		})
	}
}

// An approval: its message carries a buttons event and the stream stays
// open; the button's link, served through the proxy to n8n (with the Host
// n8n signed it for), resumes the execution, and what follows comes in
// the same stream. Links that are not n8n's signed ones, and other
// methods, never reach n8n.
func TestAPISocketButtons(t *testing.T) {
	e := newSocketAPIEnv(t, "sqlite", 1, fastChat(
		testkit.ChatStep{Approval: true, Text: "Refund 20 EUR?"},
		testkit.ChatStep{Text: "decision: {reply}"},
	), true, nil)
	s := createSession(t, e.handlers[0])
	br := bufio.NewReader(e.message(t, 0, s.Token, "refund please").Body)
	var buttons sseEvent
	got, _ := summary(t, br, func(ev sseEvent) bool {
		if ev.Type == "buttons" {
			buttons = ev
		}
		return ev.Type == "end"
	})
	wantSocketStream(t, got, "begin:1 item:Refund 20 EUR? buttons:1 end")
	if len(buttons.Buttons) != 2 || buttons.Buttons[0].Text != "Approve" || buttons.Buttons[0].Type != "primary" || buttons.BlockUserInput {
		t.Fatalf("buttons event %+v", buttons)
	}
	link, err := url.Parse(buttons.Buttons[0].Link)
	if err != nil || link.Host != strings.TrimPrefix(e.srvs[0].URL, "http://") || !strings.HasPrefix(link.Path, "/webhook-waiting/") {
		t.Fatalf("approve link %q is not on the proxy's origin", buttons.Buttons[0].Link)
	}

	for _, tc := range []struct {
		method, target string
		status         int
	}{
		{"GET", link.Path, http.StatusNotFound},                                  // unsigned
		{"GET", link.Path + "?approved=true", http.StatusNotFound},               // unsigned
		{"GET", "/webhook-waiting/1?signature=x", http.StatusNotFound},           // no node
		{"GET", "/webhook-waiting/../chat?x=1&signature=x", http.StatusNotFound}, // not below it
		{"PUT", link.RequestURI(), http.StatusMethodNotAllowed},
		{"DELETE", link.RequestURI(), http.StatusMethodNotAllowed},
	} {
		r, _ := http.NewRequest(tc.method, e.srvs[0].URL+tc.target, nil)
		resp, err := e.client.Do(r)
		if err != nil {
			t.Fatal(err)
		}
		_ = resp.Body.Close()
		if resp.StatusCode != tc.status {
			t.Errorf("%s %s: %d, want %d", tc.method, tc.target, resp.StatusCode, tc.status)
		}
	}
	if n := e.n8n.WaitingRequests(); n != 0 {
		t.Fatalf("%d refused requests reached n8n", n)
	}
	// A forged signature reaches n8n, which refuses it.
	forged := *link
	q := forged.Query()
	q.Set("signature", strings.Repeat("0", 64))
	forged.RawQuery = q.Encode()
	resp, err := e.client.Get(forged.String())
	if err != nil {
		t.Fatal(err)
	}
	_ = resp.Body.Close()
	if resp.StatusCode != http.StatusUnauthorized {
		t.Fatalf("forged link: %d, want n8n's 401", resp.StatusCode)
	}

	// The visitor's cookie and credentials are not passed on.
	r, _ := http.NewRequest("GET", link.String(), nil)
	r.Header.Set("Cookie", "chat_session="+s.Token)
	r.Header.Set("Authorization", "Bearer "+s.Token)
	resp, err = e.client.Do(r)
	if err != nil {
		t.Fatal(err)
	}
	_ = resp.Body.Close()
	if resp.StatusCode != http.StatusOK || !strings.HasPrefix(resp.Header.Get("Content-Type"), "text/html") {
		t.Fatalf("approve link: %d %s, want n8n's page", resp.StatusCode, resp.Header.Get("Content-Type"))
	}
	hdrs := e.n8n.WaitingHeaders()
	if last := hdrs[len(hdrs)-1]; last.Get("Cookie") != "" || last.Get("Authorization") != "" || last.Get("X-Forwarded-For") == "" {
		t.Fatalf("n8n got headers %v: want no Cookie or Authorization, and X-Forwarded-For", last)
	}
	got, _ = summary(t, br, nil)
	wantSocketStream(t, got, "begin:1 item:decision: approved=true end [DONE]")
	h, _ := histOf(t, e.handlers[0], s.Token)
	wantHistory(t, h, "user:refund please:complete", "assistant:Refund 20 EUR?:complete", "assistant:decision: approved=true:complete")
	// The history keeps the buttons with their message.
	rec := serve(t, e.handlers[0], req{method: "GET", path: "/api/v1/chat/history", headers: authz(s.Token)})
	hist := decode[struct {
		Messages []struct {
			Buttons []n8n.ChatButton `json:"buttons"`
		} `json:"messages"`
	}](t, rec)
	if b := hist.Messages[1].Buttons; len(b) != 2 || b[0] != buttons.Buttons[0] || b[1] != buttons.Buttons[1] {
		t.Fatalf("stored buttons %+v, streamed %+v", b, buttons.Buttons)
	}
	if len(hist.Messages[0].Buttons)+len(hist.Messages[2].Buttons) != 0 {
		t.Fatal("buttons on other messages")
	}
}

// An approval that blocks typed answers: a message meanwhile is refused
// with 409 before it is stored, and the execution still waits.
func TestAPISocketButtonsBlockTypedAnswers(t *testing.T) {
	e := newSocketAPIEnv(t, "sqlite", 1, fastChat(testkit.ChatStep{Approval: true, BlockUserInput: true, Text: "Approve?"}), true, nil)
	s := createSession(t, e.handlers[0])
	br := bufio.NewReader(e.message(t, 0, s.Token, "start").Body)
	summary(t, br, func(ev sseEvent) bool { return ev.Type == "end" })
	waitUntil(t, "the wait to be recorded", func() bool {
		_, err := e.store.GetWaiting(context.Background(), s.SessionID)
		return err == nil
	})
	resp := e.message(t, 0, s.Token, "just do it")
	if resp.StatusCode != http.StatusConflict {
		t.Fatalf("typed answer to a blocking approval: %d, want 409", resp.StatusCode)
	}
	if _, err := e.store.GetWaiting(context.Background(), s.SessionID); err != nil {
		t.Fatalf("the wait is gone after the refusal: %v", err)
	}
	h, _ := histOf(t, e.handlers[0], s.Token)
	wantHistory(t, h, "user:start:complete", "assistant:Approve?:complete")
}

// n8n unreachable on its socket: the stream carries the error event, and
// the reply is stored with status error.
func TestAPISocketUnreachable(t *testing.T) {
	for _, kind := range storeKinds {
		t.Run(kind, func(t *testing.T) {
			dead := httptest.NewServer(http.NotFoundHandler())
			deadURL := dead.URL
			dead.Close()
			e := newSocketAPIEnv(t, kind, 1, fastChat(testkit.ChatStep{Text: "never"}), false, func(c *envConfig) {
				c.Upstream.SocketURL = deadURL
			})
			s := createSession(t, e.handlers[0])
			got, _ := summary(t, bufio.NewReader(e.message(t, 0, s.Token, "hello").Body), nil)
			wantSocketStream(t, got, "begin:1 error:upstream_unavailable end [DONE]")
			waitUntil(t, "the reply to be stored", func() bool { h, _ := histOf(t, e.handlers[0], s.Token); return len(h) == 2 })
			h, _ := histOf(t, e.handlers[0], s.Token)
			wantHistory(t, h, "user:hello:complete", "assistant::error")
		})
	}
}

// A visitor who never answers: the holding socket acks n8n's heartbeats
// (n8n would cancel after AckTimeout) until wait_timeout, then closes and
// the session no longer waits: the next message starts a new execution.
func TestAPISocketWaitTimeout(t *testing.T) {
	opts := fastChat(testkit.ChatStep{Wait: true, Text: "Q?"}, testkit.ChatStep{Text: "A: {reply}"})
	opts.AckTimeout = time.Second
	e := newSocketAPIEnv(t, "sqlite", 1, opts, false, func(c *envConfig) { c.WaitTimeout = 2500 * time.Millisecond })
	s := createSession(t, e.handlers[0])
	got, _ := summary(t, bufio.NewReader(e.message(t, 0, s.Token, "hello").Body), nil)
	wantSocketStream(t, got, "begin:1 item:Q? end waiting [DONE]")
	wt, err := e.store.GetWaiting(context.Background(), s.SessionID)
	if err != nil {
		t.Fatal(err)
	}
	waiting := time.Now()
	waitUntil(t, "the holding socket to close", func() bool { return len(framesFromProxy(e.n8n, "close ")) > 0 })
	if held := time.Since(waiting); held < 2*time.Second {
		t.Fatalf("the socket was held %s, want about wait_timeout (2.5s)", held)
	}
	if c := framesFromProxy(e.n8n, "close "); c[0] != "close 1000" {
		t.Fatalf("the holding socket ended with %s, want a closing frame (1000)", c[0])
	}
	if ex, _ := e.n8n.Execution(wt.ExecutionID); ex.Status != "waiting" {
		t.Fatalf("execution %s: n8n cancelled it while the proxy held it", ex.Status)
	}
	if _, err := e.store.GetWaiting(context.Background(), s.SessionID); err == nil {
		t.Fatal("the session still waits after wait_timeout")
	}
	got, _ = summary(t, bufio.NewReader(e.message(t, 0, s.Token, "again").Body), nil)
	wantSocketStream(t, got, "begin:1 item:Q? end waiting [DONE]")
	if e.n8n.Posts() != 2 {
		t.Fatalf("%d executions, want a new one", e.n8n.Posts())
	}
}

// When Caddy exits, a stream waiting on buttons ends with server_shutdown
// and [DONE], and every n8n socket closes with a closing frame (1001); a
// reload (CloseSockets) closes a holding socket the same way and keeps the
// wait recorded, so another instance resumes it.
func TestAPISocketShutdownAndReload(t *testing.T) {
	t.Run("exit", func(t *testing.T) {
		e := newSocketAPIEnv(t, "sqlite", 1, fastChat(testkit.ChatStep{Approval: true, Text: "Approve?"}), true, nil)
		s := createSession(t, e.handlers[0])
		br := bufio.NewReader(e.message(t, 0, s.Token, "start").Body)
		summary(t, br, func(ev sseEvent) bool { return ev.Type == "end" })
		e.drains[0].Start()
		got, _ := summary(t, br, nil)
		wantSocketStream(t, got, "error:server_shutdown [DONE]")
		waitUntil(t, "n8n's socket to close", func() bool { return len(framesFromProxy(e.n8n, "close ")) == 1 })
		if c := framesFromProxy(e.n8n, "close "); c[0] != "close 1001" {
			t.Fatalf("n8n's socket: %s, want close 1001", c[0])
		}
		if !e.drains[0].Wait(5 * time.Second) {
			t.Fatal("the socket still counts as running")
		}
	})
	t.Run("reload", func(t *testing.T) {
		e := newSocketAPIEnv(t, "sqlite", 2, fastChat(
			testkit.ChatStep{Wait: true, Text: "Q?"}, testkit.ChatStep{Text: "A: {reply}"},
		), false, nil)
		s := createSession(t, e.handlers[0])
		summary(t, bufio.NewReader(e.message(t, 0, s.Token, "hello").Body), nil)
		e.handlers[0].CloseSockets(5 * time.Second)
		if c := framesFromProxy(e.n8n, "close "); len(c) != 1 || c[0] != "close 1001" {
			t.Fatalf("n8n's sockets after the reload: %q, want one close 1001", c)
		}
		got, _ := summary(t, bufio.NewReader(e.message(t, 1, s.Token, "answer").Body), nil)
		wantSocketStream(t, got, "begin:1 item:A: answer end [DONE]")
		if e.n8n.Posts() != 1 {
			t.Fatalf("%d executions, want the first resumed", e.n8n.Posts())
		}
	})
}

// An answer with a file (a multipart message) resumes the waiting
// execution with the file as the widget sends it over the socket: a
// base64 data URL with its name and type.
func TestAPISocketAnswerWithFile(t *testing.T) {
	e := newSocketAPIEnv(t, "sqlite", 1, fastChat(
		testkit.ChatStep{Wait: true, Text: "Send me the list"}, testkit.ChatStep{Text: "got: {reply}"},
	), false, func(c *envConfig) {
		c.Uploads = &upload.Config{AllowedTypes: []string{"text/plain"}}
	})
	s := createSession(t, e.handlers[0])
	got, _ := summary(t, bufio.NewReader(e.message(t, 0, s.Token, "hi").Body), nil)
	wantSocketStream(t, got, "begin:1 item:Send me the list end waiting [DONE]")
	wt, err := e.store.GetWaiting(context.Background(), s.SessionID)
	if err != nil {
		t.Fatal(err)
	}
	resp := e.messageWithFile(t, 0, s.Token, "here it is", "list.txt", "text/plain", []byte("milk\neggs\n"))
	got, _ = summary(t, bufio.NewReader(resp.Body), nil)
	wantSocketStream(t, got, "begin:1 item:got: here it is end [DONE]")
	ex, _ := e.n8n.Execution(wt.ExecutionID)
	want := []testkit.ChatFile{{Name: "list.txt", Type: "text/plain", Data: "data:text/plain;base64,bWlsawplZ2dzCg=="}}
	if len(ex.ReplyFiles) != 1 || ex.ReplyFiles[0] != want[0] {
		t.Fatalf("n8n got files %+v, want %+v", ex.ReplyFiles, want)
	}
	if e.n8n.Posts() != 1 {
		t.Fatalf("%d executions, want 1", e.n8n.Posts())
	}
}

// A visitor who leaves while the workflow is still talking: its messages
// are stored and, with push_secret, reach the conversation's events
// stream live, as pushed messages do.
func TestAPISocketMessagesAfterVisitorLeft(t *testing.T) {
	opts := fastChat(testkit.ChatStep{Text: "one"}, testkit.ChatStep{Text: "two"})
	opts.PollInterval = 400 * time.Millisecond
	e := newSocketAPIEnv(t, "sqlite", 1, opts, false, func(c *envConfig) {
		c.Push = &pushConfig{Secret: testPushSecret, Channel: "socketapi-" + t.Name()}
	})
	s := createSession(t, e.handlers[0])

	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	defer cancel()
	er, _ := http.NewRequestWithContext(ctx, "GET", e.srvs[0].URL+"/api/v1/chat/events", nil)
	er.Header.Set("Authorization", "Bearer "+s.Token)
	er.Header.Set("User-Agent", chatUA)
	eresp, err := e.client.Do(er)
	if err != nil || eresp.StatusCode != http.StatusOK {
		t.Fatalf("events stream: %v %v", err, eresp)
	}
	defer eresp.Body.Close()
	events := bufio.NewReader(eresp.Body)
	for testkit.NextNamedEvent(t, events).Event != "ready" {
	}

	mctx, leave := context.WithCancel(ctx)
	body, _ := json.Marshal(map[string]string{"message": "hello"})
	r, _ := http.NewRequestWithContext(mctx, "POST", e.srvs[0].URL+"/api/v1/chat/message", bytes.NewReader(body))
	r.Header.Set("Content-Type", "application/json")
	r.Header.Set("User-Agent", chatUA)
	r.Header.Set("Authorization", "Bearer "+s.Token)
	resp, err := e.client.Do(r)
	if err != nil {
		t.Fatal(err)
	}
	if ev := readSocketEvent(t, bufio.NewReader(resp.Body)); ev.Type != "begin" {
		t.Fatalf("first event %+v", ev)
	}
	leave() // before n8n's first message (its poll is 400 ms away)
	_ = resp.Body.Close()

	var got []string
	for len(got) < 2 {
		ev := testkit.NextNamedEvent(t, events)
		if ev.Event != "message" {
			continue
		}
		var m struct{ ID, Role, Content, Status string }
		if err := json.Unmarshal([]byte(ev.Data), &m); err != nil {
			t.Fatal(err)
		}
		got = append(got, m.Role+":"+m.Content+":"+m.Status)
	}
	wantHistory(t, got, "assistant:one:complete", "assistant:two:complete")
	waitUntil(t, "the messages to be stored", func() bool { h, _ := histOf(t, e.handlers[0], s.Token); return len(h) == 3 })
	h, _ := histOf(t, e.handlers[0], s.Token)
	wantHistory(t, h, "user:hello:complete", "assistant:one:complete", "assistant:two:complete")
}

// Newer n8n answers with a resumeToken and checks it on every socket: the
// proxy's own socket and the one resuming the execution both carry it
// (the waiting record keeps it).
func TestAPISocketN8nResumeToken(t *testing.T) {
	opts := fastChat(testkit.ChatStep{Wait: true, Text: "Q?"}, testkit.ChatStep{Text: "A: {reply}"})
	opts.ResumeToken = true
	e := newSocketAPIEnv(t, "sqlite", 1, opts, false, nil)
	s := createSession(t, e.handlers[0])
	got, _ := summary(t, bufio.NewReader(e.message(t, 0, s.Token, "hello").Body), nil)
	wantSocketStream(t, got, "begin:1 item:Q? end waiting [DONE]")
	wt, err := e.store.GetWaiting(context.Background(), s.SessionID)
	if err != nil || wt.ResumeToken == "" {
		t.Fatalf("waiting record %+v, %v: want n8n's token kept", wt, err)
	}
	got, _ = summary(t, bufio.NewReader(e.message(t, 0, s.Token, "fine").Body), nil)
	wantSocketStream(t, got, "begin:1 item:A: fine end [DONE]")
	for _, f := range e.n8n.Frames() {
		if strings.Contains(f.Data, "Connection rejected") {
			t.Fatalf("n8n refused a socket: %v", f)
		}
	}
}

// A stop of the reply before the workflow's first message ends the
// stream and stores that reply partial; the workflow goes on, and what it
// says is stored.
func TestAPISocketStop(t *testing.T) {
	opts := fastChat(testkit.ChatStep{Text: "late"})
	opts.PollInterval = 700 * time.Millisecond
	e := newSocketAPIEnv(t, "sqlite", 1, opts, false, nil)
	s := createSession(t, e.handlers[0])
	resp := e.message(t, 0, s.Token, "hello")
	br := bufio.NewReader(resp.Body)
	begin := readSocketEvent(t, br)
	if begin.Type != "begin" || begin.MessageID != resp.Header.Get("X-Message-ID") {
		t.Fatalf("first event %+v", begin)
	}
	req, _ := http.NewRequest("POST", e.srvs[0].URL+"/api/v1/chat/stop/"+begin.MessageID, nil)
	req.Header.Set("Authorization", "Bearer "+s.Token)
	req.Header.Set("User-Agent", chatUA)
	stop, err := e.client.Do(req)
	if err != nil {
		t.Fatal(err)
	}
	var sr struct{ Status string }
	_ = json.NewDecoder(stop.Body).Decode(&sr)
	_ = stop.Body.Close()
	if stop.StatusCode != http.StatusOK || sr.Status != "partial" {
		t.Fatalf("stop: %d %+v, want 200 partial", stop.StatusCode, sr)
	}
	got, _ := summary(t, br, nil)
	wantSocketStream(t, got, "end [DONE]")
	waitUntil(t, "the workflow's message to be stored", func() bool { h, _ := histOf(t, e.handlers[0], s.Token); return len(h) == 3 })
	h, hb := histOf(t, e.handlers[0], s.Token)
	wantHistory(t, h, "user:hello:complete", "assistant::partial", "assistant:late:complete")
	if hb.Messages[1].ID != begin.MessageID {
		t.Fatalf("the stopped reply is %s, the stream's %s", hb.Messages[1].ID, begin.MessageID)
	}
}
