package storetest

import (
	"fmt"
	"reflect"
	"strings"
	"testing"
	"time"

	"github.com/chatproxy/caddy-chatproxy/sessions"
)

// Verified users' conversations: resumed from any device, adopted from an
// anonymous session, listed, erased, and a device's token given up.

const (
	realmA = "chatproxy-visitor:aaaa"
	realmB = "chatproxy-visitor:bbbb"
)

func userSession(id, realm, userID string, created time.Time) *sessions.Session {
	s := newSession(id)
	s.CreatedAt, s.LastSeenAt = created, created
	s.ExpiresAt = created.Add(7 * 24 * time.Hour)
	s.User = &sessions.User{ID: userID, Realm: realm, Name: "Ada", Email: "ada@example.com"}
	return s
}

// ResumeUserSession picks the user's session used last among the active
// visitor sessions of that realm, and records the use.
func testUserResume(t *testing.T, st sessions.Store) {
	older := userSession("older", realmA, "u1", t0)
	mustCreate(t, st, older)
	latest := userSession("latest", realmA, "u1", t0.Add(time.Minute))
	mustCreate(t, st, latest)
	// Each of these would be picked (newer, or used later) were it not
	// what it is.
	revoked := userSession("revoked", realmA, "u1", t0.Add(2*time.Minute))
	mustCreate(t, st, revoked)
	if err := st.RevokeSession(ctx(t), "revoked", t0.Add(2*time.Minute)); err != nil {
		t.Fatal(err)
	}
	expired := userSession("expired", realmA, "u1", t0.Add(3*time.Minute))
	expired.ExpiresAt = t0.Add(4 * time.Minute)
	mustCreate(t, st, expired)
	widget := userSession("widget", realmA, "u1", t0.Add(5*time.Minute))
	widget.Kind = sessions.KindWidget
	mustCreate(t, st, widget)
	mustCreate(t, st, userSession("other-realm", realmB, "u1", t0.Add(6*time.Minute)))
	mustCreate(t, st, userSession("other-user", realmA, "u2", t0.Add(7*time.Minute)))
	anon := newSession("anonymous")
	anon.CreatedAt = t0.Add(8 * time.Minute)
	mustCreate(t, st, anon)

	at := t0.Add(10 * time.Minute)
	u := &sessions.User{ID: "u1", Realm: realmA, Name: "Ada L.", Attributes: []byte(`{"plan": "team"}`)}
	got, err := st.ResumeUserSession(ctx(t), u, at, at.Add(7*24*time.Hour))
	if err != nil {
		t.Fatal(err)
	}
	if got.ID != "latest" {
		t.Fatalf("resumed %q, want latest", got.ID)
	}
	want := mustGet(t, st, "latest")
	if !reflect.DeepEqual(got, want) {
		t.Errorf("returned\n%+v\nwant the stored session\n%+v", got, want)
	}
	if !timeEqual(got.LastSeenAt, at.Truncate(time.Microsecond)) {
		t.Errorf("LastSeenAt = %v, want %v", got.LastSeenAt, at)
	}
	if !timeEqual(got.ExpiresAt, at.Add(7*24*time.Hour).Truncate(time.Microsecond)) {
		t.Errorf("ExpiresAt = %v, not extended", got.ExpiresAt)
	}
	// The details as proven now replace the old ones (no email this time).
	checkUser(t, "resumed", got.User, &sessions.User{ID: "u1", Realm: realmA, Name: "Ada L.", Attributes: []byte(`{"plan":"team"}`)})

	// Used last now wins over newer: "older" used after "latest".
	if _, err := st.ResumeUserSession(ctx(t), u, at, time.Time{}); err != nil {
		t.Fatal(err)
	}
	if err := st.TouchSession(ctx(t), "older", at.Add(time.Minute), time.Time{}); err != nil {
		t.Fatal(err)
	}
	got, err = st.ResumeUserSession(ctx(t), u, at.Add(2*time.Minute), time.Time{})
	if err != nil || got.ID != "older" {
		t.Fatalf("after older was used: resumed %v, %v; want older", got, err)
	}
	// An earlier expiry never shortens the session.
	if !got.ExpiresAt.Equal(older.ExpiresAt) {
		t.Errorf("ExpiresAt = %v, want unchanged %v", got.ExpiresAt, older.ExpiresAt)
	}

	for _, u := range []*sessions.User{
		{ID: "nobody", Realm: realmA},
		{ID: "u2", Realm: realmB},
		{ID: "u1", Realm: "chatproxy-visitor:cccc"},
	} {
		_, err := st.ResumeUserSession(ctx(t), u, at, time.Time{})
		wantErr(t, fmt.Sprintf("ResumeUserSession(%s in %s)", u.ID, u.Realm), err, sessions.ErrNotFound)
	}
	// After the expiry of every session of u2 there is nothing to resume.
	_, err = st.ResumeUserSession(ctx(t), &sessions.User{ID: "u2", Realm: realmA}, t0.Add(30*24*time.Hour), time.Time{})
	wantErr(t, "ResumeUserSession after the expiry", err, sessions.ErrNotFound)
	if s := mustGet(t, st, "revoked"); s.LastSeenAt.After(t0.Add(2 * time.Minute)) {
		t.Errorf("revoked session was touched: %v", s.LastSeenAt)
	}
}

