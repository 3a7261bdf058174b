//! The README tour's handler: serves `on-note` for app `demo` of `picloud-router dev`, refuses
//! notes whose text is "fail" so that they become dead letters, and works on a note whose text
//! is "slow" for its `seconds`, longer than the handler timeout, saying that it is still working.
//!
//! ```sh
//! set -a; . .picloud/dev.env; set +a
//! cargo run -p picloud-example-notes
//! ```

use std::process::ExitCode;
use std::time::Duration;

use picloud_worker::{Delivery, Reply, Worker};

#[tokio::main]
#[allow(clippy::print_stderr)]
async fn main() -> ExitCode {
    match serve().await {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("notes: {e}");
            ExitCode::FAILURE
        }
    }
}

#[allow(clippy::print_stdout)]
async fn serve() -> Result<(), Box<dyn std::error::Error>> {
    let var =
        |name: &str| std::env::var(name).map_err(|_| format!("{name} is unset: source .picloud/dev.env"));
    let app = var("PICLOUD_APP")?;
    let url = var("PICLOUD_NATS_URL")?;
    let client = async_nats::ConnectOptions::with_user_and_password(
        var("PICLOUD_NATS_APP_USER")?,
        var("PICLOUD_NATS_APP_PASSWORD")?,
    )
    .custom_inbox_prefix(format!("_INBOX_{app}"))
    .connect(&url)
    .await
    .map_err(|e| {
        format!(
            "connecting to NATS at {url} (PICLOUD_NATS_URL) failed: {e}; is `picloud-router dev` \
             running, and is .picloud/dev.env loaded from this run?"
        )
    })?;
    let running = Worker::new(client, &app)
        .handle("on-note", |delivery: Delivery| async move {
            let event: serde_json::Value = delivery.data()?;
            println!("{} (attempt {}): {}", delivery.id, delivery.attempt, event["value"]);
            if event["value"]["text"] == "slow" {
                let seconds = event["value"]["seconds"].as_u64().unwrap_or(40);
                // Tells the relay every few seconds that the attempt goes on (`working`).
                delivery.long_running(tokio::time::sleep(Duration::from_secs(seconds))).await;
                println!("{}: done after {seconds} s", delivery.id);
            }
            Ok(if event["value"]["text"] == "fail" {
                Reply::fail("this note asked to fail")
            } else {
                Reply::ok(event["value"].clone())
            })
        })
        .start()
        .await?;
    // The server has confirmed the subscription: deliveries reach this process from now on.
    println!("serving on-note; Ctrl-C stops");
    tokio::signal::ctrl_c().await?;
    running.shutdown().await;
    Ok(())
}
