//! Per-job counters since the coordinator started, and the step-duration histogram (persistent figures come from
//! the database).

/// Counters of one job since the coordinator started. Every field is served by `/metrics` and the job view.
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct JobCounters {
    pub leases_issued: u64,
    pub leases_expired: u64,
    pub speculative_leases: u64,
    pub results_accepted: u64,
    pub results_rejected: u64,
    /// Results answered `late`: expired, foreign or superseded leases, micro-batches already abandoned, and near
    /// misses (also counted in `near_misses`).
    pub results_late: u64,
    pub results_failed: u64,
    /// Results within the near-miss band of a recomputation: not used, not credited, not struck (three in a row
    /// are a strike).
    pub near_misses: u64,
    pub disagreements: u64,
    /// Micro-batches that reached their step's model, and those of them whose accepted result is the
    /// coordinator's own recomputation (only near misses agreed with it; nobody was credited).
    pub micro_batches_accepted: u64,
    pub micro_batches_by_coordinator: u64,
    pub micro_batches_abandoned: u64,
    /// Trusted results recomputed by the coordinator instead of replicated, and how many of those disagreed.
    pub spot_checks: u64,
    pub spot_check_failures: u64,
    /// Disagreements settled by the coordinator's own recomputation.
    pub arbitrations: u64,
    /// Random audits of replica-accepted micro-batches requested, and how many found the accepted result wrong
    /// (each refused its vouchers and clawed back their credits).
    pub audits: u64,
    pub audit_failures: u64,
    /// Audited mode: audits leased to a trusted worker on another subnet, audits the coordinator ran because no
    /// such worker was online, audits passed, and audits whose auditor disagreed (settled by the coordinator's
    /// recomputation).
    pub audit_leases: u64,
    pub audits_by_coordinator: u64,
    pub audits_passed: u64,
    pub audit_disputes: u64,
    /// Accepted results of workers a failed audit refused that were struck out before their step was applied.
    pub results_struck_out: u64,
    /// The verification budget in rows: rows of accepted units (useful compute), rows of every valid result
    /// workers computed (replicas and audits included), rows the coordinator recomputed. Total verification
    /// compute over useful compute is `(rows_computed + rows_recomputed − rows_accepted) / rows_accepted`.
    pub rows_accepted: u64,
    pub rows_computed: u64,
    pub rows_recomputed: u64,
    pub steps_applied: u64,
    /// `local` elastic rounds: shards added beyond a round's base shards, verified deltas applied one or more
    /// rounds after their base version, and shards dropped at a round's close (beyond `staleness`, or not fully
    /// leased), whose results are late.
    pub elastic_shards: u64,
    pub stale_deltas_applied: u64,
    pub shards_dropped_stale: u64,
}

/// A Prometheus-style cumulative histogram of seconds.
#[derive(Debug, Clone)]
pub struct Histogram {
    pub bounds: Vec<f64>,
    /// Observations ≤ each bound (cumulative), then the total count and sum.
    pub counts: Vec<u64>,
    pub count: u64,
    pub sum: f64,
}

impl Default for Histogram {
    fn default() -> Self {
        let bounds = vec![
            0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
        ];
        Self {
            counts: vec![0; bounds.len()],
            bounds,
            count: 0,
            sum: 0.0,
        }
    }
}

impl Histogram {
    pub fn observe(&mut self, v: f64) {
        for (b, c) in self.bounds.iter().zip(self.counts.iter_mut()) {
            if v <= *b {
                *c += 1;
            }
        }
        self.count += 1;
        self.sum += v;
    }
}
