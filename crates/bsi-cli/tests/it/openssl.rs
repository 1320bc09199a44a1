//! Signatures are standard ed25519 over the header and manifest: openssl checks them too.

use std::fs;
use std::process::Command;

use crate::support::*;

fn openssl_verify(
    public: &std::path::Path,
    signed: &std::path::Path,
    sig: &std::path::Path,
) -> std::process::Output {
    Command::new("openssl")
        .args(["pkeyutl", "-verify", "-pubin", "-inkey"])
        .arg(public)
        .arg("-rawin")
        .arg("-in")
        .arg(signed)
        .arg("-sigfile")
        .arg(sig)
        .output()
        .unwrap_or_else(|e| {
            panic!("cannot run `openssl` ({e}); it must be on PATH: .ci/run installs it")
        })
}

#[test]
fn openssl_verifies_the_package_signature() {
    let fx = Fixture::release_a();
    let pkg = fx.path("a.bsi");
    let bytes = build(&fx.base, &fx.target, "a", &example_key(), &pkg, &COMPONENTS);
    let n = manifest_len(&bytes);
    let signed = fx.path("signed.bin");
    let sig = fx.path("sig.bin");
    fs::write(&signed, &bytes[..12 + n]).expect("write signed bytes");
    fs::write(&sig, &bytes[12 + n..76 + n]).expect("write signature");

    let out = openssl_verify(&example_pub(), &signed, &sig);
    assert!(
        out.status.success(),
        "openssl refused a good signature:\n{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stdout).contains("Signature Verified Successfully"));

    let mut altered = bytes[..12 + n].to_vec();
    altered[12 + n / 2] ^= 0x01;
    fs::write(&signed, &altered).expect("write altered bytes");
    let out = openssl_verify(&example_pub(), &signed, &sig);
    assert!(
        !out.status.success(),
        "openssl accepted altered bytes:\n{}",
        String::from_utf8_lossy(&out.stdout)
    );
}
