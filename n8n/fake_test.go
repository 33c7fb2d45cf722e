package n8n

import (
	"bufio"
	"compress/gzip"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/http/httptest"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/andybalholm/brotli"
	"github.com/chatproxy/caddy-chatproxy/internal/testkit"
)

// The webhook path is a secret: tests check it never shows in errors.
const secretPath = testkit.WebhookPath

const testSecret = "0123456789abcdef0123456789abcdef-session"

// fakeN8N is the shared fake n8n (testkit.N8n) running one handler, under
// the names these tests use.
type fakeN8N struct {
	*testkit.N8n
	srv     *httptest.Server
	hits    counter // requests
	newConn counter // connections opened
	closed  counter // connections closed
}

// counter reads one of the fake's counts.
type counter func() int

func (c counter) Load() int32 { return int32(c()) }

type recorded struct {
	header http.Header
	body   []byte
	proto  int
}

func newFake(t *testing.T, h http.HandlerFunc) *fakeN8N {
	t.Helper()
	return wrapFake(testkit.NewN8n(t, testkit.Handler(h)))
}

// newTLSFake is newFake over TLS with HTTP/2 enabled.
func newTLSFake(t *testing.T, h http.HandlerFunc) *fakeN8N {
	t.Helper()
	return wrapFake(testkit.NewN8nTLS(t, testkit.Handler(h)))
}

func wrapFake(f *testkit.N8n) *fakeN8N {
	return &fakeN8N{N8n: f, srv: f.Server(), hits: f.Hits, newConn: f.Conns, closed: f.Closed}
}

func (f *fakeN8N) lastRequest(t *testing.T) recorded {
	t.Helper()
	c := f.Last(t)
	return recorded{header: c.Header, body: c.Raw, proto: c.Proto}
}

func (f *fakeN8N) url() string { return f.URL() }

// testConfig is a fast configuration for tests against f.
func testConfig(f *fakeN8N) Config {
	return Config{
		WebhookURL:        f.url(),
		SessionSecret:     testSecret,
		UpstreamTimeout:   5 * time.Second,
		StreamIdleTimeout: 5 * time.Second,
		MaxStreamDuration: 10 * time.Second,
		RetryBackoff:      time.Millisecond,
		RetryMaxBackoff:   5 * time.Millisecond,
		Breaker:           BreakerConfig{FailureThreshold: 100},
	}
}

func newClient(t *testing.T, cfg Config) *Client {
	t.Helper()
	c, err := New(cfg)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = c.Close() })
	return c
}

func testRequest() *Request {
	return &Request{
		SessionID:    "sess-123",
		Message:      "Hello, bot",
		Metadata:     json.RawMessage(`{"page_title":"Pricing"}`),
		OriginDomain: "shop.example.com",
		PageURL:      "https://shop.example.com/pricing",
		ClientIP:     "203.0.113.7",
		UserAgent:    "Mozilla/5.0 test",
		MessageCount: 4,
	}
}

// chunkLine is one n8n streaming line, as n8n writes it.
func chunkLine(typ, content string) string { return testkit.N8nLine(typ, content) }

// ndjson is a whole n8n stream: begin, the items, end.
func ndjson(items ...string) string {
	var b strings.Builder
	b.WriteString(chunkLine("begin", ""))
	for _, it := range items {
		b.WriteString(chunkLine("item", it))
	}
	b.WriteString(chunkLine("end", ""))
	return b.String()
}

// streamHeaders are the headers n8n's Chat Trigger writes for a stream.
func streamHeaders(w http.ResponseWriter) {
	w.Header().Set("Content-Type", "application/json; charset=utf-8")
	w.Header().Set("Cache-Control", "no-cache, no-transform")
	w.WriteHeader(http.StatusOK)
	flush(w)
}

func flush(w http.ResponseWriter) { _ = http.NewResponseController(w).Flush() }

// startStream answers 200 with contentType, compressed with enc ("" for
// none). send writes s and flushes it through the compressor and the
// connection; end finishes the compressed stream.
func startStream(w http.ResponseWriter, contentType, enc string) (send func(s string), end func()) {
	w.Header().Set("Content-Type", contentType)
	var out io.Writer = w
	var cw flushWriteCloser
	if enc != "" {
		w.Header().Set("Content-Encoding", enc)
		cw = newCompressor(enc, w)
		out = cw
	}
	w.WriteHeader(200)
	send = func(s string) {
		_, _ = io.WriteString(out, s)
		if cw != nil {
			_ = cw.Flush()
		}
		flush(w)
	}
	end = func() {
		if cw != nil {
			_ = cw.Close()
		}
	}
	return send, end
}

