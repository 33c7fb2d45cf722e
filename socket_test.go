package chatproxy

import (
	"context"
	"crypto/hmac"
	"crypto/sha256"
	"encoding/base64"
	"encoding/json"
	"fmt"
	"io"
	"net/http"
	"net/http/httptest"
	"strings"
	"testing"
	"time"

	"github.com/caddyserver/caddy/v2"
	"github.com/caddyserver/caddy/v2/modules/caddyhttp"
	"github.com/coder/websocket"

	"github.com/chatproxy/caddy-chatproxy/internal/testkit"
)

// socketEnv is a chat_proxy in front of the stand-in n8n in "Using
// Response Nodes" mode, over real HTTP (the socket hijacks the connection).
type socketEnv struct {
	n8n *testkit.N8nChat
	cp  *ChatProxy
	srv *httptest.Server
	env *chatEnv // for widgetLoad
}

// The stand-in's timings, shortened: heartbeats every 150 ms, messages at
// 50 ms polls.
func fastN8n(steps ...testkit.ChatStep) testkit.N8nChatOptions {
	return testkit.N8nChatOptions{Workflow: steps, HeartbeatInterval: 150 * time.Millisecond, PollInterval: 50 * time.Millisecond}
}

func newSocketEnv(t *testing.T, kind string, opts testkit.N8nChatOptions, mutate func(*ChatProxy)) *socketEnv {
	t.Helper()
	e := &socketEnv{n8n: testkit.NewN8nChat(t, opts)}
	e.cp = newTestProxy(t, kind, func(cp *ChatProxy) {
		cp.N8nWebhook = e.n8n.WebhookURL()
		cp.UpstreamAuth = &UpstreamAuth{Mode: "none"}
		if mutate != nil {
			mutate(cp)
		}
	})
	next := caddyhttp.HandlerFunc(func(w http.ResponseWriter, _ *http.Request) error {
		w.WriteHeader(passedOn)
		return nil
	})
	e.srv = httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		r = caddyhttp.PrepareRequest(r, caddy.NewReplacer(), w, nil)
		caddyhttp.SetVar(r.Context(), caddyhttp.ClientIPVarKey, chatClientIP)
		if err := e.cp.ServeHTTP(w, r, next); err != nil {
			t.Errorf("ServeHTTP %s %s returned %v", r.Method, r.URL.Path, err)
		}
	}))
	t.Cleanup(e.srv.Close)
	e.env = &chatEnv{cp: e.cp, store: e.cp.handlerStore()}
	return e
}

type startedBody struct {
	ExecutionStarted bool   `json:"executionStarted"`
	ExecutionID      string `json:"executionId"`
	ResumeToken      string `json:"resumeToken"`
}

// post sends the widget's sendMessage (enableStreaming false) and returns
// the executionStarted answer.
func (e *socketEnv) post(t *testing.T, sessionID, text string) startedBody {
	t.Helper()
	return e.postAccept(t, sessionID, text, "*/*")
}

// postAccept is post with the widget's Accept: text/plain in streaming
// mode, where n8n still answers JSON (and the widget then ignores it).
func (e *socketEnv) postAccept(t *testing.T, sessionID, text, accept string) startedBody {
	t.Helper()
	rec := e.env.serve(t, "POST", "/api/v1/n8n/chat", `{"action":"sendMessage","sessionId":"`+sessionID+`","chatInput":"`+text+`","metadata":{}}`,
		map[string]string{"Origin": allowedOrigin, "Content-Type": "application/json", "Accept": accept})
	if rec.Code != 200 || rec.Header().Get("Content-Type") != "application/json; charset=utf-8" {
		t.Fatalf("sendMessage: %d %q %s", rec.Code, rec.Header().Get("Content-Type"), rec.Body)
	}
	var b startedBody
	if err := json.Unmarshal(rec.Body.Bytes(), &b); err != nil || !b.ExecutionStarted || b.ExecutionID == "" || b.ResumeToken == "" {
		t.Fatalf("sendMessage answer %s: %v", rec.Body, err)
	}
	return b
}

// socketQuery is the query the widget builds (constructChatWebsocketUrl):
// not URL-encoded, token last when there is one.
func socketQuery(sessionID, executionID, token string) string {
	q := "sessionId=" + sessionID + "&executionId=" + executionID + "&isPublic=true"
	if token != "" {
		q += "&token=" + token
	}
	return q
}

