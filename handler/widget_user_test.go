package handler_test

import (
	"io"
	"net/http"
	"testing"

	"github.com/chatproxy/caddy-chatproxy/identity"
	"github.com/chatproxy/caddy-chatproxy/internal/testkit"
)

// TestWidgetUserDevices: a verified user's @n8n/chat conversation follows
// the user, not the widget's sessionId (issue 16, item 3). Two devices
// (two widgets with their own sessionIds) proving one user see one
// conversation and append to it; an anonymous conversation with messages
// is adopted by the first verified request of the same browser, so a
// visitor who logs in keeps it; a sessionId without the proof reaches
// none of it. Both stores.
func TestWidgetUserDevices(t *testing.T) {
	t.Parallel()
	for _, kind := range storeKinds {
		t.Run(kind, func(t *testing.T) {
			t.Parallel()
			e, _ := identityEnv(t, kind, false, nil)
			e.fake.SetScript(testkit.Output("hello"))
			h := map[string]string{"Origin": allowedOrigin, "Content-Type": "application/json"}
			proof := func(user string) map[string]any {
				return map[string]any{"user_id": user, "user_hash": identity.Hash([]byte(testIdentitySecret), user)}
			}
			send := func(sid string, meta map[string]any) string {
				t.Helper()
				rec := e.serve(t, "POST", "/api/v1/n8n/chat", widgetBody("sendMessage", sid, meta), h)
				if rec.Code != http.StatusOK {
					t.Fatalf("sendMessage %s: %d %s", sid, rec.Code, rec.Body)
				}
				return e.fake.Last(t).Body.SessionID
			}
			const phone, laptop = "widget-device-phone-01", "widget-device-laptop-1"

			// Device one starts the user's conversation.
			first := send(phone, proof("user-7"))
			// Device two, another sessionId, same proof: the history is
			// the conversation, and its message goes to it.
			if got := e.widgetLoadMeta(t, laptop, proof("user-7")); len(got) != 2 {
				t.Fatalf("second device's history: %d messages, want 2", len(got))
			}
			if second := send(laptop, proof("user-7")); second != first {
				t.Fatalf("second device's message went to conversation %s, want %s", second, first)
			}
			if got := e.widgetLoadMeta(t, phone, proof("user-7")); len(got) != 4 {
				t.Fatalf("first device's history: %d messages, want 4 (both devices')", len(got))
			}
			// Knowing a sessionId is not enough: without the proof, either
			// device's sessionId is an empty anonymous conversation, and
			// another user's proof does not reach it either.
			for _, sid := range []string{phone, laptop} {
				if got := e.widgetLoadMeta(t, sid, map[string]any{}); len(got) != 0 {
					t.Fatalf("anonymous history of %s: %d messages, want none", sid, len(got))
				}
				if got := e.widgetLoadMeta(t, sid, proof("user-8")); len(got) != 0 {
					t.Fatalf("another user's history of %s: %d messages, want none", sid, len(got))
				}
			}

			// Anonymous, then logged in, in one browser: the conversation
			// is kept (adopted), and its anonymous sessionId alone no
			// longer reaches it.
			const shop = "widget-device-shop-001"
			anon := send(shop, map[string]any{})
			if got := e.widgetLoadMeta(t, shop, proof("user-9")); len(got) != 2 {
				t.Fatalf("history after login: %d messages, want the anonymous 2", len(got))
			}
			adopted := send(shop, proof("user-9"))
			if adopted == anon {
				t.Fatal("the adopted conversation kept the id its sessionId names")
			}
			if got := e.widgetLoadMeta(t, shop, proof("user-9")); len(got) != 4 {
				t.Fatalf("history after login and a message: %d messages, want 4", len(got))
			}
			if got := e.widgetLoadMeta(t, shop, map[string]any{}); len(got) != 0 {
				t.Fatalf("anonymous history after the adoption: %d messages, want none", len(got))
			}
			// Another device of that user continues it too.
			if again := send("widget-device-other-01", proof("user-9")); again != adopted {
				t.Fatalf("another device's message went to %s, want the adopted %s", again, adopted)
			}
			s, err := e.store.GetSession(t.Context(), adopted)
			if err != nil || s.User == nil || s.User.ID != "user-9" || s.MessageCount != 6 {
				t.Fatalf("adopted conversation %+v, %v", s, err)
			}
			if _, err := e.store.GetSession(t.Context(), anon); err == nil {
				t.Fatal("the anonymous conversation is still stored after its adoption")
			}
		})
	}
}

// TestReplyStreamingWhileAdopted: a reply still streaming when the
// visitor signs in (their anonymous conversation adopted by the user) is
// stored, whole, in the user's conversation when it ends; it was looked
// for under the anonymous session's id and lost. Both stores.
func TestReplyStreamingWhileAdopted(t *testing.T) {
	t.Parallel()
	for _, kind := range storeKinds {
		t.Run(kind, func(t *testing.T) {
			t.Parallel()
			e, _ := identityEnv(t, kind, false, nil)
			anon := e.newSession(t)
			gate := testkit.NewStreamGate()
			id, _, resp := e.startGated(t, t.Context(), anon.Token, gate, "Hello ", "Ada")
			defer resp.Body.Close()

			// Signing in in the same browser (it holds the anonymous token).
			body := jsonString(map[string]any{"user_id": "user-5", "user_hash": identity.Hash([]byte(testIdentitySecret), "user-5")})
			rec := e.serve(t, "POST", "/api/v1/session/create", body, authz(anon.Token, "Origin", allowedOrigin))
			if rec.Code != http.StatusCreated {
				t.Fatalf("create: %d %s", rec.Code, rec.Body)
			}
			user := decode[created](t, rec)
			if user.SessionID == anon.SessionID {
				t.Fatal("the anonymous session was not adopted")
			}
			gate.Next(t)
			gate.Next(t)
			if _, err := io.Copy(io.Discard, resp.Body); err != nil {
				t.Fatal(err)
			}
			e.waitIdle(t)
			h := e.history(t, user.Token)
			if len(h.Messages) != 2 || h.Messages[1].ID != id || h.Messages[1].Content != "Hello Ada" || h.Messages[1].Status != "complete" {
				t.Fatalf("the user's conversation after the reply ended: %+v; want the reply %s stored whole", h.Messages, id)
			}
		})
	}
}
