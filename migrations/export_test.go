package migrations

import (
	"context"
	"database/sql"
	"io/fs"

	"github.com/pressly/goose/v3"
)

// UpTo migrates db up to version only, for tests of a later migration
// over rows written under an earlier schema.
func UpTo(ctx context.Context, db *sql.DB, d Dialect, version int64) error {
	gd, err := gooseDialect(d)
	if err != nil {
		return err
	}
	sub, err := fs.Sub(files, string(d))
	if err != nil {
		return err
	}
	p, err := goose.NewProvider(gd, db, sub, goose.WithTableName(TableName), goose.WithDisableGlobalRegistry(true))
	if err != nil {
		return err
	}
	_, err = p.UpTo(ctx, version)
	return err
}
