// Package storetest is the one behaviour suite every sessions.Store must
// pass, so that the Postgres and embedded stores cannot drift apart.
package storetest

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"reflect"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/google/uuid"

	"github.com/chatproxy/caddy-chatproxy/migrations"
	"github.com/chatproxy/caddy-chatproxy/sessions"
)

// Run runs the suite. open must return a new, empty, not yet used store
// and arrange (with t.Cleanup) for it to be closed; it is called once per
// subtest, so subtests never see each other's rows.
func Run(t *testing.T, open func(t *testing.T) sessions.Store) {
	tests := []struct {
		name string
		fn   func(t *testing.T, st sessions.Store)
	}{
		{"FirstUseRetriesAfterFailure", testFirstUseRetries},
		{"Migrate", testMigrate},
		{"SessionRoundTrip", testSessionRoundTrip},
		{"SessionDefaults", testSessionDefaults},
		{"SessionUser", testSessionUser},
		{"SessionUserRejectsInvalid", testSessionUserRejectsInvalid},
		{"UserResume", testUserResume},
		{"UserAdopt", testUserAdopt},
		{"UserWidget", testUserWidget},
		{"UserList", testUserList},
		{"UserDelete", testUserDelete},
		{"UserDeleteMany", testUserDeleteMany},
		{"RevokeToken", testRevokeToken},
		{"UserPurge", testUserPurge},
		{"CreateRejectsInvalid", testCreateRejectsInvalid},
		{"DuplicateID", testDuplicateID},
		{"NotFound", testNotFound},
		{"Touch", testTouch},
		{"TouchExtends", testTouchExtends},
		{"Delete", testDelete},
		{"Revoke", testRevoke},
		{"Append", testAppend},
		{"AppendRejectsInvalid", testAppendRejectsInvalid},
		{"AppendUser", testAppendUser},
		{"StreamingReply", testStreamingReply},
		{"StreamingReplyRefusals", testStreamingReplyRefusals},
		{"StreamingReplyAdopted", testStreamingReplyAdopted},
		{"SameTimestampOrder", testSameTimestampOrder},
		{"Paging", testPaging},
		{"PagingBeforeErrors", testPagingBeforeErrors},
		{"Purge", testPurge},
		{"PurgeMany", testPurgeMany},
		{"Stats", testStats},
		{"ConcurrentCreate", testConcurrentCreate},
		{"ConcurrentAppend", testConcurrentAppend},
		{"RevokeDuringAppends", testRevokeDuringAppends},
		{"CleansText", testCleansText},
		{"UnstorableIDs", testUnstorableIDs},
		{"InvalidMetadata", testInvalidMetadata},
		{"MetadataNumbersKept", testMetadataNumbersKept},
		{"SessionMode", testSessionMode},
		{"AgentMessages", testAgentMessages},
		{"ListAfter", testListAfter},
		{"Waiting", testWaiting},
		{"WaitingTakeOnce", testWaitingTakeOnce},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			tt.fn(t, open(t))
		})
	}
}

// RunPurge runs only the purge tests, for callers that change how a
// store purges (e.g. a batch size small enough to need many batches).
func RunPurge(t *testing.T, open func(t *testing.T) sessions.Store) {
	t.Run("Purge", func(t *testing.T) { testPurge(t, open(t)) })
	t.Run("PurgeMany", func(t *testing.T) { testPurgeMany(t, open(t)) })
}

// RunUserDelete runs only the user erasure tests, for callers that change
// how DeleteUser batches its work.
func RunUserDelete(t *testing.T, open func(t *testing.T) sessions.Store) {
	t.Run("UserDelete", func(t *testing.T) { testUserDelete(t, open(t)) })
	t.Run("UserDeleteMany", func(t *testing.T) { testUserDeleteMany(t, open(t)) })
}

// t0 has nanoseconds and a zone on purpose: stores keep microseconds in UTC.
var t0 = time.Date(2031, 5, 6, 7, 8, 9, 123456789, time.FixedZone("UTC+2", 2*3600))

func ctx(t *testing.T) context.Context {
	c, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	t.Cleanup(cancel)
	return c
}

func newSession(id string) *sessions.Session {
	return &sessions.Session{
		ID:         id,
		Site:       "example.com",
		CreatedAt:  t0,
		LastSeenAt: t0,
		ExpiresAt:  t0.Add(7 * 24 * time.Hour),
	}
}

func mustCreate(t *testing.T, st sessions.Store, s *sessions.Session) {
	t.Helper()
	if err := st.CreateSession(ctx(t), s); err != nil {
		t.Fatalf("CreateSession(%s): %v", s.ID, err)
	}
}

func mustGet(t *testing.T, st sessions.Store, id string) *sessions.Session {
	t.Helper()
	s, err := st.GetSession(ctx(t), id)
	if err != nil {
		t.Fatalf("GetSession(%s): %v", id, err)
	}
	return s
}

// appendN appends n alternating user/assistant messages at t0+i seconds
// and returns them in order.
func appendN(t *testing.T, st sessions.Store, sessionID string, n int) []sessions.Message {
	t.Helper()
	out := make([]sessions.Message, n)
	for i := range n {
		m := sessions.Message{
			SessionID: sessionID,
			Role:      []string{sessions.RoleUser, sessions.RoleAssistant}[i%2],
			Content:   fmt.Sprintf("message %d", i),
			CreatedAt: t0.Add(time.Duration(i) * time.Second),
		}
		if err := st.AppendMessage(ctx(t), &m); err != nil {
			t.Fatalf("AppendMessage #%d: %v", i, err)
		}
		out[i] = m
	}
	return out
}

func mustList(t *testing.T, st sessions.Store, sessionID, before string, limit int) *sessions.Page {
	t.Helper()
	p, err := st.ListMessages(ctx(t), sessionID, before, limit)
	if err != nil {
		t.Fatalf("ListMessages(%s, %q, %d): %v", sessionID, before, limit, err)
	}
	return p
}

func ids(ms []sessions.Message) []string {
	out := make([]string, len(ms))
	for i, m := range ms {
		out[i] = m.ID
	}
	return out
}

// jsonEqual compares JSON by value: Postgres' jsonb reorders keys.
func jsonEqual(t *testing.T, got, want json.RawMessage) bool {
	t.Helper()
	if len(got) == 0 || len(want) == 0 {
		return len(got) == len(want)
	}
	var g, w any
	if err := json.Unmarshal(got, &g); err != nil {
		t.Fatalf("stored metadata %q is not JSON: %v", got, err)
	}
	if err := json.Unmarshal(want, &w); err != nil {
		t.Fatalf("metadata %q is not JSON: %v", want, err)
	}
	return reflect.DeepEqual(g, w)
}

func timeEqual(got, want time.Time) bool {
	return got.Equal(want) && got.Location() == time.UTC
}

func wantErr(t *testing.T, what string, err, target error) {
	t.Helper()
	if !errors.Is(err, target) {
		t.Errorf("%s: err = %v, want %v", what, err, target)
	}
}

// A store whose first use fails (here: the caller gave up) must try again
// on the next call, not remember the failure.
func testFirstUseRetries(t *testing.T, st sessions.Store) {
	cancelled, cancel := context.WithCancel(context.Background())
	cancel()
	if _, err := st.GetSession(cancelled, "x"); err == nil {
		t.Fatal("GetSession with a cancelled context on a fresh store: want an error")
	}
	if err := st.Ping(ctx(t)); err != nil {
		t.Fatalf("Ping after a failed first use: %v", err)
	}
	mustCreate(t, st, newSession("after-retry"))
}

func testMigrate(t *testing.T, st sessions.Store) {
	m, ok := st.(interface{ Migrate(context.Context) error })
	if !ok {
		t.Fatalf("%T has no Migrate method", st)
	}
	for i := range 2 {
		if err := m.Migrate(ctx(t)); err != nil {
			t.Fatalf("Migrate #%d: %v", i+1, err)
		}
	}
	stats, err := st.Stats(ctx(t))
	if err != nil {
		t.Fatal(err)
	}
	if want := migrations.Latest(migrations.Postgres); stats.SchemaVersion != want {
		t.Fatalf("SchemaVersion = %d, want %d", stats.SchemaVersion, want)
	}
}

