package streaming

import (
	"bufio"
	"context"
	"encoding/json"
	"net/http"
	"net/http/httptest"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"github.com/caddyserver/caddy/v2/modules/caddyhttp"
	"github.com/chatproxy/caddy-chatproxy/internal/testkit"
)

// TestStreamsChunkByChunkThroughEncode serves each writer behind Caddy's
// encode handler over real HTTP and checks that the client reads event N
// before the producer writes event N+1: the producer waits for the client's
// go-ahead before each event, so any buffering (headers held for sniffing,
// a compressor not flushed) blocks the client and fails the test at its
// deadline.
func TestStreamsChunkByChunkThroughEncode(t *testing.T) {
	contents := []string{"Hel", "lo\n\ndata: x", strings.Repeat("big ", 600), "😀 done"}
	kinds := []struct {
		name     string
		newW     func(http.ResponseWriter) Writer
		readHead func(*testing.T, *bufio.Reader) // reads what Start wrote
		readItem func(*testing.T, *bufio.Reader) string
		readEnd  func(*testing.T, *bufio.Reader)
		wantType string
	}{
		{
			name: "sse",
			newW: func(w http.ResponseWriter) Writer {
				return NewSSEWriter(w, Options{KeepaliveInterval: -1})
			},
			readHead: func(t *testing.T, br *bufio.Reader) {
				if ev := readSSEEvent(t, br); ev != `{"type":"begin"}` {
					t.Fatalf("first event %q, want begin", ev)
				}
			},
			readItem: func(t *testing.T, br *bufio.Reader) string {
				var item struct{ Content string }
				ev := readSSEEvent(t, br)
				if err := json.Unmarshal([]byte(ev), &item); err != nil {
					t.Fatalf("%q: %v", ev, err)
				}
				return item.Content
			},
			readEnd: func(t *testing.T, br *bufio.Reader) {
				if ev := readSSEEvent(t, br); ev != `{"type":"end"}` {
					t.Fatalf("event before [DONE] %q, want end", ev)
				}
				if ev := readSSEEvent(t, br); ev != "[DONE]" {
					t.Fatalf("last event %q", ev)
				}
			},
			wantType: "text/event-stream",
		},
		{
			name: "ndjson",
			newW: func(w http.ResponseWriter) Writer {
				return NewNDJSONWriter(w, Options{KeepaliveInterval: -1})
			},
			readHead: func(t *testing.T, br *bufio.Reader) {
				if c := readNDJSON(t, br); c.Type != "begin" {
					t.Fatalf("first line %+v", c)
				}
			},
			readItem: func(t *testing.T, br *bufio.Reader) string {
				c := readNDJSON(t, br)
				if c.Type != "item" {
					t.Fatalf("line %+v", c)
				}
				return c.Content
			},
			readEnd: func(t *testing.T, br *bufio.Reader) {
				if c := readNDJSON(t, br); c.Type != "end" {
					t.Fatalf("last line %+v", c)
				}
			},
			wantType: "application/x-ndjson; charset=utf-8",
		},
	}
	for _, kind := range kinds {
		for _, acceptEncoding := range []string{"gzip, zstd", "zstd", "gzip", ""} {
			t.Run(kind.name+"/"+acceptEncoding, func(t *testing.T) {
				enc := testkit.NewEncode(t)
				proceed := make(chan struct{})
				var written atomic.Int32
				produced := make(chan error, 1)
				srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
					err := enc.ServeHTTP(w, r, caddyhttp.HandlerFunc(func(w http.ResponseWriter, r *http.Request) error {
						sw := kind.newW(w)
						defer sw.Done()
						if err := sw.Start(); err != nil {
							return err
						}
						for _, c := range contents {
							select {
							case <-proceed:
							case <-r.Context().Done():
								return r.Context().Err()
							}
							written.Add(1) // counted before the write, so the reader never sees more
							if err := sw.Item(c); err != nil {
								return err
							}
						}
						select {
						case <-proceed:
						case <-r.Context().Done():
							return r.Context().Err()
						}
						return sw.Done()
					}))
					produced <- err
				}))
				defer srv.Close()

				ctx, cancel := context.WithTimeout(t.Context(), 10*time.Second)
				defer cancel()
				req, _ := http.NewRequestWithContext(ctx, http.MethodPost, srv.URL, nil)
				if acceptEncoding != "" {
					req.Header.Set("Accept-Encoding", acceptEncoding)
				}
				client := &http.Client{Transport: &http.Transport{DisableCompression: true}}
				// The producer has written nothing but the headers (and
				// NDJSON's begin line) yet: Do returning proves that the
				// headers are not held back by encode.
				resp, err := client.Do(req)
				if err != nil {
					t.Fatal(err)
				}
				defer resp.Body.Close()
				if ce := resp.Header.Get("Content-Encoding"); ce != "" {
					t.Errorf("Content-Encoding %q: the stream should not be transformed", ce)
				}
				if ct := resp.Header.Get("Content-Type"); ct != kind.wantType {
					t.Errorf("Content-Type %q", ct)
				}
				br := bufio.NewReader(resp.Body)
				kind.readHead(t, br)
				for i, want := range contents {
					proceed <- struct{}{}
					if got := kind.readItem(t, br); got != want {
						t.Fatalf("event %d = %q, want %q", i+1, got, want)
					}
					if n := written.Load(); n != int32(i+1) {
						t.Fatalf("read event %d while the producer had written %d", i+1, n)
					}
				}
				proceed <- struct{}{}
				kind.readEnd(t, br)
				if err := <-produced; err != nil {
					t.Fatalf("handler: %v", err)
				}
			})
		}
	}
}

// readSSEEvent reads one event (up to a blank line) and returns its data.
func readSSEEvent(t *testing.T, br *bufio.Reader) string {
	t.Helper()
	var data []string
	for {
		line, err := br.ReadString('\n')
		if err != nil {
			t.Fatalf("reading event: %v (so far %q)", err, data)
		}
		line = strings.TrimSuffix(line, "\n")
		switch {
		case line == "":
			if len(data) != 1 {
				t.Fatalf("event with %d data lines", len(data))
			}
			return data[0]
		case strings.HasPrefix(line, "data: "):
			data = append(data, strings.TrimPrefix(line, "data: "))
		case strings.HasPrefix(line, "id: "), strings.HasPrefix(line, ":"):
		default:
			t.Fatalf("unexpected line %q", line)
		}
	}
}

type lineChunk struct {
	Type    string `json:"type"`
	Content string `json:"content"`
}

func readNDJSON(t *testing.T, br *bufio.Reader) lineChunk {
	t.Helper()
	line, err := br.ReadString('\n')
	if err != nil {
		t.Fatalf("reading line: %v", err)
	}
	var c lineChunk
	if err := json.Unmarshal([]byte(line), &c); err != nil {
		t.Fatalf("line %q: %v", line, err)
	}
	return c
}
