package handler

import (
	"strings"
	"testing"
	"time"
)

func TestSocketToken(t *testing.T) {
	key := []byte("0123456789abcdef0123456789abcdef")
	now := time.Unix(1_800_000_000, 0)
	c := socketClaims{Site: "shop.example.com", SessionID: "s-1", ExecutionID: "41", Expires: now.Add(SocketTokenTTL).Unix(), N8nToken: "n8n-tok"}
	tok := signSocketToken(key, c)
	if strings.ContainsAny(tok, "+/=&?# ") {
		t.Fatalf("token %q is not safe in an unencoded query", tok)
	}
	if got, err := parseSocketToken(key, tok, now); err != nil || got != c {
		t.Fatalf("parse: %+v, %v", got, err)
	}
	p, sig, _ := strings.Cut(tok, ".")
	for _, tc := range []struct {
		name, token string
		now         time.Time
		want        error
	}{
		{"expired", tok, now.Add(SocketTokenTTL), errSocketTokenExpired},
		{"other key", signSocketToken([]byte("another key of thirty-two bytes!"), c), now, errSocketTokenInvalid},
		{"no signature", p, now, errSocketTokenInvalid},
		{"signature of another payload", signSocketToken(key, socketClaims{SessionID: "x", ExecutionID: "1", Expires: c.Expires})[:len(p)] + "." + sig, now, errSocketTokenInvalid},
		{"empty", "", now, errSocketTokenInvalid},
		{"too long", strings.Repeat("a", maxSocketToken+1), now, errSocketTokenInvalid},
		{"claims missing", signSocketToken(key, socketClaims{Expires: c.Expires}), now, errSocketTokenInvalid},
	} {
		if _, err := parseSocketToken(key, tc.token, tc.now); err != tc.want {
			t.Errorf("%s: %v, want %v", tc.name, err, tc.want)
		}
	}
}

func TestCheckVisitorFrame(t *testing.T) {
	const sid = "03b2b262"
	for _, tc := range []struct {
		frame string
		ok    bool
		input string
	}{
		{"n8n|heartbeat-ack", true, ""},
		{`{"type":"heartbeat-ack"}`, true, ""},
		{`{"sessionId":"03b2b262","action":"sendMessage","chatInput":"typed reply","files":[]}`, true, "typed reply"},
		{`{"sessionId":"03b2b262","action":"sendMessage","chatInput":" a\r\nb "}`, true, "a\nb"},
		{`{"type":"heartbeat"}`, false, ""},
		{`n8n|heartbeat`, false, ""},
		{`{"sessionId":"other","action":"sendMessage","chatInput":"x","files":[]}`, false, ""},
		{`{"sessionId":"03b2b262","action":"sendMessage","chatInput":"","files":[]}`, false, ""},
		{`{"sessionId":"03b2b262","action":"sendMessage","chatInput":"x","files":[{"name":"a"}]}`, false, ""},
		{`{"sessionId":"03b2b262","action":"sendMessage","files":[]}`, false, ""},
		{`{"sessionId":"03b2b262","action":"sendMessage","chatInput":"x"} {}`, false, ""},
		{`{"sessionId":"03b2b262","action":"sendMessage","chatInput":"` + strings.Repeat("é", 13) + `"}`, false, ""},
		{`[]`, false, ""},
	} {
		f, err := checkVisitorFrame([]byte(tc.frame), sid, 12)
		if (err == nil) != tc.ok || f.chatInput != tc.input {
			t.Errorf("%s: %+v, %v", tc.frame, f, err)
		}
	}
}

func TestClassifyN8nFrame(t *testing.T) {
	for _, tc := range []struct {
		frame string
		kind  n8nFrame
		text  string
	}{
		{"n8n|heartbeat", n8nHeartbeat, ""},
		{`{"type":"heartbeat"}`, n8nHeartbeatJSON, ""},
		{"n8n|continue", n8nContinue, ""},
		{`{"type":"continue"}`, n8nContinue, ""},
		{"first: hello nodes", n8nMessage, "first: hello nodes"},
		{`{"type":"message","text":"hi"}`, n8nMessage, "hi"},
		{`{"type":"with-buttons","text":"Approve?","blockUserInput":false,"buttons":[]}`, n8nMessage, "Approve?"},
		{`{"type":"error","message":"Connection rejected"}`, n8nError, ""},
		{`{"answer":42}`, n8nMessage, `{"answer":42}`},
	} {
		if k, text := classifyN8nFrame([]byte(tc.frame)); k != tc.kind || text != tc.text {
			t.Errorf("%s: %d %q", tc.frame, k, text)
		}
	}
}

func FuzzSocketToken(f *testing.F) {
	key := []byte("0123456789abcdef0123456789abcdef")
	now := time.Unix(1_800_000_000, 0)
	f.Add(signSocketToken(key, socketClaims{Site: "a", SessionID: "b", ExecutionID: "1", Expires: now.Unix() + 60}))
	f.Add("e30.AAAA")
	f.Add("")
	f.Fuzz(func(t *testing.T, tok string) {
		c, err := parseSocketToken(key, tok, now)
		if err != nil {
			return
		}
		// Whatever parses was signed with key: signing its claims again
		// gives a token that parses to the same claims.
		if c2, err := parseSocketToken(key, signSocketToken(key, c), now); err != nil || c2 != c {
			t.Fatalf("re-signed %+v: %+v %v", c, c2, err)
		}
	})
}

func FuzzVisitorFrame(f *testing.F) {
	f.Add([]byte(`{"sessionId":"s","action":"sendMessage","chatInput":"hi","files":[]}`))
	f.Add([]byte("n8n|heartbeat-ack"))
	f.Add([]byte(`{"type":"heartbeat-ack"}`))
	f.Fuzz(func(t *testing.T, data []byte) {
		fr, err := checkVisitorFrame(data, "s", 100)
		if err != nil {
			return
		}
		if !fr.ack && (fr.chatInput == "" || len([]rune(fr.chatInput)) > 100) {
			t.Fatalf("accepted %q as %+v", data, fr)
		}
		_, _ = classifyN8nFrame(data)
	})
}
