package handler

import (
	"context"
	"sync/atomic"
	"time"

	"go.uber.org/zap"

	"github.com/chatproxy/caddy-chatproxy/n8n"
)

// CodeServerShutdown is the error code of the event that ends a stream
// because Caddy is shutting down.
const CodeServerShutdown = "server_shutdown"

// shutdownMessage is that event's text.
const shutdownMessage = "The server is shutting down, so this reply was cut short. Please send your message again."

// Drain ends running streams when Caddy exits. Once Start is called, each
// stream stops reading n8n, sends an error event (CodeServerShutdown) and
// the end marker instead of having its connection cut, and stores what it
// relayed as a partial reply; Wait lets the module hold the process until
// those replies are stored. The zero value is not usable; use NewDrain.
type Drain struct {
	ctx    context.Context
	start  context.CancelFunc
	active atomic.Int64 // streams running

	// Exiting reports whether the process is exiting rather than
	// reloading; nil means caddy.Exiting. Tests replace it.
	Exiting func() bool
	logger  *zap.Logger
}

// NewDrain returns a Drain that has not started.
func NewDrain() *Drain {
	ctx, cancel := context.WithCancel(context.Background())
	return &Drain{ctx: ctx, start: cancel, logger: zap.NewNop()}
}

// Start tells every running stream, and any that starts later, to end now.
// It may be called more than once.
func (d *Drain) Start() { d.start() }

// Started reports whether Start was called.
func (d *Drain) Started() bool { return d.ctx.Err() != nil }

// Active is how many streams are running.
func (d *Drain) Active() int { return int(d.active.Load()) }

// Wait waits until no stream is running, or timeout passes; it reports
// whether none is.
func (d *Drain) Wait(timeout time.Duration) bool {
	deadline := time.Now().Add(timeout)
	for d.active.Load() > 0 {
		if time.Now().After(deadline) {
			return false
		}
		time.Sleep(5 * time.Millisecond)
	}
	return true
}

// watch counts a stream as running and closes its reply when the drain
// starts. The returned stop ends both; shutdown reports whether the drain
// closed the reply. A nil Drain watches nothing.
func (d *Drain) watch(reply *n8n.Reply) (shutdown func() bool, stop func()) {
	return d.watchFunc(func() { _ = reply.Close() })
}

// watchFunc is watch for anything that ends by calling end (a chat
// socket closes both of its sides).
func (d *Drain) watchFunc(end func()) (shutdown func() bool, stop func()) {
	if d == nil {
		return func() bool { return false }, func() {}
	}
	d.active.Add(1)
	var fired atomic.Bool
	cancel := context.AfterFunc(d.ctx, func() {
		fired.Store(true)
		end()
	})
	return fired.Load, func() {
		cancel()
		d.active.Add(-1)
	}
}
