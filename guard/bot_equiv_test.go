package guard

import (
	"regexp"
	"strings"
	"testing"
)

// The regexps that isCrawler and CountLinks replaced, kept here as the
// reference they must agree with on every input.
var (
	refCrawlerRE = regexp.MustCompile(`(?i)(?:^|[^a-z])(?:bot|crawler|spider|scraper)(?:[^a-z]|$)|[a-z](?:bot|crawler|spider)/`)
	refLinkRE    = regexp.MustCompile(`(?i)(?:\bhttps?://|\bwww\.)[^\s<>"'()]+`)
)

// refIsAutomationUserAgent is IsAutomationUserAgent as it was with the
// regexp.
func refIsAutomationUserAgent(ua string) bool {
	l := strings.ToLower(ua)
	for _, m := range automationMarkers {
		if strings.Contains(l, m) {
			return true
		}
	}
	return refCrawlerRE.MatchString(l)
}

func refCountLinks(s string) int { return len(refLinkRE.FindAllStringIndex(s, maxLinksCounted)) }

// asciiLower lowers ASCII letters only, keeping what strings.ToLower
// would change (the Kelvin sign, invalid UTF-8): isCrawler must agree
// with the regexp on any string without upper-case ASCII.
func asciiLower(s string) string {
	b := []byte(s)
	for i, c := range b {
		if 'A' <= c && c <= 'Z' {
			b[i] = c + 'a' - 'A'
		}
	}
	return string(b)
}

