package chatproxy

import (
	"compress/gzip"
	"encoding/json"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/http/httptest"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/chatproxy/caddy-chatproxy/internal/testkit"
	"github.com/golang-jwt/jwt/v5"
)

// fakeWebhookPath is the secret path of the fake n8n's webhook.
const fakeWebhookPath = "/webhook/5b8c-fake-secret-id/chat"

// fakeWaitLimit bounds every wait inside a fake n8n script, so that a test
// that failed halfway never leaves a handler (and the test binary) hanging.
const fakeWaitLimit = 10 * time.Second

// n8nFake is an httptest server that behaves like n8n's Webhook node. Each
// test scripts its reply (setScript); the fake counts hits, records every
// request (headers, raw and decoded body) and tells whether the request's
// context ended while the script was still answering it (the proxy
// cancelled the upstream request).
type n8nFake struct {
	srv    *httptest.Server
	hits   atomic.Int32
	active atomic.Int32 // requests whose script is still running
	open   atomic.Int32 // connections open to the fake

	quit     chan struct{} // closed at cleanup: releases scripts waiting on gates
	quitOnce sync.Once

	mu        sync.Mutex
	script    n8nScript
	jwtSecret []byte // when set, requests are checked as n8n's JWT Auth does
	calls     []*n8nCall
	arrived   chan *n8nCall
}

// n8nScript answers one request to the fake n8n.
type n8nScript func(w http.ResponseWriter, r *http.Request, c *n8nCall)

// n8nBody is the request body n8n receives (SPEC §5).
type n8nBody struct {
	Action    string          `json:"action"`
	SessionID string          `json:"sessionId"`
	ChatInput string          `json:"chatInput"`
	Message   string          `json:"message"`
	Metadata  json.RawMessage `json:"metadata"`
	Session   struct {
		SessionID    string `json:"session_id"`
		OriginDomain string `json:"origin_domain"`
		PageURL      string `json:"page_url"`
		ClientIP     string `json:"client_ip"`
		UserAgent    string `json:"user_agent"`
		MessageCount int    `json:"message_count"`
	} `json:"session"`
	JWTToken  string `json:"jwt_token"`
	Timestamp string `json:"timestamp"`
}

// n8nCall is one request the fake received.
type n8nCall struct {
	N      int // 1-based hit number
	Method string
	Path   string
	Header http.Header
	Raw    []byte
	Body   n8nBody
	Fields map[string]json.RawMessage // the body's top-level keys

	canceled   chan struct{}
	cancelOnce sync.Once
	finished   chan struct{}
}

// Canceled is closed when the request's context ended while the script
// was still running: the proxy abandoned the upstream request.
func (c *n8nCall) Canceled() <-chan struct{} { return c.canceled }

// Finished is closed when the script has returned.
func (c *n8nCall) Finished() <-chan struct{} { return c.finished }

// WasCanceled reports whether the request was abandoned by the proxy.
func (c *n8nCall) WasCanceled() bool {
	select {
	case <-c.canceled:
		return true
	default:
		return false
	}
}

func (c *n8nCall) markCanceled() { c.cancelOnce.Do(func() { close(c.canceled) }) }

// newN8nFake starts a fake n8n answering with script (which may be nil
// and set later).
func newN8nFake(t *testing.T, script n8nScript) *n8nFake {
	t.Helper()
	f := &n8nFake{script: script, quit: make(chan struct{}), arrived: make(chan *n8nCall, 256)}
	f.srv = httptest.NewUnstartedServer(http.HandlerFunc(f.serve))
	f.srv.Config.ConnState = func(_ net.Conn, s http.ConnState) {
		switch s {
		case http.StateNew:
			f.open.Add(1)
		case http.StateHijacked, http.StateClosed:
			f.open.Add(-1)
		}
	}
	f.srv.Start()
	t.Cleanup(func() {
		f.release()
		f.srv.CloseClientConnections()
		f.srv.Close()
	})
	return f
}

// URL is the webhook URL to configure as n8n_webhook.
func (f *n8nFake) URL() string { return f.srv.URL + fakeWebhookPath }

