package handler_test

import (
	"bufio"
	"bytes"
	"context"
	"database/sql"
	"encoding/json"
	"fmt"
	"io"
	"maps"
	"net"
	"net/http"
	"net/url"
	"reflect"
	"slices"
	"strconv"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"github.com/golang-jwt/jwt/v5"

	"github.com/chatproxy/caddy-chatproxy/internal/testkit"
	"github.com/chatproxy/caddy-chatproxy/n8n"
	"github.com/chatproxy/caddy-chatproxy/sessions"
)

// 1. Live streaming: every chunk reaches the client before n8n writes the
// next one, with and without Caddy's encode handler in front.
func TestChatLiveStreaming(t *testing.T) {
	t.Parallel()
	items := []string{"Hel", "lo, ", strings.Repeat("wörld ", 200), "😀 done"}
	routes := []struct {
		name, path, body string
		headers          map[string]string
		widget           bool
	}{
		{"message sse", "/api/v1/chat/message", `{"message":"Stream please"}`, map[string]string{"Accept": "text/event-stream"}, false},
		{"stream post", "/api/v1/chat/stream", `{"message":"Stream again"}`, nil, false},
		{"widget ndjson", "/api/v1/n8n/chat", `{"action":"sendMessage","sessionId":"live-stream-widget","chatInput":"Stream please","metadata":{}}`,
			map[string]string{"Accept": "text/plain", "Origin": allowedOrigin}, true},
	}
	transports := []struct {
		name           string
		encode         bool
		acceptEncoding string
		gzipN8n        bool
	}{
		{"direct", false, "", false},
		{"encode gzip zstd", true, "gzip, zstd", false},
		{"encode zstd", true, "zstd", false},
		{"encode gzip n8n gzipped", true, "gzip", true},
	}
	for _, tr := range transports {
		t.Run(tr.name, func(t *testing.T) {
			t.Parallel()
			e := newChatEnv(t, chatEnvOpts{encode: tr.encode})
			s := e.newSession(t)
			for _, rt := range routes {
				t.Run(rt.name, func(t *testing.T) {
					gate := testkit.NewStreamGate()
					e.fake.SetScript(e.fake.Gated(gate, tr.gzipN8n, items...))
					headers := maps.Clone(rt.headers)
					if headers == nil {
						headers = map[string]string{}
					}
					if !rt.widget {
						headers["Authorization"] = "Bearer " + s.Token
					}
					if tr.acceptEncoding != "" {
						headers["Accept-Encoding"] = tr.acceptEncoding
					}
					hits := e.fake.Hits()
					// n8n has written its first item only: the response
					// head arriving proves nothing holds the stream back.
					resp := e.do(t, "POST", rt.path, rt.body, headers)
					if resp.StatusCode != http.StatusOK {
						b, _ := io.ReadAll(resp.Body)
						t.Fatalf("status %d: %s", resp.StatusCode, b)
					}
					if ce := resp.Header.Get("Content-Encoding"); ce != "" {
						t.Fatalf("Content-Encoding %q: the stream must not be transformed", ce)
					}
					wantType := "text/event-stream"
					if rt.widget {
						wantType = "application/x-ndjson; charset=utf-8"
					}
					if ct := resp.Header.Get("Content-Type"); ct != wantType {
						t.Fatalf("Content-Type %q, want %q", ct, wantType)
					}
					br := bufio.NewReader(resp.Body)
					if rt.widget {
						if l := nextNDJSON(t, br); l.Type != "begin" {
							t.Fatalf("first line %+v, want begin", l)
						}
					} else if id := wantBegin(t, br); id != resp.Header.Get("X-Message-ID") {
						t.Fatalf("begin names %q, X-Message-ID %q", id, resp.Header.Get("X-Message-ID"))
					}
					for i, want := range items {
						var got string
						if rt.widget {
							l := nextNDJSON(t, br)
							if l.Type != "item" {
								t.Fatalf("line %d: %+v, want an item", i+1, l)
							}
							got = *l.Content
						} else {
							ev := nextSSE(t, br)
							got = itemOf(t, ev)
							if ev.ID != strconv.Itoa(i+2) { // begin is 1
								t.Fatalf("event %d has id %q", i+1, ev.ID)
							}
						}
						if got != want {
							t.Fatalf("chunk %d = %q, want %q", i+1, got, want)
						}
						if n := gate.Written.Load(); n != int32(i+1) {
							t.Fatalf("read chunk %d while n8n had written %d", i+1, n)
						}
						gate.Next(t) // only now may n8n write the next chunk
					}
					if rt.widget {
						if l := nextNDJSON(t, br); l.Type != "end" {
							t.Fatalf("last line %+v, want end", l)
						}
					} else {
						wantEndDone(t, br)
					}
					wantStreamEnd(t, br)
					if got := e.fake.Hits() - hits; got != 1 {
						t.Fatalf("n8n was called %d times, want 1", got)
					}
				})
			}
		})
	}
}

// 2. SSE framing: ids, [DONE], headers, X-Message-ID, and content that
// cannot break the framing.
func TestChatSSEFraming(t *testing.T) {
	t.Parallel()
	contents := []string{
		"line one\nline two\n\n",
		"carriage\rreturn and crlf\r\n",
		"unicode ✓ 😀 日本語 \u2028\u2029 é",
		"data: [DONE]\n\nevent: x",
		"id: 99\ndata: {\"type\":\"error\"}\n\n: comment\nretry: 1",
		"</script><b>&amp;",
	}
	for _, kind := range storeKinds {
		t.Run(kind, func(t *testing.T) {
			t.Parallel()
			e := newChatEnv(t, chatEnvOpts{kind: kind})
			// Two streaming nodes, each with its own begin … end, and
			// keepalives between: one reply.
			e.fake.SetScript(func(w http.ResponseWriter, _ *http.Request, _ *testkit.Call) {
				testkit.N8nStreamHead(w)
				lines := []string{testkit.N8nLine("begin", "")}
				for i, c := range contents {
					if i == 3 {
						lines = append(lines, testkit.N8nLine("end", ""), testkit.N8nKeepalive, testkit.N8nLine("begin", ""))
					}
					lines = append(lines, testkit.N8nLine("item", c), testkit.N8nKeepalive)
				}
				for _, l := range append(lines, testkit.N8nLine("end", "")) {
					_, _ = io.WriteString(w, l)
					testkit.Flush(w)
				}
			})
			s := e.newSession(t)
			resp := e.do(t, "POST", "/api/v1/chat/message", `{"message":"Show me tricky text"}`, authz(s.Token, "Accept", "text/event-stream"))
			raw, err := io.ReadAll(resp.Body)
			if err != nil || resp.StatusCode != http.StatusOK {
				t.Fatalf("%d %q %v", resp.StatusCode, raw, err)
			}
			h := resp.Header
			for k, want := range map[string]string{
				"Content-Type":           "text/event-stream",
				"Cache-Control":          "no-cache, no-transform",
				"X-Accel-Buffering":      "no",
				"X-Content-Type-Options": "nosniff",
			} {
				if got := h.Get(k); got != want {
					t.Errorf("%s = %q, want %q", k, got, want)
				}
			}
			msgID := h.Get("X-Message-ID")
			if msgID == "" {
				t.Fatal("no X-Message-ID")
			}

			body := string(raw)
			all := testkit.ParseSSE(body)
			if len(all) != len(contents)+3 {
				t.Fatalf("%d events, want begin, %d items, end and [DONE]:\n%s", len(all), len(contents), body)
			}
			if eventJSON(t, all[0]).MessageID != msgID {
				t.Fatalf("begin %q does not name the X-Message-ID %q", all[0].Data, msgID)
			}
			events := replyEvents(t, all)
			for i, want := range contents {
				ev := events[i]
				if ev.ID != strconv.Itoa(i+2) {
					t.Errorf("event %d: id %q (hasID %v)", i+1, ev.ID, ev.HasID)
				}
				if got := itemOf(t, ev); got != want {
					t.Errorf("event %d content = %q, want %q", i+1, got, want)
				}
			}
			wantDone(t, events[len(events)-1])
			if !strings.HasSuffix(body, "\ndata: [DONE]\n\n") {
				t.Fatalf("stream does not end with data: [DONE]: %q", body[max(0, len(body)-60):])
			}
			lines := strings.FieldsFunc(body, func(r rune) bool { return r == '\n' || r == '\r' })
			done := 0
			for _, l := range lines {
				if l == "data: [DONE]" {
					done++
				}
				if !strings.HasPrefix(l, "id: ") && !strings.HasPrefix(l, "data: ") && !strings.HasPrefix(l, ": keepalive") {
					t.Errorf("injected line %q", l)
				}
			}
			if done != 1 {
				t.Fatalf("%d [DONE] lines, want 1", done)
			}

			e.waitIdle(t)
			hist := e.history(t, s.Token)
			wantExchange(t, hist, "Show me tricky text", strings.Join(contents, ""), "complete")
			if hist.Messages[1].ID != msgID {
				t.Fatalf("X-Message-ID %q is not the stored reply's id %q", msgID, hist.Messages[1].ID)
			}
		})
	}
}

// 3. JSON mode: one object after the reply completes; both sides stored.
func TestChatJSONMode(t *testing.T) {
	t.Parallel()
	for _, kind := range storeKinds {
		t.Run(kind, func(t *testing.T) {
			t.Parallel()
			e := newChatEnv(t, chatEnvOpts{kind: kind})
			e.fake.SetScript(testkit.Stream("Hello", ", ", "world <3"))
			s := e.newSession(t)
			rec := e.serve(t, "POST", "/api/v1/chat/message", `{"message":"What is 2+2?"}`, authz(s.Token, "Accept", "application/json"))
			if rec.Code != http.StatusOK || rec.Header().Get("Content-Type") != "application/json; charset=utf-8" {
				t.Fatalf("%d %q %s", rec.Code, rec.Header().Get("Content-Type"), rec.Body)
			}
			var body map[string]string
			if err := json.Unmarshal(rec.Body.Bytes(), &body); err != nil {
				t.Fatalf("%s: %v", rec.Body, err)
			}
			if len(body) != 3 || body["response"] != "Hello, world <3" || body["session_id"] != s.SessionID || body["message_id"] == "" {
				t.Fatalf("body = %v", body)
			}
			if !strings.Contains(rec.Body.String(), `world \u003c3`) {
				t.Fatalf("JSON is not HTML-safe escaped: %s", rec.Body)
			}
			hist := e.history(t, s.Token)
			wantExchange(t, hist, "What is 2+2?", "Hello, world <3", "complete")
			if hist.Messages[1].ID != body["message_id"] {
				t.Fatalf("message_id %q is not the stored reply's id %q", body["message_id"], hist.Messages[1].ID)
			}
			if n := e.messageCount(t, s.Token); n != 2 {
				t.Fatalf("message_count = %d, want 2", n)
			}
			if e.fake.Hits() != 1 {
				t.Fatalf("n8n hits = %d", e.fake.Hits())
			}
		})
	}
}

