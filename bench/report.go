package main

import (
	"fmt"
	"io"
	"os"
	"runtime"
	"strconv"
	"strings"
	"text/tabwriter"
	"time"
)

type machineInfo struct {
	cpus       int
	gomaxprocs int
	model      string
	kernel     string
	memTotal   int64
	goVersion  string
}

func readMachine() machineInfo {
	m := machineInfo{cpus: runtime.NumCPU(), gomaxprocs: runtime.GOMAXPROCS(0), goVersion: runtime.Version(), model: "?", kernel: "?"}
	if b, err := os.ReadFile("/proc/cpuinfo"); err == nil {
		for line := range strings.SplitSeq(string(b), "\n") {
			if k, v, ok := strings.Cut(line, ":"); ok && strings.TrimSpace(k) == "model name" {
				m.model = strings.TrimSpace(v)
				break
			}
		}
	}
	if b, err := os.ReadFile("/proc/sys/kernel/osrelease"); err == nil {
		m.kernel = strings.TrimSpace(string(b))
	}
	if b, err := os.ReadFile("/proc/meminfo"); err == nil {
		for line := range strings.SplitSeq(string(b), "\n") {
			if v, ok := strings.CutPrefix(line, "MemTotal:"); ok {
				if f := strings.Fields(v); len(f) > 0 {
					kb, _ := strconv.ParseInt(f[0], 10, 64)
					m.memTotal = kb << 10
				}
			}
		}
	}
	return m
}

// Targets of issue #6.
const (
	targetRatio       = 0.40 // PostgreSQL + Redis (issue #13)
	targetRatioLite   = 0.45 // embedded store (issue #13)
	targetAddedP50    = 1500 * time.Microsecond
	targetChunkP99    = time.Millisecond
	targetStreamBytes = 64 << 10
	targetStreamsN    = 5000
	targetCreations   = 3000.0
)

func verdict(ok bool) string {
	if ok {
		return "met"
	}
	return "MISSED"
}

