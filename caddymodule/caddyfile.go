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
//		key_refresh_interval <duration>   # default: 5s; at least 1s
//		upstream_keys        <key...>     # static keys instead of openhands_keys
//		key_attempts         <n>          # keys tried per request, 1 to 20; default 3
//		key_retry_budget     <duration>   # time allowed for failed attempts; default 30s
//		key_cooldown         <duration>   # 429/529 without Retry-After; default 60s
//		key_error_cooldown   <duration>   # 5xx and transport errors; default 10s
//		hold_lease           <duration>   # a hold's lease, at least 1m; default 15m
//		orphan_policy        charge_input | charge_hold | release   # default charge_input
//		spool_dir            <dir>        # settlement journal; default in Caddy's data dir
//		isolation            auto | process | shared   # default auto
//		error_logs           on | off     # refusals to error_logs; default on
//		credit_lease         on | off     # serve busy users from credit leases; default off
//		rate_limit {                      # requests per window; 0 turns a limit off
//			user   <events> [<window>]    # sk-troll* keys; default 2000 1m
//			friend <events> [<window>]    # sk-trollllm-friend-* keys; default 60 1m
//			other  <events> [<window>]    # any other key; default 300 1m
//			ip     <events> [<window>]    # per client IP, before auth; default off
//		}
//		body_memory          <size>       # request bodies in flight, all sites; default 256MiB; at least 64KiB
//	}
//
// The parser checks only the syntax and converts the values; App.Validate
// checks their bounds, for the Caddyfile and JSON alike.
func (a *App) UnmarshalCaddyfile(d *caddyfile.Dispenser) error {
	if !d.Next() { // the option name
		// No tokens at all: nothing to parse and no line to name. (NextArg
		// would report an argument here and ArgErr an error at ":0".)
		return nil
	}
	if d.NextArg() {
		return d.ArgErr()
	}
	seen := make(map[string]bool)
	for d.NextBlock(0) {
		name := d.Val()
		if seen[name] && name != "upstream_keys" {
			return d.Errf("%s already specified", name)
		}
		seen[name] = true
		if err := a.unmarshalOption(d, name); err != nil {
			return err
		}
	}
	return nil
}

// unmarshalOption parses one option of the global block.
func (a *App) unmarshalOption(d *caddyfile.Dispenser, name string) error {
	var err error
	switch name {
	case "mongodb_uri":
		err = stringArg(d, &a.MongoDBURI)
	case "database":
		err = stringArg(d, &a.Database)
	case "key_cache_ttl":
		var v string
		if !d.AllArgs(&v) {
			return d.ArgErr()
		}
		if v == "off" {
			a.KeyCacheTTL = caddy.Duration(-1)
			return nil
		}
		err = parseDuration(d, name, v, &a.KeyCacheTTL)
	case "key_refresh_interval":
		err = durationArg(d, &a.KeyRefreshInterval)
	case "key_attempts":
		err = intArg(d, &a.KeyAttempts)
	case "key_retry_budget":
		err = durationArg(d, &a.KeyRetryBudget)
	case "key_cooldown":
		err = durationArg(d, &a.KeyCooldown)
	case "key_error_cooldown":
		err = durationArg(d, &a.KeyErrorCooldown)
	case "hold_lease":
		err = durationArg(d, &a.HoldLease)
	case "orphan_policy":
		err = stringArg(d, &a.OrphanPolicy)
	case "spool_dir":
		err = stringArg(d, &a.SpoolDir)
	case "isolation":
		err = stringArg(d, &a.Isolation)
	case "error_logs":
		err = stringArg(d, &a.ErrorLogs)
	case "credit_lease":
		err = stringArg(d, &a.CreditLease)
	case "rate_limit":
		a.RateLimit, err = parseRateLimits(d)
	case "body_memory":
		err = sizeArg(d, &a.BodyMemory)
	case "upstream_keys":
		keys := d.RemainingArgs()
		if len(keys) == 0 {
			return d.ArgErr()
		}
		a.UpstreamKeys = append(a.UpstreamKeys, keys...)
	default:
		return d.Errf("unrecognized llm_billing option '%s'", name)
	}
	return err
}

// stringArg reads the option's one argument into dst.
func stringArg(d *caddyfile.Dispenser, dst *string) error {
	if !d.AllArgs(dst) {
		return d.ArgErr()
	}
	return nil
}