func TestChatAcceptNegotiation(t *testing.T) {
	t.Parallel()
	e := newChatEnv(t, chatEnvOpts{})
	e.fake.SetScript(testkit.Output("ok"))
	s := e.newSession(t)
	for i, tt := range []struct {
		accept string
		json   bool
	}{
		{"application/json", true},
		{"application/json;q=0.9, */*;q=0.1", true},
		{"text/event-stream;q=0, application/json", true},
		{"text/event-stream", false},
		{"application/json, text/event-stream", false},
		{"", false},
		{"*/*", false},
	} {
		rec := e.serve(t, "POST", "/api/v1/chat/message", fmt.Sprintf(`{"message":"question %d"}`, i), authz(s.Token, "Accept", tt.accept))
		ct := rec.Header().Get("Content-Type")
		switch {
		case rec.Code != http.StatusOK:
			t.Errorf("Accept %q: %d %s", tt.accept, rec.Code, rec.Body)
		case tt.json && (ct != "application/json; charset=utf-8" || !strings.Contains(rec.Body.String(), `"response":"ok"`)):
			t.Errorf("Accept %q: want JSON, got %q %s", tt.accept, ct, rec.Body)
		case !tt.json && (ct != "text/event-stream" || !strings.HasSuffix(rec.Body.String(), "data: [DONE]\n\n")):
			t.Errorf("Accept %q: want SSE, got %q %s", tt.accept, ct, rec.Body)
		}
	}
	// POST /chat/stream is always SSE.
	rec := e.serve(t, "POST", "/api/v1/chat/stream", `{"message":"stream it"}`, authz(s.Token, "Accept", "application/json"))
	if rec.Header().Get("Content-Type") != "text/event-stream" {
		t.Fatalf("chat/stream answered %q", rec.Header().Get("Content-Type"))
	}
}

// Every reply shape n8n produces becomes the same text.
func TestChatReplyKinds(t *testing.T) {
	t.Parallel()
	e := newChatEnv(t, chatEnvOpts{})
	s := e.newSession(t)
	for i, tt := range []struct {
		name   string
		script testkit.Script
		want   string
	}{
		{"output", testkit.JSONReply(`{"output":"from output"}`), "from output"},
		{"text", testkit.JSONReply(`{"text":"from text"}`), "from text"},
		{"message", testkit.JSONReply(`{"message":"from message"}`), "from message"},
		{"response", testkit.JSONReply(`{"response":"from response"}`), "from response"},
		{"array: first element", testkit.JSONReply(`[{"output":"first"},{"output":"second"}]`), "first"},
		{"text/plain", testkit.Reply(200, "text/plain; charset=utf-8", "plain reply\nwith two lines"), "plain reply\nwith two lines"},
		{"text/event-stream", testkit.Reply(200, "text/event-stream", "data: {\"content\":\"sse \"}\n\n: ping\n\ndata: reply\n\ndata: [DONE]\n\n"), "sse reply"},
		{"ndjson labelled json", testkit.Stream("nd", "json"), "ndjson"},
		{"ndjson labelled x-ndjson", testkit.Reply(200, "application/x-ndjson", strings.Join(testkit.N8nLines("x-", "nd"), "")), "x-nd"},
	} {
		t.Run(tt.name, func(t *testing.T) {
			e.fake.SetScript(tt.script)
			rec := e.serve(t, "POST", "/api/v1/chat/message", fmt.Sprintf(`{"message":"kind %d"}`, i), authz(s.Token, "Accept", "application/json"))
			if rec.Code != http.StatusOK {
				t.Fatalf("%d %s", rec.Code, rec.Body)
			}
			if got := decode[map[string]string](t, rec)["response"]; got != tt.want {
				t.Fatalf("response = %q, want %q", got, tt.want)
			}
			rec = e.serve(t, "POST", "/api/v1/chat/message", fmt.Sprintf(`{"message":"kind %d again"}`, i), authz(s.Token))
			var text strings.Builder
			events := replyEvents(t, testkit.ParseSSE(rec.Body.String()))
			for _, ev := range events[:len(events)-1] {
				text.WriteString(itemOf(t, ev))
			}
			wantDone(t, events[len(events)-1])
			if text.String() != tt.want {
				t.Fatalf("SSE text = %q, want %q", text.String(), tt.want)
			}
		})
	}
}

// 4a. Failures before the first byte: a plain JSON error with a status,
// after the client's retries where they apply; the exchange is stored
// with an assistant reply of status error.
func TestChatFailuresBeforeFirstByte(t *testing.T) {
	t.Parallel()
	html := "<!DOCTYPE html><html><head><title>502 Bad Gateway</title></head><body>nginx</body></html>"
	tests := []struct {
		name       string
		script     func(f *testkit.N8n) testkit.Script
		mutate     func(t *testing.T, c *envConfig)
		status     int
		code       string
		hits       int // per request: retries show here
		retryAfter bool
		msg        string // in the error message
		canceled   bool   // the upstream request is abandoned
		jsonOnly   bool   // the SSE form carries it on (socketapi_test.go)
	}{
		{name: "500 error in workflow", script: func(*testkit.N8n) testkit.Script {
			return testkit.Reply(500, "application/json; charset=utf-8", `{"message":"Error in workflow"}`)
		}, status: 502, code: "upstream_error", hits: 1},
		{name: "502 not re-sent", script: func(*testkit.N8n) testkit.Script { return testkit.Reply(502, "text/plain", "bad gateway") },
			status: 502, code: "upstream_error", hits: 1},
		{name: "503 not re-sent", script: func(*testkit.N8n) testkit.Script { return testkit.Reply(503, "text/plain", "busy") },
			status: 503, code: "upstream_unavailable", hits: 1, retryAfter: true},
		{name: "504 not re-sent", script: func(*testkit.N8n) testkit.Script { return testkit.Reply(504, "text/plain", "gateway timeout") },
			status: 504, code: "upstream_timeout", hits: 1},
		{name: "404 unknown webhook", script: func(*testkit.N8n) testkit.Script {
			return testkit.Reply(404, "application/json", `{"code":404,"message":"The requested webhook is not registered."}`)
		}, status: 502, code: "upstream_error", hits: 1},
		{name: "403 jwt refused by n8n", script: func(f *testkit.N8n) testkit.Script {
			f.RequireJWT("a-different-passphrase-0123456789abcdef")
			return testkit.Output("never")
		}, status: 502, code: "upstream_error", hits: 1},
		{name: "html error page", script: func(*testkit.N8n) testkit.Script { return testkit.Reply(200, "text/html", html) },
			status: 502, code: "upstream_error", hits: 1},
		{name: "html labelled json", script: func(*testkit.N8n) testkit.Script { return testkit.Reply(200, "application/json", html) },
			status: 502, code: "upstream_error", hits: 1},
		{name: "empty body", script: func(*testkit.N8n) testkit.Script { return testkit.Reply(200, "", "") },
			status: 502, code: "upstream_error", hits: 1},
		{name: "stream without items", script: func(*testkit.N8n) testkit.Script { return testkit.Stream() },
			status: 502, code: "upstream_error", hits: 1},
		{name: "error chunk first", script: func(*testkit.N8n) testkit.Script {
			return testkit.Reply(200, "application/json; charset=utf-8", testkit.N8nLine("begin", "")+testkit.N8nLine("error", "Error in workflow"))
		}, status: 502, code: "upstream_error", hits: 1},
		{name: "executionStarted", script: func(*testkit.N8n) testkit.Script {
			return testkit.JSONReply(`{"executionStarted":true,"executionId":"1234","resumeToken":"abc"}`)
		}, status: 502, code: "upstream_error", hits: 1, msg: "WebSocket", jsonOnly: true},
		{name: "slow first byte", script: func(f *testkit.N8n) testkit.Script { return f.Hanging() },
			mutate: func(_ *testing.T, c *envConfig) { c.Upstream.UpstreamTimeout = time.Second },
			status: 504, code: "upstream_timeout", hits: 1, canceled: true},
		{name: "connection refused",
			mutate: func(t *testing.T, c *envConfig) { c.Upstream.WebhookURL = testkit.ClosedURL(t) },
			status: 503, code: "upstream_unavailable", hits: 0, retryAfter: true},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			t.Parallel()
			e := newChatEnv(t, chatEnvOpts{mutate: func(c *envConfig) {
				if tt.mutate != nil {
					tt.mutate(t, c)
				}
			}})
			if tt.script != nil {
				e.fake.SetScript(tt.script(e.fake))
			}
			for _, accept := range []string{"text/event-stream", "application/json"} {
				if tt.jsonOnly && accept != "application/json" {
					continue
				}
				s := e.newSession(t)
				hits := e.fake.Hits()
				rec := e.serve(t, "POST", "/api/v1/chat/message", `{"message":"Is anyone there?"}`, authz(s.Token, "Accept", accept))
				wantError(t, rec, tt.status, tt.code)
				if got := e.fake.Hits() - hits; got != tt.hits {
					t.Fatalf("%s: n8n hit %d times, want %d", accept, got, tt.hits)
				}
				ra := rec.Header().Get("Retry-After")
				if n, err := strconv.Atoi(ra); tt.retryAfter && (err != nil || n < 1) || !tt.retryAfter && ra != "" {
					t.Fatalf("%s: Retry-After %q", accept, ra)
				}
				msg := decode[apiErr](t, rec).Message
				if !strings.Contains(msg, tt.msg) {
					t.Fatalf("message %q does not mention %q", msg, tt.msg)
				}
				for _, leak := range []string{"Error in workflow", "nginx", "invalid signature", testkit.WebhookPath, "127.0.0.1", "not registered"} {
					if strings.Contains(rec.Body.String(), leak) {
						t.Fatalf("error leaks %q: %s", leak, rec.Body)
					}
				}
				wantExchange(t, e.history(t, s.Token), "Is anyone there?", "", "error")
				if tt.canceled {
					testkit.AwaitSignal(t, e.fake.Last(t).Canceled(), "n8n to see its request abandoned")
				}
			}
		})
	}
}

