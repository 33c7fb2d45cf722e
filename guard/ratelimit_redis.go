package guard

import (
	"context"
	"errors"
	"fmt"
	"net/url"
	"strconv"
	"strings"
	"time"

	"github.com/redis/go-redis/v9"
)

// allowScript checks every window of a request in one round trip and
// atomically. The per-window arithmetic is redis_rate v10's allowN script
// (GCRA, cost 1); what it adds is that all windows are evaluated first and
// written only when every one allows, plus the repeat-offender blocks.
//
//	KEYS: n window keys, then m strike keys, then m block keys (one per
//	      distinct tier+id of the request)
//	ARGV: n, m, now ("" = the Redis server's clock), block_after (≤ 0 = off),
//	      block_for_ms, strike_window_ms,
//	      then per window: burst, rate, period_seconds, group (1..m),
//	      then per group: 1 if it may be blocked, else 0
//
// Replies: {1, window, remaining, reset_after}   allowed
//
//	{0, window, retry_after, reset_after, blocked_group}   refused
//	{2, group, block_ttl}   refused: the group is blocked
//
// (indexes 1-based, seconds as strings, blocked_group 0 for none).
var allowScript = redis.NewScript(`
redis.replicate_commands()

local n = tonumber(ARGV[1])
local m = tonumber(ARGV[2])
local now
if ARGV[3] == "" then
  -- Seconds since 2017-01-01, as in redis_rate: a float64 keeps them to
  -- the microsecond.
  local t = redis.call("TIME")
  now = (t[1] - 1483228800) + (t[2] / 1000000)
else
  now = tonumber(ARGV[3])
end
local block_after = tonumber(ARGV[4])
local block_for = tonumber(ARGV[5])
local strike_window = tonumber(ARGV[6])
local base = 6

-- 1. A blocked key refuses at once.
local blocked, blocked_ttl = 0, 0
for j = 1, m do
  local ttl = redis.call("PTTL", KEYS[n + m + j])
  if ttl > blocked_ttl then
    blocked, blocked_ttl = j, ttl
  end
end
if blocked > 0 then
  return {2, blocked, tostring(blocked_ttl / 1000)}
end

-- 2. Evaluate every window without writing.
local new_tats, resets, refused = {}, {}, {}
local worst, worst_retry, worst_reset = 0, -1, 0
local best, best_remaining, best_reset = 0, 0, 0
for i = 1, n do
  local o = base + (i - 1) * 4
  local burst = tonumber(ARGV[o + 1])
  local rate = tonumber(ARGV[o + 2])
  local period = tonumber(ARGV[o + 3])
  local emission = period / rate

  local tat = tonumber(redis.call("GET", KEYS[i]))
  if not tat or tat < now then
    tat = now
  end
  local new_tat = tat + emission
  local diff = now - (new_tat - emission * burst)
  local remaining = diff / emission
  if remaining < 0 then
    refused[tonumber(ARGV[o + 4])] = true
    if -diff > worst_retry then
      worst, worst_retry, worst_reset = i, -diff, tat - now
    end
  else
    new_tats[i] = new_tat
    resets[i] = new_tat - now
    if best == 0 or remaining < best_remaining or (remaining == best_remaining and resets[i] > best_reset) then
      best, best_remaining, best_reset = i, remaining, resets[i]
    end
  end
end

-- 3. Refused: a strike against each refusing key; too many block it.
if worst > 0 then
  local blocked_now = 0
  if block_after > 0 then
    for j = 1, m do
      if refused[j] and ARGV[base + 4 * n + j] == "1" then
        local strikes = redis.call("INCR", KEYS[n + j])
        if strikes == 1 then
          redis.call("PEXPIRE", KEYS[n + j], strike_window)
        end
        if strikes > block_after then
          redis.call("SET", KEYS[n + m + j], "1", "PX", block_for)
          redis.call("DEL", KEYS[n + j])
          blocked_now = j
        end
      end
    end
  end
  return {0, worst, tostring(worst_retry), tostring(worst_reset), blocked_now}
end

-- 4. Allowed by every window: consume from all of them.
for i = 1, n do
  redis.call("SET", KEYS[i], tostring(new_tats[i]), "PX", math.max(1, math.ceil(resets[i] * 1000)))
end
return {1, best, tostring(best_remaining), tostring(best_reset)}
`)

// countScript increments a counter that expires a fixed time after its
// first increment.
var countScript = redis.NewScript(`
local n = redis.call("INCR", KEYS[1])
if n == 1 then
  redis.call("PEXPIRE", KEYS[1], ARGV[1])
end
return n
`)

func (l *Limiter) allowRedis(ctx context.Context, groups []group, windows []window) (outcome, error) {
	n, m := len(windows), len(groups)
	keys := make([]string, 0, n+2*m)
	for _, w := range windows {
		keys = append(keys, l.windowKey(groups[w.group], w.limit))
	}
	for _, g := range groups {
		keys = append(keys, l.strikeKey(g))
	}
	for _, g := range groups {
		keys = append(keys, l.blockKey(g))
	}
	now := ""
	if l.fixedClock {
		now = strconv.FormatFloat(epochSeconds(l.clock()), 'f', 6, 64)
	}
	args := make([]any, 0, 6+4*n+m)
	args = append(args, n, m, now, l.blockAfter, l.blockFor.Milliseconds(), l.blockWindow.Milliseconds())
	for _, w := range windows {
		args = append(args, w.limit.Burst, w.limit.Rate, strconv.FormatFloat(w.limit.Period.Seconds(), 'g', -1, 64), w.group+1)
	}
	for _, g := range groups {
		b := "0"
		if g.blockable {
			b = "1"
		}
		args = append(args, b)
	}

	v, err := allowScript.Run(ctx, l.rdb, keys, args...).Slice()
	if err != nil {
		return outcome{}, err
	}
	return parseAllowReply(v, n, m)
}

