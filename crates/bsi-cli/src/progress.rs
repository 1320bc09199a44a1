//! Progress bars on stderr, only on a terminal and never with `--quiet`.

use indicatif::{ProgressBar, ProgressStyle};

pub struct Bar {
    bar: Option<ProgressBar>,
}

impl Bar {
    pub fn new(quiet: bool) -> Bar {
        let bar = (!quiet && crate::stderr_is_terminal()).then(|| {
            let bar = ProgressBar::hidden();
            bar.set_draw_target(indicatif::ProgressDrawTarget::stderr());
            bar
        });
        Bar { bar }
    }
}

impl bsi_engine::Progress for Bar {
    fn start(&self, phase: &str, total: u64) {
        if let Some(bar) = &self.bar {
            // A phase after a finished one (a build's encoding, then its packing) starts over.
            bar.reset();
            bar.set_length(total);
            bar.set_style(
                ProgressStyle::with_template("{msg:>10} [{bar:30}] {bytes}/{total_bytes} {eta}")
                    .expect("template is valid")
                    .progress_chars("=> "),
            );
            bar.set_message(phase.to_owned());
        }
    }

    fn advance(&self, units: u64) {
        if let Some(bar) = &self.bar {
            bar.inc(units);
        }
    }

    fn finish(&self) {
        if let Some(bar) = &self.bar {
            bar.finish_and_clear();
        }
    }
}
