// Package guard decides whether a request may go on: origin and CSRF
// checks, and (as they are added) rate limits, input validation and bot
// scoring.
package guard

import (
	"fmt"
	"net"
	"net/netip"
	"net/url"
	"strconv"
	"strings"
)

// Origins is a parsed allowed_origins list. Entries are exact origins
// (scheme://host[:port]) or wildcard origins (scheme://*.domain[:port]) that
// cover subdomains only, never the domain itself.
type Origins struct {
	exact     map[string]bool
	wildcards []wildcardOrigin
}

type wildcardOrigin struct {
	scheme string
	suffix string // ".example.com"
	port   string // normalized, "" for the scheme's default
}

// ParseOrigins parses allowed_origins entries. It refuses anything that is
// not a bare http(s) origin, "*" and "null".
func ParseOrigins(entries []string) (*Origins, error) {
	o := &Origins{exact: make(map[string]bool)}
	for _, e := range entries {
		scheme, host, port, err := splitOrigin(e)
		if err != nil {
			return nil, fmt.Errorf("allowed origin %q: %w", e, err)
		}
		if rest, ok := strings.CutPrefix(host, "*."); ok {
			if rest == "" || strings.Contains(rest, "*") || !strings.Contains(rest, ".") && rest != "localhost" {
				return nil, fmt.Errorf("allowed origin %q: a wildcard must be *.<domain>", e)
			}
			o.wildcards = append(o.wildcards, wildcardOrigin{scheme: scheme, suffix: "." + rest, port: port})
			continue
		}
		if strings.Contains(host, "*") {
			return nil, fmt.Errorf("allowed origin %q: a wildcard must be the leftmost label, as in https://*.example.com", e)
		}
		o.exact[joinOrigin(scheme, host, port)] = true
	}
	return o, nil
}

// Allowed reports whether the Origin header value is allowed. "null",
// look-alikes (other scheme or port, prefixes, suffixes) and malformed
// values are not.
func (o *Origins) Allowed(origin string) bool {
	if o == nil {
		return false
	}
	scheme, host, port, err := splitOrigin(origin)
	if err != nil || strings.Contains(host, "*") {
		return false
	}
	if o.exact[joinOrigin(scheme, host, port)] {
		return true
	}
	for _, w := range o.wildcards {
		if w.scheme == scheme && w.port == port &&
			len(host) > len(w.suffix) && strings.HasSuffix(host, w.suffix) {
			return true
		}
	}
	return false
}

// Empty reports whether no origin is configured.
func (o *Origins) Empty() bool {
	return o == nil || len(o.exact) == 0 && len(o.wildcards) == 0
}

// SameOrigin reports whether origin is the request's own origin: the
// scheme the request came in with and its Host (host[:port]), compared
// as origins are (case, default ports). A page served by the same site
// sends exactly that; other ports, schemes and malformed values do not
// match.
func SameOrigin(origin, scheme, host string) bool {
	if host == "" {
		return false
	}
	s1, h1, p1, err := splitOrigin(origin)
	if err != nil || strings.Contains(h1, "*") {
		return false
	}
	s2, h2, p2, err := splitOrigin(scheme + "://" + host)
	if err != nil {
		return false
	}
	return s1 == s2 && h1 == h2 && p1 == p2
}

// OriginHost returns the host[:port] of a well-formed origin, lowercased,
// IPv6 in brackets and without the scheme's default port: the "site" a
// session belongs to, spelled as in a Host header.
func OriginHost(origin string) (string, bool) {
	_, host, port, err := splitOrigin(origin)
	if err != nil {
		return "", false
	}
	switch {
	case port != "":
		return net.JoinHostPort(host, port), true
	case strings.Contains(host, ":"): // IPv6 keeps its brackets, as in a Host header
		return "[" + host + "]", true
	}
	return host, true
}

// splitOrigin parses scheme://host[:port] strictly: no user info, path,
// query or fragment; the scheme's default port is dropped.
func splitOrigin(s string) (scheme, host, port string, err error) {
	if s == "" || s == "null" || s == "*" {
		return "", "", "", fmt.Errorf("not an origin")
	}
	u, err := url.Parse(s)
	if err != nil {
		return "", "", "", fmt.Errorf("not an origin")
	}
	scheme = strings.ToLower(u.Scheme)
	if scheme != "http" && scheme != "https" {
		return "", "", "", fmt.Errorf("scheme must be http or https")
	}
	// url.Parse drops an empty fragment ("https://a.com#"), so look for it.
	if u.User != nil || u.Opaque != "" || (u.Path != "" && u.Path != "/") || u.RawQuery != "" || u.Fragment != "" || u.ForceQuery || strings.Contains(s, "#") {
		return "", "", "", fmt.Errorf("an origin has no user, path, query or fragment")
	}
	host, ok := canonicalHost(u)
	if !ok {
		return "", "", "", fmt.Errorf("missing or malformed host")
	}
	port = u.Port()
	if port == "" && strings.HasSuffix(u.Host, ":") {
		return "", "", "", fmt.Errorf("empty port")
	}
	if n, err := strconv.Atoi(port); port != "" && (err != nil || n < 1 || n > 65535 || strconv.Itoa(n) != port) {
		return "", "", "", fmt.Errorf("bad port %q", port)
	}
	if (scheme == "http" && port == "80") || (scheme == "https" && port == "443") {
		port = ""
	}
	return scheme, host, port, nil
}

// canonicalHost returns the lowercased host of u, or false unless it is an
// IPv6 literal without a zone (returned in canonical form, unbracketed) or
// an ASCII domain name or IPv4 address made of non-empty labels. Browsers
// send such hosts only (IDNs as punycode); anything else is refused rather
// than matched loosely, since "..example.com" would otherwise end with
// ".example.com". "*" may appear in a label; callers decide where it may.
func canonicalHost(u *url.URL) (string, bool) {
	host := strings.ToLower(u.Hostname())
	if strings.HasPrefix(u.Host, "[") {
		a, err := netip.ParseAddr(host)
		if err != nil || !a.Is6() || a.Zone() != "" {
			return "", false
		}
		return a.String(), true
	}
	if host == "" || len(host) > 253 {
		return "", false
	}
	for label := range strings.SplitSeq(host, ".") {
		if label == "" || len(label) > 63 {
			return "", false
		}
		for _, c := range label {
			if !('a' <= c && c <= 'z' || '0' <= c && c <= '9' || c == '-' || c == '_' || c == '*') {
				return "", false
			}
		}
	}
	return host, true
}

func joinOrigin(scheme, host, port string) string {
	if port != "" {
		host = net.JoinHostPort(host, port)
	} else if strings.Contains(host, ":") {
		host = "[" + host + "]"
	}
	return scheme + "://" + host
}

// CookieRequestAllowed is the CSRF rule for cookie-authenticated requests: a
// browser must show where the request comes from, either an allowed Origin
// or, without an Origin, Sec-Fetch-Site: same-origin. Anything else (a
// cross-site or same-site fetch, or no evidence at all) is refused. Clients
// that are not browsers authenticate with the bearer token instead.
func (o *Origins) CookieRequestAllowed(origin, secFetchSite string) bool {
	if origin != "" {
		return o.Allowed(origin)
	}
	return secFetchSite == "same-origin"
}
