//! The credit ledger's hash chain: how an entry is hashed, and how a whole ledger is checked.
//!
//! Every credit is an append-only entry `(id, worker, job, step, micro, flops, at_ms, prev_hash, hash)` with
//! `hash = sha256(prev_hash ‖ canonical fields)` and `prev_hash` the previous entry's hash ([`GENESIS`] for the
//! first). Changing, deleting or reordering any entry breaks every later link, and a worker's cached balance must
//! equal the sum of its entries, so `starling ledger verify` detects an edited database. (Whoever can rewrite the
//! whole file can recompute the chain; publishing the head hash — `GET /api/v1/credits` returns it — lets
//! volunteers pin it.) This module is pure: the store reads and writes rows, this decides what they must say.

use std::collections::BTreeMap;

use starling_core::protocol::WorkerId;

/// `prev_hash` of the first entry.
pub const GENESIS: &str = "0000000000000000000000000000000000000000000000000000000000000000";

/// One ledger entry as stored.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Entry {
    pub id: i64,
    pub worker: u64,
    pub job: u64,
    pub step: u64,
    pub micro: u32,
    /// Negative for a compensating entry (a clawback after a failed audit, whose `micro` carries [`CLAWBACK`]).
    pub flops: i64,
    pub at_ms: i64,
    pub prev_hash: String,
    pub hash: String,
}

/// The shared helper, re-exported where the chain is defined.
pub use starling_core::digest::sha256_hex;

/// The hash an entry with these fields must carry: sha256 over the previous hash's hex, then the fields as
/// `|id|worker|job|step|micro|flops|at_ms` in decimal (unambiguous: every field is an integer).
#[allow(clippy::too_many_arguments)] // Exactly the hashed fields, in their documented order.
pub fn entry_hash(
    prev_hash: &str,
    id: i64,
    worker: u64,
    job: u64,
    step: u64,
    micro: u32,
    flops: i64,
    at_ms: i64,
) -> String {
    sha256_hex(format!("{prev_hash}|{id}|{worker}|{job}|{step}|{micro}|{flops}|{at_ms}").as_bytes())
}

/// Marks the `micro` of a compensating entry (`micro | CLAWBACK`), so it never collides with the credit it
/// compensates (one entry per worker and micro-batch) and a second clawback of the same credit is refused.
pub const CLAWBACK: u32 = 1 << 31;

/// A worker's balance as the workers table caches it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Balance {
    pub worker: u64,
    pub credits_flops: i64,
    pub accepted: i64,
}

/// Why a ledger does not verify.
#[derive(Debug, Clone, thiserror::Error, PartialEq, Eq)]
pub enum LedgerError {
    #[error("entry {id}: prev_hash {found} does not match the previous entry's hash {expected}")]
    BrokenLink {
        id: i64,
        expected: String,
        found: String,
    },
    #[error(
        "entry {id}: stored hash {found} does not match its fields (expected {expected}); the entry was altered"
    )]
    BadHash {
        id: i64,
        expected: String,
        found: String,
    },
    #[error("worker {worker}: balance {balance} FLOP but its ledger entries sum to {sum} FLOP")]
    Balance { worker: u64, balance: i64, sum: i64 },
    #[error("worker {worker}: {accepted} accepted results cached but {entries} ledger entries")]
    Count {
        worker: u64,
        accepted: i64,
        entries: i64,
    },
}

/// What a verified ledger holds.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Report {
    pub entries: usize,
    pub workers: usize,
    pub total_flops: i64,
    /// Hash of the last entry ([`GENESIS`] when empty).
    pub head: String,
}

