// Package sessions holds the visitor session model, the tokens that prove a
// session, and the Store that keeps sessions and their conversation.
package sessions

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"math"
	"strconv"
	"strings"
	"sync/atomic"
	"time"
	"unicode/utf8"

	"github.com/google/uuid"

	"github.com/chatproxy/caddy-chatproxy/internal/cleantext"
)

// Errors a Store returns. Callers compare with errors.Is.
var (
	// ErrNotFound means no session (or message) has the given id.
	ErrNotFound = errors.New("not found")
	// ErrExists means a session with that id is already stored.
	ErrExists = errors.New("already exists")
	// ErrBusy means another instance holds the purge lock: Purge skipped
	// its work rather than wait, since that instance is doing it.
	ErrBusy = errors.New("another instance is purging")
	// ErrInvalidData means the store cannot hold the data as given: a
	// metadata document that is not JSON or has a number beyond what both
	// stores keep, an id that is not valid text, or what PostgreSQL reports
	// as a data exception (SQLSTATE class 22). The same call fails the same
	// way every time, so it is never a store outage.
	ErrInvalidData = errors.New("invalid data")
)

// PurgeBatch is how many rows one purge transaction deletes at most (old
// messages, or expired sessions with their messages); a large backlog is
// removed in several short transactions so chat writes never wait long.
const PurgeBatch = 10000

// purgeBatch is PurgeBatch, smaller in tests so they cover several batches.
var purgeBatch = PurgeBatch

// userDeleteBatch is how many sessions one DeleteUser transaction deletes
// at most (with their messages); smaller in tests.
var userDeleteBatch = 500

// Kinds of session. Visitor sessions are created through the session API;
// widget sessions are named by the @n8n/chat widget and scoped to a site.
// They are separate namespaces so one can never read the other's history.
const (
	KindVisitor = "visitor"
	KindWidget  = "widget"
)

// Roles of a message.
// RoleAgent is a message a person (a human agent, through a signed
// push) added to the conversation.
const (
	RoleUser      = "user"
	RoleAssistant = "assistant"
	RoleAgent     = "agent"
)

// Modes of a session: who answers the visitor. In ModeBot (the default)
// messages go to n8n; in ModeHuman they are stored and handed to a
// person (the handoff webhook) instead.
const (
	ModeBot   = "bot"
	ModeHuman = "human"
)

// Statuses of a message. User messages are always complete; an assistant
// reply is partial when the client left or the stream was cut (or it was
// stopped), and error when the upstream failed before producing a usable
// reply. A reply still being produced is streaming: its row is stored when
// the exchange begins (AppendExchange) and finished by FinishReply.
const (
	StatusComplete  = "complete"
	StatusPartial   = "partial"
	StatusError     = "error"
	StatusStreaming = "streaming"
)

// Session is one visitor conversation.
type Session struct {
	ID           string
	Kind         string
	Site         string // host of the Origin the session was created from
	PageURL      string
	UserAgent    string
	ClientIP     string
	Fingerprint  string
	Metadata     json.RawMessage // a JSON object, or nil
	CreatedAt    time.Time
	LastSeenAt   time.Time
	ExpiresAt    time.Time
	RevokedAt    *time.Time
	MessageCount int
	// Mode is ModeBot or ModeHuman; new sessions start in ModeBot.
	Mode string
	// User is the visitor the site proved with identity_secret; nil for an
	// anonymous session.
	User *User
}

// User is a visitor the site proved with identity_secret.
type User struct {
	ID         string
	Name       string
	Email      string
	Attributes json.RawMessage // a JSON object, or nil
	// Realm is the namespace ID belongs to: the chat_proxy block (its
	// token audience) whose identity_secret proved it, so that two sites
	// sharing a database never mix their users. The Manager sets it;
	// the store keeps it with the user and finds users by realm and ID.
	Realm string
}

// PreviewLength is how many characters of a conversation's first user
// message ListUserSessions returns as its preview.
const PreviewLength = 100

