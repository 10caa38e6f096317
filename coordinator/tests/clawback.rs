//! Clawbacks against a real SQLite store: a compensating entry joins the hash chain, the worker's cached balance
//! and accepted count follow it, `ledger verify` still passes, and a credit cannot be taken back twice.

use starling_coordinator::store::{Credit, Fence, Store};
use starling_core::protocol::JobId;

#[tokio::test]
async fn a_clawback_is_a_verifiable_compensating_entry_taken_once() -> anyhow::Result<()> {
    let dir = std::env::temp_dir().join(format!("starling-clawback-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    let path = dir.join("ledger.db");
    let _ = std::fs::remove_file(&path);
    let store = Store::open(&path).await?;
    let w = store.create_worker("hash-of-a-token", Some("w")).await?.id;
    // SQLite: one node, the leader of every job at epoch 0.
    let (job, step) = (
        Fence {
            job: JobId(1),
            epoch: 0,
        },
        3,
    );
    for micro in [0, 1] {
        store
            .save_credit(
                job,
                step,
                micro,
                Credit {
                    worker: w,
                    flops: 700,
                },
            )
            .await?;
    }
    store
        .claw_back(
            job,
            step,
            1,
            Credit {
                worker: w,
                flops: 700,
            },
        )
        .await?;
    // A second clawback of the same credit, and one of a credit never granted, change nothing.
    store
        .claw_back(
            job,
            step,
            1,
            Credit {
                worker: w,
                flops: 700,
            },
        )
        .await?;
    store
        .claw_back(
            job,
            step,
            9,
            Credit {
                worker: w,
                flops: 700,
            },
        )
        .await?;
    let entries = store.ledger(Some(w)).await?;
    let flops: Vec<i64> = entries.iter().map(|e| e.flops).collect();
    assert_eq!(flops, vec![700, 700, -700]);
    assert_eq!(entries[2].micro, 1 | starling_coordinator::ledger::CLAWBACK);
    let row = store
        .workers()
        .await?
        .into_iter()
        .find(|r| r.id == w)
        .expect("worker");
    assert_eq!((row.credits_flops, row.accepted), (700, 1));
    let report = store
        .verify_ledger()
        .await?
        .map_err(|e| anyhow::anyhow!("{e}"))?;
    assert_eq!((report.entries, report.total_flops), (3, 700));
    std::fs::remove_dir_all(&dir)?;
    Ok(())
}
