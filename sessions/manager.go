package sessions

import (
	"context"
	"crypto/rand"
	"encoding/json"
	"errors"
	"fmt"
	"time"
)

// ErrSessionGone is wrapped when a valid token names a session that is
// missing, revoked or expired in the store.
var ErrSessionGone = errors.New("session not active")

// Manager creates and authenticates visitor sessions: a token is only good
// while its session exists, is not revoked and has not expired in the store.
type Manager struct {
	Store  Store
	Tokens *Tokens
	TTL    time.Duration
	Now    func() time.Time
}

// NewSession describes a session to create.
type NewSession struct {
	Kind        string // KindVisitor when empty
	ID          string // generated when empty
	Site        string
	PageURL     string
	UserAgent   string
	ClientIP    string
	Fingerprint string
	Metadata    json.RawMessage
	// User is the visitor the site proved (identity_secret); nil for an
	// anonymous session. Create sets its Realm to the tokens' audience.
	User *User
	// Origin is the exact Origin header of the request that creates the
	// session; its token is then good only with that Origin (or none).
	// Empty: the token is not bound to an origin.
	Origin string
}

func (m *Manager) now() time.Time {
	if m.Now != nil {
		return m.Now().UTC()
	}
	return time.Now().UTC()
}

// Create stores a new session and returns it with its signed token.
func (m *Manager) Create(ctx context.Context, n NewSession) (*Session, string, error) {
	s := m.newRow(n, m.now())
	token, err := m.Tokens.IssueFor(s, n.Origin)
	if err != nil {
		return nil, "", err
	}
	if err := m.Store.CreateSession(ctx, s); err != nil {
		return nil, "", err
	}
	return s, token, nil
}

// newRow is the session Create stores for n at now.
func (m *Manager) newRow(n NewSession, now time.Time) *Session {
	s := &Session{
		ID:          n.ID,
		Kind:        n.Kind,
		Site:        n.Site,
		PageURL:     n.PageURL,
		UserAgent:   n.UserAgent,
		ClientIP:    n.ClientIP,
		Fingerprint: n.Fingerprint,
		Metadata:    n.Metadata,
		User:        m.realmUser(n.User),
		CreatedAt:   now,
		LastSeenAt:  now,
		// Whole seconds: the token's exp claim has second precision and the
		// two must agree.
		ExpiresAt: now.Add(m.TTL).Truncate(time.Second),
	}
	if s.Kind == "" {
		s.Kind = KindVisitor
	}
	if s.ID == "" {
		// 128 random bits; URL- and path-safe.
		s.ID = rand.Text()
	}
	return s
}

// Resume continues the verified user's latest active conversation (see
// Store.ResumeUserSession): its expiry moves to a full TTL from now, the
// user's details are stored as n.User now proves them, and a new token
// for it is returned, bound to n.Origin and naming this device's
// fingerprint. ErrNotFound: the user has no active conversation.
func (m *Manager) Resume(ctx context.Context, n NewSession) (*Session, string, error) {
	if n.User == nil {
		return nil, "", errors.New("resuming a session: no user")
	}
	now := m.now()
	s, err := m.Store.ResumeUserSession(ctx, m.realmUser(n.User), now, now.Add(m.TTL).Truncate(time.Second))
	if err != nil {
		return nil, "", err
	}
	token, err := m.issueForDevice(s, n)
	if err != nil {
		return nil, "", err
	}
	return s, token, nil
}

// Adopt gives the anonymous session anon (active, loaded by the caller)
// to the verified user n.User: a new session of the user takes its
// messages, and anon is deleted, so its tokens stop working (see
// Store.AdoptSession). The conversation keeps anon's start time.
// ErrNotFound: anon is no longer an active anonymous session.
func (m *Manager) Adopt(ctx context.Context, anon *Session, n NewSession) (*Session, string, error) {
	if n.User == nil {
		return nil, "", errors.New("adopting a session: no user")
	}
	now := m.now()
	s := m.newRow(n, now)
	s.CreatedAt = anon.CreatedAt
	if s.Metadata == nil {
		s.Metadata = anon.Metadata
	}
	if s.PageURL == "" {
		s.PageURL = anon.PageURL
	}
	token, err := m.Tokens.IssueFor(s, n.Origin)
	if err != nil {
		return nil, "", err
	}
	if err := m.Store.AdoptSession(ctx, anon.ID, s, now); err != nil {
		return nil, "", err
	}
	return s, token, nil
}

// ResumeWidget continues the verified user's latest active @n8n/chat
// conversation on site (Store.ResumeUserWidget): its expiry moves to a
// full TTL from now and the user's details are stored as u now proves
// them. ErrNotFound: the user has none active there.
func (m *Manager) ResumeWidget(ctx context.Context, u *User, site string) (*Session, error) {
	if u == nil {
		return nil, errors.New("resuming a widget session: no user")
	}
	now := m.now()
	return m.Store.ResumeUserWidget(ctx, m.realmUser(u), site, now, now.Add(m.TTL).Truncate(time.Second))
}

// AdoptWidget gives the anonymous widget conversation anon (active,
// loaded by the caller) to the verified user n.User, as Adopt does a
// visitor session, under the id n.ID. No token is issued: the widget has
// none. ErrNotFound: anon is no longer an active anonymous conversation;
// ErrExists: n.ID is taken.
func (m *Manager) AdoptWidget(ctx context.Context, anon *Session, n NewSession) (*Session, error) {
	if n.User == nil || n.ID == "" {
		return nil, errors.New("adopting a widget session: no user or id")
	}
	n.Kind = KindWidget
	now := m.now()
	s := m.newRow(n, now)
	s.CreatedAt = anon.CreatedAt
	if s.Metadata == nil {
		s.Metadata = anon.Metadata
	}
	if err := m.Store.AdoptSession(ctx, anon.ID, s, now); err != nil {
		return nil, err
	}
	return s, nil
}

