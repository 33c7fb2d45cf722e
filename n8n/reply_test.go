package n8n

import (
	"compress/gzip"
	"context"
	"errors"
	"io"
	"net/http"
	"strings"
	"testing"
	"time"
)

// TestReplyKinds sends one message per reply kind the fake n8n speaks and
// checks the text, the detected format, or the error and its status.
func TestReplyKinds(t *testing.T) {
	bigItems := make([]string, 3000)
	for i := range bigItems {
		bigItems[i] = strings.Repeat("x", 1023) + "\n"
	}
	bigText := strings.Repeat("0123456789abcdef", 3<<16) // 3 MiB

	tests := []struct {
		name    string
		handler http.HandlerFunc
		tweak   func(*Config)
		want    string
		format  Format
		// for errors before the first chunk
		reason Reason
		status int
		code   string
		hits   int32 // upstream requests expected (0: don't check)
	}{
		// Replies.
		{name: "json output", handler: reply(200, "application/json", `{"output":"Hi there"}`), want: "Hi there", format: FormatJSON},
		{name: "json text", handler: reply(200, "application/json", `{"text":"T"}`), want: "T", format: FormatJSON},
		{name: "json message", handler: reply(200, "application/json", `{"message":"M","id":1,"x":2}`), want: "M", format: FormatJSON},
		{name: "json response", handler: reply(200, "application/json", `{"response":"R"}`), want: "R", format: FormatJSON},
		{name: "output wins", handler: reply(200, "application/json", `{"message":"m","output":"o"}`), want: "o", format: FormatJSON},
		{name: "json array", handler: reply(200, "application/json", `[{"output":"first"},{"output":"second"}]`), want: "first", format: FormatJSON},
		{name: "json pretty", handler: reply(200, "application/json", "{\n  \"output\": \"multi\\nline\"\n}\n"), want: "multi\nline", format: FormatJSON},
		{name: "json typed text", handler: reply(200, "application/json", `{"output":{"type":"text","text":"typed"}}`), want: "typed", format: FormatJSON},
		{name: "json string", handler: reply(200, "application/json", `"just a string"`), want: "just a string", format: FormatJSON},
		{name: "json unlabelled", handler: reply(200, "", `{"output":"no type"}`), want: "no type", format: FormatJSON},
		{name: "json bom and space", handler: reply(200, "application/json", "\ufeff \n {\"output\":\"bom\"}"), want: "bom", format: FormatJSON},
		{name: "ndjson labelled json", handler: reply(200, "application/json; charset=utf-8", ndjson("Hel", "lo", "!")), want: "Hello!", format: FormatNDJSON},
		{name: "ndjson labelled ndjson", handler: reply(200, "application/x-ndjson", ndjson("a", "b")), want: "ab", format: FormatNDJSON},
		{name: "ndjson keepalives crlf blanks", handler: reply(200, "application/json",
			`{"type":"keepalive"}`+"\n\n"+chunkLine("begin", "")+"\r\n"+`{"type":"keepalive"}`+"\r\n"+chunkLine("item", "x")+"   \n"+chunkLine("item", "y")+chunkLine("end", "")),
			want: "xy", format: FormatNDJSON},
		{name: "ndjson several nodes", handler: reply(200, "application/json", ndjson("one ", "two ")+ndjson("three")+ndjson()+ndjson("four")), want: "one two threefour", format: FormatNDJSON},
		{name: "ndjson no final newline", handler: reply(200, "application/json", strings.TrimSuffix(ndjson("tail"), "\n")), want: "tail", format: FormatNDJSON},
		{name: "ndjson unknown type ignored", handler: reply(200, "application/json", chunkLine("begin", "")+`{"type":"progress","content":"zzz"}`+"\n"+chunkLine("item", "ok")), want: "ok", format: FormatNDJSON},
		{name: "ndjson respond-to-webhook body", handler: reply(200, "application/json", ndjson(`{"output":"unwrapped"}`)), want: "unwrapped", format: FormatNDJSON},
		{name: "ndjson unicode", handler: reply(200, "application/json", ndjson("Привет ", "👋🏽", " 世界")), want: "Привет 👋🏽 世界", format: FormatNDJSON},
		{name: "sse", handler: reply(200, "text/event-stream",
			": hi\n\ndata: {\"type\":\"item\",\"content\":\"a\"}\n\ndata: plain b\r\n\r\nevent: message\ndata: line1\ndata: line2\n\ndata: {\"output\":\"c\"}\r\rdata: \"d\"\r\rdata: [DONE]\n\ndata: after done\n\n"),
			want: "aplain bline1\nline2cd", format: FormatSSE},
		{name: "text plain", handler: reply(200, "text/plain; charset=utf-8", "Plain reply\nwith lines"), want: "Plain reply\nwith lines", format: FormatText},
		{name: "text plain braces", handler: reply(200, "text/plain", "{not json} ok"), want: "{not json} ok", format: FormatText},
		{name: "text plain mentions html", handler: reply(200, "text/plain", "<b>Use</b> the <html> and <body> tags"), want: "<b>Use</b> the <html> and <body> tags", format: FormatText},
		{name: "gzip ndjson", handler: compressed("gzip", "application/json", ndjson("g", "z")), want: "gz", format: FormatNDJSON},
		{name: "br ndjson", handler: compressed("br", "application/json", ndjson("b", "r")), want: "br", format: FormatNDJSON},
		{name: "gzip json", handler: compressed("gzip", "application/json", `{"output":"zipped"}`), want: "zipped", format: FormatJSON},
		{name: "br text", handler: compressed("br", "text/plain", "brotli text"), want: "brotli text", format: FormatText},
		{name: "multi-megabyte ndjson", handler: reply(200, "application/json", ndjson(bigItems...)), want: strings.Join(bigItems, ""), format: FormatNDJSON},
		{name: "multi-megabyte json", handler: reply(200, "application/json", `{"output":"`+bigText+`"}`), want: bigText, format: FormatJSON},
		{name: "multi-megabyte text", handler: reply(200, "text/plain", bigText), want: bigText, format: FormatText},

		// Upstream errors before any text.
		{name: "500 error in workflow", handler: reply(500, "application/json", `{"message":"Error in workflow"}`), reason: ReasonStatus, status: 502, code: CodeError, hits: 1},
		{name: "404 not registered", handler: reply(404, "application/json", `{"code":404,"message":"not registered"}`), reason: ReasonStatus, status: 502, code: CodeError, hits: 1},
		{name: "403 jwt", handler: reply(403, "text/plain", "invalid signature"), reason: ReasonStatus, status: 502, code: CodeError, hits: 1},
		{name: "502 not re-sent", handler: reply(502, "text/plain", "bad gateway"), reason: ReasonStatus, status: 502, code: CodeError, hits: 1},
		{name: "503 not re-sent", handler: reply(503, "text/plain", "unavailable"), reason: ReasonStatus, status: 503, code: CodeUnavailable, hits: 1},
		{name: "504 not re-sent", handler: reply(504, "text/plain", "gateway timeout"), reason: ReasonStatus, status: 504, code: CodeTimeout, hits: 1},
		{name: "429", handler: reply(429, "text/plain", "slow down"), reason: ReasonStatus, status: 503, code: CodeUnavailable, hits: 1},
		{name: "redirect not followed", handler: func(w http.ResponseWriter, r *http.Request) {
			if r.URL.Path == "/elsewhere" {
				panic("redirect followed")
			}
			http.Redirect(w, r, "/elsewhere", http.StatusFound)
		}, reason: ReasonRedirect, status: 502, code: CodeError, hits: 1},
		{name: "html error page", handler: reply(200, "text/html", "<!DOCTYPE html><html><body>524 timeout</body></html>"), reason: ReasonHTML, status: 502, hits: 1},
		{name: "html labelled text", handler: reply(200, "text/plain", "<!doctype HTML><title>Bad gateway</title>"), reason: ReasonHTML, status: 502},
		{name: "html unlabelled", handler: reply(200, "", "<center>nginx</center>"), reason: ReasonHTML, status: 502},
		{name: "html labelled json", handler: reply(200, "application/json", "\n<html>\r\n<head><title>502 Bad Gateway</title></head>"), reason: ReasonHTML, status: 502},
		{name: "html in stream", handler: reply(200, "application/json", chunkLine("begin", "")+"<html><body>proxy</body></html>\n"), reason: ReasonHTML, status: 502},
		{name: "empty body", handler: reply(200, "application/json", ""), reason: ReasonEmpty, status: 502, hits: 1},
		{name: "blank body", handler: reply(200, "", " \r\n\t\n"), reason: ReasonEmpty, status: 502},
		{name: "204", handler: reply(204, "", ""), reason: ReasonEmpty, status: 502},
		{name: "stream without items", handler: reply(200, "application/json", ndjson()+`{"type":"keepalive"}`+"\n"), reason: ReasonEmpty, status: 502},
		{name: "empty output", handler: reply(200, "application/json", `{"output":""}`), reason: ReasonEmpty, status: 502},
		{name: "empty array", handler: reply(200, "application/json", `[]`), reason: ReasonEmpty, status: 502},
		{name: "execution started", handler: reply(200, "application/json", `{"executionStarted":true,"executionId":"42","resumeToken":"t"}`), reason: ReasonExecutionStarted, status: 502, hits: 1},
		{name: "workflow was started", handler: reply(200, "application/json", `{"message":"Workflow was started"}`), reason: ReasonWorkflowNoReply, status: 502},
		{name: "last node no data", handler: reply(200, "application/json", `{"message":"Workflow executed successfully but the last node did not return any data"}`), reason: ReasonWorkflowNoReply, status: 502},
		{name: "error chunk first", handler: reply(200, "application/json", chunkLine("begin", "")+`{"type":"error","content":null,"metadata":{}}`+"\n"), reason: ReasonWorkflowError, status: 502, hits: 1},
		{name: "no known field", handler: reply(200, "application/json", `{"foo":"bar"}`), reason: ReasonInvalid, status: 502},
		{name: "json number", handler: reply(200, "application/json", `42`), reason: ReasonInvalid, status: 502},
		{name: "invalid json labelled json", handler: reply(200, "application/json", `not json at all`), reason: ReasonInvalid, status: 502},
		{name: "broken json document", handler: reply(200, "application/json", `{"output":"x"`), reason: ReasonInvalid, status: 502},
		{name: "invalid ndjson line", handler: reply(200, "application/json", chunkLine("begin", "")+"oops, not json\n"+chunkLine("item", "x")), reason: ReasonInvalid, status: 502},
		{name: "overlong line", handler: reply(200, "application/json", chunkLine("begin", "")+chunkLine("item", strings.Repeat("L", 2000))),
			tweak: func(c *Config) { c.MaxLineBytes = 1024 }, reason: ReasonLineTooLong, status: 502},
		{name: "reply too large", handler: reply(200, "application/json", `{"output":"`+strings.Repeat("y", 5000)+`"}`),
			tweak: func(c *Config) { c.MaxReplyBytes = 4096 }, reason: ReasonTooLarge, status: 502},
		{name: "unsupported encoding", handler: func(w http.ResponseWriter, _ *http.Request) {
			w.Header().Set("Content-Encoding", "compress")
			_, _ = io.WriteString(w, "xx")
		}, reason: ReasonUnsupportedFormat, status: 502},
		{name: "corrupt gzip", handler: func(w http.ResponseWriter, _ *http.Request) {
			w.Header().Set("Content-Encoding", "gzip")
			_, _ = io.WriteString(w, "\x1f\x8b\x08\x00\x00\x00\x00\x00\x00\xffgarbage-garbage-garbage")
		}, reason: ReasonInvalid, status: 502},
		{name: "truncated gzip", handler: func(w http.ResponseWriter, _ *http.Request) {
			w.Header().Set("Content-Encoding", "gzip")
			var b strings.Builder
			zw := gzip.NewWriter(&b)
			_, _ = io.WriteString(zw, `{"output":"cut"}`)
			_ = zw.Close()
			_, _ = io.WriteString(w, b.String()[:b.Len()-6])
		}, reason: ReasonInvalid, status: 502},
		{name: "reset before any item", handler: hijackAfter(chunkLine("begin", "")), reason: ReasonRead, status: 502, hits: 1},
		{name: "dropped after delivery not re-sent", handler: dropConnection, reason: ReasonConnect, status: 503, code: CodeUnavailable, hits: 1},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			f := newFake(t, tc.handler)
			cfg := testConfig(f)
			if tc.tweak != nil {
				tc.tweak(&cfg)
			}
			c := newClient(t, cfg)
			r, err := c.Send(t.Context(), testRequest())
			if tc.reason != "" {
				if err == nil {
					got, _ := r.ReadAll()
					r.Close()
					t.Fatalf("got reply %q (format %s), want error %s", got, r.Format(), tc.reason)
				}
				e := asError(t, err)
				if e.Reason != tc.reason || e.Status != tc.status || e.MidStream {
					t.Fatalf("error %v: reason %s status %d mid %v, want %s %d", e, e.Reason, e.Status, e.MidStream, tc.reason, tc.status)
				}
				if tc.code != "" && e.Code != tc.code {
					t.Errorf("code %q, want %q", e.Code, tc.code)
				}
				if e.Message == "" {
					t.Error("no client message")
				}
				if e.Status == 503 && e.RetryAfterSeconds() < 1 {
					t.Errorf("503 without Retry-After")
				}
				for _, s := range []string{secretPath, "6f1e-secret", testSecret} {
					if strings.Contains(e.Error(), s) || strings.Contains(e.Message, s) || strings.Contains(e.Detail, s) {
						t.Errorf("error leaks %q: %v", s, e)
					}
				}
			} else {
				if err != nil {
					t.Fatalf("Send: %v", err)
				}
				defer r.Close()
				if got := readAll(t, r); got != tc.want {
					if len(got) > 200 || len(tc.want) > 200 {
						t.Fatalf("reply of %d bytes, want %d", len(got), len(tc.want))
					}
					t.Fatalf("reply %q, want %q", got, tc.want)
				}
				if r.Format() != tc.format {
					t.Errorf("format %s, want %s", r.Format(), tc.format)
				}
				if _, err := r.Next(); err != io.EOF {
					t.Errorf("Next after end = %v, want io.EOF", err)
				}
			}
			if tc.hits != 0 {
				if got := f.hits.Load(); got != tc.hits {
					t.Errorf("n8n hit %d times, want %d", got, tc.hits)
				}
			}
		})
	}
}

