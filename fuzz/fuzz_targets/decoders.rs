//! Every decoder fed arbitrary payloads: each registered delta encoder's and plain zstd's.
//!
//! Input layout: 1 byte selects the decoder, 3 bytes give the expected new length (as the
//! verified manifest would, up to 16 MiB), 2 bytes the old file's length; then the old file,
//! then the payload.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let [which, l0, l1, l2, o0, o1, rest @ ..] = data else {
        return;
    };
    let new_len = u64::from(u32::from_le_bytes([*l0, *l1, *l2, 0]));
    let old_len = usize::from(u16::from_le_bytes([*o0, *o1])).min(rest.len());
    let (old, payload) = rest.split_at(old_len);
    let encoders = bsi_delta::delta_encoders();
    let choice = usize::from(*which) % (encoders.len() + 1);
    match encoders.get(choice) {
        Some(encoder) => {
            if let Ok(out) = encoder.decode(old, payload, new_len) {
                assert_eq!(out.len() as u64, new_len, "{} returned a wrong length", encoder.name());
            }
        }
        None => {
            if let Ok(out) = bsi_delta::decompress(payload, new_len) {
                assert_eq!(out.len() as u64, new_len, "plain zstd returned a wrong length");
            }
        }
    }
});
