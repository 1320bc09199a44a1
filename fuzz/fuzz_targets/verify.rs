//! Arbitrary bytes through the whole verification path with a fixed trusted key.
#![no_main]

use std::path::Path;

use bsi_engine::VerifiedPackage;
use bsi_sign::SecretKey;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let trust = SecretKey::from_seed([9; 32]).public();
    let _ = VerifiedPackage::from_bytes(data.to_vec(), &trust, Path::new("fuzz.bsi"));
});
