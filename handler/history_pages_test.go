package handler

import (
	"context"
	"encoding/json"
	"fmt"
	"net/http"
	"net/url"
	"runtime"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/chatproxy/caddy-chatproxy/sessions"
)

// hdHistoryPage is GET /chat/history's body.
type hdHistoryPage struct {
	Messages []struct {
		ID      string `json:"id"`
		Content string `json:"content"`
	} `json:"messages"`
	TotalCount int  `json:"total_count"`
	HasMore    bool `json:"has_more"`
}

// hdStoreMessages appends messages of the given sizes to the session the
// token names, oldest first, and returns their ids in that order.
func hdStoreMessages(t *testing.T, e *hdEnv, token string, sizes []int) []string {
	t.Helper()
	claims, err := e.h.cfg.Sessions.Tokens.Verify(token)
	if err != nil {
		t.Fatal(err)
	}
	ids := make([]string, len(sizes))
	base := time.Now().Add(-time.Hour)
	for i, n := range sizes {
		role := sessions.RoleUser
		if i%2 == 1 {
			role = sessions.RoleAssistant
		}
		m := &sessions.Message{SessionID: claims.Subject, Role: role, CreatedAt: base.Add(time.Duration(i) * time.Millisecond),
			Content: fmt.Sprintf("%06d:", i) + strings.Repeat("x", n-7)}
		if err := e.store.AppendMessage(context.Background(), m); err != nil {
			t.Fatal(err)
		}
		ids[i] = m.ID
	}
	return ids
}

// Paging back with before from the newest page reaches every message
// exactly once and in order, whatever their sizes; every page keeps to
// the byte cap unless it holds a single message (a message bigger than
// the cap comes alone).
func TestHistoryPagesCappedByBytes(t *testing.T) {
	for name, open := range map[string]func(*testing.T) sessions.Store{"postgres": hdPostgres, "sqlite": hdSQLite} {
		t.Run(name, func(t *testing.T) {
			e := newHDEnv(t, open(t), nil)
			token := e.session(t, nil)
			var sizes []int
			for i := range 60 {
				sizes = append(sizes, []int{200, 90 << 10, 300 << 10, 8, 1<<20 + 5, 40 << 10, 700 << 10}[i%7])
			}
			ids := hdStoreMessages(t, e, token, sizes)
			var got []string
			before := ""
			for pages := 0; ; pages++ {
				if pages > len(ids) {
					t.Fatalf("more pages than messages")
				}
				path := "/api/v1/chat/history?limit=200"
				if before != "" {
					path += "&before=" + url.QueryEscape(before)
				}
				rec := e.do(t, "GET", path, "", map[string]string{"Authorization": "Bearer " + token})
				if rec.Code != http.StatusOK {
					t.Fatalf("history: %d %s", rec.Code, rec.Body)
				}
				var p hdHistoryPage
				if err := json.Unmarshal(rec.Body.Bytes(), &p); err != nil {
					t.Fatal(err)
				}
				if len(p.Messages) == 0 {
					t.Fatalf("an empty page with has_more before it (before=%q)", before)
				}
				bytes := 0
				for _, m := range p.Messages {
					bytes += len(m.Content)
				}
				if len(p.Messages) > 1 && bytes > historyPageBytes {
					t.Fatalf("page %d: %d messages, %d bytes of content; the cap is %d", pages, len(p.Messages), bytes, historyPageBytes)
				}
				if p.TotalCount != len(ids) {
					t.Fatalf("total_count %d, want %d", p.TotalCount, len(ids))
				}
				page := make([]string, len(p.Messages))
				for i, m := range p.Messages {
					page[i] = m.ID
				}
				got = append(page, got...)
				if !p.HasMore {
					break
				}
				before = p.Messages[0].ID
			}
			if strings.Join(got, ",") != strings.Join(ids, ",") {
				t.Fatalf("paging reached %d messages, want all %d exactly once in order", len(got), len(ids))
			}
		})
	}
}

// discardResponse is a ResponseWriter that keeps nothing of the body.
type discardResponse struct {
	header http.Header
	code   int
	n      int
}

func (d *discardResponse) Header() http.Header  { return d.header }
func (d *discardResponse) WriteHeader(code int) { d.code = code }
func (d *discardResponse) Write(b []byte) (int, error) {
	if d.code == 0 {
		d.code = http.StatusOK
	}
	d.n += len(b)
	return len(b), nil
}

// Concurrent history requests over a session of big messages (20 MiB in
// all) hold a page each, not the whole history: the heap grows by a few
// MiB above the page cap per request.
func TestHistoryMemoryBounded(t *testing.T) {
	e := newHDEnv(t, hdPostgres(t), nil)
	token := e.session(t, nil)
	sizes := make([]int, 40)
	for i := range sizes {
		sizes[i] = 512 << 10
	}
	hdStoreMessages(t, e, token, sizes)

	const concurrent = 4
	var baseline runtime.MemStats
	runtime.GC()
	runtime.ReadMemStats(&baseline)
	var peak uint64
	stop := make(chan struct{})
	sampled := make(chan struct{})
	go func() {
		defer close(sampled)
		var m runtime.MemStats
		for {
			runtime.ReadMemStats(&m)
			peak = max(peak, m.HeapAlloc)
			select {
			case <-stop:
				return
			case <-time.After(time.Millisecond):
			}
		}
	}()
	var wg sync.WaitGroup
	results := make([]*discardResponse, concurrent)
	for i := range concurrent {
		wg.Go(func() {
			w := &discardResponse{header: http.Header{}}
			results[i] = w
			e.serveTo(t, w, "GET", "/api/v1/chat/history?limit=200", map[string]string{"Authorization": "Bearer " + token})
		})
	}
	wg.Wait()
	close(stop)
	<-sampled
	for i, w := range results {
		if w.code != http.StatusOK || w.n < 512<<10 {
			t.Fatalf("request %d: %d, %d bytes", i, w.code, w.n)
		}
	}
	grew := int64(peak) - int64(baseline.HeapAlloc)
	bound := int64(concurrent * (historyPageBytes + 6<<20))
	t.Logf("%d concurrent history requests over 40 messages of 512 KiB: heap grew %.1f MiB at most (bound %.0f MiB)",
		concurrent, float64(grew)/(1<<20), float64(bound)/(1<<20))
	if grew > bound {
		t.Fatalf("heap grew %d bytes, more than %d", grew, bound)
	}
}
