package main

import (
	"bufio"
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"runtime/debug"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"time"
)

// Idle SSE streams. Each stream through Caddy costs four sockets on
// loopback: the client's, Caddy's accepted one, Caddy's upstream one and
// the stand-in's. This machine's hard RLIMIT_NOFILE may not fit 4 × 5000 in
// one process, so the clients and the holding stand-in run in a helper
// process (this program again, with -helper): the Caddy process then holds
// only its own two sockets per stream, and its RSS delta is what a Caddy
// serving those streams pays. The helper's delta is reported too.

// helperRequest is one command from the parent to the helper.
type helperRequest struct {
	Op   string `json:"op"`   // sessions, open, close, quit
	Base string `json:"base"` // target base URL
	Chat bool   `json:"chat"`
	N    int    `json:"n"`
}

type helperReply struct {
	OK       bool   `json:"ok"`
	Err      string `json:"err,omitempty"`
	Standin  string `json:"standin,omitempty"`
	Opened   int    `json:"opened"`
	Failed   int    `json:"failed"`
	FirstErr string `json:"first_err,omitempty"`
	Held     int64  `json:"held"`
	RSS      int64  `json:"rss"`
	Millis   int64  `json:"ms"`
}

// runHelper is the helper process: a holding stand-in n8n and the stream
// clients, driven by JSON lines on stdin.
func runHelper() error {
	raiseNoFile()
	st, err := startStandin(0)
	if err != nil {
		return err
	}
	out := json.NewEncoder(os.Stdout)
	if err := out.Encode(helperReply{OK: true, Standin: st.addr}); err != nil {
		return err
	}
	h := &helper{standin: st, client: &http.Client{Transport: newTransport(64)}}
	in := bufio.NewScanner(os.Stdin)
	in.Buffer(make([]byte, 64<<10), 64<<10)
	for in.Scan() {
		var req helperRequest
		if err := json.Unmarshal(in.Bytes(), &req); err != nil {
			return err
		}
		var rep helperReply
		switch req.Op {
		case "sessions":
			rep = h.sessions(req)
		case "open":
			rep = h.open(req)
		case "close":
			rep = h.closeAll()
		case "rss":
			runtime.GC()
			debug.FreeOSMemory()
			rep.OK = true
		case "quit":
			h.closeAll()
			st.close()
			return nil
		default:
			rep.Err = "unknown op " + req.Op
		}
		rep.Held = st.held.Load()
		rep.RSS = rssBytes("self")
		if err := out.Encode(rep); err != nil {
			return err
		}
	}
	return in.Err()
}

type helper struct {
	standin *standin
	client  *http.Client
	tokens  []string

	cancel context.CancelFunc
	wg     sync.WaitGroup
}

func (h *helper) sessions(req helperRequest) helperReply {
	t := &target{base: req.Base, chat: true, client: h.client}
	h.tokens = make([]string, req.N)
	var next atomic.Int64
	var firstErr atomic.Value
	var wg sync.WaitGroup
	for range 16 {
		wg.Go(func() {
			for {
				i := int(next.Add(1) - 1)
				if i >= req.N {
					return
				}
				s, err := t.createSession(context.Background())
				if err != nil {
					firstErr.CompareAndSwap(nil, err.Error())
					return
				}
				h.tokens[i] = s.token
			}
		})
	}
	wg.Wait()
	if e, _ := firstErr.Load().(string); e != "" {
		return helperReply{Err: e}
	}
	return helperReply{OK: true}
}

// open opens n streams and returns once each has received its first item
// (or failed). The streams then stay open, idle, until close.
func (h *helper) open(req helperRequest) helperReply {
	start := time.Now()
	ctx, cancel := context.WithCancel(context.Background())
	h.cancel = cancel
	// One connection per stream, as separate visitors have: no pooling.
	tr := newTransport(0)
	tr.DisableKeepAlives = true
	client := &http.Client{Transport: tr}
	var opened, failed atomic.Int64
	var firstErr atomic.Value
	sem := make(chan struct{}, 64) // opening concurrency: spare the accept queues
	var ready sync.WaitGroup
	for i := range req.N {
		sem <- struct{}{}
		ready.Add(1)
		h.wg.Go(func() {
			var once sync.Once
			signal := func() { once.Do(func() { <-sem; ready.Done() }) }
			err := holdStream(ctx, client, req, h.tokenFor(i), func() {
				opened.Add(1)
				signal()
			})
			if err != nil {
				failed.Add(1)
				firstErr.CompareAndSwap(nil, err.Error())
			}
			signal()
		})
	}
	ready.Wait()
	e, _ := firstErr.Load().(string)
	return helperReply{OK: true, Opened: int(opened.Load()), Failed: int(failed.Load()), FirstErr: e,
		Millis: time.Since(start).Milliseconds()}
}

