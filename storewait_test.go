package chatproxy

import (
	"testing"
	"time"

	"github.com/caddyserver/caddy/v2"
)

// store_wait is bounded: a negative wait makes no sense, and a write
// holding its request for minutes helps nobody.
func TestStoreWaitBounds(t *testing.T) {
	for _, tc := range []struct {
		wait time.Duration
		want string
	}{
		{-time.Second, "store_wait: must be between 0 (the default, 3s) and 1m, got -1s"},
		{2 * time.Minute, "store_wait: must be between 0 (the default, 3s) and 1m, got 2m0s"},
	} {
		err := mtProvision(t, mtConfig(t, func(c *ChatProxy) { c.StoreWait = caddy.Duration(tc.wait) }))
		if err == nil || err.Error() != tc.want {
			t.Errorf("store_wait %v: err = %v, want %s", tc.wait, err, tc.want)
		}
	}
	if err := mtProvision(t, mtConfig(t, func(c *ChatProxy) { c.StoreWait = caddy.Duration(10 * time.Second) })); err != nil {
		t.Errorf("store_wait 10s: %v", err)
	}
}
