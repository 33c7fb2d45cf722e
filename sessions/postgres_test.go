package sessions_test

import (
	"context"
	"errors"
	"net/url"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/chatproxy/caddy-chatproxy/internal/testenv"
	"github.com/chatproxy/caddy-chatproxy/migrations"
	"github.com/chatproxy/caddy-chatproxy/sessions"
	"github.com/chatproxy/caddy-chatproxy/sessions/storetest"
)

func openPostgres(t *testing.T, url string) *sessions.PostgresStore {
	t.Helper()
	st, err := sessions.OpenPostgres(url)
	if err != nil {
		t.Fatalf("OpenPostgres: %v", err)
	}
	t.Cleanup(func() {
		if err := st.Close(); err != nil {
			t.Errorf("Close: %v", err)
		}
	})
	return st
}

func TestPostgresStore(t *testing.T) {
	testenv.PostgresURL(t) // skip the whole suite at once when there is no server
	storetest.Run(t, func(t *testing.T) sessions.Store {
		return openPostgres(t, testenv.PostgresURL(t))
	})
}

// Several Caddy instances (separate pools) starting on one empty schema at
// once: all succeed, and the schema is migrated exactly once.
func TestPostgresConcurrentMigration(t *testing.T) {
	u := testenv.PostgresURL(t)
	const n = 4
	stores := make([]*sessions.PostgresStore, n)
	for i := range stores {
		stores[i] = openPostgres(t, u)
	}
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	var wg sync.WaitGroup
	errs := make([]error, n)
	for i, st := range stores {
		wg.Go(func() { errs[i] = st.Ping(ctx) })
	}
	wg.Wait()
	for i, err := range errs {
		if err != nil {
			t.Errorf("store %d: %v", i, err)
		}
	}
	for i, st := range stores {
		stats, err := st.Stats(ctx)
		if err != nil {
			t.Fatal(err)
		}
		if want := migrations.Latest(migrations.Postgres); stats.SchemaVersion != want {
			t.Errorf("store %d: SchemaVersion = %d, want %d", i, stats.SchemaVersion, want)
		}
	}
	var applied int64
	err := stores[0].Pool().QueryRow(ctx,
		"SELECT count(*) FROM "+migrations.TableName+" WHERE version_id > 0").Scan(&applied)
	if err != nil {
		t.Fatal(err)
	}
	// Versions, not Latest: numbers are assigned per issue, so the
	// embedded ones may have gaps.
	if want := int64(len(migrations.Versions(migrations.Postgres))); applied != want {
		t.Errorf("%d migrations recorded, want each applied once (%d)", applied, want)
	}
}

// Provision calls OpenPostgres, and `caddy validate` must work without a
// database: no connection may be attempted until a method is called.
func TestOpenPostgresDoesNoIO(t *testing.T) {
	start := time.Now()
	st := openPostgres(t, "postgres://u:pw@192.0.2.1:5432/db?connect_timeout=30")
	if d := time.Since(start); d > time.Second {
		t.Errorf("OpenPostgres took %v", d)
	}
	if st.Pool() == nil {
		t.Fatal("Pool() is nil")
	}
	if got := st.Pool().Stat().TotalConns(); got != 0 {
		t.Errorf("%d connections opened", got)
	}
}

func TestPostgresErrorsHideThePassword(t *testing.T) {
	const pw = "Sup3r-Secret_pw"
	real := testenv.PostgresURL(t)

	// The reachable server (trust auth ignores the password) with a
	// search_path that does not exist, so migrating fails there.
	u, err := url.Parse(real)
	if err != nil {
		t.Fatal(err)
	}
	u.User = url.UserPassword("postgres", pw)
	q := u.Query()
	q.Set("options", "-c search_path=no_such_schema_here")
	u.RawQuery = q.Encode()

	for _, conn := range []string{
		"postgres://postgres:" + pw + "@127.0.0.1:1/test?sslmode=disable&connect_timeout=2",
		"postgres://postgres@127.0.0.1:1/test?sslmode=disable&connect_timeout=2&password=" + pw,
		"host=127.0.0.1 port=1 user=postgres password=" + pw + " dbname=test sslmode=disable connect_timeout=2",
		"host=127.0.0.1 port=1 user=postgres password='" + pw + "' dbname=test connect_timeout=2",
		u.String(),
	} {
		st := openPostgres(t, conn)
		ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
		err := st.Ping(ctx)
		if err == nil {
			t.Errorf("Ping: want an error")
		} else if strings.Contains(err.Error(), pw) {
			t.Errorf("error shows the password: %v", err)
		}
		if _, err := st.GetSession(ctx, "x"); err == nil || strings.Contains(err.Error(), pw) {
			t.Errorf("GetSession: err = %v; want an error without the password", err)
		}
		cancel()
	}

	for _, bad := range []string{
		"postgres://postgres:" + pw + "@127.0.0.1:notaport/test",
		"postgres://postgres:" + pw + "@[::1/test",
		"postgres://postgres:" + pw + "@127.0.0.1/test?pool_max_conns=zero",
		"host=127.0.0.1 password=" + pw + " port=x",
	} {
		_, err := sessions.OpenPostgres(bad)
		if err == nil {
			t.Errorf("OpenPostgres(malformed): want an error")
		} else if strings.Contains(err.Error(), pw) {
			t.Errorf("OpenPostgres error shows the password: %v", err)
		}
	}
}

func TestPostgresPoolSize(t *testing.T) {
	for _, tc := range []struct {
		conn string
		want int32
	}{
		{"postgres://postgres@127.0.0.1/test", sessions.DefaultPoolMaxConns},
		{"postgres://postgres@127.0.0.1/test?sslmode=disable&pool_max_conns=5", 5},
		{"host=127.0.0.1 user=postgres pool_max_conns=40", 40},
		{"host=127.0.0.1 user=postgres", sessions.DefaultPoolMaxConns},
	} {
		st, err := sessions.OpenPostgres(tc.conn)
		if err != nil {
			t.Fatalf("OpenPostgres(%q): %v", tc.conn, err)
		}
		if got := st.Pool().Config().MaxConns; got != tc.want {
			t.Errorf("OpenPostgres(%q): pool size %d, want %d", tc.conn, got, tc.want)
		}
		_ = st.Close()
	}
}

// Whatever data exception PostgreSQL still raises (SQLSTATE class 22) is
// ErrInvalidData, not a fault worth retrying: here a session kind with a
// NUL, which no cleaning covers since the kind is the caller's own.
func TestPostgresDataExceptionIsInvalidData(t *testing.T) {
	st := openPostgres(t, testenv.PostgresURL(t))
	ctx := t.Context()
	s := &sessions.Session{ID: "s", Site: "example.com", ExpiresAt: time.Now().Add(time.Hour)}
	if err := st.CreateSession(ctx, s); err != nil {
		t.Fatal(err)
	}
	_, err := st.AppendUserMessage(ctx, &sessions.Message{SessionID: "s", Content: "x"}, "visitor\x00")
	if !errors.Is(err, sessions.ErrInvalidData) || !strings.Contains(err.Error(), "SQLSTATE 22021") {
		t.Fatalf("err = %v, want ErrInvalidData wrapping SQLSTATE 22021", err)
	}
}
