package handler

import (
	"context"
	"math"
	"net/http"
	"time"
)

// healthTimeout bounds each dependency check so /health answers promptly
// even when a dependency hangs.
const healthTimeout = 2 * time.Second

type healthCheck struct {
	Status    string   `json:"status"`
	LatencyMS *float64 `json:"latency_ms,omitempty"`
}

type healthResponse struct {
	Status string                 `json:"status"`
	Checks map[string]healthCheck `json:"checks"`
}

// health reports the module's dependencies. It names no URL, host or
// secret: only statuses and latencies.
func (h *Handler) health(w http.ResponseWriter, r *http.Request) error {
	ctx, cancel := context.WithTimeout(r.Context(), healthTimeout)
	defer cancel()

	start := time.Now()
	err := h.cfg.Store.Ping(ctx)
	latency := math.Round(float64(time.Since(start).Microseconds())/10) / 100
	db := healthCheck{Status: "ok", LatencyMS: &latency}
	status, code := "ok", http.StatusOK
	if err != nil {
		h.cfg.Logger.Warn("health: database check failed", zapError(err))
		db.Status = "down"
		status, code = "down", http.StatusServiceUnavailable
	}
	return writeJSON(w, code, healthResponse{
		Status: status,
		Checks: map[string]healthCheck{
			"database": db,
			"redis":    {Status: "disabled"},
		},
	})
}
