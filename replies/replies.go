// Package replies carries the live events of chat replies being produced
// to the streams that resume them, and stop requests to the instance that
// produces a reply.
//
// A reply's SSE events have ids 1, 2, 3, …: begin is 1, each item and
// error the next, end the last. The instance relaying n8n's reply
// publishes every event, in order, to a Live (Hub.Begin); a resumed stream
// follows it from the id the client saw last (Hub.Follow). Without Redis
// the events are kept in this process only; with Redis they are also
// appended to a Redis Stream, so a resume on any instance can read them:
//
//	<prefix>reply:{<message id>}          Stream, one entry per event, entry
//	                                      id "<event id>-0", fields t (type),
//	                                      c (item text), e, m (error code
//	                                      and message); MAXLEN ~ MaxEvents;
//	                                      TTL LiveTTL while live, EndedTTL
//	                                      once end is added
//	<prefix>reply:{<message id>}:watch    String, set (TTL WatchTTL) and
//	                                      refreshed by a resumed stream on
//	                                      another instance while it is open:
//	                                      the reply has a client
//	<prefix>reply-stop                    Pub/sub channel; a message id
//	                                      published there is stopped by the
//	                                      instance holding it
//
// A follower that meets a gap (entries trimmed, or an entry Redis lost)
// or nothing live reports ErrNotLive; the caller then waits for the reply
// to be stored, which is complete, and serves the rest from the store.
package replies

import (
	"context"
	"errors"
	"io"
	"strconv"
	"sync"
	"time"

	"github.com/caddyserver/caddy/v2"
	"github.com/redis/go-redis/v9"
	"go.uber.org/zap"
)

// Event types, as in the SSE stream's data.
const (
	TypeBegin = "begin"
	TypeItem  = "item"
	TypeError = "error"
	TypeEnd   = "end"
)

// Event is one event of a reply's stream.
type Event struct {
	ID      uint64
	Type    string
	Content string // an item's text
	Code    string // an error's code
	Message string // an error's message
}

// ErrNotLive means the events asked for cannot be followed live (the reply
// is not held here and Redis has no unbroken record of them): they are to
// be read from the store once the reply is stored.
var ErrNotLive = errors.New("reply is not live here")

// Defaults of Config.
const (
	DefaultPrefix    = "chatproxy:"
	DefaultMaxEvents = 10000
	DefaultLiveTTL   = 30 * time.Minute
	DefaultEndedTTL  = 5 * time.Minute
	DefaultWatchTTL  = 5 * time.Second
	// DefaultAppendEvery: a reply's events reach the other instances at
	// most this much later than its own client, and a reply relayed
	// faster costs one Redis round trip (begin to end) instead of one
	// per event or so.
	DefaultAppendEvery = 10 * time.Millisecond
	// pollEvery is how long a Redis follower blocks for new entries, and
	// how often it refreshes its watch key.
	pollEvery = time.Second
)

// Config configures a Hub.
type Config struct {
	// Redis, when set, carries events and stops across instances.
	Redis redis.UniversalClient
	// Prefix begins every Redis key and channel name. Default: "chatproxy:".
	Prefix string
	// MaxEvents bounds a reply's Redis Stream (approximately, MAXLEN ~).
	MaxEvents int64
	// LiveTTL is the Stream's expiry while the reply is live, renewed with
	// each batch of events; EndedTTL its expiry once the reply ended.
	LiveTTL, EndedTTL time.Duration
	// WatchTTL is the expiry of a remote follower's watch key.
	WatchTTL time.Duration
	// AppendEvery is how long an event waits for those that follow it,
	// to be appended to the Stream together (the end and errors do not
	// wait). Default: DefaultAppendEvery.
	AppendEvery time.Duration
	Logger      *zap.Logger
}

// Hub holds the live replies of this process and, with Redis, publishes
// them. It is safe for concurrent use.
type Hub struct {
	cfg  Config
	mu   sync.Mutex
	live map[string]*Live

	closed   chan struct{}
	closeOne sync.Once
	subDone  chan struct{}
}

