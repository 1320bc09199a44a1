//! Arbitrary bytes as a package: splitting, manifest parsing and validation, payload checks.
#![no_main]

use bsi_format::{Manifest, RawPackage};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let _ = Manifest::from_bytes(data);
    if let Ok(raw) = RawPackage::split(data) {
        // In real use this runs only after the signature checked; it must not panic anyway.
        if let Ok(manifest) = raw.check_after_signature() {
            for entry in &manifest.entries {
                if let Some(p) = &entry.payload {
                    let _ = raw.payload(p);
                }
            }
        }
    }
});
