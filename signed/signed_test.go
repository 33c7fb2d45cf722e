package signed

import (
	"context"
	"crypto/rand"
	"encoding/hex"
	"errors"
	"net/http"
	"os/exec"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/redis/go-redis/v9"

	"github.com/chatproxy/caddy-chatproxy/internal/testenv"
)

var (
	secret = []byte("0123456789abcdef0123456789abcdef-push")
	other  = []byte("0123456789abcdef0123456789abcdef-other")
	clock  = time.Date(2026, 12, 7, 3, 0, 0, 0, time.UTC)
)

func headers(ts, sig string) http.Header {
	h := http.Header{}
	if ts != "" {
		h.Set(HeaderTimestamp, ts)
	}
	if sig != "" {
		h.Set(HeaderSignature, sig)
	}
	return h
}

func signedAt(key, body []byte, at time.Time) http.Header {
	return headers(Sign(key, body, at))
}

// TestVerifyMatrix: every way a request can be signed wrongly is refused
// with its own reason, and a good one is accepted.
func TestVerifyMatrix(t *testing.T) {
	body := []byte(`{"content":"hello","role":"agent"}`)
	goodTS, goodSig := Sign(secret, body, clock)
	tests := []struct {
		name string
		h    http.Header
		body []byte
		want error
	}{
		{"good", signedAt(secret, body, clock), body, nil},
		{"good at the window's past edge", signedAt(secret, body, clock.Add(-DefaultWindow)), body, nil},
		{"good at the window's future edge", signedAt(secret, body, clock.Add(DefaultWindow)), body, nil},
		{"wrong secret", signedAt(other, body, clock), body, ErrBadSignature},
		{"tampered body", signedAt(secret, body, clock), []byte(`{"content":"hellO","role":"agent"}`), ErrBadSignature},
		{"empty body signed, body sent", signedAt(secret, nil, clock), body, ErrBadSignature},
		{"timestamp changed after signing", headers(strconv.FormatInt(clock.Unix()+1, 10), goodSig), body, ErrBadSignature},
		{"stale", signedAt(secret, body, clock.Add(-DefaultWindow-time.Second)), body, ErrStale},
		{"far past", signedAt(secret, body, time.Unix(0, 0)), body, ErrStale},
		{"future", signedAt(secret, body, clock.Add(DefaultWindow+time.Second)), body, ErrStale},
		{"huge timestamp", headers("999999999999", goodSig), body, ErrStale},
		{"no headers", headers("", ""), body, ErrMissing},
		{"no signature", headers(goodTS, ""), body, ErrMissing},
		{"no timestamp", headers("", goodSig), body, ErrMissing},
		{"negative timestamp", headers("-"+goodTS, goodSig), body, ErrMalformed},
		{"plus timestamp", headers("+"+goodTS, goodSig), body, ErrMalformed},
		{"timestamp in milliseconds too long", headers(goodTS+"000000", goodSig), body, ErrMalformed},
		{"fractional timestamp", headers(goodTS+".5", goodSig), body, ErrMalformed},
		{"date timestamp", headers(clock.Format(time.RFC3339), goodSig), body, ErrMalformed},
		{"no sha256= prefix", headers(goodTS, strings.TrimPrefix(goodSig, "sha256=")), body, ErrMalformed},
		{"sha1 prefix", headers(goodTS, "sha1="+strings.TrimPrefix(goodSig, "sha256=")), body, ErrMalformed},
		{"short mac", headers(goodTS, goodSig[:len(goodSig)-2]), body, ErrMalformed},
		{"non-hex mac", headers(goodTS, goodSig[:len(goodSig)-1]+"z"), body, ErrMalformed},
		{"base64 mac", headers(goodTS, "sha256=q83vEjRWeJCrze8SNFZ4kKvN7xI0VniQq83vEjRWeJA="), body, ErrMalformed},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			v := &Verifier{Secret: secret, Replay: NewMemoryReplay(0, func() time.Time { return clock }), Now: func() time.Time { return clock }}
			err := v.Verify(context.Background(), tt.h, tt.body)
			if !errors.Is(err, tt.want) || (tt.want == nil) != (err == nil) {
				t.Fatalf("Verify = %v, want %v", err, tt.want)
			}
		})
	}
}