// uaCorpus are real user agents (browsers, apps, tools, crawlers) and
// edge cases, with whether they count as automation.
var uaCorpus = []struct {
	ua   string
	want bool
}{
	// Browsers.
	{chromeUA, false}, {firefoxUA, false}, {iphoneUA, false}, {cubotUA, false},
	{"Mozilla/5.0 (Macintosh; Intel Mac OS X 10_15_7) AppleWebKit/537.36 (KHTML, like Gecko) Chrome/131.0.0.0 Safari/537.36", false},
	{"Mozilla/5.0 (X11; Linux x86_64) AppleWebKit/537.36 (KHTML, like Gecko) Chrome/131.0.0.0 Safari/537.36", false},
	{"Mozilla/5.0 (Windows NT 10.0; Win64; x64; rv:133.0) Gecko/20100101 Firefox/133.0", false},
	{"Mozilla/5.0 (Macintosh; Intel Mac OS X 14.7; rv:133.0) Gecko/20100101 Firefox/133.0", false},
	{"Mozilla/5.0 (Macintosh; Intel Mac OS X 14_7_1) AppleWebKit/605.1.15 (KHTML, like Gecko) Version/18.1 Safari/605.1.15", false},
	{"Mozilla/5.0 (Windows NT 10.0; Win64; x64) AppleWebKit/537.36 (KHTML, like Gecko) Chrome/131.0.0.0 Safari/537.36 Edg/131.0.0.0", false},
	{"Mozilla/5.0 (Windows NT 10.0; Win64; x64) AppleWebKit/537.36 (KHTML, like Gecko) Chrome/130.0.0.0 Safari/537.36 OPR/115.0.0.0", false},
	{"Mozilla/5.0 (Windows NT 10.0; Win64; x64) AppleWebKit/537.36 (KHTML, like Gecko) Chrome/130.0.0.0 YaBrowser/24.12.0.0 Safari/537.36", false},
	{"Mozilla/5.0 (Windows NT 10.0; Win64; x64) AppleWebKit/537.36 (KHTML, like Gecko) Chrome/131.0.0.0 Safari/537.36 Vivaldi/7.0", false},
	{"Mozilla/5.0 (Windows NT 6.1; WOW64; Trident/7.0; rv:11.0) like Gecko", false},
	{"Mozilla/5.0 (Linux; Android 14; Pixel 8 Pro) AppleWebKit/537.36 (KHTML, like Gecko) Chrome/131.0.6778.81 Mobile Safari/537.36", false},
	{"Mozilla/5.0 (Linux; Android 14; SM-S928B) AppleWebKit/537.36 (KHTML, like Gecko) SamsungBrowser/27.0 Chrome/125.0.0.0 Mobile Safari/537.36", false},
	{"Mozilla/5.0 (Android 14; Mobile; rv:133.0) Gecko/133.0 Firefox/133.0", false},
	{"Mozilla/5.0 (iPad; CPU OS 17_7 like Mac OS X) AppleWebKit/605.1.15 (KHTML, like Gecko) CriOS/131.0.6778.73 Mobile/15E148 Safari/604.1", false},
	{"Mozilla/5.0 (iPhone; CPU iPhone OS 18_1 like Mac OS X) AppleWebKit/605.1.15 (KHTML, like Gecko) FxiOS/133.0 Mobile/15E148 Safari/605.1.15", false},
	{"Mozilla/5.0 (Linux; U; Android 10; en-US; RMX2020 Build/QP1A.190711.020) AppleWebKit/537.36 (KHTML, like Gecko) Version/4.0 Chrome/78.0.3904.108 UCBrowser/13.4.0.1306 Mobile Safari/537.36", false},
	{"Mozilla/5.0 (iPhone; CPU iPhone OS 18_1 like Mac OS X) AppleWebKit/605.1.15 (KHTML, like Gecko) Mobile/22B83 Instagram 357.0.0.25.101 (iPhone15,3; iOS 18_1; en_US)", false},
	{"Mozilla/5.0 (iPhone; CPU iPhone OS 17_6 like Mac OS X) AppleWebKit/605.1.15 (KHTML, like Gecko) Mobile/15E148 [FBAN/FBIOS;FBAV/485.0.0.45.96;FBBV/656048353]", false},
	{"Mozilla/5.0 (Linux; Android 13; Robotic Vacuum Phone) AppleWebKit/537.36 Chrome/120.0 Mobile Safari/537.36", false},
	// Cubot phones and words that contain a crawler word.
	{"Mozilla/5.0 (Linux; Android 11; Cubot_X30) AppleWebKit/537.36 (KHTML, like Gecko) Chrome/119.0.6045.163 Mobile Safari/537.36", false},
	{"Mozilla/5.0 (Linux; Android 13; KINGKONG 9 Build/TP1A.220624.014; CUBOT) AppleWebKit/537.36 Chrome/120.0 Mobile Safari/537.36", false},
	{"Mozilla/5.0 (Linux; Android 12; CUBOT P60) AppleWebKit/537.36 Chrome/118.0 Mobile Safari/537.36", false},
	{"Abbott FreeStyle LibreLink/2.10", false}, {"robotics-lab-kiosk", false}, {"Robot", false}, {"robot/1.0", true},
	{"Botanic Garden App", false}, {"abbot", false}, {"Bothell WA", false}, {"spiderman", false}, {"webscraper", false},
	{"scraper-x", true}, {"a scraper/1.0", true}, {"myscraper/1.0", false}, {"bot123", true}, {"my_bot", true}, {"Bot", true},
	// Tools and libraries.
	{"curl/8.5.0", true}, {"Wget/1.21.4", true}, {"python-requests/2.32.3", true}, {"Python-urllib/3.12", true},
	{"python-httpx/0.27.2", true}, {"Go-http-client/1.1", true}, {"okhttp/4.12.0", true}, {"Java/17.0.2", true},
	{"Apache-HttpClient/4.5.14 (Java/17.0.9)", true}, {"axios/1.7.7", true}, {"node-fetch/1.0 (+https://github.com/bitinn/node-fetch)", true},
	{"PostmanRuntime/7.42.0", true}, {"HTTPie/3.2.4", true}, {"Scrapy/2.11.2 (+https://scrapy.org)", true}, {"libwww-perl/6.77", true},
	{"Mozilla/5.0 (X11; Linux x86_64) AppleWebKit/537.36 (KHTML, like Gecko) HeadlessChrome/131.0.0.0 Safari/537.36", true},
	// Crawlers and link previews.
	{"Mozilla/5.0 (compatible; Googlebot/2.1; +http://www.google.com/bot.html)", true},
	{"Mozilla/5.0 (Linux; Android 6.0.1; Nexus 5X Build/MMB29P) AppleWebKit/537.36 (KHTML, like Gecko) Chrome/131.0.6778.69 Mobile Safari/537.36 (compatible; Googlebot/2.1; +http://www.google.com/bot.html)", true},
	{"Googlebot-Image/1.0", false}, {"Mediapartners-Google", false}, {"AdsBot-Google (+http://www.google.com/adsbot.html)", false},
	{"Mozilla/5.0 (compatible; Google-InspectionTool/1.0)", false},
	{"Mozilla/5.0 (compatible; bingbot/2.0; +http://www.bing.com/bingbot.htm)", true},
	{"Mozilla/5.0 AppleWebKit/537.36 (KHTML, like Gecko; compatible; bingbot/2.0; +http://www.bing.com/bingbot.htm) Chrome/116.0.1938.76 Safari/537.36", true},
	{"msnbot/2.0b (+http://search.msn.com/msnbot.htm)", true},
	{"Mozilla/5.0 (compatible; Yahoo! Slurp; http://help.yahoo.com/help/us/ysearch/slurp)", false},
	{"DuckDuckBot/1.1; (+http://duckduckgo.com/duckduckbot.html)", true},
	{"Mozilla/5.0 (compatible; Baiduspider/2.0; +http://www.baidu.com/search/spider.html)", true},
	{"Mozilla/5.0 (compatible; YandexBot/3.0; +http://yandex.com/bots)", true},
	{"Mozilla/5.0 (compatible; YandexBot/3.0)", true},
	{"Sogou web spider/4.0(+http://www.sogou.com/docs/help/webmasters.htm#07)", true},
	{"facebookexternalhit/1.1 (+http://www.facebook.com/externalhit_uatext.php)", false},
	{"facebookexternalhit/1.1", false}, {"facebookcatalog/1.0", false},
	{"Twitterbot/1.0", true}, {"LinkedInBot/1.0 (compatible; Mozilla/5.0; Apache-HttpClient +http://www.linkedin.com)", true},
	{"Slackbot-LinkExpanding 1.0 (+https://api.slack.com/robots)", false}, {"Slack-ImgProxy (+https://api.slack.com/robots)", false},
	{"Mozilla/5.0 (compatible; Discordbot/2.0; +https://discordapp.com)", true}, {"TelegramBot (like TwitterBot)", false},
	{"WhatsApp/2.23.20.0", false},
	{"Mozilla/5.0 (Macintosh; Intel Mac OS X 10_15_5) AppleWebKit/605.1.15 (KHTML, like Gecko) Version/13.1.1 Safari/605.1.15 (Applebot/0.1; +http://www.apple.com/go/applebot)", true},
	{"Mozilla/5.0 (compatible; AhrefsBot/7.0; +http://ahrefs.com/robot/)", true},
	{"Mozilla/5.0 (compatible; SemrushBot/7~bl; +http://www.semrush.com/bot.html)", true},
	{"Mozilla/5.0 (compatible; MJ12bot/v1.4.8; http://mj12bot.com/)", true},
	{"Mozilla/5.0 (compatible; DotBot/1.2; +https://opensiteexplorer.org/dotbot; help@moz.com)", true},
	{"Mozilla/5.0 (Linux; Android 7.0;) AppleWebKit/537.36 (KHTML, like Gecko) Mobile Safari/537.36 (compatible; PetalBot;+https://webmaster.petalsearch.com/site/petalbot)", false},
	{"Mozilla/5.0 (Linux; Android 5.0) AppleWebKit/537.36 (KHTML, like Gecko) Mobile Safari/537.36 (compatible; Bytespider; spider-feedback@bytedance.com)", true},
	{"Mozilla/5.0 AppleWebKit/537.36 (KHTML, like Gecko; compatible; GPTBot/1.2; +https://openai.com/gptbot)", true},
	{"Mozilla/5.0 AppleWebKit/537.36 (KHTML, like Gecko); compatible; ChatGPT-User/1.0; +https://openai.com/bot", true},
	{"Mozilla/5.0 AppleWebKit/537.36 (KHTML, like Gecko; compatible; ClaudeBot/1.0; +claudebot@anthropic.com)", true},
	{"CCBot/2.0 (https://commoncrawl.org/faq/)", true},
	{"Mozilla/5.0 AppleWebKit/537.36 (KHTML, like Gecko; compatible; PerplexityBot/1.0; +https://perplexity.ai/perplexitybot)", true},
	{"Mozilla/5.0 (compatible; SeznamBot/4.0; +https://o-seznam.cz/napoveda/vyhledavani/en/seznambot-crawler/)", true},
	{"Screaming Frog SEO Spider/20.4", true}, {"Mozilla/5.0 (compatible; Pinterestbot/1.0; +http://www.pinterest.com/bot.html)", true},
	{"Mozilla/5.0 (compatible; UptimeRobot/2.0; http://www.uptimerobot.com/)", true}, {"ia_archiver (+http://www.alexa.com/site/help/webmasters)", false},
	// Edge cases: empty, separators, non-ASCII, invalid UTF-8, and the
	// characters (?i) folds into ASCII letters.
	{"", false}, {" ", false}, {"bot", true}, {"BOT", true}, {"\x00bot\x00", true}, {"bot\n", true}, {"\nbot", true},
	{"\xffbot\xfe", true}, {"\xffrobot\xfe", false}, {"бот", false}, {"小米 bot", true}, {"小米bot", true}, {"Ébot", true},
	{"ſpider", true}, {"ſcraper/1", true}, {"xſpider/1", true}, {"ſbot", false}, {"ſbot/1", true}, {"botſ", false},
	{"\u212abot", false}, {"\u212abot/1", true}, {"bot\u212a", false}, {"İbot", false}, {"İBOT/2", true}, {"spİder", true},
	{"crawlers", false}, {"crawler", true}, {"web-crawler", true}, {"webcrawler/2", true}, {"SPIDER", true},
}

