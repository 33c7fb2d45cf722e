package streaming_test

import (
	"fmt"
	"net/http/httptest"

	"github.com/chatproxy/caddy-chatproxy/streaming"
)

func ExampleSSEWriter() {
	rec := httptest.NewRecorder()
	sw := streaming.NewSSEWriter(rec, streaming.Options{KeepaliveInterval: -1})
	sw.Header().Set("X-Message-ID", "m1")
	_ = sw.Start() // begin, naming the reply of X-Message-ID
	_ = sw.Item("Hello\nworld")
	_ = sw.Error("upstream_timeout", "n8n took too long")
	_ = sw.Done() // end, then [DONE]
	fmt.Print(rec.Body.String())
	// Output:
	// id: 1
	// data: {"type":"begin","message_id":"m1"}
	//
	// id: 2
	// data: {"type":"item","content":"Hello\nworld"}
	//
	// id: 3
	// data: {"type":"error","error":"upstream_timeout","message":"n8n took too long"}
	//
	// id: 4
	// data: {"type":"end"}
	//
	// data: [DONE]
}

func ExampleNDJSONWriter() {
	rec := httptest.NewRecorder()
	nw := streaming.NewNDJSONWriter(rec, streaming.Options{KeepaliveInterval: -1, NodeID: "n1", NodeName: "Bot"})
	_ = nw.Start() // begin
	_ = nw.Item("Hi")
	_ = nw.Done() // end
	fmt.Println(rec.Header().Get("Content-Type"), rec.Header().Get("Cache-Control"), rec.Header().Get("Incremental"))
	fmt.Println(len(rec.Body.String()) > 0)
	// Output:
	// application/x-ndjson; charset=utf-8 no-cache, no-transform ?1
	// true
}