// reply answers with a fixed body.
func reply(status int, contentType, body string) http.HandlerFunc {
	return func(w http.ResponseWriter, _ *http.Request) {
		if contentType != "" {
			w.Header().Set("Content-Type", contentType)
		} else {
			w.Header()["Content-Type"] = nil // no sniffing: really unlabelled
		}
		w.WriteHeader(status)
		_, _ = io.WriteString(w, body)
	}
}

// compressed answers with body compressed by enc ("gzip" or "br"),
// flushing the compressor after every part so each part is decodable on
// arrival.
func compressed(enc, contentType string, parts ...string) http.HandlerFunc {
	return func(w http.ResponseWriter, _ *http.Request) {
		w.Header().Set("Content-Type", contentType)
		w.Header().Set("Content-Encoding", enc)
		w.WriteHeader(http.StatusOK)
		cw := newCompressor(enc, w)
		for _, p := range parts {
			_, _ = io.WriteString(cw, p)
			_ = cw.Flush()
			flush(w)
		}
		_ = cw.Close()
	}
}

type flushWriteCloser interface {
	io.WriteCloser
	Flush() error
}

func newCompressor(enc string, w io.Writer) flushWriteCloser {
	if enc == "br" {
		return brotli.NewWriter(w)
	}
	return gzip.NewWriter(w)
}

// hijackAfter writes a valid chunked 200 response head and the given raw
// body parts, then kills the connection: a reset in the middle of a
// stream.
func hijackAfter(parts ...string) http.HandlerFunc {
	return func(w http.ResponseWriter, _ *http.Request) {
		conn, bw, err := http.NewResponseController(w).Hijack()
		if err != nil {
			panic(err)
		}
		defer conn.Close()
		fmt.Fprint(bw, "HTTP/1.1 200 OK\r\nContent-Type: application/json; charset=utf-8\r\nTransfer-Encoding: chunked\r\n\r\n")
		for _, p := range parts {
			fmt.Fprintf(bw, "%x\r\n%s\r\n", len(p), p)
		}
		_ = bw.Flush()
		if tc, ok := conn.(*net.TCPConn); ok {
			_ = tc.SetLinger(0) // RST instead of FIN
		}
	}
}

// dropConnection closes the connection without any response.
func dropConnection(w http.ResponseWriter, _ *http.Request) {
	conn, _, err := http.NewResponseController(w).Hijack()
	if err != nil {
		panic(err)
	}
	_ = conn.Close()
}

// asError returns err as *Error or fails.
func asError(t *testing.T, err error) *Error {
	t.Helper()
	var e *Error
	if !errors.As(err, &e) {
		t.Fatalf("error %v (%T) is not an *Error", err, err)
	}
	return e
}

// readAll drains a reply for a test, failing on error.
func readAll(t *testing.T, r *Reply) string {
	t.Helper()
	s, err := r.ReadAll()
	if err != nil {
		t.Fatalf("reading reply: %v (after %q)", err, s)
	}
	return s
}

// waitFor polls cond until it holds or fails the test after 5 s. Used only
// for state that changes by the clock (the breaker's open timeout) or
// arrives asynchronously (server-side connection state).
func waitFor(t *testing.T, what string, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(5 * time.Second)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatalf("timed out waiting for %s", what)
		}
		time.Sleep(2 * time.Millisecond)
	}
}

// decodeBody runs the parser on a body without HTTP, as Reply.open does.
func decodeBody(body []byte, contentType string, maxLine int, maxReply int64) (texts []string, format Format, err error) {
	return decodeWith(newReplyReader(strings.NewReader(string(body)), maxReply), contentType, maxLine)
}

// decodeWith reads a whole reply from br as Reply does.
func decodeWith(br *bufio.Reader, contentType string, maxLine int) (texts []string, format Format, err error) {
	dec, format, err := sniff(br, contentType, maxLine)
	if err != nil {
		return nil, "", err
	}
	for {
		t, err := dec.next()
		if err == io.EOF {
			return texts, format, nil
		}
		if err != nil {
			return texts, format, err
		}
		texts = append(texts, t)
	}
}

// signalled returns a channel closed by the returned function (once).
func signalled() (chan struct{}, func()) {
	ch := make(chan struct{})
	var once sync.Once
	return ch, func() { once.Do(func() { close(ch) }) }
}

// within waits for ch or fails after 5 s.
func within(t *testing.T, ch <-chan struct{}, what string) {
	t.Helper()
	select {
	case <-ch:
	case <-time.After(5 * time.Second):
		t.Fatalf("timed out waiting for %s", what)
	}
}