func (e *socketEnv) dial(t *testing.T, query, origin string) (*websocket.Conn, *http.Response, error) {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	h := http.Header{}
	if origin != "" {
		h.Set("Origin", origin)
	}
	c, resp, err := websocket.Dial(ctx, "ws"+strings.TrimPrefix(e.srv.URL, "http")+"/chat?"+query, &websocket.DialOptions{HTTPHeader: h})
	if c != nil {
		t.Cleanup(func() { _ = c.CloseNow() })
	}
	return c, resp, err
}

// widgetFrames plays the @n8n/chat widget on an open socket: it acks
// heartbeats, answers the prompt with answer, and returns the frames it
// got (heartbeats left out) and the close status.
func widgetFrames(t *testing.T, c *websocket.Conn, sessionID, prompt, answer string) ([]string, websocket.StatusCode) {
	t.Helper()
	return playWidget(t, c, sessionID, prompt, answer, true)
}

// playWidget is widgetFrames; with writesMustSucceed false, a write that
// fails (n8n closing while an ack is on its way) ends nothing: the close
// status is read after it.
func playWidget(t *testing.T, c *websocket.Conn, sessionID, prompt, answer string, writesMustSucceed bool) ([]string, websocket.StatusCode) {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	defer cancel()
	write := func(frame []byte) {
		if err := c.Write(ctx, websocket.MessageText, frame); err != nil && writesMustSucceed {
			t.Fatal(err)
		}
	}
	var got []string
	for {
		_, data, err := c.Read(ctx)
		if err != nil {
			return got, websocket.CloseStatus(err)
		}
		s := string(data)
		if s == "n8n|heartbeat" {
			write([]byte("n8n|heartbeat-ack"))
			continue
		}
		got = append(got, s)
		if s == prompt {
			frame, _ := json.Marshal(map[string]any{"sessionId": sessionID, "action": "sendMessage", "chatInput": answer, "files": []any{}})
			write(frame)
		}
	}
}

var sendWaitSend = []testkit.ChatStep{
	{Text: "first: hello nodes"},
	{Wait: true, Text: "What else do you want to say?"},
	{Text: "you said: {reply}"},
}

// The widget's whole flow through the proxy: the POST is answered with
// n8n's executionStarted plus the proxy's resumeToken; the socket relays
// Send Message → Send and Wait → the visitor's answer → Send Message
// unchanged, n8n's close (1005) reaches the widget as a normal close, and
// loadPreviousSession shows the whole conversation.
func TestChatSocketFlow(t *testing.T) {
	for _, kind := range storeKinds {
		t.Run(kind, func(t *testing.T) {
			e := newSocketEnv(t, kind, fastN8n(sendWaitSend...), nil)
			const sid = "03b2b262-5d0f-4c8e-9d65-0a1b2c3d4e5f"
			st := e.post(t, sid, "widget hello")
			c, _, err := e.dial(t, socketQuery(sid, st.ExecutionID, st.ResumeToken), allowedOrigin)
			if err != nil {
				t.Fatal(err)
			}
			got, code := widgetFrames(t, c, sid, "What else do you want to say?", "typed reply")
			want := []string{"first: hello nodes", "n8n|continue", "What else do you want to say?", "you said: typed reply", "n8n|continue"}
			if strings.Join(got, "\n") != strings.Join(want, "\n") || code != websocket.StatusNormalClosure {
				t.Fatalf("frames %q close %d; want %q close 1000", got, code, want)
			}
			if ex, _ := e.n8n.Execution(st.ExecutionID); ex.Status != "success" || len(ex.Replies) != 1 || ex.Replies[0] != "typed reply" {
				t.Fatalf("execution %+v", ex)
			}
			var hist []string
			waitFor(t, func() bool {
				hist = hist[:0]
				for _, m := range e.env.widgetLoad(t, allowedOrigin, sid) {
					hist = append(hist, m.ID[2]+": "+m.Kwargs["content"].(string))
				}
				return len(hist) == 5
			})
			wantHist := []string{"HumanMessage: widget hello", "AIMessage: first: hello nodes", "AIMessage: What else do you want to say?",
				"HumanMessage: typed reply", "AIMessage: you said: typed reply"}
			if strings.Join(hist, "\n") != strings.Join(wantHist, "\n") {
				t.Fatalf("history %q, want %q", hist, wantHist)
			}
		})
	}
}

