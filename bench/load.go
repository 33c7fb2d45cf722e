package main

import (
	"bufio"
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"strings"
	"sync"
	"sync/atomic"
	"time"
)

// A target is one Caddy server seen by the load client.
type target struct {
	name   string
	chat   bool // chat_proxy (SSE) rather than reverse_proxy (NDJSON)
	base   string
	client *http.Client
}

func newTarget(name, addr string, chat bool, conns int) *target {
	return &target{
		name:   name,
		chat:   chat,
		base:   "http://" + addr,
		client: &http.Client{Transport: newTransport(conns)},
	}
}

func newTransport(conns int) *http.Transport {
	return &http.Transport{
		DialContext:         (&net.Dialer{Timeout: 5 * time.Second}).DialContext,
		MaxIdleConns:        conns,
		MaxIdleConnsPerHost: conns,
		IdleConnTimeout:     time.Minute,
		DisableCompression:  true,
	}
}

// session is a visitor session of a chat_proxy target.
type session struct {
	id, token string
}

// createSession creates a visitor session, as the widget does.
func (t *target) createSession(ctx context.Context) (*session, error) {
	req, err := http.NewRequestWithContext(ctx, http.MethodPost, t.base+"/api/v1/session/create",
		strings.NewReader(`{"page_url":"https://shop.example/products/42","metadata":{"widget":"bench"}}`))
	if err != nil {
		return nil, err
	}
	req.Header.Set("Content-Type", "application/json")
	req.Header.Set("User-Agent", browserUA)
	req.Header.Set("Accept-Language", "en-GB,en;q=0.9")
	resp, err := t.client.Do(req)
	if err != nil {
		return nil, err
	}
	defer resp.Body.Close()
	body, err := io.ReadAll(resp.Body)
	if err != nil {
		return nil, err
	}
	if resp.StatusCode != http.StatusCreated {
		return nil, fmt.Errorf("session create: %d %s", resp.StatusCode, bytes.TrimSpace(body))
	}
	var out struct {
		SessionID string `json:"session_id"`
		Token     string `json:"token"`
	}
	if err := json.Unmarshal(body, &out); err != nil || out.Token == "" {
		return nil, fmt.Errorf("session create: bad body %q", body)
	}
	return &session{id: out.SessionID, token: out.Token}, nil
}

func (t *target) createSessions(ctx context.Context, n int) ([]*session, error) {
	out := make([]*session, n)
	for i := range out {
		s, err := t.createSession(ctx)
		if err != nil {
			return nil, err
		}
		out[i] = s
	}
	return out, nil
}

const browserUA = "Mozilla/5.0 (X11; Linux x86_64) AppleWebKit/537.36 (KHTML, like Gecko) Chrome/131.0 Safari/537.36"

// exchangeResult is what one message round trip measured.
type exchangeResult struct {
	total  time.Duration // request sent → reply complete
	ttfc   time.Duration // request sent → first item chunk
	chunks []time.Duration
	err    error
}

var (
	itemMark  = []byte(`"type":"item"`)
	errorMark = []byte(`"type":"error"`)
	endMark   = []byte(`"type":"end"`)
	doneMark  = []byte("data: [DONE]")
	stampMark = []byte("t=")
)

