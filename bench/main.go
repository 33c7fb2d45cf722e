// Command bench measures chat_proxy against plain reverse_proxy, in one
// run, on this machine: Caddy (its own process, from this checkout) with
// reverse_proxy to a stand-in n8n, chat_proxy on PostgreSQL + Redis and
// chat_proxy on the embedded store, all on loopback.
//
//	go run ./bench            # the full run (a few minutes)
//	go run ./bench -quick     # a smoke run (< 60 s), as CI runs it
//
// Every figure it prints is measured in that run. See -h for the flags.
package main

import (
	"context"
	"flag"
	"fmt"
	"os"
	"os/signal"
	"path/filepath"
	"slices"
	"strings"
	"syscall"
	"time"
)

type options struct {
	duration    time.Duration
	warmup      time.Duration
	concurrency int
	streams     int
	quick       bool
	database    string
	redisURL    string
	phases      string
	cpuprofile  string
	cpuTarget   string
	cpuPhase    string
	memprofile  string
	paceGap     time.Duration
	loadShare   float64
	rounds      int
	helper      bool
	caddyChild  bool
}

func parseFlags() *options {
	o := &options{}
	flag.DurationVar(&o.duration, "duration", 10*time.Second, "measuring time of each phase against each target")
	flag.DurationVar(&o.warmup, "warmup", 2*time.Second, "unmeasured warm-up before each measurement")
	flag.IntVar(&o.concurrency, "concurrency", 16, "concurrent clients (closed-loop phases)")
	flag.IntVar(&o.streams, "streams", 5000, "idle SSE streams held open at once")
	flag.BoolVar(&o.quick, "quick", false, "smoke run under a minute: -duration 2s -warmup 500ms -streams 500 unless set")
	flag.StringVar(&o.database, "database", envOr("CHATPROXY_BENCH_DATABASE_URL", "postgres://postgres@127.0.0.1:5432/test?sslmode=disable"),
		"PostgreSQL URL (a fresh schema is created in it and dropped at exit); \"off\" skips PostgreSQL")
	flag.StringVar(&o.redisURL, "redis", envOr("CHATPROXY_BENCH_REDIS_URL", "redis://127.0.0.1:6379/0"), "Redis URL")
	flag.StringVar(&o.phases, "phases", "throughput,latency,chunks,sessions,streams", "phases to run")
	flag.StringVar(&o.cpuprofile, "cpuprofile", "", "after the phases, run -cpuprofile-phase's load against -cpuprofile-target once more\nfor -duration with the CPU profile on, written to this file")
	flag.StringVar(&o.cpuTarget, "cpuprofile-target", targetPG, "target profiled by -cpuprofile: rp, pg or lite")
	flag.StringVar(&o.cpuPhase, "cpuprofile-phase", "throughput", "load profiled by -cpuprofile: throughput (messages) or sessions (creations)")
	flag.StringVar(&o.memprofile, "memprofile", "", "write a heap profile while the chat_proxy streams are open")
	flag.DurationVar(&o.paceGap, "pace", 10*time.Millisecond, "gap between chunks of the paced stand-in (per-chunk delay phase)")
	flag.Float64Var(&o.loadShare, "load", 0.5, "offered rate of the latency phase, as a share of chat_proxy PG+Redis capacity")
	flag.IntVar(&o.rounds, "rounds", 0, "split each measurement into this many rounds, alternating the targets, so that\nload from elsewhere on the machine falls on all targets alike (0: one round per 2s of -duration)")
	flag.BoolVar(&o.helper, "helper", false, "internal: run as the streams helper process")
	flag.BoolVar(&o.caddyChild, "caddy", false, "internal: run as the Caddy process")
	flag.Parse()
	if o.quick {
		set := map[string]bool{}
		flag.Visit(func(f *flag.Flag) { set[f.Name] = true })
		if !set["duration"] {
			o.duration = 2 * time.Second
		}
		if !set["warmup"] {
			o.warmup = 500 * time.Millisecond
		}
		if !set["streams"] {
			o.streams = 500
		}
	}
	if o.rounds <= 0 {
		o.rounds = max(1, int(o.duration/(2*time.Second)))
	}
	return o
}

