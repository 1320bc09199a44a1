//! Every byte of a package is covered: flipping any bit, cutting or extending the file makes
//! verification fail, and `bsi apply` then writes nothing.

use std::fs;
use std::path::Path;

use bsi_engine::VerifiedPackage;
use bsi_sign::PublicKey;

use crate::support::*;

fn example_trust() -> PublicKey {
    PublicKey::load(&example_pub()).expect("example public key loads")
}

/// Offsets (sorted, unique) whose flipped bit `from_bytes` accepted.
fn accepted_flips(bytes: &[u8], offsets: impl IntoIterator<Item = usize>) -> Vec<usize> {
    let trust = example_trust();
    let path = Path::new("tampered.bsi");
    let mut accepted = Vec::new();
    for i in offsets {
        let mut flipped = bytes.to_vec();
        flipped[i] ^= 0x01;
        if VerifiedPackage::from_bytes(flipped, &trust, path).is_ok() {
            accepted.push(i);
        }
    }
    accepted
}

/// Offsets (sorted, unique) whose flipped bit `open` (reading from a file in chunks) or
/// `open_private` (copying the payloads as it reads) accepted.
fn accepted_flips_from_file(
    bytes: &[u8],
    dir: &Path,
    offsets: impl IntoIterator<Item = usize>,
) -> Vec<usize> {
    let keys = [example_trust()];
    let file = dir.join("tampered.bsi");
    let mut accepted = Vec::new();
    for i in offsets {
        let mut flipped = bytes.to_vec();
        flipped[i] ^= 0x01;
        fs::write(&file, &flipped).expect("write the tampered package");
        let opened = match i % 2 {
            0 => VerifiedPackage::open(&file, &keys),
            _ => VerifiedPackage::open_private(&file, &keys, dir),
        };
        if opened.is_ok() {
            accepted.push(i);
        }
    }
    accepted
}

/// Section boundaries of a package: (manifest length N, total length).
fn layout(bytes: &[u8]) -> (usize, usize) {
    let n = manifest_len(bytes);
    assert!(bytes.len() > 12 + n + 64, "package has a payload section");
    (n, bytes.len())
}

#[test]
fn every_flipped_bit_of_a_small_package_is_refused_in_process() {
    let fx = Fixture::release_a();
    let pkg = fx.path("a.bsi");
    let bytes = build(&fx.base, &fx.target, "a", &example_key(), &pkg, &COMPONENTS);
    assert!(
        bytes.len() < 16 * 1024,
        "the small package is a few KB, not {} bytes",
        bytes.len()
    );
    VerifiedPackage::from_bytes(bytes.clone(), &example_trust(), &pkg)
        .expect("the untouched package verifies");
    assert_eq!(accepted_flips(&bytes, 0..bytes.len()), Vec::<usize>::new());
}

#[test]
fn every_flipped_bit_of_a_small_package_file_is_refused() {
    let fx = Fixture::release_a();
    let pkg = fx.path("a.bsi");
    let bytes = build(&fx.base, &fx.target, "a", &example_key(), &pkg, &COMPONENTS);
    let keys = [example_trust()];
    let opened = VerifiedPackage::open(&pkg, &keys).expect("the untouched file verifies");
    let in_memory = VerifiedPackage::from_bytes(bytes.clone(), &keys[0], &pkg).expect("verifies");
    assert_eq!(opened.digest, in_memory.digest);
    assert_eq!(opened.len(), bytes.len() as u64);
    let private = VerifiedPackage::open_private(&pkg, &keys, fx.dir.path()).expect("verifies");
    let all = 0..in_memory.manifest.entries.len();
    let held = in_memory.manifest.entries.range(all).expect("entries");
    for entry in held.iter().filter(|e| e.payload.is_some()) {
        let want = in_memory.payload(entry).expect("payload");
        assert_eq!(
            opened.payload(entry).expect("payload"),
            want,
            "{}",
            entry.path
        );
        assert_eq!(
            private.payload(entry).expect("payload"),
            want,
            "{}",
            entry.path
        );
    }
    assert_eq!(
        accepted_flips_from_file(&bytes, fx.dir.path(), 0..bytes.len()),
        Vec::<usize>::new()
    );
}

