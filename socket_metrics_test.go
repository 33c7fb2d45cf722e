package chatproxy

import (
	"context"
	"strings"
	"testing"
	"time"

	"github.com/coder/websocket"
)

// The chat socket's metrics: refused upgrades by reason, the widget
// sockets open, the frames relayed each way (as many as the stand-in n8n
// saw), and each socket's end by reason.
func TestMetricsChatSocket(t *testing.T) {
	open := mx("active_sockets")
	toN8n, toVisitor := mx("socket_frames_total", "direction", "to_n8n"), mx("socket_frames_total", "direction", "to_visitor")
	refused := func(reason string) mxKey { return mx("socket_upgrades_refused_total", "reason", reason) }
	closed := func(reason string) mxKey { return mx("socket_closes_total", "reason", reason) }
	keys := []mxKey{open, toN8n, toVisitor, refused("origin"), refused("token"), refused("rate_limited"),
		closed("n8n_closed"), closed("invalid_frame"), closed("visitor_left"), closed("frame_too_big"), closed("rate_limited")}

	// One env whose ip tier allows three requests: the flow's POST, its
	// upgrade and the visitor's answer over the socket, so the next
	// upgrade is over the limit.
	// n8n's heartbeat only on connect: the frames each way are then known
	// exactly (no ack can race n8n's close).
	opts := fastN8n(sendWaitSend...)
	opts.HeartbeatInterval = time.Hour
	e := newSocketEnv(t, "sqlite", opts, func(cp *ChatProxy) {
		cp.RateLimits = testRates(map[string][]string{"ip": {"3/1m"}, "session": {"100000/1m"}, "domain": {"100000/1m"}, "create": {"100000/1m"}})
	})
	d := mxWatch(t, keys...)
	const sid = "socket-metrics-flow-1"
	st := e.post(t, sid, "hello")
	if _, resp, err := e.dial(t, socketQuery(sid, st.ExecutionID, st.ResumeToken), "https://evil.example.net"); err == nil || resp == nil || resp.StatusCode != 403 {
		t.Fatalf("wrong origin: %v", err)
	}
	if _, resp, err := e.dial(t, socketQuery(sid, st.ExecutionID, ""), allowedOrigin); err == nil || resp == nil || resp.StatusCode != 403 {
		t.Fatalf("no token: %v", err)
	}
	c, _, err := e.dial(t, socketQuery(sid, st.ExecutionID, st.ResumeToken), allowedOrigin)
	if err != nil {
		t.Fatal(err)
	}
	d.eventually(map[mxKey]float64{open: 1})
	if got, code := widgetFrames(t, c, sid, "What else do you want to say?", "typed reply"); len(got) != 5 || code != websocket.StatusNormalClosure {
		t.Fatalf("flow: %q %d", got, code)
	}
	var fromN8n, fromVisitor float64
	for _, f := range e.n8n.Frames() {
		switch {
		case f.Execution != st.ExecutionID || strings.HasPrefix(f.Data, "close ") || strings.HasPrefix(f.Data, "terminate") ||
			strings.HasPrefix(f.Data, "open ") || strings.HasPrefix(f.Data, "dropped "):
		case f.FromN8n:
			fromN8n++
		default:
			fromVisitor++
		}
	}
	d.eventually(map[mxKey]float64{
		open: 0, toN8n: fromVisitor, toVisitor: fromN8n, closed("n8n_closed"): 1,
		refused("origin"): 1, refused("token"): 1, refused("rate_limited"): 0,
	})
	if fromVisitor != 2 || fromN8n != 6 { // an ack and the answer; a heartbeat, five messages
		t.Fatalf("the stand-in saw %v frames from the visitor, %v from n8n; want 2 and 6", fromVisitor, fromN8n)
	}
	// The token is still fresh; the ip tier is spent.
	if _, resp, err := e.dial(t, socketQuery(sid, st.ExecutionID, st.ResumeToken), allowedOrigin); err == nil || resp == nil || resp.StatusCode != 429 {
		t.Fatalf("over the ip limit: %v", err)
	}
	d.want(map[mxKey]float64{refused("rate_limited"): 1})

	// Sockets that end otherwise: refused frames, a visitor who leaves.
	e = newSocketEnv(t, "sqlite", fastN8n(sendWaitSend[1:]...), func(cp *ChatProxy) { cp.MaxMessageLength = 100 })
	d = mxWatch(t, keys...)
	for i, frame := range []string{"hello", strings.Repeat("x", 6*100+4096+1), ""} {
		sid := "socket-metrics-end-" + string(rune('a'+i))
		st := e.post(t, sid, "start")
		c, _, err := e.dial(t, socketQuery(sid, st.ExecutionID, st.ResumeToken), allowedOrigin)
		if err != nil {
			t.Fatal(err)
		}
		ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
		if frame == "" {
			_ = c.Close(websocket.StatusGoingAway, "") // the tab closed
		} else {
			if err := c.Write(ctx, websocket.MessageText, []byte(frame)); err != nil {
				t.Fatal(err)
			}
			for {
				if _, _, err := c.Read(ctx); err != nil {
					break
				}
			}
		}
		cancel()
	}
	d.eventually(map[mxKey]float64{open: 0, closed("invalid_frame"): 1, closed("frame_too_big"): 1, closed("visitor_left"): 1, closed("n8n_closed"): 0})
}