// TestExecutionStartedIsExplained: n8n's WebSocket mode gets an error that
// says which response modes work.
func TestExecutionStartedIsExplained(t *testing.T) {
	f := newFake(t, reply(200, "application/json", `{"executionStarted":true,"executionId":"7"}`))
	c := newClient(t, testConfig(f))
	_, err := c.Send(t.Context(), testRequest())
	e := asError(t, err)
	for _, s := range []string{e.Message, e.Error()} {
		if !strings.Contains(strings.ToLower(s), "streaming") || !strings.Contains(strings.ToLower(s), "websocket") {
			t.Errorf("unclear: %q", s)
		}
	}
}

// TestRetryAfterFromUpstream keeps n8n's (or its proxy's) Retry-After.
func TestRetryAfterFromUpstream(t *testing.T) {
	f := newFake(t, func(w http.ResponseWriter, _ *http.Request) {
		w.Header().Set("Retry-After", "7")
		w.WriteHeader(http.StatusTooManyRequests)
	})
	c := newClient(t, testConfig(f))
	_, err := c.Send(t.Context(), testRequest())
	if e := asError(t, err); e.Status != 503 || e.RetryAfterSeconds() != 7 || e.UpstreamStatus != 429 {
		t.Fatalf("got %v retry %d", e, e.RetryAfterSeconds())
	}
}

