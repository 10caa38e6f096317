//! Several coordinator nodes on one PostgreSQL database: which node leads which job, fencing, failover, and the
//! node registry. On SQLite there is one node and it leads every job ([`Mode::Single`]); nothing here runs.
//!
//! Every job is led by exactly one node: the one whose leadership session ([`store::Leadership`], a dedicated
//! connection) holds the job's advisory lock. Taking a job bumps its `leader_epoch` ([`Store::claim_job`]) and then
//! loads it from the durable state (checkpoint, accepted results of the step in progress, ledger): every write the
//! node makes for the job carries that epoch ([`Fence`]) and fails once another node has taken the job, so a node
//! paused past its lease cannot write after it lost the lock. The session is ended by the server when it has been
//! idle for one lease (`idle_session_timeout`); the node pings it every heartbeat, so a node that dies or stops
//! loses its locks within one lease and the others take its jobs over on their next heartbeat.
//!
//! Invariants: this module decides leadership and never writes a job's state itself; a job is in this node's
//! scheduler only while this node holds its lock and its epoch ([`Cluster::fence`] answers `None` otherwise);
//! losing the leadership session unloads every job at once.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use starling_core::protocol::{CoordinatorMsg, JobId};

use crate::App;
use crate::job::JobStatus;
use crate::scheduler::Outbound;
use crate::store::{self, Fence, Store};

/// How this coordinator shares its database.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// SQLite: the only node, leader of every job at epoch 0.
    Single,
    /// PostgreSQL: one of several nodes; leads the jobs whose locks it holds.
    Shared,
}

/// This node's identity and the jobs it leads.
#[derive(Debug)]
pub struct Cluster {
    pub mode: Mode,
    /// `--node-id`: this node's name in the registry (and in `jobs.leader_node`).
    pub node_id: String,
    /// `--public-url` (or the bound address): where workers and owners reach this node.
    pub public_url: String,
    /// How long a node may go silent before it loses its jobs (`--lease-ms`).
    pub lease: Duration,
    /// Jobs led here and the epoch each was taken at.
    led: Mutex<BTreeMap<JobId, u64>>,
    /// The last registry view: every job, with its leading node's public URL when that node is live.
    view: Mutex<BTreeMap<JobId, Option<String>>>,
    /// The other live nodes (id, public URL) as of the last heartbeat: whom `/api/v1/jobs` and `/metrics/cluster`
    /// ask for the jobs they lead.
    peers: Mutex<Vec<(String, String)>>,
    /// The leadership session (PostgreSQL), shared by the heartbeat and by a node adopting a job it just created.
    session: tokio::sync::Mutex<Option<store::Leadership>>,
}

impl Cluster {
    pub fn new(mode: Mode, node_id: String, public_url: String, lease: Duration) -> Self {
        Self {
            mode,
            node_id,
            public_url,
            lease,
            led: Mutex::new(BTreeMap::new()),
            view: Mutex::new(BTreeMap::new()),
            peers: Mutex::new(Vec::new()),
            session: tokio::sync::Mutex::new(None),
        }
    }

    fn led(&self) -> MutexGuard<'_, BTreeMap<JobId, u64>> {
        self.led.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn view(&self) -> MutexGuard<'_, BTreeMap<JobId, Option<String>>> {
        self.view.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The right to write for `job` from this node: epoch 0 on SQLite, the epoch it was taken at on PostgreSQL,
    /// `None` when this node does not lead it (the write must not be attempted).
    pub fn fence(&self, job: JobId) -> Option<Fence> {
        match self.mode {
            Mode::Single => Some(Fence { job, epoch: 0 }),
            Mode::Shared => self.led().get(&job).map(|&epoch| Fence { job, epoch }),
        }
    }

    /// Whether this node leads `job`.
    pub fn leads(&self, job: JobId) -> bool {
        self.fence(job).is_some()
    }

    /// The public URL of the live node leading `job`, when that is another node.
    pub fn leader_url(&self, job: JobId) -> Option<String> {
        if self.leads(job) {
            return None;
        }
        self.view().get(&job).cloned().flatten()
    }

    /// Whether `job` exists as far as the last registry view knows (led here, elsewhere, or by nobody right now).
    pub fn knows(&self, job: JobId) -> bool {
        self.leads(job) || self.view().contains_key(&job)
    }

