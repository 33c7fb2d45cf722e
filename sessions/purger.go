package sessions

import (
	"context"
	"errors"
	"math/rand/v2"
	"time"

	"go.uber.org/zap"
)

// Retention defaults.
const (
	// DefaultHistoryRetention is how long messages are kept.
	DefaultHistoryRetention = 30 * 24 * time.Hour
	// DefaultPurgeInterval is how often the purge runs.
	DefaultPurgeInterval = time.Hour

	// PurgeFirstDelay is the least time from loading a config to its first
	// purge; up to as much again is added at random, so that a fleet
	// restarted at once does not purge at once. It keeps `caddy validate`
	// and short-lived configs from purging at all.
	PurgeFirstDelay = time.Minute
	// purgeTimeout bounds one purge run (all its batches).
	purgeTimeout = 15 * time.Minute
)

// PurgeState is what the handlers sharing one store (in this process)
// know about its purge, so that several chat_proxy blocks on one database
// do not each purge it on their own timer: a run is skipped when the
// store was purged less than half an interval ago with a retention at
// least as short. Across processes the database lock keeps purges from
// overlapping (ErrBusy); a second instance's run an hour later finds
// little to do.
type PurgeState struct {
	sem           chan struct{} // one purge of the store at a time
	lastAt        time.Time     // guarded by sem
	lastRetention time.Duration // guarded by sem
}

// NewPurgeState returns the state of a store never purged.
func NewPurgeState() *PurgeState {
	return &PurgeState{sem: make(chan struct{}, 1)}
}

// Purger purges one handler's store periodically: messages older than
// Retention, and expired sessions with their messages.
type Purger struct {
	Store      Store
	State      *PurgeState
	Retention  time.Duration
	Interval   time.Duration
	FirstDelay time.Duration
	Logger     *zap.Logger
	Now        func() time.Time
}

// Outcomes of one purge run (Once).
const (
	PurgeDone     = "done"
	PurgeSkipped  = "skipped" // purged recently in this process
	PurgeBusy     = "busy"    // another instance holds the lock
	PurgeFailed   = "failed"
	PurgeCanceled = "canceled"
)

// Run purges first after FirstDelay (plus jitter) and then every Interval
// (±10%) until ctx is done. The module passes its provision context, which
// Caddy cancels when the config is unloaded (reload, stop) or was only
// validated.
func (p *Purger) Run(ctx context.Context) {
	defer func() {
		if r := recover(); r != nil {
			p.Logger.Error("purge loop panicked; history is no longer purged until the next config load",
				zap.Any("panic", r), zap.Stack("stack"))
		}
	}()
	timer := time.NewTimer(p.FirstDelay + time.Duration(rand.Int64N(int64(p.FirstDelay)+1)))
	defer timer.Stop()
	for {
		select {
		case <-ctx.Done():
			return
		case <-timer.C:
		}
		p.Once(ctx)
		jitter := time.Duration(rand.Int64N(int64(p.Interval)/5+1)) - p.Interval/10
		timer.Reset(p.Interval + jitter)
	}
}

// Once runs one purge and returns its outcome; a panic in it is logged
// and reported as PurgeFailed.
func (p *Purger) Once(ctx context.Context) (outcome string) {
	defer func() {
		if r := recover(); r != nil {
			p.Logger.Error("purge panicked", zap.Any("panic", r), zap.Stack("stack"))
			outcome = PurgeFailed
		}
	}()
	select {
	case p.State.sem <- struct{}{}:
	case <-ctx.Done():
		return PurgeCanceled
	}
	defer func() { <-p.State.sem }()

	now := p.Now()
	st := p.State
	if !st.lastAt.IsZero() && now.Sub(st.lastAt) < p.Interval/2 && st.lastRetention <= p.Retention {
		return PurgeSkipped
	}
	runCtx, cancel := context.WithTimeout(ctx, purgeTimeout)
	defer cancel()
	start := time.Now()
	ns, nm, err := p.Store.Purge(runCtx, now, now.Add(-p.Retention))
	fields := []zap.Field{
		zap.Int64("sessions", ns), zap.Int64("messages", nm),
		zap.Duration("history_retention", p.Retention), zap.Duration("took", time.Since(start)),
	}
	switch {
	case errors.Is(err, ErrBusy):
		p.Logger.Debug("purge skipped: another instance is purging")
		return PurgeBusy
	case err != nil && ctx.Err() != nil:
		// The config was unloaded mid-purge; the next one carries on.
		return PurgeCanceled
	case err != nil:
		p.Logger.Error("purging expired sessions and old messages", append(fields, zap.Error(err))...)
		return PurgeFailed
	}
	st.lastAt, st.lastRetention = now, p.Retention
	if ns+nm > 0 {
		p.Logger.Info("purged expired sessions and old messages", fields...)
	} else {
		p.Logger.Debug("purge found nothing to delete", fields...)
	}
	return PurgeDone
}
