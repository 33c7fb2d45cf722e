package guard

import (
	"sync"
	"time"

	"github.com/go-redis/redis_rate/v10"
)

// gcra evaluates one request against one window at time now, as
// redis_rate v10's allowN script does (all times in seconds): tat is the
// window's theoretical arrival time (ok=false when the window has no
// state). It returns the new TAT to store when the request is allowed,
// the requests remaining after it, and when refused how long to wait.
// resetAfter is when the window is back to its full burst.
func gcra(tat float64, ok bool, now float64, lim redis_rate.Limit) (newTAT, remaining, retryAfter, resetAfter float64, allowed bool) {
	emission := lim.Period.Seconds() / float64(lim.Rate)
	if !ok || tat < now {
		tat = now
	}
	newTAT = tat + emission // cost 1
	allowAt := newTAT - emission*float64(lim.Burst)
	diff := now - allowAt
	remaining = diff / emission
	if remaining < 0 {
		return 0, 0, -diff, tat - now, false
	}
	return newTAT, remaining, 0, newTAT - now, true
}

// memStore is the in-process state: used without Redis, and during a
// Redis outage. Entries carry their expiry; a sweep of the whole store
// runs when it doubled in size since the last sweep or a minute passed,
// so the cost is amortized and the store cannot grow without bound beyond
// the live entries. No goroutine is involved.
type memStore struct {
	mu        sync.Mutex
	tats      map[string]float64 // window key → TAT; expired when TAT ≤ now
	counters  map[string]counter // strikes and repeated messages
	blocks    map[string]float64 // block key → until
	lastSweep float64
	sweepAt   int // sweep when the entry count reaches this
}

type counter struct {
	n     int
	until float64
}

const (
	memSweepEvery   = 60.0 // seconds
	memSweepMinSize = 1024
)

func newMemStore() *memStore {
	return &memStore{
		tats:     make(map[string]float64),
		counters: make(map[string]counter),
		blocks:   make(map[string]float64),
		sweepAt:  memSweepMinSize,
	}
}

func (m *memStore) size() int { return len(m.tats) + len(m.counters) + len(m.blocks) }

// maybeSweep drops expired entries when due. m.mu must be held.
func (m *memStore) maybeSweep(now float64) {
	if m.lastSweep == 0 {
		m.lastSweep = now
	}
	if m.size() < m.sweepAt && now-m.lastSweep < memSweepEvery {
		return
	}
	for k, tat := range m.tats {
		if tat <= now {
			delete(m.tats, k)
		}
	}
	for k, c := range m.counters {
		if c.until <= now {
			delete(m.counters, k)
		}
	}
	for k, until := range m.blocks {
		if until <= now {
			delete(m.blocks, k)
		}
	}
	m.lastSweep = now
	m.sweepAt = max(2*m.size(), memSweepMinSize)
}

// allow is the in-process twin of allowScript: same steps, same figures.
func (m *memStore) allow(l *Limiter, groups []group, windows []window, now float64) outcome {
	m.mu.Lock()
	defer m.mu.Unlock()
	m.maybeSweep(now)

	// 1. A blocked key refuses at once.
	blocked, blockedTTL := -1, 0.0
	for i, g := range groups {
		if until, ok := m.blocks[l.blockKey(g)]; ok && until > now && until-now > blockedTTL {
			blocked, blockedTTL = i, until-now
		}
	}
	if blocked >= 0 {
		return outcome{kind: outcomeBlocked, group: blocked, retry: blockedTTL, reset: blockedTTL}
	}

	// 2. Evaluate every window without writing.
	keys := make([]string, len(windows))
	newTATs := make([]float64, len(windows))
	worst, worstRetry, worstReset := -1, -1.0, 0.0
	best, bestRemaining, bestReset := -1, 0.0, 0.0
	refused := make([]bool, len(groups))
	for i, w := range windows {
		keys[i] = l.windowKey(groups[w.group], w.limit)
		tat, ok := m.tats[keys[i]]
		newTAT, remaining, retry, reset, allowed := gcra(tat, ok, now, w.limit)
		if !allowed {
			refused[w.group] = true
			if retry > worstRetry {
				worst, worstRetry, worstReset = i, retry, reset
			}
			continue
		}
		newTATs[i] = newTAT
		if best < 0 || remaining < bestRemaining || remaining == bestRemaining && reset > bestReset {
			best, bestRemaining, bestReset = i, remaining, reset
		}
	}

	// 3. Refused: count a strike against each refusing key; too many
	// make it a repeat offender.
	if worst >= 0 {
		out := outcome{kind: outcomeRefused, window: worst, retry: worstRetry, reset: worstReset}
		for i, g := range groups {
			if !refused[i] || !g.blockable {
				continue
			}
			sk := l.strikeKey(g)
			c, ok := m.counters[sk]
			if !ok || c.until <= now {
				c = counter{until: now + l.blockWindow.Seconds()}
			}
			c.n++
			if c.n > l.blockAfter {
				m.blocks[l.blockKey(g)] = now + l.blockFor.Seconds()
				delete(m.counters, sk)
				out.blockedNow = i + 1
				continue
			}
			m.counters[sk] = c
		}
		return out
	}

	// 4. Allowed by every window: consume from all of them.
	for i, k := range keys {
		m.tats[k] = newTATs[i]
	}
	return outcome{kind: outcomeAllowed, window: best, remaining: bestRemaining, reset: bestReset}
}

// count increments a counter that lives for window from its first
// increment, and returns its new value.
func (m *memStore) count(key string, now float64, window time.Duration) int {
	m.mu.Lock()
	defer m.mu.Unlock()
	m.maybeSweep(now)
	c, ok := m.counters[key]
	if !ok || c.until <= now {
		c = counter{until: now + window.Seconds()}
	}
	c.n++
	m.counters[key] = c
	return c.n
}
