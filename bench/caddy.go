package main

import (
	"context"
	"crypto/rand"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"net"
	"net/url"
	"strings"
	"sync"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/redis/go-redis/v9"

	// Caddy's standard modules (reverse_proxy among them) and chat_proxy
	// from this checkout.
	_ "github.com/caddyserver/caddy/v2/modules/standard"

	_ "github.com/chatproxy/caddy-chatproxy"
)

// pgSchema is a fresh PostgreSQL schema for one run.
type pgSchema struct {
	base    string // the configured URL
	name    string
	url     string // base with search_path and application_name set
	version string
	app     string // application_name of chat_proxy's connections

	mu      sync.Mutex
	monitor *pgx.Conn // for backends
}

// createSchema creates a uniquely named schema and returns a URL that
// selects it (options=-c search_path=…, which pgx honours).
func createSchema(ctx context.Context, base string) (*pgSchema, error) {
	ctx, cancel := context.WithTimeout(ctx, 5*time.Second)
	defer cancel()
	s := &pgSchema{base: base, name: "bench_" + randomHex(6)}
	conn, err := s.connect(ctx)
	if err != nil {
		return nil, err
	}
	defer conn.Close(context.Background())
	if err := conn.QueryRow(ctx, "SHOW server_version").Scan(&s.version); err != nil {
		return nil, err
	}
	if _, err := conn.Exec(ctx, "CREATE SCHEMA "+pgx.Identifier{s.name}.Sanitize()); err != nil {
		return nil, err
	}
	u, err := url.Parse(base)
	if err != nil || (u.Scheme != "postgres" && u.Scheme != "postgresql") {
		s.drop()
		return nil, fmt.Errorf("-database must be a postgres:// URL")
	}
	q := u.Query()
	opt := "-c search_path=" + s.name
	if old := q.Get("options"); old != "" {
		opt = old + " " + opt
	}
	q.Set("options", opt)
	// Names chat_proxy's connections, so that the CPU of their backends is
	// told apart from other clients' (see backends).
	s.app = "chatproxy-" + s.name
	q.Set("application_name", s.app)
	// '+' is not a space for libpq; %20 is everywhere.
	u.RawQuery = strings.ReplaceAll(q.Encode(), "+", "%20")
	s.url = u.String()
	return s, nil
}

// connect opens an administrative connection: the URL without the pool_*
// settings, which only pgxpool understands (pgx would send them to the
// server as run-time parameters).
func (s *pgSchema) connect(ctx context.Context) (*pgx.Conn, error) {
	u, err := url.Parse(s.base)
	if err != nil {
		return nil, errors.New("-database: not a valid URL")
	}
	q := u.Query()
	for k := range q {
		if strings.HasPrefix(k, "pool_") {
			q.Del(k)
		}
	}
	u.RawQuery = strings.ReplaceAll(q.Encode(), "+", "%20")
	return pgx.Connect(ctx, u.String())
}

// backends lists this run's PostgreSQL processes: the backends serving
// chat_proxy's connections, the server's own processes (WAL writer,
// checkpointer, ...; autovacuum workers aside) and the postmaster. Other
// clients' backends (other programs on a shared server) are left out.
func (s *pgSchema) backends() []string {
	s.mu.Lock()
	defer s.mu.Unlock()
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Second)
	defer cancel()
	if s.monitor == nil || s.monitor.IsClosed() {
		c, err := s.connect(ctx)
		if err != nil {
			return nil
		}
		s.monitor = c
	}
	rows, err := s.monitor.Query(ctx, `
SELECT pid::text FROM pg_stat_activity
WHERE application_name = $1 OR backend_type NOT IN ('client backend', 'autovacuum worker')`, s.app)
	if err != nil {
		return nil
	}
	pids, err := pgx.CollectRows(rows, pgx.RowTo[string])
	if err != nil || len(pids) == 0 {
		return nil
	}
	if pp := procParent(pids[0]); pp != "" {
		pids = append(pids, pp)
	}
	return pids
}

func (s *pgSchema) closeMonitor() {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.monitor != nil {
		_ = s.monitor.Close(context.Background())
		s.monitor = nil
	}
}

