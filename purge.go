package chatproxy

import (
	"context"
	"errors"
	"math/rand/v2"
	"time"

	"go.uber.org/zap"

	"github.com/chatproxy/caddy-chatproxy/sessions"
)

// Retention defaults.
const (
	// DefaultHistoryRetention is how long messages are kept.
	DefaultHistoryRetention = 30 * 24 * time.Hour
	// DefaultPurgeInterval is how often the purge runs.
	DefaultPurgeInterval = time.Hour

	// purgeFirstDelay is the least time from loading a config to its first
	// purge; up to as much again is added at random, so that a fleet
	// restarted at once does not purge at once. It keeps `caddy validate`
	// and short-lived configs from purging at all.
	purgeFirstDelay = time.Minute
	// purgeTimeout bounds one purge run (all its batches).
	purgeTimeout = 15 * time.Minute
)

// purgeState is what the handlers sharing one store (in this process)
// know about its purge, so that several chat_proxy blocks on one database
// do not each purge it on their own timer: a run is skipped when the
// store was purged less than half an interval ago with a retention at
// least as short. Across processes the database lock keeps purges from
// overlapping (sessions.ErrBusy); a second instance's run an hour later
// finds little to do.
type purgeState struct {
	sem           chan struct{} // one purge of the store at a time
	lastAt        time.Time     // guarded by sem
	lastRetention time.Duration // guarded by sem
}

func newPurgeState() *purgeState {
	return &purgeState{sem: make(chan struct{}, 1)}
}

// purger purges one handler's store periodically.
type purger struct {
	store      sessions.Store
	state      *purgeState
	retention  time.Duration
	interval   time.Duration
	firstDelay time.Duration
	logger     *zap.Logger
	now        func() time.Time
}

// Outcomes of one purge run, for tests.
const (
	purgeDone     = "done"
	purgeSkipped  = "skipped" // purged recently in this process
	purgeBusy     = "busy"    // another instance holds the lock
	purgeFailed   = "failed"
	purgeCanceled = "canceled"
)

// run purges first after firstDelay (plus jitter) and then every interval
// (±10%) until ctx, the provision context, is done: Caddy cancels it when
// the config is unloaded (reload, stop) or was only validated.
func (p *purger) run(ctx context.Context) {
	defer func() {
		if r := recover(); r != nil {
			p.logger.Error("purge loop panicked; history is no longer purged until the next config load",
				zap.Any("panic", r), zap.Stack("stack"))
		}
	}()
	timer := time.NewTimer(p.firstDelay + time.Duration(rand.Int64N(int64(p.firstDelay)+1)))
	defer timer.Stop()
	for {
		select {
		case <-ctx.Done():
			return
		case <-timer.C:
		}
		p.once(ctx)
		jitter := time.Duration(rand.Int64N(int64(p.interval)/5+1)) - p.interval/10
		timer.Reset(p.interval + jitter)
	}
}

// once runs one purge; a panic in it is logged and the loop goes on.
func (p *purger) once(ctx context.Context) (outcome string) {
	defer func() {
		if r := recover(); r != nil {
			p.logger.Error("purge panicked", zap.Any("panic", r), zap.Stack("stack"))
			outcome = purgeFailed
		}
	}()
	select {
	case p.state.sem <- struct{}{}:
	case <-ctx.Done():
		return purgeCanceled
	}
	defer func() { <-p.state.sem }()

	now := p.now()
	st := p.state
	if !st.lastAt.IsZero() && now.Sub(st.lastAt) < p.interval/2 && st.lastRetention <= p.retention {
		return purgeSkipped
	}
	runCtx, cancel := context.WithTimeout(ctx, purgeTimeout)
	defer cancel()
	start := time.Now()
	ns, nm, err := p.store.Purge(runCtx, now, now.Add(-p.retention))
	fields := []zap.Field{
		zap.Int64("sessions", ns), zap.Int64("messages", nm),
		zap.Duration("history_retention", p.retention), zap.Duration("took", time.Since(start)),
	}
	switch {
	case errors.Is(err, sessions.ErrBusy):
		p.logger.Debug("purge skipped: another instance is purging")
		return purgeBusy
	case err != nil && ctx.Err() != nil:
		// The config was unloaded mid-purge; the next one carries on.
		return purgeCanceled
	case err != nil:
		p.logger.Error("purging expired sessions and old messages", append(fields, zap.Error(err))...)
		return purgeFailed
	}
	st.lastAt, st.lastRetention = now, p.retention
	if ns+nm > 0 {
		p.logger.Info("purged expired sessions and old messages", fields...)
	} else {
		p.logger.Debug("purge found nothing to delete", fields...)
	}
	return purgeDone
}

// startPurger starts the handler's purge goroutine; it ends with ctx.
func (cp *ChatProxy) startPurger(ctx context.Context, ps pooledStore) {
	p := &purger{
		store:      ps.Store,
		state:      ps.purge,
		retention:  time.Duration(cp.HistoryRetention),
		interval:   time.Duration(cp.PurgeInterval),
		firstDelay: purgeFirstDelay,
		logger:     cp.logger.Named("purge"),
		now:        time.Now,
	}
	cp.purger = p
	go p.run(ctx)
}
