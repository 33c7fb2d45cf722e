package guard

import (
	"context"
	"crypto/hmac"
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"fmt"
	"math"
	"net/http"
	"net/netip"
	"slices"
	"strconv"
	"strings"
	"sync"
	"time"

	"github.com/go-redis/redis_rate/v10"
	"github.com/redis/go-redis/v9"
	"go.uber.org/zap"
)

// Tier names what a rate limit counts.
type Tier string

// The rate-limit tiers (SPEC §7, §9.12).
const (
	TierIP      Tier = "ip"      // per client IP (Caddy's client_ip): session and chat routes
	TierSession Tier = "session" // per visitor or widget session: chat routes
	TierDomain  Tier = "domain"  // per site (the session's origin host)
	TierCreate  Tier = "create"  // session creations per client IP
	TierUser    Tier = "user"    // per verified user (identity_secret), across their sessions: chat routes
)

// Tiers lists every tier, in a stable order.
func Tiers() []Tier { return []Tier{TierIP, TierSession, TierDomain, TierCreate, TierUser} }

// ParseTier parses a tier name as written in the Caddyfile.
func ParseTier(s string) (Tier, error) {
	t := Tier(s)
	if !slices.Contains(Tiers(), t) {
		return "", fmt.Errorf("unknown rate limit tier %q (want ip, session, domain, create or user)", s)
	}
	return t, nil
}

// DefaultLimits returns the default windows of every tier (SPEC §3): ip
// 60/1m and 1000/1h, session 30/1m, domain 1000/1m, create 10/1m, user
// 30/1m (one person's budget, however many tabs and devices they chat
// from). The map is new on every call, so callers may change it.
func DefaultLimits() map[Tier][]redis_rate.Limit {
	return map[Tier][]redis_rate.Limit{
		TierIP:      {redis_rate.PerMinute(60), redis_rate.PerHour(1000)},
		TierSession: {redis_rate.PerMinute(30)},
		TierDomain:  {redis_rate.PerMinute(1000)},
		TierCreate:  {redis_rate.PerMinute(10)},
		TierUser:    {redis_rate.PerMinute(30)},
	}
}

// Bounds on a rate, so that every configured rate is one the GCRA
// arithmetic (float seconds, as in redis_rate's script) handles exactly
// enough, and whose keys expire in reasonable time.
const (
	maxRateN      = 1_000_000
	minRateWindow = time.Second
	maxRateWindow = 30 * 24 * time.Hour
)

// ParseRate parses the Caddyfile form `<N>/<window>`: N requests per
// window, N also being the burst (a client that was quiet may send N at
// once; after that one more every window/N). The window is a duration with
// the units s, m, h or d, as in Caddy ("60/1m", "1000/1h", "5/30s",
// "100/1d"); Go forms such as "1h30m" also work.
func ParseRate(s string) (redis_rate.Limit, error) {
	nStr, wStr, ok := strings.Cut(s, "/")
	if !ok {
		return redis_rate.Limit{}, fmt.Errorf("rate %q: want <N>/<window>, such as 60/1m", s)
	}
	n, err := strconv.Atoi(nStr)
	if err != nil || n < 1 || n > maxRateN || nStr[0] == '+' {
		return redis_rate.Limit{}, fmt.Errorf("rate %q: the count must be a whole number from 1 to %d", s, maxRateN)
	}
	w, err := parseWindow(wStr)
	if err != nil {
		return redis_rate.Limit{}, fmt.Errorf("rate %q: %w", s, err)
	}
	l := redis_rate.Limit{Rate: n, Burst: n, Period: w}
	if err := checkLimit(l); err != nil {
		return redis_rate.Limit{}, fmt.Errorf("rate %q: %w", s, err)
	}
	return l, nil
}