    /// The other live nodes (id, public URL) as of the last heartbeat; none on SQLite.
    pub fn peers(&self) -> Vec<(String, String)> {
        self.peers.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// Jobs led here.
    pub fn led_jobs(&self) -> Vec<JobId> {
        self.led().keys().copied().collect()
    }
}

/// The WebSocket URL of a node's worker endpoint, from its public base URL.
pub fn ws_url(public_url: &str) -> String {
    let base = public_url.trim_end_matches('/');
    let base = if let Some(rest) = base.strip_prefix("https://") {
        format!("wss://{rest}")
    } else if let Some(rest) = base.strip_prefix("http://") {
        format!("ws://{rest}")
    } else {
        base.to_string()
    };
    format!("{base}/ws")
}

/// Drops job `job` from this node: it no longer leads it (fenced write, lost session, or finished elsewhere).
pub fn lose(app: &App, job: JobId) {
    app.cluster.led().remove(&job);
    app.state().unload_job(job);
}

/// Drops every job this node leads (its leadership session ended: the locks are gone).
fn lose_all(app: &App) {
    let jobs: Vec<JobId> = std::mem::take(&mut *app.cluster.led())
        .into_keys()
        .collect();
    if !jobs.is_empty() {
        tracing::warn!(jobs = ?jobs, "leadership session lost; every job it led is unloaded");
    }
    let mut st = app.state();
    for job in jobs {
        st.unload_job(job);
    }
}

/// The node's heartbeat loop (PostgreSQL only): registers the node, keeps its leadership session alive, takes over
/// jobs nobody leads (up to this node's fair share of them) and sends idle workers to a node that leads work.
pub async fn run(app: Arc<App>) {
    let mut stop = app.shutdown.clone();
    let period = (app.cluster.lease / 6).max(Duration::from_millis(50));
    let mut tick = tokio::time::interval(period);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = stop.changed() => break,
        }
        let mut session = app.cluster.session.lock().await;
        if let Err(e) = beat(&app, &mut session).await {
            tracing::warn!(error = %e, "cluster heartbeat failed");
        }
    }
}

/// One heartbeat; see [`run`].
async fn beat(app: &Arc<App>, session: &mut Option<store::Leadership>) -> store::Result<()> {
    let c = &app.cluster;
    app.store.heartbeat(&c.node_id, &c.public_url).await?;
    // The session first: a node that cannot prove it still holds its locks must stop leading at once.
    let alive = match session.as_mut() {
        Some(s) => s.ping().await.is_ok(),
        None => false,
    };
    if !alive {
        if session.take().is_some() {
            lose_all(app);
        }
        *session = Some(app.store.leadership(c.lease).await?);
    }
    let Some(session) = session.as_mut() else {
        return Ok(());
    };
    let nodes = app.store.live_nodes(c.lease).await?;
    let leaders = app.store.leaders().await?;
    let urls: BTreeMap<&str, &str> = nodes
        .iter()
        .map(|n| (n.node_id.as_str(), n.public_url.as_str()))
        .collect();
    *c.peers.lock().unwrap_or_else(|e| e.into_inner()) = nodes
        .iter()
        .filter(|n| n.node_id != c.node_id)
        .map(|n| (n.node_id.clone(), n.public_url.clone()))
        .collect();
    *c.view() = leaders
        .iter()
        .map(|l| {
            let url = l.node.as_deref().and_then(|n| urls.get(n));
            (l.job, url.map(|u| u.to_string()))
        })
        .collect();
    // A job taken over by another node while this one still thought it led it (it cannot hold the lock then, so
    // its writes were already fenced): let it go.
    let moved: Vec<JobId> = leaders
        .iter()
        .filter(|l| c.led().get(&l.job).is_some_and(|&epoch| l.epoch != epoch))
        .map(|l| l.job)
        .collect();
    for job in moved {
        lose(app, job);
    }
    // Fair share: jobs spread over the live nodes; a job whose leader is alive keeps it (its lock is held).
    let share = leaders.len().div_ceil(nodes.len().max(1));
    for l in &leaders {
        if c.led().len() >= share {
            break;
        }
        if c.leads(l.job) {
            continue;
        }
        if session.try_lock(l.job).await? {
            take(app, l.job).await;
        }
    }
    // Where idle workers go: the live node leading the lowest running job, so every idle node sends them alike.
    let target = leaders
        .iter()
        .filter(|l| l.status == JobStatus::Running.as_str())
        .filter_map(|l| urls.get(l.node.as_deref()?))
        .find(|url| **url != c.public_url)
        .map(|url| url.to_string());
    if let Some(url) = target {
        redirect_idle(app, &url);
    }
    Ok(())
}

