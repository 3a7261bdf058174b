//! The trigger page's charts, drawn on the server as SVG: attempts by outcome as stacked bars,
//! and the latency's p50 and p99 as lines, one point per bucket of the window.

use picloud_api::views::{AttemptsView, TriggerStatsView};

/// The drawing area, in SVG units (the SVG scales to its box).
const WIDTH: f64 = 600.0;
const HEIGHT: f64 = 150.0;

/// A bar's piece: one outcome of one bucket.
#[derive(Debug)]
pub(crate) struct Bar {
    pub x: String,
    pub y: String,
    pub width: String,
    pub height: String,
    /// The outcome, as a CSS class.
    pub outcome: &'static str,
    pub title: String,
}

/// The charts of one window.
#[derive(Debug)]
pub(crate) struct Charts {
    pub bars: Vec<Bar>,
    /// The most attempts in one bucket (the top of the bars' scale).
    pub most: u64,
    /// The p50 and p99 lines, as SVG path data.
    pub p50: String,
    pub p99: String,
    /// The slowest p99 (the top of the latency's scale), in milliseconds.
    pub slowest_ms: String,
    /// When the first bucket starts (the last ends now).
    pub from: String,
    /// Attempts in the whole window, by outcome.
    pub total: [(&'static str, u64); 5],
    pub p50_ms: String,
    pub p99_ms: String,
}

fn counts(a: &AttemptsView) -> [(&'static str, u64); 5] {
    [("ok", a.ok), ("retry", a.retry), ("fail", a.fail), ("timeout", a.timeout), ("no_handler", a.no_handler)]
}

fn ms(value: Option<f64>) -> String {
    value.map(|v| format!("{v:.1} ms")).unwrap_or_else(|| "–".to_owned())
}

/// A line through the buckets that have a value; a bucket without one breaks it.
fn line(values: &[Option<f64>], top: f64, step: f64) -> String {
    let mut path = String::new();
    let mut drawing = false;
    for (i, value) in values.iter().enumerate() {
        match value {
            Some(v) => {
                let x = (i as f64 + 0.5) * step;
                let y = HEIGHT - v / top * HEIGHT;
                // A segment starts with a dot, so that a bucket alone shows.
                let to = if drawing { "L" } else { "M" };
                let dot = if drawing { "" } else { "l0.1,0 " };
                path.push_str(&format!("{to}{x:.1},{y:.1} {dot}"));
                drawing = true;
            }
            None => drawing = false,
        }
    }
    path
}

impl Charts {
    pub(crate) fn new(stats: &TriggerStatsView) -> Charts {
        let buckets = &stats.buckets;
        let step = WIDTH / buckets.len().max(1) as f64;
        let most = buckets
            .iter()
            .map(|b| counts(&b.attempts).iter().map(|(_, n)| n).sum::<u64>())
            .max()
            .unwrap_or(0);
        let scale = HEIGHT / most.max(1) as f64;
        let mut bars = Vec::new();
        for (i, bucket) in buckets.iter().enumerate() {
            let mut top = HEIGHT;
            for (outcome, n) in counts(&bucket.attempts) {
                if n == 0 {
                    continue;
                }
                let height = n as f64 * scale;
                top -= height;
                bars.push(Bar {
                    x: format!("{:.1}", i as f64 * step),
                    y: format!("{top:.1}"),
                    width: format!("{:.1}", (step - 1.0).max(0.5)),
                    height: format!("{height:.1}"),
                    outcome,
                    title: format!("{}: {n} {outcome}", bucket.start),
                });
            }
        }
        let p50: Vec<Option<f64>> = buckets.iter().map(|b| b.attempts.p50_ms).collect();
        let p99: Vec<Option<f64>> = buckets.iter().map(|b| b.attempts.p99_ms).collect();
        let slowest = p99.iter().flatten().copied().fold(0.0, f64::max);
        let top = if slowest > 0.0 { slowest } else { 1.0 };
        Charts {
            bars,
            most,
            p50: line(&p50, top, step),
            p99: line(&p99, top, step),
            slowest_ms: ms(Some(slowest)),
            from: buckets.first().map(|b| b.start.clone()).unwrap_or_default(),
            total: counts(&stats.total),
            p50_ms: ms(stats.total.p50_ms),
            p99_ms: ms(stats.total.p99_ms),
        }
    }
}
