package caddymodule

import (
	"math"
	"strconv"
	"time"

	"github.com/caddyserver/caddy/v2"
	"github.com/caddyserver/caddy/v2/caddyconfig"
	"github.com/caddyserver/caddy/v2/caddyconfig/caddyfile"
	"github.com/caddyserver/caddy/v2/caddyconfig/httpcaddyfile"
	"github.com/caddyserver/caddy/v2/modules/caddyhttp"
	"github.com/dustin/go-humanize"

	"github.com/trollllm/caddy-llm-billing/billing"
)

func init() {
	httpcaddyfile.RegisterGlobalOption("llm_billing", parseGlobalOption)
	httpcaddyfile.RegisterHandlerDirective("llm_billing", parseHandlerDirective)
	httpcaddyfile.RegisterDirectiveOrder("llm_billing", httpcaddyfile.Before, "reverse_proxy")
}

// UnmarshalCaddyfile sets up the app from the global option block.
//
// Syntax:
//
//	llm_billing {
//		mongodb_uri          <uri>        # required; use {env.MONGODB_URI}
//		database             <name>       # default: fproxy
//		key_cache_ttl        <duration>   # default: 30s; off disables
//		key_refresh_interval <duration>   # default: 5s
//		upstream_keys        <key...>     # static keys instead of openhands_keys
//		key_attempts         <n>          # keys tried per request; default 3
//		key_retry_budget     <duration>   # time allowed for failed attempts; default 30s
//		key_cooldown         <duration>   # 429/529 without Retry-After; default 60s
//		key_error_cooldown   <duration>   # 5xx and transport errors; default 10s
//		hold_lease           <duration>   # a hold's lease; default 15m
//		orphan_policy        charge_input | charge_hold | release   # default charge_input
//		spool_dir            <dir>        # settlement journal; default in Caddy's data dir
//		isolation            auto | process | shared   # default auto
//		error_logs           on | off     # refusals to error_logs; default on
//		rate_limit {                      # requests per window; 0 turns a limit off
//			user   <events> [<window>]    # sk-troll* keys; default 2000 1m
//			friend <events> [<window>]    # sk-trollllm-friend-* keys; default 60 1m
//			other  <events> [<window>]    # any other key; default 300 1m
//			ip     <events> [<window>]    # per client IP, before auth; default off
//		}
//		body_memory          <size>       # request bodies in flight, all sites; default 256MiB
//	}
func (a *App) UnmarshalCaddyfile(d *caddyfile.Dispenser) error {
	if !d.Next() { // the option name
		// No tokens at all: nothing to parse and no line to name. (NextArg
		// would report an argument here and ArgErr an error at ":0".)
		return nil
	}
	if d.NextArg() {
		return d.ArgErr()
	}
	for d.NextBlock(0) {
		name := d.Val()
		switch name {
		case "mongodb_uri":
			if a.MongoDBURI != "" {
				return d.Errf("mongodb_uri already specified")
			}
			if !d.AllArgs(&a.MongoDBURI) {
				return d.ArgErr()
			}
		case "database":
			if a.Database != "" {
				return d.Errf("database already specified")
			}
			if !d.AllArgs(&a.Database) {
				return d.ArgErr()
			}
		case "key_cache_ttl":
			var v string
			if !d.AllArgs(&v) {
				return d.ArgErr()
			}
			if v == "off" {
				a.KeyCacheTTL = caddy.Duration(-1)
				continue
			}
			dur, err := caddy.ParseDuration(v)
			if err != nil {
				return d.Errf("key_cache_ttl: %v", err)
			}
			if dur <= 0 {
				return d.Errf("key_cache_ttl must be positive (or off)")
			}
			a.KeyCacheTTL = caddy.Duration(dur)
		case "key_refresh_interval":
			var v string
			if !d.AllArgs(&v) {
				return d.ArgErr()
			}
			dur, err := caddy.ParseDuration(v)
			if err != nil {
				return d.Errf("key_refresh_interval: %v", err)
			}
			if dur < time.Second {
				return d.Errf("key_refresh_interval must be at least 1s")
			}
			a.KeyRefreshInterval = caddy.Duration(dur)
		case "key_attempts":
			var v string
			if !d.AllArgs(&v) {
				return d.ArgErr()
			}
			n, err := strconv.Atoi(v)
			if err != nil || n < 1 || n > 20 {
				return d.Errf("key_attempts must be a number from 1 to 20, got %q", v)
			}
			a.KeyAttempts = n
		case "key_retry_budget", "key_cooldown", "key_error_cooldown":
			var v string
			if !d.AllArgs(&v) {
				return d.ArgErr()
			}
			dur, err := caddy.ParseDuration(v)
			if err != nil || dur <= 0 {
				return d.Errf("%s must be a positive duration, got %q", name, v)
			}
			switch name {
			case "key_retry_budget":
				a.KeyRetryBudget = caddy.Duration(dur)
			case "key_cooldown":
				a.KeyCooldown = caddy.Duration(dur)
			default:
				a.KeyErrorCooldown = caddy.Duration(dur)
			}
		case "hold_lease":
			var v string
			if !d.AllArgs(&v) {
				return d.ArgErr()
			}
			dur, err := caddy.ParseDuration(v)
			if err != nil || dur < time.Minute {
				return d.Errf("hold_lease must be a duration of at least 1m, got %q", v)
			}
			a.HoldLease = caddy.Duration(dur)
		case "orphan_policy":
			if !d.AllArgs(&a.OrphanPolicy) {
				return d.ArgErr()
			}
			if _, err := billing.ParseOrphanPolicy(a.OrphanPolicy); err != nil {
				return d.Errf("orphan_policy: %v", err)
			}
		case "spool_dir":
			if !d.AllArgs(&a.SpoolDir) {
				return d.ArgErr()
			}
		case "isolation":
			if !d.AllArgs(&a.Isolation) {
				return d.ArgErr()
			}
			switch a.Isolation {
			case "auto", "process", "shared":
			default:
				return d.Errf("isolation: unknown mode %q (want auto, process or shared)", a.Isolation)
			}
		case "error_logs":
			if !d.AllArgs(&a.ErrorLogs) {
				return d.ArgErr()
			}
		case "rate_limit":
			if a.RateLimit != nil {
				return d.Errf("rate_limit already specified")
			}
			rl, err := parseRateLimits(d)
			if err != nil {
				return err
			}
			a.RateLimit = rl
		case "body_memory":
			var v string
			if !d.AllArgs(&v) {
				return d.ArgErr()
			}
			n, err := humanize.ParseBytes(v)
			if err != nil || n > math.MaxInt64 {
				return d.Errf("body_memory: not a size: %q", v)
			}
			a.BodyMemory = int64(n)
		case "upstream_keys":
			keys := d.RemainingArgs()
			if len(keys) == 0 {
				return d.ArgErr()
			}
			a.UpstreamKeys = append(a.UpstreamKeys, keys...)
		default:
			return d.Errf("unrecognized llm_billing option '%s'", name)
		}
	}
	return nil
}