// exchange sends one message and reads the whole streamed reply: through
// reverse_proxy it is n8n's NDJSON as is, through chat_proxy the SSE
// stream. The same message text (which picks the stand-in's mode) goes
// either way. With chunks set, each item's delay since the stand-in wrote
// it is recorded.
func (t *target) exchange(ctx context.Context, s *session, mode string, chunks bool) exchangeResult {
	var req *http.Request
	var err error
	msg := "Where is my order #4417? " + mode
	if t.chat {
		req, err = http.NewRequestWithContext(ctx, http.MethodPost, t.base+"/api/v1/chat/message",
			strings.NewReader(`{"message":"`+msg+`"}`))
		if err == nil {
			req.Header.Set("Authorization", "Bearer "+s.token)
			req.Header.Set("Accept", "text/event-stream")
		}
	} else {
		req, err = http.NewRequestWithContext(ctx, http.MethodPost, t.base+"/webhook/chat",
			strings.NewReader(`{"action":"sendMessage","sessionId":"bench-session-0001","chatInput":"`+msg+`"}`))
		if err == nil {
			req.Header.Set("Accept", "application/json, application/x-ndjson, text/plain")
		}
	}
	if err != nil {
		return exchangeResult{err: err}
	}
	req.Header.Set("Content-Type", "application/json")
	req.Header.Set("User-Agent", browserUA)
	start := time.Now()
	resp, err := t.client.Do(req)
	if err != nil {
		return exchangeResult{err: err}
	}
	defer resp.Body.Close()
	if resp.StatusCode != http.StatusOK {
		b, _ := io.ReadAll(io.LimitReader(resp.Body, 512))
		return exchangeResult{err: fmt.Errorf("status %d: %s", resp.StatusCode, bytes.TrimSpace(b))}
	}
	var res exchangeResult
	if chunks {
		res.chunks = make([]time.Duration, 0, itemsPerReply)
	}
	br := bufio.NewReaderSize(resp.Body, 4096)
	items, ended := 0, false
	for !ended {
		line, err := br.ReadSlice('\n')
		if err != nil {
			return exchangeResult{err: fmt.Errorf("after %d items: %w", items, err)}
		}
		switch {
		case bytes.Contains(line, itemMark):
			now := time.Now()
			items++
			if items == 1 {
				res.ttfc = now.Sub(start)
			}
			if chunks {
				if ts, ok := stamp(line); ok {
					res.chunks = append(res.chunks, now.Sub(epoch)-time.Duration(ts))
				}
			}
		case bytes.Contains(line, errorMark):
			return exchangeResult{err: fmt.Errorf("error event: %s", bytes.TrimSpace(line))}
		case t.chat && bytes.HasPrefix(line, doneMark), !t.chat && bytes.Contains(line, endMark):
			ended = true
		}
	}
	if _, err := io.Copy(io.Discard, br); err != nil {
		return exchangeResult{err: err}
	}
	res.total = time.Since(start)
	if items != itemsPerReply {
		return exchangeResult{err: fmt.Errorf("%d items, want %d", items, itemsPerReply)}
	}
	return res
}

// stamp extracts the stand-in's "t=<ns>" from a chunk line.
func stamp(line []byte) (int64, bool) {
	i := bytes.Index(line, stampMark)
	if i < 0 {
		return 0, false
	}
	var v int64
	n := 0
	for _, c := range line[i+2:] {
		if c < '0' || c > '9' {
			break
		}
		v = v*10 + int64(c-'0')
		n++
	}
	return v, n > 0
}

// loadResult aggregates a phase against one target.
type loadResult struct {
	target   string
	count    int
	errors   int
	firstErr error
	elapsed  time.Duration
	total    sample
	ttfc     sample
	chunks   sample
	dropped  int // open loop: arrivals skipped because too many were in flight
	offered  float64
	cpu      cpuUse
	sched    schedLatency
}

func (r *loadResult) rate() float64 {
	if r.elapsed <= 0 {
		return 0
	}
	return float64(r.count) / r.elapsed.Seconds()
}

func (r *loadResult) add(x exchangeResult) {
	if x.err != nil {
		r.errors++
		if r.firstErr == nil {
			r.firstErr = x.err
		}
		return
	}
	r.count++
	r.total = append(r.total, x.total)
	r.ttfc = append(r.ttfc, x.ttfc)
	r.chunks = append(r.chunks, x.chunks...)
}