// 4b. Failures after the first byte: an error event, then [DONE]; what
// was relayed is stored as partial; nothing is re-sent.
func TestChatFailuresAfterFirstByte(t *testing.T) {
	t.Parallel()
	const first = "The first part of the answer, "
	writeLine := func(line string) func(http.ResponseWriter, *http.Request) {
		return func(w http.ResponseWriter, _ *http.Request) {
			_, _ = io.WriteString(w, line)
			testkit.Flush(w)
		}
	}
	tests := []struct {
		name     string
		script   func(f *testkit.N8n, gate chan struct{}) testkit.Script
		idle     bool // a short stream_idle_timeout
		code     string
		canceled bool
	}{
		{name: "connection reset", script: func(f *testkit.N8n, gate chan struct{}) testkit.Script { return f.ResetAfter(first, gate) },
			code: "upstream_error"},
		{name: "error chunk", script: func(f *testkit.N8n, gate chan struct{}) testkit.Script {
			return f.Then(first, gate, writeLine(testkit.N8nLine("error", "secret node failure: db password wrong")))
		}, code: "upstream_error"},
		{name: "html page mid-stream", script: func(f *testkit.N8n, gate chan struct{}) testkit.Script {
			return f.Then(first, gate, writeLine("<html><body>502 Bad Gateway</body></html>\n"))
		}, code: "upstream_error"},
		{name: "invalid line", script: func(f *testkit.N8n, gate chan struct{}) testkit.Script {
			return f.Then(first, gate, writeLine("this is not json\n"))
		}, code: "upstream_error"},
		{name: "stall", script: func(f *testkit.N8n, gate chan struct{}) testkit.Script {
			return f.Then(first, gate, func(w http.ResponseWriter, r *http.Request) {
				_, _ = io.WriteString(w, testkit.N8nKeepalive) // n8n alive, the workflow silent
				testkit.Flush(w)
				f.Hang(r)
			})
		}, idle: true, code: "upstream_timeout", canceled: true},
	}
	for _, kind := range storeKinds {
		for _, tt := range tests {
			t.Run(kind+"/"+tt.name, func(t *testing.T) {
				t.Parallel()
				e := newChatEnv(t, chatEnvOpts{kind: kind, mutate: func(c *envConfig) {
					if tt.idle {
						c.Upstream.StreamIdleTimeout = time.Second
					}
				}})
				gate := make(chan struct{})
				e.fake.SetScript(tt.script(e.fake, gate))
				s := e.newSession(t)
				resp := e.do(t, "POST", "/api/v1/chat/message", `{"message":"Tell me everything"}`, authz(s.Token))
				if resp.StatusCode != http.StatusOK {
					t.Fatalf("status %d", resp.StatusCode)
				}
				msgID := resp.Header.Get("X-Message-ID")
				br := afterBegin(t, resp.Body)
				if got := itemOf(t, nextSSE(t, br)); got != first {
					t.Fatalf("first event %q", got)
				}
				close(gate) // the client has the first part: now n8n fails
				ev := nextSSE(t, br)
				v := eventJSON(t, ev)
				if v.Type != "error" || v.Error != tt.code || v.Message == "" || ev.ID != "3" {
					t.Fatalf("want an error event %s, got %+v", tt.code, ev)
				}
				if strings.Contains(v.Message, "secret") || strings.Contains(v.Message, "password") {
					t.Fatalf("error event leaks n8n's text: %q", v.Message)
				}
				wantEndDone(t, br)
				wantStreamEnd(t, br)
				e.waitIdle(t)
				if e.fake.Hits() != 1 {
					t.Fatalf("n8n hit %d times: a request was re-sent after the first byte", e.fake.Hits())
				}
				if tt.canceled {
					testkit.AwaitSignal(t, e.fake.Last(t).Canceled(), "n8n to see its stalled request abandoned")
				}
				hist := e.history(t, s.Token)
				wantExchange(t, hist, "Tell me everything", first, "partial")
				if hist.Messages[1].ID != msgID {
					t.Fatalf("X-Message-ID %q, stored %q", msgID, hist.Messages[1].ID)
				}
			})
		}
	}
}

type healthBody struct {
	Status string `json:"status"`
	Checks map[string]struct {
		Status string `json:"status"`
	} `json:"checks"`
}

func (e *chatEnv) health(t *testing.T) (int, healthBody) {
	t.Helper()
	rec := e.serve(t, "GET", "/health", "", nil)
	return rec.Code, decode[healthBody](t, rec)
}

// 4c. The circuit breaker: workflow errors leave it closed; consecutive
// failures saying n8n is unreachable or overloaded (before and after the
// first byte) open it; then the routes answer 503 with Retry-After at once
// without calling n8n, and /health reports n8n down.
//
// Half-open probing, the growing open intervals and closing after a good
// probe are covered by the n8n package's own tests.
func TestChatCircuitBreaker(t *testing.T) {
	t.Parallel()
	e := newChatEnv(t, chatEnvOpts{})
	s := e.newSession(t)
	if code, h := e.health(t); code != 200 || h.Status != "ok" || h.Checks["n8n"].Status != "ok" {
		t.Fatalf("health before: %d %+v", code, h)
	}
	// A workflow that fails says n8n is up: it never opens the circuit.
	e.fake.SetScript(testkit.Reply(500, "application/json", `{"message":"Error in workflow"}`))
	for i := range 6 {
		rec := e.serve(t, "POST", "/api/v1/chat/message", fmt.Sprintf(`{"message":"workflow fails %d"}`, i), authz(s.Token))
		wantError(t, rec, 502, "upstream_error")
	}
	if _, h := e.health(t); h.Checks["n8n"].Status != "ok" {
		t.Fatalf("workflow errors opened the circuit: %+v", h)
	}
	e.fake.SetScript(testkit.Reply(503, "text/plain", "overloaded"))
	for i := range 4 {
		rec := e.serve(t, "POST", "/api/v1/chat/message", fmt.Sprintf(`{"message":"attempt %d"}`, i), authz(s.Token))
		wantError(t, rec, 503, "upstream_unavailable")
	}
	if _, h := e.health(t); h.Checks["n8n"].Status != "ok" {
		t.Fatalf("circuit opened before the threshold: %+v", h)
	}
	// The fifth failure is a connection cut in the middle of a stream: it
	// counts too.
	cut := make(chan struct{})
	close(cut)
	e.fake.SetScript(e.fake.ResetAfter("half", cut))
	rec := e.serve(t, "POST", "/api/v1/chat/message", `{"message":"attempt 5"}`, authz(s.Token))
	if rec.Code != 200 || !strings.Contains(rec.Body.String(), `"type":"error"`) {
		t.Fatalf("mid-stream failure: %d %s", rec.Code, rec.Body)
	}
	if e.fake.Hits() != 11 {
		t.Fatalf("hits = %d, want 11", e.fake.Hits())
	}

	// Open: n8n is not called, even though it would now answer well. The
	// circuit opens for 1 s first (then probes n8n): a machine too busy to
	// ask everything within that time checks less rather than fail.
	opened := time.Now()
	e.fake.SetScript(testkit.Output("I am back"))
	code, h := e.health(t)
	if time.Since(opened) < 800*time.Millisecond &&
		(code != 200 || h.Status != "degraded" || h.Checks["n8n"].Status != "down" || h.Checks["database"].Status != "ok") {
		t.Fatalf("health while open: %d %+v", code, h)
	}
	for i, rq := range []struct{ path, body string }{
		{"/api/v1/chat/message", `{"message":"while open"}`},
		{"/api/v1/chat/stream", `{"message":"while open, streaming"}`},
		{"/api/v1/n8n/chat", `{"action":"sendMessage","sessionId":"breaker-widget-1","chatInput":"hi"}`},
	} {
		if time.Since(opened) > 800*time.Millisecond {
			t.Logf("checked %d of 3 routes within the first open second", i)
			break
		}
		rec := e.serve(t, "POST", rq.path, rq.body, authz(s.Token, "Accept", "application/json"))
		wantError(t, rec, 503, "upstream_unavailable")
		if n, err := strconv.Atoi(rec.Header().Get("Retry-After")); err != nil || n != 1 {
			t.Fatalf("request %d: Retry-After %q, want 1 s (the rest of the first open period)", i, rec.Header().Get("Retry-After"))
		}
	}
	if e.fake.Hits() != 11 {
		t.Fatalf("the open circuit let %d requests through", e.fake.Hits()-11)
	}
	// The unanswered messages are in the history with status error.
	hist := e.history(t, s.Token)
	last := hist.Messages[len(hist.Messages)-1]
	if last.Role != "assistant" || last.Status != "error" {
		t.Fatalf("last stored message %+v", last)
	}
}

// 4d. circuit_breaker sets the threshold and open time; after the open
// time one probe goes through, and a good one closes the circuit.
func TestChatCircuitBreakerProbeCloses(t *testing.T) {
	t.Parallel()
	e := newChatEnv(t, chatEnvOpts{mutate: func(c *envConfig) {
		c.Upstream.Breaker.FailureThreshold = 2
		c.Upstream.Breaker.OpenTimeout = time.Second
	}})
	s := e.newSession(t)
	e.fake.SetScript(testkit.Reply(503, "text/plain", "overloaded"))
	for i := range 2 {
		wantError(t, e.serve(t, "POST", "/api/v1/chat/message", fmt.Sprintf(`{"message":"fail %d"}`, i), authz(s.Token, "Accept", "application/json")), 503, "upstream_unavailable")
	}
	hits := e.fake.Hits()
	wantError(t, e.serve(t, "POST", "/api/v1/chat/message", `{"message":"while open"}`, authz(s.Token, "Accept", "application/json")), 503, "upstream_unavailable")
	if e.fake.Hits() != hits {
		t.Fatalf("the open circuit called n8n")
	}
	e.fake.SetScript(testkit.Output("back again"))
	// Poll until the open time has passed; every refused try must not reach n8n.
	deadline := time.Now().Add(5 * time.Second)
	for try := 0; ; try++ {
		rec := e.serve(t, "POST", "/api/v1/chat/message", fmt.Sprintf(`{"message":"probe %d"}`, try), authz(s.Token, "Accept", "application/json"))
		if rec.Code == 200 {
			if !strings.Contains(rec.Body.String(), "back again") {
				t.Fatalf("probe answer: %s", rec.Body)
			}
			break
		}
		wantError(t, rec, 503, "upstream_unavailable")
		if time.Now().After(deadline) {
			t.Fatal("the circuit never let a probe through")
		}
		time.Sleep(100 * time.Millisecond)
	}
	if e.fake.Hits() != hits+1 {
		t.Fatalf("hits = %d, want exactly one probe after %d", e.fake.Hits(), hits)
	}
	if code, h := e.health(t); code != 200 || h.Status != "ok" || h.Checks["n8n"].Status != "ok" {
		t.Fatalf("health after a good probe: %d %+v", code, h)
	}
}

