package n8n

import (
	"errors"
	"io"
	"net/url"
	"testing"
)

// TestExecutionStarted: with ResponseNodes, n8n's executionStarted answer
// is a Reply carrying the execution id (and n8n's own resumeToken), with
// no text; an answer whose id or token could not go into a URL is an
// invalid reply either way.
func TestExecutionStarted(t *testing.T) {
	for _, tc := range []struct {
		name, body  string
		id, token   string
		wantInvalid bool
	}{
		{name: "n8n 2.8.4", body: `{"executionStarted":true,"executionId":"41"}`, id: "41"},
		{name: "newer n8n", body: `{"executionStarted":true,"executionId":"42","resumeToken":"a1b2-c3"}`, id: "42", token: "a1b2-c3"},
		{name: "numeric id", body: `{"executionStarted":true,"executionId":43}`, id: "43"},
		{name: "no id", body: `{"executionStarted":true}`, wantInvalid: true},
		{name: "id with a query", body: `{"executionStarted":true,"executionId":"1&isPublic=false"}`, wantInvalid: true},
		{name: "token with a space", body: `{"executionStarted":true,"executionId":"1","resumeToken":"a b"}`, wantInvalid: true},
	} {
		t.Run(tc.name, func(t *testing.T) {
			f := newFake(t, reply(200, "application/json; charset=utf-8", tc.body))
			c := newClient(t, testConfig(f))
			req := testRequest()
			req.ResponseNodes = true
			r, err := c.Send(t.Context(), req)
			if tc.wantInvalid {
				if e := asError(t, err); e.Reason != ReasonInvalid {
					t.Fatalf("reason %s, want %s", e.Reason, ReasonInvalid)
				}
				return
			}
			if err != nil {
				t.Fatal(err)
			}
			defer r.Close()
			st := r.Started()
			if st == nil || st.ExecutionID != tc.id || st.ResumeToken != tc.token {
				t.Fatalf("started %+v, want id %q token %q", st, tc.id, tc.token)
			}
			if text, err := r.Next(); text != "" || !errors.Is(err, io.EOF) {
				t.Fatalf("Next = %q, %v; want no text", text, err)
			}
			if c.State() != StateClosed {
				t.Fatalf("breaker %s", c.State())
			}

			// Without ResponseNodes the same answer stays an error.
			_, err = c.Send(t.Context(), testRequest())
			if e := asError(t, err); e.Reason != ReasonExecutionStarted {
				t.Fatalf("without ResponseNodes: reason %s", e.Reason)
			}
		})
	}
}

func TestSocketURL(t *testing.T) {
	hook, _ := url.Parse("https://n8n.example.com/webhook/abc/chat")
	plain, _ := url.Parse("http://n8n:5678/webhook/abc/chat")
	for _, tc := range []struct {
		raw     string
		webhook *url.URL
		want    string
		bad     bool
	}{
		{webhook: hook, want: "wss://n8n.example.com/chat"},
		{webhook: plain, want: "ws://n8n:5678/chat"},
		{raw: "http://n8n-main:5678", webhook: hook, want: "ws://n8n-main:5678/chat"},
		{raw: "wss://main.internal/chat", webhook: hook, want: "wss://main.internal/chat"},
		{raw: "https://main.internal/", webhook: hook, want: "wss://main.internal/chat"},
		{raw: "ftp://main.internal/", webhook: hook, bad: true},
		{raw: "ws://user:pw@main/", webhook: hook, bad: true},
		{raw: "ws://main/chat?x=1", webhook: hook, bad: true},
		{raw: "/chat", webhook: hook, bad: true},
	} {
		got, err := socketURL(tc.raw, tc.webhook)
		if (err != nil) != tc.bad || got != tc.want {
			t.Errorf("socketURL(%q) = %q, %v; want %q (error %v)", tc.raw, got, err, tc.want, tc.bad)
		}
	}
}