func testSessionRoundTrip(t *testing.T, st sessions.Store) {
	revoked := t0.Add(time.Hour)
	tests := []*sessions.Session{
		{
			ID:          "visitor-full",
			Kind:        sessions.KindVisitor,
			Site:        "shop.example.com",
			PageURL:     "https://shop.example.com/p?q=ü&x=1#frag",
			UserAgent:   "Mozilla/5.0 (X11; Linux x86_64) «test» 🙂",
			ClientIP:    "2001:db8::1",
			Fingerprint: "fp-0123456789abcdef",
			Metadata:    json.RawMessage(`{ "plan": "pro", "tags": ["a", "b"], "n": 1.5, "nested": {"ok": true} }`),
			CreatedAt:   t0,
			LastSeenAt:  t0.Add(time.Minute),
			ExpiresAt:   t0.Add(30 * 24 * time.Hour),
		},
		{
			ID:         "widget-revoked",
			Kind:       sessions.KindWidget,
			Site:       "docs.example.com",
			CreatedAt:  t0,
			LastSeenAt: t0,
			ExpiresAt:  t0.Add(time.Hour),
			RevokedAt:  &revoked,
		},
	}
	for _, in := range tests {
		t.Run(in.ID, func(t *testing.T) {
			orig := *in
			mustCreate(t, st, in)
			got := mustGet(t, st, in.ID)

			if got.ID != orig.ID || got.Kind != orig.Kind || got.Site != orig.Site ||
				got.PageURL != orig.PageURL || got.UserAgent != orig.UserAgent ||
				got.ClientIP != orig.ClientIP || got.Fingerprint != orig.Fingerprint {
				t.Errorf("strings: got %+v, want %+v", got, orig)
			}
			if !jsonEqual(t, got.Metadata, orig.Metadata) {
				t.Errorf("Metadata = %s, want %s", got.Metadata, orig.Metadata)
			}
			for _, c := range []struct {
				name      string
				got, want time.Time
			}{
				{"CreatedAt", got.CreatedAt, orig.CreatedAt},
				{"LastSeenAt", got.LastSeenAt, orig.LastSeenAt},
				{"ExpiresAt", got.ExpiresAt, orig.ExpiresAt},
			} {
				if want := c.want.Truncate(time.Microsecond); !timeEqual(c.got, want) {
					t.Errorf("%s = %v, want %v in UTC", c.name, c.got, want)
				}
			}
			switch {
			case orig.RevokedAt == nil && got.RevokedAt != nil:
				t.Errorf("RevokedAt = %v, want nil", got.RevokedAt)
			case orig.RevokedAt != nil && (got.RevokedAt == nil || !timeEqual(*got.RevokedAt, orig.RevokedAt.Truncate(time.Microsecond))):
				t.Errorf("RevokedAt = %v, want %v", got.RevokedAt, orig.RevokedAt)
			}
			if got.MessageCount != 0 {
				t.Errorf("MessageCount = %d, want 0", got.MessageCount)
			}
			// The caller's copy was normalised to what was stored.
			if !timeEqual(in.CreatedAt, got.CreatedAt) || !jsonEqual(t, in.Metadata, got.Metadata) {
				t.Errorf("caller's session not normalised: %+v vs stored %+v", in, got)
			}
			if got.Active(t0) != (orig.RevokedAt == nil) {
				t.Errorf("Active(t0) = %v", got.Active(t0))
			}
		})
	}
}

func testSessionDefaults(t *testing.T, st sessions.Store) {
	before := time.Now().Add(-time.Second)
	in := &sessions.Session{ID: "minimal", Site: "example.com", ExpiresAt: t0}
	mustCreate(t, st, in)
	got := mustGet(t, st, "minimal")
	if got.Kind != sessions.KindVisitor {
		t.Errorf("Kind = %q, want %q", got.Kind, sessions.KindVisitor)
	}
	if got.CreatedAt.Before(before) || got.CreatedAt.After(time.Now().Add(time.Second)) {
		t.Errorf("CreatedAt = %v, want about now", got.CreatedAt)
	}
	if !got.LastSeenAt.Equal(got.CreatedAt) {
		t.Errorf("LastSeenAt = %v, want CreatedAt %v", got.LastSeenAt, got.CreatedAt)
	}
	if got.PageURL != "" || got.UserAgent != "" || got.ClientIP != "" || got.Fingerprint != "" ||
		got.Metadata != nil || got.RevokedAt != nil {
		t.Errorf("optional fields not empty: %+v", got)
	}
	if !reflect.DeepEqual(in, got) {
		t.Errorf("caller's copy %+v differs from stored %+v", in, got)
	}
}

// A verified user is stored with its session and comes back from every
// read of it: GetSession, and the session AppendUserMessage returns. An
// anonymous session has none.
func testSessionUser(t *testing.T, st sessions.Store) {
	tests := []struct {
		name string
		user *sessions.User
		want *sessions.User // what is stored: text cleaned
	}{
		{"anonymous", nil, nil},
		{
			"full",
			&sessions.User{
				ID: "user-42", Realm: "chatproxy-visitor:0123", Name: "Ada «Lovelace» 🙂", Email: "ada@example.com",
				Attributes: json.RawMessage(`{ "plan": "pro", "seats": 3, "tags": ["a"] }`),
			},
			&sessions.User{
				ID: "user-42", Realm: "chatproxy-visitor:0123", Name: "Ada «Lovelace» 🙂", Email: "ada@example.com",
				Attributes: json.RawMessage(`{"plan":"pro","seats":3,"tags":["a"]}`),
			},
		},
		{"id only", &sessions.User{ID: "7"}, &sessions.User{ID: "7"}},
		{
			"text cleaned",
			&sessions.User{ID: "u", Realm: "r", Name: "A\x00da\xff", Email: "a\x00@b", Attributes: json.RawMessage(`{"k":"v\u0000w"}`)},
			&sessions.User{ID: "u", Realm: "r", Name: "Ada\uFFFD", Email: "a@b", Attributes: json.RawMessage(`{"k":"vw"}`)},
		},
	}
	for i, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			in := newSession(fmt.Sprintf("user-session-%d", i))
			in.User = tc.user
			mustCreate(t, st, in)
			got := mustGet(t, st, in.ID)
			checkUser(t, "GetSession", got.User, tc.want)
			checkUser(t, "caller's copy", in.User, tc.want)

			m := &sessions.Message{SessionID: in.ID, Content: "hi", CreatedAt: t0}
			after, err := st.AppendUserMessage(ctx(t), m, sessions.KindVisitor)
			if err != nil {
				t.Fatal(err)
			}
			checkUser(t, "AppendUserMessage", after.User, tc.want)
			if after.MessageCount != 1 {
				t.Errorf("MessageCount = %d, want 1", after.MessageCount)
			}
		})
	}
}

func checkUser(t *testing.T, what string, got, want *sessions.User) {
	t.Helper()
	if (got == nil) != (want == nil) {
		t.Fatalf("%s: User = %+v, want %+v", what, got, want)
	}
	if got == nil {
		return
	}
	if got.ID != want.ID || got.Realm != want.Realm || got.Name != want.Name || got.Email != want.Email {
		t.Errorf("%s: User = %+v, want %+v", what, got, want)
	}
	if !jsonEqual(t, got.Attributes, want.Attributes) {
		t.Errorf("%s: Attributes = %s, want %s", what, got.Attributes, want.Attributes)
	}
}

// A user the store cannot keep as given is refused and nothing is stored.
func testSessionUserRejectsInvalid(t *testing.T, st sessions.Store) {
	tests := []struct {
		name string
		user *sessions.User
		want error // nil: any error
	}{
		{"empty id", &sessions.User{Name: "x"}, nil},
		{"id not text", &sessions.User{ID: "a\xffb"}, sessions.ErrInvalidData},
		{"attributes not JSON", &sessions.User{ID: "u", Attributes: json.RawMessage(`{"a":`)}, sessions.ErrInvalidData},
		{"attributes an array", &sessions.User{ID: "u", Attributes: json.RawMessage(`["a"]`)}, sessions.ErrInvalidData},
		{"attributes a string", &sessions.User{ID: "u", Attributes: json.RawMessage(`"a"`)}, sessions.ErrInvalidData},
		{"attributes number out of range", &sessions.User{ID: "u", Attributes: json.RawMessage(`{"n":1e999}`)}, sessions.ErrInvalidData},
	}
	for i, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			s := newSession(fmt.Sprintf("bad-user-%d", i))
			s.User = tc.user
			err := st.CreateSession(ctx(t), s)
			if err == nil {
				t.Fatal("CreateSession: want an error")
			}
			if tc.want != nil {
				wantErr(t, "CreateSession", err, tc.want)
			}
			_, err = st.GetSession(ctx(t), s.ID)
			wantErr(t, "GetSession after the refusal", err, sessions.ErrNotFound)
		})
	}
}

func testCreateRejectsInvalid(t *testing.T, st sessions.Store) {
	tests := []struct {
		name string
		edit func(s *sessions.Session)
	}{
		{"no id", func(s *sessions.Session) { s.ID = "" }},
		{"no expiry", func(s *sessions.Session) { s.ExpiresAt = time.Time{} }},
		{"unknown kind", func(s *sessions.Session) { s.Kind = "admin" }},
		{"bad metadata", func(s *sessions.Session) { s.Metadata = json.RawMessage(`{"a":`) }},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			s := newSession("invalid")
			tt.edit(s)
			err := st.CreateSession(ctx(t), s)
			if err == nil || errors.Is(err, sessions.ErrExists) {
				t.Fatalf("CreateSession: err = %v, want a validation error", err)
			}
		})
	}
	if _, err := st.GetSession(ctx(t), "invalid"); !errors.Is(err, sessions.ErrNotFound) {
		t.Fatalf("an invalid session was stored: %v", err)
	}
}

