package testkit

import (
	"context"
	"encoding/json"
	"fmt"
	"io"
	"net/http"
	"net/http/httptest"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/coder/websocket"
)

// N8nChat stands in for an n8n Chat Trigger whose response mode is "Using
// Response Nodes", speaking the protocol research/n8n-chat-advanced.md
// captured from n8n 2.8.4 (and, with ResumeToken, newer n8n's token):
//
//   - POST to the webhook: {"executionStarted":true,"executionId":"<n>"}
//     with sequential ids (loadPreviousSession: {"data":[]}).
//   - GET /chat… with a WebSocket upgrade: "n8n|heartbeat" on connect and
//     every HeartbeatInterval; the workflow's messages at the next poll
//     (PollInterval); "n8n|continue" right after a Send Message; a Send
//     and Wait waits for the client's sendMessage frame; after the last
//     step the socket is closed without a status (1005). An unknown
//     execution gets `Execution with id "N" does not exist` and close
//     1008; no "n8n|heartbeat-ack" for AckTimeout cancels the execution
//     and drops the connection (1006). A plain GET gets 500, as n8n
//     answers it. Like n8n, it checks nothing else: any client may
//     attach to any execution.
type N8nChat struct {
	srv  *httptest.Server
	opts N8nChatOptions
	ctx  context.Context
	stop context.CancelFunc

	sockets atomic.Int32 // requests that reached /chat, upgrades or not
	posts   atomic.Int32

	mu     sync.Mutex
	nextID int
	execs  map[string]*ChatExecution
	frames []ChatFrame
}

// N8nChatOptions configures an N8nChat; zero values are n8n's timings.
type N8nChatOptions struct {
	// Workflow is what every execution runs: its Chat nodes in order.
	Workflow []ChatStep
	// HeartbeatInterval: n8n's 30 s.
	HeartbeatInterval time.Duration
	// PollInterval is n8n's check for node output: 3 s.
	PollInterval time.Duration
	// AckTimeout: n8n cancels an execution after 60 s without an ack.
	AckTimeout time.Duration
	// ResumeToken makes it behave as newer n8n: the POST answer carries a
	// resumeToken, and the socket is refused without it.
	ResumeToken bool
}

// ChatStep is one Chat node of the workflow.
type ChatStep struct {
	// Wait makes it "Send and Wait for Response" (free text); otherwise
	// it is "Send Message".
	Wait bool
	// Text is the message; "{reply}" stands for the visitor's last answer.
	Text string
}

// ChatExecution is one execution of the workflow.
type ChatExecution struct {
	ID, SessionID, Token string
	Status               string   // waiting, canceled, success
	Replies              []string // the chatInput of each answer that resumed it
	// ReplyFiles are the files of the answers that resumed it, as the
	// frames carried them (n8n's runNode reads name, type and data).
	ReplyFiles []ChatFile

	step      int
	delivered *websocket.Conn // the socket the pending message went to
	sock      *websocket.Conn
}

// ChatFile is a file of a visitor's answer over the socket.
type ChatFile struct {
	Name string `json:"name"`
	Type string `json:"type"`
	Data string `json:"data"` // the widget's data URL
}

// ChatFrame is one frame on a stand-in socket, for transcripts.
type ChatFrame struct {
	At        time.Time
	Execution string
	FromN8n   bool
	Data      string // the text, or "close <code>"
}

func (f ChatFrame) String() string {
	dir := ">>"
	if f.FromN8n {
		dir = "<<"
	}
	return fmt.Sprintf("%s exec %s %s %s", f.At.Format("15:04:05.000"), f.Execution, dir, f.Data)
}

// NewN8nChat starts the stand-in; it stops at the end of the test.
func NewN8nChat(t testing.TB, opts N8nChatOptions) *N8nChat {
	t.Helper()
	if opts.HeartbeatInterval == 0 {
		opts.HeartbeatInterval = 30 * time.Second
	}
	if opts.PollInterval == 0 {
		opts.PollInterval = 3 * time.Second
	}
	if opts.AckTimeout == 0 {
		opts.AckTimeout = 60 * time.Second
	}
	f := &N8nChat{opts: opts, nextID: 40, execs: map[string]*ChatExecution{}}
	f.ctx, f.stop = context.WithCancel(context.Background())
	f.srv = httptest.NewServer(http.HandlerFunc(f.serve))
	t.Cleanup(func() {
		f.stop()
		f.srv.Close()
	})
	return f
}

