-- SQLite's 0002_dataset_frames.sql in PostgreSQL's types: a row dataset's name (SHA-256 of its SDS1 training
-- bytes) and its compact `dataset` frame payload, built once at upload (or on the first `local` job load of an
-- older dataset) instead of at every job load. Never edit a migration once released.
CREATE TABLE IF NOT EXISTS dataset_frames (
    dataset_id BIGINT PRIMARY KEY REFERENCES datasets(id),
    sha256 TEXT NOT NULL,
    encoding TEXT NOT NULL,
    payload BYTEA NOT NULL
);
