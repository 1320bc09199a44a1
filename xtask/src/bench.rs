//! `cargo xtask bench`: bsi against peer delta tools (bsdiff 4.3, xdelta3 -9, zstd -19
//! --patch-from) on the same input pairs in the same run, printed as markdown tables and written
//! to BENCHMARKS.md.
//!
//! Every tool runs as a child process of this one under `/usr/bin/time -f %M`, which gives the
//! peak resident set size; wall time is measured here around the child. The peers work on single
//! files, so each gets one process per changed file (paired by path) and its figures are summed
//! (bytes, seconds) or maximized (memory) over the files. Unchanged files cost every tool nothing;
//! a new file costs every peer `zstd -19` of it; a deleted file costs the peers nothing. That
//! generosity is on purpose: bsi has to carry all of that in its package, and signs it.

use std::collections::BTreeSet;
use std::ffi::OsString;
use std::fmt::Write as _;
use std::fs;
use std::io::{BufReader, Read};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context, Result};
use walkdir::WalkDir;

use crate::tree::{compare_trees, copy_tree};

mod chosen;
mod many;

/// How long the bench lets a copied tree stand before applying to it: files whose time of
/// change is within 20 ms of a read are read again before they are replaced (see the engine's
/// `seen`), which a device's tree, written long before, does not need.
const SETTLED: std::time::Duration = std::time::Duration::from_millis(50);

const KEY: &str = "keys-example/example.key.pem";
const TRUST: &str = "keys-example/example.pub.pem";
const BSI: &str = "target/release/bsi";
/// The copy of `BSI` the bench runs, so that a rebuild during the run cannot change it.
const BSI_COPY: &str = "target/bench-work/bsi";
const TIME: &str = "/usr/bin/time";
const CACHE: &str = "target/bench-cache";
const WORK: &str = "target/bench-work";
/// A pair whose bsdiff build takes longer than this is timed once instead of three times.
const SLOW_SECS: f64 = 30.0;
/// A pair whose bsdiff build takes at most this long is timed five times instead of three: its
/// times are fractions of a second, where this VM's noise is widest (bspatch on libssl3 3.0.17
/// -> 3.0.20 took 0.080 s in one run of the bench and 0.11 s in another).
const QUICK_SECS: f64 = 10.0;
const QUICK_RUNS: usize = 5;
/// A pair whose bsdiff build takes at most this long is timed [`QUICKEST_RUNS`] times: the
/// security updates of one library, whose ratios sat within this VM's swing of their targets
/// (libssl3-next's build at 0.15x, its apply at 0.51x) and came out on either side of them
/// from one run of the bench to the next with five runs each.
const QUICKEST_SECS: f64 = 5.0;
const QUICKEST_RUNS: usize = 11;
/// One child process that runs longer than this is killed and its tool reported as failed.
const TIMEOUT: Duration = Duration::from_secs(1800);

const USAGE: &str =
    "bench [--smoke] [--pairs NAME,...] [--out FILE]   compare bsi with bsdiff, xdelta3, zstd";

/// The tools, in table order.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Tool {
    Bsi,
    Bsdiff,
    Xdelta3,
    Zstd,
}

const TOOLS: [Tool; 4] = [Tool::Bsi, Tool::Bsdiff, Tool::Xdelta3, Tool::Zstd];

impl Tool {
    fn label(self) -> &'static str {
        match self {
            Tool::Bsi => "bsi",
            Tool::Bsdiff => "bsdiff 4.3",
            Tool::Xdelta3 => "xdelta3 -9",
            Tool::Zstd => "zstd -19 --patch-from --long",
        }
    }

    /// Programs the tool needs on PATH, and the Debian package that has them.
    fn programs(self) -> (&'static [&'static str], &'static str) {
        match self {
            Tool::Bsi => (&[], ""),
            Tool::Bsdiff => (&["bsdiff", "bspatch"], "bsdiff"),
            Tool::Xdelta3 => (&["xdelta3"], "xdelta3"),
            // new files cost every peer `zstd -19`, so every peer needs zstd
            Tool::Zstd => (&["zstd"], "zstd"),
        }
    }
}

/// A real-world input: two versions of one Debian package.
#[derive(Debug)]
struct Deb {
    name: &'static str,
    package: &'static str,
    old: &'static str,
    new: &'static str,
    what: &'static str,
}

const DEBS: &[Deb] = &[
    Deb {
        name: "libssl3",
        package: "libssl3",
        old: "3.0.17-1~deb12u2",
        new: "3.0.20-1~deb12u2",
        what: "security point update of a system library",
    },
    Deb {
        name: "libssl3-next",
        package: "libssl3",
        old: "3.0.20-1~deb12u2",
        new: "3.0.22-1~deb12u2",
        what: "the next security point update of the same library",
    },
    Deb {
        name: "libxml2",
        package: "libxml2",
        old: "2.9.14+dfsg-1.3~deb12u4",
        new: "2.9.14+dfsg-1.3~deb12u6",
        what: "security update of a system library",
    },
    Deb {
        name: "webkit-rebuild",
        package: "libwebkit2gtk-4.1-0",
        old: "2.50.6-1~deb12u1",
        new: "2.50.6-1~deb12u2",
        what: "near-identical rebuild of a 92 MB web engine library",
    },
    Deb {
        name: "browser-major",
        package: "firefox-esr",
        old: "140.12.0esr-1~deb12u1",
        new: "153.8.0esr-1~deb12u1",
        what: "browser major-version step (ESR 140 -> ESR 153)",
    },
];

/// A real-world input of the platform the tool is for, which Debian has none of: two versions
/// of one wheel from PyPI for macOS, whose libraries are Mach-O files, signed where arm64.
#[derive(Debug)]
struct Wheel {
    name: &'static str,
    package: &'static str,
    old: &'static str,
    new: &'static str,
    /// pip's `--platform` and `--python-version` for the wheel.
    platform: &'static str,
    python: &'static str,
    what: &'static str,
}

const WHEELS: &[Wheel] = &[
    Wheel {
        name: "pillow-macos-arm64",
        package: "pillow",
        old: "10.0.0",
        new: "10.0.1",
        platform: "macosx_11_0_arm64",
        python: "3.11",
        what: "security update of macOS arm64 image libraries (libwebp 1.3.2 for CVE-2023-4863, \
               libtiff, libjpeg-turbo, zlib, brotli, harfbuzz), signed Mach-O",
    },
    Wheel {
        name: "cryptography-macos-universal",
        package: "cryptography",
        old: "42.0.7",
        new: "42.0.8",
        platform: "macosx_10_12_universal2",
        python: "3.11",
        what: "security update of OpenSSL (3.2.1 -> 3.2.2) linked into a universal2 \
               (x86-64 and arm64) Mach-O library",
    },
];

const TESTDATA: &[(&str, &str, &str)] = &[
    ("testdata-a", "26.3a", "synthetic release 26.3 -> 26.3 (a)"),
    (
        "testdata-b",
        "26.3b",
        "synthetic release 26.3 -> 26.3 (b), cumulative",
    ),
];

/// The pair on which bsi's build must be no slower than xdelta3 -9.
const NEAR_IDENTICAL: &str = "webkit-rebuild";

#[derive(Debug)]
struct Options {
    smoke: bool,
    pairs: Vec<String>,
    out: Option<PathBuf>,
}

fn all_pair_names() -> Vec<&'static str> {
    TESTDATA
        .iter()
        .map(|t| t.0)
        .chain(DEBS.iter().map(|d| d.name))
        .chain(WHEELS.iter().map(|w| w.name))
        .chain(many::TREES.iter().map(|t| t.0))
        .collect()
}

