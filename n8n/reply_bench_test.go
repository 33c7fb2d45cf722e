package n8n

import (
	"bufio"
	"bytes"
	"context"
	"io"
	"net/http"
	"net/http/httptest"
	"strconv"
	"strings"
	"testing"
	"time"
)

const benchSecret = "bench-n8n-session-secret-0123456789abcdef"

// benchTexts are the eight item texts of the benchmark reply.
var benchTexts = []string{
	"Hello! ", "Thanks for asking. ", "Here is what I found: ", "your order shipped ",
	"yesterday and should ", "arrive within two ", "business days. ", "Anything else?",
}

const benchMeta = `"metadata":{"nodeId":"agent","nodeName":"AI Agent","itemIndex":0,"runIndex":0,"timestamp":1767225600000}`

// benchNDJSON is a reply as n8n's Webhook node streams it: begin, eight
// items, end, one object per line.
func benchNDJSON() []byte {
	var b bytes.Buffer
	b.WriteString(`{"type":"begin",` + benchMeta + "}\n")
	for _, t := range benchTexts {
		b.WriteString(`{"type":"item","content":` + strconv.Quote(t) + `,` + benchMeta + "}\n")
	}
	b.WriteString(`{"type":"end",` + benchMeta + "}\n")
	return b.Bytes()
}

// benchSSE is the same reply as a text/event-stream.
func benchSSE() []byte {
	var b bytes.Buffer
	for i, t := range benchTexts {
		b.WriteString("id: " + strconv.Itoa(i+1) + "\ndata: " + `{"type":"item","content":` + strconv.Quote(t) + "}\n\n")
	}
	b.WriteString("data: [DONE]\n\n")
	return b.Bytes()
}

// Parsing a whole eight-chunk reply from a reader, set up as Reply.open
// sets it up (size limit, buffered reader, format sniffing), without
// HTTP.
func BenchmarkDecodeReply(b *testing.B) {
	for _, bc := range []struct {
		name, contentType string
		body              []byte
	}{
		{"ndjson", "application/json; charset=utf-8", benchNDJSON()},
		{"sse", "text/event-stream", benchSSE()},
	} {
		b.Run(bc.name, func(b *testing.B) {
			rd := bytes.NewReader(nil)
			b.ReportAllocs()
			b.SetBytes(int64(len(bc.body)))
			for b.Loop() {
				rd.Reset(bc.body)
				dec, _, err := sniff(newReplyReader(rd, DefaultMaxReplyBytes), bc.contentType, DefaultMaxLineBytes)
				if err != nil {
					b.Fatal(err)
				}
				n := 0
				for {
					_, err := dec.next()
					if err == io.EOF {
						break
					}
					if err != nil {
						b.Fatal(err)
					}
					n++
				}
				if n != len(benchTexts) {
					b.Fatalf("%d texts, want %d", n, len(benchTexts))
				}
			}
		})
	}
}

// benchServer answers every POST with body, one line per write, flushed,
// as n8n streams. It is deliberately not the shared fake (testkit.N8n):
// the fake records every call (headers cloned, body kept and decoded
// twice, a goroutine watching for cancellation, a call list that grows
// with b.N), and ReportAllocs counts the server's goroutines too. Measured
// at 3000 iterations, the fake raised the client's figures from 28.5 KB,
// 308 allocs to 36.1 KB, 371 allocs per message and raw-http's from 98 to
// 162 allocs: the benchmark would measure the fake, not the client.
func benchServer(b *testing.B, body []byte, contentType string) *httptest.Server {
	lines := bytes.SplitAfter(body, []byte("\n"))
	srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		_, _ = io.Copy(io.Discard, r.Body)
		w.Header().Set("Content-Type", contentType)
		fl := w.(http.Flusher)
		for _, l := range lines {
			if len(l) == 0 {
				continue
			}
			_, _ = w.Write(l)
			fl.Flush()
		}
	}))
	b.Cleanup(srv.Close)
	return srv
}

func benchRequest() *Request {
	return &Request{
		SessionID:    "Qm3hV7aX2kLp9sT4wZc8Rb",
		Message:      "Where is my order #4417?",
		OriginDomain: "shop.example.com",
		PageURL:      "https://shop.example.com/orders/4417",
		ClientIP:     "203.0.113.7",
		UserAgent:    "Mozilla/5.0 (X11; Linux x86_64) AppleWebKit/537.36 (KHTML, like Gecko) Chrome/131.0 Safari/537.36",
		MessageCount: 3,
	}
}

// One message through the public API, as the chat route uses it: Send
// (body, n8n token, POST, first text), Next until the end, Close, against a
// loopback server streaming the eight-chunk NDJSON reply. "raw-http" is the
// same exchange with a bare http.Client reading lines, to show what the
// client adds on top of HTTP itself.
func BenchmarkSendNDJSON(b *testing.B) {
	body := benchNDJSON()
	srv := benchServer(b, body, "application/json; charset=utf-8")
	b.Run("client", func(b *testing.B) {
		c, err := New(Config{WebhookURL: srv.URL + "/webhook/chat", SessionSecret: benchSecret})
		if err != nil {
			b.Fatal(err)
		}
		defer c.Close()
		req := benchRequest()
		ctx := context.Background()
		b.ReportAllocs()
		for b.Loop() {
			reply, err := c.Send(ctx, req)
			if err != nil {
				b.Fatal(err)
			}
			n := 0
			for {
				_, err := reply.Next()
				if err == io.EOF {
					break
				}
				if err != nil {
					b.Fatal(err)
				}
				n++
			}
			_ = reply.Close()
			if n != len(benchTexts) {
				b.Fatalf("%d texts, want %d", n, len(benchTexts))
			}
		}
	})
	b.Run("raw-http", func(b *testing.B) {
		c, err := New(Config{WebhookURL: srv.URL + "/webhook/chat", SessionSecret: benchSecret})
		if err != nil {
			b.Fatal(err)
		}
		reqBody, _, err := c.buildBody(benchRequest(), time.Now())
		if err != nil {
			b.Fatal(err)
		}
		hc := &http.Client{Transport: &http.Transport{MaxIdleConnsPerHost: 4}}
		defer hc.CloseIdleConnections()
		b.ReportAllocs()
		for b.Loop() {
			resp, err := hc.Post(srv.URL+"/webhook/chat", "application/json", bytes.NewReader(reqBody))
			if err != nil {
				b.Fatal(err)
			}
			br := bufio.NewReader(resp.Body)
			n := 0
			for {
				line, err := br.ReadSlice('\n')
				if strings.Contains(string(line), `"type":"item"`) {
					n++
				}
				if err != nil {
					break
				}
			}
			resp.Body.Close()
			if n != len(benchTexts) {
				b.Fatalf("%d items, want %d", n, len(benchTexts))
			}
		}
	})
}

// The request to n8n: JSON body and the HS256 token, built for every
// message.
func BenchmarkBuildRequest(b *testing.B) {
	c, err := New(Config{WebhookURL: "http://127.0.0.1:9/webhook/chat", SessionSecret: benchSecret})
	if err != nil {
		b.Fatal(err)
	}
	req := benchRequest()
	b.ReportAllocs()
	for b.Loop() {
		if _, _, err := c.buildBody(req, time.Now()); err != nil {
			b.Fatal(err)
		}
	}
}
