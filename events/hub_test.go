package events

import (
	"context"
	"crypto/rand"
	"fmt"
	"net"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/redis/go-redis/v9"

	"github.com/chatproxy/caddy-chatproxy/internal/testenv"
)

func recv(t *testing.T, s *Subscription) string {
	t.Helper()
	select {
	case p := <-s.C():
		return string(p)
	case <-s.Done():
		t.Fatal("subscription ended")
	case <-time.After(10 * time.Second):
		t.Fatal("no event within 10s")
	}
	return ""
}

func noEvent(t *testing.T, s *Subscription) {
	t.Helper()
	select {
	case p := <-s.C():
		t.Fatalf("unexpected event %s", p)
	default:
	}
}

// TestHubInProcess: a payload reaches the subscribers of its session
// only, in order; a closed subscription gets nothing more.
func TestHubInProcess(t *testing.T) {
	h := New(nil, "", nil)
	defer h.Close()
	ctx := context.Background()
	a1, _ := h.Subscribe(ctx, "a")
	a2, _ := h.Subscribe(ctx, "a")
	b, _ := h.Subscribe(ctx, "b")
	for i := range 3 {
		if err := h.Publish(ctx, "a", fmt.Appendf(nil, "m%d", i)); err != nil {
			t.Fatal(err)
		}
	}
	for _, s := range []*Subscription{a1, a2} {
		for i := range 3 {
			if got := recv(t, s); got != fmt.Sprintf("m%d", i) {
				t.Fatalf("got %s, want m%d", got, i)
			}
		}
	}
	noEvent(t, b)
	a1.Close()
	_ = h.Publish(ctx, "a", []byte("late"))
	noEvent(t, a1)
	if got := recv(t, a2); got != "late" {
		t.Fatal(got)
	}
	if n := h.Subscribers(); n != 2 {
		t.Fatalf("Subscribers = %d, want 2", n)
	}
	if err := h.Publish(ctx, "a\nb", nil); err == nil {
		t.Fatal("a session id with a newline was published")
	}
}

// TestHubSlowSubscriberClosed: a subscriber that lets SubscriberBuffer
// events pile up is closed; the others keep receiving.
func TestHubSlowSubscriberClosed(t *testing.T) {
	h := New(nil, "", nil)
	defer h.Close()
	ctx := context.Background()
	slow, _ := h.Subscribe(ctx, "s")
	fast, _ := h.Subscribe(ctx, "s")
	for i := range SubscriberBuffer + 1 {
		_ = h.Publish(ctx, "s", []byte("x"))
		if got := recv(t, fast); got != "x" {
			t.Fatalf("fast subscriber, event %d: %s", i, got)
		}
	}
	select {
	case <-slow.Done():
	default:
		t.Fatal("slow subscriber not closed")
	}
	if n := h.Subscribers(); n != 1 {
		t.Fatalf("Subscribers = %d, want 1", n)
	}
}

// TestHubClose: Close ends every subscription and refuses new ones.
func TestHubClose(t *testing.T) {
	h := New(nil, "", nil)
	s, _ := h.Subscribe(context.Background(), "x")
	h.Close()
	select {
	case <-s.Done():
	case <-time.After(10 * time.Second):
		t.Fatal("subscription not ended by Close")
	}
	if _, err := h.Subscribe(context.Background(), "x"); err != ErrClosed {
		t.Fatalf("Subscribe after Close = %v, want ErrClosed", err)
	}
	h.Close() // twice is fine
}

func testClient(t *testing.T) *redis.Client {
	opts, err := redis.ParseURL(testenv.RedisURL(t))
	if err != nil {
		t.Fatal(err)
	}
	c := redis.NewClient(opts)
	t.Cleanup(func() { _ = c.Close() })
	return c
}

// TestHubAcrossInstances: two hubs on one Redis channel, each with its
// own client as two Caddy instances have: what one publishes reaches the
// other's subscribers (and its own), and Subscribe returns only once the
// channel subscription is live, so nothing published after it is lost.
func TestHubAcrossInstances(t *testing.T) {
	channel := "chatproxy-test-" + rand.Text()[:12]
	a := New(testClient(t), channel, nil)
	b := New(testClient(t), channel, nil)
	defer a.Close()
	defer b.Close()
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	sb, err := b.Subscribe(ctx, "visitor")
	if err != nil {
		t.Fatal(err)
	}
	sa, err := a.Subscribe(ctx, "visitor")
	if err != nil {
		t.Fatal(err)
	}
	if err := a.Publish(ctx, "visitor", []byte(`{"event":"message"}`)); err != nil {
		t.Fatal(err)
	}
	if got := recv(t, sb); got != `{"event":"message"}` {
		t.Fatalf("other instance got %s", got)
	}
	if got := recv(t, sa); got != `{"event":"message"}` {
		t.Fatalf("publishing instance got %s", got)
	}
	_ = a.Publish(ctx, "someone-else", []byte("x"))
	_ = a.Publish(ctx, "visitor", []byte("y"))
	if got := recv(t, sb); got != "y" {
		t.Fatalf("got %s, want only the visitor's y", got)
	}
}

