package n8n

import (
	"io"
	"net"
	"net/http"
	"net/http/httptest"
	"sync"
	"sync/atomic"
	"testing"
	"time"
)

// workflowFailures are answers from an n8n that is up but whose workflow
// failed or is misconfigured: none says anything about n8n's health.
var workflowFailures = []struct {
	name    string
	handler http.HandlerFunc
}{
	{"500 error in workflow", reply(500, "application/json", `{"message":"Error in workflow"}`)},
	{"error chunk first", reply(200, "application/json", chunkLine("begin", "")+chunkLine("error", "Model quota exceeded"))},
	{"error chunk mid-stream", reply(200, "application/json", ndjson("partial")+chunkLine("error", "boom"))},
	{"unparseable reply", reply(200, "application/json", `{"output":"cut`)},
	{"html with 200", reply(200, "text/html", "<!doctype html><html><body>Login</body></html>")},
	{"empty body", reply(200, "application/json", "")},
	{"404 not registered", reply(404, "application/json", `{"code":404,"message":"not registered"}`)},
	{"workflow was started", reply(200, "application/json", `{"message":"Workflow was started"}`)},
	{"sse error event", reply(200, "text/event-stream", "data: partial\n\nevent: error\ndata: boom\n\n")},
}

// TestWorkflowErrorsKeepCircuitClosed: one visitor whose messages make the
// workflow fail, 20 times in a row, does not shut the chat for the next
// visitor.
func TestWorkflowErrorsKeepCircuitClosed(t *testing.T) {
	var n atomic.Int32
	f := newFake(t, func(w http.ResponseWriter, r *http.Request) {
		i := int(n.Add(1)) - 1
		if i < 20 {
			workflowFailures[i%len(workflowFailures)].handler(w, r)
			return
		}
		okHandler(w, r)
	})
	cfg := testConfig(f)
	cfg.Breaker = BreakerConfig{FailureThreshold: 5}
	c := newClient(t, cfg)
	for i := range 20 {
		r, err := c.Send(t.Context(), testRequest())
		if err == nil {
			_, err = r.ReadAll()
			r.Close()
		}
		if err == nil {
			t.Fatalf("message %d (%s) succeeded", i, workflowFailures[i%len(workflowFailures)].name)
		}
	}
	if s := c.State(); s != StateClosed {
		t.Fatalf("circuit %s after 20 workflow errors, want closed", s)
	}
	sendOK(t, c, testRequest()) // another visitor
}

// TestCircuitCountsOnlyUnreachable: with a threshold of 1, each outcome
// opens the circuit only when it says n8n is unreachable or overloaded.
func TestCircuitCountsOnlyUnreachable(t *testing.T) {
	stall := func(w http.ResponseWriter, r *http.Request) {
		streamHeaders(w)
		_, _ = io.WriteString(w, chunkLine("item", "a"))
		flush(w)
		<-r.Context().Done()
	}
	tests := []struct {
		name    string
		handler http.HandlerFunc
		opens   bool
	}{
		{"502 page of a proxy", reply(502, "text/html", "<html><body>502 Bad Gateway</body></html>"), true},
		{"503", reply(503, "text/plain", "unavailable"), true},
		{"504", reply(504, "text/plain", "gateway timeout"), true},
		{"dropped before a response", dropConnection, true},
		{"reset mid-stream", hijackAfter(chunkLine("item", "a")), true},
		{"idle timeout mid-stream", stall, true},
		{"first byte timeout", func(_ http.ResponseWriter, r *http.Request) { <-r.Context().Done() }, true},
		{"clean reply", reply(200, "application/json", ndjson("a")), false},
	}
	for _, wf := range workflowFailures {
		tests = append(tests, struct {
			name    string
			handler http.HandlerFunc
			opens   bool
		}{wf.name, wf.handler, false})
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			f := newFake(t, tc.handler)
			cfg := testConfig(f)
			cfg.Breaker.FailureThreshold = 1
			cfg.UpstreamTimeout = 100 * time.Millisecond
			cfg.StreamIdleTimeout = 100 * time.Millisecond
			c := newClient(t, cfg)
			if r, err := c.Send(t.Context(), testRequest()); err == nil {
				_, _ = r.ReadAll()
				r.Close()
			}
			if got := c.State() == StateOpen; got != tc.opens {
				t.Fatalf("circuit %s, want open %v", c.State(), tc.opens)
			}
		})
	}
}

