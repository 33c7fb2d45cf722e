package guard

import (
	"strings"
	"testing"
)

func mustParseOrigins(t *testing.T, entries ...string) *Origins {
	t.Helper()
	o, err := ParseOrigins(entries)
	if err != nil {
		t.Fatalf("ParseOrigins(%q): %v", entries, err)
	}
	return o
}

func TestParseOriginsAccepts(t *testing.T) {
	for _, e := range []string{
		"https://example.com",
		"http://example.com",
		"https://example.com:8443",
		"https://example.com:443",
		"https://example.com/", // the empty path, as often pasted from a browser
		"HTTPS://Example.COM",
		"https://*.example.com",
		"https://*.example.com:8443",
		"http://*.localhost",
		"http://localhost:3000",
		"http://127.0.0.1:8080",
		"http://[::1]",
		"http://[::1]:8080",
		"https://[2001:db8::1]:443",
		"https://my_host.example.com",
		"https://xn--bcher-kva.example",
	} {
		if _, err := ParseOrigins([]string{e}); err != nil {
			t.Errorf("ParseOrigins(%q) = %v, want ok", e, err)
		}
	}
	if o, err := ParseOrigins(nil); err != nil || o == nil {
		t.Errorf("ParseOrigins(nil) = %v, %v; want an empty list", o, err)
	}
}

func TestParseOriginsRefuses(t *testing.T) {
	for _, tc := range []struct {
		entry string
		want  string // substring of the error
	}{
		{"", "not an origin"},
		{"null", "not an origin"},
		{"*", "not an origin"},
		{"example.com", "scheme must be http or https"},
		{"//example.com", "scheme must be http or https"},
		{"ftp://example.com", "scheme must be http or https"},
		{"ws://example.com", "scheme must be http or https"},
		{"file:///etc/passwd", "scheme must be http or https"},
		{"https:example.com", "no user, path, query or fragment"},
		{"https://example.com/app", "no user, path, query or fragment"},
		{"https://example.com/app/", "no user, path, query or fragment"},
		{"https://example.com?x=1", "no user, path, query or fragment"},
		{"https://example.com?", "no user, path, query or fragment"},
		{"https://example.com#top", "no user, path, query or fragment"},
		{"https://example.com#", "no user, path, query or fragment"},
		{"https://user@example.com", "no user, path, query or fragment"},
		{"https://user:pass@example.com", "no user, path, query or fragment"},
		{"https://", "malformed host"},
		{"https://:443", "malformed host"},
		{"https:///example.com", "no user, path, query or fragment"},
		{"https://example.com.", "malformed host"},
		{"https://..example.com", "malformed host"},
		{"https://a..example.com", "malformed host"},
		{"https://.example.com", "malformed host"},
		{"https://a!b.example.com", "malformed host"},
		{"https://bücher.example", "malformed host"},
		{"https://[1.2.3.4]", "not an origin"},
		{"https://[fe80::1%25en0]", "malformed host"},
		{"https://[::1", "not an origin"},
		{"https://example.com:", "empty port"},
		{"https://example.com:0", "bad port"},
		{"https://example.com:0443", "bad port"},
		{"https://example.com:65536", "bad port"},
		{"https://example.com:99999", "bad port"},
		{"https://example.com:x", "not an origin"},
		{"https://*", "wildcard must be"},
		{"https://*.", "malformed host"},
		{"https://*.com", "wildcard must be *.<domain>"},
		{"https://*.*.example.com", "wildcard must be *.<domain>"},
		{"https://a.*.example.com", "wildcard must be the leftmost label"},
		{"https://*example.com", "wildcard must be the leftmost label"},
		{"https://a*.example.com", "wildcard must be the leftmost label"},
	} {
		// A bad entry is refused wherever it is in the list.
		_, err := ParseOrigins([]string{"https://ok.example.com", tc.entry})
		if err == nil {
			t.Errorf("ParseOrigins(%q) = nil error, want %q", tc.entry, tc.want)
			continue
		}
		if !strings.Contains(err.Error(), tc.want) {
			t.Errorf("ParseOrigins(%q) = %q, want it to contain %q", tc.entry, err, tc.want)
		}
		if !strings.HasPrefix(err.Error(), "allowed origin ") {
			t.Errorf("ParseOrigins(%q) = %q, want it to name the entry", tc.entry, err)
		}
	}
}