// parseWindow parses a positive duration; a "d" unit means 24 hours, as in
// caddy.ParseDuration.
func parseWindow(s string) (time.Duration, error) {
	if s == "" {
		return 0, errors.New("missing window, such as 1m")
	}
	// Expand each "<number>d" into hours, so "1d12h" works too.
	var b strings.Builder
	start := 0
	for i := 0; i < len(s); i++ {
		if s[i] != 'd' {
			continue
		}
		j := i
		for j > start && (s[j-1] >= '0' && s[j-1] <= '9' || s[j-1] == '.') {
			j--
		}
		if j == i {
			return 0, fmt.Errorf("invalid window %q", s)
		}
		days, err := strconv.ParseFloat(s[j:i], 64)
		if err != nil || days > 366 {
			return 0, fmt.Errorf("invalid window %q", s)
		}
		b.WriteString(s[start:j])
		b.WriteString(strconv.FormatFloat(days*24, 'f', -1, 64))
		b.WriteString("h")
		start = i + 1
	}
	b.WriteString(s[start:])
	d, err := time.ParseDuration(b.String())
	if err != nil || s[0] == '-' || s[0] == '+' {
		return 0, fmt.Errorf("invalid window %q (use a duration such as 30s, 1m, 1h or 1d)", s)
	}
	return d, nil
}

func checkLimit(l redis_rate.Limit) error {
	switch {
	case l.Rate < 1 || l.Rate > maxRateN:
		return fmt.Errorf("the count must be from 1 to %d", maxRateN)
	case l.Burst < 1 || l.Burst > maxRateN:
		return fmt.Errorf("the burst must be from 1 to %d", maxRateN)
	case l.Period < minRateWindow:
		return fmt.Errorf("the window must be at least %s", minRateWindow)
	case l.Period > maxRateWindow:
		return fmt.Errorf("the window must be at most %s", FormatWindow(maxRateWindow))
	}
	return nil
}

// FormatRate writes a limit in the `<N>/<window>` form ParseRate reads,
// adding " (burst B)" when the burst differs from N (which ParseRate never
// produces).
func FormatRate(l redis_rate.Limit) string {
	s := strconv.Itoa(l.Rate) + "/" + FormatWindow(l.Period)
	if l.Burst != l.Rate {
		s += " (burst " + strconv.Itoa(l.Burst) + ")"
	}
	return s
}

// FormatWindow writes a window compactly: 30s, 1m, 1h, 2d, or Go's form
// when it is not a whole number of one unit.
func FormatWindow(d time.Duration) string {
	switch {
	case d <= 0:
		return d.String()
	case d%(24*time.Hour) == 0:
		return strconv.FormatInt(int64(d/(24*time.Hour)), 10) + "d"
	case d%time.Hour == 0:
		return strconv.FormatInt(int64(d/time.Hour), 10) + "h"
	case d%time.Minute == 0:
		return strconv.FormatInt(int64(d/time.Minute), 10) + "m"
	case d%time.Second == 0:
		return strconv.FormatInt(int64(d/time.Second), 10) + "s"
	}
	return d.String()
}

// Key is one thing a request is counted against: a tier and the identity
// it counts (a client IP, a session id, a site). Use IPKeyID for client
// IPs.
type Key struct {
	Tier Tier
	ID   string
}

// IPKeyID is the identity to rate-limit a client IP by: the address itself
// for IPv4, its /64 network for IPv6 (one subscriber usually holds a whole
// /64, so per-address limits would be trivial to sidestep). Strings that
// are not IP addresses are returned unchanged.
func IPKeyID(ip string) string {
	addr, err := netip.ParseAddr(ip)
	if err != nil {
		return ip
	}
	addr = addr.Unmap()
	if addr.Is6() {
		p, _ := addr.WithZone("").Prefix(64)
		return p.String()
	}
	return addr.String()
}

// Defaults of LimiterConfig.
const (
	DefaultPrefix       = "chatproxy"
	DefaultBlockAfter   = 10
	DefaultBlockWindow  = time.Minute
	DefaultBlockFor     = 5 * time.Minute
	DefaultRedisTimeout = 250 * time.Millisecond
	DefaultRedisRetry   = 5 * time.Second
)

