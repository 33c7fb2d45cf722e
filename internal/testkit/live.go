package testkit

import (
	"context"
	"io"
	"net/http"
	"net/http/httptest"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"github.com/caddyserver/caddy/v2"
	"github.com/caddyserver/caddy/v2/modules/caddyhttp"
	"github.com/caddyserver/caddy/v2/modules/caddyhttp/encode"
)

// LiveOptions configure NewLive.
type LiveOptions struct {
	// ClientIP is Caddy's client_ip var on every request.
	ClientIP string
	// UserAgent is sent on every request unless its headers say otherwise.
	UserAgent string
	// PassedOn is the status of the next handler, for requests h passes on.
	PassedOn int
	// Encode wraps h in Caddy's `encode gzip zstd`.
	Encode bool
}

// Live is a real HTTP server that sends each request through a Caddy
// handler as Caddy's server would (a prepared request, the client_ip var,
// optionally Caddy's encode), for tests that need a live connection:
// streams, disconnects, requests still running.
type Live struct {
	Server *httptest.Server
	// Client talks to the server without transparent decompression, so
	// tests see what Caddy sent.
	Client *http.Client
	// ReqCtxs receives each request's context, in arrival order (up to 64
	// unread).
	ReqCtxs chan context.Context

	userAgent string
	inflight  atomic.Int32
}

// NewLive starts a live server for h, closed at the end of the test.
func NewLive(t testing.TB, h caddyhttp.MiddlewareHandler, o LiveOptions) *Live {
	t.Helper()
	l := &Live{ReqCtxs: make(chan context.Context, 64), userAgent: o.UserAgent}
	var enc *encode.Encode
	if o.Encode {
		enc = NewEncode(t)
	}
	next := caddyhttp.HandlerFunc(func(w http.ResponseWriter, _ *http.Request) error {
		w.WriteHeader(o.PassedOn)
		return nil
	})
	srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		l.inflight.Add(1)
		defer l.inflight.Add(-1)
		select {
		case l.ReqCtxs <- r.Context():
		default:
		}
		r = caddyhttp.PrepareRequest(r, caddy.NewReplacer(), w, nil)
		caddyhttp.SetVar(r.Context(), caddyhttp.ClientIPVarKey, o.ClientIP)
		var ch caddyhttp.Handler = caddyhttp.HandlerFunc(func(w http.ResponseWriter, r *http.Request) error {
			return h.ServeHTTP(w, r, next)
		})
		if enc != nil {
			inner := ch
			ch = caddyhttp.HandlerFunc(func(w http.ResponseWriter, r *http.Request) error {
				return enc.ServeHTTP(w, r, inner)
			})
		}
		if err := ch.ServeHTTP(w, r); err != nil {
			t.Errorf("ServeHTTP %s %s returned %v", r.Method, r.URL.Path, err)
		}
	}))
	l.Server = srv
	l.Client = &http.Client{Transport: &http.Transport{DisableCompression: true}}
	t.Cleanup(srv.Close)
	t.Cleanup(l.Client.CloseIdleConnections)
	return l
}

// InFlight is how many requests the server is handling.
func (l *Live) InFlight() int { return int(l.inflight.Load()) }

// Do sends a request with a 15 s timeout; the response body is closed at
// the end of the test.
func (l *Live) Do(t testing.TB, method, path, body string, headers map[string]string) *http.Response {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 15*time.Second)
	t.Cleanup(cancel)
	return l.DoCtx(t, ctx, method, path, body, headers)
}

// DoCtx sends a request: a body is sent as JSON, and a "" header value
// deletes that header.
func (l *Live) DoCtx(t testing.TB, ctx context.Context, method, path, body string, headers map[string]string) *http.Response {
	t.Helper()
	var rd io.Reader
	if body != "" {
		rd = strings.NewReader(body)
	}
	r, err := http.NewRequestWithContext(ctx, method, l.Server.URL+path, rd)
	if err != nil {
		t.Fatal(err)
	}
	if body != "" {
		r.Header.Set("Content-Type", "application/json")
	}
	if l.userAgent != "" {
		r.Header.Set("User-Agent", l.userAgent)
	}
	for k, v := range headers {
		if v == "" {
			r.Header.Del(k)
		} else {
			r.Header.Set(k, v)
		}
	}
	resp, err := l.Client.Do(r)
	if err != nil {
		t.Fatalf("%s %s: %v", method, path, err)
	}
	t.Cleanup(func() { _ = resp.Body.Close() })
	return resp
}

// WaitIdle waits until the server has finished every request, so what a
// handler stores after the client saw the end is in the store.
func (l *Live) WaitIdle(t testing.TB) {
	t.Helper()
	deadline := time.Now().Add(5 * time.Second)
	for l.inflight.Load() != 0 {
		if time.Now().After(deadline) {
			t.Fatal("timed out waiting for the proxy to finish its requests")
		}
		time.Sleep(2 * time.Millisecond)
	}
}
