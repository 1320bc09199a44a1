//! Trees of many small entries: the memory bounds hold "whatever the tree size", and the
//! pairs above have a few hundred entries at most. Each tree is `dirs` directories of 200 files
//! of a few bytes, or of 1,000 empty directories; the new tree gives every file and directory
//! another time and one file other bytes, and the next tree, letter (b) over the same base,
//! gives them a third time. No peer runs: their patches carry no times, so only bsi's figures
//! and bounds are shown.

use std::fmt::Write as _;
use std::fs;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use anyhow::{Context, Result};
use filetime::FileTime;

use super::{
    bsi_build, bsi_build_apply, check_left, mib, os, secs, thousands, Measure, Runner, BSI_COPY,
    CACHE, TRUST,
};

/// What a generated tree holds below its top directories.
#[derive(Clone, Copy, Debug)]
pub(super) enum Shape {
    /// [`FILES_PER_DIR`] small files in each.
    Files,
    /// [`SUBDIRS_PER_DIR`] empty directories in each: a changed time is the smallest entry a
    /// manifest carries, so these trees have the most entries a package can (the manifest's
    /// 64 MiB limit; 310,310 of them take 66.1 MB).
    Dirs,
}

/// The trees, by name: how many directories, of what.
pub(super) const TREES: &[(&str, usize, Shape)] = &[
    ("entries-50k", 250, Shape::Files),
    ("entries-100k", 500, Shape::Files),
    ("entries-150k", 750, Shape::Files),
    ("dirs-310k", 310, Shape::Dirs),
];

const FILES_PER_DIR: usize = 200;
const SUBDIRS_PER_DIR: usize = 1_000;

/// The apply's bound above its largest file, and the build's above 6 times it (the issue's).
const APPLY_ALLOWANCE_KIB: u64 = 64 * 1024;
const BUILD_ALLOWANCE_KIB: u64 = 256 * 1024;

impl Shape {
    pub(super) fn what(self) -> &'static str {
        match self {
            Shape::Files => "files",
            Shape::Dirs => "directories",
        }
    }
}

/// What bsi did on one tree.
pub(super) struct ManyResult {
    name: String,
    entries: usize,
    largest: u64,
    package: u64,
    build: Measure,
    apply: Measure,
    /// Letter (b) applied over (a): every entry switched.
    switch: Measure,
    /// The revert of (b).
    revert: Measure,
}

impl ManyResult {
    fn apply_bound_kib(&self) -> u64 {
        self.largest.div_ceil(1024) + APPLY_ALLOWANCE_KIB
    }

    fn build_bound_kib(&self) -> u64 {
        6 * self.largest.div_ceil(1024) + BUILD_ALLOWANCE_KIB
    }
}

/// The trees of `name`: old, new (letter (a)) and next (letter (b)).
struct Trees {
    old: PathBuf,
    new: PathBuf,
    next: PathBuf,
}

/// The trees of `name`, written once into the bench cache.
fn prepare(ws: &Path, name: &str, dirs: usize, shape: Shape) -> Result<Trees> {
    let top = ws.join(CACHE).join("many").join(name);
    let trees = Trees {
        old: top.join("old"),
        new: top.join("new"),
        next: top.join("next"),
    };
    // Named for the trees it vouches for: a cache without `next` is written again.
    let done = top.join(".done-old-new-next");
    if done.exists() {
        return Ok(trees);
    }
    if top.exists() {
        fs::remove_dir_all(&top).with_context(|| format!("removing {}", top.display()))?;
    }
    let per_dir = match shape {
        Shape::Files => FILES_PER_DIR,
        Shape::Dirs => SUBDIRS_PER_DIR,
    };
    eprintln!(
        "writing {} ({} entries a side)",
        top.display(),
        dirs * (per_dir + 1)
    );
    let base = SystemTime::UNIX_EPOCH + Duration::from_secs(1_764_000_000);
    for (tree, shift) in [
        (&trees.old, 0),
        (&trees.new, 86_400),
        (&trees.next, 172_800),
    ] {
        let at = |i: usize| {
            FileTime::from_system_time(base + Duration::from_secs(shift + i as u64 % 3_600))
        };
        for d in 0..dirs {
            let dir = match shape {
                Shape::Files => tree.join(format!("dir{d:03}")),
                Shape::Dirs => tree.join(format!("d{d:03}")),
            };
            fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
            for f in 0..per_dir {
                let inner = match shape {
                    Shape::Files => {
                        let file = dir.join(format!("file{f:03}.txt"));
                        let changed = match (shift, d, f) {
                            (0, _, _) | (_, 1.., _) | (_, _, 1..) => "",
                            (86_400, ..) => " changed",
                            _ => " changed again",
                        };
                        let text = format!("content {d} {f}{changed}\n");
                        fs::write(&file, text)
                            .with_context(|| format!("writing {}", file.display()))?;
                        file
                    }
                    Shape::Dirs => {
                        let sub = dir.join(format!("e{f:03}"));
                        fs::create_dir(&sub)
                            .with_context(|| format!("creating {}", sub.display()))?;
                        sub
                    }
                };
                filetime::set_file_mtime(&inner, at(f))
                    .with_context(|| format!("setting the time of {}", inner.display()))?;
            }
            filetime::set_file_mtime(&dir, at(d))
                .with_context(|| format!("setting the time of {}", dir.display()))?;
        }
    }
    fs::write(&done, b"").with_context(|| format!("writing {}", done.display()))?;
    Ok(trees)
}

