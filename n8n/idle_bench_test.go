package n8n

import (
	"bufio"
	"context"
	"io"
	"net"
	"net/http"
	"runtime"
	"strconv"
	"sync"
	"testing"
	"time"
)

// idleServer answers every connection with the head of a stream and its
// first text, then says nothing more until the connection is closed: n8n while
// an agent thinks. It keeps no goroutine or buffer per connection, so
// that the memory measured is the client's.
func idleServer(b *testing.B, contentType, body string) (addr string, closeConns func()) {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		b.Fatal(err)
	}
	head := "HTTP/1.1 200 OK\r\nContent-Type: " + contentType + "\r\nTransfer-Encoding: chunked\r\n\r\n"
	var mu sync.Mutex
	var conns []net.Conn
	go func() {
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			// Read the request first (sequentially: no goroutine per
			// connection), or the client drops the answer as unsolicited.
			req, err := http.ReadRequest(bufio.NewReader(c))
			if err != nil {
				_ = c.Close()
				continue
			}
			_, _ = io.Copy(io.Discard, req.Body)
			_, _ = c.Write([]byte(head + strconv.FormatInt(int64(len(body)), 16) + "\r\n" + body + "\r\n"))
			mu.Lock()
			conns = append(conns, c)
			mu.Unlock()
		}
	}()
	b.Cleanup(func() { _ = ln.Close() })
	return ln.Addr().String(), func() {
		mu.Lock()
		defer mu.Unlock()
		for _, c := range conns {
			_ = c.Close()
		}
		conns = nil
	}
}

// Memory held by each idle reply: 256 replies whose first text was read
// and whose caller waits in Next, as the chat route does while n8n is
// silent. B/stream is the live heap plus goroutine stacks per reply, on
// the client side (transport connection, reader buffers, timers, the
// waiting goroutine).
func BenchmarkIdleReply(b *testing.B) {
	for _, bc := range []struct{ name, contentType, body string }{
		{"ndjson", "application/json; charset=utf-8", `{"type":"begin"}` + "\n" + `{"type":"item","content":"hi"}` + "\n"},
		{"sse", "text/event-stream", "data: hi\n\n"},
		{"text", "text/plain; charset=utf-8", "hi"},
	} {
		b.Run(bc.name, func(b *testing.B) { benchIdleReply(b, bc.contentType, bc.body) })
	}
}

func benchIdleReply(b *testing.B, contentType, body string) {
	const streams = 256
	addr, closeConns := idleServer(b, contentType, body)
	c, err := New(Config{
		WebhookURL: "http://" + addr + "/webhook/chat", SessionSecret: benchSecret,
		StreamIdleTimeout: time.Minute, MaxStreamDuration: time.Minute,
	})
	if err != nil {
		b.Fatal(err)
	}
	defer c.Close()
	used := func() (heap, stack uint64) {
		runtime.GC()
		var m runtime.MemStats
		runtime.ReadMemStats(&m)
		return m.HeapAlloc, m.StackInuse
	}
	var heapSum, stackSum float64
	for b.Loop() {
		heap0, stack0 := used()
		replies := make([]*Reply, streams)
		var sent, ended sync.WaitGroup
		for i := range replies {
			sent.Add(1)
			ended.Add(1)
			go func() {
				defer ended.Done()
				r, err := c.Send(context.Background(), benchRequest())
				if err != nil {
					b.Error(err)
					sent.Done()
					return
				}
				replies[i] = r
				sent.Done()
				_, _ = r.Next() // blocks until Close
			}()
		}
		sent.Wait()
		time.Sleep(50 * time.Millisecond) // let every caller reach Next
		heap1, stack1 := used()
		heapSum += float64(heap1) - float64(heap0)
		stackSum += float64(stack1) - float64(stack0)
		for _, r := range replies {
			if r != nil {
				_ = r.Close()
			}
		}
		ended.Wait()
		closeConns()
		c.transport.CloseIdleConnections()
	}
	n := float64(b.N) * streams
	b.ReportMetric(heapSum/n, "heapB/stream")
	b.ReportMetric((heapSum+stackSum)/n, "B/stream")
}