// 5. The user message is stored before n8n is called.
func TestChatUserMessageStoredFirst(t *testing.T) {
	t.Parallel()
	for _, kind := range storeKinds {
		t.Run(kind, func(t *testing.T) {
			t.Parallel()
			e := newChatEnv(t, chatEnvOpts{kind: kind})
			seen := make(chan string, 2)
			e.fake.SetScript(func(w http.ResponseWriter, r *http.Request, c *testkit.Call) {
				page, err := e.store.ListMessages(r.Context(), c.Body.SessionID, "", 10)
				switch {
				case err != nil:
					seen <- "error: " + err.Error()
				case len(page.Messages) == 2 && page.Messages[1].Role == "assistant" && page.Messages[1].Status == "streaming":
					// A chat API reply's row is stored with the message.
					m := page.Messages[0]
					seen <- m.Role + "/" + m.Status + "/" + m.Content
				case len(page.Messages) != 1:
					seen <- fmt.Sprintf("%d messages", len(page.Messages))
				default:
					m := page.Messages[0]
					seen <- m.Role + "/" + m.Status + "/" + m.Content
				}
				testkit.Write(w, 200, "application/json", `{"output":"stored?"}`)
			})
			s := e.newSession(t)
			rec := e.serve(t, "POST", "/api/v1/chat/message", `{"message":"Remember me"}`, authz(s.Token, "Accept", "application/json"))
			if rec.Code != 200 {
				t.Fatalf("%d %s", rec.Code, rec.Body)
			}
			if got := <-seen; got != "user/complete/Remember me" {
				t.Fatalf("when n8n was called the store held: %s", got)
			}
			rec = e.serve(t, "POST", "/api/v1/n8n/chat", `{"action":"sendMessage","sessionId":"stored-first-1","chatInput":"Widget remembers"}`,
				map[string]string{"Origin": allowedOrigin})
			if rec.Code != 200 {
				t.Fatalf("%d %s", rec.Code, rec.Body)
			}
			if got := <-seen; got != "user/complete/Widget remembers" {
				t.Fatalf("when n8n was called the store held: %s", got)
			}
		})
	}
}

// 5. A store that cannot take the message: 503, and n8n is never called.
func TestChatStoreUnavailable(t *testing.T) {
	t.Parallel()
	t.Run("database unreachable", func(t *testing.T) {
		t.Parallel()
		e := newChatEnv(t, chatEnvOpts{mutate: func(c *envConfig) {
			c.Database = "postgres://chat:secret@" + testkit.ClosedPort(t) + "/chat?sslmode=disable&connect_timeout=1"
		}})
		e.fake.SetScript(testkit.Output("never"))
		token, err := sessions.NewTokensFor([]byte(testJWTSecret), e.audience, nil).Issue(&sessions.Session{ID: "SOMESESSIONID", ExpiresAt: time.Now().Add(time.Hour)})
		if err != nil {
			t.Fatal(err)
		}
		for _, rq := range []struct {
			path, body string
			headers    map[string]string
		}{
			{"/api/v1/chat/message", `{"message":"hello"}`, authz(token)},
			{"/api/v1/chat/message", `{"message":"hello"}`, authz(token, "Accept", "application/json")},
			{"/api/v1/n8n/chat", `{"action":"sendMessage","sessionId":"store-down-1","chatInput":"hello"}`, map[string]string{"Origin": allowedOrigin}},
			{"/api/v1/n8n/chat", `{"action":"loadPreviousSession","sessionId":"store-down-1"}`, map[string]string{"Origin": allowedOrigin}},
		} {
			rec := e.serve(t, "POST", rq.path, rq.body, rq.headers)
			wantError(t, rec, 503, "store_unavailable")
			if rec.Header().Get("Retry-After") == "" {
				t.Fatalf("%s: no Retry-After", rq.path)
			}
		}
		if e.fake.Hits() != 0 {
			t.Fatalf("n8n was called %d times", e.fake.Hits())
		}
	})
	// The session is fine but the message cannot be written: the insert
	// fails inside the database.
	for _, kind := range storeKinds {
		t.Run("message insert fails/"+kind, func(t *testing.T) {
			t.Parallel()
			e := newChatEnv(t, chatEnvOpts{kind: kind})
			e.fake.SetScript(testkit.Output("never"))
			s := e.newSession(t)
			failMessageInserts(t, e.store)
			for _, rq := range []struct {
				path, body string
				headers    map[string]string
			}{
				{"/api/v1/chat/message", `{"message":"hello"}`, authz(s.Token)},
				{"/api/v1/chat/message", `{"message":"hello again"}`, authz(s.Token, "Accept", "application/json")},
				{"/api/v1/n8n/chat", `{"action":"sendMessage","sessionId":"insert-fails-1","chatInput":"hello"}`, map[string]string{"Origin": allowedOrigin, "Accept": "text/plain"}},
			} {
				wantError(t, e.serve(t, "POST", rq.path, rq.body, rq.headers), 503, "store_unavailable")
			}
			if e.fake.Hits() != 0 {
				t.Fatalf("n8n was called %d times", e.fake.Hits())
			}
			if h := e.history(t, s.Token); h.TotalCount != 0 {
				t.Fatalf("history %+v", h)
			}
		})
	}
}

// failMessageInserts installs a trigger that makes every message insert
// fail, as a full disk or a broken database would.
func failMessageInserts(t *testing.T, store sessions.Store) {
	t.Helper()
	ctx := context.Background()
	switch s := store.(type) {
	case *sessions.PostgresStore:
		for _, stmt := range []string{
			`CREATE FUNCTION chat_test_fail() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN RAISE EXCEPTION 'injected failure'; END $$`,
			`CREATE TRIGGER chat_test_fail BEFORE INSERT ON chatproxy_messages FOR EACH ROW EXECUTE FUNCTION chat_test_fail()`,
		} {
			if _, err := s.Pool().Exec(ctx, stmt); err != nil {
				t.Fatal(err)
			}
		}
	case *sessions.SQLiteStore:
		db, err := sql.Open("sqlite", s.Path())
		if err != nil {
			t.Fatal(err)
		}
		defer db.Close()
		if _, err := db.ExecContext(ctx, `CREATE TRIGGER chat_test_fail BEFORE INSERT ON chatproxy_messages BEGIN SELECT RAISE(ABORT, 'injected failure'); END`); err != nil {
			t.Fatal(err)
		}
	default:
		t.Fatalf("unknown store %T", store)
	}
}

// 6. Client disconnect: cancel stops n8n and keeps what was relayed;
// finish reads the reply to its end and stores it whole.
func TestChatClientDisconnect(t *testing.T) {
	t.Parallel()
	for _, kind := range storeKinds {
		t.Run(kind+"/cancel mid-stream", func(t *testing.T) {
			t.Parallel()
			e := newChatEnv(t, chatEnvOpts{kind: kind})
			never := make(chan struct{})
			e.fake.SetScript(e.fake.Then("Partial words ", never, func(http.ResponseWriter, *http.Request) {}))
			s := e.newSession(t)
			ctx, cancel := context.WithCancel(context.Background())
			defer cancel()
			resp := e.doCtx(t, ctx, "POST", "/api/v1/chat/message", `{"message":"Long answer please"}`, authz(s.Token))
			if got := itemOf(t, nextSSE(t, afterBegin(t, resp.Body))); got != "Partial words " {
				t.Fatalf("first event %q", got)
			}
			cancel() // the visitor closes the tab
			testkit.AwaitSignal(t, e.fake.Last(t).Canceled(), "n8n to see its request cancelled")
			e.waitIdle(t)
			wantExchange(t, e.history(t, s.Token), "Long answer please", "Partial words ", "partial")
			if e.fake.Hits() != 1 {
				t.Fatalf("hits %d", e.fake.Hits())
			}
		})
		t.Run(kind+"/cancel before the first byte", func(t *testing.T) {
			t.Parallel()
			e := newChatEnv(t, chatEnvOpts{kind: kind})
			e.fake.SetScript(e.fake.Hanging())
			s := e.newSession(t)
			ctx, cancel := context.WithCancel(context.Background())
			defer cancel()
			errc := make(chan error, 1)
			go func() {
				r, _ := http.NewRequestWithContext(ctx, "POST", e.srv.URL+"/api/v1/chat/message", strings.NewReader(`{"message":"Anyone?"}`))
				r.Header.Set("Content-Type", "application/json")
				r.Header.Set("User-Agent", chatUA)
				r.Header.Set("Authorization", "Bearer "+s.Token)
				resp, err := e.client.Do(r)
				if err == nil {
					resp.Body.Close()
				}
				errc <- err
			}()
			c := e.fake.WaitCall(t)
			cancel()
			if err := <-errc; err == nil {
				t.Fatal("the request finished although the client left")
			}
			testkit.AwaitSignal(t, c.Canceled(), "n8n to see its request cancelled")
			e.waitIdle(t)
			wantExchange(t, e.history(t, s.Token), "Anyone?", "", "error")
		})
		t.Run(kind+"/finish", func(t *testing.T) {
			t.Parallel()
			e := newChatEnv(t, chatEnvOpts{kind: kind, mutate: func(c *envConfig) { c.FinishOnDisconnect = true }})
			clientGone := make(chan struct{})
			var ctxErrAtEnd atomic.Value
			e.fake.SetScript(e.fake.Then("First part, ", clientGone, func(w http.ResponseWriter, r *http.Request) {
				for _, l := range []string{testkit.N8nLine("item", "second part, "), testkit.N8nKeepalive, testkit.N8nLine("item", "last part."), testkit.N8nLine("end", "")} {
					_, _ = io.WriteString(w, l)
					testkit.Flush(w)
				}
				ctxErrAtEnd.Store(fmt.Sprint(r.Context().Err()))
			}))
			s := e.newSession(t)
			ctx, cancel := context.WithCancel(context.Background())
			defer cancel()
			resp := e.doCtx(t, ctx, "POST", "/api/v1/chat/message", `{"message":"Long answer please"}`, authz(s.Token))
			proxyCtx := <-e.reqCtxs
			if got := itemOf(t, nextSSE(t, afterBegin(t, resp.Body))); got != "First part, " {
				t.Fatalf("first event %q", got)
			}
			cancel()
			testkit.AwaitSignal(t, proxyCtx.Done(), "the proxy to see the client leave")
			close(clientGone) // only now does n8n write the rest
			c := e.fake.Last(t)
			testkit.AwaitSignal(t, c.Finished(), "n8n to finish its reply")
			e.waitIdle(t)
			if c.WasCanceled() || ctxErrAtEnd.Load() != "<nil>" {
				t.Fatalf("finish mode cancelled the n8n request (ctx err at end: %v)", ctxErrAtEnd.Load())
			}
			wantExchange(t, e.history(t, s.Token), "Long answer please", "First part, second part, last part.", "complete")
		})
	}
}

