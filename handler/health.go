package handler

import (
	"context"
	"math"
	"net/http"
	"sync"
	"time"

	"go.uber.org/zap"

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

// health reports the module's dependencies. It names no URL, host or
// secret: only statuses and latencies. The database being down makes the
// whole service down (503); Redis or n8n trouble degrades it (200), since
// limits continue in process and the circuit breaker answers fast.
func (h *Handler) health(w http.ResponseWriter, r *http.Request) error {
	ctx, cancel := context.WithTimeout(r.Context(), healthTimeout)
	defer cancel()

	var db, rd healthCheck
	var wg sync.WaitGroup
	wg.Go(func() { db = h.timedCheck("database", func() error { return h.cfg.Store.Ping(ctx) }) })
	if h.cfg.Redis != nil {
		wg.Go(func() {
			// Rate limits fall back to process memory when Redis is away, so
			// a slow Redis only degrades: do not let it hold up /health.
			rctx, cancel := context.WithTimeout(ctx, redisHealthTimeout)
			defer cancel()
			rd = h.timedCheck("redis", func() error { return h.cfg.Redis.Ping(rctx).Err() })
		})
	} else {
		rd = healthCheck{Status: "disabled"}
	}
	wg.Wait()
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
