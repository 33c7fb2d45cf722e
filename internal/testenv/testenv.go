// Package testenv gives tests the external services they talk to
// (PostgreSQL, Redis), skipping when a service is absent on a developer's
// machine and failing when it is absent where it is required (CI).
package testenv

import (
	"bufio"
	"context"
	"crypto/rand"
	"crypto/tls"
	"encoding/hex"
	"fmt"
	"net"
	"net/url"
	"os"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/jackc/pgx/v5"
)

// Environment variables that point tests at services.
const (
	EnvDatabaseURL = "CHATPROXY_TEST_DATABASE_URL"
	EnvRedisURL    = "CHATPROXY_TEST_REDIS_URL"

	DefaultDatabaseURL = "postgres://postgres@127.0.0.1:5432/test?sslmode=disable"
	DefaultRedisURL    = "redis://127.0.0.1:6379/0"
)

// dialTimeout bounds the reachability checks: an absent service should
// skip quickly, not stall every package's tests.
const dialTimeout = 3 * time.Second

// RequireServices reports whether missing services are a failure rather
// than a reason to skip: in CI, or when a developer asks for it.
func RequireServices() bool {
	return os.Getenv("CI") != "" || os.Getenv("CHATPROXY_REQUIRE_SERVICES") != ""
}

// PostgresURL returns a connection URL for a fresh, empty schema of its own
// (dropped when the test ends), so packages and tests running in parallel
// never see each other's tables. The schema is selected by the URL's
// options parameter (`-c search_path=...`), which pgx, pgxpool, pgx's
// database/sql driver and psql all honour.
func PostgresURL(t testing.TB) string {
	t.Helper()
	base := envOr(EnvDatabaseURL, DefaultDatabaseURL)
	ctx, cancel := context.WithTimeout(context.Background(), dialTimeout)
	defer cancel()
	conn, err := pgx.Connect(ctx, base)
	if err != nil {
		unavailable(t, "PostgreSQL", EnvDatabaseURL, err)
	}
	defer conn.Close(context.Background())

	schema := "test_" + randomHex(8)
	ident := pgx.Identifier{schema}.Sanitize()
	if _, err := conn.Exec(ctx, "CREATE SCHEMA "+ident); err != nil {
		t.Fatalf("testenv: creating schema: %v", err)
	}
	t.Cleanup(func() {
		ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
		defer cancel()
		conn, err := pgx.Connect(ctx, base)
		if err != nil {
			t.Logf("testenv: dropping schema %s: %v", schema, err)
			return
		}
		defer conn.Close(context.Background())
		if _, err := conn.Exec(ctx, "DROP SCHEMA "+ident+" CASCADE"); err != nil {
			t.Logf("testenv: dropping schema %s: %v", schema, err)
		}
	})

	u, err := withSearchPath(base, schema)
	if err != nil {
		t.Fatalf("testenv: %v", err)
	}
	return u
}

// withSearchPath adds `-c search_path=schema` to the connection string's
// options, keeping any options already there.
func withSearchPath(connString, schema string) (string, error) {
	opt := "-c search_path=" + schema
	if strings.HasPrefix(connString, "postgres://") || strings.HasPrefix(connString, "postgresql://") {
		u, err := url.Parse(connString)
		if err != nil {
			return "", fmt.Errorf("parsing %s: %v", EnvDatabaseURL, redactedURLError(err))
		}
		q := u.Query()
		if old := q.Get("options"); old != "" {
			opt = old + " " + opt
		}
		q.Set("options", opt)
		// libpq does not decode '+' as a space; %20 works everywhere. Encode
		// escapes a literal '+' as %2B, so every '+' left is a space.
		u.RawQuery = strings.ReplaceAll(q.Encode(), "+", "%20")
		return u.String(), nil
	}
	// Keyword/value form. A second options keyword would replace the first,
	// so this form cannot also carry options of its own.
	if strings.Contains(connString, "options=") {
		return "", fmt.Errorf("%s: use the URL form to combine options with the test schema", EnvDatabaseURL)
	}
	return connString + " options='" + opt + "'", nil
}

// redactedURLError drops the URL (and so any password in it) from a
// url.Parse error.
func redactedURLError(err error) error {
	if ue, ok := err.(*url.Error); ok {
		return ue.Err
	}
	return err
}

// RedisURL returns the Redis URL for tests after checking with a PING that
// the server answers. Redis has no cheap namespaces, so isolation is the
// caller's: prefix keys with something unique to the test.
func RedisURL(t testing.TB) string {
	t.Helper()
	raw := envOr(EnvRedisURL, DefaultRedisURL)
	if err := pingRedis(raw); err != nil {
		unavailable(t, "Redis", EnvRedisURL, err)
	}
	return raw
}

func pingRedis(raw string) error {
	u, err := url.Parse(raw)
	if err != nil {
		return redactedURLError(err)
	}
	host := u.Host
	if u.Port() == "" {
		host = net.JoinHostPort(u.Hostname(), "6379")
	}
	d := &net.Dialer{Timeout: dialTimeout}
	var conn net.Conn
	switch u.Scheme {
	case "redis":
		conn, err = d.Dial("tcp", host)
	case "rediss":
		conn, err = tls.DialWithDialer(d, "tcp", host, &tls.Config{ServerName: u.Hostname()})
	default:
		return fmt.Errorf("unsupported scheme %q (want redis or rediss)", u.Scheme)
	}
	if err != nil {
		return err
	}
	defer conn.Close()
	if err := conn.SetDeadline(time.Now().Add(dialTimeout)); err != nil {
		return err
	}
	r := bufio.NewReader(conn)
	if pw, ok := u.User.Password(); ok {
		args := []string{"AUTH", pw}
		if name := u.User.Username(); name != "" {
			args = []string{"AUTH", name, pw}
		}
		if err := redisCommand(conn, r, "+OK", args...); err != nil {
			return fmt.Errorf("AUTH: %w", err)
		}
	}
	return redisCommand(conn, r, "+PONG", "PING")
}

// redisCommand sends one RESP command and checks the one-line reply.
func redisCommand(conn net.Conn, r *bufio.Reader, want string, args ...string) error {
	var b strings.Builder
	b.WriteString("*" + strconv.Itoa(len(args)) + "\r\n")
	for _, a := range args {
		b.WriteString("$" + strconv.Itoa(len(a)) + "\r\n" + a + "\r\n")
	}
	if _, err := conn.Write([]byte(b.String())); err != nil {
		return err
	}
	line, err := r.ReadString('\n')
	if err != nil {
		return err
	}
	line = strings.TrimRight(line, "\r\n")
	if line != want {
		return fmt.Errorf("unexpected reply %q", line)
	}
	return nil
}

func unavailable(t testing.TB, what, env string, err error) {
	t.Helper()
	msg := fmt.Sprintf("%s not available (set %s): %v", what, env, err)
	if RequireServices() {
		t.Fatal(msg)
	}
	t.Skip(msg)
}

func envOr(key, def string) string {
	if v := os.Getenv(key); v != "" {
		return v
	}
	return def
}

func randomHex(n int) string {
	b := make([]byte, n)
	_, _ = rand.Read(b) // crypto/rand.Read never fails (Go 1.24+)
	return hex.EncodeToString(b)
}
