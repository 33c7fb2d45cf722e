package chatproxy

import (
	"context"
	"crypto/hmac"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"io"
	"net/http"
	"net/http/cookiejar"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/golang-jwt/jwt/v5"

	"github.com/chatproxy/caddy-chatproxy/internal/testkit"
	"github.com/chatproxy/caddy-chatproxy/signed"
)

// A verified user end to end through the module: the site's user_hash at
// create, two browsers (two cookie jars) on one conversation, sign-out on
// one of them, and the site's signed erasure.

const (
	vuIdentitySecret = "test-identity-secret-for-verified-users-0123456789"
	vuErasureSecret  = "test-erasure-secret-for-verified-users-0123456789"
)

// vuOrigin is the page's origin: a site of its own, so that the metrics
// this test reads are not moved by the tests that run in parallel.
const (
	vuOrigin = "https://verified-users.example.com"
	vuSite   = "verified-users.example.com"
)

// vuBrowser is one device: a client with its own cookie jar, sending the
// allowed Origin as a page of the site would.
type vuBrowser struct {
	e      *chatEnv
	client *http.Client
}

func newVUBrowser(t *testing.T, e *chatEnv) *vuBrowser {
	t.Helper()
	jar, err := cookiejar.New(nil)
	if err != nil {
		t.Fatal(err)
	}
	c := &http.Client{Jar: jar, Transport: &http.Transport{DisableCompression: true}}
	t.Cleanup(c.CloseIdleConnections)
	return &vuBrowser{e: e, client: c}
}

func (b *vuBrowser) do(t *testing.T, method, path, body string, headers map[string]string) (int, []byte) {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 15*time.Second)
	defer cancel()
	var rd io.Reader
	if body != "" {
		rd = strings.NewReader(body)
	}
	r, err := http.NewRequestWithContext(ctx, method, b.e.srv.URL+path, rd)
	if err != nil {
		t.Fatal(err)
	}
	if body != "" {
		r.Header.Set("Content-Type", "application/json")
	}
	r.Header.Set("User-Agent", chatUA)
	r.Header.Set("Origin", vuOrigin)
	for k, v := range headers {
		r.Header.Set(k, v)
	}
	resp, err := b.client.Do(r)
	if err != nil {
		t.Fatalf("%s %s: %v", method, path, err)
	}
	defer resp.Body.Close()
	out, err := io.ReadAll(resp.Body)
	if err != nil {
		t.Fatal(err)
	}
	return resp.StatusCode, out
}

// signIn creates a session with the site's proof of userID; the cookie
// lands in the jar.
func (b *vuBrowser) signIn(t *testing.T, userID, name string) created {
	t.Helper()
	mac := hmac.New(sha256.New, []byte(vuIdentitySecret))
	mac.Write([]byte(userID))
	body, _ := json.Marshal(map[string]string{"user_id": userID, "user_hash": hex.EncodeToString(mac.Sum(nil)), "name": name})
	code, out := b.do(t, "POST", "/api/v1/session/create", string(body), nil)
	if code != http.StatusCreated {
		t.Fatalf("create for %s: %d %s", userID, code, out)
	}
	var c created
	if err := json.Unmarshal(out, &c); err != nil {
		t.Fatal(err)
	}
	return c
}

func (b *vuBrowser) say(t *testing.T, message string) {
	t.Helper()
	body, _ := json.Marshal(map[string]string{"message": message})
	if code, out := b.do(t, "POST", "/api/v1/chat/message", string(body), map[string]string{"Accept": "application/json"}); code != http.StatusOK {
		t.Fatalf("chat message %q: %d %s", message, code, out)
	}
}

// history returns the conversation as "role:content" lines, or the
// status when it is refused.
func (b *vuBrowser) history(t *testing.T) (int, []string) {
	t.Helper()
	code, out := b.do(t, "GET", "/api/v1/chat/history", "", nil)
	if code != http.StatusOK {
		return code, nil
	}
	var h struct {
		Messages []struct{ Role, Content string } `json:"messages"`
	}
	if err := json.Unmarshal(out, &h); err != nil {
		t.Fatal(err)
	}
	var lines []string
	for _, m := range h.Messages {
		lines = append(lines, m.Role+":"+m.Content)
	}
	return code, lines
}