// LimiterConfig configures a Limiter.
type LimiterConfig struct {
	// Redis holds the shared state, so that every Caddy instance pointed at
	// it enforces one budget. Nil keeps the state in this process. Build
	// the client from RedisOptions (or set ContextTimeoutEnabled yourself):
	// the limiter bounds each call by RedisTimeout through its context.
	// With Redis Cluster, Prefix must hold a hash tag (such as
	// "{chatproxy}"), because one request's keys are checked in one script.
	Redis redis.UniversalClient

	// Prefix starts every Redis key, so that several deployments can share
	// one Redis without sharing budgets. Default "chatproxy".
	Prefix string

	// HashKey, when set, keys the hash that turns identities (IPs, session
	// ids, sites) into key names (HMAC-SHA-256), so that the names cannot
	// be reversed by hashing every IPv4 address. Every instance sharing a
	// Redis must use the same key. Without it a plain SHA-256 is used,
	// which still keeps raw IPs out of key names and logs of Redis.
	HashKey []byte

	// Limits are the windows of each tier. Nil selects DefaultLimits; a
	// tier missing from a non-nil map (or with no windows) is not limited.
	// Within a tier each window must be different.
	Limits map[Tier][]redis_rate.Limit

	// BlockAfter is how many refusals of one key within BlockWindow make
	// it a repeat offender, blocked for BlockFor: a client that ignores
	// Retry-After and keeps hammering is then refused at once. 0 selects
	// 10; a negative value turns blocking off.
	BlockAfter int

	// BlockWindow is the period over which refusals are counted. Default
	// 1m.
	BlockWindow time.Duration

	// BlockFor is how long a repeat offender is refused without further
	// checks. Blocked requests do not extend it. Default 5m.
	BlockFor time.Duration

	// BlockTiers are the tiers whose keys can be blocked. Default ip,
	// session and create: blocking a whole site (domain) because of a few
	// clients would turn one abuser into an outage for everyone.
	BlockTiers []Tier

	// RedisTimeout bounds each Redis call; a slower answer counts as an
	// outage, so a sick Redis costs requests little latency. Default
	// 250ms.
	RedisTimeout time.Duration

	// RedisRetry is how often, during an outage, one request tries Redis
	// again (the others use the in-process state meanwhile). Default 5s.
	RedisRetry time.Duration

	// Logger receives one warning when Redis becomes unreachable and one
	// info line when it is back. Nil discards them.
	Logger *zap.Logger

	// Now is the clock, for tests. When set it is also used with Redis
	// (instead of the Redis server's clock, which normally keeps every
	// instance on one time line).
	Now func() time.Time
}

// Limiter enforces the rate limits of all tiers with GCRA (the generic cell
// rate algorithm, as go-redis/redis_rate implements it): each window of
// each key keeps a "theoretical arrival time"; a request is allowed while
// that time is less than one burst ahead of now. All the keys of a request
// are checked together and atomically, and consumed only when every one of
// them allows the request, so that a request refused by one window spends
// nothing from the others.
//
// A Limiter is safe for concurrent use. It starts no goroutines; there is
// nothing to close (the Redis client belongs to the caller).
type Limiter struct {
	rdb         redis.UniversalClient
	prefix      string
	hashKey     []byte
	limits      map[Tier][]redis_rate.Limit
	blockAfter  int
	blockWindow time.Duration
	blockFor    time.Duration
	blockTiers  map[Tier]bool
	timeout     time.Duration
	retry       time.Duration
	log         *zap.Logger
	clock       func() time.Time
	fixedClock  bool

	mem *memStore

	outage outageState
}

// outageState tracks whether Redis is usable.
type outageState struct {
	mu      sync.Mutex
	down    bool
	probing bool      // one request is trying Redis again
	nextTry time.Time // when the next probe may start
}