fn parse(ws: &Path, args: &[&str]) -> Result<Options> {
    let (mut smoke, mut pairs, mut out) = (false, None, None);
    let mut it = args.iter();
    while let Some(a) = it.next() {
        match *a {
            "--smoke" => smoke = true,
            "--pairs" => {
                let list = it.next().context("--pairs needs a comma-separated list")?;
                let names: Vec<String> = list.split(',').map(str::to_string).collect();
                for n in &names {
                    if !all_pair_names().contains(&n.as_str()) {
                        bail!(
                            "unknown pair {n:?}; known pairs: {}",
                            all_pair_names().join(", ")
                        );
                    }
                }
                pairs = Some(names);
            }
            "--out" => out = Some(PathBuf::from(it.next().context("--out needs a file name")?)),
            other => bail!("unknown bench option {other:?}\nusage: cargo xtask {USAGE}"),
        }
    }
    let pairs = pairs.unwrap_or_else(|| {
        if smoke {
            vec!["testdata-a".to_string()]
        } else {
            all_pair_names().into_iter().map(str::to_string).collect()
        }
    });
    if out.is_none() && !smoke {
        out = Some(ws.join("BENCHMARKS.md"));
    }
    Ok(Options { smoke, pairs, out })
}

/// Fail unless `what` (`bsi apply`) left `root` as the tree `expected` (`the new one`) is.
fn check_left(root: &Path, expected: &Path, what: &str, name: &str) -> Result<()> {
    let diffs = compare_trees(root, expected, &[])?;
    match diffs.first() {
        Some(d) => bail!(
            "{what} left a tree that differs from {name} in {} places, first {d}",
            diffs.len()
        ),
        None => Ok(()),
    }
}

/// Wall time and peak memory of one child process.
#[derive(Clone, Copy, Debug, Default)]
struct Measure {
    secs: f64,
    /// Peak resident set size in KiB, if /usr/bin/time is there to tell.
    rss_kib: Option<u64>,
}

/// What one tool did on one pair in one run.
#[derive(Clone, Copy, Debug, Default)]
struct Cell {
    bytes: u64,
    build: Measure,
    apply: Measure,
}

impl Cell {
    /// Adds the cost of one more file (sum of bytes and seconds, maximum of memory).
    fn add(&mut self, bytes: u64, build: Measure, apply: Measure) {
        self.bytes += bytes;
        for (acc, m) in [(&mut self.build, build), (&mut self.apply, apply)] {
            acc.secs += m.secs;
            acc.rss_kib = match (acc.rss_kib, m.rss_kib) {
                (Some(a), Some(b)) => Some(a.max(b)),
                (a, b) => a.or(b),
            };
        }
    }
}

/// How one tool fared on one pair: a cell per run, or why it failed.
type Outcome = std::result::Result<Vec<Cell>, String>;

/// Runs child processes with timing, in the scratch directory.
#[derive(Debug)]
struct Runner {
    ws: PathBuf,
    scratch: PathBuf,
    have_time: bool,
}

impl Runner {
    /// Where [`Runner::run`] leaves the standard output of the last command it ran.
    fn stdout(&self) -> PathBuf {
        self.scratch.join("stdout.txt")
    }

    /// Runs `program args` to completion under /usr/bin/time; an error names the command and
    /// shows the end of its stderr.
    fn run(&self, program: &str, args: &[OsString]) -> Result<Measure> {
        let rss_file = self.scratch.join("rss.txt");
        let (stdout_file, stderr_file) = (self.stdout(), self.scratch.join("stderr.txt"));
        let mut cmd = if self.have_time {
            let mut c = Command::new(TIME);
            c.args(["-f", "%M", "-o"]).arg(&rss_file).arg(program);
            c
        } else {
            Command::new(program)
        };
        cmd.args(args)
            .current_dir(&self.ws)
            .stdin(Stdio::null())
            .stdout(fs::File::create(&stdout_file)?)
            .stderr(fs::File::create(&stderr_file)?)
            // its own process group, so that a timeout kills the tool and not only `time`
            .process_group(0);
        let shown = format!(
            "{program} {}",
            args.iter()
                .map(|a| a.to_string_lossy())
                .collect::<Vec<_>>()
                .join(" ")
        );
        let started = Instant::now();
        let mut child = cmd
            .spawn()
            .with_context(|| format!("could not start {program}"))?;
        let pid = child.id();
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            let status = child.wait();
            let secs = started.elapsed().as_secs_f64();
            // the receiver is gone only after a timeout, when nobody needs the result
            let _ = tx.send((status, secs));
        });
        let (status, secs) = match rx.recv_timeout(TIMEOUT) {
            Ok(r) => r,
            Err(_) => {
                let _ = Command::new("kill")
                    .args(["-KILL", "--", &format!("-{pid}")])
                    .status();
                bail!("`{shown}` timed out after {} s", TIMEOUT.as_secs());
            }
        };
        let status = status.with_context(|| format!("waiting for {program}"))?;
        if !status.success() {
            let err = fs::read_to_string(&stderr_file).unwrap_or_default();
            let tail: Vec<&str> = err.lines().rev().take(4).collect();
            let tail: Vec<&str> = tail.into_iter().rev().collect();
            bail!("`{shown}` failed ({status}): {}", tail.join(" / "));
        }
        let rss_kib = if self.have_time {
            fs::read_to_string(&rss_file)
                .ok()
                .and_then(|s| s.lines().rev().find_map(|l| l.trim().parse().ok()))
        } else {
            None
        };
        Ok(Measure { secs, rss_kib })
    }
}

fn os(parts: &[&dyn AsRef<std::ffi::OsStr>]) -> Vec<OsString> {
    parts.iter().map(|p| p.as_ref().to_os_string()).collect()
}

/// Whether two files hold the same bytes.
fn same_bytes(a: &Path, b: &Path) -> Result<bool> {
    let (ma, mb) = (fs::metadata(a)?, fs::metadata(b)?);
    if ma.len() != mb.len() {
        return Ok(false);
    }
    let open = |p: &Path| -> Result<BufReader<fs::File>> {
        Ok(BufReader::with_capacity(
            1 << 20,
            fs::File::open(p).with_context(|| format!("opening {}", p.display()))?,
        ))
    };
    let (mut ra, mut rb) = (open(a)?, open(b)?);
    let (mut ba, mut bb) = (vec![0u8; 1 << 20], vec![0u8; 1 << 20]);
    loop {
        let n = read_full(&mut ra, &mut ba)?;
        let m = read_full(&mut rb, &mut bb)?;
        if n != m || ba[..n] != bb[..m] {
            return Ok(false);
        }
        if n == 0 {
            return Ok(true);
        }
    }
}

fn read_full(r: &mut impl Read, buf: &mut [u8]) -> Result<usize> {
    let mut n = 0;
    while n < buf.len() {
        match r.read(&mut buf[n..])? {
            0 => break,
            k => n += k,
        }
    }
    Ok(n)
}

/// The regular files of a pair as the peers see them.
#[derive(Debug, Default)]
struct Files {
    /// Regular files in both trees whose bytes differ (relative paths).
    changed: Vec<PathBuf>,
    /// Regular files of the new tree that are not regular files in the old one.
    added: Vec<PathBuf>,
    deleted: usize,
    unchanged: usize,
    /// Total size of the new tree's regular files.
    new_bytes: u64,
    changed_bytes: u64,
    added_bytes: u64,
}