// TestConnectFailuresOpenCircuit: n8n unreachable opens the circuit after
// the threshold, as before.
func TestConnectFailuresOpenCircuit(t *testing.T) {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	addr := ln.Addr().String()
	ln.Close()
	c := newClient(t, Config{
		WebhookURL: "http://" + addr + secretPath, SessionSecret: testSecret,
		RetryBackoff: time.Millisecond, RetryMaxBackoff: 2 * time.Millisecond,
		Breaker: BreakerConfig{FailureThreshold: 5},
	})
	for i := range 5 {
		if s := c.State(); s != StateClosed {
			t.Fatalf("circuit %s after %d connect failures", s, i)
		}
		_, err := c.Send(t.Context(), testRequest())
		if e := asError(t, err); e.Reason != ReasonConnect {
			t.Fatalf("failure %d: %v", i, e)
		}
	}
	if s := c.State(); s != StateOpen {
		t.Fatalf("circuit %s after 5 connect failures, want open", s)
	}
	_, err = c.Send(t.Context(), testRequest())
	if e := asError(t, err); e.Reason != ReasonCircuitOpen || e.RetryAfterSeconds() < 1 {
		t.Fatalf("open circuit: %v", e)
	}
}

// TestCircuitRecoversWithinSeconds replays the outage of the review: n8n
// stops for 3 s under steady load, with the default open time (30 s).
// Once n8n answers again, the chat must be back within 5 s, not after the
// whole open time.
func TestCircuitRecoversWithinSeconds(t *testing.T) {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	addr := ln.Addr().String()
	var hits atomic.Int32
	serve := func(l net.Listener) *httptest.Server {
		srv := httptest.NewUnstartedServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
			hits.Add(1)
			okHandler(w, r)
		}))
		srv.Listener = l
		srv.Start()
		return srv
	}
	srv := serve(ln)
	c := newClient(t, Config{
		WebhookURL: "http://" + addr + secretPath, SessionSecret: testSecret,
		RetryBackoff: time.Millisecond, RetryMaxBackoff: 2 * time.Millisecond,
		Breaker: BreakerConfig{FailureThreshold: 5}, // OpenTimeout: the default 30 s
	})
	sendOK(t, c, testRequest())

	// n8n stops.
	srv.CloseClientConnections()
	srv.Close()
	stopped := time.Now()

	// Steady load: four visitors, a message every 10 ms each.
	var mu sync.Mutex
	var firstOK time.Time
	var backAt time.Time
	done := make(chan struct{})
	var wg sync.WaitGroup
	for range 4 {
		wg.Go(func() {
			for {
				select {
				case <-done:
					return
				case <-time.After(10 * time.Millisecond):
				}
				r, err := c.Send(t.Context(), testRequest())
				if err != nil {
					continue
				}
				_, err = r.ReadAll()
				r.Close()
				mu.Lock()
				if err == nil && firstOK.IsZero() && !backAt.IsZero() {
					firstOK = time.Now()
				}
				mu.Unlock()
			}
		})
	}
	defer func() { close(done); wg.Wait() }()

	waitFor(t, "the circuit to open", func() bool { return c.State() == StateOpen })
	time.Sleep(time.Until(stopped.Add(3 * time.Second)))

	// n8n is back on the same address.
	l, err := net.Listen("tcp", addr)
	if err != nil {
		t.Fatalf("listening on %s again: %v", addr, err)
	}
	mu.Lock()
	backAt = time.Now()
	mu.Unlock()
	srv = serve(l)
	t.Cleanup(srv.Close)

	deadline := time.Now().Add(10 * time.Second)
	for {
		mu.Lock()
		ok, back := firstOK, backAt
		mu.Unlock()
		if !ok.IsZero() {
			took := ok.Sub(back)
			t.Logf("n8n down for %v; the chat answered again %v after n8n was back", back.Sub(stopped).Round(time.Millisecond), took.Round(time.Millisecond))
			if took > 5*time.Second {
				t.Fatalf("the chat came back %v after n8n, want within 5 s", took)
			}
			return
		}
		if time.Now().After(deadline) {
			t.Fatalf("the chat was still refused %v after n8n was back (circuit %s)", time.Since(back).Round(time.Millisecond), c.State())
		}
		time.Sleep(5 * time.Millisecond)
	}
}