func (r *loadResult) merge(o *loadResult) {
	r.count += o.count
	r.errors += o.errors
	r.dropped += o.dropped
	if r.firstErr == nil {
		r.firstErr = o.firstErr
	}
	r.total = append(r.total, o.total...)
	r.ttfc = append(r.ttfc, o.ttfc...)
	r.chunks = append(r.chunks, o.chunks...)
}

// closedLoop runs conc clients, each sending its next message as soon as
// the previous reply is complete: first for warmup (not counted), then for
// d. It measures capacity.
func closedLoop(ctx context.Context, t *target, sessions []*session, conc int, warmup, d time.Duration, mode string, chunks bool) *loadResult {
	var wg sync.WaitGroup
	results := make([]*loadResult, conc)
	start := time.Now()
	measureFrom, end := start.Add(warmup), start.Add(warmup+d)
	for w := range conc {
		var s *session
		if t.chat {
			s = sessions[w%len(sessions)]
		}
		results[w] = &loadResult{}
		wg.Go(func() {
			for ctx.Err() == nil {
				now := time.Now()
				if !now.Before(end) {
					return
				}
				x := t.exchange(ctx, s, mode, chunks)
				if now.After(measureFrom) && ctx.Err() == nil {
					results[w].add(x)
				}
			}
		})
	}
	wg.Wait()
	out := &loadResult{target: t.name, elapsed: time.Since(measureFrom)}
	for _, r := range results {
		out.merge(r)
	}
	return out
}

// openLoop sends messages at a fixed rate whatever the replies do (so
// queueing shows in the latency instead of lowering the rate), for warmup
// (not counted) then d. At most maxInFlight are in flight; arrivals beyond
// that are dropped and counted.
func openLoop(ctx context.Context, t *target, sessions []*session, rate float64, maxInFlight int, warmup, d time.Duration, mode string) *loadResult {
	interval := time.Duration(float64(time.Second) / rate)
	start := time.Now()
	measureFrom, end := start.Add(warmup), start.Add(warmup+d)
	var mu sync.Mutex
	out := &loadResult{target: t.name, offered: rate}
	var inFlight atomic.Int64
	var wg sync.WaitGroup
	for i := 0; ctx.Err() == nil; i++ {
		at := start.Add(time.Duration(i) * interval)
		if !at.Before(end) {
			break
		}
		if wait := time.Until(at); wait > 0 {
			time.Sleep(wait)
		}
		measured := !at.Before(measureFrom)
		if inFlight.Load() >= int64(maxInFlight) {
			if measured {
				mu.Lock()
				out.dropped++
				mu.Unlock()
			}
			continue
		}
		var s *session
		if t.chat {
			s = sessions[i%len(sessions)]
		}
		inFlight.Add(1)
		wg.Go(func() {
			defer inFlight.Add(-1)
			x := t.exchange(ctx, s, mode, false)
			if measured && ctx.Err() == nil {
				mu.Lock()
				out.add(x)
				mu.Unlock()
			}
		})
	}
	wg.Wait()
	out.elapsed = end.Sub(measureFrom)
	return out
}

// sessionLoop creates sessions with conc clients for warmup then d.
func sessionLoop(ctx context.Context, t *target, conc int, warmup, d time.Duration) *loadResult {
	var wg sync.WaitGroup
	results := make([]*loadResult, conc)
	start := time.Now()
	measureFrom, end := start.Add(warmup), start.Add(warmup+d)
	for w := range conc {
		results[w] = &loadResult{}
		wg.Go(func() {
			for ctx.Err() == nil {
				now := time.Now()
				if !now.Before(end) {
					return
				}
				_, err := t.createSession(ctx)
				if now.After(measureFrom) && ctx.Err() == nil {
					results[w].add(exchangeResult{total: time.Since(now), err: err})
				}
			}
		})
	}
	wg.Wait()
	out := &loadResult{target: t.name, elapsed: time.Since(measureFrom)}
	for _, r := range results {
		out.merge(r)
	}
	return out
}

var errInterrupted = errors.New("interrupted")