func waitFor(t *testing.T, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(10 * time.Second)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatal("condition not met within 10s")
		}
		time.Sleep(20 * time.Millisecond)
	}
}

// forgeSocketToken signs claims as the proxy does (base64url JSON, a dot,
// base64url HMAC-SHA256 under jwt_secret's chat-socket key), written out
// here independently of the handler's code.
func forgeSocketToken(key []byte, claims map[string]any) string {
	b, _ := json.Marshal(claims)
	p := base64.RawURLEncoding.EncodeToString(b)
	m := hmac.New(sha256.New, key)
	m.Write([]byte("chat-socket.v1." + p))
	return p + "." + base64.RawURLEncoding.EncodeToString(m.Sum(nil))
}

// The hole closed: only the visitor who started an execution can attach
// to it, with the token the proxy gave it, from an allowed origin, while
// fresh, within the rate limits. Every refusal happens before anything
// reaches n8n (the stand-in counts every request to its /chat). This is
// the refusal table of docs/n8n-and-widgets.md.
func TestChatSocketRefusals(t *testing.T) {
	e := newSocketEnv(t, "sqlite", fastN8n(sendWaitSend...), nil)
	const victim, attacker = "victim-session-0001", "attacker-session-02"
	v := e.post(t, victim, "my private question")
	a := e.postAccept(t, attacker, "hello", "text/plain")
	// A site whose ip tier allows one request: the POST spends it.
	limited := newSocketEnv(t, "sqlite", fastN8n(sendWaitSend...), func(cp *ChatProxy) {
		cp.RateLimits = testRates(map[string][]string{"ip": {"1/1m"}, "session": {"100000/1m"}, "domain": {"100000/1m"}, "create": {"100000/1m"}})
	})
	l := limited.post(t, victim, "my question")
	key := deriveKey(e.cp.jwtSecret, "chatproxy chat socket tokens")
	tampered := []byte(v.ResumeToken)
	tampered[3] ^= 1
	claims := func(sid, eid string, exp int64) map[string]any {
		return map[string]any{"s": "shop.example.com", "i": sid, "e": eid, "x": exp}
	}
	for _, tc := range []struct {
		name, query, origin string
		upgrade             bool
		status              int
		env                 *socketEnv // nil: e
	}{
		// Not the socket's: a page the site serves at /chat still works.
		{"plain GET without Upgrade", socketQuery(victim, v.ExecutionID, v.ResumeToken), allowedOrigin, false, passedOn, nil},
		{"no token", socketQuery(victim, v.ExecutionID, ""), allowedOrigin, true, 403, nil},
		{"second visitor's own token for the victim's execution", socketQuery(attacker, v.ExecutionID, a.ResumeToken), allowedOrigin, true, 403, nil},
		{"second visitor's token, victim's sessionId and execution", socketQuery(victim, v.ExecutionID, a.ResumeToken), allowedOrigin, true, 403, nil},
		{"victim's token, next execution id", socketQuery(victim, a.ExecutionID, v.ResumeToken), allowedOrigin, true, 403, nil},
		{"wrong Origin", socketQuery(victim, v.ExecutionID, v.ResumeToken), "https://evil.example.net", true, 403, nil},
		{"no Origin", socketQuery(victim, v.ExecutionID, v.ResumeToken), "", true, 403, nil},
		{"tampered token", socketQuery(victim, v.ExecutionID, string(tampered)), allowedOrigin, true, 403, nil},
		{"expired token", socketQuery(victim, v.ExecutionID, forgeSocketToken(key, claims(victim, v.ExecutionID, time.Now().Add(-time.Second).Unix()))), allowedOrigin, true, 403, nil},
		{"token signed with another key", socketQuery(victim, v.ExecutionID, forgeSocketToken([]byte("not-the-key"), claims(victim, v.ExecutionID, time.Now().Add(time.Minute).Unix()))), allowedOrigin, true, 403, nil},
		{"token for another site", socketQuery(victim, v.ExecutionID, forgeSocketToken(key, map[string]any{"s": "other.example.org", "i": victim, "e": v.ExecutionID, "x": time.Now().Add(time.Minute).Unix()})), allowedOrigin, true, 403, nil},
		{"token for another session", socketQuery(attacker, v.ExecutionID, forgeSocketToken(key, claims(victim, v.ExecutionID, time.Now().Add(time.Minute).Unix()))), allowedOrigin, true, 403, nil},
		{"valid upgrade over the ip rate limit", socketQuery(victim, l.ExecutionID, l.ResumeToken), allowedOrigin, true, 429, limited},
	} {
		t.Run(tc.name, func(t *testing.T) {
			env := e
			if tc.env != nil {
				env = tc.env
			}
			var status int
			if tc.upgrade {
				_, resp, err := env.dial(t, tc.query, tc.origin)
				if err == nil {
					t.Fatal("upgrade accepted")
				}
				if resp != nil {
					status = resp.StatusCode
				}
			} else {
				req, _ := http.NewRequest("GET", env.srv.URL+"/chat?"+tc.query, nil)
				req.Header.Set("Origin", tc.origin)
				resp, err := http.DefaultClient.Do(req)
				if err != nil {
					t.Fatal(err)
				}
				_, _ = io.Copy(io.Discard, resp.Body)
				_ = resp.Body.Close()
				status = resp.StatusCode
			}
			if status != tc.status {
				t.Fatalf("status %d, want %d", status, tc.status)
			}
			if n := env.n8n.Sockets(); n != 0 {
				t.Fatalf("n8n saw %d socket requests", n)
			}
		})
	}
	// The victim's own upgrade still works, also with a token written out
	// by forgeSocketToken: the refusals above are the claims', not the
	// format's.
	fresh := forgeSocketToken(key, claims(victim, v.ExecutionID, time.Now().Add(time.Minute).Unix()))
	c, _, err := e.dial(t, socketQuery(victim, v.ExecutionID, fresh), allowedOrigin)
	if err != nil {
		t.Fatal(err)
	}
	if got, code := widgetFrames(t, c, victim, "What else do you want to say?", "fine"); len(got) != 5 || code != websocket.StatusNormalClosure {
		t.Fatalf("victim's flow: %q %d", got, code)
	}
}