func envOr(k, def string) string {
	if v := os.Getenv(k); v != "" {
		return v
	}
	return def
}

func main() {
	o := parseFlags()
	if o.caddyChild {
		if err := runCaddyChild(); err != nil {
			fmt.Fprintln(os.Stderr, "bench caddy:", err)
			os.Exit(1)
		}
		return
	}
	if o.helper {
		if err := runHelper(); err != nil {
			fmt.Fprintln(os.Stderr, "bench helper:", err)
			os.Exit(1)
		}
		return
	}
	if err := run(o); err != nil {
		fmt.Fprintln(os.Stderr, "bench:", err)
		os.Exit(1)
	}
}

func (o *options) phase(name string) bool {
	return slices.Contains(strings.Split(o.phases, ","), name)
}

// report collects everything measured, for printing.
type report struct {
	o          *options
	machine    machineInfo
	pgVersion  string
	redisVer   string
	pgSchema   string
	noFile     uint64
	notes      []string
	throughput map[string]*loadResult
	latency    map[string]*loadResult
	chunks     map[string]*loadResult
	sessions   map[string]*loadResult
	streams    []*streamResult
	started    time.Time
	elapsed    time.Duration
	loadStart  string
	loadEnd    string
	// PostgreSQL commit latency at the start and the end of the run.
	commitStart, commitEnd sample
	done                   bool
}