// 7. The request n8n receives: body, token and headers.
func TestChatRequestToN8n(t *testing.T) {
	t.Parallel()
	e := newChatEnv(t, chatEnvOpts{mutate: func(c *envConfig) { c.Upstream.TokenTTL = 45 * time.Second }})
	e.fake.SetScript(testkit.Output("Hi!"))
	s := e.newSession(t)
	before := time.Now()
	rec := e.serve(t, "POST", "/api/v1/chat/message",
		`{"message":"Hello n8n","context":{"page_title":"Pricing","cart":{"items":2,"tags":["a","b"]}},"page_url":"https://shop.example.com/pricing"}`,
		map[string]string{
			"Authorization":   "Bearer " + s.Token,
			"Cookie":          "chat_session=" + s.Token + "; other=1",
			"Origin":          allowedOrigin,
			"Accept":          "application/json",
			"X-Forwarded-For": "198.51.100.99",
		})
	if rec.Code != 200 {
		t.Fatalf("%d %s", rec.Code, rec.Body)
	}
	c := e.fake.Last(t)
	if c.Method != "POST" || c.Path != testkit.WebhookPath {
		t.Fatalf("%s %s", c.Method, c.Path)
	}
	if got := c.Header.Get("Content-Type"); got != "application/json" {
		t.Errorf("Content-Type %q", got)
	}
	if got := c.Header.Get("Accept"); got != "application/json, application/x-ndjson, text/plain" {
		t.Errorf("Accept %q", got)
	}
	keys := slices.Sorted(maps.Keys(c.Fields))
	if want := []string{"action", "chatInput", "jwt_token", "message", "metadata", "session", "sessionId", "timestamp"}; !slices.Equal(keys, want) {
		t.Errorf("body keys %v, want %v", keys, want)
	}
	b := c.Body
	if b.Action != "sendMessage" || b.SessionID != s.SessionID || b.ChatInput != "Hello n8n" || b.Message != "Hello n8n" {
		t.Errorf("body %s", c.Raw)
	}
	var gotMeta, wantMeta any
	_ = json.Unmarshal(b.Metadata, &gotMeta)
	_ = json.Unmarshal([]byte(`{"page_title":"Pricing","cart":{"items":2,"tags":["a","b"]}}`), &wantMeta)
	if !reflect.DeepEqual(gotMeta, wantMeta) {
		t.Errorf("metadata %s is not the client's context", b.Metadata)
	}
	ss := b.Session
	if ss.SessionID != s.SessionID || ss.OriginDomain != "shop.example.com" || ss.PageURL != "https://shop.example.com/pricing" ||
		ss.ClientIP != chatClientIP || ss.UserAgent != chatUA || ss.MessageCount != 1 {
		t.Errorf("session %+v", ss)
	}
	ts, err := time.Parse(time.RFC3339, b.Timestamp)
	if err != nil || ts.Before(before.Add(-time.Second)) || ts.After(time.Now().Add(time.Second)) {
		t.Errorf("timestamp %q: %v", b.Timestamp, err)
	}

	// The token: an independent parser pinned to HS256 with session_secret.
	token, ok := strings.CutPrefix(c.Header.Get("Authorization"), "Bearer ")
	if !ok || token != b.JWTToken {
		t.Fatalf("Authorization %q, body jwt_token %q", c.Header.Get("Authorization"), b.JWTToken)
	}
	claims := verifyN8nToken(t, token)
	exp, iat, nbf := claimInt(t, claims, "exp"), claimInt(t, claims, "iat"), claimInt(t, claims, "nbf")
	if exp-iat != 45 || nbf > iat || iat < before.Unix()-1 || iat > time.Now().Unix()+1 {
		t.Errorf("exp %d, iat %d, nbf %d: want exp-iat = n8n_token_ttl (45)", exp, iat, nbf)
	}
	for k, want := range map[string]string{
		"iss": "caddy-chatproxy", "sub": s.SessionID, "session_id": s.SessionID, "origin_domain": "shop.example.com",
		"page_url": "https://shop.example.com/pricing", "client_ip": chatClientIP, "user_agent": chatUA, "type": "n8n_chat",
	} {
		if claims[k] != want {
			t.Errorf("claim %s = %v, want %q", k, claims[k], want)
		}
	}
	if aud, _ := claims.GetAudience(); !slices.Equal(aud, jwt.ClaimStrings{"n8n"}) {
		t.Errorf("aud %v", aud)
	}
	jti, _ := claims["jti"].(string)
	if jti == "" {
		t.Error("no jti")
	}
	if _, err := jwt.NewParser(jwt.WithValidMethods([]string{"HS256"})).Parse(token, func(*jwt.Token) (any, error) { return []byte(testJWTSecret), nil }); err == nil {
		t.Error("the n8n token verifies with jwt_secret: it must be signed with session_secret only")
	}

	// Nothing of the client's own credentials reaches n8n.
	if c.Header.Get("Cookie") != "" {
		t.Errorf("Cookie forwarded: %q", c.Header.Get("Cookie"))
	}
	for k, vs := range c.Header {
		for _, v := range vs {
			if strings.Contains(v, s.Token) || strings.Contains(v, "198.51.100.99") {
				t.Errorf("header %s forwards the client's %q", k, v)
			}
		}
	}
	if bytes.Contains(c.Raw, []byte(s.Token)) {
		t.Error("the body holds the visitor's session token")
	}

	// A second message: message_count counts both sides, the page falls
	// back to the session's, and every token is new.
	rec = e.serve(t, "POST", "/api/v1/chat/message", `{"message":"And again"}`, authz(s.Token, "Accept", "application/json"))
	if rec.Code != 200 {
		t.Fatalf("%d %s", rec.Code, rec.Body)
	}
	c2 := e.fake.Last(t)
	if c2.Body.Session.MessageCount != 3 || c2.Body.Session.PageURL != "https://shop.example.com/p/1" || string(c2.Body.Metadata) != "{}" {
		t.Errorf("second request: session %+v, metadata %s", c2.Body.Session, c2.Body.Metadata)
	}
	if jti2, _ := verifyN8nToken(t, c2.Body.JWTToken)["jti"].(string); jti2 == "" || jti2 == jti {
		t.Errorf("jti %q reused or missing", jti2)
	}
}

// verifyN8nToken parses the n8n token as n8n should: HS256 only, with
// session_secret; it also insists on exp, iss, aud and a sane iat.
func verifyN8nToken(t *testing.T, token string) jwt.MapClaims {
	t.Helper()
	claims := jwt.MapClaims{}
	parsed, err := jwt.NewParser(
		jwt.WithValidMethods([]string{"HS256"}),
		jwt.WithIssuer("caddy-chatproxy"),
		jwt.WithAudience("n8n"),
		jwt.WithExpirationRequired(),
		jwt.WithIssuedAt(),
	).ParseWithClaims(token, claims, func(*jwt.Token) (any, error) { return []byte(testSessionSecret), nil })
	if err != nil || !parsed.Valid || parsed.Header["alg"] != "HS256" {
		t.Fatalf("n8n token does not verify: %v (%v)", err, parsed)
	}
	return claims
}

func claimInt(t *testing.T, c jwt.MapClaims, k string) int64 {
	t.Helper()
	f, ok := c[k].(float64)
	if !ok {
		t.Fatalf("claim %s = %v", k, c[k])
	}
	return int64(f)
}

// 7. upstream_auth basic, header and none send what they should.
func TestChatUpstreamAuthModes(t *testing.T) {
	t.Parallel()
	tests := []struct {
		name  string
		auth  n8n.Auth
		check func(t *testing.T, h http.Header)
	}{
		{"basic", n8n.Auth{Mode: "basic", Username: "n8n-user", Password: "p@ss:word é"}, func(t *testing.T, h http.Header) {
			r := http.Request{Header: h}
			u, p, ok := r.BasicAuth()
			if !ok || u != "n8n-user" || p != "p@ss:word é" {
				t.Errorf("basic auth %q %q %v (Authorization %q)", u, p, ok, h.Get("Authorization"))
			}
		}},
		{"header", n8n.Auth{Mode: "header", HeaderName: "X-N8N-Key", HeaderValue: "key-0123456789"}, func(t *testing.T, h http.Header) {
			if h.Get("X-N8N-Key") != "key-0123456789" || h.Get("Authorization") != "" {
				t.Errorf("X-N8N-Key %q, Authorization %q", h.Get("X-N8N-Key"), h.Get("Authorization"))
			}
		}},
		{"none", n8n.Auth{Mode: "none"}, func(t *testing.T, h http.Header) {
			if h.Get("Authorization") != "" || h.Get("X-N8N-Key") != "" {
				t.Errorf("credentials sent: %v", h)
			}
		}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			t.Parallel()
			e := newChatEnv(t, chatEnvOpts{mutate: func(c *envConfig) { c.Upstream.Auth = tt.auth }})
			e.fake.RequireJWT("") // n8n's Webhook node with basic, header or no auth
			e.fake.SetScript(testkit.Output("ok"))
			s := e.newSession(t)
			rec := e.serve(t, "POST", "/api/v1/chat/message", `{"message":"auth check"}`,
				authz(s.Token, "Accept", "application/json", "Cookie", "chat_session="+s.Token))
			if rec.Code != 200 {
				t.Fatalf("%d %s", rec.Code, rec.Body)
			}
			c := e.fake.Last(t)
			tt.check(t, c.Header)
			if c.Header.Get("Cookie") != "" || strings.Contains(c.Header.Get("Authorization"), s.Token) {
				t.Errorf("client credentials forwarded: %v", c.Header)
			}
		})
	}
}

