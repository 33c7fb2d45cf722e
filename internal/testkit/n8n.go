package testkit

import (
	"bytes"
	"compress/gzip"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"fmt"
	"io"
	"mime"
	"mime/multipart"
	"net"
	"net/http"
	"net/http/httptest"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/golang-jwt/jwt/v5"
)

// WebhookPath is the secret path of the fake n8n's webhook.
const WebhookPath = "/webhook/5b8c-fake-secret-id/chat"

// WaitLimit bounds every wait inside a fake n8n script, so that a test
// that failed halfway never leaves a handler (and the test binary) hanging.
const WaitLimit = 10 * time.Second

// N8n is an httptest server that behaves like n8n's Webhook node. Each
// test scripts its reply (SetScript); the fake counts hits, records every
// request (headers, raw and decoded body, or a multipart body's parts) and
// tells whether the request's context ended while the script was still
// answering it (the proxy cancelled the upstream request).
type N8n struct {
	srv    *httptest.Server
	hits   atomic.Int32
	active atomic.Int32 // requests whose script is still running
	open   atomic.Int32 // connections open to the fake
	conns  atomic.Int32 // connections ever opened
	closed atomic.Int32 // connections closed (not hijacked)

	quit     chan struct{} // closed at cleanup: releases scripts waiting on gates
	quitOnce sync.Once

	mu        sync.Mutex
	script    Script
	jwtSecret []byte // when set, requests are checked as n8n's JWT Auth does
	// streamBodies hands the script the request body unread (and records
	// no Raw or Body): for tests of how a body is sent, or of memory.
	streamBodies bool
	calls        []*Call
	arrived      chan *Call
}

// Script answers one request to the fake n8n.
type Script func(w http.ResponseWriter, r *http.Request, c *Call)

// N8nBody is the request body n8n receives (SPEC §5).
type N8nBody struct {
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
	// User is the verified visitor (identity_secret); nil when the body
	// has no "user", as for every anonymous visitor.
	User      *N8nUser `json:"user"`
	JWTToken  string   `json:"jwt_token"`
	Timestamp string   `json:"timestamp"`
}

// N8nUser is the body's (and the token's) "user".
type N8nUser struct {
	ID         string          `json:"id"`
	Name       string          `json:"name"`
	Email      string          `json:"email"`
	Verified   bool            `json:"verified"`
	Attributes json.RawMessage `json:"attributes"`
}

// Call is one request the fake received.
type Call struct {
	N      int // 1-based hit number
	Proto  int // the HTTP major version
	Method string
	Path   string
	Header http.Header
	Raw    []byte
	Body   N8nBody
	Fields map[string]json.RawMessage // the body's top-level keys
	// Claims are the bearer token's claims, verified (RequireJWT); nil
	// without RequireJWT.
	Claims jwt.MapClaims

	// Parts are a multipart/form-data body's parts, in order (Raw, Body
	// and Fields stay empty): read as they arrive, files hashed and never
	// held, so a large upload costs the fake no memory. MultipartErr is
	// why the body could not be read whole; the fake then answers 400.
	Parts        []Part
	MultipartErr error

	canceled   chan struct{}
	cancelOnce sync.Once
	finished   chan struct{}
}

// Canceled is closed when the request's context ended while the script
// was still running: the proxy abandoned the upstream request.
func (c *Call) Canceled() <-chan struct{} { return c.canceled }

// Finished is closed when the script has returned.
func (c *Call) Finished() <-chan struct{} { return c.finished }

// WasCanceled reports whether the request was abandoned by the proxy.
func (c *Call) WasCanceled() bool {
	select {
	case <-c.canceled:
		return true
	default:
		return false
	}
}

func (c *Call) markCanceled() { c.cancelOnce.Do(func() { close(c.canceled) }) }

// Part is one part of a multipart body the fake received.
type Part struct {
	Name, Filename, ContentType string
	Value                       string // a text field's value (no filename)
	Size                        int64  // a file's size in bytes
	SHA256                      string // a file's SHA-256, hex
}

