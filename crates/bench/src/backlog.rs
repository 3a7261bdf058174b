//! Scenario 4, backlog: how fast the head of a deep backlog drains. A million pending deliveries
//! are written as the drain writes its backlog; the figure is the rate of the first 100,000
//! (until the handler was handed that many), against the plain drain of 100,000 from a fresh
//! database in the same repetition, which ends the same way: their ratio.

use crate::drain::{self, Run, Until};
use crate::env::Servers;
use crate::roles::Serving;
use crate::stats::summary;

/// The scenario: `reps` repetitions, each a plain drain of `drained` and the drain of the first
/// `drained` of a backlog of `n`; each rate, the CPU per delivery, and the ratio of the rates.
#[allow(clippy::print_stdout)]
pub async fn run(servers: &Servers, n: usize, drained: usize, reps: usize) -> anyhow::Result<()> {
    anyhow::ensure!(drained <= n, "cannot drain {drained} of a backlog of {n}");
    let (mut plain, mut deep, mut ratios) = (Vec::with_capacity(reps), Vec::with_capacity(reps), Vec::new());
    for rep in 1..=reps {
        // Both drains end alike: once the handler was handed their rows.
        let alone = drain::one(servers, drained, None, Until::Handed, rep).await?;
        let head = head_of(servers, n, drained, rep).await?;
        let ratio = head.rate / alone.rate;
        println!("backlog rep {rep}: {ratio:.2} of the plain drain's rate");
        ratios.push(ratio);
        plain.push(alone);
        deep.push(head);
    }
    let rates = |runs: &[Run]| runs.iter().map(|r| r.rate).collect::<Vec<_>>();
    let (plain_rates, deep_rates) = (rates(&plain), rates(&deep));
    let (drain, drain_min, drain_max) = summary(&plain_rates);
    let (backlog, backlog_min, backlog_max) = summary(&deep_rates);
    let (ratio, ratio_min, ratio_max) = summary(&ratios);
    println!(
        "backlog: the first {drained} of {n} median {backlog:.0}/s [{backlog_min:.0}..{backlog_max:.0}], \
         the plain drain of {drained} {drain:.0}/s [{drain_min:.0}..{drain_max:.0}]; \
         ratio {ratio:.2} [{ratio_min:.2}..{ratio_max:.2}] over {reps} runs"
    );
    println!(
        "RESULT picloud-backlog ratio={ratio:.2} backlog_per_s={backlog:.0} drain_per_s={drain:.0} {}",
        drain::cpu_fields(&deep)
    );
    Ok(())
}

/// One repetition's deep drain: a fresh database, a backlog of `n` written and settled, then the
/// drain until the handler was handed `drained`; its rate and CPU.
async fn head_of(servers: &Servers, n: usize, drained: usize, rep: usize) -> anyhow::Result<Run> {
    let bench = servers.fresh().await?;
    drain::backlog(&bench, n, None).await?;
    bench.settle().await?;
    eprintln!("backlog rep {rep}: backlog of {n} written; draining {drained}");
    let serving = Serving::bench(bench.app.slug.as_str());
    let (elapsed, used) = drain::drain(servers, &bench, &serving, drained, false, Until::Handed).await?;
    Ok(Run::printed(&format!("backlog rep {rep}, the first {drained} of {n}"), drained, elapsed, &used))
}