// NewLimiter checks the configuration and builds a Limiter. It does no I/O.
func NewLimiter(cfg LimiterConfig) (*Limiter, error) {
	l := &Limiter{
		rdb:         cfg.Redis,
		prefix:      cfg.Prefix,
		hashKey:     slices.Clone(cfg.HashKey),
		blockAfter:  cfg.BlockAfter,
		blockWindow: cfg.BlockWindow,
		blockFor:    cfg.BlockFor,
		timeout:     cfg.RedisTimeout,
		retry:       cfg.RedisRetry,
		log:         cfg.Logger,
		clock:       cfg.Now,
		fixedClock:  cfg.Now != nil,
		mem:         newMemStore(),
	}
	if l.prefix == "" {
		l.prefix = DefaultPrefix
	}
	if l.blockAfter == 0 {
		l.blockAfter = DefaultBlockAfter
	}
	if l.blockWindow == 0 {
		l.blockWindow = DefaultBlockWindow
	}
	if l.blockFor == 0 {
		l.blockFor = DefaultBlockFor
	}
	if l.timeout == 0 {
		l.timeout = DefaultRedisTimeout
	}
	if l.retry == 0 {
		l.retry = DefaultRedisRetry
	}
	if l.log == nil {
		l.log = zap.NewNop()
	}
	if l.clock == nil {
		l.clock = time.Now
	}
	if l.blockWindow < 0 || l.blockFor < 0 || l.timeout < 0 || l.retry < 0 {
		return nil, errors.New("rate limiter: durations must not be negative")
	}
	if l.blockAfter > 0 && (l.blockWindow < time.Millisecond || l.blockFor < time.Millisecond) {
		return nil, errors.New("rate limiter: block window and block duration must be at least 1ms")
	}
	blockTiers := cfg.BlockTiers
	if blockTiers == nil {
		blockTiers = []Tier{TierIP, TierSession, TierCreate}
	}
	l.blockTiers = make(map[Tier]bool, len(blockTiers))
	for _, t := range blockTiers {
		if _, err := ParseTier(string(t)); err != nil {
			return nil, fmt.Errorf("rate limiter: block tiers: %w", err)
		}
		l.blockTiers[t] = true
	}

	limits := cfg.Limits
	if limits == nil {
		limits = DefaultLimits()
	}
	l.limits = make(map[Tier][]redis_rate.Limit, len(limits))
	for t, ls := range limits {
		if _, err := ParseTier(string(t)); err != nil {
			return nil, fmt.Errorf("rate limiter: %w", err)
		}
		seen := make(map[time.Duration]bool, len(ls))
		for _, lim := range ls {
			if err := checkLimit(lim); err != nil {
				return nil, fmt.Errorf("rate limiter: tier %s: %s: %w", t, FormatRate(lim), err)
			}
			if seen[lim.Period] {
				return nil, fmt.Errorf("rate limiter: tier %s has two limits for the window %s", t, FormatWindow(lim.Period))
			}
			seen[lim.Period] = true
		}
		l.limits[t] = slices.Clone(ls)
	}

	if cc, ok := cfg.Redis.(*redis.ClusterClient); ok {
		if !hasHashTag(l.prefix) {
			return nil, fmt.Errorf("rate limiter: with Redis Cluster the prefix must hold a hash tag, such as {%s}, so that one request's keys share a slot", l.prefix)
		}
		if !cc.Options().ContextTimeoutEnabled {
			return nil, errors.New("rate limiter: the Redis client must have ContextTimeoutEnabled so that calls can be bounded (see guard.RedisOptions)")
		}
	}
	if c, ok := cfg.Redis.(*redis.Client); ok && !c.Options().ContextTimeoutEnabled {
		return nil, errors.New("rate limiter: the Redis client must have ContextTimeoutEnabled so that calls can be bounded (see guard.RedisOptions)")
	}
	return l, nil
}

func hasHashTag(s string) bool {
	open := strings.IndexByte(s, '{')
	if open < 0 {
		return false
	}
	end := strings.IndexByte(s[open+1:], '}')
	return end > 0
}

// Limits returns the windows in force for a tier.
func (l *Limiter) Limits(t Tier) []redis_rate.Limit { return slices.Clone(l.limits[t]) }

