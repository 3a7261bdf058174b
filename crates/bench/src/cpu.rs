//! CPU time per delivery: what every process of a run used between two samples, from
//! `/proc/<pid>/stat`, summed by the part it plays. On a shared 2-core machine the wall-clock
//! rate moves with the neighbours; the CPU a delivery costs does not, so runs compare by it.
//!
//! The processes are the benchmark's own tree: its role children, each named by the part it
//! plays (relay, handler, api, or node for the API and the relay in one process), PostgreSQL
//! (every `postgres` process; a backend that exits meanwhile is counted through its
//! postmaster's reaped-children times), nats-server, which the servers' thread spawned, and the
//! benchmark's children that ended meanwhile (the latency scenario's producer), counted through
//! the benchmark's own reaped-children times.

use std::collections::{BTreeMap, HashMap};
use std::time::Duration;

/// The parts a run's CPU is told apart by, in the order they are printed.
/// A `node` is the HTTP API and the relay in one process, as `serve` runs them.
pub const PARTS: [&str; 8] =
    ["postgres", "relay", "handler", "nats-server", "api", "node", "producer", "bench"];

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
    /// The CPU used so far by this process's tree, the role children named by pid with the
    /// part each plays (one of [`PARTS`]).
    pub fn sample(roles: &[(&'static str, u32)]) -> Cpu {
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
            let mut add = |part: &'static str, used: u64| {
                *by_part.entry(part).or_default() += Duration::from_secs_f64(used as f64 / ticks);
            };
            match roles.iter().find(|(_, of)| *of == pid) {
                Some(&(part, _)) => add(part, process.own),
                None if pid == me => {
                    add("bench", process.own);
                    add("producer", process.reaped);
                }
                None if process.name == "postgres" => add("postgres", process.own + process.reaped),
                None if process.name == "nats-server" => add("nats-server", process.own),
                None => {}
            }
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
    pub fn per_delivery_us(&self, deliveries: usize) -> PerDelivery {
        let us = |d: Duration| d.as_secs_f64() * 1e6 / deliveries.max(1) as f64;
        let parts: Vec<f64> = PARTS.iter().map(|p| us(self.0.get(p).copied().unwrap_or_default())).collect();
        let total = parts.iter().sum();
        (parts, total)
    }
}

/// One run's CPU per delivery as printed: the total and each part that used any.
pub fn shown(parts: &[f64], total: f64) -> String {
    let by_part: Vec<String> = PARTS
        .iter()
        .zip(parts)
        .filter(|(_, us)| **us > 0.0)
        .map(|(part, us)| format!("{part} {us:.1}"))
        .collect();
    format!("{total:.1} µs ({})", by_part.join(", "))
}

/// A run's CPU per delivery: each part's (in [`PARTS`]'s order) and the total, in µs.
pub type PerDelivery = (Vec<f64>, f64);

/// The `RESULT` fields of runs' CPU per delivery: their medians, in µs.
pub fn result_fields(runs: &[PerDelivery]) -> String {
    let median = |values: Vec<f64>| crate::stats::summary(&values).0;
    let mut fields =
        vec![format!("cpu_us_per_delivery={:.1}", median(runs.iter().map(|(_, total)| *total).collect()))];
    for (i, part) in PARTS.iter().enumerate() {
        let name = part.replace('-', "_");
        fields.push(format!("{name}_us={:.1}", median(runs.iter().map(|(parts, _)| parts[i]).collect())));
    }
    fields.join(" ")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn work_done_shows_as_the_bench_s_own_cpu() {
        let before = Cpu::sample(&[]);
        let mut x = 0u64;
        for _ in 0..50_000_000u64 {
            x = std::hint::black_box(x.wrapping_mul(6_364_136_223_846_793_005).wrapping_add(1));
        }
        let used = Cpu::sample(&[]).since(&before);
        let (parts, total) = used.per_delivery_us(1);
        let bench = PARTS.iter().position(|p| *p == "bench").unwrap();
        assert!(parts[bench] > 20_000.0, "50 million multiplications took {} µs of CPU", parts[bench]);
        assert_eq!(total, parts.iter().sum::<f64>());
    }
}
