//! The Starling coordinator: leases micro-batches to volunteers over WebSocket, verifies redundant results,
//! aggregates verified gradients and advances each job's model. Never needs a GPU.
#![forbid(unsafe_code)]

pub mod aggregate; // Robust aggregation of accepted gradients (mean, trimmed mean, median, clipping).
pub mod cluster; // Several nodes on PostgreSQL: per-job leadership, fencing, failover, the node registry.
pub mod config; // The server's configuration (`starling serve` flags), validated once.
pub mod demo; // The built-in demo jobs: specs, schedules, creation and reruns.
pub mod examples; // A job's examples: dataset rows, or a token stream's windows (language models).
pub mod export; // Checkpoints as safetensors.
pub mod http; // REST API under /api/v1, static files, the router.
pub mod job; // Job hyperparameters, defaults and limits.
pub mod ledger; // The credit ledger's hash chain and its verification.
pub mod live; // Live views: the job event stream (SSE) and Prometheus metrics.
pub mod origin; // The partner-origin allow-list: who may embed the widget and open browser sockets.
pub mod scheduler; // In-memory jobs, leases, verification outcomes, aggregation.
pub mod store; // Persistence on SQLite or PostgreSQL (the only module that writes SQL).
pub mod verify; // When two results agree; which result wins.
pub mod ws; // The worker WebSocket endpoint.

use std::collections::BTreeSet;
use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use anyhow::Context as _;
use tokio::net::TcpListener;
use tokio::sync::watch;

use starling_core::ModelSpec;
use starling_core::cpu::CpuEngine;
use starling_core::protocol::JobId;

use crate::config::ServeConfig;
use crate::job::{Hyper, JobStatus};
use crate::scheduler::{
    Action, Deferred, Effects, EvalTask, JobLoad, SchedulerConfig, State, StoreOp, WorkerInfo,
};
use crate::store::Store;

use crate::demo::rerun_demo;
pub use crate::demo::{
    DEMO_CNN_JOB, DEMO_JOB, DEMO_LM_JOB, DEMO_OWNER, demo_cnn_hyper, demo_cnn_spec, demo_hyper,
    demo_lm_hyper, demo_lm_spec, ensure_demo_cnn_job, ensure_demo_job, ensure_demo_lm_job,
};

/// Shared application state: the scheduler, the store and the configuration.
#[derive(Debug)]
pub struct App {
    state: Mutex<State>,
    pub store: Store,
    pub config: ServeConfig,
    /// Flips to `true` when the coordinator shuts down, so WebSocket tasks close their connections.
    pub shutdown: watch::Receiver<bool>,
    /// Open worker connections per remote address (`--max-conns-per-addr`).
    pub per_addr: ws::AddrCounts,
    /// Serialises durable writes, so that recovery from a failed write finishes before any later write is tried.
    write_gate: tokio::sync::Mutex<()>,
    /// Job ids whose visible state changed; live views (SSE) subscribe.
    pub events: tokio::sync::broadcast::Sender<JobId>,
    /// Which jobs this node leads (all of them on SQLite) and where the others are led.
    pub cluster: cluster::Cluster,
}

