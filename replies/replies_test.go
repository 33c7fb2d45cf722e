package replies_test

import (
	"context"
	"crypto/rand"
	"strconv"
	"testing"
	"time"

	"github.com/chatproxy/caddy-chatproxy/guard"
	"github.com/chatproxy/caddy-chatproxy/internal/testenv"
	"github.com/chatproxy/caddy-chatproxy/replies"
	"github.com/redis/go-redis/v9"
)

// hubs returns two hubs (two instances) on the test Redis under a fresh
// key prefix, the first appending with appendEvery, and that client.
func hubs(t *testing.T, appendEvery time.Duration) (*redis.Client, string, *replies.Hub, *replies.Hub) {
	t.Helper()
	opts, err := guard.RedisOptions(testenv.RedisURL(t))
	if err != nil {
		t.Fatal(err)
	}
	rdb := redis.NewClient(opts)
	t.Cleanup(func() { _ = rdb.Close() })
	prefix := "chatproxy-test:" + rand.Text() + ":"
	a := replies.NewHub(replies.Config{Redis: rdb, Prefix: prefix, AppendEvery: appendEvery})
	b := replies.NewHub(replies.Config{Redis: rdb, Prefix: prefix})
	t.Cleanup(a.Close)
	t.Cleanup(b.Close)
	return rdb, prefix, a, b
}

// waitLen waits (up to 10 s) until the Stream key holds want entries.
func waitLen(t *testing.T, rdb *redis.Client, key string, want int64) {
	t.Helper()
	deadline := time.Now().Add(10 * time.Second)
	for {
		n, err := rdb.XLen(context.Background(), key).Result()
		if err == nil && n == want {
			return
		}
		if time.Now().After(deadline) {
			t.Fatalf("%s holds %d entries (err %v), want %d", key, n, err, want)
		}
		time.Sleep(10 * time.Millisecond)
	}
}

// TestStreamAppendsGather: events wait AppendEvery for those that follow
// to go to the Redis Stream together, except that an error, the end or
// Close sends them at once; a follower on another instance gets every
// event once, in order, and a follower here each one as it is published.
func TestStreamAppendsGather(t *testing.T) {
	ctx := context.Background()
	for _, tc := range []struct {
		name  string
		every time.Duration
		last  func(l *replies.Live) // after the items
		want  int64                 // entries once last ran
	}{
		{"end", time.Hour, func(l *replies.Live) { l.End() }, 1 + 3 + 1},
		{"error", time.Hour, func(l *replies.Live) { l.Error("n8n_error", "broke off") }, 1 + 3 + 1},
		{"close", time.Hour, func(l *replies.Live) { l.Close() }, 1 + 3},
		{"every", 20 * time.Millisecond, func(*replies.Live) {}, 1 + 3},
	} {
		t.Run(tc.name, func(t *testing.T) {
			rdb, prefix, a, b := hubs(t, tc.every)
			id := "msg-" + tc.name
			key := prefix + "reply:{" + id + "}"
			l := a.Begin(id, func() {})
			defer l.Close()
			local, err := a.Follow(id, 1)
			if err != nil {
				t.Fatal(err)
			}
			defer local.Close()
			for i := range 3 {
				if got := l.Item("part " + strconv.Itoa(i)); got != uint64(i+2) {
					t.Fatalf("item %d has id %d", i, got)
				}
				evs, err := local.Next(ctx) // not held here
				if err != nil || len(evs) != 1 || evs[0].ID != uint64(i+2) {
					t.Fatalf("local follower: %v, %v", evs, err)
				}
			}
			if tc.every == time.Hour {
				// Time enough for a publisher that did not wait to send them.
				time.Sleep(200 * time.Millisecond)
				if n := rdb.XLen(ctx, key).Val(); n != 0 {
					t.Fatalf("%d entries while the events wait, want none", n)
				}
			}
			tc.last(l)
			waitLen(t, rdb, key, tc.want)
			if tc.name == "close" {
				return
			}
			l.End()
			// Another instance reads them all from the Stream, in order.
			f, err := b.Follow(id, 0)
			if err != nil {
				t.Fatal(err)
			}
			defer f.Close()
			var got []replies.Event
			cctx, cancel := context.WithTimeout(ctx, 10*time.Second)
			defer cancel()
			for len(got) == 0 || got[len(got)-1].Type != replies.TypeEnd {
				evs, err := f.Next(cctx)
				if err != nil {
					t.Fatalf("after %d events: %v", len(got), err)
				}
				got = append(got, evs...)
			}
			for i, ev := range got {
				if ev.ID != uint64(i+1) {
					t.Fatalf("event %d has id %d: %+v", i, ev.ID, got)
				}
			}
			if len(got) < 5 || got[0].Type != replies.TypeBegin || got[1].Content != "part 0" || got[3].Content != "part 2" {
				t.Fatalf("events %+v", got)
			}
		})
	}
}