/// Leads job `job`, just created on this node, if no other node took it first (PostgreSQL; on SQLite the
/// caller loads it). Returns whether this node leads it now.
pub async fn adopt(app: &Arc<App>, job: JobId) -> bool {
    let mut session = app.cluster.session.lock().await;
    if session.is_none() {
        // The node has just started and its first heartbeat has not opened the session yet.
        match app.store.leadership(app.cluster.lease).await {
            Ok(s) => *session = Some(s),
            Err(e) => {
                tracing::warn!(%job, error = %e, "opening the leadership session failed");
                return false;
            }
        }
    }
    let Some(s) = session.as_mut() else {
        return false;
    };
    match s.try_lock(job).await {
        Ok(true) => {
            take(app, job).await;
            app.cluster.leads(job)
        }
        Ok(false) => false,
        Err(e) => {
            tracing::warn!(%job, error = %e, "locking a new job failed; the heartbeat will retry");
            false
        }
    }
}

/// Takes over job `job` (its lock is held): bumps its epoch, loads its durable state and starts serving it.
async fn take(app: &Arc<App>, job: JobId) {
    let c = &app.cluster;
    let epoch = match app.store.claim_job(job, &c.node_id).await {
        Ok(e) => e,
        Err(e) => {
            tracing::error!(%job, error = %e, "claiming a job's leadership failed");
            return;
        }
    };
    c.led().insert(job, epoch);
    let load = match crate::load_job(&app.store, job).await {
        Ok(Some(load)) => load,
        Ok(None) => {
            c.led().remove(&job);
            return;
        }
        Err(e) => {
            tracing::error!(%job, error = %e, "loading a job taken over failed");
            c.led().remove(&job);
            return;
        }
    };
    let metrics = app.store.metrics(job).await.unwrap_or_default();
    let workers = app.store.workers().await.unwrap_or_default();
    let fx = {
        let mut st = app.state();
        // Other nodes credited workers too: their standing comes from the store.
        for w in &workers {
            st.set_worker(w.id, crate::worker_info(w));
        }
        st.load_job(load);
        for m in metrics {
            st.restore_metric(job, m);
        }
        st.tick()
    };
    tracing::info!(%job, epoch, node = %c.node_id, "took over the job's leadership");
    app.apply(fx).await;
    let _ = app.events.send(job);
}

/// Sends every worker connected here to the node at `url`, when this node leads no running job.
fn redirect_idle(app: &App, url: &str) {
    if app.state().jobs().any(|j| j.status == JobStatus::Running) {
        return;
    }
    let msg = CoordinatorMsg::Redirect { url: ws_url(url) };
    let st = app.state();
    for conn in st.conn_ids() {
        st.send(conn, Outbound::msg(&msg, &[]));
    }
}

/// Whether `store` is shared by several nodes.
pub fn mode_of(store: &Store) -> Mode {
    match store.engine() {
        store::Engine::Sqlite => Mode::Single,
        store::Engine::Postgres => Mode::Shared,
    }
}

/// Answers an owner's request for job `job` when another node leads it: forwarded to that node, or `503
/// no_leader` while the job is failing over (its leader died and nobody has taken it yet). Hands the request back
/// when this node should answer it: SQLite, a job led here, a job nobody knows (the caller's 404), or a request
/// another node already forwarded.
pub async fn elsewhere(
    app: &App,
    job: JobId,
    req: axum::extract::Request,
) -> Result<axum::response::Response, axum::extract::Request> {
    use axum::response::IntoResponse as _;
    let c = &app.cluster;
    if c.mode == Mode::Single || c.leads(job) || req.headers().contains_key(FORWARDED) {
        return Err(req);
    }
    let unavailable = |code, message: String| {
        crate::http::ApiError::new(axum::http::StatusCode::SERVICE_UNAVAILABLE, code, message)
            .into_response()
    };
    match c.leader_url(job) {
        Some(url) => match forward(&url, &c.node_id, req).await {
            Ok(resp) => Ok(resp),
            Err(e) => {
                tracing::warn!(%job, leader = %url, error = %e, "forwarding to the job's leader failed");
                Ok(unavailable(
                    "leader_unreachable",
                    format!("the node leading job {job} does not answer; retry shortly"),
                ))
            }
        },
        None if c.knows(job) => Ok(unavailable(
            "no_leader",
            format!("job {job} is failing over to another node; retry shortly"),
        )),
        None => Err(req),
    }
}

