package sessions

import (
	"context"
	"errors"
	"fmt"
	"slices"
	"strings"
	"sync"
	"sync/atomic"
	"time"
)

// ErrOverloaded means the store's write queue is full: more writes are
// waiting for their commit than the queue holds. Nothing was written; the
// caller should answer 503 with Retry-After rather than wait.
var ErrOverloaded = errors.New("too many writes waiting for the store")

// errClosed is returned by writes to a store that is closing.
var errClosed = errors.New("store is closed")

// Group commit. Session creations, touches and message appends go through
// one writer per store: it takes every write queued while the previous
// commit was in flight and commits them in one transaction (one round trip
// and one WAL flush on PostgreSQL, one transaction on SQLite). There is no
// timer: a lone write commits at once, and under load the batches grow by
// themselves. Every caller waits for its own row's commit and gets its own
// row's result.
const (
	// DefaultStoreWait is how long a write waits for an unreachable store
	// to come back before it fails.
	DefaultStoreWait = 3 * time.Second
	// DefaultWriteQueue bounds the writes waiting for a commit; beyond it
	// a write fails at once with ErrOverloaded.
	DefaultWriteQueue = 4096
	// maxBatch bounds one transaction, so a backlog is committed in steps
	// whose row locks are held briefly.
	maxBatch = 512
	// Backoff between attempts while the store is unreachable.
	firstRetry = 10 * time.Millisecond
	maxRetry   = 250 * time.Millisecond
	// minAttemptTimeout bounds one attempt at a commit even when
	// store_wait is shorter, so a healthy but slow commit is not cut.
	minAttemptTimeout = 5 * time.Second
)

type writeKind uint8

const (
	writeCreate     writeKind = iota // CreateSession
	writeTouch                       // TouchSession
	writeAppend                      // AppendMessage
	writeAppendUser                  // AppendUserMessage, AppendExchange
	writeFinish                      // FinishReply
)

// writeOp is one queued write and, once done is signalled, its result.
type writeOp struct {
	kind     writeKind
	ctx      context.Context
	sess     *Session   // writeCreate
	msg      *Message   // writeAppend, writeAppendUser, writeFinish
	reply    *Message   // writeAppendUser: AppendExchange's streaming reply
	userKind string     // writeAppendUser: the kind the session must have
	id       string     // writeTouch
	at       time.Time  // writeTouch
	extend   *time.Time // writeTouch: the new expiry, if any
	queued   time.Time

	// unsure is set when an attempt failed in a way that leaves open
	// whether it was committed; a later attempt that finds the row already
	// stored then counts as success.
	unsure bool

	out  *Session // writeAppendUser: the session after the append
	err  error    // the row's own result: nil, ErrNotFound, ErrExists, ...
	done chan struct{}
}

// sessionID is the session the write locks, the order of a batch.
func (op *writeOp) sessionID() string {
	switch op.kind {
	case writeCreate:
		return op.sess.ID
	case writeTouch:
		return op.id
	}
	return op.msg.SessionID
}

// attempt is what one try at committing a batch came to.
type attempt struct {
	// err is nil when the batch was committed: every op's out and err are
	// set. Otherwise nothing of the batch was committed (unless unsure).
	err error
	// failed is the index of the op refused for its own data (err is its
	// error); the others are tried again at once. -1: the store failed
	// (unreachable, restarting, deadlock), so the whole batch is tried
	// again until store_wait. splitBatch: some op was refused but which
	// is unknown, so each is tried on its own.
	failed int
	// unsure: the failure came after the batch was sent, so it may have
	// been committed.
	unsure bool
}

const splitBatch = -2

func committed() attempt { return attempt{failed: -1} }
func storeFailed(err error, unsure bool) attempt {
	return attempt{err: err, failed: -1, unsure: unsure}
}
func rowFailed(i int, err error) attempt { return attempt{err: err, failed: i} }

// writer is a store's group-commit queue and the goroutine that commits it.
type writer struct {
	commit func(ctx context.Context, ops []*writeOp) attempt
	queue  chan *writeOp
	wait   atomic.Int64 // store_wait in nanoseconds

	startOnce sync.Once
	stopped   chan struct{}
	mu        sync.RWMutex // guards closed against sends on a closed queue
	closed    bool

	// beforeBatch, if set, runs before each attempt at a batch (tests).
	beforeBatch atomic.Pointer[func(n int)]
}

func newWriter(commit func(ctx context.Context, ops []*writeOp) attempt) *writer {
	w := &writer{
		commit:  commit,
		queue:   make(chan *writeOp, DefaultWriteQueue),
		stopped: make(chan struct{}),
	}
	w.wait.Store(int64(DefaultStoreWait))
	return w
}

// setStoreWait sets how long writes wait for an unreachable store; zero
// or less means DefaultStoreWait.
func (w *writer) setStoreWait(d time.Duration) {
	if d <= 0 {
		d = DefaultStoreWait
	}
	w.wait.Store(int64(d))
}

func (w *writer) start() {
	w.startOnce.Do(func() { go w.run() })
}