// 8. GET /chat/stream: EventSource with the cookie, which needs browser
// evidence of an allowed origin.
func TestChatStreamGET(t *testing.T) {
	t.Parallel()
	e := newChatEnv(t, chatEnvOpts{})
	e.fake.SetScript(testkit.Stream("Event", "Source"))
	s := e.newSession(t)
	cookie := "chat_session=" + s.Token
	msg := "héllo & <b>?"
	path := "/api/v1/chat/stream?message=" + url.QueryEscape(msg) + "&page_url=" + url.QueryEscape("https://shop.example.com/faq")
	for _, tt := range []struct {
		name    string
		headers map[string]string
		status  int
		code    string
	}{
		{"allowed origin", map[string]string{"Cookie": cookie, "Origin": allowedOrigin}, 200, ""},
		{"same-origin fetch", map[string]string{"Cookie": cookie, "Sec-Fetch-Site": "same-origin"}, 200, ""},
		{"no browser evidence", map[string]string{"Cookie": cookie}, 403, "csrf_refused"},
		{"cross-site", map[string]string{"Cookie": cookie, "Sec-Fetch-Site": "cross-site"}, 403, "csrf_refused"},
		{"disallowed origin", map[string]string{"Cookie": cookie, "Origin": "https://evil.example.com"}, 403, "origin_not_allowed"},
		{"no credentials", map[string]string{"Origin": allowedOrigin}, 401, "unauthorized"},
	} {
		t.Run(tt.name, func(t *testing.T) {
			hits := e.fake.Hits()
			resp := e.do(t, "GET", path, "", tt.headers)
			raw, _ := io.ReadAll(resp.Body)
			if resp.StatusCode != tt.status {
				t.Fatalf("status %d, want %d: %s", resp.StatusCode, tt.status, raw)
			}
			if tt.code != "" {
				var ae apiErr
				if err := json.Unmarshal(raw, &ae); err != nil || ae.Error != tt.code {
					t.Fatalf("body %s, want error %s", raw, tt.code)
				}
				if e.fake.Hits() != hits {
					t.Fatal("n8n was called for a refused request")
				}
				return
			}
			if resp.Header.Get("Content-Type") != "text/event-stream" {
				t.Fatalf("Content-Type %q", resp.Header.Get("Content-Type"))
			}
			events := replyEvents(t, testkit.ParseSSE(string(raw)))
			if len(events) != 3 || itemOf(t, events[0])+itemOf(t, events[1]) != "EventSource" {
				t.Fatalf("stream %q", raw)
			}
			wantDone(t, events[2])
			c := e.fake.Last(t)
			if e.fake.Hits() != hits+1 || c.Body.ChatInput != msg || c.Body.Session.PageURL != "https://shop.example.com/faq" {
				t.Fatalf("n8n got %s", c.Raw)
			}
			if c.Header.Get("Cookie") != "" {
				t.Fatal("the cookie reached n8n")
			}
		})
	}
	// A GET without a message is refused like a POST.
	resp := e.do(t, "GET", "/api/v1/chat/stream", "", map[string]string{"Cookie": cookie, "Origin": allowedOrigin})
	if resp.StatusCode != 400 {
		t.Fatalf("no message: %d", resp.StatusCode)
	}
}

// 9. Input validation: nothing invalid is stored or reaches n8n.
func TestChatInputValidation(t *testing.T) {
	t.Parallel()
	e := newChatEnv(t, chatEnvOpts{mutate: func(c *envConfig) { c.MaxMessageLength = 20 }})
	e.fake.SetScript(testkit.Output("ok"))
	s := e.newSession(t)
	for _, tt := range []struct {
		name, body, code string
	}{
		{"empty", `{"message":""}`, "invalid_request"},
		{"missing", `{}`, "invalid_request"},
		{"white space only", `{"message":" \n\t \r\n "}`, "invalid_request"},
		{"too long in runes", `{"message":"` + strings.Repeat("é", 21) + `"}`, "invalid_request"},
		{"NUL", `{"message":"hi\u0000there"}`, "invalid_request"},
		{"bell", `{"message":"hi\u0007"}`, "invalid_request"},
		{"escape sequence", `{"message":"\u001b[31mred"}`, "invalid_request"},
		{"DEL", `{"message":"hi\u007f"}`, "invalid_request"},
		{"C1 control", `{"message":"hi\u0085"}`, "invalid_request"},
		{"message not a string", `{"message":5}`, "invalid_request"},
		{"context is an array", `{"message":"hi","context":[1,2]}`, "invalid_request"},
		{"context is a string", `{"message":"hi","context":"x"}`, "invalid_request"},
		{"context is a number", `{"message":"hi","context":5}`, "invalid_request"},
		{"javascript page_url", `{"message":"hi","page_url":"javascript:alert(1)"}`, "invalid_request"},
		{"trailing data", `{"message":"hi"} {}`, "invalid_json"},
		{"not json", `message=hi`, "invalid_json"},
	} {
		t.Run(tt.name, func(t *testing.T) {
			for _, path := range []string{"/api/v1/chat/message", "/api/v1/chat/stream"} {
				wantError(t, e.serve(t, "POST", path, tt.body, authz(s.Token)), 400, tt.code)
			}
		})
	}
	for _, q := range []string{"", "message=", "message=%20%20", "message=a%00b", "message=" + strings.Repeat("x", 21)} {
		rec := e.serve(t, "GET", "/api/v1/chat/stream?"+q, "", authz(s.Token))
		wantError(t, rec, 400, "invalid_request")
	}
	if e.fake.Hits() != 0 {
		t.Fatalf("n8n was called %d times", e.fake.Hits())
	}
	if h := e.history(t, s.Token); h.TotalCount != 0 {
		t.Fatalf("invalid messages were stored: %+v", h)
	}
	if n := e.messageCount(t, s.Token); n != 0 {
		t.Fatalf("message_count %d", n)
	}

	// The limit is in runes, after trimming; context may be null.
	long := strings.Repeat("é", 20)
	rec := e.serve(t, "POST", "/api/v1/chat/message", `{"message":"  `+long+` \n","context":null}`, authz(s.Token, "Accept", "application/json"))
	if rec.Code != 200 {
		t.Fatalf("%d %s", rec.Code, rec.Body)
	}
	if c := e.fake.Last(t); c.Body.ChatInput != long || string(c.Body.Metadata) != "{}" {
		t.Fatalf("n8n got %s", c.Raw)
	}
}

// 9. "\r\n" and "\r" become "\n" in what n8n receives and what is stored;
// tabs and inner new lines are kept.
func TestChatNewlineNormalisation(t *testing.T) {
	t.Parallel()
	for _, kind := range storeKinds {
		t.Run(kind, func(t *testing.T) {
			t.Parallel()
			e := newChatEnv(t, chatEnvOpts{kind: kind})
			e.fake.SetScript(testkit.Output("noted"))
			s := e.newSession(t)
			const sent = `"first line\r\nsecond line\rthird\tcolumn\n\nlast\r\n"`
			const want = "first line\nsecond line\nthird\tcolumn\n\nlast"
			rec := e.serve(t, "POST", "/api/v1/chat/message", `{"message":`+sent+`}`, authz(s.Token, "Accept", "application/json"))
			if rec.Code != 200 {
				t.Fatalf("%d %s", rec.Code, rec.Body)
			}
			if c := e.fake.Last(t); c.Body.ChatInput != want || c.Body.Message != want {
				t.Fatalf("n8n got chatInput %q, message %q", c.Body.ChatInput, c.Body.Message)
			}
			wantExchange(t, e.history(t, s.Token), want, "noted", "complete")

			rec = e.serve(t, "POST", "/api/v1/n8n/chat", `{"action":"sendMessage","sessionId":"newline-widget","chatInput":`+sent+`}`,
				map[string]string{"Origin": allowedOrigin})
			if rec.Code != 200 {
				t.Fatalf("%d %s", rec.Code, rec.Body)
			}
			if c := e.fake.Last(t); c.Body.ChatInput != want {
				t.Fatalf("n8n got chatInput %q", c.Body.ChatInput)
			}
			data := e.widgetLoad(t, allowedOrigin, "newline-widget")
			if len(data) != 2 || data[0].Kwargs["content"] != want {
				t.Fatalf("widget history %+v", data)
			}
		})
	}
}

// 9. The honeypot: a normal-looking reply, n8n not called, nothing stored.
func TestChatHoneypot(t *testing.T) {
	t.Parallel()
	e := newChatEnv(t, chatEnvOpts{})
	e.fake.SetScript(testkit.Output("must not be used"))
	s := e.newSession(t)
	body := `{"message":"Cheap pills here","website":"http://spam.example"}`

	rec := e.serve(t, "POST", "/api/v1/chat/message", body, authz(s.Token))
	events := testkit.ParseSSE(rec.Body.String())
	if rec.Code != 200 || rec.Header().Get("Content-Type") != "text/event-stream" || rec.Header().Get("X-Message-ID") == "" || len(events) != 4 {
		t.Fatalf("SSE: %d %v %s", rec.Code, rec.Header(), rec.Body)
	}
	events = replyEvents(t, events)
	if reply := itemOf(t, events[0]); reply == "" || strings.Contains(reply, "must not") {
		t.Fatalf("reply %q", reply)
	}
	wantDone(t, events[1])

	rec = e.serve(t, "POST", "/api/v1/chat/message", body, authz(s.Token, "Accept", "application/json"))
	var j map[string]string
	if err := json.Unmarshal(rec.Body.Bytes(), &j); err != nil || rec.Code != 200 || j["response"] == "" || j["session_id"] != s.SessionID || j["message_id"] == "" {
		t.Fatalf("JSON: %d %s", rec.Code, rec.Body)
	}

	if e.fake.Hits() != 0 {
		t.Fatalf("n8n was called %d times for a bot", e.fake.Hits())
	}
	if h := e.history(t, s.Token); h.TotalCount != 0 {
		t.Fatalf("the bot's message was stored: %+v", h)
	}
	if n := e.messageCount(t, s.Token); n != 0 {
		t.Fatalf("message_count %d", n)
	}
}

// lcMessage is a LangChain-serialised message as @n8n/chat reads it.
type lcMessage struct {
	LC     int            `json:"lc"`
	Type   string         `json:"type"`
	ID     []string       `json:"id"`
	Kwargs map[string]any `json:"kwargs"`
}

// widgetLoad sends the widget's loadPreviousSession exactly as @n8n/chat
// does and returns the data.
func (e *chatEnv) widgetLoad(t *testing.T, origin, sessionID string) []lcMessage {
	t.Helper()
	rec := e.serve(t, "POST", "/api/v1/n8n/chat", `{"action":"loadPreviousSession","sessionId":"`+sessionID+`","metadata":{}}`,
		map[string]string{"Origin": origin, "Content-Type": "application/json"})
	if rec.Code != 200 || rec.Header().Get("Content-Type") != "application/json; charset=utf-8" {
		t.Fatalf("loadPreviousSession: %d %s", rec.Code, rec.Body)
	}
	var body struct {
		Data []lcMessage `json:"data"`
	}
	if err := json.Unmarshal(rec.Body.Bytes(), &body); err != nil || body.Data == nil {
		t.Fatalf("loadPreviousSession body %s: %v", rec.Body, err)
	}
	return body.Data
}

