package chatproxy

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"strconv"
	"strings"
	"time"

	"github.com/caddyserver/caddy/v2"
	caddycmd "github.com/caddyserver/caddy/v2/cmd"
	"github.com/spf13/cobra"

	"github.com/chatproxy/caddy-chatproxy/sessions"
)

func init() {
	caddycmd.RegisterCommand(caddycmd.Command{
		Name:  "chatproxy",
		Usage: "migrate|status [--config <path> [--adapter <name>]] [--database <url>]",
		Short: "Manages the chat_proxy session store",
		Long: `
Manages the store that chat_proxy keeps sessions and messages in.

  migrate  applies pending schema migrations (Caddy also does this on first use)
  status   prints the schema version, any pending migrations and how many
           sessions and messages are stored; it only reads, so it is safe to
           run with a new binary before taking a backup and migrating

The store is chosen, in this order, by --database (a postgres:// URL or
sqlite:<path>), by the chat_proxy handlers in --config (each distinct
database once), or else the embedded store in Caddy's data directory.
Placeholders such as {env.DATABASE_URL} are resolved.`,
		CobraFunc: func(cmd *cobra.Command) {
			// Without a Run, cobra answers an unknown subcommand with the
			// help and exit status 0, so a typo in a script looks like success.
			cmd.Args = cobra.ArbitraryArgs
			cmd.RunE = func(c *cobra.Command, args []string) error {
				if len(args) == 0 {
					return c.Help()
				}
				c.PrintErr(c.UsageString())
				return fmt.Errorf("unknown subcommand %q for %q", args[0], c.CommandPath())
			}
			for _, sub := range []struct {
				name, short string
				run         func(context.Context, sessionsStoreCommand) error
			}{
				{"migrate", "Applies pending schema migrations", runMigrate},
				{"status", "Prints schema version, pending migrations and counts; changes nothing", runStatus},
			} {
				c := &cobra.Command{Use: sub.name, Short: sub.short, Args: cobra.NoArgs}
				c.Flags().StringP("config", "c", "", "Caddy configuration whose chat_proxy handlers name the stores")
				c.Flags().StringP("adapter", "a", "", "Name of the config adapter to apply")
				c.Flags().String("database", "", "Store to use: a postgres:// URL or sqlite:<path>")
				run := sub.run
				c.RunE = func(c *cobra.Command, _ []string) error {
					config, _ := c.Flags().GetString("config")
					adapter, _ := c.Flags().GetString("adapter")
					database, _ := c.Flags().GetString("database")
					targets, err := commandTargets(config, adapter, database)
					if err != nil {
						return err
					}
					ctx, cancel := context.WithTimeout(c.Context(), 2*time.Minute)
					defer cancel()
					for _, t := range targets {
						if err := run(ctx, t); err != nil {
							return err
						}
					}
					return nil
				}
				cmd.AddCommand(c)
			}
		},
	})
}

// sessionsStoreCommand is one store a subcommand works on. label names it
// for people without revealing a password.
type sessionsStoreCommand struct {
	label    string
	database string
}

type migrator interface {
	sessions.Store
	Migrate(ctx context.Context) error
	Status(ctx context.Context) (*sessions.Status, error)
}

func openForCommand(database string) (migrator, error) {
	kind, err := sessions.StoreKind(database)
	if err != nil {
		return nil, err
	}
	if kind == sessions.KindPostgres {
		return sessions.OpenPostgres(database)
	}
	return sessions.OpenSQLite(sessions.SQLitePath(database))
}

func runMigrate(ctx context.Context, t sessionsStoreCommand) error {
	s, err := openForCommand(t.database)
	if err != nil {
		return err
	}
	defer s.Close()
	if err := s.Migrate(ctx); err != nil {
		return fmt.Errorf("migrating %s: %w", t.label, err)
	}
	st, err := s.Stats(ctx)
	if err != nil {
		return fmt.Errorf("reading %s: %w", t.label, err)
	}
	fmt.Printf("%s: schema version %d\n", t.label, st.SchemaVersion)
	return nil
}