func run(o *options) (err error) {
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	defer stop()
	rep := &report{o: o, machine: readMachine(), started: time.Now(),
		throughput: map[string]*loadResult{}, latency: map[string]*loadResult{},
		chunks: map[string]*loadResult{}, sessions: map[string]*loadResult{}}
	rep.noFile = raiseNoFile()
	rep.loadStart = loadavg()

	tmp, err := os.MkdirTemp("", "chatproxy-bench-")
	if err != nil {
		return err
	}
	defer os.RemoveAll(tmp)

	setup := &caddySetup{sqlitePath: filepath.Join(tmp, "chat.db"), storageDir: filepath.Join(tmp, "caddy")}
	var schema *pgSchema
	if o.database != "off" {
		schema, err = createSchema(ctx, o.database)
		if err != nil {
			schema = nil
			rep.notes = append(rep.notes, "PostgreSQL unreachable ("+err.Error()+"): PostgreSQL + Redis not measured")
		} else {
			defer func() {
				if err := schema.drop(); err != nil {
					fmt.Fprintln(os.Stderr, "bench: dropping schema", schema.name+":", err)
				}
			}()
			rep.pgVersion, rep.pgSchema = schema.version, schema.name
			cpuWatch.pgBackends = schema.backends
			defer schema.closeMonitor()
			if c, err := schema.commitLatency(ctx, 200); err == nil {
				rep.commitStart = c
			}
			defer func() {
				if c, err := schema.commitLatency(context.Background(), 200); err == nil {
					rep.commitEnd = c
				}
				rep.print(os.Stdout)
			}()
			if rep.redisVer, err = redisVersion(ctx, o.redisURL); err != nil {
				rep.notes = append(rep.notes, "Redis unreachable ("+err.Error()+"): PostgreSQL + Redis not measured")
			} else {
				setup.pgURL, setup.redisURL = schema.url, o.redisURL
			}
		}
	}

	st, err := startStandin(o.paceGap)
	if err != nil {
		return err
	}
	defer st.close()
	setup.standin = st.addr

	var helper *helperProc
	if o.phase("streams") && o.streams > 0 {
		if helper, err = startHelper(); err != nil {
			return err
		}
		defer helper.stop()
		setup.holdStandin = helper.standin
		setup.chatHoldDB = setup.pgURL
		if setup.chatHoldDB == "" {
			setup.chatHoldDB = "sqlite:" + filepath.Join(tmp, "streams.db")
		}
	}

	if err := setup.start(); err != nil {
		return fmt.Errorf("loading Caddy: %w", err)
	}
	defer setup.stop()

	conns := 4 * o.concurrency
	targets := []*target{newTarget(targetRP, setup.addrs[targetRP], false, conns)}
	if setup.pgURL != "" {
		targets = append(targets, newTarget(targetPG, setup.addrs[targetPG], true, conns))
	}
	targets = append(targets, newTarget(targetLite, setup.addrs[targetLite], true, conns))

	// Sessions for the message phases: one per concurrent client.
	sess := map[string][]*session{}
	for _, t := range targets {
		if !t.chat {
			continue
		}
		if sess[t.name], err = t.createSessions(ctx, conns); err != nil {
			return fmt.Errorf("%s: %w", targetNames[t.name], err)
		}
	}

	progress := func(format string, args ...any) {
		fmt.Fprintf(os.Stderr, "[%5.1fs] "+format+"\n", append([]any{time.Since(rep.started).Seconds()}, args...)...)
	}
	check := func() error {
		if ctx.Err() != nil {
			return errInterrupted
		}
		return nil
	}

	if o.phase("throughput") {
		progress("throughput: %d clients, %s per target in %d rounds", o.concurrency, o.duration, o.rounds)
		rep.throughput = interleave(ctx, o, setup.proc, targets, func(t *target, warmup, d time.Duration) *loadResult {
			return closedLoop(ctx, t, sess[t.name], o.concurrency, warmup, d, "MODE=fast", false)
		})
		if err := check(); err != nil {
			return err
		}
	}
	if o.phase("latency") {
		capacity := 0.0
		ref := targetPG
		if setup.pgURL == "" {
			ref = targetLite
		}
		if r := rep.throughput[ref]; r != nil {
			capacity = r.rate()
		} else {
			// No throughput phase: measure the capacity briefly.
			t := findTarget(targets, ref)
			capacity = closedLoop(ctx, t, sess[t.name], o.concurrency, o.warmup/2, o.duration/2, "MODE=fast", false).rate()
		}
		rate := max(1, capacity*o.loadShare)
		progress("latency: %.0f msg/s to each target, %s per target in %d rounds", rate, o.duration, o.rounds)
		rep.latency = interleave(ctx, o, setup.proc, targets, func(t *target, warmup, d time.Duration) *loadResult {
			return openLoop(ctx, t, sess[t.name], rate, conns, warmup, d, "MODE=fast")
		})
		if err := check(); err != nil {
			return err
		}
	}

	if o.phase("chunks") {
		progress("per-chunk delay: chunks %s apart, %s per target in %d rounds", o.paceGap, o.duration, o.rounds)
		rep.chunks = interleave(ctx, o, setup.proc, targets, func(t *target, warmup, d time.Duration) *loadResult {
			return closedLoop(ctx, t, sess[t.name], o.concurrency, warmup, d, "MODE=paced", true)
		})
		if err := check(); err != nil {
			return err
		}
	}

	if o.phase("sessions") {
		progress("session creations: %s per target in %d rounds", o.duration, o.rounds)
		var chats []*target
		for _, t := range targets {
			if t.chat {
				chats = append(chats, t)
			}
		}
		rep.sessions = interleave(ctx, o, setup.proc, chats, func(t *target, warmup, d time.Duration) *loadResult {
			return sessionLoop(ctx, t, o.concurrency, warmup, d)
		})
		if err := check(); err != nil {
			return err
		}
	}

	if o.cpuprofile != "" {
		if err := profileRun(ctx, o, setup.proc, findTarget(targets, o.cpuTarget), sess, rep, progress); err != nil {
			return err
		}
	}

	if helper != nil {
		for _, v := range []struct {
			name, addr string
			chat       bool
		}{
			{"reverse_proxy", setup.addrs[targetRPHold], false},
			{chatHoldName(setup), setup.addrs[targetPGHold], true},
		} {
			progress("idle streams: %d through %s", o.streams, v.name)
			profile := ""
			if v.chat {
				profile = o.memprofile
			}
			var settle func() (time.Duration, error)
			if v.chat && schema != nil && setup.chatHoldDB == setup.pgURL {
				settle = func() (time.Duration, error) { return schema.waitReplies(ctx, 2*time.Minute) }
			}
			r, err := measureStreams(helper, setup.proc, v.name, "http://"+v.addr, v.chat, o.streams, profile, settle)
			if err != nil {
				return fmt.Errorf("streams through %s: %w", v.name, err)
			}
			rep.streams = append(rep.streams, r)
			if err := check(); err != nil {
				return err
			}
		}
	}
	rep.elapsed = time.Since(rep.started)
	rep.loadEnd = loadavg()
	rep.done = true
	if rep.pgSchema == "" {
		rep.print(os.Stdout)
	} // else printed once the closing commit latency is measured
	// Missed targets are findings; failed requests are a broken build.
	if n := rep.failures(); n > 0 {
		return fmt.Errorf("%d requests or streams failed (see the errors columns)", n)
	}
	return nil
}