// TestVerifyUppercaseHex: the MAC's hex digits may be upper case (some
// tools print them so), and a replay in the other case is still a replay.
func TestVerifyUppercaseHex(t *testing.T) {
	body := []byte("x")
	ts, sig := Sign(secret, body, clock)
	upper := "sha256=" + strings.ToUpper(strings.TrimPrefix(sig, "sha256="))
	v := &Verifier{Secret: secret, Replay: NewMemoryReplay(0, nil), Now: func() time.Time { return clock }}
	if err := v.Verify(context.Background(), headers(ts, upper), body); err != nil {
		t.Fatalf("upper case: %v", err)
	}
	if err := v.Verify(context.Background(), headers(ts, sig), body); !errors.Is(err, ErrReplayed) {
		t.Fatalf("lower case after upper case = %v, want ErrReplayed", err)
	}
}

// TestReplayRefusedSameInstance: one signature is accepted once; a new
// signature of the same body (another second) is accepted.
func TestReplayRefusedSameInstance(t *testing.T) {
	now := clock
	v := &Verifier{Secret: secret, Replay: NewMemoryReplay(0, func() time.Time { return now }), Now: func() time.Time { return now }}
	body := []byte(`{"content":"once"}`)
	h := signedAt(secret, body, now)
	if err := v.Verify(context.Background(), h, body); err != nil {
		t.Fatalf("first: %v", err)
	}
	if err := v.Verify(context.Background(), h, body); !errors.Is(err, ErrReplayed) {
		t.Fatalf("replay = %v, want ErrReplayed", err)
	}
	now = now.Add(DefaultWindow - time.Second)
	if err := v.Verify(context.Background(), h, body); !errors.Is(err, ErrReplayed) {
		t.Fatalf("replay near the window's end = %v, want ErrReplayed", err)
	}
	now = now.Add(2 * time.Second)
	if err := v.Verify(context.Background(), h, body); !errors.Is(err, ErrStale) {
		t.Fatalf("replay after the window = %v, want ErrStale", err)
	}
	if err := v.Verify(context.Background(), signedAt(secret, body, now), body); err != nil {
		t.Fatalf("same body, new signature: %v", err)
	}
}

// TestBadSignatureNotRemembered: a refused request leaves nothing in the
// replay store, so forged requests cannot fill it.
func TestBadSignatureNotRemembered(t *testing.T) {
	m := NewMemoryReplay(0, nil)
	v := &Verifier{Secret: secret, Replay: m, Now: func() time.Time { return clock }}
	body := []byte("b")
	for _, h := range []http.Header{signedAt(other, body, clock), signedAt(secret, body, clock.Add(-time.Hour)), headers("x", "y")} {
		if err := v.Verify(context.Background(), h, body); err == nil {
			t.Fatal("accepted a bad request")
		}
	}
	if m.Len() != 0 {
		t.Fatalf("replay cache holds %d entries after refused requests", m.Len())
	}
}

// TestMemoryReplayBounded: a full cache drops expired entries, and refuses
// (rather than forgets) when none has expired.
func TestMemoryReplayBounded(t *testing.T) {
	now := clock
	m := NewMemoryReplay(2, func() time.Time { return now })
	ctx := context.Background()
	for _, k := range []string{"a", "b"} {
		if ok, err := m.First(ctx, k, time.Minute); !ok || err != nil {
			t.Fatalf("First(%s) = %v, %v", k, ok, err)
		}
	}
	if _, err := m.First(ctx, "c", time.Minute); !errors.Is(err, ErrCacheFull) {
		t.Fatalf("full cache: err = %v, want ErrCacheFull", err)
	}
	if ok, _ := m.First(ctx, "a", time.Minute); ok {
		t.Fatal("full cache forgot a live entry")
	}
	now = now.Add(time.Minute)
	if ok, err := m.First(ctx, "c", time.Minute); !ok || err != nil {
		t.Fatalf("after expiry: First(c) = %v, %v", ok, err)
	}
	if m.Len() != 1 {
		t.Fatalf("Len = %d after expired entries were dropped, want 1", m.Len())
	}
}