// parseRateLimits parses the rate_limit block; the window defaults to 1m.
func parseRateLimits(d *caddyfile.Dispenser) (*RateLimits, error) {
	if d.NextArg() {
		return nil, d.ArgErr()
	}
	rl := new(RateLimits)
	for d.NextBlock(1) {
		kind := d.Val()
		var dst **RateLimit
		switch kind {
		case kindUser:
			dst = &rl.User
		case kindFriend:
			dst = &rl.Friend
		case kindOther:
			dst = &rl.Other
		case kindIP:
			dst = &rl.IP
		default:
			return nil, d.Errf("rate_limit: unknown kind '%s' (want user, friend, other or ip)", kind)
		}
		if *dst != nil {
			return nil, d.Errf("rate_limit: %s already specified", kind)
		}
		args := d.RemainingArgs()
		if len(args) < 1 || len(args) > 2 {
			return nil, d.ArgErr()
		}
		n, err := strconv.Atoi(args[0])
		if err != nil {
			return nil, d.Errf("rate_limit %s: events must be a whole number, got %q", kind, args[0])
		}
		l := &RateLimit{Events: n, Window: caddy.Duration(time.Minute)}
		if len(args) == 2 {
			w, err := caddy.ParseDuration(args[1])
			if err != nil {
				return nil, d.Errf("rate_limit %s: window: %v", kind, err)
			}
			l.Window = caddy.Duration(w)
		}
		*dst = l
	}
	return rl, nil
}

func parseGlobalOption(d *caddyfile.Dispenser, existing any) (any, error) {
	if existing != nil {
		return nil, d.Err("llm_billing global option specified more than once")
	}
	var a App
	if err := a.UnmarshalCaddyfile(d); err != nil {
		return nil, err
	}
	return httpcaddyfile.App{Name: "llm_billing", Value: caddyconfig.JSON(a, nil)}, nil
}