func TestCrawlerMatcherCorpus(t *testing.T) {
	for _, c := range uaCorpus {
		ref := refIsAutomationUserAgent(c.ua)
		if got := IsAutomationUserAgent(c.ua); got != ref || got != c.want {
			t.Errorf("IsAutomationUserAgent(%q) = %v; regexp version %v, want %v", c.ua, got, ref, c.want)
		}
		for _, l := range []string{strings.ToLower(c.ua), asciiLower(c.ua)} {
			if got, ref := isCrawler(l), refCrawlerRE.MatchString(l); got != ref {
				t.Errorf("isCrawler(%q) = %v; regexp %v", l, got, ref)
			}
		}
	}
}

// FuzzCrawlerUA: the hand-written crawler check accepts and refuses
// exactly the user agents the regexp did.
func FuzzCrawlerUA(f *testing.F) {
	for _, c := range uaCorpus {
		f.Add(c.ua)
	}
	f.Fuzz(func(t *testing.T, ua string) {
		if got, ref := IsAutomationUserAgent(ua), refIsAutomationUserAgent(ua); got != ref {
			t.Fatalf("IsAutomationUserAgent(%q) = %v; regexp version %v", ua, got, ref)
		}
		for _, l := range []string{strings.ToLower(ua), asciiLower(ua)} {
			if got, ref := isCrawler(l), refCrawlerRE.MatchString(l); got != ref {
				t.Fatalf("isCrawler(%q) = %v; regexp %v", l, got, ref)
			}
		}
	})
}

