// Package events carries what is pushed into a conversation (a message, a
// change of mode) to the visitor pages that have its events stream open:
// through Redis pub/sub when a client is given, so that a page connected
// to any instance receives what was pushed at any other, else within this
// process.
//
// One Redis connection per Hub subscribes to one channel for the whole
// site; each payload names its session, and the Hub hands it to that
// session's local subscribers. Pub/sub delivers at most once: a page that
// was not connected (or whose connection to Redis was being re-made)
// catches up from the stored history, which is why every event that
// matters is stored before it is published.
package events

import (
	"context"
	"errors"
	"strings"
	"sync"

	"github.com/redis/go-redis/v9"
	"go.uber.org/zap"
)

// DefaultChannel is the Redis channel of a Hub given none.
const DefaultChannel = "chatproxy:events"

// SubscriberBuffer is how many events a subscriber may have waiting; one
// that falls further behind is closed (its page reconnects and catches up
// from history) rather than holding the others up.
const SubscriberBuffer = 64

// ErrClosed is returned by Subscribe once the Hub is shut down.
var ErrClosed = errors.New("events: hub closed")

// Hub fans events out to subscribers by session. The zero value is not
// usable; use New.
type Hub struct {
	client  redis.UniversalClient // nil: in-process only
	channel string
	logger  *zap.Logger

	mu     sync.Mutex
	subs   map[string]map[*Subscription]struct{}
	closed bool
	// The Redis subscription, made on first use (start; nil again after
	// it failed, so that the next Subscribe tries again); cancel ends it.
	start  *attempt
	cancel context.CancelFunc
	done   chan struct{}
}

// attempt is one try at the Redis subscription: ready is closed once it
// is confirmed, or failed with err (set before ready is closed), which
// every Subscribe waiting for it sees.
type attempt struct {
	ready chan struct{}
	err   error
}

// New returns a Hub. With a Redis client, events travel through channel
// (DefaultChannel when empty); nothing connects before the first
// Subscribe or Publish.
func New(client redis.UniversalClient, channel string, logger *zap.Logger) *Hub {
	if channel == "" {
		channel = DefaultChannel
	}
	if logger == nil {
		logger = zap.NewNop()
	}
	return &Hub{client: client, channel: channel, logger: logger, subs: map[string]map[*Subscription]struct{}{}}
}

// Subscription receives the events of one session.
type Subscription struct {
	hub       *Hub
	sessionID string
	c         chan []byte
	done      chan struct{}
	once      sync.Once
}

// C delivers the session's event payloads, in the order published.
func (s *Subscription) C() <-chan []byte { return s.c }

// Done is closed when the subscription ends: Close, the Hub shutting
// down, or the subscriber falling too far behind.
func (s *Subscription) Done() <-chan struct{} { return s.done }

// Close ends the subscription.
func (s *Subscription) Close() {
	s.hub.mu.Lock()
	s.hub.removeLocked(s)
	s.hub.mu.Unlock()
}

// Subscribe starts receiving sessionID's events. With Redis it returns
// once the Hub's channel subscription is confirmed, so that nothing
// published after it returns is missed.
func (h *Hub) Subscribe(ctx context.Context, sessionID string) (*Subscription, error) {
	h.mu.Lock()
	if h.closed {
		h.mu.Unlock()
		return nil, ErrClosed
	}
	s := &Subscription{hub: h, sessionID: sessionID, c: make(chan []byte, SubscriberBuffer), done: make(chan struct{})}
	set := h.subs[sessionID]
	if set == nil {
		set = map[*Subscription]struct{}{}
		h.subs[sessionID] = set
	}
	set[s] = struct{}{}
	a := h.startLocked()
	h.mu.Unlock()
	if a == nil {
		return s, nil
	}
	select {
	case <-a.ready:
	case <-ctx.Done():
		s.Close()
		return nil, ctx.Err()
	}
	if a.err != nil {
		s.Close()
		h.mu.Lock()
		closed := h.closed
		h.mu.Unlock()
		if closed {
			return nil, ErrClosed
		}
		return nil, a.err
	}
	return s, nil
}