func testDuplicateID(t *testing.T, st sessions.Store) {
	mustCreate(t, st, newSession("dup"))
	other := newSession("dup")
	other.Site = "evil.example"
	wantErr(t, "second CreateSession", st.CreateSession(ctx(t), other), sessions.ErrExists)
	if got := mustGet(t, st, "dup"); got.Site != "example.com" {
		t.Errorf("the duplicate overwrote the session: Site = %q", got.Site)
	}
}

func testNotFound(t *testing.T, st sessions.Store) {
	c := ctx(t)
	_, err := st.GetSession(c, "missing")
	wantErr(t, "GetSession", err, sessions.ErrNotFound)
	wantErr(t, "TouchSession", st.TouchSession(c, "missing", t0, time.Time{}), sessions.ErrNotFound)
	wantErr(t, "RevokeSession", st.RevokeSession(c, "missing", t0), sessions.ErrNotFound)
	wantErr(t, "DeleteSession", st.DeleteSession(c, "missing"), sessions.ErrNotFound)
	wantErr(t, "AppendMessage", st.AppendMessage(c, &sessions.Message{
		SessionID: "missing", Role: sessions.RoleUser, Content: "hi",
	}), sessions.ErrNotFound)
	// No session, no messages: an empty page rather than an error.
	p := mustList(t, st, "missing", "", 10)
	if len(p.Messages) != 0 || p.TotalCount != 0 || p.HasMore {
		t.Errorf("ListMessages of a missing session = %+v, want empty", p)
	}
}

func testTouch(t *testing.T, st sessions.Store) {
	mustCreate(t, st, newSession("touch"))
	later := t0.Add(90 * time.Minute)
	if err := st.TouchSession(ctx(t), "touch", later, time.Time{}); err != nil {
		t.Fatal(err)
	}
	if got := mustGet(t, st, "touch").LastSeenAt; !timeEqual(got, later.Truncate(time.Microsecond)) {
		t.Errorf("LastSeenAt = %v, want %v", got, later)
	}
	// A late, out-of-order touch does not move it back.
	if err := st.TouchSession(ctx(t), "touch", t0.Add(time.Minute), time.Time{}); err != nil {
		t.Fatal(err)
	}
	if got := mustGet(t, st, "touch").LastSeenAt; !timeEqual(got, later.Truncate(time.Microsecond)) {
		t.Errorf("LastSeenAt after an older touch = %v, want %v", got, later)
	}
}

func testTouchExtends(t *testing.T, st sessions.Store) {
	s := newSession("slide")
	mustCreate(t, st, s)
	orig := mustGet(t, st, "slide").ExpiresAt
	later := orig.Add(48 * time.Hour)
	if err := st.TouchSession(ctx(t), "slide", t0.Add(time.Hour), later); err != nil {
		t.Fatal(err)
	}
	if got := mustGet(t, st, "slide").ExpiresAt; !timeEqual(got, later.Truncate(time.Microsecond)) {
		t.Errorf("ExpiresAt = %v, want %v", got, later)
	}
	// An earlier expiry never shortens it.
	if err := st.TouchSession(ctx(t), "slide", t0.Add(time.Hour), orig); err != nil {
		t.Fatal(err)
	}
	if got := mustGet(t, st, "slide").ExpiresAt; !timeEqual(got, later.Truncate(time.Microsecond)) {
		t.Errorf("ExpiresAt after an earlier expiry = %v, want %v", got, later)
	}
	// A revoked session is not extended.
	if err := st.RevokeSession(ctx(t), "slide", t0.Add(2*time.Hour)); err != nil {
		t.Fatal(err)
	}
	if err := st.TouchSession(ctx(t), "slide", t0.Add(3*time.Hour), later.Add(time.Hour)); err != nil {
		t.Fatal(err)
	}
	if got := mustGet(t, st, "slide").ExpiresAt; !timeEqual(got, later.Truncate(time.Microsecond)) {
		t.Errorf("revoked session was extended to %v", got)
	}
}

func testDelete(t *testing.T, st sessions.Store) {
	mustCreate(t, st, newSession("del"))
	mustCreate(t, st, newSession("stay"))
	appendN(t, st, "del", 3)
	kept := appendN(t, st, "stay", 2)
	if err := st.DeleteSession(ctx(t), "del"); err != nil {
		t.Fatal(err)
	}
	_, err := st.GetSession(ctx(t), "del")
	wantErr(t, "GetSession after delete", err, sessions.ErrNotFound)
	if p := mustList(t, st, "del", "", 10); p.TotalCount != 0 {
		t.Errorf("messages survived deletion: %+v", p)
	}
	if p := mustList(t, st, "stay", "", 10); len(p.Messages) != len(kept) {
		t.Errorf("the other session lost messages: %+v", p)
	}
	// The id can be used again.
	mustCreate(t, st, newSession("del"))
}

func testRevoke(t *testing.T, st sessions.Store) {
	mustCreate(t, st, newSession("gone"))
	mustCreate(t, st, newSession("kept"))
	appendN(t, st, "gone", 3)
	kept := appendN(t, st, "kept", 2)

	at := t0.Add(2 * time.Hour)
	if err := st.RevokeSession(ctx(t), "gone", at); err != nil {
		t.Fatal(err)
	}
	got := mustGet(t, st, "gone")
	if got.RevokedAt == nil || !timeEqual(*got.RevokedAt, at.Truncate(time.Microsecond)) {
		t.Errorf("RevokedAt = %v, want %v", got.RevokedAt, at)
	}
	if got.MessageCount != 0 {
		t.Errorf("MessageCount = %d, want 0", got.MessageCount)
	}
	if got.Active(t0) {
		t.Error("revoked session is active")
	}
	if p := mustList(t, st, "gone", "", 50); len(p.Messages) != 0 || p.TotalCount != 0 {
		t.Errorf("messages survived revocation: %+v", p)
	}

	// Revoking again keeps the first time.
	if err := st.RevokeSession(ctx(t), "gone", at.Add(time.Hour)); err != nil {
		t.Fatal(err)
	}
	if got := mustGet(t, st, "gone"); !timeEqual(*got.RevokedAt, at.Truncate(time.Microsecond)) {
		t.Errorf("second revoke moved RevokedAt to %v", got.RevokedAt)
	}
	// A reply finishing after the revocation is not kept.
	wantErr(t, "AppendMessage to a revoked session", st.AppendMessage(ctx(t), &sessions.Message{
		SessionID: "gone", Role: sessions.RoleAssistant, Content: "late",
	}), sessions.ErrNotFound)
	if p := mustList(t, st, "gone", "", 50); p.TotalCount != 0 {
		t.Errorf("late message stored: %+v", p)
	}

	// The other session is untouched.
	if p := mustList(t, st, "kept", "", 50); !reflect.DeepEqual(ids(p.Messages), ids(kept)) {
		t.Errorf("other session's messages = %v, want %v", ids(p.Messages), ids(kept))
	}
	if got := mustGet(t, st, "kept"); got.RevokedAt != nil || got.MessageCount != 2 {
		t.Errorf("other session changed: %+v", got)
	}
}

func testAppend(t *testing.T, st sessions.Store) {
	mustCreate(t, st, newSession("chat"))
	before := time.Now().Add(-time.Second)

	user := &sessions.Message{SessionID: "chat", Role: sessions.RoleUser, Content: "hi 👋\nline two\t«»"}
	if err := st.AppendMessage(ctx(t), user); err != nil {
		t.Fatal(err)
	}
	id, err := uuid.Parse(user.ID)
	if err != nil || id.Version() != 7 {
		t.Errorf("generated ID %q is not a UUIDv7 (%v)", user.ID, err)
	}
	if user.Status != sessions.StatusComplete {
		t.Errorf("default Status = %q, want %q", user.Status, sessions.StatusComplete)
	}
	if user.CreatedAt.Before(before) || user.CreatedAt.Location() != time.UTC {
		t.Errorf("default CreatedAt = %v, want now in UTC", user.CreatedAt)
	}
	if got := mustGet(t, st, "chat").MessageCount; got != 1 {
		t.Errorf("MessageCount = %d, want 1", got)
	}

	reply := &sessions.Message{
		ID:        "reply-1",
		SessionID: "chat",
		Role:      sessions.RoleAssistant,
		Content:   "partial answer <script>alert(1)</script> & \"quotes\"",
		Status:    sessions.StatusPartial,
		Metadata:  json.RawMessage(`{"finish": "client_gone", "chunks": 3}`),
		CreatedAt: time.Now().Add(time.Second),
	}
	if err := st.AppendMessage(ctx(t), reply); err != nil {
		t.Fatal(err)
	}
	failed := &sessions.Message{SessionID: "chat", Role: sessions.RoleAssistant, Status: sessions.StatusError}
	if err := st.AppendMessage(ctx(t), failed); err != nil {
		t.Fatalf("AppendMessage with empty content: %v", err)
	}
	if got := mustGet(t, st, "chat").MessageCount; got != 3 {
		t.Errorf("MessageCount = %d, want 3", got)
	}

	// Every field round-trips.
	p := mustList(t, st, "chat", "", 10)
	want := []*sessions.Message{user, reply, failed}
	if len(p.Messages) != len(want) {
		t.Fatalf("listed %d messages, want %d", len(p.Messages), len(want))
	}
	for i, w := range want {
		g := p.Messages[i]
		if g.ID != w.ID || g.SessionID != w.SessionID || g.Role != w.Role || g.Content != w.Content ||
			g.Status != w.Status || !timeEqual(g.CreatedAt, w.CreatedAt) || !jsonEqual(t, g.Metadata, w.Metadata) {
			t.Errorf("message %d = %+v, want %+v", i, g, *w)
		}
	}

	// A duplicate id is refused and not counted.
	dup := &sessions.Message{ID: "reply-1", SessionID: "chat", Role: sessions.RoleUser, Content: "again"}
	wantErr(t, "AppendMessage with a duplicate id", st.AppendMessage(ctx(t), dup), sessions.ErrExists)
	if got := mustGet(t, st, "chat").MessageCount; got != 3 {
		t.Errorf("MessageCount after a refused duplicate = %d, want 3", got)
	}
}