// Decision is the outcome of Allow.
type Decision struct {
	// Allowed says whether the request may go on.
	Allowed bool
	// Blocked says the key was refused as a repeat offender (see
	// LimiterConfig.BlockAfter) rather than for its rate alone.
	Blocked bool
	// Tier is the refusing tier, or when allowed the tier with the least
	// room left; empty when no limit applied.
	Tier Tier
	// Limit is the window behind Tier; zero when no limit applied.
	Limit redis_rate.Limit
	// Remaining is how many more requests that window would allow now.
	Remaining int
	// ResetAfter is when that window is back to its full burst.
	ResetAfter time.Duration
	// RetryAfter is how long to wait before a retry can succeed; zero
	// when allowed.
	RetryAfter time.Duration
}

// RateLimitBody is the JSON body of a 429 answer.
type RateLimitBody struct {
	Error      string `json:"error"`       // always "rate_limited"
	Message    string `json:"message"`     // human text
	RetryAfter int    `json:"retry_after"` // whole seconds, as in Retry-After
	Tier       Tier   `json:"tier"`        // ip, session, domain, create or user
}

// SetHeaders writes the rate-limit headers of d:
//
//	RateLimit-Limit: <N>            the burst of the binding window
//	RateLimit-Remaining: <n>        requests left in it now
//	RateLimit-Reset: <seconds>      until it is back to its full burst
//	Retry-After: <seconds>          only when refused; at least 1
//
// Seconds are whole and rounded up. No RateLimit-* header is written when
// no limit applied.
func (d Decision) SetHeaders(h http.Header) {
	if !d.Limit.IsZero() {
		h.Set("RateLimit-Limit", strconv.Itoa(d.Limit.Burst))
		h.Set("RateLimit-Remaining", strconv.Itoa(max(d.Remaining, 0)))
		h.Set("RateLimit-Reset", strconv.Itoa(ceilSeconds(d.ResetAfter)))
	}
	if !d.Allowed {
		h.Set("Retry-After", strconv.Itoa(d.RetryAfterSeconds()))
	}
}

// RetryAfterSeconds is RetryAfter in whole seconds, rounded up, at least 1
// (a refused client must wait some time).
func (d Decision) RetryAfterSeconds() int { return max(ceilSeconds(d.RetryAfter), 1) }

// Body builds the JSON body for a refused request. The full answer is
//
//	HTTP/1.1 429 Too Many Requests
//	Content-Type: application/json; charset=utf-8
//	Retry-After: 12
//	RateLimit-Limit: 60
//	RateLimit-Remaining: 0
//	RateLimit-Reset: 58
//
//	{"error":"rate_limited","message":"too many requests; retry in 12 seconds","retry_after":12,"tier":"ip"}
//
// and, for a repeat offender, the message says the client is blocked and
// retry_after counts down the block.
func (d Decision) Body() RateLimitBody {
	secs := d.RetryAfterSeconds()
	unit := "seconds"
	if secs == 1 {
		unit = "second"
	}
	msg := fmt.Sprintf("too many requests; retry in %d %s", secs, unit)
	if d.Blocked {
		msg = fmt.Sprintf("too many requests; temporarily blocked, retry in %d %s", secs, unit)
	}
	return RateLimitBody{Error: "rate_limited", Message: msg, RetryAfter: secs, Tier: d.Tier}
}

func ceilSeconds(d time.Duration) int {
	if d <= 0 {
		return 0
	}
	return int((d + time.Second - 1) / time.Second)
}

// group is one distinct Key of a request, with the windows of its tier.
type group struct {
	key       Key
	id        string // hashed identity
	blockable bool
}

// window is one window of one group: one GCRA state.
type window struct {
	group int
	limit redis_rate.Limit
}

// outcome is what either backend decided, in backend-neutral units
// (seconds as float64, like redis_rate's script).
type outcome struct {
	kind       outcomeKind
	window     int     // allowed: the tightest window; refused: the one with the longest wait
	group      int     // blocked: the blocked group
	remaining  float64 // allowed
	retry      float64 // refused, blocked: seconds
	reset      float64 // seconds
	blockedNow int     // refused: 1 + the group that this refusal blocked, or 0
}

