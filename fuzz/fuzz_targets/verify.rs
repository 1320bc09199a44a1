//! Arbitrary bytes through the whole verification path with a fixed trusted key: in memory
//! (`from_bytes`), and from a file (`open`, which reads in chunks), which must agree.
#![no_main]

use std::path::PathBuf;
use std::sync::OnceLock;

use bsi_engine::VerifiedPackage;
use bsi_sign::SecretKey;
use libfuzzer_sys::fuzz_target;

/// The file each input is written to (one per fuzzing process).
fn file() -> &'static PathBuf {
    static FILE: OnceLock<PathBuf> = OnceLock::new();
    FILE.get_or_init(|| {
        std::env::temp_dir().join(format!("bsi-fuzz-verify-{}.bsi", std::process::id()))
    })
}

fuzz_target!(|data: &[u8]| {
    let trust = SecretKey::from_seed([9; 32]).public();
    let path = file();
    let in_memory = VerifiedPackage::from_bytes(data.to_vec(), &trust, path);
    std::fs::write(path, data).expect("write the input to a file");
    let from_file = VerifiedPackage::open(path, std::slice::from_ref(&trust));
    match (in_memory, from_file) {
        (Ok(a), Ok(b)) => {
            assert_eq!(a.digest, b.digest);
            assert_eq!(a.len(), b.len());
            let entries = a.manifest.entries.range(0..a.manifest.entries.len());
            for entry in entries.expect("entries read back").iter() {
                let (pa, pb) = (a.payload(entry), b.payload(entry));
                assert_eq!(pa.ok(), pb.ok(), "{}", entry.path);
            }
        }
        (Err(a), Err(b)) => assert_eq!(a.to_string(), b.to_string()),
        (a, b) => panic!(
            "from_bytes and open disagree: {:?} / {:?}",
            a.map(|p| p.digest),
            b.map(|p| p.digest)
        ),
    }
});
