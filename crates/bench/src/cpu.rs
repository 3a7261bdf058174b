//! CPU time per delivery: what every process of a run used between two samples, from
//! `/proc/<pid>/stat`, summed by the part it plays. On a shared 2-core machine the wall-clock
//! rate moves with the neighbours; the CPU a delivery costs does not, so runs compare by it.
//!
//! The processes are the benchmark's own tree: the relay and the handler (children it names),
//! PostgreSQL (every `postgres` process; a backend that exits meanwhile is counted through its
//! postmaster's reaped-children times) and nats-server, which the servers' thread spawned.

use std::collections::{BTreeMap, HashMap};
use std::time::Duration;

/// The parts a run's CPU is told apart by, in the order they are printed.
pub const PARTS: [&str; 5] = ["postgres", "relay", "handler", "nats-server", "bench"];

/// CPU time by part.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Cpu(BTreeMap<&'static str, Duration>);

/// One process of the tree.
struct Process {
    parent: u32,
    name: String,
    /// utime + stime, and cutime + cstime, in clock ticks.
    own: u64,
    reaped: u64,
}

fn read(pid: u32) -> Option<Process> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let (head, rest) = stat.rsplit_once(')')?;
    let name = head.split_once('(')?.1.to_owned();
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let field = |i: usize| fields.get(i).and_then(|f| f.parse::<u64>().ok());
    Some(Process {
        parent: u32::try_from(field(1)?).ok()?,
        name,
        own: field(11)? + field(12)?,
        reaped: field(13)? + field(14)?,
    })
}

impl Cpu {
    /// The CPU used so far by this process's tree, the relay and the handler named by pid.
    pub fn sample(relay: u32, handler: u32) -> Cpu {
        let ticks = rustix::param::clock_ticks_per_second() as f64;
        let processes: HashMap<u32, Process> = std::fs::read_dir("/proc")
            .into_iter()
            .flatten()
            .flatten()
            .filter_map(|entry| entry.file_name().to_str()?.parse::<u32>().ok())
            .filter_map(|pid| Some((pid, read(pid)?)))
            .collect();
        let me = std::process::id();
        let of_tree = |mut pid: u32| {
            while pid > 1 {
                if pid == me {
                    return true;
                }
                pid = processes.get(&pid).map_or(0, |p| p.parent);
            }
            false
        };
        let mut by_part: BTreeMap<&'static str, Duration> = BTreeMap::new();
        for (&pid, process) in &processes {
            if !of_tree(pid) {
                continue;
            }
            let (part, used) = match process.name.as_str() {
                _ if pid == relay => ("relay", process.own),
                _ if pid == handler => ("handler", process.own),
                _ if pid == me => ("bench", process.own),
                "postgres" => ("postgres", process.own + process.reaped),
                "nats-server" => ("nats-server", process.own),
                _ => continue,
            };
            *by_part.entry(part).or_default() += Duration::from_secs_f64(used as f64 / ticks);
        }
        Cpu(by_part)
    }

    /// What was used from `earlier` to this sample.
    pub fn since(&self, earlier: &Cpu) -> Cpu {
        Cpu(self
            .0
            .iter()
            .map(|(part, used)| {
                (*part, used.saturating_sub(earlier.0.get(part).copied().unwrap_or_default()))
            })
            .collect())
    }

    /// Microseconds of CPU per delivery, of each part (in [`PARTS`]'s order) and in all.
    pub fn per_delivery_us(&self, deliveries: usize) -> (Vec<f64>, f64) {
        let us = |d: Duration| d.as_secs_f64() * 1e6 / deliveries.max(1) as f64;
        let parts: Vec<f64> = PARTS.iter().map(|p| us(self.0.get(p).copied().unwrap_or_default())).collect();
        let total = parts.iter().sum();
        (parts, total)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn work_done_shows_as_the_bench_s_own_cpu() {
        let before = Cpu::sample(0, 0);
        let mut x = 0u64;
        for _ in 0..50_000_000u64 {
            x = std::hint::black_box(x.wrapping_mul(6_364_136_223_846_793_005).wrapping_add(1));
        }
        let used = Cpu::sample(0, 0).since(&before);
        let (parts, total) = used.per_delivery_us(1);
        assert!(parts[4] > 20_000.0, "50 million multiplications took {} µs of CPU", parts[4]);
        assert_eq!(total, parts.iter().sum::<f64>());
    }
}