// Conversation is one of a user's sessions as ListUserSessions lists it.
type Conversation struct {
	ID            string
	CreatedAt     time.Time
	LastSeenAt    time.Time
	ExpiresAt     time.Time
	LastMessageAt time.Time // zero when it has no messages
	MessageCount  int
	// Preview is the start of its first user message (PreviewLength
	// characters at most), "" when there is none.
	Preview string
}

// ConversationPage is a window of a user's conversations, newest first.
type ConversationPage struct {
	Conversations []Conversation
	HasMore       bool // older conversations exist after the last one returned
}

// Active reports whether the session may be used at now.
func (s *Session) Active(now time.Time) bool {
	return s.RevokedAt == nil && now.Before(s.ExpiresAt)
}

// Message is one side of an exchange.
type Message struct {
	ID        string // time-ordered UUID (v7), also the public id
	SessionID string
	Role      string
	Content   string
	Status    string
	Metadata  json.RawMessage // a JSON object, or nil
	CreatedAt time.Time
}

// Page is a window of a session's messages, oldest first.
type Page struct {
	Messages   []Message
	TotalCount int
	HasMore    bool // older messages exist before the first one returned
}

// Stats summarises a store: schema version and row counts. Like every
// Store method, reading it migrates a database first; the stores' Status
// method is the read-only report for `caddy chatproxy status`.
type Stats struct {
	SchemaVersion int64
	Sessions      int64
	Messages      int64
}

// Status is what `caddy chatproxy status` reports. It is read without
// migrating or creating anything, so it can be taken before a backup.
type Status struct {
	// SchemaVersion is the applied schema version: 0 when the database was
	// never migrated (or, for the embedded store, the file does not exist).
	SchemaVersion int64
	// Pending lists the versions `caddy chatproxy migrate` would apply,
	// oldest first.
	Pending []int64
	// Sessions and Messages count the stored rows (0 when not migrated).
	Sessions, Messages int64
}

