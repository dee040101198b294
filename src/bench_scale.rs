//! `mes bench-scale`: memory per work-center actor and per open-order actor, measured as
//! the resident set of a child `mes serve` loaded with many of each, against the same
//! server with almost none — in one run.

use crate::bench_http::{free_port, Kill};
use anyhow::Context;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// A plant of `n` work centers, each an MQTT device turning RAW into PART.
pub fn plant(n: usize) -> String {
    let mut p = String::from(
        "[[materials]]\nsku = \"RAW\"\nstandard_cost = \"1.00\"\n[[materials]]\nsku = \"PART\"\nstandard_cost = \"2.00\"\n\
         [[boms]]\nsku = \"PART\"\ncomponents = [{ sku = \"RAW\", quantity = \"1\" }]\n\
         [[buffers]]\nid = \"RM\"\nsku = \"RAW\"\ncapacity = 1000000000\ninitial = 100000000\n\
         [[buffers]]\nid = \"OUT\"\nsku = \"PART\"\ncapacity = 1000000000\ninitial = 0\n",
    );
    for i in 0..n {
        p.push_str(&format!(
            "[[work_centers]]\nid = \"WC-{i:05}\"\ninputs = [\"RM\"]\noutput = \"OUT\"\ndevice = {{ mqtt = {{ id = \"dev-{i:05}\" }} }}\n"
        ));
    }
    p
}

fn rss_kib(pid: u32) -> anyhow::Result<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:").and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok()))
        .context("no VmRSS")
}

