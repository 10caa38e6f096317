-- A row dataset's name (SHA-256 of its SDS1 training bytes) and its compact `dataset` frame payload
-- (`palette_deflate` or `deflate`, docs/PROTOCOL.md), built once when the dataset is uploaded, or on the first
-- `local` job load of a dataset stored before this migration, and written here, instead of hashing and compressing
-- the training set at every job load. Token datasets have no row. Never edit a migration once released.
CREATE TABLE IF NOT EXISTS dataset_frames (
    dataset_id INTEGER PRIMARY KEY REFERENCES datasets(id),
    sha256 TEXT NOT NULL,
    encoding TEXT NOT NULL,
    payload BLOB NOT NULL
);
