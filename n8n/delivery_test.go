package n8n

import (
	"context"
	"crypto/tls"
	"crypto/x509"
	"io"
	"net"
	"net/http"
	"net/http/httptest"
	"sync"
	"sync/atomic"
	"testing"
	"time"
)

// TestNoResendAfterDelivery: once n8n may have received the message, it
// is never sent again, whatever comes back: the workflow (and the model it
// calls) runs once per message.
func TestNoResendAfterDelivery(t *testing.T) {
	tests := []struct {
		name    string
		handler http.HandlerFunc
		reason  Reason
		status  int
	}{
		{"read then closed", dropConnection, ReasonConnect, http.StatusServiceUnavailable},
		{"read then reset", func(w http.ResponseWriter, _ *http.Request) {
			conn, _, err := http.NewResponseController(w).Hijack()
			if err != nil {
				panic(err)
			}
			if tc, ok := conn.(*net.TCPConn); ok {
				_ = tc.SetLinger(0) // RST instead of FIN
			}
			_ = conn.Close()
		}, ReasonConnect, http.StatusServiceUnavailable},
		{"502", reply(502, "text/html", "<html>502 Bad Gateway</html>"), ReasonStatus, http.StatusBadGateway},
		{"503", reply(503, "text/plain", "busy"), ReasonStatus, http.StatusServiceUnavailable},
		{"504 while the workflow runs on", reply(504, "text/plain", "gateway timeout"), ReasonStatus, http.StatusGatewayTimeout},
		{"500", reply(500, "application/json", `{"message":"Error in workflow"}`), ReasonStatus, http.StatusBadGateway},
		{"reset after the response head", hijackAfter(chunkLine("begin", "")), ReasonRead, http.StatusBadGateway},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			f := newFake(t, tc.handler)
			cfg := testConfig(f)
			cfg.MaxRetries = 5
			c := newClient(t, cfg)
			const messages = 3
			for i := range messages {
				_, err := c.Send(t.Context(), testRequest())
				e := asError(t, err)
				if e.Reason != tc.reason || e.Status != tc.status {
					t.Fatalf("message %d: %v (status %d), want %s %d", i, e, e.Status, tc.reason, tc.status)
				}
			}
			if h := f.hits.Load(); h != messages {
				t.Fatalf("n8n received %d requests for %d messages, want exactly one each", h, messages)
			}
		})
	}
}

// TestRetryBeforeDelivery: when the request provably never reached n8n
// (connection refused, TLS handshake failed) it is retried, and the retry
// delivers it once.
func TestRetryBeforeDelivery(t *testing.T) {
	t.Run("closed port then listening", func(t *testing.T) {
		ln, err := net.Listen("tcp", "127.0.0.1:0")
		if err != nil {
			t.Fatal(err)
		}
		addr := ln.Addr().String()
		ln.Close() // nothing listens: the first dial is refused

		var hits atomic.Int32
		srv := httptest.NewUnstartedServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
			hits.Add(1)
			_, _ = io.ReadAll(r.Body)
			okHandler(w, r)
		}))
		t.Cleanup(srv.Close)
		c := newClient(t, Config{
			WebhookURL: "http://" + addr + secretPath, SessionSecret: testSecret,
			MaxRetries: 2, RetryBackoff: time.Millisecond, RetryMaxBackoff: 2 * time.Millisecond,
		})
		var dials atomic.Int32
		var once sync.Once
		dial := c.transport.DialContext
		c.transport.DialContext = func(ctx context.Context, network, a string) (net.Conn, error) {
			dials.Add(1)
			conn, err := dial(ctx, network, a)
			// n8n starts listening right after the first refusal.
			once.Do(func() {
				l, lerr := net.Listen("tcp", addr)
				if lerr != nil {
					t.Errorf("listening on %s again: %v", addr, lerr)
					return
				}
				srv.Listener = l
				srv.Start()
			})
			return conn, err
		}
		sendOK(t, c, testRequest())
		if d, h := dials.Load(), hits.Load(); d != 2 || h != 1 {
			t.Fatalf("%d dials and %d requests, want 2 dials (one refused) and 1 request", d, h)
		}
	})

	t.Run("TLS handshake cut", func(t *testing.T) {
		var hits atomic.Int32
		srv := httptest.NewUnstartedServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
			hits.Add(1)
			okHandler(w, r)
		}))
		srv.Listener = &cutFirstListener{Listener: srv.Listener}
		srv.StartTLS()
		t.Cleanup(srv.Close)
		pool := x509.NewCertPool()
		pool.AddCert(srv.Certificate())
		c := newClient(t, Config{
			WebhookURL: srv.URL + secretPath, SessionSecret: testSecret, TLSConfig: &tls.Config{RootCAs: pool},
			MaxRetries: 2, RetryBackoff: time.Millisecond, RetryMaxBackoff: 2 * time.Millisecond,
		})
		sendOK(t, c, testRequest())
		if h := hits.Load(); h != 1 {
			t.Fatalf("%d requests, want 1", h)
		}
	})
}

// cutFirstListener closes the first connection it accepts without reading
// from it.
type cutFirstListener struct {
	net.Listener
	cut atomic.Bool
}

func (l *cutFirstListener) Accept() (net.Conn, error) {
	for {
		conn, err := l.Listener.Accept()
		if err != nil || l.cut.Swap(true) {
			return conn, err
		}
		_ = conn.Close()
	}
}
