package main

import (
	"os"
	"runtime/metrics"
	"slices"
	"strconv"
	"strings"
	"time"
)

// CPU accounting, so that a run on a shared machine says how much of the
// CPU went to Caddy (its own process), to this program (load clients and
// stand-in n8n), to PostgreSQL and Redis, and to everything else (other
// people's builds, say) while each figure was measured, and what a message
// cost each of them.

// cpuWatch names the processes to account: the Caddy process, and this
// run's PostgreSQL processes (see pgSchema.backends). Set once at start.
var cpuWatch struct {
	caddyPID   string
	pgBackends func() []string
}

// clockTicks is USER_HZ, which Linux fixes at 100 for /proc.
const clockTicks = 100

type cpuSample struct {
	at    time.Time
	busy  uint64 // all CPUs, every non-idle state
	self  uint64 // this process
	caddy uint64 // the Caddy process
	pg    uint64 // postgres processes
	redis uint64 // redis-server processes
	// pgProcs holds the ticks of each of this run's postgres processes, so
	// one that starts or ends between two samples is counted from zero.
	pgProcs map[string]uint64
}

type cpuUse struct {
	wall                                 time.Duration
	self, caddy, pg, pgRun, redis, other float64 // CPU-seconds
}

func ticksDelta(a, b uint64) float64 {
	if b < a { // a process exited
		return 0
	}
	return float64(b-a) / clockTicks
}

func (u *cpuUse) add(a, b cpuSample) {
	u.wall += b.at.Sub(a.at)
	self, caddy := ticksDelta(a.self, b.self), ticksDelta(a.caddy, b.caddy)
	pg, redis := ticksDelta(a.pg, b.pg), ticksDelta(a.redis, b.redis)
	u.self += self
	u.caddy += caddy
	u.pg += pg
	u.redis += redis
	for pid, t := range b.pgProcs {
		u.pgRun += ticksDelta(a.pgProcs[pid], t)
	}
	u.other += max(0, ticksDelta(a.busy, b.busy)-self-caddy-pg-redis)
}

func (u *cpuUse) merge(o cpuUse) {
	u.wall += o.wall
	u.self += o.self
	u.caddy += o.caddy
	u.pg += o.pg
	u.pgRun += o.pgRun
	u.redis += o.redis
	u.other += o.other
}

// cores returns the average number of cores busy with Caddy, this
// program, PostgreSQL (all of it), Redis and everything else.
func (u *cpuUse) cores() (caddy, self, pg, redis, other float64) {
	s := u.wall.Seconds()
	if s <= 0 {
		return 0, 0, 0, 0, 0
	}
	return u.caddy / s, u.self / s, u.pg / s, u.redis / s, u.other / s
}

// perUnit returns the CPU milliseconds each of n requests, done in
// elapsed, cost Caddy, this run's PostgreSQL processes and Redis. The CPU
// window also covers warm-ups, so it is scaled by its busy rate.
func (u *cpuUse) perUnit(elapsed time.Duration, n int) (caddy, pg, redis float64) {
	w := u.wall.Seconds()
	if n <= 0 || w <= 0 {
		return 0, 0, 0
	}
	f := 1000 * elapsed.Seconds() / w / float64(n)
	return u.caddy * f, u.pgRun * f, u.redis * f
}

func readCPU() cpuSample {
	s := cpuSample{at: time.Now()}
	if b, err := os.ReadFile("/proc/stat"); err == nil {
		line, _, _ := strings.Cut(string(b), "\n")
		f := strings.Fields(line)
		// cpu user nice system idle iowait irq softirq steal ...
		for i, v := range f[1:] {
			if i == 3 || i == 4 || i > 7 { // idle, iowait, guest*
				continue
			}
			n, _ := strconv.ParseUint(v, 10, 64)
			s.busy += n
		}
	}
	s.self, _ = procTicks("self")
	if cpuWatch.caddyPID != "" {
		s.caddy, _ = procTicks(cpuWatch.caddyPID)
	}
	if cpuWatch.pgBackends != nil {
		s.pgProcs = map[string]uint64{}
		for _, pid := range cpuWatch.pgBackends() {
			if t, comm := procTicks(pid); comm == "postgres" {
				s.pgProcs[pid] = t
			}
		}
	}
	if entries, err := os.ReadDir("/proc"); err == nil {
		for _, e := range entries {
			if e.Name()[0] < '0' || e.Name()[0] > '9' {
				continue
			}
			switch t, comm := procTicks(e.Name()); comm {
			case "postgres":
				s.pg += t
			case "redis-server":
				s.redis += t
			}
		}
	}
	return s
}

// procTicks returns utime+stime of a process and its command name.
func procTicks(pid string) (uint64, string) {
	b, err := os.ReadFile("/proc/" + pid + "/stat")
	if err != nil {
		return 0, ""
	}
	s := string(b)
	open, close := strings.IndexByte(s, '('), strings.LastIndexByte(s, ')')
	if open < 0 || close < open {
		return 0, ""
	}
	comm := s[open+1 : close]
	f := strings.Fields(s[close+1:])
	// After the command: state(0) ppid(1) … utime(11) stime(12).
	if len(f) < 13 {
		return 0, comm
	}
	u, _ := strconv.ParseUint(f[11], 10, 64)
	st, _ := strconv.ParseUint(f[12], 10, 64)
	return u + st, comm
}

// procParent returns a process's parent pid.
func procParent(pid string) string {
	b, err := os.ReadFile("/proc/" + pid + "/stat")
	if err != nil {
		return ""
	}
	s := string(b)
	f := strings.Fields(s[strings.LastIndexByte(s, ')')+1:])
	if len(f) < 2 {
		return ""
	}
	return f[1]
}

func loadavg() string {
	b, err := os.ReadFile("/proc/loadavg")
	if err != nil {
		return "?"
	}
	f := strings.Fields(string(b))
	if len(f) < 3 {
		return "?"
	}
	return strings.Join(f[:3], " ")
}

// schedLatency is the Go scheduler's histogram of how long goroutines
// waited, runnable, for a P: the delay a relayed chunk can suffer when
// other work in the process (an in-process database, say) holds the CPUs.
type schedLatency struct {
	counts  []uint64
	buckets []float64
}

var schedSample = []metrics.Sample{{Name: "/sched/latencies:seconds"}}

func readSched() schedLatency {
	metrics.Read(schedSample)
	if schedSample[0].Value.Kind() != metrics.KindFloat64Histogram {
		return schedLatency{}
	}
	h := schedSample[0].Value.Float64Histogram()
	return schedLatency{counts: slices.Clone(h.Counts), buckets: h.Buckets}
}

// add accumulates b minus a.
func (s *schedLatency) add(a, b schedLatency) {
	if len(a.counts) != len(b.counts) {
		return
	}
	if s.counts == nil {
		s.counts, s.buckets = make([]uint64, len(b.counts)), b.buckets
	}
	for i := range b.counts {
		s.counts[i] += b.counts[i] - a.counts[i]
	}
}

// quantile returns the upper bound of the bucket holding the q-quantile.
func (s *schedLatency) quantile(q float64) time.Duration {
	var total uint64
	for _, c := range s.counts {
		total += c
	}
	if total == 0 {
		return 0
	}
	want := uint64(q * float64(total))
	var seen uint64
	for i, c := range s.counts {
		seen += c
		if seen > want {
			return time.Duration(s.buckets[i+1] * float64(time.Second))
		}
	}
	return 0
}