/// Starts `mes serve` on `plant`, with `orders` open orders inserted first; returns its
/// resident set once ready and settled.
async fn measure(exe: &std::path::Path, dir: &std::path::Path, wcs: usize, orders: usize) -> anyhow::Result<u64> {
    let _ = std::fs::remove_dir_all(dir);
    std::fs::create_dir_all(dir)?;
    std::fs::write(dir.join("plant.toml"), plant(wcs))?;
    let (http, mqtt) = (free_port()?, free_port()?);
    let db = format!("sqlite://{}/mes.db", dir.display());
    let config = format!(
        "[http]\nlisten = \"127.0.0.1:{http}\"\n[database]\nurl = \"{db}\"\n[mqtt]\nurl = \"mqtt://127.0.0.1:{mqtt}\"\n\
         client_id = \"mes-bench-scale\"\nembedded_broker = \"127.0.0.1:{mqtt}\"\n[plant]\nfile = \"{}/plant.toml\"\n",
        dir.display()
    );
    std::fs::write(dir.join("mes.toml"), &config)?;
    // Master data first (`mes migrate`), then the open orders straight into the database.
    let ok = Command::new(exe)
        .args(["migrate", "--config"])
        .arg(dir.join("mes.toml"))
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()?
        .success();
    anyhow::ensure!(ok, "mes migrate failed");
    if orders > 0 {
        let store = crate::db::Store::connect(&db, 2).await?;
        store.insert_bench_orders(orders, wcs).await?;
    }
    let child = Kill(
        Command::new(exe)
            .args(["serve", "--config"])
            .arg(dir.join("mes.toml"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()?,
    );
    let client = reqwest::Client::builder().timeout(Duration::from_secs(5)).build()?;
    let deadline = Instant::now() + Duration::from_secs(300);
    loop {
        if let Ok(r) = client.get(format!("http://127.0.0.1:{http}/readyz")).send().await {
            if r.status().is_success() {
                break;
            }
        }
        anyhow::ensure!(Instant::now() < deadline, "mes serve not ready in 300 s");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    // Let start-up allocations settle (the live OEE refresh runs every 5 s).
    tokio::time::sleep(Duration::from_secs(8)).await;
    rss_kib(child.0.id())
}

/// The work-center actor alone, idle: `n` actors started in this process on their own
/// actix system, measured as the growth of this process's resident set in two steps —
/// their states built (as a restart rebuilds them: ids, device, current order, cursor,
/// totals), then the actors started from them (mailbox, context, task). Returns the KiB
/// of each step.
fn actors_alone(n: usize) -> anyhow::Result<(u64, u64)> {
    use actix::Actor;
    let handle = std::thread::spawn(move || -> anyhow::Result<(u64, u64)> {
        actix_rt::System::new().block_on(async move {
            let me = std::process::id();
            let before = rss_kib(me)?;
            let states: Vec<mes_actors::WorkCenterState> = (0..n)
                .map(|i| {
                    let mut st = mes_actors::WorkCenterState::new(format!("WC-{i:05}"), format!("dev-{i:05}"));
                    st.current_order = Some(format!("PO-{i:06}"));
                    st.cursor =
                        Some(mes_actors::counter::Cursor { boot: 3, seq: 1_000 + i as u64, good: 500, scrap: 7 });
                    st.good_total = 10_000;
                    st.scrap_total = 70;
                    st.last_ts_ms = Some(1_795_000_000_000);
                    st
                })
                .collect();
            tokio::time::sleep(std::time::Duration::from_millis(300)).await;
            let with_states = rss_kib(me)?;
            let addrs: Vec<_> =
                states.into_iter().map(|st| mes_actors::actor::WorkCenterActor::new(st).start()).collect();
            tokio::time::sleep(std::time::Duration::from_millis(1_000)).await;
            let with_actors = rss_kib(me)?;
            drop(addrs);
            Ok((with_states.saturating_sub(before), with_actors.saturating_sub(with_states)))
        })
    });
    handle.join().map_err(|_| anyhow::anyhow!("actor measurement panicked"))?
}

pub async fn run(wcs: usize, orders: usize) -> anyhow::Result<String> {
    let exe = std::env::current_exe()?;
    let base = std::path::PathBuf::from("mes-data/bench-scale");
    eprintln!("bench-scale: [1/4] 10 work centers, no orders …");
    let small = measure(&exe, &base.join("small"), 10, 0).await?;
    eprintln!("bench-scale: [2/4] {wcs} work centers …");
    let many_wc = measure(&exe, &base.join("wcs"), wcs, 0).await?;
    eprintln!("bench-scale: [3/4] {wcs} work centers and {orders} open orders …");
    let many_orders = measure(&exe, &base.join("orders"), wcs, orders).await?;
    eprintln!("bench-scale: [4/4] {wcs} idle work-center actors alone, in this process …");
    let (states_kib, actors_kib) = actors_alone(wcs)?;
    let state_b = states_kib as f64 * 1024.0 / wcs as f64;
    let actor_b = actors_kib as f64 * 1024.0 / wcs as f64;
    let per_wc = (many_wc.saturating_sub(small) as f64 * 1024.0) / (wcs.saturating_sub(10).max(1)) as f64;
    let per_order = (many_orders.saturating_sub(many_wc) as f64 * 1024.0) / orders.max(1) as f64;
    let md = format!(
        "| server loaded with | RSS (MiB) | per item |\n|---|---:|---:|\n\
         | 10 work centers, no orders | {:.1} | |\n\
         | {wcs} work centers | {:.1} | {:.0} B per work center |\n\
         | {wcs} work centers + {orders} open orders | {:.1} | {:.0} B per open order |\n\
         | {wcs} idle work-center actors alone (state {:.0} B + actor {:.0} B) | {:.1} | {:.0} B per actor |\n",
        small as f64 / 1024.0,
        many_wc as f64 / 1024.0,
        per_wc,
        many_orders as f64 / 1024.0,
        per_order,
        state_b,
        actor_b,
        (states_kib + actors_kib) as f64 / 1024.0,
        state_b + actor_b
    );
    let out = std::path::PathBuf::from("target/bench");
    std::fs::create_dir_all(&out)?;
    std::fs::write(out.join("scale.md"), &md)?;
    std::fs::write(
        out.join("scale.json"),
        serde_json::json!({"work_centers": wcs, "orders": orders, "rss_kib": {"small": small, "work_centers": many_wc,
            "orders": many_orders}, "bytes_per_work_center": per_wc, "bytes_per_order": per_order,
            "actor_alone": {"state_bytes": state_b, "actor_bytes": actor_b, "bytes_per_actor": state_b + actor_b}})
        .to_string(),
    )?;
    Ok(md)
}