// Field is the value of the multipart body's first text field called
// name, or "".
func (c *Call) Field(name string) string {
	for _, p := range c.Parts {
		if p.Name == name && p.Filename == "" {
			return p.Value
		}
	}
	return ""
}

// readParts reads a multipart body part by part, as n8n's form parser
// does: text fields kept, files streamed through a hash.
func readParts(body io.Reader, boundary string) ([]Part, error) {
	var parts []Part
	mr := multipart.NewReader(body, boundary)
	for {
		p, err := mr.NextPart()
		if err == io.EOF {
			return parts, nil
		}
		if err != nil {
			return parts, err
		}
		part := Part{Name: p.FormName(), Filename: p.FileName(), ContentType: p.Header.Get("Content-Type")}
		if part.Filename != "" {
			h := sha256.New()
			part.Size, err = io.Copy(h, p)
			part.SHA256 = hex.EncodeToString(h.Sum(nil))
		} else {
			var b []byte
			b, err = io.ReadAll(p)
			part.Value = string(b)
		}
		parts = append(parts, part)
		if err != nil {
			return parts, err
		}
	}
}

// NewN8n starts a fake n8n answering with script (which may be nil
// and set later).
func NewN8n(t testing.TB, script Script) *N8n {
	t.Helper()
	f := newN8n(t, script)
	f.srv.Start()
	return f
}

// NewN8nTLS is NewN8n over TLS with HTTP/2 enabled; its Client trusts it.
func NewN8nTLS(t testing.TB, script Script) *N8n {
	t.Helper()
	f := newN8n(t, script)
	f.srv.EnableHTTP2 = true
	f.srv.StartTLS()
	return f
}

func newN8n(t testing.TB, script Script) *N8n {
	f := &N8n{script: script, quit: make(chan struct{}), arrived: make(chan *Call, 256)}
	f.srv = httptest.NewUnstartedServer(http.HandlerFunc(f.serve))
	f.srv.Config.ConnState = func(_ net.Conn, s http.ConnState) {
		switch s {
		case http.StateNew:
			f.open.Add(1)
			f.conns.Add(1)
		case http.StateHijacked:
			f.open.Add(-1)
		case http.StateClosed:
			f.open.Add(-1)
			f.closed.Add(1)
		}
	}
	t.Cleanup(func() {
		f.Release()
		f.srv.CloseClientConnections()
		f.srv.Close()
	})
	return f
}

// URL is the webhook URL to configure as n8n_webhook.
func (f *N8n) URL() string { return f.srv.URL + WebhookPath }

// Server is the fake's httptest server.
func (f *N8n) Server() *httptest.Server { return f.srv }

// Client is an HTTP client that trusts the fake (needed with NewN8nTLS).
func (f *N8n) Client() *http.Client { return f.srv.Client() }

// CloseClientConnections cuts every open connection to the fake.
func (f *N8n) CloseClientConnections() { f.srv.CloseClientConnections() }

// Conns is how many connections were ever opened to the fake, Closed how
// many of them the fake saw closed (hijacked ones are not counted).
func (f *N8n) Conns() int  { return int(f.conns.Load()) }
func (f *N8n) Closed() int { return int(f.closed.Load()) }

// Quit is closed when the fake is released (Release, or the test's end):
// a script holding a request open should then let go.
func (f *N8n) Quit() <-chan struct{} { return f.quit }

// Release wakes every script waiting on a gate; they give up.
func (f *N8n) Release() { f.quitOnce.Do(func() { close(f.quit) }) }

func (f *N8n) SetScript(s Script) {
	f.mu.Lock()
	defer f.mu.Unlock()
	f.script = s
}

// RequireJWT makes the fake check requests as n8n's Webhook node with JWT
// Auth (passphrase, HS256) does: 401 "No token provided" without a token,
// 403 with the jsonwebtoken message when it does not verify.
func (f *N8n) RequireJWT(secret string) {
	f.mu.Lock()
	defer f.mu.Unlock()
	f.jwtSecret = nil
	if secret != "" {
		f.jwtSecret = []byte(secret)
	}
}