// AdoptSession moves an anonymous conversation to a new session of the
// user, keeping every message and revoking the anonymous session.
func testUserAdopt(t *testing.T, st sessions.Store) {
	mustCreate(t, st, newSession("anon"))
	msgs := appendN(t, st, "anon", 3)
	at := t0.Add(time.Hour)

	s := userSession("adopted", realmA, "u1", t0)
	s.LastSeenAt = at
	if err := st.AdoptSession(ctx(t), "anon", s, at); err != nil {
		t.Fatal(err)
	}
	if s.MessageCount != 3 {
		t.Errorf("MessageCount = %d, want 3", s.MessageCount)
	}
	got := mustGet(t, st, "adopted")
	if got.MessageCount != 3 || got.User == nil || got.User.ID != "u1" || !timeEqual(got.CreatedAt, t0.Truncate(time.Microsecond)) {
		t.Errorf("adopted session = %+v", got)
	}
	p := mustList(t, st, "adopted", "", 10)
	if !reflect.DeepEqual(ids(p.Messages), ids(msgs)) || p.TotalCount != 3 {
		t.Errorf("adopted history %v, want %v", ids(p.Messages), ids(msgs))
	}
	for i, m := range p.Messages {
		if m.Content != msgs[i].Content || m.Role != msgs[i].Role || m.SessionID != "adopted" {
			t.Errorf("message %d = %+v, want %+v moved", i, m, msgs[i])
		}
	}
	_, err := st.GetSession(ctx(t), "anon")
	wantErr(t, "GetSession of the adopted anonymous session", err, sessions.ErrNotFound)
	if p := mustList(t, st, "anon", "", 10); p.TotalCount != 0 {
		t.Errorf("anonymous session keeps %d messages", p.TotalCount)
	}
	_, err = st.AppendUserMessage(ctx(t), &sessions.Message{SessionID: "anon", Content: "late", CreatedAt: at}, sessions.KindVisitor)
	wantErr(t, "AppendUserMessage to the adopted anonymous session", err, sessions.ErrNotFound)

	// What cannot be adopted: nothing is created, nothing moves.
	mustCreate(t, st, userSession("users", realmA, "u2", t0))
	appendN(t, st, "users", 1)
	exp := newSession("expired")
	exp.ExpiresAt = t0.Add(time.Minute)
	mustCreate(t, st, exp)
	wid := newSession("widget")
	wid.Kind = sessions.KindWidget
	mustCreate(t, st, wid)
	mustCreate(t, st, newSession("anon2"))
	appendN(t, st, "anon2", 2)
	rev := newSession("revoked")
	mustCreate(t, st, rev)
	if err := st.RevokeSession(ctx(t), "revoked", t0); err != nil {
		t.Fatal(err)
	}
	for i, tc := range []struct {
		from, id string
		want     error
	}{
		{"anon", "again", sessions.ErrNotFound},          // revoked by the adoption
		{"users", "steal", sessions.ErrNotFound},         // already a user's
		{"expired", "late", sessions.ErrNotFound},        // expired at at
		{"widget", "w", sessions.ErrNotFound},            // not a visitor session
		{"nobody", "n", sessions.ErrNotFound},            // missing
		{"anon2", "adopted", sessions.ErrExists},         // id taken
		{"anon2", "users", sessions.ErrExists},           // id taken
		{"anon\xff", "unstorable", sessions.ErrNotFound}, // cannot name a session
	} {
		s := userSession(tc.id, realmA, "u3", t0)
		err := st.AdoptSession(ctx(t), tc.from, s, at)
		wantErr(t, fmt.Sprintf("#%d AdoptSession(%s → %s)", i, tc.from, tc.id), err, tc.want)
	}
	if p := mustList(t, st, "anon2", "", 10); p.TotalCount != 2 || mustGet(t, st, "anon2").RevokedAt != nil {
		t.Errorf("a refused adoption changed anon2: %d messages", p.TotalCount)
	}
	if p := mustList(t, st, "users", "", 10); p.TotalCount != 1 {
		t.Errorf("a refused adoption changed users: %d messages", p.TotalCount)
	}
	for _, id := range []string{"again", "steal", "late", "w", "r", "n"} {
		_, err := st.GetSession(ctx(t), id)
		wantErr(t, "GetSession("+id+") after a refused adoption", err, sessions.ErrNotFound)
	}
	if err := st.AdoptSession(ctx(t), "anon2", newSession("no-user"), at); err == nil {
		t.Error("AdoptSession without a user: want an error")
	}
}

