//! `mes bench-http`: planner API requests per second and p99 latency, next to a trivial
//! actix-web handler measured in the same run on the same machine.
//!
//! Three processes: this one generates the load (keep-alive connections, a fixed number
//! in flight); a child `mes serve` (SQLite, embedded broker, the MQTT line plant) answers
//! `GET /api/v1/work-centers` and `POST /api/v1/reservations`; a child
//! `mes bench-http --trivial-server` answers `GET /ping` with a constant JSON body and
//! the same worker count. The ratio of each route's rate to the trivial rate is the figure
//! worth comparing across machines.

use anyhow::Context;
use serde_json::json;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// The trivial baseline server (run in its own process by the benchmark).
pub async fn trivial_server(port: u16) -> anyhow::Result<()> {
    use actix_web::{web, App, HttpResponse, HttpServer};
    HttpServer::new(|| {
        App::new().route("/ping", web::get().to(|| async { HttpResponse::Ok().json(json!({"status": "ok"})) }))
    })
    .workers(2)
    .bind(("127.0.0.1", port))?
    .run()
    .await?;
    Ok(())
}

/// Kills the child process on drop (a failed benchmark leaves no server behind).
pub(crate) struct Kill(pub(crate) Child);
impl Drop for Kill {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

pub(crate) use crate::free_port;

async fn wait_up(client: &reqwest::Client, url: &str) -> anyhow::Result<()> {
    let deadline = Instant::now() + Duration::from_secs(60);
    while Instant::now() < deadline {
        if let Ok(r) = client.get(url).send().await {
            if r.status().is_success() {
                return Ok(());
            }
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    anyhow::bail!("{url} did not come up")
}

/// One measured route.
pub struct Figure {
    pub name: &'static str,
    pub requests: u64,
    pub errors: u64,
    pub per_s: f64,
    pub p50_ms: f64,
    pub p99_ms: f64,
}

/// Drives `make` from `concurrency` tasks for `secs`, after a one-second warm-up.
async fn drive<F, Fut>(name: &'static str, concurrency: usize, secs: u64, make: F) -> Figure
where
    F: Fn(u64) -> Fut + Send + Sync + 'static,
    Fut: std::future::Future<Output = bool> + Send,
{
    let make = Arc::new(make);
    let seq = Arc::new(AtomicU64::new(0));
    // Warm-up: connections opened, caches filled.
    let warm = Instant::now() + Duration::from_secs(1);
    let mut tasks = Vec::new();
    for _ in 0..concurrency {
        let (make, seq) = (make.clone(), seq.clone());
        tasks.push(tokio::spawn(async move {
            while Instant::now() < warm {
                make(seq.fetch_add(1, Relaxed)).await;
            }
        }));
    }
    for t in tasks {
        let _ = t.await;
    }
    let errors = Arc::new(AtomicU64::new(0));
    let start = Instant::now();
    let end = start + Duration::from_secs(secs);
    let mut tasks = Vec::new();
    for _ in 0..concurrency {
        let (make, seq, errors) = (make.clone(), seq.clone(), errors.clone());
        tasks.push(tokio::spawn(async move {
            // Exact latencies in µs; bounded by the run's length (a few MB at most).
            let mut lat: Vec<u32> = Vec::new();
            while Instant::now() < end {
                let t = Instant::now();
                if make(seq.fetch_add(1, Relaxed)).await {
                    lat.push(t.elapsed().as_micros().min(u128::from(u32::MAX)) as u32);
                } else {
                    errors.fetch_add(1, Relaxed);
                }
            }
            lat
        }));
    }
    let mut all: Vec<u32> = Vec::new();
    for t in tasks {
        all.extend(t.await.unwrap_or_default());
    }
    let elapsed = start.elapsed().as_secs_f64();
    all.sort_unstable();
    let q = |p: f64| {
        all.get(((all.len() as f64 * p) as usize).min(all.len().saturating_sub(1))).map_or(0.0, |v| *v as f64 / 1000.0)
    };
    let n = all.len() as u64;
    Figure {
        name,
        requests: n,
        errors: errors.load(Relaxed),
        per_s: n as f64 / elapsed,
        p50_ms: q(0.5),
        p99_ms: q(0.99),
    }
}

/// Runs the benchmark; returns the Markdown table it also prints and writes.
pub async fn run(concurrency: usize, secs: u64) -> anyhow::Result<String> {
    let exe = std::env::current_exe().context("own executable")?;
    let dir = std::path::PathBuf::from("mes-data/bench-http");
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir)?;
    let (api_port, mqtt_port, trivial_port) = (free_port()?, free_port()?, free_port()?);
    std::fs::write(dir.join("plant.toml"), crate::plant::MQTT_LINE)?;
    let config = format!(
        "[http]\nlisten = \"127.0.0.1:{api_port}\"\n[database]\nurl = \"sqlite://{}/mes.db\"\n\
         [mqtt]\nurl = \"mqtt://127.0.0.1:{mqtt_port}\"\nclient_id = \"mes-bench-http\"\nembedded_broker = \"127.0.0.1:{mqtt_port}\"\n\
         [plant]\nfile = \"{}/plant.toml\"\n",
        dir.display(),
        dir.display()
    );
    std::fs::write(dir.join("mes.toml"), config)?;
    let quiet = |c: &mut Command| {
        c.stdout(Stdio::null()).stderr(Stdio::null());
    };
    let mut mes_cmd = Command::new(&exe);
    mes_cmd.args(["serve", "--config"]).arg(dir.join("mes.toml"));
    quiet(&mut mes_cmd);
    let _mes = Kill(mes_cmd.spawn().context("start mes serve")?);
    let mut trivial_cmd = Command::new(&exe);
    trivial_cmd.args(["bench-http", "--trivial-server", &trivial_port.to_string()]);
    quiet(&mut trivial_cmd);
    let _trivial = Kill(trivial_cmd.spawn().context("start the trivial server")?);

    let client =
        reqwest::Client::builder().pool_max_idle_per_host(concurrency).timeout(Duration::from_secs(10)).build()?;
    let api = format!("http://127.0.0.1:{api_port}");
    let trivial = format!("http://127.0.0.1:{trivial_port}");
    wait_up(&client, &format!("{api}/readyz")).await?;
    wait_up(&client, &format!("{trivial}/ping")).await?;
    eprintln!("bench-http: {concurrency} requests in flight, {secs} s per route");

    let mut figures = Vec::new();
    let (c, url) = (client.clone(), format!("{trivial}/ping"));
    eprintln!("  [1/3] trivial actix-web handler …");
    figures.push(
        drive("trivial GET /ping", concurrency, secs, move |_| {
            let (c, url) = (c.clone(), url.clone());
            async move { c.get(&url).send().await.is_ok_and(|r| r.status().is_success()) }
        })
        .await,
    );
    let (c, url) = (client.clone(), format!("{api}/api/v1/work-centers"));
    eprintln!("  [2/3] GET /api/v1/work-centers …");
    figures.push(
        drive("GET /api/v1/work-centers", concurrency, secs, move |_| {
            let (c, url) = (c.clone(), url.clone());
            async move { c.get(&url).send().await.is_ok_and(|r| r.status().is_success()) }
        })
        .await,
    );
    let (c, url) = (client.clone(), format!("{api}/api/v1/reservations"));
    eprintln!("  [3/3] POST /api/v1/reservations …");
    let run_id = crate::now_ms();
    figures.push(
        drive("POST /api/v1/reservations", concurrency, secs, move |n| {
            let (c, url) = (c.clone(), url.clone());
            let body = json!({"sku": "MOTOR", "quantity": 1, "ref": format!("bench-{run_id}-{n}")});
            async move { c.post(&url).json(&body).send().await.is_ok_and(|r| r.status().as_u16() == 201) }
        })
        .await,
    );
    // No oversell: what was reserved never exceeds what was on hand.
    let inv: serde_json::Value = client.get(format!("{api}/api/v1/inventory/MOTOR")).send().await?.json().await?;
    let (on_hand, reserved) = (inv["on_hand"].as_i64().unwrap_or(0), inv["reserved"].as_i64().unwrap_or(0));
    anyhow::ensure!(reserved <= on_hand, "oversold: reserved {reserved} > on hand {on_hand}");

    let base = figures[0].per_s.max(f64::MIN_POSITIVE);
    let mut md = String::from(
        "| route | requests | errors | req/s | ratio to trivial | p50 ms | p99 ms |\n|---|---:|---:|---:|---:|---:|---:|\n",
    );
    for f in &figures {
        md.push_str(&format!(
            "| {} | {} | {} | {:.0} | {:.2} | {:.2} | {:.2} |\n",
            f.name,
            f.requests,
            f.errors,
            f.per_s,
            f.per_s / base,
            f.p50_ms,
            f.p99_ms
        ));
    }
    md.push_str(&format!("\nMOTOR after the run: on hand {on_hand}, reserved {reserved} (never above on hand).\n"));
    let out = std::path::PathBuf::from("target/bench");
    std::fs::create_dir_all(&out)?;
    std::fs::write(out.join("http.md"), &md)?;
    let js: Vec<serde_json::Value> = figures
        .iter()
        .map(|f| {
            json!({"route": f.name, "requests": f.requests, "errors": f.errors, "per_s": f.per_s,
                   "ratio": f.per_s / base, "p50_ms": f.p50_ms, "p99_ms": f.p99_ms})
        })
        .collect();
    std::fs::write(
        out.join("http.json"),
        serde_json::to_string_pretty(&json!({"concurrency": concurrency, "seconds": secs, "routes": js}))?,
    )?;
    Ok(md)
}
