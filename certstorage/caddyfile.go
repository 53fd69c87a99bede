package certstorage

import (
	"github.com/caddyserver/caddy/v2/caddyconfig/caddyfile"
)

// UnmarshalCaddyfile sets up the module from Caddyfile tokens. It only
// parses; Provision and Validate check the values.
//
// Syntax (global option):
//
//	storage mongodb {
//		uri      <connection string>
//		database <name>
//	}
func (m *MongoDB) UnmarshalCaddyfile(d *caddyfile.Dispenser) error {
	d.Next() // the module name, mongodb
	if d.NextArg() {
		return d.ArgErr()
	}
	for nesting := d.Nesting(); d.NextBlock(nesting); {
		var dst *string
		switch d.Val() {
		case "uri":
			dst = &m.URI
		case "database":
			dst = &m.Database
		default:
			return d.Errf("unrecognized subdirective '%s'", d.Val())
		}
		if *dst != "" {
			return d.Errf("%s already specified", d.Val())
		}
		if !d.AllArgs(dst) {
			return d.ArgErr()
		}
	}
	return nil
}

var _ caddyfile.Unmarshaler = (*MongoDB)(nil)
