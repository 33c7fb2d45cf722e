package testkit

import (
	"context"
	"crypto/hmac"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"fmt"
	"io"
	"net/http"
	"net/http/httptest"
	"net/url"
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
// captured from n8n 2.8.4 (chat-service.js), and, with ResumeToken, newer
// n8n's token:
//
//   - POST to the webhook: {"executionStarted":true,"executionId":"<n>"}
//     with sequential ids (loadPreviousSession: {"data":[]}).
//   - GET /chat… with a WebSocket upgrade: a socket session keyed
//     sessionId|executionId|public (isPublic set) or |integrated. A second
//     socket under a key still open terminates the first, whose close
//     handler then removes the new one's entry, as n8n's does (the new
//     socket then gets nothing). "n8n|heartbeat" when the session is set
//     up (frames the client sent before it are lost: n8n listens only from
//     then on) and every HeartbeatInterval; at each poll (PollInterval),
//     per socket: a waiting execution's pending message (again to a new
//     socket), followed by "n8n|continue" for a Send Message, which the
//     socket then resumes itself; a socket that delivered a Send and Wait's
//     message gets "n8n|continue" once the execution waits somewhere else;
//     a finished execution's socket is closed without a status (1005). An
//     unknown execution gets `Execution with id "N" does not exist` and
//     close 1008; no "n8n|heartbeat-ack" for AckTimeout cancels the
//     execution and drops the connection (1006). A plain GET gets 500, as
//     n8n answers it. Like n8n, it checks nothing else: any client may
//     attach to any execution.
//   - A "sendMessage" frame resumes an execution waiting at a Send and
//     Wait (its chatInput is the node's answer), unless the node blocks
//     user input.
//   - Approval steps send {"type":"with-buttons",…} whose links are
//     <WebhookURL base>webhook-waiting/<executionId>/<nodeId>?approved=…
//     &signature=<HMAC-SHA256 of host+path+query>; GET (or POST) on such a
//     link, with the Host the link was made for, resumes the execution
//     (401 {"error":"Invalid token"} for a bad signature).
type N8nChat struct {
	srv  *httptest.Server
	opts N8nChatOptions
	ctx  context.Context
	stop context.CancelFunc

	sockets atomic.Int32 // requests that reached /chat, upgrades or not
	posts   atomic.Int32
	waits   atomic.Int32 // requests that reached /webhook-waiting/

	mu       sync.Mutex
	nextID   int
	execs    map[string]*ChatExecution
	sessions map[string]*chatSession // by n8n's key
	frames   []ChatFrame
	// waitHeaders are the headers of each request to /webhook-waiting/.
	waitHeaders []http.Header
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
	// WebhookBase is n8n's WEBHOOK_URL, which approval links start with
	// (with a trailing slash); default the stand-in's own origin.
	WebhookBase string
}

// ChatStep is one Chat node of the workflow.
type ChatStep struct {
	// Wait makes it "Send and Wait for Response" (free text); otherwise
	// it is "Send Message".
	Wait bool
	// Approval makes it "Send and Wait for Response" with approval
	// buttons (Approve, Decline), answered by their links.
	Approval bool
	// BlockUserInput: the waiting node drops typed answers.
	BlockUserInput bool
	// Text is the message; "{reply}" stands for the visitor's last answer.
	Text string
}

func (s ChatStep) waits() bool { return s.Wait || s.Approval }

// ChatExecution is one execution of the workflow.
type ChatExecution struct {
	ID, SessionID, Token string
	Status               string   // waiting, canceled, success
	Replies              []string // each answer that resumed it: chatInput, or approved=true/false
	// ReplyFiles are the files of the answers that resumed it, as the
	// frames carried them (n8n's runNode reads name, type and data).
	ReplyFiles []ChatFile

	step int
}

// ChatFile is a file of a visitor's answer over the socket.
type ChatFile struct {
	Name string `json:"name"`
	Type string `json:"type"`
	Data string `json:"data"` // the widget's data URL
}

// chatSession is n8n's entry for one socket.
type chatSession struct {
	closing     *atomic.Bool // set when n8n ends the socket itself
	key         string
	conn        *websocket.Conn
	exec        string
	sessionID   string
	nodeWaiting int // the step whose message this socket delivered and waits on; -1: none
	lastAck     time.Time
}

// ChatFrame is one frame on a stand-in socket, for transcripts.
type ChatFrame struct {
	At        time.Time
	Execution string
	FromN8n   bool
	Data      string // the text, "close <code>", or "open <key kind>"
}

func (f ChatFrame) String() string {
	dir := ">>"
	if f.FromN8n {
		dir = "<<"
	}
	return fmt.Sprintf("%s exec %s %s %s", f.At.Format("15:04:05.000"), f.Execution, dir, f.Data)
}

// standInSecret signs the approval links (n8n's instance secret).
var standInSecret = []byte("stand-in n8n signing key")

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
	f := &N8nChat{opts: opts, nextID: 40, execs: map[string]*ChatExecution{}, sessions: map[string]*chatSession{}}
	f.ctx, f.stop = context.WithCancel(context.Background())
	f.srv = httptest.NewServer(http.HandlerFunc(f.serve))
	if f.opts.WebhookBase == "" {
		f.opts.WebhookBase = f.srv.URL + "/"
	}
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

// WaitingRequests counts the requests that reached /webhook-waiting/.
func (f *N8nChat) WaitingRequests() int { return int(f.waits.Load()) }

// WaitingHeaders returns the headers of each request that reached
// /webhook-waiting/, in order.
func (f *N8nChat) WaitingHeaders() []http.Header {
	f.mu.Lock()
	defer f.mu.Unlock()
	return append([]http.Header(nil), f.waitHeaders...)
}

// Execution returns a copy of an execution's state.
func (f *N8nChat) Execution(id string) (ChatExecution, bool) {
	f.mu.Lock()
	defer f.mu.Unlock()
	e, ok := f.execs[id]
	if !ok {
		return ChatExecution{}, false
	}
	return ChatExecution{ID: e.ID, SessionID: e.SessionID, Token: e.Token, Status: e.Status,
		Replies: append([]string(nil), e.Replies...), ReplyFiles: append([]ChatFile(nil), e.ReplyFiles...), step: e.step}, true
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
	f.recordLocked(exec, fromN8n, data)
}

func (f *N8nChat) recordLocked(exec string, fromN8n bool, data string) {
	f.frames = append(f.frames, ChatFrame{At: time.Now(), Execution: exec, FromN8n: fromN8n, Data: data})
}

func (f *N8nChat) serve(w http.ResponseWriter, r *http.Request) {
	if strings.HasPrefix(r.URL.Path, "/chat") {
		f.sockets.Add(1)
		f.socket(w, r)
		return
	}
	if strings.HasPrefix(r.URL.Path, "/webhook-waiting/") {
		f.waits.Add(1)
		f.mu.Lock()
		f.waitHeaders = append(f.waitHeaders, r.Header.Clone())
		f.mu.Unlock()
		f.waiting(w, r)
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
	if len(f.opts.Workflow) == 0 {
		e.Status = "success"
	}
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

// resumeLocked runs the execution on from its waiting node: to the next
// Chat node (waiting there) or to its end.
func (f *N8nChat) resumeLocked(e *ChatExecution, reply string, record bool) {
	if record {
		e.Replies = append(e.Replies, reply)
	}
	e.step++
	if e.step >= len(f.opts.Workflow) {
		e.Status = "success"
	}
}

// signLink signs an approval link as n8n's getSignedResumeUrl does:
// HMAC-SHA256 of host + pathname + search, appended as signature.
func signLink(u *url.URL) string {
	m := hmac.New(sha256.New, standInSecret)
	m.Write([]byte(u.Host + u.Path + "?" + u.RawQuery))
	q := u.RawQuery + "&signature=" + hex.EncodeToString(m.Sum(nil))
	s := *u
	s.RawQuery = q
	return s.String()
}

// message is the frame a waiting step sends.
func (f *N8nChat) message(e *ChatExecution) string {
	st := f.opts.Workflow[e.step]
	reply := ""
	if n := len(e.Replies); n > 0 {
		reply = e.Replies[n-1]
	}
	text := strings.ReplaceAll(st.Text, "{reply}", reply)
	if !st.Approval {
		return text
	}
	base, _ := url.Parse(f.opts.WebhookBase)
	link := func(approved bool) string {
		u := *base
		u.Path = strings.TrimSuffix(base.Path, "/") + fmt.Sprintf("/webhook-waiting/%s/node-%d", e.ID, e.step)
		u.RawQuery = "approved=" + strconv.FormatBool(approved)
		return signLink(&u)
	}
	b, _ := json.Marshal(map[string]any{
		"type": "with-buttons", "text": text, "blockUserInput": st.BlockUserInput,
		"buttons": []map[string]string{
			{"text": "Approve", "link": link(true), "type": "primary"},
			{"text": "Decline", "link": link(false), "type": "secondary"},
		},
	})
	return string(b)
}

// waiting serves an approval link (n8n's waiting-webhooks.js).
func (f *N8nChat) waiting(w http.ResponseWriter, r *http.Request) {
	if r.Method != http.MethodGet && r.Method != http.MethodPost {
		http.NotFound(w, r)
		return
	}
	q := r.URL.Query()
	sig := q.Get("signature")
	q.Del("signature")
	m := hmac.New(sha256.New, standInSecret)
	m.Write([]byte(r.Host + r.URL.Path + "?" + q.Encode()))
	if want := hex.EncodeToString(m.Sum(nil)); !hmac.Equal([]byte(sig), []byte(want)) {
		w.Header().Set("Content-Type", "application/json; charset=utf-8")
		w.WriteHeader(http.StatusUnauthorized)
		_, _ = io.WriteString(w, `{"error":"Invalid token"}`)
		return
	}
	parts := strings.Split(strings.TrimPrefix(r.URL.Path, "/webhook-waiting/"), "/")
	f.mu.Lock()
	e := f.execs[parts[0]]
	ok := e != nil && len(parts) == 2 && e.Status == "waiting" && e.step < len(f.opts.Workflow) &&
		f.opts.Workflow[e.step].Approval && parts[1] == fmt.Sprintf("node-%d", e.step)
	if ok {
		f.resumeLocked(e, "approved="+q.Get("approved"), true)
	}
	f.mu.Unlock()
	if !ok {
		w.Header().Set("Content-Type", "application/json; charset=utf-8")
		w.WriteHeader(http.StatusConflict)
		_, _ = io.WriteString(w, `{"message":"The execution is not waiting for this node"}`)
		return
	}
	w.Header().Set("Content-Type", "text/html; charset=utf-8")
	_, _ = io.WriteString(w, "<!DOCTYPE html><html><body><p>Your response has been recorded</p></body></html>")
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
	kind := "integrated"
	if q.Has("isPublic") && q.Get("isPublic") != "" {
		kind = "public"
	}
	f.record(id, false, "open "+kind)

	// The socket is read from the start; n8n's message listener exists
	// only once the session is set up, just before its first heartbeat.
	var listening atomic.Bool
	// closing: the stand-in ends the socket itself; a close the reader
	// sees then is not the client's.
	var closing atomic.Bool
	var sess *chatSession
	go func() {
		defer cancel()
		for {
			typ, data, err := c.Read(ctx)
			if err != nil {
				if !closing.Load() && f.ctx.Err() == nil {
					f.record(id, false, fmt.Sprintf("close %d", websocket.CloseStatus(err)))
				}
				return
			}
			if !listening.Load() {
				f.record(id, false, "dropped (not listening yet): "+string(data))
				continue
			}
			f.record(id, false, string(data))
			if typ != websocket.MessageText {
				continue
			}
			f.incoming(sess, data)
		}
	}()

	f.mu.Lock()
	e := f.execs[id]
	if e == nil {
		f.mu.Unlock()
		write(fmt.Sprintf("Execution with id %q does not exist", id))
		f.record(id, true, "close 1008")
		closing.Store(true)
		_ = c.Close(websocket.StatusPolicyViolation, "")
		return
	}
	if e.Token != "" && q.Get("token") != e.Token {
		f.mu.Unlock()
		write(`{"type":"error","message":"Connection rejected"}`)
		closing.Store(true)
		_ = c.Close(websocket.StatusPolicyViolation, "")
		return
	}
	sess = &chatSession{closing: &closing, key: q.Get("sessionId") + "|" + id + "|" + kind, conn: c, exec: id, sessionID: q.Get("sessionId"), nodeWaiting: -1, lastAck: time.Now()}
	if old := f.sessions[sess.key]; old != nil {
		// cleanupSession: terminate the old socket. Its close handler,
		// run later, deletes the key: the new session's entry.
		f.recordLocked(id, true, "terminate (1006): replaced")
		old.closing.Store(true)
		_ = old.conn.CloseNow()
	}
	f.sessions[sess.key] = sess
	f.mu.Unlock()
	defer func() {
		// ws.once('close'): the key goes, whoever holds it now.
		f.mu.Lock()
		delete(f.sessions, sess.key)
		f.mu.Unlock()
	}()
	listening.Store(true)
	if !write("n8n|heartbeat") {
		return
	}

	hb := time.NewTicker(f.opts.HeartbeatInterval)
	defer hb.Stop()
	poll := time.NewTicker(f.opts.PollInterval)
	defer poll.Stop()
	for {
		select {
		case <-ctx.Done():
			return
		case <-hb.C:
			f.mu.Lock()
			current := f.sessions[sess.key] == sess
			stale := time.Since(sess.lastAck) > f.opts.AckTimeout
			if current && stale {
				e.Status = "canceled"
				f.recordLocked(id, true, "terminate (1006)")
				closing.Store(true)
			}
			f.mu.Unlock()
			if !current {
				continue // n8n no longer knows this socket
			}
			if stale {
				return // CloseNow: the TCP connection drops
			}
			if !write("n8n|heartbeat") {
				return
			}
		case <-poll.C:
			out, closeIt, terminate := f.poll(sess)
			for _, s := range out {
				if !write(s) {
					return
				}
			}
			if terminate {
				f.record(id, true, "terminate (1006)")
				closing.Store(true)
				return
			}
			if closeIt {
				f.record(id, true, "close 1005")
				closing.Store(true)
				_ = c.Close(websocket.StatusNoStatusRcvd, "")
				return
			}
		}
	}
}

// poll is pollAndProcessChatResponses for one socket: what to send, and
// whether to close the socket (success) or drop it (failed execution).
func (f *N8nChat) poll(sess *chatSession) (out []string, closeIt, terminate bool) {
	f.mu.Lock()
	defer f.mu.Unlock()
	if f.sessions[sess.key] != sess {
		return nil, false, false // removed from the map: nothing happens
	}
	e := f.execs[sess.exec]
	switch {
	case e.Status == "canceled":
		return nil, false, true
	case sess.nodeWaiting >= 0:
		// waitForChatResponseOrContinue
		if e.Status == "waiting" && e.step != sess.nodeWaiting {
			sess.nodeWaiting = -1
			return []string{"n8n|continue"}, false, false
		}
		return nil, false, false
	case e.Status == "waiting":
		st := f.opts.Workflow[e.step]
		out = append(out, f.message(e))
		if !st.waits() {
			out = append(out, "n8n|continue")
			f.resumeLocked(e, "", false) // resumed with chatInput ""
			return out, false, false
		}
		sess.nodeWaiting = e.step
		return out, false, false
	case e.Status == "success":
		return nil, true, false
	}
	return nil, false, false
}

// incoming is incomingMessageHandler: acks, and answers that resume the
// execution.
func (f *N8nChat) incoming(sess *chatSession, data []byte) {
	f.mu.Lock()
	defer f.mu.Unlock()
	if f.sessions[sess.key] != sess {
		return
	}
	if string(data) == "n8n|heartbeat-ack" || (f.opts.ResumeToken && string(data) == `{"type":"heartbeat-ack"}`) {
		sess.lastAck = time.Now()
		return
	}
	var m struct {
		SessionID *string    `json:"sessionId"`
		Action    string     `json:"action"`
		ChatInput *string    `json:"chatInput"`
		Files     []ChatFile `json:"files"`
	}
	if json.Unmarshal(data, &m) != nil || m.SessionID == nil || m.Action != "sendMessage" || m.ChatInput == nil {
		return // chatMessageSchema failed: only logged
	}
	e := f.execs[sess.exec]
	if e.Status != "waiting" || e.step >= len(f.opts.Workflow) {
		return
	}
	st := f.opts.Workflow[e.step]
	if st.BlockUserInput {
		return // shouldResumeOnMessage: false
	}
	if st.Approval {
		f.resumeLocked(e, "approved=false", true) // a typed answer declines
	} else {
		f.resumeLocked(e, *m.ChatInput, st.Wait)
		if st.Wait {
			e.ReplyFiles = append(e.ReplyFiles, m.Files...)
		}
	}
	sess.nodeWaiting = -1
}
