package chatproxy

import (
	"crypto/hmac"
	"crypto/sha256"
	"encoding/hex"
	"fmt"
	"net/netip"
	"strings"

	"github.com/caddyserver/caddy/v2"
	"github.com/jackc/pgx/v5/pgxpool"
	"github.com/redis/go-redis/v9"
	"go.uber.org/zap"

	"github.com/chatproxy/caddy-chatproxy/metrics"
	"github.com/chatproxy/caddy-chatproxy/sessions"
)

// defaultMetricsAllow returns the networks that may read /metrics when
// metrics_allow is not set: loopback and private ranges.
func defaultMetricsAllow() []string {
	return []string{"127.0.0.0/8", "::1/128", "10.0.0.0/8", "172.16.0.0/12", "192.168.0.0/16", "fc00::/7"}
}

// parseMetricsAllow parses metrics_allow entries: CIDRs, or single
// addresses (a /32 or /128).
func parseMetricsAllow(entries []string) ([]netip.Prefix, error) {
	if len(entries) == 0 {
		entries = defaultMetricsAllow()
	}
	out := make([]netip.Prefix, 0, len(entries))
	for _, e := range entries {
		p, err := parseNetwork(e)
		if err != nil {
			return nil, fmt.Errorf("metrics_allow: invalid network %q (use a CIDR such as 10.0.0.0/8, or an IP address)", e)
		}
		out = append(out, p)
	}
	return out, nil
}

func parseNetwork(s string) (netip.Prefix, error) {
	if strings.Contains(s, "/") {
		p, err := netip.ParsePrefix(s)
		if err != nil {
			return netip.Prefix{}, err
		}
		return p.Masked(), nil
	}
	a, err := netip.ParseAddr(s)
	if err != nil || a.Zone() != "" {
		return netip.Prefix{}, fmt.Errorf("not an address")
	}
	return netip.PrefixFrom(a, a.BitLen()), nil
}

// upstreamLabel names this handler's n8n upstream in metric labels:
// "n8n-" and 8 hex digits of an HMAC of the webhook URL, keyed from
// jwt_secret. It is stable across reloads and instances sharing the
// secret, and reveals nothing of the URL, whose path is a secret.
func (cp *ChatProxy) upstreamLabel() string {
	mac := hmac.New(sha256.New, deriveKey(cp.jwtSecret, "chatproxy metrics upstream label"))
	mac.Write([]byte(cp.webhook.String()))
	return "n8n-" + hex.EncodeToString(mac.Sum(nil))[:8]
}

// poolLabel names a shared pool in metric labels from its pool key
// ("postgres:<sha256 hex>"): its kind and 8 hex digits of the hash, which
// reveal nothing of the URL or its password.
func poolLabel(key string) string {
	kind, sum, _ := strings.Cut(key, ":")
	return kind + "-" + sum[:min(8, len(sum))]
}

// provisionMetrics registers the module's collectors into the config's
// registry (they then show on Caddy's admin /metrics), reports the pools
// this handler uses, and builds its recorder.
func (cp *ChatProxy) provisionMetrics(ctx caddy.Context, store sessions.Store, rdb *redis.Client) (*metrics.Recorder, error) {
	if err := metrics.Register(ctx.GetMetricsRegistry()); err != nil {
		return nil, fmt.Errorf("registering metrics: %w", err)
	}
	if pg, ok := store.(interface{ Pool() *pgxpool.Pool }); ok {
		cp.untrackPools = append(cp.untrackPools, metrics.TrackDBPool(poolLabel(cp.storeKey), pg.Pool()))
	}
	if rdb != nil {
		cp.untrackPools = append(cp.untrackPools, metrics.TrackRedisPool(poolLabel(cp.redisKey), rdb))
	}
	upstream := cp.upstreamLabel()
	cp.logger.Debug("metrics labels", zap.String("upstream", upstream), zap.Strings("sites", cp.AllowedOrigins))
	return metrics.NewRecorder(upstream, cp.AllowedOrigins), nil
}

// cleanupMetrics stops reporting this handler's pools (a pool shared with
// a handler still loaded stays reported).
func (cp *ChatProxy) cleanupMetrics() {
	for _, untrack := range cp.untrackPools {
		untrack()
	}
	cp.untrackPools = nil
}
