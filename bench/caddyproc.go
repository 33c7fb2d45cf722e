package main

import (
	"bufio"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"math"
	"os"
	"os/exec"
	"runtime"
	"runtime/debug"
	"runtime/pprof"
	"strconv"
	"time"

	"github.com/caddyserver/caddy/v2"
)

// Caddy runs in a process of its own (this program again, with -caddy), so
// that the CPU it uses per message is read from /proc like PostgreSQL's and
// Redis's, apart from the load clients and the stand-in n8n, which stay in
// this process. The parent drives it with JSON lines on its stdin.

type caddyRequest struct {
	Op     string          `json:"op"` // load, mem, sched, cpuprofile, heap, quit
	Config json.RawMessage `json:"config,omitempty"`
	File   string          `json:"file,omitempty"`
	On     bool            `json:"on,omitempty"`
}

type caddyReply struct {
	Err        string    `json:"err,omitempty"`
	RSS        int64     `json:"rss,omitempty"`
	HeapInuse  int64     `json:"heap_inuse,omitempty"`
	StackInuse int64     `json:"stack_inuse,omitempty"`
	Goroutines int       `json:"goroutines,omitempty"`
	Counts     []uint64  `json:"counts,omitempty"`
	Buckets    []float64 `json:"buckets,omitempty"`
}

// runCaddyChild is the Caddy process.
func runCaddyChild() error {
	raiseNoFile()
	out := json.NewEncoder(os.Stdout)
	in := bufio.NewScanner(os.Stdin)
	in.Buffer(make([]byte, 1<<20), 1<<20)
	var profile *os.File
	for in.Scan() {
		var req caddyRequest
		if err := json.Unmarshal(in.Bytes(), &req); err != nil {
			return err
		}
		var rep caddyReply
		var err error
		switch req.Op {
		case "load":
			err = caddy.Load(req.Config, true)
		case "mem":
			runtime.GC()
			debug.FreeOSMemory()
			time.Sleep(300 * time.Millisecond)
			var ms runtime.MemStats
			runtime.ReadMemStats(&ms)
			rep.RSS, rep.HeapInuse, rep.StackInuse = rssBytes("self"), int64(ms.HeapInuse), int64(ms.StackInuse)
			rep.Goroutines = runtime.NumGoroutine()
		case "sched":
			s := readSched()
			rep.Counts = s.counts
			for _, b := range s.buckets {
				rep.Buckets = append(rep.Buckets, max(-math.MaxFloat64, min(math.MaxFloat64, b))) // JSON has no infinities
			}
		case "cpuprofile":
			if req.On {
				if profile, err = os.Create(req.File); err == nil {
					err = pprof.StartCPUProfile(profile)
				}
			} else if profile != nil {
				pprof.StopCPUProfile()
				err = profile.Close()
				profile = nil
			}
		case "heap":
			var f *os.File
			if f, err = os.Create(req.File); err == nil {
				err = errors.Join(pprof.Lookup("heap").WriteTo(f, 0), f.Close())
			}
		case "quit":
			return caddy.Stop()
		default:
			err = errors.New("unknown op " + req.Op)
		}
		if err != nil {
			rep.Err = err.Error()
		}
		if err := out.Encode(rep); err != nil {
			return err
		}
	}
	return in.Err()
}

// caddyProc is the parent's handle on the Caddy process.
type caddyProc struct {
	cmd *exec.Cmd
	in  io.WriteCloser
	out *json.Decoder
	pid string
}

func startCaddyProc(config []byte) (*caddyProc, error) {
	exe, err := os.Executable()
	if err != nil {
		return nil, err
	}
	cmd := exec.Command(exe, "-caddy")
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
	p := &caddyProc{cmd: cmd, in: in, out: json.NewDecoder(outPipe), pid: strconv.Itoa(cmd.Process.Pid)}
	if _, err := p.call(caddyRequest{Op: "load", Config: config}); err != nil {
		p.stop()
		return nil, err
	}
	return p, nil
}

func (p *caddyProc) call(req caddyRequest) (caddyReply, error) {
	b, _ := json.Marshal(req)
	if _, err := p.in.Write(append(b, '\n')); err != nil {
		return caddyReply{}, err
	}
	var rep caddyReply
	if err := p.out.Decode(&rep); err != nil {
		return rep, fmt.Errorf("caddy process: %w", err)
	}
	if rep.Err != "" {
		return rep, errors.New("caddy process: " + rep.Err)
	}
	return rep, nil
}

// sched reads the Caddy process's scheduler latency histogram.
func (p *caddyProc) sched() schedLatency {
	rep, err := p.call(caddyRequest{Op: "sched"})
	if err != nil {
		return schedLatency{}
	}
	return schedLatency{counts: rep.Counts, buckets: rep.Buckets}
}

func (p *caddyProc) stop() {
	_, _ = p.call(caddyRequest{Op: "quit"})
	_ = p.in.Close()
	done := make(chan struct{})
	go func() { _ = p.cmd.Wait(); close(done) }()
	select {
	case <-done:
	case <-time.After(10 * time.Second):
		if p.cmd.Process != nil {
			_ = p.cmd.Process.Kill() // only the process this program started
		}
	}
}
