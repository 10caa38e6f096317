//! docs/API.md: every route and every documented error code of the owner API.

use super::*;

/// The one job-access rule over every job route (`JobRoute::ALL`, the list the router is built from): the owner gets
/// the route; another owner 404, exactly like a job that does not exist; no token the public view where the route
/// has one, else 401; a bad token 401.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn api_every_job_route_applies_the_one_access_rule() -> anyhow::Result<()> {
    let Env {
        server, alice, bob, ..
    } = &start("access", |_| ()).await?;
    let http = Http::new(server);
    let (_, job) = create_job(&http, alice, one_micro(2)).await?;
    // Cancel last: it is terminal, and resume after it would be a 409 (tested below).
    let mut routes = JobRoute::ALL.to_vec();
    routes.sort_by_key(|r| *r == JobRoute::Cancel);
    for route in routes {
        let path = format!("/api/v1/jobs/{job}{}", route.suffix());
        let ask = |token: Option<&str>| {
            let (http, path, token) = (&http, path.clone(), token.map(str::to_string));
            async move {
                http.call(route.method(), &path, token.as_deref(), None)
                    .await
            }
        };
        let who = format!("{} {path}", route.method());
        assert_error(&ask(Some(bob)).await?, 404, "not_found");
        assert_error(&ask(Some("stk_not_a_token")).await?, 401, "unauthorized");
        let missing = format!("/api/v1/jobs/999{}", route.suffix());
        assert_error(
            &http
                .call(route.method(), &missing, Some(alice), None)
                .await?,
            404,
            "not_found",
        );
        let public = ask(None).await?;
        if route.public() {
            assert_eq!(public.0, 200, "{who} without a token: {public:?}");
            if route == JobRoute::Status {
                assert_eq!(public.1["owned"], false);
                assert!(
                    public.1.get("spec").is_none() && public.1.get("hyper").is_none(),
                    "{}",
                    public.1
                );
            }
            assert_error(
                &http.call(route.method(), &missing, None, None).await?,
                404,
                "not_found",
            );
        } else {
            assert_error(&public, 401, "unauthorized");
        }
        let owner = ask(Some(alice)).await?;
        if route == JobRoute::Sample {
            // The owner passes the rule; this job is a classifier, which has no text to sample.
            assert_error(&owner, 422, "not_a_language_model");
            continue;
        }
        assert_eq!(owner.0, 200, "{who} as its owner: {owner:?}");
        if route == JobRoute::Status {
            assert_eq!(owner.1["owned"], true);
            assert_eq!(owner.1["hyper"]["redundancy"], 2);
        }
    }
    // An id that is not a number names no job.
    assert_error(
        &http.get("/api/v1/jobs/abc", Some(alice)).await?,
        404,
        "not_found",
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn api_health_me_and_unknown_routes() -> anyhow::Result<()> {
    let Env { server, alice, .. } = &start("health", |_| ()).await?;
    let http = Http::new(server);
    let (status, health) = http.get("/api/v1/health", None).await?;
    assert_eq!(
        (status, &health["status"], &health["protocol"]),
        (200, &"ok".into(), &1.into())
    );
    let (status, me) = http.get("/api/v1/me", Some(alice)).await?;
    assert_eq!((status, &me["name"]), (200, &"alice".into()));
    assert!(me["owner"].is_i64(), "{me}");
    assert_error(&http.get("/api/v1/me", None).await?, 401, "unauthorized");
    assert_error(
        &http.get("/api/v1/me", Some("stk_nope")).await?,
        401,
        "unauthorized",
    );
    assert_error(
        &http.get("/api/v1/no/such/route", None).await?,
        404,
        "not_found",
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn api_datasets_upload_and_list() -> anyhow::Result<()> {
    let Env {
        server, alice, bob, ..
    } = &start("datasets", |c| c.max_upload_bytes = 64 * 1024).await?;
    let http = Http::new(server);
    assert_error(
        &http.post("/api/v1/datasets", None, &dataset(40)).await?,
        401,
        "unauthorized",
    );
    assert_error(
        &http.get("/api/v1/datasets", None).await?,
        401,
        "unauthorized",
    );
    assert_error(
        &http.post("/api/v1/datasets", Some(alice), b"SDS1").await?,
        422,
        "bad_dataset",
    );
    assert_error(
        &http
            .post(
                "/api/v1/datasets?test_fraction=0.95",
                Some(alice),
                &dataset(40),
            )
            .await?,
        422,
        "bad_request",
    );
    // Over --max-upload-bytes: 413, and nothing is stored.
    let (status, _) = http
        .post("/api/v1/datasets", Some(alice), &dataset(4000))
        .await?;
    assert_eq!(status, 413);
    let (status, up) = http
        .post(
            "/api/v1/datasets?name=tiny&test_fraction=0.25",
            Some(alice),
            &dataset(40),
        )
        .await?;
    assert_eq!(status, 201, "{up}");
    assert_eq!(
        (
            &up["name"],
            &up["dim"],
            &up["train_rows"],
            &up["test_rows"],
            &up["classes"]
        ),
        (&"tiny".into(), &4.into(), &30.into(), &10.into(), &3.into())
    );
    let (status, list) = http.get("/api/v1/datasets", Some(alice)).await?;
    assert_eq!(status, 200);
    let list = list.as_array().context("a list")?.clone();
    assert_eq!(list.len(), 1, "{list:?}");
    assert_eq!(
        (
            &list[0]["id"],
            &list[0]["name"],
            &list[0]["dim"],
            &list[0]["train_rows"],
            &list[0]["test_rows"]
        ),
        (&up["id"], &"tiny".into(), &4.into(), &30.into(), &10.into())
    );
    assert!(list[0]["created_ms"].is_i64());
    let (_, theirs) = http.get("/api/v1/datasets", Some(bob)).await?;
    assert_eq!(
        theirs,
        serde_json::json!([]),
        "bob does not see alice's datasets"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn api_create_job_errors() -> anyhow::Result<()> {
    let Env {
        server, alice, bob, ..
    } = &start("jobs", |_| ()).await?;
    let http = Http::new(server);
    let (_, up) = http
        .post("/api/v1/datasets", Some(alice), &dataset(40))
        .await?;
    let ds = up["id"].as_i64().context("dataset id")?;
    let spec: serde_json::Value = serde_json::from_str(SPEC)?;
    let job = |name: &str, spec: &serde_json::Value, dataset: i64, hyper: serde_json::Value| {
        serde_json::json!({"name": name, "spec": spec, "dataset": dataset, "hyper": hyper})
            .to_string()
            .into_bytes()
    };
    let ok = job("j", &spec, ds, serde_json::json!({}));
    assert_error(
        &http.post("/api/v1/jobs", None, &ok).await?,
        401,
        "unauthorized",
    );
    assert_error(
        &http.post("/api/v1/jobs", Some("stk_nope"), &ok).await?,
        401,
        "unauthorized",
    );
    assert_error(
        &http.post("/api/v1/jobs", Some(alice), b"{").await?,
        422,
        "bad_request",
    );
    assert_error(
        &http
            .post(
                "/api/v1/jobs",
                Some(alice),
                br#"{"name":"j","spec":{},"dataset":"one"}"#,
            )
            .await?,
        422,
        "bad_request",
    );
    assert_error(
        &http
            .post(
                "/api/v1/jobs",
                Some(alice),
                &job(" ", &spec, ds, serde_json::json!({})),
            )
            .await?,
        422,
        "bad_name",
    );
    let bad_spec = serde_json::json!({"input": 4, "layers": []});
    assert_error(
        &http
            .post(
                "/api/v1/jobs",
                Some(alice),
                &job("j", &bad_spec, ds, serde_json::json!({})),
            )
            .await?,
        422,
        "bad_spec",
    );
    for hyper in [
        serde_json::json!({"redundancy": 1}),
        serde_json::json!({"bogus": 1}),
        serde_json::json!({"global_batch": 64}),
    ] {
        assert_error(
            &http
                .post(
                    "/api/v1/jobs",
                    Some(alice),
                    &job("j", &spec, ds, hyper.clone()),
                )
                .await?,
            422,
            "bad_hyper",
        );
    }
    assert_error(
        &http
            .post(
                "/api/v1/jobs",
                Some(alice),
                &job("j", &spec, 999, serde_json::json!({})),
            )
            .await?,
        422,
        "unknown_dataset",
    );
    assert_error(
        &http.post("/api/v1/jobs", Some(bob), &ok).await?,
        422,
        "unknown_dataset",
    );
    let wide = serde_json::json!({"input": 5, "layers": [{"units": 3, "activation": "none"}]});
    assert_error(
        &http
            .post(
                "/api/v1/jobs",
                Some(alice),
                &job("j", &wide, ds, serde_json::json!({})),
            )
            .await?,
        422,
        "shape_mismatch",
    );
    let narrow = serde_json::json!({"input": 4, "layers": [{"units": 2, "activation": "none"}]});
    assert_error(
        &http
            .post(
                "/api/v1/jobs",
                Some(alice),
                &job(
                    "j",
                    &narrow,
                    ds,
                    serde_json::json!({"global_batch": 8, "micro_batch": 4}),
                ),
            )
            .await?,
        422,
        "shape_mismatch",
    );
    // Over the 1 MiB body limit: 413.
    let (status, _) = http
        .post("/api/v1/jobs", Some(alice), &vec![b' '; 1024 * 1024 + 1])
        .await?;
    assert_eq!(status, 413);
    let every = serde_json::json!({
        "optimizer": {"kind": "sgd", "lr": 0.1, "momentum": 0.9}, "global_batch": 8, "micro_batch": 4, "steps": 5,
        "redundancy": 3, "tolerance": 0.01, "eval_every": 2, "seed": 7, "lease_timeout_ms": 5000,
        "target_accuracy": 0.99, "aggregate": "median", "clip_norm": 10.0, "adaptive": true
    });
    let (status, created) = http
        .post(
            "/api/v1/jobs",
            Some(alice),
            &job("every-field", &spec, ds, every.clone()),
        )
        .await?;
    assert_eq!(status, 201, "{created}");
    for (k, v) in every.as_object().context("object")? {
        assert_eq!(&created["hyper"][k], v, "hyper.{k} echoed");
    }
    // The job list: the owner's own jobs in full; another owner none; no token every job's public progress.
    let (_, mine) = http.get("/api/v1/jobs", Some(alice)).await?;
    assert_eq!(
        (mine.as_array().map(Vec::len), &mine[0]["owned"]),
        (Some(1), &true.into())
    );
    let (_, theirs) = http.get("/api/v1/jobs", Some(bob)).await?;
    assert_eq!(theirs, serde_json::json!([]));
    let (_, public) = http.get("/api/v1/jobs", None).await?;
    assert_eq!(
        (public.as_array().map(Vec::len), &public[0]["owned"]),
        (Some(1), &false.into())
    );
    assert!(public[0].get("hyper").is_none());
    assert_error(
        &http.get("/api/v1/jobs", Some("stk_nope")).await?,
        401,
        "unauthorized",
    );
    Ok(())
}

/// docs/API.md's hyper table, the newer fields: each out of its range is 422 `bad_hyper`; valid values (bounds
/// included) are echoed in the job status's `hyper`; a healthy job's `error` is `null`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn api_hyper_weight_schedule_decay_patience() -> anyhow::Result<()> {
    let Env { server, alice, .. } = &start("hyper", |_| ()).await?;
    let http = Http::new(server);
    let (_, up) = http
        .post("/api/v1/datasets", Some(alice), &dataset(40))
        .await?;
    let ds = up["id"].as_i64().context("dataset id")?;
    let spec: serde_json::Value = serde_json::from_str(SPEC)?;
    // Every request is valid but for the field under test (the dataset has 32 training rows).
    let job = |fields: &serde_json::Value| {
        let mut hyper = serde_json::json!({"global_batch": 8, "micro_batch": 4});
        for (k, v) in fields.as_object().into_iter().flatten() {
            hyper[k] = v.clone();
        }
        serde_json::json!({"name": "j", "spec": spec, "dataset": ds, "hyper": hyper})
            .to_string()
            .into_bytes()
    };
    // Each answer's message names what is wrong, so a case cannot pass for another reason.
    for (hyper, names) in [
        (serde_json::json!({"weight": 0}), "weight"),
        (serde_json::json!({"weight": -1}), "weight"),
        (serde_json::json!({"weight": 1000.5}), "weight"),
        (
            serde_json::json!({"lr_schedule": {"kind": "cosine", "min_ratio": 1.5}}),
            "min_ratio",
        ),
        (
            serde_json::json!({"lr_schedule": {"kind": "cosine", "min_ratio": -0.1}}),
            "min_ratio",
        ),
        (
            serde_json::json!({"lr_schedule": {"kind": "linear"}}),
            "linear",
        ),
        (serde_json::json!({"weight_decay": 1.5}), "weight_decay"),
        (serde_json::json!({"weight_decay": -0.1}), "weight_decay"),
        (serde_json::json!({"patience": 0}), "patience"),
    ] {
        let answer = http.post("/api/v1/jobs", Some(alice), &job(&hyper)).await?;
        assert_eq!(
            (answer.0, answer.1["error"]["code"].as_str()),
            (422, Some("bad_hyper")),
            "hyper {hyper}: {answer:?}"
        );
        let message = answer.1["error"]["message"].as_str().unwrap_or("");
        assert!(message.contains(names), "hyper {hyper}: {message}");
    }
    let (_, jobs) = http.get("/api/v1/jobs", Some(alice)).await?;
    assert_eq!(jobs, serde_json::json!([]), "a refused job is not created");
    for valid in [
        serde_json::json!({
            "weight": 1000.0, "weight_decay": 1.0, "patience": 1,
            "lr_schedule": {"kind": "cosine", "warmup_steps": 0, "min_ratio": 0.0}
        }),
        serde_json::json!({
            "weight": 2.5, "weight_decay": 0.5, "patience": 4,
            "lr_schedule": {"kind": "cosine", "warmup_steps": 3, "min_ratio": 1.0}
        }),
    ] {
        let (status, created) = http.post("/api/v1/jobs", Some(alice), &job(&valid)).await?;
        assert_eq!(status, 201, "{valid}: {created}");
        for (k, v) in valid.as_object().context("object")? {
            assert_eq!(&created["hyper"][k], v, "hyper.{k} echoed");
        }
        assert_eq!(
            created.get("error"),
            Some(&serde_json::Value::Null),
            "{created}"
        );
    }
    // The defaults are echoed too.
    let (status, created) = http
        .post("/api/v1/jobs", Some(alice), &job(&serde_json::json!({})))
        .await?;
    assert_eq!(status, 201, "{created}");
    let h = &created["hyper"];
    assert_eq!(
        (
            &h["weight"],
            &h["lr_schedule"],
            &h["weight_decay"],
            &h["patience"]
        ),
        (
            &1.0.into(),
            &serde_json::json!({"kind": "constant"}),
            &0.0.into(),
            &serde_json::Value::Null
        ),
        "{h}"
    );
    let (_, view) = http
        .get(&format!("/api/v1/jobs/{}", created["id"]), Some(alice))
        .await?;
    assert_eq!(view.get("error"), Some(&serde_json::Value::Null), "{view}");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn api_job_control_and_checkpoint_errors() -> anyhow::Result<()> {
    let Env { server, alice, .. } = &start("control", |_| ()).await?;
    let http = Http::new(server);
    let (_, job) = create_job(&http, alice, one_micro(2)).await?;
    let base = format!("/api/v1/jobs/{job}");
    let (status, paused) = http
        .post(&format!("{base}/pause"), Some(alice), b"")
        .await?;
    assert_eq!((status, &paused["status"]), (200, &"paused".into()));
    let (status, running) = http
        .post(&format!("{base}/resume"), Some(alice), b"")
        .await?;
    assert_eq!((status, &running["status"]), (200, &"running".into()));
    assert_error(
        &http
            .get(&format!("{base}/checkpoint?which=best"), Some(alice))
            .await?,
        404,
        "not_found",
    );
    assert_error(
        &http
            .get(&format!("{base}/checkpoint?which=worst"), Some(alice))
            .await?,
        422,
        "bad_request",
    );
    let (status, _) = http.get(&format!("{base}/checkpoint"), Some(alice)).await?;
    assert_eq!(status, 200);
    let (status, cancelled) = http
        .post(&format!("{base}/cancel"), Some(alice), b"")
        .await?;
    assert_eq!((status, &cancelled["status"]), (200, &"cancelled".into()));
    assert_error(
        &http
            .post(&format!("{base}/resume"), Some(alice), b"")
            .await?,
        409,
        "conflict",
    );
    let (status, metrics) = http.get(&format!("{base}/metrics"), None).await?;
    assert_eq!((status, metrics), (200, serde_json::json!([])));
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn api_workers_credits_ledger_and_prometheus() -> anyhow::Result<()> {
    let Env { server, .. } = &start("credits", |_| ()).await?;
    let http = Http::new(server);
    let (_ws, worker, token) = join(server, None).await?;
    let (status, workers) = http.get("/api/v1/workers", None).await?;
    assert_eq!(status, 200);
    assert_eq!(
        (
            &workers[0]["id"],
            &workers[0]["connected"],
            &workers[0]["refused"]
        ),
        (&worker.into(), &true.into(), &false.into())
    );
    let (status, credits) = http.get("/api/v1/credits", None).await?;
    assert_eq!(
        (status, credits["ledger_head"].as_str().map(str::len)),
        (200, Some(64))
    );
    let path = format!("/api/v1/credits/{worker}");
    assert_error(&http.get(&path, None).await?, 401, "unauthorized");
    assert_error(
        &http.get(&format!("{path}?token=wrong"), None).await?,
        401,
        "unauthorized",
    );
    let (status, own) = http
        .get(&format!("{path}?token={token}&limit=10"), None)
        .await?;
    assert_eq!(
        (status, &own["id"], &own["total_entries"]),
        (200, &worker.into(), &0.into())
    );
    let (status, text) = http.get("/metrics", None).await?;
    assert_eq!(status, 200);
    assert!(
        text.as_str()
            .is_some_and(|t| t.contains("starling_workers_connected{backend=\"cpu\"} 1")),
        "{text}"
    );
    Ok(())
}
