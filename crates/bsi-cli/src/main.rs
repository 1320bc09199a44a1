//! `bsi`: build, sign, verify, apply and revert lettered patch packages.
//!
//! Exit codes: 0 success, 1 refused or failed, 2 usage error. Errors are one sentence on stderr;
//! `--json` output goes to stdout.

/// A line on stdout. Output never panics: when stdout is a pipe whose reader has gone
/// (`bsi inspect pkg | head`), bsi stops quietly with status 0, as the reader asked for no more;
/// any other write failure is reported and ends bsi with status 1.
macro_rules! out {
    ($($arg:tt)*) => {{
        use std::io::Write as _;
        if let Err(e) = writeln!(std::io::stdout().lock(), $($arg)*) {
            $crate::stdout_failed(e);
        }
    }};
}

/// A line on stderr; if stderr cannot be written to, the line is dropped and bsi goes on.
macro_rules! say {
    ($($arg:tt)*) => {{
        use std::io::Write as _;
        let _ = writeln!(std::io::stderr().lock(), $($arg)*);
    }};
}

mod channel;
mod inspect;
mod progress;

use std::io::IsTerminal;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::{bail, Context, Result};
use bsi_engine::{ApplyOutcome, BuildOptions, ComponentSpec, Session, VerifiedPackage};
use bsi_format::{Letter, Version};
use bsi_sign::{PublicKey, SecretKey};
use clap::{Parser, Subcommand};

#[derive(Debug, Parser)]
#[command(
    name = "bsi",
    version,
    about = "Build, sign, verify, apply and revert lettered security patch packages"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Make an ed25519 key pair: DIR/NAME.key.pem (PKCS#8) and DIR/NAME.pub.pem (SPKI).
    Keygen {
        #[arg(long, value_name = "DIR")]
        out_dir: PathBuf,
        #[arg(long)]
        name: String,
    },
    /// Diff two trees into a signed patch package.
    Build {
        #[arg(long, value_name = "OLD_TREE")]
        base: PathBuf,
        #[arg(long, value_name = "NEW_TREE")]
        target: PathBuf,
        #[arg(long, value_name = "NAME")]
        product: String,
        #[arg(long, value_name = "VER")]
        base_version: Version,
        #[arg(long, value_name = "L")]
        letter: Letter,
        #[arg(long, value_name = "KEY.pem")]
        key: PathBuf,
        #[arg(long, value_name = "PKG")]
        out: PathBuf,
        #[arg(long, value_name = "BUILD")]
        base_build: Option<String>,
        /// Limit the package to a subtree, named in the manifest (repeatable).
        #[arg(long = "component", value_name = "NAME=SUBPATH")]
        components: Vec<ComponentSpec>,
        #[arg(long)]
        quiet: bool,
    },
    /// Show what a package contains (the signature is not checked: use `verify`).
    Inspect {
        package: PathBuf,
        #[arg(long)]
        json: bool,
    },
    /// Check a package's signature and structure, and optionally that it turns a tree into its target.
    Verify {
        package: PathBuf,
        #[arg(long, value_name = "PUB.pem")]
        trust: PathBuf,
        #[arg(long, value_name = "DIR")]
        base_tree: Option<PathBuf>,
    },
    /// Install a package on a root.
    Apply {
        package: PathBuf,
        #[arg(long, value_name = "DIR")]
        root: PathBuf,
        #[arg(long, value_name = "PUB.pem")]
        trust: PathBuf,
        #[arg(long, value_name = "DIR")]
        state_dir: Option<PathBuf>,
        /// Wait for another bsi operation on the root to end instead of refusing
        #[arg(long)]
        wait: bool,
        #[arg(long)]
        quiet: bool,
    },
    /// Remove the installed patch, restoring the base release byte for byte.
    Revert {
        #[arg(long, value_name = "DIR")]
        root: PathBuf,
        #[arg(long, value_name = "DIR")]
        state_dir: Option<PathBuf>,
        /// Wait for another bsi operation on the root to end instead of refusing
        #[arg(long)]
        wait: bool,
        #[arg(long)]
        quiet: bool,
    },
    /// Publish packages in a channel directory, withdraw letters, sign the channel metadata.
    #[command(subcommand)]
    Channel(channel::ChannelCommand),
    /// Make trust files: the keys accepted for packages and channel metadata.
    #[command(subcommand)]
    Trust(channel::TrustCommand),
    /// Read a channel and bring the root to its newest letter for the root's base (leaving a
    /// withdrawn letter in any case; installing a new one with --install).
    Update {
        #[arg(long, value_name = "DIR")]
        root: PathBuf,
        #[arg(long, value_name = "REPO_DIR_OR_URL")]
        channel: String,
        #[arg(long, value_name = "TRUST")]
        trust: PathBuf,
        #[arg(long, value_name = "DIR")]
        state_dir: Option<PathBuf>,
        #[arg(long)]
        install: bool,
    },
    /// Show or set a root's policy: automatic install, and whether new letters are allowed.
    Policy {
        #[arg(long, value_name = "DIR")]
        root: PathBuf,
        #[arg(long, value_name = "DIR")]
        state_dir: Option<PathBuf>,
        #[arg(long, value_name = "on|off")]
        auto_install: Option<OnOff>,
        #[arg(long, value_name = "on|off")]
        allow: Option<OnOff>,
    },
    /// Complete or roll back an interrupted apply, revert or switch, and say which.
    Recover {
        #[arg(long, value_name = "DIR")]
        root: PathBuf,
        #[arg(long, value_name = "DIR")]
        state_dir: Option<PathBuf>,
        /// Wait for another bsi operation on the root to end instead of refusing
        #[arg(long)]
        wait: bool,
    },
    /// Show the release and installed letter of a root.
    Status {
        #[arg(long, value_name = "DIR")]
        root: PathBuf,
        #[arg(long, value_name = "DIR")]
        state_dir: Option<PathBuf>,
        #[arg(long)]
        json: bool,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match run(cli.command) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            let mut message = e.to_string();
            for cause in e.chain().skip(1) {
                let cause = cause.to_string();
                if !message.contains(&cause) {
                    message.push_str(": ");
                    message.push_str(&cause);
                }
            }
            say!("bsi: error: {message}");
            ExitCode::from(1)
        }
    }
}

