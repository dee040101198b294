//! `mes bench`: end-to-end committed telemetry per second next to the raw broker rate,
//! measured in the same run on the same embedded broker.
//!
//! Baseline: one publisher → one subscriber that does nothing (QoS 1, automatic acks).
//! MES: the same publisher → the MES (parse, actor, group commit, ack after commit);
//! the clock stops when the last message is committed.

use crate::app::Handle;
use rumqttc::{AsyncClient, Event, MqttOptions, Packet, QoS};
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::Arc;
use std::time::{Duration, Instant};

fn options(id: &str, addr: &str) -> anyhow::Result<MqttOptions> {
    let (host, port) = addr.rsplit_once(':').ok_or_else(|| anyhow::anyhow!("bad broker address {addr}"))?;
    let mut o = MqttOptions::new(id, host, port.parse()?);
    o.set_keep_alive(Duration::from_secs(30)).set_inflight(1000).set_clean_session(true);
    Ok(o)
}

fn payload(device_seq: u64) -> Vec<u8> {
    format!(
        r#"{{"boot":1,"seq":{device_seq},"good":{},"scrap":{},"state":"running","ts":"2026-11-11T00:00:00.000Z","metrics":{{"temp_c":71.5}}}}"#,
        device_seq * 2,
        device_seq / 50
    )
    .into_bytes()
}

/// Publishes `n` messages round-robin over `devices` under `prefix`; returns when all are acked by the broker.
async fn publish(addr: &str, prefix: &str, devices: &[String], n: u64) -> anyhow::Result<()> {
    let (client, mut el) = AsyncClient::new(options("bench-pub", addr)?, 10_000);
    let acked = Arc::new(AtomicU64::new(0));
    let a = acked.clone();
    let poller = tokio::spawn(async move {
        loop {
            match el.poll().await {
                Ok(Event::Incoming(Packet::PubAck(_))) => {
                    a.fetch_add(1, Relaxed);
                }
                Ok(_) => {}
                Err(_) => tokio::time::sleep(Duration::from_millis(50)).await,
            }
        }
    });
    let d = devices.len().max(1) as u64;
    for i in 0..n {
        let dev = &devices[(i % d) as usize];
        let seq = i / d + 1;
        client.publish(format!("{prefix}/devices/{dev}/telemetry"), QoS::AtLeastOnce, false, payload(seq)).await?;
    }
    let deadline = Instant::now() + Duration::from_secs(300);
    while acked.load(Relaxed) < n && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    poller.abort();
    Ok(())
}

/// Raw broker rate: messages per second received by a subscriber that does nothing.
async fn baseline(addr: &str, devices: &[String], n: u64) -> anyhow::Result<f64> {
    let (sub, mut el) = AsyncClient::new(options("bench-sub", addr)?, 1000);
    sub.subscribe("bench-raw/devices/+/telemetry", QoS::AtLeastOnce).await?;
    let got = Arc::new(AtomicU64::new(0));
    let g = got.clone();
    let (ready_tx, ready_rx) = tokio::sync::oneshot::channel();
    let mut ready_tx = Some(ready_tx);
    let subscriber = tokio::spawn(async move {
        loop {
            match el.poll().await {
                Ok(Event::Incoming(Packet::SubAck(_))) => {
                    if let Some(t) = ready_tx.take() {
                        let _ = t.send(());
                    }
                }
                Ok(Event::Incoming(Packet::Publish(_))) => {
                    g.fetch_add(1, Relaxed);
                }
                Ok(_) => {}
                Err(_) => tokio::time::sleep(Duration::from_millis(50)).await,
            }
        }
    });
    let _ = tokio::time::timeout(Duration::from_secs(5), ready_rx).await;
    let started = Instant::now();
    publish(addr, "bench-raw", devices, n).await?;
    let deadline = Instant::now() + Duration::from_secs(300);
    while got.load(Relaxed) < n && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    let secs = started.elapsed().as_secs_f64();
    subscriber.abort();
    Ok(got.load(Relaxed) as f64 / secs)
}

/// Runs both measurements against the running MES; prints and returns (baseline, mes) rates.
pub async fn run(
    handle: &Handle,
    broker: &str,
    prefix: &str,
    devices: Vec<String>,
    n: u64,
) -> anyhow::Result<(f64, f64)> {
    eprintln!("[bench] baseline: {n} messages through the broker to a no-op subscriber...");
    let raw = baseline(broker, &devices, n).await?;
    eprintln!("[bench] baseline: {raw:.0} msg/s");
    eprintln!("[bench] MES: {n} telemetry messages over {} devices, timed until committed...", devices.len());
    let before = handle.metrics.committed_jobs.load(Relaxed);
    let started = Instant::now();
    publish(broker, prefix, &devices, n).await?;
    let deadline = Instant::now() + Duration::from_secs(600);
    while handle.metrics.committed_jobs.load(Relaxed) - before < n && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    let secs = started.elapsed().as_secs_f64();
    let committed = handle.metrics.committed_jobs.load(Relaxed) - before;
    let mes = committed as f64 / secs;
    let commits = handle.metrics.commits.load(Relaxed).max(1);
    println!("\nbenchmark: {n} messages, {} devices, database {}", devices.len(), handle.store.backend_name());
    println!("  raw broker (publisher -> no-op subscriber): {raw:>10.0} msg/s");
    println!("  MES end to end (committed, acked after commit): {mes:>10.0} msg/s");
    println!("  ratio MES / raw broker: {:.2}", mes / raw);
    println!(
        "  committed {committed} in {secs:.2} s; mean batch {:.0} readings per commit",
        committed as f64 / commits as f64
    );
    Ok((raw, mes))
}