// UnmarshalCaddyfile sets up the handler from a site block.
//
// Syntax:
//
//	llm_billing {
//		credit_field  creditsNew | credits [refCredits]
//		models        <path to legacy config JSON>
//		max_body_size      <size>       # default: 50MB
//		hold               worst_case | check   # default worst_case
//		default_max_tokens <n>          # output a hold assumes without max_tokens; default 4096
//		client_disconnect  drain | stop # default drain
//		drain_timeout      <duration>   # default 2m
//		allow_roles        <role...>    # only users of these roles (the priority line)
//		price_factor       <factor> {   # scale some requests' cost (the legacy GLM discount)
//			upstream_models <pattern...> # on the chosen upstream model; default all
//			except_models   <pattern...> # on the model's catalogue id
//		}
//		forward_headers    <name...>    # client headers forwarded besides the built-in allow-list
//	}
func (h *Handler) UnmarshalCaddyfile(d *caddyfile.Dispenser) error {
	if !d.Next() { // the directive name
		// No tokens at all: nothing to parse and no line to name. (NextArg
		// would report an argument here and ArgErr an error at ":0".)
		return nil
	}
	if d.NextArg() {
		return d.ArgErr()
	}
	for d.NextBlock(0) {
		name := d.Val()
		switch name {
		case "credit_field":
			if len(h.CreditFields) > 0 {
				return d.Errf("credit_field already specified")
			}
			h.CreditFields = d.RemainingArgs()
			if len(h.CreditFields) == 0 {
				return d.ArgErr()
			}
		case "models":
			if h.Models != "" {
				return d.Errf("models already specified")
			}
			if !d.AllArgs(&h.Models) {
				return d.ArgErr()
			}
		case "max_body_size":
			var v string
			if !d.AllArgs(&v) {
				return d.ArgErr()
			}
			n, err := humanize.ParseBytes(v)
			if err != nil {
				return d.Errf("max_body_size: %v", err)
			}
			if n == 0 || n > 1<<40 {
				return d.Errf("max_body_size: %s is out of range", v)
			}
			h.MaxBodySize = int64(n)
		case "hold":
			if !d.AllArgs(&h.Hold) {
				return d.ArgErr()
			}
			if h.Hold != HoldWorstCase && h.Hold != HoldCheck {
				return d.Errf("hold: unknown sizing %q (want %s or %s)", h.Hold, HoldWorstCase, HoldCheck)
			}
		case "default_max_tokens":
			var v string
			if !d.AllArgs(&v) {
				return d.ArgErr()
			}
			n, err := strconv.ParseInt(v, 10, 64)
			if err != nil || n < 1 || n > 10_000_000 {
				return d.Errf("default_max_tokens must be a number from 1 to 10000000, got %q", v)
			}
			h.DefaultMaxTokens = n
		case "client_disconnect":
			if !d.AllArgs(&h.ClientDisconnect) {
				return d.ArgErr()
			}
			if h.ClientDisconnect != DisconnectDrain && h.ClientDisconnect != DisconnectStop {
				return d.Errf("client_disconnect: unknown policy %q (want %s or %s)", h.ClientDisconnect, DisconnectDrain, DisconnectStop)
			}
		case "drain_timeout":
			var v string
			if !d.AllArgs(&v) {
				return d.ArgErr()
			}
			dur, err := caddy.ParseDuration(v)
			if err != nil || dur <= 0 {
				return d.Errf("drain_timeout must be a positive duration, got %q", v)
			}
			h.DrainTimeout = caddy.Duration(dur)
		case "allow_roles":
			roles := d.RemainingArgs()
			if len(roles) == 0 {
				return d.ArgErr()
			}
			h.AllowRoles = append(h.AllowRoles, roles...)
		case "price_factor":
			if h.PriceFactor != nil {
				return d.Errf("price_factor already specified")
			}
			pf, err := parsePriceFactor(d)
			if err != nil {
				return err
			}
			h.PriceFactor = pf
		case "forward_headers":
			args := d.RemainingArgs()
			if len(args) == 0 {
				return d.ArgErr()
			}
			h.ForwardHeaders = append(h.ForwardHeaders, args...)
		default:
			return d.Errf("unrecognized llm_billing subdirective '%s'", name)
		}
	}
	return nil
}

// parsePriceFactor parses `price_factor <factor> { upstream_models ...;
// except_models ... }`.
func parsePriceFactor(d *caddyfile.Dispenser) (*PriceFactor, error) {
	var v string
	if !d.NextArg() {
		return nil, d.ArgErr()
	}
	v = d.Val()
	if d.NextArg() {
		return nil, d.ArgErr()
	}
	f, err := strconv.ParseFloat(v, 64)
	if err != nil {
		return nil, d.Errf("price_factor: the factor must be a number, got %q", v)
	}
	pf := &PriceFactor{Factor: f}
	for d.NextBlock(1) {
		name := d.Val()
		args := d.RemainingArgs()
		if len(args) == 0 {
			return nil, d.ArgErr()
		}
		switch name {
		case "upstream_models":
			pf.UpstreamModels = append(pf.UpstreamModels, args...)
		case "except_models":
			pf.ExceptModels = append(pf.ExceptModels, args...)
		default:
			return nil, d.Errf("price_factor: unrecognized option '%s' (want upstream_models or except_models)", name)
		}
	}
	return pf, nil
}

func parseHandlerDirective(h httpcaddyfile.Helper) (caddyhttp.MiddlewareHandler, error) {
	m := new(Handler)
	err := m.UnmarshalCaddyfile(h.Dispenser)
	return m, err
}

// Interface guards.
var (
	_ caddyfile.Unmarshaler = (*App)(nil)
	_ caddyfile.Unmarshaler = (*Handler)(nil)
)