// NewHub returns a hub. With Redis it subscribes to the stop channel in
// the background (no network I/O before NewHub returns); Close ends that.
func NewHub(cfg Config) *Hub {
	if cfg.Prefix == "" {
		cfg.Prefix = DefaultPrefix
	}
	if cfg.MaxEvents <= 0 {
		cfg.MaxEvents = DefaultMaxEvents
	}
	if cfg.LiveTTL <= 0 {
		cfg.LiveTTL = DefaultLiveTTL
	}
	if cfg.EndedTTL <= 0 {
		cfg.EndedTTL = DefaultEndedTTL
	}
	if cfg.WatchTTL <= 0 {
		cfg.WatchTTL = DefaultWatchTTL
	}
	if cfg.AppendEvery <= 0 {
		cfg.AppendEvery = DefaultAppendEvery
	}
	if cfg.Logger == nil {
		cfg.Logger = zap.NewNop()
	}
	h := &Hub{cfg: cfg, live: map[string]*Live{}, closed: make(chan struct{}), subDone: make(chan struct{})}
	if cfg.Redis != nil {
		go h.listenStops()
	} else {
		close(h.subDone)
	}
	return h
}

// Shared reports whether events and stops reach other instances (Redis).
func (h *Hub) Shared() bool { return h.cfg.Redis != nil }

// Close stops listening for stops. Live replies are not affected.
func (h *Hub) Close() {
	h.closeOne.Do(func() { close(h.closed) })
	<-h.subDone
}

func (h *Hub) streamKey(id string) string { return h.cfg.Prefix + "reply:{" + id + "}" }
func (h *Hub) watchKey(id string) string  { return h.cfg.Prefix + "reply:{" + id + "}:watch" }
func (h *Hub) stopChannel() string        { return h.cfg.Prefix + "reply-stop" }

// listenStops stops the replies held here whose ids are published on the
// stop channel, until Close. go-redis resubscribes after a lost connection.
func (h *Hub) listenStops() {
	defer close(h.subDone)
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	sub := h.cfg.Redis.Subscribe(ctx, h.stopChannel())
	defer sub.Close()
	ch := sub.Channel()
	for {
		select {
		case <-h.closed:
			return
		case msg, ok := <-ch:
			if !ok {
				return
			}
			h.stopLocal(msg.Payload)
		}
	}
}

// Begin registers the live reply id, whose begin event (id 1) it
// publishes; stop is called (once, on its own goroutine) when a stop for
// id arrives. The original client counts as attached until Detach.
func (h *Hub) Begin(id string, stop func()) *Live {
	l := &Live{hub: h, id: id, stop: stop, attached: 1, changed: make(chan struct{})}
	h.mu.Lock()
	h.live[id] = l
	h.mu.Unlock()
	if h.cfg.Redis != nil {
		l.pub = newPublisher(h, id)
	}
	l.publish(Event{Type: TypeBegin})
	return l
}

// Stop asks the instance holding reply id to stop it. It reports whether
// the request went anywhere: the reply is held here, or the stop was
// published through Redis (whether another instance holds it is not
// known to the caller; it watches the reply end).
func (h *Hub) Stop(ctx context.Context, id string) (bool, error) {
	if h.stopLocal(id) {
		return true, nil
	}
	if h.cfg.Redis == nil {
		return false, nil
	}
	if err := h.cfg.Redis.Publish(ctx, h.stopChannel(), id).Err(); err != nil {
		return false, err
	}
	return true, nil
}

func (h *Hub) stopLocal(id string) bool {
	h.mu.Lock()
	l := h.live[id]
	h.mu.Unlock()
	if l == nil {
		return false
	}
	l.Stop()
	return true
}

// Held reports whether reply id is live in this process.
func (h *Hub) Held(id string) bool {
	h.mu.Lock()
	defer h.mu.Unlock()
	return h.live[id] != nil
}

// Live is one reply being produced in this process.
type Live struct {
	hub  *Hub
	id   string
	stop func()
	pub  *publisher

	mu       sync.Mutex
	events   []Event
	ended    bool
	closed   bool
	changed  chan struct{} // closed and replaced on every change
	attached int
	stopOnce sync.Once
	detach   time.Duration
	onIdle   func()
	idle     *time.Timer
}

// ID is the reply's message id.
func (l *Live) ID() string { return l.id }

// Item publishes an item event and returns its id.
func (l *Live) Item(content string) uint64 {
	return l.publish(Event{Type: TypeItem, Content: content})
}

// Error publishes an error event and returns its id.
func (l *Live) Error(code, message string) uint64 {
	return l.publish(Event{Type: TypeError, Code: code, Message: message})
}

