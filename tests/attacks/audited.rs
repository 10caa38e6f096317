//! Audited mode end to end (`verification = "audited"`): trusted workers' results used alone, audits leased to
//! other trusted workers, a sleeper (trusted first, then lying) caught by an audit; and placement: workers bound
//! to one loopback address never hold two replicas of one unit.

use super::*;

use futures_util::{SinkExt, StreamExt};
use starling_coordinator::job::Verification;
use starling_core::protocol::{WireFrame, encode};
use tokio_tungstenite::tungstenite::Message;

/// Honest for its first `honest` results, then a sign flip every time.
fn sleeper(honest: u64) -> SendTamper {
    let mut n = 0u64;
    Box::new(move |out: &mut StepOutput| {
        n += 1;
        if n > honest {
            out.grad.iter_mut().for_each(|g| *g = -*g);
        }
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn audited_mode_uses_trusted_results_alone_and_an_audit_catches_a_sleeper()
-> anyhow::Result<()> {
    init_tracing();
    let dir = TempDir::new("audited");
    // A higher audit share than the default so the sleeper is caught within this short run with near certainty:
    // it survives n lies with probability (1 − 0.25)^n.
    create_demo_job(
        &dir.db(),
        Hyper {
            verification: Verification::Audited,
            audit: 0.25,
            ..short(STEPS)
        },
    )
    .await?;
    let server = Server::start(ServeConfig::for_tests(dir.db())).await?;
    let honest = spawn_honest(&server, 3);
    let liar = spawn_worker(
        server.ws_url(),
        BackendChoice::Cpu,
        "sleeper",
        None,
        None,
        Some(sleeper(25)),
    );
    // Solo units are verified by one worker (and audits): `finish` checks every step had at least one.
    let run = finish(server, &dir.db(), STEPS, 1, honest).await?;
    let liar = join(liar)?;
    let c = &run.job["counters"];
    println!(
        "sleeper: {:?}; counters {c}; accuracy {}",
        liar.stats, run.accuracy
    );
    assert!(refused(&liar), "sleeper not refused: {:?}", liar.closed_by);
    // Its lies are caught on whichever lease it lies: a solo unit's audit fails, or, as an auditor (it cannot tell
    // an audit lease from any other), its result is disputed and the coordinator's recomputation strikes it; once
    // struck it has no record and its units are replicated with a trusted worker (arbitration).
    let (failures, disputes) = (
        c["audit_failures"].as_u64().unwrap(),
        c["audit_disputes"].as_u64().unwrap(),
    );
    assert!(failures + disputes >= 1, "no audit saw the sleeper's lies");
    assert_eq!(run.job["last_bad_step"].is_null(), failures == 0);
    assert!(
        c["audit_leases"].as_u64() >= Some(1),
        "audits went to trusted workers"
    );
    // Far fewer computations than replication: at R = 2 rows_computed would be about twice rows_accepted.
    let (acc, comp) = (
        c["rows_accepted"].as_f64().unwrap(),
        c["rows_computed"].as_f64().unwrap(),
    );
    assert!(comp < 1.6 * acc, "{comp} rows computed for {acc} accepted");
    assert!(
        run.accuracy > 0.7,
        "the job still trained: accuracy {}",
        run.accuracy
    );
    Ok(())
}

/// The (step, micro-batch) of every lease a peer held.
type Held = Arc<Mutex<Vec<(u64, u32)>>>;

/// An honest protocol peer connected from `source`, recording its leases in `held`.
async fn bound_peer(
    source: std::net::Ipv4Addr,
    addr: std::net::SocketAddr,
    held: Held,
) -> anyhow::Result<()> {
    let sock = tokio::net::TcpSocket::new_v4()?;
    sock.bind(std::net::SocketAddr::new(source.into(), 0))?;
    let tcp = sock.connect(addr).await?;
    let (mut ws, _) = tokio_tungstenite::client_async(format!("ws://{addr}/ws"), tcp).await?;
    let send = |msg: &WorkerMsg, payload: &[u8]| match encode(msg, payload) {
        WireFrame::Text(t) => Message::text(t),
        WireFrame::Binary(b) => Message::binary(b),
    };
    let hello = WorkerMsg::Hello {
        protocol: PROTOCOL_VERSION,
        token: None,
        name: Some(format!("bound-{source}")),
        backend: Backend::Cpu,
        adapter: "raw".into(),
        platform: Platform::Native,
    };
    ws.send(send(&hello, &[])).await?;
    ws.send(send(&WorkerMsg::Ready, &[])).await?;
    let mut engine: Option<(ModelSpec, CpuEngine)> = None;
    while let Some(Ok(frame)) = ws.next().await {
        let (msg, payload) = match frame {
            Message::Text(t) => (CoordinatorMsg::decode_text(t.as_str())?, Vec::new()),
            Message::Binary(b) => {
                let (m, p) = CoordinatorMsg::decode_binary(&b)?;
                (m, p.to_vec())
            }
            Message::Close(_) => break,
            _ => continue,
        };
        match msg {
            CoordinatorMsg::Model { spec, .. } => {
                let mut e = CpuEngine::new(spec.clone());
                e.load(&f32s(&payload))?;
                engine = Some((spec, e));
            }
            CoordinatorMsg::Lease {
                lease,
                step,
                micro_batch,
                rows,
                ..
            } => {
                let Some((spec, e)) = engine.as_mut() else {
                    anyhow::bail!("lease before model")
                };
                held.lock().unwrap().push((step, micro_batch));
                let (x, y) = split_lease_payload(&payload, rows as usize, spec.input_len())?;
                let out = e.step(&x, &y)?;
                let result = WorkerMsg::Result {
                    lease,
                    loss: out.loss,
                    correct: out.correct,
                    commit: None,
                };
                ws.send(send(&result, &f32_bytes(&out.grad))).await?;
                ws.send(send(&WorkerMsg::Ready, &[])).await?;
            }
            CoordinatorMsg::Error { .. } => break,
            _ => {}
        }
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn workers_on_one_address_never_hold_replicas_of_one_unit() -> anyhow::Result<()> {
    init_tracing();
    let dir = TempDir::new("placement");
    let steps = 20;
    create_demo_job(&dir.db(), short(steps)).await?;
    // The default placement (`subnet`): loopback addresses other than 127.0.0.1 are compared whole.
    let server = Server::start(ServeConfig::for_tests(dir.db())).await?;
    let addr = server.addr;
    let sources = [
        std::net::Ipv4Addr::new(127, 0, 7, 7),
        std::net::Ipv4Addr::new(127, 0, 7, 7),
        std::net::Ipv4Addr::new(127, 0, 8, 1),
        std::net::Ipv4Addr::new(127, 0, 9, 1),
    ];
    let held: Vec<Held> = sources.iter().map(|_| Arc::default()).collect();
    let peers: Vec<_> = sources
        .iter()
        .zip(&held)
        .map(|(s, h)| tokio::spawn(bound_peer(*s, addr, h.clone())))
        .collect();
    server
        .wait_job(1, Duration::from_secs(120), |j| {
            j["status"] == "completed" && j["last_eval"]["step"] == steps
        })
        .await?;
    server.stop().await?;
    for p in peers {
        let _ = p.await;
    }
    let a: std::collections::BTreeSet<_> = held[0].lock().unwrap().iter().copied().collect();
    let b: std::collections::BTreeSet<_> = held[1].lock().unwrap().iter().copied().collect();
    println!(
        "leases per peer: {:?}",
        held.iter()
            .map(|h| h.lock().unwrap().len())
            .collect::<Vec<_>>()
    );
    assert!(
        !a.is_empty() && !b.is_empty(),
        "both same-address peers worked"
    );
    assert!(
        a.is_disjoint(&b),
        "two workers on one address held replicas of one unit: {:?}",
        a.intersection(&b).collect::<Vec<_>>()
    );
    Ok(())
}
