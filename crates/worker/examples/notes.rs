//! The README tour's handler: serves `on-note` for app `demo` of `picloud-router dev`, and
//! refuses notes whose text is "fail" so that they become dead letters.
//!
//! ```sh
//! set -a; . .picloud/dev.env; set +a
//! cargo run -p picloud-worker --example notes
//! ```

use picloud_worker::{Delivery, Reply, Worker};

#[tokio::main]
#[allow(clippy::print_stdout)]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let var =
        |name: &str| std::env::var(name).map_err(|_| format!("{name} is unset: source .picloud/dev.env"));
    let app = var("PICLOUD_APP")?;
    let client = async_nats::ConnectOptions::with_user_and_password(
        var("PICLOUD_NATS_APP_USER")?,
        var("PICLOUD_NATS_APP_PASSWORD")?,
    )
    .custom_inbox_prefix(format!("_INBOX_{app}"))
    .connect(var("PICLOUD_NATS_URL")?)
    .await?;
    Worker::new(client, &app)
        .handle("on-note", |delivery: Delivery| async move {
            let event: serde_json::Value = delivery.data()?;
            println!("{} (attempt {}): {}", delivery.id, delivery.attempt, event["value"]);
            Ok(if event["value"]["text"] == "fail" {
                Reply::fail("this note asked to fail")
            } else {
                Reply::ok(event["value"].clone())
            })
        })
        .run(async {
            tokio::signal::ctrl_c().await.ok();
        })
        .await?;
    Ok(())
}