// End publishes the end event; later events are dropped.
func (l *Live) End() uint64 { return l.publish(Event{Type: TypeEnd}) }

// LastID is the id of the last event published.
func (l *Live) LastID() uint64 {
	l.mu.Lock()
	defer l.mu.Unlock()
	return uint64(len(l.events))
}

func (l *Live) publish(ev Event) uint64 {
	l.mu.Lock()
	if l.ended {
		l.mu.Unlock()
		return 0
	}
	ev.ID = uint64(len(l.events)) + 1
	l.events = append(l.events, ev)
	l.ended = ev.Type == TypeEnd
	close(l.changed)
	l.changed = make(chan struct{})
	if l.pub != nil {
		// Queued under l.mu, so the Stream gets the events in id order.
		l.pub.add(ev, ev.Type == TypeEnd || ev.Type == TypeError)
	}
	l.mu.Unlock()
	return ev.ID
}

// Stop calls the reply's stop function once.
func (l *Live) Stop() {
	l.stopOnce.Do(func() { go l.stop() })
}

// DetachAfter arms the detached timeout: once no client has been attached
// for d (here, or through a remote follower's watch key), onIdle is
// called, once. d <= 0: at once when the last client leaves.
func (l *Live) DetachAfter(d time.Duration, onIdle func()) {
	l.mu.Lock()
	l.detach, l.onIdle = d, onIdle
	l.mu.Unlock()
}

// Attach counts a client following the reply; the returned func detaches
// it (once).
func (l *Live) Attach() func() {
	l.mu.Lock()
	l.attached++
	if l.idle != nil {
		l.idle.Stop()
		l.idle = nil
	}
	l.mu.Unlock()
	var once sync.Once
	return func() { once.Do(l.Detach) }
}

// Detach counts one client less (the original client, or one that
// Attach counted); with none left the detached timeout starts.
func (l *Live) Detach() {
	l.mu.Lock()
	defer l.mu.Unlock()
	l.attached--
	if l.attached > 0 || l.onIdle == nil || l.ended {
		return
	}
	if l.detach <= 0 {
		go l.onIdle()
		return
	}
	l.armIdleLocked()
}

func (l *Live) armIdleLocked() {
	if l.idle != nil {
		l.idle.Stop()
	}
	l.idle = time.AfterFunc(l.detach, l.idleTick)
}

// idleTick runs when the detached timeout passed: a client attached here
// or elsewhere (the watch key) keeps the reply going.
func (l *Live) idleTick() {
	watched := false
	if rdb := l.hub.cfg.Redis; rdb != nil {
		ctx, cancel := context.WithTimeout(context.Background(), 2*time.Second)
		n, err := rdb.Exists(ctx, l.hub.watchKey(l.id)).Result()
		cancel()
		watched = err == nil && n > 0
	}
	l.mu.Lock()
	if l.attached > 0 || l.ended || l.closed {
		l.mu.Unlock()
		return
	}
	if watched {
		l.armIdleLocked()
		l.mu.Unlock()
		return
	}
	f := l.onIdle
	l.mu.Unlock()
	f()
}

// Close removes the reply from the hub, once it is stored: later resumes
// read it from the store. With Redis the Stream stays for EndedTTL.
func (l *Live) Close() {
	l.mu.Lock()
	if l.closed {
		l.mu.Unlock()
		return
	}
	l.closed = true
	if l.idle != nil {
		l.idle.Stop()
	}
	if !l.ended {
		// Ended without end (e.g. the exchange failed before its reply):
		// followers stop waiting for events here.
		l.ended = true
	}
	close(l.changed)
	l.changed = make(chan struct{})
	l.mu.Unlock()
	l.hub.mu.Lock()
	if l.hub.live[l.id] == l {
		delete(l.hub.live, l.id)
	}
	l.hub.mu.Unlock()
	if l.pub != nil {
		l.pub.close()
	}
}

// after returns the events after id, whether the reply ended (or closed),
// and a channel closed at the next change.
func (l *Live) after(id uint64) ([]Event, bool, <-chan struct{}) {
	l.mu.Lock()
	defer l.mu.Unlock()
	var evs []Event
	if id < uint64(len(l.events)) {
		evs = append(evs, l.events[id:]...)
	}
	return evs, l.ended, l.changed
}