// ListUserSessions pages through the user's active conversations, newest
// first, with each one's last message time and preview.
func testUserList(t *testing.T, st sessions.Store) {
	now := t0.Add(time.Hour)
	var want []string // newest first
	for i := range 5 {
		id := fmt.Sprintf("conv-%d", i)
		mustCreate(t, st, userSession(id, realmA, "u1", t0.Add(time.Duration(i)*time.Minute)))
		want = append([]string{id}, want...)
	}
	// Two created in the same microsecond: the id breaks the tie.
	mustCreate(t, st, userSession("tie-a", realmA, "u1", t0.Add(10*time.Minute)))
	mustCreate(t, st, userSession("tie-b", realmA, "u1", t0.Add(10*time.Minute)))
	want = append([]string{"tie-b", "tie-a"}, want...)

	// Not listed: revoked, expired, widget, another realm, another user.
	mustCreate(t, st, userSession("revoked", realmA, "u1", t0.Add(20*time.Minute)))
	if err := st.RevokeSession(ctx(t), "revoked", t0); err != nil {
		t.Fatal(err)
	}
	exp := userSession("expired", realmA, "u1", t0.Add(21*time.Minute))
	exp.ExpiresAt = now
	mustCreate(t, st, exp)
	wid := userSession("widget", realmA, "u1", t0.Add(22*time.Minute))
	wid.Kind = sessions.KindWidget
	mustCreate(t, st, wid)
	mustCreate(t, st, userSession("realm-b", realmB, "u1", t0.Add(23*time.Minute)))
	mustCreate(t, st, userSession("u2", realmA, "u2", t0.Add(24*time.Minute)))

	// conv-2 has messages: an assistant greeting, then a long first user
	// message (the preview, cut to PreviewLength characters), then more.
	long := strings.Repeat("é", sessions.PreviewLength+20)
	for i, m := range []sessions.Message{
		{Role: sessions.RoleAssistant, Content: "Hello! How can I help?"},
		{Role: sessions.RoleUser, Content: long},
		{Role: sessions.RoleAssistant, Content: "Sure."},
		{Role: sessions.RoleUser, Content: "thanks"},
	} {
		m.SessionID = "conv-2"
		m.CreatedAt = t0.Add(time.Duration(30+i) * time.Second)
		if err := st.AppendMessage(ctx(t), &m); err != nil {
			t.Fatal(err)
		}
	}

	var got []string
	before := ""
	for page := 0; ; page++ {
		p, err := st.ListUserSessions(ctx(t), realmA, "u1", before, 3, now)
		if err != nil {
			t.Fatalf("page %d: %v", page, err)
		}
		for _, c := range p.Conversations {
			got = append(got, c.ID)
			if c.ID == "conv-2" {
				if c.MessageCount != 4 || !timeEqual(c.LastMessageAt, t0.Add(33*time.Second).Truncate(time.Microsecond)) {
					t.Errorf("conv-2 = %+v, want 4 messages, the last at t0+33s", c)
				}
				if c.Preview != strings.Repeat("é", sessions.PreviewLength) {
					t.Errorf("conv-2 preview = %q (%d bytes), want the first user message's first %d characters", c.Preview, len(c.Preview), sessions.PreviewLength)
				}
			} else if c.MessageCount != 0 || !c.LastMessageAt.IsZero() || c.Preview != "" {
				t.Errorf("%s = %+v, want no messages", c.ID, c)
			}
			if c.CreatedAt.Location() != time.UTC || c.ExpiresAt.Location() != time.UTC || c.LastSeenAt.IsZero() {
				t.Errorf("%s: times %+v", c.ID, c)
			}
		}
		if wantMore := len(got) < len(want); p.HasMore != wantMore {
			t.Errorf("page %d: HasMore = %v, want %v", page, p.HasMore, wantMore)
		}
		if !p.HasMore {
			break
		}
		before = p.Conversations[len(p.Conversations)-1].ID
	}
	if !reflect.DeepEqual(got, want) {
		t.Errorf("listed %v, want %v", got, want)
	}

	// A cursor must be one of the user's sessions (of any state).
	if p, err := st.ListUserSessions(ctx(t), realmA, "u1", "revoked", 10, now); err != nil || len(p.Conversations) != len(want) {
		t.Errorf("before=revoked (newer than all): %v, %v", p, err)
	}
	for _, before := range []string{"nobody", "u2", "realm-b", "bad\xff"} {
		_, err := st.ListUserSessions(ctx(t), realmA, "u1", before, 10, now)
		wantErr(t, "ListUserSessions before="+before, err, sessions.ErrNotFound)
	}
	// Nobody's list is empty, not an error.
	for _, u := range []string{"nobody", "bad\xff"} {
		if p, err := st.ListUserSessions(ctx(t), realmA, u, "", 10, now); err != nil || len(p.Conversations) != 0 || p.HasMore {
			t.Errorf("ListUserSessions(%q) = %+v, %v; want empty", u, p, err)
		}
	}
}