func testAppendUser(t *testing.T, st sessions.Store) {
	created := newSession("visitor")
	created.PageURL = "https://example.com/pricing"
	created.Metadata = json.RawMessage(`{"plan":"pro"}`)
	mustCreate(t, st, created)
	appendN(t, st, "visitor", 2)

	m := &sessions.Message{SessionID: "visitor", Content: "third", Metadata: json.RawMessage(`{"page_url": "https://example.com/"}`)}
	got, err := st.AppendUserMessage(ctx(t), m, sessions.KindVisitor)
	if err != nil {
		t.Fatal(err)
	}
	if m.Role != sessions.RoleUser || m.Status != sessions.StatusComplete || m.ID == "" {
		t.Errorf("message not filled in: %+v", m)
	}
	want := mustGet(t, st, "visitor")
	if want.MessageCount != 3 {
		t.Errorf("stored MessageCount = %d, want 3", want.MessageCount)
	}
	if !reflect.DeepEqual(got, want) {
		t.Errorf("AppendUserMessage returned\n%+v\nwant the stored session\n%+v", got, want)
	}
	p := mustList(t, st, "visitor", "", 10)
	if last := p.Messages[len(p.Messages)-1]; last.ID != m.ID || last.Content != "third" || last.Role != sessions.RoleUser ||
		!jsonEqual(t, last.Metadata, m.Metadata) || !timeEqual(last.CreatedAt, m.CreatedAt) {
		t.Errorf("stored %+v, want %+v", last, *m)
	}

	// Only an active session takes messages: each refusal stores nothing.
	expired := newSession("expired")
	mustCreate(t, st, expired)
	revoked := newSession("revoked")
	mustCreate(t, st, revoked)
	if err := st.RevokeSession(ctx(t), "revoked", t0); err != nil {
		t.Fatal(err)
	}
	visitor := sessions.KindVisitor
	for _, tc := range []struct {
		name string
		m    sessions.Message
		kind string
		want error
	}{
		{"missing session", sessions.Message{SessionID: "nobody", Content: "hi"}, visitor, sessions.ErrNotFound},
		{"revoked session", sessions.Message{SessionID: "revoked", Content: "hi"}, visitor, sessions.ErrNotFound},
		{"at the expiry", sessions.Message{SessionID: "expired", Content: "hi", CreatedAt: expired.ExpiresAt}, visitor, sessions.ErrNotFound},
		{"after the expiry", sessions.Message{SessionID: "expired", Content: "hi", CreatedAt: expired.ExpiresAt.Add(time.Hour)}, visitor, sessions.ErrNotFound},
		{"other kind", sessions.Message{SessionID: "visitor", Content: "hi"}, sessions.KindWidget, sessions.ErrNotFound},
		{"duplicate id", sessions.Message{ID: m.ID, SessionID: "visitor", Content: "again"}, visitor, sessions.ErrExists},
	} {
		s, err := st.AppendUserMessage(ctx(t), &tc.m, tc.kind)
		if s != nil {
			t.Errorf("%s: returned a session", tc.name)
		}
		wantErr(t, "AppendUserMessage, "+tc.name, err, tc.want)
	}
	for id, n := range map[string]int{"visitor": 3, "expired": 0, "revoked": 0} {
		if got := mustGet(t, st, id).MessageCount; got != n {
			t.Errorf("%s: MessageCount = %d after refusals, want %d", id, got, n)
		}
		if p := mustList(t, st, id, "", 10); p.TotalCount != n {
			t.Errorf("%s: %d messages stored, want %d", id, p.TotalCount, n)
		}
	}
	// Just before the expiry is still in time.
	if _, err := st.AppendUserMessage(ctx(t), &sessions.Message{SessionID: "expired", Content: "in time",
		CreatedAt: expired.ExpiresAt.Add(-time.Microsecond)}, sessions.KindVisitor); err != nil {
		t.Errorf("AppendUserMessage just before the expiry: %v", err)
	}
	if _, err := st.AppendUserMessage(ctx(t), &sessions.Message{SessionID: "visitor", Role: sessions.RoleAssistant}, sessions.KindVisitor); err == nil {
		t.Error("AppendUserMessage took an assistant message")
	}
}

func testAppendRejectsInvalid(t *testing.T, st sessions.Store) {
	mustCreate(t, st, newSession("strict"))
	tests := []struct {
		name string
		m    sessions.Message
	}{
		{"role", sessions.Message{SessionID: "strict", Role: "system", Content: "x"}},
		{"status", sessions.Message{SessionID: "strict", Role: sessions.RoleUser, Status: "done", Content: "x"}},
		{"metadata", sessions.Message{SessionID: "strict", Role: sessions.RoleUser, Content: "x", Metadata: json.RawMessage("{")}},
		{"no session", sessions.Message{Role: sessions.RoleUser, Content: "x"}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			if err := st.AppendMessage(ctx(t), &tt.m); err == nil {
				t.Fatal("want an error")
			}
		})
	}
	if got := mustGet(t, st, "strict").MessageCount; got != 0 {
		t.Errorf("MessageCount = %d after refused appends, want 0", got)
	}
}

// Messages written in the same microsecond keep insertion order, whatever
// their ids.
func testSameTimestampOrder(t *testing.T, st sessions.Store) {
	mustCreate(t, st, newSession("burst"))
	want := []string{"m-e", "m-a", "m-d", "m-b", "m-c"}
	for _, id := range want {
		m := &sessions.Message{ID: id, SessionID: "burst", Role: sessions.RoleAssistant, Content: id, CreatedAt: t0}
		if err := st.AppendMessage(ctx(t), m); err != nil {
			t.Fatal(err)
		}
	}
	if got := ids(mustList(t, st, "burst", "", 10).Messages); !reflect.DeepEqual(got, want) {
		t.Errorf("order = %v, want %v", got, want)
	}
	// Paging keeps it too.
	if got := ids(mustList(t, st, "burst", "m-b", 2).Messages); !reflect.DeepEqual(got, []string{"m-a", "m-d"}) {
		t.Errorf("page before m-b = %v, want [m-a m-d]", got)
	}
}

func testPaging(t *testing.T, st sessions.Store) {
	mustCreate(t, st, newSession("long"))
	mustCreate(t, st, newSession("other"))
	all := ids(appendN(t, st, "long", 12))
	appendN(t, st, "other", 3)

	tests := []struct {
		name    string
		before  string // an index into all, or "" for the newest page
		limit   int
		want    []string
		hasMore bool
	}{
		{"newest page", "", 5, all[7:], true},
		{"second page", all[7], 5, all[2:7], true},
		{"last page", all[2], 5, all[:2], false},
		{"before the first", all[0], 5, nil, false},
		{"exactly all", "", 12, all, false},
		{"more than all", "", 200, all, false},
		{"one", "", 1, all[11:], true},
		{"zero", "", 0, nil, true},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			p := mustList(t, st, "long", tt.before, tt.limit)
			if got := ids(p.Messages); len(got) != len(tt.want) || (len(got) > 0 && !reflect.DeepEqual(got, tt.want)) {
				t.Errorf("ids = %v, want %v", got, tt.want)
			}
			if p.HasMore != tt.hasMore {
				t.Errorf("HasMore = %v, want %v", p.HasMore, tt.hasMore)
			}
			if p.TotalCount != 12 {
				t.Errorf("TotalCount = %d, want 12", p.TotalCount)
			}
			for _, m := range p.Messages {
				if m.SessionID != "long" {
					t.Errorf("message %s of session %q", m.ID, m.SessionID)
				}
			}
		})
	}

	// Walking back page by page visits every message once, in order.
	var walked []string
	before := ""
	for range 10 {
		p := mustList(t, st, "long", before, 5)
		walked = append(ids(p.Messages), walked...)
		if !p.HasMore {
			break
		}
		before = p.Messages[0].ID
	}
	if !reflect.DeepEqual(walked, all) {
		t.Errorf("walk = %v, want %v", walked, all)
	}
}