// do queues op and waits for its commit. When the caller's context ends
// first, do returns its error; the op is then dropped unless its batch is
// already being committed.
func (w *writer) do(ctx context.Context, op *writeOp) error {
	if err := ctx.Err(); err != nil {
		return err
	}
	w.start()
	op.ctx = ctx
	op.queued = time.Now()
	op.done = make(chan struct{}, 1)
	w.mu.RLock()
	if w.closed {
		w.mu.RUnlock()
		return errClosed
	}
	select {
	case w.queue <- op:
		w.mu.RUnlock()
	default:
		w.mu.RUnlock()
		return ErrOverloaded
	}
	select {
	case <-op.done:
		return op.err
	case <-ctx.Done():
		return ctx.Err()
	}
}

// close stops taking writes and returns once those queued are committed
// (or have failed after store_wait).
func (w *writer) close() {
	w.mu.Lock()
	if !w.closed {
		w.closed = true
		close(w.queue)
	}
	w.mu.Unlock()
	w.start() // a writer never used drains its empty queue and stops
	<-w.stopped
}

func (w *writer) run() {
	defer close(w.stopped)
	q := w.queue
	batch := make([]*writeOp, 0, maxBatch)
	for {
		op, ok := <-q
		if !ok {
			return
		}
		batch = append(batch, op)
		batch, q = take(batch, q)
		q = w.flush(batch, q)
		clear(batch)
		batch = batch[:0]
		if q == nil {
			// Closed while a batch was retried; the rest was taken into it.
			return
		}
	}
}

// take adds what is queued, without waiting, up to maxBatch. It returns a
// nil queue once the queue is closed and empty.
func take(batch []*writeOp, q chan *writeOp) ([]*writeOp, chan *writeOp) {
	for q != nil && len(batch) < maxBatch {
		select {
		case op, ok := <-q:
			if !ok {
				return batch, nil
			}
			batch = append(batch, op)
		default:
			return batch, q
		}
	}
	return batch, q
}

// flush commits pending, retrying as attempt results say, and signals
// every op. Writes queued while it waits for an unreachable store join the
// batch, so they are committed together when it comes back.
func (w *writer) flush(pending []*writeOp, q chan *writeOp) chan *writeOp {
	// Lock order across instances: sessions in id order (a stable sort
	// keeps the order of writes to one session).
	slices.SortStableFunc(pending, func(a, b *writeOp) int { return strings.Compare(a.sessionID(), b.sessionID()) })
	var lastErr error
	retry := firstRetry
	for {
		wait := time.Duration(w.wait.Load())
		now := time.Now()
		keep := pending[:0]
		for _, op := range pending {
			switch {
			case op.ctx.Err() != nil:
				op.finish(op.ctx.Err())
			case lastErr != nil && now.Sub(op.queued) >= wait:
				op.finish(fmt.Errorf("store unreachable for %v: %w", wait, lastErr))
			default:
				keep = append(keep, op)
			}
		}
		clear(pending[len(keep):])
		pending = keep
		if len(pending) == 0 {
			return q
		}
		if hook := w.beforeBatch.Load(); hook != nil {
			(*hook)(len(pending))
		}
		ctx, cancel := context.WithTimeout(context.Background(), max(wait, minAttemptTimeout))
		a := w.commit(ctx, pending)
		cancel()
		switch {
		case a.err == nil:
			for _, op := range pending {
				op.finish(op.err)
			}
			return q
		case a.failed >= 0:
			// One row refused for its own data; nothing committed.
			pending[a.failed].finish(a.err)
			pending = append(pending[:a.failed], pending[a.failed+1:]...)
			continue
		case a.failed == splitBatch && len(pending) > 1:
			for _, op := range pending {
				q = w.flush([]*writeOp{op}, q)
			}
			return q
		case a.failed == splitBatch:
			pending[0].finish(a.err)
			return q
		}
		// The store failed: try the whole batch again until store_wait.
		lastErr = a.err
		if a.unsure {
			for _, op := range pending {
				op.unsure = true
			}
		}
		pause := retry
		for _, op := range pending {
			pause = min(pause, max(time.Millisecond, wait-now.Sub(op.queued)))
		}
		pending, q = absorb(pending, q, pause)
		retry = min(2*retry, maxRetry)
	}
}

// absorb waits d, taking writes queued meanwhile into pending (up to
// maxBatch), so they wait for the store with it.
func absorb(pending []*writeOp, q chan *writeOp, d time.Duration) ([]*writeOp, chan *writeOp) {
	t := time.NewTimer(d)
	defer t.Stop()
	for {
		in := q
		if len(pending) >= maxBatch {
			in = nil
		}
		select {
		case <-t.C:
			return pending, q
		case op, ok := <-in:
			if !ok {
				q = nil
				continue
			}
			pending = append(pending, op)
		}
	}
}

// finish reports err as op's result. A write that an unacknowledged
// earlier attempt may have committed, and which is now found stored, has
// succeeded.
func (op *writeOp) finish(err error) {
	if op.unsure && errors.Is(err, ErrExists) {
		switch op.kind {
		case writeCreate, writeAppend:
			err = nil
		case writeAppendUser:
			err = errStoredEarlier
		}
	}
	if op.unsure && op.kind == writeFinish && errors.Is(err, ErrNotFound) {
		// The reply is no longer streaming: the earlier attempt finished it.
		err = nil
	}
	op.err = err
	op.done <- struct{}{}
}

// errStoredEarlier: a visitor's message was committed by an attempt whose
// answer was lost; AppendUserMessage then reads the session it returns.
var errStoredEarlier = errors.New("message stored by an earlier attempt")