// Follower reads a reply's events in order, from a live reply here or
// from its Redis Stream.
type Follower interface {
	// Next returns the next events (at least one), ErrNotLive when they
	// cannot be had live, io.EOF after end, or the context's error.
	Next(ctx context.Context) ([]Event, error)
	// Close detaches the follower.
	Close()
}

// Follow follows reply id from the event after after. It answers
// ErrNotLive at once when there is nothing to follow.
func (h *Hub) Follow(id string, after uint64) (Follower, error) {
	h.mu.Lock()
	l := h.live[id]
	h.mu.Unlock()
	if l != nil {
		return &localFollower{l: l, next: after, detach: l.Attach()}, nil
	}
	if h.cfg.Redis == nil {
		return nil, ErrNotLive
	}
	return &redisFollower{h: h, id: id, next: after}, nil
}

type localFollower struct {
	l      *Live
	next   uint64 // the last id returned
	detach func()
}

func (f *localFollower) Next(ctx context.Context) ([]Event, error) {
	for {
		evs, ended, changed := f.l.after(f.next)
		if len(evs) > 0 {
			f.next = evs[len(evs)-1].ID
			return evs, nil
		}
		if ended {
			if f.l.lastType() == TypeEnd {
				return nil, io.EOF
			}
			return nil, ErrNotLive
		}
		select {
		case <-changed:
		case <-ctx.Done():
			return nil, ctx.Err()
		}
	}
}

func (l *Live) lastType() string {
	l.mu.Lock()
	defer l.mu.Unlock()
	if len(l.events) == 0 {
		return ""
	}
	return l.events[len(l.events)-1].Type
}

func (f *localFollower) Close() { f.detach() }

type redisFollower struct {
	h    *Hub
	id   string
	next uint64
}

func (f *redisFollower) Next(ctx context.Context) ([]Event, error) {
	rdb := f.h.cfg.Redis
	for {
		if err := ctx.Err(); err != nil {
			return nil, err
		}
		if f.h.Held(f.id) {
			// The reply went live here after all (the same instance).
			return nil, ErrNotLive
		}
		pipe := rdb.Pipeline()
		pipe.Set(ctx, f.h.watchKey(f.id), "1", f.h.cfg.WatchTTL)
		_, _ = pipe.Exec(ctx)
		res, err := rdb.XRead(ctx, &redis.XReadArgs{
			Streams: []string{f.h.streamKey(f.id), strconv.FormatUint(f.next, 10) + "-0"},
			Count:   512,
			Block:   pollEvery,
		}).Result()
		if errors.Is(err, redis.Nil) {
			return nil, ErrNotLive // nothing new for a while: let the caller look at the store
		}
		if err != nil {
			if ctx.Err() != nil {
				return nil, ctx.Err()
			}
			return nil, ErrNotLive
		}
		var evs []Event
		for _, s := range res {
			for _, m := range s.Messages {
				ev, ok := decodeEntry(m)
				if !ok || ev.ID != f.next+1 {
					// A gap: trimmed, or lost on the way.
					if len(evs) > 0 {
						return evs, nil
					}
					return nil, ErrNotLive
				}
				f.next = ev.ID
				evs = append(evs, ev)
			}
		}
		if len(evs) > 0 {
			return evs, nil
		}
	}
}

func (f *redisFollower) Close() {
	ctx, cancel := context.WithTimeout(context.Background(), time.Second)
	defer cancel()
	_ = f.h.cfg.Redis.Del(ctx, f.h.watchKey(f.id)).Err()
}

func decodeEntry(m redis.XMessage) (Event, bool) {
	ms, _, ok := cutDash(m.ID)
	if !ok {
		return Event{}, false
	}
	id, err := strconv.ParseUint(ms, 10, 64)
	if err != nil {
		return Event{}, false
	}
	str := func(k string) string { s, _ := m.Values[k].(string); return s }
	ev := Event{ID: id, Type: str("t"), Content: str("c"), Code: str("e"), Message: str("m")}
	switch ev.Type {
	case TypeBegin, TypeItem, TypeError, TypeEnd:
		return ev, true
	}
	return Event{}, false
}

func cutDash(s string) (string, string, bool) {
	for i := 0; i < len(s); i++ {
		if s[i] == '-' {
			return s[:i], s[i+1:], true
		}
	}
	return "", "", false
}