// 10. The @n8n/chat compat route with the widget's own requests.
func TestWidgetCompat(t *testing.T) {
	t.Parallel()
	for _, kind := range storeKinds {
		t.Run(kind, func(t *testing.T) {
			t.Parallel()
			e := newChatEnv(t, chatEnvOpts{kind: kind})
			// The bodies and headers of @n8n/chat's own tests (research §1.2).
			const sid = "test-session-id"
			const streamBody = `{"action":"sendMessage","sessionId":"test-session-id","chatInput":"Test message","metadata":{"userId":"user-123","source":"chat-widget"}}`

			if data := e.widgetLoad(t, allowedOrigin, sid); len(data) != 0 {
				t.Fatalf("fresh session has history %+v", data)
			}
			if e.fake.Hits() != 0 {
				t.Fatal("loadPreviousSession reached n8n")
			}

			// Streaming mode: NDJSON line by line.
			gate := testkit.NewStreamGate()
			e.fake.SetScript(e.fake.Gated(gate, false, "Hello ", "from ", "n8n!"))
			resp := e.do(t, "POST", "/api/v1/n8n/chat", streamBody, map[string]string{"Origin": allowedOrigin, "Accept": "text/plain"})
			if resp.StatusCode != 200 || resp.Header.Get("Cache-Control") != "no-cache, no-transform" || resp.Header.Get("Access-Control-Allow-Origin") != allowedOrigin {
				t.Fatalf("%d %v", resp.StatusCode, resp.Header)
			}
			br := bufio.NewReader(resp.Body)
			if l := nextNDJSON(t, br); l.Type != "begin" {
				t.Fatalf("first line %+v", l)
			}
			for i, want := range []string{"Hello ", "from ", "n8n!"} {
				l := nextNDJSON(t, br)
				if l.Type != "item" || *l.Content != want {
					t.Fatalf("line %d: %+v", i+2, l)
				}
				if n := gate.Written.Load(); n != int32(i+1) {
					t.Fatalf("read item %d while n8n had written %d", i+1, n)
				}
				gate.Next(t)
			}
			if l := nextNDJSON(t, br); l.Type != "end" {
				t.Fatalf("last line %+v", l)
			}
			wantStreamEnd(t, br)
			e.waitIdle(t)
			c := e.fake.Last(t)
			var meta map[string]string
			_ = json.Unmarshal(c.Body.Metadata, &meta)
			if c.Body.ChatInput != "Test message" || c.Body.Action != "sendMessage" || meta["userId"] != "user-123" || meta["source"] != "chat-widget" ||
				c.Body.SessionID == "" || c.Body.Session.OriginDomain != "shop.example.com" {
				t.Fatalf("n8n got %s", c.Raw)
			}
			upstreamSID := c.Body.SessionID

			// Non-streaming mode: {"output": …}.
			e.fake.SetScript(testkit.Stream("Second ", "answer"))
			rec := e.serve(t, "POST", "/api/v1/n8n/chat", `{"action":"sendMessage","sessionId":"test-session-id","chatInput":"Another one","metadata":{}}`,
				map[string]string{"Origin": allowedOrigin, "Accept": "*/*"})
			if rec.Code != 200 || rec.Body.String() != `{"output":"Second answer"}`+"\n" {
				t.Fatalf("%d %s", rec.Code, rec.Body)
			}
			if c := e.fake.Last(t); c.Body.SessionID != upstreamSID {
				t.Fatalf("the same widget session reached n8n as %q then %q", upstreamSID, c.Body.SessionID)
			}

			// loadPreviousSession: the store, in LangChain's shape; no n8n.
			hits := e.fake.Hits()
			rec = e.serve(t, "POST", "/api/v1/n8n/chat", `{"action":"loadPreviousSession","sessionId":"test-session-id","metadata":{}}`,
				map[string]string{"Origin": allowedOrigin})
			var got, want any
			_ = json.Unmarshal(rec.Body.Bytes(), &got)
			_ = json.Unmarshal([]byte(`{"data":[
				{"lc":1,"type":"constructor","id":["langchain_core","messages","HumanMessage"],"kwargs":{"content":"Test message","additional_kwargs":{},"response_metadata":{}}},
				{"lc":1,"type":"constructor","id":["langchain_core","messages","AIMessage"],"kwargs":{"content":"Hello from n8n!","tool_calls":[],"invalid_tool_calls":[],"additional_kwargs":{},"response_metadata":{}}},
				{"lc":1,"type":"constructor","id":["langchain_core","messages","HumanMessage"],"kwargs":{"content":"Another one","additional_kwargs":{},"response_metadata":{}}},
				{"lc":1,"type":"constructor","id":["langchain_core","messages","AIMessage"],"kwargs":{"content":"Second answer","tool_calls":[],"invalid_tool_calls":[],"additional_kwargs":{},"response_metadata":{}}}
			]}`), &want)
			if rec.Code != 200 || !reflect.DeepEqual(got, want) {
				t.Fatalf("loadPreviousSession: %d %s", rec.Code, rec.Body)
			}
			if e.fake.Hits() != hits {
				t.Fatal("loadPreviousSession reached n8n")
			}

			// The same sessionId from another allowed origin is another
			// conversation.
			const otherOrigin = "https://a.example.org"
			if data := e.widgetLoad(t, otherOrigin, sid); len(data) != 0 {
				t.Fatalf("another site reads the conversation: %+v", data)
			}
			e.fake.SetScript(testkit.Output("Other site"))
			rec = e.serve(t, "POST", "/api/v1/n8n/chat", `{"action":"sendMessage","sessionId":"test-session-id","chatInput":"From elsewhere","metadata":{}}`,
				map[string]string{"Origin": otherOrigin})
			if rec.Code != 200 {
				t.Fatalf("%d %s", rec.Code, rec.Body)
			}
			if c := e.fake.Last(t); c.Body.SessionID == upstreamSID || c.Body.Session.OriginDomain != "a.example.org" {
				t.Fatalf("other site reached n8n as session %q (%s)", c.Body.SessionID, c.Body.Session.OriginDomain)
			}
			if data := e.widgetLoad(t, otherOrigin, sid); len(data) != 2 || data[0].Kwargs["content"] != "From elsewhere" {
				t.Fatalf("other site's conversation %+v", data)
			}
			if data := e.widgetLoad(t, allowedOrigin, sid); len(data) != 4 {
				t.Fatalf("first site's conversation changed: %+v", data)
			}

			// A visitor session's id names no widget conversation.
			s := e.newSession(t)
			rec = e.serve(t, "POST", "/api/v1/chat/message", `{"message":"visitor secret"}`, authz(s.Token, "Accept", "application/json"))
			if rec.Code != 200 {
				t.Fatalf("%d %s", rec.Code, rec.Body)
			}
			if data := e.widgetLoad(t, allowedOrigin, s.SessionID); len(data) != 0 {
				t.Fatalf("a widget read a visitor's history: %+v", data)
			}
		})
	}
}

func TestWidgetCompatErrors(t *testing.T) {
	t.Parallel()
	e := newChatEnv(t, chatEnvOpts{})
	e.fake.SetScript(testkit.Output("ok"))
	origin := map[string]string{"Origin": allowedOrigin}
	for _, tt := range []struct {
		name, body string
		headers    map[string]string
		status     int
		code       string
	}{
		{"sessionId too short", `{"action":"sendMessage","sessionId":"short","chatInput":"hi"}`, origin, 400, "invalid_request"},
		{"sessionId too long", `{"action":"sendMessage","sessionId":"` + strings.Repeat("a", 129) + `","chatInput":"hi"}`, origin, 400, "invalid_request"},
		{"sessionId with spaces", `{"action":"sendMessage","sessionId":"has spaces in it","chatInput":"hi"}`, origin, 400, "invalid_request"},
		{"sessionId path", `{"action":"loadPreviousSession","sessionId":"../../etc/passwd"}`, origin, 400, "invalid_request"},
		{"sessionId not a string", `{"action":"sendMessage","sessionId":12345678,"chatInput":"hi"}`, origin, 400, "invalid_request"},
		{"unknown action", `{"action":"deleteSession","sessionId":"valid-session-1","chatInput":"hi"}`, origin, 400, "invalid_request"},
		{"missing action", `{"sessionId":"valid-session-1","chatInput":"hi"}`, origin, 400, "invalid_request"},
		{"missing sessionId", `{"action":"sendMessage","chatInput":"hi"}`, origin, 400, "invalid_request"},
		{"missing chatInput", `{"action":"sendMessage","sessionId":"valid-session-1"}`, origin, 400, "invalid_request"},
		{"empty chatInput", `{"action":"sendMessage","sessionId":"valid-session-1","chatInput":"  "}`, origin, 400, "invalid_request"},
		{"control character", `{"action":"sendMessage","sessionId":"valid-session-1","chatInput":"a\u0000b"}`, origin, 400, "invalid_request"},
		{"metadata not an object", `{"action":"sendMessage","sessionId":"valid-session-1","chatInput":"hi","metadata":"[object Object]"}`, origin, 400, "invalid_request"},
		{"multipart upload", "--b\r\nContent-Disposition: form-data; name=\"action\"\r\n\r\nsendMessage\r\n--b--\r\n",
			map[string]string{"Origin": allowedOrigin, "Content-Type": "multipart/form-data; boundary=b"}, 415, "unsupported_media_type"},
		{"disallowed origin", `{"action":"loadPreviousSession","sessionId":"valid-session-1"}`, map[string]string{"Origin": "https://evil.example.com"}, 403, "origin_not_allowed"},
	} {
		t.Run(tt.name, func(t *testing.T) {
			rec := e.serve(t, "POST", "/api/v1/n8n/chat", tt.body, tt.headers)
			wantError(t, rec, tt.status, tt.code)
			if tt.status == 415 && !strings.Contains(decode[apiErr](t, rec).Message, "upload") {
				t.Fatalf("415 message does not say uploads are unsupported: %s", rec.Body)
			}
		})
	}
	for _, method := range []string{"GET", "PUT", "DELETE", "PATCH"} {
		rec := e.serve(t, method, "/api/v1/n8n/chat", "", origin)
		wantError(t, rec, 405, "method_not_allowed")
		if rec.Header().Get("Allow") != "POST, OPTIONS" {
			t.Fatalf("%s: Allow %q", method, rec.Header().Get("Allow"))
		}
	}
	if e.fake.Hits() != 0 {
		t.Fatalf("n8n was called %d times", e.fake.Hits())
	}
	// Failures before the first byte are a non-2xx status in either mode,
	// which the widget shows as an error; executionStarted is refused.
	e.fake.SetScript(testkit.JSONReply(`{"executionStarted":true,"executionId":"9","resumeToken":"t"}`))
	for _, accept := range []string{"text/plain", "*/*"} {
		rec := e.serve(t, "POST", "/api/v1/n8n/chat", `{"action":"sendMessage","sessionId":"exec-started-1","chatInput":"hi","metadata":{}}`,
			map[string]string{"Origin": allowedOrigin, "Accept": accept})
		wantError(t, rec, 502, "upstream_error")
	}
}