// profileRun runs one load against one target with the Caddy process's
// CPU profile on, so the profile holds that path only.
func profileRun(ctx context.Context, o *options, caddyp *caddyProc, t *target, sess map[string][]*session, rep *report, progress func(string, ...any)) error {
	if o.cpuPhase == "sessions" && !t.chat {
		return fmt.Errorf("-cpuprofile-phase sessions needs a chat_proxy target")
	}
	progress("cpu profile: %s of %s, %d clients, %s -> %s", o.cpuPhase, targetNames[t.name], o.concurrency, o.duration, o.cpuprofile)
	file, err := filepath.Abs(o.cpuprofile)
	if err != nil {
		return err
	}
	load := func(warmup, d time.Duration) *loadResult {
		if o.cpuPhase == "sessions" {
			return sessionLoop(ctx, t, o.concurrency, warmup, d)
		}
		return closedLoop(ctx, t, sess[t.name], o.concurrency, warmup, d, "MODE=fast", false)
	}
	load(o.warmup, 0)
	if _, err := caddyp.call(caddyRequest{Op: "cpuprofile", On: true, File: file}); err != nil {
		return err
	}
	before := readCPU()
	r := load(0, o.duration)
	r.cpu.add(before, readCPU())
	if _, err := caddyp.call(caddyRequest{Op: "cpuprofile", On: false}); err != nil {
		return err
	}
	rep.notes = append(rep.notes, fmt.Sprintf("CPU profile of %s, %s (%.0f/s while profiled, CPU %s) in %s",
		targetNames[t.name], o.cpuPhase, r.rate(), cpuCol(r), o.cpuprofile))
	return nil
}

func (r *report) failures() int {
	n := 0
	for _, m := range []map[string]*loadResult{r.throughput, r.latency, r.chunks, r.sessions} {
		for _, l := range m {
			n += l.errors
		}
	}
	for _, s := range r.streams {
		n += s.failed
	}
	return n
}

func chatHoldName(s *caddySetup) string {
	if s.chatHoldDB == s.pgURL {
		return targetNames[targetPG]
	}
	return targetNames[targetLite]
}

func findTarget(ts []*target, name string) *target {
	for _, t := range ts {
		if t.name == name {
			return t
		}
	}
	return ts[0]
}

// interleave measures every target in o.rounds rounds (the targets take
// turns within each round) and merges each target's rounds. The first round
// warms up for o.warmup, later ones briefly.
func interleave(ctx context.Context, o *options, caddyp *caddyProc, targets []*target, measure func(t *target, warmup, d time.Duration) *loadResult) map[string]*loadResult {
	out := map[string]*loadResult{}
	d := o.duration / time.Duration(o.rounds)
	for round := range o.rounds {
		warmup := o.warmup
		if round > 0 {
			warmup = min(o.warmup, 250*time.Millisecond)
		}
		for _, t := range targets {
			if ctx.Err() != nil {
				return out
			}
			before, sched := readCPU(), caddyp.sched()
			r := measure(t, warmup, d)
			r.cpu.add(before, readCPU())
			r.sched.add(sched, caddyp.sched())
			if acc := out[t.name]; acc == nil {
				out[t.name] = r
			} else {
				acc.merge(r)
				acc.elapsed += r.elapsed
				acc.cpu.merge(r.cpu)
				acc.sched.add(schedLatency{counts: make([]uint64, len(r.sched.counts))}, r.sched)
			}
		}
	}
	return out
}