fn regular_files(root: &Path) -> Result<BTreeSet<PathBuf>> {
    let mut out = BTreeSet::new();
    for e in WalkDir::new(root).min_depth(1) {
        let e = e.with_context(|| format!("walking {}", root.display()))?;
        if e.file_type().is_file() {
            out.insert(
                e.path()
                    .strip_prefix(root)
                    .expect("walkdir yields paths below its root")
                    .to_path_buf(),
            );
        }
    }
    Ok(out)
}

fn classify(old: &Path, new: &Path) -> Result<Files> {
    let (fo, fn_) = (regular_files(old)?, regular_files(new)?);
    let mut f = Files {
        deleted: fo.difference(&fn_).count(),
        ..Files::default()
    };
    for rel in &fn_ {
        let len = fs::metadata(new.join(rel))?.len();
        f.new_bytes += len;
        if !fo.contains(rel) {
            f.added.push(rel.clone());
            f.added_bytes += len;
        } else if same_bytes(&old.join(rel), &new.join(rel))? {
            f.unchanged += 1;
        } else {
            f.changed.push(rel.clone());
            f.changed_bytes += len;
        }
    }
    Ok(f)
}

/// Read every regular file under `dir` (into the page cache; the bytes are dropped).
fn warm(dir: &Path) -> Result<()> {
    for rel in regular_files(dir)? {
        let path = dir.join(&rel);
        std::io::copy(&mut fs::File::open(&path)?, &mut std::io::sink())
            .with_context(|| format!("read {}", path.display()))?;
    }
    Ok(())
}

/// [`warm`] both trees of `pair`.
fn warm_pair(pair: &Pair) -> Result<()> {
    warm(&pair.old)?;
    warm(&pair.new)
}

/// One input pair, ready to run.
#[derive(Debug)]
struct Pair {
    name: String,
    what: String,
    old: PathBuf,
    new: PathBuf,
    real: bool,
}

/// `apt-get`, run at most once for `update`.
#[derive(Debug)]
struct Apt {
    root: bool,
    updated: bool,
}

impl Apt {
    fn update(&mut self) -> Result<()> {
        if !self.updated {
            self.updated = true;
            println!("$ apt-get update");
            let st = Command::new("apt-get")
                .args(["update", "-qq"])
                .status()
                .context("could not start apt-get")?;
            if !st.success() {
                bail!("apt-get update failed ({st})");
            }
        }
        Ok(())
    }
}

fn on_path(program: &str) -> bool {
    if program.contains('/') {
        return Path::new(program).is_file();
    }
    std::env::var_os("PATH")
        .is_some_and(|p| std::env::split_paths(&p).any(|d| d.join(program).is_file()))
}

fn is_root() -> bool {
    Command::new("id")
        .arg("-u")
        .output()
        .is_ok_and(|o| String::from_utf8_lossy(&o.stdout).trim() == "0")
}

/// Which peers can run; installs missing ones with apt-get when allowed. Returns the notes to
/// print about tools that stay missing.
fn ensure_tools(apt: &mut Apt, install: bool) -> Result<(Vec<Tool>, bool, Vec<String>)> {
    let missing_pkgs = |tools: &[Tool]| -> Vec<&'static str> {
        let mut pkgs: Vec<&str> = tools
            .iter()
            .filter(|t| t.programs().0.iter().any(|p| !on_path(p)))
            .map(|t| t.programs().1)
            .collect();
        if !Path::new(TIME).is_file() {
            pkgs.push("time");
        }
        pkgs.dedup();
        pkgs
    };
    let missing = missing_pkgs(&TOOLS);
    if !missing.is_empty() && install && apt.root {
        apt.update()?;
        println!("$ apt-get install -y {}", missing.join(" "));
        let st = Command::new("apt-get")
            .args(["install", "-y", "-qq"])
            .args(&missing)
            .env("DEBIAN_FRONTEND", "noninteractive")
            .status()
            .context("could not start apt-get")?;
        if !st.success() {
            eprintln!("warning: apt-get install failed ({st})");
        }
    }
    let mut notes = Vec::new();
    let zstd_ok = on_path("zstd");
    let mut tools = vec![Tool::Bsi];
    for t in &TOOLS[1..] {
        let (progs, pkg) = t.programs();
        let lacking: Vec<&str> = progs.iter().copied().filter(|p| !on_path(p)).collect();
        if !lacking.is_empty() {
            notes.push(format!(
                "{} left out: {} not found (install with `sudo apt-get install -y {pkg}`)",
                t.label(),
                lacking.join(", ")
            ));
        } else if !zstd_ok {
            notes.push(format!(
                "{} left out: zstd (used for new files) not found (install with `sudo apt-get install -y zstd`)",
                t.label()
            ));
        } else {
            tools.push(*t);
        }
    }
    let have_time = Path::new(TIME).is_file();
    if !have_time {
        notes.push(format!(
            "peak memory not measured: {TIME} not found (install with `sudo apt-get install -y time`)"
        ));
    }
    Ok((tools, have_time, notes))
}

/// The .deb of `package=version` in the cache, downloaded if it is not there yet.
fn fetch_deb(ws: &Path, apt: &mut Apt, package: &str, version: &str) -> Result<PathBuf> {
    let cache = ws.join(CACHE);
    fs::create_dir_all(&cache).with_context(|| format!("creating {}", cache.display()))?;
    let prefix = format!("{package}_{}_", version.replace(':', "%3a"));
    let find = || -> Result<Option<PathBuf>> {
        for e in fs::read_dir(&cache)? {
            let name = e?.file_name().to_string_lossy().into_owned();
            if name.starts_with(&prefix) && name.ends_with(".deb") {
                return Ok(Some(cache.join(name)));
            }
        }
        Ok(None)
    };
    if let Some(p) = find()? {
        return Ok(p);
    }
    for attempt in 0..2 {
        if attempt == 1 {
            if !apt.root {
                break;
            }
            apt.update()?;
        }
        println!("$ (cd {CACHE} && apt-get download {package}={version})");
        let out = Command::new("apt-get")
            .args(["download", "-qq", &format!("{package}={version}")])
            .current_dir(&cache)
            .output()
            .context("could not start apt-get")?;
        if let Some(p) = find()? {
            return Ok(p);
        }
        eprintln!("{}", String::from_utf8_lossy(&out.stderr).trim());
    }
    bail!("could not download {package}={version} with apt-get")
}

/// The extracted tree of a cached .deb (extracted once).
fn extract(ws: &Path, deb: &Path) -> Result<PathBuf> {
    extract_once(ws, deb, "dpkg-deb -x", |dir| {
        let mut c = Command::new("dpkg-deb");
        c.arg("-x").arg(deb).arg(dir);
        c
    })
}

/// The tree `archive` extracts to in the cache, which `command` (`what`) makes in the directory
/// it is given the first time; a tree left half made is made again.
fn extract_once(
    ws: &Path,
    archive: &Path,
    what: &str,
    command: impl FnOnce(&Path) -> Command,
) -> Result<PathBuf> {
    let stem = archive
        .file_stem()
        .context("an archive has a file name")?
        .to_string_lossy()
        .into_owned();
    let dir = ws.join(CACHE).join("trees").join(&stem);
    let done = ws.join(CACHE).join("trees").join(format!("{stem}.done"));
    if done.is_file() && dir.is_dir() {
        return Ok(dir);
    }
    if dir.exists() {
        fs::remove_dir_all(&dir)?;
    }
    fs::create_dir_all(&dir)?;
    println!("$ {what} {} {}", archive.display(), dir.display());
    let st = command(&dir)
        .status()
        .with_context(|| format!("could not start {what}"))?;
    if !st.success() {
        bail!("{what} {} failed ({st})", archive.display());
    }
    fs::write(&done, b"")?;
    Ok(dir)
}

