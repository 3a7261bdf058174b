//! Scenario 3, sync: sequential `POST /v1/apps/{app}/invoke/{trigger}` calls to a handler that
//! answers at once, and in the same run sequential bare NATS request-replies to a queue-group
//! responder: the invoke's overhead over the transport it rides on, and the CPU an invoke costs
//! (the benchmark process is the HTTP client).

use std::time::Instant;

use anyhow::Context as _;

use crate::cpu::{self, Cpu, PerDelivery};
use crate::env::Servers;
use crate::proc::Role;
use crate::roles::{Serving, start_handler};
use crate::stats::{percentile, summary};

#[allow(clippy::print_stdout)]
pub async fn run(servers: &Servers, calls: usize, reps: usize) -> anyhow::Result<()> {
    let (mut invoke_p50s, mut invoke_p99s, mut nats_p50s, mut nats_p99s) = (vec![], vec![], vec![], vec![]);
    let mut cpus: Vec<PerDelivery> = Vec::with_capacity(reps);
    for rep in 1..=reps {
        let bench = servers.fresh().await?;
        bench.settle().await?;
        let app = bench.app.slug.as_str();
        let mut handler = Serving::bench(app).spawn(&servers.nats_url, calls, &["--echo"]).await?;
        eprintln!("sync rep {rep}: starting the handler");
        start_handler(&mut handler).await?;
        let (api, port) =
            Role::spawn_reporting("api", &["api", "--url", &bench.url, "--nats-url", &servers.nats_url])
                .await?;
        let client = reqwest::Client::new();
        let nats = async_nats::connect(&servers.nats_url).await?;
        let url = format!("http://127.0.0.1:{port}/v1/apps/{app}/invoke/call");
        let roles = [("handler", handler.pid()), ("api", api.pid())];
        let before = Cpu::sample(&roles);
        let mut invoke = Vec::with_capacity(calls);
        for _ in 0..calls {
            let t = Instant::now();
            let status = client.post(&url).bearer_auth(&bench.token).body("{}").send().await?.status();
            invoke.push(t.elapsed().as_secs_f64() * 1000.0);
            anyhow::ensure!(status.is_success(), "invoke answered {status}");
        }
        let (parts, total) = Cpu::sample(&roles).since(&before).per_delivery_us(calls);
        println!("sync rep {rep}: CPU per invoke {}", cpu::shown(&parts, total));
        cpus.push((parts, total));
        let mut bare = Vec::with_capacity(calls);
        for _ in 0..calls {
            let t = Instant::now();
            nats.request("bench.echo", "{}".into()).await.context("a bare request")?;
            bare.push(t.elapsed().as_secs_f64() * 1000.0);
        }
        api.stop().await?;
        handler.stop().await?;
        invoke.sort_by(f64::total_cmp);
        bare.sort_by(f64::total_cmp);
        let (i50, i99, n50, n99) = (
            percentile(&invoke, 50.0),
            percentile(&invoke, 99.0),
            percentile(&bare, 50.0),
            percentile(&bare, 99.0),
        );
        println!(
            "sync rep {rep}: invoke p50 {i50:.3} ms p99 {i99:.3} ms; bare NATS p50 {n50:.3} ms p99 {n99:.3} ms; \
             difference of the p50s {:.3} ms",
            i50 - n50
        );
        invoke_p50s.push(i50);
        invoke_p99s.push(i99);
        nats_p50s.push(n50);
        nats_p99s.push(n99);
    }
    let (i50, i50_min, i50_max) = summary(&invoke_p50s);
    let (n50, n50_min, n50_max) = summary(&nats_p50s);
    let (i99, n99) = (summary(&invoke_p99s).0, summary(&nats_p99s).0);
    println!(
        "invoke p50 {i50:.3} ms [{i50_min:.3}..{i50_max:.3}], bare NATS p50 {n50:.3} ms [{n50_min:.3}..{n50_max:.3}]"
    );
    println!(
        "RESULT picloud-sync invoke_p50_ms={i50:.2} invoke_p99_ms={i99:.2} nats_p50_ms={n50:.2} nats_p99_ms={n99:.2} {}",
        cpu::result_fields(&cpus)
    );
    Ok(())
}