func testPagingBeforeErrors(t *testing.T, st sessions.Store) {
	mustCreate(t, st, newSession("mine"))
	mustCreate(t, st, newSession("theirs"))
	appendN(t, st, "mine", 2)
	theirs := appendN(t, st, "theirs", 2)

	_, err := st.ListMessages(ctx(t), "mine", theirs[1].ID, 10)
	wantErr(t, "before = another session's message", err, sessions.ErrNotFound)
	_, err = st.ListMessages(ctx(t), "mine", "no-such-message", 10)
	wantErr(t, "before = unknown id", err, sessions.ErrNotFound)
	if _, err := st.ListMessages(ctx(t), "mine", "", -1); err == nil {
		t.Error("negative limit: want an error")
	}
}

func testPurge(t *testing.T, st sessions.Store) {
	cutSessions := t0.Add(24 * time.Hour)
	cutMessages := t0.Add(10 * time.Second)
	mk := func(id string, expires time.Time) {
		s := newSession(id)
		s.ExpiresAt = expires
		mustCreate(t, st, s)
	}
	mk("expired", cutSessions.Add(-time.Microsecond)) // just past the cut-off: goes
	mk("at-cutoff", cutSessions)                      // expires exactly at it: stays
	mk("active", cutSessions.Add(time.Hour))
	mk("empty", cutSessions.Add(time.Hour))

	appendN(t, st, "expired", 3)           // at t0+0..2s: all go with the session
	active := appendN(t, st, "active", 14) // t0+0..13s: 0..9 are older than cutMessages
	appendN(t, st, "at-cutoff", 1)

	// A message exactly at the cut-off stays.
	edge := &sessions.Message{SessionID: "active", Role: sessions.RoleUser, Content: "edge", CreatedAt: cutMessages}
	if err := st.AppendMessage(ctx(t), edge); err != nil {
		t.Fatal(err)
	}

	ns, nm, err := st.Purge(ctx(t), cutSessions, cutMessages)
	if err != nil {
		t.Fatal(err)
	}
	// Messages: 3 of "expired", 10 old ones of "active", 1 old of "at-cutoff".
	if ns != 1 || nm != 14 {
		t.Errorf("Purge removed %d sessions, %d messages; want 1, 14", ns, nm)
	}
	_, err = st.GetSession(ctx(t), "expired")
	wantErr(t, "GetSession(expired)", err, sessions.ErrNotFound)
	for _, id := range []string{"at-cutoff", "active", "empty"} {
		mustGet(t, st, id)
	}

	// Ordered by insertion: the edge message came last.
	wantActive := append(ids(active[10:]), edge.ID)
	p := mustList(t, st, "active", "", 50)
	if got := ids(p.Messages); !reflect.DeepEqual(got, wantActive) || p.TotalCount != len(wantActive) {
		t.Errorf("active keeps %v (total %d), want %v", got, p.TotalCount, wantActive)
	}
	if got := mustGet(t, st, "active").MessageCount; got != len(wantActive) {
		t.Errorf("active MessageCount = %d, want %d (the stored history)", got, len(wantActive))
	}
	if got := mustGet(t, st, "at-cutoff").MessageCount; got != 0 {
		t.Errorf("at-cutoff MessageCount = %d, want 0", got)
	}

	stats, err := st.Stats(ctx(t))
	if err != nil {
		t.Fatal(err)
	}
	if stats.Sessions != 3 || stats.Messages != 5 {
		t.Errorf("Stats after purge = %+v, want 3 sessions, 5 messages", stats)
	}

	// Nothing left to purge.
	if ns, nm, err := st.Purge(ctx(t), cutSessions, cutMessages); err != nil || ns != 0 || nm != 0 {
		t.Errorf("second Purge = %d, %d, %v; want 0, 0, nil", ns, nm, err)
	}
}

// testPurgeMany purges a history spread over many sessions: what is past
// retention goes, exactly, however many batches that takes, and every
// remaining session's message_count still counts its stored history.
func testPurgeMany(t *testing.T, st sessions.Store) {
	cutSessions := t0.Add(24 * time.Hour)
	cutMessages := t0.Add(5 * time.Second)
	var kept []string
	for i := range 7 { // expired: go whole, with both their messages
		s := newSession(fmt.Sprintf("expired-%d", i))
		s.ExpiresAt = cutSessions.Add(-time.Duration(i+1) * time.Minute)
		mustCreate(t, st, s)
		appendN(t, st, s.ID, 2)
	}
	want := map[string][]string{}
	for i := range 4 { // active: lose their 5 old messages, keep 3
		id := fmt.Sprintf("active-%d", i)
		kept = append(kept, id)
		s := newSession(id)
		s.ExpiresAt = cutSessions.Add(time.Hour)
		mustCreate(t, st, s)
		want[id] = ids(appendN(t, st, id, 8)[5:])
	}
	// Interleave a session whose messages are all recent.
	fresh := newSession("fresh")
	fresh.ExpiresAt = cutSessions.Add(time.Hour)
	mustCreate(t, st, fresh)
	m := sessions.Message{SessionID: "fresh", Role: sessions.RoleUser, Content: "new", CreatedAt: cutMessages.Add(time.Minute)}
	if err := st.AppendMessage(ctx(t), &m); err != nil {
		t.Fatal(err)
	}
	kept = append(kept, "fresh")
	want["fresh"] = []string{m.ID}

	ns, nm, err := st.Purge(ctx(t), cutSessions, cutMessages)
	if err != nil {
		t.Fatal(err)
	}
	if ns != 7 || nm != 7*2+4*5 {
		t.Errorf("Purge removed %d sessions, %d messages; want 7, %d", ns, nm, 7*2+4*5)
	}
	for _, id := range kept {
		p := mustList(t, st, id, "", 50)
		if got := ids(p.Messages); !reflect.DeepEqual(got, want[id]) || p.TotalCount != len(want[id]) {
			t.Errorf("%s keeps %v (total %d), want %v", id, got, p.TotalCount, want[id])
		}
		if got := mustGet(t, st, id).MessageCount; got != len(want[id]) {
			t.Errorf("%s MessageCount = %d, want %d", id, got, len(want[id]))
		}
	}
	stats, err := st.Stats(ctx(t))
	if err != nil {
		t.Fatal(err)
	}
	if stats.Sessions != 5 || stats.Messages != 4*3+1 {
		t.Errorf("Stats after purge = %+v, want 5 sessions, 13 messages", stats)
	}
	if ns, nm, err := st.Purge(ctx(t), cutSessions, cutMessages); err != nil || ns != 0 || nm != 0 {
		t.Errorf("second Purge = %d, %d, %v; want 0, 0, nil", ns, nm, err)
	}
}

func testStats(t *testing.T, st sessions.Store) {
	stats, err := st.Stats(ctx(t))
	if err != nil {
		t.Fatal(err)
	}
	want := sessions.Stats{SchemaVersion: migrations.Latest(migrations.Postgres)}
	if *stats != want {
		t.Errorf("Stats of an empty store = %+v, want %+v", *stats, want)
	}
	mustCreate(t, st, newSession("s1"))
	mustCreate(t, st, newSession("s2"))
	appendN(t, st, "s1", 2)
	appendN(t, st, "s2", 1)
	if err := st.Ping(ctx(t)); err != nil {
		t.Fatal(err)
	}
	stats, err = st.Stats(ctx(t))
	if err != nil {
		t.Fatal(err)
	}
	want.Sessions, want.Messages = 2, 3
	if *stats != want {
		t.Errorf("Stats = %+v, want %+v", *stats, want)
	}
}

const concurrency = 200

func testConcurrentCreate(t *testing.T, st sessions.Store) {
	// Migrate first: the burst is about writes, not first use (which
	// FirstUseRetriesAfterFailure and the Postgres tests cover).
	if err := st.Ping(ctx(t)); err != nil {
		t.Fatal(err)
	}
	c := ctx(t)
	var wg sync.WaitGroup
	errs := make([]error, concurrency)
	for i := range concurrency {
		wg.Go(func() {
			s := newSession(fmt.Sprintf("burst-%03d", i))
			errs[i] = st.CreateSession(c, s)
		})
	}
	wg.Wait()
	for i, err := range errs {
		if err != nil {
			t.Errorf("CreateSession #%d: %v", i, err)
		}
	}
	stats, err := st.Stats(ctx(t))
	if err != nil {
		t.Fatal(err)
	}
	if stats.Sessions != concurrency {
		t.Errorf("stored %d sessions, want %d", stats.Sessions, concurrency)
	}
	for i := range concurrency {
		if s, err := st.GetSession(c, fmt.Sprintf("burst-%03d", i)); err != nil || s.ID != fmt.Sprintf("burst-%03d", i) {
			t.Fatalf("session %d: %v, %v", i, s, err)
		}
	}
}