func parseAllowReply(v []any, n, m int) (outcome, error) {
	bad := func() (outcome, error) { return outcome{}, fmt.Errorf("unexpected rate limit script reply %v", v) }
	if len(v) < 3 {
		return bad()
	}
	kind, ok1 := v[0].(int64)
	idx, ok2 := v[1].(int64)
	if !ok1 || !ok2 {
		return bad()
	}
	floats := make([]float64, 0, 2)
	for _, x := range v[2:] {
		s, ok := x.(string)
		if !ok {
			continue
		}
		f, err := strconv.ParseFloat(s, 64)
		if err != nil {
			return bad()
		}
		floats = append(floats, f)
	}
	switch {
	case kind == 2 && idx >= 1 && int(idx) <= m && len(floats) == 1:
		return outcome{kind: outcomeBlocked, group: int(idx) - 1, retry: floats[0], reset: floats[0]}, nil
	case kind == 1 && idx >= 1 && int(idx) <= n && len(floats) == 2:
		return outcome{kind: outcomeAllowed, window: int(idx) - 1, remaining: floats[0], reset: floats[1]}, nil
	case kind == 0 && idx >= 1 && int(idx) <= n && len(floats) == 2 && len(v) == 5:
		blockedNow, ok := v[4].(int64)
		if !ok || blockedNow < 0 || int(blockedNow) > m {
			return bad()
		}
		return outcome{kind: outcomeRefused, window: int(idx) - 1, retry: floats[0], reset: floats[1], blockedNow: int(blockedNow)}, nil
	}
	return bad()
}

// CountRepeat records that a session sent a text and returns how many
// times the session sent the same text within window of its first time
// (this one included). The caller normalizes the text; the key holds only
// hashes. It shares the Limiter's Redis and outage handling, so repeats
// are counted across instances; it implements RepeatCounter.
func (l *Limiter) CountRepeat(ctx context.Context, sessionID, text string, window time.Duration) (int, error) {
	if sessionID == "" {
		return 0, errors.New("repeat counter: empty session id")
	}
	if window < time.Millisecond {
		return 0, errors.New("repeat counter: window must be at least 1ms")
	}
	key := l.prefix + ":repeat:" + l.hashID(sessionID) + ":" + l.hashID(text)
	var n int
	err := l.withBackend(ctx, func(ctx context.Context) error {
		v, err := countScript.Run(ctx, l.rdb, []string{key}, window.Milliseconds()).Int()
		n = v
		return err
	}, func() {
		n = l.mem.count(key, epochSeconds(l.clock()), window)
	})
	return n, err
}

// RedisOptions parses a redis:// or rediss:// URL (as redis.ParseURL does,
// query options included) into client options suited to rate limiting:
// the client honours context deadlines (ContextTimeoutEnabled), so that
// the limiter's short per-call timeout bounds every call, and the dial,
// read and write timeouts are 1s unless the URL sets them, so that an
// unreachable Redis is noticed quickly.
func RedisOptions(rawURL string) (*redis.Options, error) {
	if err := checkRedisScheme(rawURL); err != nil {
		return nil, err
	}
	opt, err := redis.ParseURL(rawURL)
	if err != nil {
		var ue *url.Error
		if errors.As(err, &ue) {
			err = ue.Err // without the URL, which may hold a password
		}
		// go-redis prefixes its own errors with "redis: "; callers name
		// the option already.
		return nil, errors.New(strings.TrimPrefix(err.Error(), "redis: "))
	}
	u, err := url.Parse(rawURL)
	if err != nil {
		return nil, errors.New("invalid URL")
	}
	q := u.Query()
	opt.ContextTimeoutEnabled = true
	if !q.Has("dial_timeout") {
		opt.DialTimeout = time.Second
	}
	if !q.Has("read_timeout") {
		opt.ReadTimeout = time.Second
	}
	if !q.Has("write_timeout") {
		opt.WriteTimeout = time.Second
	}
	// A Redis that refuses connections must cost a request (and /health)
	// little: go-redis would otherwise retry each command 3 times and each
	// dial 5 times. The limiter falls back to in-process state instead.
	if !q.Has("max_retries") {
		opt.MaxRetries = 1
	}
	opt.DialerRetries = 1
	return opt, nil
}

// checkRedisScheme refuses a value that is not a redis://, rediss:// (or
// unix://) URL, saying what to write instead. A password in the value is
// shown as "****". Other mistakes are left to redis.ParseURL.
func checkRedisScheme(raw string) error {
	scheme, _, hasScheme := strings.Cut(raw, "://")
	if hasScheme && (scheme == "redis" || scheme == "rediss" || scheme == "unix") {
		return nil
	}
	shown := raw
	if at := strings.LastIndex(raw, "@"); at >= 0 {
		prefix := ""
		if hasScheme {
			prefix = scheme + "://"
		}
		shown = prefix + "****" + raw[at:]
	}
	if hasScheme {
		return fmt.Errorf("%q is not a redis:// or rediss:// URL", shown)
	}
	return fmt.Errorf("%q is not a redis:// or rediss:// URL; write redis://%s", shown, shown)
}