/// Build, apply, switch to (b) and revert on the tree `name`, checking the tree after each.
pub(super) fn run(r: &Runner, name: &str, dirs: usize, shape: Shape) -> Result<ManyResult> {
    let Trees { old, new, next } = prepare(&r.ws, name, dirs, shape)?;
    let done = bsi_build_apply(r, name, &old, &new)?;
    let next_pkg = r.scratch.join(format!("{name}-b.bsi"));
    bsi_build(r, &old, &next, "b", &next_pkg)?;
    let switch = r.run(
        BSI_COPY,
        &os(&[
            &"apply",
            &next_pkg,
            &"--root",
            &done.root,
            &"--trust",
            &TRUST,
            &"--state-dir",
            &done.state,
            &"--quiet",
        ]),
    )?;
    check_left(
        &done.root,
        &next,
        "bsi apply of (b) over (a)",
        "the next one",
    )?;
    let revert = r.run(
        BSI_COPY,
        &os(&[
            &"revert",
            &"--root",
            &done.root,
            &"--state-dir",
            &done.state,
            &"--quiet",
        ]),
    )?;
    check_left(&done.root, &old, "bsi revert", "the old one")?;
    Ok(ManyResult {
        name: name.to_string(),
        entries: crate::tree::count_entries(&new, &[])?,
        largest: largest_file(&old)?.max(largest_file(&new)?),
        package: done.bytes,
        build: done.build,
        apply: done.apply,
        switch,
        revert,
    })
}

fn largest_file(root: &Path) -> Result<u64> {
    let mut largest = 0;
    for e in walkdir::WalkDir::new(root) {
        let e = e.with_context(|| format!("listing {}", root.display()))?;
        if e.file_type().is_file() {
            largest = largest.max(e.metadata()?.len());
        }
    }
    Ok(largest)
}

/// The table of [`ManyResult`]s, with the memory bounds' verdicts.
pub(super) fn table(results: &[ManyResult]) -> String {
    let mut s = String::new();
    let _ = writeln!(
        s,
        "Generated trees of directories of {FILES_PER_DIR} small files or {SUBDIRS_PER_DIR} \
         empty directories ({}): every time changed, one file's bytes; then letter (b), every \
         time changed again, applied over (a) (switch), and reverted. Run once each (the figures \
         that matter are memory). Bounds (the issue's): apply at most the largest file plus 64 \
         MiB, build at most 6 times it plus 256 MiB; the switch and the revert are held to the \
         apply's. Every tree is checked after the apply, the switch and the revert.\n",
        TREES
            .iter()
            .map(|(name, dirs, shape)| format!("{name}: {dirs} of {}", shape.what()))
            .collect::<Vec<_>>()
            .join(", ")
    );
    let _ = writeln!(
        s,
        "| tree | entries | package B | build s | build MiB | apply s | apply MiB | switch s | switch MiB | revert s | revert MiB | bound MiB (apply / build) | apply | switch | revert | build |"
    );
    let _ = writeln!(
        s,
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- | --- | --- | --- |"
    );
    for m in results {
        let verdict = |measure: &Measure, bound: u64| match measure.rss_kib {
            Some(k) if k <= bound => "met",
            Some(_) => "**missed**",
            None => "n/a",
        };
        let _ = writeln!(
            s,
            "| {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} / {} | {} | {} | {} | {} |",
            m.name,
            thousands(m.entries as u64),
            thousands(m.package),
            secs(m.build.secs),
            mib(m.build.rss_kib),
            secs(m.apply.secs),
            mib(m.apply.rss_kib),
            secs(m.switch.secs),
            mib(m.switch.rss_kib),
            secs(m.revert.secs),
            mib(m.revert.rss_kib),
            mib(Some(m.apply_bound_kib())),
            mib(Some(m.build_bound_kib())),
            verdict(&m.apply, m.apply_bound_kib()),
            verdict(&m.switch, m.apply_bound_kib()),
            verdict(&m.revert, m.apply_bound_kib()),
            verdict(&m.build, m.build_bound_kib()),
        );
    }
    s
}