/// Extracts a wheel (a zip file) with Python's `zipfile`, each file's time set to the one the
/// archive records, so that both trees of a pair are the same whenever they are extracted.
const UNZIP: &str = "import os, sys, time, zipfile
with zipfile.ZipFile(sys.argv[1]) as z:
    for info in z.infolist():
        path = z.extract(info, sys.argv[2])
        if not info.is_dir():
            stamp = time.mktime(info.date_time + (0, 0, -1))
            os.utime(path, (stamp, stamp))";

/// The wheel of `package==version` for `w`'s platform in the cache, downloaded with pip if it is
/// not there yet.
fn fetch_wheel(ws: &Path, w: &Wheel, version: &str) -> Result<PathBuf> {
    let cache = ws.join(CACHE).join("wheels");
    fs::create_dir_all(&cache).with_context(|| format!("creating {}", cache.display()))?;
    let prefix = format!("{}-{version}-", w.package).to_lowercase();
    let find = || -> Result<Option<PathBuf>> {
        for e in fs::read_dir(&cache)? {
            let name = e?.file_name().to_string_lossy().into_owned();
            let lower = name.to_lowercase();
            if lower.starts_with(&prefix) && lower.ends_with(&format!("{}.whl", w.platform)) {
                return Ok(Some(cache.join(name)));
            }
        }
        Ok(None)
    };
    if let Some(p) = find()? {
        return Ok(p);
    }
    let spec = format!("{}=={version}", w.package);
    println!(
        "$ python3 -m pip download --no-deps --only-binary=:all: --platform {} --python-version {} -d {CACHE}/wheels {spec}",
        w.platform, w.python
    );
    let out = Command::new("python3")
        .args([
            "-m",
            "pip",
            "download",
            "-q",
            "--no-deps",
            "--only-binary=:all:",
        ])
        .args(["--platform", w.platform, "--python-version", w.python, "-d"])
        .arg(&cache)
        .arg(&spec)
        .output()
        .context("could not start python3 -m pip")?;
    if let Some(p) = find()? {
        return Ok(p);
    }
    eprintln!("{}", String::from_utf8_lossy(&out.stderr).trim());
    bail!("could not download {spec} for {} with pip", w.platform)
}

/// The extracted tree of a cached wheel (extracted once).
fn extract_wheel(ws: &Path, wheel: &Path) -> Result<PathBuf> {
    extract_once(ws, wheel, "python3 (zipfile)", |dir| {
        let mut c = Command::new("python3");
        c.args(["-c", UNZIP]).arg(wheel).arg(dir).env("TZ", "UTC");
        c
    })
}

fn prepare_wheel(ws: &Path, w: &Wheel) -> Result<Pair> {
    if !on_path("python3") {
        bail!("python3 with pip is needed for the wheel pairs");
    }
    let old = extract_wheel(ws, &fetch_wheel(ws, w, w.old)?)?;
    let new = extract_wheel(ws, &fetch_wheel(ws, w, w.new)?)?;
    Ok(Pair {
        name: w.name.to_string(),
        what: format!(
            "{}: {} {} -> {} ({})",
            w.what, w.package, w.old, w.new, w.platform
        ),
        old,
        new,
        real: true,
    })
}

fn prepare_deb(ws: &Path, apt: &mut Apt, d: &Deb) -> Result<Pair> {
    if !on_path("apt-get") || !on_path("dpkg-deb") {
        bail!("apt-get and dpkg-deb are needed for the Debian pairs");
    }
    let old = extract(ws, &fetch_deb(ws, apt, d.package, d.old)?)?;
    let new = extract(ws, &fetch_deb(ws, apt, d.package, d.new)?)?;
    Ok(Pair {
        name: d.name.to_string(),
        what: format!("{}: {} {} -> {}", d.what, d.package, d.old, d.new),
        old,
        new,
        real: true,
    })
}

// ---------------------------------------------------------------------------------------------
// the tools

fn bsi_run(r: &Runner, pair: &Pair) -> Result<Cell> {
    let done = bsi_build_apply(r, &pair.name, &pair.old, &pair.new)?;
    Ok(Cell {
        bytes: done.bytes,
        build: done.build,
        apply: done.apply,
    })
}

/// What [`bsi_build_apply`] did, and where it left the root it applied to.
struct Applied {
    bytes: u64,
    build: Measure,
    apply: Measure,
    root: PathBuf,
    state: PathBuf,
}

/// bsi builds a package `out` from `old` to `new`, as letter `letter` of the bench's release.
fn bsi_build(r: &Runner, old: &Path, new: &Path, letter: &str, out: &Path) -> Result<Measure> {
    r.run(
        BSI_COPY,
        &os(&[
            &"build",
            &"--base",
            &old,
            &"--target",
            &new,
            &"--product",
            &"bench",
            &"--base-version",
            &"1",
            &"--letter",
            &letter,
            &"--key",
            &KEY,
            &"--out",
            &out,
            &"--quiet",
        ]),
    )
}

/// bsi builds a package `name.bsi` from `old` to `new` and applies it to a fresh copy of `old`
/// in the scratch directory; the tree is checked to equal `new`.
fn bsi_build_apply(r: &Runner, name: &str, old: &Path, new: &Path) -> Result<Applied> {
    let pkg = r.scratch.join(format!("{name}.bsi"));
    let build = bsi_build(r, old, new, "a", &pkg)?;
    let bytes = fs::metadata(&pkg)
        .with_context(|| format!("bsi build did not write {}", pkg.display()))?
        .len();
    let (root, state) = (r.scratch.join("root"), r.scratch.join("state"));
    for d in [&root, &state] {
        if d.exists() {
            fs::remove_dir_all(d).with_context(|| format!("removing {}", d.display()))?;
        }
    }
    copy_tree(old, &root)?;
    // A device's tree was not written a moment ago: neither the copy's writeback (its fsyncs
    // would wait on it) nor its too recent times of change (see `SETTLED`) are the apply's.
    let synced = std::process::Command::new("sync")
        .status()
        .context("running sync")?;
    ensure!(synced.success(), "sync failed: {synced}");
    std::thread::sleep(SETTLED);
    let apply = r.run(
        BSI_COPY,
        &os(&[
            &"apply",
            &pkg,
            &"--root",
            &root,
            &"--trust",
            &TRUST,
            &"--state-dir",
            &state,
            &"--quiet",
        ]),
    )?;
    check_left(&root, new, "bsi apply", "the new one")?;
    Ok(Applied {
        bytes,
        build,
        apply,
        root,
        state,
    })
}

/// zstd's `--long` window log for a patch between files of these sizes.
fn window_log(old: u64, new: u64) -> u32 {
    let n = old.max(new) + 1;
    // ceil(log2(n))
    let log = 64 - (n - 1).leading_zeros();
    log.clamp(10, 31)
}