// TestMidStreamErrors: failures after the first chunk come from Next, are
// marked MidStream, keep the text already delivered, and are never retried.
func TestMidStreamErrors(t *testing.T) {
	tests := []struct {
		name    string
		handler http.HandlerFunc
		tweak   func(*Config)
		reason  Reason
		code    string
	}{
		{name: "error chunk", handler: reply(200, "application/json", ndjson("partial")+`{"type":"error","content":"Model quota exceeded","metadata":{}}`+"\n"), reason: ReasonWorkflowError, code: CodeError},
		{name: "connection reset", handler: hijackAfter(chunkLine("begin", ""), chunkLine("item", "partial")), reason: ReasonRead, code: CodeError},
		{name: "invalid line", handler: reply(200, "application/json", ndjson("partial")+"{broken\n"), reason: ReasonInvalid, code: CodeError},
		{name: "overlong line", handler: reply(200, "application/json", ndjson("partial")+chunkLine("item", strings.Repeat("z", 5000))),
			tweak: func(c *Config) { c.MaxLineBytes = 1024 }, reason: ReasonLineTooLong, code: CodeError},
		{name: "too large", handler: reply(200, "application/json", ndjson("partial", strings.Repeat("z", 3000))),
			tweak: func(c *Config) { c.MaxReplyBytes = 2048 }, reason: ReasonTooLarge, code: CodeError},
		{name: "stall", handler: func(w http.ResponseWriter, r *http.Request) {
			streamHeaders(w)
			_, _ = io.WriteString(w, chunkLine("begin", "")+chunkLine("item", "partial"))
			flush(w)
			<-r.Context().Done() // stall until the client gives up
		}, tweak: func(c *Config) { c.StreamIdleTimeout = 50 * time.Millisecond }, reason: ReasonIdleTimeout, code: CodeTimeout},
		{name: "max duration", handler: func(w http.ResponseWriter, r *http.Request) {
			streamHeaders(w)
			_, _ = io.WriteString(w, chunkLine("item", "partial"))
			flush(w)
			for { // keepalives keep the idle timer happy, not the overall one
				select {
				case <-r.Context().Done():
					return
				case <-time.After(5 * time.Millisecond):
					_, _ = io.WriteString(w, `{"type":"keepalive"}`+"\n")
					flush(w)
				}
			}
		}, tweak: func(c *Config) { c.MaxStreamDuration = 150 * time.Millisecond }, reason: ReasonMaxDuration, code: CodeTimeout},
		{name: "sse error event", handler: reply(200, "text/event-stream", "data: partial\n\nevent: error\ndata: boom\n\n"), reason: ReasonWorkflowError, code: CodeError},
		{name: "brotli cut", handler: func(w http.ResponseWriter, _ *http.Request) {
			w.Header().Set("Content-Encoding", "br")
			bw := newCompressor("br", w)
			_, _ = io.WriteString(bw, ndjson("partial"))
			_ = bw.Flush() // flushed but never closed: the stream is truncated
		}, reason: ReasonInvalid, code: CodeError},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			f := newFake(t, tc.handler)
			cfg := testConfig(f)
			if tc.tweak != nil {
				tc.tweak(&cfg)
			}
			c := newClient(t, cfg)
			r, err := c.Send(t.Context(), testRequest())
			if err != nil {
				t.Fatalf("Send: %v", err)
			}
			defer r.Close()
			got, err := r.ReadAll()
			if got != "partial" {
				t.Errorf("text before the error %q", got)
			}
			e := asError(t, err)
			if e.Reason != tc.reason || e.Code != tc.code || !e.MidStream {
				t.Fatalf("error %v: reason %s code %s mid %v", e, e.Reason, e.Code, e.MidStream)
			}
			if _, err2 := r.Next(); err2 != err {
				t.Errorf("Next after the error = %v, want the same error", err2)
			}
			if h := f.hits.Load(); h != 1 {
				t.Errorf("n8n hit %d times: a stream that broke after output was re-sent", h)
			}
		})
	}
}

