//! docs/PROTOCOL.md, "Errors and limits": one test per row, each asserting the `error` code and the close code.

use super::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn limit_connections_per_address() -> anyhow::Result<()> {
    let Env { server, .. } = &start("conns", |c| c.max_conns_per_addr = 2).await?;
    let _a = join(server, None).await?;
    let _b = join(server, None).await?;
    let mut c = connect(server).await?;
    // A client that says hello at once, before reading, must still learn why it was turned away.
    send(&mut c, &hello(1, None), &[]).await?;
    let m = expect_error_then_close(&mut c, ErrorCode::Limit, 1009).await?;
    assert!(m.contains("too many connections"), "{m}");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn limit_message_flood() -> anyhow::Result<()> {
    let Env { server, .. } = &start("flood", |c| (c.msg_rate, c.msg_burst) = (1, 4)).await?;
    let (mut ws, ..) = join(server, None).await?;
    // The first `ready` is the paced flow; the ones after it (already asked, no lease) are unsolicited.
    for _ in 0..5_000 {
        if send(&mut ws, &WorkerMsg::Ready, &[]).await.is_err() {
            break;
        }
    }
    let m = expect_error_then_close(&mut ws, ErrorCode::Limit, 1009).await?;
    assert!(m.contains("unsolicited messages"), "{m}");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn limit_ping_flood() -> anyhow::Result<()> {
    let Env { server, .. } = &start("pings", |c| (c.msg_rate, c.msg_burst) = (1, 4)).await?;
    let (mut ws, ..) = join(server, None).await?;
    for _ in 0..5_000 {
        if ws.send(Message::Ping(vec![1, 2, 3].into())).await.is_err() {
            break;
        }
    }
    let m = expect_error_then_close(&mut ws, ErrorCode::Limit, 1009).await?;
    assert!(m.contains("unsolicited messages"), "{m}");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn limit_message_size() -> anyhow::Result<()> {
    let Env { server, .. } = &start("size", |c| c.max_frame_bytes = 64 * 1024).await?;
    let (ws, ..) = join(server, None).await?;
    let (mut sink, mut stream) = ws.split();
    // The coordinator stops reading at the frame header; the client may still be writing the rest when the answer
    // comes, so it writes on its own task.
    let writer = tokio::spawn(async move {
        let _ = sink
            .send(binary(8, b"{}      ", &vec![0u8; 256 * 1024]))
            .await;
        sink
    });
    let message = loop {
        match tokio::time::timeout(WAIT, stream.next()).await? {
            Some(Ok(Message::Text(t))) => match CoordinatorMsg::decode_text(t.as_str())? {
                CoordinatorMsg::Error { code, message } => {
                    assert_eq!(code, ErrorCode::Limit, "{message}");
                    break message;
                }
                _ => continue,
            },
            other => bail!("expected `error limit`, got {other:?}"),
        }
    };
    assert!(message.contains("over the limit of 65536"), "{message}");
    match tokio::time::timeout(WAIT, stream.next()).await? {
        Some(Ok(Message::Close(Some(f)))) => assert_eq!(u16::from(f.code), 1009),
        other => bail!("expected close 1009, got {other:?}"),
    }
    let _ = writer.await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn limit_header_size() -> anyhow::Result<()> {
    let Env { server, .. } = &start("header", |_| ()).await?;
    // Binary: a header length over 16 KiB (the bytes are there; it is the length that is refused).
    let (mut ws, ..) = join(server, None).await?;
    let h = 16 * 1024 + 4;
    ws.send(binary(h, &vec![b' '; h as usize], &[0; 4])).await?;
    let m = expect_error_then_close(&mut ws, ErrorCode::Limit, 1009).await?;
    assert!(m.contains("over the limit of 16384"), "{m}");
    // Text: a JSON message over 16 KiB, here as the first frame.
    let mut ws = connect(server).await?;
    let long = format!(r#"{{"type":"ready","pad":"{}"}}"#, "x".repeat(16 * 1024));
    ws.send(Message::text(long)).await?;
    let m = expect_error_then_close(&mut ws, ErrorCode::Limit, 1009).await?;
    assert!(m.contains("over the limit of 16384"), "{m}");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_frame_payload_not_whole_4_byte_values() -> anyhow::Result<()> {
    let Env { server, .. } = &start("align", |_| ()).await?;
    let (mut ws, ..) = join(server, None).await?;
    let mut header = br#"{"type":"result","lease":1,"loss":0.5,"correct":0}"#.to_vec();
    while !header.len().is_multiple_of(4) {
        header.push(b' ');
    }
    ws.send(binary(header.len() as u32, &header, &[0; 6]))
        .await?;
    let m = expect_error_then_close(&mut ws, ErrorCode::BadFrame, 1007).await?;
    assert!(m.contains("not a whole number of 4-byte values"), "{m}");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_frame_header_not_padded_to_4() -> anyhow::Result<()> {
    let Env { server, .. } = &start("pad", |_| ()).await?;
    let (mut ws, ..) = join(server, None).await?;
    let mut header = br#"{"type":"result","lease":1,"loss":0.5,"correct":0}"#.to_vec();
    if header.len().is_multiple_of(4) {
        header.push(b' ');
    }
    ws.send(binary(header.len() as u32, &header, &[0; 8]))
        .await?;
    let m = expect_error_then_close(&mut ws, ErrorCode::BadFrame, 1007).await?;
    assert!(m.contains("not a multiple of 4"), "{m}");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_frame_undecodable_messages() -> anyhow::Result<()> {
    let Env { server, .. } = &start("decode", |_| ()).await?;
    let result = padded(r#"{"type":"result","lease":1,"loss":0.5,"correct":0}"#);
    let cases: Vec<(&str, Message)> = vec![
        ("not JSON", Message::text("hello?")),
        ("unknown type", Message::text(r#"{"type":"gimme"}"#)),
        (
            "unknown field",
            Message::text(r#"{"type":"failed","lease":1,"reason":"x","please":true}"#),
        ),
        (
            "result without its payload",
            Message::text(r#"{"type":"result","lease":1,"loss":0.5,"correct":0}"#),
        ),
        (
            "ready with a payload",
            binary(16, br#"{"type":"ready"}"#, &[0; 4]),
        ),
        ("header past the frame's end", binary(64, &result, &[])),
        (
            "shorter than the length field",
            Message::binary(vec![1u8, 0]),
        ),
        // JSON has no NaN; `null` is the nearest a client can write, and a loss must be a number.
        ("null loss", {
            let h = padded(r#"{"type":"result","lease":1,"loss":null,"correct":0}"#);
            binary(h.len() as u32, &h, &[0; 4])
        }),
    ];
    for (what, frame) in cases {
        let (mut ws, ..) = join(server, None).await?;
        ws.send(frame).await?;
        expect_error_then_close(&mut ws, ErrorCode::BadFrame, 1007)
            .await
            .with_context(|| what.to_string())?;
    }
    Ok(())
}

/// JSON bytes padded with spaces to a multiple of 4, as a binary frame's header must be.
fn padded(json: &str) -> Vec<u8> {
    let mut h = json.as_bytes().to_vec();
    while !h.len().is_multiple_of(4) {
        h.push(b' ');
    }
    h
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_frame_text_not_utf8() -> anyhow::Result<()> {
    let Env { server, .. } = &start("utf8", |_| ()).await?;
    let (mut ws, ..) = join(server, None).await?;
    ws.send(Message::Frame(Frame::message(
        vec![b'{', 0xff, 0xfe, b'}'],
        OpCode::Data(Data::Text),
        true,
    )))
    .await?;
    let m = expect_error_then_close(&mut ws, ErrorCode::BadFrame, 1007).await?;
    assert!(m.contains("UTF-8"), "{m}");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn out_of_protocol_no_hello_in_time() -> anyhow::Result<()> {
    let Env { server, .. } = &start("nohello", |c| c.hello_timeout_ms = 200).await?;
    let mut ws = connect(server).await?;
    let m = expect_error_then_close(&mut ws, ErrorCode::OutOfProtocol, 1008).await?;
    assert!(m.contains("no hello within 200 ms"), "{m}");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn out_of_protocol_first_message_not_hello() -> anyhow::Result<()> {
    let Env { server, .. } = &start("first", |_| ()).await?;
    let mut ws = connect(server).await?;
    send(&mut ws, &WorkerMsg::Ready, &[]).await?;
    let m = expect_error_then_close(&mut ws, ErrorCode::OutOfProtocol, 1008).await?;
    assert!(m.contains("must be hello, not ready"), "{m}");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn out_of_protocol_hello_twice() -> anyhow::Result<()> {
    let Env { server, .. } = &start("twice", |_| ()).await?;
    let (mut ws, ..) = join(server, None).await?;
    send(&mut ws, &hello(1, None), &[]).await?;
    let m = expect_error_then_close(&mut ws, ErrorCode::OutOfProtocol, 1008).await?;
    assert!(m.contains("hello sent twice"), "{m}");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn protocol_version_mismatch() -> anyhow::Result<()> {
    let Env { server, .. } = &start("version", |_| ()).await?;
    let mut ws = connect(server).await?;
    // Version 2 (local leases) is spoken since issue 10; 3 is not.
    send(&mut ws, &hello(3, None), &[]).await?;
    let m = expect_error_then_close(&mut ws, ErrorCode::ProtocolVersion, 1008).await?;
    assert!(m.contains("speaks protocol 1 or 2, not 3"), "{m}");
    Ok(())
}

/// Both refusal rows: the result that reaches the strike limit gets its `rejected` verdict, then `error refused`
/// and the close; the refused token is turned away at hello from then on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refused_at_the_strike_limit_and_at_hello() -> anyhow::Result<()> {
    let Env { server, alice, .. } = &start("refused", |c| c.strike_limit = 1).await?;
    let http = Http::new(server);
    create_job(&http, alice, one_micro(2)).await?;
    let (ws, worker, token) = join(server, None).await?;
    let mut peer = Peer {
        ws,
        worker,
        spec: ModelSpec::from_json(SPEC)?,
        params: None,
    };
    // A second connection of the same worker (its token), idle: the refusal reaches it too.
    let (mut other, ..) = join(server, Some(&token)).await?;
    peer.ready().await?;
    let lease = peer.lease().await?;
    peer.submit(lease.id, 1.0, 0, &[0.5; 3]).await?; // the wrong length: rejected, a strike
    let verdict = tokio::time::timeout(WAIT, peer.ws.next())
        .await
        .context("no verdict in time")?;
    match verdict {
        Some(Ok(Message::Text(t))) => match CoordinatorMsg::decode_text(t.as_str())? {
            CoordinatorMsg::Verdict {
                outcome, lease: l, ..
            } => {
                assert_eq!(
                    (outcome, l),
                    (Outcome::Rejected, lease.id),
                    "the verdict comes first"
                );
            }
            other => bail!("expected the rejected verdict first, got {other:?}"),
        },
        other => bail!("expected the rejected verdict first, got {other:?}"),
    }
    let m = expect_error_then_close(&mut peer.ws, ErrorCode::Refused, 1008).await?;
    assert!(m.contains("refused after 1 rejected results"), "{m}");
    expect_error_then_close(&mut other, ErrorCode::Refused, 1008).await?;
    let mut again = connect(server).await?;
    send(&mut again, &hello(1, Some(&token)), &[]).await?;
    expect_error_then_close(&mut again, ErrorCode::Refused, 1008).await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutting_down() -> anyhow::Result<()> {
    let Env { server, _dir, .. } = start("shutdown", |_| ()).await?;
    let (mut ws, ..) = join(&server, None).await?;
    let stop = tokio::spawn(server.stop());
    expect_error_then_close(&mut ws, ErrorCode::ShuttingDown, 1001).await?;
    drop(ws);
    stop.await??;
    Ok(())
}