/// Encodes and decodes one changed file with a peer; checks the decoded bytes.
fn peer_file(r: &Runner, tool: Tool, old: &Path, new: &Path) -> Result<(u64, Measure, Measure)> {
    let patch = r.scratch.join("peer.patch");
    let out = r.scratch.join("peer.out");
    for p in [&patch, &out] {
        if p.exists() {
            fs::remove_file(p)?;
        }
    }
    let (build, apply) = match tool {
        Tool::Bsdiff => (
            r.run("bsdiff", &os(&[&old, &new, &patch]))?,
            r.run("bspatch", &os(&[&old, &out, &patch]))?,
        ),
        Tool::Xdelta3 => (
            // -D -R: no external gzip round trip, which does not give back the same bytes
            r.run(
                "xdelta3",
                &os(&[&"-9", &"-D", &"-R", &"-e", &"-s", &old, &new, &patch]),
            )?,
            r.run(
                "xdelta3",
                &os(&[&"-D", &"-R", &"-d", &"-s", &old, &patch, &out]),
            )?,
        ),
        Tool::Zstd => {
            let long = format!(
                "--long={}",
                window_log(fs::metadata(old)?.len(), fs::metadata(new)?.len())
            );
            let mut from = OsString::from("--patch-from=");
            from.push(old);
            (
                r.run(
                    "zstd",
                    &os(&[&"-q", &"-f", &"-19", &long, &from, &new, &"-o", &patch]),
                )?,
                r.run(
                    "zstd",
                    &os(&[&"-q", &"-f", &"-d", &long, &from, &patch, &"-o", &out]),
                )?,
            )
        }
        Tool::Bsi => unreachable!("bsi works on trees"),
    };
    if !same_bytes(&out, new)? {
        bail!("{} decoded {} wrongly", tool.label(), new.display());
    }
    Ok((fs::metadata(&patch)?.len(), build, apply))
}

/// What every peer pays for the new files: `zstd -19` each, and decoding it.
fn added_files(r: &Runner, pair: &Pair, files: &Files) -> Result<Cell> {
    let (z, out) = (r.scratch.join("new.zst"), r.scratch.join("new.out"));
    let mut cell = Cell::default();
    for rel in &files.added {
        let new = pair.new.join(rel);
        let build = r.run("zstd", &os(&[&"-q", &"-f", &"-19", &new, &"-o", &z]))?;
        let apply = r.run("zstd", &os(&[&"-q", &"-f", &"-d", &z, &"-o", &out]))?;
        if !same_bytes(&out, &new)? {
            bail!("zstd decoded {} wrongly", new.display());
        }
        cell.add(fs::metadata(&z)?.len(), build, apply);
    }
    Ok(cell)
}

fn peer_run(r: &Runner, tool: Tool, pair: &Pair, files: &Files, added: Cell) -> Result<Cell> {
    let mut cell = added;
    for rel in &files.changed {
        let (bytes, build, apply) = peer_file(r, tool, &pair.old.join(rel), &pair.new.join(rel))
            .with_context(|| format!("{}", rel.display()))?;
        cell.add(bytes, build, apply);
    }
    Ok(cell)
}

// ---------------------------------------------------------------------------------------------
// one pair

