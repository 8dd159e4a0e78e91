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
            let template =
                format!("{{msg}} [{{bar:30}}] {{pos}}/{{len}} {unit} ({{per_sec}}, {{eta}} left)");
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
        if let Some(bar) = &self.bar {
            bar.set_position(pos);
            return;
        }
        let now = Instant::now();
        let finished = pos >= self.total;
        if self.done || (!finished && now - self.last_line < Duration::from_secs(10)) {
            return;
        }
        self.done = finished;
        self.last_line = now;
        let secs = (now - self.start).as_secs_f64();
        let rate = if fresh > 0 && secs > 0.0 {
            let rate = fresh as f64 / secs;
            let left = (self.total - pos.min(self.total)) as f64 / rate;
            format!(" ({rate:.1} {}/s, {left:.0} s left)", self.unit)
        } else {
            String::new()
        };
        eprintln!("{}: {pos}/{} {}{rate}", self.what, self.total, self.unit);
    }

    /// Clears the bar.
    pub fn finish(self) {
        if let Some(bar) = self.bar {
            bar.finish_and_clear();
        }
    }
}
