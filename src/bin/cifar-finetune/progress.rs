//! Progress display shared by the subcommands: an indicatif bar on a terminal, plain
//! periodic log lines otherwise (CI logs, `| tee`, cron).

use std::io::IsTerminal;
use std::time::{Duration, Instant};

use indicatif::{ProgressBar, ProgressStyle};

/// A progress display for `total` units of work called `unit` (e.g. "images").
pub struct Progress {
    bar: Option<ProgressBar>,
    what: String,
    unit: &'static str,
    total: u64,
    start: Instant,
    last_line: Instant,
    done: bool,
}

impl Progress {
    /// A bar on stderr if it is a terminal, else log lines at most every 10 s.
    pub fn new(what: &str, unit: &'static str, total: u64) -> Self {
        let bar = std::io::stderr().is_terminal().then(|| {
            let bar = ProgressBar::new(total);
            // The rate and time left are ours (the prefix): indicatif's would count units
            // found in a cache as done in no time, and show millions per second.
            let template = format!("{{msg}} [{{bar:30}}] {{pos}}/{{len}} {unit}{{prefix}}");
            if let Ok(style) = ProgressStyle::with_template(&template) {
                bar.set_style(style.progress_chars("=> "));
            }
            bar.set_message(what.to_string());
            bar
        });
        Self {
            bar,
            what: what.to_string(),
            unit,
            total,
            start: Instant::now(),
            last_line: Instant::now(),
            done: false,
        }
    }

    /// Sets the position; `fresh` counts the units computed now (for the rate), as opposed
    /// to those found done already.
    pub fn update(&mut self, pos: u64, fresh: u64) {
        let now = Instant::now();
        if let Some(bar) = &self.bar {
            bar.set_position(pos);
            bar.set_prefix(self.rate(pos, fresh, now));
            return;
        }
        let finished = pos >= self.total;
        if self.done || (!finished && now - self.last_line < Duration::from_secs(10)) {
            return;
        }
        self.done = finished;
        self.last_line = now;
        let rate = self.rate(pos, fresh, now);
        eprintln!("{}: {pos}/{} {}{rate}", self.what, self.total, self.unit);
    }

    /// ` (R unit/s, T s left)` from the units computed (not found done) so far, once there
    /// is a second of them to go by; empty before.
    fn rate(&self, pos: u64, fresh: u64, now: Instant) -> String {
        let secs = (now - self.start).as_secs_f64();
        if fresh == 0 || secs < 1.0 {
            return String::new();
        }
        let rate = fresh as f64 / secs;
        let left = (self.total - pos.min(self.total)) as f64 / rate;
        format!(" ({rate:.1} {}/s, {left:.0} s left)", self.unit)
    }

    /// Clears the bar.
    pub fn finish(self) {
        if let Some(bar) = self.bar {
            bar.finish_and_clear();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_rate_counts_computed_units_only_and_waits_for_a_second() {
        let mut p = Progress::new("features", "images", 1000);
        let now = Instant::now();
        // 900 units found in the cache in the first instant: no rate at all.
        assert_eq!(p.rate(900, 0, now), "");
        // Computed ones, but not yet a second of them.
        assert_eq!(p.rate(910, 10, now), "");
        p.start = now - Duration::from_secs(2);
        assert_eq!(p.rate(910, 10, now), " (5.0 images/s, 18 s left)");
    }
}