func testConcurrentAppend(t *testing.T, st sessions.Store) {
	mustCreate(t, st, newSession("busy"))
	c := ctx(t)
	var wg sync.WaitGroup
	errs := make([]error, concurrency)
	for i := range concurrency {
		wg.Go(func() {
			errs[i] = st.AppendMessage(c, &sessions.Message{
				SessionID: "busy", Role: sessions.RoleUser, Content: fmt.Sprint(i),
			})
		})
	}
	wg.Wait()
	for i, err := range errs {
		if err != nil {
			t.Errorf("AppendMessage #%d: %v", i, err)
		}
	}
	if got := mustGet(t, st, "busy").MessageCount; got != concurrency {
		t.Errorf("MessageCount = %d, want %d", got, concurrency)
	}
	p := mustList(t, st, "busy", "", concurrency)
	if p.TotalCount != concurrency || len(p.Messages) != concurrency || p.HasMore {
		t.Errorf("page: %d messages, total %d, has_more %v; want %d, %d, false",
			len(p.Messages), p.TotalCount, p.HasMore, concurrency, concurrency)
	}
	seen := map[string]bool{}
	for _, m := range p.Messages {
		if seen[m.ID] {
			t.Errorf("duplicate id %s", m.ID)
		}
		seen[m.ID] = true
	}
}

// Appends racing a revocation: whatever order they land in, nothing of the
// session survives it and message_count agrees.
func testRevokeDuringAppends(t *testing.T, st sessions.Store) {
	mustCreate(t, st, newSession("race"))
	c := ctx(t)
	var wg sync.WaitGroup
	start := make(chan struct{})
	for i := range 40 {
		wg.Go(func() {
			<-start
			err := st.AppendMessage(c, &sessions.Message{SessionID: "race", Role: sessions.RoleUser, Content: fmt.Sprint(i)})
			if err != nil && !errors.Is(err, sessions.ErrNotFound) {
				t.Errorf("AppendMessage: %v", err)
			}
		})
	}
	var revokeErr error
	wg.Go(func() {
		<-start
		time.Sleep(time.Millisecond)
		revokeErr = st.RevokeSession(c, "race", t0)
	})
	close(start)
	wg.Wait()
	if revokeErr != nil {
		t.Fatal(revokeErr)
	}
	p := mustList(t, st, "race", "", 100)
	s := mustGet(t, st, "race")
	if p.TotalCount != 0 || s.MessageCount != 0 {
		t.Errorf("after revocation: %d messages stored, message_count %d; want 0, 0", p.TotalCount, s.MessageCount)
	}
}

// Text from outside with NUL or invalid UTF-8 (an n8n reply, a User-Agent,
// metadata strings, \u0000 escapes jsonb refuses) is stored cleaned, the
// same on every store, instead of failing the write.
func testCleansText(t *testing.T, st sessions.Store) {
	sess := newSession("dirty")
	sess.Site = "exa\x00mple.com"
	sess.PageURL = "https://example.com/\x00p\xfe"
	sess.UserAgent = "Mozilla/5.0\x00 (X11) \xff\xfe"
	sess.ClientIP = "192.0.2.1\x00"
	sess.Fingerprint = "fp\xc3"
	sess.Metadata = json.RawMessage(`{"k\u0000ey": "a\u0000b", "lone": "\ud800x", "pair": "\ud83d\ude00", "raw": "` + "\xff" + `", "n": [1, "\u0000"], "html": "<&>"}`)
	if err := st.CreateSession(ctx(t), sess); err != nil {
		t.Fatalf("CreateSession with dirty text: %v", err)
	}
	want := &sessions.Session{
		Site: "example.com", PageURL: "https://example.com/p\uFFFD", UserAgent: "Mozilla/5.0 (X11) \uFFFD",
		ClientIP: "192.0.2.1", Fingerprint: "fp\uFFFD",
		Metadata: json.RawMessage(`{"key":"ab","lone":"\uFFFDx","pair":"😀","raw":"\uFFFD","n":[1,""],"html":"<&>"}`),
	}
	for what, got := range map[string]*sessions.Session{"caller's copy": sess, "stored": mustGet(t, st, "dirty")} {
		if got.Site != want.Site || got.PageURL != want.PageURL || got.UserAgent != want.UserAgent ||
			got.ClientIP != want.ClientIP || got.Fingerprint != want.Fingerprint {
			t.Errorf("%s: site %q, page %q, agent %q, ip %q, fingerprint %q; want %q, %q, %q, %q, %q", what,
				got.Site, got.PageURL, got.UserAgent, got.ClientIP, got.Fingerprint,
				want.Site, want.PageURL, want.UserAgent, want.ClientIP, want.Fingerprint)
		}
		if !jsonEqual(t, got.Metadata, want.Metadata) {
			t.Errorf("%s: metadata %s, want %s", what, got.Metadata, want.Metadata)
		}
	}

	reply := sessions.Message{
		SessionID: "dirty", Role: sessions.RoleAssistant, Content: "Hello\x00 w\xffrld \xe2\x82!",
		Metadata: json.RawMessage(`{"note":"\u0000"}`), CreatedAt: t0,
	}
	if err := st.AppendMessage(ctx(t), &reply); err != nil {
		t.Fatalf("AppendMessage with NUL and invalid UTF-8: %v", err)
	}
	user := sessions.Message{SessionID: "dirty", Content: "q\x00\xc0?", CreatedAt: t0.Add(time.Second)}
	if _, err := st.AppendUserMessage(ctx(t), &user, sessions.KindVisitor); err != nil {
		t.Fatalf("AppendUserMessage with NUL and invalid UTF-8: %v", err)
	}
	const wantReply, wantUser = "Hello w\uFFFDrld \uFFFD!", "q\uFFFD?"
	if reply.Content != wantReply || user.Content != wantUser {
		t.Errorf("caller's copies hold %q, %q; want %q, %q", reply.Content, user.Content, wantReply, wantUser)
	}
	p := mustList(t, st, "dirty", "", 10)
	if len(p.Messages) != 2 || p.Messages[0].Content != wantReply || p.Messages[1].Content != wantUser {
		t.Fatalf("history = %+v, want the contents %q, %q", p.Messages, wantReply, wantUser)
	}
	if !jsonEqual(t, p.Messages[0].Metadata, json.RawMessage(`{"note":""}`)) {
		t.Errorf("reply metadata = %s, want {\"note\":\"\"}", p.Messages[0].Metadata)
	}
}

// An id no store can hold (NUL, invalid UTF-8) is refused when creating
// and names nothing when looking up: never a database error.
func testUnstorableIDs(t *testing.T, st sessions.Store) {
	mustCreate(t, st, newSession("ok"))
	for _, id := range []string{"a\x00b", "a\xffb"} {
		wantErr(t, "CreateSession", st.CreateSession(ctx(t), newSession(id)), sessions.ErrInvalidData)
		_, err := st.GetSession(ctx(t), id)
		wantErr(t, "GetSession", err, sessions.ErrNotFound)
		wantErr(t, "TouchSession", st.TouchSession(ctx(t), id, t0, time.Time{}), sessions.ErrNotFound)
		wantErr(t, "RevokeSession", st.RevokeSession(ctx(t), id, t0), sessions.ErrNotFound)
		wantErr(t, "DeleteSession", st.DeleteSession(ctx(t), id), sessions.ErrNotFound)
		wantErr(t, "AppendMessage", st.AppendMessage(ctx(t), &sessions.Message{SessionID: id, Role: sessions.RoleUser, Content: "x"}), sessions.ErrNotFound)
		_, err = st.AppendUserMessage(ctx(t), &sessions.Message{SessionID: id, Content: "x", CreatedAt: t0}, sessions.KindVisitor)
		wantErr(t, "AppendUserMessage", err, sessions.ErrNotFound)
		wantErr(t, "AppendMessage with that message id",
			st.AppendMessage(ctx(t), &sessions.Message{ID: id, SessionID: "ok", Role: sessions.RoleUser, Content: "x"}), sessions.ErrInvalidData)
		if p, err := st.ListMessages(ctx(t), id, "", 10); err != nil || len(p.Messages) != 0 || p.TotalCount != 0 {
			t.Errorf("ListMessages(%q) = %+v, %v; want an empty page", id, p, err)
		}
		_, err = st.ListMessages(ctx(t), "ok", id, 10)
		wantErr(t, "ListMessages before", err, sessions.ErrNotFound)
	}
	if got := mustGet(t, st, "ok").MessageCount; got != 0 {
		t.Errorf("MessageCount = %d after refused appends, want 0", got)
	}
}

