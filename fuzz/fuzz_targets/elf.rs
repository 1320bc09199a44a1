//! bsdiff's reference prediction on damaged and hostile input, around a real library (the
//! gcc-built pairs of `crates/bsi-delta/tests/data/elf-1.*`, for x86-64 and for AArch64), a
//! universal Mach-O file (`macho-1.*`) and a thin one with a symbol table (`macho-4.*`, whose
//! payload has predictor 3), both built by bsi-delta's tests.
//!
//! Input: 1 byte selects the mode (its value mod 4), the library (bits 2 and 3: x86-64,
//! AArch64, the universal Mach-O pair `macho-1.*`, or `macho-4.*`) and the stored payload
//! (bit 4: format 3, or format 5 with bit 7 too, else format 2, which the Mach-O pairs have
//! not; `macho-4.*` has format 3 only), the rest is the mode's
//! data. Modes 0 and 2 damage the old library:
//! 2 bytes give an offset into it and the rest overwrites it from there.
//! - 0: the damaged library is encoded against the new one, which the payload must give back
//!   (the encoder and the decoder find the same references, or none); with bit 5 set, one of
//!   the pairs `elf-2.*` instead (bit 2: x86-64 or AArch64), whose linkage stubs the encoder
//!   matches by symbol, its old library damaged, or its new one with bit 6 set;
//! - 2: a stored payload (`bsdiff-2.bin`, `bsdiff-3-elf.bin`, `bsdiff-5-elf.bin`, those of
//!   AArch64 or Mach-O) is decoded against the damaged library;
//! - 1, 3: the rest is a payload, decoded against the undamaged library, so that a hostile
//!   control stream builds the alignment the predictor uses (with a length of the new file
//!   from its first 3 bytes, as the verified manifest would give it).
//!
//! Encoding is slow (three suffix arrays), so it is one mode in four.
#![no_main]

use bsi_delta::{Bsdiff, DeltaEncoder};
use libfuzzer_sys::fuzz_target;

/// (old library, new library, stored payloads between them: format 2, format 3, format 5).
const LIBRARIES: [(&[u8], &[u8], [&[u8]; 3]); 4] = [
    (
        include_bytes!("../../crates/bsi-delta/tests/data/elf-1.old.so"),
        include_bytes!("../../crates/bsi-delta/tests/data/elf-1.new.so"),
        [
            include_bytes!("../../crates/bsi-delta/tests/data/bsdiff-2.bin"),
            include_bytes!("../../crates/bsi-delta/tests/data/bsdiff-3-elf.bin"),
            include_bytes!("../../crates/bsi-delta/tests/data/bsdiff-5-elf.bin"),
        ],
    ),
    (
        include_bytes!("../../crates/bsi-delta/tests/data/elf-1.arm64.old.so"),
        include_bytes!("../../crates/bsi-delta/tests/data/elf-1.arm64.new.so"),
        [
            include_bytes!("../../crates/bsi-delta/tests/data/bsdiff-2-arm64.bin"),
            include_bytes!("../../crates/bsi-delta/tests/data/bsdiff-3-arm64.bin"),
            include_bytes!("../../crates/bsi-delta/tests/data/bsdiff-5-arm64.bin"),
        ],
    ),
    (
        include_bytes!("../../crates/bsi-delta/tests/data/macho-1.old"),
        include_bytes!("../../crates/bsi-delta/tests/data/macho-1.new"),
        [
            include_bytes!("../../crates/bsi-delta/tests/data/bsdiff-3-macho.bin"),
            include_bytes!("../../crates/bsi-delta/tests/data/bsdiff-3-macho.bin"),
            include_bytes!("../../crates/bsi-delta/tests/data/bsdiff-5-macho.bin"),
        ],
    ),
    (
        include_bytes!("../../crates/bsi-delta/tests/data/macho-4.old"),
        include_bytes!("../../crates/bsi-delta/tests/data/macho-4.new"),
        [
            include_bytes!("../../crates/bsi-delta/tests/data/bsdiff-3-symbols.bin"),
            include_bytes!("../../crates/bsi-delta/tests/data/bsdiff-3-symbols.bin"),
            include_bytes!("../../crates/bsi-delta/tests/data/bsdiff-3-symbols.bin"),
        ],
    ),
];

/// (old library, new library) whose procedure linkage tables differ by one stub.
const STUBS: [(&[u8], &[u8]); 2] = [
    (
        include_bytes!("../../crates/bsi-delta/tests/data/elf-2.old.so"),
        include_bytes!("../../crates/bsi-delta/tests/data/elf-2.new.so"),
    ),
    (
        include_bytes!("../../crates/bsi-delta/tests/data/elf-2.arm64.old.so"),
        include_bytes!("../../crates/bsi-delta/tests/data/elf-2.arm64.new.so"),
    ),
];

/// The old library `old` with `data` (an offset, then bytes) written over it.
fn damaged(old: &[u8], data: &[u8]) -> Option<Vec<u8>> {
    let [a, b, patch @ ..] = data else {
        return None;
    };
    let mut old = old.to_vec();
    let at = usize::from(u16::from_le_bytes([*a, *b])) % old.len();
    let n = patch.len().min(old.len() - at);
    old[at..at + n].copy_from_slice(&patch[..n]);
    Some(old)
}

fn check_length(decoded: Result<Vec<u8>, bsi_delta::DecodeError>, new_len: u64) {
    if let Ok(out) = decoded {
        assert_eq!(out.len() as u64, new_len, "bsdiff returned a wrong length");
    }
}

fuzz_target!(|data: &[u8]| {
    let [mode, rest @ ..] = data else {
        return;
    };
    let (library, new, stored) = LIBRARIES[usize::from(mode >> 2 & 3) % LIBRARIES.len()];
    let stored = stored[match (mode >> 4 & 1, mode >> 7) {
        (0, _) => 0,
        (_, 0) => 1,
        _ => 2,
    }];
    match mode % 4 {
        0 => {
            let (old, new) = match (mode >> 5 & 1, mode >> 6 & 1) {
                (0, _) => (damaged(library, rest), Some(new.to_vec())),
                (_, side) => {
                    let (old, new) = STUBS[usize::from(mode >> 2 & 1)];
                    match side {
                        0 => (damaged(old, rest), Some(new.to_vec())),
                        _ => (Some(old.to_vec()), damaged(new, rest)),
                    }
                }
            };
            let (Some(old), Some(new)) = (old, new) else {
                return;
            };
            let payload = Bsdiff::PLAIN
                .encode(&old, &new)
                .expect("encoding in memory does not fail")
                .expect("bsdiff applies to every pair");
            let decoded = Bsdiff::PLAIN
                .decode(&old, &payload, new.len() as u64)
                .expect("a payload decodes against its own old file");
            assert!(decoded == new, "the round trip changed the file");
        }
        2 => {
            let Some(old) = damaged(library, rest) else {
                return;
            };
            let new_len = new.len() as u64;
            check_length(Bsdiff::PLAIN.decode(&old, stored, new_len), new_len);
        }
        _ => {
            let [l0, l1, l2, payload @ ..] = rest else {
                return;
            };
            let new_len = u64::from(u32::from_le_bytes([*l0, *l1, *l2, 0]));
            check_length(Bsdiff::PLAIN.decode(library, payload, new_len), new_len);
        }
    }
});
