package chatproxy

import (
	"context"
	"crypto/sha256"
	"encoding/base64"
	"encoding/hex"
	"encoding/json"
	"errors"
	"strings"
	"testing"
	"time"

	"github.com/coder/websocket"

	"github.com/chatproxy/caddy-chatproxy/internal/testkit"
	"github.com/chatproxy/caddy-chatproxy/upload"
)

// A PNG of one pixel, as a browser would send it.
var onePixelPNG, _ = base64.StdEncoding.DecodeString("iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR42mNkYPhfDwAChwGA60e6kgAAAABJRU5ErkJggg==")

// socketFile is a file of an answer as the widget sends it over the
// socket (Input.vue: name, File.type, FileReader.readAsDataURL).
func socketFile(name, mt string, b []byte) map[string]any {
	return map[string]any{"name": name, "type": mt, "data": "data:" + mt + ";base64," + base64.StdEncoding.EncodeToString(b)}
}

// answerFrame is the widget's answer frame, serialised as JSON.stringify
// does (no HTML escaping).
func answerFrame(t *testing.T, sessionID, text string, files ...map[string]any) string {
	t.Helper()
	if files == nil {
		files = []map[string]any{}
	}
	var b strings.Builder
	enc := json.NewEncoder(&b)
	enc.SetEscapeHTML(false)
	if err := enc.Encode(map[string]any{"sessionId": sessionID, "action": "sendMessage", "chatInput": text, "files": files}); err != nil {
		t.Fatal(err)
	}
	return strings.TrimSuffix(b.String(), "\n")
}

// answerOnSocket opens the widget's socket for a new execution, waits for
// the workflow's question, sends frame (SID in it replaced by the session
// id) and reads until the socket closes: it returns the close, the
// execution and the exact frame sent.
func (e *socketEnv) answerOnSocket(t *testing.T, sid, frame string) (websocket.CloseError, testkit.ChatExecution, string) {
	t.Helper()
	frame = strings.ReplaceAll(frame, "SID", sid)
	st := e.post(t, sid, "start")
	c, _, err := e.dial(t, socketQuery(sid, st.ExecutionID, st.ResumeToken), allowedOrigin)
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	defer cancel()
	var ce websocket.CloseError
	for {
		_, data, err := c.Read(ctx)
		if err != nil {
			if !errors.As(err, &ce) {
				ce.Code = -1
			}
			break
		}
		switch string(data) {
		case "n8n|heartbeat":
			_ = c.Write(ctx, websocket.MessageText, []byte("n8n|heartbeat-ack"))
		case "Send the file, please":
			if err := c.Write(ctx, websocket.MessageText, []byte(frame)); err != nil {
				t.Fatal(err)
			}
		}
	}
	ex, _ := e.n8n.Execution(st.ExecutionID)
	return ce, ex, frame
}