// Visitor frames other than heartbeat acks and sendMessage answers for
// the socket's own sessionId close the socket with 1008 and never reach
// n8n.
func TestChatSocketInvalidFrames(t *testing.T) {
	e := newSocketEnv(t, "sqlite", fastN8n(sendWaitSend[1:]...), nil)
	for i, frame := range []string{
		`hello`,
		`{"sessionId":"someone-else-000","action":"sendMessage","chatInput":"hi","files":[]}`,
		`{"sessionId":"SID","action":"loadPreviousSession","chatInput":"hi"}`,
		`{"sessionId":"SID","action":"sendMessage","chatInput":"hi","files":[{"name":"a.csv","type":"text/csv","data":"data:text/csv;base64,YQ=="}]}`,
		`{"sessionId":"SID","action":"sendMessage","chatInput":"   "}`,
		`{"sessionId":"SID","action":"sendMessage","chatInput":"hi","extra":1}`,
	} {
		sid := "invalid-frames-" + string(rune('a'+i))
		frame = strings.ReplaceAll(frame, "SID", sid)
		st := e.post(t, sid, "start")
		c, _, err := e.dial(t, socketQuery(sid, st.ExecutionID, st.ResumeToken), allowedOrigin)
		if err != nil {
			t.Fatal(err)
		}
		ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
		if err := c.Write(ctx, websocket.MessageText, []byte(frame)); err != nil {
			t.Fatal(err)
		}
		var code websocket.StatusCode
		for {
			if _, _, err := c.Read(ctx); err != nil {
				code = websocket.CloseStatus(err)
				break
			}
		}
		cancel()
		if code != websocket.StatusPolicyViolation {
			t.Errorf("frame %s: close %d, want 1008", frame, code)
		}
		for _, f := range e.n8n.Frames() {
			if !f.FromN8n && f.Data == frame {
				t.Errorf("frame %s reached n8n", frame)
			}
		}
	}
}

