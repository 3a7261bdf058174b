//! Integration tests of the testkit: real PostgreSQL and nats-server processes.

mod nats;
mod pg;
mod proxy;

/// The effective uid of process `pid`, from `/proc/<pid>/status`.
pub fn effective_uid(pid: u32) -> anyhow::Result<u32> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    let line = status
        .lines()
        .find(|line| line.starts_with("Uid:"))
        .ok_or_else(|| anyhow::anyhow!("no Uid line in /proc/{pid}/status"))?;
    let effective =
        line.split_whitespace().nth(2).ok_or_else(|| anyhow::anyhow!("malformed Uid line: {line}"))?;
    Ok(effective.parse()?)
}