// Files in the visitor's answer over the socket: the uploads limits of
// the multipart route apply to the decoded data URLs; an accepted answer
// reaches n8n byte for byte as the widget sent it and is stored with its
// files' names, types, sizes and hashes; anything else closes the socket
// (1008, or 1009 for sizes) and nothing of it reaches n8n.
func TestChatSocketFiles(t *testing.T) {
	workflow := fastN8n(testkit.ChatStep{Wait: true, Text: "Send the file, please"}, testkit.ChatStep{Text: "got {reply}"})
	limits := &upload.Config{MaxFiles: 2, MaxFileSize: 2 << 10, MaxTotal: 3 << 10, AllowedTypes: []string{"image/png", "text/csv"}}
	on := newSocketEnv(t, "sqlite", workflow, func(cp *ChatProxy) { cp.Uploads = limits })
	off := newSocketEnv(t, "sqlite", workflow, nil)

	csv := []byte("city,visits\nZürich,3\n")
	pngOf := func(n int) []byte { // a PNG head padded to n bytes
		b := make([]byte, n)
		copy(b, onePixelPNG)
		return b
	}
	for i, tc := range []struct {
		name   string
		env    *socketEnv
		frame  string
		code   websocket.StatusCode // 0: accepted
		reason string               // in the close reason
		metric string               // upload_files_total result that moves by one
	}{
		{"a PNG and a CSV", on, answerFrame(t, "SID", "here they are", socketFile("pixel.png", "image/png", onePixelPNG), socketFile("visits.csv", "text/csv", csv)), 0, "", ""},
		{"too many files", on, answerFrame(t, "SID", "three", socketFile("a.csv", "text/csv", csv), socketFile("b.csv", "text/csv", csv), socketFile("c.csv", "text/csv", csv)),
			websocket.StatusPolicyViolation, "at most 2 files", "too_many_files"},
		{"a file too big", on, answerFrame(t, "SID", "big", socketFile("big.png", "image/png", pngOf(2<<10+1))),
			websocket.StatusMessageTooBig, "larger than 2 KiB", "file_too_large"},
		{"files too big together", on, answerFrame(t, "SID", "two big", socketFile("a.png", "image/png", pngOf(2<<10)), socketFile("b.png", "image/png", pngOf(1<<10+1))),
			websocket.StatusMessageTooBig, "larger than 3 KiB", "upload_too_large"},
		{"a frame over the cap the limits give", on, answerFrame(t, "SID", "huge", socketFile("huge.png", "image/png", pngOf(200<<10))),
			websocket.StatusMessageTooBig, "", ""},
		{"a type not allowed", on, answerFrame(t, "SID", "pdf", socketFile("a.pdf", "application/pdf", []byte("%PDF-1.4\n%âãÏÓ\n"))),
			websocket.StatusPolicyViolation, "application/pdf is not accepted", "type_not_allowed"},
		{"PNG declared, HTML inside (sniffed)", on, answerFrame(t, "SID", "sneaky", socketFile("a.png", "image/png", []byte("<html><script>alert(1)</script></html>"))),
			websocket.StatusPolicyViolation, "markup", "type_forbidden"},
		{"CSV declared, a PNG inside (sniffed)", on, answerFrame(t, "SID", "sneaky", socketFile("a.csv", "text/csv", onePixelPNG)),
			websocket.StatusPolicyViolation, "not UTF-8 text", "type_mismatch"},
		{"malformed data URL", on, answerFrame(t, "SID", "broken", map[string]any{"name": "a.csv", "type": "text/csv", "data": "data:text/csv;base64,YSxi*"}),
			websocket.StatusPolicyViolation, "not valid base64", "invalid_data_url"},
		{"data URL not base64", on, answerFrame(t, "SID", "plain", map[string]any{"name": "a.csv", "type": "text/csv", "data": "data:text/csv,a%2Cb"}),
			websocket.StatusPolicyViolation, "not base64", "invalid_data_url"},
		{"a file without data", on, answerFrame(t, "SID", "nothing", map[string]any{"name": "a.csv", "type": "text/csv"}),
			websocket.StatusPolicyViolation, "name, a type and data", ""},
		{"uploads disabled", off, answerFrame(t, "SID", "here", socketFile("visits.csv", "text/csv", csv)),
			websocket.StatusPolicyViolation, "not accepted on this site", "uploads_disabled"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			var d *mxDelta
			if tc.metric != "" {
				d = mxWatch(t, mx("upload_files_total", "result", tc.metric))
			}
			sid := "socket-files-" + string(rune('a'+i))
			ce, ex, frame := tc.env.answerOnSocket(t, sid, tc.frame)
			if tc.code == 0 {
				if ce.Code != websocket.StatusNormalClosure {
					t.Fatalf("close %d %q, want 1000", ce.Code, ce.Reason)
				}
				relayed := false
				for _, f := range tc.env.n8n.Frames() {
					relayed = relayed || (f.Execution == ex.ID && !f.FromN8n && f.Data == frame)
				}
				if !relayed || len(ex.Replies) != 1 || ex.Replies[0] != "here they are" || len(ex.ReplyFiles) != 2 {
					t.Fatalf("n8n got %q with %d files (frame relayed unchanged: %v)", ex.Replies, len(ex.ReplyFiles), relayed)
				}
				for i, want := range []string{"data:image/png;base64," + base64.StdEncoding.EncodeToString(onePixelPNG), "data:text/csv;base64," + base64.StdEncoding.EncodeToString(csv)} {
					if ex.ReplyFiles[i].Data != want {
						t.Errorf("file %d reached n8n as %.60q…", i, ex.ReplyFiles[i].Data)
					}
				}
				checkSocketAttachments(t, tc.env, sid, map[string][]byte{"pixel.png": onePixelPNG, "visits.csv": csv})
				return
			}
			if ce.Code != tc.code || !strings.Contains(ce.Reason, tc.reason) {
				t.Fatalf("close %d %q, want %d with %q", ce.Code, ce.Reason, tc.code, tc.reason)
			}
			for _, f := range tc.env.n8n.Frames() {
				if f.Execution == ex.ID && !f.FromN8n && strings.Contains(f.Data, "sendMessage") {
					t.Fatalf("the refused answer reached n8n: %.80q", f.Data)
				}
			}
			if len(ex.Replies) != 0 || ex.Status != "waiting" {
				t.Fatalf("execution %+v, want still waiting with no answer", ex)
			}
			if d != nil {
				d.want(map[mxKey]float64{mx("upload_files_total", "result", tc.metric): 1})
			}
		})
	}
}

// checkSocketAttachments reads the conversation back as the widget does
// and finds the answer stored with its files (never their bytes).
func checkSocketAttachments(t *testing.T, e *socketEnv, sid string, files map[string][]byte) {
	t.Helper()
	var answer *lcMessage
	waitFor(t, func() bool {
		for _, m := range e.env.widgetLoad(t, allowedOrigin, sid) {
			if m.ID[2] == "HumanMessage" && m.Kwargs["content"] == "here they are" {
				answer = &m
				return true
			}
		}
		return false
	})
	extra, _ := answer.Kwargs["additional_kwargs"].(map[string]any)
	list, _ := extra["attachments"].([]any)
	if len(list) != len(files) {
		t.Fatalf("stored answer %+v", answer.Kwargs)
	}
	for _, a := range list {
		m := a.(map[string]any)
		name, _ := m["name"].(string)
		b, ok := files[name]
		sum := sha256.Sum256(b)
		if !ok || m["size"] != float64(len(b)) || m["sha256"] != hex.EncodeToString(sum[:]) || m["type"] == "" {
			t.Errorf("stored attachment %v", m)
		}
	}
}