impl App {
    /// Locks the scheduler state. A poisoned lock (a panic while holding it) is recovered: every handler leaves
    /// the state consistent between statements that could panic, and one bad request must not stop the service.
    pub fn state(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Carries out effects: the store operations in order, then every action whose preceding writes are all
    /// durable. If a write fails, the rest are not attempted, nothing that reports on them is sent (no verdict,
    /// credit, lease or step), and the jobs concerned are paused with the error and reloaded from the store.
    ///
    /// Writes are serialised by `write_gate`, and a failure's recovery runs before the gate is released. Effects
    /// computed before a job was halted are stale for that job (their in-memory premises were rolled back): their
    /// first write for it is treated as failed, so a queued write can never land after the reload it contradicts.
    pub async fn apply(self: &Arc<Self>, fx: Effects) {
        let Effects {
            store,
            later,
            epoch,
        } = fx;
        let mut failure: Option<(usize, Option<store::StoreError>)> = None;
        let gate = if store.is_empty() {
            None
        } else {
            Some(self.write_gate.lock().await)
        };
        for (i, op) in store.iter().enumerate() {
            if let Some(job) = op.job()
                && !self.cluster.leads(job)
            {
                // Led elsewhere now: the write would be fenced; do not even try it.
                failure = Some((
                    i,
                    Some(store::StoreError::Fenced {
                        job,
                        epoch: 0,
                        current: 0,
                    }),
                ));
                break;
            }
            if op.job().is_some_and(|j| self.state().stale(j, epoch)) {
                failure = Some((i, None));
                break;
            }
            if let Err(e) = self.write(op).await {
                failure = Some((i, Some(e)));
                break;
            }
        }
        let durable = failure.as_ref().map_or(store.len(), |(i, _)| *i);
        let (go, withheld) = Effects::split(later, durable);
        if let Some((i, e)) = failure {
            self.recover(&store[i..], &withheld, e.as_ref()).await;
        }
        drop(gate);
        for action in go {
            match action {
                Action::Send { conn, out, .. } => self.state().send(conn, out),
                // No subscribers is normal.
                Action::Notify(job) => drop(self.events.send(job)),
                Action::Eval(task) => drop(tokio::spawn(evaluate(self.clone(), task))),
                Action::Recompute(r) => drop(tokio::spawn(recompute(self.clone(), r))),
            }
        }
    }

    async fn write(&self, op: &StoreOp) -> Result<(), store::StoreError> {
        let fence = |job: JobId| {
            self.cluster.fence(job).ok_or(store::StoreError::Fenced {
                job,
                epoch: 0,
                current: 0,
            })
        };
        match op {
            StoreOp::Accepted {
                job,
                step,
                row,
                credits,
            } => {
                self.store
                    .save_accepted(fence(*job)?, *step, row, credits)
                    .await
            }
            StoreOp::Credit {
                job,
                step,
                micro,
                credit,
            } => {
                self.store
                    .save_credit(fence(*job)?, *step, *micro, *credit)
                    .await
            }
            StoreOp::Clawback {
                job,
                step,
                micro,
                credit,
            } => {
                self.store
                    .claw_back(fence(*job)?, *step, *micro, *credit)
                    .await
            }
            StoreOp::Rejection { worker, refused } => {
                self.store.record_rejection(*worker, *refused).await
            }
            StoreOp::Checkpoint { job, ckpt, train } => {
                self.store.save_checkpoint(fence(*job)?, ckpt, train).await
            }
            StoreOp::Status { job, status } => {
                self.store
                    .set_job_status(fence(*job)?, status.as_str())
                    .await
            }
            StoreOp::Eval { job, metric } => self.store.insert_eval(fence(*job)?, metric).await,
        }
    }

    /// After a failed write: halts the jobs whose writes or announcements were lost, then brings them and every
    /// worker's standing back from the store, so memory again equals what is durable.
    /// `error: None`: the effects were stale (computed before a halt of their job), not failed.
    async fn recover(
        &self,
        lost: &[StoreOp],
        withheld: &[Deferred],
        error: Option<&store::StoreError>,
    ) {
        let jobs: BTreeSet<JobId> = lost
            .iter()
            .filter_map(StoreOp::job)
            .chain(withheld.iter().filter_map(|d| d.job))
            .collect();
        if let Some(store::StoreError::Fenced { .. }) = error {
            // Another node leads these jobs now: nothing to pause or reload here; their state is its to load.
            tracing::warn!(jobs = ?jobs, "a write was fenced: another node took the job over; unloading it");
            self.state().halt(&jobs, withheld, None);
            for job in jobs {
                cluster::lose(self, job);
            }
            return;
        }
        let message = error.map(|e| {
            format!("a durable write failed ({e}); the job is paused until its owner resumes it")
        });
        match error {
            Some(e) => {
                tracing::error!(error = %e, jobs = ?jobs, "persisting scheduler effects failed; nothing they report was sent")
            }
            None => {
                tracing::warn!(jobs = ?jobs, "effects computed before their job was halted were dropped unwritten")
            }
        }
        // Stale effects are not a failure: the job keeps the status it has now (its owner may have resumed it since
        // the halt that made these effects stale), though it is held paused while its durable state reloads.
        let keep: Vec<(JobId, JobStatus)> = if error.is_none() {
            let st = self.state();
            jobs.iter()
                .filter_map(|id| st.job(*id).map(|j| (*id, j.status)))
                .collect()
        } else {
            Vec::new()
        };
        self.state().halt(&jobs, withheld, message.as_deref());
        for id in jobs {
            if !self.cluster.leads(id) {
                // Lost meanwhile (its leadership session ended too): its state is the new leader's to load.
                cluster::lose(self, id);
                continue;
            }
            match load_job(&self.store, id).await {
                Ok(Some(load)) => {
                    let mut st = self.state();
                    if !self.cluster.leads(id) {
                        // Lost while it loaded (the heartbeat found the session gone and unloaded it): putting it
                        // back would serve, and list, a job another node leads.
                        continue;
                    }
                    st.reload_job(load);
                    if let Some((_, status)) = keep.iter().find(|(j, _)| *j == id) {
                        st.keep_status(id, *status);
                    }
                }
                Ok(None) => {}
                Err(e) => {
                    tracing::error!(job = %id, error = %e, "reloading the job after a failed write failed; it stays paused")
                }
            }
        }
        match self.store.workers().await {
            Ok(rows) => {
                let mut st = self.state();
                for w in rows {
                    st.set_worker(w.id, worker_info(&w));
                }
            }
            Err(e) => tracing::error!(error = %e, "reloading workers after a failed write failed"),
        }
    }
}

/// Evaluates a model version on the held-out set with the CPU backend, off the async threads. Boxed because it
/// calls back into [`App::apply`], which spawns it.
fn evaluate(app: Arc<App>, task: EvalTask) -> Pin<Box<dyn Future<Output = ()> + Send>> {
    Box::pin(async move {
        let EvalTask {
            job,
            step,
            spec,
            params,
            test,
        } = task;
        let for_eval = params.clone();
        // A language model's best version is its lowest held-out loss, a classifier's its highest accuracy.
        let by_loss = spec.token_vocab().is_some();
        let out = tokio::task::spawn_blocking(move || {
            let mut engine = CpuEngine::new(spec);
            engine.load(&for_eval)?;
            let (x, labels) = test.eval_batch();
            engine.evaluate(&x, &labels)
        })
        .await;
        match out {
            Ok(Ok(eval)) => {
                // Keep the best version's weights for download (the store keeps only an improvement).
                let saved = match app.cluster.fence(job) {
                    Some(fence) => {
                        app.store
                            .save_best(
                                fence,
                                step,
                                (eval.accuracy(), by_loss.then_some(eval.loss)),
                                &params,
                            )
                            .await
                    }
                    None => return,
                };
                if let Err(e) = saved {
                    tracing::error!(%job, error = %e, "saving the best checkpoint failed");
                }
                let fx = app.state().evaluated(job, step, eval);
                app.apply(fx).await;
            }
            Ok(Err(e)) => tracing::error!(%job, error = %e, "evaluation failed"),
            Err(e) => tracing::error!(%job, error = %e, "evaluation task panicked"),
        }
    })
}

/// Creates an owner and returns its API token (shown once; only its hash is stored).
pub async fn create_owner(store: &Store, name: &str) -> anyhow::Result<String> {
    let name = name.trim();
    anyhow::ensure!(
        !name.is_empty() && name.len() <= 64,
        "an owner name must be 1 to 64 characters"
    );
    anyhow::ensure!(
        store.owner_by_name(name).await?.is_none(),
        "an owner named {name:?} already exists"
    );
    let token = format!("stk_{}", ws::new_token());
    store.create_owner(name, &ws::token_hash(&token)).await?;
    Ok(token)
}

/// Recomputes a micro-batch with the CPU backend (a spot check or an arbitration), off the async threads and the
/// scheduler lock, and hands the reference to the scheduler. Boxed for the same reason as [`evaluate`].
fn recompute(app: Arc<App>, r: scheduler::Recompute) -> Pin<Box<dyn Future<Output = ()> + Send>> {
    Box::pin(async move {
        let scheduler::Recompute {
            kind,
            job,
            step,
            micro,
            spec,
            params,
            x,
            labels,
            local,
        } = r;
        if let Some(local) = local {
            let out =
                tokio::task::spawn_blocking(move || replay(spec, &params, &local, &x, &labels))
                    .await;
            let reference = match out {
                Ok(Ok(r)) => Some(r),
                Ok(Err(e)) => {
                    tracing::error!(%job, ?kind, error = %e, "replay failed; falling back to replication");
                    None
                }
                Err(e) => {
                    tracing::error!(%job, ?kind, error = %e, "replay task panicked; falling back to replication");
                    None
                }
            };
            let fx = app.state().replayed(job, step, micro, reference);
            app.apply(fx).await;
            return;
        }
        let out = tokio::task::spawn_blocking(move || {
            let mut engine = CpuEngine::new(spec);
            engine.load(&params)?;
            engine.step(&x, &labels)
        })
        .await;
        let reference = match out {
            Ok(Ok(r)) => Some(r),
            Ok(Err(e)) => {
                tracing::error!(%job, ?kind, error = %e, "recomputation failed; falling back to replication");
                None
            }
            Err(e) => {
                tracing::error!(%job, ?kind, error = %e, "recomputation task panicked; falling back to replication");
                None
            }
        };
        let fx = app.state().recomputed(job, step, micro, reference);
        app.apply(fx).await;
    })
}

/// Replays a `local` lease on the CPU backend (`core::local`), passing its delta through the job's encoding as a
/// replica's delta is, so the coordinator compares like with like.
fn replay(
    spec: starling_core::ModelSpec,
    params: &[f32],
    local: &scheduler::LocalReplay,
    x: &[f32],
    labels: &[u32],
) -> Result<starling_core::local::LocalOutput, String> {
    let mut engine = CpuEngine::new(spec);
    let mut out = starling_core::local::run_cpu(&mut engine, params, &local.plan, x, labels)
        .map_err(|e| e.to_string())?;
    let bytes = starling_core::protocol::encode_delta(local.quant, &out.delta)
        .map_err(|e| e.to_string())?;
    out.delta = starling_core::protocol::decode_delta(local.quant, &bytes, out.delta.len())
        .map_err(|e| e.to_string())?;
    Ok(out)
}

/// A worker's standing as the store has it.
pub(crate) fn worker_info(w: &store::WorkerRow) -> WorkerInfo {
    WorkerInfo {
        name: w.name.clone(),
        credits_flops: w.credits_flops as u64,
        accepted: w.accepted as u64,
        rejected: w.rejected as u64,
        strikes: w.strikes as u32,
        refused: w.refused,
        near_misses: 0,
    }
}

/// Everything the scheduler needs to bring job `id` into memory from the store (`None`: no such job).
pub async fn load_job(store: &Store, id: JobId) -> anyhow::Result<Option<JobLoad>> {
    let Some(row) = store.jobs().await?.into_iter().find(|r| r.id == id) else {
        return Ok(None);
    };
    let spec: ModelSpec =
        serde_json::from_str(&row.spec).with_context(|| format!("job {} spec", row.id))?;
    let hyper: Hyper = serde_json::from_str(&row.hyper)
        .with_context(|| format!("job {} hyperparameters", row.id))?;
    let (train, test) = store.load_examples(row.dataset_id).await?;
    let checkpoint = store.load_checkpoint(row.id).await?;
    let step = checkpoint.as_ref().map_or(0, |c| c.step);
    let accepted = store.load_accepted(row.id, step).await?;
    // Stored once with the dataset: a job load never hashes or compresses the training set.
    let dataset_frame = match hyper.is_local() {
        true => store.train_frame(row.dataset_id, &train).await?,
        false => None,
    };
    Ok(Some(JobLoad {
        id: row.id,
        owner: row.owner,
        owner_name: match row.owner {
            Some(id) => store.owner_name(id).await?,
            None => None,
        },
        name: row.name,
        spec,
        hyper,
        status: JobStatus::parse(&row.status),
        created_ms: row.created_ms,
        train,
        test,
        checkpoint,
        accepted,
        dataset_frame,
    }))
}

/// The scheduler settings of a coordinator configuration, with the system clock and a per-start seed.
pub fn scheduler_config(config: &ServeConfig) -> SchedulerConfig {
    SchedulerConfig {
        strike_limit: config.strike_limit,
        speculate_after: Duration::from_millis(config.speculate_after_ms),
        trust_threshold: config.trust_threshold,
        spot_check_max_params: config.spot_check_max_params,
        placement: config.placement,
        clock: scheduler::Clock::system(),
        seed: None,
    }
}

/// Loads every worker, and on SQLite every job, from the store into a fresh scheduler state (on PostgreSQL jobs
/// come in as this node takes their leadership: [`cluster`]).
async fn load_state(store: &Store, config: &ServeConfig) -> anyhow::Result<State> {
    let mut state = State::new(scheduler_config(config));
    for w in store.workers().await? {
        state.set_worker(w.id, worker_info(&w));
    }
    if cluster::mode_of(store) == cluster::Mode::Shared {
        return Ok(state);
    }
    for row in store.jobs().await? {
        if let Some(load) = load_job(store, row.id).await? {
            state.load_job(load);
        }
        for m in store.metrics(row.id).await? {
            state.restore_metric(row.id, m);
        }
    }
    Ok(state)
}

/// Runs the coordinator on an already bound listener until `shutdown` resolves.
pub async fn run(
    listener: TcpListener,
    config: ServeConfig,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> anyhow::Result<()> {
    config.validate()?;
    let lease = Duration::from_millis(config.lease_ms);
    let db = config.db.to_string_lossy().to_string();
    let store = if store::is_postgres_url(&db) {
        Store::open_postgres(&db, lease).await
    } else {
        Store::open(&config.db).await
    }
    .with_context(|| format!("opening database {}", config.db.display()))?;
    if config.demo {
        // Beside the SQLite file; for PostgreSQL, in the working directory.
        let token_file = if store::is_postgres_url(&db) {
            std::path::PathBuf::from("starling.demo-token")
        } else {
            config.db.with_extension("demo-token")
        };
        ensure_demo_job(&store, &config.mnist_dir, demo_hyper(), Some(&token_file)).await?;
    }
    if config.demo_cnn {
        let token_file = config.db.with_extension("demo-token");
        ensure_demo_cnn_job(
            &store,
            &config.mnist_dir,
            demo_cnn_hyper(),
            Some(&token_file),
        )
        .await?;
    }
    if config.demo_lm {
        let token_file = config.db.with_extension("demo-token");
        ensure_demo_lm_job(&store, &config.corpus, demo_lm_hyper(), Some(&token_file)).await?;
    }
    let state = load_state(&store, &config).await?;
    let (stop_tx, stop_rx) = watch::channel(false);
    let (events, _) = tokio::sync::broadcast::channel(256);
    let addr: SocketAddr = listener.local_addr()?;
    let cluster = cluster::Cluster::new(
        cluster::mode_of(&store),
        config
            .node_id
            .clone()
            .unwrap_or_else(|| format!("node-{addr}")),
        config
            .public_url
            .clone()
            .unwrap_or_else(|| format!("http://{addr}")),
        lease,
    );
    let app = Arc::new(App {
        cluster,
        state: Mutex::new(state),
        write_gate: tokio::sync::Mutex::new(()),
        per_addr: ws::AddrCounts::default(),
        store,
        config,
        shutdown: stop_rx,
        events,
    });
    tracing::info!(%addr, "coordinator listening: volunteer page http://{addr}/ , workers ws://{addr}/ws");

    // The lease reaper: expires overdue leases and hands out speculative replicas to idle workers.
    let reaper = {
        let app = app.clone();
        let mut stop = app.shutdown.clone();
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_millis(250));
            loop {
                tokio::select! {
                    _ = tick.tick() => {
                        let fx = app.state().tick();
                        app.apply(fx).await;
                    }
                    _ = stop.changed() => break,
                }
            }
        })
    };

    // The demo keeps volunteers busy: when its run completes (early stopping included), a fresh run starts.
    let demos: Vec<&'static str> = [
        (app.config.demo, DEMO_JOB),
        (app.config.demo_cnn, DEMO_CNN_JOB),
        (app.config.demo_lm, DEMO_LM_JOB),
    ]
    .into_iter()
    .filter_map(|(on, name)| on.then_some(name))
    .collect();
    let rerun = (!demos.is_empty()).then(|| {
        let app = app.clone();
        let mut stop = app.shutdown.clone();
        let mut events = app.events.subscribe();
        tokio::spawn(async move {
            loop {
                tokio::select! {
                    ev = events.recv() => {
                        if matches!(ev, Err(tokio::sync::broadcast::error::RecvError::Closed)) {
                            break;
                        }
                        for name in &demos {
                            if let Err(e) = rerun_demo(&app, name).await {
                                tracing::error!(error = %e, name, "starting a fresh demo run failed");
                            }
                        }
                    }
                    _ = stop.changed() => break,
                }
            }
        })
    });

    // Several nodes: heartbeats, leadership, takeovers and redirects.
    let heartbeat = (app.cluster.mode == cluster::Mode::Shared).then(|| {
        tracing::info!(node = %app.cluster.node_id, url = %app.cluster.public_url, "joining the cluster");
        tokio::spawn(cluster::run(app.clone()))
    });

    let router = http::router(app.clone());
    // No Nagle delay: an `error` and the close frame written right after it must both leave before the socket closes.
    let listener = axum::serve::ListenerExt::tap_io(listener, |tcp| {
        let _ = tcp.set_nodelay(true);
    });
    let serve = axum::serve(
        listener,
        router.into_make_service_with_connect_info::<SocketAddr>(),
    )
    .with_graceful_shutdown(async move {
        shutdown.await;
        let _ = stop_tx.send(true);
    });
    serve.await?;
    reaper.abort();
    if let Some(h) = heartbeat {
        h.abort();
    }
    if let Some(r) = rerun {
        r.abort();
    }
    tracing::info!("coordinator stopped");
    Ok(())
}