func (s *pgSchema) drop() error {
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	conn, err := s.connect(ctx)
	if err != nil {
		return err
	}
	defer conn.Close(context.Background())
	_, err = conn.Exec(ctx, "DROP SCHEMA IF EXISTS "+pgx.Identifier{s.name}.Sanitize()+" CASCADE")
	return err
}

// commitLatency measures PostgreSQL's commit latency as this run sees it:
// n one-row INSERTs, each its own transaction, one after another, in a
// scratch table of the schema. It is dominated by the WAL flush (fsync),
// which on a shared disk varies with everyone else's I/O.
func (s *pgSchema) commitLatency(ctx context.Context, n int) (sample, error) {
	ctx, cancel := context.WithTimeout(ctx, 30*time.Second)
	defer cancel()
	conn, err := s.connect(ctx)
	if err != nil {
		return nil, err
	}
	defer conn.Close(context.Background())
	table := pgx.Identifier{s.name, "bench_commit"}.Sanitize()
	if _, err := conn.Exec(ctx, "CREATE TABLE IF NOT EXISTS "+table+" (x int)"); err != nil {
		return nil, err
	}
	out := make(sample, 0, n)
	for i := range n {
		start := time.Now()
		if _, err := conn.Exec(ctx, "INSERT INTO "+table+" VALUES ($1)", i); err != nil {
			return nil, err
		}
		out = append(out, time.Since(start))
	}
	return out, nil
}

// waitReplies waits until every user message stored in the schema has its
// assistant reply (stored by chat_proxy after the client left), so one
// phase's writes do not spill into the next. It returns how long it took.
func (s *pgSchema) waitReplies(ctx context.Context, timeout time.Duration) (time.Duration, error) {
	start := time.Now()
	ctx, cancel := context.WithTimeout(ctx, timeout)
	defer cancel()
	conn, err := s.connect(ctx)
	if err != nil {
		return 0, err
	}
	defer conn.Close(context.Background())
	q := "SELECT count(*) FILTER (WHERE role = 'user') - count(*) FILTER (WHERE role = 'assistant') FROM " +
		pgx.Identifier{s.name, "chatproxy_messages"}.Sanitize()
	for {
		var pending int64
		if err := conn.QueryRow(ctx, q).Scan(&pending); err != nil {
			return time.Since(start), err
		}
		if pending <= 0 {
			return time.Since(start), nil
		}
		select {
		case <-ctx.Done():
			return time.Since(start), fmt.Errorf("%d replies still unstored", pending)
		case <-time.After(50 * time.Millisecond):
		}
	}
}

// redisVersion checks that Redis answers and returns its version.
func redisVersion(ctx context.Context, rawURL string) (string, error) {
	opt, err := redis.ParseURL(rawURL)
	if err != nil {
		return "", err
	}
	opt.DialTimeout = 3 * time.Second
	rdb := redis.NewClient(opt)
	defer rdb.Close()
	ctx, cancel := context.WithTimeout(ctx, 5*time.Second)
	defer cancel()
	info, err := rdb.Info(ctx, "server").Result()
	if err != nil {
		return "", err
	}
	for line := range strings.SplitSeq(info, "\n") {
		if v, ok := strings.CutPrefix(strings.TrimSpace(line), "redis_version:"); ok {
			return v, nil
		}
	}
	return "?", nil
}

func randomHex(n int) string {
	b := make([]byte, n)
	_, _ = rand.Read(b)
	return hex.EncodeToString(b)
}

// freeAddr reserves a loopback port for a Caddy listener.
func freeAddr() (string, error) {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		return "", err
	}
	defer ln.Close()
	return ln.Addr().String(), nil
}

// Targets: the servers of the in-process Caddy.
const (
	targetRP     = "rp"     // reverse_proxy to the stand-in
	targetPG     = "pg"     // chat_proxy on PostgreSQL + Redis
	targetLite   = "lite"   // chat_proxy on the embedded store
	targetRPHold = "rphold" // reverse_proxy to the helper's holding stand-in
	targetPGHold = "chathold"
)

var targetNames = map[string]string{
	targetRP:   "reverse_proxy",
	targetPG:   "chat_proxy PG+Redis",
	targetLite: "chat_proxy embedded",
}