#[derive(Debug)]
struct PairResult {
    pair: Pair,
    files: Files,
    runs: usize,
    /// bsdiff's (or the slowest tool's) first build time, which decided `runs`.
    slow_secs: f64,
    outcomes: Vec<(Tool, Outcome)>,
    /// What each encoder took of bsi's package, where bsi ran.
    chosen: Option<chosen::Chosen>,
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

fn median_rss(v: Vec<Option<u64>>) -> Option<u64> {
    let mut known: Vec<u64> = v.into_iter().flatten().collect();
    known.sort_unstable();
    known.get(known.len() / 2).copied()
}

/// The median of each figure over the runs.
fn summarize(cells: &[Cell]) -> Cell {
    Cell {
        bytes: cells[0].bytes,
        build: Measure {
            secs: median(cells.iter().map(|c| c.build.secs).collect()),
            rss_kib: median_rss(cells.iter().map(|c| c.build.rss_kib).collect()),
        },
        apply: Measure {
            secs: median(cells.iter().map(|c| c.apply.secs).collect()),
            rss_kib: median_rss(cells.iter().map(|c| c.apply.rss_kib).collect()),
        },
    }
}

/// Runs every tool on a pair, round-robin: once for `--smoke`, else three times, once if
/// bsdiff is slow (see [`SLOW_SECS`]), five times if it is quick (see [`QUICK_SECS`]) and
/// eleven times if it is quicker still (see [`QUICKEST_SECS`]).
fn bench_pair(r: &Runner, pair: Pair, tools: &[Tool], smoke: bool) -> Result<PairResult> {
    let files = classify(&pair.old, &pair.new)?;
    let mut outcomes: Vec<(Tool, Outcome)> = tools.iter().map(|t| (*t, Ok(Vec::new()))).collect();
    let mut runs = if smoke { 1 } else { 3 };
    let mut slow_secs = 0.0;
    let mut round = 0;
    while round < runs {
        // what the peers pay for new files, measured once per round, the pair just read (see
        // below)
        let added = if tools.len() > 1 {
            warm_pair(&pair)?;
            Some(added_files(r, &pair, &files).map_err(|e| format!("{e:#}")))
        } else {
            None
        };
        for (tool, outcome) in &mut outcomes {
            let Ok(cells) = outcome else { continue };
            // Every file any tool reads, read again just before each tool runs: the first to
            // run would otherwise read the pair from disk and the others from the page cache,
            // and this VM's page cache does not keep what it read for long (1.3 GB held with
            // 22 GB free; the testdata's build once took 9.3 s instead of 0.8, reading it).
            warm_pair(&pair)?;
            let cell = match tool {
                Tool::Bsi => bsi_run(r, &pair).map_err(|e| format!("{e:#}")),
                _ => match added.as_ref().expect("peers present") {
                    Ok(a) => peer_run(r, *tool, &pair, &files, *a).map_err(|e| format!("{e:#}")),
                    Err(e) => Err(e.clone()),
                },
            };
            match cell {
                Ok(c) => {
                    eprintln!(
                        "  {} run {}: {} B, build {:.2} s, apply {:.2} s",
                        tool.label(),
                        round + 1,
                        c.bytes,
                        c.build.secs,
                        c.apply.secs,
                    );
                    cells.push(c);
                }
                Err(e) => {
                    eprintln!("  {} FAILED: {e}", tool.label());
                    *outcome = Err(e);
                }
            }
        }
        if round == 0 {
            let first = |want: Tool| {
                outcomes.iter().find_map(|(t, o)| match o {
                    Ok(c) if *t == want => c.first().map(|c| c.build.secs),
                    _ => None,
                })
            };
            slow_secs = first(Tool::Bsdiff).unwrap_or_else(|| {
                outcomes
                    .iter()
                    .filter_map(|(_, o)| o.as_ref().ok()?.first().map(|c| c.build.secs))
                    .fold(0.0, f64::max)
            });
            runs = match slow_secs {
                _ if smoke => runs,
                s if s > SLOW_SECS => 1,
                s if s <= QUICKEST_SECS => QUICKEST_RUNS,
                s if s <= QUICK_SECS => QUICK_RUNS,
                _ => runs,
            };
        }
        round += 1;
    }
    let bsi_ran = outcomes
        .iter()
        .any(|(t, o)| *t == Tool::Bsi && o.as_ref().is_ok_and(|c| !c.is_empty()));
    // A package bsi built and applied that its own inspect cannot read is a bug: the bench
    // stops (CI's smoke runs this too).
    let chosen = match bsi_ran {
        true => Some(chosen::of_package(
            r,
            &r.scratch.join(format!("{}.bsi", pair.name)),
        )?),
        false => None,
    };
    Ok(PairResult {
        pair,
        files,
        runs,
        slow_secs,
        outcomes,
        chosen,
    })
}

// ---------------------------------------------------------------------------------------------
// output

fn thousands(n: u64) -> String {
    let digits = n.to_string().into_bytes();
    let groups: Vec<&[u8]> = digits.rchunks(3).rev().collect();
    String::from_utf8(groups.join(&b","[..])).expect("ascii digits")
}

fn secs(s: f64) -> String {
    if s < 0.1 {
        format!("{s:.3}")
    } else if s < 100.0 {
        format!("{s:.2}")
    } else {
        format!("{s:.0}")
    }
}

fn mib(kib: Option<u64>) -> String {
    kib.map_or("n/a".to_string(), |k| format!("{:.0}", k as f64 / 1024.0))
}

fn ratio(a: f64, b: f64) -> String {
    let r = a / b;
    if r < 0.01 {
        format!("{r:.4}")
    } else {
        format!("{r:.2}")
    }
}

fn pair_table(p: &PairResult) -> String {
    let f = &p.files;
    let mut s = String::new();
    let _ = writeln!(s, "### {}\n", p.pair.name);
    let _ = writeln!(s, "{}.\n", p.pair.what);
    let _ = writeln!(
        s,
        "New tree: {} B in {} regular files; {} changed ({} B), {} added ({} B), {} deleted, {} unchanged. {}\n",
        thousands(f.new_bytes),
        f.changed.len() + f.added.len() + f.unchanged,
        f.changed.len(),
        thousands(f.changed_bytes),
        f.added.len(),
        thousands(f.added_bytes),
        f.deleted,
        f.unchanged,
        if p.runs == 1 && p.slow_secs > SLOW_SECS {
            format!(
                "Timed once (bsdiff took {} s > {SLOW_SECS:.0} s).",
                secs(p.slow_secs)
            )
        } else if p.runs == 1 {
            "Timed once (--smoke).".to_string()
        } else {
            format!("Times and memory: median of {} runs.", p.runs)
        }
    );
    let _ = writeln!(
        s,
        "| tool | package B | % of new tree | build s | apply s | build peak MiB | apply peak MiB |"
    );
    let _ = writeln!(s, "| --- | ---: | ---: | ---: | ---: | ---: | ---: |");
    for (tool, o) in &p.outcomes {
        match o {
            Ok(cells) if !cells.is_empty() => {
                let c = summarize(cells);
                let _ = writeln!(
                    s,
                    "| {} | {} | {:.2}% | {} | {} | {} | {} |",
                    tool.label(),
                    thousands(c.bytes),
                    100.0 * c.bytes as f64 / f.new_bytes.max(1) as f64,
                    secs(c.build.secs),
                    secs(c.apply.secs),
                    mib(c.build.rss_kib),
                    mib(c.apply.rss_kib)
                );
            }
            Ok(_) => {}
            Err(e) => {
                let _ = writeln!(
                    s,
                    "| {} | failed: {} | | | | | |",
                    tool.label(),
                    e.replace('|', "\\|")
                );
            }
        }
    }
    s
}

/// The cells of a tool's runs on a pair, round by round, if it ran and succeeded.
fn cells_of(p: &PairResult, tool: Tool) -> Option<&[Cell]> {
    p.outcomes.iter().find_map(|(t, o)| match o {
        Ok(cells) if *t == tool && !cells.is_empty() => Some(cells.as_slice()),
        _ => None,
    })
}

/// The median cell of a tool on a pair, if it ran and succeeded.
fn cell_of(p: &PairResult, tool: Tool) -> Option<Cell> {
    cells_of(p, tool).map(summarize)
}

/// One line of the summary: the ratio, the target, and whether it is met.
struct Check {
    pair: String,
    what: String,
    /// bsi's median over the peer's: what the target is judged by.
    value: Option<f64>,
    /// For times, the lowest and highest ratio of bsi's time to the peer's within one round
    /// (the two ran one after the other, in the same phase of the machine), where there were
    /// two rounds or more: how far the judged ratio is from its target in this machine's noise.
    rounds: Option<(f64, f64)>,
    target: Option<(f64, bool)>,
}

/// The lowest and highest of bsi's figure over the peer's, round by round, where both ran
/// at least two rounds.
fn round_spread(bsi: &[Cell], peer: &[Cell], f: &dyn Fn(&Cell) -> f64) -> Option<(f64, f64)> {
    let ratios: Vec<f64> = bsi
        .iter()
        .zip(peer)
        .filter(|(_, p)| f(p) > 0.0)
        .map(|(b, p)| f(b) / f(p))
        .collect();
    if ratios.len() < 2 {
        return None;
    }
    let low = ratios.iter().copied().fold(f64::INFINITY, f64::min);
    let high = ratios.iter().copied().fold(f64::NEG_INFINITY, f64::max);
    Some((low, high))
}

impl Check {
    fn verdict(&self) -> &'static str {
        match (self.value, self.target) {
            (None, _) => "n/a (a tool is missing or failed)",
            (Some(_), None) => "(no target)",
            (Some(v), Some((t, strict))) if (strict && v < t) || (!strict && v <= t) => "met",
            (Some(_), Some(_)) => "**missed**",
        }
    }
}

fn checks(results: &[PairResult]) -> Vec<Check> {
    let bytes = |c: &Cell| c.bytes.max(1) as f64;
    let build = |c: &Cell| c.build.secs;
    let apply = |c: &Cell| c.apply.secs;
    let mut out = Vec::new();
    for p in results {
        let bsi = cell_of(p, Tool::Bsi);
        // bsi's figure over the peer's, if both ran
        let r = |t: Tool, f: &dyn Fn(&Cell) -> f64| Some(f(&bsi?) / f(&cell_of(p, t)?));
        let spread = |t: Tool, f: &dyn Fn(&Cell) -> f64| {
            round_spread(cells_of(p, Tool::Bsi)?, cells_of(p, t)?, f)
        };
        let mut push = |what: String,
                        value: Option<f64>,
                        rounds: Option<(f64, f64)>,
                        target: Option<(f64, bool)>| {
            out.push(Check {
                pair: p.pair.name.clone(),
                what,
                value,
                rounds,
                target,
            });
        };
        push(
            "size: bsi / bsdiff".into(),
            r(Tool::Bsdiff, &bytes),
            None,
            Some((0.8, false)),
        );
        for t in [Tool::Xdelta3, Tool::Zstd] {
            push(
                format!("size: bsi / {}", t.label()),
                r(t, &bytes),
                None,
                p.pair.real.then_some((1.0, true)),
            );
        }
        push(
            "build time: bsi / bsdiff".into(),
            r(Tool::Bsdiff, &build),
            spread(Tool::Bsdiff, &build),
            Some((0.15, false)),
        );
        if p.pair.name == NEAR_IDENTICAL {
            push(
                "build time: bsi / xdelta3 -9".into(),
                r(Tool::Xdelta3, &build),
                spread(Tool::Xdelta3, &build),
                Some((1.0, false)),
            );
        }
        push(
            "apply time: bsi / bspatch".into(),
            r(Tool::Bsdiff, &apply),
            spread(Tool::Bsdiff, &apply),
            Some((0.5, false)),
        );
    }
    out
}