// Store keeps sessions and messages. Every method takes the request's
// context; implementations are safe for concurrent use.
//
// Text from outside (message content, user agent, page URL, site,
// fingerprint, client IP, and the strings of metadata) is stored cleaned
// with cleantext.String: invalid UTF-8 becomes U+FFFD and NUL is removed,
// the same on every store, so a reply PostgreSQL could not hold as sent is
// stored rather than refused. The caller's struct is updated to what was
// stored.
//
// An error that wraps ErrInvalidData is permanent: callers must not retry
// it (nor count it as the store being down) and should answer 400, since
// the request's data is what the store refused.
type Store interface {
	// CreateSession stores a new session. It returns ErrExists if the id is
	// taken. ID and ExpiresAt are required; an empty Kind becomes
	// KindVisitor, a zero CreatedAt now and a zero LastSeenAt CreatedAt.
	// Times are stored in UTC to the microsecond and s is updated to match.
	CreateSession(ctx context.Context, s *Session) error
	// GetSession returns the session with the given id, revoked and expired
	// ones included (the caller decides), or ErrNotFound.
	GetSession(ctx context.Context, id string) (*Session, error)
	// TouchSession records activity on a session: last_seen_at moves
	// forward to at, never back. A non-zero expiresAt later than the stored
	// expiry extends a session that is not revoked (widget sessions slide
	// while their visitor is active). It returns ErrNotFound if there is no
	// such session.
	TouchSession(ctx context.Context, id string, at, expiresAt time.Time) error
	// DeleteSession removes the session and its messages outright. It
	// returns ErrNotFound if there is no such session.
	DeleteSession(ctx context.Context, id string) error
	// RevokeSession marks the session revoked at the given time and deletes
	// its messages in the same transaction (message_count becomes 0).
	// Revoking again keeps the first time. It returns ErrNotFound if there
	// is no such session.
	RevokeSession(ctx context.Context, id string, at time.Time) error
	// AppendMessage stores a message and increments the session's
	// message_count in one transaction. An empty ID or zero CreatedAt is
	// filled in (with a UUIDv7 and now), as is an empty Status (complete),
	// and m is updated to match what was stored. It returns ErrNotFound if
	// the session does not exist or is revoked, so that a reply finishing
	// after the visitor deleted the session is not kept; ErrExists if a
	// message with that ID exists.
	AppendMessage(ctx context.Context, m *Message) error
	// AppendUserMessage stores a visitor's message like AppendMessage
	// (Role is set to RoleUser), but only to a session of the given kind
	// that is active at the message's time: not revoked and not expired.
	// It returns the session as stored after the append, MessageCount
	// including m, so a chat message needs one statement where a session
	// read and an append took two. ErrNotFound means there is no active
	// session of that id and kind; ErrExists that a message with that ID
	// exists.
	AppendUserMessage(ctx context.Context, m *Message, kind string) (*Session, error)
	// AppendExchange is AppendUserMessage that also stores reply, the
	// assistant's reply to m, in the same transaction and after m: Role
	// and Status are set to RoleAssistant and StatusStreaming, its content
	// is empty, its id and time are filled in like m's. Both rows count
	// in message_count, but the returned session's MessageCount counts m
	// and not the reply (what the workflow is told). FinishReply stores
	// the reply once it has ended. A session in ModeHuman gets no reply
	// row (a person answers, not n8n): only m is stored and counted.
	AppendExchange(ctx context.Context, m, reply *Message, kind string) (*Session, error)
	// FinishReply stores the content, status (complete, partial or error)
	// and metadata of a reply AppendExchange stored as streaming. m.ID
	// names it wherever it is now (message ids are unique, and a reply's
	// is the proxy's own): a conversation adopted by a user while its reply
	// streamed (AdoptSession) has moved to another session, and the reply
	// is finished there. m.SessionID is the session it was started in.
	// ErrNotFound means there is no such streaming reply (it was finished
	// already, or its session was deleted).
	FinishReply(ctx context.Context, m *Message) error
	// GetMessage returns the message id of the session sessionID, or
	// ErrNotFound (also for another session's message).
	GetMessage(ctx context.Context, sessionID, id string) (*Message, error)
	// ListMessages returns up to limit messages of the session, oldest
	// first: the newest ones, or with before set, the newest ones older
	// than the message with that id (ErrNotFound if it is not in the session).
	// TotalCount counts all the session's messages. A session that does not
	// exist has no messages: the caller is expected to have loaded it.
	ListMessages(ctx context.Context, sessionID, before string, limit int) (*Page, error)
	// ListMessagesAfter returns up to limit messages of the session that
	// were stored after the message with id after, oldest first; after
	// must name a message of the session (ErrNotFound otherwise).
	ListMessagesAfter(ctx context.Context, sessionID, after string, limit int) ([]Message, error)
	// SetSessionMode sets the session's mode (ModeBot or ModeHuman). It
	// returns ErrNotFound if there is no such session or it is revoked.
	SetSessionMode(ctx context.Context, id, mode string) error
	// ListMessagesWithin is ListMessages with a byte budget as well: the
	// page holds the newest of those messages whose contents together fit
	// in maxBytes, and always at least one (a message bigger than the
	// budget comes alone); HasMore then reports the messages left out,
	// which a request with before set to the page's first id reaches.
	// Messages the budget leaves out are not read. maxBytes <= 0: no budget.
	ListMessagesWithin(ctx context.Context, sessionID, before string, limit, maxBytes int) (*Page, error)
	// Purge deletes sessions that expired before expiredBefore (with their
	// messages) and messages created before messagesBefore. It reports how
	// many of each it removed; the messages count includes those of the
	// purged sessions. message_count of the sessions that stay is reduced by
	// the messages they lost, so it keeps counting the stored history.
	//
	// The work is done in transactions of at most PurgeBatch rows each.
	// Only one instance purges a database at a time: on PostgreSQL each
	// transaction takes a transaction-scoped advisory lock (per schema)
	// without waiting, and Purge returns ErrBusy (having deleted nothing)
	// when another instance holds it; should another instance take the
	// lock between two batches, Purge stops there and reports what it did.
	// The embedded store's write lock serializes purges instead.
	Purge(ctx context.Context, expiredBefore, messagesBefore time.Time) (sessions, messages int64, err error)
	// SetWaiting records that the session's conversation waits on an n8n
	// execution (see Waiting), replacing what it waited on before. It
	// returns ErrNotFound if the session does not exist or is revoked.
	SetWaiting(ctx context.Context, sessionID string, w Waiting) error
	// TakeWaiting removes the session's waiting execution and returns it,
	// atomically: of two callers racing, one gets it. It returns
	// ErrNotFound when nothing waits, or when the wait ended before now
	// (the record is removed then too).
	TakeWaiting(ctx context.Context, sessionID string, now time.Time) (*Waiting, error)
	// GetWaiting returns the session's waiting execution without taking
	// it (its wait may be over), or ErrNotFound.
	GetWaiting(ctx context.Context, sessionID string) (*Waiting, error)
	// ClearWaiting removes the session's waiting execution if holder still
	// holds it, and reports whether it did: false means it was taken (or
	// replaced) meanwhile.
	ClearWaiting(ctx context.Context, sessionID, holder string) (bool, error)
	// Stats reports schema version and row counts.
	Stats(ctx context.Context) (*Stats, error)

	// Verified users (see User): a user's conversations are the visitor
	// sessions stored with that user (realm and id).

	// ResumeUserSession picks the user's latest active visitor session
	// (not revoked, not expired at at; the one used last: greatest
	// last_seen_at, then the newest), records the use (last_seen_at moves
	// to at), extends its expiry to expiresAt when that is later, and
	// stores u's name, email and attributes as now proven. It returns the
	// session as stored, or ErrNotFound when the user has none active.
	ResumeUserSession(ctx context.Context, u *User, at, expiresAt time.Time) (*Session, error)
	// ResumeUserWidget is ResumeUserSession for the user's @n8n/chat
	// conversations on site (sessions of KindWidget with that site): the
	// widget's conversation follows the user across devices, whatever
	// sessionId each device's widget chose.
	ResumeUserWidget(ctx context.Context, u *User, site string, at, expiresAt time.Time) (*Session, error)
	// AdoptSession gives the conversation of the anonymous session fromID
	// (of s.Kind: a visitor session, or a widget conversation) to a user:
	// s (whose User is required) is created, fromID's
	// messages move to it in their order and with their ids, and then
	// fromID is deleted, so that its tokens stop working and nothing of
	// it is left outside the user's rows (which DeleteUser erases), all
	// in one transaction. s is prepared as by CreateSession and its
	// MessageCount set to the messages it received. ErrNotFound means
	// fromID is not an anonymous session of s.Kind active at at; ErrExists
	// that s.ID is taken.
	AdoptSession(ctx context.Context, fromID string, s *Session, at time.Time) error
	// ListUserSessions returns up to limit of the user's active visitor
	// sessions (not revoked, not expired at now), newest first (by
	// created_at, then id); with before set, those that come after the
	// session with that id in that order (ErrNotFound if it is not one of
	// the user's sessions).
	ListUserSessions(ctx context.Context, realm, userID, before string, limit int, now time.Time) (*ConversationPage, error)
	// DeleteUser deletes every session of the user (any kind or state)
	// with its messages and revoked tokens, and reports how many sessions
	// and messages it removed. A user with very many sessions is deleted
	// in several transactions of a bounded number of sessions each, so no
	// one transaction grows with the user: on an error, what earlier
	// transactions deleted stays deleted (and is counted), and calling it
	// again deletes the rest. A user with nothing stored is not an error.
	DeleteUser(ctx context.Context, realm, userID string) (sessions, messages int64, err error)
	// RevokeToken records that the token with ID jti of the session gave
	// up (a device signed out): TokenRevoked then reports it, until the
	// session is deleted. Recording it again is harmless. It returns
	// ErrNotFound if there is no such session.
	RevokeToken(ctx context.Context, sessionID, jti string, at time.Time) error
	// TokenRevoked reports whether RevokeToken recorded jti for the session.
	TokenRevoked(ctx context.Context, sessionID, jti string) (bool, error)

	// Ping checks the store is reachable (and migrated).
	Ping(ctx context.Context) error
	// Close releases the store's resources.
	Close() error
}