// release wakes every script waiting on a gate; they give up.
func (f *n8nFake) release() { f.quitOnce.Do(func() { close(f.quit) }) }

func (f *n8nFake) setScript(s n8nScript) {
	f.mu.Lock()
	defer f.mu.Unlock()
	f.script = s
}

// requireJWT makes the fake check requests as n8n's Webhook node with JWT
// Auth (passphrase, HS256) does: 401 "No token provided" without a token,
// 403 with the jsonwebtoken message when it does not verify.
func (f *n8nFake) requireJWT(secret string) {
	f.mu.Lock()
	defer f.mu.Unlock()
	f.jwtSecret = nil
	if secret != "" {
		f.jwtSecret = []byte(secret)
	}
}

// Hits is how many requests reached the fake.
func (f *n8nFake) Hits() int { return int(f.hits.Load()) }

// Active is how many requests the fake is still answering.
func (f *n8nFake) Active() int { return int(f.active.Load()) }

// OpenConns is how many connections to the fake are open (counted from
// the server's ConnState: new, until closed or hijacked).
func (f *n8nFake) OpenConns() int { return int(f.open.Load()) }

// Calls returns the recorded requests, oldest first.
func (f *n8nFake) Calls() []*n8nCall {
	f.mu.Lock()
	defer f.mu.Unlock()
	return append([]*n8nCall(nil), f.calls...)
}

// last returns the most recent request or fails.
func (f *n8nFake) last(t *testing.T) *n8nCall {
	t.Helper()
	calls := f.Calls()
	if len(calls) == 0 {
		t.Fatal("n8n received no request")
	}
	return calls[len(calls)-1]
}

// waitCall waits for the next request to arrive (in arrival order).
func (f *n8nFake) waitCall(t *testing.T) *n8nCall {
	t.Helper()
	select {
	case c := <-f.arrived:
		return c
	case <-time.After(5 * time.Second):
		t.Fatal("timed out waiting for a request to reach n8n")
		return nil
	}
}

func (f *n8nFake) serve(w http.ResponseWriter, r *http.Request) {
	n := f.hits.Add(1)
	f.active.Add(1)
	defer f.active.Add(-1)
	raw, _ := io.ReadAll(r.Body)
	c := &n8nCall{
		N: int(n), Method: r.Method, Path: r.URL.Path, Header: r.Header.Clone(), Raw: raw,
		canceled: make(chan struct{}), finished: make(chan struct{}),
	}
	_ = json.Unmarshal(raw, &c.Body)
	_ = json.Unmarshal(raw, &c.Fields)
	f.mu.Lock()
	f.calls = append(f.calls, c)
	script, secret := f.script, f.jwtSecret
	f.mu.Unlock()
	select {
	case f.arrived <- c:
	default:
	}
	defer close(c.finished)

	// The request context ends when the proxy drops the connection, and
	// also (for no reason worth reporting) once the script has returned.
	returned := make(chan struct{})
	go func() {
		select {
		case <-r.Context().Done():
			select {
			case <-returned:
			default:
				c.markCanceled()
			}
		case <-returned:
		}
	}()
	defer close(returned)
	defer func() {
		if r.Context().Err() != nil {
			c.markCanceled()
		}
	}()

	if r.Method != http.MethodPost || r.URL.Path != fakeWebhookPath {
		// n8n's answer for a webhook that is not registered.
		fakeWrite(w, http.StatusNotFound, "application/json; charset=utf-8",
			`{"code":404,"message":"The requested webhook is not registered."}`)
		return
	}
	if secret != nil && !fakeCheckJWT(w, r, secret) {
		return
	}
	if script == nil {
		fakeWrite(w, http.StatusInternalServerError, "text/plain", "no script")
		return
	}
	script(w, r, c)
}

