package sessions

// SetPurgeBatch makes Purge work in batches of n rows until the returned
// function restores the default. Tests using it must not run in parallel.
func SetPurgeBatch(n int) (restore func()) {
	old := purgeBatch
	purgeBatch = n
	return func() { purgeBatch = old }
}

// PurgeLockSQL takes (or reports it cannot take) the purge lock of the
// current schema for the rest of the transaction.
const PurgeLockSQL = pgPurgeLock
