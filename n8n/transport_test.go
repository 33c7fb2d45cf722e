package n8n

import (
	"context"
	"crypto/tls"
	"crypto/x509"
	"io"
	"net"
	"net/http"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"
)

// TestRetryConnectionRefused counts dial attempts to a closed port.
func TestRetryConnectionRefused(t *testing.T) {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	addr := ln.Addr().String()
	ln.Close() // nothing listens: connection refused

	c := newClient(t, Config{
		WebhookURL: "http://" + addr + secretPath, SessionSecret: testSecret,
		MaxRetries: 3, RetryBackoff: time.Millisecond, RetryMaxBackoff: 2 * time.Millisecond,
	})
	var dials atomic.Int32
	dial := c.transport.DialContext
	c.transport.DialContext = func(ctx context.Context, network, a string) (net.Conn, error) {
		dials.Add(1)
		return dial(ctx, network, a)
	}
	_, err = c.Send(t.Context(), testRequest())
	e := asError(t, err)
	if e.Reason != ReasonConnect || e.Status != http.StatusServiceUnavailable || e.Code != CodeUnavailable || e.RetryAfterSeconds() < 1 {
		t.Fatalf("got %v (retry after %d)", e, e.RetryAfterSeconds())
	}
	if d := dials.Load(); d != 4 {
		t.Errorf("%d dials, want 1 + 3 retries", d)
	}
	if strings.Contains(e.Error(), secretPath) || strings.Contains(e.Error(), "webhook") {
		t.Errorf("error leaks the webhook URL: %v", e)
	}
}

func TestBackoff(t *testing.T) {
	c := newClient(t, Config{WebhookURL: "http://n8n/x", Auth: Auth{Mode: AuthNone},
		RetryBackoff: 100 * time.Millisecond, RetryMaxBackoff: time.Second})
	for attempt, want := range []time.Duration{100, 200, 400, 800, 1000, 1000} {
		want *= time.Millisecond
		if attempt > 3 {
			want = time.Second
		}
		for range 50 {
			d := c.backoff(attempt)
			if d < want/2 || d > want {
				t.Fatalf("attempt %d: backoff %v outside [%v, %v]", attempt, d, want/2, want)
			}
		}
	}
}

// TestCircuitBreaker: the circuit opens after the configured failures,
// then rejects at once without calling n8n, lets one probe through when
// half-open, and closes after a good probe (or reopens after a bad one).
func TestCircuitBreaker(t *testing.T) {
	var healthy atomic.Bool
	f := newFake(t, func(w http.ResponseWriter, r *http.Request) {
		if healthy.Load() {
			okHandler(w, r)
			return
		}
		w.WriteHeader(http.StatusServiceUnavailable) // n8n overloaded
	})
	var mu sync.Mutex
	var transitions []string
	cfg := testConfig(f)
	cfg.MaxRetries = -1
	cfg.Breaker = BreakerConfig{FailureThreshold: 3, OpenTimeout: 100 * time.Millisecond}
	cfg.OnStateChange = func(from, to BreakerState) {
		mu.Lock()
		transitions = append(transitions, string(from)+">"+string(to))
		mu.Unlock()
	}
	c := newClient(t, cfg)

	for i := range 3 {
		if c.State() != StateClosed {
			t.Fatalf("open after %d failures", i)
		}
		_, err := c.Send(t.Context(), testRequest())
		if e := asError(t, err); e.Reason != ReasonStatus {
			t.Fatalf("failure %d: %v", i, e)
		}
	}
	if c.State() != StateOpen {
		t.Fatalf("state %s after 3 failures", c.State())
	}
	start := time.Now()
	_, err := c.Send(t.Context(), testRequest())
	e := asError(t, err)
	if e.Reason != ReasonCircuitOpen || e.Status != http.StatusServiceUnavailable || e.Code != CodeUnavailable {
		t.Fatalf("open circuit: %v", e)
	}
	if s := e.RetryAfterSeconds(); s != 1 { // 100 ms open timeout, rounded up
		t.Errorf("Retry-After %d", s)
	}
	if time.Since(start) > 100*time.Millisecond {
		t.Errorf("rejection took %v", time.Since(start))
	}
	if h := f.hits.Load(); h != 3 {
		t.Errorf("open circuit reached n8n: %d hits", h)
	}

	// Half-open: a failing probe opens the circuit again.
	waitFor(t, "half-open", func() bool { return c.State() == StateHalfOpen })
	if _, err := c.Send(t.Context(), testRequest()); err == nil {
		t.Fatal("probe succeeded against a failing n8n")
	}
	if c.State() != StateOpen || f.hits.Load() != 4 {
		t.Fatalf("after a bad probe: %s, %d hits", c.State(), f.hits.Load())
	}

	// Half-open again: while the probe is in flight, others are rejected;
	// a good probe closes the circuit once its reply has been read.
	healthy.Store(true)
	waitFor(t, "half-open", func() bool { return c.State() == StateHalfOpen })
	probe, err := c.Send(t.Context(), testRequest())
	if err != nil {
		t.Fatalf("probe: %v", err)
	}
	if _, err := c.Send(t.Context(), testRequest()); asError(t, err).Reason != ReasonCircuitOpen {
		t.Errorf("second request during the probe: %v", err)
	}
	if c.State() != StateHalfOpen {
		t.Errorf("state %s before the probe's reply ended", c.State())
	}
	readAll(t, probe)
	probe.Close()
	if c.State() != StateClosed {
		t.Fatalf("state %s after a good probe", c.State())
	}
	sendOK(t, c, testRequest())

	mu.Lock()
	defer mu.Unlock()
	want := "closed>open,open>half-open,half-open>open,open>half-open,half-open>closed"
	if got := strings.Join(transitions, ","); got != want {
		t.Errorf("transitions %s, want %s", got, want)
	}
}