// fakeCheckJWT does what n8n's Webhook node JWT Auth does (research §3.1,
// §7): it reads "Authorization: <anything> <token>" and verifies it.
func fakeCheckJWT(w http.ResponseWriter, r *http.Request, secret []byte) bool {
	_, token, ok := strings.Cut(r.Header.Get("Authorization"), " ")
	if !ok || token == "" {
		w.Header().Set("WWW-Authenticate", `Basic realm="Webhook"`)
		fakeWrite(w, http.StatusUnauthorized, "text/plain", "No token provided")
		return false
	}
	_, err := jwt.NewParser(jwt.WithValidMethods([]string{"HS256"})).Parse(token, func(*jwt.Token) (any, error) { return secret, nil })
	if err != nil {
		w.Header().Set("WWW-Authenticate", `Basic realm="Webhook"`)
		fakeWrite(w, http.StatusForbidden, "text/plain", "invalid signature")
		return false
	}
	return true
}

// wait blocks until ch is closed or receives, and reports true; it reports
// false when the request's context ended, the fake is being torn down, or
// fakeWaitLimit passed.
func (f *n8nFake) wait(r *http.Request, ch <-chan struct{}) bool {
	select {
	case <-ch:
		return true
	case <-r.Context().Done():
	case <-f.quit:
	case <-time.After(fakeWaitLimit):
	}
	return false
}

// hang blocks until the proxy abandons the request (or the fake is torn
// down): a workflow that never answers.
func (f *n8nFake) hang(r *http.Request) {
	select {
	case <-r.Context().Done():
	case <-f.quit:
	case <-time.After(fakeWaitLimit):
	}
}

func fakeWrite(w http.ResponseWriter, status int, contentType, body string) {
	if contentType != "" {
		w.Header().Set("Content-Type", contentType)
	} else {
		w.Header()["Content-Type"] = nil // no sniffing: really unlabelled
	}
	w.WriteHeader(status)
	_, _ = io.WriteString(w, body)
}

func fakeFlush(w http.ResponseWriter) { _ = http.NewResponseController(w).Flush() }

// n8nLine is one line of n8n's streaming reply (research §4).
func n8nLine(typ, content string) string { return testkit.N8nLine(typ, content) }

// n8nKeepalive is n8n's heartbeat line.
const n8nKeepalive = `{"type":"keepalive"}` + "\n"

// n8nStreamHead writes the headers n8n's Webhook node writes for a stream
// (status 200 and application/json, whatever follows) and flushes them.
func n8nStreamHead(w http.ResponseWriter) {
	w.Header().Set("Content-Type", "application/json; charset=utf-8")
	w.Header().Set("Cache-Control", "no-cache")
	w.WriteHeader(http.StatusOK)
	fakeFlush(w)
}

// fakeReply answers with a fixed status, content type and body.
func fakeReply(status int, contentType, body string) n8nScript {
	return func(w http.ResponseWriter, _ *http.Request, _ *n8nCall) {
		fakeWrite(w, status, contentType, body)
	}
}

// fakeJSON answers 200 with a JSON body.
func fakeJSON(body string) n8nScript {
	return fakeReply(http.StatusOK, "application/json; charset=utf-8", body)
}

// fakeOutput answers like "When Last Node Finishes": {"output": text}.
func fakeOutput(text string) n8nScript {
	b, _ := json.Marshal(map[string]string{"output": text})
	return fakeJSON(string(b))
}

// fakeStream answers with n8n's streaming NDJSON, one flushed line per
// chunk: a keepalive, begin, the items, end.
func fakeStream(items ...string) n8nScript {
	return func(w http.ResponseWriter, _ *http.Request, _ *n8nCall) {
		n8nStreamHead(w)
		for _, l := range n8nLines(items...) {
			_, _ = io.WriteString(w, l)
			fakeFlush(w)
		}
	}
}

// n8nLines is a whole n8n stream: keepalive, begin, the items, end.
func n8nLines(items ...string) []string {
	lines := []string{n8nKeepalive, n8nLine("begin", "")}
	for _, it := range items {
		lines = append(lines, n8nLine("item", it))
	}
	return append(lines, n8nLine("end", ""))
}

// fakeHang never answers (slow first byte beyond any timeout).
func (f *n8nFake) fakeHang() n8nScript {
	return func(_ http.ResponseWriter, r *http.Request, _ *n8nCall) { f.hang(r) }
}

// streamGate paces a scripted stream: the fake writes the first item at
// once and each further chunk only when the test says so, so a test can
// prove that the client saw chunk N before chunk N+1 was written.
type streamGate struct {
	proceed chan struct{}
	written atomic.Int32 // items written; counted before each write
}