// TestKeepalivesResetIdleTimeout: n8n's keepalives (every 30 s in real
// life) keep a long-running stream alive past the idle timeout.
func TestKeepalivesResetIdleTimeout(t *testing.T) {
	f := newFake(t, func(w http.ResponseWriter, _ *http.Request) {
		streamHeaders(w)
		_, _ = io.WriteString(w, chunkLine("begin", "")+chunkLine("item", "a"))
		flush(w)
		for range 12 { // 12 × 20 ms = 240 ms of silence but for keepalives
			time.Sleep(20 * time.Millisecond)
			_, _ = io.WriteString(w, `{"type":"keepalive"}`+"\n")
			flush(w)
		}
		_, _ = io.WriteString(w, chunkLine("item", "b")+chunkLine("end", ""))
	})
	cfg := testConfig(f)
	cfg.StreamIdleTimeout = 120 * time.Millisecond
	c := newClient(t, cfg)
	r, err := c.Send(t.Context(), testRequest())
	if err != nil {
		t.Fatal(err)
	}
	defer r.Close()
	if got := readAll(t, r); got != "ab" {
		t.Fatalf("got %q", got)
	}
}

// TestSlowFirstByte: the upstream timeout bounds the wait for the first
// text, whether n8n sends nothing at all or only headers, begin and
// keepalives. Timeouts are not retried.
func TestSlowFirstByte(t *testing.T) {
	tests := []struct {
		name  string
		write func(w http.ResponseWriter)
	}{
		{"no headers", func(http.ResponseWriter) {}},
		{"headers and keepalives only", func(w http.ResponseWriter) {
			streamHeaders(w)
			_, _ = io.WriteString(w, chunkLine("begin", "")+`{"type":"keepalive"}`+"\n")
			flush(w)
		}},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			gone, markGone := signalled()
			f := newFake(t, func(w http.ResponseWriter, r *http.Request) {
				tc.write(w)
				<-r.Context().Done()
				markGone()
			})
			cfg := testConfig(f)
			cfg.UpstreamTimeout = 80 * time.Millisecond
			c := newClient(t, cfg)
			start := time.Now()
			_, err := c.Send(t.Context(), testRequest())
			e := asError(t, err)
			if e.Reason != ReasonFirstByteTimeout || e.Status != http.StatusGatewayTimeout || e.Code != CodeTimeout {
				t.Fatalf("got %v", e)
			}
			if time.Since(start) > 3*time.Second {
				t.Errorf("took %v", time.Since(start))
			}
			within(t, gone, "n8n to see the request cancelled")
			if h := f.hits.Load(); h != 1 {
				t.Errorf("hits %d", h)
			}
		})
	}
}