/// Header marking a request one node forwarded to another: the receiver answers it itself (or 503), never forwards
/// it again, so two nodes with stale views cannot bounce a request between them.
pub const FORWARDED: &str = "x-starling-forwarded-by";

/// Why a request for a job led elsewhere could not be answered.
#[derive(Debug, thiserror::Error)]
pub enum ForwardError {
    #[error("the job's leader is not reachable over plain http ({0})")]
    Unsupported(String),
    #[error("connecting to the job's leader: {0}")]
    Connect(#[from] std::io::Error),
    #[error("talking to the job's leader: {0}")]
    Http(#[from] hyper::Error),
}

/// Sends `req` on to the node at `base` (its public `http://host:port`) and streams its answer back (an SSE stream
/// included). Owners' requests for a job go to the job's leader because only it has the job in memory: its live
/// counters, its connected workers, its step in progress; PostgreSQL alone has none of those.
pub async fn forward(
    base: &str,
    node_id: &str,
    req: axum::extract::Request,
) -> Result<axum::response::Response, ForwardError> {
    let authority = base
        .strip_prefix("http://")
        .map(|a| a.trim_end_matches('/'))
        .filter(|a| !a.contains('/'))
        .ok_or_else(|| ForwardError::Unsupported(base.to_string()))?;
    let stream = tokio::net::TcpStream::connect(authority).await?;
    let _ = stream.set_nodelay(true);
    let (mut sender, conn) =
        hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream)).await?;
    // The connection task lives as long as the response body is read (an SSE stream: as long as it is followed).
    tokio::spawn(async move {
        if let Err(e) = conn.await {
            tracing::debug!(error = %e, "forwarded connection ended");
        }
    });
    let (mut parts, body) = req.into_parts();
    // Inside a nested router the URI has lost its prefix; the original is kept as an extension.
    let uri = parts
        .extensions
        .get::<axum::extract::OriginalUri>()
        .map_or_else(|| parts.uri.clone(), |o| o.0.clone());
    let path = uri.path_and_query().map_or("/", |p| p.as_str()).to_string();
    parts.uri = path
        .parse()
        .map_err(|_| ForwardError::Unsupported(path.clone()))?;
    if let Ok(host) = authority.parse() {
        parts.headers.insert(axum::http::header::HOST, host);
    }
    if let Ok(me) = node_id.parse() {
        parts.headers.insert(FORWARDED, me);
    }
    let resp = sender
        .send_request(axum::extract::Request::from_parts(parts, body))
        .await?;
    Ok(resp.map(axum::body::Body::new))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_public_url_names_its_worker_socket() {
        assert_eq!(ws_url("http://10.0.0.2:8080"), "ws://10.0.0.2:8080/ws");
        assert_eq!(ws_url("https://a.example/"), "wss://a.example/ws");
    }

    #[test]
    fn sqlite_leads_every_job_at_epoch_zero_and_postgres_only_what_it_took() {
        let lease = Duration::from_secs(3);
        let single = Cluster::new(Mode::Single, "n".into(), "http://x".into(), lease);
        let fence = |job, epoch| {
            Some(Fence {
                job: JobId(job),
                epoch,
            })
        };
        assert_eq!(single.fence(JobId(7)), fence(7, 0));
        assert_eq!(single.leader_url(JobId(7)), None);
        let shared = Cluster::new(Mode::Shared, "n".into(), "http://x".into(), lease);
        assert_eq!(shared.fence(JobId(7)), None);
        shared.led().insert(JobId(7), 4);
        shared.view().insert(JobId(8), Some("http://y".into()));
        shared.view().insert(JobId(9), None);
        assert_eq!(shared.fence(JobId(7)), fence(7, 4));
        assert_eq!(shared.leader_url(JobId(8)).as_deref(), Some("http://y"));
        assert!(shared.knows(JobId(9)) && shared.leader_url(JobId(9)).is_none());
        assert!(!shared.knows(JobId(10)));
    }
}