// Helpers shared by the Store implementations.

// normTime is the form every stored time takes: UTC, truncated to the
// microsecond both databases keep, so what a caller holds after a write
// equals what a later read returns.
func normTime(t time.Time) time.Time {
	return t.UTC().Truncate(time.Microsecond)
}

// compactJSON validates raw metadata and strips insignificant white space;
// empty means none (stored as NULL).
func compactJSON(raw json.RawMessage) (json.RawMessage, error) {
	if len(raw) == 0 {
		return nil, nil
	}
	var b bytes.Buffer
	if err := json.Compact(&b, raw); err != nil {
		return nil, fmt.Errorf("%w: metadata is not valid JSON: %w", ErrInvalidData, err)
	}
	return b.Bytes(), nil
}

// maxNumberLen bounds a metadata number's text. Every float64 can be
// written in fewer characters; PostgreSQL refuses numbers with more than
// 16383 digits after the point, which a longer text could have.
const maxNumberLen = 400

// cleanJSON is compactJSON that also makes the document one both stores
// hold alike. Strings (keys too) are cleaned like other text: NUL (raw or
// \u0000, which jsonb refuses) is removed and invalid UTF-8 or an unpaired
// surrogate escape becomes U+FFFD. Numbers must be finite float64s,
// what a JavaScript widget or n8n can read: PostgreSQL refuses ones beyond
// its numeric range (1e999999, 1e-999999) while SQLite keeps their text,
// so they are refused on both, with ErrInvalidData.
func cleanJSON(raw json.RawMessage) (json.RawMessage, error) {
	c, err := compactJSON(raw)
	if err != nil || c == nil {
		return c, err
	}
	var out []byte // nil until a string needs rewriting
	last := 0      // c[last:] is not yet copied to out
	for i := 0; i < len(c); {
		switch ch := c[i]; {
		case ch == '"':
			end, dirty := scanJSONString(c, i)
			if dirty {
				var s string
				if err := json.Unmarshal(c[i:end], &s); err != nil {
					return nil, fmt.Errorf("%w: metadata: %w", ErrInvalidData, err)
				}
				enc, err := encodeJSONString(cleantext.String(s))
				if err != nil {
					return nil, fmt.Errorf("%w: metadata: %w", ErrInvalidData, err)
				}
				out = append(append(out, c[last:i]...), enc...)
				last = end
			}
			i = end
		case ch == '-' || ch >= '0' && ch <= '9':
			end := i + 1
			for end < len(c) && strings.IndexByte("0123456789+-.eE", c[end]) >= 0 {
				end++
			}
			if err := checkJSONNumber(string(c[i:end])); err != nil {
				return nil, err
			}
			i = end
		default:
			i++
		}
	}
	if out == nil {
		return c, nil
	}
	return append(out, c[last:]...), nil
}

