//! Every decoder fed arbitrary payloads: each registered delta encoder's and plain zstd's;
//! blocks' also with its old file on disk, which must decode exactly as from memory.
//!
//! Input layout: 1 byte selects the decoder, 3 bytes give the expected new length (as the
//! verified manifest would, up to 16 MiB), 2 bytes the old file's length; then the old file,
//! then the payload.
#![no_main]

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::sync::OnceLock;

use libfuzzer_sys::fuzz_target;

/// One scratch file for the old files blocks reads on disk, removed as soon as it is open.
fn scratch() -> &'static File {
    static FILE: OnceLock<File> = OnceLock::new();
    FILE.get_or_init(|| {
        let path = std::env::temp_dir().join(format!("bsi-fuzz-old-{}", std::process::id()));
        let file = File::options()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(&path)
            .expect("create the scratch file");
        std::fs::remove_file(&path).expect("unlink the scratch file");
        file
    })
}

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
            let decoded = encoder.decode(old, payload, new_len);
            if let Ok(out) = &decoded {
                assert_eq!(out.len() as u64, new_len, "{} returned a wrong length", encoder.name());
            }
            if encoder.name() == "blocks" {
                let file = scratch();
                file.set_len(0).expect("truncate the scratch file");
                file.write_all_at(old, 0).expect("write the scratch file");
                let mut out = Vec::new();
                let on_disk = bsi_delta::Blocks
                    .decode_file_into(file, old.len() as u64, payload, new_len, &mut out)
                    .map(|()| out);
                assert_eq!(decoded.ok(), on_disk.ok(), "blocks decodes otherwise from disk");
            }
        }
        None => {
            if let Ok(out) = bsi_delta::decompress(payload, new_len) {
                assert_eq!(out.len() as u64, new_len, "plain zstd returned a wrong length");
            }
        }
    }
});
