package sessions

import (
	"context"
	"database/sql"
	"errors"
	"time"

	"github.com/jackc/pgx/v5"
)

// Waiting is an n8n execution a conversation waits on: the workflow (n8n's
// "Using Response Nodes" mode) sent a message and waits for the visitor's
// answer (Send and Wait for Response). The visitor's next message resumes
// it, whichever instance receives that message.
type Waiting struct {
	// ExecutionID is n8n's execution id.
	ExecutionID string
	// ResumeToken is n8n's own resumeToken for the execution's socket
	// (newer n8n), or empty.
	ResumeToken string
	// Holder names the proxy socket that keeps the execution alive while
	// it waits (answering n8n's heartbeats); ClearWaiting takes it.
	Holder string
	// Integrated tells which of n8n's two socket keys the holder opened
	// its socket with: with isPublic (false) or without (true). A socket
	// that resumes the execution uses the other key, so n8n does not mix
	// the two sockets up while the holder closes.
	Integrated bool
	// Blocked: the waiting node accepts only its buttons, no typed answer.
	Blocked bool
	// Until is when the wait ends: after it, a message no longer resumes
	// the execution. Stored to the microsecond in UTC.
	Until time.Time
}

// checkWaiting refuses a record that could not be resumed.
func checkWaiting(sessionID string, w *Waiting) error {
	if !storable(sessionID) {
		return ErrNotFound
	}
	if w.ExecutionID == "" || w.Holder == "" || w.Until.IsZero() ||
		!storable(w.ExecutionID) || !storable(w.Holder) || !storable(w.ResumeToken) {
		return ErrInvalidData
	}
	w.Until = normTime(w.Until)
	return nil
}

const pgSetWaiting = `
INSERT INTO chatproxy_waiting (session_id, execution_id, resume_token, holder, integrated, blocked, wait_until)
SELECT id, $2, nullif($3, ''), $4, $5, $6, $7 FROM chatproxy_sessions WHERE id = $1 AND revoked_at IS NULL
ON CONFLICT (session_id) DO UPDATE SET execution_id = excluded.execution_id, resume_token = excluded.resume_token,
    holder = excluded.holder, integrated = excluded.integrated, blocked = excluded.blocked, wait_until = excluded.wait_until`

// SetWaiting implements Store.
func (s *PostgresStore) SetWaiting(ctx context.Context, sessionID string, w Waiting) error {
	const op = "recording waiting execution"
	if err := checkWaiting(sessionID, &w); err != nil {
		return s.fail(op, err)
	}
	if err := s.ready(ctx); err != nil {
		return s.fail(op, err)
	}
	tag, err := s.pool.Exec(ctx, pgSetWaiting, sessionID, w.ExecutionID, w.ResumeToken, w.Holder, w.Integrated, w.Blocked, w.Until)
	if err != nil {
		return s.fail(op, err)
	}
	if tag.RowsAffected() == 0 {
		return s.fail(op, ErrNotFound)
	}
	return nil
}

// TakeWaiting implements Store: one DELETE … RETURNING, so that of two
// messages racing only one gets the execution.
func (s *PostgresStore) TakeWaiting(ctx context.Context, sessionID string, now time.Time) (*Waiting, error) {
	const op = "taking waiting execution"
	if !storable(sessionID) {
		return nil, s.fail(op, ErrNotFound)
	}
	if err := s.ready(ctx); err != nil {
		return nil, s.fail(op, err)
	}
	var w Waiting
	err := s.pool.QueryRow(ctx, `DELETE FROM chatproxy_waiting WHERE session_id = $1
RETURNING execution_id, coalesce(resume_token, ''), holder, integrated, blocked, wait_until`, sessionID).
		Scan(&w.ExecutionID, &w.ResumeToken, &w.Holder, &w.Integrated, &w.Blocked, &w.Until)
	if errors.Is(err, pgx.ErrNoRows) {
		return nil, s.fail(op, ErrNotFound)
	}
	if err != nil {
		return nil, s.fail(op, err)
	}
	return liveWaiting(&w, now, func(err error) error { return s.fail(op, err) })
}

// ClearWaiting implements Store.
func (s *PostgresStore) ClearWaiting(ctx context.Context, sessionID, holder string) (bool, error) {
	const op = "clearing waiting execution"
	if !storable(sessionID) || !storable(holder) {
		return false, nil
	}
	if err := s.ready(ctx); err != nil {
		return false, s.fail(op, err)
	}
	tag, err := s.pool.Exec(ctx, `DELETE FROM chatproxy_waiting WHERE session_id = $1 AND holder = $2`, sessionID, holder)
	if err != nil {
		return false, s.fail(op, err)
	}
	return tag.RowsAffected() > 0, nil
}

// liveWaiting returns a taken record unless its wait is over (it is gone
// either way).
func liveWaiting(w *Waiting, now time.Time, fail func(error) error) (*Waiting, error) {
	w.Until = normTime(w.Until)
	if !now.Before(w.Until) {
		return nil, fail(ErrNotFound)
	}
	return w, nil
}

