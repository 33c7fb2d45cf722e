package n8n

import (
	"net/http/httptest"
	"testing"
)

func TestIsWaitingLink(t *testing.T) {
	for _, tc := range []struct {
		target string
		want   bool
	}{
		{"/webhook-waiting/44/node-1?approved=true&signature=ab12", true},
		{"/webhook-waiting/44/0b8e-uuid?signature=ab12&approved=false", true},
		{"/webhook-waiting/44/node-1?approved=true", false}, // unsigned
		{"/webhook-waiting/44/node-1?approved=true&signature=", false},
		{"/webhook-waiting/44?signature=ab12", false}, // no node: a Wait node's resume URL
		{"/webhook-waiting/44/?signature=ab12", false},
		{"/webhook-waiting//node?signature=ab12", false},
		{"/webhook-waiting/44/node/extra?signature=ab12", false},
		{"/webhook-waiting/../chat/x?signature=ab12", false},
		{"/webhook-waiting/44/..?signature=ab12", false},
		{"/webhook/abc/chat?signature=ab12", false},
		{"/webhook-waitingx/44/n?signature=ab12", false},
	} {
		r := httptest.NewRequest("GET", "http://proxy.test"+tc.target, nil)
		if got := IsWaitingLink(r); got != tc.want {
			t.Errorf("%s: %v, want %v", tc.target, got, tc.want)
		}
	}
}
