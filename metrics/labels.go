package metrics

import (
	"crypto/hmac"
	"crypto/sha256"
	"encoding/hex"
	"fmt"
	"net/netip"
	"strings"
)

// UpstreamLabel names an n8n upstream in metric labels: "n8n-" and 8 hex
// digits of an HMAC of the webhook URL, keyed from the handler's
// jwt_secret. It is stable across reloads and instances sharing the
// secret, and reveals nothing of the URL, whose path is a secret.
func UpstreamLabel(secret []byte, webhookURL string) string {
	key := hmac.New(sha256.New, secret)
	key.Write([]byte("chatproxy metrics upstream label"))
	mac := hmac.New(sha256.New, key.Sum(nil))
	mac.Write([]byte(webhookURL))
	return "n8n-" + hex.EncodeToString(mac.Sum(nil))[:8]
}

// PoolLabel names a shared pool in metric labels from its pool key
// ("postgres:<sha256 hex>"): its kind and 8 hex digits of the hash, which
// reveal nothing of the URL or its password.
func PoolLabel(key string) string {
	kind, sum, _ := strings.Cut(key, ":")
	return kind + "-" + sum[:min(8, len(sum))]
}

// DefaultAllow returns the networks that may read /metrics when
// metrics_allow is not set: loopback and private ranges.
func DefaultAllow() []string {
	return []string{"127.0.0.0/8", "::1/128", "10.0.0.0/8", "172.16.0.0/12", "192.168.0.0/16", "fc00::/7"}
}

// ParseAllow parses metrics_allow entries: CIDRs, or single addresses (a
// /32 or /128). No entries means DefaultAllow.
func ParseAllow(entries []string) ([]netip.Prefix, error) {
	if len(entries) == 0 {
		entries = DefaultAllow()
	}
	out := make([]netip.Prefix, 0, len(entries))
	for _, e := range entries {
		p, err := ParseNetwork(e)
		if err != nil {
			return nil, err
		}
		out = append(out, p)
	}
	return out, nil
}

// ParseNetwork parses one metrics_allow entry: a CIDR such as 10.0.0.0/8
// or an IP address.
func ParseNetwork(s string) (netip.Prefix, error) {
	bad := fmt.Errorf("invalid network %q (use a CIDR such as 10.0.0.0/8, or an IP address)", s)
	if strings.Contains(s, "/") {
		p, err := netip.ParsePrefix(s)
		if err != nil {
			return netip.Prefix{}, bad
		}
		return p.Masked(), nil
	}
	a, err := netip.ParseAddr(s)
	if err != nil || a.Zone() != "" {
		return netip.Prefix{}, bad
	}
	return netip.PrefixFrom(a, a.BitLen()), nil
}