// A visitor who leaves: the proxy acks n8n's heartbeats, so n8n (which
// cancels after AckTimeout without acks) keeps the execution waiting,
// until wait_timeout; then it closes n8n's socket.
func TestChatSocketVisitorLeaves(t *testing.T) {
	opts := fastN8n(testkit.ChatStep{Wait: true, Text: "Approve?"})
	opts.AckTimeout = 500 * time.Millisecond
	e := newSocketEnv(t, "sqlite", opts, func(cp *ChatProxy) { cp.WaitTimeout = caddy.Duration(1500 * time.Millisecond) })
	const sid = "leaving-visitor-01"
	st := e.post(t, sid, "start")
	c, _, err := e.dial(t, socketQuery(sid, st.ExecutionID, st.ResumeToken), allowedOrigin)
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	for {
		_, data, err := c.Read(ctx)
		if err != nil {
			t.Fatal(err)
		}
		if string(data) == "Approve?" {
			break
		}
	}
	left := time.Now()
	_ = c.Close(websocket.StatusGoingAway, "") // the tab closed
	var closedAt time.Time
	waitFor(t, func() bool {
		for _, f := range e.n8n.Frames() {
			if !f.FromN8n && strings.HasPrefix(f.Data, "close ") && f.At.After(left) {
				closedAt = f.At
				return true
			}
		}
		return false
	})
	acks := 0
	for _, f := range e.n8n.Frames() {
		if !f.FromN8n && f.Data == "n8n|heartbeat-ack" && f.At.After(left) {
			acks++
		}
	}
	ex, _ := e.n8n.Execution(st.ExecutionID)
	if waited := closedAt.Sub(left); waited < 1400*time.Millisecond || acks < 3 || ex.Status != "waiting" {
		t.Fatalf("n8n's socket closed after %s, %d acks by the proxy, execution %s; want ≥1.5s, ≥3 acks, waiting", waited, acks, ex.Status)
	}
}

// n8n unreachable on the socket: the visitor's socket is closed with 1011
// at once.
func TestChatSocketN8nUnreachable(t *testing.T) {
	dead := httptest.NewServer(http.NotFoundHandler())
	deadURL := dead.URL
	dead.Close()
	e := newSocketEnv(t, "sqlite", fastN8n(sendWaitSend...), func(cp *ChatProxy) { cp.N8nSocketURL = deadURL })
	const sid = "unreachable-0001"
	st := e.post(t, sid, "start")
	c, _, err := e.dial(t, socketQuery(sid, st.ExecutionID, st.ResumeToken), allowedOrigin)
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	_, _, err = c.Read(ctx)
	if code := websocket.CloseStatus(err); code != websocket.StatusInternalError {
		t.Fatalf("close %d (%v), want 1011", code, err)
	}
}

// Newer n8n sends its own resumeToken and checks it on the socket: the
// widget gets the proxy's token, n8n gets its own.
func TestChatSocketN8nResumeToken(t *testing.T) {
	opts := fastN8n(sendWaitSend...)
	opts.ResumeToken = true
	e := newSocketEnv(t, "sqlite", opts, nil)
	const sid = "newer-n8n-00001"
	st := e.post(t, sid, "hello")
	if strings.HasPrefix(st.ResumeToken, "n8n-token-") {
		t.Fatalf("the widget got n8n's token %q", st.ResumeToken)
	}
	c, _, err := e.dial(t, socketQuery(sid, st.ExecutionID, st.ResumeToken), allowedOrigin)
	if err != nil {
		t.Fatal(err)
	}
	if got, code := widgetFrames(t, c, sid, "What else do you want to say?", "yes"); len(got) != 5 || code != websocket.StatusNormalClosure {
		t.Fatalf("frames %q close %d", got, code)
	}
}

// When Caddy exits, the drain ends the socket with a closing frame (1001).
func TestChatSocketShutdown(t *testing.T) {
	e := newSocketEnv(t, "sqlite", fastN8n(testkit.ChatStep{Wait: true, Text: "Approve?"}), nil)
	const sid = "shutdown-visitor"
	st := e.post(t, sid, "start")
	c, _, err := e.dial(t, socketQuery(sid, st.ExecutionID, st.ResumeToken), allowedOrigin)
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	for {
		_, data, err := c.Read(ctx)
		if err != nil {
			t.Fatal(err)
		}
		if string(data) == "Approve?" {
			break
		}
	}
	e.cp.drain.Start()
	for {
		if _, _, err = c.Read(ctx); err != nil {
			break
		}
	}
	if code := websocket.CloseStatus(err); code != websocket.StatusGoingAway {
		t.Fatalf("close %d (%v), want 1001", code, err)
	}
	if !e.cp.drain.Wait(5 * time.Second) {
		t.Fatal("the socket still counts as running")
	}
}

