package handler

import (
	"context"
	"math"
	"net/http"
	"sync"
	"time"

	"go.uber.org/zap"
	"golang.org/x/sync/singleflight"

	"github.com/chatproxy/caddy-chatproxy/n8n"
)

// healthTimeout bounds each dependency check so /health answers promptly
// even when a dependency hangs.
const (
	healthTimeout      = 2 * time.Second
	redisHealthTimeout = 500 * time.Millisecond
)

type healthCheck struct {
	Status    string   `json:"status"`
	LatencyMS *float64 `json:"latency_ms,omitempty"`
}

type healthResponse struct {
	Status string                 `json:"status"`
	Checks map[string]healthCheck `json:"checks"`
}

// healthMaxAge is how old a dependency check /health answers with may be:
// /health is polled by load balancers and open to anyone, so it must not
// turn each request into database and Redis work.
const healthMaxAge = time.Second

// dependencyHealth is the result of one check of the database and Redis.
type dependencyHealth struct {
	db, redis healthCheck
}

// healthState shares dependency checks between /health requests: a result
// is reused for healthMaxAge, and callers arriving while a check runs wait
// for that check instead of starting their own.
type healthState struct {
	mu      sync.Mutex
	result  dependencyHealth
	checked time.Time // zero: nothing checked yet, or the result is stale
	flight  singleflight.Group
}

// fresh returns the last result when it is recent enough.
func (s *healthState) fresh(now time.Time) (dependencyHealth, bool) {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.checked.IsZero() || now.Sub(s.checked) >= healthMaxAge || now.Before(s.checked) {
		return dependencyHealth{}, false
	}
	return s.result, true
}

func (s *healthState) store(d dependencyHealth, at time.Time) {
	s.mu.Lock()
	s.result, s.checked = d, at
	s.mu.Unlock()
}

// invalidate makes the next /health check again: a route just saw the
// store fail, so a cached "ok" would be wrong.
func (s *healthState) invalidate() {
	s.mu.Lock()
	s.checked = time.Time{}
	s.mu.Unlock()
}

// health reports the module's dependencies. It names no URL, host or
// secret: only statuses and latencies. The database being down makes the
// whole service down (503); Redis or n8n trouble degrades it (200), since
// limits continue in process and the circuit breaker answers fast. The
// database and Redis results are at most healthMaxAge old; the limiter and
// circuit breaker states are current.
func (h *Handler) health(w http.ResponseWriter, r *http.Request) error {
	deps, err := h.dependencies(r)
	if err != nil {
		return nil // the client left while the check ran
	}
	db, rd := deps.db, deps.redis
	if rd.Status == "ok" && h.cfg.Limiter != nil && h.cfg.Limiter.Degraded() {
		// Redis answers now, but the limiter has not gone back to it yet.
		rd.Status = "degraded"
	}

	upstream := healthCheck{Status: "ok"}
	if h.cfg.Upstream != nil {
		switch h.cfg.Upstream.State() {
		case n8n.StateHalfOpen:
			upstream.Status = "degraded"
		case n8n.StateOpen:
			upstream.Status = "down"
		}
	}

	status, code := "ok", http.StatusOK
	if rd.Status == "down" || rd.Status == "degraded" || upstream.Status != "ok" {
		status = "degraded"
	}
	if db.Status != "ok" {
		status, code = "down", http.StatusServiceUnavailable
	}
	return writeJSON(w, code, healthResponse{
		Status: status,
		Checks: map[string]healthCheck{"database": db, "redis": rd, "n8n": upstream},
	})
}

// dependencies returns a recent check of the database and Redis, running
// one when there is none; concurrent callers share it. The check runs
// detached from the request that started it, so that caller leaving does
// not fail the others; a caller that leaves stops waiting (ctx error).
func (h *Handler) dependencies(r *http.Request) (dependencyHealth, error) {
	if d, ok := h.healthState.fresh(time.Now()); ok {
		return d, nil
	}
	ch := h.healthState.flight.DoChan("dependencies", func() (any, error) {
		if d, ok := h.healthState.fresh(time.Now()); ok {
			return d, nil // a check finished just before this one began
		}
		d := h.checkDependencies(context.WithoutCancel(r.Context()))
		h.healthState.store(d, time.Now())
		return d, nil
	})
	select {
	case res := <-ch:
		return res.Val.(dependencyHealth), nil
	case <-r.Context().Done():
		return dependencyHealth{}, r.Context().Err()
	}
}

// checkDependencies pings the database and Redis, in parallel and each
// within its time bound.
func (h *Handler) checkDependencies(ctx context.Context) dependencyHealth {
	ctx, cancel := context.WithTimeout(ctx, healthTimeout)
	defer cancel()
	var d dependencyHealth
	var wg sync.WaitGroup
	wg.Go(func() { d.db = h.timedCheck("database", func() error { return h.cfg.Store.Ping(ctx) }) })
	if h.cfg.Redis != nil {
		wg.Go(func() {
			// Rate limits fall back to process memory when Redis is away, so
			// a slow Redis only degrades: do not let it hold up /health.
			rctx, cancel := context.WithTimeout(ctx, redisHealthTimeout)
			defer cancel()
			d.redis = h.timedCheck("redis", func() error { return h.cfg.Redis.Ping(rctx).Err() })
		})
	} else {
		d.redis = healthCheck{Status: "disabled"}
	}
	wg.Wait()
	return d
}

func (h *Handler) timedCheck(name string, check func() error) healthCheck {
	start := time.Now()
	err := check()
	latency := math.Round(float64(time.Since(start).Microseconds())/10) / 100
	if err != nil {
		h.cfg.Logger.Warn("health check failed", zap.String("check", name), zap.Error(err))
		return healthCheck{Status: "down", LatencyMS: &latency}
	}
	return healthCheck{Status: "ok", LatencyMS: &latency}
}