type caddySetup struct {
	proc        *caddyProc // the Caddy process
	standin     string     // in-process stand-in n8n
	holdStandin string     // the helper's holding stand-in; "" without streams
	pgURL       string     // "" when PostgreSQL is not used
	redisURL    string
	sqlitePath  string
	storageDir  string
	addrs       map[string]string // target → listen address
	chatHoldDB  string            // the database of the streams' chat_proxy
}

// chatProxy is a chat_proxy handler with limits that never bite and the
// bot filter off, so the benchmark measures the proxy, not its limits. The
// limit shapes (two windows for ip) are the defaults'; every one is still
// checked on every request.
func chatProxy(webhook, database, redisURL, jwtSecret, sessionSecret string) map[string]any {
	h := map[string]any{
		"handler":        "chat_proxy",
		"n8n_webhook":    webhook,
		"jwt_secret":     jwtSecret,
		"session_secret": sessionSecret,
		"database":       database,
		"rate_limits": map[string][]string{
			"ip":      {"1000000/1m", "1000000/1h"},
			"session": {"1000000/1m"},
			"domain":  {"1000000/1m"},
			"create":  {"1000000/1m"},
		},
		"block_after":         -1,
		"bot_detection":       "off",
		"stream_idle_timeout": "30m", // held streams stay open
		"max_stream_duration": "1h",
	}
	if redisURL != "" {
		h["redis"] = redisURL
	}
	return h
}

func reverseProxy(upstream string) map[string]any {
	return map[string]any{
		"handler":   "reverse_proxy",
		"upstreams": []map[string]any{{"dial": upstream}},
		// Flush every chunk at once, as chat_proxy does.
		"flush_interval": -1,
	}
}

// caddyJSON builds the config: one server per target, each on its own
// loopback port.
func (c *caddySetup) caddyJSON() ([]byte, error) {
	// Fresh secrets per run: the rate-limit keys in Redis are named by a
	// hash keyed with jwt_secret, so no two runs share budgets.
	jwtSecret, sessionSecret := "bench-jwt-"+randomHex(24), "bench-n8n-"+randomHex(24)
	handlers := map[string]map[string]any{
		targetRP:   reverseProxy(c.standin),
		targetLite: chatProxy("http://"+c.standin+"/webhook/chat", "sqlite:"+c.sqlitePath, "", jwtSecret, sessionSecret),
	}
	if c.pgURL != "" {
		handlers[targetPG] = chatProxy("http://"+c.standin+"/webhook/chat", c.pgURL, c.redisURL, jwtSecret, sessionSecret)
	}
	if c.holdStandin != "" {
		handlers[targetRPHold] = reverseProxy(c.holdStandin)
		redisURL := c.redisURL
		if c.chatHoldDB != c.pgURL {
			redisURL = ""
		}
		handlers[targetPGHold] = chatProxy("http://"+c.holdStandin+"/webhook/chat", c.chatHoldDB, redisURL, jwtSecret, sessionSecret)
	}
	c.addrs = map[string]string{}
	servers := map[string]any{}
	for name, h := range handlers {
		addr, err := freeAddr()
		if err != nil {
			return nil, err
		}
		c.addrs[name] = addr
		servers[name] = map[string]any{
			"listen":          []string{addr},
			"protocols":       []string{"h1"},
			"automatic_https": map[string]any{"disable": true},
			"routes":          []any{map[string]any{"handle": []any{h}}},
		}
	}
	cfg := map[string]any{
		"admin":   map[string]any{"disabled": true},
		"storage": map[string]any{"module": "file_system", "root": c.storageDir},
		"logging": map[string]any{"logs": map[string]any{"default": map[string]any{"level": "ERROR"}}},
		"apps": map[string]any{"http": map[string]any{
			"grace_period": "2s",
			"servers":      servers,
		}},
	}
	return json.Marshal(cfg)
}

func (c *caddySetup) start() error {
	cfg, err := c.caddyJSON()
	if err != nil {
		return err
	}
	if c.proc, err = startCaddyProc(cfg); err != nil {
		return err
	}
	cpuWatch.caddyPID = c.proc.pid
	return nil
}

func (c *caddySetup) stop() {
	if c.proc != nil {
		c.proc.stop()
	}
}
