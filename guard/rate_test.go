package guard

import (
	"encoding/json"
	"strings"
	"testing"
	"time"

	"github.com/caddyserver/caddy/v2"
)

// A rate reads from the typed JSON form and from the older string form,
// and writes the typed form.
func TestRateJSON(t *testing.T) {
	want := Rate{Events: 60, Window: caddy.Duration(time.Minute)}
	for _, in := range []string{
		`{"events":60,"window":"1m"}`,
		`{"window":"60s","events":60}`,
		`{"events":60,"window":60000000000}`,
		`"60/1m"`,
	} {
		var got Rate
		if err := json.Unmarshal([]byte(in), &got); err != nil || got != want {
			t.Errorf("%s: got %+v, %v; want %+v", in, got, err, want)
		}
	}
	out, err := json.Marshal(map[string][]Rate{"ip": {want, {Events: 100, Window: caddy.Duration(24 * time.Hour)}}})
	if err != nil || string(out) != `{"ip":[{"events":60,"window":"1m"},{"events":100,"window":"1d"}]}` {
		t.Errorf("marshal: %s, %v", out, err)
	}
	for in, wantErr := range map[string]string{
		`{"events":60}`:                       `needs both "events" and "window"`,
		`{"window":"1m"}`:                     `needs both "events" and "window"`,
		`{"events":60,"window":"1m","x":1}`:   `unknown field "x"`,
		`{"events":"60","window":"1m"}`:       "want {",
		`{"events":60,"window":"soon"}`:       "want {",
		`"60 per minute"`:                     `rate "60 per minute": want <N>/<window>`,
		`60`:                                  "want {",
		`{"events":60,"window":"1m"} trailer`: "invalid character",
	} {
		var got Rate
		err := json.Unmarshal([]byte(in), &got)
		if err == nil || !strings.Contains(err.Error(), wantErr) {
			t.Errorf("%s: err = %v, want it to contain %q", in, err, wantErr)
		}
	}
}

func TestCheckRates(t *testing.T) {
	m := caddy.Duration(time.Minute)
	for _, tc := range []struct {
		rates []Rate
		want  string
	}{
		{[]Rate{{60, m}, {1000, caddy.Duration(time.Hour)}}, ""},
		{nil, ""},
		{[]Rate{{0, m}}, "rate 0/1m: the count must be from 1 to 1000000"},
		{[]Rate{{5, caddy.Duration(time.Millisecond)}}, "rate 5/1ms: the window must be at least 1s"},
		{[]Rate{{5, caddy.Duration(31 * 24 * time.Hour)}}, "rate 5/31d: the window must be at most 30d"},
		{[]Rate{{60, m}, {30, m}}, "two rates with the window 1m"},
	} {
		err := CheckRates(tc.rates)
		if got := ""; err != nil {
			got = err.Error()
			if got != tc.want {
				t.Errorf("CheckRates(%v) = %q, want %q", tc.rates, got, tc.want)
			}
		} else if tc.want != "" {
			t.Errorf("CheckRates(%v) = nil, want %q", tc.rates, tc.want)
		}
	}
}

// Whatever UnmarshalJSON accepts and Check passes writes back to the same
// rate.
func FuzzRateJSON(f *testing.F) {
	for _, s := range []string{`{"events":60,"window":"1m"}`, `"60/1m"`, `{"events":1,"window":1}`, `"3/1d12h"`, `{"events":-1,"window":"-1m"}`} {
		f.Add(s)
	}
	f.Fuzz(func(t *testing.T, s string) {
		var r Rate
		if err := json.Unmarshal([]byte(s), &r); err != nil || r.Check() != nil {
			return
		}
		out, err := json.Marshal(r)
		if err != nil {
			t.Fatalf("marshal %+v: %v", r, err)
		}
		var back Rate
		if err := json.Unmarshal(out, &back); err != nil || back != r {
			t.Fatalf("round trip of %s via %s = %+v, %v; want %+v", s, out, back, err, r)
		}
	})
}