// TestChunksReachCallerBeforeNextIsWritten: the fake n8n writes chunk N+1
// only after the test has received chunk N from the client, for every
// streamed format and compression. Any buffering deadlocks (and fails at
// the test's deadline).
func TestChunksReachCallerBeforeNextIsWritten(t *testing.T) {
	const n = 5
	formats := []struct {
		name, contentType string
		frame             func(i int, text string) string
		head              string
		format            Format
	}{
		{"ndjson", "application/json; charset=utf-8", func(_ int, s string) string { return chunkLine("item", s) }, chunkLine("begin", ""), FormatNDJSON},
		{"sse", "text/event-stream", func(_ int, s string) string { return "data: " + s + "\n\n" }, ": open\n\n", FormatSSE},
		{"text", "text/plain; charset=utf-8", func(_ int, s string) string { return s }, "", FormatText},
	}
	for _, ft := range formats {
		for _, enc := range []string{"", "gzip", "br"} {
			t.Run(ft.name+"/"+enc, func(t *testing.T) {
				proceed := make(chan struct{})
				written := make(chan int, n)
				f := newFake(t, func(w http.ResponseWriter, r *http.Request) {
					send, end := startStream(w, ft.contentType, enc)
					if ft.head != "" {
						send(ft.head)
					}
					for i := 1; i <= n; i++ {
						if i > 1 {
							select {
							case <-proceed:
							case <-r.Context().Done():
								return
							}
						}
						written <- i
						send(ft.frame(i, "chunk é"+string(rune('0'+i))+" "))
					}
					end()
				})
				c := newClient(t, testConfig(f))
				ctx, cancel := context.WithTimeout(t.Context(), 10*time.Second)
				defer cancel()
				r, err := c.Send(ctx, testRequest())
				if err != nil {
					t.Fatal(err)
				}
				defer r.Close()
				if r.Format() != ft.format {
					t.Errorf("format %s", r.Format())
				}
				for i := 1; i <= n; i++ {
					var text string
					if i == 1 {
						text, _ = r.Next() // the first chunk, held by Send
					} else {
						proceed <- struct{}{}
						if text, err = r.Next(); err != nil {
							t.Fatalf("chunk %d: %v", i, err)
						}
					}
					if want := "chunk é" + string(rune('0'+i)) + " "; text != want {
						t.Fatalf("chunk %d = %q, want %q", i, text, want)
					}
					if got := <-written; got != i || len(written) != 0 {
						t.Fatalf("received chunk %d but n8n had written %d", i, got+len(written))
					}
				}
				if _, err := r.Next(); err != io.EOF {
					t.Fatalf("end: %v", err)
				}
			})
		}
	}
}