func TestParseOriginsDoesNotEchoPassword(t *testing.T) {
	// The entry is quoted so the operator can find it; that is fine for an
	// origin. What must not happen is a crash or an accepted user info.
	_, err := ParseOrigins([]string{"https://u:s3cret@example.com"})
	if err == nil {
		t.Fatal("origin with user info accepted")
	}
}

func TestAllowed(t *testing.T) {
	o := mustParseOrigins(t,
		"https://shop.example.org",
		"https://api.example.org:8443",
		"http://localhost:3000",
		"https://*.example.com",
		"http://*.dev.test:8080",
		"http://[::1]:8080",
		"https://[2001:db8::1]",
		"https://secure.example.net:443",
		"http://plain.example.net:80",
	)
	for _, tc := range []struct {
		origin string
		want   bool
	}{
		// Exact matches and their normalised spellings.
		{"https://shop.example.org", true},
		{"https://shop.example.org:443", true},
		{"HTTPS://SHOP.EXAMPLE.ORG", true},
		{"https://Shop.Example.Org", true},
		{"https://shop.example.org/", true},
		{"https://secure.example.net", true},
		{"https://secure.example.net:443", true},
		{"http://plain.example.net", true},
		{"http://plain.example.net:80", true},
		{"https://api.example.org:8443", true},
		{"http://localhost:3000", true},

		// Other scheme or port.
		{"http://shop.example.org", false},
		{"https://shop.example.org:8443", false},
		{"http://shop.example.org:443", false},
		{"https://api.example.org", false},
		{"https://api.example.org:443", false},
		{"http://api.example.org:8443", false},
		{"http://localhost", false},
		{"http://localhost:3001", false},
		{"https://localhost:3000", false},
		{"http://secure.example.net:443", false},

		// Look-alikes of an exact origin.
		{"https://shop.example.org.evil.com", false},
		{"https://evilshop.example.org", false},
		{"https://x.shop.example.org", false},
		{"https://hop.example.org", false},
		{"https://shop.example.or", false},
		{"https://shop.example.org.", false},
		{"https://shop.example.org@evil.com", false},
		{"https://evil.com#@shop.example.org", false},
		{"https://evil.com?https://shop.example.org", false},
		{"https://shop.example.org/path", false},

		// Wildcards cover subdomains at any depth, never the domain itself.
		{"https://a.example.com", true},
		{"https://a.b.example.com", true},
		{"https://A.Example.COM", true},
		{"https://a.example.com:443", true},
		{"https://example.com", false},
		{"https://.example.com", false},
		{"https://..example.com", false},
		{"https://evil-example.com", false},
		{"https://notexample.com", false},
		{"https://example.com.evil.com", false},
		{"https://a.example.com.evil.com", false},
		{"https://a.example.co", false},
		{"http://a.example.com", false},
		{"https://a.example.com:8443", false},
		{"https://*.example.com", false},
		{"https://a!b.example.com", false},
		{"https://a.example.com:0443", false},
		{"http://x.dev.test:8080", true},
		{"http://x.dev.test", false},
		{"http://dev.test:8080", false},

		// IPv6.
		{"http://[::1]:8080", true},
		{"http://[0:0:0:0:0:0:0:1]:8080", true},
		{"http://[::1]", false},
		{"http://[::1]:8081", false},
		{"https://[2001:db8::1]", true},
		{"https://[2001:DB8::1]:443", true},
		{"https://[2001:db8::2]", false},
		{"https://[2001:db8::1%25eth0]", false},

		// Never an origin.
		{"", false},
		{"null", false},
		{"*", false},
		{"shop.example.org", false},
		{"//shop.example.org", false},
		{"ftp://shop.example.org", false},
		{"https://", false},
		{"https://shop.example.org:", false},
		{"https://shop.example.org#", false},
		{"https://shop.example.org?", false},
		{" https://shop.example.org", false},
		{"https://shop.example.org ", false},
	} {
		if got := o.Allowed(tc.origin); got != tc.want {
			t.Errorf("Allowed(%q) = %v, want %v", tc.origin, got, tc.want)
		}
	}
}