/// See [`out!`].
fn stdout_failed(e: std::io::Error) -> ! {
    if e.kind() == std::io::ErrorKind::BrokenPipe {
        std::process::exit(0);
    }
    say!("bsi: error: cannot write to standard output: {e}");
    std::process::exit(1);
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum OnOff {
    On,
    Off,
}

fn on_off(b: bool) -> &'static str {
    if b {
        "on"
    } else {
        "off"
    }
}

fn state_dir(root: &Path, given: Option<PathBuf>) -> PathBuf {
    given.unwrap_or_else(|| bsi_engine::default_state_dir(root))
}

fn run(command: Command) -> Result<()> {
    match command {
        Command::Keygen { out_dir, name } => {
            anyhow::ensure!(
                !name.is_empty()
                    && name
                        .bytes()
                        .all(|b| b.is_ascii_alphanumeric() || b"-_.".contains(&b)),
                "key name {name:?} may hold only letters, digits, '-', '_' and '.'"
            );
            let key = SecretKey::generate()?;
            let (secret, public) = bsi_sign::write_keypair(&out_dir, &name, &key)?;
            say!(
                "wrote {} and {} (key id {})",
                secret.display(),
                public.display(),
                key.public().key_id()
            );
        }
        Command::Build {
            base,
            target,
            product,
            base_version,
            letter,
            key,
            out,
            base_build,
            components,
            quiet,
        } => {
            let key = SecretKey::load(&key)?;
            let opts = BuildOptions {
                base,
                target,
                product,
                base_version,
                base_build,
                letter,
                components,
                key: &key,
            };
            let bar = progress::Bar::new(quiet);
            let (m, len) = bsi_engine::build_to_file(&opts, &out, &bar)?;
            if !quiet {
                say!(
                    "wrote {}: {} {} ({}), {} bytes, {} changed entries, {} payload bytes",
                    out.display(),
                    m.product,
                    m.base.version,
                    m.letter,
                    len,
                    m.entries.len(),
                    m.payload_len
                );
            }
        }
        Command::Inspect { package, json } => inspect::run(&package, json)?,
        Command::Verify {
            package,
            trust,
            base_tree,
        } => {
            let pkg = open_package(&package, &trust, None)?;
            out!(
                "{}: good signature by key {}; {}, {} entries, {} bytes",
                package.display(),
                pkg.manifest.signer,
                pkg.title(),
                pkg.manifest.entries.len(),
                pkg.len()
            );
            if let Some(tree) = base_tree {
                let decoded = bsi_engine::verify_against_tree(&pkg, &tree)?;
                out!(
                    "{}: turns {} into its target ({} pre-images matched, {} payloads decoded and checked)",
                    package.display(),
                    tree.display(),
                    pkg.manifest.entries.len(),
                    decoded
                );
            }
        }
        Command::Apply {
            package,
            root,
            trust,
            state_dir: given,
            wait,
            quiet,
        } => {
            let state = state_dir(&root, given);
            // The private copy goes where apply writes anyway, without creating anything for a
            // package that may not verify: the state directory once it exists, else the root.
            let private_in = [&state, &root].into_iter().find(|d| d.is_dir());
            let pkg = open_package(&package, &trust, private_in.map(PathBuf::as_path))?;
            let session = Session::open(&root, &state, wait)
                .with_context(|| format!("cannot apply {}", package.display()))?;
            report_recovery(&root, &session, quiet);
            let bar = progress::Bar::new(quiet);
            let outcome = session
                .apply(&pkg, &bar)
                .with_context(|| format!("cannot apply {}", package.display()))?;
            if !quiet {
                match outcome {
                    ApplyOutcome::Installed => {
                        say!("installed {} on {}", pkg.title(), root.display())
                    }
                    ApplyOutcome::AlreadyInstalled => {
                        say!(
                            "{} is already installed on {}; nothing changed",
                            pkg.title(),
                            root.display()
                        )
                    }
                    ApplyOutcome::Replaced { previous } => say!(
                        "installed {} on {}, replacing ({previous})",
                        pkg.title(),
                        root.display()
                    ),
                }
            }
        }
        Command::Revert {
            root,
            state_dir: given,
            wait,
            quiet,
        } => {
            let state = state_dir(&root, given);
            let session = Session::open(&root, &state, wait)?;
            report_recovery(&root, &session, quiet);
            let before = bsi_engine::status(&root, &state)?;
            let letter = session.revert()?;
            if !quiet {
                let base = bsi_engine::Status {
                    letter: None,
                    ..before
                };
                say!(
                    "removed ({letter}) from {}; it is back to {base}",
                    root.display()
                );
            }
        }
        Command::Status {
            root,
            state_dir: given,
            json,
        } => {
            let state = state_dir(&root, given);
            let status = bsi_engine::status(&root, &state)?;
            if json {
                let mut value = serde_json::to_value(&status)?;
                value["display"] = serde_json::Value::String(status.to_string());
                out!("{}", serde_json::to_string_pretty(&value)?);
            } else {
                out!("{status}");
                if let Some(patch) = &status.retired {
                    out!("{patch} is retired: a full release was installed over it");
                }
                if let Some(note) = bsi_engine::DeviceRecord::load(&state)
                    .ok()
                    .and_then(|r| r.note)
                {
                    out!("{note}");
                }
                if let Some(interrupted) = &status.interrupted {
                    out!(
                        "{interrupted} awaits recovery: run `bsi recover --root {}`",
                        root.display()
                    );
                }
            }
        }
        Command::Channel(command) => channel::run(command)?,
        Command::Trust(command) => channel::run_trust(command)?,
        Command::Update {
            root,
            channel,
            trust,
            state_dir: given,
            install,
        } => {
            let channel = bsi_engine::ChannelSource::parse(&channel);
            let state = state_dir(&root, given);
            let trust = update_trust(&trust, &state, &channel)?;
            let outcome = bsi_engine::update(
                &root,
                &state,
                &channel,
                &trust,
                install,
                std::time::SystemTime::now(),
            )?;
            match outcome {
                bsi_engine::UpdateOutcome::UpToDate { title } => {
                    out!("{}: {title} is up to date", root.display())
                }
                bsi_engine::UpdateOutcome::Available { title } => out!(
                    "{}: {title} is available; run again with --install to install it",
                    root.display()
                ),
                bsi_engine::UpdateOutcome::Forbidden { title } => out!(
                    "{}: {title} is available, but the root's policy does not allow installing it",
                    root.display()
                ),
                bsi_engine::UpdateOutcome::Installed { title } => {
                    out!("{}: installed {title}", root.display())
                }
                bsi_engine::UpdateOutcome::LeftWithdrawn {
                    letter,
                    reason,
                    title,
                } => out!(
                    "{}: ({letter}) was withdrawn ({reason}); the root is now {title}",
                    root.display()
                ),
            }
        }
        Command::Policy {
            root,
            state_dir: given,
            auto_install,
            allow,
        } => {
            anyhow::ensure!(
                root.is_dir(),
                "root {} does not exist or is not a directory",
                root.display()
            );
            let state = state_dir(&root, given);
            let mut policy = bsi_engine::Policy::load(&state)?;
            if auto_install.is_some() || allow.is_some() {
                if let Some(v) = auto_install {
                    policy.auto_install = v == OnOff::On;
                }
                if let Some(v) = allow {
                    policy.allow = v == OnOff::On;
                }
                policy.save(&root, &state)?;
            }
            out!(
                "auto-install {}, allow {}",
                on_off(policy.auto_install),
                on_off(policy.allow)
            );
        }
        Command::Recover {
            root,
            state_dir: given,
            wait,
        } => {
            let state = state_dir(&root, given);
            let session = Session::open(&root, &state, wait)?;
            match &session.recovered {
                Some(done) => out!("{}: {done}", root.display()),
                None => out!("{}: nothing to recover", root.display()),
            }
        }
    }
    Ok(())
}