func (r *report) print(out io.Writer) {
	if !r.done {
		return // interrupted or failed: no table of partial figures
	}
	o := r.o
	fmt.Fprintf(out, "\ncaddy-chatproxy benchmark (go run ./bench%s)\n", r.flagsLine())
	fmt.Fprintf(out, "date:     %s (run took %s; load average %s at start, %s at end)\n", r.started.UTC().Format(time.RFC3339),
		r.elapsed.Round(time.Second), r.loadStart, r.loadEnd)
	fmt.Fprintf(out, "machine:  nproc %d, GOMAXPROCS %d, %s, %s RAM, Linux %s, RLIMIT_NOFILE %d\n",
		r.machine.cpus, r.machine.gomaxprocs, r.machine.model, mib(r.machine.memTotal), r.machine.kernel, r.noFile)
	fmt.Fprintf(out, "software: %s, Caddy v2.11.9 (its own process), PostgreSQL %s, Redis %s\n", r.machine.goVersion, orNA(r.pgVersion), orNA(r.redisVer))
	if len(r.commitStart) > 0 {
		fmt.Fprintf(out, "disk:     PostgreSQL commit (1-row INSERT, serial, 200×): p50 %s p99 %s at start", ms(r.commitStart.p50()), ms(r.commitStart.p99()))
		if len(r.commitEnd) > 0 {
			fmt.Fprintf(out, ", p50 %s p99 %s at end", ms(r.commitEnd.p50()), ms(r.commitEnd.p99()))
		}
		fmt.Fprintln(out)
	}
	fmt.Fprintf(out, "setup:    all on loopback: Caddy in a process of its own, load client and stand-in n8n in this one; PostgreSQL and Redis local;\n")
	fmt.Fprintf(out, "          stand-in n8n streams %d NDJSON item chunks (+ begin, end) per reply; chat_proxy limits\n", itemsPerReply)
	fmt.Fprintf(out, "          generous (every tier still checked), bot_detection off; PG schema %s (dropped at exit)\n", orNA(r.pgSchema))
	for _, n := range r.notes {
		fmt.Fprintf(out, "note:     %s\n", n)
	}

	order := []string{targetRP, targetPG, targetLite}
	rp := r.throughput[targetRP]

	fmt.Fprintf(out, "method:   each measurement runs %s per target in %d rounds, the targets taking turns, after a warm-up;\n", o.duration, o.rounds)
	fmt.Fprintf(out, "          CPU = average cores busy with Caddy / this program (clients, stand-in) / PostgreSQL / Redis / everything else meanwhile;\n")
	fmt.Fprintf(out, "          CPU ms/req = CPU time per request of Caddy / PostgreSQL (this run's backends and the server's own processes) / Redis\n")
	fmt.Fprintf(out, "          (Redis is shared with anything else using it), from utime+stime in /proc/<pid>/stat\n")
	if len(r.throughput) > 0 {
		fmt.Fprintf(out, "\n1. Message round trips, closed loop: %d clients, each sends its next message when the reply is complete\n", o.concurrency)
		tw := newTable(out)
		fmt.Fprintln(tw, "target\tround trips/s\tvs reverse_proxy\tp50\tp99\tTTFC p50\tTTFC p99\tCPU ms/req Caddy/PG/Redis\tCPU Caddy/bench/PG/Redis/other\terrors\t")
		for _, name := range order {
			t := r.throughput[name]
			if t == nil {
				continue
			}
			ratio := "-"
			if name != targetRP && rp != nil && rp.rate() > 0 {
				ratio = fmt.Sprintf("%.2f", t.rate()/rp.rate())
			}
			fmt.Fprintf(tw, "%s\t%.0f\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t\n", targetNames[name], t.rate(), ratio,
				ms(t.total.p50()), ms(t.total.p99()), ms(t.ttfc.p50()), ms(t.ttfc.p99()), perMsgCol(t), cpuCol(t), errs(t))
		}
		tw.Flush()
	}

	if len(r.latency) > 0 {
		lrp := r.latency[targetRP]
		rate := 0.0
		for _, l := range r.latency {
			rate = l.offered
		}
		fmt.Fprintf(out, "\n2. Latency at the same offered load: open loop, %.0f messages/s to each target (%.0f%% of chat_proxy capacity above), %s\n", rate, o.loadShare*100, o.duration)
		tw := newTable(out)
		fmt.Fprintln(tw, "target\tdone/s\tp50\tp99\tadded p50\tadded p99\tTTFC p50\tTTFC p99\tCPU ms/req Caddy/PG/Redis\tCPU Caddy/bench/PG/Redis/other\terrors\t")
		for _, name := range order {
			l := r.latency[name]
			if l == nil {
				continue
			}
			a50, a99 := "-", "-"
			if name != targetRP && lrp != nil {
				a50, a99 = signedMS(l.total.p50()-lrp.total.p50()), signedMS(l.total.p99()-lrp.total.p99())
			}
			fmt.Fprintf(tw, "%s\t%.0f\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t\n", targetNames[name], l.rate(), ms(l.total.p50()), ms(l.total.p99()),
				a50, a99, ms(l.ttfc.p50()), ms(l.ttfc.p99()), perMsgCol(l), cpuCol(l), errs(l))
		}
		tw.Flush()
		fmt.Fprintln(out, "   added = chat_proxy minus reverse_proxy at the same rate; TTFC = request sent to first reply chunk received")
	}

	if len(r.chunks) > 0 {
		crp := r.chunks[targetRP]
		fmt.Fprintf(out, "\n3. Per-chunk delay: paced stand-in, %d chunks %s apart, %d clients, %s; delay = chunk received minus chunk written by the stand-in\n",
			itemsPerReply, o.paceGap, o.concurrency, o.duration)
		tw := newTable(out)
		fmt.Fprintln(tw, "target\tchunks\tp50\tp99\tadded p50\tadded p99\tGo run-queue wait p99\tCPU Caddy/bench/PG/Redis/other\terrors\t")
		for _, name := range order {
			c := r.chunks[name]
			if c == nil {
				continue
			}
			a50, a99 := "-", "-"
			if name != targetRP && crp != nil {
				a50, a99 = signedMS(c.chunks.p50()-crp.chunks.p50()), signedMS(c.chunks.p99()-crp.chunks.p99())
			}
			fmt.Fprintf(tw, "%s\t%d\t%s\t%s\t%s\t%s\t≤ %s\t%s\t%s\t\n", targetNames[name], len(c.chunks), ms(c.chunks.p50()), ms(c.chunks.p99()), a50, a99,
				ms(c.sched.quantile(0.99)), cpuCol(c), errs(c))
		}
		tw.Flush()
		fmt.Fprintln(out, "   Go run-queue wait = how long goroutines of the Caddy process waited, runnable, for a CPU (runtime/metrics /sched/latencies)")
	}

	if len(r.sessions) > 0 {
		fmt.Fprintf(out, "\n4. Session creations: POST /api/v1/session/create, closed loop, %d clients, %s\n", o.concurrency, o.duration)
		tw := newTable(out)
		fmt.Fprintln(tw, "target\tcreations/s\tp50\tp99\tCPU ms/req Caddy/PG/Redis\tCPU Caddy/bench/PG/Redis/other\terrors\t")
		for _, name := range order {
			s := r.sessions[name]
			if s == nil {
				continue
			}
			fmt.Fprintf(tw, "%s\t%.0f\t%s\t%s\t%s\t%s\t%s\t\n", targetNames[name], s.rate(), ms(s.total.p50()), ms(s.total.p99()), perMsgCol(s), cpuCol(s), errs(s))
		}
		tw.Flush()
	}

	if len(r.streams) > 0 {
		fmt.Fprintf(out, "\n5. Idle SSE streams held open at once (stand-in sends one chunk, then never finishes). Clients and stand-in run in a\n")
		fmt.Fprintf(out, "   helper process (4 sockets per stream would not fit RLIMIT_NOFILE %d in one), so the Caddy process holds only\n", r.noFile)
		fmt.Fprintf(out, "   what serving the streams costs. RSS read from /proc/<pid>/status after GC + FreeOSMemory, before and after opening.\n")
		tw := newTable(out)
		fmt.Fprintln(tw, "through\tstreams\topen in\tclosed in\tCaddy ΔRSS\tper stream\tΔheap/stream\tΔstacks/stream\tgoroutines/stream\thelper ΔRSS/stream\ttotal/stream\t")
		for _, s := range r.streams {
			d := s.after.rss - s.before.rss
			hd := s.after.helperRSS - s.before.helperRSS
			fmt.Fprintf(tw, "%s\t%d/%d\t%s\t%s\t%s\t%s\t%s\t%s\t%.1f\t%s\t%s\t\n", s.target, s.opened, s.n, s.openTime.Round(time.Millisecond),
				s.closeTime.Round(time.Millisecond),
				mib(d), kib(s.perStream(d)), kib(s.perStream(s.after.heapInuse-s.before.heapInuse)),
				kib(s.perStream(s.after.stackInuse-s.before.stackInuse)),
				float64(s.after.goroutines-s.before.goroutines)/float64(max(1, s.opened)),
				kib(s.perStream(hd)), kib(s.perStream(d+hd)))
			if s.failed > 0 {
				fmt.Fprintf(tw, "  %d failed, first: %s\t\n", s.failed, s.firstErr)
			}
		}
		tw.Flush()
		fmt.Fprintln(out, "   per stream = Δ / streams opened; total = Caddy + helper (client sockets and stand-in), the figure if all shared one process;")
		fmt.Fprintln(out, "   closed in = until every stream ended and (chat_proxy) its partial reply was stored. Measured after a GC, so live memory:")
		fmt.Fprintln(out, "   a running server also carries GC headroom (GOGC) on top of the heap part.")
	}

	r.printTargets(out)
}