// scanJSONString returns the end of the (valid, compact) JSON string that
// starts at c[i], and whether cleaning would change it: it has invalid
// UTF-8, a \u0000 escape, or a surrogate escape (rewritten as the
// character it pairs to, or U+FFFD when unpaired).
func scanJSONString(c []byte, i int) (end int, dirty bool) {
	start := i
	for i++; i < len(c); {
		switch c[i] {
		case '"':
			end = i + 1
			return end, dirty || !utf8.Valid(c[start:end])
		case '\\':
			if c[i+1] == 'u' && i+6 <= len(c) {
				v, err := strconv.ParseUint(string(c[i+2:i+6]), 16, 16)
				if err == nil && (v == 0 || v >= 0xD800 && v <= 0xDFFF) {
					dirty = true
				}
				i += 6
			} else {
				i += 2
			}
		default:
			i++
		}
	}
	return len(c), true // not reached for valid JSON
}

// encodeJSONString writes s as a JSON string without escaping HTML
// characters, which would change text that needs no cleaning.
func encodeJSONString(s string) ([]byte, error) {
	var b bytes.Buffer
	enc := json.NewEncoder(&b)
	enc.SetEscapeHTML(false)
	if err := enc.Encode(s); err != nil {
		return nil, err
	}
	return bytes.TrimSuffix(b.Bytes(), []byte("\n")), nil
}