#[test]
fn a_package_file_changed_after_verification_is_refused_while_decoding() {
    let fx = Fixture::release_a();
    let pkg = fx.path("a.bsi");
    let bytes = build(&fx.base, &fx.target, "a", &example_key(), &pkg, &COMPONENTS);
    let section = 12 + manifest_len(&bytes) + 64;
    let opened = VerifiedPackage::open(&pkg, &[example_trust()]).expect("verifies");
    let reference = |entry: &bsi_format::Entry| match &entry.op {
        bsi_format::Operation::Delta { source, .. } => {
            let path = source.as_ref().map_or(&entry.path, |s| &s.path);
            Some(fs::read(fx.base.join(path.as_str())).expect("reference in the base tree"))
        }
        _ => None,
    };
    let decode = |entry: &bsi_format::Entry| -> Result<Vec<u8>, String> {
        (opened.decode(entry, reference(entry).as_deref())).map_err(|e| e.to_string())
    };
    let all = 0..opened.manifest.entries.len();
    let held = opened.manifest.entries.range(all).expect("entries");
    let entries: Vec<_> = held
        .iter()
        .filter(|e| e.payload.as_ref().is_some_and(|p| p.len > 0))
        .collect();
    let ops: std::collections::BTreeSet<_> = entries.iter().map(|e| e.op.name()).collect();
    assert!(ops.len() >= 2, "deltas and plain files: {ops:?}");
    for entry in &entries {
        decode(entry).expect("decodes as verified");
        // One byte of this payload changes in the file after it was verified.
        let payload = entry.payload.as_ref().expect("filtered");
        let at = section + (payload.offset + payload.len / 2) as usize;
        let mut changed = bytes.clone();
        changed[at] ^= 0x01;
        fs::write(&pkg, &changed).expect("change the package in place");
        for message in [decode(entry).expect_err("changed"), {
            opened.payload(entry).expect_err("changed").to_string()
        }] {
            assert!(
                message.contains("changed after it was verified: the payload no longer matches"),
                "{}: {message}",
                entry.path
            );
        }
        // The file is cut in the middle of this payload.
        fs::write(&pkg, &bytes[..at]).expect("cut the package in place");
        let message = decode(entry).expect_err("cut");
        assert!(
            message.contains("changed after it was verified: it is shorter"),
            "{}: {message}",
            entry.path
        );
        fs::write(&pkg, &bytes).expect("restore the package");
    }
}

#[test]
fn sampled_flipped_bits_of_a_large_package_are_refused_in_process() {
    let mut base = Model::new();
    let mut target = Model::new();
    for m in [&mut base, &mut target] {
        m.insert("lib".into(), dir(0o755, T0));
        m.insert("lib/keep.dylib".into(), file(pattern(9, 50_000), 0o755, T0));
    }
    base.insert(
        "lib/edited.dylib".into(),
        file(noise(1, 600_000), 0o755, T0),
    );
    let mut edited = noise(1, 600_000);
    edited[300_000..300_100].fill(0xAA);
    target.insert("lib/edited.dylib".into(), file(edited, 0o755, T1));
    for i in 0..6u64 {
        target.insert(
            format!("lib/new-{i}.dylib"),
            file(noise(100 + i, 500_000), 0o644, T1),
        );
    }
    let fx = Fixture::new(&base, &target);
    let pkg = fx.path("large.bsi");
    let bytes = build(&fx.base, &fx.target, "a", &example_key(), &pkg, &[]);
    let (n, len) = layout(&bytes);
    assert!(
        (2_000_000..=5_500_000).contains(&len),
        "the large package is 2-5 MB, not {len} bytes"
    );
    VerifiedPackage::from_bytes(bytes.clone(), &example_trust(), &pkg)
        .expect("the untouched package verifies");
    let mut offsets: Vec<usize> = (0..12).collect();
    offsets.extend((0..40).map(|k| 12 + k * n / 40));
    offsets.extend((0..16).map(|k| 12 + n + k * 4));
    let payload = len - (76 + n);
    offsets.extend((0..131).map(|k| 76 + n + k * payload / 131));
    offsets.push(len - 1);
    offsets.sort_unstable();
    offsets.dedup();
    assert!(offsets.len() >= 195, "{} offsets", offsets.len());
    assert_eq!(accepted_flips(&bytes, offsets), Vec::<usize>::new());
}