/// The keys `--trust` names for packages: a single public key PEM, or a trust file (its
/// packages role, the file checked against its own root keys).
fn package_keys(trust: &Path) -> Result<Vec<PublicKey>> {
    Ok(match load_trust(trust)? {
        Trusted::Key(key) => vec![key],
        Trusted::File(file) => file.signed.role_keys(&file.signed.roles.packages),
    })
}

/// What `--trust` names.
enum Trusted {
    /// A single public key PEM: it signs packages and channel metadata.
    Key(PublicKey),
    /// A trust file, checked against its own root keys.
    File(bsi_channel::trust::SignedTrust),
}

/// The bytes of a file the user names as input, which must be a regular file (see
/// [`bsi_sign::open_regular`]).
fn read_input(path: &Path) -> std::io::Result<Vec<u8>> {
    use std::io::Read as _;
    let mut bytes = Vec::new();
    bsi_sign::open_regular(path)?.read_to_end(&mut bytes)?;
    Ok(bytes)
}

fn load_trust(trust: &Path) -> Result<Trusted> {
    let text = read_input(trust)
        .and_then(|bytes| String::from_utf8(bytes).map_err(std::io::Error::other))
        .with_context(|| format!("cannot read trust file {}", trust.display()))?;
    if text.trim_start().starts_with("-----BEGIN") {
        let key = PublicKey::from_pem(&text).map_err(|_| bsi_sign::KeyError::NotPublicKey {
            path: trust.to_owned(),
        })?;
        return Ok(Trusted::Key(key));
    }
    let file = bsi_channel::trust::SignedTrust::from_bytes(text.as_bytes())
        .with_context(|| format!("{}", trust.display()))?;
    file.verify_initial()
        .with_context(|| format!("{}", trust.display()))?;
    Ok(Trusted::File(file))
}