// DeleteUser erases everything stored of the user in its realm, and
// nothing else.
func testUserDelete(t *testing.T, st sessions.Store) {
	mustCreate(t, st, userSession("a1", realmA, "u1", t0))
	appendN(t, st, "a1", 3)
	mustCreate(t, st, userSession("a2", realmA, "u1", t0.Add(time.Minute)))
	appendN(t, st, "a2", 2)
	if err := st.RevokeToken(ctx(t), "a2", "jti-1", t0); err != nil {
		t.Fatal(err)
	}
	mustCreate(t, st, userSession("a3", realmA, "u1", t0.Add(2*time.Minute)))
	if err := st.RevokeSession(ctx(t), "a3", t0); err != nil {
		t.Fatal(err)
	}
	wid := userSession("aw", realmA, "u1", t0)
	wid.Kind = sessions.KindWidget
	mustCreate(t, st, wid)
	appendN(t, st, "aw", 1)
	// Kept: the same id in another realm, another user, an anonymous session.
	mustCreate(t, st, userSession("b1", realmB, "u1", t0))
	appendN(t, st, "b1", 2)
	mustCreate(t, st, userSession("u2", realmA, "u2", t0))
	appendN(t, st, "u2", 1)
	mustCreate(t, st, newSession("anon"))
	appendN(t, st, "anon", 1)

	ns, nm, err := st.DeleteUser(ctx(t), realmA, "u1")
	if err != nil {
		t.Fatal(err)
	}
	if ns != 4 || nm != 6 {
		t.Errorf("DeleteUser removed %d sessions, %d messages; want 4, 6", ns, nm)
	}
	for _, id := range []string{"a1", "a2", "a3", "aw"} {
		_, err := st.GetSession(ctx(t), id)
		wantErr(t, "GetSession("+id+") after DeleteUser", err, sessions.ErrNotFound)
		if p := mustList(t, st, id, "", 10); p.TotalCount != 0 {
			t.Errorf("%s keeps %d messages", id, p.TotalCount)
		}
	}
	// The revoked token went with its session: a new session of that id
	// starts clean.
	mustCreate(t, st, newSession("a2"))
	if revoked, err := st.TokenRevoked(ctx(t), "a2", "jti-1"); err != nil || revoked {
		t.Errorf("TokenRevoked after DeleteUser = %v, %v; want false", revoked, err)
	}
	for id, n := range map[string]int{"b1": 2, "u2": 1, "anon": 1} {
		if got := mustGet(t, st, id).MessageCount; got != n {
			t.Errorf("%s: MessageCount = %d, want %d", id, got, n)
		}
	}
	if p, err := st.ListUserSessions(ctx(t), realmA, "u1", "", 10, t0); err != nil || len(p.Conversations) != 0 {
		t.Errorf("list after DeleteUser = %+v, %v", p, err)
	}
	stats, err := st.Stats(ctx(t))
	if err != nil {
		t.Fatal(err)
	}
	if stats.Sessions != 4 || stats.Messages != 4 {
		t.Errorf("Stats = %+v, want 4 sessions (b1, u2, anon, the new a2), 4 messages", stats)
	}
	// Idempotent: nothing left, nothing unknown is an error.
	for _, u := range []string{"u1", "nobody", "bad\xff"} {
		if ns, nm, err := st.DeleteUser(ctx(t), realmA, u); err != nil || ns != 0 || nm != 0 {
			t.Errorf("DeleteUser(%q) again = %d, %d, %v; want 0, 0, nil", u, ns, nm, err)
		}
	}
}