func testRedis(t *testing.T) (*redis.Client, string) {
	t.Helper()
	opt, err := redis.ParseURL(testenv.RedisURL(t))
	if err != nil {
		t.Fatal(err)
	}
	b := make([]byte, 6)
	_, _ = rand.Read(b)
	prefix := "chatproxy-test-" + hex.EncodeToString(b) + ":sig"
	rdb := redis.NewClient(opt)
	t.Cleanup(func() {
		ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
		defer cancel()
		keys, _ := rdb.Keys(ctx, prefix+":*").Result()
		if len(keys) > 0 {
			rdb.Del(ctx, keys...)
		}
		_ = rdb.Close()
	})
	return rdb, prefix
}

// TestReplayRefusedAcrossInstances: two verifiers, each with its own Redis
// client as two Caddy instances would have, accept a signature once
// between them, even when both try at the same moment; the key expires
// with the window.
func TestReplayRefusedAcrossInstances(t *testing.T) {
	rdb, prefix := testRedis(t)
	rdb2, _ := testRedis(t)
	now := time.Now()
	a := &Verifier{Secret: secret, Replay: NewRedisReplay(rdb, prefix, 5*time.Second), Now: func() time.Time { return now }}
	b := &Verifier{Secret: secret, Replay: NewRedisReplay(rdb2, prefix, 5*time.Second), Now: func() time.Time { return now }}
	body := []byte(`{"content":"across"}`)
	h := signedAt(secret, body, now)
	if err := a.Verify(context.Background(), h, body); err != nil {
		t.Fatalf("instance A: %v", err)
	}
	if err := b.Verify(context.Background(), h, body); !errors.Is(err, ErrReplayed) {
		t.Fatalf("instance B replay = %v, want ErrReplayed", err)
	}
	ttl, err := rdb.TTL(context.Background(), prefix+":"+hex.EncodeToString(MAC(secret, now.Unix(), body))).Result()
	if err != nil || ttl <= 0 || ttl > DefaultWindow+2*time.Second {
		t.Fatalf("key TTL = %v, %v; want within the window", ttl, err)
	}

	// Racing: of 8 concurrent attempts on two instances, exactly one wins.
	h2 := signedAt(secret, []byte("race"), now)
	var wg sync.WaitGroup
	var mu sync.Mutex
	accepted := 0
	for i := range 8 {
		v := a
		if i%2 == 1 {
			v = b
		}
		wg.Add(1)
		go func() {
			defer wg.Done()
			if err := v.Verify(context.Background(), h2, []byte("race")); err == nil {
				mu.Lock()
				accepted++
				mu.Unlock()
			} else if !errors.Is(err, ErrReplayed) {
				t.Errorf("race: %v", err)
			}
		}()
	}
	wg.Wait()
	if accepted != 1 {
		t.Fatalf("racing replays: %d accepted, want 1", accepted)
	}
}