// durationArg reads the option's one argument, a duration, into dst.
func durationArg(d *caddyfile.Dispenser, dst *caddy.Duration) error {
	name := d.Val()
	var v string
	if !d.AllArgs(&v) {
		return d.ArgErr()
	}
	return parseDuration(d, name, v, dst)
}

// parseDuration converts v, the argument of option name, into dst.
func parseDuration(d *caddyfile.Dispenser, name, v string, dst *caddy.Duration) error {
	dur, err := caddy.ParseDuration(v)
	if err != nil {
		return d.Errf("%s: not a duration: %q", name, v)
	}
	*dst = caddy.Duration(dur)
	return nil
}

// intArg reads the option's one argument, a whole number, into dst.
func intArg[T int | int64](d *caddyfile.Dispenser, dst *T) error {
	name := d.Val()
	var v string
	if !d.AllArgs(&v) {
		return d.ArgErr()
	}
	n, err := strconv.ParseInt(v, 10, 64)
	if err != nil || int64(T(n)) != n {
		return d.Errf("%s: not a whole number: %q", name, v)
	}
	*dst = T(n)
	return nil
}

// sizeArg reads the option's one argument, a size in bytes such as 64MiB or
// 50MB, into dst.
func sizeArg(d *caddyfile.Dispenser, dst *int64) error {
	name := d.Val()
	var v string
	if !d.AllArgs(&v) {
		return d.ArgErr()
	}
	n, err := humanize.ParseBytes(v)
	if err != nil || n > math.MaxInt64 {
		return d.Errf("%s: not a size: %q", name, v)
	}
	*dst = int64(n)
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
//		max_body_size      <size>       # default: 50MB; at most 1TiB
//		hold               worst_case | check   # default worst_case
//		default_max_tokens <n>          # output a hold assumes without max_tokens, 1 to 10000000; default 4096
//		client_disconnect  drain | stop # default drain
//		drain_timeout      <duration>   # default 2m
//		allow_roles        <role...>    # only users of these roles (the priority line)
//		price_factor       <factor> {   # scale some requests' cost (the legacy GLM discount)
//			upstream_models <pattern...> # on the chosen upstream model; default all
//			except_models   <pattern...> # on the model's catalogue id
//		}
//		forward_headers    <name...>    # client headers forwarded besides the built-in allow-list
//	}
//
// The parser checks only the syntax and converts the values; Handler.Validate
// checks their bounds, for the Caddyfile and JSON alike.
func (h *Handler) UnmarshalCaddyfile(d *caddyfile.Dispenser) error {
	if !d.Next() { // the directive name
		// No tokens at all: nothing to parse and no line to name. (NextArg
		// would report an argument here and ArgErr an error at ":0".)
		return nil
	}
	if d.NextArg() {
		return d.ArgErr()
	}
	seen := make(map[string]bool)
	for d.NextBlock(0) {
		name := d.Val()
		if seen[name] && name != "allow_roles" && name != "forward_headers" {
			return d.Errf("%s already specified", name)
		}
		seen[name] = true
		if err := h.unmarshalSubdirective(d, name); err != nil {
			return err
		}
	}
	return nil
}

// unmarshalSubdirective parses one subdirective of the handler's block.
func (h *Handler) unmarshalSubdirective(d *caddyfile.Dispenser, name string) error {
	var err error
	switch name {
	case "credit_field":
		if h.CreditFields = d.RemainingArgs(); len(h.CreditFields) == 0 {
			return d.ArgErr()
		}
	case "models":
		err = stringArg(d, &h.Models)
	case "max_body_size":
		err = sizeArg(d, &h.MaxBodySize)
	case "hold":
		err = stringArg(d, &h.HoldSizing)
	case "default_max_tokens":
		err = intArg(d, &h.DefaultMaxTokens)
	case "client_disconnect":
		err = stringArg(d, &h.ClientDisconnect)
	case "drain_timeout":
		err = durationArg(d, &h.DrainTimeout)
	case "allow_roles":
		roles := d.RemainingArgs()
		if len(roles) == 0 {
			return d.ArgErr()
		}
		h.AllowRoles = append(h.AllowRoles, roles...)
	case "price_factor":
		h.PriceFactor, err = parsePriceFactor(d)
	case "forward_headers":
		args := d.RemainingArgs()
		if len(args) == 0 {
			return d.ArgErr()
		}
		h.ForwardHeaders = append(h.ForwardHeaders, args...)
	default:
		return d.Errf("unrecognized llm_billing subdirective '%s'", name)
	}
	return err
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