type outcomeKind int

const (
	outcomeAllowed outcomeKind = iota
	outcomeRefused
	outcomeBlocked
)

// Allow counts one request against every key and decides. Keys of tiers
// without limits are ignored; duplicate keys count once. A key with an
// empty ID is a caller bug and an error.
//
// Redis trouble does not make Allow fail: the limits continue in process
// (see Degraded). Allow returns an error only for invalid keys or when ctx
// ends first; the request must then not go on (there is no fail-open).
func (l *Limiter) Allow(ctx context.Context, keys ...Key) (Decision, error) {
	groups, windows, err := l.plan(keys)
	if err != nil {
		return Decision{}, err
	}
	if len(windows) == 0 {
		return Decision{Allowed: true}, nil
	}
	var out outcome
	err = l.withBackend(ctx, func(ctx context.Context) error {
		var err error
		out, err = l.allowRedis(ctx, groups, windows)
		return err
	}, func() {
		out = l.mem.allow(l, groups, windows, epochSeconds(l.clock()))
	})
	if err != nil {
		return Decision{}, err
	}
	return l.decision(out, groups, windows), nil
}

// plan turns keys into groups and windows.
func (l *Limiter) plan(keys []Key) ([]group, []window, error) {
	groups := make([]group, 0, len(keys))
	var windows []window
	seen := make(map[Key]bool, len(keys))
	for _, k := range keys {
		if k.ID == "" {
			return nil, nil, fmt.Errorf("rate limit key of tier %q has an empty id", k.Tier)
		}
		if _, err := ParseTier(string(k.Tier)); err != nil {
			return nil, nil, err
		}
		limits := l.limits[k.Tier]
		if len(limits) == 0 || seen[k] {
			continue
		}
		seen[k] = true
		groups = append(groups, group{key: k, id: l.hashID(k.ID), blockable: l.blockAfter > 0 && l.blockTiers[k.Tier]})
		for _, lim := range limits {
			windows = append(windows, window{group: len(groups) - 1, limit: lim})
		}
	}
	return groups, windows, nil
}

func (l *Limiter) decision(out outcome, groups []group, windows []window) Decision {
	switch out.kind {
	case outcomeBlocked:
		g := groups[out.group]
		d := seconds(out.retry)
		return Decision{Blocked: true, Tier: g.key.Tier, Limit: l.limits[g.key.Tier][0], ResetAfter: d, RetryAfter: d}
	case outcomeRefused:
		w := windows[out.window]
		d := Decision{
			Tier:       groups[w.group].key.Tier,
			Limit:      w.limit,
			ResetAfter: seconds(out.reset),
			RetryAfter: seconds(out.retry),
		}
		if out.blockedNow > 0 {
			d.Blocked = true
			d.Tier = groups[out.blockedNow-1].key.Tier
			d.RetryAfter = max(d.RetryAfter, l.blockFor)
			d.ResetAfter = max(d.ResetAfter, d.RetryAfter)
		}
		return d
	default:
		w := windows[out.window]
		return Decision{
			Allowed:    true,
			Tier:       groups[w.group].key.Tier,
			Limit:      w.limit,
			Remaining:  int(math.Floor(out.remaining)),
			ResetAfter: seconds(out.reset),
		}
	}
}

func seconds(f float64) time.Duration {
	if f <= 0 {
		return 0
	}
	return time.Duration(math.Ceil(f * float64(time.Second)))
}

// hashID turns an identity into the part of a key name that names it.
func (l *Limiter) hashID(id string) string {
	var sum []byte
	if len(l.hashKey) > 0 {
		m := hmac.New(sha256.New, l.hashKey)
		m.Write([]byte(id))
		sum = m.Sum(nil)
	} else {
		s := sha256.Sum256([]byte("chatproxy-id\x00" + id))
		sum = s[:]
	}
	return hex.EncodeToString(sum[:16])
}

