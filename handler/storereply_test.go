package handler

import (
	"context"
	"fmt"
	"net/http/httptest"
	"sync/atomic"
	"testing"
	"time"

	"go.uber.org/zap"
	"go.uber.org/zap/zaptest/observer"

	"github.com/chatproxy/caddy-chatproxy/sessions"
)

// refusingStore refuses every assistant reply as data the store cannot
// hold, the way PostgreSQL's class-22 errors come back (ErrInvalidData).
type refusingStore struct {
	sessions.Store
	appends atomic.Int32
}

func (s *refusingStore) AppendMessage(ctx context.Context, m *sessions.Message) error {
	s.appends.Add(1)
	return fmt.Errorf("storing message: %w", sessions.ErrInvalidData)
}

// TestStoreReplyDataErrorIsNotRetried: a reply the store refuses for its
// data fails the same way every time, so it is tried once and logged once,
// instead of being retried until ReplyStoreTimeout while the response waits.
func TestStoreReplyDataErrorIsNotRetried(t *testing.T) {
	store := &refusingStore{Store: openStore(t, "sqlite")}
	core, logs := observer.New(zap.ErrorLevel)
	h := New(Config{Store: store, Logger: zap.New(core), ReplyStoreTimeout: 3 * time.Second,
		Sessions: &sessions.Manager{Store: store}})
	ex := &exchange{session: &sessions.Session{ID: "s1"}, assistantID: "m1"}
	start := time.Now()
	h.storeReply(httptest.NewRequest("POST", "/api/v1/chat/message", nil), ex, "reply", sessions.StatusComplete)
	if took := time.Since(start); took > time.Second {
		t.Fatalf("storeReply took %s: a data error was retried", took)
	}
	if n := store.appends.Load(); n != 1 {
		t.Fatalf("AppendMessage called %d times, want 1", n)
	}
	if n := logs.FilterMessage("storing assistant reply").Len(); n != 1 {
		t.Fatalf("%d error logs, want 1", n)
	}
}