// A device's token given up is recorded for its session only, until the
// session goes.
func testRevokeToken(t *testing.T, st sessions.Store) {
	mustCreate(t, st, userSession("s1", realmA, "u1", t0))
	mustCreate(t, st, userSession("s2", realmA, "u1", t0))
	for range 2 { // twice: harmless
		if err := st.RevokeToken(ctx(t), "s1", "jti-a", t0); err != nil {
			t.Fatal(err)
		}
	}
	for _, tc := range []struct {
		session, jti string
		want         bool
	}{
		{"s1", "jti-a", true},
		{"s1", "jti-b", false},
		{"s2", "jti-a", false},
		{"nobody", "jti-a", false},
		{"s1", "bad\xff", false},
	} {
		got, err := st.TokenRevoked(ctx(t), tc.session, tc.jti)
		if err != nil || got != tc.want {
			t.Errorf("TokenRevoked(%s, %s) = %v, %v; want %v", tc.session, tc.jti, got, err, tc.want)
		}
	}
	// The session and its messages are untouched.
	if s := mustGet(t, st, "s1"); s.RevokedAt != nil {
		t.Errorf("RevokeToken revoked the session: %+v", s)
	}
	err := st.RevokeToken(ctx(t), "nobody", "jti-c", t0)
	wantErr(t, "RevokeToken of a missing session", err, sessions.ErrNotFound)
	if err := st.RevokeToken(ctx(t), "s1", "", t0); err == nil {
		t.Error("RevokeToken with an empty token id: want an error")
	}
	// Gone with its session.
	if err := st.DeleteSession(ctx(t), "s1"); err != nil {
		t.Fatal(err)
	}
	mustCreate(t, st, newSession("s1"))
	if got, err := st.TokenRevoked(ctx(t), "s1", "jti-a"); err != nil || got {
		t.Errorf("TokenRevoked after the session was deleted = %v, %v", got, err)
	}
}