// Metadata a store cannot hold as given is ErrInvalidData on every store
// and every write: not JSON, or a number beyond float64 (PostgreSQL's
// jsonb refuses 1e999999 and 1e-999999 while SQLite would keep their text).
func testInvalidMetadata(t *testing.T, st sessions.Store) {
	mustCreate(t, st, newSession("meta"))
	for _, md := range []string{
		`{"a":1e999999}`,
		`{"a":-1e999999}`,
		`{"a":1e-999999}`,
		`{"a":[1,{"b":1e400}]}`,
		`{"a":0.` + strings.Repeat("1", 17000) + `}`,
		`{"a":1` + strings.Repeat("0", 400) + `}`,
		`{"a":`,
		`"not an object"x`,
	} {
		short := md
		if len(short) > 30 {
			short = short[:30] + "..."
		}
		t.Run(short, func(t *testing.T) {
			s := newSession("meta-new")
			s.Metadata = json.RawMessage(md)
			wantErr(t, "CreateSession", st.CreateSession(ctx(t), s), sessions.ErrInvalidData)
			m := sessions.Message{SessionID: "meta", Role: sessions.RoleAssistant, Content: "x", Metadata: json.RawMessage(md)}
			wantErr(t, "AppendMessage", st.AppendMessage(ctx(t), &m), sessions.ErrInvalidData)
			m = sessions.Message{SessionID: "meta", Content: "x", Metadata: json.RawMessage(md), CreatedAt: t0}
			_, err := st.AppendUserMessage(ctx(t), &m, sessions.KindVisitor)
			wantErr(t, "AppendUserMessage", err, sessions.ErrInvalidData)
		})
	}
	if _, err := st.GetSession(ctx(t), "meta-new"); !errors.Is(err, sessions.ErrNotFound) {
		t.Errorf("a session with invalid metadata was stored: %v", err)
	}
	if got := mustGet(t, st, "meta").MessageCount; got != 0 {
		t.Errorf("MessageCount = %d after refused appends, want 0", got)
	}
}

// Numbers within float64's range stay accepted, at its edges too.
func testMetadataNumbersKept(t *testing.T, st sessions.Store) {
	md := json.RawMessage(`{"max":1.7976931348623157e308,"min":-1.7976931348623157e308,"tiny":5e-324,"zero":0e999999,"negzero":-0.0,"int":9007199254740993,"frac":0.000001}`)
	s := newSession("numbers")
	s.Metadata = md
	mustCreate(t, st, s)
	if got := mustGet(t, st, "numbers").Metadata; !jsonEqual(t, got, md) {
		t.Errorf("metadata = %s, want %s", got, md)
	}
}

// A reply stored as streaming with its user message is listed after it
// with status streaming, then finished once with its content, status and
// metadata; GetMessage reads it only within its session.
func testStreamingReply(t *testing.T, st sessions.Store) {
	mustCreate(t, st, newSession("visitor"))
	appendN(t, st, "visitor", 2)
	m := &sessions.Message{SessionID: "visitor", Content: "question"}
	reply := &sessions.Message{}
	got, err := st.AppendExchange(ctx(t), m, reply, sessions.KindVisitor)
	if err != nil {
		t.Fatal(err)
	}
	if got.MessageCount != 3 {
		t.Errorf("returned MessageCount = %d, want 3 (the reply not counted)", got.MessageCount)
	}
	if n := mustGet(t, st, "visitor").MessageCount; n != 4 {
		t.Errorf("stored MessageCount = %d, want 4", n)
	}
	if reply.ID == "" || reply.ID == m.ID || reply.Role != sessions.RoleAssistant || reply.Status != sessions.StatusStreaming ||
		reply.SessionID != "visitor" {
		t.Fatalf("reply not filled in: %+v", reply)
	}
	p := mustList(t, st, "visitor", "", 10)
	if len(p.Messages) != 4 || p.Messages[2].ID != m.ID || p.Messages[3].ID != reply.ID {
		t.Fatalf("listed %v, want the user message then the reply last", ids(p.Messages))
	}
	if last := p.Messages[3]; last.Status != sessions.StatusStreaming || last.Content != "" || last.Role != sessions.RoleAssistant {
		t.Errorf("streaming reply listed as %+v", last)
	}
	gm, err := st.GetMessage(ctx(t), "visitor", reply.ID)
	if err != nil || gm.Status != sessions.StatusStreaming || gm.ID != reply.ID {
		t.Fatalf("GetMessage = %+v, %v; want the streaming reply", gm, err)
	}

	fin := &sessions.Message{ID: reply.ID, SessionID: "visitor", Content: "the answer", Status: sessions.StatusPartial,
		Metadata: json.RawMessage(`{"events":{"items":[4,6]}}`)}
	if err := st.FinishReply(ctx(t), fin); err != nil {
		t.Fatal(err)
	}
	gm, err = st.GetMessage(ctx(t), "visitor", reply.ID)
	if err != nil {
		t.Fatal(err)
	}
	if gm.Content != "the answer" || gm.Status != sessions.StatusPartial || !jsonEqual(t, gm.Metadata, fin.Metadata) ||
		!timeEqual(gm.CreatedAt, reply.CreatedAt) {
		t.Errorf("finished reply = %+v", gm)
	}
	if n := mustGet(t, st, "visitor").MessageCount; n != 4 {
		t.Errorf("MessageCount after FinishReply = %d, want 4", n)
	}
	// Finished once: a second finish finds no streaming reply.
	again := &sessions.Message{ID: reply.ID, SessionID: "visitor", Content: "other", Status: sessions.StatusComplete}
	wantErr(t, "FinishReply twice", st.FinishReply(ctx(t), again), sessions.ErrNotFound)
	if gm, _ := st.GetMessage(ctx(t), "visitor", reply.ID); gm == nil || gm.Content != "the answer" {
		t.Errorf("a second FinishReply changed the reply: %+v", gm)
	}

	// Another session's message, or none, is not found.
	mustCreate(t, st, newSession("other"))
	_, err = st.GetMessage(ctx(t), "other", reply.ID)
	wantErr(t, "GetMessage from another session", err, sessions.ErrNotFound)
	_, err = st.GetMessage(ctx(t), "visitor", "no-such-message")
	wantErr(t, "GetMessage of an unknown id", err, sessions.ErrNotFound)
	_, err = st.GetMessage(ctx(t), "visitor", "bad\xff")
	wantErr(t, "GetMessage of an unstorable id", err, sessions.ErrNotFound)
	wantErr(t, "FinishReply of the finished reply, named with another session", st.FinishReply(ctx(t), &sessions.Message{ID: reply.ID, SessionID: "other",
		Status: sessions.StatusComplete}), sessions.ErrNotFound)
}

// A reply streaming while its anonymous conversation is adopted by a
// user (AdoptSession moves it) is finished where it now is, by its id:
// the request producing it still names the anonymous session.
func testStreamingReplyAdopted(t *testing.T, st sessions.Store) {
	mustCreate(t, st, newSession("anon"))
	m, reply := &sessions.Message{SessionID: "anon", Content: "question"}, &sessions.Message{}
	if _, err := st.AppendExchange(ctx(t), m, reply, sessions.KindVisitor); err != nil {
		t.Fatal(err)
	}
	at := t0.Add(time.Minute)
	adopted := newSession("adopted")
	adopted.User = &sessions.User{ID: "u1", Realm: "chatproxy-visitor:aaaa"}
	if err := st.AdoptSession(ctx(t), "anon", adopted, at); err != nil {
		t.Fatal(err)
	}
	fin := &sessions.Message{ID: reply.ID, SessionID: "anon", Content: "the answer", Status: sessions.StatusComplete}
	if err := st.FinishReply(ctx(t), fin); err != nil {
		t.Fatalf("FinishReply after the adoption: %v", err)
	}
	gm, err := st.GetMessage(ctx(t), "adopted", reply.ID)
	if err != nil || gm.Content != "the answer" || gm.Status != sessions.StatusComplete {
		t.Fatalf("the adopted conversation's reply = %+v, %v; want it finished", gm, err)
	}
	if p := mustList(t, st, "adopted", "", 10); !reflect.DeepEqual(ids(p.Messages), []string{m.ID, reply.ID}) {
		t.Errorf("adopted history %v, want the question then the reply", ids(p.Messages))
	}
}