func (r *report) printTargets(out io.Writer) {
	fmt.Fprintf(out, "\nTargets (issues #6 and #13)\n")
	tw := newTable(out)
	fmt.Fprintln(tw, "target\tgoal\tmeasured\tresult\t")
	notMeasured := func(name, goal string) { fmt.Fprintf(tw, "%s\t%s\tnot measured\t-\t\n", name, goal) }

	for _, st := range []string{targetPG, targetLite} {
		label := "throughput ratio, " + targetNames[st] + " / reverse_proxy"
		rp, t := r.throughput[targetRP], r.throughput[st]
		if rp == nil || t == nil || rp.rate() == 0 {
			if st == targetPG {
				notMeasured(label, "≥ 0.40")
			}
			continue
		}
		ratio, goal := t.rate()/rp.rate(), targetRatio
		if st == targetLite {
			goal = targetRatioLite
		}
		fmt.Fprintf(tw, "%s\t≥ %.2f\t%.2f (%.0f / %.0f)\t%s\t\n", label, goal, ratio, t.rate(), rp.rate(), verdict(ratio >= goal && t.errors == 0))
	}
	for _, st := range []string{targetPG, targetLite} {
		label := "p50 added latency, " + targetNames[st]
		rp, t := r.latency[targetRP], r.latency[st]
		if rp == nil || t == nil {
			if st == targetPG {
				notMeasured(label, "≤ 1.5 ms")
			}
			continue
		}
		d := t.total.p50() - rp.total.p50()
		fmt.Fprintf(tw, "%s\t≤ 1.5 ms\t%s (p99 %s)\t%s\t\n", label, signedMS(d), signedMS(t.total.p99()-rp.total.p99()), verdict(d <= targetAddedP50 && t.errors == 0))
	}
	for _, st := range []string{targetPG, targetLite} {
		label := "per-chunk added delay p99, " + targetNames[st]
		rp, t := r.chunks[targetRP], r.chunks[st]
		if rp == nil || t == nil {
			if st == targetPG {
				notMeasured(label, "≤ 1 ms")
			}
			continue
		}
		d := t.chunks.p99() - rp.chunks.p99()
		fmt.Fprintf(tw, "%s\t≤ 1 ms\t%s\t%s\t\n", label, signedMS(d), verdict(d <= targetChunkP99 && t.errors == 0))
	}
	var chat *streamResult
	for _, s := range r.streams {
		if s.target != "reverse_proxy" {
			chat = s
		}
	}
	if chat == nil {
		notMeasured("RSS per idle SSE stream (chat_proxy)", "≤ 64 KiB at 5000")
	} else {
		per := chat.perStream(chat.after.rss - chat.before.rss)
		at := ""
		if chat.n != targetStreamsN {
			at = fmt.Sprintf(" (at %d, not 5000)", chat.n)
		}
		fmt.Fprintf(tw, "RSS per idle SSE stream, %s, Caddy process\t≤ 64 KiB at 5000\t%s at %d%s\t%s\t\n", chat.target, kib(per), chat.opened, at,
			verdict(per <= targetStreamBytes && chat.failed == 0 && chat.n >= targetStreamsN))
		total := chat.perStream(chat.after.rss - chat.before.rss + chat.after.helperRSS - chat.before.helperRSS)
		fmt.Fprintf(tw, "  same, with client and stand-in (all one process)\t(for reference)\t%s\t-\t\n", kib(total))
	}
	for _, st := range []string{targetPG, targetLite} {
		label := "session creations, " + targetNames[st]
		s := r.sessions[st]
		if s == nil {
			if st == targetPG {
				notMeasured(label, "≥ 3000/s")
			}
			continue
		}
		fmt.Fprintf(tw, "%s\t≥ 3000/s\t%.0f/s\t%s\t\n", label, s.rate(), verdict(s.rate() >= targetCreations && s.errors == 0))
	}
	tw.Flush()
}