#[test]
fn flipped_bits_are_refused_by_verify_and_apply() {
    let fx = Fixture::release_a();
    let pkg = fx.path("a.bsi");
    let bytes = build(&fx.base, &fx.target, "a", &example_key(), &pkg, &COMPONENTS);
    let (n, len) = layout(&bytes);
    let payload = len - (76 + n);
    let offsets = [
        // header: magic, length
        0,
        7,
        8,
        11,
        // manifest
        12,
        12 + n / 3,
        12 + 2 * n / 3,
        11 + n,
        // signature
        12 + n,
        12 + n + 31,
        12 + n + 32,
        75 + n,
        // payload section
        76 + n,
        76 + n + payload / 5,
        76 + n + 2 * payload / 5,
        76 + n + 3 * payload / 5,
        76 + n + 4 * payload / 5,
        len - 2,
        len - 1,
    ];
    let root = fx.base_root("root");
    let before = tree_snapshot(&root);
    let tampered = fx.path("tampered.bsi");
    let trust = example_pub();
    for i in offsets {
        let mut flipped = bytes.clone();
        flipped[i] ^= 0x01;
        fs::write(&tampered, &flipped).expect("write tampered package");
        let context = format!("bit flipped at offset {i} of {len} (manifest {n} bytes)");
        let out = run(["verify", p(&tampered), "--trust", p(&trust)]);
        assert_eq!(out.status.code(), Some(1), "verify accepted a {context}");
        refused(&out, &[p(&tampered)]);
        let out = run([
            "apply",
            p(&tampered),
            "--root",
            p(&root),
            "--trust",
            p(&trust),
        ]);
        assert_eq!(out.status.code(), Some(1), "apply accepted a {context}");
        refused(&out, &[p(&tampered)]);
        assert_eq!(tree_snapshot(&root), before, "apply wrote with a {context}");
        assert!(
            !root.join(".bsi").exists(),
            "apply created state with a {context}"
        );
    }
    assert_eq!(
        ok(&run(["status", "--root", p(&root)])),
        "macOS 26.3\n",
        "no letter is installed"
    );
}

#[test]
fn truncated_and_extended_packages_are_refused() {
    let fx = Fixture::release_a();
    let pkg = fx.path("a.bsi");
    let bytes = build(&fx.base, &fx.target, "a", &example_key(), &pkg, &COMPONENTS);
    let (n, len) = layout(&bytes);
    let payload = len - (76 + n);
    let trust = example_trust();
    let cut = fx.path("cut.bsi");
    let mut cases: Vec<(String, Vec<u8>, &str)> = Vec::new();
    for (what, at) in [
        ("empty", 0),
        ("inside the magic", 5),
        ("header minus one", 11),
        ("header only", 12),
        ("mid-manifest", 12 + n / 2),
        ("manifest without signature", 12 + n),
        ("mid-signature", 12 + n + 32),
    ] {
        cases.push((what.to_owned(), bytes[..at].to_vec(), "truncated"));
    }
    for (what, at) in [
        ("no payload section", 76 + n),
        ("mid-payload", 76 + n + payload / 2),
        ("last byte missing", len - 1),
    ] {
        cases.push((what.to_owned(), bytes[..at].to_vec(), "payload section"));
    }
    for extra in [1usize, 1000] {
        let mut longer = bytes.clone();
        longer.extend(std::iter::repeat_n(0u8, extra));
        cases.push((format!("{extra} bytes appended"), longer, "payload section"));
    }
    let root = fx.base_root("root");
    let before = tree_snapshot(&root);
    for (what, cut_bytes, phrase) in cases {
        let result = VerifiedPackage::from_bytes(cut_bytes.clone(), &trust, &cut);
        let err = match result {
            Ok(_) => panic!("{what}: accepted in process"),
            Err(e) => e.to_string(),
        };
        assert!(err.contains(phrase), "{what}: {err}");
        fs::write(&cut, &cut_bytes).expect("write cut package");
        refused(
            &run(["verify", p(&cut), "--trust", p(&example_pub())]),
            &[phrase, p(&cut)],
        );
        refused(
            &run([
                "apply",
                p(&cut),
                "--root",
                p(&root),
                "--trust",
                p(&example_pub()),
            ]),
            &[phrase],
        );
        assert_eq!(tree_snapshot(&root), before, "{what}: apply wrote");
    }
    assert!(!root.join(".bsi").exists());
}