/// Checks every link and hash in id order, then that each worker's cached balance and accepted count equal its
/// entries. Returns the first problem found.
pub fn verify(entries: &[Entry], balances: &[Balance]) -> Result<Report, LedgerError> {
    let mut prev = GENESIS.to_string();
    let mut sums: BTreeMap<u64, (i64, i64)> = BTreeMap::new();
    let mut total = 0i64;
    for e in entries {
        if e.prev_hash != prev {
            return Err(LedgerError::BrokenLink {
                id: e.id,
                expected: prev,
                found: e.prev_hash.clone(),
            });
        }
        let want = entry_hash(
            &e.prev_hash,
            e.id,
            e.worker,
            e.job,
            e.step,
            e.micro,
            e.flops,
            e.at_ms,
        );
        if e.hash != want {
            return Err(LedgerError::BadHash {
                id: e.id,
                expected: want,
                found: e.hash.clone(),
            });
        }
        let s = sums.entry(e.worker).or_default();
        s.0 += e.flops;
        // A clawback cancels the entry it compensates, in the count of accepted results as in the sum.
        s.1 += if e.flops < 0 { -1 } else { 1 };
        total += e.flops;
        prev = e.hash.clone();
    }
    for b in balances {
        let (sum, n) = sums.get(&b.worker).copied().unwrap_or_default();
        if sum != b.credits_flops {
            return Err(LedgerError::Balance {
                worker: b.worker,
                balance: b.credits_flops,
                sum,
            });
        }
        if n != b.accepted {
            return Err(LedgerError::Count {
                worker: b.worker,
                accepted: b.accepted,
                entries: n,
            });
        }
    }
    // Entries of a worker missing from the workers table would be credits nobody holds.
    if let Some((&w, &(sum, _))) = sums
        .iter()
        .find(|(w, _)| !balances.iter().any(|b| b.worker == **w))
    {
        return Err(LedgerError::Balance {
            worker: w,
            balance: 0,
            sum,
        });
    }
    Ok(Report {
        entries: entries.len(),
        workers: sums.len(),
        total_flops: total,
        head: prev,
    })
}

/// Convenience for callers that hold a [`WorkerId`].
pub fn balance(worker: WorkerId, credits_flops: i64, accepted: i64) -> Balance {
    Balance {
        worker: worker.0,
        credits_flops,
        accepted,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn chain(n: usize) -> Vec<Entry> {
        let mut prev = GENESIS.to_string();
        (0..n)
            .map(|i| {
                let (id, worker) = (i as i64 + 1, (i % 2) as u64 + 1);
                let hash = entry_hash(&prev, id, worker, 1, i as u64, 0, 100, 5);
                let e = Entry {
                    id,
                    worker,
                    job: 1,
                    step: i as u64,
                    micro: 0,
                    flops: 100,
                    at_ms: 5,
                    prev_hash: prev.clone(),
                    hash: hash.clone(),
                };
                prev = hash;
                e
            })
            .collect()
    }

    #[test]
    fn an_intact_chain_verifies_and_any_edit_is_found() {
        let entries = chain(5);
        let balances = [
            Balance {
                worker: 1,
                credits_flops: 300,
                accepted: 3,
            },
            Balance {
                worker: 2,
                credits_flops: 200,
                accepted: 2,
            },
        ];
        let report = verify(&entries, &balances).unwrap();
        assert_eq!((report.entries, report.total_flops), (5, 500));
        assert_eq!(report.head, entries[4].hash);

        let mut edited = entries.clone();
        edited[2].flops = 1_000_000;
        assert!(matches!(
            verify(&edited, &balances),
            Err(LedgerError::BadHash { id: 3, .. })
        ));
        let mut dropped = entries.clone();
        dropped.remove(1);
        assert!(matches!(
            verify(&dropped, &balances),
            Err(LedgerError::BrokenLink { id: 3, .. })
        ));
        let inflated = [
            Balance {
                worker: 1,
                credits_flops: 301,
                accepted: 3,
            },
            balances[1],
        ];
        assert!(matches!(
            verify(&entries, &inflated),
            Err(LedgerError::Balance { worker: 1, .. })
        ));
        assert_eq!(verify(&[], &[]).unwrap().head, GENESIS);
    }
}