// Key names. Rate windows: <prefix>:<tier>:<window>:<id>; strikes and
// blocks of repeat offenders: <prefix>:<tier>:strikes:<id> and
// <prefix>:<tier>:blocked:<id>; repeated messages:
// <prefix>:repeat:<session id>:<text hash>.
func (l *Limiter) windowKey(g group, lim redis_rate.Limit) string {
	return l.prefix + ":" + string(g.key.Tier) + ":" + FormatWindow(lim.Period) + ":" + g.id
}

func (l *Limiter) strikeKey(g group) string {
	return l.prefix + ":" + string(g.key.Tier) + ":strikes:" + g.id
}

func (l *Limiter) blockKey(g group) string {
	return l.prefix + ":" + string(g.key.Tier) + ":blocked:" + g.id
}

// jan2017 is the epoch of the GCRA timestamps, as in redis_rate's script:
// seconds since then still fit a float64 with microsecond precision.
var jan2017 = time.Date(2017, 1, 1, 0, 0, 0, 0, time.UTC)

func epochSeconds(t time.Time) float64 {
	return float64(t.Sub(jan2017).Microseconds()) / 1e6
}

// Degraded reports whether Redis is configured but currently unusable, so
// that limits are enforced in process only (each instance then has its own
// budget). /health reports this as "degraded".
func (l *Limiter) Degraded() bool {
	if l.rdb == nil {
		return false
	}
	l.outage.mu.Lock()
	defer l.outage.mu.Unlock()
	return l.outage.down
}

// UsesRedis reports whether a Redis client was configured.
func (l *Limiter) UsesRedis() bool { return l.rdb != nil }

// withBackend runs viaRedis when Redis is configured and usable, and
// local otherwise or when Redis fails. It returns an error only when ctx
// ended.
func (l *Limiter) withBackend(ctx context.Context, viaRedis func(context.Context) error, local func()) error {
	if err := ctx.Err(); err != nil {
		return err
	}
	if l.rdb != nil {
		if probe, ok := l.redisUsable(); ok {
			rctx, cancel := context.WithTimeout(ctx, l.timeout)
			err := viaRedis(rctx)
			cancel()
			if err == nil {
				l.redisAnswered(probe)
				return nil
			}
			if ctx.Err() != nil {
				// The caller gave up; that says nothing about Redis.
				l.probeAbandoned(probe)
				return ctx.Err()
			}
			l.redisFailed(probe, err)
		}
	}
	local()
	return nil
}

// redisUsable says whether to call Redis, and whether this call is the
// probe of an outage.
func (l *Limiter) redisUsable() (probe, ok bool) {
	o := &l.outage
	o.mu.Lock()
	defer o.mu.Unlock()
	if !o.down {
		return false, true
	}
	if o.probing || time.Now().Before(o.nextTry) {
		return false, false
	}
	o.probing = true
	return true, true
}

func (l *Limiter) redisAnswered(probe bool) {
	o := &l.outage
	o.mu.Lock()
	defer o.mu.Unlock()
	// A call started before the outage may still succeed after it was
	// noticed; only the probe ends an outage.
	if o.down && probe {
		o.down = false
		o.probing = false
		l.log.Info("redis reachable again; rate limits shared through redis")
	}
}

func (l *Limiter) redisFailed(probe bool, err error) {
	o := &l.outage
	o.mu.Lock()
	defer o.mu.Unlock()
	if !o.down {
		o.down = true
		l.log.Warn("redis unreachable; rate limits continue in process until it answers again",
			zap.Error(err), zap.Duration("retry_every", l.retry))
	}
	if probe || !o.probing {
		o.probing = false
		o.nextTry = time.Now().Add(l.retry)
	}
}

func (l *Limiter) probeAbandoned(probe bool) {
	if !probe {
		return
	}
	l.outage.mu.Lock()
	l.outage.probing = false
	l.outage.mu.Unlock()
}