func newStreamGate() *streamGate { return &streamGate{proceed: make(chan struct{})} }

// next lets the fake write its next chunk; it fails the test when the
// fake does not take the go-ahead (it gave up or already finished).
func (g *streamGate) next(t *testing.T) {
	t.Helper()
	select {
	case g.proceed <- struct{}{}:
	case <-time.After(5 * time.Second):
		t.Fatal("the fake n8n did not wait for the go-ahead")
	}
}

// fakeGated streams items as n8n does, with keepalive lines in between,
// writing item i+1 (and finally the end line) only after gate.next. With
// gzipped, the body is gzip-compressed, flushed after every chunk, as n8n
// does when the request accepts it.
func (f *n8nFake) fakeGated(g *streamGate, gzipped bool, items ...string) n8nScript {
	return func(w http.ResponseWriter, r *http.Request, _ *n8nCall) {
		var out io.Writer = w
		flush := func() { fakeFlush(w) }
		if gzipped {
			w.Header().Set("Content-Encoding", "gzip")
			zw := gzip.NewWriter(w)
			defer zw.Close()
			out = zw
			flush = func() { _ = zw.Flush(); fakeFlush(w) }
		}
		n8nStreamHead(w)
		write := func(s string) { _, _ = io.WriteString(out, s); flush() }
		write(n8nKeepalive)
		write(n8nLine("begin", ""))
		for i, it := range items {
			if i > 0 {
				if !f.wait(r, g.proceed) {
					return
				}
				write(n8nKeepalive)
			}
			g.written.Add(1)
			write(n8nLine("item", it))
		}
		if !f.wait(r, g.proceed) {
			return
		}
		write(n8nLine("end", ""))
	}
}

// fakeThen streams first as one item, waits for gate (closed by the
// test once the client has seen it), then runs after: the way the stream
// goes wrong, or on.
func (f *n8nFake) fakeThen(first string, gate <-chan struct{}, after func(w http.ResponseWriter, r *http.Request)) n8nScript {
	return func(w http.ResponseWriter, r *http.Request, _ *n8nCall) {
		n8nStreamHead(w)
		_, _ = io.WriteString(w, n8nLine("begin", "")+n8nLine("item", first))
		fakeFlush(w)
		if !f.wait(r, gate) {
			return
		}
		after(w, r)
	}
}

// fakeResetAfter writes a valid chunked 200 head and first as one item,
// waits for gate, then resets the connection (RST): a connection lost in
// the middle of a stream.
func (f *n8nFake) fakeResetAfter(first string, gate <-chan struct{}) n8nScript {
	return func(w http.ResponseWriter, r *http.Request, _ *n8nCall) {
		conn, bw, err := http.NewResponseController(w).Hijack()
		if err != nil {
			panic(err)
		}
		defer conn.Close()
		fmt.Fprint(bw, "HTTP/1.1 200 OK\r\nContent-Type: application/json; charset=utf-8\r\nTransfer-Encoding: chunked\r\n\r\n")
		for _, p := range []string{n8nLine("begin", ""), n8nLine("item", first)} {
			fmt.Fprintf(bw, "%x\r\n%s\r\n", len(p), p)
		}
		_ = bw.Flush()
		select {
		case <-gate:
		case <-f.quit:
		case <-time.After(fakeWaitLimit):
		}
		if tc, ok := conn.(*net.TCPConn); ok {
			_ = tc.SetLinger(0) // RST instead of FIN
		}
	}
}

// closedURL is a webhook URL on a port nothing listens on.
func closedURL(t *testing.T) string {
	t.Helper()
	return "http://" + closedPort(t) + fakeWebhookPath
}

// closedPort is the address of a port nothing listens on.
func closedPort(t *testing.T) string {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	addr := ln.Addr().String()
	_ = ln.Close()
	return addr
}

// awaitSignal waits for ch or fails the test after 5 s.
func awaitSignal(t *testing.T, ch <-chan struct{}, what string) {
	t.Helper()
	select {
	case <-ch:
	case <-time.After(5 * time.Second):
		t.Fatalf("timed out waiting for %s", what)
	}
}