func (h *helper) tokenFor(i int) string {
	if len(h.tokens) == 0 {
		return ""
	}
	return h.tokens[i%len(h.tokens)]
}

// holdStream opens one stream, calls opened at its first item, then reads
// until the stream ends or ctx is cancelled.
func holdStream(ctx context.Context, client *http.Client, req helperRequest, token string, opened func()) error {
	var hreq *http.Request
	var err error
	if req.Chat {
		hreq, err = http.NewRequestWithContext(ctx, http.MethodPost, req.Base+"/api/v1/chat/message",
			strings.NewReader(`{"message":"Tell me a long story. MODE=hold"}`))
		if err == nil {
			hreq.Header.Set("Authorization", "Bearer "+token)
			hreq.Header.Set("Accept", "text/event-stream")
		}
	} else {
		hreq, err = http.NewRequestWithContext(ctx, http.MethodPost, req.Base+"/webhook/chat",
			strings.NewReader(`{"action":"sendMessage","sessionId":"bench-session-0001","chatInput":"Tell me a long story. MODE=hold"}`))
	}
	if err != nil {
		return err
	}
	hreq.Header.Set("Content-Type", "application/json")
	hreq.Header.Set("User-Agent", browserUA)
	resp, err := client.Do(hreq)
	if err != nil {
		return err
	}
	defer resp.Body.Close()
	if resp.StatusCode != http.StatusOK {
		b, _ := io.ReadAll(io.LimitReader(resp.Body, 512))
		return fmt.Errorf("status %d: %s", resp.StatusCode, bytes.TrimSpace(b))
	}
	br := bufio.NewReaderSize(resp.Body, 1024)
	for {
		line, err := br.ReadSlice('\n')
		if err != nil {
			return fmt.Errorf("before the first item: %w", err)
		}
		if bytes.Contains(line, itemMark) {
			break
		}
	}
	opened()
	_, _ = io.Copy(io.Discard, br) // idle until cancelled (keepalives aside)
	return nil
}

func (h *helper) closeAll() helperReply {
	start := time.Now()
	if h.cancel != nil {
		h.cancel()
		h.wg.Wait()
		h.cancel = nil
	}
	// Wait for the stand-in to see every stream end.
	for deadline := time.Now().Add(30 * time.Second); h.standin.held.Load() > 0 && time.Now().Before(deadline); {
		time.Sleep(20 * time.Millisecond)
	}
	return helperReply{OK: true, Millis: time.Since(start).Milliseconds()}
}

// helperProc is the parent's handle on the helper process.
type helperProc struct {
	cmd     *exec.Cmd
	in      io.WriteCloser
	out     *json.Decoder
	standin string
}

func startHelper() (*helperProc, error) {
	exe, err := os.Executable()
	if err != nil {
		return nil, err
	}
	cmd := exec.Command(exe, "-helper")
	cmd.Stderr = os.Stderr
	in, err := cmd.StdinPipe()
	if err != nil {
		return nil, err
	}
	outPipe, err := cmd.StdoutPipe()
	if err != nil {
		return nil, err
	}
	if err := cmd.Start(); err != nil {
		return nil, err
	}
	p := &helperProc{cmd: cmd, in: in, out: json.NewDecoder(outPipe)}
	var hello helperReply
	if err := p.out.Decode(&hello); err != nil {
		p.kill()
		return nil, fmt.Errorf("helper: %w", err)
	}
	p.standin = hello.Standin
	return p, nil
}

func (p *helperProc) call(req helperRequest) (helperReply, error) {
	b, _ := json.Marshal(req)
	if _, err := p.in.Write(append(b, '\n')); err != nil {
		return helperReply{}, err
	}
	var rep helperReply
	if err := p.out.Decode(&rep); err != nil {
		return rep, fmt.Errorf("helper: %w", err)
	}
	if rep.Err != "" {
		return rep, errors.New("helper: " + rep.Err)
	}
	return rep, nil
}

