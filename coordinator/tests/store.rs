//! One store test suite, run against both engines: SQLite (a file) and PostgreSQL (a throwaway server started here,
//! see `pg/mod.rs`). Every case gets a fresh database. The PostgreSQL run adds the cases only several nodes need:
//! fencing by the leader epoch, the advisory-lock leadership and its lease, concurrent ledger appends.

mod pg;

use std::future::Future;
use std::pin::Pin;
use std::time::Duration;

use anyhow::{Context as _, ensure};
use starling_coordinator::store::{
    AcceptedRow, Checkpoint, Credit, Engine, Fence, MetricRow, Store, StoreError,
};
use starling_core::data::Dataset;
use starling_core::protocol::JobId;

type Case = fn(Store) -> Pin<Box<dyn Future<Output = anyhow::Result<()>> + Send>>;

macro_rules! cases {
    ($($name:ident),* $(,)?) => {
        &[$((stringify!($name), |s| Box::pin($name(s)))),*]
    };
}

/// The cases every engine must pass, alike.
const COMMON: &[(&str, Case)] = cases![
    datasets_and_jobs_round_trip,
    dataset_visibility_follows_its_owner,
    checkpoints_only_move_forward,
    accepted_results_are_written_once_with_their_credits,
    the_ledger_chains_grants_and_clawbacks,
    metrics_and_best_checkpoints,
    workers_and_owners,
    the_leadership_of_one_node,
];

/// Cases only a shared PostgreSQL database has.
const POSTGRES: &[(&str, Case)] = cases![
    a_write_with_a_stale_epoch_is_fenced_and_leaves_nothing,
    one_session_holds_a_job_lock_until_it_ends,
    a_silent_session_loses_its_locks_after_the_lease,
    concurrent_ledger_appends_from_two_nodes_keep_one_chain,
    the_node_registry_keeps_live_nodes,
];