// The visitor's answers over the socket count against its rate limits
// like messages posted: over the session tier the socket is closed with
// 1013 and the answer never reaches n8n.
func TestChatSocketRateLimited(t *testing.T) {
	e := newSocketEnv(t, "sqlite", fastN8n(testkit.ChatStep{Wait: true, Text: "Q1?"}, testkit.ChatStep{Wait: true, Text: "Q2?"}), func(cp *ChatProxy) {
		// The POST takes one of the session's two; the first answer the other.
		cp.RateLimits = testRates(map[string][]string{"ip": {"100000/1m"}, "session": {"2/1m"}, "domain": {"100000/1m"}, "create": {"100000/1m"}})
	})
	const sid = "rate-limited-visitor"
	st := e.post(t, sid, "start")
	c, _, err := e.dial(t, socketQuery(sid, st.ExecutionID, st.ResumeToken), allowedOrigin)
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	answer := func(text string) {
		frame, _ := json.Marshal(map[string]any{"sessionId": sid, "action": "sendMessage", "chatInput": text, "files": []any{}})
		if err := c.Write(ctx, websocket.MessageText, frame); err != nil {
			t.Fatal(err)
		}
	}
	var code websocket.StatusCode
	for {
		_, data, err := c.Read(ctx)
		if err != nil {
			code = websocket.CloseStatus(err)
			break
		}
		switch string(data) {
		case "Q1?":
			answer("first answer")
		case "Q2?":
			answer("second answer")
		}
	}
	if code != websocket.StatusTryAgainLater {
		t.Fatalf("close %d, want 1013", code)
	}
	for _, f := range e.n8n.Frames() {
		if !f.FromN8n && strings.Contains(f.Data, "second answer") {
			t.Fatal("the answer over the limit reached n8n")
		}
	}
	if ex, _ := e.n8n.Execution(st.ExecutionID); len(ex.Replies) != 1 || ex.Replies[0] != "first answer" {
		t.Fatalf("n8n got %q", ex.Replies)
	}
}

// A frame over the size cap (6 bytes a character of max_message_length
// plus 4 KiB) closes the socket with 1009 and never reaches n8n.
func TestChatSocketFrameTooBig(t *testing.T) {
	e := newSocketEnv(t, "sqlite", fastN8n(testkit.ChatStep{Wait: true, Text: "Q?"}), func(cp *ChatProxy) { cp.MaxMessageLength = 100 })
	const sid = "oversized-frames-1"
	st := e.post(t, sid, "start")
	c, _, err := e.dial(t, socketQuery(sid, st.ExecutionID, st.ResumeToken), allowedOrigin)
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	big := `{"sessionId":"` + sid + `","action":"sendMessage","chatInput":"` + strings.Repeat("x", 6*100+4096) + `","files":[]}`
	if err := c.Write(ctx, websocket.MessageText, []byte(big)); err != nil {
		t.Fatal(err)
	}
	for {
		if _, _, err = c.Read(ctx); err != nil {
			break
		}
	}
	if code := websocket.CloseStatus(err); code != websocket.StatusMessageTooBig {
		t.Fatalf("close %d (%v), want 1009", code, err)
	}
	for _, f := range e.n8n.Frames() {
		if !f.FromN8n && strings.Contains(f.Data, "sendMessage") {
			t.Fatal("the oversized frame reached n8n")
		}
	}
}

// n8n's close reaches the widget as a close frame even when the widget's
// frames are still flowing to n8n as it closes: heartbeats every
// millisecond keep acks in flight, so a write to n8n fails at its close in
// many of the runs. That failed write used to count as the visitor leaving,
// and the widget got the TCP connection dropped (EOF, close -1) instead of
// n8n's normal close: TestChatSocketThroughCaddy's flake under load.
func TestChatSocketCloseWhileAcking(t *testing.T) {
	opts := testkit.N8nChatOptions{Workflow: sendWaitSend, HeartbeatInterval: time.Millisecond, PollInterval: time.Millisecond}
	e := newSocketEnv(t, "sqlite", opts, nil)
	for i := range 40 {
		sid := fmt.Sprintf("03b2b262-5d0f-4c8e-9d65-%012d", i)
		st := e.post(t, sid, "widget hello")
		c, _, err := e.dial(t, socketQuery(sid, st.ExecutionID, st.ResumeToken), allowedOrigin)
		if err != nil {
			t.Fatal(err)
		}
		got, code := playWidget(t, c, sid, "What else do you want to say?", "typed reply", false)
		if code != websocket.StatusNormalClosure {
			t.Fatalf("run %d: close %d after %q, want 1000", i, code, got)
		}
	}
}