// checkJSONNumber refuses a metadata number no float64 holds: infinite
// when parsed, or zero although it has a non-zero digit.
func checkJSONNumber(num string) error {
	bad := len(num) > maxNumberLen
	if !bad {
		f, err := strconv.ParseFloat(num, 64)
		mant, _, _ := strings.Cut(strings.ToLower(num), "e")
		bad = err != nil || math.IsInf(f, 0) || f == 0 && strings.Trim(mant, "-+0.") != ""
	}
	if bad {
		if len(num) > 40 {
			num = num[:40] + "..."
		}
		return fmt.Errorf("%w: metadata: number %s is out of range", ErrInvalidData, num)
	}
	return nil
}

// unstorablePage answers ListMessages for a session or cursor id that
// cannot be stored: the session has no messages, and the cursor is not
// one of them.
func unstorablePage(before string) (*Page, error) {
	if before != "" {
		return nil, ErrNotFound
	}
	return &Page{}, nil
}

// storable reports whether an id can be stored at all. An id that cannot
// names nothing stored: lookups answer ErrNotFound, creations
// ErrInvalidData, instead of PostgreSQL's data error.
func storable(id string) bool {
	return cleantext.Valid(id)
}

// prepareSession checks s and fills the defaults CreateSession documents,
// in place, so the caller's copy matches the stored row.
func prepareSession(s *Session, now time.Time) error {
	if s.ID == "" {
		return errors.New("session id is empty")
	}
	if !storable(s.ID) {
		return fmt.Errorf("%w: session id %q is not valid text", ErrInvalidData, s.ID)
	}
	if s.Kind == "" {
		s.Kind = KindVisitor
	}
	if s.Kind != KindVisitor && s.Kind != KindWidget {
		return fmt.Errorf("invalid session kind %q", s.Kind)
	}
	if s.ExpiresAt.IsZero() {
		return errors.New("session expiry is not set")
	}
	md, err := cleanJSON(s.Metadata)
	if err != nil {
		return err
	}
	s.Metadata = md
	s.Site = cleantext.String(s.Site)
	s.PageURL = cleantext.String(s.PageURL)
	s.UserAgent = cleantext.String(s.UserAgent)
	s.ClientIP = cleantext.String(s.ClientIP)
	s.Fingerprint = cleantext.String(s.Fingerprint)
	if err := prepareUser(s.User); err != nil {
		return err
	}
	if s.CreatedAt.IsZero() {
		s.CreatedAt = now
	}
	if s.LastSeenAt.IsZero() {
		s.LastSeenAt = s.CreatedAt
	}
	s.CreatedAt = normTime(s.CreatedAt)
	s.LastSeenAt = normTime(s.LastSeenAt)
	s.ExpiresAt = normTime(s.ExpiresAt)
	if s.RevokedAt != nil {
		r := normTime(*s.RevokedAt)
		s.RevokedAt = &r
	}
	s.MessageCount = 0 // counted by AppendMessage, never set by hand
	s.Mode = ModeBot   // changed by SetSessionMode only
	return nil
}

// prepareUser checks a session's user and cleans its text in place: the
// id is required and must be storable text, attributes a JSON object.
func prepareUser(u *User) error {
	if u == nil {
		return nil
	}
	if u.ID == "" {
		return errors.New("session user has no id")
	}
	if !storable(u.ID) || !storable(u.Realm) {
		return fmt.Errorf("%w: user id %q is not valid text", ErrInvalidData, u.ID)
	}
	attrs, err := cleanJSON(u.Attributes)
	if err != nil {
		return fmt.Errorf("user attributes: %w", err)
	}
	if attrs != nil && attrs[0] != '{' {
		return fmt.Errorf("%w: user attributes must be a JSON object", ErrInvalidData)
	}
	u.Attributes = attrs
	u.Name = cleantext.String(u.Name)
	u.Email = cleantext.String(u.Email)
	return nil
}