// 10. The preflight: 204 without a body or chunked framing, so the next
// request on the same connection is read correctly (research §7).
func TestWidgetPreflight(t *testing.T) {
	t.Parallel()
	e := newChatEnv(t, chatEnvOpts{})
	conn, err := net.Dial("tcp", e.srv.Listener.Addr().String())
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close()
	_ = conn.SetDeadline(time.Now().Add(10 * time.Second))
	br := bufio.NewReader(conn)
	fmt.Fprintf(conn, "OPTIONS /api/v1/n8n/chat HTTP/1.1\r\nHost: api.example.net\r\nOrigin: %s\r\n"+
		"Access-Control-Request-Method: POST\r\nAccess-Control-Request-Headers: content-type\r\n\r\n", allowedOrigin)
	resp, err := http.ReadResponse(br, nil)
	if err != nil {
		t.Fatal(err)
	}
	body, _ := io.ReadAll(resp.Body)
	h := resp.Header
	if resp.StatusCode != 204 || len(body) != 0 || len(resp.TransferEncoding) != 0 || h.Get("Content-Length") != "" ||
		h.Get("Access-Control-Allow-Origin") != allowedOrigin || !strings.Contains(h.Get("Access-Control-Allow-Methods"), "POST") ||
		!strings.Contains(strings.ToLower(h.Get("Access-Control-Allow-Headers")), "content-type") ||
		!strings.Contains(strings.Join(h.Values("Vary"), ","), "Origin") {
		t.Fatalf("preflight: %d %v %q", resp.StatusCode, h, body)
	}
	const load = `{"action":"loadPreviousSession","sessionId":"preflight-session","metadata":{}}`
	fmt.Fprintf(conn, "POST /api/v1/n8n/chat HTTP/1.1\r\nHost: api.example.net\r\nOrigin: %s\r\nContent-Type: application/json\r\n"+
		"User-Agent: %s\r\nContent-Length: %d\r\n\r\n%s", allowedOrigin, chatUA, len(load), load)
	resp, err = http.ReadResponse(br, nil)
	if err != nil {
		t.Fatalf("the request after the preflight: %v", err)
	}
	body, _ = io.ReadAll(resp.Body)
	if resp.StatusCode != 200 || string(body) != `{"data":[]}`+"\n" {
		t.Fatalf("after the preflight: %d %q", resp.StatusCode, body)
	}
	if e.fake.Hits() != 0 {
		t.Fatal("n8n was called")
	}
	// A disallowed origin's preflight is refused outright.
	rec := e.serve(t, "OPTIONS", "/api/v1/n8n/chat", "", map[string]string{"Origin": "https://evil.example.com", "Access-Control-Request-Method": "POST"})
	wantError(t, rec, 403, "origin_not_allowed")
}

// A multi-megabyte reply is relayed whole; a line over n8n's line limit
// (1 MiB, the n8n client's default) ends the stream with an error after
// what was relayed.
func TestChatLargeReplies(t *testing.T) {
	t.Parallel()
	e := newChatEnv(t, chatEnvOpts{})
	s := e.newSession(t)

	chunk := strings.Repeat("0123456789abcdef", 256) // 4 KiB
	const n = 768                                    // 3 MiB in all
	e.fake.SetScript(func(w http.ResponseWriter, _ *http.Request, _ *testkit.Call) {
		testkit.N8nStreamHead(w)
		_, _ = io.WriteString(w, testkit.N8nLine("begin", ""))
		for i := range n {
			_, _ = io.WriteString(w, testkit.N8nLine("item", fmt.Sprintf("%04d", i)+chunk))
		}
		_, _ = io.WriteString(w, testkit.N8nLine("end", ""))
	})
	resp := e.do(t, "POST", "/api/v1/chat/message", `{"message":"Send me a book"}`, authz(s.Token))
	br := afterBegin(t, resp.Body)
	var total int
	for i := range n {
		ev := nextSSE(t, br)
		got := itemOf(t, ev)
		if got != fmt.Sprintf("%04d", i)+chunk || ev.ID != strconv.Itoa(i+2) {
			t.Fatalf("event %d (id %s) is %.20q…", i+2, ev.ID, got)
		}
		total += len(got)
	}
	wantEndDone(t, br)
	e.waitIdle(t)
	// The reply is more than a history page's 1 MiB: it comes alone, and
	// the message before it on the next page.
	rec := e.serve(t, "GET", "/api/v1/chat/history", "", authz(s.Token))
	h := decode[historyBody](t, rec)
	if len(h.Messages) != 1 || !h.HasMore || len(h.Messages[0].Content) != total || h.Messages[0].Status != "complete" {
		t.Fatalf("stored reply: %d messages (has_more %v), want the %d-byte reply alone", len(h.Messages), h.HasMore, total)
	}
	rec = e.serve(t, "GET", "/api/v1/chat/history?before="+h.Messages[0].ID, "", authz(s.Token))
	if h := decode[historyBody](t, rec); len(h.Messages) != 1 || h.HasMore || h.Messages[0].Content != "Send me a book" {
		t.Fatalf("the page before the reply: %+v", h)
	}

	e.fake.SetScript(func(w http.ResponseWriter, _ *http.Request, _ *testkit.Call) {
		testkit.N8nStreamHead(w)
		_, _ = io.WriteString(w, testkit.N8nLine("begin", "")+testkit.N8nLine("item", "before the flood "))
		testkit.Flush(w)
		_, _ = io.WriteString(w, testkit.N8nLine("item", strings.Repeat("x", 1<<20+1024)))
		_, _ = io.WriteString(w, testkit.N8nLine("end", ""))
	})
	s2 := e.newSession(t)
	resp = e.do(t, "POST", "/api/v1/chat/message", `{"message":"One long line please"}`, authz(s2.Token))
	events := replyEvents(t, testkit.ParseSSE(readAll(t, resp.Body)))
	if len(events) != 3 || itemOf(t, events[0]) != "before the flood " {
		t.Fatalf("%d events", len(events))
	}
	if v := eventJSON(t, events[1]); v.Type != "error" || v.Error != "upstream_error" {
		t.Fatalf("want an error event, got %+v", v)
	}
	wantDone(t, events[2])
	e.waitIdle(t)
	wantExchange(t, e.history(t, s2.Token), "One long line please", "before the flood ", "partial")
}

func readAll(t *testing.T, r io.Reader) string {
	t.Helper()
	b, err := io.ReadAll(r)
	if err != nil {
		t.Fatal(err)
	}
	return string(b)
}

// TestChatWithoutSessionRead covers the chat path that takes the session
// from its token (site claim, older than the bot filter's first-message
// window) and lets the user-message insert confirm it is active: inactive
// sessions are refused exactly as when the session is read first, nothing
// is stored and n8n is not called; an active one gets the stored page_url
// and message count.
func TestChatWithoutSessionRead(t *testing.T) {
	t.Parallel()
	for _, kind := range storeKinds {
		t.Run(kind, func(t *testing.T) {
			t.Parallel()
			e := newChatEnv(t, chatEnvOpts{kind: kind, mutate: func(c *envConfig) { c.Bots = false }})
			e.fake.SetScript(testkit.Output("Hi!"))
			ctx := context.Background()
			now := time.Now().UTC()
			// Issued an hour ago: older than any first-message window.
			hourAgo := sessions.NewTokensFor([]byte(testJWTSecret), e.audience, func() time.Time { return now.Add(-time.Hour) })
			store := func(id string, mutate func(*sessions.Session)) string {
				s := &sessions.Session{ID: id, Site: "shop.example.com", PageURL: "https://shop.example.com/start",
					CreatedAt: now.Add(-time.Hour), ExpiresAt: now.Add(time.Hour).Truncate(time.Second)}
				if mutate != nil {
					mutate(s)
				}
				tok, err := hourAgo.Issue(s)
				if err != nil {
					t.Fatal(err)
				}
				if err := e.store.CreateSession(ctx, s); err != nil {
					t.Fatal(err)
				}
				return tok
			}
			active := store("ACTIVE", nil)
			revoked := store("REVOKED", nil)
			if err := e.store.RevokeSession(ctx, "REVOKED", now); err != nil {
				t.Fatal(err)
			}
			deleted := store("DELETED", nil)
			if err := e.store.DeleteSession(ctx, "DELETED"); err != nil {
				t.Fatal(err)
			}
			// The store's expiry is what counts, whatever the token says.
			store("EXPIRED", func(s *sessions.Session) { s.ExpiresAt = now.Add(-time.Minute) })
			expiredToken, _ := hourAgo.Issue(&sessions.Session{ID: "EXPIRED", Site: "shop.example.com", ExpiresAt: now.Add(time.Hour)})
			widget := store("WIDGET", func(s *sessions.Session) { s.Kind = sessions.KindWidget })

			for name, token := range map[string]string{"revoked": revoked, "deleted": deleted, "expired in the store": expiredToken, "widget session": widget} {
				t.Run(name, func(t *testing.T) {
					for _, accept := range []string{"text/event-stream", "application/json"} {
						wantError(t, e.serve(t, "POST", "/api/v1/chat/message", `{"message":"hello"}`, authz(token, "Accept", accept)), 401, "session_expired")
					}
				})
			}
			if e.fake.Hits() != 0 {
				t.Fatalf("n8n called %d times for inactive sessions", e.fake.Hits())
			}
			for _, id := range []string{"REVOKED", "EXPIRED", "WIDGET"} {
				if p, err := e.store.ListMessages(ctx, id, "", 10); err != nil || p.TotalCount != 0 {
					t.Fatalf("%s: messages stored for a refused message: %+v %v", id, p, err)
				}
			}

			for i, want := range []int{1, 3} {
				rec := e.serve(t, "POST", "/api/v1/chat/message", `{"message":"hello"}`, authz(active, "Accept", "application/json"))
				if rec.Code != 200 {
					t.Fatalf("message %d: %d %s", i, rec.Code, rec.Body)
				}
				ss := e.fake.Last(t).Body.Session
				if ss.MessageCount != want || ss.OriginDomain != "shop.example.com" || ss.PageURL != "https://shop.example.com/start" {
					t.Errorf("message %d: n8n session %+v, want message_count %d and the stored page_url", i, ss, want)
				}
			}
			if h := e.history(t, active); h.TotalCount != 4 {
				t.Errorf("history holds %d messages, want 4", h.TotalCount)
			}
		})
	}
}