// StreamBodies makes the fake hand scripts each request body unread, as
// it arrives, instead of reading it whole first; Call.Raw, Call.Body and
// Call.Parts stay empty.
func (f *N8n) StreamBodies() {
	f.mu.Lock()
	defer f.mu.Unlock()
	f.streamBodies = true
}

// Hits is how many requests reached the fake.
func (f *N8n) Hits() int { return int(f.hits.Load()) }

// Active is how many requests the fake is still answering.
func (f *N8n) Active() int { return int(f.active.Load()) }

// OpenConns is how many connections to the fake are open (counted from
// the server's ConnState: new, until closed or hijacked).
func (f *N8n) OpenConns() int { return int(f.open.Load()) }

// Calls returns the recorded requests, oldest first.
func (f *N8n) Calls() []*Call {
	f.mu.Lock()
	defer f.mu.Unlock()
	return append([]*Call(nil), f.calls...)
}

// Last returns the most recent request or fails.
func (f *N8n) Last(t testing.TB) *Call {
	t.Helper()
	calls := f.Calls()
	if len(calls) == 0 {
		t.Fatal("n8n received no request")
	}
	return calls[len(calls)-1]
}

// WaitCall waits for the next request to arrive (in arrival order).
func (f *N8n) WaitCall(t testing.TB) *Call {
	t.Helper()
	select {
	case c := <-f.arrived:
		return c
	case <-time.After(5 * time.Second):
		t.Fatal("timed out waiting for a request to reach n8n")
		return nil
	}
}

func (f *N8n) serve(w http.ResponseWriter, r *http.Request) {
	n := f.hits.Add(1)
	f.active.Add(1)
	defer f.active.Add(-1)
	f.mu.Lock()
	stream := f.streamBodies
	f.mu.Unlock()
	c := &Call{
		N: int(n), Proto: r.ProtoMajor, Method: r.Method, Path: r.URL.Path, Header: r.Header.Clone(),
		canceled: make(chan struct{}), finished: make(chan struct{}),
	}
	if !stream {
		if mt, params, _ := mime.ParseMediaType(r.Header.Get("Content-Type")); mt == "multipart/form-data" {
			c.Parts, c.MultipartErr = readParts(r.Body, params["boundary"])
			r.Body = http.NoBody // read; its parts are in c.Parts
		} else {
			c.Raw, _ = io.ReadAll(r.Body)
			r.Body = io.NopCloser(bytes.NewReader(c.Raw)) // a script may read it again
			_ = json.Unmarshal(c.Raw, &c.Body)
			_ = json.Unmarshal(c.Raw, &c.Fields)
		}
	}
	f.mu.Lock()
	script, secret := f.script, f.jwtSecret
	f.mu.Unlock()
	var jwtErr *jwtRefusal
	if secret != nil {
		c.Claims, jwtErr = checkJWT(r, secret)
	}
	f.mu.Lock()
	f.calls = append(f.calls, c)
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

	if r.Method != http.MethodPost || r.URL.Path != WebhookPath {
		// n8n's answer for a webhook that is not registered.
		Write(w, http.StatusNotFound, "application/json; charset=utf-8",
			`{"code":404,"message":"The requested webhook is not registered."}`)
		return
	}
	if jwtErr != nil {
		w.Header().Set("WWW-Authenticate", `Basic realm="Webhook"`)
		Write(w, jwtErr.status, "text/plain", jwtErr.text)
		return
	}
	if c.MultipartErr != nil {
		// The fake's own answer, so that a test sees a body the proxy
		// built wrong.
		Write(w, http.StatusBadRequest, "text/plain", "malformed multipart body: "+c.MultipartErr.Error())
		return
	}
	if script == nil {
		Write(w, http.StatusInternalServerError, "text/plain", "no script")
		return
	}
	script(w, r, c)
}

