package main

import (
	"bytes"
	"context"
	"io"
	"net"
	"net/http"
	"strconv"
	"sync/atomic"
	"time"
)

// The stand-in n8n answers every POST like n8n's Webhook node in
// "Streaming" response mode: one JSON object per line (begin, items, end),
// each line flushed as it is written. The request body picks the variant:
//
//	MODE=fast   8 item chunks, no delay (the default)
//	MODE=paced  8 item chunks, gap apart (per-chunk delay)
//	MODE=hold   begin and one item, then nothing until the client leaves
//
// Every item's text starts with "t=<ns>;", the moment (on this process's
// monotonic clock, see epoch) the stand-in wrote it, so a client in the
// same process can tell how long the chunk took to reach it.
const itemsPerReply = 8

// epoch is the zero of the timestamps in chunk texts.
var epoch = time.Now()

func sinceEpoch() int64 { return int64(time.Since(epoch)) }

type standin struct {
	gap    time.Duration // between paced items
	held   atomic.Int64  // hold-mode replies in progress
	served atomic.Int64
	srv    *http.Server
	addr   string
}

func startStandin(gap time.Duration) (*standin, error) {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		return nil, err
	}
	s := &standin{gap: gap, addr: ln.Addr().String()}
	s.srv = &http.Server{Handler: s, ReadHeaderTimeout: 10 * time.Second}
	go func() { _ = s.srv.Serve(ln) }()
	return s, nil
}

func (s *standin) close() {
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Second)
	defer cancel()
	_ = s.srv.Shutdown(ctx)
	_ = s.srv.Close()
}

var (
	modePaced = []byte("MODE=paced")
	modeHold  = []byte("MODE=hold")
)

// n8n's chunk metadata, as the AI Agent node sends it.
const chunkMeta = `,"metadata":{"nodeId":"agent","nodeName":"AI Agent","itemIndex":0,"runIndex":0,"timestamp":1767225600000}}` + "\n"

var fillers = [itemsPerReply]string{
	"Hello! ", "Thanks for asking. ", "Here is what I found: ", "your order shipped ",
	"yesterday and should ", "arrive within two ", "business days. ", "Anything else?",
}

func (s *standin) ServeHTTP(w http.ResponseWriter, r *http.Request) {
	if r.Method != http.MethodPost {
		http.Error(w, "POST only", http.StatusMethodNotAllowed)
		return
	}
	body, err := io.ReadAll(io.LimitReader(r.Body, 1<<20))
	if err != nil {
		return
	}
	s.served.Add(1)
	paced, hold := bytes.Contains(body, modePaced), bytes.Contains(body, modeHold)
	h := w.Header()
	h.Set("Content-Type", "application/json; charset=utf-8")
	h.Set("Cache-Control", "no-cache")
	w.WriteHeader(http.StatusOK)
	rc := http.NewResponseController(w)
	buf := make([]byte, 0, 256)
	write := func(b []byte) bool {
		if _, err := w.Write(b); err != nil {
			return false
		}
		return rc.Flush() == nil
	}
	buf = append(buf, `{"type":"begin"`...)
	buf = append(buf, chunkMeta...)
	if !write(buf) {
		return
	}
	n := itemsPerReply
	if hold {
		n = 1
	}
	for i := range n {
		if paced && i > 0 {
			time.Sleep(s.gap)
		}
		buf = append(buf[:0], `{"type":"item","content":"t=`...)
		buf = strconv.AppendInt(buf, sinceEpoch(), 10)
		buf = append(buf, ';', ' ')
		buf = append(buf, fillers[i]...)
		buf = append(buf, '"')
		buf = append(buf, chunkMeta...)
		if !write(buf) {
			return
		}
	}
	if hold {
		s.held.Add(1)
		<-r.Context().Done()
		s.held.Add(-1)
		return
	}
	buf = append(buf[:0], `{"type":"end"`...)
	buf = append(buf, chunkMeta...)
	write(buf)
}