fn summary_table(results: &[PairResult]) -> String {
    let mut s = String::new();
    let _ = writeln!(
        s,
        "| pair | ratio | value | round by round | target | verdict |"
    );
    let _ = writeln!(s, "| --- | --- | ---: | ---: | --- | --- |");
    let cs = checks(results);
    for c in &cs {
        let _ = writeln!(
            s,
            "| {} | {} | {} | {} | {} | {} |",
            c.pair,
            c.what,
            c.value.map_or("—".to_string(), |v| ratio(v, 1.0)),
            c.rounds.map_or("—".to_string(), |(low, high)| format!(
                "{} to {}",
                ratio(low, 1.0),
                ratio(high, 1.0)
            )),
            match c.target {
                None => "—".to_string(),
                Some((t, true)) => format!("< {t:.2}"),
                Some((t, false)) => format!("<= {t:.2}"),
            },
            c.verdict()
        );
    }
    let judged: Vec<&Check> = cs
        .iter()
        .filter(|c| c.target.is_some() && c.value.is_some())
        .collect();
    let met = judged.iter().filter(|c| c.verdict() == "met").count();
    let unjudged = cs
        .iter()
        .filter(|c| c.target.is_some() && c.value.is_none())
        .count();
    let _ = writeln!(
        s,
        "\nTargets met: {met} of {} judged{}.",
        judged.len(),
        if unjudged > 0 {
            format!(" ({unjudged} not judged: a tool was missing or failed)")
        } else {
            String::new()
        }
    );
    s
}

/// [`chosen::table`] of the pairs where bsi ran.
fn chosen_table(results: &[PairResult]) -> String {
    chosen::table(
        results
            .iter()
            .filter_map(|p| Some((p.pair.name.as_str(), p.chosen.as_ref()?))),
    )
}

fn command_line(program: &str, args: &[&str]) -> String {
    Command::new(program)
        .args(args)
        .output()
        .map(|o| {
            let text = format!(
                "{}{}",
                String::from_utf8_lossy(&o.stdout),
                String::from_utf8_lossy(&o.stderr)
            );
            text.lines().next().unwrap_or("").trim().to_string()
        })
        .unwrap_or_else(|_| "not available".to_string())
}

fn proc_field(file: &str, key: &str) -> String {
    fs::read_to_string(file)
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with(key))
                .and_then(|l| l.split_once(':'))
                .map(|(_, v)| v.trim().to_string())
        })
        .unwrap_or_else(|| "unknown".to_string())
}

fn load_average() -> String {
    fs::read_to_string("/proc/loadavg").map_or("unknown".to_string(), |s| {
        s.split_whitespace().take(3).collect::<Vec<_>>().join(" ")
    })
}

fn header(ws: &Path, tools: &[Tool]) -> String {
    let mut s = String::new();
    let nproc = std::thread::available_parallelism().map_or(0, |n| n.get());
    let mem = proc_field("/proc/meminfo", "MemTotal");
    let mem_gib = mem
        .split_whitespace()
        .next()
        .and_then(|k| k.parse::<f64>().ok())
        .map_or(mem.clone(), |k| format!("{:.1} GiB", k / 1024.0 / 1024.0));
    let _ = writeln!(
        s,
        "- machine: {nproc} CPUs ({}), {mem_gib} memory, `{}`",
        proc_field("/proc/cpuinfo", "model name"),
        command_line("uname", &["-sr"])
    );
    let _ = writeln!(s, "- date: {}", command_line("date", &["-u"]));
    let _ = writeln!(
        s,
        "- load average at start (1, 5, 15 min): {}",
        load_average()
    );
    let commit = Command::new("git")
        .args(["rev-parse", "--short", "HEAD"])
        .current_dir(ws)
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
        .unwrap_or_default();
    let dirty = Command::new("git")
        .args(["status", "--porcelain", "--untracked-files=no"])
        .current_dir(ws)
        .output()
        .is_ok_and(|o| !o.stdout.is_empty());
    let _ = writeln!(
        s,
        "- bsi commit: {commit}{}",
        if dirty {
            " (with uncommitted changes)"
        } else {
            ""
        }
    );
    let _ = writeln!(s, "- bsi: `{}`", command_line(BSI_COPY, &["--version"]));
    for t in tools {
        let v = match t {
            Tool::Bsi => continue,
            Tool::Bsdiff => format!(
                "bsdiff (Debian package {})",
                command_line("dpkg-query", &["-W", "-f=${Version}", "bsdiff"])
            ),
            Tool::Xdelta3 => command_line("xdelta3", &["-V"]),
            Tool::Zstd => command_line("zstd", &["--version"]),
        };
        let _ = writeln!(s, "- {}: `{v}`", t.label());
    }
    s
}

const METHOD: &str = "\
How to read this: every tool runs on the same pairs in the same run, as a child process of
`cargo xtask bench` under `/usr/bin/time -f %M` (peak resident set size); times are wall clock
around the child. Every file of a pair is read just before each tool runs, so that none
pays alone for reading it from disk. bsi builds one signed package from the two trees (`bsi build ... --quiet`, using
every core) and applies it with `bsi apply` to a fresh copy of the old tree (the copy, a `sync`
and 50 ms after it, so that the tree is not one written a moment ago, are not timed);
the result is checked to equal the new tree (bytes, modes, symlinks, mtimes). The peers are
single-file tools: each changed regular file (paired by path) is a separate `bsdiff old new patch`
/ `xdelta3 -9 -D -R -e -s old new patch` / `zstd -q -f -19 --long=N --patch-from=old new -o patch`
process (N = ceil(log2(max size + 1)), clamped to 10..31), decoded with `bspatch` / `xdelta3 -D -R
-d -s` / `zstd -d --long=N --patch-from=old`, and checked against the new file. (`-D -R` turn off
xdelta3's own gzip decompress/recompress round trip, which does not give back the original bytes
of a `.gz` file such as `changelog.Debian.gz`, so without them xdelta3 fails every Debian pair.) Their bytes and times are
summed over the files and their memory is the maximum over the files. Unchanged files cost nothing,
new files cost every peer `zstd -19` of the file, deleted files cost the peers nothing, and the peers
carry no signature, no metadata (modes, mtimes, symlinks) and no file list: the comparison is
generous to the peers. Pairs are timed eleven times where bsdiff's build takes at most 5 s,
five times where it takes at most 10 s, three times where it takes up to 30 s and once beyond
(the median of the runs is shown).";

fn document(
    head: &str,
    notes: &[String],
    results: &[PairResult],
    trees: &[many::ManyResult],
    elapsed: f64,
    done: bool,
) -> String {
    let mut s = String::new();
    let _ = writeln!(s, "# Benchmarks\n");
    let _ = writeln!(
        s,
        "Written by `cargo xtask bench`{}; do not edit by hand, run it again.\n",
        if done {
            ""
        } else {
            " (still running: partial results)"
        }
    );
    s.push_str(head);
    let _ = writeln!(
        s,
        "- bench run time: {elapsed:.0} s; load average at the end: {}\n",
        load_average()
    );
    let _ = writeln!(s, "{METHOD}\n");
    if !notes.is_empty() {
        for n in notes {
            let _ = writeln!(s, "- {n}");
        }
        s.push('\n');
    }
    let _ = writeln!(s, "## Summary\n");
    let _ = writeln!(
        s,
        "Ratios of bsi's figure to the peer's (below 1: bsi is smaller or faster). Targets: package \
         <= 0.8x bsdiff's, and smaller than every peer's on the real pairs (Debian packages, PyPI wheels); build time \
         <= 0.15x bsdiff's summed time, and on the near-identical pair ({NEAR_IDENTICAL}) no \
         slower than xdelta3 -9; apply time <= 0.5x bspatch's. A target is judged by the \
         ratio of the medians (value); for times, round by round gives the lowest and highest \
         ratio of the two tools' times in one round, where they ran one after the other.\n"
    );
    s.push_str(&summary_table(results));
    let _ = writeln!(s, "\n## Encoders chosen\n");
    let _ = writeln!(
        s,
        "What each encoder took of bsi's package, from `bsi inspect --json` of the package built \
         in the last run: the files it was chosen for (the smallest payload of those tried on each \
         file; a new file is compressed by zstd, or a new executable by zstd-prefix against the \
         empty file where that is smaller), how many were encoded against an old file \
         at another path or had their code converted first, their bytes in the new tree and their \
         payloads' bytes.\n"
    );
    s.push_str(&chosen_table(results));
    if !trees.is_empty() {
        let _ = writeln!(s, "\n## Trees of many entries\n");
        s.push_str(&many::table(trees));
    }
    let _ = writeln!(s, "\n## Pairs\n");
    for p in results {
        s.push_str(&pair_table(p));
        s.push('\n');
    }
    s
}