func (p *helperProc) stop() {
	_, _ = p.call(helperRequest{Op: "quit"})
	_ = p.in.Close()
	done := make(chan struct{})
	go func() { _ = p.cmd.Wait(); close(done) }()
	select {
	case <-done:
	case <-time.After(10 * time.Second):
		p.kill()
	}
}

func (p *helperProc) kill() {
	if p.cmd.Process != nil {
		_ = p.cmd.Process.Kill() // only the process this program started
	}
}

// memSnapshot is the Caddy process's memory at one moment, after a GC
// that returned free memory to the OS, and the helper's.
type memSnapshot struct {
	rss        int64
	heapInuse  int64
	stackInuse int64
	goroutines int
	helperRSS  int64
}

func snapshot(p *helperProc, caddyp *caddyProc) memSnapshot {
	var snap memSnapshot
	if rep, err := caddyp.call(caddyRequest{Op: "mem"}); err == nil {
		snap = memSnapshot{rss: rep.RSS, heapInuse: rep.HeapInuse, stackInuse: rep.StackInuse, goroutines: rep.Goroutines}
	}
	if rep, err := p.call(helperRequest{Op: "rss"}); err == nil {
		snap.helperRSS = rep.RSS
	}
	return snap
}

// streamResult is the cost of n idle streams through one target.
type streamResult struct {
	target        string
	n, opened     int
	failed        int
	firstErr      string
	openTime      time.Duration
	closeTime     time.Duration // until the stand-in saw every stream end and (chat) every reply was stored
	before, after memSnapshot
}

func (r *streamResult) perStream(v int64) int64 {
	if r.opened == 0 {
		return 0
	}
	return v / int64(r.opened)
}

// measureStreams opens n idle streams through the target at base and
// measures the memory of the Caddy process and of the helper.
func measureStreams(p *helperProc, caddyp *caddyProc, name, base string, chat bool, n int, heapProfile string, settle func() (time.Duration, error)) (*streamResult, error) {
	res := &streamResult{target: name, n: n}
	if chat {
		if _, err := p.call(helperRequest{Op: "sessions", Base: base, N: n}); err != nil {
			return nil, fmt.Errorf("creating %d sessions: %w", n, err)
		}
	}
	res.before = snapshot(p, caddyp)
	rep, err := p.call(helperRequest{Op: "open", Base: base, Chat: chat, N: n})
	if err != nil {
		return nil, err
	}
	res.opened, res.failed, res.firstErr = rep.Opened, rep.Failed, rep.FirstErr
	res.openTime = time.Duration(rep.Millis) * time.Millisecond
	time.Sleep(time.Second) // let the last writes and flushes settle
	res.after = snapshot(p, caddyp)
	if heapProfile != "" {
		if file, err := filepath.Abs(heapProfile); err == nil {
			_, _ = caddyp.call(caddyRequest{Op: "heap", File: file})
		}
	}
	rep, err = p.call(helperRequest{Op: "close"})
	if err != nil {
		return nil, err
	}
	res.closeTime = time.Duration(rep.Millis) * time.Millisecond
	if settle != nil {
		d, err := settle()
		if err != nil {
			return nil, fmt.Errorf("storing the replies of the closed streams: %w", err)
		}
		res.closeTime += d
	}
	time.Sleep(500 * time.Millisecond)
	return res, nil
}

// rssBytes reads VmRSS from /proc/<pid>/status.
func rssBytes(pid string) int64 {
	b, err := os.ReadFile("/proc/" + pid + "/status")
	if err != nil {
		return 0
	}
	for line := range strings.SplitSeq(string(b), "\n") {
		if v, ok := strings.CutPrefix(line, "VmRSS:"); ok {
			f := strings.Fields(v)
			if len(f) > 0 {
				kb, _ := strconv.ParseInt(f[0], 10, 64)
				return kb << 10
			}
		}
	}
	return 0
}

// raiseNoFile raises the soft RLIMIT_NOFILE to the hard limit (Go does so
// at start-up too; this makes it explicit) and returns the new limit.
func raiseNoFile() uint64 {
	var rl syscall.Rlimit
	if err := syscall.Getrlimit(syscall.RLIMIT_NOFILE, &rl); err != nil {
		return 0
	}
	if rl.Cur < rl.Max {
		rl.Cur = rl.Max
		_ = syscall.Setrlimit(syscall.RLIMIT_NOFILE, &rl)
		_ = syscall.Getrlimit(syscall.RLIMIT_NOFILE, &rl)
	}
	return rl.Cur
}
