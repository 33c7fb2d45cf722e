package testkit

import (
	"fmt"
	"io"
	"net/http"
	"net/http/httptest"
	"strings"

	"github.com/caddyserver/caddy/v2"
	"github.com/caddyserver/caddy/v2/modules/caddyhttp"
)

// Request is one request for Serve.
type Request struct {
	Method, Path, Body string
	// ClientIP is Caddy's client_ip var, as the server sets it.
	ClientIP string
	// Headers are set on the request; a "" value deletes that header. A
	// body is sent as JSON unless Headers say otherwise.
	Headers map[string]string
}

// Serve sends rq through h as Caddy's server would (a prepared request with
// a replacer and the client_ip var), with a recorder, on the host
// api.example.net. A request h passes on is answered by the next handler
// with the status passedOn. It reports a ServeHTTP error instead of failing
// the test, so goroutines may call it.
func Serve(h caddyhttp.MiddlewareHandler, rq Request, passedOn int) (*httptest.ResponseRecorder, error) {
	var body io.Reader
	if rq.Body != "" {
		body = strings.NewReader(rq.Body)
	}
	r := httptest.NewRequest(rq.Method, "http://api.example.net"+rq.Path, body)
	if rq.Body != "" {
		r.Header.Set("Content-Type", "application/json")
	}
	for k, v := range rq.Headers {
		if v == "" {
			r.Header.Del(k)
		} else {
			r.Header.Set(k, v)
		}
	}
	rec := httptest.NewRecorder()
	r = caddyhttp.PrepareRequest(r, caddy.NewReplacer(), rec, nil)
	caddyhttp.SetVar(r.Context(), caddyhttp.ClientIPVarKey, rq.ClientIP)
	next := caddyhttp.HandlerFunc(func(w http.ResponseWriter, _ *http.Request) error {
		w.WriteHeader(passedOn)
		return nil
	})
	if err := h.ServeHTTP(rec, r, next); err != nil {
		return rec, fmt.Errorf("ServeHTTP returned %v", err)
	}
	return rec, nil
}
