-- The schema as it stood before versioned migrations. `IF NOT EXISTS` everywhere, so a database created by that
-- code adopts this migration unchanged. Never edit a migration once released (sqlx checks each applied one's
-- checksum); add the next numbered file instead.
CREATE TABLE IF NOT EXISTS datasets (
    id INTEGER PRIMARY KEY,
    name TEXT NOT NULL,
    dim INTEGER NOT NULL,
    train BLOB NOT NULL,
    test BLOB NOT NULL,
    owner_id INTEGER,
    created_ms INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS jobs (
    id INTEGER PRIMARY KEY,
    name TEXT NOT NULL,
    spec TEXT NOT NULL,
    hyper TEXT NOT NULL,
    dataset_id INTEGER NOT NULL REFERENCES datasets(id),
    owner_id INTEGER,
    status TEXT NOT NULL,
    created_ms INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS checkpoints (
    job_id INTEGER PRIMARY KEY REFERENCES jobs(id),
    step INTEGER NOT NULL,
    params BLOB NOT NULL,
    optim BLOB NOT NULL,
    updated_ms INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS accepted (
    job_id INTEGER NOT NULL,
    step INTEGER NOT NULL,
    micro INTEGER NOT NULL,
    rows INTEGER NOT NULL,
    loss REAL NOT NULL,
    correct INTEGER NOT NULL,
    agreeing INTEGER NOT NULL,
    grad BLOB NOT NULL,
    PRIMARY KEY (job_id, step, micro)
);
CREATE TABLE IF NOT EXISTS workers (
    id INTEGER PRIMARY KEY,
    token_hash TEXT NOT NULL UNIQUE,
    name TEXT,
    credits_flops INTEGER NOT NULL DEFAULT 0,
    accepted INTEGER NOT NULL DEFAULT 0,
    rejected INTEGER NOT NULL DEFAULT 0,
    strikes INTEGER NOT NULL DEFAULT 0,
    refused INTEGER NOT NULL DEFAULT 0,
    created_ms INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS credits (
    id INTEGER PRIMARY KEY,
    worker_id INTEGER NOT NULL REFERENCES workers(id),
    job_id INTEGER NOT NULL,
    step INTEGER NOT NULL,
    micro INTEGER NOT NULL,
    flops INTEGER NOT NULL,
    at_ms INTEGER NOT NULL,
    -- Hash chain (ledger.rs): hash = sha256(prev_hash | id | worker | job | step | micro | flops | at_ms).
    prev_hash TEXT NOT NULL DEFAULT '',
    hash TEXT NOT NULL DEFAULT '',
    UNIQUE (worker_id, job_id, step, micro)
);
CREATE TABLE IF NOT EXISTS owners (
    id INTEGER PRIMARY KEY,
    name TEXT NOT NULL UNIQUE,
    token_hash TEXT NOT NULL UNIQUE,
    created_ms INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS best_checkpoints (
    job_id INTEGER PRIMARY KEY REFERENCES jobs(id),
    step INTEGER NOT NULL,
    accuracy REAL NOT NULL,
    params BLOB NOT NULL,
    updated_ms INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS metrics (
    job_id INTEGER NOT NULL,
    step INTEGER NOT NULL,
    kind TEXT NOT NULL,
    loss REAL NOT NULL,
    accuracy REAL NOT NULL,
    min_agreeing INTEGER NOT NULL,
    at_ms INTEGER NOT NULL,
    PRIMARY KEY (job_id, step, kind)
);