// WebhookURL is the Chat Trigger's URL, for n8n_webhook.
func (f *N8nChat) WebhookURL() string { return f.srv.URL + "/webhook/stand-in-trigger/chat" }

// SocketURL is its chat WebSocket.
func (f *N8nChat) SocketURL() string { return "ws" + strings.TrimPrefix(f.srv.URL, "http") + "/chat" }

// Sockets counts the requests that reached /chat.
func (f *N8nChat) Sockets() int { return int(f.sockets.Load()) }

// Posts counts the POSTs that started an execution.
func (f *N8nChat) Posts() int { return int(f.posts.Load()) }

// Execution returns a copy of an execution's state.
func (f *N8nChat) Execution(id string) (ChatExecution, bool) {
	f.mu.Lock()
	defer f.mu.Unlock()
	e, ok := f.execs[id]
	if !ok {
		return ChatExecution{}, false
	}
	return ChatExecution{ID: e.ID, SessionID: e.SessionID, Token: e.Token, Status: e.Status,
		Replies: append([]string(nil), e.Replies...), ReplyFiles: append([]ChatFile(nil), e.ReplyFiles...)}, true
}

// Frames returns every frame seen so far on the stand-in's sockets.
func (f *N8nChat) Frames() []ChatFrame {
	f.mu.Lock()
	defer f.mu.Unlock()
	return append([]ChatFrame(nil), f.frames...)
}

func (f *N8nChat) record(exec string, fromN8n bool, data string) {
	f.mu.Lock()
	defer f.mu.Unlock()
	f.frames = append(f.frames, ChatFrame{At: time.Now(), Execution: exec, FromN8n: fromN8n, Data: data})
}

func (f *N8nChat) serve(w http.ResponseWriter, r *http.Request) {
	if strings.HasPrefix(r.URL.Path, "/chat") {
		f.sockets.Add(1)
		f.socket(w, r)
		return
	}
	if r.Method != http.MethodPost {
		http.NotFound(w, r)
		return
	}
	var body struct {
		Action    string `json:"action"`
		SessionID string `json:"sessionId"`
	}
	raw, _ := io.ReadAll(r.Body)
	if json.Unmarshal(raw, &body) != nil {
		http.Error(w, `{"message":"bad body"}`, http.StatusBadRequest)
		return
	}
	w.Header().Set("Content-Type", "application/json; charset=utf-8")
	if body.Action == "loadPreviousSession" {
		_, _ = io.WriteString(w, `{"data":[]}`)
		return
	}
	f.posts.Add(1)
	f.mu.Lock()
	f.nextID++
	e := &ChatExecution{ID: strconv.Itoa(f.nextID), SessionID: body.SessionID, Status: "waiting"}
	if f.opts.ResumeToken {
		e.Token = fmt.Sprintf("n8n-token-%d", f.nextID)
	}
	f.execs[e.ID] = e
	f.mu.Unlock()
	answer := map[string]any{"executionStarted": true, "executionId": e.ID}
	if e.Token != "" {
		answer["resumeToken"] = e.Token
	}
	_ = json.NewEncoder(w).Encode(answer)
}

