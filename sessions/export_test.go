package sessions

import (
	"fmt"
	"sync"
)

// SetPurgeBatch makes Purge work in batches of n rows until the returned
// function restores the default. Tests using it must not run in parallel.
func SetPurgeBatch(n int) (restore func()) {
	old := purgeBatch
	purgeBatch = n
	return func() { purgeBatch = old }
}

// SetUserDeleteBatch makes DeleteUser work in batches of n sessions until
// the returned function restores the default. Tests using it must not run
// in parallel.
func SetUserDeleteBatch(n int) (restore func()) {
	old := userDeleteBatch
	userDeleteBatch = n
	return func() { userDeleteBatch = old }
}

// PurgeLockSQL takes (or reports it cannot take) the purge lock of the
// current schema for the rest of the transaction.
const PurgeLockSQL = pgPurgeLock

func writerOf(st Store) *writer {
	switch s := st.(type) {
	case *PostgresStore:
		return s.w
	case *SQLiteStore:
		return s.wr
	}
	panic("no writer in " + fmt.Sprintf("%T", st))
}

// HoldWrites makes the store's writer stop before its next attempt at a
// batch until release is called; held reports (once) when it has stopped.
// Every attempt calls batch with its size, held or not.
func HoldWrites(st Store, batch func(n int)) (held <-chan struct{}, release func()) {
	w := writerOf(st)
	gate, stopped := make(chan struct{}), make(chan struct{})
	var once, stop sync.Once
	hook := func(n int) {
		if batch != nil {
			batch(n)
		}
		stop.Do(func() { close(stopped) })
		<-gate
	}
	w.beforeBatch.Store(&hook)
	return stopped, func() { once.Do(func() { close(gate) }) }
}

// QueuedWrites is how many writes wait in the store's queue.
func QueuedWrites(st Store) int { return len(writerOf(st).queue) }

// SetWriteQueue makes the store's write queue hold n writes. It must be
// called before the store is used.
func SetWriteQueue(st Store, n int) { writerOf(st).queue = make(chan *writeOp, n) }

// WritesClosed reports whether Close has stopped the store taking writes.
func WritesClosed(st Store) bool {
	w := writerOf(st)
	w.mu.RLock()
	defer w.mu.RUnlock()
	return w.closed
}