// Retention applies to users' sessions as to any: an expired session
// goes with its messages, user details and revoked tokens, and old
// messages go from sessions that stay.
func testUserPurge(t *testing.T, st sessions.Store) {
	cutSessions := t0.Add(24 * time.Hour)
	cutMessages := t0.Add(10 * time.Second)
	gone := userSession("gone", realmA, "u1", t0)
	gone.ExpiresAt = cutSessions.Add(-time.Second)
	mustCreate(t, st, gone)
	appendN(t, st, "gone", 2)
	if err := st.RevokeToken(ctx(t), "gone", "jti-gone", t0); err != nil {
		t.Fatal(err)
	}
	mustCreate(t, st, userSession("stays", realmA, "u1", t0))
	appendN(t, st, "stays", 12) // t0+0..11s: 10 are older than cutMessages

	ns, nm, err := st.Purge(ctx(t), cutSessions, cutMessages)
	if err != nil {
		t.Fatal(err)
	}
	if ns != 1 || nm != 12 {
		t.Errorf("Purge removed %d sessions, %d messages; want 1, 12", ns, nm)
	}
	_, err = st.GetSession(ctx(t), "gone")
	wantErr(t, "GetSession(gone)", err, sessions.ErrNotFound)
	mustCreate(t, st, newSession("gone"))
	if revoked, err := st.TokenRevoked(ctx(t), "gone", "jti-gone"); err != nil || revoked {
		t.Errorf("revoked token outlived its purged session: %v, %v", revoked, err)
	}
	p, err := st.ListUserSessions(ctx(t), realmA, "u1", "", 10, t0)
	if err != nil {
		t.Fatal(err)
	}
	if len(p.Conversations) != 1 || p.Conversations[0].ID != "stays" || p.Conversations[0].MessageCount != 2 {
		t.Errorf("after purge the user has %+v, want stays with 2 messages", p.Conversations)
	}
}