/// The keys `update` trusts: one public key for both roles (threshold 1), or a trust file's
/// channel and packages roles. With a trust file, the device keeps the newest version it has
/// accepted in `STATE/trust.json`, and adopts the channel's `trust.json` when it is the next
/// version, signed by thresholds of the current and the new root keys (key rotation).
fn update_trust(
    trust: &Path,
    state: &Path,
    channel: &bsi_engine::ChannelSource,
) -> Result<bsi_engine::UpdateTrust> {
    use bsi_channel::trust::SignedTrust;
    let given = match load_trust(trust)? {
        Trusted::Key(key) => {
            return Ok(bsi_engine::UpdateTrust {
                channel_keys: vec![key.clone()],
                channel_threshold: 1,
                package_keys: vec![key],
            })
        }
        Trusted::File(file) => file,
    };
    let stored_path = state.join("trust.json");
    let mut current = match std::fs::read(&stored_path) {
        Ok(bytes) => {
            let stored = SignedTrust::from_bytes(&bytes)
                .with_context(|| format!("{}", stored_path.display()))?;
            stored
                .verify_initial()
                .with_context(|| format!("{}", stored_path.display()))?;
            if stored.signed.version > given.signed.version {
                stored
            } else {
                given
            }
        }
        Err(_) => given,
    };
    // A rotation published with the channel.
    if let Ok(bytes) = channel.read("trust.json", 1 << 20) {
        let offered = SignedTrust::from_bytes(&bytes)
            .with_context(|| format!("{}", channel.locate("trust.json").display()))?;
        if offered.signed.version > current.signed.version {
            offered
                .verify_rotation(&current.signed)
                .with_context(|| format!("{}", channel.locate("trust.json").display()))?;
            std::fs::create_dir_all(state)
                .with_context(|| format!("cannot create {}", state.display()))?;
            bsi_engine::write_atomically(&stored_path, &offered.to_bytes())?;
            current = offered;
        }
    }
    let checked = &current.signed;
    Ok(bsi_engine::UpdateTrust {
        channel_keys: checked.role_keys(&checked.roles.channel),
        channel_threshold: checked.roles.channel.threshold,
        package_keys: checked.role_keys(&checked.roles.packages),
    })
}

/// Verify a package with the key of `trust` that its manifest names; with `private_in`, into a
/// private copy there (see [`VerifiedPackage::open_private`]).
fn open_package(
    package: &Path,
    trust: &Path,
    private_in: Option<&Path>,
) -> Result<VerifiedPackage> {
    let keys = package_keys(trust)?;
    if keys.is_empty() {
        bail!("{} lists no usable package key", trust.display());
    }
    Ok(match private_in {
        Some(dir) => VerifiedPackage::open_private(package, &keys, dir)?,
        None => VerifiedPackage::open(package, &keys)?,
    })
}

/// Say on stderr what opening a session recovered, if anything.
fn report_recovery(root: &Path, session: &Session, quiet: bool) {
    if let (Some(done), false) = (&session.recovered, quiet) {
        say!("{}: {done}", root.display());
    }
}

/// True when progress bars may be drawn.
fn stderr_is_terminal() -> bool {
    std::io::stderr().is_terminal()
}