// TestCancelStopsUpstream: cancelling the caller's context (client gone,
// on_client_disconnect cancel) or closing the reply cancels the request to
// n8n at once, before or after the first chunk.
func TestCancelStopsUpstream(t *testing.T) {
	tests := []struct {
		name       string
		firstChunk bool
		viaClose   bool
	}{
		{"ctx before first chunk", false, false},
		{"ctx mid-stream", true, false},
		{"close mid-stream", true, true},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			arrived, markArrived := signalled()
			gone, markGone := signalled()
			f := newFake(t, func(w http.ResponseWriter, r *http.Request) {
				streamHeaders(w)
				if tc.firstChunk {
					_, _ = io.WriteString(w, chunkLine("begin", "")+chunkLine("item", "first"))
					flush(w)
				}
				markArrived()
				<-r.Context().Done()
				markGone()
			})
			cfg := testConfig(f)
			cfg.Breaker.FailureThreshold = 1
			c := newClient(t, cfg)
			ctx, cancel := context.WithCancel(t.Context())
			defer cancel()
			if !tc.firstChunk {
				go func() { <-arrived; cancel() }()
				_, err := c.Send(ctx, testRequest())
				e := asError(t, err)
				if e.Code != CodeCanceled || e.Status != 499 || !errors.Is(err, context.Canceled) {
					t.Fatalf("got %v", e)
				}
			} else {
				r, err := c.Send(ctx, testRequest())
				if err != nil {
					t.Fatal(err)
				}
				if s, _ := r.Next(); s != "first" {
					t.Fatalf("first chunk %q", s)
				}
				within(t, arrived, "n8n to write")
				if tc.viaClose {
					go func() { _ = r.Close() }()
				} else {
					cancel()
				}
				_, err = r.Next()
				e := asError(t, err)
				if e.Code != CodeCanceled || !e.MidStream {
					t.Fatalf("got %v", e)
				}
				if !tc.viaClose && !errors.Is(err, context.Canceled) {
					t.Errorf("%v is not context.Canceled", err)
				}
				_ = r.Close()
			}
			within(t, gone, "n8n to see its request cancelled")
			if c.State() != StateClosed {
				t.Errorf("a cancellation counted as an n8n failure: breaker %s", c.State())
			}
		})
	}
}