// ResumeUserWidget picks the user's latest active widget conversation on
// the site, never a visitor session or another site's; AdoptSession of a
// widget session moves an anonymous widget conversation only.
func testUserWidget(t *testing.T, st sessions.Store) {
	widget := func(id, realm, userID, site string, created time.Time) *sessions.Session {
		s := userSession(id, realm, userID, created)
		s.Kind, s.Site = sessions.KindWidget, site
		return s
	}
	mustCreate(t, st, widget("w-older", realmA, "u1", "shop.example", t0))
	mustCreate(t, st, widget("w-latest", realmA, "u1", "shop.example", t0.Add(time.Minute)))
	// Each would be picked were it not what it is.
	visitor := userSession("visitor", realmA, "u1", t0.Add(2*time.Minute))
	visitor.Site = "shop.example"
	mustCreate(t, st, visitor)
	mustCreate(t, st, widget("w-other-site", realmA, "u1", "blog.example", t0.Add(3*time.Minute)))
	mustCreate(t, st, widget("w-other-realm", realmB, "u1", "shop.example", t0.Add(4*time.Minute)))
	expired := widget("w-expired", realmA, "u1", "shop.example", t0.Add(5*time.Minute))
	expired.ExpiresAt = t0.Add(6 * time.Minute)
	mustCreate(t, st, expired)

	at := t0.Add(10 * time.Minute)
	u := &sessions.User{ID: "u1", Realm: realmA, Name: "Ada"}
	got, err := st.ResumeUserWidget(ctx(t), u, "shop.example", at, at.Add(time.Hour))
	if err != nil || got.ID != "w-latest" || got.Kind != sessions.KindWidget {
		t.Fatalf("ResumeUserWidget = %+v, %v; want w-latest", got, err)
	}
	if !timeEqual(mustGet(t, st, "w-latest").LastSeenAt, at.Truncate(time.Microsecond)) {
		t.Error("the resumed widget conversation's use was not recorded")
	}
	if got, err := st.ResumeUserWidget(ctx(t), u, "blog.example", at, time.Time{}); err != nil || got.ID != "w-other-site" {
		t.Fatalf("ResumeUserWidget(blog.example) = %+v, %v; want w-other-site", got, err)
	}
	// The visitor kind is untouched by the widget's resume, and the
	// visitor resume never picks a widget conversation.
	if got, err := st.ResumeUserSession(ctx(t), u, at, time.Time{}); err != nil || got.ID != "visitor" {
		t.Fatalf("ResumeUserSession = %+v, %v; want visitor", got, err)
	}
	for _, tc := range []struct {
		u    *sessions.User
		site string
	}{
		{&sessions.User{ID: "u1", Realm: realmA}, "other.example"},
		{&sessions.User{ID: "u1", Realm: realmA}, ""},
		{&sessions.User{ID: "u2", Realm: realmA}, "shop.example"},
		{&sessions.User{ID: "u1", Realm: "chatproxy-visitor:cccc"}, "shop.example"},
	} {
		_, err := st.ResumeUserWidget(ctx(t), tc.u, tc.site, at, time.Time{})
		wantErr(t, fmt.Sprintf("ResumeUserWidget(%s in %s on %q)", tc.u.ID, tc.u.Realm, tc.site), err, sessions.ErrNotFound)
	}

	// Adoption of an anonymous widget conversation into the user's.
	anon := newSession("w-anon")
	anon.Kind, anon.Site = sessions.KindWidget, "shop.example"
	mustCreate(t, st, anon)
	msgs := appendN(t, st, "w-anon", 2)
	s := widget("w-adopted", realmA, "u3", "shop.example", t0)
	if err := st.AdoptSession(ctx(t), "w-anon", s, at); err != nil {
		t.Fatal(err)
	}
	if p := mustList(t, st, "w-adopted", "", 10); !reflect.DeepEqual(ids(p.Messages), ids(msgs)) {
		t.Errorf("adopted widget history %v, want %v", ids(p.Messages), ids(msgs))
	}
	_, err = st.GetSession(ctx(t), "w-anon")
	wantErr(t, "GetSession of the adopted widget conversation", err, sessions.ErrNotFound)
	if got, err := st.ResumeUserWidget(ctx(t), &sessions.User{ID: "u3", Realm: realmA}, "shop.example", at, time.Time{}); err != nil || got.ID != "w-adopted" {
		t.Fatalf("ResumeUserWidget after the adoption = %+v, %v", got, err)
	}
	// A visitor session is not adopted as a widget conversation.
	mustCreate(t, st, newSession("v-anon"))
	appendN(t, st, "v-anon", 1)
	err = st.AdoptSession(ctx(t), "v-anon", widget("w-from-visitor", realmA, "u3", "example.com", t0), at)
	wantErr(t, "AdoptSession of a visitor session into a widget one", err, sessions.ErrNotFound)
}

// DeleteUser of a user with many sessions (more than one batch in
// TestUserDeleteInSmallBatches) removes every one with its messages and
// counts them all, and nothing of anyone else.
func testUserDeleteMany(t *testing.T, st sessions.Store) {
	const n = 23
	for i := range n {
		id := fmt.Sprintf("many-%02d", i)
		mustCreate(t, st, userSession(id, realmA, "u1", t0.Add(time.Duration(i%5)*time.Minute)))
		appendN(t, st, id, 2)
	}
	mustCreate(t, st, userSession("kept", realmA, "u2", t0))
	appendN(t, st, "kept", 1)
	ns, nm, err := st.DeleteUser(ctx(t), realmA, "u1")
	if err != nil || ns != n || nm != 2*n {
		t.Fatalf("DeleteUser = %d sessions, %d messages, %v; want %d, %d", ns, nm, err, n, 2*n)
	}
	for i := range n {
		_, err := st.GetSession(ctx(t), fmt.Sprintf("many-%02d", i))
		wantErr(t, "GetSession after DeleteUser", err, sessions.ErrNotFound)
	}
	if got := mustGet(t, st, "kept").MessageCount; got != 1 {
		t.Errorf("another user's session has %d messages, want 1", got)
	}
	if ns, nm, err := st.DeleteUser(ctx(t), realmA, "u1"); err != nil || ns != 0 || nm != 0 {
		t.Errorf("DeleteUser again = %d, %d, %v; want nothing", ns, nm, err)
	}
}