func TestAllowedEmptyAndNil(t *testing.T) {
	var nilOrigins *Origins
	empty := mustParseOrigins(t)
	for _, origin := range []string{"https://example.com", "null", ""} {
		if nilOrigins.Allowed(origin) {
			t.Errorf("nil Origins allowed %q", origin)
		}
		if empty.Allowed(origin) {
			t.Errorf("empty Origins allowed %q", origin)
		}
	}
}

func TestOriginHost(t *testing.T) {
	for _, tc := range []struct {
		origin string
		want   string
		ok     bool
	}{
		{"https://example.com", "example.com", true},
		{"https://Example.COM", "example.com", true},
		{"https://example.com:443", "example.com", true},
		{"http://example.com:80", "example.com", true},
		{"http://example.com:443", "example.com:443", true},
		{"https://example.com:80", "example.com:80", true},
		{"https://example.com:8443", "example.com:8443", true},
		{"https://a.b.example.com/", "a.b.example.com", true},
		{"http://127.0.0.1:8080", "127.0.0.1:8080", true},
		// IPv6 hosts keep their brackets, as in a Host header, so that a
		// session's site is spelled the same with and without an Origin.
		{"http://[::1]", "[::1]", true},
		{"http://[::1]:8080", "[::1]:8080", true},
		{"https://[2001:DB8::1]:443", "[2001:db8::1]", true},
		{"", "", false},
		{"null", "", false},
		{"*", "", false},
		{"example.com", "", false},
		{"ftp://example.com", "", false},
		{"https://example.com/x", "", false},
		{"https://u@example.com", "", false},
		{"https://example.com:", "", false},
		{"https://..example.com", "", false},
	} {
		got, ok := OriginHost(tc.origin)
		if got != tc.want || ok != tc.ok {
			t.Errorf("OriginHost(%q) = %q, %v; want %q, %v", tc.origin, got, ok, tc.want, tc.ok)
		}
	}
}

func TestCookieRequestAllowed(t *testing.T) {
	o := mustParseOrigins(t, "https://shop.example.com", "https://*.widgets.example")
	origins := []struct {
		name, value string
		allowed     bool // whether the origin alone passes
	}{
		{"allowed", "https://shop.example.com", true},
		{"allowed wildcard", "https://a.widgets.example", true},
		{"denied", "https://evil.example", false},
		{"denied look-alike", "https://shop.example.com.evil.example", false},
		{"null", "null", false},
		{"absent", "", false},
	}
	sites := []string{"same-origin", "same-site", "cross-site", "none", "", "SAME-ORIGIN", "same-origin "}
	for _, org := range origins {
		for _, site := range sites {
			var want bool
			switch {
			case org.value != "":
				// An Origin decides alone, whatever Sec-Fetch-Site says.
				want = org.allowed
			default:
				// No Origin: only the exact same-origin fetch metadata counts.
				want = site == "same-origin"
			}
			if got := o.CookieRequestAllowed(org.value, site); got != want {
				t.Errorf("origin %s (%q), Sec-Fetch-Site %q: got %v, want %v", org.name, org.value, site, got, want)
			}
		}
	}

	// The matrix spelled out for the cases the spec names.
	for _, tc := range []struct {
		origin, site string
		want         bool
	}{
		{"https://shop.example.com", "cross-site", true},
		{"https://shop.example.com", "", true},
		{"https://evil.example", "same-origin", false},
		{"", "same-origin", true},
		{"", "same-site", false},
		{"", "cross-site", false},
		{"", "none", false},
		{"", "", false},
	} {
		if got := o.CookieRequestAllowed(tc.origin, tc.site); got != tc.want {
			t.Errorf("CookieRequestAllowed(%q, %q) = %v, want %v", tc.origin, tc.site, got, tc.want)
		}
	}

	var nilOrigins *Origins
	if nilOrigins.CookieRequestAllowed("https://shop.example.com", "same-origin") {
		t.Error("nil Origins allowed an Origin")
	}
	if !nilOrigins.CookieRequestAllowed("", "same-origin") {
		t.Error("nil Origins refused a same-origin request without Origin")
	}
}

