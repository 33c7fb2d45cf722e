package handler

import (
	"crypto/sha256"
	"encoding/base64"
	"encoding/hex"
	"encoding/json"
	"errors"
	"strings"
	"testing"
	"time"

	"github.com/chatproxy/caddy-chatproxy/upload"
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
	// A verified user's conversation: the user id travels in the token.
	cu := c
	cu.User = "user-42"
	if got, err := parseSocketToken(key, signSocketToken(key, cu), now); err != nil || got != cu {
		t.Fatalf("parse with a user: %+v, %v", got, err)
	}
	// The conversation a socket's messages go to: a verified user's is
	// the one the token names (found by the user, whatever the widget's
	// sessionId); an anonymous widget's is named by its sessionId, and a
	// conversation claim without a user is never followed.
	cc := cu
	cc.Conversation = "w_USERSCONVERSATION"
	if got, err := parseSocketToken(key, signSocketToken(key, cc), now); err != nil || got != cc || got.storeID() != "w_USERSCONVERSATION" {
		t.Fatalf("parse with a conversation: %+v, %v", got, err)
	}
	for _, tc := range []struct {
		c    socketClaims
		want string
	}{
		{c, widgetSessionID(c.Site, c.SessionID, "")},
		{cu, widgetSessionID(c.Site, c.SessionID, "user-42")},
		{socketClaims{Site: c.Site, SessionID: c.SessionID, Conversation: "w_USERSCONVERSATION"}, widgetSessionID(c.Site, c.SessionID, "")},
	} {
		if got := tc.c.storeID(); got != tc.want {
			t.Errorf("storeID of %+v = %s, want %s", tc.c, got, tc.want)
		}
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
		{`{"TYPE":"heartbeat-ack"}`, false, ""},
		{`{"type":"heartbeat-ack","type":"heartbeat-ack"}`, false, ""},
		{`{"type": "heartbeat-ack"` + strings.Repeat(" ", maxAckFrame) + `}`, false, ""}, // no ack is that long
		{`n8n|heartbeat`, false, ""},
		{`{"sessionId":"other","action":"sendMessage","chatInput":"x","files":[]}`, false, ""},
		{`{"sessionId":"03b2b262","action":"sendMessage","chatInput":"","files":[]}`, false, ""},
		{`{"sessionId":"03b2b262","action":"sendMessage","chatInput":"x","files":[{"name":"a"}]}`, false, ""},
		{`{"sessionId":"03b2b262","action":"sendMessage","files":[]}`, false, ""},
		{`{"sessionId":"03b2b262","action":"sendMessage","chatInput":"x"} {}`, false, ""},
		{`{"sessionId":"03b2b262","action":"sendMessage","chatInput":"` + strings.Repeat("é", 13) + `"}`, false, ""},
		{`[]`, false, ""},
	} {
		f, err := checkVisitorFrame([]byte(tc.frame), sid, 12, nil)
		if (err == nil) != tc.ok || f.chatInput != tc.input {
			t.Errorf("%s: %+v, %v", tc.frame, f, err)
		}
	}
}