// linkCorpus are messages with and without links, and the edge cases of
// the regexp: case, \b, the characters that end a link, 'ſ', invalid
// UTF-8.
var linkCorpus = []struct {
	msg  string
	want int
}{
	{"", 0}, {"no links", 0}, {"see https://a.example/x", 1}, {"http://a.example and www.b.example and HTTPS://C", 3},
	{"example.com is not counted, nor mailto:x@y", 0}, {strings.Repeat("http://x.example ", 40), maxLinksCounted},
	{"is this the right page? https://shop.example/products/42?size=m", 1}, {"www.shop.example", 1},
	{"(https://a.example/x)", 1}, {`<a href="http://a.example">x</a> 'www.b.example'`, 2},
	{"http://a.example/http://b.example", 1}, {"http://a(http://b)http://c", 3}, {"http://", 0}, {"http:// x", 0},
	{"https//a", 0}, {"http:/a", 0}, {"htp://a", 0}, {"www.", 0}, {"www", 0}, {"ww.a", 0}, {"wWw.A", 1}, {"HtTpS://A", 1},
	{"xhttp://a", 0}, {"_www.a", 0}, {"9http://a", 0}, {"-http://a", 1}, {".www.a", 1}, {"éhttp://a", 1}, {"\xffwww.a\xfe", 1},
	{"httpſ://a", 1}, {"HTTPſ://a", 1}, {"httpss://a", 0}, {"http://a\vb", 1}, {"http://\va", 1}, {"http://a\fb http://c\td", 2},
	{"wwww.a", 0}, {"www.www.a", 1}, {"www.a www.b www.c", 3}, {"http://é", 1}, {"http://\xff", 1}, {"https://\u00a0x", 1},
	{"hi http://a.example\nhttp://b.example\r\nwww.c.example", 3}, {"WWW.EXAMPLE.COM/PATH", 1},
	{strings.Repeat("Lorem ipsum dolor sit amet, consectetur adipiscing elit. ", 70), 0},
}

func TestCountLinksCorpus(t *testing.T) {
	for _, c := range linkCorpus {
		ref := refCountLinks(c.msg)
		if got := CountLinks(c.msg); got != ref || got != c.want {
			t.Errorf("CountLinks(%.60q) = %d; regexp %d, want %d", c.msg, got, ref, c.want)
		}
	}
}

// FuzzCountLinks: the hand-written link count equals the regexp's.
func FuzzCountLinks(f *testing.F) {
	for _, c := range linkCorpus {
		f.Add(c.msg)
	}
	f.Fuzz(func(t *testing.T, s string) {
		if got, ref := CountLinks(s), refCountLinks(s); got != ref {
			t.Fatalf("CountLinks(%q) = %d; regexp %d", s, got, ref)
		}
	})
}