/// A package, trust file or key named by something other than a regular file is refused at
/// once, in one sentence, and nothing is written: a FIFO would have held bsi waiting for a
/// writer, and `/dev/zero` would have been read until memory ran out.
#[test]
fn inputs_that_are_not_regular_files_are_refused_at_once() {
    let fx = Fixture::release_a();
    let fifo = fx.path("pipe");
    mkfifo(&fifo);
    let dir = fx.path("a-directory");
    fs::create_dir(&dir).expect("make a directory");
    let pkg = fx.path("a.bsi");
    build(&fx.base, &fx.target, "a", &example_key(), &pkg, &COMPONENTS);
    let root = fx.base_root("root");
    let before = tree_snapshot(&root);
    let out = fx.path("out.bsi");
    let public = example_pub();
    let zero = Path::new("/dev/zero");
    for bad in [fifo.as_path(), zero, dir.as_path()] {
        let b = p(bad);
        let root = p(&root);
        let build = build_args(&fx.base, &fx.target, "a", bad, &out, &COMPONENTS);
        let cases: [(&str, Vec<&str>); 6] = [
            ("package", vec!["inspect", b]),
            ("package", vec!["verify", b, "--trust", p(&public)]),
            (
                "package",
                vec!["apply", b, "--root", root, "--trust", p(&public)],
            ),
            ("trust file", vec!["verify", p(&pkg), "--trust", b]),
            (
                "trust file",
                vec!["apply", p(&pkg), "--root", root, "--trust", b],
            ),
            ("key file", build.iter().map(String::as_str).collect()),
        ];
        for (what, args) in cases {
            let done = bsi()
                .args(&args)
                .timeout(std::time::Duration::from_secs(30))
                .output()
                .expect("run bsi");
            refused(&done, &[what, b, "not a regular file"]);
        }
    }
    assert_eq!(tree_snapshot(&root), before, "apply wrote in the root");
    assert!(!root.join(".bsi").exists(), "apply made a state directory");
    assert!(!out.exists(), "build wrote a package");
}

/// A validly signed manifest whose time has a billion nanoseconds or more (a time no file can
/// show, and one the kernel refuses to set) is refused by `bsi verify` and `bsi apply` in one
/// sentence naming the package and the time, and nothing is written; 999,999,999 is a time.
#[test]
fn a_signed_time_past_its_second_is_refused() {
    let mut base = Model::new();
    base.insert("f".into(), file("old\n", 0o644, (T0.0, 0)));
    let mut target = base.clone();
    target.insert("f".into(), file("new\n", 0o644, (T1.0, 0)));
    let fx = Fixture::new(&base, &target);
    let pkg = fx.path("pkg.bsi");
    let bytes = build(&fx.base, &fx.target, "a", &example_key(), &pkg, &[]);
    let raw = bsi_format::RawPackage::split(&bytes).expect("package splits");
    let manifest = bsi_format::unpack_manifest(raw.manifest).expect("manifest unpacks");
    let post = format!(r#""mtime":{{"secs":{},"nanos":0}}"#, T1.0);
    let root = fx.path("root");
    write_tree(&root, &base, false);
    for (nanos, accepted) in [
        (999_999_999u32, true),
        (1_000_000_000, false),
        (u32::MAX, false),
    ] {
        let crafted_manifest = replace_once(
            &manifest,
            post.as_bytes(),
            format!(r#""mtime":{{"secs":{},"nanos":{nanos}}}"#, T1.0).as_bytes(),
        );
        let crafted = fx.path("crafted.bsi");
        fs::write(&crafted, resign(&bytes, &crafted_manifest)).expect("write crafted package");
        let verify = run(["verify", p(&crafted), "--trust", p(&example_pub())]);
        if accepted {
            ok(&verify);
            continue;
        }
        let phrase = format!("{nanos} nanoseconds");
        refused(&verify, &[p(&crafted), &phrase]);
        let before = tree_snapshot(&root);
        let state = fx.path("state");
        refused(
            &run([
                "apply",
                p(&crafted),
                "--root",
                p(&root),
                "--trust",
                p(&example_pub()),
                "--state-dir",
                p(&state),
            ]),
            &[p(&crafted), &phrase],
        );
        assert_eq!(tree_snapshot(&root), before, "{nanos}: the root changed");
        assert!(!state.exists(), "{nanos}: a state directory was made");
    }
}