// AppendExchange refuses what AppendUserMessage refuses, storing neither
// row; FinishReply takes only a final status; a deleted session's reply
// cannot be finished.
func testStreamingReplyRefusals(t *testing.T, st sessions.Store) {
	mustCreate(t, st, newSession("visitor"))
	revoked := newSession("revoked")
	mustCreate(t, st, revoked)
	if err := st.RevokeSession(ctx(t), "revoked", t0); err != nil {
		t.Fatal(err)
	}
	_, err := st.AppendExchange(ctx(t), &sessions.Message{SessionID: "revoked", Content: "hi"}, &sessions.Message{}, sessions.KindVisitor)
	wantErr(t, "AppendExchange to a revoked session", err, sessions.ErrNotFound)
	_, err = st.AppendExchange(ctx(t), &sessions.Message{SessionID: "visitor", Content: "hi"}, &sessions.Message{}, sessions.KindWidget)
	wantErr(t, "AppendExchange to another kind", err, sessions.ErrNotFound)
	first := &sessions.Message{}
	if _, err := st.AppendExchange(ctx(t), &sessions.Message{SessionID: "visitor", Content: "hi"}, first, sessions.KindVisitor); err != nil {
		t.Fatal(err)
	}
	// The reply's id taken: neither row is stored.
	_, err = st.AppendExchange(ctx(t), &sessions.Message{SessionID: "visitor", Content: "again"}, &sessions.Message{ID: first.ID}, sessions.KindVisitor)
	wantErr(t, "AppendExchange with a taken reply id", err, sessions.ErrExists)
	if p := mustList(t, st, "visitor", "", 10); p.TotalCount != 2 || mustGet(t, st, "visitor").MessageCount != 2 {
		t.Errorf("after refusals: %d messages stored, count %d; want 2", p.TotalCount, mustGet(t, st, "visitor").MessageCount)
	}
	if err := st.FinishReply(ctx(t), &sessions.Message{ID: first.ID, SessionID: "visitor", Status: sessions.StatusStreaming}); err == nil {
		t.Error("FinishReply took status streaming")
	}
	if err := st.AppendMessage(ctx(t), &sessions.Message{SessionID: "visitor", Role: sessions.RoleUser, Status: sessions.StatusStreaming}); err == nil {
		t.Error("a user message was stored as streaming")
	}
	// A conversation a person has taken over gets no reply row.
	mustCreate(t, st, newSession("human"))
	if err := st.SetSessionMode(ctx(t), "human", sessions.ModeHuman); err != nil {
		t.Fatal(err)
	}
	hm, hr := &sessions.Message{SessionID: "human", Content: "to a person"}, &sessions.Message{}
	got, err := st.AppendExchange(ctx(t), hm, hr, sessions.KindVisitor)
	if err != nil {
		t.Fatal(err)
	}
	if got.Mode != sessions.ModeHuman || got.MessageCount != 1 || mustGet(t, st, "human").MessageCount != 1 {
		t.Errorf("human mode: returned %+v, stored count %d; want mode human, 1 message", got, mustGet(t, st, "human").MessageCount)
	}
	if p := mustList(t, st, "human", "", 10); p.TotalCount != 1 || p.Messages[0].ID != hm.ID {
		t.Errorf("human mode stored %v, want only the visitor's message", ids(p.Messages))
	}
	if err := st.DeleteSession(ctx(t), "visitor"); err != nil {
		t.Fatal(err)
	}
	wantErr(t, "FinishReply after the session was deleted", st.FinishReply(ctx(t), &sessions.Message{ID: first.ID, SessionID: "visitor",
		Status: sessions.StatusComplete, Content: "late"}), sessions.ErrNotFound)
}

// testSessionMode: a session starts in bot mode; SetSessionMode switches
// it, every read (GetSession, AppendUserMessage's returned session) shows
// it, and a missing or revoked session or an unknown mode is refused.
func testSessionMode(t *testing.T, st sessions.Store) {
	s := newSession("handoff")
	mustCreate(t, st, s)
	if s.Mode != sessions.ModeBot {
		t.Errorf("created session's Mode = %q, want %q", s.Mode, sessions.ModeBot)
	}
	if got := mustGet(t, st, "handoff").Mode; got != sessions.ModeBot {
		t.Errorf("stored Mode = %q, want %q", got, sessions.ModeBot)
	}
	if err := st.SetSessionMode(ctx(t), "handoff", sessions.ModeHuman); err != nil {
		t.Fatal(err)
	}
	if got := mustGet(t, st, "handoff").Mode; got != sessions.ModeHuman {
		t.Errorf("Mode after SetSessionMode(human) = %q", got)
	}
	got, err := st.AppendUserMessage(ctx(t), &sessions.Message{SessionID: "handoff", Content: "is anyone there?",
		CreatedAt: t0.Add(time.Minute)}, sessions.KindVisitor)
	if err != nil {
		t.Fatal(err)
	}
	if got.Mode != sessions.ModeHuman {
		t.Errorf("AppendUserMessage returned Mode %q, want %q", got.Mode, sessions.ModeHuman)
	}
	if err := st.SetSessionMode(ctx(t), "handoff", sessions.ModeBot); err != nil {
		t.Fatal(err)
	}
	if got := mustGet(t, st, "handoff").Mode; got != sessions.ModeBot {
		t.Errorf("Mode after SetSessionMode(bot) = %q", got)
	}
	if err := st.SetSessionMode(ctx(t), "handoff", "robot"); err == nil || errors.Is(err, sessions.ErrNotFound) {
		t.Errorf("SetSessionMode(robot) = %v, want an invalid-mode error", err)
	}
	if got := mustGet(t, st, "handoff").Mode; got != sessions.ModeBot {
		t.Errorf("Mode after a refused mode = %q", got)
	}
	wantErr(t, "SetSessionMode of a missing session", st.SetSessionMode(ctx(t), "nobody", sessions.ModeHuman), sessions.ErrNotFound)
	mustCreate(t, st, newSession("gone"))
	if err := st.RevokeSession(ctx(t), "gone", t0); err != nil {
		t.Fatal(err)
	}
	wantErr(t, "SetSessionMode of a revoked session", st.SetSessionMode(ctx(t), "gone", sessions.ModeHuman), sessions.ErrNotFound)
	if got := mustGet(t, st, "gone").Mode; got != sessions.ModeBot {
		t.Errorf("revoked session's Mode changed to %q", got)
	}
}

// testAgentMessages: a person's message (role agent) is stored, counted
// and listed like any other; an unknown role still is not.
func testAgentMessages(t *testing.T, st sessions.Store) {
	mustCreate(t, st, newSession("desk"))
	m := &sessions.Message{SessionID: "desk", Role: sessions.RoleAgent, Content: "Hi, I'm Ana from support."}
	if err := st.AppendMessage(ctx(t), m); err != nil {
		t.Fatal(err)
	}
	p := mustList(t, st, "desk", "", 10)
	if len(p.Messages) != 1 || p.Messages[0].Role != sessions.RoleAgent || p.Messages[0].ID != m.ID || p.Messages[0].Content != m.Content {
		t.Fatalf("listed %+v, want the agent message %+v", p.Messages, *m)
	}
	if got := mustGet(t, st, "desk").MessageCount; got != 1 {
		t.Errorf("MessageCount = %d, want 1", got)
	}
	if err := st.AppendMessage(ctx(t), &sessions.Message{SessionID: "desk", Role: "system", Content: "x"}); err == nil {
		t.Error("AppendMessage took role system")
	}
}

// testListAfter: the messages after a given one, oldest first, bounded
// by limit; none after the newest; an id not in the session is
// ErrNotFound.
func testListAfter(t *testing.T, st sessions.Store) {
	mustCreate(t, st, newSession("a"))
	mustCreate(t, st, newSession("b"))
	msgs := appendN(t, st, "a", 6)
	other := appendN(t, st, "b", 2)
	after := func(id string, limit int) []string {
		t.Helper()
		got, err := st.ListMessagesAfter(ctx(t), "a", id, limit)
		if err != nil {
			t.Fatalf("ListMessagesAfter(%s, %d): %v", id, limit, err)
		}
		for _, m := range got {
			if m.SessionID != "a" {
				t.Errorf("message %s of session %q", m.ID, m.SessionID)
			}
		}
		return ids(got)
	}
	if got, want := after(msgs[1].ID, 10), ids(msgs[2:]); !reflect.DeepEqual(got, want) {
		t.Errorf("after #1 = %v, want %v", got, want)
	}
	if got, want := after(msgs[1].ID, 2), ids(msgs[2:4]); !reflect.DeepEqual(got, want) {
		t.Errorf("after #1, limit 2 = %v, want %v", got, want)
	}
	if got := after(msgs[5].ID, 10); len(got) != 0 {
		t.Errorf("after the newest = %v, want none", got)
	}
	full, err := st.ListMessagesAfter(ctx(t), "a", msgs[4].ID, 10)
	if err != nil || len(full) != 1 {
		t.Fatalf("after #4 = %v, %v", full, err)
	}
	if g, w := full[0], msgs[5]; g.Role != w.Role || g.Content != w.Content || g.Status != w.Status || !timeEqual(g.CreatedAt, w.CreatedAt) {
		t.Errorf("after #4 = %+v, want %+v", g, w)
	}
	for _, id := range []string{"", "no-such-id", other[0].ID, "bad\x00id"} {
		_, err := st.ListMessagesAfter(ctx(t), "a", id, 10)
		wantErr(t, fmt.Sprintf("ListMessagesAfter(%q)", id), err, sessions.ErrNotFound)
	}
}