// Files in an answer: checked against the uploads block as the multipart
// route checks them; without one, any file is refused as uploads_disabled.
func TestCheckVisitorFrameFiles(t *testing.T) {
	const sid = "03b2b262"
	p, err := upload.NewParser(upload.Config{MaxFiles: 2, MaxFileSize: 100, MaxTotal: 150, AllowedTypes: []string{"text/csv", "image/png"}})
	if err != nil {
		t.Fatal(err)
	}
	frame := func(files ...map[string]any) []byte {
		b, _ := json.Marshal(map[string]any{"sessionId": sid, "action": "sendMessage", "chatInput": "see file", "files": files})
		return b
	}
	csv := func(name, body string) map[string]any {
		return map[string]any{"name": name, "type": "text/csv", "data": "data:text/csv;base64," + base64.StdEncoding.EncodeToString([]byte(body))}
	}
	sum := sha256.Sum256([]byte("a,b\n1,2\n"))
	f, err := checkVisitorFrame(frame(csv("answer.csv", "a,b\n1,2\n")), sid, 100, p)
	if err != nil || f.chatInput != "see file" || len(f.files) != 1 ||
		f.files[0] != (upload.Info{Name: "answer.csv", Type: "text/csv", Size: 8, SHA256: hex.EncodeToString(sum[:])}) {
		t.Fatalf("accepted file: %+v, %v", f, err)
	}
	if f, err := checkVisitorFrame(frame(), sid, 100, nil); err != nil || len(f.files) != 0 {
		t.Fatalf("files [] without uploads: %+v, %v", f, err)
	}
	for _, tc := range []struct {
		name   string
		frame  []byte
		p      *upload.Parser
		reason upload.Reason // "" for a refusal of the frame itself
	}{
		{"uploads off", frame(csv("a.csv", "a")), nil, upload.ReasonDisabled},
		{"too many", frame(csv("a.csv", "a"), csv("b.csv", "b"), csv("c.csv", "c")), p, upload.ReasonTooMany},
		{"too big", frame(csv("a.csv", strings.Repeat("a", 101))), p, upload.ReasonTooLarge},
		{"too big together", frame(csv("a.csv", strings.Repeat("a", 100)), csv("b.csv", strings.Repeat("b", 51))), p, upload.ReasonTotal},
		{"type not allowed", frame(map[string]any{"name": "a.pdf", "type": "application/pdf", "data": "data:application/pdf;base64,JVBERi0xLjQK"}), p, upload.ReasonType},
		{"png declared, text inside", frame(map[string]any{"name": "a.png", "type": "image/png", "data": "data:image/png;base64,aGVsbG8="}), p, upload.ReasonMismatch},
		{"malformed data URL", frame(map[string]any{"name": "a.csv", "type": "text/csv", "data": "data:text/csv,a%2Cb"}), p, upload.ReasonDataURL},
		{"no data", frame(map[string]any{"name": "a.csv", "type": "text/csv"}), p, ""},
		{"data not a string", frame(map[string]any{"name": "a.csv", "type": "text/csv", "data": 1}), p, ""},
		{"unknown file field", frame(map[string]any{"name": "a.csv", "type": "text/csv", "data": "data:text/csv;base64,YQ==", "path": "/etc"}), p, ""},
		// The frame goes to n8n as it came, and n8n reads it with
		// JSON.parse, where "files" and "Files" are two fields and the
		// last of two "files" wins: a key the checks would read other than
		// n8n does is refused, so what is checked is what n8n gets.
		{"files hidden behind Files", []byte(`{"sessionId":"` + sid + `","action":"sendMessage","chatInput":"x",` +
			`"files":[{"name":"a.exe","type":"application/x-msdownload","data":"data:application/x-msdownload;base64,TVqQAAM="}],"Files":[]}`), p, ""},
		{"data behind DATA", []byte(`{"sessionId":"` + sid + `","action":"sendMessage","chatInput":"x","files":[{"name":"a.csv","type":"text/csv",` +
			`"data":"data:application/x-msdownload;base64,TVqQAAM=","DATA":"data:text/csv;base64,YQ=="}]}`), p, ""},
		{"files twice", []byte(`{"sessionId":"` + sid + `","action":"sendMessage","chatInput":"x",` +
			`"files":[{"name":"a.csv","type":"text/csv","data":"data:text/csv;base64,YQ=="}],"files":[]}`), p, ""},
		{"another session behind SessionId", []byte(`{"sessionId":"other","SessionId":"` + sid + `","action":"sendMessage","chatInput":"x"}`), p, ""},
		{"long input behind CHATINPUT", []byte(`{"sessionId":"` + sid + `","action":"sendMessage","chatInput":"` +
			strings.Repeat("a", 500) + `","CHATINPUT":"short"}`), p, ""},
		{"data after the object", []byte(`{"sessionId":"` + sid + `","action":"sendMessage","chatInput":"x"}]`), p, ""},
	} {
		f, err := checkVisitorFrame(tc.frame, sid, 100, tc.p)
		var ue *upload.Error
		switch {
		case err == nil:
			t.Errorf("%s: accepted %+v", tc.name, f)
		case tc.reason == "" && errors.As(err, &ue):
			t.Errorf("%s: %v is an upload refusal, want a frame refusal", tc.name, err)
		case tc.reason != "" && (!errors.As(err, &ue) || ue.Reason != tc.reason):
			t.Errorf("%s: %v, want %s", tc.name, err, tc.reason)
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

// FuzzVisitorFrame: whatever the widget sends, the frame is accepted or
// refused without a panic; an accepted answer has a valid message, and
// files only within the uploads limits, each one a data URL of the
// frame that decodes to what was checked.
func FuzzVisitorFrame(f *testing.F) {
	f.Add([]byte(`{"sessionId":"s","action":"sendMessage","chatInput":"hi","files":[]}`))
	f.Add([]byte("n8n|heartbeat-ack"))
	f.Add([]byte(`{"type":"heartbeat-ack"}`))
	f.Add([]byte(`{"sessionId":"s","action":"sendMessage","chatInput":"reply with a file","files":[{"name":"answer.csv","type":"text/csv","data":"data:text/csv;base64,YSxiXG4xLDI="}]}`))
	f.Add([]byte(`{"sessionId":"s","action":"sendMessage","chatInput":"x","files":[{"name":"a.png","type":"image/png","data":"data:image/png;base64,iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR42mNkYPhfDwAChwGA60e6kgAAAABJRU5ErkJggg=="}]}`))
	p, err := upload.NewParser(upload.Config{MaxFiles: 2, MaxFileSize: 1 << 10, MaxTotal: 3 << 9, AllowedTypes: []string{"text/csv", "image/png"}})
	if err != nil {
		f.Fatal(err)
	}
	f.Fuzz(func(t *testing.T, data []byte) {
		fr, err := checkVisitorFrame(data, "s", 100, p)
		if err != nil {
			return
		}
		if !fr.ack && (fr.chatInput == "" || len([]rune(fr.chatInput)) > 100) {
			t.Fatalf("accepted %q as %+v", data, fr)
		}
		// n8n reads the relayed frame with exact-case keys: an accepted
		// answer has no key the checks would have read another way.
		var keys map[string]json.RawMessage
		if !fr.ack && json.Unmarshal(data, &keys) == nil {
			for k := range keys {
				if k != "sessionId" && k != "action" && k != "chatInput" && k != "files" {
					t.Fatalf("accepted %q with key %q", data, k)
				}
			}
		}
		if len(fr.files) > 0 {
			var m struct {
				Files []struct{ Data string }
			}
			if err := json.Unmarshal(data, &m); err != nil || len(m.Files) != len(fr.files) || len(fr.files) > 2 {
				t.Fatalf("accepted %d files from %q (%v)", len(fr.files), data, err)
			}
			var total int64
			for i, in := range fr.files {
				_, b64, err := upload.ParseDataURL(m.Files[i].Data)
				raw, derr := base64.StdEncoding.DecodeString(b64)
				sum := sha256.Sum256(raw)
				if err != nil || derr != nil || int64(len(raw)) != in.Size || in.SHA256 != hex.EncodeToString(sum[:]) {
					t.Fatalf("file %d accepted as %+v from %q", i, in, m.Files[i].Data)
				}
				total += in.Size
			}
			if total > 3<<9 {
				t.Fatalf("accepted %d bytes of files", total)
			}
		}
		if !fr.ack && len(fr.files) == 0 {
			if _, err := checkVisitorFrame(data, "s", 100, nil); err != nil {
				t.Fatalf("accepted with uploads on, refused with them off: %v", err)
			}
		}
		_, _ = classifyN8nFrame(data)
	})
}