// SetWaiting implements Store.
func (s *SQLiteStore) SetWaiting(ctx context.Context, sessionID string, w Waiting) error {
	const op = "recording waiting execution"
	if err := checkWaiting(sessionID, &w); err != nil {
		return opErr(op, err)
	}
	err := s.write(ctx, func(tx *sql.Tx) error {
		res, err := tx.ExecContext(ctx, `
INSERT INTO chatproxy_waiting (session_id, execution_id, resume_token, holder, integrated, blocked, wait_until)
SELECT id, ?2, nullif(?3, ''), ?4, ?5, ?6, ?7 FROM chatproxy_sessions WHERE id = ?1 AND revoked_at IS NULL
ON CONFLICT (session_id) DO UPDATE SET execution_id = excluded.execution_id, resume_token = excluded.resume_token,
    holder = excluded.holder, integrated = excluded.integrated, blocked = excluded.blocked, wait_until = excluded.wait_until`,
			sessionID, w.ExecutionID, w.ResumeToken, w.Holder, w.Integrated, w.Blocked, w.Until.UnixMicro())
		if err != nil {
			return err
		}
		return mustAffect(res, ErrNotFound)
	})
	return opErr(op, err)
}

// TakeWaiting implements Store; the write transaction makes the read and
// the delete one step.
func (s *SQLiteStore) TakeWaiting(ctx context.Context, sessionID string, now time.Time) (*Waiting, error) {
	const op = "taking waiting execution"
	if !storable(sessionID) {
		return nil, opErr(op, ErrNotFound)
	}
	// Most sessions wait on nothing: a read (query_only connections) says
	// so without the one write connection's BEGIN IMMEDIATE, which every
	// chat API message took here, queued with the writer's commits. A
	// record set meanwhile is as if set after this message's DELETE.
	if err := s.ready(ctx); err != nil {
		return nil, opErr(op, err)
	}
	var waits bool
	if err := s.r.QueryRowContext(ctx, `SELECT EXISTS (SELECT 1 FROM chatproxy_waiting WHERE session_id = ?1)`, sessionID).Scan(&waits); err != nil {
		return nil, opErr(op, err)
	}
	if !waits {
		return nil, opErr(op, ErrNotFound)
	}
	var w Waiting
	err := s.write(ctx, func(tx *sql.Tx) error {
		var until int64
		err := tx.QueryRowContext(ctx, `DELETE FROM chatproxy_waiting WHERE session_id = ?1
RETURNING execution_id, coalesce(resume_token, ''), holder, integrated, blocked, wait_until`, sessionID).
			Scan(&w.ExecutionID, &w.ResumeToken, &w.Holder, &w.Integrated, &w.Blocked, &until)
		if errors.Is(err, sql.ErrNoRows) {
			return ErrNotFound
		}
		w.Until = fromMicros(until)
		return err
	})
	if err != nil {
		return nil, opErr(op, err)
	}
	return liveWaiting(&w, now, func(err error) error { return opErr(op, err) })
}

// ClearWaiting implements Store.
func (s *SQLiteStore) ClearWaiting(ctx context.Context, sessionID, holder string) (bool, error) {
	const op = "clearing waiting execution"
	if !storable(sessionID) || !storable(holder) {
		return false, nil
	}
	var cleared bool
	err := s.write(ctx, func(tx *sql.Tx) error {
		res, err := tx.ExecContext(ctx, `DELETE FROM chatproxy_waiting WHERE session_id = ?1 AND holder = ?2`, sessionID, holder)
		if err != nil {
			return err
		}
		n, err := res.RowsAffected()
		cleared = n > 0
		return err
	})
	return cleared, opErr(op, err)
}

const waitingColumns = `execution_id, coalesce(resume_token, ''), holder, integrated, blocked, wait_until`

// GetWaiting implements Store.
func (s *PostgresStore) GetWaiting(ctx context.Context, sessionID string) (*Waiting, error) {
	const op = "reading waiting execution"
	if !storable(sessionID) {
		return nil, s.fail(op, ErrNotFound)
	}
	if err := s.ready(ctx); err != nil {
		return nil, s.fail(op, err)
	}
	var w Waiting
	err := s.pool.QueryRow(ctx, `SELECT `+waitingColumns+` FROM chatproxy_waiting WHERE session_id = $1`, sessionID).
		Scan(&w.ExecutionID, &w.ResumeToken, &w.Holder, &w.Integrated, &w.Blocked, &w.Until)
	if errors.Is(err, pgx.ErrNoRows) {
		return nil, s.fail(op, ErrNotFound)
	}
	if err != nil {
		return nil, s.fail(op, err)
	}
	w.Until = normTime(w.Until)
	return &w, nil
}

// GetWaiting implements Store.
func (s *SQLiteStore) GetWaiting(ctx context.Context, sessionID string) (*Waiting, error) {
	const op = "reading waiting execution"
	if !storable(sessionID) {
		return nil, opErr(op, ErrNotFound)
	}
	if err := s.ready(ctx); err != nil {
		return nil, opErr(op, err)
	}
	var w Waiting
	var until int64
	err := s.r.QueryRowContext(ctx, `SELECT `+waitingColumns+` FROM chatproxy_waiting WHERE session_id = ?1`, sessionID).
		Scan(&w.ExecutionID, &w.ResumeToken, &w.Holder, &w.Integrated, &w.Blocked, &until)
	if errors.Is(err, sql.ErrNoRows) {
		return nil, opErr(op, ErrNotFound)
	}
	if err != nil {
		return nil, opErr(op, err)
	}
	w.Until = fromMicros(until)
	return &w, nil
}
