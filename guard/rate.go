package guard

import (
	"bytes"
	"encoding/json"
	"errors"
	"fmt"
	"time"

	"github.com/caddyserver/caddy/v2"
	"github.com/go-redis/redis_rate/v10"
)

// Rate is one rate limit as configured: Events requests per Window, Events
// also being the burst (a client that was quiet may send Events at once;
// after that one more every Window/Events). In JSON it is
// {"events": 60, "window": "1m"}; the Caddyfile form "60/1m" is accepted
// in JSON too.
type Rate struct {
	// How many requests the window allows, from 1 to 1000000.
	Events int `json:"events"`
	// The window, from 1s to 30d, such as "1m" or "1h".
	Window caddy.Duration `json:"window"`
}

// RateOf is the Rate of a limit that ParseRate returned.
func RateOf(l redis_rate.Limit) Rate {
	return Rate{Events: l.Rate, Window: caddy.Duration(l.Period)}
}

// Limit is the rate as the limiter counts it.
func (r Rate) Limit() redis_rate.Limit {
	return redis_rate.Limit{Rate: r.Events, Burst: r.Events, Period: time.Duration(r.Window)}
}

// String writes the rate in the Caddyfile form, such as 60/1m.
func (r Rate) String() string { return FormatRate(r.Limit()) }

// Check reports a rate out of bounds.
func (r Rate) Check() error {
	if err := checkLimit(r.Limit()); err != nil {
		return fmt.Errorf("rate %s: %w", r, err)
	}
	return nil
}

// MarshalJSON writes {"events":N,"window":"<window>"}, the window in the
// compact form (30s, 1m, 1h, 1d) that caddy.Duration reads back.
func (r Rate) MarshalJSON() ([]byte, error) {
	return json.Marshal(struct {
		Events int    `json:"events"`
		Window string `json:"window"`
	}{r.Events, FormatWindow(time.Duration(r.Window))})
}

// UnmarshalJSON reads {"events":N,"window":"1m"} (the window may also be
// a number of nanoseconds, as any caddy.Duration), or the string "N/window".
// Bounds are checked by Check, as for a rate built in Go.
func (r *Rate) UnmarshalJSON(b []byte) error {
	b = bytes.TrimSpace(b)
	if len(b) > 0 && b[0] == '"' {
		var s string
		if err := json.Unmarshal(b, &s); err != nil {
			return err
		}
		l, err := ParseRate(s)
		if err != nil {
			return err
		}
		*r = RateOf(l)
		return nil
	}
	var v struct {
		Events *int            `json:"events"`
		Window *caddy.Duration `json:"window"`
	}
	dec := json.NewDecoder(bytes.NewReader(b))
	dec.DisallowUnknownFields()
	if err := dec.Decode(&v); err != nil {
		return fmt.Errorf("rate: want {\"events\": 60, \"window\": \"1m\"} or \"60/1m\": %w", err)
	}
	if v.Events == nil || v.Window == nil {
		return errors.New(`rate: needs both "events" and "window", as in {"events": 60, "window": "1m"}`)
	}
	*r = Rate{Events: *v.Events, Window: *v.Window}
	return nil
}

// CheckRates checks one tier's rates: each in bounds, no two with the
// same window.
func CheckRates(rates []Rate) error {
	windows := make(map[caddy.Duration]bool, len(rates))
	for _, r := range rates {
		if err := r.Check(); err != nil {
			return err
		}
		if windows[r.Window] {
			return fmt.Errorf("two rates with the window %s", FormatWindow(time.Duration(r.Window)))
		}
		windows[r.Window] = true
	}
	return nil
}