// publisher appends a live reply's events to its Redis Stream, in order,
// from a goroutine of its own, so the relay never waits for Redis. An
// event waits AppendEvery for those that follow it, unless the end or an
// error comes (or the reply closes), which go at once; what is queued then
// goes in one pipeline (one round trip).
type publisher struct {
	h      *Hub
	key    string
	mu     sync.Mutex
	q      []Event
	done   bool
	wake   chan struct{} // an event is queued
	urgent chan struct{} // the end, an error or close: append now
}

func newPublisher(h *Hub, id string) *publisher {
	p := &publisher{h: h, key: h.streamKey(id), wake: make(chan struct{}, 1), urgent: make(chan struct{}, 1)}
	go p.run()
	return p
}

func signal(c chan struct{}) {
	select {
	case c <- struct{}{}:
	default:
	}
}

func (p *publisher) add(ev Event, urgent bool) {
	p.mu.Lock()
	p.q = append(p.q, ev)
	p.mu.Unlock()
	signal(p.wake)
	if urgent {
		signal(p.urgent)
	}
}

// close lets the publisher finish what is queued, then stop.
func (p *publisher) close() {
	p.mu.Lock()
	p.done = true
	p.mu.Unlock()
	signal(p.wake)
	signal(p.urgent)
}

func (p *publisher) run() {
	failed := false
	pause := time.NewTimer(time.Hour)
	pause.Stop()
	defer pause.Stop()
	for {
		<-p.wake
		// Let the events that follow this one gather, unless one is
		// urgent.
		select {
		case <-p.urgent:
		default:
			pause.Reset(p.h.cfg.AppendEvery)
			select {
			case <-pause.C:
			case <-p.urgent:
				pause.Stop()
			}
		}
		p.mu.Lock()
		batch, done := p.q, p.done
		p.q = nil
		p.mu.Unlock()
		if len(batch) > 0 {
			p.append(batch, &failed)
		}
		if done {
			p.mu.Lock()
			left := len(p.q)
			p.mu.Unlock()
			if left == 0 {
				return
			}
			signal(p.wake)
			signal(p.urgent)
		}
	}
}

// append sends batch in one pipeline: an XADD per event and the Stream's
// expiry.
func (p *publisher) append(batch []Event, failed *bool) {
	rdb := p.h.cfg.Redis
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	pipe := rdb.Pipeline()
	ended := false
	for _, ev := range batch {
		vals := []any{"t", ev.Type}
		switch ev.Type {
		case TypeItem:
			vals = append(vals, "c", ev.Content)
		case TypeError:
			vals = append(vals, "e", ev.Code, "m", ev.Message)
		case TypeEnd:
			ended = true
		}
		pipe.XAdd(ctx, &redis.XAddArgs{
			Stream: p.key, MaxLen: p.h.cfg.MaxEvents, Approx: true,
			ID: strconv.FormatUint(ev.ID, 10) + "-0", Values: vals,
		})
	}
	ttl := p.h.cfg.LiveTTL
	if ended {
		ttl = p.h.cfg.EndedTTL
	}
	pipe.PExpire(ctx, p.key, ttl)
	if _, err := pipe.Exec(ctx); err != nil && !*failed {
		*failed = true // logged once per reply; resumes fall back to the store
		p.h.cfg.Logger.Warn("publishing reply events to redis", zap.String("key", p.key), zap.Error(err))
	}
}

// sharedHubs holds one Hub per Redis client (or "local"), across config
// reloads (Caddy provisions the new config before it cleans up the old).
var sharedHubs = caddy.NewUsagePool()

type pooledHub struct{ *Hub }

func (p pooledHub) Destruct() error { p.Close(); return nil }

// AcquireHub takes a reference to the hub shared under key, made with cfg
// by the first caller. The returned func gives it back; the last one
// closes it.
func AcquireHub(key string, cfg Config) (*Hub, func(), error) {
	val, _, err := sharedHubs.LoadOrNew(key, func() (caddy.Destructor, error) {
		return pooledHub{NewHub(cfg)}, nil
	})
	if err != nil {
		return nil, nil, err
	}
	var once sync.Once
	return val.(pooledHub).Hub, func() { once.Do(func() { _, _ = sharedHubs.Delete(key) }) }, nil
}
