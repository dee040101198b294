//! The dashboard in a real browser: headless Chromium, driven over the W3C WebDriver
//! protocol by `chromedriver`, loads `/` from an MES fed by the line simulator; values
//! appear, match the API, and change; a screenshot is saved under `target/test-output/`.
//!
//! Needs Debian's `chromium` and `chromium-driver` (`.ci/run` installs them); skipped
//! with a message when they are missing.

use crate::harness::{free_port, Mes, MesOptions};
use serde_json::{json, Value};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

fn which(name: &str) -> Option<PathBuf> {
    std::env::var_os("PATH")?.to_str()?.split(':').map(|d| PathBuf::from(d).join(name)).find(|p| p.is_file())
}

/// A chromedriver child and one browser session.
struct Browser {
    driver: Child,
    base: String,
    session: String,
    http: reqwest::Client,
}

impl Browser {
    async fn start(chromium: &std::path::Path, driver: &std::path::Path) -> Browser {
        let port = free_port();
        let child = Command::new(driver)
            .arg(format!("--port={port}"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start chromedriver");
        let base = format!("http://127.0.0.1:{port}");
        let http = reqwest::Client::builder().timeout(Duration::from_secs(30)).build().expect("client");
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if let Ok(r) = http.get(format!("{base}/status")).send().await {
                if r.status().is_success() {
                    break;
                }
            }
            assert!(Instant::now() < deadline, "chromedriver did not come up");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        let caps = json!({"capabilities": {"alwaysMatch": {"browserName": "chrome", "goog:chromeOptions": {
            "binary": chromium.to_string_lossy(),
            "args": ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                     "--disable-dev-shm-usage", "--window-size=1400,1100"]}}}});
        let r: Value =
            http.post(format!("{base}/session")).json(&caps).send().await.expect("session").json().await.expect("json");
        let session = r["value"]["sessionId"].as_str().unwrap_or_else(|| panic!("no session: {r}")).to_string();
        Browser { driver: child, base, session, http }
    }

    async fn cmd(&self, method: reqwest::Method, path: &str, body: Option<Value>) -> Value {
        let url = format!("{}/session/{}/{path}", self.base, self.session);
        let mut req = self.http.request(method, url);
        if let Some(b) = body {
            req = req.json(&b);
        }
        let v: Value = req.send().await.expect("webdriver").json().await.expect("webdriver json");
        v["value"].clone()
    }

    async fn go(&self, url: &str) {
        self.cmd(reqwest::Method::POST, "url", Some(json!({"url": url}))).await;
    }

    async fn eval(&self, script: &str) -> Value {
        self.cmd(reqwest::Method::POST, "execute/sync", Some(json!({"script": script, "args": []}))).await
    }

    async fn screenshot(&self) -> Vec<u8> {
        let v = self.cmd(reqwest::Method::GET, "screenshot", None).await;
        base64_decode(v.as_str().expect("screenshot base64"))
    }
}

impl Drop for Browser {
    fn drop(&mut self) {
        let _ = self.driver.kill();
        let _ = self.driver.wait();
    }
}

fn base64_decode(s: &str) -> Vec<u8> {
    let val = |c: u8| match c {
        b'A'..=b'Z' => Some(c - b'A'),
        b'a'..=b'z' => Some(c - b'a' + 26),
        b'0'..=b'9' => Some(c - b'0' + 52),
        b'+' => Some(62),
        b'/' => Some(63),
        _ => None,
    };
    let mut out = Vec::with_capacity(s.len() * 3 / 4);
    let (mut acc, mut bits) = (0u32, 0u32);
    for c in s.bytes().filter_map(val) {
        acc = (acc << 6) | u32::from(c);
        bits += 6;
        if bits >= 8 {
            bits -= 8;
            out.push((acc >> bits) as u8);
            acc &= (1 << bits) - 1;
        }
    }
    out
}

/// What the page shows: work center id → (good, state), the live badge, FG produced.
const READ_PAGE: &str = r#"
const wcs = {};
document.querySelectorAll('[data-wc]').forEach(el => {
  wcs[el.dataset.wc] = { good: Number(el.querySelector('.good')?.textContent), state: el.querySelector('.badge')?.textContent,
                         oee: el.querySelector('.oee-value')?.textContent };
});
const buffers = {};
document.querySelectorAll('[data-buffer]').forEach(el => { buffers[el.dataset.buffer] = Number(el.querySelector('.on-hand')?.textContent); });
return { wcs, buffers, live: document.getElementById('live')?.textContent, produced: document.getElementById('fg-produced')?.textContent,
         surge: document.querySelectorAll('#surge polyline').length, status: document.getElementById('status')?.textContent };
"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dashboard_in_headless_chromium_shows_live_values() {
    let (Some(chromium), Some(driver)) = (which("chromium"), which("chromedriver")) else {
        assert!(
            std::env::var_os("MES_TEST_REQUIRE_BROWSER").is_none(),
            "MES_TEST_REQUIRE_BROWSER is set but chromium or chromedriver is missing"
        );
        eprintln!("skipped: install Debian's `chromium` and `chromium-driver` to run the browser test");
        return;
    };
    let mes = Mes::start(MesOptions::default()).await;
    // The simulator plays the line for ~12 s of real time while the page is open.
    let sim = Command::new(crate::simulator::line_sim())
        .arg("--plant")
        .arg(mes.dir.join("plant.toml"))
        .args(["--mqtt", &format!("mqtt://{}:{}", mes.mqtt_host, mes.mqtt_port), "--topic-prefix", &mes.prefix])
        .args(["--scenario", "steady", "--seed", "5", "--speed", "10", "--duration", "2m"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("line-sim");
    let mut sim = scopeguard(sim);
    let browser = Browser::start(&chromium, &driver).await;
    browser.go(&mes.http).await;

    // Values appear: every work center of the plant, with counts.
    let deadline = Instant::now() + Duration::from_secs(30);
    let first = loop {
        let v = browser.eval(READ_PAGE).await;
        let good: i64 = v["wcs"].as_object().map(|m| m.values().filter_map(|w| w["good"].as_i64()).sum()).unwrap_or(0);
        if v["wcs"].as_object().map(|m| m.len()) == Some(4) && good > 0 && v["live"] == "live" {
            break v;
        }
        assert!(Instant::now() < deadline, "the page never showed live counts: {v}");
        tokio::time::sleep(Duration::from_millis(250)).await;
    };
    for wc in ["BLANK-1", "FORM-1", "ASSY-1", "PACK-1"] {
        assert!(first["wcs"][wc]["good"].is_i64(), "{wc} missing: {first}");
    }
    // Values change while the line runs (the page follows the events).
    let deadline = Instant::now() + Duration::from_secs(30);
    let later = loop {
        tokio::time::sleep(Duration::from_millis(500)).await;
        let v = browser.eval(READ_PAGE).await;
        if v["wcs"]["BLANK-1"]["good"].as_i64() > first["wcs"]["BLANK-1"]["good"].as_i64() {
            break v;
        }
        assert!(Instant::now() < deadline, "BLANK-1 never moved: {first} → {v}");
    };
    assert!(later["surge"].as_u64().unwrap_or(0) >= 3, "the surge plot has its three lines: {later}");
    // After the simulator ends and the MES drains, the page equals the API exactly.
    let _ = sim.0.wait();
    tokio::time::sleep(Duration::from_secs(2)).await;
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let (_, api) = mes.get("/api/v1/work-centers").await;
        let v = browser.eval(READ_PAGE).await;
        let same = api
            .as_array()
            .map(|a| a.iter().all(|w| v["wcs"][w["id"].as_str().unwrap_or("")]["good"] == w["good_total"]))
            .unwrap_or(false);
        if same {
            break;
        }
        assert!(Instant::now() < deadline, "the page does not match the API: {v} vs {api}");
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    let png = browser.screenshot().await;
    assert_eq!(&png[..8], b"\x89PNG\r\n\x1a\n");
    let exe = std::env::current_exe().expect("exe");
    let out = exe.parent().and_then(|d| d.parent()).expect("target").join("test-output");
    std::fs::create_dir_all(&out).expect("output dir");
    let path = out.join("dashboard.png");
    std::fs::write(&path, &png).expect("write screenshot");
    eprintln!("screenshot: {} ({} bytes)", path.display(), png.len());
}

/// Kills the child on drop (a failed assertion must not leave the simulator running).
struct Guard(Child);
impl Drop for Guard {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}
fn scopeguard(c: Child) -> Guard {
    Guard(c)
}