// TestFinishModeKeepsReading: with context.WithoutCancel (on_client_
// disconnect finish), the reply is read to its end after the client's
// context is gone.
func TestFinishModeKeepsReading(t *testing.T) {
	proceed := make(chan struct{})
	f := newFake(t, func(w http.ResponseWriter, _ *http.Request) {
		streamHeaders(w)
		_, _ = io.WriteString(w, chunkLine("item", "a"))
		flush(w)
		<-proceed
		_, _ = io.WriteString(w, chunkLine("item", "b"))
	})
	c := newClient(t, testConfig(f))
	clientCtx, clientGone := context.WithCancel(t.Context())
	r, err := c.Send(context.WithoutCancel(clientCtx), testRequest())
	if err != nil {
		t.Fatal(err)
	}
	defer r.Close()
	clientGone()
	close(proceed)
	if got := readAll(t, r); got != "ab" {
		t.Fatalf("got %q", got)
	}
}

// TestOnWaitBeforeEveryRead: the wait hook runs before each read from
// n8n and never between chunks that arrived together, in every format and
// encoding. A relay that flushes there sends a burst in one write and
// never holds a chunk while n8n is silent.
func TestOnWaitBeforeEveryRead(t *testing.T) {
	formats := []struct {
		name, contentType string
		frame             func(text string) string
	}{
		{"ndjson", "application/json; charset=utf-8", func(s string) string { return chunkLine("item", s) }},
		{"sse", "text/event-stream", func(s string) string { return "data: " + s + "\n\n" }},
	}
	for _, ft := range formats {
		for _, enc := range []string{"", "gzip", "br"} {
			t.Run(ft.name+"/"+enc, func(t *testing.T) {
				proceed := make(chan struct{})
				f := newFake(t, func(w http.ResponseWriter, r *http.Request) {
					send, end := startStream(w, ft.contentType, enc)
					send(ft.frame("a") + ft.frame("b") + ft.frame("c")) // one burst
					select {
					case <-proceed:
					case <-r.Context().Done():
						return
					}
					send(ft.frame("d") + ft.frame("e"))
					end()
				})
				c := newClient(t, testConfig(f))
				r, err := c.Send(t.Context(), testRequest())
				if err != nil {
					t.Fatal(err)
				}
				defer r.Close()
				var events []string
				released := false
				r.OnWait(func() {
					events = append(events, "wait")
					// n8n goes on once the reader waits after the burst.
					if !released && len(events) > 1 && events[len(events)-2] == "c" {
						released = true
						close(proceed)
					}
				})
				for {
					text, err := r.Next()
					if err == io.EOF {
						break
					}
					if err != nil {
						t.Fatal(err)
					}
					events = append(events, text)
				}
				got := strings.Join(events, " ")
				// After the burst the reader waits at least once before d;
				// within a burst (a b c, d e) it never waits.
				if !strings.HasPrefix(got, "a b c wait") || !strings.Contains(got, "wait d e") ||
					strings.Contains(got, "a wait") || strings.Contains(got, "b wait") || strings.Contains(got, "d wait e") {
					t.Fatalf("events %q", got)
				}
			})
		}
	}
}