// socket serves one connection to /chat as n8n's chat-service does.
func (f *N8nChat) socket(w http.ResponseWriter, r *http.Request) {
	if !strings.EqualFold(r.Header.Get("Upgrade"), "websocket") {
		w.Header().Set("Content-Type", "text/html; charset=utf-8")
		w.WriteHeader(http.StatusInternalServerError)
		_, _ = io.WriteString(w, "<!DOCTYPE html><html><body><pre>Internal Server Error</pre></body></html>")
		return
	}
	c, err := websocket.Accept(w, r, &websocket.AcceptOptions{InsecureSkipVerify: true}) // n8n checks no Origin
	if err != nil {
		return
	}
	defer c.CloseNow()
	c.SetReadLimit(100 << 20)
	ctx, cancel := context.WithCancel(f.ctx)
	defer cancel()
	q := r.URL.Query()
	id := q.Get("executionId")
	write := func(s string) bool {
		f.record(id, true, s)
		return c.Write(ctx, websocket.MessageText, []byte(s)) == nil
	}
	if q.Get("sessionId") == "" || id == "" {
		_ = c.Close(websocket.StatusPolicyViolation, "")
		return
	}
	f.mu.Lock()
	e := f.execs[id]
	if e == nil || e.Status != "waiting" {
		f.mu.Unlock()
		write(fmt.Sprintf("Execution with id %q does not exist", id))
		f.record(id, true, "close 1008")
		_ = c.Close(websocket.StatusPolicyViolation, "")
		return
	}
	if e.Token != "" && q.Get("token") != e.Token {
		f.mu.Unlock()
		write(`{"type":"error","message":"Connection rejected"}`)
		_ = c.Close(websocket.StatusPolicyViolation, "")
		return
	}
	if e.sock != nil {
		_ = e.sock.CloseNow() // the same key replaces the old socket
	}
	e.sock = c
	f.mu.Unlock()

	var lastAck atomic.Int64
	lastAck.Store(time.Now().UnixNano())
	go func() {
		defer cancel()
		for {
			typ, data, err := c.Read(ctx)
			if err != nil {
				if ctx.Err() == nil {
					f.record(id, false, fmt.Sprintf("close %d", websocket.CloseStatus(err)))
				}
				return
			}
			f.record(id, false, string(data))
			if typ != websocket.MessageText {
				continue
			}
			if string(data) == "n8n|heartbeat-ack" || (f.opts.ResumeToken && string(data) == `{"type":"heartbeat-ack"}`) {
				lastAck.Store(time.Now().UnixNano())
				continue
			}
			var m struct {
				SessionID *string    `json:"sessionId"`
				Action    string     `json:"action"`
				ChatInput *string    `json:"chatInput"`
				Files     []ChatFile `json:"files"`
			}
			if json.Unmarshal(data, &m) != nil || m.SessionID == nil || m.Action != "sendMessage" || m.ChatInput == nil {
				continue // chatMessageSchema failed: only logged
			}
			f.mu.Lock()
			if e.step < len(f.opts.Workflow) && f.opts.Workflow[e.step].Wait && e.delivered != nil {
				e.Replies = append(e.Replies, *m.ChatInput)
				e.ReplyFiles = append(e.ReplyFiles, m.Files...)
				e.step++
				e.delivered = nil
			}
			f.mu.Unlock()
		}
	}()

	hb := time.NewTicker(f.opts.HeartbeatInterval)
	defer hb.Stop()
	poll := time.NewTicker(f.opts.PollInterval)
	defer poll.Stop()
	if !write("n8n|heartbeat") {
		return
	}
	for {
		select {
		case <-ctx.Done():
			return
		case <-hb.C:
			if time.Since(time.Unix(0, lastAck.Load())) > f.opts.AckTimeout {
				f.mu.Lock()
				e.Status = "canceled"
				f.mu.Unlock()
				f.record(id, true, "terminate (1006)")
				return // CloseNow: the TCP connection drops
			}
			if !write("n8n|heartbeat") {
				return
			}
		case <-poll.C:
			f.mu.Lock()
			if e.sock != c {
				f.mu.Unlock()
				return // replaced
			}
			if e.step >= len(f.opts.Workflow) {
				e.Status = "success"
				f.mu.Unlock()
				f.record(id, true, "close 1005")
				_ = c.Close(websocket.StatusNoStatusRcvd, "")
				return
			}
			st := f.opts.Workflow[e.step]
			var out []string
			if e.delivered != c {
				reply := ""
				if n := len(e.Replies); n > 0 {
					reply = e.Replies[n-1]
				}
				out = append(out, strings.ReplaceAll(st.Text, "{reply}", reply))
				e.delivered = c
				if !st.Wait {
					out = append(out, "n8n|continue")
					e.step++
					e.delivered = nil
				}
			}
			f.mu.Unlock()
			for _, s := range out {
				if !write(s) {
					return
				}
			}
		}
	}
}