func newTable(out io.Writer) *tabwriter.Writer {
	return tabwriter.NewWriter(out, 0, 0, 2, ' ', 0)
}

func errs(r *loadResult) string {
	s := strconv.Itoa(r.errors)
	if r.dropped > 0 {
		s += fmt.Sprintf(" (+%d not sent: in-flight cap)", r.dropped)
	}
	if r.firstErr != nil {
		msg := r.firstErr.Error()
		if len(msg) > 60 {
			msg = msg[:60] + "…"
		}
		s += " first: " + msg
	}
	return s
}

// cpuCol is the average number of cores busy with the Caddy process, with
// this program, with PostgreSQL and Redis, and with anything else, while r
// was measured.
func cpuCol(r *loadResult) string {
	caddy, self, pg, redis, other := r.cpu.cores()
	return fmt.Sprintf("%.2f/%.2f/%.2f/%.2f/%.2f", caddy, self, pg, redis, other)
}

// perMsgCol is the CPU each request of r cost Caddy, this run's PostgreSQL
// processes and Redis, in milliseconds.
func perMsgCol(r *loadResult) string {
	caddy, pg, redis := r.cpu.perUnit(r.elapsed, r.count)
	return fmt.Sprintf("%.3f/%.3f/%.3f", caddy, pg, redis)
}

func orNA(s string) string {
	if s == "" {
		return "n/a"
	}
	return s
}

func (r *report) flagsLine() string {
	o := r.o
	var b strings.Builder
	if o.quick {
		b.WriteString(" -quick")
	}
	fmt.Fprintf(&b, " -duration %s -concurrency %d -streams %d", o.duration, o.concurrency, o.streams)
	return b.String()
}