// TestForget: a signature given up after a failed request is accepted
// once more, in memory and across instances through Redis; one never
// accepted is not remembered by forgetting it.
func TestForget(t *testing.T) {
	rdb, prefix := testRedis(t)
	rdb2, _ := testRedis(t)
	now := time.Now()
	for _, tc := range []struct {
		name       string
		first, two ReplayGuard
	}{
		{"memory", NewMemoryReplay(0, nil), nil},
		{"redis", NewRedisReplay(rdb, prefix, 5*time.Second), NewRedisReplay(rdb2, prefix, 5*time.Second)},
	} {
		t.Run(tc.name, func(t *testing.T) {
			a := &Verifier{Secret: secret, Replay: tc.first, Now: func() time.Time { return now }}
			b := a
			if tc.two != nil {
				b = &Verifier{Secret: secret, Replay: tc.two, Now: func() time.Time { return now }}
			}
			body := []byte(`{"content":"retried ` + tc.name + `"}`)
			h := signedAt(secret, body, now)
			ctx := context.Background()
			if err := a.Verify(ctx, h, body); err != nil {
				t.Fatalf("first: %v", err)
			}
			if err := a.Forget(ctx, h); err != nil {
				t.Fatalf("Forget: %v", err)
			}
			if err := b.Verify(ctx, h, body); err != nil {
				t.Fatalf("after Forget: %v", err)
			}
			if err := a.Verify(ctx, h, body); !errors.Is(err, ErrReplayed) {
				t.Fatalf("replay after the retry = %v, want ErrReplayed", err)
			}
			if err := a.Forget(ctx, headers("x", "y")); !errors.Is(err, ErrMalformed) {
				t.Fatalf("Forget of malformed headers = %v", err)
			}
		})
	}
}

// TestRedisDownIsUnavailable: a Redis that does not answer makes Verify
// fail with ErrUnavailable (503), never accept unchecked.
func TestRedisDownIsUnavailable(t *testing.T) {
	rdb := redis.NewClient(&redis.Options{Addr: "127.0.0.1:1", MaxRetries: -1, DialTimeout: time.Second})
	defer rdb.Close()
	v := &Verifier{Secret: secret, Replay: NewRedisReplay(rdb, "x", time.Second), Now: func() time.Time { return clock }}
	err := v.Verify(context.Background(), signedAt(secret, nil, clock), nil)
	if !errors.Is(err, ErrUnavailable) {
		t.Fatalf("Verify with Redis down = %v, want ErrUnavailable", err)
	}
}

// TestOpenSSLRecipe: the shell recipe in the docs computes the same
// signature as Sign.
func TestOpenSSLRecipe(t *testing.T) {
	if _, err := exec.LookPath("openssl"); err != nil {
		t.Skip("openssl not installed")
	}
	body := `{"content":"Hi, I'm Ana from support","role":"agent"}`
	ts, sig := Sign(secret, []byte(body), clock)
	cmd := exec.Command("sh", "-c", `printf '%s.%s' "$ts" "$body" | openssl dgst -sha256 -hmac "$secret" -hex | sed 's/^.* //'`)
	cmd.Env = append(cmd.Environ(), "ts="+ts, "body="+body, "secret="+string(secret))
	out, err := cmd.Output()
	if err != nil {
		t.Fatal(err)
	}
	if got := "sha256=" + strings.TrimSpace(string(out)); got != sig {
		t.Fatalf("openssl recipe = %s, Sign = %s", got, sig)
	}
}

// FuzzParseHeaders: the parser never panics, and whatever it accepts is
// a timestamp of digits and a 32-byte MAC that formats back to the input.
func FuzzParseHeaders(f *testing.F) {
	ts, sig := Sign(secret, []byte("x"), clock)
	f.Add(ts, sig)
	f.Add("", "")
	f.Add("-1", "sha256=")
	f.Add(" 1700000000 ", " sha256="+strings.Repeat("A", 64)+" ")
	f.Add("99999999999999999999", sig)
	f.Fuzz(func(t *testing.T, ts, sig string) {
		n, mac, err := ParseHeaders(ts, sig)
		if err != nil {
			if !errors.Is(err, ErrMissing) && !errors.Is(err, ErrMalformed) {
				t.Fatalf("unexpected error kind: %v", err)
			}
			return
		}
		if len(mac) != 32 || n < 0 {
			t.Fatalf("accepted %q %q as %d, %x", ts, sig, n, mac)
		}
		if got := strconv.FormatInt(n, 10); strings.TrimLeft(strings.TrimSpace(ts), "0") != strings.TrimLeft(got, "0") {
			t.Fatalf("timestamp %q parsed as %d", ts, n)
		}
		if !strings.EqualFold(strings.TrimSpace(sig), "sha256="+hex.EncodeToString(mac)) {
			t.Fatalf("signature %q parsed as %x", sig, mac)
		}
	})
}