// issueForDevice signs a token for an existing session s on the device
// that n describes: bound to its Origin, with its fingerprint.
func (m *Manager) issueForDevice(s *Session, n NewSession) (string, error) {
	c := *s
	c.Fingerprint = n.Fingerprint
	return m.Tokens.IssueFor(&c, n.Origin)
}

// SignOut gives up the token (claims) of a verified user's session on
// this device only: the conversation, and the other devices' tokens,
// stay. An anonymous session is revoked with its messages (Revoke).
func (m *Manager) SignOut(ctx context.Context, s *Session, claims *Claims) error {
	if s.User == nil {
		return m.Revoke(ctx, s.ID)
	}
	if err := m.Store.RevokeToken(ctx, s.ID, claims.ID, m.now()); err != nil {
		return fmt.Errorf("revoking token: %w", err)
	}
	return nil
}

// realmUser is a copy of u in this manager's realm: the audience of its
// tokens, which names the chat_proxy blocks that drive one workflow.
func (m *Manager) realmUser(u *User) *User {
	if u == nil {
		return nil
	}
	c := *u
	c.Realm = m.Tokens.Audience()
	return &c
}

// Authenticate verifies the token and loads its session. Token problems
// wrap ErrInvalidToken and session state problems wrap ErrSessionGone; any
// other error is the store's.
func (m *Manager) Authenticate(ctx context.Context, token string) (*Session, *Claims, error) {
	claims, err := m.Tokens.Verify(token)
	if err != nil {
		return nil, nil, err
	}
	return m.load(ctx, claims)
}

// Load is Authenticate for claims the caller verified itself
// (Tokens.Verify), so that it can refuse the token for its claims before
// any store access.
func (m *Manager) Load(ctx context.Context, claims *Claims) (*Session, error) {
	s, _, err := m.load(ctx, claims)
	return s, err
}

// load reads the session a verified token names and checks it is active.
func (m *Manager) load(ctx context.Context, claims *Claims) (*Session, *Claims, error) {
	s, err := m.Store.GetSession(ctx, claims.Subject)
	if errors.Is(err, ErrNotFound) {
		return nil, nil, fmt.Errorf("%w: no such session", ErrSessionGone)
	}
	if err != nil {
		return nil, nil, fmt.Errorf("loading session: %w", err)
	}
	if s.Kind != KindVisitor {
		return nil, nil, fmt.Errorf("%w: not a visitor session", ErrSessionGone)
	}
	if s.RevokedAt != nil {
		return nil, nil, fmt.Errorf("%w: revoked", ErrSessionGone)
	}
	if !m.now().Before(s.ExpiresAt) {
		return nil, nil, fmt.Errorf("%w: expired", ErrSessionGone)
	}
	if s.User != nil {
		// A shared conversation: this device may have signed out.
		revoked, err := m.Store.TokenRevoked(ctx, s.ID, claims.ID)
		if err != nil {
			return nil, nil, fmt.Errorf("loading session: %w", err)
		}
		if revoked {
			return nil, nil, fmt.Errorf("%w: signed out on this device", ErrSessionGone)
		}
	}
	return s, claims, nil
}

// AuthenticateMessage is Authenticate for a request that appends a user
// message with Store.AppendUserMessage, which confirms in its own
// statement that the session is active. When the token names the
// session's site and the session is at least minAge old, the session is
// taken from the token without reading the store: ID, Kind, Site,
// CreatedAt (to the second) and ExpiresAt are set, PageURL is empty and
// MessageCount is -1 (unknown) until the append returns the stored row.
// Otherwise, or when the token is past its expiry or is a verified
// user's (Claims.Shared: it may have been given up alone), it is
// Authenticate.
// minAge lets a caller that needs the stored message count for young
// sessions (the bot filter's first-message check) have it.
func (m *Manager) AuthenticateMessage(ctx context.Context, token string, minAge time.Duration) (*Session, *Claims, error) {
	claims, err := m.Tokens.Verify(token)
	if err != nil {
		return nil, nil, err
	}
	s, err := m.MessageSession(ctx, claims, minAge)
	if err != nil {
		return nil, nil, err
	}
	return s, claims, nil
}

// MessageSession is AuthenticateMessage for claims the caller verified
// itself (Tokens.Verify), so that it can rate-limit the request by the
// claims before any store access.
func (m *Manager) MessageSession(ctx context.Context, claims *Claims, minAge time.Duration) (*Session, error) {
	now := m.now()
	created := claims.IssuedAt.Time
	if claims.Site == "" || claims.Shared || now.Sub(created) < minAge || !now.Before(claims.ExpiresAt.Time) {
		s, _, err := m.load(ctx, claims)
		return s, err
	}
	return &Session{
		ID:           claims.Subject,
		Kind:         KindVisitor, // only visitor sessions have tokens
		Site:         claims.Site,
		CreatedAt:    created.UTC(),
		ExpiresAt:    claims.ExpiresAt.UTC(),
		MessageCount: -1,
	}, nil
}

// Revoke ends the session and erases its messages.
func (m *Manager) Revoke(ctx context.Context, id string) error {
	if err := m.Store.RevokeSession(ctx, id, m.now()); err != nil {
		return fmt.Errorf("revoking session: %w", err)
	}
	return nil
}
