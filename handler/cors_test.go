package handler

import (
	"crypto/tls"
	"net/http"
	"net/http/httptest"
	"testing"

	"github.com/caddyserver/caddy/v2"
	"github.com/caddyserver/caddy/v2/modules/caddyhttp"
	"go.uber.org/zap"
	"go.uber.org/zap/zapcore"
	"go.uber.org/zap/zaptest/observer"

	"github.com/chatproxy/caddy-chatproxy/guard"
)

// corsHandler is a handler with the given allowed_origins whose warnings
// are observed; the origin check runs before any route needs a store.
func corsHandler(t *testing.T, allowed ...string) (*Handler, *observer.ObservedLogs) {
	t.Helper()
	origins, err := guard.ParseOrigins(allowed)
	if err != nil {
		t.Fatal(err)
	}
	core, logs := observer.New(zapcore.WarnLevel)
	return New(Config{Prefix: "/api/v1", Origins: origins, Logger: zap.New(core)}), logs
}

// preflightFrom sends an OPTIONS preflight with an Origin, as a browser
// does before a cross-origin POST, to a request addressed to host over
// TLS or not; trustedProto, when set, is X-Forwarded-Proto from a trusted
// proxy.
func preflightFrom(t *testing.T, h *Handler, origin, host string, overTLS bool, trustedProto string) *httptest.ResponseRecorder {
	t.Helper()
	r := httptest.NewRequest(http.MethodOptions, "http://"+host+"/api/v1/session/create", nil)
	r.Host = host
	if overTLS {
		r.TLS = &tls.ConnectionState{}
	}
	r.Header.Set("Origin", origin)
	r.Header.Set("Access-Control-Request-Method", "POST")
	w := httptest.NewRecorder()
	r = caddyhttp.PrepareRequest(r, caddy.NewReplacer(), w, nil)
	if trustedProto != "" {
		caddyhttp.SetVar(r.Context(), caddyhttp.TrustedProxyVarKey, true)
		r.Header.Set("X-Forwarded-Proto", trustedProto)
	}
	next := caddyhttp.HandlerFunc(func(http.ResponseWriter, *http.Request) error {
		t.Fatal("the preflight was passed on")
		return nil
	})
	if err := h.ServeHTTP(w, r, next); err != nil {
		t.Fatal(err)
	}
	return w
}

// A page served by the same site needs no allowed_origins: its own origin
// (the request's scheme and Host) is always allowed, and a look-alike is
// refused with one warning per handler, so a newcomer learns why.
func TestSiteOwnOriginAllowedWithoutAllowedOrigins(t *testing.T) {
	h, logs := corsHandler(t)
	for _, tc := range []struct {
		name, origin, host string
		tls                bool
		proto              string
		want               int
	}{
		{"own origin over TLS", "https://shop.example.com", "shop.example.com", true, "", http.StatusNoContent},
		{"own origin, plain HTTP with a port", "http://localhost:8080", "localhost:8080", false, "", http.StatusNoContent},
		{"own origin, default port in the Host", "https://shop.example.com", "shop.example.com:443", true, "", http.StatusNoContent},
		{"own origin behind a trusted TLS proxy", "https://shop.example.com", "shop.example.com", false, "https", http.StatusNoContent},
		{"look-alike: other port", "http://localhost:8081", "localhost:8080", false, "", http.StatusForbidden},
		{"look-alike: other scheme", "http://shop.example.com", "shop.example.com", true, "", http.StatusForbidden},
		{"look-alike: https page, plain request, no trusted proxy", "https://shop.example.com", "shop.example.com", false, "", http.StatusForbidden},
		{"other site", "https://evil.example.net", "shop.example.com", true, "", http.StatusForbidden},
	} {
		t.Run(tc.name, func(t *testing.T) {
			w := preflightFrom(t, h, tc.origin, tc.host, tc.tls, tc.proto)
			if w.Code != tc.want {
				t.Fatalf("status %d, want %d: %s", w.Code, tc.want, w.Body)
			}
			if tc.want == http.StatusNoContent && w.Header().Get("Access-Control-Allow-Origin") != tc.origin {
				t.Errorf("Access-Control-Allow-Origin %q", w.Header().Get("Access-Control-Allow-Origin"))
			}
		})
	}
	warned := logs.FilterMessageSnippet("allowed_origins is not set").All()
	if len(warned) != 1 || logs.Len() != 1 {
		t.Fatalf("%d warnings (%d log lines), want exactly one: %+v", len(warned), logs.Len(), logs.All())
	}
	if got := warned[0].ContextMap()["origin"]; got != "http://localhost:8081" {
		t.Errorf("the warning names origin %v, want the first refused one", got)
	}

	// Each handler (a config load) warns once of its own.
	h2, logs2 := corsHandler(t)
	preflightFrom(t, h2, "https://evil.example.net", "shop.example.com", true, "")
	if logs2.Len() != 1 {
		t.Errorf("a second handler logged %d warnings, want 1", logs2.Len())
	}
}

// With allowed_origins set, the site's own origin is still allowed, and a
// refusal is not the newcomer's mistake: nothing is logged.
func TestSiteOwnOriginAllowedBesideAllowedOrigins(t *testing.T) {
	h, logs := corsHandler(t, "https://partner.example.org")
	for origin, want := range map[string]int{
		"https://shop.example.com":    http.StatusNoContent,
		"https://partner.example.org": http.StatusNoContent,
		"https://evil.example.net":    http.StatusForbidden,
	} {
		if w := preflightFrom(t, h, origin, "shop.example.com", true, ""); w.Code != want {
			t.Errorf("%s: status %d, want %d", origin, w.Code, want)
		}
	}
	if logs.Len() != 0 {
		t.Errorf("logged %+v", logs.All())
	}
}
