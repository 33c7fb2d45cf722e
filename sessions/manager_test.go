package sessions_test

import (
	"context"
	"errors"
	"path/filepath"
	"sync/atomic"
	"testing"
	"time"

	"github.com/chatproxy/caddy-chatproxy/sessions"
)

// countingStore counts session reads.
type countingStore struct {
	sessions.Store
	reads atomic.Int64
}

func (c *countingStore) GetSession(ctx context.Context, id string) (*sessions.Session, error) {
	c.reads.Add(1)
	return c.Store.GetSession(ctx, id)
}

func TestAuthenticateMessage(t *testing.T) {
	ctx := context.Background()
	lite, err := sessions.OpenSQLite(filepath.Join(t.TempDir(), "chatproxy.db"))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = lite.Close() })
	store := &countingStore{Store: lite}
	now := time.Now().UTC()
	key := []byte("manager-test-visitor-secret-0123456789abcdef")
	hourAgo := sessions.NewTokens(key, func() time.Time { return now.Add(-time.Hour) })
	m := &sessions.Manager{Store: store, Tokens: sessions.NewTokens(key, nil), TTL: 24 * time.Hour}

	stored := func(id string, mutate func(*sessions.Session)) *sessions.Session {
		s := &sessions.Session{ID: id, Site: "shop.example", PageURL: "https://shop.example/",
			CreatedAt: now.Add(-time.Hour), ExpiresAt: now.Add(time.Hour).Truncate(time.Second)}
		if mutate != nil {
			mutate(s)
		}
		if err := store.CreateSession(ctx, s); err != nil {
			t.Fatal(err)
		}
		return s
	}
	issue := func(tokens *sessions.Tokens, s *sessions.Session) string {
		tok, err := tokens.Issue(s)
		if err != nil {
			t.Fatal(err)
		}
		return tok
	}
	active := stored("ACTIVE", nil)
	revoked := stored("REVOKED", nil)
	if err := store.RevokeSession(ctx, revoked.ID, now); err != nil {
		t.Fatal(err)
	}
	noSite := *active
	noSite.Site = ""
	// Past its expiry but within the verifier's clock-skew leeway.
	justExpired := stored("JUSTEXPIRED", func(s *sessions.Session) { s.ExpiresAt = now.Add(-time.Second).Truncate(time.Second) })

	for _, tc := range []struct {
		name      string
		token     string
		minAge    time.Duration
		wantRead  bool
		wantErr   error
		wantCount int // MessageCount returned: -1 when taken from the token
	}{
		{"old token with site: no read", issue(hourAgo, active), time.Minute, false, nil, -1},
		{"revoked, not read: the insert refuses it", issue(hourAgo, revoked), time.Minute, false, nil, -1},
		{"younger than minAge: read", issue(hourAgo, active), 2 * time.Hour, true, nil, 0},
		{"revoked and young: read and refused", issue(m.Tokens, revoked), time.Minute, true, sessions.ErrSessionGone, 0},
		{"token without site: read", issue(hourAgo, &noSite), time.Minute, true, nil, 0},
		{"past expiry within leeway: read and refused", issue(hourAgo, justExpired), time.Minute, true, sessions.ErrSessionGone, 0},
		{"bad token: nothing read", "not.a.token", time.Minute, false, sessions.ErrInvalidToken, 0},
	} {
		t.Run(tc.name, func(t *testing.T) {
			before := store.reads.Load()
			s, claims, err := m.AuthenticateMessage(ctx, tc.token, tc.minAge)
			if read := store.reads.Load() > before; read != tc.wantRead {
				t.Errorf("store read = %v, want %v", read, tc.wantRead)
			}
			if tc.wantErr != nil {
				if !errors.Is(err, tc.wantErr) {
					t.Fatalf("err = %v, want %v", err, tc.wantErr)
				}
				return
			}
			if err != nil {
				t.Fatal(err)
			}
			if s.ID != claims.Subject || s.Site != "shop.example" && tc.name != "token without site: read" ||
				s.Kind != sessions.KindVisitor || s.MessageCount != tc.wantCount || !s.ExpiresAt.Equal(active.ExpiresAt) {
				t.Errorf("session = %+v", s)
			}
		})
	}
}
