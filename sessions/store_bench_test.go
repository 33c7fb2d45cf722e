package sessions_test

import (
	"context"
	"crypto/rand"
	"path/filepath"
	"strconv"
	"sync/atomic"
	"testing"
	"time"

	"github.com/chatproxy/caddy-chatproxy/internal/testenv"
	"github.com/chatproxy/caddy-chatproxy/sessions"
)

var benchTokenKey = []byte("bench-visitor-jwt-secret-0123456789abcdef")

var (
	benchStoreKinds = []string{"sqlite", "postgres"}
	// Where many writers run at once, PostgreSQL also with a larger pool.
	benchConcurrentKinds = []string{"sqlite", "postgres", "postgres-pool32"}
)

func benchSession(id string) *sessions.Session {
	now := time.Now().UTC()
	return &sessions.Session{
		ID:          id,
		Site:        "shop.example.com",
		PageURL:     "https://shop.example.com/orders/4417",
		UserAgent:   "Mozilla/5.0 (X11; Linux x86_64) AppleWebKit/537.36 (KHTML, like Gecko) Chrome/131.0 Safari/537.36",
		ClientIP:    "203.0.113.7",
		Fingerprint: "3f9a1c7e5b2d4a60",
		Metadata:    []byte(`{"widget":"bench"}`),
		ExpiresAt:   now.Add(7 * 24 * time.Hour).Truncate(time.Second),
	}
}

// A visitor token: signed once per session creation, verified on every
// request.
func BenchmarkTokenIssue(b *testing.B) {
	tokens := sessions.NewTokens(benchTokenKey, nil)
	s := benchSession(rand.Text())
	b.ReportAllocs()
	for b.Loop() {
		if _, err := tokens.Issue(s); err != nil {
			b.Fatal(err)
		}
	}
}

func BenchmarkTokenVerify(b *testing.B) {
	tokens := sessions.NewTokens(benchTokenKey, nil)
	tok, err := tokens.Issue(benchSession(rand.Text()))
	if err != nil {
		b.Fatal(err)
	}
	b.ReportAllocs()
	for b.Loop() {
		if _, err := tokens.Verify(tok); err != nil {
			b.Fatal(err)
		}
	}
}

// benchStores opens each store kind on a fresh database: SQLite in a
// temporary directory, PostgreSQL in a schema of its own (skipped without
// a server, unless CI requires it), with pgxpool's default pool size
// (max(4, CPUs)) and, where concurrency matters, with 32 connections, so
// the effect of group commit on the ceiling shows.
func benchStores(b *testing.B, kinds []string, run func(b *testing.B, st sessions.Store)) {
	for _, kind := range kinds {
		b.Run(kind, func(b *testing.B) {
			var st sessions.Store
			var err error
			switch kind {
			case "sqlite":
				st, err = sessions.OpenSQLite(filepath.Join(b.TempDir(), "chatproxy.db"))
			case "postgres":
				st, err = sessions.OpenPostgres(testenv.PostgresURL(b))
			case "postgres-pool32":
				st, err = sessions.OpenPostgres(testenv.PostgresURL(b) + "&pool_max_conns=32")
			default:
				b.Fatalf("unknown store %q", kind)
			}
			if err != nil {
				b.Fatal(err)
			}
			b.Cleanup(func() { _ = st.Close() })
			if err := st.Ping(context.Background()); err != nil { // migrates
				b.Fatal(err)
			}
			run(b, st)
		})
	}
}

// AppendMessage is two committed writes per chat message (the visitor's
// message, then the reply). "serial" is one writer; "parallel" is many
// requests at once (8 per CPU), one session each, where the store's
// concurrency (pool size, group commit, SQLite's single writer) decides.
func BenchmarkAppendMessage(b *testing.B) {
	benchStores(b, benchConcurrentKinds, func(b *testing.B, st sessions.Store) {
		ctx := context.Background()
		content := "Hi! Can I change the delivery address of order #4417? I moved last week."
		b.Run("serial", func(b *testing.B) {
			s := benchSession(rand.Text())
			if err := st.CreateSession(ctx, s); err != nil {
				b.Fatal(err)
			}
			b.ReportAllocs()
			for b.Loop() {
				if err := st.AppendMessage(ctx, &sessions.Message{SessionID: s.ID, Role: sessions.RoleUser, Content: content}); err != nil {
					b.Fatal(err)
				}
			}
		})
		b.Run("parallel", func(b *testing.B) {
			const nSessions = 64
			ids := make([]string, nSessions)
			for i := range ids {
				s := benchSession(rand.Text())
				if err := st.CreateSession(ctx, s); err != nil {
					b.Fatal(err)
				}
				ids[i] = s.ID
			}
			var next atomic.Uint64
			b.ReportAllocs()
			b.SetParallelism(8)
			b.RunParallel(func(pb *testing.PB) {
				id := ids[next.Add(1)%nSessions]
				for pb.Next() {
					if err := st.AppendMessage(ctx, &sessions.Message{SessionID: id, Role: sessions.RoleUser, Content: content}); err != nil {
						b.Fatal(err)
					}
				}
			})
		})
	})
}