func FuzzOriginsAllowed(f *testing.F) {
	for _, s := range []string{
		"https://example.com", "https://a.example.com", "https://a.b.example.com:443",
		"http://[::1]:8080", "null", "*", "", "https://example.com.evil.com",
		"https://evil-example.com", "https://u:p@a.example.com", "https://a.example.com/x",
		"https://..example.com", "http://localhost:3000", "https://[fe80::1%25en0]",
		"https://a.example.com:0443", "https://a.example.com#",
	} {
		f.Add(s)
	}
	o := mustParseOriginsF(f, "https://example.com", "https://*.example.com", "http://localhost:3000", "http://[::1]:8080")
	f.Fuzz(func(t *testing.T, s string) {
		allowed := o.Allowed(s)
		host, ok := OriginHost(s)
		_, parseErr := ParseOrigins([]string{s})
		_ = o.CookieRequestAllowed(s, "same-origin")
		if ok != (host != "") {
			t.Fatalf("OriginHost(%q) = %q, %v", s, host, ok)
		}
		if !allowed {
			return
		}
		if !ok {
			t.Fatalf("Allowed(%q) but OriginHost refuses it", s)
		}
		if parseErr != nil {
			t.Fatalf("Allowed(%q) but ParseOrigins refuses it: %v", s, parseErr)
		}
		if strings.ContainsAny(s, "@?#* \t\r\n") {
			t.Fatalf("Allowed(%q): user info, query, fragment, wildcard or space", s)
		}
		if h := strings.ToLower(host); h != "example.com" && !strings.HasSuffix(h, ".example.com") &&
			h != "localhost:3000" && h != "[::1]:8080" {
			t.Fatalf("Allowed(%q) with site %q outside the list", s, host)
		}
		// What is allowed parses back to an entry that allows it again.
		if p, err := ParseOrigins([]string{s}); err != nil || !p.Allowed(s) {
			t.Fatalf("Allowed(%q) is not self-consistent: %v", s, err)
		}
	})
}

func mustParseOriginsF(f *testing.F, entries ...string) *Origins {
	o, err := ParseOrigins(entries)
	if err != nil {
		f.Fatalf("ParseOrigins(%q): %v", entries, err)
	}
	return o
}

func TestSameOrigin(t *testing.T) {
	for _, tc := range []struct {
		origin, scheme, host string
		want                 bool
	}{
		{"https://shop.example.com", "https", "shop.example.com", true},
		{"https://shop.example.com", "https", "shop.example.com:443", true},
		{"https://Shop.Example.com:443", "https", "shop.example.com", true},
		{"http://localhost:8080", "http", "localhost:8080", true},
		{"http://[::1]:8080", "http", "[::1]:8080", true},
		{"http://shop.example.com", "https", "shop.example.com", false},       // other scheme
		{"https://shop.example.com:8443", "https", "shop.example.com", false}, // other port
		{"http://localhost:8081", "http", "localhost:8080", false},
		{"https://shop.example.com.evil.net", "https", "shop.example.com", false},
		{"https://evil.net", "https", "shop.example.com", false},
		{"null", "https", "shop.example.com", false},
		{"https://*.example.com", "https", "*.example.com", false},
		{"https://shop.example.com", "https", "", false},
		{"https://shop.example.com/path", "https", "shop.example.com", false},
	} {
		if got := SameOrigin(tc.origin, tc.scheme, tc.host); got != tc.want {
			t.Errorf("SameOrigin(%q, %q, %q) = %v, want %v", tc.origin, tc.scheme, tc.host, got, tc.want)
		}
	}
	if o, _ := ParseOrigins(nil); !o.Empty() {
		t.Error("no entries: not Empty")
	}
	if o, _ := ParseOrigins([]string{"https://*.example.com"}); o.Empty() {
		t.Error("a wildcard entry: Empty")
	}
}

func FuzzSameOrigin(f *testing.F) {
	for _, s := range []string{"https://shop.example.com", "http://[::1]:8080", "null", "https://a.com:443"} {
		f.Add(s, "shop.example.com")
	}
	f.Fuzz(func(t *testing.T, origin, host string) {
		for _, scheme := range []string{"http", "https"} {
			if !SameOrigin(origin, scheme, host) {
				continue
			}
			// A match is a well-formed origin of that scheme whose host is the
			// request's, spelled as a Host header.
			got, ok := OriginHost(origin)
			want, ok2 := OriginHost(scheme + "://" + host)
			if !ok || !ok2 || got != want || !strings.HasPrefix(strings.ToLower(origin), scheme+"://") {
				t.Fatalf("SameOrigin(%q, %s, %q) but hosts %q / %q", origin, scheme, host, got, want)
			}
		}
	})
}