// checkJWT does what n8n's Webhook node JWT Auth does (research §3.1,
// §7): it reads "Authorization: <anything> <token>" and verifies it.
// A refused token is answered (once the call is recorded) as n8n does.
func checkJWT(r *http.Request, secret []byte) (jwt.MapClaims, *jwtRefusal) {
	_, token, ok := strings.Cut(r.Header.Get("Authorization"), " ")
	if !ok || token == "" {
		return nil, &jwtRefusal{http.StatusUnauthorized, "No token provided"}
	}
	claims := jwt.MapClaims{}
	_, err := jwt.NewParser(jwt.WithValidMethods([]string{"HS256"})).ParseWithClaims(token, claims, func(*jwt.Token) (any, error) { return secret, nil })
	if err != nil {
		return nil, &jwtRefusal{http.StatusForbidden, "invalid signature"}
	}
	return claims, nil
}

// jwtRefusal is n8n's answer to a request whose token JWT Auth refused.
type jwtRefusal struct {
	status int
	text   string
}

// Wait blocks until ch is closed or receives, and reports true; it reports
// false when the request's context ended, the fake is being torn down, or
// WaitLimit passed.
func (f *N8n) Wait(r *http.Request, ch <-chan struct{}) bool {
	select {
	case <-ch:
		return true
	case <-r.Context().Done():
	case <-f.quit:
	case <-time.After(WaitLimit):
	}
	return false
}

// Hang blocks until the proxy abandons the request (or the fake is torn
// down): a workflow that never answers.
func (f *N8n) Hang(r *http.Request) {
	select {
	case <-r.Context().Done():
	case <-f.quit:
	case <-time.After(WaitLimit):
	}
}

func Write(w http.ResponseWriter, status int, contentType, body string) {
	if contentType != "" {
		w.Header().Set("Content-Type", contentType)
	} else {
		w.Header()["Content-Type"] = nil // no sniffing: really unlabelled
	}
	w.WriteHeader(status)
	_, _ = io.WriteString(w, body)
}

func Flush(w http.ResponseWriter) { _ = http.NewResponseController(w).Flush() }

// N8nKeepalive is n8n's heartbeat line.
const N8nKeepalive = `{"type":"keepalive"}` + "\n"

// N8nStreamHead writes the headers n8n's Webhook node writes for a stream
// (status 200 and application/json, whatever follows) and flushes them.
func N8nStreamHead(w http.ResponseWriter) {
	w.Header().Set("Content-Type", "application/json; charset=utf-8")
	w.Header().Set("Cache-Control", "no-cache")
	w.WriteHeader(http.StatusOK)
	Flush(w)
}

// Handler runs an ordinary handler as a script.
func Handler(h http.HandlerFunc) Script {
	return func(w http.ResponseWriter, r *http.Request, _ *Call) { h(w, r) }
}

// Reply answers with a fixed status, content type and body.
func Reply(status int, contentType, body string) Script {
	return func(w http.ResponseWriter, _ *http.Request, _ *Call) {
		Write(w, status, contentType, body)
	}
}

// JSONReply answers 200 with a JSON body.
func JSONReply(body string) Script {
	return Reply(http.StatusOK, "application/json; charset=utf-8", body)
}

// Output answers like "When Last Node Finishes": {"output": text}.
func Output(text string) Script {
	b, _ := json.Marshal(map[string]string{"output": text})
	return JSONReply(string(b))
}

// Stream answers with n8n's streaming NDJSON, one flushed line per
// chunk: a keepalive, begin, the items, end.
func Stream(items ...string) Script {
	return func(w http.ResponseWriter, _ *http.Request, _ *Call) {
		N8nStreamHead(w)
		for _, l := range N8nLines(items...) {
			_, _ = io.WriteString(w, l)
			Flush(w)
		}
	}
}

// N8nLines is a whole n8n stream: keepalive, begin, the items, end.
func N8nLines(items ...string) []string {
	lines := []string{N8nKeepalive, N8nLine("begin", "")}
	for _, it := range items {
		lines = append(lines, N8nLine("item", it))
	}
	return append(lines, N8nLine("end", ""))
}

// Hanging never answers (slow first byte beyond any timeout).
func (f *N8n) Hanging() Script {
	return func(_ http.ResponseWriter, r *http.Request, _ *Call) { f.Hang(r) }
}

// StreamGate paces a scripted stream: the fake writes the first item at
// once and each further chunk only when the test says so, so a test can
// prove that the client saw chunk N before chunk N+1 was written.
type StreamGate struct {
	proceed chan struct{}
	Written atomic.Int32 // items written; counted before each write
}