// TestBreakerCountsMidStreamFailures: a stream whose connection breaks
// after its first chunk is a failure, counted when the stream ends (not
// when the headers arrived); workflow errors, 4xx answers and
// cancellations are not failures.
func TestBreakerCountsMidStreamFailures(t *testing.T) {
	tests := []struct {
		name    string
		handler http.HandlerFunc
		cancel  bool
		want    BreakerState
	}{
		{"reset mid-stream", hijackAfter(chunkLine("item", "a")), false, StateOpen},
		{"error chunk mid-stream: n8n is up", reply(200, "application/json", ndjson("a")+chunkLine("error", "boom")), false, StateClosed},
		{"clean stream", reply(200, "application/json", ndjson("a", "b")), false, StateClosed},
		{"cancelled mid-stream", func(w http.ResponseWriter, r *http.Request) {
			streamHeaders(w)
			_, _ = io.WriteString(w, chunkLine("item", "a"))
			flush(w)
			<-r.Context().Done()
		}, true, StateClosed},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			f := newFake(t, tc.handler)
			cfg := testConfig(f)
			cfg.Breaker.FailureThreshold = 1
			c := newClient(t, cfg)
			ctx, cancel := context.WithCancel(t.Context())
			defer cancel()
			r, err := c.Send(ctx, testRequest())
			if err != nil {
				t.Fatal(err)
			}
			if c.State() != StateClosed {
				t.Fatalf("outcome counted before the stream ended: %s", c.State())
			}
			if tc.cancel {
				cancel()
			}
			_, _ = r.ReadAll()
			r.Close()
			if c.State() != tc.want {
				t.Errorf("state %s, want %s", c.State(), tc.want)
			}
		})
	}

	t.Run("4xx is not a failure", func(t *testing.T) {
		f := newFake(t, reply(404, "", ""))
		cfg := testConfig(f)
		cfg.Breaker.FailureThreshold = 1
		c := newClient(t, cfg)
		_, _ = c.Send(t.Context(), testRequest())
		if c.State() != StateClosed {
			t.Errorf("state %s", c.State())
		}
	})
	t.Run("timeout is a failure", func(t *testing.T) {
		f := newFake(t, func(_ http.ResponseWriter, r *http.Request) { <-r.Context().Done() })
		cfg := testConfig(f)
		cfg.Breaker.FailureThreshold = 1
		cfg.UpstreamTimeout = 30 * time.Millisecond
		c := newClient(t, cfg)
		_, _ = c.Send(t.Context(), testRequest())
		if c.State() != StateOpen {
			t.Errorf("state %s", c.State())
		}
	})
}

// TestPooledKeepAlive: sequential requests reuse one connection; Close
// closes the idle ones and refuses new requests.
func TestPooledKeepAlive(t *testing.T) {
	f := newFake(t, func(w http.ResponseWriter, r *http.Request) {
		streamHeaders(w)
		_, _ = io.WriteString(w, ndjson("pooled"))
	})
	c := newClient(t, testConfig(f))
	for range 3 {
		sendOK(t, c, testRequest())
	}
	if n := f.newConn.Load(); n != 1 {
		t.Errorf("%d connections for 3 sequential requests", n)
	}
	_ = c.Close()
	waitFor(t, "the idle connection to close", func() bool { return f.closed.Load() == 1 })
	_, err := c.Send(t.Context(), testRequest())
	if e := asError(t, err); e.Reason != ReasonShutdown || e.Status != 503 {
		t.Errorf("after Close: %v", e)
	}
}

// TestHTTP2 streams over HTTP/2 when the TLS server offers it.
func TestHTTP2(t *testing.T) {
	proceed := make(chan struct{})
	f := newTLSFake(t, func(w http.ResponseWriter, r *http.Request) {
		streamHeaders(w)
		_, _ = io.WriteString(w, chunkLine("item", "h2 "))
		flush(w)
		select {
		case <-proceed:
		case <-r.Context().Done():
			return
		}
		_, _ = io.WriteString(w, chunkLine("item", "stream"))
	})
	pool := x509.NewCertPool()
	pool.AddCert(f.srv.Certificate())
	cfg := testConfig(f)
	cfg.TLSConfig = &tls.Config{RootCAs: pool}
	c := newClient(t, cfg)
	r, err := c.Send(t.Context(), testRequest())
	if err != nil {
		t.Fatal(err)
	}
	defer r.Close()
	if s, _ := r.Next(); s != "h2 " {
		t.Fatalf("first chunk %q", s)
	}
	close(proceed)
	if s := readAll(t, r); s != "stream" {
		t.Fatalf("rest %q", s)
	}
	if p := f.lastRequest(t).proto; p != 2 {
		t.Errorf("HTTP/%d, want HTTP/2", p)
	}
}