// CreateSession runs once per session creation (one committed write).
func BenchmarkCreateSession(b *testing.B) {
	benchStores(b, benchConcurrentKinds, func(b *testing.B, st sessions.Store) {
		ctx := context.Background()
		var n atomic.Uint64
		b.ReportAllocs()
		b.SetParallelism(8)
		b.RunParallel(func(pb *testing.PB) {
			for pb.Next() {
				s := benchSession("bench-" + strconv.FormatUint(n.Add(1), 10) + "-" + rand.Text())
				if err := st.CreateSession(ctx, s); err != nil {
					b.Fatal(err)
				}
			}
		})
	})
}

// GetSession runs on every authenticated request.
func BenchmarkGetSession(b *testing.B) {
	benchStores(b, benchStoreKinds, func(b *testing.B, st sessions.Store) {
		ctx := context.Background()
		s := benchSession(rand.Text())
		if err := st.CreateSession(ctx, s); err != nil {
			b.Fatal(err)
		}
		b.ReportAllocs()
		for b.Loop() {
			if _, err := st.GetSession(ctx, s.ID); err != nil {
				b.Fatal(err)
			}
		}
	})
}

// An exchange's two writes, as the chat routes make them: the @n8n/chat
// route's (AppendUserMessage, then AppendMessage with the reply) and the
// chat API's since replies are resumable (AppendExchange stores the
// message and the reply's streaming row in one statement, FinishReply
// fills the reply in). Both are two commits; "parallel" is 8 exchanges
// per CPU at once on 64 sessions, where group commit batches them.
func BenchmarkExchangeWrites(b *testing.B) {
	benchStores(b, benchStoreKinds, func(b *testing.B, st sessions.Store) {
		ctx := context.Background()
		question := "Hi! Can I change the delivery address of order #4417? I moved last week."
		answer := "Yes: open the order, choose Change address, and enter the new one before it ships."
		paths := []struct {
			name string
			run  func(id string) error
		}{
			{"insert-reply", func(id string) error {
				if _, err := st.AppendUserMessage(ctx, &sessions.Message{SessionID: id, Content: question}, sessions.KindVisitor); err != nil {
					return err
				}
				return st.AppendMessage(ctx, &sessions.Message{SessionID: id, Role: sessions.RoleAssistant, Content: answer})
			}},
			{"streaming-row", func(id string) error {
				reply := &sessions.Message{}
				if _, err := st.AppendExchange(ctx, &sessions.Message{SessionID: id, Content: question}, reply, sessions.KindVisitor); err != nil {
					return err
				}
				return st.FinishReply(ctx, &sessions.Message{ID: reply.ID, SessionID: id, Content: answer, Status: sessions.StatusComplete,
					Metadata: []byte(`{"stream":{"items":[4,12,20,19,28]}}`)})
			}},
		}
		for _, p := range paths {
			b.Run(p.name+"/serial", func(b *testing.B) {
				s := benchSession(rand.Text())
				if err := st.CreateSession(ctx, s); err != nil {
					b.Fatal(err)
				}
				b.ReportAllocs()
				for b.Loop() {
					if err := p.run(s.ID); err != nil {
						b.Fatal(err)
					}
				}
			})
			b.Run(p.name+"/parallel", func(b *testing.B) {
				const nSessions = 64
				ids := make([]string, nSessions)
				for i := range ids {
					s := benchSession(rand.Text())
					if err := st.CreateSession(ctx, s); err != nil {
						b.Fatal(err)
					}
					ids[i] = s.ID
				}
				var next atomic.Uint64
				b.ReportAllocs()
				b.SetParallelism(8)
				b.RunParallel(func(pb *testing.PB) {
					id := ids[next.Add(1)%nSessions]
					for pb.Next() {
						if err := p.run(id); err != nil {
							b.Fatal(err)
						}
					}
				})
			})
		}
	})
}