func vuWantHistory(t *testing.T, who string, b *vuBrowser, want ...string) {
	t.Helper()
	code, got := b.history(t)
	if code != http.StatusOK || strings.Join(got, "|") != strings.Join(want, "|") {
		t.Errorf("%s's history: %d %q, want %q", who, code, got, want)
	}
}

func TestVerifiedUserTwoBrowsers(t *testing.T) {
	for _, kind := range storeKinds {
		t.Run(kind, func(t *testing.T) {
			e := newChatEnv(t, chatEnvOpts{kind: kind, mutate: func(cp *ChatProxy) {
				cp.IdentitySecret = vuIdentitySecret
				cp.ErasureSecret = vuErasureSecret
				cp.AllowedOrigins = append(cp.AllowedOrigins, vuOrigin)
			}})
			e.fake.SetScript(testkit.Output("Hello!"))
			// A continued conversation is not a created session.
			created := mx("sessions_created_total", "kind", "visitor", "site", vuSite)
			d := mxWatch(t, created)

			laptop, phone := newVUBrowser(t, e), newVUBrowser(t, e)
			onLaptop := laptop.signIn(t, "user-42", "Ada")
			laptop.say(t, "from the laptop")
			onPhone := phone.signIn(t, "user-42", "Ada")
			if onPhone.SessionID != onLaptop.SessionID {
				t.Fatalf("the phone got session %s, the laptop %s: want one conversation", onPhone.SessionID, onLaptop.SessionID)
			}
			vuWantHistory(t, "phone", phone, "user:from the laptop", "assistant:Hello!")
			phone.say(t, "from the phone")
			both := []string{"user:from the laptop", "assistant:Hello!", "user:from the phone", "assistant:Hello!"}
			vuWantHistory(t, "laptop", laptop, both...)

			// Another user, in a third browser, has a conversation of their own.
			other := newVUBrowser(t, e)
			if c := other.signIn(t, "user-7", "Grace"); c.SessionID == onLaptop.SessionID {
				t.Fatal("another user was given Ada's conversation")
			}
			other.say(t, "grace here")

			// Signing out on the phone leaves the laptop and the conversation.
			if code, out := phone.do(t, "DELETE", "/api/v1/session", "", nil); code != http.StatusNoContent {
				t.Fatalf("destroy on the phone: %d %s", code, out)
			}
			if code, _ := phone.history(t); code != http.StatusUnauthorized {
				t.Errorf("the phone's history after signing out: %d, want 401", code)
			}
			vuWantHistory(t, "laptop after the phone signed out", laptop, both...)

			// The site erases Ada: both her browsers lose the conversation.
			body := `{"user_id":"user-42"}`
			ts, sig := signed.Sign([]byte(vuErasureSecret), []byte(body), time.Now())
			rec := e.serve(t, "DELETE", "/api/v1/user/data", body, map[string]string{signed.HeaderTimestamp: ts, signed.HeaderSignature: sig})
			if rec.Code != http.StatusNoContent {
				t.Fatalf("erasure: %d %s", rec.Code, rec.Body)
			}
			if code, _ := laptop.history(t); code != http.StatusUnauthorized {
				t.Errorf("the laptop's history after the erasure: %d, want 401", code)
			}
			if again := laptop.signIn(t, "user-42", "Ada"); again.SessionID == onLaptop.SessionID {
				t.Error("after the erasure Ada's old conversation came back")
			}
			vuWantHistory(t, "laptop after signing in again", laptop)
			vuWantHistory(t, "grace", other, "user:grace here", "assistant:Hello!")
			d.want(map[mxKey]float64{created: 3}) // Ada, Grace, Ada after the erasure; not the phone
		})
	}
}