// startLocked starts the Redis subscription if it is not running and
// returns what to wait on (nil without Redis).
func (h *Hub) startLocked() *attempt {
	if h.client == nil {
		return nil
	}
	if h.start != nil {
		return h.start
	}
	a := &attempt{ready: make(chan struct{})}
	h.start = a
	ctx, cancel := context.WithCancel(context.Background())
	h.cancel = cancel
	done := make(chan struct{})
	h.done = done
	go h.listen(ctx, cancel, a, done)
	return a
}

// listen holds the Hub's Redis subscription: confirms it, then delivers
// each message until ctx ends. go-redis re-makes a dropped connection and
// subscribes again on its own; the open subscriptions then end, since
// they may have missed something.
func (h *Hub) listen(ctx context.Context, cancel context.CancelFunc, a *attempt, done chan struct{}) {
	defer close(done)
	ps := h.client.Subscribe(ctx, h.channel)
	defer ps.Close()
	if _, err := ps.Receive(ctx); err != nil {
		cancel()
		a.err = err
		h.mu.Lock()
		if h.start == a {
			h.start = nil
		}
		h.mu.Unlock()
		close(a.ready)
		return
	}
	close(a.ready)
	ch := ps.ChannelWithSubscriptions()
	for {
		select {
		case <-ctx.Done():
			return
		case m, ok := <-ch:
			if !ok {
				return
			}
			switch m := m.(type) {
			case *redis.Subscription:
				if m.Kind == "subscribe" {
					// Subscribed again: the connection was lost and made
					// again, and what was published meanwhile is lost.
					h.endAll()
				}
			case *redis.Message:
				sessionID, payload, found := strings.Cut(m.Payload, "\n")
				if !found {
					continue
				}
				h.deliver(sessionID, []byte(payload))
			}
		}
	}
}

// endAll ends every open subscription (their pages reconnect and catch
// up from the store); new ones are taken as before.
func (h *Hub) endAll() {
	h.mu.Lock()
	defer h.mu.Unlock()
	n := 0
	for _, set := range h.subs {
		for s := range set {
			h.removeLocked(s)
			n++
		}
	}
	if n > 0 {
		h.logger.Warn("the Redis subscription was made again; open events streams end and their pages catch up from history",
			zap.Int("streams", n))
	}
}

// Publish sends payload to sessionID's subscribers on every instance
// (with Redis) or in this process.
func (h *Hub) Publish(ctx context.Context, sessionID string, payload []byte) error {
	if strings.ContainsRune(sessionID, '\n') {
		return errors.New("events: session id holds a newline")
	}
	if h.client == nil {
		h.deliver(sessionID, payload)
		return nil
	}
	msg := make([]byte, 0, len(sessionID)+1+len(payload))
	msg = append(append(append(msg, sessionID...), '\n'), payload...)
	if err := h.client.Publish(ctx, h.channel, msg).Err(); err != nil {
		return errors.New("events: publishing: " + strings.TrimPrefix(err.Error(), "redis: "))
	}
	return nil
}

// deliver hands payload to the session's local subscribers; one whose
// buffer is full is closed.
func (h *Hub) deliver(sessionID string, payload []byte) {
	h.mu.Lock()
	defer h.mu.Unlock()
	for s := range h.subs[sessionID] {
		select {
		case s.c <- payload:
		default:
			h.logger.Warn("an events stream fell behind and was closed; the page catches up from history",
				zap.String("session_id", sessionID))
			h.removeLocked(s)
		}
	}
}

func (h *Hub) removeLocked(s *Subscription) {
	s.once.Do(func() {
		close(s.done)
		if set := h.subs[s.sessionID]; set != nil {
			delete(set, s)
			if len(set) == 0 {
				delete(h.subs, s.sessionID)
			}
		}
	})
}

// Subscribers is how many subscriptions are open.
func (h *Hub) Subscribers() int {
	h.mu.Lock()
	defer h.mu.Unlock()
	n := 0
	for _, set := range h.subs {
		n += len(set)
	}
	return n
}

// Close ends every subscription and the Redis subscription, and refuses
// new ones. Publish still works (a push needs no subscriber here). It
// may be called more than once.
func (h *Hub) Close() {
	h.mu.Lock()
	h.closed = true
	for _, set := range h.subs {
		for s := range set {
			h.removeLocked(s)
		}
	}
	cancel, done := h.cancel, h.done
	h.mu.Unlock()
	if cancel != nil {
		cancel()
		<-done
	}
}
