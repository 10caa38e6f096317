-- The held-out loss of the kept best checkpoint: a language model's best version is its lowest held-out loss
-- (nats per token), a classifier's its highest accuracy (`loss` stays NULL for rows saved before this column).
ALTER TABLE best_checkpoints ADD COLUMN loss DOUBLE PRECISION;