// prepareMessage checks m and fills its id (a UUIDv7, so ids sort roughly
// by time and reveal nothing else), status and time, in place.
func prepareMessage(m *Message, now time.Time) error {
	if m.SessionID == "" {
		return errors.New("message has no session id")
	}
	if !storable(m.SessionID) {
		return ErrNotFound // no session can have that id
	}
	if m.Role != RoleUser && m.Role != RoleAssistant && m.Role != RoleAgent {
		return fmt.Errorf("invalid message role %q", m.Role)
	}
	if m.Status == "" {
		m.Status = StatusComplete
	}
	if m.Status != StatusComplete && m.Status != StatusPartial && m.Status != StatusError &&
		(m.Status != StatusStreaming || m.Role != RoleAssistant) {
		return fmt.Errorf("invalid message status %q", m.Status)
	}
	if m.ID != "" && !storable(m.ID) {
		return fmt.Errorf("%w: message id %q is not valid text", ErrInvalidData, m.ID)
	}
	md, err := cleanJSON(m.Metadata)
	if err != nil {
		return err
	}
	m.Metadata = md
	m.Content = cleantext.String(m.Content)
	if m.ID == "" {
		id, err := uuid.NewV7()
		if err != nil {
			return fmt.Errorf("generating message id: %w", err)
		}
		m.ID = id.String()
	}
	if m.CreatedAt.IsZero() {
		m.CreatedAt = now
	}
	m.CreatedAt = normTime(m.CreatedAt)
	return nil
}

// prepareReply prepares the streaming reply of AppendExchange.
func prepareReply(reply, user *Message) error {
	reply.SessionID = user.SessionID
	reply.Role = RoleAssistant
	reply.Status = StatusStreaming
	reply.Content = ""
	reply.Metadata = nil
	if reply.CreatedAt.IsZero() {
		reply.CreatedAt = user.CreatedAt
	}
	return prepareMessage(reply, user.CreatedAt)
}

// prepareFinish checks the reply FinishReply stores.
func prepareFinish(m *Message) error {
	if m.ID == "" || m.SessionID == "" {
		return errors.New("finishing a reply without its id and session")
	}
	if !storable(m.ID) || !storable(m.SessionID) {
		return ErrNotFound
	}
	if m.Status != StatusComplete && m.Status != StatusPartial && m.Status != StatusError {
		return fmt.Errorf("invalid final status %q", m.Status)
	}
	m.Role = RoleAssistant
	md, err := cleanJSON(m.Metadata)
	if err != nil {
		return err
	}
	m.Metadata = md
	m.Content = cleantext.String(m.Content)
	return nil
}

// prepareUserMessage is prepareMessage for AppendUserMessage.
func prepareUserMessage(m *Message, now time.Time) error {
	if m.Role == "" {
		m.Role = RoleUser
	}
	if m.Role != RoleUser {
		return fmt.Errorf("AppendUserMessage with role %q", m.Role)
	}
	return prepareMessage(m, now)
}

// checkMode refuses a mode that is not ModeBot or ModeHuman.
func checkMode(mode string) error {
	if mode != ModeBot && mode != ModeHuman {
		return fmt.Errorf("invalid session mode %q", mode)
	}
	return nil
}

// migrateGate runs a store's migrations on first use. Unlike a sync.Once
// it forgets failures: a database that was down when Caddy started is
// migrated by the first call after it comes back. Waiting for the gate
// honours the caller's context.
type migrateGate struct {
	sem  chan struct{}
	done atomic.Bool
}

func newMigrateGate() migrateGate {
	return migrateGate{sem: make(chan struct{}, 1)}
}

// ensure migrates unless a migration already succeeded.
func (g *migrateGate) ensure(ctx context.Context, migrate func(context.Context) error) error {
	if g.done.Load() {
		return nil
	}
	return g.run(ctx, migrate, false)
}

// run migrates; with force it does even after an earlier success, for
// `caddy chatproxy migrate`.
func (g *migrateGate) run(ctx context.Context, migrate func(context.Context) error, force bool) error {
	select {
	case g.sem <- struct{}{}:
	case <-ctx.Done():
		return fmt.Errorf("preparing database: %w", ctx.Err())
	}
	defer func() { <-g.sem }()
	if !force && g.done.Load() {
		return nil
	}
	if err := migrate(ctx); err != nil {
		return fmt.Errorf("preparing database: %w", err)
	}
	g.done.Store(true)
	return nil
}

// finishConversations cuts newest-first rows (up to limit+1) to the page.
func finishConversations(p *ConversationPage, limit int) {
	if len(p.Conversations) > limit {
		p.HasMore = true
		p.Conversations = p.Conversations[:limit]
	}
}