func NewStreamGate() *StreamGate { return &StreamGate{proceed: make(chan struct{})} }

// Next lets the fake write its next chunk; it fails the test when the
// fake does not take the go-ahead (it gave up or already finished).
func (g *StreamGate) Next(t testing.TB) {
	t.Helper()
	select {
	case g.proceed <- struct{}{}:
	case <-time.After(5 * time.Second):
		t.Fatal("the fake n8n did not wait for the go-ahead")
	}
}

// Gated streams items as n8n does, with keepalive lines in between,
// writing item i+1 (and finally the end line) only after gate.next. With
// gzipped, the body is gzip-compressed, flushed after every chunk, as n8n
// does when the request accepts it.
func (f *N8n) Gated(g *StreamGate, gzipped bool, items ...string) Script {
	return func(w http.ResponseWriter, r *http.Request, _ *Call) {
		var out io.Writer = w
		flush := func() { Flush(w) }
		if gzipped {
			w.Header().Set("Content-Encoding", "gzip")
			zw := gzip.NewWriter(w)
			defer zw.Close()
			out = zw
			flush = func() { _ = zw.Flush(); Flush(w) }
		}
		N8nStreamHead(w)
		write := func(s string) { _, _ = io.WriteString(out, s); flush() }
		write(N8nKeepalive)
		write(N8nLine("begin", ""))
		for i, it := range items {
			if i > 0 {
				if !f.Wait(r, g.proceed) {
					return
				}
				write(N8nKeepalive)
			}
			g.Written.Add(1)
			write(N8nLine("item", it))
		}
		if !f.Wait(r, g.proceed) {
			return
		}
		write(N8nLine("end", ""))
	}
}

// Then streams first as one item, waits for gate (closed by the
// test once the client has seen it), then runs after: the way the stream
// goes wrong, or on.
func (f *N8n) Then(first string, gate <-chan struct{}, after func(w http.ResponseWriter, r *http.Request)) Script {
	return func(w http.ResponseWriter, r *http.Request, _ *Call) {
		N8nStreamHead(w)
		_, _ = io.WriteString(w, N8nLine("begin", "")+N8nLine("item", first))
		Flush(w)
		if !f.Wait(r, gate) {
			return
		}
		after(w, r)
	}
}

// ResetAfter writes a valid chunked 200 head and first as one item,
// waits for gate, then resets the connection (RST): a connection lost in
// the middle of a stream.
func (f *N8n) ResetAfter(first string, gate <-chan struct{}) Script {
	return func(w http.ResponseWriter, r *http.Request, _ *Call) {
		conn, bw, err := http.NewResponseController(w).Hijack()
		if err != nil {
			panic(err)
		}
		defer conn.Close()
		fmt.Fprint(bw, "HTTP/1.1 200 OK\r\nContent-Type: application/json; charset=utf-8\r\nTransfer-Encoding: chunked\r\n\r\n")
		for _, p := range []string{N8nLine("begin", ""), N8nLine("item", first)} {
			fmt.Fprintf(bw, "%x\r\n%s\r\n", len(p), p)
		}
		_ = bw.Flush()
		select {
		case <-gate:
		case <-f.quit:
		case <-time.After(WaitLimit):
		}
		if tc, ok := conn.(*net.TCPConn); ok {
			_ = tc.SetLinger(0) // RST instead of FIN
		}
	}
}

// ClosedURL is a webhook URL on a port nothing listens on.
func ClosedURL(t testing.TB) string {
	t.Helper()
	return "http://" + ClosedPort(t) + WebhookPath
}

// ClosedPort is the address of a port nothing listens on.
func ClosedPort(t testing.TB) string {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	addr := ln.Addr().String()
	_ = ln.Close()
	return addr
}

// AwaitSignal waits for ch or fails the test after 5 s.
func AwaitSignal(t testing.TB, ch <-chan struct{}, what string) {
	t.Helper()
	select {
	case <-ch:
	case <-time.After(5 * time.Second):
		t.Fatalf("timed out waiting for %s", what)
	}
}
