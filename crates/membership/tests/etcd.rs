//! Membership against a real etcd: registration with leases, graceful and crashed departures, a
//! watch that survives an etcd restart, and leader election with failover.

use std::time::Duration;

use kiln_membership::{
    campaign, follow_leader, register_worker, watch_workers, EtcdConfig, MembershipEvent,
    WorkerRecord,
};
use kiln_testkit::EtcdServer;
use tokio::sync::mpsc::UnboundedReceiver;

fn config(etcd: &EtcdServer) -> EtcdConfig {
    EtcdConfig {
        lease_ttl: Duration::from_secs(2),
        ..EtcdConfig::new(vec![etcd.endpoint()])
    }
}

fn record(name: &str) -> WorkerRecord {
    WorkerRecord {
        name: name.into(),
        address: format!("http://127.0.0.1:1/{name}"),
        model: "m@1".into(),
        device: "cpu".into(),
        kv_blocks: 64,
        block_size: 16,
        max_batch: 8,
    }
}

async fn next(rx: &mut UnboundedReceiver<MembershipEvent>, within: Duration) -> MembershipEvent {
    tokio::time::timeout(within, rx.recv())
        .await
        .expect("membership event in time")
        .expect("watch alive")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn workers_join_leave_gracefully_and_vanish_when_they_crash() {
    let etcd = EtcdServer::start();
    let config = config(&etcd);
    let mut events = watch_workers(config.clone());
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let graceful = tokio::spawn(register_worker(config.clone(), record("a"), async {
        let _ = stopped.await;
    }));
    assert_eq!(
        next(&mut events, Duration::from_secs(5)).await,
        MembershipEvent::Up(record("a"))
    );
    let crashing = tokio::spawn(register_worker(
        config.clone(),
        record("b"),
        std::future::pending(),
    ));
    assert_eq!(
        next(&mut events, Duration::from_secs(5)).await,
        MembershipEvent::Up(record("b"))
    );

    // Graceful stop deletes the key at once.
    let _ = stop.send(());
    graceful.await.unwrap();
    assert_eq!(
        next(&mut events, Duration::from_millis(1500)).await,
        MembershipEvent::Down { name: "a".into() }
    );
    // A crash stops the keep-alives: the key goes when the lease lapses.
    crashing.abort();
    assert_eq!(
        next(&mut events, Duration::from_secs(6)).await,
        MembershipEvent::Down { name: "b".into() }
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_watch_resumes_after_an_etcd_restart() {
    let mut etcd = EtcdServer::start();
    let config = config(&etcd);
    let mut events = watch_workers(config.clone());
    let _a = tokio::spawn(register_worker(
        config.clone(),
        record("a"),
        std::future::pending(),
    ));
    assert_eq!(
        next(&mut events, Duration::from_secs(5)).await,
        MembershipEvent::Up(record("a"))
    );
    etcd.kill();
    tokio::time::sleep(Duration::from_millis(500)).await;
    etcd.restart();
    // A worker joining after the restart is seen; the known one is not reported again or lost
    // (its registration renews its lease, or registers anew if the lease lapsed meanwhile).
    let _c = tokio::spawn(register_worker(
        config.clone(),
        record("c"),
        std::future::pending(),
    ));
    let mut seen = Vec::new();
    while !seen.contains(&MembershipEvent::Up(record("c"))) {
        seen.push(next(&mut events, Duration::from_secs(15)).await);
    }
    assert!(
        !seen.contains(&MembershipEvent::Down { name: "a".into() })
            || seen.contains(&MembershipEvent::Up(record("a"))),
        "a lost: {seen:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_scheduler_leads_and_a_standby_takes_over() {
    let etcd = EtcdServer::start();
    let config = config(&etcd);
    let mut leader = follow_leader(config.clone());
    let first = campaign(&config, "http://scheduler-1").await;
    leader
        .wait_for(|l| l.as_deref() == Some("http://scheduler-1"))
        .await
        .unwrap();
    let standby = {
        let config = config.clone();
        tokio::spawn(async move { campaign(&config, "http://scheduler-2").await })
    };
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(!standby.is_finished(), "two leaders at once");
    first.resign().await;
    let mut second = tokio::time::timeout(Duration::from_secs(5), standby)
        .await
        .expect("standby elected")
        .unwrap();
    tokio::time::timeout(
        Duration::from_secs(5),
        leader.wait_for(|l| l.as_deref() == Some("http://scheduler-2")),
    )
    .await
    .expect("gateways see the new leader")
    .unwrap();
    // Leadership is kept while the lease is renewed.
    assert!(tokio::time::timeout(Duration::from_secs(3), second.lost())
        .await
        .is_err());
}