// ---------------------------------------------------------------------------------------------

pub fn bench(ws: &Path, args: &[&str]) -> Result<()> {
    let started = Instant::now();
    let opts = parse(ws, args)?;
    let mut apt = Apt {
        root: is_root(),
        updated: false,
    };
    let (tools, have_time, mut notes) = ensure_tools(&mut apt, !opts.smoke)?;
    for n in &notes {
        eprintln!("note: {n}");
    }
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".to_string());
    println!("$ cargo build --release -p bsi-cli");
    let st = Command::new(&cargo)
        .args(["build", "--release", "--quiet", "-p", "bsi-cli"])
        .current_dir(ws)
        .status()
        .context("could not start cargo")?;
    if !st.success() {
        bail!("cargo build --release -p bsi-cli failed ({st})");
    }
    let scratch = ws.join(WORK);
    if scratch.exists() {
        fs::remove_dir_all(&scratch).with_context(|| format!("removing {}", scratch.display()))?;
    }
    fs::create_dir_all(&scratch).with_context(|| format!("creating {}", scratch.display()))?;
    fs::copy(ws.join(BSI), ws.join(BSI_COPY))
        .with_context(|| format!("copying {BSI} to {BSI_COPY}"))?;
    let runner = Runner {
        ws: ws.to_path_buf(),
        scratch,
        have_time,
    };
    let head = header(ws, &tools);
    println!("\n{head}");

    let mut results = Vec::new();
    let mut trees = Vec::new();
    let mut generated = false;
    for name in &opts.pairs {
        if let Some(&(_, dirs, shape)) = many::TREES.iter().find(|t| t.0 == name) {
            eprintln!(
                "== {name}: {dirs} directories of {}, every time changed",
                shape.what()
            );
            trees.push(many::run(&runner, name, dirs, shape)?);
            println!("\n{}", many::table(&trees));
            continue;
        }
        let pair = if let Some((_, dir, what)) = TESTDATA.iter().find(|t| t.0 == name) {
            if !generated {
                println!("$ cargo xtask testdata");
                crate::testdata::generate(&ws.join("target/testdata"))?;
                generated = true;
            }
            Ok(Pair {
                name: name.clone(),
                what: what.to_string(),
                old: ws.join("target/testdata/26.3"),
                new: ws.join("target/testdata").join(dir),
                real: false,
            })
        } else if let Some(w) = WHEELS.iter().find(|w| w.name == name) {
            prepare_wheel(ws, w)
        } else {
            let d = DEBS
                .iter()
                .find(|d| d.name == name)
                .expect("pair names were checked");
            prepare_deb(ws, &mut apt, d)
        };
        let pair = match pair {
            Ok(p) => p,
            Err(e) => {
                let n = format!("pair {name} left out: {e:#}");
                eprintln!("note: {n}");
                notes.push(n);
                continue;
            }
        };
        eprintln!("== {name}: {}", pair.what);
        let result = bench_pair(&runner, pair, &tools, opts.smoke)?;
        println!("\n{}", pair_table(&result));
        results.push(result);
        if let Some(out) = &opts.out {
            let doc = document(
                &head,
                &notes,
                &results,
                &trees,
                started.elapsed().as_secs_f64(),
                false,
            );
            fs::write(out, doc).with_context(|| format!("writing {}", out.display()))?;
        }
    }
    println!("## Summary\n\n{}", summary_table(&results));
    println!("## Encoders chosen\n\n{}", chosen_table(&results));
    let elapsed = started.elapsed().as_secs_f64();
    if let Some(out) = &opts.out {
        let doc = document(&head, &notes, &results, &trees, elapsed, true);
        fs::write(out, doc).with_context(|| format!("writing {}", out.display()))?;
        println!("wrote {}", out.display());
    }
    println!("bench finished in {elapsed:.0} s");
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn window_log_covers_the_larger_file() {
        assert_eq!(window_log(0, 0), 10);
        assert_eq!(window_log(1023, 10), 10);
        assert_eq!(window_log(1024, 10), 11);
        assert_eq!(window_log(92_000_000, 91_000_000), 27);
        assert_eq!(window_log(u64::MAX / 2, 0), 31);
    }

    #[test]
    fn numbers_are_grouped() {
        assert_eq!(thousands(0), "0");
        assert_eq!(thousands(999), "999");
        assert_eq!(thousands(1000), "1,000");
        assert_eq!(thousands(242_123), "242,123");
        assert_eq!(thousands(1_234_567), "1,234,567");
    }

    #[test]
    fn costs_add_up_and_memory_is_the_maximum() {
        let m = |secs, rss| Measure {
            secs,
            rss_kib: Some(rss),
        };
        let mut c = Cell::default();
        c.add(10, m(1.0, 100), m(0.5, 50));
        c.add(5, m(2.0, 80), m(0.25, 70));
        assert_eq!(c.bytes, 15);
        assert!((c.build.secs - 3.0).abs() < 1e-9);
        assert_eq!(c.build.rss_kib, Some(100));
        assert_eq!(c.apply.rss_kib, Some(70));
    }

    #[test]
    fn rounds_are_compared_one_by_one() {
        let cell = |secs| Cell {
            bytes: 1,
            build: Measure {
                secs,
                rss_kib: None,
            },
            apply: Measure::default(),
        };
        let build = |c: &Cell| c.build.secs;
        let bsi = [cell(1.0), cell(3.0), cell(2.0)];
        let peer = [cell(10.0), cell(10.0), cell(4.0)];
        // 0.1, 0.3 and 0.5: round by round, not the lowest of one over the highest of the other
        assert_eq!(round_spread(&bsi, &peer, &build), Some((0.1, 0.5)));
        // one round, or a peer that took no time, gives no spread
        assert_eq!(round_spread(&bsi[..1], &peer[..1], &build), None);
        assert_eq!(
            round_spread(&bsi[..2], &[cell(0.0), cell(0.0)], &build),
            None
        );
    }

    #[test]
    fn targets_are_judged() {
        let check = |value, target| Check {
            pair: String::new(),
            what: String::new(),
            value,
            rounds: None,
            target,
        };
        assert_eq!(check(Some(0.8), Some((0.8, false))).verdict(), "met");
        assert_eq!(check(Some(1.0), Some((1.0, true))).verdict(), "**missed**");
        assert_eq!(
            check(Some(0.81), Some((0.8, false))).verdict(),
            "**missed**"
        );
        assert_eq!(
            check(None, Some((0.8, false))).verdict(),
            "n/a (a tool is missing or failed)"
        );
    }
}
