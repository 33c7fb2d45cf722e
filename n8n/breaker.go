package n8n

import (
	"errors"
	"net/http"
	"sync"
	"time"
)

// BreakerState is the state of the circuit breaker.
type BreakerState string

// The circuit breaker's states.
const (
	StateClosed   BreakerState = "closed"    // requests flow
	StateHalfOpen BreakerState = "half-open" // a probe is let through
	StateOpen     BreakerState = "open"      // requests fail at once with 503
)

// firstOpenInterval is how long the circuit stays open the first time it
// opens; each probe that fails doubles it, up to BreakerConfig.OpenTimeout.
const firstOpenInterval = time.Second

var errCircuitOpen = errors.New("circuit breaker is open")

// verdict is what the outcome of one exchange says about n8n.
type verdict int

const (
	verdictNone verdict = iota // nothing: the caller cancelled or closed the reply
	verdictUp                  // n8n answered, even if its workflow failed
	verdictDown                // n8n is unreachable or overloaded
)

// verdictOf judges an exchange's outcome (nil: a complete reply). Only
// what says n8n cannot be reached or cannot cope counts against it: no
// connection, a timeout waiting for it, 502/503/504 (from n8n or a proxy
// in front of it), a connection cut during the reply. Anything n8n
// answered itself (a workflow error, its 500 "Error in workflow", an
// unusable reply, a 200 HTML page, 4xx) means n8n is up: one visitor
// whose messages break the workflow must not shut the chat for everyone.
func verdictOf(err error) verdict {
	if err == nil {
		return verdictUp
	}
	var e *Error
	if !errors.As(err, &e) {
		return verdictNone
	}
	switch e.Reason {
	case ReasonConnect, ReasonRead, ReasonFirstByteTimeout, ReasonIdleTimeout:
		return verdictDown
	case ReasonStatus:
		switch e.UpstreamStatus {
		case http.StatusBadGateway, http.StatusServiceUnavailable, http.StatusGatewayTimeout:
			return verdictDown
		}
		return verdictUp
	case ReasonCanceled, ReasonClosed, ReasonShutdown, ReasonCircuitOpen:
		return verdictNone
	}
	return verdictUp
}

// breaker is the circuit breaker in front of n8n, in two steps: allow
// before a request, then the outcome once its reply has ended.
// FailureThreshold failures in a row open it; while open every request is
// refused at once; then it lets HalfOpenProbes requests through, and
// closes when they succeed or opens again when one fails. It stays open
// 1 s the first time and twice as long after each failed probe, up to
// OpenTimeout, so the chat is back within seconds of a short n8n outage.
// (gobreaker's open period is fixed, hence this small state machine.)
type breaker struct {
	threshold uint32
	probes    uint32
	firstOpen time.Duration
	maxOpen   time.Duration
	onChange  func(from, to BreakerState)
	now       func() time.Time

	mu        sync.Mutex
	state     BreakerState
	failures  uint32    // closed: failures in a row
	opens     int       // times opened since it last closed
	openUntil time.Time // open: when the next probe may go
	inFlight  uint32    // half-open: probes under way
	successes uint32    // half-open: good probes
	gen       uint64    // bumped on each change of state: later outcomes of earlier requests are ignored
}

func newBreaker(cfg BreakerConfig, onChange func(from, to BreakerState)) *breaker {
	return &breaker{
		threshold: cfg.FailureThreshold,
		probes:    cfg.HalfOpenProbes,
		firstOpen: min(firstOpenInterval, cfg.OpenTimeout),
		maxOpen:   cfg.OpenTimeout,
		onChange:  onChange,
		now:       time.Now,
		state:     StateClosed,
	}
}

// allow returns errCircuitOpen when the request must not be sent, or a
// function to report its outcome with (once).
func (b *breaker) allow() (done func(outcome error), err error) {
	b.mu.Lock()
	defer b.mu.Unlock()
	b.refresh()
	switch b.state {
	case StateOpen:
		return nil, errCircuitOpen
	case StateHalfOpen:
		if b.inFlight >= b.probes {
			return nil, errCircuitOpen // the probes are under way
		}
		b.inFlight++
	}
	gen := b.gen
	return func(outcome error) { b.report(gen, verdictOf(outcome)) }, nil
}

func (b *breaker) report(gen uint64, v verdict) {
	b.mu.Lock()
	defer b.mu.Unlock()
	b.refresh()
	if gen != b.gen {
		return
	}
	switch b.state {
	case StateClosed:
		switch v {
		case verdictUp:
			b.failures = 0
		case verdictDown:
			if b.failures++; b.failures >= b.threshold {
				b.open()
			}
		}
	case StateHalfOpen:
		b.inFlight--
		switch v {
		case verdictUp:
			if b.successes++; b.successes >= b.probes {
				b.set(StateClosed)
			}
		case verdictDown:
			b.open()
		}
	}
}

// open opens the circuit for the next interval: 1 s, doubled for each
// time it opened since it last closed, at most maxOpen.
func (b *breaker) open() {
	d := b.maxOpen
	if b.opens < 30 {
		d = min(b.firstOpen<<b.opens, b.maxOpen)
	}
	b.opens++
	b.openUntil = b.now().Add(d)
	b.set(StateOpen)
}

// refresh lets an open circuit whose interval has passed probe.
func (b *breaker) refresh() {
	if b.state == StateOpen && !b.now().Before(b.openUntil) {
		b.set(StateHalfOpen)
	}
}

func (b *breaker) set(to BreakerState) {
	from := b.state
	if from == to {
		return
	}
	b.state = to
	b.gen++
	b.inFlight, b.successes = 0, 0
	if to == StateClosed {
		b.failures, b.opens = 0, 0
	}
	if b.onChange != nil {
		b.onChange(from, to)
	}
}

// State returns the current state.
func (b *breaker) State() BreakerState {
	b.mu.Lock()
	defer b.mu.Unlock()
	b.refresh()
	return b.state
}

// retryAfter is how long a refused request should wait: the rest of the
// open interval, at least a second.
func (b *breaker) retryAfter() time.Duration {
	b.mu.Lock()
	defer b.mu.Unlock()
	b.refresh()
	if b.state != StateOpen {
		return time.Second
	}
	return max(b.openUntil.Sub(b.now()), time.Second)
}