// TestHubRedisDown: with Redis unreachable Subscribe and Publish fail
// (the events route answers 503; a push is stored and caught up later).
func TestHubRedisDown(t *testing.T) {
	c := redis.NewClient(&redis.Options{Addr: "127.0.0.1:1", MaxRetries: -1, DialTimeout: time.Second})
	defer c.Close()
	h := New(c, "x", nil)
	defer h.Close()
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	if _, err := h.Subscribe(ctx, "s"); err == nil {
		t.Fatal("Subscribe with Redis down succeeded")
	}
	if h.Subscribers() != 0 {
		t.Fatal("a failed Subscribe left a subscriber")
	}
	if err := h.Publish(ctx, "s", []byte("x")); err == nil {
		t.Fatal("Publish with Redis down succeeded")
	}
}

// TestHubRedisFailsEveryWaiter: when the Hub's Redis subscription fails,
// every Subscribe that was waiting for it fails, not only the first to
// look: another would get a stream that nothing is ever delivered to.
func TestHubRedisFailsEveryWaiter(t *testing.T) {
	// A Redis that accepts connections and never answers, until it goes.
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	var (
		mu    sync.Mutex
		conns []net.Conn
	)
	go func() {
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			mu.Lock()
			conns = append(conns, c)
			mu.Unlock()
		}
	}()
	c := redis.NewClient(&redis.Options{Addr: ln.Addr().String(), MaxRetries: -1, DialTimeout: time.Second, ReadTimeout: time.Minute})
	defer c.Close()
	h := New(c, "x", nil)
	defer h.Close()
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	const n = 3
	errs := make(chan error, n)
	for i := range n {
		go func() {
			s, err := h.Subscribe(ctx, fmt.Sprint("s", i))
			if err == nil {
				s.Close()
			}
			errs <- err
		}()
	}
	// All of them wait on the one subscription Redis does not confirm.
	for deadline := time.Now().Add(10 * time.Second); ; time.Sleep(10 * time.Millisecond) {
		mu.Lock()
		held := len(conns)
		mu.Unlock()
		if h.Subscribers() == n && held > 0 {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("%d subscribers waiting, %d connections", h.Subscribers(), held)
		}
	}
	_ = ln.Close()
	mu.Lock()
	for _, c := range conns {
		_ = c.Close()
	}
	mu.Unlock()
	for range n {
		if err := <-errs; err == nil {
			t.Error("a Subscribe succeeded though the Redis subscription failed")
		}
	}
	if got := h.Subscribers(); got != 0 {
		t.Fatalf("%d subscribers left", got)
	}
}

// TestHubRedisReconnectEndsStreams: go-redis makes a dropped pub/sub
// connection again and subscribes again by itself, but what was published
// meanwhile never arrives. The open subscriptions end when that happens,
// so that their pages reconnect and catch up from the store instead of
// silently missing a message; the hub itself keeps working.
func TestHubRedisReconnectEndsStreams(t *testing.T) {
	opts, err := redis.ParseURL(testenv.RedisURL(t))
	if err != nil {
		t.Fatal(err)
	}
	name := "chatproxy-test-" + rand.Text()[:12]
	opts.ClientName = name
	c := redis.NewClient(opts)
	t.Cleanup(func() { _ = c.Close() })
	channel := name + ":events"
	h := New(c, channel, nil)
	defer h.Close()
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	s, err := h.Subscribe(ctx, "visitor")
	if err != nil {
		t.Fatal(err)
	}
	// Drop this hub's own subscription connection (and nothing else).
	admin := testClient(t)
	list, err := admin.ClientList(ctx).Result()
	if err != nil {
		t.Fatal(err)
	}
	killed := 0
	for _, line := range strings.Split(list, "\n") {
		if strings.Contains(line, " name="+name+" ") && strings.Contains(line, "sub=1") {
			id, _, _ := strings.Cut(strings.TrimPrefix(line, "id="), " ")
			if err := admin.Do(ctx, "CLIENT", "KILL", "ID", id).Err(); err != nil {
				t.Fatal(err)
			}
			killed++
		}
	}
	if killed != 1 {
		t.Fatalf("%d subscription connections named %s", killed, name)
	}
	select {
	case <-s.Done():
	case <-time.After(20 * time.Second):
		t.Fatal("the subscription went on after its Redis connection was dropped and made again")
	}
	// Subscribed again: a new subscription gets what is published.
	s2, err := h.Subscribe(ctx, "visitor")
	if err != nil {
		t.Fatal(err)
	}
	for deadline := time.Now().Add(20 * time.Second); ; {
		if err := h.Publish(ctx, "visitor", []byte("after")); err != nil {
			t.Fatal(err)
		}
		select {
		case p := <-s2.C():
			if string(p) != "after" {
				t.Fatalf("got %s", p)
			}
			return
		case <-s2.Done():
			// Ended by the resubscription racing this Subscribe: again.
			if s2, err = h.Subscribe(ctx, "visitor"); err != nil {
				t.Fatal(err)
			}
		case <-time.After(200 * time.Millisecond):
		}
		if time.Now().After(deadline) {
			t.Fatal("nothing published reached a new subscription")
		}
	}
}