// runStatus reports a store without changing it: no migration, no table,
// and for the embedded store no file is created. `migrate` is the only
// subcommand that writes.
func runStatus(ctx context.Context, t sessionsStoreCommand) error {
	s, err := openForCommand(t.database)
	if err != nil {
		return err
	}
	defer s.Close()
	st, err := s.Status(ctx)
	if err != nil {
		return fmt.Errorf("reading %s: %w", t.label, err)
	}
	fmt.Println(t.label + ": " + statusLine(st))
	return nil
}

// statusLine describes a store's status in one line.
func statusLine(st *sessions.Status) string {
	if st.SchemaVersion == 0 {
		return fmt.Sprintf("not migrated (pending migrations: %s; run `caddy chatproxy migrate`)", versionList(st.Pending))
	}
	line := fmt.Sprintf("schema version %d, %d sessions, %d messages", st.SchemaVersion, st.Sessions, st.Messages)
	if len(st.Pending) > 0 {
		line += fmt.Sprintf("; pending migrations: %s (run `caddy chatproxy migrate`)", versionList(st.Pending))
	}
	return line
}

func versionList(vs []int64) string {
	parts := make([]string, len(vs))
	for i, v := range vs {
		parts[i] = strconv.FormatInt(v, 10)
	}
	return strings.Join(parts, ", ")
}

// commandTargets decides which stores a subcommand works on.
func commandTargets(configFile, adapter, database string) ([]sessionsStoreCommand, error) {
	repl := caddy.NewReplacer()
	resolve := func(v string) (string, error) {
		out, err := repl.ReplaceOrErr(v, false, true)
		if err != nil {
			return "", fmt.Errorf("database: %w", err)
		}
		return out, nil
	}
	if database != "" {
		db, err := resolve(database)
		if err != nil {
			return nil, err
		}
		return []sessionsStoreCommand{{label: storeLabel(db), database: db}}, nil
	}
	if configFile != "" {
		cfg, _, _, err := caddycmd.LoadConfig(configFile, adapter)
		if err != nil {
			return nil, fmt.Errorf("loading config: %w", err)
		}
		var doc any
		if err := json.Unmarshal(cfg, &doc); err != nil {
			return nil, fmt.Errorf("reading config: %w", err)
		}
		seen := make(map[string]bool)
		var targets []sessionsStoreCommand
		var walkErr error
		walkHandlers(doc, func(h map[string]any) {
			raw, _ := h["database"].(string)
			db, err := resolve(raw)
			if err != nil {
				walkErr = errors.Join(walkErr, err)
				return
			}
			if !seen[db] {
				seen[db] = true
				targets = append(targets, sessionsStoreCommand{label: storeLabel(db), database: db})
			}
		})
		if walkErr != nil {
			return nil, walkErr
		}
		if len(targets) == 0 {
			return nil, fmt.Errorf("no chat_proxy handler in %s", configFile)
		}
		return targets, nil
	}
	return []sessionsStoreCommand{{label: storeLabel(""), database: ""}}, nil
}

// walkHandlers calls fn for every chat_proxy handler object in a JSON config.
func walkHandlers(v any, fn func(map[string]any)) {
	switch v := v.(type) {
	case map[string]any:
		if v["handler"] == "chat_proxy" {
			fn(v)
		}
		for _, child := range v {
			walkHandlers(child, fn)
		}
	case []any:
		for _, child := range v {
			walkHandlers(child, fn)
		}
	}
}

// storeLabel names a store for output without its credentials.
func storeLabel(database string) string {
	kind, err := sessions.StoreKind(database)
	if err != nil {
		return "store"
	}
	if kind == sessions.KindPostgres {
		return "postgres " + redactURL(database)
	}
	return "embedded " + sessions.SQLitePath(database)
}

func redactURL(raw string) string {
	u, err := parseURLQuiet(raw)
	if err != nil {
		return "(unparsable URL)"
	}
	u.User = nil
	u.RawQuery = ""
	return u.String()
}
