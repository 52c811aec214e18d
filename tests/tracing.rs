//! Traces across the cluster: with an OTLP endpoint configured, one request produces one trace whose
//! spans come from the gateway, the scheduler and the worker processes, linked parent to child, and
//! the JSON log lines of that request carry the same trace id.

use std::collections::HashMap;
use std::time::Duration;

use kiln_e2e::{completed, with_key, Cluster, Options, API_KEY};
use kiln_proto::v1::{GenerateRequest, SamplingParams};
use kiln_testkit::{OtlpReceiver, ReceivedSpan};

const PROMPT: &str = "a green circle left of a purple square";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_request_is_one_trace_through_gateway_scheduler_and_worker() {
    let receiver = OtlpReceiver::start().await;
    let cluster = Cluster::start_with(Options {
        env: vec![
            (
                "KILN_TRACE_OTLP_ENDPOINT".into(),
                receiver.endpoint().into(),
            ),
            ("KILN_LOG_FORMAT".into(), "json".into()),
        ],
        ..Default::default()
    })
    .await;
    // The caller's own trace: the gateway continues it rather than starting a new one.
    let caller_trace = "4bf92f3577b34da6a3ce929d0e0e4736";
    let mut request = with_key(
        API_KEY,
        GenerateRequest {
            prompt: PROMPT.into(),
            width: 32,
            height: 32,
            request_id: "traced-1".into(),
            sampling: Some(SamplingParams {
                temperature: 1.0,
                has_temperature: true,
                top_p: 1.0,
                seed: 7,
                ..Default::default()
            }),
            ..Default::default()
        },
    );
    request.metadata_mut().insert(
        "traceparent",
        format!("00-{caller_trace}-00f067aa0ba902b7-01")
            .parse()
            .unwrap(),
    );
    let mut stream = cluster
        .client()
        .await
        .generate(request)
        .await
        .expect("generate accepted")
        .into_inner();
    let mut events = Vec::new();
    while let Some(event) = futures::StreamExt::next(&mut stream).await {
        events.push(event.expect("event"));
    }
    assert!(completed(&events).is_some(), "no image: {events:?}");

    let has_all = |spans: &[ReceivedSpan]| {
        let names: Vec<_> = spans
            .iter()
            .filter(|s| s.trace_id == caller_trace)
            .map(|s| (s.service.as_str(), s.name.as_str()))
            .collect();
        names.contains(&("kiln-gateway", "generate"))
            && names.contains(&("kiln-scheduler", "job"))
            && names.contains(&("kiln-worker", "sequence"))
            && names.contains(&("kiln-worker", "step"))
    };
    let spans = receiver.wait_for(Duration::from_secs(20), has_all).await;
    let trace: Vec<&ReceivedSpan> = spans
        .iter()
        .filter(|s| s.trace_id == caller_trace)
        .collect();
    assert!(has_all(&spans), "spans of the trace: {trace:#?}");

    let by_id: HashMap<&str, &ReceivedSpan> =
        trace.iter().map(|s| (s.span_id.as_str(), *s)).collect();
    let parent_of = |s: &ReceivedSpan| {
        by_id
            .get(s.parent_span_id.as_str())
            .map(|p| p.name.as_str())
    };
    let one = |service: &str, name: &str| {
        *trace
            .iter()
            .find(|s| s.service == service && s.name == name)
            .unwrap()
    };
    let generate = one("kiln-gateway", "generate");
    assert_eq!(
        generate.parent_span_id, "00f067aa0ba902b7",
        "the caller's span is the parent"
    );
    assert_eq!(
        generate.attributes.get("request_id").map(String::as_str),
        Some("traced-1")
    );
    assert_eq!(
        generate.attributes.get("tier").map(String::as_str),
        Some("pro")
    );
    assert_eq!(parent_of(one("kiln-scheduler", "job")), Some("generate"));
    assert_eq!(parent_of(one("kiln-worker", "sequence")), Some("job"));
    let steps: Vec<_> = trace.iter().filter(|s| s.name == "step").collect();
    assert!(steps.iter().all(|s| parent_of(s) == Some("sequence")));
    let phases: Vec<_> = steps
        .iter()
        .filter_map(|s| s.attributes.get("phase"))
        .collect();
    assert!(phases.iter().any(|p| *p == "prefill") && phases.iter().any(|p| *p == "decode"));

    // Neither the key nor the prompt is exported.
    for span in &trace {
        for value in span.attributes.values() {
            assert!(
                !value.contains(API_KEY) && !value.contains(PROMPT),
                "{span:?}"
            );
        }
    }
    // Log lines of the request carry its trace id.
    let gateway_log = cluster.log("gateway");
    let line = gateway_log
        .lines()
        .find(|l| l.contains("request accepted") && l.contains("traced-1"))
        .unwrap_or_else(|| panic!("no log line for the request:\n{gateway_log}"));
    assert!(line.contains(caller_trace), "{line}");
    assert!(!line.contains(API_KEY), "{line}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_http_front_door_continues_the_callers_trace() {
    let receiver = OtlpReceiver::start().await;
    let http = format!("127.0.0.1:{}", kiln_testkit::free_port());
    let _cluster = Cluster::start_with(Options {
        env: vec![(
            "KILN_TRACE_OTLP_ENDPOINT".into(),
            receiver.endpoint().into(),
        )],
        gateway_args: vec!["--http-listen".into(), http.clone()],
        ..Default::default()
    })
    .await;
    let caller_trace = "5cf92f3577b34da6a3ce929d0e0e4737";
    let body = r#"{"prompt": "a red star", "size": "32x32"}"#;
    let request = format!(
        "POST /v1/images/generations HTTP/1.1\r\nHost: {http}\r\nAuthorization: Bearer {API_KEY}\r\n\
         traceparent: 00-{caller_trace}-00f067aa0ba902b7-01\r\nx-request-id: http-traced-1\r\n\
         Content-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    let answer = tokio::task::spawn_blocking(move || {
        use std::io::{Read, Write};
        let mut stream = std::net::TcpStream::connect(&http).expect("the HTTP API");
        stream.write_all(request.as_bytes()).unwrap();
        let mut answer = String::new();
        stream.read_to_string(&mut answer).unwrap();
        answer
    })
    .await
    .unwrap();
    assert!(
        answer.starts_with("HTTP/1.1 200"),
        "{}",
        &answer[..answer.len().min(400)]
    );
    assert!(answer
        .to_ascii_lowercase()
        .contains("x-request-id: http-traced-1"));

    let in_trace = |spans: &[ReceivedSpan], name: &str| {
        spans
            .iter()
            .any(|s| s.trace_id == caller_trace && s.name == name)
    };
    // The gateway and the scheduler export from separate processes, each on its own batch
    // timer: wait for both spans rather than for the first to arrive.
    let spans = receiver
        .wait_for(Duration::from_secs(20), |spans| {
            in_trace(spans, "job") && in_trace(spans, "generate")
        })
        .await;
    let generate = spans
        .iter()
        .find(|s| s.trace_id == caller_trace && s.name == "generate")
        .unwrap_or_else(|| panic!("no generate span in the caller's trace: {spans:#?}"));
    assert_eq!(generate.parent_span_id, "00f067aa0ba902b7");
    assert_eq!(
        generate.attributes.get("protocol").map(String::as_str),
        Some("http")
    );
    assert_eq!(
        generate.attributes.get("request_id").map(String::as_str),
        Some("http-traced-1")
    );
    assert!(
        in_trace(&spans, "job"),
        "the scheduler's span joined the trace"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unsampled_requests_export_nothing() {
    let receiver = OtlpReceiver::start().await;
    let cluster = Cluster::start_with(Options {
        env: vec![
            (
                "KILN_TRACE_OTLP_ENDPOINT".into(),
                receiver.endpoint().into(),
            ),
            ("KILN_TRACE_SAMPLE_RATIO".into(), "0".into()),
        ],
        ..Default::default()
    })
    .await;
    let events = cluster
        .generate(GenerateRequest {
            prompt: PROMPT.into(),
            width: 32,
            height: 32,
            ..Default::default()
        })
        .await
        .expect("generate");
    assert!(completed(&events).is_some());
    // Exports run every 500 ms; wait long enough for a stray span to arrive.
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(receiver.spans(), Vec::new());
}
