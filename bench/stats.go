package main

import (
	"fmt"
	"slices"
	"time"
)

// sample is a set of measured durations.
type sample []time.Duration

// quantile returns the q-quantile (nearest rank); 0 for an empty sample.
// It sorts the sample.
func (s sample) quantile(q float64) time.Duration {
	if len(s) == 0 {
		return 0
	}
	if !slices.IsSorted(s) {
		slices.Sort(s)
	}
	i := int(q*float64(len(s))+0.5) - 1
	i = max(0, min(i, len(s)-1))
	return s[i]
}

func (s sample) p50() time.Duration { return s.quantile(0.50) }
func (s sample) p99() time.Duration { return s.quantile(0.99) }

// ms formats a duration in milliseconds with a precision that suits it.
func ms(d time.Duration) string {
	v := float64(d) / float64(time.Millisecond)
	switch {
	case v < 0 && v > -10 || v >= 0 && v < 10:
		return fmt.Sprintf("%.3f ms", v)
	case v < 100 && v > -100:
		return fmt.Sprintf("%.2f ms", v)
	default:
		return fmt.Sprintf("%.1f ms", v)
	}
}

// signedMS is ms with an explicit sign, for differences.
func signedMS(d time.Duration) string {
	if d >= 0 {
		return "+" + ms(d)
	}
	return ms(d)
}

func kib(b int64) string {
	return fmt.Sprintf("%.1f KiB", float64(b)/1024)
}

func mib(b int64) string {
	return fmt.Sprintf("%.1f MiB", float64(b)/(1<<20))
}
