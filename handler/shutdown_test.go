package handler

import (
	"context"
	"testing"
	"time"

	"github.com/caddyserver/caddy/v2"
)

// Without an HTTP app the grace period counts as eternal, so a shutdown
// never drains.
func TestGracePeriodWithoutHTTPApp(t *testing.T) {
	ctx, cancel := caddy.NewContext(caddy.Context{Context: context.Background()})
	defer cancel()
	if got := httpGracePeriod(ctx); got != 0 {
		t.Fatalf("grace period without an HTTP app = %v", got)
	}
}

func TestDrainMargin(t *testing.T) {
	for grace, want := range map[time.Duration]time.Duration{
		400 * time.Millisecond: 40 * time.Millisecond,
		10 * time.Second:       time.Second,
		time.Minute:            2 * time.Second,
	} {
		if got := DrainMargin(grace); got != want {
			t.Errorf("DrainMargin(%v) = %v, want %v", grace, got, want)
		}
	}
}