// Without erasure_secret there is no erasure route to call, even with
// identity_secret set.
func TestVerifiedUserErasureNeedsErasureSecret(t *testing.T) {
	cp := newTestProxy(t, "sqlite", func(cp *ChatProxy) { cp.IdentitySecret = vuIdentitySecret })
	body := `{"user_id":"user-42"}`
	for _, secret := range []string{vuIdentitySecret, vuErasureSecret} {
		ts, sig := signed.Sign([]byte(secret), []byte(body), time.Now())
		wantError(t, serve(t, cp, req{method: "DELETE", path: "/api/v1/user/data", body: body,
			headers: map[string]string{signed.HeaderTimestamp: ts, signed.HeaderSignature: sig, "Content-Type": "application/json"}}),
			http.StatusNotFound, "not_found")
	}
}

// A site hands its visitors user_hash values: HMACs of their user ids
// under identity_secret. A visitor whose chosen user id is
// `<timestamp>.{"user_id":"victim"}` is therefore handed, as their
// user_hash, exactly the signature of an erasure of "victim" under
// identity_secret. Signing erasures with a key of their own closes that:
// the forged call is refused and the victim keeps their conversation.
func TestErasureNotForgeableFromUserHash(t *testing.T) {
	for _, kind := range storeKinds {
		t.Run(kind, func(t *testing.T) {
			e := newChatEnv(t, chatEnvOpts{kind: kind, mutate: func(cp *ChatProxy) {
				cp.IdentitySecret = vuIdentitySecret
				cp.ErasureSecret = vuErasureSecret
				cp.AllowedOrigins = append(cp.AllowedOrigins, vuOrigin)
			}})
			e.fake.SetScript(testkit.Output("Hello!"))
			victim := newVUBrowser(t, e)
			victim.signIn(t, "victim", "Vic")
			victim.say(t, "my data")

			// The attacker registers the crafted id and signs in: the
			// proxy accepts it (any id is valid), and the site computed
			// its user_hash.
			body := `{"user_id":"victim"}`
			ts := strconv.FormatInt(time.Now().Unix(), 10)
			crafted := ts + "." + body
			attacker := newVUBrowser(t, e)
			attacker.signIn(t, crafted, "Mallory")
			mac := hmac.New(sha256.New, []byte(vuIdentitySecret))
			mac.Write([]byte(crafted))
			userHash := hex.EncodeToString(mac.Sum(nil))

			rec := e.serve(t, "DELETE", "/api/v1/user/data", body, map[string]string{
				signed.HeaderTimestamp: ts, signed.HeaderSignature: "sha256=" + userHash})
			if rec.Code != http.StatusUnauthorized {
				t.Fatalf("erasure signed with a user_hash: %d %s, want 401", rec.Code, rec.Body)
			}
			vuWantHistory(t, "the victim after the forged erasure", victim, "user:my data", "assistant:Hello!")
		})
	}
}

// identity_proofs user_hash: a site that hashes ids its visitors choose
// accepts no identity_token, so a token signed by a handed-out user_hash
// gets nowhere (identity.TestRestrictClosesHashTokenForgery shows the
// forgery); its hashes still work.
func TestIdentityProofsRestricted(t *testing.T) {
	e := newChatEnv(t, chatEnvOpts{kind: "sqlite", mutate: func(cp *ChatProxy) {
		cp.IdentitySecret = vuIdentitySecret
		cp.IdentityProofs = []string{"user_hash"}
		cp.AllowedOrigins = append(cp.AllowedOrigins, vuOrigin)
	}})
	tok, err := jwt.NewWithClaims(jwt.SigningMethodHS256, jwt.MapClaims{"sub": "user-42", "exp": time.Now().Add(time.Hour).Unix()}).
		SignedString([]byte(vuIdentitySecret))
	if err != nil {
		t.Fatal(err)
	}
	b := newVUBrowser(t, e)
	code, out := b.do(t, "POST", "/api/v1/session/create", `{"identity_token":"`+tok+`"}`, nil)
	if code != http.StatusUnauthorized || !strings.Contains(string(out), "invalid_identity") {
		t.Fatalf("a token where only user_hash is accepted: %d %s, want 401 invalid_identity", code, out)
	}
	b.signIn(t, "user-42", "Ada") // fails the test unless 201
}
