//! Progress bars (indicatif) for the apps' long steps, drawn on stderr when it is a terminal.

use std::time::Duration;

use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use svmirror::app::report::{Bar, ProgressFactory};

/// Makes indicatif bars, or hidden ones.
pub(crate) struct Bars {
    show: bool,
}

impl Bars {
    /// Bars that are drawn only if `show`.
    pub(crate) fn new(show: bool) -> Bars {
        Bars { show }
    }
}

struct Indicatif(ProgressBar);

impl Bar for Indicatif {
    fn set(&self, done: u64, total: u64) {
        self.0.set_length(total);
        self.0.set_position(done);
    }

    fn finish(&self) {
        self.0.finish_and_clear();
    }
}

impl ProgressFactory for Bars {
    fn bar(&self, name: &str, total: u64, unit: &str) -> Box<dyn Bar> {
        let target = if self.show {
            ProgressDrawTarget::stderr()
        } else {
            ProgressDrawTarget::hidden()
        };
        let bar = ProgressBar::with_draw_target(Some(total), target);
        let style = ProgressStyle::with_template(&format!(
            "{{prefix:>6}} [{{bar:40}}] {{pos}}/{{len}} {unit} ({{elapsed}})"
        ))
        .unwrap_or_else(|_| ProgressStyle::default_bar())
        .progress_chars("=> ");
        bar.set_style(style);
        bar.set_prefix(name.to_string());
        bar.enable_steady_tick(Duration::from_millis(200));
        Box::new(Indicatif(bar))
    }
}