#[tokio::test]
async fn the_store_suite_on_sqlite() -> anyhow::Result<()> {
    let dir = std::env::temp_dir().join(format!("starling-store-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    for (i, (name, case)) in COMMON.iter().enumerate() {
        let path = dir.join(format!("{i}.db"));
        let _ = std::fs::remove_file(&path);
        let store = Store::open(&path).await?;
        assert_eq!(store.engine(), Engine::Sqlite);
        case(store)
            .await
            .with_context(|| format!("sqlite: {name}"))?;
        // Reopening applies no migration twice.
        Store::open(&path)
            .await
            .with_context(|| format!("sqlite: reopen after {name}"))?;
    }
    let _ = std::fs::remove_dir_all(&dir);
    Ok(())
}

#[tokio::test]
async fn the_store_suite_on_postgres() -> anyhow::Result<()> {
    let Some(server) = pg::PgServer::start("store") else {
        return Ok(());
    };
    for (i, (name, case)) in COMMON.iter().chain(POSTGRES).enumerate() {
        let url = server.create_db(&format!("case{i}"))?;
        let store = Store::open_postgres(&url, Duration::from_secs(5)).await?;
        assert_eq!(store.engine(), Engine::Postgres);
        case(store.clone())
            .await
            .with_context(|| format!("postgres: {name}"))?;
        store.close().await;
        let again = Store::connect(&url)
            .await
            .with_context(|| format!("postgres: reopen after {name}"))?;
        again.close().await;
    }
    Ok(())
}

fn dataset(rows: usize, dim: usize, seed: f32) -> Dataset {
    let features = (0..rows * dim).map(|i| i as f32 * 0.5 + seed).collect();
    let labels = (0..rows).map(|i| (i % 3) as u32).collect();
    Dataset::new(features, labels, dim).expect("dataset")
}

/// A job with a dataset, and the fence its (only) leader writes with: epoch 0 on SQLite, the first claim on
/// PostgreSQL.
async fn job(store: &Store) -> anyhow::Result<Fence> {
    let ds = store
        .insert_dataset("d", &dataset(6, 2, 0.0), &dataset(3, 2, 1.0), None)
        .await?;
    let job = store.insert_job("j", "{}", "{}", ds, None).await?;
    let epoch = store.claim_job(job, "n1").await?;
    Ok(Fence { job, epoch })
}

fn metric(step: u64, kind: &str, loss: f32, accuracy: f32) -> MetricRow {
    MetricRow {
        step,
        kind: kind.into(),
        loss,
        accuracy,
        min_agreeing: 2,
        at_ms: 7,
    }
}

fn accepted(micro: u32, grad: Vec<f32>) -> AcceptedRow {
    AcceptedRow {
        micro,
        rows: 4,
        loss: 0.1 + micro as f32 / 3.0,
        correct: 3,
        agreeing: 2,
        grad,
    }
}

async fn datasets_and_jobs_round_trip(store: Store) -> anyhow::Result<()> {
    let (train, test) = (dataset(10, 3, 0.25), dataset(4, 3, 9.0));
    let id = store.insert_dataset("mine", &train, &test, Some(5)).await?;
    let (back_train, back_test) = store.load_dataset(id).await?;
    ensure!(back_train.features == train.features && back_train.labels == train.labels);
    ensure!(back_test.features == test.features && back_test.dim == 3);
    let listed = store.owner_datasets(5).await?;
    ensure!(listed.len() == 1 && listed[0].train_rows == 10 && listed[0].test_rows == 4);
    let job = store
        .insert_job("j", "{\"spec\":1}", "{\"h\":2}", id, Some(5))
        .await?;
    let jobs = store.jobs().await?;
    ensure!(jobs.len() == 1 && jobs[0].id == job && jobs[0].status == "running");
    ensure!(jobs[0].owner == Some(5) && jobs[0].spec == "{\"spec\":1}" && jobs[0].dataset_id == id);
    let fence = Fence {
        job,
        epoch: store.claim_job(job, "n1").await?,
    };
    store.set_job_status(fence, "paused").await?;
    ensure!(store.jobs().await?[0].status == "paused");
    Ok(())
}

async fn dataset_visibility_follows_its_owner(store: Store) -> anyhow::Result<()> {
    let shared = store
        .insert_dataset("shared", &dataset(5, 2, 0.0), &dataset(2, 2, 0.0), None)
        .await?;
    let owned = store
        .insert_dataset("owned", &dataset(5, 2, 0.0), &dataset(2, 2, 0.0), Some(1))
        .await?;
    ensure!(store.dataset_exists(shared, None).await? == Some((2, 5, 2)));
    ensure!(store.dataset_exists(shared, Some(9)).await?.is_some());
    ensure!(store.dataset_exists(owned, Some(1)).await? == Some((2, 5, 2)));
    ensure!(store.dataset_exists(owned, Some(2)).await?.is_none());
    ensure!(store.dataset_exists(owned, None).await?.is_none());
    ensure!(store.owner_datasets(2).await?.is_empty());
    Ok(())
}

async fn checkpoints_only_move_forward(store: Store) -> anyhow::Result<()> {
    let fence = job(&store).await?;
    ensure!(store.load_checkpoint(fence.job).await?.is_none());
    let ckpt = |step, v: f32| Checkpoint {
        step,
        params: vec![v; 5],
        optim: vec![step as u8; 3],
    };
    store
        .save_checkpoint(fence, &ckpt(2, 1.5), &metric(2, "train", 0.5, 0.4))
        .await?;
    // An older checkpoint never replaces a newer one.
    store
        .save_checkpoint(fence, &ckpt(1, 9.0), &metric(1, "train", 0.9, 0.1))
        .await?;
    let back = store
        .load_checkpoint(fence.job)
        .await?
        .context("checkpoint")?;
    ensure!(back.step == 2 && back.params == vec![1.5; 5] && back.optim == vec![2u8; 3]);
    store
        .save_checkpoint(fence, &ckpt(3, -2.0), &metric(3, "train", 0.3, 0.6))
        .await?;
    ensure!(
        store
            .load_checkpoint(fence.job)
            .await?
            .context("ckpt")?
            .step
            == 3
    );
    Ok(())
}

async fn accepted_results_are_written_once_with_their_credits(store: Store) -> anyhow::Result<()> {
    let fence = job(&store).await?;
    let a = store.create_worker("ta", Some("a")).await?.id;
    let b = store.create_worker("tb", None).await?.id;
    let credits = [
        Credit {
            worker: a,
            flops: 100,
        },
        Credit {
            worker: b,
            flops: 100,
        },
    ];
    let grad = vec![0.25, -1.0, f32::MIN_POSITIVE, 3.0e-7];
    store
        .save_accepted(fence, 4, &accepted(1, grad.clone()), &credits)
        .await?;
    // The same micro-batch again (a retried write, a second replica) changes nothing: no credit is doubled.
    store
        .save_accepted(fence, 4, &accepted(1, vec![9.0; 4]), &credits)
        .await?;
    store
        .save_accepted(fence, 4, &accepted(0, vec![1.0; 4]), &credits[..1])
        .await?;
    let rows = store.load_accepted(fence.job, 4).await?;
    ensure!(rows.len() == 2 && rows[0].micro == 0 && rows[1].micro == 1);
    ensure!(rows[1].grad == grad, "gradients round-trip bit for bit");
    ensure!(rows[1].loss == 0.1 + 1.0 / 3.0 && rows[1].rows == 4 && rows[1].agreeing == 2);
    let workers = store.workers().await?;
    let balance = |w| {
        workers
            .iter()
            .find(|r| r.id == w)
            .map(|r| (r.credits_flops, r.accepted))
    };
    ensure!(balance(a) == Some((200, 2)) && balance(b) == Some((100, 1)));
    // The step's checkpoint drops its accepted results.
    let ckpt = Checkpoint {
        step: 5,
        params: vec![0.0; 2],
        optim: vec![],
    };
    store
        .save_checkpoint(fence, &ckpt, &metric(5, "train", 0.1, 0.9))
        .await?;
    ensure!(store.load_accepted(fence.job, 4).await?.is_empty());
    Ok(())
}

async fn the_ledger_chains_grants_and_clawbacks(store: Store) -> anyhow::Result<()> {
    let fence = job(&store).await?;
    let w = store.create_worker("tw", Some("w")).await?.id;
    let credit = Credit {
        worker: w,
        flops: 700,
    };
    for micro in 0..3 {
        store.save_credit(fence, 1, micro, credit).await?;
    }
    store.save_credit(fence, 1, 0, credit).await?;
    store.claw_back(fence, 1, 2, credit).await?;
    store.claw_back(fence, 1, 2, credit).await?;
    let report = store
        .verify_ledger()
        .await?
        .map_err(|e| anyhow::anyhow!("ledger: {e}"))?;
    ensure!(
        report.entries == 4 && report.total_flops == 1400,
        "{report:?}"
    );
    ensure!(store.credit_entries().await? == vec![(w, 4, 1400)]);
    let entries = store.ledger(Some(w)).await?;
    ensure!(
        entries.iter().map(|e| e.id).eq(1..=4),
        "ids are the chain's positions"
    );
    ensure!(store.ledger_head().await? == entries[3].hash);
    Ok(())
}

async fn metrics_and_best_checkpoints(store: Store) -> anyhow::Result<()> {
    let fence = job(&store).await?;
    store
        .insert_eval(fence, &metric(10, "eval", 0.5, 0.75))
        .await?;
    // The same (step, kind) again replaces the point.
    store
        .insert_eval(fence, &metric(10, "eval", 0.4, 0.8))
        .await?;
    store
        .insert_eval(fence, &metric(20, "eval", 0.3, 0.9))
        .await?;
    let m = store.metrics(fence.job).await?;
    ensure!(m.len() == 2 && m[0].step == 10 && m[0].loss == 0.4 && m[0].accuracy == 0.8);
    ensure!(m[1].kind == "eval" && m[1].min_agreeing == 2 && m[1].at_ms == 7);
    let best = |step, accuracy, params: &[f32]| {
        Some(starling_coordinator::store::BestCheckpoint {
            step,
            accuracy,
            loss: None,
            params: params.to_vec(),
        })
    };
    store.save_best(fence, 10, (0.8, None), &[1.0, 2.0]).await?;
    store.save_best(fence, 11, (0.7, None), &[3.0, 4.0]).await?;
    ensure!(store.load_best(fence.job).await? == best(10, 0.8, &[1.0, 2.0]));
    store.save_best(fence, 20, (0.9, None), &[5.0]).await?;
    ensure!(store.load_best(fence.job).await? == best(20, 0.9, &[5.0]));
    // A language model's best is its lowest held-out loss, whatever its accuracy does.
    let lm = job(&store).await?;
    let by_loss = |step, accuracy, loss, params: &[f32]| {
        Some(starling_coordinator::store::BestCheckpoint {
            step,
            accuracy,
            loss: Some(loss),
            params: params.to_vec(),
        })
    };
    store.save_best(lm, 10, (0.3, Some(2.0)), &[1.0]).await?;
    store.save_best(lm, 20, (0.4, Some(2.5)), &[2.0]).await?;
    ensure!(store.load_best(lm.job).await? == by_loss(10, 0.3, 2.0, &[1.0]));
    store.save_best(lm, 30, (0.2, Some(1.5)), &[3.0]).await?;
    ensure!(store.load_best(lm.job).await? == by_loss(30, 0.2, 1.5, &[3.0]));
    Ok(())
}

async fn workers_and_owners(store: Store) -> anyhow::Result<()> {
    let w = store.create_worker("hash-1", Some("alice")).await?;
    ensure!(store.worker_by_token_hash("hash-1").await?.map(|r| r.id) == Some(w.id));
    ensure!(store.worker_by_token_hash("nope").await?.is_none());
    ensure!(
        store.create_worker("hash-1", None).await.is_err(),
        "token hashes are unique"
    );
    store.record_rejection(w.id, false).await?;
    store.record_rejection(w.id, true).await?;
    // Refusal is sticky: a later strike without it does not lift it.
    store.record_rejection(w.id, false).await?;
    let row = store
        .worker_by_token_hash("hash-1")
        .await?
        .context("worker")?;
    ensure!(row.rejected == 3 && row.strikes == 3 && row.refused);
    let o = store.create_owner("ann", "oh").await?;
    ensure!(store.owner_by_token_hash("oh").await? == Some(o.clone()));
    ensure!(store.owner_by_name("ann").await? == Some(o.clone()));
    ensure!(store.owner_name(o.id).await?.as_deref() == Some("ann"));
    ensure!(
        store.create_owner("ann", "other").await.is_err(),
        "owner names are unique"
    );
    Ok(())
}

/// SQLite: one node, the leader of every job at epoch 0; PostgreSQL: claims count up and the registry works.
async fn the_leadership_of_one_node(store: Store) -> anyhow::Result<()> {
    let fence = job(&store).await?;
    let leaders = store.leaders().await?;
    ensure!(leaders.len() == 1 && leaders[0].job == fence.job && leaders[0].status == "running");
    match store.engine() {
        Engine::Sqlite => {
            ensure!(fence.epoch == 0 && leaders[0].epoch == 0 && leaders[0].node.is_none());
            ensure!(store.leadership(Duration::from_secs(1)).await.is_err());
            store.heartbeat("n1", "http://x").await?;
            ensure!(store.live_nodes(Duration::from_secs(5)).await?.is_empty());
        }
        Engine::Postgres => {
            ensure!(fence.epoch == 1 && leaders[0].epoch == 1);
            ensure!(leaders[0].node.as_deref() == Some("n1"));
        }
    }
    Ok(())
}

async fn a_write_with_a_stale_epoch_is_fenced_and_leaves_nothing(
    store: Store,
) -> anyhow::Result<()> {
    let old = job(&store).await?;
    let w = store.create_worker("tw", None).await?.id;
    let credit = Credit {
        worker: w,
        flops: 50,
    };
    store.save_credit(old, 0, 0, credit).await?;
    let new = Fence {
        job: old.job,
        epoch: store.claim_job(old.job, "n2").await?,
    };
    ensure!(new.epoch == old.epoch + 1);
    let fenced = |r: Result<(), StoreError>| matches!(r, Err(StoreError::Fenced { epoch, current, .. }) if epoch == old.epoch && current == new.epoch);
    ensure!(fenced(store.save_credit(old, 0, 1, credit).await));
    ensure!(fenced(
        store
            .save_accepted(old, 0, &accepted(2, vec![1.0]), &[credit])
            .await
    ));
    let ckpt = Checkpoint {
        step: 1,
        params: vec![1.0],
        optim: vec![],
    };
    ensure!(fenced(
        store
            .save_checkpoint(old, &ckpt, &metric(1, "train", 0.1, 0.1))
            .await
    ));
    ensure!(fenced(store.set_job_status(old, "cancelled").await));
    ensure!(fenced(
        store.insert_eval(old, &metric(1, "eval", 0.1, 0.1)).await
    ));
    ensure!(fenced(store.save_best(old, 1, (0.5, None), &[1.0]).await));
    ensure!(fenced(store.claw_back(old, 0, 0, credit).await));
    // Nothing of the fenced writes landed; the new leader writes.
    ensure!(store.load_accepted(old.job, 0).await?.is_empty());
    ensure!(store.load_checkpoint(old.job).await?.is_none());
    ensure!(store.metrics(old.job).await?.is_empty() && store.load_best(old.job).await?.is_none());
    ensure!(store.jobs().await?[0].status == "running");
    ensure!(store.credit_entries().await? == vec![(w, 1, 50)]);
    store.save_credit(new, 0, 1, credit).await?;
    ensure!(store.credit_entries().await? == vec![(w, 2, 100)]);
    Ok(())
}

async fn one_session_holds_a_job_lock_until_it_ends(store: Store) -> anyhow::Result<()> {
    let fence = job(&store).await?;
    let mut a = store.leadership(Duration::from_secs(30)).await?;
    let mut b = store.leadership(Duration::from_secs(30)).await?;
    ensure!(a.try_lock(fence.job).await?);
    ensure!(
        !b.try_lock(fence.job).await?,
        "a held lock is not granted twice"
    );
    ensure!(
        b.try_lock(JobId(fence.job.0 + 1)).await?,
        "locks are per job"
    );
    a.unlock(fence.job).await?;
    ensure!(b.try_lock(fence.job).await?);
    ensure!(!a.try_lock(fence.job).await?);
    // The session ending (a node dying) releases its locks.
    drop(b);
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while !a.try_lock(fence.job).await? {
        ensure!(
            std::time::Instant::now() < deadline,
            "a dead session's lock was never released"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    Ok(())
}

async fn a_silent_session_loses_its_locks_after_the_lease(store: Store) -> anyhow::Result<()> {
    let fence = job(&store).await?;
    let lease = Duration::from_millis(600);
    let mut paused = store.leadership(lease).await?;
    let mut other = store.leadership(Duration::from_secs(30)).await?;
    ensure!(paused.try_lock(fence.job).await?);
    // Pinging keeps it: after more than a lease of pings the lock is still held.
    for _ in 0..8 {
        tokio::time::sleep(lease / 4).await;
        paused.ping().await?;
    }
    ensure!(!other.try_lock(fence.job).await?);
    // Silent for longer than the lease (a SIGSTOPped node): the server ends the session and the lock is free.
    tokio::time::sleep(lease * 3).await;
    ensure!(
        other.try_lock(fence.job).await?,
        "the silent session's lock was not released"
    );
    ensure!(
        paused.ping().await.is_err(),
        "the silent session was ended by the server"
    );
    Ok(())
}

async fn concurrent_ledger_appends_from_two_nodes_keep_one_chain(
    store: Store,
) -> anyhow::Result<()> {
    let url = store.url().context("postgres url")?.to_string();
    let other = Store::connect(&url).await?;
    let f1 = job(&store).await?;
    let f2 = job(&other).await?;
    let w = store.create_worker("tw", None).await?.id;
    let run = |s: Store, f: Fence| async move {
        for micro in 0..40 {
            s.save_credit(
                f,
                0,
                micro,
                Credit {
                    worker: w,
                    flops: 3,
                },
            )
            .await?;
        }
        anyhow::Ok(())
    };
    let (a, b) = tokio::join!(
        tokio::spawn(run(store.clone(), f1)),
        tokio::spawn(run(other.clone(), f2))
    );
    a??;
    b??;
    let report = store
        .verify_ledger()
        .await?
        .map_err(|e| anyhow::anyhow!("ledger: {e}"))?;
    ensure!(
        report.entries == 80 && report.total_flops == 240,
        "{report:?}"
    );
    other.close().await;
    Ok(())
}

async fn the_node_registry_keeps_live_nodes(store: Store) -> anyhow::Result<()> {
    store.heartbeat("b", "http://127.0.0.1:2").await?;
    store.heartbeat("a", "http://127.0.0.1:1").await?;
    store.heartbeat("a", "http://127.0.0.1:3").await?;
    let live = store.live_nodes(Duration::from_secs(5)).await?;
    ensure!(
        live.len() == 2 && live[0].node_id == "a" && live[0].public_url == "http://127.0.0.1:3"
    );
    tokio::time::sleep(Duration::from_millis(300)).await;
    store.heartbeat("b", "http://127.0.0.1:2").await?;
    let live = store.live_nodes(Duration::from_millis(200)).await?;
    ensure!(
        live.len() == 1 && live[0].node_id == "b",
        "a silent node is not live"
    );
    Ok(())
}
